//! `recv_write`: `recv` a chunk into a user buffer, `write` it to the file.
//!
//! The classic receive path: two CPU copies per byte (socket buffer -> user
//! buffer, user buffer -> page cache), two system calls per chunk; the page cache
//! goes to the disk at `fsync`.

use std::os::fd::AsRawFd;

use super::receive::{finish, recv_exactly, write_file};
use super::runner::{Done, Transfer};
use crate::error::Result;

/// Receives the payload with `recv` + `write` per chunk, then syncs the file and
/// sends the count.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    t.for_each_chunk(|t, c| {
        let size = t.size;
        let buf = &mut t.buf.as_mut_slice()[..c.len];
        recv_exactly(&mut t.sys, t.sock, buf, c.offset, size)?;
        write_file(&mut t.sys, fd, &t.buf.as_slice()[..c.len], c.offset)
    })?;
    finish(t)?;
    Ok(Done::plain())
}
