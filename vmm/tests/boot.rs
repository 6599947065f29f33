//! End-to-end: boot the real Debian kernel that `make images` fetched, with the real
//! `zc-guest`, through the `zc-vmm` binary exactly as a user runs it (in whichever
//! host mode the probe picks: emulated on the CI machines).
//!
//! These tests need the images, so plain `cargo test` lists them as ignored; `make
//! test` builds the images and runs them with `--ignored`. They fail, never skip,
//! when the images are missing.

use std::path::PathBuf;
use std::process::Command;

use rstest::rstest;
use zc_vmm::boot::KernelFormat;
use zc_vmm::report::{KernelImage, StopReason};
use zc_vmm::spec::RunSpec;

mod common;
use common::Run;
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
    KernelImage::beside(&images().join("guest/vmlinuz"))
        .expect("guest/kernel.json")
        .release
}

/// Runs the default guest, changed by `configure`.
fn boot(configure: impl FnOnce(&mut RunSpec)) -> Run {
    boot_kernel("guest/vmlinuz", configure)
}

/// Runs a kernel image from the images directory, changed by `configure`.
fn boot_kernel(kernel: &str, configure: impl FnOnce(&mut RunSpec)) -> Run {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = common::guest_spec(&images, kernel, dir.path());
    configure(&mut spec);
    common::run_spec(&images, &spec, dir.path())
}

#[rstest]
#[case::bzimage_as_debian_ships_it("guest/vmlinuz", KernelFormat::BzImage)]
#[case::elf_vmlinux_extracted_from_it("guest/vmlinux", KernelFormat::Elf)]
#[ignore = "boots a real kernel: run with `make test`"]
fn stock_kernel_reaches_init_and_exits_cleanly(#[case] kernel: &str, #[case] format: KernelFormat) {
    let run = boot_kernel(kernel, |_| {});
    assert_eq!(run.code(), 0, "zc-vmm failed");
    let summary = run.summary();
    let report = &summary.run;
    assert_eq!(
        report.kernel_release.as_deref(),
        Some(guest_release().as_str())
    );
    assert_eq!(report.guest_exit, Some(0));
    assert_eq!(report.stop, StopReason::PowerOff);
    assert_eq!(report.kernel_format, format);
    // The exact Debian package the kernel came from is part of every report.
    let image = summary.kernel_image.as_ref().expect("the kernel's package");
    assert_eq!(image.release, guest_release());
    assert!(image.deb_version.is_some());
    let uptime = report.init_uptime.expect("guest uptime");
    assert!(uptime > 0.0 && uptime < 30.0, "uptime {uptime}");
    // The guest's own console line, through COM1.
    assert!(
        run.stdout().contains("zc-guest"),
        "no zc-guest line on the console"
    );
    assert!(run.stderr().contains("reached /init"));
}

#[rstest]
#[case::exit_status_passes_through(Options { exit_code: 3, ..Options::default() }, 60, 3, "exit 3")]
#[case::kernel_panic_fails_the_run(steps(TestHook::Panic), 60, 1, "panic")]
#[case::hang_hits_the_timeout(steps(TestHook::Hang), 20, 1, "timeout")]
#[ignore = "boots a real kernel: run with `make test`"]
fn failing_guests_fail_the_run(
    #[case] guest: Options,
    #[case] timeout_s: u64,
    #[case] code: i32,
    #[case] reason: &str,
) {
    let run = boot(|spec| {
        spec.append = Some(guest.to_cmdline());
        spec.timeout_s = timeout_s;
    });
    assert_eq!(run.code(), code);
    let stderr = run.stderr();
    let failed = stderr
        .lines()
        .find(|l| l.contains("FAILED"))
        .expect("a one-line reason");
    assert!(failed.contains(reason), "{failed:?} lacks {reason:?}");
    assert!(stderr.contains("last console lines"));
}

/// `zc-vmm ARGS`, which must fail before booting with one error line holding each
/// of `needles`, and exit 2.
fn assert_one_line_error(args: &[&std::ffi::OsStr], needles: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .args(args)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for needle in needles {
        assert!(errors[0].contains(needle), "{needle:?}: {stderr}");
    }
}

#[test]
fn a_bad_spec_file_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec_file = dir.path().join("spec.json");
    let mut spec = RunSpec::new("/nonexistent/bzImage");
    spec.save(&spec_file).unwrap();
    let run = ["run".as_ref(), "--spec".as_ref(), spec_file.as_os_str()];
    assert_one_line_error(&run, &["does not exist", "/nonexistent/bzImage"]);
    spec.kernel = "/etc/hostname".into();
    spec.save(&spec_file).unwrap();
    assert_one_line_error(&run, &["neither a bzImage nor an ELF"]);
    std::fs::write(&spec_file, r#"{"kernel": 5}"#).unwrap();
    assert_one_line_error(&run, &["spec.json"]);
}

#[rstest]
#[case::missing_kernel("/nonexistent/bzImage", "does not exist")]
#[case::not_a_kernel("/etc/hostname", "neither a bzImage nor an ELF")]
fn bad_kernel_path_is_a_one_line_error(#[case] kernel: &str, #[case] message: &str) {
    let args = ["run", "--kernel", kernel].map(std::ffi::OsStr::new);
    assert_one_line_error(&args, &[message, kernel]);
}
