//! The guest's serial console output (COM1, `ttyS0`): passed on to stdout or a file,
//! with the last lines kept so that a failed run can show what the guest said last.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// How many complete lines [`ConsoleSink`] remembers.
pub const TAIL_LINES: usize = 25;
/// Longest line kept in the tail; the rest of a longer line is dropped from the tail
/// (not from the output).
const TAIL_LINE_MAX: usize = 512;

/// A byte sink for the console UART: forwards every byte, remembers the tail.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    partial: Vec<u8>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// A handle to the console's last lines, readable while the sink is owned by the UART.
#[derive(Debug, Clone, Default)]
pub struct ConsoleTail {
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ConsoleTail {
    /// The last lines the guest printed, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl ConsoleSink {
    /// A sink forwarding to `out`, and the handle to its tail.
    pub fn new(out: Box<dyn Write + Send>) -> (ConsoleSink, ConsoleTail) {
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        (
            ConsoleSink {
                out,
                partial: Vec::new(),
                tail: tail.clone(),
            },
            ConsoleTail { tail },
        )
    }

    fn remember(&mut self, byte: u8) {
        match byte {
            b'\n' => {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            _ if self.partial.len() < TAIL_LINE_MAX => self.partial.push(byte),
            _ => {}
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.remember(byte);
        }
        // The guest must not stall on a closed stdout (e.g. `zc-vmm run | head`):
        // output errors are swallowed here and the tail is still kept.
        let _ = self.out.write_all(buf);
        if buf.contains(&b'\n') {
            let _ = self.out.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn forwards_everything_and_keeps_last_lines() {
        let out = Shared::default();
        let (mut sink, tail) = ConsoleSink::new(Box::new(out.clone()));
        for i in 0..(TAIL_LINES + 5) {
            write!(sink, "line {i}\r\n").unwrap();
        }
        sink.write_all(b"partial").unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines.last().unwrap(), &format!("line {}", TAIL_LINES + 4));
        let all = out.0.lock().unwrap();
        assert!(all.starts_with(b"line 0\r\n") && all.ends_with(b"partial"));
    }

    #[test]
    fn long_lines_are_cut_in_the_tail_only() {
        let out = Shared::default();
        let (mut sink, tail) = ConsoleSink::new(Box::new(out.clone()));
        sink.write_all(&[b'x'; 2000]).unwrap();
        sink.write_all(b"\n").unwrap();
        assert_eq!(tail.lines()[0].len(), TAIL_LINE_MAX);
        assert_eq!(out.0.lock().unwrap().len(), 2001);
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn broken_output_does_not_fail_the_guest() {
        let (mut sink, tail) = ConsoleSink::new(Box::new(Broken));
        sink.write_all(b"still kept\n").unwrap();
        assert_eq!(tail.lines(), vec!["still kept".to_string()]);
    }
}
