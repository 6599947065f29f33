//! virtio-blk tests on `virtio-queue`'s `MockSplitQueue` and a tempfile disk.

use super::*;
use crate::dma_log::Direction;
use crate::dma_log::{fingerprint, DmaLogReader, Record};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::test_util::CountingLine;
use crate::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use std::io::Read;
use std::io::Write;
use std::sync::Mutex;
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueOwnedT;
use vm_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;
const QSIZE: u16 = 16;
const MEM_SIZE: u64 = 0x40_0000;
const DISK_SIZE: usize = 64 * 1024;
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Page-unique pseudo-random disk content.
fn disk_content() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..DISK_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct H {
    /// Leaked so that a `MockSplitQueue` borrowing it does not borrow the harness.
    mem: &'static GuestMemoryMmap,
    dev: Block,
    line: Arc<CountingLine>,
    irq: Arc<VirtioInterrupt>,
    log: SharedBuf,
    disk: tempfile::NamedTempFile,
    dma: DmaLog,
}

impl H {
    fn new(opts: BlockOptions) -> Self {
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        disk.write_all(&disk_content()).unwrap();
        disk.flush().unwrap();
        let log = SharedBuf::default();
        let dma = DmaLog::new(log.clone()).unwrap();
        let dev = Block::open(disk.path(), opts, dma.clone()).unwrap();
        let line = Arc::new(CountingLine::default());
        let irq = Arc::new(VirtioInterrupt::new(line.clone()));
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap(),
        ));
        H {
            mem,
            dev,
            line,
            irq,
            log,
            disk,
            dma,
        }
    }

    fn vq(&self) -> MockSplitQueue<'static, GuestMemoryMmap> {
        MockSplitQueue::new(self.mem, QSIZE)
    }

    fn activate(&mut self, vq: &MockSplitQueue<GuestMemoryMmap>, features: u64) {
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.dev
            .activate(self.mem.clone(), vec![q], self.irq.clone(), features)
            .unwrap();
    }

    fn records(&self) -> Vec<Record> {
        self.dma.flush().unwrap();
        let bytes = self.log.0.lock().unwrap().clone();
        DmaLogReader::new(&bytes[..])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn errors(&self) -> Vec<(String, bool)> {
        self.records()
            .into_iter()
            .filter_map(|r| match r {
                Record::DeviceError(e) => Some((e.error, e.needs_reset)),
                _ => None,
            })
            .collect()
    }

    fn file_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(self.disk.path())
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    }

    fn header(&self, addr: u64, code: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&code.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Publishes a chain `(addr, len, flags-without-NEXT)` at table index `start`, linked
/// sequentially.
fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, start: u16, descs: &[(u64, u32, u16)]) {
    let n = descs.len() as u16;
    let raws: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, f))| {
            let i = i as u16;
            if i + 1 < n {
                raw(a, l, f | NEXT, start + i + 1)
            } else {
                raw(a, l, f, 0)
            }
        })
        .collect();
    vq.add_desc_chains(&raws, start).unwrap();
}

/// Where the tests put the used ring. `MockSplitQueue` places its used ring 20 bytes
/// after the available ring (its `end()` counts ring entries as bytes), so the two
/// overlap; every test moves the used ring here instead.
const USED: u64 = 0x8000;

/// The used ring's entries `(id, len)`, read from [`USED`].
fn used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
            (id, len)
        })
        .collect()
}

const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;

// ---------------------------------------------------------------- happy path

#[test]
fn multi_segment_write_then_read_round_trip() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    // OUT 3 segments (512 + 4096 crossing a page + 3584) at sector 4.
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    h.mem
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    h.mem
        .write_slice(&payload[512..4608], GuestAddress(DATA + 0x1800))
        .unwrap();
    h.mem
        .write_slice(&payload[4608..], GuestAddress(DATA + 0x4000))
        .unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 4);
    add_chain(
        &vq,
        0,
        &[
            (HDR, 16, 0),
            (DATA, 512, 0),
            (DATA + 0x1800, 4096, 0),
            (DATA + 0x4000, 3584, 0),
            (STATUS, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used(h.mem), vec![(0, 1)]);
    assert_eq!(&h.file_bytes()[2048..2048 + 8192], &payload[..]);
    assert_eq!(&h.file_bytes()[..2048], &disk_content()[..2048]);

    // IN the same 8 KiB into 2 differently split buffers.
    h.header(HDR + 0x100, VIRTIO_BLK_T_IN, 4);
    add_chain(
        &vq,
        5,
        &[
            (HDR + 0x100, 16, 0),
            (DATA + 0x10_0000, 1024, W),
            (DATA + 0x10_2000 - 100, 7168, W),
            (STATUS + 1, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used(h.mem)[1], (5, 8193));
    let mut back = vec![0u8; 8192];
    h.mem
        .read_slice(&mut back[..1024], GuestAddress(DATA + 0x10_0000))
        .unwrap();
    h.mem
        .read_slice(&mut back[1024..], GuestAddress(DATA + 0x10_2000 - 100))
        .unwrap();
    assert_eq!(back, payload);
    assert_eq!(h.line.queue_count(), 2);
    assert!(h.errors().is_empty());
}

#[test]
fn any_layout_header_data_and_status_in_one_descriptor_each_side() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    // Readable: header + nothing; writable: 512 data bytes + status in one buffer.
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 513, W)]);
    h.dev.process_queue(0);
    assert_eq!(h.status(DATA + 512), 0);
    let mut got = vec![0u8; 512];
    h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &disk_content()[512..1024]);
    assert_eq!(used(h.mem), vec![(0, 513)]);
}

#[test]
fn indirect_chain_is_followed() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    let table = 0x3_0000u64;
    let entries = [
        raw(HDR, 16, NEXT, 1),
        raw(DATA, 512, W | NEXT, 2),
        raw(DATA + 0x1000, 512, W | NEXT, 3),
        raw(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        h.mem
            .write_obj(*e, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(&[raw(table, 64, IND, 0)], 0).unwrap();
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS), 0);
    let mut got = vec![0u8; 512];
    h.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, &disk_content()[512..1024]);
    let descs: Vec<(u16, bool)> = h
        .records()
        .into_iter()
        .filter_map(|r| match r {
            Record::Desc(d) if d.role == DescRole::Data => Some((d.desc, d.indirect)),
            _ => None,
        })
        .collect();
    assert_eq!(descs, vec![(1, true), (2, true)]);
}

#[test]
fn flush_syncs_and_data_persists() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    h.header(HDR + 0x100, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 3, &[(HDR + 0x100, 16, 0), (STATUS + 1, 1, W)]);
    h.dev.process_queue(0);
    assert_eq!((h.status(STATUS), h.status(STATUS + 1)), (0, 0));
    assert_eq!(h.dev.flush_count(), 1);
    assert_eq!(&h.file_bytes()[..512], &[0xab; 512]);
    // A FLUSH carrying data is malformed.
    h.header(HDR + 0x200, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        &vq,
        5,
        &[(HDR + 0x200, 16, 0), (DATA, 512, W), (STATUS + 2, 1, W)],
    );
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS + 2), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.dev.flush_count(), 1);
}

#[test]
fn get_id_full_and_short_buffer() {
    let mut h = H::new(BlockOptions {
        id: "serial-123".into(),
        ..Default::default()
    });
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_GET_ID, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)]);
    h.header(HDR + 0x100, VIRTIO_BLK_T_GET_ID, 0);
    add_chain(
        &vq,
        3,
        &[
            (HDR + 0x100, 16, 0),
            (DATA + 0x100, 4, W),
            (STATUS + 1, 1, W),
        ],
    );
    h.dev.process_queue(0);
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert_eq!(&id[10..], &[0; 10]);
    let mut short = [0u8; 5];
    h.mem
        .read_slice(&mut short, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(&short, b"seri\0");
    assert_eq!(used(h.mem), vec![(0, 21), (3, 5)]);
    assert!(matches!(
        Block::open(
            h.disk.path(),
            BlockOptions {
                id: "x".repeat(21),
                ..Default::default()
            },
            DmaLog::disabled()
        ),
        Err(BlockError::IdTooLong(_))
    ));
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut h = H::new(BlockOptions {
        read_only: true,
        ..Default::default()
    });
    assert_ne!(h.dev.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(h.dev.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES | (1 << VIRTIO_BLK_F_RO));
    h.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    h.header(HDR + 0x100, VIRTIO_BLK_T_IN, 0);
    add_chain(
        &vq,
        3,
        &[
            (HDR + 0x100, 16, 0),
            (DATA + 0x1000, 512, W),
            (STATUS + 1, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(h.status(STATUS + 1), VIRTIO_BLK_S_OK as u8);
    assert_eq!(h.file_bytes(), disk_content());
    assert_eq!(h.errors().len(), 1);
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    let seg = |sector: u64, num: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    h.mem
        .write_slice(&seg(8, 8, 0), GuestAddress(DATA))
        .unwrap();
    h.header(HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)]);
    h.mem
        .write_slice(
            &seg(32, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA + 0x100),
        )
        .unwrap();
    h.header(HDR + 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    add_chain(
        &vq,
        3,
        &[
            (HDR + 0x100, 16, 0),
            (DATA + 0x100, 16, 0),
            (STATUS + 1, 1, W),
        ],
    );
    h.mem
        .write_slice(&seg(64, 8, 0), GuestAddress(DATA + 0x200))
        .unwrap();
    h.header(HDR + 0x200, VIRTIO_BLK_T_DISCARD, 0);
    add_chain(
        &vq,
        6,
        &[
            (HDR + 0x200, 16, 0),
            (DATA + 0x200, 16, 0),
            (STATUS + 2, 1, W),
        ],
    );
    // Discard with the unmap flag: UNSUPP.
    h.mem
        .write_slice(
            &seg(64, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            GuestAddress(DATA + 0x300),
        )
        .unwrap();
    h.header(HDR + 0x300, VIRTIO_BLK_T_DISCARD, 0);
    add_chain(
        &vq,
        9,
        &[
            (HDR + 0x300, 16, 0),
            (DATA + 0x300, 16, 0),
            (STATUS + 3, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS), 0);
    assert_eq!(h.status(STATUS + 1), 0);
    assert_eq!(h.status(STATUS + 2), 0);
    assert_eq!(h.status(STATUS + 3), VIRTIO_BLK_S_UNSUPP as u8);
    let f = h.file_bytes();
    assert_eq!(f.len(), DISK_SIZE);
    assert!(f[4096..8192].iter().all(|&b| b == 0));
    assert!(f[16384..20480].iter().all(|&b| b == 0));
    assert_eq!(&f[..4096], &disk_content()[..4096]);
}

#[test]
fn unknown_request_type_is_unsupp() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, 99, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_eq!(h.status(STATUS), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(used(h.mem), vec![(0, 1)]);
}

#[test]
fn config_space_layout_matches_virtio_blk_config() {
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config as C;
    let h = H::new(BlockOptions::default());
    let rd = |off: usize, n: usize| {
        let mut b = [0u8; 8];
        h.dev.read_config(off as u64, &mut b[..n]);
        u64::from_le_bytes(b)
    };
    assert_eq!(rd(offset_of!(C, capacity), 8), (DISK_SIZE / 512) as u64);
    assert_eq!(rd(offset_of!(C, size_max), 4), 1 << 20);
    assert_eq!(rd(offset_of!(C, seg_max), 4), 254);
    assert_eq!(rd(offset_of!(C, num_queues), 2), 1);
    assert_eq!(rd(offset_of!(C, max_discard_seg), 4), 1);
    assert_eq!(rd(offset_of!(C, discard_sector_alignment), 4), 8);
    assert_eq!(rd(offset_of!(C, max_write_zeroes_seg), 4), 1);
    assert_eq!(rd(offset_of!(C, write_zeroes_may_unmap), 1), 1);
    assert_eq!(offset_of!(C, unused1) + 3, CONFIG_LEN);
    assert_eq!(h.dev.device_type(), VIRTIO_ID_BLOCK);
}

fn submit(h: &H, vq: &MockSplitQueue<GuestMemoryMmap>, i: u16) {
    h.header(HDR + 0x100 * u64::from(i), VIRTIO_BLK_T_FLUSH, 0);
    add_chain(
        vq,
        2 * i,
        &[
            (HDR + 0x100 * u64::from(i), 16, 0),
            (STATUS + u64::from(i), 1, W),
        ],
    );
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES | VIRTIO_RING_F_EVENT_IDX);
    let used_event = vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    let avail_event = USED + 4 + 8 * u64::from(QSIZE);
    let set_used_event = |v: u16| h.mem.write_obj(v, GuestAddress(used_event)).unwrap();
    // used_event = 0: interrupt when used idx moves past 0.
    set_used_event(0);
    submit(&h, &vq, 0);
    h.dev.process_queue(0);
    assert_eq!(h.line.queue_count(), 1);
    // The device published avail_event = next_avail.
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
    // used_event still 0: the driver does not want to hear about entry 2.
    submit(&h, &vq, 1);
    h.dev.process_queue(0);
    assert_eq!(h.line.queue_count(), 1);
    // used_event = 2: wants an interrupt once used idx passes 2.
    set_used_event(2);
    submit(&h, &vq, 2);
    h.dev.process_queue(0);
    assert_eq!(h.line.queue_count(), 2);
    assert_eq!(used(h.mem).len(), 3);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    for i in 0..3u16 {
        h.header(HDR + 0x100 * u64::from(i), VIRTIO_BLK_T_FLUSH, 0);
        add_chain(
            &vq,
            2 * i,
            &[
                (HDR + 0x100 * u64::from(i), 16, 0),
                (STATUS + u64::from(i), 1, W),
            ],
        );
        h.dev.process_queue(0);
    }
    assert_eq!(h.line.queue_count(), 3);
    assert_eq!(h.irq.status() & 1, 1);
}

/// Fingerprints are of what the device wrote, even when the guest overwrites the
/// buffers before the log's writer gets to them: copies of guest memory (writable
/// disk), or the image itself (read-only disk, fingerprinted from the file).
#[rstest::rstest]
fn dma_log_matches_transferred_bytes(#[values(false, true)] read_only: bool) {
    let mut h = H::new(BlockOptions {
        read_only,
        ..BlockOptions::default()
    });
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.dma.marker("BEGIN read");
    // IN 3 sectors..: 6000 bytes would not be a sector multiple; use 2 buffers,
    // one crossing a page boundary.
    h.header(HDR, VIRTIO_BLK_T_IN, 2);
    add_chain(
        &vq,
        0,
        &[
            (HDR, 16, 0),
            (DATA + 0x800, 4096, W),
            (DATA + 0x5000, 8192, W),
            (STATUS, 1, W),
        ],
    );
    h.dev.process_queue(0);
    h.dma.marker("END read");
    h.mem
        .write_slice(&[0xa5; 0x8000], GuestAddress(DATA))
        .unwrap();
    let recs = h.records();
    let disk = disk_content();
    let file_off = 2 * 512;
    let data: Vec<_> = recs
        .iter()
        .filter_map(|r| match r {
            Record::Desc(d) if d.role == DescRole::Data => Some(d.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(data.len(), 2);
    assert_eq!(
        (data[0].desc, data[0].gpa, data[0].len),
        (1, DATA + 0x800, 4096)
    );
    assert_eq!(
        (data[1].desc, data[1].gpa, data[1].len),
        (2, DATA + 0x5000, 8192)
    );
    // Pieces: 0x800 + 0x800 for the first, 2 whole pages for the second.
    let mut off = file_off;
    for d in &data {
        assert_eq!(d.dir, Direction::DeviceWrites);
        assert_eq!(d.head, 0);
        for p in &d.pieces {
            let want = fingerprint(&disk[off..off + p.len as usize]);
            assert_eq!(p.hash.0, want, "piece at {:#x}", p.gpa);
            assert!(p.gpa / 4096 == (p.gpa + u64::from(p.len) - 1) / 4096);
            off += p.len as usize;
        }
    }
    assert_eq!(data[0].pieces.len(), 2);
    assert_eq!(data[1].pieces.len(), 2);
    assert_eq!(off, file_off + 4096 + 8192);
    // Header and status records, the request record, markers around, increasing seq.
    let kinds: Vec<String> = recs
        .iter()
        .map(|r| match r {
            Record::Desc(d) => format!("{:?}", d.role),
            Record::Request(q) => match &q.req {
                RequestDetail::Blk(b) => {
                    format!("{} {} {} {:?}", b.op, b.sector, b.bytes, b.status)
                }
                RequestDetail::Net(_) => "net".into(),
            },
            Record::Marker(m) => m.label.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            "BEGIN read",
            "Header",
            "Data",
            "Data",
            "Status",
            "in 2 12288 Ok",
            "END read"
        ]
    );
}

#[test]
fn dma_log_of_write_fingerprints_what_the_device_read() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    let payload = vec![0x5au8; 1024];
    h.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    let d = h
        .records()
        .into_iter()
        .find_map(|r| match r {
            Record::Desc(d) if d.role == DescRole::Data => Some(d),
            _ => None,
        })
        .unwrap();
    assert_eq!(d.dir, Direction::DeviceReads);
    assert_eq!(d.pieces[0].hash.0, fingerprint(&h.file_bytes()[..1024]));
}

#[test]
fn disabled_log_still_transfers() {
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&disk_content()).unwrap();
    let mut dev = Block::open(disk.path(), BlockOptions::default(), DmaLog::disabled()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let irq = Arc::new(VirtioInterrupt::new(Arc::new(CountingLine::default())));
    dev.activate(
        mem.clone(),
        vec![vq.create_queue().unwrap()],
        irq,
        BASE_FEATURES,
    )
    .unwrap();
    let mut h = [0u8; 16];
    h[8] = 1;
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    dev.process_queue(0);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &disk_content()[512..1024]);
}

#[test]
fn through_the_mmio_transport() {
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&disk_content()).unwrap();
    let dev = Block::open(disk.path(), BlockOptions::default(), DmaLog::disabled()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let line = Arc::new(CountingLine::default());
    let mut t = MmioTransport::new(dev, mem.clone(), line.clone());
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let wr = |t: &mut MmioTransport<Block>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    wr(&mut t, 0x70, ACKNOWLEDGE);
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut t, 0x24, 0);
    wr(&mut t, 0x20, 1 << VIRTIO_BLK_F_FLUSH);
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 1); // VERSION_1
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(&mut t, 0x30, 0);
    wr(&mut t, 0x38, u32::from(QSIZE));
    wr(&mut t, 0x80, vq.desc_table_addr().0 as u32);
    wr(&mut t, 0x90, vq.avail_addr().0 as u32);
    wr(&mut t, 0xa0, USED as u32);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert!(t.is_active());
    let mut h = [0u8; 16];
    h[8] = 3;
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    wr(&mut t, 0x50, 0);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &disk_content()[1536..2048]);
    let mut b = [0u8; 4];
    t.read(0x60, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    assert_eq!(line.queue_count(), 1);
    // Capacity through the config window.
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);
    // Reset and the device is inert until re-initialised.
    wr(&mut t, 0x70, 0);
    add_chain(&vq, 3, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    t.notify_queue(0);
    assert_eq!(used(&mem).len(), 1);
}

// ---------------------------------------------------------------- bad input

/// Asserts the request got `status` with a non-fatal device-error record.
fn assert_answered(h: &H, status_addr: u64, status: u32, what: &str) {
    assert_eq!(h.status(status_addr), status as u8, "status for {what}");
    assert_eq!(used(h.mem).len(), 1, "completed: {what}");
    let errs = h.errors();
    assert_eq!(errs.len(), 1, "one error record for {what}: {errs:?}");
    assert!(!errs[0].1);
    assert!(
        errs[0].0.contains(what),
        "{:?} should mention {what:?}",
        errs[0].0
    );
    assert!(!h.irq.needs_reset());
}

/// Asserts the device went to NEEDS_RESET without completing anything and ignores
/// later notifications.
fn assert_needs_reset(h: &mut H, vq: &MockSplitQueue<GuestMemoryMmap>, what: &str) {
    assert!(h.irq.needs_reset(), "needs reset for {what}");
    assert_eq!(h.line.config_count(), 1);
    assert_eq!(h.irq.status() & 2, 2);
    assert!(used(h.mem).is_empty());
    let errs = h.errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].1);
    assert!(
        errs[0].0.contains(what),
        "{:?} should mention {what:?}",
        errs[0].0
    );
    // A well-formed request afterwards is not processed until reset.
    h.header(HDR + 0x800, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(vq, 12, &[(HDR + 0x800, 16, 0), (STATUS + 8, 1, W)]);
    h.dev.process_queue(0);
    assert!(used(h.mem).is_empty());
    h.dev.reset();
}

fn bad_in() -> (H, u64) {
    let h = H::new(BlockOptions::default());
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    (h, STATUS)
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let (mut h, st) = bad_in();
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    add_chain(
        &vq,
        0,
        &[(HDR, 16, 0), (MEM_SIZE - 256, 512, W), (st, 1, W)],
    );
    h.dev.process_queue(0);
    assert_answered(&h, st, VIRTIO_BLK_S_IOERR, "outside guest memory");
}

#[test]
fn data_far_outside_guest_memory_is_ioerr() {
    let (mut h, st) = bad_in();
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    add_chain(
        &vq,
        0,
        &[(HDR, 16, 0), (0xdead_0000_0000, 512, W), (st, 1, W)],
    );
    h.dev.process_queue(0);
    assert_answered(&h, st, VIRTIO_BLK_S_IOERR, "outside guest memory");
}

#[test]
fn address_plus_length_overflow_is_ioerr() {
    let (mut h, st) = bad_in();
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    add_chain(
        &vq,
        0,
        &[(HDR, 16, 0), (u64::MAX - 100, 512, W), (st, 1, W)],
    );
    h.dev.process_queue(0);
    assert_answered(&h, st, VIRTIO_BLK_S_IOERR, "overflows");
}

#[test]
fn loop_in_chain_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(
        &[
            raw(HDR, 16, NEXT, 1),
            raw(DATA, 512, W | NEXT, 2),
            raw(DATA, 512, W | NEXT, 1),
        ],
        0,
    )
    .unwrap();
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "loops");
}

#[test]
fn chain_longer_than_queue_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    // All 16 entries chained, the last pointing back to the first.
    let descs: Vec<RawDescriptor> = (0..QSIZE)
        .map(|i| {
            let f = if i == 0 { NEXT } else { NEXT | W };
            let addr = if i == 0 {
                HDR
            } else {
                DATA + 512 * u64::from(i)
            };
            raw(addr, if i == 0 { 16 } else { 512 }, f, (i + 1) % QSIZE)
        })
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "longer than its queue's table (16 entries)");
}

#[test]
fn virtio_queue_iterator_silently_truncates_a_loop() {
    // Why the device walks chains itself: the library's iterator just stops.
    let h = H::new(BlockOptions::default());
    let vq = h.vq();
    vq.add_desc_chains(&[raw(HDR, 16, NEXT, 1), raw(DATA, 512, W | NEXT, 0)], 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.iter(h.mem).unwrap().next().unwrap();
    let descs: Vec<_> = chain.collect();
    assert_eq!(descs.len(), usize::from(QSIZE));
    assert!(descs.last().unwrap().has_next(), "truncated, not ended");
}

#[test]
fn nested_indirect_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    let table = 0x3_0000u64;
    h.mem
        .write_obj(raw(HDR, 16, NEXT, 1), GuestAddress(table))
        .unwrap();
    h.mem
        .write_obj(raw(table + 0x100, 32, IND, 0), GuestAddress(table + 16))
        .unwrap();
    vq.add_desc_chains(&[raw(table, 32, IND, 0)], 0).unwrap();
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "inside an indirect table");
}

#[test]
fn indirect_without_feature_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, VIRTIO_F_VERSION_1);
    vq.add_desc_chains(&[raw(0x3_0000, 32, IND, 0)], 0).unwrap();
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "not negotiated");
}

#[test]
fn write_only_buffer_where_device_must_read_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    // OUT whose data buffer is device-writable.
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "device-writable data");
    assert_eq!(h.file_bytes(), disk_content());
}

#[test]
fn write_only_header_is_header_too_short() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "header too short");
    // The device wrote nothing into the would-be buffers.
    let mut hdr = [0u8; 16];
    h.mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    assert_eq!(hdr[0], VIRTIO_BLK_T_IN as u8);
}

#[test]
fn read_only_buffer_where_device_must_write_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "device-readable data");
    let mut got = [0u8; 512];
    h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0x11; 512], "device must not write a read-only buffer");
}

#[test]
fn readable_after_writable_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(
        &vq,
        0,
        &[
            (HDR, 16, 0),
            (DATA, 512, W),
            (DATA + 0x1000, 512, 0),
            (STATUS, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "after a device-writable");
}

#[test]
fn zero_length_buffer_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(
        &vq,
        0,
        &[
            (HDR, 16, 0),
            (DATA, 512, W),
            (DATA + 0x1000, 0, W),
            (STATUS, 1, W),
        ],
    );
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "zero-length");
}

#[test]
fn request_beyond_disk_end_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    // Last sector is 127; a 2-sector read from 127 crosses the end.
    h.header(HDR, VIRTIO_BLK_T_IN, (DISK_SIZE / 512 - 1) as u64);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "beyond the disk's end");
}

#[test]
fn sector_overflow_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, u64::MAX / 256);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "beyond the disk's end");
    assert_eq!(h.file_bytes(), disk_content());
}

#[test]
fn unaligned_data_length_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 500, W), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "not a multiple of 512");
}

#[test]
fn missing_status_byte_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, 0)]);
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "missing status byte");
    assert_eq!(h.file_bytes(), disk_content(), "nothing executed");
}

#[test]
fn zero_length_status_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 0, W)]);
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "missing status byte");
}

#[test]
fn status_outside_memory_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (DATA, 512, W), (MEM_SIZE, 1, W)]);
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "outside guest memory");
}

#[test]
fn header_too_short_is_ioerr() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    add_chain(&vq, 0, &[(HDR, 8, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert_answered(&h, STATUS, VIRTIO_BLK_S_IOERR, "header too short");
}

#[test]
fn head_index_out_of_range_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    // Avail ring entry naming descriptor 200 in a 16-entry table.
    vq.avail().ring().ref_at(0).unwrap().store(200);
    vq.avail().idx().store(1);
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "outside the queue's table");
}

#[test]
fn avail_index_jump_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    vq.avail().idx().store(QSIZE + 5);
    h.dev.process_queue(0);
    assert!(h.irq.needs_reset());
    assert!(h.errors()[0].0.contains("available ring"));
}

#[test]
fn indirect_table_outside_memory_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    vq.add_desc_chains(&[raw(u64::MAX - 15, 32, IND, 0)], 0)
        .unwrap();
    h.dev.process_queue(0);
    assert_needs_reset(&mut h, &vq, "outside guest memory");
}

#[test]
fn notify_before_activation_and_after_reset_is_ignored() {
    let mut h = H::new(BlockOptions::default());
    h.dev.process_queue(0);
    h.dev.process_queue(7);
    let vq = h.vq();
    h.activate(&vq, BASE_FEATURES);
    h.dev.reset();
    h.header(HDR, VIRTIO_BLK_T_FLUSH, 0);
    add_chain(&vq, 0, &[(HDR, 16, 0), (STATUS, 1, W)]);
    h.dev.process_queue(0);
    assert!(used(h.mem).is_empty());
}

#[test]
fn device_needs_reset_through_transport_status() {
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&disk_content()).unwrap();
    let dev = Block::open(disk.path(), BlockOptions::default(), DmaLog::disabled()).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let line = Arc::new(CountingLine::default());
    let mut t = MmioTransport::new(dev, mem.clone(), line.clone());
    let vq = MockSplitQueue::new(&mem, QSIZE);
    let wr = |t: &mut MmioTransport<Block>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 1);
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    wr(&mut t, 0x80, vq.desc_table_addr().0 as u32);
    wr(&mut t, 0x90, vq.avail_addr().0 as u32);
    wr(&mut t, 0xa0, USED as u32);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    vq.add_desc_chains(&[raw(HDR, 16, NEXT, 0)], 0).unwrap();
    wr(&mut t, 0x50, 0);
    let mut b = [0u8; 4];
    t.read(0x70, &mut b);
    assert_ne!(u32::from_le_bytes(b) & DEVICE_NEEDS_RESET, 0);
    t.read(0x60, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2);
    wr(&mut t, 0x70, 0);
    t.read(0x70, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0);
}
