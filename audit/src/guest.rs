//! The guest's own account of each method: the `report {"test":"method",...}` lines
//! of `docs/method-suite.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::AuditError;

/// One guest `report` object of a method (`"test":"method"`). Unknown fields are
/// ignored and every count is optional, so a failed or skipped method's short report
/// (`{"method":..,"ok":false,"error":..}`) parses too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MethodReport {
    /// Always `method` for the reports this crate audits.
    pub test: String,
    /// The method name (`docs/method-suite.md`, "Method names").
    pub method: String,
    /// Whether the guest completed the transfer (the peer confirmed every byte).
    pub ok: bool,
    /// Bytes sent.
    pub bytes: Option<u64>,
    /// Bytes per chunk.
    pub chunk: Option<u64>,
    /// Chunks sent.
    pub chunks: Option<u64>,
    /// Wall-clock seconds of the transfer, as the guest measured it.
    pub seconds: Option<f64>,
    /// Every system call between `BEGIN` and `END`, by name.
    pub syscalls: BTreeMap<String, u64>,
    /// System calls inside the per-chunk loop.
    pub loop_syscalls: Option<u64>,
    /// System calls outside the loop (socket, connect, mmap, drains...).
    pub setup_syscalls: Option<u64>,
    /// What the kernel said about MSG_ZEROCOPY / send_zc sends, if the method uses them.
    pub zerocopy: Option<ZeroCopyCounts>,
    /// Why the guest skipped the method (it did not run).
    pub skipped: Option<String>,
    /// Why the method failed, one line.
    pub error: Option<String>,
}

/// The kernel's zero-copy completion counts for one method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ZeroCopyCounts {
    /// Zero-copy sends issued.
    pub sends: u64,
    /// Completion notifications received.
    pub completions: u64,
    /// Sends the kernel flagged as copied (`SO_EE_CODE_ZEROCOPY_COPIED` /
    /// `IORING_NOTIF_USAGE_ZC_COPIED`).
    pub copied: u64,
}

/// Parses the guest's method reports from text: one per line, each either the JSON
/// object itself or a control-channel line `report {...}`. Blank lines, lines that are
/// neither, and reports of other tests (`"test"` other than `method`) are skipped, so
/// a whole console or control-channel transcript can be passed as is.
pub fn parse_reports(text: &str) -> Result<Vec<MethodReport>, AuditError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let json = line.strip_prefix("report ").unwrap_or(line).trim_start();
        if !json.starts_with('{') {
            continue;
        }
        // Decide on "test" before the typed parse: another test's report may have
        // fields of other types under the same names.
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|source| AuditError::Report {
                line: i as u64 + 1,
                source,
            })?;
        if value.get("test").and_then(|t| t.as_str()) != Some("method") {
            continue;
        }
        let report = serde_json::from_value(value).map_err(|source| AuditError::Report {
            line: i as u64 + 1,
            source,
        })?;
        out.push(report);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example_and_skips_other_lines() {
        let text = r#"
KTAP version 1
report {"test":"method","method":"sendfile","ok":true,"bytes":16777216,"chunk":65536,"chunks":256,"seconds":1.234,"syscalls":{"sendfile":256,"socket":1,"connect":1,"recv":1},"loop_syscalls":256,"setup_syscalls":3,"zerocopy":{"sends":256,"completions":256,"copied":0},"future_field":[1]}
report {"test":"boot","ok":"yes"}
{"test":"method","method":"uring_send_zc","ok":true,"skipped":"no IORING_OP_SEND_ZC"}
{"test":"method","method":"splice","ok":false,"error":"connect: refused"}
"#;
        let r = parse_reports(text).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].method, "sendfile");
        assert_eq!(r[0].bytes, Some(16777216));
        assert_eq!(r[0].syscalls["sendfile"], 256);
        assert_eq!(r[0].zerocopy.unwrap().sends, 256);
        assert_eq!(r[1].skipped.as_deref(), Some("no IORING_OP_SEND_ZC"));
        assert!(!r[2].ok);
        assert_eq!(r[2].error.as_deref(), Some("connect: refused"));
    }

    #[test]
    fn a_broken_method_report_is_an_error_with_its_line() {
        let err = parse_reports("\n{\"test\":\"method\",\"ok\":\"maybe\"}").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
