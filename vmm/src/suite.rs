//! `zc-vmm methods`: the product's main job. Boots the guest once per NIC variant
//! (scatter-gather on, and off), runs the transfer methods in it with the DMA log and
//! dirty-page samples on, audits each method against the expected table and writes
//! the reports (`docs/method-suite.md`).
//!
//! Each variant is a plain `zc-vmm run` child process, so it goes through the same
//! host probe, emulated-host relaunch and checks as any run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use zc_audit::{AuditInput, Expectations, MethodAudit, Verdict};

/// Default locations, as `make images` leaves them.
const DEFAULT_KERNEL: &str = "images/out/guest/vmlinuz";
const DEFAULT_INITRD: &str = "images/out/guest/initrd.img";
const DEFAULT_DISK: &str = "images/out/guest/disk.img";
const DEFAULT_PAYLOAD: &str = "images/out/guest/disk-files/payload.bin";
const DEFAULT_EXPECTED: &str = "audit/expected.toml";

/// The methods in the order of `../shared/docs/transfer-methods.md`.
const METHOD_ORDER: &[&str] = &[
    "read_write",
    "mmap_write",
    "sendfile",
    "splice",
    "direct_write",
    "direct_zerocopy",
    "mmap_zerocopy",
    "uring_send_zc",
    "cow_zerocopy",
    "sendfile_warm",
];

/// Options of `zc-vmm methods`.
#[derive(Args, Clone)]
pub struct MethodsArgs {
    /// Guest kernel (bzImage or vmlinux).
    #[arg(long, default_value = DEFAULT_KERNEL)]
    kernel: PathBuf,
    /// Guest initrd (zc-init and the kernel's modules; `make images`).
    #[arg(long, default_value = DEFAULT_INITRD)]
    initrd: PathBuf,
    /// The test disk (ext4 holding the payload file); the guest gets it read-only.
    #[arg(long, default_value = DEFAULT_DISK)]
    disk: PathBuf,
    /// The payload file, as on the disk: what the peer checks and the audit matches.
    #[arg(long, default_value = DEFAULT_PAYLOAD)]
    payload: PathBuf,
    /// Methods to run with the NIC's scatter-gather on, comma-separated, or `all`
    /// (every method of audit/expected.toml).
    #[arg(long, default_value = "all")]
    methods: String,
    /// Methods to run again with scatter-gather off (a second boot), or `none`. By
    /// default the two whose rows show what the NIC changes: `sendfile` (1 CPU copy
    /// instead of 0) and `mmap_zerocopy` (the kernel's zero-copy claim vs the device).
    #[arg(long, default_value = "sendfile,mmap_zerocopy")]
    sg_off_methods: String,
    /// Bytes each method sends (a prefix of the payload); default the whole file.
    #[arg(long)]
    size: Option<u64>,
    /// Bytes per chunk (a multiple of 4096).
    #[arg(long, default_value_t = 65536)]
    chunk: u64,
    /// The expected table.
    #[arg(long, default_value = DEFAULT_EXPECTED)]
    expected: PathBuf,
    /// Where logs and reports go (created).
    #[arg(long, default_value = "out/methods")]
    out: PathBuf,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    mem: String,
    /// Give up on a variant's guest after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

/// One boot: the NIC's feature set and the methods run under it.
struct Variant {
    name: &'static str,
    sg: bool,
    methods: Vec<String>,
}

/// Runs the suite; returns the exit status (0 when every verdict is PASS or SKIP).
pub fn run(args: MethodsArgs) -> Result<i32> {
    let started = Instant::now();
    for (what, path, hint) in [
        (
            "kernel",
            &args.kernel,
            "pass --kernel PATH or run `make images`",
        ),
        (
            "initrd",
            &args.initrd,
            "pass --initrd PATH or run `make images`",
        ),
        ("disk", &args.disk, "pass --disk PATH or run `make images`"),
        (
            "payload file",
            &args.payload,
            "pass --payload PATH (the file on the disk) or run `make images`",
        ),
        (
            "expected table",
            &args.expected,
            "pass --expected PATH (audit/expected.toml in the source tree)",
        ),
    ] {
        if !path.is_file() {
            bail!("{what} {} does not exist: {hint}", path.display());
        }
    }
    if args.chunk == 0 || !args.chunk.is_multiple_of(4096) {
        bail!(
            "--chunk {}: must be a positive multiple of 4096",
            args.chunk
        );
    }
    let expectations = Expectations::load(&args.expected)
        .with_context(|| format!("cannot load the expected table {}", args.expected.display()))?;
    // The specification's order first (cheapest copies last, warm cache at the end),
    // then any method a user added to the table.
    let mut known: Vec<String> = METHOD_ORDER
        .iter()
        .filter(|m| expectations.methods.contains_key(**m))
        .map(|m| m.to_string())
        .collect();
    known.extend(
        expectations
            .methods
            .keys()
            .filter(|m| !METHOD_ORDER.contains(&m.as_str()))
            .cloned(),
    );
    let select = |list: &str, flag: &str| -> Result<Vec<String>> {
        if list == "all" {
            return Ok(known.clone());
        }
        if list == "none" {
            return Ok(Vec::new());
        }
        let names: Vec<String> = list.split(',').map(|m| m.trim().to_string()).collect();
        if let Some(bad) = names.iter().find(|m| !known.contains(m)) {
            bail!(
                "{flag}: {bad:?} is not a method of {} (known: {})",
                args.expected.display(),
                known.join(", ")
            );
        }
        Ok(names)
    };
    let variants: Vec<Variant> = [
        ("sg-on", true, select(&args.methods, "--methods")?),
        (
            "sg-off",
            false,
            select(&args.sg_off_methods, "--sg-off-methods")?,
        ),
    ]
    .into_iter()
    .filter(|(_, _, methods)| !methods.is_empty())
    .map(|(name, sg, methods)| Variant { name, sg, methods })
    .collect();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    let payload = std::fs::read(&args.payload)
        .with_context(|| format!("cannot read the payload {}", args.payload.display()))?;
    let size = args.size.unwrap_or(payload.len() as u64);
    if size == 0 || size > payload.len() as u64 {
        bail!(
            "--size {size}: the payload {} has {} bytes",
            args.payload.display(),
            payload.len()
        );
    }
    let source = payload[..size as usize].to_vec();

    let mut audits: Vec<MethodAudit> = Vec::new();
    let mut run_failures = Vec::new();
    for variant in &variants {
        let files = boot_variant(&args, variant, size)?;
        match audit_variant(&files, &source, variant, &expectations) {
            Ok(mut found) => audits.append(&mut found),
            Err(e) => run_failures.push(format!("{}: {e:#}", variant.name)),
        }
        if let Some(why) = files.failure {
            run_failures.push(format!("{}: {why}", variant.name));
        }
    }

    let elapsed = started.elapsed().as_secs_f64();
    let ktap = zc_audit::report::ktap(&audits);
    write(&args.out.join("verdicts.ktap"), &ktap)?;
    write(
        &args.out.join("verdicts.json"),
        &zc_audit::report::json(&audits),
    )?;
    write(
        &args.out.join("report.html"),
        &zc_audit::report::html(&audits),
    )?;
    println!("{}", zc_audit::report::table(&audits));
    println!(
        "zc-vmm: {} method runs in {elapsed:.1} s; logs and reports in {} (verdicts.ktap, verdicts.json, report.html)",
        audits.len(),
        args.out.display()
    );
    for failure in &run_failures {
        println!("zc-vmm: run problem: {failure}");
    }
    let failed = audits.iter().filter(|a| a.verdict == Verdict::Fail).count();
    if failed > 0 || !run_failures.is_empty() {
        println!(
            "zc-vmm: FAIL: {failed} verdict(s) differ from {}{}",
            args.expected.display(),
            if run_failures.is_empty() {
                ""
            } else {
                ", and a run failed"
            }
        );
        return Ok(1);
    }
    println!(
        "zc-vmm: PASS: every verdict matches {}",
        args.expected.display()
    );
    Ok(0)
}

/// Audits one variant's run: its DMA log and the guest's method reports. Every
/// method the variant was to run gets a row, also one the guest never reported.
fn audit_variant(
    files: &VariantFiles,
    source: &[u8],
    variant: &Variant,
    expectations: &Expectations,
) -> Result<Vec<MethodAudit>> {
    let records = zc_dma_log::read_log(&files.dma_log)
        .with_context(|| format!("cannot read the DMA log {}", files.dma_log.display()))?;
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&files.run_json)
            .with_context(|| format!("cannot read {}", files.run_json.display()))?,
    )
    .with_context(|| format!("{} is not JSON", files.run_json.display()))?;
    let report_lines: Vec<String> = run["reports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["test"] == "method")
        .map(|r| r.to_string())
        .collect();
    let reports = zc_audit::parse_reports(&report_lines.join("\n"))?;
    let input = AuditInput {
        records,
        source: source.to_vec(),
        reports,
        variant: variant.name.to_string(),
    };
    Ok(zc_audit::audit_wanted(
        &input,
        expectations,
        &variant.methods,
    ))
}

/// What one variant's boot left behind.
struct VariantFiles {
    dma_log: PathBuf,
    run_json: PathBuf,
    failure: Option<String>,
}

fn boot_variant(args: &MethodsArgs, variant: &Variant, size: u64) -> Result<VariantFiles> {
    let out = |suffix: &str| args.out.join(format!("{}.{suffix}", variant.name));
    let files = VariantFiles {
        dma_log: out("dma-log.jsonl"),
        run_json: out("run.json"),
        failure: None,
    };
    let exe = std::env::current_exe().context("cannot find the zc-vmm executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--kernel")
        .arg(&args.kernel)
        .arg("--initrd")
        .arg(&args.initrd)
        .arg("--disk")
        .arg(&args.disk)
        .arg("--disk-ro")
        .args([
            "--net",
            "peer",
            "--net-sg",
            if variant.sg { "on" } else { "off" },
        ])
        .arg("--mem")
        .arg(&args.mem)
        .arg("--timeout")
        .arg(args.timeout.to_string())
        .arg("--dma-log")
        .arg(&files.dma_log)
        .arg("--dirty-samples")
        .arg("--report-json")
        .arg(&files.run_json)
        .arg("--console")
        .arg(out("console.txt"))
        .arg("--pcap")
        .arg(out("pcap"))
        .arg("--append")
        .arg(format!(
            "zc.test=methods zc.disk=ro zc.methods={} zc.size={size} zc.chunk={}",
            variant.methods.join(","),
            args.chunk
        ));
    for _ in &variant.methods {
        cmd.arg("--peer-expect").arg(&args.payload);
    }
    cmd.arg("--peer-expect-bytes").arg(size.to_string());
    eprintln!(
        "zc-vmm: variant {} (NIC scatter-gather {}): {}",
        variant.name,
        if variant.sg { "on" } else { "off" },
        variant.methods.join(", ")
    );
    let status = cmd
        .status()
        .context("cannot start zc-vmm run for a variant")?;
    let failure = match status.code() {
        Some(0) => None,
        Some(code) => Some(format!(
            "zc-vmm run exited {code} (console: {})",
            out("console.txt").display()
        )),
        None => Some("zc-vmm run was killed".to_string()),
    };
    Ok(VariantFiles { failure, ..files })
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Options of `zc-vmm compare`.
#[derive(Args, Clone)]
pub struct CompareArgs {
    /// Output directories of `zc-vmm methods` runs (e.g. one per kernel).
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
}

/// Prints the verdicts of several `methods` runs side by side, one column group per
/// run, headed by the guest kernel's release.
pub fn compare(args: CompareArgs) -> Result<i32> {
    let mut runs = Vec::new();
    for dir in &args.dirs {
        let path = dir.join("verdicts.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {}: run `zc-vmm methods --out {}` first",
                path.display(),
                dir.display()
            )
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        let release = std::fs::read_to_string(dir.join("sg-on.run.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["kernel_release"].as_str().map(str::to_string))
            .unwrap_or_else(|| dir.display().to_string());
        runs.push((
            release,
            json["methods"].as_array().cloned().unwrap_or_default(),
        ));
    }
    let mut rows: Vec<(String, String)> = Vec::new();
    for (_, methods) in &runs {
        for m in methods {
            let key = (
                m["method"].as_str().unwrap_or("?").to_string(),
                m["variant"].as_str().unwrap_or("?").to_string(),
            );
            if !rows.contains(&key) {
                rows.push(key);
            }
        }
    }
    let cell_width = 30;
    let mut header = format!("{:<30}", "method [variant]");
    let mut rule = "-".repeat(30);
    for (release, _) in &runs {
        header.push_str(&format!(" | {release:<cell_width$}"));
        rule.push_str(&format!("-+-{}", "-".repeat(cell_width)));
    }
    println!("{header}\n{:<30}{}", "", sub_header(runs.len(), cell_width));
    println!("{rule}");
    let mut worst = 0;
    for (method, variant) in &rows {
        let mut line = format!("{:<30}", format!("{method} [{variant}]"));
        for (_, methods) in &runs {
            let cell = match methods
                .iter()
                .find(|m| m["method"] == method.as_str() && m["variant"] == variant.as_str())
            {
                Some(m) => {
                    if m["verdict"] == "FAIL" {
                        worst = 1;
                    }
                    format!(
                        "{:>5.2} {:>6.1}% {:>7} {}",
                        m["cpu_copies"].as_f64().unwrap_or(f64::NAN),
                        m["zero_copy_pct"].as_f64().unwrap_or(f64::NAN),
                        m["throughput_mbit_s"]
                            .as_f64()
                            .map(|t| format!("{t:.0}"))
                            .unwrap_or_else(|| "-".into()),
                        m["verdict"].as_str().unwrap_or("?")
                    )
                }
                None => "not run".to_string(),
            };
            line.push_str(&format!(" | {cell:<cell_width$}"));
        }
        println!("{line}");
    }
    Ok(worst)
}

fn sub_header(runs: usize, width: usize) -> String {
    (0..runs)
        .map(|_| format!(" | {:<width$}", "cpu   0-copy  Mbit/s verdict"))
        .collect()
}
