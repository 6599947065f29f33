//! What can go wrong writing or reading a log.

use std::io;
use std::path::PathBuf;

use crate::{SCHEMA, SCHEMA_V1};

/// Errors of writing or reading a DMA log.
#[derive(Debug, thiserror::Error)]
pub enum DmaLogError {
    /// The log file could not be created.
    #[error("cannot create DMA log {path}: {source} (check the directory exists and is writable)")]
    Create {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log file could not be opened for reading.
    #[error("cannot open DMA log {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing or reading the underlying stream failed.
    #[error("DMA log I/O error: {0}")]
    Io(#[from] io::Error),
    /// A line is not a valid record of this schema.
    #[error("DMA log line {line}: not a valid record of its schema: {source}")]
    Parse {
        /// 1-based line number.
        line: u64,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The log stops inside a line (or inside a zstd frame): the writer never
    /// finished it. Every line before `line` is complete.
    #[error("DMA log is cut short at line {line} (byte {offset} of its text): the records before it are complete, the rest is missing")]
    Truncated {
        /// 1-based number of the incomplete line.
        line: u64,
        /// Byte offset (in the log's text, after decompression) where that line starts.
        offset: u64,
    },
    /// The first line is not a header record.
    #[error("DMA log has no header line (expected {{\"type\":\"header\",\"schema\":\"{SCHEMA}\",...}} first); is this a DMA log?")]
    MissingHeader,
    /// The header names another schema version.
    #[error("DMA log schema is {found:?}, this reader understands {SCHEMA:?} and {SCHEMA_V1:?}")]
    Schema {
        /// The schema string found.
        found: String,
    },
}
