//! `sendfile_warm`: `sendfile` with the file already in the page cache.
//!
//! The runner does not drop caches for this method; instead, before `BEGIN`,
//! [`warm_up`] reads the whole file once. The transfer then has no disk DMA in its
//! span, and the audit matches the NIC's reads against what virtio-blk wrote
//! earlier in the run (the warm-up's DMA).

use std::path::Path;

use super::runner::{read_whole, Done, Transfer};
use super::sendfile;
use crate::error::Result;

/// Reads all of the file at `path` once, so that it is in the page cache.
pub fn warm_up(path: &Path) -> Result<()> {
    read_whole(path).map(drop)
}

/// The same per-chunk `sendfile` loop as [`sendfile::transfer`].
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    sendfile::transfer(t)
}
