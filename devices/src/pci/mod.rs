//! A conventional PCI bus for the virtio-pci transport, without KVM.
//!
//! - [`config::ConfigSpace`]: a function's 256-byte type-0 configuration header with
//!   its writable bits, one 32-bit memory BAR and a capability list;
//! - [`msix::Msix`]: an MSI-X table and pending-bit array, with per-vector and
//!   function masking; messages go out through an [`msix::MsiDelivery`] (KVM MSI
//!   routes and irqfds in the VMM, a recorder in tests);
//! - [`bus::PciBus`]: bus 0 behind the PC's type-1 configuration mechanism (ports
//!   `0xcf8`/`0xcfc`), a host bridge at 00:00.0, and the decoding of guest MMIO
//!   accesses to whichever function's BAR holds them, wherever the guest put it.
//!
//! Why this is written here rather than taken from a crate: rust-vmm has no published
//! PCI crate (`vm-pci` was never released), and Cloud Hypervisor's and Firecracker's
//! `pci` crates live inside those projects, tied to their bus, interrupt and snapshot
//! types. What zc needs is one header type, one BAR and a short capability list, so
//! the header is a byte array with a mask of writable bits, checked by unit tests
//! against the PCI Local Bus spec 3.0 (sections 6.1-6.8) and the virtio 1.2 spec
//! (section 4.1).

pub mod bus;
pub mod config;
pub mod msix;

/// A PCI function as the bus sees it: its configuration space and the BARs it
/// decodes. Offsets are checked by the caller to lie in the 256-byte space and
/// within one naturally aligned 1-, 2- or 4-byte access.
pub trait PciFunction: Send {
    /// A configuration-space read of `data.len()` bytes at `offset`.
    fn read_config(&mut self, offset: usize, data: &mut [u8]);
    /// A configuration-space write.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The memory BARs the function decodes now, as the guest programmed them:
    /// empty while memory decoding is off.
    fn bar_windows(&self) -> Vec<BarWindow>;
    /// A read of `data.len()` bytes at `offset` into memory BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write into memory BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// A memory BAR at the address the guest gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWindow {
    /// The BAR's index (0 to 5).
    pub bar: usize,
    /// Guest-physical base.
    pub base: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

impl BarWindow {
    /// The offset of `addr..addr+len` in this window, if the window holds all of it.
    pub fn offset_of(&self, addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(self.base)?;
        let end = offset.checked_add(len as u64)?;
        (end <= self.size).then_some(offset)
    }
}

/// Whether a configuration access of `len` bytes at `offset` is one the bus
/// forwards: 1, 2 or 4 bytes, naturally aligned, inside the 256-byte space.
pub fn config_access_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && offset.is_multiple_of(len)
        && offset + len <= config::CONFIG_SPACE_SIZE
}
