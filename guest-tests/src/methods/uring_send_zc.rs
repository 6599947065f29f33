//! `uring_send_zc`: io_uring `IORING_OP_SEND_ZC` from a MAP_SHARED mapping of the
//! file, one request per chunk, submitted in batches of [`BATCH`].
//!
//! Per batch, one `io_uring_enter` submits the requests and waits for their
//! results, so the loop makes about 1/[`BATCH`] system calls per chunk (the
//! table's "none per chunk once the ring runs"); the sample request still follows
//! every chunk. The requests of a batch are linked (`IOSQE_IO_LINK`) and sent with
//! `MSG_WAITALL`, so they go out in order and whole; the next batch is queued only
//! after the previous one's results, so batches cannot overtake each other either.
//!
//! Each request completes twice (io_uring_prep_send_zc(3)): the result CQE (with
//! `IORING_CQE_F_MORE`), then a notification CQE (`IORING_CQE_F_NOTIF`) when the
//! kernel no longer references the pages. With `IORING_SEND_ZC_REPORT_USAGE`
//! (Linux 6.2) the notification's `res` has `IORING_NOTIF_USAGE_ZC_COPIED` set if
//! the kernel copied; before 6.2 the flag is rejected, the sends go without it and
//! the report's `copied` is `null`. The mapping stays until every notification
//! arrived.
//!
//! Kernels without `IORING_OP_SEND_ZC` (before 6.0), or without io_uring at all,
//! skip the method with the reason ([`probe`]).

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::runner::{Done, Transfer, IO_TIMEOUT};
use super::syscalls::{Call, Syscalls};
use super::zerocopy::Completions;
use crate::error::{Context, Error, Result};

/// Requests per submission.
pub const BATCH: usize = 16;
/// Completion queue size: a batch's results plus every notification not yet
/// reaped (one per send still unacknowledged by the peer) fit with room to spare.
const CQ_ENTRIES: u32 = 256;
/// `IORING_SEND_ZC_REPORT_USAGE` (io_uring.h, Linux 6.2): ask for the copied flag.
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED` (io_uring.h): in a notification's `res`.
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

/// Whether this kernel can run the method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// It cannot: the reason, for the `skipped` report.
    Missing(String),
    /// It can; `report_usage` says whether notifications carry the copied flag.
    Present {
        /// `IORING_SEND_ZC_REPORT_USAGE` is accepted (Linux 6.2+).
        report_usage: bool,
    },
}

/// Checks for io_uring, `IORING_OP_SEND_ZC` (with IORING_REGISTER_PROBE) and
/// `IORING_SEND_ZC_REPORT_USAGE`, on a throw-away ring, before `BEGIN`.
///
/// The last one has no probe bit: a SEND_ZC with the flag on fd -1 fails in its
/// preparation with EINVAL when the kernel does not know the flag, and only later,
/// when the file is looked up, with EBADF when it does.
pub fn probe() -> Result<Support> {
    let mut ring =
        match IoUring::new(4) {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                return Ok(Support::Missing(
                    "kernel has no io_uring (io_uring_setup: ENOSYS)".to_string(),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return Ok(Support::Missing(
                "io_uring is disabled (io_uring_setup: EPERM; sysctl kernel.io_uring_disabled?)"
                    .to_string(),
            )),
            Err(e) => return Err(Error::new(format!("io_uring_setup (probe ring): {e}"))),
        };
    let mut ops = Probe::new();
    match ring.submitter().register_probe(&mut ops) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return Ok(Support::Missing(
                "kernel has no IORING_OP_SEND_ZC (needs Linux 6.0; not even IORING_REGISTER_PROBE)"
                    .to_string(),
            ))
        }
        Err(e) => return Err(Error::new(format!("IORING_REGISTER_PROBE: {e}"))),
    }
    if !ops.is_supported(opcode::SendZc::CODE) {
        return Ok(Support::Missing(
            "kernel has no IORING_OP_SEND_ZC (needs Linux 6.0)".to_string(),
        ));
    }
    if !ring.params().is_feature_ext_arg() {
        // Not expected with SEND_ZC (EXT_ARG is 5.11), but the waits need it.
        return Ok(Support::Missing(
            "io_uring lacks IORING_FEAT_EXT_ARG (timed waits)".to_string(),
        ));
    }
    let entry = opcode::SendZc::new(types::Fd(-1), std::ptr::null(), 0)
        .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
        .build()
        .user_data(0);
    // SAFETY: the request has no buffer (null, length 0) and fd -1; nothing it
    // references can go away.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| Error::new("io_uring probe: submission queue full"))?;
    ring.submit_and_wait(1)
        .context(|| "io_uring_enter (SEND_ZC flag probe)".to_string())?;
    let result = ring.completion().next().map(|cqe| cqe.result());
    Ok(Support::Present {
        report_usage: result != Some(-libc::EINVAL),
    })
}

/// The ring and the accounting of its sends.
struct Ring {
    /// The ring.
    ring: IoUring,
    /// Whether requests ask for the copied flag.
    report_usage: bool,
    /// One id per request; completed by its notification.
    completions: Completions,
    /// Id of the current batch's first request.
    batch_first: u32,
    /// Lengths of the current batch's requests, by id - `batch_first`.
    batch_lens: [u32; BATCH],
    /// Requests queued in the current batch.
    queued: usize,
    /// Result CQEs of the current batch not reaped yet.
    results_pending: usize,
    /// The batch's failure: (only a cancelled link, text).
    failure: Option<(bool, String)>,
}

impl Ring {
    /// Queues a SEND_ZC of `data` on `sock`; `link` chains the next request to it.
    fn push(&mut self, sock: i32, data: &[u8], link: bool) -> Result<()> {
        let len =
            u32::try_from(data.len()).map_err(|_| Error::new("SEND_ZC chunk longer than 4 GiB"))?;
        let id = self.completions.issue()?;
        if self.queued == 0 {
            self.batch_first = id;
        }
        let mut entry = opcode::SendZc::new(types::Fd(sock), data.as_ptr(), len)
            .flags(libc::MSG_WAITALL)
            .zc_flags(if self.report_usage {
                IORING_SEND_ZC_REPORT_USAGE
            } else {
                0
            })
            .build()
            .user_data(u64::from(id));
        if link {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
        // SAFETY: `data` is in the file mapping, which the caller keeps mapped until
        // every request's notification arrived (or, on a failure, until the ring
        // is dropped: it is dropped first). The kernel reads user memory only
        // through checked user accesses, so even a request outliving the mapping
        // could not corrupt this process's memory.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| Error::new("io_uring submission queue full"))?;
        self.batch_lens[self.queued] = len;
        self.queued += 1;
        self.results_pending += 1;
        Ok(())
    }

    /// Submits the queued batch and waits for all its results.
    fn submit_batch(&mut self, sys: &mut Syscalls) -> Result<()> {
        while self.results_pending > 0 {
            self.enter(sys, self.results_pending)?;
            self.reap()?;
        }
        self.queued = 0;
        match self.failure.take() {
            Some((_, failure)) => Err(Error::new(failure)),
            None => Ok(()),
        }
    }

    /// Waits for the notifications of every send.
    fn wait_notifications(&mut self, sys: &mut Syscalls) -> Result<()> {
        while self.completions.outstanding() > 0 {
            let want = usize::try_from(self.completions.outstanding().min(u64::from(CQ_ENTRIES)))
                .expect("at most CQ_ENTRIES");
            self.enter(sys, want)?;
            self.reap()?;
        }
        Ok(())
    }

    /// One `io_uring_enter`: submits what is queued and waits up to [`IO_TIMEOUT`]
    /// for `want` CQEs.
    fn enter(&mut self, sys: &mut Syscalls, want: usize) -> Result<()> {
        let ts = types::Timespec::from(IO_TIMEOUT);
        let args = types::SubmitArgs::new().timespec(&ts);
        let submitter = self.ring.submitter();
        match sys.track(Call::IoUringEnter, || submitter.submit_with_args(want, &args)) {
            Ok(_) => Ok(()),
            // A signal: the caller's loop enters again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Err(Error::new(format!(
                "io_uring: no completion within {} s ({} results and {} of {} notifications outstanding)",
                IO_TIMEOUT.as_secs(),
                self.results_pending,
                self.completions.outstanding(),
                self.completions.issued()
            ))),
            Err(e) => Err(Error::new(format!("io_uring_enter: {e}"))),
        }
    }

    /// Takes every CQE there is.
    fn reap(&mut self) -> Result<()> {
        // One CQE at a time (no collecting: no allocation inside the loop).
        loop {
            // The queue view is dropped (publishing the new head) before `take`.
            let next = self.ring.completion().next();
            match next {
                Some(cqe) => self.take(cqe.user_data(), cqe.result(), cqe.flags())?,
                None => return Ok(()),
            }
        }
    }

    /// Accounts one CQE of request `user_data`.
    fn take(&mut self, user_data: u64, res: i32, flags: u32) -> Result<()> {
        let id = u32::try_from(user_data)
            .map_err(|_| Error::new(format!("io_uring: CQE for unknown request {user_data}")))?;
        if cqueue::notif(flags) {
            let copied = self.report_usage && (res as u32) & IORING_NOTIF_USAGE_ZC_COPIED != 0;
            self.completions.complete(id, id, copied)?;
            return Ok(());
        }
        let index = id.wrapping_sub(self.batch_first) as usize;
        if index >= self.queued || self.results_pending == 0 {
            return Err(Error::new(format!(
                "io_uring: result for request {id}, not in the current batch"
            )));
        }
        self.results_pending -= 1;
        let want = self.batch_lens[index];
        let cancelled = res == -libc::ECANCELED;
        let failure = if cancelled {
            Some(format!(
                "SEND_ZC of request {id} cancelled (an earlier linked send failed)"
            ))
        } else if res < 0 {
            Some(format!(
                "SEND_ZC of request {id}: {}",
                std::io::Error::from_raw_os_error(-res)
            ))
        } else if res as u32 != want {
            Some(format!(
                "SEND_ZC of request {id} sent {res} of {want} bytes"
            ))
        } else if !cqueue::more(flags) {
            Some(format!(
                "SEND_ZC of request {id} completed without IORING_CQE_F_MORE (no notification will follow)"
            ))
        } else {
            None
        };
        if let Some(text) = failure {
            // Keep the first real failure; a cancelled link is only a consequence
            // of one, so it is kept only until a real one shows up.
            let replace = match &self.failure {
                None => true,
                Some((was_cancelled, _)) => *was_cancelled && !cancelled,
            };
            if replace {
                self.failure = Some((cancelled, text));
            }
        }
        Ok(())
    }
}

/// Creates the method's ring, counting the crate's system calls: io_uring_setup,
/// then two mmaps of the rings, or three without IORING_FEAT_SINGLE_MMAP.
///
/// With IORING_SETUP_DEFER_TASKRUN (Linux 6.1) when the kernel has it: the
/// kernel then runs io_uring's completion work (posting the notifications) only
/// inside `io_uring_enter`. Without it, that work is queued as task work that
/// interrupts whatever blocking call the program is in, so the ACK's `recv`
/// (which has a timeout, so it cannot restart transparently) would fail with
/// EINTR and be issued again, adding calls that are not the method's.
fn setup_ring(sys: &mut Syscalls) -> Result<IoUring> {
    let deferred = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(u32::try_from(BATCH).expect("16"));
    sys.count_library(Call::IoUringSetup, 1);
    let ring = match deferred {
        Ok(ring) => ring,
        // A kernel before 6.1 rejects the flags: a plain ring instead.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let plain = IoUring::builder()
                .setup_cqsize(CQ_ENTRIES)
                .build(u32::try_from(BATCH).expect("16"));
            sys.count_library(Call::IoUringSetup, 1);
            plain.context(|| "io_uring_setup".to_string())?
        }
        Err(e) => return Err(Error::new(format!("io_uring_setup: {e}"))),
    };
    let mmaps = if ring.params().is_feature_single_mmap() {
        2
    } else {
        3
    };
    sys.count_library(Call::Mmap, mmaps);
    Ok(ring)
}

/// Maps the file, sends it with SEND_ZC in batches, waits for the ACK and every
/// notification; the ring and then the mapping are dropped after `END`.
pub fn transfer(t: &mut Transfer<'_>, report_usage: bool) -> Result<Done> {
    let map = t.map_shared()?;
    let ring = setup_ring(&mut t.sys)?;
    let mut completions = if report_usage {
        Completions::new()
    } else {
        Completions::without_copied_flag()
    };
    completions.reserve(t.chunks());
    let mut u = Ring {
        ring,
        report_usage,
        completions,
        batch_first: 0,
        batch_lens: [0; BATCH],
        queued: 0,
        results_pending: 0,
        failure: None,
    };
    let chunks = t.chunks();
    t.for_each_chunk(|t, c| {
        let batch_end = u.queued + 1 == BATCH || c.index + 1 == chunks;
        u.push(t.sock, map.slice(c.map_offset(), c.len), !batch_end)?;
        if batch_end {
            u.submit_batch(&mut t.sys)?;
        }
        Ok(())
    })?;
    t.wait_ack()?;
    u.wait_notifications(&mut t.sys)?;
    let zerocopy = Some(u.completions.report());
    Ok(Done {
        // In this order: the ring goes before the memory its requests named.
        keep: vec![Box::new(u.ring), Box::new(map)],
        zerocopy,
        zerocopy_receive: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(report_usage: bool) -> Option<Ring> {
        let ring = IoUring::new(4).ok()?;
        let mut completions = Completions::new();
        for _ in 0..3 {
            completions.issue().unwrap();
        }
        Some(Ring {
            ring,
            report_usage,
            completions,
            batch_first: 0,
            batch_lens: [100; BATCH],
            queued: 3,
            results_pending: 3,
            failure: None,
        })
    }

    const MORE: u32 = 1 << 1; // IORING_CQE_F_MORE
    const NOTIF: u32 = 1 << 3; // IORING_CQE_F_NOTIF

    #[test]
    fn results_and_notifications_are_accounted() {
        let Some(mut r) = ring(true) else {
            eprintln!("no io_uring here: skipping");
            return;
        };
        for id in 0..3 {
            r.take(id, 100, MORE).unwrap();
        }
        assert_eq!(r.results_pending, 0);
        assert!(r.failure.is_none());
        r.take(0, IORING_NOTIF_USAGE_ZC_COPIED as i32, NOTIF)
            .unwrap();
        r.take(2, 0, NOTIF).unwrap();
        assert_eq!(r.completions.outstanding(), 1);
        r.take(1, IORING_NOTIF_USAGE_ZC_COPIED as i32, NOTIF)
            .unwrap();
        let z = r.completions.report();
        assert_eq!((z.sends, z.completions, z.copied), (3, 3, Some(2)));
        // A second notification for the same request is an accounting error.
        assert!(r.take(1, 0, NOTIF).is_err());
    }

    #[test]
    fn first_real_failure_wins_over_cancellations() {
        let Some(mut r) = ring(false) else {
            eprintln!("no io_uring here: skipping");
            return;
        };
        r.take(0, 40, MORE).unwrap();
        r.take(1, -libc::ECANCELED, MORE).unwrap();
        r.take(2, -libc::ECANCELED, MORE).unwrap();
        let (_, failure) = r.failure.clone().unwrap();
        assert!(failure.contains("request 0 sent 40 of 100"), "{failure}");
        // Without usage reporting, copied is unknown whatever res says.
        r.completions = Completions::without_copied_flag();
        r.completions.issue().unwrap();
        r.take(0, IORING_NOTIF_USAGE_ZC_COPIED as i32, NOTIF)
            .unwrap();
        assert_eq!(r.completions.report().copied, None);
    }

    #[test]
    fn cancellation_alone_is_reported() {
        let Some(mut r) = ring(false) else {
            eprintln!("no io_uring here: skipping");
            return;
        };
        r.take(1, -libc::ECANCELED, MORE).unwrap();
        assert!(r.failure.clone().unwrap().1.contains("cancelled"));
        r.take(0, -libc::EPIPE, MORE).unwrap();
        assert!(r.failure.clone().unwrap().1.contains("Broken pipe"));
        assert!(r.take(7, 100, MORE).is_err(), "not in the batch");
    }
}
