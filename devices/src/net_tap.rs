//! The `tap` net backend: the guest's frames go to a host tap interface, so the guest
//! is on the host's network (routed, NATed or bridged as the host's admin sets it up).
//!
//! # Opening
//! [`TapBackend::open`] opens `/dev/net/tun` and attaches it, with the `TUNSETIFF`
//! ioctl, to the tap interface of that name, creating it if it does not exist. That
//! needs `CAP_NET_ADMIN` (in practice: root), unless the interface was made persistent
//! beforehand and handed to the user (`ip tuntap add NAME mode tap user USER`). An
//! interface this backend created is not persistent: it disappears, with its
//! addresses and routes, when the backend is dropped. A new interface is down and has
//! no address: bringing it up and giving it one (or enslaving it to a bridge) is the
//! caller's or the admin's job, e.g. `ip addr add 10.0.2.2/24 dev NAME; ip link set
//! NAME up`, which [`TapBackend::set_ipv4`] does (`zc-vmm run --tap-ip`); the host's
//! own TCP stack is then the guest's peer, and `crate::net_peer::SocketPeer` can
//! check what the guest sends to it.
//!
//! # Flags
//! `IFF_TAP | IFF_NO_PI`: Ethernet frames (the guest is on an Ethernet link), with no
//! 4-byte packet-information prefix, so one `read(2)` or `write(2)` is exactly one
//! frame, as the [`NetBackend`] trait takes and gives them.
//!
//! No `IFF_VNET_HDR`, and therefore no `TUNSETOFFLOAD`: the virtio-net device hands
//! its backend complete frames (it completes partial checksums itself and offers the
//! guest no segmentation offload), so there is nothing for a virtio header to say
//! towards the host. Towards the guest, a tap without offloads makes the kernel
//! checksum and segment every frame before queuing it, so every frame read is a
//! complete one of at most the interface's MTU. The price is that the host computes
//! checksums and segments in software where a vnet header would have let it pass
//! large, checksum-less frames; this backend is about using the host's network, not
//! about throughput.
//!
//! # Polling, and what it costs
//! The fd is non-blocking. The virtio-net device calls its backend only when the guest
//! transmits or when the VMM polls it, and this backend has no thread of its own, so
//! [`poll_delay`](NetBackend::poll_delay) always answers [`POLL_INTERVAL`] (1 ms): the
//! VMM's backend timer then drains the tap that often. A frame from the host to a
//! quiet guest therefore waits up to 1 ms (0.5 ms on average) before the guest sees
//! it; while the guest transmits, every TX batch drains the tap too. It also costs the
//! VMM about a thousand wake-ups a second while the tap is open. A VMM that wants
//! neither can wait on [`TapBackend::as_fd`] with epoll instead and poll the device when
//! the fd is readable.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::virtio::net::NetBackend;

/// The clone device every tun/tap interface is attached through.
pub const TUN_PATH: &str = "/dev/net/tun";

/// What [`TapBackend::poll_delay`](NetBackend::poll_delay) answers: how often the VMM
/// should drain the tap when the guest is quiet (see the module docs for the cost).
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The most frames one [`take_for_guest`](NetBackend::take_for_guest) reads, so a flood
/// from the host cannot keep the device's lock forever; the rest wait for the next call.
pub const MAX_FRAMES_PER_TAKE: usize = 1024;

/// Read buffer size: far above any frame a tap without offloads carries (the MTU plus
/// the Ethernet header), and the largest frame the kernel could ever queue (64 KiB).
const READ_BUF_LEN: usize = 65536;

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Creating or attaching a tap needs `CAP_NET_ADMIN`.
    #[error("the tap backend needs root (CAP_NET_ADMIN); use --net peer")]
    NotRoot,
    /// `/dev/net/tun` does not exist.
    #[error(
        "{TUN_PATH} is missing: load the tun module (`modprobe tun`); in a container, pass the \
         device in (e.g. `--device /dev/net/tun`) or create it (`mkdir -p /dev/net && mknod \
         /dev/net/tun c 10 200`); or use --net peer"
    )]
    NoTunDevice,
    /// The interface name cannot be one (empty, too long, or with characters Linux
    /// refuses).
    #[error("bad tap interface name {name:?}: {why}")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The name belongs to an interface that is not a tap, or to a tap another process
    /// holds open.
    #[error(
        "interface {name:?} exists and is not a free tap (another process holds it, or it is \
         not a tap device): choose another name"
    )]
    Busy {
        /// The name given.
        name: String,
    },
    /// Any other failure of `open(2)` or `ioctl(2)`.
    #[error("cannot {what} for tap {name:?}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The name given.
        name: String,
        /// The error.
        source: io::Error,
    },
}

/// Counters of what the tap carried, and how often it failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames written to the tap (guest to host).
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames the tap refused (`write(2)` failed or wrote short); they are dropped.
    pub tx_errors: u64,
    /// Frames read from the tap (host to guest).
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Failed reads other than "nothing to read".
    pub rx_errors: u64,
}

/// A [`NetBackend`] over a host tap interface. See the module docs.
#[derive(Debug)]
pub struct TapBackend {
    file: File,
    name: String,
    buf: Vec<u8>,
    stats: TapStats,
    last_error: Option<io::Error>,
    /// The interface was deleted under the fd: nothing will ever arrive again.
    detached: bool,
}

impl TapBackend {
    /// Opens (creating it if needed) the tap interface `name` with
    /// `IFF_TAP | IFF_NO_PI`, non-blocking and close-on-exec. `name` may hold one `%d`
    /// for the kernel to number (`"zc%d"`); [`name`](Self::name) tells the result.
    pub fn open(name: &str) -> Result<TapBackend, TapError> {
        let ifr_name = ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| open_error(e, name))?;

        // SAFETY: `ifreq` is plain data (a name array and a union of integers, arrays
        // and a raw pointer), for which all-zero bytes are a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI)
            .expect("the flags are 16 bits in the ABI");
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `ifr` is a live,
        // properly sized and aligned `ifreq` that outlives the call, and `file` is an
        // open fd of /dev/net/tun. No other memory is touched.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut ifr as *mut libc::ifreq,
            )
        };
        if rc < 0 {
            return Err(ioctl_error(io::Error::last_os_error(), name));
        }
        // The kernel writes back the name it used (the `%d` filled in).
        let actual: Vec<u8> = ifr
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(TapBackend {
            file,
            name: String::from_utf8_lossy(&actual).into_owned(),
            buf: vec![0; READ_BUF_LEN],
            stats: TapStats::default(),
            last_error: None,
            detached: false,
        })
    }

    /// Gives the host side of the tap the IPv4 address `addr/prefix_len` and brings
    /// the interface up: what `ip addr add ADDR/PREFIX dev NAME; ip link set NAME up`
    /// does, for a run that wants the host's TCP stack as the guest's peer (the
    /// address is gone with the interface when the backend is dropped).
    pub fn set_ipv4(&self, addr: Ipv4Addr, prefix_len: u8) -> Result<(), TapError> {
        if prefix_len > 32 {
            return Err(TapError::Io {
                what: "set the address",
                name: self.name.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "prefix longer than 32"),
            });
        }
        let err = |what, source| TapError::Io {
            what,
            name: self.name.clone(),
            source,
        };
        // SAFETY: a plain socket(2) call; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(err("open a socket", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        let ifr_name = ifname(&self.name)?;
        let with_addr = |a: Ipv4Addr| {
            // SAFETY: `ifreq` is plain data, for which all-zero bytes are valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            ifr.ifr_name = ifr_name;
            let sin = libc::sockaddr_in {
                sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET is 2"),
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sockaddr_in` fits in the union's `sockaddr` (both 16 bytes),
            // which is how the kernel reads the address of SIOCSIFADDR/SIOCSIFNETMASK.
            unsafe {
                std::ptr::write_unaligned(
                    std::ptr::addr_of_mut!(ifr.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                    sin,
                );
            }
            ifr
        };
        let ioctl = |request, ifr: &mut libc::ifreq| {
            // SAFETY: these SIOC* requests read or write one `struct ifreq`, which
            // `ifr` is, live for the call; `sock` is an open socket.
            let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, ifr as *mut libc::ifreq) };
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        ioctl(libc::SIOCSIFADDR, &mut with_addr(addr)).map_err(|e| err("set the address", e))?;
        ioctl(libc::SIOCSIFNETMASK, &mut with_addr(Ipv4Addr::from(mask)))
            .map_err(|e| err("set the netmask", e))?;
        let mut ifr = with_addr(Ipv4Addr::UNSPECIFIED);
        ioctl(libc::SIOCGIFFLAGS, &mut ifr).map_err(|e| err("read the flags", e))?;
        // SAFETY: SIOCGIFFLAGS just filled the union's flags member.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        let up = libc::c_short::try_from(libc::IFF_UP).expect("IFF_UP is 1");
        ifr.ifr_ifru.ifru_flags = flags | up;
        ioctl(libc::SIOCSIFFLAGS, &mut ifr).map_err(|e| err("bring the interface up", e))?;
        Ok(())
    }

    /// The interface's name, as the kernel set it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the tap carried so far.
    pub fn stats(&self) -> TapStats {
        self.stats
    }

    /// The most recent read or write error, if any, cleared by the call. The
    /// [`NetBackend`] calls return nothing, so this is how a VMM learns why frames
    /// vanish (a tap that is down refuses writes, for instance).
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.last_error.take()
    }

    /// Whether the interface was deleted under the open fd (`ip link del`): no frame
    /// will arrive again, and [`poll_delay`](NetBackend::poll_delay) answers `None`.
    pub fn is_detached(&self) -> bool {
        self.detached
    }
}

impl AsFd for TapBackend {
    /// The tap's fd, readable when frames for the guest wait (for an epoll-driven VMM).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl NetBackend for TapBackend {
    /// Writes the frame to the tap, one `write(2)` per frame; a refused frame is
    /// dropped and counted (a NIC does the same), the error kept for
    /// [`TapBackend::take_error`].
    fn send(&mut self, frame: &[u8], _now: Instant) {
        match self.file.write(frame) {
            Ok(n) if n == frame.len() => {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += n as u64;
            }
            Ok(n) => {
                self.stats.tx_errors += 1;
                self.last_error = Some(io::Error::other(format!(
                    "the tap took {n} of a {}-byte frame",
                    frame.len()
                )));
            }
            Err(e) => {
                self.stats.tx_errors += 1;
                self.last_error = Some(e);
            }
        }
    }

    /// Nothing to do: the kernel runs the host's side of the link.
    fn poll(&mut self, _now: Instant) {}

    /// Reads every frame the tap holds (at most [`MAX_FRAMES_PER_TAKE`]), without
    /// blocking.
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        if self.detached {
            return;
        }
        for _ in 0..MAX_FRAMES_PER_TAKE {
            match self.file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += n as u64;
                    out.push_back(self.buf[..n].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EBADFD: the interface was deleted; any other error is counted
                    // and retried at the next poll.
                    if e.raw_os_error() == Some(libc::EBADFD) {
                        self.detached = true;
                    }
                    self.stats.rx_errors += 1;
                    self.last_error = Some(e);
                    break;
                }
            }
        }
    }

    /// [`POLL_INTERVAL`] while the interface exists: see the module docs.
    fn poll_delay(&mut self, _now: Instant) -> Option<Duration> {
        (!self.detached).then_some(POLL_INTERVAL)
    }
}

/// Checks `name` as Linux would and lays it out for `ifreq`.
fn ifname(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], TapError> {
    let bad = |why| TapError::BadName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    // IFNAMSIZ counts the terminating NUL.
    if name.len() >= libc::IFNAMSIZ {
        return Err(bad("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(bad("`.` and `..` are not interface names"));
    }
    // The kernel's dev_valid_name: no '/', ':' or whitespace (and no NUL, for C).
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(bad("contains '/', ':', NUL or whitespace"));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b as libc::c_char;
    }
    Ok(out)
}

/// Maps a failed `open("/dev/net/tun")`.
fn open_error(e: io::Error, name: &str) -> TapError {
    match e.kind() {
        io::ErrorKind::NotFound => TapError::NoTunDevice,
        io::ErrorKind::PermissionDenied => TapError::NotRoot,
        _ => TapError::Io {
            what: "open /dev/net/tun",
            name: name.to_string(),
            source: e,
        },
    }
}

/// Maps a failed `TUNSETIFF`.
fn ioctl_error(e: io::Error, name: &str) -> TapError {
    match e.raw_os_error() {
        // EPERM: no CAP_NET_ADMIN (and the interface is not a persistent tap of ours).
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotRoot,
        // EBUSY: a tap another fd holds; EINVAL: an existing tun, or a name in use by a
        // device of another kind.
        Some(libc::EBUSY) | Some(libc::EINVAL) => TapError::Busy {
            name: name.to_string(),
        },
        _ => TapError::Io {
            what: "attach (TUNSETIFF)",
            name: name.to_string(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GUEST_IP: [u8; 4] = [10, 99, 0, 2];
    const HOST_IP: [u8; 4] = [10, 99, 0, 1];
    const ETH_ARP: u16 = 0x0806;
    const ETH_IPV4: u16 = 0x0800;

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip(8)");
        assert!(status.success(), "ip {} failed", args.join(" "));
    }

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    /// The Internet checksum (RFC 1071) of `data`.
    fn inet_csum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).expect("folded to 16 bits")
    }

    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// An ARP packet (`oper` 1 request, 2 reply) in an Ethernet frame.
    fn arp(
        oper: u16,
        eth_dst: [u8; 6],
        sha: [u8; 6],
        spa: [u8; 4],
        tha: [u8; 6],
        tpa: [u8; 4],
    ) -> Vec<u8> {
        let mut f = eth(eth_dst, sha, ETH_ARP);
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&oper.to_be_bytes());
        f.extend_from_slice(&sha);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&tha);
        f.extend_from_slice(&tpa);
        f
    }

    /// An ICMP echo request from the guest to the host.
    fn echo_request(host_mac: [u8; 6], id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&seq.to_be_bytes());
        icmp.extend_from_slice(payload);
        let c = inet_csum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());

        let total = u16::try_from(20 + icmp.len()).unwrap();
        let mut iph = vec![0x45, 0];
        iph.extend_from_slice(&total.to_be_bytes());
        iph.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 1, 0, 0]);
        iph.extend_from_slice(&GUEST_IP);
        iph.extend_from_slice(&HOST_IP);
        let c = inet_csum(&iph);
        iph[10..12].copy_from_slice(&c.to_be_bytes());

        let mut f = eth(host_mac, GUEST_MAC, ETH_IPV4);
        f.extend_from_slice(&iph);
        f.extend_from_slice(&icmp);
        f
    }

    /// Plays the guest: drains the tap until `want` accepts a frame (returning what it
    /// returns), answering the host's ARP requests for the guest's address; gives up
    /// after 2 s.
    fn wait_for<T>(tap: &mut TapBackend, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut frames = VecDeque::new();
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            tap.take_for_guest(&mut frames);
            while let Some(f) = frames.pop_front() {
                if let Some(t) = want(&f) {
                    return t;
                }
                if f.len() >= 42
                    && be16(&f, 12) == ETH_ARP
                    && be16(&f, 20) == 1
                    && f[38..42] == GUEST_IP
                {
                    let host_mac: [u8; 6] = f[22..28].try_into().unwrap();
                    let spa: [u8; 4] = f[28..32].try_into().unwrap();
                    let reply = arp(2, host_mac, GUEST_MAC, GUEST_IP, host_mac, spa);
                    tap.send(&reply, Instant::now());
                }
                seen.push(crate::dma_log::frame::summarize(&f).text);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!(
            "no expected frame within 2 s; saw {seen:?}; stats {:?}; last error {:?}",
            tap.stats(),
            tap.take_error()
        );
    }

    #[test]
    fn names_are_checked_like_linux_does() {
        for bad in ["", "sixteen-bytes-xx", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(ifname(bad), Err(TapError::BadName { .. })),
                "{bad:?} accepted"
            );
        }
        let n = ifname("fifteen-bytes-x").unwrap();
        assert_eq!(n[14] as u8, b'x');
        assert_eq!(n[15], 0);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = ioctl_error(io::Error::from_raw_os_error(libc::EPERM), "t");
        assert_eq!(
            e.to_string(),
            "the tap backend needs root (CAP_NET_ADMIN); use --net peer"
        );
        let e = open_error(io::Error::from(io::ErrorKind::NotFound), "t");
        assert!(matches!(e, TapError::NoTunDevice));
        assert!(e.to_string().contains("modprobe tun"));
        assert!(matches!(
            open_error(io::Error::from(io::ErrorKind::PermissionDenied), "t"),
            TapError::NotRoot
        ));
    }

    /// The guest's ARP request is answered by the host kernel, then its ping.
    #[test]
    #[ignore = "needs root and /dev/net/tun"]
    fn host_answers_arp_and_ping() {
        let name = format!("zc-t{}", std::process::id());
        let mut tap = TapBackend::open(&name).expect("open the tap");
        assert_eq!(tap.name(), name);
        assert_eq!(tap.poll_delay(Instant::now()), Some(POLL_INTERVAL));
        let sys = format!("/sys/class/net/{name}");
        let tap_mac = std::fs::read_to_string(format!("{sys}/address")).unwrap();
        // What `ip addr add 10.99.0.1/24 dev NAME; ip link set NAME up` would do.
        tap.set_ipv4(std::net::Ipv4Addr::from(HOST_IP), 24)
            .expect("address the tap");
        let flags = std::fs::read_to_string(format!("{sys}/flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "the tap is not up");

        // ARP: who has 10.99.0.1? Tell 10.99.0.2.
        let req = arp(1, [0xff; 6], GUEST_MAC, GUEST_IP, [0; 6], HOST_IP);
        tap.send(&req, Instant::now());
        let host_mac: [u8; 6] = wait_for(&mut tap, |f| {
            (f.len() >= 42
                && be16(f, 12) == ETH_ARP
                && be16(f, 20) == 2
                && f[28..32] == HOST_IP
                && f[38..42] == GUEST_IP)
                .then(|| {
                    assert_eq!(f[0..6], GUEST_MAC, "reply not sent to the guest's MAC");
                    assert_eq!(f[32..38], GUEST_MAC);
                    f[22..28].try_into().unwrap()
                })
        });
        let mac_text = host_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            mac_text,
            tap_mac.trim(),
            "the ARP reply is not the tap's MAC"
        );

        // Ping 10.99.0.1.
        let payload: Vec<u8> = (0u8..56).collect();
        tap.send(&echo_request(host_mac, 0x7a63, 1, &payload), Instant::now());
        wait_for(&mut tap, |f| {
            let ip_hdr = f.get(14..34)?;
            let is_reply = be16(f, 12) == ETH_IPV4
                && ip_hdr[9] == 1
                && ip_hdr[12..16] == HOST_IP
                && ip_hdr[16..20] == GUEST_IP
                && f.get(34) == Some(&0);
            is_reply.then(|| {
                assert_eq!(f[0..6], GUEST_MAC);
                assert_eq!(inet_csum(ip_hdr), 0, "bad IPv4 header checksum");
                let icmp = &f[34..14 + usize::from(be16(f, 16))];
                assert_eq!(inet_csum(icmp), 0, "bad ICMP checksum");
                assert_eq!(be16(icmp, 4), 0x7a63);
                assert_eq!(be16(icmp, 6), 1);
                assert_eq!(&icmp[8..], &payload[..]);
            })
        });

        let stats = tap.stats();
        assert!(stats.tx_frames >= 2 && stats.tx_errors == 0, "{stats:?}");
        assert!(stats.rx_frames >= 2, "{stats:?}");
        drop(tap);
        // The kernel unregisters the interface after the close returns, once the
        // last reference to it (an addressed interface has more) is dropped.
        let give_up = Instant::now() + Duration::from_secs(5);
        while Path::new(&sys).exists() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !Path::new(&sys).exists(),
            "the tap outlived its fd: remove it with `ip link del {name}`"
        );
    }

    /// `%d` names are numbered by the kernel, and a name held by a non-tap device is
    /// refused.
    #[test]
    #[ignore = "needs root and /dev/net/tun"]
    fn kernel_numbers_names_and_refuses_other_devices() {
        let tap = TapBackend::open("zct%d").expect("open a numbered tap");
        assert!(tap.name().starts_with("zct"), "{}", tap.name());
        assert!(tap.name()[3..].parse::<u32>().is_ok(), "{}", tap.name());
        assert!(Path::new(&format!("/sys/class/net/{}", tap.name())).exists());
        let err = TapBackend::open("lo").unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
        let err = TapBackend::open(tap.name()).unwrap_err();
        assert!(matches!(err, TapError::Busy { .. }), "{err}");
    }

    /// Deleting the interface under the fd stops the polling.
    #[test]
    #[ignore = "needs root and /dev/net/tun"]
    fn deleted_interface_is_detached() {
        let mut tap = TapBackend::open("zcdel%d").expect("open a numbered tap");
        let name = tap.name().to_string();
        ip(&["link", "del", &name]);
        let mut frames = VecDeque::new();
        tap.take_for_guest(&mut frames);
        assert!(frames.is_empty());
        assert!(tap.is_detached(), "{:?}", tap.take_error());
        assert_eq!(tap.poll_delay(Instant::now()), None);
    }
}
