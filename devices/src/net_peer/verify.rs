//! What the peer is told to expect on a connection, the check of the byte stream as
//! it arrives, and the result it records.
//!
//! Per received byte the checker does: one XXH3-128 update (a summary hash, about
//! 0.1 ns/byte with AVX2), and, when a source file is given, one `memcmp` against
//! bytes read from that file in 1 MiB chunks (a page-cache copy plus the compare).
//! Nothing else touches each byte; the offset of a difference is only searched for
//! inside the one chunk that failed the `memcmp`.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use xxhash_rust::xxh3::Xxh3;

/// Size of the buffer the source file is read through.
const SOURCE_CHUNK: usize = 1 << 20;

/// What one connection is expected to carry, consumed in order: the first accepted
/// connection takes the first queued expectation, and so on.
///
/// The byte-for-byte check is the comparison with `source`. `xxh3_128` is a summary
/// for when no file is at hand (or to cross-check a logged run): XXH3-128 rather than
/// SHA-256 because it runs at memory speed (>10 GB/s) where SHA-256 tops out near
/// 2 GB/s even with SHA-NI, the guest is not an adversary, and 128 bits make an
/// accidental collision irrelevant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// A name carried into the result, e.g. the transfer method.
    pub label: String,
    /// Exact number of bytes the connection must carry.
    pub size: u64,
    /// File whose first `size` bytes the stream must equal, compared byte for byte.
    pub source: Option<PathBuf>,
    /// XXH3-128 (seed 0) of the expected stream, if known.
    pub xxh3_128: Option<u128>,
}

impl Expectation {
    /// Expects exactly `size` bytes, unchecked in content unless a hash or source is
    /// added.
    pub fn sized(label: impl Into<String>, size: u64) -> Self {
        Expectation {
            label: label.into(),
            size,
            source: None,
            xxh3_128: None,
        }
    }

    /// Expects the whole content of the file at `path` (its current length), every
    /// byte compared.
    pub fn of_file(label: impl Into<String>, path: &Path) -> io::Result<Self> {
        let size = std::fs::metadata(path)?.len();
        Ok(Expectation {
            label: label.into(),
            size,
            source: Some(path.to_owned()),
            xxh3_128: None,
        })
    }

    /// Adds the expected XXH3-128 of the stream.
    pub fn with_xxh3_128(mut self, hash: u128) -> Self {
        self.xxh3_128 = Some(hash);
        self
    }
}

/// XXH3-128 (seed 0) of `data`: what [`Expectation::xxh3_128`] holds.
pub fn xxh3_128(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// XXH3-128 (seed 0) of everything `reader` yields.
pub fn xxh3_128_of_reader(mut reader: impl Read) -> io::Result<u128> {
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; SOURCE_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(hasher.digest128()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Why a connection's stream did not match its expectation. When several apply, the
/// first listed here wins.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// A connection arrived with no expectation queued for it.
    #[error("connection arrived with no expectation queued (the VMM must queue one per transfer)")]
    NoExpectation,
    /// The source file could not be read, or is shorter than the expected size.
    #[error("cannot compare against source {path}: {reason}")]
    Source {
        /// The source file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The stream differs from the source file; `offset` is the first differing byte.
    #[error("stream differs from the source at byte offset {offset}")]
    Mismatch {
        /// Offset of the first differing byte.
        offset: u64,
    },
    /// The connection ended before `expected` bytes; the first missing byte is at
    /// offset `received`.
    #[error(
        "stream short: {received} of {expected} bytes (first missing byte at offset {received})"
    )]
    Short {
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// More than `expected` bytes arrived; the first extra byte is at offset `expected`.
    #[error("stream long: {received} bytes where {expected} were expected")]
    Long {
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The stream's XXH3-128 differs from the expected one.
    #[error("stream hash {actual:032x} differs from the expected {expected:032x}")]
    HashMismatch {
        /// Expected XXH3-128.
        expected: u128,
        /// XXH3-128 of what arrived.
        actual: u128,
    },
}

impl Failure {
    /// Offset of the first byte known to be wrong or missing, where there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Failure::Mismatch { offset } => Some(*offset),
            Failure::Short { received, .. } => Some(*received),
            Failure::Long { expected, .. } => Some(*expected),
            _ => None,
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The guest closed its sending side (FIN) after its data.
    Fin,
    /// The connection was reset or timed out before a FIN.
    Reset,
    /// The VMM ended it with [`super::NetPeer::finish`] while still open.
    Finished,
}

/// The record of one connection, kept by the peer until the VMM takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Ordinal of the connection since the peer was created, from 0.
    pub connection: u64,
    /// The guest's address and port.
    pub remote: Option<SocketAddrV4>,
    /// What was expected (`None`: nothing was queued).
    pub expected: Option<Expectation>,
    /// Bytes received.
    pub bytes: u64,
    /// XXH3-128 (seed 0) of the bytes received.
    pub xxh3_128: u128,
    /// Whether the hash equals the expected one (`None`: no hash was expected).
    pub hash_ok: Option<bool>,
    /// Whether the stream was compared with a source file and every byte matched
    /// (`None`: no source was given).
    pub content_ok: Option<bool>,
    /// The first problem found, `None` when the stream is exactly as expected.
    pub failure: Option<Failure>,
    /// How the connection ended.
    pub end: End,
    /// Whether the 8-byte count was sent back (see [`super`]'s ACK protocol).
    pub ack_sent: bool,
    /// When the connection was accepted, since the peer was created.
    pub accepted_at: Duration,
    /// First payload byte, after `accepted_at`.
    pub first_byte_at: Option<Duration>,
    /// Last payload byte, after `accepted_at`.
    pub last_byte_at: Option<Duration>,
    /// First to last payload byte: the transfer time.
    pub elapsed: Duration,
}

impl Received {
    /// `true` when every expected byte arrived, nothing more, and every check passed.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// Bytes per second from first to last byte, when that time is measurable.
    pub fn throughput(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (secs > 0.0).then(|| self.bytes as f64 / secs)
    }
}

/// Reads the source file in chunks and compares it with the stream.
#[derive(Debug)]
struct SourceCompare {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Checks one connection's stream incrementally.
pub(super) struct StreamVerifier {
    expected: Option<Expectation>,
    hasher: Xxh3,
    bytes: u64,
    source: Option<SourceCompare>,
    mismatch: Option<u64>,
    source_error: Option<String>,
}

impl StreamVerifier {
    /// Starts checking against `expected`, opening its source file if any.
    pub(super) fn new(expected: Option<Expectation>) -> Self {
        let mut source_error = None;
        let source = expected
            .as_ref()
            .and_then(|e| e.source.as_ref())
            .and_then(|path| match File::open(path) {
                Ok(file) => Some(SourceCompare {
                    path: path.clone(),
                    file,
                    buf: vec![0; SOURCE_CHUNK],
                    start: 0,
                    end: 0,
                }),
                Err(e) => {
                    source_error = Some(format!("cannot open: {e}"));
                    None
                }
            });
        StreamVerifier {
            expected,
            hasher: Xxh3::new(),
            bytes: 0,
            source,
            mismatch: None,
            source_error,
        }
    }

    /// Bytes seen so far.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Expected size, if an expectation was given.
    pub(super) fn expected_size(&self) -> Option<u64> {
        self.expected.as_ref().map(|e| e.size)
    }

    /// Takes the next piece of the stream.
    pub(super) fn feed(&mut self, data: &[u8]) {
        self.hasher.update(data);
        if self.mismatch.is_none() && self.source_error.is_none() {
            self.compare(data);
        }
        self.bytes += data.len() as u64;
    }

    fn compare(&mut self, mut data: &[u8]) {
        let size = self.expected_size();
        let (Some(src), Some(size)) = (self.source.as_mut(), size) else {
            return;
        };
        // Bytes past the expected size are not compared: they make the stream long.
        let room = size.saturating_sub(self.bytes);
        if let Ok(room) = usize::try_from(room) {
            data = &data[..data.len().min(room)];
        }
        let mut offset = self.bytes;
        while !data.is_empty() {
            if src.start == src.end {
                match read_retrying(&mut src.file, &mut src.buf) {
                    Ok(0) => {
                        self.source_error = Some(format!(
                            "file ends at byte {offset}, before the expected {size} bytes"
                        ));
                        return;
                    }
                    Ok(n) => (src.start, src.end) = (0, n),
                    Err(e) => {
                        self.source_error = Some(format!("read failed at byte {offset}: {e}"));
                        return;
                    }
                }
            }
            let n = data.len().min(src.end - src.start);
            let want = &src.buf[src.start..src.start + n];
            if want != &data[..n] {
                let at = want.iter().zip(data).position(|(a, b)| a != b).unwrap_or(0);
                self.mismatch = Some(offset + at as u64);
                return;
            }
            src.start += n;
            offset += n as u64;
            data = &data[n..];
        }
    }

    /// Ends the check and builds the failure, if any, and the summary fields.
    pub(super) fn finish(self) -> Verdict {
        let actual = self.hasher.digest128();
        let hash_ok = self
            .expected
            .as_ref()
            .and_then(|e| e.xxh3_128)
            .map(|h| h == actual);
        let source_path = self.source.as_ref().map(|s| s.path.clone()).or_else(|| {
            self.expected
                .as_ref()
                .and_then(|e| e.source.as_ref())
                .cloned()
        });
        let failure = match &self.expected {
            None => Some(Failure::NoExpectation),
            Some(exp) => {
                if let (Some(reason), Some(path)) = (&self.source_error, &source_path) {
                    Some(Failure::Source {
                        path: path.clone(),
                        reason: reason.clone(),
                    })
                } else if let Some(offset) = self.mismatch {
                    Some(Failure::Mismatch { offset })
                } else if self.bytes < exp.size {
                    Some(Failure::Short {
                        expected: exp.size,
                        received: self.bytes,
                    })
                } else if self.bytes > exp.size {
                    Some(Failure::Long {
                        expected: exp.size,
                        received: self.bytes,
                    })
                } else {
                    match exp.xxh3_128 {
                        Some(expected) if expected != actual => {
                            Some(Failure::HashMismatch { expected, actual })
                        }
                        _ => None,
                    }
                }
            }
        };
        let content_ok = source_path.map(|_| {
            self.source_error.is_none()
                && self.mismatch.is_none()
                && Some(self.bytes) == self.expected_size()
        });
        Verdict {
            expected: self.expected,
            bytes: self.bytes,
            xxh3_128: actual,
            hash_ok,
            content_ok,
            failure,
        }
    }
}

/// The outcome of [`StreamVerifier::finish`].
pub(super) struct Verdict {
    pub(super) expected: Option<Expectation>,
    pub(super) bytes: u64,
    pub(super) xxh3_128: u128,
    pub(super) hash_ok: Option<bool>,
    pub(super) content_ok: Option<bool>,
    pub(super) failure: Option<Failure>,
}

/// Reads into `buf`, retrying reads a signal interrupted.
pub(super) fn read_retrying(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match file.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
