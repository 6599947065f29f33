//! The `zc.*` options on the kernel command line (`/proc/cmdline`).
//!
//! Recognised options:
//! - `zc.role=guest|host` (default `guest`): which program to be, see `guest.rs` and
//!   `host.rs`.
//! - `zc.test=panic|hang` (guest role): end-to-end test hooks for the VMM.
//! - `zc.exit=N` (guest role, 0..=255): the exit status to report instead of 0.
//! - `zc.outdir=/abs/path` (host role, required): the host directory shared
//!   read-write as `zcout`.
//!
//! Parsing is whitespace splitting only (no quote handling, which the VMM never
//! needs), everything after the first `=` is the value, and a repeated key keeps its
//! last value, as the kernel does for its own parameters.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// The prefix that marks our options among the kernel's own.
const PREFIX: &str = "zc.";

/// Every `zc.*` option of a command line, keyed without the `zc.` prefix.
///
/// A bare `zc.flag` (no `=`) has the empty value.
pub fn zc_options(cmdline: &str) -> BTreeMap<String, String> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|word| word.strip_prefix(PREFIX))
        .map(|option| {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            (key.to_string(), value.to_string())
        })
        .collect()
}

/// Which program this `/init` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Inside `zc-vmm`: reports over the COM2 control channel.
    Guest,
    /// The emulated KVM host: mounts the host's root over 9p and runs a command in it.
    Host,
}

impl Role {
    /// The role a raw option map asks for, `Guest` when absent or invalid.
    ///
    /// Used to decide how to report a failure even when the options as a whole do
    /// not parse.
    pub fn lenient(options: &BTreeMap<String, String>) -> Role {
        match options.get("role").map(String::as_str) {
            Some("host") => Role::Host,
            _ => Role::Guest,
        }
    }
}

/// A test hook the VMM's end-to-end tests ask for with `zc.test=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHook {
    /// Make the guest kernel panic (via sysrq).
    Panic,
    /// Never exit: the VMM's timeout must fire.
    Hang,
}

/// The validated `zc.*` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `zc.role`.
    pub role: Role,
    /// `zc.test`.
    pub test: Option<TestHook>,
    /// `zc.exit`, 0 when absent.
    pub exit_code: i32,
    /// `zc.outdir`: absolute, normalised without a trailing `/`; required for `Host`.
    pub outdir: Option<String>,
    /// Keys of `zc.*` options this program does not know (warned about, not fatal,
    /// so that a newer VMM can pass options an older guest ignores).
    pub unknown: Vec<String>,
}

impl Options {
    /// Parses and validates the `zc.*` options of a kernel command line.
    #[cfg(test)]
    pub fn parse(cmdline: &str) -> Result<Options> {
        Options::from_map(&zc_options(cmdline))
    }

    /// Validates an option map from [`zc_options`].
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Options> {
        let role = match map.get("role").map(String::as_str) {
            None | Some("guest") => Role::Guest,
            Some("host") => Role::Host,
            Some(other) => {
                return Err(Error::new(format!(
                    "zc.role={other}: unknown role (expected zc.role=guest or zc.role=host)"
                )))
            }
        };
        let test = match map.get("test").map(String::as_str) {
            None => None,
            Some("panic") => Some(TestHook::Panic),
            Some("hang") => Some(TestHook::Hang),
            Some(other) => {
                return Err(Error::new(format!(
                    "zc.test={other}: unknown test hook (expected zc.test=panic or zc.test=hang)"
                )))
            }
        };
        let exit_code = match map.get("exit") {
            None => 0,
            Some(text) => match text.parse::<u8>() {
                Ok(code) => i32::from(code),
                Err(_) => {
                    return Err(Error::new(format!(
                        "zc.exit={text}: not an exit status (expected a number 0..=255)"
                    )))
                }
            },
        };
        let outdir = map.get("outdir").map(|d| parse_outdir(d)).transpose()?;
        if role == Role::Host && outdir.is_none() {
            return Err(Error::new(
                "zc.role=host needs zc.outdir=<absolute host path of the output directory>",
            ));
        }
        let unknown = map
            .keys()
            .filter(|k| !matches!(k.as_str(), "role" | "test" | "exit" | "outdir"))
            .map(|k| format!("{PREFIX}{k}"))
            .collect();
        Ok(Options {
            role,
            test,
            exit_code,
            outdir,
            unknown,
        })
    }
}

/// Checks `zc.outdir`: it becomes a mount point under `/host`, so it must be an
/// absolute path below `/` without `.`/`..` tricks.
fn parse_outdir(dir: &str) -> Result<String> {
    let bad = |why: &str| Err(Error::new(format!("zc.outdir={dir}: {why}")));
    if !dir.starts_with('/') {
        return bad("must be an absolute path");
    }
    if dir.split('/').any(|part| part == "." || part == "..") {
        return bad("must not contain . or .. components");
    }
    let trimmed = dir.trim_end_matches('/');
    if trimmed.is_empty() {
        // Mounting the writable share on /host itself would hide the host's root.
        return bad("must not be / (the writable share would hide the host's root)");
    }
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "BOOT_IMAGE=/vmlinuz console=ttyS0 panic=-1 quiet\n";

    #[test]
    fn defaults_without_zc_options() {
        let o = Options::parse(DEBIAN).unwrap();
        assert_eq!(o.role, Role::Guest);
        assert_eq!(o.test, None);
        assert_eq!(o.exit_code, 0);
        assert_eq!(o.outdir, None);
        assert!(o.unknown.is_empty());
    }

    #[test]
    fn value_keeps_everything_after_first_equals() {
        let map = zc_options("console=ttyS0 zc.x=a=b zc.flag");
        assert_eq!(map.get("x").map(String::as_str), Some("a=b"));
        assert_eq!(map.get("flag").map(String::as_str), Some(""));
        assert_eq!(map.len(), 2);
    }

    #[test]
    fn repeated_key_last_wins() {
        let o = Options::parse("zc.exit=3 console=ttyS0 zc.exit=7").unwrap();
        assert_eq!(o.exit_code, 7);
    }

    #[test]
    fn ignores_non_zc_and_lookalikes() {
        let map = zc_options("zcx=1 xzc.role=host zc=2 role=host");
        assert!(map.is_empty());
    }

    #[test]
    fn guest_options() {
        let o = Options::parse("console=ttyS0 zc.role=guest zc.test=hang zc.exit=255").unwrap();
        assert_eq!(o.role, Role::Guest);
        assert_eq!(o.test, Some(TestHook::Hang));
        assert_eq!(o.exit_code, 255);
        assert_eq!(
            Options::parse("zc.test=panic").unwrap().test,
            Some(TestHook::Panic)
        );
    }

    #[test]
    fn host_options() {
        let o = Options::parse("zc.role=host zc.outdir=/tmp/out/ zc.future=1").unwrap();
        assert_eq!(o.role, Role::Host);
        assert_eq!(o.outdir.as_deref(), Some("/tmp/out"));
        assert_eq!(o.unknown, vec!["zc.future".to_string()]);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "zc.role=hots",
            "zc.test=crash",
            "zc.exit=",
            "zc.exit=256",
            "zc.exit=-1",
            "zc.exit=x",
            "zc.role=host",
            "zc.role=host zc.outdir=rel/dir",
            "zc.role=host zc.outdir=/",
            "zc.role=host zc.outdir=/a/../etc",
        ] {
            let err = Options::parse(bad).expect_err(bad);
            assert!(err.to_string().starts_with("zc."), "{bad}: {err}");
        }
    }

    #[test]
    fn lenient_role() {
        assert_eq!(
            Role::lenient(&zc_options("zc.role=host zc.exit=x")),
            Role::Host
        );
        assert_eq!(Role::lenient(&zc_options("zc.role=bogus")), Role::Guest);
        assert_eq!(Role::lenient(&zc_options("")), Role::Guest);
    }
}
