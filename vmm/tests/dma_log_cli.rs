//! `zc-vmm dma-log` as a user runs it: exit statuses, JSON output, cut and
//! compressed logs (on the audit's recorded logs; no VM).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../audit/tests/data")
        .join(name)
}

fn zc_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .arg("dma-log")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn grep_exits_1_on_no_match_and_prints_json_lines() {
    let log = data("sendfile_sg_on.dma.jsonl");
    let log = log.to_str().unwrap();
    let none = zc_vmm(&["grep", "no-such-text", log]);
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert!(none.stdout.is_empty());

    let some = zc_vmm(&["grep", "--json", "END sendfile", log]);
    assert_eq!(some.status.code(), Some(0), "{some:?}");
    let lines: Vec<serde_json::Value> = stdout(&some)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["label"], "END sendfile");
    assert_eq!(lines[0]["seq"], 136);

    let text = zc_vmm(&["grep", "\"sector\":32", log]);
    assert_eq!(text.status.code(), Some(0));
    assert!(stdout(&text).contains("in sector 32"), "{}", stdout(&text));
}

#[test]
fn a_cut_log_shows_its_complete_records_and_exits_3() {
    let text = std::fs::read(data("read_write.dma.jsonl")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.jsonl");
    let cut_at = text.len() / 3;
    std::fs::write(&cut, &text[..cut_at]).unwrap();
    let complete = text[..cut_at].iter().filter(|&&b| b == b'\n').count();
    let line_start = text[..cut_at].iter().rposition(|&b| b == b'\n').unwrap() + 1;

    let shown = zc_vmm(&["show", cut.to_str().unwrap()]);
    assert_eq!(shown.status.code(), Some(3), "{shown:?}");
    // The header is not shown: every complete record is.
    assert_eq!(stdout(&shown).lines().count(), complete - 1);
    let err = String::from_utf8(shown.stderr).unwrap();
    assert!(
        err.contains(&format!(
            "cut short at line {} (byte {line_start}",
            complete + 1
        )),
        "{err}"
    );
    let stats = zc_vmm(&["stats", cut.to_str().unwrap()]);
    assert_eq!(stats.status.code(), Some(3));
}

#[test]
fn compressed_logs_read_like_plain_ones() {
    let plain = data("sendfile_sg_on.dma.jsonl");
    let dir = tempfile::tempdir().unwrap();
    // Named like a plain log: the magic number decides.
    let packed = dir.path().join("renamed.jsonl");
    let bytes = std::fs::read(&plain).unwrap();
    std::fs::write(&packed, zstd::encode_all(&bytes[..], 1).unwrap()).unwrap();
    for cmd in ["stats", "show"] {
        let a = zc_vmm(&[cmd, plain.to_str().unwrap()]);
        let b = zc_vmm(&[cmd, packed.to_str().unwrap()]);
        assert_eq!(a.status.code(), Some(0));
        assert_eq!(stdout(&a), stdout(&b), "{cmd}");
    }
}

#[test]
fn trace_answers_in_one_command_and_refuses_bad_input() {
    let log = data("sendfile_sg_on.dma.jsonl");
    let source = data("source.bin");
    let out = zc_vmm(&[
        "trace",
        log.to_str().unwrap(),
        "--method",
        "sendfile",
        "--file-off",
        "4K",
        "--len",
        "0x1000",
        "--source",
        source.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pieces = t["pieces"].as_array().unwrap();
    let sum: u64 = pieces.iter().map(|p| p["len"].as_u64().unwrap()).sum();
    assert_eq!(sum, 4096);
    assert!(pieces.iter().all(|p| p["origin"] == "zero_copy"));
    assert_eq!(pieces[0]["last_write"]["request"]["page_sector"], 8);

    let no_span = zc_vmm(&[
        "trace",
        log.to_str().unwrap(),
        "--method",
        "splice",
        "--file-off",
        "0",
        "--len",
        "1",
    ]);
    assert_eq!(no_span.status.code(), Some(2));
    assert!(String::from_utf8(no_span.stderr)
        .unwrap()
        .contains("no marker `BEGIN splice`"));
    let bad = zc_vmm(&["stats", "/no/such/log"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn both_schemas_give_the_same_answers() {
    let source = data("source.bin");
    let source = source.to_str().unwrap();
    for name in ["sendfile_sg_on", "read_write", "linear_reuse"] {
        let v1 = data(&format!("{name}.dma.jsonl"));
        let v2 = data(&format!("{name}.dma-v2.jsonl"));
        let (v1, v2) = (v1.to_str().unwrap(), v2.to_str().unwrap());
        // A fingerprint of a NIC read: one `/2` line holds the frame's records.
        let shown = stdout(&zc_vmm(&["show", v1]));
        assert!(shown.lines().count() > 50, "{name}: {shown}");
        let v1_text = std::fs::read_to_string(v1).unwrap();
        let hash = v1_text
            .lines()
            .find(|l| l.contains("\"device\":\"net\"") && l.contains("\"role\":\"data\""))
            .and_then(|l| l.split("\"hash\":\"").nth(1))
            .map(|h| h[..16].to_string())
            .unwrap();
        let method = v1_text
            .split("\"label\":\"BEGIN ")
            .nth(1)
            .and_then(|l| l.split('"').next())
            .unwrap();
        for args in [
            vec!["show", v1],
            vec!["stats", v1],
            vec!["stats", v1, "--device", "net", "--span", method],
            vec!["grep", "--json", &hash, v1],
            vec!["grep", "\"device\":\"blk\"", v1],
            vec![
                "trace",
                v1,
                "--method",
                method,
                "--file-off",
                "0",
                "--len",
                "32K",
                "--source",
                source,
                "--json",
            ],
        ] {
            let a = zc_vmm(&args);
            let args2: Vec<&str> = args.iter().map(|&a| if a == v1 { v2 } else { a }).collect();
            let b = zc_vmm(&args2);
            assert_eq!(a.status.code(), b.status.code(), "{name} {args:?}");
            assert!(!a.stdout.is_empty(), "{name} {args:?}: {a:?}");
            assert_eq!(stdout(&a), stdout(&b), "{name} {args:?}");
        }
    }
}
