//! JUnit XML (what GitLab and Jenkins read), in the shape of the widely used
//! Jenkins/Ant schema (`junit-10.xsd` of the Jenkins xUnit plugin): `testsuites`,
//! one `testsuite` per NIC variant with the run context as `properties`, one
//! `testcase` per method with `failure` or `skipped` and its measurements in
//! `system-out`.
//!
//! Written by hand rather than with an XML crate: a fixed tree of five element kinds
//! needs only attribute and text escaping, which [`xml_text`] does.

use std::fmt::Write;

use super::ktap::measurements;
use crate::{MethodAudit, Verdict, Verdicts};

/// Text made safe for XML content and attribute values: the five special
/// characters escaped, characters XML 1.0 forbids (most C0 controls) dropped.
fn xml_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The methods' transfer time. Summed from +0.0: an empty f64 `sum()` is -0.0,
/// which the schema's time pattern rejects.
fn total_seconds<'a>(audits: impl Iterator<Item = &'a MethodAudit>) -> f64 {
    audits.filter_map(|a| a.seconds).fold(0.0, |t, s| t + s)
}

/// The JUnit document. A variant whose boot failed carries the failure in its
/// `system-err`; each of its methods is a `failure` with its own reasons.
pub fn junit(v: &Verdicts) -> String {
    let c = &v.context;
    let (_, fail, _) = v.totals();
    let seconds = total_seconds(v.methods.iter());
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"zc\" tests=\"{}\" failures=\"{fail}\" errors=\"0\" time=\"{seconds:.3}\">",
        v.methods.len()
    );
    for name in v.variant_names() {
        let audits: Vec<&MethodAudit> = v.of_variant(&name).collect();
        let count = |x: Verdict| audits.iter().filter(|a| a.verdict == x).count();
        let time = total_seconds(audits.iter().copied());
        let _ = writeln!(
            s,
            "  <testsuite name=\"zc.{}\" tests=\"{}\" failures=\"{}\" errors=\"0\" skipped=\"{}\" time=\"{time:.3}\" timestamp=\"{}\" package=\"zc\">",
            xml_text(&name),
            audits.len(),
            count(Verdict::Fail),
            count(Verdict::Skip),
            xml_text(&c.date)
        );
        s.push_str("    <properties>\n");
        let run = c.variant(&name);
        let mut props: Vec<(&str, String)> = vec![
            ("zc_version", c.zc_version.clone()),
            ("kernel", c.kernel_line()),
            ("host_mode", c.host_mode.clone().unwrap_or_default()),
            ("transport", c.transport.clone().unwrap_or_default()),
            ("cpu_model", c.cpu_model.clone().unwrap_or_default()),
            ("size", c.size.to_string()),
            ("chunk", c.chunk.to_string()),
            ("variant", v.variant_label(&name)),
        ];
        if let Some(f) = run.and_then(|r| r.nic_features.as_ref()) {
            props.push(("nic_offered", f.offered.join(",")));
            props.push((
                "nic_acked",
                f.acked.as_ref().map_or_else(String::new, |a| a.join(",")),
            ));
        }
        for file in run.map(|r| r.files.as_slice()).unwrap_or_default() {
            if let Some(sha) = &file.sha256 {
                props.push((file.kind.as_str(), format!("{} sha256:{sha}", file.path)));
            }
        }
        for (k, val) in props {
            let _ = writeln!(
                s,
                "      <property name=\"{}\" value=\"{}\"/>",
                xml_text(k),
                xml_text(&val)
            );
        }
        s.push_str("    </properties>\n");
        for a in audits {
            let _ = write!(
                s,
                "    <testcase name=\"{}\" classname=\"zc.{}\" time=\"{:.3}\">",
                xml_text(&a.method),
                xml_text(&name),
                a.seconds.unwrap_or(0.0)
            );
            let first = a.reasons.first().cloned().unwrap_or_default();
            match a.verdict {
                Verdict::Pass => {}
                Verdict::Fail => {
                    let _ = write!(
                        s,
                        "<failure type=\"verdict\" message=\"{}\">{}</failure>",
                        xml_text(&first),
                        xml_text(&a.reasons.join("\n"))
                    );
                }
                Verdict::Skip => {
                    let _ = write!(s, "<skipped message=\"{}\"/>", xml_text(&first));
                }
            }
            let mut out = measurements(a);
            for f in &a.findings {
                out.push_str("\nfinding: ");
                out.push_str(f);
            }
            let _ = writeln!(s, "<system-out>{}</system-out></testcase>", xml_text(&out));
        }
        if let Some(why) = run.and_then(|r| r.failure.as_deref()) {
            let _ = writeln!(
                s,
                "    <system-err>{}</system-err>",
                xml_text(&format!("boot failed: {why}"))
            );
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}
