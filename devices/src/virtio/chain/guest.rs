//! [`GuestChain`]: the one way the device models reach the buffers of a descriptor
//! chain, and the one place that records those accesses in the [`DmaLog`].
//!
//! A device walks a chain ([`GuestChain::walk`]), cuts its bytes into the parts the
//! protocol gives them ([`GuestBuffers::split_at`]: header, data, status byte...) and
//! then moves bytes only through [`GuestBuffers`]' methods. Each of them logs the
//! ranges it touched (one `desc` record per descriptor and role, fingerprints taken
//! the cheapest way the log offers for that access), so an access cannot go
//! unrecorded: there is no other way to it.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::{walk_chain, BufferError, ChainDesc, ChainError};
use crate::dma_log::{
    DescInfo, DescRole, DetailFn, DeviceKind, Direction, DmaLog, FramePatch, RequestDetail,
    StableFile,
};
use crate::virtio::GuestMem;

/// What every access of one chain shares: where to read and write, where to log,
/// and the chain's place in its queue.
#[derive(Clone, Copy)]
struct Context<'a> {
    mem: &'a GuestMem,
    log: &'a DmaLog,
    device: DeviceKind,
    queue: u16,
    head: u16,
}

impl Context<'_> {
    fn info(&self, s: &Seg, gpa: u64, len: u32, dir: Direction, role: DescRole) -> DescInfo {
        DescInfo {
            device: self.device,
            queue: self.queue,
            head: self.head,
            desc: s.index,
            indirect: s.indirect,
            gpa,
            len,
            dir,
            role,
        }
    }

    /// Logs `bytes`, the device's copy of what it moved through `segs` (in order),
    /// role by role: a descriptor holding bytes of two roles gives two records.
    fn log_bytes(&self, segs: &[Seg], bytes: &[u8], roles: Roles, dir: Direction) {
        if !self.log.is_enabled() {
            return;
        }
        let mut at = 0usize;
        for s in segs {
            let end = (at + s.len as usize).min(bytes.len());
            let mut cut = at;
            while cut < end {
                let (role, upto) = roles.role_at(cut, end);
                let gpa = s.addr + (cut - at) as u64;
                // The device's own copy is hashed: it is exactly what was read or
                // written, and costs no second pass over guest memory.
                let len = u32::try_from(upto - cut).expect("within one descriptor");
                let info = self.info(s, gpa, len, dir, role);
                self.log.descriptor_bytes(info, &bytes[cut..upto]);
                cut = upto;
            }
            at = end;
        }
    }
}

/// The role of each byte an access moves: the first `header` bytes are
/// [`DescRole::Header`], the rest `rest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    header: usize,
    rest: DescRole,
}

impl Roles {
    /// Every byte has `role`.
    pub const fn all(role: DescRole) -> Self {
        Roles {
            header: 0,
            rest: role,
        }
    }

    /// The first `header` bytes are the header, the rest data.
    pub const fn header_then_data(header: usize) -> Self {
        Roles {
            header,
            rest: DescRole::Data,
        }
    }

    /// The role of byte `at` and where that role ends before `end`.
    fn role_at(self, at: usize, end: usize) -> (DescRole, usize) {
        if at < self.header {
            (DescRole::Header, self.header.min(end))
        } else {
            (self.rest, end)
        }
    }
}

/// A guest-memory access that failed (only possible for a buffer that was not
/// checked with [`GuestChain::check_buffers`]).
#[derive(Debug, thiserror::Error)]
#[error("descriptor {desc}: {source}")]
pub struct AccessError {
    /// The descriptor whose buffer could not be accessed.
    pub desc: u16,
    /// What vm-memory said.
    pub source: GuestMemoryError,
}

/// Filling guest buffers from a file, or writing them to one, failed.
#[derive(Debug, thiserror::Error)]
pub enum FileAccessError {
    /// Seeking the file failed.
    #[error("{0}")]
    Seek(std::io::Error),
    /// The transfer between the file and guest memory failed.
    #[error("{0}")]
    Transfer(GuestMemoryError),
}

/// A descriptor chain a device took from one of its queues, walked and validated
/// as a chain (not yet its buffers: see [`GuestChain::check_buffers`]).
pub struct GuestChain<'a> {
    ctx: Context<'a>,
    descs: Vec<ChainDesc>,
    queue_size: u16,
}

/// A chain with more descriptors than its queue has entries, which a driver must not
/// make (virtio 1.2, 2.7.5.3.1). `walk_chain` cannot stop it: only an indirect table
/// (of up to 65535 entries) makes a chain longer than the queue without a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("descriptor chain of {descriptors} descriptors is longer than the queue size {queue_size}")]
pub struct ChainTooLong {
    /// Descriptors in the chain (indirect ones included).
    pub descriptors: usize,
    /// The queue's size.
    pub queue_size: u16,
}

impl<'a> GuestChain<'a> {
    /// Walks the chain at `head` of `queue` (queue number `queue_index` of a
    /// `device`) with [`walk_chain`]; `indirect_allowed` is whether
    /// VIRTIO_RING_F_INDIRECT_DESC was negotiated. Accesses are logged to `log`.
    pub fn walk(
        mem: &'a GuestMem,
        log: &'a DmaLog,
        device: DeviceKind,
        queue_index: u16,
        queue: &Queue,
        head: u16,
        indirect_allowed: bool,
    ) -> Result<Self, ChainError> {
        let descs = walk_chain(
            mem,
            GuestAddress(queue.desc_table()),
            queue.size(),
            head,
            indirect_allowed,
        )?;
        Ok(GuestChain {
            ctx: Context {
                mem,
                log,
                device,
                queue: queue_index,
                head,
            },
            descs,
            queue_size: queue.size(),
        })
    }

    /// Checks the chain is no longer than its queue's size.
    pub fn check_length(&self) -> Result<(), ChainTooLong> {
        if self.descs.len() > usize::from(self.queue_size) {
            return Err(ChainTooLong {
                descriptors: self.descs.len(),
                queue_size: self.queue_size,
            });
        }
        Ok(())
    }

    /// The head descriptor's index.
    pub fn head(&self) -> u16 {
        self.ctx.head
    }

    /// The descriptors, in chain order.
    pub fn descriptors(&self) -> &[ChainDesc] {
        &self.descs
    }

    /// Checks every buffer is non-empty and in guest memory; the first bad one.
    pub fn check_buffers(&self) -> Result<(), BufferError> {
        self.descs.iter().try_for_each(|d| d.check(self.ctx.mem))
    }

    /// Checks one descriptor's buffer (e.g. the one that must hold a status byte).
    pub fn check(&self, d: &ChainDesc) -> Result<(), BufferError> {
        d.check(self.ctx.mem)
    }

    /// The bytes of the chain's device-readable buffers, in chain order.
    pub fn readable(&self) -> GuestBuffers<'a> {
        self.buffers(|d| !d.writable)
    }

    /// The bytes of the chain's device-writable buffers, in chain order.
    pub fn writable(&self) -> GuestBuffers<'a> {
        self.buffers(|d| d.writable)
    }

    /// The bytes of all of the chain's buffers, in chain order.
    pub fn all(&self) -> GuestBuffers<'a> {
        self.buffers(|_| true)
    }

    fn buffers(&self, keep: impl Fn(&ChainDesc) -> bool) -> GuestBuffers<'a> {
        GuestBuffers {
            ctx: self.ctx,
            segs: self
                .descs
                .iter()
                .filter(|d| keep(d))
                .map(Seg::from)
                .collect(),
        }
    }

    /// Records the completed request (after its `desc` records).
    pub fn log_request(&self, detail: RequestDetail) {
        let c = &self.ctx;
        c.log.request(c.device, c.queue, c.head, detail);
    }

    /// Records the completed request, its detail made only if the log is on.
    pub fn log_request_with(&self, detail: impl FnOnce() -> RequestDetail) {
        if self.ctx.log.is_enabled() {
            self.log_request(detail());
        }
    }

    /// Records the completed request, its detail worked out later from `bytes` by
    /// `detail` on the log's writer thread (see [`DmaLog::request_from_bytes`]).
    pub fn log_request_from_bytes(&self, bytes: &[u8], arg: u64, detail: DetailFn) {
        let c = &self.ctx;
        c.log
            .request_from_bytes(c.device, c.queue, c.head, bytes, arg, detail);
    }

    /// Records the completed request, its detail worked out later by `detail` on the
    /// log's writer thread from the bytes this chain's last logged read copied
    /// after its first `skip` (no second copy: see [`DmaLog::request_from_read`]),
    /// with `patch` applied; `bytes` are those bytes now, copied only if the
    /// read's copies are not at hand.
    pub fn log_request_from_read(
        &self,
        skip: usize,
        bytes: &[u8],
        patch: Option<FramePatch>,
        arg: u64,
        detail: DetailFn,
    ) {
        let c = &self.ctx;
        c.log
            .request_from_read(c.device, c.queue, c.head, skip, bytes, patch, arg, detail);
    }

    /// Records a guest driver error in this chain.
    pub fn log_error(&self, what: &str, needs_reset: bool) {
        let c = &self.ctx;
        c.log
            .device_error(c.device, c.queue, Some(c.head), what, needs_reset);
    }
}

/// A contiguous guest range, part of one descriptor.
#[derive(Debug, Clone, Copy)]
struct Seg {
    index: u16,
    indirect: bool,
    addr: u64,
    /// A descriptor's length, or part of it.
    len: u32,
}

impl From<&ChainDesc> for Seg {
    fn from(d: &ChainDesc) -> Self {
        Seg {
            index: d.index,
            indirect: d.indirect,
            addr: d.addr,
            len: d.len,
        }
    }
}

/// Some of a chain's bytes, in chain order, across any number of descriptors: what
/// a device reads, writes, fills from a file or writes to one. Every method that
/// touches guest memory logs what it touched.
pub struct GuestBuffers<'a> {
    ctx: Context<'a>,
    segs: Vec<Seg>,
}

impl<'a> GuestBuffers<'a> {
    /// Bytes.
    pub fn len(&self) -> u64 {
        self.segs.iter().map(|s| u64::from(s.len)).sum()
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// How many descriptor pieces hold the bytes.
    pub fn segment_count(&self) -> usize {
        self.segs.len()
    }

    /// The index of the first descriptor holding these bytes.
    pub fn first_descriptor(&self) -> Option<u16> {
        self.segs.first().map(|s| s.index)
    }

    /// The longest piece: `(descriptor index, bytes)`.
    pub fn longest_segment(&self) -> Option<(u16, u64)> {
        self.segs
            .iter()
            .max_by_key(|s| s.len)
            .map(|s| (s.index, u64::from(s.len)))
    }

    /// The first `n` bytes and the rest (a descriptor straddling the cut is split).
    pub fn split_at(self, mut n: u64) -> (GuestBuffers<'a>, GuestBuffers<'a>) {
        let mut front = Vec::new();
        let mut back = Vec::new();
        for s in self.segs {
            if n == 0 {
                back.push(s);
            } else if u64::from(s.len) <= n {
                front.push(s);
                n -= u64::from(s.len);
            } else {
                let cut = u32::try_from(n).expect("shorter than this descriptor");
                front.push(Seg { len: cut, ..s });
                back.push(Seg {
                    addr: s.addr + n,
                    len: s.len - cut,
                    ..s
                });
                n = 0;
            }
        }
        let ctx = self.ctx;
        (
            GuestBuffers { ctx, segs: front },
            GuestBuffers { ctx, segs: back },
        )
    }

    /// Copies the first `buf.len()` bytes (at most [`len`](Self::len)) into `buf`,
    /// then logs them (`device_reads`, fingerprints of the bytes as read). Returns
    /// how many bytes were read; on error nothing is logged.
    pub fn read(&self, buf: &mut [u8], roles: Roles) -> Result<usize, AccessError> {
        let mem = self.ctx.mem;
        let n = self.for_each_piece(buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], GuestAddress(addr))
        })?;
        self.ctx
            .log_bytes(&self.segs, &buf[..n], roles, Direction::DeviceReads);
        Ok(n)
    }

    /// Writes `bytes` (at most [`len`](Self::len) of them) from the start of the
    /// buffers, then logs what was written (`device_writes`). Returns how many
    /// bytes were written; on error nothing is logged.
    pub fn write(&self, bytes: &[u8], roles: Roles) -> Result<usize, AccessError> {
        let mem = self.ctx.mem;
        let n = self.for_each_piece(bytes.len(), |addr, at, n| {
            mem.write_slice(&bytes[at..at + n], GuestAddress(addr))
        })?;
        self.ctx
            .log_bytes(&self.segs, &bytes[..n], roles, Direction::DeviceWrites);
        Ok(n)
    }

    /// Calls `access(gpa, at, n)` for each piece of the first `limit` bytes (`at`:
    /// the piece's offset in them). Returns how many bytes that covered.
    fn for_each_piece(
        &self,
        limit: usize,
        mut access: impl FnMut(u64, usize, usize) -> Result<(), GuestMemoryError>,
    ) -> Result<usize, AccessError> {
        let mut at = 0usize;
        for s in &self.segs {
            if at == limit {
                break;
            }
            let n = (s.len as usize).min(limit - at);
            access(s.addr, at, n).map_err(|source| AccessError {
                desc: s.index,
                source,
            })?;
            at += n;
        }
        Ok(at)
    }

    /// Fills all of the buffers with the bytes of `file` from `offset` on, straight
    /// from the file into guest memory (no bounce buffer), and logs each descriptor
    /// as `data` (`device_writes`). With `stable` (the same file, registered with
    /// the log as unchanging) the fingerprints come from the file on the log's
    /// writer thread, which reuses its per-page table for page-aligned reads;
    /// otherwise the log copies the guest bytes just written.
    pub fn fill_from_file(
        &self,
        file: &mut File,
        mut offset: u64,
        stable: Option<StableFile>,
    ) -> Result<(), (u64, FileAccessError)> {
        let c = &self.ctx;
        for s in &self.segs {
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| (offset, FileAccessError::Seek(e)))?;
            c.mem
                .read_exact_volatile_from(GuestAddress(s.addr), file, s.len as usize)
                .map_err(|e| (offset, FileAccessError::Transfer(e)))?;
            let info = c.info(s, s.addr, s.len, Direction::DeviceWrites, DescRole::Data);
            match stable {
                Some(stable) => c.log.descriptor_from_file(info, stable, offset),
                None => c.log.descriptor_from_guest(c.mem, info),
            }
            offset += u64::from(s.len);
        }
        Ok(())
    }

    /// Writes all of the buffers to `file` from `offset` on, straight from guest
    /// memory, each descriptor logged as `data` (`device_reads`) just before the
    /// device reads it.
    pub fn write_to_file(
        &self,
        file: &mut File,
        mut offset: u64,
    ) -> Result<(), (u64, FileAccessError)> {
        let c = &self.ctx;
        for s in &self.segs {
            let info = c.info(s, s.addr, s.len, Direction::DeviceReads, DescRole::Data);
            c.log.descriptor_from_guest(c.mem, info);
            file.seek(SeekFrom::Start(offset))
                .map_err(|e| (offset, FileAccessError::Seek(e)))?;
            c.mem
                .write_all_volatile_to(GuestAddress(s.addr), file, s.len as usize)
                .map_err(|e| (offset, FileAccessError::Transfer(e)))?;
            offset += u64::from(s.len);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
