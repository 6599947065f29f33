//! What the end-to-end tests share: the images `make images` built, a run spec of the
//! default guest, and `zc-vmm` pointed, for emulated mode, at the emulated host's
//! kernel and initrd.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zc_vmm::report::RunSummary;
use zc_vmm::spec::{RunOutputs, RunSpec};

/// The directory `make images` wrote, from `ZC_IMAGES`; checks `wanted` is in it.
pub fn images_with(wanted: &str) -> PathBuf {
    let dir = std::env::var_os("ZC_IMAGES")
        .map(PathBuf::from)
        .expect("ZC_IMAGES is not set: run these tests with `make test`");
    assert!(
        dir.join(wanted).is_file(),
        "{} has no {wanted}: run `make images`",
        dir.display()
    );
    dir
}

/// A run of `<images>/<kernel>` with the default guest's initrd, its summary written
/// into `dir`; each test adds its devices and options.
pub fn guest_spec(images: &Path, kernel: &str, dir: &Path) -> RunSpec {
    RunSpec {
        initrd: Some(images.join("guest/initrd.img")),
        outputs: RunOutputs {
            summary: Some(dir.join("report.json")),
            ..RunOutputs::default()
        },
        ..RunSpec::new(images.join(kernel))
    }
}

/// A finished `zc-vmm run --spec`: its output and the summary it wrote, if any.
pub struct Run {
    pub output: Output,
    pub summary: Option<RunSummary>,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    /// The summary, which a run that booted must have written.
    pub fn summary(&self) -> &RunSummary {
        self.summary.as_ref().expect("a run summary")
    }
}

/// Writes `spec` into `dir` and runs `zc-vmm run --spec` on it, as `zc-vmm methods`
/// does, with the emulated host's images set in the environment.
pub fn run_spec(images: &Path, spec: &RunSpec, dir: &Path) -> Run {
    let spec_file = dir.join("spec.json");
    spec.save(&spec_file).expect("write the run spec");
    let output = zc_vmm(images)
        .arg("run")
        .arg("--spec")
        .arg(&spec_file)
        .output()
        .expect("start zc-vmm");
    let summary = spec.outputs.summary.as_deref().and_then(|path| {
        path.exists()
            .then(|| RunSummary::load(path).expect("a readable run summary"))
    });
    let run = Run { output, summary };
    eprintln!("--- stdout\n{}--- stderr\n{}", run.stdout(), run.stderr());
    run
}

/// `zc-vmm` with the emulated host's images set in the environment.
pub fn zc_vmm(images: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zc-vmm"));
    command
        .env("ZC_HOST_KERNEL", images.join("host/vmlinuz"))
        .env("ZC_HOST_INITRD", images.join("host/initrd.img"));
    command
}

/// `zc-vmm methods` booting `kernel_images/guest/{vmlinuz,initrd.img}` with the
/// default images' test disk and payload, judged against the shipped
/// `audit/expected.toml`, reports into `out`; `extra` selects methods, sizes,
/// transports. Prints what it printed, returns its output.
pub fn methods(kernel_images: &Path, out: &Path, extra: &[&str]) -> Output {
    let images = images_with("guest/disk.img");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let output = zc_vmm(&images)
        .arg("methods")
        .arg("--kernel")
        .arg(kernel_images.join("guest/vmlinuz"))
        .arg("--initrd")
        .arg(kernel_images.join("guest/initrd.img"))
        .arg("--disk")
        .arg(images.join("guest/disk.img"))
        .arg("--payload")
        .arg(images.join("guest/disk-files/payload.bin"))
        .arg("--expected")
        .arg(workspace.join("audit/expected.toml"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("zc-vmm runs");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}
