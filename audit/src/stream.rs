//! The audit's rules for one frame and one guest page, exposed so that a tool
//! following a few bytes through a log (`zc-vmm dma-log trace`) applies exactly the
//! rules the verdicts come from: which connection is a method's, which frame bytes
//! are payload at which stream (= file) offset, and when a piece the NIC read is
//! zero-copy. The audit's own pass ([`crate::audit`]) is built on these. A send
//! method's connection is the guest's, from its SYN; a receive method's is the
//! peer's side of it, from the peer's SYN-ACK ([`Connection::from_syn_ack`]): the
//! same mapping of frame bytes to stream offsets, applied to the RX frames.

use zc_dma_log::{fingerprint, DescRecord, Fingerprint, NetRequest, Piece, PAGE_BYTES, PAGE_SIZE};

/// Whether an RX frame is the SYN-ACK the peer's port `peer_port` answered a SYN
/// with (`S` and `A`, with ports and a sequence number).
pub fn is_syn_ack_from(net: &NetRequest, peer_port: u16) -> bool {
    net.tcp_flags
        .as_deref()
        .is_some_and(|fl| fl.contains('S') && fl.contains('A'))
        && net.tcp_ports.is_some_and(|(from, _)| from == peer_port)
        && net.tcp_seq.is_some()
}

/// Whether a TX frame is a bare SYN (`S` without `A`) with ports and a sequence
/// number: the guest is the client, so this opens a method's connection.
pub fn is_bare_syn(net: &NetRequest) -> bool {
    net.tcp_flags
        .as_deref()
        .is_some_and(|fl| fl.contains('S') && !fl.contains('A'))
        && net.tcp_ports.is_some()
        && net.tcp_seq.is_some()
}

/// The guest's TCP connection of one method, from its SYN: maps each later frame's
/// payload to stream offsets (stream offset = file offset).
#[derive(Debug, Clone)]
pub struct Connection {
    /// (guest port, peer port).
    pub ports: (u16, u16),
    /// The SYN's sequence number.
    pub isn: u32,
    unwrap: Unwrap,
}

/// Payload bytes of one frame inside one page piece of one of its `data`
/// descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadPiece {
    /// Which of the frame's `data` descriptors (index in the order given).
    pub data_index: usize,
    /// The page piece holding the bytes, as logged (hash 0 if the descriptor has
    /// none: its bytes could not be read).
    pub piece: Piece,
    /// Whether the descriptor had pieces (its bytes could be fingerprinted).
    pub fingerprinted: bool,
    /// Whether the whole piece is payload (no header bytes in it): only such a
    /// piece can be zero-copy.
    pub whole: bool,
    /// Guest-physical address of the first payload byte.
    pub gpa: u64,
    /// Payload bytes.
    pub len: u64,
    /// Stream offset of the first payload byte.
    pub stream_off: u64,
}

impl Connection {
    /// The connection a bare SYN opens ([`is_bare_syn`]), or `None`.
    pub fn from_syn(net: &NetRequest) -> Option<Self> {
        if !is_bare_syn(net) {
            return None;
        }
        Some(Connection {
            ports: net.tcp_ports?,
            isn: net.tcp_seq?,
            unwrap: Unwrap::default(),
        })
    }

    /// The peer's side of a connection the guest opened to `peer_port`, from the
    /// peer's SYN-ACK ([`is_syn_ack_from`]), or `None`: its [`Connection::payload`]
    /// maps the RX frames the peer sent on it (`ports` is then (peer port, guest
    /// port), as those frames carry them; `isn` the peer's).
    pub fn from_syn_ack(net: &NetRequest, peer_port: u16) -> Option<Self> {
        if !is_syn_ack_from(net, peer_port) {
            return None;
        }
        Some(Connection {
            ports: net.tcp_ports?,
            isn: net.tcp_seq?,
            unwrap: Unwrap::default(),
        })
    }

    /// The payload of one frame (TX for a send, RX for a receive), given its `data` descriptor records in chain
    /// order (they make up the frame from offset 0): empty for another
    /// connection's frame or one without payload. Bytes at frame offsets
    /// `[tcp_payload_off, tcp_payload_off + tcp_len)` are payload (Ethernet padding
    /// is not), at stream offset `tcp_seq - isn - 1 + (frame_off - tcp_payload_off)`,
    /// unwrapped to 64 bits against the previous frame. Call it for every frame of
    /// the connection in log order (the unwrapping follows them).
    pub fn payload<'d>(
        &mut self,
        net: &NetRequest,
        data: impl IntoIterator<Item = &'d DescRecord>,
    ) -> Vec<PayloadPiece> {
        let mut out = Vec::new();
        if net.tcp_ports != Some(self.ports) {
            return out;
        }
        let (Some(seq), Some(tcp_len), Some(po)) = (net.tcp_seq, net.tcp_len, net.tcp_payload_off)
        else {
            return out;
        };
        if tcp_len == 0 {
            return out;
        }
        let (po, pe) = (u64::from(po), u64::from(po) + u64::from(tcp_len));
        let first = self.unwrap.next(seq.wrapping_sub(self.isn).wrapping_sub(1));
        let mut frame_off = 0u64;
        for (data_index, d) in data.into_iter().enumerate() {
            // A descriptor whose bytes could not be read has no pieces: its payload
            // cannot be shown zero-copy, but it still moves the offsets.
            let fingerprinted = !d.pieces.is_empty();
            let unknown;
            let pieces: &[Piece] = if fingerprinted {
                &d.pieces
            } else if d.len == 0 {
                &[]
            } else {
                unknown = [Piece {
                    gpa: d.gpa,
                    len: d.len,
                    hash: Fingerprint(0),
                }];
                &unknown
            };
            for p in pieces {
                let (fs, fe) = (frame_off, frame_off + u64::from(p.len));
                frame_off = fe;
                let (os, oe) = (fs.max(po), fe.min(pe));
                if os >= oe {
                    continue;
                }
                out.push(PayloadPiece {
                    data_index,
                    piece: p.clone(),
                    fingerprinted,
                    whole: fs >= po && fe <= pe,
                    gpa: p.gpa + (os - fs),
                    len: oe - os,
                    stream_off: first + (os - po),
                });
            }
        }
        out
    }
}

/// The source file as the audit matches it: a fingerprint per 4 KiB page.
pub struct SourcePages<'a> {
    bytes: &'a [u8],
    /// fingerprint of file page i; the last, partial page is hashed zero-padded to
    /// 4 KiB, because that is what a page-cache page past EOF holds.
    page_fp: Vec<u64>,
    /// The same fingerprints, to give a blk page its content in one lookup: each
    /// to the index of the first file page that has it.
    known: std::collections::HashMap<u64, u64>,
}

impl<'a> SourcePages<'a> {
    /// Fingerprints every page of `bytes`, the file the methods sent.
    pub fn new(bytes: &'a [u8]) -> Self {
        let page_fp: Vec<u64> = bytes
            .chunks(PAGE_BYTES)
            .map(|c| {
                if c.len() == PAGE_BYTES {
                    fingerprint(c)
                } else {
                    let mut page = [0u8; PAGE_BYTES];
                    page[..c.len()].copy_from_slice(c);
                    fingerprint(&page)
                }
            })
            .collect();
        let mut known = std::collections::HashMap::new();
        for (index, fp) in (0u64..).zip(&page_fp) {
            known.entry(*fp).or_insert(index);
        }
        SourcePages {
            bytes,
            page_fp,
            known,
        }
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The fingerprint of the file page holding `file_off`.
    pub fn page_fp_at(&self, file_off: u64) -> Option<u64> {
        let index = usize::try_from(file_off / PAGE_SIZE).ok()?;
        self.page_fp.get(index).copied()
    }

    /// The fingerprint of the file bytes `[off, off + len)`.
    pub fn range_fp(&self, off: u64, len: u64) -> Option<u64> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.bytes.get(start..end).map(fingerprint)
    }

    /// The file page a virtio-blk `data` write of `piece` gave its guest page: the
    /// page's fingerprint when the piece is a whole page whose fingerprint is that
    /// of a page of the file, else `None` (the page then holds other content).
    pub fn file_page_written(&self, piece: &Piece) -> Option<u64> {
        (u64::from(piece.len) == PAGE_SIZE && self.known.contains_key(&piece.hash.0))
            .then_some(piece.hash.0)
    }

    /// The file offset of the page a whole 4 KiB `piece` holds, when its fingerprint
    /// is that of a page of the file (the first such page if the file repeats a
    /// page: the payload file's pages all differ, so there it is the only one).
    pub fn file_off_of_page(&self, piece: &Piece) -> Option<u64> {
        if u64::from(piece.len) != PAGE_SIZE {
            return None;
        }
        self.known.get(&piece.hash.0).map(|index| index * PAGE_SIZE)
    }

    /// The audit's zero-copy rule for a piece the NIC read, wholly payload, at
    /// stream offset `stream`: its page offset is the stream offset's, its
    /// fingerprint is that of the file bytes it should carry, and the page's last
    /// device write before the read (`last_write`: the file page it gave, see
    /// [`SourcePages::file_page_written`]; `None` for any other write or none) gave
    /// the page the file page holding that offset.
    pub fn zero_copy(&self, piece: &Piece, stream: u64, last_write: Option<u64>) -> bool {
        piece.gpa % PAGE_SIZE == stream % PAGE_SIZE
            && self.range_fp(stream, u64::from(piece.len)) == Some(piece.hash.0)
            && self
                .page_fp_at(stream)
                .is_some_and(|want| last_write == Some(want))
    }
}

/// Turns 32-bit stream offsets into 64-bit ones, taking each as the candidate
/// nearest to the previous one (TCP's own rule), so a transfer past 4 GiB or a
/// retransmission behind a wrap still maps to the right file offset.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unwrap {
    last: u64,
}

impl Unwrap {
    pub(crate) fn next(&mut self, off32: u32) -> u64 {
        const WRAP: u64 = 1 << 32;
        let mut v = (self.last & !(WRAP - 1)) | u64::from(off32);
        if v + WRAP / 2 < self.last {
            v += WRAP;
        } else if v > self.last + WRAP / 2 && v >= WRAP {
            v -= WRAP;
        }
        self.last = v;
        v
    }
}
