//! virtio-blk tests on `virtio-queue`'s `MockSplitQueue` and a tempfile disk.

use super::*;
use crate::dma_log::{fingerprint, Direction, Record};
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::status::DEVICE_NEEDS_RESET;
use crate::virtio::test_util::{
    add_chain, assert_writes_offered, counting_interrupt, leaked_memory, linked, mmio_activate,
    mock_rings, raw, read, read_reg, used, within, write_reg, write_table, CountingLine, MockQueue,
    TestLog, IND, NEXT, W,
};
use crate::virtio::write_check::QueueRings;
use crate::virtio::{low32, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use rstest::rstest;
use std::io::{Read, Write};
use virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::QueueOwnedT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_protocol::Marker;

const QSIZE: u16 = 16;
const MEM_SIZE: u64 = 0x40_0000;
const DISK_SIZE: usize = 64 * 1024;
const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_DISCARD)
    | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
/// What Linux accepts: the above and the segment limits.
const LIMIT_FEATURES: u64 =
    BASE_FEATURES | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_SIZE_MAX);

/// Page-unique pseudo-random disk content.
fn disk_content() -> Vec<u8> {
    crate::virtio::test_util::noise(0x9e37_79b9_7f4a_7c15, DISK_SIZE)
}

struct H {
    mem: &'static GuestMemoryMmap,
    dev: Block,
    line: Arc<CountingLine>,
    irq: Arc<VirtioInterrupt>,
    log: TestLog,
    /// The disk image.
    disk: std::path::PathBuf,
    /// Keeps a temporary image alive (`None` for an image the test does not own).
    _temp: Option<tempfile::NamedTempFile>,
    vq: MockQueue,
}

impl H {
    fn new(opts: BlockOptions) -> Self {
        let log = TestLog::new();
        let mut h = Self::with_log(opts, log.dma.clone());
        h.log = log;
        h
    }

    /// The device logs to `dma` (`h.log` is then not the device's).
    fn with_log(opts: BlockOptions, dma: DmaLog) -> Self {
        let mut disk = tempfile::NamedTempFile::new().unwrap();
        disk.write_all(&disk_content()).unwrap();
        disk.flush().unwrap();
        let dev = Block::open(disk.path(), opts, dma).unwrap();
        let mut h = Self::with_device(dev, disk.path());
        h._temp = Some(disk);
        h
    }

    /// Around `dev`, whose image is at `disk`.
    fn with_device(dev: Block, disk: &std::path::Path) -> Self {
        let (line, irq) = counting_interrupt();
        let mem = leaked_memory(MEM_SIZE);
        H {
            mem,
            dev,
            line,
            irq,
            log: TestLog::new(),
            disk: disk.to_path_buf(),
            _temp: None,
            vq: MockQueue::new(mem, QSIZE),
        }
    }

    fn activate(&mut self, features: u64) {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.set_used_ring_address(Some(low32(USED)), Some(0));
        q.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.dev
            .activate(self.mem.clone(), vec![q], self.irq.clone(), features)
            .unwrap();
    }

    fn file_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(&self.disk).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    fn header(&self, addr: u64, code: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&code.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    /// Publishes request `n` (`code` at `sector`) from table entry `start`: its
    /// header at `HDR + 0x100 * n`, then `data`, then its status byte at `STATUS + n`.
    fn request(&self, start: u16, n: u64, code: u32, sector: u64, data: &[(u64, u32, u16)]) {
        let hdr = HDR + 0x100 * n;
        self.header(hdr, code, sector);
        let mut chain = vec![(hdr, 16, 0)];
        chain.extend_from_slice(data);
        chain.push((STATUS + n, 1, W));
        add_chain(&self.vq, start, &chain);
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// The driver's notify: the device serves the queue, and must write only the
    /// device-writable buffers of the chains offered and the used ring.
    fn process(&mut self) {
        let rings = [mock_rings(&self.vq, QSIZE, USED)];
        let dev = &mut self.dev;
        assert_writes_offered(self.mem, &rings, || dev.process_queue(0));
    }
}

/// Where the tests put the used ring. `MockSplitQueue` places its used ring 20 bytes
/// after the available ring (its `end()` counts ring entries as bytes), so the two
/// overlap; every test moves the used ring here instead.
const USED: u64 = 0x8000;

const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
/// Where tests put an indirect table.
const TABLE: u64 = 0x3_0000;

// ---------------------------------------------------------------- happy path

#[test]
fn multi_segment_write_then_read_round_trip() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    // OUT 3 segments (512 + 4096 crossing a page + 3584) at sector 4.
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
    h.mem
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    h.mem
        .write_slice(&payload[512..4608], GuestAddress(DATA + 0x1800))
        .unwrap();
    h.mem
        .write_slice(&payload[4608..], GuestAddress(DATA + 0x4000))
        .unwrap();
    h.request(
        0,
        0,
        VIRTIO_BLK_T_OUT,
        4,
        &[
            (DATA, 512, 0),
            (DATA + 0x1800, 4096, 0),
            (DATA + 0x4000, 3584, 0),
        ],
    );
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_OK);
    assert_eq!(used(h.mem, USED), vec![(0, 1)]);
    assert_eq!(&h.file_bytes()[2048..2048 + 8192], &payload[..]);
    assert_eq!(&h.file_bytes()[..2048], &disk_content()[..2048]);

    // IN the same 8 KiB into 2 differently split buffers.
    h.request(
        5,
        1,
        VIRTIO_BLK_T_IN,
        4,
        &[
            (DATA + 0x10_0000, 1024, W),
            (DATA + 0x10_2000 - 100, 7168, W),
        ],
    );
    h.process();
    assert_eq!(u32::from(h.status(STATUS + 1)), VIRTIO_BLK_S_OK);
    assert_eq!(used(h.mem, USED)[1], (5, 8193));
    let mut back = vec![0u8; 8192];
    h.mem
        .read_slice(&mut back[..1024], GuestAddress(DATA + 0x10_0000))
        .unwrap();
    h.mem
        .read_slice(&mut back[1024..], GuestAddress(DATA + 0x10_2000 - 100))
        .unwrap();
    assert_eq!(back, payload);
    assert_eq!(h.line.queue_count(), 2);
    assert!(h.log.errors().is_empty());
}

#[test]
fn any_layout_header_data_and_status_in_one_descriptor_each_side() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    // Readable: header + nothing; writable: 512 data bytes + status in one buffer.
    h.header(HDR, VIRTIO_BLK_T_IN, 1);
    add_chain(&h.vq, 0, &[(HDR, 16, 0), (DATA, 513, W)]);
    h.process();
    assert_eq!(h.status(DATA + 512), 0);
    let mut got = vec![0u8; 512];
    h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &disk_content()[512..1024]);
    assert_eq!(used(h.mem, USED), vec![(0, 513)]);
}

#[test]
fn indirect_chain_is_followed() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
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
    h.vq.add_desc_chains(&[raw(table, 64, IND, 0)], 0).unwrap();
    h.process();
    assert_eq!(h.status(STATUS), 0);
    let mut got = vec![0u8; 512];
    h.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, &disk_content()[512..1024]);
    let descs: Vec<(u16, bool)> = h
        .log
        .data_descs()
        .iter()
        .map(|d| (d.desc, d.indirect))
        .collect();
    assert_eq!(descs, vec![(1, true), (2, true)]);
}

#[test]
fn flush_syncs_and_data_persists() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    h.request(0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, 0)]);
    h.request(3, 1, VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    assert_eq!((h.status(STATUS), h.status(STATUS + 1)), (0, 0));
    assert_eq!(h.dev.flush_count(), 1);
    assert_eq!(&h.file_bytes()[..512], &[0xab; 512]);
    // A FLUSH carrying data is malformed.
    h.request(5, 2, VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, W)]);
    h.process();
    assert_eq!(u32::from(h.status(STATUS + 2)), VIRTIO_BLK_S_IOERR);
    assert_eq!(h.dev.flush_count(), 1);
}

/// A FLUSH whose `fdatasync` fails completes with IOERR (and is not counted): the
/// status the guest sees is the sync's result, so it is written after the sync
/// returned, never before. `/dev/full` takes writes but refuses `fdatasync`
/// (EINVAL), a real failing sync without a test double.
#[test]
fn a_flush_completes_with_the_result_of_its_fdatasync() {
    let full = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/full")
        .unwrap();
    let dev = Block::new(full, BlockOptions::default(), DmaLog::disabled()).unwrap();
    let mut h = H::with_device(dev, Path::new("/dev/full"));
    h.activate(BASE_FEATURES);
    h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    h.request(0, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        used(h.mem, USED),
        vec![(0, 1)],
        "completed once, status byte only"
    );
    assert_eq!(h.dev.flush_count(), 0, "a failed fdatasync is not a flush");
    assert_eq!(h.dev.stats().io_errors, 1);

    // The same request on a regular file: the sync succeeds, the status says so.
    let mut ok = H::new(BlockOptions::default());
    ok.activate(BASE_FEATURES);
    ok.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    ok.request(0, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    ok.process();
    assert_eq!(u32::from(ok.status(STATUS)), VIRTIO_BLK_S_OK);
    assert_eq!(ok.dev.flush_count(), 1);
}

/// Set in the child process of [`flushed_data_survives_a_sigkill_right_after_the_flush`]:
/// the image it writes to.
const KILL_CHILD_IMAGE: &str = "ZC_TEST_BLK_KILL_CHILD_IMAGE";
/// What the child prints once the FLUSH has completed, followed by the seed of what
/// it wrote.
const FLUSH_COMPLETED: &str = "zc-test: flush completed, seed ";
/// Bytes the child writes (several OUT requests, some of several segments).
const KILL_WRITE_LEN: usize = 8 * 4096;

/// The child's data: pseudo-random from `seed`, so that nothing but this run's
/// writes can match.
fn kill_pattern(seed: u64) -> Vec<u8> {
    crate::virtio::test_util::noise(seed, KILL_WRITE_LEN)
}

/// A process that runs the device model on a real image, writes to it as a guest
/// would (OUT requests, then FLUSH), and is SIGKILLed as soon as it reports the
/// FLUSH complete (status OK in guest memory, in the used ring): the data is in the
/// image. This shows that the device holds nothing back once it acknowledged a
/// write and its FLUSH (no user-space buffer, no deferred write). It cannot show
/// that the data survives a power loss: a killed process does not drop the page
/// cache, and that is what `fdatasync` is for (see
/// `a_flush_completes_with_the_result_of_its_fdatasync`).
#[test]
fn flushed_data_survives_a_sigkill_right_after_the_flush() {
    if let Ok(image) = std::env::var(KILL_CHILD_IMAGE) {
        flush_then_wait_to_be_killed(Path::new(&image));
    }
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    let image = tempfile::NamedTempFile::new().unwrap();
    image.as_file().set_len(DISK_SIZE as u64).unwrap();
    let name = concat!(
        module_path!(),
        "::flushed_data_survives_a_sigkill_right_after_the_flush"
    );
    let name = name.split_once("::").unwrap().1;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(KILL_CHILD_IMAGE, image.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The marker may follow libtest's "test NAME ... " on the same line. Read on a
    // thread, so that a child that never reports fails the test instead of hanging it.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, s)) = line.split_once(FLUSH_COMPLETED) {
                let _ = tx.send(s.trim().parse::<u64>().ok());
                return;
            }
        }
    });
    let seed = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .ok()
        .flatten();
    // SIGKILL, at once: no destructor, no exit handler runs in the child.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let seed = seed.unwrap_or_else(|| panic!("the child never reported its flush: {status}"));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    let bytes = std::fs::read(image.path()).unwrap();
    let at = usize::try_from(8 * SECTOR_SIZE).unwrap();
    assert!(
        bytes[at..at + KILL_WRITE_LEN] == kill_pattern(seed)[..],
        "the flushed bytes are not in the image"
    );
    assert!(
        bytes[..at].iter().all(|&b| b == 0),
        "wrote outside its range"
    );
}

/// The child of `flushed_data_survives_a_sigkill_right_after_the_flush`.
fn flush_then_wait_to_be_killed(image: &Path) -> ! {
    let seed = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .rotate_left(32);
    let data = kill_pattern(seed);
    let dev = Block::open(image, BlockOptions::default(), TestLog::new().dma).unwrap();
    let mut h = H::with_device(dev, image);
    h.activate(BASE_FEATURES);
    h.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // Four OUTs of 8 KiB, the odd ones in two segments, then a FLUSH.
    let quarter = KILL_WRITE_LEN / 4;
    let mut desc = 0u16;
    for n in 0..4u64 {
        let addr = DATA + n * quarter as u64;
        let sector = 8 + n * quarter as u64 / SECTOR_SIZE;
        let len = u32::try_from(quarter).unwrap();
        let segs: Vec<(u64, u32, u16)> = if n % 2 == 0 {
            vec![(addr, len, 0)]
        } else {
            vec![(addr, len / 2, 0), (addr + u64::from(len / 2), len / 2, 0)]
        };
        h.request(desc, n, VIRTIO_BLK_T_OUT, sector, &segs);
        desc += u16::try_from(segs.len()).unwrap() + 2;
    }
    h.request(desc, 4, VIRTIO_BLK_T_FLUSH, 0, &[]);
    for n in 0..5 {
        h.mem.write_obj(0xffu8, GuestAddress(STATUS + n)).unwrap();
    }
    h.process();
    let statuses: Vec<u8> = (0..5).map(|n| h.status(STATUS + n)).collect();
    assert_eq!(statuses, vec![0; 5], "every request completed OK");
    assert_eq!(
        used(h.mem, USED).len(),
        5,
        "every request is in the used ring"
    );
    assert_eq!(h.dev.flush_count(), 1);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{FLUSH_COMPLETED}{seed}").unwrap();
    out.flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[test]
fn get_id_full_and_short_buffer() {
    let mut h = H::new(BlockOptions {
        id: "serial-123".into(),
        ..Default::default()
    });
    h.activate(BASE_FEATURES);
    h.mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
    h.request(0, 0, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    h.request(3, 1, VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x100, 4, W)]);
    h.process();
    let mut id = [0u8; 20];
    h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert_eq!(&id[10..], &[0; 10]);
    let mut short = [0u8; 5];
    h.mem
        .read_slice(&mut short, GuestAddress(DATA + 0x100))
        .unwrap();
    assert_eq!(&short, b"seri\0");
    assert_eq!(used(h.mem, USED), vec![(0, 21), (3, 5)]);
    assert!(matches!(
        Block::open(
            &h.disk,
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
    h.activate(BASE_FEATURES | (1 << VIRTIO_BLK_F_RO));
    h.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    h.request(0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, 0)]);
    h.request(3, 1, VIRTIO_BLK_T_IN, 0, &[(DATA + 0x1000, 512, W)]);
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_IOERR);
    assert_eq!(u32::from(h.status(STATUS + 1)), VIRTIO_BLK_S_OK);
    assert_eq!(h.file_bytes(), disk_content());
    assert_eq!(h.log.errors().len(), 1);
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // (type, segment sector, sectors, flags, status)
    let requests = [
        (VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 0, VIRTIO_BLK_S_OK),
        (VIRTIO_BLK_T_WRITE_ZEROES, 32, 8, unmap, VIRTIO_BLK_S_OK),
        (VIRTIO_BLK_T_DISCARD, 64, 8, 0, VIRTIO_BLK_S_OK),
        // Discard with the unmap flag: UNSUPP.
        (VIRTIO_BLK_T_DISCARD, 64, 8, unmap, VIRTIO_BLK_S_UNSUPP),
    ];
    for (i, &(code, sector, num, flags, _)) in requests.iter().enumerate() {
        let at = 0x100 * i as u64;
        let seg = dwz_segment(sector, num, flags);
        h.mem.write_slice(&seg, GuestAddress(DATA + at)).unwrap();
        let i16 = u16::try_from(i).unwrap();
        h.request(3 * i16, i as u64, code, 0, &[(DATA + at, 16, 0)]);
    }
    h.process();
    for (i, &(.., status)) in requests.iter().enumerate() {
        assert_eq!(
            u32::from(h.status(STATUS + i as u64)),
            status,
            "request {i}"
        );
    }
    let f = h.file_bytes();
    assert_eq!(f.len(), DISK_SIZE);
    assert!(f[4096..8192].iter().all(|&b| b == 0));
    assert!(f[16384..20480].iter().all(|&b| b == 0));
    assert_eq!(&f[..4096], &disk_content()[..4096]);
}

/// A `virtio_blk_discard_write_zeroes` segment.
fn dwz_segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn unknown_request_type_is_unsupp() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    h.request(0, 0, 99, 0, &[]);
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(used(h.mem, USED), vec![(0, 1)]);
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

/// Publishes FLUSH number `i`.
fn submit(h: &H, i: u16) {
    h.request(2 * i, i.into(), VIRTIO_BLK_T_FLUSH, 0, &[]);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES | VIRTIO_RING_F_EVENT_IDX);
    let used_event = h.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    let avail_event = USED + 4 + 8 * u64::from(QSIZE);
    let set_used_event = |v: u16| h.mem.write_obj(v, GuestAddress(used_event)).unwrap();
    // used_event = 0: interrupt when used idx moves past 0.
    set_used_event(0);
    submit(&h, 0);
    h.process();
    assert_eq!(h.line.queue_count(), 1);
    // The device published avail_event = next_avail.
    assert_eq!(h.mem.read_obj::<u16>(GuestAddress(avail_event)).unwrap(), 1);
    // used_event still 0: the driver does not want to hear about entry 2.
    submit(&h, 1);
    h.process();
    assert_eq!(h.line.queue_count(), 1);
    // used_event = 2: wants an interrupt once used idx passes 2.
    set_used_event(2);
    submit(&h, 2);
    h.process();
    assert_eq!(h.line.queue_count(), 2);
    assert_eq!(used(h.mem, USED).len(), 3);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    for i in 0..3u16 {
        submit(&h, i);
        h.process();
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
    h.activate(BASE_FEATURES);
    h.log.dma.marker(&Marker::begin("read").label());
    // IN 3 sectors..: 6000 bytes would not be a sector multiple; use 2 buffers,
    // one crossing a page boundary.
    h.request(
        0,
        0,
        VIRTIO_BLK_T_IN,
        2,
        &[(DATA + 0x800, 4096, W), (DATA + 0x5000, 8192, W)],
    );
    h.process();
    h.log.dma.marker(&Marker::end("read").label());
    h.mem
        .write_slice(&[0xa5; 0x8000], GuestAddress(DATA))
        .unwrap();
    let recs = h.log.records();
    let disk = disk_content();
    let file_off = 2 * 512;
    let data = h.log.data_descs();
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
            Marker::begin("read").label().as_str(),
            "Header",
            "Data",
            "Data",
            "Status",
            "in 2 12288 Ok",
            Marker::end("read").label().as_str()
        ]
    );
}

#[test]
fn dma_log_of_write_fingerprints_what_the_device_read() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    let payload = vec![0x5au8; 1024];
    h.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    h.request(0, 0, VIRTIO_BLK_T_OUT, 0, &[(DATA, 1024, 0)]);
    h.process();
    let d = &h.log.data_descs()[0];
    assert_eq!(d.dir, Direction::DeviceReads);
    assert_eq!(d.pieces[0].hash.0, fingerprint(&h.file_bytes()[..1024]));
}

#[test]
fn disabled_log_still_transfers() {
    let mut h = H::with_log(BlockOptions::default(), DmaLog::disabled());
    h.activate(BASE_FEATURES);
    h.request(0, 0, VIRTIO_BLK_T_IN, 1, &[(DATA, 512, W)]);
    h.process();
    assert_eq!(read(h.mem, DATA, 512), &disk_content()[512..1024]);
}

/// A device behind the transport, driven through its registers.
fn transport(features: u64) -> (MmioTransport<Block>, Arc<CountingLine>, H) {
    let h = H::with_log(BlockOptions::default(), DmaLog::disabled());
    let dev = Block::open(&h.disk, BlockOptions::default(), DmaLog::disabled()).unwrap();
    let line = Arc::new(CountingLine::default());
    let mut t = MmioTransport::new(dev, h.mem.clone(), line.clone());
    let q = (h.vq.desc_table_addr().0, h.vq.avail_addr().0, USED);
    mmio_activate(&mut t, features, QSIZE, &[q]);
    (t, line, h)
}

#[test]
fn through_the_mmio_transport() {
    let (mut t, line, h) = transport((1 << VIRTIO_BLK_F_FLUSH) | VIRTIO_F_VERSION_1);
    assert!(t.is_active());
    h.request(0, 0, VIRTIO_BLK_T_IN, 3, &[(DATA, 512, W)]);
    write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_eq!(read(h.mem, DATA, 512), &disk_content()[1536..2048]);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 1);
    assert_eq!(line.queue_count(), 1);
    // Capacity through the config window.
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK_SIZE / 512) as u64);
    // Reset and the device is inert until re-initialised.
    write_reg(&mut t, reg::STATUS, 0);
    add_chain(&h.vq, 3, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
    t.notify_queue(0);
    assert_eq!(used(h.mem, USED).len(), 1);
}

// ---------------------------------------------------------------- counters, log

#[test]
fn stats_count_requests_bytes_and_errors() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    h.mem.write_slice(&[7; 1024], GuestAddress(DATA)).unwrap();
    let none: &[(u64, u32, u16)] = &[];
    let requests = [
        (VIRTIO_BLK_T_OUT, &[(DATA, 1024, 0)][..]),
        (VIRTIO_BLK_T_IN, &[(DATA + 0x1000, 512, W)]),
        (VIRTIO_BLK_T_FLUSH, none),
        (VIRTIO_BLK_T_GET_ID, &[(DATA + 0x2000, 20, W)]),
        (99, none),
        // Beyond the disk's end: refused.
        (VIRTIO_BLK_T_IN, &[(DATA + 0x3000, 512, W)]),
    ];
    // One at a time, each chain from table entry 0.
    for (i, (code, data)) in requests.iter().enumerate() {
        let sector = if i == 5 { (DISK_SIZE / 512) as u64 } else { 0 };
        h.request(0, i as u64, *code, sector, data);
        h.process();
    }
    // A chain with no header: malformed, IOERR.
    add_chain(&h.vq, 0, &[(STATUS + 6, 1, W)]);
    h.process();
    let s = h.dev.stats();
    assert_eq!(
        (
            s.in_requests,
            s.out_requests,
            s.flush_requests,
            s.get_id_requests
        ),
        (2, 1, 1, 1)
    );
    assert_eq!((s.unsupported_requests, s.malformed_requests), (1, 1));
    assert_eq!((s.bytes_read, s.bytes_written, s.flushes), (512, 1024, 1));
    assert_eq!((s.status_ok, s.status_ioerr, s.status_unsupp), (4, 2, 1));
    assert_eq!((s.invalid_requests, s.io_errors, s.chain_faults), (2, 0, 0));
    assert_eq!(h.dev.flush_count(), 1);
    let json = serde_json::to_value(s).unwrap();
    assert_eq!(json["bytes_written"], 1024);
    // A chain the device cannot answer.
    h.vq.add_desc_chains(&[raw(HDR, 16, NEXT, 0)], 0).unwrap();
    h.process();
    assert_eq!(h.dev.stats().chain_faults, 1);
}

#[test]
fn discard_and_write_zeroes_log_their_segment() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    let seg = dwz_segment(8, 8, 0);
    h.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_DISCARD, 0);
    // The segment split over two descriptors.
    add_chain(
        &h.vq,
        0,
        &[
            (HDR, 16, 0),
            (DATA, 10, 0),
            (DATA + 10, 6, 0),
            (STATUS, 1, W),
        ],
    );
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_OK);
    let data = h.log.data_descs();
    let got: Vec<_> = data.iter().map(|d| (d.desc, d.gpa, d.len, d.dir)).collect();
    let r = Direction::DeviceReads;
    assert_eq!(got, vec![(1, DATA, 10, r), (2, DATA + 10, 6, r)]);
    assert_eq!(data[0].pieces[0].hash.0, fingerprint(&seg[..10]));
    assert_eq!(h.dev.stats().bytes_deallocated, 4096);
}

#[test]
fn request_type_names_are_the_logs() {
    use request::RequestType;
    let names: Vec<_> = [0, 1, 4, 8, 11, 13, 2, u32::MAX]
        .into_iter()
        .map(|c| (RequestType::from(c), op_name(c)))
        .collect();
    assert_eq!(
        names,
        vec![
            (RequestType::In, "in"),
            (RequestType::Out, "out"),
            (RequestType::Flush, "flush"),
            (RequestType::GetId, "get_id"),
            (RequestType::Discard, "discard"),
            (RequestType::WriteZeroes, "write_zeroes"),
            (RequestType::Unsupported(2), "unknown"),
            (RequestType::Unsupported(u32::MAX), "malformed"),
        ]
    );
}

// ---------------------------------------------------------------- bad input

/// Asserts the request got `status` with a non-fatal device-error record.
fn assert_answered(h: &H, status_addr: u64, status: u32, what: &str) {
    assert_eq!(
        u32::from(h.status(status_addr)),
        status,
        "status for {what}"
    );
    assert_eq!(used(h.mem, USED).len(), 1, "completed: {what}");
    let errs = h.log.errors();
    assert_eq!(errs.len(), 1, "one error record for {what}: {errs:?}");
    assert!(!errs[0].1);
    assert!(
        errs[0].0.contains(what),
        "{:?} should mention {what:?}",
        errs[0].0
    );
    assert!(!h.irq.needs_reset());
}

/// A byte pattern the device must leave alone.
const UNTOUCHED: u8 = 0x11;

/// A request the device must refuse through its status byte, without executing
/// it: the disk and every buffer but the status byte stay as they were.
#[rstest]
#[case::data_outside_guest_memory(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (MEM_SIZE - 256, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "outside guest memory")]
#[case::data_far_outside_guest_memory(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (0xdead_0000_0000, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "outside guest memory")]
#[case::address_plus_length_overflow(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "overflows")]
#[case::write_only_buffer_where_device_must_read(
    VIRTIO_BLK_T_OUT, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "device-writable data")]
#[case::write_only_header_is_header_too_short(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "header too short")]
#[case::read_only_buffer_where_device_must_write(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "device-readable data")]
#[case::readable_after_writable(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 512, W), (DATA + 0x1000, 512, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "after a device-writable")]
#[case::zero_length_buffer(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 512, W), (DATA + 0x1000, 0, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "zero-length")]
#[case::request_beyond_disk_end(
    VIRTIO_BLK_T_IN, (DISK_SIZE / 512 - 1) as u64, &[(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "beyond the disk's end")]
#[case::sector_overflow(
    VIRTIO_BLK_T_OUT, u64::MAX / 256, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "beyond the disk's end")]
#[case::unaligned_data_length(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 500, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "not a multiple of 512")]
#[case::header_too_short(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 8, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "header too short")]
#[case::flush_with_data(
    VIRTIO_BLK_T_FLUSH, 0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "FLUSH request carries data")]
#[case::get_id_without_buffer(
    VIRTIO_BLK_T_GET_ID, 0, &[(HDR, 16, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "no buffer for the id")]
#[case::get_id_with_readable_data(
    VIRTIO_BLK_T_GET_ID, 0, &[(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "GET_ID request has device-readable data")]
#[case::discard_without_segment(
    VIRTIO_BLK_T_DISCARD, 0, &[(HDR, 16, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "exactly one 16-byte segment")]
#[case::write_zeroes_with_writable_data(
    VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(HDR, 16, 0), (DATA, 16, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "device-writable data")]
#[case::more_segments_than_seg_max(
    VIRTIO_BLK_T_IN, 0, &[(HDR, 16, 0), (DATA, 512, W), (DATA + 0x1000, 512, W), (DATA + 0x2000, 512, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "more than seg_max 2")]
#[case::segment_over_size_max(
    VIRTIO_BLK_T_OUT, 0, &[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "more than size_max 512")]
#[case::get_id_in_more_segments_than_seg_max(
    VIRTIO_BLK_T_GET_ID, 0, &[(HDR, 16, 0), (DATA, 8, W), (DATA + 8, 8, W), (DATA + 16, 4, W), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "3 data segments, more than seg_max 2")]
#[case::discard_segment_in_more_segments_than_seg_max(
    VIRTIO_BLK_T_DISCARD, 0, &[(HDR, 16, 0), (DATA, 6, 0), (DATA + 6, 5, 0), (DATA + 11, 5, 0), (STATUS, 1, W)],
    VIRTIO_BLK_S_IOERR, "3 data segments, more than seg_max 2")]
fn bad_request_is_answered_and_not_executed(
    #[case] code: u32,
    #[case] sector: u64,
    #[case] chain: &[(u64, u32, u16)],
    #[case] status: u32,
    #[case] what: &str,
) {
    let mut h = H::new(BlockOptions {
        seg_max: 2,
        size_max: 512,
        ..BlockOptions::default()
    });
    h.activate(LIMIT_FEATURES);
    h.mem
        .write_slice(&[UNTOUCHED; 0x3000], GuestAddress(DATA))
        .unwrap();
    h.header(HDR, code, sector);
    let header = read(h.mem, HDR, 16);
    add_chain(&h.vq, 0, chain);
    h.process();
    assert_answered(&h, STATUS, status, what);
    assert_eq!(h.file_bytes(), disk_content(), "disk unchanged");
    assert_eq!(read(h.mem, HDR, 16), header, "header unchanged");
    assert!(
        read(h.mem, DATA, 0x3000).iter().all(|&b| b == UNTOUCHED),
        "data buffers unchanged"
    );
    assert_eq!(h.dev.stats().invalid_requests, 1);
}

/// Linux accepts SEG_MAX and SIZE_MAX; a driver that did not is not held to them.
#[test]
fn segment_limits_bind_only_a_driver_that_accepted_them() {
    let mut h = H::new(BlockOptions {
        seg_max: 1,
        size_max: 512,
        ..BlockOptions::default()
    });
    h.activate(BASE_FEATURES);
    h.request(
        0,
        0,
        VIRTIO_BLK_T_IN,
        0,
        &[(DATA, 1024, W), (DATA + 0x1000, 512, W)],
    );
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_OK);
    assert_eq!(read(h.mem, DATA, 1024), &disk_content()[..1024]);
}

/// Asserts the device went to NEEDS_RESET without completing anything and ignores
/// later notifications.
fn assert_needs_reset(h: &mut H, what: &str) {
    assert!(h.irq.needs_reset(), "needs reset for {what}");
    assert_eq!(h.line.config_count(), 1);
    assert_eq!(h.irq.status() & 2, 2);
    assert!(used(h.mem, USED).is_empty());
    let errs = h.log.errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].1);
    assert!(
        errs[0].0.contains(what),
        "{:?} should mention {what:?}",
        errs[0].0
    );
    // A well-formed request afterwards is not processed until reset.
    h.request(12, 8, VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    assert!(used(h.mem, USED).is_empty());
    assert_eq!(h.file_bytes(), disk_content(), "nothing executed");
    h.dev.reset();
}

/// All 16 entries chained, the last pointing back to the first.
fn chain_around_the_table() -> Vec<RawDescriptor> {
    (0..QSIZE)
        .map(|i| {
            let (addr, len, f) = if i == 0 {
                (HDR, 16, NEXT)
            } else {
                (DATA + 512 * u64::from(i), 512, NEXT | W)
            };
            raw(addr, len, f, (i + 1) % QSIZE)
        })
        .collect()
}

/// A chain the device cannot answer: `chain` published at index 0 (after
/// `indirect` is written at [`TABLE`]) must put it in NEEDS_RESET.
#[rstest]
#[case::loop_in_chain(BASE_FEATURES, &[],
    vec![raw(HDR, 16, NEXT, 1), raw(DATA, 512, W | NEXT, 2), raw(DATA, 512, W | NEXT, 1)],
    "loops")]
#[case::chain_longer_than_queue(BASE_FEATURES, &[], chain_around_the_table(),
    "longer than its queue's table (16 entries)")]
#[case::nested_indirect(BASE_FEATURES,
    &[raw(HDR, 16, NEXT, 1), raw(TABLE + 0x100, 32, IND, 0)],
    vec![raw(TABLE, 32, IND, 0)], "inside an indirect table")]
#[case::indirect_without_feature(VIRTIO_F_VERSION_1, &[],
    vec![raw(TABLE, 32, IND, 0)], "not negotiated")]
#[case::indirect_table_outside_memory(BASE_FEATURES, &[],
    vec![raw(u64::MAX - 15, 32, IND, 0)], "outside guest memory")]
#[case::missing_status_byte(BASE_FEATURES, &[],
    linked(0, &[(HDR, 16, 0), (DATA, 512, 0)]), "missing status byte")]
#[case::zero_length_status(BASE_FEATURES, &[],
    linked(0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 0, W)]), "missing status byte")]
#[case::status_outside_memory(BASE_FEATURES, &[],
    linked(0, &[(HDR, 16, 0), (DATA, 512, W), (MEM_SIZE, 1, W)]), "outside guest memory")]
fn unanswerable_chain_needs_reset(
    #[case] features: u64,
    #[case] indirect: &[RawDescriptor],
    #[case] chain: Vec<RawDescriptor>,
    #[case] what: &str,
) {
    let mut h = H::new(BlockOptions::default());
    h.activate(features);
    h.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
    h.header(HDR, VIRTIO_BLK_T_OUT, 0);
    write_table(h.mem, TABLE, indirect);
    h.vq.add_desc_chains(&chain, 0).unwrap();
    h.process();
    assert_needs_reset(&mut h, what);
}

#[test]
fn head_index_out_of_range_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    // Avail ring entry naming descriptor 200 in a 16-entry table.
    h.vq.avail().ring().ref_at(0).unwrap().store(200);
    h.vq.avail().idx().store(1);
    h.process();
    assert_needs_reset(&mut h, "outside the queue's table");
}

#[test]
fn avail_index_jump_needs_reset() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    h.vq.avail().idx().store(QSIZE + 5);
    h.process();
    assert!(h.irq.needs_reset());
    assert!(h.log.errors()[0].0.contains("available ring"));
}

#[test]
fn virtio_queue_iterator_silently_truncates_a_loop() {
    // Why the device walks chains itself: the library's iterator just stops.
    let h = H::new(BlockOptions::default());
    h.vq.add_desc_chains(&[raw(HDR, 16, NEXT, 1), raw(DATA, 512, W | NEXT, 0)], 0)
        .unwrap();
    let mut q: Queue = h.vq.create_queue().unwrap();
    let chain = q.iter(h.mem).unwrap().next().unwrap();
    let descs: Vec<_> = chain.collect();
    assert_eq!(descs.len(), usize::from(QSIZE));
    assert!(descs.last().unwrap().has_next(), "truncated, not ended");
}

#[test]
fn notify_before_activation_and_after_reset_is_ignored() {
    let mut h = H::new(BlockOptions::default());
    h.process();
    h.dev.process_queue(7);
    h.activate(BASE_FEATURES);
    h.dev.reset();
    h.request(0, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    h.process();
    assert!(used(h.mem, USED).is_empty());
}

#[test]
fn device_needs_reset_through_transport_status() {
    let (mut t, _line, h) = transport(VIRTIO_F_VERSION_1);
    h.vq.add_desc_chains(&[raw(HDR, 16, NEXT, 0)], 0).unwrap();
    write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
    assert_ne!(read_reg(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
    assert_eq!(read_reg(&mut t, reg::INTERRUPT_STATUS), 2);
    write_reg(&mut t, reg::STATUS, 0);
    assert_eq!(read_reg(&mut t, reg::STATUS), 0);
}

// ---------------------------------------------------------------- hostile ring layouts

/// The layout: the used ring's `flags` is the available ring's `idx` (desc
/// 0x1000, avail 0x2002, used 0x2004, 16 entries), EVENT_IDX off.
const OVERLAP: (u64, u64, u64) = (0x1000, 0x2002, 0x2004);

/// Writes one FLUSH chain (header, status) at descriptors 0 and 1 of the table at
/// `desc`, and publishes it as entry 0 of the available ring at `avail`.
fn publish_flush_by_hand(mem: &GuestMemoryMmap, desc: u64, avail: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    write_table(mem, desc, &linked(0, &[(HDR, 16, 0), (STATUS, 1, W)]));
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
}

/// Through the transport, as a driver would: refused at DRIVER_OK, so the notify
/// that used to spin forever in the drain loop (holding the transport's lock) finds
/// an inactive device.
#[test]
fn used_ring_on_avail_idx_is_refused_at_driver_ok_and_nothing_hangs() {
    let log = TestLog::new();
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(DISK_SIZE as u64).unwrap();
    let dev = Block::open(disk.path(), BlockOptions::default(), log.dma.clone()).unwrap();
    let mem = leaked_memory(MEM_SIZE);
    let line = Arc::new(CountingLine::default());
    let t = within(20, "a notify with overlapping rings", move || {
        let mut t = MmioTransport::new(dev, mem.clone(), line.clone());
        let (desc, avail, used) = OVERLAP;
        mmio_activate(&mut t, BASE_FEATURES, QSIZE, &[(desc, avail, used)]);
        publish_flush_by_hand(mem, desc, avail);
        write_reg(&mut t, reg::QUEUE_NOTIFY, 0);
        t
    });
    assert!(!t.is_active());
    assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.interrupt().status(), 2, "configuration interrupt");
    assert_eq!(t.device().stats().flush_requests, 0);
    assert_eq!(t.device().stats().chain_faults, 0);
    assert_eq!(
        log.errors(),
        vec![(
            "DRIVER_OK refused: queue 0: used ring 0x2004+0x86 overlaps the available ring at 0x2002 of queue 0"
                .to_string(),
            true
        )]
    );
}

/// The drain loop itself, given the same layout behind the transport's back: the
/// chain is served once, then the re-check that finds no new chain is a fault, not
/// a loop without end.
#[test]
fn drain_loop_stops_when_its_own_writes_move_avail_idx() {
    let mut h = H::new(BlockOptions::default());
    let (desc, avail, used) = OVERLAP;
    let mut q = Queue::new(QSIZE).unwrap();
    q.try_set_desc_table_address(GuestAddress(desc)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(avail)).unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q.set_ready(true);
    h.dev
        .activate(h.mem.clone(), vec![q], h.irq.clone(), BASE_FEATURES)
        .unwrap();
    publish_flush_by_hand(h.mem, desc, avail);
    let (mut dev, mem) = (h.dev, h.mem);
    let dev = within(20, "process_queue with overlapping rings", move || {
        dev.process_queue(0);
        dev
    });
    assert_eq!(dev.stats().flush_requests, 1, "the chain was served once");
    assert_eq!(read(mem, STATUS, 1), [0]);
    assert!(h.irq.needs_reset());
    let errors = h.log.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].1);
    assert!(
        errors[0]
            .0
            .contains("available ring index moved with no new chain"),
        "{}",
        errors[0].0
    );
}

/// An available ring at GPA 0 is legal: the device serves it (virtio-queue's own
/// iterator takes 0 for "not set up" and refused it at the first notify).
#[test]
fn avail_ring_at_gpa_0_is_served() {
    let log = TestLog::new();
    let mut disk = tempfile::NamedTempFile::new().unwrap();
    disk.write_all(&disk_content()).unwrap();
    let dev = Block::open(disk.path(), BlockOptions::default(), log.dma.clone()).unwrap();
    let mem = leaked_memory(MEM_SIZE);
    let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(CountingLine::default()));
    let (desc, avail, used_ring) = (0x1000, 0, 0x2000);
    mmio_activate(&mut t, BASE_FEATURES, QSIZE, &[(desc, avail, used_ring)]);
    assert!(t.is_active());
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..16].copy_from_slice(&3u64.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    write_table(
        mem,
        desc,
        &linked(0, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]),
    );
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    let rings = [QueueRings {
        size: QSIZE,
        desc,
        avail,
        used: used_ring,
    }];
    assert_writes_offered(mem, &rings, || write_reg(&mut t, reg::QUEUE_NOTIFY, 0));
    assert!(!t.interrupt().needs_reset(), "{:?}", log.errors());
    assert_eq!(read(mem, STATUS, 1), [0]);
    assert_eq!(read(mem, DATA, 512), &disk_content()[1536..2048]);
    assert_eq!(used(mem, used_ring), vec![(0, 513)]);
}

/// A chain longer than the queue (only an indirect table can make one) is refused
/// through its status byte, like any other bad request.
#[test]
fn chain_longer_than_the_queue_is_answered_ioerr() {
    let mut h = H::new(BlockOptions::default());
    h.activate(BASE_FEATURES);
    h.header(HDR, VIRTIO_BLK_T_IN, 0);
    h.mem
        .write_slice(&[UNTOUCHED; 0x3000], GuestAddress(DATA))
        .unwrap();
    // Header, 15 data segments, status: 17 descriptors in a 16-entry queue.
    let mut table = vec![(HDR, 16, 0)];
    table.extend((0..15u64).map(|i| (DATA + 512 * i, 512, W)));
    table.push((STATUS, 1, W));
    write_table(h.mem, TABLE, &linked(0, &table));
    h.vq.add_desc_chains(&[raw(TABLE, 17 * 16, IND, 0)], 0)
        .unwrap();
    h.process();
    assert_answered(
        &h,
        STATUS,
        VIRTIO_BLK_S_IOERR,
        "descriptor chain of 17 descriptors is longer than the queue size 16",
    );
    assert!(read(h.mem, DATA, 0x3000).iter().all(|&b| b == UNTOUCHED));
    // 16 is the limit, not refused.
    table.remove(1);
    write_table(h.mem, TABLE, &linked(0, &table));
    h.vq.add_desc_chains(&[raw(TABLE, 16 * 16, IND, 0)], 1)
        .unwrap();
    h.process();
    assert_eq!(u32::from(h.status(STATUS)), VIRTIO_BLK_S_OK);
}
