//! Network set-up with plain ioctls: `lo` up, eth0's address, netmask and up.
//!
//! No `ip`/`ifconfig` in the initramfs, and no netlink needed: setting an address
//! and netmask on an interface that is up makes the kernel add the prefix route
//! itself (10.0.2.0/24 dev eth0), which is the only route the guest needs.

use std::ffi::c_char;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cmdline::Ipv4Net;
use crate::error::{Error, Result};
use zc_protocol::addr::Card;

/// The interface the virtio-net device becomes (no udev renames it in the initramfs).
pub const ETH0: &str = "eth0";

/// How long to wait for eth0 to appear after `virtio_net` was loaded: its probe is
/// normally synchronous, the wait covers deferred probing.
pub const IFACE_WAIT: Duration = Duration::from_secs(5);

/// An AF_INET datagram socket: the handle the `SIOC*IF*` ioctls need.
struct IoctlSocket(OwnedFd);

impl IoctlSocket {
    fn open() -> Result<IoctlSocket> {
        // SAFETY: socket takes integer arguments; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::new(format!(
                "socket(AF_INET) for interface ioctls: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(IoctlSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Runs one interface ioctl; `what` names it in the error.
    fn ioctl(&self, request: libc::c_ulong, req: &mut libc::ifreq, what: &str) -> Result<()> {
        // SAFETY: every request this module issues (SIOC[GS]IFFLAGS, SIOCSIFADDR,
        // SIOCSIFNETMASK) reads and/or writes exactly one `struct ifreq`, and `req`
        // is a valid, exclusively borrowed one for the whole call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, req as *mut libc::ifreq) };
        if rc == 0 {
            Ok(())
        } else {
            let name = ifr_name_str(req);
            Err(Error::new(format!(
                "{what} on {name}: {}",
                io::Error::last_os_error()
            )))
        }
    }
}

/// A zeroed `ifreq` naming `ifname`.
fn ifreq(ifname: &str) -> Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (a name array and a union of POD); all-zero
    // is a valid value of every member.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = ifname.as_bytes();
    // Leave room for the terminating NUL the zeroing already put there.
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(Error::new(format!("bad interface name {ifname:?}")));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as c_char;
    }
    Ok(req)
}

fn ifr_name_str(req: &libc::ifreq) -> String {
    req.ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect()
}

/// A `struct sockaddr` holding an AF_INET address (port 0), laid out as
/// `sockaddr_in`: family, 2 bytes of port, 4 bytes of address (network order).
pub fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
    sa.sa_family = libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET is 2");
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as c_char;
    }
    sa
}

/// Sets IFF_UP on `ifname`, keeping its other flags.
fn set_up(sock: &IoctlSocket, ifname: &str) -> Result<()> {
    let mut req = ifreq(ifname)?;
    sock.ioctl(libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).expect("IFF_UP is 1");
    req.ifr_ifru.ifru_flags = flags | up;
    sock.ioctl(libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS IFF_UP")
}

/// Waits up to `timeout` for `/sys/class/net/<ifname>`; returns how long it took.
pub fn wait_for_interface(ifname: &str, timeout: Duration) -> Result<Duration> {
    let path = Path::new("/sys/class/net").join(ifname);
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            let present: Vec<String> = std::fs::read_dir("/sys/class/net")
                .map(|dir| {
                    dir.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(Error::new(format!(
                "no network interface {ifname} after {:.1} s (interfaces: {}); is the VMM's virtio-net device configured and virtio_net in the module list?",
                timeout.as_secs_f64(),
                if present.is_empty() { "none".to_string() } else { present.join(", ") }
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings `lo` up and gives eth0 `net`'s address and netmask, then brings it up.
///
/// `lo` gets 127.0.0.1/8 from the kernel itself when it comes up.
pub fn configure(net: Ipv4Net) -> Result<()> {
    let sock = IoctlSocket::open()?;
    set_up(&sock, "lo")?;
    wait_for_interface(ETH0, IFACE_WAIT)?;
    address(&sock, ETH0, net)
}

/// Brings `lo` up and each card's interface up with the card's address; returns the
/// interfaces' names, in card order. The interfaces are found by MAC
/// ([`Card::guest_mac`]): the kernel names them in probe order, which nothing
/// promises to be the cards' order. Each address's prefix route sends the card's
/// peer's subnet through it.
pub fn configure_cards(cards: &[(Card, Ipv4Net)]) -> Result<Vec<String>> {
    let sock = IoctlSocket::open()?;
    set_up(&sock, "lo")?;
    let start = Instant::now();
    let mut names = Vec::new();
    for &(card, net) in cards {
        let mac = mac_text(card.guest_mac());
        let name = loop {
            if let Some(name) = interface_with_mac(&mac) {
                break name;
            }
            if start.elapsed() >= IFACE_WAIT {
                return Err(Error::new(format!(
                    "no network interface with MAC {mac} (card {}) after {:.1} s (interfaces: {}); does the VMM give the guest {} cards?",
                    card.index(),
                    IFACE_WAIT.as_secs_f64(),
                    interfaces().join(", "),
                    cards.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        address(&sock, &name, net)?;
        names.push(name);
    }
    Ok(names)
}

/// `52:54:00:12:34:56`, as sysfs writes a MAC.
fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The interfaces in `/sys/class/net`, sorted.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The interface whose MAC is `mac` (sysfs's spelling), if there is one.
fn interface_with_mac(mac: &str) -> Option<String> {
    interfaces()
        .into_iter()
        .find(|name| mac_address(name) == mac)
}

/// Gives `ifname` `net`'s address and netmask, then brings it up.
fn address(sock: &IoctlSocket, ifname: &str, net: Ipv4Net) -> Result<()> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(net.addr);
    sock.ioctl(
        libc::SIOCSIFADDR,
        &mut req,
        &format!("SIOCSIFADDR {}", net.addr),
    )?;
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(net.netmask());
    sock.ioctl(
        libc::SIOCSIFNETMASK,
        &mut req,
        &format!("SIOCSIFNETMASK {}", net.netmask()),
    )?;
    set_up(sock, ifname)
}

/// eth0's MAC address from sysfs, for the log (empty if unreadable).
pub fn mac_address(ifname: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/class/net").join(ifname).join("address"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_layout_is_sockaddr_in() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 2, 15));
        // SAFETY: sockaddr and sockaddr_in are both 16 bytes of POD; this reads the
        // same bytes the kernel will.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(sa) };
        assert_eq!(i32::from(sin.sin_family), libc::AF_INET);
        assert_eq!(sin.sin_port, 0);
        assert_eq!(
            u32::from_be(sin.sin_addr.s_addr),
            u32::from(Ipv4Addr::new(10, 0, 2, 15))
        );
    }

    #[test]
    fn macs_are_written_as_sysfs_writes_them() {
        assert_eq!(
            mac_text(Card::new(1).unwrap().guest_mac()),
            "52:54:00:12:34:57"
        );
    }

    #[test]
    fn interface_names() {
        let req = ifreq("eth0").unwrap();
        assert_eq!(ifr_name_str(&req), "eth0");
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-much-too-long").is_err());
    }
}
