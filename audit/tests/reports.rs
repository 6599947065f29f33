//! The reports of two verdict sets built from the recorded logs in `tests/data/` (no
//! boot): a passing run, and a failing one (a verdict that differs, and a boot that
//! failed before any method ran). Each format is checked by its consumer's own rules:
//! KTAP by the kernel's `kunit.py parse`, JUnit against the Jenkins `junit-10.xsd`,
//! KCIDB against kcidb-io's v5 schema, `verdicts.json` against
//! `docs/schemas/zc-audit-2.schema.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use zc_audit::report::{self, KcidbIds};
use zc_audit::{
    audit, audit_wanted, blame_run_failure, parse_reports, AuditInput, Expectations, MethodAudit,
    Negotiated, OutputFile, RunContext, VariantRun, Verdict, Verdicts,
};
use zc_dma_log::read_log;

#[path = "support/kunit.rs"]
mod kunit;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn data(name: &str) -> PathBuf {
    manifest().join("tests/data").join(name)
}

fn load(name: &str, variant: &str) -> AuditInput {
    let reports = std::fs::read_to_string(data(&format!("{name}.reports.jsonl"))).unwrap();
    AuditInput {
        records: read_log(&data(&format!("{name}.dma.jsonl"))).unwrap(),
        source: std::fs::read(data("source.bin")).unwrap(),
        reports: parse_reports(&reports).unwrap(),
        variant: variant.to_string(),
        card: None,
        kernel_release: None,
    }
}

fn expected_toml() -> Expectations {
    Expectations::load(&manifest().join("expected.toml")).unwrap()
}

fn one(name: &str, variant: &str) -> MethodAudit {
    let mut a = audit(&load(name, variant), &expected_toml());
    assert_eq!(a.len(), 1, "{a:#?}");
    a.remove(0)
}

/// `uring_send_zc`, skipped by the guest.
fn skipped() -> MethodAudit {
    let mut input = load("sendfile_sg_on", "sg-on");
    input.reports = parse_reports(
        r#"{"test":"method","method":"uring_send_zc","ok":true,"skipped":"kernel has no IORING_OP_SEND_ZC"}"#,
    )
    .unwrap();
    audit(&input, &expected_toml())
        .into_iter()
        .find(|a| a.verdict == Verdict::Skip)
        .unwrap()
}

fn file(kind: &str, path: &str) -> OutputFile {
    OutputFile {
        kind: kind.into(),
        path: path.into(),
        bytes: Some(4),
        sha256: Some("ab".repeat(32)),
    }
}

fn context(variants: Vec<VariantRun>) -> RunContext {
    RunContext {
        zc_version: "0.1.0".into(),
        date: "2026-12-01T09:35:16Z".into(),
        kernel_release: Some("6.1.0-57-cloud-amd64".into()),
        kernel_source: Some("linux-image-6.1.0-57-cloud-amd64 6.1.192-3".into()),
        host_mode: Some("emulated".into()),
        transport: Some("mmio".into()),
        cpu_model: Some("AMD EPYC".into()),
        size: 32768,
        chunk: 16384,
        variants,
    }
}

fn variant(name: &str, methods: &[&str], failure: Option<&str>) -> VariantRun {
    VariantRun {
        name: name.into(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        nic_features: Some(Negotiated {
            offered: vec!["CSUM".into(), "MAC".into(), "VERSION_1".into()],
            acked: Some(vec!["CSUM".into(), "MAC".into(), "VERSION_1".into()]),
            unused: Vec::new(),
        }),
        failure: failure.map(String::from),
        files: vec![
            file("dma-log", &format!("{name}.dma-log.jsonl")),
            file("pcap", &format!("{name}.pcap")),
        ],
    }
}

/// Passing: 4 PASS in sg-on (sendfile, read_write, sendfile_warm) + 1 SKIP, 1 PASS
/// in sg-off.
fn passing() -> Verdicts {
    let methods = vec![
        one("sendfile_sg_on", "sg-on"),
        one("read_write", "sg-on"),
        one("sendfile_warm", "sg-on"),
        skipped(),
        one("sendfile_sg_off", "sg-off"),
    ];
    Verdicts {
        context: context(vec![
            variant(
                "sg-on",
                &["sendfile", "read_write", "sendfile_warm", "uring_send_zc"],
                None,
            ),
            variant("sg-off", &["sendfile"], None),
        ]),
        methods,
    }
}

const GUEST_ERROR: &str =
    "the guest program reported failure (exit 1): loading module 07-virtio_net.ko: Exec format error";

/// Failing: sg-on as in [`passing`] but `sendfile` judged on the sg-off log (FAIL:
/// one CPU copy); sg-off's boot failed before any method, so its 2 methods FAIL.
fn failing() -> Verdicts {
    let mut methods = vec![
        one("sendfile_sg_off", "sg-on"),
        one("read_write", "sg-on"),
        one("sendfile_warm", "sg-on"),
        skipped(),
    ];
    let wanted = ["sendfile".to_string(), "mmap_zerocopy".to_string()];
    let empty = AuditInput {
        source: std::fs::read(data("source.bin")).unwrap(),
        variant: "sg-off".into(),
        ..AuditInput::default()
    };
    let mut unrun = audit_wanted(&empty, &expected_toml(), &wanted);
    blame_run_failure(&mut unrun, GUEST_ERROR);
    methods.extend(unrun);
    Verdicts {
        context: context(vec![
            variant(
                "sg-on",
                &["sendfile", "read_write", "sendfile_warm", "uring_send_zc"],
                None,
            ),
            variant("sg-off", &["sendfile", "mmap_zerocopy"], Some(GUEST_ERROR)),
        ]),
        methods,
    }
}

#[test]
fn the_sets_are_what_their_names_say() {
    assert_eq!(passing().totals(), (4, 0, 1));
    assert!(passing().passed());
    assert_eq!(failing().totals(), (2, 3, 1));
    assert!(!failing().passed());
}

#[test]
fn a_boot_that_failed_gives_each_wanted_method_a_fail_row_with_the_guest_error() {
    let v = failing();
    let unrun: Vec<&MethodAudit> = v.of_variant("sg-off").collect();
    assert_eq!(unrun.len(), 2);
    for a in unrun {
        assert_eq!(a.verdict, Verdict::Fail);
        assert_eq!(a.reasons[0], GUEST_ERROR, "{a:#?}");
    }
}

// ---- KTAP ----

#[test]
fn ktap_nests_variants_and_methods_with_measurements_and_totals() {
    let k = report::ktap(&passing());
    let lines: Vec<&str> = k.lines().collect();
    assert_eq!(lines[0], "KTAP version 1");
    assert!(
        lines.contains(
            &"# kernel: 6.1.0-57-cloud-amd64 (linux-image-6.1.0-57-cloud-amd64 6.1.192-3)"
        ),
        "{k}"
    );
    assert!(lines.contains(&"1..2"), "{k}");
    assert!(lines.contains(&"  KTAP version 1"), "{k}");
    assert!(lines.contains(&"  1..4"), "{k}");
    assert!(lines.contains(&"  ok 1 sendfile"), "{k}");
    assert!(
        lines.contains(&"  ok 4 uring_send_zc # SKIP kernel has no IORING_OP_SEND_ZC"),
        "{k}"
    );
    let diag = lines
        .iter()
        .find(|l| l.starts_with("  # read_write: "))
        .unwrap();
    for key in [
        "cpu_copies=2.00",
        "zero_copy_pct=",
        "dma_copies=",
        "syscalls_per_chunk=",
        "mbit_s=",
    ] {
        assert!(diag.contains(key), "{diag}");
    }
    assert!(lines.contains(&"ok 1 sg-on"), "{k}");
    assert!(lines.contains(&"ok 2 sg-off"), "{k}");
    assert_eq!(
        *lines.last().unwrap(),
        "# Totals: pass:4 fail:0 xfail:0 xpass:0 skip:1 error:0"
    );
}

#[test]
fn ktap_of_a_failed_boot_fails_the_variant_and_each_method() {
    let k = report::ktap(&failing());
    let lines: Vec<&str> = k.lines().collect();
    assert!(
        lines.contains(&format!("not ok 2 sg-off # {GUEST_ERROR}").as_str()),
        "{k}"
    );
    assert!(
        lines.contains(&format!("  not ok 1 sendfile # {GUEST_ERROR}").as_str()),
        "{k}"
    );
    assert!(
        lines.contains(&format!("  not ok 2 mmap_zerocopy # {GUEST_ERROR}").as_str()),
        "{k}"
    );
    assert!(
        lines.contains(&"  not ok 1 sendfile # cpu_copies 1.00, expected 0.00 ± 0.15"),
        "{k}"
    );
    assert!(lines.contains(&"not ok 1 sg-on"), "{k}");
    // A method that never ran has reasons, not a line of zero measurements.
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("  # mmap_zerocopy: cpu_copies")),
        "{k}"
    );
    assert_eq!(
        *lines.last().unwrap(),
        "# Totals: pass:2 fail:3 xfail:0 xpass:0 skip:1 error:0"
    );
}

/// `kunit.py parse` of `ktap`: its summary's (ran, passed, failed, skipped).
fn kunit_counts(py: &Path, ktap: &str) -> (u32, u32, u32, u32) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("verdicts.ktap");
    std::fs::write(&file, ktap).unwrap();
    let out = Command::new("python3")
        .arg(py)
        .arg("parse")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = text
        .lines()
        .find(|l| l.contains("Testing complete."))
        .unwrap_or_else(|| panic!("kunit.py printed no summary:\n{text}"));
    assert!(!text.contains("[ERROR]"), "kunit.py found errors:\n{text}");
    let count = |key: &str| -> u32 {
        line.split(key)
            .nth(1)
            .map(|rest| {
                rest.trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap()
            })
            .unwrap_or(0)
    };
    (
        count("Ran "),
        count("passed:"),
        count("failed:"),
        count("skipped:"),
    )
}

#[test]
fn the_kernels_kunit_parser_counts_every_method() {
    let py = match kunit::kunit_py() {
        Ok(py) => py,
        Err(why) => {
            println!("SKIPPED: kunit.py parse cannot run: {why}");
            return;
        }
    };
    assert_eq!(kunit_counts(&py, &report::ktap(&passing())), (5, 4, 0, 1));
    assert_eq!(kunit_counts(&py, &report::ktap(&failing())), (6, 2, 3, 1));
}

// ---- JSON ----

fn validator(schema: &Path) -> jsonschema::Validator {
    let text = std::fs::read_to_string(schema).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{}: {e}", schema["title"]))
}

fn errors(v: &jsonschema::Validator, doc: &serde_json::Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn verdicts_json_matches_its_documented_schema() {
    let schema = validator(&manifest().join("../docs/schemas/zc-audit-2.schema.json"));
    for v in [passing(), failing()] {
        let doc: serde_json::Value = serde_json::from_str(&report::json(&v)).unwrap();
        assert_eq!(doc["schema"], "zc-audit/2");
        assert_eq!(doc["methods"].as_array().unwrap().len(), v.methods.len());
        assert_eq!(doc["context"]["kernel_release"], "6.1.0-57-cloud-amd64");
        assert_eq!(errors(&schema, &doc), Vec::<String>::new());
    }
    let doc: serde_json::Value = serde_json::from_str(&report::json(&failing())).unwrap();
    assert_eq!(doc["passed"], false);
    assert_eq!(doc["totals"]["fail"], 3);
    // The schema has teeth: a verdict it does not know, a missing context.
    let mut bad = doc.clone();
    bad["methods"][0]["verdict"] = "MAYBE".into();
    assert!(!errors(&schema, &bad).is_empty());
    let mut bad = doc;
    bad.as_object_mut().unwrap().remove("context");
    assert!(!errors(&schema, &bad).is_empty());
}

#[test]
fn kcidb_json_matches_the_kcidb_v5_schema() {
    let schema = validator(&data("kcidb.v05_00.schema.json"));
    for v in [passing(), failing()] {
        let doc: serde_json::Value =
            serde_json::from_str(&report::kcidb(&v, &KcidbIds::standalone(&v))).unwrap();
        assert_eq!(errors(&schema, &doc), Vec::<String>::new());
    }
    let v = failing();
    let doc: serde_json::Value =
        serde_json::from_str(&report::kcidb(&v, &KcidbIds::standalone(&v))).unwrap();
    let tests = doc["tests"].as_array().unwrap();
    // Six methods and the failed boot of sg-off.
    assert_eq!(tests.len(), 7);
    let status = |path: &str| {
        tests
            .iter()
            .find(|t| t["path"] == path)
            .map(|t| (t["status"].clone(), t["comment"].clone()))
            .unwrap()
    };
    assert_eq!(status("zc.sg-off").0, "FAIL");
    assert_eq!(status("zc.sg-off.mmap_zerocopy").0, "FAIL");
    assert_eq!(status("zc.sg-off.mmap_zerocopy").1, GUEST_ERROR);
    assert_eq!(status("zc.sg-on.uring_send_zc").0, "SKIP");
    assert_eq!(status("zc.sg-on.read_write").0, "PASS");
    // The schema has teeth: an ID without its origin prefix, a status it lacks.
    let mut bad = doc.clone();
    bad["tests"][0]["id"] = "no-origin".into();
    assert!(!errors(&schema, &bad).is_empty());
    let mut bad = doc;
    bad["tests"][0]["status"] = "OK".into();
    assert!(!errors(&schema, &bad).is_empty());
}

// ---- JUnit ----

#[path = "support/xsd.rs"]
mod xsd;

fn junit_schema() -> xsd::Schema {
    xsd::Schema::parse(&std::fs::read_to_string(data("junit-10.xsd")).unwrap())
}

#[test]
fn junit_xml_is_valid_against_the_jenkins_schema() {
    let schema = junit_schema();
    for v in [passing(), failing()] {
        let xml = report::junit(&v);
        assert_eq!(schema.validate(&xml), Vec::<String>::new(), "{xml}");
    }
    let xml = report::junit(&failing());
    assert!(
        xml.contains("<testsuites name=\"zc\" tests=\"6\" failures=\"3\""),
        "{xml}"
    );
    assert!(
        xml.contains(&format!(
            "<testcase name=\"mmap_zerocopy\" classname=\"zc.sg-off\" time=\"0.000\"><failure type=\"verdict\" message=\"{GUEST_ERROR}\">"
        )),
        "{xml}"
    );
    assert!(xml.contains("<skipped message=\"kernel has no IORING_OP_SEND_ZC\"/>"));
}

#[test]
fn the_junit_validator_catches_what_the_schema_forbids() {
    let schema = junit_schema();
    let ok = "<testsuites><testsuite name=\"a\" tests=\"1\" failures=\"0\" errors=\"0\"><testcase name=\"t\"/></testsuite></testsuites>";
    assert_eq!(schema.validate(ok), Vec::<String>::new());
    for (bad, why) in [
        (
            "<testsuites><testsuite name=\"a\" tests=\"1\" errors=\"0\"/></testsuites>",
            "lacks required attribute failures",
        ),
        (
            "<testsuites><testcase name=\"t\"/></testsuites>",
            "do not match",
        ),
        (
            "<testsuites><testsuite name=\"a\" tests=\"1\" failures=\"0\" errors=\"0\"><testcase name=\"t\" colour=\"red\"/></testsuite></testsuites>",
            "undeclared attribute colour",
        ),
        (
            "<testsuites time=\"1.2.3\"/>",
            "does not match",
        ),
        (
            "<testsuites><testsuite name=\"a\" tests=\"1\" failures=\"0\" errors=\"0\"><testcase name=\"t\"><verdict/></testcase></testsuite></testsuites>",
            "not declared",
        ),
    ] {
        let errors = schema.validate(bad);
        assert!(errors.iter().any(|e| e.contains(why)), "{bad}: {errors:?}");
    }
}

// ---- HTML and table ----

#[test]
fn html_names_the_run_explains_itself_and_highlights_failures() {
    let h = report::html(&failing());
    // To look at the page (e.g. in a headless browser): ZC_HTML_OUT=page.html.
    if let Some(path) = std::env::var_os("ZC_HTML_OUT") {
        std::fs::write(path, &h).unwrap();
    }
    assert!(h.starts_with("<!DOCTYPE html>"));
    for external in ["<script", "src=", "http:", "https:", "url("] {
        assert!(!h.contains(external), "{external}");
    }
    for needle in [
        "6.1.0-57-cloud-amd64 (linux-image-6.1.0-57-cloud-amd64 6.1.192-3)",
        "2026-12-01T09:35:16Z",
        "<dt>host mode</dt><dd>emulated</dd>",
        "<dt>transport</dt><dd>mmio</dd>",
        "32768 bytes per method",
        "<dt>chunk</dt><dd>16384 bytes</dd>",
        "measured inside an emulated KVM host",
        "Zero-copy share",
        "CPU copies per byte",
        "<tr class=\"FAILROW\">",
        "Boot sg-off failed:",
        "<a href=\"sg-on.dma-log.jsonl\">",
        "<a href=\"sg-off.pcap\">",
        "<dt>cow_zerocopy</dt>",
        "<dt>zero-copy %</dt>",
    ] {
        assert!(h.contains(needle), "{needle}");
    }
    assert_eq!(h.matches("<svg").count(), 3);
    assert_eq!(h.matches("<tr class=\"FAILROW\">").count(), 3);
    assert!(h.contains("Exec format error"));
    let pass = report::html(&passing());
    assert!(!pass.contains("<tr class=\"FAILROW\">"));
}

#[test]
fn the_table_says_why_a_boot_failed_and_what_the_driver_refused() {
    let mut v = failing();
    v.context.variants[0].nic_features = Some(Negotiated {
        offered: vec!["CSUM".into(), "VERSION_1".into()],
        acked: Some(vec!["VERSION_1".into()]),
        unused: Vec::new(),
    });
    let t = report::table(&v);
    assert!(
        t.contains(&format!("boot failed: sg-off: {GUEST_ERROR}")),
        "{t}"
    );
    let row = t.lines().find(|l| l.starts_with("read_write")).unwrap();
    assert!(
        row.contains("sg-on (offered; driver refused CSUM)"),
        "{row}"
    );
    assert!(row.ends_with("PASS"), "{row}");
    let k = report::ktap(&v);
    assert!(
        k.contains("  # sg-on: ran as sg-on (offered; driver refused CSUM)"),
        "{k}"
    );
    assert!(report::html(&v).contains("sg-on (offered; driver refused CSUM)"));
    // Acked but never used (`virtio_net.csum=0`): also not an sg-on row.
    v.context.variants[0].nic_features = Some(Negotiated {
        offered: vec!["CSUM".into(), "VERSION_1".into()],
        acked: Some(vec!["CSUM".into(), "VERSION_1".into()]),
        unused: vec!["CSUM".into()],
    });
    let t = report::table(&v);
    assert!(
        t.contains("sg-on (offered; driver acked CSUM but never used it)"),
        "{t}"
    );
    // A card no driver ever negotiated with ran nothing: no claim either way.
    v.context.variants[0].nic_features = Some(Negotiated {
        offered: vec!["CSUM".into(), "VERSION_1".into()],
        acked: None,
        unused: Vec::new(),
    });
    assert_eq!(v.variant_label("sg-on"), "sg-on");
}

/// A receive row beside the send rows: `passing()`'s read_write audit retold as
/// `recv_write` (the reports render what they are given; the receive analysis is
/// tested in `receive.rs`).
fn with_a_receive_row() -> Verdicts {
    let mut v = passing();
    let mut r = one("read_write", "sg-on");
    r.method = "recv_write".into();
    r.direction = zc_protocol::Direction::Receive;
    r.receive = Some(zc_audit::ReceiveFigures {
        nic_rx_payload_bytes: 32768,
        disk_out_bytes: 36864,
        disk_payload_bytes: 32768,
        disk_file_bytes: 32768,
        disk_zero_copy_bytes: 0,
        disk_copied_bytes: 32768,
        cpu_copied_seen_by_disk: 0,
        flushed: true,
        test_disk_bytes: 0,
    });
    v.methods.insert(1, r);
    v
}

#[test]
fn every_report_says_each_rows_direction() {
    let v = with_a_receive_row();
    let t = report::table(&v);
    let header = t.lines().next().unwrap();
    assert!(header.starts_with("method  "), "{t}");
    assert!(header.contains("  direction  "), "{t}");
    let row = |m: &str| t.lines().find(|l| l.starts_with(m)).unwrap().to_string();
    assert!(row("recv_write").contains(" receive "), "{t}");
    assert!(row("sendfile ").contains(" send "), "{t}");

    let k = report::ktap(&v);
    let diag = |m: &str| {
        k.lines()
            .find(|l| l.starts_with(&format!("  # {m}: direction=")))
            .unwrap_or_else(|| panic!("no diagnostic line for {m}:\n{k}"))
            .to_string()
    };
    assert!(diag("recv_write").starts_with("  # recv_write: direction=receive cpu_copies="));
    assert!(diag("recv_write").contains(" disk_file_bytes=32768 flushed=true bytes="));
    assert!(diag("read_write").starts_with("  # read_write: direction=send cpu_copies="));
    assert!(!diag("read_write").contains("flushed="));

    let doc: serde_json::Value = serde_json::from_str(&report::json(&v)).unwrap();
    let methods = doc["methods"].as_array().unwrap();
    assert_eq!(methods[0]["direction"], "send");
    assert!(methods[0].get("receive").is_none());
    assert_eq!(methods[1]["direction"], "receive");
    assert_eq!(methods[1]["receive"]["disk_out_bytes"], 36864);
    let schema = validator(&manifest().join("../docs/schemas/zc-audit-2.schema.json"));
    assert_eq!(errors(&schema, &doc), Vec::<String>::new());
    // A receive row must carry its figures, a send row must not.
    let mut bad = doc.clone();
    bad["methods"][1].as_object_mut().unwrap().remove("receive");
    assert!(!errors(&schema, &bad).is_empty());
    let mut bad = doc;
    bad["methods"][0]["receive"] = bad["methods"][1]["receive"].clone();
    assert!(!errors(&schema, &bad).is_empty());

    let xml = report::junit(&v);
    assert!(xml.contains("<system-out>direction=receive "), "{xml}");
    let kcidb: serde_json::Value =
        serde_json::from_str(&report::kcidb(&v, &report::KcidbIds::standalone(&v))).unwrap();
    let test = kcidb["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["path"] == "zc.sg-on.recv_write")
        .unwrap();
    assert_eq!(test["misc"]["direction"], "receive");
    assert_eq!(test["misc"]["receive"]["flushed"], true);

    let h = report::html(&v);
    assert!(
        h.contains("<td class=\"l\">receive</td>"),
        "no direction cell"
    );
    assert!(h.contains("<td class=\"l\">send</td>"));
    // The receive row's disk column is the scratch disk's OUT bytes.
    assert!(h.contains("<td>36864</td>"));
}
