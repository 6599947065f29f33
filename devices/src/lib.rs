//! Device models for `zc-vmm`. Nothing in this crate touches KVM: every device is
//! driven through plain method calls, so it can be unit-tested without `/dev/kvm`.

pub mod console;
pub mod control;
/// The DMA log lives in its own crate, so that readers of a log need no device models;
/// it stays reachable as `zc_devices::dma_log` for the devices and their callers.
pub use zc_dma_log as dma_log;
pub mod net_peer;
pub mod net_tap;
pub mod pcap;
pub mod virtio;
