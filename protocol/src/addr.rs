//! The I/O ports and network addresses the guest and the VMM (and its peer) must
//! agree on.

use std::net::{Ipv4Addr, SocketAddrV4};

/// I/O base of COM2, the control UART (`ttyS1`) the guest writes control lines to.
pub const CONTROL_UART_BASE: u16 = 0x2f8;

/// The dirty-page sample port: the guest writes a chunk number to it (`outl`) and
/// the VMM scans and clears the dirty pages before the vCPU resumes.
pub const DIRTY_SAMPLE_PORT: u16 = 0x610;

/// The guest's default IPv4 address (QEMU's user-networking convention).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// The prefix length of [`GUEST_IP`]'s network.
pub const GUEST_PREFIX: u8 = 24;

/// The VMM's peer's IPv4 address (the smoltcp peer, or the host end of a tap).
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

/// The TCP port the peer listens on.
pub const PEER_PORT: u16 = 7878;

/// The TCP port on the peer's address that sends the guest a file (the receive
/// direction: each connection gets the next file the VMM offered, then the guest
/// answers with its byte count, [`crate::ack`]).
pub const PEER_SEND_PORT: u16 = 7879;

/// The default TCP peer the guest connects to.
pub const DEFAULT_PEER: SocketAddrV4 = SocketAddrV4::new(PEER_IP, PEER_PORT);

/// The guest's MAC address on card 0 (QEMU's default guest MAC, so images configured
/// for it just work).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The peer's MAC address on card 0.
pub const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x02, 0x02];

/// Most network cards a guest has addresses for ([`Card`]): each its own /24, from
/// 10.0.2.0/24 up.
pub const MAX_CARDS: u8 = 8;

/// The addresses of one of several virtio-net cards, each on its own link with its
/// own peer: card `n` (the VMM's `n`-th card) has the guest at `10.0.(2+n).15/24`
/// and its peer at `10.0.(2+n).2:7878`, with MACs that differ from card 0's in the
/// last byte. Card 0's are the defaults above, so a one-card run is what it always
/// was. The guest tells its interfaces apart by MAC (the order in which the kernel
/// names them `eth0`, `eth1`... is the probe order, which nothing promises), and
/// routes to a card by the peer's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Card(u8);

impl Card {
    /// Card `n`, if `n` is below [`MAX_CARDS`].
    pub const fn new(n: u8) -> Option<Card> {
        if n < MAX_CARDS {
            Some(Card(n))
        } else {
            None
        }
    }

    /// The card's number: its place among the VMM's cards.
    pub const fn index(self) -> u8 {
        self.0
    }

    /// The guest's MAC address on this card.
    pub const fn guest_mac(self) -> [u8; 6] {
        let mut mac = GUEST_MAC;
        mac[5] = GUEST_MAC[5] + self.0;
        mac
    }

    /// The peer's MAC address on this card.
    pub const fn peer_mac(self) -> [u8; 6] {
        let mut mac = PEER_MAC;
        mac[5] = PEER_MAC[5] + self.0;
        mac
    }

    /// The guest's address on this card (prefix length [`GUEST_PREFIX`]).
    pub const fn guest_ip(self) -> Ipv4Addr {
        let [a, b, c, d] = GUEST_IP.octets();
        Ipv4Addr::new(a, b, c + self.0, d)
    }

    /// The peer's address on this card.
    pub const fn peer_ip(self) -> Ipv4Addr {
        let [a, b, c, d] = PEER_IP.octets();
        Ipv4Addr::new(a, b, c + self.0, d)
    }

    /// Where the guest connects to this card's peer.
    pub const fn peer(self) -> SocketAddrV4 {
        SocketAddrV4::new(self.peer_ip(), PEER_PORT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_zero_is_the_one_card_default() {
        let card = Card::new(0).unwrap();
        assert_eq!(card.guest_ip(), GUEST_IP);
        assert_eq!(card.peer(), DEFAULT_PEER);
        assert_eq!(card.guest_mac(), GUEST_MAC);
        assert_eq!(card.peer_mac(), PEER_MAC);
    }

    #[test]
    fn each_card_has_its_own_subnet_and_macs() {
        let one = Card::new(1).unwrap();
        assert_eq!(one.guest_ip(), Ipv4Addr::new(10, 0, 3, 15));
        assert_eq!(one.peer().to_string(), "10.0.3.2:7878");
        assert_eq!(one.guest_mac(), [0x52, 0x54, 0x00, 0x12, 0x34, 0x57]);
        assert_eq!(one.peer_mac(), [0x52, 0x54, 0x00, 0x00, 0x02, 0x03]);
        let last = Card::new(MAX_CARDS - 1).unwrap();
        assert_eq!(last.guest_ip(), Ipv4Addr::new(10, 0, 9, 15));
        assert_eq!(Card::new(MAX_CARDS), None);
    }
}
