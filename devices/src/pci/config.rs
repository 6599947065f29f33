//! A type-0 PCI configuration header (PCI Local Bus 3.0, section 6.1), 256 bytes:
//! identification, command/status, one 32-bit non-prefetchable memory BAR (BAR0),
//! the interrupt line, and a capability list from 0x40 on. Every byte has a mask of
//! the bits the guest may write; everything else is read-only, so a guest write can
//! never change an identity field, the capability chain or a BAR's size.

/// Size of the (conventional, non-extended) configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Register offsets of the type-0 header.
#[allow(missing_docs)]
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION_ID: usize = 0x08;
    pub const CLASS_CODE: usize = 0x09;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const CAPABILITIES_POINTER: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// `Command` bit: the function answers memory accesses to its BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// `Command` bit: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// `Command` bit: legacy INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// `Status` bit: the capability list at `CAPABILITIES_POINTER` is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Where the capability list starts: the first byte after the standard header.
pub const FIRST_CAPABILITY: usize = 0x40;

/// What identifies a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code: base class, sub-class, programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// Why a capability could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// The capability does not fit in the 256-byte space.
    #[error("a {len}-byte PCI capability does not fit after offset {at:#x}")]
    NoRoom {
        /// Where it would start.
        at: usize,
        /// Its length.
        len: usize,
    },
    /// Shorter than its ID and next pointer.
    #[error("a PCI capability needs at least its ID and next pointer")]
    TooShort,
}

/// A function's configuration header: values and writable bits.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bar0_size: Option<u32>,
    /// Offset of the last capability added (its next pointer is patched by the
    /// next one), and where the next one goes.
    last_capability: Option<usize>,
    next_capability: usize,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read_u16(reg::VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read_u16(reg::DEVICE_ID)),
            )
            .field("bar0", &self.bar0_address())
            .finish()
    }
}

impl ConfigSpace {
    /// A header for a single-function, type-0 device with `ids`, no BARs, no
    /// capabilities, no INTx pin. The guest may write `Command`'s memory, bus-master
    /// and INTx-disable bits and the interrupt line; nothing else yet.
    pub fn new(ids: PciIds) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bar0_size: None,
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        space.put_u16(reg::VENDOR_ID, ids.vendor);
        space.put_u16(reg::DEVICE_ID, ids.device);
        space.bytes[reg::REVISION_ID] = ids.revision;
        space.bytes[reg::CLASS_CODE..reg::CLASS_CODE + 3]
            .copy_from_slice(&ids.class.to_le_bytes()[..3]);
        space.put_u16(reg::SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        space.put_u16(reg::SUBSYSTEM_ID, ids.subsystem);
        space.set_writable(
            reg::COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes(),
        );
        space.set_writable(reg::INTERRUPT_LINE, &[0xff]);
        space
    }

    /// Gives the function a 32-bit non-prefetchable memory BAR0 of `size` bytes (a
    /// power of two, at least 16) at `address` (aligned to `size`), and turns memory
    /// decoding on, as firmware leaves a device it has placed. Sizing works as the
    /// spec says: the bits below `size` read as zero whatever the guest writes.
    pub fn set_bar0(&mut self, size: u32, address: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        debug_assert!(address.is_multiple_of(size));
        self.bar0_size = Some(size);
        // Bits 3:0 (memory space, 32-bit, not prefetchable) are zero and read-only.
        self.set_writable(reg::BAR0, &(!(size - 1) & !0xf).to_le_bytes());
        self.put_u32(reg::BAR0, address & !(size - 1));
        let command = self.read_u16(reg::COMMAND) | COMMAND_MEMORY;
        self.put_u16(reg::COMMAND, command);
    }

    /// Appends a capability: `body` starts with the capability ID; its next pointer
    /// (byte 1) is filled in. `writable` masks the bits the guest may write, relative
    /// to the capability's start (shorter than `body` means the rest is read-only).
    /// Returns where the capability starts.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, CapabilityError> {
        if body.len() < 2 {
            return Err(CapabilityError::TooShort);
        }
        let at = self.next_capability;
        if at + body.len() > CONFIG_SPACE_SIZE || writable.len() > body.len() {
            return Err(CapabilityError::NoRoom {
                at,
                len: body.len(),
            });
        }
        self.bytes[at..at + body.len()].copy_from_slice(body);
        self.bytes[at + 1] = 0;
        self.set_writable(at, writable);
        self.writable[at] = 0;
        self.writable[at + 1] = 0;
        let pointer = u8::try_from(at).expect("checked above: at + body.len() <= 256");
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = pointer,
            None => {
                self.bytes[reg::CAPABILITIES_POINTER] = pointer;
                let status = self.read_u16(reg::STATUS) | STATUS_CAPABILITIES;
                self.put_u16(reg::STATUS, status);
            }
        }
        self.last_capability = Some(at);
        // Capabilities start on dword boundaries.
        self.next_capability = (at + body.len()).next_multiple_of(4);
        Ok(at)
    }

    /// A guest read; an access the bus would not forward (see
    /// [`super::config_access_ok`]) reads as all ones, like an absent register.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if !super::config_access_ok(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.bytes[offset..offset + data.len()]);
    }

    /// A guest write: only the writable bits change; a bad access is ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !super::config_access_ok(offset, data.len()) {
            return;
        }
        for (i, &value) in data.iter().enumerate() {
            let mask = self.writable[offset + i];
            let old = self.bytes[offset + i];
            self.bytes[offset + i] = (old & !mask) | (value & mask);
        }
    }

    /// Reads a little-endian u16 the device itself keeps (no access check).
    pub fn read_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// Reads a little-endian u32 the device itself keeps (no access check).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let b = &self.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Sets a u16 whatever its writable bits (the device's own state).
    pub fn put_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets a u32 whatever its writable bits (the device's own state).
    pub fn put_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    /// Marks the bits of `mask` at `offset` writable by the guest.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// BAR0's size, if the function has one.
    pub fn bar0_size(&self) -> Option<u32> {
        self.bar0_size
    }

    /// Where the guest put BAR0 (its address bits), if the function has one.
    pub fn bar0_address(&self) -> Option<u64> {
        self.bar0_size
            .map(|size| u64::from(self.read_u32(reg::BAR0) & !(size - 1)))
    }

    /// BAR0 as the function decodes it now: none while memory decoding is off.
    pub fn bar0_window(&self) -> Option<super::BarWindow> {
        if self.read_u16(reg::COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        Some(super::BarWindow {
            bar: 0,
            base: self.bar0_address()?,
            size: u64::from(self.bar0_size?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: PciIds = PciIds {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: 0x01_80_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x40,
    };

    fn read32(space: &ConfigSpace, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        space.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_fields_are_where_the_spec_puts_them_and_read_only() {
        let mut space = ConfigSpace::new(IDS);
        assert_eq!(read32(&space, 0x00), 0x1042_1af4);
        assert_eq!(
            read32(&space, 0x08),
            0x0180_0001,
            "class 01 80 00, revision 1"
        );
        assert_eq!(read32(&space, 0x2c), 0x0040_1af4);
        assert_eq!(
            read32(&space, 0x0c) >> 16 & 0xff,
            0,
            "header type 0, one function"
        );
        space.write(0x00, &0xdead_beefu32.to_le_bytes());
        space.write(0x08, &[0xff]);
        assert_eq!(read32(&space, 0x00), 0x1042_1af4);
        assert_eq!(read32(&space, 0x08), 0x0180_0001);
        // No INTx pin; the line is the OS's scratch byte.
        let mut pin = [9u8];
        space.read(reg::INTERRUPT_PIN, &mut pin);
        assert_eq!(pin, [0]);
        space.write(reg::INTERRUPT_LINE, &[11]);
        let mut line = [0u8];
        space.read(reg::INTERRUPT_LINE, &mut line);
        assert_eq!(line, [11]);
    }

    #[test]
    fn only_commands_bits_for_memory_bus_master_and_intx_are_writable() {
        let mut space = ConfigSpace::new(IDS);
        space.write(reg::COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(space.read_u16(reg::COMMAND), 0x0406);
        space.write(reg::COMMAND, &0u16.to_le_bytes());
        assert_eq!(space.read_u16(reg::COMMAND), 0);
        // Status is read-only here (no error bits to clear).
        space.write(reg::STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(space.read_u16(reg::STATUS), 0);
    }

    #[test]
    fn bar0_sizing_and_relocation() {
        let mut space = ConfigSpace::new(IDS);
        assert_eq!(space.bar0_window(), None, "no BAR yet");
        space.set_bar0(0x8000, 0xe000_8000);
        assert_eq!(read32(&space, reg::BAR0), 0xe000_8000);
        assert_eq!(
            space.bar0_window(),
            Some(crate::pci::BarWindow {
                bar: 0,
                base: 0xe000_8000,
                size: 0x8000
            })
        );
        // Linux's sizing: decode off, all ones, read back, restore.
        space.write(reg::COMMAND, &0u16.to_le_bytes());
        assert_eq!(space.bar0_window(), None, "decoding off");
        space.write(reg::BAR0, &u32::MAX.to_le_bytes());
        let mask = read32(&space, reg::BAR0);
        assert_eq!(mask, 0xffff_8000, "32 KiB, 32-bit memory, not prefetchable");
        assert_eq!((!(mask & !0xf)).wrapping_add(1), 0x8000);
        // The guest moves it; decoding follows the new address, aligned down.
        space.write(reg::BAR0, &0xe123_4567u32.to_le_bytes());
        space.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(space.bar0_address(), Some(0xe123_0000));
        assert_eq!(space.bar0_window().unwrap().base, 0xe123_0000);
        // BARs 1-5 and the expansion ROM do not exist: they read zero, writes stick nowhere.
        for bar in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x30] {
            space.write(bar, &u32::MAX.to_le_bytes());
            assert_eq!(read32(&space, bar), 0, "{bar:#x}");
        }
    }

    #[test]
    fn capabilities_chain_from_0x40_on_dword_boundaries() {
        let mut space = ConfigSpace::new(IDS);
        assert_eq!(space.read_u16(reg::STATUS) & STATUS_CAPABILITIES, 0);
        let a = space
            .add_capability(&[0x11, 0xaa, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[])
            .unwrap();
        let b = space.add_capability(&[0x09, 0, 7], &[0, 0, 0xff]).unwrap();
        let c = space.add_capability(&[0x09, 0, 16, 0], &[]).unwrap();
        assert_eq!((a, b, c), (0x40, 0x4c, 0x50));
        assert_ne!(space.read_u16(reg::STATUS) & STATUS_CAPABILITIES, 0);
        // Walk the chain as a driver does.
        let mut chain = vec![];
        let mut at = usize::from(space.bytes[reg::CAPABILITIES_POINTER]);
        while at != 0 {
            chain.push((at, space.bytes[at]));
            at = usize::from(space.bytes[at + 1]);
        }
        assert_eq!(chain, vec![(0x40, 0x11), (0x4c, 0x09), (0x50, 0x09)]);
        // The ID and next pointer are read-only even when the body is writable.
        space.write(b, &[0xff, 0xff]);
        space.write(b + 2, &[0x55]);
        assert_eq!(&space.bytes[b..b + 3], &[0x09, 0x50, 0x55]);
        assert!(matches!(
            space.add_capability(&[0; 200], &[]),
            Err(CapabilityError::NoRoom { .. })
        ));
        assert_eq!(
            space.add_capability(&[1], &[]),
            Err(CapabilityError::TooShort)
        );
    }

    #[rstest::rstest]
    #[case::unaligned_word(0x01, 2)]
    #[case::unaligned_dword(0x02, 4)]
    #[case::three_bytes(0x00, 3)]
    #[case::eight_bytes(0x00, 8)]
    #[case::past_the_end(0xfe, 4)]
    #[case::far_past_the_end(0x1000, 1)]
    fn bad_accesses_read_all_ones_and_write_nothing(#[case] offset: usize, #[case] len: usize) {
        let mut space = ConfigSpace::new(IDS);
        space.set_bar0(0x1000, 0xe000_0000);
        let before = space.bytes;
        let mut data = vec![0u8; len];
        space.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0xff));
        space.write(offset, &vec![0u8; len]);
        assert_eq!(space.bytes, before);
    }
}
