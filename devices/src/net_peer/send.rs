//! The send side: what the peer is told to send on a connection to its send port
//! ([`Offer`]), the state of one such connection as the file goes out, and the
//! record it leaves ([`Sent`]).
//!
//! The file is read straight into the free part of the socket's send ring, as room
//! frees up: nothing else holds its bytes, and at most the ring's size
//! (`SEND_TX_BUFFER`) of it is in memory at a time, whatever the file's size.

use std::fs::File;
use std::io;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use smoltcp::socket::tcp;

use super::verify::read_retrying;
use super::End;

/// What one connection to the send port gets, consumed in order: the first
/// connection accepted on that port takes the first queued offer, and so on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// A name carried into the result, e.g. the file or the transfer method.
    pub label: String,
    /// The file whose first `size` bytes are sent.
    pub source: PathBuf,
    /// Exactly how many bytes the connection carries.
    pub size: u64,
}

impl Offer {
    /// Offers the whole content of the file at `path` (its current length).
    pub fn of_file(label: impl Into<String>, path: &Path) -> io::Result<Self> {
        let size = std::fs::metadata(path)?.len();
        Ok(Offer {
            label: label.into(),
            source: path.to_owned(),
            size,
        })
    }
}

/// Why a send did not end with the guest holding every byte and saying so. When
/// several apply, the first listed here wins.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendFailure {
    /// A connection arrived on the send port with no offer queued.
    #[error("connection to the send port arrived with no file offered (the VMM must queue one per transfer)")]
    NoOffer,
    /// The file could not be opened or read, or is shorter than the offered size.
    #[error("cannot send {path}: {reason}")]
    Source {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The connection ended before the guest's TCP acknowledged every byte.
    #[error("the guest acknowledged {acked} of {size} bytes before the connection ended")]
    Undelivered {
        /// Bytes offered.
        size: u64,
        /// Bytes the guest's TCP acknowledged.
        acked: u64,
    },
    /// The guest closed without sending its 8-byte count.
    #[error("the guest never sent its 8-byte count ({received} bytes of it arrived)")]
    NoCount {
        /// Bytes of the count that arrived.
        received: usize,
    },
    /// The guest's count differs from the number of bytes sent.
    #[error("the guest counted {counted} bytes where {size} were sent")]
    WrongCount {
        /// Bytes sent.
        size: u64,
        /// What the guest said it received.
        counted: u64,
    },
    /// The guest sent more than its 8-byte count.
    #[error("the guest sent {received} bytes where only its 8-byte count was expected")]
    ExtraBytes {
        /// Bytes the guest sent in all.
        received: u64,
    },
}

/// The record of one connection to the send port, kept until the VMM takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Ordinal of the connection among the send port's, from 0.
    pub connection: u64,
    /// The guest's address and port.
    pub remote: Option<SocketAddrV4>,
    /// What was offered (`None`: nothing was queued).
    pub offer: Option<Offer>,
    /// Bytes read from the file and handed to TCP.
    pub bytes_sent: u64,
    /// Of those, bytes the guest's TCP acknowledged.
    pub bytes_acked: u64,
    /// The count the guest sent back, once all 8 bytes of it arrived.
    pub guest_count: Option<u64>,
    /// The first problem found, `None` when the guest got every byte and said so.
    pub failure: Option<SendFailure>,
    /// How the connection ended.
    pub end: End,
    /// When the connection was accepted, since the peer was created.
    pub accepted_at: Duration,
    /// When the first byte was handed to TCP, after `accepted_at`.
    pub first_byte_at: Option<Duration>,
    /// When the guest's count was complete, after `accepted_at`.
    pub count_at: Option<Duration>,
    /// First byte handed to TCP to the guest's count: the transfer time.
    pub elapsed: Duration,
}

impl Sent {
    /// `true` when the guest acknowledged every offered byte and counted them all.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    /// Bytes per second from the first byte to the guest's count, when measurable.
    pub fn throughput(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (secs > 0.0).then(|| self.bytes_acked as f64 / secs)
    }
}

/// One send-port connection as its file goes out.
pub(super) struct Outgoing {
    pub(super) id: u64,
    remote: Option<SocketAddrV4>,
    offer: Option<Offer>,
    file: Option<File>,
    source_error: Option<String>,
    bytes_sent: u64,
    bytes_acked: u64,
    /// What the guest sent: its count, then anything more (counted only).
    count: [u8; zc_protocol::ack::ACK_LEN],
    from_guest: u64,
    accepted_at: Duration,
    first_byte_at: Option<Duration>,
    count_at: Option<Duration>,
    /// Whether the peer's own FIN was asked for (no offer, or the file failed).
    shut: bool,
}

impl Outgoing {
    /// Bytes the guest's TCP acknowledged so far.
    pub(super) fn acked(&self) -> u64 {
        self.bytes_acked
    }

    /// What the connection is to carry (`None`: nothing was offered).
    pub(super) fn size(&self) -> Option<u64> {
        self.offer.as_ref().map(|o| o.size)
    }

    /// A connection accepted at `t` (time since the peer started), to carry `offer`.
    pub(super) fn new(
        id: u64,
        remote: Option<SocketAddrV4>,
        offer: Option<Offer>,
        t: Duration,
    ) -> Self {
        let mut source_error = None;
        let file = offer.as_ref().and_then(|o| match File::open(&o.source) {
            Ok(f) => Some(f),
            Err(e) => {
                source_error = Some(format!("cannot open: {e}"));
                None
            }
        });
        Outgoing {
            id,
            remote,
            offer,
            file,
            source_error,
            bytes_sent: 0,
            bytes_acked: 0,
            count: [0; zc_protocol::ack::ACK_LEN],
            from_guest: 0,
            accepted_at: t,
            first_byte_at: None,
            count_at: None,
            shut: false,
        }
    }

    /// Bytes handed to TCP so far.
    #[cfg(test)]
    pub(super) fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Gives the offer back, for a connection reset during its handshake.
    pub(super) fn into_offer(self) -> Option<Offer> {
        self.offer
    }

    /// Takes what the guest sent, received at `t`.
    pub(super) fn receive(&mut self, data: &[u8], t: Duration) {
        let have = usize::try_from(self.from_guest).unwrap_or(usize::MAX);
        if have < self.count.len() {
            let n = data.len().min(self.count.len() - have);
            self.count[have..have + n].copy_from_slice(&data[..n]);
            if have + n == self.count.len() {
                self.count_at = Some(t.saturating_sub(self.accepted_at));
            }
        }
        self.from_guest += data.len() as u64;
    }

    /// Moves the connection forward at `t`: fills the socket's send ring from the
    /// file as far as it has room, notes what the guest acknowledged, and ends the
    /// peer's sending side (FIN) when there is nothing to send at all.
    pub(super) fn pump(&mut self, socket: &mut tcp::Socket<'_>, t: Duration) {
        if socket.is_active() {
            // `send_queue` is what is in the ring and not yet acknowledged; once the
            // socket is closed or reset smoltcp may clear the ring, so the last value
            // seen while active stands.
            let in_ring = socket.send_queue() as u64;
            self.bytes_acked = self
                .bytes_acked
                .max(self.bytes_sent.saturating_sub(in_ring));
        }
        self.fill(socket, t);
        let nothing_to_send = self.offer.is_none() || self.source_error.is_some();
        // Once established: a FIN in SYN-RECEIVED would replace smoltcp's SYN-ACK.
        if !self.shut && nothing_to_send && socket.may_send() {
            // Nothing (more) will come: an end of stream tells a guest waiting for
            // the file at once, where silence would hold it to the run's timeout.
            socket.close();
            self.shut = true;
        }
    }

    fn fill(&mut self, socket: &mut tcp::Socket<'_>, t: Duration) {
        let (Some(offer), Some(file)) = (self.offer.as_ref(), self.file.as_mut()) else {
            return;
        };
        // Each ACK frees a segment or two: refilling only once a quarter of the ring
        // is free (or the rest of the file fits) makes it one `read` per quarter
        // ring rather than one per ACK, and still leaves three quarters in flight.
        let room = socket.send_capacity() - socket.send_queue();
        let left = offer.size - self.bytes_sent;
        if (room as u64) < left.min((socket.send_capacity() / 4) as u64) {
            return;
        }
        while self.source_error.is_none() && self.bytes_sent < offer.size && socket.can_send() {
            let left = offer.size - self.bytes_sent;
            // The free part of the ring may wrap: each call fills one contiguous piece.
            let read = socket.send(|room| {
                let n = room.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                match read_retrying(file, &mut room[..n]) {
                    Ok(k) => (k, Ok(k)),
                    Err(e) => (0, Err(e)),
                }
            });
            match read {
                Ok(Ok(0)) => {
                    self.source_error = Some(format!(
                        "file ends at byte {}, before the offered {} bytes",
                        self.bytes_sent, offer.size
                    ));
                }
                Ok(Ok(n)) => {
                    self.first_byte_at
                        .get_or_insert(t.saturating_sub(self.accepted_at));
                    self.bytes_sent += n as u64;
                }
                Ok(Err(e)) => {
                    self.source_error =
                        Some(format!("read failed at byte {}: {e}", self.bytes_sent));
                }
                // Not in a state to send (the guest reset meanwhile).
                Err(tcp::SendError::InvalidState) => return,
            }
        }
    }

    /// Ends the connection; the record of it.
    pub(super) fn finish(self, end: End) -> Sent {
        let guest_count = self.count_at.map(|_| zc_protocol::ack::decode(self.count));
        let failure = match &self.offer {
            None => Some(SendFailure::NoOffer),
            Some(offer) => {
                if let Some(reason) = self.source_error {
                    Some(SendFailure::Source {
                        path: offer.source.clone(),
                        reason,
                    })
                } else if self.bytes_acked < offer.size {
                    Some(SendFailure::Undelivered {
                        size: offer.size,
                        acked: self.bytes_acked,
                    })
                } else if guest_count.is_none() {
                    Some(SendFailure::NoCount {
                        received: usize::try_from(self.from_guest).unwrap_or(usize::MAX),
                    })
                } else if let Some(counted) = guest_count.filter(|&c| c != offer.size) {
                    Some(SendFailure::WrongCount {
                        size: offer.size,
                        counted,
                    })
                } else if self.from_guest > self.count.len() as u64 {
                    Some(SendFailure::ExtraBytes {
                        received: self.from_guest,
                    })
                } else {
                    None
                }
            }
        };
        let elapsed = match (self.first_byte_at, self.count_at) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => Duration::ZERO,
        };
        Sent {
            connection: self.id,
            remote: self.remote,
            offer: self.offer,
            bytes_sent: self.bytes_sent,
            bytes_acked: self.bytes_acked,
            guest_count,
            failure,
            end,
            accepted_at: self.accepted_at,
            first_byte_at: self.first_byte_at,
            count_at: self.count_at,
            elapsed,
        }
    }
}
