//! `sendfile`: `sendfile(sock, file, &off, chunk)` per chunk.
//!
//! The kernel moves page-cache pages to the socket itself: no user buffer, one
//! system call per chunk. Whether the CPU still copies depends on the NIC (with
//! scatter-gather the NIC reads the page-cache pages; without, the frame is
//! linearised at the device edge): the audit tells from the device log.

use std::os::fd::AsRawFd;

use super::runner::{send_error, Done, Transfer};
use crate::error::{Error, Result};

/// Sends the file with `sendfile` per chunk, then waits for the ACK.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let mut off: i64 = 0;
    t.for_each_chunk(|t, c| {
        let end = c.offset + c.len as u64;
        // A short sendfile (SO_SNDTIMEO, a signal) continues where it stopped.
        while (off as u64) < end {
            let left = usize::try_from(end - off as u64).expect("at most one chunk");
            match t.sys.sendfile(t.sock, fd, &mut off, t.read_request(left)) {
                Ok(0) => {
                    return Err(Error::new(format!(
                        "sendfile returned 0 at offset {off}: the file ended early"
                    )))
                }
                Ok(_) => {}
                Err(e) => return Err(send_error("sendfile", e)),
            }
        }
        Ok(())
    })?;
    t.wait_ack()?;
    Ok(Done::plain())
}
