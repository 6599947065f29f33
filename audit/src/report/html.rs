//! A self-contained HTML page: inline CSS and inline SVG, no scripts and no external
//! assets, so it can be attached to a CI run or mailed as one file.

use std::fmt::Write;

use super::{label, num};
use crate::{MethodAudit, Verdict, Verdicts};

// Everything wraps and scales to the window: the page must not scroll sideways at
// 1280 px (the widest table cell, the reasons, wraps; charts scale with viewBox).
const CSS: &str = "
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;padding:0 1em;max-width:1240px;color:#222}
h1{font-size:1.4em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
dl.ctx{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.6em 0}
dl.ctx dt{font-weight:bold}dl.ctx dd{margin:0;overflow-wrap:anywhere}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .8em;margin:.6em 0}
.bootfail{background:#fde7e9;border-left:4px solid #b00020;padding:.4em .8em;margin:.6em 0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:.2em .35em;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}
th{background:#f4f4f4;font-weight:600}td.l,th.l{text-align:left;white-space:nowrap}
td.lv{text-align:left;min-width:4.5em}td.why{text-align:left;overflow-wrap:anywhere;word-break:break-word;width:24%}
tr.FAILROW td{background:#fde7e9}
.PASS{color:#11691b;font-weight:bold}.FAIL{color:#b00020;font-weight:bold}.SKIP{color:#777;font-weight:bold}
ul{margin:.2em 0;padding-left:1.2em}li{text-align:left}
svg{max-width:100%;height:auto}svg text{font:12px system-ui,sans-serif}
.summary span{margin-right:1.2em}
.legend{overflow:hidden}h3{clear:both}.legend dt{font-weight:bold;float:left;clear:left;width:11em}.legend dd{margin:0 0 .3em 11.5em}
.files td{text-align:left}
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

/// What every column of the details table means.
const COLUMNS: &[(&str, &str)] = &[
    ("method", "the transfer method (see the list of methods below)"),
    ("variant", "the NIC variant: sg-on offers checksum offload, so Linux gives the card scatter-gather; sg-off does not, so Linux linearises every frame. When the driver refused what was offered, the variant says so."),
    ("direction", "send: a file on the test disk to the TCP peer; receive: the peer's payload to a file on the scratch disk"),
    ("verdict", "PASS: every count matches audit/expected.toml; FAIL: a count differs, evidence is missing or the boot failed (reasons in the last column); SKIP: the guest kernel cannot run the method"),
    ("syscalls / chunk", "system calls the guest issued per chunk in its transfer loop (the guest's own count)"),
    ("switches / chunk", "user/kernel mode switches per chunk: twice the system calls"),
    ("DMA copies", "disk bytes DMA'd during the method / bytes moved, plus NIC payload bytes / bytes moved, each rounded"),
    ("CPU copies", "payload bytes the guest CPU wrote (KVM's dirty-page log, plus the last device's reads of CPU-written pages), per byte moved"),
    ("zero-copy %", "send: share of the NIC's payload read from the very page virtio-blk filled, content unchanged; receive: share of the scratch disk's payload read from the very page the NIC's RX DMA filled, content unchanged"),
    ("disk DMA bytes", "send: bytes virtio-blk wrote into guest memory during the method; receive: bytes the scratch disk read out of guest memory (OUT)"),
    ("NIC payload bytes", "TCP payload bytes of the method's connection the NIC read (send) or wrote (receive)"),
    ("CPU-copied bytes", "the numerator of CPU copies"),
    ("Mbit/s", "bytes moved / the guest's transfer time"),
    ("kernel zero-copy", "MSG_ZEROCOPY / io_uring send_zc: sends / completions / sends the kernel flagged as copied"),
    ("reasons and findings", "why a row is not PASS; findings are observations that do not decide the verdict"),
];

/// What each method does per chunk (`docs/method-suite.md`).
const METHODS: &[(&str, &str)] = &[
    (
        "read_write",
        "read into a user buffer, write it to the socket",
    ),
    (
        "mmap_write",
        "mmap the file once, write each chunk of the mapping",
    ),
    ("sendfile", "sendfile(socket, file, offset, chunk)"),
    ("splice", "splice file to pipe, splice pipe to socket"),
    (
        "direct_write",
        "O_DIRECT read into an aligned buffer, write it",
    ),
    (
        "direct_zerocopy",
        "O_DIRECT read, send with MSG_ZEROCOPY, wait for its completion",
    ),
    (
        "mmap_zerocopy",
        "mmap once, send each chunk with MSG_ZEROCOPY",
    ),
    (
        "uring_send_zc",
        "io_uring IORING_OP_SEND_ZC from an mmap of the file",
    ),
    (
        "cow_zerocopy",
        "mmap MAP_PRIVATE, rewrite one byte per chunk (a copy-on-write), send with MSG_ZEROCOPY",
    ),
    (
        "sendfile_warm",
        "sendfile with the page cache already warm (no disk reads)",
    ),
    (
        "sendfile_tmpfs",
        "sendfile from a copy of the file on tmpfs, written before the transfer (no disk reads)",
    ),
    (
        "sendfile_direct",
        "sendfile from the file opened with O_DIRECT",
    ),
    (
        "splice_direct",
        "splice file -> pipe -> socket, the file opened with O_DIRECT",
    ),
    (
        "vmsplice",
        "O_DIRECT read into a user buffer never reused, vmsplice it into a pipe, splice to the socket",
    ),
    (
        "zerocopy_pressure",
        "send with MSG_ZEROCOPY with net.core.optmem_max 0; each refused (ENOBUFS) send sent again without it",
    ),
    (
        "recv_write",
        "receive: recv into a user buffer, write it to the file",
    ),
    (
        "recv_direct",
        "receive: recv into an aligned user buffer, write it to the file opened with O_DIRECT",
    ),
    ("splice_recv", "receive: splice socket to pipe, splice pipe to file"),
    (
        "recv_mmap",
        "receive: recv straight into a shared mapping of the pre-sized file",
    ),
    (
        "tcp_zerocopy_receive",
        "receive: getsockopt(TCP_ZEROCOPY_RECEIVE) maps what it can, the rest is received with recv; written with O_DIRECT",
    ),
];

fn context_header(s: &mut String, v: &Verdicts) {
    let c = &v.context;
    let unknown = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".to_string());
    s.push_str("<dl class=\"ctx\">");
    for (k, val) in [
        ("kernel", c.kernel_line()),
        ("date", c.date.clone()),
        ("host mode", unknown(&c.host_mode)),
        ("transport", unknown(&c.transport)),
        ("host CPU", unknown(&c.cpu_model)),
        ("size", format!("{} bytes per method", c.size)),
        ("chunk", format!("{} bytes", c.chunk)),
        ("zc", c.zc_version.clone()),
    ] {
        let _ = write!(s, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&val));
    }
    for run in &c.variants {
        let features = run.nic_features.as_ref().map_or_else(
            || "not recorded".to_string(),
            |f| {
                format!(
                    "offered {}; driver acked {}",
                    f.offered.join(", "),
                    f.acked
                        .as_ref()
                        .map_or_else(|| "nothing".to_string(), |a| a.join(", "))
                )
            },
        );
        let _ = write!(
            s,
            "<dt>{}</dt><dd>{}: {}</dd>",
            esc(&format!("NIC {}", run.name)),
            esc(&run.label()),
            esc(&features)
        );
    }
    s.push_str("</dl>\n");
    if c.emulated() {
        s.push_str("<p class=\"note\">Times and throughput were measured inside an emulated KVM host (QEMU TCG, about ten times slower than a real host): compare them with each other, not with other machines. Copy counts do not depend on it.</p>\n");
    }
    for run in &c.variants {
        if let Some(why) = &run.failure {
            let _ = writeln!(
                s,
                "<p class=\"bootfail\"><b>Boot {} failed:</b> {}</p>",
                esc(&run.name),
                esc(why)
            );
        }
    }
}

/// The whole page: the run's context, a verdict summary, bar charts of the
/// zero-copy share and of CPU copies per byte (expected value marked) and of
/// throughput, a table of every number with FAIL rows highlighted, the legend and
/// links to the logs.
pub fn html(v: &Verdicts) -> String {
    let audits = &v.methods;
    let (pass, fail, skip) = v.totals();
    let mut s = String::new();
    s.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">");
    s.push_str("<meta name=\"viewport\" content=\"width=device-width\">");
    let _ = write!(
        s,
        "<title>zc audit: {}</title><style>",
        esc(&v.context.kernel_line())
    );
    s.push_str(CSS);
    s.push_str("</style></head><body>\n<h1>zc audit: file-to-network transfer methods</h1>\n");
    context_header(&mut s, v);
    let _ = writeln!(
        s,
        "<p class=\"summary\"><span class=\"PASS\">{pass} PASS</span><span class=\"FAIL\">{fail} FAIL</span><span class=\"SKIP\">{skip} SKIP</span></p>"
    );
    s.push_str("<h2>Zero-copy share of the NIC's payload, % (tick: expected)</h2>\n");
    s.push_str(&bar_chart(
        audits,
        |a| (a.verdict != Verdict::Skip).then_some(a.zero_copy_pct),
        |a| {
            a.expected
                .as_ref()
                .and_then(|e| e.zero_copy_pct_min.or(e.zero_copy_pct_max))
        },
        1,
        "%",
    ));
    s.push_str("\n<h2>CPU copies per byte moved (tick: expected)</h2>\n");
    s.push_str(&bar_chart(
        audits,
        |a| (a.verdict != Verdict::Skip).then_some(a.cpu_copies),
        |a| a.expected.as_ref().and_then(|e| e.cpu_copies),
        2,
        "copies/byte",
    ));
    let _ = writeln!(
        s,
        "\n<h2>Throughput (Mbit/s){}</h2>",
        if v.context.emulated() {
            ": measured under emulation"
        } else {
            ""
        }
    );
    s.push_str(&bar_chart(
        audits,
        |a| a.throughput_mbit_s,
        |_| None,
        1,
        "Mbit/s",
    ));
    s.push_str("\n<h2>Details</h2>\n<table><tr>");
    for (h, what) in COLUMNS {
        let class = if matches!(
            *h,
            "method" | "variant" | "direction" | "verdict" | "reasons and findings"
        ) {
            " class=\"l\""
        } else {
            ""
        };
        let _ = write!(s, "<th{class} title=\"{}\">{}</th>", esc(what), esc(h));
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
        // A receive's disk and NIC columns are its own: what the scratch disk read
        // out, what the NIC wrote in.
        let (disk, nic) = match &a.receive {
            Some(r) => (r.disk_out_bytes, r.nic_rx_payload_bytes),
            None => (a.disk_dma_bytes, a.nic_payload_bytes),
        };
        let row_class = if a.verdict == Verdict::Fail {
            " class=\"FAILROW\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<tr{row_class}><td class=\"l\">{}</td><td class=\"lv\">{}</td><td class=\"l\">{}</td><td class=\"l {verdict}\">{verdict}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"why\">{}{}</td></tr>",
            esc(&a.method),
            esc(&v.variant_label(&a.variant)),
            a.direction,
            num(a.syscalls_per_chunk, 2),
            num(a.mode_switches_per_chunk, 2),
            a.dma_copies,
            a.cpu_copies,
            a.zero_copy_pct,
            disk,
            nic,
            a.cpu_copied_bytes,
            num(a.throughput_mbit_s, 1),
            esc(&kernel),
            list(&a.reasons),
            list(&a.findings),
            verdict = a.verdict,
        );
    }
    s.push_str("</table>\n");
    files_section(&mut s, v);
    s.push_str("<h2>Legend</h2>\n<h3>Columns</h3>\n<dl class=\"legend\">");
    for (h, what) in COLUMNS {
        let _ = write!(s, "<dt>{}</dt><dd>{}</dd>", esc(h), esc(what));
    }
    s.push_str("</dl>\n<h3>Methods</h3>\n<dl class=\"legend\">");
    for (m, what) in METHODS {
        let _ = write!(s, "<dt>{}</dt><dd>{}</dd>", esc(m), esc(what));
    }
    s.push_str("</dl>\n<p>Charts: bar colour is the verdict (green PASS, red FAIL, grey SKIP); a black tick marks the value audit/expected.toml expects. Specification: docs/transfer-methods.md.</p>\n</body></html>\n");
    s
}

/// Links to each boot's files (relative to the page), with their sizes and SHA-256.
fn files_section(s: &mut String, v: &Verdicts) {
    let files: Vec<_> = v
        .context
        .variants
        .iter()
        .flat_map(|r| r.files.iter().map(move |f| (r, f)))
        .collect();
    if files.is_empty() {
        return;
    }
    s.push_str("<h2>Logs and captures</h2>\n<table class=\"files\"><tr><th class=\"l\">boot</th><th class=\"l\">file</th><th class=\"l\">bytes</th><th class=\"l\">sha256</th></tr>\n");
    for (run, f) in files {
        let link = match f.bytes {
            Some(_) => format!("<a href=\"{0}\">{0}</a>", esc(&f.path)),
            None => format!("{} (not written)", esc(&f.path)),
        };
        let _ = writeln!(
            s,
            "<tr><td>{}</td><td>{} {link}</td><td>{}</td><td class=\"why\"><code>{}</code></td></tr>",
            esc(&run.name),
            esc(&f.kind),
            f.bytes.map_or_else(|| "-".to_string(), |b| b.to_string()),
            esc(f.sha256.as_deref().unwrap_or("-"))
        );
    }
    s.push_str("</table>\n");
}
