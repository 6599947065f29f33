//! The receiver's acknowledgement: once it has every byte of a connection's
//! transfer, the receiving side sends the byte count as 8 bytes, little-endian.
//! Guest to peer: the peer (the VMM's smoltcp or socket peer) sends it once it has
//! received and checked every byte it expects; the guest waits for it before `END`.
//! Peer to guest ([`crate::addr::PEER_SEND_PORT`]): the guest sends it once it has
//! read the whole file, and the peer checks it equals what it sent.

/// Length of the ACK on the wire.
pub const ACK_LEN: usize = 8;

/// The ACK for `bytes` received and checked.
pub fn encode(bytes: u64) -> [u8; ACK_LEN] {
    bytes.to_le_bytes()
}

/// The byte count an ACK carries.
pub fn decode(ack: [u8; ACK_LEN]) -> u64 {
    u64::from_le_bytes(ack)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_little_endian_and_round_trips() {
        assert_eq!(encode(0x0102), [2, 1, 0, 0, 0, 0, 0, 0]);
        for n in [0, 1, 16 << 20, u64::MAX] {
            assert_eq!(decode(encode(n)), n);
        }
    }
}
