//! Device-side evidence of one method: what the disk and the NIC moved by DMA, which
//! payload bytes the last device read zero-copy, and which payload bytes the guest
//! CPU wrote. A send method's payload goes disk -> guest memory -> NIC (the NIC's
//! reads are judged); a receive method's goes NIC -> guest memory -> scratch disk
//! (the disk's OUT reads are judged). Both share the page history, the CPU pass and
//! its deduplication. The rules are those of `docs/method-suite.md` ("What the audit
//! computes"), made precise in the comments here and in the crate documentation.

use std::collections::HashMap;

use zc_dma_log::{
    BlkStatus, DescRecord, DescRole, DeviceKind, Direction, DirtyRecord, NetRequest, Piece, Record,
    RequestDetail, PAGE_SIZE,
};
use zc_protocol::disk::{SCRATCH_DISK_CARD, TEST_DISK_CARD};
use zc_protocol::{addr::PEER_SEND_PORT, Marker, SpanName};

use crate::stream::{Connection, SourcePages as Source};

/// virtio-net's receive queue.
const RX_QUEUE: u16 = 0;
/// virtio-net's transmit queue.
const TX_QUEUE: u16 = 1;

/// What a device last wrote into a guest page (or part of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageContent {
    /// A whole file page (identified by its fingerprint), written by virtio-blk.
    File(u64),
    /// Bytes virtio-net's RX DMA wrote (a frame: headers, maybe payload). Which
    /// payload, if any, depends on the connection: see [`Placements`].
    Rx,
    /// Anything else: a partial blk write, a page that is no file page.
    Other,
}

/// One device write into one guest page: the record, the in-page byte range.
#[derive(Debug, Clone, Copy)]
struct PageWrite {
    idx: usize,
    start: u64,
    end: u64,
    content: PageContent,
}

impl PageWrite {
    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.start < e && s < self.end
    }
}

/// Per guest page, every device write to it in log order. Built once over the whole
/// log: a warm method's page cache was filled before its span, and a DMA write can
/// be logged just after a dirty sample that already saw it.
struct PageHistory(HashMap<u64, Vec<PageWrite>>);

impl PageHistory {
    fn build(records: &[Record], source: &Source) -> Self {
        let mut map: HashMap<u64, Vec<PageWrite>> = HashMap::new();
        for (idx, rec) in records.iter().enumerate() {
            let Record::Desc(d) = rec else { continue };
            if d.dir != Direction::DeviceWrites {
                continue;
            }
            for p in &d.pieces {
                let content = match (d.device, d.role, source.file_page_written(p)) {
                    (DeviceKind::Blk, DescRole::Data, Some(fp)) => PageContent::File(fp),
                    (DeviceKind::Net, _, _) if d.queue == RX_QUEUE => PageContent::Rx,
                    _ => PageContent::Other,
                };
                let start = p.gpa % PAGE_SIZE;
                map.entry(p.gpa / PAGE_SIZE).or_default().push(PageWrite {
                    idx,
                    start,
                    end: start + u64::from(p.len),
                    content,
                });
            }
        }
        PageHistory(map)
    }

    /// The last device write to `page` logged before record `idx`.
    fn last_before(&self, page: u64, idx: usize) -> Option<PageContent> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|w| w.idx < idx);
        n.checked_sub(1).map(|k| v[k].content)
    }

    /// The first device write to `page` logged after record `after` and before
    /// record `before`.
    fn first_between(&self, page: u64, after: usize, before: usize) -> Option<PageContent> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|w| w.idx <= after);
        v.get(n).filter(|w| w.idx < before).map(|w| w.content)
    }

    /// The last device write logged before record `idx` that touched bytes
    /// `[s, e)` of `page` (in-page offsets): what put the bytes there, when one
    /// write put all of them.
    fn last_over(&self, page: u64, idx: usize, s: u64, e: u64) -> Option<PageWrite> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|w| w.idx < idx);
        v[..n].iter().rev().find(|w| w.overlaps(s, e)).copied()
    }

    /// The first device write logged after record `after` and before record
    /// `before` that touched bytes `[s, e)` of `page`.
    fn first_over_between(
        &self,
        page: u64,
        after: usize,
        before: usize,
        s: u64,
        e: u64,
    ) -> Option<PageWrite> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|w| w.idx <= after);
        v[n..]
            .iter()
            .take_while(|w| w.idx < before)
            .find(|w| w.overlaps(s, e))
            .copied()
    }
}

/// One frame: its request and its `data` descriptor records in chain order.
struct Frame<'r> {
    req_idx: usize,
    /// The card that sent or received it.
    card: u16,
    net: &'r NetRequest,
    /// (record index, record) of each `data` descriptor.
    data: Vec<(usize, &'r DescRecord)>,
}

/// A descriptor chain in flight: (device, card, queue, head).
type ChainKey = (DeviceKind, u16, u16, u16);

/// Every completed frame of the log: (TX frames, RX frames).
///
/// TX: descriptor records precede their chain's request record under the same
/// (device, card, queue, head); other queues' and other cards' records (RX, blk, a
/// second NIC) may be interleaved, so they are grouped by that key rather than by
/// position. RX: a frame may fill several chains (`MRG_RXBUF`), each logged under
/// its own head, and one request closes them all with the first chain's head; a
/// card's device writes one frame at a time, so an RX frame is every RX descriptor
/// record of its card since the card's previous RX request (a dropped frame logs
/// a device error and no descriptors; an error clears what was pending anyway).
fn frames(records: &[Record]) -> (Vec<Frame<'_>>, Vec<Frame<'_>>) {
    let mut pending: HashMap<ChainKey, Vec<(usize, &DescRecord)>> = HashMap::new();
    let mut pending_rx: HashMap<u16, Vec<(usize, &DescRecord)>> = HashMap::new();
    let (mut tx, mut rx) = (Vec::new(), Vec::new());
    for (idx, rec) in records.iter().enumerate() {
        match rec {
            Record::Desc(d) if d.device == DeviceKind::Net && d.queue == RX_QUEUE => {
                pending_rx.entry(d.card).or_default().push((idx, d));
            }
            Record::Desc(d) => pending
                .entry((d.device, d.card, d.queue, d.head))
                .or_default()
                .push((idx, d)),
            Record::DeviceError(e) if e.device == DeviceKind::Net && e.queue == RX_QUEUE => {
                pending_rx.remove(&e.card);
            }
            Record::Request(r) => match (r.device, r.queue, &r.req) {
                (DeviceKind::Net, RX_QUEUE, RequestDetail::Net(net)) => rx.push(Frame {
                    req_idx: idx,
                    card: r.card,
                    net,
                    data: data_only(pending_rx.remove(&r.card).unwrap_or_default()),
                }),
                (DeviceKind::Net, TX_QUEUE, RequestDetail::Net(net)) => tx.push(Frame {
                    req_idx: idx,
                    card: r.card,
                    net,
                    data: data_only(
                        pending
                            .remove(&(r.device, r.card, r.queue, r.head))
                            .unwrap_or_default(),
                    ),
                }),
                _ => {
                    pending.remove(&(r.device, r.card, r.queue, r.head));
                }
            },
            _ => {}
        }
    }
    (tx, rx)
}

/// The `data` descriptor records of a frame's chains.
fn data_only(descs: Vec<(usize, &DescRecord)>) -> Vec<(usize, &DescRecord)> {
    descs
        .into_iter()
        .filter(|(_, d)| d.role == DescRole::Data)
        .collect()
}

/// Where the NIC's RX DMA put a receive method's payload: per RX `data` descriptor
/// record (its index), the payload runs it wrote (gpa, len, stream offset). Empty
/// for a send method, so the rules that consult it change nothing there.
#[derive(Default)]
struct Placements(HashMap<usize, Vec<(u64, u64, u64)>>);

impl Placements {
    /// The file offset of `[gpa, gpa + len)` if descriptor record `desc_idx` wrote
    /// all of it as payload.
    fn file_off(&self, desc_idx: usize, gpa: u64, len: u64) -> Option<u64> {
        self.0.get(&desc_idx)?.iter().find_map(|&(g, l, stream)| {
            (g <= gpa && gpa + len <= g + l).then(|| stream + (gpa - g))
        })
    }
}

/// Log-wide indexes shared by every method's analysis.
pub(crate) struct LogIndex<'r, 's> {
    records: &'r [Record],
    source: Source<'s>,
    history: PageHistory,
    tx: Vec<Frame<'r>>,
    rx: Vec<Frame<'r>>,
    /// Record indices of all dirty samples, in order.
    dirty: Vec<usize>,
}

impl<'r, 's> LogIndex<'r, 's> {
    pub(crate) fn new(records: &'r [Record], source: &'s [u8]) -> Self {
        let source = Source::new(source);
        let history = PageHistory::build(records, &source);
        let dirty = records
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Record::Dirty(_)))
            .map(|(i, _)| i)
            .collect();
        let (tx, rx) = frames(records);
        LogIndex {
            records,
            source,
            history,
            tx,
            rx,
            dirty,
        }
    }
    /// The first `BEGIN name` marker and the first `END name` after it, as record
    /// indices. `duplicates` counts further `BEGIN name` markers (a method run twice
    /// in one log is audited on its first run only).
    pub(crate) fn span(&self, name: &str) -> SpanLookup {
        let (begin_marker, end_marker) = (Marker::begin(name), Marker::end(name));
        let mut begins = self
            .records
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                Record::Marker(m) if begin_marker.matches(&m.label) => Some(i),
                _ => None,
            });
        let Some(begin) = begins.next() else {
            return SpanLookup::NoBegin;
        };
        let duplicates = begins.count();
        let end = self.records[begin + 1..]
            .iter()
            .position(|r| matches!(r, Record::Marker(m) if end_marker.matches(&m.label)))
            .map(|p| begin + 1 + p);
        match end {
            Some(end) => SpanLookup::Found(Span {
                begin,
                end,
                duplicates,
            }),
            None => SpanLookup::NoEnd,
        }
    }

    /// The spans of the log's `BEGIN` markers (for methods with a span but no
    /// report).
    pub(crate) fn begin_spans(&self) -> Vec<SpanName<'r>> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Marker(m) => match Marker::parse(&m.label) {
                    Some(Marker::Begin(span)) => Some(span),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    pub(crate) fn seq(&self, idx: usize) -> u64 {
        self.records[idx].seq().unwrap_or(0)
    }

    /// The index of the last record the CPU side reads: the first dirty sample after
    /// `END` (the VMM's END sample), provided no other marker comes first; else `END`.
    fn cpu_end(&self, span: &Span) -> usize {
        for (i, r) in self.records.iter().enumerate().skip(span.end + 1) {
            match r {
                Record::Dirty(_) => return i,
                Record::Marker(_) => break,
                _ => {}
            }
        }
        span.end
    }

    /// The first dirty sample after record `idx`, or `usize::MAX`.
    fn next_sample(&self, idx: usize) -> usize {
        self.dirty
            .get(self.dirty.partition_point(|&i| i <= idx))
            .copied()
            .unwrap_or(usize::MAX)
    }

    /// Analyses the records of a send method's span; `card`: only that card's
    /// frames are the method's (`None`: every card's).
    pub(crate) fn analyze(&self, span: &Span, card: Option<u16>) -> Evidence {
        let mut ev = Evidence::default();
        self.disk(span, &mut ev);
        self.nic(span, card, &mut ev);
        self.cpu(span, &Placements::default(), &mut ev);
        ev
    }

    /// Analyses the records of a receive method's span: the NIC's RX payload of the
    /// connection to the peer's send port, the scratch disk's OUT reads and FLUSH,
    /// and the CPU's writes. `card` as for [`LogIndex::analyze`].
    pub(crate) fn analyze_receive(&self, span: &Span, card: Option<u16>) -> Evidence {
        let mut ev = Evidence::default();
        let placements = self.nic_rx(span, card, &mut ev);
        self.disk_out(span, &placements, &mut ev);
        self.cpu(span, &placements, &mut ev);
        ev
    }

    fn disk(&self, span: &Span, ev: &mut Evidence) {
        for r in &self.records[span.begin + 1..span.end] {
            if let Record::Desc(d) = r {
                if d.device == DeviceKind::Blk
                    && d.dir == Direction::DeviceWrites
                    && d.role == DescRole::Data
                {
                    ev.disk_dma_bytes += u64::from(d.len);
                }
            }
        }
    }

    fn nic(&self, span: &Span, card: Option<u16>, ev: &mut Evidence) {
        let in_span: Vec<&Frame> = self
            .tx
            .iter()
            .filter(|f| f.req_idx > span.begin && f.req_idx < span.end)
            .filter(|f| card.is_none_or(|c| c == f.card))
            .collect();
        // The guest is the client: its connection starts with a bare SYN, and the
        // first one in the span is the method's (the peer address is not assumed).
        let Some(mut conn) = in_span.iter().find_map(|f| Connection::from_syn(f.net)) else {
            ev.no_syn = true;
            return;
        };
        ev.peer_port = Some(conn.ports.1);
        for f in in_span {
            for pp in conn.payload(f.net, f.data.iter().map(|&(_, d)| d)) {
                let d_idx = f.data[pp.data_index].0;
                let n = pp.len;
                ev.nic_payload_bytes += n;
                if pp.stream_off + n > self.source.len() {
                    ev.nic_beyond_source += n;
                }
                if pp.fingerprinted && pp.whole && self.zero_copy(d_idx, &pp.piece, pp.stream_off) {
                    ev.nic_zero_copy_bytes += n;
                } else if pp.fingerprinted {
                    ev.copied_reads.push((d_idx, pp.gpa, n, pp.stream_off));
                }
            }
        }
    }

    /// Whether the NIC read `p` (entirely payload, at stream offset `stream`) from
    /// where virtio-blk put that file page, with the content still intact.
    fn zero_copy(&self, desc_idx: usize, p: &Piece, stream: u64) -> bool {
        let last_write = match self.history.last_before(p.gpa / PAGE_SIZE, desc_idx) {
            Some(PageContent::File(fp)) => Some(fp),
            _ => None,
        };
        self.source.zero_copy(p, stream, last_write)
    }

    /// The receive side of the NIC: the connection is the one the peer's send port
    /// answered (its first SYN-ACK in the span, on the method's card); every payload
    /// byte the NIC wrote for it counts (retransmissions too), and where it wrote
    /// each is kept for the disk's and the CPU's rules.
    fn nic_rx(&self, span: &Span, card: Option<u16>, ev: &mut Evidence) -> Placements {
        let mut placements = Placements::default();
        let in_span: Vec<&Frame> = self
            .rx
            .iter()
            .filter(|f| f.req_idx > span.begin && f.req_idx < span.end)
            .filter(|f| card.is_none_or(|c| c == f.card))
            .collect();
        let Some(mut conn) = in_span
            .iter()
            .find_map(|f| Connection::from_syn_ack(f.net, PEER_SEND_PORT))
        else {
            ev.no_syn = true;
            return placements;
        };
        ev.peer_port = Some(conn.ports.0);
        for f in in_span {
            for pp in conn.payload(f.net, f.data.iter().map(|&(_, d)| d)) {
                ev.nic_payload_bytes += pp.len;
                if pp.stream_off + pp.len > self.source.len() {
                    ev.nic_beyond_source += pp.len;
                }
                if pp.fingerprinted {
                    placements
                        .0
                        .entry(f.data[pp.data_index].0)
                        .or_default()
                        .push((pp.gpa, pp.len, pp.stream_off));
                }
            }
        }
        placements
    }

    /// The NIC's RX write that last put the bytes `[gpa, gpa + len)` (one page)
    /// where they are before record `idx`, as payload at file offset `file_off`:
    /// its record index.
    fn rx_put(
        &self,
        placements: &Placements,
        gpa: u64,
        len: u64,
        file_off: u64,
        idx: usize,
    ) -> Option<usize> {
        let (s, e) = (gpa % PAGE_SIZE, gpa % PAGE_SIZE + len);
        let w = self.history.last_over(gpa / PAGE_SIZE, idx, s, e)?;
        (w.content == PageContent::Rx && placements.file_off(w.idx, gpa, len) == Some(file_off))
            .then_some(w.idx)
    }

    /// Whether a device put file bytes `[file_off, +len)` at `[gpa, +len)` (one
    /// page): virtio-blk, a whole file page at the same page offset; or the NIC's
    /// RX DMA, those very stream bytes at that address. Judged on the last device
    /// write before record `idx` or, when `until` is given, also on the first one
    /// after it and before `until` (a device writes guest memory before it logs, so
    /// a sample can see content whose record comes just after it).
    fn device_put(
        &self,
        placements: &Placements,
        (gpa, len, file_off): (u64, u64, u64),
        idx: usize,
        until: Option<usize>,
    ) -> bool {
        let page = gpa / PAGE_SIZE;
        if gpa % PAGE_SIZE == file_off % PAGE_SIZE {
            if let Some(fp) = self.source.page_fp_at(file_off) {
                let want = Some(PageContent::File(fp));
                if self.history.last_before(page, idx) == want
                    || until.is_some_and(|u| self.history.first_between(page, idx, u) == want)
                {
                    return true;
                }
            }
        }
        if self.rx_put(placements, gpa, len, file_off, idx).is_some() {
            return true;
        }
        let Some(until) = until else { return false };
        let (s, e) = (gpa % PAGE_SIZE, gpa % PAGE_SIZE + len);
        self.history
            .first_over_between(page, idx, until, s, e)
            .is_some_and(|w| {
                w.content == PageContent::Rx
                    && placements.file_off(w.idx, gpa, len) == Some(file_off)
            })
    }

    /// The file offset of the payload in a piece the scratch disk read: a whole
    /// page by its fingerprint (the payload file's pages all differ); a part of one
    /// where the NIC's RX DMA last put those very bytes (content checked).
    fn disk_piece_file_off(&self, placements: &Placements, p: &Piece, idx: usize) -> Option<u64> {
        if let Some(off) = self.source.file_off_of_page(p) {
            return Some(off);
        }
        let len = u64::from(p.len);
        let (s, e) = (p.gpa % PAGE_SIZE, p.gpa % PAGE_SIZE + len);
        let w = self.history.last_over(p.gpa / PAGE_SIZE, idx, s, e)?;
        if w.content != PageContent::Rx {
            return None;
        }
        let off = placements.file_off(w.idx, p.gpa, len)?;
        (self.source.range_fp(off, len) == Some(p.hash.0)).then_some(off)
    }

    /// The scratch disk in a receive span: every OUT data byte it read; of those,
    /// the payload (by content) and which file bytes it covers; the zero-copy test
    /// (the bytes are where the NIC's RX DMA put them, unchanged, and KVM saw no CPU
    /// write to the page since); FLUSH after the last OUT; and the test disk's
    /// traffic, which a receive has no use for.
    fn disk_out(&self, span: &Span, placements: &Placements, ev: &mut Evidence) {
        let mut last_out = None;
        for idx in span.begin + 1..span.end {
            match &self.records[idx] {
                Record::Desc(d) if d.device == DeviceKind::Blk && d.role == DescRole::Data => {
                    if d.card == TEST_DISK_CARD {
                        ev.test_disk_bytes += u64::from(d.len);
                    }
                    if d.card != SCRATCH_DISK_CARD {
                        continue;
                    }
                    if d.dir != Direction::DeviceReads {
                        continue;
                    }
                    ev.disk_out_bytes += u64::from(d.len);
                    for p in &d.pieces {
                        self.disk_out_piece(placements, p, idx, ev);
                    }
                }
                Record::Request(r)
                    if r.device == DeviceKind::Blk && r.card == SCRATCH_DISK_CARD =>
                {
                    let RequestDetail::Blk(b) = &r.req else {
                        continue;
                    };
                    match b.op.as_str() {
                        "out" => {
                            last_out = Some(idx);
                            if b.status != BlkStatus::Ok {
                                ev.failed_outs += 1;
                            }
                        }
                        "flush" if b.status == BlkStatus::Ok => ev.last_flush = Some(idx),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        ev.flushed = match (last_out, ev.last_flush) {
            (Some(out), Some(flush)) => flush > out,
            (None, flush) => flush.is_some(),
            (Some(_), None) => false,
        };
    }

    fn disk_out_piece(&self, placements: &Placements, p: &Piece, idx: usize, ev: &mut Evidence) {
        let Some(file_off) = self.disk_piece_file_off(placements, p, idx) else {
            return;
        };
        // A last page the file fills only in part is written whole, zero-padded.
        let len = u64::from(p.len).min(self.source.len().saturating_sub(file_off));
        if len == 0 {
            return;
        }
        ev.disk_payload_bytes += len;
        ev.disk_file_ranges.insert(file_off, file_off + len);
        let intact = self.source.range_fp(file_off, u64::from(p.len)) == Some(p.hash.0);
        let put_by_nic = intact
            .then(|| self.rx_put(placements, p.gpa, u64::from(p.len), file_off, idx))
            .flatten();
        match put_by_nic {
            Some(rx_idx) if !self.cpu_dirtied(p.gpa / PAGE_SIZE, rx_idx, idx) => {
                ev.disk_zero_copy_bytes += len;
            }
            Some(_) => {
                ev.zero_copy_but_dirtied += len;
                ev.copied_reads.push((idx, p.gpa, len, file_off));
            }
            None => ev.copied_reads.push((idx, p.gpa, len, file_off)),
        }
    }

    /// Whether KVM listed `page` CPU-written in a sample taken after record `after`
    /// and no later than the first sample after record `read` (the one that would
    /// see a write made just before the read). Per page: a CPU write to other bytes
    /// of the page counts too, so this can only deny zero-copy, never grant it.
    fn cpu_dirtied(&self, page: u64, after: usize, read: usize) -> bool {
        let last = self.next_sample(read);
        let from = self.dirty.partition_point(|&i| i <= after);
        self.dirty[from..]
            .iter()
            .take_while(|&&i| i <= last)
            .any(|&i| matches!(&self.records[i], Record::Dirty(d) if d.dirtied.contains(&page)))
    }

    /// CPU copies: the payload in pages the CPU dirtied, at each sample; plus the
    /// last hop of payload the last device (the NIC for a send, the scratch disk for
    /// a receive) read from a page no device filled with it. The CPU must have
    /// written those bytes there (only the CPU and the devices write guest memory),
    /// and KVM confirms the page was CPU-dirtied, but a buffer reused before the
    /// next sample (a frame linearised at the device edge) escapes the samples.
    /// Both feed one deduplication, so a copy seen both ways counts once. Payload a
    /// device put where it is (the disk for a send, the NIC's RX DMA for a receive:
    /// `placements`) is not a copy.
    fn cpu(&self, span: &Span, placements: &Placements, ev: &mut Evidence) {
        let last = self.cpu_end(span);
        // Where each page was first seen CPU-dirtied in the span.
        let mut first_dirty: HashMap<u64, usize> = HashMap::new();
        for idx in span.begin + 1..=last {
            if let Record::Dirty(dr) = &self.records[idx] {
                for &pfn in &dr.dirtied {
                    first_dirty.entry(pfn).or_insert(idx);
                }
            }
        }
        let reads = std::mem::take(&mut ev.copied_reads);
        let mut reads = reads.iter().peekable();
        let mut seen = Seen::default();
        for idx in span.begin + 1..=last {
            match &self.records[idx] {
                Record::Desc(d) if d.dir == Direction::DeviceWrites => {
                    // A device overwrote these bytes: whatever content was counted
                    // there is gone, so finding it again later is a new copy.
                    for p in &d.pieces {
                        seen.forget(p.gpa, u64::from(p.len));
                    }
                }
                Record::Dirty(dr) => {
                    ev.dirty_samples += 1;
                    self.dirty_sample(idx, dr, placements, &mut seen, ev);
                }
                _ => {}
            }
            while let Some(&&(d_idx, gpa, len, file_off)) = reads.peek() {
                if d_idx > idx {
                    break;
                }
                reads.next();
                // The CPU wrote the page before the device read it: the sample that
                // saw it dirty is at the latest the first one after the read. A page
                // a device filled with these very bytes is not a copy's destination
                // even if the CPU wrote into it since (bytes garbled in place are not
                // payload the CPU copied there).
                let page = gpa / PAGE_SIZE;
                if !self.device_put(placements, (gpa, len, file_off), d_idx, None)
                    && first_dirty
                        .get(&page)
                        .is_some_and(|&at| at <= self.next_sample(idx))
                {
                    let new = seen.add(gpa, len, file_off);
                    ev.cpu_copied_bytes += new;
                    ev.cpu_copied_seen_by_reader += new;
                }
            }
        }
    }

    fn dirty_sample(
        &self,
        idx: usize,
        dr: &DirtyRecord,
        placements: &Placements,
        seen: &mut Seen,
        ev: &mut Evidence,
    ) {
        let next_dirty = self.next_sample(idx);
        for run in &dr.runs {
            let placed = (run.gpa, u64::from(run.len), run.file_off);
            // init_on_alloc: the CPU zeroed a page-cache page, then the disk filled
            // it; or the driver touched an RX buffer's page the NIC filled.
            if self.device_put(placements, placed, idx, Some(next_dirty)) {
                ev.cpu_dma_destination_bytes += u64::from(run.len);
                continue;
            }
            ev.cpu_copied_bytes += seen.add(run.gpa, u64::from(run.len), run.file_off);
        }
    }
}

/// A method's span as record indices of its markers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    pub begin: usize,
    pub end: usize,
    pub duplicates: usize,
}

/// The outcome of looking for a method's markers.
pub(crate) enum SpanLookup {
    Found(Span),
    NoBegin,
    NoEnd,
}

/// Raw device-side counts of one method. The NIC's fields are the payload it read
/// (send) or wrote (receive); the scratch disk's are a receive's only.
#[derive(Debug, Default, Clone)]
pub(crate) struct Evidence {
    pub disk_dma_bytes: u64,
    pub nic_payload_bytes: u64,
    pub nic_zero_copy_bytes: u64,
    pub nic_beyond_source: u64,
    /// No connection: no bare SYN from the guest (send), no SYN-ACK from the
    /// peer's send port (receive).
    pub no_syn: bool,
    /// The peer's port of the connection.
    pub peer_port: Option<u16>,
    pub cpu_copied_bytes: u64,
    pub cpu_dma_destination_bytes: u64,
    pub dirty_samples: u64,
    /// Of `cpu_copied_bytes`, those only the last device's reads showed (see
    /// `LogIndex::cpu`).
    pub cpu_copied_seen_by_reader: u64,
    /// Receive: scratch-disk OUT data bytes.
    pub disk_out_bytes: u64,
    /// Receive: of those, payload (content of the file), rewrites included.
    pub disk_payload_bytes: u64,
    /// Receive: the file offsets that payload covers.
    pub disk_file_ranges: Ranges,
    /// Receive: of the payload, bytes read zero-copy.
    pub disk_zero_copy_bytes: u64,
    /// Receive: payload the disk read where the NIC put it, unchanged, but from a
    /// page KVM saw the CPU write meanwhile (counted as copied).
    pub zero_copy_but_dirtied: u64,
    /// Receive: scratch-disk OUT requests that did not complete OK.
    pub failed_outs: u64,
    /// Receive: the last successful FLUSH of the scratch disk in the span.
    pub last_flush: Option<usize>,
    /// Receive: a successful FLUSH came after the last OUT.
    pub flushed: bool,
    /// Receive: data bytes the test disk moved in the span.
    pub test_disk_bytes: u64,
    /// Payload the last device read from anywhere but where a device put it:
    /// (record index of the descriptor, gpa, len, file offset), in log order.
    copied_reads: Vec<(usize, u64, u64, u64)>,
}

/// Which payload bytes were already counted, per guest page: for each page, the
/// in-page ranges counted under each `gpa - file_off` (one value per content
/// placement). A byte is in at most one placement: counting new content there moves
/// it, so the older content found there again later counts again.
#[derive(Default)]
struct Seen(HashMap<u64, Vec<(u64, Ranges)>>);

impl Seen {
    /// Counts the run `[gpa, gpa + len)` holding file bytes from `file_off`; returns
    /// how many of its bytes were not already counted with this content.
    fn add(&mut self, gpa: u64, len: u64, file_off: u64) -> u64 {
        let mut fresh = 0;
        // Runs never cross a page, but do not rely on the VMM for it.
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let page = at / PAGE_SIZE;
            let piece_end = end.min((page + 1) * PAGE_SIZE);
            let (s, e) = (at % PAGE_SIZE, piece_end - page * PAGE_SIZE);
            let key = gpa.wrapping_sub(file_off);
            let slots = self.0.entry(page).or_default();
            for (k, r) in slots.iter_mut() {
                if *k != key {
                    r.remove(s, e);
                }
            }
            slots.retain(|(_, r)| !r.is_empty());
            match slots.iter_mut().find(|(k, _)| *k == key) {
                Some((_, r)) => fresh += r.insert(s, e),
                None => {
                    let mut r = Ranges::default();
                    fresh += r.insert(s, e);
                    slots.push((key, r));
                }
            }
            at = piece_end;
        }
        fresh
    }

    /// Forgets whatever was counted in `[gpa, gpa + len)`.
    fn forget(&mut self, gpa: u64, len: u64) {
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let page = at / PAGE_SIZE;
            let piece_end = end.min((page + 1) * PAGE_SIZE);
            if let Some(slots) = self.0.get_mut(&page) {
                let (s, e) = (at % PAGE_SIZE, piece_end - page * PAGE_SIZE);
                for (_, r) in slots.iter_mut() {
                    r.remove(s, e);
                }
                slots.retain(|(_, r)| !r.is_empty());
            }
            at = piece_end;
        }
    }
}

/// Sorted, disjoint, non-adjacent half-open ranges.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// How many bytes of `[lo, hi)` the set holds.
    pub(crate) fn covered_within(&self, lo: u64, hi: u64) -> u64 {
        self.0
            .iter()
            .map(|&(a, b)| hi.min(b).saturating_sub(lo.max(a)))
            .sum()
    }

    /// The first part of `[lo, hi)` the set does not hold.
    pub(crate) fn first_gap(&self, lo: u64, hi: u64) -> Option<(u64, u64)> {
        let mut at = lo;
        for &(a, b) in &self.0 {
            if b <= at {
                continue;
            }
            if a > at {
                return Some((at, a.min(hi))).filter(|(s, e)| s < e);
            }
            at = b;
            if at >= hi {
                return None;
            }
        }
        (at < hi).then_some((at, hi))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `[s, e)`; returns how many of its bytes were not in the set.
    pub(crate) fn insert(&mut self, s: u64, e: u64) -> u64 {
        if s >= e {
            return 0;
        }
        let covered: u64 = self
            .0
            .iter()
            .map(|&(a, b)| e.min(b).saturating_sub(s.max(a)))
            .sum();
        let (mut ns, mut ne) = (s, e);
        self.0.retain(|&(a, b)| {
            if b < s || a > e {
                true
            } else {
                ns = ns.min(a);
                ne = ne.max(b);
                false
            }
        });
        let at = self.0.partition_point(|&(a, _)| a < ns);
        self.0.insert(at, (ns, ne));
        (e - s) - covered
    }

    /// Removes `[s, e)`.
    fn remove(&mut self, s: u64, e: u64) {
        if s >= e {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len() + 1);
        for &(a, b) in &self.0 {
            if b <= s || a >= e {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s));
            }
            if b > e {
                out.push((e, b));
            }
        }
        self.0 = out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_count_only_new_bytes() {
        let mut r = Ranges::default();
        assert_eq!(r.insert(10, 20), 10);
        assert_eq!(r.insert(15, 30), 10);
        assert_eq!(r.insert(40, 50), 10);
        assert_eq!(r.insert(0, 60), 60 - 30);
        assert_eq!(r.0, vec![(0, 60)]);
        r.remove(5, 10);
        assert_eq!(r.0, vec![(0, 5), (10, 60)]);
        assert_eq!(r.insert(20, 21), 0);
        r.remove(0, 100);
        assert!(r.is_empty());
    }

    #[test]
    fn seen_moves_bytes_between_placements() {
        let mut s = Seen::default();
        // Page 1 holds file bytes 0.. at offset 0.
        assert_eq!(s.add(4096, 4096, 0), 4096);
        // Re-dirtied, unchanged: nothing new.
        assert_eq!(s.add(4096, 4096, 0), 0);
        // Half of it now holds other content: new.
        assert_eq!(s.add(4096, 2048, 8192), 2048);
        // The original content again where it was replaced: new again; where it
        // stayed: not.
        assert_eq!(s.add(4096, 4096, 0), 2048);
        // A device overwrote the page: everything is new again.
        s.forget(4096, 4096);
        assert_eq!(s.add(4096, 4096, 0), 4096);
        // Same file bytes at another address: a separate copy.
        assert_eq!(s.add(3 * 4096, 4096, 0), 4096);
    }

    #[test]
    fn unwrap_follows_wraps_both_ways() {
        let mut u = crate::stream::Unwrap::default();
        assert_eq!(u.next(10), 10);
        assert_eq!(u.next(u32::MAX - 5), u64::from(u32::MAX - 5));
        assert_eq!(u.next(3), (1 << 32) + 3);
        // A retransmission from before the wrap.
        assert_eq!(u.next(u32::MAX - 5), u64::from(u32::MAX - 5));
        assert_eq!(u.next(100), (1 << 32) + 100);
    }
}
