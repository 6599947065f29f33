//! MSG_ZEROCOPY: sends, their completion notifications, and the accounting that
//! the report's `zerocopy` member shows.
//!
//! How the kernel reports (Documentation/networking/msg_zerocopy.rst): each
//! successful `send(MSG_ZEROCOPY)` on a socket gets the next 32-bit id, starting at
//! 0 (a send that fails without sending anything gets none). When the kernel no
//! longer references the pages of some sends (for TCP: the data was acknowledged
//! and the skbs freed), it queues one notification on the socket's error queue: a
//! `sock_extended_err` with `ee_origin == SO_EE_ORIGIN_ZEROCOPY` covering the id
//! range `ee_info..=ee_data`, with `SO_EE_CODE_ZEROCOPY_COPIED` set in `ee_code`
//! when the kernel copied the data after all (loopback always does; so does a
//! route without scatter-gather). Consecutive notifications may be merged into one
//! range, which then carries the first one's code: the `copied` count is the
//! kernel's claim per range, applied to every send in it.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::report::ZcReport;
use super::runner::{Done, Transfer};
use super::syscalls::{Mapping, Syscalls};
use crate::error::{Error, Result};

/// `SO_ZEROCOPY` (asm-generic/socket.h; not in the libc crate).
pub const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (linux/errqueue.h).
pub const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED` (linux/errqueue.h): the kernel copied after all.
pub const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Completion accounting of one method's zero-copy sends (MSG_ZEROCOPY ids, or
/// io_uring SEND_ZC requests numbered the same way).
#[derive(Debug, Clone, Default)]
pub struct Completions {
    /// Sends issued: ids `0..issued`.
    issued: u64,
    /// One bit per id: completed.
    done: Vec<u64>,
    /// Sends completed.
    completed: u64,
    /// Completed sends the kernel flagged as copied.
    copied: u64,
    /// False when the kernel cannot say whether it copied (io_uring before 6.2).
    copied_unknown: bool,
}

impl Completions {
    /// No sends yet.
    pub fn new() -> Completions {
        Completions::default()
    }

    /// Completions whose "copied" flag the kernel does not report: `copied` is
    /// then `None` in the report.
    pub fn without_copied_flag() -> Completions {
        Completions {
            copied_unknown: true,
            ..Completions::default()
        }
    }

    /// Reserves room for `sends` ids up front, so that the accounting does not
    /// allocate inside the counted loop.
    pub fn reserve(&mut self, sends: u64) {
        // Only a hint: a count beyond the address space fails at the first sends.
        self.done
            .reserve(usize::try_from(sends.div_ceil(64)).unwrap_or(0));
    }

    /// Registers the next send; returns its id.
    pub fn issue(&mut self) -> Result<u32> {
        let id = u32::try_from(self.issued)
            .map_err(|_| Error::new("more than 2^32 zero-copy sends on one socket"))?;
        self.issued += 1;
        if (self.done.len() as u64) * 64 < self.issued {
            self.done.push(0);
        }
        Ok(id)
    }

    /// Records a notification for ids `lo..=hi` (wrapping, as the kernel's 32-bit
    /// counter does); `copied` is the kernel's flag. Returns how many sends it
    /// completed. A range naming a send never issued, or one already completed,
    /// is an error: the accounting would otherwise be silently wrong.
    pub fn complete(&mut self, lo: u32, hi: u32, copied: bool) -> Result<u64> {
        let count = u64::from(hi.wrapping_sub(lo)) + 1;
        let ids = || (0..=hi.wrapping_sub(lo)).map(|k| u64::from(lo.wrapping_add(k)));
        let slot = |id: u64| ((id / 64) as usize, 1u64 << (id % 64));
        // Check the whole range before marking any of it, so that a bad range
        // leaves the accounting as it was.
        for id in ids() {
            if id >= self.issued {
                return Err(Error::new(format!(
                    "zero-copy completion {lo}..={hi} names send {id}, but only {} were issued",
                    self.issued
                )));
            }
            let (word, bit) = slot(id);
            if self.done[word] & bit != 0 {
                return Err(Error::new(format!(
                    "zero-copy completion {lo}..={hi} completes send {id} a second time"
                )));
            }
        }
        for id in ids() {
            let (word, bit) = slot(id);
            self.done[word] |= bit;
        }
        self.completed += count;
        if copied {
            self.copied += count;
        }
        Ok(count)
    }

    /// Sends issued.
    pub fn issued(&self) -> u64 {
        self.issued
    }

    /// Sends not completed yet.
    pub fn outstanding(&self) -> u64 {
        self.issued - self.completed
    }

    /// The report's `zerocopy` member.
    pub fn report(&self) -> ZcReport {
        ZcReport {
            sends: self.issued,
            completions: self.completed,
            copied: (!self.copied_unknown).then_some(self.copied),
            fallbacks: None,
        }
    }
}

/// One MSG_ZEROCOPY notification: ids `lo..=hi`, and whether the kernel copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// `ee_info`: the first id.
    pub lo: u32,
    /// `ee_data`: the last id.
    pub hi: u32,
    /// `ee_code & SO_EE_CODE_ZEROCOPY_COPIED`.
    pub copied: bool,
}

/// Parses the control data of one `recvmsg(MSG_ERRQUEUE)`: the zero-copy
/// notifications in it. Any other error-queue message (an ICMP error, a local
/// error with a non-zero errno) is an error naming it.
///
/// The layout is the kernel's `cmsghdr` as glibc defines it on Linux: a
/// `size_t cmsg_len` (header + data), `int cmsg_level`, `int cmsg_type`, data, each
/// message padded to `sizeof(size_t)`. Parsed by hand over bytes so that it is
/// safe code and testable with crafted buffers.
pub fn parse_notices(control: &[u8]) -> Result<Vec<Notice>> {
    const ALIGN: usize = std::mem::size_of::<usize>();
    let header = std::mem::size_of::<libc::cmsghdr>();
    let ee_size = std::mem::size_of::<libc::sock_extended_err>();
    let mut notices = Vec::new();
    let mut at = 0;
    while at + header <= control.len() {
        let field = |off: usize, n: usize| &control[at + off..at + off + n];
        let cmsg_len = usize::from_ne_bytes(field(0, ALIGN).try_into().expect("size_t"));
        let level = i32::from_ne_bytes(field(ALIGN, 4).try_into().expect("int"));
        let kind = i32::from_ne_bytes(field(ALIGN + 4, 4).try_into().expect("int"));
        if cmsg_len < header || at + cmsg_len > control.len() {
            return Err(Error::new(format!(
                "error queue: malformed control message (cmsg_len {cmsg_len} at {at} of {})",
                control.len()
            )));
        }
        let data = &control[at + header..at + cmsg_len];
        let is_recverr = (level == libc::SOL_IP && kind == libc::IP_RECVERR)
            || (level == libc::SOL_IPV6 && kind == libc::IPV6_RECVERR);
        if is_recverr {
            if data.len() < ee_size {
                return Err(Error::new(format!(
                    "error queue: sock_extended_err of {} bytes, expected {ee_size}",
                    data.len()
                )));
            }
            let u32_at =
                |off: usize| u32::from_ne_bytes(data[off..off + 4].try_into().expect("u32"));
            let (errno, origin, code) = (u32_at(0), data[4], data[6]);
            let (info, ee_data) = (u32_at(8), u32_at(12));
            if origin != SO_EE_ORIGIN_ZEROCOPY || errno != 0 {
                return Err(Error::new(format!(
                    "error queue: not a zero-copy completion (origin {origin}, errno {errno}: {})",
                    std::io::Error::from_raw_os_error(errno as i32)
                )));
            }
            notices.push(Notice {
                lo: info,
                hi: ee_data,
                copied: code & SO_EE_CODE_ZEROCOPY_COPIED != 0,
            });
        }
        at += cmsg_len.div_ceil(ALIGN) * ALIGN;
    }
    Ok(notices)
}

/// The MSG_ZEROCOPY methods that send from a mapping read the error queue every
/// this many chunks (besides when the kernel says ENOBUFS, and at the end): often
/// enough that notifications do not pile up, rarely enough to stay well under one
/// extra system call per chunk.
pub const DRAIN_EVERY: u64 = 16;

/// Sends `map` (the bytes to send, mapped) chunk by chunk with MSG_ZEROCOPY,
/// draining completions every [`DRAIN_EVERY`] chunks, then waits for the ACK and
/// every completion; the mapping is kept until after `END`. `before_send` runs for
/// each chunk's offset before its send, never after: a page must not change while
/// the NIC may read it.
pub fn send_mapping(
    t: &mut Transfer<'_>,
    mut map: Mapping,
    mut before_send: impl FnMut(&mut Mapping, usize),
) -> Result<Done> {
    let mut zc = MsgZerocopy::new(t.sock, t.chunks());
    t.for_each_chunk(|t, c| {
        before_send(&mut map, c.map_offset());
        zc.send_all(&mut t.sys, map.slice(c.map_offset(), c.len))?;
        if (c.index + 1) % DRAIN_EVERY == 0 {
            zc.drain(&mut t.sys)?;
        }
        Ok(())
    })?;
    t.wait_ack()?;
    zc.wait_until(&mut t.sys, 0)?;
    Ok(Done {
        keep: vec![Box::new(map)],
        zerocopy: Some(zc.completions.report()),
        zerocopy_receive: None,
    })
}

/// Bound on waiting for zero-copy completions (they come with the peer's TCP ACKs,
/// so normally within a round trip).
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);

/// A socket's MSG_ZEROCOPY sends and their completions.
#[derive(Debug)]
pub struct MsgZerocopy {
    /// The socket.
    fd: RawFd,
    /// The accounting.
    pub completions: Completions,
    /// Control buffer for the error queue (u64s: cmsghdr's alignment).
    control: [u64; 16],
}

impl MsgZerocopy {
    /// Zero-copy sends on `fd` (a connected TCP socket with SO_ZEROCOPY set);
    /// room reserved for `expected_sends`.
    pub fn new(fd: RawFd, expected_sends: u64) -> MsgZerocopy {
        let mut completions = Completions::new();
        completions.reserve(expected_sends);
        MsgZerocopy {
            fd,
            completions,
            control: [0; 16],
        }
    }

    /// Sends all of `buf` with `send(MSG_ZEROCOPY)`, one id per partial send.
    ///
    /// ENOBUFS means the socket's optmem limit for outstanding zero-copy sends is
    /// reached: waits for a completion and retries. The caller must not rewrite or
    /// unmap `buf` until its sends completed.
    pub fn send_all(&mut self, sys: &mut Syscalls, mut buf: &[u8]) -> Result<()> {
        while !buf.is_empty() {
            match sys.send(self.fd, buf, libc::MSG_ZEROCOPY) {
                Ok(0) => return Err(Error::new("send(MSG_ZEROCOPY) sent 0 bytes")),
                Ok(n) => {
                    self.completions.issue()?;
                    buf = &buf[n..];
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    let outstanding = self.completions.outstanding();
                    if outstanding == 0 {
                        return Err(Error::new(
                            "send(MSG_ZEROCOPY): ENOBUFS with no send outstanding",
                        ));
                    }
                    self.wait_until(sys, outstanding - 1)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(Error::new("send(MSG_ZEROCOPY): timed out (SO_SNDTIMEO)"))
                }
                Err(e) => return Err(Error::new(format!("send(MSG_ZEROCOPY): {e}"))),
            }
        }
        Ok(())
    }

    /// One `send(MSG_ZEROCOPY)` of (a prefix of) `buf`: `Some(bytes sent)`, or
    /// `None` when the kernel refused it with ENOBUFS (no option memory for its
    /// notification; nothing was queued). For callers that fall back to a copying
    /// send instead of waiting for completions. The caller must not rewrite or
    /// unmap what was sent until its completion.
    pub fn send_or_refused(&mut self, sys: &mut Syscalls, buf: &[u8]) -> Result<Option<usize>> {
        match sys.send(self.fd, buf, libc::MSG_ZEROCOPY) {
            Ok(0) => Err(Error::new("send(MSG_ZEROCOPY) sent 0 bytes")),
            Ok(n) => {
                self.completions.issue()?;
                Ok(Some(n))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(Error::new("send(MSG_ZEROCOPY): timed out (SO_SNDTIMEO)"))
            }
            Err(e) => Err(Error::new(format!("send(MSG_ZEROCOPY): {e}"))),
        }
    }

    /// Reads one error-queue entry if there is one (never waits). Returns how many
    /// sends it completed, `None` when the queue was empty.
    fn read_one(&mut self, sys: &mut Syscalls) -> Result<Option<u64>> {
        match sys.recv_errqueue(self.fd, &mut self.control) {
            Ok(len) => {
                let mut completed = 0;
                for n in parse_notices(control_bytes(&self.control, len))? {
                    completed += self.completions.complete(n.lo, n.hi, n.copied)?;
                }
                Ok(Some(completed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(Error::new(format!("recvmsg(MSG_ERRQUEUE): {e}"))),
        }
    }

    /// Reads every notification queued now, without waiting (the last read finds
    /// the queue empty). Returns how many sends they completed.
    pub fn drain(&mut self, sys: &mut Syscalls) -> Result<u64> {
        let mut completed = 0;
        while let Some(n) = self.read_one(sys)? {
            completed += n;
        }
        Ok(completed)
    }

    /// Waits until at most `outstanding` sends are not completed. Reads one entry
    /// at a time and stops as soon as that holds, so a wait for the one send just
    /// issued costs one `recvmsg` when its completion is already there, and
    /// `recvmsg` (empty), `poll`, `recvmsg` when it is not.
    pub fn wait_until(&mut self, sys: &mut Syscalls, outstanding: u64) -> Result<()> {
        let deadline = Instant::now() + COMPLETION_TIMEOUT;
        let mut polled_err = false;
        while self.completions.outstanding() > outstanding {
            if self.read_one(sys)?.is_some() {
                polled_err = false;
                continue;
            }
            if polled_err {
                // poll said POLLERR but the queue held nothing: the socket's own
                // error (a reset) is pending, not a notification.
                let err = sys
                    .socket_error(self.fd)
                    .map_err(|e| Error::new(format!("getsockopt(SO_ERROR): {e}")))?;
                if err != 0 {
                    return Err(Error::new(format!(
                        "socket error while waiting for {} zero-copy completions: {}",
                        self.completions.outstanding(),
                        std::io::Error::from_raw_os_error(err)
                    )));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout());
            }
            // events 0: POLLERR (a queued notification) is reported regardless.
            let revents = sys
                .poll(self.fd, 0, left)
                .map_err(|e| Error::new(format!("poll for zero-copy completions: {e}")))?;
            if revents == 0 {
                return Err(self.timeout());
            }
            if revents & (libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(Error::new(format!(
                    "connection closed with {} zero-copy completions outstanding",
                    self.completions.outstanding()
                )));
            }
            polled_err = revents & libc::POLLERR != 0;
        }
        Ok(())
    }

    /// The error of a wait that ran out of time.
    fn timeout(&self) -> Error {
        Error::new(format!(
            "no zero-copy completion for {} of {} sends within {} s",
            self.completions.outstanding(),
            self.completions.issued(),
            COMPLETION_TIMEOUT.as_secs()
        ))
    }
}

/// The first `len` bytes of a control buffer.
fn control_bytes(control: &[u64], len: usize) -> &[u8] {
    let all: &[u8] = words_as_bytes(control);
    &all[..len.min(all.len())]
}

/// Views u64s as bytes.
fn words_as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirements, and the byte length is
    // exactly that of the borrowed words.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), std::mem::size_of_val(words)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_complete_sends() {
        let mut c = Completions::new();
        for want in 0..5 {
            assert_eq!(c.issue().unwrap(), want);
        }
        assert_eq!(c.outstanding(), 5);
        assert_eq!(c.complete(0, 2, false).unwrap(), 3);
        assert_eq!(c.complete(3, 3, true).unwrap(), 1);
        assert_eq!(c.outstanding(), 1);
        assert_eq!(
            c.report(),
            ZcReport {
                sends: 5,
                completions: 4,
                copied: Some(1),
                fallbacks: None,
            }
        );
        // Twice, or never issued: errors, and nothing counted.
        assert!(c.complete(2, 2, false).is_err());
        assert!(c.complete(4, 5, false).is_err());
        assert_eq!(c.complete(4, 4, true).unwrap(), 1);
        assert_eq!(c.outstanding(), 0);
        assert_eq!(c.report().copied, Some(2));
    }

    #[test]
    fn many_sends_span_bitset_words() {
        let mut c = Completions::new();
        c.reserve(200);
        for _ in 0..200 {
            c.issue().unwrap();
        }
        assert_eq!(c.complete(0, 129, true).unwrap(), 130);
        assert_eq!(c.complete(130, 199, false).unwrap(), 70);
        assert_eq!(
            c.report(),
            ZcReport {
                sends: 200,
                completions: 200,
                copied: Some(130),
                fallbacks: None,
            }
        );
    }

    #[test]
    fn wrapping_range_is_checked_against_issued() {
        let mut c = Completions::new();
        c.issue().unwrap();
        // u32::MAX..=0 wraps: two ids, one of which (u32::MAX) was never issued.
        assert!(c.complete(u32::MAX, 0, false).is_err());
    }

    #[test]
    fn unknown_copied_flag() {
        let mut c = Completions::without_copied_flag();
        c.issue().unwrap();
        c.complete(0, 0, false).unwrap();
        assert_eq!(c.report().copied, None);
    }

    /// One cmsg as the kernel lays it out.
    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        let header = std::mem::size_of::<libc::cmsghdr>();
        let len = header + data.len();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&level.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        while out.len() % std::mem::size_of::<usize>() != 0 {
            out.push(0);
        }
        out
    }

    fn ee(errno: u32, origin: u8, code: u8, info: u32, data: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&errno.to_ne_bytes());
        out.extend_from_slice(&[origin, 0, code, 0]);
        out.extend_from_slice(&info.to_ne_bytes());
        out.extend_from_slice(&data.to_ne_bytes());
        out
    }

    #[test]
    fn parses_zerocopy_notices() {
        let mut control = cmsg(
            libc::SOL_IP,
            libc::IP_RECVERR,
            &ee(0, SO_EE_ORIGIN_ZEROCOPY, 1, 3, 7),
        );
        control.extend(cmsg(
            libc::SOL_IPV6,
            libc::IPV6_RECVERR,
            &ee(0, SO_EE_ORIGIN_ZEROCOPY, 0, 8, 8),
        ));
        // Unrelated control messages are skipped.
        control.extend(cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[1, 2, 3]));
        assert_eq!(
            parse_notices(&control).unwrap(),
            [
                Notice {
                    lo: 3,
                    hi: 7,
                    copied: true
                },
                Notice {
                    lo: 8,
                    hi: 8,
                    copied: false
                }
            ]
        );
        assert_eq!(parse_notices(&[]).unwrap(), []);
    }

    #[test]
    fn rejects_other_errors_and_malformed_data() {
        let icmp = cmsg(libc::SOL_IP, libc::IP_RECVERR, &ee(113, 2, 1, 0, 0));
        let err = parse_notices(&icmp).unwrap_err().to_string();
        assert!(err.contains("origin 2, errno 113"), "{err}");
        let short = cmsg(libc::SOL_IP, libc::IP_RECVERR, &[0; 8]);
        assert!(parse_notices(&short).is_err());
        let mut bad_len = cmsg(libc::SOL_IP, libc::IP_RECVERR, &ee(0, 5, 0, 0, 0));
        bad_len[..8].copy_from_slice(&1000usize.to_ne_bytes());
        assert!(parse_notices(&bad_len).is_err());
    }
}
