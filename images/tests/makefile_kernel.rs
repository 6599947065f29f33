//! The Makefile's kernel variables, read through `make -n` (which prints the
//! commands a target would run without running them): `KERNEL_TREE=` becomes the
//! staged tree's image and modules, `make kernel` passes the source and patches on.

use std::path::Path;
use std::process::Command;

fn dry_run(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("make")
        .arg("-n")
        .arg("--no-print-directory")
        .arg("-C")
        .arg(&root)
        .args(args)
        .output()
        .expect("make runs (apt-get install make)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "make -n {args:?} failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Join continuation lines so each command is one line.
    text.replace("\\\n", " ")
}

fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no command with {needle:?} in:\n{text}"))
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn kernel_tree_stages_the_tree_and_boots_what_was_staged() {
    let text = dry_run(&["run", "KERNEL_TREE=/src/linux"]);
    let stage = words(line_with(&text, "build-kernel"));
    assert_eq!(
        stage[1..],
        [
            "build-kernel",
            "--tree",
            "/src/linux",
            "--out",
            "images/out/kernel-tree"
        ]
    );
    let guest = line_with(&text, "build --role guest");
    assert!(
        guest.contains("--kernel images/out/kernel-tree/vmlinuz $(test -d images/out/kernel-tree/modules && echo --modules-dir images/out/kernel-tree/modules)"),
        "{guest}"
    );
    // The tree is staged before the guest image is built from it.
    assert!(text.find("build-kernel").unwrap() < text.find("build --role guest").unwrap());
    // A user's kernel is not run through the Debian-only vmlinux extraction.
    assert!(!text.contains("zc-image vmlinux"), "{text}");

    let text = dry_run(&["run", "KERNEL_TREE=/src/linux", "KERNEL_TREE_BUILD=no"]);
    let stage = words(line_with(&text, "build-kernel"));
    assert!(stage.contains(&"--no-build"), "{stage:?}");
}

#[test]
fn without_kernel_tree_nothing_is_staged() {
    let text = dry_run(&["run"]);
    assert!(!text.contains("build-kernel"), "{text}");
    let text = dry_run(&["run", "KERNEL=/k/bzImage", "MODULES=/k/mods"]);
    assert!(!text.contains("build-kernel"), "{text}");
    assert!(
        line_with(&text, "build --role guest")
            .contains("--kernel /k/bzImage --modules-dir /k/mods"),
        "{text}"
    );
}

#[test]
fn make_kernel_passes_source_and_patches_in_order() {
    let text = dry_run(&[
        "kernel",
        "KERNEL_SOURCE=/dl/linux-6.12.tar.xz",
        "KERNEL_PATCHES=b.patch images/patches a.patch",
    ]);
    let build = words(line_with(&text, "build-kernel"));
    assert_eq!(
        build[1..],
        [
            "build-kernel",
            "--source",
            "/dl/linux-6.12.tar.xz",
            "--patch",
            "b.patch",
            "--patch",
            "images/patches",
            "--patch",
            "a.patch",
            "--out",
            "images/out/kernel"
        ]
    );
    // Its packages are installed first (the source package among them).
    let deps = line_with(&text, "APT_PACKAGES=");
    assert!(
        deps.contains("linux-source-6.1") && deps.contains("flex"),
        "{deps}"
    );

    let text = dry_run(&["kernel"]);
    let plain = words(line_with(&text, "build-kernel"));
    assert_eq!(plain[1..], ["build-kernel", "--out", "images/out/kernel"]);
}
