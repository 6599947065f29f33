//! `vmsplice`: O_DIRECT `read` of each chunk into its own part of a user buffer
//! as large as the transfer, `vmsplice` that part into a pipe, `splice` the pipe
//! to the socket.
//!
//! The disk's DMA fills the user pages; `vmsplice` puts references to them in the
//! pipe (`iter_to_pipe`, `user_page_pipe_buf_ops`), and the socket takes the
//! pipe's pages as fragments (6.1: `pipe_to_sendpage` -> `tcp_sendpage`; 6.5+:
//! `splice_to_socket` with MSG_SPLICE_PAGES): no CPU copy with a scatter-gather NIC.
//!
//! Unlike MSG_ZEROCOPY, nothing says when the kernel no longer reads the pages, so
//! the buffer is never reused: each chunk has its own part, allocated (and faulted
//! in) before `BEGIN` and freed after `END`.

use std::os::fd::AsRawFd;

use super::direct_write::read_direct;
use super::runner::{Done, Transfer};
use super::splice::{chunk_sized_pipe, pipe_to_socket};
use crate::error::{Error, Result};

/// Sends the file (opened O_DIRECT) with `read` + `vmsplice` + `splice` per chunk,
/// then waits for the ACK; the buffer and the pipe are kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let mut whole = t
        .whole
        .take()
        .ok_or_else(|| Error::new("vmsplice: no transfer-sized buffer was allocated"))?;
    let (pipe_r, pipe_w) = chunk_sized_pipe(t)?;
    let (r, w) = (pipe_r.as_raw_fd(), pipe_w.as_raw_fd());
    t.for_each_chunk(|t, c| {
        let at = c.map_offset();
        read_direct(
            &mut t.sys,
            fd,
            &mut whole.as_mut_slice()[at..],
            c.offset,
            c.len,
        )?;
        let mut part = &whole.as_slice()[at..at + c.len];
        // Normally one vmsplice and one splice per chunk: the pipe holds a whole
        // chunk. Short calls continue.
        while !part.is_empty() {
            let n = match t.sys.vmsplice(w, part) {
                Ok(0) => return Err(Error::new("vmsplice returned 0")),
                Ok(n) => n,
                Err(e) => {
                    return Err(Error::new(format!(
                        "vmsplice of file bytes {}..: {e}",
                        c.offset
                    )))
                }
            };
            pipe_to_socket(t, r, n)?;
            part = &part[n..];
        }
        Ok(())
    })?;
    t.wait_ack()?;
    Ok(Done {
        keep: vec![Box::new(whole), Box::new(pipe_r), Box::new(pipe_w)],
        zerocopy: None,
        zerocopy_receive: None,
    })
}
