//! Reading a DMA log back for people: filtering (device, queue, marker span, address
//! range), one line per record, and totals per device and direction, one record at
//! a time. Backs `zc-vmm dma-log show|stats|grep`; `trace` is [`crate::dma_trace`].

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use zc_dma_log::{DeviceKind, Direction, Record, RequestDetail};
use zc_protocol::Marker;

/// Which records to keep.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this device.
    pub device: Option<DeviceKind>,
    /// Only this queue.
    pub queue: Option<u16>,
    /// Only records between the markers `BEGIN <span>` and `END <span>`.
    pub span: Option<String>,
    /// Only descriptors touching `[start, end)` of guest-physical memory.
    pub addr: Option<(u64, u64)>,
}

impl Filter {
    fn device_and_queue(&self, device: DeviceKind, queue: u16) -> bool {
        self.device.is_none_or(|d| d == device) && self.queue.is_none_or(|q| q == queue)
    }

    fn keeps(&self, record: &Record) -> bool {
        match record {
            Record::Header(_) => false,
            Record::Marker(_) => {
                self.device.is_none() && self.queue.is_none() && self.addr.is_none()
            }
            Record::Desc(d) => {
                self.device_and_queue(d.device, d.queue)
                    && self.addr.is_none_or(|(start, end)| {
                        d.gpa < end && d.gpa.saturating_add(u64::from(d.len)) > start
                    })
            }
            Record::Request(r) => self.addr.is_none() && self.device_and_queue(r.device, r.queue),
            Record::DeviceError(e) => {
                self.addr.is_none() && self.device_and_queue(e.device, e.queue)
            }
            Record::Dirty(d) => {
                self.device.is_none()
                    && self.queue.is_none()
                    && self.addr.is_none_or(|(start, end)| {
                        d.runs
                            .iter()
                            .any(|r| r.gpa < end && r.gpa + u64::from(r.len) > start)
                    })
            }
        }
    }
}

/// Keeps the records a [`Filter`] wants, one at a time in log order, so a log of any
/// size is read in constant memory.
#[derive(Debug, Clone)]
pub struct Selector {
    filter: Filter,
    inside: bool,
    /// Whether the span's `BEGIN` marker was met.
    pub span_seen: bool,
}

impl Selector {
    /// A selector for `filter`, before the log's first record.
    pub fn new(filter: Filter) -> Self {
        Selector {
            inside: filter.span.is_none(),
            filter,
            span_seen: false,
        }
    }

    /// Whether `record`, the log's next one, is kept.
    pub fn keeps(&mut self, record: &Record) -> bool {
        if let (Some(span), Record::Marker(m)) = (&self.filter.span, record) {
            match Marker::parse(&m.label) {
                Some(Marker::Begin(s)) if s.as_str() == span.as_str() => {
                    self.inside = true;
                    self.span_seen = true;
                    return false;
                }
                Some(Marker::End(s)) if s.as_str() == span.as_str() => {
                    self.inside = false;
                    return false;
                }
                _ => {}
            }
        }
        self.inside && self.filter.keeps(record)
    }
}

/// The records `filter` keeps, in log order.
pub fn select<'a>(records: &'a [Record], filter: &Filter) -> Vec<&'a Record> {
    let mut selector = Selector::new(filter.clone());
    records.iter().filter(|r| selector.keeps(r)).collect()
}

fn device_name(device: DeviceKind) -> &'static str {
    match device {
        DeviceKind::Blk => "blk",
        DeviceKind::Net => "net",
    }
}

/// The device as a line names it: `net`, or `net1` for the second card of its kind.
fn device_label(device: DeviceKind, card: u16) -> String {
    match card {
        0 => device_name(device).to_string(),
        n => format!("{}{n}", device_name(device)),
    }
}

fn direction_name(dir: Direction) -> &'static str {
    match dir {
        Direction::DeviceReads => "reads ",
        Direction::DeviceWrites => "writes",
    }
}

/// One human-readable line for a record.
pub fn line(record: &Record) -> String {
    let ms = |t_ns: u64| t_ns as f64 / 1e6;
    match record {
        Record::Header(h) => format!("header {}", h.schema),
        Record::Marker(m) => format!("{:>12.3} ms  ---- mark {}", ms(m.t_ns), m.label),
        Record::Desc(d) => format!(
            "{:>12.3} ms  {} q{} head {:>3} desc {:>3}{} device {} {:#012x} +{:<7} {:?} ({} piece{})",
            ms(d.t_ns),
            device_label(d.device, d.card),
            d.queue,
            d.head,
            d.desc,
            if d.indirect { "i" } else { " " },
            direction_name(d.dir),
            d.gpa,
            d.len,
            d.role,
            d.pieces.len(),
            if d.pieces.len() == 1 { "" } else { "s" },
        ),
        Record::Request(r) => {
            let what = match &r.req {
                RequestDetail::Blk(b) => format!(
                    "{} sector {} bytes {} status {:?}",
                    b.op, b.sector, b.bytes, b.status
                ),
                RequestDetail::Net(n) => {
                    let mut s = n.summary.clone();
                    if let (Some(seq), Some(len)) = (n.tcp_seq, n.tcp_len) {
                        let _ = write!(s, " tcp seq {seq} len {len}");
                    }
                    s
                }
            };
            format!(
                "{:>12.3} ms  {} q{} head {:>3} request {what}",
                ms(r.t_ns),
                device_label(r.device, r.card),
                r.queue,
                r.head
            )
        }
        Record::DeviceError(e) => format!(
            "{:>12.3} ms  {} q{} ERROR {}{}",
            ms(e.t_ns),
            device_label(e.device, e.card),
            e.queue,
            e.error,
            if e.needs_reset { " (needs reset)" } else { "" }
        ),
        Record::Dirty(d) => format!(
            "{:>12.3} ms  ---- dirty sample {} pages {} payload runs {} bytes {}",
            ms(d.t_ns),
            d.sample,
            d.dirty_pages,
            d.runs.len(),
            d.runs.iter().map(|r| u64::from(r.len)).sum::<u64>()
        ),
    }
}

/// Totals over a set of records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// (device, direction) -> (descriptors, bytes).
    pub transfers: BTreeMap<(&'static str, &'static str), (u64, u64)>,
    /// (device, request kind) -> count.
    pub requests: BTreeMap<(&'static str, String), u64>,
    /// Device errors.
    pub errors: u64,
    /// Markers.
    pub markers: u64,
    /// Dirty-page samples.
    pub dirty_samples: u64,
    /// Payload bytes found in CPU-dirtied pages, over all samples.
    pub dirty_payload_bytes: u64,
}

/// Adds up descriptors, bytes, requests and errors.
pub fn stats(records: &[&Record]) -> Stats {
    let mut stats = Stats::default();
    for record in records {
        stats.add(record);
    }
    stats
}

impl Stats {
    /// Counts one more record.
    pub fn add(&mut self, record: &Record) {
        match record {
            Record::Desc(d) => {
                let entry = self
                    .transfers
                    .entry((device_name(d.device), direction_name(d.dir).trim_end()))
                    .or_default();
                entry.0 += 1;
                entry.1 += u64::from(d.len);
            }
            Record::Request(r) => {
                let kind = match &r.req {
                    RequestDetail::Blk(b) => b.op.as_str(),
                    RequestDetail::Net(_) => "frame",
                };
                let key = (device_name(r.device), kind.to_string());
                *self.requests.entry(key).or_default() += 1;
            }
            Record::DeviceError(_) => self.errors += 1,
            Record::Marker(_) => self.markers += 1,
            Record::Dirty(d) => {
                self.dirty_samples += 1;
                self.dirty_payload_bytes += d.runs.iter().map(|r| u64::from(r.len)).sum::<u64>();
            }
            Record::Header(_) => {}
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<6} {:<7} {:>12} {:>14}",
            "device", "device", "descriptors", "bytes"
        )?;
        for ((device, dir), (count, bytes)) in &self.transfers {
            writeln!(f, "{device:<6} {dir:<7} {count:>12} {bytes:>14}")?;
        }
        for ((device, kind), count) in &self.requests {
            writeln!(f, "{device:<6} {kind:<7} requests {count:>8}")?;
        }
        write!(
            f,
            "markers {}, device errors {}, dirty samples {} ({} payload bytes in CPU-dirtied pages)",
            self.markers, self.errors, self.dirty_samples, self.dirty_payload_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zc_dma_log::{
        BlkRequest, BlkStatus, DescRecord, DescRole, DeviceErrorRecord, MarkerRecord, RequestRecord,
    };
    use zc_protocol::marker::SEND_SPAN;

    fn desc(device: DeviceKind, queue: u16, gpa: u64, len: u32, dir: Direction) -> Record {
        Record::Desc(DescRecord {
            seq: 0,
            t_ns: 1_000_000,
            device,
            card: 0,
            queue,
            head: 0,
            desc: 1,
            indirect: false,
            gpa,
            len,
            dir,
            role: DescRole::Data,
            pieces: vec![],
        })
    }

    fn mark(label: &str) -> Record {
        Record::Marker(MarkerRecord {
            seq: 0,
            t_ns: 0,
            label: label.into(),
        })
    }

    fn log() -> Vec<Record> {
        vec![
            desc(DeviceKind::Blk, 0, 0x1000, 4096, Direction::DeviceWrites),
            mark(&Marker::begin(SEND_SPAN).label()),
            desc(DeviceKind::Blk, 0, 0x2000, 8192, Direction::DeviceWrites),
            desc(DeviceKind::Net, 1, 0x2000, 1500, Direction::DeviceReads),
            Record::Request(RequestRecord {
                seq: 0,
                t_ns: 0,
                device: DeviceKind::Blk,
                card: 0,
                queue: 0,
                head: 0,
                req: RequestDetail::Blk(BlkRequest {
                    op: "in".into(),
                    code: 0,
                    sector: 16,
                    bytes: 8192,
                    status: BlkStatus::Ok,
                }),
            }),
            Record::DeviceError(DeviceErrorRecord {
                seq: 0,
                t_ns: 0,
                device: DeviceKind::Net,
                card: 1,
                queue: 1,
                head: None,
                error: "loop".into(),
                needs_reset: true,
            }),
            mark(&Marker::end(SEND_SPAN).label()),
            desc(DeviceKind::Net, 1, 0x9000, 60, Direction::DeviceReads),
        ]
    }

    #[test]
    fn span_selects_between_its_markers() {
        let log = log();
        let filter = Filter {
            span: Some(SEND_SPAN.to_string()),
            ..Filter::default()
        };
        let kept = select(&log, &filter);
        assert_eq!(kept.len(), 4);
        let s = stats(&kept);
        assert_eq!(s.transfers[&("blk", "writes")], (1, 8192));
        assert_eq!(s.transfers[&("net", "reads")], (1, 1500));
        assert_eq!(s.requests[&("blk", "in".to_string())], 1);
        assert_eq!(s.errors, 1);
        assert_eq!(s.markers, 0, "the span's own markers are not inside it");
    }

    #[test]
    fn device_queue_and_address_filters() {
        let log = log();
        let net = Filter {
            device: Some(DeviceKind::Net),
            ..Filter::default()
        };
        let s = stats(&select(&log, &net));
        assert_eq!(s.transfers[&("net", "reads")], (2, 1560));
        assert!(!s.transfers.contains_key(&("blk", "writes")));
        assert_eq!(s.markers, 0);

        let page = Filter {
            addr: Some((0x2000, 0x2001)),
            ..Filter::default()
        };
        let kept = select(&log, &page);
        assert_eq!(kept.len(), 2, "both descriptors touching 0x2000");
        let none = Filter {
            addr: Some((0x1000 + 4096, 0x2000)),
            ..Filter::default()
        };
        assert!(
            select(&log, &none).is_empty(),
            "end is exclusive on both sides"
        );
    }

    #[test]
    fn lines_name_the_essentials() {
        let log = log();
        let text: Vec<String> = log.iter().map(line).collect();
        assert!(text[1].contains("mark BEGIN send"));
        assert!(
            text[2].contains("blk q0")
                && text[2].contains("writes")
                && text[2].contains("0x0000002000")
        );
        assert!(text[4].contains("in sector 16 bytes 8192"));
        assert!(
            text[5].contains("net1 q1 ERROR loop (needs reset)"),
            "{}",
            text[5]
        );
    }
}
