//! Fuzzes the whole virtio-mmio register file in front of virtio-blk or virtio-net:
//! any offset, any width, any order, with notifications, backend polls and guest
//! memory edits in between. Unlike `blk_queue` and `net_queue`, no handshake is done
//! for the fuzzer: the status state machine, feature negotiation, queue selection and
//! queue registers are reached only through the accesses the input makes (the seeds
//! hold complete handshakes to start from).
//!
//! Input: a flag byte (device, read-only disk or echo backend, DMA log,
//! scatter-gather), the number of operations, 8 bytes per operation, then the first
//! bytes of the 16 KiB of guest RAM at GPA 0. An operation is an MMIO write or read
//! (offset below 0x140, so the configuration space is covered; width 1, 2, 3, 4 or 8
//! bytes), "advance a queue's available idx and write QueueNotify", a notification
//! through the ioeventfd path (`notify_queue`), a poke of guest memory, or a backend
//! poll.
//!
//! Checked, besides "no panic":
//! - the device writes guest memory only inside the device-writable buffers offered
//!   on its queues and inside their used rings while it is active, and nowhere at all
//!   while it is not (`common::device_writes`, around every operation that can run
//!   the device);
//! - the transport's state is coherent: `MagicValue`, `Version` and `VendorID` read
//!   their constants at any time; an active device has ACKNOWLEDGE, DRIVER,
//!   FEATURES_OK and DRIVER_OK in `Status`; a device with DRIVER_OK set is active or
//!   in DEVICE_NEEDS_RESET; the acked features are a subset of the offered ones once
//!   FEATURES_OK is accepted.
//!
//! Counters (`ZC_FUZZ_STATS=1`): activations, activations refused, resets of an
//! active device, used entries, indirect chains completed, config space accesses.

#![no_main]

mod common;

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::stats::count;
use common::{
    device_writes, guest_memory_of, is_indirect, read_u16, reg, Input, NullLine, QueueState,
    UsedWatch,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_devices::dma_log::DmaLog;
use zc_devices::virtio::blk::{Block, BlockOptions};
use zc_devices::virtio::mmio::{MmioTransport, CONFIG_OFFSET, MAGIC_VALUE, VENDOR_ID, VERSION};
use zc_devices::virtio::net::{Net, NetBackend, NetOptions};
use zc_devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use zc_devices::virtio::VirtioDevice;

/// Guest RAM: small, so the write check's copy of it is cheap.
const MEM_SIZE: usize = 16 * 1024;
/// Most operations per input.
const MAX_OPS: usize = 64;
/// Offsets the operations address: the registers and the start of the config space.
const WINDOW: u16 = 0x140;

/// Echoes every transmitted frame back to the guest, or drops it.
struct Echo {
    on: bool,
    out: VecDeque<Vec<u8>>,
}

impl NetBackend for Echo {
    fn send(&mut self, frame: &[u8], _now: Instant) {
        if self.on {
            self.out.push_back(frame.to_vec());
        }
    }
    fn poll(&mut self, _now: Instant) {}
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        out.append(&mut self.out);
    }
    fn poll_delay(&mut self, _now: Instant) -> Option<Duration> {
        None
    }
}

fn sink_log() -> DmaLog {
    static LOG: OnceLock<DmaLog> = OnceLock::new();
    LOG.get_or_init(|| DmaLog::new(std::io::sink()).expect("log to sink"))
        .clone()
}

/// An 8-sector memfd disk, refilled for every input.
fn disk_file() -> File {
    static DISK: OnceLock<File> = OnceLock::new();
    let file = DISK.get_or_init(|| {
        let fd = rustix::fs::memfd_create("zc-fuzz-disk", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        File::from(fd)
    });
    file.set_len(0).expect("truncate memfd");
    file.write_all_at(&[0x5a; 8 * 512], 0).expect("fill memfd");
    file.try_clone().expect("dup memfd")
}

/// One register-file operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        offset: u16,
        width: usize,
        value: u64,
    },
    Read {
        offset: u16,
        width: usize,
    },
    /// Advance queue `queue`'s available idx by `n` (if it is active) and write
    /// `QueueNotify`.
    Publish {
        queue: u16,
        n: u16,
    },
    /// The ioeventfd path: `notify_queue` with any value.
    EventFd(u32),
    Poke {
        addr: u16,
        value: u8,
    },
    Poll,
}

impl Op {
    fn decode(inp: &mut Input) -> Self {
        let kind = inp.u8();
        let offset = inp.u16() % WINDOW;
        let width = [4, 4, 1, 2, 8, 3][usize::from(inp.u8() % 6)];
        let value = inp.u32();
        match kind % 8 {
            0..=2 => Op::Write {
                offset,
                width,
                value: u64::from(value) | (u64::from(value) << 32),
            },
            3 => Op::Read { offset, width },
            4 => Op::Publish {
                queue: offset % 3,
                n: (value % 8) as u16 + 1,
            },
            5 => Op::EventFd(value % 4),
            6 => Op::Poke {
                addr: u16::try_from(value % MEM_SIZE as u32).expect("below 16 KiB"),
                value: offset as u8,
            },
            _ => Op::Poll,
        }
    }

    /// Whether the operation can make the device touch guest memory.
    fn runs_device(self) -> bool {
        !matches!(self, Op::Read { .. } | Op::Poke { .. })
    }
}

/// What the harness needs from either device.
trait Device: VirtioDevice {
    fn poll(&mut self);
}

impl Device for Block {
    fn poll(&mut self) {}
}

impl Device for Net<Echo> {
    fn poll(&mut self) {
        self.poll_backend(Instant::now());
    }
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let n_ops = usize::from(inp.u8()) % (MAX_OPS + 1);
    let ops: Vec<Op> = (0..n_ops).map(|_| Op::decode(&mut inp)).collect();
    let mem = guest_memory_of(MEM_SIZE, inp.rest());
    let log = if flags & 4 != 0 {
        sink_log()
    } else {
        DmaLog::disabled()
    };
    count("inputs", 1);
    if flags & 1 == 0 {
        let opts = BlockOptions {
            read_only: flags & 2 != 0,
            queue_size: 16,
            ..BlockOptions::default()
        };
        let dev = Block::new(disk_file(), opts, log).expect("valid options");
        run(
            MmioTransport::new(dev, mem.clone(), Arc::new(NullLine)),
            &mem,
            &ops,
        );
    } else {
        let opts = NetOptions {
            sg: flags & 8 != 0,
            queue_size: 16,
            max_pending: 4,
            ..NetOptions::default()
        };
        let backend = Echo {
            on: flags & 2 != 0,
            out: VecDeque::new(),
        };
        let dev = Net::new(backend, opts, log).expect("valid options");
        run(
            MmioTransport::new(dev, mem.clone(), Arc::new(NullLine)),
            &mem,
            &ops,
        );
    }
});

/// The queues the device runs on, as the transport gave them (ready ones only).
fn active_queues<D: VirtioDevice>(t: &MmioTransport<D>) -> Option<Vec<QueueState>> {
    if !t.is_active() {
        return None;
    }
    let n = t.device().queue_max_sizes().len();
    Some(
        (0..n)
            .filter_map(|i| t.queue_config(i))
            .filter(|c| c.ready)
            .map(QueueState::from)
            .collect(),
    )
}

fn run<D: Device>(mut t: MmioTransport<D>, mem: &GuestMemoryMmap, ops: &[Op]) {
    let mut queues: Option<Vec<QueueState>> = None;
    let mut watch: Vec<UsedWatch> = Vec::new();
    for &op in ops {
        let was_active = t.is_active();
        let rings = active_queues(&t);
        if let Op::Publish { queue, n } = op {
            // The driver's own write, before the device runs (not inside the check).
            if let Some(q) = rings.as_deref().and_then(|r| r.get(usize::from(queue))) {
                let idx = read_u16(mem, q.avail + 2).expect("avail ring was validated");
                mem.write_obj(idx.wrapping_add(n), GuestAddress(q.avail + 2))
                    .expect("avail ring was validated");
            }
        }
        if op.runs_device() {
            device_writes(mem, rings.as_deref(), || apply(&mut t, mem, op));
        } else {
            apply(&mut t, mem, op);
        }
        check_transport(&mut t);
        if t.is_active() && !was_active {
            count("activations", 1);
            queues = active_queues(&t);
            watch = queues
                .iter()
                .flatten()
                .map(|q| UsedWatch::start(mem, q))
                .collect();
        } else if was_active && !t.is_active() {
            count("resets_of_an_active_device", 1);
            queues = None;
        }
        if let Some(qs) = queues.as_ref() {
            for (q, w) in qs.iter().zip(watch.iter_mut()) {
                let used = w.advance(mem, q);
                count("used_entries", used.len() as u64);
                let indirect = used.iter().filter(|(h, _)| is_indirect(mem, q, *h));
                count("indirect_chains_completed", indirect.count() as u64);
            }
        }
        if let Op::Write { offset: 0x070, .. } = op {
            if !t.is_active() && t.status() & DRIVER_OK != 0 {
                count("refused_at_driver_ok", 1);
            }
        }
    }
}

fn apply<D: Device>(t: &mut MmioTransport<D>, mem: &GuestMemoryMmap, op: Op) {
    match op {
        Op::Write {
            offset,
            width,
            value,
        } => {
            if u64::from(offset) >= CONFIG_OFFSET {
                count("config_writes", 1);
            }
            t.write(u64::from(offset), &value.to_le_bytes()[..width]);
        }
        Op::Read { offset, width } => {
            if u64::from(offset) >= CONFIG_OFFSET {
                count("config_reads", 1);
            }
            let mut buf = [0u8; 8];
            t.read(u64::from(offset), &mut buf[..width]);
        }
        // The available idx was advanced by `run`.
        Op::Publish { queue, .. } => t.write(reg::QUEUE_NOTIFY, &u32::from(queue).to_le_bytes()),
        Op::EventFd(v) => t.notify_queue(v),
        Op::Poke { addr, value } => mem
            .write_obj(value, GuestAddress(u64::from(addr)))
            .expect("inside guest memory"),
        Op::Poll => t.device_mut().poll(),
    }
}

fn check_transport<D: Device>(t: &mut MmioTransport<D>) {
    let mut read = |offset| {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(read(reg::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(read(reg::VERSION), VERSION);
    assert_eq!(read(reg::VENDOR_ID), VENDOR_ID);
    let status = t.status();
    let all = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    if t.is_active() {
        assert_eq!(status & all, all, "active with status {status:#x}");
    } else if status & DRIVER_OK != 0 {
        assert!(
            t.interrupt().needs_reset(),
            "DRIVER_OK set ({status:#x}) on an inactive device not in NEEDS_RESET"
        );
    }
    if status & FEATURES_OK != 0 {
        assert_eq!(
            t.acked_features() & !t.device_features(),
            0,
            "FEATURES_OK with features the device did not offer"
        );
    }
}
