//! `zc-bench`: `zc-vmm` side by side with QEMU `-M microvm` on the same (possibly
//! emulated) KVM host, with the same kernel, initramfs and command line:
//! - boot: time to the guest's `/init`, and the whole run, with no devices;
//! - devices: the same guest steps (an O_DIRECT read of the whole disk, then a TCP
//!   send of the payload, checked byte for byte by a peer) under `zc-vmm` with its
//!   in-VMM peer, and under QEMU with virtio-blk on the same disk image and
//!   virtio-net to a tap whose host side is the peer; `zc-vmm` also runs with its
//!   DMA log on, for the log's own cost.
//!
//! Runs alternate (the order rotates each round) so that drift hits every side
//! alike. Stdout gets medians and the ratios (median of the per-round ratios, with
//! their min and max, against the targets); each run's absolute figures go to
//! stderr, the log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use zc_devices::net_peer::{Expectation, SocketPeer};
use zc_protocol::addr::{DEFAULT_PEER, GUEST_MAC, GUEST_PREFIX, PEER_IP};
use zc_protocol::ControlMessage;
use zc_vmm::emulated;
use zc_vmm::host::{self, HostMode};
use zc_vmm::report::{GuestReport, RunSummary};
use zc_vmm::spec::{DiskSpec, NicSpec, RunOutputs, RunSpec, Transport, DEFAULT_CMDLINE};

/// Same command line for both VMMs: `zc-vmm`'s default.
const CMDLINE: &str = DEFAULT_CMDLINE;

/// The tap QEMU's card is attached to; its host side is the guest's peer.
const QEMU_TAP: &str = "zcbench0";

/// What a QEMU run may take beyond the guest's own timeout before it is killed.
const QEMU_GRACE: Duration = Duration::from_secs(60);

#[derive(Parser)]
#[command(
    name = "zc-bench",
    about = "zc-vmm beside QEMU microvm: boot time, disk and network throughput"
)]
struct Cli {
    /// Directory `make images` wrote [env: ZC_IMAGES].
    #[arg(long, env = "ZC_IMAGES", default_value = "images/out")]
    images: PathBuf,
    /// Rounds: each boots every side once.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the figures as JSON here as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Which measurements: boot (no devices), devices (disk read and TCP send, beside
    /// QEMU and with the DMA log off and on), or all.
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
}

/// The benchmark suites.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Boot time beside QEMU microvm.
    Boot,
    /// Device throughput beside QEMU microvm, and with the DMA log off and on.
    Devices,
    /// Both.
    All,
}

/// The median of `values` (the upper one of an even count); NaN for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median, min and max of a ratio over the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    /// The spread of `a[i] / b[i]` over the rounds: each ratio is taken within a
    /// round, between runs that were next to each other in time.
    fn of_ratios(a: &[f64], b: &[f64]) -> Spread {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
        Spread {
            median: median(&ratios),
            min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// What a ratio should be: at most or at least `value`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "op", content = "value")]
enum Target {
    #[serde(rename = "<=")]
    AtMost(f64),
    #[serde(rename = ">=")]
    AtLeast(f64),
}

impl Target {
    fn met_by(self, ratio: f64) -> bool {
        match self {
            Target::AtMost(t) => ratio <= t,
            Target::AtLeast(t) => ratio >= t,
        }
    }

    fn text(self) -> String {
        match self {
            Target::AtMost(t) => format!("<= {t:.2}"),
            Target::AtLeast(t) => format!(">= {t:.2}"),
        }
    }
}

/// One row of a side-by-side table: the samples of two sides, round by round.
#[derive(Debug, Clone)]
struct Row {
    label: &'static str,
    unit: &'static str,
    /// The sides' names in the JSON (`zc_vmm`, `qemu`; `log_on`, `log_off`).
    sides: [&'static str; 2],
    /// The first side's figure of each round.
    a: Vec<f64>,
    /// The second side's, the denominator of the ratio.
    b: Vec<f64>,
    ratio: Spread,
    target: Option<Target>,
    met: Option<bool>,
}

impl Row {
    fn new(
        label: &'static str,
        unit: &'static str,
        sides: [&'static str; 2],
        a: Vec<f64>,
        b: Vec<f64>,
        target: Option<Target>,
    ) -> Row {
        let ratio = Spread::of_ratios(&a, &b);
        Row {
            label,
            unit,
            sides,
            met: target.map(|t| t.met_by(ratio.median)),
            a,
            b,
            ratio,
            target,
        }
    }

    /// The row as JSON: each side's samples and median, the ratio, the target.
    fn json(&self) -> serde_json::Value {
        let [a, b] = self.sides;
        serde_json::json!({
            "label": self.label,
            "unit": self.unit,
            a: {"median": median(&self.a), "samples": self.a},
            b: {"median": median(&self.b), "samples": self.b},
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
        })
    }

    /// `label  median-a  median-b  ratio [min, max]  target verdict`.
    fn line(&self) -> String {
        let figure = |v: f64| match self.unit {
            "s" => format!("{v:.2} s"),
            unit => format!("{v:.1} {unit}"),
        };
        let verdict = match (self.target, self.met) {
            (Some(t), Some(met)) => format!("{} {}", t.text(), if met { "met" } else { "MISSED" }),
            _ => String::new(),
        };
        let range = format!("[{:.2}, {:.2}]", self.ratio.min, self.ratio.max);
        format!(
            "{:<36} {:>14} {:>14} {:>7.2} {range:<14} {verdict}",
            self.label,
            figure(median(&self.a)),
            figure(median(&self.b)),
            self.ratio.median,
        )
        .trim_end()
        .to_string()
    }
}

/// Prints a table of rows under `title`, with the two sides' column heads.
fn print_table(title: &str, heads: [&str; 3], rows: &[Row]) {
    println!("{title}");
    println!(
        "{:<36} {:>14} {:>14} {:>7} {:<14} target",
        "", heads[0], heads[1], heads[2], "[min, max]"
    );
    for row in rows {
        println!("{}", row.line());
    }
}

fn main() {
    if let Err(err) = real_main() {
        eprintln!("zc-bench: error: {err:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let images = std::fs::canonicalize(&cli.images).with_context(|| {
        format!(
            "{} not found: run `make images` first",
            cli.images.display()
        )
    })?;
    if cli.runs == 0 {
        bail!("--runs 0 measures nothing: give at least 1");
    }
    let (mode, why) = host::choose_here()?;
    if mode == HostMode::Emulated {
        eprintln!("zc-bench: mode emulated ({why}): measuring inside the emulated KVM host");
        let exchange = tempfile::Builder::new().prefix("zc-bench-").tempdir()?;
        let inner_json = exchange.path().join("bench.json");
        let mut args: Vec<OsString> = vec![
            "--images".into(),
            images.clone().into(),
            "--runs".into(),
            cli.runs.to_string().into(),
            "--suite".into(),
            match cli.suite {
                Suite::Boot => "boot",
                Suite::Devices => "devices",
                Suite::All => "all",
            }
            .into(),
        ];
        if cli.json.is_some() {
            args.extend(["--json".into(), inner_json.clone().into()]);
        }
        let attempt = || {
            emulated::relaunch_self(
                &images.join("host/vmlinuz"),
                &images.join("host/initrd.img"),
                args.clone(),
                exchange.path(),
                // Per round: two boots, then three device runs.
                Duration::from_secs(120 + 240 * cli.runs as u64),
            )
        };
        let status =
            emulated::retry_once_if_host_failed("zc-bench", exchange.path(), attempt, || {
                anyhow::Ok(())
            })?;
        if let Some(json) = &cli.json {
            std::fs::copy(&inner_json, json).context("no figures came back")?;
        }
        std::process::exit(status);
    }
    let place = if host::inside_emulated_host() {
        "direct, inside the emulated KVM host"
    } else {
        "direct"
    };
    let kernel = images.join("guest/vmlinuz");
    let release = zc_vmm::report::KernelImage::beside(&kernel)
        .map(|image| image.release)
        .unwrap_or_else(|| "unknown".into());
    let mut versus_qemu = Vec::new();
    let mut log_rows = Vec::new();
    if cli.suite != Suite::Devices {
        versus_qemu.extend(bench_boot(&cli, &images)?);
    }
    if cli.suite != Suite::Boot {
        let (beside_qemu, log) = bench_devices(&cli, &images)?;
        versus_qemu.extend(beside_qemu);
        log_rows = log;
    }
    print_table(
        &format!(
            "zc-vmm beside QEMU microvm: kernel {release}, mode {place}; medians of {} alternated runs each, ratio zc/QEMU per round",
            cli.runs
        ),
        ["zc-vmm", "QEMU", "zc/QEMU"],
        &versus_qemu,
    );
    if !log_rows.is_empty() {
        println!();
        print_table(
            "zc-vmm with its DMA log on and off: ratio on/off per round",
            ["log on", "log off", "on/off"],
            &log_rows,
        );
    }
    if let Some(path) = &cli.json {
        let json = serde_json::json!({
            "mode": place,
            "kernel_release": release,
            "runs": cli.runs,
            "zc_vs_qemu": versus_qemu.iter().map(Row::json).collect::<Vec<_>>(),
            "dma_log_on_vs_off": log_rows.iter().map(Row::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// One device run's figures, as the guest measured them.
#[derive(Debug, Clone, Copy)]
struct DeviceSample {
    /// O_DIRECT read of the whole disk.
    disk_mbps: f64,
    /// TCP send of the payload, until the peer's count of the last byte.
    send_mbps: f64,
}

impl DeviceSample {
    /// The figures of the guest's `disk-read` and `send` reports.
    fn from_reports(reports: &[GuestReport]) -> Result<DeviceSample> {
        /// What both reports carry.
        #[derive(Deserialize)]
        struct Throughput {
            mbps: f64,
        }
        let mbps = |test: &str| -> Result<f64> {
            let report = reports
                .iter()
                .find(|r| r.test() == Some(test))
                .with_context(|| format!("the guest sent no {test} report"))?;
            Ok(report
                .decode::<Throughput>()
                .with_context(|| format!("the guest's {test} report has no mbps"))?
                .mbps)
        };
        Ok(DeviceSample {
            disk_mbps: mbps("disk-read")?,
            send_mbps: mbps("send")?,
        })
    }
}

/// Who runs a device run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `zc-vmm` with its in-VMM peer, no DMA log.
    ZcLogOff,
    /// The same with the DMA log written.
    ZcLogOn,
    /// QEMU microvm, its card on a tap with the peer on the host side.
    Qemu,
}

impl Side {
    const ALL: [Side; 3] = [Side::ZcLogOff, Side::ZcLogOn, Side::Qemu];

    /// Round `round`'s order: rotated each round so that no side always goes first.
    fn order(round: usize) -> [Side; 3] {
        let mut order = Side::ALL;
        order.rotate_left(round % Side::ALL.len());
        order
    }

    fn name(self) -> &'static str {
        match self {
            Side::ZcLogOff => "zc-vmm log off",
            Side::ZcLogOn => "zc-vmm log on ",
            Side::Qemu => "qemu microvm  ",
        }
    }
}

/// Guest-side throughput of the disk (O_DIRECT 1 MiB reads of the whole device) and
/// of a TCP send to the peer: `zc-vmm` with the DMA log off and on, and QEMU.
/// Returns the rows beside QEMU and the rows of the log's cost.
fn bench_devices(cli: &Cli, images: &Path) -> Result<(Vec<Row>, Vec<Row>)> {
    let zc_vmm = std::env::current_exe()?.with_file_name("zc-vmm");
    let qemu = emulated::find_qemu()?;
    let scratch = tempfile::tempdir()?;
    // In the emulated host the image on the 9p share reads at an erratic speed (runs
    // alternate between two rates ten times apart); a memory-backed copy measures the
    // device and its log, not the share. Both VMMs read the same copy.
    let shm = Path::new("/dev/shm");
    let disk = if shm.is_dir() {
        let copy = shm.join("zc-bench-disk.img");
        std::fs::copy(images.join("guest/disk.img"), &copy)
            .context("cannot copy the disk image to /dev/shm")?;
        copy
    } else {
        images.join("guest/disk.img")
    };
    let tap = PeerTap::create(QEMU_TAP)?;
    let (mut off, mut on, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..cli.runs {
        for side in Side::order(round) {
            let sample = match side {
                Side::ZcLogOff => zc_device_run(&zc_vmm, images, &disk, scratch.path(), false)?,
                Side::ZcLogOn => zc_device_run(&zc_vmm, images, &disk, scratch.path(), true)?,
                Side::Qemu => qemu_device_run(&qemu, images, &disk, &tap, scratch.path())?,
            };
            eprintln!(
                "zc-bench: devices run {} {}: disk {:.1} Mbit/s, send {:.1} Mbit/s",
                round + 1,
                side.name(),
                sample.disk_mbps,
                sample.send_mbps
            );
            match side {
                Side::ZcLogOff => off.push(sample),
                Side::ZcLogOn => on.push(sample),
                Side::Qemu => theirs.push(sample),
            }
        }
    }
    drop(tap);
    if disk.starts_with(shm) {
        let _ = std::fs::remove_file(&disk);
    }
    let disk_of = |s: &[DeviceSample]| s.iter().map(|s| s.disk_mbps).collect::<Vec<_>>();
    let send_of = |s: &[DeviceSample]| s.iter().map(|s| s.send_mbps).collect::<Vec<_>>();
    const DISK: &str = "disk read, O_DIRECT 1 MiB";
    const SEND: &str = "TCP send to the peer, 64 KiB";
    const VS_QEMU: [&str; 2] = ["zc_vmm", "qemu"];
    const LOG: [&str; 2] = ["log_on", "log_off"];
    let beside_qemu = vec![
        Row::new(
            DISK,
            "Mb/s",
            VS_QEMU,
            disk_of(&off),
            disk_of(&theirs),
            Some(Target::AtLeast(1.0)),
        ),
        Row::new(
            SEND,
            "Mb/s",
            VS_QEMU,
            send_of(&off),
            send_of(&theirs),
            Some(Target::AtLeast(1.0)),
        ),
    ];
    let log_cost = vec![
        Row::new(
            DISK,
            "Mb/s",
            LOG,
            disk_of(&on),
            disk_of(&off),
            Some(Target::AtLeast(0.95)),
        ),
        Row::new(
            SEND,
            "Mb/s",
            LOG,
            send_of(&on),
            send_of(&off),
            Some(Target::AtLeast(0.95)),
        ),
    ];
    Ok((beside_qemu, log_cost))
}

/// One `zc-vmm` boot reading the whole disk and sending the payload to its peer.
fn zc_device_run(
    zc_vmm: &Path,
    images: &Path,
    disk: &Path,
    scratch: &Path,
    log: bool,
) -> Result<DeviceSample> {
    // Memory-backed when there is one: this measures the log, not the file system
    // under it (in the emulated host the scratch dir is a 9p share).
    let shm = Path::new("/dev/shm");
    let log_dir = if shm.is_dir() { shm } else { scratch };
    let spec = device_spec(images, disk, scratch, log.then_some(log_dir));
    run_spec(zc_vmm, &spec, scratch, true)?;
    let summary = RunSummary::load(&scratch.join("devices-report.json"))?;
    DeviceSample::from_reports(&summary.reports)
}

/// One QEMU boot with the device benchmark's spec: the same kernel, initrd, command
/// line (with the guest's steps), memory, disk copy (read-only), and the card on
/// `tap`, whose peer checks every byte of the payload as `zc-vmm`'s does.
fn qemu_device_run(
    qemu: &Path,
    images: &Path,
    disk: &Path,
    tap: &PeerTap,
    scratch: &Path,
) -> Result<DeviceSample> {
    let spec = device_spec(images, disk, scratch, None);
    for path in &spec.nics[0].peer_expect {
        let expectation = Expectation::of_file(path.display().to_string(), path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        tap.peer.expect(expectation);
    }
    let boot = QemuBoot::of_spec(&spec, scratch, Some(&tap.tap.0))?;
    let run = boot.run(qemu)?;
    // The guest reads the peer's count before it powers off: the connections are
    // over but for the last FIN in flight.
    let (results, missing) = tap.peer.finish(Duration::from_secs(2));
    ensure!(
        missing.is_empty(),
        "under QEMU the peer never got {}",
        missing.join(", ")
    );
    for received in &results {
        let what = received
            .expected
            .as_ref()
            .map_or("an unexpected connection", |e| e.label.as_str());
        if let Some(failure) = &received.failure {
            bail!("under QEMU the peer's check of {what} failed: {failure}");
        }
        ensure!(
            received.ok(),
            "under QEMU the peer's check of {what} failed"
        );
    }
    DeviceSample::from_reports(&run.reports())
}

/// The guest's steps for a device run: read the read-only disk, then send the
/// payload.
fn bench_guest_options() -> zc_protocol::Options {
    zc_protocol::Options {
        tests: vec![
            zc_protocol::TestHook::DiskRead,
            zc_protocol::TestHook::Send(zc_protocol::options::DEFAULT_FILE.to_string()),
        ],
        disk_read_only: true,
        ..zc_protocol::Options::default()
    }
}

/// The device benchmark's boot: the read-only disk, one card in front of the peer
/// expecting the payload, and the DMA log in `log_dir` if the run logs. QEMU's run
/// is made from the same spec.
fn device_spec(images: &Path, disk: &Path, scratch: &Path, log_dir: Option<&Path>) -> RunSpec {
    RunSpec {
        initrd: Some(images.join("guest/initrd.img")),
        append: Some(bench_guest_options().to_cmdline()),
        disk: Some(DiskSpec {
            path: disk.to_path_buf(),
            read_only: true,
        }),
        nics: vec![NicSpec {
            peer_expect: vec![images.join("guest/disk-files/payload.bin")],
            ..NicSpec::peer()
        }],
        outputs: RunOutputs {
            console: Some("/dev/null".into()),
            summary: Some(scratch.join("devices-report.json")),
            // Compressed, as `zc-vmm methods` writes it: the "log on" figure is
            // then the cost of the log a run writes.
            dma_log: log_dir.map(|dir| dir.join("zc-bench-dma.jsonl.zst")),
        },
        ..RunSpec::new(images.join("guest/vmlinuz"))
    }
}

/// A tap for QEMU's card, its host side at the guest's peer address
/// ([`PEER_IP`]/[`GUEST_PREFIX`]) with a [`SocketPeer`] listening on the peer port;
/// the tap is deleted when this is dropped.
struct PeerTap {
    peer: SocketPeer,
    tap: HostTap,
}

impl PeerTap {
    fn create(name: &str) -> Result<PeerTap> {
        let tap = HostTap::create(name)?;
        ip(&[
            "addr",
            "add",
            &format!("{PEER_IP}/{GUEST_PREFIX}"),
            "dev",
            name,
        ])?;
        ip(&["link", "set", name, "up"])?;
        let peer = SocketPeer::listen(DEFAULT_PEER, Vec::new())
            .with_context(|| format!("cannot listen on {DEFAULT_PEER} for QEMU's guest"))?;
        Ok(PeerTap { peer, tap })
    }
}

/// A persistent tap, deleted when dropped.
///
/// QEMU opens the tap itself (by name, with `IFF_VNET_HDR` and its offloads, which is
/// how QEMU is normally run), so the tap is made persistent beforehand for it to
/// attach to, with `ip`: `TapBackend` makes taps that live only as long as its own
/// descriptor, and without a vnet header.
struct HostTap(String);

impl HostTap {
    fn create(name: &str) -> Result<HostTap> {
        // A tap left over by a killed run: the fresh one must start clean.
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])
            .context("QEMU's card needs a tap (root and /dev/net/tun)")?;
        Ok(HostTap(name.to_string()))
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.0]) {
            eprintln!("zc-bench: warning: {e:#}");
        }
    }
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (Debian package iproute2; `make deps` installs it)")?;
    ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Runs `zc-vmm run --spec` on `spec` (written into `scratch`); with `keep_stderr`
/// its stderr goes to a file shown if the run fails, otherwise nowhere.
fn run_spec(zc_vmm: &Path, spec: &RunSpec, scratch: &Path, keep_stderr: bool) -> Result<()> {
    let spec_file = scratch.join("spec.json");
    spec.save(&spec_file)
        .with_context(|| format!("cannot write {}", spec_file.display()))?;
    let stderr_file = scratch.join("zc-vmm.err");
    let stderr = if keep_stderr {
        Stdio::from(std::fs::File::create(&stderr_file)?)
    } else {
        Stdio::null()
    };
    let status = Command::new(zc_vmm)
        .arg("run")
        .arg("--spec")
        .arg(&spec_file)
        .stderr(stderr)
        .status()
        .context("cannot start zc-vmm")?;
    if !status.success() && keep_stderr {
        let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
        bail!("zc-vmm device run failed ({status}):\n{stderr}");
    }
    if !status.success() {
        bail!("zc-vmm boot failed ({status}); run `zc-vmm run` by hand to see why");
    }
    Ok(())
}

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct BootSample {
    /// Guest uptime when /init started, as the guest reported it.
    init_uptime: f64,
    /// Host wall time from starting the VMM process to its exit.
    wall: f64,
}

/// Boot time of both, no devices; rows beside QEMU.
fn bench_boot(cli: &Cli, images: &Path) -> Result<Vec<Row>> {
    let kernel = images.join("guest/vmlinuz");
    let initrd = images.join("guest/initrd.img");
    let zc_vmm = std::env::current_exe()?.with_file_name("zc-vmm");
    let qemu = emulated::find_qemu()?;
    let scratch = tempfile::tempdir()?;
    let spec = boot_spec(&kernel, &initrd, scratch.path());

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..cli.runs {
        // Alternate which goes first so that drift hits both alike.
        let zc_first = run % 2 == 0;
        if zc_first {
            ours.push(boot_zc_vmm(&zc_vmm, &spec, scratch.path())?);
        }
        theirs.push(boot_qemu(&qemu, &spec, scratch.path())?);
        if !zc_first {
            ours.push(boot_zc_vmm(&zc_vmm, &spec, scratch.path())?);
        }
        eprintln!(
            "zc-bench: boot run {}: zc-vmm /init {:.2} s, wall {:.2} s | qemu microvm /init {:.2} s, wall {:.2} s",
            run + 1,
            ours[run].init_uptime,
            ours[run].wall,
            theirs[run].init_uptime,
            theirs[run].wall
        );
    }
    let of = |samples: &[BootSample], pick: fn(&BootSample) -> f64| {
        samples.iter().map(pick).collect::<Vec<_>>()
    };
    const VS_QEMU: [&str; 2] = ["zc_vmm", "qemu"];
    const BOOT: Option<Target> = Some(Target::AtMost(0.5));
    Ok(vec![
        Row::new(
            "boot: /init reached (guest uptime)",
            "s",
            VS_QEMU,
            of(&ours, |s| s.init_uptime),
            of(&theirs, |s| s.init_uptime),
            BOOT,
        ),
        Row::new(
            "boot: whole run (host wall time)",
            "s",
            VS_QEMU,
            of(&ours, |s| s.wall),
            of(&theirs, |s| s.wall),
            BOOT,
        ),
    ])
}

fn boot_zc_vmm(zc_vmm: &Path, spec: &RunSpec, scratch: &Path) -> Result<BootSample> {
    let started = Instant::now();
    run_spec(zc_vmm, spec, scratch, false)?;
    let wall = started.elapsed().as_secs_f64();
    let summary = RunSummary::load(&scratch.join("zc-report.json"))?;
    let init_uptime = summary
        .run
        .init_uptime
        .context("zc-vmm report has no init uptime")?;
    Ok(BootSample { init_uptime, wall })
}

/// The boot benchmark's boot: kernel, initrd and the command line QEMU gets too.
fn boot_spec(kernel: &Path, initrd: &Path, scratch: &Path) -> RunSpec {
    RunSpec {
        initrd: Some(initrd.to_path_buf()),
        cmdline: CMDLINE.into(),
        outputs: RunOutputs {
            console: Some("/dev/null".into()),
            summary: Some(scratch.join("zc-report.json")),
            dma_log: None,
        },
        ..RunSpec::new(kernel)
    }
}

fn boot_qemu(qemu: &Path, spec: &RunSpec, scratch: &Path) -> Result<BootSample> {
    let run = QemuBoot::of_spec(spec, scratch, None)?.run(qemu)?;
    let init_uptime = run
        .messages
        .iter()
        .find_map(|m| match m {
            ControlMessage::Uptime { seconds } => Some(*seconds),
            _ => None,
        })
        .context("the guest under QEMU reported no uptime")?;
    Ok(BootSample {
        init_uptime,
        wall: run.wall,
    })
}

/// A QEMU `-M microvm` boot made from a `zc-vmm` run spec, so both boot the same
/// kernel, initrd and command line with the same memory and vCPUs: the control
/// channel (COM2) goes to a file, the console nowhere; with a tap, the spec's disk
/// becomes a virtio-blk device and the card a virtio-net device on the tap.
#[derive(Debug, Clone, PartialEq)]
struct QemuBoot {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    mem_mib: u64,
    vcpus: u8,
    /// Where COM2, the guest's control channel, is written.
    control: PathBuf,
    /// The disk image, opened read-only.
    disk: Option<PathBuf>,
    /// The tap the card is on.
    tap: Option<String>,
    /// How long the run may take before it is killed.
    timeout: Duration,
}

impl QemuBoot {
    /// QEMU's boot of `spec`, its control file in `scratch`; its card, if it has
    /// one, on `tap` (which it then needs).
    fn of_spec(spec: &RunSpec, scratch: &Path, tap: Option<&str>) -> Result<QemuBoot> {
        // microvm has virtio-mmio only; the command line must be that transport's.
        ensure!(
            spec.transport().0 == Transport::Mmio,
            "QEMU microvm has only virtio-mmio, and this kernel boots on PCI: the comparison needs a kernel with virtio_mmio"
        );
        ensure!(
            spec.nics.len() <= 1 && (spec.nics.is_empty() || tap.is_some()),
            "QEMU's boot takes at most one card, on a tap"
        );
        Ok(QemuBoot {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.full_cmdline(),
            mem_mib: spec.mem_bytes >> 20,
            vcpus: spec.vcpus,
            control: scratch.join("qemu-com2.txt"),
            disk: spec.disk.as_ref().map(|d| d.path.clone()),
            tap: tap.filter(|_| !spec.nics.is_empty()).map(str::to_string),
            timeout: Duration::from_secs(spec.timeout_s) + QEMU_GRACE,
        })
    }

    /// QEMU's arguments.
    fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&["-accel", "kvm", "-cpu", "host"]);
        // The command line is the spec's alone: no virtio_mmio.device= words (the
        // devices are in ACPI, as zc-vmm describes its own).
        push(&["-M", "microvm,acpi=on,auto-kernel-cmdline=off"]);
        push(&["-m", &format!("{}M", self.mem_mib)]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-no-reboot"]);
        push(&["-kernel", &qemu_path(&self.kernel)]);
        if let Some(initrd) = &self.initrd {
            push(&["-initrd", &qemu_path(initrd)]);
        }
        push(&["-append", &self.cmdline]);
        push(&["-serial", "file:/dev/null"]);
        // microvm makes only COM1 from -serial; COM2 must be added as a device.
        push(&[
            "-chardev",
            &format!("file,id=com2,path={}", qemu_path(&self.control)),
        ]);
        push(&[
            "-device",
            &format!(
                "isa-serial,chardev=com2,iobase={:#x},irq=3",
                zc_protocol::addr::CONTROL_UART_BASE
            ),
        ]);
        if let Some(disk) = &self.disk {
            push(&[
                "-drive",
                &format!(
                    "file={},if=none,id=disk0,format=raw,readonly=on",
                    qemu_path(disk)
                ),
            ]);
            push(&["-device", "virtio-blk-device,drive=disk0"]);
        }
        if let Some(tap) = &self.tap {
            // Userspace virtio-net (no vhost), as zc-vmm's device is.
            push(&[
                "-netdev",
                &format!("tap,id=net0,ifname={tap},script=no,downscript=no,vhost=off"),
            ]);
            let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={mac}"),
            ]);
        }
        args
    }

    /// Boots it and waits for the guest to power off; fails unless the guest's
    /// program exited 0.
    fn run(&self, qemu: &Path) -> Result<QemuRun> {
        let _ = std::fs::remove_file(&self.control);
        let stderr_file = self.control.with_file_name("qemu.err");
        let started = Instant::now();
        let mut child = Command::new(qemu)
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_file)?)
            .spawn()
            .context("cannot start qemu")?;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "qemu microvm ran past {} s; killed it",
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let wall = started.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&self.control).unwrap_or_default();
        let messages: Vec<ControlMessage> = text.lines().map(ControlMessage::parse).collect();
        let exited_0 = messages.contains(&ControlMessage::Exit { code: 0 });
        if !status.success() || !exited_0 {
            let stderr = std::fs::read_to_string(&stderr_file).unwrap_or_default();
            bail!("qemu microvm boot failed ({status}); its stderr: {stderr:?}; its control channel said: {text:?}");
        }
        Ok(QemuRun { wall, messages })
    }
}

/// A path as one value of a QEMU option list, where a comma is written twice.
fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// What a QEMU boot gave.
struct QemuRun {
    /// Host wall time from starting QEMU to its exit.
    wall: f64,
    /// The guest's control messages, in order.
    messages: Vec<ControlMessage>,
}

impl QemuRun {
    /// The guest's `report` messages.
    fn reports(&self) -> Vec<GuestReport> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                ControlMessage::Report { json } => Some(GuestReport::parse(json)),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value after the first `flag` whose value starts with `prefix`.
    fn value_of<'a>(args: &'a [String], flag: &str, prefix: &str) -> Option<&'a str> {
        args.windows(2)
            .find(|w| w[0] == flag && w[1].starts_with(prefix))
            .map(|w| w[1].as_str())
    }

    #[test]
    fn the_device_benchmark_boots_one_peer_nic_with_the_log_on_or_off() {
        let images = Path::new("/i");
        let scratch = Path::new("/s");
        let off = device_spec(images, Path::new("/dev/shm/d.img"), scratch, None);
        assert_eq!(off.kernel, images.join("guest/vmlinuz"));
        assert_eq!(
            off.disk,
            Some(DiskSpec {
                path: "/dev/shm/d.img".into(),
                read_only: true
            })
        );
        assert_eq!(
            off.nics,
            vec![NicSpec {
                peer_expect: vec![images.join("guest/disk-files/payload.bin")],
                ..NicSpec::peer()
            }]
        );
        assert!(
            off.nics[0].sg,
            "the benchmark measures the scatter-gather card"
        );
        assert_eq!(off.outputs.dma_log, None);
        assert!(!off.dirty_samples);
        let on = device_spec(
            images,
            Path::new("/d.img"),
            scratch,
            Some(Path::new("/dev/shm")),
        );
        assert_eq!(
            on.outputs.dma_log.as_deref(),
            Some(Path::new("/dev/shm/zc-bench-dma.jsonl.zst"))
        );
        assert_eq!(on.nics, off.nics);
    }

    #[test]
    fn the_boot_benchmark_boots_no_devices_with_qemus_command_line() {
        let spec = boot_spec(Path::new("/k"), Path::new("/i"), Path::new("/s"));
        assert_eq!(spec.full_cmdline(), CMDLINE);
        assert!(spec.disk.is_none() && spec.nics.is_empty());
        assert_eq!(
            spec.outputs.summary.as_deref(),
            Some(Path::new("/s/zc-report.json"))
        );
    }

    #[test]
    fn the_boot_benchmarks_qemu_boots_the_same_kernel_initrd_and_command_line_without_devices() {
        let spec = boot_spec(Path::new("/k"), Path::new("/i"), Path::new("/s"));
        let boot = QemuBoot::of_spec(&spec, Path::new("/s"), Some("tap0")).unwrap();
        assert_eq!(boot.tap, None, "no card in the spec, no card in QEMU");
        let args = strings(&boot.args());
        assert_eq!(value_of(&args, "-kernel", ""), Some("/k"));
        assert_eq!(value_of(&args, "-initrd", ""), Some("/i"));
        assert_eq!(value_of(&args, "-append", ""), Some(CMDLINE));
        assert_eq!(value_of(&args, "-m", ""), Some("512M"));
        assert_eq!(value_of(&args, "-smp", ""), Some("1"));
        assert_eq!(value_of(&args, "-accel", ""), Some("kvm"));
        assert_eq!(
            value_of(&args, "-chardev", ""),
            Some("file,id=com2,path=/s/qemu-com2.txt")
        );
        assert_eq!(
            value_of(&args, "-device", "isa-serial"),
            Some("isa-serial,chardev=com2,iobase=0x2f8,irq=3")
        );
        assert!(!args.iter().any(|a| a == "-drive" || a == "-netdev"));
        assert_eq!(value_of(&args, "-device", "virtio"), None);
    }

    #[test]
    fn the_device_benchmarks_qemu_reads_the_same_disk_read_only_and_sends_through_the_tap() {
        let spec = device_spec(
            Path::new("/i"),
            Path::new("/dev/shm/d,1.img"),
            Path::new("/s"),
            None,
        );
        let boot = QemuBoot::of_spec(&spec, Path::new("/s"), Some("zcbench0")).unwrap();
        let args = strings(&boot.args());
        // The guest's steps are on the command line: the same one zc-vmm gives it.
        assert_eq!(
            value_of(&args, "-append", ""),
            Some(spec.full_cmdline().as_str())
        );
        assert!(spec
            .full_cmdline()
            .contains(&bench_guest_options().to_cmdline()));
        assert_eq!(value_of(&args, "-kernel", ""), Some("/i/guest/vmlinuz"));
        assert_eq!(value_of(&args, "-initrd", ""), Some("/i/guest/initrd.img"));
        // No extra virtio_mmio.device= words from QEMU: the devices are in ACPI.
        assert_eq!(
            value_of(&args, "-M", ""),
            Some("microvm,acpi=on,auto-kernel-cmdline=off")
        );
        // The comma in the path is escaped, or QEMU would read an option there.
        assert_eq!(
            value_of(&args, "-drive", ""),
            Some("file=/dev/shm/d,,1.img,if=none,id=disk0,format=raw,readonly=on")
        );
        assert_eq!(
            value_of(&args, "-device", "virtio-blk"),
            Some("virtio-blk-device,drive=disk0")
        );
        assert_eq!(
            value_of(&args, "-netdev", ""),
            Some("tap,id=net0,ifname=zcbench0,script=no,downscript=no,vhost=off")
        );
        // The guest finds its card by MAC.
        assert_eq!(
            value_of(&args, "-device", "virtio-net"),
            Some("virtio-net-device,netdev=net0,mac=52:54:00:12:34:56")
        );
        assert_eq!(
            boot.timeout,
            Duration::from_secs(spec.timeout_s) + QEMU_GRACE
        );
    }

    #[test]
    fn a_card_without_a_tap_is_refused() {
        let spec = device_spec(Path::new("/i"), Path::new("/d"), Path::new("/s"), None);
        let err = QemuBoot::of_spec(&spec, Path::new("/s"), None).unwrap_err();
        assert!(err.to_string().contains("on a tap"), "{err}");
    }

    #[test]
    fn every_side_goes_first_in_turn() {
        assert_eq!(Side::order(0), [Side::ZcLogOff, Side::ZcLogOn, Side::Qemu]);
        assert_eq!(Side::order(1), [Side::ZcLogOn, Side::Qemu, Side::ZcLogOff]);
        assert_eq!(Side::order(2), [Side::Qemu, Side::ZcLogOff, Side::ZcLogOn]);
        assert_eq!(Side::order(3), Side::order(0));
    }

    #[test]
    fn ratios_are_taken_per_round_then_summarised() {
        // Medians 2 and 2 would give 1.0; the rounds' ratios are 0.5, 2 and 4.
        let spread = Spread::of_ratios(&[1.0, 2.0, 8.0], &[2.0, 1.0, 2.0]);
        assert_eq!(
            spread,
            Spread {
                median: 2.0,
                min: 0.5,
                max: 4.0
            }
        );
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), 3.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_missed_target_is_shown_with_its_figure() {
        let row = Row::new(
            "disk",
            "Mb/s",
            ["zc_vmm", "qemu"],
            vec![90.0, 100.0, 95.0],
            vec![100.0, 100.0, 100.0],
            Some(Target::AtLeast(1.0)),
        );
        assert_eq!(row.met, Some(false));
        let line = row.line();
        assert!(line.contains("0.95 [0.90, 1.00]"), "{line}");
        assert!(line.ends_with(">= 1.00 MISSED"), "{line}");
        let boot = Row::new(
            "boot",
            "s",
            ["zc_vmm", "qemu"],
            vec![1.0],
            vec![4.0],
            Some(Target::AtMost(0.5)),
        );
        assert_eq!(boot.met, Some(true));
        assert!(boot.line().ends_with("<= 0.50 met"), "{}", boot.line());
        let json = boot.json();
        assert_eq!(json["zc_vmm"]["samples"], serde_json::json!([1.0]));
        assert_eq!(json["qemu"]["median"], 4.0);
        assert_eq!(json["ratio"]["median"], 0.25);
        assert_eq!(
            json["target"],
            serde_json::json!({"op": "<=", "value": 0.5})
        );
    }

    #[test]
    fn device_figures_come_from_the_guests_reports() {
        let reports = [
            GuestReport::parse(r#"{"test":"disk-read","bytes":1,"ok":true,"mbps":1500.5}"#),
            GuestReport::parse(r#"{"test":"send","ok":true,"mbps":80.25}"#),
        ];
        let sample = DeviceSample::from_reports(&reports).unwrap();
        assert_eq!((sample.disk_mbps, sample.send_mbps), (1500.5, 80.25));
        let err = DeviceSample::from_reports(&reports[..1]).unwrap_err();
        assert!(err.to_string().contains("no send report"), "{err}");
    }
}
