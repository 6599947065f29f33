//! The known byte pattern of `zc.test=disk-roundtrip`: a pure function of the byte
//! offset, so a chunk can be generated or checked anywhere without keeping the file.
//!
//! Each 8-byte word at offset `8 * i` is `splitmix64(SEED + i)`, little-endian. Every
//! word differs from its neighbours, so a block written to the wrong place, a stale
//! page or a zeroed page is caught, and the first bad offset says where.

/// Pattern seed: `"zc-rtrip"` in ASCII.
const SEED: u64 = 0x7a63_2d72_7472_6970;

/// The splitmix64 finaliser (Steele, Lea and Flood): a bijection on u64, so distinct
/// word indices give distinct words.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern byte at `offset`.
fn byte_at(offset: u64) -> u8 {
    splitmix64(SEED.wrapping_add(offset / 8)).to_le_bytes()[(offset % 8) as usize]
}

/// Fills `buf` with the pattern bytes of file offsets `offset..offset + buf.len()`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    let mut pos = 0;
    // Unaligned head, byte by byte; then whole words (the common, fast case).
    while pos < buf.len() && !(offset + pos as u64).is_multiple_of(8) {
        buf[pos] = byte_at(offset + pos as u64);
        pos += 1;
    }
    let mut word = (offset + pos as u64) / 8;
    let mut chunks = buf[pos..].chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&splitmix64(SEED.wrapping_add(word)).to_le_bytes());
        word += 1;
    }
    let tail = chunks.into_remainder();
    let tail_offset = word * 8;
    for (i, b) in tail.iter_mut().enumerate() {
        *b = byte_at(tail_offset + i as u64);
    }
}

/// The file offset of the first byte of `buf` (holding offsets `offset..`) that
/// differs from the pattern, or `None` when all match.
pub fn first_mismatch(offset: u64, buf: &[u8]) -> Option<u64> {
    let mut expected = [0u8; 4096];
    let mut done = 0;
    while done < buf.len() {
        let n = (buf.len() - done).min(expected.len());
        let at = offset + done as u64;
        fill(at, &mut expected[..n]);
        if let Some(i) = buf[done..done + n]
            .iter()
            .zip(&expected[..n])
            .position(|(a, b)| a != b)
        {
            return Some(at + i as u64);
        }
        done += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_offset_consistent() {
        let mut whole = vec![0u8; 10_000];
        fill(0, &mut whole);
        // Any sub-range, aligned or not, generates the same bytes.
        for (start, len) in [(0, 1), (3, 13), (8, 4096), (4093, 77), (9_990, 10)] {
            let mut part = vec![0u8; len];
            fill(start as u64, &mut part);
            assert_eq!(part, whole[start..start + len], "{start}+{len}");
        }
        assert_eq!(first_mismatch(0, &whole), None);
        assert_eq!(first_mismatch(5, &whole[5..]), None);
    }

    #[test]
    fn finds_the_first_bad_byte() {
        let mut buf = vec![0u8; 9000];
        fill(1 << 20, &mut buf);
        buf[4100] ^= 1;
        buf[8000] ^= 1;
        assert_eq!(first_mismatch(1 << 20, &buf), Some((1 << 20) + 4100));
        // A shifted copy (data at the wrong offset) does not match.
        let mut shifted = vec![0u8; 4096];
        fill(4096, &mut shifted);
        assert_eq!(first_mismatch(0, &shifted), Some(0));
        assert_eq!(first_mismatch(0, &[0u8; 64]), Some(0));
    }

    #[test]
    fn pages_differ() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        fill(0, &mut a);
        for page in 1..64u64 {
            fill(page * 4096, &mut b);
            assert_ne!(a, b);
        }
    }
}
