//! `zc-image build-kernel`: a kernel from source (cached) or from the user's tree.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::input::{self, BadInput};
use zc_images::kbuild::{
    self, kbuild_step, BuildProgress, BuildSource, KbuildError, Outcome, SourceBuildRequest,
    SourceSpec, TreeRequest,
};

/// Arguments of `zc-image build-kernel`.
#[derive(Args)]
pub struct BuildKernelArgs {
    /// A kernel source tarball (linux-*.tar.xz) instead of the Debian package.
    #[arg(long, value_name = "TARBALL", conflicts_with_all = ["source_package", "tree"])]
    source: Option<PathBuf>,
    /// The Debian source package (its tarball is /usr/src/<package>.tar.xz; installed
    /// with apt-get when missing, as root).
    #[arg(long, value_name = "PACKAGE", default_value = kbuild::DEFAULT_SOURCE_PACKAGE)]
    source_package: String,
    /// A patch applied with `patch -p1` before configuring, or a directory whose
    /// *.patch files are applied in name order; repeatable, applied in the order given.
    #[arg(long = "patch", value_name = "FILE|DIR", conflicts_with = "tree")]
    patches: Vec<PathBuf>,
    /// Another Kconfig fragment merged after zc's (a later value wins); repeatable.
    #[arg(long = "fragment", value_name = "FILE")]
    fragments: Vec<PathBuf>,
    /// LOCALVERSION (release suffix); default `-zc`, or `-zc-<first patch name>`.
    #[arg(long, value_name = "SUFFIX", conflicts_with = "tree")]
    localversion: Option<String>,
    /// Your kernel tree: build it with its own .config (`make olddefconfig bzImage
    /// [modules]`) and stage its image, config and modules into --out.
    #[arg(long, value_name = "PATH")]
    tree: Option<PathBuf>,
    /// With --tree: use what the tree has built, build nothing.
    #[arg(long, requires = "tree")]
    no_build: bool,
    /// With --tree: replace its .config with tinyconfig + zc's fragment first.
    #[arg(long, requires = "tree", conflicts_with = "no_build")]
    configure: bool,
    /// Where source builds are cached.
    #[arg(long, value_name = "DIR", env = "ZC_KERNEL_CACHE")]
    cache: Option<PathBuf>,
    /// Copy vmlinuz, config, modules/ and kernel.json here (required with --tree).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// make -j (default: the number of CPUs).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Print what was built as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Shows phases as lines and, during a command, a spinner with kbuild's step count
/// (or, when stderr is not a terminal, a line every 30 s).
struct Progress {
    started: Instant,
    phase_started: Instant,
    phase: String,
    steps: u64,
    last_step: String,
    last_line_at: Instant,
    spinner: Option<ProgressBar>,
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            phase_started: now,
            phase: String::new(),
            steps: 0,
            last_step: String::new(),
            last_line_at: now,
            spinner: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn finish_spinner(&mut self) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
    }
}

fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

impl BuildProgress for Progress {
    fn phase(&mut self, line: &str) {
        self.finish_spinner();
        let at = minutes(self.started.elapsed());
        eprintln!("zc-image: [{at}] {line}");
        self.phase = line.to_string();
        self.phase_started = Instant::now();
        self.last_line_at = Instant::now();
        self.steps = 0;
        if self.terminal {
            let s = ProgressBar::new_spinner();
            s.set_style(
                ProgressStyle::with_template("  {spinner} {elapsed_precise} {msg}")
                    .expect("a valid template"),
            );
            s.enable_steady_tick(Duration::from_millis(200));
            self.spinner = Some(s);
        }
    }

    fn output(&mut self, line: &str) {
        let Some((verb, target)) = kbuild_step(line) else {
            return;
        };
        self.steps += 1;
        self.last_step = format!("{verb} {target}");
        if let Some(s) = &self.spinner {
            s.set_message(format!("{} steps, {}", self.steps, self.last_step));
        } else if self.last_line_at.elapsed() >= Duration::from_secs(30) {
            self.last_line_at = Instant::now();
            eprintln!(
                "zc-image:   {} into {}: {} steps, now {}",
                self.phase,
                minutes(self.phase_started.elapsed()),
                self.steps,
                self.last_step
            );
        }
    }

    fn phase_done(&mut self) {
        self.finish_spinner();
    }
}

fn describe(o: &Outcome) -> Vec<String> {
    let b = &o.build;
    let size = std::fs::metadata(&b.kernel.vmlinuz).map_or(0, |m| m.len());
    let mut lines = vec![
        format!(
            "kernel {} {}",
            b.kernel.release,
            if o.cached {
                format!("is cached (built in {:.0} s)", b.build_seconds)
            } else {
                format!("built in {:.0} s", b.build_seconds)
            }
        ),
        format!(
            "  image:   {} ({:.1} MiB)",
            b.kernel.vmlinuz.display(),
            size as f64 / (1024.0 * 1024.0)
        ),
    ];
    if let Some(c) = &b.config {
        lines.push(format!("  config:  {}", c.display()));
    }
    match &b.kernel.modules_dir {
        Some(m) => lines.push(format!("  modules: {}", m.display())),
        None => lines.push("  modules: none (everything built in)".into()),
    }
    match &b.source {
        BuildSource::Tarball(s) => lines.push(format!(
            "  source:  {}{} (sha256 {:.16})",
            s.tarball.display(),
            match (&s.package, &s.package_version) {
                (Some(p), Some(v)) => format!(" from {p} {v}"),
                _ => String::new(),
            },
            s.sha256
        )),
        BuildSource::Tree { path, git } => lines.push(format!(
            "  source:  tree {}{}",
            path.display(),
            git.as_deref()
                .map(|g| format!(" ({g})"))
                .unwrap_or_default()
        )),
    }
    if !b.fragments.is_empty() {
        let names: Vec<&str> = b.fragments.iter().map(|f| f.name.as_str()).collect();
        lines.push(format!(
            "  made of: {} + {}",
            b.base_config.as_deref().unwrap_or("its own"),
            names.join(" + ")
        ));
    }
    for (i, p) in b.patches.iter().enumerate() {
        lines.push(format!(
            "  patch {}: {} (sha256 {:.16})",
            i + 1,
            p.path.display(),
            p.sha256
        ));
    }
    lines.push(format!("  compiler: {}", b.toolchain.compiler));
    lines.push(format!("  log:     {}", b.log.display()));
    lines.push(format!(
        "  kernel.json: {}",
        o.dir.join(zc_images::kernel::KERNEL_JSON).display()
    ));
    lines
}

fn default_cache() -> Result<PathBuf, KbuildError> {
    kbuild::default_cache_dir(
        std::env::var_os("XDG_CACHE_HOME").as_deref(),
        std::env::var_os("HOME").as_deref(),
    )
    .ok_or_else(|| KbuildError::BadInput {
        what: "--cache",
        path: PathBuf::new(),
        why: "no HOME or XDG_CACHE_HOME to put the kernel cache in; pass --cache DIR".into(),
    })
}

fn build(args: BuildKernelArgs) -> Result<Outcome, KbuildError> {
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let mut progress = Progress::new();
    let outcome = match args.tree {
        Some(tree) => {
            let out = args.out.ok_or_else(|| KbuildError::BadInput {
                what: "--out",
                path: PathBuf::new(),
                why: "is required with --tree: where to stage the tree's image, config and modules"
                    .into(),
            })?;
            kbuild::use_tree(
                &TreeRequest {
                    tree,
                    build: !args.no_build,
                    configure: args.configure,
                    extra_fragments: args.fragments,
                    jobs,
                    out,
                },
                &mut progress,
            )
        }
        None => {
            let cache = match args.cache {
                Some(c) => c,
                None => default_cache()?,
            };
            kbuild::build_source(
                &SourceBuildRequest {
                    source: match args.source {
                        Some(t) => SourceSpec::Tarball(t),
                        None => SourceSpec::Package(args.source_package),
                    },
                    patches: args.patches,
                    extra_fragments: args.fragments,
                    localversion: args.localversion,
                    cache,
                    jobs,
                    out: args.out,
                },
                &mut progress,
            )
        }
    };
    progress.finish_spinner();
    outcome
}

/// Checks the arguments before anything is unpacked or built: a mistake is one line
/// and exit status 2.
pub fn check(args: &BuildKernelArgs) -> Result<(), BadInput> {
    if args.jobs == Some(0) {
        return input::bad("-j 0: give the number of parallel make jobs, e.g. -j 2".into());
    }
    if let Some(tarball) = &args.source {
        input::file(
            "--source",
            tarball,
            "pass a kernel source tarball (linux-*.tar.xz)",
        )?;
    }
    for patch in &args.patches {
        input::exists(
            "--patch",
            patch,
            "pass a patch file (applied with patch -p1) or a directory of *.patch",
        )?;
    }
    for fragment in &args.fragments {
        input::file(
            "--fragment",
            fragment,
            "pass a Kconfig fragment (CONFIG_X=y lines)",
        )?;
    }
    if let Some(tree) = &args.tree {
        input::dir("--tree", tree, "pass the top of a Linux source tree")?;
    }
    if let Some(cache) = &args.cache {
        input::output_dir("--cache", cache)?;
    }
    if let Some(out) = &args.out {
        input::output_dir("--out", out)?;
    }
    Ok(())
}

/// Runs `zc-image build-kernel`. A mistake in the arguments exits with status 2
/// after one line saying what to do.
pub fn run(args: BuildKernelArgs) -> Result<()> {
    let json = args.json;
    match build(args) {
        Ok(outcome) => {
            for line in describe(&outcome) {
                eprintln!("zc-image: {line}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&outcome)?);
            }
            Ok(())
        }
        Err(e) if e.is_user_error() => {
            eprintln!("zc-image: error: {e}");
            std::process::exit(2);
        }
        Err(e) => Err(e.into()),
    }
}
