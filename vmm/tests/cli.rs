//! `zc-vmm` as a user runs it, without booting anything: bad input stops before any
//! boot with one line and exit 2; `zc-vmm audit` re-judges a saved run (built here
//! from the audit's recorded logs) and writes every report; `compare` fails on a
//! FAIL, a failed boot or a missing row.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use zc_devices::control::ControlMessage;
use zc_protocol::options::{Options, Suite, SuiteCard, TestHook};
use zc_protocol::Method;
use zc_vmm::boot::KernelFormat;
use zc_vmm::host::HostMode;
use zc_vmm::report::{RunReport, RunSummary, StopReason, TimedMessage};
use zc_vmm::spec::{DiskSpec, NicSpec, RunSpec};

fn zc_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .args(args)
        .output()
        .expect("zc-vmm runs")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn audit_data(name: &str) -> PathBuf {
    workspace().join("audit/tests/data").join(name)
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_kernel_that_is_not_one_stops_methods_before_any_boot() {
    let out = tempfile::tempdir().unwrap();
    let passwd = "/etc/passwd";
    let o = zc_vmm(&[
        "methods",
        "--kernel",
        passwd,
        "--initrd",
        passwd,
        "--disk",
        passwd,
        "--payload",
        passwd,
        "--expected",
        workspace().join("audit/expected.toml").to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("/etc/passwd is neither a bzImage nor an ELF vmlinux"),
        "{lines:?}"
    );
    // Nothing booted: no spec, console or log was written.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn a_host_with_no_kvm_and_no_qemu_is_a_kselftest_skip() {
    let dir = tempfile::tempdir().unwrap();
    // Enough of a bzImage for the format check: the setup header's magic at 0x202.
    let mut kernel = vec![0u8; 0x400];
    kernel[0x202..0x206].copy_from_slice(b"HdrS");
    let kernel_path = dir.path().join("bzImage");
    std::fs::write(&kernel_path, kernel).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, vec![1u8; 8192]).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .args(["methods", "--kernel"])
        .arg(&kernel_path)
        .args([
            "--initrd",
            file.to_str().unwrap(),
            "--disk",
            file.to_str().unwrap(),
        ])
        .args([
            "--payload",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .arg("--expected")
        .arg(workspace().join("audit/expected.toml"))
        .env("ZC_HOST", "emulated")
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.starts_with("KTAP version 1\n1..0 # SKIP "),
        "{stdout}"
    );
    assert!(stdout.contains("qemu-system-x86_64 not found"), "{stdout}");
    assert!(!out.exists(), "nothing booted, nothing written");
}

#[test]
fn a_directory_as_the_kernel_is_called_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["run", "methods"] {
        let o = zc_vmm(&[cmd, "--kernel", dir.path().to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {o:?}");
        let lines = stderr_lines(&o);
        assert_eq!(lines.len(), 1, "{cmd}: {lines:?}");
        assert!(lines[0].contains("is a directory"), "{cmd}: {lines:?}");
    }
}

#[test]
fn a_seccomp_switch_other_than_on_or_off_stops_before_any_boot() {
    for command in ["run", "methods"] {
        let o = Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
            .args([command, "--kernel", "/etc/passwd"])
            .env(zc_seccomp::ENV, "maybe")
            .output()
            .expect("zc-vmm runs");
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert_eq!(
            stderr_lines(&o),
            ["zc-vmm: error: ZC_SECCOMP=\"maybe\": use on or off"],
            "{command}"
        );
    }
}

#[test]
fn zero_memory_is_refused_while_parsing() {
    let o = zc_vmm(&["run", "--kernel", "/etc/passwd", "--mem", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("0 is too small: at least 64M"));
}

/// A saved `methods` run: one boot with one card per `(variant, methods, scenario)`,
/// the spec the boot would have had and, when it `finished`, its DMA log and run
/// report, made from the audit's recorded scenarios (32 KiB of `source.bin` in
/// 16 KiB chunks): card `n`'s scenario log with its spans named `<method>@<variant>`
/// and its net records `card: n`, one after the other, as the guest runs the cards
/// in turn, written as the suite writes it (`suite.dma-log.jsonl.zst`, schema
/// `zc-dma-log/2`). A boot that did not finish left only its spec.
fn saved_run(dir: &Path, cards: &[(&str, &[&str], &str)], finished: bool) {
    use zc_dma_log::Record;
    let options = Options {
        tests: vec![TestHook::Methods],
        disk_read_only: true,
        suite: Suite {
            cards: cards
                .iter()
                .map(|(variant, methods, _)| SuiteCard {
                    variant: variant.to_string(),
                    methods: methods
                        .iter()
                        .map(|m| m.parse::<Method>().unwrap())
                        .collect(),
                })
                .collect(),
            size: Some(32768),
            chunk: 16384,
            ..Suite::default()
        },
        ..Options::default()
    };
    let spec = RunSpec {
        append: Some(options.to_cmdline()),
        disk: Some(DiskSpec {
            path: "/nowhere/disk.img".into(),
            read_only: true,
        }),
        nics: cards
            .iter()
            .map(|(variant, methods, _)| NicSpec {
                sg: *variant == "sg-on",
                peer_expect: vec![audit_data("source.bin"); methods.len()],
                peer_expect_bytes: Some(32768),
                ..NicSpec::peer()
            })
            .collect(),
        ..RunSpec::new("/nowhere/vmlinuz")
    };
    spec.save(&dir.join("suite.spec.json")).unwrap();
    if !finished {
        return;
    }
    let mut log = Vec::new();
    let mut messages = Vec::new();
    let mut seq = 0;
    for (card, (variant, _, scenario)) in (0u16..).zip(cards) {
        let records = zc_dma_log::read_log(&audit_data(&format!("{scenario}.dma.jsonl"))).unwrap();
        for mut record in records {
            let t_ns = 1_000_000 * seq;
            match &mut record {
                Record::Marker(m) => {
                    let marker = zc_protocol::Marker::parse(&m.label).unwrap();
                    let span =
                        zc_protocol::marker::qualified_span(marker.span().as_str(), Some(variant));
                    m.label = match marker {
                        zc_protocol::Marker::Begin(_) => zc_protocol::Marker::begin(span.as_str()),
                        zc_protocol::Marker::End(_) => zc_protocol::Marker::end(span.as_str()),
                    }
                    .label();
                    (m.seq, m.t_ns) = (seq, t_ns);
                }
                Record::Desc(d) => {
                    if d.device == zc_dma_log::DeviceKind::Net {
                        d.card = card;
                    }
                    (d.seq, d.t_ns) = (seq, t_ns);
                }
                Record::Request(r) => {
                    if r.device == zc_dma_log::DeviceKind::Net {
                        r.card = card;
                    }
                    (r.seq, r.t_ns) = (seq, t_ns);
                }
                Record::Dirty(d) => (d.seq, d.t_ns) = (seq, t_ns),
                Record::DeviceError(e) => (e.seq, e.t_ns) = (seq, t_ns),
                Record::Header(_) => continue,
            }
            seq += 1;
            log.push(record);
        }
        let reports =
            std::fs::read_to_string(audit_data(&format!("{scenario}.reports.jsonl"))).unwrap();
        for json in reports.lines() {
            let mut report: serde_json::Value = serde_json::from_str(json).unwrap();
            report["variant"] = serde_json::json!(variant);
            messages.push(TimedMessage {
                at: Duration::from_secs(1),
                message: ControlMessage::Report {
                    json: report.to_string(),
                },
            });
        }
    }
    let file = std::fs::File::create(dir.join("suite.dma-log.jsonl.zst")).unwrap();
    let mut w = zc_dma_log::RecordWriter::new(zstd::Encoder::new(file, 1).unwrap(), 0).unwrap();
    for record in &log {
        w.write(record).unwrap();
    }
    w.finish().unwrap().finish().unwrap();
    let mut run = RunReport::new(KernelFormat::BzImage);
    run.stop = StopReason::PowerOff;
    run.guest_exit = Some(0);
    run.kernel_release = Some("6.1.0-57-cloud-amd64".into());
    run.messages = messages;
    RunSummary::new(run, Path::new("/nowhere/vmlinuz"), HostMode::Direct, true)
        .save(&dir.join("suite.run.json"))
        .unwrap();
}

fn verdicts(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("verdicts.json")).unwrap()).unwrap()
}

/// Replaces a saved run's `suite.dma-log.jsonl.zst` with the same records as a
/// plain `suite.dma-log.jsonl` of schema `zc-dma-log/1`, as a run before the suite
/// compressed its log wrote it.
fn log_as_plain_v1(dir: &Path) {
    let packed = dir.join("suite.dma-log.jsonl.zst");
    let mut text = format!(
        "{{\"type\":\"header\",\"schema\":\"{}\",\"start_unix_ns\":0}}\n",
        zc_dma_log::SCHEMA_V1
    );
    for record in zc_dma_log::read_log(&packed).unwrap() {
        if !matches!(record, zc_dma_log::Record::Header(_)) {
            text.push_str(&serde_json::to_string(&record).unwrap());
            text.push('\n');
        }
    }
    std::fs::remove_file(&packed).unwrap();
    std::fs::write(dir.join("suite.dma-log.jsonl"), text).unwrap();
}

/// The two-card log of a saved run, compressed `/2` as the suite writes it now or
/// plain `/1` as an older run did: `zc-vmm audit` reads either and gives each card's
/// methods the same verdicts and figures.
#[test]
fn audit_gives_a_two_card_run_the_same_verdicts_from_either_schema() {
    let (packed, plain) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cards: &[(&str, &[&str], &str)] = &[
        ("sg-on", &["sendfile"], "sendfile_sg_on"),
        ("sg-off", &["sendfile"], "sendfile_sg_off"),
    ];
    saved_run(packed.path(), cards, true);
    saved_run(plain.path(), cards, true);
    log_as_plain_v1(plain.path());
    let text = std::fs::read_to_string(plain.path().join("suite.dma-log.jsonl")).unwrap();
    assert!(text.contains("\"device\":\"net\",\"card\":1,"));
    let expected = workspace().join("audit/expected.toml");
    let mut methods = Vec::new();
    for (dir, log) in [
        (&packed, "suite.dma-log.jsonl.zst"),
        (&plain, "suite.dma-log.jsonl"),
    ] {
        let d = dir.path().to_str().unwrap();
        let o = zc_vmm(&["audit", d, "--expected", expected.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{log}: {o:?}");
        let v = verdicts(dir.path());
        assert_eq!(v["totals"]["pass"], 2, "{log}: {v}");
        assert_eq!(v["context"]["variants"][1]["files"][0]["path"], log, "{v}");
        methods.push(v["methods"].clone());
    }
    assert_eq!(methods[0], methods[1]);
}

#[test]
fn audit_rejudges_a_saved_run_against_an_edited_table() {
    let dir = tempfile::tempdir().unwrap();
    saved_run(
        dir.path(),
        &[
            ("sg-on", &["sendfile"], "sendfile_sg_on"),
            ("sg-off", &["sendfile"], "sendfile_sg_off"),
        ],
        true,
    );
    let expected = workspace().join("audit/expected.toml");
    let d = dir.path().to_str().unwrap();
    let o = zc_vmm(&["audit", d, "--expected", expected.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.starts_with("KTAP version 1\n"), "{stdout}");
    assert!(
        stdout.ends_with("# Totals: pass:2 fail:0 xfail:0 xpass:0 skip:0 error:0\n"),
        "{stdout}"
    );
    for f in [
        "verdicts.ktap",
        "verdicts.json",
        "report.html",
        "junit.xml",
        "kcidb.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    let v = verdicts(dir.path());
    assert_eq!(v["schema"], "zc-audit/2");
    assert_eq!(v["context"]["kernel_release"], "6.1.0-57-cloud-amd64");
    assert_eq!(v["context"]["host_mode"], "emulated");
    assert_eq!(v["context"]["size"], 32768);
    assert_eq!(v["context"]["chunk"], 16384);
    let log = &v["context"]["variants"][0]["files"][0];
    assert_eq!(log["kind"], "dma-log");
    assert_eq!(log["sha256"].as_str().unwrap().len(), 64);

    // The user edits the table: sendfile with scatter-gather should now copy once.
    let table = std::fs::read_to_string(&expected).unwrap();
    let start = table.find("[sendfile.sg-on]").unwrap();
    let end = start + table[start..].find("\n[").unwrap();
    let edited = format!(
        "{}[sendfile.sg-on]\nsyscalls_per_chunk = 1\ndma_copies = 2\ncpu_copies = 1.0\n{}",
        &table[..start],
        &table[end + 1..]
    );
    let edited_path = dir.path().join("edited.toml");
    std::fs::write(&edited_path, edited).unwrap();
    let o = zc_vmm(&["audit", d, "--expected", edited_path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v = verdicts(dir.path());
    assert_eq!(v["methods"][0]["verdict"], "FAIL");
    assert_eq!(v["methods"][1]["verdict"], "PASS");
}

#[test]
fn a_boot_that_never_finished_gives_every_method_a_fail_row_and_compare_fails() {
    let dir = tempfile::tempdir().unwrap();
    saved_run(
        dir.path(),
        &[
            ("sg-on", &["sendfile"], "sendfile_sg_on"),
            ("sg-off", &["sendfile", "mmap_zerocopy"], "sendfile_sg_off"),
        ],
        false,
    );
    let d = dir.path().to_str().unwrap();
    let expected = workspace().join("audit/expected.toml");
    let o = zc_vmm(&["audit", d, "--expected", expected.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let ktap = String::from_utf8_lossy(&o.stdout);
    assert!(
        ktap.contains("not ok 2 sg-off # the boot left no run report (it did not finish)"),
        "{ktap}"
    );
    assert!(
        ktap.contains("  not ok 2 mmap_zerocopy # the boot left no run report"),
        "{ktap}"
    );
    // One boot carries both cards: every method of both variants fails.
    assert!(
        ktap.contains("not ok 1 sg-on # the boot left no run report (it did not finish)"),
        "{ktap}"
    );
    let v = verdicts(dir.path());
    let methods = v["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    assert_eq!(v["totals"]["fail"], 3);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.contains("Boot sg-off failed:"));
    let junit = std::fs::read_to_string(dir.path().join("junit.xml")).unwrap();
    assert!(junit.contains("<failure type=\"verdict\" message=\"the boot left no run report"));

    let o = zc_vmm(&["compare", d]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}

/// A boot whose DMA log could not be written to its end (the run says so) or ends
/// inside a line claims no PASS: each of its methods, on every card, FAILs with the
/// reason first, and the audit exits 1. With the log intact, the same boot PASSes
/// (see `audit_rejudges_a_saved_run_against_an_edited_table`).
#[rstest::rstest]
#[case::the_disk_filled_up(true)]
#[case::the_log_ends_inside_a_line(false)]
fn a_boot_whose_dma_log_is_incomplete_claims_no_pass(#[case] full_disk: bool) {
    let dir = tempfile::tempdir().unwrap();
    saved_run(
        dir.path(),
        &[
            ("sg-on", &["sendfile"], "sendfile_sg_on"),
            ("sg-off", &["sendfile"], "sendfile_sg_off"),
        ],
        true,
    );
    let full = "the DMA log /o/suite.dma-log.jsonl.zst could not be written: No space left on device (os error 28); free space or pass --dma-log elsewhere";
    if full_disk {
        // The writer hit a full disk; the log on disk still reads cleanly (the
        // failed write was the last one).
        let run_json = dir.path().join("suite.run.json");
        let mut summary = RunSummary::load(&run_json).unwrap();
        summary.run.dma_log_failure = Some(full.into());
        summary.failure = summary.run.failure();
        summary.exit_status = summary.run.exit_status();
        summary.save(&run_json).unwrap();
    } else {
        // A VMM killed mid-write, a full disk without the run's word for it.
        let log = dir.path().join("suite.dma-log.jsonl.zst");
        let text = std::fs::read(&log).unwrap();
        std::fs::write(&log, &text[..text.len() - 10]).unwrap();
    }

    let d = dir.path().to_str().unwrap();
    let expected = workspace().join("audit/expected.toml");
    let o = zc_vmm(&["audit", d, "--expected", expected.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v = verdicts(dir.path());
    let methods = v["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    assert_eq!(v["totals"]["pass"], 0, "{v}");
    for m in methods {
        assert_eq!(m["verdict"], "FAIL", "{m}");
        let reason = m["reasons"][0].as_str().unwrap();
        if full_disk {
            assert!(reason.starts_with(full), "{reason}");
        } else {
            assert!(reason.contains("is cut short"), "{reason}");
        }
    }
    if full_disk {
        let ktap = String::from_utf8_lossy(&o.stdout);
        assert!(ktap.contains("No space left on device"), "{ktap}");
    }
}

#[test]
fn compare_fails_on_a_row_one_run_lacks() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    saved_run(
        a.path(),
        &[("sg-on", &["sendfile"], "sendfile_sg_on")],
        true,
    );
    saved_run(
        b.path(),
        &[("sg-off", &["sendfile"], "sendfile_sg_off")],
        true,
    );
    let expected = workspace().join("audit/expected.toml");
    for d in [&a, &b] {
        let o = zc_vmm(&[
            "audit",
            d.path().to_str().unwrap(),
            "--expected",
            expected.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
    }
    let only_a = zc_vmm(&["compare", a.path().to_str().unwrap()]);
    assert_eq!(only_a.status.code(), Some(0), "{only_a:?}");
    let both = zc_vmm(&[
        "compare",
        a.path().to_str().unwrap(),
        b.path().to_str().unwrap(),
    ]);
    assert_eq!(both.status.code(), Some(1), "{both:?}");
    assert!(String::from_utf8_lossy(&both.stdout).contains("not run"));
}

#[test]
fn methods_append_is_checked_before_any_boot() {
    let dir = tempfile::tempdir().unwrap();
    // Enough of a bzImage for the format check: the setup header's magic at 0x202.
    let mut kernel = vec![0u8; 0x400];
    kernel[0x202..0x206].copy_from_slice(b"HdrS");
    let kernel_path = dir.path().join("bzImage");
    std::fs::write(&kernel_path, kernel).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, vec![1u8; 8192]).unwrap();
    let out = dir.path().join("out");
    let expected = workspace().join("audit/expected.toml");
    let too_long = "x".repeat(2100);
    for (append, needle) in [
        (
            "zc.size=4096",
            "the suite sets the guest program's zc.* options itself",
        ),
        ("quiet\nzc.exit=3", "on one line"),
        (" ", "--append is empty"),
        (
            too_long.as_str(),
            "x86 takes at most 2047: shorten --append",
        ),
    ] {
        let o = zc_vmm(&[
            "methods",
            "--kernel",
            kernel_path.to_str().unwrap(),
            "--initrd",
            file.to_str().unwrap(),
            "--disk",
            file.to_str().unwrap(),
            "--payload",
            file.to_str().unwrap(),
            "--expected",
            expected.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--append",
            append,
        ]);
        assert_eq!(o.status.code(), Some(2), "{append:?}: {o:?}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(needle), "{append:?}: {stderr}");
        assert!(!out.exists(), "{append:?}: nothing booted, nothing written");
    }
}
