//! Extracts the ELF `vmlinux` from inside a bzImage, so a kernel shipped only as a
//! bzImage (Debian's `/boot/vmlinuz-*`) can also be booted through the VMM's ELF path.
//!
//! A bzImage is real-mode setup code followed by a small decompressor, which carries the
//! compressed `vmlinux` as its payload. Boot protocol 2.08 added `payload_offset`
//! (u32 at 0x248) and `payload_length` (u32 at 0x24C) to the setup header, both relative
//! to the start of the protected-mode code, which is at `(setup_sects + 1) * 512`
//! (`setup_sects` at 0x1F1; 0 means 4). The payload's compression is told from its magic.
//!
//! The kernel's build appends the uncompressed size as a u32 LE to every payload (for
//! gzip that is the stream's own `ISIZE`), and its decompressor relies on it; it is
//! checked against what was decompressed.
//!
//! Supported: gzip (`flate2`), lz4 legacy (Debian 6.1 cloud; `lz4_flex` blocks), zstd
//! (Debian 6.12; `ruzstd`) and xz (Debian 6.1 generic). The kernel's xz payloads use the
//! x86 BCJ filter before LZMA2, which `lzma-rs`'s xz reader does not support, so the xz
//! container and the BCJ filter are read here and only the LZMA2 data goes to `lzma-rs`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The compression of a bzImage payload, as told by its magic number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `1f 8b` (`CONFIG_KERNEL_GZIP`).
    Gzip,
    /// `BZh` (`CONFIG_KERNEL_BZIP2`): not supported.
    Bzip2,
    /// `5d 00` (`CONFIG_KERNEL_LZMA`): not supported.
    Lzma,
    /// `fd 37 7a 58 5a 00` (`CONFIG_KERNEL_XZ`).
    Xz,
    /// `89 4c 5a 4f` (`CONFIG_KERNEL_LZO`): not supported.
    Lzo,
    /// `02 21 4c 18`, the lz4 legacy format (`CONFIG_KERNEL_LZ4`).
    Lz4,
    /// `28 b5 2f fd` (`CONFIG_KERNEL_ZSTD`).
    Zstd,
}

impl PayloadFormat {
    /// Tells the format from the first bytes of a payload.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], PayloadFormat); 7] = [
            (&[0x1f, 0x8b], PayloadFormat::Gzip),
            (b"BZh", PayloadFormat::Bzip2),
            (&[0x5d, 0x00], PayloadFormat::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], PayloadFormat::Xz),
            (&[0x89, b'L', b'Z', b'O'], PayloadFormat::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], PayloadFormat::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], PayloadFormat::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, f)| f)
    }

    /// Whether [`extract_vmlinux`] can decompress this format.
    pub fn supported(self) -> bool {
        matches!(self, Self::Gzip | Self::Xz | Self::Lz4 | Self::Zstd)
    }

    /// The name used in messages (`gzip`, `lz4`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Xz => "xz",
            Self::Lzo => "lzo",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }
}

impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why no vmlinux could be extracted from a buffer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VmlinuxError {
    /// Too short, or no `HdrS` at 0x202.
    #[error("not a bzImage: no x86 boot setup header (HdrS at 0x202); pass arch/x86/boot/bzImage or a distribution's /boot/vmlinuz-*")]
    NoSetupHeader,
    /// Boot protocol older than 2.08, which has no `payload_offset`/`payload_length`.
    #[error("boot protocol {}.{:02} is older than 2.08 and does not say where the compressed kernel is; use a kernel from 2.6.26 or later", .0 >> 8, .0 & 0xff)]
    OldProtocol(u16),
    /// The payload's offset or length points outside the file.
    #[error("the setup header puts the payload at bytes {start}..{end}, outside the {file_len}-byte file; the image is truncated or corrupt, copy it again")]
    PayloadOutOfBounds {
        /// First byte of the payload, from the start of the file.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Size of the bzImage.
        file_len: usize,
    },
    /// The payload's magic is none of the kernel's compressions.
    #[error("the payload starts with {magic}, which is none of the kernel's compression formats; the image is corrupt or not an x86 bzImage")]
    UnknownFormat {
        /// The first bytes of the payload, in hex.
        magic: String,
    },
    /// A compression the kernel supports but this reader does not.
    #[error("the payload is {0}-compressed, which zc cannot decompress; rebuild the kernel with CONFIG_KERNEL_ZSTD (or GZIP, XZ, LZ4)")]
    Unsupported(PayloadFormat),
    /// The decompressor failed: the payload is corrupt or truncated.
    #[error("corrupt or truncated {format} payload: {why}; the image is damaged, copy it again")]
    Decompress {
        /// The payload's format.
        format: PayloadFormat,
        /// The decompressor's complaint.
        why: String,
    },
    /// The decompressed size differs from the size the build appended to the payload.
    #[error("the {format} payload decompressed to {got} bytes but its size trailer says {expected} (mod 2^32); the image is damaged, copy it again")]
    SizeMismatch {
        /// The payload's format.
        format: PayloadFormat,
        /// Bytes decompressed.
        got: usize,
        /// The u32 LE at the end of the payload.
        expected: u32,
    },
    /// What came out is not an x86-64 ELF64 file.
    #[error(
        "the decompressed {format} payload is not an x86-64 vmlinux: {why}; pass an x86-64 bzImage"
    )]
    NotElf {
        /// The payload's format.
        format: PayloadFormat,
        /// What is wrong with it.
        why: String,
    },
}

/// Errors of [`extract_file`], naming the file concerned.
#[derive(Debug, Error)]
pub enum ExtractError {
    /// The bzImage cannot be read.
    #[error("cannot read kernel image {path}: {cause}; check the --kernel path")]
    Read {
        /// The bzImage.
        path: PathBuf,
        /// The cause (in the message, not as `source()`, so `{:#}` does not repeat it).
        cause: std::io::Error,
    },
    /// The bzImage holds no extractable vmlinux.
    #[error("{path}: {cause}")]
    Extract {
        /// The bzImage.
        path: PathBuf,
        /// Why (in the message, not as `source()`, so `{:#}` does not repeat it).
        cause: VmlinuxError,
    },
    /// The vmlinux cannot be written.
    #[error("cannot write {path}: {cause}; check that its directory exists and is writable")]
    Write {
        /// The output file.
        path: PathBuf,
        /// The cause (in the message, not as `source()`, so `{:#}` does not repeat it).
        cause: std::io::Error,
    },
}

/// Where the compressed kernel lies in a bzImage, and how it is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload<'a> {
    /// The compressed bytes (`payload_length` of them).
    pub data: &'a [u8],
    /// Offset of `data` in the bzImage.
    pub offset: usize,
    /// Their compression.
    pub format: PayloadFormat,
}

/// What [`extract_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// Size of the bzImage.
    pub bzimage_len: usize,
    /// Size of the compressed payload.
    pub payload_len: usize,
    /// Its compression.
    pub format: PayloadFormat,
    /// Size of the vmlinux written.
    pub vmlinux_len: usize,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// `n` modulo 2^32: what a 32-bit size trailer and the BCJ filter's positions hold.
fn low32(n: usize) -> u32 {
    u32::try_from(n & 0xffff_ffff).expect("masked to 32 bits")
}

/// Finds the compressed kernel in a bzImage through the setup header (boot protocol
/// 2.08 or later) and tells its format. Fails with [`VmlinuxError::UnknownFormat`] for
/// unknown magic; a known but unsupported format is returned (see
/// [`PayloadFormat::supported`]).
pub fn payload(bzimage: &[u8]) -> Result<Payload<'_>, VmlinuxError> {
    if bzimage.len() < 0x208 || &bzimage[0x202..0x206] != b"HdrS" {
        return Err(VmlinuxError::NoSetupHeader);
    }
    let protocol = u16_at(bzimage, 0x206);
    if protocol < 0x0208 {
        return Err(VmlinuxError::OldProtocol(protocol));
    }
    if bzimage.len() < 0x250 {
        return Err(VmlinuxError::NoSetupHeader);
    }
    let setup_sects = match bzimage[0x1F1] {
        0 => 4,
        n => u64::from(n),
    };
    let start = (setup_sects + 1) * 512 + u64::from(u32_at(bzimage, 0x248));
    let end = start + u64::from(u32_at(bzimage, 0x24C));
    let out_of_bounds = VmlinuxError::PayloadOutOfBounds {
        start,
        end,
        file_len: bzimage.len(),
    };
    let (Ok(s), Ok(e)) = (usize::try_from(start), usize::try_from(end)) else {
        return Err(out_of_bounds);
    };
    let data = bzimage.get(s..e).ok_or(out_of_bounds)?;
    let format = PayloadFormat::detect(data).ok_or_else(|| VmlinuxError::UnknownFormat {
        magic: data
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" "),
    })?;
    Ok(Payload {
        data,
        offset: s,
        format,
    })
}

/// Extracts the ELF `vmlinux` from a bzImage: finds the payload (see [`payload`]),
/// decompresses it, checks its size against the size trailer the kernel's build appends
/// and checks that the result is an x86-64 ELF64 file.
pub fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    payload(bzimage)?.decompress()
}

/// Reads the bzImage `bzimage`, extracts its vmlinux and writes it to `out` (through a
/// temporary file next to it, so `out` is either complete or untouched).
pub fn extract_file(bzimage: &Path, out: &Path) -> Result<Extracted, ExtractError> {
    let image = std::fs::read(bzimage).map_err(|cause| ExtractError::Read {
        path: bzimage.to_path_buf(),
        cause,
    })?;
    let extract_err = |cause| ExtractError::Extract {
        path: bzimage.to_path_buf(),
        cause,
    };
    let p = payload(&image).map_err(extract_err)?;
    let elf = p.decompress().map_err(extract_err)?;
    let write_err = |cause| ExtractError::Write {
        path: out.to_path_buf(),
        cause,
    };
    let mut tmp_name = out.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = out.with_file_name(tmp_name);
    std::fs::write(&tmp, &elf).map_err(write_err)?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        write_err(e)
    })?;
    Ok(Extracted {
        bzimage_len: image.len(),
        payload_len: p.data.len(),
        format: p.format,
        vmlinux_len: elf.len(),
    })
}

impl Payload<'_> {
    /// Decompresses the payload and checks the result (see [`extract_vmlinux`]).
    pub fn decompress(&self) -> Result<Vec<u8>, VmlinuxError> {
        let format = self.format;
        let err = |why: String| VmlinuxError::Decompress { format, why };
        let data = self.data;
        // Bytes left after the compressed stream: 4 when the build appended the size.
        let (out, left) = match format {
            PayloadFormat::Gzip => gzip(data).map_err(err)?,
            PayloadFormat::Lz4 => lz4_legacy(data).map_err(err)?,
            PayloadFormat::Zstd => zstd(data).map_err(err)?,
            PayloadFormat::Xz => xz(data).map_err(err)?,
            other => return Err(VmlinuxError::Unsupported(other)),
        };
        if left != 0 && left != 4 {
            return Err(err(format!(
                "{left} bytes follow the compressed stream, where the kernel's build \
                 leaves nothing or a 4-byte size"
            )));
        }
        // The size is the last 4 bytes: appended after the stream, or gzip's own ISIZE.
        let trailer = left == 4 || (left == 0 && format == PayloadFormat::Gzip);
        if trailer && data.len() >= 4 {
            let expected = u32_at(data, data.len() - 4);
            // Compare modulo 2^32, as the trailer is.
            if low32(out.len()) != expected {
                return Err(VmlinuxError::SizeMismatch {
                    format,
                    got: out.len(),
                    expected,
                });
            }
        }
        check_elf(&out).map_err(|why| VmlinuxError::NotElf { format, why })?;
        Ok(out)
    }
}

fn check_elf(data: &[u8]) -> Result<(), String> {
    if !crate::elf::is_elf(data) {
        let start: Vec<String> = data.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "it starts with {} instead of the ELF magic 7f 45 4c 46",
            start.join(" ")
        ));
    }
    if data.len() < 64 {
        return Err(format!(
            "its ELF header is truncated ({} bytes)",
            data.len()
        ));
    }
    if data[4] != 2 || data[5] != 1 {
        return Err(format!(
            "it is not 64-bit little-endian ELF (class {}, data {})",
            data[4], data[5]
        ));
    }
    let machine = u16_at(data, 0x12);
    if machine != 62 {
        return Err(format!("its e_machine is {machine}, not x86-64 (62)"));
    }
    Ok(())
}

/// Decoders return the output and how many bytes follow the compressed stream.
fn gzip(data: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut rest = data;
    let mut out = Vec::new();
    flate2::bufread::GzDecoder::new(&mut rest)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok((out, rest.len()))
}

fn zstd(data: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut rest = data;
    let mut out = Vec::new();
    let mut dec = ruzstd::StreamingDecoder::new(&mut rest).map_err(|e| e.to_string())?;
    dec.read_to_end(&mut out).map_err(|e| e.to_string())?;
    // The frame's optional content checksum (the low 32 bits of XXH64), which the kernel's
    // `zstd -22` sets; ruzstd reads and computes it but leaves the comparison to us.
    let (stored, computed) = (
        dec.decoder.get_checksum_from_data(),
        dec.decoder.get_calculated_checksum(),
    );
    if let (Some(stored), Some(computed)) = (stored, computed) {
        if stored != computed {
            return Err(format!(
                "content checksum {computed:#010x} differs from the frame's {stored:#010x}"
            ));
        }
    }
    drop(dec);
    Ok((out, rest.len()))
}

/// Magic of the lz4 legacy format; it may also recur between blocks (concatenated
/// streams).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The most one legacy-format block decompresses to.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The lz4 legacy format: the magic, then blocks each prefixed by its compressed size
/// (u32 LE). The kernel's decompressor (`lib/decompress_unlz4.c`) stops when what
/// remains cannot be a block, which is the 4-byte size trailer in a kernel payload.
fn lz4_legacy(data: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut out = Vec::new();
    // Zeroed allocations are cheap (fresh pages), unlike zero-filling `out` block by block.
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 4;
    loop {
        let rest = &data[pos..];
        if rest.len() <= 4 {
            return Ok((out, rest.len()));
        }
        let size = u32_at(rest, 0);
        if size == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        let size = size as usize;
        let body = &rest[4..];
        if size == 0 || size > body.len() {
            return Err(format!(
                "the block at payload offset {pos} says it is {size} bytes but {} remain",
                body.len()
            ));
        }
        let n = lz4_flex::block::decompress_into(&body[..size], &mut block).map_err(|e| {
            format!("block at payload offset {pos} (at most 8 MiB once decompressed): {e}")
        })?;
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
}

/// Reads an LZMA/xz variable-length integer (7 bits a byte, little end first).
fn xz_varint(data: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for i in 0..9 {
        let b = *data.get(*pos).ok_or("xz header ends inside a number")?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("xz number longer than 9 bytes".into())
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

/// An xz stream: header, blocks (each filtered by an optional x86 BCJ filter and
/// LZMA2), index, footer. Returns the output and how many bytes follow the stream.
fn xz(data: &[u8]) -> Result<(Vec<u8>, usize), String> {
    const FILTER_X86: u64 = 0x04;
    const FILTER_LZMA2: u64 = 0x21;
    let header = data.get(..12).ok_or("xz stream header truncated")?;
    if header[6] != 0 || crc32(&header[6..8]) != u32_at(header, 8) {
        return Err("xz stream header is corrupt (flags or CRC32)".into());
    }
    let check = header[7] & 0x0f;
    // Check sizes per the xz format: 0, then 4, 8, 16, 32, 64 bytes by groups of three.
    let check_len = match check {
        0 => 0,
        n => 4usize << ((n - 1) / 3),
    };
    let mut out = Vec::new();
    let mut pos = 12;
    loop {
        let size_byte = *data.get(pos).ok_or("xz stream ends before its index")?;
        if size_byte == 0 {
            break; // the index
        }
        let header_len = (usize::from(size_byte) + 1) * 4;
        let bh = data
            .get(pos..pos + header_len)
            .ok_or("xz block header truncated")?;
        if crc32(&bh[..header_len - 4]) != u32_at(bh, header_len - 4) {
            return Err(format!("xz block header at offset {pos} fails its CRC32"));
        }
        let flags = bh[1];
        let mut p = 2;
        if flags & 0x40 != 0 {
            xz_varint(bh, &mut p)?; // compressed size
        }
        if flags & 0x80 != 0 {
            xz_varint(bh, &mut p)?; // uncompressed size
        }
        let mut bcj_start = None;
        let filters = usize::from(flags & 0x03) + 1;
        for i in 0..filters {
            let id = xz_varint(bh, &mut p)?;
            let props_len = usize::try_from(xz_varint(bh, &mut p)?).unwrap_or(usize::MAX);
            let props = bh
                .get(p..p.saturating_add(props_len))
                .ok_or("xz filter properties overrun the block header")?;
            p += props_len;
            let last = i + 1 == filters;
            match (id, last) {
                (FILTER_X86, false) => {
                    bcj_start = Some(match props.len() {
                        0 => 0,
                        4 => u32_at(props, 0),
                        _ => return Err("bad x86 BCJ filter properties".into()),
                    });
                }
                (FILTER_LZMA2, true) => {}
                _ => {
                    return Err(format!(
                    "xz filter {id:#x} in position {} is not supported (only x86 BCJ then LZMA2)",
                    i + 1
                ))
                }
            }
        }
        pos += header_len;
        let block_start = out.len();
        let mut rest = &data[pos..];
        lzma_rs::lzma2_decompress(&mut rest, &mut out).map_err(|e| e.to_string())?;
        pos = data.len() - rest.len();
        if let Some(start) = bcj_start {
            bcj_x86_decode(&mut out[block_start..], start);
        }
        while pos % 4 != 0 {
            if data.get(pos) != Some(&0) {
                return Err("xz block padding is not zero".into());
            }
            pos += 1;
        }
        let check_bytes = data
            .get(pos..pos + check_len)
            .ok_or("xz block check truncated")?;
        if check == 1 && crc32(&out[block_start..]) != u32_at(check_bytes, 0) {
            return Err(format!(
                "xz block ending at offset {pos} fails its CRC32 check"
            ));
        }
        pos += check_len;
    }
    // Index: indicator, record count, (unpadded, uncompressed) sizes, padding, CRC32.
    let index_start = pos;
    pos += 1;
    let records = xz_varint(data, &mut pos)?;
    for _ in 0..records {
        xz_varint(data, &mut pos)?;
        xz_varint(data, &mut pos)?;
    }
    pos = pos.next_multiple_of(4) + 4;
    // Footer: CRC32, backward size, flags, "YZ".
    let footer = data
        .get(pos..pos + 12)
        .ok_or("xz stream footer truncated")?;
    if &footer[10..12] != b"YZ" {
        return Err("xz stream footer magic missing".into());
    }
    let backward = (u64::from(u32_at(footer, 4)) + 1) * 4;
    if backward != (pos - index_start) as u64 {
        return Err("xz index size does not match the stream footer".into());
    }
    pos += 12;
    Ok((out, data.len() - pos))
}

/// Undoes the x86 BCJ filter: relative `call`/`jmp` (E8/E9) targets that the encoder
/// made absolute (to help compression) are turned back into relative ones. `start` is
/// the filter's start offset. Follows the xz format's definition of the filter (as in
/// xz-embedded's `bcj_x86`); the last 4 bytes are never converted.
fn bcj_x86_decode(buf: &mut [u8], start: u32) {
    const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
    const BIT_NUM: [u32; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
    let ms_byte = |b: u8| b == 0x00 || b == 0xFF;
    if buf.len() <= 4 {
        return;
    }
    let limit = buf.len() - 4;
    let mut prev_pos = usize::MAX; // "before the buffer": i - prev_pos wraps to i + 1
    let mut prev_mask = 0u32;
    let mut i = 0;
    while i < limit {
        if buf[i] & 0xFE != 0xE8 {
            i += 1;
            continue;
        }
        let dist = i.wrapping_sub(prev_pos);
        if dist > 3 {
            prev_mask = 0;
        } else {
            prev_mask = (prev_mask << (dist - 1)) & 7;
            if prev_mask != 0 {
                let b = buf[i + 4 - BIT_NUM[prev_mask as usize] as usize];
                if !ALLOWED[prev_mask as usize] || ms_byte(b) {
                    prev_pos = i;
                    prev_mask = (prev_mask << 1) | 1;
                    i += 1;
                    continue;
                }
            }
        }
        prev_pos = i;
        if ms_byte(buf[i + 4]) {
            let mut src = u32_at(buf, i + 1);
            let here = start.wrapping_add(low32(i)).wrapping_add(5);
            let mut dest;
            loop {
                dest = src.wrapping_sub(here);
                if prev_mask == 0 {
                    break;
                }
                let j = BIT_NUM[prev_mask as usize] * 8;
                if !ms_byte((dest >> (24 - j)).to_le_bytes()[0]) {
                    break;
                }
                src = dest ^ ((1u32 << (32 - j)) - 1);
            }
            dest &= 0x01FF_FFFF;
            dest |= 0u32.wrapping_sub(dest & 0x0100_0000);
            buf[i + 1..i + 5].copy_from_slice(&dest.to_le_bytes());
            i += 5;
        } else {
            prev_mask = (prev_mask << 1) | 1;
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;
    use std::io::Write;

    const VERSION: &str = "6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP";

    /// Deterministic code-like bytes behind an ELF64 x86-64 header: common opcodes and
    /// many E8/E9 rel32 calls/jumps (what the x86 BCJ filter rewrites). Mirrored by the
    /// script that made `testdata/bcj-x86.xz` (see `xz_with_the_x86_bcj_filter`).
    fn code_like(n: usize) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1;
        out[0x10] = 2; // ET_EXEC
        out[0x12] = 62; // EM_X86_64
        let mut x: u32 = 0x9E37_79B9;
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x.is_multiple_of(5) {
                let rel = ((x >> 8) % 8192) as i32 - 4096;
                out.push(if x & 1 == 1 { 0xE8 } else { 0xE9 });
                out.extend_from_slice(&rel.to_le_bytes());
            } else {
                out.push(b"\x48\x89\xe5\x55\xc3\x90\x0f\x1f"[(x % 8) as usize]);
            }
        }
        out.truncate(n);
        out
    }

    /// A bzImage (boot protocol 2.15, setup_sects 3) carrying `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = crate::kernel::testutil::fake_bzimage(VERSION);
        let pm_start = 4 * 512;
        let offset = 0x100;
        img.resize(pm_start + offset, 0xCC);
        img[0x248..0x24C].copy_from_slice(&u32::try_from(offset).unwrap().to_le_bytes());
        img[0x24C..0x250].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xCC; 100]); // what follows the payload in a real image
        img
    }

    fn with_size(mut stream: Vec<u8>, size: usize) -> Vec<u8> {
        stream.extend_from_slice(&u32::try_from(size).unwrap().to_le_bytes());
        stream
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// lz4 legacy framing around lz4_flex blocks of `chunk` input bytes each.
    fn lz4_legacy_stream(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for c in data.chunks(chunk) {
            let block = lz4_flex::block::compress(c);
            out.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// A zstd frame of raw (stored) blocks, without content size or checksum: ruzstd
    /// 0.7 has no encoder, and the decoder is what is under test.
    fn zstd_raw(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
        out.push(0x00); // no content size, not single segment, no checksum
        out.push(0x50); // window descriptor: 2^(10+10) = 1 MiB
        let chunks: Vec<&[u8]> = data.chunks(1000).collect();
        for (i, c) in chunks.iter().enumerate() {
            let last = u32::from(i + 1 == chunks.len());
            let header = last | (u32::try_from(c.len()).unwrap() << 3); // raw block
            out.extend_from_slice(&header.to_le_bytes()[..3]);
            out.extend_from_slice(c);
        }
        out
    }

    #[test]
    fn zstd_content_checksum_is_checked() {
        let elf = code_like(3000);
        let mut frame = zstd_raw(&elf);
        frame[4] |= 0x04; // content checksum flag
        let with_checksum = |frame: &[u8], sum: u32| {
            let mut f = frame.to_vec();
            f.extend_from_slice(&sum.to_le_bytes());
            bzimage(&with_size(f, elf.len()))
        };
        // A wrong checksum is an error that names the right one (XXH64's low 32 bits;
        // there is no hasher among the dependencies to compute it here)...
        let e = extract_vmlinux(&with_checksum(&frame, 0x1234_5678)).unwrap_err();
        let VmlinuxError::Decompress { ref why, .. } = e else {
            panic!("{e:?}")
        };
        let right = why
            .strip_prefix("content checksum 0x")
            .and_then(|r| u32::from_str_radix(&r[..8], 16).ok())
            .unwrap_or_else(|| panic!("{why}"));
        assert!(why.ends_with("frame's 0x12345678"), "{why}");
        // ...and with that one the frame decodes.
        assert_eq!(extract_vmlinux(&with_checksum(&frame, right)).unwrap(), elf);
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut out).unwrap();
        out
    }

    /// `data` compressed as the kernel's build does (with the size trailer).
    fn packed(format: PayloadFormat, data: &[u8]) -> Vec<u8> {
        match format {
            PayloadFormat::Gzip => gzip(data),
            PayloadFormat::Lz4 => with_size(lz4_legacy_stream(data, 3000), data.len()),
            PayloadFormat::Zstd => with_size(zstd_raw(data), data.len()),
            PayloadFormat::Xz => with_size(xz(data), data.len()),
            other => unreachable!("{other}"),
        }
    }

    #[rstest]
    #[case::gzip(PayloadFormat::Gzip)]
    #[case::lz4(PayloadFormat::Lz4)]
    #[case::zstd(PayloadFormat::Zstd)]
    #[case::xz(PayloadFormat::Xz)]
    fn round_trip(#[case] format: PayloadFormat) {
        let elf = code_like(10_000);
        let p = packed(format, &elf);
        let img = bzimage(&p);
        let found = payload(&img).unwrap();
        assert_eq!(found.format, format);
        assert_eq!(found.data, &p[..]);
        assert_eq!(found.offset, 4 * 512 + 0x100);
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let elf = code_like(2000);
        let mut img = bzimage(&packed(PayloadFormat::Zstd, &elf));
        // setup_sects 0 means 4, not 3: the payload is now looked for one sector later...
        img[0x1F1] = 0;
        assert!(payload(&img).is_err());
        // ...where it is once a sector is inserted before it.
        img.splice(4 * 512..4 * 512, [0u8; 512]);
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
    }

    #[test]
    fn lz4_multi_block_and_repeated_magic() {
        let elf = code_like(50_000);
        let mut stream = lz4_legacy_stream(&elf[..20_000], 7_000);
        // A second legacy stream concatenated: its magic is skipped between blocks.
        stream.extend_from_slice(&lz4_legacy_stream(&elf[20_000..], 9_000));
        let img = bzimage(&with_size(stream.clone(), elf.len()));
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
        // No trailer at all is accepted too (nothing to check it against).
        assert_eq!(extract_vmlinux(&bzimage(&stream)).unwrap(), elf);
    }

    #[test]
    fn lz4_block_over_8_mib_is_an_error() {
        let mut big = code_like(64);
        big.resize(LZ4_LEGACY_BLOCK + 1, 0x90);
        let img = bzimage(&with_size(lz4_legacy_stream(&big, big.len()), big.len()));
        let e = extract_vmlinux(&img).unwrap_err();
        assert!(
            matches!(e, VmlinuxError::Decompress { format: PayloadFormat::Lz4, ref why } if why.contains("8 MiB")),
            "{e}"
        );
    }

    #[test]
    fn xz_with_the_x86_bcj_filter() {
        // Made by: xz --format=xz --check=crc32 --x86 --lzma2=preset=6 (of code_like(6000)),
        // i.e. the filter chain of the kernel's xz payloads.
        let fixture = include_bytes!("testdata/bcj-x86.xz");
        let elf = code_like(6000);
        let img = bzimage(&with_size(fixture.to_vec(), elf.len()));
        assert_eq!(extract_vmlinux(&img).unwrap(), elf);
        assert_eq!(super::xz(fixture).unwrap(), (elf.clone(), 0));
        // The filter did rewrite calls: LZMA2 alone (after the 12-byte stream header and
        // the 12-byte block header) does not give the input back.
        let mut lzma2_only = Vec::new();
        lzma_rs::lzma2_decompress(&mut &fixture[24..], &mut lzma2_only).unwrap();
        assert_ne!(lzma2_only, elf);
        bcj_x86_decode(&mut lzma2_only, 0);
        assert_eq!(lzma2_only, elf);
        // Its CRC32 check is verified.
        let mut bad = fixture.to_vec();
        let check_at = bad.len() - 12 - 12 - 4; // footer, index (12 bytes here), check
        bad[check_at] ^= 1;
        let e = super::xz(&bad).unwrap_err();
        assert!(e.contains("CRC32"), "{e}");
    }

    #[test]
    fn bcj_never_panics() {
        let mut x: u32 = 7;
        for len in 0..200usize {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    [0xE8, 0xE9, 0x00, 0xFF, x.to_le_bytes()[0]][usize::try_from(x % 5).unwrap()]
                })
                .collect();
            bcj_x86_decode(&mut buf, x);
        }
    }

    #[rstest]
    #[case::bzip2(b"BZh91AY&SY".as_slice(), PayloadFormat::Bzip2)]
    #[case::lzma(b"\x5d\x00\x00\x80\x00\xff\xff".as_slice(), PayloadFormat::Lzma)]
    #[case::lzo(b"\x89LZO\x00\r\n\x1a\n".as_slice(), PayloadFormat::Lzo)]
    fn unsupported_formats_are_named(#[case] magic: &[u8], #[case] format: PayloadFormat) {
        let img = bzimage(&with_size(magic.to_vec(), 1000));
        assert_eq!(payload(&img).unwrap().format, format);
        assert!(!format.supported());
        let e = extract_vmlinux(&img).unwrap_err();
        assert_eq!(e, VmlinuxError::Unsupported(format));
        assert!(e.to_string().contains(format.name()), "{e}");
    }

    #[test]
    fn unknown_magic() {
        let img = bzimage(b"\x12\x34\x56\x78\x9a\xbc\xde");
        let e = extract_vmlinux(&img).unwrap_err();
        assert_eq!(
            e,
            VmlinuxError::UnknownFormat {
                magic: "12 34 56 78 9a bc".into()
            }
        );
        assert!(matches!(
            extract_vmlinux(&bzimage(b"")),
            Err(VmlinuxError::UnknownFormat { .. })
        ));
    }

    #[test]
    fn setup_header_errors() {
        let img = bzimage(&packed(PayloadFormat::Gzip, &code_like(500)));
        let mut no_magic = img.clone();
        no_magic[0x203] = b'x';
        assert_eq!(extract_vmlinux(&no_magic), Err(VmlinuxError::NoSetupHeader));
        assert_eq!(
            extract_vmlinux(&img[..0x100]),
            Err(VmlinuxError::NoSetupHeader)
        );
        assert_eq!(
            extract_vmlinux(&img[..0x240]),
            Err(VmlinuxError::NoSetupHeader)
        );
        assert_eq!(
            extract_vmlinux(b"\x7fELF"),
            Err(VmlinuxError::NoSetupHeader)
        );
        let mut old = img.clone();
        old[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
        let e = extract_vmlinux(&old).unwrap_err();
        assert_eq!(e, VmlinuxError::OldProtocol(0x0207));
        assert!(e.to_string().contains("2.07"), "{e}");
    }

    #[test]
    fn payload_outside_the_file_is_an_error_not_a_panic() {
        let img = bzimage(&packed(PayloadFormat::Lz4, &code_like(500)));
        let set = |at: usize, v: u32| {
            let mut i = img.clone();
            i[at..at + 4].copy_from_slice(&v.to_le_bytes());
            i
        };
        let len = u32_at(&img, 0x24C);
        for bad in [
            set(0x248, u32::MAX),
            set(0x24C, u32::MAX),
            set(0x24C, len + 101), // one byte past the end of the file
            set(0x248, u32::try_from(img.len()).unwrap()),
        ] {
            let e = extract_vmlinux(&bad).unwrap_err();
            assert!(
                matches!(e, VmlinuxError::PayloadOutOfBounds { .. }),
                "{e:?}"
            );
        }
        let mut sects = img.clone();
        sects[0x1F1] = 0xFF;
        assert!(matches!(
            extract_vmlinux(&sects),
            Err(VmlinuxError::PayloadOutOfBounds { .. })
        ));
        // A file cut inside the payload.
        assert!(matches!(
            extract_vmlinux(&img[..img.len() - 200]),
            Err(VmlinuxError::PayloadOutOfBounds { .. })
        ));
    }

    #[rstest]
    #[case::gzip(PayloadFormat::Gzip)]
    #[case::lz4(PayloadFormat::Lz4)]
    #[case::zstd(PayloadFormat::Zstd)]
    #[case::xz(PayloadFormat::Xz)]
    fn truncated_payloads_are_errors(#[case] format: PayloadFormat) {
        let elf = code_like(20_000);
        let p = packed(format, &elf);
        // Cut half-way: the decompressor runs out of input.
        let e = extract_vmlinux(&bzimage(&p[..p.len() / 2])).unwrap_err();
        assert!(
            matches!(e, VmlinuxError::Decompress { format: f, .. } if f == format),
            "{e:?}"
        );
        // Any cut is an error, never a panic or a short vmlinux; except cutting exactly
        // the appended size, which leaves a complete stream without a trailer.
        for cut in (1..p.len()).step_by(97).chain(p.len() - 8..p.len()) {
            if cut == p.len() - 4 && format != PayloadFormat::Gzip {
                assert_eq!(extract_vmlinux(&bzimage(&p[..cut])).unwrap(), elf);
                continue;
            }
            let r = extract_vmlinux(&bzimage(&p[..cut]));
            assert!(r.is_err(), "{format} cut at {cut} of {}", p.len());
        }
    }

    #[rstest]
    #[case::lz4(PayloadFormat::Lz4)]
    #[case::zstd(PayloadFormat::Zstd)]
    #[case::xz(PayloadFormat::Xz)]
    #[case::gzip(PayloadFormat::Gzip)]
    fn size_trailer_mismatch(#[case] format: PayloadFormat) {
        let elf = code_like(5000);
        let mut p = packed(format, &elf);
        let end = p.len();
        p[end - 4..].copy_from_slice(&4999u32.to_le_bytes());
        let e = extract_vmlinux(&bzimage(&p)).unwrap_err();
        if format == PayloadFormat::Gzip {
            // gzip checks its own ISIZE; an appended size is checked like the others.
            assert!(matches!(e, VmlinuxError::Decompress { .. }), "{e:?}");
            let p = with_size(gzip(&elf), 4999);
            let e = extract_vmlinux(&bzimage(&p)).unwrap_err();
            assert!(matches!(e, VmlinuxError::SizeMismatch { .. }), "{e:?}");
        } else {
            assert_eq!(
                e,
                VmlinuxError::SizeMismatch {
                    format,
                    got: 5000,
                    expected: 4999
                }
            );
            assert!(e.to_string().contains("4999"), "{e}");
        }
    }

    #[rstest]
    #[case::text(b"this is no ELF file, just text".to_vec(), "ELF magic")]
    #[case::short(b"\x7fELF\x02\x01".to_vec(), "truncated")]
    #[case::elf32({ let mut e = code_like(200); e[4] = 1; e }, "64-bit")]
    #[case::big_endian({ let mut e = code_like(200); e[5] = 2; e }, "little-endian")]
    #[case::aarch64({ let mut e = code_like(200); e[0x12] = 183; e }, "183")]
    fn non_elf_output_is_rejected(#[case] data: Vec<u8>, #[case] why: &str) {
        for format in [PayloadFormat::Lz4, PayloadFormat::Zstd, PayloadFormat::Gzip] {
            let e = extract_vmlinux(&bzimage(&packed(format, &data))).unwrap_err();
            assert!(
                matches!(e, VmlinuxError::NotElf { format: f, .. } if f == format),
                "{e:?}"
            );
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[rstest]
    #[case::lz4(PayloadFormat::Lz4)]
    #[case::zstd(PayloadFormat::Zstd)]
    #[case::xz(PayloadFormat::Xz)]
    #[case::gzip(PayloadFormat::Gzip)]
    fn corrupt_payloads_never_panic(#[case] format: PayloadFormat) {
        let elf = code_like(4000);
        let p = packed(format, &elf);
        let mut x: u32 = 12345;
        for _ in 0..300 {
            let mut bad = p.clone();
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = 4 + (x as usize) % (bad.len() - 4); // keep the magic
                bad[at] = (x >> 24) as u8;
            }
            let _ = extract_vmlinux(&bzimage(&bad));
        }
    }

    #[test]
    fn extract_file_writes_and_names_paths() {
        let dir = tempfile::tempdir().unwrap();
        let elf = code_like(3000);
        let src = dir.path().join("vmlinuz");
        std::fs::write(&src, bzimage(&packed(PayloadFormat::Lz4, &elf))).unwrap();
        let out = dir.path().join("vmlinux");
        let x = extract_file(&src, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), elf);
        assert_eq!(x.format, PayloadFormat::Lz4);
        assert_eq!(x.vmlinux_len, elf.len());
        assert_eq!(
            x.bzimage_len,
            usize::try_from(std::fs::metadata(&src).unwrap().len()).unwrap()
        );
        assert!(!dir.path().join("vmlinux.tmp").exists());

        let missing = dir.path().join("nope");
        let e = extract_file(&missing, &out).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("--kernel"), "{e}");
        let text = dir.path().join("text");
        std::fs::write(&text, b"hello").unwrap();
        let e = extract_file(&text, &out).unwrap_err().to_string();
        assert!(e.contains("text") && e.contains("bzImage"), "{e}");
        let e = extract_file(&src, &dir.path().join("no/such/dir/vmlinux"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such/dir/vmlinux"), "{e}");
    }
}
