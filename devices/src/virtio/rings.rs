//! A queue's configuration as the driver wrote it, and the check both transports run
//! on it at DRIVER_OK.
//!
//! The transports keep their own copy of what the driver wrote to the queue registers
//! ([`QueueConfig`]) instead of writing straight into `virtio_queue::Queue`, because
//! `Queue`'s setters drop a value they do not like (a misaligned ring address, a size
//! that is not a power of two) and keep the old one, which after a reset is 0: the
//! device would then use guest memory the driver never gave it. Here the driver's
//! values stay as written, [`check_queues`] refuses at DRIVER_OK a layout the device
//! cannot use exactly as written, and only a layout that passed becomes a `Queue`.

use std::fmt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::GuestMem;

/// Bytes of one descriptor table entry (virtio 1.2, 2.7.5).
const DESC_BYTES: u64 = 16;
/// The available ring's `flags`, `idx` and `used_event` (2.7.6).
const AVAIL_META_BYTES: u64 = 6;
/// One available ring entry.
const AVAIL_ENTRY_BYTES: u64 = 2;
/// The used ring's `flags`, `idx` and `avail_event` (2.7.8).
const USED_META_BYTES: u64 = 6;
/// One used ring element (`id`, `len`).
const USED_ENTRY_BYTES: u64 = 8;

/// One of the three parts of a split virtqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingPart {
    /// The descriptor table (read by the device).
    DescriptorTable,
    /// The available ring, the driver area (read by the device).
    AvailableRing,
    /// The used ring, the device area (written by the device).
    UsedRing,
}

impl RingPart {
    /// The alignment the split virtqueue format requires (virtio 1.2, 2.7).
    pub fn alignment(self) -> u64 {
        match self {
            RingPart::DescriptorTable => 16,
            RingPart::AvailableRing => 2,
            RingPart::UsedRing => 4,
        }
    }

    /// Bytes the part spans in a queue of `size` entries, its event field included
    /// whether or not EVENT_IDX is negotiated (the spec's sizes, 2.7).
    pub fn len(self, size: u16) -> u64 {
        let n = u64::from(size);
        match self {
            RingPart::DescriptorTable => DESC_BYTES * n,
            RingPart::AvailableRing => AVAIL_META_BYTES + AVAIL_ENTRY_BYTES * n,
            RingPart::UsedRing => USED_META_BYTES + USED_ENTRY_BYTES * n,
        }
    }
}

impl fmt::Display for RingPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RingPart::DescriptorTable => "descriptor table",
            RingPart::AvailableRing => "available ring",
            RingPart::UsedRing => "used ring",
        })
    }
}

/// Why a queue the driver enabled cannot be used as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The size is 0, above the device's maximum or not a power of two.
    #[error("queue size {size} is not a power of two between 1 and {max}")]
    Size {
        /// The size the driver wrote.
        size: u32,
        /// The device's maximum.
        max: u16,
    },
    /// A part's address breaks the split virtqueue's alignment.
    #[error("{part} at {addr:#x} is not aligned to {} bytes", part.alignment())]
    Misaligned {
        /// The part.
        part: RingPart,
        /// Its address.
        addr: u64,
    },
    /// A part is not (wholly) in guest RAM, or its end overflows.
    #[error("{part} {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// The part.
        part: RingPart,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The used ring shares bytes with another part of this or another queue: the
    /// device's writes to it would change what the driver wrote there.
    #[error("used ring {addr:#x}+{len:#x} overlaps the {other} at {other_addr:#x} of queue {other_queue}")]
    Overlap {
        /// The used ring's address.
        addr: u64,
        /// Its length.
        len: u64,
        /// The part it overlaps.
        other: RingPart,
        /// That part's queue.
        other_queue: u16,
        /// That part's address.
        other_addr: u64,
    },
}

/// A queue the driver set up that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue {queue}: {error}")]
pub struct QueueRefused {
    /// The queue's index.
    pub queue: u16,
    /// What is wrong with it.
    pub error: RingError,
}

/// One queue's registers as the driver last wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// The device's maximum size (`QueueNumMax`); the size after a reset.
    pub max_size: u16,
    /// The size the driver wrote (`QueueNum`, PCI `queue_size`), unchecked.
    pub size: u32,
    /// `QueueReady` / `queue_enable`.
    pub ready: bool,
    /// The descriptor table's address.
    pub desc: u64,
    /// The available ring's (driver area's) address.
    pub avail: u64,
    /// The used ring's (device area's) address.
    pub used: u64,
}

impl QueueConfig {
    /// A queue of at most `max_size` entries in its reset state. A device whose
    /// maximum is not a valid queue size (a power of two up to 32768) gets 1 rather
    /// than a panic; its `QueueNumMax` then reads 1.
    pub fn new(max_size: u16) -> Self {
        let max_size = if max_size.is_power_of_two() && max_size <= 32768 {
            max_size
        } else {
            1
        };
        QueueConfig {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Back to the reset state.
    pub fn reset(&mut self) {
        *self = QueueConfig::new(self.max_size);
    }

    /// The size as a valid queue size, if it is one.
    fn valid_size(&self) -> Result<u16, RingError> {
        u16::try_from(self.size)
            .ok()
            .filter(|s| s.is_power_of_two() && *s <= self.max_size)
            .ok_or(RingError::Size {
                size: self.size,
                max: self.max_size,
            })
    }

    /// The three parts as `(part, address, length)`; `size` must be valid.
    fn parts(&self, size: u16) -> [(RingPart, u64, u64); 3] {
        [
            (RingPart::DescriptorTable, self.desc),
            (RingPart::AvailableRing, self.avail),
            (RingPart::UsedRing, self.used),
        ]
        .map(|(part, addr)| (part, addr, part.len(size)))
    }

    /// Checks this queue on its own: size, alignment, every part in guest RAM.
    fn check(&self, mem: &GuestMem) -> Result<(), RingError> {
        let size = self.valid_size()?;
        for (part, addr, len) in self.parts(size) {
            if addr % part.alignment() != 0 {
                return Err(RingError::Misaligned { part, addr });
            }
            let access = if part == RingPart::UsedRing {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let fits = addr.checked_add(len).is_some()
                && usize::try_from(len)
                    .is_ok_and(|n| mem.check_range(GuestAddress(addr), n, access));
            if !fits {
                return Err(RingError::OutsideMemory { part, addr, len });
            }
        }
        Ok(())
    }

    /// The `virtio_queue::Queue` the device gets for a queue that passed
    /// [`check_queues`] (or one not ready, which the device must not use).
    pub fn to_queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.max_size).expect("QueueConfig::new keeps a valid maximum");
        if self.ready {
            // Checked at DRIVER_OK: none of these can be refused.
            let size = self.valid_size().expect("checked by check_queues");
            q.try_set_size(size).expect("checked by check_queues");
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .expect("checked by check_queues");
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .expect("checked by check_queues");
            q.try_set_used_ring_address(GuestAddress(self.used))
                .expect("checked by check_queues");
            q.set_ready(true);
        }
        q.set_event_idx(event_idx);
        q
    }
}

/// Checks every ready queue of a device at DRIVER_OK: a valid size, each part
/// aligned and in guest RAM, and no used ring sharing a byte with any part of a ready
/// queue (its own included) other than itself. The first queue at fault and why.
pub fn check_queues(mem: &GuestMem, queues: &[QueueConfig]) -> Result<(), QueueRefused> {
    let index = |i: usize| u16::try_from(i).expect("a device has fewer than 65536 queues");
    let ready = || queues.iter().enumerate().filter(|(_, q)| q.ready);
    for (i, q) in ready() {
        q.check(mem).map_err(|error| QueueRefused {
            queue: index(i),
            error,
        })?;
    }
    for (i, q) in ready() {
        let size = q.valid_size().expect("checked above");
        let (addr, len) = (q.used, RingPart::UsedRing.len(size));
        for (j, other) in ready() {
            let other_size = other.valid_size().expect("checked above");
            for (part, other_addr, other_len) in other.parts(other_size) {
                let itself = i == j && part == RingPart::UsedRing;
                // Both ranges are in guest RAM, so neither end overflows.
                if !itself && addr < other_addr + other_len && other_addr < addr + len {
                    return Err(QueueRefused {
                        queue: index(i),
                        error: RingError::Overlap {
                            addr,
                            len,
                            other: part,
                            other_queue: index(j),
                            other_addr,
                        },
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    fn queue(size: u32, desc: u64, avail: u64, used: u64) -> QueueConfig {
        QueueConfig {
            size,
            ready: true,
            desc,
            avail,
            used,
            ..QueueConfig::new(16)
        }
    }

    fn refused(queues: &[QueueConfig]) -> RingError {
        check_queues(&mem(), queues).unwrap_err().error
    }

    #[test]
    fn a_layout_at_the_edges_of_the_rules_is_accepted() {
        // Avail ring at GPA 0, rings packed back to back, the used ring as close to
        // the end of RAM as its alignment allows.
        let used = (0x1_0000 - RingPart::UsedRing.len(16)) & !3;
        let q = queue(16, 0x100, 0, used);
        assert!(check_queues(&mem(), &[q]).is_ok());
        assert!(check_queues(&mem(), &[queue(16, 0x100, 0, used + 4)]).is_err());
        let packed = queue(16, 0, 0x100, 0x100 + RingPart::AvailableRing.len(16) + 2);
        assert!(check_queues(&mem(), &[packed]).is_ok());
        // A queue not ready is not looked at.
        let junk = QueueConfig {
            ready: false,
            ..queue(3, 1, 1, 1)
        };
        assert!(check_queues(&mem(), &[q, junk]).is_ok());
    }

    #[test]
    fn each_rule_is_enforced() {
        let size = |s| RingError::Size { size: s, max: 16 };
        assert_eq!(refused(&[queue(0, 0, 0x1000, 0x2000)]), size(0));
        assert_eq!(refused(&[queue(6, 0, 0x1000, 0x2000)]), size(6));
        assert_eq!(refused(&[queue(32, 0, 0x1000, 0x2000)]), size(32));
        assert_eq!(
            refused(&[queue(0x1_0010, 0, 0x1000, 0x2000)]),
            size(0x1_0010)
        );
        let misaligned = |part, addr| RingError::Misaligned { part, addr };
        assert_eq!(
            refused(&[queue(16, 0x8, 0x1000, 0x2000)]),
            misaligned(RingPart::DescriptorTable, 0x8)
        );
        assert_eq!(
            refused(&[queue(16, 0, 0x1001, 0x2000)]),
            misaligned(RingPart::AvailableRing, 0x1001)
        );
        assert_eq!(
            refused(&[queue(16, 0, 0x1000, 0x3002)]),
            misaligned(RingPart::UsedRing, 0x3002)
        );
        assert!(matches!(
            refused(&[queue(16, 0, 0x1000, 0xfff0)]),
            RingError::OutsideMemory {
                part: RingPart::UsedRing,
                ..
            }
        ));
        assert!(matches!(
            refused(&[queue(16, u64::MAX - 15, 0x1000, 0x2000)]),
            RingError::OutsideMemory {
                part: RingPart::DescriptorTable,
                ..
            }
        ));
    }

    #[test]
    fn a_used_ring_over_any_other_part_is_refused() {
        // The layout: used.flags is avail.idx.
        assert_eq!(
            refused(&[queue(16, 0x1000, 0x2002, 0x2004)]),
            RingError::Overlap {
                addr: 0x2004,
                len: 134,
                other: RingPart::AvailableRing,
                other_queue: 0,
                other_addr: 0x2002
            }
        );
        // Over its own descriptor table, by its last bytes.
        assert!(matches!(
            refused(&[queue(16, 0x1080, 0x3000, 0x1000)]),
            RingError::Overlap {
                other: RingPart::DescriptorTable,
                ..
            }
        ));
        // Over another queue's used ring, and another queue's available ring.
        let a = queue(16, 0x1000, 0x2000, 0x3000);
        assert!(matches!(
            refused(&[a, queue(16, 0x4000, 0x5000, 0x3080)]),
            RingError::Overlap {
                other: RingPart::UsedRing,
                ..
            }
        ));
        assert_eq!(
            check_queues(&mem(), &[a, queue(16, 0x4000, 0x3000 - 6, 0x5000)])
                .unwrap_err()
                .queue,
            0
        );
        // Rings the device only reads may share bytes.
        assert!(check_queues(&mem(), &[a, queue(16, 0x1000, 0x2000, 0x5000)]).is_ok());
    }

    #[test]
    fn the_queue_gets_exactly_what_was_written() {
        let q = queue(8, 0x1000, 0, 0x2004).to_queue(true);
        assert_eq!(
            (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()),
            (8, 0x1000, 0, 0x2004)
        );
        assert!(q.ready() && q.event_idx_enabled());
        let idle = QueueConfig::new(16).to_queue(false);
        assert!(!idle.ready());
        assert_eq!(QueueConfig::new(6).max_size, 1);
    }
}
