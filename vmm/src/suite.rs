//! `zc-vmm methods`: the product's main job. Boots the guest once per NIC variant
//! (scatter-gather on, and off), runs the transfer methods in it with the DMA log and
//! dirty-page samples on, audits each method against the expected table and writes
//! the reports (`docs/method-suite.md`).
//!
//! Each variant is a [`RunSpec`], written beside its outputs (`<variant>.spec.json`)
//! and run by a plain `zc-vmm run --spec` child process, so it goes through the same
//! host probe, emulated-host relaunch and checks as any run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use zc_audit::{AuditInput, Expectations, MethodAudit, Verdict};
use zc_protocol::options::{Options, Suite, TestHook};
use zc_protocol::report::{MethodReport, METHOD_TEST};
use zc_protocol::Method;
use zc_vmm::report::RunSummary;
use zc_vmm::spec::{parse_mem, DiskSpec, NicSpec, RunOutputs, RunSpec};

/// Default locations, as `make images` leaves them.
const DEFAULT_KERNEL: &str = "images/out/guest/vmlinuz";
const DEFAULT_INITRD: &str = "images/out/guest/initrd.img";
const DEFAULT_DISK: &str = "images/out/guest/disk.img";
const DEFAULT_PAYLOAD: &str = "images/out/guest/disk-files/payload.bin";
const DEFAULT_EXPECTED: &str = "audit/expected.toml";

/// Options of `zc-vmm methods`.
#[derive(Args, Clone)]
pub struct MethodsArgs {
    /// Guest kernel (bzImage or vmlinux).
    #[arg(long, default_value = DEFAULT_KERNEL)]
    kernel: PathBuf,
    /// Guest initrd (zc-guest and the kernel's modules; `make images`).
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
    /// Guest memory, e.g. 512M or 1G (a bare number is MiB).
    #[arg(long, default_value = "512M", value_parser = parse_mem)]
    mem: u64,
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
    // The protocol's order (cheapest copies last, warm cache at the end); the table
    // names no other method (`Expectations::load` checks).
    let known: Vec<String> = Method::ALL
        .iter()
        .filter(|m| expectations.methods.contains_key(m.name()))
        .map(|m| m.name().to_string())
        .collect();
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
    let source =
        payload[..usize::try_from(size).expect("checked: at most the payload length")].to_vec();

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
    let run = RunSummary::load(&files.run_json)?;
    let reports = run
        .reports_of(METHOD_TEST)
        .map(|r| r.decode::<MethodReport>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "{}: a method report is not of the report's shape",
                files.run_json.display()
            )
        })?;
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

/// The guest's options for one variant's boot: the method suite, from the
/// read-only test disk.
fn guest_options(variant: &Variant, size: u64, chunk: u64) -> Result<Options> {
    let methods = variant
        .methods
        .iter()
        .map(|name| name.parse::<Method>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Options {
        tests: vec![TestHook::Methods],
        disk_read_only: true,
        suite: Suite {
            methods,
            size: Some(size),
            chunk: usize::try_from(chunk).context("--chunk does not fit in memory")?,
            ..Suite::default()
        },
        ..Options::default()
    })
}

/// What one variant's boot left behind.
struct VariantFiles {
    dma_log: PathBuf,
    run_json: PathBuf,
    failure: Option<String>,
}

fn boot_variant(args: &MethodsArgs, variant: &Variant, size: u64) -> Result<VariantFiles> {
    let out = |suffix: &str| args.out.join(format!("{}.{suffix}", variant.name));
    let spec = variant_spec(args, variant, size)?;
    let files = VariantFiles {
        dma_log: out("dma-log.jsonl"),
        run_json: out("run.json"),
        failure: None,
    };
    // Beside the outputs: what was booted, and `zc-vmm run --spec` boots it again.
    let spec_file = out("spec.json");
    spec.save(&spec_file)
        .with_context(|| format!("cannot write {}", spec_file.display()))?;
    let exe = std::env::current_exe().context("cannot find the zc-vmm executable")?;
    eprintln!(
        "zc-vmm: variant {} (NIC scatter-gather {}): {}",
        variant.name,
        if variant.sg { "on" } else { "off" },
        variant.methods.join(", ")
    );
    let status = Command::new(exe)
        .arg("run")
        .arg("--spec")
        .arg(&spec_file)
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

/// One variant's boot: the read-only test disk, one card in front of the peer with
/// the variant's scatter-gather, expecting `size` bytes of the payload once per
/// method, and the DMA log with dirty-page samples.
fn variant_spec(args: &MethodsArgs, variant: &Variant, size: u64) -> Result<RunSpec> {
    let out = |suffix: &str| args.out.join(format!("{}.{suffix}", variant.name));
    Ok(RunSpec {
        initrd: Some(args.initrd.clone()),
        append: Some(guest_options(variant, size, args.chunk)?.to_cmdline()),
        mem_bytes: args.mem,
        timeout_s: args.timeout,
        disk: Some(DiskSpec {
            path: args.disk.clone(),
            read_only: true,
        }),
        nics: vec![NicSpec {
            sg: variant.sg,
            pcap: Some(out("pcap")),
            peer_expect: vec![args.payload.clone(); variant.methods.len()],
            peer_expect_bytes: Some(size),
            ..NicSpec::peer()
        }],
        dirty_samples: true,
        outputs: RunOutputs {
            console: Some(out("console.txt")),
            summary: Some(out("run.json")),
            dma_log: Some(out("dma-log.jsonl")),
        },
        ..RunSpec::new(&args.kernel)
    })
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
        let release = RunSummary::load(&dir.join("sg-on.run.json"))
            .ok()
            .and_then(|summary| summary.run.kernel_release)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: MethodsArgs,
    }

    fn methods_args(extra: &[&str]) -> MethodsArgs {
        let argv = ["zc-vmm-methods", "--out", "/o", "--mem", "1G"];
        Wrapper::parse_from(argv.iter().chain(extra)).args
    }

    #[rstest::rstest]
    #[case::sg_on("sg-on", true)]
    #[case::sg_off("sg-off", false)]
    fn each_variant_boots_one_peer_nic_with_its_scatter_gather(
        #[case] name: &'static str,
        #[case] sg: bool,
    ) {
        let args = methods_args(&["--chunk", "8192", "--timeout", "300"]);
        let variant = Variant {
            name,
            sg,
            methods: vec!["sendfile".into(), "splice".into()],
        };
        let mut spec = variant_spec(&args, &variant, 4096).unwrap();
        // The guest's options, as the guest will parse them.
        let append = spec.append.take().expect("the guest's options");
        let options = Options::parse(&append).unwrap();
        assert_eq!(options.tests, vec![TestHook::Methods]);
        assert!(options.disk_read_only);
        assert_eq!(
            options.suite,
            Suite {
                methods: vec![Method::Sendfile, Method::Splice],
                size: Some(4096),
                chunk: 8192,
                ..Suite::default()
            }
        );
        let out = |suffix: &str| PathBuf::from(format!("/o/{name}.{suffix}"));
        let expected = RunSpec {
            initrd: Some(DEFAULT_INITRD.into()),
            mem_bytes: 1 << 30,
            timeout_s: 300,
            disk: Some(DiskSpec {
                path: DEFAULT_DISK.into(),
                read_only: true,
            }),
            nics: vec![NicSpec {
                sg,
                pcap: Some(out("pcap")),
                // One connection per method, each the payload's first `size` bytes.
                peer_expect: vec![PathBuf::from(DEFAULT_PAYLOAD); 2],
                peer_expect_bytes: Some(4096),
                ..NicSpec::peer()
            }],
            dirty_samples: true,
            outputs: RunOutputs {
                console: Some(out("console.txt")),
                summary: Some(out("run.json")),
                dma_log: Some(out("dma-log.jsonl")),
            },
            ..RunSpec::new(DEFAULT_KERNEL)
        };
        assert_eq!(spec, expected);
    }
}
