//! `zc-vmm compare`: several `methods` runs (one per kernel) side by side, the
//! rows whose verdict changed against the first run marked, and, for a run of a
//! patched kernel, whether it failed exactly the rows its regression patch
//! predicts (`zc_audit::regression`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;
use zc_audit::regression::{RegressionPatch, RowResult};
use zc_audit::{Verdict, ZeroCopyCounts};
use zc_vmm::report::RunSummary;

/// Options of `zc-vmm compare`.
#[derive(Args, Clone)]
pub struct CompareArgs {
    /// Output directories of `zc-vmm methods` runs (e.g. one per kernel); the first
    /// is the baseline the others are compared with.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// `DIR=PATCH`: the run in DIR is of a kernel with the regression patch PATCH
    /// applied; it must FAIL exactly the rows the patch's `Zc-Fails:` trailers name,
    /// on the checks they name, and PASS every other row. Repeatable.
    #[arg(long = "expected-fails", value_name = "DIR=PATCH", value_parser = parse_prediction)]
    expected_fails: Vec<(PathBuf, PathBuf)>,
}

fn parse_prediction(arg: &str) -> Result<(PathBuf, PathBuf), String> {
    let (dir, patch) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not DIR=PATCH"))?;
    Ok((PathBuf::from(dir), PathBuf::from(patch)))
}

/// One row of `verdicts.json`, as far as the comparison shows it.
#[derive(Debug, Clone, Deserialize)]
struct Row {
    #[serde(flatten)]
    result: RowResult,
    cpu_copies: f64,
    zero_copy_pct: f64,
    #[serde(default)]
    kernel: Option<ZeroCopyCounts>,
}

#[derive(Debug, Deserialize)]
struct VerdictsFile {
    #[serde(default)]
    context: Context0,
    methods: Vec<Row>,
}

#[derive(Debug, Default, Deserialize)]
struct Context0 {
    #[serde(default)]
    kernel_release: Option<String>,
    #[serde(default)]
    variants: Vec<VariantFile>,
}

#[derive(Debug, Deserialize)]
struct VariantFile {
    name: String,
    #[serde(default)]
    failure: Option<String>,
}

/// One run: its column label, rows and failed boots.
struct Run {
    dir: PathBuf,
    label: String,
    rows: Vec<Row>,
    failed_boots: Vec<String>,
}

impl Run {
    fn load(dir: &Path) -> Result<Run> {
        let path = dir.join("verdicts.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: run `zc-vmm methods --out {}` first",
                path.display(),
                dir.display()
            )
        })?;
        let file: VerdictsFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a verdicts.json", path.display()))?;
        let label = file
            .context
            .kernel_release
            .or_else(|| {
                RunSummary::load(&dir.join(format!("{}.run.json", crate::suite::BOOT_NAME)))
                    .ok()
                    .and_then(|summary| summary.run.kernel_release)
            })
            .unwrap_or_else(|| dir.display().to_string());
        let failed_boots = file
            .context
            .variants
            .iter()
            .filter_map(|v| {
                v.failure
                    .as_ref()
                    .map(|why| format!("boot {} failed: {why}", v.name))
            })
            .collect();
        Ok(Run {
            dir: dir.to_path_buf(),
            label,
            rows: file.methods,
            failed_boots,
        })
    }

    fn row(&self, method: &str, variant: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.result.method == method && r.result.variant == variant)
    }
}

const CELL_WIDTH: usize = 32;
const NAME_WIDTH: usize = 32;

/// Prints the runs side by side and judges them; returns the exit status: 0 when
/// every run without a prediction passes in full and every run with one fails
/// exactly as predicted, else 1.
pub fn compare(args: CompareArgs) -> Result<i32> {
    let runs = args
        .dirs
        .iter()
        .map(|d| Run::load(d))
        .collect::<Result<Vec<_>>>()?;
    let mut predictions = Vec::new();
    for (dir, patch) in &args.expected_fails {
        let Some(i) = runs.iter().position(|r| same_dir(&r.dir, dir)) else {
            bail!(
                "--expected-fails {}: that directory is not one of the runs compared",
                dir.display()
            );
        };
        let p = RegressionPatch::load(patch)
            .with_context(|| format!("--expected-fails {}", dir.display()))?;
        predictions.push((i, patch.clone(), p));
    }
    print!("{}", render_table(&runs));

    let mut status = 0;
    for (i, run) in runs.iter().enumerate() {
        let name = format!("{} ({})", run.label, run.dir.display());
        match predictions.iter().find(|(at, _, _)| *at == i) {
            Some((_, path, patch)) => {
                let results: Vec<RowResult> = run.rows.iter().map(|r| r.result.clone()).collect();
                let mut mismatches = patch.judge(&results);
                mismatches.extend(run.failed_boots.iter().cloned());
                if mismatches.is_empty() {
                    println!(
                        "{name}: FAILs exactly the {} rows {} predicts, PASSes the other {}",
                        patch.fails.len(),
                        path.display(),
                        run.rows.len() - patch.fails.len()
                    );
                } else {
                    status = 1;
                    println!("{name}: differs from what {} predicts:", path.display());
                    for m in mismatches {
                        println!("  {m}");
                    }
                }
            }
            None => {
                let fails: Vec<&Row> = run
                    .rows
                    .iter()
                    .filter(|r| r.result.verdict == Verdict::Fail)
                    .collect();
                let missing = missing_rows(&runs, run);
                if !fails.is_empty() || !missing.is_empty() || !run.failed_boots.is_empty() {
                    status = 1;
                    println!(
                        "{name}: {} FAIL, {} rows not run",
                        fails.len(),
                        missing.len()
                    );
                    for b in &run.failed_boots {
                        println!("  {b}");
                    }
                }
            }
        }
    }
    Ok(status)
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Every (method, variant) of any run, in first-seen order.
fn all_rows(runs: &[Run]) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    for r in runs.iter().flat_map(|run| &run.rows) {
        let key = (r.result.method.clone(), r.result.variant.clone());
        if !rows.contains(&key) {
            rows.push(key);
        }
    }
    rows
}

fn missing_rows(runs: &[Run], run: &Run) -> Vec<(String, String)> {
    all_rows(runs)
        .into_iter()
        .filter(|(m, v)| run.row(m, v).is_none())
        .collect()
}

/// The table: one line per row, one cell per run (CPU copies, zero-copy share,
/// what the kernel claimed, verdict); `*` marks a row whose verdict in some run
/// differs from the first run's.
fn render_table(runs: &[Run]) -> String {
    let mut out = String::new();
    let mut header = format!("  {:<NAME_WIDTH$}", "method [variant]");
    let mut sub = format!("  {:<NAME_WIDTH$}", "");
    let mut rule = "-".repeat(NAME_WIDTH + 2);
    for run in runs {
        header.push_str(&format!(" | {:<CELL_WIDTH$}", run.label));
        sub.push_str(&format!(
            " | {:<CELL_WIDTH$}",
            "cpu   0-copy  kernel   verdict"
        ));
        rule.push_str(&format!("-+-{}", "-".repeat(CELL_WIDTH)));
    }
    out.push_str(&format!("{header}\n{sub}\n{rule}\n"));
    for (method, variant) in all_rows(runs) {
        let verdict_in = |run: &Run| run.row(&method, &variant).map(|r| r.result.verdict);
        let baseline = verdict_in(&runs[0]);
        let changed = runs.iter().any(|run| verdict_in(run) != baseline);
        let mut line = format!(
            "{} {:<NAME_WIDTH$}",
            if changed { "*" } else { " " },
            format!("{method} [{variant}]")
        );
        for run in runs {
            let cell = run
                .row(&method, &variant)
                .map_or_else(|| "not run".to_string(), cell);
            line.push_str(&format!(" | {cell:<CELL_WIDTH$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(
        "(* = verdict differs from the first run's; kernel = sends the kernel flagged copied / zero-copy sends)\n",
    );
    out
}

fn cell(r: &Row) -> String {
    let kernel = match r.kernel {
        Some(ZeroCopyCounts {
            sends,
            copied: Some(copied),
            ..
        }) => format!("{copied}/{sends}"),
        Some(ZeroCopyCounts { sends, .. }) => format!("?/{sends}"),
        None => "-".into(),
    };
    format!(
        "{:>5.2} {:>6.1}% {:>8} {}",
        r.cpu_copies, r.zero_copy_pct, kernel, r.result.verdict
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, variant: &str, verdict: Verdict, cpu: f64) -> Row {
        Row {
            result: RowResult {
                method: method.into(),
                variant: variant.into(),
                verdict,
                reasons: if verdict == Verdict::Fail {
                    vec![format!("cpu_copies {cpu:.2}, expected 0.00 ± 0.15")]
                } else {
                    vec![]
                },
            },
            cpu_copies: cpu,
            zero_copy_pct: if cpu > 0.5 { 0.0 } else { 100.0 },
            kernel: None,
        }
    }

    fn run(label: &str, rows: Vec<Row>) -> Run {
        Run {
            dir: PathBuf::from(label),
            label: label.into(),
            rows,
            failed_boots: vec![],
        }
    }

    #[test]
    fn a_row_whose_verdict_changed_is_marked() {
        let base = run(
            "6.1-zc",
            vec![
                row("sendfile", "sg-on", Verdict::Pass, 0.0),
                row("read_write", "sg-on", Verdict::Pass, 2.0),
            ],
        );
        let patched = run(
            "6.1-zc-splice",
            vec![
                row("sendfile", "sg-on", Verdict::Fail, 1.0),
                row("read_write", "sg-on", Verdict::Pass, 2.0),
            ],
        );
        let text = render_table(&[base, patched]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[3].starts_with("* sendfile [sg-on]"), "{text}");
        assert!(lines[3].ends_with("1.00    0.0%        - FAIL"), "{text}");
        assert!(lines[4].starts_with("  read_write [sg-on]"), "{text}");
    }

    #[test]
    fn verdicts_json_rows_read_with_the_kernel_claim() {
        let text = r#"{"context": {"kernel_release": "6.1.192-zc", "variants": [{"name": "sg-on"}]},
            "methods": [{"method": "mmap_zerocopy", "variant": "sg-on", "verdict": "FAIL",
              "reasons": ["cpu_copies 1.00, expected 0.00 ± 0.15"], "cpu_copies": 1.0,
              "zero_copy_pct": 0.0, "kernel": {"sends": 256, "completions": 256, "copied": 0}}]}"#;
        let file: VerdictsFile = serde_json::from_str(text).unwrap();
        assert_eq!(cell(&file.methods[0]), " 1.00    0.0%    0/256 FAIL");
    }
}
