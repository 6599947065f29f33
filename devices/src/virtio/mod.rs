//! Virtio devices over the virtio-mmio transport (version 2, "modern").
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
//! - [`chain::walk_chain`] follows descriptor chains with full validation, and
//!   [`chain::GuestChain`] is the devices' only way to the buffers of a chain: each
//!   of its reads, writes and file transfers logs the ranges it touched to the DMA
//!   log.

pub mod blk;
pub mod chain;
pub mod mmio;
pub mod net;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
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
    /// A used ring was updated (`VIRTIO_MMIO_INT_VRING`).
    Queue,
    /// The configuration changed or the device needs a reset (`VIRTIO_MMIO_INT_CONFIG`).
    Config,
}

impl InterruptKind {
    /// The `InterruptStatus` bit of this kind.
    pub fn status_bit(self) -> u32 {
        match self {
            InterruptKind::Queue => virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// The wire a device's interrupt goes out on. The VMM implements it with an irqfd
/// [`EventFd`] (implementation provided); tests with a counter.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt. `kind` is informational: virtio-mmio has one line per
    /// device and the guest reads `InterruptStatus` to tell them apart.
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
pub(crate) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMem,
    mut handle: impl FnMut(&Queue, u16) -> Result<u32, String>,
) -> Result<(), QueueFault> {
    use virtio_queue::{QueueOwnedT, QueueT};
    let used_ring = |head, e| QueueFault::new(head, format!("used ring: {e}"));
    loop {
        queue
            .disable_notification(mem)
            .map_err(|e| used_ring(None, e))?;
        loop {
            let head = match queue.iter(mem) {
                Ok(mut chains) => chains.next().map(|c| c.head_index()),
                Err(e) => return Err(QueueFault::new(None, format!("available ring: {e}"))),
            };
            let Some(head) = head else { break };
            let used = handle(queue, head).map_err(|what| QueueFault::new(Some(head), what))?;
            queue
                .add_used(mem, head, used)
                .map_err(|e| used_ring(Some(head), e))?;
        }
        if !queue
            .enable_notification(mem)
            .map_err(|e| used_ring(None, e))?
        {
            return Ok(());
        }
    }
}

/// Interrupts the driver if the used ring says it wants to hear about what was just
/// added (EVENT_IDX `used_event`, or always without it).
pub(crate) fn signal_used(
    queue: &mut Queue,
    mem: &GuestMem,
    interrupt: &VirtioInterrupt,
) -> Result<(), QueueFault> {
    use virtio_queue::QueueT;
    match queue.needs_notification(mem) {
        Ok(true) => {
            // A failing irqfd cannot be reported to the guest; the VMM sees it itself.
            let _ = interrupt.signal(InterruptKind::Queue);
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
        irq.signal(InterruptKind::Queue).unwrap();
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
        fd.trigger(InterruptKind::Queue).unwrap();
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
