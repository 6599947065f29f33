//! PCI bus 0 behind the PC's configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2):
//! the guest writes `enable | bus << 16 | device << 11 | function << 8 | register` to
//! `CONFIG_ADDRESS` (port 0xcf8, 32-bit) and then accesses the register through
//! `CONFIG_DATA` (ports 0xcfc-0xcff). Linux uses it with or without ACPI (its "type 1"
//! probe also checks that a host bridge answers on bus 0, hence [`HostBridge`]).
//!
//! No ECAM (MMCONFIG): it would need an MCFG table and its window reserved in the
//! e820 map or a motherboard resource, and buys only the extended space beyond 256
//! bytes, which nothing here has (virtio-pci's capabilities sit in the first 256).
//!
//! MMIO: the VMM hands the bus every guest access in the PCI memory window; the bus
//! finds the function whose BAR (where the guest last put it, with memory decoding on)
//! holds the access.

use super::config::{ConfigSpace, PciIds};
use super::{config_access_ok, BarWindow, PciFunction};

/// `CONFIG_ADDRESS`.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// First of the four `CONFIG_DATA` ports.
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Devices on one bus.
pub const DEVICES_PER_BUS: usize = 32;
/// `CONFIG_ADDRESS` bit 31: the next `CONFIG_DATA` access is a configuration cycle.
const CONFIG_ENABLE: u32 = 1 << 31;

/// Identity of the host bridge at 00:00.0: Red Hat's ID for a generic (QEMU) PCIe
/// host bridge, which no Linux quirk matches; class 06 00 00, host bridge.
pub const HOST_BRIDGE_IDS: PciIds = PciIds {
    vendor: 0x1b36,
    device: 0x0008,
    revision: 0,
    class: 0x06_00_00,
    subsystem_vendor: 0x1b36,
    subsystem: 0x0008,
};

/// Why a function could not be put on the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciBusError {
    /// Every device number is taken.
    #[error("the PCI bus is full: at most {} devices besides the host bridge", DEVICES_PER_BUS - 1)]
    Full,
}

/// The host bridge: a configuration header and nothing else.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_IDS),
        }
    }
}

impl PciFunction for HostBridge {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data)
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data)
    }
    fn bar_windows(&self) -> Vec<BarWindow> {
        Vec::new()
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0: up to 32 single-function devices, the host bridge at device 0.
pub struct PciBus {
    devices: Vec<Option<Box<dyn PciFunction>>>,
    config_address: u32,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field(
                "devices",
                &self.devices.iter().filter(|d| d.is_some()).count(),
            )
            .field(
                "config_address",
                &format_args!("{:#x}", self.config_address),
            )
            .finish()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        let mut devices: Vec<Option<Box<dyn PciFunction>>> =
            (0..DEVICES_PER_BUS).map(|_| None).collect();
        devices[0] = Some(Box::new(HostBridge::default()));
        PciBus {
            devices,
            config_address: 0,
        }
    }
}

impl PciBus {
    /// Puts `function` at the next free device number and returns that number.
    pub fn add(&mut self, function: Box<dyn PciFunction>) -> Result<u8, PciBusError> {
        let free = self.next_device().ok_or(PciBusError::Full)?;
        self.devices[usize::from(free)] = Some(function);
        Ok(free)
    }

    /// The device number the next [`Self::add`] will use, if any is free.
    pub fn next_device(&self) -> Option<u8> {
        let free = self.devices.iter().position(Option::is_none)?;
        Some(u8::try_from(free).expect("a bus has DEVICES_PER_BUS (32) slots"))
    }

    /// Whether `port` is one of the configuration mechanism's ports.
    pub fn handles_port(port: u16) -> bool {
        (CONFIG_ADDRESS_PORT..CONFIG_DATA_PORT + 4).contains(&port)
    }

    /// A port read (see [`Self::handles_port`]).
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS_PORT && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
            return;
        }
        match self.selected(port, data.len()) {
            Some((device, offset)) => device.read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A port write. Only a 32-bit write to 0xcf8 sets `CONFIG_ADDRESS` (byte writes
    /// there belong to the old mechanism #2, which Linux probes for and must not find).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS_PORT {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(bytes);
            }
            return;
        }
        if let Some((device, offset)) = self.selected(port, data.len()) {
            device.write_config(offset, data);
        }
    }

    /// The function and register a `CONFIG_DATA` access reaches, if it is a valid
    /// access to a function that exists (bus 0, function 0).
    fn selected(&mut self, port: u16, len: usize) -> Option<(&mut Box<dyn PciFunction>, usize)> {
        let lane = usize::from(port.checked_sub(CONFIG_DATA_PORT)?);
        if lane >= 4 || self.config_address & CONFIG_ENABLE == 0 {
            return None;
        }
        let address = self.config_address;
        let bus = (address >> 16) & 0xff;
        let device = ((address >> 11) & 0x1f) as usize;
        let function = (address >> 8) & 0x7;
        let offset = (address & 0xfc) as usize + lane;
        if bus != 0 || function != 0 || !config_access_ok(offset, len) {
            return None;
        }
        Some((self.devices[device].as_mut()?, offset))
    }

    /// A guest MMIO read at `addr`; false (and all ones) if no BAR holds it.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.decode(addr, data.len()) {
            Some((device, bar, offset)) => {
                device.read_bar(bar, offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// A guest MMIO write at `addr`; false if no BAR holds it.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.decode(addr, data.len()) {
            Some((device, bar, offset)) => {
                device.write_bar(bar, offset, data);
                true
            }
            None => false,
        }
    }

    /// Which device number, BAR and offset an MMIO access of `len` bytes at `addr`
    /// reaches, if a BAR holds all of it (what the VMM's exit counters name).
    pub fn locate(&self, addr: u64, len: usize) -> Option<(u8, usize, u64)> {
        self.devices
            .iter()
            .enumerate()
            .find_map(|(number, device)| {
                let (bar, offset) = device
                    .as_ref()?
                    .bar_windows()
                    .into_iter()
                    .find_map(|w| w.offset_of(addr, len).map(|offset| (w.bar, offset)))?;
                let number = u8::try_from(number).expect("a bus has DEVICES_PER_BUS (32) slots");
                Some((number, bar, offset))
            })
    }

    fn decode(&mut self, addr: u64, len: usize) -> Option<(&mut Box<dyn PciFunction>, usize, u64)> {
        self.devices.iter_mut().flatten().find_map(|device| {
            let hit = device
                .bar_windows()
                .into_iter()
                .find_map(|w| w.offset_of(addr, len).map(|offset| (w.bar, offset)));
            hit.map(|(bar, offset)| (device, bar, offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// BAR accesses seen: (offset, length).
    type Accesses = Arc<Mutex<Vec<(u64, usize)>>>;

    /// A function with a 4 KiB BAR0 that records BAR accesses.
    struct Probe {
        config: ConfigSpace,
        accesses: Accesses,
    }

    impl PciFunction for Probe {
        fn read_config(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data)
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data)
        }
        fn bar_windows(&self) -> Vec<BarWindow> {
            self.config.bar0_window().into_iter().collect()
        }
        fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
            self.accesses.lock().unwrap().push((offset, data.len()));
            data.fill(0x5a);
        }
        fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
            self.accesses.lock().unwrap().push((offset, data.len()));
        }
    }

    fn probe(base: u32) -> (Box<Probe>, Accesses) {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1af4,
            device: 0x1041,
            ..HOST_BRIDGE_IDS
        });
        config.set_bar0(0x1000, base);
        let accesses = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(Probe {
                config,
                accesses: accesses.clone(),
            }),
            accesses,
        )
    }

    fn address(device: u32, register: u32) -> [u8; 4] {
        (CONFIG_ENABLE | device << 11 | register).to_le_bytes()
    }

    fn config_read32(bus: &mut PciBus, device: u32, register: u32) -> u32 {
        bus.pio_write(CONFIG_ADDRESS_PORT, &address(device, register));
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_DATA_PORT, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn linuxs_type1_probe_finds_the_host_bridge() {
        let mut bus = PciBus::default();
        // pci_check_type1: a byte to 0xcfb must not latch; a dword reads back.
        bus.pio_write(0xcfb, &[1]);
        bus.pio_write(CONFIG_ADDRESS_PORT, &CONFIG_ENABLE.to_le_bytes());
        let mut b = [0u8; 4];
        bus.pio_read(CONFIG_ADDRESS_PORT, &mut b);
        assert_eq!(u32::from_le_bytes(b), CONFIG_ENABLE);
        // pci_sanity_check: a host bridge class on bus 0.
        assert_eq!(config_read32(&mut bus, 0, 0), 0x0008_1b36);
        assert_eq!(config_read32(&mut bus, 0, 8) >> 8, 0x06_00_00);
        // Nothing at device 1, functions 1-7, or bus 1.
        assert_eq!(config_read32(&mut bus, 1, 0), u32::MAX);
        bus.pio_write(CONFIG_ADDRESS_PORT, &(CONFIG_ENABLE | 1 << 8).to_le_bytes());
        bus.pio_read(CONFIG_DATA_PORT, &mut b);
        assert_eq!(b, [0xff; 4]);
        bus.pio_write(
            CONFIG_ADDRESS_PORT,
            &(CONFIG_ENABLE | 1 << 16).to_le_bytes(),
        );
        bus.pio_read(CONFIG_DATA_PORT, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Without the enable bit nothing answers.
        bus.pio_write(CONFIG_ADDRESS_PORT, &0u32.to_le_bytes());
        bus.pio_read(CONFIG_DATA_PORT, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_lanes_reach_the_register_bytes() {
        let mut bus = PciBus::default();
        bus.pio_write(CONFIG_ADDRESS_PORT, &address(0, 0));
        let mut w = [0u8; 2];
        bus.pio_read(CONFIG_DATA_PORT + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008, "device ID through lane 2");
        let mut byte = [0u8];
        bus.pio_read(CONFIG_DATA_PORT + 1, &mut byte);
        assert_eq!(byte, [0x1b]);
        // A word through lane 3 would cross the dword: refused.
        bus.pio_read(CONFIG_DATA_PORT + 3, &mut w);
        assert_eq!(w, [0xff; 2]);
    }

    #[test]
    fn functions_get_device_numbers_and_their_bars_decode_where_the_guest_puts_them() {
        let mut bus = PciBus::default();
        let (a, a_log) = probe(0xe000_0000);
        let (b, b_log) = probe(0xe000_1000);
        assert_eq!(bus.add(a), Ok(1));
        assert_eq!(bus.add(b), Ok(2));
        assert_eq!(config_read32(&mut bus, 2, 0), 0x1041_1af4);
        let mut d = [0u8; 4];
        assert!(bus.mmio_read(0xe000_1010, &mut d));
        assert_eq!(d, [0x5a; 4]);
        assert!(bus.mmio_write(0xe000_0ffc, &[0; 4]));
        assert!(!bus.mmio_write(0xe000_0ffe, &[0; 4]), "straddles two BARs");
        assert!(!bus.mmio_read(0xe000_2000, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert_eq!(bus.locate(0xe000_1010, 4), Some((2, 0, 0x10)));
        assert_eq!(bus.locate(0xe000_0ffc, 4), Some((1, 0, 0xffc)));
        assert_eq!(bus.locate(0xe000_0ffe, 4), None, "straddles two BARs");
        // The guest moves device 2's BAR: the old place goes dark, the new one answers.
        bus.pio_write(CONFIG_ADDRESS_PORT, &address(2, 0x10));
        bus.pio_write(CONFIG_DATA_PORT, &0xe000_8000u32.to_le_bytes());
        assert!(!bus.mmio_write(0xe000_1000, &[0; 4]));
        assert!(bus.mmio_write(0xe000_8004, &[0; 4]));
        assert_eq!(bus.locate(0xe000_8004, 4), Some((2, 0, 4)));
        assert_eq!(bus.locate(0xe000_1000, 4), None);
        // Memory decoding off: silent.
        bus.pio_write(CONFIG_ADDRESS_PORT, &address(2, 0x04));
        bus.pio_write(CONFIG_DATA_PORT, &[0, 0]);
        assert!(!bus.mmio_write(0xe000_8004, &[0; 4]));
        assert_eq!(*a_log.lock().unwrap(), vec![(0xffc, 4)]);
        assert_eq!(*b_log.lock().unwrap(), vec![(0x10, 4), (4, 4)]);
    }

    #[test]
    fn the_bus_fills_up() {
        let mut bus = PciBus::default();
        for n in 1..DEVICES_PER_BUS {
            assert_eq!(bus.next_device(), Some(u8::try_from(n).unwrap()));
            bus.add(Box::new(HostBridge::default())).unwrap();
        }
        assert_eq!(bus.next_device(), None);
        assert_eq!(
            bus.add(Box::new(HostBridge::default())),
            Err(PciBusError::Full)
        );
    }
}
