//! The log's writer thread and the queue that feeds it.
//!
//! Device threads (the vCPU threads) only take a short lock to number a record,
//! stamp its time and append it, with a copy of the guest bytes it describes, to the
//! pending batch. The writer thread swaps the whole batch out, fingerprints the
//! copies, formats the lines and writes them. This keeps hashing, formatting and
//! file I/O off the threads that run the guest: in the emulated host every
//! instruction on a vCPU thread is time the guest does not run, while the host's
//! other CPU is mostly idle.
//!
//! Because records are numbered and appended under the same lock, the queue is in
//! `seq` order and the file is too, whichever thread (device or VMM) made them.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::compact::{self, Encoder};
use crate::handle::{Chain, FramePatch, COPY_LIMIT};
use crate::page_table::PageTable;
use crate::{
    fingerprint, page_pieces, DescInfo, DetailFn, DeviceErrorRecord, DeviceKind, DirtyRecord,
    DmaLogError, MarkerRecord, PayloadRun, Piece, RequestDetail, PAGE_SIZE,
};

/// A pending batch holding this many records wakes a lingering writer at once.
const WAKE_ENTRIES: usize = 4096;
/// ... or this many bytes to fingerprint (copies, or ranges of stable files).
const WAKE_BYTES: usize = 1 << 20;
/// A producer waits for the writer rather than let the batch grow past this many
/// records ...
const MAX_ENTRIES: usize = 1 << 16;
/// ... or this many bytes to fingerprint, so that memory stays bounded and the writer
/// does not fall far behind (the device then runs at the writer's pace: nothing is
/// dropped).
pub(crate) const MAX_BYTES: usize = 8 << 20;
/// How long the writer lets records accumulate after the first one arrives, so that
/// one wake-up writes many records and producers rarely need to wake it.
const LINGER: Duration = Duration::from_millis(2);
/// Formatted lines are handed to the output in chunks of about this size.
const OUT_CHUNK: usize = 1 << 20;
/// Stable files are read again in chunks of at most this size (a multiple of pages).
const FILE_CHUNK: usize = 1 << 20;

/// What the writer thread is doing, so that producers wake it only when needed (a
/// condvar notification is a system call even when nobody waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriterState {
    /// Writing, or about to look at the queue again.
    Busy,
    /// Waiting a short while for more records (a batch is pending).
    Lingering,
    /// Waiting for the first record (nothing pending).
    Idle,
}

/// The fingerprints of a `desc` record, or what the writer computes them from.
pub(crate) enum Pieces {
    /// Already computed by the device thread.
    Hashed(Vec<Piece>),
    /// A copy taken when the device accessed them.
    Copied(Copied),
    /// The record's `len` bytes at `off` in stable file number `file` (see
    /// [`Shared::add_file`]), whose contents do not change.
    File { file: u32, off: u64 },
}

/// Bytes copied into a batch when the device accessed them: `len` of them at `at`
/// in the batch's `bytes`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Copied {
    at: usize,
    len: usize,
}

impl Copied {
    /// The last `len` bytes of the copy, if it is exactly `skip + len` long.
    pub(crate) fn skip(self, skip: usize, len: usize) -> Option<Copied> {
        (skip.checked_add(len) == Some(self.len)).then_some(Copied {
            at: self.at + skip,
            len,
        })
    }

    /// The copied bytes, in the `bytes` of the batch they were copied into.
    fn of(self, bytes: &[u8]) -> &[u8] {
        &bytes[self.at..self.at + self.len]
    }
}

/// The detail of a `request` record, or what the writer works it out from.
pub(crate) enum Detail {
    /// Given by the device.
    Ready(RequestDetail),
    /// `detail(bytes, arg)`, on the writer thread, `bytes` with `patch` applied.
    Deferred {
        bytes: Copied,
        arg: u64,
        detail: DetailFn,
        patch: Option<FramePatch>,
    },
}

/// One queued record, minus `seq` and `t_ns`.
pub(crate) enum Body {
    Desc(DescInfo, Pieces),
    Request(Chain, Detail),
    Marker(String),
    DeviceError {
        device: DeviceKind,
        queue: u16,
        head: Option<u16>,
        error: String,
        needs_reset: bool,
    },
    Dirty {
        sample: u32,
        dirty_pages: u32,
        dirtied: Vec<u64>,
        runs: Vec<PayloadRun>,
    },
}

struct Entry {
    seq: u64,
    t_ns: u64,
    /// The card of a device record (`DmaLog::for_card`).
    card: u16,
    body: Body,
}

/// Records waiting for the writer, and the guest bytes they fingerprint.
pub(crate) struct Batch {
    entries: Vec<Entry>,
    /// Copies of guest bytes, `used` bytes long. The vector keeps its largest length
    /// across batches so that reusing it never zero-fills again.
    bytes: Vec<u8>,
    used: usize,
    /// Bytes of stable files the records refer to: they cost the writer as much as
    /// copies, so they count against the same limits.
    file_bytes: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            entries: Vec::with_capacity(WAKE_ENTRIES),
            // Large enough that a batch rarely grows (growing copies and zero-fills
            // on the device thread); fresh zeroed pages from the allocator cost no
            // zero-filling either.
            bytes: vec![0; WAKE_BYTES + COPY_LIMIT],
            used: 0,
            file_bytes: 0,
        }
    }

    /// Bytes the writer will fingerprint for this batch.
    fn weight(&self) -> usize {
        self.used + self.file_bytes
    }

    /// Counts `len` bytes of a stable file that a record refers to.
    pub(crate) fn add_file_bytes(&mut self, len: usize) {
        self.file_bytes += len;
    }

    /// Room for `len` more bytes of copies: returns where they are and the slice to
    /// fill. [`Batch::unreserve`] gives the room back if filling fails.
    pub(crate) fn reserve(&mut self, len: usize) -> (Copied, &mut [u8]) {
        let at = self.used;
        let end = at + len;
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.used = end;
        (Copied { at, len }, &mut self.bytes[at..end])
    }

    /// A copy of `bytes` in the batch.
    pub(crate) fn copy(&mut self, bytes: &[u8]) -> Copied {
        let (copied, dst) = self.reserve(bytes.len());
        dst.copy_from_slice(bytes);
        copied
    }

    /// The copies of `chain`'s `desc` records (of its card) at the end of the batch, if they are
    /// its last records and their copies are its last bytes, one after the other:
    /// what a device just read of that chain (see `DmaLog::request_from_read`).
    pub(crate) fn trailing_copies_of(&self, chain: Chain) -> Option<Copied> {
        let mut start = None;
        let mut end = self.used;
        for e in self.entries.iter().rev() {
            match &e.body {
                Body::Desc(info, Pieces::Copied(c))
                    if info.chain(e.card) == chain && c.at + c.len == end =>
                {
                    end = c.at;
                    start = Some(c.at);
                }
                _ => break,
            }
        }
        start.map(|at| Copied {
            at,
            len: self.used - at,
        })
    }

    /// Gives back the room of the last [`Batch::reserve`].
    #[cfg(feature = "guest-memory")]
    pub(crate) fn unreserve(&mut self, last: Copied) {
        self.used = last.at;
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.used = 0;
        self.file_bytes = 0;
    }
}

struct State {
    /// Next `seq` to hand out.
    seq: u64,
    pending: Batch,
    /// Set after the first write error (or if the writer thread died): records are
    /// dropped from then on, as a partial line may already be in the file.
    stopped: bool,
    /// The first write error, for [`Shared::flush`] to report.
    error: Option<io::Error>,
    /// Told of the first write error as soon as the writer meets it
    /// ([`Shared::on_write_error`]).
    on_error: Option<ErrorHook>,
    writer: WriterState,
    /// Producers waiting on `done` for room in the batch.
    room_waiters: usize,
    /// Callers of `flush` waiting on `done`.
    flush_waiters: usize,
    /// Flush tickets handed out, and the last one the writer has completed.
    flush_asked: u64,
    flush_done: u64,
    /// Every handle is gone: write what is queued and stop.
    shutdown: bool,
    /// The writer thread has ended (only on shutdown, unless it panicked).
    writer_gone: bool,
}

/// What [`Shared::on_write_error`] takes.
pub(crate) type ErrorHook = Box<dyn FnOnce(&io::Error) + Send>;

/// What the log's handles and its writer thread share.
pub(crate) struct Shared {
    start: Instant,
    state: Mutex<State>,
    /// The writer waits here for records.
    wake: Condvar,
    /// Producers waiting for room and callers of `flush` wait here.
    done: Condvar,
    /// Stable files, by number ([`Pieces::File`]).
    files: Mutex<Vec<StableEntry>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the state consistent (every
        // update is a few plain assignments), so keep logging.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a file whose contents do not change while the log lives; returns
    /// its number for [`Pieces::File`].
    pub(crate) fn add_file(&self, file: File) -> u32 {
        let file = Arc::new(file);
        let pages = PageTable::start(file.clone());
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.push(StableEntry { file, pages });
        u32::try_from(files.len() - 1).expect("a log registers a handful of stable files")
    }

    /// Queues one record: `make` builds it (given the pending batch to copy guest
    /// bytes into, at most `copy_len` of them) under the lock, right after its
    /// `seq` and `t_ns` are taken, so that they are those of the access it records.
    pub(crate) fn push(&self, card: u16, copy_len: usize, make: impl FnOnce(&mut Batch) -> Body) {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return;
            }
            let p = &st.pending;
            // An empty batch takes any record (`copy_len` is at most `MAX_BYTES`).
            if p.entries.len() < MAX_ENTRIES
                && (p.weight() == 0 || p.weight() + copy_len <= MAX_BYTES)
            {
                break;
            }
            if st.writer != WriterState::Busy {
                st.writer = WriterState::Busy;
                self.wake.notify_one();
            }
            st.room_waiters += 1;
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
            st.room_waiters -= 1;
        }
        let seq = st.seq;
        st.seq += 1;
        let t_ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let weight_before = st.pending.weight();
        let body = make(&mut st.pending);
        let p = &mut st.pending;
        p.entries.push(Entry {
            seq,
            t_ns,
            card,
            body,
        });
        let wake = match st.writer {
            WriterState::Busy => false,
            WriterState::Idle => true,
            WriterState::Lingering => {
                let p = &st.pending;
                p.entries.len() == WAKE_ENTRIES
                    || (weight_before < WAKE_BYTES && p.weight() >= WAKE_BYTES)
            }
        };
        if wake {
            st.writer = WriterState::Busy;
            self.wake.notify_one();
        }
    }

    /// Has `hook` called, once, with the first write error: on the writer thread
    /// when it meets the error (without the log's lock held), or at once on this
    /// thread if the log has already failed. Replaces an earlier hook.
    pub(crate) fn on_write_error(&self, hook: ErrorHook) {
        let mut st = self.lock();
        match &st.error {
            Some(e) => {
                let e = copy_error(e);
                drop(st);
                hook(&e);
            }
            None => st.on_error = Some(hook),
        }
    }

    /// Waits until every record queued before the call is written and the output
    /// flushed; returns the first write error since the log started, if any.
    pub(crate) fn flush(&self) -> Result<(), DmaLogError> {
        let mut st = self.lock();
        st.flush_asked += 1;
        let ticket = st.flush_asked;
        if st.writer != WriterState::Busy {
            st.writer = WriterState::Busy;
            self.wake.notify_one();
        }
        while st.flush_done < ticket && !st.writer_gone {
            st.flush_waiters += 1;
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
            st.flush_waiters -= 1;
        }
        if let Some(e) = st.error.take() {
            // Keep the log stopped and the error reported by later flushes too.
            st.error = Some(io::Error::new(e.kind(), e.to_string()));
            return Err(DmaLogError::Io(e));
        }
        if st.flush_done < ticket {
            return Err(DmaLogError::Io(io::Error::other(
                "the DMA log writer thread stopped (panicked); records were lost",
            )));
        }
        Ok(())
    }
}

/// The handle every [`DmaLog`](crate::DmaLog) clone points to; dropping the last one
/// writes out what is queued and ends the writer thread.
pub(crate) struct Handle {
    pub(crate) shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            st.writer = WriterState::Busy;
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // A panic of the writer was already reported on stderr by the runtime.
            let _ = t.join();
        }
    }
}

/// Starts the writer thread over `out`; `head` (the header line) is written first.
pub(crate) fn start(out: Box<dyn Write + Send>, head: Vec<u8>) -> Result<Handle, DmaLogError> {
    let shared = Arc::new(Shared {
        start: Instant::now(),
        state: Mutex::new(State {
            seq: 0,
            pending: Batch::new(),
            stopped: false,
            error: None,
            on_error: None,
            writer: WriterState::Busy,
            room_waiters: 0,
            flush_waiters: 0,
            flush_asked: 0,
            flush_done: 0,
            shutdown: false,
            writer_gone: false,
        }),
        wake: Condvar::new(),
        done: Condvar::new(),
        files: Mutex::new(Vec::new()),
    });
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new()
        .name("zc-dma-log".into())
        .spawn(move || {
            lower_this_threads_priority();
            zc_seccomp::enter(zc_seccomp::Role::DmaLogWriter);
            let gone = Gone(&for_thread);
            run(
                &for_thread,
                Sink {
                    out,
                    buf: head,
                    files: Vec::new(),
                    scratch: Vec::new(),
                    enc: Encoder::default(),
                    frame: Vec::new(),
                },
            );
            drop(gone);
        })?;
    Ok(Handle {
        shared,
        thread: Some(thread),
    })
}

/// Lets the calling thread (the log's writer, or its page-table pass) have only the
/// CPU time that the vCPUs and device threads leave: the log must not slow the guest
/// down where it can wait (producers still wait for it once it falls 8 MiB
/// behind, so it cannot starve for long).
pub(crate) fn lower_this_threads_priority() {
    // On Linux, PRIO_PROCESS with who 0 (`None`) is the calling thread. Failing leaves
    // the priority as it was, which is harmless.
    let _ = rustix::process::setpriority_process(None, 19);
}

/// Marks the writer gone however it ends, so that `flush` never waits forever.
struct Gone<'a>(&'a Shared);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.writer_gone = true;
        st.stopped = true;
        self.0.done.notify_all();
    }
}

/// The output and the lines formatted but not yet handed to it.
struct Sink {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// The writer's copy of [`Shared::files`], refreshed when a record names a file
    /// it does not have yet.
    files: Vec<StableEntry>,
    /// Where ranges of stable files are read to be fingerprinted.
    scratch: Vec<u8>,
    /// The line being written.
    enc: Encoder,
    /// Where a frame is patched before its request detail is worked out.
    frame: Vec<u8>,
}

impl Sink {
    /// Formats and writes the batch's records, emptying it.
    fn write_batch(&mut self, shared: &Shared, batch: &mut Batch) -> io::Result<()> {
        let Batch { entries, bytes, .. } = batch;
        for e in entries.drain(..) {
            self.format(shared, e, bytes)?;
            if self.buf.len() >= OUT_CHUNK {
                self.out.write_all(&self.buf)?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    /// Appends the record of `e`, whose guest copies are in `bytes` (a chain's
    /// records may join the line of the one before: see `compact`).
    fn format(&mut self, shared: &Shared, e: Entry, bytes: &[u8]) -> io::Result<()> {
        let (seq, t_ns, card) = (e.seq, e.t_ns, e.card);
        let out = &mut self.buf;
        match e.body {
            Body::Desc(info, Pieces::Hashed(pieces)) => {
                self.enc.desc(out, seq, t_ns, card, &info, &pieces);
            }
            Body::Desc(info, Pieces::Copied(copied)) => {
                self.enc.begin_desc(out, seq, t_ns, card, &info);
                push_hashes(out, info.gpa, copied.of(bytes));
                Encoder::end_desc(out);
            }
            Body::Desc(info, Pieces::File { file, off }) => {
                self.enc.begin_desc(out, seq, t_ns, card, &info);
                self.file_hashes(shared, file, off, info.gpa, u64::from(info.len))?;
                Encoder::end_desc(&mut self.buf);
            }
            Body::Request(chain, detail) => {
                let req = match detail {
                    Detail::Ready(req) => req,
                    Detail::Deferred {
                        bytes: copied,
                        arg,
                        detail,
                        patch: None,
                    } => detail(copied.of(bytes), arg),
                    Detail::Deferred {
                        bytes: copied,
                        arg,
                        detail,
                        patch: Some(patch),
                    } => {
                        self.frame.clear();
                        self.frame.extend_from_slice(copied.of(bytes));
                        patch.apply(&mut self.frame);
                        detail(&self.frame, arg)
                    }
                };
                self.enc
                    .request(out, seq, t_ns, chain.with_card(card), &req);
            }
            // Rare records: serde's output is the reference, and its cost does not matter.
            Body::Marker(label) => {
                self.enc.close(out);
                compact::marker(out, MarkerRecord { seq, t_ns, label })?;
            }
            Body::DeviceError {
                device,
                queue,
                head,
                error,
                needs_reset,
            } => {
                self.enc.close(out);
                compact::device_error(
                    out,
                    DeviceErrorRecord {
                        seq,
                        t_ns,
                        device,
                        card,
                        queue,
                        head,
                        error,
                        needs_reset,
                    },
                )?;
            }
            Body::Dirty {
                sample,
                dirty_pages,
                dirtied,
                runs,
            } => {
                self.enc.close(out);
                compact::dirty(
                    out,
                    &DirtyRecord {
                        seq,
                        t_ns,
                        sample,
                        dirty_pages,
                        dirtied,
                        runs,
                    },
                );
            }
        }
        Ok(())
    }

    /// Appends the fingerprints of the pieces of the guest range at `gpa`, `len` bytes
    /// long, that a device filled from `off` in stable file number `file`: the file is
    /// read again, in chunks that end on guest page boundaries so that no piece is
    /// split.
    fn file_hashes(
        &mut self,
        shared: &Shared,
        file: u32,
        off: u64,
        gpa: u64,
        len: u64,
    ) -> io::Result<()> {
        let index = file as usize;
        if index >= self.files.len() {
            self.files = shared
                .files
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        }
        let entry = self.files.get(index).ok_or_else(|| {
            io::Error::other(format!(
                "DMA log: a record names unknown stable file {file}"
            ))
        })?;
        let mut done = 0u64;
        while done < len {
            let at = gpa.wrapping_add(done);
            let mut n = (len - done).min(FILE_CHUNK as u64);
            if n < len - done {
                n -= at.wrapping_add(n) % PAGE_SIZE;
            }
            if let Some(hashes) = table_hashes(&entry.pages, at, off + done, n) {
                for hash in hashes {
                    Encoder::hash(&mut self.buf, hash);
                }
                done += n;
                continue;
            }
            self.scratch
                .resize(usize::try_from(n).expect("at most FILE_CHUNK"), 0);
            entry.file.read_exact_at(&mut self.scratch, off + done).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "DMA log: cannot read the disk image again at {} (+{n} bytes) to fingerprint what the device read: {e}",
                        off + done
                    ),
                )
            })?;
            push_hashes(&mut self.buf, at, &self.scratch);
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.enc.close(&mut self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.out.flush()
    }
}

fn run(shared: &Shared, mut sink: Sink) {
    let mut batch = Batch::new();
    let mut failed = false;
    loop {
        let (ticket, shutdown, flushed) = {
            let mut st = shared.lock();
            let mut lingered = false;
            loop {
                let p = &st.pending;
                if st.shutdown
                    || st.flush_asked != st.flush_done
                    || p.entries.len() >= WAKE_ENTRIES
                    || p.weight() >= WAKE_BYTES
                    || (st.room_waiters > 0 && !p.entries.is_empty())
                    || (lingered && !p.entries.is_empty())
                {
                    break;
                }
                if p.entries.is_empty() {
                    st.writer = WriterState::Idle;
                    st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
                } else {
                    st.writer = WriterState::Lingering;
                    st = shared
                        .wake
                        .wait_timeout(st, LINGER)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    lingered = true;
                }
            }
            st.writer = WriterState::Busy;
            std::mem::swap(&mut st.pending, &mut batch);
            if st.room_waiters > 0 {
                shared.done.notify_all();
            }
            (st.flush_asked, st.shutdown, st.flush_done)
        };
        let mut result = Ok(());
        if !failed {
            result = sink.write_batch(shared, &mut batch);
            if result.is_ok() && (ticket != flushed || shutdown) {
                result = sink.flush();
            }
        }
        batch.clear();
        let mut st = shared.lock();
        let mut tell = None;
        if let Err(e) = result {
            failed = true;
            st.stopped = true;
            tell = st.on_error.take().map(|hook| (hook, copy_error(&e)));
            st.error.get_or_insert(e);
        }
        st.flush_done = ticket;
        if st.flush_waiters > 0 {
            shared.done.notify_all();
        }
        let end = shutdown && st.pending.entries.is_empty();
        drop(st);
        // Outside the lock, so that the hook may take its time or even record (the
        // log being stopped, that returns at once).
        if let Some((hook, e)) = tell {
            hook(&e);
        }
        if end {
            return;
        }
    }
}

/// `e` again (`io::Error` is not `Clone`): its kind and its message, which for an
/// OS error includes the code, e.g. "No space left on device (os error 28)".
fn copy_error(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// A stable file and the fingerprints of its pages, once known.
#[derive(Clone)]
pub(crate) struct StableEntry {
    file: Arc<File>,
    pages: Arc<PageTable>,
}

/// The fingerprints of the pieces of guest range `[gpa, gpa + len)`, filled from
/// `off` in a file, taken from the file's page table: only when every piece is a
/// whole page of the file at a page-aligned offset and the table has it.
fn table_hashes(pages: &PageTable, gpa: u64, off: u64, len: u64) -> Option<Vec<u64>> {
    page_pieces(gpa, len)
        .map(|(piece_gpa, piece_len)| {
            if u64::from(piece_len) != PAGE_SIZE {
                return None;
            }
            pages.page(off + (piece_gpa - gpa))
        })
        .collect()
}

/// Appends the fingerprints of the page pieces of the range at `gpa` holding `bytes`.
fn push_hashes(out: &mut Vec<u8>, gpa: u64, bytes: &[u8]) {
    let mut off = 0;
    for (_, len) in page_pieces(gpa, bytes.len() as u64) {
        let piece = &bytes[off..off + len as usize];
        off += len as usize;
        Encoder::hash(out, fingerprint(piece));
    }
}

#[cfg(test)]
mod tests;
