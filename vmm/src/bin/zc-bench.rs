//! `zc-bench`: boot time of `zc-vmm` beside QEMU `-M microvm` with the same kernel,
//! initramfs and command line, measured side by side on the same (possibly
//! emulated) KVM host, alternating runs so that noise hits both alike. Prints
//! medians and the zc/QEMU ratio; absolute times are for the log only.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use zc_vmm::emulated;
use zc_vmm::host::{self, HostMode};
use zc_vmm::report::RunSummary;
use zc_vmm::spec::{DiskSpec, NicSpec, RunOutputs, RunSpec, DEFAULT_CMDLINE};

/// Same command line for both VMMs: `zc-vmm`'s default.
const CMDLINE: &str = DEFAULT_CMDLINE;

#[derive(Parser)]
#[command(name = "zc-bench", about = "Boot time: zc-vmm beside QEMU microvm")]
struct Cli {
    /// Directory `make images` wrote [env: ZC_IMAGES].
    #[arg(long, env = "ZC_IMAGES", default_value = "images/out")]
    images: PathBuf,
    /// Boots per VMM.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the figures as JSON here as well.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Which measurements: boot (zc-vmm beside QEMU), devices (disk and network
    /// throughput with the DMA log off and on), or all.
    #[arg(long, value_enum, default_value_t = Suite::All)]
    suite: Suite,
}

/// The benchmark suites.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Boot time beside QEMU microvm.
    Boot,
    /// Device throughput, DMA log off and on.
    Devices,
    /// Both.
    All,
}

/// The median of one figure over the samples (the upper one of an even count).
fn median<T>(samples: &[T], pick: fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = samples.iter().map(pick).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Picks one figure out of a device sample: (disk, send) Mbit/s.
type DeviceMetric = fn(&(f64, f64)) -> f64;

/// Picks one figure out of a sample.
type Metric = fn(&Sample) -> f64;

/// One boot's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Guest uptime when /init started, as the guest reported it.
    init_uptime: f64,
    /// Host wall time from starting the VMM process to its exit.
    wall: f64,
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
                Duration::from_secs(120 + 150 * cli.runs as u64),
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
    let mut json = serde_json::Map::new();
    if cli.suite != Suite::Devices {
        json = bench_boot(&cli, &images, place)?;
    }
    if cli.suite != Suite::Boot {
        json.insert("devices".into(), bench_devices(&cli, &images)?);
    }
    if let Some(path) = &cli.json {
        json.insert("mode".into(), place.into());
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// Guest-side throughput of the disk (O_DIRECT 1 MiB reads of the whole device) and
/// of a TCP send to the peer, with the DMA log off and on, alternating.
fn bench_devices(cli: &Cli, images: &Path) -> Result<serde_json::Value> {
    let zc_vmm = std::env::current_exe()?.with_file_name("zc-vmm");
    let scratch = tempfile::tempdir()?;
    // In the emulated host the image on the 9p share reads at an erratic speed (runs
    // alternate between two rates ten times apart); a memory-backed copy measures the
    // device and its log, not the share.
    let shm = Path::new("/dev/shm");
    let disk = if shm.is_dir() {
        let copy = shm.join("zc-bench-disk.img");
        std::fs::copy(images.join("guest/disk.img"), &copy)
            .context("cannot copy the disk image to /dev/shm")?;
        copy
    } else {
        images.join("guest/disk.img")
    };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for run in 0..cli.runs {
        // Alternate which goes first so that drift hits both alike.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for log in order {
            let sample = device_run(&zc_vmm, images, &disk, scratch.path(), log)?;
            eprintln!(
                "zc-bench: devices run {} log {}: disk {:.1} Mbit/s, send {:.1} Mbit/s",
                run + 1,
                if log { "on " } else { "off" },
                sample.0,
                sample.1
            );
            if log {
                on.push(sample)
            } else {
                off.push(sample)
            }
        }
    }
    if disk.starts_with(shm) {
        let _ = std::fs::remove_file(&disk);
    }
    println!(
        "device benchmark: guest-side throughput, median of {} runs each",
        cli.runs
    );
    println!(
        "{:<34} {:>12} {:>12} {:>9}",
        "", "log off", "log on", "on/off"
    );
    let mut json = serde_json::Map::new();
    let rows: [(&str, DeviceMetric); 2] = [
        ("disk read, O_DIRECT 1 MiB", |s| s.0),
        ("TCP send to the peer, 64 KiB", |s| s.1),
    ];
    for (label, pick) in rows {
        let (a, b) = (median(&off, pick), median(&on, pick));
        println!("{label:<34} {a:>7.1} Mb/s {b:>7.1} Mb/s {:>9.2}", b / a);
        json.insert(
            label.into(),
            serde_json::json!({"log_off_mbps": a, "log_on_mbps": b, "ratio": b / a}),
        );
    }
    // Every run's (disk, send) figures: the console relay can lose stderr lines.
    json.insert(
        "samples".into(),
        serde_json::json!({"log_off": off, "log_on": on}),
    );
    Ok(json.into())
}

/// One boot reading the whole disk and sending the payload; (disk, send) Mbit/s as
/// the guest measured them.
fn device_run(
    zc_vmm: &Path,
    images: &Path,
    disk: &Path,
    scratch: &Path,
    log: bool,
) -> Result<(f64, f64)> {
    // Memory-backed when there is one: this measures the log, not the file system
    // under it (in the emulated host the scratch dir is a 9p share).
    let shm = Path::new("/dev/shm");
    let log_dir = if shm.is_dir() { shm } else { scratch };
    let spec = device_spec(images, disk, scratch, log.then_some(log_dir));
    run_spec(zc_vmm, &spec, scratch, true)?;
    let summary = RunSummary::load(&scratch.join("devices-report.json"))?;
    /// What the guest's `disk-read` and `send` reports measured.
    #[derive(Deserialize)]
    struct Throughput {
        mbps: f64,
    }
    let mbps = |test: &str| Ok::<_, anyhow::Error>(summary.report::<Throughput>(test)?.mbps);
    Ok((mbps("disk-read")?, mbps("send")?))
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
/// expecting the payload, and the DMA log in `log_dir` if the run logs.
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

fn bench_boot(
    cli: &Cli,
    images: &Path,
    place: &str,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let kernel = images.join("guest/vmlinuz");
    let initrd = images.join("guest/initrd.img");
    let release = zc_vmm::report::KernelImage::beside(&kernel)
        .map(|image| image.release)
        .unwrap_or_else(|| "unknown".into());
    let zc_vmm = std::env::current_exe()?.with_file_name("zc-vmm");
    let qemu = emulated::find_qemu()?;
    let scratch = tempfile::tempdir()?;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..cli.runs {
        ours.push(boot_zc_vmm(&zc_vmm, &kernel, &initrd, scratch.path())?);
        theirs.push(boot_qemu(&qemu, &kernel, &initrd, scratch.path())?);
        eprintln!(
            "zc-bench: run {}: zc-vmm /init {:.2} s, wall {:.2} s | qemu microvm /init {:.2} s, wall {:.2} s",
            run + 1,
            ours[run].init_uptime,
            ours[run].wall,
            theirs[run].init_uptime,
            theirs[run].wall
        );
    }
    let rows: [(&str, Metric); 2] = [
        ("/init reached (guest uptime)", |s| s.init_uptime),
        ("whole run (host wall time)", |s| s.wall),
    ];
    println!(
        "boot benchmark: kernel {release}, mode {place}, median of {} runs each",
        cli.runs
    );
    println!(
        "{:<30} {:>10} {:>14} {:>9}",
        "", "zc-vmm", "qemu microvm", "zc/qemu"
    );
    let mut json = serde_json::Map::new();
    for (label, pick) in rows {
        let (a, b) = (median(&ours, pick), median(&theirs, pick));
        println!("{label:<30} {a:>8.2} s {b:>12.2} s {:>9.2}", a / b);
        json.insert(
            label.into(),
            serde_json::json!({"zc_vmm_s": a, "qemu_microvm_s": b, "ratio": a / b}),
        );
    }
    json.insert("kernel_release".into(), release.into());
    Ok(json)
}

fn boot_zc_vmm(zc_vmm: &Path, kernel: &Path, initrd: &Path, scratch: &Path) -> Result<Sample> {
    let spec = boot_spec(kernel, initrd, scratch);
    let started = Instant::now();
    run_spec(zc_vmm, &spec, scratch, false)?;
    let wall = started.elapsed().as_secs_f64();
    let summary = RunSummary::load(&scratch.join("zc-report.json"))?;
    let init_uptime = summary
        .run
        .init_uptime
        .context("zc-vmm report has no init uptime")?;
    Ok(Sample { init_uptime, wall })
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

fn boot_qemu(qemu: &Path, kernel: &Path, initrd: &Path, scratch: &Path) -> Result<Sample> {
    let control = scratch.join("qemu-com2.txt");
    let _ = std::fs::remove_file(&control);
    // microvm makes only COM1 from -serial; COM2 must be added as a device.
    let mut com2 = OsString::from("file,id=com2,path=");
    com2.push(&control);
    let started = Instant::now();
    let status = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-M",
            "microvm,acpi=on",
            "-m",
            "512M",
            "-smp",
            "1",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE, "-serial", "file:/dev/null", "-chardev"])
        .arg(&com2)
        .arg("-device")
        .arg(format!(
            "isa-serial,chardev=com2,iobase={:#x},irq=3",
            zc_protocol::addr::CONTROL_UART_BASE
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("cannot start qemu")?;
    let wall = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&control).unwrap_or_default();
    if !status.success() || !text.contains("exit 0") {
        bail!("qemu microvm boot failed ({status}); its control channel said: {text:?}");
    }
    let init_uptime = text
        .lines()
        .find_map(|l| l.strip_prefix("uptime "))
        .and_then(|v| v.trim().parse().ok())
        .context("the guest under QEMU reported no uptime")?;
    Ok(Sample { init_uptime, wall })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
