//! Every access through the guest-chain type moves the bytes and logs exactly
//! them.

use std::io::{Read, Seek, Write};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::dma_log::{fingerprint, DescRecord, Record};
use crate::virtio::test_util::{add_chain, leaked_memory, read, MockQueue, TestLog, W};

const A: u64 = 0x1_0000;
const B: u64 = 0x2_0ff8;

/// The chain `descs` published at index 0 of a fresh queue, walked with `log`.
fn with_chain<R>(
    descs: &[(u64, u32, u16)],
    log: &DmaLog,
    f: impl FnOnce(&GuestChain, &GuestMem) -> R,
) -> R {
    let mem = leaked_memory(0x10_0000);
    let vq = MockQueue::new(mem, 16);
    add_chain(&vq, 0, descs);
    let queue: Queue = vq.create_queue().unwrap();
    let chain = GuestChain::walk(mem, log, DeviceKind::Net, 1, &queue, 0, false).unwrap();
    f(&chain, mem)
}

fn descs(log: &TestLog) -> Vec<DescRecord> {
    log.descs()
}

/// `(desc, gpa, len, role, dir)` of each record.
fn shape(d: &[DescRecord]) -> Vec<(u16, u64, u32, DescRole, Direction)> {
    d.iter()
        .map(|d| (d.desc, d.gpa, d.len, d.role, d.dir))
        .collect()
}

#[test]
fn read_logs_each_descriptor_per_role_with_the_bytes_read() {
    let log = TestLog::new();
    let bytes: Vec<u8> = (0..28u8).collect();
    let got = with_chain(&[(A, 8, 0), (B, 20, 0)], &log.dma, |chain, mem| {
        mem.write_slice(&bytes[..8], GuestAddress(A)).unwrap();
        mem.write_slice(&bytes[8..], GuestAddress(B)).unwrap();
        let mut buf = vec![0u8; 28];
        let n = chain
            .all()
            .read(&mut buf, Roles::header_then_data(12))
            .unwrap();
        (n, buf)
    });
    assert_eq!(got, (28, bytes.clone()));
    let d = descs(&log);
    let r = Direction::DeviceReads;
    assert_eq!(
        shape(&d),
        vec![
            (0, A, 8, DescRole::Header, r),
            (1, B, 4, DescRole::Header, r),
            (1, B + 4, 16, DescRole::Data, r),
        ]
    );
    assert!(d
        .iter()
        .all(|d| d.device == DeviceKind::Net && d.queue == 1));
    // The data record crosses a page boundary 4 bytes in: two pieces.
    let data = &d[2];
    assert_eq!(data.pieces.len(), 2);
    assert_eq!(data.pieces[0].hash.0, fingerprint(&bytes[12..16]));
    assert_eq!(data.pieces[1].hash.0, fingerprint(&bytes[16..]));
}

#[test]
fn write_stops_at_the_bytes_given_and_logs_only_what_it_wrote() {
    let log = TestLog::new();
    let frame = [0xabu8; 10];
    let (n, first, second) = with_chain(&[(A, 6, W), (B, 100, W)], &log.dma, |chain, mem| {
        let n = chain
            .writable()
            .write(&frame, Roles::all(DescRole::Data))
            .unwrap();
        (n, read(mem, A, 6), read(mem, B, 5))
    });
    assert_eq!(n, 10);
    assert_eq!(first, [0xab; 6]);
    assert_eq!(second, [0xab, 0xab, 0xab, 0xab, 0]);
    let w = Direction::DeviceWrites;
    assert_eq!(
        shape(&descs(&log)),
        vec![(0, A, 6, DescRole::Data, w), (1, B, 4, DescRole::Data, w)]
    );
}

#[test]
fn split_at_cuts_inside_a_descriptor() {
    let log = TestLog::new();
    with_chain(
        &[(A, 16, 0), (B, 100, W), (A + 0x100, 1, W)],
        &log.dma,
        |chain, _| {
            let all = chain.all();
            assert_eq!((all.len(), all.segment_count()), (117, 3));
            let (front, back) = all.split_at(20);
            assert_eq!((front.len(), front.segment_count()), (20, 2));
            assert_eq!((back.len(), back.first_descriptor()), (97, Some(1)));
            assert_eq!(back.longest_segment(), Some((1, 96)));
            let (status_free, status) = chain.writable().split_at(100);
            assert_eq!((status_free.len(), status.len()), (100, 1));
            assert_eq!(status.first_descriptor(), Some(2));
            assert!(chain.readable().split_at(16).1.is_empty());
        },
    );
}

#[test]
fn file_transfers_log_the_bytes_moved() {
    let mut file = tempfile::tempfile().unwrap();
    let content: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 251) as u8).collect();
    file.write_all(&content).unwrap();
    for stable in [false, true] {
        let log = TestLog::new();
        let registered = if stable {
            log.dma.stable_file(&file)
        } else {
            None
        };
        assert_eq!(
            registered.is_some(),
            stable,
            "tempfile on a local file system"
        );
        let (filled, overwritten) =
            with_chain(&[(A, 1024, W), (B, 2048, W)], &log.dma, |chain, mem| {
                chain
                    .writable()
                    .fill_from_file(&mut file, 512, registered)
                    .unwrap();
                let filled = [read(mem, A, 1024), read(mem, B, 2048)].concat();
                // The guest reuses the buffer at once: the log keeps what was filled.
                mem.write_slice(&[0; 2048], GuestAddress(B)).unwrap();
                (filled, read(mem, B, 8))
            });
        assert_eq!(filled, &content[512..512 + 3072]);
        assert_eq!(overwritten, [0; 8]);
        let d = descs(&log);
        let w = Direction::DeviceWrites;
        assert_eq!(
            shape(&d),
            vec![
                (0, A, 1024, DescRole::Data, w),
                (1, B, 2048, DescRole::Data, w)
            ]
        );
        let hashes: Vec<u64> = d.iter().flat_map(|d| &d.pieces).map(|p| p.hash.0).collect();
        let want = [
            fingerprint(&content[512..1536]),
            fingerprint(&content[1536..1544]),
            fingerprint(&content[1544..3584]),
        ];
        assert_eq!(hashes, want, "stable file: {stable}");
    }
}

#[test]
fn write_to_file_logs_what_the_device_read() {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&[0u8; 4096]).unwrap();
    let log = TestLog::new();
    with_chain(&[(A, 512, 0), (B, 512, 0)], &log.dma, |chain, mem| {
        mem.write_slice(&[1; 512], GuestAddress(A)).unwrap();
        mem.write_slice(&[2; 512], GuestAddress(B)).unwrap();
        chain.readable().write_to_file(&mut file, 1024).unwrap();
    });
    let mut back = Vec::new();
    file.rewind().unwrap();
    file.read_to_end(&mut back).unwrap();
    assert_eq!(&back[1024..1536], &[1; 512]);
    assert_eq!(&back[1536..2048], &[2; 512]);
    let d = descs(&log);
    let r = Direction::DeviceReads;
    assert_eq!(
        shape(&d),
        vec![
            (0, A, 512, DescRole::Data, r),
            (1, B, 512, DescRole::Data, r)
        ]
    );
    assert_eq!(d[1].pieces[0].hash.0, fingerprint(&[2; 8]));
    assert_eq!(d[1].pieces[1].hash.0, fingerprint(&[2; 504]));
}

#[test]
fn a_failed_access_logs_nothing() {
    let log = TestLog::new();
    // Unchecked: the second buffer lies past the end of guest memory.
    let err = with_chain(&[(A, 16, 0), (0xf_fff0, 64, 0)], &log.dma, |chain, _| {
        assert!(chain.check_buffers().is_err());
        let mut buf = [0u8; 80];
        chain
            .all()
            .read(&mut buf, Roles::all(DescRole::Data))
            .unwrap_err()
    });
    assert_eq!(err.desc, 1);
    assert!(err.to_string().starts_with("descriptor 1: "), "{err}");
    assert!(descs(&log).is_empty());
}

#[test]
fn chain_records_carry_its_head_and_queue() {
    let log = TestLog::new();
    with_chain(&[(A, 16, 0)], &log.dma, |chain, _| {
        chain.log_error("bad frame", false);
        chain.log_request_with(test_detail);
    });
    let recs = log.records();
    assert!(matches!(&recs[0], Record::DeviceError(e)
        if e.head == Some(0) && e.queue == 1 && e.error == "bad frame" && !e.needs_reset));
    assert!(matches!(&recs[1], Record::Request(r) if r.head == 0 && r.queue == 1));
    // With the log off, the detail is not even made.
    let off = DmaLog::disabled();
    with_chain(&[(A, 16, 0)], &off, |chain, _| {
        chain.log_request_with(|| unreachable!("detail made for a disabled log"));
    });
}

fn test_detail() -> RequestDetail {
    RequestDetail::Net(crate::dma_log::NetRequest {
        summary: "tx test".into(),
        tcp_seq: None,
        tcp_len: None,
        tcp_flags: None,
        tcp_payload_off: None,
        tcp_ports: None,
    })
}
