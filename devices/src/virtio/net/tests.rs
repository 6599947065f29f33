//! virtio-net tests on `virtio-queue`'s `MockSplitQueue`, with a fake backend and,
//! end to end, the real [`NetPeer`].

use super::*;
use crate::dma_log::{
    fingerprint, DescRecord, DescRole, Direction, NetRequest, Record, RequestDetail, RequestRecord,
};
use crate::net_peer::{NetPeerConfig, DEFAULT_MAC as PEER_MAC};
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_util::{
    add_chain, assert_writes_offered, counting_interrupt, leaked_memory, len32, mmio_activate,
    mock_rings, raw, read_reg, used, within, write_reg, Capture, CountingLine, MockQueue, TestLog,
    NEXT, W,
};
use crate::virtio::write_check::QueueRings;
use crate::virtio::{low32, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use rstest::rstest;
use smoltcp::wire::{IpAddress, Ipv4Packet, TcpPacket};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const QSIZE: u16 = 16;
const MEM_SIZE: u64 = 0x40_0000;
/// The mock places its used ring overlapping the available ring; move them here.
const USED_RX: u64 = 0x8000;
const USED_TX: u64 = 0x9000;
const DATA: u64 = 0x2_0000;
const RXBUF: u64 = 0x10_0000;
const SG: u64 = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
const BASE: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC;
const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
const GUEST_MAC: [u8; 6] = DEFAULT_GUEST_MAC;

/// Records what the device sends; hands out whatever the test queued.
#[derive(Default)]
struct Fake {
    sent: Vec<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
    polls: usize,
}

impl NetBackend for Fake {
    fn send(&mut self, frame: &[u8], _now: Instant) {
        self.sent.push(frame.to_vec());
    }
    fn poll(&mut self, _now: Instant) {
        self.polls += 1;
    }
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        out.extend(self.to_guest.drain(..));
    }
    fn poll_delay(&mut self, _now: Instant) -> Option<Duration> {
        Some(Duration::from_millis(7))
    }
}

struct H<B: NetBackend> {
    mem: &'static GuestMemoryMmap,
    dev: Net<B>,
    line: Arc<CountingLine>,
    irq: Arc<VirtioInterrupt>,
    log: TestLog,
    rxq: MockQueue,
    txq: MockQueue,
}

fn harness<B: NetBackend>(backend: B, opts: NetOptions) -> H<B> {
    let log = TestLog::new();
    let dev = Net::new(backend, opts, log.dma.clone()).unwrap();
    let (line, irq) = counting_interrupt();
    let mem = leaked_memory(MEM_SIZE);
    H {
        mem,
        dev,
        line,
        irq,
        log,
        rxq: MockQueue::create(mem, GuestAddress(0), QSIZE),
        txq: MockQueue::create(mem, GuestAddress(0x1000), QSIZE),
    }
}

fn fake(opts: NetOptions) -> H<Fake> {
    harness(Fake::default(), opts)
}

impl<B: NetBackend> H<B> {
    fn activate(&mut self, features: u64) {
        let mut rx: Queue = self.rxq.create_queue().unwrap();
        let mut tx: Queue = self.txq.create_queue().unwrap();
        rx.set_used_ring_address(Some(low32(USED_RX)), Some(0));
        tx.set_used_ring_address(Some(low32(USED_TX)), Some(0));
        rx.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        tx.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.dev
            .activate(self.mem.clone(), vec![rx, tx], self.irq.clone(), features)
            .unwrap();
    }

    fn records(&self) -> Vec<Record> {
        self.log.records()
    }

    fn rings(&self) -> [QueueRings; 2] {
        [
            mock_rings(&self.rxq, QSIZE, USED_RX),
            mock_rings(&self.txq, QSIZE, USED_TX),
        ]
    }

    /// The driver's notify of `queue`: the device must write only the device-writable
    /// buffers of the chains offered and the used rings.
    fn process(&mut self, queue: u16) {
        let rings = self.rings();
        let dev = &mut self.dev;
        assert_writes_offered(self.mem, &rings, || dev.process_queue(queue));
    }

    /// The VMM's backend timer: frames for the guest go to the receive buffers
    /// offered, and nowhere else.
    fn poll(&mut self) {
        let rings = self.rings();
        let dev = &mut self.dev;
        assert_writes_offered(self.mem, &rings, || dev.poll_backend(Instant::now()));
    }

    fn descs(&self, queue: u16) -> Vec<DescRecord> {
        let mut d = self.log.descs();
        d.retain(|d| d.queue == queue);
        d
    }

    fn requests(&self, queue: u16) -> Vec<NetRequest> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Request(RequestRecord {
                    queue: q,
                    req: RequestDetail::Net(n),
                    ..
                }) if q == queue => Some(n),
                _ => None,
            })
            .collect()
    }

    fn errors(&self) -> Vec<(String, bool)> {
        self.log.errors()
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        crate::virtio::test_util::read(self.mem, addr, len)
    }

    /// Posts `n` single-descriptor receive chains of `len` bytes at table index
    /// `start`, buffers at `RXBUF + 0x1000 * i`.
    fn post_rx(&self, start: u16, n: u16, len: u32) {
        let raws: Vec<_> = (0..n)
            .map(|i| raw(RXBUF + 0x1000 * u64::from(start + i), len, W, 0))
            .collect();
        self.rxq.add_desc_chains(&raws, start).unwrap();
    }

    fn assert_needs_reset(&self, queue: u16, what: &str) {
        assert!(self.irq.needs_reset(), "needs reset for {what}");
        assert_eq!(self.line.config_count(), 1);
        let errs = self.errors();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].1);
        assert!(
            errs[0].0.contains(what),
            "{:?} should mention {what:?}",
            errs[0].0
        );
        let rec = self
            .records()
            .into_iter()
            .find_map(|r| match r {
                Record::DeviceError(e) => Some(e),
                _ => None,
            })
            .unwrap();
        assert_eq!(rec.queue, queue);
    }
}

fn net_hdr(flags: u32, gso: u8, csum_start: u16, csum_offset: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = u8::try_from(flags).unwrap();
    h[1] = gso;
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const PEER_IP: [u8; 4] = [10, 0, 2, 2];

/// An Ethernet/IPv4/TCP frame guest -> peer with `payload`, seq 1000, valid IP
/// checksum and a TCP checksum field holding `tcp_csum`.
fn tcp_frame(payload: &[u8], tcp_csum: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + 20 + payload.len()).unwrap();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&PEER_IP);
    let c = !csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&7878u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH | ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp[16..18].copy_from_slice(&tcp_csum.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

/// The pseudo-header partial sum Linux leaves in the TCP checksum field for
/// CHECKSUM_PARTIAL (folded, not complemented).
fn pseudo_sum(tcp_len: usize) -> u16 {
    let mut p = Vec::new();
    p.extend_from_slice(&GUEST_IP);
    p.extend_from_slice(&PEER_IP);
    p.extend_from_slice(&[0, 6]);
    p.extend_from_slice(&u16::try_from(tcp_len).unwrap().to_be_bytes());
    csum_fold(csum_add(0, &p))
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 + 7).to_le_bytes()[0]).collect()
}

fn tcp_checksum_ok(frame: &[u8]) -> bool {
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    tcp.verify_checksum(
        &IpAddress::Ipv4(ip.src_addr()),
        &IpAddress::Ipv4(ip.dst_addr()),
    )
}

/// The Internet checksum (RFC 1071) of `data` folded into `sum`, 16-bit
/// big-endian words one by one: the definition, to check the device's against.
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
    u16::try_from(sum).unwrap()
}

// ---------------------------------------------------------------- features, config

#[test]
fn features_follow_the_sg_option() {
    let on = Net::new(Fake::default(), NetOptions::default(), DmaLog::disabled()).unwrap();
    let always = bit(VIRTIO_NET_F_MAC) | MRG | bit(VIRTIO_NET_F_STATUS);
    assert_eq!(on.features(), always | SG);
    let off = Net::new(
        Fake::default(),
        NetOptions {
            sg: false,
            ..NetOptions::default()
        },
        DmaLog::disabled(),
    )
    .unwrap();
    assert_eq!(off.features(), always);
    assert_eq!(off.features() & bit(VIRTIO_NET_F_HOST_TSO4), 0);
    assert_eq!(on.device_type(), VIRTIO_ID_NET);
    assert_eq!(on.queue_max_sizes(), &[256, 256]);
    // The transport adds VERSION_1 and the ring features.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let t = MmioTransport::new(off, mem, Arc::new(CountingLine::default()));
    assert_eq!(
        t.device_features(),
        always | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
    );
}

#[test]
fn bad_options_are_refused() {
    let q = |queue_size| NetOptions {
        queue_size,
        ..NetOptions::default()
    };
    for bad in [0, 3, 65535] {
        assert!(matches!(
            Net::new(Fake::default(), q(bad), DmaLog::disabled()),
            Err(NetError::QueueSize(_))
        ));
    }
    let p = NetOptions {
        max_pending: 0,
        ..NetOptions::default()
    };
    assert!(Net::new(Fake::default(), p, DmaLog::disabled()).is_err());
}

#[test]
fn config_space_layout() {
    let mac = [0x02, 1, 2, 3, 4, 5];
    let dev = Net::new(
        Fake::default(),
        NetOptions {
            mac,
            ..NetOptions::default()
        },
        DmaLog::disabled(),
    )
    .unwrap();
    let mut c = [0xffu8; 16];
    dev.read_config(0, &mut c);
    assert_eq!(&c[0..6], &mac);
    assert_eq!(
        u32::from(u16::from_le_bytes([c[6], c[7]])),
        VIRTIO_NET_S_LINK_UP
    );
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1); // max_virtqueue_pairs
    assert_eq!(&c[10..16], &[0; 6]); // no mtu, nothing beyond
    let mut s = [0u8; 2];
    dev.read_config(6, &mut s);
    assert_eq!(s, [1, 0]);
}

// ---------------------------------------------------------------- TX

#[test]
fn tx_frame_scattered_over_descriptors_arrives_intact_and_is_logged() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG);
    let data = payload(1400);
    let frame = tcp_frame(&data, 0x1234);
    // Header alone; Ethernet+IP+TCP headers; payload split over two descriptors, the
    // first crossing a page boundary (like skb frags in page-cache pages).
    let hdr = net_hdr(0, 0, 0, 0);
    let (a, b, c, d) = (DATA, DATA + 0x100, DATA + 0x1f00, DATA + 0x5000);
    h.write(a, &hdr);
    h.write(b, &frame[..54]);
    h.write(c, &frame[54..54 + 600]);
    h.write(d, &frame[54 + 600..]);
    add_chain(
        &h.txq,
        0,
        &[(a, 12, 0), (b, 54, 0), (c, 600, 0), (d, 800, 0)],
    );
    h.process(TX_QUEUE);
    assert_eq!(h.dev.backend().sent, vec![frame.clone()]);
    assert_eq!(used(h.mem, USED_TX), vec![(0, 0)]);
    assert_eq!(h.line.queue_count(), 1);
    assert!(h.dev.backend().polls >= 1, "backend polled after the batch");

    let descs = h.descs(TX_QUEUE);
    let got: Vec<_> = descs
        .iter()
        .map(|d| (d.desc, d.gpa, d.len, d.role, d.dir))
        .collect();
    let r = Direction::DeviceReads;
    assert_eq!(
        got,
        vec![
            (0, a, 12, DescRole::Header, r),
            (1, b, 54, DescRole::Data, r),
            (2, c, 600, DescRole::Data, r),
            (3, d, 800, DescRole::Data, r),
        ]
    );
    // Fingerprints are of the frame bytes at their guest addresses, per page piece.
    let mut off = 0usize;
    for d in &descs[1..] {
        for p in &d.pieces {
            let want = fingerprint(&frame[off..off + p.len as usize]);
            assert_eq!(p.hash.0, want, "piece at {:#x}", p.gpa);
            off += p.len as usize;
        }
    }
    assert_eq!(off, frame.len());
    assert_eq!(descs[2].pieces.len(), 2, "crosses a page boundary");
    assert_eq!((descs[2].pieces[0].gpa, descs[2].pieces[0].len), (c, 0x100));
    let reqs = h.requests(TX_QUEUE);
    assert_eq!(reqs.len(), 1);
    assert_eq!((reqs[0].tcp_seq, reqs[0].tcp_len), (Some(1000), Some(1400)));
    assert!(
        reqs[0]
            .summary
            .starts_with("tx tcp 10.0.2.15:40000>10.0.2.2:7878"),
        "{}",
        reqs[0].summary
    );
    assert_eq!(h.dev.stats().tx_descriptors, 4);
    assert_eq!(h.dev.stats().tx_bytes, frame.len() as u64);
}

#[test]
fn header_sharing_a_descriptor_with_the_frame_gives_two_records() {
    // Linux pushes the header into the skb's headroom: one descriptor holds both.
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    let frame = tcp_frame(&payload(100), 0);
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&frame);
    h.write(DATA + 0xff0, &buf);
    add_chain(&h.txq, 0, &[(DATA + 0xff0, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert_eq!(h.dev.backend().sent, vec![frame.clone()]);
    let descs = h.descs(TX_QUEUE);
    assert_eq!(descs.len(), 2);
    assert_eq!(
        (descs[0].role, descs[0].gpa, descs[0].len),
        (DescRole::Header, DATA + 0xff0, 12)
    );
    assert_eq!(
        (descs[1].role, descs[1].gpa, descs[1].len),
        (DescRole::Data, DATA + 0xffc, len32(&frame))
    );
    assert_eq!(descs[1].desc, 0);
    // 4 bytes before the page boundary, the rest after.
    assert_eq!(descs[1].pieces[0].len, 4);
    assert_eq!(descs[1].pieces[0].hash.0, fingerprint(&frame[..4]));
    assert_eq!(descs[1].pieces[1].hash.0, fingerprint(&frame[4..]));
}

#[test]
fn several_chains_in_one_batch_one_interrupt() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    for i in 0..3u16 {
        let mut buf = net_hdr(0, 0, 0, 0).to_vec();
        buf.extend_from_slice(&tcp_frame(&payload(10 + usize::from(i)), 0));
        let addr = DATA + 0x1000 * u64::from(i);
        h.write(addr, &buf);
        add_chain(&h.txq, i, &[(addr, len32(&buf), 0)]);
    }
    h.process(TX_QUEUE);
    assert_eq!(h.dev.backend().sent.len(), 3);
    assert_eq!(used(h.mem, USED_TX), vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(h.line.queue_count(), 1);
    assert_eq!(h.requests(TX_QUEUE).len(), 3);
}

#[test]
fn partial_checksum_is_completed() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    let data = payload(1001); // odd length: the last byte is padded
    let frame = tcp_frame(&data, pseudo_sum(20 + data.len()));
    assert!(!tcp_checksum_ok(&frame));
    let hdr = net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 34, 16);
    h.write(DATA, &hdr);
    h.write(DATA + 0x100, &frame[..54]);
    h.write(DATA + 0x1000, &frame[54..]);
    add_chain(
        &h.txq,
        0,
        &[
            (DATA, 12, 0),
            (DATA + 0x100, 54, 0),
            (DATA + 0x1000, len32(&data), 0),
        ],
    );
    h.process(TX_QUEUE);
    let sent = &h.dev.backend().sent;
    assert_eq!(sent.len(), 1);
    assert!(
        tcp_checksum_ok(&sent[0]),
        "TCP checksum valid after completion"
    );
    assert_eq!(sent[0][..50], frame[..50]);
    assert_eq!(sent[0][52..], frame[52..]);
    assert_eq!(h.dev.stats().csum_completed, 1);
    // The log fingerprints guest memory (checksum field as the guest left it).
    let d = &h.descs(TX_QUEUE)[1];
    assert_eq!(d.pieces[0].hash.0, fingerprint(&frame[..54]));
}

/// The request summarises the frame as sent, even when the checksum the device
/// completed lies where the summary reads (a driver chooses `csum_offset`; here it
/// points at the TCP sequence number), while the `desc` records fingerprint the
/// bytes as read: the summary comes from the read's copy with the field patched.
#[test]
fn the_request_describes_the_frame_as_sent() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    let data = payload(100);
    let frame = tcp_frame(&data, 0);
    // csum_start 34 (the TCP header), offset 4: the sequence number's first 2 bytes.
    let mut buf = net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 34, 4).to_vec();
    buf.extend_from_slice(&frame);
    h.write(DATA, &buf);
    add_chain(&h.txq, 0, &[(DATA, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    let sent = h.dev.backend().sent[0].clone();
    assert_ne!(sent[38..40], frame[38..40], "the field was rewritten");
    let seq_sent = u32::from_be_bytes(sent[38..42].try_into().unwrap());
    let req = &h.requests(TX_QUEUE)[0];
    assert_eq!(req.tcp_seq, Some(seq_sent), "{req:?}");
    assert!(req.summary.contains(&format!("seq={seq_sent} ")), "{req:?}");
    let d = &h.descs(TX_QUEUE)[1];
    assert_eq!(d.pieces[0].hash.0, fingerprint(&frame));
}

#[test]
fn checksum_helper_edge_cases() {
    let mut f = vec![0u8; 10];
    assert!(complete_checksum(&mut f, 10, 0).is_err());
    assert!(complete_checksum(&mut f, 8, 1).is_err());
    assert!(complete_checksum(&mut f, u16::MAX, u16::MAX).is_err());
    assert!(complete_checksum(&mut f, 0, 8).is_ok());
    // All-zero data: sum 0, stored as its complement.
    assert_eq!(&f[8..10], &[0xff, 0xff]);
    // Odd length (the last byte is padded with zero), field at an even offset.
    let mut g = [0x45u8, 0x00, 0x00, 0x00, 0x1c, 0xff, 0x07];
    complete_checksum(&mut g, 6, 0).unwrap_err();
    assert!(complete_checksum(&mut g, 0, 2).is_ok());
    assert_eq!(csum_fold(csum_add(0, &g)), 0xffff);
}

/// The device's checksum is the definition's for every length up to a jumbo
/// frame, odd starts (unaligned words) and odd lengths, data of all ones (the sums
/// that fold to 0xffff), all zeros and noise.
#[test]
fn completed_checksum_matches_the_definition() {
    let noise = crate::virtio::test_util::noise(0x2545_f491_4f6c_dd1d, MAX_FRAME_LEN);
    let ones = vec![0xffu8; MAX_FRAME_LEN];
    let zeros = vec![0u8; MAX_FRAME_LEN];
    let lengths = (0..300).chain([1514, 4095, 4096, 9001, 65535, MAX_FRAME_LEN]);
    for len in lengths {
        for data in [&noise, &ones, &zeros] {
            for start in [0usize, 1, 14, 35] {
                if start + 2 > len {
                    continue;
                }
                let mut frame = data[..len].to_vec();
                // Even, as a TCP or UDP checksum field is from its csum_start.
                let offset = (len - start - 2).min(16) & !1;
                let field = start + offset;
                let start16 = u16::try_from(start).unwrap();
                let offset16 = u16::try_from(offset).unwrap();
                // The field starts at 0 here (no pseudo-header sum in it), so the
                // completed range must sum to all ones.
                frame[field..field + 2].fill(0);
                let mut want = frame.clone();
                assert_eq!(complete_checksum(&mut frame, start16, offset16), Ok(field));
                let sum = !csum_fold(csum_add(0, &want[start..]));
                want[field..field + 2].copy_from_slice(&sum.to_be_bytes());
                assert_eq!(frame, want, "len {len} start {start}");
                assert_eq!(csum_fold(csum_add(0, &frame[start..])), 0xffff);
            }
        }
    }
}

#[test]
fn bad_checksum_offsets_drop_the_frame_and_carry_on() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    let frame = tcp_frame(&payload(20), 0);
    for (i, (start, off)) in [(200u16, 0u16), (34, 100), (u16::MAX, u16::MAX)]
        .into_iter()
        .enumerate()
    {
        let mut buf = net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, start, off).to_vec();
        buf.extend_from_slice(&frame);
        let addr = DATA + 0x1000 * i as u64;
        h.write(addr, &buf);
        add_chain(&h.txq, u16::try_from(i).unwrap(), &[(addr, len32(&buf), 0)]);
    }
    // And a good frame after them.
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&frame);
    h.write(DATA + 0x8000, &buf);
    add_chain(&h.txq, 3, &[(DATA + 0x8000, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert_eq!(h.dev.backend().sent, vec![frame]);
    assert_eq!(used(h.mem, USED_TX).len(), 4);
    let errs = h.errors();
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert!(errs
        .iter()
        .all(|(e, fatal)| !fatal && e.contains("csum_start")));
    assert!(!h.irq.needs_reset());
    assert_eq!(h.dev.stats().tx_dropped, 3);
    let reqs = h.requests(TX_QUEUE);
    assert!(reqs[0].summary.starts_with("tx dropped"));
}

#[test]
fn empty_frame_and_unoffered_gso_are_dropped() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    h.write(DATA, &net_hdr(0, 0, 0, 0));
    add_chain(&h.txq, 0, &[(DATA, 12, 0)]);
    let mut buf = net_hdr(0, 1, 0, 0).to_vec(); // GSO_TCPV4
    buf.extend_from_slice(&tcp_frame(&payload(10), 0));
    h.write(DATA + 0x1000, &buf);
    add_chain(&h.txq, 1, &[(DATA + 0x1000, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert!(h.dev.backend().sent.is_empty());
    assert_eq!(used(h.mem, USED_TX).len(), 2);
    let errs = h.errors();
    assert!(errs[0].0.contains("empty") && !errs[0].1);
    assert!(errs[1].0.contains("gso_type") && !errs[1].1);
}

#[test]
fn tx_interrupts_respect_event_idx() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | VIRTIO_RING_F_EVENT_IDX);
    let used_event = h.txq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&tcp_frame(&[], 0));
    h.write(DATA, &buf);
    // used_event = 5: the driver only wants to hear after the 6th completion.
    h.mem.write_obj(5u16, GuestAddress(used_event)).unwrap();
    add_chain(&h.txq, 0, &[(DATA, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert_eq!(h.line.queue_count(), 0);
    // used_event = 1: wants to hear when used idx passes 1 (the second entry).
    h.mem.write_obj(1u16, GuestAddress(used_event)).unwrap();
    add_chain(&h.txq, 1, &[(DATA, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert_eq!(h.line.queue_count(), 1);
}

// ---------------------------------------------------------------- RX

fn rx_frame(n: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend((0..n.saturating_sub(14)).map(|i| u8::try_from(i % 253).unwrap()));
    f
}

#[test]
fn rx_without_mrg_fills_one_chain_and_sets_data_valid() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG);
    // Header and data in separate descriptors, as older drivers post them.
    add_chain(&h.rxq, 0, &[(RXBUF, 12, W), (RXBUF + 0x1000, 1514, W)]);
    let frame = rx_frame(1000);
    h.dev.backend_mut().to_guest.push_back(frame.clone());
    h.poll();
    assert_eq!(used(h.mem, USED_RX), vec![(0, 1012)]);
    let hdr = h.read(RXBUF, 12);
    assert_eq!(u32::from(hdr[0]), VIRTIO_NET_HDR_F_DATA_VALID);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    assert_eq!(h.read(RXBUF + 0x1000, 1000), frame);
    assert_eq!(h.line.queue_count(), 1);
    let descs = h.descs(RX_QUEUE);
    assert_eq!(descs.len(), 2);
    assert_eq!((descs[0].role, descs[0].len), (DescRole::Header, 12));
    assert_eq!(
        (descs[1].role, descs[1].gpa, descs[1].len, descs[1].dir),
        (
            DescRole::Data,
            RXBUF + 0x1000,
            1000,
            Direction::DeviceWrites
        )
    );
    assert_eq!(descs[1].pieces[0].hash.0, fingerprint(&frame));
    assert!(h.requests(RX_QUEUE)[0].summary.starts_with("rx "));
}

#[test]
fn rx_without_guest_csum_leaves_flags_clear() {
    let mut h = fake(NetOptions {
        sg: false,
        ..NetOptions::default()
    });
    h.activate(BASE | MRG);
    h.post_rx(0, 1, 2048);
    h.write(RXBUF, &[0xaa; 12]);
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.poll();
    let hdr = h.read(RXBUF, 12);
    assert_eq!(&hdr[..10], &[0; 10]);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
}

#[test]
fn rx_mrg_spans_several_chains_with_num_buffers() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG);
    h.post_rx(0, 4, 256);
    let frame = rx_frame(600); // + 12 = 612 = 256 + 256 + 100
    h.dev.backend_mut().to_guest.push_back(frame.clone());
    h.poll();
    assert_eq!(used(h.mem, USED_RX), vec![(0, 256), (1, 256), (2, 100)]);
    let mut got = h.read(RXBUF, 256);
    got.extend(h.read(RXBUF + 0x1000, 256));
    got.extend(h.read(RXBUF + 0x2000, 100));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[12..], &frame[..]);
    let descs = h.descs(RX_QUEUE);
    let heads: Vec<_> = descs.iter().map(|d| (d.head, d.role, d.len)).collect();
    assert_eq!(
        heads,
        vec![
            (0, DescRole::Header, 12),
            (0, DescRole::Data, 244),
            (1, DescRole::Data, 256),
            (2, DescRole::Data, 100),
        ]
    );
    assert!(h.requests(RX_QUEUE)[0].summary.ends_with("buffers=3"));
    // The fourth buffer is still available for the next frame.
    h.dev.backend_mut().to_guest.push_back(rx_frame(100));
    h.poll();
    assert_eq!(used(h.mem, USED_RX)[3], (3, 112));
}

#[test]
fn rx_waits_for_buffers_and_delivers_on_refill() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG | VIRTIO_RING_F_EVENT_IDX);
    let frame = rx_frame(300);
    h.dev.backend_mut().to_guest.push_back(frame.clone());
    h.poll();
    assert_eq!(h.dev.pending_frames(), 1);
    assert!(used(h.mem, USED_RX).is_empty());
    assert_eq!(h.line.queue_count(), 0);
    // A partial refill (MRG needs two 256-byte buffers) is not consumed...
    h.post_rx(0, 1, 256);
    h.process(RX_QUEUE);
    assert_eq!(h.dev.pending_frames(), 1);
    assert!(used(h.mem, USED_RX).is_empty());
    // ...and avail_event asks the guest to kick on its very next buffer.
    let avail_event = USED_RX + 4 + 8 * u64::from(QSIZE);
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
    h.post_rx(1, 1, 256);
    h.process(RX_QUEUE);
    assert_eq!(h.dev.pending_frames(), 0);
    assert_eq!(used(h.mem, USED_RX), vec![(0, 256), (1, 56)]);
    assert_eq!(h.line.queue_count(), 1);
    assert_eq!(h.read(RXBUF + 0x1000, 56), frame[244..]);
}

#[test]
fn rx_pending_queue_is_bounded() {
    let mut h = fake(NetOptions {
        max_pending: 2,
        ..NetOptions::default()
    });
    h.activate(BASE | MRG);
    for i in 0..3 {
        h.dev.backend_mut().to_guest.push_back(rx_frame(60 + i));
    }
    h.poll();
    assert_eq!(h.dev.pending_frames(), 2);
    assert_eq!(h.dev.stats().rx_dropped, 1);
    let errs = h.errors();
    assert_eq!(errs.len(), 1);
    assert!(!errs[0].1 && errs[0].0.contains("dropped the oldest"));
    h.post_rx(0, 2, 2048);
    h.process(RX_QUEUE);
    // The two newest survived.
    assert_eq!(used(h.mem, USED_RX), vec![(0, 73), (1, 74)]);
}

#[test]
fn rx_without_mrg_too_small_buffer_drops_the_frame_keeps_the_buffer() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE);
    h.post_rx(0, 1, 200);
    h.dev.backend_mut().to_guest.push_back(rx_frame(500));
    h.dev.backend_mut().to_guest.push_back(rx_frame(100));
    h.poll();
    assert_eq!(used(h.mem, USED_RX), vec![(0, 112)]);
    assert_eq!(h.dev.stats().rx_dropped, 1);
    assert!(!h.irq.needs_reset());
    assert!(h.errors()[0].0.contains("without MRG_RXBUF"));
}

#[test]
fn frames_before_activation_wait_and_reset_clears_them() {
    let mut h = fake(NetOptions::default());
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.poll();
    h.process(TX_QUEUE);
    h.process(7);
    assert_eq!(h.dev.pending_frames(), 1);
    assert_eq!(
        h.dev.next_poll_delay(Instant::now()),
        Some(Duration::from_millis(7))
    );
    h.activate(BASE | MRG);
    h.post_rx(0, 1, 2048);
    h.process(RX_QUEUE);
    assert_eq!(used(h.mem, USED_RX).len(), 1);
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.dev.reset();
    h.poll();
    h.dev.reset();
    assert_eq!(h.dev.pending_frames(), 0);
}

// ---------------------------------------------------------------- end to end

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&PEER_IP);
    f
}

#[test]
fn arp_request_is_answered_by_the_peer_through_the_queues() {
    let peer = NetPeer::new(NetPeerConfig::default(), Instant::now()).unwrap();
    let mut h = harness(peer, NetOptions::default());
    let cap = Capture::default();
    h.dev.set_pcap(PcapWriter::new(cap.clone()).unwrap());
    h.activate(BASE | SG | MRG);
    h.post_rx(0, 4, 1526);
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&arp_request());
    h.write(DATA, &buf);
    add_chain(&h.txq, 0, &[(DATA, len32(&buf), 0)]);
    h.process(TX_QUEUE);

    let u = used(h.mem, USED_RX);
    assert_eq!(u.len(), 1, "one ARP reply delivered");
    let reply = h.read(RXBUF + 12, u[0].1 as usize - 12);
    assert_eq!(&reply[0..6], &GUEST_MAC);
    assert_eq!(&reply[6..12], &PEER_MAC);
    assert_eq!(&reply[12..14], &[0x08, 0x06]);
    assert_eq!(&reply[20..22], &[0, 2], "ARP reply");
    assert_eq!(&reply[22..28], &PEER_MAC);
    assert_eq!(&reply[28..32], &PEER_IP);
    assert_eq!(&reply[38..42], &GUEST_IP);
    assert_eq!(h.dev.backend().stats().frames_from_guest, 1);
    assert_eq!(
        h.requests(TX_QUEUE)[0].summary,
        "tx arp who-has 10.0.2.2 tell 10.0.2.15"
    );
    assert!(h.requests(RX_QUEUE)[0]
        .summary
        .starts_with("rx arp 10.0.2.2 is-at 52:54:00:00:02:02"));
    h.dev.flush_pcap().unwrap();
    let bytes = cap.bytes();
    // Global header, then the request and the reply.
    let first_len = u32::from_le_bytes(bytes[24 + 8..24 + 12].try_into().unwrap()) as usize;
    assert_eq!(first_len, arp_request().len());
    assert_eq!(&bytes[40..40 + first_len], &arp_request()[..]);
    assert_eq!(bytes.len(), 24 + 16 + first_len + 16 + reply.len());
    assert!(h
        .dev
        .next_poll_delay(Instant::now())
        .is_none_or(|d| d < Duration::from_secs(3600)));
}

#[test]
fn through_the_mmio_transport() {
    let dev = Net::new(Fake::default(), NetOptions::default(), DmaLog::disabled()).unwrap();
    let mem = leaked_memory(MEM_SIZE);
    let line = Arc::new(CountingLine::default());
    let mut t = MmioTransport::new(dev, mem.clone(), line.clone());
    let rxq = MockQueue::create(mem, GuestAddress(0), QSIZE);
    let txq = MockQueue::create(mem, GuestAddress(0x1000), QSIZE);
    let queues = [
        (rxq.desc_table_addr().0, rxq.avail_addr().0, USED_RX),
        (txq.desc_table_addr().0, txq.avail_addr().0, USED_TX),
    ];
    mmio_activate(&mut t, SG | MRG | VIRTIO_F_VERSION_1, QSIZE, &queues);
    assert!(t.is_active());
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&arp_request());
    mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
    add_chain(&txq, 0, &[(DATA, len32(&buf), 0)]);
    t.notify_queue(1);
    assert_eq!(t.device().backend().sent, vec![arp_request()]);
    // The MAC through the config window.
    let mut mac = [0u8; 6];
    t.read(0x100, &mut mac);
    assert_eq!(mac, GUEST_MAC);
    // A writable TX buffer: NEEDS_RESET visible in Status.
    add_chain(&txq, 1, &[(DATA, 64, W)]);
    write_reg(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_ne!(read_reg(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
}

// ---------------------------------------------------------------- bad input

/// A TX chain that breaks the protocol: NEEDS_RESET, nothing sent, nothing more
/// processed until reset.
#[rstest]
#[case::device_writable_buffer(&[(DATA, 12, 0), (DATA + 0x100, 60, W)], "device-writable")]
#[case::header_shorter_than_12_bytes(&[(DATA, 10, 0)], "header too short")]
#[case::zero_length_descriptor(&[(DATA, 12, 0), (DATA + 0x100, 0, 0)], "zero-length")]
#[case::buffer_outside_memory(&[(DATA, 12, 0), (MEM_SIZE - 8, 64, 0)], "outside guest memory")]
#[case::buffer_address_overflows(&[(DATA, 12, 0), (u64::MAX - 8, 64, 0)], "overflows")]
fn tx_bad_chain_needs_reset(#[case] descs: &[(u64, u32, u16)], #[case] what: &str) {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG);
    h.write(DATA, &net_hdr(0, 0, 0, 0));
    add_chain(&h.txq, 0, descs);
    h.process(TX_QUEUE);
    assert!(h.dev.backend().sent.is_empty());
    assert!(used(h.mem, USED_TX).is_empty());
    h.assert_needs_reset(TX_QUEUE, what);
    // Nothing more is processed until reset.
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&arp_request());
    h.write(DATA + 0x3000, &buf);
    add_chain(&h.txq, 8, &[(DATA + 0x3000, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert!(h.dev.backend().sent.is_empty());
}

#[test]
fn tx_chain_loop_and_too_long_need_reset() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE);
    h.txq
        .add_desc_chains(&[raw(DATA, 12, NEXT, 1), raw(DATA, 12, NEXT, 0)], 0)
        .unwrap();
    h.process(TX_QUEUE);
    h.assert_needs_reset(TX_QUEUE, "loops");

    let mut h = fake(NetOptions::default());
    h.activate(BASE);
    let raws: Vec<_> = (0..QSIZE)
        .map(|i| raw(DATA, 12, NEXT, (i + 1) % QSIZE))
        .collect();
    h.txq.add_desc_chains(&raws[..1], 0).unwrap();
    for (i, r) in raws.iter().enumerate().skip(1) {
        h.txq
            .desc_table()
            .store(u16::try_from(i).unwrap(), *r)
            .unwrap();
    }
    h.process(TX_QUEUE);
    h.assert_needs_reset(TX_QUEUE, "longer than");
}

#[test]
fn rx_device_readable_buffer_needs_reset() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | MRG);
    add_chain(&h.rxq, 0, &[(RXBUF, 2048, 0)]);
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.poll();
    h.assert_needs_reset(RX_QUEUE, "device-readable");
    assert!(used(h.mem, USED_RX).is_empty());
    // Later notifications do nothing.
    h.post_rx(1, 1, 2048);
    h.process(RX_QUEUE);
    assert!(used(h.mem, USED_RX).is_empty());
}

#[test]
fn rx_buffer_outside_memory_needs_reset() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | MRG);
    add_chain(&h.rxq, 0, &[(MEM_SIZE - 16, 2048, W)]);
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.poll();
    h.assert_needs_reset(RX_QUEUE, "outside guest memory");
}

#[test]
fn avail_index_jump_needs_reset() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE);
    h.txq.avail().idx().store(QSIZE + 5);
    h.process(TX_QUEUE);
    h.assert_needs_reset(TX_QUEUE, "available ring");
}

#[test]
fn disabled_log_and_boxed_backend_still_carry_frames() {
    let backend: Box<dyn NetBackend> = Box::new(Fake::default());
    let mut h = harness(backend, NetOptions::default());
    h.dev = Net::new(
        Box::new(Fake::default()) as Box<dyn NetBackend>,
        NetOptions::default(),
        DmaLog::disabled(),
    )
    .unwrap();
    h.activate(BASE | SG | MRG);
    h.post_rx(0, 1, 2048);
    let frame = tcp_frame(&payload(100), pseudo_sum(120));
    let mut buf = net_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 34, 16).to_vec();
    buf.extend_from_slice(&frame);
    h.write(DATA, &buf);
    add_chain(&h.txq, 0, &[(DATA, len32(&buf), 0)]);
    h.process(TX_QUEUE);
    assert_eq!(h.dev.stats().tx_frames, 1);
    assert_eq!(h.dev.stats().csum_completed, 1);
    assert!(h.records().is_empty());
}

// ---------------------------------------------------------------- hostile ring layouts

/// The layout for the TX queue: its used ring's `flags` is its available
/// ring's `idx` (desc 0x1000, avail 0x2002, used 0x2004, 16 entries), EVENT_IDX off.
const TX_OVERLAP: (u64, u64, u64) = (0x1000, 0x2002, 0x2004);

/// Writes one TX chain (header + ARP request at [`DATA`]) as descriptor 0 of the
/// table at `desc` and publishes it as entry 0 of the available ring at `avail`.
fn publish_arp_by_hand(mem: &GuestMemoryMmap, desc: u64, avail: u64) {
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&arp_request());
    mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
    crate::virtio::test_util::write_table(mem, desc, &[raw(DATA, len32(&buf), 0, 0)]);
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
}

/// Through the transport, as a driver would: refused at DRIVER_OK, so the TX notify
/// that used to spin forever finds an inactive device.
#[test]
fn tx_used_ring_on_avail_idx_is_refused_at_driver_ok_and_nothing_hangs() {
    let log = TestLog::new();
    let dev = Net::new(Fake::default(), NetOptions::default(), log.dma.clone()).unwrap();
    let mem = leaked_memory(MEM_SIZE);
    let t = within(20, "a TX notify with overlapping rings", move || {
        let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(CountingLine::default()));
        let rx = (0x4000, 0x5000, 0x6000);
        mmio_activate(&mut t, BASE | SG | MRG, QSIZE, &[rx, TX_OVERLAP]);
        publish_arp_by_hand(mem, TX_OVERLAP.0, TX_OVERLAP.1);
        write_reg(&mut t, reg::QUEUE_NOTIFY, u32::from(TX_QUEUE));
        t
    });
    assert!(!t.is_active());
    assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.interrupt().status(), 2, "configuration interrupt");
    assert!(t.device().backend().sent.is_empty());
    assert_eq!(
        log.errors(),
        vec![(
            "DRIVER_OK refused: queue 1: used ring 0x2004+0x86 overlaps the available ring at 0x2002 of queue 1"
                .to_string(),
            true
        )]
    );
}

/// The TX drain loop itself, given that layout behind the transport's back: the frame
/// goes out once, then the re-check that finds no new chain is a fault.
#[test]
fn tx_drain_loop_stops_when_its_own_writes_move_avail_idx() {
    let mut h = fake(NetOptions::default());
    let (desc, avail, used_ring) = TX_OVERLAP;
    let mut rx: Queue = h.rxq.create_queue().unwrap();
    rx.set_used_ring_address(Some(low32(USED_RX)), Some(0));
    let mut tx = Queue::new(QSIZE).unwrap();
    tx.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    tx.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    tx.try_set_used_ring_address(GuestAddress(used_ring))
        .unwrap();
    tx.set_ready(true);
    h.dev
        .activate(h.mem.clone(), vec![rx, tx], h.irq.clone(), BASE | SG)
        .unwrap();
    publish_arp_by_hand(h.mem, desc, avail);
    let mut dev = h.dev;
    let dev = within(20, "a TX notify with overlapping rings", move || {
        dev.process_queue(TX_QUEUE);
        dev
    });
    assert_eq!(dev.backend().sent, vec![arp_request()], "sent once");
    assert!(h.irq.needs_reset());
    let errors = h.log.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].1);
    assert!(
        errors[0]
            .0
            .contains("available ring index moved with no new chain"),
        "{}",
        errors[0].0
    );
}

/// An available ring at GPA 0 is legal: receive buffers posted there are filled
/// (virtio-queue's own iterator takes 0 for "not set up").
#[test]
fn rx_avail_ring_at_gpa_0_is_served() {
    let log = TestLog::new();
    let dev = Net::new(Fake::default(), NetOptions::default(), log.dma.clone()).unwrap();
    let mem = leaked_memory(MEM_SIZE);
    let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(CountingLine::default()));
    let rx = (0x1000, 0, 0x3000);
    let tx = (0x4000, 0x5000, 0x6000);
    mmio_activate(&mut t, BASE | SG | MRG, QSIZE, &[rx, tx]);
    assert!(t.is_active());
    crate::virtio::test_util::write_table(mem, rx.0, &[raw(RXBUF, 2048, W, 0)]);
    mem.write_obj(0u16, GuestAddress(rx.1 + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(rx.1 + 2)).unwrap();
    let frame = rx_frame(100);
    t.device_mut()
        .backend_mut()
        .to_guest
        .push_back(frame.clone());
    let rings = [rx, tx].map(|(desc, avail, used)| QueueRings {
        size: QSIZE,
        desc,
        avail,
        used,
    });
    assert_writes_offered(mem, &rings, || {
        write_reg(&mut t, reg::QUEUE_NOTIFY, u32::from(RX_QUEUE))
    });
    assert!(!t.interrupt().needs_reset(), "{:?}", log.errors());
    assert_eq!(used(mem, rx.2), vec![(0, 112)]);
    assert_eq!(
        crate::virtio::test_util::read(mem, RXBUF + 12, frame.len()),
        frame
    );
}

/// 17 descriptors (one indirect table) in 16-entry queues: TX drops the frame and
/// carries on (the request's own error); RX, which has no way to refuse a buffer,
/// needs a reset.
#[test]
fn chains_longer_than_the_queue_are_refused() {
    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG);
    let mut buf = net_hdr(0, 0, 0, 0).to_vec();
    buf.extend_from_slice(&tcp_frame(&payload(16 * 8), 0));
    h.write(DATA, &buf);
    let table = 0x3_0000u64;
    let pieces: Vec<_> = (0..17u64).map(|i| (DATA + 10 * i, 10, 0)).collect();
    crate::virtio::test_util::write_table(
        h.mem,
        table,
        &crate::virtio::test_util::linked(0, &pieces),
    );
    h.txq
        .add_desc_chains(&[raw(table, 17 * 16, crate::virtio::test_util::IND, 0)], 0)
        .unwrap();
    h.process(TX_QUEUE);
    assert!(h.dev.backend().sent.is_empty());
    assert_eq!(used(h.mem, USED_TX), vec![(0, 0)]);
    assert!(!h.irq.needs_reset());
    let errs = h.errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(!errs[0].1);
    assert!(errs[0]
        .0
        .contains("descriptor chain of 17 descriptors is longer than the queue size 16"));
    assert_eq!(h.dev.stats().tx_dropped, 1);

    let mut h = fake(NetOptions::default());
    h.activate(BASE | SG | MRG);
    let pieces: Vec<_> = (0..17u64).map(|i| (RXBUF + 0x100 * i, 0x100, W)).collect();
    crate::virtio::test_util::write_table(
        h.mem,
        table,
        &crate::virtio::test_util::linked(0, &pieces),
    );
    h.rxq
        .add_desc_chains(&[raw(table, 17 * 16, crate::virtio::test_util::IND, 0)], 0)
        .unwrap();
    h.dev.backend_mut().to_guest.push_back(rx_frame(60));
    h.poll();
    h.assert_needs_reset(RX_QUEUE, "longer than the queue size 16");
    assert!(used(h.mem, USED_RX).is_empty());
}
