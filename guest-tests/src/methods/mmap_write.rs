//! `mmap_write`: `mmap` the file once (MAP_SHARED, read-only), `write` each chunk
//! of the mapping to the socket.
//!
//! The user buffer is the page cache itself, so the read copy disappears; `write`
//! still copies page cache -> socket buffer (one CPU copy per byte).

use super::runner::{write_all, Done, Transfer};
use crate::error::Result;

/// Maps the file, writes it chunk by chunk, waits for the ACK; the mapping is
/// kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let map = t.map_shared()?;
    t.for_each_chunk(|t, c| write_all(&mut t.sys, t.sock, map.slice(c.map_offset(), c.len)))?;
    t.wait_ack()?;
    Ok(Done {
        keep: vec![Box::new(map)],
        zerocopy: None,
        zerocopy_receive: None,
    })
}
