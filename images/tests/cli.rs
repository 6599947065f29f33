//! `zc-image` run as a user runs it: bad input in every subcommand is one line on
//! stderr and exit status 2, before any work (nothing is written); a failure found
//! while working exits 1.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory with a regular file `f` in it.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "not what zc-image wants\n").unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn root(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Every path in the directory, for "nothing was written".
    fn listing(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                }
                out.push(path);
            }
        }
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        out.sort();
        out
    }
}

/// Runs `zc-image ARGS`: (exit status, stdout, stderr).
fn zc_image(args: &[String]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zc-image"))
        .args(args)
        // Kernel builds look for their cache here; keep them inside the test.
        .env(
            "ZC_KERNEL_CACHE",
            std::env::temp_dir().join("zc-image-cli-unused"),
        )
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts `args` are refused with exit 2 and one line holding `needle`, leaving the
/// scratch directory as it was.
fn refused(s: &Scratch, args: &[String], needle: &str) {
    let before = s.listing();
    let (code, stdout, stderr) = zc_image(args);
    assert_eq!(
        code,
        Some(2),
        "{args:?}\nstdout: {stdout}\nstderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one line on stderr:\n{stderr}");
    assert!(
        lines[0].starts_with("zc-image: error: ") && lines[0].contains(needle),
        "{args:?}: expected {needle:?} in:\n{stderr}"
    );
    assert!(stdout.is_empty(), "{args:?}: {stdout}");
    assert_eq!(s.listing(), before, "{args:?} wrote something");
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

#[test]
fn build_refuses_missing_and_wrong_type_paths() {
    let s = Scratch::new();
    let (f, dir, none) = (s.path("f"), s.root(), s.path("none"));
    let base = |extra: &[&str]| {
        let mut a = args(&["build", "--role", "guest", "--out", &s.path("out")]);
        a.extend(args(extra));
        a
    };
    refused(&s, &base(&["--init", &none]), "does not exist");
    refused(&s, &base(&["--init", &dir]), "is a directory, not a file");
    refused(&s, &base(&["--init", &f, "--kernel", &dir]), "--kernel");
    refused(
        &s,
        &base(&["--init", &f, "--kernel", &f, "--modules-dir", &f]),
        "is not a directory",
    );
    refused(
        &s,
        &base(&["--init", &f, "--kernel", &f, "--config", &none]),
        "--config",
    );
    let mut to_file = args(&["build", "--role", "guest", "--init", &f, "--out", &f]);
    refused(&s, &to_file, "--out");
    to_file.extend(args(&["--cache", &f]));
    refused(&s, &to_file, "is a file, not a directory");
}

#[test]
fn kernel_refuses_a_cache_that_is_a_file() {
    let s = Scratch::new();
    refused(
        &s,
        &args(&["kernel", "--flavour", "cloud", "--cache", &s.path("f")]),
        "--cache",
    );
}

#[test]
fn build_kernel_refuses_bad_paths_and_zero_jobs() {
    let s = Scratch::new();
    let (f, dir, none) = (s.path("f"), s.root(), s.path("none"));
    let out = s.path("out");
    refused(
        &s,
        &args(&["build-kernel", "--source", &none, "--out", &out]),
        "--source",
    );
    refused(
        &s,
        &args(&["build-kernel", "--source", &dir, "--out", &out]),
        "is a directory, not a file",
    );
    refused(
        &s,
        &args(&["build-kernel", "--patch", &none, "--out", &out]),
        "--patch",
    );
    refused(
        &s,
        &args(&["build-kernel", "--fragment", &dir, "--out", &out]),
        "--fragment",
    );
    refused(
        &s,
        &args(&["build-kernel", "--tree", &f, "--out", &out]),
        "is not a directory",
    );
    refused(
        &s,
        &args(&["build-kernel", "--tree", &dir, "--out", &out, "-j", "0"]),
        "-j 0",
    );
    refused(&s, &args(&["build-kernel", "--cache", &f]), "--cache");
    refused(
        &s,
        &args(&["build-kernel", "--tree", &dir, "--out", &f]),
        "--out",
    );
}

#[test]
fn disk_refuses_zero_sizes_a_directory_and_too_small_images() {
    let s = Scratch::new();
    let img = s.path("d.img");
    refused(
        &s,
        &args(&["disk", "--out", &img, "--size", "0"]),
        "--size 0",
    );
    refused(
        &s,
        &args(&["disk", "--out", &img, "--file", "a.bin=0"]),
        "--file a.bin=0",
    );
    refused(&s, &args(&["disk", "--out", &s.root()]), "is a directory");
    refused(
        &s,
        &args(&["disk", "--out", &s.path("f/d.img")]),
        "is a file, not a directory",
    );
    // Found by the builder itself, still before anything is written.
    refused(
        &s,
        &args(&["disk", "--out", &img, "--size", "1M", "--file", "a.bin=2M"]),
        "raise --size",
    );
    refused(
        &s,
        &args(&["disk", "--out", &img, "--file", "a=1M", "--file", "a=2M"]),
        "given twice",
    );
}

#[test]
fn check_config_refuses_missing_and_wrong_type_paths() {
    let s = Scratch::new();
    refused(
        &s,
        &args(&["check-config", &s.path("none")]),
        "does not exist",
    );
    refused(&s, &args(&["check-config", &s.root()]), "holds no kernel");
    refused(
        &s,
        &args(&["check-config", &s.path("f"), "--config", &s.root()]),
        "--config",
    );
    refused(
        &s,
        &args(&["check-config", &s.path("f"), "--modules-dir", &s.path("f")]),
        "--modules-dir",
    );
}

#[test]
fn list_initramfs_refuses_what_is_not_an_archive_and_fails_on_a_broken_one() {
    let s = Scratch::new();
    refused(
        &s,
        &args(&["list-initramfs", &s.path("none")]),
        "does not exist",
    );
    refused(&s, &args(&["list-initramfs", &s.root()]), "is a directory");
    refused(
        &s,
        &args(&["list-initramfs", &s.path("f")]),
        "is not an initramfs",
    );
    // The right kind of file, broken inside: a failure while reading it, exit 1.
    let broken = s.path("broken.img");
    std::fs::write(&broken, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff]).unwrap();
    let (code, _, stderr) = zc_image(&args(&["list-initramfs", &broken]));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("corrupt gzip"), "{stderr}");
}

#[test]
fn vmlinux_refuses_what_is_not_a_bzimage() {
    let s = Scratch::new();
    let out = s.path("vmlinux");
    refused(
        &s,
        &args(&["vmlinux", "--kernel", &s.path("none"), "--out", &out]),
        "does not exist",
    );
    refused(
        &s,
        &args(&["vmlinux", "--kernel", &s.root(), "--out", &out]),
        "is a directory",
    );
    refused(
        &s,
        &args(&["vmlinux", "--kernel", &s.path("f"), "--out", &out]),
        "not a bzImage",
    );
    refused(
        &s,
        &args(&["vmlinux", "--kernel", &s.path("f"), "--out", &s.root()]),
        "--out",
    );
}

#[test]
fn usage_errors_exit_2_as_clap_reports_them() {
    for bad in [
        args(&["no-such-command"]),
        args(&["build"]),
        args(&["disk", "--size", "lots"]),
    ] {
        let (code, _, stderr) = zc_image(&bad);
        assert_eq!(code, Some(2), "{bad:?}: {stderr}");
    }
}
