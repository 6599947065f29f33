//! A method's `report` JSON: what the guest measured for one method, sent as a
//! `report <json>` control line (`docs/method-suite.md`):
//! ```json
//! {"test":"method","method":"sendfile","ok":true,"bytes":16777216,"chunk":65536,
//!  "chunks":256,"seconds":1.234000,"syscalls":{"sendfile":256,"socket":1,...},
//!  "loop_syscalls":256,"setup_syscalls":3,
//!  "zerocopy":{"sends":256,"completions":256,"copied":0}}
//! ```
//! `variant` (after `method`) only when the boot had one card per NIC variant
//! (`zc.cards`): the variant whose card carried the method. `direction` (after
//! `variant`) only for a receive method, always `"receive"` (a report without it
//! is a send's). `zerocopy` only for the
//! zero-copy methods, `copied` `null` when the kernel does
//! not say (io_uring before Linux 6.2); `zerocopy_receive` only for
//! `tcp_zerocopy_receive`: `{"mapped":N,"received":M}`. A skipped method is
//! `{"test":"method","method":M,"ok":true,"skipped":"<reason>"}`, a failed one
//! `{"test":"method","method":M,"ok":false,"error":"<one line>"}`.
//!
//! The guest writes it with [`MethodReport::to_json`] (no serde in the guest); the
//! VMM and the audit read it with serde (feature `serde`).

use crate::json::Object;

/// The `"test"` value of a method report.
pub const METHOD_TEST: &str = "method";

/// One method's report. Every count is optional and, with serde, unknown fields
/// are ignored, so a failed or skipped method's short report parses too.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct MethodReport {
    /// [`METHOD_TEST`] for a method's report.
    pub test: String,
    /// The method's name ([`crate::Method::name`]; kept as text so that a report
    /// of a method this build does not know still reads).
    pub method: String,
    /// The NIC variant whose card the method ran through, when the boot had one
    /// card per variant (`zc.cards`); absent in a one-card run.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub variant: Option<String>,
    /// `"receive"` for a receive method (`crate::Direction::name`); absent for a
    /// send method, so that send reports keep their shape.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub direction: Option<String>,
    /// Whether the guest completed the transfer (the peer confirmed every byte),
    /// or skipped it.
    pub ok: bool,
    /// Bytes sent.
    pub bytes: Option<u64>,
    /// Bytes per chunk.
    pub chunk: Option<u64>,
    /// Chunks sent.
    pub chunks: Option<u64>,
    /// Wall-clock seconds of the transfer, as the guest measured it (written with
    /// six decimals).
    pub seconds: Option<f64>,
    /// Every system call between `BEGIN` and `END`, by name, in the guest's order
    /// (a JSON object on the wire).
    #[cfg_attr(feature = "serde", serde(with = "ordered_map"))]
    pub syscalls: Vec<(String, u64)>,
    /// System calls inside the per-chunk loop.
    pub loop_syscalls: Option<u64>,
    /// System calls outside the loop (socket, connect, mmap, drains...).
    pub setup_syscalls: Option<u64>,
    /// What the kernel said about MSG_ZEROCOPY / SEND_ZC sends, if the method uses them.
    pub zerocopy: Option<ZeroCopyCounts>,
    /// How `tcp_zerocopy_receive` got the payload: mapped or copied.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub zerocopy_receive: Option<ZeroCopyReceive>,
    /// Why the guest skipped the method (it did not run).
    pub skipped: Option<String>,
    /// Why the method failed, one line.
    pub error: Option<String>,
}

/// The kernel's zero-copy completion counts for one method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct ZeroCopyCounts {
    /// Zero-copy sends issued.
    pub sends: u64,
    /// Completion notifications received.
    pub completions: u64,
    /// Sends the kernel flagged as copied (`SO_EE_CODE_ZEROCOPY_COPIED` /
    /// `IORING_NOTIF_USAGE_ZC_COPIED`); `None` (`null`) when it cannot tell.
    pub copied: Option<u64>,
    /// Sends made again without MSG_ZEROCOPY after the kernel refused the
    /// zero-copy send (ENOBUFS: the socket's option memory is exhausted), each a
    /// copying send the kernel never reports on; `None` for a method that does not
    /// fall back (the member is then absent).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub fallbacks: Option<u64>,
}

/// How a `TCP_ZEROCOPY_RECEIVE` method got the payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(default)
)]
pub struct ZeroCopyReceive {
    /// Bytes the kernel mapped into the process (the receive pages themselves,
    /// no copy).
    pub mapped: u64,
    /// Bytes it could not map, read with `recv` (copied).
    pub received: u64,
}

impl MethodReport {
    /// The report of a method that sent everything; the counts are the caller's.
    pub fn new(method: &str, ok: bool) -> MethodReport {
        MethodReport {
            test: METHOD_TEST.to_string(),
            method: method.to_string(),
            ok,
            ..MethodReport::default()
        }
    }

    /// The count of system call `name`, if the report lists it.
    pub fn syscall(&self, name: &str) -> Option<u64> {
        self.syscalls
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, count)| count)
    }

    /// The report as one JSON object on one line, members in the contract's order,
    /// absent members left out.
    pub fn to_json(&self) -> String {
        let mut json = Object::new()
            .str("test", &self.test)
            .str("method", &self.method);
        if let Some(variant) = &self.variant {
            json = json.str("variant", variant);
        }
        if let Some(direction) = &self.direction {
            json = json.str("direction", direction);
        }
        json = json.bool("ok", self.ok);
        let u64_member = |json: Object, key: &str, value: Option<u64>| match value {
            Some(n) => json.u64(key, n),
            None => json,
        };
        json = u64_member(json, "bytes", self.bytes);
        json = u64_member(json, "chunk", self.chunk);
        json = u64_member(json, "chunks", self.chunks);
        if let Some(seconds) = self.seconds {
            json = json.f64("seconds", seconds, 6);
        }
        if !self.syscalls.is_empty() {
            let syscalls = self
                .syscalls
                .iter()
                .fold(Object::new(), |o, (name, n)| o.u64(name, *n));
            json = json.object("syscalls", syscalls);
        }
        json = u64_member(json, "loop_syscalls", self.loop_syscalls);
        json = u64_member(json, "setup_syscalls", self.setup_syscalls);
        if let Some(zc) = self.zerocopy {
            let z = Object::new()
                .u64("sends", zc.sends)
                .u64("completions", zc.completions);
            let z = match zc.copied {
                Some(n) => z.u64("copied", n),
                None => z.null("copied"),
            };
            let z = u64_member(z, "fallbacks", zc.fallbacks);
            json = json.object("zerocopy", z);
        }
        if let Some(zr) = self.zerocopy_receive {
            let z = Object::new()
                .u64("mapped", zr.mapped)
                .u64("received", zr.received);
            json = json.object("zerocopy_receive", z);
        }
        if let Some(reason) = &self.skipped {
            json = json.str("skipped", reason);
        }
        if let Some(error) = &self.error {
            json = json.str("error", error);
        }
        json.finish()
    }
}

/// A JSON object as name/count pairs in document order (serde's maps would sort
/// them or need a dependency that keeps the order).
#[cfg(feature = "serde")]
mod ordered_map {
    use std::fmt;

    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(pairs: &[(String, u64)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(pairs.len()))?;
        for (name, count) in pairs {
            map.serialize_entry(name, count)?;
        }
        map.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, u64)>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Vec<(String, u64)>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of system call counts")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                Ok(pairs)
            }
        }
        d.deserialize_map(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sendfile() -> MethodReport {
        MethodReport {
            bytes: Some(16 << 20),
            chunk: Some(65536),
            chunks: Some(256),
            seconds: Some(1.234),
            syscalls: vec![
                ("recv".into(), 1),
                ("sendfile".into(), 256),
                ("socket".into(), 1),
                ("connect".into(), 1),
            ],
            loop_syscalls: Some(256),
            setup_syscalls: Some(3),
            ..MethodReport::new("sendfile", true)
        }
    }

    fn received() -> MethodReport {
        MethodReport {
            direction: Some("receive".into()),
            zerocopy_receive: Some(ZeroCopyReceive {
                mapped: 8192,
                received: 100,
            }),
            syscalls: vec![("getsockopt".into(), 2), ("recv".into(), 2)],
            ..MethodReport::new("tcp_zerocopy_receive", true)
        }
    }

    #[test]
    fn a_receive_report_says_its_direction_and_what_was_mapped() {
        assert_eq!(
            received().to_json(),
            r#"{"test":"method","method":"tcp_zerocopy_receive","direction":"receive","ok":true,"syscalls":{"getsockopt":2,"recv":2},"zerocopy_receive":{"mapped":8192,"received":100}}"#
        );
        let on_card = MethodReport {
            variant: Some("sg-off".into()),
            zerocopy_receive: None,
            ..received()
        };
        assert!(on_card
            .to_json()
            .starts_with(r#"{"test":"method","method":"tcp_zerocopy_receive","variant":"sg-off","direction":"receive","ok":true,"#));
    }

    #[test]
    fn writes_the_contract_shape() {
        assert_eq!(
            sendfile().to_json(),
            r#"{"test":"method","method":"sendfile","ok":true,"bytes":16777216,"chunk":65536,"chunks":256,"seconds":1.234000,"syscalls":{"recv":1,"sendfile":256,"socket":1,"connect":1},"loop_syscalls":256,"setup_syscalls":3}"#
        );
        let skipped = MethodReport {
            skipped: Some("no SEND_ZC".into()),
            ..MethodReport::new("uring_send_zc", true)
        };
        assert_eq!(
            skipped.to_json(),
            r#"{"test":"method","method":"uring_send_zc","ok":true,"skipped":"no SEND_ZC"}"#
        );
        assert_eq!(sendfile().syscall("sendfile"), Some(256));
        assert_eq!(sendfile().syscall("splice"), None);
        // A method run through a named card says which, right after its name.
        let on_card = MethodReport {
            variant: Some("sg-off".into()),
            ..skipped
        };
        assert_eq!(
            on_card.to_json(),
            r#"{"test":"method","method":"uring_send_zc","variant":"sg-off","ok":true,"skipped":"no SEND_ZC"}"#
        );
    }

    /// What the guest writes, the VMM and the audit read back as the same value.
    #[cfg(feature = "serde")]
    #[test]
    fn what_the_writer_writes_deserialises_to_the_same_report() {
        let zerocopy = |copied| MethodReport {
            zerocopy: Some(ZeroCopyCounts {
                sends: 256,
                completions: 255,
                copied,
                fallbacks: copied.map(|_| 7),
            }),
            seconds: Some(0.000_001),
            ..sendfile()
        };
        let reports = [
            sendfile(),
            zerocopy(Some(3)),
            zerocopy(None),
            MethodReport {
                skipped: Some("kernel has no IORING_OP_SEND_ZC (needs \"6.0\")".into()),
                ..MethodReport::new("uring_send_zc", true)
            },
            MethodReport {
                error: Some("connect: refused \\ \u{1} \u{7f} é".into()),
                ..MethodReport::new("splice", false)
            },
            MethodReport {
                seconds: Some(123_456.654_321),
                ..MethodReport::new("future_method", true)
            },
            MethodReport {
                variant: Some("sg-off".into()),
                ..sendfile()
            },
            received(),
        ];
        for report in reports {
            let json = report.to_json();
            let back: MethodReport = serde_json::from_str(&json).expect(&json);
            assert_eq!(back, report, "{json}");
            // And serde's own writing reads back the same, in the same member order.
            let again = serde_json::to_string(&back).unwrap();
            assert_eq!(
                serde_json::from_str::<MethodReport>(&again).unwrap(),
                report
            );
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn unknown_fields_are_ignored_and_short_reports_parse() {
        let r: MethodReport = serde_json::from_str(
            r#"{"test":"method","method":"x","ok":false,"error":"e","future":[1]}"#,
        )
        .unwrap();
        assert_eq!(r.error.as_deref(), Some("e"));
        assert!(r.syscalls.is_empty() && r.bytes.is_none());
    }
}
