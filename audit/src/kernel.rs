//! Kernel versions and the version ranges of `expected.toml`'s conditional rows
//! (`kernel = ">= 6.5"`), chosen by the release the guest reported (`hello
//! <release>` on the control channel, e.g. `6.1.0-56-cloud-amd64`).
//!
//! Hand-written rather than `semver`: a kernel release is not a semantic version.
//! `semver` reads Debian's `6.1.0-56-cloud-amd64` as a pre-release of 6.1.0, and
//! its comparators then exclude pre-releases (`>= 6.0` would not match it).

use std::fmt;

use serde::{Deserialize, Serialize};

/// `major.minor.patch` of a kernel release; what follows the numbers (`-56-cloud-amd64`,
/// `-rc3`, `+deb12`) is not part of it. An `-rc` kernel counts as its release: the
/// merge window that a boundary names is in its first release candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    /// e.g. 6.
    pub major: u32,
    /// e.g. 12.
    pub minor: u32,
    /// e.g. 38 (the stable release), 0 when absent.
    pub patch: u32,
}

impl KernelVersion {
    /// The version at the start of `release` (`6.1.0-56-cloud-amd64` -> 6.1.0,
    /// `6.12` -> 6.12.0); `None` when it does not start with `major.minor`.
    pub fn of_release(release: &str) -> Option<KernelVersion> {
        let end = release
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(release.len());
        let mut parts = release[..end].split('.');
        let mut next = || -> Option<Option<u32>> {
            match parts.next() {
                None => Some(None),
                Some(p) => p.parse().ok().map(Some),
            }
        };
        let major = next()??;
        let minor = next()??;
        let patch = next()?.unwrap_or(0);
        Some(KernelVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patch == 0 {
            write!(f, "{}.{}", self.major, self.minor)
        } else {
            write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
        }
    }
}

/// A half-open range of kernel versions: `>= A`, `< B` or `>= A, < B`. Only these
/// two comparators, so that neighbouring rows meet without overlapping (`< 6.5`
/// and `>= 6.5`) and a gap or an overlap is plain to see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KernelRange {
    /// Lowest version in the range (inclusive), if bounded below.
    pub from: Option<KernelVersion>,
    /// First version past the range (exclusive), if bounded above.
    pub below: Option<KernelVersion>,
}

/// How to write a range, for error messages.
const RANGE_SYNTAX: &str = "write `>= 6.5`, `< 6.5` or `>= 6.1, < 6.5` (half-open ranges, so that neighbouring rows meet without overlapping)";

impl KernelRange {
    /// Parses `>= A`, `< B` or `>= A, < B` (A below B).
    pub fn parse(text: &str) -> Result<KernelRange, String> {
        let mut range = KernelRange {
            from: None,
            below: None,
        };
        for part in text.split(',') {
            let part = part.trim();
            let (op, version) = if let Some(v) = part.strip_prefix(">=") {
                (">=", v.trim())
            } else if let Some(v) = part.strip_prefix('<').filter(|v| !v.starts_with('=')) {
                ("<", v.trim())
            } else {
                return Err(format!("kernel = {text:?}: {RANGE_SYNTAX}"));
            };
            let parsed = KernelVersion::of_release(version)
                .filter(|_| version.chars().all(|c| c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| {
                    format!("kernel = {text:?}: {version:?} is not a version such as 6.5 or 6.1.12")
                })?;
            let slot = if op == ">=" {
                &mut range.from
            } else {
                &mut range.below
            };
            if slot.replace(parsed).is_some() {
                return Err(format!(
                    "kernel = {text:?}: `{op}` given twice; {RANGE_SYNTAX}"
                ));
            }
        }
        if let (Some(from), Some(below)) = (range.from, range.below) {
            if from >= below {
                return Err(format!(
                    "kernel = {text:?}: the range is empty ({from} is not below {below})"
                ));
            }
        }
        Ok(range)
    }

    /// Whether `v` is in the range.
    pub fn contains(&self, v: KernelVersion) -> bool {
        self.from.is_none_or(|f| v >= f) && self.below.is_none_or(|b| v < b)
    }

    /// Whether some version is in both ranges.
    pub fn overlaps(&self, other: &KernelRange) -> bool {
        // [a, b) and [c, d) overlap iff a < d and c < b, an absent bound being
        // infinitely low (from) or high (below).
        let starts_before_end =
            |from: Option<KernelVersion>, below: Option<KernelVersion>| match (from, below) {
                (Some(f), Some(b)) => f < b,
                _ => true,
            };
        starts_before_end(self.from, other.below) && starts_before_end(other.from, self.below)
    }
}

impl fmt::Display for KernelRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.from, self.below) {
            (Some(a), Some(b)) => write!(f, ">= {a}, < {b}"),
            (Some(a), None) => write!(f, ">= {a}"),
            (None, Some(b)) => write!(f, "< {b}"),
            (None, None) => f.write_str("any"),
        }
    }
}

impl TryFrom<String> for KernelRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        KernelRange::parse(&text)
    }
}

impl From<KernelRange> for String {
    fn from(range: KernelRange) -> String {
        range.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> KernelVersion {
        KernelVersion {
            major,
            minor,
            patch,
        }
    }

    #[rstest::rstest]
    #[case("6.1.0-56-cloud-amd64", Some(v(6, 1, 0)))]
    #[case("6.12.38+deb12-cloud-amd64", Some(v(6, 12, 38)))]
    #[case("6.5.0-rc3", Some(v(6, 5, 0)))]
    #[case("6.1.192-zc", Some(v(6, 1, 192)))]
    #[case("6.12", Some(v(6, 12, 0)))]
    #[case("6", None)]
    #[case("linux-6.1", None)]
    #[case("", None)]
    fn a_release_gives_its_version(#[case] release: &str, #[case] want: Option<KernelVersion>) {
        assert_eq!(KernelVersion::of_release(release), want);
    }

    #[test]
    fn versions_order_numerically() {
        assert!(v(6, 12, 0) > v(6, 5, 0));
        assert!(v(6, 1, 192) < v(6, 5, 0));
    }

    #[test]
    fn ranges_parse_and_contain() {
        let new = KernelRange::parse(">= 6.5").unwrap();
        let old = KernelRange::parse("< 6.5").unwrap();
        let mid = KernelRange::parse(">=6.1, <6.5").unwrap();
        assert!(new.contains(v(6, 12, 38)) && !new.contains(v(6, 1, 0)));
        assert!(old.contains(v(6, 1, 192)) && !old.contains(v(6, 5, 0)));
        assert!(mid.contains(v(6, 1, 0)) && !mid.contains(v(6, 0, 9)));
        assert!(!new.overlaps(&old) && !old.overlaps(&new));
        assert!(mid.overlaps(&old) && !mid.overlaps(&new));
        assert_eq!(mid.to_string(), ">= 6.1, < 6.5");
    }

    #[rstest::rstest]
    #[case("> 6.5", "write `>= 6.5`")]
    #[case("<= 6.5", "write `>= 6.5`")]
    #[case("6.5", "write `>= 6.5`")]
    #[case(">= 6.x", "is not a version")]
    #[case(">= 6.5-rc1", "is not a version")]
    #[case(">= 6.5, >= 6.6", "given twice")]
    #[case(">= 6.5, < 6.5", "the range is empty")]
    fn bad_ranges_say_how_to_write_one(#[case] text: &str, #[case] want: &str) {
        let err = KernelRange::parse(text).unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}
