//! Micro-benchmark of what the DMA log costs a device thread: run it natively, under
//! `valgrind --tool=callgrind` (deterministic instruction counts) or under
//! `qemu-x86_64 -cpu max` (TCG, like the emulated KVM host) to see where the
//! instructions go. `cargo run --release -p zc-dma-log --example dma_log_cost [ITERS]
//! [LOG]`: with LOG the records go to that file (zstd-compressed if it ends in `.zst`,
//! to compare the writer's pace) instead of being formatted and thrown away.
//!
//! Each line is the wall time per operation on the calling thread; `+ flush` lines
//! include waiting for everything queued to be written (the writer thread's share).

use std::hint::black_box;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_dma_log::frame::summarize;
use zc_dma_log::{
    fingerprint, pieces_from_guest, BlkRequest, BlkStatus, DescInfo, DescRole, DeviceKind,
    Direction, DmaLog, RequestDetail,
};

const PAGE_LEN: u32 = 4096;
const PAGE: usize = PAGE_LEN as usize;
/// One O_DIRECT 1 MiB read: 256 page-sized data descriptors.
const REQ_PAGES: usize = 256;

/// A loop counter as a queue index: the low 16 bits, as a ring wraps.
fn ring_index(n: usize) -> u16 {
    u16::try_from(n & 0xffff).expect("masked to 16 bits")
}

fn time(label: &str, ops: usize, f: impl FnOnce()) {
    let t = Instant::now();
    f();
    report(label, t.elapsed(), ops);
}

fn report(label: &str, d: std::time::Duration, ops: usize) {
    let ns = d.as_nanos() as f64 / ops as f64;
    println!("{label:<44} {ns:>10.0} ns/op");
}

/// A page-sized data descriptor of a blk read request, from an indirect table.
fn blk_data(head: u16, desc: u16, gpa: u64) -> DescInfo {
    DescInfo {
        device: DeviceKind::Blk,
        queue: 0,
        head,
        desc,
        indirect: true,
        gpa,
        len: PAGE_LEN,
        dir: Direction::DeviceWrites,
        role: DescRole::Data,
    }
}

fn blk_request(log: &DmaLog, mem: &GuestMemoryMmap, head: u16) {
    for i in 0..REQ_PAGES {
        let gpa = 0x10_0000 + (i * PAGE) as u64;
        let desc = (head + 1 + ring_index(i)) % 1024;
        log.descriptor_from_guest(mem, blk_data(head, desc, gpa));
    }
    log.request(
        DeviceKind::Blk,
        0,
        head,
        RequestDetail::Blk(BlkRequest {
            op: "in".into(),
            code: 0,
            sector: 2048,
            bytes: (REQ_PAGES * PAGE) as u64,
            status: BlkStatus::Ok,
        }),
    );
}

fn net_frame(log: &DmaLog, frame: &[u8], head: u16) {
    let gpa = 0x20_0000 + u64::from(head) * 2048;
    for (role, at, len) in [
        (DescRole::Header, 0usize, 12usize),
        (DescRole::Data, 12, frame.len() - 12),
    ] {
        log.descriptor_bytes(
            DescInfo {
                device: DeviceKind::Net,
                queue: 1,
                head,
                desc: head,
                indirect: false,
                gpa: gpa + at as u64,
                len: u32::try_from(len).expect("a frame is shorter than 4 GiB"),
                dir: Direction::DeviceReads,
                role,
            },
            &frame[at..at + len],
        );
    }
    // As the net device does: the summary comes from the copies just queued.
    log.request_from_read(
        DeviceKind::Net,
        1,
        head,
        12,
        &frame[12..],
        None,
        0,
        tx_detail,
    );
}

/// As the net device does: the summary is worked out on the writer thread.
fn tx_detail(frame: &[u8], _: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("tx ", ""))
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let content: Vec<u8> = (0..0x40_0000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    mem.write_slice(&content, GuestAddress(0)).unwrap();
    let frame = &content[12..1514 + 12];

    let pages = iters * REQ_PAGES;
    time("copy 4 KiB out of guest memory", pages, || {
        let mut buf = [0u8; PAGE];
        for i in 0..pages {
            let gpa = 0x10_0000 + ((i % REQ_PAGES) * PAGE) as u64;
            mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
            black_box(&buf);
        }
    });
    time("fingerprint 4 KiB", pages, || {
        for i in 0..pages {
            let at = (i % REQ_PAGES) * PAGE;
            black_box(fingerprint(black_box(&content[at..at + PAGE])));
        }
    });
    time("fingerprint 1514 B", pages, || {
        for _ in 0..pages {
            black_box(fingerprint(black_box(frame)));
        }
    });
    time("pieces_from_guest 4 KiB", pages, || {
        for i in 0..pages {
            let gpa = 0x10_0000 + ((i % REQ_PAGES) * PAGE) as u64;
            black_box(pieces_from_guest(&mem, gpa, PAGE as u64).unwrap());
        }
    });

    let n = pages;
    time("Instant::now", n, || {
        for _ in 0..n {
            black_box(Instant::now());
        }
    });
    let m = std::sync::Mutex::new(0u64);
    time("uncontended Mutex lock + unlock", n, || {
        for _ in 0..n {
            *black_box(&m).lock().unwrap() += 1;
        }
    });

    let mut tcp = vec![0u8; 1514];
    tcp[12..14].copy_from_slice(&[0x08, 0x00]);
    tcp[14..34].copy_from_slice(&[
        0x45, 0, 0x05, 0xdc, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
    ]);
    tcp[34..54].copy_from_slice(&[
        0x9c, 0x40, 0x1b, 0x58, 0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    // What the TX queue hands the device: the 12-byte virtio-net header, then a TCP frame.
    let tx: Vec<u8> = [&[0u8; 12][..], &tcp].concat();
    time("summarize a TCP frame + summary string", n, || {
        for _ in 0..n {
            let s = summarize(black_box(&tcp));
            black_box(format!("tx {}", s.text));
        }
    });

    // The device-thread share: each request is timed alone, then the writer is
    // waited for (untimed), as in a guest whose requests come slower than the writer
    // writes them. The `+ flush` figure is the total, i.e. the writer's pace.
    let log = match std::env::args().nth(2) {
        Some(path) => DmaLog::create(std::path::Path::new(&path)).unwrap(),
        None => DmaLog::new(std::io::sink()).unwrap(),
    };
    blk_request(&log, &mem, 0);
    log.flush().unwrap();
    time_logged("blk 1 MiB request, per page", &log, iters, |r| {
        blk_request(&log, &mem, ring_index(r));
    });

    // A read-only disk: the writer reads the image again instead of the device
    // copying guest memory.
    let mut image = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut image, &content[..REQ_PAGES * PAGE]).unwrap();
    let stable = log.stable_file(&image).unwrap();
    time_logged("blk page from a read-only image", &log, iters, |r| {
        for i in 0..REQ_PAGES {
            let d = blk_data(ring_index(r), ring_index(i), 0x10_0000 + (i * PAGE) as u64);
            log.descriptor_from_file(d, stable, (i * PAGE) as u64);
        }
    });
    time_logged("desc record, no pieces", &log, iters, |r| {
        for i in 0..REQ_PAGES {
            let d = blk_data(ring_index(r), ring_index(i), (i * PAGE) as u64);
            log.descriptor(d, Vec::new());
        }
    });
    time_logged("net TX frame 1514 B", &log, iters, |r| {
        for f in 0..REQ_PAGES {
            net_frame(&log, &tx, ring_index(r * REQ_PAGES + f));
        }
    });
}

/// The device-thread share of `iters` rounds of `round` (each [`REQ_PAGES`] records):
/// each round is timed alone, then the writer is waited for (untimed). Prints that
/// share and the total with the waits, per page.
fn time_logged(label: &str, log: &DmaLog, iters: usize, mut round: impl FnMut(usize)) {
    let pages = iters * REQ_PAGES;
    let (mut calls, t) = (std::time::Duration::ZERO, Instant::now());
    for r in 0..iters {
        let c = Instant::now();
        round(r);
        calls += c.elapsed();
        log.flush().unwrap();
    }
    report(&format!("{label} (calls)"), calls, pages);
    report(&format!("{label} (+ flush)"), t.elapsed(), pages);
}
