//! Recording straight from guest memory (feature `guest-memory`): the device models
//! hand the log their `vm_memory::GuestMemory` and the range.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::handle::COPY_LIMIT;
use crate::{
    fingerprint, page_pieces, writer, DescInfo, DmaLog, Fingerprint, Piece, PAGE_BYTES, PAGE_SIZE,
};

/// Reads `[gpa, gpa + len)` from guest memory page piece by page piece and returns the
/// fingerprint of each piece. Fails if any byte is outside guest memory.
pub fn pieces_from_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    gpa: u64,
    len: u64,
) -> Result<Vec<Piece>, vm_memory::GuestMemoryError> {
    let mut buf = [0u8; PAGE_BYTES];
    // Only a capacity hint: a length beyond the address space fails on the first read.
    let pages = usize::try_from(len.div_ceil(PAGE_SIZE)).unwrap_or(0);
    let mut out = Vec::with_capacity(pages + 1);
    for (piece_gpa, piece_len) in page_pieces(gpa, len) {
        let bytes = &mut buf[..piece_len as usize];
        mem.read_slice(bytes, GuestAddress(piece_gpa))?;
        out.push(Piece {
            gpa: piece_gpa,
            len: piece_len,
            hash: Fingerprint(fingerprint(bytes)),
        });
    }
    Ok(out)
}

impl DmaLog {
    /// Records one descriptor access, fingerprinting the guest's bytes
    /// `[d.gpa, d.gpa + d.len)` as they are now (call it right after the device
    /// wrote them, or when it read them). Like [`pieces_from_guest`], a range not
    /// entirely in guest memory gets no pieces.
    pub fn descriptor_from_guest<M: GuestMemory + ?Sized>(&self, mem: &M, d: DescInfo) {
        if !self.is_enabled() {
            return;
        }
        let len = d.len as usize;
        if len > COPY_LIMIT {
            let pieces = pieces_from_guest(mem, d.gpa, u64::from(d.len)).unwrap_or_default();
            self.push(0, |_| writer::Body::Desc(d, writer::Pieces::Hashed(pieces)));
            return;
        }
        // The copy is taken now, under the queue lock; the writer thread hashes it
        // later (the guest may reuse the buffer as soon as the device completes it).
        self.push(len, |batch| {
            let (copied, dst) = batch.reserve(len);
            let pieces = match mem.read_slice(dst, GuestAddress(d.gpa)) {
                Ok(()) => writer::Pieces::Copied(copied),
                Err(_) => {
                    batch.unreserve(copied);
                    writer::Pieces::Hashed(Vec::new())
                }
            };
            writer::Body::Desc(d, pieces)
        });
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn guest_pieces_hash_the_bytes() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let data: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(0x1800)).unwrap();
        let p = pieces_from_guest(&mem, 0x1800, 0x1800).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].hash.0, fingerprint(&data[..0x800]));
        assert_eq!(p[1].hash.0, fingerprint(&data[0x800..]));
        assert!(pieces_from_guest(&mem, 0xf000, 0x2000).is_err());
    }
}
