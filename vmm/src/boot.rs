//! Loading a Linux kernel, its initrd and command line into guest memory, and the
//! zero page (`struct boot_params`) that describes them, for the 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): the vCPU starts in long mode at the kernel's
//! 64-bit entry point with `rsi` pointing at the zero page. No firmware runs.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::boot_params;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};

/// `HdrS`: the setup header's magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The boot sector's signature, also required in `hdr.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `xloadflags` bit: the kernel has the legacy 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Alignment a vmlinux (no setup header of its own) is told it was loaded with.
const VMLINUX_ALIGNMENT: u32 = 0x100_0000;
/// `initrd_addr_max` for kernels that do not state one (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading what the guest boots. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither a bzImage nor an ELF vmlinux.
    #[error("{0} is neither a bzImage nor an ELF vmlinux; pass the kernel's arch/x86/boot/bzImage, its vmlinux, or a Debian /boot/vmlinuz-*")]
    UnknownKernelFormat(PathBuf),
    /// The kernel loader rejected the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        /// The kernel.
        path: PathBuf,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// A bzImage without the 64-bit entry point we jump to.
    #[error(
        "{0} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64); build an x86-64 kernel"
    )]
    No64BitEntry(PathBuf),
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}; give the guest more memory (--mem)")]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// Writing into guest memory failed (a layout bug, not user input).
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

/// The kernel image formats we boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelFormat {
    /// A compressed `bzImage` (what distributions ship as `vmlinuz`).
    BzImage,
    /// An uncompressed ELF `vmlinux`.
    Elf,
}

/// Where the loaded kernel starts, and what it is.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Guest address the boot vCPU jumps to, in 64-bit mode.
    pub entry: GuestAddress,
    /// The image's format.
    pub format: KernelFormat,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initrd, if any.
    pub initrd: Option<&'a Path>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Total guest RAM, for the e820 map and initrd placement.
    pub mem_bytes: u64,
}

/// Detects the format of a kernel image from its first bytes and its setup header.
pub fn detect_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = vec![0u8; 0x206];
    let read_err = |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..]).map_err(read_err)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    format_of(&head).ok_or_else(|| BootError::UnknownKernelFormat(path.to_path_buf()))
}

/// The format a kernel image's first 0x206 bytes show, if any.
fn format_of(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    let magic = head.get(0x202..0x206)?;
    (u32::from_le_bytes(magic.try_into().ok()?) == SETUP_HEADER_MAGIC)
        .then_some(KernelFormat::BzImage)
}

/// Loads kernel, initrd and command line, and writes the zero page. Returns where to
/// start the boot vCPU.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<LoadedKernel, BootError> {
    let format = detect_format(spec.kernel)?;
    let mut file = File::open(spec.kernel).map_err(|source| BootError::Read {
        path: spec.kernel.to_path_buf(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: spec.kernel.to_path_buf(),
        source,
    };
    let highmem = Some(GuestAddress(layout::KERNEL_START));
    let mut params = boot_params::default();
    let (entry, kernel_end) = match format {
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
            // The loader always returns the header for a bzImage.
            let hdr = loaded
                .setup_header
                .ok_or_else(|| BootError::UnknownKernelFormat(spec.kernel.to_path_buf()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(spec.kernel.to_path_buf()));
            }
            params.hdr = hdr;
            (
                GuestAddress(loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                loaded.kernel_end,
            )
        }
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = SETUP_HEADER_MAGIC;
            params.hdr.kernel_alignment = VMLINUX_ALIGNMENT;
            (loaded.kernel_load, loaded.kernel_end)
        }
    };

    write_cmdline(mem, &mut params, spec.cmdline)?;
    if let Some(initrd) = spec.initrd {
        load_initrd(mem, &mut params, initrd, kernel_end, spec.mem_bytes)?;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.acpi_rsdp_addr = layout::RSDP_ADDR;
    set_e820(&mut params, &layout::e820_map(spec.mem_bytes));

    let zero_page = BootParams::new::<boot_params>(&params, GuestAddress(layout::BOOT_PARAMS_ADDR));
    LinuxBootConfigurator::write_bootparams(&zero_page, mem).map_err(|e| {
        BootError::GuestMemory {
            what: "boot_params",
            source: vm_memory::GuestMemoryError::IOError(std::io::Error::other(e.to_string())),
        }
    })?;
    Ok(LoadedKernel { entry, format })
}

fn write_cmdline(
    mem: &GuestMemoryMmap,
    params: &mut boot_params,
    cmdline: &str,
) -> Result<(), BootError> {
    // Kernels since boot protocol 2.06 state their limit; older ones take 255 bytes.
    let kernel_max = if params.hdr.version >= 0x0206 {
        params.hdr.cmdline_size as usize
    } else {
        255
    };
    let max = kernel_max.min(layout::CMDLINE_MAX - 1);
    // An ELF vmlinux has no header to state a limit.
    let max = if max == 0 {
        layout::CMDLINE_MAX - 1
    } else {
        max
    };
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|source| BootError::GuestMemory {
            what: "command line",
            source,
        })?;
    params.hdr.cmd_line_ptr = u32::try_from(layout::CMDLINE_ADDR).expect("below 4 GiB");
    params.hdr.cmdline_size = u32::try_from(cmdline.len()).expect("checked: under CMDLINE_MAX");
    Ok(())
}

/// Where an initrd of `size` bytes goes: as high as allowed, page-aligned, above the
/// kernel. `None` when it does not fit.
fn initrd_placement(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    params: &mut boot_params,
    path: &Path,
    kernel_end: u64,
    mem_bytes: u64,
) -> Result<(), BootError> {
    let read_err = |source| BootError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = match params.hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        max => u64::from(max),
    };
    let limit = layout::low_ram_end(mem_bytes).min(addr_max + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let start = initrd_placement(size, kernel_end, limit).ok_or_else(too_large)?;
    // Placed below `limit`, at most 4 GiB (the setup header's fields are 32 bits).
    let (Ok(image), Ok(size32), Ok(len)) = (
        u32::try_from(start),
        u32::try_from(size),
        usize::try_from(size),
    ) else {
        return Err(too_large());
    };
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|source| BootError::GuestMemory {
            what: "initrd",
            source,
        })?;
    params.hdr.ramdisk_image = image;
    params.hdr.ramdisk_size = size32;
    Ok(())
}

fn set_e820(params: &mut boot_params, map: &[E820Entry]) {
    for (slot, entry) in params.e820_table.iter_mut().zip(map) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind as u32;
    }
    params.e820_entries = u8::try_from(map.len().min(params.e820_table.len()))
        .expect("the zero page holds 128 entries");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn guest_memory(bytes: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&layout::ram_regions(bytes)).unwrap()
    }

    /// A minimal but well-formed bzImage: one setup sector plus the boot sector, a
    /// setup header that says "64-bit capable", and a recognisable payload.
    fn fake_bzimage(xloadflags: u16) -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 2 * 512];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        image[0x202..0x206].copy_from_slice(&SETUP_HEADER_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version 2.15
        image[0x211] = 1; // loadflags: LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        image[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        image[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        image.extend_from_slice(b"PROTECTED-MODE-KERNEL");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&image).unwrap();
        file
    }

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn read_params(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(layout::BOOT_PARAMS_ADDR))
            .unwrap()
    }

    #[test]
    fn detects_formats() {
        assert_eq!(format_of(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let kernel = fake_bzimage(XLF_KERNEL_64);
        assert_eq!(detect_format(kernel.path()).unwrap(), KernelFormat::BzImage);
        assert_eq!(format_of(&[0u8; 0x206]), None);
        assert_eq!(format_of(b"short"), None);
        let junk = temp_file(b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(
            detect_format(junk.path()),
            Err(BootError::UnknownKernelFormat(_))
        ));
    }

    #[test]
    fn loads_bzimage_with_initrd_and_cmdline() {
        let mem_bytes = 256 << 20;
        let mem = guest_memory(mem_bytes);
        let kernel = fake_bzimage(XLF_KERNEL_64);
        let initrd = temp_file(&[0xab; 10_000]);
        let loaded = load(
            &mem,
            &BootSpec {
                kernel: kernel.path(),
                initrd: Some(initrd.path()),
                cmdline: "console=ttyS0 quiet",
                mem_bytes,
            },
        )
        .unwrap();
        assert_eq!(loaded.format, KernelFormat::BzImage);
        assert_eq!(loaded.entry, GuestAddress(0x10_0200));

        let mut payload = [0u8; 21];
        mem.read_slice(&mut payload, GuestAddress(layout::KERNEL_START))
            .unwrap();
        assert_eq!(&payload, b"PROTECTED-MODE-KERNEL");

        let params = read_params(&mem);
        let hdr = params.hdr;
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
        assert_eq!(hdr.cmd_line_ptr as u64, layout::CMDLINE_ADDR);
        let cmdline_size = hdr.cmdline_size;
        assert_eq!(cmdline_size, 19);
        let mut cmdline = [0u8; 20];
        mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet\0");

        let (start, size) = (hdr.ramdisk_image as u64, hdr.ramdisk_size as u64);
        assert_eq!(size, 10_000);
        assert_eq!(start % 4096, 0);
        assert!(start + size <= mem_bytes && start + size > mem_bytes - 8192);
        let mut first = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(start)).unwrap();
        assert_eq!(first, [0xab; 4]);

        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, layout::RSDP_ADDR);
        let map = layout::e820_map(mem_bytes);
        assert_eq!(params.e820_entries as usize, map.len());
        for (got, want) in params.e820_table.iter().zip(&map) {
            let (addr, size, kind) = (got.addr, got.size, got.r#type);
            assert_eq!((addr, size, kind), (want.addr, want.size, want.kind as u32));
        }
    }

    #[test]
    fn rejects_kernel_without_64bit_entry() {
        let mem = guest_memory(64 << 20);
        let kernel = fake_bzimage(0);
        let err = load(
            &mem,
            &BootSpec {
                kernel: kernel.path(),
                initrd: None,
                cmdline: "",
                mem_bytes: 64 << 20,
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::No64BitEntry(_)), "{err}");
    }

    #[test]
    fn rejects_overlong_cmdline_and_oversized_initrd() {
        let mem_bytes = 64 << 20;
        let mem = guest_memory(mem_bytes);
        let kernel = fake_bzimage(XLF_KERNEL_64);
        let long = "x".repeat(3000);
        let spec = BootSpec {
            kernel: kernel.path(),
            initrd: None,
            cmdline: &long,
            mem_bytes,
        };
        assert!(matches!(
            load(&mem, &spec),
            Err(BootError::CmdlineTooLong { max: 2047, .. })
        ));

        let initrd = temp_file(&vec![0u8; 64 << 20]);
        let spec = BootSpec {
            initrd: Some(initrd.path()),
            cmdline: "",
            ..spec
        };
        assert!(matches!(
            load(&mem, &spec),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let mem = guest_memory(64 << 20);
        let err = load(
            &mem,
            &BootSpec {
                kernel: Path::new("/nonexistent/bzImage"),
                initrd: None,
                cmdline: "",
                mem_bytes: 64 << 20,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/bzImage"), "{err}");
    }

    #[test]
    fn initrd_placement_is_aligned_and_above_kernel() {
        assert_eq!(
            initrd_placement(0x1800, 0x20_0000, 0x100_0000),
            Some(0xffe000)
        );
        assert_eq!(initrd_placement(0x100_0000, 0x20_0000, 0x100_0000), None);
        assert_eq!(initrd_placement(u64::MAX, 0, 0x100_0000), None);
    }
}
