//! The DMA descriptor log of zc: what the device models and the VMM record while a
//! guest runs, and what the audit reads back to prove which bytes moved by DMA and
//! which the guest CPU copied. A log is JSON Lines in the versioned schema
//! [`SCHEMA`] (`zc-dma-log/2`), documented field by field in `docs/dma-log.md`: one
//! [`Record`] per descriptor a device read or wrote ([`DescRecord`]), per request
//! (descriptor chain, [`RequestRecord`]), per guest marker, device error and
//! dirty-page sample. A chain's records share one compact line where that loses
//! nothing; readers give the same records for a log of the first schema,
//! [`SCHEMA_V1`], and [`RecordWriter`] converts one.
//!
//! - Writing: a [`DmaLog`] is a cheap handle (clone it into every device); it can be
//!   [disabled](DmaLog::disabled), in which case every call is a single branch and the
//!   devices skip computing fingerprints (see [`DmaLog::is_enabled`]). Calls only
//!   number, time-stamp and queue a record, with a copy of the bytes it describes
//!   when the device cannot hand over its own; a writer thread computes the
//!   fingerprints, formats the lines and writes them. So the device and vCPU
//!   threads, which the guest waits for, pay a short lock and a memory copy per
//!   record, and [`DmaLog::flush`] is what waits for the file to be complete.
//! - Reading: [`DmaLogReader`] and [`read_log`] check the header and parse the
//!   records.
//! - [`frame`]: the one-line summary each net request carries of its frame
//!   ([`frame::summarize`]).
//!
//! Fingerprints are 64-bit XXH3 hashes ([`fingerprint`]) of the bytes of each 4 KiB
//! guest-page piece of a buffer ([`page_pieces`]). XXH3 was chosen over FNV-1a
//! because it hashes a 4 KiB page at memory-bandwidth speed (FNV-1a works a byte at a
//! time, roughly 1 GB/s), which matters when the log must cost under 10% of a
//! multi-GB/s transfer, and because it is a stable, specified algorithm that the
//! audit side (or Python's `xxhash` package) can recompute.
//!
//! Feature `guest-memory` (on by default) adds `DmaLog::descriptor_from_guest` and
//! `pieces_from_guest`, which read a `vm_memory::GuestMemory`; a reader of logs turns
//! it off and builds no vm-memory.

mod compact;
mod error;
pub mod frame;
#[cfg(feature = "guest-memory")]
mod guest;
mod handle;
mod json;
mod page_table;
mod reader;
mod record;
#[cfg(test)]
mod test_util;
mod writer;
mod zst;

pub use compact::RecordWriter;
pub use error::DmaLogError;
#[cfg(feature = "guest-memory")]
pub use guest::pieces_from_guest;
pub use handle::{DescInfo, DetailFn, DmaLog, FramePatch, StableFile};
pub use reader::{is_zstd_path, read_log, AnyInput, DmaLogReader, ZSTD_MAGIC};
pub use record::{
    BlkRequest, BlkStatus, DescRecord, DescRole, DeviceErrorRecord, DeviceKind, Direction,
    DirtyRecord, Fingerprint, HeaderRecord, MarkerRecord, NetRequest, PayloadRun, Piece, Record,
    RequestDetail, RequestRecord,
};

/// Schema identifier the writer puts in the header line. Readers accept it and
/// [`SCHEMA_V1`], and refuse any other value.
pub const SCHEMA: &str = "zc-dma-log/2";

/// The first schema: one JSON object per record, every field named. Still read.
pub const SCHEMA_V1: &str = "zc-dma-log/1";

/// Size of a guest page as the log splits buffers (pieces never cross a multiple of it).
pub const PAGE_SIZE: u64 = PAGE_BYTES as u64;

/// [`PAGE_SIZE`] as a buffer length.
pub const PAGE_BYTES: usize = 4096;

/// The 64-bit fingerprint of `bytes` used throughout the log (XXH3-64, seed 0).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Splits the guest-physical range `[gpa, gpa + len)` at 4 KiB page boundaries,
/// yielding `(gpa, len)` of each piece. An empty range yields nothing. The range must
/// not overflow (callers validate descriptors before logging them); an overflowing
/// range is cut at `u64::MAX`.
pub fn page_pieces(gpa: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let end = gpa.saturating_add(len);
    let mut cur = gpa;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let page_end = (cur / PAGE_SIZE)
            .saturating_add(1)
            .saturating_mul(PAGE_SIZE);
        let piece_end = page_end.min(end);
        let piece_len = u32::try_from(piece_end - cur).expect("a piece is at most one page");
        let piece = (cur, piece_len);
        cur = piece_end;
        Some(piece)
    })
}

/// Per-page fingerprints of `bytes`, the contents of guest memory at `gpa`.
pub(crate) fn pieces_of(gpa: u64, bytes: &[u8]) -> Vec<Piece> {
    let mut at = 0usize;
    page_pieces(gpa, bytes.len() as u64)
        .map(|(p, len)| {
            let piece = &bytes[at..at + len as usize];
            at += len as usize;
            Piece {
                gpa: p,
                len,
                hash: Fingerprint(fingerprint(piece)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_page_boundaries() {
        let p: Vec<_> = page_pieces(0x1ff0, 0x2020).collect();
        assert_eq!(
            p,
            vec![
                (0x1ff0, 0x10),
                (0x2000, 0x1000),
                (0x3000, 0x1000),
                (0x4000, 0x10)
            ]
        );
        assert_eq!(page_pieces(0x1000, 0).count(), 0);
        assert_eq!(
            page_pieces(0x1000, 0x1000).collect::<Vec<_>>(),
            vec![(0x1000, 0x1000)]
        );
    }
}
