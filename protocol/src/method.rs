//! The transfer methods: one entry here per method, in the order the suite runs
//! them. The names are the contract's: the guest's `zc.methods=` option, the
//! `BEGIN`/`END` markers, the `report` lines and `audit/expected.toml` all use them.
//!
//! Adding a method: a variant here (with its name and properties, and its place in
//! [`Method::ALL`] or [`Method::RECEIVE`]), its guest module
//! (`guest-tests/src/methods/`) and its rows in `audit/expected.toml`.
//!
//! Two directions ([`Direction`]): the send methods move a file on the test disk to
//! the TCP peer; the receive methods (issue 12, being built) take the payload the
//! peer sends (on `addr::PEER_SEND_PORT`) and write it to a file on the scratch
//! disk. [`Method::ALL`], what `zc.methods=all` runs, holds the send methods only
//! until the audit judges the receive ones; a receive method runs when named.

use std::fmt;
use std::str::FromStr;

/// Which way a method moves the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// File on the test disk to the TCP peer.
    Send,
    /// TCP peer to a file on the scratch disk.
    Receive,
}

impl Direction {
    /// The name in reports: `send` or `receive`.
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Receive => "receive",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One transfer method: a send method (file on the test disk to the TCP peer) or a
/// receive method (TCP peer to a file on the scratch disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// `read` into a user buffer, `write` it to the socket.
    ReadWrite,
    /// `mmap` the file once, `write` each chunk of the mapping.
    MmapWrite,
    /// `sendfile(sock, file, &off, chunk)`.
    Sendfile,
    /// `splice` file -> pipe -> socket.
    Splice,
    /// O_DIRECT `read` into an aligned user buffer, `write` it.
    DirectWrite,
    /// O_DIRECT `read`, `send(MSG_ZEROCOPY)`, wait for its completion.
    DirectZerocopy,
    /// `mmap` once, `send(MSG_ZEROCOPY)` each chunk of the mapping.
    MmapZerocopy,
    /// io_uring `IORING_OP_SEND_ZC` from an mmap of the file, batched.
    UringSendZc,
    /// MAP_PRIVATE mapping, one copy-on-write page per chunk, `send(MSG_ZEROCOPY)`.
    CowZerocopy,
    /// `sendfile` with a warm page cache.
    SendfileWarm,
    /// `sendfile` from a copy of the file on tmpfs, made before `BEGIN`.
    SendfileTmpfs,
    /// `sendfile` from the file opened with O_DIRECT.
    SendfileDirect,
    /// `splice` file -> pipe -> socket, the file opened with O_DIRECT.
    SpliceDirect,
    /// O_DIRECT `read` into a user buffer never reused, `vmsplice` it into a pipe,
    /// `splice` the pipe to the socket.
    Vmsplice,
    /// `send(MSG_ZEROCOPY)` from a mapping with the socket's option memory exhausted
    /// (a tiny `net.core.optmem_max`): each send the kernel refuses (ENOBUFS) is
    /// sent again without MSG_ZEROCOPY, as an application would.
    ZerocopyPressure,
    /// Receive: `recv` into a user buffer, `write` it to the file (page cache).
    RecvWrite,
    /// Receive: `recv` into an aligned user buffer, `write` it to the file opened
    /// with O_DIRECT.
    RecvDirect,
    /// Receive: `splice` socket -> pipe -> file.
    SpliceRecv,
    /// Receive: `recv` straight into a MAP_SHARED mapping of the pre-sized file.
    RecvMmap,
    /// Receive: `getsockopt(TCP_ZEROCOPY_RECEIVE)` maps what it can of the payload,
    /// the rest is `recv`ed; the chunk is written to the file opened with O_DIRECT.
    TcpZerocopyReceive,
}

impl Method {
    /// Every method, in the order `zc.methods=all` (and `zc-vmm methods`) runs them:
    /// the specification's order, cheapest copies last, warm cache at the end.
    pub const ALL: [Method; 15] = [
        Method::ReadWrite,
        Method::MmapWrite,
        Method::Sendfile,
        Method::Splice,
        Method::DirectWrite,
        Method::DirectZerocopy,
        Method::MmapZerocopy,
        Method::UringSendZc,
        Method::CowZerocopy,
        Method::SendfileWarm,
        Method::SendfileTmpfs,
        Method::SendfileDirect,
        Method::SpliceDirect,
        Method::Vmsplice,
        Method::ZerocopyPressure,
    ];

    /// Every receive method, in the order the suite runs them when named.
    pub const RECEIVE: [Method; 5] = [
        Method::RecvWrite,
        Method::RecvDirect,
        Method::SpliceRecv,
        Method::RecvMmap,
        Method::TcpZerocopyReceive,
    ];

    /// Every method of both directions: [`Method::ALL`], then [`Method::RECEIVE`].
    pub fn every() -> impl Iterator<Item = Method> {
        Method::ALL.into_iter().chain(Method::RECEIVE)
    }

    /// Which way the method moves the payload.
    pub const fn direction(self) -> Direction {
        match self {
            Method::RecvWrite
            | Method::RecvDirect
            | Method::SpliceRecv
            | Method::RecvMmap
            | Method::TcpZerocopyReceive => Direction::Receive,
            _ => Direction::Send,
        }
    }

    /// The contract's name.
    pub const fn name(self) -> &'static str {
        match self {
            Method::ReadWrite => "read_write",
            Method::MmapWrite => "mmap_write",
            Method::Sendfile => "sendfile",
            Method::Splice => "splice",
            Method::DirectWrite => "direct_write",
            Method::DirectZerocopy => "direct_zerocopy",
            Method::MmapZerocopy => "mmap_zerocopy",
            Method::UringSendZc => "uring_send_zc",
            Method::CowZerocopy => "cow_zerocopy",
            Method::SendfileWarm => "sendfile_warm",
            Method::SendfileTmpfs => "sendfile_tmpfs",
            Method::SendfileDirect => "sendfile_direct",
            Method::SpliceDirect => "splice_direct",
            Method::Vmsplice => "vmsplice",
            Method::ZerocopyPressure => "zerocopy_pressure",
            Method::RecvWrite => "recv_write",
            Method::RecvDirect => "recv_direct",
            Method::SpliceRecv => "splice_recv",
            Method::RecvMmap => "recv_mmap",
            Method::TcpZerocopyReceive => "tcp_zerocopy_receive",
        }
    }

    /// The method called `name`, if any (of either direction).
    pub fn from_name(name: &str) -> Option<Method> {
        Method::every().find(|m| m.name() == name)
    }

    /// Every name, comma-separated, in [`Method::every`] order (for error messages).
    pub fn names() -> String {
        Method::every()
            .map(Method::name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Whether the file is opened with O_DIRECT (the disk DMA reads or writes a user
    /// buffer instead of the page cache).
    pub const fn direct(self) -> bool {
        matches!(
            self,
            Method::DirectWrite
                | Method::DirectZerocopy
                | Method::SendfileDirect
                | Method::SpliceDirect
                | Method::Vmsplice
                | Method::RecvDirect
                | Method::TcpZerocopyReceive
        )
    }

    /// Whether the socket sends with MSG_ZEROCOPY (and so needs SO_ZEROCOPY).
    pub const fn msg_zerocopy(self) -> bool {
        matches!(
            self,
            Method::DirectZerocopy
                | Method::MmapZerocopy
                | Method::CowZerocopy
                | Method::ZerocopyPressure
        )
    }

    /// Whether the method sends through io_uring (a kernel without
    /// `IORING_OP_SEND_ZC` skips it).
    pub const fn io_uring(self) -> bool {
        matches!(self, Method::UringSendZc)
    }

    /// Whether the socket send path takes the payload without a CPU copy, so that
    /// the method moves it with no copy at all only through a NIC with
    /// scatter-gather (without it, Linux linearises each frame: one copy more).
    pub const fn needs_sg_for_zero_copy(self) -> bool {
        !matches!(
            self,
            Method::ReadWrite | Method::MmapWrite | Method::DirectWrite | Method::ZerocopyPressure
        )
    }

    /// Whether the page cache is warmed instead of dropped before `BEGIN`.
    pub const fn warm(self) -> bool {
        matches!(self, Method::SendfileWarm)
    }

    /// Whether the file is sent from a copy on tmpfs (the guest's `/tmp`), made by
    /// the CPU before `BEGIN`: no disk DMA in the span.
    pub const fn tmpfs(self) -> bool {
        matches!(self, Method::SendfileTmpfs)
    }

    /// Whether the disk's DMA moves the file during the span (not for a warm page
    /// cache or a copy on tmpfs): reads it in for a send method, writes it out (the
    /// fsync) for a receive method.
    pub const fn disk_dma_in_span(self) -> bool {
        !self.warm() && !self.tmpfs()
    }

    /// Whether the socket's option memory is exhausted for the method (a tiny
    /// `net.core.optmem_max`, set before `BEGIN` and restored after `END`), so that
    /// MSG_ZEROCOPY sends fail with ENOBUFS and fall back to copying sends.
    pub const fn optmem_pressure(self) -> bool {
        matches!(self, Method::ZerocopyPressure)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a [`Method`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown method {name:?} (expected one of: {})", Method::names())]
pub struct UnknownMethod {
    /// The name given.
    pub name: String,
}

impl FromStr for Method {
    type Err = UnknownMethod;

    fn from_str(name: &str) -> Result<Method, UnknownMethod> {
        Method::from_name(name).ok_or_else(|| UnknownMethod {
            name: name.to_string(),
        })
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for Method {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Method, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_parse_back() {
        let every: Vec<Method> = Method::every().collect();
        for (i, m) in every.iter().enumerate() {
            assert_eq!(m.name().parse::<Method>(), Ok(*m));
            assert!(every[..i].iter().all(|o| o.name() != m.name()));
        }
        let err = "send_file".parse::<Method>().unwrap_err().to_string();
        assert!(err.contains("read_write, mmap_write"), "{err}");
    }

    #[test]
    fn all_is_in_declaration_order() {
        let mut sorted = Method::ALL;
        sorted.sort();
        assert_eq!(sorted, Method::ALL);
        let every: Vec<Method> = Method::every().collect();
        let mut sorted = every.clone();
        sorted.sort();
        assert_eq!(sorted, every);
    }

    #[test]
    fn directions_split_the_methods() {
        assert!(Method::ALL.iter().all(|m| m.direction() == Direction::Send));
        assert!(Method::RECEIVE
            .iter()
            .all(|m| m.direction() == Direction::Receive));
        for m in Method::RECEIVE {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
            assert!(!m.warm() && !m.tmpfs() && !m.msg_zerocopy() && !m.io_uring());
        }
        assert!(Method::names().ends_with("tcp_zerocopy_receive"));
        assert_eq!(Direction::Receive.to_string(), "receive");
    }

    #[test]
    fn properties() {
        let names = |f: fn(Method) -> bool| -> Vec<&str> {
            Method::ALL
                .into_iter()
                .filter(|m| f(*m))
                .map(Method::name)
                .collect()
        };
        assert_eq!(
            names(Method::direct),
            [
                "direct_write",
                "direct_zerocopy",
                "sendfile_direct",
                "splice_direct",
                "vmsplice"
            ]
        );
        assert_eq!(
            names(Method::msg_zerocopy),
            [
                "direct_zerocopy",
                "mmap_zerocopy",
                "cow_zerocopy",
                "zerocopy_pressure"
            ]
        );
        assert_eq!(names(Method::io_uring), ["uring_send_zc"]);
        assert_eq!(names(Method::warm), ["sendfile_warm"]);
        assert_eq!(names(Method::tmpfs), ["sendfile_tmpfs"]);
        assert_eq!(
            names(|m| !m.disk_dma_in_span()),
            ["sendfile_warm", "sendfile_tmpfs"]
        );
        assert_eq!(names(Method::optmem_pressure), ["zerocopy_pressure"]);
        assert_eq!(
            names(|m| !m.needs_sg_for_zero_copy()),
            [
                "read_write",
                "mmap_write",
                "direct_write",
                "zerocopy_pressure"
            ]
        );
    }
}
