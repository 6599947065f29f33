//! A hostile guest against the net device and its TCP peer: it transmits as fast as
//! it can (pings that each get a reply, garbage frames) and posts no receive
//! buffers, so nothing the peer answers can be delivered. The VMM's memory must stay
//! bounded. Each scenario runs in a child process (this test binary again), which
//! prints how much its peak RSS (`VmHWM`) grew; the parent checks the bound.

use std::io::Write as _;
use std::process::Command;
use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::net_peer::{NetPeerConfig, DEFAULT_MAC as PEER_MAC};
use crate::virtio::test_util::{leaked_memory, MockQueue};
use crate::virtio::{low32, VIRTIO_F_VERSION_1};

/// Set in the child: which scenario to run and how much to push.
const FLOOD_CHILD: &str = "ZC_TEST_NET_FLOOD";
/// What the child prints: its peak RSS growth in KiB, then what it pushed.
const GROWTH: &str = "zc-test: peak rss growth KiB ";
/// The bound the scenarios must stay under. Generous: the fixed costs are the peer's
/// socket buffers (2 x 4 MiB), the device's pending queue (1024 frames), the DMA
/// log's batch (up to 8 MiB of copies, twice) and the allocator's slack.
const BOUND_KIB: u64 = 64 << 10;

const GUEST_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 15);
const PEER_IP: Ipv4Address = Ipv4Address::new(10, 0, 2, 2);

fn eth(dst: EthernetAddress, ethertype: EthernetProtocol) -> EthernetRepr {
    EthernetRepr {
        src_addr: EthernetAddress(DEFAULT_GUEST_MAC),
        dst_addr: dst,
        ethertype,
    }
}

/// ARP who-has the peer: its answer puts the guest in the peer's neighbour cache.
fn arp_request() -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(DEFAULT_GUEST_MAC),
        source_protocol_addr: GUEST_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: PEER_IP,
    };
    let e = eth(EthernetAddress::BROADCAST, EthernetProtocol::Arp);
    let mut frame = vec![0u8; e.buffer_len() + arp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame);
    e.emit(&mut f);
    arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
    frame
}

/// An ICMP echo request to the peer with `len` bytes of data: the peer answers
/// each with a reply as large.
fn ping(len: usize, seq_no: u16) -> Vec<u8> {
    let data = vec![0x5a; len];
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 0x7a63,
        seq_no,
        data: &data,
    };
    let ip = Ipv4Repr {
        src_addr: GUEST_IP,
        dst_addr: PEER_IP,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let e = eth(EthernetAddress(PEER_MAC), EthernetProtocol::Ipv4);
    let caps = ChecksumCapabilities::default();
    let mut frame = vec![0u8; e.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut frame);
    e.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
    frame
}

/// A full-size frame of noise addressed to the peer.
fn garbage(seed: u64) -> Vec<u8> {
    let mut frame = crate::virtio::test_util::noise(seed, 1514);
    frame[..6].copy_from_slice(&PEER_MAC);
    frame
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Runs scenario `name` in a child process; returns its peak RSS growth in KiB.
fn growth_in_child(name: &str, test: &str) -> u64 {
    let o = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(FLOOD_CHILD, name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{name}: {o:?}");
    let (_, after) = stdout
        .split_once(GROWTH)
        .unwrap_or_else(|| panic!("{name} printed no figure: {stdout}"));
    let line = after.lines().next().unwrap();
    eprintln!("{name}: peak RSS growth KiB {line}");
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// The child's report: growth of the peak over the RSS before the flood.
fn report(before_kib: u64, what: &str) {
    let grew = status_kib("VmHWM:").saturating_sub(before_kib);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{GROWTH}{grew} ({what})").unwrap();
    out.flush().unwrap();
}

/// The peer alone, handed pings (200 000 by default) it answers while nothing takes the
/// answers: what happens inside one TX batch that never ends (the device serves
/// the TX queue for as long as the guest keeps it filled, and collects the peer's
/// frames only after).
fn peer_flood() {
    let mut peer = NetPeer::new(NetPeerConfig::default(), Instant::now()).unwrap();
    let arp = arp_request();
    let pings: Vec<Vec<u8>> = (0..64).map(|i| ping(1400, i)).collect();
    let before = status_kib("VmRSS:");
    let now = Instant::now();
    peer.receive_frame(&arp, now);
    let frames = flood_size("ZC_TEST_NET_FLOOD_PINGS", 200_000);
    for i in 0..frames {
        peer.receive_frame(&pings[(i % 64) as usize], now);
    }
    let s = peer.stats();
    assert_eq!(s.frames_to_guest, 0, "nothing took the answers");
    report(
        before,
        &format!(
            "{frames} pings of 1442 bytes; {} answers dropped",
            s.replies_dropped
        ),
    );
}

/// The device in front of the peer, driven through its TX queue like a guest that
/// keeps the queue full and posts no RX buffers, until `total` bytes of frames went
/// out; the DMA log on (to a sink), as in a run.
fn device_flood(total: u64) {
    const QSIZE: u16 = 256;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x1_0000;
    const USED_RX: u64 = 0x2_0000;
    const USED_TX: u64 = 0x3_0000;
    const BUFS: u64 = 0x4_0000;
    const SLOT: u64 = 2048;
    let mem = leaked_memory(BUFS + u64::from(QSIZE) * SLOT);
    let log = crate::dma_log::DmaLog::new(std::io::sink()).unwrap();
    let peer = NetPeer::new(NetPeerConfig::default(), Instant::now()).unwrap();
    let mut dev = Net::new(peer, NetOptions::default(), log).unwrap();
    let rxq = MockQueue::create(mem, GuestAddress(RX_RING), QSIZE);
    let txq = MockQueue::create(mem, GuestAddress(TX_RING), QSIZE);
    let (_, irq) = crate::virtio::test_util::counting_interrupt();
    let mut rx: Queue = rxq.create_queue().unwrap();
    let mut tx: Queue = txq.create_queue().unwrap();
    rx.set_used_ring_address(Some(low32(USED_RX)), Some(0));
    tx.set_used_ring_address(Some(low32(USED_TX)), Some(0));
    dev.activate(mem.clone(), vec![rx, tx], irq, VIRTIO_F_VERSION_1)
        .unwrap();
    // Slot 0 an ARP request (keeps the peer's neighbour entry fresh), then pings
    // (each answered) and every fourth a garbage frame; each behind a zeroed
    // 12-byte virtio-net header in the same buffer.
    let mut bytes_per_round = 0u64;
    let mut chains = Vec::new();
    for slot in 0..u64::from(QSIZE) {
        let frame = match slot {
            0 => arp_request(),
            s if s % 4 == 3 => garbage(s),
            s => ping(1400, u16::try_from(s).unwrap()),
        };
        let addr = BUFS + slot * SLOT;
        mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(addr))
            .unwrap();
        mem.write_slice(&frame, GuestAddress(addr + NET_HDR_LEN as u64))
            .unwrap();
        let len = u32::try_from(NET_HDR_LEN + frame.len()).unwrap();
        chains.push(crate::virtio::test_util::raw(addr, len, 0, 0));
        bytes_per_round += frame.len() as u64;
    }
    // The first round through the mock; later ones only move the available index
    // on by a queue's worth (slot i of the ring keeps naming chain i).
    txq.add_desc_chains(&chains, 0).unwrap();
    let avail_idx = GuestAddress(txq.avail_addr().0 + 2);
    let before = status_kib("VmRSS:");
    let mut sent = 0u64;
    let mut rounds = 0u32;
    while sent < total {
        if rounds > 0 {
            // The ring index is 16 bits and wraps.
            #[allow(clippy::cast_possible_truncation, reason = "wraps like the ring index")]
            let idx = ((rounds + 1) * u32::from(QSIZE)) as u16;
            mem.write_obj(idx, avail_idx).unwrap();
        }
        dev.process_queue(TX_QUEUE);
        rounds += 1;
        sent += bytes_per_round;
    }
    let s = dev.stats();
    let posted = u64::from(rounds) * u64::from(QSIZE);
    assert_eq!(s.tx_frames + s.tx_dropped, posted, "every frame was served");
    assert!(
        s.tx_bytes > sent / 2,
        "{} of {sent} bytes reached the peer",
        s.tx_bytes
    );
    report(
        before,
        &format!(
            "{} MiB in {} frames; {} answers undeliverable, {} pending",
            sent >> 20,
            s.tx_frames,
            s.rx_dropped,
            dev.pending_frames()
        ),
    );
}

/// `var` from the environment, else `default`: the tests push enough to show a
/// growing queue within a debug build's patience; the figures in docs/design.md
/// were taken with larger ones.
fn flood_size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn child_scenario() -> Option<String> {
    std::env::var(FLOOD_CHILD).ok()
}

const TEST_PREFIX: &str = "virtio::net::flood_tests::";

#[test]
fn a_peer_answering_pings_nobody_takes_keeps_memory_bounded() {
    if child_scenario().is_some() {
        return peer_flood();
    }
    let name = "a_peer_answering_pings_nobody_takes_keeps_memory_bounded";
    let grew = growth_in_child("peer", &format!("{TEST_PREFIX}{name}"));
    assert!(grew < BOUND_KIB, "peak RSS grew {grew} KiB");
}

#[test]
fn a_guest_flooding_with_no_rx_buffers_keeps_memory_bounded() {
    if child_scenario().is_some() {
        return device_flood(flood_size("ZC_TEST_NET_FLOOD_BYTES", 64 << 20));
    }
    let name = "a_guest_flooding_with_no_rx_buffers_keeps_memory_bounded";
    let grew = growth_in_child("device", &format!("{TEST_PREFIX}{name}"));
    assert!(grew < BOUND_KIB, "peak RSS grew {grew} KiB");
}
