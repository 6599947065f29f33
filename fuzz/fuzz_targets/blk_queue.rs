//! Fuzzes virtio-blk's request queue with arbitrary guest memory and queue setup.
//!
//! The input is decoded as: the number of driver operations, the feature subset the
//! driver accepts, the disk (0..=32 sectors, optionally a partial trailing sector,
//! read-only or not, DMA log on or off), the queue registers (size, descriptor table,
//! available and used ring addresses, initial avail `idx`), up to 8 operations
//! (notify, publish more chains and notify, poke a byte of guest memory, ack
//! interrupts, reset and re-initialise), and finally the first bytes of the 64 KiB of
//! guest RAM at GPA 0 (descriptor tables, rings and buffers all live there). The device
//! is a `Block` over a memfd disk behind the real `MmioTransport`.
//!
//! Checked, besides "no panic" (vm-memory bounds every guest access):
//! - after a notify that leaves the device healthy, the used ring's `idx` equals the
//!   available ring's `idx` (every published chain was answered, none twice), and
//!   when the driver's `idx` did not change under the device, it moved by at most
//!   the queue size;
//! - once the device is in DEVICE_NEEDS_RESET, `process_queue` changes no guest memory;
//! - the device writes guest memory only inside the device-writable buffers offered
//!   and the used ring (`common::device_writes`);
//! - the disk file keeps its size, and a read-only disk its contents.
//!
//! Counters (`ZC_FUZZ_STATS=1`, see `common::stats`): used entries, indirect chains
//! completed, DISCARD / WRITE_ZEROES requests and those that deallocated bytes, IN
//! requests served from a read-only disk, requests answered with the DMA log on,
//! completions with EVENT_IDX on and off, layouts refused at DRIVER_OK.

#![no_main]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use common::stats::count;
use common::{
    device_writes, guest_memory, handshake, is_indirect, notify_and_check, read_u16, reg,
    write_reg, Input, NullLine, Op, QueueParams, QueueState, UsedWatch, MAX_OPS,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_devices::dma_log::DmaLog;
use zc_devices::virtio::blk::{Block, BlockOptions, SECTOR_SIZE};
use zc_devices::virtio::mmio::MmioTransport;
use zc_devices::virtio::VIRTIO_RING_F_EVENT_IDX;

/// The largest disk: 32 sectors and a partial one.
const MAX_DISK: usize = 33 * SECTOR_SIZE as usize;

/// One memfd, refilled for every input (no file system, no fsync cost).
fn disk_file() -> &'static File {
    static DISK: OnceLock<File> = OnceLock::new();
    DISK.get_or_init(|| {
        let fd = rustix::fs::memfd_create("zc-fuzz-disk", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        File::from(fd)
    })
}

/// A DMA log to nowhere, so the logging paths run too.
fn sink_log() -> DmaLog {
    static LOG: OnceLock<DmaLog> = OnceLock::new();
    LOG.get_or_init(|| DmaLog::new(std::io::sink()).expect("log to sink"))
        .clone()
}

fn disk_pattern() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        (0..MAX_DISK)
            .map(|i| (i.wrapping_mul(131) ^ (i >> 9)) as u8 | 1)
            .collect()
    })
}

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let n_ops = usize::from(inp.u8()) % (MAX_OPS + 1);
    let feature_mask = u64::from(inp.u32()) | (u64::from(inp.u8()) << 32);
    let disk_flags = inp.u8();
    let qp = QueueParams::decode(&mut inp);
    let ops: Vec<Op> = (0..MAX_OPS).map(|_| Op::decode(&mut inp)).collect();
    let mem = guest_memory(inp.rest());

    let disk_len = usize::from(disk_flags % 33) * SECTOR_SIZE as usize
        + if disk_flags & 0x40 != 0 { 100 } else { 0 };
    let read_only = disk_flags & 0x80 != 0;
    let file = disk_file();
    file.set_len(0).expect("truncate memfd");
    file.write_all_at(&disk_pattern()[..disk_len], 0)
        .expect("fill memfd");
    let log = if disk_flags & 0x20 != 0 {
        sink_log()
    } else {
        DmaLog::disabled()
    };
    let opts = BlockOptions {
        read_only,
        ..BlockOptions::default()
    };
    let dev = Block::new(file.try_clone().expect("dup memfd"), opts, log).expect("valid options");
    assert_eq!(
        dev.capacity_bytes(),
        (disk_len as u64) / SECTOR_SIZE * SECTOR_SIZE
    );
    let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(NullLine));

    let mut q = handshake(&mut t, &mem, feature_mask, &[qp]).map(|v| v[0]);
    let mut watch = q.map(|s| UsedWatch::start(&mem, &s)).unwrap_or_default();
    let mut used = 0;
    let mut activations = u64::from(q.is_some());
    for op in &ops[..n_ops] {
        match *op {
            Op::Notify(i) => notify_round(&mut t, &mem, q.as_mut(), i),
            Op::Publish { queue, n } => {
                if let Some(s) = q.as_ref().filter(|_| queue == 0) {
                    let idx = read_u16(&mem, s.avail + 2).expect("avail ring was validated");
                    mem.write_obj(idx.wrapping_add(n), GuestAddress(s.avail + 2))
                        .expect("avail ring was validated");
                }
                notify_round(&mut t, &mem, q.as_mut(), queue);
            }
            Op::Poke { addr, value } => {
                mem.write_obj(value, GuestAddress(u64::from(addr)))
                    .expect("u16 address is inside 64 KiB");
            }
            Op::Ack(bits) => write_reg(&mut t, reg::INTERRUPT_ACK, bits),
            Op::Poll => {
                let mut cfg = [0u8; 8];
                t.read(0x100, &mut cfg);
            }
            Op::Reinit => {
                q = handshake(&mut t, &mem, feature_mask, &[qp]).map(|v| v[0]);
                watch = q.map(|s| UsedWatch::start(&mem, &s)).unwrap_or_default();
                activations += u64::from(q.is_some());
            }
        }
        if let Some(s) = q.as_ref() {
            let added = watch.advance(&mem, s);
            used += added.len() as u64;
            let indirect = added.iter().filter(|(h, _)| is_indirect(&mem, s, *h));
            count("indirect_chains_completed", indirect.count() as u64);
        }
    }
    let s = t.device().stats();
    let event_idx = t.acked_features() & VIRTIO_RING_F_EVENT_IDX != 0;
    count("inputs", 1);
    count("activations", activations);
    count(
        "refused_at_driver_ok",
        u64::from(activations == 0 && t.interrupt().needs_reset()),
    );
    count("used_entries", used);
    count(
        if event_idx {
            "used_entries_event_idx_on"
        } else {
            "used_entries_event_idx_off"
        },
        used,
    );
    count("discard_requests", s.discard_requests);
    count("write_zeroes_requests", s.write_zeroes_requests);
    count(
        "inputs_deallocating_bytes",
        u64::from(s.bytes_deallocated > 0),
    );
    count("flushes", s.flushes);
    count(
        "read_only_in_bytes",
        if read_only { s.bytes_read } else { 0 },
    );
    count(
        "read_only_invalid_requests",
        if read_only { s.invalid_requests } else { 0 },
    );
    count(
        "ok_with_dma_log",
        if disk_flags & 0x20 != 0 {
            s.status_ok
        } else {
            0
        },
    );

    let len = file.metadata().expect("fstat memfd").len();
    assert_eq!(len, disk_len as u64, "the disk file changed size");
    if read_only {
        let mut now = vec![0u8; disk_len];
        file.read_exact_at(&mut now, 0).expect("read memfd");
        assert!(
            now == disk_pattern()[..disk_len],
            "a read-only disk was modified"
        );
    }
}

/// Notifies queue `index` and checks the used ring against the available ring.
fn notify_round(
    t: &mut MmioTransport<Block>,
    mem: &GuestMemoryMmap,
    q: Option<&mut QueueState>,
    index: u16,
) {
    let rings: Option<Vec<QueueState>> = q.as_deref().map(|s| vec![*s]);
    device_writes(mem, rings.as_deref(), || {
        notify_and_check(t, mem, index, q.filter(|_| index == 0), "")
    });
}
