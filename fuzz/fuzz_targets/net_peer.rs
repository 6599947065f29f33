//! Fuzzes the TCP peer (`NetPeer`, the `peer` net backend) with the Ethernet frames a
//! guest could transmit: raw frames of any content, and TCP segments, ARP requests
//! the harness builds from a few input bytes with valid checksums and sequence
//! numbers that follow the peer's (so the fuzzer gets past the handshake into data
//! transfer, the count the peer sends back, FIN and RST handling).
//!
//! Input: a flag byte (verify checksums or not, one or two listeners), two
//! expectations (size and kind: sized, sized with XXH3-128, or a source file compared
//! byte for byte), two offers for the send port (the sizes of files the peer sends),
//! then operations until the input ends: a raw frame, a TCP segment (guest port,
//! which of the peer's ports, control flag, ACK, sequence numbers automatic or raw,
//! window, payload: on the send port the guest's count, or anything), an ARP
//! request, or time passing (then `poll`). Time is virtual.
//!
//! Checked, besides "no panic": no frame for the guest exceeds the MTU plus the
//! Ethernet header; a connection that ended without a failure carried exactly its
//! expected size; a result whose content or hash is known good has no failure of
//! that kind; a send that ended without a failure had every byte acknowledged and
//! counted by the guest.
//!
//! Counters (`ZC_FUZZ_STATS=1`): inputs that got a connection, results (by how they ended,
//! with the count sent), payload bytes checked, content mismatches, frames to the
//! guest.

#![no_main]

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::stats::count;
use common::Input;
use libfuzzer_sys::fuzz_target;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber,
};
use zc_devices::net_peer::{
    xxh3_128, End, Expectation, Failure, NetPeer, NetPeerConfig, Offer, SendFailure,
    DEFAULT_GUEST_IP, DEFAULT_MAC,
};
use zc_devices::virtio::net::DEFAULT_GUEST_MAC;

const MAX_OPS: usize = 48;
/// The byte at offset `i` of every expected stream.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The source file of a byte-for-byte expectation of `len` bytes.
fn source_file(len: usize) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = std::path::Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("zc-fuzz-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        dir
    });
    let path = dir.join(format!("source-{len}"));
    if !path.exists() {
        std::fs::write(&path, pattern(len)).expect("write the source file");
    }
    path
}

/// One guest connection as the harness drives it.
#[derive(Debug, Default, Clone, Copy)]
struct Conn {
    /// The guest's next sequence number.
    next_seq: u32,
    /// What the guest acknowledges next: the peer's next sequence number, once seen.
    peer_next: Option<u32>,
}

struct Harness {
    peer: NetPeer,
    config: NetPeerConfig,
    epoch: Instant,
    now: Duration,
    conns: BTreeMap<u16, Conn>,
    connections: u64,
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let config = NetPeerConfig {
        verify_checksums: flags & 1 != 0,
        listeners: 1 + usize::from(flags >> 1 & 1),
        rx_buffer: 64 << 10,
        ..NetPeerConfig::default()
    };
    let epoch = Instant::now();
    let mut peer = NetPeer::new(config.clone(), epoch).expect("a valid configuration");
    for _ in 0..2 {
        let (kind, size) = (inp.u8(), usize::from(inp.u8()));
        let expectation = match kind % 3 {
            0 => Expectation::sized("fuzz", size as u64),
            1 => Expectation::sized("fuzz", size as u64).with_xxh3_128(xxh3_128(&pattern(size))),
            _ => Expectation::of_file("fuzz", &source_file(size)).expect("the source file"),
        };
        peer.expect(expectation);
    }
    for _ in 0..2 {
        let size = usize::from(inp.u16() % 8192);
        peer.offer(Offer::of_file("fuzz", &source_file(size)).expect("the source file"));
    }
    let mut h = Harness {
        peer,
        config,
        epoch,
        now: Duration::ZERO,
        conns: BTreeMap::new(),
        connections: 0,
    };
    count("inputs", 1);
    for _ in 0..MAX_OPS {
        let kind = inp.u8();
        match kind % 5 {
            0 => {
                let len = usize::from(inp.u16() % 1600);
                let frame = inp.take(len).to_vec();
                h.send(&frame);
            }
            1 | 2 => h.tcp(&mut inp),
            3 => h.arp(),
            _ => {
                h.now += Duration::from_millis(u64::from(inp.u16()));
                h.peer.poll(h.epoch + h.now);
                h.after();
            }
        }
        if inp.is_empty() {
            break;
        }
    }
    // Let every timer run out.
    for _ in 0..4 {
        h.now += Duration::from_secs(30);
        h.peer.poll(h.epoch + h.now);
        h.after();
    }
    count("inputs_with_a_connection", u64::from(h.connections > 0));
});

impl Harness {
    fn send(&mut self, frame: &[u8]) {
        self.peer.receive_frame(frame, self.epoch + self.now);
        self.after();
    }

    /// Takes the peer's frames and results and checks them.
    fn after(&mut self) {
        let limit = self.config.mtu + 14;
        let mut seen = Vec::new();
        self.peer.drain_frames_for_guest(|frame| {
            assert!(
                frame.len() <= limit,
                "a {}-byte frame for the guest",
                frame.len()
            );
            seen.push(frame.to_vec());
        });
        count("frames_to_guest", seen.len() as u64);
        for frame in &seen {
            self.track(frame);
        }
        // Not monotonic: a connection reset during its handshake is taken back.
        self.connections = self.connections.max(self.peer.stats().connections);
        for r in self.peer.take_results() {
            count("results", 1);
            count(
                match r.end {
                    End::Fin => "results_ended_by_fin",
                    End::Reset => "results_ended_by_reset",
                    End::Finished => "results_finished",
                },
                1,
            );
            count("results_with_count_sent", u64::from(r.ack_sent));
            count("payload_bytes_checked", r.bytes);
            if let (None, Some(e)) = (&r.failure, &r.expected) {
                assert_eq!(
                    r.bytes, e.size,
                    "no failure, yet not the expected size: {r:?}"
                );
                count("results_ok", 1);
            }
            if matches!(r.failure, Some(Failure::Mismatch { .. })) {
                count("content_mismatches", 1);
                assert_ne!(r.content_ok, Some(true), "{r:?}");
            }
            if matches!(r.failure, Some(Failure::HashMismatch { .. })) {
                assert_ne!(r.hash_ok, Some(true), "{r:?}");
            }
        }
        for s in self.peer.take_sent() {
            count("sends", 1);
            count("send_bytes_acked", s.bytes_acked);
            count("sends_with_a_count", u64::from(s.guest_count.is_some()));
            count(
                match s.failure {
                    None => "sends_ok",
                    Some(SendFailure::NoOffer) => "sends_without_offer",
                    Some(SendFailure::Source { .. }) => "sends_source_failed",
                    Some(SendFailure::Undelivered { .. }) => "sends_undelivered",
                    Some(SendFailure::NoCount { .. }) => "sends_without_count",
                    Some(SendFailure::WrongCount { .. }) => "sends_wrong_count",
                    Some(SendFailure::ExtraBytes { .. }) => "sends_extra_bytes",
                },
                1,
            );
            if s.failure.is_none() {
                let size = s.offer.as_ref().map(|o| o.size);
                assert_eq!(
                    (Some(s.bytes_acked), s.guest_count),
                    (size, size),
                    "no failure, yet not every byte acknowledged and counted: {s:?}"
                );
            }
        }
    }

    /// Follows the peer's sequence numbers in the TCP segments it sends the guest.
    fn track(&mut self, frame: &[u8]) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return;
        };
        if eth.ethertype() != EthernetProtocol::Ipv4 {
            return;
        }
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        if ip.next_header() != IpProtocol::Tcp {
            return;
        }
        let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else {
            return;
        };
        let len = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
        let conn = self.conns.entry(tcp.dst_port()).or_default();
        let next = (tcp.seq_number() + len as usize).0 as u32;
        conn.peer_next = Some(next);
        if tcp.syn() && tcp.ack() {
            count("syn_acks", 1);
        }
    }

    fn tcp(&mut self, inp: &mut Input) {
        let ctl = inp.u8();
        let port = 40000 + u16::from(ctl & 3);
        // Guest ports 40002 and 40003 talk to the send port, the others to the
        // receive port: each connection keeps its peer port.
        let peer_port = if ctl & 2 != 0 {
            self.config.send_port
        } else {
            self.config.port
        };
        let control = match ctl >> 2 & 7 {
            0 | 5 => TcpControl::None,
            1 => TcpControl::Syn,
            2 => TcpControl::Fin,
            3 => TcpControl::Rst,
            _ => TcpControl::Psh,
        };
        let with_ack = ctl & 0x20 != 0;
        let raw_numbers = ctl & 0x40 != 0;
        let window_len = inp.u16();
        let payload_len = usize::from(inp.u8());
        let (raw_seq, raw_ack) = if raw_numbers {
            (inp.u32(), inp.u32())
        } else {
            (0, 0)
        };
        let payload = inp.take(payload_len).to_vec();
        let conn = self.conns.entry(port).or_insert(Conn {
            next_seq: 0x1000_0000,
            peer_next: None,
        });
        let seq = if raw_numbers { raw_seq } else { conn.next_seq };
        let ack = if raw_numbers {
            Some(raw_ack)
        } else {
            conn.peer_next
        };
        let syn = control == TcpControl::Syn;
        let repr = TcpRepr {
            src_port: port,
            dst_port: peer_port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.filter(|_| with_ack).map(|a| TcpSeqNumber(a as i32)),
            window_len,
            window_scale: if syn && ctl & 0x80 != 0 {
                Some(7)
            } else {
                None
            },
            max_seg_size: if syn { Some(1460) } else { None },
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &payload,
        };
        let used = payload.len() as u32 + u32::from(syn) + u32::from(control == TcpControl::Fin);
        conn.next_seq = seq.wrapping_add(used);
        let frame = ipv4_tcp(&self.config, &repr);
        self.send(&frame);
    }

    fn arp(&mut self) {
        let repr = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(DEFAULT_GUEST_MAC),
            source_protocol_addr: DEFAULT_GUEST_IP,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: self.config.ip,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(DEFAULT_GUEST_MAC),
            dst_addr: EthernetAddress::BROADCAST,
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0u8; eth.buffer_len() + repr.buffer_len()];
        let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut frame);
        repr.emit(&mut ArpPacket::new_unchecked(frame.payload_mut()));
        self.send(&buf);
    }
}

/// An Ethernet frame from the guest to the peer carrying `tcp`, checksums filled in.
fn ipv4_tcp(config: &NetPeerConfig, tcp: &TcpRepr) -> Vec<u8> {
    let guest: Ipv4Addr = DEFAULT_GUEST_IP;
    let ip = Ipv4Repr {
        src_addr: guest,
        dst_addr: config.ip,
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(DEFAULT_GUEST_MAC),
        dst_addr: EthernetAddress(DEFAULT_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &caps);
    tcp.emit(
        &mut TcpPacket::new_unchecked(packet.payload_mut()),
        &IpAddress::Ipv4(guest),
        &IpAddress::Ipv4(config.ip),
        &caps,
    );
    buf
}
