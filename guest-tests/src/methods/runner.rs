//! The per-method sequence of `docs/method-suite.md`:
//!
//! 1. `sync` and drop caches (`sendfile_warm`: `sync` and read the file once;
//!    `sendfile_tmpfs`: copy the bytes to send onto tmpfs first);
//! 2. open the file (before `BEGIN`: the lookup's metadata reads are not the
//!    transfer); `zerocopy_pressure`: set `net.core.optmem_max` to 0 (restored
//!    after `END`);
//! 3. `mark BEGIN <name>` (`<name>@<variant>` on a named card, `zc.cards`);
//! 4. connect, then per chunk the method's system calls and one sample request;
//! 5. wait for the peer's 8-byte little-endian byte count;
//! 6. zero-copy methods drain their remaining completions;
//! 7. `mark END <name>`, then (in [`super::run_suite`]) the report and KTAP lines.
//!
//! A receive method ([`super::receive`]) has the same marks, connection, chunk
//! loop, samples and report; what differs is prepared before `BEGIN` (the target
//! file on the scratch disk instead of the source) and how the transfer ends
//! (`fsync`, then the guest sends the count), and after `END` the file written
//! is compared with the payload.
//!
//! Descriptors and mappings are closed and unmapped after `END`, so that the span
//! holds exactly the counted system calls. Buffers are allocated before `BEGIN`
//! for the same reason (a heap allocation may `brk` or `mmap`).

use std::any::Any;
use std::fs::File;
use std::io::Read;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::receive::{self, Check};
use super::report::{Measured, MethodResult, ZcReport};
use super::syscalls::{Mapping, Syscalls};
use super::zerocopy::SO_ZEROCOPY;
use super::{
    cow_zerocopy, direct_write, direct_zerocopy, mmap_write, mmap_zerocopy, read_write,
    recv_direct, recv_mmap, recv_write, sendfile, sendfile_direct, sendfile_tmpfs, sendfile_warm,
    splice, splice_direct, splice_recv, tcp_zerocopy_receive, uring_send_zc, vmsplice,
    zerocopy_pressure, Hooks, Method, Peer, Roots, Suite, CHUNK_ALIGN,
};
use crate::error::{Context, Error, Result};
use zc_protocol::{ack, Direction, Marker, MethodRun, ZeroCopyReceive};

/// Bound on connecting and on any one blocking send or receive (SO_SNDTIMEO and
/// SO_RCVTIMEO), so that a dead peer fails the method instead of hanging the run
/// until the VMM's timeout.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Things that must stay alive until after `END` (mappings, pipes, the ring),
/// returned by a method and dropped by the runner.
pub type Keep = Vec<Box<dyn Any>>;

/// What a method hands back: what to drop after `END`, and its zero-copy counts.
pub struct Done {
    /// Dropped after `END` (in order).
    pub keep: Keep,
    /// The zero-copy counts, for the zero-copy methods.
    pub zerocopy: Option<ZcReport>,
    /// What `tcp_zerocopy_receive` mapped and copied.
    pub zerocopy_receive: Option<ZeroCopyReceive>,
}

impl Done {
    /// A method that kept nothing and has no zero-copy counts.
    pub fn plain() -> Done {
        Done {
            keep: Vec::new(),
            zerocopy: None,
            zerocopy_receive: None,
        }
    }
}

/// One chunk of the transfer: bytes `offset..offset + len` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// 0, 1, ...: the sample label.
    pub index: u64,
    /// File offset (a multiple of the chunk size).
    pub offset: u64,
    /// Bytes, `chunk` except in the last chunk.
    pub len: usize,
}

impl Chunk {
    /// [`offset`](Self::offset) as an index into a mapping of the file, which holds
    /// the whole transfer.
    pub fn map_offset(&self) -> usize {
        usize::try_from(self.offset).expect("inside a mapping of the file")
    }
}

/// Page-aligned bytes for O_DIRECT reads, or a plain user buffer.
#[derive(Debug)]
pub struct AlignedBuf {
    /// The allocation, a page longer than the buffer.
    backing: Vec<u8>,
    /// Where the aligned buffer starts in it.
    start: usize,
    /// The buffer's length.
    len: usize,
}

impl AlignedBuf {
    /// `len` zeroed bytes starting at a [`CHUNK_ALIGN`]-aligned address, every page
    /// already faulted in.
    ///
    /// The pre-fault keeps the zero-fill page faults (and the KVM dirty pages they
    /// make) out of the method's span: the buffer is allocated before `BEGIN`.
    pub fn new(len: usize) -> AlignedBuf {
        // Over-allocate and start at an aligned offset: Vec promises no alignment.
        let mut backing = vec![0u8; len + CHUNK_ALIGN];
        let start = backing.as_ptr().align_offset(CHUNK_ALIGN);
        // A zeroed allocation may be untouched fresh pages; black_box keeps the
        // compiler from dropping stores of a value it knows is already there.
        for byte in backing[start..start + len].iter_mut().step_by(CHUNK_ALIGN) {
            *byte = std::hint::black_box(0);
        }
        AlignedBuf {
            backing,
            start,
            len,
        }
    }

    /// The buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.backing[self.start..self.start + self.len]
    }

    /// The buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.backing[self.start..self.start + self.len]
    }
}

/// The state a method works with between the marks.
pub struct Transfer<'a> {
    /// The counter all system calls go through.
    pub sys: Syscalls,
    /// A send method's source file, or a receive method's target file (new and
    /// empty, or pre-sized for `recv_mmap`); O_DIRECT for the direct methods; at
    /// offset 0.
    pub file: &'a File,
    /// The connected socket.
    pub sock: RawFd,
    /// Bytes to send or receive: a prefix of the payload file.
    pub size: u64,
    /// Bytes per chunk.
    pub chunk: usize,
    /// A chunk-sized, page-aligned user buffer, allocated before `BEGIN`.
    pub buf: AlignedBuf,
    /// `vmsplice` only: a page-aligned buffer of the whole transfer (page-rounded),
    /// allocated before `BEGIN`, taken by the method and kept until after `END`.
    pub whole: Option<AlignedBuf>,
    /// Whether the file was opened with O_DIRECT (see [`Transfer::read_request`]).
    pub direct: bool,
    /// Where the sample requests go.
    hooks: &'a mut dyn Hooks,
}

impl<'a> Transfer<'a> {
    /// How many bytes to ask the file for when `left` bytes are wanted: `left`, or
    /// for an O_DIRECT file `left` rounded up to a page, since direct I/O needs
    /// block-aligned lengths. Only the file's last chunk is ever unaligned (the
    /// runner refuses a prefix that ends inside a page for the methods that read
    /// straight into a pipe), and there the kernel stops at the end of the file.
    pub fn read_request(&self, left: usize) -> usize {
        if self.direct {
            left.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN
        } else {
            left
        }
    }

    /// The number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk as u64)
    }

    /// The chunk loop: runs `body` for every chunk, then requests the chunk's
    /// dirty-page sample. System calls inside count as loop calls.
    pub fn for_each_chunk(
        &mut self,
        mut body: impl FnMut(&mut Transfer<'a>, Chunk) -> Result<()>,
    ) -> Result<()> {
        let chunks = self.chunks();
        u32::try_from(chunks.saturating_sub(1)).map_err(|_| {
            Error::new(format!(
                "{chunks} chunks: too many for 32-bit sample labels"
            ))
        })?;
        self.sys.set_loop(true);
        for index in 0..chunks {
            let offset = index * self.chunk as u64;
            let len =
                usize::try_from(self.size - offset).map_or(self.chunk, |left| left.min(self.chunk));
            if let Err(err) = body(self, Chunk { index, offset, len }) {
                self.sys.set_loop(false);
                return Err(err);
            }
            self.hooks
                .sample(u32::try_from(index).expect("checked above"));
        }
        self.sys.set_loop(false);
        Ok(())
    }

    /// `mmap` of the bytes to send, shared and read-only: the page-cache pages
    /// themselves.
    pub fn map_shared(&mut self) -> Result<Mapping> {
        let fd = self.file.as_raw_fd();
        let len = self.map_len()?;
        self.sys
            .mmap_file(fd, len, libc::PROT_READ, libc::MAP_SHARED)
            .context(|| format!("mmap of {} bytes (MAP_SHARED, PROT_READ)", self.size))
    }

    /// [`size`](Self::size) as the length of a mapping of the file.
    pub fn map_len(&self) -> Result<usize> {
        usize::try_from(self.size)
            .map_err(|_| Error::new(format!("{} bytes: too large to map", self.size)))
    }

    /// Waits for the peer's 8-byte little-endian byte count and checks it is
    /// `size` (the peer sends it once it received and checked everything).
    pub fn wait_ack(&mut self) -> Result<()> {
        let mut ack = [0u8; ack::ACK_LEN];
        let mut got = 0;
        while got < ack.len() {
            match self.sys.recv(self.sock, &mut ack[got..], 0) {
                Ok(0) => {
                    return Err(Error::new(format!(
                        "the peer closed the connection after {got} of the ACK's {} bytes",
                        ack::ACK_LEN
                    )))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(Error::new(format!(
                        "no ACK from the peer within {} s after sending {} bytes",
                        IO_TIMEOUT.as_secs(),
                        self.size
                    )))
                }
                Err(e) => return Err(Error::new(format!("waiting for the peer's ACK: {e}"))),
            }
        }
        let acked = ack::decode(ack);
        if acked != self.size {
            return Err(Error::new(format!(
                "the peer acknowledged {acked} of {} bytes",
                self.size
            )));
        }
        Ok(())
    }
}

/// `read`s from the file position until `buf` is full (`offset` is that position,
/// for messages); the end of the file first is an error.
pub fn read_exactly(sys: &mut Syscalls, fd: RawFd, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match sys.read(fd, &mut buf[got..]) {
            Ok(0) => {
                return Err(Error::new(format!(
                    "the file ended at offset {} (shorter than expected?)",
                    offset + got as u64
                )))
            }
            Ok(n) => got += n,
            Err(e) => {
                return Err(Error::new(format!(
                    "reading the file at {}: {e}",
                    offset + got as u64
                )))
            }
        }
    }
    Ok(())
}

/// Writes all of `buf` to `fd` with `write` (partial writes continue).
pub fn write_all(sys: &mut Syscalls, fd: RawFd, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        match sys.write(fd, buf) {
            Ok(0) => return Err(Error::new("write to the socket returned 0")),
            Ok(n) => buf = &buf[n..],
            Err(e) => return Err(send_error("write", e)),
        }
    }
    Ok(())
}

/// A socket send error, with the timeout spelled out.
pub fn send_error(call: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Error::new(format!(
            "{call} to the socket: timed out after {} s (peer not reading?)",
            IO_TIMEOUT.as_secs()
        ))
    } else {
        Error::new(format!("{call} to the socket: {e}"))
    }
}

/// Runs one method through the whole sequence; never fails as such: every error
/// becomes a [`MethodResult::Failed`].
pub fn run(
    run: &MethodRun<'_>,
    suite: &Suite,
    roots: Roots<'_>,
    peer: Peer,
    hooks: &mut dyn Hooks,
) -> MethodResult {
    match measure(run, suite, roots, peer, hooks) {
        Ok(result) => result,
        Err(err) => MethodResult::Failed(run.method, err.to_string()),
    }
}

/// A method made ready before `BEGIN`: everything that may fail without a span.
pub struct Ready {
    /// The file the method reads (send) or writes (receive), open.
    pub file: File,
    /// Bytes to move.
    pub size: u64,
    /// Whom to connect to.
    pub peer: SocketAddrV4,
    /// Dropped after `END` (`sendfile_tmpfs`'s copy).
    pub keep: Keep,
    /// `uring_send_zc`: whether the kernel reports copied sends.
    pub uring_report_usage: bool,
    /// A receive method's check after `END` of the file it wrote.
    pub check: Option<Check>,
}

/// What preparing a method came to: ready, or skipped for a missing kernel feature
/// (before any cache drop or mark).
pub enum Prepared {
    /// Run it.
    Ready(Ready),
    /// Skip it, for this reason.
    Skipped(String),
}

/// [`run`]'s body: `Ok` with a passed or skipped result, `Err` with why the
/// method failed.
fn measure(
    run: &MethodRun<'_>,
    suite: &Suite,
    roots: Roots<'_>,
    peer: Peer,
    hooks: &mut dyn Hooks,
) -> Result<MethodResult> {
    let method = run.method;
    let prepared = match method.direction() {
        Direction::Send => prepare_send(method, suite, roots.disk, peer.send_to, hooks)?,
        Direction::Receive => receive::prepare(run, suite, roots, peer.receive_from, hooks)?,
    };
    let ready = match prepared {
        Prepared::Ready(ready) => ready,
        Prepared::Skipped(reason) => return Ok(MethodResult::Skipped(method, reason)),
    };
    let size = ready.size;

    let span = run.span();
    let (begin, end) = (
        Marker::begin(span.as_str()).label(),
        Marker::end(span.as_str()).label(),
    );
    let buf = AlignedBuf::new(suite.chunk);
    let whole = (method == Method::Vmsplice).then(|| {
        let len =
            usize::try_from(size).map_or(usize::MAX, |s| s.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN);
        AlignedBuf::new(len)
    });
    // Last before BEGIN, after everything that may fail, so that a failure never
    // leaves the option memory exhausted for the methods that follow.
    let optmem_before = if method.optmem_pressure() {
        Some(hooks.set_optmem_max(zerocopy_pressure::PRESSURE_OPTMEM_MAX)?)
    } else {
        None
    };
    if let Err(e) = hooks.mark(&begin) {
        if let Some(before) = optmem_before {
            hooks.set_optmem_max(before)?;
        }
        return Err(e);
    }
    let start = Instant::now();
    let mut sys = Syscalls::new();
    let sock = connect(&mut sys, ready.peer, method.msg_zerocopy());
    let (outcome, sys, sock) = match sock {
        Err(err) => (Err(err), sys, None),
        Ok(sock) => {
            let mut t = Transfer {
                sys,
                file: &ready.file,
                sock: sock.as_raw_fd(),
                size,
                chunk: suite.chunk,
                buf,
                whole,
                direct: method.direct(),
                hooks: &mut *hooks,
            };
            let outcome = dispatch(method, &mut t, ready.uring_report_usage);
            (outcome, t.sys, Some(sock))
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    let end_mark = hooks.mark(&end);
    let optmem_restored = match optmem_before {
        Some(before) => hooks.set_optmem_max(before).map(drop),
        None => Ok(()),
    };
    // Teardown only now, after END: the span holds only counted calls. (A method
    // that failed has already dropped what it held, uncounted; its report carries
    // no counts.)
    let done = outcome?;
    drop(done.keep);
    drop(sock);
    drop(ready.keep);
    end_mark?;
    optmem_restored?;
    if let Some(check) = &ready.check {
        check.verify()?;
    }
    Ok(MethodResult::Passed(
        method,
        Measured {
            bytes: size,
            chunk: suite.chunk as u64,
            chunks: size.div_ceil(suite.chunk as u64),
            seconds,
            syscalls: sys.by_name(),
            loop_syscalls: sys.loop_calls(),
            setup_syscalls: sys.setup_calls(),
            zerocopy: done.zerocopy,
            zerocopy_receive: done.zerocopy_receive,
        },
    ))
}

/// The bytes a method moves: `zc.size`, or the whole payload file of `file_len`
/// bytes (`shown` names it, for messages); never more than the file, never 0.
pub fn transfer_size(suite: &Suite, file_len: u64, shown: &dyn std::fmt::Display) -> Result<u64> {
    let size = suite.size.unwrap_or(file_len);
    if size > file_len {
        return Err(Error::new(format!(
            "zc.size={size} but {shown} has only {file_len} bytes"
        )));
    }
    if size == 0 {
        return Err(Error::new(format!("{shown} is empty: nothing to transfer")));
    }
    Ok(size)
}

/// A send method's preparation: its capability check, its source file open (and
/// for `sendfile_tmpfs` staged on tmpfs), caches dropped or warmed.
fn prepare_send(
    method: Method,
    suite: &Suite,
    root: &Path,
    peer: SocketAddrV4,
    hooks: &mut dyn Hooks,
) -> Result<Prepared> {
    // Capability check first: a skipped method touches neither caches nor marks.
    let uring = if method.io_uring() {
        match uring_send_zc::probe()? {
            uring_send_zc::Support::Missing(reason) => return Ok(Prepared::Skipped(reason)),
            uring_send_zc::Support::Present { report_usage } => report_usage,
        }
    } else {
        false
    };

    let tmpfs_dir = if method.tmpfs() {
        match sendfile_tmpfs::tmpfs_dir() {
            Some(dir) => Some(dir),
            None => {
                return Ok(Prepared::Skipped(
                    "no tmpfs mounted at /tmp or /dev/shm (CONFIG_TMPFS?)".to_string(),
                ))
            }
        }
    } else {
        None
    };

    let disk_path = root.join(&suite.file);
    // sendfile_tmpfs: the CPU writes the copy now, before BEGIN; the caches are
    // dropped after it, so that its reads of the disk leave nothing behind.
    let staged = match &tmpfs_dir {
        Some(dir) => {
            let size = match suite.size {
                Some(size) => size,
                None => std::fs::metadata(&disk_path)
                    .context(|| format!("stat {}", disk_path.display()))?
                    .len(),
            };
            Some(sendfile_tmpfs::Staged::create(&disk_path, size, dir)?)
        }
        None => None,
    };
    let path = staged
        .as_ref()
        .map_or_else(|| disk_path.clone(), |s| s.path().to_path_buf());
    let shown = path.display();
    if method.warm() {
        crate::sys::sync();
        sendfile_warm::warm_up(&path)?;
    } else {
        hooks.drop_caches()?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    if method.direct() {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(&path).context(|| {
        format!(
            "opening {shown}{}",
            if method.direct() {
                " with O_DIRECT"
            } else {
                ""
            }
        )
    })?;
    let file_len = file.metadata().context(|| format!("stat {shown}"))?.len();
    let size = transfer_size(suite, file_len, &shown)?;
    if matches!(method, Method::SendfileDirect | Method::SpliceDirect)
        && size != file_len
        && !size.is_multiple_of(CHUNK_ALIGN as u64)
    {
        return Err(Error::new(format!(
            "zc.size={size}: {method} reads with O_DIRECT straight into a pipe, in whole pages, so the bytes to send must end on a {CHUNK_ALIGN}-byte boundary or at the end of {shown} ({file_len} bytes)"
        )));
    }
    let keep: Keep = staged
        .into_iter()
        .map(|s| Box::new(s) as Box<dyn Any>)
        .collect();
    Ok(Prepared::Ready(Ready {
        file,
        size,
        peer,
        keep,
        uring_report_usage: uring,
        check: None,
    }))
}

/// `socket`, the timeouts, SO_ZEROCOPY for MSG_ZEROCOPY methods, `connect`.
fn connect(sys: &mut Syscalls, peer: SocketAddrV4, zerocopy: bool) -> Result<OwnedFd> {
    let sock = sys
        .tcp_socket()
        .context(|| "socket(AF_INET, SOCK_STREAM)".to_string())?;
    let fd = sock.as_raw_fd();
    // SO_SNDTIMEO also bounds a blocking connect.
    sys.setsockopt_timeout(fd, libc::SO_SNDTIMEO, IO_TIMEOUT)
        .and_then(|()| sys.setsockopt_timeout(fd, libc::SO_RCVTIMEO, IO_TIMEOUT))
        .context(|| "setting socket timeouts".to_string())?;
    if zerocopy {
        sys.setsockopt_int(fd, libc::SOL_SOCKET, SO_ZEROCOPY, 1)
            .context(|| "setsockopt(SO_ZEROCOPY)".to_string())?;
    }
    sys.connect(fd, peer)
        .context(|| format!("connecting to the peer {peer}"))?;
    Ok(sock)
}

/// The method's own part: set-up, chunk loop, ACK (send) or count (receive),
/// completion drain.
fn dispatch(method: Method, t: &mut Transfer<'_>, uring_report_usage: bool) -> Result<Done> {
    match method {
        Method::ReadWrite => read_write::transfer(t),
        Method::MmapWrite => mmap_write::transfer(t),
        Method::Sendfile => sendfile::transfer(t),
        Method::Splice => splice::transfer(t),
        Method::DirectWrite => direct_write::transfer(t),
        Method::DirectZerocopy => direct_zerocopy::transfer(t),
        Method::MmapZerocopy => mmap_zerocopy::transfer(t),
        Method::UringSendZc => uring_send_zc::transfer(t, uring_report_usage),
        Method::CowZerocopy => cow_zerocopy::transfer(t),
        Method::SendfileWarm => sendfile_warm::transfer(t),
        Method::SendfileTmpfs => sendfile_tmpfs::transfer(t),
        Method::SendfileDirect => sendfile_direct::transfer(t),
        Method::SpliceDirect => splice_direct::transfer(t),
        Method::Vmsplice => vmsplice::transfer(t),
        Method::ZerocopyPressure => zerocopy_pressure::transfer(t),
        Method::RecvWrite => recv_write::transfer(t),
        Method::RecvDirect => recv_direct::transfer(t),
        Method::SpliceRecv => splice_recv::transfer(t),
        Method::RecvMmap => recv_mmap::transfer(t),
        Method::TcpZerocopyReceive => tcp_zerocopy_receive::transfer(t),
    }
}

/// Reads all of `file` once (the warm-up; not counted, it is before `BEGIN`).
pub fn read_whole(path: &Path) -> Result<u64> {
    let mut file = File::open(path).context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::new(format!(
                    "reading {} at {total}: {e}",
                    path.display()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer() {
        for len in [4096, 65536, 3 * 4096] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % CHUNK_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[len - 1] = 7;
            assert_eq!(b.as_slice()[len - 1], 7);
        }
    }
}
