//! The writer thread and its queue, through a `DmaLog`.

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "guest-memory")]
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{table_hashes, Batch, Body, Detail, Entry, Pieces};
use crate::handle::Chain;
use crate::test_util::Out;
use crate::{
    fingerprint, pieces_of, DescInfo, DescRole, DeviceKind, Direction, DmaLog, NetRequest, Record,
    RequestDetail, StableFile,
};

fn info(gpa: u64, len: u32) -> DescInfo {
    DescInfo {
        device: DeviceKind::Net,
        queue: 1,
        head: 0,
        desc: 0,
        indirect: false,
        gpa,
        len,
        dir: Direction::DeviceReads,
        role: DescRole::Data,
    }
}

fn content(len: usize, salt: u32) -> Vec<u8> {
    (0..u32::try_from(len).unwrap())
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13 ^ salt).to_le_bytes()[0])
        .collect()
}

#[test]
fn concurrent_producers_get_one_seq_order() {
    let out = Out::default();
    let log = out.log();
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let bytes = content(300, t);
                for i in 0..500u32 {
                    if i % 2 == 0 {
                        log.marker(&format!("t{t} {i}"));
                    } else {
                        let mut d = info(u64::from(t) << 32 | u64::from(i), 300);
                        d.head = u16::try_from(t).unwrap();
                        d.desc = u16::try_from(i).unwrap();
                        log.descriptor_bytes(d, &bytes);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    log.flush().unwrap();
    let recs = out.records();
    assert_eq!(recs.len(), 2000);
    let mut last_t = 0;
    let mut next = [0u32; 4];
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq(), Some(i as u64), "records are written in seq order");
        let (t, n, t_ns) = match r {
            Record::Marker(m) => {
                let (t, n) = m.label[1..].split_once(' ').unwrap();
                (t.parse::<usize>().unwrap(), n.parse().unwrap(), m.t_ns)
            }
            Record::Desc(d) => {
                let t = d.head as usize;
                assert_eq!(d.pieces, pieces_of(d.gpa, &content(300, u32::from(d.head))));
                (t, u32::from(d.desc), d.t_ns)
            }
            other => panic!("unexpected {other:?}"),
        };
        assert!(t_ns >= last_t, "t_ns is non-decreasing in seq order");
        last_t = t_ns;
        assert_eq!(n, next[t], "each thread's records keep its order");
        next[t] += 1;
    }
}

#[test]
fn the_writer_thread_runs_at_nice_19() {
    let out = Out::default();
    let log = out.log();
    log.marker("m");
    // The writer lowers its priority before it writes anything.
    log.flush().unwrap();
    let mut writers = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if name.trim_end() != "zc-dma-log" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the `(comm)` one start at field 3 (state); nice is field 19.
        let after_comm = &stat[stat.rfind(')').unwrap() + 1..];
        let nice = after_comm.split_whitespace().nth(19 - 3).unwrap();
        assert_eq!(nice, "19", "{}", dir.display());
        writers += 1;
    }
    assert!(writers >= 1, "no zc-dma-log thread found");
    drop(log);
}

#[test]
fn flush_waits_for_everything_queued() {
    let out = Out::slow(Duration::from_millis(30));
    let log = out.log();
    for i in 0..100 {
        log.marker(&format!("m{i}"));
    }
    log.flush().unwrap();
    assert_eq!(out.records().len(), 100);
    assert!(out.flushes.load(Ordering::SeqCst) >= 1);
    // Nothing queued: still a flush of the output.
    let before = out.flushes.load(Ordering::SeqCst);
    log.flush().unwrap();
    assert!(out.flushes.load(Ordering::SeqCst) > before);
}

#[test]
fn dropping_the_last_handle_writes_what_is_queued() {
    let out = Out::slow(Duration::from_millis(20));
    let log = out.log();
    let other = log.clone();
    for i in 0..50 {
        log.marker(&format!("m{i}"));
    }
    drop(log);
    other.marker("last");
    drop(other);
    let recs = out.records();
    assert_eq!(recs.len(), 51);
    assert!(matches!(&recs[50], Record::Marker(m) if m.label == "last"));
}

#[test]
fn write_errors_stop_the_log_and_every_flush_reports_them() {
    let out = Out {
        fail_after: Some(2000),
        ..Out::default()
    };
    let log = out.log();
    let bytes = content(1000, 1);
    for i in 0..5000u64 {
        log.descriptor_bytes(info(i * 4096, 1000), &bytes);
    }
    let err = log.flush().unwrap_err();
    assert!(err.to_string().contains("disk full (test)"), "{err}");
    let written = out.buf.lock().unwrap().len();
    log.marker("after the error");
    let again = log.flush().unwrap_err();
    assert!(again.to_string().contains("disk full (test)"), "{again}");
    assert_eq!(
        out.buf.lock().unwrap().len(),
        written,
        "nothing after an error"
    );
}

#[test]
fn a_slow_output_holds_producers_back_without_losing_records() {
    let out = Out::slow(Duration::from_millis(2));
    let log = out.log();
    let bytes = content(256 << 10, 7);
    // 40 × 256 KiB is several times what one batch may hold.
    for i in 0..40u64 {
        log.descriptor_bytes(info(i << 20, u32::try_from(bytes.len()).unwrap()), &bytes);
    }
    log.flush().unwrap();
    let recs = out.records();
    assert_eq!(recs.len(), 40);
    for (i, r) in recs.iter().enumerate() {
        let Record::Desc(d) = r else { panic!("{r:?}") };
        assert_eq!(d.gpa, (i as u64) << 20);
        assert_eq!(d.pieces.len(), 64);
        assert_eq!(d.pieces[5].hash.0, fingerprint(&bytes[5 * 4096..6 * 4096]));
    }
}

#[cfg(feature = "guest-memory")]
#[test]
fn copies_are_taken_when_the_device_accesses_memory() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let before = content(0x3000, 3);
    mem.write_slice(&before, GuestAddress(0x1800)).unwrap();
    let out = Out::default();
    let log = out.log();
    log.descriptor_from_guest(&mem, info(0x1800, 0x3000));
    // The guest reuses the buffer at once; the writer has not hashed it yet.
    mem.write_slice(&[0u8; 0x3000], GuestAddress(0x1800))
        .unwrap();
    // Not all of it in guest memory: no pieces, as before.
    log.descriptor_from_guest(&mem, info(0xff000, 0x2000));
    log.flush().unwrap();
    let recs = out.records();
    let Record::Desc(d) = &recs[0] else { panic!() };
    assert_eq!(d.pieces, pieces_of(0x1800, &before));
    assert_eq!(d.pieces.len(), 4);
    let Record::Desc(d) = &recs[1] else { panic!() };
    assert!(d.pieces.is_empty());
    assert_eq!(d.len, 0x2000);
}

/// A log over an [`Out`] with a 3 MiB file of `content(_, salt)` registered as
/// stable.
struct Stable {
    data: Vec<u8>,
    file: std::fs::File,
    out: Out,
    log: DmaLog,
    stable: StableFile,
}

fn stable_file_log(salt: u32) -> Stable {
    let data = content(3 << 20, salt);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&data).unwrap();
    let out = Out::default();
    let log = out.log();
    let stable = log.stable_file(&file).unwrap();
    Stable {
        data,
        file,
        out,
        log,
        stable,
    }
}

#[test]
fn stable_file_ranges_are_fingerprinted_from_the_file() {
    let Stable {
        data,
        file,
        out,
        log,
        stable,
    } = stable_file_log(9);
    assert!(DmaLog::disabled().stable_file(&file).is_none());
    // Longer than the writer's read chunk and not page aligned in the guest: the
    // chunks must not split a piece.
    let (gpa, off, len) = (0x10_0123u64, 4096 + 77u64, (2 << 20) + 1000u32);
    log.descriptor_from_file(info(gpa, len), stable, off);
    log.descriptor_from_file(info(0x5000, 512), stable, 512);
    log.flush().unwrap();
    let recs = out.records();
    let Record::Desc(d) = &recs[0] else { panic!() };
    let off = usize::try_from(off).unwrap();
    let want = &data[off..off + len as usize];
    assert_eq!(d.pieces, pieces_of(gpa, want));
    let Record::Desc(d) = &recs[1] else { panic!() };
    assert_eq!(d.pieces, pieces_of(0x5000, &data[512..1024]));
    // Reading past the end is a log error, not a wrong fingerprint.
    log.descriptor_from_file(info(0, 4096), stable, data.len() as u64);
    assert!(log.flush().is_err());
}

#[test]
fn page_aligned_reads_take_the_file_page_table_and_match_hashing() {
    let Stable {
        data,
        out,
        log,
        stable,
        ..
    } = stable_file_log(4);
    let shared = &log.inner.as_ref().unwrap().shared;
    let pages = shared.files.lock().unwrap()[stable.0 as usize]
        .pages
        .clone();
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while !pages.is_ready() {
        assert!(std::time::Instant::now() < give_up, "no page table");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Aligned (from the table, across the writer's read chunks), aligned in the
    // guest but not in the file, and a partial page: all must read as hashed.
    let cases = [
        (0x20_0000u64, 8192u64, (1 << 20) + 4096u32),
        (0x20_0000, 8192 + 512, 8192),
        (0x30_0000, 4096, 100),
    ];
    for (gpa, off, len) in cases {
        log.descriptor_from_file(info(gpa, len), stable, off);
    }
    log.flush().unwrap();
    let recs = out.records();
    for (i, (gpa, off, len)) in cases.into_iter().enumerate() {
        let Record::Desc(d) = &recs[i] else { panic!() };
        let off = usize::try_from(off).unwrap();
        let want = &data[off..off + len as usize];
        assert_eq!(d.pieces, pieces_of(gpa, want), "case {i}");
    }
    assert_eq!(
        table_hashes(&pages, 0x20_0000, 8192, 8192),
        Some(vec![
            fingerprint(&data[8192..12288]),
            fingerprint(&data[12288..16384])
        ])
    );
    assert_eq!(table_hashes(&pages, 0x20_0000, 8192 + 512, 8192), None);
}

#[test]
fn deferred_request_details_see_the_bytes_as_they_were() {
    fn detail(bytes: &[u8], arg: u64) -> RequestDetail {
        RequestDetail::Net(NetRequest {
            summary: format!("{} {arg}", String::from_utf8_lossy(bytes)),
            tcp_seq: None,
            tcp_len: None,
            tcp_flags: None,
            tcp_payload_off: None,
            tcp_ports: None,
        })
    }
    let out = Out::default();
    let log = out.log();
    let mut frame = b"frame one".to_vec();
    log.request_from_bytes(DeviceKind::Net, 0, 3, &frame, 2, detail);
    frame.copy_from_slice(b"overwrite");
    log.flush().unwrap();
    let recs = out.records();
    match &recs[0] {
        Record::Request(r) => match &r.req {
            RequestDetail::Net(n) => assert_eq!(n.summary, "frame one 2"),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}

fn text_detail(bytes: &[u8], arg: u64) -> RequestDetail {
    RequestDetail::Net(NetRequest {
        summary: format!("{} {arg}", String::from_utf8_lossy(bytes)),
        tcp_seq: None,
        tcp_len: None,
        tcp_flags: None,
        tcp_payload_off: None,
        tcp_ports: None,
    })
}

fn summaries(recs: &[Record]) -> Vec<String> {
    recs.iter()
        .filter_map(|r| match r {
            Record::Request(r) => match &r.req {
                RequestDetail::Net(n) => Some(n.summary.clone()),
                RequestDetail::Blk(_) => None,
            },
            _ => None,
        })
        .collect()
}

/// A TX read as the net device logs it: the 12-byte header, then the frame, of
/// chain `head`.
fn log_tx_read(log: &DmaLog, head: u16, read: &[u8]) {
    for (at, len) in [(0, 12), (12, read.len() - 12)] {
        let mut d = info(0x1000 + at as u64, u32::try_from(len).unwrap());
        d.head = head;
        log.descriptor_bytes(d, &read[at..at + len]);
    }
}

#[test]
fn a_request_from_a_read_sees_the_read_patched_or_the_bytes_given() {
    let out = Out::default();
    let log = out.log();
    let read = b"0123456789ABframe as read".to_vec();
    // What the device sends: the checksum field (2 bytes at 6) completed.
    let mut sent = read[12..].to_vec();
    sent[6..8].copy_from_slice(b"XY");
    let patch = Some(crate::FramePatch {
        at: 6,
        bytes: *b"XY",
    });
    // The bytes given differ from the read (+ patch) in their last byte, as a
    // probe: the summary says which of the two the writer saw.
    let mut given = sent.clone();
    *given.last_mut().unwrap() = b'D';
    // The writer may take the batch between a read and its request (it lingers
    // 2 ms after the first record), and then the bytes given are copied: of 20
    // frames, all but such rare ones must reuse the read.
    for head in 100..120 {
        log_tx_read(&log, head, &read);
        log.request_from_read(DeviceKind::Net, 1, head, 12, &given, patch, 1, text_detail);
    }
    // Another record in between: the bytes given are copied.
    log_tx_read(&log, 2, &read);
    log.marker("between");
    log.request_from_read(DeviceKind::Net, 1, 2, 12, &given, patch, 2, text_detail);
    // A read of another length than skip + the bytes: copied too.
    log_tx_read(&log, 3, &read);
    log.request_from_read(DeviceKind::Net, 1, 3, 11, &given, patch, 3, text_detail);
    log.flush().unwrap();
    let got = summaries(&out.records());
    let reused = got[..20].iter().filter(|s| *s == "frame XY read 1").count();
    assert!(
        reused >= 15 && got[..20].iter().all(|s| s.starts_with("frame XY rea")),
        "{got:?}"
    );
    assert_eq!(got[20..], ["frame XY reaD 2", "frame XY reaD 3"]);
}

#[test]
fn only_a_chains_last_contiguous_copies_are_its_read() {
    let on_card = |head, card| Chain {
        device: DeviceKind::Net,
        card,
        queue: 1,
        head,
    };
    let chain = |head| on_card(head, 0);
    let mut batch = Batch::new();
    let push_desc = |batch: &mut Batch, card: u16, head: u16, bytes: &[u8]| {
        let mut d = info(0, u32::try_from(bytes.len()).unwrap());
        d.head = head;
        let c = batch.copy(bytes);
        batch.entries.push(Entry {
            seq: 0,
            t_ns: 0,
            card,
            body: Body::Desc(d, Pieces::Copied(c)),
        });
    };
    assert!(batch.trailing_copies_of(chain(1)).is_none());
    push_desc(&mut batch, 0, 7, b"other chain");
    push_desc(&mut batch, 0, 1, b"header");
    push_desc(&mut batch, 0, 1, b"frame");
    let read = batch.trailing_copies_of(chain(1)).unwrap();
    assert_eq!(read.of(&batch.bytes), b"headerframe");
    assert_eq!(read.skip(6, 5).unwrap().of(&batch.bytes), b"frame");
    assert!(read.skip(6, 4).is_none());
    assert!(batch.trailing_copies_of(chain(7)).is_none());
    // The same queue and head on another card is another chain.
    assert!(batch.trailing_copies_of(on_card(1, 1)).is_none());
    push_desc(&mut batch, 1, 1, b"card one");
    assert!(batch.trailing_copies_of(chain(1)).is_none());
    let read = batch.trailing_copies_of(on_card(1, 1)).unwrap();
    assert_eq!(read.of(&batch.bytes), b"card one");
    // A copy after them that is no desc of the chain: not its read any more.
    let extra = batch.copy(b"request bytes");
    batch.entries.push(Entry {
        seq: 0,
        t_ns: 0,
        card: 1,
        body: Body::Request(
            on_card(1, 1),
            Detail::Deferred {
                bytes: extra,
                arg: 0,
                detail: text_detail,
                patch: None,
            },
        ),
    });
    assert!(batch.trailing_copies_of(on_card(1, 1)).is_none());
}

#[test]
fn flush_returns_when_the_writer_is_gone() {
    // A writer that panics (here: an output whose write panics) must not leave
    // `flush` waiting forever.
    struct Panics(Arc<AtomicBool>);
    impl io::Write for Panics {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.0.store(true, Ordering::SeqCst);
            panic!("output panicked (test)");
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let hit = Arc::new(AtomicBool::new(false));
    let log = DmaLog::new(Panics(hit.clone())).unwrap();
    log.marker("x");
    assert!(log.flush().is_err());
    assert!(hit.load(Ordering::SeqCst));
    log.marker("ignored");
    assert!(log.flush().is_err());
}

/// An output on a disk that fills up after `room` bytes: the write that reaches
/// the limit is short, the next fails with ENOSPC, as `write(2)` does.
#[derive(Clone)]
struct FillsUp {
    written: Arc<std::sync::Mutex<Vec<u8>>>,
    room: usize,
}

impl io::Write for FillsUp {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let mut written = self.written.lock().unwrap();
        let left = self.room - written.len();
        if left == 0 {
            // ENOSPC on Linux (this crate has no libc).
            return Err(io::Error::from_raw_os_error(28));
        }
        let n = b.len().min(left);
        written.extend_from_slice(&b[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_full_disk_is_reported_when_the_writer_meets_it_not_at_the_next_flush() {
    let out = FillsUp {
        written: Arc::default(),
        room: 3 << 20,
    };
    let log = DmaLog::new(out.clone()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    log.on_write_error(move |e| tx.send(e.to_string()).unwrap());
    let bytes = content(4096, 3);
    let mut told = None;
    // Never flushes: only the writer thread's own writes can meet the full disk.
    for i in 0..1_000_000u64 {
        log.descriptor_bytes(info(i * 4096, 4096), &bytes);
        if let Ok(e) = rx.try_recv() {
            told = Some((i, e));
            break;
        }
    }
    let (at, e) = told.expect("the hook was told within a million records");
    assert_eq!(e, "No space left on device (os error 28)");
    // ~3 MiB of lines is a few thousand records; the writer lags by at most a batch.
    assert!(at < 100_000, "told only after {at} records");
    // The devices keep going, the log records nothing more.
    let full = out.written.lock().unwrap().len();
    for i in 0..10_000u64 {
        log.descriptor_bytes(info(i * 4096, 4096), &bytes);
    }
    let err = log.flush().unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
    assert_eq!(out.written.lock().unwrap().len(), full);
    // What reached the disk ends inside a line: a reader says the log is cut short.
    let text = out.written.lock().unwrap().clone();
    let read: Result<Vec<Record>, _> = crate::DmaLogReader::new(&text[..]).unwrap().collect();
    assert!(
        matches!(read, Err(crate::DmaLogError::Truncated { .. })),
        "{:?}",
        read.map(|r| r.len())
    );
    // A hook set after the failure is told at once, on the caller's thread.
    let (tx, rx) = std::sync::mpsc::channel();
    log.on_write_error(move |e| tx.send(e.to_string()).unwrap());
    assert_eq!(
        rx.try_recv().unwrap(),
        "No space left on device (os error 28)"
    );
}

#[test]
fn a_log_that_writes_fine_never_calls_its_error_hook() {
    let out = Out::default();
    let log = out.log();
    let called = Arc::new(AtomicBool::new(false));
    let flag = called.clone();
    log.on_write_error(move |_| flag.store(true, Ordering::SeqCst));
    log.marker("fine");
    log.flush().unwrap();
    drop(log);
    assert!(!called.load(Ordering::SeqCst));
    assert_eq!(out.records().len(), 1);
}

/// The same with a compressed log: zstd's own buffering does not hide the full
/// disk until a flush.
#[test]
fn a_full_disk_under_a_compressed_log_is_reported_when_the_writer_meets_it() {
    let out = FillsUp {
        written: Arc::default(),
        room: 256 << 10,
    };
    let log = DmaLog::new(crate::zst::ZstdFrames::new(out.clone(), 1)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    log.on_write_error(move |e| tx.send(e.to_string()).unwrap());
    let mut told = None;
    for i in 0..1_000_000u64 {
        // Each record its own fingerprint, so that the log does not compress away.
        let bytes = content(64, u32::try_from(i).unwrap());
        log.descriptor_bytes(info(i * 4096, 64), &bytes);
        if let Ok(e) = rx.try_recv() {
            told = Some((i, e));
            break;
        }
    }
    let (at, e) = told.expect("the hook was told within a million records");
    assert_eq!(e, "No space left on device (os error 28)");
    assert!(at < 200_000, "told only after {at} records");
    let err = log.flush().unwrap_err();
    assert!(err.to_string().contains("No space left on device"), "{err}");
}
