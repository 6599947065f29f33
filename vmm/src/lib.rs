//! `zc-vmm`: a tiny KVM virtual machine monitor that boots a stock Linux kernel
//! straight into 64-bit mode (no firmware), with a serial console, a guest control
//! channel and ACPI tables that describe its virtio devices (virtio-mmio, or virtio-pci
//! behind a PCI host bridge).
//!
//! One concept per module: [`spec`] (what a run boots: the run spec), [`report`]
//! (what it found: the run report and `run.json`), [`layout`] (memory map), [`boot`]
//! (kernel/initrd/zero page), [`cpu`] (vCPU state), [`acpi`] (tables), [`pio`]
//! (legacy port devices), [`mmio`] (the MMIO bus), [`pci`] (the PCI bus, MSI-X
//! routes and notify ioeventfds of virtio-pci), [`virtio`] (virtio slots and
//! attaching devices), [`vm`] (the VM builder and run loop), [`dirty`] (dirty-page
//! samples), [`exits`] (vCPU exits by device and span), [`dma_view`] (reading DMA logs), [`host`] (which KVM to use),
//! [`emulated`] (running inside an emulated KVM host), [`emulated_run`] (a run
//! spec run there) and [`progress`] (the live count of a method's bytes).

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod dirty;
pub mod dma_trace;
pub mod dma_view;
pub mod emulated;
pub mod emulated_run;
pub mod exits;
pub mod host;
pub mod layout;
pub mod mmio;
pub mod pci;
pub mod pio;
pub mod progress;
pub mod report;
pub mod spec;
pub mod virtio;
pub mod vm;
