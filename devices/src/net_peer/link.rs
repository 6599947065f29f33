//! The peer's smoltcp `Device`: no socket, just memory. Ingress is the one frame the
//! guest just sent, borrowed (no copy); egress frames are queued for the net device to
//! put on the guest's receive queue.

use smoltcp::phy::{self, DeviceCapabilities};
use smoltcp::time::Instant;

/// Frames waiting to go to the guest, and spent buffers kept for reuse.
#[derive(Debug, Default)]
pub(super) struct TxQueue {
    pub(super) frames: Vec<Vec<u8>>,
    pub(super) pool: Vec<Vec<u8>>,
    /// Most frames held before smoltcp is told to wait (it retries on the next poll).
    pub(super) limit: usize,
    /// Replies dropped because `limit` frames were already waiting.
    pub(super) dropped: u64,
    /// Where a dropped reply is built (smoltcp must be given a buffer all the same).
    pub(super) spare: Vec<u8>,
}

impl TxQueue {
    /// Puts spent buffers back for reuse, keeping at most a bounded number.
    pub(super) fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < 256 {
            self.pool.push(buf);
        }
    }
}

/// A smoltcp device over one optional ingress frame and the egress queue.
pub(super) struct Link<'a> {
    pub(super) rx: Option<&'a [u8]>,
    pub(super) tx: &'a mut TxQueue,
    pub(super) caps: &'a DeviceCapabilities,
}

impl phy::Device for Link<'_> {
    type RxToken<'b>
        = RxToken<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxToken<'b>
    where
        Self: 'b;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let frame = self.rx.take()?;
        // One reply at most per ingress frame (ARP, ICMP, RST); it is dropped when the
        // queue is full (see `TxToken`). Refusing the token instead would drop the
        // guest's frame unread, and with it data the peer must check.
        Some((RxToken(frame), TxToken(self.tx)))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        (self.tx.frames.len() < self.tx.limit).then_some(TxToken(self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        self.caps.clone()
    }
}

/// The borrowed ingress frame.
pub(super) struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.0)
    }
}

/// Appends one frame to the egress queue; or, when it already holds `limit` frames
/// (a guest that sends and does not receive), drops it and counts it: the queue must
/// not grow with what a guest sends in one TX batch, which has no end while the
/// guest keeps the queue full. A dropped ARP or echo reply is what a lossy link does;
/// TCP frames other than these replies come from `transmit`, which waits instead.
pub(super) struct TxToken<'a>(&'a mut TxQueue);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let q = self.0;
        if q.frames.len() >= q.limit {
            q.dropped += 1;
            q.spare.clear();
            q.spare.resize(len, 0);
            return f(&mut q.spare);
        }
        let mut buf = q.pool.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        q.frames.push(buf);
        r
    }
}
