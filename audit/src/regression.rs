//! Regression patches: a kernel patch that says, in its commit message, which rows
//! of the suite it must make FAIL and on which checks, and the judgement of a run
//! against that prediction.
//!
//! The format is a `git format-patch` mail (so `git am` takes it too): a message,
//! then `---`, then the diff, which `patch -p1` applies ignoring the message. The
//! prediction is one trailer per row in the message:
//!
//! ```text
//! Zc-Fails: <method>.<variant> <check> [<check>...]
//! ```
//!
//! `<check>` is an `expected.toml` key ([`Check::key`]): the row must FAIL on that
//! check. A check ending in `?` may fail too (a measurement the change makes
//! unpredictable), and any other check must not. Every row no trailer names must
//! PASS. The predictions are written from the kernel source before any run: the
//! point of a regression patch is to show that zc catches exactly what the change
//! breaks, and nothing else.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Deserialize;
use zc_protocol::Method;

use crate::expect::Check;
use crate::{AuditError, Verdict};

/// The trailer that names a row the patch must make FAIL.
pub const FAILS_TRAILER: &str = "Zc-Fails:";

/// One row a regression patch must make FAIL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedFail {
    /// The method.
    pub method: String,
    /// The NIC variant (`sg-on`, `sg-off`).
    pub variant: String,
    /// Checks that must fail.
    pub must: BTreeSet<Check>,
    /// Checks that may fail as well (`name?`).
    pub may: BTreeSet<Check>,
}

/// A regression patch's prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegressionPatch {
    /// The `Subject:` line, `[PATCH]` removed (empty when there is none).
    pub subject: String,
    /// The rows it must make FAIL, in trailer order.
    pub fails: Vec<ExpectedFail>,
}

/// One row of a run as `verdicts.json` has it (the fields the judgement needs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RowResult {
    /// The method.
    pub method: String,
    /// The NIC variant.
    pub variant: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it is not PASS.
    #[serde(default)]
    pub reasons: Vec<String>,
}

impl RegressionPatch {
    /// Reads and parses a patch file.
    pub fn load(path: &Path) -> Result<RegressionPatch, AuditError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        RegressionPatch::parse(&text).map_err(|what| AuditError::Regression {
            what: format!("{}: {what}", path.display()),
        })
    }

    /// Parses the message part of a patch (everything before the first `---` or
    /// `diff ` line). Errors name the line.
    pub fn parse(text: &str) -> Result<RegressionPatch, String> {
        let mut subject = String::new();
        let mut fails: Vec<ExpectedFail> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line == "---" || line.starts_with("diff ") || line.starts_with("--- a/") {
                break;
            }
            if let Some(s) = line.strip_prefix("Subject:") {
                subject = s.trim().trim_start_matches("[PATCH]").trim().to_string();
            }
            let Some(rest) = line.strip_prefix(FAILS_TRAILER) else {
                continue;
            };
            let at = |what: String| format!("line {}: {what}", n + 1);
            let fail = parse_trailer(rest).map_err(at)?;
            if fails
                .iter()
                .any(|f| f.method == fail.method && f.variant == fail.variant)
            {
                return Err(at(format!(
                    "{}.{} is named twice",
                    fail.method, fail.variant
                )));
            }
            fails.push(fail);
        }
        if fails.is_empty() {
            return Err(format!(
                "no `{FAILS_TRAILER} <method>.<variant> <check>...` trailer: not a regression patch"
            ));
        }
        Ok(RegressionPatch { subject, fails })
    }

    /// Every way `rows` differ from the prediction, one line each; empty when the
    /// rows FAIL exactly as predicted and every other row PASSes, or SKIPs: a row
    /// the kernel cannot run at all (a feature it lacks, the reason in the row) is
    /// the kernel's configuration, which no patch predicts; a row the patch names
    /// must still FAIL.
    pub fn judge(&self, rows: &[RowResult]) -> Vec<String> {
        let mut out = Vec::new();
        for row in rows {
            let name = format!("{}.{}", row.method, row.variant);
            let predicted = self
                .fails
                .iter()
                .find(|f| f.method == row.method && f.variant == row.variant);
            match (predicted, row.verdict) {
                (None, Verdict::Pass | Verdict::Skip) => {}
                (None, v) => out.push(format!(
                    "{name}: {v}, expected PASS (no {FAILS_TRAILER} names it): {}",
                    row.reasons.join("; ")
                )),
                (Some(_), v) if v != Verdict::Fail => {
                    out.push(format!("{name}: {v}, expected FAIL"));
                }
                (Some(f), _) => judge_failure(f, row, &name, &mut out),
            }
        }
        for f in &self.fails {
            if !rows
                .iter()
                .any(|r| r.method == f.method && r.variant == f.variant)
            {
                out.push(format!(
                    "{}.{}: not in the run, expected FAIL",
                    f.method, f.variant
                ));
            }
        }
        out
    }
}

fn judge_failure(f: &ExpectedFail, row: &RowResult, name: &str, out: &mut Vec<String>) {
    let mut failed = BTreeSet::new();
    for reason in &row.reasons {
        match Check::of_reason(reason) {
            Some(c) => {
                failed.insert(c);
            }
            // "no guest report", a boot failure...: not the measured change.
            None => out.push(format!("{name}: FAIL for another reason: {reason}")),
        }
    }
    for c in f.must.difference(&failed) {
        out.push(format!(
            "{name}: {} did not fail, expected it to ({})",
            c.key(),
            row.reasons.join("; ")
        ));
    }
    for c in failed
        .iter()
        .filter(|c| !f.must.contains(c) && !f.may.contains(c))
    {
        let reason = row
            .reasons
            .iter()
            .find(|r| Check::of_reason(r) == Some(*c))
            .map_or("", String::as_str);
        out.push(format!(
            "{name}: {} failed, not predicted: {reason}",
            c.key()
        ));
    }
}

fn parse_trailer(rest: &str) -> Result<ExpectedFail, String> {
    let mut words = rest.split_whitespace();
    let row = words
        .next()
        .ok_or_else(|| "empty trailer; write `<method>.<variant> <check>...`".to_string())?;
    let (method, variant) = row
        .split_once('.')
        .ok_or_else(|| format!("`{row}` is not `<method>.<variant>`"))?;
    if Method::from_name(method).is_none() {
        return Err(format!(
            "`{method}` is not a method (known: {})",
            Method::names()
        ));
    }
    if variant.is_empty() {
        return Err(format!("`{row}` has no variant"));
    }
    let (mut must, mut may) = (BTreeSet::new(), BTreeSet::new());
    for word in words {
        let (key, optional) = match word.strip_suffix('?') {
            Some(k) => (k, true),
            None => (word, false),
        };
        let check = Check::from_key(key).ok_or_else(|| {
            format!(
                "`{key}` is not a check (known: {})",
                Check::ALL.map(Check::key).join(", ")
            )
        })?;
        if optional {
            may.insert(check);
        } else {
            must.insert(check);
        }
    }
    if must.is_empty() {
        return Err(format!(
            "`{row}` names no check that must fail; a row that may or may not fail is no prediction"
        ));
    }
    Ok(ExpectedFail {
        method: method.to_string(),
        variant: variant.to_string(),
        must,
        may,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATCH: &str = "From: x\nSubject: [PATCH] tcp: copy short sends\n\nWhy.\n\n\
        Zc-Fails: mmap_zerocopy.sg-on cpu_copies zero_copy_pct kernel_claims_copied?\n\
        Zc-Fails: mmap_zerocopy.sg-off cpu_copies\n---\n\
        diff --git a/net/ipv4/tcp.c b/net/ipv4/tcp.c\n\
        +Zc-Fails: sendfile.sg-on cpu_copies\n";

    fn row(method: &str, variant: &str, verdict: Verdict, reasons: &[&str]) -> RowResult {
        RowResult {
            method: method.into(),
            variant: variant.into(),
            verdict,
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn as_predicted() -> Vec<RowResult> {
        vec![
            row("sendfile", "sg-on", Verdict::Pass, &[]),
            row(
                "mmap_zerocopy",
                "sg-on",
                Verdict::Fail,
                &[
                    "cpu_copies 1.00, expected 0.00 ± 0.15",
                    "zero_copy_pct 0.0%, expected >= 90.0%",
                ],
            ),
            row(
                "mmap_zerocopy",
                "sg-off",
                Verdict::Fail,
                &["cpu_copies 2.00, expected 1.00 ± 0.15"],
            ),
        ]
    }

    #[test]
    fn the_trailers_before_the_diff_are_the_prediction() {
        let p = RegressionPatch::parse(PATCH).unwrap();
        assert_eq!(p.subject, "tcp: copy short sends");
        assert_eq!(p.fails.len(), 2, "a trailer inside the diff is not one");
        assert_eq!(
            p.fails[0].must,
            BTreeSet::from([Check::CpuCopies, Check::ZeroCopyPct])
        );
        assert_eq!(p.fails[0].may, BTreeSet::from([Check::KernelClaimsCopied]));
    }

    #[test]
    fn a_run_failing_exactly_as_predicted_has_no_mismatch() {
        let p = RegressionPatch::parse(PATCH).unwrap();
        assert_eq!(p.judge(&as_predicted()), Vec::<String>::new());
        // The optional check failing as well is still as predicted.
        let mut rows = as_predicted();
        rows[1]
            .reasons
            .push("kernel_claims_copied: the kernel flagged 3 sends copied, expected none".into());
        assert_eq!(p.judge(&rows), Vec::<String>::new());
    }

    #[test]
    fn each_way_of_differing_is_reported() {
        let p = RegressionPatch::parse(PATCH).unwrap();
        let mut rows = as_predicted();
        rows[0] = row(
            "sendfile",
            "sg-on",
            Verdict::Fail,
            &["cpu_copies 1.00, expected 0.00"],
        );
        rows[1].reasons.remove(1);
        rows[1].reasons.push("dma_copies 3, expected 2".into());
        rows[2] = row(
            "mmap_zerocopy",
            "sg-off",
            Verdict::Fail,
            &["no guest report"],
        );
        let got = p.judge(&rows);
        assert_eq!(got.len(), 5, "{got:#?}");
        assert!(got[0].starts_with("sendfile.sg-on: FAIL, expected PASS"));
        assert!(got[1].starts_with("mmap_zerocopy.sg-on: zero_copy_pct did not fail"));
        assert!(got[2].starts_with("mmap_zerocopy.sg-on: dma_copies failed, not predicted"));
        assert!(
            got[3].starts_with("mmap_zerocopy.sg-off: FAIL for another reason: no guest report")
        );
        assert!(got[4].starts_with("mmap_zerocopy.sg-off: cpu_copies did not fail"));
        // A SKIP the patch does not name is the kernel's configuration; one it
        // names is a miss.
        let mut skipping = as_predicted();
        skipping.push(row("sendfile_tmpfs", "sg-on", Verdict::Skip, &["no tmpfs"]));
        assert_eq!(p.judge(&skipping), Vec::<String>::new());
        let named = skipping
            .iter()
            .position(|r| r.verdict == Verdict::Fail)
            .unwrap();
        skipping[named].verdict = Verdict::Skip;
        assert!(p.judge(&skipping)[0].ends_with(": SKIP, expected FAIL"));
        let passing = vec![row("mmap_zerocopy", "sg-on", Verdict::Pass, &[])];
        assert_eq!(
            p.judge(&passing),
            [
                "mmap_zerocopy.sg-on: PASS, expected FAIL",
                "mmap_zerocopy.sg-off: not in the run, expected FAIL"
            ]
        );
    }

    #[rstest::rstest]
    #[case::no_trailer("Subject: x\n---\n", "not a regression patch")]
    #[case::bad_method("Zc-Fails: nosuch.sg-on cpu_copies\n", "`nosuch` is not a method")]
    #[case::no_variant("Zc-Fails: sendfile cpu_copies\n", "is not `<method>.<variant>`")]
    #[case::bad_check("Zc-Fails: sendfile.sg-on cpu_copy\n", "`cpu_copy` is not a check")]
    #[case::only_maybe(
        "Zc-Fails: sendfile.sg-on cpu_copies?\n",
        "names no check that must fail"
    )]
    #[case::twice(
        "Zc-Fails: sendfile.sg-on cpu_copies\nZc-Fails: sendfile.sg-on dma_copies\n",
        "line 2: sendfile.sg-on is named twice"
    )]
    fn a_malformed_prediction_is_refused_with_its_line(#[case] text: &str, #[case] want: &str) {
        let err = RegressionPatch::parse(text).unwrap_err();
        assert!(err.contains(want), "{err}");
    }

    #[test]
    fn the_shipped_patches_parse_and_name_only_rows_the_suite_has() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/regressions");
        let expectations =
            crate::Expectations::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml"))
                .unwrap();
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "patch") {
                continue;
            }
            n += 1;
            let p = RegressionPatch::load(&path).unwrap();
            assert!(!p.subject.is_empty(), "{}", path.display());
            for f in &p.fails {
                let table = expectations.methods[&f.method].get(&f.variant);
                assert!(
                    table.is_some(),
                    "{}: {}.{}",
                    path.display(),
                    f.method,
                    f.variant
                );
            }
        }
        assert!(n >= 3, "{n} regression patches in {}", dir.display());
    }
}
