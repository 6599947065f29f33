//! The guest-physical memory map: where boot structures, the kernel, the initrd,
//! ACPI tables and device windows live, and the e820 table that tells the kernel.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, PDPT, 4 PDs (identity 4 GiB)
//! 0x0000_0520  IDT (empty)              0x0002_0000  kernel command line
//! 0x0000_7000  boot_params (zero page)  0x0009_fc00  EBDA start: reserved up to 1 MiB
//! 0x0000_8ff0  boot stack top           0x000e_0000  RSDP, then ACPI tables to 1 MiB
//! 0x0010_0000  kernel (bzImage protected-mode part or ELF vmlinux)
//!   ...        RAM ... initrd at the top of low RAM
//! 0xc000_0000  32-bit device window (virtio-mmio at 0xd000_0000, IOAPIC, LAPIC) to 4 GiB
//! 0x1_0000_0000  RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table.
pub const GDT_ADDR: u64 = 0x500;
/// Interrupt descriptor table (left empty; the kernel installs its own at once).
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Top-level page table; the PDPT and page directories follow it page by page.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of the page directories (one per identity-mapped GiB).
pub const PD_ADDR: u64 = 0xb000;
/// How many GiB the boot page tables identity-map with 2 MiB pages. 4 GiB covers
/// every place the boot protocol needs mapped (kernel, zero page, command line,
/// initrd) for any memory size we allow below the 32-bit device window.
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line we pass, including the NUL: x86's `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below this is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP, in the BIOS area where the kernel would also scan for it.
pub const RSDP_ADDR: u64 = 0xe0000;
/// ACPI tables other than the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe1000;
/// End (exclusive) of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where the kernel is loaded: the 1 MiB the boot protocol expects.
pub const KERNEL_START: u64 = 0x10_0000;
/// Start of the 32-bit device window: RAM below 4 GiB stops here.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Base of the first virtio-mmio device slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IO-APIC base (the in-kernel irqchip's default).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Where KVM's TSS pages go (three pages just under the BIOS ROM area at 4 GiB).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// First byte above the 32-bit device window.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Smallest guest we agree to build: enough for a compressed kernel to unpack.
pub const MIN_MEM_BYTES: u64 = 64 << 20;

// Placement rules the compiler checks: the boot stack sits between the zero page and
// the page tables, the command line ends below the EBDA, and the device window holds
// the virtio slots below the IO-APIC, LAPIC and KVM's TSS.
const _: () = assert!(BOOT_STACK_TOP < PML4_ADDR && BOOT_STACK_TOP > BOOT_PARAMS_ADDR + 0x1000);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
const _: () = assert!(IOAPIC_ADDR > VIRTIO_MMIO_BASE && LAPIC_ADDR < KVM_TSS_ADDR);

/// What an e820 entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the kernel must not use it.
    Reserved = 2,
}

/// One entry of the e820 memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

/// The RAM regions of a guest with `mem_bytes` of memory, as (start, size) pairs:
/// everything below the 32-bit device window, and the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_bytes.min(MMIO32_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_bytes > MMIO32_START {
        regions.push((
            GuestAddress(HIGH_RAM_START),
            usize::try_from(mem_bytes - MMIO32_START).expect("guest RAM fits the address space"),
        ));
    }
    regions
}

/// The e820 map for a guest with `mem_bytes` of RAM.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let low_end = mem_bytes.min(MMIO32_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: BIOS_END - EBDA_START,
            kind: E820Kind::Reserved,
        },
        E820Entry {
            addr: BIOS_END,
            size: low_end - BIOS_END,
            kind: E820Kind::Ram,
        },
    ];
    if mem_bytes > MMIO32_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_bytes - MMIO32_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

/// The end (exclusive) of RAM below the device window: the initrd goes under it.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO32_START)
}

/// Guest address of virtio-mmio slot `index`.
pub fn virtio_mmio_slot(index: u32) -> GuestAddress {
    GuestAddress(VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(512 << 20)]
    #[case(MMIO32_START)]
    #[case(4 << 30)]
    #[case(8 << 30)]
    fn e820_covers_all_ram_exactly_once(#[case] mem: u64) {
        let map = e820_map(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // The EBDA..1 MiB hole is RAM-backed but reserved.
        assert_eq!(ram + (BIOS_END - EBDA_START), mem);
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
        }
        for e in &map {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO32_START || e.addr >= HIGH_RAM_START,
                "entry {e:?} overlaps the device window"
            );
        }
    }

    #[rstest]
    #[case(512 << 20, 1)]
    #[case(3 << 30, 1)]
    #[case(5 << 30, 2)]
    fn ram_regions_split_around_device_window(#[case] mem: u64, #[case] count: usize) {
        let regions = ram_regions(mem);
        assert_eq!(regions.len(), count);
        let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
        assert_eq!(total, mem);
        if count == 2 {
            assert_eq!(regions[1].0, GuestAddress(HIGH_RAM_START));
        }
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let page_tables_end = PD_ADDR + IDENTITY_MAPPED_GIB * 0x1000;
        let spans = [
            (GDT_ADDR, GDT_ADDR + 4 * 8),
            (IDT_ADDR, IDT_ADDR + 8),
            (BOOT_PARAMS_ADDR, BOOT_PARAMS_ADDR + 0x1000),
            (PML4_ADDR, page_tables_end),
            (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64),
            (RSDP_ADDR, BIOS_END),
        ];
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                assert!(a.1 <= b.0 || b.1 <= a.0, "{a:x?} overlaps {b:x?}");
            }
        }
        assert!(page_tables_end <= CMDLINE_ADDR);
    }
}
