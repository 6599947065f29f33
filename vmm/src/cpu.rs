//! Boot-CPU state for the Linux 64-bit boot protocol: identity page tables, a flat
//! GDT, long mode in the control registers, the MSRs Linux expects a loader to set,
//! CPUID from KVM's supported set with our topology, and the local APIC's LINT pins.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than we set.
    #[error("KVM accepted only {accepted} of {wanted} boot MSRs")]
    Msrs {
        /// How many KVM took.
        accepted: usize,
        /// How many we gave.
        wanted: usize,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

// Segment descriptor access/flag bits as `(flags << 8) | access`, see the SDM vol. 3
// section 3.4.5: present, ring 0, code/data, and for code the long-mode bit.
const GDT_CODE64: u16 = 0xa09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;

/// Segment selectors: index into the GDT times 8.
const CODE_SELECTOR: u16 = 1 << 3;
const DATA_SELECTOR: u16 = 2 << 3;
const TSS_SELECTOR: u16 = 3 << 3;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_HUGE: u64 = 0x80;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// `IA32_MISC_ENABLE.FAST_STRING`: what firmware leaves set.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without this Linux treats all RAM
/// as uncached and runs many times slower.
const MTRR_ENABLE_DEFAULT_WB: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Encodes a GDT descriptor from its base, limit (20 bits) and `(flags << 8) | access`.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The `kvm_segment` KVM wants for a GDT descriptor loaded with `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).expect("20 bits");
    let granular = bit(55) == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

/// Writes page tables that identity-map the first [`layout::IDENTITY_MAPPED_GIB`] GiB
/// with 2 MiB pages, as the 64-bit boot protocol requires.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| CpuError::GuestMemory {
                what: "page tables",
                source,
            })
    };
    write(layout::PDPT_ADDR | PAGE_PRESENT_RW, layout::PML4_ADDR)?;
    for gib in 0..layout::IDENTITY_MAPPED_GIB {
        let pd = layout::PD_ADDR + gib * 0x1000;
        write(pd | PAGE_PRESENT_RW, layout::PDPT_ADDR + gib * 8)?;
        for entry in 0..512u64 {
            let frame = ((gib << 30) | (entry << 21)) | PAGE_PRESENT_RW | PAGE_HUGE;
            write(frame, pd + entry * 8)?;
        }
    }
    Ok(())
}

/// Writes the GDT and an empty IDT, and puts the vCPU in long mode with paging on.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), CpuError> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + i as u64 * 8))
            .map_err(|source| CpuError::GuestMemory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(|source| CpuError::GuestMemory {
            what: "IDT",
            source,
        })?;
    write_page_tables(mem)?;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).expect("a GDT of a few entries");
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[1], CODE_SELECTOR);
    let data = segment_from_gdt(gdt[2], DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], TSS_SELECTOR);
    sregs.cr3 = layout::PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

/// General registers at the kernel's 64-bit entry: `rsi` holds the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), CpuError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: layout::BOOT_PARAMS_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

/// x87 and SSE control words at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
}

/// The MSR values firmware would leave behind.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_DEFAULT_WB),
    ]
}

/// Sets [`boot_msrs`] on the vCPU.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        accepted: 0,
        wanted: entries.len(),
    })?;
    let accepted = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if accepted != entries.len() {
        return Err(CpuError::Msrs {
            accepted,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: APIC IDs, the
/// hypervisor bit, and the HTT bit when there is more than one vCPU.
pub fn patch_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= 1 << 31; // hypervisor present
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: more than one logical CPU
                }
            }
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
}

/// Sets CPUID, MSRs, registers, FPU and LAPIC of vCPU `id` for a Linux 64-bit boot.
/// Only the boot vCPU (id 0) gets registers: the others wait for the kernel's SIPI.
pub fn setup_vcpu(
    kvm: &Kvm,
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    entry: GuestAddress,
) -> Result<(), CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    patch_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    setup_msrs(vcpu)?;
    if id == 0 {
        setup_sregs(mem, vcpu)?;
        setup_regs(vcpu, entry)?;
        setup_fpu(vcpu)?;
    }
    setup_lint(vcpu)
}

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: Vec<u8> = regs[offset..offset + 4].iter().map(|b| *b as u8).collect();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's firmware wires them.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(&lapic.regs, offset);
        set_lapic_reg(&mut lapic.regs, offset, (value & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_known_encodings() {
        // Values every x86 loader uses for a flat 64-bit code and data segment.
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_TSS, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x0093, 0x1234_5678, 0xabcde),
            0x120a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_from_gdt_entries() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (
                code.l,
                code.db,
                code.g,
                code.present,
                code.s,
                code.type_,
                code.dpl
            ),
            (1, 0, 1, 1, 1, 0xb, 0)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let data = segment_from_gdt(gdt_entry(GDT_DATA, 0, 0xfffff), DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 0x3));
        let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 0x10);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let read = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).unwrap() };
        let translate = |va: u64| -> u64 {
            let pml4e = read(layout::PML4_ADDR + ((va >> 39) & 0x1ff) * 8);
            assert_eq!(pml4e & 1, 1, "PML4E for {va:#x} not present");
            let pdpte = read((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8);
            assert_eq!(pdpte & 1, 1, "PDPTE for {va:#x} not present");
            let pde = read((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8);
            assert_eq!(pde & 0x81, 0x81, "PDE for {va:#x} not a present 2M page");
            (pde & !0x1f_ffff & !0xfff_0000_0000_0000) | (va & 0x1f_ffff)
        };
        for va in [
            0u64,
            0x7000,
            0x10_0200,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(va), va);
        }
    }

    #[test]
    fn cpuid_gets_apic_id_and_hypervisor_bit() {
        use kvm_bindings::kvm_cpuid_entry2;
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        patch_cpuid(&mut cpuid, 3, 4);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.edx & (1 << 28), 0);
        assert_eq!(cpuid.as_slice()[1].edx, 3);
    }

    #[test]
    fn mtrrs_default_to_write_back() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&(MSR_MTRR_DEF_TYPE, (1 << 11) | 6)));
    }
}
