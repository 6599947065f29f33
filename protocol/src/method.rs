//! The transfer methods: one entry here per method, in the order the suite runs
//! them. The names are the contract's: the guest's `zc.methods=` option, the
//! `BEGIN`/`END` markers, the `report` lines and `audit/expected.toml` all use them.
//!
//! Adding a method: a variant here (with its name and properties, and its place in
//! [`Method::ALL`]), its guest module (`guest-tests/src/methods/`) and its rows in
//! `audit/expected.toml`.

use std::fmt;
use std::str::FromStr;

/// One transfer method, from a file on the test disk to the TCP peer.
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
}

impl Method {
    /// Every method, in the order `zc.methods=all` (and `zc-vmm methods`) runs them:
    /// the specification's order, cheapest copies last, warm cache at the end.
    pub const ALL: [Method; 10] = [
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
    ];

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
        }
    }

    /// The method called `name`, if any.
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Every name, comma-separated, in [`Method::ALL`] order (for error messages).
    pub fn names() -> String {
        Method::ALL.map(Method::name).join(", ")
    }

    /// Whether the file is opened with O_DIRECT (the disk DMA lands in a user
    /// buffer instead of the page cache).
    pub const fn direct(self) -> bool {
        matches!(self, Method::DirectWrite | Method::DirectZerocopy)
    }

    /// Whether the socket sends with MSG_ZEROCOPY (and so needs SO_ZEROCOPY).
    pub const fn msg_zerocopy(self) -> bool {
        matches!(
            self,
            Method::DirectZerocopy | Method::MmapZerocopy | Method::CowZerocopy
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
            Method::ReadWrite | Method::MmapWrite | Method::DirectWrite
        )
    }

    /// Whether the page cache is warmed instead of dropped before `BEGIN`.
    pub const fn warm(self) -> bool {
        matches!(self, Method::SendfileWarm)
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
        for (i, m) in Method::ALL.iter().enumerate() {
            assert_eq!(m.name().parse::<Method>(), Ok(*m));
            assert!(Method::ALL[..i].iter().all(|o| o.name() != m.name()));
        }
        let err = "send_file".parse::<Method>().unwrap_err().to_string();
        assert!(err.contains("read_write, mmap_write"), "{err}");
    }

    #[test]
    fn all_is_in_declaration_order() {
        let mut sorted = Method::ALL;
        sorted.sort();
        assert_eq!(sorted, Method::ALL);
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
        assert_eq!(names(Method::direct), ["direct_write", "direct_zerocopy"]);
        assert_eq!(
            names(Method::msg_zerocopy),
            ["direct_zerocopy", "mmap_zerocopy", "cow_zerocopy"]
        );
        assert_eq!(names(Method::io_uring), ["uring_send_zc"]);
        assert_eq!(names(Method::warm), ["sendfile_warm"]);
        assert_eq!(
            names(|m| !m.needs_sg_for_zero_copy()),
            ["read_write", "mmap_write", "direct_write"]
        );
    }
}
