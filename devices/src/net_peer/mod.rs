//! The `peer` net backend: a TCP/IP endpoint inside the VMM, built on smoltcp.
//!
//! The peer is one Ethernet host on the guest's link, by default MAC
//! `52:54:00:00:02:02`, IPv4 `10.0.2.2/24` (the guest is `10.0.2.15`). It answers ARP
//! and ICMP echo, and listens on two TCP ports:
//! - 7878 ([`DEFAULT_PORT`]): each connection carries one transfer from the guest.
//!   Every byte received is checked against an [`Expectation`] the VMM queued for
//!   that connection (its source file, compared byte for byte, and optionally an
//!   XXH3-128 summary), and the outcome is recorded as a [`Received`]
//!   ([`NetPeer::take_results`]).
//! - 7879 ([`DEFAULT_SEND_PORT`]): each connection carries one file to the guest,
//!   the next [`Offer`] the VMM queued ([`NetPeer::offer`]); the outcome is recorded
//!   as a [`Sent`] ([`NetPeer::take_sent`]).
//!
//! The peer has no socket and no thread: the virtio-net device hands it each frame
//! the guest transmitted ([`NetPeer::receive_frame`]), calls [`NetPeer::poll`], and
//! moves what [`NetPeer::take_frames_for_guest`] returns onto the guest's receive
//! queue; [`NetPeer::poll_delay`] says when smoltcp's timers (delayed ACK,
//! retransmission) next need a poll.
//!
//! # Connections
//! Connections are accepted one at a time per port in the order they arrive; a spare
//! listening socket (see [`NetPeerConfig::listeners`]) accepts the next connection
//! while the previous one is still closing, so a guest that connects right after
//! closing is not refused. The peer never closes first on a transfer that goes as
//! agreed: it closes its side when the guest's FIN arrives (passive close, so no
//! TIME-WAIT on the peer).
//!
//! # ACK protocol
//! The guest must know the peer has every byte before it marks the end of a
//! transfer, and the TCP-level ACK of the last segment is not visible to a program.
//! So, on each connection:
//! 1. The guest sends its bytes.
//! 2. When the number of bytes received reaches the expected size, the peer sends
//!    exactly 8 bytes: the number of bytes received so far as a little-endian `u64`.
//!    If the guest's FIN arrives first (short stream, or no expectation was queued),
//!    the peer sends the same 8 bytes, with the short count, at the FIN.
//! 3. The guest reads the 8 bytes, checks the count equals what it sent, and closes
//!    (the peer then closes too). Only then does it mark END.
//!
//! The count is sent once per connection; bytes arriving after it make the result a
//! [`Failure::Long`]. Whether the content matched is not sent to the guest: the VMM
//! reads it from [`NetPeer::take_results`].
//!
//! # Send protocol (port 7879)
//! The mirror image: the receiver, here the guest, says how much it got.
//! 1. The guest connects; the peer takes the next queued [`Offer`] and streams
//!    exactly its `size` bytes of its file, nothing before or after.
//! 2. The guest, which knows the size, reads them all, then sends exactly 8 bytes:
//!    the number of bytes it received, as a little-endian `u64`
//!    (`zc_protocol::ack`).
//! 3. The guest closes; the peer closes at the guest's FIN (passive close).
//!
//! The send is [`Sent::ok`] when the guest's TCP acknowledged every byte, its count
//! arrived and equals the size, and nothing more came from it ([`SendFailure`]).
//! When there is nothing to send (no offer queued, the file cannot be opened or
//! ends early) the peer ends its sending side at once (FIN) after what it sent, so
//! the guest sees a short stream instead of waiting until the run's timeout; the
//! failure is recorded when the guest closes.
//!
//! Memory per sending connection is bounded whatever the file's size or the
//! guest's pace: the file is read in pieces straight into the socket's 512 KiB send
//! ring, only as acknowledgements free room in it, so a guest that stops reading
//! (window closed) or posting receive buffers (nothing acknowledged) holds the peer
//! at one ring of the file, and the frames queued for the guest at their limit.
//!
//! # Cost
//! Per received byte: smoltcp copies the TCP payload into the socket's receive ring
//! (and, unless [`NetPeerConfig::verify_checksums`] is off, sums it for the TCP
//! checksum); the checker reads it in place from that ring to hash it (XXH3-128) and
//! `memcmp` it against the source file read in 1 MiB chunks. Per sent byte: one
//! `read` from the file into the send ring, and smoltcp's copy of it into the frame
//! (with the TCP checksum). Per frame: one smoltcp ingress, no allocation (egress
//! buffers are pooled when the device uses [`NetPeer::drain_frames_for_guest`]).

mod link;
mod send;
mod socket;
mod verify;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use link::{Link, TxQueue};
use send::Outgoing;
pub use send::{Offer, SendFailure, Sent};
pub use socket::SocketPeer;
use verify::StreamVerifier;
pub use verify::{xxh3_128, xxh3_128_of_reader, End, Expectation, Failure, Received};

/// Default peer MAC address.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x02, 0x02];
/// Default peer IPv4 address.
pub const DEFAULT_IP: Ipv4Addr = zc_protocol::addr::PEER_IP;
/// The guest's address in the default network.
pub const DEFAULT_GUEST_IP: Ipv4Addr = zc_protocol::addr::GUEST_IP;
/// Default TCP port the peer receives transfers on.
pub const DEFAULT_PORT: u16 = zc_protocol::addr::PEER_PORT;
/// Default TCP port the peer sends offered files on.
pub const DEFAULT_SEND_PORT: u16 = zc_protocol::addr::PEER_SEND_PORT;
/// Length of an Ethernet header (no VLAN tag, no FCS).
pub const ETHERNET_HEADER_LEN: usize = 14;

/// Most frames the peer queues for the guest before holding further ones back.
const TX_QUEUE_LIMIT: usize = 4096;
/// Send buffer per receiving connection: the peer only ever sends the 8-byte count.
const TX_BUFFER: usize = 4096;
/// Send buffer per sending connection: the most file bytes the peer holds (read,
/// not yet acknowledged) per connection, and so the most it can have in flight. At
/// the guest's 10-40 Gbit/s and a round trip of tens of microseconds through the
/// virtqueues, 512 KiB is several round trips' worth.
const SEND_TX_BUFFER: usize = 512 << 10;
/// Receive buffer per sending connection: the guest only ever sends its count.
const SEND_RX_BUFFER: usize = 4096;

/// Settings of the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetPeerConfig {
    /// The peer's MAC address; must be unicast.
    pub mac: [u8; 6],
    /// The peer's IPv4 address.
    pub ip: Ipv4Addr,
    /// Prefix length of the link's network.
    pub prefix_len: u8,
    /// TCP port to accept transfers from the guest on.
    pub port: u16,
    /// TCP port on which each connection gets the next [`Offer`]ed file; `listeners`
    /// sockets listen on it too.
    pub send_port: u16,
    /// IP MTU of the link (the largest Ethernet frame is this plus 14 bytes). The
    /// guest's `eth0` must use the same.
    pub mtu: usize,
    /// Receive buffer per connection, in bytes: the largest window the peer
    /// advertises (scaled). 64 KiB to 1 GiB.
    pub rx_buffer: usize,
    /// Number of TCP sockets listening on `port`, and on `send_port`: 1 accepts
    /// strictly one connection at a time; 2 (the default) also accepts the next
    /// while one is closing.
    pub listeners: usize,
    /// Verify IPv4/TCP/ICMP checksums of received frames. Turning it off saves one
    /// pass over every payload byte when the device already guarantees them.
    pub verify_checksums: bool,
    /// Seed for smoltcp's initial sequence numbers and ports; fixed by default so
    /// runs are reproducible.
    pub random_seed: u64,
}

impl Default for NetPeerConfig {
    fn default() -> Self {
        NetPeerConfig {
            mac: DEFAULT_MAC,
            ip: DEFAULT_IP,
            prefix_len: 24,
            port: DEFAULT_PORT,
            send_port: DEFAULT_SEND_PORT,
            mtu: 1500,
            rx_buffer: 4 << 20,
            listeners: 2,
            verify_checksums: true,
            random_seed: 0x7a63_7065_6572,
        }
    }
}

/// A peer configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetPeerError {
    /// The MAC address is multicast or all zero.
    #[error("peer MAC {0:02x?} is not a unicast address; use e.g. 52:54:00:00:02:02")]
    BadMac([u8; 6]),
    /// The prefix length is over 32.
    #[error("peer prefix length /{0} is over 32")]
    BadPrefix(u8),
    /// The MTU is out of range.
    #[error("peer MTU {0} is outside 576..=65521 bytes")]
    BadMtu(usize),
    /// The receive buffer is out of range.
    #[error("peer receive buffer of {0} bytes is outside 64 KiB..=1 GiB")]
    BadRxBuffer(usize),
    /// No listening socket, or an absurd number.
    #[error("peer listener count {0} is outside 1..=64")]
    BadListeners(usize),
    /// The port is 0.
    #[error("peer TCP port must not be 0")]
    BadPort,
    /// The send port is 0 or the receive port.
    #[error("peer send port {0} must be neither 0 nor the receive port")]
    BadSendPort(u16),
}

/// Counters of what crossed the peer's link.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Frames received from the guest.
    pub frames_from_guest: u64,
    /// Bytes of those frames (Ethernet header included).
    pub bytes_from_guest: u64,
    /// Frames handed out for the guest.
    pub frames_to_guest: u64,
    /// Bytes of those frames.
    pub bytes_to_guest: u64,
    /// Connections accepted on the receive port.
    pub connections: u64,
    /// Connections accepted on the send port.
    pub send_connections: u64,
    /// Replies for the guest (ARP, ICMP, RST, ACK) dropped because the queue of
    /// frames waiting for it was full: a guest that sends without receiving.
    pub replies_dropped: u64,
}

/// What connections from a given one on have carried so far: the live view of a
/// transfer, for progress reports ([`NetPeer::received_since`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceivedSince {
    /// Connections accepted from that one on (ended or open).
    pub connections: u64,
    /// Payload bytes they carried (checked, in order).
    pub bytes: u64,
    /// What they were expected to carry in all, when every one had an expectation.
    pub expected: Option<u64>,
}

impl ReceivedSince {
    /// The sum over connections' `(bytes, expected)`.
    fn of(connections: impl Iterator<Item = (u64, Option<u64>)>) -> ReceivedSince {
        let mut since = ReceivedSince {
            expected: Some(0),
            ..ReceivedSince::default()
        };
        for (bytes, expected) in connections {
            since.connections += 1;
            since.bytes += bytes;
            since.expected = since.expected.zip(expected).map(|(a, b)| a + b);
        }
        if since.connections == 0 {
            since.expected = None;
        }
        since
    }
}

/// One listening/connected TCP socket and where its connection stands.
struct Conn {
    handle: SocketHandle,
    /// Whether it listens on the send port.
    sends: bool,
    phase: Phase,
}

enum Phase {
    /// Waiting for a SYN.
    Listening,
    /// A connection is carrying a transfer from the guest.
    Active(Box<Transfer>),
    /// A connection is carrying an offered file to the guest.
    Sending(Box<Outgoing>),
    /// The result is recorded; the socket is finishing its close.
    Closing,
}

/// One connection's transfer as it arrives: the check, the times, the count sent.
/// Also what [`SocketPeer`] keeps per connection.
struct Transfer {
    id: u64,
    remote: Option<SocketAddrV4>,
    verifier: StreamVerifier,
    accepted_at: Duration,
    first_byte_at: Option<Duration>,
    last_byte_at: Option<Duration>,
    ack_sent: bool,
}

impl Transfer {
    /// A connection accepted at `t` (time since the peer started).
    fn new(
        id: u64,
        remote: Option<SocketAddrV4>,
        expected: Option<Expectation>,
        t: Duration,
    ) -> Self {
        Transfer {
            id,
            remote,
            verifier: StreamVerifier::new(expected),
            accepted_at: t,
            first_byte_at: None,
            last_byte_at: None,
            ack_sent: false,
        }
    }

    /// Checks `data`, received at `t`.
    fn receive(&mut self, data: &[u8], t: Duration) {
        if data.is_empty() {
            return;
        }
        self.verifier.feed(data);
        let since = t.saturating_sub(self.accepted_at);
        self.first_byte_at.get_or_insert(since);
        self.last_byte_at = Some(since);
    }

    /// Whether every expected byte is in (the moment to send the count).
    fn is_complete(&self) -> bool {
        self.verifier
            .expected_size()
            .is_some_and(|size| self.verifier.bytes() >= size)
    }

    /// The bytes received so far, as the ACK the guest is sent.
    fn count(&self) -> [u8; zc_protocol::ack::ACK_LEN] {
        zc_protocol::ack::encode(self.verifier.bytes())
    }

    /// Ends the check; the record of the connection.
    fn finish(self, end: End) -> Received {
        let v = self.verifier.finish();
        let elapsed = match (self.first_byte_at, self.last_byte_at) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        Received {
            connection: self.id,
            remote: self.remote,
            expected: v.expected,
            bytes: v.bytes,
            xxh3_128: v.xxh3_128,
            hash_ok: v.hash_ok,
            content_ok: v.content_ok,
            failure: v.failure,
            end,
            ack_sent: self.ack_sent,
            accepted_at: self.accepted_at,
            first_byte_at: self.first_byte_at,
            last_byte_at: self.last_byte_at,
            elapsed,
        }
    }
}

/// The `peer` backend: see the [module documentation](self).
pub struct NetPeer {
    config: NetPeerConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    expectations: VecDeque<Expectation>,
    results: Vec<Received>,
    offers: VecDeque<Offer>,
    sent: Vec<Sent>,
    tx: TxQueue,
    caps: DeviceCapabilities,
    epoch: Instant,
    next_id: u64,
    next_send_id: u64,
    stats: PeerStats,
}

impl std::fmt::Debug for NetPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetPeer")
            .field("config", &self.config)
            .field("expectations", &self.expectations.len())
            .field("results", &self.results.len())
            .field("offers", &self.offers.len())
            .field("sent", &self.sent.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl NetPeer {
    /// Creates the peer; `now` is its time origin (the times in results count from it).
    pub fn new(config: NetPeerConfig, now: Instant) -> Result<Self, NetPeerError> {
        let mac = EthernetAddress(config.mac);
        if !mac.is_unicast() {
            return Err(NetPeerError::BadMac(config.mac));
        }
        if config.prefix_len > 32 {
            return Err(NetPeerError::BadPrefix(config.prefix_len));
        }
        if !(576..=65521).contains(&config.mtu) {
            return Err(NetPeerError::BadMtu(config.mtu));
        }
        if !(64 << 10..=1 << 30).contains(&config.rx_buffer) {
            return Err(NetPeerError::BadRxBuffer(config.rx_buffer));
        }
        if !(1..=64).contains(&config.listeners) {
            return Err(NetPeerError::BadListeners(config.listeners));
        }
        if config.port == 0 {
            return Err(NetPeerError::BadPort);
        }
        if config.send_port == 0 || config.send_port == config.port {
            return Err(NetPeerError::BadSendPort(config.send_port));
        }

        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = config.mtu + ETHERNET_HEADER_LEN;
        if !config.verify_checksums {
            let mut c = ChecksumCapabilities::default();
            c.ipv4 = Checksum::Tx;
            c.tcp = Checksum::Tx;
            c.udp = Checksum::Tx;
            c.icmpv4 = Checksum::Tx;
            caps.checksum = c;
        }

        let mut tx = TxQueue {
            limit: TX_QUEUE_LIMIT,
            ..TxQueue::default()
        };
        let mut iface_config = Config::new(HardwareAddress::Ethernet(mac));
        iface_config.random_seed = config.random_seed;
        let mut link = Link {
            rx: None,
            tx: &mut tx,
            caps: &caps,
        };
        let mut iface = Interface::new(iface_config, &mut link, smol_instant(Duration::ZERO));
        iface.update_ip_addrs(|addrs| {
            // Cannot fail: the list holds up to smoltcp's address count (2) and is empty.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(config.ip), config.prefix_len));
        });

        let mut sockets = SocketSet::new(Vec::new());
        let mut conns = Vec::with_capacity(2 * config.listeners);
        for sends in [false, true] {
            for _ in 0..config.listeners {
                let (rx, tx, port) = if sends {
                    (SEND_RX_BUFFER, SEND_TX_BUFFER, config.send_port)
                } else {
                    (config.rx_buffer, TX_BUFFER, config.port)
                };
                let mut socket = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; rx]),
                    tcp::SocketBuffer::new(vec![0; tx]),
                );
                // Cannot fail: the port is not 0 and the socket is closed.
                let _ = socket.listen(port);
                conns.push(Conn {
                    handle: sockets.add(socket),
                    sends,
                    phase: Phase::Listening,
                });
            }
        }

        Ok(NetPeer {
            config,
            iface,
            sockets,
            conns,
            expectations: VecDeque::new(),
            results: Vec::new(),
            offers: VecDeque::new(),
            sent: Vec::new(),
            tx,
            caps,
            epoch: now,
            next_id: 0,
            next_send_id: 0,
            stats: PeerStats::default(),
        })
    }

    /// The configuration the peer runs with.
    pub fn config(&self) -> &NetPeerConfig {
        &self.config
    }

    /// Queues what the next not-yet-accepted connection must carry.
    pub fn expect(&mut self, expectation: Expectation) {
        self.expectations.push_back(expectation);
    }

    /// Expectations queued and not yet taken by a connection.
    pub fn pending_expectations(&self) -> usize {
        self.expectations.len()
    }

    /// The labels of the expectations no connection has taken yet, in order.
    pub fn pending_expectation_labels(&self) -> Vec<&str> {
        self.expectations.iter().map(|e| e.label.as_str()).collect()
    }

    /// Queues the file the next not-yet-accepted connection to the send port gets.
    pub fn offer(&mut self, offer: Offer) {
        self.offers.push_back(offer);
    }

    /// The labels of the offers no connection has taken yet, in order.
    pub fn pending_offer_labels(&self) -> Vec<&str> {
        self.offers.iter().map(|o| o.label.as_str()).collect()
    }

    /// Takes the records of the send-port connections that ended, in the order they
    /// ended.
    pub fn take_sent(&mut self) -> Vec<Sent> {
        std::mem::take(&mut self.sent)
    }

    /// Send-port records not yet taken.
    pub fn sent(&self) -> &[Sent] {
        &self.sent
    }

    /// Processes one Ethernet frame the guest transmitted (without the virtio-net
    /// header). Replies it causes (ARP, ICMP, RST) are queued for the guest at once;
    /// data ACKs wait for [`poll`](Self::poll).
    pub fn receive_frame(&mut self, frame: &[u8], now: Instant) {
        self.stats.frames_from_guest += 1;
        self.stats.bytes_from_guest += frame.len() as u64;
        let t = now.saturating_duration_since(self.epoch);
        let mut link = Link {
            rx: Some(frame),
            tx: &mut self.tx,
            caps: &self.caps,
        };
        let result = self
            .iface
            .poll_ingress_single(smol_instant(t), &mut link, &mut self.sockets);
        if result == smoltcp::iface::PollIngressSingleResult::SocketStateChanged {
            // Serviced per frame so connections are taken in arrival order and data
            // is never left in a socket that a following RST would clear.
            self.service(t);
        }
    }

    /// Runs the stack: reads and checks received data, sends the count when a
    /// transfer is complete, refills the send rings from the offered files, and
    /// emits data, ACKs, window updates and retransmissions.
    pub fn poll(&mut self, now: Instant) {
        let t = now.saturating_duration_since(self.epoch);
        self.service(t);
        let mut link = Link {
            rx: None,
            tx: &mut self.tx,
            caps: &self.caps,
        };
        let result = self
            .iface
            .poll(smol_instant(t), &mut link, &mut self.sockets);
        if result == smoltcp::iface::PollResult::SocketStateChanged {
            self.service(t);
        }
    }

    /// How long until the stack's next timer needs a [`poll`](Self::poll); `None`
    /// when nothing is pending, zero when a poll is due now.
    pub fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        let t = now.saturating_duration_since(self.epoch);
        self.iface
            .poll_delay(smol_instant(t), &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Whether frames are waiting for the guest.
    pub fn has_frames_for_guest(&self) -> bool {
        !self.tx.frames.is_empty()
    }

    /// Takes the Ethernet frames queued for the guest, oldest first.
    pub fn take_frames_for_guest(&mut self) -> Vec<Vec<u8>> {
        let frames = std::mem::take(&mut self.tx.frames);
        self.count_to_guest(&frames);
        frames
    }

    /// Hands each queued frame for the guest to `f`, oldest first, and keeps the
    /// buffers for reuse (no allocation per frame).
    pub fn drain_frames_for_guest(&mut self, mut f: impl FnMut(&[u8])) {
        let frames = std::mem::take(&mut self.tx.frames);
        self.count_to_guest(&frames);
        for frame in frames {
            f(&frame);
            self.tx.recycle(frame);
        }
    }

    fn count_to_guest(&mut self, frames: &[Vec<u8>]) {
        self.stats.frames_to_guest += frames.len() as u64;
        self.stats.bytes_to_guest += frames.iter().map(|f| f.len() as u64).sum::<u64>();
    }

    /// Takes the results of the connections that ended, in the order they ended.
    pub fn take_results(&mut self) -> Vec<Received> {
        std::mem::take(&mut self.results)
    }

    /// Results recorded and not yet taken.
    pub fn results(&self) -> &[Received] {
        &self.results
    }

    /// Connections accepted (on either port) whose result is not recorded yet.
    pub fn active_connections(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| matches!(c.phase, Phase::Active(_) | Phase::Sending(_)))
            .count()
    }

    /// What the next connection is expected to carry, if an expectation is queued.
    pub fn next_expected_size(&self) -> Option<u64> {
        self.expectations.front().map(|e| e.size)
    }

    /// Payload bytes received on connections numbered `first` and later, ended or
    /// still open. A caller that notes [`PeerStats::connections`] at the start of a
    /// transfer gets that transfer's bytes so far.
    pub fn received_since(&self, first: u64) -> ReceivedSince {
        let ended = self
            .results
            .iter()
            .filter(|r| r.connection >= first)
            .map(|r| (r.bytes, r.expected.as_ref().map(|e| e.size)));
        let open = self.conns.iter().filter_map(|c| match &c.phase {
            Phase::Active(t) if t.id >= first => {
                Some((t.verifier.bytes(), t.verifier.expected_size()))
            }
            _ => None,
        });
        ReceivedSince::of(ended.chain(open))
    }

    /// The send port's [`NetPeer::received_since`]: over its connections numbered
    /// `first` and later (`PeerStats::send_connections` counts them), finished or
    /// still open, the bytes the guest's TCP acknowledged and what they are to carry.
    pub fn sent_since(&self, first: u64) -> ReceivedSince {
        let ended = self
            .sent
            .iter()
            .filter(|s| s.connection >= first)
            .map(|s| (s.bytes_acked, s.offer.as_ref().map(|o| o.size)));
        let open = self.conns.iter().filter_map(|c| match &c.phase {
            Phase::Sending(o) if o.id >= first => Some((o.acked(), o.size())),
            _ => None,
        });
        ReceivedSince::of(ended.chain(open))
    }

    /// The size of the next file offered, if one is queued.
    pub fn next_offer_size(&self) -> Option<u64> {
        self.offers.front().map(|o| o.size)
    }

    /// Counters of frames and connections.
    pub fn stats(&self) -> PeerStats {
        PeerStats {
            replies_dropped: self.tx.dropped,
            ..self.stats
        }
    }

    /// Ends every open connection now (reset), recording its result with
    /// [`End::Finished`]; for the end of a run, so no transfer goes unreported.
    pub fn finish(&mut self, now: Instant) {
        let t = now.saturating_duration_since(self.epoch);
        self.service(t);
        for conn in &mut self.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            match std::mem::replace(&mut conn.phase, Phase::Closing) {
                Phase::Active(transfer) => {
                    socket.abort();
                    self.results.push(transfer.finish(End::Finished));
                }
                Phase::Sending(outgoing) => {
                    socket.abort();
                    self.sent.push(outgoing.finish(End::Finished));
                }
                other => conn.phase = other,
            }
        }
        self.poll(now);
    }

    /// Moves every connection forward: accepts, reads and checks data, sends the
    /// count, fills send rings from offered files, records results and re-arms
    /// listeners.
    fn service(&mut self, t: Duration) {
        let NetPeer {
            conns,
            sockets,
            expectations,
            results,
            offers,
            sent,
            config,
            next_id,
            next_send_id,
            stats,
            ..
        } = self;
        for conn in conns.iter_mut() {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            let port = if conn.sends {
                config.send_port
            } else {
                config.port
            };
            if let Phase::Listening = conn.phase {
                match socket.state() {
                    tcp::State::Listen => continue,
                    tcp::State::Closed => {
                        let _ = socket.listen(port);
                        continue;
                    }
                    _ => {
                        let remote = socket.remote_endpoint().and_then(|ep| match ep.addr {
                            IpAddress::Ipv4(a) => Some(SocketAddrV4::new(a, ep.port)),
                            // Only reachable if another crate enables smoltcp's IPv6.
                            #[allow(unreachable_patterns)]
                            _ => None,
                        });
                        conn.phase = if conn.sends {
                            *next_send_id += 1;
                            stats.send_connections += 1;
                            Phase::Sending(Box::new(Outgoing::new(
                                *next_send_id - 1,
                                remote,
                                offers.pop_front(),
                                t,
                            )))
                        } else {
                            *next_id += 1;
                            stats.connections += 1;
                            Phase::Active(Box::new(Transfer::new(
                                *next_id - 1,
                                remote,
                                expectations.pop_front(),
                                t,
                            )))
                        };
                    }
                }
            }
            match &mut conn.phase {
                Phase::Listening => {}
                Phase::Closing => {
                    if socket.state() == tcp::State::Closed {
                        let _ = socket.listen(port);
                        conn.phase = Phase::Listening;
                    }
                }
                Phase::Active(transfer) => {
                    let fin = drain(socket, |data| transfer.receive(data, t));
                    let state = socket.state();
                    if !transfer.ack_sent && (transfer.is_complete() || fin) && socket.can_send() {
                        let count = transfer.count();
                        // The send buffer is empty and larger than 8 bytes: all fit.
                        transfer.ack_sent = socket.send_slice(&count) == Ok(count.len());
                    }
                    if fin {
                        socket.close();
                        if let Phase::Active(tr) =
                            std::mem::replace(&mut conn.phase, Phase::Closing)
                        {
                            results.push(tr.finish(End::Fin));
                        }
                    } else if state == tcp::State::Listen {
                        // Reset during the handshake: no transfer happened. Give the
                        // expectation back to the next connection.
                        if let Phase::Active(tr) =
                            std::mem::replace(&mut conn.phase, Phase::Listening)
                        {
                            if let Some(exp) = tr.verifier.finish().expected {
                                expectations.push_front(exp);
                            }
                            *next_id -= 1;
                            stats.connections -= 1;
                        }
                    } else if !socket.is_active() {
                        // Reset or timed out before the guest's FIN.
                        if let Phase::Active(tr) =
                            std::mem::replace(&mut conn.phase, Phase::Closing)
                        {
                            results.push(tr.finish(End::Reset));
                        }
                    }
                }
                Phase::Sending(outgoing) => {
                    let fin = drain(socket, |data| outgoing.receive(data, t));
                    outgoing.pump(socket, t);
                    let state = socket.state();
                    let end = if fin {
                        // Passive close: whatever is still in the ring goes out first.
                        socket.close();
                        Some(End::Fin)
                    } else if state == tcp::State::Listen {
                        // Reset during the handshake: give the offer back.
                        if let Phase::Sending(out) =
                            std::mem::replace(&mut conn.phase, Phase::Listening)
                        {
                            if let Some(offer) = out.into_offer() {
                                offers.push_front(offer);
                            }
                            *next_send_id -= 1;
                            stats.send_connections -= 1;
                        }
                        None
                    } else if !socket.is_active() {
                        Some(End::Reset)
                    } else {
                        None
                    };
                    if let Some(end) = end {
                        if let Phase::Sending(out) =
                            std::mem::replace(&mut conn.phase, Phase::Closing)
                        {
                            sent.push(out.finish(end));
                        }
                    }
                }
            }
        }
    }
}

/// Hands everything buffered in `socket` to `take`; `true` once the guest's FIN has
/// been reached.
fn drain(socket: &mut tcp::Socket<'_>, mut take: impl FnMut(&[u8])) -> bool {
    loop {
        match socket.recv(|buf| {
            take(buf);
            (buf.len(), buf.len())
        }) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(tcp::RecvError::Finished) => return true,
            Err(tcp::RecvError::InvalidState) => return false,
        }
    }
}

fn smol_instant(t: Duration) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(i64::try_from(t.as_micros()).unwrap_or(i64::MAX))
}
