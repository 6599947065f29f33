//! What the end-to-end tests share: the images `make images` built, and a
//! `zc-vmm run` command already pointed at the default guest and, for emulated mode,
//! at the emulated host's kernel and initrd.

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The directory `make images` wrote, from `ZC_IMAGES`; checks `wanted` is in it.
pub fn images_with(wanted: &str) -> PathBuf {
    let dir = std::env::var_os("ZC_IMAGES")
        .map(PathBuf::from)
        .expect("ZC_IMAGES is not set: run these tests with `make test`");
    assert!(
        dir.join(wanted).is_file(),
        "{} has no {wanted}: run `make images`",
        dir.display()
    );
    dir
}

/// `zc-vmm run --kernel <images>/<kernel> --initrd <images>/guest/initrd.img`, with
/// the emulated host's images set in the environment.
pub fn zc_vmm_run(images: &std::path::Path, kernel: &str) -> Command {
    let mut command = zc_vmm(images);
    command
        .arg("run")
        .arg("--kernel")
        .arg(images.join(kernel))
        .arg("--initrd")
        .arg(images.join("guest/initrd.img"));
    command
}

/// `zc-vmm` with the emulated host's images set in the environment.
pub fn zc_vmm(images: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_zc-vmm"));
    command
        .env("ZC_HOST_KERNEL", images.join("host/vmlinuz"))
        .env("ZC_HOST_INITRD", images.join("host/initrd.img"));
    command
}
