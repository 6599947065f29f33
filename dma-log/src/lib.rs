//! The DMA descriptor log: one JSON Lines record per descriptor a device model reads
//! or writes, one per request (descriptor chain), plus guest markers and device
//! errors. The schema (`zc-dma-log/1`) is documented in `docs/dma-log.md`.
//!
//! A [`DmaLog`] is a cheap handle (clone it into every device); it can be
//! [disabled](DmaLog::disabled), in which case every call is a single branch and the
//! devices skip computing fingerprints (see [`DmaLog::is_enabled`]).
//!
//! Calls only number, time-stamp and queue a record, with a copy of the bytes it
//! describes when the device cannot hand over its own; a writer thread computes the
//! fingerprints, formats the lines and writes them (`writer`). So the device and
//! vCPU threads, which the guest waits for, pay a short lock and a memory copy per
//! record, and [`DmaLog::flush`] is what waits for the file to be complete.
//!
//! Fingerprints are 64-bit XXH3 hashes ([`fingerprint`]) of the bytes of each 4 KiB
//! guest-page piece of a buffer ([`page_pieces`]). XXH3 was chosen over FNV-1a
//! because it hashes a 4 KiB page at memory-bandwidth speed (FNV-1a works a byte at a
//! time, roughly 1 GB/s), which matters when the log must cost under 10% of a
//! multi-GB/s transfer, and because it is a stable, specified algorithm that the
//! audit side (or Python's `xxhash` package) can recompute.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod frame;
mod json;
mod page_table;
mod writer;
#[cfg(feature = "guest-memory")]
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Schema identifier written in the header line; readers refuse any other value.
pub const SCHEMA: &str = "zc-dma-log/1";

/// Size of a guest page as the log splits buffers (pieces never cross a multiple of it).
pub const PAGE_SIZE: u64 = 4096;

/// The 64-bit fingerprint of `bytes` used throughout the log (XXH3-64, seed 0).
pub fn fingerprint(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Splits the guest-physical range `[gpa, gpa + len)` at 4 KiB page boundaries,
/// yielding `(gpa, len)` of each piece. An empty range yields nothing. The range must
/// not overflow (callers validate descriptors before logging them); an overflowing
/// range is cut at `u64::MAX`.
pub fn page_pieces(gpa: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let end = gpa.saturating_add(len);
    let mut cur = gpa;
    std::iter::from_fn(move || {
        if cur >= end {
            return None;
        }
        let page_end = (cur / PAGE_SIZE)
            .saturating_add(1)
            .saturating_mul(PAGE_SIZE);
        let piece_end = page_end.min(end);
        // The piece is at most one page long, so it fits a u32.
        let piece = (cur, (piece_end - cur) as u32);
        cur = piece_end;
        Some(piece)
    })
}

/// Per-page fingerprints of `bytes`, the contents of guest memory at `gpa`.
pub fn pieces_of(gpa: u64, bytes: &[u8]) -> Vec<Piece> {
    let mut at = 0usize;
    page_pieces(gpa, bytes.len() as u64)
        .map(|(p, len)| {
            let piece = &bytes[at..at + len as usize];
            at += len as usize;
            Piece {
                gpa: p,
                len,
                hash: Fingerprint(fingerprint(piece)),
            }
        })
        .collect()
}

#[cfg(feature = "guest-memory")]
/// Reads `[gpa, gpa + len)` from guest memory page piece by page piece and returns the
/// fingerprint of each piece. Fails if any byte is outside guest memory.
pub fn pieces_from_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    gpa: u64,
    len: u64,
) -> Result<Vec<Piece>, vm_memory::GuestMemoryError> {
    let mut buf = [0u8; PAGE_SIZE as usize];
    let mut out = Vec::with_capacity(len.div_ceil(PAGE_SIZE) as usize + 1);
    for (piece_gpa, piece_len) in page_pieces(gpa, len) {
        let bytes = &mut buf[..piece_len as usize];
        mem.read_slice(bytes, GuestAddress(piece_gpa))?;
        out.push(Piece {
            gpa: piece_gpa,
            len: piece_len,
            hash: Fingerprint(fingerprint(bytes)),
        });
    }
    Ok(out)
}

/// Errors of writing or reading a DMA log.
#[derive(Debug, thiserror::Error)]
pub enum DmaLogError {
    /// The log file could not be created.
    #[error("cannot create DMA log {path}: {source} (check the directory exists and is writable)")]
    Create {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log file could not be opened for reading.
    #[error("cannot open DMA log {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Writing or reading the underlying stream failed.
    #[error("DMA log I/O error: {0}")]
    Io(#[from] io::Error),
    /// A line is not a valid record of this schema.
    #[error("DMA log line {line}: not a valid {SCHEMA} record: {source}")]
    Parse {
        /// 1-based line number.
        line: u64,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The first line is not a header record.
    #[error("DMA log has no header line (expected {{\"type\":\"header\",\"schema\":\"{SCHEMA}\",...}} first); is this a DMA log?")]
    MissingHeader,
    /// The header names another schema version.
    #[error("DMA log schema is {found:?}, this reader understands {SCHEMA:?}")]
    Schema {
        /// The schema string found.
        found: String,
    },
}

/// A 64-bit fingerprint, written as 16 lowercase hexadecimal digits (JSON numbers
/// above 2^53 are not safe in every JSON reader).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        u64::from_str_radix(&s, 16)
            .map(Fingerprint)
            .map_err(|e| serde::de::Error::custom(format!("bad fingerprint {s:?}: {e}")))
    }
}

/// Which device model made the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
}

/// Direction of a descriptor's transfer, seen from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The device read guest memory (driver → device, e.g. blk OUT data, net TX).
    DeviceReads,
    /// The device wrote guest memory (device → driver, e.g. blk IN data, net RX).
    DeviceWrites,
}

/// What part of a request a logged descriptor range carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DescRole {
    /// A request header (blk `virtio_blk_outhdr`, net `virtio_net_hdr`).
    Header,
    /// Payload bytes: what the audit matches.
    Data,
    /// A status / footer byte written by the device.
    Status,
}

/// One page piece of a descriptor's buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// Guest-physical address of the piece's first byte.
    pub gpa: u64,
    /// Length in bytes (1..=4096; never crosses a 4 KiB boundary).
    pub len: u32,
    /// Fingerprint of the piece's bytes (see [`fingerprint`]).
    pub hash: Fingerprint,
}

/// The first line of every log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRecord {
    /// Always [`SCHEMA`] for logs this crate writes.
    pub schema: String,
    /// Wall-clock time of the log start, ns since the Unix epoch (for correlation only;
    /// `t_ns` of the other records is monotonic time since this point).
    pub start_unix_ns: u64,
}

/// One descriptor (or the part of one that carried one [`DescRole`]) that a device
/// read or wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescRecord {
    /// Sequence number, unique and increasing across all records of the log.
    pub seq: u64,
    /// Monotonic time since the log started, ns.
    pub t_ns: u64,
    /// Device model.
    pub device: DeviceKind,
    /// Virtqueue index.
    pub queue: u16,
    /// Index of the chain's head descriptor (in the queue's descriptor table).
    pub head: u16,
    /// Index of this descriptor: in the queue's table, or in the indirect table if
    /// `indirect` is true.
    pub desc: u16,
    /// Whether `desc` indexes an indirect descriptor table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub indirect: bool,
    /// Guest-physical address of the range.
    pub gpa: u64,
    /// Length of the range in bytes.
    pub len: u32,
    /// Transfer direction.
    pub dir: Direction,
    /// What the range carried.
    pub role: DescRole,
    /// Per-page fingerprints of the bytes (after the device wrote them / as it read them).
    pub pieces: Vec<Piece>,
}

/// Outcome of a virtio-blk request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlkStatus {
    /// `VIRTIO_BLK_S_OK`.
    Ok,
    /// `VIRTIO_BLK_S_IOERR`.
    Ioerr,
    /// `VIRTIO_BLK_S_UNSUPP`.
    Unsupp,
}

/// Request detail of a virtio-blk chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkRequest {
    /// Request type name: `in`, `out`, `flush`, `get_id`, `discard`, `write_zeroes`,
    /// or `unknown`.
    pub op: String,
    /// The raw `type` field of the request header.
    pub code: u32,
    /// Start sector (512 bytes) from the header.
    pub sector: u64,
    /// Payload bytes the request carried (data descriptors only).
    pub bytes: u64,
    /// Status the device answered.
    pub status: BlkStatus,
}

/// Request detail of a virtio-net chain (a frame); the net device defines `summary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRequest {
    /// Free-form one-line frame summary (e.g. `tx tcp 10.0.2.15:40000>10.0.2.2:7000 len=1448`).
    pub summary: String,
    /// TCP sequence number, when the frame is TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_seq: Option<u32>,
    /// TCP payload length, when the frame is TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_len: Option<u32>,
    /// TCP flags from `SFRPA`, when the frame is TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    /// Offset of the first TCP payload byte in the frame (Ethernet header = 0), so
    /// the audit can map the chain's `data` bytes to stream offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_payload_off: Option<u32>,
    /// TCP source and destination ports, when the frame is TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_ports: Option<(u16, u16)>,
}

/// Device-specific part of a request record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestDetail {
    /// A virtio-blk request.
    Blk(BlkRequest),
    /// A virtio-net frame.
    Net(NetRequest),
}

/// One record per descriptor chain the device completed, written after its
/// descriptor records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Sequence number.
    pub seq: u64,
    /// Monotonic time since log start, ns.
    pub t_ns: u64,
    /// Device model.
    pub device: DeviceKind,
    /// Virtqueue index.
    pub queue: u16,
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Device-specific detail.
    pub req: RequestDetail,
}

/// A guest marker from the control channel (`mark <label>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkerRecord {
    /// Sequence number.
    pub seq: u64,
    /// Monotonic time since log start, ns.
    pub t_ns: u64,
    /// The label, e.g. `BEGIN sendfile`.
    pub label: String,
}

/// Something the guest driver did wrong, as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceErrorRecord {
    /// Sequence number.
    pub seq: u64,
    /// Monotonic time since log start, ns.
    pub t_ns: u64,
    /// Device model.
    pub device: DeviceKind,
    /// Virtqueue index.
    pub queue: u16,
    /// Head descriptor index of the offending chain, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u16>,
    /// What was wrong, in words.
    pub error: String,
    /// True if the device stopped and set DEVICE_NEEDS_RESET; false if it answered
    /// the request with an error status and carried on.
    pub needs_reset: bool,
}

/// A run of payload bytes found in a guest page the guest CPU dirtied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRun {
    /// Guest-physical address of the run's first byte.
    pub gpa: u64,
    /// Bytes (the run never crosses a 4 KiB guest page).
    pub len: u32,
    /// Offset in the source file of the run's first byte.
    pub file_off: u64,
}

/// One sample of KVM's dirty-page log: the pages the guest CPU wrote since the
/// previous sample, and the payload content found in them at sampling time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRecord {
    /// Sequence number.
    pub seq: u64,
    /// Monotonic ns since the log started.
    pub t_ns: u64,
    /// The guest's label for the sample (the chunk number; `u32::MAX` for the
    /// sample taken at an `END` marker).
    pub sample: u32,
    /// Pages the guest CPU dirtied since the previous sample.
    pub dirty_pages: u32,
    /// Those pages' frame numbers (guest-physical address / 4096), ascending: the
    /// audit needs them to tell a page the CPU wrote from one only a device wrote.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirtied: Vec<u64>,
    /// Payload runs in those pages, in address order.
    pub runs: Vec<PayloadRun>,
}

/// Any line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The first line.
    Header(HeaderRecord),
    /// A descriptor access.
    Desc(DescRecord),
    /// A completed request.
    Request(RequestRecord),
    /// A guest marker.
    Marker(MarkerRecord),
    /// A guest driver error.
    DeviceError(DeviceErrorRecord),
    /// A dirty-page sample.
    Dirty(DirtyRecord),
}

impl Record {
    /// The record's sequence number (`None` for the header).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Record::Header(_) => None,
            Record::Desc(d) => Some(d.seq),
            Record::Request(r) => Some(r.seq),
            Record::Marker(m) => Some(m.seq),
            Record::DeviceError(e) => Some(e.seq),
            Record::Dirty(d) => Some(d.seq),
        }
    }
}

/// Where a descriptor range is and what it carried, without the fingerprints: what
/// the `DmaLog::descriptor*` calls take (the log adds `seq` and `t_ns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescInfo {
    /// Device model.
    pub device: DeviceKind,
    /// Virtqueue index.
    pub queue: u16,
    /// Head descriptor index.
    pub head: u16,
    /// Descriptor index.
    pub desc: u16,
    /// Whether `desc` indexes an indirect table.
    pub indirect: bool,
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Direction.
    pub dir: Direction,
    /// Role of the range.
    pub role: DescRole,
}

/// Works out a request's detail from the bytes given to [`DmaLog::request_from_bytes`]
/// and its `arg`. A plain function, so that queuing one allocates nothing.
pub type DetailFn = fn(&[u8], u64) -> RequestDetail;

/// Lets the calling thread (the log's writer, or its page-table pass) have only the
/// CPU time that the vCPUs and device threads leave: the log must not slow the guest
/// down where it can wait (producers still wait for it once it falls 8 MiB
/// behind, so it cannot starve for long).
fn lower_this_threads_priority() {
    // SAFETY: setpriority takes no pointers; on Linux, PRIO_PROCESS with who 0 is the
    // calling thread. Failing leaves the priority as it was, which is harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

/// A file registered with a log ([`DmaLog::stable_file`]) as one whose contents do
/// not change while the log is in use, such as a read-only disk image. Only valid
/// with the log that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StableFile(u32);

/// `statfs` magic numbers of file systems whose reads leave the machine (or the VM):
/// 9p, NFS, FUSE, CIFS, SMB2, Ceph.
const REMOTE_FS: [i64; 6] = [
    0x0102_1997,
    0x6969,
    0x6573_5546,
    0xff53_4d42,
    0xfe53_4d42,
    0x00c3_6400,
];

/// Ranges longer than this are fingerprinted on the calling thread instead of being
/// copied for the writer thread, so that a huge descriptor cannot make the queue
/// hold gigabytes.
const COPY_LIMIT: usize = 1 << 20;
const _: () = assert!(COPY_LIMIT <= writer::MAX_BYTES);

/// Handle to a DMA log. Clones share one writer thread; a disabled log does nothing.
///
/// Records are numbered and time-stamped when the call is made and written, in that
/// order, by a writer thread; [`DmaLog::flush`] waits for it. Dropping the last clone
/// writes out what is queued.
#[derive(Clone, Default)]
pub struct DmaLog {
    inner: Option<Arc<writer::Handle>>,
}

impl std::fmt::Debug for DmaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLog")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl DmaLog {
    /// A log that records nothing (every call returns at once).
    pub fn disabled() -> Self {
        DmaLog { inner: None }
    }

    /// A log writing to `out` (buffered internally) from a writer thread of its own;
    /// the header line is its first line.
    pub fn new<W: Write + Send + 'static>(out: W) -> Result<Self, DmaLogError> {
        let start_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let header = Record::Header(HeaderRecord {
            schema: SCHEMA.to_string(),
            start_unix_ns,
        });
        let mut head = serde_json::to_vec(&header).map_err(io::Error::from)?;
        head.push(b'\n');
        let handle = writer::start(Box::new(out), head)?;
        Ok(DmaLog {
            inner: Some(Arc::new(handle)),
        })
    }

    /// A log writing to a new file at `path` (truncated if it exists).
    pub fn create(path: &Path) -> Result<Self, DmaLogError> {
        let file = File::create(path).map_err(|source| DmaLogError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(file)
    }

    /// Whether records are kept. Devices check this before computing fingerprints.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    fn push(&self, copy_len: usize, make: impl FnOnce(&mut writer::Batch) -> writer::Body) {
        if let Some(inner) = &self.inner {
            inner.shared.push(copy_len, make);
        }
    }

    /// Records one descriptor access whose fingerprints the caller computed.
    pub fn descriptor(&self, info: DescInfo, pieces: Vec<Piece>) {
        self.push(0, |_| {
            writer::Body::Desc(info, writer::Pieces::Hashed(pieces))
        });
    }

    #[cfg(feature = "guest-memory")]
    /// Records one descriptor access, fingerprinting the guest's bytes
    /// `[d.gpa, d.gpa + d.len)` as they are now (call it right after the device
    /// wrote them, or when it read them). Like [`pieces_from_guest`], a range not
    /// entirely in guest memory gets no pieces.
    pub fn descriptor_from_guest<M: GuestMemory + ?Sized>(&self, mem: &M, d: DescInfo) {
        if !self.is_enabled() {
            return;
        }
        let len = d.len as usize;
        if len > COPY_LIMIT {
            let pieces = pieces_from_guest(mem, d.gpa, u64::from(d.len)).unwrap_or_default();
            self.push(0, |_| writer::Body::Desc(d, writer::Pieces::Hashed(pieces)));
            return;
        }
        // The copy is taken now, under the queue lock; the writer thread hashes it
        // later (the guest may reuse the buffer as soon as the device completes it).
        self.push(len, |batch| {
            let (at, dst) = batch.reserve(len);
            let pieces = match mem.read_slice(dst, GuestAddress(d.gpa)) {
                Ok(()) => writer::Pieces::Copied { at, len },
                Err(_) => {
                    batch.unreserve(at);
                    writer::Pieces::Hashed(Vec::new())
                }
            };
            writer::Body::Desc(d, pieces)
        });
    }

    /// Records one descriptor access, fingerprinting `bytes`: the device's own copy
    /// of the `d.len` bytes at `d.gpa` (as it read them from, or wrote them to, guest
    /// memory), which saves reading guest memory again.
    pub fn descriptor_bytes(&self, d: DescInfo, bytes: &[u8]) {
        if !self.is_enabled() {
            return;
        }
        debug_assert_eq!(bytes.len(), d.len as usize);
        let len = bytes.len();
        if len > COPY_LIMIT {
            let pieces = pieces_of(d.gpa, bytes);
            self.push(0, |_| writer::Body::Desc(d, writer::Pieces::Hashed(pieces)));
            return;
        }
        self.push(len, |batch| {
            let (at, dst) = batch.reserve(len);
            dst.copy_from_slice(bytes);
            writer::Body::Desc(d, writer::Pieces::Copied { at, len })
        });
    }

    /// Registers `file` (a duplicate of its descriptor is kept) for
    /// [`DmaLog::descriptor_from_file`]. The caller promises that nothing writes to the
    /// file while the log is in use: fingerprints are then computed from the file on
    /// the writer thread, and the device thread takes no copy of guest memory. `None`
    /// for a disabled log, or if the descriptor cannot be duplicated.
    ///
    /// Also `None` when the file is on a file system that reads over a transport
    /// (9p, NFS, FUSE, SMB, Ceph): without a page cache every re-read is a round trip
    /// (milliseconds per page over the emulated host's 9p share), and the writer would
    /// then hold the device back far more than copying guest memory does.
    pub fn stable_file(&self, file: &File) -> Option<StableFile> {
        let inner = self.inner.as_ref()?;
        let fs = rustix::fs::fstatfs(file).ok()?;
        if REMOTE_FS.contains(&(fs.f_type as i64)) {
            return None;
        }
        let dup = file.try_clone().ok()?;
        Some(StableFile(inner.shared.add_file(dup)))
    }

    /// Records one descriptor access where the device filled guest memory
    /// `[d.gpa, d.gpa + d.len)` with the bytes at `offset` in `file`. Its fingerprints
    /// are those of the bytes the device wrote, read again from the file later.
    pub fn descriptor_from_file(&self, d: DescInfo, file: StableFile, offset: u64) {
        let len = d.len as usize;
        self.push(len.min(COPY_LIMIT), |batch| {
            batch.add_file_bytes(len);
            writer::Body::Desc(
                d,
                writer::Pieces::File {
                    file: file.0,
                    off: offset,
                },
            )
        });
    }

    /// Records a completed request (one per chain).
    pub fn request(&self, device: DeviceKind, queue: u16, head: u16, req: RequestDetail) {
        self.push(0, |_| writer::Body::Request {
            device,
            queue,
            head,
            req,
        });
    }

    /// Records a completed request whose detail is worked out from `bytes` (e.g. the
    /// frame, for its summary) by `detail(bytes, arg)`. A copy of `bytes` is taken
    /// now and `detail` runs later on the writer thread, off the device's path.
    pub fn request_from_bytes(
        &self,
        device: DeviceKind,
        queue: u16,
        head: u16,
        bytes: &[u8],
        arg: u64,
        detail: DetailFn,
    ) {
        if !self.is_enabled() {
            return;
        }
        let len = bytes.len();
        if len > COPY_LIMIT {
            self.request(device, queue, head, detail(bytes, arg));
            return;
        }
        self.push(len, |batch| {
            let (at, dst) = batch.reserve(len);
            dst.copy_from_slice(bytes);
            writer::Body::DeferredRequest {
                device,
                queue,
                head,
                at,
                len,
                arg,
                detail,
            }
        });
    }

    /// Records a guest marker (from the control channel).
    pub fn marker(&self, label: &str) {
        self.push(0, |_| writer::Body::Marker(label.to_string()));
    }

    /// Records a dirty-page sample and the payload found in the dirtied pages.
    pub fn dirty(&self, sample: u32, dirtied: Vec<u64>, runs: Vec<PayloadRun>) {
        let dirty_pages = dirtied.len() as u32;
        self.push(0, |_| writer::Body::Dirty {
            dirtied,
            sample,
            dirty_pages,
            runs,
        });
    }

    /// Records a guest driver error seen by a device.
    pub fn device_error(
        &self,
        device: DeviceKind,
        queue: u16,
        head: Option<u16>,
        error: &str,
        needs_reset: bool,
    ) {
        self.push(0, |_| writer::Body::DeviceError {
            device,
            queue,
            head,
            error: error.to_string(),
            needs_reset,
        });
    }

    /// Waits until every record made before the call is written and the writer
    /// flushed. Returns the first write error since the log started, if any (after
    /// an error the log stops recording).
    pub fn flush(&self) -> Result<(), DmaLogError> {
        match &self.inner {
            Some(inner) => inner.shared.flush(),
            None => Ok(()),
        }
    }
}

/// Reads a DMA log back as typed records. The header line is checked on creation and
/// is not yielded by the iterator.
pub struct DmaLogReader<R> {
    input: R,
    line_no: u64,
    header: HeaderRecord,
    buf: String,
}

impl DmaLogReader<BufReader<File>> {
    /// Opens the log file at `path`.
    pub fn open(path: &Path) -> Result<Self, DmaLogError> {
        let file = File::open(path).map_err(|source| DmaLogError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(BufReader::new(file))
    }
}

impl<R: BufRead> DmaLogReader<R> {
    /// Reads and checks the header line of `input`.
    pub fn new(mut input: R) -> Result<Self, DmaLogError> {
        let mut buf = String::new();
        if input.read_line(&mut buf)? == 0 {
            return Err(DmaLogError::MissingHeader);
        }
        let value: serde_json::Value = serde_json::from_str(buf.trim_end())
            .map_err(|source| DmaLogError::Parse { line: 1, source })?;
        if value.get("type").and_then(|t| t.as_str()) != Some("header") {
            return Err(DmaLogError::MissingHeader);
        }
        let found = value
            .get("schema")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        if found != SCHEMA {
            return Err(DmaLogError::Schema {
                found: found.to_string(),
            });
        }
        let header = match serde_json::from_value(value) {
            Ok(Record::Header(h)) => h,
            Ok(_) => return Err(DmaLogError::MissingHeader),
            Err(source) => return Err(DmaLogError::Parse { line: 1, source }),
        };
        Ok(DmaLogReader {
            input,
            line_no: 1,
            header,
            buf,
        })
    }

    /// The log's header.
    pub fn header(&self) -> &HeaderRecord {
        &self.header
    }
}

impl<R: BufRead> Iterator for DmaLogReader<R> {
    type Item = Result<Record, DmaLogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.input.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
            self.line_no += 1;
            let line = self.buf.trim_end();
            if line.is_empty() {
                continue;
            }
            return Some(
                serde_json::from_str(line).map_err(|source| DmaLogError::Parse {
                    line: self.line_no,
                    source,
                }),
            );
        }
    }
}

/// Reads every record of the log file at `path` (header excluded).
pub fn read_log(path: &Path) -> Result<Vec<Record>, DmaLogError> {
    DmaLogReader::open(path)?.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    #[cfg(feature = "guest-memory")]
    use vm_memory::GuestMemoryMmap;

    /// A `Write` that appends into a shared buffer, so tests can read what was written.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn pieces_split_at_page_boundaries() {
        let p: Vec<_> = page_pieces(0x1ff0, 0x2020).collect();
        assert_eq!(
            p,
            vec![
                (0x1ff0, 0x10),
                (0x2000, 0x1000),
                (0x3000, 0x1000),
                (0x4000, 0x10)
            ]
        );
        assert_eq!(page_pieces(0x1000, 0).count(), 0);
        assert_eq!(
            page_pieces(0x1000, 0x1000).collect::<Vec<_>>(),
            vec![(0x1000, 0x1000)]
        );
    }

    #[cfg(feature = "guest-memory")]
    #[test]
    fn guest_pieces_hash_the_bytes() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1800)).unwrap();
        let p = pieces_from_guest(&mem, 0x1800, 0x1800).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].hash.0, fingerprint(&data[..0x800]));
        assert_eq!(p[1].hash.0, fingerprint(&data[0x800..]));
        assert!(pieces_from_guest(&mem, 0xf000, 0x2000).is_err());
    }

    #[test]
    fn round_trip_all_record_kinds() {
        let buf = SharedBuf::default();
        let log = DmaLog::new(buf.clone()).unwrap();
        log.marker("BEGIN x");
        log.descriptor(
            DescInfo {
                device: DeviceKind::Blk,
                queue: 0,
                head: 3,
                desc: 4,
                indirect: true,
                gpa: 0x1000,
                len: 512,
                dir: Direction::DeviceWrites,
                role: DescRole::Data,
            },
            vec![Piece {
                gpa: 0x1000,
                len: 512,
                hash: Fingerprint(u64::MAX - 1),
            }],
        );
        log.request(
            DeviceKind::Blk,
            0,
            3,
            RequestDetail::Blk(BlkRequest {
                op: "in".into(),
                code: 0,
                sector: 8,
                bytes: 512,
                status: BlkStatus::Ok,
            }),
        );
        log.request(
            DeviceKind::Net,
            1,
            0,
            RequestDetail::Net(NetRequest {
                summary: "tx".into(),
                tcp_seq: Some(7),
                tcp_len: None,
                tcp_flags: None,
                tcp_payload_off: None,
                tcp_ports: None,
            }),
        );
        log.device_error(DeviceKind::Blk, 0, None, "bad", true);
        log.flush().unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"type\":\"header\",\"schema\":\"zc-dma-log/1\""));
        assert!(text.contains("\"hash\":\"fffffffffffffffe\""));
        let r = DmaLogReader::new(&bytes[..]).unwrap();
        assert_eq!(r.header().schema, SCHEMA);
        let recs: Vec<Record> = r.collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 5);
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq().unwrap()).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        match &recs[1] {
            Record::Desc(d) => {
                assert_eq!(d.pieces[0].hash, Fingerprint(u64::MAX - 1));
                assert!(d.indirect);
            }
            other => panic!("unexpected {other:?}"),
        }
        match &recs[3] {
            Record::Request(RequestRecord {
                req: RequestDetail::Net(n),
                ..
            }) => assert_eq!(n.tcp_seq, Some(7)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn disabled_log_is_a_no_op() {
        let log = DmaLog::disabled();
        assert!(!log.is_enabled());
        log.marker("x");
        log.flush().unwrap();
    }

    #[test]
    fn reader_rejects_other_schema_and_garbage() {
        let other = b"{\"type\":\"header\",\"schema\":\"zc-dma-log/2\",\"start_unix_ns\":0}\n";
        assert!(matches!(
            DmaLogReader::new(&other[..]),
            Err(DmaLogError::Schema { .. })
        ));
        assert!(matches!(
            DmaLogReader::new(&b""[..]),
            Err(DmaLogError::MissingHeader)
        ));
        let bad =
            b"{\"type\":\"header\",\"schema\":\"zc-dma-log/1\",\"start_unix_ns\":0}\nnot json\n";
        let mut r = DmaLogReader::new(&bad[..]).unwrap();
        assert!(matches!(
            r.next(),
            Some(Err(DmaLogError::Parse { line: 2, .. }))
        ));
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dma.jsonl");
        let log = DmaLog::create(&path).unwrap();
        log.marker("m");
        log.flush().unwrap();
        let recs = read_log(&path).unwrap();
        assert!(matches!(&recs[0], Record::Marker(m) if m.label == "m"));
        let err = DmaLog::create(&dir.path().join("no/such/dir")).unwrap_err();
        assert!(err.to_string().contains("no/such/dir"));
    }
}
