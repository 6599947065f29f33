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
use super::zerocopy::{MsgZerocopy, DRAIN_EVERY};
use crate::error::{Context, Result};

/// Maps the file privately, copies-on-write one page per chunk and sends it with
/// MSG_ZEROCOPY, waits for the ACK and every completion; the mapping is kept until
/// after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let mut map = t
        .sys
        .mmap_file(
            t.file.as_raw_fd(),
            t.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .context(|| {
            format!(
                "mmap of {} bytes (MAP_PRIVATE, PROT_READ|PROT_WRITE)",
                t.size
            )
        })?;
    let mut zc = MsgZerocopy::new(t.sock, t.chunks());
    t.for_each_chunk(|t, c| {
        // Before the send, never after: a page must not change while the NIC may
        // read it.
        map.touch(c.offset as usize);
        zc.send_all(&mut t.sys, map.slice(c.offset as usize, c.len))?;
        if (c.index + 1) % DRAIN_EVERY == 0 {
            zc.drain(&mut t.sys)?;
        }
        Ok(())
    })?;
    t.wait_ack()?;
    zc.wait_until(&mut t.sys, 0)?;
    Ok(Done {
        keep: vec![Box::new(map)],
        zerocopy: Some(zc.completions.report()),
    })
}
