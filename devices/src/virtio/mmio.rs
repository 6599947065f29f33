//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2), without KVM.
//!
//! The VMM maps one [`MmioTransport`] per 4 KiB device slot and forwards:
//! - MMIO reads/writes at `slot_base + offset` to [`MmioTransport::read`] /
//!   [`MmioTransport::write`];
//! - queue notifications: either a plain write of `QueueNotify` (handled by
//!   `write`), or, faster, an ioeventfd registered at `slot_base + `[`NOTIFY_OFFSET`]
//!   with the queue index as datamatch, whose wake-up calls
//!   [`MmioTransport::notify_queue`];
//! - interrupts: the [`InterruptLine`] given to [`MmioTransport::new`] (an irqfd
//!   `EventFd` registered on the slot's GSI).

use std::sync::Arc;

use vm_memory::GuestAddress;

use super::rings::{check_queues, QueueConfig};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{
    low32, ActivateError, GuestMem, InterruptLine, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// `MagicValue`: "virt" little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2 (modern).
pub const VERSION: u32 = 2;
/// `VendorID` reported by our devices ("ZC" + 0).
pub const VENDOR_ID: u32 = 0x0000_435a;
/// Offset of `QueueNotify`, for ioeventfd registration.
pub const NOTIFY_OFFSET: u64 = 0x050;
/// Offset where the device configuration space starts.
pub const CONFIG_OFFSET: u64 = 0x100;

/// Register offsets of the virtio-mmio transport, named as in the virtio 1.2 spec
/// (section 4.2.2); public for drivers written in tests and fuzz targets.
#[allow(missing_docs, reason = "each is named as in the spec")]
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// One virtio-mmio device slot: the register file around a [`VirtioDevice`].
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    mem: GuestMem,
    interrupt: Arc<VirtioInterrupt>,
    /// The queue registers as the driver wrote them, checked only at DRIVER_OK.
    queues: Vec<QueueConfig>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    negotiated_features: Option<u64>,
    status: u32,
    config_generation: u32,
    active: bool,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status())
            .field("acked_features", &self.acked_features)
            .field("active", &self.active)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`, which will access `mem` and interrupt through `line`.
    pub fn new(device: D, mem: GuestMem, line: Arc<dyn InterruptLine>) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(line)),
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            negotiated_features: None,
            status: 0,
            config_generation: 0,
            active: false,
        }
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The shared interrupt state (`InterruptStatus`, NEEDS_RESET).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Features offered to the driver: the device's plus the transport's ring features.
    pub fn device_features(&self) -> u64 {
        self.device.features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The features of the driver's last accepted negotiation (the subset it wrote
    /// before `FEATURES_OK` was accepted), kept across resets so that a run's report
    /// can say what the device ran with after the guest shut it down; `None` when no
    /// driver ever completed negotiation.
    pub fn negotiated_features(&self) -> Option<u64> {
        self.negotiated_features
    }

    /// The `Status` register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device was activated (DRIVER_OK accepted) and not reset since.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Handles a notification of queue `index` (ioeventfd wake-up or a write of
    /// `QueueNotify`). Ignored before activation, after NEEDS_RESET, or for a queue
    /// that does not exist.
    pub fn notify_queue(&mut self, index: u32) {
        if !self.active || self.interrupt.needs_reset() {
            return;
        }
        if let Ok(i) = u16::try_from(index) {
            if usize::from(i) < self.queues.len() {
                self.device.process_queue(i);
            }
        }
    }

    /// An MMIO read of `data.len()` bytes at `offset` within the slot. Registers take
    /// 4-byte aligned 4-byte reads (anything else reads zero); the configuration space
    /// takes any size.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => low32(self.device_features()),
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_NUM => q.map_or(0, |q| q.size),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            reg::QUEUE_DESC_LOW => q.map_or(0, |q| low32(q.desc)),
            reg::QUEUE_DESC_HIGH => q.map_or(0, |q| (q.desc >> 32) as u32),
            reg::QUEUE_DRIVER_LOW => q.map_or(0, |q| low32(q.avail)),
            reg::QUEUE_DRIVER_HIGH => q.map_or(0, |q| (q.avail >> 32) as u32),
            reg::QUEUE_DEVICE_LOW => q.map_or(0, |q| low32(q.used)),
            reg::QUEUE_DEVICE_HIGH => q.map_or(0, |q| (q.used >> 32) as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: their length reads as -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// An MMIO write of `data` at `offset` within the slot (see [`Self::read`] for
    /// sizes). Writes that the spec forbids in the current state are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // The driver must not write config before DRIVER, and never after FAILED.
            if self.status & DRIVER != 0 && self.status & FAILED == 0 {
                self.device.write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            // Only while negotiating: after DRIVER, before FEATURES_OK.
            reg::DRIVER_FEATURES if self.status & DRIVER != 0 && self.status & FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify_queue(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => {}
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        // Queue setup happens after FEATURES_OK and before DRIVER_OK.
        if self.status & FEATURES_OK == 0 || self.status & DRIVER_OK != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return;
        };
        // Kept as written, whatever it is: an invalid size or address is refused at
        // DRIVER_OK (`rings::check_queues`), never replaced by another value.
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        match offset {
            reg::QUEUE_NUM => q.size = v,
            reg::QUEUE_READY => q.ready = v == 1,
            reg::QUEUE_DESC_LOW => q.desc = low(q.desc),
            reg::QUEUE_DESC_HIGH => q.desc = high(q.desc),
            reg::QUEUE_DRIVER_LOW => q.avail = low(q.avail),
            reg::QUEUE_DRIVER_HIGH => q.avail = high(q.avail),
            reg::QUEUE_DEVICE_LOW => q.used = low(q.used),
            reg::QUEUE_DEVICE_HIGH => q.used = high(q.used),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET belongs to the device; the driver may only add bits.
        let v = v & !DEVICE_NEEDS_RESET;
        if v & self.status != self.status {
            return;
        }
        let added = v & !self.status;
        let mut new = v;
        if added & FEATURES_OK != 0 {
            if new & FAILED == 0 && self.features_acceptable() {
                self.negotiated_features = Some(self.acked_features);
            } else {
                // Leaving FEATURES_OK clear tells the driver the subset is unsupported.
                new &= !FEATURES_OK;
            }
        }
        if added & DRIVER_OK != 0 {
            let refused = if new & FAILED != 0 {
                Some("DRIVER_OK refused: the driver set FAILED (it gave up on the device)")
            } else if new & FEATURES_OK == 0 || new & ACKNOWLEDGE == 0 || new & DRIVER == 0 {
                Some("DRIVER_OK refused: ACKNOWLEDGE, DRIVER and FEATURES_OK are not all set")
            } else {
                None
            };
            match refused {
                // DRIVER_OK stays clear, which the driver can read back; nothing was
                // started, so the device needs no reset.
                Some(why) => {
                    new &= !DRIVER_OK;
                    self.device.log_error(0, why, false);
                }
                None => {
                    self.status = new;
                    self.activate();
                    return;
                }
            }
        }
        self.status = new;
    }

    fn features_acceptable(&self) -> bool {
        self.status & DRIVER != 0
            && self.acked_features & !self.device_features() == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    /// DRIVER_OK was accepted: checks the queues as the driver wrote them and starts
    /// the device. A layout the device cannot use exactly as written, or a device
    /// that refuses to start, leaves the device inactive in DEVICE_NEEDS_RESET (with
    /// a configuration interrupt, virtio 1.2, 2.1.2) and a `device_error` record.
    fn activate(&mut self) {
        if let Err(refused) = check_queues(&self.mem, &self.queues) {
            self.refuse(refused.queue, &format!("DRIVER_OK refused: {refused}"));
            return;
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self.queues.iter().map(|q| q.to_queue(event_idx)).collect();
        match self.device.activate(
            self.mem.clone(),
            queues,
            self.interrupt.clone(),
            self.acked_features,
        ) {
            Ok(()) => self.active = true,
            Err(e) => {
                let queue = match e {
                    ActivateError::QueueNotReady { index } => index,
                    ActivateError::Other(_) => 0,
                };
                self.refuse(queue, &format!("DRIVER_OK refused: {e}"));
            }
        }
    }

    fn refuse(&mut self, queue: u16, why: &str) {
        self.device.log_error(queue, why, true);
        self.interrupt.set_needs_reset();
    }

    /// Device reset (the driver wrote 0 to `Status`): the device drops its queues, all
    /// queue registers, features and interrupt bits return to their initial values.
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.status = 0;
        self.active = false;
    }

    /// Guest address of the used ring of queue `index`, for diagnostics.
    pub fn queue_used_ring(&self, index: usize) -> Option<GuestAddress> {
        self.queues.get(index).map(|q| GuestAddress(q.used))
    }

    /// The registers of queue `index` as the driver last wrote them (what the device
    /// got at activation, while [`is_active`](Self::is_active)); for drivers written in
    /// tests and fuzz targets, which check the device against the rings it was given.
    pub fn queue_config(&self, index: usize) -> Option<&QueueConfig> {
        self.queues.get(index)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::test_util::CountingLine;
    use crate::virtio::ActivateError;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestMemoryMmap;

    /// Per queue at activation: (ready, size, event_idx).
    type QueueSnapshot = Vec<(bool, u16, bool)>;

    /// A device that records what the transport did to it.
    #[derive(Default)]
    pub struct FakeDevice {
        pub config: Vec<u8>,
        pub activated: Option<(u64, QueueSnapshot)>,
        pub notified: Vec<u16>,
        pub resets: usize,
        pub sizes: Vec<u16>,
        pub fail_activate: bool,
        /// What the transport logged: (queue, error, needs_reset).
        pub errors: std::sync::Mutex<Vec<(u16, String, bool)>>,
    }

    impl FakeDevice {
        pub fn errors(&self) -> Vec<(u16, String, bool)> {
            self.errors.lock().unwrap().clone()
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let Ok(o) = usize::try_from(offset) else {
                return;
            };
            if o + data.len() <= self.config.len() {
                self.config[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn activate(
            &mut self,
            _mem: GuestMem,
            queues: Vec<Queue>,
            _interrupt: Arc<VirtioInterrupt>,
            acked: u64,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Other("no".into()));
            }
            self.activated = Some((
                acked,
                queues
                    .iter()
                    .map(|q| (q.ready(), q.size(), q.event_idx_enabled()))
                    .collect(),
            ));
            Ok(())
        }
        fn process_queue(&mut self, index: u16) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.activated = None;
        }
        fn log_error(&self, queue: u16, error: &str, needs_reset: bool) {
            self.errors
                .lock()
                .unwrap()
                .push((queue, error.to_string(), needs_reset));
        }
    }

    pub fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rd(t: &mut MmioTransport<FakeDevice>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<FakeDevice>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport<FakeDevice>, Arc<CountingLine>) {
        let line = Arc::new(CountingLine::default());
        let dev = FakeDevice {
            config: vec![1, 2, 3, 4, 5, 6, 7, 8],
            sizes: vec![16, 8],
            ..Default::default()
        };
        (MmioTransport::new(dev, mem(), line.clone()), line)
    }

    /// Drives the standard init sequence up to (not including) DRIVER_OK.
    fn negotiate(t: &mut MmioTransport<FakeDevice>, features: u64) -> u32 {
        wr(t, reg::STATUS, ACKNOWLEDGE);
        wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, low32(features));
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        rd(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport<FakeDevice>, sel: u32, size: u32, base: u64) {
        wr(t, reg::QUEUE_SEL, sel);
        wr(t, reg::QUEUE_NUM, size);
        wr(t, reg::QUEUE_DESC_LOW, low32(base));
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, low32(base + 0x1000));
        wr(t, reg::QUEUE_DRIVER_HIGH, 0);
        wr(t, reg::QUEUE_DEVICE_LOW, low32(base + 0x2000));
        wr(t, reg::QUEUE_DEVICE_HIGH, 0);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR_ID);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        let lo = rd(&mut t, reg::DEVICE_FEATURES);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = rd(&mut t, reg::DEVICE_FEATURES);
        let f = u64::from(lo) | (u64::from(hi) << 32);
        assert_eq!(
            f,
            (1 << 3) | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX
        );
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        // Bad widths read zero and are ignored on write.
        let mut two = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(reg::STATUS, &[1, 0]);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn config_space_access() {
        let (mut t, _) = transport();
        let mut b = [0u8; 2];
        t.read(CONFIG_OFFSET + 6, &mut b);
        assert_eq!(b, [7, 8]);
        let mut b = [0u8; 4];
        t.read(CONFIG_OFFSET + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
        // Writes before DRIVER are ignored.
        t.write(CONFIG_OFFSET, &[9]);
        assert_eq!(t.device().config[0], 1);
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        t.write(CONFIG_OFFSET, &[9]);
        assert_eq!(t.device().config[0], 9);
    }

    #[test]
    fn feature_negotiation_accepts_subset_with_version_1() {
        let (mut t, _) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(s, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            t.acked_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        // Features are frozen after FEATURES_OK.
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        wr(&mut t, reg::DRIVER_FEATURES, 0);
        assert_eq!(
            t.acked_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
    }

    #[test]
    fn the_negotiated_subset_is_kept_across_a_reset() {
        let (mut t, _) = transport();
        assert_eq!(t.negotiated_features(), None);
        let refused = negotiate(&mut t, 1 << 3);
        assert_eq!(refused & FEATURES_OK, 0);
        assert_eq!(
            t.negotiated_features(),
            None,
            "a refused subset is not negotiated"
        );
        negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(
            t.negotiated_features(),
            Some(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
        );
    }

    #[test]
    fn feature_negotiation_refuses_unknown_or_legacy() {
        let (mut t, _) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(s & FEATURES_OK, 0, "unoffered feature bit 5");
        let (mut t, _) = transport();
        let s = negotiate(&mut t, 1 << 3);
        assert_eq!(s & FEATURES_OK, 0, "VERSION_1 missing");
        // Features written before DRIVER are ignored.
        let (mut t, _) = transport();
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        assert_eq!(t.acked_features(), 0);
    }

    #[test]
    fn status_state_machine_and_activation() {
        let (mut t, _) = transport();
        // DRIVER_OK without FEATURES_OK is refused.
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(rd(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        assert!(!t.is_active());
        negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        // Registers read back as written, even a size the device cannot use (that is
        // refused at DRIVER_OK, see `unusable_rings_are_refused_at_driver_ok`).
        wr(&mut t, reg::QUEUE_NUM, 6);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 6);
        wr(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        assert_eq!(rd(&mut t, reg::QUEUE_DRIVER_LOW), 0x1_1000);
        // Clearing a bit is refused.
        wr(&mut t, reg::STATUS, ACKNOWLEDGE);
        assert_eq!(rd(&mut t, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_active());
        let (acked, queues) = t.device().activated.clone().unwrap();
        assert_eq!(acked, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        assert_eq!(queues, vec![(true, 8, true), (false, 8, true)]);
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, reg::QUEUE_NUM, 4);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 8);
        // Notify by register and by the ioeventfd path; bad index ignored.
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        t.notify_queue(1);
        t.notify_queue(9);
        assert_eq!(t.device().notified, vec![0, 1]);
    }

    #[test]
    fn activation_with_invalid_queue_sets_needs_reset() {
        let (mut t, line) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        // Used ring outside guest memory.
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(&mut t, reg::QUEUE_DEVICE_LOW, 0xfff0_0000);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_active());
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(line.config_count(), 1);
        let errors = t.device().errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0]
            .1
            .contains("used ring 0xfff00000+0x46 is outside guest memory"));
        wr(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Notifications are ignored in this state.
        t.notify_queue(0);
        assert!(t.device().notified.is_empty());
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, _) = transport();
        t.device_mut().fail_activate = true;
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            t.device().errors(),
            vec![(
                0,
                "DRIVER_OK refused: cannot activate device: no".to_string(),
                true
            )]
        );
        // The driver cannot clear NEEDS_RESET by writing status bits.
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED,
        );
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn reset_clears_queues_and_features() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_active());
        t.interrupt()
            .signal(crate::virtio::InterruptKind::Queue(0))
            .unwrap();
        wr(&mut t, reg::STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(t.device().resets, 1);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), 16);
        assert_eq!(rd(&mut t, reg::QUEUE_DESC_LOW), 0);
        // Notifies after reset reach nothing.
        t.notify_queue(0);
        assert!(t.device().notified.is_empty());
    }

    /// Queue 0 set up at `(size, desc, avail, used)` as a driver writes it.
    fn setup_queue_at(t: &mut MmioTransport<FakeDevice>, size: u32, rings: [u64; 3]) {
        wr(t, reg::QUEUE_SEL, 0);
        wr(t, reg::QUEUE_NUM, size);
        for (low, addr) in [
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DEVICE_LOW,
        ]
        .into_iter()
        .zip(rings)
        {
            wr(t, low, low32(addr));
            wr(t, low + 4, (addr >> 32) as u32);
        }
        wr(t, reg::QUEUE_READY, 1);
    }

    /// A queue the device cannot use exactly as the driver wrote it is refused at
    /// DRIVER_OK: not activated, NEEDS_RESET with a configuration interrupt, and a
    /// `device_error` naming the queue and the fault; the registers still read what
    /// the driver wrote.
    #[rstest::rstest]
    #[case::misaligned_descriptor_table(16, [0x1_0008, 0x1_1000, 0x1_2000],
        "descriptor table at 0x10008 is not aligned to 16 bytes")]
    #[case::misaligned_available_ring(16, [0x1_0000, 0x1_1001, 0x1_2000],
        "available ring at 0x11001 is not aligned to 2 bytes")]
    #[case::misaligned_used_ring(16, [0x1_0000, 0x1_1000, 0x3002],
        "used ring at 0x3002 is not aligned to 4 bytes")]
    #[case::size_not_a_power_of_two(6, [0x1_0000, 0x1_1000, 0x1_2000],
        "queue size 6 is not a power of two between 1 and 16")]
    #[case::size_over_the_maximum(32, [0x1_0000, 0x1_1000, 0x1_2000],
        "queue size 32 is not a power of two between 1 and 16")]
    #[case::size_zero(0, [0x1_0000, 0x1_1000, 0x1_2000],
        "queue size 0 is not a power of two between 1 and 16")]
    #[case::ring_above_4_gib(16, [0x1_0000, 0x1_0000_1000, 0x1_2000],
        "available ring 0x100001000+0x26 is outside guest memory")]
    #[case::used_flags_on_avail_idx(16, [0x1000, 0x2002, 0x2004],
        "used ring 0x2004+0x86 overlaps the available ring at 0x2002 of queue 0")]
    fn unusable_rings_are_refused_at_driver_ok(
        #[case] size: u32,
        #[case] rings: [u64; 3],
        #[case] what: &str,
    ) {
        let (mut t, line) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue_at(&mut t, size, rings);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_active());
        assert!(t.device().activated.is_none());
        assert_ne!(rd(&mut t, reg::STATUS) & DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(line.config_count(), 1);
        assert_eq!(
            t.device().errors(),
            vec![(0, format!("DRIVER_OK refused: queue 0: {what}"), true)]
        );
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM), size);
        assert_eq!(rd(&mut t, reg::QUEUE_DEVICE_LOW), low32(rings[2]));
        assert_eq!(rd(&mut t, reg::QUEUE_DRIVER_HIGH), (rings[1] >> 32) as u32);
        t.notify_queue(0);
        assert!(t.device().notified.is_empty());
        // A reset and a good layout bring it back.
        wr(&mut t, reg::STATUS, 0);
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue_at(&mut t, 16, [0x1_0000, 0x1_1000, 0x1_2000]);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_active());
    }

    #[test]
    fn the_device_gets_the_rings_exactly_as_written_avail_at_gpa_0_included() {
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue_at(&mut t, 8, [0x1000, 0, 0x2004]);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_active());
        assert!(t.device().errors().is_empty());
        assert_eq!(
            t.device().activated.clone().unwrap().1,
            vec![(true, 8, false), (false, 8, false)]
        );
    }

    #[test]
    fn driver_ok_is_refused_once_the_driver_set_failed() {
        let (mut t, line) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED,
        );
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
        );
        assert!(!t.is_active());
        assert!(t.device().activated.is_none());
        assert_eq!(
            rd(&mut t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED
        );
        // Nothing started, so nothing needs a reset; the refusal is on record.
        assert_eq!(line.config_count(), 0);
        let errors = t.device().errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.contains("FAILED") && !errors[0].2);
        // FAILED and DRIVER_OK in one write: the same.
        let (mut t, _) = transport();
        negotiate(&mut t, VIRTIO_F_VERSION_1);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
        );
        assert!(!t.is_active());
        // FEATURES_OK is not accepted after FAILED either.
        let (mut t, _) = transport();
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(
            &mut t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FAILED | FEATURES_OK,
        );
        assert_eq!(rd(&mut t, reg::STATUS) & FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_before_features_ok_is_logged() {
        let (mut t, _) = transport();
        wr(&mut t, reg::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert!(!t.is_active());
        let errors = t.device().errors();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].1.contains("FEATURES_OK") && !errors[0].2);
    }
}
