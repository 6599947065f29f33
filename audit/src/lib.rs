//! `zc-audit`: per-method verdicts from the evidence the devices logged.
//!
//! Input: the DMA log (`zc_dma_log`), the source file, the guest's method
//! reports and the NIC variant of the run. Output: one [`MethodAudit`] per method,
//! judged against `audit/expected.toml` ([`Expectations`]), and reports of those
//! ([`report`]). Pure functions: no VM, no KVM, no I/O except the loaders.
//!
//! The contract is `docs/method-suite.md` ("What the audit computes"); the exact
//! rules are:
//!
//! **Span.** A method's span is the records strictly between its first `BEGIN name`
//! marker and the first `END name` marker after that. When one boot ran several NIC
//! variants, one card each ([`AuditInput::card`]), the span's name is
//! `name@variant` and only the variant's card's TX frames count (`card` in the log). Disk and NIC evidence is taken
//! from that span (a TX frame belongs to it when its `request` record does). The CPU
//! side also reads the first `dirty` record after `END`, unless another marker comes
//! first: the VMM takes its last sample when it logs `END`, so that record follows it.
//!
//! **Disk DMA bytes.** The `len` of every virtio-blk `device_writes` `data` record in
//! the span.
//!
//! **Page contents.** Over the *whole* log, every `device_writes` piece is a write
//! to its guest page. A blk `data` piece of a full 4 KiB whose fingerprint is that of
//! a page of the source file gives the page that file content; any other device
//! write (partial page, unknown content, net RX) gives it unknown content. The last
//! file page of a source not a multiple of 4 KiB is fingerprinted zero-padded.
//!
//! **NIC.** The method's connection is that of the first TX frame in the span with
//! `S` and not `A` in `tcp_flags`; its `tcp_ports` select the frames, its `tcp_seq`
//! is the ISN. A frame's `data` descriptor records, in chain order, make up the frame
//! from offset 0; bytes at frame offsets `[tcp_payload_off, tcp_payload_off +
//! tcp_len)` are payload (Ethernet padding is not), at stream offset `tcp_seq - isn -
//! 1 + (frame_off - tcp_payload_off)` (u32 wrapping, unwrapped to 64 bits against
//! the previous frame), which is the file offset. Every payload byte counts
//! (retransmissions too). A piece (4 KiB-page cut) wholly payload is zero-copy iff
//! its guest page's last device write before it gave the page the file page holding
//! that stream offset, its page offset equals the stream offset's, and its
//! fingerprint equals that of the source bytes it should carry. Pieces mixing
//! headers and payload are copied payload.
//!
//! **CPU.** Each run of each dirty sample in the span is payload the guest CPU left
//! in a page it dirtied. A run is a DMA destination, not a copy, when its page offset
//! equals its file offset's and the page's last device write before the sample, or
//! its first device write after the sample and before the next sample (the blk thread
//! writes guest memory before it logs), gave the page that file page. Other runs are
//! counted once per guest byte and content: per page, the ranges already counted are
//! kept per `gpa - file_off`; a byte counts again only after it was counted with
//! other content, or a device wrote it, in between.
//!
//! **Last hop.** Payload the NIC read (whole pieces, payload part) that is not
//! zero-copy was put there by the CPU; when the page is listed CPU-dirtied (`dirtied`)
//! in a sample of the span no later than the first sample after the read, those
//! bytes join the same deduplication as the sampled runs. This catches buffers
//! reused before any sample saw them (device-edge linearisation).
//!
//! **Ratios.** `cpu_copies` = CPU-copied bytes / bytes sent; `dma_copies` =
//! round(disk / bytes) + round(NIC payload / bytes); mode switches = 2 x system calls.
//!
//! **Receive.** A receive method's span (its [`Method::direction`]) is judged the
//! other way round: the connection is the one the peer's send port answered (its
//! first SYN-ACK in the span), its RX frames' payload is what the NIC wrote; the
//! scratch disk's (card 1) OUT `data` records are what left, their pieces matched
//! to file offsets by content; a piece is zero-copy when the NIC's RX DMA last
//! wrote those stream bytes at that address, the content is intact and no sample
//! saw the CPU write the page in between; the CPU pass is the one above, a run or
//! read being a DMA destination also where the NIC put those bytes; the span FAILs
//! unless the disk wrote out every byte received and a FLUSH followed its last OUT
//! ([`ReceiveFigures`], `docs/method-suite.md`).

mod analyze;
mod context;
mod expect;
mod guest;
pub mod kernel;
pub mod regression;
pub mod report;
pub mod stream;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zc_dma_log::Record;
use zc_protocol::{Direction, Marker, Method};

pub use context::{Negotiated, OutputFile, RunContext, VariantRun, Verdicts, NET_CSUM};
pub use expect::{Check, Defaults, Expectation, Expectations, NoRow};
pub use guest::{parse_reports, MethodReport, ZeroCopyCounts};

use analyze::{LogIndex, SpanLookup};

/// Errors of loading the audit's inputs.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A regression patch's `Zc-Fails` prediction is not valid.
    #[error("regression patch {what}")]
    Regression {
        /// What is wrong, with the file and line.
        what: String,
    },
    /// The expectations file is not valid.
    #[error("expectations: {what}")]
    Expectations {
        /// What is wrong, with the file and table where known.
        what: String,
    },
    /// A guest method report is not valid JSON of the report's shape.
    #[error("guest report line {line}: {source}")]
    Report {
        /// 1-based line number in the text given.
        line: u64,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// Everything one run (one NIC variant) gives the audit.
#[derive(Debug, Clone, Default)]
pub struct AuditInput {
    /// The DMA log's records, header excluded (`zc_dma_log::read_log`).
    pub records: Vec<Record>,
    /// The payload file's bytes, or the prefix each method sent.
    pub source: Vec<u8>,
    /// The guest's method reports ([`parse_reports`]).
    pub reports: Vec<MethodReport>,
    /// The run's variant, as `expected.toml` names it (e.g. `sg-on`, `sg-off`).
    pub variant: String,
    /// When the log holds several cards, one per variant (`zc.cards`): the card
    /// this variant's methods went through. Its methods' spans are then
    /// `<method>@<variant>`, their reports those naming this variant, and their NIC
    /// evidence that card's frames only. `None`: a one-card run (plain spans, every
    /// card's frames, every report).
    pub card: Option<u16>,
    /// The kernel release the guest reported (`hello <release>`): chooses among the
    /// rows of `expected.toml` that name kernel versions. `None`: it reported none.
    pub kernel_release: Option<String>,
}

impl AuditInput {
    /// The span of method `name` in this input's log.
    fn span_name(&self, name: &str) -> String {
        zc_protocol::marker::qualified_span(name, self.card.map(|_| self.variant.as_str()))
    }

    /// Whether `report` is one of this input's methods.
    fn is_mine(&self, report: &MethodReport) -> bool {
        match self.card {
            Some(_) => report.variant.as_deref() == Some(self.variant.as_str()),
            None => true,
        }
    }
}

/// The audit's judgement of a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// The method ran and met every expectation.
    Pass,
    /// The method failed, lacks evidence, or missed an expectation.
    Fail,
    /// The guest skipped the method.
    Skip,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        })
    }
}

/// One method's numbers and verdict in one variant. The NIC and disk fields
/// describe a send (`nic_*`: what the NIC read; `disk_dma_bytes`: what virtio-blk
/// wrote into guest memory); a receive's own figures are in [`MethodAudit::receive`],
/// and the shared ones (`cpu_*`, `dma_copies`, `zero_copy_pct`, the system calls)
/// are judged by the same keys of `expected.toml` in both directions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MethodAudit {
    /// Method name.
    pub method: String,
    /// The run's variant.
    pub variant: String,
    /// Which way the method moves the payload (`send` or `receive` in the JSON);
    /// a name that is no method of the protocol is taken for a send.
    #[serde(serialize_with = "direction_name")]
    pub direction: Direction,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it is not PASS (for SKIP: the guest's reason), one line each.
    pub reasons: Vec<String>,
    /// Observations that do not decide the verdict (e.g. the kernel's zero-copy
    /// claim disagreeing with the device), one line each.
    pub findings: Vec<String>,
    /// Bytes sent or received (the guest's count; the source length when there is
    /// no report).
    pub bytes: u64,
    /// Chunks sent or received.
    pub chunks: Option<u64>,
    /// The guest's transfer time.
    pub seconds: Option<f64>,
    /// System calls in the per-chunk loop.
    pub loop_syscalls: Option<u64>,
    /// System calls between the marks.
    pub total_syscalls: Option<u64>,
    /// `loop_syscalls / chunks`.
    pub syscalls_per_chunk: Option<f64>,
    /// Twice `syscalls_per_chunk`.
    pub mode_switches_per_chunk: Option<f64>,
    /// Bytes virtio-blk wrote into guest memory (data) during the span.
    pub disk_dma_bytes: u64,
    /// Send: TCP payload bytes the NIC read for the method's connection (0 on a
    /// receive: see [`ReceiveFigures::nic_rx_payload_bytes`]).
    pub nic_payload_bytes: u64,
    /// Send: of those, bytes read zero-copy (where the disk put them, unchanged).
    pub nic_zero_copy_bytes: u64,
    /// Send: of those, bytes read from anywhere else.
    pub nic_copied_bytes: u64,
    /// The share, in percent, of the payload the last device read zero-copy: send,
    /// `nic_zero_copy_bytes` of `nic_payload_bytes`; receive,
    /// [`ReceiveFigures::disk_zero_copy_bytes`] of
    /// [`ReceiveFigures::disk_payload_bytes`].
    pub zero_copy_pct: f64,
    /// Payload bytes the guest CPU wrote (deduplicated, DMA destinations excluded).
    pub cpu_copied_bytes: u64,
    /// Send: of `cpu_copied_bytes`, those counted from the NIC's reads (payload it
    /// read from a CPU-dirtied page no device filled) before any sample found them;
    /// the only evidence for a buffer reused before the next sample (e.g. a frame
    /// linearised at the device edge). A receive's is
    /// [`ReceiveFigures::cpu_copied_seen_by_disk`].
    pub cpu_copied_seen_by_nic: u64,
    /// Payload bytes in CPU-dirtied pages that a device had put there (excluded):
    /// the disk for a send, the NIC's RX DMA (or the disk) for a receive.
    pub cpu_dma_destination_bytes: u64,
    /// Dirty-page samples the CPU side read.
    pub dirty_samples: u64,
    /// `cpu_copied_bytes / bytes`.
    pub cpu_copies: f64,
    /// `round(disk / bytes) + round(nic payload / bytes)`: for a receive, the
    /// scratch disk's OUT bytes and the NIC's RX payload.
    pub dma_copies: u32,
    /// `bytes * 8 / seconds`, in Mbit/s.
    pub throughput_mbit_s: Option<f64>,
    /// The kernel's zero-copy completion counts, if the method has them.
    pub kernel: Option<ZeroCopyCounts>,
    /// Sequence numbers of the `BEGIN` and `END` markers.
    pub span_seq: Option<(u64, u64)>,
    /// The expectation the method was judged against.
    pub expected: Option<Expectation>,
    /// A receive method's own figures (`None`, and absent from the JSON, for a
    /// send method).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive: Option<ReceiveFigures>,
}

/// What a receive method's span shows: the payload in from the NIC, out to the
/// scratch disk, and where the disk read it from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReceiveFigures {
    /// TCP payload bytes the NIC's RX DMA wrote into guest memory for the
    /// connection from the peer's send port (retransmissions included).
    pub nic_rx_payload_bytes: u64,
    /// Data bytes the scratch disk read out of guest memory (OUT requests),
    /// file-system metadata included.
    pub disk_out_bytes: u64,
    /// Of those, payload: bytes whose content is the file's (a whole page by its
    /// fingerprint, a part of one where the NIC put those very bytes), each time the
    /// disk read them.
    pub disk_payload_bytes: u64,
    /// Distinct bytes of the file, of the `bytes` received, the scratch disk read:
    /// the receive FAILs unless this is all of them.
    pub disk_file_bytes: u64,
    /// Of the payload, bytes the disk read zero-copy: from where the NIC's RX DMA
    /// put them, unchanged, in a page KVM did not see the CPU write in between.
    pub disk_zero_copy_bytes: u64,
    /// Of the payload, bytes the disk read from anywhere else.
    pub disk_copied_bytes: u64,
    /// Of `cpu_copied_bytes`, those counted from the disk's reads (payload it read
    /// from a CPU-dirtied page no device filled) before any sample found them.
    pub cpu_copied_seen_by_disk: u64,
    /// Whether a FLUSH of the scratch disk completed after its last OUT and before
    /// `END` (the receive FAILs without one).
    pub flushed: bool,
    /// Data bytes the test disk (card 0) moved during the span; a receive needs
    /// none (a finding when not 0).
    pub test_disk_bytes: u64,
}

fn direction_name<S: serde::Serializer>(d: &Direction, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

/// Audits every method of one run: those the guest reported, in report order, then
/// those with a `BEGIN` marker but no report (only names `expected.toml` knows, so
/// other steps' markers are left alone). A method in `expectations` that this run
/// did not run is not listed; whether that matters is the caller's call.
pub fn audit(input: &AuditInput, expectations: &Expectations) -> Vec<MethodAudit> {
    let index = LogIndex::new(&input.records, &input.source);
    let mut names: Vec<&str> = Vec::new();
    for r in input.reports.iter().filter(|r| input.is_mine(r)) {
        if !names.contains(&r.method.as_str()) {
            names.push(&r.method);
        }
    }
    for span in index.begin_spans() {
        let (n, variant) = span.split_variant();
        let mine = match input.card {
            Some(_) => variant == Some(input.variant.as_str()),
            None => variant.is_none(),
        };
        if mine && expectations.methods.contains_key(n) && !names.contains(&n) {
            names.push(n);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let report = input
                .reports
                .iter()
                .find(|r| r.method == name && input.is_mine(r));
            audit_one(name, report, input, &index, expectations)
        })
        .collect()
}

/// Like [`audit`], and also gives every method of `wanted` a row: one the run never
/// got to (no report, no marker) FAILs with those reasons instead of being left out.
pub fn audit_wanted(
    input: &AuditInput,
    expectations: &Expectations,
    wanted: &[String],
) -> Vec<MethodAudit> {
    let mut audits = audit(input, expectations);
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !audits.iter().any(|a| &a.method == *w))
        .collect();
    if !missing.is_empty() {
        let index = LogIndex::new(&input.records, &input.source);
        for name in missing {
            audits.push(audit_one(name, None, input, &index, expectations));
        }
    }
    audits
}

/// Puts a boot's failure (`why`: kernel did not boot, guest exited N with its own
/// error line, timeout...) first among the reasons of every method of that boot that
/// FAILs, so that a method the guest never got to says why, not only that its report
/// is missing.
pub fn blame_run_failure(audits: &mut [MethodAudit], why: &str) {
    for a in audits.iter_mut().filter(|a| a.verdict == Verdict::Fail) {
        a.reasons.insert(0, why.to_string());
    }
}

/// Takes back every PASS of a boot whose evidence is incomplete (`why`: its DMA log
/// could not be written, or cannot be read to its end): a method that looks clean
/// in a log cut short may have done its copies in the part that is missing. Each
/// becomes a FAIL with `why` as its first reason; FAILs get `why` first too, and a
/// SKIP (the guest's own decision) stays.
pub fn withhold_passes(audits: &mut [MethodAudit], why: &str) {
    for a in audits.iter_mut().filter(|a| a.verdict != Verdict::Skip) {
        a.verdict = Verdict::Fail;
        a.reasons.insert(0, why.to_string());
    }
}

fn ratio(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

fn audit_one(
    name: &str,
    report: Option<&MethodReport>,
    input: &AuditInput,
    index: &LogIndex,
    expectations: &Expectations,
) -> MethodAudit {
    let selected = expectations.select(name, &input.variant, input.kernel_release.as_deref());
    let expected = selected.as_ref().ok().map(|e| (*e).clone());
    let bytes = report
        .and_then(|r| r.bytes)
        .unwrap_or(input.source.len() as u64);
    let chunks = report.and_then(|r| r.chunks);
    let loop_syscalls = report.and_then(|r| r.loop_syscalls);
    let syscalls_per_chunk = match (loop_syscalls, chunks) {
        (Some(l), Some(c)) if c > 0 => Some(l as f64 / c as f64),
        _ => None,
    };
    let total_syscalls = report.and_then(|r| {
        if r.syscalls.is_empty() {
            r.loop_syscalls.zip(r.setup_syscalls).map(|(a, b)| a + b)
        } else {
            Some(r.syscalls.iter().map(|(_, n)| n).sum())
        }
    });
    let seconds = report.and_then(|r| r.seconds);
    let direction = name
        .parse::<Method>()
        .map_or(Direction::Send, Method::direction);
    let mut a = MethodAudit {
        method: name.to_string(),
        variant: input.variant.clone(),
        direction,
        verdict: Verdict::Pass,
        reasons: Vec::new(),
        findings: Vec::new(),
        bytes,
        chunks,
        seconds,
        loop_syscalls,
        total_syscalls,
        syscalls_per_chunk,
        mode_switches_per_chunk: syscalls_per_chunk.map(|s| 2.0 * s),
        disk_dma_bytes: 0,
        nic_payload_bytes: 0,
        nic_zero_copy_bytes: 0,
        nic_copied_bytes: 0,
        zero_copy_pct: 0.0,
        cpu_copied_bytes: 0,
        cpu_copied_seen_by_nic: 0,
        cpu_dma_destination_bytes: 0,
        dirty_samples: 0,
        cpu_copies: 0.0,
        dma_copies: 0,
        throughput_mbit_s: seconds
            .filter(|s| *s > 0.0)
            .map(|s| bytes as f64 * 8.0 / s / 1e6),
        kernel: report.and_then(|r| r.zerocopy),
        span_seq: None,
        expected: expected.clone(),
        receive: None,
    };

    if let Some(why) = report.and_then(|r| r.skipped.as_ref()) {
        a.verdict = Verdict::Skip;
        a.reasons.push(why.clone());
        return a;
    }
    match report {
        None => a.reasons.push("no guest report".to_string()),
        Some(r) if !r.ok => a.reasons.push(format!(
            "guest: {}",
            r.error.as_deref().unwrap_or("not ok (no error given)")
        )),
        Some(_) => {}
    }
    let span_name = input.span_name(name);
    let span = match index.span(&span_name) {
        SpanLookup::Found(s) => Some(s),
        SpanLookup::NoBegin => {
            a.reasons.push(format!(
                "no `{}` marker in the DMA log",
                Marker::begin(span_name.as_str())
            ));
            None
        }
        SpanLookup::NoEnd => {
            a.reasons.push(format!(
                "no `{}` marker after `{}`",
                Marker::end(span_name.as_str()),
                Marker::begin(span_name.as_str())
            ));
            None
        }
    };
    if let Err(no_row) = selected {
        a.reasons.push(no_row.0);
    }
    let mut receive_reasons = Vec::new();
    if let Some(span) = span {
        a.span_seq = Some((index.seq(span.begin), index.seq(span.end)));
        if span.duplicates > 0 {
            a.findings.push(format!(
                "{} more `{}` markers in the log: audited the first run only",
                span.duplicates,
                Marker::begin(span_name.as_str())
            ));
        }
        match direction {
            Direction::Send => fill(&mut a, &index.analyze(&span, input.card)),
            Direction::Receive => {
                receive_reasons = fill_receive(&mut a, &index.analyze_receive(&span, input.card));
            }
        }
    }
    // Numbers from a run without its marks or its report would be judged on half the
    // evidence; the structural reasons above already decide the verdict.
    if a.reasons.is_empty() {
        if let Some(e) = &expected {
            let m = expect::Measured {
                syscalls_per_chunk: a.syscalls_per_chunk,
                mode_switches_per_chunk: a.mode_switches_per_chunk,
                dma_copies: a.dma_copies,
                cpu_copies: a.cpu_copies,
                zero_copy_pct: a.zero_copy_pct,
                kernel_copied: a.kernel.and_then(|k| k.copied),
                dirty_samples: a.dirty_samples,
            };
            a.reasons = e.check(&expectations.defaults, &m);
        }
    }
    // Whether the data reached the disk is no expectation of the table: every
    // receive must show it, and a row's numbers do not excuse its absence.
    a.reasons.extend(receive_reasons);
    if !a.reasons.is_empty() {
        a.verdict = Verdict::Fail;
    }
    a
}

/// The shared CPU figures and their findings.
fn fill_cpu(a: &mut MethodAudit, ev: &analyze::Evidence) {
    a.cpu_copied_bytes = ev.cpu_copied_bytes;
    a.cpu_dma_destination_bytes = ev.cpu_dma_destination_bytes;
    a.dirty_samples = ev.dirty_samples;
    a.cpu_copies = ratio(ev.cpu_copied_bytes, a.bytes);
    if let Some(chunks) = a.chunks {
        if ev.dirty_samples < chunks + 1 {
            a.findings.push(format!(
                "{} dirty-page samples for {chunks} chunks (expected one per chunk and one at END): CPU copies may be undercounted",
                ev.dirty_samples
            ));
        }
    }
}

/// Copies counted per byte moved, rounded.
fn rounded_copies(n: u64, bytes: u64) -> u32 {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "rounded first; a float-to-int `as` saturates, and a copy count is a small number"
    )]
    let r = ratio(n, bytes).round() as u32;
    r
}

/// Copies a receive span's evidence into `a`, notes what looks wrong with it, and
/// returns what makes it FAIL whatever the expectations say: data that did not
/// reach the scratch disk, or was not flushed there.
fn fill_receive(a: &mut MethodAudit, ev: &analyze::Evidence) -> Vec<String> {
    let file_bytes = ev.disk_file_ranges.covered_within(0, a.bytes);
    let r = ReceiveFigures {
        nic_rx_payload_bytes: ev.nic_payload_bytes,
        disk_out_bytes: ev.disk_out_bytes,
        disk_payload_bytes: ev.disk_payload_bytes,
        disk_file_bytes: file_bytes,
        disk_zero_copy_bytes: ev.disk_zero_copy_bytes,
        disk_copied_bytes: ev.disk_payload_bytes - ev.disk_zero_copy_bytes,
        cpu_copied_seen_by_disk: ev.cpu_copied_seen_by_reader,
        flushed: ev.flushed,
        test_disk_bytes: ev.test_disk_bytes,
    };
    a.disk_dma_bytes = ev.disk_dma_bytes;
    a.zero_copy_pct = 100.0 * ratio(r.disk_zero_copy_bytes, r.disk_payload_bytes);
    fill_cpu(a, ev);
    a.dma_copies =
        rounded_copies(r.disk_out_bytes, a.bytes) + rounded_copies(r.nic_rx_payload_bytes, a.bytes);

    if ev.no_syn {
        a.findings.push(format!(
            "no SYN-ACK from the peer's port {} in the span: no NIC payload attributed",
            zc_protocol::addr::PEER_SEND_PORT
        ));
    } else if r.nic_rx_payload_bytes < a.bytes {
        a.findings.push(format!(
            "the NIC wrote {} payload bytes for the connection from port {}, fewer than the {} received",
            r.nic_rx_payload_bytes,
            ev.peer_port.unwrap_or(0),
            a.bytes
        ));
    }
    if ev.nic_beyond_source > 0 {
        a.findings.push(format!(
            "{} NIC payload bytes lie beyond the {}-byte source",
            ev.nic_beyond_source, a.bytes
        ));
    }
    if ev.zero_copy_but_dirtied > 0 {
        a.findings.push(format!(
            "{} payload bytes the disk read where the NIC had put them, unchanged, are counted as copied: KVM saw the CPU write their pages in between (its log is per page)",
            ev.zero_copy_but_dirtied
        ));
    }
    if r.test_disk_bytes > 0 {
        a.findings.push(format!(
            "the test disk moved {} data bytes during the receive, which needs only the scratch disk",
            r.test_disk_bytes
        ));
    }
    let mut reasons = Vec::new();
    if file_bytes < a.bytes {
        let gap = ev
            .disk_file_ranges
            .first_gap(0, a.bytes)
            .map(|(s, e)| format!(" (first missing: file bytes {s}..{e})"))
            .unwrap_or_default();
        reasons.push(format!(
            "the scratch disk wrote out {file_bytes} of the {} bytes received{gap}",
            a.bytes
        ));
    }
    if ev.failed_outs > 0 {
        reasons.push(format!(
            "{} OUT requests of the scratch disk failed: the data may not be on the disk",
            ev.failed_outs
        ));
    }
    if !r.flushed {
        reasons.push("no FLUSH before END: the data may not be on the disk".to_string());
    }
    a.receive = Some(r);
    reasons
}

/// Copies a send span's device evidence into `a` and notes what looks wrong with it.
fn fill(a: &mut MethodAudit, ev: &analyze::Evidence) {
    a.disk_dma_bytes = ev.disk_dma_bytes;
    a.nic_payload_bytes = ev.nic_payload_bytes;
    a.nic_zero_copy_bytes = ev.nic_zero_copy_bytes;
    a.nic_copied_bytes = ev.nic_payload_bytes - ev.nic_zero_copy_bytes;
    a.zero_copy_pct = 100.0 * ratio(ev.nic_zero_copy_bytes, ev.nic_payload_bytes);
    a.cpu_copied_seen_by_nic = ev.cpu_copied_seen_by_reader;
    a.dma_copies =
        rounded_copies(ev.disk_dma_bytes, a.bytes) + rounded_copies(ev.nic_payload_bytes, a.bytes);

    if ev.no_syn {
        a.findings
            .push("no TCP SYN from the guest in the span: no NIC payload attributed".to_string());
    } else if ev.nic_payload_bytes < a.bytes {
        a.findings.push(format!(
            "the NIC read {} payload bytes for the connection to port {}, fewer than the {} sent",
            ev.nic_payload_bytes,
            ev.peer_port.unwrap_or(0),
            a.bytes
        ));
    }
    if ev.nic_beyond_source > 0 {
        a.findings.push(format!(
            "{} NIC payload bytes lie beyond the {}-byte source (counted as copied)",
            ev.nic_beyond_source, a.bytes
        ));
    }
    fill_cpu(a, ev);
    if let Some(ZeroCopyCounts {
        sends,
        fallbacks: Some(fallbacks),
        ..
    }) = a.kernel
    {
        if fallbacks > 0 {
            a.findings.push(format!(
                "the kernel refused MSG_ZEROCOPY (ENOBUFS) {fallbacks} times; the guest sent those bytes with plain, copying sends, which no completion reports ({sends} zero-copy sends accepted)"
            ));
        }
    }
    // A kernel that cannot tell which sends it copied (`copied: null`) has no claim
    // to compare.
    if let Some(ZeroCopyCounts {
        sends,
        copied: Some(copied),
        ..
    }) = a.kernel
    {
        if sends > 0 && ev.nic_payload_bytes > 0 {
            let kernel = ratio(copied, sends);
            let device = ratio(a.nic_copied_bytes, ev.nic_payload_bytes);
            // A tenth of the sends: a few fallback sends, or COW's one copied page
            // in sixteen, are not a disagreement; the kernel calling a third of
            // the sends zero-copy while the NIC read every byte from copies is.
            if (kernel - device).abs() > 0.1 {
                a.findings.push(format!(
                    "kernel flagged {} of {} zero-copy sends as copied, but the NIC read {:.1}% of the payload from copies",
                    copied,
                    sends,
                    100.0 * device
                ));
            }
        }
    }
}
