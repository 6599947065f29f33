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
        // A frame's replies (ARP, ICMP, RST) are bounded: one per ingress frame.
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

/// Appends one frame to the egress queue.
pub(super) struct TxToken<'a>(&'a mut TxQueue);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = self.0.pool.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.0.frames.push(buf);
        r
    }
}
