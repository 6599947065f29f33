//! The VMM's side of a TCP send, without KVM: what the device thread, the TCP peer,
//! the DMA log's producer side and its writer thread cost per 4 KiB the guest sends.
//!
//! The real virtio-net device ([`Net`]) runs on `vm-memory` guest memory, with its
//! real in-VMM TCP peer ([`NetPeer`], which checks every byte against the file it
//! expects) and a zstd DMA log (`.jsonl.zst`, as `zc-vmm methods` writes). The guest
//! is a `smoltcp` TCP client whose NIC driver is written here: it puts each frame it
//! transmits on the TX queue and kicks, takes frames from the used RX ring and posts
//! the buffers again, as Linux's `virtio_net` does, in the two ways the two NIC
//! variants get frames from Linux:
//! - `sg-on` (`VIRTIO_NET_F_CSUM` acked): a TCP frame is two descriptors, the
//!   12-byte `virtio_net_hdr` and the frame's headers in one buffer, the payload in
//!   another, with `NEEDS_CSUM` (the TCP checksum field holds the pseudo-header sum,
//!   the device completes it);
//! - `sg-off`: one linear buffer, header and frame, checksum done by the guest.
//!
//! `cargo run --release -p zc-devices --example net_send_cost -- [sg-on|sg-off]
//! [MIB] [LOG] [--kick-every N]` sends MIB MiB (default 16) and exits 0 only if the
//! peer received and verified every byte; LOG is the DMA log (default a temporary
//! `dma.jsonl.zst`; `off` for no log). Under `valgrind --tool=callgrind
//! --separate-threads=yes` it gives the instruction counts of `docs/dma-log.md`
//! ("The VMM's share of a TCP send"); `scripts/net-send-cost` runs both variants and
//! splits the counts per component.
//!
//! The NetBackend wrapper [`Measured`] only forwards to the peer, through calls
//! that are never inlined, so that the peer's share is one function in a profile.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use zc_devices::dma_log::DmaLog;
use zc_devices::net_peer::{Expectation, NetPeer, NetPeerConfig, Received};
use zc_devices::virtio::net::{
    Net, NetBackend, NetOptions, DEFAULT_GUEST_MAC, NET_HDR_LEN, RX_QUEUE, TX_QUEUE,
};
use zc_devices::virtio::{
    GuestMem, InterruptKind, InterruptLine, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Entries per queue (the device's default, what Linux sets up).
const QSIZE: u16 = 256;
/// Guest RAM.
const MEM_LEN: usize = 16 << 20;
/// Where the rings are: RX descriptor table, available ring, used ring; then TX.
const RX_RINGS: [u64; 3] = [0x0, 0x1000, 0x2000];
const TX_RINGS: [u64; 3] = [0x4000, 0x5000, 0x6000];
/// Receive buffers, one of [`BUF_LEN`] per RX descriptor.
const RX_BUFS: u64 = 0x10_0000;
/// TX header buffers (sg-on: the virtio-net header and the frame's headers).
const TX_HEADERS: u64 = 0x20_0000;
/// TX data buffers (sg-on: the payload; sg-off: the whole frame).
const TX_DATA: u64 = 0x40_0000;
/// Every buffer's size: a 1514-byte frame and the header fit.
const BUF_LEN: u32 = 2048;
/// The guest's and the peer's IP MTU: full-MSS frames are 1514 bytes.
const MTU: usize = 1500;
const GUEST_PORT: u16 = 40_000;
#[allow(clippy::cast_possible_truncation, reason = "the flag is 1")]
const DESC_NEXT: u16 = VRING_DESC_F_NEXT as u16;
#[allow(clippy::cast_possible_truncation, reason = "the flag is 2")]
const DESC_WRITE: u16 = VRING_DESC_F_WRITE as u16;
#[allow(clippy::cast_possible_truncation, reason = "the flag is 1")]
const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
#[allow(clippy::cast_possible_truncation, reason = "the flag is 1")]
const USED_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;

/// The peer, behind calls that are never inlined: one symbol per entry point for a
/// profile to attribute the peer's work to (a few instructions per call).
struct Measured(NetPeer);

impl NetBackend for Measured {
    #[inline(never)]
    fn send(&mut self, frame: &[u8], now: Instant) {
        self.0.receive_frame(frame, now);
    }
    #[inline(never)]
    fn poll(&mut self, now: Instant) {
        self.0.poll(now);
    }
    #[inline(never)]
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        NetBackend::take_for_guest(&mut self.0, out);
    }
    #[inline(never)]
    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.0.poll_delay(now)
    }
}

/// The guest's interrupt line: counts, the driver polls its used rings anyway.
#[derive(Default)]
struct CountingLine(AtomicU64);

impl InterruptLine for CountingLine {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The driver's view of one split virtqueue in guest memory.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    /// The next available index the driver publishes.
    avail_idx: u16,
    /// Used entries the driver has consumed.
    used_seen: u16,
}

impl Ring {
    fn new([desc, avail, used]: [u64; 3]) -> Self {
        Ring {
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's queue over these rings.
    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).expect("a valid queue size");
        q.set_size(QSIZE);
        let lo_hi = |a: u64| (Some(low32(a)), Some(low32(a >> 32)));
        let (l, h) = lo_hi(self.desc);
        q.set_desc_table_address(l, h);
        let (l, h) = lo_hi(self.avail);
        q.set_avail_ring_address(l, h);
        let (l, h) = lo_hi(self.used);
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        q
    }

    fn set_desc(&self, mem: &GuestMem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.desc + 16 * u64::from(i);
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    fn publish(&mut self, mem: &GuestMem, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The next used entry `(id, len)`, if the device added one.
    fn take_used(&mut self, mem: &GuestMem) -> Option<(u16, u32)> {
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        if idx == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u16::try_from(id).expect("a descriptor index"), len))
    }

    /// Whether the device asks to be notified (no EVENT_IDX: the used ring's flag).
    fn wants_kick(&self, mem: &GuestMem) -> bool {
        let flags = u16::from_le(mem.read_obj(GuestAddress(self.used)).unwrap());
        flags & USED_NO_NOTIFY == 0
    }
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

/// What the driver counted.
#[derive(Debug, Default, Clone, Copy)]
struct DriverStats {
    tx_frames: u64,
    tx_kicks: u64,
    rx_frames: u64,
    rx_kicks: u64,
}

/// The guest's virtio-net driver and NIC: smoltcp's `phy::Device` over the device's
/// queues.
struct Driver {
    mem: GuestMem,
    dev: Net<Measured>,
    sg: bool,
    rx: Ring,
    tx: Ring,
    /// TX slots free (a slot is one descriptor sg-off, two sg-on).
    tx_free: Vec<u16>,
    rx_frames: VecDeque<Vec<u8>>,
    /// Frames published since the last kick.
    unkicked: usize,
    kick_every: usize,
    stats: DriverStats,
}

impl Driver {
    fn slots(sg: bool) -> u16 {
        if sg {
            QSIZE / 2
        } else {
            QSIZE
        }
    }

    /// Takes back sent TX buffers and received frames, posts the receive buffers
    /// again and kicks RX when the device wants it. Whether anything came back.
    fn reap(&mut self) -> bool {
        let mut any = false;
        while let Some((head, _)) = self.tx.take_used(&self.mem) {
            self.tx_free.push(if self.sg { head / 2 } else { head });
            any = true;
        }
        let mut reposted = false;
        while let Some((head, len)) = self.rx.take_used(&self.mem) {
            let len = usize::try_from(len).expect("a buffer length");
            let mut frame = vec![0u8; len - NET_HDR_LEN];
            let buf = RX_BUFS + u64::from(head) * u64::from(BUF_LEN);
            self.mem
                .read_slice(&mut frame, GuestAddress(buf + NET_HDR_LEN as u64))
                .unwrap();
            self.rx_frames.push_back(frame);
            self.rx.publish(&self.mem, head);
            self.stats.rx_frames += 1;
            reposted = true;
            any = true;
        }
        if reposted && self.rx.wants_kick(&self.mem) {
            self.stats.rx_kicks += 1;
            self.dev.process_queue(RX_QUEUE);
        }
        any
    }

    fn kick_tx(&mut self) {
        if self.unkicked > 0 && self.tx.wants_kick(&self.mem) {
            self.stats.tx_kicks += 1;
            self.dev.process_queue(TX_QUEUE);
        }
        self.unkicked = 0;
    }

    /// Puts `frame` on the TX queue in the variant's layout.
    fn transmit(&mut self, frame: &mut [u8]) {
        let slot = self.tx_free.pop().expect("transmit() said a slot is free");
        let mut hdr = [0u8; NET_HDR_LEN];
        if self.sg {
            let head = slot * 2;
            // Linux: the header goes in front of the frame's headers, the payload is
            // a fragment of its own (a page-cache page for sendfile).
            let (split, csum) = tcp_layout(frame);
            if let Some((start, offset)) = csum {
                hdr[0] = NEEDS_CSUM;
                hdr[6..8].copy_from_slice(&start.to_le_bytes());
                hdr[8..10].copy_from_slice(&offset.to_le_bytes());
            }
            let head_buf = TX_HEADERS + u64::from(slot) * u64::from(BUF_LEN);
            self.mem.write_slice(&hdr, GuestAddress(head_buf)).unwrap();
            self.mem
                .write_slice(&frame[..split], GuestAddress(head_buf + NET_HDR_LEN as u64))
                .unwrap();
            let head_len = u32::try_from(NET_HDR_LEN + split).unwrap();
            if split < frame.len() {
                let data_buf = TX_DATA + u64::from(slot) * u64::from(BUF_LEN);
                self.mem
                    .write_slice(&frame[split..], GuestAddress(data_buf))
                    .unwrap();
                let data_len = u32::try_from(frame.len() - split).unwrap();
                self.tx
                    .set_desc(&self.mem, head, head_buf, head_len, DESC_NEXT, head + 1);
                self.tx
                    .set_desc(&self.mem, head + 1, data_buf, data_len, 0, 0);
            } else {
                self.tx.set_desc(&self.mem, head, head_buf, head_len, 0, 0);
            }
            self.tx.publish(&self.mem, head);
        } else {
            let buf = TX_DATA + u64::from(slot) * u64::from(BUF_LEN);
            self.mem.write_slice(&hdr, GuestAddress(buf)).unwrap();
            self.mem
                .write_slice(frame, GuestAddress(buf + NET_HDR_LEN as u64))
                .unwrap();
            let len = u32::try_from(NET_HDR_LEN + frame.len()).unwrap();
            self.tx.set_desc(&self.mem, slot, buf, len, 0, 0);
            self.tx.publish(&self.mem, slot);
        }
        self.stats.tx_frames += 1;
        self.unkicked += 1;
        if self.unkicked >= self.kick_every {
            self.kick_tx();
        }
    }
}

/// Where an IPv4 TCP frame's headers end, and for a TCP frame `(csum_start,
/// csum_offset)` after putting the pseudo-header sum in its checksum field (what
/// Linux hands a NIC that completes checksums). Other frames: whole, no offload.
fn tcp_layout(frame: &mut [u8]) -> (usize, Option<(u16, u16)>) {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH + 9] != 6 {
        return (frame.len(), None);
    }
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let tcp = ETH + ihl;
    let doff = usize::from(frame[tcp + 12] >> 4) * 4;
    let total = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    let tcp_len = total - ihl;
    let mut sum: u32 = 6 + u32::try_from(tcp_len).unwrap();
    for w in frame[ETH + 12..ETH + 20].chunks_exact(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let pseudo = u16::try_from(sum).unwrap();
    frame[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
    let start = u16::try_from(tcp).unwrap();
    (tcp + doff, Some((start, 16)))
}

impl phy::Device for Driver {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.tx_free.is_empty() {
            return None;
        }
        let frame = self.rx_frames.pop_front()?;
        Some((RxToken(frame), TxToken(self)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (!self.tx_free.is_empty()).then_some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU + 14;
        if self.sg {
            // The device completes TCP checksums (NEEDS_CSUM) and vouches for
            // received ones (DATA_VALID).
            let mut c = ChecksumCapabilities::default();
            c.tcp = Checksum::None;
            caps.checksum = c;
        }
        caps
    }
}

struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

struct TxToken<'a>(&'a mut Driver);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        self.0.transmit(&mut frame);
        r
    }
}

/// What a send did.
#[derive(Debug)]
pub struct SendOutcome {
    /// The peer's record of the connection.
    pub received: Received,
    driver: DriverStats,
    interrupts: u64,
    tx_descriptors: u64,
    backend_polls: u64,
    elapsed: Duration,
}

/// Sends `len` bytes over the device (`sg`: the sg-on variant) to the peer, logging
/// to `log`, and returns what the peer recorded. Fails if the peer did not get and
/// verify every byte.
pub fn send(sg: bool, len: usize, log: DmaLog, kick_every: usize) -> Result<SendOutcome, String> {
    let payload = payload(len);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let source = dir.path().join("payload");
    std::fs::write(&source, &payload).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let mut peer = NetPeer::new(NetPeerConfig::default(), start).map_err(|e| e.to_string())?;
    peer.expect(Expectation::of_file("net_send_cost", &source).map_err(|e| e.to_string())?);
    let opts = NetOptions {
        sg,
        ..NetOptions::default()
    };
    let mut dev = Net::new(Measured(peer), opts, log).map_err(|e| e.to_string())?;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_LEN)]).map_err(|e| e.to_string())?;
    let line = Arc::new(CountingLine::default());
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    // What Linux acks: everything offered but EVENT_IDX and indirect descriptors,
    // which this driver does without.
    let features = dev.features() | VIRTIO_F_VERSION_1;
    assert_eq!(features & (1 << VIRTIO_NET_F_CSUM) != 0, sg);
    assert!(features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0);
    let rx = Ring::new(RX_RINGS);
    let tx = Ring::new(TX_RINGS);
    dev.activate(mem.clone(), vec![rx.queue(), tx.queue()], irq, features)
        .map_err(|e| e.to_string())?;

    let mut driver = Driver {
        mem,
        dev,
        sg,
        rx,
        tx,
        tx_free: (0..Driver::slots(sg)).rev().collect(),
        rx_frames: VecDeque::new(),
        unkicked: 0,
        kick_every,
        stats: DriverStats::default(),
    };
    for i in 0..QSIZE {
        let buf = RX_BUFS + u64::from(i) * u64::from(BUF_LEN);
        driver
            .rx
            .set_desc(&driver.mem, i, buf, BUF_LEN, DESC_WRITE, 0);
        driver.rx.publish(&driver.mem, i);
    }
    driver.dev.process_queue(RX_QUEUE);

    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(
        DEFAULT_GUEST_MAC,
    )));
    config.random_seed = 0x0067_7565_7374;
    let mut clock = smoltcp::time::Instant::from_micros(0);
    let mut iface = Interface::new(config, &mut driver, clock);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24))
            .unwrap();
    });
    let mut sockets = SocketSet::new(Vec::new());
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 << 10]),
        tcp::SocketBuffer::new(vec![0; 64 << 10]),
    );
    let handle = sockets.add(socket);
    let peer_ip = Ipv4Address::new(10, 0, 2, 2);
    sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(iface.context(), (peer_ip, 7878), GUEST_PORT)
        .map_err(|e| e.to_string())?;

    let mut sent = 0usize;
    let mut count = Vec::new();
    let mut closed = false;
    let mut backend_polls = 0u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let received = loop {
        clock += smoltcp::time::Duration::from_micros(50);
        let before = driver.stats;
        let reaped = driver.reap();
        iface.poll(clock, &mut driver, &mut sockets);
        driver.kick_tx();
        let socket = sockets.get_mut::<tcp::Socket>(handle);
        if sent < len && socket.can_send() {
            sent += socket
                .send_slice(&payload[sent..])
                .map_err(|e| e.to_string())?;
        }
        if socket.can_recv() {
            socket
                .recv(|b| {
                    count.extend_from_slice(b);
                    (b.len(), ())
                })
                .map_err(|e| e.to_string())?;
        }
        if !closed && count.len() >= zc_protocol::ack::ACK_LEN {
            socket.close();
            closed = true;
        }
        if let Some(r) = driver.dev.backend().0.results().first() {
            break r.clone();
        }
        let stuck = !reaped
            && driver.stats.tx_frames == before.tx_frames
            && driver.stats.rx_frames == before.rx_frames;
        if stuck {
            // The guest waits for the peer (a delayed ACK): the VMM's timer thread.
            let delay = driver.dev.next_poll_delay(Instant::now());
            std::thread::sleep(
                delay
                    .unwrap_or(Duration::from_millis(1))
                    .min(Duration::from_millis(20)),
            );
            driver.dev.poll_backend(Instant::now());
            backend_polls += 1;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no result from the peer after 600 s ({sent} of {len} bytes given to the socket)"
            ));
        }
    };
    let elapsed = start.elapsed();
    if !received.ok() || received.bytes != len as u64 || received.content_ok != Some(true) {
        return Err(format!("the peer did not verify every byte: {received:?}"));
    }
    let ack: [u8; zc_protocol::ack::ACK_LEN] = count
        .as_slice()
        .try_into()
        .map_err(|_| format!("the peer's count is {} bytes", count.len()))?;
    let acked = zc_protocol::ack::decode(ack);
    if acked != len as u64 {
        return Err(format!("the peer counted {acked} bytes of {len}"));
    }
    let stats = driver.dev.stats();
    Ok(SendOutcome {
        received,
        driver: driver.stats,
        interrupts: line.0.load(Ordering::Relaxed),
        tx_descriptors: stats.tx_descriptors,
        backend_polls,
        elapsed,
    })
}

/// `len` bytes of xorshift noise, page-unique as the test disk's files are.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn usage() -> ! {
    eprintln!("usage: net_send_cost [sg-on|sg-off] [MIB] [LOG|off] [--kick-every N]");
    std::process::exit(2);
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut kick_every = 1usize;
    if let Some(i) = args.iter().position(|a| a == "--kick-every") {
        kick_every = args
            .get(i + 1)
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage());
        args.drain(i..i + 2);
    }
    let sg = match args.first().map(String::as_str) {
        None | Some("sg-on") => true,
        Some("sg-off") => false,
        Some(_) => usage(),
    };
    let mib: usize = match args.get(1) {
        None => 16,
        Some(m) => m.parse().ok().filter(|&m| m > 0).unwrap_or_else(|| usage()),
    };
    let tmp = tempfile::tempdir().unwrap();
    let log_path = match args.get(2).map(String::as_str) {
        Some("off") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(tmp.path().join("dma.jsonl.zst")),
    };
    let log = match &log_path {
        Some(p) => DmaLog::create(p).unwrap_or_else(|e| {
            eprintln!("net_send_cost: {e}");
            std::process::exit(2)
        }),
        None => DmaLog::disabled(),
    };
    let outcome = match send(sg, mib << 20, log.clone(), kick_every) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("net_send_cost: FAILED: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = log.flush() {
        eprintln!("net_send_cost: FAILED: the DMA log: {e}");
        std::process::exit(1);
    }
    drop(log);
    let log_bytes = log_path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let o = outcome;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} {} MiB verified by the peer in {:.2} s: {} TX frames ({} descriptors), {} TX kicks, {} RX frames, {} RX kicks, {} interrupts, {} timer polls; DMA log {} bytes ({:.0} per 4 KiB)",
        if sg { "sg-on" } else { "sg-off" },
        mib,
        o.elapsed.as_secs_f64(),
        o.driver.tx_frames,
        o.tx_descriptors,
        o.driver.tx_kicks,
        o.driver.rx_frames,
        o.driver.rx_kicks,
        o.interrupts,
        o.backend_polls,
        log_bytes,
        log_bytes as f64 / (o.received.bytes as f64 / 4096.0),
    )
    .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both variants carry a stream the peer verifies, with the log on; 1 MiB
    /// crosses the rings' wrap many times.
    #[test]
    fn both_variants_deliver_every_byte() {
        for sg in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let log = DmaLog::create(&dir.path().join("dma.jsonl.zst")).unwrap();
            let o = send(sg, 1 << 20, log.clone(), 1).unwrap();
            log.flush().unwrap();
            assert_eq!(o.received.bytes, 1 << 20);
            // Full-MSS frames: at least 1 MiB / 1460 data frames.
            assert!(o.driver.tx_frames >= (1 << 20) / 1460, "{o:?}");
            let per_frame = if sg { 2 } else { 1 };
            assert!(o.tx_descriptors >= per_frame * ((1 << 20) / 1460), "{o:?}");
        }
    }

    /// An sg-on TCP frame: headers and payload split where the TCP header ends, the
    /// checksum field holding the pseudo-header sum, as Linux leaves it.
    #[test]
    fn tcp_layout_puts_the_pseudo_header_sum() {
        // IPv4/TCP, 10.0.2.15 -> 10.0.2.2, 20-byte TCP header, 4 payload bytes.
        let mut f = vec![0u8; 14 + 20 + 20 + 4];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&44u16.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 2, 15]);
        f[30..34].copy_from_slice(&[10, 0, 2, 2]);
        f[46] = 0x50;
        let (split, csum) = tcp_layout(&mut f);
        assert_eq!(split, 54);
        assert_eq!(csum, Some((34, 16)));
        // 10.0 + 2.15 + 10.0 + 2.2 + proto 6 + TCP length 24.
        let want: u32 = 0x0a00 + 0x020f + 0x0a00 + 0x0202 + 6 + 24;
        assert_eq!(u32::from(u16::from_be_bytes([f[50], f[51]])), want);
    }
}
