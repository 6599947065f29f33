//! `zc-image`: builds the kernel + initramfs each zc VM role boots.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use zc_images::debian::{self, Flavour};
use zc_images::disk::{self, DiskRequest, FileSpec};
use zc_images::initramfs;
use zc_images::kconfig::{self, KernelConfig, Transport, TransportChoice};
use zc_images::kernel;
use zc_images::modules::ModuleIndex;
use zc_images::role::{self, BuildRequest, GuestNeeds, KernelSource, Role, RoleError};
use zc_images::vmlinux;

mod input;
mod kernel_cmd;

use input::BadInput;

#[derive(Parser)]
#[command(
    name = "zc-image",
    version,
    about = "Builds what zc's VMs boot: kernel, initramfs and test disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build `<out>/<role>/{vmlinuz,initrd.img,kernel.json}` (skipped when up to date).
    Build {
        /// guest: the VM under test (cloud kernel); host: the emulated KVM host (generic kernel).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The static program to run as /init (`make guest` builds it).
        #[arg(long)]
        init: PathBuf,
        /// Debian kernel to use: an ABI (6.1.0-56, 6.12.117+deb12) or a prefix (6.12);
        /// default: what linux-image-cloud-amd64 / linux-image-amd64 depends on now.
        #[arg(long, value_name = "PIN", conflicts_with = "kernel")]
        kernel_version: Option<String>,
        /// Your own kernel (bzImage or vmlinux) instead of Debian's.
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Modules of --kernel: `lib/modules/<release>`, or an `INSTALL_MOD_PATH`.
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules_dir: Option<PathBuf>,
        /// Another module to load (with its dependencies); repeatable. The guest's
        /// transport, disk, NIC and filesystem modules come in without naming them.
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
        /// The virtio transport(s) the guest's modules are for: any (every one the
        /// kernel has, at least one), mmio or pci.
        #[arg(long, value_enum, default_value = "any")]
        transport: TransportArg,
        /// The kernel's config, when it is not beside the image (.config of the tree,
        /// config-<release>) or inside it (IKCONFIG).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where Debian kernels are downloaded and unpacked.
        #[arg(long, default_value = "images/cache")]
        cache: PathBuf,
        /// Output directory.
        #[arg(long, default_value = "images/out")]
        out: PathBuf,
    },
    /// Fetch (or find in the cache) a Debian kernel and print its kernel.json.
    Kernel {
        /// cloud: the test guest's kernel; generic: the emulated host's.
        #[arg(long, value_enum)]
        flavour: FlavourArg,
        /// ABI (6.1.0-56) or prefix (6.12); default: the metapackage's current one.
        #[arg(long, value_name = "PIN")]
        kernel_version: Option<String>,
        /// Where Debian kernels are downloaded and unpacked.
        #[arg(long, default_value = "images/cache")]
        cache: PathBuf,
    },
    /// Build a kernel from source (default: Debian's linux-source-6.1, `make tinyconfig`
    /// plus zc's fragment, virtio-pci without virtio-mmio; cached by source, fragments,
    /// patches and compiler), or build and stage your own tree (--tree).
    BuildKernel(kernel_cmd::BuildKernelArgs),
    /// Build the test disk: an ext4 image of files with random, page-unique content,
    /// `<FILE>.json` (manifest) and `disk-files/` (the files' bytes, for verifying
    /// transfers) beside it; skipped when up to date.
    Disk {
        /// The image to write, e.g. images/out/guest/disk.img.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Image size (sparse): bytes or with K/M/G.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        size: u64,
        /// A file to put in the image's root: NAME=SIZE; repeatable
        /// (default: payload.bin=16M).
        #[arg(long = "file", value_name = "NAME=SIZE", value_parser = parse_file)]
        files: Vec<FileSpec>,
        /// The seed all content derives from (decimal or 0x-hex).
        #[arg(long, value_parser = parse_seed, default_value_t = disk::DEFAULT_SEED)]
        seed: u64,
    },
    /// Make a blank scratch disk: an ext4 image labelled zc-scratch (sparse) that the
    /// guest may write to (`zc-vmm run --scratch-disk`); replaces FILE.
    Scratch {
        /// The image to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Image size: bytes or with K/M/G.
        #[arg(long, default_value = "128M", value_parser = parse_size)]
        size: u64,
    },
    /// Check a kernel's config before any boot: one line per missing option and what
    /// breaks, and the methods it will SKIP. Exit 0: the guest can run; 1: it
    /// cannot; 2: bad input (no kernel, no config found).
    CheckConfig {
        /// A bzImage or vmlinux, a kernel source tree (with .config), an unpacked
        /// kernel package (boot/vmlinuz-*, lib/modules/*), or a config file.
        kernel: PathBuf,
        /// The kernel's config, when it is not where zc looks (see `build --config`).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The kernel's modules (`lib/modules/<release>`): a driver built as a module
        /// (=m) is fine only if its module is there.
        #[arg(long, value_name = "DIR")]
        modules_dir: Option<PathBuf>,
        /// The transport the guest will use: any, mmio or pci.
        #[arg(long, value_enum, default_value = "any")]
        transport: TransportArg,
        /// Print the result as JSON (fatal lines, skipped methods, warnings).
        #[arg(long)]
        json: bool,
    },
    /// Print the Kconfig fragment a zc guest kernel needs (virtio-pci, virtio-blk,
    /// virtio-net, ext4, the 8250 console, ACPI, PCI/MSI, io_uring, ...), to merge
    /// with the kernel's scripts/kconfig/merge_config.sh.
    ConfigFragment,
    /// List the entries of an initramfs (gzip'd or plain newc cpio).
    ListInitramfs {
        /// The archive, e.g. images/out/guest/initrd.img.
        file: PathBuf,
    },
    /// Extract the ELF vmlinux from a bzImage (to boot it through the VMM's ELF path).
    Vmlinux {
        /// The bzImage, e.g. images/out/guest/vmlinuz or arch/x86/boot/bzImage.
        #[arg(long, value_name = "BZIMAGE")]
        kernel: PathBuf,
        /// Where to write the vmlinux.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Guest,
    Host,
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Any,
    Mmio,
    Pci,
}

impl From<TransportArg> for TransportChoice {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Any => TransportChoice::Any,
            TransportArg::Mmio => TransportChoice::Only(Transport::Mmio),
            TransportArg::Pci => TransportChoice::Only(Transport::Pci),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FlavourArg {
    Cloud,
    Generic,
}

fn parse_size(text: &str) -> Result<u64, String> {
    disk::parse_size(text).map_err(|e| e.to_string())
}

fn parse_file(text: &str) -> Result<FileSpec, String> {
    text.parse().map_err(|e: disk::DiskError| e.to_string())
}

fn parse_seed(text: &str) -> Result<u64, String> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .map_err(|e| format!("{text:?}: {e} (expected a u64, decimal or 0x-hex)"))
}

fn step(line: &str) {
    println!("zc-image: {line}");
}

/// What `check-config KERNEL` points at.
struct KernelArg {
    image: Option<PathBuf>,
    config: Option<PathBuf>,
    modules_dir: Option<PathBuf>,
    release: Option<String>,
}

/// Works out the image, config and modules of a `check-config` argument (see its help).
fn kernel_arg(path: &Path) -> Result<KernelArg> {
    let mut arg = KernelArg {
        image: None,
        config: None,
        modules_dir: None,
        release: None,
    };
    if path.is_dir() {
        let first = |dir: &Path, prefix: &str| -> Option<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .ok()?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .collect();
            v.sort();
            v.pop()
        };
        // A kernel source tree, or an unpacked package (boot/ and lib/modules/).
        for image in [path.join("arch/x86/boot/bzImage"), path.join("vmlinux")] {
            if arg.image.is_none() && image.is_file() {
                arg.image = Some(image);
            }
        }
        if path.join(".config").is_file() {
            arg.config = Some(path.join(".config"));
        }
        if arg.image.is_none() {
            arg.image = first(&path.join("boot"), "vmlinuz-");
        }
        if let Some(image) = &arg.image {
            let release = kernel::release_of(&kernel::image_version(image)?).to_string();
            let modules = path.join("lib/modules").join(&release);
            if modules.is_dir() {
                arg.modules_dir = Some(modules);
            }
            arg.release = Some(release);
        }
        if arg.image.is_none() && arg.config.is_none() {
            anyhow::bail!(
                "{} holds no kernel: expected arch/x86/boot/bzImage or vmlinux (a source tree), \
                 or boot/vmlinuz-* (an unpacked package)",
                path.display()
            );
        }
        return Ok(arg);
    }
    match kernel::image_version(path) {
        Ok(version) => {
            arg.release = Some(kernel::release_of(&version).to_string());
            arg.image = Some(path.to_path_buf());
        }
        Err(image_err) => {
            // Not an image: perhaps a config file itself.
            // Report the image error: a config file is the rarer argument.
            KernelConfig::read(path).map_err(|_| anyhow::anyhow!("{image_err}"))?;
            arg.config = Some(path.to_path_buf());
        }
    }
    Ok(arg)
}

/// The release a config file names in its header (`# Linux/x86 6.12.0 Kernel
/// Configuration`).
fn release_in_config(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().take(5).find_map(|l| {
        let rest = l.strip_prefix("# Linux/")?;
        let (_, rest) = rest.split_once(' ')?;
        rest.strip_suffix(" Kernel Configuration")
            .map(str::to_string)
    })
}

fn check_config(
    kernel_path: &Path,
    config: Option<PathBuf>,
    modules_dir: Option<PathBuf>,
    transport: TransportChoice,
    json: bool,
) -> Result<ExitCode> {
    let bad = |e: anyhow::Error| -> Result<ExitCode> {
        eprintln!("zc-image: error: {e:#}");
        Ok(ExitCode::from(2))
    };
    let arg = match kernel_arg(kernel_path) {
        Ok(a) => a,
        Err(e) => return bad(e),
    };
    let modules_dir = modules_dir.or(arg.modules_dir);
    let index = match modules_dir.as_deref().map(ModuleIndex::scan).transpose() {
        Ok(i) => i,
        Err(e) => return bad(e.into()),
    };
    let explicit = config.or(arg.config);
    let release = arg
        .release
        .clone()
        .or_else(|| explicit.as_deref().and_then(release_in_config))
        .unwrap_or_default();
    let found = match &arg.image {
        Some(image) => kconfig::find_config(explicit.as_deref(), image, &release, index.as_ref()),
        None => explicit.as_deref().map(KernelConfig::read).transpose(),
    };
    let config = match found {
        Ok(Some(c)) => c,
        Ok(None) => {
            return bad(anyhow::anyhow!(
                "no config found for {}: no .config or config-{release} beside it and no IKCONFIG inside; pass --config FILE",
                kernel_path.display()
            ))
        }
        Err(e) => return bad(e.into()),
    };
    let p = match kconfig::preflight(&config, &release, transport, index.as_ref()) {
        Ok(p) => p,
        Err(e) => return bad(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        println!(
            "zc-image: kernel {}, config from {}{}",
            if release.is_empty() {
                "(release unknown)"
            } else {
                &release
            },
            p.config,
            match &modules_dir {
                Some(d) => format!(", modules in {}", d.display()),
                None => ", no modules directory".into(),
            }
        );
        for line in p.lines() {
            println!("{line}");
        }
        if p.ok() {
            let t: Vec<String> = p.transports.iter().map(ToString::to_string).collect();
            println!(
                "OK: the guest can run (transport: {}; {} method(s) skipped)",
                t.join(" or "),
                p.skips.len()
            );
        } else {
            println!("FAIL: the guest cannot run on this kernel; `zc-image config-fragment` lists every option zc needs");
        }
    }
    Ok(if p.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Where the user's kernel image must be: a bzImage or vmlinux file.
const KERNEL_HINT: &str = "pass a bzImage (arch/x86/boot/bzImage, /boot/vmlinuz-*) or a vmlinux";

/// Checks the arguments before any work: paths of the right type, sizes in range,
/// files of the right kind. Each mistake is one line; the binary exits 2 for it.
fn check(command: &Cmd) -> Result<(), BadInput> {
    match command {
        Cmd::Build {
            init,
            kernel,
            modules_dir,
            config,
            cache,
            out,
            ..
        } => {
            input::file(
                "init program",
                init,
                "build it with `make guest` (or pass --init PATH)",
            )?;
            if let Some(kernel) = kernel {
                input::file("--kernel", kernel, KERNEL_HINT)?;
            }
            if let Some(dir) = modules_dir {
                input::dir(
                    "--modules-dir",
                    dir,
                    "pass the kernel's lib/modules/<release> (or an INSTALL_MOD_PATH)",
                )?;
            }
            if let Some(config) = config {
                input::file(
                    "--config",
                    config,
                    "pass the kernel's .config (or /boot/config-<release>)",
                )?;
            }
            input::output_dir("--cache", cache)?;
            input::output_dir("--out", out)
        }
        Cmd::Kernel { cache, .. } => input::output_dir("--cache", cache),
        Cmd::BuildKernel(args) => kernel_cmd::check(args),
        Cmd::ConfigFragment => Ok(()),
        Cmd::Disk {
            out, size, files, ..
        } => {
            input::output_file("--out", out)?;
            if *size == 0 {
                return input::bad(
                    "--size 0: the image needs room for its files; give a size such as 64M".into(),
                );
            }
            if let Some(empty) = files.iter().find(|f| f.size == 0) {
                return input::bad(format!(
                    "--file {}=0: a file of 0 bytes gives the methods nothing to send; give its size, e.g. {}=16M",
                    empty.name, empty.name
                ));
            }
            Ok(())
        }
        Cmd::Scratch { out, size } => {
            input::output_file("--out", out)?;
            if *size < (8 << 20) {
                return input::bad(format!(
                    "--size {size}: a scratch disk needs room for ext4 and the files; give a size such as 128M"
                ));
            }
            Ok(())
        }
        Cmd::CheckConfig {
            kernel,
            config,
            modules_dir,
            ..
        } => {
            input::exists(
                "KERNEL",
                kernel,
                "pass a bzImage or vmlinux, a kernel source tree, an unpacked kernel package or a config file",
            )?;
            if let Some(config) = config {
                input::file("--config", config, "pass the kernel's .config")?;
            }
            if let Some(dir) = modules_dir {
                input::dir(
                    "--modules-dir",
                    dir,
                    "pass the kernel's lib/modules/<release>",
                )?;
            }
            Ok(())
        }
        Cmd::ListInitramfs { file } => {
            let hint = "pass an initramfs (a newc cpio archive, plain or gzip'd), e.g. images/out/guest/initrd.img";
            input::file("FILE", file, hint)?;
            let head = input::magic(file, 6)
                .map_err(|e| BadInput(format!("FILE {}: cannot read it: {e}", file.display())))?;
            if head.starts_with(&[0x1f, 0x8b]) || head == initramfs::NEWC_MAGIC {
                Ok(())
            } else {
                input::bad(format!(
                    "FILE {} is not an initramfs (neither gzip nor a newc cpio archive): {hint}",
                    file.display()
                ))
            }
        }
        Cmd::Vmlinux { kernel, out } => {
            input::file(
                "--kernel",
                kernel,
                "pass a bzImage (arch/x86/boot/bzImage or /boot/vmlinuz-*)",
            )?;
            input::output_file("--out", out)?;
            let image = std::fs::read(kernel).map_err(|e| {
                BadInput(format!(
                    "--kernel {}: cannot read it: {e}",
                    kernel.display()
                ))
            })?;
            match vmlinux::payload(&image) {
                Ok(p) if p.format.supported() => Ok(()),
                Ok(p) => input::bad(format!(
                    "--kernel {}: {}",
                    kernel.display(),
                    vmlinux::VmlinuxError::Unsupported(p.format)
                )),
                Err(e) => input::bad(format!("--kernel {}: {e}", kernel.display())),
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Build {
            role,
            init,
            kernel_version,
            kernel,
            modules_dir,
            modules,
            transport,
            config,
            cache,
            out,
        } => {
            let role = match role {
                RoleArg::Guest => Role::Guest,
                RoleArg::Host => Role::Host,
            };
            let kernel = match kernel {
                Some(image) => KernelSource::User { image, modules_dir },
                None => KernelSource::Debian {
                    pin: kernel_version,
                },
            };
            let req = BuildRequest {
                role,
                init,
                kernel,
                extra_modules: modules,
                guest: GuestNeeds {
                    transport: transport.into(),
                    ..GuestNeeds::default()
                },
                config,
                alias_cache: role::user_cache_dir().map(|d| d.join("module-aliases")),
                cache,
                out,
            };
            let built = match role::build(&req, &mut |l: &str| step(l)) {
                Err(RoleError::Preflight(p)) => {
                    for line in p.lines() {
                        eprintln!("zc-image: {line}");
                    }
                    eprintln!(
                        "zc-image: error: the guest cannot run on kernel {} (config: {}); nothing was written. \
                         Enable the options above (`zc-image config-fragment` lists them all)",
                        p.release, p.config
                    );
                    return Ok(ExitCode::from(2));
                }
                other => other?,
            };
            for w in &built.warnings {
                eprintln!("zc-image: warning: {w}");
            }
            println!(
                "zc-image: {role} {}: vmlinuz={} initrd={} kernel.json={}",
                if built.rebuilt { "built" } else { "up to date" },
                built.vmlinuz.display(),
                built.initrd.display(),
                built.kernel_json.display()
            );
        }
        Cmd::Kernel {
            flavour,
            kernel_version,
            cache,
        } => {
            let flavour = match flavour {
                FlavourArg::Cloud => Flavour::Cloud,
                FlavourArg::Generic => Flavour::Generic,
            };
            let info = debian::fetch(
                &cache,
                flavour,
                kernel_version.as_deref(),
                &mut |l: &str| eprintln!("zc-image: {l}"),
            )?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        Cmd::Disk {
            out,
            size,
            files,
            seed,
        } => {
            let req = DiskRequest {
                out,
                size,
                files,
                seed,
            };
            let built = disk::build(&req, &mut |l: &str| step(l))?;
            println!(
                "zc-image: disk {}: image={} manifest={} files={} ({})",
                if built.rebuilt { "built" } else { "up to date" },
                built.image.display(),
                built.manifest_path.display(),
                built.files_dir.display(),
                built
                    .manifest
                    .files
                    .iter()
                    .map(|f| format!("{} {} bytes", f.name, f.size))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Cmd::Scratch { out, size } => {
            zc_images::scratch::create(&out, size)?;
            println!(
                "zc-image: scratch disk {} ({size} bytes, ext4, label {})",
                out.display(),
                zc_images::scratch::LABEL
            );
        }
        Cmd::BuildKernel(args) => kernel_cmd::run(args)?,
        Cmd::CheckConfig {
            kernel,
            config,
            modules_dir,
            transport,
            json,
        } => return check_config(&kernel, config, modules_dir, transport.into(), json),
        Cmd::ConfigFragment => print!("{}", kconfig::fragment()),
        Cmd::ListInitramfs { file } => list(&file)?,
        Cmd::Vmlinux { kernel, out } => {
            let x = vmlinux::extract_file(&kernel, &out)?;
            println!(
                "zc-image: vmlinux: {} ({} bytes, ELF x86-64) from {} ({} bytes, {} payload of {} bytes)",
                out.display(),
                x.vmlinux_len,
                kernel.display(),
                x.bzimage_len,
                x.format,
                x.payload_len
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(file: &Path) -> Result<()> {
    let entries = initramfs::read_archive_file(file)
        .with_context(|| format!("listing {}", file.display()))?;
    for e in &entries {
        println!("{}", e.describe());
    }
    let bytes: usize = entries.iter().map(|e| e.data.len()).sum();
    println!("{} entries, {} bytes of file data", entries.len(), bytes);
    Ok(())
}

fn main() -> ExitCode {
    // Usage errors exit 2, as clap's own and as zc-vmm's do; failures along the way 1.
    let cli = Cli::parse();
    if let Err(e) = check(&cli.command) {
        eprintln!("zc-image: error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zc-image: error: {e:#}");
            ExitCode::from(if is_usage(&e) { 2 } else { 1 })
        }
    }
}

/// Whether `e` is a mistake in the input that only the work itself could find (an
/// init program that is not static, a pin no package matches, files too large for
/// the image): exit status 2 as well.
fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<BadInput>().is_some()
            || c.downcast_ref::<RoleError>()
                .is_some_and(RoleError::is_usage)
            || c.downcast_ref::<disk::DiskError>()
                .is_some_and(disk::DiskError::is_usage)
            || c.downcast_ref::<debian::DebianError>()
                .is_some_and(debian::DebianError::is_usage)
    })
}
