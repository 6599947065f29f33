//! `direct_zerocopy`: O_DIRECT `read` into a page-aligned user buffer,
//! `send(MSG_ZEROCOPY)` it, then wait for that send's completion before the next
//! read reuses the buffer.
//!
//! The disk DMA fills the user buffer and the NIC reads the same pages: no CPU
//! copy, if the kernel really did zero-copy (its completion says whether it
//! copied). The wait is not optional: with MSG_ZEROCOPY the NIC may still be
//! reading the buffer after `send` returned, and the next O_DIRECT read would
//! overwrite it.

use std::os::fd::AsRawFd;

use super::direct_write::read_direct;
use super::runner::{Done, Transfer};
use super::zerocopy::MsgZerocopy;
use crate::error::Result;

/// Sends the file (O_DIRECT) with `read` + `send(MSG_ZEROCOPY)` + completion wait
/// per chunk, then waits for the ACK.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let mut zc = MsgZerocopy::new(t.sock, t.chunks());
    t.for_each_chunk(|t, c| {
        read_direct(&mut t.sys, fd, t.buf.as_mut_slice(), c.offset, c.len)?;
        zc.send_all(&mut t.sys, &t.buf.as_slice()[..c.len])?;
        zc.wait_until(&mut t.sys, 0)
    })?;
    t.wait_ack()?;
    // Every send completed inside the loop: nothing left to drain.
    zc.wait_until(&mut t.sys, 0)?;
    Ok(Done {
        keep: Vec::new(),
        zerocopy: Some(zc.completions.report()),
        zerocopy_receive: None,
    })
}
