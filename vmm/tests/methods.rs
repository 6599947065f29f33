//! The product's main job, end to end: `zc-vmm methods` boots the default guest
//! kernel once with two cards, runs every transfer method (both directions: the
//! receive methods write to a scratch disk the host reads back) through the card with
//! scatter-gather and again through the one without (`--sg-off-methods all`, which
//! `make run` leaves to the user for time), audits the DMA log card by card and must
//! match `audit/expected.toml`, the table written from the specification. Run by `make test` (it needs the images, hence
//! `#[ignore]`).
//!
//! The test fails if any verdict differs from the table (the command's exit status),
//! and checks on its own what the issue singles out: every method has a row, every
//! sg-off row is its sg-on row plus exactly the one CPU copy the NIC's lack of
//! scatter-gather costs (the frame linearised at the device edge), and the peer
//! received every byte.

mod common;

#[path = "../../audit/tests/support/xsd.rs"]
mod xsd;

use std::path::{Path, PathBuf};
use std::process::Command;

fn methods_out(json: &serde_json::Value) -> Vec<serde_json::Value> {
    assert_eq!(json["schema"], "zc-audit/2", "unexpected verdicts.json");
    json["methods"].as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [serde_json::Value], method: &str, variant: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["method"] == method && r["variant"] == variant)
        .unwrap_or_else(|| panic!("no row for {method} [{variant}] in verdicts.json"))
}

#[test]
#[ignore = "boots a real kernel: run with `make test`"]
fn every_method_matches_the_expected_table() {
    let images = common::images_with("guest/disk.img");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();
    let output = common::methods(&images, out.path(), &["--sg-off-methods", "all"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "zc-vmm methods failed ({}): a verdict differs from audit/expected.toml or a run failed",
        output.status
    );

    let verdicts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("verdicts.json")).unwrap())
            .unwrap();
    let rows = methods_out(&verdicts);
    let expected = std::fs::read_to_string(workspace.join("audit/expected.toml")).unwrap();
    for method in zc_protocol::Method::every() {
        assert!(expected.contains(&format!("[{method}.sg-on]")));
        let r = row(&rows, method.name(), "sg-on");
        assert_eq!(r["direction"], method.direction().name(), "{r}");
        // A kernel without io_uring's SEND_ZC skips that method.
        assert!(
            r["verdict"] == "PASS" || (r["verdict"] == "SKIP" && method.io_uring()),
            "{method}: {r}"
        );
    }
    for r in &rows {
        if r["verdict"] == "SKIP" {
            continue;
        }
        let bytes = r["bytes"].as_u64().unwrap();
        if r["direction"] == "receive" {
            // The NIC brought every byte in, and the disk wrote every byte out,
            // after which the host found the file intact on the scratch disk.
            let receive = &r["receive"];
            assert!(
                receive["nic_rx_payload_bytes"].as_u64().unwrap() >= bytes,
                "{r}"
            );
            assert_eq!(receive["disk_file_bytes"].as_u64().unwrap(), bytes, "{r}");
            assert_eq!(receive["flushed"], true, "{r}");
            let findings = r["findings"].to_string();
            assert!(findings.contains("read back from the scratch disk"), "{r}");
            continue;
        }
        assert!(
            r["nic_payload_bytes"].as_u64().unwrap() >= bytes,
            "the NIC carried less than the method sent: {r}"
        );
    }

    // The NIC, not the kernel, decides sendfile's copy: the same call makes one CPU
    // copy per byte without scatter-gather and none with it.
    let on = row(&rows, "sendfile", "sg-on");
    let off = row(&rows, "sendfile", "sg-off");
    let copies = |r: &serde_json::Value| r["cpu_copies"].as_f64().unwrap();
    // And for every send method: without scatter-gather, one copy more. A receive
    // method's copies do not depend on it (the guest only sends ACKs and its count).
    for on_row in rows.iter().filter(|r| r["variant"] == "sg-on") {
        let method = on_row["method"].as_str().unwrap();
        let off_row = row(&rows, method, "sg-off");
        if on_row["verdict"] == "SKIP" || off_row["verdict"] == "SKIP" {
            continue;
        }
        let extra = copies(off_row) - copies(on_row);
        let want = if on_row["direction"] == "receive" {
            0.0
        } else {
            1.0
        };
        assert!(
            (extra - want).abs() < 0.15,
            "{method}: {extra:.2} more CPU copies without scatter-gather, not {want}"
        );
    }
    // The receive direction's own contrast: recv_write copies twice (socket buffer
    // -> user buffer -> page cache), recv_direct once (the disk takes the user
    // buffer), and no receive path hands the disk the NIC's own pages.
    let rw = copies(row(&rows, "recv_write", "sg-on"));
    let rd = copies(row(&rows, "recv_direct", "sg-on"));
    assert!(
        (rw - 2.0).abs() < 0.15 && (rd - 1.0).abs() < 0.15,
        "recv_write {rw}, recv_direct {rd}"
    );
    for r in rows.iter().filter(|r| r["direction"] == "receive") {
        assert_eq!(r["receive"]["disk_zero_copy_bytes"], 0, "{r}");
    }
    assert!(copies(on) < 0.15, "sendfile with SG: {on}");
    assert!(
        (copies(off) - 1.0).abs() < 0.15,
        "sendfile without SG: {off}"
    );
    assert!(on["zero_copy_pct"].as_f64().unwrap() > 90.0, "{on}");
    assert!(off["zero_copy_pct"].as_f64().unwrap() < 10.0, "{off}");

    // read+write copies twice, mmap+write once: the dirty-page count tells them apart.
    let rw = copies(row(&rows, "read_write", "sg-on"));
    let mw = copies(row(&rows, "mmap_write", "sg-on"));
    assert!(
        (rw - 2.0).abs() < 0.15 && (mw - 1.0).abs() < 0.15,
        "read_write {rw}, mmap_write {mw}"
    );

    for report in [
        "verdicts.ktap",
        "report.html",
        "suite.dma-log.jsonl.zst",
        "sg-on.pcap",
        "sg-off.pcap",
    ] {
        assert!(out.path().join(report).is_file(), "no {report}");
    }
    // One boot: its run report lists both cards, each with its own features and
    // its own peer's transfers (every method, each card).
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("suite.run.json")).unwrap())
            .unwrap();
    let nics = summary["nics"].as_array().expect("the cards");
    assert_eq!(nics.len(), 2, "{nics:?}");
    assert_eq!(
        (&nics[0]["sg"], &nics[1]["sg"]),
        (&true.into(), &false.into())
    );
    // Each card's peer sent the payload to each receive method, and the guest
    // counted every byte.
    let to_guest = summary["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["direction"] == "to_guest")
        .count();
    assert_eq!(
        to_guest,
        2 * zc_protocol::Method::RECEIVE.len(),
        "{summary}"
    );
    // The DMA log keeps the cards apart: card 1's records say so.
    let log = zc_dma_log::read_log(&out.path().join("suite.dma-log.jsonl.zst")).unwrap();
    assert!(log.iter().any(|r| matches!(
        r,
        zc_dma_log::Record::Request(q) if q.device == zc_dma_log::DeviceKind::Net && q.card == 1
    )));
    assert!(log.iter().any(|r| matches!(
        r,
        zc_dma_log::Record::Marker(m) if m.label == "BEGIN sendfile@sg-off"
    )));
    let ktap = std::fs::read_to_string(out.path().join("verdicts.ktap")).unwrap();
    assert!(ktap.starts_with("KTAP version 1\n"), "{ktap}");
    assert!(!ktap.contains("not ok "), "{ktap}");
    assert_eq!(stdout, ktap, "stdout is the verdicts' KTAP");
    every_format_is_valid(workspace, out.path(), &rows);
}

/// Each of the five formats of a passing run, checked by its consumer's rules.
fn every_format_is_valid(workspace: &Path, out: &Path, rows: &[serde_json::Value]) {
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let validate = |schema: PathBuf, doc: PathBuf| {
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&json(schema.clone()))
            .unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json(doc.clone()))
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} against {}: {errors:?}",
            doc.display(),
            schema.display()
        );
    };
    validate(
        workspace.join("docs/schemas/zc-audit-2.schema.json"),
        out.join("verdicts.json"),
    );
    validate(
        workspace.join("docs/schemas/zc-vmm-run-3.schema.json"),
        out.join("suite.run.json"),
    );
    validate(
        workspace.join("audit/tests/data/kcidb.v05_00.schema.json"),
        out.join("kcidb.json"),
    );
    let xsd = xsd::Schema::parse(
        &std::fs::read_to_string(workspace.join("audit/tests/data/junit-10.xsd")).unwrap(),
    );
    let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert_eq!(xsd.validate(&junit), Vec::<String>::new(), "{junit}");
    assert!(
        junit.contains(&format!("tests=\"{}\" failures=\"0\"", rows.len())),
        "{junit}"
    );

    // The kernel's own KTAP parser counts every row.
    let Some(kunit) = std::env::var_os("ZC_KUNIT_DIR")
        .map(|d| PathBuf::from(d).join("tools/testing/kunit/kunit.py"))
        .filter(|p| p.is_file())
    else {
        println!("SKIPPED: the kunit.py check: ZC_KUNIT_DIR is unset (make test sets it)");
        return;
    };
    let parsed = Command::new("python3")
        .arg(kunit)
        .arg("parse")
        .arg(out.join("verdicts.ktap"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&parsed.stdout);
    let skipped = rows.iter().filter(|r| r["verdict"] == "SKIP").count();
    let passed = rows.len() - skipped;
    let summary = if skipped > 0 {
        format!(
            "Ran {} tests: passed: {passed}, skipped: {skipped}",
            rows.len()
        )
    } else {
        format!("Ran {} tests: passed: {passed}", rows.len())
    };
    assert!(text.contains(&summary), "kunit.py parse: {text}");
}
