//! Extracts the ELF vmlinux from the real Debian kernels unpacked in `images/cache` (by
//! `zc-image kernel --flavour cloud|generic` or `zc-image build`): lz4 (6.1 cloud), zstd
//! (6.12 cloud) and xz with the x86 BCJ filter (6.1 generic). Ignored by default like
//! `real_kernels.rs`, for the same reason; run with `cargo test -p zc-images -- --ignored`
//! (about 7 s in a debug build, 1.5 s with `--release`). With no
//! cache it prints a SKIP line, and fails instead if `ZC_REQUIRE_KERNEL_CACHE=1`.

use zc_images::kernel::{self, KernelInfo};

mod common;
use zc_images::vmlinux::{self, PayloadFormat};

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
#[ignore = "needs Debian kernels in images/cache: run `zc-image kernel --flavour cloud` first"]
fn real_cached_kernels_extract_to_elf_vmlinux() {
    let Some(dirs) = common::cached_kernels_or_skip("real_cached_kernels_extract_to_elf_vmlinux")
    else {
        return;
    };
    for dir in dirs {
        check(&KernelInfo::load(&dir).unwrap());
    }
}

fn check(info: &KernelInfo) {
    let image = std::fs::read(&info.vmlinuz).unwrap();
    let payload = vmlinux::payload(&image).unwrap();
    let start = std::time::Instant::now();
    let elf =
        vmlinux::extract_vmlinux(&image).unwrap_or_else(|e| panic!("{}: {e}", info.describe()));
    println!(
        "{}: {} payload of {} bytes -> {} bytes in {:.2?}",
        info.describe(),
        payload.format,
        payload.data.len(),
        elf.len(),
        start.elapsed()
    );
    // Debian's choices, by kernel series; the unit tests cover the formats themselves.
    let expected = if info.release.starts_with("6.1.") && info.release.contains("-cloud-") {
        Some(PayloadFormat::Lz4)
    } else if info.release.starts_with("6.12.") {
        Some(PayloadFormat::Zstd)
    } else if info.release.starts_with("6.1.") {
        Some(PayloadFormat::Xz)
    } else {
        None
    };
    if let Some(f) = expected {
        assert_eq!(payload.format, f, "{}", info.describe());
    }

    // An executable x86-64 ELF64 ...
    assert!(elf.starts_with(b"\x7fELF"));
    assert_eq!((elf[4], elf[5]), (2, 1), "ELF64 little-endian");
    assert_eq!(u16_at(&elf, 0x10), 2, "ET_EXEC");
    assert_eq!(u16_at(&elf, 0x12), 62, "EM_X86_64");
    // ... that is this kernel: its banner names the bzImage's release. (The banner text
    // differs from the setup header's string: it names the compiler too.)
    let banner = kernel::vmlinux_version(&elf).expect("a Linux version banner");
    assert_eq!(kernel::release_of(&banner), info.release, "{banner}");

    // Loadable at physical addresses from CONFIG_PHYSICAL_START (16 MiB on Debian), with
    // the entry point (startup_64's physical address) inside the first, executable one.
    let entry = u64_at(&elf, 0x18);
    let phoff = usize::try_from(u64_at(&elf, 0x20)).unwrap();
    let phentsize = usize::from(u16_at(&elf, 0x36));
    let phnum = usize::from(u16_at(&elf, 0x38));
    let loads: Vec<(u64, u64, u64, u32)> = (0..phnum)
        .map(|i| &elf[phoff + i * phentsize..phoff + (i + 1) * phentsize])
        .filter(|ph| u32_at(ph, 0) == 1)
        .map(|ph| {
            (
                u64_at(ph, 0x08),
                u64_at(ph, 0x18),
                u64_at(ph, 0x20),
                u32_at(ph, 4),
            )
        })
        .collect();
    let paddrs: Vec<String> = loads.iter().map(|l| format!("{:#x}", l.1)).collect();
    println!("  e_entry {entry:#x}, PT_LOAD p_paddr {}", paddrs.join(" "));
    assert!(loads.len() >= 2, "{loads:?}");
    let (_, paddr, filesz, flags) = loads[0];
    assert_eq!(paddr, 0x100_0000, "first segment at CONFIG_PHYSICAL_START");
    assert!(flags & 1 != 0, "first segment is executable");
    assert!(
        (paddr..paddr + filesz).contains(&entry),
        "e_entry {entry:#x}"
    );
    for w in loads.windows(2) {
        assert!(w[0].1 + w[0].2 <= w[1].1, "segments in order: {loads:?}");
    }
    for &(off, _, filesz, _) in &loads {
        assert!(off + filesz <= elf.len() as u64, "segment inside the file");
    }
}
