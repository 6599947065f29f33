//! ACPI tables for a hardware-reduced x86 PC with no firmware.
//!
//! The guest gets an RSDP (revision 2) pointing at an XSDT, which lists a FADT and a
//! MADT; the FADT points at the DSDT. Nothing else: no FACS (optional on
//! hardware-reduced platforms), no PM timer, no SCI, no GPEs.
//!
//! * **FADT**: `HW_REDUCED_ACPI`, a reset register and the sleep control/status
//!   registers, all byte-wide on the I/O ports at [`ACPI_PM_PORT`]; the IA-PC boot
//!   flags say there is no VGA, no CMOS RTC, no 8042, and that MSI and PCIe ASPM must
//!   stay off (there is no PCI at all).
//! * **MADT**: the local APIC at [`layout::LAPIC_ADDR`], one enabled Local APIC entry per
//!   vCPU (APIC ID = vCPU index, as `cpu` programs CPUID), and KVM's in-kernel IO-APIC
//!   at [`layout::IOAPIC_ADDR`] with GSI base 0. No interrupt source overrides: KVM's
//!   default routing sends GSI *n* to IO-APIC pin *n*, which is exactly what "no
//!   override" tells the guest, and a hardware-reduced Linux never starts the PIT, so
//!   the PC's usual IRQ0 -> GSI2 override would describe wiring that does not exist.
//! * **DSDT**: a `\_SB_` scope with the two legacy UARTs (`PNP0501`) and one `LNRO0005`
//!   device per virtio-mmio slot, plus `\_S5_` so that Linux can power off.
//!
//! Why the UARTs are in the DSDT even though Linux finds 0x3f8/0x2f8 by legacy probing:
//! in hardware-reduced mode Linux replaces the 8259 with `null_legacy_pic`, so it sets
//! up no ISA IRQs 0-15 at all, and a legacy-probed `ttyS0` fails `request_irq(4)`
//! (Cloud Hypervisor and Firecracker both hit this and describe their UARTs the same
//! way). Through ACPI the kernel maps each UART's GSI like any other device interrupt.
//!
//! Power control: Linux powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep
//! control register (ACPICA `acpi_hw_extended_sleep`, with `SLP_TYP` from `\_S5_`) and
//! reboots by writing the FADT's reset value to the reset register (`acpi_reset`);
//! [`decode_pm_write`] recognises exactly those two writes.

use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout;
use crate::pio;

/// First of the three I/O ports of the ACPI power-management registers:
/// [`SLEEP_CONTROL_PORT`], [`SLEEP_STATUS_PORT`] and [`RESET_PORT`], one byte each.
///
/// 0x600 lies above every ISA/PC port Linux probes or ACPICA protects (DMA, PIC, PIT,
/// RTC, ELCR at 0x4d0, VGA at 0x3b0-0x3df) and below the PCI configuration ports at
/// 0xcf8; it is also where QEMU's Q35 puts its PM block, so it is a familiar home.
pub const ACPI_PM_PORT: u16 = 0x600;
/// How many consecutive ports from [`ACPI_PM_PORT`] the VMM must route here.
pub const ACPI_PM_PORT_LEN: u16 = 3;
/// The FADT's `SLEEP_CONTROL_REG`: Linux writes [`SLEEP_CONTROL_S5`] here to power off.
pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
/// The FADT's `SLEEP_STATUS_REG`: Linux writes `WAK_STS` (0x80) here to clear it before
/// sleeping, then polls it for `WAK_STS`. Neither needs handling: reads of an unclaimed
/// port return 0xff, which has `WAK_STS` set.
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
/// The FADT's `RESET_REG`: Linux writes [`RESET_VALUE`] here to reboot.
pub const RESET_PORT: u16 = ACPI_PM_PORT + 2;
/// The FADT's `RESET_VALUE`. 0x06 is what the PC's reset control register at 0xcf9
/// takes for a full reset; any byte would do on a port of its own.
pub const RESET_VALUE: u8 = 0x06;
/// `SLP_TYP` of S5 (soft off), as the DSDT's `\_S5_` package gives it. Any 3-bit value
/// works; it only has to match what [`decode_pm_write`] expects.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The byte Linux writes to [`SLEEP_CONTROL_PORT`] to enter S5:
/// `((SLP_TYP << 2) & 0x1c) | SLP_EN` = 0x34.
pub const SLEEP_CONTROL_S5: u8 =
    ((S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK) | SLEEP_ENABLE;
/// Pins of KVM's in-kernel IO-APIC: GSIs the MADT's single IO-APIC covers.
pub const IOAPIC_PINS: u32 = 24;

// ACPICA's ACPI_X_SLEEP_TYPE_POSITION, ACPI_X_SLEEP_TYPE_MASK and ACPI_X_SLEEP_ENABLE.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x1c;
const SLEEP_ENABLE: u8 = 0x20;

const OEM_ID: [u8; 6] = *b"ZCVMM ";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"ZCVMMKVM";
/// DSDT revision 2 and above: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Every table starts on this boundary (ACPI asks for none; 8 keeps 64-bit fields aligned).
const TABLE_ALIGN: u64 = 8;
/// The RSDP must sit on a 16-byte boundary for the kernel's fallback scan to find it.
const RSDP_ALIGN: u64 = 16;
/// Size of the standard table header.
const HEADER_LEN: u64 = 36;

// IA-PC boot architecture flags (FADT offset 109).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_PRESENT: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio device slot, described to the guest as an `LNRO0005` device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Guest-physical base of the register window; the window must lie below 4 GiB.
    pub base: u64,
    /// Size of the register window in bytes.
    pub size: u64,
    /// GSI (IO-APIC pin) of the device's edge-triggered, active-high interrupt.
    pub irq: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU *i* has APIC ID *i*.
    pub vcpus: u8,
    /// The virtio-mmio slots, in the order the guest should number them.
    pub mmio_devices: Vec<MmioDeviceInfo>,
}

/// A power-state change the guest asked for through the ACPI registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerRequest {
    /// Enter S5 (soft off): stop the VM.
    Shutdown,
    /// Reset the machine (reboot).
    Reset,
}

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables need more room than the window they were given.
    #[error(
        "ACPI tables need {needed} bytes but the window {start:#x}..{end:#x} holds {available}"
    )]
    NoRoom {
        /// Bytes the tables need, alignment included.
        needed: u64,
        /// Bytes in the window.
        available: u64,
        /// First byte of the window.
        start: u64,
        /// End (exclusive) of the window.
        end: u64,
    },
    /// The RSDP address is misaligned or overlaps the table window.
    #[error("the RSDP at {0:#x} must be 16-byte aligned and outside the table window")]
    RsdpPlacement(u64),
    /// The MADT needs at least one processor.
    #[error("ACPI tables need at least one vCPU")]
    NoVcpus,
    /// A virtio-mmio slot cannot be described.
    #[error("virtio-mmio device {index} (base {base:#x}, size {size:#x}, IRQ {irq}): {reason}")]
    BadMmioDevice {
        /// Position in [`AcpiConfig::mmio_devices`].
        index: usize,
        /// Its base address.
        base: u64,
        /// Its window size.
        size: u64,
        /// Its GSI.
        irq: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Guest memory does not back the RSDP or the tables.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Says what a byte written to an I/O port asks of the VMM, if the port is one of the
/// ACPI power-management registers and the byte one Linux writes to power off or reset.
/// Everything else (including the `WAK_STS` clearing write to [`SLEEP_STATUS_PORT`])
/// is `None`.
pub fn decode_pm_write(port: u16, value: u8) -> Option<PowerRequest> {
    match (port, value) {
        (SLEEP_CONTROL_PORT, SLEEP_CONTROL_S5) => Some(PowerRequest::Shutdown),
        (RESET_PORT, RESET_VALUE) => Some(PowerRequest::Reset),
        _ => None,
    }
}

/// A legacy UART the VMM always emulates (see [`crate::pio`]).
struct LegacyUart {
    name: &'static str,
    uid: u8,
    base: u16,
    gsi: u32,
}

const LEGACY_UARTS: [LegacyUart; 2] = [
    LegacyUart {
        name: "COM1",
        uid: 1,
        base: pio::COM1_BASE,
        gsi: pio::COM1_GSI,
    },
    LegacyUart {
        name: "COM2",
        uid: 2,
        base: pio::COM2_BASE,
        gsi: pio::COM2_GSI,
    },
];
/// I/O ports of one UART.
const UART_PORTS: u8 = 8;

/// Builds the ACPI tables for `config` and writes them to guest memory: the RSDP at
/// `rsdp_addr`, the other tables packed from `tables_start` up to `tables_end`
/// (exclusive). Everything is checked before the first byte is written, so a config
/// that cannot be described or a window that is too small leaves memory untouched.
/// The RSDP is written last; its address is what the kernel needs
/// (`boot_params.acpi_rsdp_addr`).
pub fn write_acpi_tables<M: GuestMemory>(
    mem: &M,
    rsdp_addr: GuestAddress,
    tables_start: GuestAddress,
    tables_end: GuestAddress,
    config: &AcpiConfig,
) -> Result<(), AcpiError> {
    let (start, end) = (tables_start.0, tables_end.0);
    let rsdp = rsdp_addr.0;
    let rsdp_len = Rsdp::len() as u64;
    let overlaps = rsdp < end && rsdp.saturating_add(rsdp_len) > start;
    if !rsdp.is_multiple_of(RSDP_ALIGN) || overlaps {
        return Err(AcpiError::RsdpPlacement(rsdp));
    }
    if config.vcpus == 0 {
        return Err(AcpiError::NoVcpus);
    }
    check_mmio_devices(&config.mmio_devices)?;

    let dsdt = build_dsdt(&config.mmio_devices);
    let madt = build_madt(config.vcpus);

    // Lay the tables out: DSDT, FADT, MADT, XSDT. In u128, nothing can overflow.
    let mut cursor = u128::from(start);
    let mut place = |len: u64| {
        let at = cursor.next_multiple_of(u128::from(TABLE_ALIGN));
        cursor = at + u128::from(len);
        // Saturates: a table past u64::MAX is past `end` and fails below.
        u64::try_from(at).unwrap_or(u64::MAX)
    };
    let dsdt_addr = place(dsdt.len() as u64);
    let fadt_addr = place(FADT::len() as u64);
    let madt_addr = place(madt.len() as u64);
    let xsdt_addr = place(HEADER_LEN + 2 * 8);
    if cursor > u128::from(end) {
        return Err(AcpiError::NoRoom {
            needed: u64::try_from(cursor - u128::from(start)).unwrap_or(u64::MAX),
            available: end.saturating_sub(start),
            start,
            end,
        });
    }

    let fadt = build_fadt(dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, *b"ZCVMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(fadt.len(), FADT::len());
    debug_assert_eq!(xsdt.len() as u64, HEADER_LEN + 2 * 8);

    for (bytes, addr) in [
        (&dsdt, dsdt_addr),
        (&fadt, fadt_addr),
        (&madt, madt_addr),
        (&xsdt, xsdt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))?;
    }
    mem.write_slice(&aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)), rsdp_addr)?;
    Ok(())
}

/// Rejects slots the DSDT cannot describe or the guest could not use.
fn check_mmio_devices(devices: &[MmioDeviceInfo]) -> Result<(), AcpiError> {
    let mut used_irqs: Vec<u32> = LEGACY_UARTS.iter().map(|uart| uart.gsi).collect();
    for (index, device) in devices.iter().enumerate() {
        let reason = if device.size == 0 {
            Some("the register window is empty")
        } else if device
            .base
            .checked_add(device.size)
            .is_none_or(|end| end > 1 << 32)
        {
            Some("the register window must lie below 4 GiB")
        } else if device.irq >= IOAPIC_PINS {
            Some("the IRQ is beyond the IO-APIC's 24 pins")
        } else if used_irqs.contains(&device.irq) {
            Some("the IRQ is already taken by a UART or another device")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(AcpiError::BadMmioDevice {
                index,
                base: device.base,
                size: device.size,
                irq: device.irq,
                reason,
            });
        }
        used_irqs.push(device.irq);
    }
    Ok(())
}

/// Serialises anything AML-shaped (tables included) to bytes.
fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

/// An edge-triggered, active-high, exclusive interrupt the device consumes.
fn edge_interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// The DSDT: `\_SB_` with the UARTs and the virtio-mmio devices, and `\_S5_`.
/// The devices must have passed [`check_mmio_devices`].
fn build_dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut scope_body = Vec::new();
    for uart in &LEGACY_UARTS {
        let hid = aml::EISAName::new("PNP0501");
        let io = aml::IO::new(uart.base, uart.base, 1, UART_PORTS);
        let irq = edge_interrupt(uart.gsi);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::Name::new("_HID".into(), &hid);
        let uid = aml::Name::new("_UID".into(), &uart.uid);
        let crs = aml::Name::new("_CRS".into(), &crs);
        aml::Device::new(uart.name.into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut scope_body);
    }
    for (index, device) in devices.iter().enumerate() {
        // check_mmio_devices keeps base + size within 4 GiB and the count below 24.
        let [base, size] = [device.base, device.size].map(|v| u32::try_from(v).expect("checked"));
        let window = aml::Memory32Fixed::new(true, base, size);
        let irq = edge_interrupt(device.irq);
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &u32::try_from(index).expect("checked"));
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("V{index:03}");
        aml::Device::new(Path::new(&name), vec![&hid, &uid, &crs]).to_aml_bytes(&mut scope_body);
    }

    let mut body = aml::Scope::raw("\\_SB_".into(), scope_body);
    // SLP_TYPa, SLP_TYPb (unused by the extended sleep registers), two reserved.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        u32::try_from(HEADER_LEN).expect("36 bytes"),
        DSDT_REVISION,
        OEM_ID,
        *b"ZCVMDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// A byte-wide system-I/O register.
fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// The FADT (ACPI 6.5 layout): hardware-reduced, power registers on [`ACPI_PM_PORT`].
fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"ZCVMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button: without these Linux would create
        // button devices whose fixed events a hardware-reduced platform cannot have.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_PRESENT
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.reset_reg = io_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    aml_bytes(&fadt.finalize())
}

/// The MADT: one enabled Local APIC per vCPU and the IO-APIC, no overrides.
fn build_madt(vcpus: u8) -> Vec<u8> {
    const _: () = assert!(layout::LAPIC_ADDR <= u32::MAX as u64);
    const _: () = assert!(layout::IOAPIC_ADDR <= u32::MAX as u64);
    let mut madt = MADT::new(
        OEM_ID,
        *b"ZCVMAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(u32::try_from(layout::LAPIC_ADDR).expect("checked")),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    let ioapic_addr = u32::try_from(layout::IOAPIC_ADDR).expect("checked above");
    madt.add_structure(IoApic::new(0, ioapic_addr, 0));
    aml_bytes(&madt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const RSDP: u64 = 0xe0000;
    const START: u64 = 0xe1000;
    const END: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn config(vcpus: u8, devices: usize) -> AcpiConfig {
        AcpiConfig {
            vcpus,
            mmio_devices: (0..devices)
                .map(|i| MmioDeviceInfo {
                    base: 0xd000_0000 + 0x1000 * i as u64,
                    size: 0x1000,
                    irq: 5 + u32::try_from(i).unwrap(),
                })
                .collect(),
        }
    }

    fn write(mem: &GuestMemoryMmap, config: &AcpiConfig) -> Result<(), AcpiError> {
        write_acpi_tables(
            mem,
            GuestAddress(RSDP),
            GuestAddress(START),
            GuestAddress(END),
            config,
        )
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    /// Reads the table at `addr` over its declared length, checking that it lies in
    /// the table window, has signature `signature` and sums to zero.
    fn table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header_len = usize::try_from(HEADER_LEN).unwrap();
        let header = read(mem, addr, header_len);
        assert_eq!(&header[..4], signature, "table at {addr:#x}");
        let len = u32_at(&header, 4) as usize;
        assert!(len >= header_len);
        assert!(
            addr >= START && addr + len as u64 <= END,
            "table outside the window"
        );
        let bytes = read(mem, addr, len);
        assert_eq!(
            sum(&bytes),
            0,
            "checksum of {}",
            String::from_utf8_lossy(signature)
        );
        assert_eq!(&bytes[10..16], b"ZCVMM ");
        bytes
    }

    /// A system-I/O generic address structure: (space, bit width, access size, address).
    fn gas(bytes: &[u8], at: usize) -> (u8, u8, u8, u64) {
        assert_eq!(bytes[at + 2], 0, "bit offset");
        (
            bytes[at],
            bytes[at + 1],
            bytes[at + 3],
            u64_at(bytes, at + 4),
        )
    }

    /// The guest's view: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
    struct Tables {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    fn parse(mem: &GuestMemoryMmap) -> Tables {
        let rsdp = read(mem, RSDP, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(u32_at(&rsdp, 16), 0, "no RSDT");

        let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(&xsdt, at))
            .collect();
        assert_eq!((xsdt.len() - 36) % 8, 0);
        assert_eq!(entries.len(), 2, "XSDT lists the FADT and the MADT");
        let signatures: Vec<[u8; 4]> = entries
            .iter()
            .map(|&addr| read(mem, addr, 4).try_into().unwrap())
            .collect();
        let find = |signature: &[u8; 4]| {
            let index = signatures.iter().position(|s| s == signature).unwrap();
            table(mem, entries[index], signature)
        };
        let fadt = find(b"FACP");
        let madt = find(b"APIC");

        assert_eq!(u32_at(&fadt, 40), 0, "no 32-bit DSDT pointer");
        let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
        Tables { fadt, madt, dsdt }
    }

    /// Decodes an AML PkgLength at `at`: (value, bytes it took).
    fn pkg_length(bytes: &[u8], at: usize) -> (usize, usize) {
        let lead = bytes[at];
        let extra = (lead >> 6) as usize;
        if extra == 0 {
            return ((lead & 0x3f) as usize, 1);
        }
        let mut value = (lead & 0x0f) as usize;
        for i in 0..extra {
            value |= (bytes[at + 1 + i] as usize) << (4 + 8 * i);
        }
        (value, 1 + extra)
    }

    /// Walks the DSDT's AML the way it is built: `Scope(\_SB_)` holding only
    /// `Device`s, then `Name(_S5_, Package)` and nothing else. Returns each device as
    /// (name, body after the name) and `SLP_TYPa` of S5 (the package's first element,
    /// which is all ACPICA reads for the extended sleep registers).
    fn walk_dsdt(dsdt: &[u8]) -> (Vec<(String, &[u8])>, u8) {
        let aml = &dsdt[36..];
        assert_eq!(aml[0], 0x10, "ScopeOp");
        let (len, len_bytes) = pkg_length(aml, 1);
        let scope_end = 1 + len;
        let mut at = 1 + len_bytes;
        assert_eq!(&aml[at..at + 5], b"\\_SB_");
        at += 5;
        let mut devices = Vec::new();
        while at < scope_end {
            assert_eq!(aml[at..at + 2], [0x5b, 0x82], "DeviceOp at {at}");
            let (len, len_bytes) = pkg_length(aml, at + 2);
            let end = at + 2 + len;
            assert!(end <= scope_end, "Device overruns its scope");
            let name_at = at + 2 + len_bytes;
            let name = String::from_utf8(aml[name_at..name_at + 4].to_vec()).unwrap();
            devices.push((name, &aml[name_at + 4..end]));
            at = end;
        }
        assert_eq!(at, scope_end, "devices fill the scope exactly");

        let s5 = &aml[scope_end..];
        assert_eq!(
            s5[..6],
            [0x08, b'_', b'S', b'5', b'_', 0x12],
            "Name(_S5_, Package)"
        );
        let (len, len_bytes) = pkg_length(s5, 6);
        assert_eq!(6 + len, s5.len(), "_S5_ ends the DSDT");
        let elements = 6 + len_bytes;
        assert!(s5[elements] >= 1, "_S5_ has elements");
        let sleep_type = match s5[elements + 1] {
            0x00 => 0,
            0x01 => 1,
            0x0a => s5[elements + 2],
            other => panic!("unexpected _S5_ element opcode {other:#x}"),
        };
        (devices, sleep_type)
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// An Extended Interrupt descriptor: consumer, edge, active high, exclusive, one GSI.
    fn edge_irq_descriptor(gsi: u32) -> Vec<u8> {
        let mut d = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        d.extend_from_slice(&gsi.to_le_bytes());
        d
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        for (vcpus, devices) in [(1, 0), (2, 1), (4, 3), (32, 8), (255, 19)] {
            let mem = memory();
            write(&mem, &config(vcpus, devices)).unwrap();
            parse(&mem);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_power_registers() {
        let mem = memory();
        write(&mem, &config(2, 1)).unwrap();
        let Tables { fadt, .. } = parse(&mem);
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT length");
        assert_eq!(fadt[8], 6, "FADT major revision");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "no fixed power button");
        assert_ne!(flags & (1 << 5), 0, "no fixed sleep button");
        let boot = u16_at(&fadt, 109);
        assert_eq!(boot & 0b11, 0, "no ISA devices flag, no 8042");
        assert_eq!(
            boot & 0b11_1100,
            0b11_1100,
            "no VGA, no MSI, no ASPM, no CMOS RTC"
        );
        let io_byte = |port: u16| (1, 8, 1, u64::from(port));
        assert_eq!(gas(&fadt, 116), io_byte(RESET_PORT));
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(gas(&fadt, 244), io_byte(SLEEP_CONTROL_PORT));
        assert_eq!(gas(&fadt, 256), io_byte(SLEEP_STATUS_PORT));
        assert_eq!(&fadt[268..276], b"ZCVMMKVM");
        assert_eq!(u32_at(&fadt, 36), 0, "no FACS");
        assert_eq!(u64_at(&fadt, 132), 0, "no X_FACS");
    }

    #[test]
    fn linux_power_writes_derived_from_the_tables_are_decoded() {
        let mem = memory();
        write(&mem, &config(1, 0)).unwrap();
        let Tables { fadt, dsdt, .. } = parse(&mem);
        // acpi_reset(): an 8-bit write of RESET_VALUE to RESET_REG.
        let reset_port = u16::try_from(gas(&fadt, 116).3).unwrap();
        assert_eq!(
            decode_pm_write(reset_port, fadt[128]),
            Some(PowerRequest::Reset)
        );
        // acpi_hw_extended_sleep(S5): WAK_STS to SLEEP_STATUS_REG, then
        // ((SLP_TYP << 2) & 0x1c) | SLP_EN to SLEEP_CONTROL_REG.
        let status_port = u16::try_from(gas(&fadt, 256).3).unwrap();
        assert_eq!(decode_pm_write(status_port, 0x80), None);
        let control_port = u16::try_from(gas(&fadt, 244).3).unwrap();
        let value = ((walk_dsdt(&dsdt).1 << 2) & 0x1c) | 0x20;
        assert_eq!(value, 0x34);
        assert_eq!(
            decode_pm_write(control_port, value),
            Some(PowerRequest::Shutdown)
        );
    }

    #[test]
    fn decode_pm_write_recognises_exactly_the_linux_writes() {
        let cases = [
            (SLEEP_CONTROL_PORT, 0x34, Some(PowerRequest::Shutdown)),
            (RESET_PORT, RESET_VALUE, Some(PowerRequest::Reset)),
            (SLEEP_CONTROL_PORT, 0x14, None), // SLP_TYP 5 without SLP_EN
            (SLEEP_CONTROL_PORT, 0x20, None), // SLP_EN with SLP_TYP 0 (S0 wake prep)
            (SLEEP_CONTROL_PORT, 0x2c, None), // SLP_TYP 3: no S3 here
            (SLEEP_CONTROL_PORT, RESET_VALUE, None),
            (SLEEP_STATUS_PORT, 0x80, None), // WAK_STS clear
            (SLEEP_STATUS_PORT, 0x34, None),
            (RESET_PORT, 0x34, None),
            (RESET_PORT, 0x00, None),
            (RESET_PORT, 0x0e, None),
            (ACPI_PM_PORT + ACPI_PM_PORT_LEN, 0x34, None),
            (0x3f8, 0x34, None),
            (0xcf9, 0x06, None),
            (0x64, 0xfe, None),
        ];
        for (port, value, expected) in cases {
            assert_eq!(
                decode_pm_write(port, value),
                expected,
                "{port:#x} <- {value:#x}"
            );
        }
        assert_eq!(SLEEP_CONTROL_S5, 0x34);
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_one_ioapic() {
        for vcpus in [1u8, 2, 7, 32, 255] {
            let mem = memory();
            write(&mem, &config(vcpus, 2)).unwrap();
            let Tables { madt, .. } = parse(&mem);
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000, "local APIC address");
            let mut apic_ids = Vec::new();
            let mut ioapics = Vec::new();
            let mut at = 44;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                assert!(len >= 2 && at + len <= madt.len(), "MADT entry overruns");
                match kind {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(madt[at + 2], madt[at + 3], "UID = APIC ID");
                        assert_eq!(u32_at(&madt, at + 4) & 1, 1, "enabled");
                        apic_ids.push(madt[at + 3]);
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((u32_at(&madt, at + 4), u32_at(&madt, at + 8)));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                at += len;
            }
            assert_eq!(at, madt.len(), "entries fill the table exactly");
            assert_eq!(apic_ids, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(ioapics, vec![(0xfec0_0000, 0)]);
        }
    }

    #[test]
    fn dsdt_describes_each_virtio_mmio_slot_the_uarts_and_s5() {
        let devices = vec![
            MmioDeviceInfo {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                base: 0xd000_1000,
                size: 0x200,
                irq: 9,
            },
            MmioDeviceInfo {
                base: 0xfeb0_0000,
                size: 0x1000,
                irq: 23,
            },
        ];
        let mem = memory();
        let config = AcpiConfig {
            vcpus: 1,
            mmio_devices: devices.clone(),
        };
        write(&mem, &config).unwrap();
        let Tables { dsdt, .. } = parse(&mem);
        assert_eq!(dsdt[8], DSDT_REVISION);
        let aml = &dsdt[36..];
        assert_eq!(count(aml, b"LNRO0005\0"), devices.len());
        let (found, sleep_type) = walk_dsdt(&dsdt);
        assert_eq!(sleep_type, S5_SLEEP_TYPE);
        let virtio: Vec<_> = found
            .iter()
            .filter(|(_, b)| contains(b, b"LNRO0005\0"))
            .collect();
        assert_eq!(virtio.len(), devices.len());
        for (index, (device, (name, body))) in devices.iter().zip(&virtio).enumerate() {
            assert_eq!(*name, format!("V{index:03}"));
            assert!(
                contains(body, b"\x08_HID\x0dLNRO0005\0"),
                "_HID string of {index}"
            );
            let mut window = vec![0x86, 0x09, 0x00, 0x01];
            window.extend_from_slice(&u32::try_from(device.base).unwrap().to_le_bytes());
            window.extend_from_slice(&u32::try_from(device.size).unwrap().to_le_bytes());
            assert!(contains(body, &window), "Memory32Fixed of device {index}");
            assert!(
                contains(body, &edge_irq_descriptor(device.irq)),
                "IRQ of {index}"
            );
            // Name(_UID, index): 0 and 1 have one-byte opcodes, others a BytePrefix.
            let uid = match index {
                0 => vec![0x08, b'_', b'U', b'I', b'D', 0x00],
                1 => vec![0x08, b'_', b'U', b'I', b'D', 0x01],
                n => vec![0x08, b'_', b'U', b'I', b'D', 0x0a, u8::try_from(n).unwrap()],
            };
            assert!(contains(body, &uid), "_UID of device {index}");
        }

        // COM1 and COM2: PNP0501 (EISA ID 0x0105d041), their ports and their GSIs.
        for (name, base, gsi) in [("COM1", 0x3f8u16, 4u32), ("COM2", 0x2f8, 3)] {
            let (_, body) = found.iter().find(|(n, _)| n == name).expect(name);
            assert!(
                contains(body, &[0x0c, 0x41, 0xd0, 0x05, 0x01]),
                "{name} _HID"
            );
            let [lo, hi] = base.to_le_bytes();
            assert!(
                contains(body, &[0x47, 0x01, lo, hi, lo, hi, 0x01, 0x08]),
                "{name} IO"
            );
            assert!(contains(body, &edge_irq_descriptor(gsi)), "{name} IRQ");
        }
        assert_eq!(found.len(), devices.len() + 2);
    }

    #[test]
    fn too_small_a_window_is_an_error_and_writes_nothing() {
        let mem = memory();
        for end in [START, START + 36, START + 300, START + 400] {
            let err = write_acpi_tables(
                &mem,
                GuestAddress(RSDP),
                GuestAddress(START),
                GuestAddress(end),
                &config(4, 4),
            )
            .unwrap_err();
            match err {
                AcpiError::NoRoom {
                    needed, available, ..
                } => {
                    assert_eq!(available, end - START);
                    assert!(needed > available);
                }
                other => panic!("unexpected error {other}"),
            }
        }
        // An inverted window and one at the very top of the address space.
        for (start, end) in [(START, START - 1), (u64::MAX - 8, u64::MAX)] {
            let err = write_acpi_tables(
                &mem,
                GuestAddress(RSDP),
                GuestAddress(start),
                GuestAddress(end),
                &config(1, 0),
            );
            assert!(matches!(err, Err(AcpiError::NoRoom { .. })), "{err:?}");
        }
        assert!(read(&mem, RSDP, usize::try_from(END - RSDP).unwrap())
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn tables_fit_exactly_at_their_computed_size() {
        // Find the smallest window that works; one byte less must fail.
        let config = config(8, 4);
        let mut end = START + 36;
        let needed = loop {
            let mem = memory();
            let result = write_acpi_tables(
                &mem,
                GuestAddress(RSDP),
                GuestAddress(START),
                GuestAddress(end),
                &config,
            );
            match result {
                Ok(()) => {
                    parse(&mem);
                    let beyond = read(&mem, end, usize::try_from(END - end).unwrap());
                    assert!(beyond.iter().all(|&b| b == 0), "wrote past the window");
                    break end - START;
                }
                Err(AcpiError::NoRoom { needed, .. }) => end = START + needed,
                Err(other) => panic!("unexpected error {other}"),
            }
        };
        let mem = memory();
        assert!(write_acpi_tables(
            &mem,
            GuestAddress(RSDP),
            GuestAddress(START),
            GuestAddress(START + needed - 1),
            &config,
        )
        .is_err());
    }

    #[test]
    fn bad_placement_and_configs_are_errors() {
        let mem = memory();
        let at = |rsdp: u64| {
            write_acpi_tables(
                &mem,
                GuestAddress(rsdp),
                GuestAddress(START),
                GuestAddress(END),
                &config(1, 0),
            )
        };
        assert!(matches!(at(START), Err(AcpiError::RsdpPlacement(_))));
        assert!(matches!(at(START - 16), Err(AcpiError::RsdpPlacement(_))));
        assert!(matches!(at(RSDP + 8), Err(AcpiError::RsdpPlacement(_))));
        assert!(matches!(
            write(&mem, &config(0, 0)),
            Err(AcpiError::NoVcpus)
        ));

        let bad = |base: u64, size: u64, irq: u32| {
            let mut config = config(1, 1);
            config.mmio_devices.push(MmioDeviceInfo { base, size, irq });
            write(&mem, &config)
        };
        let is_bad = |result: Result<(), AcpiError>| {
            matches!(result, Err(AcpiError::BadMmioDevice { index: 1, .. }))
        };
        assert!(is_bad(bad(0x1_0000_0000, 0x1000, 6)), "above 4 GiB");
        assert!(is_bad(bad(0xffff_f000, 0x2000, 6)), "straddles 4 GiB");
        assert!(is_bad(bad(u64::MAX, 2, 6)), "wraps");
        assert!(is_bad(bad(0xd000_1000, 0, 6)), "empty");
        assert!(is_bad(bad(0xd000_1000, 0x1000, 24)), "beyond the IO-APIC");
        assert!(is_bad(bad(0xd000_1000, 0x1000, 5)), "IRQ of device 0");
        assert!(is_bad(bad(0xd000_1000, 0x1000, 4)), "COM1's IRQ");
        assert!(is_bad(bad(0xd000_1000, 0x1000, 3)), "COM2's IRQ");
        assert!(bad(0xffff_f000, 0x1000, 6).is_ok(), "ends right at 4 GiB");
    }

    #[test]
    fn unbacked_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe8000)]).unwrap();
        let result = write_acpi_tables(
            &mem,
            GuestAddress(RSDP),
            GuestAddress(0xe7f00),
            GuestAddress(END),
            &config(1, 0),
        );
        assert!(
            matches!(result, Err(AcpiError::GuestMemory(_))),
            "{result:?}"
        );
    }
}
