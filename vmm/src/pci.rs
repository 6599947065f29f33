//! The KVM side of the virtio-pci transport: the PCI bus on the vCPUs' port and MMIO
//! exits, BAR placement, MSI-X vectors as KVM MSI routes raised through irqfds, and
//! ioeventfds on the notify area that follow BAR0 when the guest moves it.
//!
//! - **Placement** ([`PciAllocator`]): BAR0 of each device from `vm-allocator`'s
//!   address allocator over the PCI memory window ([`layout::PCI_MMIO_START`], what
//!   the host bridge's `_CRS` offers the guest); one GSI per MSI-X vector from its ID
//!   allocator, above the IO-APIC's 24 pins.
//! - **MSI-X** ([`KvmMsiDelivery`], [`GsiRouter`]): each vector has a GSI and an irqfd
//!   registered on it. When the guest writes a table entry the GSI's route becomes an
//!   MSI route with that address and data (`KVM_SET_GSI_ROUTING`, which replaces the
//!   whole table, so the router keeps KVM's default IO-APIC/PIC routes in it too).
//!   Masking is decided in the device model (`zc_devices::pci::msix`): a masked vector
//!   is never written to its irqfd, it sets its pending bit instead.
//! - **Notifications** ([`PciVirtioFunction`]): one ioeventfd per queue on that
//!   queue's notify address, any access width (no datamatch), so a notify wakes the
//!   queue's thread in the kernel without a vCPU exit. After each configuration write
//!   (BAR move, memory decoding off or on) they are moved to where BAR0 now decodes.
//!
//! Why not `vm-device`'s bus: the VMM has its own small MMIO bus (`crate::mmio`) that
//! the MMIO transport and the run loop share; the PCI bus itself
//! (`zc_devices::pci::bus`) decodes BARs where the guest puts them, which a static
//! range-to-device map cannot do without re-registering on every BAR write. So one
//! window for the whole PCI memory range goes on the MMIO bus, and the PCI bus decodes
//! inside it.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;
use zc_devices::pci::bus::PciBus;
use zc_devices::pci::msix::{MsiDelivery, MsiMessage};
use zc_devices::pci::{BarWindow, PciFunction};
use zc_devices::virtio::pci::{PciTransport, BAR0_SIZE};
use zc_devices::virtio::VirtioDevice;

use crate::layout;
use crate::mmio::MmioDevice;

/// First GSI of MSI vectors: the IO-APIC's pins are 0-23.
pub const FIRST_MSI_GSI: u32 = 24;
/// Last GSI handed to MSI vectors (KVM allows 4096 routes).
pub const LAST_MSI_GSI: u32 = 1023;
/// GSIs KVM routes to the PIC and IO-APIC by default (the in-kernel irqchip's
/// `default_routing`): 0-15 to both, 16-23 to the IO-APIC only.
const IRQCHIP_GSIS: u32 = 24;

/// Errors placing a device on the PCI bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// The PCI memory window or the GSIs ran out.
    #[error("PCI {what}: {source}")]
    Allocate {
        /// What could not be allocated.
        what: &'static str,
        /// Why.
        source: vm_allocator::Error,
    },
    /// The bus is full.
    #[error(transparent)]
    Bus(#[from] zc_devices::pci::bus::PciBusError),
    /// A KVM call failed.
    #[error("KVM {what} for a PCI device failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be made.
    #[error("PCI device eventfd: {0}")]
    Host(#[from] io::Error),
}

/// Hands out BAR0 addresses in the PCI window and GSIs for MSI vectors. Free of KVM.
#[derive(Debug)]
pub struct PciAllocator {
    mmio: AddressAllocator,
    gsis: IdAllocator,
}

impl Default for PciAllocator {
    fn default() -> Self {
        PciAllocator {
            mmio: AddressAllocator::new(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE)
                .expect("the PCI window is a valid range"),
            gsis: IdAllocator::new(FIRST_MSI_GSI, LAST_MSI_GSI)
                .expect("the MSI GSIs are a valid range"),
        }
    }
}

impl PciAllocator {
    /// A virtio-pci BAR0: naturally aligned, as BARs must be.
    pub fn bar0(&mut self) -> Result<u32, PciError> {
        let size = u64::from(BAR0_SIZE);
        let range = self
            .mmio
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map_err(|source| PciError::Allocate {
                what: "memory window is full",
                source,
            })?;
        Ok(u32::try_from(range.start())
            .expect("the window lies below 4 GiB (layout's compile-time checks)"))
    }

    /// `count` GSIs for MSI vectors.
    pub fn gsis(&mut self, count: u16) -> Result<Vec<u32>, PciError> {
        (0..count)
            .map(|_| {
                self.gsis
                    .allocate_id()
                    .map_err(|source| PciError::Allocate {
                        what: "MSI GSIs ran out",
                        source,
                    })
            })
            .collect()
    }
}

/// The VM's GSI routing table: KVM's default irqchip routes plus one MSI route per
/// vector the guest has programmed.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRouter {
    /// A router for `vm`, with only the default routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// Routes `gsi` to `message` and installs the whole table.
    pub fn set_msi(&self, gsi: u32, message: MsiMessage) -> io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        msi.insert(gsi, message);
        let entries = routing_entries(&msi);
        let mut table = KvmIrqRouting::new(0).map_err(|e| io::Error::other(format!("{e:?}")))?;
        for entry in entries {
            table
                .push(entry)
                .map_err(|e| io::Error::other(format!("too many GSI routes: {e:?}")))?;
        }
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// The routing table: the irqchip's defaults, then the MSI routes.
fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        entry.u.irqchip.irqchip = chip;
        entry.u.irqchip.pin = pin;
        entry
    };
    let mut entries = Vec::new();
    for gsi in 0..IRQCHIP_GSIS {
        if gsi < 8 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (&gsi, message) in msi {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        // The guest's 64-bit message address, in KVM's two halves.
        entry.u.msi.address_lo =
            u32::try_from(message.address & 0xffff_ffff).expect("masked to 32 bits");
        entry.u.msi.address_hi = (message.address >> 32) as u32;
        entry.u.msi.data = message.data;
        entries.push(entry);
    }
    entries
}

/// MSI-X vectors of one device: a GSI and an irqfd each.
pub struct KvmMsiDelivery {
    router: Arc<GsiRouter>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl KvmMsiDelivery {
    /// Registers an irqfd on each of `gsis` (one per vector).
    pub fn new(vm: &VmFd, router: Arc<GsiRouter>, gsis: Vec<u32>) -> Result<Self, PciError> {
        let mut irqfds = Vec::with_capacity(gsis.len());
        for &gsi in &gsis {
            let fd = EventFd::new(0)?;
            vm.register_irqfd(&fd, gsi)
                .map_err(|source| PciError::Kvm {
                    what: "KVM_IRQFD",
                    source,
                })?;
            irqfds.push(fd);
        }
        Ok(KvmMsiDelivery {
            router,
            gsis,
            irqfds,
        })
    }
}

impl MsiDelivery for KvmMsiDelivery {
    fn set_route(&self, vector: u16, message: MsiMessage) -> io::Result<()> {
        match self.gsis.get(usize::from(vector)) {
            Some(&gsi) => self.router.set_msi(gsi, message),
            None => Ok(()),
        }
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        match self.irqfds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// A virtio-pci function on the bus: the transport, and its queues' ioeventfds kept
/// on the notify addresses BAR0 decodes now.
pub struct PciVirtioFunction<D: VirtioDevice> {
    transport: Arc<Mutex<PciTransport<D>>>,
    vm: Arc<VmFd>,
    notify: Vec<EventFd>,
    registered: Vec<(u16, u64)>,
}

impl<D: VirtioDevice> PciVirtioFunction<D> {
    /// Wraps `transport`, whose queue `n` wakes `notify[n]`, and registers the
    /// ioeventfds at BAR0's current place.
    pub fn new(
        transport: Arc<Mutex<PciTransport<D>>>,
        vm: Arc<VmFd>,
        notify: Vec<EventFd>,
    ) -> Self {
        let mut function = PciVirtioFunction {
            transport,
            vm,
            notify,
            registered: Vec::new(),
        };
        function.follow_bar();
        function
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PciTransport<D>> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the ioeventfds to the notify addresses BAR0 decodes now (none while
    /// decoding is off, or while the guest has put BAR0 outside the PCI window, where
    /// an ioeventfd could shadow another device). A registration KVM refuses leaves
    /// that queue on the slower path: its notify exits to the VMM, which serves it.
    fn follow_bar(&mut self) {
        let window = layout::PCI_MMIO_START..layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE;
        let wanted: Vec<(u16, u64)> = self
            .lock()
            .notify_addresses()
            .into_iter()
            .filter(|(_, addr)| window.contains(addr))
            .collect();
        if wanted == self.registered {
            return;
        }
        for (queue, addr) in std::mem::take(&mut self.registered) {
            if let Some(fd) = self.notify.get(usize::from(queue)) {
                let _ = self
                    .vm
                    .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch);
            }
        }
        for (queue, addr) in wanted {
            let Some(fd) = self.notify.get(usize::from(queue)) else {
                continue;
            };
            match self
                .vm
                .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            {
                Ok(()) => self.registered.push((queue, addr)),
                Err(e) => eprintln!(
                    "zc-vmm: no ioeventfd for virtio-pci queue {queue} at {addr:#x} ({e}); its notifications exit to the VMM"
                ),
            }
        }
    }
}

impl<D: VirtioDevice + 'static> PciFunction for PciVirtioFunction<D> {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.lock().read_config(offset, data)
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.lock().write_config(offset, data);
        self.follow_bar();
    }

    fn bar_windows(&self) -> Vec<BarWindow> {
        self.lock().bar_windows()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        self.lock().read_bar(bar, offset, data)
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.lock().write_bar(bar, offset, data)
    }
}

/// The VM's PCI side while devices are attached: the bus, what places them, and the
/// GSI routing table their MSI-X vectors go through.
pub struct PciState {
    /// Bus 0.
    pub bus: Arc<Mutex<PciBus>>,
    /// BAR and GSI placement.
    pub allocator: PciAllocator,
    /// The routing table.
    pub router: Arc<GsiRouter>,
}

impl PciState {
    /// An empty bus (the host bridge only) for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        PciState {
            bus: Arc::new(Mutex::new(PciBus::default())),
            allocator: PciAllocator::default(),
            router: Arc::new(GsiRouter::new(vm)),
        }
    }
}

/// The PCI memory window on the MMIO bus: every access in it goes to the PCI bus,
/// which finds the BAR that holds it.
pub struct PciMmioWindow {
    /// The bus.
    pub bus: Arc<Mutex<PciBus>>,
}

impl MmioDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let addr = layout::PCI_MMIO_START + offset;
        self.bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mmio_read(addr, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let addr = layout::PCI_MMIO_START + offset;
        self.bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mmio_write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_aligned_in_the_window_and_gsis_start_above_the_io_apic() {
        let mut allocator = PciAllocator::default();
        let a = allocator.bar0().unwrap();
        let b = allocator.bar0().unwrap();
        assert_eq!(u64::from(a), layout::PCI_MMIO_START);
        assert_eq!(b, a + BAR0_SIZE);
        assert!(b.is_multiple_of(BAR0_SIZE));
        assert_eq!(allocator.gsis(3).unwrap(), vec![24, 25, 26]);
        assert_eq!(allocator.gsis(1).unwrap(), vec![27]);
        // The window holds 8192 BARs of 32 KiB, and no more.
        let room = usize::try_from(layout::PCI_MMIO_SIZE / u64::from(BAR0_SIZE)).unwrap();
        for _ in 2..room {
            allocator.bar0().unwrap();
        }
        assert!(allocator.bar0().is_err());
    }

    #[test]
    fn the_routing_table_keeps_the_irqchip_defaults_beside_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(
            24,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        let entries = routing_entries(&msi);
        // 16 PIC + 24 IO-APIC routes, as KVM sets up by default, then the MSI one.
        assert_eq!(entries.len(), 16 + 24 + 1);
        let ioapic: Vec<u32> = entries
            .iter()
            .filter(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries carry the irqchip member of the union.
            .filter(|e| unsafe { e.u.irqchip.irqchip } == KVM_IRQCHIP_IOAPIC)
            .map(|e| e.gsi)
            .collect();
        assert_eq!(ioapic, (0..24).collect::<Vec<_>>());
        let last = entries.last().unwrap();
        assert_eq!((last.gsi, last.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member of the union.
        let m = unsafe { last.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
