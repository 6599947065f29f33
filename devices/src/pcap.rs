//! A writer for classic libpcap capture files (`.pcap`), so the frames a net device
//! carried open in Wireshark, `tshark` and `tcpdump`.
//!
//! Format: the 24-byte global header with the nanosecond-resolution magic
//! `0xa1b23c4d`, version 2.4, link type [`LINKTYPE_ETHERNET`], then one 16-byte record
//! header (seconds, nanoseconds, captured length, original length) per frame followed
//! by the captured bytes. Everything is written little-endian; readers detect the byte
//! order from the magic. Classic pcap has no direction field: frames of both
//! directions go into one file in the order they are written, and the addresses tell
//! them apart.
//!
//! Cost: one 16-byte header plus the frame's bytes into a buffered writer, so about
//! one memcpy of every captured byte; a smaller snap length (see
//! [`PcapWriter::with_snaplen`]) keeps only headers when the payload is not needed.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Magic number of a pcap file whose timestamps are in nanoseconds.
pub const PCAP_MAGIC_NANOS: u32 = 0xa1b2_3c4d;
/// The link type of Ethernet II frames (`LINKTYPE_ETHERNET`, `DLT_EN10MB`).
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Default snap length: the most bytes kept of one frame, as `tcpdump` uses.
pub const DEFAULT_SNAPLEN: u32 = 262_144;
/// Size of the file's global header.
pub const GLOBAL_HEADER_LEN: usize = 24;
/// Size of each frame's record header.
pub const RECORD_HEADER_LEN: usize = 16;

/// What can go wrong writing a capture.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// The capture file could not be created.
    #[error(
        "cannot create pcap file {path}: {source} (check the directory exists and is writable)"
    )]
    Create {
        /// The file asked for.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// Writing to the capture failed (disk full, closed pipe, ...).
    #[error("cannot write pcap data: {0}")]
    Write(#[from] io::Error),
    /// A snap length of zero keeps nothing.
    #[error("pcap snap length must be at least 1 byte")]
    ZeroSnaplen,
}

/// Writes Ethernet frames into a classic pcap stream.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    snaplen: u32,
    frames: u64,
}

impl PcapWriter<BufWriter<File>> {
    /// Creates (or truncates) the file at `path` and writes the global header.
    pub fn create(path: &Path) -> Result<Self, PcapError> {
        let file = File::create(path).map_err(|source| PcapError::Create {
            path: path.to_owned(),
            source,
        })?;
        Self::new(BufWriter::with_capacity(1 << 20, file))
    }
}

impl<W: Write> PcapWriter<W> {
    /// Writes the global header to `out`, keeping up to [`DEFAULT_SNAPLEN`] bytes of
    /// each frame.
    pub fn new(out: W) -> Result<Self, PcapError> {
        Self::with_snaplen(out, DEFAULT_SNAPLEN)
    }

    /// Writes the global header to `out`, keeping up to `snaplen` bytes of each
    /// frame (the record still carries the frame's full length).
    pub fn with_snaplen(mut out: W, snaplen: u32) -> Result<Self, PcapError> {
        if snaplen == 0 {
            return Err(PcapError::ZeroSnaplen);
        }
        let mut header = [0u8; GLOBAL_HEADER_LEN];
        header[0..4].copy_from_slice(&PCAP_MAGIC_NANOS.to_le_bytes());
        header[4..6].copy_from_slice(&2u16.to_le_bytes()); // version major
        header[6..8].copy_from_slice(&4u16.to_le_bytes()); // version minor
                                                           // thiszone (i32) and sigfigs (u32) stay 0.
        header[16..20].copy_from_slice(&snaplen.to_le_bytes());
        header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&header)?;
        Ok(PcapWriter {
            out,
            snaplen,
            frames: 0,
        })
    }

    /// Appends one frame stamped with the wall-clock time `timestamp`.
    pub fn write_frame(&mut self, timestamp: SystemTime, frame: &[u8]) -> Result<(), PcapError> {
        let since_epoch = timestamp.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.write_frame_at(since_epoch, frame)
    }

    /// Appends one frame stamped `since_epoch` after 1970-01-01 UTC. Seconds past
    /// the format's 32-bit field (year 2106) wrap.
    pub fn write_frame_at(&mut self, since_epoch: Duration, frame: &[u8]) -> Result<(), PcapError> {
        let orig_len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let incl_len = orig_len.min(self.snaplen);
        let mut record = [0u8; RECORD_HEADER_LEN];
        let secs = u32::try_from(since_epoch.as_secs() & u64::from(u32::MAX)).expect("masked");
        record[0..4].copy_from_slice(&secs.to_le_bytes());
        record[4..8].copy_from_slice(&since_epoch.subsec_nanos().to_le_bytes());
        record[8..12].copy_from_slice(&incl_len.to_le_bytes());
        record[12..16].copy_from_slice(&orig_len.to_le_bytes());
        self.out.write_all(&record)?;
        self.out.write_all(&frame[..incl_len as usize])?;
        self.frames += 1;
        Ok(())
    }

    /// Number of frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Pushes buffered bytes to the underlying writer.
    pub fn flush(&mut self) -> Result<(), PcapError> {
        self.out.flush()?;
        Ok(())
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> Result<W, PcapError> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One record read back.
    struct Record {
        secs: u32,
        nanos: u32,
        orig_len: u32,
        data: Vec<u8>,
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// A minimal reader for what the writer produces: checks the global header and
    /// splits the records.
    fn parse(bytes: &[u8]) -> (u32, Vec<Record>) {
        assert!(
            bytes.len() >= GLOBAL_HEADER_LEN,
            "file shorter than its header"
        );
        assert_eq!(u32_at(bytes, 0), PCAP_MAGIC_NANOS);
        assert_eq!(&bytes[4..8], &[2, 0, 4, 0], "version 2.4");
        assert_eq!(u32_at(bytes, 8), 0, "thiszone");
        assert_eq!(u32_at(bytes, 12), 0, "sigfigs");
        let snaplen = u32_at(bytes, 16);
        assert_eq!(u32_at(bytes, 20), LINKTYPE_ETHERNET);
        let mut records = Vec::new();
        let mut at = GLOBAL_HEADER_LEN;
        while at < bytes.len() {
            assert!(
                at + RECORD_HEADER_LEN <= bytes.len(),
                "truncated record header"
            );
            let incl_len = u32_at(bytes, at + 8);
            let orig_len = u32_at(bytes, at + 12);
            assert!(incl_len <= snaplen && incl_len <= orig_len);
            let incl = incl_len as usize;
            let start = at + RECORD_HEADER_LEN;
            assert!(start + incl <= bytes.len(), "truncated record data");
            records.push(Record {
                secs: u32_at(bytes, at),
                nanos: u32_at(bytes, at + 4),
                orig_len,
                data: bytes[start..start + incl].to_vec(),
            });
            at = start + incl;
        }
        (snaplen, records)
    }

    #[test]
    fn pcap_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frames.pcap");
        let frames: Vec<Vec<u8>> = (0..5u8)
            .map(|i| {
                (0..60 + usize::from(i) * 300)
                    .map(|b| b.to_le_bytes()[0] ^ i)
                    .collect()
            })
            .collect();
        let mut w = PcapWriter::create(&path).unwrap();
        for (i, f) in frames.iter().enumerate() {
            let ts = Duration::new(1_700_000_000 + i as u64, 123_456_789);
            w.write_frame_at(ts, f).unwrap();
        }
        assert_eq!(w.frames(), 5);
        w.into_inner().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let (snaplen, records) = parse(&bytes);
        assert_eq!(snaplen, DEFAULT_SNAPLEN);
        assert_eq!(records.len(), frames.len());
        for (i, (r, f)) in records.iter().zip(&frames).enumerate() {
            assert_eq!(r.secs, 1_700_000_000 + u32::try_from(i).unwrap());
            assert_eq!(r.nanos, 123_456_789);
            assert_eq!(r.orig_len as usize, f.len());
            assert_eq!(&r.data, f);
        }
    }

    #[test]
    fn pcap_snaplen_truncates_but_keeps_length() {
        let mut w = PcapWriter::with_snaplen(Vec::new(), 64).unwrap();
        let frame = vec![0xabu8; 1514];
        w.write_frame(SystemTime::now(), &frame).unwrap();
        w.write_frame(UNIX_EPOCH, &frame[..20]).unwrap();
        let bytes = w.into_inner().unwrap();
        let (snaplen, records) = parse(&bytes);
        assert_eq!(snaplen, 64);
        assert_eq!(records[0].orig_len, 1514);
        assert_eq!(records[0].data.len(), 64);
        assert_eq!(records[1].orig_len, 20);
        assert_eq!(records[1].data.len(), 20);
        assert_eq!((records[1].secs, records[1].nanos), (0, 0));
    }

    #[test]
    fn pcap_rejects_zero_snaplen_and_names_bad_path() {
        assert!(matches!(
            PcapWriter::with_snaplen(Vec::new(), 0),
            Err(PcapError::ZeroSnaplen)
        ));
        let err = PcapWriter::create(Path::new("/nonexistent-dir/x.pcap")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x.pcap"), "{err}");
    }
}
