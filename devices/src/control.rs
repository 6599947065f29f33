//! The guest control channel: line messages the guest program writes to the second
//! UART (COM2, I/O port 0x2f8, `ttyS1`).
//!
//! The guest writes straight to the UART's transmit register with `outb` (after
//! `ioperm`), bypassing the kernel's tty layer, so each byte is one synchronous port
//! exit and a message is complete, on the VMM side, before the guest's next
//! instruction runs. That is what lets a `mark` line delimit device activity exactly.
//! The wire format is documented in `docs/control-channel.md`.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

/// Longest line the channel accepts; a longer one is cut and reported as malformed,
/// so a runaway guest cannot make the VMM buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// One message from the guest.
#[derive(Debug, Clone, PartialEq)]
pub enum ControlMessage {
    /// `hello <kernel release>`: the guest program started; names the running kernel.
    Hello {
        /// `uname -r` of the guest kernel.
        kernel_release: String,
    },
    /// `uptime <seconds>`: the guest's `/proc/uptime` when its program started.
    Uptime {
        /// Seconds since the guest kernel started.
        seconds: f64,
    },
    /// `mark <label>`: a point in time the device logs are split at (BEGIN/END of a method).
    Mark {
        /// Free-form label, e.g. `BEGIN sendfile`.
        label: String,
    },
    /// `log <text>`: a human-readable line from the guest program.
    Log {
        /// The text.
        text: String,
    },
    /// `report <json>`: a machine-readable result; the payload is kept verbatim.
    Report {
        /// The JSON text, unparsed.
        json: String,
    },
    /// `exit <code>`: the guest program finished with this status; the VMM exits with it.
    Exit {
        /// Exit status, 0 for success.
        code: i32,
    },
    /// A line that does not follow the protocol; kept so the VMM can show it.
    Malformed {
        /// The offending line, lossily decoded.
        line: String,
    },
}

impl ControlMessage {
    /// Parses one line (without its trailing newline).
    pub fn parse(line: &str) -> ControlMessage {
        let line = line.trim_end_matches('\r');
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        let malformed = || ControlMessage::Malformed {
            line: line.to_string(),
        };
        match verb {
            "hello" if !rest.is_empty() => ControlMessage::Hello {
                kernel_release: rest.to_string(),
            },
            "uptime" => rest
                .trim()
                .parse()
                .map(|seconds| ControlMessage::Uptime { seconds })
                .unwrap_or_else(|_| malformed()),
            "mark" if !rest.is_empty() => ControlMessage::Mark {
                label: rest.to_string(),
            },
            "log" => ControlMessage::Log {
                text: rest.to_string(),
            },
            "report" if !rest.is_empty() => ControlMessage::Report {
                json: rest.to_string(),
            },
            "exit" => rest
                .trim()
                .parse()
                .map(|code| ControlMessage::Exit { code })
                .unwrap_or_else(|_| malformed()),
            _ => malformed(),
        }
    }
}

/// The receiving end: a byte sink for the UART model that splits lines into
/// [`ControlMessage`]s and queues them for the VMM.
#[derive(Debug, Default)]
pub struct ControlChannel {
    partial: Vec<u8>,
    overflowed: bool,
    queue: Arc<Mutex<VecDeque<ControlMessage>>>,
}

/// A handle to the messages a [`ControlChannel`] has parsed, for the VMM's run loop.
#[derive(Debug, Clone, Default)]
pub struct ControlMessages {
    queue: Arc<Mutex<VecDeque<ControlMessage>>>,
}

impl ControlMessages {
    /// Takes every message received so far, oldest first.
    pub fn drain(&self) -> Vec<ControlMessage> {
        // A poisoned lock only means another thread panicked mid-push; the queue
        // itself is still a valid VecDeque, so keep going with its contents.
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.drain(..).collect()
    }
}

impl ControlChannel {
    /// Creates a channel and the handle its messages are read from.
    pub fn new() -> (ControlChannel, ControlMessages) {
        let channel = ControlChannel::default();
        let messages = ControlMessages {
            queue: channel.queue.clone(),
        };
        (channel, messages)
    }

    fn push_byte(&mut self, byte: u8) {
        if byte == b'\n' {
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            let message = if self.overflowed {
                ControlMessage::Malformed { line }
            } else {
                ControlMessage::parse(&line)
            };
            self.partial.clear();
            self.overflowed = false;
            self.queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back(message);
        } else if self.partial.len() < MAX_LINE {
            self.partial.push(byte);
        } else {
            self.overflowed = true;
        }
    }
}

impl io::Write for ControlChannel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.push_byte(byte);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::io::Write;

    #[rstest]
    #[case("hello 6.1.0-56-cloud-amd64", ControlMessage::Hello { kernel_release: "6.1.0-56-cloud-amd64".into() })]
    #[case("uptime 1.25", ControlMessage::Uptime { seconds: 1.25 })]
    #[case("mark BEGIN sendfile", ControlMessage::Mark { label: "BEGIN sendfile".into() })]
    #[case("log hi there", ControlMessage::Log { text: "hi there".into() })]
    #[case("report {\"a\":1}", ControlMessage::Report { json: "{\"a\":1}".into() })]
    #[case("exit 3", ControlMessage::Exit { code: 3 })]
    #[case("exit -1\r", ControlMessage::Exit { code: -1 })]
    #[case("exit x", ControlMessage::Malformed { line: "exit x".into() })]
    #[case("uptime", ControlMessage::Malformed { line: "uptime".into() })]
    #[case("hello", ControlMessage::Malformed { line: "hello".into() })]
    #[case("bogus 1", ControlMessage::Malformed { line: "bogus 1".into() })]
    #[case("", ControlMessage::Malformed { line: "".into() })]
    fn parses_lines(#[case] line: &str, #[case] expected: ControlMessage) {
        assert_eq!(ControlMessage::parse(line), expected);
    }

    #[test]
    fn splits_byte_stream_into_messages() {
        let (mut channel, messages) = ControlChannel::new();
        for byte in b"hello 6.1\nupt" {
            channel.write_all(&[*byte]).unwrap();
        }
        assert_eq!(
            messages.drain(),
            vec![ControlMessage::Hello {
                kernel_release: "6.1".into()
            }]
        );
        channel.write_all(b"ime 0.5\nexit 0\n").unwrap();
        assert_eq!(
            messages.drain(),
            vec![
                ControlMessage::Uptime { seconds: 0.5 },
                ControlMessage::Exit { code: 0 }
            ]
        );
        assert!(messages.drain().is_empty());
    }

    #[test]
    fn overlong_line_is_bounded_and_malformed() {
        let (mut channel, messages) = ControlChannel::new();
        channel.write_all(b"exit ").unwrap();
        channel.write_all(&vec![b'0'; MAX_LINE * 2]).unwrap();
        channel.write_all(b"\nexit 1\n").unwrap();
        let got = messages.drain();
        assert_eq!(got.len(), 2);
        match &got[0] {
            ControlMessage::Malformed { line } => assert_eq!(line.len(), MAX_LINE),
            other => panic!("expected malformed, got {other:?}"),
        }
        assert_eq!(got[1], ControlMessage::Exit { code: 1 });
    }
}
