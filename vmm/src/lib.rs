//! zc-vmm
