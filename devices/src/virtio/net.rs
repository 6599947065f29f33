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
//! # TX
//! Each chain is walked with [`walk_chain`] and gathered (header, then the frame,
//! across any number of descriptors: the guest's scatter-gather). Every descriptor
//! range is logged (`device_reads`, role `header` for the 12 header bytes, `data`
//! for frame bytes) with per-page fingerprints of the bytes *as read*, before the
//! device completes a partial checksum, so the audit can match them against what
//! virtio-blk wrote at the same guest-physical addresses. A partial checksum
//! (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) is completed, the frame goes to the pcap and to
//! the [`NetBackend`], and one `request` record summarises it (TCP seq/len when TCP).
//!
//! # RX
//! Frames from the backend wait in a bounded queue until the guest has posted receive
//! buffers; with `MRG_RXBUF` one frame may fill several chains (`num_buffers`). With
//! `GUEST_CSUM` the header says `VIRTIO_NET_HDR_F_DATA_VALID` (the peer's checksums
//! are not re-checked by the guest). Every range written is logged (`device_writes`).
//!
//! # Bad input
//! virtio-net has no status byte to report an error with, so a chain that breaks the
//! protocol (cannot be walked, device-writable buffer in TX or device-readable in RX,
//! a buffer outside guest memory or of zero length, a TX header shorter than 12 bytes)
//! puts the device in DEVICE_NEEDS_RESET, as virtio-blk does for chains it cannot
//! answer. A well-formed chain whose *frame* is unusable (bad checksum offsets, a GSO
//! type that was not negotiated, empty or oversized frame) is completed, the frame
//! dropped and a non-fatal `device_error` logged: a real NIC drops bad frames too.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{walk_chain, ChainDesc};
use super::{ActivateError, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_INDIRECT_DESC};
use crate::dma_log::frame::summarize;
use crate::dma_log::{
    DescInfo, DescRole, DeviceKind, Direction, DmaLog, NetRequest, RequestDetail,
};
use crate::net_peer::NetPeer;
use crate::pcap::{PcapError, PcapWriter};

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
/// `max_virtqueue_pairs`, `mtu` (left 0: VIRTIO_NET_F_MTU is not offered).
const CONFIG_LEN: usize = 12;

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
        // costs one allocation per frame to the guest (ACKs only, in practice).
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

/// Counters of what the device carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

/// A contiguous guest range, part of one descriptor.
#[derive(Debug, Clone, Copy)]
struct Seg {
    index: u16,
    indirect: bool,
    addr: u64,
    len: usize,
}

impl From<&ChainDesc> for Seg {
    fn from(d: &ChainDesc) -> Self {
        Seg {
            index: d.index,
            indirect: d.indirect,
            addr: d.addr,
            len: d.len as usize,
        }
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
    config: [u8; CONFIG_LEN],
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

/// What happened to the frame at the front of the pending queue.
enum Delivery {
    /// Written to the guest.
    Done,
    /// Not enough receive buffers; try again when the guest posts more.
    NoBuffers,
    /// Can never be delivered (logged); discard it.
    Dropped,
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
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&opts.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
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
            config,
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
        let now = Instant::now();
        let indirect = active.indirect;
        let served = super::drain_queue(&mut active.tx, &active.mem, |tx, head| {
            // TX buffers are only read: the used length is 0.
            host.handle_tx_chain(&active.mem, tx, indirect, head, now)
                .map(|()| 0)
        })
        .and_then(|()| super::signal_used(&mut active.tx, &active.mem, &active.interrupt));
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

/// The request detail of a TX frame (on the log's writer thread: formatting the
/// summary costs more than the rest of a frame's logging).
fn tx_detail(frame: &[u8], _: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("tx ", ""))
}

/// The request detail of an RX frame delivered in `nbufs` buffers.
fn rx_detail(frame: &[u8], nbufs: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("rx ", &format!(" buffers={nbufs}")))
}

impl<B: NetBackend> Host<B> {
    /// Logs `bytes` (the contents of `segs`, concatenated): the first `hdr_len` bytes
    /// with role `header`, the rest `data`; a descriptor spanning both gives two records.
    fn log_segs(
        &self,
        queue: u16,
        head: u16,
        segs: &[Seg],
        bytes: &[u8],
        hdr_len: usize,
        dir: Direction,
    ) {
        let mut at = 0usize;
        for s in segs {
            let end = (at + s.len).min(bytes.len());
            let mut cut = at;
            while cut < end {
                let (role, upto) = if cut < hdr_len {
                    (DescRole::Header, hdr_len.min(end))
                } else {
                    (DescRole::Data, end)
                };
                let gpa = s.addr + (cut - at) as u64;
                // The device's own copy is hashed: it is exactly what was read or
                // written, and costs no second pass over guest memory.
                self.log.descriptor_bytes(
                    DescInfo {
                        device: DeviceKind::Net,
                        queue,
                        head,
                        desc: s.index,
                        indirect: s.indirect,
                        gpa,
                        // At most one descriptor's length, a u32.
                        len: (upto - cut) as u32,
                        dir,
                        role,
                    },
                    &bytes[cut..upto],
                );
                cut = upto;
            }
            at = end;
        }
    }

    fn capture(&mut self, frame: &[u8]) {
        if let Some(p) = self.pcap.as_mut() {
            if let Err(e) = p.capture(frame) {
                // Stop capturing: a partial record may be in the file already.
                self.pcap = None;
                self.pcap_error = Some(e);
            }
        }
    }

    /// Handles one TX chain. `Ok(())` when the chain can be completed (the frame was
    /// sent or dropped with a logged error); `Err(what)` for NEEDS_RESET.
    fn handle_tx_chain(
        &mut self,
        mem: &GuestMem,
        tx: &Queue,
        indirect: bool,
        head: u16,
        now: Instant,
    ) -> Result<(), String> {
        let descs = walk_chain(
            mem,
            GuestAddress(tx.desc_table()),
            tx.size(),
            head,
            indirect,
        )
        .map_err(|e| e.to_string())?;
        for d in &descs {
            if d.writable {
                return Err(format!(
                    "device-writable descriptor {} in a TX chain",
                    d.index
                ));
            }
            d.check(mem).map_err(|e| e.to_string())?;
        }
        let total: usize = descs.iter().map(|d| d.len as usize).sum();
        if total < NET_HDR_LEN {
            return Err(format!(
                "TX header too short: {total} bytes, need {NET_HDR_LEN}"
            ));
        }
        self.stats.tx_descriptors += descs.len() as u64;
        let segs: Vec<Seg> = descs.iter().map(Seg::from).collect();
        if total - NET_HDR_LEN > MAX_FRAME_LEN {
            self.drop_tx(
                head,
                &format!(
                    "TX frame of {} bytes exceeds {MAX_FRAME_LEN}",
                    total - NET_HDR_LEN
                ),
            );
            return Ok(());
        }

        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(total, 0);
        let mut at = 0usize;
        for s in &segs {
            mem.read_slice(&mut buf[at..at + s.len], GuestAddress(s.addr))
                .map_err(|e| format!("reading descriptor {}: {e}", s.index))?;
            at += s.len;
        }
        if self.log.is_enabled() {
            // Before the checksum is completed: the fingerprints are of guest memory.
            self.log_segs(
                TX_QUEUE,
                head,
                &segs,
                &buf,
                NET_HDR_LEN,
                Direction::DeviceReads,
            );
        }
        let hdr = NetHdr::parse(&buf[..NET_HDR_LEN]);
        let frame = &mut buf[NET_HDR_LEN..];
        let verdict = if frame.is_empty() {
            Err("empty TX frame (header only)".to_string())
        } else if u32::from(hdr.gso_type) != VIRTIO_NET_HDR_GSO_NONE {
            Err(format!(
                "TX gso_type {} but no segmentation offload was offered",
                hdr.gso_type
            ))
        } else if u32::from(hdr.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            // Completed even if CSUM was not negotiated: harmless, and the frame is
            // then still valid on the wire.
            complete_checksum(frame, hdr.csum_start, hdr.csum_offset).map(|()| {
                self.stats.csum_completed += 1;
            })
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => {
                let frame = &buf[NET_HDR_LEN..];
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
                self.capture(frame);
                self.backend.send(frame, now);
                self.log
                    .request_from_bytes(DeviceKind::Net, TX_QUEUE, head, frame, 0, tx_detail);
            }
            Err(what) => self.drop_tx(head, &what),
        }
        self.scratch = buf;
        Ok(())
    }

    fn drop_tx(&mut self, head: u16, what: &str) {
        self.stats.tx_dropped += 1;
        if self.log.is_enabled() {
            self.log
                .device_error(DeviceKind::Net, TX_QUEUE, Some(head), what, false);
            self.log.request(
                DeviceKind::Net,
                TX_QUEUE,
                head,
                RequestDetail::Net(NetRequest {
                    summary: format!("tx dropped: {what}"),
                    tcp_seq: None,
                    tcp_len: None,
                    tcp_flags: None,
                    tcp_payload_off: None,
                    tcp_ports: None,
                }),
            );
        }
    }

    /// Delivers pending frames while the guest has receive buffers.
    fn deliver_pending(&mut self, active: &mut Active) {
        if active.broken {
            return;
        }
        let mut delivered = false;
        while !self.pending.is_empty() {
            match self.deliver_front(active) {
                Ok(Delivery::Done) => {
                    delivered = true;
                    if let Some(f) = self.pending.pop_front() {
                        self.capture(&f);
                    }
                }
                Ok(Delivery::Dropped) => {
                    self.pending.pop_front();
                    self.stats.rx_dropped += 1;
                }
                Ok(Delivery::NoBuffers) => {
                    // Ask for a notification when the guest posts more buffers. With
                    // EVENT_IDX the queue writes `avail_event = next_avail`; after a
                    // partial (MRG_RXBUF) attempt next_avail was rolled back below
                    // buffers the guest already posted, and the guest would never kick
                    // for the next one. So publish the current avail index instead.
                    let mem = &active.mem;
                    let saved = active.rx.next_avail();
                    let more = active.rx.avail_idx(mem, Ordering::Acquire).and_then(|idx| {
                        active.rx.set_next_avail(idx.0);
                        active.rx.enable_notification(mem)
                    });
                    active.rx.set_next_avail(saved);
                    match more {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            fatal(active, &self.log, RX_QUEUE, None, &format!("rings: {e}"));
                            return;
                        }
                    }
                }
                Err((head, what)) => {
                    fatal(active, &self.log, RX_QUEUE, head, &what);
                    return;
                }
            }
        }
        if delivered {
            if let Err(fault) = super::signal_used(&mut active.rx, &active.mem, &active.interrupt) {
                fatal(active, &self.log, RX_QUEUE, fault.head, &fault.what);
            }
        }
    }

    /// Tries to put the front pending frame into receive buffers. Chains taken from
    /// the available ring are given back (next_avail rolled back) when they are not
    /// enough, so nothing is completed half-filled.
    fn deliver_front(&mut self, active: &mut Active) -> Result<Delivery, (Option<u16>, String)> {
        let Some(frame) = self.pending.front() else {
            return Ok(Delivery::Dropped);
        };
        let mem = &active.mem;
        let needed = NET_HDR_LEN + frame.len();
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
        let start = active.rx.next_avail();
        let avail = active
            .rx
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| (None, format!("available ring: {e}")))?;
        let mut chains: Vec<(u16, Vec<Seg>, usize)> = Vec::new();
        let mut have = 0usize;
        while have < needed {
            let head = match active.rx.iter(mem) {
                Ok(mut it) => it.next().map(|c| c.head_index()),
                Err(e) => return Err((None, format!("available ring: {e}"))),
            };
            let Some(head) = head else {
                active.rx.set_next_avail(start);
                // Every buffer the queue can hold is posted and the frame still does
                // not fit: waiting would block the queue forever.
                if (avail.0.wrapping_sub(start)) >= active.rx.size() && !chains.is_empty() {
                    self.log.device_error(
                        DeviceKind::Net,
                        RX_QUEUE,
                        None,
                        &format!(
                            "frame of {} bytes does not fit the whole receive queue ({have} bytes)",
                            frame.len()
                        ),
                        false,
                    );
                    return Ok(Delivery::Dropped);
                }
                return Ok(Delivery::NoBuffers);
            };
            let descs = walk_chain(
                mem,
                GuestAddress(active.rx.desc_table()),
                active.rx.size(),
                head,
                active.indirect,
            )
            .map_err(|e| (Some(head), e.to_string()))?;
            for d in &descs {
                if !d.writable {
                    return Err((
                        Some(head),
                        format!("device-readable descriptor {} in an RX chain", d.index),
                    ));
                }
                d.check(mem).map_err(|e| (Some(head), e.to_string()))?;
            }
            let cap: usize = descs.iter().map(|d| d.len as usize).sum();
            if !active.mrg_rxbuf && cap < needed {
                // Without MRG_RXBUF a frame must fit one chain. Keep the buffer for
                // the next (smaller) frame and drop this one.
                active.rx.set_next_avail(start);
                self.log.device_error(
                    DeviceKind::Net,
                    RX_QUEUE,
                    Some(head),
                    &format!(
                        "receive buffer of {cap} bytes cannot hold a {needed}-byte frame without MRG_RXBUF"
                    ),
                    false,
                );
                return Ok(Delivery::Dropped);
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
            chains.push((head, descs.iter().map(Seg::from).collect(), cap));
        }

        let mut hdr = [0u8; NET_HDR_LEN];
        if active.guest_csum {
            hdr[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
        }
        // num_buffers: 1 when MRG_RXBUF is off, as the spec requires.
        let nbufs = u16::try_from(chains.len()).unwrap_or(u16::MAX);
        hdr[10..12].copy_from_slice(&nbufs.to_le_bytes());
        let mut bytes = Vec::with_capacity(needed);
        bytes.extend_from_slice(&hdr);
        bytes.extend_from_slice(frame);

        let mut at = 0usize;
        for (head, segs, _) in &chains {
            let chain_start = at;
            let mut used_segs = Vec::with_capacity(segs.len());
            for s in segs {
                if at == needed {
                    break;
                }
                let n = s.len.min(needed - at);
                mem.write_slice(&bytes[at..at + n], GuestAddress(s.addr))
                    .map_err(|e| (Some(*head), format!("writing descriptor {}: {e}", s.index)))?;
                used_segs.push(Seg { len: n, ..*s });
                at += n;
            }
            if self.log.is_enabled() {
                // Header bytes only exist in the first chain.
                let hdr_here = NET_HDR_LEN.saturating_sub(chain_start);
                self.log_segs(
                    RX_QUEUE,
                    *head,
                    &used_segs,
                    &bytes[chain_start..at],
                    hdr_here,
                    Direction::DeviceWrites,
                );
            }
            let written = u32::try_from(at - chain_start).unwrap_or(u32::MAX);
            active
                .rx
                .add_used(mem, *head, written)
                .map_err(|e| (Some(*head), format!("used ring: {e}")))?;
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame.len() as u64;
        self.log.request_from_bytes(
            DeviceKind::Net,
            RX_QUEUE,
            chains[0].0,
            frame,
            u64::from(nbufs),
            rx_detail,
        );
        Ok(Delivery::Done)
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
        super::read_config_bytes(&self.config, offset, data);
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
}

/// The fields of `virtio_net_hdr_v1` the device uses.
#[derive(Debug, Clone, Copy)]
struct NetHdr {
    flags: u8,
    gso_type: u8,
    csum_start: u16,
    csum_offset: u16,
}

impl NetHdr {
    fn parse(b: &[u8]) -> Self {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            csum_start: le16(6),
            csum_offset: le16(8),
        }
    }
}

/// Folds the Internet checksum (RFC 1071) of `data` into `sum`.
fn csum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn csum_fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Completes a partial checksum (virtio 1.2, 5.1.6.2): the Internet checksum of
/// `frame[csum_start..]` is stored at `csum_start + csum_offset`. The field holds the
/// driver's pseudo-header sum on entry, which is how it gets folded in.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), String> {
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if start >= frame.len() || field + 2 > frame.len() {
        return Err(format!(
            "TX NEEDS_CSUM with csum_start {csum_start} + csum_offset {csum_offset} outside the {}-byte frame",
            frame.len()
        ));
    }
    let sum = !csum_fold(csum_add(0, &frame[start..]));
    // RFC 768/793 transmit 0 as all ones only for UDP; for TCP 0 is fine, and Linux
    // devices store the folded value unchanged.
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests;
