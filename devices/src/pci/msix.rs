//! MSI-X (PCI Local Bus 3.0, section 6.8.2): the capability's message control, the
//! vector table (16 bytes per vector: address low/high, data, vector control) and the
//! pending-bit array, both in a memory BAR.
//!
//! A vector fires only when MSI-X is enabled, the function is not masked and the
//! vector is not masked; otherwise its pending bit is set, and the message goes out
//! when the mask is lifted. Delivery is an [`MsiDelivery`]: in the VMM one KVM GSI per
//! vector whose MSI route follows the table entry, raised through an irqfd.

use std::io;
use std::sync::Arc;

/// The capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Length of the MSI-X capability in configuration space.
pub const CAPABILITY_LEN: usize = 12;
/// Message control: MSI-X enable.
pub const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: the vector is masked.
pub const VECTOR_MASKED: u32 = 1;
/// The largest table the capability can describe.
pub const MAX_VECTORS: u16 = 2048;

/// One MSI message: where the device writes, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (on x86: 0xfee0_0000 | destination APIC ID << 12 | flags).
    pub address: u64,
    /// Data (vector, delivery mode, trigger).
    pub data: u32,
}

/// Where MSI-X messages go: the VMM's KVM routes and irqfds, or a recorder in tests.
pub trait MsiDelivery: Send + Sync {
    /// The guest wrote vector `vector`'s table entry: future messages are `message`.
    fn set_route(&self, vector: u16, message: MsiMessage) -> io::Result<()>;
    /// Sends vector `vector`'s message.
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    /// Every vector starts masked (6.8.2.9).
    fn default() -> Self {
        Entry {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_lo) | (u64::from(self.address_hi) << 32),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// An MSI-X table with its pending bits and the capability's two control bits.
pub struct Msix {
    table: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
    delivery: Arc<dyn MsiDelivery>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_mask", &self.function_mask)
            .finish()
    }
}

impl Msix {
    /// A table of `vectors` entries (1 to [`MAX_VECTORS`]), all masked, MSI-X off.
    pub fn new(vectors: u16, delivery: Arc<dyn MsiDelivery>) -> Self {
        let vectors = usize::from(vectors.clamp(1, MAX_VECTORS));
        Msix {
            table: vec![Entry::default(); vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_mask: false,
            delivery,
        }
    }

    /// How many vectors the table holds.
    pub fn vectors(&self) -> u16 {
        u16::try_from(self.table.len()).expect("`new` makes at most MAX_VECTORS entries")
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the pending-bit array takes in its BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.table.len().div_ceil(64) as u64 * 8
    }

    /// The capability's body (ID, next pointer left 0, message control, table and
    /// PBA offset/BIR) for a table at `table_offset` and PBA at `pba_offset` of BAR
    /// `bar`, and the mask of its writable bits (enable and function mask).
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; CAPABILITY_LEN], [u8; 4]) {
        let mut body = [0u8; CAPABILITY_LEN];
        body[0] = CAPABILITY_ID;
        body[2..4].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let writable = [
            0,
            0,
            0,
            ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8,
        ];
        (body, writable)
    }

    /// Whether MSI-X is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The guest wrote the capability's message control: takes the enable and
    /// function-mask bits; vectors pending behind a mask that is now lifted fire.
    pub fn set_control(&mut self, control: u16) {
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_mask = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// Raises `vector`: sent now, or left pending while masked. Nothing happens with
    /// MSI-X off (the function has no INTx pin to fall back on) or for a vector that
    /// is not in the table (e.g. `VIRTIO_MSI_NO_VECTOR`).
    pub fn signal(&mut self, vector: u16) -> io::Result<()> {
        let index = usize::from(vector);
        if !self.enabled || index >= self.table.len() {
            return Ok(());
        }
        if self.function_mask || self.table[index].masked() {
            self.pending[index] = true;
            return Ok(());
        }
        self.delivery.trigger(vector)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false)
    }

    /// A read of the table at `offset`: 4-byte aligned dwords or 8-byte aligned
    /// qwords (6.8.2); anything else reads as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((vector, field)) = self.table_slot(offset, data.len()) else {
            return;
        };
        let entry = &self.table[usize::from(vector)];
        let dwords = [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.control,
        ];
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&dwords[field + i].to_le_bytes());
        }
    }

    /// A write of the table at `offset` (sizes as for [`Self::read_table`]). A
    /// changed address or data updates the vector's route; unmasking a vector with
    /// its pending bit set sends it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((vector, field)) = self.table_slot(offset, data.len()) else {
            return;
        };
        let index = usize::from(vector);
        let before = self.table[index];
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let entry = &mut self.table[index];
            match field + i {
                0 => entry.address_lo = value,
                1 => entry.address_hi = value,
                2 => entry.data = value,
                // Bits other than the mask are reserved (read as zero).
                _ => entry.control = value & VECTOR_MASKED,
            }
        }
        let after = self.table[index];
        if after.message() != before.message() {
            // A failed route update leaves the old route; nothing better to do for the guest.
            let _ = self.delivery.set_route(vector, after.message());
        }
        if before.masked() && !after.masked() {
            self.deliver_pending();
        }
    }

    /// A read of the pending-bit array: 4- or 8-byte aligned; writes are ignored
    /// (the array is read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !(len == 4 || len == 8)
            || !offset.is_multiple_of(len)
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.pba_size())
        {
            return;
        }
        // Inside the array, checked above.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (byte_index, byte) in data.iter_mut().enumerate() {
            let first_bit = (start + byte_index) * 8;
            for bit in 0..8 {
                if self.pending.get(first_bit + bit).copied().unwrap_or(false) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    /// The vector (entry) and first dword of an access, if it is well-formed.
    fn table_slot(&self, offset: u64, len: usize) -> Option<(u16, usize)> {
        let len = len as u64;
        if !(len == 4 || len == 8)
            || !offset.is_multiple_of(len)
            || offset
                .checked_add(len)
                .is_none_or(|end| end > self.table_size())
        {
            return None;
        }
        // Inside the table, checked above: the entry is one of its u16 vectors.
        let vector = u16::try_from(offset / ENTRY_SIZE).ok()?;
        Some((vector, ((offset % ENTRY_SIZE) / 4) as usize))
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_mask {
            return;
        }
        for vector in 0..self.vectors() {
            let index = usize::from(vector);
            if self.pending[index] && !self.table[index].masked() {
                self.pending[index] = false;
                // As in `signal`: a failing line cannot be reported to the guest.
                let _ = self.delivery.trigger(vector);
            }
        }
    }
}

/// An [`MsiDelivery`] that records what it was asked, for tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct RecordingDelivery {
    pub routes: std::sync::Mutex<Vec<(u16, MsiMessage)>>,
    pub triggers: std::sync::Mutex<Vec<u16>>,
}

#[cfg(test)]
impl MsiDelivery for RecordingDelivery {
    fn set_route(&self, vector: u16, message: MsiMessage) -> io::Result<()> {
        self.routes.lock().unwrap().push((vector, message));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.triggers.lock().unwrap().push(vector);
        Ok(())
    }
}

#[cfg(test)]
impl RecordingDelivery {
    pub fn triggered(&self) -> Vec<u16> {
        self.triggers.lock().unwrap().clone()
    }
    pub fn routed(&self) -> Vec<(u16, MsiMessage)> {
        self.routes.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msix(vectors: u16) -> (Msix, Arc<RecordingDelivery>) {
        let delivery = Arc::new(RecordingDelivery::default());
        (Msix::new(vectors, delivery.clone()), delivery)
    }

    fn write_entry(msix: &mut Msix, vector: u64, address: u64, data: u32, control: u32) {
        let at = vector * ENTRY_SIZE;
        msix.write_table(at, &crate::virtio::low32(address).to_le_bytes());
        msix.write_table(at + 4, &((address >> 32) as u32).to_le_bytes());
        msix.write_table(at + 8, &data.to_le_bytes());
        msix.write_table(at + 12, &control.to_le_bytes());
    }

    fn pba(msix: &Msix) -> u64 {
        let mut b = [0u8; 8];
        msix.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn the_capability_describes_the_table_and_pba() {
        let (m, _) = msix(3);
        let (body, writable) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body[0], 0x11);
        assert_eq!(u16::from_le_bytes([body[2], body[3]]), 2, "table size N-1");
        assert_eq!(
            u32::from_le_bytes(body[4..8].try_into().unwrap()),
            0x4000,
            "BIR 0"
        );
        assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 0x5000);
        assert_eq!(writable, [0, 0, 0, 0xc0], "enable and function mask only");
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
    }

    #[test]
    fn entries_start_masked_and_nothing_fires_while_msix_is_off() {
        let (mut m, d) = msix(2);
        let mut b = [0u8; 4];
        m.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), VECTOR_MASKED);
        m.signal(0).unwrap();
        assert!(d.triggered().is_empty());
        assert!(!m.is_pending(0), "MSI-X off: no pending bit either");
    }

    #[test]
    fn a_table_write_sets_the_route_and_unmasking_delivers() {
        let (mut m, d) = msix(2);
        m.set_control(CONTROL_ENABLE);
        write_entry(&mut m, 1, 0xfee0_1000, 0x4041, VECTOR_MASKED);
        assert_eq!(
            d.routed().last(),
            Some(&(
                1,
                MsiMessage {
                    address: 0xfee0_1000,
                    data: 0x4041
                }
            ))
        );
        // Masked: pending, not sent.
        m.signal(1).unwrap();
        assert!(d.triggered().is_empty());
        assert!(m.is_pending(1));
        assert_eq!(pba(&m), 0b10);
        // Unmask: the pending message goes out once and the bit clears.
        m.write_table(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(d.triggered(), vec![1]);
        assert_eq!(pba(&m), 0);
        m.signal(1).unwrap();
        assert_eq!(d.triggered(), vec![1, 1]);
        // Rewriting the same message does not touch the route again.
        let routes = d.routed().len();
        m.write_table(ENTRY_SIZE + 8, &0x4041u32.to_le_bytes());
        assert_eq!(d.routed().len(), routes);
    }

    #[test]
    fn the_function_mask_holds_every_vector() {
        let (mut m, d) = msix(2);
        write_entry(&mut m, 0, 0xfee0_0000, 0x30, 0);
        write_entry(&mut m, 1, 0xfee0_0000, 0x31, 0);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(0).unwrap();
        m.signal(1).unwrap();
        assert!(d.triggered().is_empty());
        assert_eq!(pba(&m), 0b11);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(d.triggered(), vec![0, 1]);
        assert_eq!(pba(&m), 0);
    }

    #[test]
    fn a_qword_access_covers_two_fields() {
        let (mut m, _) = msix(1);
        m.write_table(0, &0x0000_0001_fee0_0000u64.to_le_bytes());
        let mut b = [0u8; 8];
        m.read_table(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x0000_0001_fee0_0000);
    }

    #[rstest::rstest]
    #[case::byte(0, 1)]
    #[case::word(0, 2)]
    #[case::unaligned_dword(2, 4)]
    #[case::unaligned_qword(4, 8)]
    #[case::past_the_table(32, 4)]
    #[case::far_away(u64::MAX - 3, 4)]
    fn bad_table_accesses_are_ignored(#[case] offset: u64, #[case] len: usize) {
        let (mut m, d) = msix(2);
        m.write_table(offset, &vec![0u8; len]);
        let mut b = vec![0xffu8; len];
        m.read_table(offset, &mut b);
        assert!(b.iter().all(|&x| x == 0));
        assert!(d.routed().is_empty());
        let mut control = [0u8; 4];
        m.read_table(12, &mut control);
        assert_eq!(u32::from_le_bytes(control), VECTOR_MASKED, "still masked");
        m.read_pba(offset, &mut b);
    }

    #[test]
    fn vectors_outside_the_table_do_nothing() {
        let (mut m, d) = msix(2);
        m.set_control(CONTROL_ENABLE);
        m.signal(2).unwrap();
        m.signal(0xffff).unwrap();
        assert!(d.triggered().is_empty());
        assert_eq!(pba(&m), 0);
    }
}
