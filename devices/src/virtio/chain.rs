//! Descriptor-chain walking with full validation.
//!
//! `virtio_queue::DescriptorChain`'s iterator simply ends (returns `None`) when it
//! meets a bad descriptor: an unreadable table entry, a nested indirect table, a
//! next index past the table, a loop (its time-to-live runs out) or a chain over
//! 4 GiB. A device that iterates it cannot tell a truncated chain from a short one,
//! and it does not say which descriptor index it yielded. So the devices take the
//! chain head from `virtio_queue::Queue` (which owns the rings, the used-ring
//! updates and notification suppression) and follow the chain with
//! [`walk_chain`], which reports exactly what was wrong and each descriptor's index.
//!
//! Buffer addresses are *not* checked here (a device still wants the list to find
//! the status byte and answer with an error); see [`ChainDesc::check`].
//!
//! Devices reach the buffers themselves only through [`GuestChain`] and
//! [`GuestBuffers`], which log every access to the DMA log.

use std::mem::size_of;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

mod guest;
pub use guest::{AccessError, ChainTooLong, FileAccessError, GuestBuffers, GuestChain, Roles};

const DESC_SIZE: u64 = size_of::<Descriptor>() as u64;

/// A descriptor of a chain, as the driver wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainDesc {
    /// Index in the queue's descriptor table, or in the indirect table if `indirect`.
    pub index: u16,
    /// Whether the descriptor came from an indirect table.
    pub indirect: bool,
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`); otherwise device-readable.
    pub writable: bool,
}

/// A problem with one descriptor's buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// `addr + len` wraps around the 64-bit address space.
    #[error("descriptor {index}: address {addr:#x} + length {len:#x} overflows")]
    Overflow {
        /// Descriptor index.
        index: u16,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Part of the buffer is not guest RAM.
    #[error("descriptor {index}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Descriptor index.
        index: u16,
        /// Address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The buffer is empty.
    #[error("descriptor {index}: zero-length buffer")]
    ZeroLength {
        /// Descriptor index.
        index: u16,
    },
}

impl ChainDesc {
    /// Checks that the buffer is non-empty, does not overflow and lies in guest memory.
    pub fn check<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), BufferError> {
        if self.len == 0 {
            return Err(BufferError::ZeroLength { index: self.index });
        }
        if self.addr.checked_add(u64::from(self.len)).is_none() {
            return Err(BufferError::Overflow {
                index: self.index,
                addr: self.addr,
                len: self.len,
            });
        }
        let access = if self.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(GuestAddress(self.addr), self.len as usize, access) {
            return Err(BufferError::OutsideMemory {
                index: self.index,
                addr: self.addr,
                len: self.len,
            });
        }
        Ok(())
    }
}

/// Why a chain could not be followed to its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index is past the end of its table.
    #[error("descriptor index {index} is outside the {} table of {size} entries", if *.indirect { "indirect" } else { "queue's" })]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Entries in the table.
        size: u16,
        /// Whether the table is indirect.
        indirect: bool,
    },
    /// A descriptor table entry could not be read from guest memory.
    #[error("descriptor table entry {index} at {addr:#x} is not in guest memory")]
    TableUnreadable {
        /// The index.
        index: u16,
        /// Its address.
        addr: u64,
    },
    /// More descriptors than the table holds: the `next` links loop.
    #[error("descriptor chain loops or is longer than its {} table ({size} entries)", if *.indirect { "indirect" } else { "queue's" })]
    TooLong {
        /// Entries in the table.
        size: u16,
        /// Whether the table is indirect.
        indirect: bool,
    },
    /// An indirect descriptor inside an indirect table (virtio 1.2, 2.7.5.3.1).
    #[error("indirect descriptor {index} inside an indirect table")]
    NestedIndirect {
        /// Index in the indirect table.
        index: u16,
    },
    /// An indirect descriptor although VIRTIO_RING_F_INDIRECT_DESC was not negotiated.
    #[error("indirect descriptor {index} but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated {
        /// The index.
        index: u16,
    },
    /// An indirect descriptor with VRING_DESC_F_NEXT set (forbidden by 2.7.5.3.1).
    #[error("indirect descriptor {index} also has VRING_DESC_F_NEXT set")]
    IndirectWithNext {
        /// The index.
        index: u16,
    },
    /// The indirect table's length is zero, not a multiple of 16 or too large.
    #[error("indirect descriptor {index}: table length {len} is not a non-zero multiple of 16 up to 65535 entries")]
    IndirectTableLength {
        /// The index.
        index: u16,
        /// The length given.
        len: u32,
    },
    /// The indirect table is not in guest memory.
    #[error("indirect descriptor {index}: table {addr:#x}+{len:#x} is outside guest memory")]
    IndirectTableOutsideMemory {
        /// The index.
        index: u16,
        /// Table address.
        addr: u64,
        /// Table length.
        len: u32,
    },
    /// The buffers add up to more than 4 GiB (virtio 1.2, 2.7.5.2).
    #[error("descriptor chain is longer than 4 GiB in total")]
    TotalTooLong,
}

/// Follows the chain starting at `head` in the descriptor table at `desc_table` of
/// `queue_size` entries. `indirect_allowed` is whether VIRTIO_RING_F_INDIRECT_DESC
/// was negotiated. Never reads outside guest memory, never loops forever: at most
/// `queue_size` entries of the queue's table plus the entries of one indirect table
/// are read.
pub fn walk_chain<M: GuestMemory + ?Sized>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
) -> Result<Vec<ChainDesc>, ChainError> {
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut table_size = queue_size;
    let mut indirect = false;
    let mut index = head;
    let mut ttl = queue_size;
    let mut total: u64 = 0;
    loop {
        if index >= table_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_size,
                indirect,
            });
        }
        if ttl == 0 {
            return Err(ChainError::TooLong {
                size: table_size,
                indirect,
            });
        }
        ttl -= 1;
        let entry = table.0.checked_add(u64::from(index) * DESC_SIZE).ok_or(
            ChainError::TableUnreadable {
                index,
                addr: table.0,
            },
        )?;
        let d: Descriptor = mem
            .read_obj(GuestAddress(entry))
            .map_err(|_| ChainError::TableUnreadable { index, addr: entry })?;
        let flags = u32::from(d.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect { index });
            }
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated { index });
            }
            if flags & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext { index });
            }
            let len = d.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                return Err(ChainError::IndirectTableLength { index, len });
            }
            let addr = d.addr().0;
            if addr.checked_add(u64::from(len)).is_none()
                || !mem.check_range(d.addr(), len as usize, Permissions::Read)
            {
                return Err(ChainError::IndirectTableOutsideMemory { index, addr, len });
            }
            table = d.addr();
            table_size = u16::try_from(entries).expect("checked above: entries <= u16::MAX");
            ttl = table_size;
            indirect = true;
            index = 0;
            continue;
        }
        total += u64::from(d.len());
        if total > u64::from(u32::MAX) {
            return Err(ChainError::TotalTooLong);
        }
        out.push(ChainDesc {
            index,
            indirect,
            addr: d.addr().0,
            len: d.len(),
            writable: flags & VRING_DESC_F_WRITE != 0,
        });
        if flags & VRING_DESC_F_NEXT == 0 {
            return Ok(out);
        }
        index = d.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use crate::virtio::test_util::{IND, NEXT, W as WRITE};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(
        vq: &MockSplitQueue<GuestMemoryMmap>,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        vq.desc_table()
            .store(
                i,
                RawDescriptor::from(Descriptor::new(addr, len, flags, next)),
            )
            .unwrap();
    }

    #[test]
    fn direct_chain_with_indices() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        put(&vq, 3, 0x8000, 16, NEXT, 7);
        put(&vq, 7, 0x9000, 512, NEXT | WRITE, 1);
        put(&vq, 1, 0xa000, 1, WRITE, 0);
        let c = walk_chain(&m, vq.desc_table_addr(), 16, 3, false).unwrap();
        assert_eq!(c.iter().map(|d| d.index).collect::<Vec<_>>(), vec![3, 7, 1]);
        assert!(!c[0].writable && c[1].writable);
    }

    #[test]
    fn loop_is_detected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        put(&vq, 0, 0x8000, 16, NEXT, 1);
        put(&vq, 1, 0x9000, 16, NEXT, 0);
        assert_eq!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, false),
            Err(ChainError::TooLong {
                size: 16,
                indirect: false
            })
        );
    }

    #[test]
    fn next_out_of_range_and_head_out_of_range() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        put(&vq, 0, 0x8000, 16, NEXT, 16);
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, false),
            Err(ChainError::IndexOutOfRange { index: 16, .. })
        ));
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 40, false),
            Err(ChainError::IndexOutOfRange { index: 40, .. })
        ));
    }

    #[test]
    fn table_outside_memory() {
        let m = mem();
        assert!(matches!(
            walk_chain(&m, GuestAddress(u64::MAX - 8), 16, 0, false),
            Err(ChainError::TableUnreadable { .. })
        ));
    }

    #[test]
    fn indirect_rules() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        put(&vq, 0, 0x2_0000, 32, IND, 0);
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, false),
            Err(ChainError::IndirectNotNegotiated { index: 0 })
        ));
        put(&vq, 0, 0x2_0000, 33, IND, 0);
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, true),
            Err(ChainError::IndirectTableLength { len: 33, .. })
        ));
        put(&vq, 0, 0xf_fff0, 32, IND, 0);
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, true),
            Err(ChainError::IndirectTableOutsideMemory { .. })
        ));
        put(&vq, 0, 0x2_0000, 32, IND | NEXT, 1);
        assert!(matches!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, true),
            Err(ChainError::IndirectWithNext { .. })
        ));
    }

    #[test]
    fn chain_over_4gib() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        put(&vq, 0, 0x8000, u32::MAX, NEXT, 1);
        put(&vq, 1, 0x9000, 2, 0, 0);
        assert_eq!(
            walk_chain(&m, vq.desc_table_addr(), 16, 0, false),
            Err(ChainError::TotalTooLong)
        );
    }

    #[test]
    fn buffer_checks() {
        let m = mem();
        let d = |addr, len| ChainDesc {
            index: 0,
            indirect: false,
            addr,
            len,
            writable: true,
        };
        assert!(d(0x1000, 0x1000).check(&m).is_ok());
        assert!(matches!(
            d(0x1000, 0).check(&m),
            Err(BufferError::ZeroLength { .. })
        ));
        assert!(matches!(
            d(u64::MAX, 2).check(&m),
            Err(BufferError::Overflow { .. })
        ));
        assert!(matches!(
            d(0xf_f000, 0x2000).check(&m),
            Err(BufferError::OutsideMemory { .. })
        ));
    }
}
