//! The devices' promise about guest memory, checked from the outside for unit tests
//! and fuzz targets: a device writes only inside buffers the driver offered as
//! device-writable and inside its used rings.
//!
//! [`WriteCheck::start`] copies all of guest memory and notes what the driver offers
//! on each queue; after the device ran, [`WriteCheck::unexpected_writes`] compares
//! memory with the copy and returns every changed byte outside those places. What
//! counts as offered: the device-writable buffers of the chains whose heads are in
//! any slot of the available ring (followed as [`walk_chain`] does, indirect tables
//! included), before or after the run, and each used ring in full.
//!
//! A diff, not a write-tracking memory: the devices write through `vm-memory`'s own
//! types (and `read_exact_volatile_from` straight from files), which a wrapper would
//! have to reimplement. The price: a device that writes a byte with the value it had
//! is not seen, and when the driver offers its own descriptor table or available ring
//! as a device-writable buffer, the device's writes can publish chains that come and
//! go within one run; [`WriteCheck::offers_its_own_rings`] says so, and then the
//! check proves less.

use std::collections::BTreeSet;
use std::ops::Range;

use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::chain::walk_chain;
use super::rings::RingPart;

/// Where one queue's parts are, as the driver set them up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRings {
    /// Entries in the queue.
    pub size: u16,
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
}

impl QueueRings {
    fn used_ring(&self) -> Range<u64> {
        span(self.used, RingPart::UsedRing.len(self.size))
    }

    /// The ranges the device reads to find chains: the descriptor table, the
    /// available ring and every indirect table the descriptor table points to.
    fn driver_structures(&self, mem: &GuestMemoryMmap) -> Vec<Range<u64>> {
        let mut v = vec![
            span(self.desc, RingPart::DescriptorTable.len(self.size)),
            span(self.avail, RingPart::AvailableRing.len(self.size)),
        ];
        for i in 0..u64::from(self.size) {
            let Ok(d) = mem.read_obj::<Descriptor>(GuestAddress(self.desc.wrapping_add(16 * i)))
            else {
                continue;
            };
            if u32::from(d.flags()) & VRING_DESC_F_INDIRECT != 0 {
                v.push(span(d.addr().0, u64::from(d.len())));
            }
        }
        v
    }

    /// The device-writable buffers of the chains whose heads sit in the available
    /// ring's slots now.
    fn offered(&self, mem: &GuestMemoryMmap) -> Vec<Range<u64>> {
        let heads: BTreeSet<u16> = (0..u64::from(self.size))
            .filter_map(|slot| {
                mem.read_obj::<u16>(GuestAddress(self.avail.wrapping_add(4 + 2 * slot)))
                    .ok()
            })
            .map(u16::from_le)
            .collect();
        let mut v = Vec::new();
        for head in heads {
            // A chain the device cannot walk it cannot write to either.
            let Ok(descs) = walk_chain(mem, GuestAddress(self.desc), self.size, head, true) else {
                continue;
            };
            v.extend(
                descs
                    .iter()
                    .filter(|d| d.writable)
                    .map(|d| span(d.addr, u64::from(d.len))),
            );
        }
        v
    }
}

/// `[start, start + len)`, cut at the end of the address space.
fn span(start: u64, len: u64) -> Range<u64> {
    start..start.saturating_add(len)
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// A copy of guest memory and what the driver offered when it was taken.
#[derive(Debug)]
pub struct WriteCheck {
    queues: Vec<QueueRings>,
    /// Each region: its start and its bytes.
    before: Vec<(u64, Vec<u8>)>,
    /// Device-writable buffers offered at the start.
    offered: Vec<Range<u64>>,
    own_rings: bool,
}

impl WriteCheck {
    /// Copies `mem` and notes what the driver offers on `queues`.
    pub fn start(mem: &GuestMemoryMmap, queues: &[QueueRings]) -> Self {
        let before = mem
            .iter()
            .map(|region| {
                let len = usize::try_from(region.len()).expect("a guest region fits in memory");
                let mut bytes = vec![0u8; len];
                mem.read_slice(&mut bytes, region.start_addr())
                    .expect("the region's own range");
                (region.start_addr().0, bytes)
            })
            .collect();
        let offered: Vec<_> = queues.iter().flat_map(|q| q.offered(mem)).collect();
        let own_rings = queues.iter().any(|q| {
            q.driver_structures(mem)
                .iter()
                .any(|s| offered.iter().any(|o| overlaps(o, s)))
        });
        WriteCheck {
            queues: queues.to_vec(),
            before,
            offered,
            own_rings,
        }
    }

    /// Whether the driver offered part of a descriptor table, an available ring or an
    /// indirect table as a device-writable buffer when the check started.
    pub fn offers_its_own_rings(&self) -> bool {
        self.own_rings
    }

    /// The bytes of `mem` that changed since [`start`](Self::start) outside every
    /// device-writable buffer offered (at the start or now) and every used ring, as
    /// ranges of consecutive addresses.
    pub fn unexpected_writes(&self, mem: &GuestMemoryMmap) -> Vec<Range<u64>> {
        let mut allowed: Vec<Range<u64>> = self.offered.clone();
        allowed.extend(self.queues.iter().flat_map(|q| q.offered(mem)));
        allowed.extend(self.queues.iter().map(QueueRings::used_ring));
        let mut bad: Vec<Range<u64>> = Vec::new();
        // Compared a chunk at a time (one `memcmp` each) and byte by byte only where a
        // chunk changed: under a fuzzer's comparison tracing a per-byte loop over all
        // of memory costs more than everything the device does.
        const CHUNK: usize = 256;
        for (start, bytes) in &self.before {
            let mut now = vec![0u8; bytes.len()];
            mem.read_slice(&mut now, GuestAddress(*start))
                .expect("guest memory keeps its regions");
            if *bytes == now {
                continue;
            }
            let changed = bytes
                .chunks(CHUNK)
                .zip(now.chunks(CHUNK))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .flat_map(|(c, (a, b))| {
                    a.iter()
                        .zip(b.iter())
                        .enumerate()
                        .filter(|(_, (x, y))| x != y)
                        .map(move |(i, _)| c * CHUNK + i)
                });
            for i in changed {
                let addr = start + i as u64;
                if allowed.iter().any(|r| r.contains(&addr)) {
                    continue;
                }
                match bad.last_mut() {
                    Some(r) if r.end == addr => r.end += 1,
                    _ => bad.push(addr..addr + 1),
                }
            }
        }
        bad
    }

    /// Panics, naming the first ranges, if the device wrote anywhere it was not
    /// offered, or if the driver offered its own rings (which would weaken the check).
    pub fn assert_clean(&self, mem: &GuestMemoryMmap) {
        assert!(
            !self.own_rings,
            "the driver offered its own rings as a device-writable buffer: the write check proves little"
        );
        let bad = self.unexpected_writes(mem);
        assert!(
            bad.is_empty(),
            "the device wrote guest memory it was not offered: {:#x?}",
            &bad[..bad.len().min(8)]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{add_chain, leaked_memory, MockQueue, W};

    const USED: u64 = 0x8000;

    fn setup() -> (&'static GuestMemoryMmap, MockQueue, QueueRings) {
        let mem = leaked_memory(0x1_0000);
        let vq = MockQueue::new(mem, 16);
        let rings = QueueRings {
            size: 16,
            desc: vq.desc_table_addr().0,
            avail: vq.avail_addr().0,
            used: USED,
        };
        (mem, vq, rings)
    }

    #[test]
    fn writes_inside_offered_buffers_and_the_used_ring_pass() {
        let (mem, vq, rings) = setup();
        add_chain(
            &vq,
            0,
            &[(0x4000, 16, 0), (0x5000, 0x100, W), (0x6000, 1, W)],
        );
        let check = WriteCheck::start(mem, &[rings]);
        assert!(!check.offers_its_own_rings());
        mem.write_slice(&[0xaa; 0x100], GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(0x6000)).unwrap();
        mem.write_obj(7u32, GuestAddress(USED + 4)).unwrap();
        check.assert_clean(mem);
    }

    #[test]
    fn a_write_anywhere_else_is_reported() {
        let (mem, vq, rings) = setup();
        add_chain(&vq, 0, &[(0x4000, 16, 0), (0x5000, 0x100, W)]);
        let check = WriteCheck::start(mem, &[rings]);
        // The readable header, one byte past the writable buffer, GPA 2.
        mem.write_obj(1u8, GuestAddress(0x4000)).unwrap();
        mem.write_slice(&[1, 2], GuestAddress(0x50ff)).unwrap();
        mem.write_obj(9u16, GuestAddress(2)).unwrap();
        assert_eq!(
            check.unexpected_writes(mem),
            vec![2..3, 0x4000..0x4001, 0x5100..0x5101]
        );
    }

    #[test]
    fn a_driver_offering_its_own_ring_is_flagged() {
        let (mem, vq, rings) = setup();
        add_chain(&vq, 0, &[(rings.avail, 8, W)]);
        assert!(WriteCheck::start(mem, &[rings]).offers_its_own_rings());
    }
}
