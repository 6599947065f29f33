//! `splice`: file -> pipe -> socket with two `splice` calls per chunk (pipe size =
//! chunk).
//!
//! The pipe holds references to the page-cache pages, not copies; the socket side
//! attaches them to skbs as fragments, so with a scatter-gather NIC no CPU copy.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::runner::{send_error, Done, Transfer};
use crate::error::{Context, Error, Result};

/// A pipe (read end, write end) that holds one whole chunk, so that one splice in
/// and one out move it.
pub(super) fn chunk_sized_pipe(t: &mut Transfer<'_>) -> Result<(OwnedFd, OwnedFd)> {
    let (pipe_r, pipe_w) = t.sys.pipe().context(|| "pipe2".to_string())?;
    let chunk = t.chunk;
    let pipe_size = libc::c_int::try_from(chunk)
        .map_err(|_| Error::new(format!("chunk {chunk}: larger than a pipe can be")))?;
    t.sys
        .fcntl_int(pipe_w.as_raw_fd(), libc::F_SETPIPE_SZ, pipe_size)
        .context(|| format!("fcntl(F_SETPIPE_SZ, {chunk}) (above /proc/sys/fs/pipe-max-size?)"))?;
    Ok((pipe_r, pipe_w))
}

/// Moves `len` bytes that are in the pipe `pipe` (its read end) to the socket,
/// with as many `splice` calls as the socket takes.
pub(super) fn pipe_to_socket(t: &mut Transfer<'_>, pipe: RawFd, len: usize) -> Result<()> {
    let mut in_pipe = len;
    while in_pipe > 0 {
        match t
            .sys
            .splice(pipe, None, t.sock, in_pipe, libc::SPLICE_F_MOVE)
        {
            Ok(0) => return Err(Error::new("splice pipe -> socket returned 0")),
            Ok(m) => in_pipe -= m,
            Err(e) => return Err(send_error("splice pipe ->", e)),
        }
    }
    Ok(())
}

/// Sends the file through a pipe with `splice`, then waits for the ACK; the pipe
/// is kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let (pipe_r, pipe_w) = chunk_sized_pipe(t)?;
    let (r, w) = (pipe_r.as_raw_fd(), pipe_w.as_raw_fd());
    let mut off: i64 = 0;
    t.for_each_chunk(|t, c| {
        let mut left = c.len;
        // Normally one splice in and one out per chunk: the pipe holds a whole
        // chunk. Short splices continue.
        while left > 0 {
            let n = match t.sys.splice(
                fd,
                Some(&mut off),
                w,
                t.read_request(left),
                libc::SPLICE_F_MOVE,
            ) {
                Ok(0) => {
                    return Err(Error::new(format!(
                        "splice from the file returned 0 at offset {off}: the file ended early"
                    )))
                }
                Ok(n) => n,
                Err(e) => return Err(Error::new(format!("splice file -> pipe at {off}: {e}"))),
            };
            pipe_to_socket(t, r, n)?;
            // An O_DIRECT request is page-rounded, but only the file's last chunk
            // is ever unaligned and the file ends there: never more than `left`.
            left = left.saturating_sub(n);
        }
        Ok(())
    })?;
    t.wait_ack()?;
    Ok(Done {
        keep: vec![Box::new(pipe_r), Box::new(pipe_w)],
        zerocopy: None,
        zerocopy_receive: None,
    })
}
