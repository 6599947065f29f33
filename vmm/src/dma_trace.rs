//! `zc-vmm dma-log trace`: which guest pages the NIC read for file bytes
//! `[off, off + len)` during a method, and what put those bytes there: the disk
//! request that filled the page, or the dirty-page sample that saw the CPU write it.
//!
//! The rules are the audit's (`zc_audit::stream`): the method's connection is its
//! first bare SYN in the span, payload maps to stream (= file) offsets from the ISN,
//! `tcp_seq` and `tcp_payload_off`, and a piece is zero-copy when the page's last
//! device write before the read gave it the file page holding those bytes.
//!
//! Memory is bounded by what is traced, not by the log: two streaming passes.
//! 1. Up to the method's `END` marker: find the span and the connection, and keep
//!    only the NIC pieces (payload parts of page pieces) that overlap the range,
//!    with the chains in flight (a queue's worth at most).
//! 2. From the start again, up to the first dirty sample after the last of those
//!    reads: for just those guest pages, the last device write before each read
//!    (with the blk request of its chain, completed later in the log) and the
//!    latest dirty sample of the span that listed the page.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::io::BufRead;

use serde::Serialize;
use zc_audit::stream::{Connection, SourcePages};
use zc_dma_log::{
    DescRecord, DescRole, DeviceKind, Direction, DmaLogError, DmaLogReader, Fingerprint,
    PayloadRun, Piece, Record, RequestDetail, PAGE_SIZE,
};
use zc_protocol::Marker;

/// virtio-net's transmit queue.
const TX_QUEUE: u16 = 1;

/// What to trace.
#[derive(Debug, Clone)]
pub struct TraceQuery {
    /// The method whose span (`BEGIN`/`END` markers) is traced.
    pub method: String,
    /// First file (stream) offset.
    pub file_off: u64,
    /// Bytes.
    pub len: u64,
}

/// The answer: the span, the connection and every NIC piece of the range.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// The method.
    pub method: String,
    /// The range traced, `[file_off, file_off + len)`.
    pub file_off: u64,
    /// Bytes asked for.
    pub len: u64,
    /// `seq` of the span's `BEGIN` and `END` markers.
    pub span_seq: (u64, u64),
    /// `t_ns` of those markers.
    pub span_t_ns: (u64, u64),
    /// (guest port, peer port) of the method's connection.
    pub ports: (u16, u16),
    /// The connection's initial sequence number.
    pub isn: u32,
    /// Whether zero-copy was judged against the source file (`--source`).
    pub source_checked: bool,
    /// The NIC's reads of the range, in log order (a retransmitted byte appears
    /// once per transmission).
    pub pieces: Vec<TracedPiece>,
    /// Payload bytes of the range the NIC never sent in the span.
    pub bytes_not_sent: u64,
    /// Where the log was cut short, if the trace read that far (it stops at the
    /// first dirty sample after the range's last read): it covers what came before.
    pub cut: Option<Cut>,
}

/// Where a log stops inside a line.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cut {
    /// 1-based number of the incomplete line.
    pub line: u64,
    /// Byte offset of the log text where it starts.
    pub offset: u64,
}

/// The NIC's read of some bytes of the range, and where they came from.
#[derive(Debug, Clone, Serialize)]
pub struct TracedPiece {
    /// File (stream) offset of the first byte.
    pub file_off: u64,
    /// Bytes (within one guest page).
    pub len: u64,
    /// The read.
    pub nic: NicRead,
    /// The page's last device write before the read, if the log has one.
    pub last_write: Option<PageWrite>,
    /// The latest dirty sample of the span that listed the page as CPU-written, no
    /// later than the first sample after the read.
    pub cpu: Option<CpuWrite>,
    /// The audit's judgement: `zero_copy` (the disk put the file page there and
    /// it is unchanged), `disk_page` (the disk filled the page with the right file
    /// page at the right offset; content not checked without the source),
    /// `cpu_copy` (a page the CPU wrote), or `unexplained`.
    pub origin: Origin,
    /// The whole page piece and its stream offset, when it is all payload with a
    /// fingerprint: what the zero-copy rule judges.
    #[serde(skip)]
    whole: Option<(Piece, u64)>,
}

/// How the bytes got where the NIC read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The disk put the file page there and the NIC read it unchanged.
    ZeroCopy,
    /// The disk filled the page with the right file page at the right offset
    /// (content not checked: no source file given).
    DiskPage,
    /// The CPU wrote the page (a dirty sample lists it).
    CpuCopy,
    /// Neither: no device filled the page with these bytes and no sample saw it.
    Unexplained,
}

/// One NIC descriptor piece.
#[derive(Debug, Clone, Serialize)]
pub struct NicRead {
    /// `seq` of the `desc` record.
    pub desc_seq: u64,
    /// Its `t_ns`.
    pub t_ns: u64,
    /// The descriptor's guest-physical address and length.
    pub desc_gpa: u64,
    /// Descriptor length.
    pub desc_len: u32,
    /// Guest-physical address of the first traced byte.
    pub gpa: u64,
    /// Whether the whole page piece is payload with a fingerprint (only such a
    /// piece can be zero-copy).
    pub whole_piece: bool,
    /// `seq` of the frame's `request` record.
    pub frame_seq: u64,
    /// The frame's TCP sequence number.
    pub tcp_seq: u32,
}

/// A device's write to a guest page.
#[derive(Debug, Clone, Serialize)]
pub struct PageWrite {
    /// `seq` of the `desc` record.
    pub desc_seq: u64,
    /// Its `t_ns`.
    pub t_ns: u64,
    /// `blk` or `net`.
    pub device: DeviceKind,
    /// What the range carried.
    pub role: DescRole,
    /// The written piece's address and length.
    pub piece_gpa: u64,
    /// Piece length.
    pub piece_len: u32,
    /// The request its chain completed as (blk: op and sectors), when logged.
    pub request: Option<WriteRequest>,
    #[serde(skip)]
    hash: Fingerprint,
}

/// The blk request that filled a page.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRequest {
    /// `seq` of the `request` record.
    pub seq: u64,
    /// Its `t_ns`.
    pub t_ns: u64,
    /// `in`, `out`, ...
    pub op: String,
    /// The request's first sector.
    pub sector: u64,
    /// The sector holding the written piece's first byte.
    pub page_sector: u64,
}

/// A dirty-page sample that listed the page.
#[derive(Debug, Clone, Serialize)]
pub struct CpuWrite {
    /// The guest's sample label (chunk number; 4294967295 at `END`).
    pub sample: u32,
    /// `seq` of the `dirty` record.
    pub seq: u64,
    /// Its `t_ns`.
    pub t_ns: u64,
    /// A payload run of that sample holding these very bytes at this address, if
    /// the sample found one.
    pub run: Option<PayloadRun>,
}

/// Why there is no trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] DmaLogError),
    /// The method has no `BEGIN` marker.
    #[error("the log has no marker `BEGIN {0}`: see `zc-vmm dma-log grep mark`")]
    NoBegin(String),
    /// The method's span has no `END` marker.
    #[error("the log has `BEGIN {method}` but no `END {method}` after it{}", match cut {
        Some(c) => format!(": the log is cut short at line {} (byte {})", c.line, c.offset),
        None => " (did the method fail?)".to_string(),
    })]
    NoEnd {
        /// The method.
        method: String,
        /// Where the log was cut short, if it was.
        cut: Option<Cut>,
    },
    /// No bare SYN in the span.
    #[error("method {0} opened no TCP connection in its span (no SYN frame)")]
    NoConnection(String),
}

/// A TX chain's `data` descriptors, waiting for its request record.
/// TX chains in flight, by (device, card, queue, head).
type Pending = HashMap<(DeviceKind, u16, u16, u16), Vec<DescRecord>>;

/// Traces `query` through the log that `open` opens (twice: it is read in two
/// passes); `source`, the file the method sent, makes the zero-copy check exact.
pub fn trace<R: BufRead>(
    mut open: impl FnMut() -> Result<DmaLogReader<R>, DmaLogError>,
    query: &TraceQuery,
    source: Option<&SourcePages>,
) -> Result<Trace, TraceError> {
    let mut trace = first_pass(open()?, query)?;
    trace.source_checked = source.is_some();
    second_pass(open()?, &mut trace, source)?;
    Ok(trace)
}

/// Iterates a reader, turning its final cut into a [`Cut`] noted in `cut`.
fn records<'c, R: BufRead + 'c>(
    reader: DmaLogReader<R>,
    cut: &'c mut Option<Cut>,
) -> impl Iterator<Item = Result<Record, DmaLogError>> + 'c {
    reader.filter_map(move |item| match item {
        Err(DmaLogError::Truncated { line, offset }) => {
            *cut = Some(Cut { line, offset });
            None
        }
        other => Some(other),
    })
}

fn first_pass<R: BufRead>(
    reader: DmaLogReader<R>,
    query: &TraceQuery,
) -> Result<Trace, TraceError> {
    let (begin_marker, end_marker) = (
        Marker::begin(query.method.as_str()),
        Marker::end(query.method.as_str()),
    );
    let (want_start, want_end) = (query.file_off, query.file_off.saturating_add(query.len));
    let mut cut = None;
    let mut begin: Option<(u64, u64)> = None;
    let mut end: Option<(u64, u64)> = None;
    let mut conn: Option<Connection> = None;
    let mut conn_card = 0;
    let mut pending = Pending::new();
    let mut pieces = Vec::new();
    for record in records(reader, &mut cut) {
        let record = record?;
        match &record {
            Record::Marker(m) if begin.is_none() && begin_marker.matches(&m.label) => {
                begin = Some((m.seq, m.t_ns));
            }
            Record::Marker(m) if begin.is_some() && end_marker.matches(&m.label) => {
                end = Some((m.seq, m.t_ns));
                break;
            }
            Record::Desc(d)
                if d.device == DeviceKind::Net
                    && d.queue == TX_QUEUE
                    && d.role == DescRole::Data =>
            {
                pending
                    .entry((d.device, d.card, d.queue, d.head))
                    .or_default()
                    .push(d.clone());
            }
            Record::Request(r) => {
                let data = pending.remove(&(r.device, r.card, r.queue, r.head));
                let (DeviceKind::Net, TX_QUEUE, RequestDetail::Net(net), true) =
                    (r.device, r.queue, &r.req, begin.is_some())
                else {
                    continue;
                };
                let data = data.unwrap_or_default();
                let Some(conn) = conn.as_mut() else {
                    conn = Connection::from_syn(net);
                    conn_card = r.card;
                    continue;
                };
                // With several cards, the method's frames are those of the card
                // its connection opened on.
                if r.card != conn_card {
                    continue;
                }
                for pp in conn.payload(net, &data) {
                    let (s, e) = (
                        pp.stream_off.max(want_start),
                        (pp.stream_off + pp.len).min(want_end),
                    );
                    if s >= e {
                        continue;
                    }
                    let d = &data[pp.data_index];
                    pieces.push(TracedPiece {
                        file_off: s,
                        len: e - s,
                        nic: NicRead {
                            desc_seq: d.seq,
                            t_ns: d.t_ns,
                            desc_gpa: d.gpa,
                            desc_len: d.len,
                            gpa: pp.gpa + (s - pp.stream_off),
                            whole_piece: pp.whole && pp.fingerprinted,
                            frame_seq: r.seq,
                            tcp_seq: net.tcp_seq.unwrap_or_default(),
                        },
                        last_write: None,
                        cpu: None,
                        origin: Origin::Unexplained,
                        whole: (pp.whole && pp.fingerprinted)
                            .then(|| (pp.piece.clone(), pp.stream_off)),
                    });
                }
            }
            _ => {}
        }
    }
    let Some(begin) = begin else {
        return Err(TraceError::NoBegin(query.method.clone()));
    };
    let Some(end) = end else {
        return Err(TraceError::NoEnd {
            method: query.method.clone(),
            cut,
        });
    };
    let Some(conn) = conn else {
        return Err(TraceError::NoConnection(query.method.clone()));
    };
    Ok(Trace {
        method: query.method.clone(),
        file_off: query.file_off,
        len: query.len,
        span_seq: (begin.0, end.0),
        span_t_ns: (begin.1, end.1),
        ports: conn.ports,
        isn: conn.isn,
        source_checked: false,
        bytes_not_sent: 0,
        pieces,
        cut,
    })
}

/// A blk chain in flight: data bytes so far, and the arena writes to pages of
/// interest with their offset in the chain's data.
#[derive(Default)]
struct BlkChain {
    data_bytes: u64,
    writes: Vec<(usize, u64)>,
}

/// A dirty sample that listed a page of interest.
#[derive(Clone)]
struct Sample {
    sample: u32,
    seq: u64,
    t_ns: u64,
    /// The sample's runs on that page.
    runs: Vec<PayloadRun>,
}

fn second_pass<R: BufRead>(
    reader: DmaLogReader<R>,
    trace: &mut Trace,
    source: Option<&SourcePages>,
) -> Result<(), TraceError> {
    let page_of = |p: &TracedPiece| p.nic.gpa / PAGE_SIZE;
    let pages: HashSet<u64> = trace.pieces.iter().map(page_of).collect();
    let mut by_read: Vec<usize> = (0..trace.pieces.len()).collect();
    by_read.sort_by_key(|&i| trace.pieces[i].nic.desc_seq);
    let mut next_read = by_read.iter().peekable();
    // Per piece: the arena index of its page's last write before the read.
    let mut write_of: Vec<Option<usize>> = vec![None; trace.pieces.len()];
    let mut writes: Vec<PageWrite> = Vec::new();
    let mut last_write: HashMap<u64, usize> = HashMap::new();
    let mut chains: HashMap<(u16, u16), BlkChain> = HashMap::new();
    let mut sampled: HashMap<u64, Sample> = HashMap::new();
    let mut awaiting_sample: Vec<usize> = Vec::new();
    let mut cut = None;
    for record in records(reader, &mut cut) {
        let record = record?;
        while let Some(&&i) = next_read.peek() {
            if trace.pieces[i].nic.desc_seq > record.seq().unwrap_or(0) {
                break;
            }
            next_read.next();
            write_of[i] = last_write.get(&page_of(&trace.pieces[i])).copied();
            awaiting_sample.push(i);
        }
        match &record {
            Record::Desc(d) if d.dir == Direction::DeviceWrites => {
                let blk_data = d.device == DeviceKind::Blk && d.role == DescRole::Data;
                let chain_off = if blk_data {
                    chains.entry((d.queue, d.head)).or_default().data_bytes
                } else {
                    0
                };
                for p in &d.pieces {
                    let page = p.gpa / PAGE_SIZE;
                    if !pages.contains(&page) {
                        continue;
                    }
                    last_write.insert(page, writes.len());
                    if blk_data {
                        chains
                            .entry((d.queue, d.head))
                            .or_default()
                            .writes
                            .push((writes.len(), chain_off + (p.gpa - d.gpa)));
                    }
                    writes.push(PageWrite {
                        desc_seq: d.seq,
                        t_ns: d.t_ns,
                        device: d.device,
                        role: d.role,
                        piece_gpa: p.gpa,
                        piece_len: p.len,
                        request: None,
                        hash: p.hash,
                    });
                }
                if blk_data {
                    chains.entry((d.queue, d.head)).or_default().data_bytes += u64::from(d.len);
                }
            }
            Record::Request(r) if r.device == DeviceKind::Blk => {
                let (Some(chain), RequestDetail::Blk(b)) =
                    (chains.remove(&(r.queue, r.head)), &r.req)
                else {
                    continue;
                };
                for (w, data_off) in chain.writes {
                    writes[w].request = Some(WriteRequest {
                        seq: r.seq,
                        t_ns: r.t_ns,
                        op: b.op.clone(),
                        sector: b.sector,
                        page_sector: b.sector + data_off / 512,
                    });
                }
            }
            Record::Dirty(dr) if dr.seq > trace.span_seq.0 => {
                for &page in &pages {
                    if dr.dirtied.binary_search(&page).is_ok() {
                        let runs = dr
                            .runs
                            .iter()
                            .filter(|run| run.gpa / PAGE_SIZE == page)
                            .copied()
                            .collect();
                        sampled.insert(
                            page,
                            Sample {
                                sample: dr.sample,
                                seq: dr.seq,
                                t_ns: dr.t_ns,
                                runs,
                            },
                        );
                    }
                }
                for i in awaiting_sample.drain(..) {
                    trace.pieces[i].cpu = sampled
                        .get(&page_of(&trace.pieces[i]))
                        .map(|s| cpu_write(s, &trace.pieces[i]));
                }
                if next_read.peek().is_none() {
                    break;
                }
            }
            _ => {}
        }
    }
    // A log that ends (or is cut) before the sample after the last reads.
    for i in awaiting_sample {
        trace.pieces[i].cpu = sampled
            .get(&page_of(&trace.pieces[i]))
            .map(|s| cpu_write(s, &trace.pieces[i]));
    }
    if trace.cut.is_none() {
        trace.cut = cut;
    }
    for (piece, w) in trace.pieces.iter_mut().zip(write_of) {
        piece.last_write = w.map(|w| writes[w].clone());
        piece.origin = origin(piece, source);
    }
    trace.bytes_not_sent = not_sent(trace);
    Ok(())
}

/// What the sample says about the piece's bytes: a run with these very file bytes
/// at this address, if it found one.
fn cpu_write(sample: &Sample, piece: &TracedPiece) -> CpuWrite {
    let placement = piece.nic.gpa.wrapping_sub(piece.file_off);
    let run = sample.runs.iter().copied().find(|run| {
        run.gpa.wrapping_sub(run.file_off) == placement
            && run.gpa < piece.nic.gpa + piece.len
            && run.gpa + u64::from(run.len) > piece.nic.gpa
    });
    CpuWrite {
        sample: sample.sample,
        seq: sample.seq,
        t_ns: sample.t_ns,
        run,
    }
}

fn origin(piece: &TracedPiece, source: Option<&SourcePages>) -> Origin {
    let disk_filled = piece.last_write.as_ref().filter(|w| {
        w.device == DeviceKind::Blk
            && w.role == DescRole::Data
            && u64::from(w.piece_len) == PAGE_SIZE
    });
    match (source, &piece.whole, disk_filled) {
        (Some(source), Some((p, stream)), Some(w)) => {
            let written = source.file_page_written(&Piece {
                gpa: w.piece_gpa,
                len: w.piece_len,
                hash: w.hash,
            });
            if source.zero_copy(p, *stream, written) {
                return Origin::ZeroCopy;
            }
        }
        (None, Some(_), Some(_)) if piece.nic.gpa % PAGE_SIZE == piece.file_off % PAGE_SIZE => {
            return Origin::DiskPage;
        }
        _ => {}
    }
    if piece.cpu.is_some() {
        Origin::CpuCopy
    } else {
        Origin::Unexplained
    }
}

/// Bytes of the range no traced piece covers.
fn not_sent(trace: &Trace) -> u64 {
    let mut spans: Vec<(u64, u64)> = trace
        .pieces
        .iter()
        .map(|p| (p.file_off, p.file_off + p.len))
        .collect();
    spans.sort_unstable();
    let (mut covered, mut reach) = (0, trace.file_off);
    for (s, e) in spans {
        let s = s.max(reach);
        if e > s {
            covered += e - s;
            reach = e;
        }
    }
    trace.len - covered
}

fn ms(t_ns: u64) -> f64 {
    t_ns as f64 / 1e6
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: file bytes {}..{} ({} bytes); span seq {}..{} ({:.3}..{:.3} ms); connection {}>{} ISN {}",
            self.method,
            self.file_off,
            self.file_off + self.len,
            self.len,
            self.span_seq.0,
            self.span_seq.1,
            ms(self.span_t_ns.0),
            ms(self.span_t_ns.1),
            self.ports.0,
            self.ports.1,
            self.isn
        )?;
        let total = |o: Origin| -> u64 {
            self.pieces
                .iter()
                .filter(|p| p.origin == o)
                .map(|p| p.len)
                .sum()
        };
        writeln!(
            f,
            "{} NIC pieces: zero-copy {} B, disk page (content unchecked) {} B, CPU copy {} B, unexplained {} B; not sent {} B{}",
            self.pieces.len(),
            total(Origin::ZeroCopy),
            total(Origin::DiskPage),
            total(Origin::CpuCopy),
            total(Origin::Unexplained),
            self.bytes_not_sent,
            if self.source_checked { "" } else { " (pass --source FILE to check content)" }
        )?;
        for p in &self.pieces {
            let n = &p.nic;
            writeln!(
                f,
                "file {}..{} ({} B)  NIC read gpa {:#x} (desc {:#x}+{}) seq {} frame seq {} tcp_seq {} at {:.3} ms",
                p.file_off,
                p.file_off + p.len,
                p.len,
                n.gpa,
                n.desc_gpa,
                n.desc_len,
                n.desc_seq,
                n.frame_seq,
                n.tcp_seq,
                ms(n.t_ns)
            )?;
            let mut from = String::new();
            match &p.last_write {
                Some(w) => {
                    let _ = write!(
                        from,
                        "    <- page last written by {} {} (piece {:#x}+{}) seq {} at {:.3} ms",
                        match w.device {
                            DeviceKind::Blk => "blk",
                            DeviceKind::Net => "net",
                        },
                        match w.role {
                            DescRole::Header => "header",
                            DescRole::Data => "data",
                            DescRole::Status => "status",
                        },
                        w.piece_gpa,
                        w.piece_len,
                        w.desc_seq,
                        ms(w.t_ns)
                    );
                    if let Some(r) = &w.request {
                        let _ = write!(
                            from,
                            ": request {} sector {} (page at sector {}) seq {} at {:.3} ms",
                            r.op,
                            r.sector,
                            r.page_sector,
                            r.seq,
                            ms(r.t_ns)
                        );
                    }
                }
                None => from.push_str("    <- no device wrote this page before the read"),
            }
            writeln!(f, "{from}")?;
            // A page the disk filled may also be listed CPU-dirtied (zeroed on
            // allocation before the disk filled it): the audit does not count that
            // as a copy, so the text leaves it out (the JSON has it).
            let disk = matches!(p.origin, Origin::ZeroCopy | Origin::DiskPage);
            if let Some(c) = p.cpu.as_ref().filter(|_| !disk) {
                write!(
                    f,
                    "    <- CPU: dirty sample {} (seq {} at {:.3} ms) lists the page",
                    c.sample,
                    c.seq,
                    ms(c.t_ns)
                )?;
                match &c.run {
                    Some(r) => writeln!(
                        f,
                        " and found file bytes {}..{} at gpa {:#x}",
                        r.file_off,
                        r.file_off + u64::from(r.len),
                        r.gpa
                    )?,
                    None => writeln!(f)?,
                }
            }
            writeln!(
                f,
                "    = {}",
                match p.origin {
                    Origin::ZeroCopy => "zero-copy: the disk put these bytes here, unchanged",
                    Origin::DiskPage =>
                        "disk page: the disk put this file page here (content unchecked)",
                    Origin::CpuCopy => "CPU copy: the CPU wrote this page",
                    Origin::Unexplained => "unexplained: no device or sample put these bytes here",
                }
            )?;
        }
        if let Some(cut) = &self.cut {
            write!(
                f,
                "the log is cut short at line {} (byte {}): the trace covers the records before it",
                cut.line, cut.offset
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use zc_audit::{audit, AuditInput, Expectations};

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../audit/tests/data")
            .join(name)
    }

    fn source() -> Vec<u8> {
        std::fs::read(data("source.bin")).unwrap()
    }

    fn trace_file(
        log: &Path,
        method: &str,
        file_off: u64,
        len: u64,
        source: Option<&SourcePages>,
    ) -> Result<Trace, TraceError> {
        let query = TraceQuery {
            method: method.into(),
            file_off,
            len,
        };
        trace(|| DmaLogReader::open(log), &query, source)
    }

    fn bytes(t: &Trace, origin: Origin) -> u64 {
        t.pieces
            .iter()
            .filter(|p| p.origin == origin)
            .map(|p| p.len)
            .sum()
    }

    /// The audit's own NIC counts for a recorded scenario.
    fn audited(name: &str, variant: &str) -> zc_audit::MethodAudit {
        let expected = Expectations::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../audit/expected.toml"),
        )
        .unwrap();
        let input = AuditInput {
            records: zc_dma_log::read_log(&data(&format!("{name}.dma.jsonl"))).unwrap(),
            source: source(),
            reports: Vec::new(),
            variant: variant.into(),
            card: None,
            kernel_release: None,
        };
        audit(&input, &expected).remove(0)
    }

    #[test]
    fn a_whole_sendfile_traces_to_the_disk_requests_and_agrees_with_the_audit() {
        let src = source();
        let pages = SourcePages::new(&src);
        let log = data("sendfile_sg_on.dma.jsonl");
        let t = trace_file(&log, "sendfile", 0, src.len() as u64, Some(&pages)).unwrap();
        let a = audited("sendfile_sg_on", "sg-on");
        let traced: u64 = t.pieces.iter().map(|p| p.len).sum();
        assert_eq!(traced, a.nic_payload_bytes);
        assert_eq!(bytes(&t, Origin::ZeroCopy), a.nic_zero_copy_bytes);
        assert_eq!(bytes(&t, Origin::ZeroCopy), src.len() as u64);
        assert_eq!(t.bytes_not_sent, 0);
        assert!(t.cut.is_none());
        // The simulated disk holds the file from sector 0: each page's sector is its
        // file offset / 512, and the disk's requests are where it came from.
        for p in &t.pieces {
            let w = p.last_write.as_ref().expect("a disk write");
            let r = w.request.as_ref().expect("its request");
            assert_eq!(r.op, "in");
            assert_eq!(r.page_sector * 512, p.file_off / PAGE_SIZE * PAGE_SIZE);
            assert!(w.desc_seq < r.seq && r.seq < p.nic.desc_seq);
            assert!(p.nic.frame_seq > p.nic.desc_seq);
        }
        // Without the source the same pages are named, content unchecked.
        let unchecked = trace_file(&log, "sendfile", 0, src.len() as u64, None).unwrap();
        assert_eq!(bytes(&unchecked, Origin::DiskPage), src.len() as u64);
        assert!(unchecked.to_string().contains("--source"));
    }

    #[test]
    fn a_part_of_a_page_is_cut_to_the_range_asked() {
        let src = source();
        let pages = SourcePages::new(&src);
        let log = data("sendfile_sg_on.dma.jsonl");
        let t = trace_file(&log, "sendfile", 5000, 100, Some(&pages)).unwrap();
        assert_eq!(t.pieces.iter().map(|p| p.len).sum::<u64>(), 100);
        let first = &t.pieces[0];
        assert_eq!(first.file_off, 5000);
        assert_eq!(first.nic.gpa % PAGE_SIZE, 5000 % PAGE_SIZE);
        assert_eq!(first.origin, Origin::ZeroCopy);
        let text = t.to_string();
        assert!(text.contains("file 5000..5100"), "{text}");
        assert!(
            text.contains("request in sector 0 (page at sector 8)"),
            "{text}"
        );
    }

    #[test]
    fn read_write_payload_traces_to_cpu_written_pages() {
        let src = source();
        let pages = SourcePages::new(&src);
        let log = data("read_write.dma.jsonl");
        let t = trace_file(&log, "read_write", 0, src.len() as u64, Some(&pages)).unwrap();
        let a = audited("read_write", "sg-on");
        assert_eq!(a.nic_zero_copy_bytes, 0);
        assert_eq!(bytes(&t, Origin::ZeroCopy), 0);
        assert_eq!(bytes(&t, Origin::CpuCopy), src.len() as u64);
        let with_run = t
            .pieces
            .iter()
            .filter(|p| p.cpu.as_ref().is_some_and(|c| c.run.is_some()))
            .count();
        assert!(with_run > 0, "some sample found the bytes themselves");
        assert!(t.to_string().contains("CPU: dirty sample"));
    }

    #[test]
    fn missing_spans_and_cut_logs_say_so() {
        let log = data("sendfile_sg_on.dma.jsonl");
        assert!(matches!(
            trace_file(&log, "splice", 0, 1, None),
            Err(TraceError::NoBegin(_))
        ));
        let text = std::fs::read(&log).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Cut in the middle of a line of the span: no END, and where the cut is.
        let cut = dir.path().join("cut.jsonl");
        let cut_at = text.len() / 2;
        std::fs::write(&cut, &text[..cut_at]).unwrap();
        let line_start = text[..cut_at].iter().rposition(|&b| b == b'\n').unwrap() + 1;
        let lines_before = text[..line_start].iter().filter(|&&b| b == b'\n').count();
        let err = trace_file(&cut, "sendfile", 0, 4096, None).unwrap_err();
        match &err {
            TraceError::NoEnd { cut: Some(c), .. } => {
                assert_eq!(c.line, lines_before as u64 + 1);
                assert_eq!(c.offset, line_start as u64);
            }
            other => panic!("expected a cut span, got {other:?}"),
        }
        assert!(err.to_string().contains("cut short at line"), "{err}");
        // A compressed copy traces the same.
        let packed = dir.path().join("log.jsonl.zst");
        std::fs::write(&packed, zstd_of(&text)).unwrap();
        let z = trace_file(&packed, "sendfile", 0, 32768, None).unwrap();
        let plain = trace_file(&log, "sendfile", 0, 32768, None).unwrap();
        assert_eq!(
            serde_json::to_string(&z).unwrap(),
            serde_json::to_string(&plain).unwrap()
        );
    }

    fn zstd_of(bytes: &[u8]) -> Vec<u8> {
        zstd::encode_all(bytes, 1).unwrap()
    }
}
