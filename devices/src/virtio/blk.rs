//! virtio-blk backed by a host file (virtio 1.2, section 5.2).
//!
//! Requests: IN, OUT, FLUSH (`fdatasync` of the file: everything acknowledged before
//! the flush's completion is on stable storage), GET_ID, DISCARD (punches a hole) and
//! WRITE_ZEROES (zero-range or hole). Data moves straight between the file and guest
//! memory (`read_exact_volatile_from` / `write_all_volatile_to`): no bounce buffer.
//!
//! A chain is walked into a [`GuestChain`], parsed into a typed request
//! (`request::parse`: status byte, header, buffers validated against the disk),
//! then executed. Guest buffers are reached only through the chain's
//! [`GuestBuffers`](super::chain::GuestBuffers), which logs every header, data and
//! status range to the [`DmaLog`] with per-page fingerprints; the device adds one
//! request record per chain. A malformed request that still has a writable status
//! byte is answered with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for an unknown type) and a
//! device-error record; a chain that cannot be followed or has no status byte puts
//! the device in DEVICE_NEEDS_RESET (config interrupt) and it stops processing until
//! reset. [`Block::stats`] counts what the device did.

use std::fs::{File, OpenOptions};
use std::mem::offset_of;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::FallocateFlags;
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::ByteValued;

use super::chain::{GuestChain, Roles};
use super::{ActivateError, GuestMem, VirtioDevice, VirtioInterrupt, VIRTIO_RING_F_INDIRECT_DESC};
use crate::dma_log::{
    BlkRequest, BlkStatus, DescRole, DeviceKind, DmaLog, RequestDetail, StableFile,
};

mod request;
mod stats;

use request::{Limits, Request, RequestError};
pub use stats::BlkStats;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// `VIRTIO_ID_BLOCK`.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the configuration space we expose: up to `unused1`, the secure-erase and
/// zoned fields are for features not offered.
const CONFIG_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

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

/// `virtio_blk_config` as vm-memory's [`ByteValued`] (the bindings' struct cannot
/// implement vm-memory's trait in this crate, hence the wrapper).
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BlkConfig(virtio_blk_config);

// SAFETY: `virtio_blk_config` is `repr(C, packed)` and made only of integers,
// integer arrays and `repr(C)` structs of integers without padding: no pointers,
// and every bit pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

impl BlkConfig {
    fn new(capacity_bytes: u64, opts: &BlockOptions) -> Self {
        // The spec's fields are little-endian.
        let sector = u32::try_from(SECTOR_SIZE).expect("512 bytes");
        let max_sectors = (u32::MAX / sector).to_le();
        BlkConfig(virtio_blk_config {
            capacity: (capacity_bytes / SECTOR_SIZE).to_le(),
            size_max: opts.size_max.to_le(),
            seg_max: opts.seg_max.to_le(),
            // Informational.
            blk_size: sector.to_le(),
            num_queues: 1u16.to_le(),
            max_discard_sectors: max_sectors,
            max_discard_seg: 1u32.to_le(),
            // 4 KiB.
            discard_sector_alignment: 8u32.to_le(),
            max_write_zeroes_sectors: max_sectors,
            max_write_zeroes_seg: 1u32.to_le(),
            write_zeroes_may_unmap: 1,
            ..virtio_blk_config::default()
        })
    }
}

/// The result of a request whose status byte is usable.
struct Outcome {
    status: BlkStatus,
    /// Bytes written to device-writable data buffers (excluding the status byte).
    written: u64,
    /// Payload bytes of the request.
    bytes: u64,
    /// Protocol or I/O error, if any (logged as a device-error record).
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

    fn failed(status: BlkStatus, error: Option<String>) -> Self {
        Outcome {
            status,
            written: 0,
            bytes: 0,
            error,
        }
    }

    fn status_byte(&self) -> u8 {
        let code = match self.status {
            BlkStatus::Ok => VIRTIO_BLK_S_OK,
            BlkStatus::Ioerr => VIRTIO_BLK_S_IOERR,
            BlkStatus::Unsupp => VIRTIO_BLK_S_UNSUPP,
        };
        u8::try_from(code).expect("virtio-blk status codes are 0 to 2")
    }
}

/// The host side of the disk.
struct Disk {
    file: File,
    limits: Limits,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    /// The image registered with the log when the disk is read-only: nothing changes
    /// it, so what IN requests put in guest memory is fingerprinted from the file on
    /// the log's writer thread rather than copied out of guest memory here.
    stable: Option<StableFile>,
    stats: BlkStats,
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
    log: DmaLog,
    features: u64,
    config: BlkConfig,
    queue_sizes: [u16; 1],
    active: Option<Active>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("capacity_bytes", &self.disk.limits.capacity_bytes)
            .field("read_only", &self.disk.limits.read_only)
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
        let stable = if opts.read_only {
            log.stable_file(&file)
        } else {
            None
        };
        Ok(Block {
            config: BlkConfig::new(capacity_bytes, &opts),
            disk: Disk {
                file,
                limits: Limits {
                    capacity_bytes,
                    read_only: opts.read_only,
                    acked_features: 0,
                    seg_max: opts.seg_max,
                    size_max: opts.size_max,
                },
                id,
                stable,
                stats: BlkStats::default(),
            },
            log,
            features,
            queue_sizes: [opts.queue_size],
            active: None,
        })
    }

    /// Disk capacity in bytes (whole sectors).
    pub fn capacity_bytes(&self) -> u64 {
        self.disk.limits.capacity_bytes
    }

    /// Number of FLUSH requests completed with a successful `fdatasync`.
    pub fn flush_count(&self) -> u64 {
        self.disk.stats.flushes
    }

    /// What the device has done so far (a snapshot).
    pub fn stats(&self) -> BlkStats {
        self.disk.stats
    }

    fn fatal(active: &mut Active, disk: &mut Disk, log: &DmaLog, head: Option<u16>, what: &str) {
        disk.stats.chain_faults += 1;
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
        super::read_config_bytes(&self.config.as_slice()[..CONFIG_LEN], offset, data);
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
        self.disk.limits.acked_features = acked_features;
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
        let (disk, log) = (&mut self.disk, &self.log);
        let indirect = active.indirect;
        let served = super::drain_queue(&mut active.queue, &active.mem, |queue, head| {
            let chain =
                GuestChain::walk(&active.mem, log, DeviceKind::Blk, 0, queue, head, indirect)
                    .map_err(|e| e.to_string())?;
            disk.handle_chain(&chain)
        })
        .and_then(|()| super::signal_used(0, &mut active.queue, &active.mem, &active.interrupt));
        if let Err(fault) = served {
            Self::fatal(active, disk, log, fault.head, &fault.what);
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.disk.limits.acked_features = 0;
    }

    fn log_error(&self, queue: u16, error: &str, needs_reset: bool) {
        self.log
            .device_error(DeviceKind::Blk, queue, None, error, needs_reset);
    }
}

impl Disk {
    /// Handles one walked chain. `Ok(used_len)` when the request was answered through its
    /// status byte; `Err(what)` when the device must go to NEEDS_RESET.
    fn handle_chain(&mut self, chain: &GuestChain) -> Result<u32, String> {
        let parsed = request::parse(chain, &self.limits).map_err(|e| e.to_string())?;
        self.stats
            .count_type(parsed.header.map(|h| h.request_type()));
        let outcome = match parsed.request {
            Ok(request) => self.execute(request),
            Err(e) => self.refuse(&e),
        };
        parsed
            .status
            .write(&[outcome.status_byte()], Roles::all(DescRole::Status))
            .map_err(|e| format!("cannot write status byte: {}", e.source))?;
        self.stats.count_status(outcome.status);
        if let Some(err) = &outcome.error {
            chain.log_error(err, false);
        }
        let (code, sector) = parsed
            .header
            .map_or((u32::MAX, 0), |h| (h.code(), h.sector()));
        chain.log_request_with(|| {
            RequestDetail::Blk(BlkRequest {
                op: op_name(code).to_string(),
                code,
                sector,
                bytes: outcome.bytes,
                status: outcome.status,
            })
        });
        // `written` is bounded by the chain's total length, which walk_chain keeps
        // under 4 GiB.
        Ok(u32::try_from(outcome.written + 1).unwrap_or(u32::MAX))
    }

    fn refuse(&mut self, e: &RequestError) -> Outcome {
        self.stats.invalid_requests += 1;
        Outcome::failed(e.status(), Some(e.to_string()))
    }

    fn io_error(&mut self, what: String) -> Outcome {
        self.stats.io_errors += 1;
        Outcome::failed(BlkStatus::Ioerr, Some(what))
    }

    /// Executes a validated request.
    fn execute(&mut self, request: Request) -> Outcome {
        match request {
            Request::In { offset, data } => {
                let len = data.len();
                match data.fill_from_file(&mut self.file, offset, self.stable) {
                    Ok(()) => {
                        self.stats.bytes_read += len;
                        Outcome::ok(len, len)
                    }
                    Err((at, e)) => self.io_error(format!("reading disk at {at}: {e}")),
                }
            }
            Request::Out { offset, data } => {
                let len = data.len();
                match data.write_to_file(&mut self.file, offset) {
                    Ok(()) => {
                        self.stats.bytes_written += len;
                        Outcome::ok(len, 0)
                    }
                    Err((at, e)) => self.io_error(format!("writing disk at {at}: {e}")),
                }
            }
            Request::Flush => self.flush(),
            Request::GetId { buf } => match buf.write(&self.id, Roles::all(DescRole::Data)) {
                Ok(n) => Outcome::ok(n as u64, n as u64),
                Err(e) => self.io_error(format!("writing id: {}", e.source)),
            },
            Request::Discard { offset, len } => {
                self.deallocate(VIRTIO_BLK_T_DISCARD, offset, len, true)
            }
            Request::WriteZeroes { offset, len, unmap } => {
                self.deallocate(VIRTIO_BLK_T_WRITE_ZEROES, offset, len, unmap)
            }
            Request::Unsupported => Outcome::failed(BlkStatus::Unsupp, None),
        }
    }

    /// FLUSH: returns only after `fdatasync` did, and the caller writes the status
    /// byte and the used element only after this returns, so the guest sees the
    /// flush complete only once the data is on stable storage.
    ///
    /// `fdatasync`, not `fsync`: a virtio FLUSH promises that the data of every write
    /// completed before it is durable; the file's timestamps are not part of the
    /// disk, so their journal commit is not needed. `fdatasync` still writes back the
    /// metadata needed to read the data again (a size change, newly allocated blocks
    /// of a sparse image); the size cannot change here anyway (the capacity is
    /// fixed at open and every request is checked against it).
    ///
    /// There is nothing to flush in user space first: OUT writes go from guest
    /// memory to the file with `write(2)` on the raw descriptor (`std::fs::File` has
    /// no buffer), so every OUT already acknowledged is in the page cache.
    fn flush(&mut self) -> Outcome {
        if self.limits.read_only {
            return Outcome::ok(0, 0);
        }
        match self.file.sync_data() {
            Ok(()) => {
                self.stats.flushes += 1;
                Outcome::ok(0, 0)
            }
            Err(e) => self.io_error(format!("fdatasync failed: {e}")),
        }
    }

    /// DISCARD (`code`, always `unmap`) or WRITE_ZEROES of `len` bytes at `offset`.
    fn deallocate(&mut self, code: u32, offset: u64, len: u64, unmap: bool) -> Outcome {
        if len == 0 {
            return Outcome::ok(0, 0);
        }
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        let res = if code == VIRTIO_BLK_T_DISCARD {
            // Discard is a hint: a file system without hole punching keeps the data.
            match rustix::fs::fallocate(&self.file, punch, offset, len) {
                Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
                other => other.map_err(std::io::Error::from),
            }
        } else {
            let mode = if unmap {
                punch
            } else {
                FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
            };
            match rustix::fs::fallocate(&self.file, mode, offset, len) {
                Err(rustix::io::Errno::OPNOTSUPP) => self.write_zeroes_slow(offset, len),
                other => other.map_err(std::io::Error::from),
            }
        };
        match res {
            Ok(()) => {
                self.stats.bytes_deallocated += len;
                Outcome::ok(len, 0)
            }
            Err(e) => self.io_error(format!("{} failed: {e}", op_name(code))),
        }
    }

    fn write_zeroes_slow(&self, mut off: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; 64 * 1024];
        let end = off + len;
        while off < end {
            let n = usize::try_from(end - off).map_or(zeros.len(), |left| left.min(zeros.len()));
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
