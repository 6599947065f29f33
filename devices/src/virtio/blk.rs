//! virtio-blk backed by a host file (virtio 1.2, section 5.2).
//!
//! Requests: IN, OUT, FLUSH (`fsync` of the file: everything acknowledged before the
//! flush's completion is on stable storage), GET_ID, DISCARD (punches a hole) and
//! WRITE_ZEROES (zero-range or hole). Data moves straight between the file and guest
//! memory (`read_exact_volatile_from` / `write_all_volatile_to`): no bounce buffer.
//! Any descriptor layout is accepted (VERSION_1 implies ANY_LAYOUT): the header is the
//! first 16 device-readable bytes, the status the last device-writable byte.
//!
//! Every header, data and status range the device touches is logged to the
//! [`DmaLog`] with per-page fingerprints, plus one request record per chain. A
//! malformed request that still has a writable status byte is answered with
//! `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type) and a device-error record;
//! a chain that cannot be followed or has no status byte puts the device in
//! DEVICE_NEEDS_RESET (config interrupt) and it stops processing until reset.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FallocateFlags;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{walk_chain, ChainDesc};
use super::{ActivateError, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_INDIRECT_DESC};
use crate::dma_log::{
    BlkRequest, BlkStatus, DescInfo, DescRole, DeviceKind, Direction, DmaLog, RequestDetail,
    StableFile,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_ID_BLOCK`.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the request header (`type`, `reserved`, `sector`).
const HEADER_LEN: u64 = 16;
/// Size of one discard / write-zeroes segment.
const DWZ_SEG_LEN: u64 = 16;
/// Size of the configuration space we expose (up to `unused1`).
const CONFIG_LEN: usize = 60;

/// Options of a [`Block`] device.
#[derive(Debug, Clone)]
pub struct BlockOptions {
    /// Refuse writes (OUT, DISCARD, WRITE_ZEROES answer IOERR; VIRTIO_BLK_F_RO offered).
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes).
    pub id: String,
    /// Maximum queue size (power of two, at most 32768).
    pub queue_size: u16,
    /// Advertised maximum number of data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Advertised maximum size of one segment (`size_max`).
    pub size_max: u32,
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions {
            read_only: false,
            id: "zc-disk".to_string(),
            queue_size: 256,
            seg_max: 254,
            size_max: 1 << 20,
        }
    }
}

/// Errors creating a [`Block`] device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("cannot open disk image {path}: {source} (check the path and permissions, or use read-only)")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's size could not be read.
    #[error("cannot stat disk image: {0}")]
    Metadata(std::io::Error),
    /// The GET_ID serial is longer than 20 bytes.
    #[error("disk id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two between 1 and 32768")]
    QueueSize(u16),
}

/// A contiguous guest range that is part of one descriptor.
#[derive(Debug, Clone, Copy)]
struct Seg {
    index: u16,
    indirect: bool,
    addr: u64,
    len: u64,
}

impl From<&ChainDesc> for Seg {
    fn from(d: &ChainDesc) -> Self {
        Seg {
            index: d.index,
            indirect: d.indirect,
            addr: d.addr,
            len: u64::from(d.len),
        }
    }
}

/// Splits `segs` after the first `n` bytes.
fn split_at(segs: &[Seg], mut n: u64) -> (Vec<Seg>, Vec<Seg>) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    for s in segs {
        if n == 0 {
            back.push(*s);
        } else if s.len <= n {
            front.push(*s);
            n -= s.len;
        } else {
            front.push(Seg { len: n, ..*s });
            back.push(Seg {
                addr: s.addr + n,
                len: s.len - n,
                ..*s
            });
            n = 0;
        }
    }
    (front, back)
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// The result of executing a request whose status byte is usable.
struct Outcome {
    status: BlkStatus,
    /// Bytes written to device-writable data buffers (excluding the status byte).
    written: u64,
    /// Payload bytes of the request.
    bytes: u64,
    /// Protocol error, if any (logged as a device-error record).
    error: Option<String>,
}

impl Outcome {
    fn ok(bytes: u64, written: u64) -> Self {
        Outcome {
            status: BlkStatus::Ok,
            written,
            bytes,
            error: None,
        }
    }
    fn ioerr(msg: impl Into<String>) -> Self {
        Outcome {
            status: BlkStatus::Ioerr,
            written: 0,
            bytes: 0,
            error: Some(msg.into()),
        }
    }
}

/// The host side of the disk.
struct Disk {
    file: File,
    capacity_bytes: u64,
    read_only: bool,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    log: DmaLog,
    /// The image registered with the log when the disk is read-only: nothing changes
    /// it, so what IN requests put in guest memory is fingerprinted from the file on
    /// the log's writer thread rather than copied out of guest memory here.
    stable: Option<StableFile>,
    flushes: u64,
    acked_features: u64,
}

struct Active {
    mem: GuestMem,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    indirect: bool,
    broken: bool,
}

/// A virtio-blk device model (one request queue).
pub struct Block {
    disk: Disk,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 1],
    active: Option<Active>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity_bytes", &self.disk.capacity_bytes)
            .field("read_only", &self.disk.read_only)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl Block {
    /// Opens the disk image at `path` (read-write unless `opts.read_only`).
    pub fn open(path: &Path, opts: BlockOptions, log: DmaLog) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::new(file, opts, log)
    }

    /// Uses an already open file. Its size, rounded down to whole sectors, is the
    /// disk's capacity.
    pub fn new(file: File, opts: BlockOptions, log: DmaLog) -> Result<Self, BlockError> {
        if opts.id.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlockError::IdTooLong(opts.id));
        }
        if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
            return Err(BlockError::QueueSize(opts.queue_size));
        }
        let len = file.metadata().map_err(BlockError::Metadata)?.len();
        let capacity_bytes = len / SECTOR_SIZE * SECTOR_SIZE;
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..opts.id.len()].copy_from_slice(opts.id.as_bytes());

        let mut features = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        if opts.read_only {
            features |= 1u64 << VIRTIO_BLK_F_RO;
        } else {
            features |= (1u64 << VIRTIO_BLK_F_DISCARD) | (1u64 << VIRTIO_BLK_F_WRITE_ZEROES);
        }

        let mut config = [0u8; CONFIG_LEN];
        let put32 = |c: &mut [u8; CONFIG_LEN], off: usize, v: u32| {
            c[off..off + 4].copy_from_slice(&v.to_le_bytes())
        };
        config[0..8].copy_from_slice(&(capacity_bytes / SECTOR_SIZE).to_le_bytes());
        put32(&mut config, 8, opts.size_max);
        put32(&mut config, 12, opts.seg_max);
        put32(&mut config, 20, SECTOR_SIZE as u32); // blk_size (informational)
        config[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        let max_sectors = u32::MAX / SECTOR_SIZE as u32;
        put32(&mut config, 36, max_sectors); // max_discard_sectors
        put32(&mut config, 40, 1); // max_discard_seg
        put32(&mut config, 44, 8); // discard_sector_alignment: 4 KiB
        put32(&mut config, 48, max_sectors); // max_write_zeroes_sectors
        put32(&mut config, 52, 1); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap

        let stable = if opts.read_only {
            log.stable_file(&file)
        } else {
            None
        };
        Ok(Block {
            disk: Disk {
                file,
                capacity_bytes,
                read_only: opts.read_only,
                id,
                log,
                stable,
                flushes: 0,
                acked_features: 0,
            },
            features,
            config,
            queue_sizes: [opts.queue_size],
            active: None,
        })
    }

    /// Disk capacity in bytes (whole sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.disk.capacity_bytes
    }

    /// Number of FLUSH requests completed with a successful `fsync`.
    pub fn flush_count(&self) -> u64 {
        self.disk.flushes
    }

    fn fatal(active: &mut Active, log: &DmaLog, head: Option<u16>, what: &str) {
        log.device_error(DeviceKind::Blk, 0, head, what, true);
        active.broken = true;
        active.interrupt.set_needs_reset();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field we expose is read-only (no CONFIG_WCE).
    }

    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 1 {
            return Err(ActivateError::Other(format!(
                "virtio-blk has 1 queue, got {}",
                queues.len()
            )));
        }
        let queue = queues.remove(0);
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady { index: 0 });
        }
        self.disk.acked_features = acked_features;
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            indirect: acked_features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            broken: false,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if index != 0 || active.broken {
            return;
        }
        let log = self.disk.log.clone();
        let disk = &mut self.disk;
        let indirect = active.indirect;
        let served = super::drain_queue(&mut active.queue, &active.mem, |queue, head| {
            disk.handle_chain(&active.mem, queue, indirect, head)
        })
        .and_then(|()| super::signal_used(&mut active.queue, &active.mem, &active.interrupt));
        if let Err(fault) = served {
            Self::fatal(active, &log, fault.head, &fault.what);
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.disk.acked_features = 0;
    }
}

impl Disk {
    /// Handles one chain. `Ok(used_len)` when the request was answered through its
    /// status byte; `Err(what)` when the device must go to NEEDS_RESET.
    fn handle_chain(
        &mut self,
        mem: &GuestMem,
        queue: &Queue,
        indirect: bool,
        head: u16,
    ) -> Result<u32, String> {
        let descs = walk_chain(
            mem,
            GuestAddress(queue.desc_table()),
            queue.size(),
            head,
            indirect,
        )
        .map_err(|e| e.to_string())?;
        let last = descs
            .last()
            .ok_or_else(|| "empty descriptor chain".to_string())?;
        if !last.writable {
            return Err(format!(
                "missing status byte: last descriptor {} is device-readable",
                last.index
            ));
        }
        last.check(mem)
            .map_err(|e| format!("missing status byte: {e}"))?;
        let status_addr = last.addr + u64::from(last.len) - 1;

        let (code, sector, outcome) = self.execute(mem, head, &descs);
        let status = match outcome.status {
            BlkStatus::Ok => VIRTIO_BLK_S_OK,
            BlkStatus::Ioerr => VIRTIO_BLK_S_IOERR,
            BlkStatus::Unsupp => VIRTIO_BLK_S_UNSUPP,
        } as u8;
        mem.write_obj(status, GuestAddress(status_addr))
            .map_err(|e| format!("cannot write status byte: {e}"))?;
        if self.log.is_enabled() {
            self.log_range(
                mem,
                head,
                Seg {
                    addr: status_addr,
                    len: 1,
                    ..Seg::from(last)
                },
                Direction::DeviceWrites,
                DescRole::Status,
            );
            if let Some(err) = &outcome.error {
                self.log
                    .device_error(DeviceKind::Blk, 0, Some(head), err, false);
            }
            self.log.request(
                DeviceKind::Blk,
                0,
                head,
                RequestDetail::Blk(BlkRequest {
                    op: op_name(code).to_string(),
                    code,
                    sector,
                    bytes: outcome.bytes,
                    status: outcome.status,
                }),
            );
        }
        // `written` is bounded by the chain's total length, which walk_chain keeps
        // under 4 GiB.
        Ok(u32::try_from(outcome.written + 1).unwrap_or(u32::MAX))
    }

    fn desc_info(head: u16, s: Seg, dir: Direction, role: DescRole) -> DescInfo {
        DescInfo {
            device: DeviceKind::Blk,
            queue: 0,
            head,
            desc: s.index,
            indirect: s.indirect,
            gpa: s.addr,
            // A data range is at most one descriptor long, so it fits a u32.
            len: s.len as u32,
            dir,
            role,
        }
    }

    fn log_range(&self, mem: &GuestMem, head: u16, s: Seg, dir: Direction, role: DescRole) {
        self.log
            .descriptor_from_guest(mem, Self::desc_info(head, s, dir, role));
    }

    /// Validates and executes a request whose status byte is known to be writable.
    /// Returns (type code, sector, outcome).
    fn execute(&mut self, mem: &GuestMem, head: u16, descs: &[ChainDesc]) -> (u32, u64, Outcome) {
        for d in descs {
            if let Err(e) = d.check(mem) {
                return (u32::MAX, 0, Outcome::ioerr(e.to_string()));
            }
        }
        if let Some(pos) = descs.iter().position(|d| d.writable) {
            if let Some(bad) = descs[pos..].iter().find(|d| !d.writable) {
                return (
                    u32::MAX,
                    0,
                    Outcome::ioerr(format!(
                        "device-readable descriptor {} after a device-writable one",
                        bad.index
                    )),
                );
            }
        }
        let readable: Vec<Seg> = descs
            .iter()
            .filter(|d| !d.writable)
            .map(Seg::from)
            .collect();
        let writable: Vec<Seg> = descs.iter().filter(|d| d.writable).map(Seg::from).collect();
        let (data_in, _status) = split_at(&writable, total(&writable) - 1);
        let readable_len = total(&readable);
        if readable_len < HEADER_LEN {
            return (
                u32::MAX,
                0,
                Outcome::ioerr(format!(
                    "request header too short: {readable_len} device-readable bytes, need {HEADER_LEN}"
                )),
            );
        }
        let (hdr_segs, data_out) = split_at(&readable, HEADER_LEN);
        let mut hdr = [0u8; HEADER_LEN as usize];
        let mut at = 0usize;
        for s in &hdr_segs {
            let n = s.len as usize;
            if let Err(e) = mem.read_slice(&mut hdr[at..at + n], GuestAddress(s.addr)) {
                return (u32::MAX, 0, Outcome::ioerr(format!("reading header: {e}")));
            }
            at += n;
        }
        if self.log.is_enabled() {
            for s in &hdr_segs {
                self.log_range(mem, head, *s, Direction::DeviceReads, DescRole::Header);
            }
        }
        let code = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let outcome = match code {
            VIRTIO_BLK_T_IN => self.read_request(mem, head, sector, &data_out, &data_in),
            VIRTIO_BLK_T_OUT => self.write_request(mem, head, sector, &data_out, &data_in),
            VIRTIO_BLK_T_FLUSH => self.flush_request(&data_out, &data_in),
            VIRTIO_BLK_T_GET_ID => self.get_id_request(mem, head, &data_out, &data_in),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                self.dwz_request(mem, code, &data_out, &data_in)
            }
            _ => Outcome {
                status: BlkStatus::Unsupp,
                written: 0,
                bytes: 0,
                error: None,
            },
        };
        (code, sector, outcome)
    }

    /// Checks `[sector * 512, + len)` is inside the disk; returns the byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, String> {
        let off = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| {
                off.checked_add(len)
                    .is_some_and(|end| end <= self.capacity_bytes)
            })
            .ok_or_else(|| {
                format!(
                    "request for sector {sector} + {len} bytes is beyond the disk's end ({} bytes)",
                    self.capacity_bytes
                )
            })?;
        Ok(off)
    }

    fn data_len(segs: &[Seg], what: &str) -> Result<u64, String> {
        let len = total(segs);
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(format!("{what} data length {len} is not a multiple of 512"));
        }
        Ok(len)
    }

    fn read_request(
        &mut self,
        mem: &GuestMem,
        head: u16,
        sector: u64,
        data_out: &[Seg],
        data_in: &[Seg],
    ) -> Outcome {
        if let Some(s) = data_out.first() {
            return Outcome::ioerr(format!(
                "IN request has device-readable data in descriptor {}",
                s.index
            ));
        }
        let len = match Self::data_len(data_in, "IN") {
            Ok(l) => l,
            Err(e) => return Outcome::ioerr(e),
        };
        let mut off = match self.check_range(sector, len) {
            Ok(o) => o,
            Err(e) => return Outcome::ioerr(e),
        };
        for s in data_in {
            let res = self
                .file
                .seek(SeekFrom::Start(off))
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    mem.read_exact_volatile_from(
                        GuestAddress(s.addr),
                        &mut self.file,
                        s.len as usize,
                    )
                    .map_err(|e| e.to_string())
                });
            if let Err(e) = res {
                return Outcome::ioerr(format!("reading disk at {off}: {e}"));
            }
            if let Some(file) = self.stable {
                self.log.descriptor_from_file(
                    Self::desc_info(head, *s, Direction::DeviceWrites, DescRole::Data),
                    file,
                    off,
                );
            } else if self.log.is_enabled() {
                self.log_range(mem, head, *s, Direction::DeviceWrites, DescRole::Data);
            }
            off += s.len;
        }
        Outcome::ok(len, len)
    }

    fn write_request(
        &mut self,
        mem: &GuestMem,
        head: u16,
        sector: u64,
        data_out: &[Seg],
        data_in: &[Seg],
    ) -> Outcome {
        if self.read_only {
            return Outcome::ioerr("OUT request on a read-only disk");
        }
        if let Some(s) = data_in.first() {
            return Outcome::ioerr(format!(
                "OUT request has device-writable data in descriptor {}",
                s.index
            ));
        }
        let len = match Self::data_len(data_out, "OUT") {
            Ok(l) => l,
            Err(e) => return Outcome::ioerr(e),
        };
        let mut off = match self.check_range(sector, len) {
            Ok(o) => o,
            Err(e) => return Outcome::ioerr(e),
        };
        for s in data_out {
            if self.log.is_enabled() {
                self.log_range(mem, head, *s, Direction::DeviceReads, DescRole::Data);
            }
            let res = self
                .file
                .seek(SeekFrom::Start(off))
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    mem.write_all_volatile_to(GuestAddress(s.addr), &mut self.file, s.len as usize)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = res {
                return Outcome::ioerr(format!("writing disk at {off}: {e}"));
            }
            off += s.len;
        }
        Outcome::ok(len, 0)
    }

    fn flush_request(&mut self, data_out: &[Seg], data_in: &[Seg]) -> Outcome {
        if !data_out.is_empty() || !data_in.is_empty() {
            return Outcome::ioerr("FLUSH request carries data buffers");
        }
        if self.read_only {
            return Outcome::ok(0, 0);
        }
        match self.file.flush().and_then(|()| self.file.sync_all()) {
            Ok(()) => {
                self.flushes += 1;
                Outcome::ok(0, 0)
            }
            Err(e) => Outcome::ioerr(format!("fsync failed: {e}")),
        }
    }

    fn get_id_request(
        &mut self,
        mem: &GuestMem,
        head: u16,
        data_out: &[Seg],
        data_in: &[Seg],
    ) -> Outcome {
        if let Some(s) = data_out.first() {
            return Outcome::ioerr(format!(
                "GET_ID request has device-readable data in descriptor {}",
                s.index
            ));
        }
        if data_in.is_empty() {
            return Outcome::ioerr("GET_ID request has no buffer for the id");
        }
        let (used, _) = split_at(data_in, self.id.len() as u64);
        let mut at = 0usize;
        for s in &used {
            let n = s.len as usize;
            if let Err(e) = mem.write_slice(&self.id[at..at + n], GuestAddress(s.addr)) {
                return Outcome::ioerr(format!("writing id: {e}"));
            }
            if self.log.is_enabled() {
                self.log_range(mem, head, *s, Direction::DeviceWrites, DescRole::Data);
            }
            at += n;
        }
        Outcome::ok(at as u64, at as u64)
    }

    fn dwz_request(
        &mut self,
        mem: &GuestMem,
        code: u32,
        data_out: &[Seg],
        data_in: &[Seg],
    ) -> Outcome {
        let discard = code == VIRTIO_BLK_T_DISCARD;
        let feature = if discard {
            VIRTIO_BLK_F_DISCARD
        } else {
            VIRTIO_BLK_F_WRITE_ZEROES
        };
        if self.acked_features & (1u64 << feature) == 0 {
            return Outcome {
                status: BlkStatus::Unsupp,
                written: 0,
                bytes: 0,
                error: Some(format!("{} without its feature", op_name(code))),
            };
        }
        if self.read_only {
            return Outcome::ioerr("DISCARD/WRITE_ZEROES on a read-only disk");
        }
        if !data_in.is_empty() {
            return Outcome::ioerr("DISCARD/WRITE_ZEROES request has device-writable data");
        }
        if total(data_out) != DWZ_SEG_LEN {
            return Outcome::ioerr(format!(
                "DISCARD/WRITE_ZEROES needs exactly one 16-byte segment, got {} bytes",
                total(data_out)
            ));
        }
        let mut seg = [0u8; DWZ_SEG_LEN as usize];
        let mut at = 0usize;
        for s in data_out {
            let n = s.len as usize;
            if let Err(e) = mem.read_slice(&mut seg[at..at + n], GuestAddress(s.addr)) {
                return Outcome::ioerr(format!("reading segment: {e}"));
            }
            at += n;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let num = u64::from(u32::from_le_bytes(
            seg[8..12].try_into().unwrap_or_default(),
        ));
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Outcome {
                status: BlkStatus::Unsupp,
                written: 0,
                bytes: 0,
                error: Some(format!(
                    "{} with unsupported flags {flags:#x}",
                    op_name(code)
                )),
            };
        }
        let len = num * SECTOR_SIZE;
        let off = match self.check_range(sector, len) {
            Ok(o) => o,
            Err(e) => return Outcome::ioerr(e),
        };
        if len == 0 {
            return Outcome::ok(0, 0);
        }
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let res = if discard {
            // Discard is a hint: a file system without hole punching keeps the data.
            match rustix::fs::fallocate(&self.file, punch, off, len) {
                Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
                other => other.map_err(std::io::Error::from),
            }
        } else {
            let mode = if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                punch
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            match rustix::fs::fallocate(&self.file, mode, off, len) {
                Err(rustix::io::Errno::OPNOTSUPP) => self.write_zeroes_slow(off, len),
                other => other.map_err(std::io::Error::from),
            }
        };
        match res {
            Ok(()) => Outcome::ok(len, 0),
            Err(e) => Outcome::ioerr(format!("{} failed: {e}", op_name(code))),
        }
    }

    fn write_zeroes_slow(&self, mut off: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; 64 * 1024];
        let end = off + len;
        while off < end {
            let n = (end - off).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

/// Name of a request type code as the log writes it.
pub fn op_name(code: u32) -> &'static str {
    match code {
        VIRTIO_BLK_T_IN => "in",
        VIRTIO_BLK_T_OUT => "out",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_GET_ID => "get_id",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write_zeroes",
        u32::MAX => "malformed",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests;
