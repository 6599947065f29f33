//! virtio-net (virtio 1.2, section 5.1): queue 0 receives (RX), queue 1 transmits
//! (TX); no control queue, one queue pair.
//!
//! # Features
//! Always offered: `VIRTIO_NET_F_MAC`, `VIRTIO_NET_F_MRG_RXBUF`, `VIRTIO_NET_F_STATUS`
//! (the link is always up); the transport adds `VERSION_1`, so the header is always
//! the 12-byte `virtio_net_hdr_v1`. With [`NetOptions::sg`] the device also offers
//! `VIRTIO_NET_F_CSUM` and `VIRTIO_NET_F_GUEST_CSUM`. That pair is what makes Linux
//! turn on `NETIF_F_SG` for the NIC: with it, a TCP frame's payload is handed to the
//! device as page fragments (the page-cache pages for `sendfile`), one descriptor per
//! fragment; without it the kernel linearises the frame (a CPU copy) first. No
//! segmentation offload is offered (no TSO), so every frame is at most one MTU.
//!
//! # TX (`tx`)
//! Each chain is walked into a [`GuestChain`] and gathered through it (header, then
//! the frame, across any number of descriptors: the guest's scatter-gather), which
//! logs every descriptor range (`device_reads`, role `header` for the 12 header bytes, `data`
//! for frame bytes) with per-page fingerprints of the bytes *as read*, before the
//! device completes a partial checksum, so the audit can match them against what
//! virtio-blk wrote at the same guest-physical addresses. A partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) is completed, the frame goes to the pcap and to
//! the [`NetBackend`], and one `request` record summarises it (TCP seq/len when TCP).
//!
//! # RX (`rx`)
//! Frames from the backend wait in a bounded queue until the guest has posted receive
//! buffers; with `MRG_RXBUF` one frame may fill several chains (`num_buffers`). With
//! `GUEST_CSUM` the header says `VIRTIO_NET_HDR_F_DATA_VALID` (the peer's checksums
//! are not re-checked by the guest). Every range written is logged (`device_writes`).
//!
//! Frame summaries for the log (`summary`) are made on the log's writer thread.
//!
//! # Bad input
//! virtio-net has no status byte to report an error with, so a chain that breaks the
//! protocol (cannot be walked, device-writable buffer in TX or device-readable in RX,
//! a buffer outside guest memory or of zero length, a TX header shorter than 12 bytes,
//! an RX chain longer than the queue) puts the device in DEVICE_NEEDS_RESET, as
//! virtio-blk does for chains it cannot answer. A well-formed chain whose *frame* is
//! unusable (bad checksum offsets, a GSO type that was not negotiated, empty or
//! oversized frame), or a TX chain longer than the queue, is completed, the frame
//! dropped and a non-fatal `device_error` logged: a real NIC drops bad frames too.

use std::collections::VecDeque;
use std::io::Write;
use std::mem::offset_of;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;

use super::chain::GuestChain;
use super::{ActivateError, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_INDIRECT_DESC};
use crate::dma_log::{DeviceKind, DmaLog};
use crate::net_peer::NetPeer;
use crate::pcap::{PcapError, PcapWriter};

mod rx;
mod summary;
mod tx;

pub use tx::complete_checksum;

/// `VIRTIO_ID_NET`.
pub const VIRTIO_ID_NET: u32 = 1;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;
/// Size of `virtio_net_hdr_v1` (VERSION_1 makes it 12 bytes with or without MRG_RXBUF).
pub const NET_HDR_LEN: usize = 12;
/// Largest Ethernet frame accepted in either direction: a 64 KiB IP packet plus an
/// Ethernet header with a VLAN tag. Without TSO Linux never sends more than one MTU;
/// the bound only keeps a broken driver from making the device allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 65535 + 18;
/// Size of the configuration space we expose: `mac`, `status`,
/// `max_virtqueue_pairs`, `mtu` (left 0: VIRTIO_NET_F_MTU is not offered); the
/// fields after them are for features not offered.
const CONFIG_LEN: usize = offset_of!(virtio_net_config, speed);

/// Feature bit helper.
const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Options of a [`Net`] device, chosen per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// Offer `VIRTIO_NET_F_CSUM` + `VIRTIO_NET_F_GUEST_CSUM`, so Linux enables
    /// scatter-gather on the NIC (`--net-sg on`). Without them Linux linearises every
    /// frame before handing it to the device.
    pub sg: bool,
    /// The guest's MAC address (config space `mac`).
    pub mac: [u8; 6],
    /// Maximum size of each queue (power of two, at most 32768).
    pub queue_size: u16,
    /// Most frames held for the guest while it has no receive buffers; beyond it the
    /// oldest is dropped (logged).
    pub max_pending: usize,
}

/// QEMU's default guest MAC, so guest images configured for it just work.
pub const DEFAULT_GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            sg: true,
            mac: DEFAULT_GUEST_MAC,
            queue_size: 256,
            max_pending: 1024,
        }
    }
}

/// Errors creating a [`Net`] device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    QueueSize(u16),
    /// A pending-frame limit of 0 could never deliver anything.
    #[error("max_pending must be at least 1")]
    MaxPending,
}

/// Where the frames the guest transmits go, and where frames for the guest come from.
///
/// The device calls [`send`](Self::send) for every transmitted frame, then
/// [`poll`](Self::poll) once per TX batch and [`take_for_guest`](Self::take_for_guest)
/// to collect frames for the guest. The VMM additionally calls the device's
/// [`Net::poll_backend`] after [`poll_delay`](Self::poll_delay) has elapsed, so
/// timers (delayed ACKs, retransmissions) fire when the guest is quiet.
pub trait NetBackend: Send {
    /// Takes one Ethernet frame (no virtio header) the guest transmitted.
    fn send(&mut self, frame: &[u8], now: Instant);
    /// Runs timers and protocol work.
    fn poll(&mut self, now: Instant);
    /// Appends the frames waiting for the guest, oldest first.
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>);
    /// How long until [`poll`](Self::poll) is next needed; `None` when nothing waits.
    /// (`&mut self` because smoltcp's own query needs it.)
    fn poll_delay(&mut self, now: Instant) -> Option<Duration>;
}

impl NetBackend for NetPeer {
    fn send(&mut self, frame: &[u8], now: Instant) {
        self.receive_frame(frame, now);
    }
    fn poll(&mut self, now: Instant) {
        NetPeer::poll(self, now);
    }
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        // Moves the buffers (no copy); the peer's buffer pool is not refilled, which
        // costs one allocation per frame to the guest: ACKs for transfers to the
        // peer, but every data frame when the peer sends a file (port 7879).
        out.extend(self.take_frames_for_guest());
    }
    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        NetPeer::poll_delay(self, now)
    }
}

impl<B: NetBackend + ?Sized> NetBackend for Box<B> {
    fn send(&mut self, frame: &[u8], now: Instant) {
        (**self).send(frame, now);
    }
    fn poll(&mut self, now: Instant) {
        (**self).poll(now);
    }
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        (**self).take_for_guest(out);
    }
    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        (**self).poll_delay(now)
    }
}

/// Counters of what the device carried (serialisable for a run's summary).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames the guest transmitted that went to the backend.
    pub tx_frames: u64,
    /// Their bytes (Ethernet header included, virtio header not).
    pub tx_bytes: u64,
    /// TX frames dropped because the frame was unusable.
    pub tx_dropped: u64,
    /// TX descriptors read (the scatter-gather width, summed).
    pub tx_descriptors: u64,
    /// Partial checksums the device completed.
    pub csum_completed: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames for the guest dropped (pending queue overflow, too large for a buffer).
    pub rx_dropped: u64,
}

/// Something that records every frame carried (a pcap file).
trait Capture: Send {
    fn capture(&mut self, frame: &[u8]) -> Result<(), PcapError>;
    fn flush(&mut self) -> Result<(), PcapError>;
}

impl<W: Write + Send> Capture for PcapWriter<W> {
    fn capture(&mut self, frame: &[u8]) -> Result<(), PcapError> {
        self.write_frame(SystemTime::now(), frame)
    }
    fn flush(&mut self) -> Result<(), PcapError> {
        PcapWriter::flush(self)
    }
}

/// `virtio_net_config` as vm-memory's [`ByteValued`] (the bindings' struct cannot
/// implement vm-memory's trait in this crate, hence the wrapper).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct NetConfig(virtio_net_config);

// SAFETY: `virtio_net_config` is `repr(C, packed)` and made only of integers and
// an integer array: no padding, no pointers, every bit pattern a valid value.
unsafe impl ByteValued for NetConfig {}

impl NetConfig {
    fn new(mac: [u8; 6]) -> Self {
        // The spec's fields are little-endian.
        NetConfig(virtio_net_config {
            mac,
            status: u16::try_from(VIRTIO_NET_S_LINK_UP)
                .expect("a 16-bit status flag")
                .to_le(),
            max_virtqueue_pairs: 1u16.to_le(),
            ..virtio_net_config::default()
        })
    }
}

/// Everything but the queues: survives reset.
struct Host<B> {
    backend: B,
    log: DmaLog,
    max_pending: usize,
    pcap: Option<Box<dyn Capture>>,
    pcap_error: Option<PcapError>,
    pending: VecDeque<Vec<u8>>,
    /// Reused gather buffer for TX (header + frame), so a frame costs no allocation.
    scratch: Vec<u8>,
    stats: NetStats,
}

struct Active {
    mem: GuestMem,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
    indirect: bool,
    mrg_rxbuf: bool,
    guest_csum: bool,
    broken: bool,
}

/// A virtio-net device model over a [`NetBackend`] (the [`NetPeer`] by default).
pub struct Net<B: NetBackend = NetPeer> {
    host: Host<B>,
    features: u64,
    config: NetConfig,
    queue_sizes: [u16; 2],
    active: Option<Active>,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("features", &format_args!("{:#x}", self.features))
            .field("active", &self.active.is_some())
            .field("pending", &self.host.pending.len())
            .field("stats", &self.host.stats)
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> Net<B> {
    /// Creates the device around `backend`, logging to `log`.
    pub fn new(backend: B, opts: NetOptions, log: DmaLog) -> Result<Self, NetError> {
        if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
            return Err(NetError::QueueSize(opts.queue_size));
        }
        if opts.max_pending == 0 {
            return Err(NetError::MaxPending);
        }
        let mut features =
            bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_STATUS);
        if opts.sg {
            features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        }
        Ok(Net {
            host: Host {
                backend,
                log,
                max_pending: opts.max_pending,
                pcap: None,
                pcap_error: None,
                pending: VecDeque::new(),
                scratch: Vec::new(),
                stats: NetStats::default(),
            },
            features,
            config: NetConfig::new(opts.mac),
            queue_sizes: [opts.queue_size; 2],
            active: None,
        })
    }

    /// Records every frame the device carries (both directions) into `pcap`.
    pub fn set_pcap<W: Write + Send + 'static>(&mut self, pcap: PcapWriter<W>) {
        self.host.pcap = Some(Box::new(pcap));
        self.host.pcap_error = None;
    }

    /// Flushes the pcap. Returns the first capture error (capturing stopped there).
    pub fn flush_pcap(&mut self) -> Result<(), PcapError> {
        if let Some(e) = self.host.pcap_error.take() {
            return Err(e);
        }
        match self.host.pcap.as_mut() {
            Some(p) => p.flush(),
            None => Ok(()),
        }
    }

    /// The backend (e.g. to queue [`crate::net_peer::Expectation`]s or read results).
    pub fn backend(&self) -> &B {
        &self.host.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.host.backend
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.host.stats
    }

    /// Frames waiting for receive buffers.
    pub fn pending_frames(&self) -> usize {
        self.host.pending.len()
    }

    /// Runs the backend's timers and delivers what it produced. The VMM calls this
    /// from a timer once [`next_poll_delay`](Self::next_poll_delay) has elapsed (and
    /// may call it at any time: it is cheap when nothing is due).
    pub fn poll_backend(&mut self, now: Instant) {
        self.host.backend.poll(now);
        self.collect_and_deliver();
    }

    /// When [`poll_backend`](Self::poll_backend) is next needed.
    pub fn next_poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.host.backend.poll_delay(now)
    }

    fn collect_and_deliver(&mut self) {
        self.host.backend.take_for_guest(&mut self.host.pending);
        while self.host.pending.len() > self.host.max_pending {
            self.host.pending.pop_front();
            self.host.stats.rx_dropped += 1;
            self.host.log.device_error(
                DeviceKind::Net,
                RX_QUEUE,
                None,
                &format!(
                    "receive queue has no buffers: dropped the oldest of {} pending frames",
                    self.host.max_pending + 1
                ),
                false,
            );
        }
        if let Some(active) = self.active.as_mut() {
            self.host.deliver_pending(active);
        }
    }

    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let host = &mut self.host;
        // One handle for the batch, so that chains can log while the host changes.
        let log = host.log.clone();
        let now = Instant::now();
        let indirect = active.indirect;
        let served = super::drain_queue(&mut active.tx, &active.mem, |tx, head| {
            let chain = GuestChain::walk(
                &active.mem,
                &log,
                DeviceKind::Net,
                TX_QUEUE,
                tx,
                head,
                indirect,
            )
            .map_err(|e| e.to_string())?;
            // TX buffers are only read: the used length is 0.
            host.handle_tx_chain(&chain, now).map(|()| 0)
        })
        .and_then(|()| {
            super::signal_used(TX_QUEUE, &mut active.tx, &active.mem, &active.interrupt)
        });
        if let Err(fault) = served {
            fatal(active, &host.log, TX_QUEUE, fault.head, &fault.what);
            return;
        }
        // Replies to what was just sent (ARP, ACKs) go out in the same pass.
        host.backend.poll(now);
    }
}

fn fatal(active: &mut Active, log: &DmaLog, queue: u16, head: Option<u16>, what: &str) {
    log.device_error(DeviceKind::Net, queue, head, what, true);
    active.broken = true;
    active.interrupt.set_needs_reset();
}

impl<B: NetBackend> Host<B> {
    fn capture(&mut self, frame: &[u8]) {
        if let Some(p) = self.pcap.as_mut() {
            if let Err(e) = p.capture(frame) {
                // Stop capturing: a partial record may be in the file already.
                self.pcap = None;
                self.pcap_error = Some(e);
            }
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config.as_slice()[..CONFIG_LEN], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only for a modern (VERSION_1) driver: `mac` is writable
        // only through the legacy interface, which this transport does not offer.
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let [rx, tx]: [Queue; 2] = queues.try_into().map_err(|q: Vec<Queue>| {
            ActivateError::Other(format!("virtio-net has 2 queues, got {}", q.len()))
        })?;
        if !rx.ready() {
            return Err(ActivateError::QueueNotReady { index: RX_QUEUE });
        }
        if !tx.ready() {
            return Err(ActivateError::QueueNotReady { index: TX_QUEUE });
        }
        self.active = Some(Active {
            mem,
            rx,
            tx,
            interrupt,
            indirect: acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            mrg_rxbuf: acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked_features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            broken: false,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        if self.active.as_ref().is_none_or(|a| a.broken) {
            return;
        }
        match index {
            RX_QUEUE => {}
            TX_QUEUE => self.process_tx(),
            _ => return,
        }
        // RX: the guest posted buffers. TX: the backend may have answered.
        self.collect_and_deliver();
    }

    fn reset(&mut self) {
        self.active = None;
        // Frames addressed to the previous driver instance are stale.
        self.host.pending.clear();
    }

    fn log_error(&self, queue: u16, error: &str, needs_reset: bool) {
        self.host
            .log
            .device_error(DeviceKind::Net, queue, None, error, needs_reset);
    }
}

#[cfg(test)]
mod flood_tests;
#[cfg(test)]
mod tests;
