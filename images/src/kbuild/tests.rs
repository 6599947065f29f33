//! Tests of source builds and trees, with fake kernel trees whose Makefile stands
//! in for kbuild (no compiler runs): what zc-image does around `make` is what is
//! tested here; the real build is `make kernel`.

use std::ffi::OsStr;

use rstest::rstest;

use super::*;
use crate::kernel::testutil::fake_bzimage;

fn toolchain() -> Toolchain {
    Toolchain {
        compiler: "gcc (Debian 12.2.0-14) 12.2.0".into(),
        linker: "GNU ld (GNU Binutils for Debian) 2.40".into(),
    }
}

fn source(sha: &str) -> SourceInfo {
    SourceInfo {
        tarball: "/usr/src/linux-source-6.1.tar.xz".into(),
        sha256: sha.into(),
        package: Some("linux-source-6.1".into()),
        package_version: Some("6.1.192-3".into()),
        kernelversion: None,
    }
}

fn patch(path: &str, sha: &str) -> PatchFile {
    PatchFile {
        path: path.into(),
        sha256: sha.into(),
    }
}

fn base_plan() -> SourcePlan {
    SourcePlan {
        source: source("aa"),
        fragments: vec![FragmentFile::zc_guest()],
        patches: vec![patch("/p/a.patch", "11"), patch("/p/b.patch", "22")],
        localversion: "-zc".into(),
        toolchain: toolchain(),
    }
}

#[rstest]
#[case::source(|p: &mut SourcePlan| p.source.sha256 = "ab".into())]
#[case::fragment_text(|p: &mut SourcePlan| p.fragments[0] = FragmentFile::new("zc-guest.config", "CONFIG_X=y\n"))]
#[case::extra_fragment(|p: &mut SourcePlan| p.fragments.push(FragmentFile::new("mine.config", "CONFIG_KASAN=y\n")))]
#[case::patch_content(|p: &mut SourcePlan| p.patches[1].sha256 = "23".into())]
#[case::patch_order(|p: &mut SourcePlan| p.patches.reverse())]
#[case::patch_added(|p: &mut SourcePlan| p.patches.push(patch("/p/c.patch", "33")))]
#[case::patch_removed(|p: &mut SourcePlan| { p.patches.pop(); })]
#[case::localversion(|p: &mut SourcePlan| p.localversion = "-zc2".into())]
#[case::compiler(|p: &mut SourcePlan| p.toolchain.compiler = "gcc (Debian 12.2.0-14+deb12u1) 12.2.0".into())]
#[case::linker(|p: &mut SourcePlan| p.toolchain.linker = "GNU ld 2.41".into())]
fn every_input_changes_the_key(#[case] change: fn(&mut SourcePlan)) {
    let before = base_plan();
    let mut after = base_plan();
    change(&mut after);
    assert_ne!(before.key().digest(), after.key().digest());
    assert_ne!(before.dir_name(), after.dir_name());
}

#[test]
fn equal_inputs_give_the_same_key_whatever_the_files_are_called() {
    let a = base_plan();
    let mut b = base_plan();
    // Where the tarball and patches are read from is not an input; their bytes are.
    b.source.tarball = "/elsewhere/linux.tar.xz".into();
    b.patches[0].path = "/q/renamed.patch".into();
    b.fragments[0].name = "other-name.config".into();
    assert_eq!(a.key().digest(), b.key().digest());
    assert_eq!(a.key().digest().len(), 64);
    assert_eq!(
        a.dir_name(),
        format!("linux-source-6.1_6.1.192-3-{}", &a.key().digest()[..16])
    );
}

#[test]
fn source_labels() {
    assert_eq!(source("x").label(), "linux-source-6.1_6.1.192-3");
    let tarball = |name: &str| SourceInfo {
        tarball: PathBuf::from("/dl").join(name),
        package: None,
        package_version: None,
        ..source("x")
    };
    assert_eq!(tarball("linux-6.12.3.tar.xz").label(), "linux-6.12.3");
    assert_eq!(tarball("my tree.tgz").label(), "my_tree");
    assert_eq!(tarball("weird").label(), "weird");
}

#[test]
fn cache_dir_follows_xdg() {
    let some = |s: &'static str| Some(OsStr::new(s));
    assert_eq!(
        default_cache_dir(some("/x/cache"), some("/home/u")),
        Some(PathBuf::from("/x/cache/zc/kernels"))
    );
    // A relative XDG_CACHE_HOME is invalid by the spec: ignored.
    assert_eq!(
        default_cache_dir(some("rel"), some("/home/u")),
        Some(PathBuf::from("/home/u/.cache/zc/kernels"))
    );
    assert_eq!(
        default_cache_dir(None, some("/root")),
        Some(PathBuf::from("/root/.cache/zc/kernels"))
    );
    assert_eq!(default_cache_dir(None, None), None);
}

#[test]
fn localversion_names_the_patches() {
    assert_eq!(default_localversion(&[]), "-zc");
    assert_eq!(
        default_localversion(&[patch("/p/virtio-net-no-sg.patch", "1")]),
        "-zc-virtio-net-no-sg"
    );
    assert_eq!(
        default_localversion(&[
            patch("/p/a b.patch", "1"),
            patch("/p/c.patch", "2"),
            patch("/p/d.patch", "3")
        ]),
        "-zc-a_b+2"
    );
    let long = default_localversion(&[patch(&format!("/p/{}.patch", "x".repeat(80)), "1")]);
    assert!(long.len() <= 40, "{long}");
}

#[test]
fn patches_keep_the_given_order_and_directories_sort_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("series")).unwrap();
    for (name, text) in [
        ("series/02-second.patch", "2"),
        ("series/01-first.patch", "1"),
        ("series/10-tenth.patch", "10"),
        ("series/notes.txt", "not a patch"),
        ("z.patch", "z"),
        ("a.patch", "a"),
    ] {
        std::fs::write(d.join(name), text).unwrap();
    }
    let got = resolve_patches(&[d.join("z.patch"), d.join("series"), d.join("a.patch")]).unwrap();
    let names: Vec<String> = got
        .iter()
        .map(|p| p.path.strip_prefix(d).unwrap().display().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "z.patch",
            "series/01-first.patch",
            "series/02-second.patch",
            "series/10-tenth.patch",
            "a.patch"
        ]
    );
    assert_eq!(got[0].sha256, sha256_text("z"));

    let missing = resolve_patches(&[d.join("nope.patch")]).unwrap_err();
    assert!(missing.is_user_error());
    assert!(missing.to_string().contains("nope.patch"), "{missing}");
    std::fs::create_dir(d.join("empty")).unwrap();
    let empty = resolve_patches(&[d.join("empty")]).unwrap_err();
    assert!(empty.to_string().contains("no *.patch"), "{empty}");
}

/// A unified diff that changes line `from` of `file` into `to`.
fn diff(file: &str, from: &str, to: &str) -> String {
    format!("--- a/{file}\n+++ b/{file}\n@@ -1 +1 @@\n-{from}\n+{to}\n")
}

#[test]
fn patches_apply_in_order_and_a_failing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("drivers")).unwrap();
    std::fs::write(tree.join("drivers/net.c"), "sg = 1;\n").unwrap();
    // The second patch only applies on top of the first.
    std::fs::write(
        dir.path().join("1.patch"),
        diff("drivers/net.c", "sg = 1;", "sg = 0;"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("2.patch"),
        diff("drivers/net.c", "sg = 0;", "sg = 0; /* zc */"),
    )
    .unwrap();
    let one = dir.path().join("1.patch");
    let two = dir.path().join("2.patch");

    let log = dir.path().join("log");
    let mut quiet = Lines(|_: &str| {});
    let mut r = Runner::new(&log, &mut quiet).unwrap();
    let patches = resolve_patches(&[one.clone(), two.clone()]).unwrap();
    let mut applied = Vec::new();
    apply_patches(
        &mut r,
        &tree,
        &patches,
        &dir.path().join("kept"),
        &mut applied,
    )
    .unwrap();
    assert_eq!(applied.len(), 2);
    assert_eq!(
        std::fs::read_to_string(tree.join("drivers/net.c")).unwrap(),
        "sg = 0; /* zc */\n"
    );
    assert!(dir.path().join("kept/01-1.patch").is_file());
    assert!(dir.path().join("kept/02-2.patch").is_file());

    // The other order fails at the first patch that does not apply, naming it.
    std::fs::write(tree.join("drivers/net.c"), "sg = 1;\n").unwrap();
    let reversed = resolve_patches(&[two.clone(), one]).unwrap();
    let mut applied = Vec::new();
    let err = apply_patches(
        &mut r,
        &tree,
        &reversed,
        &dir.path().join("kept2"),
        &mut applied,
    )
    .unwrap_err();
    assert!(
        applied.is_empty(),
        "the patch that failed is not listed as applied"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("patch 1/2") && msg.contains("2.patch"),
        "{msg}"
    );
    assert!(msg.contains(&log.display().to_string()), "{msg}");
}

/// Writes a fake kernel tree: a Makefile whose targets do what kbuild's would to
/// the files zc-image reads (`tinyconfig`/`olddefconfig` write `.config`,
/// `bzImage` copies a prepared image), a stub merge_config.sh that appends the
/// fragments, and a Kconfig that says what VIRTIO_PCI depends on.
fn fake_tree(root: &Path, olddefconfig_drops: &str) {
    let put = |rel: &str, data: &[u8]| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    let makefile = format!(
        "\
kernelversion:
\t@echo 6.1.192
kernelrelease:
\t@echo 6.1.192$(LOCALVERSION)
tinyconfig:
\t@echo '  GEN     tinyconfig'; printf 'CONFIG_64BIT=y\\n# CONFIG_PCI is not set\\n' > .config
olddefconfig:
\t@grep -v '{olddefconfig_drops}' .config > .config.new; mv .config.new .config; echo ARCH=$(ARCH)
bzImage:
\t@echo '  CC      init/main.o'; cp prebuilt/bzImage$(LOCALVERSION) arch/x86/boot/bzImage; cp arch/x86/boot/bzImage vmlinux; touch System.map
"
    );
    put("Makefile", makefile.as_bytes());
    put("Kconfig", b"source \"drivers/virtio/Kconfig\"\n");
    put(
        "drivers/virtio/Kconfig",
        b"config VIRTIO_PCI\n\ttristate \"PCI driver\"\n\tdepends on PCI\n",
    );
    put("arch/x86/boot/.keep", b"");
    // What `make bzImage` produces for each LOCALVERSION the tests use.
    for lv in ["-zc", "-zc-fix"] {
        put(
            &format!("prebuilt/bzImage{lv}"),
            &fake_bzimage(&format!("6.1.192{lv} (zc@zc-image) #1 Tue Dec 1 2026")),
        );
    }
    put(
        "scripts/kconfig/merge_config.sh",
        b"#!/bin/sh\n# -m BASE FRAGMENT...\nbase=$2; shift 2; cat \"$@\" >> \"$base\"\n",
    );
    let script = root.join("scripts/kconfig/merge_config.sh");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A tarball of a fake tree under one top-level directory, as Debian ships it.
fn fake_tarball(dir: &Path, olddefconfig_drops: &str) -> PathBuf {
    let top = dir.join("src/linux-source-6.1");
    fake_tree(&top, olddefconfig_drops);
    let tarball = dir.join("linux-source-6.1.tar.gz");
    let ok = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.join("src"))
        .arg("linux-source-6.1")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    tarball
}

fn request(cache: &Path, tarball: &Path, patches: Vec<PathBuf>) -> SourceBuildRequest {
    SourceBuildRequest {
        source: SourceSpec::Tarball(tarball.to_path_buf()),
        patches,
        extra_fragments: vec![],
        localversion: None,
        cache: cache.to_path_buf(),
        jobs: 2,
        out: None,
    }
}

fn fake_plan(req: &SourceBuildRequest, fragment: &str) -> SourcePlan {
    let patches = resolve_patches(&req.patches).unwrap();
    SourcePlan {
        source: resolve_source(&req.source, None, &mut |_| {}).unwrap(),
        fragments: vec![FragmentFile::new("test.config", fragment)],
        localversion: req
            .localversion
            .clone()
            .unwrap_or_else(|| default_localversion(&patches)),
        patches,
        toolchain: toolchain(),
    }
}

#[derive(Default)]
struct Recorder {
    phases: Vec<String>,
    steps: usize,
}
impl BuildProgress for Recorder {
    fn phase(&mut self, line: &str) {
        self.phases.push(line.into());
    }
    fn output(&mut self, line: &str) {
        if kbuild_step(line).is_some() {
            self.steps += 1;
        }
    }
    fn phase_done(&mut self) {}
}

#[test]
fn a_source_build_is_cached_by_its_inputs_and_staged() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = fake_tarball(dir.path(), "^CONFIG_NOTHING=");
    let cache = dir.path().join("cache");
    let req = request(&cache, &tarball, vec![]);
    let plan = fake_plan(&req, "CONFIG_64BIT=y\n# CONFIG_PCI is not set\n");

    let mut rec = Recorder::default();
    let first = build_planned(&plan, &req, &mut rec).unwrap();
    assert!(!first.cached);
    assert_eq!(first.dir, cache.join(plan.dir_name()));
    let b = &first.build;
    assert_eq!(b.kernel.release, "6.1.192-zc");
    assert_eq!(b.kernel.vmlinuz, first.dir.join("bzImage"));
    assert_eq!(b.kernel.modules_dir, None);
    assert_eq!(b.key.as_deref(), Some(plan.key().digest().as_str()));
    assert_eq!(b.localversion.as_deref(), Some("-zc"));
    match &b.source {
        BuildSource::Tarball(s) => assert_eq!(s.kernelversion.as_deref(), Some("6.1.192")),
        other => panic!("{other:?}"),
    }
    assert!(
        rec.phases.iter().any(|p| p.starts_with("make -j2 bzImage")),
        "{:?}",
        rec.phases
    );
    assert!(rec.steps >= 2, "GEN and CC lines counted");
    // The olddefconfig of a source build runs with ARCH=x86_64.
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("ARCH=x86_64"), "{log}");
    // The tree stays (the seed of patched builds), with the artefacts and the key.
    assert!(first.dir.join("linux/Makefile").is_file());
    for f in [
        "bzImage",
        "vmlinux",
        "System.map",
        "config-6.1.192-zc",
        "key.json",
        "kernel.json",
        "build.log",
    ] {
        assert!(first.dir.join(f).is_file(), "{f}");
    }
    // What the VMM side reads: kernel.json as a KernelInfo.
    let info = KernelInfo::load(&first.dir).unwrap();
    assert_eq!(info.release, "6.1.192-zc");
    assert_eq!(info.vmlinuz, first.dir.join("bzImage"));

    // Same inputs: cached, nothing run.
    let mut rec = Recorder::default();
    let again = build_planned(&plan, &req, &mut rec).unwrap();
    assert!(again.cached);
    let without_texts = |b: &KernelBuild| {
        let mut b = b.clone();
        b.fragments.iter_mut().for_each(|f| f.text.clear());
        b
    };
    assert_eq!(again.build, without_texts(&first.build));
    assert!(rec.phases.is_empty(), "{:?}", rec.phases);

    // A patch: another key, a fresh directory, the first build untouched.
    std::fs::write(
        dir.path().join("fix.patch"),
        diff(
            "Kconfig",
            "source \"drivers/virtio/Kconfig\"",
            "source \"drivers/virtio/Kconfig\" # patched",
        ),
    )
    .unwrap();
    let req2 = request(&cache, &tarball, vec![dir.path().join("fix.patch")]);
    let plan2 = fake_plan(&req2, "CONFIG_64BIT=y\n# CONFIG_PCI is not set\n");
    let patched = build_planned(&plan2, &req2, &mut Recorder::default()).unwrap();
    assert!(!patched.cached);
    assert_ne!(patched.dir, first.dir);
    assert_eq!(patched.build.kernel.release, "6.1.192-zc-fix");
    assert_eq!(patched.build.patches.len(), 1);
    assert!(patched.dir.join("patches/01-fix.patch").is_file());
    assert!(KernelBuild::load(&first.dir).is_some());
    // ... rebuilt in the unpatched build's tree, which is left as it was.
    assert_eq!(
        patched.build.rebuilt_from.as_deref(),
        Some(plan.key().digest().as_str())
    );
    assert!(!patched.dir.join("linux").exists());
    let seed = first.dir.join("linux");
    let kconfig = || std::fs::read_to_string(seed.join("Kconfig")).unwrap();
    assert_eq!(kconfig(), "source \"drivers/virtio/Kconfig\"\n");
    assert!(!seed.join(SEED_IN_USE).exists());
    let log = std::fs::read_to_string(&patched.build.log).unwrap();
    assert!(log.contains("revert 01-fix.patch"), "{log}");

    // A patched build that fails (no prebuilt image for its release) still
    // leaves the seed clean, and the seed is used again, not rebuilt.
    std::fs::copy(
        dir.path().join("fix.patch"),
        dir.path().join("broken.patch"),
    )
    .unwrap();
    let req_broken = request(&cache, &tarball, vec![dir.path().join("broken.patch")]);
    let plan_broken = fake_plan(&req_broken, "CONFIG_64BIT=y\n# CONFIG_PCI is not set\n");
    let err = build_planned(&plan_broken, &req_broken, &mut Recorder::default()).unwrap_err();
    assert!(err.to_string().contains("bzImage"), "{err}");
    assert_eq!(kconfig(), "source \"drivers/virtio/Kconfig\"\n");
    assert!(!seed.join(SEED_IN_USE).exists());
    let mut rec = Recorder::default();
    std::fs::remove_file(patched.dir.join("kernel.json")).unwrap();
    build_planned(&plan2, &req2, &mut rec).unwrap();
    assert!(
        !rec.phases
            .iter()
            .any(|p| p.contains("unpatched kernel first")),
        "{:?}",
        rec.phases
    );
    // A seed left mid-build is not trusted: the unpatched kernel is built again.
    std::fs::write(seed.join(SEED_IN_USE), "x").unwrap();
    std::fs::remove_file(patched.dir.join("kernel.json")).unwrap();
    let mut rec = Recorder::default();
    build_planned(&plan2, &req2, &mut rec).unwrap();
    assert!(
        rec.phases
            .iter()
            .any(|p| p.contains("unpatched kernel first")),
        "{:?}",
        rec.phases
    );
    assert!(!seed.join(SEED_IN_USE).exists());

    // An interrupted build (no kernel.json) is redone from scratch.
    std::fs::remove_file(first.dir.join("kernel.json")).unwrap();
    std::fs::write(first.dir.join("stale"), "x").unwrap();
    let redone = build_planned(&plan, &req, &mut Recorder::default()).unwrap();
    assert!(!redone.cached);
    assert!(!first.dir.join("stale").exists());

    // --out stages vmlinuz, config and kernel.json.
    let out = dir.path().join("out/kernel");
    let req3 = SourceBuildRequest {
        out: Some(out.clone()),
        ..req
    };
    let staged = build_planned(&plan, &req3, &mut Recorder::default()).unwrap();
    assert!(staged.cached);
    assert_eq!(staged.dir, out);
    assert_eq!(staged.build.kernel.vmlinuz, out.join("vmlinuz"));
    assert_eq!(
        std::fs::read(out.join("vmlinuz")).unwrap(),
        std::fs::read(first.dir.join("bzImage")).unwrap()
    );
    assert!(out.join("config-6.1.192-zc").is_file());
    // The preflight finds the staged config where it looks beside an image.
    let found = crate::kconfig::find_config(None, &out.join("vmlinuz"), "6.1.192-zc", None)
        .unwrap()
        .expect("a config");
    assert_eq!(
        found.source.to_string(),
        out.join("config-6.1.192-zc").display().to_string()
    );
    assert_eq!(KernelInfo::load(&out).unwrap().release, "6.1.192-zc");
}

#[test]
fn an_option_dropped_by_olddefconfig_stops_the_build_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // olddefconfig drops VIRTIO_PCI, as the real one does when PCI is off, and
    // EXT4_FS, which this tree's Kconfig does not know.
    let tarball = fake_tarball(dir.path(), "^CONFIG_\\(VIRTIO_PCI\\|EXT4_FS\\)=");
    let cache = dir.path().join("cache");
    let req = request(&cache, &tarball, vec![]);
    let plan = fake_plan(
        &req,
        "CONFIG_64BIT=y\nCONFIG_VIRTIO_PCI=y\nCONFIG_EXT4_FS=y\n",
    );
    let err = build_planned(&plan, &req, &mut Recorder::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, KbuildError::Dropped { ref dropped, .. } if dropped.len() == 2),
        "{msg}"
    );
    assert!(msg.contains("CONFIG_VIRTIO_PCI=y was asked for"), "{msg}");
    assert!(
        msg.contains("drivers/virtio/Kconfig: depends on PCI"),
        "{msg}"
    );
    assert!(msg.contains("CONFIG_EXT4_FS=y was asked for"), "{msg}");
    assert!(
        msg.contains("no such option in this tree's Kconfig"),
        "{msg}"
    );
    // Nothing was cached: the next run tries again.
    assert!(KernelBuild::load(&cache.join(plan.dir_name())).is_none());
}

#[test]
fn tree_paths_resolve_or_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("file");
    std::fs::write(&file, "").unwrap();
    let e = resolve_tree(&file).unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("not a directory"),
        "{e}"
    );
    let e = resolve_tree(&d.join("missing")).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
    let e = resolve_tree(d).unwrap_err();
    assert!(e.to_string().contains("not a Linux source tree"), "{e}");

    // A source tree: Makefile + Kconfig.
    let src = d.join("linux");
    std::fs::create_dir_all(src.join("arch/x86/boot")).unwrap();
    std::fs::write(src.join("Makefile"), "").unwrap();
    std::fs::write(src.join("Kconfig"), "").unwrap();
    let paths = resolve_tree(&src.join("arch/../")).unwrap();
    assert_eq!(paths.root, src.canonicalize().unwrap());
    assert_eq!(paths.bzimage, paths.root.join("arch/x86/boot/bzImage"));
    assert_eq!(paths.config, paths.root.join(".config"));
    let e = paths.image().unwrap_err();
    assert!(
        e.to_string()
            .contains("neither arch/x86/boot/bzImage nor vmlinux"),
        "{e}"
    );
    std::fs::write(src.join("vmlinux"), "elf").unwrap();
    assert_eq!(paths.image().unwrap(), paths.vmlinux);
    std::fs::write(src.join("arch/x86/boot/bzImage"), "bz").unwrap();
    assert_eq!(
        paths.image().unwrap(),
        paths.bzimage,
        "the bzImage is preferred"
    );

    // A `make O=` build directory: Makefile + .config, no Kconfig.
    let build = d.join("build");
    std::fs::create_dir_all(&build).unwrap();
    std::fs::write(build.join("Makefile"), "").unwrap();
    std::fs::write(build.join(".config"), "CONFIG_64BIT=y\n").unwrap();
    assert_eq!(
        resolve_tree(&build).unwrap().root,
        build.canonicalize().unwrap()
    );
}

#[test]
fn a_tree_is_used_as_it_is_with_no_build() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("linux");
    fake_tree(&tree, "^CONFIG_NOTHING=");
    std::fs::write(
        tree.join("arch/x86/boot/bzImage"),
        fake_bzimage("6.13.0-rc1-dirty (me@box) #4 SMP"),
    )
    .unwrap();
    std::fs::write(
        tree.join(".config"),
        "CONFIG_64BIT=y\n# CONFIG_MODULES is not set\n",
    )
    .unwrap();
    let out = dir.path().join("staged");
    std::fs::create_dir_all(out.join("old-stuff")).unwrap();
    let req = TreeRequest {
        tree: tree.clone(),
        build: false,
        configure: false,
        extra_fragments: vec![],
        jobs: 2,
        out: out.clone(),
    };
    let got = use_tree(&req, &mut Recorder::default()).unwrap();
    assert!(!got.cached);
    assert_eq!(got.build.kernel.release, "6.13.0-rc1-dirty");
    assert_eq!(got.build.kernel.vmlinuz, out.join("vmlinuz"));
    assert_eq!(got.build.kernel.modules_dir, None);
    assert_eq!(got.build.config, Some(out.join("config-6.13.0-rc1-dirty")));
    assert!(
        matches!(&got.build.source, BuildSource::Tree { path, .. } if *path == tree.canonicalize().unwrap())
    );
    assert!(
        !out.join("old-stuff").exists(),
        "the stage is replaced, not merged"
    );
    assert!(!out.join("modules").exists());
    assert_eq!(KernelInfo::load(&out).unwrap().release, "6.13.0-rc1-dirty");

    // Fragments without --configure would be ignored: refused instead.
    let e = use_tree(
        &TreeRequest {
            extra_fragments: vec![dir.path().join("kasan.config")],
            ..req.clone()
        },
        &mut Recorder::default(),
    )
    .unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("--configure"),
        "{e}"
    );

    // A 32-bit config is refused before anything is staged.
    std::fs::write(tree.join(".config"), "# CONFIG_64BIT is not set\n").unwrap();
    let e = use_tree(&req, &mut Recorder::default()).unwrap_err();
    assert!(e.to_string().contains("64-bit"), "{e}");
}

#[test]
fn kernel_json_round_trips_with_relative_paths() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("bzImage"), "k").unwrap();
    let build = KernelBuild {
        kernel: KernelInfo {
            package: None,
            deb_version: None,
            release: "6.1.192-zc".into(),
            version: "6.1.192-zc (zc@zc-image) #1".into(),
            vmlinuz: d.join("bzImage"),
            modules_dir: Some(d.join("modules/lib/modules/6.1.192-zc")),
        },
        config: Some(d.join("config")),
        source: BuildSource::Tarball(source("aa")),
        base_config: Some("tinyconfig".into()),
        fragments: vec![FragmentFile::zc_guest()],
        patches: vec![patch("/p/a.patch", "11")],
        localversion: Some("-zc".into()),
        toolchain: toolchain(),
        key: Some("k".into()),
        rebuilt_from: None,
        build_seconds: 1.5,
        built_at: 7,
        log: d.join("build.log"),
    };
    let path = build.save(d).unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("\"vmlinuz\": \"bzImage\""), "{text}");
    assert!(text.contains("\"kind\": \"tarball\""), "{text}");
    assert!(
        !text.contains(&d.display().to_string()),
        "no absolute paths inside the dir: {text}"
    );
    let mut back = KernelBuild::load(d).unwrap();
    // The fragment text is not stored (its hash and name are).
    back.fragments = build.fragments.clone();
    assert_eq!(back, build);
    std::fs::remove_file(d.join("bzImage")).unwrap();
    assert!(KernelBuild::load(d).is_none(), "no image, no build");
}

#[test]
fn source_hashes_are_remembered_until_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("linux.tar.xz");
    let memo = dir.path().join("memo.json");
    std::fs::write(&file, "one").unwrap();
    assert_eq!(
        sha256_file_memo(&file, Some(&memo)).unwrap(),
        sha256_text("one")
    );
    assert!(memo.is_file());
    // The memo answers while size and mtime are unchanged (doctor it to prove it).
    let text = std::fs::read_to_string(&memo)
        .unwrap()
        .replace(&sha256_text("one"), "remembered");
    std::fs::write(&memo, text).unwrap();
    assert_eq!(sha256_file_memo(&file, Some(&memo)).unwrap(), "remembered");
    // A changed file (size) is hashed again.
    std::fs::write(&file, "three").unwrap();
    assert_eq!(
        sha256_file_memo(&file, Some(&memo)).unwrap(),
        sha256_text("three")
    );
    assert_eq!(sha256_file_memo(&file, None).unwrap(), sha256_text("three"));
}

#[test]
fn the_makefile_lists_the_packages_the_build_asks_for() {
    let makefile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Makefile")).unwrap();
    let line = makefile
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL_APT_PACKAGES :="))
        .expect("Makefile defines KERNEL_APT_PACKAGES");
    let listed: Vec<&str> = line.split_whitespace().collect();
    assert!(listed.contains(&DEFAULT_SOURCE_PACKAGE), "{listed:?}");
    for p in BUILD_PACKAGES {
        assert!(
            listed.contains(p),
            "{p} missing from the Makefile's KERNEL_APT_PACKAGES"
        );
    }
}
