//! zc catches a real kernel regression: a kernel built from Debian's linux-source
//! with one of the regression patches (`images/regressions/`) must FAIL exactly the
//! rows the patch's `Zc-Fails:` trailers name, on the checks they name, and PASS
//! every other row of all twenty. Run by `make test`, which builds the patched
//! kernel (`zc-image build-kernel --patch`, rebuilt incrementally in the unpatched
//! build's tree) and its initramfs first (hence `#[ignore]`).
//!
//! The patch `make test` uses is the MSG_ZEROCOPY one: the kernel copies every
//! short zero-copy send and still reports the completions as zero-copy. Besides
//! the prediction, the test checks what makes that regression worth catching: the
//! kernel's own counts admit no copy while the device read every byte from one.

mod common;

use std::path::{Path, PathBuf};

use zc_audit::regression::{RegressionPatch, RowResult};
use zc_audit::Verdict;

fn env_path(name: &str, what: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(name)
            .unwrap_or_else(|| panic!("{name} is not set: {what} (`make test` sets it)")),
    )
}

#[test]
#[ignore = "boots a patched kernel built from source: run with `make test`"]
fn a_patched_kernel_fails_exactly_the_rows_its_patch_names() {
    let kernel_images = env_path(
        "ZC_REGRESSION_IMAGES",
        "the patched kernel's images (guest/vmlinuz, guest/initrd.img)",
    );
    let patch_path = env_path(
        "ZC_REGRESSION_PATCH",
        "the regression patch it was built with",
    );
    let patch = RegressionPatch::load(&patch_path).expect("the patch's prediction");
    // What `zc-image build --role guest` wrote about the image it staged.
    let guest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(kernel_images.join("guest/kernel.json"))
            .expect("the patched kernel's guest/kernel.json"),
    )
    .unwrap();
    let release = guest["release"].as_str().expect("a release").to_string();
    assert!(
        release.contains("-zc-"),
        "{}: release {release} is not a patched source build",
        kernel_images.display(),
    );

    let out = tempfile::tempdir().unwrap();
    // The send methods, the paths the regression patches break (the receive
    // methods have not run on the source-built kernel yet).
    let output = common::methods(
        &kernel_images,
        out.path(),
        &["--methods", "send", "--sg-off-methods", "send"],
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "zc-vmm methods must exit 1 (verdicts differ) on a kernel with {}",
        patch_path.display()
    );
    let verdicts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("verdicts.json")).unwrap())
            .unwrap();
    assert_eq!(verdicts["context"]["kernel_release"], release.as_str());
    let rows: Vec<RowResult> = serde_json::from_value(verdicts["methods"].clone()).unwrap();
    let every_row = 2 * zc_protocol::Method::ALL.len();
    assert_eq!(rows.len(), every_row, "every method, both variants");

    // Exactly the predicted rows FAIL, on exactly the predicted checks.
    let mismatches = patch.judge(&rows);
    assert!(
        mismatches.is_empty(),
        "{} predicts otherwise:\n{}",
        patch_path.display(),
        mismatches.join("\n")
    );
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Fail)
        .map(|r| format!("{}.{}", r.method, r.variant))
        .collect();
    let predicted: Vec<String> = patch
        .fails
        .iter()
        .map(|f| format!("{}.{}", f.method, f.variant))
        .collect();
    assert_eq!(sorted(failed), sorted(predicted));
    // The rest PASS, but for methods the kernel cannot run (the source-built
    // kernel has no tmpfs: sendfile_tmpfs SKIPs, with its reason in the row).
    let skipped: Vec<&str> = rows
        .iter()
        .filter(|r| r.verdict == Verdict::Skip)
        .map(|r| r.method.as_str())
        .collect();
    assert!(
        skipped.iter().all(|m| *m == "sendfile_tmpfs"),
        "only sendfile_tmpfs may SKIP here: {skipped:?} did"
    );
    let skipped = skipped.len();
    assert_eq!(
        rows.iter().filter(|r| r.verdict == Verdict::Pass).count(),
        every_row - patch.fails.len() - skipped
    );

    if patch_path.file_name() == Some("tcp-zerocopy-copies-small-sends.patch".as_ref()) {
        the_kernel_claims_zero_copy_while_the_device_read_copies(&verdicts);
    }
}

/// On the MSG_ZEROCOPY patch: every sg-on MSG_ZEROCOPY row shows the kernel
/// flagging none of its sends as copied, while the NIC read no byte zero-copy, and
/// the audit says so in a finding.
fn the_kernel_claims_zero_copy_while_the_device_read_copies(verdicts: &serde_json::Value) {
    for method in ["direct_zerocopy", "mmap_zerocopy", "cow_zerocopy"] {
        let row = verdicts["methods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"] == method && r["variant"] == "sg-on")
            .unwrap_or_else(|| panic!("no {method} [sg-on] row"));
        assert_eq!(row["kernel"]["copied"], 0, "{method}: {row}");
        assert!(
            row["kernel"]["sends"].as_u64().unwrap() > 0,
            "{method}: {row}"
        );
        assert!(
            row["zero_copy_pct"].as_f64().unwrap() < 10.0,
            "{method}: {row}"
        );
        let findings = row["findings"].as_array().unwrap();
        assert!(
            findings
                .iter()
                .any(|f| f.as_str().unwrap().starts_with("kernel flagged 0 of")),
            "{method}: the audit reports the kernel's claim against the device: {row}"
        );
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn the_patch_make_test_uses_is_a_shipped_regression_patch() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let makefile = std::fs::read_to_string(workspace.join("Makefile")).unwrap();
    let line = makefile
        .lines()
        .find(|l| l.starts_with("REGRESSION_TEST_PATCH"))
        .expect("the Makefile names the patch make test boots");
    let path = line.split(":=").nth(1).unwrap().trim();
    let patch = RegressionPatch::load(&workspace.join(path)).unwrap();
    assert!(!patch.fails.is_empty());
}
