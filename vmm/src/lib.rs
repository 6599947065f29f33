//! `zc-vmm`: a tiny KVM virtual machine monitor that boots a stock Linux kernel
//! straight into 64-bit mode (no firmware), with a serial console, a guest control
//! channel and ACPI tables that describe its virtio-mmio devices.
//!
//! One concept per module: [`layout`] (memory map), [`boot`] (kernel/initrd/zero
//! page), [`cpu`] (vCPU state), [`acpi`] (tables), [`pio`] (legacy port devices),
//! [`mmio`] (the MMIO bus), [`virtio`] (attaching virtio devices), [`vm`] (the VM and
//! its run loop), [`dirty`] (dirty-page samples: which payload bytes the guest CPU
//! wrote), [`dma_view`] (reading a DMA log back for `zc-vmm dma-log`), [`host`]
//! (which KVM to use) and [`emulated`] (running inside an emulated KVM host).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod dirty;
pub mod dma_view;
pub mod emulated;
pub mod host;
pub mod layout;
pub mod mmio;
pub mod pio;
pub mod virtio;
pub mod vm;
