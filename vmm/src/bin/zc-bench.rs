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
use zc_vmm::emulated;
use zc_vmm::host::{self, HostMode};

/// Same command line for both VMMs: `zc-vmm`'s default.
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

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
}

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
        ];
        if cli.json.is_some() {
            args.extend(["--json".into(), inner_json.clone().into()]);
        }
        let status = emulated::relaunch_self(
            &images.join("host/vmlinuz"),
            &images.join("host/initrd.img"),
            args,
            exchange.path(),
            Duration::from_secs(120 + 60 * cli.runs as u64),
        )?;
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
    bench(&cli, &images, place)
}

fn bench(cli: &Cli, images: &Path, place: &str) -> Result<()> {
    let kernel = images.join("guest/vmlinuz");
    let initrd = images.join("guest/initrd.img");
    let release = std::fs::read_to_string(images.join("guest/kernel.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["release"].as_str().map(str::to_string))
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
    let median = |samples: &[Sample], pick: fn(&Sample) -> f64| {
        let mut values: Vec<f64> = samples.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
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
    if let Some(path) = &cli.json {
        json.insert("kernel_release".into(), release.into());
        json.insert("mode".into(), place.into());
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn boot_zc_vmm(zc_vmm: &Path, kernel: &Path, initrd: &Path, scratch: &Path) -> Result<Sample> {
    let report_path = scratch.join("zc-report.json");
    let started = Instant::now();
    let status = Command::new(zc_vmm)
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args([
            "--cmdline",
            CMDLINE,
            "--console",
            "/dev/null",
            "--report-json",
        ])
        .arg(&report_path)
        .stderr(Stdio::null())
        .status()
        .context("cannot start zc-vmm")?;
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("zc-vmm boot failed ({status}); run `zc-vmm run` by hand to see why");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    let init_uptime = report["init_uptime_s"]
        .as_f64()
        .context("zc-vmm report has no init uptime")?;
    Ok(Sample { init_uptime, wall })
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
        .args(["-device", "isa-serial,chardev=com2,iobase=0x2f8,irq=3"])
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
