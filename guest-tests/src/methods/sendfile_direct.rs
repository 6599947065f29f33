//! `sendfile_direct`: `sendfile` per chunk from the file opened with O_DIRECT.
//!
//! The page cache is not used: the read side of the splice inside `sendfile`
//! reads with direct I/O into pages it allocates and puts in the pipe, so the
//! disk's DMA lands in those pages and the socket takes references to them (no
//! CPU copy with a scatter-gather NIC). 6.1: `generic_file_splice_read` runs
//! `ext4_file_read_iter` (IOCB_DIRECT) on an ITER_PIPE iterator, whose pages
//! `append_pipe` allocates; 6.5+: `do_splice_read` sends O_DIRECT files to
//! `copy_splice_read`, which allocates the pages and runs `->read_iter` (still
//! IOCB_DIRECT) on a BVEC iterator over them. The "copy" in that name is the
//! `read_iter` into fresh pages, which for O_DIRECT is the device's DMA.

use super::runner::{Done, Transfer};
use super::sendfile;
use crate::error::Result;

/// The same per-chunk `sendfile` loop as [`sendfile::transfer`]; the runner
/// opened the file with O_DIRECT, and each request is page-rounded
/// ([`Transfer::read_request`]).
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    sendfile::transfer(t)
}
