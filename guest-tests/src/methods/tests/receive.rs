//! The receive methods against a local sender on 127.0.0.1 that behaves like the
//! VMM's peer on its send port: per connection it sends the payload, reads the
//! guest's 8-byte count and then reads until the guest's FIN. The files go to a
//! temporary directory standing in for the scratch disk.
//!
//! On loopback the kernel rarely maps anything for TCP_ZEROCOPY_RECEIVE (the
//! sender's bytes sit at arbitrary offsets in its page fragments): either way is
//! accepted, but the bytes mapped and received must add up and the file must be
//! right.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::*;
use crate::methods::receive::target_path;

/// What the sender puts on each connection.
#[derive(Debug, Clone, Copy)]
enum Stream {
    /// The payload.
    Whole,
    /// Its first bytes, then FIN.
    Short(usize),
    /// The payload and this many bytes more.
    Extra(usize),
    /// The payload with the byte at this offset changed.
    Corrupt(usize),
    /// The payload in segments of whole pages, sent with MSG_ZEROCOPY from a
    /// page-aligned buffer: loopback copies such a send into fresh pages, each
    /// segment's payload starting a page, which TCP_ZEROCOPY_RECEIVE can map.
    PageAligned,
}

/// What the sender saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counted {
    /// Bytes it sent.
    sent: usize,
    /// The guest's count, when 8 bytes came.
    count: Option<u64>,
    /// Bytes from the guest that were neither the count nor nothing.
    other: usize,
}

/// The sender: accepts connections forever (the thread is left blocked in accept
/// when the test ends), serves each `stream`, reports what it saw once the guest
/// closed.
fn spawn_sender(payload: Vec<u8>, stream: Stream) -> (SocketAddrV4, mpsc::Receiver<Counted>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
        unreachable!()
    };
    if let Stream::PageAligned = stream {
        use std::os::fd::AsRawFd;
        // Accepted connections take the listener's MSS.
        crate::methods::syscalls::Syscalls::new()
            .setsockopt_int(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MAXSEG,
                PAGE_MSS,
            )
            .unwrap();
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let bytes = match stream {
                Stream::Whole | Stream::PageAligned => payload.clone(),
                Stream::Short(n) => payload[..n].to_vec(),
                Stream::Extra(n) => [payload.as_slice(), &vec![0x5a; n]].concat(),
                Stream::Corrupt(at) => {
                    let mut b = payload.clone();
                    b[at] ^= 0xff;
                    b
                }
            };
            let sent = match stream {
                Stream::PageAligned => send_page_aligned(&conn, &bytes),
                _ => conn.write_all(&bytes).map(|()| bytes.len()).unwrap_or(0),
            };
            if let Stream::Short(_) = stream {
                let _ = conn.shutdown(Shutdown::Write);
            }
            // Everything the guest sends until its FIN (or a reset).
            let mut back = Vec::new();
            let mut piece = [0u8; 64];
            loop {
                match conn.read(&mut piece) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => back.extend_from_slice(&piece[..n]),
                }
            }
            let count = <[u8; 8]>::try_from(&back[..back.len().min(8)])
                .ok()
                .map(u64::from_le_bytes);
            let other = back.len() - if count.is_some() { 8 } else { 0 };
            if tx.send(Counted { sent, count, other }).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// The MSS for [`Stream::PageAligned`]: 7 pages of payload per segment, plus the
/// 12 bytes the timestamp option takes from it (TCP_MAXSEG takes at most 32767).
/// Without those 12 bytes each segment carries 28660 bytes, the stream drifts off
/// the page boundaries, and the kernel maps almost nothing.
const PAGE_MSS: libc::c_int = 7 * 4096 + 12;

/// Sends `bytes` with MSG_ZEROCOPY from a page-aligned copy (a send the kernel
/// refuses for want of option memory goes again without); returns the bytes sent.
fn send_page_aligned(conn: &std::net::TcpStream, bytes: &[u8]) -> usize {
    use std::os::fd::AsRawFd;
    let fd = conn.as_raw_fd();
    let mut aligned = crate::methods::runner::AlignedBuf::new(bytes.len().div_ceil(4096) * 4096);
    aligned.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    let mut sys = crate::methods::syscalls::Syscalls::new();
    sys.setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        crate::methods::zerocopy::SO_ZEROCOPY,
        1,
    )
    .unwrap();
    let mut sent = 0;
    while sent < bytes.len() {
        let piece = &aligned.as_slice()[sent..bytes.len()];
        match sys.send(fd, piece, libc::MSG_ZEROCOPY) {
            Ok(n) => sent += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => match sys.send(fd, piece, 0) {
                Ok(n) => sent += n,
                Err(_) => break,
            },
            Err(_) => break,
        }
    }
    // The kernel may still read the pages: keep them until the guest has all.
    std::mem::forget(aligned);
    sent
}

/// A peer that only sends (a send method sent its way finds a closed port).
fn receive_only(receive_from: SocketAddrV4) -> Peer {
    Peer {
        send_to: closed_port(),
        receive_from,
    }
}

/// Whether `dir`'s file system takes O_DIRECT files (tmpfs did not before 6.6).
fn o_direct_creates(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("o_direct.probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// The suite of `methods` with `size` and `chunk`.
fn suite(methods: &[Method], size: Option<u64>, chunk: usize) -> Suite {
    Suite {
        methods: methods.to_vec(),
        size,
        chunk,
        ..Suite::default()
    }
}

/// Runs `suite` (payload in `disk`, files to `scratch`) against a fresh sender;
/// returns the recorder, the suite's result and the sender's connections.
fn run_receive(
    suite: &Suite,
    disk: &Path,
    scratch: &Path,
    payload: &[u8],
    stream: Stream,
) -> (Recorder, bool, Vec<Counted>) {
    let (sender, seen) = spawn_sender(payload.to_vec(), stream);
    let mut recorder = Recorder::default();
    let passed = run_suite(
        suite,
        roots(disk, scratch),
        &[receive_only(sender)],
        &mut recorder,
    )
    .unwrap();
    // One connection per method that got as far as connecting; the sender reports
    // each once the guest has closed it, which may be just after the suite ends.
    let began = recorder
        .events
        .iter()
        .filter(|e| matches!(e, Event::Mark(l) if l.starts_with("BEGIN ")))
        .count();
    let counted = (0..began)
        .map(|_| seen.recv_timeout(Duration::from_secs(20)).expect("sender"))
        .collect();
    (recorder, passed, counted)
}

/// Checks what every receive method that ran to the end shares: the sequence of
/// events, the file, the sender's view, the report's common fields. Returns the
/// number of chunks.
fn check_received(
    recorder: &Recorder,
    report: &Value,
    counted: &Counted,
    file: &[u8],
    scratch: &Path,
    chunk: u64,
) -> u64 {
    let name = report["method"].as_str().unwrap();
    let method = Method::from_name(name).unwrap();
    let size = file.len() as u64;
    assert_eq!(report["test"], "method");
    assert_eq!(report["direction"], "receive", "{report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["bytes"], size);
    assert_eq!(report["chunk"], chunk);
    let chunks = size.div_ceil(chunk);
    assert_eq!(report["chunks"], chunks);
    assert!(report["seconds"].as_f64().unwrap() > 0.0);

    // The file holds the payload, byte for byte, and nothing more.
    let run = zc_protocol::MethodRun {
        method,
        card: zc_protocol::addr::Card::new(0).unwrap(),
        variant: report["variant"].as_str(),
    };
    let written = std::fs::read(target_path(scratch, &run)).unwrap();
    assert_eq!(written.len(), file.len(), "{name}");
    assert!(written == file, "{name}: the file differs from the payload");
    // The sender got the right count, then the guest's FIN and nothing else.
    assert_eq!(
        *counted,
        Counted {
            sent: file.len(),
            count: Some(size),
            other: 0
        },
        "{name}"
    );

    // Caches dropped just before BEGIN; BEGIN, one sample per chunk, END.
    let events = &recorder.events;
    let begin = Event::Mark(Marker::begin(name).label());
    let at = events.iter().position(|e| *e == begin).unwrap();
    assert_eq!(events[at - 1], Event::DropCaches, "{name}");
    let mut want = vec![begin];
    want.extend((0..u32::try_from(chunks).unwrap()).map(Event::Sample));
    want.push(Event::Mark(Marker::end(name).label()));
    assert_eq!(span(events, name), want.as_slice(), "{name}");

    // The split adds up; connecting and the end of the transfer are setup.
    super::assert_split_adds_up(report, name);
    for (call, n) in [
        ("socket", 1),
        ("setsockopt", 2),
        ("connect", 1),
        ("fsync", 1),
        ("syncfs", 1),
        ("send", 1),
        ("shutdown", 1),
    ] {
        assert_eq!(count(report, call), n, "{name}: {call}: {report}");
    }
    // O_DIRECT writes whole pages: a size that is not is cut back once.
    let cut = u64::from(method.direct() && !size.is_multiple_of(4096));
    assert_eq!(count(report, "ftruncate"), cut, "{name}: {report}");
    chunks
}

/// Each method's own calls, per chunk: the "system calls per chunk" of the table.
fn check_receive_method(report: &Value, chunks: u64, size: u64) {
    let name = report["method"].as_str().unwrap();
    let lp = report["loop_syscalls"].as_u64().unwrap();
    // Every receive method reads the peer's FIN once after the loop.
    let loop_recvs = count(report, "recv") - 1;
    match Method::from_name(name).unwrap() {
        Method::RecvWrite => {
            // MSG_WAITALL: one recv per chunk, one write into the page cache.
            assert_eq!((loop_recvs, count(report, "write")), (chunks, chunks));
            assert_eq!(lp, 2 * chunks, "{report}");
        }
        Method::RecvDirect => {
            assert_eq!((loop_recvs, count(report, "pwrite")), (chunks, chunks));
            assert_eq!(lp, 2 * chunks, "{report}");
        }
        Method::SpliceRecv => {
            assert_eq!((count(report, "pipe2"), count(report, "fcntl")), (1, 1));
            assert_eq!(loop_recvs, 0);
            // At least one splice in and one out per chunk; more when the socket
            // hands over less than a chunk at a time.
            assert!(count(report, "splice") >= 2 * chunks, "{report}");
            assert_eq!(lp, count(report, "splice"));
        }
        Method::RecvMmap => {
            assert_eq!(count(report, "mmap"), 1);
            assert_eq!(loop_recvs, chunks, "{report}");
            assert_eq!(lp, chunks);
        }
        Method::TcpZerocopyReceive => {
            assert_eq!(count(report, "mmap"), 1);
            let zr = &report["zerocopy_receive"];
            let (mapped, received) = (
                zr["mapped"].as_u64().unwrap(),
                zr["received"].as_u64().unwrap(),
            );
            assert_eq!(mapped + received, size, "{zr}");
            assert_eq!(mapped % 4096, 0, "{zr}");
            eprintln!("{name} on loopback: {zr}");
            // One getsockopt per chunk of at least a page; a recv only for what
            // was not mapped; one write per chunk.
            let chunk = report["chunk"].as_u64().unwrap();
            let last = size - (chunks - 1) * chunk;
            let full_page_chunks = chunks - u64::from(last < 4096);
            assert_eq!(count(report, "getsockopt"), full_page_chunks, "{report}");
            assert!(loop_recvs <= chunks, "{report}");
            assert_eq!(count(report, "pwrite") + count(report, "pwritev"), chunks);
            assert_eq!(
                lp,
                count(report, "getsockopt")
                    + loop_recvs
                    + count(report, "pwrite")
                    + count(report, "pwritev")
            );
            if mapped == 0 {
                assert_eq!(loop_recvs, chunks, "{report}");
                assert_eq!(count(report, "pwritev"), 0, "{report}");
            }
        }
        other => panic!("{other}: a send method among the receive methods"),
    }
}

/// Whether `report` is of a receive method the test host cannot run: O_DIRECT on
/// a file system without it (the method fails, saying so), or a kernel without
/// TCP_ZEROCOPY_RECEIVE (it is skipped, before any mark).
fn cannot_run(method: Method, report: &Value, direct_ok: bool, recorder: &Recorder) -> bool {
    if report.get("skipped").is_some() {
        // Only a kernel feature may be missing, and the skip comes before any mark.
        assert_eq!(method, Method::TcpZerocopyReceive, "{report}");
        assert!(
            report["skipped"]
                .as_str()
                .unwrap()
                .contains("TCP_ZEROCOPY_RECEIVE"),
            "{report}"
        );
        assert!(!recorder
            .events
            .contains(&Event::Mark(Marker::begin(method).label())));
        println!("SKIPPED: {method} on this host: {}", report["skipped"]);
        return true;
    }
    if method.direct() && !direct_ok {
        assert_eq!(report["ok"], false, "{report}");
        assert!(
            report["error"].as_str().unwrap().contains("with O_DIRECT"),
            "{report}"
        );
        println!("SKIPPED: {method}: no O_DIRECT in this host's temporary directory");
        return true;
    }
    false
}

#[test]
fn every_receive_method_stores_the_payload() {
    // 16 whole chunks and a tail that is not a whole page: the O_DIRECT padding and
    // cut, and the short last chunk, everywhere.
    let (disk, data) = payload((1 << 20) + 5000);
    let scratch = tempfile::tempdir().unwrap();
    let direct_ok = o_direct_creates(scratch.path());
    let suite = suite(&Method::RECEIVE, None, 65536);
    let (recorder, passed, counted) =
        run_receive(&suite, disk.path(), scratch.path(), &data, Stream::Whole);

    let n = Method::RECEIVE.len();
    let console = recorder.console();
    assert_eq!(console[1], format!("1..{n}"));
    let tests = ktap_tests(&console[2..]);
    let reports = recorder.reports();
    assert_eq!((tests.len(), reports.len()), (n, n));
    let mut counted = counted.iter();
    let mut could_not = 0;
    for (i, (method, report)) in Method::RECEIVE.iter().zip(&reports).enumerate() {
        let (diagnostics, line) = &tests[i];
        eprintln!("{diagnostics:?} {line}\n  {report}");
        assert_eq!(report["method"], method.name());
        assert_eq!(report["direction"], "receive", "{report}");
        if cannot_run(*method, report, direct_ok, &recorder) {
            could_not += u32::from(report["ok"] == false);
            continue;
        }
        let got = counted.next().expect("one connection per method");
        let chunks = check_received(&recorder, report, got, &data, scratch.path(), 65536);
        assert_eq!(chunks, 17);
        check_receive_method(report, chunks, data.len() as u64);
        assert_eq!(*line, format!("ok {} {method}", i + 1));
        let [figures] = diagnostics.as_slice() else {
            panic!("one diagnostic line: {diagnostics:?}")
        };
        assert_eq!(
            figures.contains(" zc_mapped="),
            *method == Method::TcpZerocopyReceive,
            "{figures}"
        );
    }
    assert!(counted.next().is_none());
    assert_eq!(passed, could_not == 0);
}

#[test]
fn a_prefix_in_small_chunks_is_stored_exactly() {
    let (disk, data) = payload(200_000);
    let scratch = tempfile::tempdir().unwrap();
    let direct_ok = o_direct_creates(scratch.path());
    // Two chunks: a whole one and one that ends 100 bytes into a page.
    let size = 3 * 4096 + 100;
    let suite = suite(&Method::RECEIVE, Some(size), 8192);
    let prefix = &data[..usize::try_from(size).unwrap()];
    let (recorder, _, counted) =
        run_receive(&suite, disk.path(), scratch.path(), prefix, Stream::Whole);
    let mut counted = counted.iter();
    for (method, report) in Method::RECEIVE.iter().zip(recorder.reports()) {
        if cannot_run(*method, &report, direct_ok, &recorder) {
            continue;
        }
        let chunks = check_received(
            &recorder,
            &report,
            counted.next().unwrap(),
            prefix,
            scratch.path(),
            8192,
        );
        assert_eq!(chunks, 2);
        check_receive_method(&report, chunks, size);
    }
}

#[test]
fn a_short_stream_fails_every_receive_method_after_its_whole_chunks() {
    let (disk, data) = payload(100_000);
    let scratch = tempfile::tempdir().unwrap();
    let direct_ok = o_direct_creates(scratch.path());
    // Two whole chunks of 8192 arrive, then 3616 bytes of the third, then FIN.
    let suite = suite(&Method::RECEIVE, None, 8192);
    let (recorder, passed, counted) = run_receive(
        &suite,
        disk.path(),
        scratch.path(),
        &data,
        Stream::Short(20_000),
    );
    assert!(!passed);
    let mut counted = counted.iter();
    for (method, report) in Method::RECEIVE.iter().zip(recorder.reports()) {
        if cannot_run(*method, &report, direct_ok, &recorder) {
            continue;
        }
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(report["direction"], "receive");
        let error = report["error"].as_str().unwrap();
        assert!(
            error.ends_with("the peer ended the stream after 20000 of 100000 bytes"),
            "{method}: {error}"
        );
        // The whole chunks were sampled; END follows.
        let name = method.name();
        assert_eq!(
            span(&recorder.events, name),
            [
                Event::Mark(Marker::begin(name).label()),
                Event::Sample(0),
                Event::Sample(1),
                Event::Mark(Marker::end(name).label()),
            ]
        );
        // The guest sent no count: it never had the whole payload.
        assert_eq!(
            *counted.next().unwrap(),
            Counted {
                sent: 20_000,
                count: None,
                other: 0
            },
            "{method}"
        );
    }
    let console = recorder.console();
    assert!(
        console.contains(&format!("not ok 1 {}", Method::RecvWrite)),
        "{console:#?}"
    );
}

#[test]
fn bytes_beyond_the_payload_and_wrong_bytes_fail_the_method() {
    let (disk, data) = payload(100_000);
    let scratch = tempfile::tempdir().unwrap();

    // A longer stream: the guest sees bytes where the peer's FIN should be.
    let one = suite(&[Method::RecvWrite], None, 65536);
    let (recorder, passed, counted) =
        run_receive(&one, disk.path(), scratch.path(), &data, Stream::Extra(10));
    assert!(!passed);
    let error = recorder.reports()[0]["error"].as_str().unwrap().to_string();
    assert!(
        error.starts_with("the peer sent more than the 100000 bytes expected"),
        "{error}"
    );
    assert_eq!(counted[0].count, Some(100_000));

    // A wrong byte on the wire: the transfer completes, the check after END fails.
    let one = suite(&[Method::RecvMmap], None, 65536);
    let (recorder, passed, counted) = run_receive(
        &one,
        disk.path(),
        scratch.path(),
        &data,
        Stream::Corrupt(70_000),
    );
    assert!(!passed);
    let error = recorder.reports()[0]["error"].as_str().unwrap().to_string();
    assert!(
        error.ends_with("recv_mmap.bin differs from the payload at byte 70000"),
        "{error}"
    );
    assert!(recorder
        .events
        .contains(&Event::Mark(Marker::end(Method::RecvMmap).label())));
    assert_eq!(counted[0].count, Some(100_000));

    // No payload on the test disk: fails before BEGIN, no connection.
    let missing = Suite {
        file: "nope.bin".into(),
        ..suite(&[Method::SpliceRecv], None, 65536)
    };
    let (recorder, passed, counted) =
        run_receive(&missing, disk.path(), scratch.path(), &data, Stream::Whole);
    assert!(!passed && counted.is_empty());
    assert!(!recorder.events.iter().any(|e| matches!(e, Event::Mark(_))));
    let error = recorder.reports()[0]["error"].as_str().unwrap().to_string();
    assert!(error.starts_with("stat "), "{error}");
}

#[test]
fn send_and_receive_methods_share_a_suite_each_with_its_own_peer_port() {
    let (disk, data) = payload(50_000);
    let scratch = tempfile::tempdir().unwrap();
    let (receiver, received) = spawn_peer(data.clone(), 0);
    let (sender, sent) = spawn_sender(data.clone(), Stream::Whole);
    let suite = suite(
        &[Method::Sendfile, Method::RecvWrite, Method::ReadWrite],
        None,
        65536,
    );
    let mut recorder = Recorder::default();
    let peer = Peer {
        send_to: receiver,
        receive_from: sender,
    };
    assert!(run_suite(
        &suite,
        roots(disk.path(), scratch.path()),
        &[peer],
        &mut recorder
    )
    .unwrap());
    assert_eq!(received.try_iter().filter(|r| r.matched).count(), 2);
    let counted = sent.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(counted.count, Some(50_000));
    let reports = recorder.reports();
    let directions: Vec<Option<&str>> = reports
        .iter()
        .map(|r| r.get("direction").and_then(Value::as_str))
        .collect();
    assert_eq!(directions, [None, Some("receive"), None]);
    assert_eq!(
        std::fs::read(scratch.path().join("recv_write.bin")).unwrap(),
        data
    );
}

#[test]
fn tcp_zerocopy_receive_maps_page_aligned_segments_and_writes_them_from_the_mapping() {
    let (disk, data) = payload((1 << 20) + 5000);
    let scratch = tempfile::tempdir().unwrap();
    if !o_direct_creates(scratch.path()) {
        println!("SKIPPED: no O_DIRECT in this host's temporary directory");
        return;
    }
    let one = suite(&[Method::TcpZerocopyReceive], None, 65536);
    let (recorder, passed, counted) = run_receive(
        &one,
        disk.path(),
        scratch.path(),
        &data,
        Stream::PageAligned,
    );
    let report = &recorder.reports()[0];
    if report.get("skipped").is_some() {
        println!("SKIPPED: {report}");
        return;
    }
    assert!(passed, "{report}");
    let chunks = check_received(&recorder, report, &counted[0], &data, scratch.path(), 65536);
    check_receive_method(report, chunks, data.len() as u64);
    // Here the kernel does map: the mapped pages went to the file from the
    // mapping (the file is right, checked above), and a chunk only partly
    // mapped took its rest from the buffer in the same pwritev.
    let mapped = report["zerocopy_receive"]["mapped"].as_u64().unwrap();
    assert!(
        mapped >= data.len() as u64 / 2,
        "page-aligned loopback segments should mostly be mapped: {report}"
    );
}
