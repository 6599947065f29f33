//! The audit on small recorded logs (`tests/data/`): each scenario is a DMA log in the
//! real schema plus the guest's reports, made by the simulator in `common/` from the
//! scenario functions below. The tests read the checked-in files; `data_files_are_current`
//! checks that they are what the functions make. After changing a scenario:
//! `ZC_AUDIT_REGEN=1 cargo test -p zc-audit --test scenarios data_files_are_current`.

mod common;

use std::path::{Path, PathBuf};

use common::{source, Conn, Frame, Sim, L2_L4, NET_HDR, PAGE, PAGE_BYTES};
use rstest::rstest;
use serde_json::json;
use zc_audit::{audit, parse_reports, AuditInput, Expectations, MethodAudit, Verdict};
use zc_dma_log::{read_log, Record};
use zc_protocol::dirty::END_SAMPLE;
use zc_protocol::{Marker, Method};

/// The source file of every scenario: 8 pages.
const SRC_LEN: u64 = SRC_BYTES as u64;
const SRC_BYTES: usize = 8 * PAGE_BYTES;
/// Chunk size of the scenarios (2 chunks).
const CHUNK: u64 = 4 * PAGE;
const MSS: u64 = 1448;
/// 66 bytes: what precedes the payload in a linear TX buffer.
const HDRS: u64 = NET_HDR + L2_L4 as u64;

// Guest-physical layout of the scenarios.
const META: u64 = 0x0010_0000;
const META_OTHER: u64 = 0x0011_0000;
const PAGE_CACHE: u64 = 0x0200_0000;
const HDR_BUFS: u64 = 0x0300_0000;
const SKB_SLOTS: u64 = 0x0400_0000;
const USER_BUF: u64 = 0x0500_0000;
const FRAGS: u64 = 0x0600_0000;
const RX_BUFS: u64 = 0x0700_0000;

const CONN: Conn = Conn {
    ports: (40000, 7878),
    // Near the top so the stream's sequence numbers wrap through 0.
    isn: 0xffff_f000,
};

/// Page-cache page of file page `p`: scattered, as the page allocator hands them out.
fn pc_page(p: u64) -> u64 {
    PAGE_CACHE + ((p * 5 + 3) % 16) * PAGE
}

fn pc_gpa(file_off: u64) -> u64 {
    pc_page(file_off / PAGE) + file_off % PAGE
}

/// `[off, end)` cut at MSS boundaries of the stream.
fn segments(off: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = off;
    while at < end {
        let next = ((at / MSS + 1) * MSS).min(end);
        out.push((at, next - at));
        at = next;
    }
    out
}

/// `[off, off + len)` cut where file pages end.
fn by_page(off: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = off;
    while at < off + len {
        let next = ((at / PAGE + 1) * PAGE).min(off + len);
        out.push((at, next - at));
        at = next;
    }
    out
}

/// Counters the scenario functions share: descriptor heads and buffer slots.
#[derive(Default)]
struct Heads {
    tx: u16,
    blk: u16,
    rx: u16,
}

impl Heads {
    fn tx(&mut self) -> u16 {
        self.tx = (self.tx + 1) % 256;
        self.tx
    }
    fn blk(&mut self) -> u16 {
        self.blk = (self.blk + 4) % 128;
        self.blk
    }
    fn rx(&mut self) -> (u16, u64) {
        self.rx = (self.rx + 1) % 64;
        (self.rx, RX_BUFS + u64::from(self.rx) * 2048)
    }
}

/// Page-cache fill for file pages `[lo, hi)`: init_on_alloc zeroes each page, then
/// one blk request reads them.
fn fill_page_cache(s: &mut Sim, h: &mut Heads, lo: u64, hi: u64) {
    for p in lo / PAGE..hi / PAGE {
        s.cpu_zero_page(pc_page(p));
    }
    let segs: Vec<_> = (lo / PAGE..hi / PAGE)
        .map(|p| (pc_page(p), p * PAGE, PAGE))
        .collect();
    let head = h.blk();
    s.blk_read(head, &segs, META + u64::from(head) * 32);
}

/// A scatter-gather frame: headers in a header buffer, the payload straight from the
/// pages at `payload_gpa(file_off)`.
fn sg_frame(
    s: &mut Sim,
    h: &mut Heads,
    off: u64,
    len: u64,
    payload_gpa: impl Fn(u64) -> u64,
    rx: bool,
) {
    let head = h.tx();
    let hdr = HDR_BUFS + u64::from(head % 32) * 128;
    s.write_frame_headers(hdr, CONN.seq(off));
    let mut segs = vec![(hdr, HDRS)];
    segs.extend(
        by_page(off, len)
            .into_iter()
            .map(|(o, l)| (payload_gpa(o), l)),
    );
    let rx_between = rx.then(|| h.rx());
    s.tx(
        &CONN,
        Frame {
            head,
            segs: &segs,
            seq: CONN.seq(off),
            tcp_len: u32::try_from(len).unwrap(),
            flags: "A",
            rx_between,
        },
    );
}

/// A linear frame: the CPU copies headers and payload into one socket buffer slot
/// (what a NIC without scatter-gather gets), `slot` of 16 rotating 2 KiB slots.
fn linear_frame(s: &mut Sim, h: &mut Heads, off: u64, len: u64, slot: u64, resend: bool) {
    let head = h.tx();
    let buf = SKB_SLOTS + (slot % 16) * 2048;
    if !resend {
        s.write_frame_headers(buf, CONN.seq(off));
        for (o, l) in by_page(off, len) {
            s.cpu_copy(buf + HDRS + (o - off), pc_gpa(o), l);
        }
    }
    s.tx(
        &CONN,
        Frame {
            head,
            segs: &[(buf, HDRS + len)],
            seq: CONN.seq(off),
            tcp_len: u32::try_from(len).unwrap(),
            flags: "A",
            rx_between: None,
        },
    );
}

fn connect(s: &mut Sim, h: &mut Heads) {
    let head = h.tx();
    s.syn(head, HDR_BUFS + 0x800, &CONN);
    let (rx, gpa) = h.rx();
    s.rx(rx, gpa, 66, &CONN);
}

/// The peer's 8-byte byte count arriving.
fn peer_count(s: &mut Sim, h: &mut Heads) {
    let (rx, gpa) = h.rx();
    s.rx(rx, gpa, 66 + 8, &CONN);
}

fn report(method: &str, loop_calls: &[(&str, u64)], setup: &[(&str, u64)]) -> serde_json::Value {
    let chunks = SRC_LEN / CHUNK;
    let mut syscalls = serde_json::Map::new();
    for (n, c) in loop_calls.iter().chain(setup) {
        let prev = syscalls.get(*n).and_then(|v| v.as_u64()).unwrap_or(0);
        syscalls.insert(n.to_string(), json!(prev + c));
    }
    json!({
        "test": "method", "method": method, "ok": true, "bytes": SRC_LEN,
        "chunk": CHUNK, "chunks": chunks, "seconds": 0.004,
        "syscalls": syscalls,
        "loop_syscalls": loop_calls.iter().map(|c| c.1).sum::<u64>(),
        "setup_syscalls": setup.iter().map(|c| c.1).sum::<u64>(),
    })
}

const SOCKET_SETUP: &[(&str, u64)] = &[("socket", 1), ("connect", 1), ("recv", 1)];

/// The report of a `sendfile` or `sendfile_warm` run: one call per chunk.
fn sendfile_report(method: &str) -> serde_json::Value {
    report(method, &[("sendfile", 2)], SOCKET_SETUP)
}

/// A fresh simulator over the scenario source, and its descriptor counters.
fn sim() -> (Sim, Heads) {
    (Sim::new(source(SRC_BYTES)), Heads::default())
}

/// What every chunked scenario does around its chunks: BEGIN, the connection, then
/// for chunk `c` (file bytes `[lo, hi)`, `chunk` bytes each) `body(s, h, c, lo, hi)`
/// and the chunk's dirty-page sample, then the peer's byte count and END.
fn run_chunks(
    s: &mut Sim,
    h: &mut Heads,
    method: &str,
    chunk: u64,
    mut body: impl FnMut(&mut Sim, &mut Heads, u64, u64, u64),
) {
    s.begin(method);
    connect(s, h);
    for c in 0..SRC_LEN / chunk {
        body(s, h, c, c * chunk, (c + 1) * chunk);
        s.sample(u32::try_from(c).unwrap());
    }
    peer_count(s, h);
    s.end(method);
}

/// A scenario: its log, the guest's reports and the variant it ran in.
struct Scenario {
    sim: Sim,
    reports: Vec<serde_json::Value>,
    variant: &'static str,
}

impl Scenario {
    fn new(sim: Sim, report: serde_json::Value, variant: &'static str) -> Self {
        Scenario {
            sim,
            reports: vec![report],
            variant,
        }
    }
}

/// sendfile with scatter-gather: the NIC reads the payload from the page-cache pages
/// virtio-blk filled; one RX frame interleaves with a TX chain.
fn sendfile_sg_on() -> Scenario {
    let (mut s, mut h) = sim();
    // Metadata read before BEGIN: not the transfer.
    s.blk_read_other(h.blk(), META_OTHER, PAGE);
    run_chunks(&mut s, &mut h, "sendfile", CHUNK, |s, h, _, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        for (i, (off, len)) in segments(lo, hi).into_iter().enumerate() {
            sg_frame(s, h, off, len, pc_gpa, i == 3);
        }
    });
    Scenario::new(s, sendfile_report("sendfile"), "sg-on")
}

/// sendfile without scatter-gather: the CPU copies each frame into a linear socket
/// buffer (16 slots, reused in the second chunk); one frame is sent twice.
fn sendfile_sg_off() -> Scenario {
    let (mut s, mut h) = sim();
    let mut slot = 0;
    run_chunks(&mut s, &mut h, "sendfile", CHUNK, |s, h, c, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        for (i, (off, len)) in segments(lo, hi).into_iter().enumerate() {
            linear_frame(s, h, off, len, slot, false);
            if c == 1 && i == 0 {
                // A retransmission: the NIC reads the same buffer again.
                linear_frame(s, h, off, len, slot, true);
            }
            slot += 1;
        }
    });
    Scenario::new(s, sendfile_report("sendfile"), "sg-off")
}

/// sendfile without scatter-gather where the driver reuses its two linear buffers
/// frame after frame: by the per-chunk sample only the last two frames' copies are
/// still in memory. The NIC's reads of the others are the evidence of those copies.
fn linear_reuse() -> Scenario {
    let (mut s, mut h) = sim();
    let mut slot = 0;
    run_chunks(&mut s, &mut h, "sendfile", CHUNK, |s, h, _, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        for (off, len) in segments(lo, hi) {
            linear_frame(s, h, off, len, slot % 2, false);
            slot += 1;
        }
    });
    Scenario::new(s, sendfile_report("sendfile"), "sg-off")
}

/// read + write: page cache -> user buffer (page-aligned, reused per chunk) -> socket
/// buffer fragments, which the NIC reads.
fn read_write() -> Scenario {
    let (mut s, mut h) = sim();
    run_chunks(&mut s, &mut h, "read_write", CHUNK, |s, h, _, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        for (o, l) in by_page(lo, CHUNK) {
            s.cpu_copy(USER_BUF + (o - lo), pc_gpa(o), l);
        }
        // The fragments sit at the same page offsets as the file: only the page's
        // history tells them from the page cache.
        for (o, l) in by_page(lo, CHUNK) {
            s.cpu_copy(FRAGS + o, USER_BUF + (o - lo), l);
        }
        for (off, len) in segments(lo, hi) {
            sg_frame(s, h, off, len, |o| FRAGS + o, false);
        }
    });
    let calls = [("read", 2), ("write", 2)];
    Scenario::new(s, report("read_write", &calls, SOCKET_SETUP), "sg-on")
}

/// sendfile on a warm cache: the page cache was filled (and read once) before BEGIN.
fn sendfile_warm() -> Scenario {
    let (mut s, mut h) = sim();
    fill_page_cache(&mut s, &mut h, 0, SRC_LEN);
    for (o, l) in by_page(0, SRC_LEN) {
        s.cpu_copy(USER_BUF + o % CHUNK, pc_gpa(o), l);
    }
    run_chunks(&mut s, &mut h, "sendfile_warm", CHUNK, |s, h, _, lo, hi| {
        for (off, len) in segments(lo, hi) {
            sg_frame(s, h, off, len, pc_gpa, false);
        }
    });
    Scenario::new(s, sendfile_report("sendfile_warm"), "sg-on")
}

/// Where garbled bytes land in [`content_mismatch`]: in file page 2, inside the frame
/// that carries stream bytes [8688, 10136).
const GARBLED_AT: u64 = 2 * PAGE + 1000;

/// sendfile with scatter-gather, but 100 bytes of one page-cache page change after
/// the disk filled it: the NIC reads the right page, the wrong content.
fn content_mismatch() -> Scenario {
    let (mut s, mut h) = sim();
    run_chunks(&mut s, &mut h, "sendfile", CHUNK, |s, h, c, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        if c == 0 {
            s.cpu_write(pc_gpa(GARBLED_AT), &[0xa5; 100]);
        }
        for (off, len) in segments(lo, hi) {
            sg_frame(s, h, off, len, pc_gpa, false);
        }
    });
    Scenario::new(s, sendfile_report("sendfile"), "sg-on")
}

/// mmap + write, 4 KiB chunks, into a ring of 3 socket-buffer pages. Each chunk also
/// writes next to the previous chunk's payload (re-dirtying that page with its old
/// content still there), and the ring wraps (a page then holds new content).
fn dedupe() -> Scenario {
    const RING: u64 = 3;
    let (mut s, mut h) = sim();
    run_chunks(&mut s, &mut h, "mmap_write", PAGE, |s, h, c, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        let ring = |k: u64| FRAGS + (k % RING) * PAGE;
        s.cpu_copy(ring(c), pc_gpa(lo), PAGE);
        s.cpu_touch(ring(c + RING - 1));
        for (off, len) in segments(lo, hi) {
            sg_frame(s, h, off, len, |o| ring(c) + o % PAGE, false);
        }
    });
    let chunks = SRC_LEN / PAGE;
    let mut r = report("mmap_write", &[("write", chunks)], SOCKET_SETUP);
    r["chunk"] = json!(PAGE);
    r["chunks"] = json!(chunks);
    r["syscalls"]["mmap"] = json!(1);
    r["setup_syscalls"] = json!(4);
    Scenario::new(s, r, "sg-on")
}

/// sendfile with scatter-gather, where readahead for the second chunk is in flight at
/// the first sample: the pages are zeroed (CPU-dirty) and already hold the disk's
/// data, but virtio-blk logs that write only after the sample.
fn init_on_alloc() -> Scenario {
    let (mut s, mut h) = sim();
    s.begin("sendfile");
    connect(&mut s, &mut h);
    fill_page_cache(&mut s, &mut h, 0, CHUNK);
    for p in CHUNK / PAGE..SRC_LEN / PAGE {
        s.cpu_zero_page(pc_page(p));
    }
    let ahead: Vec<_> = (CHUNK / PAGE..SRC_LEN / PAGE)
        .map(|p| (pc_page(p), p * PAGE, PAGE))
        .collect();
    s.blk_dma(&ahead);
    for (off, len) in segments(0, CHUNK) {
        sg_frame(&mut s, &mut h, off, len, pc_gpa, false);
    }
    s.sample(0);
    let head = h.blk();
    s.blk_log(head, &ahead, META + u64::from(head) * 32);
    for (off, len) in segments(CHUNK, SRC_LEN) {
        sg_frame(&mut s, &mut h, off, len, pc_gpa, false);
    }
    s.sample(1);
    peer_count(&mut s, &mut h);
    s.end("sendfile");
    Scenario::new(s, sendfile_report("sendfile"), "sg-on")
}

/// mmap + MSG_ZEROCOPY on a NIC without scatter-gather: the kernel reports every
/// send zero-copy, the device reads every byte from a linear copy.
fn kernel_claim() -> Scenario {
    let (mut s, mut h) = sim();
    let mut slot = 0;
    run_chunks(&mut s, &mut h, "mmap_zerocopy", CHUNK, |s, h, _, lo, hi| {
        fill_page_cache(s, h, lo, hi);
        for (off, len) in segments(lo, hi) {
            linear_frame(s, h, off, len, slot, false);
            slot += 1;
        }
    });
    let mut r = report(
        "mmap_zerocopy",
        &[("sendmsg", 2)],
        &[
            ("socket", 1),
            ("connect", 1),
            ("mmap", 1),
            ("recvmsg", 2),
            ("recv", 1),
        ],
    );
    r["zerocopy"] = json!({"sends": 2, "completions": 2, "copied": 0});
    Scenario::new(s, r, "sg-off")
}

/// Every recorded scenario, by file name stem.
fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("sendfile_sg_on", sendfile_sg_on()),
        ("sendfile_sg_off", sendfile_sg_off()),
        ("read_write", read_write()),
        ("sendfile_warm", sendfile_warm()),
        ("content_mismatch", content_mismatch()),
        ("dedupe", dedupe()),
        ("init_on_alloc", init_on_alloc()),
        ("kernel_claim", kernel_claim()),
        ("linear_reuse", linear_reuse()),
    ]
}

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn reports_text(s: &Scenario) -> String {
    let mut out = String::new();
    for r in &s.reports {
        out.push_str(&serde_json::to_string(r).unwrap());
        out.push('\n');
    }
    out
}

/// The checked-in files of every scenario: `NAME.dma.jsonl` (the log in schema
/// `zc-dma-log/1`, as recorded first), `NAME.dma-v2.jsonl` (the same records in
/// `zc-dma-log/2`), `NAME.reports.jsonl`, and the shared `source.bin`.
fn expected_files() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = data_dir();
    let mut out = vec![(dir.join("source.bin"), source(SRC_BYTES))];
    for (name, s) in scenarios() {
        out.push((
            dir.join(format!("{name}.dma.jsonl")),
            s.sim.jsonl_v1().into_bytes(),
        ));
        out.push((dir.join(format!("{name}.dma-v2.jsonl")), s.sim.jsonl()));
        out.push((
            dir.join(format!("{name}.reports.jsonl")),
            reports_text(&s).into_bytes(),
        ));
    }
    out
}

#[test]
fn data_files_are_current() {
    let regen = std::env::var_os("ZC_AUDIT_REGEN").is_some();
    for (path, bytes) in expected_files() {
        if regen {
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is not what its scenario makes; regenerate with ZC_AUDIT_REGEN=1",
            path.display()
        );
    }
}

/// Scenario `name`'s recorded input, read back from the files.
fn load(name: &str, variant: &str) -> AuditInput {
    let dir = data_dir();
    let reports = std::fs::read_to_string(dir.join(format!("{name}.reports.jsonl"))).unwrap();
    AuditInput {
        records: read_log(&dir.join(format!("{name}.dma.jsonl"))).unwrap(),
        source: std::fs::read(dir.join("source.bin")).unwrap(),
        reports: parse_reports(&reports).unwrap(),
        variant: variant.to_string(),
        card: None,
        kernel_release: None,
    }
}

fn expected_toml() -> Expectations {
    Expectations::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml")).unwrap()
}

/// A table whose rows for sendfile depend on the kernel: the recorded zero-copy
/// sendfile log passes the row of the kernel it is chosen for and fails the other,
/// and the row the audit judged by says which kernels it is for.
#[test]
fn version_conditional_rows_judge_a_recorded_log_by_the_reported_release() {
    let table = Expectations::parse(
        r#"
[[sendfile.sg-on]]
kernel = ">= 6.1, < 6.5"
cpu_copies = 0.0
zero_copy_pct_min = 90
[[sendfile.sg-on]]
kernel = ">= 6.5"
cpu_copies = 1.0
zero_copy_pct_max = 10
"#,
    )
    .unwrap();
    let judge = |release: Option<&str>| {
        let input = AuditInput {
            kernel_release: release.map(String::from),
            ..load("sendfile_sg_on", "sg-on")
        };
        let mut audits = audit(&input, &table);
        assert_eq!(audits.len(), 1, "{audits:#?}");
        audits.remove(0)
    };
    let old = judge(Some("6.1.0-56-cloud-amd64"));
    assert_eq!(old.verdict, Verdict::Pass, "{old:#?}");
    let row = old
        .expected
        .as_ref()
        .and_then(|e| e.kernel.as_ref())
        .unwrap();
    assert_eq!(row.to_string(), ">= 6.1, < 6.5");

    let new = judge(Some("6.12.38+deb12-cloud-amd64"));
    assert_eq!(new.verdict, Verdict::Fail);
    assert_eq!(
        new.reasons,
        [
            "cpu_copies 0.00, expected 1.00 ± 0.15",
            "zero_copy_pct 100.0%, expected <= 10.0%"
        ]
    );
    let row = new
        .expected
        .as_ref()
        .and_then(|e| e.kernel.as_ref())
        .unwrap();
    assert_eq!(row.to_string(), ">= 6.5");

    // No release (a boot that never said hello) and a kernel no row covers: a FAIL
    // that says why, never a row picked at random.
    for (release, why) in [
        (None, "no kernel release reported"),
        (
            Some("5.10.0-30-amd64"),
            "no [[sendfile.sg-on]] row for kernel 5.10.0-30-amd64",
        ),
    ] {
        let a = judge(release);
        assert_eq!(a.verdict, Verdict::Fail, "{release:?}: {a:#?}");
        assert!(a.expected.is_none());
        assert!(a.reasons.iter().any(|r| r.contains(why)), "{:?}", a.reasons);
    }
}

/// Both schemas of a scenario's log give the same records, so the same audit.
#[test]
fn v1_and_v2_logs_get_the_same_audit() {
    let dir = data_dir();
    for (name, _) in scenarios() {
        let v1 = load(name, recorded_variant(name));
        let mut v2 = load(name, recorded_variant(name));
        v2.records = read_log(&dir.join(format!("{name}.dma-v2.jsonl"))).unwrap();
        assert_eq!(v1.records, v2.records, "{name}");
        let (a1, a2) = (audit(&v1, &expected_toml()), audit(&v2, &expected_toml()));
        assert!(!a1.is_empty(), "{name}");
        assert_eq!(a1, a2, "{name}");
        let size = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
        let (s1, s2) = (
            size(&format!("{name}.dma.jsonl")),
            size(&format!("{name}.dma-v2.jsonl")),
        );
        assert!(s2 * 2 < s1, "{name}: /2 is {s2} bytes, /1 {s1}");
    }
}

/// Audits scenario `name` (as recorded, in `variant`) against the real expectations.
fn run(name: &str, variant: &str) -> MethodAudit {
    let mut a = audit(&load(name, variant), &expected_toml());
    assert_eq!(a.len(), 1, "{a:#?}");
    a.remove(0)
}

/// The audit of the first method in `input`, against the real expectations.
fn audit_first(input: &AuditInput) -> MethodAudit {
    audit(input, &expected_toml()).remove(0)
}

/// The simulator's log and source as an sg-on run without guest reports.
fn sim_input(s: &Sim) -> AuditInput {
    AuditInput {
        records: s.records().to_vec(),
        source: s.src.clone(),
        reports: Vec::new(),
        variant: "sg-on".into(),
        card: None,
        kernel_release: None,
    }
}

/// The variant scenario `name` was recorded in (without re-making the scenarios).
fn recorded_variant(name: &str) -> &'static str {
    match name {
        "sendfile_sg_off" | "kernel_claim" | "linear_reuse" => "sg-off",
        _ => "sg-on",
    }
}

#[test]
fn recorded_variants_are_known() {
    for (name, s) in scenarios() {
        assert_eq!(recorded_variant(name), s.variant, "{name}");
    }
}

#[rstest]
#[case::sendfile_zero_copy("sendfile_sg_on", 0, 2, 100.0)]
#[case::sendfile_copied("sendfile_sg_off", 32768, 2, 0.0)]
#[case::read_write_two_copies("read_write", 65536, 2, 0.0)]
#[case::warm_cache_no_disk_dma("sendfile_warm", 0, 1, 100.0)]
#[case::dedupe_of_redirtied_pages("dedupe", 32768, 2, 0.0)]
#[case::init_on_alloc_and_late_blk_record("init_on_alloc", 0, 2, 100.0)]
#[case::device_edge_copy("kernel_claim", 32768, 2, 0.0)]
#[case::reused_linear_buffers("linear_reuse", 32768, 2, 0.0)]
fn recorded_scenarios_pass(
    #[case] name: &str,
    #[case] cpu_bytes: u64,
    #[case] dma: u32,
    #[case] zero_copy_pct: f64,
) {
    let a = run(name, recorded_variant(name));
    assert_eq!(a.verdict, Verdict::Pass, "{a:#?}");
    assert_eq!(a.cpu_copied_bytes, cpu_bytes, "{a:#?}");
    assert_eq!(a.dma_copies, dma);
    assert_eq!(a.zero_copy_pct, zero_copy_pct);
    assert_eq!(a.dirty_samples, a.chunks.unwrap() + 1);
}

#[test]
fn copies_only_the_nic_saw_need_the_dirty_log() {
    let a = run("linear_reuse", "sg-off");
    assert!(
        a.cpu_copied_seen_by_nic > SRC_LEN / 2,
        "most copies were overwritten before a sample: {a:#?}"
    );
    // Without KVM's word that the CPU wrote those pages, the NIC's reads prove nothing.
    let mut input = load("linear_reuse", "sg-off");
    for r in &mut input.records {
        if let Record::Dirty(d) = r {
            d.dirtied.clear();
        }
    }
    let a = audit_first(&input);
    assert_eq!(a.cpu_copied_seen_by_nic, 0);
    assert!(a.cpu_copies < 0.5, "{a:#?}");
    assert_eq!(a.verdict, Verdict::Fail);
}

#[test]
fn sendfile_zero_copy_numbers() {
    let a = run("sendfile_sg_on", "sg-on");
    assert_eq!(
        a.disk_dma_bytes, SRC_LEN,
        "the metadata read before BEGIN is not the transfer"
    );
    assert_eq!(a.nic_payload_bytes, SRC_LEN);
    assert_eq!(a.nic_zero_copy_bytes, SRC_LEN);
    assert_eq!(a.cpu_copies, 0.0);
    // The init_on_alloc pages hold the disk's data when sampled: not copies.
    assert_eq!(a.cpu_dma_destination_bytes, SRC_LEN);
    assert_eq!(a.syscalls_per_chunk, Some(1.0));
    assert_eq!(a.mode_switches_per_chunk, Some(2.0));
    assert_eq!(a.total_syscalls, Some(5));
    assert_eq!(
        a.throughput_mbit_s,
        Some(SRC_LEN as f64 * 8.0 / 0.004 / 1e6)
    );
    assert!(a.findings.is_empty(), "{:?}", a.findings);
    assert!(a.reasons.is_empty());
}

#[test]
fn retransmitted_bytes_count_as_the_nic_read_them() {
    let a = run("sendfile_sg_off", "sg-off");
    // The resent frame is the second chunk's first, up to the next MSS boundary.
    let resent = (CHUNK / MSS + 1) * MSS - CHUNK;
    assert_eq!(a.nic_payload_bytes, SRC_LEN + resent);
    assert_eq!(a.nic_copied_bytes, SRC_LEN + resent);
    assert_eq!(a.cpu_copies, 1.0);
}

#[test]
fn read_write_counts_user_buffer_and_socket_buffer() {
    let a = run("read_write", "sg-on");
    assert_eq!(a.cpu_copies, 2.0);
    assert_eq!(
        a.nic_zero_copy_bytes, 0,
        "fragments at file-page offsets are not the page cache"
    );
    assert_eq!(a.syscalls_per_chunk, Some(2.0));
}

#[test]
fn wrong_copy_count_fails_with_reasons() {
    // The copying run judged as if the NIC had scatter-gather.
    let a = run("sendfile_sg_off", "sg-on");
    assert_eq!(a.verdict, Verdict::Fail);
    assert_eq!(
        a.reasons,
        vec![
            "cpu_copies 1.00, expected 0.00 ± 0.15",
            "zero_copy_pct 0.0%, expected >= 90.0%"
        ]
    );
}

#[test]
fn warm_run_matches_blk_writes_before_the_span() {
    let a = run("sendfile_warm", "sg-on");
    assert_eq!(a.disk_dma_bytes, 0);
    assert_eq!(a.nic_zero_copy_bytes, SRC_LEN);
    // The warm-up read's copy happened before BEGIN.
    assert_eq!(a.cpu_copied_bytes, 0);
}

#[test]
fn content_mismatch_is_not_zero_copy() {
    let a = run("content_mismatch", "sg-on");
    // Only the frame piece covering the garbled bytes: stream [8688, 10136).
    assert_eq!(a.nic_copied_bytes, MSS);
    assert_eq!(a.nic_zero_copy_bytes, SRC_LEN - MSS);
    // The rest of the garbled page still holds the disk's data where it put it.
    assert_eq!(a.cpu_copied_bytes, 0);
    assert_eq!(a.verdict, Verdict::Pass, "{a:#?}");
}

#[test]
fn dedupe_counts_each_byte_once_per_content() {
    let records = load("dedupe", "sg-on").records;
    // The log really shows re-dirtied pages: the samples hold more payload than sent.
    let reported: u64 = records
        .iter()
        .filter_map(|r| match r {
            zc_dma_log::Record::Dirty(d) => Some(d),
            _ => None,
        })
        .flat_map(|d| &d.runs)
        .filter(|r| r.gpa >= FRAGS)
        .map(|r| u64::from(r.len))
        .sum();
    assert!(reported > SRC_LEN + 4 * PAGE, "{reported}");
    let a = run("dedupe", "sg-on");
    assert_eq!(a.cpu_copied_bytes, SRC_LEN);
}

#[test]
fn kernel_claim_disagreement_is_a_finding() {
    let a = run("kernel_claim", "sg-off");
    assert_eq!(
        a.verdict,
        Verdict::Pass,
        "the disagreement is expected for sg-off"
    );
    assert_eq!(
        a.findings,
        vec!["kernel flagged 0 of 2 zero-copy sends as copied, but the NIC read 100.0% of the payload from copies"]
    );
    assert_eq!(a.kernel.unwrap().copied, Some(0));
}

#[test]
fn kernel_claiming_copies_on_a_zero_copy_run_is_a_finding_too() {
    let mut input = load("sendfile_sg_on", "sg-on");
    input.reports[0].zerocopy = Some(zc_audit::ZeroCopyCounts {
        sends: 2,
        completions: 2,
        copied: Some(2),
        fallbacks: None,
    });
    let a = audit_first(&input);
    assert_eq!(
        a.findings,
        vec!["kernel flagged 2 of 2 zero-copy sends as copied, but the NIC read 0.0% of the payload from copies"]
    );
}

/// How the guest's report (or its absence) and the marks decide the verdict.
#[rstest]
#[case::passes(
    "sendfile",
    r#"{"test":"method","method":"sendfile","ok":true,"bytes":32768,"chunks":2,"loop_syscalls":2}"#,
    "sg-on",
    Verdict::Pass,
    None
)]
#[case::skipped(
    "sendfile",
    r#"{"test":"method","method":"sendfile","ok":true,"skipped":"not today"}"#,
    "sg-on",
    Verdict::Skip,
    Some("not today")
)]
#[case::not_ok(
    "sendfile",
    r#"{"test":"method","method":"sendfile","ok":false,"error":"peer: byte 5 differs"}"#,
    "sg-on",
    Verdict::Fail,
    Some("guest: peer: byte 5 differs")
)]
#[case::no_report("sendfile", "", "sg-on", Verdict::Fail, Some("no guest report"))]
#[case::no_span(
    "splice",
    r#"{"test":"method","method":"splice","ok":true,"bytes":32768,"chunks":2,"loop_syscalls":4}"#,
    "sg-on",
    Verdict::Fail,
    Some("no `BEGIN splice` marker in the DMA log")
)]
#[case::no_expectation(
    "sendfile",
    r#"{"test":"method","method":"sendfile","ok":true,"bytes":32768,"chunks":2,"loop_syscalls":2}"#,
    "tap",
    Verdict::Fail,
    Some("no [sendfile.tap] table in the expectations")
)]
#[case::syscalls_unknown(
    "sendfile",
    r#"{"test":"method","method":"sendfile","ok":true,"bytes":32768}"#,
    "sg-on",
    Verdict::Fail,
    Some("syscalls_per_chunk unknown (the guest report lacks the counts)")
)]
fn report_and_marks_decide(
    #[case] method: &str,
    #[case] report: &str,
    #[case] variant: &str,
    #[case] verdict: Verdict,
    #[case] reason: Option<&str>,
) {
    let mut input = load("sendfile_sg_on", variant);
    input.reports = parse_reports(report).unwrap();
    let audits = audit(&input, &expected_toml());
    let a = audits.iter().find(|a| a.method == method).unwrap();
    assert_eq!(a.verdict, verdict, "{a:#?}");
    assert_eq!(a.reasons.first().map(String::as_str), reason);
}

#[test]
fn a_span_without_end_fails() {
    let mut input = load("sendfile_sg_on", "sg-on");
    input.records.retain(
        |r| !matches!(r, zc_dma_log::Record::Marker(m) if Marker::end(Method::Sendfile).matches(&m.label)),
    );
    let a = audit_first(&input);
    assert_eq!(a.verdict, Verdict::Fail);
    assert_eq!(
        a.reasons,
        vec!["no `END sendfile` marker after `BEGIN sendfile`"]
    );
}

// ---- rules on in-memory logs (not recorded: one rule each) ----

/// One file page's worth of bytes in one frame, `len` bytes from stream offset 0,
/// read by the NIC from `gpa`, after `prepare` set guest memory up.
fn one_frame(prepare: impl FnOnce(&mut Sim), gpa: u64, len: u64) -> MethodAudit {
    let mut s = Sim::new(source(SRC_BYTES));
    let mut h = Heads::default();
    s.begin("sendfile");
    connect(&mut s, &mut h);
    prepare(&mut s);
    sg_frame(&mut s, &mut h, 0, len, |o| gpa + o, false);
    s.sample(0);
    s.end("sendfile");
    audit_first(&sim_input(&s))
}

const X: u64 = 0x0800_0000;

#[rstest]
#[case::intact(|s: &mut Sim| s.blk_read(0, &[(X, 0, PAGE)], META), PAGE)]
#[case::content_changed(|s: &mut Sim| { s.blk_read(0, &[(X, 0, PAGE)], META); s.cpu_write(X + 10, &[0; 4]); }, 0)]
#[case::cpu_put_it_back(|s: &mut Sim| { s.blk_read(0, &[(X, PAGE, PAGE)], META); s.blk_dma(&[(X + PAGE, 0, PAGE)]); s.cpu_copy(X, X + PAGE, PAGE); }, 0)]
#[case::partial_blk_pieces(|s: &mut Sim| s.blk_read(0, &[(X, 0, PAGE / 2), (X + PAGE / 2, PAGE / 2, PAGE / 2)], META), 0)]
#[case::dma_never_logged(|s: &mut Sim| s.blk_dma(&[(X, 0, PAGE)]), 0)]
#[case::rx_overwrote_after_blk(|s: &mut Sim| { s.blk_read(0, &[(X, 0, PAGE)], META); s.rx(9, X + PAGE - 20, 4, &CONN); s.blk_dma(&[(X, 0, PAGE)]); }, 0)]
fn nic_zero_copy_rule(#[case] prepare: impl FnOnce(&mut Sim), #[case] zero_copy: u64) {
    let a = one_frame(prepare, X, PAGE);
    assert_eq!(a.nic_payload_bytes, PAGE);
    assert_eq!(a.nic_zero_copy_bytes, zero_copy, "{a:#?}");
}

/// The page offset must match the stream offset's, even where the content and the
/// page's disk data would: a source repeating every 2 KiB makes that possible.
#[test]
fn zero_copy_needs_the_same_page_offset() {
    let half: Vec<u8> = source(2048);
    let periodic: Vec<u8> = half
        .iter()
        .chain(&half)
        .cycle()
        .take(SRC_BYTES)
        .copied()
        .collect();
    let frame = |stream_off: u64| {
        let mut s = Sim::new(periodic.clone());
        let mut h = Heads::default();
        s.begin("sendfile");
        connect(&mut s, &mut h);
        s.blk_read(0, &[(X, 0, PAGE)], META);
        // Stream bytes [stream_off, +2048) read from the page's first half.
        sg_frame(
            &mut s,
            &mut h,
            stream_off,
            2048,
            |o| X + o - stream_off,
            false,
        );
        s.end("sendfile");
        audit_first(&sim_input(&s))
    };
    assert_eq!(frame(0).nic_zero_copy_bytes, 2048);
    let shifted = frame(2048);
    assert_eq!(shifted.nic_payload_bytes, 2048);
    assert_eq!(shifted.nic_zero_copy_bytes, 0);
}

/// CPU-side exclusion: what a sample counts in a page `prepare` set up.
#[rstest]
// The disk put file page 0 there after init_on_alloc zeroed it.
#[case::dma_destination(|s: &mut Sim| { s.cpu_zero_page(X); s.blk_read(0, &[(X, 0, PAGE)], META); s.sample(0); }, 0)]
// Same, the blk record logged after the sample but before the next one.
#[case::blk_record_after_sample(|s: &mut Sim| { s.cpu_zero_page(X); s.blk_dma(&[(X, 0, PAGE)]); s.sample(0); s.blk_log(0, &[(X, 0, PAGE)], META); s.sample(1); }, 0)]
// The blk record comes only after the next sample: too late to explain the first.
#[case::blk_record_too_late(|s: &mut Sim| { s.cpu_zero_page(X); s.blk_dma(&[(X, 0, PAGE)]); s.sample(0); s.sample(1); s.blk_log(0, &[(X, 0, PAGE)], META); }, PAGE)]
// The disk put file page 0 there, the CPU then copied file page 1 over it.
#[case::other_file_page(|s: &mut Sim| { s.blk_read(0, &[(X, 0, PAGE)], META); s.blk_dma(&[(X + PAGE, PAGE, PAGE)]); s.cpu_copy(X, X + PAGE, PAGE); s.sample(0); }, PAGE)]
// File bytes 0..2048 copied to the middle of that page: misaligned, a copy; the
// disk's data around it is not.
#[case::misaligned_in_dma_page(|s: &mut Sim| { s.blk_read(0, &[(X, 0, PAGE)], META); s.blk_dma(&[(X + PAGE, 0, PAGE)]); s.cpu_copy(X + 1024, X + PAGE, 2048); s.sample(0); }, 2048)]
// Counted, then a device overwrote the page (freed, reused as page cache), then the
// CPU copied the same bytes there again: a second copy.
#[case::device_overwrite_between(|s: &mut Sim| { s.blk_dma(&[(X + PAGE, 0, PAGE)]); s.cpu_copy(X, X + PAGE, PAGE); s.sample(0); s.blk_read(0, &[(X, PAGE, PAGE)], META); s.cpu_copy(X, X + PAGE, PAGE); s.sample(1); }, 2 * PAGE)]
// Counted, then re-dirtied with the same content still there: once.
#[case::redirtied_unchanged(|s: &mut Sim| { s.blk_dma(&[(X + PAGE, 0, PAGE)]); s.cpu_copy(X, X + PAGE, PAGE); s.sample(0); s.cpu_touch(X); s.sample(1); }, PAGE)]
fn cpu_dma_destination_rule(#[case] prepare: impl FnOnce(&mut Sim), #[case] copied: u64) {
    let mut s = Sim::new(source(SRC_BYTES));
    s.begin("sendfile");
    prepare(&mut s);
    s.end("sendfile");
    let a = audit_first(&sim_input(&s));
    assert_eq!(a.cpu_copied_bytes, copied, "{a:#?}");
}

#[test]
fn dirty_records_after_end_count_only_up_to_the_end_sample() {
    let mut s = Sim::new(source(SRC_BYTES));
    s.begin("sendfile");
    s.end("sendfile");
    // Dirty after the END sample (another step's): not this method's.
    s.blk_dma(&[(X, 0, PAGE)]);
    s.cpu_copy(X + PAGE, X, PAGE);
    s.sample(7);
    let mut input = sim_input(&s);
    let a = audit_first(&input);
    assert_eq!(a.dirty_samples, 1);
    assert_eq!(a.cpu_copied_bytes, 0);
    // Without the END sample the first dirty record after END is still taken...
    input
        .records
        .retain(|r| !matches!(r, zc_dma_log::Record::Dirty(d) if d.sample == END_SAMPLE));
    let a = audit_first(&input);
    assert_eq!(a.cpu_copied_bytes, PAGE);
    // ...unless another marker comes first.
    let mut s2 = Sim::new(source(SRC_BYTES));
    s2.begin("sendfile");
    s2.marker(&Marker::end(Method::Sendfile).label());
    s2.marker(&Marker::begin("other").label());
    s2.blk_dma(&[(X, 0, PAGE)]);
    s2.cpu_copy(X + PAGE, X, PAGE);
    s2.sample(0);
    input.records = s2.records().to_vec();
    let a = audit_first(&input);
    assert_eq!((a.dirty_samples, a.cpu_copied_bytes), (0, 0));
}

// ---- expectations file and reports ----

#[test]
fn expected_toml_covers_every_method_of_the_contract() {
    let contract = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/method-suite.md"),
    )
    .unwrap();
    let section = contract
        .split("## Method names")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let names: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert_eq!(names.len(), 20, "{names:?}");
    let ex = expected_toml();
    for name in &names {
        for variant in ["sg-on", "sg-off"] {
            assert!(!ex.rows(name, variant).is_empty(), "no [{name}.{variant}]");
        }
    }
    for method in ex.methods.keys() {
        assert!(
            names.contains(&method.as_str()),
            "{method} is not in the contract"
        );
    }
}

#[test]
fn a_wanted_method_that_never_ran_fails() {
    let input = AuditInput {
        variant: "sg-on".to_string(),
        ..load("sendfile_sg_on", "sg-on")
    };
    let wanted = ["sendfile".to_string(), "splice".to_string()];
    let audits = zc_audit::audit_wanted(&input, &expected_toml(), &wanted);
    assert_eq!(audits.len(), 2);
    assert_eq!(audits[0].verdict, Verdict::Pass, "{:#?}", audits[0]);
    let splice = &audits[1];
    assert_eq!(
        (splice.method.as_str(), splice.verdict),
        ("splice", Verdict::Fail)
    );
    assert!(
        splice.reasons.iter().any(|r| r.contains("no guest report")),
        "{splice:#?}"
    );
}

/// One boot, two cards (`zc.cards=sg-on:sendfile/sg-off:sendfile`): `sendfile` runs
/// through card 0 with scatter-gather, then through card 1 with linear frames, in one
/// log. Card 0 opens a stray connection at the start of the second span: the sg-off
/// audit must take card 1's frames, not the first SYN of the span.
fn two_cards() -> (Sim, Vec<zc_audit::MethodReport>) {
    let (mut s, mut h) = sim();
    run_chunks(
        &mut s,
        &mut h,
        "sendfile@sg-on",
        CHUNK,
        |s, h, _, lo, hi| {
            fill_page_cache(s, h, lo, hi);
            for (off, len) in segments(lo, hi) {
                sg_frame(s, h, off, len, pc_gpa, false);
            }
        },
    );
    s.begin("sendfile@sg-off");
    let stray = Conn {
        ports: (40001, 7878),
        isn: 7,
    };
    s.syn(h.tx(), HDR_BUFS + 0x900, &stray);
    s.net_card = 1;
    // Card 1's own queues: its descriptor heads start again from 0.
    let mut h1 = Heads::default();
    connect(&mut s, &mut h1);
    let mut slot = 0;
    for c in 0..SRC_LEN / CHUNK {
        let (lo, hi) = (c * CHUNK, (c + 1) * CHUNK);
        fill_page_cache(&mut s, &mut h1, lo, hi);
        for (off, len) in segments(lo, hi) {
            linear_frame(&mut s, &mut h1, off, len, slot, false);
            slot += 1;
        }
        s.sample(u32::try_from(c).unwrap());
    }
    peer_count(&mut s, &mut h1);
    s.end("sendfile@sg-off");
    let mut reports = String::new();
    for variant in ["sg-on", "sg-off"] {
        let mut r = sendfile_report("sendfile");
        r["variant"] = json!(variant);
        reports.push_str(&format!("{r}\n"));
    }
    (s, parse_reports(&reports).unwrap())
}

/// The two-card log in both schemas: `/2` keeps every record's card (card 1's
/// chains are `net1/...`, card 0's `net/...` as in one-card logs), so both read as
/// the very records written and each card's audit is the same.
#[test]
fn a_two_card_log_reads_and_audits_the_same_in_both_schemas() {
    let (s, reports) = two_cards();
    let records = |log: &[u8]| -> Vec<Record> {
        zc_dma_log::DmaLogReader::new(log)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let (v1, v2) = (s.jsonl_v1(), s.jsonl());
    let text = String::from_utf8(v2.clone()).unwrap();
    assert!(text.contains("{\"c\":\"net1/1/"), "no card 1 TX chain line");
    assert!(text.contains("{\"c\":\"net/1/"), "no card 0 TX chain line");
    assert!(
        !text.contains("\"card\""),
        "a chain line names its card in `c`"
    );
    let (r1, r2) = (records(v1.as_bytes()), records(&v2));
    let cards = |r: &[Record]| {
        r.iter()
            .filter_map(|r| match r {
                Record::Request(q) => Some(q.card),
                _ => None,
            })
            .max()
    };
    assert_eq!(cards(&r1), Some(1));
    assert_eq!(r1, s.records());
    assert_eq!(r2, s.records());
    for (variant, card) in [("sg-on", 0), ("sg-off", 1)] {
        let input = |records: Vec<Record>| AuditInput {
            records,
            source: s.src.clone(),
            reports: reports.clone(),
            variant: variant.into(),
            card: Some(card),
            kernel_release: None,
        };
        let a1 = audit(&input(r1.clone()), &expected_toml());
        let a2 = audit(&input(r2.clone()), &expected_toml());
        assert_eq!(a1.len(), 1, "{a1:#?}");
        assert_eq!(a1[0].verdict, Verdict::Pass, "{variant}: {a1:#?}");
        assert_eq!(a1, a2, "{variant}");
    }
}

#[test]
fn one_boot_audits_each_variant_from_its_span_and_card() {
    let (s, reports) = two_cards();
    let input = |variant: &str, card: Option<u16>| AuditInput {
        records: s.records().to_vec(),
        source: s.src.clone(),
        reports: reports.clone(),
        variant: variant.into(),
        card,
        kernel_release: None,
    };
    let on = audit(&input("sg-on", Some(0)), &expected_toml());
    assert_eq!(on.len(), 1, "{on:#?}");
    let on = &on[0];
    assert_eq!(
        (on.method.as_str(), on.verdict),
        ("sendfile", Verdict::Pass)
    );
    assert_eq!(on.nic_zero_copy_bytes, SRC_LEN);
    assert_eq!(on.cpu_copies, 0.0);
    assert_eq!(on.span_seq.map(|(b, _)| b), Some(0));

    let off = audit(&input("sg-off", Some(1)), &expected_toml());
    assert_eq!(off.len(), 1, "{off:#?}");
    let off = &off[0];
    assert_eq!(
        (off.method.as_str(), off.verdict),
        ("sendfile", Verdict::Pass),
        "{off:#?}"
    );
    assert_eq!(off.nic_payload_bytes, SRC_LEN);
    assert_eq!(off.nic_copied_bytes, SRC_LEN);
    assert_eq!(off.cpu_copies, 1.0);
    assert_eq!(off.disk_dma_bytes, SRC_LEN);
    assert!(off.span_seq.unwrap().0 > on.span_seq.unwrap().1);

    // The card decides whose frames count: card 0's in that span are the stray
    // connection, which carried nothing.
    let wrong_card = audit(&input("sg-off", Some(0)), &expected_toml());
    assert_eq!(wrong_card[0].nic_payload_bytes, 0, "{wrong_card:#?}");
    assert_eq!(wrong_card[0].verdict, Verdict::Fail);
    // A one-card reading of the log finds no plain span of its own.
    assert!(audit(&input("sg-on", None), &expected_toml())
        .iter()
        .all(|a| a
            .reasons
            .iter()
            .any(|r| r.contains("no `BEGIN sendfile` marker"))));
}
