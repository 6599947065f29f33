//! Reading a log back as typed records, one line at a time: memory stays that of the
//! longest line whatever the log's size. Plain and zstd-compressed logs are told
//! apart by their first bytes (the zstd magic number), not by the file name.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use std::collections::VecDeque;

use crate::{compact, DmaLogError, HeaderRecord, Record, SCHEMA, SCHEMA_V1};

/// The first four bytes of every zstd frame (RFC 8878, 3.1.1), as they appear in a file.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Whether `path` names a compressed log: the writer compresses exactly these.
pub fn is_zstd_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "zst")
}

/// Reads a DMA log back as typed records. The header line is checked on creation and
/// is not yielded by the iterator.
///
/// A log whose last line has no `\n`, or whose zstd stream stops inside a frame, was
/// cut short (the VMM was killed, the disk filled up): the iterator yields every
/// complete record, then one [`DmaLogError::Truncated`] saying where the cut is, then
/// ends.
pub struct DmaLogReader<R> {
    input: R,
    /// Lines read so far, the header included (the 1-based number of the last one).
    line_no: u64,
    /// Bytes of log text read so far (after decompression): where the next line starts.
    offset: u64,
    header: HeaderRecord,
    /// Whether the log is of schema `/2` (else `/1`).
    v2: bool,
    buf: Vec<u8>,
    /// Records of the last line not yielded yet (a `/2` chain line holds several).
    pending: VecDeque<Record>,
    ended: bool,
}

/// What [`DmaLogReader::open`] and [`DmaLogReader::detect`] read from.
pub type AnyInput = Box<dyn BufRead + Send>;

impl DmaLogReader<AnyInput> {
    /// Opens the log file at `path`, plain or zstd-compressed.
    pub fn open(path: &Path) -> Result<Self, DmaLogError> {
        let file = File::open(path).map_err(|source| DmaLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::detect(file)
    }

    /// Reads a log from `input`, decompressing it if it starts with the zstd magic
    /// number.
    pub fn detect<R: Read + Send + 'static>(input: R) -> Result<Self, DmaLogError> {
        let mut input = BufReader::with_capacity(1 << 16, input);
        let compressed = input.fill_buf()?.starts_with(&ZSTD_MAGIC);
        let input: AnyInput = if compressed {
            Box::new(BufReader::with_capacity(
                1 << 16,
                zstd::stream::read::Decoder::with_buffer(input)?,
            ))
        } else {
            Box::new(input)
        };
        Self::new(input)
    }
}

/// How reading one line ended.
enum LineEnd {
    /// A whole line, `\n` included.
    Complete,
    /// End of the log.
    Eof,
    /// The log stops inside this line.
    Cut,
}

impl<R: BufRead> DmaLogReader<R> {
    /// Reads and checks the header line of `input` (plain text; see
    /// [`DmaLogReader::detect`] for compressed logs).
    pub fn new(input: R) -> Result<Self, DmaLogError> {
        let mut reader = DmaLogReader {
            input,
            line_no: 0,
            offset: 0,
            header: HeaderRecord {
                schema: String::new(),
                start_unix_ns: 0,
            },
            v2: false,
            buf: Vec::new(),
            pending: VecDeque::new(),
            ended: false,
        };
        match reader.read_line()? {
            LineEnd::Complete => {}
            LineEnd::Eof => return Err(DmaLogError::MissingHeader),
            LineEnd::Cut => return Err(DmaLogError::Truncated { line: 1, offset: 0 }),
        }
        let value: serde_json::Value = serde_json::from_slice(trim(&reader.buf))
            .map_err(|source| DmaLogError::Parse { line: 1, source })?;
        if value.get("type").and_then(|t| t.as_str()) != Some("header") {
            return Err(DmaLogError::MissingHeader);
        }
        let found = value
            .get("schema")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        reader.v2 = match found {
            SCHEMA => true,
            SCHEMA_V1 => false,
            _ => {
                return Err(DmaLogError::Schema {
                    found: found.to_string(),
                })
            }
        };
        reader.header = match serde_json::from_value(value) {
            Ok(Record::Header(h)) => h,
            Ok(_) => return Err(DmaLogError::MissingHeader),
            Err(source) => return Err(DmaLogError::Parse { line: 1, source }),
        };
        Ok(reader)
    }

    /// The log's header.
    pub fn header(&self) -> &HeaderRecord {
        &self.header
    }

    /// The JSON text of the line holding the record the iterator returned last (no
    /// line end). In a `zc-dma-log/2` log one line can hold several records: they
    /// give the same line (and [`DmaLogReader::line_number`]).
    pub fn last_line(&self) -> &[u8] {
        trim(&self.buf)
    }

    /// The 1-based line number of the record the iterator returned last.
    ///
    /// Since `zc-dma-log/2` several records can share a line.
    pub fn line_number(&self) -> u64 {
        self.line_no
    }

    /// Reads the next line into `buf`, counting it.
    fn read_line(&mut self) -> Result<LineEnd, DmaLogError> {
        self.buf.clear();
        let start = self.offset;
        match self.input.read_until(b'\n', &mut self.buf) {
            Ok(0) => Ok(LineEnd::Eof),
            Ok(n) => {
                self.line_no += 1;
                self.offset += n as u64;
                if self.buf.ends_with(b"\n") {
                    Ok(LineEnd::Complete)
                } else {
                    Ok(LineEnd::Cut)
                }
            }
            // The zstd decoder's answer to a stream that stops inside a frame.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.line_no += 1;
                self.offset = start;
                Ok(LineEnd::Cut)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn trim(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line)
}

impl<R: BufRead> Iterator for DmaLogReader<R> {
    type Item = Result<Record, DmaLogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.pending.pop_front() {
            return Some(Ok(r));
        }
        if self.ended {
            return None;
        }
        loop {
            let start = self.offset;
            match self.read_line() {
                Ok(LineEnd::Complete) => {}
                Ok(LineEnd::Eof) => {
                    self.ended = true;
                    return None;
                }
                Ok(LineEnd::Cut) => {
                    self.ended = true;
                    return Some(Err(DmaLogError::Truncated {
                        line: self.line_no,
                        offset: start,
                    }));
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
            let line = trim(&self.buf);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = if self.v2 {
                compact::decode_line(line, &mut self.pending).map(|()| self.pending.pop_front())
            } else {
                serde_json::from_slice(line).map(Some)
            };
            match parsed {
                Ok(Some(r)) => return Some(Ok(r)),
                Ok(None) => continue,
                Err(source) => {
                    self.pending.clear();
                    return Some(Err(DmaLogError::Parse {
                        line: self.line_no,
                        source,
                    }));
                }
            }
        }
    }
}

/// Reads every record of the log file at `path` (header excluded), plain or
/// compressed. Fails on a log that was cut short; iterate a [`DmaLogReader`] to get
/// such a log's complete records.
pub fn read_log(path: &Path) -> Result<Vec<Record>, DmaLogError> {
    DmaLogReader::open(path)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    const HEADER: &[u8] =
        b"{\"type\":\"header\",\"schema\":\"zc-dma-log/1\",\"start_unix_ns\":0}\n";

    fn marker(seq: u64) -> Vec<u8> {
        format!("{{\"type\":\"marker\",\"seq\":{seq},\"t_ns\":{seq},\"label\":\"m{seq}\"}}\n")
            .into_bytes()
    }

    fn log_of(markers: u64) -> Vec<u8> {
        let mut log = HEADER.to_vec();
        for seq in 0..markers {
            log.extend(marker(seq));
        }
        log
    }

    fn zstd_of(text: &[u8]) -> Vec<u8> {
        zstd::encode_all(text, 1).unwrap()
    }

    #[test]
    fn reader_rejects_other_schema_and_garbage() {
        let other = b"{\"type\":\"header\",\"schema\":\"zc-dma-log/3\",\"start_unix_ns\":0}\n";
        assert!(matches!(
            DmaLogReader::new(&other[..]),
            Err(DmaLogError::Schema { .. })
        ));
        assert!(matches!(
            DmaLogReader::new(&b""[..]),
            Err(DmaLogError::MissingHeader)
        ));
        let mut bad = HEADER.to_vec();
        bad.extend(b"not json\n");
        let mut r = DmaLogReader::new(&bad[..]).unwrap();
        assert!(matches!(
            r.next(),
            Some(Err(DmaLogError::Parse { line: 2, .. }))
        ));
    }

    #[test]
    fn a_cut_log_gives_its_complete_records_then_where_it_was_cut() {
        let whole = log_of(3);
        // Cut inside the third record's line.
        let cut_at = whole.len() - 5;
        let third_starts = whole.len() - marker(2).len();
        let r = DmaLogReader::new(&whole[..cut_at]).unwrap();
        let items: Vec<_> = r.collect();
        assert_eq!(items.len(), 3, "two records and the cut");
        assert!(matches!(&items[1], Ok(Record::Marker(m)) if m.label == "m1"));
        match &items[2] {
            Err(DmaLogError::Truncated { line, offset }) => {
                assert_eq!(*line, 4, "header, two records, then the cut line");
                assert_eq!(*offset, third_starts as u64);
            }
            other => panic!("expected the cut, got {other:?}"),
        }
        // A header cut short is no log.
        assert!(matches!(
            DmaLogReader::new(&HEADER[..10]),
            Err(DmaLogError::Truncated { line: 1, offset: 0 })
        ));
        // read_log's all-or-nothing answer names the cut.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.jsonl");
        std::fs::write(&path, &whole[..cut_at]).unwrap();
        let err = read_log(&path).unwrap_err();
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn compressed_logs_are_found_by_magic_number_and_read_back() {
        let text = log_of(1000);
        let packed = zstd_of(&text);
        assert_eq!(packed[..4], ZSTD_MAGIC);
        assert!(packed.len() < text.len() / 4, "{} bytes", packed.len());
        let dir = tempfile::tempdir().unwrap();
        // The name says nothing: the bytes do.
        let path = dir.path().join("log.jsonl");
        std::fs::write(&path, &packed).unwrap();
        let records = read_log(&path).unwrap();
        assert_eq!(records.len(), 1000);
        assert_eq!(records[999].seq(), Some(999));
        // And a plain log named .zst is read as plain.
        let plain = dir.path().join("plain.jsonl.zst");
        std::fs::write(&plain, &text).unwrap();
        assert_eq!(read_log(&plain).unwrap().len(), 1000);
    }

    #[test]
    fn a_cut_compressed_log_gives_its_records_then_the_cut() {
        let text = log_of(20_000);
        // Several frames' worth of flushed blocks, as the writer makes them: each
        // `flush` ends a block, so what came before a cut can be decoded.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        for chunk in text.chunks(64 << 10) {
            enc.write_all(chunk).unwrap();
            enc.flush().unwrap();
        }
        let packed = enc.finish().unwrap();
        let cut = &packed[..packed.len() * 2 / 3];
        let items: Vec<_> = DmaLogReader::detect(io::Cursor::new(cut.to_vec()))
            .unwrap()
            .collect();
        let (records, errors): (Vec<_>, Vec<_>) = items.into_iter().partition(Result::is_ok);
        assert!(records.len() > 5_000, "{} records", records.len());
        assert_eq!(errors.len(), 1);
        match &errors[0] {
            Err(DmaLogError::Truncated { line, .. }) => {
                assert_eq!(*line, records.len() as u64 + 2)
            }
            other => panic!("expected the cut, got {other:?}"),
        }
    }

    #[test]
    fn iterating_a_large_log_keeps_one_line_in_memory() {
        // A 40 MB log made on the fly: the reader's buffer never grows past one line.
        struct Generated {
            next: u64,
            line: Vec<u8>,
            at: usize,
        }
        impl Read for Generated {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.at == self.line.len() {
                    if self.next == 600_000 {
                        return Ok(0);
                    }
                    self.line = if self.next == 0 {
                        HEADER.to_vec()
                    } else {
                        marker(self.next)
                    };
                    self.next += 1;
                    self.at = 0;
                }
                let n = out.len().min(self.line.len() - self.at);
                out[..n].copy_from_slice(&self.line[self.at..self.at + n]);
                self.at += n;
                Ok(n)
            }
        }
        let mut r = DmaLogReader::detect(Generated {
            next: 0,
            line: Vec::new(),
            at: 0,
        })
        .unwrap();
        let mut count = 0u64;
        let mut largest = 0;
        while let Some(rec) = r.next() {
            rec.unwrap();
            count += 1;
            largest = largest.max(r.buf.capacity());
        }
        assert_eq!(count, 599_999);
        assert!(r.offset > 35_000_000, "{} bytes read", r.offset);
        assert!(largest < 256, "line buffer grew to {largest} bytes");
    }
}
