//! The system calls of the method suite, each counted by name as it is issued.
//!
//! Every system call a method makes between its `BEGIN` and `END` marks goes
//! through [`Syscalls`], so the report's counts are what the method did, not what
//! it was meant to do: a write that the kernel took in two parts counts two, an
//! EINTR retry counts again. The counter is a fixed array indexed by [`Call`], so
//! counting itself never allocates (a heap allocation could make a hidden `brk`
//! inside the span).
//!
//! Calls made by the io_uring crate (`io_uring_setup`, `io_uring_enter`...) are
//! counted with [`Syscalls::track`] around the crate call that makes exactly one.
//!
//! Teardown (`close`, `munmap`) is not counted: the runner keeps every descriptor
//! and mapping alive until after `END`.

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

/// A system call the suite issues, by its libc name (the report's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `read(2)`.
    Read,
    /// `write(2)`.
    Write,
    /// `send(2)` (glibc issues `sendto`).
    Send,
    /// `recv(2)` (glibc issues `recvfrom`).
    Recv,
    /// `recvmsg(2)` (the error queue).
    Recvmsg,
    /// `poll(2)`.
    Poll,
    /// `sendfile(2)`.
    Sendfile,
    /// `splice(2)`.
    Splice,
    /// `vmsplice(2)`.
    Vmsplice,
    /// `socket(2)`.
    Socket,
    /// `setsockopt(2)`.
    Setsockopt,
    /// `getsockopt(2)`.
    Getsockopt,
    /// `connect(2)`.
    Connect,
    /// `mmap(2)`.
    Mmap,
    /// `pipe2(2)`.
    Pipe2,
    /// `fcntl(2)`.
    Fcntl,
    /// `io_uring_setup(2)`.
    IoUringSetup,
    /// `io_uring_enter(2)`.
    IoUringEnter,
    /// `io_uring_register(2)`.
    IoUringRegister,
    /// `pwrite(2)` (the kernel's `pwrite64`).
    Pwrite,
    /// `pwritev(2)`.
    Pwritev,
    /// `fsync(2)`.
    Fsync,
    /// `syncfs(2)`.
    Syncfs,
    /// `ftruncate(2)`.
    Ftruncate,
    /// `shutdown(2)`.
    Shutdown,
}

impl Call {
    /// Every call, in report order.
    pub const ALL: [Call; 25] = [
        Call::Read,
        Call::Write,
        Call::Send,
        Call::Recv,
        Call::Recvmsg,
        Call::Poll,
        Call::Sendfile,
        Call::Splice,
        Call::Vmsplice,
        Call::Socket,
        Call::Setsockopt,
        Call::Getsockopt,
        Call::Connect,
        Call::Mmap,
        Call::Pipe2,
        Call::Fcntl,
        Call::IoUringSetup,
        Call::IoUringEnter,
        Call::IoUringRegister,
        Call::Pwrite,
        Call::Pwritev,
        Call::Fsync,
        Call::Syncfs,
        Call::Ftruncate,
        Call::Shutdown,
    ];

    /// The libc name.
    pub fn name(self) -> &'static str {
        match self {
            Call::Read => "read",
            Call::Write => "write",
            Call::Send => "send",
            Call::Recv => "recv",
            Call::Recvmsg => "recvmsg",
            Call::Poll => "poll",
            Call::Sendfile => "sendfile",
            Call::Splice => "splice",
            Call::Vmsplice => "vmsplice",
            Call::Socket => "socket",
            Call::Setsockopt => "setsockopt",
            Call::Getsockopt => "getsockopt",
            Call::Connect => "connect",
            Call::Mmap => "mmap",
            Call::Pipe2 => "pipe2",
            Call::Fcntl => "fcntl",
            Call::IoUringSetup => "io_uring_setup",
            Call::IoUringEnter => "io_uring_enter",
            Call::IoUringRegister => "io_uring_register",
            Call::Pwrite => "pwrite",
            Call::Pwritev => "pwritev",
            Call::Fsync => "fsync",
            Call::Syncfs => "syncfs",
            Call::Ftruncate => "ftruncate",
            Call::Shutdown => "shutdown",
        }
    }
}

/// The size of `T` as a socket call's length argument.
fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("a small C struct")
}

/// The most buffers one [`Syscalls::pwritev`] takes: the receive methods write a
/// chunk from at most two places (a mapping and a buffer).
pub const MAX_WRITE_PARTS: usize = 2;

/// Counts a method's system calls by name, split into the per-chunk loop and the
/// rest ("setup": connecting, mapping, the ACK, final completion drains).
#[derive(Debug, Default, Clone)]
pub struct Syscalls {
    /// Calls by [`Call`] discriminant.
    counts: [u64; Call::ALL.len()],
    /// Whether calls now count as loop calls.
    in_loop: bool,
    /// Calls inside the chunk loop.
    loop_calls: u64,
    /// Calls outside it.
    setup_calls: u64,
}

impl Syscalls {
    /// A counter at zero, in the setup phase.
    pub fn new() -> Syscalls {
        Syscalls::default()
    }

    /// Switches between the per-chunk loop (true) and setup (false).
    pub fn set_loop(&mut self, in_loop: bool) {
        self.in_loop = in_loop;
    }

    /// Counts one issued call.
    fn count(&mut self, call: Call) {
        self.counts[call as usize] += 1;
        if self.in_loop {
            self.loop_calls += 1;
        } else {
            self.setup_calls += 1;
        }
    }

    /// How many times `call` was issued.
    pub fn get(&self, call: Call) -> u64 {
        self.counts[call as usize]
    }

    /// The non-zero counts, by name, in [`Call::ALL`] order.
    pub fn by_name(&self) -> Vec<(&'static str, u64)> {
        Call::ALL
            .into_iter()
            .filter(|&c| self.get(c) > 0)
            .map(|c| (c.name(), self.get(c)))
            .collect()
    }

    /// Calls issued inside the per-chunk loop.
    pub fn loop_calls(&self) -> u64 {
        self.loop_calls
    }

    /// Calls issued outside it.
    pub fn setup_calls(&self) -> u64 {
        self.setup_calls
    }

    /// Counts `call` once and runs `f`, which must issue exactly that one system
    /// call (a library call such as the io_uring crate's `submit_and_wait`).
    pub fn track<T>(&mut self, call: Call, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.count(call);
        f()
    }

    /// Counts `n` calls of `call` that a library call made on the suite's behalf
    /// (the io_uring crate's ring set-up: `io_uring_setup` and its `mmap`s).
    pub fn count_library(&mut self, call: Call, n: u64) {
        for _ in 0..n {
            self.count(call);
        }
    }

    /// Runs a raw libc call that returns -1 and sets errno on failure, counting
    /// every attempt; retries on EINTR (the retry is a real second call).
    fn raw(&mut self, call: Call, mut f: impl FnMut() -> isize) -> io::Result<usize> {
        loop {
            self.count(call);
            let rc = f();
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `read(fd, buf)`.
    pub fn read(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, exclusively borrowed region of `buf.len()` bytes
        // for the whole call.
        self.raw(Call::Read, || unsafe {
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
        })
    }

    /// `write(fd, buf)`.
    pub fn write(&mut self, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
        self.raw(Call::Write, || unsafe {
            libc::write(fd, buf.as_ptr().cast(), buf.len())
        })
    }

    /// `pwrite(fd, buf, offset)`.
    pub fn pwrite(&mut self, fd: RawFd, buf: &[u8], offset: u64) -> io::Result<usize> {
        let offset = file_offset(offset)?;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
        self.raw(Call::Pwrite, || unsafe {
            libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset)
        })
    }

    /// `pwritev(fd, parts, offset)`: the parts, in order, written as one run of
    /// bytes from `offset`; at most [`MAX_WRITE_PARTS`] parts.
    pub fn pwritev(&mut self, fd: RawFd, parts: &[&[u8]], offset: u64) -> io::Result<usize> {
        if parts.len() > MAX_WRITE_PARTS {
            return Err(io::Error::other(format!(
                "pwritev of {} parts: at most {MAX_WRITE_PARTS}",
                parts.len()
            )));
        }
        let offset = file_offset(offset)?;
        // A fixed array: no allocation inside the counted loop.
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_WRITE_PARTS];
        for (slot, part) in iov.iter_mut().zip(parts) {
            slot.iov_base = part.as_ptr().cast_mut().cast();
            slot.iov_len = part.len();
        }
        let count = libc::c_int::try_from(parts.len()).expect("at most MAX_WRITE_PARTS");
        let ptr = iov.as_ptr();
        // SAFETY: the first `count` iovecs describe `parts`, each valid for reads of
        // its length for the whole call; the kernel only reads them.
        self.raw(Call::Pwritev, || unsafe {
            libc::pwritev(fd, ptr, count, offset)
        })
    }

    /// `fsync(fd)`.
    pub fn fsync(&mut self, fd: RawFd) -> io::Result<()> {
        // SAFETY: fsync takes a descriptor only.
        self.raw(Call::Fsync, || unsafe { libc::fsync(fd) as isize })
            .map(drop)
    }

    /// `syncfs(fd)`: the file system `fd` is on.
    pub fn syncfs(&mut self, fd: RawFd) -> io::Result<()> {
        // SAFETY: syncfs takes a descriptor only.
        self.raw(Call::Syncfs, || unsafe { libc::syncfs(fd) as isize })
            .map(drop)
    }

    /// `ftruncate(fd, len)`.
    pub fn ftruncate(&mut self, fd: RawFd, len: u64) -> io::Result<()> {
        let len = file_offset(len)?;
        // SAFETY: ftruncate takes integers only.
        self.raw(Call::Ftruncate, || unsafe {
            libc::ftruncate(fd, len) as isize
        })
        .map(drop)
    }

    /// `shutdown(fd, how)`.
    pub fn shutdown(&mut self, fd: RawFd, how: libc::c_int) -> io::Result<()> {
        // SAFETY: shutdown takes integers only.
        self.raw(Call::Shutdown, || unsafe {
            libc::shutdown(fd, how) as isize
        })
        .map(drop)
    }

    /// `send(fd, buf, flags)`.
    ///
    /// With MSG_ZEROCOPY the kernel keeps reading `buf`'s pages after the call
    /// returns (it pinned them); that is not a memory-safety matter (the pages
    /// stay allocated while pinned) but a content one, which the callers handle by
    /// not rewriting or unmapping the bytes before the completion.
    pub fn send(&mut self, fd: RawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
        self.raw(Call::Send, || unsafe {
            libc::send(fd, buf.as_ptr().cast(), buf.len(), flags)
        })
    }

    /// `recv(fd, buf, flags)`.
    pub fn recv(&mut self, fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        // SAFETY: `buf` is a valid, exclusively borrowed region of `buf.len()` bytes.
        self.raw(Call::Recv, || unsafe {
            libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags)
        })
    }

    /// `sendfile(out_fd, in_fd, &offset, count)`; advances `offset` by what was sent.
    pub fn sendfile(
        &mut self,
        out_fd: RawFd,
        in_fd: RawFd,
        offset: &mut i64,
        count: usize,
    ) -> io::Result<usize> {
        // SAFETY: `offset` is a valid, exclusively borrowed off_t; no buffers.
        self.raw(Call::Sendfile, || unsafe {
            libc::sendfile(out_fd, in_fd, offset, count)
        })
    }

    /// `splice(fd_in, off_in, fd_out, NULL, len, flags)`: `off_in` is the file
    /// offset (advanced by the kernel), `None` for a pipe; the output side is
    /// always a pipe or a socket, which take no offset.
    pub fn splice(
        &mut self,
        fd_in: RawFd,
        off_in: Option<&mut i64>,
        fd_out: RawFd,
        len: usize,
        flags: libc::c_uint,
    ) -> io::Result<usize> {
        let off_in = off_in.map_or(std::ptr::null_mut(), |o| o as *mut i64);
        // SAFETY: `off_in` is null or a valid, exclusively borrowed loff_t for the
        // whole call; the output offset is null; no user buffers are involved.
        self.raw(Call::Splice, || unsafe {
            libc::splice(fd_in, off_in, fd_out, std::ptr::null_mut(), len, flags)
        })
    }

    /// `splice(fd_in, NULL, fd_out, &off_out, len, flags)`: from a pipe into a
    /// file at `off_out` (advanced by the kernel).
    pub fn splice_to_file(
        &mut self,
        fd_in: RawFd,
        fd_out: RawFd,
        off_out: &mut i64,
        len: usize,
        flags: libc::c_uint,
    ) -> io::Result<usize> {
        let off_out: *mut i64 = off_out;
        // SAFETY: `off_out` is a valid, exclusively borrowed loff_t for the whole
        // call; the input offset is null (a pipe); no user buffers are involved.
        self.raw(Call::Splice, || unsafe {
            libc::splice(fd_in, std::ptr::null_mut(), fd_out, off_out, len, flags)
        })
    }

    /// `vmsplice(pipe_w, {buf}, 1, 0)`: the pipe references `buf`'s pages (no
    /// copy, no SPLICE_F_GIFT).
    ///
    /// The pages stay referenced after the call returns, by the pipe and then by
    /// whatever the pipe is spliced to, with no notification when that ends: the
    /// caller must not rewrite `buf` while a reader may still see it (the
    /// `vmsplice` method never reuses its buffer).
    pub fn vmsplice(&mut self, pipe_w: RawFd, buf: &[u8]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `iov` describes `buf`, valid for reads of `buf.len()` bytes for
        // the whole call; without SPLICE_F_GIFT the kernel only reads the pages.
        self.raw(Call::Vmsplice, || unsafe {
            libc::vmsplice(pipe_w, &iov, 1, 0)
        })
    }

    /// `socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)`.
    pub fn tcp_socket(&mut self) -> io::Result<OwnedFd> {
        // SAFETY: socket takes integer arguments only.
        let fd = self.raw(Call::Socket, || unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) as isize
        })?;
        let fd = RawFd::try_from(fd).expect("socket() returns a c_int");
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// `setsockopt(fd, level, name, &value, sizeof value)` for a plain-data value.
    fn setsockopt<T: Copy>(
        &mut self,
        fd: RawFd,
        level: libc::c_int,
        name: libc::c_int,
        value: &T,
    ) -> io::Result<()> {
        let len = socklen_of::<T>();
        let ptr: *const T = value;
        // SAFETY: `ptr` points to a live `T` of `len` bytes that the kernel only reads.
        self.raw(Call::Setsockopt, || unsafe {
            libc::setsockopt(fd, level, name, ptr.cast(), len) as isize
        })
        .map(drop)
    }

    /// An `int` socket option.
    pub fn setsockopt_int(
        &mut self,
        fd: RawFd,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        self.setsockopt(fd, level, name, &value)
    }

    /// A `struct timeval` socket option (SO_SNDTIMEO, SO_RCVTIMEO).
    pub fn setsockopt_timeout(
        &mut self,
        fd: RawFd,
        name: libc::c_int,
        timeout: Duration,
    ) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        self.setsockopt(fd, libc::SOL_SOCKET, name, &tv)
    }

    /// `getsockopt(fd, level, name, value, &len)` with `len` = the size of `T`,
    /// for an option the kernel reads and writes back (`TCP_ZEROCOPY_RECEIVE`);
    /// returns the length the kernel wrote back.
    ///
    /// `T` must be a plain C struct of the option's layout: the kernel writes
    /// into it.
    pub fn getsockopt_inout<T: Copy>(
        &mut self,
        fd: RawFd,
        level: libc::c_int,
        name: libc::c_int,
        value: &mut T,
    ) -> io::Result<libc::socklen_t> {
        let mut len = socklen_of::<T>();
        let (pv, pl): (*mut T, *mut libc::socklen_t) = (value, &mut len);
        // SAFETY: `pv` points to a live, exclusively borrowed `T` of `len` bytes and
        // `pl` to a live local; the kernel writes at most `len` bytes to `pv`.
        self.raw(Call::Getsockopt, || unsafe {
            libc::getsockopt(fd, level, name, pv.cast(), pl) as isize
        })?;
        Ok(len)
    }

    /// `getsockopt(fd, SOL_SOCKET, SO_ERROR)`: the socket's pending error, 0 if none.
    pub fn socket_error(&mut self, fd: RawFd) -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = socklen_of::<libc::c_int>();
        let (pv, pl): (*mut libc::c_int, *mut libc::socklen_t) = (&mut value, &mut len);
        // SAFETY: `pv` and `pl` point to live, exclusively borrowed locals of the
        // sizes given.
        self.raw(Call::Getsockopt, || unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, pv.cast(), pl) as isize
        })?;
        Ok(value)
    }

    /// `connect(fd, addr)`.
    pub fn connect(&mut self, fd: RawFd, addr: SocketAddrV4) -> io::Result<()> {
        let sin = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET is 2"),
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let ptr: *const libc::sockaddr_in = &sin;
        let len = socklen_of::<libc::sockaddr_in>();
        // SAFETY: `ptr` points to a live sockaddr_in of `len` bytes, only read.
        self.raw(Call::Connect, || unsafe {
            libc::connect(fd, ptr.cast(), len) as isize
        })
        .map(drop)
    }

    /// `mmap(NULL, len, prot, flags, fd, 0)` of a file; unmapped when the
    /// [`Mapping`] drops.
    pub fn mmap_file(
        &mut self,
        fd: RawFd,
        len: usize,
        prot: libc::c_int,
        flags: libc::c_int,
    ) -> io::Result<Mapping> {
        self.count(Call::Mmap);
        // SAFETY: a new mapping at an address the kernel picks cannot alias any
        // existing Rust object; the result is checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Mapping { ptr, len })
    }

    /// `pipe2(O_CLOEXEC)`: (read end, write end).
    pub fn pipe(&mut self) -> io::Result<(OwnedFd, OwnedFd)> {
        let mut fds = [0 as libc::c_int; 2];
        let ptr = fds.as_mut_ptr();
        // SAFETY: `ptr` points to a live, exclusively borrowed int[2].
        self.raw(Call::Pipe2, || unsafe {
            libc::pipe2(ptr, libc::O_CLOEXEC) as isize
        })?;
        // SAFETY: both descriptors are fresh and owned by nothing else.
        Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
    }

    /// `fcntl(fd, cmd, arg)` with an integer argument.
    pub fn fcntl_int(
        &mut self,
        fd: RawFd,
        cmd: libc::c_int,
        arg: libc::c_int,
    ) -> io::Result<usize> {
        // SAFETY: the commands used here (F_SETPIPE_SZ) take an integer argument.
        self.raw(Call::Fcntl, || unsafe {
            libc::fcntl(fd, cmd, arg) as isize
        })
    }

    /// `poll` on one descriptor; returns its `revents` (0 on timeout).
    pub fn poll(
        &mut self,
        fd: RawFd,
        events: libc::c_short,
        timeout: Duration,
    ) -> io::Result<libc::c_short> {
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ptr: *mut libc::pollfd = &mut pfd;
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `ptr` points to one live, exclusively borrowed pollfd.
        let ready = self.raw(Call::Poll, || unsafe { libc::poll(ptr, 1, ms) as isize })?;
        Ok(if ready == 0 { 0 } else { pfd.revents })
    }

    /// `recvmsg(fd, MSG_ERRQUEUE)` with no data buffer: fills `control` with the
    /// ancillary data of one error-queue entry and returns its length. An empty
    /// queue is `WouldBlock` (the error queue never blocks).
    pub fn recv_errqueue(&mut self, fd: RawFd, control: &mut [u64]) -> io::Result<usize> {
        // SAFETY: msghdr is plain old data; all-zero is a valid (empty) header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(control);
        let ptr: *mut libc::msghdr = &mut msg;
        // SAFETY: `msg` names only `control`, a live, exclusively borrowed buffer of
        // msg_controllen bytes; it has no iovecs and no name buffer.
        self.raw(Call::Recvmsg, || unsafe {
            libc::recvmsg(fd, ptr, libc::MSG_ERRQUEUE)
        })?;
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(
                "recvmsg(MSG_ERRQUEUE): control data truncated",
            ));
        }
        Ok(msg.msg_controllen)
    }
}

/// `offset` as a file offset (`off_t`).
fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset)
        .map_err(|_| io::Error::other(format!("file offset {offset}: too large")))
}

/// A memory mapping of a file, unmapped on drop (not counted: it is dropped after
/// `END`).
#[derive(Debug)]
pub struct Mapping {
    /// Start of the mapping, as mmap returned it.
    ptr: NonNull<u8>,
    /// Its length.
    len: usize,
}

impl Mapping {
    /// The bytes `offset..offset + len` of the mapping.
    ///
    /// Panics when out of bounds. Reading a page may fault it in from the file
    /// (that is the point); a file truncated under the mapping would raise SIGBUS,
    /// which the suite's files never are.
    pub fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset <= self.len && len <= self.len - offset);
        // SAFETY: the range is inside the mapping (checked above), which stays
        // mapped and readable for `self`'s lifetime; the shared borrow of `self`
        // keeps `touch` (the only writer) from running meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// The bytes `offset..offset + len` of a writable (PROT_WRITE) mapping, to
    /// fill: writing them writes the file's page-cache pages (MAP_SHARED).
    ///
    /// Panics when out of bounds. On a read-only mapping a write faults (SIGSEGV).
    pub fn slice_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset <= self.len && len <= self.len - offset);
        // SAFETY: the range is inside the mapping (checked above), which stays
        // mapped for `self`'s lifetime; `&mut self` means no other slice of it is
        // borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }

    /// The mapping's start address (what `TCP_ZEROCOPY_RECEIVE` maps pages at).
    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Rewrites the byte at `offset` with its own value: on a writable MAP_PRIVATE
    /// mapping this forces a copy-on-write of that one page (the kernel copies the
    /// page-cache page into a private one), without changing the content.
    ///
    /// Panics when out of bounds. Volatile, so the compiler cannot drop the
    /// "useless" store. The mapping must be writable (PROT_WRITE), or this faults.
    pub fn touch(&mut self, offset: usize) {
        assert!(offset < self.len);
        // SAFETY: in bounds (checked above) of a live mapping; `&mut self` means no
        // slice of it is borrowed; the caller mapped it PROT_WRITE.
        unsafe {
            let p = self.ptr.as_ptr().add(offset);
            std::ptr::write_volatile(p, std::ptr::read_volatile(p));
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no borrow of the
        // mapping outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_and_phase() {
        let mut sys = Syscalls::new();
        let (r, w) = sys.pipe().unwrap();
        use std::os::fd::AsRawFd;
        sys.set_loop(true);
        assert_eq!(sys.write(w.as_raw_fd(), b"abc").unwrap(), 3);
        let mut buf = [0u8; 8];
        assert_eq!(sys.read(r.as_raw_fd(), &mut buf).unwrap(), 3);
        sys.set_loop(false);
        let err = sys.track(Call::IoUringEnter, || -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        });
        assert!(err.is_err());
        assert_eq!(
            sys.by_name(),
            [
                ("read", 1),
                ("write", 1),
                ("pipe2", 1),
                ("io_uring_enter", 1)
            ]
        );
        assert_eq!((sys.loop_calls(), sys.setup_calls()), (2, 2));
        // A failed call counts too: it was issued.
        assert!(sys.read(-1, &mut buf).is_err());
        assert_eq!(sys.get(Call::Read), 2);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = Call::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Call::ALL.len());
        for (i, c) in Call::ALL.iter().enumerate() {
            assert_eq!(
                *c as usize, i,
                "Call::ALL order must match the discriminants"
            );
        }
    }
}
