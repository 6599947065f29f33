//! `cow_zerocopy`: a MAP_PRIVATE mapping of the file; per chunk, rewrite the first
//! byte of the chunk's first page with its own value, then `send(MSG_ZEROCOPY)`
//! the chunk.
//!
//! The write forces a copy-on-write of that one page (the kernel copies the
//! page-cache page into a private anonymous page: one CPU copy of 4 KiB); the
//! rest of the chunk is still shared with the page cache. So per chunk one page
//! reaches the NIC from a CPU-copied page and the others straight from the page
//! cache. The mapping stays until every completion arrived.

use std::os::fd::AsRawFd;

use super::runner::{Done, Transfer};
use super::zerocopy::send_mapping;
use crate::error::{Context, Result};

/// Maps the file privately, copies-on-write one page per chunk and sends it with
/// MSG_ZEROCOPY, waits for the ACK and every completion; the mapping is kept until
/// after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let len = t.map_len()?;
    let map = t
        .sys
        .mmap_file(
            t.file.as_raw_fd(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .context(|| {
            format!(
                "mmap of {} bytes (MAP_PRIVATE, PROT_READ|PROT_WRITE)",
                t.size
            )
        })?;
    // The write before each send makes that page a private copy.
    send_mapping(t, map, |map, offset| map.touch(offset))
}
