//! Plugging a virtio device into the VM: its virtio-mmio window on the MMIO bus, an
//! irqfd for its interrupt, one ioeventfd per queue so that a queue notification
//! wakes a device thread instead of stopping the vCPU, and the ACPI description that
//! lets a stock kernel find it.

use std::sync::{Arc, Mutex};
use std::thread;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use zc_devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use zc_devices::virtio::VirtioDevice;

use crate::acpi::MmioDeviceInfo;
use crate::layout;
use crate::mmio::{MmioBus, MmioDevice};

/// GSI of virtio slot 0; slot `n` uses `FIRST_GSI + n`. Below it: the PIT, the
/// keyboard controller and the two UARTs.
pub const FIRST_GSI: u32 = 5;
/// How many slots the IO-APIC's 24 pins leave us.
pub const MAX_SLOTS: u32 = 24 - FIRST_GSI;

/// A device's transport, shared by the MMIO bus, its queue threads and the VMM.
pub type SharedTransport<D> = Arc<Mutex<MmioTransport<D>>>;

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
}

impl<D: VirtioDevice + 'static> MmioDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// Attaches `device` as virtio-mmio slot `slot`. Returns the shared transport (to
/// reach the device later) and what the ACPI tables must say about it.
pub fn attach<D: VirtioDevice + 'static>(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    bus: &mut MmioBus,
    slot: u32,
    device: D,
) -> Result<(SharedTransport<D>, MmioDeviceInfo), AttachError> {
    if slot >= MAX_SLOTS {
        return Err(AttachError::NoSlot);
    }
    let base = layout::virtio_mmio_slot(slot).0;
    let gsi = FIRST_GSI + slot;
    let host = |source| AttachError::Host { slot, source };
    let kvm = |what| move |source| AttachError::Kvm { what, slot, source };

    let irq = EventFd::new(0).map_err(host)?;
    vm.register_irqfd(&irq, gsi).map_err(kvm("KVM_IRQFD"))?;
    let queues = device.queue_max_sizes().len() as u16;
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        mem.clone(),
        Arc::new(irq),
    )));
    bus.insert(base, layout::VIRTIO_MMIO_SIZE, transport.clone())?;

    for queue in 0..queues {
        let notify = EventFd::new(0).map_err(host)?;
        vm.register_ioevent(
            &notify,
            &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
            u32::from(queue),
        )
        .map_err(kvm("KVM_IOEVENTFD"))?;
        let transport = transport.clone();
        // The thread lives as long as the process: the VM is torn down by exiting.
        thread::Builder::new()
            .name(format!("virtio{slot}-q{queue}"))
            .spawn(move || {
                while notify.read().is_ok() {
                    transport
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .notify_queue(u32::from(queue));
                }
            })
            .map_err(host)?;
    }
    Ok((
        transport,
        MmioDeviceInfo {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            irq: gsi,
        },
    ))
}
