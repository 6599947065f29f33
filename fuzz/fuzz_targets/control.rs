//! Fuzzes the guest control channel: the byte stream a guest writes to COM2, split
//! into lines by `ControlChannel` and parsed by `ControlMessage::parse`, then what
//! the VMM does with each message's text (a `mark` label through `Marker::parse`, a
//! `report` payload through serde into `MethodReport`). The same bytes, taken as a
//! kernel command line, go through the `zc.*` option parser the guest program uses.
//!
//! Checked, besides "no panic":
//! - every message formats as exactly one line (`to_line`), and parses back to
//!   itself when its text has no control characters (which `to_line` replaces) and
//!   it is not `Malformed` or `uptime` (whose text is normalised);
//! - options that parse, with no unknown keys, format (`to_cmdline`) into a command
//!   line that parses back to the same options.

#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use zc_devices::control::ControlChannel;
use zc_protocol::{ControlMessage, Marker, MethodReport, Options};

fuzz_target!(|data: &[u8]| {
    let (mut channel, messages) = ControlChannel::new();
    channel
        .write_all(data)
        .expect("the channel takes every byte");
    for message in messages.drain() {
        let line = message.to_line();
        let (last, body) = line.split_last().expect("at least the newline");
        assert_eq!(*last, b'\n');
        assert!(
            !body.contains(&b'\n'),
            "{message:?} formats as several lines"
        );
        let text = match &message {
            ControlMessage::Mark { label } => {
                if let Some(marker) = Marker::parse(label) {
                    let _ = marker.span().method();
                    assert!(marker.matches(&marker.label()));
                }
                label
            }
            ControlMessage::Report { json } => {
                if let Ok(report) = serde_json::from_str::<MethodReport>(json) {
                    let _ = serde_json::from_str::<MethodReport>(&report.to_json())
                        .expect("a report's own JSON parses");
                }
                json
            }
            ControlMessage::Hello { kernel_release } => kernel_release,
            ControlMessage::Log { text } => text,
            ControlMessage::Exit { .. } => "",
            ControlMessage::Uptime { .. } | ControlMessage::Malformed { .. } => continue,
        };
        if !text.bytes().any(|b| b < 0x20 || b == 0x7f) {
            let back =
                ControlMessage::parse(std::str::from_utf8(body).expect("UTF-8 in, UTF-8 out"));
            assert_eq!(back, message, "line {:?}", String::from_utf8_lossy(body));
        }
    }
    if let Ok(cmdline) = std::str::from_utf8(data) {
        if let Ok(options) = Options::parse(cmdline) {
            if options.unknown.is_empty() {
                let again = Options::parse(&options.to_cmdline());
                assert_eq!(
                    again.as_ref(),
                    Ok(&options),
                    "cmdline {:?}",
                    options.to_cmdline()
                );
            }
        }
    }
});
