//! `read_write`: `read` a chunk into a user buffer, `write` it to the socket.
//!
//! The classic path: two CPU copies per byte (page cache -> user buffer, user
//! buffer -> socket buffer), two system calls per chunk.

use std::os::fd::AsRawFd;

use super::runner::{read_exactly, write_all, Done, Transfer};
use crate::error::Result;

/// Sends the file with `read` + `write` per chunk, then waits for the ACK.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    t.for_each_chunk(|t, c| {
        let buf = &mut t.buf.as_mut_slice()[..c.len];
        read_exactly(&mut t.sys, fd, buf, c.offset)?;
        write_all(&mut t.sys, t.sock, &t.buf.as_slice()[..c.len])
    })?;
    t.wait_ack()?;
    Ok(Done::plain())
}
