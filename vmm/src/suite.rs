//! `zc-vmm methods`: the product's main job. Boots the guest once with one card per
//! NIC variant (scatter-gather on, and off), runs the transfer methods through each
//! card with the DMA log and dirty-page samples on, audits each method against the
//! expected table and writes the reports (`docs/method-suite.md`).
//!
//! The boot is a [`RunSpec`], written beside its outputs (`suite.spec.json`) and run
//! by a plain `zc-vmm run --spec` child process, so it goes through the same host
//! probe, emulated-host relaunch and checks as any run. Card `n` is the `n`-th
//! variant: the guest's `zc.cards` names it, its span names say it
//! (`sendfile@sg-off`), its DMA records carry `card: n`, and the audit keeps the
//! rows apart by it.

use std::io::{BufRead as _, BufReader, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use zc_audit::report::KcidbIds;
use zc_audit::{
    AuditInput, Expectations, MethodAudit, Negotiated, OutputFile, RunContext, VariantRun, Verdict,
    Verdicts,
};
use zc_protocol::addr::Card;
use zc_protocol::control::ControlMessage;
use zc_protocol::options::{MethodRun, Options, Suite, SuiteCard, TestHook};
use zc_protocol::report::{MethodReport, METHOD_TEST};
use zc_protocol::{Direction, Method};
use zc_vmm::exits::VcpuExits;
use zc_vmm::host::{self, HostMode};
use zc_vmm::progress::MethodProgress;
use zc_vmm::report::{KernelImage, RunSummary};
use zc_vmm::spec::{parse_mem, DiskSpec, NicSpec, RunOutputs, RunSpec, TransportChoice};

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
    /// (every method of audit/expected.toml, both directions), `send` (file to
    /// network) or `receive` (network to file, on a scratch disk).
    #[arg(long, default_value = "all")]
    methods: String,
    /// Methods to run again with scatter-gather off (through a second card), the
    /// same words, or `none`. By
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
    /// The virtio transport: `mmio`, `pci` (modern virtio-pci, MSI-X), or `auto`
    /// (mmio for now; later what the kernel's config has). Verdicts must not depend
    /// on it.
    #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
    transport: TransportChoice,
    /// Extra kernel command-line words for every variant's boot, e.g.
    /// `virtio_net.csum=0` (a driver that refuses checksum offload, and with it
    /// scatter-gather). Kernel options only: the suite sets the guest program's
    /// `zc.*` options itself.
    #[arg(long, value_name = "ARGS", value_parser = parse_append)]
    append: Option<String>,
    #[command(flatten)]
    pub(crate) seccomp: crate::SeccompSwitch,
}

/// Checks `--append`: one line of kernel options, none of them the guest program's
/// `zc.*` (the suite's own: a `zc.methods` or `zc.size` there would make the guest
/// run something other than what the peer expects and the audit judges). The length
/// is checked with the whole command line ([`RunSpec::validate`]).
fn parse_append(text: &str) -> Result<String, String> {
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(format!(
            "{c:?} in --append: give kernel options as words separated by spaces, on one line"
        ));
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    if let Some(own) = words.iter().find(|w| w.starts_with("zc.")) {
        return Err(format!(
            "{own}: the suite sets the guest program's zc.* options itself (zc.test, zc.methods, zc.size, zc.chunk, zc.disk); pass kernel options only, or use `zc-vmm run --append`"
        ));
    }
    if words.is_empty() {
        return Err(
            "--append is empty: give kernel options, e.g. --append virtio_net.csum=0".into(),
        );
    }
    Ok(words.join(" "))
}

/// One NIC variant: a card's feature set and the methods run through it.
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    sg: bool,
    methods: Vec<String>,
}

impl Variant {
    /// How many of its methods go `direction`.
    fn count(&self, direction: Direction) -> usize {
        self.methods
            .iter()
            .filter(|m| Method::from_name(m).map(Method::direction) == Some(direction))
            .count()
    }
}

/// The scratch disk the receive methods write to (`suite.scratch.img`, read back
/// after the boot); kept with the outputs, so `zc-vmm audit` reads it back again.
const SCRATCH_IMAGE: &str = "scratch.img";

/// A blank scratch disk for the boot, if a card runs receive methods: room for each
/// run's `size` bytes.
fn new_scratch_disk(out: &Path, variants: &[Variant], size: u64) -> Result<Option<PathBuf>> {
    let path = out.join(format!("{BOOT_NAME}.{SCRATCH_IMAGE}"));
    let receives: usize = variants.iter().map(|v| v.count(Direction::Receive)).sum();
    if receives == 0 {
        // Not this boot's: an older run's image would be read back as this one's.
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    }
    let bytes = size * u64::try_from(receives).expect("a handful of methods");
    zc_images::scratch::create(&path, zc_images::scratch::size_for(bytes))
        .with_context(|| format!("cannot make the scratch disk {}", path.display()))?;
    Ok(Some(path))
}

/// The name of the boot's own files: `suite.spec.json`, `suite.run.json`,
/// `suite.dma-log.jsonl.zst`, `suite.console.txt` (each card's pcap is
/// `<variant>.pcap`).
pub const BOOT_NAME: &str = "suite";

/// The exit status of a run whose host cannot run KVM guests at all (kselftest's
/// `KSFT_SKIP`).
pub const EXIT_SKIP: i32 = 4;

/// The exit status of a run whose kernel could not be tested at all: no boot got
/// the kernel to `/init` (it panicked, hung, or is not a kernel that boots here).
/// `git bisect run` skips a commit that exits 125, so a bisection steps over a
/// kernel that does not boot for reasons other than the regression it hunts. A
/// run that died without its summary is the harness's failure, not the kernel's,
/// and stays a plain 1.
pub const EXIT_NOT_TESTED: i32 = 125;

/// Why no verdict of this run says anything about the kernel's transfer paths
/// (see [`EXIT_NOT_TESTED`]): the boot left its summary and did not reach `/init`.
fn not_tested(boot: &Boot) -> Option<String> {
    let summary = RunSummary::load(&boot.file("run.json")).ok()?;
    if summary.run.kernel_release.is_some() {
        return None;
    }
    Some(format!(
        "the kernel did not reach /init ({})",
        summary.failure.as_deref().unwrap_or("no failure recorded")
    ))
}

/// Checks that `path` is a regular file, saying what is there instead.
fn require_file(what: &str, path: &Path, hint: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => bail!(
            "{what} {} is a directory, not a file: {hint}",
            path.display()
        ),
        Ok(_) => bail!("{what} {} is not a regular file: {hint}", path.display()),
        Err(_) => bail!("{what} {} does not exist: {hint}", path.display()),
    }
}

/// Runs the suite; returns the exit status, kselftest's: 0 when every verdict is
/// PASS or SKIP, 1 when one FAILs or a boot failed, 4 when this host can run no KVM
/// guest at all; and [`EXIT_NOT_TESTED`] (125) when no boot got the kernel to
/// `/init`. The verdicts' KTAP goes to stdout; the table and progress to stderr.
pub fn run(args: MethodsArgs) -> Result<i32> {
    let started = Instant::now();
    let date = zc_vmm::report::rfc3339_utc(std::time::SystemTime::now());
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
        require_file(what, path, hint)?;
    }
    if args.chunk == 0 || !args.chunk.is_multiple_of(4096) {
        bail!(
            "--chunk {}: must be a positive multiple of 4096",
            args.chunk
        );
    }
    let expectations = Expectations::load(&args.expected)
        .with_context(|| format!("cannot load the expected table {}", args.expected.display()))?;
    // The protocol's order (send methods, cheapest copies last, warm cache at the
    // end; then the receive methods); the table names no other method
    // (`Expectations::load` checks).
    let with_rows = |m: &Method| expectations.methods.contains_key(m.name());
    let known: Vec<String> = Method::every()
        .filter(with_rows)
        .map(|m| m.name().to_string())
        .collect();
    let of_direction = |direction: Direction| -> Vec<String> {
        Method::every()
            .filter(|m| with_rows(m) && m.direction() == direction)
            .map(|m| m.name().to_string())
            .collect()
    };
    let select = |list: &str, flag: &str| -> Result<Vec<String>> {
        match list {
            "all" => return Ok(known.clone()),
            "send" => return Ok(of_direction(Direction::Send)),
            "receive" => return Ok(of_direction(Direction::Receive)),
            _ => {}
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
    .map(|(name, sg, methods)| Variant {
        name: name.to_string(),
        sg,
        methods,
    })
    .collect();
    if variants.is_empty() {
        bail!("--methods none and --sg-off-methods none: nothing to run; name methods for at least one variant");
    }
    let payload_len = std::fs::metadata(&args.payload)
        .with_context(|| format!("cannot read the payload {}", args.payload.display()))?
        .len();
    let size = args.size.unwrap_or(payload_len);
    if size == 0 || size > payload_len {
        bail!(
            "--size {size}: the payload {} has {payload_len} bytes; give 1 to {payload_len}",
            args.payload.display(),
        );
    }
    // The spec is checked before the boot: a kernel that is not a kernel image
    // stops here, with one line and exit 2.
    let spec = suite_spec(&args, &variants, size)?;
    spec.validate()?;
    let (mode, why) = host::choose_here()?;
    if mode == HostMode::Emulated {
        if let Err(e) = zc_vmm::emulated::find_qemu() {
            println!(
                "KTAP version 1\n1..0 # SKIP no usable KVM ({why}) and no way to emulate one: {e}"
            );
            return Ok(EXIT_SKIP);
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output directory {}", args.out.display()))?;
    let mut spec = spec;
    spec.scratch_disk = new_scratch_disk(&args.out, &variants, size)?;

    let progress = Progress::new();
    let boot = boot_suite(&args.out, &variants, &spec, &progress)?;
    progress.finish();
    let source = read_prefix(&args.payload, size)?;
    let verdicts = judge(
        &boot,
        &source,
        &expectations,
        Context0 {
            date,
            kernel: &args.kernel,
            mode,
            size,
            chunk: args.chunk,
        },
    );
    let status = write_reports(&args.out, &verdicts)?;
    print_exits(&boot, &verdicts);
    eprintln!(
        "zc-vmm: {} method runs in {:.1} s; logs and reports in {} (verdicts.ktap, verdicts.json, report.html, junit.xml, kcidb.json)",
        verdicts.methods.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    say_verdict(&verdicts, &args.expected, status);
    if status != 0 {
        if let Some(why) = not_tested(&boot) {
            eprintln!(
                "zc-vmm: exit {EXIT_NOT_TESTED}: the kernel was not tested ({why}); `git bisect run` skips such a commit"
            );
            return Ok(EXIT_NOT_TESTED);
        }
    }
    Ok(status)
}

/// The first `size` bytes of the payload: what each method sent.
fn read_prefix(payload: &Path, size: u64) -> Result<Vec<u8>> {
    let mut source = std::fs::read(payload)
        .with_context(|| format!("cannot read the payload {}", payload.display()))?;
    source.truncate(usize::try_from(size).context("--size does not fit in memory")?);
    Ok(source)
}

/// What the whole run shares, for the verdicts' context.
struct Context0<'a> {
    date: String,
    kernel: &'a Path,
    mode: HostMode,
    size: u64,
    chunk: u64,
}

/// The boot as the audit needs it: its variants in card order.
struct Boot {
    variants: Vec<Variant>,
    dir: PathBuf,
    /// Why the `zc-vmm run` child failed when it left no run summary to say so.
    exit_failure: Option<String>,
}

impl Boot {
    /// One of the boot's own files (`suite.<suffix>`).
    fn file(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{BOOT_NAME}.{suffix}"))
    }
}

/// The DMA log a boot writes (`suite.dma-log.jsonl.zst`): compressed, since the
/// writer thread compresses off the guest's path and a run's plain log is about
/// 1 KB per 4 KiB sent (`docs/dma-log.md`, "Size").
const DMA_LOG: &str = "dma-log.jsonl.zst";
/// The plain log of directories written before the suite compressed it: still read.
const DMA_LOG_PLAIN: &str = "dma-log.jsonl";

/// The suffix of the DMA log in run directory `dir`: the compressed one, or the
/// plain one if only that exists.
fn dma_log_suffix(dir: &Path) -> &'static str {
    let has = |suffix: &str| dir.join(format!("{BOOT_NAME}.{suffix}")).is_file();
    if !has(DMA_LOG) && has(DMA_LOG_PLAIN) {
        DMA_LOG_PLAIN
    } else {
        DMA_LOG
    }
}

/// The DMA log of the `zc-vmm methods` run directory `dir` (`suite.dma-log.jsonl.zst`,
/// or `suite.dma-log.jsonl` in a directory of a run that wrote it plain).
pub fn dma_log_in(dir: &Path) -> PathBuf {
    dir.join(format!("{BOOT_NAME}.{}", dma_log_suffix(dir)))
}

/// Audits every variant of the boot and gathers the context: the verdict set every
/// report renders.
fn judge(boot: &Boot, source: &[u8], expectations: &Expectations, c: Context0<'_>) -> Verdicts {
    let image = KernelImage::beside(c.kernel);
    let mut context = RunContext {
        zc_version: env!("CARGO_PKG_VERSION").to_string(),
        date: c.date,
        kernel_release: image.as_ref().map(|i| i.release.clone()),
        kernel_source: Some(match &image {
            Some(KernelImage {
                package: Some(p),
                deb_version: Some(v),
                ..
            }) => format!("Debian {p} {v}"),
            _ => format!("image {}", c.kernel.display()),
        }),
        host_mode: Some(c.mode.to_string()),
        transport: None,
        cpu_model: zc_vmm::report::cpu_model(),
        size: c.size,
        chunk: c.chunk,
        variants: Vec::new(),
    };
    let mut methods = Vec::new();
    let run = audit_boot(boot, source, expectations);
    if let Some(summary) = &run.summary {
        if let Some(release) = &summary.run.kernel_release {
            context.kernel_release = Some(release.clone());
        }
        if summary.inside_emulated_host {
            context.host_mode = Some(HostMode::Emulated.to_string());
        }
        if let Some(transport) = summary.transport {
            context.transport = Some(transport.to_string());
        }
    }
    for (mut audits, variant) in run.variants {
        match (&variant.failure, run.log_incomplete) {
            (Some(why), true) => zc_audit::withhold_passes(&mut audits, why),
            (Some(why), false) => zc_audit::blame_run_failure(&mut audits, why),
            // An incomplete log is always a boot failure (see `audit_boot`).
            (None, _) => {}
        }
        if let Some(refusal) = variant.nic_features.as_ref().and_then(Negotiated::refusal) {
            for a in &mut audits {
                a.findings.push(format!(
                    "the NIC {refusal}: Linux ran it without scatter-gather, so this is not an {} row",
                    variant.name
                ));
            }
        }
        methods.append(&mut audits);
        context.variants.push(variant);
    }
    Verdicts { context, methods }
}

/// What auditing the boot found: each variant's audits and run, in card order.
struct BootRun {
    variants: Vec<(Vec<MethodAudit>, VariantRun)>,
    summary: Option<RunSummary>,
    /// The boot's DMA log is cut short: its failure says why.
    log_incomplete: bool,
}

/// Audits the boot: its DMA log and the guest's method reports, variant by variant
/// (card by card). Every method a variant was to run gets a row, also when the
/// kernel never booted.
fn audit_boot(boot: &Boot, source: &[u8], expectations: &Expectations) -> BootRun {
    let mut problems: Vec<String> = Vec::new();
    let summary = match RunSummary::load(&boot.file("run.json")) {
        Ok(s) => Some(s),
        Err(e) => {
            if boot.exit_failure.is_none() {
                problems.push(format!("{e}"));
            }
            None
        }
    };
    let reports = match &summary {
        Some(s) => s
            .reports_of(METHOD_TEST)
            .filter_map(|r| match r.decode::<MethodReport>() {
                Ok(r) => Some(r),
                Err(e) => {
                    problems.push(format!("a method report is not of the report's shape: {e}"));
                    None
                }
            })
            .collect(),
        None => Vec::new(),
    };
    let log_suffix = dma_log_suffix(&boot.dir);
    let log = boot.file(log_suffix);
    // No verdict may come from a log that was not written to the end (the run
    // says so, and its failure says why) or cannot be read to the end (a problem,
    // hence a boot failure too).
    let mut log_incomplete = summary
        .as_ref()
        .is_some_and(|s| s.run.dma_log_failure.is_some());
    let records = if log.exists() {
        zc_dma_log::read_log(&log).unwrap_or_else(|e| {
            problems.push(format!("cannot read the DMA log {}: {e}", log.display()));
            log_incomplete = true;
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let summary = summary.map(|s| excuse_skipped_transfers(s, &reports));
    let failure = boot_failure(boot, summary.as_ref(), &problems);
    let output = |kind: &str, name: String| {
        let hashed = zc_vmm::report::sha256_file(&boot.dir.join(&name)).ok();
        OutputFile {
            kind: kind.to_string(),
            path: name,
            bytes: hashed.as_ref().map(|(b, _)| *b),
            sha256: hashed.map(|(_, h)| h),
        }
    };
    // The boot's own files are every variant's; the pcap is the card's.
    let shared: Vec<OutputFile> = [
        ("dma-log", log_suffix),
        ("console", "console.txt"),
        ("run", "run.json"),
    ]
    .into_iter()
    .map(|(kind, suffix)| output(kind, format!("{BOOT_NAME}.{suffix}")))
    .collect();
    // One input, audited card by card: the records are read (and held) once.
    let mut input = AuditInput {
        records,
        source: source.to_vec(),
        reports,
        variant: String::new(),
        card: None,
        // The rows of expected.toml that name kernel versions are chosen by the
        // release the guest itself reported (`hello <release>`), not by the image's
        // file name: a user's bzImage says nothing about its version.
        kernel_release: summary.as_ref().and_then(|s| s.run.kernel_release.clone()),
    };
    let mut variants = Vec::new();
    // Once per boot, for every card's receive runs: e2fsck reads only the metadata.
    let scratch = boot.file(SCRATCH_IMAGE);
    let scratch_consistent = scratch
        .exists()
        .then(|| zc_images::scratch::check(&scratch));
    let read_back = ScratchReadBack {
        boot,
        consistent: scratch_consistent.as_ref(),
        source,
    };
    for (card, v) in (0u16..).zip(&boot.variants) {
        input.variant = v.name.clone();
        input.card = Some(card);
        let mut audits = zc_audit::audit_wanted(&input, expectations, &v.methods);
        read_back.judge(card, v, &mut audits);
        let nic_features = summary
            .as_ref()
            .and_then(|s| s.run.nics.get(usize::from(card)))
            .map(negotiated);
        let mut files = vec![
            shared[0].clone(),
            output("pcap", format!("{}.pcap", v.name)),
        ];
        files.extend(shared[1..].iter().cloned());
        variants.push((
            audits,
            VariantRun {
                name: v.name.clone(),
                methods: v.methods.clone(),
                nic_features,
                failure: failure.clone(),
                files,
            },
        ));
    }
    BootRun {
        variants,
        summary,
        log_incomplete,
    }
}

/// The boot's scratch disk, as the host reads it back after the run.
struct ScratchReadBack<'a> {
    boot: &'a Boot,
    /// `e2fsck -fn` of the image (`None`: the boot has none).
    consistent: Option<&'a Result<(), zc_images::scratch::ReadBackError>>,
    /// The payload each receive run was sent.
    source: &'a [u8],
}

impl ScratchReadBack<'_> {
    /// Checks what each receive method of `variant` (card `card`) left on the boot's
    /// scratch disk against the payload, byte for byte, where it landed: in the image,
    /// after the guest's FLUSH, read by the host. A run whose file is missing, short,
    /// long or different FAILs with the figure; one that matches says so among its
    /// findings. A SKIP (the guest ran nothing) stays.
    fn judge(&self, card: u16, variant: &Variant, audits: &mut [MethodAudit]) {
        let Some(card) = u8::try_from(card).ok().and_then(Card::new) else {
            return;
        };
        let image = self.boot.file(SCRATCH_IMAGE);
        for audit in audits.iter_mut().filter(|a| a.verdict != Verdict::Skip) {
            let Some(method) = Method::from_name(&audit.method) else {
                continue;
            };
            if method.direction() != Direction::Receive {
                continue;
            }
            let run = MethodRun {
                method,
                card,
                variant: Some(&variant.name),
            };
            let file = run.scratch_file();
            let outcome = match self.consistent {
                None => Err(format!(
                    "no scratch disk {} to read {file} back from",
                    image.display()
                )),
                Some(Err(e)) => Err(e.to_string()),
                Some(Ok(())) => {
                    zc_images::scratch::compare_bytes(&image, &file, self.source, &self.boot.dir)
                        .map_err(|e| e.to_string())
                        .and_then(|c| {
                            if c.identical() {
                                Ok(format!("{file} read back from the scratch disk: {c}"))
                            } else {
                                Err(format!(
                                    "{file} on the scratch disk: {c} (kept in {} for a look)",
                                    self.boot.dir.display()
                                ))
                            }
                        })
                }
            };
            match outcome {
                Ok(finding) => audit.findings.push(finding),
                Err(why) => {
                    audit.verdict = Verdict::Fail;
                    audit.reasons.insert(0, why);
                }
            }
        }
    }
}

/// What a card offered, what its driver acked, and which acked feature it never used.
fn negotiated(nic: &zc_vmm::report::NicSummary) -> Negotiated {
    let acked_csum = nic
        .features
        .acked
        .as_ref()
        .is_some_and(|a| a.iter().any(|f| f == zc_audit::NET_CSUM));
    Negotiated {
        offered: nic.features.offered.clone(),
        acked: nic.features.acked.clone(),
        // A driver that uses checksum offload asks for it on every TCP frame it
        // sends; none did: it kept the offload (and scatter-gather) off although it
        // acked the bit (Linux's `virtio_net.csum=0` does that).
        unused: if acked_csum && nic.stats.tx_frames > 0 && nic.stats.csum_completed == 0 {
            vec![zc_audit::NET_CSUM.to_string()]
        } else {
            Vec::new()
        },
    }
}

/// Why a boot failed, in one line, with the guest's own error when it sent one;
/// `None` when it ran to the end.
/// The run with the transfers of the methods the guest skipped no longer missing.
/// The peer expects one transfer per method a card was to run; a method the guest
/// skips (its kernel lacks a feature: a SKIP row with the reason) never connects.
/// As many missing transfers as skipped methods are theirs, so none of the methods
/// that ran lost its data; more missing than skipped is a lost transfer and stays
/// the boot's failure.
/// The same for the files the peer was to send to the receive methods.
fn excuse_skipped_transfers(mut summary: RunSummary, reports: &[MethodReport]) -> RunSummary {
    let skipped = |direction: Direction| {
        reports
            .iter()
            .filter(|r| r.skipped.is_some())
            .filter(|r| Method::from_name(&r.method).map(Method::direction) == Some(direction))
            .count()
    };
    let mut excused = false;
    for (missing, direction) in [
        (&mut summary.run.missing_transfers, Direction::Send),
        (&mut summary.run.missing_sends, Direction::Receive),
    ] {
        if !missing.is_empty() && missing.len() <= skipped(direction) {
            missing.clear();
            excused = true;
        }
    }
    if excused {
        summary.failure = summary.run.failure();
    }
    summary
}

fn boot_failure(boot: &Boot, summary: Option<&RunSummary>, problems: &[String]) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    match summary {
        Some(s) => {
            if let Some(why) = &s.failure {
                if s.run.kernel_release.is_none() {
                    parts.push(format!("the kernel did not reach /init: {why}"));
                } else {
                    parts.push(why.clone());
                }
            }
            // The guest's own error line ("error: loading module ...: Exec format error").
            let guest_error = s.run.messages.iter().rev().find_map(|m| match &m.message {
                ControlMessage::Log { text } => text.strip_prefix("error: ").map(String::from),
                _ => None,
            });
            if let (Some(e), false) = (guest_error, parts.is_empty()) {
                parts.push(e);
            }
        }
        None => parts.extend(boot.exit_failure.clone()),
    }
    parts.extend(problems.iter().cloned());
    (!parts.is_empty()).then(|| parts.join(": "))
}

/// Writes every report into `out`, prints the KTAP on stdout and the table on
/// stderr; returns the exit status (0 pass, 1 fail).
fn write_reports(out: &Path, v: &Verdicts) -> Result<i32> {
    let ktap = zc_audit::report::ktap(v);
    write(&out.join("verdicts.ktap"), &ktap)?;
    write(&out.join("verdicts.json"), &zc_audit::report::json(v))?;
    write(&out.join("report.html"), &zc_audit::report::html(v))?;
    write(&out.join("junit.xml"), &zc_audit::report::junit(v))?;
    write(
        &out.join("kcidb.json"),
        &zc_audit::report::kcidb(v, &KcidbIds::standalone(v)),
    )?;
    eprint!("{}", zc_audit::report::table(v));
    print!("{ktap}");
    Ok(if v.passed() { 0 } else { 1 })
}

fn say_verdict(v: &Verdicts, expected: &Path, status: i32) {
    let (_, fail, _) = v.totals();
    // One boot carries every variant: a failure of it is every variant's.
    let boot_failed = v.context.variants.iter().any(|r| r.failure.is_some());
    if status == 0 {
        eprintln!("zc-vmm: PASS: every verdict matches {}", expected.display());
    } else {
        eprintln!(
            "zc-vmm: FAIL: {fail} verdict(s) differ from {}{}",
            expected.display(),
            if boot_failed {
                ", the boot failed".to_string()
            } else {
                String::new()
            }
        );
    }
}

/// Prints [`exits_table`] on stderr, below the verdict table, when the boot's
/// `run.json` counted exits.
fn print_exits(boot: &Boot, verdicts: &Verdicts) {
    let Ok(summary) = RunSummary::load(&boot.file("run.json")) else {
        return;
    };
    if let Some(cost) = &summary.run.dirty_sample_cost {
        eprintln!("{}", sample_cost_line(cost, verdicts));
    }
    let Some(exits) = summary.run.vcpu_exits else {
        return;
    };
    let sent = verdicts
        .methods
        .iter()
        .map(|a| (a.method.as_str(), a.variant.as_str(), a.bytes));
    eprint!("{}", exits_table(sent, &boot.variants, &exits));
}

/// What the dirty-page samples cost beside the methods' own time (the guests'
/// `seconds`, which include the samples taken inside their loops).
fn sample_cost_line(cost: &zc_vmm::dirty::SampleCost, verdicts: &Verdicts) -> String {
    let methods: f64 = verdicts.methods.iter().filter_map(|a| a.seconds).sum();
    let share = if methods > 0.0 {
        format!(
            ", {:.0}% of the methods' {methods:.1} s",
            100.0 * cost.seconds / methods
        )
    } else {
        String::new()
    };
    format!(
        "zc-vmm: dirty-page samples: {} taken in {:.2} s ({:.2} ms each, longest {:.1} ms, {} dirty pages scanned){share}",
        cost.samples,
        cost.seconds,
        1e3 * cost.seconds / cost.samples.max(1) as f64,
        cost.max_ms,
        cost.pages_scanned
    )
}

/// The vCPUs' exits to the VMM per 4 KiB each method sent (the guest's byte
/// count, one `(method, variant, bytes)` each), from the spans of `run.json`'s `vcpu_exits`: all of them; those that
/// reached the disk, the method's own card, and the harness itself (its markers and
/// reports on the control port, dirty-page samples, console lines); and over every
/// device, the interrupt-status reads and acknowledges and the queue notifies.
fn exits_table<'a>(
    sent: impl IntoIterator<Item = (&'a str, &'a str, u64)>,
    variants: &[Variant],
    exits: &VcpuExits,
) -> String {
    const HEADER: [&str; 8] = [
        "method",
        "variant",
        "all",
        "blk",
        "card",
        "harness",
        "interrupt",
        "notify",
    ];
    let mut rows = Vec::new();
    for (method, variant, bytes) in sent {
        let card = variants.iter().position(|x| x.name == variant);
        let span = zc_protocol::marker::qualified_span(method, Some(variant));
        let (Some(card), Some(counts), true) = (card, exits.span(&span), bytes > 0) else {
            continue;
        };
        let per_4k = |n: u64| format!("{:.2}", n as f64 * 4096.0 / bytes as f64);
        let target = |name: &str| counts.targets.get(name).map_or(0, |t| t.all());
        rows.push([
            method.to_string(),
            variant.to_string(),
            per_4k(counts.all),
            per_4k(target("blk")),
            per_4k(target(&format!("net{card}"))),
            per_4k(target("control") + target("dirty_sample") + target("console")),
            per_4k(counts.sum(|t| t.interrupt)),
            per_4k(counts.sum(|t| t.notify)),
        ]);
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut width = HEADER.map(str::len);
    for row in &rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::from(
        "vCPU exits to the VMM per 4 KiB sent (run.json vcpu_exits; harness: marks, reports, dirty samples, console):\n",
    );
    for row in std::iter::once(HEADER.map(String::from)).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(width)
            .enumerate()
            .map(|(i, (cell, w))| match i {
                0 | 1 => format!("{cell:<w$}"),
                _ => format!("{cell:>w$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Progress of the boots: a spinner with the variant, its current method, the bytes
/// the peer has received for it and the elapsed time on a terminal; plain lines
/// otherwise (a CI log), the bytes at most every [`PLAIN_PROGRESS_EVERY`] and at
/// each method's end.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: std::cell::RefCell<PlainProgress>,
}

/// How often a CI log gets a method's byte count (besides its start and end).
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Which progress lines a CI log gets.
#[derive(Default)]
struct PlainProgress {
    last: Option<Instant>,
}

impl PlainProgress {
    /// The line to print for `p` at `now`, if any: a method's start and end always,
    /// counts in between when [`PLAIN_PROGRESS_EVERY`] has passed.
    fn take(&mut self, variant: &str, p: &MethodProgress, now: Instant) -> Option<String> {
        let due = self
            .last
            .is_none_or(|at| now.duration_since(at) >= PLAIN_PROGRESS_EVERY);
        if p.done || p.bytes == 0 || due {
            self.last = Some(now);
            Some(format!("zc-vmm: {}", sent(variant, p)))
        } else {
            None
        }
    }
}

/// `sg-on: sendfile: 8.0 of 16.0 MiB (50%) sent`, `..., done` at the method's end
/// (`received` for a receive method).
fn sent(variant: &str, p: &MethodProgress) -> String {
    format!(
        "{variant}: {}: {} {}{}",
        p.method,
        p.amount(),
        if zc_vmm::progress::receives(&p.method) {
            "received"
        } else {
            "sent"
        },
        if p.done { ", done" } else { "" }
    )
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            plain: std::cell::RefCell::new(PlainProgress::default()),
        }
    }

    /// A line of the child's output: above the spinner, or plain.
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// What is happening now.
    fn status(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.set_message(text),
            None => eprintln!("zc-vmm: {text}"),
        }
    }

    /// The peer's count for the variant's current method: in the spinner (and
    /// above it when the method ends), or as a plain line now and then.
    fn method(&self, variant: &str, p: &MethodProgress) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!("variant {}", sent(variant, p)));
                if p.done {
                    bar.println(format!("zc-vmm: {}", sent(variant, p)));
                }
            }
            None => {
                if let Some(line) = self.plain.borrow_mut().take(variant, p, Instant::now()) {
                    eprintln!("{line}");
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Boots the suite through a `zc-vmm run --spec` child, its stderr relayed line by
/// line (the run's own progress: mode, kernel, peer transfers, methods as the guest
/// logs them).
fn boot_suite(
    out: &Path,
    variants: &[Variant],
    spec: &RunSpec,
    progress: &Progress,
) -> Result<Boot> {
    let spec_file = out.join(format!("{BOOT_NAME}.spec.json"));
    // Beside the outputs: what was booted, and `zc-vmm run --spec` boots it again.
    spec.save(&spec_file)
        .with_context(|| format!("cannot write {}", spec_file.display()))?;
    let stale = [
        "run.json",
        DMA_LOG,
        DMA_LOG_PLAIN,
        "console.txt",
        "spec.json",
    ]
    .iter()
    .flat_map(|suffix| {
        // The files of the one-boot-per-variant layout, too: they would pass
        // for this run's.
        ["sg-on", "sg-off"]
            .iter()
            .map(move |old| format!("{old}.{suffix}"))
            .chain((*suffix != "spec.json").then(|| format!("{BOOT_NAME}.{suffix}")))
    })
    .chain(["sg-on.pcap".to_string(), "sg-off.pcap".to_string()]);
    for name in stale {
        let _ = std::fs::remove_file(out.join(name));
    }
    let exe = std::env::current_exe().context("cannot find the zc-vmm executable")?;
    let what = format!(
        "one boot, {}",
        variants
            .iter()
            .map(|v| format!(
                "card {} (scatter-gather {}): {}",
                v.name,
                if v.sg { "on" } else { "off" },
                v.methods.join(", ")
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    progress.status(format!("{what}: booting"));
    let started = Instant::now();
    let mut child = Command::new(exe)
        .arg("run")
        .arg("--spec")
        .arg(&spec_file)
        // The emulated host's console is not the verdicts: stdout stays KTAP only.
        .stdout(std::io::stderr())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start zc-vmm run for the suite")?;
    // The child's last error line, for a boot that leaves no run report to say why.
    let mut last_error: Option<String> = None;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            // The run's peer counts each method's bytes as they arrive (also from
            // inside the emulated host, whose stderr comes out as it is written).
            if let Some(p) = MethodProgress::parse(&line) {
                // The span names the card's variant: `sendfile@sg-off`.
                let span = p.method.clone();
                let (method, variant) = zc_protocol::SpanName::new(&span).split_variant();
                let p = MethodProgress {
                    method: method.to_string(),
                    ..p
                };
                progress.method(variant.unwrap_or(BOOT_NAME), &p);
                continue;
            }
            progress.line(&line);
            if let Some(e) = run_error(&line) {
                last_error = Some(e.to_string());
            }
        }
    }
    let status = child.wait().context("zc-vmm run for the suite")?;
    let exit_failure = match status.code() {
        Some(0) => None,
        Some(code) => Some(match &last_error {
            Some(e) => format!("zc-vmm run exited {code}: {e}"),
            None => format!("zc-vmm run exited {code} without a run report"),
        }),
        None => Some("zc-vmm run was killed".to_string()),
    };
    progress.status(format!(
        "{what}: ended after {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Boot {
        variants: variants.to_vec(),
        dir: out.to_path_buf(),
        exit_failure,
    })
}

/// The error a line of `zc-vmm run`'s stderr reports, if it is one. Found anywhere
/// in the line: a command inside the emulated host that stopped mid-line (its disk
/// full, say) leaves the outer run's error at the end of that line.
fn run_error(line: &str) -> Option<&str> {
    ["zc-vmm: error: ", "zc-vmm: FAILED "]
        .iter()
        .filter_map(|prefix| line.rfind(prefix).map(|at| &line[at + prefix.len()..]))
        .next()
}

/// The guest's options for the boot: the method suite from the read-only test
/// disk, each variant's methods through its own card (`zc.cards`).
fn guest_options(variants: &[Variant], size: u64, chunk: u64) -> Result<Options> {
    let cards = variants
        .iter()
        .map(|v| {
            Ok(SuiteCard {
                variant: v.name.clone(),
                methods: v
                    .methods
                    .iter()
                    .map(|name| name.parse::<Method>())
                    .collect::<Result<Vec<_>, _>>()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Options {
        tests: vec![TestHook::Methods],
        disk_read_only: true,
        suite: Suite {
            cards,
            size: Some(size),
            chunk: usize::try_from(chunk).context("--chunk does not fit in memory")?,
            ..Suite::default()
        },
        ..Options::default()
    })
}

/// The boot: the read-only test disk; per variant, in order, one card in front of
/// a peer of its own with the variant's scatter-gather, expecting `size` bytes of
/// the payload once per method the card carries; and the DMA log with dirty-page
/// samples.
fn suite_spec(args: &MethodsArgs, variants: &[Variant], size: u64) -> Result<RunSpec> {
    let out = |suffix: &str| args.out.join(format!("{BOOT_NAME}.{suffix}"));
    Ok(RunSpec {
        initrd: Some(args.initrd.clone()),
        append: Some(
            [
                Some(guest_options(variants, size, args.chunk)?.to_cmdline()),
                args.append.clone(),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" "),
        ),
        mem_bytes: args.mem,
        timeout_s: args.timeout,
        disk: Some(DiskSpec {
            path: args.disk.clone(),
            read_only: true,
        }),
        nics: variants
            .iter()
            .map(|v| {
                let (sends, receives) = (v.count(Direction::Send), v.count(Direction::Receive));
                NicSpec {
                    sg: v.sg,
                    pcap: Some(args.out.join(format!("{}.pcap", v.name))),
                    peer_expect: vec![args.payload.clone(); sends],
                    peer_expect_bytes: (sends > 0).then_some(size),
                    peer_send: vec![args.payload.clone(); receives],
                    peer_send_bytes: (receives > 0).then_some(size),
                    ..NicSpec::peer()
                }
            })
            .collect(),
        dirty_samples: true,
        transport: args.transport,
        outputs: RunOutputs {
            console: Some(out("console.txt")),
            summary: Some(out("run.json")),
            dma_log: Some(out(DMA_LOG)),
        },
        ..RunSpec::new(&args.kernel)
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Options of `zc-vmm audit`.
#[derive(Args, Clone)]
pub struct AuditArgs {
    /// A directory `zc-vmm methods --out` wrote (its `*.spec.json`, DMA logs and run
    /// reports).
    dir: PathBuf,
    /// The expected table to judge against.
    #[arg(long, default_value = DEFAULT_EXPECTED)]
    expected: PathBuf,
}

/// Judges a saved `methods` run again, without booting: the boots' specs say which
/// methods ran, on which payload prefix; their DMA logs and run reports are audited
/// against `--expected` and every report in the directory is written anew. Returns
/// the exit status as `methods` does.
pub fn audit(args: AuditArgs) -> Result<i32> {
    let started = Instant::now();
    if !args.dir.is_dir() {
        bail!(
            "{} is not a directory: pass the --out directory of a `zc-vmm methods` run",
            args.dir.display()
        );
    }
    require_file(
        "expected table",
        &args.expected,
        "pass --expected PATH (audit/expected.toml in the source tree)",
    )?;
    let expectations = Expectations::load(&args.expected)
        .with_context(|| format!("cannot load the expected table {}", args.expected.display()))?;
    let spec_file = args.dir.join(format!("{BOOT_NAME}.spec.json"));
    if !spec_file.exists() {
        bail!(
            "{} has no {BOOT_NAME}.spec.json: pass the --out directory of a `zc-vmm methods` run (one made before the suite booted once for both variants must be made again)",
            args.dir.display()
        );
    }
    let spec = RunSpec::load(&spec_file)?;
    let options = Options::parse(spec.append.as_deref().unwrap_or_default())
        .with_context(|| format!("{}: the guest options", spec_file.display()))?;
    let suite = options.suite;
    if suite.cards.len() != spec.nics.len() {
        bail!(
            "{}: zc.cards names {} cards but the spec has {}: not a `zc-vmm methods` run",
            spec_file.display(),
            suite.cards.len(),
            spec.nics.len()
        );
    }
    let boot = Boot {
        variants: suite
            .cards
            .iter()
            .zip(&spec.nics)
            .map(|(card, nic)| Variant {
                name: card.variant.clone(),
                sg: nic.sg,
                methods: card.methods.iter().map(|m| m.name().to_string()).collect(),
            })
            .collect(),
        dir: args.dir.clone(),
        exit_failure: None,
    };
    let boot = Boot {
        exit_failure: (!boot.file("run.json").exists())
            .then(|| "the boot left no run report (it did not finish)".to_string()),
        ..boot
    };
    let nic = spec
        .nics
        .first()
        .context("the saved spec has no network card: not a `zc-vmm methods` run")?;
    let payload = nic
        .peer_expect
        .first()
        .context("the saved spec names no payload: not a `zc-vmm methods` run")?;
    require_file(
        "payload file",
        payload,
        "the saved run's payload must still be there (run from the directory `zc-vmm methods` ran in)",
    )?;
    let size = match nic.peer_expect_bytes {
        Some(size) => size,
        None => std::fs::metadata(payload)?.len(),
    };
    let source = read_prefix(payload, size)?;
    let summary = RunSummary::load(&boot.file("run.json")).ok();
    let mode = match &summary {
        Some(s) if s.inside_emulated_host => HostMode::Emulated,
        Some(s) => s.mode,
        None => HostMode::Direct,
    };
    let date = summary.as_ref().map_or_else(
        || zc_vmm::report::rfc3339_utc(std::time::SystemTime::now()),
        |s| s.date.clone(),
    );
    let verdicts = judge(
        &boot,
        &source,
        &expectations,
        Context0 {
            date,
            kernel: &spec.kernel,
            mode,
            size,
            chunk: suite.chunk as u64,
        },
    );
    let status = write_reports(&args.dir, &verdicts)?;
    print_exits(&boot, &verdicts);
    eprintln!(
        "zc-vmm: re-audited {} method runs in {:.1} s; reports in {}",
        verdicts.methods.len(),
        started.elapsed().as_secs_f64(),
        args.dir.display()
    );
    say_verdict(&verdicts, &args.expected, status);
    Ok(status)
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

    #[test]
    fn the_runs_error_is_found_at_the_start_or_the_end_of_a_line() {
        assert_eq!(run_error("zc-vmm: error: no KVM"), Some("no KVM"));
        assert_eq!(
            run_error("zc-vmm: FAILED after 3.00 s: triple fault"),
            Some("after 3.00 s: triple fault")
        );
        // Seen with a full disk inside the emulated host: its stderr stopped mid-line.
        assert_eq!(
            run_error(
                "zc-vmm: peer received 16777216 bytes of zc-vmm: error: seccomp: \
                 zc-vmm: error: the emulated host stopped (exit status: 0)"
            ),
            Some("the emulated host stopped (exit status: 0)")
        );
        assert_eq!(run_error("zc-vmm: peer received 16777216 bytes"), None);
    }

    fn variant(name: &str, sg: bool, methods: &[&str]) -> Variant {
        Variant {
            name: name.into(),
            sg,
            methods: methods.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn exits_are_shown_per_4_kib_of_each_method_on_its_own_card() {
        use zc_vmm::exits::{AccessCounts, ExitCounts, SpanExits};
        let counts = |targets: &[(&str, AccessCounts)]| ExitCounts {
            all: targets.iter().map(|(_, c)| c.all()).sum(),
            targets: targets.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
        };
        let interrupts = |n| AccessCounts {
            interrupt: n,
            ..AccessCounts::default()
        };
        let writes = |n| AccessCounts {
            write: n,
            ..AccessCounts::default()
        };
        let exits = VcpuExits {
            total: ExitCounts::default(),
            spans: vec![
                SpanExits {
                    span: "sendfile@sg-on".into(),
                    exits: counts(&[
                        ("blk", interrupts(256)),
                        ("net0", interrupts(512)),
                        ("control", writes(64)),
                        ("dirty_sample", writes(64)),
                    ]),
                },
                SpanExits {
                    span: "sendfile@sg-off".into(),
                    exits: counts(&[
                        ("net0", writes(1000)),
                        (
                            "net1",
                            AccessCounts {
                                notify: 2048,
                                interrupt: 1024,
                                ..AccessCounts::default()
                            },
                        ),
                    ]),
                },
            ],
        };
        let variants = [
            variant("sg-on", true, &["sendfile"]),
            variant("sg-off", false, &["sendfile"]),
        ];
        let mib4 = 4 << 20; // 1024 pages
        let table = exits_table(
            [
                ("sendfile", "sg-on", mib4),
                ("sendfile", "sg-off", mib4),
                // No span of its own, or nothing sent: no row.
                ("splice", "sg-on", mib4),
                ("sendfile", "sg-on", 0),
            ],
            &variants,
            &exits,
        );
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("vCPU exits to the VMM per 4 KiB sent"));
        let cells = |line: &str| {
            line.split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[1]),
            [
                "method",
                "variant",
                "all",
                "blk",
                "card",
                "harness",
                "interrupt",
                "notify"
            ]
        );
        // 896 exits over 1024 pages; card 0 is sg-on's.
        assert_eq!(
            cells(lines[2]),
            ["sendfile", "sg-on", "0.88", "0.25", "0.50", "0.12", "0.75", "0.00"]
        );
        // sg-off's card is card 1: card 0's exits are in "all" only.
        assert_eq!(
            cells(lines[3]),
            ["sendfile", "sg-off", "3.98", "0.00", "3.00", "0.00", "1.00", "2.00"]
        );
        assert_eq!(exits_table([], &variants, &exits), "");
    }

    fn methods_args(extra: &[&str]) -> MethodsArgs {
        let argv = ["zc-vmm-methods", "--out", "/o", "--mem", "1G"];
        Wrapper::parse_from(argv.iter().chain(extra)).args
    }

    /// Seen on the source-built kernel (no tmpfs): sendfile_tmpfs SKIPped on both
    /// cards, the peer missed its two transfers, and the boot failed for it.
    #[test]
    fn transfers_of_skipped_methods_are_not_missing_but_a_lost_one_is() {
        use zc_vmm::boot::KernelFormat;
        use zc_vmm::report::{RunReport, StopReason};
        let summary = |missing: usize| {
            let mut run = RunReport::new(KernelFormat::BzImage);
            run.stop = StopReason::PowerOff;
            run.guest_exit = Some(0);
            run.missing_transfers = vec!["payload.bin".into(); missing];
            let mut s = RunSummary::new(run, Path::new("/k"), HostMode::Direct, false);
            s.failure = s.run.failure();
            s
        };
        let report = |method: &str, skipped: Option<&str>| MethodReport {
            method: method.into(),
            ok: true,
            skipped: skipped.map(String::from),
            ..MethodReport::default()
        };
        let reports = [
            report("sendfile", None),
            report("sendfile_tmpfs", Some("no tmpfs mounted")),
            report("sendfile_tmpfs", Some("no tmpfs mounted")),
        ];
        for missing in [1, 2] {
            let s = excuse_skipped_transfers(summary(missing), &reports);
            assert_eq!(s.failure, None, "{missing} missing, 2 skipped");
            assert!(s.run.missing_transfers.is_empty());
        }
        let s = excuse_skipped_transfers(summary(3), &reports);
        assert_eq!(
            s.failure.as_deref(),
            Some("the peer never received payload.bin"),
            "one more missing than skipped: a method that ran lost its data"
        );
        let s = excuse_skipped_transfers(summary(1), &reports[..1]);
        assert!(s.failure.is_some(), "nothing skipped, nothing excused");

        // The files the peer was to send: excused only by skipped receive methods.
        let mut unsent = summary(0);
        unsent.run.missing_sends = vec!["payload.bin".into()];
        unsent.failure = unsent.run.failure();
        assert!(unsent.failure.is_some());
        let s = excuse_skipped_transfers(unsent.clone(), &reports);
        assert!(
            s.failure.is_some(),
            "a skipped send method excuses no unsent file"
        );
        let skipped_receive = [report(
            "tcp_zerocopy_receive",
            Some("no TCP_ZEROCOPY_RECEIVE"),
        )];
        let s = excuse_skipped_transfers(unsent, &skipped_receive);
        assert_eq!(s.failure, None);
        assert!(s.run.missing_sends.is_empty());
    }

    #[test]
    fn receive_methods_get_files_from_the_peer_and_a_scratch_disk() {
        let variants = [
            variant("sg-on", true, &["sendfile", "recv_write", "recv_mmap"]),
            variant("sg-off", false, &["sendfile"]),
        ];
        let spec = suite_spec(&methods_args(&[]), &variants, 8192).unwrap();
        let on = &spec.nics[0];
        assert_eq!(on.peer_expect.len(), 1);
        assert_eq!(on.peer_send, vec![PathBuf::from(DEFAULT_PAYLOAD); 2]);
        assert_eq!(
            (on.peer_expect_bytes, on.peer_send_bytes),
            (Some(8192), Some(8192))
        );
        let off = &spec.nics[1];
        assert!(off.peer_send.is_empty() && off.peer_send_bytes.is_none());
        // The scratch disk is made fresh per boot, only when a card receives.
        let out = tempfile::tempdir().unwrap();
        let image = out.path().join("suite.scratch.img");
        match new_scratch_disk(out.path(), &variants, 8192) {
            Ok(made) => assert_eq!(made, Some(image.clone())),
            // Without e2fsprogs there is nothing to make it with.
            Err(e) if format!("{e:#}").contains("mkfs.ext4 not found") => return,
            Err(e) => panic!("{e:#}"),
        }
        assert!(image.exists());
        let sends_only = [variant("sg-on", true, &["sendfile"])];
        assert_eq!(
            new_scratch_disk(out.path(), &sends_only, 8192).unwrap(),
            None
        );
        assert!(
            !image.exists(),
            "an older boot's scratch disk is not this one's"
        );
    }

    /// The host's read-back: a receive run whose file is the payload keeps its
    /// verdict and says so; one whose file differs, or is missing, FAILs with why.
    #[test]
    fn receive_runs_fail_unless_their_file_is_on_the_scratch_disk_intact() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("suite.scratch.img");
        if zc_images::scratch::create(&image, 40 << 20).is_err() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let mut altered = payload.clone();
        altered[12_345] ^= 1;
        for (name, bytes) in [
            ("recv_write.sg-on.bin", &payload),
            ("recv_mmap.sg-on.bin", &altered),
        ] {
            let source = dir.path().join(name);
            std::fs::write(&source, bytes).unwrap();
            let wrote = Command::new("debugfs")
                .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
                .args(["-w", "-R"])
                .arg(format!("write {} {name}", source.display()))
                .arg(&image)
                .output()
                .unwrap();
            assert!(wrote.status.success(), "{wrote:?}");
            std::fs::remove_file(&source).unwrap();
        }
        let boot = Boot {
            variants: Vec::new(),
            dir: dir.path().to_path_buf(),
            exit_failure: None,
        };
        let v = variant(
            "sg-on",
            true,
            &["recv_write", "recv_mmap", "recv_direct", "sendfile"],
        );
        // Rows as the audit makes them (of an empty log), then taken as passing, so
        // that only the read-back can change them.
        let input = AuditInput {
            records: Vec::new(),
            source: payload.clone(),
            reports: Vec::new(),
            variant: "sg-on".into(),
            card: Some(0),
            kernel_release: None,
        };
        let expected = Expectations::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../audit/expected.toml"),
        )
        .unwrap();
        let mut audits = zc_audit::audit_wanted(&input, &expected, &v.methods);
        for a in &mut audits {
            a.verdict = Verdict::Pass;
            a.reasons.clear();
            a.findings.clear();
        }
        let consistent = zc_images::scratch::check(&image);
        let read_back = ScratchReadBack {
            boot: &boot,
            consistent: Some(&consistent),
            source: &payload,
        };
        read_back.judge(0, &v, &mut audits);
        let [intact, altered_run, missing, send] = &audits[..] else {
            unreachable!()
        };
        assert_eq!(intact.verdict, Verdict::Pass, "{intact:?}");
        assert!(
            intact.findings[0].contains("20000 bytes, identical"),
            "{intact:?}"
        );
        assert_eq!(altered_run.verdict, Verdict::Fail);
        assert!(
            altered_run.reasons[0].contains("differs from byte 12345"),
            "{altered_run:?}"
        );
        assert_eq!(missing.verdict, Verdict::Fail);
        assert!(
            missing.reasons[0].contains("not on the scratch disk"),
            "{missing:?}"
        );
        assert_eq!(send.verdict, Verdict::Pass);
        assert!(send.findings.is_empty() && send.reasons.is_empty());
    }

    #[test]
    fn a_kernel_that_never_reached_init_was_not_tested() {
        use zc_vmm::boot::KernelFormat;
        use zc_vmm::report::{RunReport, StopReason};
        let dir = tempfile::tempdir().unwrap();
        let boot = Boot {
            variants: vec![variant("sg-on", true, &["sendfile"])],
            dir: dir.path().to_path_buf(),
            exit_failure: Some("exit status 1".into()),
        };
        let save = |release: Option<&str>| {
            let mut run = RunReport::new(KernelFormat::BzImage);
            run.stop = StopReason::Reset;
            run.kernel_release = release.map(String::from);
            RunSummary::new(run, Path::new("/k"), HostMode::Direct, false)
                .save(&boot.file("run.json"))
                .unwrap();
        };
        // A run that died without its summary: the harness, not the kernel.
        assert_eq!(not_tested(&boot), None);
        // The boot panicked before /init: nothing about the kernel's paths.
        save(None);
        let why = not_tested(&boot).expect("not tested");
        assert!(why.contains("the kernel did not reach /init"), "{why}");
        // It reached /init and ran: its FAILs are verdicts.
        save(Some("6.1.192-zc"));
        assert_eq!(not_tested(&boot), None);
    }

    #[test]
    fn a_card_whose_driver_acked_csum_but_never_used_it_is_flagged() {
        use zc_vmm::report::{DeviceFeatures, NetBackendKind, NicSummary};
        let nic = |csum_completed| NicSummary {
            backend: NetBackendKind::Peer,
            sg: true,
            features: DeviceFeatures::new(1, 0x1_0000_0021, Some(0x1_0000_0021)),
            stats: zc_devices::virtio::net::NetStats {
                tx_frames: 100,
                csum_completed,
                ..Default::default()
            },
        };
        let used = negotiated(&nic(98));
        assert!(used.unused.is_empty());
        assert_eq!(used.refusal(), None);
        let unused = negotiated(&nic(0));
        assert_eq!(unused.unused, ["CSUM"]);
        assert_eq!(
            unused.refusal().as_deref(),
            Some("offered; driver acked CSUM but never used it")
        );
    }

    #[test]
    fn a_ci_log_gets_each_methods_start_and_end_and_counts_every_ten_seconds() {
        let p = |bytes: u64, done: bool| MethodProgress {
            method: "sendfile".into(),
            bytes,
            expected: Some(16 << 20),
            done,
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut plain = PlainProgress::default();
        assert_eq!(
            plain.take("sg-on", &p(0, false), at(0)).as_deref(),
            Some("zc-vmm: sg-on: sendfile: 0.0 of 16.0 MiB (0%) sent")
        );
        assert_eq!(plain.take("sg-on", &p(4 << 20, false), at(2)), None);
        assert_eq!(plain.take("sg-on", &p(6 << 20, false), at(9)), None);
        assert_eq!(
            plain.take("sg-on", &p(8 << 20, false), at(10)).as_deref(),
            Some("zc-vmm: sg-on: sendfile: 8.0 of 16.0 MiB (50%) sent")
        );
        assert_eq!(
            plain.take("sg-on", &p(16 << 20, true), at(11)).as_deref(),
            Some("zc-vmm: sg-on: sendfile: 16.0 of 16.0 MiB (100%) sent, done")
        );
    }

    #[test]
    fn append_adds_kernel_options_to_the_boot_and_keeps_the_suites_own() {
        let args = methods_args(&["--append", "  virtio_net.csum=0   quiet "]);
        let variants = [
            variant("sg-on", true, &["sendfile"]),
            variant("sg-off", false, &["sendfile"]),
        ];
        let plain = suite_spec(&methods_args(&[]), &variants, 4096).unwrap();
        let spec = suite_spec(&args, &variants, 4096).unwrap();
        let append = spec.append.as_deref().unwrap();
        assert_eq!(
            append,
            format!(
                "{} virtio_net.csum=0 quiet",
                plain.append.as_deref().unwrap()
            )
        );
        // The guest (and `zc-vmm audit`) read the same suite from it.
        assert_eq!(
            Options::parse(append).unwrap(),
            Options::parse(plain.append.as_deref().unwrap()).unwrap()
        );
    }

    #[rstest::rstest]
    #[case::own_option("zc.methods=sendfile", "sets the guest program's zc.* options")]
    #[case::newline("virtio_net.csum=0\nzc.exit=1", "on one line")]
    #[case::empty("   ", "--append is empty")]
    fn append_refuses_what_is_not_kernel_options(#[case] text: &str, #[case] needle: &str) {
        let message = parse_append(text).unwrap_err();
        assert!(message.contains(needle), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn one_boot_gives_each_variant_a_card_and_peer_of_its_own() {
        let args = methods_args(&["--chunk", "8192", "--timeout", "300", "--transport", "pci"]);
        let variants = [
            variant("sg-on", true, &["sendfile", "splice"]),
            variant("sg-off", false, &["mmap_zerocopy"]),
        ];
        let mut spec = suite_spec(&args, &variants, 4096).unwrap();
        // The guest's options, as the guest will parse them.
        let append = spec.append.take().expect("the guest's options");
        let options = Options::parse(&append).unwrap();
        assert_eq!(options.tests, vec![TestHook::Methods]);
        assert!(options.disk_read_only);
        assert_eq!(
            options.suite,
            Suite {
                cards: vec![
                    SuiteCard {
                        variant: "sg-on".into(),
                        methods: vec![Method::Sendfile, Method::Splice],
                    },
                    SuiteCard {
                        variant: "sg-off".into(),
                        methods: vec![Method::MmapZerocopy],
                    },
                ],
                size: Some(4096),
                chunk: 8192,
                ..Suite::default()
            }
        );
        // Card n is the n-th variant: its methods go to its own peer.
        let runs = options.suite.runs();
        assert_eq!(
            runs.iter()
                .map(|r| (r.span(), r.card.index()))
                .collect::<Vec<_>>(),
            [
                ("sendfile@sg-on".to_string(), 0),
                ("splice@sg-on".to_string(), 0),
                ("mmap_zerocopy@sg-off".to_string(), 1)
            ]
        );
        let out = |suffix: &str| PathBuf::from(format!("/o/suite.{suffix}"));
        let expected = RunSpec {
            initrd: Some(DEFAULT_INITRD.into()),
            mem_bytes: 1 << 30,
            timeout_s: 300,
            disk: Some(DiskSpec {
                path: DEFAULT_DISK.into(),
                read_only: true,
            }),
            nics: vec![
                NicSpec {
                    sg: true,
                    pcap: Some("/o/sg-on.pcap".into()),
                    // One connection per method, each the payload's first `size` bytes.
                    peer_expect: vec![PathBuf::from(DEFAULT_PAYLOAD); 2],
                    peer_expect_bytes: Some(4096),
                    ..NicSpec::peer()
                },
                NicSpec {
                    sg: false,
                    pcap: Some("/o/sg-off.pcap".into()),
                    peer_expect: vec![PathBuf::from(DEFAULT_PAYLOAD)],
                    peer_expect_bytes: Some(4096),
                    ..NicSpec::peer()
                },
            ],
            dirty_samples: true,
            transport: TransportChoice::Pci,
            outputs: RunOutputs {
                console: Some(out("console.txt")),
                summary: Some(out("run.json")),
                dma_log: Some(out(DMA_LOG)),
            },
            ..RunSpec::new(DEFAULT_KERNEL)
        };
        assert_eq!(spec, expected);
    }
}
