//! Live progress of a run's transfers: what the in-VMM TCP peer has received during
//! the guest's current method, as `zc-vmm: progress: ...` lines on stderr.
//!
//! The child `zc-vmm run` prints them ([`PeerProgress`]); in emulated mode the inner
//! run's stderr comes out of the emulated host as it is written
//! ([`crate::emulated`] follows it), so the parent `zc-vmm methods` reads the same
//! lines either way and shows them ([`MethodProgress::parse`]). The line is defined
//! here once, for both sides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zc_devices::net_peer::NetPeer;
use zc_devices::virtio::net::Net;
use zc_protocol::Marker;

use crate::virtio::DeviceHandle;

/// How often the peer's count is printed during a method (when it changed).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

const PREFIX: &str = "zc-vmm: progress: ";

/// What the peer has received during one method (sent, for a receive method): a
/// progress line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodProgress {
    /// The method (the guest's `BEGIN <method>` mark).
    pub method: String,
    /// Payload bytes the peer received and checked since that mark.
    pub bytes: u64,
    /// What the method's connections are expected to carry, when known.
    pub expected: Option<u64>,
    /// The method's `END` mark has come: `bytes` is its final count.
    pub done: bool,
}

impl MethodProgress {
    /// The stderr line: `zc-vmm: progress: sendfile: 8388608 of 16777216 bytes`, with
    /// `, done` at the method's end; `of N` is left out when nothing was expected.
    pub fn to_line(&self) -> String {
        let of = self
            .expected
            .map(|n| format!(" of {n}"))
            .unwrap_or_default();
        let done = if self.done { ", done" } else { "" };
        format!("{PREFIX}{}: {}{of} bytes{done}", self.method, self.bytes)
    }

    /// Reads a line [`MethodProgress::to_line`] wrote; `None` for any other line.
    pub fn parse(line: &str) -> Option<MethodProgress> {
        let rest = line.trim_end().strip_prefix(PREFIX)?;
        let (method, rest) = rest.rsplit_once(": ")?;
        let (rest, done) = match rest.strip_suffix(", done") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let rest = rest.strip_suffix(" bytes")?;
        let (bytes, expected) = match rest.split_once(" of ") {
            Some((b, e)) => (b.parse().ok()?, Some(e.parse().ok()?)),
            None => (rest.parse().ok()?, None),
        };
        (!method.is_empty() && !method.contains(char::is_whitespace)).then(|| MethodProgress {
            method: method.to_string(),
            bytes,
            expected,
            done,
        })
    }

    /// For people: `8.0 of 16.0 MiB (50%)`, `16.0 MiB`.
    pub fn amount(&self) -> String {
        let mib = |n: u64| format!("{:.1}", n as f64 / f64::from(1 << 20));
        match self.expected {
            Some(total) if total > 0 => format!(
                "{} of {} MiB ({:.0}%)",
                mib(self.bytes),
                mib(total),
                self.bytes as f64 * 100.0 / total as f64
            ),
            _ => format!("{} MiB", mib(self.bytes)),
        }
    }
}

/// The method under way, as the marks set it.
#[derive(Debug, Default)]
struct Span {
    method: Option<String>,
    /// A receive method's: the count is of what the peers sent, not received.
    receives: bool,
    /// Each peer's connection count at its `BEGIN`: its connections are numbered
    /// from here.
    first_connection: Vec<u64>,
    /// The last count printed, not to repeat an unchanged line.
    printed: Option<u64>,
}

/// Whether the span `span` (`<method>` or `<method>@<variant>`) is a receive
/// method's, whose bytes the peer sends.
pub fn receives(span: &str) -> bool {
    let method = span
        .split(zc_protocol::marker::VARIANT_SEP)
        .next()
        .unwrap_or(span);
    zc_protocol::Method::from_name(method)
        .is_some_and(|m| m.direction() == zc_protocol::Direction::Receive)
}

/// Prints the peer's progress through each method: a line at the method's `BEGIN`
/// and `END` marks (called on the vCPU thread that carries the mark, so the line
/// is exact: the guest has its count back before it marks `END`), and every
/// [`PROGRESS_INTERVAL`] in between when the count moved.
///
/// With several cards (one boot for several NIC variants) a method sends through one
/// of them: its count is that of the card whose peer received the most since
/// `BEGIN` (before any byte arrives, the first card still expecting a connection).
pub struct PeerProgress {
    nics: Vec<DeviceHandle<Net<NetPeer>>>,
    span: Mutex<Span>,
    stopped: AtomicBool,
}

impl PeerProgress {
    /// Reports on the peers behind `nics`.
    pub fn new(nics: Vec<DeviceHandle<Net<NetPeer>>>) -> Arc<Self> {
        Arc::new(PeerProgress {
            nics,
            span: Mutex::new(Span::default()),
            stopped: AtomicBool::new(false),
        })
    }

    fn span(&self) -> std::sync::MutexGuard<'_, Span> {
        self.span.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a guest mark: starts or ends a method's count.
    pub fn mark(&self, label: &str) {
        match Marker::parse(label) {
            Some(Marker::Begin(span)) => {
                let method = span.as_str();
                let receives = receives(method);
                let (first, expected): (Vec<u64>, Vec<Option<u64>>) = self
                    .nics
                    .iter()
                    .map(|nic| {
                        nic.with(|d| {
                            let peer = d.backend();
                            if receives {
                                (peer.stats().send_connections, peer.next_offer_size())
                            } else {
                                (peer.stats().connections, peer.next_expected_size())
                            }
                        })
                    })
                    .unzip();
                let expected = expected.into_iter().flatten().next();
                let mut span = self.span();
                *span = Span {
                    method: Some(method.to_string()),
                    receives,
                    first_connection: first,
                    printed: Some(0),
                };
                print_line(&MethodProgress {
                    method: method.to_string(),
                    bytes: 0,
                    expected,
                    done: false,
                });
            }
            Some(Marker::End(_)) => {
                let mut span = self.span();
                if let Some(progress) = self.now(&span, true) {
                    print_line(&progress);
                }
                *span = Span::default();
            }
            None => {}
        }
    }

    /// The count of the method under way, if one is.
    fn now(&self, span: &Span, done: bool) -> Option<MethodProgress> {
        let method = span.method.clone()?;
        let counts = self
            .nics
            .iter()
            .zip(&span.first_connection)
            .map(|(nic, &first)| {
                nic.with(|d| {
                    let peer = d.backend();
                    if span.receives {
                        (peer.sent_since(first), peer.next_offer_size())
                    } else {
                        (peer.received_since(first), peer.next_expected_size())
                    }
                })
            });
        // The card the method sends through: the one that received most since
        // BEGIN; before anything arrived, the first that expects another connection.
        let (since, next) = counts
            .enumerate()
            .max_by_key(|(i, (since, next))| (since.bytes, next.is_some(), std::cmp::Reverse(*i)))
            .map(|(_, c)| c)?;
        Some(MethodProgress {
            method,
            bytes: since.bytes,
            // Before its connection is accepted, what the next one should carry.
            expected: if since.connections == 0 {
                next
            } else {
                since.expected
            },
            done,
        })
    }

    /// Prints the count if a method is under way and it moved since the last line.
    pub fn tick(&self) {
        let mut span = self.span();
        if let Some(progress) = self.now(&span, false) {
            if span.printed != Some(progress.bytes) {
                span.printed = Some(progress.bytes);
                print_line(&progress);
            }
        }
    }

    /// Starts the thread that calls [`PeerProgress::tick`] until [`PeerProgress::stop`].
    pub fn spawn_ticker(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                zc_seccomp::enter(zc_seccomp::Role::Progress);
                while !me.stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(PROGRESS_INTERVAL);
                    if !me.stopped.load(Ordering::Relaxed) {
                        me.tick();
                    }
                }
            })
            .map(drop)
    }

    /// Ends the ticker (at the end of the run).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

fn print_line(progress: &MethodProgress) {
    eprintln!("{}", progress.to_line());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: &str, bytes: u64, expected: Option<u64>, done: bool) -> MethodProgress {
        MethodProgress {
            method: method.into(),
            bytes,
            expected,
            done,
        }
    }

    #[test]
    fn receive_spans_are_known_by_their_method() {
        assert!(receives("recv_write") && receives("tcp_zerocopy_receive@sg-off"));
        assert!(!receives("sendfile@sg-on") && !receives("disk-roundtrip"));
    }

    #[test]
    fn lines_read_back_as_written() {
        for progress in [
            p("sendfile", 8_388_608, Some(16_777_216), false),
            p("mmap_zerocopy", 16_777_216, Some(16_777_216), true),
            p("read_write", 0, None, false),
            p("splice", 4096, None, true),
        ] {
            let line = progress.to_line();
            assert_eq!(MethodProgress::parse(&line), Some(progress), "{line}");
        }
        assert_eq!(
            p("sendfile", 8_388_608, Some(16_777_216), false).to_line(),
            "zc-vmm: progress: sendfile: 8388608 of 16777216 bytes"
        );
        assert_eq!(
            p("sendfile", 16_777_216, Some(16_777_216), true).to_line(),
            "zc-vmm: progress: sendfile: 16777216 of 16777216 bytes, done"
        );
    }

    #[test]
    fn other_lines_are_not_progress() {
        for line in [
            "",
            "guest: sendfile: 16777216 bytes",
            "zc-vmm: peer received 16777216 bytes of payload.bin: every byte matches",
            "zc-vmm: progress: sendfile: lots of 16777216 bytes",
            "zc-vmm: progress: sendfile: 5 of bytes",
            "zc-vmm: progress: : 5 bytes",
            "zc-vmm: progress: sendfile 5 bytes",
            "zc-vmm: progress: two words: 5 bytes",
        ] {
            assert_eq!(MethodProgress::parse(line), None, "{line:?}");
        }
        // A trailing carriage return (a console that ends lines with \r\n) is fine.
        assert_eq!(
            MethodProgress::parse("zc-vmm: progress: splice: 5 bytes\r"),
            Some(p("splice", 5, None, false))
        );
    }

    #[test]
    fn amounts_are_in_mib_with_a_share_when_the_total_is_known() {
        assert_eq!(
            p("sendfile", 8 << 20, Some(16 << 20), false).amount(),
            "8.0 of 16.0 MiB (50%)"
        );
        assert_eq!(
            p("sendfile", 16 << 20, Some(16 << 20), true).amount(),
            "16.0 of 16.0 MiB (100%)"
        );
        assert_eq!(p("sendfile", 3 << 19, None, false).amount(), "1.5 MiB");
        assert_eq!(p("sendfile", 0, Some(0), false).amount(), "0.0 MiB");
    }
}
