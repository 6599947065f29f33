//! What the receive methods share (`docs/method-suite.md`, "Receive methods").
//!
//! The peer sends the payload (the same file the guest has on the test disk, or
//! its first `zc.size` bytes) on each connection to its send port; the guest
//! writes it to `<scratch>/<method>.<variant>.bin` (`MethodRun::scratch_file`)
//! chunk by chunk, each chunk at the same file offset as in the payload, so that a
//! page of the stream is a page of the file (the audit identifies pages by their
//! content). After the last chunk it `fsync`s the file and `syncfs`s its file
//! system, sends the 8-byte little-endian count of what it received
//! (`zc_protocol::ack`), half-closes, and reads until the peer's FIN.
//!
//! After `END`, [`Check::verify`] compares the file written with the payload: a
//! method that stored wrong bytes fails, whatever the devices saw.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::runner::{transfer_size, Prepared, Ready, Transfer, IO_TIMEOUT};
use super::syscalls::Syscalls;
use super::tcp_zerocopy_receive;
use super::{Hooks, Method, Roots, Suite, CHUNK_ALIGN};
use crate::error::{Context, Error, Result};
use crate::scenarios::read_full;
use zc_protocol::ack;
use zc_protocol::MethodRun;

/// The file a receive run writes: `<scratch>/<method>.bin`, or
/// `<scratch>/<method>.<variant>.bin` on a named card
/// ([`MethodRun::scratch_file`], which the VMM reads back after the boot).
pub fn target_path(scratch: &Path, run: &MethodRun<'_>) -> PathBuf {
    scratch.join(run.scratch_file())
}

/// A receive method's preparation, before `BEGIN`: its capability check, the
/// bytes to expect (from the payload file on the test disk), the target file
/// created empty (O_DIRECT for the direct methods; `recv_mmap`'s pre-sized, since
/// a mapping cannot grow a file), caches dropped.
pub fn prepare(
    run: &MethodRun<'_>,
    suite: &Suite,
    roots: Roots<'_>,
    peer: SocketAddrV4,
    hooks: &mut dyn Hooks,
) -> Result<Prepared> {
    let method = run.method;
    if method == Method::TcpZerocopyReceive {
        if let tcp_zerocopy_receive::Support::Missing(reason) = tcp_zerocopy_receive::probe()? {
            return Ok(Prepared::Skipped(reason));
        }
    }
    let payload = roots.disk.join(&suite.file);
    let payload_len = std::fs::metadata(&payload)
        .context(|| format!("stat {}", payload.display()))?
        .len();
    let size = transfer_size(suite, payload_len, &payload.display())?;
    let target = target_path(roots.scratch, run);
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(true);
    if method.direct() {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(&target).context(|| {
        format!(
            "creating {}{}",
            target.display(),
            if method.direct() {
                " with O_DIRECT"
            } else {
                ""
            }
        )
    })?;
    if method == Method::RecvMmap {
        file.set_len(size)
            .context(|| format!("ftruncate {} to {size} bytes", target.display()))?;
    }
    hooks.drop_caches()?;
    Ok(Prepared::Ready(Ready {
        file,
        size,
        peer,
        keep: Vec::new(),
        uring_report_usage: false,
        check: Some(Check {
            target,
            payload,
            size,
        }),
    }))
}

/// Receives exactly `buf.len()` bytes: `recv(MSG_WAITALL)`, again after a short
/// return (a signal, the timeout). `offset` is the stream offset of `buf[0]` and
/// `size` the whole transfer's, for messages; the end of the stream first is an
/// error.
pub fn recv_exactly(
    sys: &mut Syscalls,
    sock: RawFd,
    buf: &mut [u8],
    offset: u64,
    size: u64,
) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let at = offset + got as u64;
        match sys.recv(sock, &mut buf[got..], libc::MSG_WAITALL) {
            Ok(0) => return Err(short_stream(at, size)),
            Ok(n) => got += n,
            Err(e) => return Err(recv_error("recv", e, at, size)),
        }
    }
    Ok(())
}

/// The peer ended the stream after `at` of the `size` bytes expected.
pub fn short_stream(at: u64, size: u64) -> Error {
    Error::new(format!(
        "the peer ended the stream after {at} of {size} bytes"
    ))
}

/// A receive error at stream offset `at`, with the timeout spelled out.
pub fn recv_error(call: &str, e: io::Error, at: u64, size: u64) -> Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        Error::new(format!(
            "{call} from the socket: no data from the peer within {} s after {at} of {size} bytes",
            IO_TIMEOUT.as_secs()
        ))
    } else {
        Error::new(format!(
            "{call} from the socket at {at} of {size} bytes: {e}"
        ))
    }
}

/// Writes all of `buf` at the file position with `write` (partial writes
/// continue); `offset` is that position, for messages.
pub fn write_file(sys: &mut Syscalls, fd: RawFd, mut buf: &[u8], offset: u64) -> Result<()> {
    let mut at = offset;
    while !buf.is_empty() {
        match sys.write(fd, buf) {
            Ok(0) => return Err(Error::new(format!("write to the file at {at} returned 0"))),
            Ok(n) => {
                buf = &buf[n..];
                at += n as u64;
            }
            Err(e) => return Err(Error::new(format!("write to the file at {at}: {e}"))),
        }
    }
    Ok(())
}

/// Zeroes `buf[len..]` up to the next [`CHUNK_ALIGN`] boundary and returns that
/// length: an O_DIRECT write is whole blocks, and the buffer's tail must not carry
/// an earlier chunk's payload to the disk at the wrong offset. Only a transfer's
/// last chunk is ever unaligned; [`finish`] cuts the file back to size.
pub fn pad_to_block(buf: &mut [u8], len: usize) -> usize {
    let padded = len.div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    buf[len..padded].fill(0);
    padded
}

/// One O_DIRECT write of `parts` (each block-aligned in address and length), in
/// order, at `offset`: `pwrite` for one part, `pwritev` for two. A short direct
/// write is an error: it cannot go on at an unaligned offset.
pub fn write_direct(sys: &mut Syscalls, fd: RawFd, parts: &[&[u8]], offset: u64) -> Result<()> {
    let want: usize = parts.iter().map(|p| p.len()).sum();
    let written = match parts {
        [one] => sys.pwrite(fd, one, offset),
        _ => sys.pwritev(fd, parts, offset),
    };
    match written {
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(Error::new(format!(
            "O_DIRECT write at {offset} wrote {n} of {want} bytes (scratch disk full?)"
        ))),
        Err(e) => Err(Error::new(format!("O_DIRECT write at {offset}: {e}"))),
    }
}

/// After the chunk loop: the file cut back to the transfer's size where O_DIRECT
/// wrote a whole last block, `fsync` (the data reaches the disk before `END`,
/// then a FLUSH where virtio-blk has a write cache), the 8-byte count to the peer,
/// half-close, and the peer's FIN (nothing more may come).
///
/// Half-close, not close: the peer closes when the guest's FIN arrives, and its
/// FIN is how the guest knows the stream held nothing beyond the payload.
pub fn finish(t: &mut Transfer<'_>) -> Result<()> {
    let fd = t.file.as_raw_fd();
    let size = t.size;
    if t.direct && !size.is_multiple_of(CHUNK_ALIGN as u64) {
        t.sys
            .ftruncate(fd, size)
            .context(|| format!("ftruncate of the received file to {size} bytes"))?;
    }
    // fsync, then syncfs: the data and its metadata are written by fsync, but on
    // ext4 without a journal (the scratch disk) neither fdatasync nor fsync always
    // asks the disk to flush its cache (6.1 fs/ext4/fsync.c, ext4_fsync_nojournal:
    // an inode that is not dirty, or only I_DIRTY_SYNC for fdatasync, returns
    // before `needs_barrier`). Measured: recv_mmap's fdatasync sent no FLUSH (its
    // inode only had a new mtime), and recv_write's fsync sent none once the
    // periodic writeback had written the inode during the transfer. syncfs
    // (ext4_sync_fs) always flushes; without a FLUSH the audit FAILs the method.
    t.sys
        .fsync(fd)
        .context(|| "fsync of the received file".to_string())?;
    t.sys
        .syncfs(fd)
        .context(|| "syncfs of the scratch disk".to_string())?;
    let count = ack::encode(size);
    let mut sent = 0;
    while sent < count.len() {
        match t.sys.send(t.sock, &count[sent..], libc::MSG_NOSIGNAL) {
            Ok(0) => return Err(Error::new("send of the byte count returned 0")),
            Ok(n) => sent += n,
            Err(e) => return Err(Error::new(format!("sending the byte count: {e}"))),
        }
    }
    t.sys
        .shutdown(t.sock, libc::SHUT_WR)
        .context(|| "shutdown(SHUT_WR) after the byte count".to_string())?;
    // The payload is complete, so this buffer only ever holds bytes too many.
    let mut extra = [0u8; 64];
    match t.sys.recv(t.sock, &mut extra, 0) {
        Ok(0) => Ok(()),
        Ok(n) => Err(Error::new(format!(
            "the peer sent more than the {size} bytes expected ({n} more at least)"
        ))),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Error::new(format!(
            "the peer did not close the connection within {} s of the byte count",
            IO_TIMEOUT.as_secs()
        ))),
        Err(e) => Err(Error::new(format!(
            "waiting for the peer to close after the byte count: {e}"
        ))),
    }
}

/// The check after `END` of what a receive method stored.
#[derive(Debug, Clone)]
pub struct Check {
    /// The file written.
    target: PathBuf,
    /// The payload on the test disk.
    payload: PathBuf,
    /// Bytes expected: the payload's first `size`.
    size: u64,
}

impl Check {
    /// Whether the file written holds exactly the payload's first `size` bytes.
    ///
    /// Plain buffered reads, not counted: after `END`, outside the span.
    pub fn verify(&self) -> Result<()> {
        let (target, payload) = (self.target.display(), self.payload.display());
        let len = std::fs::metadata(&self.target)
            .context(|| format!("stat {target}"))?
            .len();
        if len != self.size {
            return Err(Error::new(format!(
                "{target} has {len} bytes after the transfer, not {}",
                self.size
            )));
        }
        let mut written = File::open(&self.target).context(|| format!("opening {target}"))?;
        let mut expected = File::open(&self.payload)
            .context(|| format!("opening {payload}"))?
            .take(self.size);
        const PIECE: usize = 1 << 20;
        let (mut a, mut b) = (vec![0u8; PIECE], vec![0u8; PIECE]);
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut expected, &mut b).context(|| format!("reading {payload}"))?;
            if n == 0 {
                return Ok(());
            }
            let m = read_full(&mut written, &mut a[..n]).context(|| format!("reading {target}"))?;
            if let Some(i) = (0..m).find(|&i| a[i] != b[i]) {
                return Err(Error::new(format!(
                    "{target} differs from the payload at byte {}",
                    offset + i as u64
                )));
            }
            if m < n {
                return Err(Error::new(format!(
                    "{target} ended at {} while reading it back",
                    offset + m as u64
                )));
            }
            offset += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_zeroes_up_to_the_block_and_no_further() {
        let mut buf = vec![7u8; 3 * CHUNK_ALIGN];
        assert_eq!(pad_to_block(&mut buf, 100), CHUNK_ALIGN);
        assert!(buf[..100].iter().all(|&b| b == 7));
        assert!(buf[100..CHUNK_ALIGN].iter().all(|&b| b == 0));
        assert!(buf[CHUNK_ALIGN..].iter().all(|&b| b == 7));
        assert_eq!(pad_to_block(&mut buf, 2 * CHUNK_ALIGN), 2 * CHUNK_ALIGN);
        assert_eq!(buf[2 * CHUNK_ALIGN - 1], 7);
    }

    #[test]
    fn the_check_finds_the_first_wrong_byte_and_a_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("payload.bin");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&payload, &data).unwrap();
        let run = |variant| MethodRun {
            method: Method::RecvWrite,
            card: zc_protocol::addr::Card::new(0).unwrap(),
            variant,
        };
        assert!(target_path(dir.path(), &run(Some("sg-on"))).ends_with("recv_write.sg-on.bin"));
        let target = target_path(dir.path(), &run(None));
        assert!(target.ends_with("recv_write.bin"));
        let check = |size: u64| Check {
            target: target.clone(),
            payload: payload.clone(),
            size,
        };
        // A prefix, across the 1 MiB pieces.
        std::fs::write(&target, &data[..2_500_000]).unwrap();
        check(2_500_000).verify().unwrap();
        let err = check(2_400_000).verify().unwrap_err().to_string();
        assert!(
            err.ends_with("has 2500000 bytes after the transfer, not 2400000"),
            "{err}"
        );
        let mut wrong = data[..2_500_000].to_vec();
        wrong[(1 << 20) + 5] ^= 1;
        std::fs::write(&target, &wrong).unwrap();
        let err = check(2_500_000).verify().unwrap_err().to_string();
        assert!(
            err.ends_with(&format!(
                "differs from the payload at byte {}",
                (1 << 20) + 5
            )),
            "{err}"
        );
    }
}
