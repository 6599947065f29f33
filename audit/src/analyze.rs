//! Device-side evidence of one method: what the disk and the NIC moved by DMA, which
//! payload bytes the NIC read zero-copy, and which payload bytes the guest CPU wrote.
//! The rules are those of `docs/method-suite.md` ("What the audit computes"), made
//! precise in the comments here and in the crate documentation.

use std::collections::HashMap;

use zc_dma_log::{
    DescRecord, DescRole, DeviceKind, Direction, DirtyRecord, NetRequest, Piece, Record,
    RequestDetail, PAGE_SIZE,
};
use zc_protocol::{Marker, SpanName};

use crate::stream::{Connection, SourcePages as Source};

/// virtio-net's transmit queue.
const TX_QUEUE: u16 = 1;

/// What a device last wrote into a guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageContent {
    /// A whole file page (identified by its fingerprint), written by virtio-blk.
    File(u64),
    /// Anything else: a partial write, a page that is no file page, a net RX buffer.
    Other,
}

/// Per guest page, every device write to it in log order (record index, content).
/// Built once over the whole log: a warm method's page cache was filled before its
/// span, and a DMA write can be logged just after a dirty sample that already saw it.
struct PageHistory(HashMap<u64, Vec<(usize, PageContent)>>);

impl PageHistory {
    fn build(records: &[Record], source: &Source) -> Self {
        let mut map: HashMap<u64, Vec<(usize, PageContent)>> = HashMap::new();
        for (idx, rec) in records.iter().enumerate() {
            let Record::Desc(d) = rec else { continue };
            if d.dir != Direction::DeviceWrites {
                continue;
            }
            for p in &d.pieces {
                let content = match source.file_page_written(p) {
                    Some(fp) if d.device == DeviceKind::Blk && d.role == DescRole::Data => {
                        PageContent::File(fp)
                    }
                    _ => PageContent::Other,
                };
                map.entry(p.gpa / PAGE_SIZE)
                    .or_default()
                    .push((idx, content));
            }
        }
        PageHistory(map)
    }

    /// The last device write to `page` logged before record `idx`.
    fn last_before(&self, page: u64, idx: usize) -> Option<PageContent> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|(i, _)| *i < idx);
        n.checked_sub(1).map(|k| v[k].1)
    }

    /// The first device write to `page` logged after record `after` and before
    /// record `before`.
    fn first_between(&self, page: u64, after: usize, before: usize) -> Option<PageContent> {
        let v = self.0.get(&page)?;
        let n = v.partition_point(|(i, _)| *i <= after);
        v.get(n).filter(|(i, _)| *i < before).map(|(_, c)| *c)
    }
}

/// One TX frame: its request and its `data` descriptor records in chain order.
struct TxFrame<'r> {
    req_idx: usize,
    /// The card that sent it.
    card: u16,
    net: &'r NetRequest,
    /// (record index, record) of each `data` descriptor.
    data: Vec<(usize, &'r DescRecord)>,
}

/// A descriptor chain in flight: (device, card, queue, head).
type ChainKey = (DeviceKind, u16, u16, u16);

/// Every completed TX chain of the log. Descriptor records precede their chain's
/// request record under the same (device, card, queue, head); other queues' and
/// other cards' records (RX, blk, a second NIC) may be interleaved, so they are
/// grouped by that key rather than by position.
fn tx_frames(records: &[Record]) -> Vec<TxFrame<'_>> {
    let mut pending: HashMap<ChainKey, Vec<(usize, &DescRecord)>> = HashMap::new();
    let mut out = Vec::new();
    for (idx, rec) in records.iter().enumerate() {
        match rec {
            Record::Desc(d) => pending
                .entry((d.device, d.card, d.queue, d.head))
                .or_default()
                .push((idx, d)),
            Record::Request(r) => {
                let descs = pending.remove(&(r.device, r.card, r.queue, r.head));
                if let (DeviceKind::Net, TX_QUEUE, RequestDetail::Net(net)) =
                    (r.device, r.queue, &r.req)
                {
                    let data = descs
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(_, d)| d.role == DescRole::Data)
                        .collect();
                    out.push(TxFrame {
                        req_idx: idx,
                        card: r.card,
                        net,
                        data,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// Log-wide indexes shared by every method's analysis.
pub(crate) struct LogIndex<'r, 's> {
    records: &'r [Record],
    source: Source<'s>,
    history: PageHistory,
    tx: Vec<TxFrame<'r>>,
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
        LogIndex {
            records,
            source,
            history,
            tx: tx_frames(records),
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

    /// Analyses the records of one method's span; `card`: only that card's frames
    /// are the method's (`None`: every card's).
    pub(crate) fn analyze(&self, span: &Span, card: Option<u16>) -> Evidence {
        let mut ev = Evidence::default();
        self.disk(span, &mut ev);
        self.nic(span, card, &mut ev);
        self.cpu(span, &mut ev);
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
        let in_span: Vec<&TxFrame> = self
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
                    ev.nic_copied_ranges.push((d_idx, pp.gpa, n, pp.stream_off));
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

    /// CPU copies: the payload in pages the CPU dirtied, at each sample; plus the
    /// last hop of payload the NIC read from a page no device filled with it. The
    /// CPU must have written those bytes there (only the CPU and the devices write
    /// guest memory), and KVM confirms the page was CPU-dirtied, but a buffer the
    /// driver frees as soon as the NIC is done (a frame linearised at the device
    /// edge) may be reused before the next sample, so the samples alone miss it.
    /// Both feed one deduplication, so a copy seen both ways counts once.
    fn cpu(&self, span: &Span, ev: &mut Evidence) {
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
        let ranges = std::mem::take(&mut ev.nic_copied_ranges);
        let mut nic_reads = ranges.iter().peekable();
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
                    self.dirty_sample(idx, dr, &mut seen, ev);
                }
                _ => {}
            }
            while let Some(&&(d_idx, gpa, len, file_off)) = nic_reads.peek() {
                if d_idx > idx {
                    break;
                }
                nic_reads.next();
                // The CPU wrote the page before the NIC read it: the sample that
                // saw it dirty is at the latest the first one after the read.
                let next_sample = self
                    .dirty
                    .get(self.dirty.partition_point(|&i| i <= idx))
                    .copied()
                    .unwrap_or(usize::MAX);
                // A page the disk filled with this very file page is not a copy's
                // destination even if the CPU wrote into it since (bytes garbled
                // in place are not payload the CPU copied there).
                let page = gpa / PAGE_SIZE;
                let disk_put_it_there = gpa % PAGE_SIZE == file_off % PAGE_SIZE
                    && self.source.page_fp_at(file_off).is_some_and(|fp| {
                        self.history.last_before(page, d_idx) == Some(PageContent::File(fp))
                    });
                if !disk_put_it_there && first_dirty.get(&page).is_some_and(|&at| at <= next_sample)
                {
                    let new = seen.add(gpa, len, file_off);
                    ev.cpu_copied_bytes += new;
                    ev.cpu_copied_seen_by_nic += new;
                }
            }
        }
    }

    fn dirty_sample(&self, idx: usize, dr: &DirtyRecord, seen: &mut Seen, ev: &mut Evidence) {
        let next_dirty = self
            .dirty
            .get(self.dirty.partition_point(|&i| i <= idx))
            .copied()
            .unwrap_or(usize::MAX);
        for run in &dr.runs {
            let page = run.gpa / PAGE_SIZE;
            if run.gpa % PAGE_SIZE == run.file_off % PAGE_SIZE {
                if let Some(fp) = self.source.page_fp_at(run.file_off) {
                    let want = Some(PageContent::File(fp));
                    // init_on_alloc: the CPU zeroed a page-cache page, then the disk
                    // filled it. The blk thread writes guest memory before it logs,
                    // so a sample can see the content whose record comes just after
                    // it: accept the page's next device write before the next sample.
                    if self.history.last_before(page, idx) == want
                        || self.history.first_between(page, idx, next_dirty) == want
                    {
                        ev.cpu_dma_destination_bytes += u64::from(run.len);
                        continue;
                    }
                }
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

/// Raw device-side counts of one method.
#[derive(Debug, Default, Clone)]
pub(crate) struct Evidence {
    pub disk_dma_bytes: u64,
    pub nic_payload_bytes: u64,
    pub nic_zero_copy_bytes: u64,
    pub nic_beyond_source: u64,
    pub no_syn: bool,
    pub peer_port: Option<u16>,
    pub cpu_copied_bytes: u64,
    pub cpu_dma_destination_bytes: u64,
    pub dirty_samples: u64,
    /// Of `cpu_copied_bytes`, those only the NIC saw (see `LogIndex::cpu`).
    pub cpu_copied_seen_by_nic: u64,
    /// Payload the NIC read from anywhere but a disk-filled page: (record index of the
    /// descriptor, gpa, len, file offset), in log order.
    nic_copied_ranges: Vec<(usize, u64, u64, u64)>,
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
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `[s, e)`; returns how many of its bytes were not in the set.
    fn insert(&mut self, s: u64, e: u64) -> u64 {
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
