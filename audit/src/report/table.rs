//! The terminal table.

use super::{num, one_line};
use crate::Verdicts;

/// A fixed-width text table, one row per audit: method, variant, direction (`send`
/// or `receive`), system calls and
/// mode switches per chunk, DMA and CPU copies, zero-copy share, throughput, and the
/// verdict with its first reason; then one line per finding and per failed boot.
/// The variant column says what the driver negotiated when it differs from what the
/// variant offered (`sg-on (offered; driver refused CSUM)`).
pub fn table(v: &Verdicts) -> String {
    let audits = &v.methods;
    let header = [
        "method",
        "variant",
        "direction",
        "syscalls/chunk",
        "switches/chunk",
        "DMA copies",
        "CPU copies",
        "zero-copy %",
        "Mbit/s",
        "verdict",
    ];
    let rows: Vec<[String; 10]> = audits
        .iter()
        .map(|a| {
            let verdict = match a.reasons.first() {
                Some(r) => format!("{}: {}", a.verdict, one_line(r)),
                None => a.verdict.to_string(),
            };
            [
                a.method.clone(),
                v.variant_label(&a.variant),
                a.direction.to_string(),
                num(a.syscalls_per_chunk, 2),
                num(a.mode_switches_per_chunk, 2),
                a.dma_copies.to_string(),
                format!("{:.2}", a.cpu_copies),
                format!("{:.1}", a.zero_copy_pct),
                num(a.throughput_mbit_s, 1),
                verdict,
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(width).enumerate() {
            // Names left, numbers right, the verdict last and unpadded.
            match i {
                0..=2 => s.push_str(&format!("{cell:<w$}  ")),
                9 => s.push_str(cell),
                _ => s.push_str(&format!("{cell:>w$}  ")),
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for r in &rows {
        line(r);
    }
    // Findings do not decide a verdict, but they are what a reader must not miss
    // (e.g. the kernel's zero-copy claim against the device's evidence).
    for a in audits {
        for f in &a.findings {
            out.push_str(&format!(
                "finding: {} [{}]: {}\n",
                a.method,
                a.variant,
                one_line(f)
            ));
        }
    }
    for run in &v.context.variants {
        if let Some(why) = &run.failure {
            out.push_str(&format!("boot failed: {}: {}\n", run.name, one_line(why)));
        }
    }
    out
}
