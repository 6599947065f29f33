//! The guest's own account of each method: the `report {"test":"method",...}` lines
//! of `docs/method-suite.md`, read as `zc_protocol::MethodReport`s.

use zc_protocol::report::METHOD_TEST;
pub use zc_protocol::report::{MethodReport, ZeroCopyCounts};
use zc_protocol::ControlMessage;

use crate::AuditError;

/// Parses the guest's method reports from text: one per line, each either the JSON
/// object itself or a control-channel line `report {...}`. Blank lines, lines that are
/// neither, and reports of other tests (`"test"` other than `method`) are skipped, so
/// a whole console or control-channel transcript can be passed as is.
pub fn parse_reports(text: &str) -> Result<Vec<MethodReport>, AuditError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        let message = ControlMessage::parse(line);
        let json = match &message {
            ControlMessage::Report { json } => json.trim_start(),
            _ => line,
        };
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
        if value.get("test").and_then(|t| t.as_str()) != Some(METHOD_TEST) {
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
        assert_eq!(r[0].syscall("sendfile"), Some(256));
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
