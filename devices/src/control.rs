//! The guest control channel: line messages the guest program writes to the second
//! UART (COM2, I/O port 0x2f8, `ttyS1`).
//!
//! The guest writes straight to the UART's transmit register with `outb` (after
//! `ioperm`), bypassing the kernel's tty layer, so each byte is one synchronous port
//! exit and a message is complete, on the VMM side, before the guest's next
//! instruction runs. That is what lets a `mark` line delimit device activity exactly.
//! The messages and their one parser are `zc_protocol::control`; the wire format
//! is documented in `docs/control-channel.md`.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

/// One message from the guest, and the longest line accepted: the protocol's.
pub use zc_protocol::control::{ControlMessage, MAX_LINE};

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
    use std::io::Write;

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
