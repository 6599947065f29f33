//! The guest's two virtio-blk disks, as every side names them: the read-only test
//! disk holding the payload, and the writable scratch disk the receive methods
//! write to. The guest finds each by its ext4 label (device names follow the
//! transport's probe order); the DMA log names each by its card, the order the VMM
//! attaches them in (the `n`-th disk is card `n`).

/// The test disk's ext4 label (`zc-image disk`).
pub const TEST_DISK_LABEL: &str = "zc-test";
/// The scratch disk's ext4 label (`zc-image scratch`).
pub const SCRATCH_DISK_LABEL: &str = "zc-scratch";
/// The test disk's card in the DMA log (`blk/...`): attached first.
pub const TEST_DISK_CARD: u16 = 0;
/// The scratch disk's card in the DMA log (`blk1/...`): attached second.
pub const SCRATCH_DISK_CARD: u16 = 1;
