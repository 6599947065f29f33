//! The audit of receive spans on synthetic logs: the peer's payload arrives in RX
//! frames, the guest moves it (or not) and the scratch disk (blk card 1) writes it
//! out. Each test builds its log with the simulator in `common/` and checks the
//! figures a rule gives, so that a rule that stopped working fails here.

mod common;

use common::{source, Conn, Sim, L2_L4, NET_HDR, PAGE, PAGE_BYTES};
use serde_json::json;
use zc_audit::{audit, parse_reports, AuditInput, Expectations, MethodAudit, Verdict};
use zc_protocol::addr::PEER_SEND_PORT;
use zc_protocol::Direction;

/// The payload: 8 pages, each its own content.
const SRC_LEN: u64 = SRC_BYTES as u64;
const SRC_BYTES: usize = 8 * PAGE_BYTES;
/// Two chunks.
const CHUNK: u64 = 4 * PAGE;
const MSS: u64 = 1448;
/// What precedes the payload in an RX buffer: virtio-net header, Ethernet, IPv4, TCP.
const HDRS: u64 = NET_HDR + L2_L4 as u64;

const META: u64 = 0x0010_0000;
const HDR_BUFS: u64 = 0x0300_0000;
const RX_BUFS: u64 = 0x0700_0000;
const USER_BUF: u64 = 0x0500_0000;
const PAGE_CACHE: u64 = 0x0200_0000;
/// Page-aligned receive pages (the NIC writes whole payload pages there).
const RX_PAGES: u64 = 0x0900_0000;

const GUEST_PORT: u16 = 41000;
/// The guest's connection to the peer's send port (its SYN).
const CONN: Conn = Conn {
    ports: (GUEST_PORT, PEER_SEND_PORT),
    isn: 77,
};
/// The peer's initial sequence number, near the top so the stream wraps through 0.
const PEER_ISN: u32 = 0xffff_e000;
/// (peer port, guest port), as the RX frames carry them.
const RX_PORTS: (u16, u16) = (PEER_SEND_PORT, GUEST_PORT);

fn peer_seq(off: u64) -> u32 {
    PEER_ISN
        .wrapping_add(1)
        .wrapping_add(u32::try_from(off).unwrap())
}

/// Page-cache page of file page `p`, scattered.
fn pc_page(p: u64) -> u64 {
    PAGE_CACHE + ((p * 5 + 3) % 16) * PAGE
}

/// `[lo, hi)` cut where file pages end.
fn by_page(lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = lo;
    while at < hi {
        let next = ((at / PAGE + 1) * PAGE).min(hi);
        out.push((at, next - at));
        at = next;
    }
    out
}

/// How the guest handles one chunk `[lo, hi)`: it receives it (the NIC's DMA),
/// then does whatever the method does with it.
type ChunkBody<'a> = &'a mut dyn FnMut(&mut Sim, &mut Rx, u64, u64);

/// RX descriptor heads and 2 KiB buffer slots, in turn.
#[derive(Default)]
struct Rx {
    head: u16,
}

impl Rx {
    fn next(&mut self) -> (u16, u64) {
        self.head = (self.head + 1) % 128;
        (self.head, RX_BUFS + u64::from(self.head) * 2048)
    }

    /// The peer's bytes `[lo, hi)` in MSS frames, each in its own 2 KiB buffer;
    /// returns where each frame's payload landed: (file offset, gpa, len).
    fn mss_frames(&mut self, s: &mut Sim, lo: u64, hi: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut at = lo;
        while at < hi {
            let len = MSS.min(hi - at);
            let (head, buf) = self.next();
            s.rx_payload(head, buf, (RX_PORTS, peer_seq(at), "A"), at, len);
            out.push((at, buf + HDRS, len));
            at += len;
        }
        out
    }

    /// The peer's bytes `[lo, hi)` in frames of one page of payload each, the
    /// payload starting on a page boundary (what header split would give): page
    /// `k` of the file lands at `RX_PAGES + 2 k PAGE`.
    fn page_frames(&mut self, s: &mut Sim, lo: u64, hi: u64) {
        for (off, len) in by_page(lo, hi) {
            let (head, _) = self.next();
            let payload_at = rx_page(off);
            let buf = payload_at - HDRS;
            s.rx_payload(head, buf, (RX_PORTS, peer_seq(off), "A"), off, len);
        }
    }
}

/// Where [`Rx::page_frames`] put file offset `off`'s page.
fn rx_page(off: u64) -> u64 {
    RX_PAGES + 2 * (off / PAGE) * PAGE
}

/// What the scratch disk does after the chunks, in order.
#[derive(Clone, Copy)]
enum DiskOp {
    /// An OUT request of one page at this gpa.
    Out(u64),
    /// A FLUSH.
    Flush,
}

/// Writeback of `pages` (gpa of each, in file order), then a FLUSH.
fn written_and_flushed(pages: &[u64]) -> Vec<DiskOp> {
    let mut ops: Vec<DiskOp> = pages.iter().map(|&g| DiskOp::Out(g)).collect();
    ops.push(DiskOp::Flush);
    ops
}

/// A receive span for `method`: BEGIN, the guest's SYN and the peer's SYN-ACK, the
/// chunks (`body`, then the chunk's sample), the scratch disk's `disk` requests,
/// END; and the guest's report (three calls per chunk).
fn receive_span(
    method: &str,
    body: ChunkBody,
    disk: &[DiskOp],
) -> (Sim, Vec<zc_audit::MethodReport>) {
    let mut s = Sim::new(source(SRC_BYTES));
    let mut rx = Rx::default();
    s.begin(method);
    s.syn(1, HDR_BUFS, &CONN);
    let (head, buf) = rx.next();
    s.rx_payload(head, buf, (RX_PORTS, PEER_ISN, "SA"), 0, 0);
    for c in 0..SRC_LEN / CHUNK {
        body(&mut s, &mut rx, c * CHUNK, (c + 1) * CHUNK);
        s.sample(u32::try_from(c).unwrap());
    }
    s.blk_card = 1;
    for (i, op) in (0u16..).zip(disk) {
        let head = (i * 4) % 128;
        let meta = META + u64::from(head) * 32;
        match *op {
            DiskOp::Out(gpa) => s.blk_write(head, &[(gpa, PAGE)], u64::from(i) * 8, meta),
            DiskOp::Flush => s.blk_flush(head, meta),
        }
    }
    s.blk_card = 0;
    s.end(method);
    let report = json!({
        "test": "method", "method": method, "ok": true, "bytes": SRC_LEN,
        "chunk": CHUNK, "chunks": SRC_LEN / CHUNK, "seconds": 0.004,
        "loop_syscalls": 3 * SRC_LEN / CHUNK, "setup_syscalls": 3,
    });
    let reports = parse_reports(&report.to_string()).unwrap();
    (s, reports)
}

fn expected_toml() -> Expectations {
    Expectations::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml"))
        .unwrap()
}

fn audited(s: &Sim, reports: Vec<zc_audit::MethodReport>) -> MethodAudit {
    let input = AuditInput {
        records: s.records().to_vec(),
        source: s.src.clone(),
        reports,
        variant: "sg-on".into(),
        card: None,
        kernel_release: None,
    };
    let mut audits = audit(&input, &expected_toml());
    assert_eq!(audits.len(), 1, "{audits:#?}");
    audits.remove(0)
}

/// Every file page's page-cache page, in file order.
fn page_cache_pages() -> Vec<u64> {
    (0..SRC_LEN / PAGE).map(pc_page).collect()
}

/// recv + write: skb -> user buffer (reused per chunk), user buffer -> page cache;
/// writeback reads the page cache.
fn recv_write_body(s: &mut Sim, rx: &mut Rx, lo: u64, hi: u64) {
    for (off, gpa, len) in rx.mss_frames(s, lo, hi) {
        s.cpu_copy(USER_BUF + (off - lo), gpa, len);
    }
    for (off, len) in by_page(lo, hi) {
        s.cpu_copy(pc_page(off / PAGE) + off % PAGE, USER_BUF + (off - lo), len);
    }
}

#[test]
fn recv_write_counts_two_cpu_copies_and_no_zero_copy() {
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&page_cache_pages()),
    );
    let a = audited(&s, reports);
    assert_eq!(a.direction, Direction::Receive);
    let r = a
        .receive
        .clone()
        .expect("a receive row has receive figures");
    assert_eq!(r.nic_rx_payload_bytes, SRC_LEN);
    assert_eq!(r.disk_out_bytes, SRC_LEN);
    assert_eq!(r.disk_payload_bytes, SRC_LEN);
    assert_eq!(r.disk_file_bytes, SRC_LEN);
    assert_eq!(r.disk_zero_copy_bytes, 0);
    assert_eq!(r.disk_copied_bytes, SRC_LEN);
    assert!(r.flushed);
    assert_eq!(r.test_disk_bytes, 0);
    assert_eq!(a.cpu_copied_bytes, 2 * SRC_LEN, "{a:#?}");
    assert_eq!(a.cpu_copies, 2.0);
    assert_eq!(a.dma_copies, 2);
    assert_eq!(a.zero_copy_pct, 0.0);
    // The send-side figures stay at zero: the guest's SYN and ACKs carry no payload
    // to the peer, and nothing was read from the test disk.
    assert_eq!((a.nic_payload_bytes, a.disk_dma_bytes), (0, 0));
    assert_eq!(a.verdict, Verdict::Pass, "{a:#?}");
    assert!(a.findings.is_empty(), "{:?}", a.findings);
}

/// The disk reads the very pages the NIC wrote (a header-split NIC under
/// tcp_zerocopy_receive and an O_DIRECT write): zero-copy, no CPU copy. Judged by
/// the tcp_zerocopy_receive row, which expects virtio-net to give no such pages,
/// it FAILs, on exactly those two figures.
#[test]
fn disk_reading_the_nics_pages_is_zero_copy() {
    let pages: Vec<u64> = (0..SRC_LEN / PAGE).map(|p| rx_page(p * PAGE)).collect();
    let (s, reports) = receive_span(
        "tcp_zerocopy_receive",
        &mut |s, rx, lo, hi| rx.page_frames(s, lo, hi),
        &written_and_flushed(&pages),
    );
    let a = audited(&s, reports);
    let r = a.receive.clone().unwrap();
    assert_eq!(r.nic_rx_payload_bytes, SRC_LEN);
    assert_eq!(r.disk_zero_copy_bytes, SRC_LEN, "{a:#?}");
    assert_eq!(a.zero_copy_pct, 100.0);
    assert_eq!(a.cpu_copied_bytes, 0);
    assert_eq!(a.dma_copies, 2);
    assert_eq!(
        a.reasons,
        vec![
            "cpu_copies 0.00, expected 1.00 ± 0.15",
            "zero_copy_pct 100.0%, expected <= 10.0%"
        ]
    );
}

/// The CPU copies each page the NIC wrote to a page-cache page (same page offset,
/// same content) and the disk reads the copy: equal bytes, another page, so not
/// zero-copy, and one CPU copy.
#[test]
fn disk_reading_a_copy_of_the_nics_page_is_not_zero_copy() {
    let (s, reports) = receive_span(
        "recv_mmap",
        &mut |s, rx, lo, hi| {
            rx.page_frames(s, lo, hi);
            for (off, _) in by_page(lo, hi) {
                s.cpu_copy(pc_page(off / PAGE), rx_page(off), PAGE);
            }
        },
        &written_and_flushed(&page_cache_pages()),
    );
    let a = audited(&s, reports);
    let r = a.receive.clone().unwrap();
    assert_eq!(r.disk_payload_bytes, SRC_LEN);
    assert_eq!(r.disk_zero_copy_bytes, 0, "{a:#?}");
    assert_eq!(r.disk_copied_bytes, SRC_LEN);
    assert_eq!(a.cpu_copied_bytes, SRC_LEN);
    assert_eq!(a.cpu_copies, 1.0);
    assert_eq!(a.verdict, Verdict::Pass, "{a:#?}");
}

/// KVM's log says the CPU wrote the NIC's page before the disk read it: the bytes
/// are where the NIC put them and unchanged, but nothing shows the CPU did not
/// rewrite them, so they are not counted zero-copy, and a finding says why.
#[test]
fn a_cpu_write_to_the_nics_page_denies_zero_copy() {
    let pages: Vec<u64> = (0..SRC_LEN / PAGE).map(|p| rx_page(p * PAGE)).collect();
    let (s, reports) = receive_span(
        "tcp_zerocopy_receive",
        &mut |s, rx, lo, hi| {
            rx.page_frames(s, lo, hi);
            s.cpu_touch(rx_page(lo));
        },
        &written_and_flushed(&pages),
    );
    let a = audited(&s, reports);
    let r = a.receive.clone().unwrap();
    assert_eq!(r.disk_zero_copy_bytes, SRC_LEN - 2 * PAGE, "{a:#?}");
    // The touched pages hold the NIC's payload where it put it: no CPU copy.
    assert_eq!(a.cpu_copied_bytes, 0);
    assert_eq!(a.cpu_dma_destination_bytes, 2 * PAGE);
    assert!(
        a.findings
            .iter()
            .any(|f| f.starts_with("8192 payload bytes")),
        "{:?}",
        a.findings
    );
}

#[test]
fn a_receive_without_flush_fails() {
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &page_cache_pages()
            .into_iter()
            .map(DiskOp::Out)
            .collect::<Vec<_>>(),
    );
    let a = audited(&s, reports);
    assert_eq!(a.verdict, Verdict::Fail);
    assert_eq!(
        a.reasons,
        vec!["no FLUSH before END: the data may not be on the disk"]
    );
    assert!(!a.receive.unwrap().flushed);
}

/// A FLUSH that came before the last OUT does not cover it.
#[test]
fn a_flush_before_the_last_out_does_not_count() {
    let mut disk = written_and_flushed(&page_cache_pages());
    let last = disk.remove(disk.len() - 2);
    disk.push(last);
    let (s, reports) = receive_span("recv_write", &mut recv_write_body, &disk);
    let a = audited(&s, reports);
    assert_eq!(a.receive.as_ref().unwrap().disk_file_bytes, SRC_LEN);
    assert_eq!(
        a.reasons,
        vec!["no FLUSH before END: the data may not be on the disk"]
    );
}

#[test]
fn a_receive_whose_disk_content_falls_short_fails_with_the_figure() {
    let mut pages = page_cache_pages();
    // File page 5 never written out.
    pages.remove(5);
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&pages),
    );
    let a = audited(&s, reports);
    assert_eq!(a.verdict, Verdict::Fail);
    assert_eq!(
        a.reasons,
        vec!["the scratch disk wrote out 28672 of the 32768 bytes received (first missing: file bytes 20480..24576)"]
    );
    let r = a.receive.unwrap();
    assert_eq!(r.disk_file_bytes, SRC_LEN - PAGE);
    assert_eq!(r.disk_out_bytes, SRC_LEN - PAGE);
}

/// The same page written out twice counts twice as DMA, once as file content; a
/// page of other bytes (metadata) counts as DMA only.
#[test]
fn rewrites_and_metadata_count_as_dma_not_as_file_content() {
    let mut pages = page_cache_pages();
    pages.push(pc_page(0));
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&pages),
    );
    let a = audited(&s, reports);
    let r = a.receive.unwrap();
    assert_eq!(r.disk_out_bytes, SRC_LEN + PAGE);
    assert_eq!(r.disk_payload_bytes, SRC_LEN + PAGE);
    assert_eq!(r.disk_file_bytes, SRC_LEN);

    let mut pages = page_cache_pages();
    pages.push(META + 0x8000);
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&pages),
    );
    let a = audited(&s, reports);
    let r = a.receive.clone().unwrap();
    assert_eq!(r.disk_out_bytes, SRC_LEN + PAGE);
    assert_eq!(r.disk_payload_bytes, SRC_LEN);
    assert_eq!(a.verdict, Verdict::Pass, "{a:#?}");
}

/// Without the peer's SYN-ACK from the send port nothing is the method's: no NIC
/// payload, a finding, and the NIC's share of the DMA copies is gone.
#[test]
fn rx_frames_of_another_connection_are_not_the_methods() {
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&page_cache_pages()),
    );
    let mut input_records = s.records().to_vec();
    for r in &mut input_records {
        if let zc_dma_log::Record::Request(q) = r {
            if let zc_dma_log::RequestDetail::Net(n) = &mut q.req {
                if n.tcp_flags.as_deref() == Some("SA") {
                    n.tcp_ports = Some((7878, GUEST_PORT));
                }
            }
        }
    }
    let input = AuditInput {
        records: input_records,
        source: s.src.clone(),
        reports,
        variant: "sg-on".into(),
        card: None,
        kernel_release: None,
    };
    let a = audit(&input, &expected_toml()).remove(0);
    assert_eq!(a.receive.as_ref().unwrap().nic_rx_payload_bytes, 0);
    assert_eq!(a.dma_copies, 1);
    assert!(
        a.findings
            .iter()
            .any(|f| f.contains("no SYN-ACK from the peer's port 7879")),
        "{:?}",
        a.findings
    );
    assert_eq!(a.verdict, Verdict::Fail);
}

#[test]
fn a_receive_verdict_says_its_direction_in_json() {
    let (s, reports) = receive_span(
        "recv_write",
        &mut recv_write_body,
        &written_and_flushed(&page_cache_pages()),
    );
    let a = audited(&s, reports);
    let v = serde_json::to_value(&a).unwrap();
    assert_eq!(v["direction"], "receive");
    assert_eq!(v["receive"]["nic_rx_payload_bytes"], SRC_LEN);
    assert_eq!(v["receive"]["disk_file_bytes"], SRC_LEN);
    assert_eq!(v["receive"]["flushed"], true);
}
