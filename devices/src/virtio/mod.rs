//! Virtio devices over the virtio-mmio transport (version 2, "modern") or the modern
//! virtio-pci transport ([`pci::PciTransport`], which reuses the MMIO transport's
//! state machine behind the PCI register layout).
//!
//! - [`mmio::MmioTransport`] implements the register file; the VMM forwards MMIO
//!   exits of a device slot to [`mmio::MmioTransport::read`] / [`mmio::MmioTransport::write`]
//!   and queue notifications (ioeventfd on `QueueNotify`) to
//!   [`mmio::MmioTransport::notify_queue`].
//! - A device model implements [`VirtioDevice`]; [`blk::Block`] is virtio-blk,
//!   [`net::Net`] virtio-net.
//! - Interrupts go out through an [`InterruptLine`] (an irqfd `EventFd` in the VMM,
//!   a counter in tests), wrapped by [`VirtioInterrupt`], which also holds the
//!   `InterruptStatus` bits and the device's NEEDS_RESET flag.
//! - [`rings::check_queues`] is what both transports check the driver's queue layout
//!   with at DRIVER_OK: a layout the device cannot use exactly as written is refused.
//! - [`chain::walk_chain`] follows descriptor chains with full validation, and
//!   [`chain::GuestChain`] is the devices' only way to the buffers of a chain: each
//!   of its reads, writes and file transfers logs the ranges it touched to the DMA
//!   log.

pub mod blk;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rings;
#[cfg(any(test, feature = "test-utils"))]
pub mod write_check;

use std::io;
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// The guest memory type every device works on.
pub type GuestMem = GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the device is modern (virtio 1.x); required by this transport.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC`: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX`: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The used ring of this queue was updated (`VIRTIO_MMIO_INT_VRING`). The index
    /// picks the MSI-X vector on virtio-pci; virtio-mmio has one line for all.
    Queue(u16),
    /// The configuration changed or the device needs a reset (`VIRTIO_MMIO_INT_CONFIG`).
    Config,
}

impl InterruptKind {
    /// The `InterruptStatus` bit of this kind.
    pub fn status_bit(self) -> u32 {
        match self {
            InterruptKind::Queue(_) => virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The wire a device's interrupt goes out on. The VMM implements it with an irqfd
/// [`EventFd`] (implementation provided); tests with a counter.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt. virtio-mmio has one line per device and the guest reads
    /// `InterruptStatus` to tell the kinds apart; virtio-pci picks the MSI-X vector
    /// the driver gave the kind (the configuration, or that queue).
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

impl InterruptLine for EventFd {
    fn trigger(&self, _kind: InterruptKind) -> io::Result<()> {
        self.write(1)
    }
}

/// Interrupt state shared between a transport and its device: the `InterruptStatus`
/// register, the DEVICE_NEEDS_RESET flag, and the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish()
    }
}

impl VirtioInterrupt {
    /// Wraps `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
        }
    }

    /// Sets the status bit of `kind` and raises the line.
    pub fn signal(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.line.trigger(kind)
    }

    /// Marks the device DEVICE_NEEDS_RESET and raises a configuration interrupt, as
    /// the spec asks (virtio 1.2, 2.1.2).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        // Nothing more can be done if the line itself fails.
        let _ = self.signal(InterruptKind::Config);
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// `InterruptACK`: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What the VMM needs of a device's transport once it is attached, whichever
/// transport it is: the device model, and queue notifications (ioeventfd wake-ups).
pub trait VirtioTransport<D: VirtioDevice>: Send {
    /// The device model.
    fn device(&self) -> &D;
    /// The device model, mutably.
    fn device_mut(&mut self) -> &mut D;
    /// The driver notified queue `index`.
    fn notify_queue(&mut self, index: u32);
    /// Features offered to the driver: the device's plus the transport's.
    fn device_features(&self) -> u64;
    /// The features of the driver's last accepted negotiation, `None` if no driver
    /// ever completed one.
    fn negotiated_features(&self) -> Option<u64>;
}

impl<D: VirtioDevice> VirtioTransport<D> for mmio::MmioTransport<D> {
    fn device(&self) -> &D {
        mmio::MmioTransport::device(self)
    }
    fn device_mut(&mut self) -> &mut D {
        mmio::MmioTransport::device_mut(self)
    }
    fn notify_queue(&mut self, index: u32) {
        mmio::MmioTransport::notify_queue(self, index)
    }
    fn device_features(&self) -> u64 {
        mmio::MmioTransport::device_features(self)
    }
    fn negotiated_features(&self) -> Option<u64> {
        mmio::MmioTransport::negotiated_features(self)
    }
}

// PCI's common configuration is the MMIO register file in another layout
// (`PciTransport` wraps an `MmioTransport`), so feature negotiation is the same.
impl<D: VirtioDevice> VirtioTransport<D> for pci::PciTransport<D> {
    fn device(&self) -> &D {
        pci::PciTransport::device(self)
    }
    fn device_mut(&mut self) -> &mut D {
        pci::PciTransport::device_mut(self)
    }
    fn notify_queue(&mut self, index: u32) {
        pci::PciTransport::notify_queue(self, index)
    }
    fn device_features(&self) -> u64 {
        self.virtio().device_features()
    }
    fn negotiated_features(&self) -> Option<u64> {
        self.virtio().negotiated_features()
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled none of the queues the device needs.
    #[error("virtio queue {index} is not ready or not valid in guest memory")]
    QueueNotReady {
        /// Queue index.
        index: u16,
    },
    /// Any other device-specific problem.
    #[error("cannot activate device: {0}")]
    Other(String),
}

/// A virtio device model, driven by a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`VIRTIO_ID_BLOCK` = 2, `VIRTIO_ID_NET` = 1, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered. The transport adds
    /// [`VIRTIO_F_VERSION_1`], [`VIRTIO_RING_F_INDIRECT_DESC`] and
    /// [`VIRTIO_RING_F_EVENT_IDX`] itself.
    fn features(&self) -> u64;

    /// Reads the device configuration space at `offset` (relative to 0x100). Bytes
    /// outside the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device after DRIVER_OK with the negotiated features, the queues the
    /// driver set up (event-idx already applied), and the interrupt.
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;

    /// The driver notified queue `index`: process its available chains.
    fn process_queue(&mut self, index: u16);

    /// Back to the pre-activation state: drop the queues and memory.
    fn reset(&mut self);

    /// Records in the device's DMA log a driver error the transport found on the
    /// device's behalf (a refused DRIVER_OK): `queue` is the queue at fault, 0 when
    /// none is; `needs_reset` whether the device went to DEVICE_NEEDS_RESET.
    fn log_error(&self, queue: u16, error: &str, needs_reset: bool);
}

/// Why a queue could not be served: the chain at fault (if one was) and what was
/// wrong. The device logs it and sets DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueFault {
    pub head: Option<u16>,
    pub what: String,
}

impl QueueFault {
    fn new(head: Option<u16>, what: String) -> Self {
        QueueFault { head, what }
    }
}

/// Serves every chain the driver made available: `handle` processes the chain at
/// `head` (it gets the queue, read-only, to walk the descriptor table) and returns the
/// used length, and the chain goes to the used ring. Notifications are off while the
/// queue is drained and the ring is checked again after turning them back on, so a
/// chain published in between is not missed (the EVENT_IDX race). Stops at the first
/// fault.
///
/// Every pass after that re-check must serve a chain: the re-check said the driver
/// published one, and a driver's `idx` only moves forward. A pass that finds none
/// means the device's own writes moved `idx` (turning notifications off and on
/// writes the used ring's `flags`, which a driver may place on `idx`); looping on it
/// would never end, so it is a fault. A driver can still keep the device here by
/// publishing chains as fast as they are served, as a driver on another vCPU may:
/// each pass then serves its chains, and stopping with chains pending and
/// notifications on would lose the wake-up.
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMem,
    mut handle: impl FnMut(&Queue, u16) -> Result<u32, String>,
) -> Result<(), QueueFault> {
    use virtio_queue::QueueT;
    let used_ring = |head, e| QueueFault::new(head, format!("used ring: {e}"));
    let mut rechecked = false;
    loop {
        queue
            .disable_notification(mem)
            .map_err(|e| used_ring(None, e))?;
        let mut served = 0usize;
        while let Some(head) = pop_avail(queue, mem).map_err(|what| QueueFault::new(None, what))? {
            let used = handle(queue, head).map_err(|what| QueueFault::new(Some(head), what))?;
            queue
                .add_used(mem, head, used)
                .map_err(|e| used_ring(Some(head), e))?;
            served += 1;
        }
        if rechecked && served == 0 {
            return Err(QueueFault::new(
                None,
                "available ring index moved with no new chain: the device's used-ring writes land on it".into(),
            ));
        }
        if !queue
            .enable_notification(mem)
            .map_err(|e| used_ring(None, e))?
        {
            return Ok(());
        }
        rechecked = true;
    }
}

/// Takes the next chain head the driver published: `Ok(None)` when there is none,
/// `Err` when the available ring cannot be read or its `idx` is more than a queue's
/// worth ahead of the device.
///
/// By hand rather than with `virtio_queue`'s `Queue::iter`, which refuses an
/// available ring at GPA 0 (it takes 0 for "not set up"), a place the spec allows
/// and the transports accept; the checks are `iter`'s.
pub(crate) fn pop_avail(queue: &mut Queue, mem: &GuestMem) -> Result<Option<u16>, String> {
    use virtio_queue::QueueT;
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| format!("available ring: {e}"))?;
    let next = Wrapping(queue.next_avail());
    let ahead = (avail - next).0;
    if ahead > queue.size() {
        return Err(format!(
            "available ring: idx {} is {ahead} entries ahead of the device's {}, more than the queue's {}",
            avail.0,
            next.0,
            queue.size()
        ));
    }
    if ahead == 0 {
        return Ok(None);
    }
    let slot = next
        .0
        .checked_rem(queue.size())
        .ok_or_else(|| "available ring: queue of size 0".to_string())?;
    // `flags` and `idx` come first; each entry is a u16.
    let entry = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(slot))
        .ok_or_else(|| "available ring: entry address overflows".to_string())?;
    let head: u16 = mem
        .read_obj(GuestAddress(entry))
        .map_err(|e| format!("available ring: entry {slot}: {e}"))?;
    queue.set_next_avail(next.0.wrapping_add(1));
    Ok(Some(u16::from_le(head)))
}

/// Interrupts the driver if the used ring of queue `index` says it wants to hear
/// about what was just added (EVENT_IDX `used_event`, or always without it).
pub(crate) fn signal_used(
    index: u16,
    queue: &mut Queue,
    mem: &GuestMem,
    interrupt: &VirtioInterrupt,
) -> Result<(), QueueFault> {
    use virtio_queue::QueueT;
    match queue.needs_notification(mem) {
        Ok(true) => {
            // A failing irqfd cannot be reported to the guest; the VMM sees it itself.
            let _ = interrupt.signal(InterruptKind::Queue(index));
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(e) => Err(QueueFault::new(None, format!("avail ring used_event: {e}"))),
    }
}

/// Copies `config[offset..]` into `data`, zero-filling what lies beyond `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// The low half of a 64-bit value a transport shows as two 32-bit registers (the
/// high half is `v >> 32`).
pub(crate) fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked to 32 bits")
}

#[cfg(test)]
pub(crate) mod test_util;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_and_ack() {
        let line = Arc::new(test_util::CountingLine::default());
        let irq = VirtioInterrupt::new(line.clone());
        irq.signal(InterruptKind::Queue(0)).unwrap();
        assert_eq!(irq.status(), 1);
        irq.set_needs_reset();
        assert_eq!(irq.status(), 3);
        assert!(irq.needs_reset());
        irq.ack(1);
        assert_eq!(irq.status(), 2);
        assert_eq!((line.queue_count(), line.config_count()), (1, 1));
        irq.reset();
        assert_eq!(irq.status(), 0);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn eventfd_line_counts() {
        let fd = EventFd::new(0).unwrap();
        fd.trigger(InterruptKind::Queue(1)).unwrap();
        fd.trigger(InterruptKind::Config).unwrap();
        assert_eq!(fd.read().unwrap(), 2);
    }

    #[test]
    fn config_bytes_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}

/// The names of the feature bits in `bits` for a device of type `device_type`
/// (virtio 1.2, 5.1.3 and 5.2.3 for net and block; 6 for the reserved bits), lowest
/// bit first; a bit without a name here is `bit N`. For reports: `run.json` and the
/// audit's say what was offered and what the driver acked by name.
pub fn feature_names(device_type: u32, bits: u64) -> Vec<String> {
    use virtio_bindings::{
        virtio_blk as b, virtio_config as c, virtio_ids, virtio_net as n, virtio_ring as r,
    };
    let common: &[(u32, &str)] = &[
        (r::VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"),
        (r::VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"),
        (c::VIRTIO_F_VERSION_1, "VERSION_1"),
        (c::VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
        (c::VIRTIO_F_RING_PACKED, "RING_PACKED"),
        (c::VIRTIO_F_ORDER_PLATFORM, "ORDER_PLATFORM"),
    ];
    let net: &[(u32, &str)] = &[
        (n::VIRTIO_NET_F_CSUM, "CSUM"),
        (n::VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (n::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
        (n::VIRTIO_NET_F_MTU, "MTU"),
        (n::VIRTIO_NET_F_MAC, "MAC"),
        (n::VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (n::VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (n::VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
        (n::VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (n::VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (n::VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
        (n::VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (n::VIRTIO_NET_F_STATUS, "STATUS"),
        (n::VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
        (n::VIRTIO_NET_F_MQ, "MQ"),
    ];
    let blk: &[(u32, &str)] = &[
        (b::VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX"),
        (b::VIRTIO_BLK_F_SEG_MAX, "SEG_MAX"),
        (b::VIRTIO_BLK_F_GEOMETRY, "GEOMETRY"),
        (b::VIRTIO_BLK_F_RO, "RO"),
        (b::VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE"),
        (b::VIRTIO_BLK_F_FLUSH, "FLUSH"),
        (b::VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY"),
        (b::VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE"),
        (b::VIRTIO_BLK_F_MQ, "MQ"),
        (b::VIRTIO_BLK_F_DISCARD, "DISCARD"),
        (b::VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES"),
    ];
    let specific = match device_type {
        virtio_ids::VIRTIO_ID_NET => net,
        virtio_ids::VIRTIO_ID_BLOCK => blk,
        _ => &[],
    };
    (0..64u32)
        .filter(|bit| bits & (1u64 << bit) != 0)
        .map(|bit| {
            common
                .iter()
                .chain(specific)
                .find(|(b, _)| *b == bit)
                .map_or_else(|| format!("bit {bit}"), |(_, name)| (*name).to_string())
        })
        .collect()
}

#[cfg(test)]
mod feature_name_tests {
    use super::*;

    #[test]
    fn feature_bits_are_named_per_device_type() {
        let bits = 1 | (1 << 5) | VIRTIO_F_VERSION_1 | (1 << 60);
        assert_eq!(
            feature_names(virtio_bindings::virtio_ids::VIRTIO_ID_NET, bits),
            ["CSUM", "MAC", "VERSION_1", "bit 60"]
        );
        assert_eq!(
            feature_names(virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK, 1 << 5),
            ["RO"]
        );
    }
}
