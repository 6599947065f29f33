//! Per-device counters of virtio-blk (after Firecracker's block metrics), read with
//! [`Block::stats`](super::Block::stats) and serialisable for a run's summary.

use serde::{Deserialize, Serialize};

use super::request::RequestType;
use crate::dma_log::BlkStatus;

/// What a [`Block`](super::Block) device did since it was created (resets of the
/// device do not clear them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkStats {
    /// IN requests (whatever their outcome).
    pub in_requests: u64,
    /// OUT requests.
    pub out_requests: u64,
    /// FLUSH requests.
    pub flush_requests: u64,
    /// GET_ID requests.
    pub get_id_requests: u64,
    /// DISCARD requests.
    pub discard_requests: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes_requests: u64,
    /// Requests of a type the device does not implement.
    pub unsupported_requests: u64,
    /// Chains answered before their header could be read (malformed).
    pub malformed_requests: u64,
    /// Bytes IN requests copied from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes OUT requests copied from guest memory to the disk.
    pub bytes_written: u64,
    /// Bytes DISCARD and WRITE_ZEROES requests deallocated or zeroed.
    pub bytes_deallocated: u64,
    /// FLUSH requests completed with a successful `fsync`.
    pub flushes: u64,
    /// Requests answered `VIRTIO_BLK_S_OK`.
    pub status_ok: u64,
    /// Requests answered `VIRTIO_BLK_S_IOERR`.
    pub status_ioerr: u64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub status_unsupp: u64,
    /// Requests refused by validation (a driver error: bad buffers, beyond the
    /// disk's end, a write to a read-only disk...).
    pub invalid_requests: u64,
    /// Requests that failed on the host (reading, writing or syncing the file).
    pub io_errors: u64,
    /// Chains or rings the device could not serve at all: each put it in
    /// DEVICE_NEEDS_RESET.
    pub chain_faults: u64,
}

impl BlkStats {
    /// Counts one request by its type (`None`: no header could be read).
    pub(super) fn count_type(&mut self, request_type: Option<RequestType>) {
        let counter = match request_type {
            Some(RequestType::In) => &mut self.in_requests,
            Some(RequestType::Out) => &mut self.out_requests,
            Some(RequestType::Flush) => &mut self.flush_requests,
            Some(RequestType::GetId) => &mut self.get_id_requests,
            Some(RequestType::Discard) => &mut self.discard_requests,
            Some(RequestType::WriteZeroes) => &mut self.write_zeroes_requests,
            Some(RequestType::Unsupported(_)) => &mut self.unsupported_requests,
            None => &mut self.malformed_requests,
        };
        *counter += 1;
    }

    /// Counts the status a request was answered with.
    pub(super) fn count_status(&mut self, status: BlkStatus) {
        let counter = match status {
            BlkStatus::Ok => &mut self.status_ok,
            BlkStatus::Ioerr => &mut self.status_ioerr,
            BlkStatus::Unsupp => &mut self.status_unsupp,
        };
        *counter += 1;
    }
}
