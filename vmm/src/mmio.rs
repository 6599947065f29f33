//! The MMIO bus: which device answers a guest-physical address outside RAM. vCPU MMIO
//! exits are dispatched here; an address no device claims reads as all ones and
//! swallows writes, like an empty bus.

use std::sync::{Arc, Mutex};

/// A device with a window of guest-physical addresses.
pub trait MmioDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the device's window.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the device's window.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever set it up.
pub type SharedMmioDevice = Arc<Mutex<dyn MmioDevice>>;

/// Errors placing a device on the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MmioBusError {
    /// The window is empty or wraps around the address space.
    #[error("MMIO window {base:#x}+{len:#x} is empty or wraps")]
    BadWindow {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The window overlaps one already on the bus.
    #[error("MMIO window {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Window {
    base: u64,
    len: u64,
    device: SharedMmioDevice,
}

/// The devices on the bus, by window.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    /// Puts `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: SharedMmioDevice,
    ) -> Result<(), MmioBusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(MmioBusError::BadWindow { base, len })?;
        if self
            .windows
            .iter()
            .any(|w| base < w.base + w.len && w.base < end)
        {
            return Err(MmioBusError::Overlap { base, len });
        }
        self.windows.push(Window { base, len, device });
        Ok(())
    }

    /// The device whose window holds the whole access, and the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedMmioDevice, u64)> {
        self.windows.iter().find_map(|w| {
            let offset = addr.checked_sub(w.base)?;
            let last = offset.checked_add(size as u64)?;
            (last <= w.len).then_some((&w.device, offset))
        })
    }

    /// Dispatches a guest read.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((device, offset)) => device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a guest write.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((device, offset)) = self.find(addr, data.len()) {
            device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl MmioDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_window_with_offsets() {
        let mut bus = MmioBus::default();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0xd000_0000, 0x1000, a.clone()).unwrap();
        bus.insert(0xd000_1000, 0x1000, b.clone()).unwrap();
        bus.write(0xd000_0070, &[1, 2, 3, 4]);
        bus.write(0xd000_1050, &[9]);
        let mut data = [0u8; 4];
        bus.read(0xd000_1008, &mut data);
        assert_eq!(data, [8; 4]);
        assert_eq!(a.lock().unwrap().writes, vec![(0x70, vec![1, 2, 3, 4])]);
        assert_eq!(b.lock().unwrap().writes, vec![(0x50, vec![9])]);
    }

    #[test]
    fn unclaimed_and_straddling_accesses_hit_an_empty_bus() {
        let mut bus = MmioBus::default();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        let mut data = [0u8; 4];
        bus.read(0x5000, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Crossing the end of a window belongs to no device.
        bus.read(0x10fe, &mut data);
        assert_eq!(data, [0xff; 4]);
        bus.write(0x10fe, &[1, 2, 3, 4]);
        bus.write(u64::MAX - 1, &[1, 2, 3, 4]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn rejects_overlaps_and_bad_windows() {
        let mut bus = MmioBus::default();
        let dev = || -> SharedMmioDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(0x1000, 0x1000, dev()).unwrap();
        assert!(matches!(
            bus.insert(0x1800, 0x1000, dev()),
            Err(MmioBusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0800, 0x1000, dev()),
            Err(MmioBusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x3000, 0, dev()),
            Err(MmioBusError::BadWindow { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(MmioBusError::BadWindow { .. })
        ));
        bus.insert(0x2000, 0x1000, dev()).unwrap();
    }
}
