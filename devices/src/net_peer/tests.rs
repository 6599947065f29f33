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
        let (pcap, rx) = (&mut self.pcap, &mut self.dev.rx);
        let t = self.t;
        self.peer.drain_frames_for_guest(|frame| {
            if let Some(p) = pcap {
                p.write_frame_at(t, frame).unwrap();
            }
            rx.push_back(frame.to_vec());
            moved += 1;
        });
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
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 1 << 20]),
            tcp::SocketBuffer::new(vec![0; 64 << 10]),
        );
        socket
            .connect(
                self.guest.context(),
                (IpAddress::v4(10, 0, 2, 2), DEFAULT_PORT),
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
