//! Device models for `zc-vmm`. Nothing in this crate touches KVM: every device is
//! driven through plain method calls, so it can be unit-tested without `/dev/kvm`.

pub mod console;
pub mod control;
pub mod dma_log;
pub mod net_peer;
pub mod net_tap;
pub mod pcap;
pub mod virtio;
