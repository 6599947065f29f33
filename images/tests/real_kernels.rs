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
use zc_images::modules::{read_modinfo, ModuleIndex};
use zc_images::role::{build_with_kernel, plan_modules, BuildOptions, GuestNeeds, Need, Role};

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
    let guest = GuestNeeds::default();
    let plan = plan_modules(role, Some(&index), &guest, &[]).unwrap();
    let order = plan.modules;
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
    for need in role.needs(&guest) {
        let names = match need {
            Need::Module(m) => vec![m],
            Need::AnyOf(list) => list,
        };
        assert!(
            names
                .iter()
                .any(|n| pos(n).is_some() || index.is_builtin(n)),
            "{names:?}"
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
        &BuildOptions::default(),
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
        assert_eq!(line.ends_with(" optional"), !m.required, "{line}");
        let line = line.strip_suffix(" optional").unwrap_or(line);
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

/// The unpacked kernel packages named in `ZC_KERNEL_PACKAGES` (colon-separated
/// `dpkg-deb -x` output directories, e.g. Debian's 6.12 rt and 6.1 generic kernels).
fn unpacked_packages_or_skip(test: &str) -> Option<Vec<std::path::PathBuf>> {
    match std::env::var_os("ZC_KERNEL_PACKAGES") {
        Some(v) => Some(std::env::split_paths(&v).collect()),
        None => {
            assert!(
                std::env::var_os("ZC_REQUIRE_KERNEL_PACKAGES").is_none(),
                "ZC_REQUIRE_KERNEL_PACKAGES is set but ZC_KERNEL_PACKAGES names no package"
            );
            println!("SKIP {test}: set ZC_KERNEL_PACKAGES to unpacked kernel packages (apt-get download linux-image-...; dpkg-deb -x)");
            None
        }
    }
}

/// A modular kernel as a user unpacks it: the guest's module set comes from what the
/// kernel's config builds as modules, without naming any. Expected modules follow from
/// the config (fs/ext4/Kconfig: EXT4_FS selects JBD2, FS_MBCACHE, CRC16 and, before
/// 6.15, CRYPTO_CRC32C, which ext4 asks for through its `softdep=pre: crc32c`).
#[test]
#[ignore = "needs unpacked kernel packages: ZC_KERNEL_PACKAGES=dir1:dir2"]
fn unpacked_kernel_packages_get_their_filesystem_modules() {
    use zc_images::kconfig::{self, KernelConfig, TransportChoice, Value};
    let Some(dirs) = unpacked_packages_or_skip("unpacked_kernel_packages") else {
        return;
    };
    for dir in dirs {
        let boot = dir.join("boot");
        let image = std::fs::read_dir(&boot)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vmlinuz-")
            })
            .unwrap_or_else(|| panic!("no vmlinuz in {}", boot.display()));
        let release = kernel::release_of(&kernel::image_version(&image).unwrap()).to_string();
        let mods = dir.join("lib/modules").join(&release);
        let info = kernel::user_kernel(&image, Some(&mods)).unwrap();
        let config = KernelConfig::read(&boot.join(format!("config-{release}"))).unwrap();
        let index = ModuleIndex::scan(&mods).unwrap();
        let p = kconfig::preflight(&config, &release, TransportChoice::Any, Some(&index)).unwrap();
        assert!(p.ok(), "{release}: {:?}", p.lines());

        let tmp = tempfile::tempdir().unwrap();
        let init = tmp.path().join("init");
        std::fs::write(&init, b"\x7fELF not really").unwrap();
        let built = build_with_kernel(
            Role::Guest,
            &init,
            &info,
            &[],
            &BuildOptions::default(),
            &tmp.path().join("out"),
            &mut |l| println!("  {l}"),
        )
        .unwrap();
        let names = &built.info.modules;
        println!("{release}: {}", names.join(" "));
        let has = |m: &str| names.iter().any(|n| n == m);
        let module = |o: &str| config.get(o) == Value::Module;
        for (option, m) in [
            ("VIRTIO_BLK", "virtio_blk"),
            ("VIRTIO_NET", "virtio_net"),
            ("EXT4_FS", "ext4"),
            ("JBD2", "jbd2"),
            ("FS_MBCACHE", "mbcache"),
            ("CRC16", "crc16"),
            ("CRYPTO_CRC32C", "crc32c_generic"),
        ] {
            assert_eq!(
                has(m),
                module(option),
                "{release}: {m} in the set iff CONFIG_{option}=m: {names:?}"
            );
        }
        if module("EXT4_FS") && module("CRYPTO_CRC32C") {
            let pos = |m: &str| names.iter().position(|n| n == m).unwrap();
            assert!(
                pos("crc32c_generic") < pos("ext4"),
                "softdep pre: crc32c before ext4"
            );
            assert!(built
                .info
                .optional_modules
                .contains(&"crc32c_generic".to_string()));
        }
        for m in ["ext4", "jbd2", "virtio_net", "virtio_blk"] {
            assert!(
                !built.info.optional_modules.contains(&m.to_string()),
                "{m} is required"
            );
        }
    }
}
