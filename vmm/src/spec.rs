//! The run spec: everything one `zc-vmm run` boots and where its outputs go, as one
//! serde value. `zc-vmm run`'s flags are turned into it in one place (`main.rs`);
//! `zc-vmm methods`, `zc-bench` and the tests build it directly and hand it over as a
//! JSON file (`zc-vmm run --spec FILE`), and so does a run that goes on inside the
//! emulated host ([`crate::emulated_run`]).
//!
//! [`RunSpec::validate`] checks what a user can get wrong before anything boots: each
//! error is one line that says what to do.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::boot::{self, BootError, KernelFormat};
use crate::layout;

/// Default kernel command line: serial console, reboot through the keyboard
/// controller, reboot at once on panic (so a panic ends the run), no PCI bus to scan
/// (the PCI transport drops `pci=off`: see [`RunSpec::full_cmdline`]).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
/// Default guest memory: 512 MiB.
pub const DEFAULT_MEM_BYTES: u64 = 512 << 20;
/// Default timeout of the guest's own run, in seconds.
pub const DEFAULT_TIMEOUT_S: u64 = 60;
/// Largest guest memory accepted.
pub const MAX_MEM_BYTES: u64 = 64 << 30;
/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 32;

/// One `zc-vmm run`: what to boot, its devices, and where the outputs go. Paths are
/// as the process that runs it sees them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Kernel image: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (without `append`).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Words appended to `cmdline` (the guest program's `zc.*` options).
    #[serde(default)]
    pub append: Option<String>,
    /// Guest RAM in bytes.
    #[serde(default = "default_mem_bytes")]
    pub mem_bytes: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Give up after this many seconds of the guest's own run.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// The virtio-blk disk, if any (`/dev/vda`).
    #[serde(default)]
    pub disk: Option<DiskSpec>,
    /// The scratch disk, if any: a second virtio-blk disk, always writable, a blank
    /// ext4 image (`zc_images::scratch`) the guest writes received files to and the
    /// host reads back after the run. The guest finds it by its label; its DMA
    /// records are blk card 1 (`blk/1/...`), the test disk's card 0.
    #[serde(default)]
    pub scratch_disk: Option<PathBuf>,
    /// The virtio-net cards, in the order the guest numbers them: card `n` has the
    /// addresses of `zc_protocol::addr::Card` `n` (its own subnet and peer).
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Sample KVM's dirty-page log when the guest asks (`dirty.rs`), looking for the
    /// first NIC's first expected file; needs `outputs.dma_log`.
    #[serde(default)]
    pub dirty_samples: bool,
    /// The virtio transport the devices sit behind (`auto`: [`choose_transport`]).
    #[serde(default)]
    pub transport: TransportChoice,
    /// Where the outputs go.
    #[serde(default)]
    pub outputs: RunOutputs,
}

/// The virtio transport asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum TransportChoice {
    /// Whichever the kernel has ([`choose_transport`]).
    #[default]
    Auto,
    /// virtio-mmio devices described in ACPI.
    Mmio,
    /// Modern virtio-pci functions on a PCI host bridge, MSI-X interrupts.
    Pci,
}

/// The virtio transport a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci.
    Pci,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Mmio => "mmio",
            Transport::Pci => "pci",
        })
    }
}

impl From<Transport> for TransportChoice {
    fn from(transport: Transport) -> Self {
        match transport {
            Transport::Mmio => TransportChoice::Mmio,
            Transport::Pci => TransportChoice::Pci,
        }
    }
}

/// The one place the transport is decided: what was asked for, or for `auto` what
/// `kernel` can drive, with the reason in words. `auto` reads the kernel's config
/// (the `config-<release>` or `.config` beside the image, or its IKCONFIG copy: the
/// preflight's [`zc_images::kconfig::find_config`]): virtio-mmio when `VIRTIO_MMIO`
/// is built in or a module (every Debian kernel; the transport zc has run longest),
/// else virtio-pci when `VIRTIO_PCI` is (kernels from `kvm_guest.config`-style
/// fragments, and `make kernel`'s), else virtio-mmio with the reason. Both the outer
/// run and the one inside the emulated host call it on the same spec and kernel, so
/// they agree.
pub fn choose_transport(requested: TransportChoice, kernel: &Path) -> (Transport, &'static str) {
    match requested {
        TransportChoice::Mmio => (Transport::Mmio, "asked for"),
        TransportChoice::Pci => (Transport::Pci, "asked for"),
        TransportChoice::Auto => transport_from_config(kernel_config(kernel).as_ref()),
    }
}

/// The kernel's config, if one can be found beside or inside the image.
fn kernel_config(kernel: &Path) -> Option<zc_images::kconfig::KernelConfig> {
    let version = zc_images::kernel::image_version(kernel).ok()?;
    let release = zc_images::kernel::release_of(&version);
    zc_images::kconfig::find_config(None, kernel, release, None)
        .ok()
        .flatten()
}

/// The `auto` rule on a config (`None`: no config was found).
fn transport_from_config(
    config: Option<&zc_images::kconfig::KernelConfig>,
) -> (Transport, &'static str) {
    use zc_images::kconfig::Value;
    let has = |c: &zc_images::kconfig::KernelConfig, option: &str| {
        matches!(c.get(option), Value::Yes | Value::Module)
    };
    match config {
        None => (
            Transport::Mmio,
            "auto: no kernel config found beside or inside the image, virtio-mmio",
        ),
        Some(c) if has(c, "VIRTIO_MMIO") => (Transport::Mmio, "auto: the kernel has VIRTIO_MMIO"),
        Some(c) if has(c, "VIRTIO_PCI") => (
            Transport::Pci,
            "auto: the kernel has VIRTIO_PCI and no VIRTIO_MMIO",
        ),
        Some(_) => (
            Transport::Mmio,
            "auto: the kernel has neither VIRTIO_MMIO nor VIRTIO_PCI (the preflight says what to enable), virtio-mmio",
        ),
    }
}

/// Where a run's outputs go; `None` leaves an output out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOutputs {
    /// The guest console (`None`: the VMM's standard output).
    #[serde(default)]
    pub console: Option<PathBuf>,
    /// The run summary, `run.json` ([`crate::report::RunSummary`]).
    #[serde(default)]
    pub summary: Option<PathBuf>,
    /// Every DMA descriptor the devices touch (JSON Lines, `docs/dma-log.md`).
    #[serde(default)]
    pub dma_log: Option<PathBuf>,
}

/// A virtio-blk disk backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// What is on the other side of the card.
    pub backend: NetBackendSpec,
    /// Offer checksum offload, so that Linux gives the card scatter-gather.
    #[serde(default = "default_sg")]
    pub sg: bool,
    /// Write every frame, both directions, to this pcap file.
    #[serde(default)]
    pub pcap: Option<PathBuf>,
    /// The files the guest will send, one per TCP connection, in order: the run fails
    /// unless each arrives complete and identical.
    #[serde(default)]
    pub peer_expect: Vec<PathBuf>,
    /// Each connection carries only the first this many bytes of its file.
    #[serde(default)]
    pub peer_expect_bytes: Option<u64>,
    /// The files the peer will send the guest, one per TCP connection to its send
    /// port (7879), in order: the run fails unless the guest acknowledges every byte
    /// of each and sends back the right count.
    #[serde(default)]
    pub peer_send: Vec<PathBuf>,
    /// Each connection to the send port carries only the first this many bytes of
    /// its file.
    #[serde(default)]
    pub peer_send_bytes: Option<u64>,
}

/// The network backend of one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum NetBackendSpec {
    /// The TCP endpoint inside the VMM (10.0.2.2:7878) that checks every byte.
    Peer,
    /// A host tap device (root only); inside the emulated host in emulated mode.
    Tap {
        /// The device's name (created if absent; `%d` is numbered).
        name: String,
        /// Address of the tap's host side, which is then brought up; the peer check
        /// then listens there through the host's own TCP stack.
        #[serde(default)]
        address: Option<TapAddress>,
    },
}

/// An IPv4 address with its prefix length, e.g. 10.0.2.2/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapAddress {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0 to 32.
    pub prefix: u8,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_mem_bytes() -> u64 {
    DEFAULT_MEM_BYTES
}
fn default_vcpus() -> u8 {
    1
}
fn default_timeout_s() -> u64 {
    DEFAULT_TIMEOUT_S
}
fn default_sg() -> bool {
    true
}

/// What is wrong with a spec, in one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A file the run needs is missing.
    #[error("{what} {} does not exist: {hint}", path.display())]
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// A path where the run needs a file holds something else (a directory...).
    #[error("{what} {} is {kind}, not a file: {hint}", path.display())]
    NotAFile {
        /// What the file is.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What is there instead, e.g. `a directory`.
        kind: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// The kernel cannot be booted.
    #[error(transparent)]
    Kernel(BootError),
    /// Too little or too much memory.
    #[error("guest memory of {0} bytes is out of range: give 64M to 64G (--mem)")]
    Memory(u64),
    /// Bad vCPU count.
    #[error("--vcpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// A tap with expectations but no address to check them on.
    #[error("--peer-expect with --net tap needs --tap-ip (e.g. 10.0.2.2/24): the check listens on that address")]
    TapCheckWithoutAddress,
    /// Files to send with the tap backend, whose host-socket peer only receives.
    #[error(
        "--peer-send needs --net peer: the tap backend's host-socket peer does not send files"
    )]
    TapSend,
    /// A prefix length over 32.
    #[error("tap address prefix /{0} is not a prefix length: use 0 to 32")]
    TapPrefix(u8),
    /// More cards than there are card addresses for.
    #[error("{} network cards: at most {} (each card has its own subnet, 10.0.2.0/24 up)", .0, zc_protocol::addr::MAX_CARDS)]
    TooManyNics(usize),
    /// A byte limit without files to apply it to.
    #[error("--peer-expect-bytes needs --peer-expect: name the file the guest will send")]
    BytesWithoutExpectation,
    /// A send byte limit without files to apply it to.
    #[error("--peer-send-bytes needs --peer-send: name the file the peer is to send")]
    SendBytesWithoutFiles,
    /// A byte limit beyond the end of an expected file (or a file to send).
    #[error("--peer-expect-bytes {bytes}: {} has only {size} bytes", path.display())]
    BytesBeyondFile {
        /// The limit.
        bytes: u64,
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Dirty-page samples without a log to write them to.
    #[error("--dirty-samples needs --dma-log: the samples are written there")]
    DirtySamplesWithoutLog,
    /// The kernel command line is longer than x86 boots with.
    #[error("the kernel command line would be {len} bytes (--cmdline and --append); x86 takes at most {max}: shorten --append")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The kernel command line holds a control character (a newline ends it early).
    #[error("the kernel command line holds a control character ({0:?}): give --append as words separated by spaces, on one line")]
    CmdlineControl(char),
    /// The spec file cannot be read or is not a spec.
    #[error("cannot read the run spec {}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why, one line.
        why: String,
    },
}

impl RunSpec {
    /// A spec that boots `kernel` with the defaults of `zc-vmm run` and no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        RunSpec {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            append: None,
            mem_bytes: DEFAULT_MEM_BYTES,
            vcpus: default_vcpus(),
            timeout_s: DEFAULT_TIMEOUT_S,
            disk: None,
            scratch_disk: None,
            nics: Vec::new(),
            dirty_samples: false,
            transport: TransportChoice::Auto,
            outputs: RunOutputs::default(),
        }
    }

    /// The transport this run uses and why ([`choose_transport`]).
    pub fn transport(&self) -> (Transport, &'static str) {
        choose_transport(self.transport, &self.kernel)
    }

    /// The kernel command line the guest gets: `cmdline`, then `append`. With the PCI
    /// transport the word `pci=off` (in the default command line, as the MMIO
    /// transport has no PCI bus to scan) is left out, or the guest would not look
    /// for its devices.
    pub fn full_cmdline(&self) -> String {
        let base = match self.transport().0 {
            Transport::Mmio => self.cmdline.clone(),
            Transport::Pci => self
                .cmdline
                .split_whitespace()
                .filter(|word| *word != "pci=off")
                .collect::<Vec<_>>()
                .join(" "),
        };
        match &self.append {
            Some(extra) => format!("{base} {extra}"),
            None => base,
        }
    }

    /// Checks the command line before the boot does: no control characters, and
    /// within x86's `COMMAND_LINE_SIZE`. The length counted is the longest the
    /// transport can make it (with `pci=off`), so the check does not have to decide
    /// the transport (which may mean decompressing the kernel); the kernel's own,
    /// possibly smaller, limit is checked when it is loaded.
    pub fn check_cmdline(&self) -> Result<(), SpecError> {
        let append = self.append.as_deref().unwrap_or_default();
        if let Some(c) = self
            .cmdline
            .chars()
            .chain(append.chars())
            .find(|c| c.is_control())
        {
            return Err(SpecError::CmdlineControl(c));
        }
        let len = self.cmdline.len()
            + if append.is_empty() {
                0
            } else {
                1 + append.len()
            };
        let max = layout::CMDLINE_MAX - 1;
        if len > max {
            return Err(SpecError::CmdlineTooLong { len, max });
        }
        Ok(())
    }

    /// The file dirty-page samples look for and how much of it, when the run samples
    /// at all: it needs the DMA log (where samples go) and a file the first card's
    /// peer expects, or else one it sends (a run of receive methods only). The suite
    /// gives both the same payload.
    pub fn dirty_sample_payload(&self) -> Option<(&Path, Option<u64>)> {
        if !self.dirty_samples || self.outputs.dma_log.is_none() {
            return None;
        }
        let nic = self.nics.first()?;
        match (nic.peer_expect.first(), nic.peer_send.first()) {
            (Some(file), _) => Some((file.as_path(), nic.peer_expect_bytes)),
            (None, Some(file)) => Some((file.as_path(), nic.peer_send_bytes)),
            (None, None) => None,
        }
    }

    /// Checks everything a user can get wrong, before anything boots; returns the
    /// kernel's format.
    pub fn validate(&self) -> Result<KernelFormat, SpecError> {
        require_file(
            "kernel",
            &self.kernel,
            "pass --kernel PATH (run `make images` for the default one)",
        )?;
        let format = boot::detect_format(&self.kernel).map_err(SpecError::Kernel)?;
        if let Some(initrd) = &self.initrd {
            require_file(
                "initrd",
                initrd,
                "pass --initrd PATH (run `make images` for the default one)",
            )?;
        }
        if !(layout::MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&self.mem_bytes) {
            return Err(SpecError::Memory(self.mem_bytes));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::VcpuCount(self.vcpus));
        }
        if let Some(disk) = &self.disk {
            require_file(
                "disk image",
                &disk.path,
                "pass --disk PATH (run `make images` for the test disk)",
            )?;
        }
        if let Some(scratch) = &self.scratch_disk {
            require_file(
                "scratch disk image",
                scratch,
                "pass --scratch-disk PATH, a blank ext4 image (`zc-image scratch --out PATH`)",
            )?;
        }
        if self.nics.len() > usize::from(zc_protocol::addr::MAX_CARDS) {
            return Err(SpecError::TooManyNics(self.nics.len()));
        }
        self.nics.iter().try_for_each(NicSpec::validate)?;
        if self.dirty_samples && self.outputs.dma_log.is_none() {
            return Err(SpecError::DirtySamplesWithoutLog);
        }
        self.check_cmdline()?;
        Ok(format)
    }

    /// Reads a spec written by [`RunSpec::save`].
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let file_err = |why: String| SpecError::File {
            path: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))
    }

    /// Writes the spec as JSON, for `zc-vmm run --spec FILE`.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }
}

impl NicSpec {
    /// A card in front of the in-VMM peer, scatter-gather on, expecting nothing.
    pub fn peer() -> Self {
        NicSpec {
            backend: NetBackendSpec::Peer,
            sg: true,
            pcap: None,
            peer_expect: Vec::new(),
            peer_expect_bytes: None,
            peer_send: Vec::new(),
            peer_send_bytes: None,
        }
    }

    fn validate(&self) -> Result<(), SpecError> {
        if let NetBackendSpec::Tap { address, .. } = &self.backend {
            match address {
                None if !self.peer_expect.is_empty() => {
                    return Err(SpecError::TapCheckWithoutAddress)
                }
                Some(a) if a.prefix > 32 => return Err(SpecError::TapPrefix(a.prefix)),
                _ => {}
            }
            if !self.peer_send.is_empty() {
                return Err(SpecError::TapSend);
            }
        }
        if self.peer_send_bytes.is_some() && self.peer_send.is_empty() {
            return Err(SpecError::SendBytesWithoutFiles);
        }
        require_files_of(
            &self.peer_send,
            self.peer_send_bytes,
            "--peer-send",
            "name the file the peer is to send",
        )?;
        if self.peer_expect_bytes.is_some() && self.peer_expect.is_empty() {
            return Err(SpecError::BytesWithoutExpectation);
        }
        require_files_of(
            &self.peer_expect,
            self.peer_expect_bytes,
            "--peer-expect",
            "name the file the guest will send",
        )?;
        Ok(())
    }
}

/// Each of `files` exists and, with a byte limit, holds at least that many bytes.
fn require_files_of(
    files: &[PathBuf],
    limit: Option<u64>,
    what: &'static str,
    hint: &'static str,
) -> Result<(), SpecError> {
    for file in files {
        require_file(what, file, hint)?;
        let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        match limit {
            Some(bytes) if bytes > size => {
                return Err(SpecError::BytesBeyondFile {
                    bytes,
                    path: file.clone(),
                    size,
                })
            }
            _ => {}
        }
    }
    Ok(())
}

fn require_file(what: &'static str, path: &Path, hint: &'static str) -> Result<(), SpecError> {
    let kind = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => return Ok(()),
        Ok(m) if m.is_dir() => "a directory",
        Ok(_) => "not a regular file",
        Err(_) => {
            return Err(SpecError::Missing {
                what,
                path: path.to_path_buf(),
                hint,
            })
        }
    };
    Err(SpecError::NotAFile {
        what,
        path: path.to_path_buf(),
        kind,
        hint,
    })
}

/// Parses `512M`, `2G`, `65536K` or a bare MiB count into bytes.
pub fn parse_mem(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], 10),
        Some((i, 'M' | 'm')) => (&text[..i], 20),
        Some((i, 'G' | 'g')) => (&text[..i], 30),
        _ => (text, 20),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size: use e.g. 512M or 2G"))?;
    value
        .checked_mul(1 << shift)
        .filter(|bytes| *bytes <= MAX_MEM_BYTES)
        .ok_or_else(|| format!("{text} is too large: at most 64G"))
        .and_then(|bytes| {
            // Refused here, while parsing, so that no host (emulated or not) starts.
            if bytes < layout::MIN_MEM_BYTES {
                Err(format!("{text} is too small: at least 64M"))
            } else {
                Ok(bytes)
            }
        })
}

/// Parses `10.0.2.2/24`.
pub fn parse_tap_address(text: &str) -> Result<TapAddress, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not ADDR/PREFIX (e.g. 10.0.2.2/24)"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length (0 to 32)"))?;
    Ok(TapAddress { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rstest::rstest]
    #[case::debian_mmio_module("CONFIG_VIRTIO_MMIO=m\nCONFIG_VIRTIO_PCI=y\n", Transport::Mmio)]
    #[case::mmio_built_in("CONFIG_VIRTIO_MMIO=y\n", Transport::Mmio)]
    #[case::pci_only(
        "# CONFIG_VIRTIO_MMIO is not set\nCONFIG_VIRTIO_PCI=y\n",
        Transport::Pci
    )]
    #[case::pci_module_only("CONFIG_VIRTIO_PCI=m\n", Transport::Pci)]
    #[case::neither("CONFIG_VIRTIO_BLK=y\n", Transport::Mmio)]
    fn auto_follows_the_kernel_config(#[case] config: &str, #[case] expected: Transport) {
        let config = zc_images::kconfig::KernelConfig::parse(
            config,
            zc_images::kconfig::ConfigSource::File("config".into()),
        );
        assert_eq!(transport_from_config(Some(&config)).0, expected);
    }

    #[test]
    fn auto_without_a_config_is_mmio_and_says_why() {
        let (transport, why) = transport_from_config(None);
        assert_eq!(transport, Transport::Mmio);
        assert!(why.contains("no kernel config"), "{why}");
        // An image that is not a kernel has no config either.
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("vmlinuz");
        std::fs::write(&junk, b"not a kernel").unwrap();
        assert_eq!(
            choose_transport(TransportChoice::Auto, &junk).0,
            Transport::Mmio
        );
        assert_eq!(
            choose_transport(TransportChoice::Pci, &junk).0,
            Transport::Pci
        );
    }

    /// A tiny file that passes for a bzImage (`HdrS` at 0x202).
    fn fake_bzimage(dir: &Path) -> PathBuf {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let path = dir.join("vmlinuz");
        std::fs::write(&path, image).unwrap();
        path
    }

    fn file(dir: &Path, name: &str, bytes: usize) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![7u8; bytes]).unwrap();
        path
    }

    /// Everything a spec can say, nothing at its default.
    fn full_spec(dir: &Path) -> RunSpec {
        RunSpec {
            initrd: Some(file(dir, "initrd.img", 10)),
            cmdline: "console=ttyS0".into(),
            append: Some("zc.test=methods".into()),
            mem_bytes: 1 << 30,
            vcpus: 2,
            timeout_s: 600,
            disk: Some(DiskSpec {
                path: file(dir, "disk.img", 4096),
                read_only: true,
            }),
            nics: vec![
                NicSpec {
                    sg: false,
                    pcap: Some(dir.join("frames.pcap")),
                    peer_expect: vec![file(dir, "payload.bin", 100); 2],
                    peer_expect_bytes: Some(64),
                    ..NicSpec::peer()
                },
                NicSpec {
                    backend: NetBackendSpec::Tap {
                        name: "zctap%d".into(),
                        address: Some(TapAddress {
                            addr: Ipv4Addr::new(10, 0, 2, 2),
                            prefix: 24,
                        }),
                    },
                    ..NicSpec::peer()
                },
            ],
            dirty_samples: true,
            transport: TransportChoice::Pci,
            outputs: RunOutputs {
                console: Some(dir.join("console.txt")),
                summary: Some(dir.join("run.json")),
                dma_log: Some(dir.join("dma.jsonl")),
            },
            ..RunSpec::new(fake_bzimage(dir))
        }
    }

    #[test]
    fn a_spec_survives_a_json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let spec = full_spec(dir.path());
        let path = dir.path().join("spec.json");
        spec.save(&path).unwrap();
        assert_eq!(RunSpec::load(&path).unwrap(), spec);
        let minimal = RunSpec::new("/k/vmlinuz");
        let text = serde_json::to_string(&minimal).unwrap();
        assert_eq!(serde_json::from_str::<RunSpec>(&text).unwrap(), minimal);
    }

    #[test]
    fn a_hand_written_spec_gets_the_run_defaults() {
        let spec: RunSpec =
            serde_json::from_str(r#"{"kernel":"/k/vmlinuz","nics":[{"backend":{"kind":"peer"}}]}"#)
                .unwrap();
        assert_eq!(
            spec,
            RunSpec {
                nics: vec![NicSpec::peer()],
                ..RunSpec::new("/k/vmlinuz")
            }
        );
        assert_eq!(spec.full_cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn the_transport_is_chosen_in_one_place_and_owns_the_pci_off_word() {
        let mut spec = RunSpec {
            append: Some("zc.test=x".into()),
            ..RunSpec::new("/k/vmlinuz")
        };
        assert_eq!(spec.transport, TransportChoice::Auto);
        assert_eq!(spec.transport().0, Transport::Mmio);
        assert_eq!(spec.full_cmdline(), format!("{DEFAULT_CMDLINE} zc.test=x"));
        spec.transport = TransportChoice::Pci;
        assert_eq!(spec.transport().0, Transport::Pci);
        assert_eq!(
            spec.full_cmdline(),
            "console=ttyS0 reboot=k panic=-1 quiet zc.test=x"
        );
        spec.transport = TransportChoice::Mmio;
        assert_eq!(spec.transport().0, Transport::Mmio);
        let json: RunSpec = serde_json::from_str(r#"{"kernel":"/k","transport":"pci"}"#).unwrap();
        assert_eq!(json.transport, TransportChoice::Pci);
    }

    #[test]
    fn a_misspelt_field_is_refused_not_ignored() {
        let err = serde_json::from_str::<RunSpec>(r#"{"kernel":"/k","memory":5}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory"), "{err}");
    }

    #[test]
    fn a_good_spec_validates_and_names_the_kernel_format() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            full_spec(dir.path()).validate().unwrap(),
            KernelFormat::BzImage
        );
    }

    #[test]
    fn dirty_samples_look_for_the_first_nics_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = full_spec(dir.path());
        assert_eq!(
            spec.dirty_sample_payload(),
            Some((dir.path().join("payload.bin").as_path(), Some(64)))
        );
        // A card that only sends to the guest: the file it sends.
        let sent = dir.path().join("sent.bin");
        spec.nics[0].peer_expect.clear();
        spec.nics[0].peer_send = vec![sent.clone()];
        spec.nics[0].peer_send_bytes = Some(32);
        assert_eq!(
            spec.dirty_sample_payload(),
            Some((sent.as_path(), Some(32)))
        );
        spec.nics[0].peer_send.clear();
        assert_eq!(spec.dirty_sample_payload(), None);
        spec = full_spec(dir.path());
        spec.outputs.dma_log = None;
        assert_eq!(spec.dirty_sample_payload(), None);
    }

    /// Each mistake, and a word of the one line that must say what to do.
    #[rstest::rstest]
    #[case::missing_kernel(|s: &mut RunSpec, d: &Path| s.kernel = d.join("nope"), "pass --kernel")]
    #[case::not_a_kernel(|s: &mut RunSpec, d: &Path| s.kernel = d.join("initrd.img"), "neither a bzImage")]
    #[case::missing_initrd(|s: &mut RunSpec, d: &Path| s.initrd = Some(d.join("nope")), "pass --initrd")]
    #[case::missing_disk(|s: &mut RunSpec, d: &Path| s.disk.as_mut().unwrap().path = d.join("nope"), "pass --disk")]
    #[case::missing_scratch_disk(|s: &mut RunSpec, d: &Path| s.scratch_disk = Some(d.join("nope")), "zc-image scratch")]
    #[case::too_little_memory(|s: &mut RunSpec, _: &Path| s.mem_bytes = 1 << 20, "64M")]
    #[case::no_vcpus(|s: &mut RunSpec, _: &Path| s.vcpus = 0, "1 to 32")]
    #[case::missing_expected_file(|s: &mut RunSpec, d: &Path| s.nics[0].peer_expect[1] = d.join("nope"), "the guest will send")]
    #[case::limit_past_the_file(|s: &mut RunSpec, _: &Path| s.nics[0].peer_expect_bytes = Some(101), "only 100 bytes")]
    #[case::limit_without_files(|s: &mut RunSpec, _: &Path| s.nics[1].peer_expect_bytes = Some(1), "needs --peer-expect")]
    #[case::send_limit_past_the_file(|s: &mut RunSpec, d: &Path| { s.nics[0].peer_send = vec![d.join("payload.bin")]; s.nics[0].peer_send_bytes = Some(101); }, "only 100 bytes")]
    #[case::send_limit_without_files(|s: &mut RunSpec, _: &Path| s.nics[0].peer_send_bytes = Some(1), "needs --peer-send")]
    #[case::missing_file_to_send(|s: &mut RunSpec, d: &Path| s.nics[0].peer_send = vec![d.join("nope")], "the peer is to send")]
    #[case::send_over_tap(|s: &mut RunSpec, d: &Path| s.nics[1].peer_send = vec![d.join("payload.bin")], "needs --net peer")]
    #[case::tap_check_without_address(
        |s: &mut RunSpec, d: &Path| {
            s.nics[1].backend = NetBackendSpec::Tap { name: "t".into(), address: None };
            s.nics[1].peer_expect = vec![d.join("payload.bin")];
        },
        "needs --tap-ip"
    )]
    #[case::dirty_samples_without_log(|s: &mut RunSpec, _: &Path| s.outputs.dma_log = None, "needs --dma-log")]
    #[case::newline_in_append(|s: &mut RunSpec, _: &Path| s.append = Some("quiet\nzc.exit=3".into()), "control character ('\\n')")]
    #[case::cmdline_too_long(|s: &mut RunSpec, _: &Path| s.append = Some("x".repeat(2048)), "x86 takes at most 2047: shorten --append")]
    fn each_mistake_is_one_line_that_says_what_to_do(
        #[case] spoil: fn(&mut RunSpec, &Path),
        #[case] needle: &str,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = full_spec(dir.path());
        spoil(&mut spec, dir.path());
        let message = spec.validate().unwrap_err().to_string();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert!(!message.contains('\n'), "{message:?}");
    }

    #[test]
    fn an_unreadable_spec_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::fs::write(&path, "{").unwrap();
        let message = RunSpec::load(&path).unwrap_err().to_string();
        assert!(message.contains("spec.json") && !message.contains('\n'));
    }

    #[test]
    fn a_directory_where_a_file_is_needed_is_said_to_be_one() {
        let dir = tempfile::tempdir().unwrap();
        let message = RunSpec::new(dir.path()).validate().unwrap_err().to_string();
        assert!(message.contains("is a directory, not a file"), "{message}");
        let message = RunSpec::new(dir.path().join("none"))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(message.contains("does not exist"), "{message}");
    }

    #[test]
    fn sizes_and_addresses_parse() {
        assert_eq!(parse_mem("512M"), Ok(512 << 20));
        assert_eq!(parse_mem("2G"), Ok(2 << 30));
        assert_eq!(parse_mem("65536k"), Ok(64 << 20));
        assert_eq!(parse_mem("256"), Ok(256 << 20));
        assert!(parse_mem("lots").unwrap_err().contains("512M"));
        assert!(parse_mem("100G").unwrap_err().contains("too large"));
        assert!(parse_mem("").is_err());
        assert!(parse_mem("0").unwrap_err().contains("too small"));
        assert!(parse_mem("63M").unwrap_err().contains("at least 64M"));
        assert_eq!(
            parse_tap_address("10.0.2.2/24"),
            Ok(TapAddress {
                addr: Ipv4Addr::new(10, 0, 2, 2),
                prefix: 24
            })
        );
        assert!(parse_tap_address("10.0.2.2").is_err());
        assert!(parse_tap_address("10.0.2.2/33").is_err());
    }
}
