//! `tcp_zerocopy_receive`: `getsockopt(TCP_ZEROCOPY_RECEIVE)` maps what it can of
//! each chunk into a PROT_READ area `mmap`ed on the socket; the rest is `recv`ed
//! into a page-aligned buffer; one O_DIRECT write takes both to the file.
//!
//! The kernel can only map whole pages of payload that sit page-aligned in the
//! socket buffer's fragments (a NIC that splits headers from payload); anything
//! else it leaves to `recv` (its `recv_skip_hint`). Mapped bytes reach the disk
//! with no CPU copy: virtio-blk reads the very pages virtio-net filled. On
//! virtio-net, where headers and payload share a receive buffer, expect nothing
//! mapped: that is a finding of the report (`zerocopy_receive.mapped` = 0), not a
//! failure.
//!
//! Per chunk: one `getsockopt`, a `recv` of what was not mapped, one `pwrite`
//! (`pwritev` when both parts are present). The `getsockopt` does not wait: it
//! maps what has arrived, and the `recv` waits for the rest.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::receive::{finish, pad_to_block, recv_exactly, short_stream, write_direct};
use super::runner::{Done, Transfer};
use super::syscalls::{Mapping, Syscalls};
use super::CHUNK_ALIGN;
use crate::error::{Context, Error, Result};
use zc_protocol::ZeroCopyReceive;

/// `struct tcp_zerocopy_receive` of `include/uapi/linux/tcp.h` (Linux 5.11+: 64
/// bytes). Written here because the libc crate has `TCP_ZEROCOPY_RECEIVE` but not
/// the struct. A kernel with a shorter struct takes this one as long as the
/// fields it does not know are zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpZerocopyReceive {
    /// In: the page-aligned address of the area mmapped on the socket.
    pub address: u64,
    /// In: bytes to map; out: bytes mapped (whole pages).
    pub length: u32,
    /// Out: bytes to read with `recv` before anything more can be mapped.
    pub recv_skip_hint: u32,
    /// Out: bytes in the receive queue.
    pub inq: u32,
    /// Out: the socket's pending error, negated (0: none).
    pub err: i32,
    /// In: a buffer for small reads (0: none).
    pub copybuf_address: u64,
    /// In/out: its length / bytes copied into it.
    pub copybuf_len: i32,
    /// In: `TCP_RECEIVE_ZEROCOPY_FLAG_*`.
    pub flags: u32,
    /// In: ancillary data buffer (0: none).
    pub msg_control: u64,
    /// In/out: its length.
    pub msg_controllen: u64,
    /// Out: message flags.
    pub msg_flags: u32,
    /// Must be 0.
    pub reserved: u32,
}

// The kernel's layout: 64 bytes, no padding.
const _: () = assert!(std::mem::size_of::<TcpZerocopyReceive>() == 64);

/// Whether the kernel can run the method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// `mmap` on a TCP socket and `TCP_ZEROCOPY_RECEIVE` both work.
    Present,
    /// Missing; the reason says what.
    Missing(String),
}

/// Asks the kernel, before `BEGIN`, on a throw-away unconnected socket: `mmap` of
/// one page on it, then `TCP_ZEROCOPY_RECEIVE` of nothing (which answers 0 with
/// an empty queue). The calls are not counted.
pub fn probe() -> Result<Support> {
    let mut sys = Syscalls::new();
    let sock = sys
        .tcp_socket()
        .context(|| "socket (TCP_ZEROCOPY_RECEIVE probe)".to_string())?;
    let fd = sock.as_raw_fd();
    let area = match sys.mmap_file(fd, CHUNK_ALIGN, libc::PROT_READ, libc::MAP_SHARED) {
        Ok(area) => area,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
            return Ok(Support::Missing(
                "the kernel cannot mmap a TCP socket (mmap: ENODEV; TCP_ZEROCOPY_RECEIVE needs Linux 4.18)"
                    .to_string(),
            ))
        }
        Err(e) => return Err(Error::new(format!("mmap on a TCP socket (probe): {e}"))),
    };
    let mut zc = TcpZerocopyReceive {
        address: area.address(),
        ..TcpZerocopyReceive::default()
    };
    match sys.getsockopt_inout(fd, libc::IPPROTO_TCP, libc::TCP_ZEROCOPY_RECEIVE, &mut zc) {
        Ok(_) => Ok(Support::Present),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(Support::Missing(
            "kernel has no TCP_ZEROCOPY_RECEIVE (getsockopt: ENOPROTOOPT; needs Linux 4.18)"
                .to_string(),
        )),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Support::Missing(
            "kernel refuses TCP_ZEROCOPY_RECEIVE with the 64-byte struct of Linux 5.11+ (getsockopt: EINVAL)"
                .to_string(),
        )),
        Err(e) => Err(Error::new(format!(
            "getsockopt(TCP_ZEROCOPY_RECEIVE) (probe): {e}"
        ))),
    }
}

/// Receives the payload with `TCP_ZEROCOPY_RECEIVE`, `recv` of the rest and one
/// O_DIRECT write per chunk, then syncs the file and sends the count; the area is
/// kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let fd = t.file.as_raw_fd();
    let chunk = t.chunk;
    let area = t
        .sys
        .mmap_file(t.sock, chunk, libc::PROT_READ, libc::MAP_SHARED)
        .context(|| format!("mmap of {chunk} bytes on the socket (PROT_READ, MAP_SHARED)"))?;
    let mut counts = ZeroCopyReceive::default();
    t.for_each_chunk(|t, c| {
        let size = t.size;
        let whole_pages = c.len / CHUNK_ALIGN * CHUNK_ALIGN;
        let mapped = if whole_pages > 0 {
            map_received(&mut t.sys, t.sock, &area, whole_pages, c.offset, size)?
        } else {
            0
        };
        let rest = c.len - mapped;
        let buf = t.buf.as_mut_slice();
        let buffered = if rest > 0 {
            recv_exactly(
                &mut t.sys,
                t.sock,
                &mut buf[..rest],
                c.offset + mapped as u64,
                size,
            )?;
            pad_to_block(buf, rest)
        } else {
            0
        };
        let parts = [area.slice(0, mapped), &t.buf.as_slice()[..buffered]];
        let parts = match (mapped, buffered) {
            (0, _) => &parts[1..],
            (_, 0) => &parts[..1],
            _ => &parts[..],
        };
        write_direct(&mut t.sys, fd, parts, c.offset)?;
        counts.mapped += mapped as u64;
        counts.received += rest as u64;
        Ok(())
    })?;
    finish(t)?;
    Ok(Done {
        keep: vec![Box::new(area)],
        zerocopy_receive: Some(counts),
        ..Done::plain()
    })
}

/// One `TCP_ZEROCOPY_RECEIVE` of up to `want` bytes (whole pages) at the start of
/// `area`; returns the bytes mapped, which are the stream's next bytes, from
/// stream offset `offset` (for messages, with the transfer's `size`).
fn map_received(
    sys: &mut Syscalls,
    sock: RawFd,
    area: &Mapping,
    want: usize,
    offset: u64,
    size: u64,
) -> Result<usize> {
    let mut zc = TcpZerocopyReceive {
        address: area.address(),
        length: u32::try_from(want)
            .map_err(|_| Error::new(format!("chunk {want}: too large to map at once")))?,
        ..TcpZerocopyReceive::default()
    };
    match sys.getsockopt_inout(sock, libc::IPPROTO_TCP, libc::TCP_ZEROCOPY_RECEIVE, &mut zc) {
        Ok(_) => {}
        // Nothing queued and the peer's FIN in: the stream ended early.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => return Err(short_stream(offset, size)),
        Err(e) => {
            return Err(Error::new(format!(
                "getsockopt(TCP_ZEROCOPY_RECEIVE) at {offset} of {size} bytes: {e}"
            )))
        }
    }
    if zc.err != 0 {
        return Err(Error::new(format!(
            "TCP_ZEROCOPY_RECEIVE at {offset} of {size} bytes: socket error: {}",
            io::Error::from_raw_os_error(zc.err.wrapping_abs())
        )));
    }
    let mapped = zc.length as usize;
    if mapped > want || !mapped.is_multiple_of(CHUNK_ALIGN) {
        return Err(Error::new(format!(
            "TCP_ZEROCOPY_RECEIVE mapped {mapped} bytes for {want} asked (not whole pages within the request)"
        )));
    }
    Ok(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_has_the_kernels_offsets() {
        use std::mem::offset_of;
        type Z = TcpZerocopyReceive;
        let offsets = [
            offset_of!(Z, address),
            offset_of!(Z, length),
            offset_of!(Z, recv_skip_hint),
            offset_of!(Z, inq),
            offset_of!(Z, err),
            offset_of!(Z, copybuf_address),
            offset_of!(Z, copybuf_len),
            offset_of!(Z, flags),
            offset_of!(Z, msg_control),
            offset_of!(Z, msg_controllen),
            offset_of!(Z, msg_flags),
            offset_of!(Z, reserved),
        ];
        assert_eq!(offsets, [0, 8, 12, 16, 20, 24, 32, 36, 40, 48, 56, 60]);
    }

    #[test]
    fn this_kernel_is_probed_without_error() {
        // Whatever the host kernel has, the probe answers instead of failing.
        match probe().unwrap() {
            Support::Present => {}
            Support::Missing(reason) => println!("host kernel: {reason}"),
        }
    }
}
