//! `mmap_zerocopy`: `mmap` the file once, `send(MSG_ZEROCOPY)` each chunk of the
//! mapping.
//!
//! The NIC reads the page-cache pages that virtio-blk filled: no CPU copy, if the
//! kernel really did zero-copy. Completions are drained every
//! [`DRAIN_EVERY`](super::zerocopy::DRAIN_EVERY) chunks, when the kernel runs out
//! of optmem (ENOBUFS), and at the end; the mapping stays until all arrived.

use super::runner::{Done, Transfer};
use super::zerocopy::send_mapping;
use crate::error::Result;

/// Maps the file, sends it with MSG_ZEROCOPY, waits for the ACK and every
/// completion; the mapping is kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let map = t.map_shared()?;
    send_mapping(t, map, |_, _| {})
}
