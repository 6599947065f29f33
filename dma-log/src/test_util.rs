//! What the tests of several modules share.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{DmaLog, DmaLogReader, Record};

/// An output that appends to a shared buffer, optionally slowly, and fails once
/// `fail_after` bytes have been written.
#[derive(Clone, Default)]
pub(crate) struct Out {
    pub(crate) buf: Arc<Mutex<Vec<u8>>>,
    pub(crate) slow: Option<Duration>,
    pub(crate) fail_after: Option<usize>,
    pub(crate) flushes: Arc<AtomicUsize>,
}

impl io::Write for Out {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if let Some(d) = self.slow {
            std::thread::sleep(d);
        }
        let mut buf = self.buf.lock().unwrap();
        if self.fail_after.is_some_and(|n| buf.len() + b.len() > n) {
            return Err(io::Error::other("disk full (test)"));
        }
        buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Out {
    /// An output whose every write takes `delay`.
    pub(crate) fn slow(delay: Duration) -> Self {
        Out {
            slow: Some(delay),
            ..Out::default()
        }
    }

    /// A log writing to this output.
    pub(crate) fn log(&self) -> DmaLog {
        DmaLog::new(self.clone()).unwrap()
    }

    /// What was written so far.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    /// The records written so far (header excluded).
    pub(crate) fn records(&self) -> Vec<Record> {
        let bytes = self.bytes();
        DmaLogReader::new(&bytes[..])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}
