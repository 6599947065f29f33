//! `recv_mmap`: `mmap` the pre-sized file once (MAP_SHARED, read-write), `recv`
//! each chunk straight into its place in the mapping.
//!
//! The user buffer is the page cache itself: one CPU copy per byte (socket buffer
//! -> page cache, through the mapping), one system call per chunk; the pages reach
//! the disk at `fsync`.

use std::os::fd::AsRawFd;

use super::receive::{finish, recv_exactly};
use super::runner::{Done, Transfer};
use crate::error::{Context, Result};

/// Maps the file (the runner sized it before `BEGIN`), receives into it chunk by
/// chunk, syncs it and sends the count; the mapping is kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let len = t.map_len()?;
    let mut map = t
        .sys
        .mmap_file(
            fd,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .context(|| format!("mmap of {len} bytes (MAP_SHARED, PROT_READ | PROT_WRITE)"))?;
    t.for_each_chunk(|t, c| {
        let size = t.size;
        let dest = map.slice_mut(c.map_offset(), c.len);
        recv_exactly(&mut t.sys, t.sock, dest, c.offset, size)
    })?;
    finish(t)?;
    Ok(Done {
        keep: vec![Box::new(map)],
        ..Done::plain()
    })
}
