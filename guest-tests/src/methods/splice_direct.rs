//! `splice_direct`: file -> pipe -> socket with `splice`, the file opened with
//! O_DIRECT.
//!
//! The same read side as [`super::sendfile_direct`] (direct I/O into pages the
//! splice allocates for the pipe), through the application's own pipe: two
//! `splice` calls per chunk, no CPU copy with a scatter-gather NIC.

use super::runner::{Done, Transfer};
use super::splice;
use crate::error::Result;

/// The same per-chunk loop as [`splice::transfer`]; the runner opened the file
/// with O_DIRECT, and each request is page-rounded ([`Transfer::read_request`]).
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    splice::transfer(t)
}
