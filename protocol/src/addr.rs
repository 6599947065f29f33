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

/// The default TCP peer the guest connects to.
pub const DEFAULT_PEER: SocketAddrV4 = SocketAddrV4::new(PEER_IP, PEER_PORT);
