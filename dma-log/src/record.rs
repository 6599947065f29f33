//! The records of the log as Rust types (field by field in `docs/dma-log.md`). Their
//! serde form is a line of schema `zc-dma-log/1`, which readers parse with serde;
//! schema `/2` lays the same records out in fewer bytes (`compact`), and its
//! markers and device errors are serde's lines.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// Serde's test for leaving `card` out: card 0.
fn is_first_card(card: &u16) -> bool {
    *card == 0
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
    /// Fingerprint of the piece's bytes (see [`fingerprint`](crate::fingerprint)).
    pub hash: Fingerprint,
}

/// The first line of every log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderRecord {
    /// Always [`SCHEMA`](crate::SCHEMA) for logs this crate writes.
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
    /// Which card of its kind: the VMM's `card`-th virtio-net card (0, the first,
    /// is written as no field at all, so one-card logs read as they always did).
    #[serde(default, skip_serializing_if = "is_first_card")]
    pub card: u16,
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

/// Request detail of a virtio-net chain (a frame), as [`crate::frame::summarize`] and
/// [`crate::frame::FrameSummary::into_request`] make it.
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
    /// Which card of its kind: the VMM's `card`-th virtio-net card (0, the first,
    /// is written as no field at all, so one-card logs read as they always did).
    #[serde(default, skip_serializing_if = "is_first_card")]
    pub card: u16,
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
    /// Which card of its kind: the VMM's `card`-th virtio-net card (0, the first,
    /// is written as no field at all, so one-card logs read as they always did).
    #[serde(default, skip_serializing_if = "is_first_card")]
    pub card: u16,
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
