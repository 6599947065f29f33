//! Shared by the device fuzz targets: input decoding, a 64 KiB guest memory, the
//! driver's virtio-mmio handshake, ring helpers, the write check and the counters
//! that show which deep paths a run reached (`stats`).
//!
//! Both targets drive their device through the real [`MmioTransport`] register file,
//! so a queue only reaches the device after the transport's own checks (the ring
//! layout at DRIVER_OK, feature negotiation), exactly as with a guest.
//!
//! Every driver operation that lets the device run is wrapped in [`device_writes`]:
//! the device may change guest memory only inside the device-writable buffers of
//! the chains the driver offered and inside its used rings (nothing at all while it
//! is not active).

#![allow(dead_code)]

pub mod stats;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_devices::virtio::mmio::MmioTransport;
use zc_devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use zc_devices::virtio::write_check::{QueueRings, WriteCheck};
use zc_devices::virtio::{InterruptKind, InterruptLine, VirtioDevice, VIRTIO_F_VERSION_1};

/// Guest RAM: one region at GPA 0.
pub const MEM_SIZE: usize = 64 * 1024;
/// Most operations (notify rounds, memory patches, resets) per input.
pub const MAX_OPS: usize = 8;

pub use zc_devices::virtio::mmio::reg;

/// Reads the fuzz input front to back; past its end every byte reads as zero, so any
/// input decodes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Whether everything was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Everything not consumed yet.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// An interrupt line that goes nowhere.
pub struct NullLine;

impl InterruptLine for NullLine {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// 64 KiB of guest RAM at GPA 0 holding `image` (zero beyond it).
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    guest_memory_of(MEM_SIZE, image)
}

/// `size` bytes of guest RAM at GPA 0 holding `image` (zero beyond it).
///
/// One mapping per size for the whole run, rewritten for each input: a fresh mapping
/// per input cost its page faults every time. Inputs run one at a time, and nothing
/// of the previous input (transport, device, queues) outlives it.
pub fn guest_memory_of(size: usize, image: &[u8]) -> GuestMemoryMmap {
    static MAPPINGS: std::sync::Mutex<Vec<(usize, GuestMemoryMmap)>> =
        std::sync::Mutex::new(Vec::new());
    let mut mappings = MAPPINGS.lock().unwrap_or_else(|e| e.into_inner());
    let mem = match mappings.iter().find(|(s, _)| *s == size) {
        Some((_, mem)) => mem.clone(),
        None => {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
                .expect("anonymous memory for the guest");
            mappings.push((size, mem.clone()));
            mem
        }
    };
    let mut bytes = vec![0u8; size];
    let n = image.len().min(size);
    bytes[..n].copy_from_slice(&image[..n]);
    mem.write_slice(&bytes, GuestAddress(0))
        .expect("image fits guest memory");
    mem
}

/// A copy of all of guest memory.
pub fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    use vm_memory::GuestMemoryBackend;
    let len = usize::try_from(mem.last_addr().0 + 1).expect("small guest memory");
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(0))
        .expect("guest memory is one region at 0");
    v
}

/// The little-endian u16 at `addr`, if it is in guest memory.
pub fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(addr)).ok()
}

/// The used-ring entries a device added since the harness last looked, read for the
/// counters (which chains completed, how a frame was spread over buffers).
#[derive(Debug, Default, Clone, Copy)]
pub struct UsedWatch {
    seen: u16,
}

impl UsedWatch {
    /// Starts from the used `idx` queue `q` has now.
    pub fn start(mem: &GuestMemoryMmap, q: &QueueState) -> Self {
        UsedWatch {
            seen: read_u16(mem, q.used + 2).unwrap_or(0),
        }
    }

    /// The entries (head id, length) added to queue `q`'s used ring since the last
    /// call, oldest first. Reads, never writes.
    pub fn advance(&mut self, mem: &GuestMemoryMmap, q: &QueueState) -> Vec<(u32, u32)> {
        let Some(now) = read_u16(mem, q.used + 2) else {
            return Vec::new();
        };
        let added = now.wrapping_sub(self.seen);
        let start = self.seen;
        self.seen = now;
        if q.size == 0 || added > q.size {
            // The driver rewrote the used ring's idx: start over from here.
            return Vec::new();
        }
        (0..added)
            .filter_map(|k| {
                let slot = u64::from(start.wrapping_add(k) % q.size);
                let at = q.used + 4 + 8 * slot;
                Some((
                    mem.read_obj::<u32>(GuestAddress(at)).ok()?,
                    mem.read_obj::<u32>(GuestAddress(at + 4)).ok()?,
                ))
            })
            .collect()
    }
}

/// Descriptor `head` of queue `q` as the driver left it: (addr, len, flags).
pub fn descriptor(mem: &GuestMemoryMmap, q: &QueueState, head: u32) -> Option<(u64, u32, u16)> {
    if head >= u32::from(q.size) {
        return None;
    }
    let at = q.desc + 16 * u64::from(head);
    Some((
        mem.read_obj::<u64>(GuestAddress(at)).ok()?,
        mem.read_obj::<u32>(GuestAddress(at + 8)).ok()?,
        read_u16(mem, at + 12)?,
    ))
}

/// Whether the chain at `head` starts with an indirect descriptor.
pub fn is_indirect(mem: &GuestMemoryMmap, q: &QueueState, head: u32) -> bool {
    descriptor(mem, q, head).is_some_and(|(_, _, flags)| {
        u32::from(flags) & virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT != 0
    })
}

impl From<&zc_devices::virtio::rings::QueueConfig> for QueueState {
    /// A queue the transport accepted (its size is valid).
    fn from(c: &zc_devices::virtio::rings::QueueConfig) -> Self {
        QueueState {
            size: u16::try_from(c.size).expect("an accepted queue's size fits u16"),
            desc: c.desc,
            avail: c.avail,
            used: c.used,
            shadow_used: 0,
        }
    }
}

/// What the driver writes into one queue's registers.
#[derive(Debug, Clone, Copy)]
pub struct QueueParams {
    /// `QueueNum` as written (may be invalid: the transport then refuses DRIVER_OK).
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Written to the available ring's `idx` before activation.
    pub avail_idx: u16,
    pub ready: bool,
}

impl QueueParams {
    /// 18 bytes: usually a power-of-two size and ring addresses inside the 64 KiB of
    /// RAM; a flag byte selects raw sizes, addresses anywhere, or a queue left not ready.
    pub fn decode(inp: &mut Input) -> Self {
        let size_sel = inp.u8();
        let raw_size = inp.u16();
        let flags = inp.u8();
        let (d, a, u) = (inp.u32(), inp.u32(), inp.u32());
        let avail_idx = inp.u16();
        let size = if size_sel & 0x80 != 0 {
            raw_size
        } else {
            1 << (size_sel % 9)
        };
        let addr = |v: u32| {
            if flags & 1 != 0 {
                u64::from(v) | (u64::from(flags >> 4) << 32)
            } else {
                u64::from(v & 0xffff)
            }
        };
        QueueParams {
            size,
            desc: addr(d),
            avail: addr(a),
            used: addr(u),
            avail_idx,
            ready: flags & 2 == 0,
        }
    }
}

/// A queue as the device got it, plus what the harness knows of the device's side.
#[derive(Debug, Clone, Copy)]
pub struct QueueState {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The device's `next_used` as far as the harness can tell (0 after activation).
    pub shadow_used: u16,
}

pub fn write_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

pub fn read_reg<D: VirtioDevice>(t: &mut MmioTransport<D>, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The driver's initialisation sequence (virtio 1.2, 3.1.1 and 4.2.3): negotiate
/// `offered & feature_mask` (plus VERSION_1), set up `queues`, write their avail
/// `idx` into guest memory, and set DRIVER_OK. Returns the queues as activated, or
/// `None` when the transport or the device refused them.
pub fn handshake<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    mem: &GuestMemoryMmap,
    feature_mask: u64,
    queues: &[QueueParams],
) -> Option<Vec<QueueState>> {
    write_reg(t, reg::STATUS, 0);
    write_reg(t, reg::STATUS, ACKNOWLEDGE);
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    let acked = (t.device_features() & feature_mask) | VIRTIO_F_VERSION_1;
    for sel in 0..2u32 {
        write_reg(t, reg::DRIVER_FEATURES_SEL, sel);
        write_reg(t, reg::DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
    }
    write_reg(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(
        read_reg(t, reg::STATUS) & FEATURES_OK,
        0,
        "transport refused a subset of its own features ({acked:#x})"
    );
    let mut states = Vec::with_capacity(queues.len());
    for (i, q) in queues.iter().enumerate() {
        write_reg(t, reg::QUEUE_SEL, i as u32);
        write_reg(t, reg::QUEUE_NUM, u32::from(q.size));
        write_reg(t, reg::QUEUE_DESC_LOW, q.desc as u32);
        write_reg(t, reg::QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
        write_reg(t, reg::QUEUE_DRIVER_LOW, q.avail as u32);
        write_reg(t, reg::QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
        write_reg(t, reg::QUEUE_DEVICE_LOW, q.used as u32);
        write_reg(t, reg::QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
        write_reg(t, reg::QUEUE_READY, u32::from(q.ready));
        // The transport keeps what the driver wrote, whatever it is, and checks it
        // at DRIVER_OK.
        let reg64 = |t: &mut MmioTransport<D>, low: u64| {
            u64::from(read_reg(t, low)) | (u64::from(read_reg(t, low + 4)) << 32)
        };
        let written = (
            read_reg(t, reg::QUEUE_NUM),
            reg64(t, reg::QUEUE_DESC_LOW),
            reg64(t, reg::QUEUE_DRIVER_LOW),
            reg64(t, reg::QUEUE_DEVICE_LOW),
        );
        assert_eq!(
            written,
            (u32::from(q.size), q.desc, q.avail, q.used),
            "queue registers do not read back as written"
        );
        // Ignored when outside memory: the transport then refuses the queue.
        let _ = mem.write_obj(q.avail_idx, GuestAddress(q.avail.wrapping_add(2)));
        states.push(QueueState {
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            shadow_used: 0,
        });
    }
    write_reg(
        t,
        reg::STATUS,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    if t.is_active() {
        assert!(
            !t.interrupt().needs_reset(),
            "active device already needs a reset"
        );
        Some(states)
    } else {
        None
    }
}

/// One step of the driver after activation.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Write `QueueNotify` (the index may name no queue).
    Notify(u16),
    /// Advance the available `idx` of a queue by `n`, then notify it.
    Publish { queue: u16, n: u16 },
    /// Overwrite one byte of guest memory (the driver editing rings or buffers).
    Poke { addr: u16, value: u8 },
    /// Acknowledge interrupts.
    Ack(u32),
    /// Device-specific (net: run the backend's timers and deliver).
    Poll,
    /// Reset the device and initialise it again with the same parameters.
    Reinit,
}

impl Op {
    /// 4 bytes.
    pub fn decode(inp: &mut Input) -> Self {
        let (k, a, b, c) = (inp.u8(), inp.u8(), inp.u8(), inp.u8());
        match k % 8 {
            0 | 1 => Op::Notify(u16::from(a % 3)),
            2 | 3 => Op::Publish {
                queue: u16::from(a % 2),
                n: u16::from(b % 8) + 1,
            },
            4 => Op::Poke {
                addr: u16::from_le_bytes([a, b]),
                value: c,
            },
            5 => Op::Ack(u32::from(a)),
            6 => Op::Poll,
            _ => Op::Reinit,
        }
    }
}

/// Notifies queue `index` and checks what the device did with it.
///
/// - A device in DEVICE_NEEDS_RESET changes no guest memory, even when its
///   `process_queue` is called directly (the transport ignores the notify).
/// - For `checked` (the state of the notified queue, when the harness can tell what
///   the device must do with it): a device still healthy afterwards leaves the used
///   `idx` equal to the available `idx` (every published chain answered, none
///   twice), and when the driver's `idx` did not change under the device, the used
///   `idx` moved by at most the queue size. `name` names the queue in messages.
pub fn notify_and_check<D: VirtioDevice>(
    t: &mut MmioTransport<D>,
    mem: &GuestMemoryMmap,
    index: u16,
    checked: Option<&mut QueueState>,
    name: &str,
) {
    if t.interrupt().needs_reset() {
        let before = snapshot(mem);
        write_reg(t, reg::QUEUE_NOTIFY, u32::from(index));
        t.device_mut().process_queue(index);
        assert!(
            snapshot(mem) == before,
            "device in NEEDS_RESET wrote guest memory"
        );
        return;
    }
    let Some(q) = checked else {
        write_reg(t, reg::QUEUE_NOTIFY, u32::from(index));
        return;
    };
    let a0 = read_u16(mem, q.avail + 2).expect("avail ring was validated");
    write_reg(t, reg::QUEUE_NOTIFY, u32::from(index));
    if t.interrupt().needs_reset() {
        return;
    }
    let a1 = read_u16(mem, q.avail + 2).expect("avail ring was validated");
    if a1 == q.shadow_used {
        return;
    }
    let used = read_u16(mem, q.used + 2).expect("used ring was validated");
    assert_eq!(
        used, a1,
        "healthy device left {name}avail idx {a1} with used idx {used} (was {})",
        q.shadow_used
    );
    if a0 == a1 {
        let moved = a1.wrapping_sub(q.shadow_used);
        assert!(
            moved <= q.size,
            "{name}used idx moved by {moved} in one round on a queue of {}",
            q.size
        );
    }
    q.shadow_used = a1;
}

/// Runs `device_work` (a notify, a poll) and checks that the device changed guest
/// memory only inside the device-writable buffers of the chains offered on `queues`
/// and inside their used rings; with `queues` `None` (the device is not active)
/// nowhere at all. Not checked when the driver offered its own rings as a
/// device-writable buffer: the device's writes can then publish chains that come and
/// go within the run, which a before-and-after comparison cannot follow.
pub fn device_writes<T>(
    mem: &GuestMemoryMmap,
    queues: Option<&[QueueState]>,
    device_work: impl FnOnce() -> T,
) -> T {
    let rings: Vec<QueueRings> = queues
        .unwrap_or(&[])
        .iter()
        .map(|q| QueueRings {
            size: q.size,
            desc: q.desc,
            avail: q.avail,
            used: q.used,
        })
        .collect();
    let check = WriteCheck::start(mem, &rings);
    let out = device_work();
    if !check.offers_its_own_rings() {
        let bad = check.unexpected_writes(mem);
        assert!(
            bad.is_empty(),
            "the device wrote guest memory it was not offered: {:#x?}",
            &bad[..bad.len().min(8)]
        );
    }
    out
}
