//! The kernel's configuration, and the preflight: what a zc guest needs from it,
//! checked before anything boots.
//!
//! A config comes from the `.config` of a source tree, the `config-<release>` a
//! packaged kernel has beside its image (`boot/config-<release>` in a `.deb`), or the
//! copy a kernel built with `CONFIG_IKCONFIG` carries: gzip'd between the markers
//! `IKCFG_ST` and `IKCFG_ED` in the decompressed image (what the kernel's
//! `scripts/extract-ikconfig` looks for), or in `kernel/configs.ko` when
//! `CONFIG_IKCONFIG=m`.
//!
//! [`REQUIREMENTS`] is the table of options zc needs, each with the Kconfig file that
//! defines it (paths as of Linux 6.12) and the part of zc that needs it. [`preflight`]
//! checks a config against it: one line per missing option saying what breaks, and
//! the methods a missing option only SKIPs. [`fragment`] writes the table as a Kconfig
//! fragment for `scripts/kconfig/merge_config.sh`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zc_protocol::Method;

use crate::modules::{Compression, ModuleError, ModuleIndex};
use crate::vmlinux::{self, VmlinuxError};

/// One option's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `=y`.
    Yes,
    /// `=m`.
    Module,
    /// `# CONFIG_X is not set` (or `=n`).
    No,
    /// Anything else: a number or a string (quotes kept).
    Other(String),
}

/// Where a config was read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum ConfigSource {
    /// A text file (`.config`, `config-<release>`, or one the user named).
    File(PathBuf),
    /// The IKCONFIG copy inside a kernel image.
    Ikconfig(PathBuf),
    /// The IKCONFIG copy inside `configs.ko`.
    IkconfigModule(PathBuf),
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Ikconfig(p) => write!(f, "the IKCONFIG copy in {}", p.display()),
            ConfigSource::IkconfigModule(p) => {
                write!(f, "the IKCONFIG copy in {}", p.display())
            }
        }
    }
}

/// A kernel configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    options: BTreeMap<String, Value>,
    /// Where it came from.
    pub source: ConfigSource,
}

/// Errors finding or reading a config.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no `CONFIG_` line at all.
    #[error("{0} is not a kernel config: it has no CONFIG_ line; pass the tree's .config or the packaged kernel's config-<release>")]
    NotAConfig(PathBuf),
    /// The image's payload cannot be decompressed to look for IKCONFIG.
    #[error("cannot look for IKCONFIG in {path}: {source}")]
    Image {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: VmlinuxError,
    },
    /// The IKCONFIG data is not valid gzip.
    #[error("the IKCONFIG copy in {path} is damaged: {why}")]
    BadIkconfig {
        /// The image or module.
        path: PathBuf,
        /// The decoder's complaint.
        why: String,
    },
    /// `configs.ko` cannot be read.
    #[error(transparent)]
    Module(#[from] ModuleError),
}

impl KernelConfig {
    /// Parses `.config` text: `CONFIG_X=y|m|<value>` and `# CONFIG_X is not set`.
    pub fn parse(text: &str, source: ConfigSource) -> Self {
        let mut options = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("# CONFIG_") {
                if let Some(name) = rest.strip_suffix(" is not set") {
                    options.insert(name.trim().to_string(), Value::No);
                }
            } else if let Some(rest) = line.strip_prefix("CONFIG_") {
                if let Some((name, value)) = rest.split_once('=') {
                    let v = match value {
                        "y" => Value::Yes,
                        "m" => Value::Module,
                        "n" => Value::No,
                        other => Value::Other(other.to_string()),
                    };
                    options.insert(name.to_string(), v);
                }
            }
        }
        Self { options, source }
    }

    /// Reads a config file (refusing one without any `CONFIG_` line).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let c = Self::parse(&text, ConfigSource::File(path.to_path_buf()));
        if c.options.is_empty() {
            return Err(ConfigError::NotAConfig(path.to_path_buf()));
        }
        Ok(c)
    }

    /// The value of `name` (without `CONFIG_`); an option absent from the file is
    /// not set.
    pub fn get(&self, name: &str) -> Value {
        self.options.get(name).cloned().unwrap_or(Value::No)
    }

    /// Whether `name` is `=y`.
    pub fn is_y(&self, name: &str) -> bool {
        self.get(name) == Value::Yes
    }

    /// Whether the kernel can decompress a module compressed with `c` itself
    /// (`finit_module(MODULE_INIT_COMPRESSED_FILE)`): it needs
    /// `CONFIG_MODULE_DECOMPRESS` and only has the decompressor of the compression
    /// it was built for (`kernel/module/decompress.c`).
    pub fn decompresses(&self, c: Compression) -> bool {
        let option = match c {
            Compression::None => return true,
            Compression::Xz => "MODULE_COMPRESS_XZ",
            Compression::Zstd => "MODULE_COMPRESS_ZSTD",
            Compression::Gzip => "MODULE_COMPRESS_GZIP",
        };
        self.is_y("MODULE_DECOMPRESS") && self.is_y(option)
    }
}

/// Finds the gzip'd config between `IKCFG_ST` and `IKCFG_ED` in `data` (a vmlinux or
/// a module) and returns its text, as `scripts/extract-ikconfig` does.
pub fn ikconfig_in(data: &[u8]) -> Result<Option<String>, String> {
    const START: &[u8] = b"IKCFG_ST";
    let Some(at) = data.windows(START.len()).position(|w| w == START) else {
        return Ok(None);
    };
    let mut text = String::new();
    flate2::read::GzDecoder::new(&data[at + START.len()..])
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(Some(text))
}

/// Reads the IKCONFIG copy of a kernel image (bzImage, or ELF vmlinux), if it has one.
pub fn read_ikconfig(image: &Path) -> Result<Option<KernelConfig>, ConfigError> {
    let data = std::fs::read(image).map_err(|source| ConfigError::Read {
        path: image.to_path_buf(),
        source,
    })?;
    let elf = if crate::elf::is_elf(&data) {
        data
    } else {
        vmlinux::extract_vmlinux(&data).map_err(|source| ConfigError::Image {
            path: image.to_path_buf(),
            source,
        })?
    };
    from_ikconfig(&elf, ConfigSource::Ikconfig(image.to_path_buf()), image)
}

fn from_ikconfig(
    data: &[u8],
    source: ConfigSource,
    path: &Path,
) -> Result<Option<KernelConfig>, ConfigError> {
    match ikconfig_in(data) {
        Ok(None) => Ok(None),
        Ok(Some(text)) => Ok(Some(KernelConfig::parse(&text, source))),
        Err(why) => Err(ConfigError::BadIkconfig {
            path: path.to_path_buf(),
            why,
        }),
    }
}

/// The places a kernel's config is looked for, in order: an explicit file; the
/// source tree's `.config` (for `<tree>/arch/x86/boot/bzImage` or `<tree>/vmlinux`);
/// `config-<release>` beside the image; `build/.config` in the modules directory.
pub fn config_candidates(image: &Path, release: &str, modules_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let dir = image.parent().unwrap_or(Path::new("."));
    if let Some(tree) = image
        .ancestors()
        .nth(4)
        .filter(|_| image.ends_with("arch/x86/boot/bzImage"))
    {
        out.push(tree.join(".config"));
    }
    out.push(dir.join(".config"));
    out.push(dir.join(format!("config-{release}")));
    if let Some(m) = modules_dir {
        out.push(m.join("build/.config"));
    }
    out
}

/// Finds and reads the config of a kernel: `explicit` if given, else the first of
/// [`config_candidates`] that exists, else the IKCONFIG copy in the image, else the
/// one in `configs.ko` among `modules`. `None` when there is none anywhere.
pub fn find_config(
    explicit: Option<&Path>,
    image: &Path,
    release: &str,
    modules: Option<&ModuleIndex>,
) -> Result<Option<KernelConfig>, ConfigError> {
    if let Some(p) = explicit {
        return KernelConfig::read(p).map(Some);
    }
    for c in config_candidates(image, release, modules.map(ModuleIndex::dir)) {
        if c.is_file() {
            return KernelConfig::read(&c).map(Some);
        }
    }
    if let Some(c) = read_ikconfig(image)? {
        return Ok(Some(c));
    }
    if let Some(path) = modules.and_then(|m| m.path("configs")) {
        let data = crate::modules::read_uncompressed(path)?;
        return from_ikconfig(
            &data,
            ConfigSource::IkconfigModule(path.to_path_buf()),
            path,
        );
    }
    Ok(None)
}

/// The virtio transport the guest's devices sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// virtio-mmio, described in ACPI (`LNRO0005`): what zc-vmm has today.
    Mmio,
    /// virtio-pci behind a PCI host bridge, with MSI-X.
    Pci,
}

impl Transport {
    /// The driver's module name.
    pub fn module(self) -> &'static str {
        match self {
            Transport::Mmio => "virtio_mmio",
            Transport::Pci => "virtio_pci",
        }
    }

    /// The option that builds the driver.
    pub fn option(self) -> &'static str {
        match self {
            Transport::Mmio => "VIRTIO_MMIO",
            Transport::Pci => "VIRTIO_PCI",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Mmio => "virtio-mmio",
            Transport::Pci => "virtio-pci",
        })
    }
}

/// Which transport(s) the guest must be able to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// Whichever the kernel has: both drivers go into the initramfs when both exist,
    /// and the kernel must have at least one.
    #[default]
    Any,
    /// Only this one.
    Only(Transport),
}

impl TransportChoice {
    /// The transports it accepts.
    pub fn transports(self) -> &'static [Transport] {
        match self {
            TransportChoice::Any => &[Transport::Mmio, Transport::Pci],
            TransportChoice::Only(Transport::Mmio) => &[Transport::Mmio],
            TransportChoice::Only(Transport::Pci) => &[Transport::Pci],
        }
    }
}

/// What an option is needed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Without it the guest cannot run at all.
    Guest,
    /// Needed by this transport only.
    Transport(Transport),
    /// Without it these methods cannot run: they are skipped, not the run.
    Methods(&'static [Method]),
    /// The guest runs, but something the user sees is lost (e.g. the console).
    Recommended,
    /// Not checked; only in the fragment, for what zc does with the kernel it builds.
    Fragment,
}

/// One option zc needs.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// The option, without `CONFIG_`.
    pub option: &'static str,
    /// What it is needed for.
    pub scope: Scope,
    /// The module that `=m` builds, when the option is a driver zc loads itself
    /// (`=m` then is fine if that module is in the modules directory); `None` for an
    /// option that must be `=y`.
    pub module: Option<&'static str>,
    /// What breaks without it (the end of the preflight's line).
    pub breaks: &'static str,
    /// The Kconfig file that defines it (Linux 6.12).
    pub kconfig: &'static str,
    /// The part of zc that needs it.
    pub needed_by: &'static str,
}

const fn req(
    option: &'static str,
    scope: Scope,
    module: Option<&'static str>,
    breaks: &'static str,
    kconfig: &'static str,
    needed_by: &'static str,
) -> Requirement {
    Requirement {
        option,
        scope,
        module,
        breaks,
        kconfig,
        needed_by,
    }
}

const MSG_ZEROCOPY_METHODS: &[Method] = &[
    Method::DirectZerocopy,
    Method::MmapZerocopy,
    Method::CowZerocopy,
];

/// The options a zc guest needs, what each is for, and where it comes from.
pub const REQUIREMENTS: &[Requirement] = &[
    req("64BIT", Scope::Guest, None,
        "zc-vmm starts the kernel at its 64-bit entry point in long mode; a 32-bit kernel cannot boot",
        "arch/x86/Kconfig", "vmm/ boot: 64-bit boot protocol"),
    req("BLK_DEV_INITRD", Scope::Guest, None,
        "the kernel cannot unpack the initramfs that holds /init",
        "init/Kconfig", "images/src/role.rs: the initramfs"),
    req("RD_GZIP", Scope::Guest, None,
        "the initramfs is gzip'd and the kernel cannot decompress it",
        "usr/Kconfig", "images/src/initramfs.rs: gzip'd newc cpio"),
    req("BINFMT_ELF", Scope::Guest, None,
        "the kernel cannot run /init, a static ELF program",
        "fs/Kconfig.binfmt", "guest-tests: zc-guest"),
    req("DEVTMPFS", Scope::Guest, None,
        "/dev/vda never appears: the guest mounts devtmpfs on /dev",
        "drivers/base/Kconfig", "guest-tests/src/mounts.rs"),
    req("PROC_FS", Scope::Guest, None,
        "the guest cannot mount /proc",
        "fs/proc/Kconfig", "guest-tests/src/mounts.rs"),
    req("SYSFS", Scope::Guest, None,
        "the guest cannot mount /sys",
        "fs/sysfs/Kconfig", "guest-tests/src/mounts.rs"),
    req("PROC_SYSCTL", Scope::Guest, None,
        "/proc/sys/vm/drop_caches is missing: the guest cannot drop the page cache before each method",
        "fs/proc/Kconfig", "guest-tests/src/disk.rs: drop_caches"),
    req("FUTEX", Scope::Guest, None,
        "the guest program (Rust's standard library, threads and locks) needs futex()",
        "init/Kconfig", "guest-tests: zc-guest"),
    req("X86_IOPL_IOPERM", Scope::Guest, None,
        "ioperm() fails: the guest cannot write its control channel (COM2) or ask for dirty-page samples",
        "arch/x86/Kconfig", "guest-tests/src/control.rs, docs/control-channel.md"),
    req("ACPI", Scope::Guest, None,
        "the guest cannot power off through zc-vmm's FADT sleep register, and finds no virtio-mmio device (they are described in the DSDT)",
        "drivers/acpi/Kconfig", "vmm/ ACPI tables (FADT, DSDT)"),
    req("NET", Scope::Guest, None,
        "the guest has no network stack",
        "net/Kconfig", "guest-tests/src/net.rs"),
    req("INET", Scope::Guest, None,
        "the guest has no TCP/IP: it cannot reach the peer at 10.0.2.2",
        "net/Kconfig", "guest-tests/src/net.rs"),
    req("BLOCK", Scope::Guest, None,
        "the guest has no block layer: no disk",
        "block/Kconfig", "guest-tests/src/disk.rs"),
    req("VIRTIO_BLK", Scope::Guest, Some("virtio_blk"),
        "the guest has no disk (/dev/vda)",
        "drivers/block/Kconfig", "devices/ virtio-blk; guest-tests/src/disk.rs"),
    req("VIRTIO_NET", Scope::Guest, Some("virtio_net"),
        "the guest has no NIC",
        "drivers/net/Kconfig", "devices/ virtio-net; guest-tests/src/net.rs"),
    req("EXT4_FS", Scope::Guest, Some("ext4"),
        "the guest cannot mount the test disk (ext4)",
        "fs/ext4/Kconfig", "images/src/disk.rs: mkfs.ext4"),
    req("VIRTIO_MMIO", Scope::Transport(Transport::Mmio), Some("virtio_mmio"),
        "the guest finds no virtio-mmio device: no disk, no NIC",
        "drivers/virtio/Kconfig", "devices/ virtio-mmio transport"),
    req("VIRTIO_PCI", Scope::Transport(Transport::Pci), Some("virtio_pci"),
        "the guest finds no virtio-pci device: no disk, no NIC",
        "drivers/virtio/Kconfig", "the virtio-pci transport (issue 8)"),
    req("PCI", Scope::Transport(Transport::Pci), None,
        "the guest has no PCI bus",
        "drivers/pci/Kconfig", "the virtio-pci transport (issue 8)"),
    req("PCI_MSI", Scope::Transport(Transport::Pci), None,
        "virtio-pci cannot use MSI-X, the only interrupts zc's PCI devices raise",
        "drivers/pci/Kconfig", "the virtio-pci transport (issue 8)"),
    req("IO_URING", Scope::Methods(&[Method::UringSendZc]), None,
        "io_uring_setup() fails with ENOSYS",
        "init/Kconfig", "guest-tests/src/methods/uring_send_zc.rs"),
    req("PRINTK", Scope::Recommended, None,
        "the kernel prints nothing: a failed boot shows no kernel messages",
        "init/Kconfig", "zc-vmm's console log"),
    req("TTY", Scope::Recommended, None,
        "no console device: a failed boot shows no kernel messages",
        "drivers/tty/Kconfig", "zc-vmm's console log"),
    req("SERIAL_8250", Scope::Recommended, None,
        "no driver for COM1: a failed boot shows no kernel messages",
        "drivers/tty/serial/8250/Kconfig", "zc-vmm's COM1 console (console=ttyS0)"),
    req("SERIAL_8250_CONSOLE", Scope::Recommended, None,
        "console=ttyS0 is not a console: a failed boot shows no kernel messages",
        "drivers/tty/serial/8250/Kconfig", "zc-vmm's COM1 console (console=ttyS0)"),
    req("IKCONFIG", Scope::Fragment, None,
        "the image carries no copy of its config, so a preflight needs the .config beside it",
        "init/Kconfig", "this preflight"),
];

/// Methods that need a newer kernel than `release`, with the reason.
fn version_skips(release: &str) -> Vec<MethodSkip> {
    let Some((major, minor)) = parse_release(release) else {
        return vec![];
    };
    let mut out = Vec::new();
    // TCP MSG_ZEROCOPY: Linux 4.14 (net/ipv4/tcp.c, SO_ZEROCOPY); always built in since.
    if (major, minor) < (4, 14) {
        for &m in MSG_ZEROCOPY_METHODS {
            out.push(MethodSkip {
                method: m,
                reason: format!("MSG_ZEROCOPY on TCP needs Linux 4.14, this kernel is {release}"),
            });
        }
    }
    // IORING_OP_SEND_ZC: Linux 6.0 (io_uring/net.c).
    if (major, minor) < (6, 0) {
        out.push(MethodSkip {
            method: Method::UringSendZc,
            reason: format!("IORING_OP_SEND_ZC needs Linux 6.0, this kernel is {release}"),
        });
    }
    out
}

/// `6.12.117+deb12-rt-amd64` -> (6, 12).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// A method the guest will skip on this kernel, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodSkip {
    /// The method.
    pub method: Method,
    /// Why (one line).
    pub reason: String,
}

/// One missing option and what it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The option, with `CONFIG_`, or several joined by ` or `.
    pub option: String,
    /// The whole line, e.g. `CONFIG_VIRTIO_NET is not set: the guest has no NIC`.
    pub line: String,
}

/// What the preflight found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preflight {
    /// Where the config came from.
    pub config: ConfigSource,
    /// The kernel release checked.
    pub release: String,
    /// Missing options without which the guest cannot run.
    pub fatal: Vec<Finding>,
    /// Methods that will be skipped, with the reason.
    pub skips: Vec<MethodSkip>,
    /// Missing options the guest runs without, at a cost said in the line.
    pub warnings: Vec<Finding>,
    /// The transports the kernel can use, of those asked for.
    pub transports: Vec<Transport>,
}

impl Preflight {
    /// Whether the guest can run.
    pub fn ok(&self) -> bool {
        self.fatal.is_empty()
    }

    /// The report, one line per finding: fatal ones, then `SKIP <method>: ...`, then
    /// `warning: ...`.
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> = self.fatal.iter().map(|f| f.line.clone()).collect();
        out.extend(
            self.skips
                .iter()
                .map(|s| format!("SKIP {}: {}", s.method, s.reason)),
        );
        out.extend(self.warnings.iter().map(|w| format!("warning: {}", w.line)));
        out
    }
}

/// How an option stands in a config, given the modules at hand.
enum Status {
    Ok,
    Missing(String),
}

fn status(
    r: &Requirement,
    config: &KernelConfig,
    modules: Option<&ModuleIndex>,
) -> Result<Status, ModuleError> {
    let opt = r.option;
    Ok(match (config.get(opt), r.module) {
        (Value::Yes, _) | (Value::Other(_), _) => Status::Ok,
        (Value::Module, None) => Status::Ok,
        (Value::Module, Some(module)) => match modules {
            None => Status::Missing(format!(
                "CONFIG_{opt}=m but no modules directory was given (--modules-dir), so {module} cannot be loaded"
            )),
            Some(index) if index.provides(module)? => Status::Ok,
            Some(index) => Status::Missing(format!(
                "CONFIG_{opt}=m but {module} is not in {}",
                index.dir().display()
            )),
        },
        (Value::No, _) => Status::Missing(format!("CONFIG_{opt} is not set")),
    })
}

/// Checks `config` of kernel `release` against [`REQUIREMENTS`] for a guest on
/// `transport`. `modules` is the kernel's modules directory, if any: a driver built
/// as a module (`=m`) is fine only if its module is there. Also checks that
/// compressed modules can be loaded (the kernel decompresses them, or zc does: see
/// [`KernelConfig::decompresses`]; this never fails the check).
pub fn preflight(
    config: &KernelConfig,
    release: &str,
    transport: TransportChoice,
    modules: Option<&ModuleIndex>,
) -> Result<Preflight, ModuleError> {
    let mut fatal = Vec::new();
    let mut skips: Vec<MethodSkip> = Vec::new();
    let mut warnings = Vec::new();
    // Transport requirements, grouped: any one complete transport is enough.
    let mut transport_gaps: Vec<(Transport, Vec<(String, &Requirement)>)> = transport
        .transports()
        .iter()
        .map(|&t| (t, Vec::new()))
        .collect();
    for r in REQUIREMENTS {
        let Status::Missing(what) = status(r, config, modules)? else {
            continue;
        };
        let finding = |what: &str| Finding {
            option: format!("CONFIG_{}", r.option),
            line: format!("{what}: {}", r.breaks),
        };
        match r.scope {
            Scope::Guest => fatal.push(finding(&what)),
            Scope::Recommended => warnings.push(finding(&what)),
            Scope::Fragment => {}
            Scope::Methods(methods) => {
                for &m in methods {
                    skips.push(MethodSkip {
                        method: m,
                        reason: format!("{what}: {}", r.breaks),
                    });
                }
            }
            Scope::Transport(t) => {
                if let Some((_, gaps)) = transport_gaps.iter_mut().find(|(x, _)| *x == t) {
                    gaps.push((what, r));
                }
            }
        }
    }
    let usable: Vec<Transport> = transport_gaps
        .iter()
        .filter(|(_, gaps)| gaps.is_empty())
        .map(|(t, _)| *t)
        .collect();
    if usable.is_empty() {
        if let [(t, gaps)] = transport_gaps.as_slice() {
            for (what, r) in gaps {
                fatal.push(Finding {
                    option: format!("CONFIG_{}", r.option),
                    line: format!("{what}: {} ({t} was asked for)", r.breaks),
                });
            }
        } else {
            let options: Vec<String> = transport_gaps
                .iter()
                .map(|(t, _)| format!("CONFIG_{}", t.option()))
                .collect();
            let why: Vec<String> = transport_gaps
                .iter()
                .map(|(t, gaps)| {
                    let w: Vec<&str> = gaps.iter().map(|(w, _)| w.as_str()).collect();
                    format!("{t}: {}", w.join(", "))
                })
                .collect();
            fatal.push(Finding {
                option: options.join(" or "),
                line: format!(
                    "no usable virtio transport ({}): the guest finds neither disk nor NIC",
                    why.join("; ")
                ),
            });
        }
    }
    for s in version_skips(release) {
        if !skips.iter().any(|x| x.method == s.method) {
            skips.push(s);
        }
    }
    skips.sort_by_key(|s| Method::ALL.iter().position(|m| *m == s.method));
    Ok(Preflight {
        config: config.source.clone(),
        release: release.to_string(),
        fatal,
        skips,
        warnings,
        transports: usable,
    })
}

/// The Kconfig fragment a kernel for zc needs, for `scripts/kconfig/merge_config.sh`
/// on top of `tinyconfig` or a distribution's config: every option of
/// [`REQUIREMENTS`] for the virtio-pci transport (a kernel built for zc uses PCI, so
/// virtio-mmio is left out), plus the options the kernel's Kconfig hides them behind.
pub fn fragment() -> String {
    let mut out = String::from(
        "# zc guest kernel: generated by `zc-image config-fragment`.\n\
         # Merge with: scripts/kconfig/merge_config.sh -m .config <this file> && make olddefconfig\n\
         # Each option: the Kconfig file defining it, and the part of zc that needs it.\n",
    );
    let mut line = |option: &str, kconfig: &str, why: &str| {
        out.push_str(&format!("# {kconfig}: {why}\nCONFIG_{option}=y\n"));
    };
    // Menus and dependencies tinyconfig leaves off, without which merge_config.sh
    // drops the options below them.
    line(
        "VIRTIO_MENU",
        "drivers/virtio/Kconfig",
        "the menu VIRTIO_PCI sits in",
    );
    line(
        "NETDEVICES",
        "drivers/net/Kconfig",
        "the menu VIRTIO_NET sits in",
    );
    line(
        "NET_CORE",
        "drivers/net/Kconfig",
        "the menu VIRTIO_NET sits in",
    );
    line(
        "BLK_DEV",
        "drivers/block/Kconfig",
        "the menu VIRTIO_BLK sits in",
    );
    line("SERIAL_8250", "drivers/tty/serial/8250/Kconfig", "COM1");
    line(
        "IKCONFIG_PROC",
        "init/Kconfig",
        "/proc/config.gz, the config readable in the guest too",
    );
    for r in REQUIREMENTS {
        let wanted = match r.scope {
            Scope::Transport(t) => t == Transport::Pci,
            _ => true,
        };
        if wanted && r.option != "SERIAL_8250" {
            line(r.option, r.kconfig, r.needed_by);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::testutil::write_module;

    /// A config with everything a guest on virtio-mmio needs, as `=y`.
    fn full() -> String {
        REQUIREMENTS
            .iter()
            .map(|r| format!("CONFIG_{}=y\n", r.option))
            .collect()
    }

    fn cfg(text: &str) -> KernelConfig {
        KernelConfig::parse(text, ConfigSource::File("test.config".into()))
    }

    fn without(text: &str, option: &str, replacement: &str) -> String {
        text.replace(&format!("CONFIG_{option}=y\n"), replacement)
    }

    #[test]
    fn parses_config_lines() {
        let c = cfg("#\n# Linux/x86 6.12.0 Kernel Configuration\n#\nCONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"str ing\"\nCONFIG_E=0x10\nCONFIG_F=n\n  CONFIG_G=y  \n");
        assert_eq!(c.get("A"), Value::Yes);
        assert_eq!(c.get("B"), Value::Module);
        assert_eq!(c.get("C"), Value::No);
        assert_eq!(c.get("D"), Value::Other("\"str ing\"".into()));
        assert_eq!(c.get("E"), Value::Other("0x10".into()));
        assert_eq!(c.get("F"), Value::No);
        assert_eq!(c.get("G"), Value::Yes);
        assert_eq!(c.get("NEVER_MENTIONED"), Value::No);
    }

    #[test]
    fn a_file_without_config_lines_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, "hello\n").unwrap();
        assert!(matches!(
            KernelConfig::read(&p),
            Err(ConfigError::NotAConfig(_))
        ));
    }

    #[test]
    fn a_complete_config_passes_with_no_lines() {
        let p = preflight(&cfg(&full()), "6.12.0", TransportChoice::Any, None).unwrap();
        assert!(p.ok());
        assert!(p.lines().is_empty(), "{:?}", p.lines());
        assert_eq!(p.transports, [Transport::Mmio, Transport::Pci]);
    }

    #[test]
    fn missing_nic_is_one_fatal_line_naming_the_option_and_what_breaks() {
        let text = without(&full(), "VIRTIO_NET", "# CONFIG_VIRTIO_NET is not set\n");
        let p = preflight(&cfg(&text), "6.12.0", TransportChoice::Any, None).unwrap();
        assert!(!p.ok());
        assert_eq!(
            p.lines(),
            ["CONFIG_VIRTIO_NET is not set: the guest has no NIC"]
        );
        assert_eq!(p.fatal[0].option, "CONFIG_VIRTIO_NET");
    }

    #[test]
    fn a_module_is_fine_only_when_its_file_is_there() {
        let text = without(&full(), "EXT4_FS", "CONFIG_EXT4_FS=m\n");
        let c = cfg(&text);
        // No modules directory: the module cannot be loaded.
        let p = preflight(&c, "6.12.0", TransportChoice::Any, None).unwrap();
        assert_eq!(p.fatal.len(), 1, "{:?}", p.lines());
        assert!(
            p.fatal[0]
                .line
                .starts_with("CONFIG_EXT4_FS=m but no modules directory"),
            "{}",
            p.fatal[0].line
        );
        // A directory without ext4.
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "fs/jbd2", "jbd2", &[], None);
        std::fs::write(dir.path().join("modules.builtin"), "").unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let p = preflight(&c, "6.12.0", TransportChoice::Any, Some(&index)).unwrap();
        assert_eq!(
            p.lines(),
            [format!(
                "CONFIG_EXT4_FS=m but ext4 is not in {}: the guest cannot mount the test disk (ext4)",
                dir.path().display()
            )]
        );
        // With it.
        write_module(dir.path(), "fs/ext4", "ext4", &["jbd2"], None);
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(preflight(&c, "6.12.0", TransportChoice::Any, Some(&index))
            .unwrap()
            .ok());
    }

    #[test]
    fn one_transport_is_enough_unless_one_is_asked_for() {
        let text = without(&full(), "VIRTIO_MMIO", "");
        let c = cfg(&text);
        let p = preflight(&c, "6.12.0", TransportChoice::Any, None).unwrap();
        assert!(p.ok(), "{:?}", p.lines());
        assert_eq!(p.transports, [Transport::Pci]);
        let p = preflight(&c, "6.12.0", TransportChoice::Only(Transport::Mmio), None).unwrap();
        assert_eq!(
            p.lines(),
            ["CONFIG_VIRTIO_MMIO is not set: the guest finds no virtio-mmio device: no disk, no NIC (virtio-mmio was asked for)"]
        );
        // Neither: one line for both.
        let text = without(
            &without(&text, "PCI_MSI", ""),
            "VIRTIO_PCI",
            "# CONFIG_VIRTIO_PCI is not set\n",
        );
        let p = preflight(&cfg(&text), "6.12.0", TransportChoice::Any, None).unwrap();
        assert_eq!(
            p.lines(),
            ["no usable virtio transport (virtio-mmio: CONFIG_VIRTIO_MMIO is not set; virtio-pci: CONFIG_VIRTIO_PCI is not set, CONFIG_PCI_MSI is not set): the guest finds neither disk nor NIC"]
        );
        assert_eq!(p.fatal[0].option, "CONFIG_VIRTIO_MMIO or CONFIG_VIRTIO_PCI");
    }

    #[test]
    fn io_uring_missing_skips_its_method_not_the_run() {
        let text = without(&full(), "IO_URING", "# CONFIG_IO_URING is not set\n");
        let p = preflight(&cfg(&text), "6.12.0", TransportChoice::Any, None).unwrap();
        assert!(p.ok());
        assert_eq!(
            p.skips,
            [MethodSkip {
                method: Method::UringSendZc,
                reason: "CONFIG_IO_URING is not set: io_uring_setup() fails with ENOSYS".into()
            }]
        );
        assert_eq!(
            p.lines(),
            ["SKIP uring_send_zc: CONFIG_IO_URING is not set: io_uring_setup() fails with ENOSYS"]
        );
    }

    #[test]
    fn old_kernels_skip_methods_by_version() {
        let p = preflight(&cfg(&full()), "5.15.0-1-amd64", TransportChoice::Any, None).unwrap();
        let skipped: Vec<Method> = p.skips.iter().map(|s| s.method).collect();
        assert_eq!(skipped, [Method::UringSendZc]);
        let p = preflight(&cfg(&full()), "4.9.0", TransportChoice::Any, None).unwrap();
        let skipped: Vec<Method> = p.skips.iter().map(|s| s.method).collect();
        assert_eq!(
            skipped,
            [
                Method::DirectZerocopy,
                Method::MmapZerocopy,
                Method::UringSendZc,
                Method::CowZerocopy
            ]
        );
        assert_eq!(parse_release("6.12.117+deb12-rt-amd64"), Some((6, 12)));
        assert_eq!(parse_release("rc"), None);
    }

    #[test]
    fn console_options_are_warnings() {
        let text = without(&full(), "SERIAL_8250_CONSOLE", "");
        let p = preflight(&cfg(&text), "6.12.0", TransportChoice::Any, None).unwrap();
        assert!(p.ok());
        assert_eq!(p.warnings.len(), 1);
        assert!(p.lines()[0].starts_with("warning: CONFIG_SERIAL_8250_CONSOLE is not set: "));
    }

    #[test]
    fn module_decompression_needs_the_matching_compressor() {
        let c = cfg("CONFIG_MODULE_DECOMPRESS=y\nCONFIG_MODULE_COMPRESS_XZ=y\n");
        assert!(c.decompresses(Compression::Xz));
        assert!(c.decompresses(Compression::None));
        assert!(!c.decompresses(Compression::Zstd));
        let c = cfg("# CONFIG_MODULE_DECOMPRESS is not set\nCONFIG_MODULE_COMPRESS_XZ=y\n");
        assert!(!c.decompresses(Compression::Xz));
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A synthetic image as kernel/configs.c lays it out: `IKCFG_ST`, the gzip'd
    /// config, `IKCFG_ED`, amid other bytes.
    fn with_ikconfig(config: &str) -> Vec<u8> {
        let mut image = b"\x7fELF... other sections ...".to_vec();
        image.extend_from_slice(b"IKCFG_ST");
        image.extend_from_slice(&gz(config.as_bytes()));
        image.extend_from_slice(b"IKCFG_ED");
        image.extend_from_slice(&[0u8; 64]);
        image
    }

    #[test]
    fn ikconfig_is_found_between_its_markers() {
        let text = "# CONFIG_IO_URING is not set\nCONFIG_VIRTIO_NET=y\n";
        assert_eq!(
            ikconfig_in(&with_ikconfig(text)).unwrap().as_deref(),
            Some(text)
        );
        assert_eq!(ikconfig_in(b"no marker here").unwrap(), None);
        let mut bad = b"IKCFG_ST".to_vec();
        bad.extend_from_slice(b"not gzip");
        assert!(ikconfig_in(&bad).is_err());
    }

    /// A bzImage (boot protocol 2.15, setup_sects 3) whose payload is `payload`:
    /// payload_offset/payload_length at 0x248/0x24C, from the protected-mode code.
    fn bzimage_with_payload(payload: &[u8]) -> Vec<u8> {
        let mut img = crate::kernel::testutil::fake_bzimage("6.12.0 (t@t) #1");
        let (pm_start, offset) = (4 * 512, 0x100u32);
        img.resize(pm_start + offset as usize, 0xCC);
        img[0x248..0x24C].copy_from_slice(&offset.to_le_bytes());
        let length = u32::try_from(payload.len()).expect("a test payload is small");
        img[0x24C..0x250].copy_from_slice(&length.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn ikconfig_is_read_from_a_vmlinux_file_and_from_a_bzimage() {
        let dir = tempfile::tempdir().unwrap();
        let text = "CONFIG_VIRTIO_NET=m\n";
        // An ELF vmlinux: searched as is.
        let mut elf = crate::elf::testutil::elf_with_sections(&[(".text", b"\xc3")]);
        elf[0x12] = 62; // EM_X86_64, as extraction checks
        elf.extend_from_slice(&with_ikconfig(text));
        let p = dir.path().join("vmlinux");
        std::fs::write(&p, &elf).unwrap();
        let c = read_ikconfig(&p).unwrap().unwrap();
        assert_eq!(c.get("VIRTIO_NET"), Value::Module);
        assert_eq!(c.source, ConfigSource::Ikconfig(p.clone()));
        // A bzImage whose gzip payload is that vmlinux.
        let bz = bzimage_with_payload(&gz(&elf));
        let p = dir.path().join("bzImage");
        std::fs::write(&p, &bz).unwrap();
        let c = read_ikconfig(&p).unwrap().unwrap();
        assert_eq!(c.get("VIRTIO_NET"), Value::Module);
    }

    #[test]
    fn config_is_found_beside_the_image_or_in_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("linux");
        std::fs::create_dir_all(tree.join("arch/x86/boot")).unwrap();
        std::fs::write(tree.join(".config"), "CONFIG_A=y\n").unwrap();
        let image = tree.join("arch/x86/boot/bzImage");
        std::fs::write(&image, b"not read").unwrap();
        let c = find_config(None, &image, "6.12.0", None).unwrap().unwrap();
        assert_eq!(c.source, ConfigSource::File(tree.join(".config")));
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        std::fs::write(boot.join("config-6.1.0-1-amd64"), "CONFIG_B=m\n").unwrap();
        let image = boot.join("vmlinuz-6.1.0-1-amd64");
        std::fs::write(&image, b"not read").unwrap();
        let c = find_config(None, &image, "6.1.0-1-amd64", None)
            .unwrap()
            .unwrap();
        assert_eq!(c.get("B"), Value::Module);
        // An explicit file wins.
        let explicit = dir.path().join("my.config");
        std::fs::write(&explicit, "CONFIG_C=y\n").unwrap();
        let c = find_config(Some(&explicit), &image, "6.1.0-1-amd64", None)
            .unwrap()
            .unwrap();
        assert_eq!(c.get("C"), Value::Yes);
    }

    #[test]
    fn fragment_has_every_pci_guest_option_and_no_mmio() {
        let f = fragment();
        let c = cfg(&f);
        for r in REQUIREMENTS {
            let expected = !matches!(r.scope, Scope::Transport(Transport::Mmio));
            assert_eq!(c.is_y(r.option), expected, "{}", r.option);
        }
        for o in [
            "VIRTIO_PCI",
            "VIRTIO_BLK",
            "VIRTIO_NET",
            "EXT4_FS",
            "SERIAL_8250_CONSOLE",
            "ACPI",
            "IO_URING",
            "PCI",
            "PCI_MSI",
        ] {
            assert!(c.is_y(o), "{o}");
        }
        assert!(!f.contains("VIRTIO_MMIO"));
        // A kernel built from it passes the preflight on PCI with nothing to say
        // (every option is =y, so no module is needed).
        let p = preflight(&c, "6.12.0", TransportChoice::Only(Transport::Pci), None).unwrap();
        assert!(p.ok() && p.lines().is_empty(), "{:?}", p.lines());
        // Each option once.
        let mut seen = std::collections::BTreeSet::new();
        for l in f.lines().filter(|l| l.starts_with("CONFIG_")) {
            assert!(seen.insert(l), "{l} twice");
        }
    }
}
