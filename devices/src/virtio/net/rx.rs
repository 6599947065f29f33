//! The receive path: frames from the backend wait in the pending queue until the
//! guest has posted receive buffers; with `MRG_RXBUF` one frame may fill several
//! chains (`num_buffers`).

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID;
use virtio_queue::QueueT;

use super::summary::rx_detail;
use virtio_queue::Queue;

use super::{fatal, Active, Host, NetBackend, MAX_FRAME_LEN, NET_HDR_LEN, RX_QUEUE};
use crate::dma_log::{DeviceKind, DmaLog};
use crate::virtio::chain::{GuestChain, Roles};
use crate::virtio::{pop_avail, GuestMem};

/// What happened to the frame at the front of the pending queue.
enum Delivery {
    /// Written to the guest.
    Done,
    /// Not enough receive buffers; try again when the guest posts more.
    NoBuffers,
    /// Can never be delivered (logged); discard it.
    Dropped,
}

/// Why the receive queue cannot be served: the chain at fault, if one was, and
/// what was wrong (NEEDS_RESET).
type RxFault = (Option<u16>, String);

impl<B: NetBackend> Host<B> {
    /// Delivers pending frames while the guest has receive buffers.
    ///
    /// When buffers are short, notifications are turned on and the ring checked
    /// again; each "more were posted" means the driver's `idx` moved forward, so
    /// after a queue's worth of them in a row the whole queue is posted and the
    /// frame is delivered or dropped. More re-checks than that without a frame
    /// leaving mean `idx` does not move forward (a driver rewriting it from another
    /// vCPU): a fault, not a loop that lasts as long as the driver likes.
    pub(super) fn deliver_pending(&mut self, active: &mut Active) {
        if active.broken {
            return;
        }
        let mut delivered = false;
        let mut rechecks = 0u32;
        while !self.pending.is_empty() {
            match self.deliver_front(active) {
                Ok(Delivery::Done) => {
                    delivered = true;
                    rechecks = 0;
                    if let Some(f) = self.pending.pop_front() {
                        self.capture(&f);
                    }
                }
                Ok(Delivery::Dropped) => {
                    rechecks = 0;
                    self.pending.pop_front();
                    self.stats.rx_dropped += 1;
                }
                Ok(Delivery::NoBuffers) => match ask_for_buffers(active) {
                    Ok(true) if rechecks < u32::from(active.rx.size()) => {
                        rechecks += 1;
                        continue;
                    }
                    Ok(true) => {
                        let what = "available ring index changed more times than the queue has entries without a frame delivered: it does not move forward";
                        fatal(active, &self.log, RX_QUEUE, None, what);
                        return;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        fatal(active, &self.log, RX_QUEUE, None, &format!("rings: {e}"));
                        return;
                    }
                },
                Err((head, what)) => {
                    fatal(active, &self.log, RX_QUEUE, head, &what);
                    return;
                }
            }
        }
        if delivered {
            if let Err(fault) =
                super::super::signal_used(RX_QUEUE, &mut active.rx, &active.mem, &active.interrupt)
            {
                fatal(active, &self.log, RX_QUEUE, fault.head, &fault.what);
            }
        }
    }

    /// Tries to put the front pending frame into receive buffers. Chains taken from
    /// the available ring are given back (next_avail rolled back) when they are not
    /// enough, so nothing is completed half-filled.
    fn deliver_front(&mut self, active: &mut Active) -> Result<Delivery, RxFault> {
        let Some(frame) = self.pending.front() else {
            return Ok(Delivery::Dropped);
        };
        if frame.len() > MAX_FRAME_LEN {
            self.log.device_error(
                DeviceKind::Net,
                RX_QUEUE,
                None,
                &format!("frame for the guest of {} bytes is too large", frame.len()),
                false,
            );
            return Ok(Delivery::Dropped);
        }
        let mut rx = RxQueue {
            mem: &active.mem,
            queue: &mut active.rx,
            indirect: active.indirect,
            mrg_rxbuf: active.mrg_rxbuf,
        };
        let chains = match rx.take_chains(&self.log, frame.len())? {
            Ok(chains) => chains,
            Err(delivery) => return Ok(delivery),
        };
        let mut hdr = [0u8; NET_HDR_LEN];
        if active.guest_csum {
            hdr[0] = u8::try_from(VIRTIO_NET_HDR_F_DATA_VALID).expect("an 8-bit flag");
        }
        // num_buffers: 1 when MRG_RXBUF is off, as the spec requires.
        let nbufs = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        hdr[10..12].copy_from_slice(&nbufs.to_le_bytes());
        rx.fill(&chains, &hdr, frame)?;
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame.len() as u64;
        if let Some(first) = chains.first() {
            first.log_request_from_read(NET_HDR_LEN, frame, None, u64::from(nbufs), rx_detail);
        }
        Ok(Delivery::Done)
    }
}

/// The receive queue while one frame is delivered.
struct RxQueue<'a> {
    mem: &'a GuestMem,
    queue: &'a mut Queue,
    indirect: bool,
    mrg_rxbuf: bool,
}

impl<'a> RxQueue<'a> {
    /// Takes chains from the available ring until they hold the header and a frame
    /// of `frame_len` bytes (one chain without MRG_RXBUF). When there are not
    /// enough, gives them back and says what became of the frame.
    fn take_chains(
        &mut self,
        log: &'a DmaLog,
        frame_len: usize,
    ) -> Result<Result<Vec<GuestChain<'a>>, Delivery>, RxFault> {
        let (mem, indirect, mrg_rxbuf) = (self.mem, self.indirect, self.mrg_rxbuf);
        let queue = &mut *self.queue;
        let needed = NET_HDR_LEN + frame_len;
        let start = queue.next_avail();
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| (None, format!("available ring: {e}")))?;
        let mut chains: Vec<GuestChain> = Vec::new();
        let mut have = 0usize;
        let outcome = loop {
            if have >= needed {
                break Ok(chains);
            }
            let Some(head) = pop_avail(queue, mem).map_err(|what| (None, what))? else {
                queue.set_next_avail(start);
                // Every buffer the queue can hold is posted and the frame still does
                // not fit: waiting would block the queue forever.
                if (avail.0.wrapping_sub(start)) >= queue.size() && !chains.is_empty() {
                    log.device_error(
                        DeviceKind::Net,
                        RX_QUEUE,
                        None,
                        &format!(
                            "frame of {frame_len} bytes does not fit the whole receive queue ({have} bytes)"
                        ),
                        false,
                    );
                    break Err(Delivery::Dropped);
                }
                break Err(Delivery::NoBuffers);
            };
            let chain =
                GuestChain::walk(mem, log, DeviceKind::Net, RX_QUEUE, queue, head, indirect)
                    .map_err(|e| (Some(head), e.to_string()))?;
            // A receive chain has no way to say it was refused: like any other
            // protocol error in it, the device needs a reset.
            chain
                .check_length()
                .map_err(|e| (Some(head), e.to_string()))?;
            for d in chain.descriptors() {
                if !d.writable {
                    return Err((
                        Some(head),
                        format!("device-readable descriptor {} in an RX chain", d.index),
                    ));
                }
                chain.check(d).map_err(|e| (Some(head), e.to_string()))?;
            }
            let cap = usize::try_from(chain.all().len())
                .expect("walk_chain refuses chains of 4 GiB or more");
            if !mrg_rxbuf && cap < needed {
                // Without MRG_RXBUF a frame must fit one chain. Keep the buffer for
                // the next (smaller) frame and drop this one.
                queue.set_next_avail(start);
                chain.log_error(
                    &format!(
                        "receive buffer of {cap} bytes cannot hold a {needed}-byte frame without MRG_RXBUF"
                    ),
                    false,
                );
                break Err(Delivery::Dropped);
            }
            if cap < NET_HDR_LEN && chains.is_empty() {
                return Err((
                    Some(head),
                    format!(
                        "receive buffer of {cap} bytes cannot hold the {NET_HDR_LEN}-byte header"
                    ),
                ));
            }
            have += cap;
            chains.push(chain);
        };
        Ok(outcome)
    }

    /// Writes `hdr` and `frame` across `chains` (the header only in the first) and
    /// puts each chain in the used ring with the bytes it got.
    fn fill(&mut self, chains: &[GuestChain], hdr: &[u8], frame: &[u8]) -> Result<(), RxFault> {
        let mut bytes = Vec::with_capacity(hdr.len() + frame.len());
        bytes.extend_from_slice(hdr);
        bytes.extend_from_slice(frame);
        let mut at = 0usize;
        for chain in chains {
            let head = chain.head();
            let roles = Roles::header_then_data(hdr.len().saturating_sub(at));
            let written = chain
                .all()
                .write(&bytes[at..], roles)
                .map_err(|e| (Some(head), format!("writing {e}")))?;
            at += written;
            let written = u32::try_from(written).unwrap_or(u32::MAX);
            self.queue
                .add_used(self.mem, head, written)
                .map_err(|e| (Some(head), format!("used ring: {e}")))?;
        }
        Ok(())
    }
}

/// Asks for a notification when the guest posts more buffers; `Ok(true)` if it
/// already has. With EVENT_IDX the queue writes `avail_event = next_avail`; after a
/// partial (MRG_RXBUF) attempt next_avail was rolled back below buffers the guest
/// already posted, and the guest would never kick for the next one. So publish the
/// current avail index instead.
fn ask_for_buffers(active: &mut Active) -> Result<bool, virtio_queue::Error> {
    let mem = &active.mem;
    let saved = active.rx.next_avail();
    let more = active.rx.avail_idx(mem, Ordering::Acquire).and_then(|idx| {
        active.rx.set_next_avail(idx.0);
        active.rx.enable_notification(mem)
    });
    active.rx.set_next_avail(saved);
    more
}
