//! Plugging a virtio device into the VM, behind either transport.
//!
//! - virtio-mmio ([`attach`]): a slot from the [`SlotAllocator`] (its window, its GSI
//!   and its place in the DSDT), the window on the MMIO bus, an irqfd for its
//!   interrupt, and one ioeventfd per queue.
//! - virtio-pci ([`attach_pci`]): a device number on the PCI bus, BAR0 and one GSI per
//!   MSI-X vector from the [`crate::pci::PciAllocator`], and one ioeventfd per queue
//!   on its notify address ([`crate::pci`]).
//!
//! Either way a queue notification wakes a device thread instead of stopping the
//! vCPU, and the VMM reaches the device afterwards through a [`DeviceHandle`],
//! whatever the transport.

use std::sync::{Arc, Mutex};
use std::thread;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use zc_devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use zc_devices::virtio::pci::PciTransport;
use zc_devices::virtio::{VirtioDevice, VirtioTransport};

use crate::acpi::MmioDeviceInfo;
use crate::layout;
use crate::mmio::{MmioBus, MmioDevice};
use crate::pci::{KvmMsiDelivery, PciError, PciState, PciVirtioFunction};

/// GSI of virtio slot 0; slot `n` uses `FIRST_GSI + n`. Below it: the PIT, the
/// keyboard controller and the two UARTs.
pub const FIRST_GSI: u32 = 5;
/// How many slots the IO-APIC's 24 pins leave us.
pub const MAX_SLOTS: u32 = 24 - FIRST_GSI;

/// A device's transport, shared by the bus, its queue threads and the VMM.
pub type SharedTransport<D> = Arc<Mutex<dyn VirtioTransport<D>>>;

/// Errors attaching a device.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No slot left.
    #[error("too many virtio devices: at most {MAX_SLOTS}")]
    NoSlot,
    /// A KVM call failed.
    #[error("KVM {what} for virtio slot {slot} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The slot.
        slot: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// An eventfd or thread could not be made.
    #[error("virtio slot {slot}: {source}")]
    Host {
        /// The slot.
        slot: u32,
        /// Why.
        source: std::io::Error,
    },
    /// The slot's window is taken (a layout bug).
    #[error(transparent)]
    Bus(#[from] crate::mmio::MmioBusError),
    /// The PCI bus, window or GSIs could not take the device.
    #[error(transparent)]
    Pci(#[from] PciError),
}

impl<D: VirtioDevice + 'static> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// One virtio-mmio slot: its index, register window and interrupt, which is also what
/// the ACPI tables say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioSlot {
    /// The slot's number, in the order the guest numbers the devices.
    pub index: u32,
    /// Window and GSI, as the DSDT describes them.
    pub info: MmioDeviceInfo,
}

/// Hands out virtio-mmio slots in attach order: slot `n` gets the `n`-th window and
/// GSI `FIRST_GSI + n`, and is the `n`-th device the DSDT lists. Free of KVM, so the
/// placement is testable on its own.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    taken: Vec<MmioDeviceInfo>,
}

impl SlotAllocator {
    /// The next free slot.
    pub fn allocate(&mut self) -> Result<VirtioSlot, AttachError> {
        let index = u32::try_from(self.taken.len()).map_err(|_| AttachError::NoSlot)?;
        if index >= MAX_SLOTS {
            return Err(AttachError::NoSlot);
        }
        let info = MmioDeviceInfo {
            base: layout::virtio_mmio_slot(index).0,
            size: layout::VIRTIO_MMIO_SIZE,
            irq: FIRST_GSI + index,
        };
        self.taken.push(info);
        Ok(VirtioSlot { index, info })
    }

    /// Every slot handed out, in order: the devices the ACPI tables describe.
    pub fn acpi_devices(&self) -> Vec<MmioDeviceInfo> {
        self.taken.clone()
    }
}

/// A way to reach an attached device, whatever transport it sits behind.
pub struct DeviceHandle<D: VirtioDevice>(SharedTransport<D>);

impl<D: VirtioDevice> Clone for DeviceHandle<D> {
    fn clone(&self) -> Self {
        DeviceHandle(self.0.clone())
    }
}

impl<D: VirtioDevice> DeviceHandle<D> {
    /// What the device offered and what its driver acked, by name.
    pub fn features(&self) -> crate::report::DeviceFeatures {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        crate::report::DeviceFeatures::new(
            t.device().device_type(),
            t.device_features(),
            t.negotiated_features(),
        )
    }

    /// Runs `f` on the device, holding the transport's lock (a vCPU touching the
    /// device's registers meanwhile waits).
    pub fn with<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut())
    }
}

/// Attaches `device` behind virtio-mmio in `slot`: its window on `bus`, an irqfd for
/// its GSI and one ioeventfd (and thread) per queue.
pub fn attach<D: VirtioDevice + 'static>(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut MmioBus,
    slot: VirtioSlot,
    device: D,
) -> Result<DeviceHandle<D>, AttachError> {
    let VirtioSlot { index: slot, info } = slot;
    let base = info.base;
    let host = |source| AttachError::Host { slot, source };
    let kvm = |what| move |source| AttachError::Kvm { what, slot, source };

    let irq = EventFd::new(0).map_err(host)?;
    vm.register_irqfd(&irq, info.irq)
        .map_err(kvm("KVM_IRQFD"))?;
    let queues = u16::try_from(device.queue_max_sizes().len()).expect("a device has a few queues");
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        Arc::new(irq),
    )));
    bus.insert(base, info.size, transport.clone())?;

    let mut notify = Vec::new();
    for queue in 0..queues {
        let fd = EventFd::new(0).map_err(host)?;
        vm.register_ioevent(
            &fd,
            &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
            u32::from(queue),
        )
        .map_err(kvm("KVM_IOEVENTFD"))?;
        notify.push(fd);
    }
    let shared: SharedTransport<D> = transport;
    spawn_queue_threads(&format!("virtio{slot}"), notify, &shared).map_err(host)?;
    Ok(DeviceHandle(shared))
}

/// One thread per queue, each waiting on its notify eventfd and handing the wake-up
/// to the transport. The threads live as long as the process: the VM is torn down
/// by exiting.
fn spawn_queue_threads<D: VirtioDevice + 'static>(
    name: &str,
    notify: Vec<EventFd>,
    transport: &SharedTransport<D>,
) -> std::io::Result<()> {
    for (queue, fd) in (0u32..).zip(notify) {
        let transport = transport.clone();
        thread::Builder::new()
            .name(format!("{name}-q{queue}"))
            .spawn(move || {
                zc_seccomp::enter(zc_seccomp::Role::VirtioQueue);
                while fd.read().is_ok() {
                    transport
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .notify_queue(queue);
                }
            })?;
    }
    Ok(())
}

/// Attaches `device` behind virtio-pci: the next device number on `pci`'s bus, BAR0
/// in the PCI window, one GSI and irqfd per MSI-X vector (the configuration change
/// and each queue), and one ioeventfd (and thread) per queue on its notify address.
pub fn attach_pci<D: VirtioDevice + 'static>(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    pci: &mut PciState,
    device: D,
) -> Result<DeviceHandle<D>, AttachError> {
    let number = pci
        .bus
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .next_device()
        .ok_or(PciError::Bus(zc_devices::pci::bus::PciBusError::Full))?;
    let slot = u32::from(number);
    let host = |source| AttachError::Host { slot, source };
    let queues = device.queue_max_sizes().len();
    let vectors = u16::try_from(queues + 1).unwrap_or(u16::MAX);
    let bar0 = pci.allocator.bar0()?;
    let gsis = pci.allocator.gsis(vectors)?;
    let delivery = KvmMsiDelivery::new(vm, pci.router.clone(), gsis)?;
    let transport = Arc::new(Mutex::new(PciTransport::new(
        device,
        mem.clone(),
        bar0,
        Arc::new(delivery),
    )));
    let mut threads_side = Vec::with_capacity(queues);
    let mut bus_side = Vec::with_capacity(queues);
    for _ in 0..queues {
        let fd = EventFd::new(0).map_err(host)?;
        bus_side.push(fd.try_clone().map_err(host)?);
        threads_side.push(fd);
    }
    let function = PciVirtioFunction::new(transport.clone(), vm.clone(), bus_side);
    pci.bus
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(Box::new(function))
        .map_err(PciError::Bus)?;
    let shared: SharedTransport<D> = transport;
    spawn_queue_threads(&format!("virtio-pci{slot}"), threads_side, &shared).map_err(host)?;
    Ok(DeviceHandle(shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_and_two_nics_get_three_slots_in_attach_order() {
        let mut slots = SlotAllocator::default();
        let disk = slots.allocate().unwrap();
        let nic0 = slots.allocate().unwrap();
        let nic1 = slots.allocate().unwrap();
        assert_eq!(
            [disk.index, nic0.index, nic1.index],
            [0, 1, 2],
            "the guest numbers devices in attach order"
        );
        assert_eq!(
            [disk.info.irq, nic0.info.irq, nic1.info.irq],
            [FIRST_GSI, FIRST_GSI + 1, FIRST_GSI + 2]
        );
        assert_eq!(disk.info.base, layout::VIRTIO_MMIO_BASE);
        assert_eq!(nic0.info.base, disk.info.base + layout::VIRTIO_MMIO_SIZE);
        assert_eq!(nic1.info.base, nic0.info.base + layout::VIRTIO_MMIO_SIZE);
        assert_eq!(slots.acpi_devices(), vec![disk.info, nic0.info, nic1.info]);
        // The windows fit on one bus side by side.
        let mut bus = MmioBus::default();
        for info in slots.acpi_devices() {
            let device: crate::mmio::SharedMmioDevice = Arc::new(Mutex::new(Nothing));
            bus.insert(info.base, info.size, device).unwrap();
        }
    }

    #[test]
    fn slots_run_out_below_the_io_apics_last_pin() {
        let mut slots = SlotAllocator::default();
        for _ in 0..MAX_SLOTS {
            let slot = slots.allocate().unwrap();
            assert!(slot.info.irq < 24);
            assert!(slot.info.base + slot.info.size <= layout::IOAPIC_ADDR);
        }
        assert!(matches!(slots.allocate(), Err(AttachError::NoSlot)));
        assert_eq!(slots.acpi_devices().len(), MAX_SLOTS as usize);
    }

    struct Nothing;

    impl MmioDevice for Nothing {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }
}
