//! A method's result as the `report` JSON line (`zc_protocol::MethodReport`, whose
//! docs show the shape) and as KTAP lines (a diagnostic line and the result line).

use zc_protocol::report::{MethodReport, ZeroCopyCounts, ZeroCopyReceive};
use zc_protocol::Direction;

use super::Method;

/// The first line of the suite's KTAP document.
pub const KTAP_HEADER: &str = "KTAP version 1";

/// The KTAP plan line for `count` tests.
pub fn ktap_plan(count: usize) -> String {
    format!("1..{count}")
}

/// The zero-copy counts of a method (MSG_ZEROCOPY or io_uring SEND_ZC).
pub type ZcReport = ZeroCopyCounts;

/// What a method that ran to the end measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Bytes sent (and acknowledged by the peer).
    pub bytes: u64,
    /// The chunk size.
    pub chunk: u64,
    /// Chunks sent: the number of sample requests.
    pub chunks: u64,
    /// Connect to the last completion, in seconds.
    pub seconds: f64,
    /// Every system call between the marks, by name (non-zero only).
    pub syscalls: Vec<(&'static str, u64)>,
    /// Those issued inside the per-chunk loop.
    pub loop_syscalls: u64,
    /// The rest.
    pub setup_syscalls: u64,
    /// Zero-copy counts (zero-copy methods only).
    pub zerocopy: Option<ZcReport>,
    /// What `tcp_zerocopy_receive` mapped and copied (that method only).
    pub zerocopy_receive: Option<ZeroCopyReceive>,
}

impl Measured {
    /// Loop system calls per chunk (what the table's "system calls per chunk" is).
    pub fn syscalls_per_chunk(&self) -> f64 {
        if self.chunks == 0 {
            0.0
        } else {
            self.loop_syscalls as f64 / self.chunks as f64
        }
    }
}

/// How one method ended.
#[derive(Debug, Clone, PartialEq)]
pub enum MethodResult {
    /// It sent everything and the peer acknowledged it.
    Passed(Method, Measured),
    /// The kernel cannot run it; the reason says what is missing.
    Skipped(Method, String),
    /// It failed; one line saying why.
    Failed(Method, String),
}

impl MethodResult {
    /// Whether this counts against the suite (a skip does not).
    pub fn failed(&self) -> bool {
        matches!(self, MethodResult::Failed(..))
    }

    /// The report.
    pub fn report(&self) -> MethodReport {
        let mut report = self.report_of_either_direction();
        let method = match self {
            MethodResult::Passed(method, _)
            | MethodResult::Skipped(method, _)
            | MethodResult::Failed(method, _) => *method,
        };
        // Only a receive method's report says its direction: send reports keep
        // the shape they always had.
        if method.direction() == Direction::Receive {
            report.direction = Some(Direction::Receive.name().to_string());
        }
        report
    }

    /// [`MethodResult::report`] without the direction.
    fn report_of_either_direction(&self) -> MethodReport {
        match self {
            MethodResult::Passed(method, m) => MethodReport {
                bytes: Some(m.bytes),
                chunk: Some(m.chunk),
                chunks: Some(m.chunks),
                seconds: Some(m.seconds),
                syscalls: m
                    .syscalls
                    .iter()
                    .map(|&(name, n)| (name.to_string(), n))
                    .collect(),
                loop_syscalls: Some(m.loop_syscalls),
                setup_syscalls: Some(m.setup_syscalls),
                zerocopy: m.zerocopy,
                zerocopy_receive: m.zerocopy_receive,
                ..MethodReport::new(method.name(), true)
            },
            MethodResult::Skipped(method, reason) => MethodReport {
                skipped: Some(reason.clone()),
                ..MethodReport::new(method.name(), true)
            },
            MethodResult::Failed(method, error) => MethodReport {
                error: Some(one_line(error)),
                ..MethodReport::new(method.name(), false)
            },
        }
    }

    /// The `report` JSON.
    #[cfg(test)]
    pub fn json(&self) -> String {
        self.report().to_json()
    }

    /// The KTAP lines of test number `number` (1-based), as
    /// `Documentation/dev-tools/ktap.rst` has them and the kernel's parser
    /// (`kunit.py parse`) reads them: the figures, or a failure's reason, on a
    /// diagnostic line (`# <method>: ...`) before the result line, which carries only
    /// `ok`/`not ok`, the number, the name and a `SKIP` directive (the parser drops
    /// anything else after `#` on a result line).
    #[cfg(test)]
    pub fn ktap_lines(&self, number: usize) -> Vec<String> {
        let method = match self {
            MethodResult::Passed(method, _)
            | MethodResult::Skipped(method, _)
            | MethodResult::Failed(method, _) => method.name(),
        };
        self.ktap_lines_named(number, method)
    }

    /// [`MethodResult::ktap_lines`] under the name `method` (a method run on a
    /// named card: its span, `sendfile@sg-off`).
    pub fn ktap_lines_named(&self, number: usize, method: &str) -> Vec<String> {
        match self {
            MethodResult::Passed(_, m) => {
                let mut figures = format!(
                    "# {method}: bytes={} seconds={:.2} syscalls_per_chunk={:.2}",
                    m.bytes,
                    m.seconds,
                    m.syscalls_per_chunk()
                );
                if let Some(zc) = m.zerocopy {
                    let copied = zc.copied.map_or("unknown".to_string(), |n| n.to_string());
                    figures.push_str(&format!(
                        " zc_sends={} zc_completions={} zc_copied={copied}",
                        zc.sends, zc.completions
                    ));
                }
                if let Some(zr) = m.zerocopy_receive {
                    figures.push_str(&format!(
                        " zc_mapped={} zc_received={}",
                        zr.mapped, zr.received
                    ));
                }
                vec![figures, format!("ok {number} {method}")]
            }
            MethodResult::Skipped(_, reason) => {
                vec![format!("ok {number} {method} # SKIP {}", one_line(reason))]
            }
            MethodResult::Failed(_, error) => vec![
                format!("# {method}: error: {}", one_line(error)),
                format!("not ok {number} {method}"),
            ],
        }
    }
}

/// `text` on one line: a KTAP line or report must not be split.
fn one_line(text: &str) -> String {
    text.split(['\n', '\r']).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sendfile() -> Measured {
        Measured {
            bytes: 16 << 20,
            chunk: 65536,
            chunks: 256,
            seconds: 1.234,
            syscalls: vec![
                ("recv", 1),
                ("sendfile", 256),
                ("socket", 1),
                ("connect", 1),
            ],
            loop_syscalls: 256,
            setup_syscalls: 3,
            zerocopy: None,
            zerocopy_receive: None,
        }
    }

    #[test]
    fn passed_report_has_the_contract_shape() {
        let r = MethodResult::Passed(Method::Sendfile, sendfile());
        assert_eq!(
            r.json(),
            r#"{"test":"method","method":"sendfile","ok":true,"bytes":16777216,"chunk":65536,"chunks":256,"seconds":1.234000,"syscalls":{"recv":1,"sendfile":256,"socket":1,"connect":1},"loop_syscalls":256,"setup_syscalls":3}"#
        );
        assert_eq!(
            r.ktap_lines(3),
            [
                "# sendfile: bytes=16777216 seconds=1.23 syscalls_per_chunk=1.00",
                "ok 3 sendfile"
            ]
        );
        assert!(!r.failed());
    }

    #[test]
    fn zerocopy_member() {
        let mut m = sendfile();
        m.zerocopy = Some(ZcReport {
            sends: 256,
            completions: 256,
            copied: Some(0),
            fallbacks: None,
        });
        let r = MethodResult::Passed(Method::MmapZerocopy, m.clone());
        assert!(r
            .json()
            .ends_with(r#""zerocopy":{"sends":256,"completions":256,"copied":0}}"#));
        assert!(r.ktap_lines(7)[0].ends_with("zc_sends=256 zc_completions=256 zc_copied=0"));
        assert_eq!(r.ktap_lines(7)[1], "ok 7 mmap_zerocopy");
        m.zerocopy = Some(ZcReport {
            sends: 2,
            completions: 2,
            copied: None,
            fallbacks: None,
        });
        let r = MethodResult::Passed(Method::UringSendZc, m);
        assert!(r
            .json()
            .ends_with(r#""zerocopy":{"sends":2,"completions":2,"copied":null}}"#));
        assert!(r.ktap_lines(8)[0].ends_with("zc_copied=unknown"));
    }

    #[test]
    fn skipped_and_failed() {
        let s = MethodResult::Skipped(
            Method::UringSendZc,
            "kernel has no IORING_OP_SEND_ZC (needs Linux 6.0)".into(),
        );
        assert_eq!(
            s.json(),
            r#"{"test":"method","method":"uring_send_zc","ok":true,"skipped":"kernel has no IORING_OP_SEND_ZC (needs Linux 6.0)"}"#
        );
        assert_eq!(
            s.ktap_lines(8),
            ["ok 8 uring_send_zc # SKIP kernel has no IORING_OP_SEND_ZC (needs Linux 6.0)"]
        );
        assert!(!s.failed());
        let f = MethodResult::Failed(Method::Splice, "connecting: refused\nsecond".into());
        assert_eq!(
            f.json(),
            r#"{"test":"method","method":"splice","ok":false,"error":"connecting: refused second"}"#
        );
        assert_eq!(
            f.ktap_lines(4),
            [
                "# splice: error: connecting: refused second",
                "not ok 4 splice"
            ]
        );
        assert!(f.failed());
        assert_eq!(ktap_plan(10), "1..10");
    }

    #[test]
    fn a_receive_report_says_receive_and_what_was_mapped() {
        let m = Measured {
            bytes: 1 << 20,
            chunks: 16,
            syscalls: vec![("recv", 16), ("getsockopt", 16), ("pwritev", 16)],
            loop_syscalls: 48,
            zerocopy_receive: Some(ZeroCopyReceive {
                mapped: 0,
                received: 1 << 20,
            }),
            ..sendfile()
        };
        let r = MethodResult::Passed(Method::TcpZerocopyReceive, m);
        let json = r.json();
        assert!(
            json.starts_with(
                r#"{"test":"method","method":"tcp_zerocopy_receive","direction":"receive","ok":true,"bytes":1048576,"#
            ),
            "{json}"
        );
        assert!(
            json.ends_with(r#""zerocopy_receive":{"mapped":0,"received":1048576}}"#),
            "{json}"
        );
        assert!(
            r.ktap_lines(2)[0].ends_with("syscalls_per_chunk=3.00 zc_mapped=0 zc_received=1048576")
        );
        // Skipped and failed receive methods say their direction too; a send never.
        let s = MethodResult::Skipped(Method::TcpZerocopyReceive, "no".into());
        assert!(s
            .json()
            .contains(r#""direction":"receive","ok":true,"skipped":"no""#));
        let f = MethodResult::Failed(Method::RecvWrite, "short".into());
        assert_eq!(
            f.json(),
            r#"{"test":"method","method":"recv_write","direction":"receive","ok":false,"error":"short"}"#
        );
        assert!(!MethodResult::Passed(Method::Sendfile, sendfile())
            .json()
            .contains("direction"));
    }

    #[test]
    fn zero_chunks_do_not_divide_by_zero() {
        let m = Measured {
            chunks: 0,
            loop_syscalls: 0,
            ..sendfile()
        };
        assert_eq!(m.syscalls_per_chunk(), 0.0);
    }
}
