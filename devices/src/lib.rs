//! Device models for `zc-vmm`. Nothing in this crate touches KVM: every device is
//! driven through plain method calls, so it can be unit-tested without `/dev/kvm`.
//!
//! - [`console`]: the guest's serial console (COM1) output, with its last lines kept;
//! - [`control`]: the guest control channel on COM2 (`docs/control-channel.md`);
//! - [`virtio`]: the virtio-mmio and virtio-pci transports, descriptor-chain walking,
//!   virtio-blk and virtio-net;
//! - [`pci`]: the PCI bus the virtio-pci transport sits on: configuration space,
//!   MSI-X, the type-1 configuration ports and BAR decoding;
//! - [`net_peer`]: the `peer` net backend, a TCP endpoint inside the VMM that checks
//!   every byte the guest sends;
//! - [`net_tap`]: the `tap` net backend, frames to a host tap device;
//! - [`pcap`]: the capture file of every frame a net device carried;
//! - [`dma_log`]: the DMA descriptor log every device writes (`docs/dma-log.md`).

pub mod console;
pub mod control;
/// The DMA log lives in its own crate, so that readers of a log need no device models;
/// it stays reachable as `zc_devices::dma_log` for the devices and their callers.
pub use zc_dma_log as dma_log;
pub mod net_peer;
pub mod net_tap;
pub mod pcap;
pub mod pci;
pub mod virtio;
