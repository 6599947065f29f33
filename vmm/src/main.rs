//! `zc-vmm`: boots a Linux guest under KVM, directly or inside an emulated KVM host.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use zc_vmm::emulated_run;
use zc_vmm::host::{self, HostMode};
use zc_vmm::report::{Direction, RunReport, RunSummary};
use zc_vmm::spec::{
    parse_mem, parse_tap_address, DiskSpec, NetBackendSpec, NicSpec, RunOutputs, RunSpec,
    TapAddress, TransportChoice, DEFAULT_CMDLINE, DEFAULT_TIMEOUT_S,
};
use zc_vmm::vm;

mod compare;
mod suite;

/// Where `make images` leaves the emulated host's kernel and initrd.
const DEFAULT_HOST_KERNEL: &str = "images/out/host/vmlinuz";
const DEFAULT_HOST_INITRD: &str = "images/out/host/initrd.img";

#[derive(Parser)]
#[command(
    name = "zc-vmm",
    version,
    about = "A tiny KVM VMM for zero-copy transfer experiments"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a kernel and run the guest to the end; exits with the guest's status.
    Run(Box<RunArgs>),
    /// Run every transfer method (both NIC variants), audit the DMA logs against the
    /// expected table and print the verdicts; exits 1 if any verdict differs.
    Methods(Box<suite::MethodsArgs>),
    /// Judge a saved `methods` run again (its DMA logs and reports) against an expected
    /// table, without booting; exits 1 if any verdict differs.
    Audit(suite::AuditArgs),
    /// Print the verdicts of several `methods` runs (e.g. one per kernel) side by side;
    /// exits 1 when a run has a FAIL, a failed boot or lacks a row another has.
    Compare(compare::CompareArgs),
    /// Print what the host probe finds and which mode a run would use.
    Probe,
    /// Read a DMA log (--dma-log): show records, totals, or search.
    DmaLog {
        #[command(subcommand)]
        action: DmaLogCmd,
    },
}

/// `zc-vmm dma-log` exit statuses beyond 0 (done) and 2 (bad input, unreadable log).
const DMA_LOG_NO_MATCH: i32 = 1;
/// The log was cut short: the output covers its complete records.
const DMA_LOG_CUT: i32 = 3;

#[derive(Subcommand)]
#[command(
    after_help = "Logs may be zstd-compressed (.jsonl.zst); they are read as they come, \
in constant memory. Exit status: 0 done; 1 grep matched nothing; 2 bad input or an unreadable \
log; 3 the log is cut short (the output covers its complete records; stderr says where)."
)]
enum DmaLogCmd {
    /// One line per record.
    Show(DmaLogArgs),
    /// Descriptors and bytes per device and direction, requests per kind.
    Stats(DmaLogArgs),
    /// Records whose JSON text, every field named (as in a `zc-dma-log/1` line), contains
    /// PATTERN (e.g. a fingerprint); exits 1 if none.
    Grep {
        /// Text to look for.
        pattern: String,
        /// Print the matching records' JSON text (one object per line) instead of one
        /// summary line each.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        args: DmaLogArgs,
    },
    /// Which guest pages the NIC read for file bytes OFF..OFF+LEN during a method,
    /// and the disk request or CPU write that put them there.
    Trace(DmaTraceArgs),
}

#[derive(Args)]
struct DmaLogArgs {
    /// The log file (plain or zstd-compressed).
    log: PathBuf,
    /// Only this device: blk or net.
    #[arg(long, value_parser = parse_device)]
    device: Option<zc_dma_log::DeviceKind>,
    /// Only this queue.
    #[arg(long)]
    queue: Option<u16>,
    /// Only between the guest's markers `BEGIN SPAN` and `END SPAN`.
    #[arg(long)]
    span: Option<String>,
    /// Only descriptors touching START..END (hex or decimal guest-physical addresses).
    #[arg(long, value_parser = parse_range)]
    addr: Option<(u64, u64)>,
}

#[derive(Args)]
struct DmaTraceArgs {
    /// The log file, or a `zc-vmm methods` output directory (then its
    /// `suite.dma-log.jsonl[.zst]`, and --variant picks the card: the span
    /// `<method>@<variant>`).
    log: PathBuf,
    /// The span (its BEGIN/END markers): a method, e.g. sendfile; in the log file
    /// of a `zc-vmm methods` run, `sendfile@sg-off` (or give the run directory).
    #[arg(long)]
    method: String,
    /// First file offset (decimal, 0x hex, or with a K/M/G suffix: 1M).
    #[arg(long, value_parser = parse_size)]
    file_off: u64,
    /// Bytes to trace (same forms).
    #[arg(long, value_parser = parse_size)]
    len: u64,
    /// With a run directory: the NIC variant whose card's run of the method to
    /// trace.
    #[arg(long, default_value = "sg-on")]
    variant: String,
    /// The file the method sent (e.g. images/out/guest/disk-files/payload.bin): checks
    /// each piece's content as the audit does (zero-copy), not only where it came from.
    #[arg(long)]
    source: Option<PathBuf>,
    /// Print the trace as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_device(text: &str) -> Result<zc_dma_log::DeviceKind, String> {
    match text {
        "blk" => Ok(zc_dma_log::DeviceKind::Blk),
        "net" => Ok(zc_dma_log::DeviceKind::Net),
        _ => Err(format!("{text:?} is not a device: use blk or net")),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() && !t.starts_with("0x") => (&t[..i], c),
        _ => (t, ' '),
    };
    let shift = match unit.to_ascii_uppercase() {
        ' ' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => {
            return Err(format!(
                "{text:?}: use a number, 0x hex, or a K, M or G suffix"
            ))
        }
    };
    let value = match digits.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => digits.parse(),
    }
    .map_err(|_| format!("{text:?} is not a number"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let number = |t: &str| {
        let t = t.trim();
        match t.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => t.parse(),
        }
        .map_err(|_| format!("{t:?} is not an address"))
    };
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?} is not a range: use START..END"))?;
    let (start, end) = (number(start)?, number(end)?);
    if start >= end {
        return Err(format!("{text:?} is empty"));
    }
    Ok((start, end))
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Run what this JSON run spec says (`zc-vmm methods` writes one per boot beside
    /// its outputs) instead of the flags below.
    #[arg(long, value_name = "FILE", conflicts_with = "RunFlags")]
    spec: Option<PathBuf>,
    #[command(flatten)]
    flags: RunFlags,
    /// Emulated mode: the emulated host's kernel [env: ZC_HOST_KERNEL].
    #[arg(long, env = "ZC_HOST_KERNEL", default_value = DEFAULT_HOST_KERNEL)]
    host_kernel: PathBuf,
    /// Emulated mode: the emulated host's initrd [env: ZC_HOST_INITRD].
    #[arg(long, env = "ZC_HOST_INITRD", default_value = DEFAULT_HOST_INITRD)]
    host_initrd: PathBuf,
    #[command(flatten)]
    seccomp: SeccompSwitch,
}

/// The seccomp switch of the commands that run a VM.
#[derive(Args, Clone, Copy)]
struct SeccompSwitch {
    /// Run the VMM's threads without their seccomp filters, to debug a system call a
    /// filter refuses (the same as ZC_SECCOMP=off; the filters are on by default).
    #[arg(long)]
    no_seccomp: bool,
}

impl SeccompSwitch {
    /// Checks ZC_SECCOMP; with --no-seccomp, sets it to `off` for this process and
    /// the ones it starts (`methods`' runs, the run inside the emulated host).
    fn apply(self) -> Result<()> {
        if self.no_seccomp {
            // Still single-threaded: nothing reads the environment concurrently.
            std::env::set_var(zc_seccomp::ENV, "off");
        }
        zc_seccomp::wanted_by_env()?;
        Ok(())
    }
}

/// What to run, as flags; [`RunFlags::into_spec`] turns them into a [`RunSpec`].
#[derive(Args, Clone)]
struct RunFlags {
    /// Kernel image: bzImage (e.g. Debian's /boot/vmlinuz-*) or ELF vmlinux.
    #[arg(long, required_unless_present = "spec")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Extra kernel command-line words appended to --cmdline.
    #[arg(long)]
    append: Option<String>,
    /// Guest memory, e.g. 512M or 1G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Write the guest console to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Write a JSON summary of the run to this file.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// A disk image for the guest (virtio-blk, `/dev/vda`).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Make the disk read-only to the guest.
    #[arg(long, requires = "disk")]
    disk_ro: bool,
    /// A blank ext4 image the guest may write to, a second virtio-blk disk found by
    /// its label (make one with `zc-image scratch --out PATH`); read it back after the
    /// run with `debugfs`.
    #[arg(long, value_name = "PATH")]
    scratch_disk: Option<PathBuf>,
    /// Log every DMA descriptor the devices touch to this file (JSON Lines, docs/dma-log.md).
    #[arg(long)]
    dma_log: Option<PathBuf>,
    /// With --dma-log and --peer-expect: sample KVM's dirty-page log when the guest
    /// asks (port 0x610), logging the payload found in CPU-written pages
    /// (docs/method-suite.md). Slows guest writes; `zc-vmm methods` turns it on.
    #[arg(long, requires = "dma_log")]
    dirty_samples: bool,
    /// Network card backend: `peer` (a TCP endpoint inside the VMM at 10.0.2.2:7878
    /// that checks every byte it receives) or `none`.
    #[arg(long, value_enum, default_value_t = NetBackendArg::None)]
    net: NetBackendArg,
    /// Offer checksum offload so that Linux gives the card scatter-gather (`on`), or
    /// not, so that Linux must linearise every frame (`off`).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    net_sg: OnOff,
    /// Write every frame the card carries, both directions, to this pcap file.
    #[arg(long, requires = "net")]
    pcap: Option<PathBuf>,
    /// A file the guest will send to the peer; one per TCP connection, in order. The
    /// run fails unless each arrives complete and identical.
    #[arg(long = "peer-expect", value_name = "FILE")]
    peer_expect: Vec<PathBuf>,
    /// Each connection carries only the first BYTES of its --peer-expect file.
    #[arg(long, value_name = "BYTES", requires = "peer_expect")]
    peer_expect_bytes: Option<u64>,
    /// A file the peer will send the guest (port 7879); one per TCP connection, in
    /// order. The run fails unless the guest acknowledges every byte and counts them.
    #[arg(long = "peer-send", value_name = "FILE")]
    peer_send: Vec<PathBuf>,
    /// Each connection to the send port carries only the first BYTES of its
    /// --peer-send file.
    #[arg(long, value_name = "BYTES", requires = "peer_send")]
    peer_send_bytes: Option<u64>,
    /// With --net tap: the tap device's name (created if absent; `%d` is numbered).
    /// In emulated mode it lives inside the emulated host.
    #[arg(long, default_value = "zctap%d")]
    tap: String,
    /// With --net tap: give the host side of the tap this address and bring it up
    /// (otherwise that is the caller's job). With --peer-expect as well, the check
    /// listens on this address, port 7878, through the host's own TCP stack; the
    /// guest's default peer is 10.0.2.2, so `--tap-ip 10.0.2.2/24`.
    #[arg(long, value_name = "ADDR/PREFIX", value_parser = parse_tap_address)]
    tap_ip: Option<TapAddress>,
    /// Give up after this many seconds (of the guest's own run).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_S)]
    timeout: u64,
    /// The virtio transport of the disk and the card: `mmio` (described in ACPI),
    /// `pci` (modern virtio-pci behind a PCI host bridge, MSI-X; the default command
    /// line's `pci=off` is then left out), or `auto` (mmio for now; later what the
    /// kernel's config has).
    #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
    transport: TransportChoice,
}

impl RunFlags {
    /// The run spec the flags describe: the one place `zc-vmm run`'s flags are read.
    fn into_spec(self) -> Result<RunSpec> {
        let kernel = self.kernel.context("pass --kernel PATH or --spec FILE")?;
        if !self.peer_expect.is_empty() && self.net == NetBackendArg::None {
            bail!("--peer-expect needs --net peer (or tap with --tap-ip)");
        }
        if !self.peer_send.is_empty() && self.net != NetBackendArg::Peer {
            bail!("--peer-send needs --net peer");
        }
        if self.tap_ip.is_some() && self.net != NetBackendArg::Tap {
            bail!("--tap-ip is for --net tap");
        }
        let backend = match self.net {
            NetBackendArg::None => None,
            NetBackendArg::Peer => Some(NetBackendSpec::Peer),
            NetBackendArg::Tap => Some(NetBackendSpec::Tap {
                name: self.tap,
                address: self.tap_ip,
            }),
        };
        let nic = backend.map(|backend| NicSpec {
            backend,
            sg: self.net_sg == OnOff::On,
            pcap: self.pcap,
            peer_expect: self.peer_expect,
            peer_expect_bytes: self.peer_expect_bytes,
            peer_send: self.peer_send,
            peer_send_bytes: self.peer_send_bytes,
        });
        Ok(RunSpec {
            kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            append: self.append,
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            timeout_s: self.timeout,
            scratch_disk: self.scratch_disk,
            disk: self.disk.map(|path| DiskSpec {
                path,
                read_only: self.disk_ro,
            }),
            nics: nic.into_iter().collect(),
            dirty_samples: self.dirty_samples,
            transport: self.transport,
            outputs: RunOutputs {
                console: self.console,
                summary: self.report_json,
                dma_log: self.dma_log,
            },
        })
    }
}

/// Which network backend the card gets.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NetBackendArg {
    /// No network card.
    None,
    /// The in-VMM TCP peer.
    Peer,
    /// A host tap device (root only; see --tap).
    Tap,
}

/// A switch.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => args.seccomp.apply().and_then(|()| run(*args)),
        Cmd::Methods(args) => args.seccomp.apply().and_then(|()| suite::run(*args)),
        Cmd::Audit(args) => suite::audit(args),
        Cmd::Compare(args) => compare::compare(args),
        Cmd::Probe => probe().map(|_| 0),
        Cmd::DmaLog { action } => dma_log(action),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(err) => {
            eprintln!("zc-vmm: error: {}", one_line(&err));
            ExitCode::from(2)
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message
/// before it already contains (many library errors print their source themselves).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn dma_log(action: DmaLogCmd) -> Result<i32> {
    use std::io::Write as _;
    use zc_dma_log::{DmaLogError, DmaLogReader};
    use zc_vmm::dma_view::{self, Filter, Selector, Stats};
    let (args, totals, grep) = match action {
        DmaLogCmd::Show(args) => (args, false, None),
        DmaLogCmd::Stats(args) => (args, true, None),
        DmaLogCmd::Grep {
            pattern,
            json,
            args,
        } => (args, false, Some((pattern, json))),
        DmaLogCmd::Trace(args) => return dma_trace(args),
    };
    let cannot_read = || format!("cannot read the DMA log {}", args.log.display());
    let mut reader = DmaLogReader::open(&args.log).with_context(cannot_read)?;
    let mut selector = Selector::new(Filter {
        device: args.device,
        queue: args.queue,
        span: args.span.clone(),
        addr: args.addr,
    });
    let mut stats = Stats::default();
    let mut matched = 0u64;
    let mut cut = None;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = (|| -> Result<()> {
        for record in reader.by_ref() {
            let record = match record {
                Ok(r) => r,
                Err(DmaLogError::Truncated { line, offset }) => {
                    cut = Some((line, offset));
                    break;
                }
                Err(e) => return Err(anyhow::Error::new(e).context(cannot_read())),
            };
            if !selector.keeps(&record) {
                continue;
            }
            if let Some((pattern, json)) = &grep {
                // The record's JSON text with every field named: a line of a
                // `zc-dma-log/1` log as written, and the same for any schema (a `/2`
                // line is compact and can hold several records).
                let text = serde_json::to_vec(&record)?;
                if !text
                    .windows(pattern.len().max(1))
                    .any(|w| w == pattern.as_bytes())
                {
                    continue;
                }
                matched += 1;
                if *json {
                    out.write_all(&text)?;
                    out.write_all(b"\n")?;
                    continue;
                }
            }
            if totals {
                stats.add(&record);
            } else {
                writeln!(out, "{}", dma_view::line(&record))?;
            }
        }
        if totals {
            writeln!(out, "{stats}")?;
        }
        out.flush()?;
        Ok(())
    })();
    match written {
        // `zc-vmm dma-log show LOG | head` is normal use, not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            return Ok(0)
        }
        other => other?,
    }
    if let Some(span) = &args.span {
        if !selector.span_seen && cut.is_none() {
            bail!(
                "the log has no marker `{}`: see `zc-vmm dma-log grep mark`",
                zc_protocol::Marker::begin(span.as_str())
            );
        }
    }
    if let Some((line, offset)) = cut {
        eprintln!(
            "zc-vmm: the DMA log {} is cut short at line {line} (byte {offset} of its text): \
             the output covers the records before it",
            args.log.display()
        );
        return Ok(DMA_LOG_CUT);
    }
    Ok(if grep.is_some() && matched == 0 {
        DMA_LOG_NO_MATCH
    } else {
        0
    })
}

/// The log a `trace` reads: the file given, or a run directory's log of the variant.
fn trace_log_path(args: &DmaTraceArgs) -> Result<PathBuf> {
    if !args.log.is_dir() {
        return Ok(args.log.clone());
    }
    let log = suite::dma_log_in(&args.log);
    if !log.is_file() {
        bail!(
            "{} has no {}: pass the log file, or the --out directory of a `zc-vmm methods` run",
            args.log.display(),
            log.display()
        );
    }
    Ok(log)
}

fn dma_trace(args: DmaTraceArgs) -> Result<i32> {
    use std::io::Write as _;
    use zc_vmm::dma_trace::{trace, TraceQuery};
    if args.len == 0 {
        bail!("--len 0 traces nothing: give the number of bytes, e.g. --len 64K");
    }
    let log = trace_log_path(&args)?;
    // A run directory's log has one span per card: the variant's.
    let span = if args.log.is_dir() && !args.method.contains(zc_protocol::marker::VARIANT_SEP) {
        zc_protocol::marker::qualified_span(&args.method, Some(&args.variant))
    } else {
        args.method.clone()
    };
    let source = args
        .source
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read --source {}", p.display())))
        .transpose()?;
    let pages = source.as_deref().map(zc_audit::stream::SourcePages::new);
    let query = TraceQuery {
        method: span,
        file_off: args.file_off,
        len: args.len,
    };
    let found = trace(
        || zc_dma_log::DmaLogReader::open(&log),
        &query,
        pages.as_ref(),
    )
    .with_context(|| format!("cannot trace {} in {}", query.method, log.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = if args.json {
        serde_json::to_writer_pretty(&mut out, &found)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        writeln!(out, "{found}")
    }
    .and_then(|()| out.flush());
    match written {
        // `zc-vmm dma-log trace ... | head` is normal use, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    Ok(if found.cut.is_some() { DMA_LOG_CUT } else { 0 })
}

fn probe() -> Result<()> {
    let facts = host::probe();
    println!(
        "/dev/kvm:          {}",
        if facts.dev_kvm { "present" } else { "absent" }
    );
    println!(
        "CPU virtualisation: {}",
        facts.hw_virt.as_deref().unwrap_or("none (no vmx/svm flag)")
    );
    println!(
        "kvm_pvm module:    {}",
        if facts.kvm_pvm { "loaded" } else { "no" }
    );
    let (mode, why) = host::choose_here()?;
    println!("mode:              {mode} ({why})");
    Ok(())
}

fn run(args: RunArgs) -> Result<i32> {
    let (mode, why) = host::choose_here()?;
    let spec = match &args.spec {
        Some(path) => RunSpec::load(path)?,
        None => args.flags.into_spec()?,
    };
    spec.validate()?;
    match mode {
        HostMode::Direct => {
            let place = if host::inside_emulated_host() {
                ", inside the emulated KVM host"
            } else {
                ""
            };
            eprintln!("zc-vmm: mode direct ({why}){place}");
            run_direct(&spec, mode)
        }
        HostMode::Emulated => {
            eprintln!(
                "zc-vmm: mode emulated ({why}): booting the emulated KVM host under QEMU TCG"
            );
            Ok(emulated_run::run(
                &spec,
                &args.host_kernel,
                &args.host_initrd,
            )?)
        }
    }
}

fn run_direct(spec: &RunSpec, mode: HostMode) -> Result<i32> {
    let (transport, why) = spec.transport();
    eprintln!("zc-vmm: virtio transport {transport} ({why})");
    // Decided once: `auto` reads the kernel's config, for a bzImage with none beside
    // it by decompressing the whole image, which assembling the VM and writing its
    // command line would otherwise each do again.
    let spec = &RunSpec {
        transport: transport.into(),
        ..spec.clone()
    };
    if zc_seccomp::wanted_by_env()? {
        zc_seccomp::enable().context("seccomp (run with --no-seccomp to go without)")?;
        eprintln!(
            "zc-vmm: seccomp on: each VMM thread runs under its role's filter (--no-seccomp or {}=off to debug without)",
            zc_seccomp::ENV
        );
    } else {
        eprintln!(
            "zc-vmm: seccomp off ({}=off or --no-seccomp)",
            zc_seccomp::ENV
        );
    }
    let report = vm::run(spec)?;
    let mut summary = RunSummary::new(report, &spec.kernel, mode, host::inside_emulated_host());
    summary.transport = Some(transport);
    if let Some(image) = &summary.kernel_image {
        eprintln!(
            "zc-vmm: kernel image from {} {}",
            image.package.as_deref().unwrap_or("?"),
            image.deb_version.as_deref().unwrap_or("?")
        );
    }
    print_summary(&summary.run, &spec.kernel);
    if let Some(path) = &spec.outputs.summary {
        summary
            .save(path)
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    Ok(summary.exit_status)
}

fn print_summary(report: &RunReport, kernel: &Path) {
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    match (&report.kernel_release, report.time_to_init) {
        (Some(release), Some(at)) => eprintln!(
            "zc-vmm: guest kernel {release} ({:?} {}) reached /init {} after start (guest uptime {})",
            report.kernel_format,
            kernel.display(),
            secs(at),
            report
                .init_uptime
                .map(|u| format!("{u:.2} s"))
                .unwrap_or_else(|| "unknown".into()),
        ),
        _ => eprintln!("zc-vmm: the guest program never reported (no hello on the control channel)"),
    }
    for t in &report.transfers {
        let (did, ok) = match t.direction {
            Direction::ToPeer => ("received", "every byte matches"),
            Direction::ToGuest => ("sent (acknowledged)", "the guest counted every byte"),
        };
        eprintln!(
            "zc-vmm: peer {did} {} bytes of {}: {}{}",
            t.bytes,
            t.label,
            t.failure.as_deref().unwrap_or(ok),
            t.mbps
                .map(|m| format!(", {m:.1} Mbit/s"))
                .unwrap_or_default()
        );
    }
    if let Some(exits) = &report.vcpu_exits {
        eprintln!("zc-vmm: vCPU exits to the VMM: {}", exits.total);
    }
    match report.failure() {
        None => eprintln!(
            "zc-vmm: guest exited 0 ({:?}); run took {}",
            report.stop,
            secs(report.run_time)
        ),
        Some(why) => {
            eprintln!("zc-vmm: last console lines:");
            for line in &report.console_tail {
                eprintln!("  | {line}");
            }
            eprintln!("zc-vmm: FAILED after {}: {why}", secs(report.run_time));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_causes_are_not_repeated() {
        let inner = std::io::Error::other("disk on fire");
        let err = anyhow::Error::new(inner).context("cannot open disk.img: disk on fire");
        assert_eq!(one_line(&err), "cannot open disk.img: disk on fire");
        let err = anyhow::anyhow!("root cause").context("while booting");
        assert_eq!(one_line(&err), "while booting: root cause");
    }

    /// `zc-vmm run ARGS`, parsed, and the spec it describes.
    fn spec_of(args: &[&str]) -> Result<RunSpec> {
        let cli = Cli::try_parse_from(["zc-vmm", "run"].iter().chain(args))?;
        match cli.command {
            Cmd::Run(run) => run.flags.into_spec(),
            _ => unreachable!("parsed a run command"),
        }
    }

    #[test]
    fn run_flags_become_the_spec_they_describe() {
        let spec = spec_of(&[
            "--kernel",
            "/k/vmlinuz",
            "--initrd",
            "/k/initrd.img",
            "--append",
            "zc.test=x",
            "--mem",
            "1G",
            "--vcpus",
            "2",
            "--timeout",
            "90",
            "--disk",
            "/d.img",
            "--disk-ro",
            "--net",
            "peer",
            "--net-sg",
            "off",
            "--pcap",
            "/o/f.pcap",
            "--peer-expect",
            "/p1",
            "--peer-expect",
            "/p2",
            "--peer-expect-bytes",
            "100",
            "--peer-send",
            "/s1",
            "--peer-send-bytes",
            "50",
            "--dma-log",
            "/o/dma.jsonl",
            "--dirty-samples",
            "--console",
            "/o/console.txt",
            "--report-json",
            "/o/run.json",
            "--transport",
            "pci",
        ])
        .unwrap();
        let expected = RunSpec {
            initrd: Some("/k/initrd.img".into()),
            append: Some("zc.test=x".into()),
            mem_bytes: 1 << 30,
            vcpus: 2,
            timeout_s: 90,
            disk: Some(DiskSpec {
                path: "/d.img".into(),
                read_only: true,
            }),
            nics: vec![NicSpec {
                backend: NetBackendSpec::Peer,
                sg: false,
                pcap: Some("/o/f.pcap".into()),
                peer_expect: vec!["/p1".into(), "/p2".into()],
                peer_expect_bytes: Some(100),
                peer_send: vec!["/s1".into()],
                peer_send_bytes: Some(50),
            }],
            dirty_samples: true,
            transport: TransportChoice::Pci,
            outputs: RunOutputs {
                console: Some("/o/console.txt".into()),
                summary: Some("/o/run.json".into()),
                dma_log: Some("/o/dma.jsonl".into()),
            },
            ..RunSpec::new("/k/vmlinuz")
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn run_flags_defaults_are_the_spec_defaults() {
        assert_eq!(
            spec_of(&["--kernel", "/k/vmlinuz"]).unwrap(),
            RunSpec::new("/k/vmlinuz")
        );
    }

    #[test]
    fn a_tap_flag_set_becomes_a_tap_nic() {
        let spec = spec_of(&[
            "--kernel",
            "/k",
            "--net",
            "tap",
            "--tap",
            "zctest%d",
            "--tap-ip",
            "10.0.2.2/24",
        ])
        .unwrap();
        assert_eq!(
            spec.nics,
            vec![NicSpec {
                backend: NetBackendSpec::Tap {
                    name: "zctest%d".into(),
                    address: Some(TapAddress {
                        addr: std::net::Ipv4Addr::new(10, 0, 2, 2),
                        prefix: 24
                    }),
                },
                ..NicSpec::peer()
            }]
        );
    }

    #[rstest::rstest]
    #[case::expectation_without_a_card(&["--peer-expect", "/p"], "needs --net peer")]
    #[case::send_without_a_card(&["--peer-send", "/p"], "needs --net peer")]
    #[case::tap_address_without_a_tap(&["--net", "peer", "--tap-ip", "10.0.2.2/24"], "for --net tap")]
    fn flag_mistakes_are_one_line(#[case] args: &[&str], #[case] needle: &str) {
        let mut all = vec!["--kernel", "/k"];
        all.extend_from_slice(args);
        let message = one_line(&spec_of(&all).unwrap_err());
        assert!(message.contains(needle), "{message}");
    }

    #[test]
    fn a_spec_file_replaces_the_flags_and_excludes_them() {
        let cli = Cli::try_parse_from(["zc-vmm", "run", "--spec", "/s.json"]).unwrap();
        let Cmd::Run(run) = cli.command else {
            unreachable!()
        };
        assert_eq!(run.spec.as_deref(), Some(Path::new("/s.json")));
        assert!(
            Cli::try_parse_from(["zc-vmm", "run", "--spec", "/s.json", "--kernel", "/k"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["zc-vmm", "run", "--spec", "/s.json", "--mem", "1G"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["zc-vmm", "run"]).is_err(),
            "kernel or spec"
        );
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
