//! The zstd output of a `.zst` log.

use std::io::{self, Write};

use zstd::stream::write::Encoder;

/// A zstd stream that ends its frame at every `flush`: the writer thread flushes
/// only when [`crate::DmaLog::flush`] is called (the VMM does at the end of a run)
/// or at shutdown, so a flushed log is a complete zstd file (`zstd -t` passes, the
/// frame end is there even if the process then exits without dropping the log), and
/// the next record starts a new frame (readers decode concatenated frames). A log
/// cut inside a frame still decodes up to its last complete block.
pub(crate) struct ZstdFrames<W: Write> {
    level: i32,
    /// The output between frames.
    idle: Option<W>,
    /// The frame being written.
    frame: Option<Encoder<'static, W>>,
}

impl<W: Write> ZstdFrames<W> {
    /// Compresses into `out` at `level`.
    pub(crate) fn new(out: W, level: i32) -> Self {
        ZstdFrames {
            level,
            idle: Some(out),
            frame: None,
        }
    }

    /// A write error of an earlier frame consumed the output.
    fn gone() -> io::Error {
        io::Error::other("the zstd stream failed earlier")
    }
}

impl<W: Write> Write for ZstdFrames<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.frame.is_none() {
            let out = self.idle.take().ok_or_else(Self::gone)?;
            self.frame = Some(Encoder::new(out, self.level)?);
        }
        self.frame.as_mut().ok_or_else(Self::gone)?.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(frame) = self.frame.take() {
            self.idle = Some(frame.finish()?);
        }
        self.idle.as_mut().ok_or_else(Self::gone)?.flush()
    }
}

impl<W: Write> Drop for ZstdFrames<W> {
    fn drop(&mut self) {
        // The writer thread flushes at shutdown; this covers an output dropped
        // without it. An error here has no one to go to: the reader will say
        // where the log stops.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flush_ends_a_frame_that_decodes_alone() {
        let mut z = ZstdFrames::new(Vec::new(), 1);
        z.write_all(b"first line\n").unwrap();
        z.flush().unwrap();
        let one_frame = z.idle.clone().unwrap();
        assert_eq!(zstd::decode_all(&one_frame[..]).unwrap(), b"first line\n");
        z.write_all(b"second line\n").unwrap();
        z.flush().unwrap();
        // Flushing with nothing written adds no empty frame.
        z.flush().unwrap();
        let two = z.idle.clone().unwrap();
        assert_eq!(
            zstd::decode_all(&two[..]).unwrap(),
            b"first line\nsecond line\n"
        );
    }
}
