//! A small guest-memory simulator that writes DMA logs in the real schema: guest
//! pages with contents, the devices' DMA (logged as the device models log it), the
//! guest CPU's writes (tracked like KVM's dirty log) and the VMM's dirty-page scan.
//! The recorded logs in `tests/data/` are made with it (see `scenarios.rs`).

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};

use zc_protocol::dirty::END_SAMPLE;
use zc_protocol::Marker;

use zc_dma_log::{
    fingerprint, page_pieces, BlkRequest, BlkStatus, DescRecord, DescRole, DeviceKind, Direction,
    DirtyRecord, Fingerprint, HeaderRecord, MarkerRecord, NetRequest, PayloadRun, Piece, Record,
    RecordWriter, RequestDetail, RequestRecord, SCHEMA_V1,
};

/// Guest page size.
pub const PAGE: u64 = PAGE_BYTES as u64;
/// [`PAGE`] as a buffer length.
pub const PAGE_BYTES: usize = 4096;
/// virtio_net_hdr_v1.
pub const NET_HDR: u64 = NET_HDR_BYTES as u64;
const NET_HDR_BYTES: usize = 12;
/// Ethernet + IPv4 + TCP headers without options.
pub const L2_L4: u32 = 54;
/// Shortest run the VMM's scan reports.
const MIN_RUN: usize = zc_protocol::dirty::MIN_PAYLOAD_RUN;

/// The queues the simulated devices log on: (device, queue index).
const BLK: (DeviceKind, u16) = (DeviceKind::Blk, 0);
const NET_RX: (DeviceKind, u16) = (DeviceKind::Net, 0);
const NET_TX: (DeviceKind, u16) = (DeviceKind::Net, 1);

/// A deterministic pseudo-random source file (xorshift64), so runs of it never
/// repeat and every page has its own fingerprint.
pub fn source(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32).to_le_bytes()[0]
        })
        .collect()
}

/// One TCP connection as the guest's TX frames show it.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub ports: (u16, u16),
    pub isn: u32,
}

impl Conn {
    /// The TCP sequence number of stream offset `off`.
    pub fn seq(&self, off: u64) -> u32 {
        // Sequence numbers count modulo 2^32.
        let off = u32::try_from(off % (1 << 32)).expect("below 2^32");
        self.isn.wrapping_add(1).wrapping_add(off)
    }
}

/// One TX chain for [`Sim::tx`].
pub struct Frame<'a> {
    /// Head descriptor index.
    pub head: u16,
    /// (gpa, len) of each descriptor; the first starts with the virtio-net header.
    pub segs: &'a [(u64, u64)],
    /// TCP sequence number.
    pub seq: u32,
    /// TCP payload bytes.
    pub tcp_len: u32,
    /// TCP flags.
    pub flags: &'a str,
    /// An RX frame (head, buffer gpa) the device logs after this chain's first
    /// descriptor: other queues' records interleave with a chain's.
    pub rx_between: Option<(u16, u64)>,
}

/// Guest memory, the devices and the VMM, as far as the log sees them.
pub struct Sim {
    pub src: Vec<u8>,
    recs: Vec<Record>,
    mem: HashMap<u64, Vec<u8>>,
    /// Per byte: the file offset it holds, if it holds payload.
    tag: HashMap<u64, Vec<Option<u64>>>,
    dirty: BTreeSet<u64>,
    /// The card the next virtio-net records come from (`card` in the log).
    pub net_card: u16,
    /// The card the next virtio-blk records come from: 0 the test disk, 1 the
    /// scratch disk.
    pub blk_card: u16,
}

impl Sim {
    pub fn new(src: Vec<u8>) -> Self {
        Sim {
            src,
            recs: Vec::new(),
            mem: HashMap::new(),
            tag: HashMap::new(),
            dirty: BTreeSet::new(),
            net_card: 0,
            blk_card: 0,
        }
    }

    fn card_of(&self, device: DeviceKind) -> u16 {
        match device {
            DeviceKind::Net => self.net_card,
            DeviceKind::Blk => self.blk_card,
        }
    }

    fn next_seq(&self) -> u64 {
        self.recs.len() as u64
    }

    fn t_ns(seq: u64) -> u64 {
        1000 * seq
    }

    fn set(&mut self, gpa: u64, byte: u8, tag: Option<u64>) {
        let page = gpa / PAGE;
        let off = (gpa % PAGE) as usize;
        self.mem.entry(page).or_insert_with(|| vec![0; PAGE_BYTES])[off] = byte;
        self.tag
            .entry(page)
            .or_insert_with(|| vec![None; PAGE_BYTES])[off] = tag;
    }

    fn get(&self, gpa: u64) -> (u8, Option<u64>) {
        let page = gpa / PAGE;
        let off = (gpa % PAGE) as usize;
        (
            self.mem.get(&page).map_or(0, |p| p[off]),
            self.tag.get(&page).and_then(|t| t[off]),
        )
    }

    fn read(&self, gpa: u64, len: u64) -> Vec<u8> {
        (gpa..gpa + len).map(|a| self.get(a).0).collect()
    }

    fn pieces(&self, gpa: u64, len: u64) -> Vec<Piece> {
        page_pieces(gpa, len)
            .map(|(g, l)| Piece {
                gpa: g,
                len: l,
                hash: Fingerprint(fingerprint(&self.read(g, u64::from(l)))),
            })
            .collect()
    }

    /// Logs one descriptor of `queue` as the device models do: with the pieces
    /// guest memory holds at `gpa` now.
    fn log_desc(
        &mut self,
        (device, queue): (DeviceKind, u16),
        head: u16,
        desc: u16,
        (gpa, len): (u64, u64),
        dir: Direction,
        role: DescRole,
    ) {
        let seq = self.next_seq();
        self.recs.push(Record::Desc(DescRecord {
            seq,
            t_ns: Self::t_ns(seq),
            device,
            card: self.card_of(device),
            queue,
            head,
            desc,
            indirect: false,
            gpa,
            len: u32::try_from(len).expect("a descriptor's length is a u32"),
            dir,
            role,
            pieces: self.pieces(gpa, len),
        }));
    }

    /// Logs a completed blk IN request of `bytes` from `sector`.
    fn blk_request(&mut self, head: u16, sector: u64, bytes: u64) {
        self.request(
            BLK,
            head,
            RequestDetail::Blk(BlkRequest {
                op: "in".into(),
                code: 0,
                sector,
                bytes,
                status: BlkStatus::Ok,
            }),
        );
    }

    /// Logs the request record of a TCP frame on `queue` as the net device summarises
    /// it, with its TCP sequence number and payload length.
    fn tcp_request(
        &mut self,
        queue: (DeviceKind, u16),
        head: u16,
        summary: String,
        (seq, len): (u32, u32),
        flags: &str,
        ports: (u16, u16),
    ) {
        let req = NetRequest {
            summary,
            tcp_seq: Some(seq),
            tcp_len: Some(len),
            tcp_flags: Some(flags.to_string()),
            tcp_payload_off: Some(L2_L4),
            tcp_ports: Some(ports),
        };
        self.request(queue, head, RequestDetail::Net(req));
    }

    fn mark_dirty(&mut self, gpa: u64, len: u64) {
        for (g, _) in page_pieces(gpa, len) {
            self.dirty.insert(g / PAGE);
        }
    }

    // ---- the guest CPU ----

    /// The CPU writes non-payload bytes (headers, zeroes, garbage).
    pub fn cpu_write(&mut self, gpa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.set(gpa + i as u64, *b, None);
        }
        self.mark_dirty(gpa, bytes.len() as u64);
    }

    /// init_on_alloc: the CPU zeroes a freshly allocated page.
    pub fn cpu_zero_page(&mut self, page_gpa: u64) {
        self.cpu_write(page_gpa, &[0; PAGE_BYTES]);
    }

    /// The CPU copies `len` bytes inside guest memory.
    pub fn cpu_copy(&mut self, dst: u64, src: u64, len: u64) {
        let bytes: Vec<(u8, Option<u64>)> = (src..src + len).map(|a| self.get(a)).collect();
        for (i, (b, t)) in bytes.into_iter().enumerate() {
            self.set(dst + i as u64, b, t);
        }
        self.mark_dirty(dst, len);
    }

    /// The CPU writes a page without changing it (a refcount, a flag next to the
    /// payload): KVM logs the page dirty again.
    pub fn cpu_touch(&mut self, gpa: u64) {
        self.dirty.insert(gpa / PAGE);
    }

    // ---- devices ----

    /// virtio-blk DMA of file bytes into guest memory, not yet logged (the blk
    /// thread writes memory before it logs).
    pub fn blk_dma(&mut self, segs: &[(u64, u64, u64)]) {
        for &(gpa, file_off, len) in segs {
            for i in 0..len {
                let f = file_off + i;
                self.set(gpa + i, self.src[usize::try_from(f).unwrap()], Some(f));
            }
        }
    }

    /// Logs a blk IN request for `segs` (gpa, file offset, len) as virtio-blk does:
    /// header, data records with the pieces as they are in memory now, status byte,
    /// request.
    pub fn blk_log(&mut self, head: u16, segs: &[(u64, u64, u64)], meta_gpa: u64) {
        let (reads, writes) = (Direction::DeviceReads, Direction::DeviceWrites);
        self.log_desc(BLK, head, head, (meta_gpa, 16), reads, DescRole::Header);
        let mut desc = head;
        for &(gpa, _, len) in segs {
            desc += 1;
            self.log_desc(BLK, head, desc, (gpa, len), writes, DescRole::Data);
        }
        self.set(meta_gpa + 16, 0, None);
        self.log_desc(
            BLK,
            head,
            desc + 1,
            (meta_gpa + 16, 1),
            writes,
            DescRole::Status,
        );
        let sector = segs.first().map_or(0, |s| s.1 / 512);
        self.blk_request(head, sector, segs.iter().map(|s| s.2).sum());
    }

    /// A blk IN request: DMA, then its log records.
    pub fn blk_read(&mut self, head: u16, segs: &[(u64, u64, u64)], meta_gpa: u64) {
        self.blk_dma(segs);
        self.blk_log(head, segs, meta_gpa);
    }

    /// A blk read of non-file bytes (metadata) into `gpa`.
    pub fn blk_read_other(&mut self, head: u16, gpa: u64, len: u64) {
        for i in 0..len {
            self.set(gpa + i, (i % 7) as u8 + 1, None);
        }
        let data = (gpa, len);
        self.log_desc(
            BLK,
            head,
            head + 1,
            data,
            Direction::DeviceWrites,
            DescRole::Data,
        );
        self.blk_request(head, 0, len);
    }

    fn request(&mut self, (device, queue): (DeviceKind, u16), head: u16, req: RequestDetail) {
        let seq = self.next_seq();
        self.recs.push(Record::Request(RequestRecord {
            seq,
            t_ns: Self::t_ns(seq),
            device,
            card: self.card_of(device),
            queue,
            head,
            req,
        }));
    }

    /// The guest writes a virtio-net header and Ethernet/IPv4/TCP headers at `gpa`
    /// (66 bytes, no payload): what the NIC reads first of every TX frame.
    pub fn write_frame_headers(&mut self, gpa: u64, seq: u32) {
        let mut h = vec![0xeeu8; NET_HDR_BYTES + L2_L4 as usize];
        h[NET_HDR_BYTES + 38..NET_HDR_BYTES + 42].copy_from_slice(&seq.to_be_bytes());
        self.cpu_write(gpa, &h);
    }

    /// The NIC reads one TX chain: `segs` (gpa, len) in order; the first starts
    /// with the 12-byte virtio-net header. `rx_between` logs an RX frame after the
    /// chain's first descriptor (other queues' records interleave).
    pub fn tx(&mut self, conn: &Conn, f: Frame) {
        let Frame {
            head,
            segs,
            seq,
            tcp_len,
            flags,
            rx_between,
        } = f;
        let reads = Direction::DeviceReads;
        for (desc, &(gpa, len)) in (head..).zip(segs) {
            let (data_gpa, data_len) = if desc == head {
                self.log_desc(NET_TX, head, desc, (gpa, NET_HDR), reads, DescRole::Header);
                (gpa + NET_HDR, len - NET_HDR)
            } else {
                (gpa, len)
            };
            if data_len > 0 {
                let data = (data_gpa, data_len);
                self.log_desc(NET_TX, head, desc, data, reads, DescRole::Data);
            }
            if desc == head {
                if let Some((rx_head, rx_gpa)) = rx_between {
                    self.rx(rx_head, rx_gpa, 66, conn);
                }
            }
        }
        let (sp, dp) = conn.ports;
        let summary =
            format!("tx tcp 10.0.2.15:{sp}>10.0.2.2:{dp} seq={seq} len={tcp_len} flags={flags}");
        self.tcp_request(NET_TX, head, summary, (seq, tcp_len), flags, conn.ports);
    }

    /// The guest's SYN for `conn`, from a header buffer at `gpa`.
    pub fn syn(&mut self, head: u16, gpa: u64, conn: &Conn) {
        self.write_frame_headers(gpa, conn.isn);
        self.tx(
            conn,
            Frame {
                head,
                segs: &[(gpa, NET_HDR + u64::from(L2_L4))],
                seq: conn.isn,
                tcp_len: 0,
                flags: "S",
                rx_between: None,
            },
        );
    }

    /// virtio-net RX: the device writes a frame of `len` bytes (an ACK, the peer's
    /// byte count) into the buffer at `gpa`.
    pub fn rx(&mut self, head: u16, gpa: u64, len: u64, conn: &Conn) {
        for i in 0..NET_HDR + len {
            self.set(gpa + i, 0x5a, None);
        }
        for (role, buf) in [
            (DescRole::Header, (gpa, NET_HDR)),
            (DescRole::Data, (gpa + NET_HDR, len)),
        ] {
            self.log_desc(NET_RX, head, head, buf, Direction::DeviceWrites, role);
        }
        let (sp, dp) = conn.ports;
        let summary = format!("rx tcp 10.0.2.2:{dp}>10.0.2.15:{sp} seq=1 len=0 flags=A buffers=1");
        let tcp_len = u32::try_from(len.saturating_sub(u64::from(L2_L4))).unwrap();
        self.tcp_request(NET_RX, head, summary, (1, tcp_len), "A", (dp, sp));
    }

    /// virtio-blk OUT: the device reads `segs` (gpa, len) out of guest memory, as
    /// the device models log it (header, data records with the pieces memory holds
    /// now, status byte, request) on the current `blk_card`.
    pub fn blk_write(&mut self, head: u16, segs: &[(u64, u64)], sector: u64, meta_gpa: u64) {
        let (reads, writes) = (Direction::DeviceReads, Direction::DeviceWrites);
        self.log_desc(BLK, head, head, (meta_gpa, 16), reads, DescRole::Header);
        let mut desc = head;
        for &seg in segs {
            desc += 1;
            self.log_desc(BLK, head, desc, seg, reads, DescRole::Data);
        }
        self.set(meta_gpa + 16, 0, None);
        let status = (meta_gpa + 16, 1);
        self.log_desc(BLK, head, desc + 1, status, writes, DescRole::Status);
        self.blk_op(head, "out", 1, sector, segs.iter().map(|s| s.1).sum());
    }

    /// virtio-blk FLUSH on the current `blk_card`.
    pub fn blk_flush(&mut self, head: u16, meta_gpa: u64) {
        let (reads, writes) = (Direction::DeviceReads, Direction::DeviceWrites);
        self.log_desc(BLK, head, head, (meta_gpa, 16), reads, DescRole::Header);
        self.set(meta_gpa + 16, 0, None);
        let status = (meta_gpa + 16, 1);
        self.log_desc(BLK, head, head + 1, status, writes, DescRole::Status);
        self.blk_op(head, "flush", 4, 0, 0);
    }

    fn blk_op(&mut self, head: u16, op: &str, code: u32, sector: u64, bytes: u64) {
        self.request(
            BLK,
            head,
            RequestDetail::Blk(BlkRequest {
                op: op.into(),
                code,
                sector,
                bytes,
                status: BlkStatus::Ok,
            }),
        );
    }

    /// virtio-net RX of one TCP frame from the peer: into the buffer at `gpa` the
    /// device writes the virtio-net header, the Ethernet/IPv4/TCP headers and
    /// `len` payload bytes, the file's bytes from stream offset `off` (sequence
    /// number `seq`); `ports` are (peer, guest), as the frame carries them.
    pub fn rx_payload(
        &mut self,
        head: u16,
        gpa: u64,
        (ports, seq, flags): ((u16, u16), u32, &str),
        off: u64,
        len: u64,
    ) {
        let hdrs = NET_HDR + u64::from(L2_L4);
        for i in 0..hdrs {
            self.set(gpa + i, 0x5a, None);
        }
        for i in 0..len {
            let f = off + i;
            self.set(
                gpa + hdrs + i,
                self.src[usize::try_from(f).unwrap()],
                Some(f),
            );
        }
        let writes = Direction::DeviceWrites;
        self.log_desc(NET_RX, head, head, (gpa, NET_HDR), writes, DescRole::Header);
        let data = (gpa + NET_HDR, u64::from(L2_L4) + len);
        self.log_desc(NET_RX, head, head, data, writes, DescRole::Data);
        let (sp, dp) = ports;
        let summary = format!(
            "rx tcp 10.0.2.2:{sp}>10.0.2.15:{dp} seq={seq} len={len} flags={flags} buffers=1"
        );
        let tcp_len = u32::try_from(len).unwrap();
        self.tcp_request(NET_RX, head, summary, (seq, tcp_len), flags, ports);
    }

    // ---- the guest's marks and the VMM ----

    pub fn marker(&mut self, label: &str) {
        let seq = self.next_seq();
        self.recs.push(Record::Marker(MarkerRecord {
            seq,
            t_ns: Self::t_ns(seq),
            label: label.to_string(),
        }));
    }

    /// `mark BEGIN`: the VMM clears the dirty log.
    pub fn begin(&mut self, method: &str) {
        self.marker(&Marker::begin(method).label());
        self.dirty.clear();
    }

    /// `mark END`, then the VMM's last sample.
    pub fn end(&mut self, method: &str) {
        self.marker(&Marker::end(method).label());
        self.sample(END_SAMPLE);
    }

    /// The VMM's dirty-page sample: scans the pages dirtied since the last sample for
    /// payload (runs of consecutive file offsets, at least [`MIN_RUN`] bytes, never crossing
    /// a page), logs them and clears the dirty set.
    pub fn sample(&mut self, sample: u32) {
        let pages: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut runs = Vec::new();
        for &page in &pages {
            let mut i = 0u64;
            while i < PAGE {
                let gpa = page * PAGE + i;
                let Some(f) = self.get(gpa).1 else {
                    i += 1;
                    continue;
                };
                let mut n = 1;
                while i + n < PAGE && self.get(gpa + n).1 == Some(f + n) {
                    n += 1;
                }
                if n >= MIN_RUN as u64 {
                    runs.push(PayloadRun {
                        gpa,
                        len: u32::try_from(n).expect("within one page"),
                        file_off: f,
                    });
                }
                i += n;
            }
        }
        let seq = self.next_seq();
        self.recs.push(Record::Dirty(DirtyRecord {
            seq,
            t_ns: Self::t_ns(seq),
            sample,
            dirty_pages: u32::try_from(pages.len()).unwrap(),
            dirtied: pages,
            runs,
        }));
    }

    pub fn records(&self) -> &[Record] {
        &self.recs
    }

    /// The log in the first schema (`zc-dma-log/1`), as the VMM wrote it before
    /// `/2`: header line, then one record per line.
    pub fn jsonl_v1(&self) -> String {
        let mut out = serde_json::to_string(&Record::Header(HeaderRecord {
            schema: SCHEMA_V1.to_string(),
            start_unix_ns: 0,
        }))
        .unwrap();
        out.push('\n');
        for r in &self.recs {
            out.push_str(&serde_json::to_string(r).unwrap());
            out.push('\n');
        }
        out
    }

    /// The log as the VMM writes it now (`zc-dma-log/2`).
    pub fn jsonl(&self) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), 0).unwrap();
        for r in &self.recs {
            w.write(r).unwrap();
        }
        w.finish().unwrap()
    }
}
