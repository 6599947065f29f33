//! Fuzzes every parser of `zc-images` that reads files the user hands in (a distro's
//! or a self-built kernel, its modules, an initramfs): the bzImage setup header, the
//! compressed kernel payload (gzip, xz, zstd, lz4 legacy) and the ELF check after
//! it, ELF sections (`.modinfo`, `PT_INTERP`), the `Linux version` banner, newc cpio
//! archives (plain or gzip), compressed module files, and the text files of
//! `/lib/modules/<release>` (`modules.dep`, `.softdep`, `.alias`, `.builtin`,
//! `.builtin.modinfo`).
//!
//! The first byte picks the parser; for the payload decoders the harness wraps the
//! rest of the input in a valid setup header (boot protocol 2.15, payload right after
//! one setup sector), so the decoders are reached without the fuzzer having to find
//! the header first (selector 0 still fuzzes the header as raw bytes).
//!
//! Checked: no panic, bounded time and memory; a payload that decompresses passes the
//! ELF check.
//!
//! Counters (`ZC_FUZZ_STATS=1`): payloads found per format, payloads decompressed,
//! ELF sections found, archive entries, modinfo read from compressed modules.

#![no_main]

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::stats::count;
use libfuzzer_sys::fuzz_target;
use zc_images::{elf, initramfs, kernel, modules, vmlinux};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    count("inputs", 1);
    match selector % 6 {
        0 => bzimage(rest),
        1 => bzimage(&with_setup_header(rest)),
        2 => elf_file(rest),
        3 => {
            if let Ok(entries) = initramfs::read_archive(rest) {
                count("archives_read", 1);
                count("archive_entries", entries.len() as u64);
                for e in &entries {
                    let _ = e.describe();
                }
            }
        }
        4 => module_lists(rest),
        _ => compressed_module(rest),
    }
});

fn bzimage(image: &[u8]) {
    let _ = kernel::bzimage_version(image);
    let Ok(payload) = vmlinux::payload(image) else {
        return;
    };
    count(payload.format.name(), 1);
    assert!(payload.offset + payload.data.len() <= image.len());
    if payload.format.supported() {
        if let Ok(elf) = payload.decompress() {
            count("payloads_decompressed", 1);
            assert!(elf::is_elf(&elf));
        }
    }
}

/// `payload` behind a minimal bzImage setup header that points at it.
fn with_setup_header(payload: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; 1024];
    image[0x1F1] = 1;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    let len = u32::try_from(payload.len()).expect("fuzz inputs are small");
    image[0x24C..0x250].copy_from_slice(&len.to_le_bytes());
    image.extend_from_slice(payload);
    image
}

fn elf_file(data: &[u8]) {
    let _ = kernel::vmlinux_version(data);
    let _ = elf::has_interp(data);
    if let Ok(Some(section)) = elf::section(data, ".modinfo") {
        count("modinfo_sections", 1);
        let _ = modules::parse_modinfo(section);
    }
}

fn module_lists(data: &[u8]) {
    let _ = modules::parse_builtin_modinfo(data);
    let text = String::from_utf8_lossy(data);
    let _ = modules::parse_modules_dep(&text, Path::new("modules.dep"));
    let _ = modules::parse_modules_softdep(&text);
    let _ = modules::parse_builtin(&text);
    for (pattern, name) in modules::parse_modules_alias(&text) {
        let _ = modules::alias_matches(&pattern, &name);
    }
    if let Some((pattern, name)) = text.split_once('\0') {
        let _ = modules::alias_matches(pattern, name);
    }
}

/// Module files are read by path (their suffix says the compression): the input goes
/// to a file in a private temporary directory.
fn compressed_module(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("zc-fuzz-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        dir
    });
    let Some((&kind, module)) = data.split_first() else {
        return;
    };
    let name = ["m.ko", "m.ko.xz", "m.ko.zst", "m.ko.gz"][usize::from(kind % 4)];
    let path = dir.join(name);
    std::fs::write(&path, module).expect("write the module file");
    if modules::read_modinfo(&path).is_ok() {
        count("modinfo_from_module_files", 1);
    }
}
