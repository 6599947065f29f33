//! Just enough of ELF64 (little-endian) to find a named section and to tell whether a
//! program asks for a dynamic loader.
//!
//! Written by hand rather than with `object` or `goblin`: zc needs two look-ups (a
//! section by name for a module's `.modinfo`, and `PT_INTERP` for the init binary), the
//! whole reader is ~100 lines with every offset bounds-checked, and it keeps the
//! dependency tree (and the build time on 2-core machines) small.

use thiserror::Error;

/// Why a byte buffer could not be read as ELF64.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    /// The buffer does not start with `\x7fELF`.
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// ELF, but not 64-bit little-endian (the only layout x86-64 kernels use).
    #[error("not a 64-bit little-endian ELF file (class {class}, data {data})")]
    Unsupported {
        /// `EI_CLASS` (2 = 64-bit).
        class: u8,
        /// `EI_DATA` (1 = little-endian).
        data: u8,
    },
    /// A header, table or section points outside the file.
    #[error("truncated or corrupt ELF file: {0} lies outside the file")]
    OutOfBounds(&'static str),
}

const EHDR_LEN: usize = 64;
const SHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
const PT_INTERP: u32 = 3;

fn bytes<'a>(data: &'a [u8], off: u64, len: u64, what: &'static str) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(off).map_err(|_| ElfError::OutOfBounds(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::OutOfBounds(what))?;
    let end = start.checked_add(len).ok_or(ElfError::OutOfBounds(what))?;
    data.get(start..end).ok_or(ElfError::OutOfBounds(what))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Whether `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

fn header(data: &[u8]) -> Result<&[u8], ElfError> {
    if !is_elf(data) {
        return Err(ElfError::NotElf);
    }
    let ehdr = bytes(data, 0, EHDR_LEN as u64, "ELF header")?;
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(ElfError::Unsupported {
            class: ehdr[4],
            data: ehdr[5],
        });
    }
    Ok(ehdr)
}

/// Returns the contents of the first section called `name`, or `None` if there is none.
pub fn section<'a>(data: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    let ehdr = header(data)?;
    let shoff = u64_at(ehdr, 0x28);
    let shentsize = u64::from(u16_at(ehdr, 0x3A));
    let mut shnum = u64::from(u16_at(ehdr, 0x3C));
    let mut shstrndx = u64::from(u16_at(ehdr, 0x3E));
    if shoff == 0 {
        return Ok(None);
    }
    if shentsize < SHDR_LEN as u64 {
        return Err(ElfError::OutOfBounds("section header entry size"));
    }
    // Extended numbering: the real counts live in section 0.
    if shnum == 0 || shstrndx == 0xffff {
        let sh0 = bytes(data, shoff, SHDR_LEN as u64, "section header 0")?;
        if shnum == 0 {
            shnum = u64_at(sh0, 0x20);
        }
        if shstrndx == 0xffff {
            shstrndx = u64::from(u32_at(sh0, 0x28));
        }
    }
    let shdr = |i: u64| -> Result<&'a [u8], ElfError> {
        let off = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or(ElfError::OutOfBounds("section header table"))?;
        bytes(data, off, SHDR_LEN as u64, "section header table")
    };
    let contents = |sh: &[u8], what: &'static str| -> Result<&'a [u8], ElfError> {
        const SHT_NOBITS: u32 = 8;
        if u32_at(sh, 4) == SHT_NOBITS {
            return Ok(&[]);
        }
        bytes(data, u64_at(sh, 0x18), u64_at(sh, 0x20), what)
    };
    if shstrndx >= shnum {
        return Err(ElfError::OutOfBounds("section name table index"));
    }
    let strtab = contents(shdr(shstrndx)?, "section name table")?;
    for i in 0..shnum {
        let sh = shdr(i)?;
        let name_off =
            usize::try_from(u32_at(sh, 0)).map_err(|_| ElfError::OutOfBounds("section name"))?;
        let rest = strtab
            .get(name_off..)
            .ok_or(ElfError::OutOfBounds("section name"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ElfError::OutOfBounds("section name"))?;
        if &rest[..end] == name.as_bytes() {
            return contents(sh, "section contents").map(Some);
        }
    }
    Ok(None)
}

/// Whether the program has a `PT_INTERP` header, i.e. needs a dynamic loader (which an
/// initramfs holding only the program does not have).
pub fn has_interp(data: &[u8]) -> Result<bool, ElfError> {
    let ehdr = header(data)?;
    let phoff = u64_at(ehdr, 0x20);
    let phentsize = u64::from(u16_at(ehdr, 0x36));
    let phnum = u64::from(u16_at(ehdr, 0x38));
    if phoff == 0 || phnum == 0 {
        return Ok(false);
    }
    if phentsize < PHDR_LEN as u64 {
        return Err(ElfError::OutOfBounds("program header entry size"));
    }
    for i in 0..phnum {
        let off = phoff
            .checked_add(i * phentsize)
            .ok_or(ElfError::OutOfBounds("program header table"))?;
        let ph = bytes(data, off, PHDR_LEN as u64, "program header table")?;
        if u32_at(ph, 0) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Builders of tiny ELF files for tests (here and in other modules' tests).
#[cfg(test)]
pub(crate) mod testutil {
    /// A relocatable ELF64 with the given sections (plus the null section and
    /// `.shstrtab`), laid out as: header, section contents, name table, header table.
    pub(crate) fn elf_with_sections(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        let mut shstrtab = vec![0u8];
        let mut headers: Vec<[u8; 64]> = vec![[0; 64]];
        let place = |out: &mut Vec<u8>, name_off: usize, body: &[u8], ty: u32| {
            let off = out.len();
            out.extend_from_slice(body);
            let mut sh = [0u8; 64];
            sh[0..4].copy_from_slice(&u32::try_from(name_off).unwrap().to_le_bytes());
            sh[4..8].copy_from_slice(&ty.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(body.len() as u64).to_le_bytes());
            sh[0x30..0x38].copy_from_slice(&1u64.to_le_bytes());
            sh
        };
        for (name, body) in sections {
            let name_off = shstrtab.len();
            shstrtab.extend_from_slice(name.as_bytes());
            shstrtab.push(0);
            headers.push(place(&mut out, name_off, body, 1));
        }
        let name_off = shstrtab.len();
        shstrtab.extend_from_slice(b".shstrtab\0");
        let strtab = shstrtab.clone();
        headers.push(place(&mut out, name_off, &strtab, 3));
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let shoff = out.len();
        for h in &headers {
            out.extend_from_slice(h);
        }
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little-endian
        out[6] = 1; // version
        out[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        out[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        out[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        out[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        let count = u16::try_from(headers.len()).unwrap();
        out[0x3C..0x3E].copy_from_slice(&count.to_le_bytes());
        out[0x3E..0x40].copy_from_slice(&(count - 1).to_le_bytes());
        out
    }

    /// An executable ELF64 header with one program header of type `p_type`.
    pub(crate) fn elf_with_phdr(p_type: u32) -> Vec<u8> {
        let mut out = vec![0u8; 64 + 56];
        out[0..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        out[0x38..0x3A].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        out[64..68].copy_from_slice(&p_type.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn finds_named_sections_and_not_others() {
        let elf = elf_with_sections(&[(".text", b"\x90\x90"), (".modinfo", b"name=x\0")]);
        assert_eq!(section(&elf, ".modinfo").unwrap(), Some(&b"name=x\0"[..]));
        assert_eq!(section(&elf, ".text").unwrap(), Some(&b"\x90\x90"[..]));
        assert_eq!(section(&elf, ".modinf").unwrap(), None);
        assert_eq!(section(&elf, ".data").unwrap(), None);
    }

    #[test]
    fn rejects_non_elf_and_32_bit() {
        assert_eq!(section(b"MZ\x90\0", ".modinfo"), Err(ElfError::NotElf));
        let mut elf = elf_with_sections(&[]);
        elf[4] = 1;
        assert_eq!(
            section(&elf, ".modinfo"),
            Err(ElfError::Unsupported { class: 1, data: 1 })
        );
    }

    #[test]
    fn truncated_files_are_errors_not_panics() {
        let elf = elf_with_sections(&[(".modinfo", b"name=x\0")]);
        for len in [3, 10, 63, 64, 70, elf.len() - 1] {
            let r = section(&elf[..len], ".modinfo");
            assert!(r.is_err(), "length {len}: {r:?}");
        }
        // A section whose offset points past the end.
        let mut bad = elf.clone();
        let shoff = usize::try_from(u64_at(&bad, 0x28)).unwrap();
        let sh1 = shoff + 64;
        bad[sh1 + 0x18..sh1 + 0x20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(section(&bad, ".modinfo").is_err());
    }

    #[test]
    fn interp_detection() {
        assert!(has_interp(&elf_with_phdr(PT_INTERP)).unwrap());
        assert!(!has_interp(&elf_with_phdr(1)).unwrap());
        assert!(has_interp(b"#!/bin/sh\n").is_err());
    }
}
