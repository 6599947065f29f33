//! The lines of schema `zc-dma-log/2` (`docs/dma-log.md`): how the writer (and
//! [`RecordWriter`], the converter of older logs) encodes records, and how the
//! reader turns a line back into the very [`Record`]s it was made from.
//!
//! What `/2` changes against `/1`, without losing anything a record says:
//! - a run of `desc` records of one chain with consecutive `seq`, and the chain's
//!   `request` if it comes right after them, share one `chain` line: `seq` of the
//!   later records is implied (one more each), `t_ns` is a difference from the
//!   line's;
//! - a `desc` is a tuple, and its pieces are just their fingerprints: a piece's
//!   address and length are those of the range cut at page boundaries, which
//!   follow from the range's (a piece list that is not that cut, which no device
//!   makes, is written in full);
//! - a net request's TCP fields are one tuple; a `dirty` record's page list is a
//!   list of ranges and its runs are tuples.
//!
//! Markers and device errors are written as in `/1`.

use std::borrow::Cow;
use std::io::{self, Write};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::handle::Chain;
use crate::json::{push_hash, push_str, push_u64};
use crate::{
    page_pieces, BlkRequest, BlkStatus, DescInfo, DescRecord, DescRole, DeviceErrorRecord,
    DeviceKind, Direction, DirtyRecord, Fingerprint, HeaderRecord, MarkerRecord, NetRequest,
    PayloadRun, Piece, Record, RequestDetail, RequestRecord, SCHEMA,
};

/// The chain line being written: more `desc` records of the same chain, or its
/// request, may still join it.
#[derive(Debug, Clone, Copy)]
struct Open {
    chain: Chain,
    /// The `seq` a record must have to join the line.
    next_seq: u64,
    /// The line's `t`.
    t_ns: u64,
}

/// Writes records as `/2` lines into a byte buffer, keeping the last chain line
/// open for the records that may join it. [`Encoder::close`] ends it: before any
/// other kind of line, and before the buffer is flushed to the file.
#[derive(Debug, Default)]
pub(crate) struct Encoder {
    open: Option<Open>,
}

fn device_name(d: DeviceKind) -> &'static [u8] {
    match d {
        DeviceKind::Blk => b"blk",
        DeviceKind::Net => b"net",
    }
}

fn flags(info: &DescInfo) -> &'static [u8] {
    match (info.dir, info.role, info.indirect) {
        (Direction::DeviceReads, DescRole::Header, false) => b"\"rh\"",
        (Direction::DeviceReads, DescRole::Data, false) => b"\"rd\"",
        (Direction::DeviceReads, DescRole::Status, false) => b"\"rs\"",
        (Direction::DeviceWrites, DescRole::Header, false) => b"\"wh\"",
        (Direction::DeviceWrites, DescRole::Data, false) => b"\"wd\"",
        (Direction::DeviceWrites, DescRole::Status, false) => b"\"ws\"",
        (Direction::DeviceReads, DescRole::Header, true) => b"\"rhi\"",
        (Direction::DeviceReads, DescRole::Data, true) => b"\"rdi\"",
        (Direction::DeviceReads, DescRole::Status, true) => b"\"rsi\"",
        (Direction::DeviceWrites, DescRole::Header, true) => b"\"whi\"",
        (Direction::DeviceWrites, DescRole::Data, true) => b"\"wdi\"",
        (Direction::DeviceWrites, DescRole::Status, true) => b"\"wsi\"",
    }
}

fn parse_flags(f: &str) -> Option<(Direction, DescRole, bool)> {
    let b = f.as_bytes();
    let dir = match b.first()? {
        b'r' => Direction::DeviceReads,
        b'w' => Direction::DeviceWrites,
        _ => return None,
    };
    let role = match b.get(1)? {
        b'h' => DescRole::Header,
        b'd' => DescRole::Data,
        b's' => DescRole::Status,
        _ => return None,
    };
    let indirect = match &b[2..] {
        b"" => false,
        b"i" => true,
        _ => return None,
    };
    Some((dir, role, indirect))
}

impl Encoder {
    /// Ends the open chain line, if any.
    pub(crate) fn close(&mut self, out: &mut Vec<u8>) {
        if self.open.take().is_some() {
            out.extend_from_slice(b"]}\n");
        }
    }

    /// Starts a chain line for `chain` at `seq`, `t_ns` (the open one is ended).
    fn start_line(&mut self, out: &mut Vec<u8>, chain: Chain, seq: u64, t_ns: u64) {
        self.close(out);
        out.extend_from_slice(b"{\"c\":\"");
        out.extend_from_slice(device_name(chain.device));
        if chain.card != 0 {
            push_u64(out, u64::from(chain.card));
        }
        out.push(b'/');
        push_u64(out, u64::from(chain.queue));
        out.push(b'/');
        push_u64(out, u64::from(chain.head));
        out.extend_from_slice(b"\",\"s\":");
        push_u64(out, seq);
        out.extend_from_slice(b",\"t\":");
        push_u64(out, t_ns);
    }

    /// Appends a `desc` record up to its pieces: follow with [`Encoder::hash`] for
    /// each piece of the range's page cut (or none: no fingerprints), or
    /// [`Encoder::piece`] for each of another piece list, then [`Encoder::end_desc`].
    pub(crate) fn begin_desc(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        t_ns: u64,
        card: u16,
        info: &DescInfo,
    ) {
        let chain = info.chain(card);
        match self.open {
            Some(o) if o.chain == chain && o.next_seq == seq => out.push(b','),
            _ => {
                self.start_line(out, chain, seq, t_ns);
                out.extend_from_slice(b",\"d\":[");
                self.open = Some(Open {
                    chain,
                    next_seq: seq,
                    t_ns,
                });
            }
        }
        let open = self.open.as_mut().expect("opened above");
        open.next_seq = seq.wrapping_add(1);
        out.push(b'[');
        push_u64(out, u64::from(info.desc));
        out.push(b',');
        push_u64(out, info.gpa);
        out.push(b',');
        push_u64(out, u64::from(info.len));
        out.push(b',');
        out.extend_from_slice(flags(info));
        out.push(b',');
        push_u64(out, t_ns.saturating_sub(open.t_ns));
    }

    /// Appends the fingerprint of the next piece of the range's page cut.
    pub(crate) fn hash(out: &mut Vec<u8>, hash: u64) {
        out.push(b',');
        push_hash(out, hash);
    }

    /// Appends a piece given in full (for a piece list that is not the page cut).
    pub(crate) fn piece(out: &mut Vec<u8>, p: &Piece) {
        out.extend_from_slice(b",[");
        push_u64(out, p.gpa);
        out.push(b',');
        push_u64(out, u64::from(p.len));
        out.push(b',');
        push_hash(out, p.hash.0);
        out.push(b']');
    }

    /// Ends a `desc` record begun with [`Encoder::begin_desc`].
    pub(crate) fn end_desc(out: &mut Vec<u8>) {
        out.push(b']');
    }

    /// Appends a whole `desc` record whose pieces are given.
    pub(crate) fn desc(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        t_ns: u64,
        card: u16,
        info: &DescInfo,
        pieces: &[Piece],
    ) {
        self.begin_desc(out, seq, t_ns, card, info);
        let is_page_cut = pieces
            .iter()
            .map(|p| (p.gpa, p.len))
            .eq(page_pieces(info.gpa, u64::from(info.len)));
        for p in pieces {
            if is_page_cut {
                Self::hash(out, p.hash.0);
            } else {
                Self::piece(out, p);
            }
        }
        Self::end_desc(out);
    }

    /// Appends a `request` record: it ends its chain's open line if it follows that
    /// line's last record, or gets a line of its own.
    pub(crate) fn request(
        &mut self,
        out: &mut Vec<u8>,
        seq: u64,
        t_ns: u64,
        chain: Chain,
        req: &RequestDetail,
    ) {
        let line_t = match self.open.take() {
            Some(o) if o.chain == chain && o.next_seq == seq => {
                out.push(b']');
                o.t_ns
            }
            other => {
                self.open = other;
                self.start_line(out, chain, seq, t_ns);
                t_ns
            }
        };
        out.extend_from_slice(b",\"r\":{\"dt\":");
        push_u64(out, t_ns.saturating_sub(line_t));
        match req {
            RequestDetail::Blk(b) => {
                out.extend_from_slice(b",\"op\":");
                push_str(out, &b.op);
                out.extend_from_slice(b",\"code\":");
                push_u64(out, u64::from(b.code));
                out.extend_from_slice(b",\"sector\":");
                push_u64(out, b.sector);
                out.extend_from_slice(b",\"bytes\":");
                push_u64(out, b.bytes);
                out.extend_from_slice(match b.status {
                    BlkStatus::Ok => &b",\"status\":\"ok\""[..],
                    BlkStatus::Ioerr => b",\"status\":\"ioerr\"",
                    BlkStatus::Unsupp => b",\"status\":\"unsupp\"",
                });
            }
            RequestDetail::Net(n) => net_detail(out, n),
        }
        out.extend_from_slice(b"}}\n");
    }
}

fn net_detail(out: &mut Vec<u8>, n: &NetRequest) {
    out.extend_from_slice(b",\"sum\":");
    push_str(out, &n.summary);
    if let (Some(seq), Some(len), Some(flags), Some(off), Some((src, dst))) = (
        n.tcp_seq,
        n.tcp_len,
        &n.tcp_flags,
        n.tcp_payload_off,
        n.tcp_ports,
    ) {
        out.extend_from_slice(b",\"tcp\":[");
        push_u64(out, u64::from(seq));
        out.push(b',');
        push_u64(out, u64::from(len));
        out.push(b',');
        push_str(out, flags);
        out.push(b',');
        push_u64(out, u64::from(off));
        out.push(b',');
        push_u64(out, u64::from(src));
        out.push(b',');
        push_u64(out, u64::from(dst));
        out.push(b']');
        return;
    }
    // Some but not all of them: each under its `/1` name.
    let opt = |out: &mut Vec<u8>, name: &[u8], v: Option<u32>| {
        if let Some(v) = v {
            out.extend_from_slice(name);
            push_u64(out, u64::from(v));
        }
    };
    opt(out, b",\"tcp_seq\":", n.tcp_seq);
    opt(out, b",\"tcp_len\":", n.tcp_len);
    if let Some(flags) = &n.tcp_flags {
        out.extend_from_slice(b",\"tcp_flags\":");
        push_str(out, flags);
    }
    opt(out, b",\"tcp_payload_off\":", n.tcp_payload_off);
    if let Some((src, dst)) = n.tcp_ports {
        out.extend_from_slice(b",\"tcp_ports\":[");
        push_u64(out, u64::from(src));
        out.push(b',');
        push_u64(out, u64::from(dst));
        out.push(b']');
    }
}

/// Appends a whole `dirty` line (the open chain line must be closed first).
pub(crate) fn dirty(out: &mut Vec<u8>, d: &DirtyRecord) {
    out.extend_from_slice(b"{\"type\":\"dirty\",\"seq\":");
    push_u64(out, d.seq);
    out.extend_from_slice(b",\"t_ns\":");
    push_u64(out, d.t_ns);
    out.extend_from_slice(b",\"sample\":");
    push_u64(out, u64::from(d.sample));
    out.extend_from_slice(b",\"dirty_pages\":");
    push_u64(out, u64::from(d.dirty_pages));
    let as_ranges = d.dirtied.windows(2).all(|w| w[0] < w[1])
        && d.dirtied.len() as u64 <= u64::from(d.dirty_pages).min(MAX_DIRTIED);
    if !as_ranges {
        out.extend_from_slice(b",\"dirtied\":[");
        for (i, p) in d.dirtied.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_u64(out, *p);
        }
        out.push(b']');
    } else if !d.dirtied.is_empty() {
        out.extend_from_slice(b",\"dirtied\":\"");
        let mut i = 0;
        while i < d.dirtied.len() {
            let first = d.dirtied[i];
            let mut last = first;
            while d
                .dirtied
                .get(i + 1)
                .is_some_and(|&n| Some(n) == last.checked_add(1))
            {
                i += 1;
                last = d.dirtied[i];
            }
            if out.last() != Some(&b'"') {
                out.push(b',');
            }
            push_u64(out, first);
            if last != first {
                out.push(b'-');
                push_u64(out, last);
            }
            i += 1;
        }
        out.push(b'"');
    }
    out.extend_from_slice(b",\"runs\":[");
    for (i, r) in d.runs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        push_u64(out, r.gpa);
        out.push(b',');
        push_u64(out, u64::from(r.len));
        out.push(b',');
        push_u64(out, r.file_off);
        out.push(b']');
    }
    out.extend_from_slice(b"]}\n");
}

/// Appends a record written as in `/1` (markers, device errors).
fn serde_line(out: &mut Vec<u8>, r: &Record) -> io::Result<()> {
    serde_json::to_writer(&mut *out, r).map_err(io::Error::from)?;
    out.push(b'\n');
    Ok(())
}

/// Appends a marker line (the open chain line must be closed first).
pub(crate) fn marker(out: &mut Vec<u8>, m: MarkerRecord) -> io::Result<()> {
    serde_line(out, &Record::Marker(m))
}

/// Appends a device error line (the open chain line must be closed first).
pub(crate) fn device_error(out: &mut Vec<u8>, e: DeviceErrorRecord) -> io::Result<()> {
    serde_line(out, &Record::DeviceError(e))
}

/// Writes given records as a log of schema [`SCHEMA`]: how a log of an older schema
/// is converted (`DmaLogReader` reads it, this writes it), and how tests make logs
/// of chosen records. Records must come in `seq` order, as a reader yields them.
pub struct RecordWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    enc: Encoder,
}

impl<W: Write> RecordWriter<W> {
    /// Starts a log on `out` with a header of the current schema and the given
    /// start time.
    pub fn new(out: W, start_unix_ns: u64) -> io::Result<Self> {
        let mut buf = serde_json::to_vec(&Record::Header(HeaderRecord {
            schema: SCHEMA.to_string(),
            start_unix_ns,
        }))
        .map_err(io::Error::from)?;
        buf.push(b'\n');
        Ok(RecordWriter {
            out,
            buf,
            enc: Encoder::default(),
        })
    }

    /// Appends one record. A header record is refused (the log has one).
    pub fn write(&mut self, record: &Record) -> io::Result<()> {
        let out = &mut self.buf;
        match record {
            Record::Header(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a header record inside a log",
                ))
            }
            Record::Desc(d) => {
                let info = DescInfo {
                    device: d.device,
                    queue: d.queue,
                    head: d.head,
                    desc: d.desc,
                    indirect: d.indirect,
                    gpa: d.gpa,
                    len: d.len,
                    dir: d.dir,
                    role: d.role,
                };
                self.enc.desc(out, d.seq, d.t_ns, d.card, &info, &d.pieces);
            }
            Record::Request(r) => {
                let chain = Chain {
                    device: r.device,
                    card: r.card,
                    queue: r.queue,
                    head: r.head,
                };
                self.enc.request(out, r.seq, r.t_ns, chain, &r.req);
            }
            Record::Marker(m) => {
                self.enc.close(out);
                marker(out, m.clone())?;
            }
            Record::DeviceError(e) => {
                self.enc.close(out);
                device_error(out, e.clone())?;
            }
            Record::Dirty(d) => {
                self.enc.close(out);
                dirty(out, d);
            }
        }
        if self.buf.len() >= 1 << 16 {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Ends the last line, writes everything out and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.enc.close(&mut self.buf);
        self.out.write_all(&self.buf)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

// ---- Reading ----

fn invalid(msg: impl std::fmt::Display) -> serde_json::Error {
    de::Error::custom(msg)
}

/// One element of a `desc` tuple after its fifth: a fingerprint of the page cut, or
/// a piece given in full.
enum PieceItem {
    Hash(u64),
    Full(Piece),
}

fn parse_hash<E: de::Error>(s: &str) -> Result<u64, E> {
    if s.len() != 16 {
        return Err(E::custom(format!(
            "bad fingerprint {s:?}: not 16 hex digits"
        )));
    }
    u64::from_str_radix(s, 16).map_err(|e| E::custom(format!("bad fingerprint {s:?}: {e}")))
}

impl<'de> Deserialize<'de> for PieceItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PieceItem;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a fingerprint string or a [gpa, len, fingerprint] piece")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PieceItem, E> {
                parse_hash(s).map(PieceItem::Hash)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<PieceItem, A::Error> {
                let missing = || de::Error::custom("a piece is [gpa, len, fingerprint]");
                let gpa: u64 = a.next_element()?.ok_or_else(missing)?;
                let len: u32 = a.next_element()?.ok_or_else(missing)?;
                let hash: Fingerprint = a.next_element()?.ok_or_else(missing)?;
                if a.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(missing());
                }
                Ok(PieceItem::Full(Piece { gpa, len, hash }))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `desc` tuple: `[desc, gpa, len, flags, dt, pieces...]`.
struct DescTuple {
    desc: u16,
    gpa: u64,
    len: u32,
    dir: Direction,
    role: DescRole,
    indirect: bool,
    dt: u64,
    pieces: Vec<PieceItem>,
}

impl<'de> Deserialize<'de> for DescTuple {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DescTuple;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a desc tuple [desc, gpa, len, flags, dt, fingerprints...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<DescTuple, A::Error> {
                let short =
                    || de::Error::custom("a desc tuple is [desc, gpa, len, flags, dt, ...]");
                let desc: u16 = a.next_element()?.ok_or_else(short)?;
                let gpa: u64 = a.next_element()?.ok_or_else(short)?;
                let len: u32 = a.next_element()?.ok_or_else(short)?;
                let f: Cow<'de, str> = a.next_element()?.ok_or_else(short)?;
                let (dir, role, indirect) = parse_flags(&f).ok_or_else(|| {
                    de::Error::custom(format!(
                        "bad desc flags {f:?}: r or w, then h, d or s, then optionally i"
                    ))
                })?;
                let dt: u64 = a.next_element()?.ok_or_else(short)?;
                let mut pieces = Vec::with_capacity(a.size_hint().unwrap_or(1).min(64));
                while let Some(p) = a.next_element()? {
                    pieces.push(p);
                }
                Ok(DescTuple {
                    desc,
                    gpa,
                    len,
                    dir,
                    role,
                    indirect,
                    dt,
                    pieces,
                })
            }
        }
        d.deserialize_seq(V)
    }
}

/// The TCP fields of a net request: `[seq, len, flags, payload_off, sport, dport]`.
type TcpTuple = (u32, u32, String, u32, u16, u16);

/// The `r` object of a chain line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestObject {
    dt: u64,
    op: Option<String>,
    code: Option<u32>,
    sector: Option<u64>,
    bytes: Option<u64>,
    status: Option<BlkStatus>,
    sum: Option<String>,
    tcp: Option<TcpTuple>,
    tcp_seq: Option<u32>,
    tcp_len: Option<u32>,
    tcp_flags: Option<String>,
    tcp_payload_off: Option<u32>,
    tcp_ports: Option<(u16, u16)>,
}

impl RequestObject {
    fn detail(self) -> Result<RequestDetail, serde_json::Error> {
        if let Some(op) = self.op {
            let need = |what: &str| invalid(format!("a blk request without `{what}`"));
            return Ok(RequestDetail::Blk(BlkRequest {
                op,
                code: self.code.ok_or_else(|| need("code"))?,
                sector: self.sector.ok_or_else(|| need("sector"))?,
                bytes: self.bytes.ok_or_else(|| need("bytes"))?,
                status: self.status.ok_or_else(|| need("status"))?,
            }));
        }
        let summary = self
            .sum
            .ok_or_else(|| invalid("a request has `op` (blk) or `sum` (net)"))?;
        let mut n = NetRequest {
            summary,
            tcp_seq: self.tcp_seq,
            tcp_len: self.tcp_len,
            tcp_flags: self.tcp_flags,
            tcp_payload_off: self.tcp_payload_off,
            tcp_ports: self.tcp_ports,
        };
        if let Some((seq, len, flags, off, src, dst)) = self.tcp {
            n.tcp_seq = Some(seq);
            n.tcp_len = Some(len);
            n.tcp_flags = Some(flags);
            n.tcp_payload_off = Some(off);
            n.tcp_ports = Some((src, dst));
        }
        Ok(RequestDetail::Net(n))
    }
}

/// A chain line: `{"c":"dev[card]/queue/head","s":seq,"t":t_ns,"d":[...],"r":{...}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainLine<'a> {
    #[serde(borrow)]
    c: Cow<'a, str>,
    s: u64,
    t: u64,
    #[serde(default)]
    d: Vec<DescTuple>,
    r: Option<RequestObject>,
}

fn parse_chain(c: &str) -> Option<Chain> {
    let mut parts = c.split('/');
    let first = parts.next()?;
    let (device, card) = if let Some(card) = first.strip_prefix("blk") {
        (DeviceKind::Blk, card)
    } else {
        (DeviceKind::Net, first.strip_prefix("net")?)
    };
    // Card 0 has no number, and no other card a leading zero: one spelling each.
    let card = match card.as_bytes().first() {
        None => 0,
        Some(b'1'..=b'9') => card.parse().ok()?,
        Some(_) => return None,
    };
    let queue = parts.next()?.parse().ok()?;
    let head = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Chain {
        device,
        card,
        queue,
        head,
    })
}

/// A `dirty` line of `/2`.
#[derive(Deserialize)]
struct DirtyLine {
    seq: u64,
    t_ns: u64,
    sample: u32,
    dirty_pages: u32,
    #[serde(default)]
    dirtied: Dirtied,
    runs: Vec<(u64, u32, u64)>,
}

/// A `dirty` line's page list: ranges when ascending (always, as the VMM writes
/// it), else the numbers as they are.
#[derive(Deserialize)]
#[serde(untagged)]
enum Dirtied {
    Ranges(String),
    List(Vec<u64>),
}

impl Default for Dirtied {
    fn default() -> Self {
        Dirtied::List(Vec::new())
    }
}

/// Most pages a `dirty` line's list may expand to (256 GiB of guest memory), so
/// that a short line cannot ask for gigabytes.
const MAX_DIRTIED: u64 = 1 << 26;

/// The page list of a `dirty` line (`"337,339-340"`), at most `max` pages.
fn parse_ranges(s: &str, max: u32) -> Result<Vec<u64>, serde_json::Error> {
    let mut pages = Vec::new();
    if s.is_empty() {
        return Ok(pages);
    }
    let bad = || {
        invalid(format!(
            "bad dirtied list {s:?}: ascending N or N-M, comma-separated, no more than dirty_pages"
        ))
    };
    let mut total = 0u64;
    for part in s.split(',') {
        let (first, last): (u64, u64) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?),
            None => {
                let n = part.parse().map_err(|_| bad())?;
                (n, n)
            }
        };
        if last < first || pages.last().is_some_and(|&p| p >= first) {
            return Err(bad());
        }
        total = total.saturating_add((last - first).saturating_add(1));
        if total > u64::from(max).min(MAX_DIRTIED) {
            return Err(bad());
        }
        pages.extend(first..=last);
    }
    Ok(pages)
}

/// The records of other kinds a `/2` line may hold.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OtherLine {
    Header(HeaderRecord),
    Marker(MarkerRecord),
    DeviceError(DeviceErrorRecord),
    Dirty(DirtyLine),
}

/// Parses one `/2` line into its records, appended to `into` in `seq` order.
pub(crate) fn decode_line(
    line: &[u8],
    into: &mut std::collections::VecDeque<Record>,
) -> Result<(), serde_json::Error> {
    if !line.starts_with(b"{\"c\":") {
        let rec = match serde_json::from_slice(line)? {
            OtherLine::Header(h) => Record::Header(h),
            OtherLine::Marker(m) => Record::Marker(m),
            OtherLine::DeviceError(e) => Record::DeviceError(e),
            OtherLine::Dirty(d) => Record::Dirty(DirtyRecord {
                seq: d.seq,
                t_ns: d.t_ns,
                sample: d.sample,
                dirty_pages: d.dirty_pages,
                dirtied: match d.dirtied {
                    Dirtied::Ranges(s) => parse_ranges(&s, d.dirty_pages)?,
                    Dirtied::List(l) => l,
                },
                runs: d
                    .runs
                    .into_iter()
                    .map(|(gpa, len, file_off)| PayloadRun { gpa, len, file_off })
                    .collect(),
            }),
        };
        into.push_back(rec);
        return Ok(());
    }
    let line: ChainLine = serde_json::from_slice(line)?;
    let chain = parse_chain(&line.c).ok_or_else(|| {
        invalid(format!(
            "bad chain {:?}: blk or net (then the card if not 0), queue, head, separated by /",
            line.c
        ))
    })?;
    if line.d.is_empty() && line.r.is_none() {
        return Err(invalid("a chain line with neither `d` nor `r`"));
    }
    let at = |i: usize, dt: u64| -> Result<(u64, u64), serde_json::Error> {
        let seq = u64::try_from(i)
            .ok()
            .and_then(|i| line.s.checked_add(i))
            .ok_or_else(|| invalid("seq overflows"))?;
        let t_ns = line
            .t
            .checked_add(dt)
            .ok_or_else(|| invalid("t_ns overflows"))?;
        Ok((seq, t_ns))
    };
    let n = line.d.len();
    for (i, d) in line.d.into_iter().enumerate() {
        let (seq, t_ns) = at(i, d.dt)?;
        let pieces = pieces_of_tuple(d.gpa, d.len, d.pieces)?;
        into.push_back(Record::Desc(DescRecord {
            seq,
            t_ns,
            device: chain.device,
            card: chain.card,
            queue: chain.queue,
            head: chain.head,
            desc: d.desc,
            indirect: d.indirect,
            gpa: d.gpa,
            len: d.len,
            dir: d.dir,
            role: d.role,
            pieces,
        }));
    }
    if let Some(r) = line.r {
        let (seq, t_ns) = at(n, r.dt)?;
        into.push_back(Record::Request(RequestRecord {
            seq,
            t_ns,
            device: chain.device,
            card: chain.card,
            queue: chain.queue,
            head: chain.head,
            req: r.detail()?,
        }));
    }
    Ok(())
}

/// The pieces of a `desc` tuple: its fingerprints on the page cut of `[gpa, gpa +
/// len)` (exactly one per piece of it, or none), or pieces given in full.
fn pieces_of_tuple(
    gpa: u64,
    len: u32,
    items: Vec<PieceItem>,
) -> Result<Vec<Piece>, serde_json::Error> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    if matches!(items[0], PieceItem::Full(_)) {
        return items
            .into_iter()
            .map(|p| match p {
                PieceItem::Full(p) => Ok(p),
                PieceItem::Hash(_) => Err(invalid(
                    "a desc mixes fingerprints and full pieces: give one or the other",
                )),
            })
            .collect();
    }
    let mut cut = page_pieces(gpa, u64::from(len));
    let mut pieces = Vec::with_capacity(items.len());
    for item in items {
        let PieceItem::Hash(h) = item else {
            return Err(invalid(
                "a desc mixes fingerprints and full pieces: give one or the other",
            ));
        };
        let (gpa, len) = cut
            .next()
            .ok_or_else(|| invalid("a desc has more fingerprints than pages in its range"))?;
        pieces.push(Piece {
            gpa,
            len,
            hash: Fingerprint(h),
        });
    }
    if cut.next().is_some() {
        return Err(invalid(
            "a desc has fewer fingerprints than pages in its range (one per page, or none)",
        ));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DmaLogError, DmaLogReader};

    fn desc(seq: u64, t_ns: u64, head: u16, gpa: u64, len: u32, pieces: Vec<Piece>) -> Record {
        Record::Desc(DescRecord {
            seq,
            t_ns,
            device: DeviceKind::Net,
            card: 0,
            queue: 1,
            head,
            desc: head + 1,
            indirect: seq.is_multiple_of(2),
            gpa,
            len,
            dir: Direction::DeviceReads,
            role: if seq.is_multiple_of(3) {
                DescRole::Header
            } else {
                DescRole::Data
            },
            pieces,
        })
    }

    /// The page cut of `[gpa, gpa + len)` with made-up fingerprints.
    fn cut(gpa: u64, len: u32) -> Vec<Piece> {
        page_pieces(gpa, u64::from(len))
            .map(|(gpa, len)| Piece {
                gpa,
                len,
                hash: Fingerprint(gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(len)),
            })
            .collect()
    }

    fn tcp(seq: u32) -> RequestDetail {
        RequestDetail::Net(NetRequest {
            summary: format!("tx tcp 10.0.2.15:40000>10.0.2.2:7878 seq={seq} len=1448 flags=A"),
            tcp_seq: Some(seq),
            tcp_len: Some(1448),
            tcp_flags: Some("A".into()),
            tcp_payload_off: Some(54),
            tcp_ports: Some((40000, 7878)),
        })
    }

    fn request(seq: u64, t_ns: u64, device: DeviceKind, head: u16, req: RequestDetail) -> Record {
        Record::Request(RequestRecord {
            seq,
            t_ns,
            device,
            card: 0,
            queue: 1,
            head,
            req,
        })
    }

    /// Every shape a line can take, and records that must not share one.
    fn sample() -> Vec<Record> {
        let mut r = vec![
            Record::Marker(MarkerRecord {
                seq: 0,
                t_ns: 5,
                label: "BEGIN \"x\"\n".into(),
            }),
            // A TX frame: three descs and the request, one line.
            desc(1, 10, 7, 0x1ffa, 12, cut(0x1ffa, 12)),
            desc(2, 11, 7, 0x2006, 1400, cut(0x2006, 1400)),
            desc(3, 19, 7, 0x3ff0, 1448, cut(0x3ff0, 1448)),
            request(4, 30, DeviceKind::Net, 7, tcp(u32::MAX)),
            // A desc with no fingerprints (outside guest memory) and one whose
            // pieces are not the page cut: the run goes on.
            desc(5, 31, 8, 0x5000, 8192, Vec::new()),
            desc(
                6,
                31,
                8,
                0x6000,
                100,
                vec![Piece {
                    gpa: 0x6000,
                    len: 50,
                    hash: Fingerprint(1),
                }],
            ),
            // Another chain's request: not the open line's; a line of its own.
            request(7, 40, DeviceKind::Net, 9, tcp(1)),
            // The request of chain 8 after another record: a line of its own.
            request(
                8,
                41,
                DeviceKind::Net,
                8,
                RequestDetail::Net(NetRequest {
                    summary: "tx dropped: x".into(),
                    tcp_seq: Some(3),
                    tcp_len: None,
                    tcp_flags: Some("SF".into()),
                    tcp_payload_off: None,
                    tcp_ports: Some((1, 2)),
                }),
            ),
            // A seq gap: a new line even for the same chain.
            desc(10, 50, 8, 0, 0, Vec::new()),
            desc(12, 50, 8, 0xfff, 2, cut(0xfff, 2)),
            request(
                13,
                u64::MAX,
                DeviceKind::Blk,
                8,
                RequestDetail::Blk(BlkRequest {
                    op: "malformed".into(),
                    code: u32::MAX,
                    sector: u64::MAX,
                    bytes: 0,
                    status: BlkStatus::Ioerr,
                }),
            ),
            Record::Dirty(DirtyRecord {
                seq: 14,
                t_ns: u64::MAX,
                sample: u32::MAX,
                dirty_pages: 7,
                dirtied: vec![1, 2, 3, 7, 9, 10, u64::MAX],
                runs: vec![PayloadRun {
                    gpa: 0x1000,
                    len: 4096,
                    file_off: 1 << 40,
                }],
            }),
            // Not ascending, and more pages than `dirty_pages`: kept as they are.
            Record::Dirty(DirtyRecord {
                seq: 15,
                t_ns: u64::MAX,
                sample: 0,
                dirty_pages: 1,
                dirtied: vec![5, 4, 4],
                runs: Vec::new(),
            }),
            Record::Dirty(DirtyRecord {
                seq: 16,
                t_ns: u64::MAX,
                sample: 0,
                dirty_pages: 1,
                dirtied: vec![5, 6],
                runs: Vec::new(),
            }),
            Record::Dirty(DirtyRecord {
                seq: 17,
                t_ns: u64::MAX,
                sample: 1,
                dirty_pages: 0,
                dirtied: Vec::new(),
                runs: Vec::new(),
            }),
            Record::DeviceError(DeviceErrorRecord {
                seq: 18,
                t_ns: u64::MAX,
                device: DeviceKind::Blk,
                card: 0,
                queue: 0,
                head: None,
                error: "bad".into(),
                needs_reset: true,
            }),
        ];
        // Descs left open at the end.
        r.push(desc(
            19,
            u64::MAX,
            0,
            u64::MAX - 10,
            10,
            cut(u64::MAX - 10, 10),
        ));
        r
    }

    fn v2_of(records: &[Record]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), 42).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn read(log: &[u8]) -> Vec<Record> {
        DmaLogReader::new(log)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn every_record_reads_back_as_written() {
        let records = sample();
        let log = v2_of(&records);
        let text = String::from_utf8(log.clone()).unwrap();
        assert_eq!(read(&log), records, "{text}");
        let lines: Vec<&str> = text.lines().collect();
        // The TX frame's line, from what its records say.
        let h = |i: usize, p: usize| match &records[i] {
            Record::Desc(d) => format!("\"{:016x}\"", d.pieces[p].hash.0),
            _ => unreachable!(),
        };
        assert_eq!(
            lines[2],
            format!(
                concat!(
                    r#"{{"c":"net/1/7","s":1,"t":10,"d":[[8,8186,12,"rd",0,{},{}],"#,
                    r#"[8,8198,1400,"rdi",1,{}],"#,
                    r#"[8,16368,1448,"rh",9,{},{}]],"#,
                    r#""r":{{"dt":20,"sum":"tx tcp 10.0.2.15:40000>10.0.2.2:7878 seq=4294967295 len=1448 flags=A","#,
                    r#""tcp":[4294967295,1448,"A",54,40000,7878]}}}}"#
                ),
                h(1, 0),
                h(1, 1),
                h(2, 0),
                h(3, 0),
                h(3, 1)
            )
        );
        assert_eq!(
            lines.len(),
            15,
            "header, marker, the frame, chain 8's descs, 2 lone requests, 2 descs apart (seq gap), \
             the blk request (another device), 4 dirty, the error, the last desc\n{text}"
        );
        // The same records written as /1 read the same.
        let mut v1 = serde_json::to_vec(&Record::Header(HeaderRecord {
            schema: crate::SCHEMA_V1.into(),
            start_unix_ns: 42,
        }))
        .unwrap();
        v1.push(b'\n');
        for r in &records {
            serde_json::to_writer(&mut v1, r).unwrap();
            v1.push(b'\n');
        }
        assert_eq!(read(&v1), records);
    }

    /// `rec` as a record of card `card`.
    fn on_card(mut rec: Record, card: u16) -> Record {
        match &mut rec {
            Record::Desc(d) => d.card = card,
            Record::Request(r) => r.card = card,
            Record::DeviceError(e) => e.card = card,
            _ => unreachable!("only device records have a card"),
        }
        rec
    }

    #[test]
    fn each_record_keeps_its_card() {
        let records = vec![
            desc(0, 1, 7, 0x1000, 12, cut(0x1000, 12)),
            // The same chain on card 1, right after: a line of its own, which its
            // request then joins; card 0's request gets a line of its own.
            on_card(desc(1, 2, 7, 0x2000, 12, cut(0x2000, 12)), 1),
            on_card(request(2, 3, DeviceKind::Net, 7, tcp(5)), 1),
            request(3, 4, DeviceKind::Net, 7, tcp(6)),
            Record::DeviceError(DeviceErrorRecord {
                seq: 4,
                t_ns: 5,
                device: DeviceKind::Net,
                card: 2,
                queue: 1,
                head: Some(7),
                error: "bad".into(),
                needs_reset: true,
            }),
            on_card(desc(5, 6, 7, 0x3000, 12, cut(0x3000, 12)), u16::MAX),
        ];
        let log = v2_of(&records);
        let text = String::from_utf8(log.clone()).unwrap();
        assert_eq!(read(&log), records, "{text}");
        // Each line's chain (`c`), or its type.
        let kinds: Vec<String> = text
            .lines()
            .skip(1)
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.get("c")
                    .unwrap_or(&v["type"])
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "net/1/7",
                "net1/1/7",
                "net/1/7",
                "device_error",
                "net65535/1/7"
            ],
            "{text}"
        );
        assert!(
            text.contains(r#""device":"net","card":2,"queue":1"#),
            "{text}"
        );
    }

    #[test]
    fn records_of_one_line_share_its_text_and_number() {
        let log = v2_of(&sample());
        let mut r = DmaLogReader::new(&log[..]).unwrap();
        let mut seen = Vec::new();
        while let Some(rec) = r.next() {
            seen.push((rec.unwrap().seq(), r.line_number()));
        }
        assert_eq!(
            &seen[..5],
            &[
                (Some(0), 2),
                (Some(1), 3),
                (Some(2), 3),
                (Some(3), 3),
                (Some(4), 3)
            ]
        );
    }

    fn first_error(body: &str) -> String {
        let log = format!(
            "{{\"type\":\"header\",\"schema\":\"{SCHEMA}\",\"start_unix_ns\":0}}\n{body}\n"
        );
        let mut r = DmaLogReader::new(log.as_bytes()).unwrap();
        match r.next() {
            Some(Err(e @ DmaLogError::Parse { line: 2, .. })) => e.to_string(),
            other => panic!("{body}: expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_a_reason() {
        let h = "\"0123456789abcdef\"";
        for (body, says) in [
            (format!(r#"{{"c":"net/1/7","s":1,"t":0,"d":[[0,4090,12,"rd",0,{h}]]}}"#), "fewer fingerprints"),
            (format!(r#"{{"c":"net/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h},{h}]]}}"#), "more fingerprints"),
            (format!(r#"{{"c":"net/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h},[0,12,{h}]]]}}"#), "mixes"),
            (format!(r#"{{"c":"net/1/7","s":1,"t":0,"d":[[0,0,12,"xd",0,{h}]]}}"#), "bad desc flags"),
            (r#"{"c":"net/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,"12"]]}"#.to_string(), "bad fingerprint"),
            (r#"{"c":"net/1/7","s":1,"t":0,"d":[[0,0,12,"rd"]]}"#.to_string(), "desc tuple"),
            (format!(r#"{{"c":"scsi/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"net/1/7/8","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"net0/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"net01/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"net+1/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"net65536/1/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (format!(r#"{{"c":"blk1x/0/7","s":1,"t":0,"d":[[0,0,12,"rd",0,{h}]]}}"#), "bad chain"),
            (r#"{"c":"net/1/7","s":1,"t":0}"#.to_string(), "neither"),
            (format!(r#"{{"c":"net/1/7","s":18446744073709551615,"t":0,"d":[[0,0,1,"rd",0,{h}]],"r":{{"dt":0,"sum":"x"}}}}"#), "seq overflows"),
            (format!(r#"{{"c":"net/1/7","s":1,"t":1,"d":[[0,0,1,"rd",18446744073709551615,{h}]]}}"#), "t_ns overflows"),
            (r#"{"c":"net/1/7","s":1,"t":0,"r":{"dt":0}}"#.to_string(), "`op` (blk) or `sum` (net)"),
            (r#"{"c":"blk/0/7","s":1,"t":0,"r":{"dt":0,"op":"in"}}"#.to_string(), "without `code`"),
            (r#"{"type":"dirty","seq":1,"t_ns":0,"sample":0,"dirty_pages":2,"dirtied":"1-3","runs":[]}"#.to_string(), "bad dirtied"),
            (r#"{"type":"dirty","seq":1,"t_ns":0,"sample":0,"dirty_pages":9,"dirtied":"3,2","runs":[]}"#.to_string(), "bad dirtied"),
            (r#"{"type":"dirty","seq":1,"t_ns":0,"sample":0,"dirty_pages":4294967295,"dirtied":"0-18446744073709551615","runs":[]}"#.to_string(), "bad dirtied"),
            (r#"{"type":"desc","seq":1}"#.to_string(), "unknown variant"),
        ] {
            let e = first_error(&body);
            assert!(e.contains(says), "{body}: {e}");
        }
    }
}
