//! The modern virtio-pci transport (virtio 1.2, section 4.1), without KVM.
//!
//! One PCI function per device: vendor 0x1af4, device 0x1040 + the virtio device
//! type, revision 1 (non-transitional), and a 32 KiB 32-bit memory BAR0 laid out as
//!
//! | BAR0 offset | what | capability |
//! |---|---|---|
//! | 0x0000 | common configuration (0x38 bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | 0x1000 | ISR status (1 byte, read clears) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | 0x2000 | device configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | 0x3000 | queue notify: queue *n* at 0x3000 + 4*n | `VIRTIO_PCI_CAP_NOTIFY_CFG`, multiplier 4 |
//! | 0x4000 | MSI-X table: vector 0 configuration, 1+*n* queue *n* | MSI-X |
//! | 0x5000 | MSI-X pending-bit array | MSI-X |
//!
//! plus a `VIRTIO_PCI_CAP_PCI_CFG` window (the spec asks for one) through which the
//! BAR can be reached from configuration space.
//!
//! Why a 32-bit BAR: the VMM's PCI memory window lies in the 32-bit device hole under
//! 4 GiB, next to the virtio-mmio slots, whatever the guest's RAM size; a 64-bit BAR
//! would need a second window above RAM that moves with `--mem`, for nothing gained.
//! Each region gets its own 4 KiB page so a guest (or a VMM) could map them apart.
//!
//! The virtio state machine (feature negotiation, device status, queue setup,
//! activation, notifications, reset) is [`MmioTransport`]'s, reused as it is: the
//! common configuration structure is the virtio-mmio register file in another layout
//! (4.1.4.3 against 4.2.2), so the device models see exactly the same calls, in the
//! same states, on both transports, and a transport cannot change a verdict. What is
//! PCI's own lives here: the configuration space and its capabilities, the MSI-X
//! vectors the driver picks for the configuration change and for each queue, the ISR
//! register, and the notify area.
//!
//! Queue notifications: the VMM registers an ioeventfd on each queue's notify address
//! ([`PciTransport::notify_addresses`], which follow BAR0 wherever the guest moves
//! it), so a notify reaches the device thread without a vCPU exit to the VMM; a write
//! that does reach [`PciFunction::write_bar`] is served too.

use std::io;
use std::sync::{Arc, Mutex};

use super::mmio::{reg as mmio_reg, MmioTransport, CONFIG_OFFSET};
use super::{low32, GuestMem, InterruptKind, InterruptLine, VirtioDevice};
use crate::pci::config::{ConfigSpace, PciIds};
use crate::pci::msix::{self, MsiDelivery, Msix};
use crate::pci::{BarWindow, PciFunction};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device ID of a modern virtio device: this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Revision ID of a non-transitional (modern only) device.
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// Subsystem ID: non-transitional devices should have 0x40 or above (4.1.2.1).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// "No MSI-X vector" for the configuration change or a queue.
pub const NO_VECTOR: u16 = 0xffff;

/// Size of BAR0.
pub const BAR0_SIZE: u32 = 0x8000;
/// BAR0 offset of the common configuration structure.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (virtio 1.0 fields).
pub const COMMON_CFG_LEN: u64 = 0x38;
/// BAR0 offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// BAR0 offset of the device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// BAR0 offset of the notify area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Length of the notify area.
pub const NOTIFY_LEN: u64 = 0x1000;
/// Bytes between two queues' notify addresses (`notify_off_multiplier`).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// BAR0 offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// BAR0 offset of the MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;

/// Capability ID of vendor-specific capabilities, which virtio's are.
const VENDOR_CAPABILITY: u8 = 0x09;
/// `cfg_type` values of the virtio capabilities (4.1.4).
#[allow(missing_docs)]
pub mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI: u8 = 5;
}

/// Offsets in the common configuration structure (4.1.4.3).
#[allow(missing_docs)]
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

/// The field at a common-configuration offset: its width and what it maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommonField {
    /// A field with the same meaning as this virtio-mmio register.
    Mmio(u64),
    DeviceFeatureSelect,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    QueueSelect,
    QueueMsixVector,
    QueueNotifyOff,
}

/// The common configuration's fields: (offset, width, field).
const COMMON_FIELDS: [(u64, usize, CommonField); 19] = [
    (
        common::DEVICE_FEATURE_SELECT,
        4,
        CommonField::DeviceFeatureSelect,
    ),
    (
        common::DEVICE_FEATURE,
        4,
        CommonField::Mmio(mmio_reg::DEVICE_FEATURES),
    ),
    (
        common::DRIVER_FEATURE_SELECT,
        4,
        CommonField::DriverFeatureSelect,
    ),
    (common::DRIVER_FEATURE, 4, CommonField::DriverFeature),
    (common::CONFIG_MSIX_VECTOR, 2, CommonField::ConfigMsixVector),
    (common::NUM_QUEUES, 2, CommonField::NumQueues),
    (
        common::DEVICE_STATUS,
        1,
        CommonField::Mmio(mmio_reg::STATUS),
    ),
    (
        common::CONFIG_GENERATION,
        1,
        CommonField::Mmio(mmio_reg::CONFIG_GENERATION),
    ),
    (common::QUEUE_SELECT, 2, CommonField::QueueSelect),
    (
        common::QUEUE_SIZE,
        2,
        CommonField::Mmio(mmio_reg::QUEUE_NUM),
    ),
    (common::QUEUE_MSIX_VECTOR, 2, CommonField::QueueMsixVector),
    (
        common::QUEUE_ENABLE,
        2,
        CommonField::Mmio(mmio_reg::QUEUE_READY),
    ),
    (common::QUEUE_NOTIFY_OFF, 2, CommonField::QueueNotifyOff),
    (
        common::QUEUE_DESC_LO,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DESC_LOW),
    ),
    (
        common::QUEUE_DESC_HI,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DESC_HIGH),
    ),
    (
        common::QUEUE_DRIVER_LO,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DRIVER_LOW),
    ),
    (
        common::QUEUE_DRIVER_HI,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DRIVER_HIGH),
    ),
    (
        common::QUEUE_DEVICE_LO,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DEVICE_LOW),
    ),
    (
        common::QUEUE_DEVICE_HI,
        4,
        CommonField::Mmio(mmio_reg::QUEUE_DEVICE_HIGH),
    ),
];

/// The MSI-X vectors and the vector the driver chose for each interrupt; shared
/// between the transport (the guest's register accesses) and the interrupt line
/// (the device threads), so a device never waits for the transport's lock to
/// interrupt.
#[derive(Debug)]
pub struct PciInterrupts {
    msix: Msix,
    config_vector: u16,
    queue_vectors: Vec<u16>,
}

impl PciInterrupts {
    fn vector_for(&self, kind: InterruptKind) -> u16 {
        match kind {
            InterruptKind::Config => self.config_vector,
            InterruptKind::Queue(index) => self
                .queue_vectors
                .get(usize::from(index))
                .copied()
                .unwrap_or(NO_VECTOR),
        }
    }

    /// A vector the table has, or `NO_VECTOR` (what the driver then reads back,
    /// 4.1.5.1.2: the device could not take it).
    fn checked(&self, vector: u16) -> u16 {
        if vector < self.msix.vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }
}

/// The interrupt line of a virtio-pci device: the MSI-X vector the driver gave the
/// configuration change or the queue.
struct MsixLine(Arc<Mutex<PciInterrupts>>);

impl InterruptLine for MsixLine {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let mut interrupts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let vector = interrupts.vector_for(kind);
        interrupts.msix.signal(vector)
    }
}

/// One virtio-pci function around a [`VirtioDevice`].
pub struct PciTransport<D: VirtioDevice> {
    inner: MmioTransport<D>,
    config: ConfigSpace,
    interrupts: Arc<Mutex<PciInterrupts>>,
    msix_capability: usize,
    pci_cfg_capability: usize,
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
}

impl<D: VirtioDevice> std::fmt::Debug for PciTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciTransport")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<D: VirtioDevice> PciTransport<D> {
    /// Wraps `device`, which accesses `mem` and interrupts through `delivery`, with
    /// BAR0 at `bar0` (aligned to [`BAR0_SIZE`]) and memory decoding on.
    pub fn new(device: D, mem: GuestMem, bar0: u32, delivery: Arc<dyn MsiDelivery>) -> Self {
        let device_type = device.device_type();
        let queues = device.queue_max_sizes().len();
        // One vector for configuration changes, one per queue: Linux's preferred setup.
        let vectors = u16::try_from(queues + 1).unwrap_or(msix::MAX_VECTORS);
        let interrupts = Arc::new(Mutex::new(PciInterrupts {
            msix: Msix::new(vectors, delivery),
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
        }));
        let inner = MmioTransport::new(device, mem, Arc::new(MsixLine(interrupts.clone())));
        let mut config = ConfigSpace::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            device: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(
                u16::try_from(device_type).expect("virtio device types are small constants"),
            ),
            revision: VIRTIO_PCI_REVISION,
            class: class_of(device_type),
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.set_bar0(BAR0_SIZE, bar0);
        let (msix_body, msix_writable) = {
            let guard = interrupts.lock().unwrap_or_else(|e| e.into_inner());
            guard
                .msix
                .capability(0, bar0_u32(MSIX_TABLE_OFFSET), bar0_u32(MSIX_PBA_OFFSET))
        };
        // The layout is fixed and fits: these cannot fail (a unit test walks it).
        let mut add = |body: &[u8], writable: &[u8]| {
            config
                .add_capability(body, writable)
                .expect("the virtio-pci capabilities fit in configuration space")
        };
        let msix_capability = add(&msix_body, &msix_writable);
        add(
            &virtio_cap(cfg_type::COMMON, COMMON_CFG_OFFSET, COMMON_CFG_LEN, None),
            &[],
        );
        add(
            &virtio_cap(
                cfg_type::NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
            &[],
        );
        add(&virtio_cap(cfg_type::ISR, ISR_OFFSET, 1, None), &[]);
        add(
            &virtio_cap(cfg_type::DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN, None),
            &[],
        );
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and the data window are the
        // driver's to write (4.1.4.9).
        let mut pci_cfg_writable = [0u8; 20];
        pci_cfg_writable[4] = 0xff;
        pci_cfg_writable[8..20].fill(0xff);
        let pci_cfg_capability = add(&virtio_cap(cfg_type::PCI, 0, 0, Some(0)), &pci_cfg_writable);
        PciTransport {
            inner,
            config,
            interrupts,
            msix_capability,
            pci_cfg_capability,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        self.inner.device()
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        self.inner.device_mut()
    }

    /// The virtio state machine underneath (status, features, queues).
    pub fn virtio(&self) -> &MmioTransport<D> {
        &self.inner
    }

    /// Handles a notification of queue `index` (an ioeventfd wake-up).
    pub fn notify_queue(&mut self, index: u32) {
        self.inner.notify_queue(index)
    }

    /// The number of queues.
    pub fn queue_count(&self) -> u16 {
        // virtio's num_queues is 16 bits; the VMM's device models have one or two.
        u16::try_from(self.inner.device().queue_max_sizes().len())
            .expect("a device model has fewer than 65536 queues")
    }

    /// Where the guest's notify writes for each queue land now (for ioeventfds):
    /// (queue, guest-physical address); empty while BAR0 does not decode.
    pub fn notify_addresses(&self) -> Vec<(u16, u64)> {
        let Some(window) = self.config.bar0_window() else {
            return Vec::new();
        };
        (0..self.queue_count())
            .map(|q| {
                let offset = NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER);
                (q, window.base + offset)
            })
            .collect()
    }

    /// The MSI-X vectors, for tests and diagnostics.
    pub fn interrupts(&self) -> &Arc<Mutex<PciInterrupts>> {
        &self.interrupts
    }

    fn interrupts_lock(&self) -> std::sync::MutexGuard<'_, PciInterrupts> {
        self.interrupts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mmio_read32(&mut self, register: u64) -> u32 {
        let mut b = [0u8; 4];
        self.inner.read(register, &mut b);
        u32::from_le_bytes(b)
    }

    fn mmio_write32(&mut self, register: u64, value: u32) {
        self.inner.write(register, &value.to_le_bytes());
    }

    /// The field an access of `len` bytes at `offset` reaches: the natural width of
    /// each field only (4.1.3.1); 64-bit fields as two 32-bit halves.
    fn common_field(offset: u64, len: usize) -> Option<CommonField> {
        COMMON_FIELDS
            .iter()
            .find(|(at, width, _)| *at == offset && *width == len)
            .map(|(_, _, field)| *field)
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(field) = Self::common_field(offset, data.len()) else {
            return;
        };
        let queues = self.queue_count();
        let value: u32 = match field {
            CommonField::Mmio(register) => {
                if matches!(register, mmio_reg::DEVICE_FEATURES) {
                    self.mmio_write32(mmio_reg::DEVICE_FEATURES_SEL, self.device_feature_select);
                }
                self.mmio_read32(register)
            }
            CommonField::DeviceFeatureSelect => self.device_feature_select,
            CommonField::DriverFeatureSelect => self.driver_feature_select,
            CommonField::DriverFeature => match self.driver_feature_select {
                0 => low32(self.inner.acked_features()),
                1 => (self.inner.acked_features() >> 32) as u32,
                _ => 0,
            },
            CommonField::ConfigMsixVector => u32::from(self.interrupts_lock().config_vector),
            CommonField::NumQueues => u32::from(queues),
            CommonField::QueueSelect => u32::from(self.queue_select),
            CommonField::QueueMsixVector => {
                let interrupts = self.interrupts_lock();
                let vector = interrupts.queue_vectors.get(usize::from(self.queue_select));
                u32::from(vector.copied().unwrap_or(NO_VECTOR))
            }
            CommonField::QueueNotifyOff => {
                if self.queue_select < queues {
                    u32::from(self.queue_select)
                } else {
                    0
                }
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let Some(field) = Self::common_field(offset, data.len()) else {
            return;
        };
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        match field {
            CommonField::Mmio(mmio_reg::STATUS) => {
                self.mmio_write32(mmio_reg::STATUS, value);
                if value == 0 {
                    // Reset: the vector choices go back to none (4.1.4.3: they are
                    // part of the common configuration the reset clears).
                    let mut interrupts = self.interrupts_lock();
                    interrupts.config_vector = NO_VECTOR;
                    interrupts.queue_vectors.fill(NO_VECTOR);
                    drop(interrupts);
                    self.device_feature_select = 0;
                    self.driver_feature_select = 0;
                    self.queue_select = 0;
                }
            }
            CommonField::Mmio(register) => self.mmio_write32(register, value),
            CommonField::DeviceFeatureSelect => self.device_feature_select = value,
            CommonField::DriverFeatureSelect => {
                self.driver_feature_select = value;
                self.mmio_write32(mmio_reg::DRIVER_FEATURES_SEL, value);
            }
            CommonField::DriverFeature => self.mmio_write32(mmio_reg::DRIVER_FEATURES, value),
            CommonField::ConfigMsixVector => {
                let mut interrupts = self.interrupts_lock();
                interrupts.config_vector = interrupts.checked(low16(value));
            }
            CommonField::QueueSelect => {
                self.queue_select = low16(value);
                self.mmio_write32(mmio_reg::QUEUE_SEL, value);
            }
            CommonField::QueueMsixVector => {
                let select = usize::from(self.queue_select);
                let mut interrupts = self.interrupts_lock();
                let vector = interrupts.checked(low16(value));
                if let Some(slot) = interrupts.queue_vectors.get_mut(select) {
                    *slot = vector;
                }
            }
            CommonField::NumQueues | CommonField::QueueNotifyOff => {}
        }
    }

    /// The ISR status byte: reading it returns and clears the interrupt bits
    /// (4.1.4.5); only 1-byte reads.
    fn read_isr(&mut self, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        let interrupt = self.inner.interrupt();
        let status = interrupt.status();
        interrupt.ack(status);
        // ISR is one byte (4.1.4.5); the status holds only its bits 0 (queue) and 1
        // (configuration).
        data[0] = status.to_le_bytes()[0];
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match Region::of(offset, data.len()) {
            Some((Region::Common, at)) => self.read_common(at, data),
            Some((Region::Isr, 0)) => self.read_isr(data),
            Some((Region::DeviceConfig, at)) => self.inner.read(CONFIG_OFFSET + at, data),
            Some((Region::MsixTable, at)) => self.interrupts_lock().msix.read_table(at, data),
            Some((Region::MsixPba, at)) => self.interrupts_lock().msix.read_pba(at, data),
            // The notify area reads as zero, and so does every gap.
            _ => data.fill(0),
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match Region::of(offset, data.len()) {
            Some((Region::Common, at)) => self.write_common(at, data),
            Some((Region::DeviceConfig, at)) => self.inner.write(CONFIG_OFFSET + at, data),
            Some((Region::Notify, at)) if at.is_multiple_of(u64::from(NOTIFY_OFF_MULTIPLIER)) => {
                // Inside the 4 KiB notify area, so the queue index always fits.
                if let Ok(queue) = u32::try_from(at / u64::from(NOTIFY_OFF_MULTIPLIER)) {
                    self.inner.notify_queue(queue);
                }
            }
            Some((Region::MsixTable, at)) => self.interrupts_lock().msix.write_table(at, data),
            // ISR and PBA are read-only; gaps take nothing.
            _ => {}
        }
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` window: the BAR access its `bar`, `offset` and
    /// `length` fields describe, through its `pci_cfg_data` field. Only BAR0 and
    /// lengths of 1, 2 or 4 exist.
    fn pci_cfg_access(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_capability;
        let bar = self.config.read_u16(cap + 4) & 0xff;
        let offset = u64::from(self.config.read_u32(cap + 8));
        let length = self.config.read_u32(cap + 12) as usize;
        (bar == 0 && matches!(length, 1 | 2 | 4)).then_some((offset, length))
    }

    fn in_pci_cfg_data(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_capability + 16;
        offset >= data && offset + len <= data + 4
    }
}

/// A region of BAR0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    Common,
    Isr,
    DeviceConfig,
    Notify,
    MsixTable,
    MsixPba,
}

impl Region {
    /// The region an access lies wholly in, and the offset into it.
    fn of(offset: u64, len: usize) -> Option<(Region, u64)> {
        const PAGE: u64 = 0x1000;
        let regions = [
            (Region::Common, COMMON_CFG_OFFSET, COMMON_CFG_LEN),
            (Region::Isr, ISR_OFFSET, 1),
            (Region::DeviceConfig, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
            (Region::Notify, NOTIFY_OFFSET, NOTIFY_LEN),
            (Region::MsixTable, MSIX_TABLE_OFFSET, PAGE),
            (Region::MsixPba, MSIX_PBA_OFFSET, PAGE),
        ];
        let end = offset.checked_add(len as u64)?;
        regions
            .into_iter()
            .find(|(_, start, size)| offset >= *start && end <= start + size)
            .map(|(region, start, _)| (region, offset - start))
    }
}

/// A virtio capability (`struct virtio_pci_cap`, with `notify_off_multiplier` after
/// it for the notify capability and `pci_cfg_data` for the PCI one).
fn virtio_cap(kind: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![VENDOR_CAPABILITY, 0, len, kind, 0, 0, 0, 0];
    cap.extend_from_slice(&bar0_u32(offset).to_le_bytes());
    cap.extend_from_slice(&bar0_u32(length).to_le_bytes());
    if let Some(extra) = extra {
        cap.extend_from_slice(&extra.to_le_bytes());
    }
    cap
}

/// An offset or length in BAR0 as a capability's 32-bit field: the layout's
/// constants, all within the 32 KiB BAR.
fn bar0_u32(value: u64) -> u32 {
    u32::try_from(value).expect("BAR0's layout lies within its 32 KiB")
}

/// A 16-bit field of the common configuration (4.1.4.3: `config_msix_vector`,
/// `queue_select`, `queue_msix_vector`) from the register value the guest wrote:
/// its low 16 bits, which are all an access of the field's width carries.
fn low16(value: u32) -> u16 {
    u16::try_from(value & 0xffff).expect("masked to 16 bits")
}

/// The PCI class of a virtio device type: what lspci shows; drivers match on IDs.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        // virtio-net: network controller, Ethernet.
        1 => 0x02_00_00,
        // virtio-blk: mass storage, other.
        2 => 0x01_80_00,
        _ => 0xff_00_00,
    }
}

impl<D: VirtioDevice> PciFunction for PciTransport<D> {
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if self.in_pci_cfg_data(offset, data.len()) {
            data.fill(0);
            if let Some((bar_offset, length)) = self.pci_cfg_access() {
                let mut window = [0u8; 4];
                self.bar0_read(bar_offset, &mut window[..length]);
                let start = offset - (self.pci_cfg_capability + 16);
                let n = data.len().min(4 - start);
                data[..n].copy_from_slice(&window[start..start + n]);
            }
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = self.msix_capability + 2;
        if offset <= control + 1 && offset + data.len() > control {
            let value = self.config.read_u16(control);
            self.interrupts_lock().msix.set_control(value);
        }
        if self.in_pci_cfg_data(offset, data.len()) {
            if let Some((bar_offset, length)) = self.pci_cfg_access() {
                let data_at = self.pci_cfg_capability + 16;
                let window = self.config.read_u32(data_at).to_le_bytes();
                self.bar0_write(bar_offset, &window[..length]);
            }
        }
    }

    fn bar_windows(&self) -> Vec<BarWindow> {
        self.config.bar0_window().into_iter().collect()
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.bar0_read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.bar0_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests;
