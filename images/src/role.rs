//! Roles: everything one kind of VM boots, assembled into `<out>/<role>/`.
//!
//! - `guest`: the VM under test (booted by `zc-vmm`). Debian's cloud kernel by default;
//!   modules for what the guest needs ([`GuestNeeds`]): the virtio transport
//!   (`virtio_mmio`, `virtio_pci`), `virtio_blk`, `virtio_net` and the test disk's
//!   filesystem (`ext4`), with everything they need (hard and soft dependencies,
//!   aliases; see [`crate::modules`]). Before anything is written the kernel's config
//!   goes through the preflight ([`crate::kconfig::preflight`]).
//! - `host`: the emulated KVM host (run under QEMU TCG). Debian's generic kernel;
//!   modules for `kvm_amd virtio_mmio 9pnet_virtio 9p` and their dependencies (on 6.1
//!   `kvm_amd`'s `depends=` is `kvm,ccp`, so `ccp` comes in without being named).
//!
//! Output, per role:
//! ```text
//! <out>/<role>/vmlinuz       the kernel image (a copy)
//! <out>/<role>/initrd.img    gzip'd newc cpio, see below
//! <out>/<role>/kernel.json   RoleKernel: package, deb version, release, modules
//! <out>/<role>/.stamp.json   inputs of the last build; equal inputs => nothing is redone
//! ```
//! The initramfs holds `/init` (the static guest program, 0755), the directories
//! `/dev /proc /sys /tmp /host /etc/zc /lib/modules /root`, `/dev/console` (c 5 1:
//! without it the kernel gives /init no stdout), `/lib/modules/<NN>-<name>.ko[.xz|.zst]`
//! (the kernel's own compression when its config says it decompresses that itself,
//! for `finit_module(MODULE_INIT_COMPRESSED_FILE)`; else decompressed here),
//! `/etc/zc/modules` (those paths in load order, one per line; a line ending in
//! ` optional` names a module the guest may go on without, such as `crc32c_intel`) and
//! `/etc/zc/kernel.json` (the same [`RoleKernel`] as `<out>/<role>/kernel.json`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::debian::{self, DebianError, Flavour};
use crate::elf;
use crate::initramfs::{self, InitramfsError};
use crate::kconfig::{self, ConfigError, KernelConfig, MethodSkip, Preflight, TransportChoice};
use crate::kernel::{self, KernelError, KernelInfo};
use crate::modules::{self, Compression, DepSource, Module, ModuleError, ModuleIndex, Want};

/// Bumped whenever the output layout changes, so old outputs are rebuilt.
const STAMP_FORMAT: u32 = 2;

/// What the guest needs from its kernel, beyond what every guest needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNeeds {
    /// The virtio transport(s) the guest's devices may sit on.
    pub transport: TransportChoice,
    /// The test disk's filesystem (`zc-image disk` makes ext4).
    pub filesystem: String,
}

impl Default for GuestNeeds {
    fn default() -> Self {
        Self {
            transport: TransportChoice::Any,
            filesystem: "ext4".into(),
        }
    }
}

/// One thing a role needs from the kernel's modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// This module (or alias), built in or as a file.
    Module(String),
    /// At least one of these; every one the kernel has goes in.
    AnyOf(Vec<String>),
}

/// Which VM the output is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The VM under test.
    Guest,
    /// The emulated KVM host.
    Host,
}

impl Role {
    /// Lower-case name, as on the command line and in the output path.
    pub fn name(self) -> &'static str {
        match self {
            Role::Guest => "guest",
            Role::Host => "host",
        }
    }

    /// The Debian kernel flavour used when no `--kernel` is given.
    pub fn flavour(self) -> Flavour {
        match self {
            Role::Guest => Flavour::Cloud,
            Role::Host => Flavour::Generic,
        }
    }

    /// What the role needs from the kernel's modules (`guest` applies to the guest
    /// role only); their dependencies are resolved by [`ModuleIndex::resolve`].
    pub fn needs(self, guest: &GuestNeeds) -> Vec<Need> {
        let m = |n: &str| Need::Module(n.to_string());
        match self {
            Role::Guest => {
                let transports = guest
                    .transport
                    .transports()
                    .iter()
                    .map(|t| t.module().to_string())
                    .collect();
                vec![
                    Need::AnyOf(transports),
                    m("virtio_blk"),
                    m("virtio_net"),
                    m(&guest.filesystem),
                ]
            }
            // QEMU's microvm gives the host virtio-mmio devices; `tun`: for
            // `zc-vmm run --net tap` inside the emulated host.
            Role::Host => vec![
                m("kvm_amd"),
                m("virtio_mmio"),
                m("9pnet_virtio"),
                m("9p"),
                m("tun"),
            ],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// Debian's package for the role's flavour; `pin` as for `--kernel-version`.
    Debian {
        /// `None` for the metapackage's current version.
        pin: Option<String>,
    },
    /// The user's own build.
    User {
        /// bzImage or vmlinux.
        image: PathBuf,
        /// Its modules (`lib/modules/<release>` or an `INSTALL_MOD_PATH`), if any.
        modules_dir: Option<PathBuf>,
    },
}

/// Everything `zc-image build` needs.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The role to build.
    pub role: Role,
    /// The static program to run as `/init`.
    pub init: PathBuf,
    /// The kernel.
    pub kernel: KernelSource,
    /// Extra module roots beyond [`Role::needs`].
    pub extra_modules: Vec<String>,
    /// What the guest needs (transport, filesystem).
    pub guest: GuestNeeds,
    /// The kernel's config, when it is not where [`kconfig::find_config`] looks.
    pub config: Option<PathBuf>,
    /// Where module aliases read from `.modinfo` are kept between builds.
    pub alias_cache: Option<PathBuf>,
    /// Debian kernel cache directory.
    pub cache: PathBuf,
    /// Output directory; the role's files go to `<out>/<role>/`.
    pub out: PathBuf,
}

/// Description of a built role, written as `kernel.json` (outside and inside the
/// initramfs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKernel {
    /// The role.
    pub role: Role,
    /// Debian package, or `None` for a user's kernel.
    pub package: Option<String>,
    /// Debian package version, or `None` for a user's kernel.
    pub deb_version: Option<String>,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// Full version string from the image.
    pub version: String,
    /// Modules in load order (normalised names).
    pub modules: Vec<String>,
    /// Their paths inside the initramfs, in the same order.
    pub module_paths: Vec<String>,
    /// Role modules that needed no file because they are built in (or, for a user
    /// kernel without a modules directory, are assumed to be).
    pub builtin: Vec<String>,
    /// The modules of [`RoleKernel::modules`] the guest may go on without.
    #[serde(default)]
    pub optional_modules: Vec<String>,
    /// Methods the guest will skip on this kernel (from the preflight).
    #[serde(default)]
    pub skipped_methods: Vec<MethodSkip>,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// `<out>/<role>`.
    pub dir: PathBuf,
    /// `<out>/<role>/vmlinuz`.
    pub vmlinuz: PathBuf,
    /// `<out>/<role>/initrd.img`.
    pub initrd: PathBuf,
    /// `<out>/<role>/kernel.json`.
    pub kernel_json: PathBuf,
    /// The kernel and module description.
    pub info: RoleKernel,
    /// False when the outputs were already up to date.
    pub rebuilt: bool,
    /// Things the user should know that did not stop the build.
    pub warnings: Vec<String>,
}

/// Errors building a role.
#[derive(Debug, Error)]
pub enum RoleError {
    /// The init binary is missing.
    #[error("init program {0} does not exist; build it with `make guest` (or pass --init PATH)")]
    InitMissing(PathBuf),
    /// `--init` is a dynamically linked program: the initramfs has no loader for it.
    #[error("init program {0} is dynamically linked (it has an ELF interpreter) and the initramfs has no loader or libraries, so the kernel could not run it; build it with -C target-feature=+crt-static (`make guest`)")]
    InitNotStatic(PathBuf),
    /// Output directory trouble.
    #[error("{what} {path}: {source}; check --out is a writable directory")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Fetching the Debian kernel failed.
    #[error(transparent)]
    Debian(#[from] DebianError),
    /// The kernel image or modules directory is unusable.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// Module resolution failed.
    #[error(transparent)]
    Modules(#[from] ModuleError),
    /// None of the modules of a need is in the kernel.
    #[error("the kernel has none of {} (neither built in nor in {dir}): {why}", .names.join(", "))]
    NoneOf {
        /// The candidates.
        names: Vec<String>,
        /// The modules directory.
        dir: PathBuf,
        /// What it is needed for.
        why: &'static str,
    },
    /// The kernel's config cannot be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The preflight found that the guest cannot run on this kernel.
    #[error("the guest cannot run on kernel {}:\n{}", .0.release, .0.lines().join("\n"))]
    Preflight(Box<Preflight>),
    /// Writing the initramfs failed.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
}

/// Fetches or reads the kernel, then assembles the role (see [`build_with_kernel`]).
pub fn build(req: &BuildRequest, progress: &mut dyn FnMut(&str)) -> Result<Built, RoleError> {
    check_init(&req.init)?;
    let kernel = match &req.kernel {
        KernelSource::Debian { pin } => {
            debian::fetch(&req.cache, req.role.flavour(), pin.as_deref(), progress)?
        }
        KernelSource::User { image, modules_dir } => {
            let k = kernel::user_kernel(image, modules_dir.as_deref())?;
            progress(&format!("kernel: {}", k.describe()));
            k
        }
    };
    let extra: Vec<&str> = req.extra_modules.iter().map(String::as_str).collect();
    let opts = BuildOptions {
        guest: req.guest.clone(),
        config: req.config.clone(),
        alias_cache: req.alias_cache.clone(),
    };
    build_with_kernel(
        req.role, &req.init, &kernel, &extra, &opts, &req.out, progress,
    )
}

/// How to build, beyond the kernel and the init program.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// What the guest needs (transport, filesystem).
    pub guest: GuestNeeds,
    /// The kernel's config, when it is not where [`kconfig::find_config`] looks.
    pub config: Option<PathBuf>,
    /// Where module aliases read from `.modinfo` are kept between builds (see
    /// [`ModuleIndex::with_alias_cache`]); `None`: read them every time.
    pub alias_cache: Option<PathBuf>,
}

/// The user's cache directory for zc: `$XDG_CACHE_HOME/zc`, else `$HOME/.cache/zc`.
pub fn user_cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
    match xdg {
        Some(x) => Some(PathBuf::from(x).join("zc")),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/zc")),
    }
}

/// The kernel's config (see [`kconfig::find_config`]) and, for the guest role, the
/// preflight over it. `None`s when no config is found.
pub fn preflight_kernel(
    role: Role,
    kernel: &KernelInfo,
    opts: &BuildOptions,
    index: Option<&ModuleIndex>,
) -> Result<(Option<KernelConfig>, Option<Preflight>), RoleError> {
    let config = kconfig::find_config(
        opts.config.as_deref(),
        &kernel.vmlinuz,
        &kernel.release,
        index,
    )?;
    let preflight = match (&config, role) {
        (Some(c), Role::Guest) => Some(kconfig::preflight(
            c,
            &kernel.release,
            opts.guest.transport,
            index,
        )?),
        _ => None,
    };
    Ok((config, preflight))
}

fn check_init(init: &Path) -> Result<(), RoleError> {
    if !init.is_file() {
        return Err(RoleError::InitMissing(init.to_path_buf()));
    }
    // An initrd whose /init cannot run boots to a kernel panic: refuse to write it.
    let data = std::fs::read(init).map_err(|_| RoleError::InitMissing(init.to_path_buf()))?;
    if elf::has_interp(&data) == Ok(true) {
        return Err(RoleError::InitNotStatic(init.to_path_buf()));
    }
    Ok(())
}

impl RoleError {
    /// Whether the error is the user's input (a wrong path or program), which the
    /// binary reports with exit status 2, rather than a failure along the way.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            RoleError::InitMissing(_)
                | RoleError::InitNotStatic(_)
                | RoleError::Debian(DebianError::NoMatch { .. })
                | RoleError::Kernel(
                    KernelError::Read { .. }
                        | KernelError::NotAKernel { .. }
                        | KernelError::ModulesDir { .. }
                )
        )
    }
}

/// Warns when `/init` cannot run in an initramfs that holds nothing else.
fn init_warnings(init: &Path, data: &[u8]) -> Vec<String> {
    match elf::has_interp(data) {
        Ok(false) => vec![],
        Ok(true) => vec![format!(
            "{} is dynamically linked (has an ELF interpreter) but the initramfs has no \
             loader or libraries, so the kernel cannot run it; build it with \
             -C target-feature=+crt-static (`make guest`)",
            init.display()
        )],
        Err(e) => vec![format!(
            "{} is not a 64-bit ELF program ({e}); the initramfs has no shell to run a script",
            init.display()
        )],
    }
}

/// The module set of a role on one kernel.
#[derive(Debug, Clone, Default)]
pub struct ModulePlan {
    /// The modules to load, in load order.
    pub modules: Vec<Module>,
    /// What the role needs that is built in (or assumed to be: no modules directory).
    pub builtin: Vec<String>,
    /// Soft dependencies found nowhere (`module: name`).
    pub absent: Vec<String>,
    /// Where dependencies were read from; `None` without a modules directory.
    pub source: Option<DepSource>,
}

/// The modules to load for `role` (plus `extra` roots) on `kernel`, in load order.
/// `index` is the kernel's module index (`None`: the kernel has no modules
/// directory, so everything is assumed built in).
pub fn plan_modules(
    role: Role,
    index: Option<&ModuleIndex>,
    guest: &GuestNeeds,
    extra: &[&str],
) -> Result<ModulePlan, RoleError> {
    let mut needs = role.needs(guest);
    needs.extend(extra.iter().map(|e| Need::Module(e.to_string())));
    let Some(index) = index else {
        let builtin = needs
            .iter()
            .map(|n| match n {
                Need::Module(m) => modules::normalise(m),
                Need::AnyOf(list) => list.join(" or "),
            })
            .collect();
        return Ok(ModulePlan {
            builtin,
            ..ModulePlan::default()
        });
    };
    let mut wants = Vec::new();
    for need in &needs {
        match need {
            Need::Module(m) => wants.push(Want::required(m)),
            Need::AnyOf(list) => {
                let mut any = false;
                for m in list {
                    if index.provides(m)? {
                        wants.push(Want::required(m));
                        any = true;
                    }
                }
                if !any {
                    return Err(RoleError::NoneOf {
                        names: list.clone(),
                        dir: index.dir().to_path_buf(),
                        why: "the guest needs a virtio transport to find its disk and NIC",
                    });
                }
            }
        }
    }
    let r = index.resolve(&wants)?;
    Ok(ModulePlan {
        modules: r.modules,
        builtin: r.builtin,
        absent: r.absent,
        source: Some(index.source()),
    })
}

/// How a module is stored in the initramfs: as the kernel ships it when the kernel
/// decompresses that itself, else uncompressed (decompressed here). Without a config
/// zc cannot tell, so it decompresses.
pub fn stored_compression(module: &Module, config: Option<&KernelConfig>) -> Compression {
    if config.is_some_and(|c| c.decompresses(module.compression)) {
        module.compression
    } else {
        Compression::None
    }
}

/// Path of a module inside the initramfs: `/lib/modules/<NN>-<name><suffix>`, NN from
/// 01, the suffix that of how it is stored.
pub fn module_path_in_initramfs(index: usize, name: &str, stored: Compression) -> String {
    format!("/lib/modules/{:02}-{}{}", index + 1, name, stored.suffix())
}

/// Directories every initramfs has, with their permission bits.
pub const DIRS: &[(&str, u32)] = &[
    ("/dev", 0o755),
    ("/proc", 0o555),
    ("/sys", 0o555),
    ("/tmp", 0o1777),
    ("/host", 0o755),
    ("/etc", 0o755),
    ("/etc/zc", 0o755),
    ("/lib", 0o755),
    ("/lib/modules", 0o755),
    ("/root", 0o700),
];

/// Writes the gzip'd initramfs to `path` (via `<path>.tmp` and a rename).
pub fn write_initramfs(
    path: &Path,
    init: &Path,
    modules: &[Module],
    info: &RoleKernel,
) -> Result<(), RoleError> {
    assert_eq!(
        info.module_paths.len(),
        modules.len(),
        "one path per module"
    );
    let tmp = initramfs::temp_path(path);
    let mut w = initramfs::create_gz(&tmp)?;
    for (dir, mode) in DIRS {
        w.add_dir(dir, *mode)?;
    }
    w.add_char_dev("/dev/console", 0o600, 5, 1)?;
    w.add_file_from_path("/init", 0o755, init)?;
    let mut list = String::new();
    for (m, p) in modules.iter().zip(&info.module_paths) {
        if p.ends_with(m.compression.suffix()) {
            w.add_file_from_path(p, 0o644, &m.path)?;
        } else {
            w.add_file(p, 0o644, &modules::read_uncompressed(&m.path)?)?;
        }
        list.push_str(p);
        if !m.required {
            list.push_str(" optional");
        }
        list.push('\n');
    }
    w.add_file("/etc/zc/modules", 0o644, list.as_bytes())?;
    let json = serde_json::to_string_pretty(info).expect("RoleKernel serialises") + "\n";
    w.add_file("/etc/zc/kernel.json", 0o644, json.as_bytes())?;
    initramfs::finish_gz(w, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| RoleError::Io {
        what: "cannot move the initramfs into place at",
        path: path.to_path_buf(),
        source,
    })
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
}

impl FileId {
    fn of(path: &Path) -> Result<Self, RoleError> {
        let meta = std::fs::metadata(path).map_err(|source| RoleError::Io {
            what: "cannot read",
            path: path.to_path_buf(),
            source,
        })?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            size: meta.len(),
            mtime_ns,
        })
    }
}

/// Everything the outputs depend on; equal stamps mean nothing needs redoing.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    format: u32,
    tool_version: String,
    role: Role,
    init: FileId,
    package: Option<String>,
    deb_version: Option<String>,
    release: String,
    vmlinuz: FileId,
    modules: Vec<(String, FileId)>,
    module_paths: Vec<String>,
    optional_modules: Vec<String>,
    skipped_methods: Vec<MethodSkip>,
    builtin: Vec<String>,
}

/// Assembles `<out>/<role>/` from an already available kernel. Rebuilds only when
/// the init binary (path, size, mtime), the kernel or the module list changed, or an
/// output is missing.
pub fn build_with_kernel(
    role: Role,
    init: &Path,
    kernel: &KernelInfo,
    extra_modules: &[&str],
    opts: &BuildOptions,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Built, RoleError> {
    check_init(init)?;
    let dir = out.join(role.name());
    let vmlinuz = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    let kernel_json = dir.join("kernel.json");
    let stamp_path = dir.join(".stamp.json");

    let index = kernel
        .modules_dir
        .as_deref()
        .map(ModuleIndex::scan)
        .transpose()?
        .map(|i| match &opts.alias_cache {
            Some(dir) => i.with_alias_cache(dir.clone()),
            None => i,
        });
    let mut warnings = Vec::new();
    // The preflight comes first: a guest that cannot run stops here, before anything
    // is written.
    let (config, preflight) = preflight_kernel(role, kernel, opts, index.as_ref())?;
    match (&config, &preflight) {
        (_, Some(p)) if !p.ok() => return Err(RoleError::Preflight(Box::new(p.clone()))),
        (_, Some(p)) => {
            progress(&format!("{role}: preflight of {}: the guest can run", p.config));
            for line in p.lines() {
                progress(&format!("{role}: preflight: {line}"));
            }
        }
        (Some(c), None) => progress(&format!("{role}: kernel config: {}", c.source)),
        (None, _) => warnings.push(format!(
            "no config found for kernel {} (no .config or config-{} beside the image, no IKCONFIG in it): \
             preflight skipped, modules go in decompressed; pass --config FILE",
            kernel.release, kernel.release
        )),
    }
    let skipped_methods = preflight.map(|p| p.skips).unwrap_or_default();

    let plan = plan_modules(role, index.as_ref(), &opts.guest, extra_modules)?;
    if let Some(source) = plan.source {
        progress(&format!("{role}: module dependencies from {source}"));
    }
    for m in &plan.modules {
        if m.reason != modules::Reason::Wanted || !m.required {
            progress(&format!(
                "{role}:   {} ({}{})",
                m.name,
                m.reason,
                if m.required { "" } else { ", optional" }
            ));
        }
    }
    if !plan.absent.is_empty() {
        progress(&format!(
            "{role}: soft dependencies this kernel does not have: {}",
            plan.absent.join(", ")
        ));
    }
    let modules = plan.modules;
    let builtin = plan.builtin;
    if kernel.modules_dir.is_none() {
        warnings.push(format!(
            "kernel {} has no modules directory (--modules-dir): assuming {} are built in",
            kernel.release,
            builtin.join(", ")
        ));
    }
    let names: Vec<String> = modules.iter().map(|m| m.name.clone()).collect();
    progress(&format!(
        "{role}: modules in load order: {}",
        if names.is_empty() {
            "(none)".to_string()
        } else {
            names.join(" ")
        }
    ));
    if !builtin.is_empty() {
        progress(&format!(
            "{role}: built into the kernel: {}",
            builtin.join(" ")
        ));
    }
    let info = RoleKernel {
        role,
        package: kernel.package.clone(),
        deb_version: kernel.deb_version.clone(),
        release: kernel.release.clone(),
        version: kernel.version.clone(),
        modules: names,
        module_paths: modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                module_path_in_initramfs(i, &m.name, stored_compression(m, config.as_ref()))
            })
            .collect(),
        builtin: builtin.clone(),
        optional_modules: modules
            .iter()
            .filter(|m| !m.required)
            .map(|m| m.name.clone())
            .collect(),
        skipped_methods,
    };
    let stamp = Stamp {
        format: STAMP_FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        role,
        init: FileId::of(init)?,
        package: kernel.package.clone(),
        deb_version: kernel.deb_version.clone(),
        release: kernel.release.clone(),
        vmlinuz: FileId::of(&kernel.vmlinuz)?,
        modules: modules
            .iter()
            .map(|m| Ok((m.name.clone(), FileId::of(&m.path)?)))
            .collect::<Result<_, RoleError>>()?,
        module_paths: info.module_paths.clone(),
        optional_modules: info.optional_modules.clone(),
        skipped_methods: info.skipped_methods.clone(),
        builtin,
    };
    let init_data = std::fs::read(init).map_err(|source| RoleError::Io {
        what: "cannot read init program",
        path: init.to_path_buf(),
        source,
    })?;
    warnings.extend(init_warnings(init, &init_data));

    let up_to_date = [&vmlinuz, &initrd, &kernel_json]
        .iter()
        .all(|p| p.is_file())
        && std::fs::read_to_string(&stamp_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Stamp>(&t).ok())
            .is_some_and(|old| old == stamp);
    if up_to_date {
        progress(&format!("{role}: up to date in {}", dir.display()));
        return Ok(Built {
            dir,
            vmlinuz,
            initrd,
            kernel_json,
            info,
            rebuilt: false,
            warnings,
        });
    }

    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RoleError::Io { what, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
    // The stamp goes first, so an interrupted build is never taken as up to date.
    match std::fs::remove_file(&stamp_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("cannot remove", &stamp_path)(e))
        }
        _ => {}
    }
    let vmlinuz_tmp = dir.join(".vmlinuz.tmp");
    std::fs::copy(&kernel.vmlinuz, &vmlinuz_tmp)
        .map_err(io("cannot copy the kernel to", &vmlinuz_tmp))?;
    std::fs::rename(&vmlinuz_tmp, &vmlinuz).map_err(io("cannot move the kernel to", &vmlinuz))?;
    progress(&format!(
        "{role}: kernel {} -> {}",
        kernel.describe(),
        vmlinuz.display()
    ));

    write_initramfs(&initrd, init, &modules, &info)?;
    let size = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "{role}: initramfs with /init and {} module(s), {} KiB -> {}",
        modules.len(),
        size / 1024,
        initrd.display()
    ));

    let json = serde_json::to_string_pretty(&info).expect("RoleKernel serialises") + "\n";
    std::fs::write(&kernel_json, json).map_err(io("cannot write", &kernel_json))?;
    let stamp_text = serde_json::to_string_pretty(&stamp).expect("Stamp serialises") + "\n";
    std::fs::write(&stamp_path, stamp_text).map_err(io("cannot write", &stamp_path))?;
    Ok(Built {
        dir,
        vmlinuz,
        initrd,
        kernel_json,
        info,
        rebuilt: true,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initramfs::{read_archive_file, S_IFCHR, S_IFDIR, S_IFREG};
    use crate::modules::testutil::write_module;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        kernel: KernelInfo,
        init: PathBuf,
    }

    /// A fake Debian-like kernel: bzImage with a version string, and a modules tree
    /// shaped like 6.1 cloud's for the guest role (virtio_net -> net_failover ->
    /// failover; virtio/virtio_ring modules), with `virtio_blk` optionally built in.
    fn fixture(blk_builtin: bool) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let rel = "6.1.0-56-cloud-amd64";
        let mods = root.join("k/lib/modules").join(rel);
        write_module(&mods, "drivers/virtio", "virtio_ring", &[], None);
        write_module(&mods, "drivers/virtio", "virtio", &["virtio_ring"], None);
        write_module(
            &mods,
            "drivers/virtio",
            "virtio_mmio",
            &["virtio", "virtio_ring"],
            None,
        );
        write_module(&mods, "drivers/virtio", "virtio_pci_modern_dev", &[], None);
        write_module(
            &mods,
            "drivers/virtio",
            "virtio_pci",
            &["virtio_ring", "virtio_pci_modern_dev", "virtio"],
            None,
        );
        write_module(&mods, "net/core", "failover", &[], None);
        write_module(&mods, "drivers/net", "net_failover", &["failover"], None);
        write_module(
            &mods,
            "drivers/net",
            "virtio_net",
            &["virtio_ring", "virtio", "net_failover"],
            None,
        );
        if blk_builtin {
            std::fs::write(
                mods.join("modules.builtin"),
                "kernel/drivers/block/virtio_blk.ko\nkernel/fs/ext4/ext4.ko\n",
            )
            .unwrap();
        } else {
            write_module(
                &mods,
                "drivers/block",
                "virtio_blk",
                &["virtio", "virtio_ring"],
                None,
            );
            std::fs::write(mods.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        }
        std::fs::create_dir_all(root.join("k/boot")).unwrap();
        // A config with everything the guest needs, drivers as modules, as Debian's.
        let mut config: String = crate::kconfig::REQUIREMENTS
            .iter()
            .map(|r| match r.module {
                Some(_) => format!("CONFIG_{}=m\n", r.option),
                None => format!("CONFIG_{}=y\n", r.option),
            })
            .collect();
        config = config.replace("CONFIG_EXT4_FS=m", "CONFIG_EXT4_FS=y");
        std::fs::write(root.join("k/boot").join(format!("config-{rel}")), config).unwrap();
        let vmlinuz = root.join("k/boot").join(format!("vmlinuz-{rel}"));
        std::fs::write(
            &vmlinuz,
            crate::kernel::testutil::fake_bzimage(&format!("{rel} (d@l) #1 SMP")),
        )
        .unwrap();
        let init = root.join("init-bin");
        std::fs::write(&init, crate::elf::testutil::elf_with_phdr(1)).unwrap();
        let kernel = KernelInfo {
            package: Some("linux-image-6.1.0-56-cloud-amd64".into()),
            deb_version: Some("6.1.192-2".into()),
            release: rel.into(),
            version: format!("{rel} (d@l) #1 SMP"),
            vmlinuz,
            modules_dir: Some(mods),
        };
        Fixture {
            _tmp: tmp,
            root,
            kernel,
            init,
        }
    }

    fn build(f: &Fixture, lines: &mut Vec<String>) -> Built {
        build_with_kernel(
            Role::Guest,
            &f.init,
            &f.kernel,
            &[],
            &BuildOptions::default(),
            &f.root.join("out"),
            &mut |l: &str| lines.push(l.to_string()),
        )
        .unwrap()
    }

    #[test]
    fn guest_initramfs_has_everything_in_order() {
        let f = fixture(false);
        let mut lines = vec![];
        let b = build(&f, &mut lines);
        assert!(b.rebuilt);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(b.dir, f.root.join("out/guest"));
        assert_eq!(
            std::fs::read(&b.vmlinuz).unwrap(),
            std::fs::read(&f.kernel.vmlinuz).unwrap()
        );
        assert_eq!(
            b.info.modules,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );

        let entries = read_archive_file(&b.initrd).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n} missing from initramfs"))
        };
        for (d, mode) in DIRS {
            assert_eq!(get(&d[1..]).mode, S_IFDIR | mode, "{d}");
        }
        let console = get("dev/console");
        assert_eq!((console.mode & !0o777, console.rdev), (S_IFCHR, (5, 1)));
        let init = get("init");
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, std::fs::read(&f.init).unwrap());

        let list = String::from_utf8(get("etc/zc/modules").data.clone()).unwrap();
        let paths: Vec<&str> = list.lines().collect();
        assert_eq!(paths.len(), 9);
        assert_eq!(paths[0], "/lib/modules/01-virtio_ring.ko");
        assert_eq!(paths[8], "/lib/modules/09-virtio_net.ko");
        for (p, name) in paths.iter().zip(&b.info.modules) {
            let e = get(&p[1..]);
            assert_eq!(e.mode, S_IFREG | 0o644);
            let src = f.kernel.modules_dir.as_ref().unwrap();
            let original = ModuleIndex::scan(src).unwrap();
            assert_eq!(
                e.data,
                std::fs::read(original.path(name).unwrap()).unwrap(),
                "{p}"
            );
        }
        let inner: RoleKernel = serde_json::from_slice(&get("etc/zc/kernel.json").data).unwrap();
        assert_eq!(inner, b.info);
        let outer: RoleKernel =
            serde_json::from_str(&std::fs::read_to_string(&b.kernel_json).unwrap()).unwrap();
        assert_eq!(outer, b.info);
        assert_eq!(
            outer.package.as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(outer.module_paths, paths);
        // Nothing else is in there.
        let module_count = entries
            .iter()
            .filter(|e| e.name.starts_with("lib/modules/"))
            .count();
        assert_eq!(module_count, 9);
    }

    #[test]
    fn builtin_roots_are_skipped_and_reported() {
        let f = fixture(true);
        let b = build(&f, &mut vec![]);
        assert!(!b.info.modules.contains(&"virtio_blk".to_string()));
        assert_eq!(b.info.builtin, ["virtio_blk", "ext4"]);
    }

    #[test]
    fn second_build_is_a_no_op_until_an_input_changes() {
        let f = fixture(false);
        let b1 = build(&f, &mut vec![]);
        assert!(b1.rebuilt);
        let before = std::fs::metadata(&b1.initrd).unwrap().modified().unwrap();
        let b2 = build(&f, &mut vec![]);
        assert!(!b2.rebuilt, "unchanged inputs must not rebuild");
        assert_eq!(
            std::fs::metadata(&b2.initrd).unwrap().modified().unwrap(),
            before
        );

        // A new init binary (different size) -> rebuild, with the new contents.
        let mut data = std::fs::read(&f.init).unwrap();
        data.extend_from_slice(b"more");
        std::fs::write(&f.init, &data).unwrap();
        let b3 = build(&f, &mut vec![]);
        assert!(b3.rebuilt);
        let e = read_archive_file(&b3.initrd).unwrap();
        assert_eq!(e.iter().find(|e| e.name == "init").unwrap().data, data);
        assert!(!build(&f, &mut vec![]).rebuilt);

        // A changed module set -> rebuild.
        let mods = f.kernel.modules_dir.clone().unwrap();
        write_module(
            &mods,
            "drivers/net",
            "virtio_net",
            &["virtio_ring", "virtio"],
            None,
        );
        let b4 = build(&f, &mut vec![]);
        assert!(b4.rebuilt);
        assert!(!b4.info.modules.contains(&"net_failover".to_string()));

        // A deleted output -> rebuild.
        std::fs::remove_file(&b4.vmlinuz).unwrap();
        assert!(build(&f, &mut vec![]).rebuilt);
        assert!(b4.vmlinuz.is_file());

        // Another kernel identity -> rebuild.
        let mut other = f.kernel.clone();
        other.deb_version = Some("6.1.192-3".into());
        let b5 = build_with_kernel(
            Role::Guest,
            &f.init,
            &other,
            &[],
            &BuildOptions::default(),
            &f.root.join("out"),
            &mut |_| {},
        )
        .unwrap();
        assert!(b5.rebuilt);
    }

    #[test]
    fn missing_module_and_missing_init_are_errors_naming_the_fix() {
        let f = fixture(false);
        std::fs::remove_file(
            f.kernel
                .modules_dir
                .as_ref()
                .unwrap()
                .join("kernel/drivers/block/virtio_blk.ko"),
        )
        .unwrap();
        let err = build_with_kernel(
            Role::Guest,
            &f.init,
            &f.kernel,
            &[],
            &BuildOptions::default(),
            &f.root.join("o"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("virtio_blk"), "{err}");
        let f = fixture(false);
        let err = build_with_kernel(
            Role::Guest,
            &f.root.join("nope"),
            &f.kernel,
            &[],
            &BuildOptions::default(),
            &f.root.join("o"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("make guest"), "{err}");
    }

    #[test]
    fn user_kernel_without_modules_assumes_builtin_and_warns() {
        let f = fixture(false);
        let mut k = f.kernel.clone();
        k.package = None;
        k.deb_version = None;
        k.modules_dir = None;
        let b = build_with_kernel(
            Role::Host,
            &f.init,
            &k,
            &[],
            &BuildOptions::default(),
            &f.root.join("o"),
            &mut |_| {},
        )
        .unwrap();
        assert!(b.info.modules.is_empty());
        assert_eq!(
            b.info.builtin,
            ["kvm_amd", "virtio_mmio", "9pnet_virtio", "9p", "tun"]
        );
        assert!(
            b.warnings.iter().any(|w| w.contains("built in")),
            "{:?}",
            b.warnings
        );
        let e = read_archive_file(&b.initrd).unwrap();
        assert_eq!(
            e.iter().find(|e| e.name == "etc/zc/modules").unwrap().data,
            b""
        );
    }

    #[test]
    fn a_dynamic_init_is_refused() {
        let f = fixture(false);
        std::fs::write(&f.init, crate::elf::testutil::elf_with_phdr(3)).unwrap();
        let e = build_with_kernel(
            Role::Guest,
            &f.init,
            &f.kernel,
            &[],
            &BuildOptions::default(),
            &f.root.join("o"),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, RoleError::InitNotStatic(_)), "{e}");
        assert!(e.is_usage());
        assert!(e.to_string().contains("crt-static"), "{e}");
        assert!(!f.root.join("o").join("guest").join("initrd.img").exists());
    }

    #[test]
    fn extra_module_roots() {
        let f = fixture(false);
        write_module(
            f.kernel.modules_dir.as_ref().unwrap(),
            "net",
            "extra-one",
            &["failover"],
            None,
        );
        let b = build_with_kernel(
            Role::Guest,
            &f.init,
            &f.kernel,
            &["extra-one"],
            &BuildOptions::default(),
            &f.root.join("o"),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(b.info.modules.last().map(String::as_str), Some("extra_one"));
    }

    fn config_path(f: &Fixture) -> PathBuf {
        f.kernel
            .vmlinuz
            .with_file_name(format!("config-{}", f.kernel.release))
    }

    fn edit_config(f: &Fixture, from: &str, to: &str) {
        let p = config_path(f);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{from}");
        std::fs::write(&p, text.replace(from, to)).unwrap();
    }

    #[test]
    fn preflight_stops_the_build_before_anything_is_written() {
        let f = fixture(false);
        edit_config(
            &f,
            "CONFIG_VIRTIO_NET=m\n",
            "# CONFIG_VIRTIO_NET is not set\n",
        );
        let out = f.root.join("out");
        let err = build_with_kernel(
            Role::Guest,
            &f.init,
            &f.kernel,
            &[],
            &BuildOptions::default(),
            &out,
            &mut |_| {},
        )
        .unwrap_err();
        match &err {
            RoleError::Preflight(p) => {
                assert_eq!(
                    p.lines(),
                    ["CONFIG_VIRTIO_NET is not set: the guest has no NIC"]
                )
            }
            other => panic!("expected a preflight error, got {other}"),
        }
        assert!(!out.exists(), "nothing may be written");
        // The host role has no preflight.
        assert!(!matches!(
            build_with_kernel(
                Role::Host,
                &f.init,
                &f.kernel,
                &[],
                &BuildOptions::default(),
                &out,
                &mut |_| {}
            ),
            Err(RoleError::Preflight(_))
        ));
    }

    #[test]
    fn skipped_methods_go_into_kernel_json() {
        let f = fixture(false);
        edit_config(&f, "CONFIG_IO_URING=y\n", "# CONFIG_IO_URING is not set\n");
        let b = build(&f, &mut vec![]);
        assert_eq!(b.info.skipped_methods.len(), 1);
        assert_eq!(
            b.info.skipped_methods[0].method,
            zc_protocol::Method::UringSendZc
        );
        let outer: RoleKernel =
            serde_json::from_str(&std::fs::read_to_string(&b.kernel_json).unwrap()).unwrap();
        assert_eq!(outer.skipped_methods, b.info.skipped_methods);
        let text = std::fs::read_to_string(&b.kernel_json).unwrap();
        assert!(text.contains("\"method\": \"uring_send_zc\""), "{text}");
    }

    #[test]
    fn the_transport_is_a_parameter_of_the_plan() {
        let f = fixture(false);
        let mods = f.kernel.modules_dir.clone().unwrap();
        // The fixture has both transports; first a kernel with virtio-mmio only.
        std::fs::remove_file(mods.join("kernel/drivers/virtio/virtio_pci.ko")).unwrap();
        let index = ModuleIndex::scan(&mods).unwrap();
        let pci = GuestNeeds {
            transport: TransportChoice::Only(kconfig::Transport::Pci),
            ..GuestNeeds::default()
        };
        let err = plan_modules(Role::Guest, Some(&index), &pci, &[]).unwrap_err();
        assert!(err.to_string().contains("none of virtio_pci"), "{err}");
        write_module(
            &mods,
            "drivers/virtio",
            "virtio_pci",
            &["virtio", "virtio_ring"],
            None,
        );
        let index = ModuleIndex::scan(&mods).unwrap();
        let plan = plan_modules(Role::Guest, Some(&index), &pci, &[]).unwrap();
        let names: Vec<&str> = plan.modules.iter().map(|m| m.name.as_str()).collect();
        assert!(
            names.contains(&"virtio_pci") && !names.contains(&"virtio_mmio"),
            "{names:?}"
        );
        let any = plan_modules(Role::Guest, Some(&index), &GuestNeeds::default(), &[]).unwrap();
        let names: Vec<&str> = any.modules.iter().map(|m| m.name.as_str()).collect();
        assert!(
            names.contains(&"virtio_pci") && names.contains(&"virtio_mmio"),
            "{names:?}"
        );
        // Neither transport at all.
        std::fs::remove_file(mods.join("kernel/drivers/virtio/virtio_pci.ko")).unwrap();
        std::fs::remove_file(mods.join("kernel/drivers/virtio/virtio_mmio.ko")).unwrap();
        let index = ModuleIndex::scan(&mods).unwrap();
        let err = plan_modules(Role::Guest, Some(&index), &GuestNeeds::default(), &[]).unwrap_err();
        assert!(
            err.to_string().contains("none of virtio_mmio, virtio_pci"),
            "{err}"
        );
    }

    /// Replaces virtio_net.ko with a compressed copy.
    fn compress_virtio_net(f: &Fixture, c: Compression) -> Vec<u8> {
        let dir = f
            .kernel
            .modules_dir
            .as_ref()
            .unwrap()
            .join("kernel/drivers/net");
        let raw = std::fs::read(dir.join("virtio_net.ko")).unwrap();
        let packed = match c {
            Compression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut raw.as_slice(), &mut out).unwrap();
                out
            }
            Compression::Gzip => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => {
                // One raw block: ruzstd has no encoder.
                let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0xA0];
                let len = u32::try_from(raw.len()).expect("a test module is small");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&(1u32 | (len << 3)).to_le_bytes()[..3]);
                out.extend_from_slice(&raw);
                out
            }
            Compression::None => unreachable!(),
        };
        std::fs::remove_file(dir.join("virtio_net.ko")).unwrap();
        std::fs::write(dir.join(format!("virtio_net{}", c.suffix())), &packed).unwrap();
        raw
    }

    #[rstest::rstest]
    #[case::xz(Compression::Xz, "XZ")]
    #[case::zstd(Compression::Zstd, "ZSTD")]
    #[case::gzip(Compression::Gzip, "GZIP")]
    fn compressed_modules_are_kept_only_when_the_kernel_decompresses_them(
        #[case] c: Compression,
        #[case] option: &str,
    ) {
        let f = fixture(false);
        let raw = compress_virtio_net(&f, c);
        let find = |b: &Built| {
            let entries = read_archive_file(&b.initrd).unwrap();
            let i = b
                .info
                .modules
                .iter()
                .position(|m| m == "virtio_net")
                .unwrap();
            let p = b.info.module_paths[i].clone();
            let e = entries
                .into_iter()
                .find(|e| format!("/{}", e.name) == p)
                .unwrap();
            (p, e.data)
        };
        // The fixture's config has no MODULE_DECOMPRESS: zc decompresses.
        let b = build(&f, &mut vec![]);
        let (path, data) = find(&b);
        assert!(path.ends_with("-virtio_net.ko"), "{path}");
        assert_eq!(data, raw);
        // With the kernel's own decompressor for that format: kept as shipped.
        let p = config_path(&f);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(&format!(
            "CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_{option}=y\n"
        ));
        std::fs::write(&p, text).unwrap();
        let b = build(&f, &mut vec![]);
        assert!(b.rebuilt);
        let (path, data) = find(&b);
        assert!(
            path.ends_with(&format!("-virtio_net{}", c.suffix())),
            "{path}"
        );
        let shipped = f
            .kernel
            .modules_dir
            .as_ref()
            .unwrap()
            .join(format!("kernel/drivers/net/virtio_net{}", c.suffix()));
        assert_eq!(data, std::fs::read(shipped).unwrap());
    }

    #[test]
    fn optional_modules_are_marked_in_the_list() {
        let f = fixture(false);
        let mods = f.kernel.modules_dir.clone().unwrap();
        std::fs::write(mods.join("modules.builtin"), "").unwrap();
        write_module(&mods, "fs/ext4", "ext4", &[], Some("pre: crc32c"));
        crate::modules::testutil::write_module_with_aliases(
            &mods,
            "crypto",
            "crc32c_generic",
            &[],
            None,
            &["crc32c"],
        );
        let b = build(&f, &mut vec![]);
        assert_eq!(b.info.optional_modules, ["crc32c_generic"]);
        let entries = read_archive_file(&b.initrd).unwrap();
        let list = entries.iter().find(|e| e.name == "etc/zc/modules").unwrap();
        let list = String::from_utf8(list.data.clone()).unwrap();
        let lines: Vec<&str> = list.lines().collect();
        let n = b.info.modules.len();
        assert_eq!(lines.len(), n);
        assert_eq!(
            lines[n - 2],
            format!("/lib/modules/{:02}-crc32c_generic.ko optional", n - 1)
        );
        assert_eq!(lines[n - 1], format!("/lib/modules/{n:02}-ext4.ko"));
    }
}
