//! `splice_recv`: socket -> pipe -> file with `splice` (pipe size = chunk).
//!
//! The pipe holds references to the socket buffer's pages; the splice into the
//! file copies them into the page cache (one CPU copy per byte). Two `splice`
//! calls per chunk when the socket hands over the whole chunk at once; each
//! splice from the socket is followed by one into the file, so the pipe never
//! fills up (its slots, one per socket-buffer fragment, may run out before its
//! bytes do).

use std::os::fd::{AsRawFd, RawFd};

use super::receive::{finish, recv_error, short_stream};
use super::runner::{Done, Transfer};
use super::splice::chunk_sized_pipe;
use super::syscalls::Syscalls;
use crate::error::{Error, Result};

/// Receives the payload through a pipe with `splice`, then syncs the file and
/// sends the count; the pipe is kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let (pipe_r, pipe_w) = chunk_sized_pipe(t)?;
    let (r, w) = (pipe_r.as_raw_fd(), pipe_w.as_raw_fd());
    t.for_each_chunk(|t, c| {
        let size = t.size;
        let mut at = c.offset;
        let end = c.offset + c.len as u64;
        while at < end {
            let left = usize::try_from(end - at).expect("within a chunk");
            let n = match t.sys.splice(t.sock, None, w, left, libc::SPLICE_F_MOVE) {
                Ok(0) => return Err(short_stream(at, size)),
                Ok(n) => n,
                Err(e) => return Err(recv_error("splice socket -> pipe", e, at, size)),
            };
            pipe_to_file(&mut t.sys, r, fd, at, n)?;
            at += n as u64;
        }
        Ok(())
    })?;
    finish(t)?;
    Ok(Done {
        keep: vec![Box::new(pipe_r), Box::new(pipe_w)],
        ..Done::plain()
    })
}

/// Moves the `len` bytes in the pipe `pipe` (its read end) into the file at
/// `offset`, with as many `splice` calls as the file takes.
fn pipe_to_file(sys: &mut Syscalls, pipe: RawFd, fd: RawFd, offset: u64, len: usize) -> Result<()> {
    let mut off = i64::try_from(offset)
        .map_err(|_| Error::new(format!("file offset {offset}: too large")))?;
    let mut in_pipe = len;
    while in_pipe > 0 {
        match sys.splice_to_file(pipe, fd, &mut off, in_pipe, libc::SPLICE_F_MOVE) {
            Ok(0) => {
                return Err(Error::new(format!(
                    "splice pipe -> file returned 0 at offset {off}"
                )))
            }
            Ok(m) => in_pipe -= m,
            Err(e) => return Err(Error::new(format!("splice pipe -> file at {off}: {e}"))),
        }
    }
    Ok(())
}
