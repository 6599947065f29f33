//! The method suite (`zc.test=methods`): every file-to-network transfer method of
//! `docs/transfer-methods.md`, run one after the other from the same file to
//! the same TCP peer, each between a `mark BEGIN <name>` / `mark END <name>` pair,
//! with a dirty-page sample request after every chunk.
//!
//! The contract with the VMM and the audit is `docs/method-suite.md`. Per method
//! the guest reports its own view (bytes, time, system calls by name, MSG_ZEROCOPY
//! completions) as a `report` line and prints a KTAP result line on the console;
//! whether the bytes really travelled without CPU copies is the audit's verdict,
//! from the device logs, not this program's.
//!
//! Layout: one module per method (its per-chunk system calls), plus
//! - [`runner`]: the per-method sequence (cache, open, marks, connect, chunk loop
//!   with samples, ACK, report),
//! - [`syscalls`]: the counter every method's system calls go through,
//! - [`zerocopy`]: MSG_ZEROCOPY sends and completion accounting,
//! - [`report`]: the report JSON and the KTAP lines,
//! - [`port`]: the dirty-page sample request (`outl` to port 0x610).

use std::net::SocketAddrV4;
use std::path::Path;

use crate::error::Result;

pub mod cow_zerocopy;
pub mod direct_write;
pub mod direct_zerocopy;
pub mod mmap_write;
pub mod mmap_zerocopy;
pub mod port;
pub mod read_write;
pub mod report;
pub mod runner;
pub mod sendfile;
pub mod sendfile_warm;
pub mod splice;
pub mod syscalls;
pub mod uring_send_zc;
pub mod zerocopy;

/// One transfer method. The names (see [`Method::name`]) are the contract's: the
/// kernel command line, the marks, the reports and `audit/expected.toml` use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Every method, in the order `zc.methods=all` runs them.
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
    pub fn name(self) -> &'static str {
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

    /// Whether the file is opened with O_DIRECT (the disk DMA lands in a user
    /// buffer instead of the page cache).
    pub fn direct(self) -> bool {
        matches!(self, Method::DirectWrite | Method::DirectZerocopy)
    }

    /// Whether the socket sends with MSG_ZEROCOPY (and so needs SO_ZEROCOPY).
    pub fn msg_zerocopy(self) -> bool {
        matches!(
            self,
            Method::DirectZerocopy | Method::MmapZerocopy | Method::CowZerocopy
        )
    }

    /// Whether the page cache is warmed instead of dropped before `BEGIN`.
    pub fn warm(self) -> bool {
        self == Method::SendfileWarm
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default `zc.file`: the payload `zc-image disk` puts on the test disk.
pub const DEFAULT_FILE: &str = "payload.bin";
/// Default `zc.chunk`: 64 KiB, the table's chunk.
pub const DEFAULT_CHUNK: usize = 64 << 10;
/// Chunks are whole pages: O_DIRECT needs aligned offsets and lengths, and the
/// VMM's dirty-page samples are per page.
pub const CHUNK_ALIGN: usize = 4096;
/// Upper bound on `zc.chunk`: each method allocates a chunk-sized buffer before
/// `BEGIN` and the pipe of `splice` is a chunk, in a guest of a few hundred MiB
/// (a failed allocation would abort PID 1).
pub const MAX_CHUNK: usize = 16 << 20;

/// What the suite runs: the `zc.methods`, `zc.file`, `zc.size` and `zc.chunk`
/// options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    /// The methods, in order (no repeats).
    pub methods: Vec<Method>,
    /// The source file, relative to the disk root.
    pub file: String,
    /// Bytes each method sends, a prefix of the file; `None` for the whole file.
    pub size: Option<u64>,
    /// Bytes per chunk: a non-zero multiple of [`CHUNK_ALIGN`], at most [`MAX_CHUNK`].
    pub chunk: usize,
}

impl Default for Suite {
    fn default() -> Suite {
        Suite {
            methods: Method::ALL.to_vec(),
            file: DEFAULT_FILE.to_string(),
            size: None,
            chunk: DEFAULT_CHUNK,
        }
    }
}

/// What the suite needs from its surroundings, so that tests can run it without
/// port I/O privileges, a control channel or root.
pub trait Hooks {
    /// `sync` and drop the page cache, so that the next read of the file is disk
    /// DMA (the guest writes `/proc/sys/vm/drop_caches`).
    fn drop_caches(&mut self) -> Result<()>;
    /// Sends `mark <label>` on the control channel.
    fn mark(&mut self, label: &str) -> Result<()>;
    /// Requests a dirty-page sample after chunk `chunk` (the guest: `outl` to port
    /// 0x610). Must not make a system call: it happens inside the counted loop.
    fn sample(&mut self, chunk: u32);
    /// Sends `report <json>` on the control channel.
    fn report(&mut self, json: &str) -> Result<()>;
    /// Prints one line on the console (KTAP).
    fn console(&mut self, line: &str);
}

/// Runs the suite: KTAP header, then per method its marks, `report` line and KTAP
/// result line. Returns whether no method failed (a skipped method is not a
/// failure); an `Err` only when the hooks themselves fail (the control channel).
///
/// `root` is where `suite.file` lives (the disk's mount point in the guest).
pub fn run_suite(
    suite: &Suite,
    root: &Path,
    peer: SocketAddrV4,
    hooks: &mut dyn Hooks,
) -> Result<bool> {
    hooks.console(report::KTAP_HEADER);
    hooks.console(&report::ktap_plan(suite.methods.len()));
    let mut all_passed = true;
    for (index, &method) in suite.methods.iter().enumerate() {
        let result = runner::run(method, suite, root, peer, hooks);
        hooks.report(&result.json())?;
        hooks.console(&result.ktap_line(index + 1));
        all_passed &= !result.failed();
    }
    Ok(all_passed)
}

#[cfg(test)]
mod tests;
