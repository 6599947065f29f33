//! zc-images: builds what a zc VM boots.
//!
//! - [`debian`]: pick, download (`apt-get download`), unpack (`dpkg-deb -x`) and cache
//!   a Debian kernel package;
//! - [`kernel`]: what is known about one kernel (Debian's or the user's own bzImage or
//!   vmlinux), including its version read from the image;
//! - [`kconfig`]: the kernel's config (`.config`, `config-<release>`, IKCONFIG) and the
//!   preflight: what a guest needs from it, the methods a kernel skips, the fragment;
//! - [`modules`]: `.modinfo` of `.ko[.xz|.zst|.gz]` files, the module index of a
//!   `lib/modules/<release>` directory, and load-order resolution;
//! - [`initramfs`]: a newc cpio writer (gzip'd) and a reader;
//! - [`role`]: assembles kernel + initramfs for the `guest` or the `host` role;
//! - [`vmlinux`]: the ELF vmlinux extracted from a bzImage's compressed payload;
//! - [`elf`]: the minimal ELF64 reading the others need;
//! - [`disk`]: the test disk, ext4 with files of random, page-unique content;
//! - [`scratch`]: the scratch disk the guest writes to, and reading it back;
//! - [`kbuild`]: kernels built from source (tinyconfig + zc's Kconfig fragment,
//!   patches, cached by their inputs) and users' kernel trees.
#![forbid(unsafe_code)]

pub mod debian;
pub mod disk;
pub mod elf;
pub mod initramfs;
pub mod kbuild;
pub mod kconfig;
pub mod kernel;
pub mod modules;
pub mod role;
pub mod scratch;
pub mod vmlinux;
