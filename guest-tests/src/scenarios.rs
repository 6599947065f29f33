//! The `zc.test=` steps that move data: `disk-roundtrip`, `disk-read`, `send:<file>`
//! and `scratch-copy:<file>`.
//!
//! Each returns a [`Outcome`]: whether it passed, and its `report` JSON. Errors that
//! stop a step half-way (a refused connection, an I/O error) become a failed outcome
//! with an `error` member, so the VMM always gets one report per step.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::disk::{self, MOUNT_POINT};
use crate::error::{Context, Error, Result};
use crate::pattern;
use zc_protocol::json::Object;
use zc_protocol::marker::SEND_SPAN;
use zc_protocol::{ack, Marker};

/// Size of the `disk-roundtrip` file: large enough to span many blk requests and
/// to not fit any single merged request.
pub const ROUNDTRIP_BYTES: u64 = ROUNDTRIP_LEN as u64;
/// [`ROUNDTRIP_BYTES`] as a buffer length.
const ROUNDTRIP_LEN: usize = 8 << 20;
/// The `disk-roundtrip` file, removed again afterwards (so repeated runs on the
/// same image leave its used space unchanged).
pub const ROUNDTRIP_FILE: &str = "/mnt/roundtrip.bin";
/// Chunk size of `disk-roundtrip`'s writes and reads.
const ROUNDTRIP_CHUNK: usize = 1 << 20;
/// Chunk size of `send`'s read+write loop.
pub const SEND_CHUNK: usize = 64 << 10;
/// Bound on connecting to the peer (ARP + SYN).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on any one send or ACK wait, so a dead peer fails the step instead of
/// hanging the run until the VMM's timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// True when the step passed.
    pub ok: bool,
    /// The JSON for the `report` line.
    pub report: String,
}

impl Outcome {
    /// A failed step that did not get far enough to measure anything.
    pub fn failed(test: &str, file: Option<&str>, err: &Error) -> Outcome {
        let mut json = Object::new().str("test", test);
        if let Some(file) = file {
            json = json.str("file", file);
        }
        Outcome {
            ok: false,
            report: json
                .bool("ok", false)
                .str("error", &err.to_string())
                .finish(),
        }
    }
}

/// What `disk-roundtrip` measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roundtrip {
    /// Bytes written and read back.
    pub bytes: u64,
    /// The first offset that read back wrong, if any.
    pub mismatch_at: Option<u64>,
    /// Time of the writes plus fsync.
    pub write_s: f64,
    /// Time of the reads (after dropping caches).
    pub read_s: f64,
}

impl Roundtrip {
    /// Its outcome and report: `{"test":"disk-roundtrip","bytes":N,"ok":B,
    /// "write_s":S,"read_s":S}` (+ `"mismatch_at":N` when not ok).
    pub fn outcome(&self) -> Outcome {
        let mut json = Object::new()
            .str("test", "disk-roundtrip")
            .u64("bytes", self.bytes)
            .bool("ok", self.mismatch_at.is_none())
            .f64("write_s", self.write_s, 6)
            .f64("read_s", self.read_s, 6);
        if let Some(at) = self.mismatch_at {
            json = json.u64("mismatch_at", at);
        }
        Outcome {
            ok: self.mismatch_at.is_none(),
            report: json.finish(),
        }
    }
}

/// `disk-roundtrip`: writes [`ROUNDTRIP_BYTES`] of the pattern to
/// [`ROUNDTRIP_FILE`], fsyncs, syncs, drops caches, reads it back and compares.
pub fn disk_roundtrip() -> Result<Roundtrip> {
    let path = ROUNDTRIP_FILE;
    let mut buf = vec![0u8; ROUNDTRIP_CHUNK];

    let start = Instant::now();
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(path)
        .context(|| format!("creating {path} (is the disk mounted read-only, zc.disk=ro?)"))?;
    let mut offset = 0u64;
    while offset < ROUNDTRIP_BYTES {
        let n =
            usize::try_from(ROUNDTRIP_BYTES - offset).map_or(buf.len(), |left| left.min(buf.len()));
        pattern::fill(offset, &mut buf[..n]);
        file.write_all(&buf[..n])
            .context(|| format!("writing {path} at {offset}"))?;
        offset += n as u64;
    }
    file.sync_all().context(|| format!("fsync {path}"))?;
    drop(file);
    let write_s = start.elapsed().as_secs_f64();
    disk::drop_caches()?;

    // Read everything first and compare afterwards, so read_s is I/O time only.
    let mut data = vec![0u8; ROUNDTRIP_LEN];
    let start = Instant::now();
    let mut file = File::open(path).context(|| format!("opening {path}"))?;
    let got = read_full(&mut file, &mut data).context(|| format!("reading {path}"))?;
    let read_s = start.elapsed().as_secs_f64();
    let extra = file
        .read(&mut buf[..1])
        .context(|| format!("reading {path}"))?;
    drop(file);

    let mismatch_at = if got < data.len() {
        // Short file: compare what there is; the first missing byte is a mismatch.
        pattern::first_mismatch(0, &data[..got]).or(Some(got as u64))
    } else if extra != 0 {
        Some(ROUNDTRIP_BYTES)
    } else {
        pattern::first_mismatch(0, &data)
    };
    std::fs::remove_file(path).context(|| format!("removing {path}"))?;
    crate::sys::sync();
    Ok(Roundtrip {
        bytes: ROUNDTRIP_BYTES,
        mismatch_at,
        write_s,
        read_s,
    })
}

/// `scratch-copy:<file>`: copies `/mnt/<file>` to the scratch disk's root with
/// read+write in [`ROUNDTRIP_CHUNK`]s and fsyncs the copy (a virtio-blk FLUSH), so
/// the host finds every byte in the image after the run. The guest checks nothing
/// itself: the host's read-back of the image is the check.
pub fn scratch_copy(file: &str) -> Result<Outcome> {
    let from = format!("{MOUNT_POINT}/{file}");
    let to = format!("{}/{file}", disk::SCRATCH_MOUNT_POINT);
    let mut source = File::open(&from).context(|| format!("opening {from}"))?;
    let mut copy = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&to)
        .context(|| format!("creating {to}"))?;
    let start = Instant::now();
    let mut buf = vec![0u8; ROUNDTRIP_CHUNK];
    let mut bytes = 0u64;
    loop {
        let n =
            read_full(&mut source, &mut buf).context(|| format!("reading {from} at {bytes}"))?;
        if n == 0 {
            break;
        }
        copy.write_all(&buf[..n])
            .context(|| format!("writing {to} at {bytes}"))?;
        bytes += n as u64;
    }
    copy.sync_all().context(|| format!("fsync {to}"))?;
    Ok(Outcome {
        ok: true,
        report: Object::new()
            .str("test", "scratch-copy")
            .str("file", file)
            .u64("bytes", bytes)
            .bool("ok", true)
            .f64("seconds", start.elapsed().as_secs_f64(), 6)
            .finish(),
    })
}

/// The disk device `disk-read` reads.
pub const DISK_DEVICE: &str = "/dev/vda";
/// Request size of `disk-read`.
const DISK_READ_CHUNK: usize = 1 << 20;
/// O_DIRECT wants buffers aligned to the logical block size; a page covers any.
const DIRECT_ALIGN: usize = 4096;

/// `disk-read`: reads [`DISK_DEVICE`] from start to end with O_DIRECT in 1 MiB
/// requests, so every byte is a device DMA into this buffer and no page cache is
/// involved: the disk's raw throughput as the guest sees it.
pub fn disk_read() -> Result<Outcome> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(DISK_DEVICE)
        .context(|| format!("opening {DISK_DEVICE} with O_DIRECT"))?;
    // Over-allocate and start at an aligned offset: Vec gives no alignment promise.
    let mut backing = vec![0u8; DISK_READ_CHUNK + DIRECT_ALIGN];
    let skip = backing.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut backing[skip..skip + DISK_READ_CHUNK];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut reads = 0u64;
    loop {
        let n = file
            .read(buf)
            .context(|| format!("reading {DISK_DEVICE} at {bytes}"))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        reads += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ok = bytes > 0;
    Ok(Outcome {
        ok,
        report: Object::new()
            .str("test", "disk-read")
            .u64("bytes", bytes)
            .bool("ok", ok)
            .u64("read_calls", reads)
            .f64("seconds", seconds, 6)
            .f64("mbps", bytes as f64 * 8.0 / seconds.max(1e-9) / 1e6, 1)
            .finish(),
    })
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub(crate) fn read_full(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// What a `send` step measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Send {
    /// The file, relative to `/mnt`.
    pub file: String,
    /// Its size, and what was sent.
    pub bytes: u64,
    /// The peer's byte count (its 8-byte ACK).
    pub ack: u64,
    /// Connect to ACK, in seconds.
    pub seconds: f64,
    /// `read` calls on the file, `write` calls on the socket.
    pub read_calls: u64,
    /// See `read_calls`.
    pub write_calls: u64,
}

impl Send {
    /// Megabits per second (10^6 bits), connect to ACK.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / 1e6 / self.seconds
    }

    /// Its outcome and report: `{"test":"send","file":F,"bytes":N,"ack":N,"ok":B,
    /// "seconds":S,"mbps":M,"read_calls":N,"write_calls":N}`; ok when the ACK equals
    /// the size.
    pub fn outcome(&self) -> Outcome {
        let ok = self.ack == self.bytes;
        let mut json = Object::new()
            .str("test", "send")
            .str("file", &self.file)
            .u64("bytes", self.bytes)
            .u64("ack", self.ack)
            .bool("ok", ok)
            .f64("seconds", self.seconds, 6)
            .f64("mbps", self.mbps(), 1)
            .u64("read_calls", self.read_calls)
            .u64("write_calls", self.write_calls);
        if !ok {
            json = json.str(
                "error",
                &format!("the peer acknowledged {} of {} bytes", self.ack, self.bytes),
            );
        }
        Outcome {
            ok,
            report: json.finish(),
        }
    }
}

/// `send:<file>`: drops caches, opens `/mnt/<file>`, marks `BEGIN send`, connects
/// to `peer`, sends the file with read+write in [`SEND_CHUNK`] chunks, reads the
/// peer's 8-byte little-endian byte count, marks `END send`.
///
/// `mark` sends a control-channel mark. `END send` is marked even when the transfer
/// fails after `BEGIN`, so the device log's spans stay paired.
pub fn send(
    file: &str,
    peer: SocketAddrV4,
    mark: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Send> {
    disk::drop_caches()?;
    let path = format!("{MOUNT_POINT}/{file}");
    // Opened before BEGIN: after dropping caches, the lookup reads directory and
    // inode blocks, which are not part of the transfer.
    let mut source = File::open(&path).context(|| format!("opening {path}"))?;
    let size = source.metadata().context(|| format!("stat {path}"))?.len();
    mark(&Marker::begin(SEND_SPAN).label())?;
    let result = transfer(&mut source, &path, size, peer);
    let end = mark(&Marker::end(SEND_SPAN).label());
    let (seconds, sent, ack, read_calls, write_calls) = result?;
    end?;
    if sent != size {
        return Err(Error::new(format!(
            "{path}: read {sent} bytes but its size is {size} (file changed while sending?)"
        )));
    }
    Ok(Send {
        file: file.to_string(),
        bytes: size,
        ack,
        seconds,
        read_calls,
        write_calls,
    })
}

/// Connect, copy, wait for the ACK: (seconds, bytes sent, ack, reads, writes).
fn transfer(
    source: &mut File,
    path: &str,
    size: u64,
    peer: SocketAddrV4,
) -> Result<(f64, u64, u64, u64, u64)> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(peer), CONNECT_TIMEOUT)
        .context(|| format!("connecting to the peer {peer}"))?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_read_timeout(Some(IO_TIMEOUT)))
        .context(|| "setting socket timeouts".to_string())?;
    let mut buf = vec![0u8; SEND_CHUNK];
    let (mut sent, mut reads, mut writes) = (0u64, 0u64, 0u64);
    loop {
        let n = loop {
            reads += 1;
            match source.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.context(|| format!("reading {path} at {sent}"))?,
            }
        };
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            writes += 1;
            match stream.write(chunk) {
                Ok(0) => {
                    return Err(Error::new(format!(
                        "sending to {peer}: connection closed after {sent} of {size} bytes"
                    )))
                }
                Ok(w) => {
                    chunk = &chunk[w..];
                    sent += w as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::new(format!(
                        "sending to {peer} after {sent} of {size} bytes: {e}"
                    )))
                }
            }
        }
    }
    let mut ack = [0u8; ack::ACK_LEN];
    read_full(&mut stream, &mut ack)
        .and_then(|got| {
            if got == ack.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {got} of the ACK's {} bytes",
                        ack::ACK_LEN
                    ),
                ))
            }
        })
        .context(|| format!("waiting for the peer's ACK after sending {sent} bytes"))?;
    Ok((
        start.elapsed().as_secs_f64(),
        sent,
        ack::decode(ack),
        reads,
        writes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener};

    #[test]
    fn roundtrip_reports() {
        let ok = Roundtrip {
            bytes: 8 << 20,
            mismatch_at: None,
            write_s: 0.5,
            read_s: 0.25,
        }
        .outcome();
        assert!(ok.ok);
        assert_eq!(
            ok.report,
            r#"{"test":"disk-roundtrip","bytes":8388608,"ok":true,"write_s":0.500000,"read_s":0.250000}"#
        );
        let bad = Roundtrip {
            mismatch_at: Some(4096),
            ..Roundtrip {
                bytes: 1,
                mismatch_at: None,
                write_s: 0.0,
                read_s: 0.0,
            }
        }
        .outcome();
        assert!(!bad.ok);
        assert!(
            bad.report.ends_with(r#""mismatch_at":4096}"#),
            "{}",
            bad.report
        );
    }

    #[test]
    fn send_reports() {
        let s = Send {
            file: "payload.bin".into(),
            bytes: 16 << 20,
            ack: 16 << 20,
            seconds: 2.0,
            read_calls: 257,
            write_calls: 256,
        };
        let o = s.outcome();
        assert!(o.ok);
        assert_eq!(
            o.report,
            r#"{"test":"send","file":"payload.bin","bytes":16777216,"ack":16777216,"ok":true,"seconds":2.000000,"mbps":67.1,"read_calls":257,"write_calls":256}"#
        );
        let short = Send { ack: 5, ..s }.outcome();
        assert!(!short.ok);
        assert!(short
            .report
            .contains(r#""error":"the peer acknowledged 5 of 16777216 bytes""#));
        let failed = Outcome::failed("send", Some("x\"y"), &Error::new("connecting: refused"));
        assert_eq!(
            failed.report,
            r#"{"test":"send","file":"x\"y","ok":false,"error":"connecting: refused"}"#
        );
    }

    /// The transfer loop against a local peer that behaves like the VMM's.
    #[test]
    fn transfer_to_a_local_peer() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
            unreachable!()
        };
        let size = 300_000u64;
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = vec![0u8; usize::try_from(size).unwrap()];
            conn.read_exact(&mut got).unwrap();
            conn.write_all(&size.to_le_bytes()).unwrap();
            got
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut data = vec![0u8; usize::try_from(size).unwrap()];
        pattern::fill(0, &mut data);
        std::fs::write(&path, &data).unwrap();
        let mut f = File::open(&path).unwrap();
        let (_, sent, ack, reads, writes) =
            transfer(&mut f, path.to_str().unwrap(), size, addr).unwrap();
        assert_eq!((sent, ack), (size, size));
        assert_eq!(reads, size.div_ceil(SEND_CHUNK as u64) + 1);
        assert!(writes >= reads - 1);
        assert_eq!(peer.join().unwrap(), data);
    }

    #[test]
    fn refused_connection_is_an_error() {
        // Bind then drop: the port is (very likely) closed right after.
        let addr = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            match l.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                _ => unreachable!(),
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, b"abc").unwrap();
        let mut f = File::open(&path).unwrap();
        let err = transfer(&mut f, "f.bin", 3, addr).unwrap_err();
        assert!(
            err.to_string().starts_with("connecting to the peer"),
            "{err}"
        );
    }
}
