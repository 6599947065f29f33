//! The audit's verdicts as a KTAP document for kernel CI
//! (`Documentation/dev-tools/ktap.rst`): one test per NIC variant, each with one
//! subtest per method, a diagnostic line of measurements before every result, the
//! run context as header diagnostics and kselftest's `# Totals:` line at the end.
//! The guest prints its own KTAP on the console; this one is judged on device
//! evidence.

use std::fmt::Write;

use super::one_line;
use crate::{MethodAudit, Verdict, Verdicts};

/// One level of KTAP subtest indentation.
const INDENT: &str = "  ";

/// The KTAP document. A variant whose boot failed is `not ok` with the boot's
/// failure as its reason; its methods are there all the same, each `not ok` with its
/// own reasons, so a parser counts every wanted method.
pub fn ktap(v: &Verdicts) -> String {
    let mut out = String::from("KTAP version 1\n");
    let c = &v.context;
    let _ = writeln!(
        out,
        "# zc {}: file-to-network transfer methods judged on device evidence",
        c.zc_version
    );
    let _ = writeln!(out, "# kernel: {}", one_line(&c.kernel_line()));
    let _ = writeln!(
        out,
        "# host: {}{}; transport: {}; cpu: {}",
        c.host_mode.as_deref().unwrap_or("unknown"),
        if c.emulated() {
            " (times measured under emulation)"
        } else {
            ""
        },
        c.transport.as_deref().unwrap_or("unknown"),
        one_line(c.cpu_model.as_deref().unwrap_or("unknown"))
    );
    let _ = writeln!(
        out,
        "# date: {}; size: {} bytes; chunk: {} bytes",
        c.date, c.size, c.chunk
    );
    let variants = v.variant_names();
    let _ = writeln!(out, "1..{}", variants.len());
    for (i, name) in variants.iter().enumerate() {
        let audits: Vec<&MethodAudit> = v.of_variant(name).collect();
        let run = c.variant(name);
        let label = v.variant_label(name);
        let _ = writeln!(out, "{INDENT}KTAP version 1");
        let _ = writeln!(out, "{INDENT}# Subtest: {name}");
        if label != *name {
            let _ = writeln!(out, "{INDENT}# {name}: ran as {}", one_line(&label));
        }
        if let Some(features) = run.and_then(|r| r.nic_features.as_ref()) {
            let _ = writeln!(
                out,
                "{INDENT}# {name}: NIC offered {}; driver acked {}",
                features.offered.join(","),
                features
                    .acked
                    .as_ref()
                    .map_or_else(|| "nothing".to_string(), |a| a.join(","))
            );
        }
        let _ = writeln!(out, "{INDENT}1..{}", audits.len());
        for (j, a) in audits.iter().enumerate() {
            method_result(&mut out, j + 1, a);
        }
        let failed = audits.iter().any(|a| a.verdict == Verdict::Fail);
        let all_skipped = !audits.is_empty() && audits.iter().all(|a| a.verdict == Verdict::Skip);
        let n = i + 1;
        match run.and_then(|r| r.failure.as_deref()) {
            Some(why) => {
                let _ = writeln!(out, "not ok {n} {name} # {}", one_line(why));
            }
            None if failed => {
                let _ = writeln!(out, "not ok {n} {name}");
            }
            None if all_skipped => {
                let _ = writeln!(out, "ok {n} {name} # SKIP every method skipped");
            }
            None => {
                let _ = writeln!(out, "ok {n} {name}");
            }
        }
    }
    let (pass, fail, skip) = v.totals();
    let _ = writeln!(
        out,
        "# Totals: pass:{pass} fail:{fail} xfail:0 xpass:0 skip:{skip} error:0"
    );
    out
}

/// The measurements of one method as `key=value` words, its direction first; a
/// receive adds whether the scratch disk was flushed and how much of the file it
/// wrote out.
pub(super) fn measurements(a: &MethodAudit) -> String {
    let mut words = vec![
        format!("direction={}", a.direction),
        format!("cpu_copies={:.2}", a.cpu_copies),
        format!("zero_copy_pct={:.1}", a.zero_copy_pct),
        format!("dma_copies={}", a.dma_copies),
    ];
    if let Some(s) = a.syscalls_per_chunk {
        words.push(format!("syscalls_per_chunk={s:.2}"));
    }
    if let Some(t) = a.throughput_mbit_s {
        words.push(format!("mbit_s={t:.1}"));
    }
    if let Some(k) = a.kernel {
        words.push(format!("zc_sends={}", k.sends));
        words.push(format!("zc_completions={}", k.completions));
        words.push(format!(
            "zc_copied={}",
            k.copied
                .map_or_else(|| "unknown".to_string(), |c| c.to_string())
        ));
    }
    if let Some(r) = &a.receive {
        words.push(format!("disk_file_bytes={}", r.disk_file_bytes));
        words.push(format!("flushed={}", r.flushed));
    }
    words.push(format!("bytes={}", a.bytes));
    words.join(" ")
}

/// A method's diagnostic lines and result line, one level in.
fn method_result(out: &mut String, n: usize, a: &MethodAudit) {
    let name = &a.method;
    // A method that never ran (no span in the log) has no measurements, only reasons.
    if a.verdict != Verdict::Skip && a.span_seq.is_some() {
        let _ = writeln!(out, "{INDENT}# {name}: {}", measurements(a));
    }
    for f in &a.findings {
        let _ = writeln!(out, "{INDENT}# {name}: finding: {}", one_line(f));
    }
    for r in a.reasons.iter().skip(1) {
        let _ = writeln!(out, "{INDENT}# {name}: {}", one_line(r));
    }
    let first = a.reasons.first().map(|r| one_line(r)).unwrap_or_default();
    let _ = match a.verdict {
        Verdict::Pass => writeln!(out, "{INDENT}ok {n} {name}"),
        Verdict::Fail => writeln!(out, "{INDENT}not ok {n} {name} # {first}"),
        Verdict::Skip => writeln!(out, "{INDENT}ok {n} {name} # SKIP {first}"),
    };
}
