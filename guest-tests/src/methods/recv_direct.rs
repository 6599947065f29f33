//! `recv_direct`: `recv` a chunk into a page-aligned user buffer, `pwrite` it to
//! the file opened with O_DIRECT.
//!
//! One CPU copy per byte (socket buffer -> user buffer); virtio-blk then takes the
//! bytes from the user buffer itself. Two system calls per chunk.

use std::os::fd::AsRawFd;

use super::receive::{finish, pad_to_block, recv_exactly, write_direct};
use super::runner::{Done, Transfer};
use crate::error::Result;

/// Receives the payload with `recv` + O_DIRECT `pwrite` per chunk, then syncs the
/// file and sends the count.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    t.for_each_chunk(|t, c| {
        let size = t.size;
        let buf = t.buf.as_mut_slice();
        recv_exactly(&mut t.sys, t.sock, &mut buf[..c.len], c.offset, size)?;
        let len = pad_to_block(buf, c.len);
        write_direct(&mut t.sys, fd, &[&t.buf.as_slice()[..len]], c.offset)
    })?;
    finish(t)?;
    Ok(Done::plain())
}
