//! The peer driven by a second smoltcp interface that plays the guest, the two joined
//! by in-memory frame queues. Time is simulated: it advances a little per exchange
//! and jumps to the next timer when the link is idle, so timeouts cost nothing.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpProtocol,
    Ipv4Address, Ipv4Packet, Ipv4Repr,
};

use super::*;
use crate::pcap::{PcapWriter, GLOBAL_HEADER_LEN, RECORD_HEADER_LEN};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for megabytes.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn source_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    f
}

fn smol(t: Duration) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(i64::try_from(t.as_micros()).unwrap())
}

/// The guest's side of the link: queues of owned frames.
#[derive(Default)]
struct QueueDev {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct QRx(Vec<u8>);
struct QTx<'a>(&'a mut Vec<Vec<u8>>);

impl phy::RxToken for QRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for QTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl phy::Device for QueueDev {
    type RxToken<'a> = QRx;
    type TxToken<'a> = QTx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(QRx, QTx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((QRx(frame), QTx(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<QTx<'_>> {
        Some(QTx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// The peer and a smoltcp "guest" on one simulated link.
struct Net {
    peer: NetPeer,
    guest: Interface,
    dev: QueueDev,
    sockets: SocketSet<'static>,
    epoch: Instant,
    t: Duration,
    pcap: Option<PcapWriter<Vec<u8>>>,
    /// Wall-clock time spent inside the peer's calls.
    peer_time: Duration,
    /// Leave the peer's frames for the guest in the peer (a guest that posts no
    /// receive buffers).
    hold_peer_frames: bool,
}

impl Net {
    fn new() -> Net {
        let epoch = Instant::now();
        let peer = NetPeer::new(NetPeerConfig::default(), epoch).unwrap();
        let mut dev = QueueDev::default();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        config.random_seed = 15;
        let mut guest = Interface::new(config, &mut dev, smol(Duration::ZERO));
        guest.update_ip_addrs(|a| {
            a.push(IpCidr::new(IpAddress::v4(10, 0, 2, 15), 24))
                .unwrap()
        });
        Net {
            peer,
            guest,
            dev,
            sockets: SocketSet::new(Vec::new()),
            epoch,
            t: Duration::ZERO,
            pcap: None,
            peer_time: Duration::ZERO,
            hold_peer_frames: false,
        }
    }

    fn now(&self) -> Instant {
        self.epoch + self.t
    }

    /// One exchange: the guest runs, its frames go to the peer, the peer runs, its
    /// frames go to the guest. Returns how many frames crossed.
    fn step(&mut self) -> usize {
        self.guest
            .poll(smol(self.t), &mut self.dev, &mut self.sockets);
        let now = self.now();
        let to_peer = std::mem::take(&mut self.dev.tx);
        let mut moved = to_peer.len();
        if let Some(p) = &mut self.pcap {
            for frame in &to_peer {
                p.write_frame_at(self.t, frame).unwrap();
            }
        }
        let start = Instant::now();
        for frame in &to_peer {
            self.peer.receive_frame(frame, now);
        }
        self.peer.poll(now);
        self.peer_time += start.elapsed();
        if self.hold_peer_frames {
            return self.idle_or_advance(moved, now);
        }
        let (pcap, rx) = (&mut self.pcap, &mut self.dev.rx);
        let t = self.t;
        self.peer.drain_frames_for_guest(|frame| {
            if let Some(p) = pcap {
                p.write_frame_at(t, frame).unwrap();
            }
            rx.push_back(frame.to_vec());
            moved += 1;
        });
        self.idle_or_advance(moved, now)
    }

    /// Moves time on: a little after an exchange, to the next timer when idle.
    fn idle_or_advance(&mut self, moved: usize, now: Instant) -> usize {
        if moved > 0 || !self.dev.rx.is_empty() {
            self.t += Duration::from_micros(20);
        } else {
            // Idle: jump to the earliest timer of either side.
            let peer = self.peer.poll_delay(now);
            let guest = self
                .guest
                .poll_delay(smol(self.t), &self.sockets)
                .map(|d| Duration::from_micros(d.total_micros()));
            let wait = peer
                .into_iter()
                .chain(guest)
                .min()
                .unwrap_or(Duration::from_millis(1));
            self.t += wait.max(Duration::from_micros(1));
        }
        moved
    }

    fn connect(&mut self, local_port: u16) -> SocketHandle {
        self.connect_to(DEFAULT_PORT, local_port, 1 << 20)
    }

    /// Connects to the peer's `port`, with a receive buffer (the largest window the
    /// guest advertises) of `rx_buffer` bytes.
    fn connect_to(&mut self, port: u16, local_port: u16, rx_buffer: usize) -> SocketHandle {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx_buffer]),
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
        );
        socket
            .connect(
                self.guest.context(),
                (IpAddress::v4(10, 0, 2, 2), port),
                local_port,
            )
            .unwrap();
        self.sockets.add(socket)
    }
}

/// When the emulated guest program closes its connection.
#[derive(Clone, Copy, PartialEq)]
enum Close {
    /// After reading the peer's 8-byte count (the real protocol).
    AfterAck,
    /// Right after its last byte, without waiting (a program cut short).
    AfterSend,
}

/// Sends `data` as the guest program would and returns the count the peer sent back
/// and the peer's result for the connection.
fn transfer(net: &mut Net, data: &[u8], local_port: u16, close: Close) -> (Option<u64>, Received) {
    let handle = net.connect(local_port);
    let results_before = net.peer.results().len();
    let mut sent = 0;
    let mut ack = Vec::new();
    let mut closed = false;
    for _ in 0..2_000_000 {
        let socket = net.sockets.get_mut::<tcp::Socket>(handle);
        if sent < data.len() && socket.can_send() {
            sent += socket.send_slice(&data[sent..]).unwrap();
        }
        while socket.can_recv() {
            let mut buf = [0u8; 16];
            let n = socket.recv_slice(&mut buf).unwrap();
            ack.extend_from_slice(&buf[..n]);
        }
        let done_sending = sent == data.len();
        if !closed && done_sending && (close == Close::AfterSend || ack.len() >= 8) {
            socket.close();
            closed = true;
        }
        if closed && net.peer.results().len() > results_before && !socket.is_open() {
            break;
        }
        if closed
            && net.peer.results().len() > results_before
            && socket.state() == tcp::State::TimeWait
        {
            break;
        }
        net.step();
    }
    // Let the last ACKs settle so the peer's socket is listening again.
    for _ in 0..20 {
        net.step();
    }
    net.sockets.remove(handle);
    let result = net.peer.results()[results_before].clone();
    let count = (ack.len() >= 8).then(|| u64::from_le_bytes(ack[..8].try_into().unwrap()));
    assert!(
        ack.len() <= 8,
        "the peer sends one 8-byte count, got {} bytes",
        ack.len()
    );
    (count, result)
}

/// What the emulated guest program does on a connection to the send port.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Reply {
    /// Reads `size` bytes, sends their count, closes (the real protocol).
    Count,
    /// Reads `size` bytes, sends this count instead, closes.
    WrongCount(u64),
    /// Reads this many bytes (or to the end of stream), closes without a count.
    CloseAfter(usize),
    /// Reads to the end of stream, closes without a count.
    ReadToEnd,
}

/// What the guest saw on a send-port connection.
struct Download {
    bytes: Vec<u8>,
    /// Whether the peer's FIN arrived (end of stream).
    eof: bool,
}

/// Receives from the peer's send port as the guest program would, expecting `size`
/// bytes, and returns what arrived and the peer's record of the connection.
fn download(net: &mut Net, size: usize, local_port: u16, reply: Reply) -> (Download, Sent) {
    let handle = net.connect_to(DEFAULT_SEND_PORT, local_port, 1 << 20);
    let before = net.peer.sent().len();
    let mut got = Vec::new();
    let mut count_queued = false;
    let mut closed = false;
    let mut eof = false;
    for _ in 0..2_000_000 {
        let socket = net.sockets.get_mut::<tcp::Socket>(handle);
        let want = match reply {
            Reply::Count | Reply::WrongCount(_) => size,
            Reply::CloseAfter(n) => n,
            Reply::ReadToEnd => usize::MAX,
        };
        while got.len() < want && socket.can_recv() {
            let room = (want - got.len()).min(64 << 10);
            socket
                .recv(|buf| {
                    let n = buf.len().min(room);
                    got.extend_from_slice(&buf[..n]);
                    (n, ())
                })
                .unwrap();
        }
        if !socket.may_recv() && socket.state() != tcp::State::SynSent {
            eof = true;
        }
        if !count_queued && socket.can_send() && got.len() >= size {
            let counted = match reply {
                Reply::Count => Some(got.len() as u64),
                Reply::WrongCount(c) => Some(c),
                _ => None,
            };
            if let Some(c) = counted {
                assert_eq!(socket.send_slice(&c.to_le_bytes()), Ok(8));
            }
            count_queued = true;
        }
        let done_reading = match reply {
            Reply::Count | Reply::WrongCount(_) => count_queued,
            Reply::CloseAfter(n) => got.len() >= n || eof,
            Reply::ReadToEnd => eof,
        };
        if !closed && done_reading {
            socket.close();
            closed = true;
        }
        if closed && net.peer.sent().len() > before && !socket.is_open() {
            break;
        }
        if closed && net.peer.sent().len() > before && socket.state() == tcp::State::TimeWait {
            break;
        }
        net.step();
    }
    for _ in 0..20 {
        net.step();
    }
    let socket = net.sockets.get_mut::<tcp::Socket>(handle);
    eof |= !socket.may_recv();
    net.sockets.remove(handle);
    assert!(
        net.peer.sent().len() > before,
        "the peer recorded no result for the connection"
    );
    let sent = net.peer.sent()[before].clone();
    (Download { bytes: got, eof }, sent)
}

#[test]
fn net_peer_answers_arp_and_ping() {
    let mut peer = NetPeer::new(NetPeerConfig::default(), Instant::now()).unwrap();
    let now = Instant::now();
    let guest_ip = Ipv4Address::new(10, 0, 2, 15);
    let peer_ip = Ipv4Address::new(10, 0, 2, 2);

    // ARP who-has 10.0.2.2.
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: guest_ip,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: peer_ip,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut frame = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame);
    eth.emit(&mut f);
    arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    peer.receive_frame(&frame, now);
    peer.poll(now);
    let out = peer.take_frames_for_guest();
    assert_eq!(out.len(), 1, "one ARP reply");
    let reply = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(reply.dst_addr(), EthernetAddress(GUEST_MAC));
    assert_eq!(reply.src_addr(), EthernetAddress(DEFAULT_MAC));
    let arp_reply = ArpRepr::parse(&ArpPacket::new_checked(reply.payload()).unwrap()).unwrap();
    assert_eq!(
        arp_reply,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(DEFAULT_MAC),
            source_protocol_addr: peer_ip,
            target_hardware_addr: EthernetAddress(GUEST_MAC),
            target_protocol_addr: guest_ip,
        }
    );

    // ICMP echo request.
    let payload = b"zc ping payload 0123456789";
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x1234,
        seq_no: 7,
        data: payload,
    };
    let ip = Ipv4Repr {
        src_addr: guest_ip,
        dst_addr: peer_ip,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(DEFAULT_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let caps = ChecksumCapabilities::default();
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
    peer.receive_frame(&frame, now);
    peer.poll(now);
    let out = peer.take_frames_for_guest();
    assert_eq!(out.len(), 1, "one echo reply");
    let reply = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(reply.dst_addr(), EthernetAddress(GUEST_MAC));
    let p = Ipv4Packet::new_checked(reply.payload()).unwrap();
    let ip_reply = Ipv4Repr::parse(&p, &caps).unwrap();
    assert_eq!((ip_reply.src_addr, ip_reply.dst_addr), (peer_ip, guest_ip));
    let icmp_reply =
        Icmpv4Repr::parse(&Icmpv4Packet::new_checked(p.payload()).unwrap(), &caps).unwrap();
    assert_eq!(
        icmp_reply,
        Icmpv4Repr::EchoReply {
            ident: 0x1234,
            seq_no: 7,
            data: payload,
        }
    );
    assert_eq!(peer.stats().frames_from_guest, 2);
    assert_eq!(peer.stats().frames_to_guest, 2);
}

#[test]
fn net_peer_drops_garbage_frames() {
    let mut peer = NetPeer::new(NetPeerConfig::default(), Instant::now()).unwrap();
    let now = Instant::now();
    for (i, len) in [0usize, 1, 13, 14, 15, 34, 54, 60, 1514, 9000]
        .into_iter()
        .enumerate()
    {
        let mut frame = random_bytes(len, i as u64 + 1);
        peer.receive_frame(&frame, now);
        // Addressed to the peer, IPv4 ethertype, random rest.
        if len >= 14 {
            frame[..6].copy_from_slice(&DEFAULT_MAC);
            frame[12..14].copy_from_slice(&[0x08, 0x00]);
            peer.receive_frame(&frame, now);
        }
    }
    peer.poll(now);
    assert!(peer.results().is_empty());
    assert_eq!(peer.active_connections(), 0);
}

#[test]
fn net_peer_receives_8mib_verified_with_ack() {
    const SIZE: usize = 8 << 20;
    let data = random_bytes(SIZE, 42);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer.expect(
        Expectation::of_file("sendfile", file.path())
            .unwrap()
            .with_xxh3_128(xxh3_128(&data)),
    );
    let wall = Instant::now();
    let (ack, r) = transfer(&mut net, &data, 49152, Close::AfterAck);
    let wall = wall.elapsed();
    eprintln!(
        "net_peer: 8 MiB through the in-memory link in {wall:?} wall = {:.0} MB/s; \
         inside the peer {:?} = {:.0} MB/s ({} frames from guest, {} to guest)",
        SIZE as f64 / wall.as_secs_f64() / 1e6,
        net.peer_time,
        SIZE as f64 / net.peer_time.as_secs_f64() / 1e6,
        net.peer.stats().frames_from_guest,
        net.peer.stats().frames_to_guest,
    );
    assert!(r.ok(), "{:?}", r.failure);
    assert_eq!(ack, Some(SIZE as u64));
    assert_eq!(r.bytes, SIZE as u64);
    assert_eq!(r.hash_ok, Some(true));
    assert_eq!(r.content_ok, Some(true));
    assert_eq!(r.xxh3_128, xxh3_128(&data));
    assert_eq!(r.end, End::Fin);
    assert!(r.ack_sent);
    assert_eq!(r.connection, 0);
    assert_eq!(r.remote, Some(SocketAddrV4::new(DEFAULT_GUEST_IP, 49152)));
    assert_eq!(r.expected.as_ref().unwrap().label, "sendfile");
    assert!(r.first_byte_at.is_some() && r.last_byte_at >= r.first_byte_at);
    assert_eq!(net.peer.active_connections(), 0);
}

#[test]
fn net_peer_corrupted_byte_fails_with_its_offset() {
    let data = random_bytes(256 << 10, 7);
    let file = source_file(&data);
    let mut sent = data.clone();
    sent[100_000] ^= 0x01;
    let mut net = Net::new();
    net.peer
        .expect(Expectation::of_file("corrupt", file.path()).unwrap());
    let (ack, r) = transfer(&mut net, &sent, 49152, Close::AfterAck);
    assert_eq!(
        ack,
        Some(data.len() as u64),
        "the count is sent: the size arrived"
    );
    assert_eq!(r.failure, Some(Failure::Mismatch { offset: 100_000 }));
    assert_eq!(r.failure.as_ref().unwrap().offset(), Some(100_000));
    assert_eq!(r.content_ok, Some(false));
    assert_eq!(r.hash_ok, None);
    assert_eq!(r.bytes, data.len() as u64);
}

#[test]
fn net_peer_short_stream_fails() {
    let data = random_bytes(256 << 10, 8);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer
        .expect(Expectation::of_file("short", file.path()).unwrap());
    let (ack, r) = transfer(&mut net, &data[..100 << 10], 49152, Close::AfterSend);
    assert_eq!(
        r.failure,
        Some(Failure::Short {
            expected: 256 << 10,
            received: 100 << 10
        })
    );
    assert_eq!(r.content_ok, Some(false));
    assert_eq!(r.end, End::Fin);
    assert_eq!(ack, Some(100 << 10), "the short count is sent at the FIN");
}

#[test]
fn net_peer_long_stream_fails() {
    let data = random_bytes(64 << 10, 9);
    let file = source_file(&data);
    let mut longer = data.clone();
    longer.extend_from_slice(b"extra");
    let mut net = Net::new();
    net.peer
        .expect(Expectation::of_file("long", file.path()).unwrap());
    let (ack, r) = transfer(&mut net, &longer, 49152, Close::AfterSend);
    assert_eq!(
        r.failure,
        Some(Failure::Long {
            expected: 64 << 10,
            received: (64 << 10) + 5
        })
    );
    assert_eq!(r.failure.as_ref().unwrap().offset(), Some(64 << 10));
    assert!(ack.unwrap() >= 64 << 10);
}

#[test]
fn net_peer_two_connections_in_sequence_with_pcap() {
    let a = random_bytes(300_000, 10);
    let b = random_bytes(123_457, 11);
    let (fa, fb) = (source_file(&a), source_file(&b));
    let mut net = Net::new();
    net.pcap = Some(PcapWriter::new(Vec::new()).unwrap());
    net.peer
        .expect(Expectation::of_file("first", fa.path()).unwrap());
    net.peer
        .expect(Expectation::of_file("second", fb.path()).unwrap());
    assert_eq!(net.peer.pending_expectations(), 2);
    let (ack_a, ra) = transfer(&mut net, &a, 50000, Close::AfterAck);
    let (ack_b, rb) = transfer(&mut net, &b, 50001, Close::AfterAck);
    assert!(ra.ok() && rb.ok(), "{:?} {:?}", ra.failure, rb.failure);
    assert_eq!((ack_a, ack_b), (Some(300_000), Some(123_457)));
    assert_eq!((ra.connection, rb.connection), (0, 1));
    assert_eq!(ra.expected.unwrap().label, "first");
    assert_eq!(rb.expected.unwrap().label, "second");
    assert_eq!(net.peer.take_results().len(), 2);
    assert!(net.peer.results().is_empty());
    assert_eq!(net.peer.pending_expectations(), 0);

    // Every frame of both directions is in the capture.
    let stats = net.peer.stats();
    let pcap = net.pcap.take().unwrap().into_inner().unwrap();
    let (mut at, mut frames, mut bytes) = (GLOBAL_HEADER_LEN, 0u64, 0u64);
    while at < pcap.len() {
        let incl = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        at += RECORD_HEADER_LEN + incl;
        frames += 1;
        bytes += incl as u64;
    }
    assert_eq!(at, pcap.len());
    assert_eq!(frames, stats.frames_from_guest + stats.frames_to_guest);
    assert_eq!(bytes, stats.bytes_from_guest + stats.bytes_to_guest);
}

#[test]
fn net_peer_counts_what_arrives_while_it_arrives() {
    let a = random_bytes(300_000, 12);
    let b = random_bytes(50_000, 13);
    let (fa, fb) = (source_file(&a), source_file(&b));
    let mut net = Net::new();
    net.peer
        .expect(Expectation::of_file("first", fa.path()).unwrap());
    net.peer
        .expect(Expectation::of_file("second", fb.path()).unwrap());
    assert_eq!(net.peer.received_since(0), ReceivedSince::default());
    assert_eq!(net.peer.next_expected_size(), Some(300_000));

    // Part of the first transfer: counted while the connection is open.
    let handle = net.connect(50010);
    let mut sent = 0;
    let mut seen = ReceivedSince::default();
    for _ in 0..100_000 {
        let socket = net.sockets.get_mut::<tcp::Socket>(handle);
        if sent < 100_000 && socket.can_send() {
            sent += socket.send_slice(&a[sent..100_000]).unwrap();
        }
        net.step();
        seen = net.peer.received_since(0);
        if seen.bytes == 100_000 {
            break;
        }
    }
    assert_eq!(
        seen,
        ReceivedSince {
            connections: 1,
            bytes: 100_000,
            expected: Some(300_000)
        }
    );
    assert_eq!(net.peer.next_expected_size(), Some(50_000));
    // The rest of it, then the second connection; each counted from its own number on.
    let socket = net.sockets.get_mut::<tcp::Socket>(handle);
    socket.abort();
    net.peer.finish(net.now());
    let first = net.peer.stats().connections;
    let (_, rb) = transfer(&mut net, &b, 50011, Close::AfterAck);
    assert!(rb.ok(), "{:?}", rb.failure);
    assert_eq!(
        net.peer.received_since(first),
        ReceivedSince {
            connections: 1,
            bytes: 50_000,
            expected: Some(50_000)
        }
    );
    assert_eq!(
        net.peer.received_since(0),
        ReceivedSince {
            connections: 2,
            bytes: 150_000,
            expected: Some(350_000)
        }
    );
    assert_eq!(net.peer.received_since(2), ReceivedSince::default());
}

#[test]
fn net_peer_hash_only_expectations() {
    let data = random_bytes(50_000, 12);
    let mut net = Net::new();
    net.peer
        .expect(Expectation::sized("good", 50_000).with_xxh3_128(xxh3_128(&data)));
    net.peer
        .expect(Expectation::sized("bad", 50_000).with_xxh3_128(xxh3_128(b"other")));
    let (_, good) = transfer(&mut net, &data, 50000, Close::AfterAck);
    let (_, bad) = transfer(&mut net, &data, 50001, Close::AfterAck);
    assert!(good.ok(), "{:?}", good.failure);
    assert_eq!((good.hash_ok, good.content_ok), (Some(true), None));
    assert_eq!(bad.hash_ok, Some(false));
    assert!(matches!(bad.failure, Some(Failure::HashMismatch { .. })));
}

#[test]
fn net_peer_unexpected_connection_and_missing_source_fail() {
    let data = random_bytes(10_000, 13);
    let mut net = Net::new();
    net.peer.expect(Expectation {
        source: Some("/nonexistent/zc-source".into()),
        ..Expectation::sized("missing", 10_000)
    });
    let (ack, missing) = transfer(&mut net, &data, 50000, Close::AfterAck);
    assert_eq!(ack, Some(10_000));
    assert!(
        matches!(&missing.failure, Some(Failure::Source { path, .. }) if path.ends_with("zc-source")),
        "{:?}",
        missing.failure
    );
    // Nothing queued: the stream is still read to the end, then failed.
    let (ack, none) = transfer(&mut net, &data, 50001, Close::AfterSend);
    assert_eq!(none.failure, Some(Failure::NoExpectation));
    assert_eq!(none.bytes, 10_000);
    assert_eq!(ack, Some(10_000));
}

#[test]
fn net_peer_source_shorter_than_size_fails() {
    let data = random_bytes(10_000, 14);
    let file = source_file(&data[..5_000]);
    let mut net = Net::new();
    net.peer.expect(Expectation {
        source: Some(file.path().to_owned()),
        ..Expectation::sized("trunc", 10_000)
    });
    let (_, r) = transfer(&mut net, &data, 50000, Close::AfterAck);
    assert!(
        matches!(&r.failure, Some(Failure::Source { reason, .. }) if reason.contains("5000")),
        "{:?}",
        r.failure
    );
}

#[test]
fn net_peer_finish_records_open_connections() {
    let data = random_bytes(20_000, 15);
    let mut net = Net::new();
    net.peer.expect(Expectation::sized("open", 20_000));
    let handle = net.connect(50000);
    let mut sent = 0;
    while net.peer.results().is_empty() && net.peer.stats().connections == 0 || sent < data.len() {
        let s = net.sockets.get_mut::<tcp::Socket>(handle);
        if s.can_send() {
            sent += s.send_slice(&data[sent..]).unwrap();
        }
        net.step();
    }
    for _ in 0..50 {
        net.step();
    }
    assert_eq!(net.peer.active_connections(), 1);
    let now = net.now();
    net.peer.finish(now);
    let r = net.peer.take_results();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].end, End::Finished);
    assert!(r[0].ok(), "all bytes arrived: {:?}", r[0].failure);
    assert_eq!(net.peer.active_connections(), 0);
}

#[test]
fn net_peer_rejects_bad_config() {
    let now = Instant::now();
    let bad = |c: NetPeerConfig| NetPeer::new(c, now).unwrap_err();
    let d = NetPeerConfig::default();
    assert_eq!(
        bad(NetPeerConfig {
            mac: [0x01, 0, 0, 0, 0, 1],
            ..d.clone()
        }),
        NetPeerError::BadMac([0x01, 0, 0, 0, 0, 1])
    );
    assert_eq!(
        bad(NetPeerConfig {
            mtu: 100,
            ..d.clone()
        }),
        NetPeerError::BadMtu(100)
    );
    assert_eq!(
        bad(NetPeerConfig {
            rx_buffer: 1000,
            ..d.clone()
        }),
        NetPeerError::BadRxBuffer(1000)
    );
    assert_eq!(
        bad(NetPeerConfig {
            listeners: 0,
            ..d.clone()
        }),
        NetPeerError::BadListeners(0)
    );
    assert_eq!(
        bad(NetPeerConfig {
            port: 0,
            ..d.clone()
        }),
        NetPeerError::BadPort
    );
    assert_eq!(
        bad(NetPeerConfig {
            prefix_len: 33,
            ..d
        }),
        NetPeerError::BadPrefix(33)
    );
}

#[test]
fn net_peer_rejects_a_bad_send_port() {
    let now = Instant::now();
    for send_port in [0, DEFAULT_PORT] {
        let config = NetPeerConfig {
            send_port,
            ..NetPeerConfig::default()
        };
        assert_eq!(
            NetPeer::new(config, now).unwrap_err(),
            NetPeerError::BadSendPort(send_port)
        );
    }
}

#[test]
fn net_peer_sends_8mib_file_and_checks_the_guests_count() {
    const SIZE: usize = 8 << 20;
    let data = random_bytes(SIZE, 101);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer
        .offer(Offer::of_file("recv-payload", file.path()).unwrap());
    assert_eq!(net.peer.pending_offer_labels(), vec!["recv-payload"]);
    let wall = Instant::now();
    let (got, s) = download(&mut net, SIZE, 49200, Reply::Count);
    eprintln!(
        "net_peer: 8 MiB sent through the in-memory link in {:?} wall; inside the peer {:?}",
        wall.elapsed(),
        net.peer_time
    );
    assert_eq!(got.bytes.len(), SIZE);
    assert!(got.bytes == data, "the guest got different bytes");
    assert!(got.eof, "the peer closes after the guest");
    assert!(s.ok(), "{:?}", s.failure);
    assert_eq!(s.offer.as_ref().unwrap().label, "recv-payload");
    assert_eq!(
        (s.bytes_sent, s.bytes_acked, s.guest_count),
        (SIZE as u64, SIZE as u64, Some(SIZE as u64))
    );
    assert_eq!(s.end, End::Fin);
    assert_eq!(s.connection, 0);
    assert_eq!(s.remote, Some(SocketAddrV4::new(DEFAULT_GUEST_IP, 49200)));
    assert!(s.first_byte_at.is_some() && s.count_at > s.first_byte_at);
    assert!(s.throughput().is_some());
    assert_eq!(net.peer.stats().send_connections, 1);
    assert_eq!(
        net.peer.stats().connections,
        0,
        "the receive port saw nothing"
    );
    assert!(net.peer.results().is_empty());
    assert_eq!(net.peer.active_connections(), 0);
    assert!(net.peer.pending_offer_labels().is_empty());
    assert_eq!(net.peer.next_offer_size(), None);
    // The progress count: every byte acknowledged, of as many offered.
    let since = net.peer.sent_since(0);
    assert_eq!(
        (since.connections, since.bytes, since.expected),
        (1, SIZE as u64, Some(SIZE as u64))
    );
    assert_eq!(net.peer.sent_since(1).connections, 0);
    assert_eq!(net.peer.received_since(0).connections, 0);
    assert_eq!(net.peer.take_sent().len(), 1);
    assert!(net.peer.sent().is_empty());
}

#[test]
fn net_peer_send_fails_on_a_wrong_count() {
    let data = random_bytes(300_000, 102);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer
        .offer(Offer::of_file("wrong", file.path()).unwrap());
    let (got, s) = download(&mut net, data.len(), 49201, Reply::WrongCount(299_999));
    assert!(got.bytes == data);
    assert_eq!(s.guest_count, Some(299_999));
    assert_eq!(s.bytes_acked, 300_000);
    assert_eq!(
        s.failure,
        Some(SendFailure::WrongCount {
            size: 300_000,
            counted: 299_999
        })
    );
}

#[test]
fn net_peer_send_fails_when_the_guest_closes_early() {
    let data = random_bytes(2 << 20, 103);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer
        .offer(Offer::of_file("early", file.path()).unwrap());
    net.peer
        .offer(Offer::of_file("no count", file.path()).unwrap());
    // Reads 100 KiB of 2 MiB and closes.
    let (got, s) = download(&mut net, data.len(), 49202, Reply::CloseAfter(100 << 10));
    assert_eq!(got.bytes[..], data[..100 << 10]);
    assert_eq!(s.guest_count, None);
    assert!(
        matches!(s.failure, Some(SendFailure::Undelivered { size, acked }) if size == 2 << 20 && acked < size),
        "{:?}",
        s.failure
    );
    assert!(s.bytes_acked >= 100 << 10);
    // Reads every byte but closes without its count.
    let (got, s) = download(&mut net, data.len(), 49203, Reply::CloseAfter(2 << 20));
    assert!(got.bytes == data);
    assert_eq!(s.bytes_acked, 2 << 20);
    assert_eq!(s.failure, Some(SendFailure::NoCount { received: 0 }));
    assert_eq!(s.offer.unwrap().label, "no count");
}

#[test]
fn net_peer_send_gives_two_connections_their_offers_in_order() {
    let a = random_bytes(700_000, 104);
    let b = random_bytes(123_457, 105);
    let (fa, fb) = (source_file(&a), source_file(&b));
    let mut net = Net::new();
    net.peer.offer(Offer::of_file("first", fa.path()).unwrap());
    net.peer.offer(Offer::of_file("second", fb.path()).unwrap());
    // A transfer the other way in between takes nothing from the offers.
    let c = random_bytes(50_000, 106);
    let fc = source_file(&c);
    net.peer
        .expect(Expectation::of_file("to peer", fc.path()).unwrap());
    let (got_a, sa) = download(&mut net, a.len(), 49204, Reply::Count);
    let (ack, rc) = transfer(&mut net, &c, 49205, Close::AfterAck);
    let (got_b, sb) = download(&mut net, b.len(), 49206, Reply::Count);
    assert!(got_a.bytes == a && got_b.bytes == b);
    assert!(sa.ok() && sb.ok(), "{:?} {:?}", sa.failure, sb.failure);
    assert_eq!(sa.offer.unwrap().label, "first");
    assert_eq!(sb.offer.unwrap().label, "second");
    assert_eq!((sa.connection, sb.connection), (0, 1));
    assert!(rc.ok(), "{:?}", rc.failure);
    assert_eq!((ack, rc.connection), (Some(50_000), 0));
    assert_eq!(net.peer.stats().send_connections, 2);
}

#[test]
fn net_peer_send_without_offer_or_file_fails_with_an_empty_stream() {
    let mut net = Net::new();
    // Nothing queued: nothing is sent, the stream ends at once.
    let (got, s) = download(&mut net, 1000, 49207, Reply::ReadToEnd);
    assert!(got.bytes.is_empty() && got.eof);
    assert_eq!(s.failure, Some(SendFailure::NoOffer));
    assert_eq!((s.bytes_sent, s.offer), (0, None));
    assert_eq!(s.end, End::Fin);
    // A file that cannot be opened, then one shorter than offered.
    net.peer.offer(Offer {
        label: "missing".into(),
        source: "/nonexistent/zc-send".into(),
        size: 10,
    });
    let data = random_bytes(5_000, 107);
    let file = source_file(&data);
    net.peer.offer(Offer {
        label: "truncated".into(),
        source: file.path().to_owned(),
        size: 8_000,
    });
    let (got, s) = download(&mut net, 10, 49208, Reply::ReadToEnd);
    assert!(got.bytes.is_empty() && got.eof);
    assert!(
        matches!(&s.failure, Some(SendFailure::Source { path, .. }) if path.ends_with("zc-send")),
        "{:?}",
        s.failure
    );
    let (got, s) = download(&mut net, 8_000, 49209, Reply::ReadToEnd);
    assert!(got.bytes == data, "what the file has is sent, then the end");
    assert!(
        matches!(&s.failure, Some(SendFailure::Source { reason, .. }) if reason.contains("5000")),
        "{:?}",
        s.failure
    );
    // The peer still works afterwards.
    net.peer
        .offer(Offer::of_file("after", file.path()).unwrap());
    let (got, s) = download(&mut net, 5_000, 49210, Reply::Count);
    assert!(s.ok() && got.bytes == data, "{:?}", s.failure);
}

#[test]
fn net_peer_send_holds_a_bounded_amount_for_a_guest_that_never_reads() {
    const SIZE: usize = 16 << 20;
    const GUEST_WINDOW: usize = 64 << 10;
    let data = random_bytes(SIZE, 108);
    let file = source_file(&data);
    let mut net = Net::new();
    net.peer
        .offer(Offer::of_file("stalled", file.path()).unwrap());
    let handle = net.connect_to(DEFAULT_SEND_PORT, 49211, GUEST_WINDOW);
    let sending = |peer: &NetPeer| {
        peer.conns.iter().find_map(|c| match &c.phase {
            Phase::Sending(o) => Some(o.bytes_sent()),
            _ => None,
        })
    };
    // The guest takes frames but its program never reads: its window closes. Some
    // simulated minutes of zero-window probing and timers.
    let start = net.t;
    let mut most_frames = 0;
    while net.t - start < Duration::from_secs(120) {
        net.step();
        most_frames = most_frames.max(net.dev.rx.len());
    }
    let sent = sending(&net.peer).expect("the connection is still open");
    assert!(
        sent <= (GUEST_WINDOW + SEND_TX_BUFFER) as u64,
        "the peer read {sent} bytes of the file for a guest with a {GUEST_WINDOW}-byte window"
    );
    assert!(sent >= GUEST_WINDOW as u64, "the window was filled: {sent}");
    assert!(
        most_frames <= SEND_TX_BUFFER / 1000,
        "{most_frames} frames waiting"
    );
    assert!(net.peer.sent().is_empty());

    // Frames not taken at all (no receive buffers posted): the peer's queue for the
    // guest stays under its limit, and it reads no more than its ring holds.
    net.hold_peer_frames = true;
    let sent_before = sent;
    let mut most_queued = 0;
    for _ in 0..20_000 {
        let socket = net.sockets.get_mut::<tcp::Socket>(handle);
        // The guest's program now reads what it has, so its window opens again.
        while socket.can_recv() {
            socket.recv(|b| (b.len(), ())).unwrap();
        }
        net.step();
        most_queued = most_queued.max(net.peer.tx.frames.len());
    }
    let queued_bytes: usize = net.peer.tx.frames.iter().map(Vec::len).sum();
    assert!(most_queued <= TX_QUEUE_LIMIT, "{most_queued} frames queued");
    assert!(
        queued_bytes <= TX_QUEUE_LIMIT * 1514,
        "{queued_bytes} bytes queued"
    );
    let sent_now = sending(&net.peer).unwrap();
    assert!(
        sent_now <= sent_before + (GUEST_WINDOW + SEND_TX_BUFFER) as u64,
        "{sent_now} bytes read, {sent_before} before the guest stopped taking frames"
    );
    // Ending the run records the stalled send as undelivered.
    let now = net.now();
    net.peer.finish(now);
    let s = net.peer.take_sent();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].end, End::Finished);
    assert!(
        matches!(s[0].failure, Some(SendFailure::Undelivered { .. })),
        "{:?}",
        s[0].failure
    );
}
