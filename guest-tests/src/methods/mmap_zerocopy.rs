//! `mmap_zerocopy`: `mmap` the file once, `send(MSG_ZEROCOPY)` each chunk of the
//! mapping.
//!
//! The NIC reads the page-cache pages that virtio-blk filled: no CPU copy, if the
//! kernel really did zero-copy. Completions are drained every
//! [`DRAIN_EVERY`](super::zerocopy::DRAIN_EVERY) chunks, when the kernel runs out
//! of optmem (ENOBUFS), and at the end; the mapping stays until all arrived.

use std::os::fd::AsRawFd;

use super::runner::{Done, Transfer};
use super::zerocopy::{MsgZerocopy, DRAIN_EVERY};
use crate::error::{Context, Result};

/// Maps the file, sends it with MSG_ZEROCOPY, waits for the ACK and every
/// completion; the mapping is kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let map = t
        .sys
        .mmap_file(
            t.file.as_raw_fd(),
            t.size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
        )
        .context(|| format!("mmap of {} bytes (MAP_SHARED, PROT_READ)", t.size))?;
    let mut zc = MsgZerocopy::new(t.sock, t.chunks());
    t.for_each_chunk(|t, c| {
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
