//! `expected.toml`: what each method should show, per NIC variant and, where a
//! kernel change moved the answer, per kernel version range (rows chosen by the
//! release the guest reported, [`crate::kernel`]). The schema is documented at the
//! top of `audit/expected.toml`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::kernel::{KernelRange, KernelVersion};
use crate::AuditError;
use zc_protocol::Method;

/// Tolerance on CPU copies per byte when `[defaults]` does not give one: wide enough
/// for headers, retransmissions and the odd page the scan sees twice, narrow enough
/// that 0, 1 and 2 copies never overlap.
const CPU_COPIES_TOLERANCE: f64 = 0.15;
/// Tolerance on system calls per chunk when `[defaults]` does not give one: a short
/// write now and then adds a call without changing the method's shape.
const SYSCALLS_TOLERANCE: f64 = 0.1;

/// What an expectation checks: each is named by its `expected.toml` key (the
/// `_min`/`_max` forms share their key), and every reason a check gives for a
/// FAIL begins with that key, so a reader (or a regression patch's `Zc-Fails`
/// trailer, [`crate::regression`]) can tell which check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// `syscalls_per_chunk` (and its range).
    SyscallsPerChunk,
    /// `mode_switches_per_chunk` (and its range).
    ModeSwitchesPerChunk,
    /// `dma_copies`.
    DmaCopies,
    /// `cpu_copies`.
    CpuCopies,
    /// `zero_copy_pct_min` / `zero_copy_pct_max`.
    ZeroCopyPct,
    /// `kernel_claims_copied`.
    KernelClaimsCopied,
}

impl Check {
    /// Every check, in the order [`Expectation`] runs them.
    pub const ALL: [Check; 6] = [
        Check::SyscallsPerChunk,
        Check::ModeSwitchesPerChunk,
        Check::DmaCopies,
        Check::CpuCopies,
        Check::ZeroCopyPct,
        Check::KernelClaimsCopied,
    ];

    /// The key that names it in `expected.toml` and begins its FAIL reasons.
    pub fn key(self) -> &'static str {
        match self {
            Check::SyscallsPerChunk => "syscalls_per_chunk",
            Check::ModeSwitchesPerChunk => "mode_switches_per_chunk",
            Check::DmaCopies => "dma_copies",
            Check::CpuCopies => "cpu_copies",
            Check::ZeroCopyPct => "zero_copy_pct",
            Check::KernelClaimsCopied => "kernel_claims_copied",
        }
    }

    /// The check named `key` (see [`Check::key`]).
    pub fn from_key(key: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|c| c.key() == key)
    }

    /// The check a FAIL reason comes from, if it comes from one (a structural
    /// reason such as "no guest report" does not).
    pub fn of_reason(reason: &str) -> Option<Check> {
        let first = reason.split([' ', ':']).next()?;
        Check::from_key(first)
    }
}

/// All expectations, by method and variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expectations {
    /// Tolerances that apply where a table does not set its own.
    pub defaults: Defaults,
    /// `methods[method][variant]`: the rows of `[method.variant]`, one for a plain
    /// table, one per kernel range for an array of tables (`[[method.variant]]`
    /// with `kernel = ...`; their ranges neither overlap nor leave gaps between
    /// them, [`Expectations::parse`] checks).
    pub methods: BTreeMap<String, BTreeMap<String, Vec<Expectation>>>,
}

/// Why [`Expectations::select`] found no row for a method, variant and kernel; the
/// text is the audit's FAIL reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NoRow(pub String);

/// The `[defaults]` table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// Absolute tolerance on `cpu_copies`.
    pub cpu_copies_tolerance: f64,
    /// Absolute tolerance on `syscalls_per_chunk` (twice that on mode switches).
    pub syscalls_tolerance: f64,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            cpu_copies_tolerance: CPU_COPIES_TOLERANCE,
            syscalls_tolerance: SYSCALLS_TOLERANCE,
        }
    }
}

/// What one method must show in one variant (`[method.variant]`). Every field is
/// optional: an absent field is not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Expectation {
    /// The kernel versions this row is for (`kernel = ">= 6.5"`); `None`: every kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelRange>,
    /// System calls per chunk, within the syscalls tolerance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscalls_per_chunk: Option<f64>,
    /// Lowest acceptable system calls per chunk (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscalls_per_chunk_min: Option<f64>,
    /// Highest acceptable system calls per chunk (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscalls_per_chunk_max: Option<f64>,
    /// Mode switches per chunk, within twice the syscalls tolerance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_switches_per_chunk: Option<f64>,
    /// Lowest acceptable mode switches per chunk (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_switches_per_chunk_min: Option<f64>,
    /// Highest acceptable mode switches per chunk (inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_switches_per_chunk_max: Option<f64>,
    /// Overrides `[defaults] syscalls_tolerance` for this table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscalls_tolerance: Option<f64>,
    /// DMA copies (disk + NIC, each rounded), exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_copies: Option<u32>,
    /// CPU-copied payload bytes per byte sent, within the CPU tolerance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_copies: Option<f64>,
    /// Overrides `[defaults] cpu_copies_tolerance` for this table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_copies_tolerance: Option<f64>,
    /// Lowest acceptable share (percent) of NIC payload bytes read zero-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_copy_pct_min: Option<f64>,
    /// Highest acceptable share (percent) of NIC payload bytes read zero-copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_copy_pct_max: Option<f64>,
    /// Whether the kernel must flag sends as copied (`true`: at least one send
    /// flagged; `false`: none). Needs the report's `zerocopy` counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_claims_copied: Option<bool>,
    /// Free text for the reader; not checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The measured values an [`Expectation`] is checked against.
pub(crate) struct Measured {
    pub syscalls_per_chunk: Option<f64>,
    pub mode_switches_per_chunk: Option<f64>,
    pub dma_copies: u32,
    pub cpu_copies: f64,
    pub zero_copy_pct: f64,
    pub kernel_copied: Option<u64>,
    pub dirty_samples: u64,
}

// A variant is either a table or an array of tables, decoded one by one so that an
// error names its table and row (serde's untagged enums would drop the reason).
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    #[serde(flatten)]
    methods: BTreeMap<String, BTreeMap<String, toml::Value>>,
}

impl Expectations {
    /// Parses the text of an expectations file.
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let bad = |what: String| AuditError::Expectations { what };
        let file: File = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut methods = BTreeMap::new();
        for (method, variants) in file.methods {
            let mut rows_of = BTreeMap::new();
            for (variant, value) in variants {
                let rows = match value {
                    toml::Value::Table(t) => vec![decode(t, &format!("[{method}.{variant}]"))?],
                    toml::Value::Array(items) => items
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| {
                            let at = format!("[[{method}.{variant}]] row {}", i + 1);
                            match item {
                                toml::Value::Table(t) => decode(t, &at),
                                _ => Err(bad(format!("{at}: not a table"))),
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => {
                        return Err(bad(format!(
                            "[{method}.{variant}]: not a table (write `[{method}.{variant}]`, or `[[{method}.{variant}]]` rows with `kernel = ...`)"
                        )))
                    }
                };
                rows_of.insert(variant, rows);
            }
            methods.insert(method, rows_of);
        }
        let ex = Expectations {
            defaults: file.defaults,
            methods,
        };
        ex.validate()?;
        Ok(ex)
    }

    /// Reads and parses the expectations file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuditError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            AuditError::Expectations { what } => AuditError::Expectations {
                what: format!("{}: {what}", path.display()),
            },
            other => other,
        })
    }

    /// The rows of `[method.variant]` (empty when the file has no such table).
    pub fn rows(&self, method: &str, variant: &str) -> &[Expectation] {
        self.methods
            .get(method)
            .and_then(|v| v.get(variant))
            .map_or(&[], Vec::as_slice)
    }

    /// The expectation of `method` in `variant` for the kernel whose release the
    /// guest reported (`None`: it reported none, e.g. it never booted). A row
    /// without `kernel` is every kernel's; otherwise the row whose range holds the
    /// release's version. The error says what is missing, as a FAIL reason.
    pub fn select(
        &self,
        method: &str,
        variant: &str,
        release: Option<&str>,
    ) -> Result<&Expectation, NoRow> {
        let rows = self.rows(method, variant);
        if rows.is_empty() {
            return Err(NoRow(format!(
                "no [{method}.{variant}] table in the expectations"
            )));
        }
        if let Some(any) = rows.iter().find(|r| r.kernel.is_none()) {
            return Ok(any);
        }
        let ranges = || {
            rows.iter()
                .filter_map(|r| r.kernel.as_ref().map(ToString::to_string))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let Some(release) = release else {
            return Err(NoRow(format!(
                "no kernel release reported: cannot choose among the [[{method}.{variant}]] rows ({})",
                ranges()
            )));
        };
        let Some(version) = KernelVersion::of_release(release) else {
            return Err(NoRow(format!(
                "kernel release {release:?} does not start with a version: cannot choose among the [[{method}.{variant}]] rows ({})",
                ranges()
            )));
        };
        rows.iter()
            .find(|r| r.kernel.as_ref().is_some_and(|k| k.contains(version)))
            .ok_or_else(|| {
                NoRow(format!(
                    "no [[{method}.{variant}]] row for kernel {release} (version {version}; rows: {}): add one",
                    ranges()
                ))
            })
    }

    /// The expectation of `method` in `variant` when it is the same for every kernel
    /// (a plain table), else `None`.
    pub fn get(&self, method: &str, variant: &str) -> Option<&Expectation> {
        match self.rows(method, variant) {
            [one] if one.kernel.is_none() => Some(one),
            _ => None,
        }
    }

    // A typo'd range (min above max, a negative tolerance) would make a check that can
    // never pass or never fail; refuse it when the file is read instead.
    fn validate(&self) -> Result<(), AuditError> {
        let bad = |table: &str, what: String| AuditError::Expectations {
            what: format!("[{table}]: {what}"),
        };
        // NaN and inf are valid TOML floats, and no use as a tolerance.
        let usable = |t: f64| t.is_finite() && t >= 0.0;
        for (name, tol) in [
            ("cpu_copies_tolerance", self.defaults.cpu_copies_tolerance),
            ("syscalls_tolerance", self.defaults.syscalls_tolerance),
        ] {
            if !usable(tol) {
                return Err(bad("defaults", format!("{name} must be a number >= 0")));
            }
        }
        for (method, variants) in &self.methods {
            for (variant, rows) in variants {
                validate_rows(method, variant, rows)?;
            }
            for (variant, e) in variants
                .iter()
                .flat_map(|(v, rows)| rows.iter().map(move |e| (v, e)))
            {
                let ranges = [
                    (
                        "syscalls_per_chunk",
                        e.syscalls_per_chunk_min,
                        e.syscalls_per_chunk_max,
                    ),
                    (
                        "mode_switches_per_chunk",
                        e.mode_switches_per_chunk_min,
                        e.mode_switches_per_chunk_max,
                    ),
                    ("zero_copy_pct", e.zero_copy_pct_min, e.zero_copy_pct_max),
                ];
                for (name, min, max) in ranges {
                    if let (Some(lo), Some(hi)) = (min, max) {
                        if lo > hi {
                            return Err(bad(
                                &format!("{method}.{variant}"),
                                format!("{name}_min {lo} is above {name}_max {hi}"),
                            ));
                        }
                    }
                }
                for (name, tol) in [
                    ("cpu_copies_tolerance", e.cpu_copies_tolerance),
                    ("syscalls_tolerance", e.syscalls_tolerance),
                ] {
                    if tol.is_some_and(|t| !usable(t)) {
                        return Err(bad(
                            &format!("{method}.{variant}"),
                            format!("{name} must be a number >= 0"),
                        ));
                    }
                }
            }
            // After the table's own checks, so a typo'd range is named as such. A
            // table for a method the guest does not have could never be run.
            if method.parse::<Method>().is_err() {
                return Err(bad(
                    method,
                    format!("not a method (known: {})", Method::names()),
                ));
            }
        }
        Ok(())
    }
}

/// Decodes one table of `[method.variant]` (`at` names it in errors).
fn decode(table: toml::Table, at: &str) -> Result<Expectation, AuditError> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| AuditError::Expectations {
            what: format!("{at}: {}", e.message()),
        })
}

/// Checks the rows of one `[method.variant]`: several rows each name their kernels,
/// and their ranges neither overlap (two answers for one kernel) nor leave a gap
/// between them (a kernel in the middle with no answer is a typo, e.g. `< 6.4`
/// beside `>= 6.5`). Kernels below the lowest or above the highest range may have
/// no row: the audit says so for such a kernel ([`Expectations::select`]).
fn validate_rows(method: &str, variant: &str, rows: &[Expectation]) -> Result<(), AuditError> {
    let bad = |what: String| AuditError::Expectations {
        what: format!("[[{method}.{variant}]]: {what}"),
    };
    if rows.is_empty() {
        return Err(bad("no rows".to_string()));
    }
    if rows.len() == 1 {
        return Ok(());
    }
    let mut ranges = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        match &row.kernel {
            Some(k) => ranges.push(k),
            None => {
                return Err(bad(format!(
                    "row {} has no `kernel = ...`: with several rows each names its kernels (e.g. `kernel = \">= 6.5\"`)",
                    i + 1
                )))
            }
        }
    }
    for (i, a) in ranges.iter().enumerate() {
        for b in &ranges[i + 1..] {
            if a.overlaps(b) {
                return Err(bad(format!(
                    "the rows for `{a}` and `{b}` overlap: a kernel may have only one row"
                )));
            }
        }
    }
    // Sorted by lower bound, each range must start where the previous one ends.
    let mut sorted: Vec<&KernelRange> = ranges;
    sorted.sort_by_key(|r| r.from);
    for pair in sorted.windows(2) {
        let (lower, upper) = (pair[0], pair[1]);
        if lower.below != upper.from {
            let gap_from = lower
                .below
                .map_or_else(|| "?".to_string(), |v| v.to_string());
            let gap_to = upper
                .from
                .map_or_else(|| "?".to_string(), |v| v.to_string());
            return Err(bad(format!(
                "the rows for `{lower}` and `{upper}` leave kernels {gap_from} to {gap_to} without a row: make them meet (`< X` beside `>= X`)"
            )));
        }
    }
    Ok(())
}

impl Expectation {
    /// Every way `m` misses this expectation, as one line each.
    pub(crate) fn check(&self, defaults: &Defaults, m: &Measured) -> Vec<String> {
        let mut out = Vec::new();
        let sys_tol = self
            .syscalls_tolerance
            .unwrap_or(defaults.syscalls_tolerance);
        check_value(
            &mut out,
            Check::SyscallsPerChunk.key(),
            m.syscalls_per_chunk,
            self.syscalls_per_chunk,
            sys_tol,
            self.syscalls_per_chunk_min,
            self.syscalls_per_chunk_max,
        );
        check_value(
            &mut out,
            Check::ModeSwitchesPerChunk.key(),
            m.mode_switches_per_chunk,
            self.mode_switches_per_chunk,
            2.0 * sys_tol,
            self.mode_switches_per_chunk_min,
            self.mode_switches_per_chunk_max,
        );
        if let Some(want) = self.dma_copies {
            if m.dma_copies != want {
                out.push(format!(
                    "{} {}, expected {want}",
                    Check::DmaCopies.key(),
                    m.dma_copies
                ));
            }
        }
        if self.cpu_copies.is_some() && m.dirty_samples == 0 {
            // Zero samples read as zero copies: a zero-copy expectation would pass
            // on a run that never logged dirty pages at all.
            out.push(format!(
                "{} unknown: no dirty-page samples in the span",
                Check::CpuCopies.key()
            ));
        } else {
            let tol = self
                .cpu_copies_tolerance
                .unwrap_or(defaults.cpu_copies_tolerance);
            check_value(
                &mut out,
                Check::CpuCopies.key(),
                Some(m.cpu_copies),
                self.cpu_copies,
                tol,
                None,
                None,
            );
        }
        if let Some(lo) = self.zero_copy_pct_min {
            if m.zero_copy_pct < lo {
                out.push(format!(
                    "{} {:.1}%, expected >= {lo:.1}%",
                    Check::ZeroCopyPct.key(),
                    m.zero_copy_pct
                ));
            }
        }
        if let Some(hi) = self.zero_copy_pct_max {
            if m.zero_copy_pct > hi {
                out.push(format!(
                    "{} {:.1}%, expected <= {hi:.1}%",
                    Check::ZeroCopyPct.key(),
                    m.zero_copy_pct
                ));
            }
        }
        if let Some(want) = self.kernel_claims_copied {
            match m.kernel_copied {
                None => out.push(format!(
                    "{}: the kernel's zero-copy counts are missing from the report",
                    Check::KernelClaimsCopied.key()
                )),
                Some(copied) if (copied > 0) != want => out.push(format!(
                    "{}: the kernel flagged {copied} sends copied, expected {}",
                    Check::KernelClaimsCopied.key(),
                    if want { "some" } else { "none" }
                )),
                Some(_) => {}
            }
        }
        out
    }
}

fn check_value(
    out: &mut Vec<String>,
    what: &str,
    got: Option<f64>,
    want: Option<f64>,
    tol: f64,
    min: Option<f64>,
    max: Option<f64>,
) {
    if want.is_none() && min.is_none() && max.is_none() {
        return;
    }
    let Some(got) = got else {
        out.push(format!(
            "{what} unknown (the guest report lacks the counts)"
        ));
        return;
    };
    if let Some(want) = want {
        // A hair of slack so that a tolerance edge (e.g. 0.15 vs 0.1500000001 from
        // float division) does not decide a verdict.
        if (got - want).abs() > tol + 1e-9 {
            out.push(format!("{what} {got:.2}, expected {want:.2} ± {tol:.2}"));
        }
    }
    if let Some(lo) = min {
        if got < lo - 1e-9 {
            out.push(format!("{what} {got:.2}, expected >= {lo:.2}"));
        }
    }
    if let Some(hi) = max {
        if got > hi + 1e-9 {
            out.push(format!("{what} {got:.2}, expected <= {hi:.2}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Measured {
        Measured {
            syscalls_per_chunk: Some(1.0),
            mode_switches_per_chunk: Some(2.0),
            dma_copies: 2,
            cpu_copies: 1.02,
            zero_copy_pct: 0.0,
            kernel_copied: Some(0),
            dirty_samples: 3,
        }
    }

    #[test]
    fn parse_defaults_and_tables() {
        let ex = Expectations::parse(
            "[defaults]\ncpu_copies_tolerance = 0.2\n[sendfile.sg-on]\ncpu_copies = 0\ndma_copies = 2\n",
        )
        .unwrap();
        assert_eq!(ex.defaults.cpu_copies_tolerance, 0.2);
        assert_eq!(ex.defaults.syscalls_tolerance, SYSCALLS_TOLERANCE);
        let e = ex.get("sendfile", "sg-on").unwrap();
        assert_eq!(e.cpu_copies, Some(0.0));
        assert!(ex.get("sendfile", "sg-off").is_none());
    }

    #[test]
    fn typos_and_bad_ranges_are_refused() {
        let e = Expectations::parse("[sendfile.sg-on]\ncpu_copy = 0\n").unwrap_err();
        assert!(e.to_string().contains("cpu_copy"), "{e}");
        let e = Expectations::parse(
            "[x.sg-on]\nsyscalls_per_chunk_min = 3\nsyscalls_per_chunk_max = 1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("[x.sg-on]"), "{e}");
        let e = Expectations::parse("[defaults]\nsyscalls_tolerance = -1\n").unwrap_err();
        assert!(e.to_string().contains("syscalls_tolerance"), "{e}");
    }

    #[test]
    fn a_table_names_a_method_of_the_protocol() {
        let e = Expectations::parse("[send_file.sg-on]\ncpu_copies = 0\n").unwrap_err();
        assert!(e.to_string().contains("[send_file]: not a method"), "{e}");
        assert!(e.to_string().contains("read_write, mmap_write"), "{e}");
    }

    const SPLIT: &str = r#"
[[sendfile.sg-on]]
kernel = "< 6.5"
cpu_copies = 0.0
[[sendfile.sg-on]]
kernel = ">= 6.5"
cpu_copies = 1.0
[sendfile.sg-off]
cpu_copies = 1.0
"#;

    #[test]
    fn rows_are_chosen_by_the_reported_release() {
        let ex = Expectations::parse(SPLIT).unwrap();
        let cpu = |release| {
            ex.select("sendfile", "sg-on", release)
                .map(|e| e.cpu_copies.unwrap())
        };
        assert_eq!(cpu(Some("6.1.0-56-cloud-amd64")), Ok(0.0));
        assert_eq!(cpu(Some("6.12.38+deb12-cloud-amd64")), Ok(1.0));
        assert_eq!(cpu(Some("6.5.0-rc1")), Ok(1.0));
        // A plain table is every kernel's, also one that reported no release.
        let off = ex.select("sendfile", "sg-off", None).unwrap();
        assert_eq!(off.cpu_copies, Some(1.0));
        assert_eq!(ex.get("sendfile", "sg-off"), Some(off));
        // Conditional rows have no single answer.
        assert_eq!(ex.get("sendfile", "sg-on"), None);
        let e = ex.select("sendfile", "sg-on", None).unwrap_err().0;
        assert!(e.contains("no kernel release reported"), "{e}");
        assert!(e.contains("< 6.5; >= 6.5"), "{e}");
        let e = ex.select("sendfile", "sg-on", Some("linux")).unwrap_err().0;
        assert!(e.contains("does not start with a version"), "{e}");
        let e = ex.select("splice", "sg-on", Some("6.1.0")).unwrap_err().0;
        assert_eq!(e, "no [splice.sg-on] table in the expectations");
        // The chosen row says which kernels it is for.
        let row = ex.select("sendfile", "sg-on", Some("6.1.0")).unwrap();
        assert_eq!(row.kernel.as_ref().unwrap().to_string(), "< 6.5");
    }

    #[test]
    fn a_kernel_outside_every_range_has_no_row() {
        let ex = Expectations::parse(
            "[[sendfile.sg-on]]\nkernel = \">= 6.1, < 6.5\"\n[[sendfile.sg-on]]\nkernel = \">= 6.5\"\n",
        )
        .unwrap();
        let e = ex
            .select("sendfile", "sg-on", Some("5.10.0-30-amd64"))
            .unwrap_err()
            .0;
        assert!(
            e.contains("no [[sendfile.sg-on]] row for kernel 5.10.0-30-amd64"),
            "{e}"
        );
        assert!(e.contains("version 5.10"), "{e}");
        // One conditional table alone is allowed: older kernels then have no row.
        let only_new = Expectations::parse("[sendfile.sg-on]\nkernel = \">= 6.5\"\n").unwrap();
        assert!(only_new.select("sendfile", "sg-on", Some("6.1.0")).is_err());
        assert!(only_new.select("sendfile", "sg-on", Some("6.12.0")).is_ok());
    }

    #[rstest::rstest]
    #[case::overlap(
        "[[sendfile.sg-on]]\nkernel = \">= 6.1\"\n[[sendfile.sg-on]]\nkernel = \">= 6.5\"\n",
        "[[sendfile.sg-on]]: the rows for `>= 6.1` and `>= 6.5` overlap"
    )]
    #[case::gap(
        "[[sendfile.sg-on]]\nkernel = \"< 6.4\"\n[[sendfile.sg-on]]\nkernel = \">= 6.5\"\n",
        "leave kernels 6.4 to 6.5 without a row"
    )]
    #[case::unconditional_beside_conditional(
        "[[sendfile.sg-on]]\ncpu_copies = 0\n[[sendfile.sg-on]]\nkernel = \">= 6.5\"\n",
        "row 1 has no `kernel = ...`"
    )]
    #[case::bad_range("[sendfile.sg-on]\nkernel = \"> 6.5\"\n", "write `>= 6.5`")]
    #[case::typo_in_a_row(
        "[[sendfile.sg-on]]\nkernel = \"< 6.5\"\n[[sendfile.sg-on]]\nkernel = \">= 6.5\"\ncpu_copy = 1\n",
        "[[sendfile.sg-on]] row 2: unknown field `cpu_copy`"
    )]
    #[case::not_a_table("[sendfile]\nsg-on = 3\n", "[sendfile.sg-on]: not a table")]
    fn conditional_rows_are_checked_when_read(#[case] text: &str, #[case] want: &str) {
        let e = Expectations::parse(text).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }

    /// The releases of the kernels the project runs: Debian's 6.1 and 6.12
    /// (`make matrix`) and `make kernel`'s source build.
    const RELEASES: [&str; 3] = [
        "6.1.0-56-cloud-amd64",
        "6.12.38+deb12-cloud-amd64",
        "6.1.192-zc",
    ];

    fn shipped_table() -> Expectations {
        Expectations::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml")).unwrap()
    }

    /// `method`'s sg-on and sg-off rows for a kernel `release`.
    fn both_variants<'t>(
        table: &'t Expectations,
        method: Method,
        release: &str,
    ) -> (&'t Expectation, &'t Expectation) {
        let row = |variant| table.select(method.name(), variant, Some(release)).unwrap();
        (row("sg-on"), row("sg-off"))
    }

    /// The table's numbers and the protocol's method properties are two accounts of
    /// the same methods; a new method with one and not the other fails here.
    #[test]
    fn shipped_table_agrees_with_the_method_properties() {
        let table = shipped_table();
        for (method, release) in Method::ALL
            .into_iter()
            .flat_map(|m| RELEASES.map(|r| (m, r)))
        {
            let (on, off) = both_variants(&table, method, release);
            let (on_cpu, off_cpu) = (on.cpu_copies.unwrap(), off.cpu_copies.unwrap());
            // Under one copy with scatter-gather exactly when the send path takes
            // the payload without a CPU copy (COW's one page in sixteen is not a
            // copy of the whole payload).
            assert_eq!(on_cpu < 0.5, method.needs_sg_for_zero_copy(), "{method}");
            // Without scatter-gather Linux linearises every frame: one copy more.
            assert!((off_cpu - on_cpu - 1.0).abs() < 1e-9, "{method}");
            // A warm page cache or a tmpfs copy means no disk DMA: only the NIC's.
            assert_eq!(
                on.dma_copies == Some(1),
                !method.disk_dma_in_span(),
                "{method}"
            );
            assert_eq!(on.dma_copies, off.dma_copies, "{method}");
        }
    }

    /// The shipped table has both variants of every method, and nothing else.
    #[test]
    fn shipped_table_covers_every_method() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml");
        let table = shipped_table();
        for method in Method::every() {
            for (variant, release) in ["sg-on", "sg-off"]
                .into_iter()
                .flat_map(|v| RELEASES.map(|r| (v, r)))
            {
                let row = table.select(method.name(), variant, Some(release));
                assert!(row.is_ok(), "{}: {row:?}", path.display());
            }
        }
        assert_eq!(table.methods.len(), Method::every().count());
    }

    /// The receive rows: the guest's TX offload does not change how it receives, so
    /// a receive method's sg-off row is its sg-on row; every one has two DMA copies
    /// (the NIC's RX DMA in, the scratch disk's OUT DMA out) and at least one CPU
    /// copy, because virtio-net never hands the stack a page-aligned payload page.
    #[test]
    fn shipped_receive_rows_do_not_depend_on_the_variant() {
        let table = shipped_table();
        for (method, release) in Method::RECEIVE
            .into_iter()
            .flat_map(|m| RELEASES.map(|r| (m, r)))
        {
            let (on, off) = both_variants(&table, method, release);
            assert_eq!(on, off, "{method}");
            assert_eq!(on.dma_copies, Some(2), "{method}");
            assert!(on.cpu_copies.unwrap() >= 1.0, "{method}");
            assert_eq!(on.zero_copy_pct_max, Some(10.0), "{method}");
        }
    }

    #[test]
    fn check_reports_each_miss() {
        let e = Expectation {
            syscalls_per_chunk: Some(2.0),
            cpu_copies: Some(0.0),
            dma_copies: Some(1),
            zero_copy_pct_min: Some(90.0),
            kernel_claims_copied: Some(true),
            ..Default::default()
        };
        let r = e.check(&Defaults::default(), &measured());
        assert_eq!(
            r,
            vec![
                "syscalls_per_chunk 1.00, expected 2.00 ± 0.10",
                "dma_copies 2, expected 1",
                "cpu_copies 1.02, expected 0.00 ± 0.15",
                "zero_copy_pct 0.0%, expected >= 90.0%",
                "kernel_claims_copied: the kernel flagged 0 sends copied, expected some",
            ]
        );
        // Each reason names the check it comes from.
        let named: Vec<_> = r.iter().map(|l| Check::of_reason(l)).collect();
        assert_eq!(
            named,
            [
                Some(Check::SyscallsPerChunk),
                Some(Check::DmaCopies),
                Some(Check::CpuCopies),
                Some(Check::ZeroCopyPct),
                Some(Check::KernelClaimsCopied)
            ]
        );
        assert_eq!(Check::of_reason("no guest report"), None);
        let ok = Expectation {
            cpu_copies: Some(1.0),
            syscalls_per_chunk_min: Some(1.0),
            mode_switches_per_chunk_max: Some(2.0),
            kernel_claims_copied: Some(false),
            ..Default::default()
        };
        assert!(ok.check(&Defaults::default(), &measured()).is_empty());
    }

    #[test]
    fn zero_dirty_samples_cannot_pass_a_cpu_expectation() {
        let e = Expectation {
            cpu_copies: Some(0.0),
            ..Default::default()
        };
        let m = Measured {
            cpu_copies: 0.0,
            dirty_samples: 0,
            ..measured()
        };
        let r = e.check(&Defaults::default(), &m);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("no dirty-page samples"));
    }
}
