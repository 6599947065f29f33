//! A self-contained HTML page: inline CSS and inline SVG, no scripts and no external
//! assets, so it can be attached to a CI run or mailed as one file.

use std::fmt::Write;

use super::{label, num};
use crate::{MethodAudit, Verdict};

const CSS: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
.PASS{color:#11691b;font-weight:bold}.FAIL{color:#b00020;font-weight:bold}.SKIP{color:#777;font-weight:bold}
ul{margin:.2em 0;padding-left:1.2em}li{text-align:left}
svg text{font:12px system-ui,sans-serif}
.summary span{margin-right:1.2em}
";

/// Escapes text for HTML element content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn color(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "#3c9a46",
        Verdict::Fail => "#d0453b",
        Verdict::Skip => "#aaaaaa",
    }
}

/// One horizontal bar per audit. `mark` draws the expected value as a tick, so the
/// distance from the expectation is visible at a glance.
fn bar_chart(
    audits: &[MethodAudit],
    value: impl Fn(&MethodAudit) -> Option<f64>,
    mark: impl Fn(&MethodAudit) -> Option<f64>,
    decimals: usize,
    unit: &str,
) -> String {
    const LABEL_W: f64 = 230.0;
    const BAR_W: f64 = 420.0;
    const ROW_H: f64 = 22.0;
    let max = audits
        .iter()
        .flat_map(|a| [value(a), mark(a)])
        .flatten()
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    // An all-zero chart still needs a scale.
    let max = if max > 0.0 { max } else { 1.0 };
    let height = ROW_H * audits.len() as f64 + 10.0;
    let width = LABEL_W + BAR_W + 90.0;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\">"
    );
    for (i, a) in audits.iter().enumerate() {
        let y = 5.0 + ROW_H * i as f64;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            LABEL_W - 8.0,
            y + 15.0,
            esc(&label(a))
        );
        let v = value(a).filter(|v| v.is_finite());
        let w = v.map_or(0.0, |v| (v / max * BAR_W).max(0.0));
        let _ = write!(
            s,
            "<rect x=\"{LABEL_W}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"><title>{}</title></rect>",
            y + 3.0,
            ROW_H - 6.0,
            color(a.verdict),
            esc(&format!("{}: {} {unit}", label(a), num(v, decimals)))
        );
        if let Some(m) = mark(a).filter(|m| m.is_finite()) {
            let x = LABEL_W + m / max * BAR_W;
            let _ = write!(
                s,
                "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#222\" stroke-width=\"2\"><title>expected {m:.decimals$}</title></line>",
                y + 1.0,
                y + ROW_H - 1.0
            );
        }
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            LABEL_W + w + 6.0,
            y + 15.0,
            esc(&num(v, decimals))
        );
    }
    s.push_str("</svg>");
    s
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let mut s = String::from("<ul>");
    for i in items {
        let _ = write!(s, "<li>{}</li>", esc(i));
    }
    s.push_str("</ul>");
    s
}

/// The whole page: a verdict summary, bar charts of CPU copies per byte (with the
/// expected value marked) and of throughput, and a table of every number with the
/// reasons and findings.
pub fn html(audits: &[MethodAudit]) -> String {
    let count = |v: Verdict| audits.iter().filter(|a| a.verdict == v).count();
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    s.push_str("<title>zc audit</title><style>");
    s.push_str(CSS);
    s.push_str("</style></head><body>\n<h1>zc audit: file-to-network transfer methods</h1>\n");
    let _ = writeln!(
        s,
        "<p class=\"summary\"><span class=\"PASS\">{} PASS</span><span class=\"FAIL\">{} FAIL</span><span class=\"SKIP\">{} SKIP</span></p>",
        count(Verdict::Pass),
        count(Verdict::Fail),
        count(Verdict::Skip)
    );
    s.push_str("<h2>CPU copies per byte sent (tick: expected)</h2>\n");
    s.push_str(&bar_chart(
        audits,
        |a| (a.verdict != Verdict::Skip).then_some(a.cpu_copies),
        |a| a.expected.as_ref().and_then(|e| e.cpu_copies),
        2,
        "copies/byte",
    ));
    s.push_str("\n<h2>Throughput (Mbit/s)</h2>\n");
    s.push_str(&bar_chart(
        audits,
        |a| a.throughput_mbit_s,
        |_| None,
        1,
        "Mbit/s",
    ));
    s.push_str("\n<h2>Details</h2>\n<table><tr>");
    for h in [
        "method",
        "variant",
        "verdict",
        "syscalls/chunk",
        "switches/chunk",
        "DMA copies",
        "CPU copies",
        "zero-copy %",
        "disk DMA bytes",
        "NIC payload bytes",
        "CPU-copied bytes",
        "Mbit/s",
        "kernel zero-copy (sends/completions/copied)",
        "reasons and findings",
    ] {
        let class = if matches!(h, "method" | "variant" | "verdict") {
            " class=\"l\""
        } else {
            ""
        };
        let _ = write!(s, "<th{class}>{}</th>", esc(h));
    }
    s.push_str("</tr>\n");
    for a in audits {
        let kernel = a.kernel.map_or_else(
            || "-".to_string(),
            |k| {
                let copied = k.copied.map_or("unknown".to_string(), |n| n.to_string());
                format!("{}/{}/{}", k.sends, k.completions, copied)
            },
        );
        let _ = writeln!(
            s,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l {v}\">{v}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"l\">{}{}</td></tr>",
            esc(&a.method),
            esc(&a.variant),
            num(a.syscalls_per_chunk, 2),
            num(a.mode_switches_per_chunk, 2),
            a.dma_copies,
            a.cpu_copies,
            a.zero_copy_pct,
            a.disk_dma_bytes,
            a.nic_payload_bytes,
            a.cpu_copied_bytes,
            num(a.throughput_mbit_s, 1),
            esc(&kernel),
            list(&a.reasons),
            list(&a.findings),
            v = a.verdict,
        );
    }
    s.push_str("</table>\n</body></html>\n");
    s
}
