//! What the virtio device tests share: guest memory, descriptor chains on
//! `virtio-queue`'s `MockSplitQueue`, the used ring, a DMA log kept in memory, an
//! interrupt line that counts, the driver's side of the MMIO handshake, the check
//! that a device wrote only where it was offered, and a time limit for code that
//! could hang.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::{reg, MmioTransport};
use super::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use super::write_check::{QueueRings, WriteCheck};
use super::{low32, InterruptKind, InterruptLine, VirtioDevice, VirtioInterrupt};
use crate::dma_log::{DescRecord, DescRole, DmaLog, DmaLogReader, Record};

/// `VRING_DESC_F_NEXT`.
#[allow(clippy::cast_possible_truncation, reason = "the flag is 1")]
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_WRITE`.
#[allow(clippy::cast_possible_truncation, reason = "the flag is 2")]
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_INDIRECT`.
#[allow(clippy::cast_possible_truncation, reason = "the flag is 4")]
pub const IND: u16 = VRING_DESC_F_INDIRECT as u16;

/// The length of a test buffer as a descriptor length.
pub fn len32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("a test buffer under 4 GiB")
}

/// A mock queue over leaked guest memory.
pub type MockQueue = MockSplitQueue<'static, GuestMemoryMmap>;

/// Counts triggers per kind.
#[derive(Default)]
pub struct CountingLine {
    pub queue: AtomicUsize,
    pub config: AtomicUsize,
}

impl InterruptLine for CountingLine {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::Queue(_) => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

impl CountingLine {
    pub fn queue_count(&self) -> usize {
        self.queue.load(Ordering::SeqCst)
    }
    pub fn config_count(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

/// A device's interrupt over a line that counts.
pub fn counting_interrupt() -> (Arc<CountingLine>, Arc<VirtioInterrupt>) {
    let line = Arc::new(CountingLine::default());
    let irq = Arc::new(VirtioInterrupt::new(line.clone()));
    (line, irq)
}

/// `len` bytes of xorshift64 noise from `seed` (odd seeds only: 0 would stay 0):
/// the same bytes every run, for tests that want data with no structure.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Guest RAM of `size` bytes at GPA 0, leaked so that a `MockSplitQueue` borrowing
/// it does not borrow the test's harness.
pub fn leaked_memory(size: u64) -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).unwrap())]).unwrap(),
    ))
}

/// A DMA log written to memory, read back as records.
#[derive(Clone)]
pub struct TestLog {
    pub dma: DmaLog,
    out: SharedBuf,
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TestLog {
    pub fn new() -> Self {
        let out = SharedBuf::default();
        TestLog {
            dma: DmaLog::new(out.clone()).unwrap(),
            out,
        }
    }

    /// Every record so far (the header line excluded).
    pub fn records(&self) -> Vec<Record> {
        self.dma.flush().unwrap();
        let bytes = self.out.0.lock().unwrap().clone();
        DmaLogReader::new(&bytes[..])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The `desc` records so far.
    pub fn descs(&self) -> Vec<DescRecord> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::Desc(d) => Some(d),
                _ => None,
            })
            .collect()
    }

    /// The `desc` records of `data` so far.
    pub fn data_descs(&self) -> Vec<DescRecord> {
        let mut d = self.descs();
        d.retain(|d| d.role == DescRole::Data);
        d
    }

    /// The device errors so far: `(error, needs_reset)`.
    pub fn errors(&self) -> Vec<(String, bool)> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::DeviceError(e) => Some((e.error, e.needs_reset)),
                _ => None,
            })
            .collect()
    }
}

/// A pcap (or any) byte sink the test reads back.
#[derive(Clone, Default)]
pub struct Capture(SharedBuf);

impl io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn bytes(&self) -> Vec<u8> {
        self.0 .0.lock().unwrap().clone()
    }
}

pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// The descriptors `(addr, len, flags-without-NEXT)`, linked sequentially from
/// table index `start`.
pub fn linked(start: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let n = u16::try_from(descs.len()).unwrap();
    descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            let i = u16::try_from(i).unwrap();
            if i + 1 < n {
                raw(a, l, f | NEXT, start + i + 1)
            } else {
                raw(a, l, f, 0)
            }
        })
        .collect()
}

/// Publishes one chain `(addr, len, flags-without-NEXT)` at table index `start`.
pub fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, start: u16, descs: &[(u64, u32, u16)]) {
    vq.add_desc_chains(&linked(start, descs), start).unwrap();
}

/// Writes `entries` as an indirect descriptor table at `addr`.
pub fn write_table(mem: &GuestMemoryMmap, addr: u64, entries: &[RawDescriptor]) {
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(addr + 16 * i as u64))
            .unwrap();
    }
}

/// The entries `(id, len)` of the used ring at `ring`.
pub fn used(mem: &GuestMemoryMmap, ring: u64) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(ring + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let id: u32 = mem.read_obj(GuestAddress(ring + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(ring + 8 + 8 * i)).unwrap();
            (id, len)
        })
        .collect()
}

/// `len` bytes of guest memory at `addr`.
pub fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Writes a transport register.
pub fn write_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// Reads a transport register.
pub fn read_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The driver's initialisation through the transport: accepts `features` (both
/// halves), sets up each queue `(desc table, avail ring, used ring)` at its full
/// size `qsize`, and sets DRIVER_OK.
pub fn mmio_activate<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    features: u64,
    qsize: u16,
    queues: &[(u64, u64, u64)],
) {
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    for sel in 0..2u32 {
        write_reg(t, reg::DRIVER_FEATURES_SEL, sel);
        write_reg(t, reg::DRIVER_FEATURES, low32(features >> (32 * sel)));
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    for (i, &(desc, avail, used)) in queues.iter().enumerate() {
        write_reg(t, reg::QUEUE_SEL, u32::try_from(i).unwrap());
        write_reg(t, reg::QUEUE_NUM, u32::from(qsize));
        write_reg(t, reg::QUEUE_DESC_LOW, low32(desc));
        write_reg(t, reg::QUEUE_DRIVER_LOW, low32(avail));
        write_reg(t, reg::QUEUE_DEVICE_LOW, low32(used));
        write_reg(t, reg::QUEUE_READY, 1);
    }
    write_reg(
        t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
}

/// Where a mock queue's parts are, its used ring moved to `used` (as the tests do).
pub fn mock_rings(vq: &MockSplitQueue<GuestMemoryMmap>, size: u16, used: u64) -> QueueRings {
    QueueRings {
        size,
        desc: vq.desc_table_addr().0,
        avail: vq.avail_addr().0,
        used,
    }
}

/// Runs `device_work` and asserts it wrote guest memory only inside device-writable
/// buffers offered on `queues` and inside their used rings ([`WriteCheck`]).
pub fn assert_writes_offered<T>(
    mem: &GuestMemoryMmap,
    queues: &[QueueRings],
    device_work: impl FnOnce() -> T,
) -> T {
    let check = WriteCheck::start(mem, queues);
    let out = device_work();
    check.assert_clean(mem);
    out
}

/// Runs `work` on a thread and returns what it returned, or fails the test if it
/// has not returned after `secs` seconds (a hang fails instead of hanging the run;
/// the stuck thread is left behind).
pub fn within<T: Send + 'static>(
    secs: u64,
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The receiver is gone only if the test already failed.
        let _ = tx.send(work());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(e) => panic!("{what} did not return within {secs} s ({e}): the device hangs"),
    }
}
