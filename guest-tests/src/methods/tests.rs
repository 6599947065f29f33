//! The suite against a local TCP peer on 127.0.0.1 that behaves like the VMM's:
//! per connection it reads `size` bytes, checks them against the file, and sends
//! the 8-byte little-endian count. Marks, samples, reports and console lines go to
//! a recorder instead of the control channel and port 0x610.
//!
//! On loopback, MSG_ZEROCOPY (and io_uring SEND_ZC) always end up copied: the
//! receiver cannot keep references to the sender's pages. So every zero-copy
//! completion must carry the kernel's "copied" flag here, which checks the copied
//! counters against a known answer.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::pattern;
use zc_protocol::Marker;

#[path = "../../../audit/tests/support/kunit.rs"]
mod kunit;

mod receive;

#[derive(Debug, Clone, PartialEq)]
enum Event {
    DropCaches,
    Mark(String),
    Sample(u32),
    Report(String),
    Console(String),
    Optmem(u64),
}

struct Recorder {
    events: Vec<Event>,
    /// What `net.core.optmem_max` would be: only recorded, never the host's.
    optmem: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            events: Vec::new(),
            optmem: 20480,
        }
    }
}

impl Hooks for Recorder {
    fn drop_caches(&mut self) -> Result<()> {
        // Unprivileged tests cannot drop caches; the order of calls is what counts.
        self.events.push(Event::DropCaches);
        Ok(())
    }
    fn mark(&mut self, label: &str) -> Result<()> {
        self.events.push(Event::Mark(label.to_string()));
        Ok(())
    }
    fn sample(&mut self, chunk: u32) {
        self.events.push(Event::Sample(chunk));
    }
    fn report(&mut self, json: &str) -> Result<()> {
        self.events.push(Event::Report(json.to_string()));
        Ok(())
    }
    fn console(&mut self, line: &str) {
        self.events.push(Event::Console(line.to_string()));
    }
    fn set_optmem_max(&mut self, bytes: u64) -> Result<u64> {
        // A test must not starve the host's sockets: MSG_ZEROCOPY then works on
        // loopback, and zerocopy_pressure's fallback is not exercised here.
        self.events.push(Event::Optmem(bytes));
        Ok(std::mem::replace(&mut self.optmem, bytes))
    }
}

impl Recorder {
    fn reports(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Report(json) => Some(serde_json::from_str(json).expect(json)),
                _ => None,
            })
            .collect()
    }

    fn console(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Console(line) => Some(line.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The console's KTAP after the header and plan, as tests: each result line with the
/// diagnostic lines before it.
fn ktap_tests(lines: &[String]) -> Vec<(Vec<String>, String)> {
    let mut tests = Vec::new();
    let mut diagnostics = Vec::new();
    for line in lines {
        if line.starts_with('#') {
            diagnostics.push(line.clone());
        } else {
            assert!(
                line.starts_with("ok ") || line.starts_with("not ok "),
                "neither a diagnostic nor a result line: {line}"
            );
            tests.push((std::mem::take(&mut diagnostics), line.clone()));
        }
    }
    assert!(diagnostics.is_empty(), "diagnostics after the last result");
    tests
}

/// What `kunit.py parse` makes of the console's lines: (ran, passed, failed,
/// skipped), and its whole output; `None` (said on stdout) when it cannot run.
fn kunit_parse(console: &[String]) -> Option<((u32, u32, u32, u32), String)> {
    let py = match kunit::kunit_py() {
        Ok(py) => py,
        Err(why) => {
            println!("SKIPPED: the kunit.py check: {why}");
            return None;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("console.ktap");
    std::fs::write(&file, console.join("\n") + "\n").unwrap();
    let out = std::process::Command::new("python3")
        .arg(&py)
        .arg("parse")
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("[ERROR]"), "kunit.py found errors:\n{text}");
    let summary = text
        .lines()
        .find(|l| l.contains("Testing complete."))
        .unwrap_or_else(|| panic!("kunit.py printed no summary:\n{text}"));
    let count = |key: &str| -> u32 {
        summary.split(key).nth(1).map_or(0, |rest| {
            rest.trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        })
    };
    Some((
        (
            count("Ran "),
            count("passed:"),
            count("failed:"),
            count("skipped:"),
        ),
        text,
    ))
}

/// What the peer saw on one connection.
#[derive(Debug)]
struct Received {
    bytes: usize,
    matched: bool,
}

/// The peer: accepts connections forever (the thread is left blocked in accept
/// when the test ends), answers each like the VMM, reports what it saw.
/// `ack_offset` is added to the count it acknowledges (to test a wrong ACK).
fn spawn_peer(expected: Vec<u8>, ack_offset: u64) -> (SocketAddrV4, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut got = vec![0u8; expected.len()];
            let mut n = 0;
            while n < got.len() {
                match conn.read(&mut got[n..]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let matched = n == expected.len() && got == expected;
            let ack = if matched { n as u64 + ack_offset } else { 0 };
            // Reported before the ACK: once the method has its ACK, the test can
            // read what the peer saw without waiting.
            if tx.send(Received { bytes: n, matched }).is_err() {
                return;
            }
            let _ = conn.write_all(&ack.to_le_bytes());
        }
    });
    (addr, rx)
}

/// The payload in `disk`, receive methods' files in `scratch`.
fn roots<'a>(disk: &'a Path, scratch: &'a Path) -> Roots<'a> {
    Roots { disk, scratch }
}

/// A peer that only receives: a receive method sent its way finds a closed port.
fn send_only(send_to: SocketAddrV4) -> Peer {
    Peer {
        send_to,
        receive_from: closed_port(),
    }
}

/// A closed local port: bound, then dropped.
fn closed_port() -> SocketAddrV4 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    match l.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        _ => unreachable!(),
    }
}

/// A payload file of `len` pattern bytes in a fresh directory.
fn payload(len: usize) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; len];
    pattern::fill(0, &mut data);
    std::fs::write(dir.path().join(DEFAULT_FILE), &data).unwrap();
    (dir, data)
}

/// Whether the directory's file system takes O_DIRECT (tmpfs did not before 6.6).
fn o_direct_works(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.join(DEFAULT_FILE))
        .is_ok()
}

/// A report's system calls by name add up to its loop's plus its setup's; returns
/// those two.
fn assert_split_adds_up(report: &Value, method: &str) -> (u64, u64) {
    let total: u64 = report["syscalls"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    let (lp, setup) = (
        report["loop_syscalls"].as_u64().unwrap(),
        report["setup_syscalls"].as_u64().unwrap(),
    );
    assert_eq!(lp + setup, total, "{method}: {report}");
    (lp, setup)
}

fn count(report: &Value, call: &str) -> u64 {
    report["syscalls"][call].as_u64().unwrap_or(0)
}

/// The events of one method: from its BEGIN mark to its report.
fn span<'a>(events: &'a [Event], method: &str) -> &'a [Event] {
    let begin = Event::Mark(Marker::begin(method).label());
    let start = events.iter().position(|e| *e == begin).expect("BEGIN");
    let end = start
        + events[start..]
            .iter()
            .position(|e| matches!(e, Event::Report(_)))
            .expect("report");
    &events[start..end]
}

/// Checks what every method that ran shares: the sequence of events, the peer's
/// view, and the report's common fields. Returns the report.
fn check_common(
    recorder: &Recorder,
    report: &Value,
    received: &Received,
    size: u64,
    chunk: u64,
) -> u64 {
    let method = report["method"].as_str().unwrap();
    assert_eq!(report["test"], "method");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["bytes"], size);
    assert_eq!(report["chunk"], chunk);
    let chunks = size.div_ceil(chunk);
    assert_eq!(report["chunks"], chunks);
    assert!(report["seconds"].as_f64().unwrap() > 0.0);
    assert!(
        received.matched && received.bytes as u64 == size,
        "{method}: {received:?}"
    );

    // BEGIN, one sample per chunk in order, END: nothing else between.
    let mut want = vec![Event::Mark(Marker::begin(method).label())];
    want.extend((0..u32::try_from(chunks).unwrap()).map(Event::Sample));
    want.push(Event::Mark(Marker::end(method).label()));
    // (zerocopy_pressure restores optmem_max after END, before its report.)
    let got: Vec<Event> = span(&recorder.events, method)
        .iter()
        .filter(|e| !matches!(e, Event::Optmem(_)))
        .cloned()
        .collect();
    assert_eq!(got, want, "{method}");

    // The split adds up, and connecting is setup.
    let (_, setup) = assert_split_adds_up(report, method);
    assert_eq!(count(report, "socket"), 1, "{method}");
    assert_eq!(count(report, "connect"), 1, "{method}");
    assert!(count(report, "recv") >= 1, "{method}");
    assert!(setup >= 5, "{method}: socket, 2 setsockopt, connect, recv");
    chunks
}

/// The zero-copy member on loopback: every send completed, every one copied.
fn check_loopback_zerocopy(report: &Value, chunks: u64) {
    let method = report["method"].as_str().unwrap();
    let zc = &report["zerocopy"];
    let sends = zc["sends"].as_u64().unwrap();
    assert!(sends >= chunks, "{method}: {zc}");
    assert_eq!(zc["completions"], sends, "{method}: {zc}");
    assert_eq!(
        zc["copied"], sends,
        "{method}: loopback always copies: {zc}"
    );
}

fn check_method(report: &Value, chunks: u64) {
    let method = report["method"].as_str().unwrap();
    let lp = report["loop_syscalls"].as_u64().unwrap();
    match Method::from_name(method).unwrap() {
        Method::RecvWrite
        | Method::RecvDirect
        | Method::SpliceRecv
        | Method::RecvMmap
        | Method::TcpZerocopyReceive => panic!("{method}: a receive method in the send suite"),
        Method::ReadWrite | Method::DirectWrite => {
            assert_eq!(count(report, "read"), chunks, "{method}");
            assert!(count(report, "write") >= chunks, "{method}");
            assert_eq!(lp, count(report, "read") + count(report, "write"));
            assert!(report.get("zerocopy").is_none());
        }
        Method::MmapWrite => {
            assert_eq!(count(report, "mmap"), 1);
            assert!(count(report, "write") >= chunks);
            assert_eq!(lp, count(report, "write"));
        }
        Method::Sendfile
        | Method::SendfileWarm
        | Method::SendfileTmpfs
        | Method::SendfileDirect => {
            assert!(count(report, "sendfile") >= chunks, "{method}");
            assert_eq!(lp, count(report, "sendfile"));
        }
        Method::Vmsplice => {
            assert_eq!((count(report, "pipe2"), count(report, "fcntl")), (1, 1));
            assert_eq!(count(report, "read"), chunks, "{method}");
            assert!(count(report, "vmsplice") >= chunks, "{method}");
            assert!(count(report, "splice") >= chunks, "{method}");
            assert_eq!(
                lp,
                count(report, "read") + count(report, "vmsplice") + count(report, "splice")
            );
        }
        Method::ZerocopyPressure => {
            // Unstarved on a test host (the recorder never touches optmem_max):
            // every send is a MSG_ZEROCOPY one, none falls back.
            assert_eq!(count(report, "mmap"), 1);
            assert!(count(report, "send") >= chunks);
            check_loopback_zerocopy(report, chunks);
            assert_eq!(report["zerocopy"]["fallbacks"], 0, "{report}");
        }
        Method::Splice | Method::SpliceDirect => {
            assert_eq!((count(report, "pipe2"), count(report, "fcntl")), (1, 1));
            assert!(count(report, "splice") >= 2 * chunks);
            assert_eq!(lp, count(report, "splice"));
        }
        Method::DirectZerocopy => {
            assert_eq!(count(report, "read"), chunks);
            // Per chunk at least: read, send, and a completion read.
            assert!(lp >= 3 * chunks, "{report}");
            check_loopback_zerocopy(report, chunks);
            assert_eq!(count(report, "setsockopt"), 3, "timeouts and SO_ZEROCOPY");
        }
        Method::MmapZerocopy | Method::CowZerocopy => {
            assert_eq!(count(report, "mmap"), 1);
            assert!(count(report, "send") >= chunks);
            check_loopback_zerocopy(report, chunks);
            assert_eq!(count(report, "setsockopt"), 3, "timeouts and SO_ZEROCOPY");
        }
        Method::UringSendZc => {
            assert_eq!(count(report, "io_uring_setup"), 1);
            // Batched: one enter per batch of 16 in the common case, never one per
            // chunk (loopback always completes inline).
            assert_eq!(lp, count(report, "io_uring_enter") - setup_enters(report));
            assert!(lp < chunks, "{report}");
            let zc = &report["zerocopy"];
            assert_eq!(zc["sends"], chunks, "{zc}");
            assert_eq!(zc["completions"], chunks, "{zc}");
            // Null only on kernels before 6.2 (no IORING_SEND_ZC_REPORT_USAGE).
            assert!(zc["copied"] == chunks || zc["copied"].is_null(), "{zc}");
        }
    }
}

/// io_uring_enter calls outside the loop (the final notification wait).
fn setup_enters(report: &Value) -> u64 {
    report["setup_syscalls"].as_u64().unwrap()
        - [
            "socket",
            "setsockopt",
            "connect",
            "recv",
            "mmap",
            "io_uring_setup",
        ]
        .iter()
        .map(|c| count(report, c))
        .sum::<u64>()
}

/// Runs `suite` against a fresh peer; returns the recorder, the suite's result and
/// what the peer saw, in order.
fn run(
    suite: &Suite,
    dir: &Path,
    expected: &[u8],
    ack_offset: u64,
) -> (Recorder, bool, Vec<Received>) {
    let (peer, seen) = spawn_peer(expected.to_vec(), ack_offset);
    let mut recorder = Recorder::default();
    let scratch = tempfile::tempdir().unwrap();
    let passed = run_suite(
        suite,
        roots(dir, scratch.path()),
        &[send_only(peer)],
        &mut recorder,
    )
    .unwrap();
    let received = seen.try_iter().collect();
    (recorder, passed, received)
}

#[test]
fn every_method_against_a_local_peer() {
    // 16 whole chunks and a tail that is not a whole page: exercises the O_DIRECT
    // rounding and the short last chunk everywhere.
    let (dir, data) = payload((1 << 20) + 5000);
    let direct_ok = o_direct_works(dir.path());
    let suite = Suite::default();
    let (recorder, passed, received) = run(&suite, dir.path(), &data, 0);

    let n = Method::ALL.len();
    let console = recorder.console();
    assert_eq!(console[0], "KTAP version 1");
    assert_eq!(console[1], format!("1..{n}"));
    let tests = ktap_tests(&console[2..]);
    assert_eq!(tests.len(), n, "{console:#?}");
    let reports = recorder.reports();
    assert_eq!(reports.len(), n);
    let mut received = received.iter();
    for (i, (method, report)) in Method::ALL.iter().zip(&reports).enumerate() {
        let (diagnostics, line) = &tests[i];
        eprintln!("{diagnostics:?} {line}\n  {report}");
        assert_eq!(report["method"], method.name());
        if report.get("skipped").is_some() {
            // Only io_uring, or a tmpfs, may be missing on a test host.
            assert!(
                [Method::UringSendZc, Method::SendfileTmpfs].contains(method),
                "{report}"
            );
            assert_eq!(report["ok"], true);
            assert!(line.starts_with(&format!("ok {} {method} # SKIP ", i + 1)));
            assert!(diagnostics.is_empty(), "{diagnostics:?}");
            assert!(!recorder
                .events
                .contains(&Event::Mark(Marker::begin(*method).label())));
            continue;
        }
        if method.direct() && !direct_ok {
            assert_eq!(report["ok"], false, "{report}");
            assert!(report["error"].as_str().unwrap().contains("O_DIRECT"));
            assert_eq!(*line, format!("not ok {} {method}", i + 1));
            assert_eq!(
                *diagnostics,
                [format!(
                    "# {method}: error: {}",
                    report["error"].as_str().unwrap()
                )]
            );
            continue;
        }
        let got = received.next().expect("one connection per method");
        let chunks = check_common(&recorder, report, got, data.len() as u64, 65536);
        assert_eq!(chunks, 17);
        check_method(report, chunks);
        // The result line carries nothing after the name: the figures are on the
        // diagnostic line before it, where the kernel's KTAP parser keeps them.
        assert_eq!(*line, format!("ok {} {method}", i + 1));
        let [figures] = diagnostics.as_slice() else {
            panic!("one diagnostic line: {diagnostics:?}")
        };
        assert!(
            figures.starts_with(&format!("# {method}: bytes={} seconds=", data.len())),
            "{figures}"
        );
        assert_eq!(
            figures.contains(" zc_sends="),
            report.get("zerocopy").is_some(),
            "{figures}"
        );
    }
    assert!(received.next().is_none());
    assert_eq!(passed, direct_ok);
    // The kernel's parser reads the console as the reports say it went.
    let count = |f: &dyn Fn(&Value) -> bool| {
        u32::try_from(reports.iter().filter(|r| f(r)).count()).unwrap()
    };
    let skipped = count(&|r| r.get("skipped").is_some());
    let failed = count(&|r| r["ok"] == false);
    if let Some((counts, text)) = kunit_parse(&console) {
        let n = u32::try_from(n).unwrap();
        assert_eq!(counts, (n, n - skipped - failed, failed, skipped), "{text}");
    }

    // Caches: dropped before every cold method, never for the warm one.
    let drops = recorder
        .events
        .iter()
        .filter(|e| **e == Event::DropCaches)
        .count();
    let skipped = reports
        .iter()
        .filter(|r| r.get("skipped").is_some())
        .count();
    assert_eq!(drops, n - 1 - skipped);
    let warm = span(&recorder.events, "sendfile_warm");
    assert!(!warm.contains(&Event::DropCaches));
    // optmem_max: starved just before zerocopy_pressure's BEGIN, restored after its END.
    let optmem: Vec<&Event> = recorder
        .events
        .iter()
        .filter(|e| matches!(e, Event::Optmem(_)))
        .collect();
    assert_eq!(optmem, [&Event::Optmem(0), &Event::Optmem(20480)]);
    let pressure = |e: &Event| *e == Event::Mark(Marker::begin(Method::ZerocopyPressure).label());
    let begin = recorder.events.iter().position(pressure).unwrap();
    assert_eq!(recorder.events[begin - 1], Event::Optmem(0));
    let end = Event::Mark(Marker::end(Method::ZerocopyPressure).label());
    let end = recorder.events.iter().position(|e| *e == end).unwrap();
    assert_eq!(recorder.events[end + 1], Event::Optmem(20480));
    // The tmpfs copy is gone after the method.
    assert!(!std::path::Path::new("/dev/shm/zc-tmpfs-payload.bin").exists());
}

#[test]
fn prefix_with_small_chunks() {
    let (dir, data) = payload(200_000);
    if !o_direct_works(dir.path()) {
        eprintln!("no O_DIRECT on this file system: skipping");
        return;
    }
    let size = 3 * 4096 + 100;
    let suite = Suite {
        methods: vec![
            Method::DirectZerocopy,
            Method::CowZerocopy,
            Method::Splice,
            Method::UringSendZc,
            Method::MmapWrite,
        ],
        cards: Vec::new(),
        file: DEFAULT_FILE.to_string(),
        size: Some(size),
        chunk: 8192,
    };
    let (recorder, passed, received) = run(
        &suite,
        dir.path(),
        &data[..usize::try_from(size).unwrap()],
        0,
    );
    assert!(passed);
    let mut received = received.iter();
    for report in recorder.reports() {
        if report.get("skipped").is_some() {
            continue;
        }
        let chunks = check_common(&recorder, &report, received.next().unwrap(), size, 8192);
        assert_eq!(chunks, 2);
        check_method(&report, chunks);
    }
}

#[test]
fn failures_are_reported_and_spans_stay_paired() {
    let (dir, data) = payload(100_000);
    let suite = Suite {
        methods: vec![Method::Sendfile, Method::ReadWrite],
        ..Suite::default()
    };
    let mut recorder = Recorder::default();
    let passed = run_suite(
        &suite,
        roots(dir.path(), dir.path()),
        &[send_only(closed_port())],
        &mut recorder,
    )
    .unwrap();
    assert!(!passed);
    let reports = recorder.reports();
    for (report, method) in reports.iter().zip(["sendfile", "read_write"]) {
        assert_eq!(report["ok"], false);
        assert_eq!(report["method"], method);
        let error = report["error"].as_str().unwrap();
        assert!(error.starts_with("connecting to the peer"), "{error}");
        // Connecting failed after BEGIN: END still follows, with no sample.
        assert_eq!(
            span(&recorder.events, method),
            [
                Event::Mark(Marker::begin(method).label()),
                Event::Mark(Marker::end(method).label())
            ]
        );
    }
    let console = recorder.console();
    assert!(
        console[2].starts_with("# sendfile: error: connecting to the peer"),
        "{console:#?}"
    );
    assert_eq!(console[3], "not ok 1 sendfile");
    if let Some((counts, text)) = kunit_parse(&console) {
        assert_eq!(counts, (2, 0, 2, 0), "{text}");
        // A failed test's log is printed: the reason survives the parser.
        assert!(
            text.contains("# sendfile: error: connecting to the peer"),
            "{text}"
        );
    }

    // A prefix longer than the file fails before BEGIN: no marks at all.
    let too_long = Suite {
        methods: vec![Method::Sendfile],
        size: Some(data.len() as u64 + 1),
        ..Suite::default()
    };
    let (recorder, passed, received) = run(&too_long, dir.path(), &data, 0);
    assert!(!passed && received.is_empty());
    assert!(!recorder.events.iter().any(|e| matches!(e, Event::Mark(_))));
    let error = recorder.reports()[0]["error"].as_str().unwrap().to_string();
    assert!(error.contains("has only 100000 bytes"), "{error}");

    // A wrong ACK is a failure of the method, after END.
    let one = Suite {
        methods: vec![Method::MmapZerocopy],
        ..Suite::default()
    };
    let (recorder, passed, _) = run(&one, dir.path(), &data, 1);
    assert!(!passed);
    let error = recorder.reports()[0]["error"].as_str().unwrap().to_string();
    assert_eq!(error, "the peer acknowledged 100001 of 100000 bytes");
    assert!(recorder
        .events
        .contains(&Event::Mark(Marker::end(Method::MmapZerocopy).label())));

    // A missing file fails before BEGIN too.
    let missing = Suite {
        methods: vec![Method::Splice],
        file: "nope.bin".into(),
        ..Suite::default()
    };
    let (recorder, passed, _) = run(&missing, dir.path(), &data, 0);
    assert!(!passed);
    assert!(recorder.reports()[0]["error"]
        .as_str()
        .unwrap()
        .starts_with("opening "));
}

#[test]
fn each_card_runs_its_methods_to_its_own_peer_with_spans_named_by_variant() {
    let (dir, data) = payload(50_000);
    let suite = Suite {
        cards: vec![
            zc_protocol::SuiteCard {
                variant: "sg-on".into(),
                methods: vec![Method::Sendfile, Method::ReadWrite],
            },
            zc_protocol::SuiteCard {
                variant: "sg-off".into(),
                methods: vec![Method::Sendfile],
            },
        ],
        ..Suite::default()
    };
    let (peer0, seen0) = spawn_peer(data.clone(), 0);
    let (peer1, seen1) = spawn_peer(data.clone(), 0);
    let mut recorder = Recorder::default();
    let both = [send_only(peer0), send_only(peer1)];
    assert!(run_suite(&suite, roots(dir.path(), dir.path()), &both, &mut recorder).unwrap());
    // Card 0's peer got its two methods, card 1's its one.
    assert_eq!(seen0.try_iter().filter(|r| r.matched).count(), 2);
    assert_eq!(seen1.try_iter().filter(|r| r.matched).count(), 1);
    let marks: Vec<&str> = recorder
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Mark(label) => Some(label.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        marks,
        [
            "BEGIN sendfile@sg-on",
            "END sendfile@sg-on",
            "BEGIN read_write@sg-on",
            "END read_write@sg-on",
            "BEGIN sendfile@sg-off",
            "END sendfile@sg-off",
        ]
    );
    let reports = recorder.reports();
    let named: Vec<(&str, &str)> = reports
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap(),
                r["variant"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        named,
        [
            ("sendfile", "sg-on"),
            ("read_write", "sg-on"),
            ("sendfile", "sg-off")
        ]
    );
    let console = recorder.console();
    assert_eq!(console[1], "1..3");
    assert!(
        console.contains(&"ok 3 sendfile@sg-off".to_string()),
        "{console:#?}"
    );
    // A card without a peer address fails its methods, not the suite's run.
    let mut recorder = Recorder::default();
    let (peer0, _seen0) = spawn_peer(data, 0);
    assert!(!run_suite(
        &suite,
        roots(dir.path(), dir.path()),
        &[send_only(peer0)],
        &mut recorder
    )
    .unwrap());
    let error = recorder.reports()[2]["error"].as_str().unwrap().to_string();
    assert_eq!(error, "no peer address for card 1");
}
