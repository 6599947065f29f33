//! `direct_write`: O_DIRECT `read` into a page-aligned user buffer, `write` it.
//!
//! The disk DMA lands in the user buffer (no page cache); `write` copies it into
//! the socket buffer (one CPU copy per byte).

use std::os::fd::AsRawFd;

use super::runner::{write_all, Done, Transfer};
use super::syscalls::Syscalls;
use super::CHUNK_ALIGN;
use crate::error::{Error, Result};

/// Sends the file (opened O_DIRECT by the runner) with `read` + `write` per chunk,
/// then waits for the ACK.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    t.for_each_chunk(|t, c| {
        read_direct(&mut t.sys, fd, t.buf.as_mut_slice(), c.offset, c.len)?;
        write_all(&mut t.sys, t.sock, &t.buf.as_slice()[..c.len])
    })?;
    t.wait_ack()?;
    Ok(Done::plain())
}

/// One O_DIRECT `read` of at least `want` bytes at the file position (`offset`,
/// for messages) into the aligned `buf`.
///
/// O_DIRECT needs block-aligned lengths, so the request is `want` rounded up to a
/// page: the last chunk of a prefix (`zc.size`) may read up to a page beyond it,
/// and at the end of the file the kernel returns just what is there.
pub fn read_direct(
    sys: &mut Syscalls,
    fd: libc::c_int,
    buf: &mut [u8],
    offset: u64,
    want: usize,
) -> Result<()> {
    let request = want.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    match sys.read(fd, &mut buf[..request]) {
        Ok(n) if n >= want => Ok(()),
        Ok(n) => Err(Error::new(format!(
            "O_DIRECT read at {offset} returned {n} of {want} bytes (file shorter than expected?)"
        ))),
        Err(e) => Err(Error::new(format!("O_DIRECT read at {offset}: {e}"))),
    }
}
