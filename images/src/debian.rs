//! Debian kernel packages: which one to use, fetching it with `apt-get download`,
//! unpacking it with `dpkg-deb -x`, and caching the result.
//!
//! Two flavours matter: `cloud` (`linux-image-<abi>-cloud-amd64`, the kernel of the VM
//! under test) and `generic` (`linux-image-<abi>-amd64-unsigned`, the emulated KVM
//! host's kernel, which has `kvm-amd` and 9p). The ABI is `6.1.0-56` on bookworm's 6.1
//! and `6.12.117+deb12` on its 6.12 backport.
//!
//! The default version is whatever the flavour's metapackage depends on now. A pin
//! selects another: an exact ABI, or a prefix such as `6.12` (the highest ABI that
//! starts with it at a `.`/`-`/`+` boundary). The parsing of `apt-cache` output is made
//! of pure functions so it can be tested on captured text.
//!
//! Cache layout: `<cache>/<package>_<debversion>/` holds the unpacked package
//! (`boot/vmlinuz-<release>`, `lib/modules/<release>/...`) plus `kernel.json`. It is
//! unpacked into `<cache>/.tmp-*` and renamed into place, so a directory that exists is
//! complete.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::kernel::{self, KernelInfo, KERNEL_JSON};

/// Which Debian kernel build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `linux-image-<abi>-cloud-amd64`: small, virtio drivers, no 9p or kvm-amd.
    Cloud,
    /// `linux-image-<abi>-amd64-unsigned`: the full generic kernel.
    Generic,
}

impl Flavour {
    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Cloud => "cloud",
            Flavour::Generic => "generic",
        }
    }

    /// The metapackage whose dependency names the current kernel.
    pub fn metapackage(self) -> &'static str {
        match self {
            Flavour::Cloud => "linux-image-cloud-amd64",
            Flavour::Generic => "linux-image-amd64",
        }
    }

    /// Suffix of the package zc downloads, after the ABI.
    fn suffix(self) -> &'static str {
        match self {
            Flavour::Cloud => "-cloud-amd64",
            Flavour::Generic => "-amd64-unsigned",
        }
    }

    /// Suffix of the package the metapackage depends on (the signed generic one).
    fn metapackage_dep_suffix(self) -> &'static str {
        match self {
            Flavour::Cloud => "-cloud-amd64",
            Flavour::Generic => "-amd64",
        }
    }

    /// The package zc downloads for `abi`, e.g. `linux-image-6.1.0-56-amd64-unsigned`.
    pub fn package(self, abi: &str) -> String {
        format!("linux-image-{abi}{}", self.suffix())
    }

    /// The `apt-cache search --names-only` pattern listing this flavour's packages.
    pub fn search_pattern(self) -> String {
        format!("^linux-image-[0-9].*{}$", self.suffix().replace('.', "\\."))
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors finding, fetching or unpacking a Debian kernel.
#[derive(Debug, Error)]
pub enum DebianError {
    /// A needed program is not installed.
    #[error("`{program}` not found; run `{install}` (or pass your own kernel with --kernel PATH)")]
    MissingTool {
        /// The program.
        program: String,
        /// How to install it.
        install: &'static str,
    },
    /// apt's package lists are empty or do not know the package.
    #[error("apt-cache knows no {what}; run `apt-get update` first")]
    AptEmpty {
        /// What was looked for.
        what: String,
    },
    /// No package matches the `--kernel-version` pin.
    #[error("no {flavour} kernel matches --kernel-version {pin}; available as of the last `apt-get update`: {available}")]
    NoMatch {
        /// The flavour.
        flavour: Flavour,
        /// The pin.
        pin: String,
        /// ABIs that exist, highest first (abbreviated).
        available: String,
    },
    /// A command ran but failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its last lines of stderr.
        stderr: String,
    },
    /// Filesystem trouble in the cache.
    #[error(
        "{what} in the kernel cache {path}: {source}; check the --cache directory is writable"
    )]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The unpacked package is not laid out as expected.
    #[error("package {package} unpacked in {path} has {why}; is it a kernel image package?")]
    Layout {
        /// The package.
        package: String,
        /// The unpack directory.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// Reading the kernel image or writing `kernel.json` failed.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
}

impl DebianError {
    /// Whether the error is the user's input (a `--kernel-version` no package
    /// matches), which the binary reports with exit status 2.
    pub fn is_usage(&self) -> bool {
        matches!(self, DebianError::NoMatch { .. })
    }
}

/// Whether `abi` looks like a kernel ABI: `6.1.0-56`, `6.12.117+deb12` (at least three
/// dot-separated numbers, then only numeric `-` parts). This also tells `6.1.0-56`
/// apart from `6.1.0-56-cloud` when listing generic packages, and excludes
/// metapackages such as `linux-image-6.12-cloud-amd64`.
pub fn is_abi(abi: &str) -> bool {
    let mut parts = abi.split('-');
    let base = parts.next().unwrap_or("");
    let version = base.split('+').next().unwrap_or("");
    let nums: Vec<&str> = version.split('.').collect();
    let base_ok = nums.len() >= 3
        && nums
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        && base
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'+' || b == b'~');
    base_ok && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The ABI of a package name with the given suffix, if it is one.
fn abi_of<'a>(package: &'a str, suffix: &str) -> Option<&'a str> {
    package
        .strip_prefix("linux-image-")?
        .strip_suffix(suffix)
        .filter(|abi| is_abi(abi))
}

/// Parses `apt-cache depends <metapackage>` output and returns the ABI of the kernel
/// package it depends on (`  Depends: linux-image-6.1.0-56-cloud-amd64` -> `6.1.0-56`).
pub fn parse_depends(flavour: Flavour, output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let dep = line.strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        abi_of(dep, flavour.metapackage_dep_suffix()).map(str::to_string)
    })
}

/// Parses `apt-cache search --names-only` output (`<package> - <description>` per line)
/// into the ABIs of this flavour's packages, highest first, without duplicates.
pub fn parse_search(flavour: Flavour, output: &str) -> Vec<String> {
    let mut abis: Vec<String> = output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|p| abi_of(p, flavour.suffix()))
        .map(str::to_string)
        .collect();
    abis.sort_by(|a, b| compare_versions(b, a));
    abis.dedup();
    abis
}

/// Picks the ABI a pin selects: an exact match, else the highest ABI that starts with
/// the pin followed by `.`, `-` or `+` (so `6.1` matches `6.1.0-56` but not `6.12.1`).
pub fn select_pin(abis: &[String], pin: &str) -> Option<String> {
    if let Some(exact) = abis.iter().find(|a| *a == pin) {
        return Some(exact.clone());
    }
    abis.iter()
        .filter(|a| {
            a.strip_prefix(pin)
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| matches!(c, '.' | '-' | '+'))
        })
        .max_by(|a, b| compare_versions(a, b))
        .cloned()
}

/// Compares version-like strings piecewise: runs of digits numerically, other runs as
/// text, with `~` sorting before anything (as in Debian). Good enough to order kernel
/// ABIs and package versions (`6.1.0-9` < `6.1.0-56`, `6.12.99` < `6.12.117`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn pieces(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    fn text_cmp(x: &str, y: &str) -> Ordering {
        let key = |c: char| match c {
            '~' => (0, c),
            c if c.is_ascii_alphabetic() => (1, c),
            c => (2, c),
        };
        x.chars().map(key).cmp(y.chars().map(key))
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((false, x), (false, y)) => text_cmp(x, y),
            ((true, _), (false, y)) if y.starts_with('~') => Ordering::Greater,
            ((false, x), (true, _)) if x.starts_with('~') => Ordering::Less,
            ((true, _), (false, _)) => Ordering::Less,
            ((false, _), (true, _)) => Ordering::Greater,
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    let tail = |rest: &[(bool, &str)]| match rest.first() {
        Some((false, t)) if t.starts_with('~') => Ordering::Less,
        Some(_) => Ordering::Greater,
        None => Ordering::Equal,
    };
    match pa.len().cmp(&pb.len()) {
        Ordering::Equal => Ordering::Equal,
        Ordering::Greater => tail(&pa[pb.len()..]),
        Ordering::Less => tail(&pb[pa.len()..]).reverse(),
    }
}

/// Parses `apt-cache show --no-all-versions <pkg>` output: the `Version:` field.
pub fn parse_show_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Runs a program and returns its stdout; a missing program is [`DebianError::MissingTool`].
fn run(cmd: &mut Command, install: &'static str) -> Result<String, DebianError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DebianError::MissingTool { program, install }
        } else {
            DebianError::Command {
                command: line.clone(),
                stderr: e.to_string(),
            }
        }
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(3)
            .collect();
        let mut tail: Vec<&str> = tail.into_iter().rev().collect();
        if tail.is_empty() {
            tail.push("no error output");
        }
        return Err(DebianError::Command {
            command: line,
            stderr: format!("{} ({})", tail.join(" / "), out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const APT_INSTALL: &str = "apt-get install apt (zc fetches kernels with Debian's apt)";

/// The ABI to use for `flavour`: the metapackage's current dependency, or what `pin`
/// selects among the packages apt knows.
pub fn resolve_abi(flavour: Flavour, pin: Option<&str>) -> Result<String, DebianError> {
    match pin {
        None => {
            let meta = flavour.metapackage();
            let out = run(
                Command::new("apt-cache").args(["depends", meta]),
                APT_INSTALL,
            )
            .or_else(|e| match e {
                // apt-cache exits non-zero for an unknown package.
                DebianError::Command { .. } => Ok(String::new()),
                other => Err(other),
            })?;
            parse_depends(flavour, &out).ok_or_else(|| DebianError::AptEmpty {
                what: format!("{meta} (or it depends on no kernel)"),
            })
        }
        Some(pin) => {
            let out = run(
                Command::new("apt-cache").args([
                    "search",
                    "--names-only",
                    &flavour.search_pattern(),
                ]),
                APT_INSTALL,
            )?;
            let abis = parse_search(flavour, &out);
            if abis.is_empty() {
                return Err(DebianError::AptEmpty {
                    what: format!("{} kernel packages ({})", flavour, flavour.package("*")),
                });
            }
            select_pin(&abis, pin).ok_or_else(|| {
                let mut available = abis.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
                if abis.len() > 8 {
                    available.push_str(", ...");
                }
                DebianError::NoMatch {
                    flavour,
                    pin: pin.to_string(),
                    available,
                }
            })
        }
    }
}

/// The version apt would download for `package` (its candidate).
pub fn candidate_version(package: &str) -> Result<String, DebianError> {
    let out = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
        APT_INSTALL,
    )
    .or_else(|e| match e {
        DebianError::Command { .. } => Ok(String::new()),
        other => Err(other),
    })?;
    parse_show_version(&out).ok_or_else(|| DebianError::AptEmpty {
        what: format!("package {package}"),
    })
}

/// The cache directory of one package version.
pub fn cache_dir(cache: &Path, package: &str, deb_version: &str) -> PathBuf {
    cache.join(format!("{package}_{}", deb_version.replace(':', "%3a")))
}

/// Returns the kernel of `flavour` (default or pinned version), downloading and
/// unpacking it into `cache` unless it is already there. `progress` gets one line per
/// step taken.
pub fn fetch(
    cache: &Path,
    flavour: Flavour,
    pin: Option<&str>,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelInfo, DebianError> {
    let abi = resolve_abi(flavour, pin)?;
    let package = flavour.package(&abi);
    let version = candidate_version(&package)?;
    let dir = cache_dir(cache, &package, &version);
    if dir.join(KERNEL_JSON).is_file() {
        progress(&format!(
            "kernel {package} {version}: cached in {}",
            dir.display()
        ));
        return Ok(KernelInfo::load(&dir)?);
    }
    std::fs::create_dir_all(cache).map_err(|source| DebianError::Io {
        what: "cannot create the cache directory",
        path: cache.to_path_buf(),
        source,
    })?;
    let tmp = cache.join(format!(".tmp-{package}_{version}-{}", std::process::id()));
    let result = download_and_unpack(&tmp, &dir, &package, &version, progress);
    // Best effort: whatever happened, leave no temp directory behind.
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn download_and_unpack(
    tmp: &Path,
    dir: &Path,
    package: &str,
    version: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelInfo, DebianError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| DebianError::Io { what, path, source }
    };
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(io("cannot create a temporary directory", tmp))?;
    progress(&format!(
        "kernel {package} {version}: downloading with apt-get"
    ));
    run(
        Command::new("apt-get")
            .args(["download", "-q", &format!("{package}={version}")])
            .current_dir(tmp),
        APT_INSTALL,
    )?;
    let deb = std::fs::read_dir(tmp)
        .map_err(io("cannot list the download directory", tmp))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| DebianError::Layout {
            package: package.to_string(),
            path: tmp.to_path_buf(),
            why: "no .deb after `apt-get download`".into(),
        })?;
    progress(&format!(
        "kernel {package} {version}: unpacking with dpkg-deb"
    ));
    let root = tmp.join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "apt-get install dpkg",
    )?;
    let info = describe_unpacked(&root, package, version)?;
    info.save(&root)?;
    match std::fs::rename(&root, dir) {
        Ok(()) => {}
        // Someone else finished the same package first: use theirs.
        Err(_) if dir.join(KERNEL_JSON).is_file() => {}
        Err(e) => return Err(io("cannot move the unpacked kernel into place", dir)(e)),
    }
    progress(&format!(
        "kernel {package} {version}: cached in {}",
        dir.display()
    ));
    Ok(KernelInfo::load(dir)?)
}

/// Describes an unpacked kernel package in `root`: finds `boot/vmlinuz-<release>` and
/// `lib/modules/<release>`, and reads the version from the image.
pub fn describe_unpacked(
    root: &Path,
    package: &str,
    deb_version: &str,
) -> Result<KernelInfo, DebianError> {
    let layout = |why: String| DebianError::Layout {
        package: package.to_string(),
        path: root.to_path_buf(),
        why,
    };
    let boot = root.join("boot");
    let mut images: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(|_| layout("no boot/ directory".into()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    images.sort();
    let vmlinuz = match images.as_slice() {
        [one] => one.clone(),
        [] => return Err(layout("no boot/vmlinuz-*".into())),
        _ => return Err(layout("several boot/vmlinuz-* images".into())),
    };
    let version = kernel::image_version(&vmlinuz)?;
    let release = kernel::release_of(&version).to_string();
    let named = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("");
    if named != release {
        return Err(layout(format!(
            "boot/vmlinuz-{named} whose header says release {release}"
        )));
    }
    let modules = root.join("lib/modules").join(&release);
    Ok(KernelInfo {
        package: Some(package.to_string()),
        deb_version: Some(deb_version.to_string()),
        release,
        version,
        vmlinuz,
        modules_dir: modules.is_dir().then_some(modules),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    /// Captured on bookworm (2025-11), trimmed.
    const DEPENDS_CLOUD: &str =
        "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
    const DEPENDS_GENERIC: &str = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
    const SEARCH_CLOUD: &str = "\
linux-image-6.12-cloud-amd64-dbg - Debugging symbols for Linux cloud-amd64 configuration (meta-package)
linux-image-6.12.107+deb12-cloud-amd64-dbg - Debug symbols for linux-image-6.12.107+deb12-cloud-amd64
linux-image-6.12.111+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12-cloud-amd64 - Linux for x86-64 cloud (meta-package)
linux-image-6.12.100+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.117+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.12.99+deb12-cloud-amd64 - Linux 6.12 for x86-64 cloud (signed)
linux-image-6.1.0-9-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-55-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-cloud-amd64 - Linux for x86-64 cloud (meta-package)
";
    const SEARCH_GENERIC: &str = "\
linux-image-6.1.0-55-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.1.0-56-cloud-amd64-unsigned - Linux 6.1 for x86-64 cloud
linux-image-6.1.0-56-rt-amd64-unsigned - Linux 6.1 for 64-bit PCs, PREEMPT_RT
linux-image-6.12.115+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-cloud-amd64-unsigned - Linux 6.12 for x86-64 cloud
linux-image-6.12.117+deb12-rt-amd64-unsigned - Linux 6.12 for 64-bit PCs, PREEMPT_RT
";

    #[test]
    fn package_names() {
        assert_eq!(
            Flavour::Cloud.package("6.1.0-56"),
            "linux-image-6.1.0-56-cloud-amd64"
        );
        assert_eq!(
            Flavour::Generic.package("6.12.117+deb12"),
            "linux-image-6.12.117+deb12-amd64-unsigned"
        );
        assert_eq!(
            Flavour::Generic.search_pattern(),
            "^linux-image-[0-9].*-amd64-unsigned$"
        );
    }

    #[test]
    fn default_version_from_metapackage() {
        assert_eq!(
            parse_depends(Flavour::Cloud, DEPENDS_CLOUD).as_deref(),
            Some("6.1.0-56")
        );
        assert_eq!(
            parse_depends(Flavour::Generic, DEPENDS_GENERIC).as_deref(),
            Some("6.1.0-56")
        );
        // Generic must not take a cloud dependency for its own.
        assert_eq!(parse_depends(Flavour::Generic, DEPENDS_CLOUD), None);
        assert_eq!(parse_depends(Flavour::Cloud, ""), None);
        let noisy = "linux-image-amd64\n  PreDepends: linux-image-9.9.9-1-amd64\n |Depends: <linux-image-6.12.117+deb12-amd64>\n";
        assert_eq!(
            parse_depends(Flavour::Generic, noisy).as_deref(),
            Some("6.12.117+deb12")
        );
    }

    #[test]
    fn search_output_keeps_only_the_flavours_real_kernels() {
        assert_eq!(
            parse_search(Flavour::Cloud, SEARCH_CLOUD),
            [
                "6.12.117+deb12",
                "6.12.100+deb12",
                "6.12.99+deb12",
                "6.1.0-56",
                "6.1.0-55",
                "6.1.0-9"
            ]
        );
        assert_eq!(
            parse_search(Flavour::Generic, SEARCH_GENERIC),
            ["6.12.117+deb12", "6.12.115+deb12", "6.1.0-56", "6.1.0-55"]
        );
        assert!(parse_search(Flavour::Cloud, "").is_empty());
    }

    #[rstest]
    #[case::exact_abi("6.1.0-55", Some("6.1.0-55"))]
    #[case::major_minor("6.1", Some("6.1.0-56"))]
    #[case::three_numbers("6.1.0", Some("6.1.0-56"))]
    #[case::newer_series("6.12", Some("6.12.117+deb12"))]
    #[case::patch_level("6.12.99", Some("6.12.99+deb12"))]
    #[case::exact_plus("6.12.100+deb12", Some("6.12.100+deb12"))]
    #[case::not_a_prefix_of_a_number("6.1.0-5", None)]
    #[case::unknown("5.10", None)]
    #[case::only_major("6", Some("6.12.117+deb12"))]
    fn pins(#[case] pin: &str, #[case] expected: Option<&str>) {
        let abis = parse_search(Flavour::Cloud, SEARCH_CLOUD);
        assert_eq!(select_pin(&abis, pin).as_deref(), expected);
    }

    #[rstest]
    #[case("6.1.0-9", "6.1.0-56", Ordering::Less)]
    #[case("6.12.99+deb12", "6.12.117+deb12", Ordering::Less)]
    #[case("6.12.1", "6.1.0-56", Ordering::Greater)]
    #[case("6.1.192-2", "6.1.192-2", Ordering::Equal)]
    #[case("6.12.117-1~deb12u1", "6.12.117-1", Ordering::Less)]
    #[case("6.1.0", "6.1.0-1", Ordering::Less)]
    #[case("1.0a", "1.0", Ordering::Greater)]
    fn version_order(#[case] a: &str, #[case] b: &str, #[case] ord: Ordering) {
        assert_eq!(compare_versions(a, b), ord);
        assert_eq!(compare_versions(b, a), ord.reverse());
    }

    #[test]
    fn abi_shape() {
        for ok in ["6.1.0-56", "6.12.117+deb12", "6.1.0"] {
            assert!(is_abi(ok), "{ok}");
        }
        for bad in [
            "6.12",
            "6.1.0-56-cloud",
            "6.12.117+deb12-rt",
            "cloud",
            "",
            "6.1.x-1",
            "6.1.0-",
        ] {
            assert!(!is_abi(bad), "{bad}");
        }
    }

    #[test]
    fn show_version() {
        let out = "Package: linux-image-6.1.0-56-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\nVersion: 6.1.192-2\nBuilt-Using: linux (= 6.1.192-2)\n";
        assert_eq!(parse_show_version(out).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_show_version("N: Unable to locate package x\n"), None);
        assert_eq!(
            cache_dir(Path::new("/c"), "p", "1:2-3"),
            PathBuf::from("/c/p_1%3a2-3")
        );
    }

    #[test]
    fn describes_an_unpacked_package() {
        let root = tempfile::tempdir().unwrap();
        let rel = "6.1.0-56-cloud-amd64";
        std::fs::create_dir_all(root.path().join("boot")).unwrap();
        std::fs::create_dir_all(root.path().join("lib/modules").join(rel)).unwrap();
        let img = crate::kernel::testutil::fake_bzimage(&format!("{rel} (x@y) #1 SMP"));
        std::fs::write(root.path().join(format!("boot/vmlinuz-{rel}")), &img).unwrap();
        std::fs::write(root.path().join(format!("boot/config-{rel}")), "").unwrap();
        let info = describe_unpacked(root.path(), "linux-image-x", "6.1.192-2").unwrap();
        assert_eq!(info.release, rel);
        assert_eq!(
            info.modules_dir,
            Some(root.path().join("lib/modules").join(rel))
        );
        // An image whose header disagrees with its file name is refused.
        let other = crate::kernel::testutil::fake_bzimage("6.1.0-55-cloud-amd64 #1");
        std::fs::write(root.path().join(format!("boot/vmlinuz-{rel}")), other).unwrap();
        assert!(describe_unpacked(root.path(), "linux-image-x", "1").is_err());
    }

    #[test]
    fn missing_tool_message_says_what_to_install() {
        let e = run(
            &mut Command::new("dpkg-deb-does-not-exist"),
            "apt-get install dpkg",
        )
        .unwrap_err();
        assert!(e.to_string().contains("apt-get install dpkg"), "{e}");
        let e = run(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
    }
}
