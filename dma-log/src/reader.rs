//! Reading a log back as typed records.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::{DmaLogError, HeaderRecord, Record, SCHEMA};

/// Reads a DMA log back as typed records. The header line is checked on creation and
/// is not yielded by the iterator.
pub struct DmaLogReader<R> {
    input: R,
    line_no: u64,
    header: HeaderRecord,
    buf: String,
}

impl DmaLogReader<BufReader<File>> {
    /// Opens the log file at `path`.
    pub fn open(path: &Path) -> Result<Self, DmaLogError> {
        let file = File::open(path).map_err(|source| DmaLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(BufReader::new(file))
    }
}

impl<R: BufRead> DmaLogReader<R> {
    /// Reads and checks the header line of `input`.
    pub fn new(mut input: R) -> Result<Self, DmaLogError> {
        let mut buf = String::new();
        if input.read_line(&mut buf)? == 0 {
            return Err(DmaLogError::MissingHeader);
        }
        let value: serde_json::Value = serde_json::from_str(buf.trim_end())
            .map_err(|source| DmaLogError::Parse { line: 1, source })?;
        if value.get("type").and_then(|t| t.as_str()) != Some("header") {
            return Err(DmaLogError::MissingHeader);
        }
        let found = value
            .get("schema")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        if found != SCHEMA {
            return Err(DmaLogError::Schema {
                found: found.to_string(),
            });
        }
        let header = match serde_json::from_value(value) {
            Ok(Record::Header(h)) => h,
            Ok(_) => return Err(DmaLogError::MissingHeader),
            Err(source) => return Err(DmaLogError::Parse { line: 1, source }),
        };
        Ok(DmaLogReader {
            input,
            line_no: 1,
            header,
            buf,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &HeaderRecord {
        &self.header
    }
}

impl<R: BufRead> Iterator for DmaLogReader<R> {
    type Item = Result<Record, DmaLogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
            self.line_no += 1;
            let line = self.buf.trim_end();
            if line.is_empty() {
                continue;
            }
            return Some(
                serde_json::from_str(line).map_err(|source| DmaLogError::Parse {
                    line: self.line_no,
                    source,
                }),
            );
        }
    }
}

/// Reads every record of the log file at `path` (header excluded).
pub fn read_log(path: &Path) -> Result<Vec<Record>, DmaLogError> {
    DmaLogReader::open(path)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_rejects_other_schema_and_garbage() {
        let other = b"{\"type\":\"header\",\"schema\":\"zc-dma-log/2\",\"start_unix_ns\":0}\n";
        assert!(matches!(
            DmaLogReader::new(&other[..]),
            Err(DmaLogError::Schema { .. })
        ));
        assert!(matches!(
            DmaLogReader::new(&b""[..]),
            Err(DmaLogError::MissingHeader)
        ));
        let bad =
            b"{\"type\":\"header\",\"schema\":\"zc-dma-log/1\",\"start_unix_ns\":0}\nnot json\n";
        let mut r = DmaLogReader::new(&bad[..]).unwrap();
        assert!(matches!(
            r.next(),
            Some(Err(DmaLogError::Parse { line: 2, .. }))
        ));
    }
}
