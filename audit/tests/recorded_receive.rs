//! The audit of receive spans on a log recorded from a real guest: Debian's 6.1
//! cloud kernel in `zc-vmm`, the in-VMM peer sending the first 128 KiB of the test
//! disk's payload to `recv_write`, `recv_direct` and `tcp_zerocopy_receive` in
//! 32 KiB chunks (how it was made: `data/README.md`). Unlike the simulator's
//! scenarios (`receive.rs`), nothing here is arranged: the page cache, the user
//! buffers and the receive buffers are wherever Linux put them. In every one of
//! these methods the disk reads a copy of the payload, never the page the NIC
//! filled: the rows must say so, and say how many copies the CPU made.

use std::path::{Path, PathBuf};

use zc_audit::{audit, parse_reports, AuditInput, Expectations, MethodAudit, Verdict};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/recorded")
        .join(name)
}

/// The recorded run's rows, judged against the shipped table.
fn recorded() -> Vec<MethodAudit> {
    let records = zc_dma_log::read_log(&data("receive-6.1.dma-log.jsonl.zst")).unwrap();
    let reports =
        parse_reports(&std::fs::read_to_string(data("receive-6.1.reports.jsonl")).unwrap())
            .unwrap();
    let input = AuditInput {
        records,
        source: std::fs::read(data("receive-6.1.source.bin")).unwrap(),
        reports,
        variant: "sg-on".into(),
        card: Some(0),
        kernel_release: Some("6.1.0-57-cloud-amd64".into()),
    };
    let expected =
        Expectations::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("expected.toml")).unwrap();
    audit(&input, &expected)
}

fn row<'a>(rows: &'a [MethodAudit], method: &str) -> &'a MethodAudit {
    rows.iter()
        .find(|r| r.method == method)
        .unwrap_or_else(|| panic!("no {method} row in {rows:#?}"))
}

#[test]
fn a_recorded_receive_run_passes_its_rows() {
    let rows = recorded();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for r in &rows {
        assert_eq!(r.verdict, Verdict::Pass, "{r:#?}");
        let receive = r.receive.as_ref().expect("a receive row's figures");
        assert!(receive.flushed, "{r:#?}");
        assert!(receive.nic_rx_payload_bytes >= r.bytes, "{r:#?}");
        assert_eq!(receive.disk_file_bytes, r.bytes, "{r:#?}");
    }
}

/// The disk read a copy: every payload byte it wrote out came from a page the CPU
/// filled, none from the NIC's own receive buffers.
#[test]
fn the_disk_read_copies_not_the_nics_pages() {
    for r in recorded() {
        let receive = r.receive.as_ref().unwrap();
        assert_eq!(receive.disk_zero_copy_bytes, 0, "{}: {r:#?}", r.method);
        assert_eq!(receive.disk_copied_bytes, r.bytes, "{}: {r:#?}", r.method);
    }
}

/// recv + write copies twice (socket buffer -> user buffer -> page cache); with
/// O_DIRECT once (the disk takes the user buffer); TCP_ZEROCOPY_RECEIVE maps nothing
/// of virtio-net's receive buffers (the payload sits behind the headers) and falls
/// back to one copy.
#[test]
fn the_cpu_copies_tell_the_methods_apart() {
    let rows = recorded();
    let copies = |m: &str| row(&rows, m).cpu_copies;
    assert!(
        (copies("recv_write") - 2.0).abs() < 0.15,
        "{}",
        copies("recv_write")
    );
    assert!(
        (copies("recv_direct") - 1.0).abs() < 0.15,
        "{}",
        copies("recv_direct")
    );
    assert!(
        (copies("tcp_zerocopy_receive") - 1.0).abs() < 0.15,
        "{}",
        copies("tcp_zerocopy_receive")
    );
}
