//! Parsing a virtio-blk request (virtio 1.2, 5.2.6): the chain's status byte, its
//! header, and a typed [`Request`] validated against the disk (size, read-only,
//! negotiated features, `seg_max` / `size_max`), before anything is executed.
//!
//! Any descriptor layout is accepted (VERSION_1 implies ANY_LAYOUT): the header is
//! the first 16 device-readable bytes, the status the last device-writable byte,
//! the data whatever lies between.

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{ByteValued, GuestMemoryError};

use super::SECTOR_SIZE;
use crate::dma_log::{BlkStatus, DescRole};
use crate::virtio::chain::{BufferError, ChainTooLong, GuestBuffers, GuestChain, Roles};

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u64 = std::mem::size_of::<RequestHeader>() as u64;
/// Size of one discard / write-zeroes segment.
pub const DWZ_SEG_LEN: u64 = std::mem::size_of::<DiscardSegment>() as u64;

/// `virtio_blk_outhdr` as vm-memory can read it (the bindings' struct cannot
/// implement vm-memory's trait in this crate, hence the wrapper).
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
pub struct RequestHeader(virtio_blk_outhdr);

// SAFETY: `virtio_blk_outhdr` is `repr(C)` with two u32 and one u64 field: no
// padding, no pointers, and every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    /// The raw `type` code.
    pub fn code(&self) -> u32 {
        u32::from_le(self.0.type_)
    }

    /// The start sector.
    pub fn sector(&self) -> u64 {
        u64::from_le(self.0.sector)
    }

    /// The request type.
    pub fn request_type(&self) -> RequestType {
        RequestType::from(self.code())
    }
}

/// `virtio_blk_discard_write_zeroes`, readable by vm-memory (see [`RequestHeader`]).
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
struct DiscardSegment(virtio_blk_discard_write_zeroes);

// SAFETY: `virtio_blk_discard_write_zeroes` is `repr(C)` with a u64 and two u32
// fields: no padding, no pointers, every bit pattern valid.
unsafe impl ByteValued for DiscardSegment {}

/// The type of a request, from its header's `type` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// `VIRTIO_BLK_T_IN`: read from the disk.
    In,
    /// `VIRTIO_BLK_T_OUT`: write to the disk.
    Out,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the disk's serial.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes,
    /// Any other code.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(code: u32) -> Self {
        match code {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// What a request's header asks for, validated and ready to execute.
pub enum Request<'a> {
    /// Fill `data` from the disk at byte `offset`.
    In {
        /// Byte offset on the disk.
        offset: u64,
        /// The device-writable data buffers.
        data: GuestBuffers<'a>,
    },
    /// Write `data` to the disk at byte `offset`.
    Out {
        /// Byte offset on the disk.
        offset: u64,
        /// The device-readable data buffers.
        data: GuestBuffers<'a>,
    },
    /// Make everything written so far durable.
    Flush,
    /// Write the serial (as much as fits) into `buf`.
    GetId {
        /// The device-writable buffers.
        buf: GuestBuffers<'a>,
    },
    /// Deallocate `len` bytes at `offset` (a hint).
    Discard {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (0 is a no-op).
        len: u64,
    },
    /// Zero `len` bytes at `offset`, deallocating them if `unmap`.
    WriteZeroes {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (0 is a no-op).
        len: u64,
        /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
        unmap: bool,
    },
    /// A type this device does not implement: answered `UNSUPP`.
    Unsupported,
}

/// Why the chain has no status byte to answer through: the device must then go to
/// DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    /// The chain has no descriptor.
    #[error("empty descriptor chain")]
    Empty,
    /// The last descriptor is device-readable.
    #[error("missing status byte: last descriptor {0} is device-readable")]
    Readable(u16),
    /// The last descriptor's buffer is unusable.
    #[error("missing status byte: {0}")]
    Buffer(BufferError),
}

/// Why a request with a usable status byte is refused. Answered `IOERR`, or
/// `UNSUPP` where [`RequestError::status`] says so, with a device-error record.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A buffer is empty, overflows or lies outside guest memory.
    #[error(transparent)]
    Buffer(#[from] BufferError),
    /// More descriptors than the queue has entries.
    #[error(transparent)]
    ChainTooLong(#[from] ChainTooLong),
    /// The driver's buffers must come before the device's (virtio 1.2, 2.7.4.2).
    #[error("device-readable descriptor {0} after a device-writable one")]
    ReadableAfterWritable(u16),
    /// Fewer than 16 device-readable bytes.
    #[error("request header too short: {0} device-readable bytes, need {HEADER_LEN}")]
    HeaderTooShort(u64),
    /// The header could not be read.
    #[error("reading header: {0}")]
    ReadHeader(GuestMemoryError),
    /// Data buffers in the direction the request type does not move data.
    #[error("{op} request has {dir} data in descriptor {index}")]
    WrongDirection {
        /// `IN`, `OUT` or `GET_ID`.
        op: &'static str,
        /// `device-readable` or `device-writable`.
        dir: &'static str,
        /// The first such descriptor.
        index: u16,
    },
    /// A write to a read-only disk.
    #[error("{0} on a read-only disk")]
    ReadOnly(&'static str),
    /// IN / OUT data that is not whole sectors.
    #[error("{op} data length {len} is not a multiple of 512")]
    Unaligned {
        /// `IN` or `OUT`.
        op: &'static str,
        /// Data bytes.
        len: u64,
    },
    /// The range is not inside the disk.
    #[error(
        "request for sector {sector} + {len} bytes is beyond the disk's end ({capacity} bytes)"
    )]
    BeyondEnd {
        /// Start sector.
        sector: u64,
        /// Bytes.
        len: u64,
        /// Disk capacity in bytes.
        capacity: u64,
    },
    /// More data segments than the `seg_max` the driver accepted.
    #[error("{count} data segments, more than seg_max {max}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
        /// The advertised limit.
        max: u32,
    },
    /// A data segment longer than the `size_max` the driver accepted.
    #[error("data segment in descriptor {index} of {len} bytes, more than size_max {max}")]
    SegmentTooLarge {
        /// The descriptor.
        index: u16,
        /// Its data bytes.
        len: u64,
        /// The advertised limit.
        max: u32,
    },
    /// FLUSH with data buffers.
    #[error("FLUSH request carries data buffers")]
    FlushWithData,
    /// GET_ID with nowhere to put the id.
    #[error("GET_ID request has no buffer for the id")]
    NoIdBuffer,
    /// DISCARD / WRITE_ZEROES whose feature was not negotiated (`UNSUPP`).
    #[error("{0} without its feature")]
    NotNegotiated(&'static str),
    /// DISCARD / WRITE_ZEROES with device-writable data.
    #[error("DISCARD/WRITE_ZEROES request has device-writable data")]
    DiscardWritable,
    /// DISCARD / WRITE_ZEROES not carrying exactly one segment.
    #[error("DISCARD/WRITE_ZEROES needs exactly one 16-byte segment, got {0} bytes")]
    DiscardSegmentLength(u64),
    /// The segment could not be read.
    #[error("reading segment: {0}")]
    ReadSegment(GuestMemoryError),
    /// DISCARD / WRITE_ZEROES flags this device does not know (`UNSUPP`).
    #[error("{op} with unsupported flags {flags:#x}")]
    UnsupportedFlags {
        /// `discard` or `write_zeroes`.
        op: &'static str,
        /// The flags.
        flags: u32,
    },
}

impl RequestError {
    /// The status the request is answered with.
    pub fn status(&self) -> BlkStatus {
        match self {
            RequestError::NotNegotiated(_) | RequestError::UnsupportedFlags { .. } => {
                BlkStatus::Unsupp
            }
            _ => BlkStatus::Ioerr,
        }
    }
}

/// What the request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk capacity in bytes (whole sectors).
    pub capacity_bytes: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Advertised `seg_max` (enforced if VIRTIO_BLK_F_SEG_MAX was accepted).
    pub seg_max: u32,
    /// Advertised `size_max` (enforced if VIRTIO_BLK_F_SIZE_MAX was accepted).
    pub size_max: u32,
}

impl Limits {
    fn acked(&self, feature: u32) -> bool {
        self.acked_features & (1u64 << feature) != 0
    }

    /// Checks `[sector * 512, + len)` is inside the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|off| {
                off.checked_add(len)
                    .is_some_and(|end| end <= self.capacity_bytes)
            })
            .ok_or(RequestError::BeyondEnd {
                sector,
                len,
                capacity: self.capacity_bytes,
            })
    }

    /// Checks the data segments against `seg_max` and `size_max`, each only when
    /// the driver accepted its feature: a driver that did not was never told the
    /// limit (Linux accepts both). Every request type with data is checked.
    fn segments(&self, data: &GuestBuffers) -> Result<(), RequestError> {
        if self.acked(VIRTIO_BLK_F_SEG_MAX) && data.segment_count() > self.seg_max as usize {
            return Err(RequestError::TooManySegments {
                count: data.segment_count(),
                max: self.seg_max,
            });
        }
        match data.longest_segment() {
            Some((index, len))
                if self.acked(VIRTIO_BLK_F_SIZE_MAX) && len > u64::from(self.size_max) =>
            {
                Err(RequestError::SegmentTooLarge {
                    index,
                    len,
                    max: self.size_max,
                })
            }
            _ => Ok(()),
        }
    }
}

/// A chain parsed as a virtio-blk request.
pub struct Parsed<'a> {
    /// The status byte the answer goes to.
    pub status: GuestBuffers<'a>,
    /// The header, when the chain got that far (for the log's request record).
    pub header: Option<RequestHeader>,
    /// The request, or why it is refused.
    pub request: Result<Request<'a>, RequestError>,
}

/// Parses `chain`. `Err` when it has no usable status byte (the device cannot
/// answer: NEEDS_RESET); otherwise the request or why it is refused. Reads (and so
/// logs) the header and, for DISCARD / WRITE_ZEROES, the segment; nothing else.
pub fn parse<'a>(chain: &GuestChain<'a>, limits: &Limits) -> Result<Parsed<'a>, StatusError> {
    let last = chain.descriptors().last().ok_or(StatusError::Empty)?;
    if !last.writable {
        return Err(StatusError::Readable(last.index));
    }
    chain.check(last).map_err(StatusError::Buffer)?;
    let writable = chain.writable();
    let data_len = writable.len() - 1;
    let (data_in, status) = writable.split_at(data_len);
    let (header, request) = match read_header(chain) {
        Ok((header, data_out)) => (Some(header), validate(&header, data_out, data_in, limits)),
        Err(e) => (None, Err(e)),
    };
    Ok(Parsed {
        status,
        header,
        request,
    })
}

/// Checks the buffers and their order, and reads the header. Returns it and the
/// device-readable bytes after it.
fn read_header<'a>(
    chain: &GuestChain<'a>,
) -> Result<(RequestHeader, GuestBuffers<'a>), RequestError> {
    chain.check_length()?;
    chain.check_buffers()?;
    let descs = chain.descriptors();
    if let Some(pos) = descs.iter().position(|d| d.writable) {
        if let Some(bad) = descs[pos..].iter().find(|d| !d.writable) {
            return Err(RequestError::ReadableAfterWritable(bad.index));
        }
    }
    let readable = chain.readable();
    if readable.len() < HEADER_LEN {
        return Err(RequestError::HeaderTooShort(readable.len()));
    }
    let (header_bufs, data_out) = readable.split_at(HEADER_LEN);
    let mut header = RequestHeader::default();
    header_bufs
        .read(header.as_mut_slice(), Roles::all(DescRole::Header))
        .map_err(|e| RequestError::ReadHeader(e.source))?;
    Ok((header, data_out))
}

/// The request `header` asks for, with the data buffers around it.
fn validate<'a>(
    header: &RequestHeader,
    data_out: GuestBuffers<'a>,
    data_in: GuestBuffers<'a>,
    limits: &Limits,
) -> Result<Request<'a>, RequestError> {
    let sector = header.sector();
    match header.request_type() {
        RequestType::In => {
            let (offset, data) = transfer(
                "IN",
                data_in,
                ("device-readable", &data_out),
                sector,
                limits,
            )?;
            Ok(Request::In { offset, data })
        }
        RequestType::Out => {
            if limits.read_only {
                return Err(RequestError::ReadOnly("OUT request"));
            }
            let (offset, data) = transfer(
                "OUT",
                data_out,
                ("device-writable", &data_in),
                sector,
                limits,
            )?;
            Ok(Request::Out { offset, data })
        }
        RequestType::Flush => {
            if !data_out.is_empty() || !data_in.is_empty() {
                return Err(RequestError::FlushWithData);
            }
            Ok(Request::Flush)
        }
        RequestType::GetId => {
            no_data("GET_ID", "device-readable", &data_out)?;
            if data_in.is_empty() {
                return Err(RequestError::NoIdBuffer);
            }
            limits.segments(&data_in)?;
            Ok(Request::GetId { buf: data_in })
        }
        t @ (RequestType::Discard | RequestType::WriteZeroes) => {
            discard_or_write_zeroes(t == RequestType::Discard, data_out, data_in, limits)
        }
        RequestType::Unsupported(_) => Ok(Request::Unsupported),
    }
}

/// `Err` if `data` (buffers of direction `dir`) is not empty: request type `op`
/// moves no data that way.
fn no_data(op: &'static str, dir: &'static str, data: &GuestBuffers) -> Result<(), RequestError> {
    match data.first_descriptor() {
        Some(index) => Err(RequestError::WrongDirection { op, dir, index }),
        None => Ok(()),
    }
}

/// Validates an IN or OUT (`op`) moving `data` between guest memory and the disk
/// at `sector`: nothing in the other direction (`wrong`: its name and buffers),
/// whole sectors, inside the disk, within the segment limits. Returns the byte
/// offset and `data`.
fn transfer<'a>(
    op: &'static str,
    data: GuestBuffers<'a>,
    wrong: (&'static str, &GuestBuffers),
    sector: u64,
    limits: &Limits,
) -> Result<(u64, GuestBuffers<'a>), RequestError> {
    no_data(op, wrong.0, wrong.1)?;
    let len = data.len();
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned { op, len });
    }
    let offset = limits.range(sector, len)?;
    limits.segments(&data)?;
    Ok((offset, data))
}

fn discard_or_write_zeroes<'a>(
    discard: bool,
    data_out: GuestBuffers<'a>,
    data_in: GuestBuffers<'a>,
    limits: &Limits,
) -> Result<Request<'a>, RequestError> {
    let (op, feature, allowed) = if discard {
        ("discard", VIRTIO_BLK_F_DISCARD, 0)
    } else {
        (
            "write_zeroes",
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )
    };
    if !limits.acked(feature) {
        return Err(RequestError::NotNegotiated(op));
    }
    if limits.read_only {
        return Err(RequestError::ReadOnly("DISCARD/WRITE_ZEROES"));
    }
    if !data_in.is_empty() {
        return Err(RequestError::DiscardWritable);
    }
    if data_out.len() != DWZ_SEG_LEN {
        return Err(RequestError::DiscardSegmentLength(data_out.len()));
    }
    limits.segments(&data_out)?;
    let mut seg = DiscardSegment::default();
    data_out
        .read(seg.as_mut_slice(), Roles::all(DescRole::Data))
        .map_err(|e| RequestError::ReadSegment(e.source))?;
    let flags = u32::from_le(seg.0.flags);
    if flags & !allowed != 0 {
        return Err(RequestError::UnsupportedFlags { op, flags });
    }
    let len = u64::from(u32::from_le(seg.0.num_sectors)) * SECTOR_SIZE;
    let offset = limits.range(u64::from_le(seg.0.sector), len)?;
    Ok(if discard {
        Request::Discard { offset, len }
    } else {
        Request::WriteZeroes {
            offset,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        }
    })
}
