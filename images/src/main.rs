//! `zc-image`: builds the kernel + initramfs each zc VM role boots.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use zc_images::debian::{self, Flavour};
use zc_images::disk::{self, DiskRequest, FileSpec};
use zc_images::initramfs;
use zc_images::role::{self, BuildRequest, KernelSource, Role};
use zc_images::vmlinux;

mod kernel_cmd;

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
        /// Another module to load (with its dependencies); repeatable.
        #[arg(long = "module", value_name = "NAME")]
        modules: Vec<String>,
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Build {
            role,
            init,
            kernel_version,
            kernel,
            modules_dir,
            modules,
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
                cache,
                out,
            };
            let built = role::build(&req, &mut |l: &str| step(l))?;
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
        Cmd::BuildKernel(args) => kernel_cmd::run(args)?,
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
    Ok(())
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
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zc-image: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
