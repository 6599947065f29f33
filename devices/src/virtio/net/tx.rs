//! The transmit path: a TX chain is gathered (header, then the frame, across any
//! number of descriptors), checked, its partial checksum completed, and the frame
//! handed to the backend.

use std::time::Instant;

use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};

use super::summary::tx_detail;
use super::{Host, NetBackend, MAX_FRAME_LEN, NET_HDR_LEN};
use crate::dma_log::{FramePatch, NetRequest, RequestDetail};
use crate::virtio::chain::{GuestChain, Roles};

impl<B: NetBackend> Host<B> {
    /// Handles one TX chain. `Ok(())` when the chain can be completed (the frame was
    /// sent or dropped with a logged error); `Err(what)` for NEEDS_RESET.
    pub(super) fn handle_tx_chain(
        &mut self,
        chain: &GuestChain,
        now: Instant,
    ) -> Result<(), String> {
        for d in chain.descriptors() {
            if d.writable {
                return Err(format!(
                    "device-writable descriptor {} in a TX chain",
                    d.index
                ));
            }
            chain.check(d).map_err(|e| e.to_string())?;
        }
        if let Err(e) = chain.check_length() {
            self.drop_tx(chain, &e.to_string());
            return Ok(());
        }
        let bufs = chain.all();
        let total =
            usize::try_from(bufs.len()).expect("walk_chain refuses chains of 4 GiB or more");
        if total < NET_HDR_LEN {
            return Err(format!(
                "TX header too short: {total} bytes, need {NET_HDR_LEN}"
            ));
        }
        self.stats.tx_descriptors += chain.descriptors().len() as u64;
        if total - NET_HDR_LEN > MAX_FRAME_LEN {
            self.drop_tx(
                chain,
                &format!(
                    "TX frame of {} bytes exceeds {MAX_FRAME_LEN}",
                    total - NET_HDR_LEN
                ),
            );
            return Ok(());
        }

        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.resize(total, 0);
        // Logged as read, before the checksum is completed: the fingerprints are of
        // guest memory.
        bufs.read(&mut buf, Roles::header_then_data(NET_HDR_LEN))
            .map_err(|e| format!("reading {e}"))?;
        let hdr = NetHdr::parse(&buf[..NET_HDR_LEN]);
        let frame = &mut buf[NET_HDR_LEN..];
        let verdict = if frame.is_empty() {
            Err("empty TX frame (header only)".to_string())
        } else if u32::from(hdr.gso_type) != VIRTIO_NET_HDR_GSO_NONE {
            Err(format!(
                "TX gso_type {} but no segmentation offload was offered",
                hdr.gso_type
            ))
        } else if u32::from(hdr.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            // Completed even if CSUM was not negotiated: harmless, and the frame is
            // then still valid on the wire.
            complete_checksum(frame, hdr.csum_start, hdr.csum_offset).map(|field| {
                self.stats.csum_completed += 1;
                Some(FramePatch {
                    at: field,
                    bytes: [frame[field], frame[field + 1]],
                })
            })
        } else {
            Ok(None)
        };
        match verdict {
            Ok(patch) => {
                let frame = &buf[NET_HDR_LEN..];
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += frame.len() as u64;
                self.capture(frame);
                self.backend.send(frame, now);
                // The summary is of the frame as sent: the copy the read above
                // logged, with the checksum just completed.
                chain.log_request_from_read(NET_HDR_LEN, frame, patch, 0, tx_detail);
            }
            Err(what) => self.drop_tx(chain, &what),
        }
        self.scratch = buf;
        Ok(())
    }

    fn drop_tx(&mut self, chain: &GuestChain, what: &str) {
        self.stats.tx_dropped += 1;
        chain.log_error(what, false);
        chain.log_request_with(|| {
            RequestDetail::Net(NetRequest {
                summary: format!("tx dropped: {what}"),
                tcp_seq: None,
                tcp_len: None,
                tcp_flags: None,
                tcp_payload_off: None,
                tcp_ports: None,
            })
        });
    }
}

/// The fields of `virtio_net_hdr_v1` the device uses.
#[derive(Debug, Clone, Copy)]
struct NetHdr {
    flags: u8,
    gso_type: u8,
    csum_start: u16,
    csum_offset: u16,
}

impl NetHdr {
    fn parse(b: &[u8]) -> Self {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            csum_start: le16(6),
            csum_offset: le16(8),
        }
    }
}

/// Completes a partial checksum (virtio 1.2, 5.1.6.2): the Internet checksum of
/// `frame[csum_start..]` is stored at `csum_start + csum_offset`. The field holds the
/// driver's pseudo-header sum on entry, which is how it gets folded in. Returns the
/// offset of the field.
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<usize, String> {
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if start >= frame.len() || field + 2 > frame.len() {
        return Err(format!(
            "TX NEEDS_CSUM with csum_start {csum_start} + csum_offset {csum_offset} outside the {}-byte frame",
            frame.len()
        ));
    }
    // smoltcp's RFC 1071 sum (already the peer's) adds native-endian words and
    // swaps once at the end, which the compiler vectorises: a quarter of the
    // instructions of summing big-endian 16-bit words one by one, the largest
    // cost of an sg-on frame on the device thread (`docs/dma-log.md`).
    let sum = !smoltcp::wire::checksum::data(&frame[start..]);
    // RFC 768/793 transmit 0 as all ones only for UDP; for TCP 0 is fine, and Linux
    // devices store the folded value unchanged.
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(field)
}
