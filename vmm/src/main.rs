//! `zc-vmm`: boots a Linux guest under KVM, directly or inside an emulated KVM host.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use zc_vmm::emulated;
use zc_vmm::host::{self, HostMode};
use zc_vmm::vm::{self, ConsoleTarget, DiskConfig, NetConfig, RunReport, VmConfig};

mod suite;

/// Default kernel command line: serial console, reboot through the keyboard
/// controller, reboot at once on panic (so a panic ends the run), no PCI bus to scan.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
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
    /// Print the verdicts of several `methods` runs (e.g. one per kernel) side by side.
    Compare(suite::CompareArgs),
    /// Print what the host probe finds and which mode a run would use.
    Probe,
    /// Read a DMA log (--dma-log): show records, totals, or search.
    DmaLog {
        #[command(subcommand)]
        action: DmaLogCmd,
    },
}

#[derive(Subcommand)]
enum DmaLogCmd {
    /// One line per record.
    Show(DmaLogArgs),
    /// Descriptors and bytes per device and direction, requests per kind.
    Stats(DmaLogArgs),
    /// Records whose JSON text contains PATTERN (e.g. a fingerprint).
    Grep {
        /// Text to look for.
        pattern: String,
        #[command(flatten)]
        args: DmaLogArgs,
    },
}

#[derive(Args)]
struct DmaLogArgs {
    /// The log file.
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

fn parse_device(text: &str) -> Result<zc_dma_log::DeviceKind, String> {
    match text {
        "blk" => Ok(zc_dma_log::DeviceKind::Blk),
        "net" => Ok(zc_dma_log::DeviceKind::Net),
        _ => Err(format!("{text:?} is not a device: use blk or net")),
    }
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
    /// Kernel image: bzImage (e.g. Debian's /boot/vmlinuz-*) or ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
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
    /// With --net tap: the tap device's name (created if absent; `%d` is numbered).
    /// In emulated mode it lives inside the emulated host.
    #[arg(long, default_value = "zctap%d")]
    tap: String,
    /// With --net tap: give the host side of the tap this address and bring it up
    /// (otherwise that is the caller's job). With --peer-expect as well, the check
    /// listens on this address, port 7878, through the host's own TCP stack; the
    /// guest's default peer is 10.0.2.2, so `--tap-ip 10.0.2.2/24`.
    #[arg(long, value_name = "ADDR/PREFIX", value_parser = parse_ipv4_prefix)]
    tap_ip: Option<(Ipv4Addr, u8)>,
    /// Give up after this many seconds (of the guest's own run).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Emulated mode: the emulated host's kernel [env: ZC_HOST_KERNEL].
    #[arg(long, env = "ZC_HOST_KERNEL", default_value = DEFAULT_HOST_KERNEL)]
    host_kernel: PathBuf,
    /// Emulated mode: the emulated host's initrd [env: ZC_HOST_INITRD].
    #[arg(long, env = "ZC_HOST_INITRD", default_value = DEFAULT_HOST_INITRD)]
    host_initrd: PathBuf,
}

/// Parses `10.0.2.2/24`.
fn parse_ipv4_prefix(text: &str) -> Result<(Ipv4Addr, u8), String> {
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
    Ok((addr, prefix))
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

/// Parses `512M`, `2G`, `65536K` or a bare MiB count into bytes.
fn parse_mem(text: &str) -> Result<u64, String> {
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
        .filter(|bytes| *bytes <= 64 << 30)
        .ok_or_else(|| format!("{text} is too large: at most 64G"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(*args),

        Cmd::Methods(args) => suite::run(*args),
        Cmd::Compare(args) => suite::compare(args),
        Cmd::Probe => probe().map(|_| 0),
        Cmd::DmaLog { action } => dma_log(action).map(|_| 0),
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

fn dma_log(action: DmaLogCmd) -> Result<()> {
    use std::io::Write as _;
    use zc_dma_log::Record;
    use zc_vmm::dma_view::{self, Filter};
    let (args, totals, pattern) = match action {
        DmaLogCmd::Show(args) => (args, false, None),
        DmaLogCmd::Stats(args) => (args, true, None),
        DmaLogCmd::Grep { pattern, args } => (args, false, Some(pattern)),
    };
    let records = zc_dma_log::read_log(&args.log)
        .with_context(|| format!("cannot read the DMA log {}", args.log.display()))?;
    if let Some(span) = &args.span {
        let begin = format!("BEGIN {span}");
        if !records
            .iter()
            .any(|r| matches!(r, Record::Marker(m) if m.label == begin))
        {
            bail!("the log has no marker `{begin}`: see `zc-vmm dma-log grep mark`");
        }
    }
    let filter = Filter {
        device: args.device,
        queue: args.queue,
        span: args.span.clone(),
        addr: args.addr,
    };
    let mut selected = dma_view::select(&records, &filter);
    if let Some(pattern) = &pattern {
        selected
            .retain(|r| serde_json::to_string(r).is_ok_and(|json| json.contains(pattern.as_str())));
    }
    let mut out = std::io::stdout().lock();
    let written = if totals {
        writeln!(out, "{}", dma_view::stats(&selected))
    } else {
        selected
            .into_iter()
            .try_for_each(|record| writeln!(out, "{}", dma_view::line(record)))
    };
    match written {
        // `zc-vmm dma-log show LOG | head` is normal use, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
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
    if !args.kernel.is_file() {
        bail!(
            "kernel {} does not exist: pass --kernel PATH (run `make images` for the default one)",
            args.kernel.display()
        );
    }
    zc_vmm::boot::detect_format(&args.kernel)?;
    if !args.peer_expect.is_empty() {
        match args.net {
            NetBackendArg::None => bail!("--peer-expect needs --net peer (or tap with --tap-ip)"),
            NetBackendArg::Tap if args.tap_ip.is_none() => bail!(
                "--peer-expect with --net tap needs --tap-ip (e.g. 10.0.2.2/24): the check listens on that address"
            ),
            _ => {}
        }
    }
    if args.tap_ip.is_some() && args.net != NetBackendArg::Tap {
        bail!("--tap-ip is for --net tap");
    }
    for file in &args.peer_expect {
        if !file.is_file() {
            bail!(
                "--peer-expect {} does not exist: name the file the guest will send",
                file.display()
            );
        }
    }
    if let Some(disk) = &args.disk {
        if !disk.is_file() {
            bail!(
                "disk image {} does not exist: pass --disk PATH (run `make images` for the test disk)",
                disk.display()
            );
        }
    }
    if let Some(initrd) = &args.initrd {
        if !initrd.is_file() {
            bail!(
                "initrd {} does not exist: pass --initrd PATH (run `make images` for the default one)",
                initrd.display()
            );
        }
    }
    match mode {
        HostMode::Direct => {
            let place = if host::inside_emulated_host() {
                ", inside the emulated KVM host"
            } else {
                ""
            };
            eprintln!("zc-vmm: mode direct ({why}){place}");
            run_direct(&args, mode)
        }
        HostMode::Emulated => {
            eprintln!(
                "zc-vmm: mode emulated ({why}): booting the emulated KVM host under QEMU TCG"
            );
            run_emulated(&args)
        }
    }
}

fn run_direct(args: &RunArgs, mode: HostMode) -> Result<i32> {
    let mut cmdline = args.cmdline.clone();
    if let Some(extra) = &args.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let config = VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline,
        mem_bytes: args.mem,
        vcpus: args.vcpus,
        console: match &args.console {
            Some(path) => ConsoleTarget::File(path.clone()),
            None => ConsoleTarget::Stdout,
        },
        timeout: Duration::from_secs(args.timeout),
        disk: args.disk.as_ref().map(|path| DiskConfig {
            path: path.clone(),
            read_only: args.disk_ro,
        }),
        dma_log: args.dma_log.clone(),
        dirty_samples: args.dirty_samples,
        net: (args.net != NetBackendArg::None).then(|| NetConfig {
            sg: args.net_sg == OnOff::On,
            pcap: args.pcap.clone(),
            expect: args.peer_expect.clone(),
            expect_bytes: args.peer_expect_bytes,
            tap: (args.net == NetBackendArg::Tap).then(|| args.tap.clone()),
            tap_ip: args.tap_ip,
        }),
    };
    let report = vm::run(&config)?;
    let image_info = kernel_image_info(&args.kernel);
    if let Some(info) = &image_info {
        eprintln!(
            "zc-vmm: kernel image from {} {}",
            info["package"].as_str().unwrap_or("?"),
            info["deb_version"].as_str().unwrap_or("?")
        );
    }
    print_summary(&report, &args.kernel);
    if let Some(path) = &args.report_json {
        let mut json = report_json(&report, &args.kernel, mode);
        json["kernel_image"] = image_info.unwrap_or(serde_json::Value::Null);
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    Ok(report.exit_status())
}

/// What `zc-image` recorded about the kernel (package, Debian version, release), from
/// the `kernel.json` it leaves beside the images; `None` for a kernel it did not make.
fn kernel_image_info(kernel: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(kernel.parent()?.join("kernel.json")).ok()?;
    let info: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(serde_json::json!({
        "package": info.get("package"),
        "deb_version": info.get("deb_version"),
        "release": info.get("release"),
    }))
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
        eprintln!(
            "zc-vmm: peer received {} bytes of {}: {}{}",
            t.bytes,
            t.label,
            t.failure.as_deref().unwrap_or("every byte matches"),
            t.mbps
                .map(|m| format!(", {m:.1} Mbit/s"))
                .unwrap_or_default()
        );
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

fn report_json(report: &RunReport, kernel: &Path, mode: HostMode) -> serde_json::Value {
    serde_json::json!({
        "schema": "zc-vmm-run/1",
        "mode": mode.to_string(),
        "inside_emulated_host": host::inside_emulated_host(),
        "kernel": kernel,
        "kernel_format": format!("{:?}", report.kernel_format),
        "kernel_release": report.kernel_release,
        "init_uptime_s": report.init_uptime,
        "time_to_init_s": report.time_to_init.map(|d| d.as_secs_f64()),
        "run_time_s": report.run_time.as_secs_f64(),
        "stop": format!("{:?}", report.stop),
        "guest_exit": report.guest_exit,
        "exit_status": report.exit_status(),
        "failure": report.failure(),
        // The guest's machine-readable results, parsed (kept as text if not JSON).
        "reports": report.messages.iter().filter_map(|(_, m)| match m {
            zc_devices::control::ControlMessage::Report { json } => Some(
                serde_json::from_str(json).unwrap_or_else(|_| serde_json::Value::String(json.clone())),
            ),
            _ => None,
        }).collect::<Vec<_>>(),
        "messages": report.messages.iter().map(|(at, m)| {
            serde_json::json!({"at_s": at.as_secs_f64(), "message": format!("{m:?}")})
        }).collect::<Vec<_>>(),
        "console_tail": report.console_tail,
        "transfers": report.transfers.iter().map(|t| serde_json::json!({
            "label": t.label, "bytes": t.bytes, "ok": t.failure.is_none(),
            "failure": t.failure, "mbps": t.mbps,
        })).collect::<Vec<_>>(),
        "missing_transfers": report.missing_transfers,
    })
}

/// How long the emulated host may take beyond the guest's own timeout: its boot and
/// the 9p mounts.
const EMULATED_HOST_OVERHEAD: Duration = Duration::from_secs(60);

fn run_emulated(args: &RunArgs) -> Result<i32> {
    let started = Instant::now();
    let exchange = tempfile::Builder::new()
        .prefix("zc-emulated-")
        .tempdir()
        .context("cannot create the exchange directory for the emulated host")?;
    let absolute = |p: &Path| -> Result<PathBuf> {
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
    };

    // Only the exchange directory is writable inside: output files are written there
    // and copied to where the user asked after the run.
    let inner_console = exchange.path().join("console.txt");
    let inner_report = exchange.path().join("report.json");
    let inner_log = exchange.path().join("dma-log.jsonl");
    let inner_pcap = exchange.path().join("frames.pcap");
    // The host's tree is read-only in there: the guest's disk is a copy in the
    // exchange directory, written back after the run unless it is read-only.
    let inner_disk = exchange.path().join("disk.img");
    if let Some(disk) = &args.disk {
        std::fs::copy(disk, &inner_disk)
            .with_context(|| format!("cannot copy {} for the emulated host", disk.display()))?;
    }
    let mut argv: Vec<OsString> = vec!["run".into()];
    let mut push = |flag: &str, value: OsString| {
        argv.push(flag.into());
        argv.push(value);
    };
    push("--kernel", absolute(&args.kernel)?.into());
    if let Some(initrd) = &args.initrd {
        push("--initrd", absolute(initrd)?.into());
    }
    push("--cmdline", args.cmdline.clone().into());
    if let Some(extra) = &args.append {
        push("--append", extra.into());
    }
    push("--mem", format!("{}K", args.mem >> 10).into());
    push("--vcpus", args.vcpus.to_string().into());
    push("--timeout", args.timeout.to_string().into());
    if args.console.is_some() {
        push("--console", inner_console.clone().into());
    }
    if args.report_json.is_some() {
        push("--report-json", inner_report.clone().into());
    }
    if args.dma_log.is_some() {
        push("--dma-log", inner_log.clone().into());
    }

    if args.net != NetBackendArg::None {
        let backend = if args.net == NetBackendArg::Tap {
            "tap"
        } else {
            "peer"
        };
        push("--net", backend.into());
        push("--tap", args.tap.clone().into());
        if let Some((ip, prefix)) = args.tap_ip {
            push("--tap-ip", format!("{ip}/{prefix}").into());
        }
        let sg = if args.net_sg == OnOff::On {
            "on"
        } else {
            "off"
        };
        push("--net-sg", sg.into());
        for file in &args.peer_expect {
            push("--peer-expect", absolute(file)?.into());
        }
        if let Some(bytes) = args.peer_expect_bytes {
            push("--peer-expect-bytes", bytes.to_string().into());
        }
        if args.pcap.is_some() {
            push("--pcap", inner_pcap.clone().into());
        }
    }
    if args.disk.is_some() {
        push("--disk", inner_disk.clone().into());
        if args.disk_ro {
            argv.push("--disk-ro".into());
        }
    }
    if args.dirty_samples {
        argv.push("--dirty-samples".into());
    }
    let attempt = || {
        emulated::relaunch_self(
            &args.host_kernel,
            &args.host_initrd,
            argv.clone(),
            exchange.path(),
            Duration::from_secs(args.timeout) + EMULATED_HOST_OVERHEAD,
        )
    };
    let status = emulated::retry_once_if_host_failed("zc-vmm", exchange.path(), attempt, || {
        // The second start gets the original disk, not what the first one wrote.
        if let Some(disk) = &args.disk {
            std::fs::copy(disk, &inner_disk)
                .with_context(|| format!("cannot copy {} for the emulated host", disk.display()))?;
        }
        anyhow::Ok(())
    })?;
    if let (Some(disk), false) = (&args.disk, args.disk_ro) {
        std::fs::copy(&inner_disk, disk)
            .with_context(|| format!("cannot write the guest's disk back to {}", disk.display()))?;
    }
    for (inner, wanted) in [
        (&inner_console, &args.console),
        (&inner_report, &args.report_json),
        (&inner_log, &args.dma_log),
        (&inner_pcap, &args.pcap),
    ] {
        if let Some(wanted) = wanted {
            // A run that failed early writes no outputs; its status says why.
            if let Err(e) = std::fs::copy(inner, wanted) {
                eprintln!(
                    "zc-vmm: no {} from inside the emulated host: {e}",
                    wanted.display()
                );
            }
        }
    }
    eprintln!(
        "zc-vmm: emulated host finished in {:.2} s; command exited {status}",
        started.elapsed().as_secs_f64()
    );
    Ok(status)
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

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_mem("512M"), Ok(512 << 20));
        assert_eq!(parse_mem("2G"), Ok(2 << 30));
        assert_eq!(parse_mem("65536k"), Ok(64 << 20));
        assert_eq!(parse_mem("256"), Ok(256 << 20));
        assert!(parse_mem("lots").unwrap_err().contains("512M"));
        assert!(parse_mem("100G").unwrap_err().contains("too large"));
        assert!(parse_mem("").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
