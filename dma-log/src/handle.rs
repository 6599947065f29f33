//! [`DmaLog`], the handle the devices and the VMM record through, and what its calls
//! take.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::writer;
use crate::{
    pieces_of, DescRole, DeviceKind, Direction, DmaLogError, HeaderRecord, PayloadRun, Piece,
    Record, RequestDetail, SCHEMA,
};

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

/// The chain a record belongs to: what every device record starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chain {
    pub(crate) device: DeviceKind,
    /// Which card of its kind ([`DmaLog::for_card`]).
    pub(crate) card: u16,
    pub(crate) queue: u16,
    pub(crate) head: u16,
}

impl Chain {
    /// The same chain on card `card`.
    pub(crate) fn with_card(self, card: u16) -> Chain {
        Chain { card, ..self }
    }
}

impl DescInfo {
    /// The chain the descriptor belongs to, on card `card`.
    pub(crate) fn chain(&self, card: u16) -> Chain {
        Chain {
            device: self.device,
            card,
            queue: self.queue,
            head: self.head,
        }
    }
}

/// Works out a request's detail from the bytes given to [`DmaLog::request_from_bytes`]
/// and its `arg`. A plain function, so that queuing one allocates nothing.
pub type DetailFn = fn(&[u8], u64) -> RequestDetail;

/// Two bytes a device changed in a frame after reading (and logging) it: the
/// checksum it completed, at `at` in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePatch {
    /// Offset in the frame.
    pub at: usize,
    /// The bytes there now.
    pub bytes: [u8; 2],
}

impl FramePatch {
    /// Writes the patch into `frame` (a patch outside it changes nothing).
    pub(crate) fn apply(self, frame: &mut [u8]) {
        if let Some(b) = self
            .at
            .checked_add(2)
            .and_then(|end| frame.get_mut(self.at..end))
        {
            b.copy_from_slice(&self.bytes);
        }
    }
}

/// A file registered with a log ([`DmaLog::stable_file`]) as one whose contents do
/// not change while the log is in use, such as a read-only disk image. Only valid
/// with the log that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StableFile(pub(crate) u32);

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
pub(crate) const COPY_LIMIT: usize = 1 << 20;
const _: () = assert!(COPY_LIMIT <= writer::MAX_BYTES);

/// Handle to a DMA log. Clones share one writer thread; a disabled log does nothing.
///
/// Records are numbered and time-stamped when the call is made and written, in that
/// order, by a writer thread; [`DmaLog::flush`] waits for it. Dropping the last clone
/// writes out what is queued.
#[derive(Clone, Default)]
pub struct DmaLog {
    pub(crate) inner: Option<Arc<writer::Handle>>,
    /// The card this handle's device records name ([`DmaLog::for_card`]).
    card: u16,
}

impl std::fmt::Debug for DmaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLog")
            .field("enabled", &self.is_enabled())
            .field("card", &self.card)
            .finish()
    }
}

/// zstd level of compressed logs: the fastest, since the writer thread shares the
/// host's CPUs with the guest. On this log's text it already gives most of what the
/// higher levels do (fingerprints, a third of a `desc` line, do not compress).
const ZSTD_LEVEL: i32 = 1;

impl DmaLog {
    /// A log that records nothing (every call returns at once).
    pub fn disabled() -> Self {
        DmaLog {
            inner: None,
            card: 0,
        }
    }

    /// A log writing to `out` (buffered internally) from a writer thread of its own;
    /// the header line is its first line.
    pub fn new<W: Write + Send + 'static>(out: W) -> Result<Self, DmaLogError> {
        let start_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
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
            card: 0,
        })
    }

    /// A log writing to a new file at `path` (truncated if it exists), compressed
    /// with zstd when the name ends in `.zst` (e.g. `dma.jsonl.zst`).
    pub fn create(path: &Path) -> Result<Self, DmaLogError> {
        let create_error = |source| DmaLogError::Create {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(create_error)?;
        if crate::is_zstd_path(path) {
            return Self::new(crate::zst::ZstdFrames::new(file, ZSTD_LEVEL));
        }
        Self::new(file)
    }

    /// A handle to the same log whose device records (`desc`, `request`,
    /// `device_error`) say they come from card `card` of their kind: a VMM with
    /// several virtio-net cards gives each card's device its own handle, so that
    /// the records of each card can be told apart (`card` in `docs/dma-log.md`).
    /// Card 0 is every handle's default, and is written as no field at all.
    pub fn for_card(&self, card: u16) -> DmaLog {
        DmaLog {
            inner: self.inner.clone(),
            card,
        }
    }

    /// Whether records are kept. Devices check this before computing fingerprints.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub(crate) fn push(
        &self,
        copy_len: usize,
        make: impl FnOnce(&mut writer::Batch) -> writer::Body,
    ) {
        if let Some(inner) = &self.inner {
            inner.shared.push(self.card, copy_len, make);
        }
    }

    /// Records one descriptor access whose fingerprints the caller computed.
    pub fn descriptor(&self, info: DescInfo, pieces: Vec<Piece>) {
        self.push(0, |_| {
            writer::Body::Desc(info, writer::Pieces::Hashed(pieces))
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
            writer::Body::Desc(d, writer::Pieces::Copied(batch.copy(bytes)))
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

    /// The chain `head` of `queue` on this handle's card: the card its records are
    /// written with (see [`DmaLog::push`]), so a request's chain matches its descs'.
    fn chain(&self, device: DeviceKind, queue: u16, head: u16) -> Chain {
        Chain {
            device,
            card: self.card,
            queue,
            head,
        }
    }

    /// Records a completed request (one per chain).
    pub fn request(&self, device: DeviceKind, queue: u16, head: u16, req: RequestDetail) {
        let chain = self.chain(device, queue, head);
        self.push(0, |_| {
            writer::Body::Request(chain, writer::Detail::Ready(req))
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
        if bytes.len() > COPY_LIMIT {
            self.request(device, queue, head, detail(bytes, arg));
            return;
        }
        let chain = self.chain(device, queue, head);
        self.push(bytes.len(), |batch| {
            let bytes = batch.copy(bytes);
            writer::Body::Request(
                chain,
                writer::Detail::Deferred {
                    bytes,
                    arg,
                    detail,
                    patch: None,
                },
            )
        });
    }

    /// Records a completed request whose detail `detail(bytes, arg)` is worked out
    /// on the writer thread from the bytes the chain's `desc` records just copied
    /// (with [`DmaLog::descriptor_bytes`], e.g. through a device's logged read),
    /// without copying them again: `bytes` = what they copied after the first
    /// `skip` bytes, then `patch` (what the device changed since). When those
    /// copies are not the last ones queued (another record came between, or a
    /// range was too long to copy), `bytes` is copied as
    /// [`DmaLog::request_from_bytes`] does.
    #[allow(clippy::too_many_arguments)]
    pub fn request_from_read(
        &self,
        device: DeviceKind,
        queue: u16,
        head: u16,
        skip: usize,
        bytes: &[u8],
        patch: Option<FramePatch>,
        arg: u64,
        detail: DetailFn,
    ) {
        if !self.is_enabled() {
            return;
        }
        if bytes.len() > COPY_LIMIT {
            self.request(device, queue, head, detail(bytes, arg));
            return;
        }
        let chain = self.chain(device, queue, head);
        self.push(bytes.len(), |batch| {
            let read = batch
                .trailing_copies_of(chain)
                .and_then(|c| c.skip(skip, bytes.len()));
            let detail = match read {
                Some(copied) => writer::Detail::Deferred {
                    bytes: copied,
                    arg,
                    detail,
                    patch,
                },
                None => writer::Detail::Deferred {
                    bytes: batch.copy(bytes),
                    arg,
                    detail,
                    patch: None,
                },
            };
            writer::Body::Request(chain, detail)
        });
    }

    /// Records a guest marker (from the control channel).
    pub fn marker(&self, label: &str) {
        self.push(0, |_| writer::Body::Marker(label.to_string()));
    }

    /// Records a dirty-page sample and the payload found in the dirtied pages.
    pub fn dirty(&self, sample: u32, dirtied: Vec<u64>, runs: Vec<PayloadRun>) {
        let dirty_pages = u32::try_from(dirtied.len()).unwrap_or(u32::MAX);
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

    /// Has `hook` called once with the first error writing the log (a full disk,
    /// an I/O error), as soon as the writer thread meets it rather than at the next
    /// [`DmaLog::flush`]: the log stops recording there, so whatever the run does
    /// after it has no complete log and must not be judged from it. `hook` runs on
    /// the writer thread (or on this one, if the log has already failed); it should
    /// be quick, e.g. send a message. Replaces an earlier hook; a disabled log never
    /// calls it.
    pub fn on_write_error(&self, hook: impl FnOnce(&io::Error) + Send + 'static) {
        if let Some(inner) = &self.inner {
            inner.shared.on_write_error(Box::new(hook));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Out;
    use crate::{
        read_log, BlkRequest, BlkStatus, DmaLogReader, Fingerprint, NetRequest, RequestRecord,
    };

    #[test]
    fn round_trip_all_record_kinds() {
        let out = Out::default();
        let log = out.log();
        log.marker("label x");
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
        let bytes = out.bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.starts_with("{\"type\":\"header\",\"schema\":\"zc-dma-log/2\""));
        // The desc and the request after it share a line; the pieces are implied.
        assert!(text.contains("{\"c\":\"blk/0/3\",\"s\":1,\"t\":"), "{text}");
        assert!(
            text.contains(",\"d\":[[4,4096,512,\"wdi\",0,\"fffffffffffffffe\"]],\"r\":{\"dt\":"),
            "{text}"
        );
        assert_eq!(
            text.lines().count(),
            1 + 4,
            "header, marker, chain, net request, error"
        );
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
    fn each_cards_handle_names_its_card_in_its_device_records() {
        let out = Out::default();
        let log = out.log();
        let second = log.for_card(1);
        let tx = |head: u16| DescInfo {
            device: DeviceKind::Net,
            queue: 1,
            head,
            desc: head,
            indirect: false,
            gpa: 0x2000,
            len: 4,
            dir: Direction::DeviceReads,
            role: DescRole::Data,
        };
        // The same chain (queue 1, head 5) on two cards.
        log.descriptor_bytes(tx(5), b"abcd");
        second.descriptor_bytes(tx(5), b"abcd");
        second.request_from_bytes(DeviceKind::Net, 1, 5, b"abcd", 0, |_, _| {
            RequestDetail::Net(NetRequest {
                summary: "tx".into(),
                tcp_seq: None,
                tcp_len: None,
                tcp_flags: None,
                tcp_payload_off: None,
                tcp_ports: None,
            })
        });
        second.device_error(DeviceKind::Net, 1, Some(5), "bad", false);
        second.marker("BEGIN x");
        log.flush().unwrap();
        let bytes = out.bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        // In a chain line card 0 is the bare device, card 1 `net1`; the request
        // joins its own card's line. A device error has `"card":1` right after
        // `device`.
        assert!(lines[0].starts_with("{\"c\":\"net/1/5\","), "{text}");
        assert!(lines[1].starts_with("{\"c\":\"net1/1/5\","), "{text}");
        assert!(lines[1].contains("\"r\":{"), "{text}");
        assert!(
            lines[2].contains("\"device\":\"net\",\"card\":1,\"queue\":1"),
            "{text}"
        );
        let recs: Vec<Record> = DmaLogReader::new(&bytes[..])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let cards: Vec<Option<u16>> = recs
            .iter()
            .map(|r| match r {
                Record::Desc(d) => Some(d.card),
                Record::Request(r) => Some(r.card),
                Record::DeviceError(e) => Some(e.card),
                _ => None,
            })
            .collect();
        assert_eq!(cards, [Some(0), Some(1), Some(1), Some(1), None]);
    }

    #[test]
    fn disabled_log_is_a_no_op() {
        let log = DmaLog::disabled();
        assert!(!log.is_enabled());
        log.marker("x");
        log.flush().unwrap();
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

    #[test]
    fn zst_path_writes_a_compressed_log_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dma.jsonl.zst");
        let log = DmaLog::create(&path).unwrap();
        for i in 0..2000u32 {
            log.marker(&format!("mark {i}"));
            log.descriptor_bytes(
                DescInfo {
                    device: DeviceKind::Net,
                    queue: 1,
                    head: 0,
                    desc: 1,
                    indirect: false,
                    gpa: 0x10_0000 + u64::from(i) * 4096,
                    len: 64,
                    dir: Direction::DeviceReads,
                    role: DescRole::Data,
                },
                &[u8::try_from(i % 251).unwrap(); 64],
            );
        }
        // A flush leaves a whole zstd file, even if the process then exits without
        // dropping the log (the VMM does).
        log.flush().unwrap();
        let flushed = std::fs::read(&path).unwrap();
        assert_eq!(flushed[..4], crate::ZSTD_MAGIC);
        assert_eq!(read_log(&path).unwrap().len(), 4000);
        // Records after it go to a new frame.
        log.marker("after the flush");
        drop(log);
        let recs = read_log(&path).unwrap();
        assert_eq!(recs.len(), 4001);
        assert!(matches!(&recs[3998], Record::Marker(m) if m.label == "mark 1999"));
        assert!(matches!(&recs[4000], Record::Marker(m) if m.label == "after the flush"));
        let plain_len: usize = recs
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len() + 1)
            .sum();
        let packed_len = std::fs::metadata(&path).unwrap().len();
        assert!(
            packed_len * 3 < u64::try_from(plain_len).unwrap(),
            "{packed_len} bytes compressed of {plain_len}"
        );
    }
}
