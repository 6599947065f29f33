//! Kernel modules: reading a module's `.modinfo`, indexing a `lib/modules/<release>`
//! directory, and working out which `.ko` files to load, in which order.
//!
//! A kernel `.deb` ships no `modules.dep` (depmod makes it at install time), so the
//! dependencies come from each module's own `.modinfo` section: NUL-separated
//! `key=value` strings such as `name=kvm_amd`, `depends=kvm,ccp`,
//! `softdep=pre: crc32c post: foo`. Modules may be compressed (`.ko.xz`, `.ko.zst`,
//! `.ko.gz`): they are decompressed in memory only to read that section; the files that
//! go into the initramfs keep the kernel's own compression.
//!
//! Names are normalised with `-` -> `_` (the kernel treats them as the same), so
//! `kvm-amd.ko` is module `kvm_amd`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::elf::{self, ElfError};

/// Errors reading modules or resolving a module set.
#[derive(Debug, Error)]
pub enum ModuleError {
    /// A file or directory cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A compressed module cannot be decompressed.
    #[error(
        "cannot decompress module {path}: {why}; the file is damaged, unpack the kernel again"
    )]
    Decompress {
        /// The module.
        path: PathBuf,
        /// The decoder's complaint.
        why: String,
    },
    /// A module is not a readable ELF file.
    #[error("module {path} is not a valid kernel module: {source}")]
    Elf {
        /// The module.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ElfError,
    },
    /// A module has no `.modinfo` section.
    #[error("module {0} has no .modinfo section; is it really a kernel module?")]
    NoModinfo(PathBuf),
    /// A requested module is neither a file in the directory nor built in.
    #[error("module {name} is neither in {dir} nor listed in its modules.builtin; {hint}")]
    NotFound {
        /// The normalised module name.
        name: String,
        /// The modules directory searched.
        dir: PathBuf,
        /// What to do.
        hint: String,
    },
    /// A module depends on one that is not there.
    #[error("module {module} depends on {missing}, which is neither in {dir} nor built in; the modules directory is incomplete")]
    MissingDependency {
        /// The module that needs it.
        module: String,
        /// The missing dependency.
        missing: String,
        /// The modules directory searched.
        dir: PathBuf,
    },
    /// The dependencies form a cycle, so there is no load order.
    #[error("module dependency cycle: {}; the modules' .modinfo is inconsistent", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// What a module's `.modinfo` says about loading it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    /// `name=` (normalised), if present.
    pub name: Option<String>,
    /// `depends=`: modules that must be loaded first (normalised).
    pub depends: Vec<String>,
    /// `softdep=pre: ...`: modules to load first if available (normalised).
    pub softdep_pre: Vec<String>,
    /// `softdep=post: ...`: modules to load after it if available (normalised).
    pub softdep_post: Vec<String>,
}

/// Normalises a module name: `kvm-amd` -> `kvm_amd`.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// Parses the raw contents of a `.modinfo` section.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for raw in section.split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let Ok(entry) = std::str::from_utf8(raw) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalise(value.trim())),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalise),
            ),
            "softdep" => {
                // "pre: a b post: c"; a word before any "pre:"/"post:" is ignored, as
                // modprobe does.
                let mut list: Option<&mut Vec<String>> = None;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => list = Some(&mut info.softdep_pre),
                        "post:" => list = Some(&mut info.softdep_post),
                        w => {
                            if let Some(l) = list.as_deref_mut() {
                                l.push(normalise(w));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// How a module file is compressed, judged by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain `.ko`.
    None,
    /// `.ko.xz`.
    Xz,
    /// `.ko.zst`.
    Zstd,
    /// `.ko.gz`.
    Gzip,
}

impl Compression {
    /// The module file name suffix, e.g. `.ko.xz`.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => ".ko",
            Compression::Xz => ".ko.xz",
            Compression::Zstd => ".ko.zst",
            Compression::Gzip => ".ko.gz",
        }
    }

    /// Splits `kvm-amd.ko.xz` into (`kvm-amd`, `Xz`); `None` if not a module file name.
    pub fn split(file_name: &str) -> Option<(&str, Compression)> {
        // Longest suffixes first: ".ko" is a suffix of none of the others.
        [Self::Xz, Self::Zstd, Self::Gzip, Self::None]
            .into_iter()
            .find_map(|c| {
                file_name
                    .strip_suffix(c.suffix())
                    .filter(|stem| !stem.is_empty())
                    .map(|stem| (stem, c))
            })
    }
}

fn decompress(path: &Path, data: Vec<u8>, c: Compression) -> Result<Vec<u8>, ModuleError> {
    let err = |why: String| ModuleError::Decompress {
        path: path.to_path_buf(),
        why,
    };
    let mut out = Vec::new();
    match c {
        Compression::None => return Ok(data),
        Compression::Xz => lzma_rs::xz_decompress(&mut data.as_slice(), &mut out)
            .map_err(|e| err(e.to_string()))?,
        Compression::Zstd => {
            let mut src = data.as_slice();
            let mut dec =
                ruzstd::StreamingDecoder::new(&mut src).map_err(|e| err(e.to_string()))?;
            dec.read_to_end(&mut out).map_err(|e| err(e.to_string()))?;
        }
        Compression::Gzip => {
            flate2::read::GzDecoder::new(data.as_slice())
                .read_to_end(&mut out)
                .map_err(|e| err(e.to_string()))?;
        }
    }
    Ok(out)
}

/// Reads the `.modinfo` of a module file (`.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`).
pub fn read_modinfo(path: &Path) -> Result<ModInfo, ModuleError> {
    let data = std::fs::read(path).map_err(|source| ModuleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let compression = Compression::split(name).map_or(Compression::None, |(_, c)| c);
    let data = decompress(path, data, compression)?;
    let section = elf::section(&data, ".modinfo").map_err(|source| ModuleError::Elf {
        path: path.to_path_buf(),
        source,
    })?;
    let section = section.ok_or_else(|| ModuleError::NoModinfo(path.to_path_buf()))?;
    Ok(parse_modinfo(section))
}

/// A module to load, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalised name.
    pub name: String,
    /// The file in the modules directory.
    pub path: PathBuf,
    /// Its compression (kept as-is in the initramfs).
    pub compression: Compression,
}

/// The modules of one kernel: every module file under a directory, plus the names
/// listed in its `modules.builtin`.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, (PathBuf, Compression)>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Indexes `dir` (normally `lib/modules/<release>`): every `*.ko[.xz|.zst|.gz]` below
    /// it (symlinks such as `build` and `source` are not followed), and `modules.builtin`
    /// if present. When two files have the same module name, the one under `updates/`
    /// wins (as with depmod), else the first in path order.
    pub fn scan(dir: &Path) -> Result<Self, ModuleError> {
        let mut files: BTreeMap<String, (PathBuf, Compression)> = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        let mut found: Vec<(PathBuf, String, Compression)> = Vec::new();
        while let Some(d) = stack.pop() {
            let read_err = |source| ModuleError::Read {
                path: d.clone(),
                source,
            };
            for entry in std::fs::read_dir(&d).map_err(read_err)? {
                let entry = entry.map_err(read_err)?;
                let ty = entry.file_type().map_err(read_err)?;
                let path = entry.path();
                if ty.is_dir() {
                    stack.push(path);
                } else if ty.is_file() {
                    let file_name = entry.file_name();
                    if let Some((stem, c)) = file_name.to_str().and_then(Compression::split) {
                        found.push((path, normalise(stem), c));
                    }
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let updates = dir.join("updates");
        for (path, name, c) in found {
            let preferred = path.starts_with(&updates);
            match files.get(&name) {
                Some((old, _)) if !preferred || old.starts_with(&updates) => {}
                _ => {
                    files.insert(name, (path, c));
                }
            }
        }
        let builtin_path = dir.join("modules.builtin");
        let builtin = match std::fs::read_to_string(&builtin_path) {
            Ok(text) => parse_builtin(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(source) => {
                return Err(ModuleError::Read {
                    path: builtin_path,
                    source,
                })
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            builtin,
        })
    }

    /// The directory indexed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory has a `modules.builtin` list.
    pub fn has_builtin_list(&self) -> bool {
        self.dir.join("modules.builtin").is_file()
    }

    /// The file of module `name` (any spelling), if there is one.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files.get(&normalise(name)).map(|(p, _)| p.as_path())
    }

    /// Whether module `name` (any spelling) is built into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&normalise(name))
    }

    /// Number of module files indexed.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether no module file was found.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Every module file, by normalised name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.files
            .iter()
            .map(|(n, (p, _))| (n.as_str(), p.as_path()))
    }

    /// The modules to load so that every root works, dependencies first, each once.
    /// Built-in modules (roots or dependencies) are left out. `softdep` `pre:` modules
    /// are loaded before the module that names them when they are in the index, and
    /// ignored otherwise. A root that is neither a file nor built in, a missing hard
    /// dependency and a dependency cycle are errors.
    pub fn resolve(&self, roots: &[&str]) -> Result<Vec<Module>, ModuleError> {
        let mut state = Resolver {
            index: self,
            done: BTreeSet::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        for root in roots {
            let name = normalise(root);
            if self.is_builtin(&name) {
                continue;
            }
            if !self.files.contains_key(&name) {
                let hint = if self.has_builtin_list() {
                    "check the name (`-` and `_` are the same), or use a kernel that has it".into()
                } else {
                    "that directory has no modules.builtin, so zc cannot tell whether it is built in; add one (it is made by `make modules`)".into()
                };
                return Err(ModuleError::NotFound {
                    name,
                    dir: self.dir.clone(),
                    hint,
                });
            }
            state.visit(&name)?;
        }
        Ok(state.order)
    }
}

/// Parses `modules.builtin` (`kernel/drivers/virtio/virtio.ko` per line) into names.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let file = l.trim().rsplit('/').next()?;
            Compression::split(file).map(|(stem, _)| normalise(stem))
        })
        .collect()
}

struct Resolver<'a> {
    index: &'a ModuleIndex,
    done: BTreeSet<String>,
    stack: Vec<String>,
    order: Vec<Module>,
}

impl Resolver<'_> {
    /// Depth-first: `name` is in the index and not built in.
    fn visit(&mut self, name: &str) -> Result<(), ModuleError> {
        if self.done.contains(name) {
            return Ok(());
        }
        if let Some(i) = self.stack.iter().position(|n| n == name) {
            let mut cycle = self.stack[i..].to_vec();
            cycle.push(name.to_string());
            return Err(ModuleError::Cycle(cycle));
        }
        let (path, compression) = self.index.files[name].clone();
        let info = read_modinfo(&path)?;
        self.stack.push(name.to_string());
        for pre in &info.softdep_pre {
            if !self.index.is_builtin(pre) && self.index.files.contains_key(pre) {
                self.visit(pre)?;
            }
        }
        for dep in &info.depends {
            if self.index.is_builtin(dep) {
                continue;
            }
            if !self.index.files.contains_key(dep) {
                return Err(ModuleError::MissingDependency {
                    module: name.to_string(),
                    missing: dep.clone(),
                    dir: self.index.dir.clone(),
                });
            }
            self.visit(dep)?;
        }
        self.stack.pop();
        self.done.insert(name.to_string());
        self.order.push(Module {
            name: name.to_string(),
            path,
            compression,
        });
        Ok(())
    }
}

/// Writers of fake module trees for tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    /// A fake module: an ELF with a `.modinfo` holding `name=`, `depends=` and, if
    /// given, `softdep=`, plus some unrelated keys as real modules have.
    pub(crate) fn module_elf(name: &str, depends: &[&str], softdep: Option<&str>) -> Vec<u8> {
        let mut mi = Vec::new();
        mi.extend_from_slice(b"license=GPL\0");
        if let Some(s) = softdep {
            mi.extend_from_slice(format!("softdep={s}\0").as_bytes());
        }
        mi.extend_from_slice(b"alias=fake:*\0\0\0");
        mi.extend_from_slice(format!("depends={}\0", depends.join(",")).as_bytes());
        mi.extend_from_slice(b"retpoline=Y\0intree=Y\0");
        mi.extend_from_slice(format!("name={}\0", name.replace('-', "_")).as_bytes());
        mi.extend_from_slice(b"vermagic=6.1.0 SMP mod_unload\0");
        crate::elf::testutil::elf_with_sections(&[
            (".text", b"\xc3"),
            (".modinfo", &mi),
            (".gnu.linkonce.this_module", &[0u8; 64]),
        ])
    }

    /// Writes `<dir>/kernel/<sub>/<file>.ko` for a module.
    pub(crate) fn write_module(
        dir: &Path,
        sub: &str,
        file: &str,
        depends: &[&str],
        softdep: Option<&str>,
    ) {
        let d = dir.join("kernel").join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("{file}.ko")),
            module_elf(file, depends, softdep),
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use rstest::rstest;

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    fn pos(order: &[&str], n: &str) -> usize {
        order
            .iter()
            .position(|x| *x == n)
            .unwrap_or_else(|| panic!("{n} not in {order:?}"))
    }

    #[test]
    fn parses_modinfo_keys() {
        let raw = b"license=GPL\0\0depends=kvm,ccp\0softdep=pre: crc32c  post: post-mod\0name=kvm_amd\0description=a=b\0";
        let info = parse_modinfo(raw);
        assert_eq!(info.name.as_deref(), Some("kvm_amd"));
        assert_eq!(info.depends, ["kvm", "ccp"]);
        assert_eq!(info.softdep_pre, ["crc32c"]);
        assert_eq!(info.softdep_post, ["post_mod"]);
        let empty = parse_modinfo(b"depends=\0name=ccp\0");
        assert!(empty.depends.is_empty());
        // Multiple softdep entries add up; a word before pre:/post: is ignored.
        let multi = parse_modinfo(b"softdep=stray pre: a-b\0softdep=pre: c post: d pre: e\0");
        assert_eq!(multi.softdep_pre, ["a_b", "c", "e"]);
        assert_eq!(multi.softdep_post, ["d"]);
    }

    #[test]
    fn reads_modinfo_from_an_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        write_module(
            dir.path(),
            "arch/x86/kvm",
            "kvm-amd",
            &["kvm", "ccp"],
            Some("pre: x"),
        );
        let info = read_modinfo(&dir.path().join("kernel/arch/x86/kvm/kvm-amd.ko")).unwrap();
        assert_eq!(info.name.as_deref(), Some("kvm_amd"));
        assert_eq!(info.depends, ["kvm", "ccp"]);
        assert_eq!(info.softdep_pre, ["x"]);
        // Not a module: no .modinfo, and not ELF at all.
        let plain = dir.path().join("plain.ko");
        std::fs::write(
            &plain,
            crate::elf::testutil::elf_with_sections(&[(".text", b"")]),
        )
        .unwrap();
        assert!(matches!(
            read_modinfo(&plain),
            Err(ModuleError::NoModinfo(_))
        ));
        std::fs::write(&plain, b"hello").unwrap();
        assert!(matches!(read_modinfo(&plain), Err(ModuleError::Elf { .. })));
    }

    /// A valid zstd frame holding `data` in one raw (stored) block: ruzstd 0.7 has no
    /// encoder, and the decoder path is what is under test.
    fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 128 * 1024);
        let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
        out.push(0xA0); // single segment, 4-byte frame content size, no checksum
        let len = u32::try_from(data.len()).unwrap();
        out.extend_from_slice(&len.to_le_bytes());
        let block = 1u32 | (len << 3); // last block, raw
        out.extend_from_slice(&block.to_le_bytes()[..3]);
        out.extend_from_slice(data);
        out
    }

    #[rstest]
    #[case::xz(Compression::Xz)]
    #[case::zstd(Compression::Zstd)]
    #[case::gzip(Compression::Gzip)]
    fn reads_modinfo_from_compressed_modules(#[case] c: Compression) {
        let raw = module_elf("virtio_net", &["net_failover", "virtio"], None);
        let packed = match c {
            Compression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut raw.as_slice(), &mut out).unwrap();
                out
            }
            Compression::Zstd => zstd_raw_frame(&raw),
            Compression::Gzip => {
                use std::io::Write;
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
            Compression::None => unreachable!(),
        };
        assert_ne!(packed, raw);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("virtio_net{}", c.suffix()));
        std::fs::write(&p, &packed).unwrap();
        let info = read_modinfo(&p).unwrap();
        assert_eq!(info.depends, ["net_failover", "virtio"]);
        // A damaged file is a decompression error naming the file.
        let mut bad = packed.clone();
        bad.truncate(packed.len() / 2);
        std::fs::write(&p, &bad).unwrap();
        let err = read_modinfo(&p).unwrap_err();
        assert!(
            matches!(
                err,
                ModuleError::Decompress { .. } | ModuleError::Elf { .. }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("virtio_net"), "{err}");
    }

    #[test]
    fn splits_module_file_names() {
        assert_eq!(
            Compression::split("kvm-amd.ko"),
            Some(("kvm-amd", Compression::None))
        );
        assert_eq!(
            Compression::split("9p.ko.xz"),
            Some(("9p", Compression::Xz))
        );
        assert_eq!(
            Compression::split("a.ko.zst"),
            Some(("a", Compression::Zstd))
        );
        assert_eq!(
            Compression::split("a.ko.gz"),
            Some(("a", Compression::Gzip))
        );
        assert_eq!(Compression::split("modules.order"), None);
        assert_eq!(Compression::split(".ko"), None);
        assert_eq!(Compression::split("x.kox"), None);
    }

    /// The host role's real 6.1 graph in miniature, with a diamond (9p -> fscache ->
    /// netfs and 9p -> netfs) and builtins.
    fn host_like_tree(builtin: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "virt/lib", "irqbypass", &[], None);
        write_module(d, "arch/x86/kvm", "kvm", &["irqbypass"], None);
        write_module(d, "arch/x86/kvm", "kvm-amd", &["kvm", "ccp"], None);
        write_module(d, "drivers/crypto/ccp", "ccp", &[], None);
        write_module(d, "drivers/virtio", "virtio_ring", &[], None);
        write_module(d, "drivers/virtio", "virtio", &["virtio_ring"], None);
        write_module(
            d,
            "drivers/virtio",
            "virtio_mmio",
            &["virtio", "virtio_ring"],
            None,
        );
        write_module(d, "fs/netfs", "netfs", &[], None);
        write_module(d, "fs/fscache", "fscache", &["netfs"], None);
        write_module(d, "net/9p", "9pnet", &[], None);
        write_module(
            d,
            "net/9p",
            "9pnet_virtio",
            &["virtio", "9pnet", "virtio_ring"],
            None,
        );
        write_module(d, "fs/9p", "9p", &["9pnet", "fscache", "netfs"], None);
        std::fs::write(d.join("modules.builtin"), builtin).unwrap();
        dir
    }

    #[test]
    fn resolves_host_roots_dependencies_first_each_once() {
        let dir = host_like_tree("kernel/fs/ext4/ext4.ko\n");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.len(), 12);
        let order = index
            .resolve(&["kvm-amd", "virtio_mmio", "9pnet_virtio", "9p"])
            .unwrap();
        let n = names(&order);
        assert_eq!(
            n,
            [
                "irqbypass",
                "kvm",
                "ccp",
                "kvm_amd",
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p"
            ]
        );
        assert!(order
            .iter()
            .all(|m| m.path.is_file() && m.compression == Compression::None));
        assert!(order[3].path.ends_with("kernel/arch/x86/kvm/kvm-amd.ko"));
    }

    #[test]
    fn every_module_comes_after_its_dependencies() {
        let dir = host_like_tree("");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let roots = ["9p", "kvm_amd", "9pnet_virtio", "virtio_mmio", "ccp"];
        let order = index.resolve(&roots).unwrap();
        let n = names(&order);
        let unique: BTreeSet<&str> = n.iter().copied().collect();
        assert_eq!(unique.len(), n.len(), "each once: {n:?}");
        for m in &order {
            for dep in read_modinfo(&m.path).unwrap().depends {
                assert!(
                    pos(&n, &dep) < pos(&n, &m.name),
                    "{dep} before {} in {n:?}",
                    m.name
                );
            }
        }
    }

    #[test]
    fn builtins_are_skipped_as_roots_and_as_dependencies() {
        // As on 6.12: virtio and virtio_ring are built in (files absent or present).
        let dir = host_like_tree(
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\nkernel/fs/netfs/netfs.ko\n",
        );
        std::fs::remove_file(dir.path().join("kernel/drivers/virtio/virtio.ko")).unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(index.is_builtin("virtio") && index.is_builtin("virtio-ring"));
        let order = index.resolve(&["virtio", "virtio_mmio", "9p"]).unwrap();
        assert_eq!(names(&order), ["virtio_mmio", "9pnet", "fscache", "9p"]);
    }

    #[test]
    fn soft_pre_dependencies_load_first_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(
            d,
            "lib",
            "libcrc32c",
            &[],
            Some("pre: crc32c-generic absent-one"),
        );
        write_module(d, "crypto", "crc32c_generic", &[], None);
        write_module(
            d,
            "fs",
            "user",
            &["libcrc32c"],
            Some("post: crc32c_generic"),
        );
        let index = ModuleIndex::scan(d).unwrap();
        let order = index.resolve(&["user"]).unwrap();
        assert_eq!(names(&order), ["crc32c_generic", "libcrc32c", "user"]);
    }

    #[test]
    fn missing_root_and_missing_dependency_are_errors() {
        let dir = host_like_tree("");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.resolve(&["virtio_blk"]).unwrap_err();
        assert!(
            matches!(&err, ModuleError::NotFound { name, .. } if name == "virtio_blk"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("kernel/fs/netfs/netfs.ko")).unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.resolve(&["9p"]).unwrap_err();
        assert!(
            matches!(&err, ModuleError::MissingDependency { module, missing, .. } if module == "fscache" && missing == "netfs"),
            "{err}"
        );
    }

    #[test]
    fn missing_root_without_builtin_list_says_so() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "x", "a", &[], None);
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.resolve(&["b"]).unwrap_err().to_string();
        assert!(err.contains("no modules.builtin"), "{err}");
    }

    #[rstest]
    #[case::self_loop(&[("a", &["a"][..])], vec!["a", "a"])]
    #[case::two(&[("a", &["b"][..]), ("b", &["a"][..])], vec!["a", "b", "a"])]
    #[case::three_below_root(
        &[("r", &["a"][..]), ("a", &["b"][..]), ("b", &["c"][..]), ("c", &["a"][..])],
        vec!["a", "b", "c", "a"]
    )]
    fn cycles_are_errors(#[case] graph: &[(&str, &[&str])], #[case] expected: Vec<&str>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, deps) in graph {
            write_module(dir.path(), "x", name, deps, None);
        }
        let index = ModuleIndex::scan(dir.path()).unwrap();
        match index.resolve(&[graph[0].0]) {
            Err(ModuleError::Cycle(c)) => assert_eq!(c, expected),
            other => panic!("expected a cycle, got {other:?}"),
        }
    }

    #[test]
    fn soft_dependency_cycles_are_errors_too() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "x", "a", &[], Some("pre: b"));
        write_module(dir.path(), "x", "b", &["a"], None);
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(matches!(index.resolve(&["a"]), Err(ModuleError::Cycle(_))));
    }

    #[test]
    fn updates_dir_wins_and_compressed_files_are_indexed() {
        let dir = tempfile::tempdir().unwrap();
        write_module(dir.path(), "drivers", "dup", &[], None);
        let upd = dir.path().join("updates");
        std::fs::create_dir_all(&upd).unwrap();
        std::fs::write(upd.join("dup.ko"), module_elf("dup", &[], None)).unwrap();
        let raw = module_elf("zz-top", &["dup"], None);
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut raw.as_slice(), &mut xz).unwrap();
        std::fs::write(dir.path().join("kernel/drivers/zz-top.ko.xz"), xz).unwrap();
        std::fs::write(dir.path().join("kernel/drivers/notes.txt"), "x").unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.len(), 2);
        assert_eq!(index.path("dup"), Some(upd.join("dup.ko").as_path()));
        let order = index.resolve(&["zz_top"]).unwrap();
        assert_eq!(names(&order), ["dup", "zz_top"]);
        assert_eq!(order[1].compression, Compression::Xz);
    }

    #[test]
    fn builtin_list_parsing() {
        let b = parse_builtin(
            "kernel/drivers/virtio/virtio.ko\nkernel/arch/x86/crypto/crc32c-intel.ko\n\n",
        );
        assert_eq!(
            b.into_iter().collect::<Vec<_>>(),
            ["crc32c_intel", "virtio"]
        );
    }
}
