//! Kernels built from source, as kernel developers build them.
//!
//! Two ways in:
//!
//! - [`build_source`]: a kernel source tarball (default: Debian's `linux-source-6.1`
//!   package, `/usr/src/linux-source-6.1.tar.xz`) is unpacked into a fresh directory
//!   (a patched build instead reuses the tree of the unpatched build of the same
//!   inputs, which every unpatched build keeps: see `build_patched`),
//!   patched (`patch -p1`, in the order given), configured with `make tinyconfig`
//!   plus zc's Kconfig fragments ([`fragment::ZC_GUEST_FRAGMENT`], what the guest
//!   needs, then [`fragment::ZC_TRIM_FRAGMENT`], what the build leaves out, then the
//!   user's `--fragment`s; merged with the tree's own
//!   `scripts/kconfig/merge_config.sh -m` and `make olddefconfig`, every option
//!   checked afterwards) and built (`make bzImage`, and `modules` if the
//!   config has any). The result is cached, keyed by its inputs ([`BuildKey`]).
//! - [`use_tree`]: a user's own kernel tree, built with its own `.config` (or used as
//!   it is), its image, config and modules staged into an output directory.
//!
//! Cache layout (default `$XDG_CACHE_HOME/zc/kernels`, else `~/.cache/zc/kernels`,
//! outside any clone):
//! ```text
//! <cache>/<source label>-<key16>/   one build; <key16> = first 16 hex digits of the key
//!     kernel.json     the KernelBuild; written last, so its presence means complete
//!     key.json        the BuildKey (the inputs the digest is made of)
//!     bzImage         arch/x86/boot/bzImage
//!     vmlinux         the ELF kernel with symbols (for debugging)
//!     System.map
//!     config-<release>  the final .config (named as beside a packaged kernel)
//!     fragments/      the fragments merged, in order
//!     patches/        the patches applied, in order (NN-<name>)
//!     modules/        INSTALL_MOD_PATH, only when the config has modules
//!     build.log       every command and its output
//!     linux/          unpatched builds: the built tree, kept as the seed of patched builds
//! <cache>/<source label>-<key16>.lock   held while building that key
//! ```
//! A directory without `kernel.json` is an interrupted build: it is removed and
//! rebuilt from scratch. A different input gives a different key and so a fresh
//! directory. A patched build's directory has no tree: it was compiled in its
//! unpatched build's `linux/` (the seed), which gets the patches applied, then
//! reverted, and holds `.zc-patched-build` in between (a seed found with it is
//! rebuilt from scratch).
//!
//! Output contract: `kernel.json` is a [`KernelBuild`]: the fields of
//! [`KernelInfo`] (so `KernelInfo::load` reads it like a Debian kernel's) plus how
//! it was built. `--out DIR` copies `vmlinuz` (the image), `config-<release>`, `modules/` and
//! `kernel.json` to `DIR`, the same layout for source builds and trees.

pub mod fragment;
pub mod run;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::kernel::{self, KernelError, KernelInfo, KERNEL_JSON};
use fragment::{ConfigOption, FragmentSyntaxError, Setting};
pub use run::Runner;
pub use run::{kbuild_step, BuildProgress, Lines};

/// The source package used when none is given: Debian bookworm's default kernel.
pub const DEFAULT_SOURCE_PACKAGE: &str = "linux-source-6.1";

/// Debian packages a kernel build needs (the Makefile's `KERNEL_APT_PACKAGES` lists
/// the same, plus the source package). libelf-dev: objtool, which every x86-64
/// kernel builds; kmod: depmod for `modules_install`.
pub const BUILD_PACKAGES: &[&str] = &[
    "gcc",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
    "patch",
    "kmod",
];

/// The configuration every source build starts from.
pub const BASE_CONFIG: &str = "tinyconfig";

/// zc boots x86-64 kernels; `make tinyconfig` without it would configure 32 bits.
pub const ARCH: &str = "x86_64";

/// Bumped whenever the build recipe changes what it produces, so old builds are not
/// taken for new ones.
const RECIPE: u32 = 1;

/// Errors building or staging a kernel.
#[derive(Debug, Error)]
pub enum KbuildError {
    /// A program the build needs is not installed.
    #[error("`{program}` not found; install the kernel build tools: `apt-get install {packages}` (or `make kernel-deps`)")]
    MissingTool {
        /// The program.
        program: String,
        /// What to install.
        packages: String,
    },
    /// The kernel source tarball is not there.
    #[error("kernel source {path} not found; {hint}")]
    SourceMissing {
        /// The tarball looked for.
        path: PathBuf,
        /// What to do.
        hint: String,
    },
    /// A `--patch` or `--fragment` argument names nothing usable.
    #[error("{what} {path}: {why}")]
    BadInput {
        /// `--patch` or `--fragment`.
        what: &'static str,
        /// The argument.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A fragment has a line that is not a setting.
    #[error(transparent)]
    Fragment(#[from] FragmentSyntaxError),
    /// Filesystem trouble.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A build command failed.
    #[error("{phase} failed (`{command}`, {status}); full log: {log}; its last lines:\n{tail}")]
    Command {
        /// The phase.
        phase: String,
        /// The command line.
        command: String,
        /// How it ended.
        status: String,
        /// The build log.
        log: PathBuf,
        /// The last lines of its output.
        tail: String,
    },
    /// `make olddefconfig` dropped options the fragments ask for.
    #[error("the kernel configuration lost {} option(s) the fragments ask for (config: {config}):\n{}\nturn on what they depend on in the fragment (or drop them), then build again", .dropped.len(), .dropped.join("\n"))]
    Dropped {
        /// One line per option: what was asked, what came out, what it depends on.
        dropped: Vec<String>,
        /// The final `.config`.
        config: PathBuf,
    },
    /// `--tree` is not a kernel tree, or lacks what is needed.
    #[error("--tree {path}: {why}")]
    Tree {
        /// The path given.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The built image is not what was expected.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A `kernel.json` cannot be read or written.
    #[error("{path}: {why}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

impl KbuildError {
    /// Whether the user's input is at fault (exit status 2), not the build.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            KbuildError::BadInput { .. }
                | KbuildError::Fragment(_)
                | KbuildError::Tree { .. }
                | KbuildError::SourceMissing { .. }
        )
    }
}

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(std::io::Error) -> KbuildError {
    let (what, path) = (what.into(), path.to_path_buf());
    move |source| KbuildError::Io { what, path, source }
}

/// The default cache: `$XDG_CACHE_HOME/zc/kernels` when that is an absolute path,
/// else `$HOME/.cache/zc/kernels` (the XDG base directory rules).
pub fn default_cache_dir(
    xdg_cache_home: Option<&std::ffi::OsStr>,
    home: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    let xdg = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| home.map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("zc").join("kernels"))
}

/// Lower-case hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, KbuildError> {
    let mut file = std::fs::File::open(path).map_err(io_err("cannot read", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn sha256_text(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

// ---------------------------------------------------------------------------------
// Inputs

/// Where the kernel source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A Debian `linux-source-<version>` package: `/usr/src/<package>.tar.xz`.
    Package(String),
    /// Any kernel source tarball (one top-level directory, as kernel.org's and
    /// Debian's are).
    Tarball(PathBuf),
}

/// The source, resolved and identified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The tarball.
    pub tarball: PathBuf,
    /// Its SHA-256: the key's identity of the source.
    pub sha256: String,
    /// The Debian package it came from, if any.
    pub package: Option<String>,
    /// That package's version (e.g. `6.1.192-3`).
    pub package_version: Option<String>,
    /// `make kernelversion` of the unpacked tree (e.g. `6.1.192`), once built.
    pub kernelversion: Option<String>,
}

impl SourceInfo {
    /// A short name for directory names: `linux-source-6.1_6.1.192-3`, or the
    /// tarball's name without its extensions.
    pub fn label(&self) -> String {
        let raw = match (&self.package, &self.package_version) {
            (Some(p), Some(v)) => format!("{p}_{v}"),
            _ => {
                let name = self
                    .tarball
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let stem = [".tar.xz", ".tar.gz", ".tar.zst", ".tar.bz2", ".tgz", ".tar"]
                    .iter()
                    .find_map(|ext| name.strip_suffix(ext))
                    .unwrap_or(&name)
                    .to_string();
                stem
            }
        };
        sanitize(&raw, 48)
    }
}

/// Keeps `[A-Za-z0-9._+-]`, maps the rest to `_`, and cuts to `max` bytes.
fn sanitize(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(max);
    if out.is_empty() {
        out.push_str("linux");
    }
    out
}

/// `/usr/src/<package>.tar.xz`, where Debian's `linux-source-*` packages put it.
pub fn package_tarball(package: &str) -> PathBuf {
    PathBuf::from("/usr/src").join(format!("{package}.tar.xz"))
}

fn is_root() -> bool {
    // The effective uid from /proc/self/status: std has no geteuid, and this crate
    // forbids unsafe code (libc).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// What a file's SHA-256 was when it had this size and modification time: hashing a
/// 140 MB tarball on every cached run would cost most of that run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HashMemo {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

fn file_stamp(path: &Path) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((meta.len(), mtime.as_nanos()))
}

/// SHA-256 of `path`, remembered in `memo` (a JSON list) by path, size and
/// modification time; a changed file is hashed again.
pub fn sha256_file_memo(path: &Path, memo: Option<&Path>) -> Result<String, KbuildError> {
    let Some(memo) = memo else {
        return sha256_file(path);
    };
    let mut known: Vec<HashMemo> = std::fs::read_to_string(memo)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let stamp = file_stamp(path);
    if let Some((size, mtime_ns)) = stamp {
        if let Some(m) = known
            .iter()
            .find(|m| m.path == path && m.size == size && m.mtime_ns == mtime_ns)
        {
            return Ok(m.sha256.clone());
        }
    }
    let sha256 = sha256_file(path)?;
    if let Some((size, mtime_ns)) = stamp {
        known.retain(|m| m.path != path);
        known.push(HashMemo {
            path: path.to_path_buf(),
            size,
            mtime_ns,
            sha256: sha256.clone(),
        });
        // Best effort: without the memo the next run hashes again, nothing worse.
        let _ = std::fs::write(
            memo,
            serde_json::to_string_pretty(&known).unwrap_or_default(),
        );
    }
    Ok(sha256)
}

/// Finds (installing the Debian package if needed and possible) and hashes the
/// source; `memo` remembers the hash (see [`sha256_file_memo`]).
pub fn resolve_source(
    spec: &SourceSpec,
    memo: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<SourceInfo, KbuildError> {
    let (tarball, package) = match spec {
        SourceSpec::Tarball(path) => {
            if !path.is_file() {
                return Err(KbuildError::SourceMissing {
                    path: path.clone(),
                    hint: "pass a kernel source tarball (linux-*.tar.xz) with --source".into(),
                });
            }
            (std::path::absolute(path).unwrap_or(path.clone()), None)
        }
        SourceSpec::Package(package) => {
            let tarball = package_tarball(package);
            if !tarball.is_file() {
                let install = format!("apt-get install {package}");
                if !is_root() {
                    return Err(KbuildError::SourceMissing {
                        path: tarball,
                        hint: format!(
                            "run `sudo {install}` (or `make kernel-deps`), or pass --source FILE"
                        ),
                    });
                }
                progress(&format!(
                    "kernel source {} is missing: installing {package} with apt-get",
                    tarball.display()
                ));
                let status = Command::new("apt-get")
                    .args(["install", "-y", "-q", "--no-install-recommends", package])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status();
                if !status.is_ok_and(|s| s.success()) || !tarball.is_file() {
                    return Err(KbuildError::SourceMissing {
                        path: tarball,
                        hint: format!(
                            "`{install}` did not provide it; run `apt-get update` and try again, or pass --source FILE"
                        ),
                    });
                }
            }
            (tarball, Some(package.clone()))
        }
    };
    let sha256 = sha256_file_memo(&tarball, memo)?;
    let package_version = package.as_deref().and_then(dpkg_version);
    Ok(SourceInfo {
        tarball,
        sha256,
        package,
        package_version,
        kernelversion: None,
    })
}

/// One patch applied before configuring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its SHA-256 (what the key uses: renaming a patch does not rebuild).
    pub sha256: String,
}

/// The patches to apply, in order: each argument is a patch file, or a directory
/// whose `*.patch` files are taken in name order. Arguments keep their order.
pub fn resolve_patches(args: &[PathBuf]) -> Result<Vec<PatchFile>, KbuildError> {
    let mut out = Vec::new();
    for arg in args {
        let bad = |why: String| KbuildError::BadInput {
            what: "--patch",
            path: arg.clone(),
            why,
        };
        let files = if arg.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(arg)
                .map_err(|e| bad(format!("cannot list it: {e}")))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "patch"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(bad("holds no *.patch file".into()));
            }
            files
        } else if arg.is_file() {
            vec![arg.clone()]
        } else {
            return Err(bad(
                "does not exist; pass a patch file (applied with patch -p1) or a directory of *.patch".into(),
            ));
        };
        for file in files {
            let sha256 = sha256_file(&file)?;
            out.push(PatchFile {
                path: std::path::absolute(&file).unwrap_or(file),
                sha256,
            });
        }
    }
    Ok(out)
}

/// One fragment merged onto the base config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentFile {
    /// Its name (`zc-guest.config`) or the path it was read from.
    pub name: String,
    /// SHA-256 of its text.
    pub sha256: String,
    /// The text. Not stored in `kernel.json` (a source build keeps it in
    /// `fragments/`), so empty in a loaded [`KernelBuild`].
    #[serde(skip)]
    pub text: String,
}

impl FragmentFile {
    /// zc's own fragment.
    pub fn zc_guest() -> Self {
        Self::new(
            fragment::ZC_GUEST_FRAGMENT_NAME,
            fragment::ZC_GUEST_FRAGMENT,
        )
    }

    /// What zc turns off in a tinyconfig build, for build time.
    pub fn zc_trim() -> Self {
        Self::new(fragment::ZC_TRIM_FRAGMENT_NAME, fragment::ZC_TRIM_FRAGMENT)
    }

    /// The fragments zc merges onto tinyconfig, in order: the guest's, then the trim.
    pub fn zc_defaults() -> Vec<Self> {
        vec![Self::zc_guest(), Self::zc_trim()]
    }

    /// A fragment from its text.
    pub fn new(name: &str, text: &str) -> Self {
        Self {
            name: name.to_string(),
            sha256: sha256_text(text),
            text: text.to_string(),
        }
    }

    /// Reads a user's fragment (`--fragment FILE`), checking its syntax.
    pub fn read(path: &Path) -> Result<Self, KbuildError> {
        let text = std::fs::read_to_string(path).map_err(|e| KbuildError::BadInput {
            what: "--fragment",
            path: path.to_path_buf(),
            why: format!("cannot read it ({e}); pass a Kconfig fragment (CONFIG_X=y lines)"),
        })?;
        let name = path.display().to_string();
        fragment::parse_fragment(&text, &name)?;
        Ok(Self::new(&name, &text))
    }

    fn options(&self) -> Result<Vec<ConfigOption>, KbuildError> {
        Ok(fragment::parse_fragment(&self.text, &self.name)?)
    }
}

/// The compiler and linker that build the kernel (their versions are in the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toolchain {
    /// First line of `gcc --version`.
    pub compiler: String,
    /// First line of `ld --version`.
    pub linker: String,
}

fn first_line_of(program: &str) -> Result<String, KbuildError> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|_| KbuildError::MissingTool {
            program: program.to_string(),
            packages: BUILD_PACKAGES.join(" "),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

impl Toolchain {
    /// Asks `gcc` and `ld` for their versions.
    pub fn detect() -> Result<Self, KbuildError> {
        Ok(Self {
            compiler: first_line_of("gcc")?,
            linker: first_line_of("ld")?,
        })
    }
}

/// Checks that the programs and headers a kernel build runs are there, before
/// anything is unpacked.
pub fn check_build_tools(need_patch: bool) -> Result<(), KbuildError> {
    let mut programs = vec!["make", "gcc", "flex", "bison", "bc", "tar", "xz", "perl"];
    if need_patch {
        programs.push("patch");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for program in programs {
        let found = std::env::split_paths(&path).any(|dir| dir.join(program).is_file());
        if !found {
            return Err(KbuildError::MissingTool {
                program: program.to_string(),
                packages: BUILD_PACKAGES.join(" "),
            });
        }
    }
    if !Path::new("/usr/include/gelf.h").is_file() && !Path::new("/usr/include/libelf.h").is_file()
    {
        return Err(KbuildError::MissingTool {
            program: "libelf headers (gelf.h, for objtool)".into(),
            packages: BUILD_PACKAGES.join(" "),
        });
    }
    Ok(())
}

/// Everything a source build's output depends on. Its digest names the build's
/// directory: equal keys mean the cached build is the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildKey {
    /// The recipe's version ([`RECIPE`]).
    pub recipe: u32,
    /// `ARCH=`.
    pub arch: String,
    /// The base configuration target.
    pub base_config: String,
    /// SHA-256 of the source tarball.
    pub source_sha256: String,
    /// SHA-256 of each fragment, in merge order.
    pub fragments: Vec<String>,
    /// SHA-256 of each patch, in application order.
    pub patches: Vec<String>,
    /// `LOCALVERSION=` (part of the release string).
    pub localversion: String,
    /// The compiler and linker.
    pub toolchain: Toolchain,
}

impl BuildKey {
    /// The key's SHA-256, hex: over its JSON form, whose field order is fixed.
    pub fn digest(&self) -> String {
        sha256_text(&serde_json::to_string(self).expect("BuildKey serialises"))
    }
}

/// The release suffix when none is given: `-zc`, or `-zc-<first patch's name>`
/// (`+N` more when there are several) so patched kernels tell themselves apart in
/// reports. At most 40 bytes, which keeps the release under `uname`'s 64.
pub fn default_localversion(patches: &[PatchFile]) -> String {
    let Some(first) = patches.first() else {
        return "-zc".into();
    };
    let stem = first
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut lv = format!("-zc-{}", sanitize(&stem, 30));
    if patches.len() > 1 {
        lv.push_str(&format!("+{}", patches.len() - 1));
    }
    lv.truncate(40);
    lv
}

// ---------------------------------------------------------------------------------
// Output contract

/// How a kernel was obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BuildSource {
    /// Built by zc from a tarball.
    Tarball(SourceInfo),
    /// A user's tree.
    Tree {
        /// The tree.
        path: PathBuf,
        /// `git describe --always --dirty` of it, when it is a git checkout.
        git: Option<String>,
    },
}

/// What `zc-image build-kernel` built, written as `kernel.json` beside the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelBuild {
    /// Image, release, version and modules, as for any kernel (flattened, so a
    /// reader of [`KernelInfo`] reads this file too).
    #[serde(flatten)]
    pub kernel: KernelInfo,
    /// The final `.config`.
    pub config: Option<PathBuf>,
    /// Where the source came from.
    pub source: BuildSource,
    /// The base configuration (`tinyconfig`), when zc configured the kernel.
    pub base_config: Option<String>,
    /// The fragments merged, in order (empty for a tree's own config).
    pub fragments: Vec<FragmentFile>,
    /// The patches applied, in order.
    pub patches: Vec<PatchFile>,
    /// `LOCALVERSION=` given to make, if any.
    pub localversion: Option<String>,
    /// The compiler and linker.
    pub toolchain: Toolchain,
    /// The key's digest (source builds only).
    pub key: Option<String>,
    /// For a patched build: the key of the unpatched build whose tree it was
    /// rebuilt in (only what the patches touch was compiled again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_from: Option<String>,
    /// How long the build took, in seconds.
    pub build_seconds: f64,
    /// When it finished (seconds since the Unix epoch).
    pub built_at: u64,
    /// The build log.
    pub log: PathBuf,
}

impl KernelBuild {
    /// Writes `dir/kernel.json` (through a temporary file and a rename), with paths
    /// inside `dir` stored relative to it.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, KbuildError> {
        let rel = |p: &Path| {
            p.strip_prefix(dir)
                .map(Path::to_path_buf)
                .unwrap_or(p.to_path_buf())
        };
        let mut stored = self.clone();
        stored.kernel.vmlinuz = rel(&self.kernel.vmlinuz);
        stored.kernel.modules_dir = self.kernel.modules_dir.as_deref().map(rel);
        stored.config = self.config.as_deref().map(rel);
        stored.log = rel(&self.log);
        let path = dir.join(KERNEL_JSON);
        let tmp = dir.join(format!(".{KERNEL_JSON}.tmp"));
        let text = serde_json::to_string_pretty(&stored).expect("KernelBuild serialises") + "\n";
        std::fs::write(&tmp, text).map_err(io_err("cannot write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("cannot move into place", &path))?;
        Ok(path)
    }

    /// Reads `dir/kernel.json`, making its paths absolute; `None` when there is none
    /// or it does not describe a complete build (its image is gone).
    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join(KERNEL_JSON)).ok()?;
        let mut b: KernelBuild = serde_json::from_str(&text).ok()?;
        let dir = std::path::absolute(dir).ok()?;
        b.kernel.vmlinuz = dir.join(&b.kernel.vmlinuz);
        b.kernel.modules_dir = b.kernel.modules_dir.map(|m| dir.join(m));
        b.config = b.config.map(|c| dir.join(c));
        b.log = dir.join(&b.log);
        b.kernel.vmlinuz.is_file().then_some(b)
    }
}

/// The result of a `build-kernel` run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The directory holding the image and `kernel.json` (the cache entry, or the
    /// staged copy with `--out`).
    pub dir: PathBuf,
    /// True when nothing was built: the cache had it.
    pub cached: bool,
    /// What was built.
    #[serde(flatten)]
    pub build: KernelBuild,
}

// ---------------------------------------------------------------------------------
// Source builds

/// A kernel to build from source.
#[derive(Debug, Clone)]
pub struct SourceBuildRequest {
    /// The source.
    pub source: SourceSpec,
    /// Patch files or directories of them, in order.
    pub patches: Vec<PathBuf>,
    /// Fragments merged after zc's, in order (a later one wins).
    pub extra_fragments: Vec<PathBuf>,
    /// `LOCALVERSION=`; default [`default_localversion`].
    pub localversion: Option<String>,
    /// The cache directory.
    pub cache: PathBuf,
    /// `make -j`.
    pub jobs: usize,
    /// Also copy the result to this directory.
    pub out: Option<PathBuf>,
}

/// Everything resolved about a source build before it runs.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    /// The source.
    pub source: SourceInfo,
    /// The fragments, zc's first.
    pub fragments: Vec<FragmentFile>,
    /// The patches, in order.
    pub patches: Vec<PatchFile>,
    /// `LOCALVERSION=`.
    pub localversion: String,
    /// The compiler and linker.
    pub toolchain: Toolchain,
}

impl SourcePlan {
    /// The build key of this plan.
    pub fn key(&self) -> BuildKey {
        BuildKey {
            recipe: RECIPE,
            arch: ARCH.into(),
            base_config: BASE_CONFIG.into(),
            source_sha256: self.source.sha256.clone(),
            fragments: self.fragments.iter().map(|f| f.sha256.clone()).collect(),
            patches: self.patches.iter().map(|p| p.sha256.clone()).collect(),
            localversion: self.localversion.clone(),
            toolchain: self.toolchain.clone(),
        }
    }

    /// The build's directory name: `<source label>-<first 16 hex digits of the key>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.source.label(), &self.key().digest()[..16])
    }

    /// What the fragments ask for together.
    pub fn requested(&self) -> Result<Vec<ConfigOption>, KbuildError> {
        let parsed = self
            .fragments
            .iter()
            .map(FragmentFile::options)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(fragment::merge(&parsed))
    }
}

/// Resolves a request's inputs (source, patches, fragments, toolchain).
pub fn plan(
    req: &SourceBuildRequest,
    progress: &mut dyn FnMut(&str),
) -> Result<SourcePlan, KbuildError> {
    let patches = resolve_patches(&req.patches)?;
    let mut fragments = FragmentFile::zc_defaults();
    for path in &req.extra_fragments {
        fragments.push(FragmentFile::read(path)?);
    }
    check_build_tools(!patches.is_empty())?;
    let toolchain = Toolchain::detect()?;
    std::fs::create_dir_all(&req.cache)
        .map_err(io_err("cannot create the kernel cache", &req.cache))?;
    let memo = req.cache.join("source-sha256.json");
    let source = resolve_source(&req.source, Some(&memo), progress)?;
    let localversion = req
        .localversion
        .clone()
        .unwrap_or_else(|| default_localversion(&patches));
    Ok(SourcePlan {
        source,
        fragments,
        patches,
        localversion,
        toolchain,
    })
}

fn make(tree: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.current_dir(tree);
    cmd
}

/// `make ARCH=x86_64 LOCALVERSION=<lv>` in `tree`, with a build user and host that
/// do not leak the machine's names into the version string.
fn make_source(tree: &Path, localversion: &str) -> Command {
    let mut cmd = make(tree);
    cmd.arg(format!("ARCH={ARCH}"))
        .arg(format!("LOCALVERSION={localversion}"))
        .env("KBUILD_BUILD_USER", "zc")
        .env("KBUILD_BUILD_HOST", "zc-image");
    cmd
}

/// Builds the kernel `req` describes, or finds it in the cache.
pub fn build_source(
    req: &SourceBuildRequest,
    progress: &mut dyn BuildProgress,
) -> Result<Outcome, KbuildError> {
    let plan = plan(req, &mut |l: &str| progress.phase(l))?;
    build_planned(&plan, req, progress)
}

/// Builds a resolved plan (see [`plan`]), or finds it in the cache.
pub fn build_planned(
    plan: &SourcePlan,
    req: &SourceBuildRequest,
    progress: &mut dyn BuildProgress,
) -> Result<Outcome, KbuildError> {
    std::fs::create_dir_all(&req.cache)
        .map_err(io_err("cannot create the kernel cache", &req.cache))?;
    let name = plan.dir_name();
    let dir = req.cache.join(&name);
    let lock = lock_entry(&req.cache, &name, progress)?;
    let cached = cached_build(plan, &dir);
    let outcome = match cached {
        Some(build) => Outcome {
            dir: dir.clone(),
            cached: true,
            build,
        },
        None => {
            let build = if plan.patches.is_empty() {
                build_unpatched(plan, &dir, req, progress)?
            } else {
                build_patched(plan, &dir, req, progress)?
            };
            Outcome {
                dir: dir.clone(),
                cached: false,
                build,
            }
        }
    };
    drop(lock);
    match &req.out {
        Some(out) => stage_copy(&outcome, out),
        None => Ok(outcome),
    }
}

/// A held `<cache>/<name>.lock`, released when dropped.
struct EntryLock(std::fs::File);

impl Drop for EntryLock {
    fn drop(&mut self) {
        // Unlock explicitly rather than only closing: a child another thread is
        // forking at that moment holds a duplicate of the descriptor until it
        // execs, and the lock would live on in it for that long.
        let _ = self.0.unlock();
    }
}

/// Takes `<cache>/<name>.lock`, waiting (and saying so) while another zc-image
/// holds it.
fn lock_entry(
    cache: &Path,
    name: &str,
    progress: &mut dyn BuildProgress,
) -> Result<EntryLock, KbuildError> {
    let lock_path = cache.join(format!("{name}.lock"));
    let lock = std::fs::File::create(&lock_path).map_err(io_err("cannot create", &lock_path))?;
    if lock.try_lock().is_err() {
        progress.phase(&format!(
            "waiting for another zc-image that is building {name}"
        ));
        lock.lock().map_err(io_err("cannot lock", &lock_path))?;
    }
    Ok(EntryLock(lock))
}

fn cached_build(plan: &SourcePlan, dir: &Path) -> Option<KernelBuild> {
    let digest = plan.key().digest();
    KernelBuild::load(dir).filter(|b| b.key.as_deref() == Some(digest.as_str()))
}

/// Present in a seed tree while a patched build has its patches applied there; a
/// tree that still has it was left mid-build and is not used again.
pub const SEED_IN_USE: &str = ".zc-patched-build";

/// The unpatched build a patched one is rebuilt from: the same source, fragments
/// and compiler, no patches, the default release suffix.
pub fn seed_plan(plan: &SourcePlan) -> SourcePlan {
    SourcePlan {
        patches: Vec::new(),
        localversion: default_localversion(&[]),
        ..plan.clone()
    }
}

/// The seed tree of an unpatched cache entry, if it is complete and clean.
fn seed_tree(dir: &Path) -> Option<PathBuf> {
    let tree = dir.join("linux");
    (tree.join("Makefile").is_file() && !tree.join(SEED_IN_USE).exists()).then_some(tree)
}

/// A fresh cache entry in `dir`: an interrupted one removed, `key.json` written,
/// the build log opened.
fn start_entry<'a>(
    plan: &SourcePlan,
    dir: &Path,
    progress: &'a mut dyn BuildProgress,
) -> Result<Runner<'a>, KbuildError> {
    if dir.exists() {
        progress.phase(&format!(
            "removing the interrupted or incomplete build in {}",
            dir.display()
        ));
        std::fs::remove_dir_all(dir).map_err(io_err("cannot remove", dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
    let key = plan.key();
    write(
        dir.join("key.json"),
        &(serde_json::to_string_pretty(&key).expect("key") + "\n"),
    )?;
    let mut r = Runner::new(&dir.join("build.log"), progress)?;
    r.note(&format!("zc-image build-kernel: key {}", key.digest()));
    Ok(r)
}

/// An unpatched build: the source unpacked into `dir/linux`, configured, built.
/// The tree stays (about 1.6 GB for the default kernel): it is the seed every
/// patched build of the same inputs is rebuilt in ([`build_patched`]).
fn build_unpatched(
    plan: &SourcePlan,
    dir: &Path,
    req: &SourceBuildRequest,
    progress: &mut dyn BuildProgress,
) -> Result<KernelBuild, KbuildError> {
    let start = Instant::now();
    let mut r = start_entry(plan, dir, progress)?;
    let tree = dir.join("linux");
    std::fs::create_dir_all(&tree).map_err(io_err("cannot create", &tree))?;
    let mut tar = Command::new("tar");
    tar.arg("-xf")
        .arg(&plan.source.tarball)
        .arg("-C")
        .arg(&tree)
        .arg("--strip-components=1");
    r.run(&format!("unpack {}", plan.source.tarball.display()), tar)?;
    if !tree.join("Makefile").is_file() || !tree.join("Kconfig").is_file() {
        return Err(KbuildError::SourceMissing {
            path: plan.source.tarball.clone(),
            hint: "it does not unpack to a kernel tree (no top-level Makefile and Kconfig)".into(),
        });
    }
    let built = configure_and_compile(&mut r, &tree, dir, plan, req.jobs)?;
    drop(r);
    built.finish(plan, dir, start, None)
}

/// A patched build, rebuilt incrementally in the seed tree of the unpatched build
/// of the same inputs (built first when the cache lacks it): the patches applied,
/// configured, `make` rebuilding only what they touch, the outputs collected, and
/// the patches reverted. A copy of the tree would not do: objtool's build records
/// absolute paths, so a tree at another path rebuilds objtool and with it every
/// object. While the patches are applied the tree holds [`SEED_IN_USE`]; a tree
/// left with it (an interrupted build, a failed revert) is rebuilt from scratch
/// the next time it is needed.
fn build_patched(
    plan: &SourcePlan,
    dir: &Path,
    req: &SourceBuildRequest,
    progress: &mut dyn BuildProgress,
) -> Result<KernelBuild, KbuildError> {
    let start = Instant::now();
    let seed = seed_plan(plan);
    let seed_name = seed.dir_name();
    let seed_dir = req.cache.join(&seed_name);
    let _seed_lock = lock_entry(&req.cache, &seed_name, progress)?;
    let tree = match cached_build(&seed, &seed_dir).and_then(|_| seed_tree(&seed_dir)) {
        Some(tree) => tree,
        None => {
            progress.phase(&format!(
                "building the unpatched kernel first ({seed_name}): patched builds are rebuilt in its tree"
            ));
            progress.phase_done();
            build_unpatched(&seed, &seed_dir, req, progress)?;
            seed_tree(&seed_dir).ok_or_else(|| KbuildError::Json {
                path: seed_dir.join("linux"),
                why: "the unpatched build left no tree".into(),
            })?
        }
    };
    let mut r = start_entry(plan, dir, progress)?;
    r.note(&format!("rebuilding in the seed tree {}", tree.display()));
    let in_use = tree.join(SEED_IN_USE);
    write(in_use.clone(), &format!("{}\n", plan.key().digest()))?;
    let mut applied = Vec::new();
    let built = apply_patches(
        &mut r,
        &tree,
        &plan.patches,
        &dir.join("patches"),
        &mut applied,
    )
    .and_then(|()| configure_and_compile(&mut r, &tree, dir, plan, req.jobs));
    // Revert whatever went in, whether the build worked or not; only a clean
    // revert makes the tree a seed again.
    let reverted = revert_patches(&mut r, &tree, &applied);
    if reverted.is_ok() {
        std::fs::remove_file(&in_use).map_err(io_err("cannot remove", &in_use))?;
    }
    let built = built?;
    reverted?;
    drop(r);
    built.finish(plan, dir, start, Some(seed.key().digest()))
}

/// What [`configure_and_compile`] collected into a cache entry.
struct Compiled {
    release: String,
    version: String,
    kernelversion: String,
    bzimage: PathBuf,
    config: PathBuf,
    modules_dir: Option<PathBuf>,
}

impl Compiled {
    /// Writes the entry's `kernel.json`.
    fn finish(
        self,
        plan: &SourcePlan,
        dir: &Path,
        start: Instant,
        rebuilt_from: Option<String>,
    ) -> Result<KernelBuild, KbuildError> {
        let mut source = plan.source.clone();
        source.kernelversion = Some(self.kernelversion);
        let build = KernelBuild {
            kernel: KernelInfo {
                package: None,
                deb_version: None,
                release: self.release,
                version: self.version,
                vmlinuz: self.bzimage,
                modules_dir: self.modules_dir,
            },
            config: Some(self.config),
            source: BuildSource::Tarball(source),
            base_config: Some(BASE_CONFIG.into()),
            fragments: plan.fragments.clone(),
            patches: plan.patches.clone(),
            localversion: Some(plan.localversion.clone()),
            toolchain: plan.toolchain.clone(),
            key: Some(plan.key().digest()),
            rebuilt_from,
            build_seconds: start.elapsed().as_secs_f64(),
            built_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            log: dir.join("build.log"),
        };
        build.save(dir)?;
        Ok(build)
    }
}

/// Configures `tree` ([`configure`]), builds it, and copies the image, vmlinux,
/// System.map, config and modules into `dir`.
fn configure_and_compile(
    r: &mut Runner<'_>,
    tree: &Path,
    dir: &Path,
    plan: &SourcePlan,
    jobs: usize,
) -> Result<Compiled, KbuildError> {
    let kernelversion = r.capture({
        let mut c = make(tree);
        c.args(["-s", "kernelversion"]);
        c
    })?;
    configure(r, tree, dir, plan)?;

    let config_text = read(&tree.join(".config"))?;
    let config = fragment::parse_config(&config_text);
    let has_modules = config.get("CONFIG_MODULES") == Some(&Setting::Value("y".into()));
    let jobs = format!("-j{}", jobs.max(1));
    r.run(&format!("make {jobs} bzImage (the long part)"), {
        let mut c = make_source(tree, &plan.localversion);
        c.args([jobs.as_str(), "bzImage"]);
        c
    })?;
    let mut modules_dir = None;
    if has_modules {
        r.run("make modules", {
            let mut c = make_source(tree, &plan.localversion);
            c.args([jobs.as_str(), "modules"]);
            c
        })?;
        if has_built_modules(tree) {
            let install = dir.join("modules");
            let mut c = make_source(tree, &plan.localversion);
            c.arg("modules_install")
                .arg(format!("INSTALL_MOD_PATH={}", install.display()));
            r.run("make modules_install", c)?;
            modules_dir = Some(install);
        }
    }
    let release = r.capture({
        let mut c = make_source(tree, &plan.localversion);
        c.args(["-s", "kernelrelease"]);
        c
    })?;

    r.phase("collect bzImage, vmlinux, System.map and config");
    let bzimage = dir.join("bzImage");
    copy(&tree.join("arch/x86/boot/bzImage"), &bzimage)?;
    copy(&tree.join("vmlinux"), &dir.join("vmlinux"))?;
    copy(&tree.join("System.map"), &dir.join("System.map"))?;
    let config_copy = dir.join(config_name(&release));
    copy(&tree.join(".config"), &config_copy)?;
    let version = kernel::image_version(&bzimage)?;
    if kernel::release_of(&version) != release {
        return Err(KbuildError::Json {
            path: bzimage,
            why: format!(
                "the image says release {} but `make kernelrelease` says {release}",
                kernel::release_of(&version)
            ),
        });
    }
    let modules_dir = modules_dir.map(|m| m.join("lib/modules").join(&release));
    r.phase_done();
    Ok(Compiled {
        release,
        version,
        kernelversion,
        bzimage,
        config: config_copy,
        modules_dir,
    })
}

/// Reverts, last first, the patches [`apply_patches`] applied to `tree` (only
/// those that went in: with its dry run first, a patch that fails leaves nothing).
fn revert_patches(r: &mut Runner<'_>, tree: &Path, applied: &[PathBuf]) -> Result<(), KbuildError> {
    for kept in applied.iter().rev() {
        let name = kept.file_name().unwrap_or_default().to_string_lossy();
        let mut cmd = Command::new("patch");
        cmd.current_dir(tree)
            .args(["-p1", "-R", "--batch", "--fuzz=0", "-i"])
            .arg(kept);
        r.run(&format!("revert {name}"), cmd)?;
    }
    Ok(())
}

/// Applies `patches` in order with `patch -p1`, keeping a copy of each in
/// `keep_dir` (`NN-<name>`), so the build directory says what went in; pushes
/// each kept copy onto `applied` once it is in, so that a caller can revert
/// exactly those when a later one fails.
pub fn apply_patches(
    r: &mut Runner<'_>,
    tree: &Path,
    patches: &[PatchFile],
    keep_dir: &Path,
    applied: &mut Vec<PathBuf>,
) -> Result<(), KbuildError> {
    for (i, p) in patches.iter().enumerate() {
        std::fs::create_dir_all(keep_dir).map_err(io_err("cannot create", keep_dir))?;
        let name = p
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kept = keep_dir.join(format!("{:02}-{name}", i + 1));
        std::fs::copy(&p.path, &kept).map_err(io_err("cannot copy the patch to", &kept))?;
        // --fuzz=0: a patch that only applies by ignoring context lines may change
        // something other than what its author meant; better to stop. The dry run
        // first: a patch that fails half-way leaves the hunks before the failure
        // applied, and the seed tree must be left exactly as it was.
        let patch = |dry_run: bool| {
            let mut cmd = Command::new("patch");
            cmd.current_dir(tree)
                .args(["-p1", "--batch", "--forward", "--fuzz=0"]);
            if dry_run {
                cmd.arg("--dry-run");
            }
            cmd.arg("-i").arg(&kept);
            cmd
        };
        let what = format!("patch {}/{}: {}", i + 1, patches.len(), p.path.display());
        r.run(&format!("{what} (dry run)"), patch(true))?;
        r.run(&what, patch(false))?;
        applied.push(kept);
    }
    Ok(())
}

/// `make tinyconfig`, the fragments merged with the tree's `merge_config.sh -m`,
/// `make olddefconfig`, then every requested option checked.
fn configure(
    r: &mut Runner<'_>,
    tree: &Path,
    dir: &Path,
    plan: &SourcePlan,
) -> Result<(), KbuildError> {
    let frag_dir = dir.join("fragments");
    std::fs::create_dir_all(&frag_dir).map_err(io_err("cannot create", &frag_dir))?;
    let mut files = Vec::new();
    for (i, f) in plan.fragments.iter().enumerate() {
        let base = Path::new(&f.name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fragment.config".into());
        let path = frag_dir.join(format!("{:02}-{base}", i + 1));
        write(path.clone(), &f.text)?;
        files.push(path);
    }
    r.run(&format!("make {BASE_CONFIG}"), {
        let mut c = make_source(tree, &plan.localversion);
        c.arg(BASE_CONFIG);
        c
    })?;
    let mut merge = Command::new(tree.join("scripts/kconfig/merge_config.sh"));
    merge
        .current_dir(tree)
        .arg("-m")
        .arg(".config")
        .args(&files);
    r.run(
        "merge the fragments (scripts/kconfig/merge_config.sh -m)",
        merge,
    )?;
    r.run("make olddefconfig", {
        let mut c = make_source(tree, &plan.localversion);
        c.arg("olddefconfig");
        c
    })?;
    r.phase("check that every option of the fragments survived");
    let config_path = tree.join(".config");
    let config = fragment::parse_config(&read(&config_path)?);
    let dropped = fragment::check(&plan.requested()?, &config);
    if !dropped.is_empty() {
        let lines = dropped
            .iter()
            .map(|d| {
                let deps = fragment::kconfig_dependencies(tree, &d.requested.name)
                    .map(|(file, deps)| {
                        if deps.is_empty() {
                            format!(" ({}: no `depends on`; something it selects or a choice may override it)", file.display())
                        } else {
                            format!(" ({}: depends on {})", file.display(), deps.join(" && "))
                        }
                    })
                    .unwrap_or_else(|| " (no such option in this tree's Kconfig: misspelt, or gone in this version)".into());
                format!("  {d}{deps}")
            })
            .collect::<Vec<_>>();
        for l in &lines {
            r.note(l);
        }
        let kept = dir.join("config.rejected");
        let _ = std::fs::copy(&config_path, &kept);
        return Err(KbuildError::Dropped {
            dropped: lines,
            config: kept,
        });
    }
    r.phase_done();
    Ok(())
}

/// `config-<release>`: the name a packaged kernel's config has beside its image,
/// where the preflight (`kconfig::find_config`) looks for it.
pub fn config_name(release: &str) -> String {
    format!("config-{release}")
}

fn has_built_modules(tree: &Path) -> bool {
    std::fs::read_to_string(tree.join("modules.order"))
        .is_ok_and(|t| t.lines().any(|l| !l.trim().is_empty()))
}

fn read(path: &Path) -> Result<String, KbuildError> {
    std::fs::read_to_string(path).map_err(io_err("cannot read", path))
}

fn write(path: PathBuf, text: &str) -> Result<(), KbuildError> {
    std::fs::write(&path, text).map_err(io_err("cannot write", &path))
}

fn copy(from: &Path, to: &Path) -> Result<(), KbuildError> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(io_err(format!("cannot copy {} to", from.display()), to))
}

fn copy_dir_all(from: &Path, to: &Path) -> Result<(), KbuildError> {
    std::fs::create_dir_all(to).map_err(io_err("cannot create", to))?;
    for entry in std::fs::read_dir(from).map_err(io_err("cannot list", from))? {
        let entry = entry.map_err(io_err("cannot list", from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type().map_err(io_err("cannot stat", &src))?;
        if ty.is_dir() {
            copy_dir_all(&src, &dst)?;
        } else if ty.is_symlink() {
            // modules_install links lib/modules/<release>/build and source back
            // into the tree: keep them as links, never follow them.
            let target = std::fs::read_link(&src).map_err(io_err("cannot read link", &src))?;
            std::os::unix::fs::symlink(target, &dst).map_err(io_err("cannot create link", &dst))?;
        } else {
            copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Replaces `out` with a staged copy: `vmlinuz` (the image), `config`, `modules/`
/// (when there are modules) and `kernel.json` describing them.
fn stage_copy(outcome: &Outcome, out: &Path) -> Result<Outcome, KbuildError> {
    let tmp = staging_dir(out)?;
    let b = &outcome.build;
    let mut staged = b.clone();
    staged.kernel.vmlinuz = tmp.join("vmlinuz");
    copy(&b.kernel.vmlinuz, &staged.kernel.vmlinuz)?;
    if let Some(config) = &b.config {
        let copy_to = tmp.join(config_name(&b.kernel.release));
        copy(config, &copy_to)?;
        staged.config = Some(copy_to);
    }
    if let Some(m) = &b.kernel.modules_dir {
        // m = <root>/lib/modules/<release>; copy the whole INSTALL_MOD_PATH.
        let root = m.ancestors().nth(3).unwrap_or(m);
        copy_dir_all(root, &tmp.join("modules"))?;
        staged.kernel.modules_dir = Some(tmp.join("modules/lib/modules").join(&b.kernel.release));
    }
    staged.save(&tmp)?;
    finish_staging(&tmp, out)?;
    let build = KernelBuild::load(out).ok_or_else(|| KbuildError::Json {
        path: out.join(KERNEL_JSON),
        why: "was just written but cannot be read back".into(),
    })?;
    Ok(Outcome {
        dir: std::path::absolute(out).unwrap_or(out.to_path_buf()),
        cached: outcome.cached,
        build,
    })
}

fn staging_dir(out: &Path) -> Result<PathBuf, KbuildError> {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kernel".into());
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    // Leftovers of interrupted runs (their logs were reported then).
    let prefix = format!(".{name}.tmp-");
    if let Ok(entries) = std::fs::read_dir(parent) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = parent.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io_err("cannot create", &tmp))?;
    Ok(std::path::absolute(&tmp).unwrap_or(tmp))
}

fn finish_staging(tmp: &Path, out: &Path) -> Result<(), KbuildError> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io_err("cannot replace", out))?;
    }
    std::fs::rename(tmp, out).map_err(io_err("cannot move the staged kernel to", out))
}

// ---------------------------------------------------------------------------------
// A user's tree

/// What `--tree` resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreePaths {
    /// The tree (canonical).
    pub root: PathBuf,
    /// `<root>/.config`.
    pub config: PathBuf,
    /// `<root>/arch/x86/boot/bzImage`.
    pub bzimage: PathBuf,
    /// `<root>/vmlinux`.
    pub vmlinux: PathBuf,
}

impl TreePaths {
    /// The image to boot: the bzImage when built, else the ELF vmlinux.
    pub fn image(&self) -> Result<&Path, KbuildError> {
        [&self.bzimage, &self.vmlinux]
            .into_iter()
            .find(|p| p.is_file())
            .map(PathBuf::as_path)
            .ok_or_else(|| KbuildError::Tree {
                path: self.root.clone(),
                why: "has neither arch/x86/boot/bzImage nor vmlinux; build it (`make bzImage`), or drop --no-build".into(),
            })
    }
}

/// Checks that `path` is a kernel tree (a top-level `Makefile` and `Kconfig`, or a
/// `make O=` build directory: `Makefile` and `.config`) and names its files.
pub fn resolve_tree(path: &Path) -> Result<TreePaths, KbuildError> {
    let err = |why: &str| KbuildError::Tree {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    if !path.is_dir() {
        return Err(err("is not a directory; pass the top of a Linux source tree (the directory with its Makefile)"));
    }
    let root = path.canonicalize().map_err(|e| err(&e.to_string()))?;
    let is_tree = root.join("Makefile").is_file()
        && (root.join("Kconfig").is_file() || root.join(".config").is_file());
    if !is_tree {
        return Err(err(
            "is not a Linux source tree (no top-level Makefile with Kconfig or .config); pass the top of the tree",
        ));
    }
    Ok(TreePaths {
        config: root.join(".config"),
        bzimage: root.join("arch/x86/boot/bzImage"),
        vmlinux: root.join("vmlinux"),
        root,
    })
}

/// Uses a user's kernel tree.
#[derive(Debug, Clone)]
pub struct TreeRequest {
    /// The tree.
    pub tree: PathBuf,
    /// Run `make olddefconfig bzImage [modules]` in it first.
    pub build: bool,
    /// Configure it first as zc does a source build (tinyconfig + fragments),
    /// replacing its `.config`.
    pub configure: bool,
    /// Fragments merged after zc's when configuring.
    pub extra_fragments: Vec<PathBuf>,
    /// `make -j`.
    pub jobs: usize,
    /// Where to stage `vmlinuz`, `config`, `modules/` and `kernel.json`.
    pub out: PathBuf,
}

fn git_describe(root: &Path) -> Option<String> {
    if !root.join(".git").exists() {
        return None;
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Builds (unless `build` is false) and stages a user's tree.
pub fn use_tree(
    req: &TreeRequest,
    progress: &mut dyn BuildProgress,
) -> Result<Outcome, KbuildError> {
    let start = Instant::now();
    let paths = resolve_tree(&req.tree)?;
    if !req.configure && !req.extra_fragments.is_empty() {
        return Err(KbuildError::BadInput {
            what: "--fragment",
            path: req.extra_fragments[0].clone(),
            why: "is only merged when zc configures the tree; add --configure (which replaces its .config)".into(),
        });
    }
    let mut fragments = Vec::new();
    if req.configure {
        fragments = FragmentFile::zc_defaults();
        for path in &req.extra_fragments {
            fragments.push(FragmentFile::read(path)?);
        }
    }
    if req.build {
        check_build_tools(false)?;
        if !req.configure && !paths.config.is_file() {
            return Err(KbuildError::Tree {
                path: paths.root.clone(),
                why: "has no .config; configure it (`make menuconfig`, or pass --configure for tinyconfig + zc's fragment)".into(),
            });
        }
    }
    let toolchain = Toolchain::detect()?;
    let tmp = staging_dir(&req.out)?;
    let log_path = tmp.join("build.log");
    let mut r = Runner::new(&log_path, progress)?;
    if req.configure {
        let plan = SourcePlan {
            source: SourceInfo {
                tarball: paths.root.clone(),
                sha256: String::new(),
                package: None,
                package_version: None,
                kernelversion: None,
            },
            fragments: fragments.clone(),
            patches: vec![],
            localversion: String::new(),
            toolchain: toolchain.clone(),
        };
        configure(&mut r, &paths.root, &tmp, &plan)?;
    }
    let config_text = std::fs::read_to_string(&paths.config).ok();
    let config = config_text.as_deref().map(fragment::parse_config);
    if let Some(config) = &config {
        if config.get("CONFIG_64BIT") != Some(&Setting::Value("y".into())) {
            return Err(KbuildError::Tree {
                path: paths.root.clone(),
                why: "its .config is not a 64-bit x86 kernel (CONFIG_64BIT); zc boots x86-64 kernels only".into(),
            });
        }
    }
    let has_modules = config
        .as_ref()
        .is_some_and(|c| c.get("CONFIG_MODULES") == Some(&Setting::Value("y".into())));
    let jobs = format!("-j{}", req.jobs.max(1));
    if req.build {
        r.run(
            "make olddefconfig (new options of this tree get their defaults)",
            {
                let mut c = make(&paths.root);
                c.arg("olddefconfig");
                c
            },
        )?;
        r.run(&format!("make {jobs} bzImage"), {
            let mut c = make(&paths.root);
            c.args([jobs.as_str(), "bzImage"]);
            c
        })?;
        if has_modules {
            r.run(&format!("make {jobs} modules"), {
                let mut c = make(&paths.root);
                c.args([jobs.as_str(), "modules"]);
                c
            })?;
        }
    }
    let image = paths.image()?.to_path_buf();
    let version = kernel::image_version(&image)?;
    let release = kernel::release_of(&version).to_string();
    r.phase(&format!(
        "stage {} into {}",
        image.display(),
        req.out.display()
    ));
    let vmlinuz = tmp.join("vmlinuz");
    copy(&image, &vmlinuz)?;
    let staged_config = if paths.config.is_file() {
        let copy_to = tmp.join(config_name(&release));
        copy(&paths.config, &copy_to)?;
        Some(copy_to)
    } else {
        None
    };
    r.phase_done();
    let mut modules_dir = None;
    if has_modules && has_built_modules(&paths.root) {
        let install = tmp.join("modules");
        let mut c = make(&paths.root);
        c.arg("modules_install")
            .arg(format!("INSTALL_MOD_PATH={}", install.display()));
        r.run("make modules_install", c)?;
        let dir = install.join("lib/modules").join(&release);
        if !dir.is_dir() {
            return Err(KbuildError::Tree {
                path: paths.root.clone(),
                why: format!(
                    "modules_install put no lib/modules/{release} (the image's release); rebuild the tree so image and modules match"
                ),
            });
        }
        modules_dir = Some(dir);
    }
    let build = KernelBuild {
        kernel: KernelInfo {
            package: None,
            deb_version: None,
            release,
            version,
            vmlinuz,
            modules_dir,
        },
        config: staged_config,
        source: BuildSource::Tree {
            path: paths.root.clone(),
            git: git_describe(&paths.root),
        },
        base_config: req.configure.then(|| BASE_CONFIG.to_string()),
        fragments,
        patches: vec![],
        localversion: None,
        toolchain,
        key: None,
        rebuilt_from: None,
        build_seconds: start.elapsed().as_secs_f64(),
        built_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        log: log_path,
    };
    drop(r);
    build.save(&tmp)?;
    finish_staging(&tmp, &req.out)?;
    let build = KernelBuild::load(&req.out).ok_or_else(|| KbuildError::Json {
        path: req.out.join(KERNEL_JSON),
        why: "was just written but cannot be read back".into(),
    })?;
    Ok(Outcome {
        dir: std::path::absolute(&req.out).unwrap_or(req.out.clone()),
        cached: false,
        build,
    })
}

#[cfg(test)]
mod tests;
