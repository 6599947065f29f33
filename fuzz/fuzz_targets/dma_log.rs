//! Fuzzes the DMA log reader: plain JSON lines, or zstd-compressed ones (an input
//! starting with the zstd magic number), through the public `DmaLogReader::detect`
//! that `read_log` and the audit use, so every format the reader detects is covered.
//!
//! Checked, besides "no panic" and bounded time: the iteration ends, and after the
//! first error other than a record that does not parse (a cut-off or unreadable log)
//! nothing more is returned.

#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use zc_dma_log::{DmaLogError, DmaLogReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = DmaLogReader::detect(Cursor::new(data.to_vec())) else {
        return;
    };
    let _ = reader.header();
    let mut ended = false;
    while let Some(item) = reader.next() {
        assert!(!ended, "records after the end of the log");
        match item {
            Ok(record) => {
                let _ = serde_json::to_string(&record);
                let _ = reader.last_line();
            }
            Err(DmaLogError::Parse { .. }) => {}
            Err(_) => ended = true,
        }
    }
});
