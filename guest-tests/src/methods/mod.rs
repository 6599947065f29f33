//! The method suite (`zc.test=methods`): every file-to-network transfer method of
//! `docs/transfer-methods.md`, run one after the other from the same file to
//! the same TCP peer, each between a `mark BEGIN <name>` / `mark END <name>` pair,
//! with a dirty-page sample request after every chunk; and, when named, the
//! receive methods, which take the same file from the peer (its send port) and
//! write it to the scratch disk.
//!
//! The contract with the VMM and the audit is `docs/method-suite.md`. Per method
//! the guest reports its own view (bytes, time, system calls by name, MSG_ZEROCOPY
//! completions) as a `report` line and prints its KTAP lines on the console;
//! whether the bytes really travelled without CPU copies is the audit's verdict,
//! from the device logs, not this program's.
//!
//! Layout: one module per method (its per-chunk system calls), plus
//! - [`runner`]: the per-method sequence (cache, open, marks, connect, chunk loop
//!   with samples, ACK, report),
//! - [`receive`]: what the receive methods share (the target file, exact
//!   receives, the count sent back, the check of the file written),
//! - [`syscalls`]: the counter every method's system calls go through,
//! - [`zerocopy`]: MSG_ZEROCOPY sends and completion accounting,
//! - [`report`]: the report JSON and the KTAP lines,
//! - [`port`]: the dirty-page sample request (`outl` to the sample port).
//!
//! The method list, names and properties are `zc_protocol::Method`'s.

use std::net::SocketAddrV4;
use std::path::Path;

use crate::error::Result;
use zc_protocol::addr::PEER_SEND_PORT;

pub mod cow_zerocopy;
pub mod direct_write;
pub mod direct_zerocopy;
pub mod mmap_write;
pub mod mmap_zerocopy;
pub mod port;
pub mod read_write;
pub mod receive;
pub mod recv_direct;
pub mod recv_mmap;
pub mod recv_write;
pub mod report;
pub mod runner;
pub mod sendfile;
pub mod sendfile_direct;
pub mod sendfile_tmpfs;
pub mod sendfile_warm;
pub mod splice;
pub mod splice_direct;
pub mod splice_recv;
pub mod syscalls;
pub mod tcp_zerocopy_receive;
pub mod uring_send_zc;
pub mod vmsplice;
pub mod zerocopy;
pub mod zerocopy_pressure;

pub use zc_protocol::method::Method;
#[cfg(test)]
pub use zc_protocol::options::DEFAULT_FILE;
pub use zc_protocol::options::{Suite, CHUNK_ALIGN};

/// Where the suite's files are.
#[derive(Debug, Clone, Copy)]
pub struct Roots<'a> {
    /// Where `suite.file`, the payload, lives (the test disk's mount point in the
    /// guest).
    pub disk: &'a Path,
    /// Where the receive methods write it (the scratch disk's mount point), as
    /// `MethodRun::scratch_file`.
    pub scratch: &'a Path,
}

/// One card's TCP peer, as the guest reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Where the send methods connect: the peer receives and checks the bytes.
    pub send_to: SocketAddrV4,
    /// Where the receive methods connect: the peer sends the payload.
    pub receive_from: SocketAddrV4,
}

impl Peer {
    /// The peer at `send_to`, which sends on the same address's
    /// [`PEER_SEND_PORT`] (the VMM's peer).
    pub fn at(send_to: SocketAddrV4) -> Peer {
        Peer {
            send_to,
            receive_from: SocketAddrV4::new(*send_to.ip(), PEER_SEND_PORT),
        }
    }
}

/// What the suite needs from its surroundings, so that tests can run it without
/// port I/O privileges, a control channel or root.
pub trait Hooks {
    /// `sync` and drop the page cache, so that the next read of the file is disk
    /// DMA (the guest writes `/proc/sys/vm/drop_caches`).
    fn drop_caches(&mut self) -> Result<()>;
    /// Sends `mark <label>` on the control channel (a [`zc_protocol::Marker`]'s label).
    fn mark(&mut self, label: &str) -> Result<()>;
    /// Requests a dirty-page sample after chunk `chunk` (the guest: `outl` to
    /// `zc_protocol::addr::DIRTY_SAMPLE_PORT`). Must not make a system call: it happens inside the counted loop.
    fn sample(&mut self, chunk: u32);
    /// Sends `report <json>` on the control channel.
    fn report(&mut self, json: &str) -> Result<()>;
    /// Prints one line on the console (KTAP).
    fn console(&mut self, line: &str);
    /// Sets `net.core.optmem_max` (the option memory each socket may use, which
    /// MSG_ZEROCOPY notifications are charged to) to `bytes`; returns the value
    /// it had, for restoring it. Only `zerocopy_pressure` calls it, before `BEGIN`
    /// and again after `END`.
    fn set_optmem_max(&mut self, bytes: u64) -> Result<u64>;
}

/// Runs the suite: KTAP header, then per method run its marks, `report` line and
/// KTAP lines (figures or the failure's reason as a diagnostic line, then the
/// result). Returns whether no method failed (a skipped method is not a failure);
/// an `Err` only when the hooks themselves fail (the control channel).
///
/// `roots` says where the payload is and where receive methods write;
/// `peers[n]` is card `n`'s peer. With several cards (`zc.cards`) each run's span,
/// report and KTAP name say its variant (`sendfile@sg-off`).
pub fn run_suite(
    suite: &Suite,
    roots: Roots<'_>,
    peers: &[Peer],
    hooks: &mut dyn Hooks,
) -> Result<bool> {
    let runs = suite.runs();
    hooks.console(report::KTAP_HEADER);
    hooks.console(&report::ktap_plan(runs.len()));
    let mut all_passed = true;
    for (index, run) in runs.iter().enumerate() {
        let card = usize::from(run.card.index());
        let result = match peers.get(card) {
            Some(&peer) => runner::run(run, suite, roots, peer, hooks),
            None => {
                report::MethodResult::Failed(run.method, format!("no peer address for card {card}"))
            }
        };
        let mut report = result.report();
        report.variant = run.variant.map(String::from);
        hooks.report(&report.to_json())?;
        for line in result.ktap_lines_named(index + 1, &run.span()) {
            hooks.console(&line);
        }
        all_passed &= !result.failed();
    }
    Ok(all_passed)
}

#[cfg(test)]
mod tests;
