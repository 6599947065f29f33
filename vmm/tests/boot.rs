//! End-to-end: boot the real Debian kernel that `make images` fetched, with the real
//! `zc-init`, through the `zc-vmm` binary exactly as a user runs it (in whichever
//! host mode the probe picks: emulated on the CI machines).
//!
//! These tests need the images, so plain `cargo test` lists them as ignored; `make
//! test` builds the images and runs them with `--ignored`. They fail, never skip,
//! when the images are missing.

use std::path::PathBuf;
use std::process::{Command, Output};

use rstest::rstest;

mod common;
use serde_json::Value;
use zc_protocol::{Options, TestHook};

/// The guest options that run one `zc.test=` step.
fn steps(step: TestHook) -> Options {
    Options {
        tests: vec![step],
        ..Options::default()
    }
}

fn images() -> PathBuf {
    common::images_with("guest/vmlinuz")
}

fn guest_release() -> String {
    let text = std::fs::read_to_string(images().join("guest/kernel.json")).unwrap();
    let info: Value = serde_json::from_str(&text).unwrap();
    info["release"].as_str().unwrap().to_string()
}

struct Run {
    output: Output,
    report: Option<Value>,
}

impl Run {
    fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
}

/// Runs `zc-vmm run` on the default guest with extra arguments.
fn boot(extra: &[&str]) -> Run {
    boot_kernel("guest/vmlinuz", extra)
}

/// Runs `zc-vmm run` on a kernel image from the images directory.
fn boot_kernel(kernel: &str, extra: &[&str]) -> Run {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let output = common::zc_vmm_run(&images, kernel)
        .arg("--report-json")
        .arg(&report_path)
        .args(extra)
        .output()
        .expect("start zc-vmm");
    let report = std::fs::read_to_string(&report_path)
        .ok()
        .map(|text| serde_json::from_str(&text).expect("report is JSON"));
    let run = Run { output, report };
    eprintln!("--- stdout\n{}--- stderr\n{}", run.stdout(), run.stderr());
    run
}

#[rstest]
#[case::bzimage_as_debian_ships_it("guest/vmlinuz", "BzImage")]
#[case::elf_vmlinux_extracted_from_it("guest/vmlinux", "Elf")]
#[ignore = "boots a real kernel: run with `make test`"]
fn stock_kernel_reaches_init_and_exits_cleanly(#[case] kernel: &str, #[case] format: &str) {
    let run = boot_kernel(kernel, &[]);
    assert_eq!(run.code(), 0, "zc-vmm failed");
    let report = run.report.as_ref().expect("a report");
    assert_eq!(report["kernel_release"], guest_release().as_str());
    assert_eq!(report["guest_exit"], 0);
    assert_eq!(report["stop"], "PowerOff");
    assert_eq!(report["kernel_format"], format);
    // The exact Debian package the kernel came from is part of every report.
    assert_eq!(report["kernel_image"]["release"], guest_release().as_str());
    assert!(report["kernel_image"]["deb_version"].is_string());
    let uptime = report["init_uptime_s"].as_f64().expect("guest uptime");
    assert!(uptime > 0.0 && uptime < 30.0, "uptime {uptime}");
    // The guest's own console line, through COM1.
    assert!(
        run.stdout().contains("zc-init"),
        "no zc-init line on the console"
    );
    assert!(run.stderr().contains("reached /init"));
}

#[rstest]
#[case::exit_status_passes_through(Options { exit_code: 3, ..Options::default() }, &[], 3, "exit 3")]
#[case::kernel_panic_fails_the_run(steps(TestHook::Panic), &[], 1, "panic")]
#[case::hang_hits_the_timeout(steps(TestHook::Hang), &["--timeout", "20"], 1, "timeout")]
#[ignore = "boots a real kernel: run with `make test`"]
fn failing_guests_fail_the_run(
    #[case] guest: Options,
    #[case] extra: &[&str],
    #[case] code: i32,
    #[case] reason: &str,
) {
    let append = guest.to_cmdline();
    let mut args = vec!["--append", append.as_str()];
    args.extend_from_slice(extra);
    let run = boot(&args);
    assert_eq!(run.code(), code);
    let stderr = run.stderr();
    let failed = stderr
        .lines()
        .find(|l| l.contains("FAILED"))
        .expect("a one-line reason");
    assert!(failed.contains(reason), "{failed:?} lacks {reason:?}");
    assert!(stderr.contains("last console lines"));
}

#[rstest]
#[case::missing_kernel("/nonexistent/bzImage", "does not exist")]
#[case::not_a_kernel("/etc/hostname", "neither a bzImage nor an ELF")]
fn bad_kernel_path_is_a_one_line_error(#[case] kernel: &str, #[case] message: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .args(["run", "--kernel", kernel])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(message) && errors[0].contains(kernel),
        "{stderr}"
    );
}
