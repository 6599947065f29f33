//! Checks zc-images against the real Debian kernels unpacked in `images/cache` (by
//! `zc-image kernel --flavour cloud|generic` or `zc-image build`). Ignored by default
//! because a fresh clone has no cache and fetching one needs apt and ~100 MB of
//! downloads; run with `cargo test -p zc-images -- --ignored`. With no cache it prints
//! a SKIP line, and fails instead if `ZC_REQUIRE_KERNEL_CACHE=1`.

use std::collections::BTreeMap;
use std::path::Path;

use zc_images::initramfs::read_archive_file;
use zc_images::kernel::{self, KernelInfo};

mod common;
use zc_images::modules::{normalise, read_modinfo, ModuleIndex};
use zc_images::role::{build_with_kernel, Role};

fn role_for(info: &KernelInfo) -> Role {
    if info
        .package
        .as_deref()
        .is_some_and(|p| p.contains("-cloud-"))
    {
        Role::Guest
    } else {
        Role::Host
    }
}

#[test]
#[ignore = "needs Debian kernels in images/cache: run `zc-image kernel --flavour cloud` and `--flavour generic` first"]
fn real_cached_kernels() {
    let Some(dirs) = common::cached_kernels_or_skip("real_cached_kernels") else {
        return;
    };
    for dir in dirs {
        check_kernel(&dir);
    }
}

fn check_kernel(dir: &Path) {
    let info = KernelInfo::load(dir).unwrap();
    println!("checking {}", info.describe());

    // The image's own version string agrees with the package layout.
    let version = kernel::image_version(&info.vmlinuz).unwrap();
    assert_eq!(version, info.version);
    assert_eq!(kernel::release_of(&version), info.release);
    let mods = info
        .modules_dir
        .clone()
        .expect("Debian kernels ship modules");
    assert!(mods.ends_with(&info.release));

    // Every module's .modinfo is readable and names the module its file is named after.
    let index = ModuleIndex::scan(&mods).unwrap();
    assert!(
        index.len() > 500,
        "only {} modules indexed in {}",
        index.len(),
        mods.display()
    );
    let mut depends = BTreeMap::new();
    for (name, path) in index.iter() {
        let mi = read_modinfo(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mi.name.as_deref(), Some(name), "{}", path.display());
        depends.insert(name.to_string(), mi.depends);
    }
    // Every dependency named anywhere exists or is built in.
    for (name, deps) in &depends {
        for d in deps {
            assert!(
                index.path(d).is_some() || index.is_builtin(d),
                "{name} depends on unknown {d}"
            );
        }
    }

    // The role's module set, in an order where each module follows its dependencies.
    let role = role_for(&info);
    let order = index.resolve(role.module_roots()).unwrap();
    let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
    println!("  {role}: {}", names.join(" "));
    let pos = |n: &str| names.iter().position(|x| *x == n);
    for (i, m) in order.iter().enumerate() {
        for d in &depends[&m.name] {
            match pos(d) {
                Some(j) => assert!(j < i, "{d} must load before {}", m.name),
                None => assert!(index.is_builtin(d), "{d} (needed by {}) missing", m.name),
            }
        }
    }
    for root in role.module_roots() {
        assert!(
            pos(&normalise(root)).is_some() || index.is_builtin(root),
            "{root}"
        );
    }
    if role == Role::Host {
        let before = |a: &str, b: &str| {
            if let (Some(x), Some(y)) = (pos(a), pos(b)) {
                assert!(x < y, "{a} before {b}: {names:?}");
            }
        };
        assert!(pos("kvm_amd").is_some() && pos("kvm").is_some());
        before("ccp", "kvm_amd");
        before("kvm", "kvm_amd");
        for dep in ["netfs", "fscache", "9pnet"] {
            before(dep, "9p");
        }
        before("9pnet", "9pnet_virtio");
    }

    // The assembled initramfs carries exactly those files, byte for byte.
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    std::fs::write(&init, b"\x7fELF not really").unwrap();
    let built = build_with_kernel(
        role,
        &init,
        &info,
        &[],
        &tmp.path().join("out"),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(built.info.modules, names);
    let entries = read_archive_file(&built.initrd).unwrap();
    let list = entries.iter().find(|e| e.name == "etc/zc/modules").unwrap();
    let list = String::from_utf8(list.data.clone()).unwrap();
    assert_eq!(list.lines().count(), order.len());
    for (line, m) in list.lines().zip(&order) {
        let e = entries
            .iter()
            .find(|e| format!("/{}", e.name) == line)
            .unwrap();
        assert_eq!(e.data, std::fs::read(&m.path).unwrap(), "{line}");
        assert!(
            line.ends_with(m.compression.suffix()),
            "{line} keeps the kernel's compression"
        );
    }
    assert!(entries
        .iter()
        .any(|e| e.name == "dev/console" && e.rdev == (5, 1)));
}
