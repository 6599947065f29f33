//! The `request` detail of a frame: its one-line summary (the schema's, from
//! `zc_dma_log::frame`) with the direction's prefix and suffix.

use crate::dma_log::frame::summarize;
use crate::dma_log::RequestDetail;

/// The request detail of a TX frame (on the log's writer thread: formatting the
/// summary costs more than the rest of a frame's logging).
pub(super) fn tx_detail(frame: &[u8], _: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("tx ", ""))
}

/// The request detail of an RX frame delivered in `nbufs` buffers.
pub(super) fn rx_detail(frame: &[u8], nbufs: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("rx ", &format!(" buffers={nbufs}")))
}
