//! Kernel modules: reading a module's `.modinfo`, indexing a `lib/modules/<release>`
//! directory, and working out which `.ko` files to load, in which order.
//!
//! Where the facts come from, as `modprobe` reads them:
//! - an installed kernel (or `make modules_install` output) has depmod's text files:
//!   `modules.dep` (hard dependencies), `modules.softdep` (`pre:`/`post:` soft
//!   dependencies), `modules.alias` (e.g. `crc32c` is an alias of `crc32c_generic` and
//!   of `crc32c_intel`) and `modules.builtin` (built-ins are never searched for);
//! - a kernel `.deb` unpacked with `dpkg-deb -x` ships none of depmod's output (depmod
//!   makes it at install time), so the same facts come from each module's own
//!   `.modinfo` section: NUL-separated `key=value` strings such as `name=kvm_amd`,
//!   `depends=kvm,ccp`, `softdep=pre: crc32c post: foo`, `alias=fs-ext4`; plus
//!   `modules.builtin` and `modules.builtin.modinfo` (the aliases of built-in code).
//!
//! Modules may be compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`): they are decompressed in
//! memory to read that section. Reading the aliases of every module of a `.deb`
//! (thousands of `.ko.xz`) is slow, so it happens only when a name is neither a file
//! nor built in, and the result can be kept in a cache file
//! ([`ModuleIndex::with_alias_cache`]).
//!
//! Names are normalised with `-` -> `_` (the kernel treats them as the same), so
//! `kvm-amd.ko` is module `kvm_amd`.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
    /// A depmod file (`modules.dep`, ...) has a line that is not in its format.
    #[error(
        "{path} line {line}: {why}; run depmod again (or remove the file so .modinfo is read)"
    )]
    DepmodFile {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
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
    /// `alias=`: other names the module answers to (normalised), e.g. `crc32c`.
    pub aliases: Vec<String>,
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
            "softdep" => parse_softdep_words(value, &mut info.softdep_pre, &mut info.softdep_post),
            "alias" if !value.trim().is_empty() => info.aliases.push(normalise(value.trim())),
            _ => {}
        }
    }
    info
}

/// Adds the words of a soft dependency (`pre: a b post: c`) to `pre` and `post`; a word
/// before any `pre:`/`post:` is ignored, as modprobe does.
fn parse_softdep_words(value: &str, pre: &mut Vec<String>, post: &mut Vec<String>) {
    let mut list: Option<&mut Vec<String>> = None;
    for word in value.split_whitespace() {
        match word {
            "pre:" => list = Some(&mut *pre),
            "post:" => list = Some(&mut *post),
            w => {
                if let Some(l) = list.as_deref_mut() {
                    l.push(normalise(w));
                }
            }
        }
    }
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

/// Reads a module file and returns its uncompressed ELF bytes.
pub fn read_uncompressed(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let data = std::fs::read(path).map_err(|source| ModuleError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let compression = Compression::split(name).map_or(Compression::None, |(_, c)| c);
    decompress(path, data, compression)
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
    let data = read_uncompressed(path)?;
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
    /// Its compression.
    pub compression: Compression,
    /// False when the guest may go on without it: it came in only as a soft dependency
    /// (or as one of several modules behind an alias, such as `crc32c_intel`, which
    /// refuses to load on a CPU without SSE4.2).
    pub required: bool,
    /// Why it is in the set, for the build's output.
    pub reason: Reason,
}

/// Why a module is in the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Asked for.
    Wanted,
    /// A hard dependency (`modules.dep` / `depends=`) of the named module.
    DependencyOf(String),
    /// A soft `pre:` dependency of the named module.
    SoftPreOf(String),
    /// A soft `post:` dependency of the named module.
    SoftPostOf(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Wanted => f.write_str("wanted"),
            Reason::DependencyOf(m) => write!(f, "needed by {m}"),
            Reason::SoftPreOf(m) => write!(f, "softdep pre of {m}"),
            Reason::SoftPostOf(m) => write!(f, "softdep post of {m}"),
        }
    }
}

/// A module asked for by name (a module name or an alias such as `crc32c`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// The name.
    pub name: String,
    /// Whether a missing module is an error (else it is left out, and said so).
    pub required: bool,
}

impl Want {
    /// A module that must be there (as a file or built in).
    pub fn required(name: &str) -> Self {
        Self {
            name: normalise(name),
            required: true,
        }
    }

    /// A module taken when the kernel has it.
    pub fn optional(name: &str) -> Self {
        Self {
            name: normalise(name),
            required: false,
        }
    }
}

/// Where the dependency facts of an index come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepSource {
    /// depmod's `modules.dep`, `modules.softdep`, `modules.alias`.
    Depmod,
    /// Each module's `.modinfo` (a `.deb` unpacked without depmod).
    Modinfo,
}

impl fmt::Display for DepSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DepSource::Depmod => "modules.dep, modules.softdep, modules.alias",
            DepSource::Modinfo => "each module's .modinfo",
        })
    }
}

/// The outcome of [`ModuleIndex::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    /// The modules to load, dependencies first, each once.
    pub modules: Vec<Module>,
    /// Wanted names (and soft dependencies) the kernel has built in, as
    /// `name` or `alias (builtin_module)`.
    pub builtin: Vec<String>,
    /// Soft dependencies and optional wants found nowhere: `wanting module: name`.
    pub absent: Vec<String>,
}

impl Resolution {
    /// The names of [`Resolution::modules`], in load order.
    pub fn names(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.name.as_str()).collect()
    }
}

/// What a name stands for in one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A module file, by its normalised name.
    File(String),
    /// Built into the kernel (the module's name, itself or behind an alias).
    Builtin(String),
    /// An alias: the module files behind it, and the built-in module that provides it
    /// too, if one does.
    Alias {
        /// Module files answering to the alias.
        files: Vec<String>,
        /// A built-in module answering to it.
        builtin: Option<String>,
    },
    /// Nothing in this kernel.
    Missing,
}

/// The modules of one kernel: every module file under a directory, what is built in,
/// and where dependencies, soft dependencies and aliases are read from.
#[derive(Debug)]
pub struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, (PathBuf, Compression)>,
    builtin: BTreeSet<String>,
    /// alias -> built-in module, from `modules.builtin.modinfo`.
    builtin_aliases: BTreeMap<String, String>,
    /// depmod's files, when the directory has `modules.dep`.
    depmod: Option<Depmod>,
    alias_cache: Option<PathBuf>,
    /// Memoised `.modinfo` reads.
    modinfo: RefCell<BTreeMap<String, ModInfo>>,
    /// (alias pattern, module) of every module file, read once when first needed.
    aliases: RefCell<Option<Vec<(String, String)>>>,
}

/// A module's hard dependencies, soft `pre:` and soft `post:` dependencies.
type Deps = (Vec<String>, Vec<String>, Vec<String>);

#[derive(Debug, Default)]
struct Depmod {
    deps: BTreeMap<String, Vec<String>>,
    softdeps: BTreeMap<String, (Vec<String>, Vec<String>)>,
    aliases: Vec<(String, String)>,
}

/// The module name of a path as depmod writes it (`kernel/fs/ext4/ext4.ko.xz`).
fn name_of_path(path: &str) -> Option<String> {
    let file = path.trim().rsplit('/').next()?;
    Compression::split(file).map(|(stem, _)| normalise(stem))
}

/// Parses `modules.dep`: `kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko ...` per line.
pub fn parse_modules_dep(
    text: &str,
    path: &Path,
) -> Result<BTreeMap<String, Vec<String>>, ModuleError> {
    let mut deps = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| ModuleError::DepmodFile {
            path: path.to_path_buf(),
            line: i + 1,
            why: why.to_string(),
        };
        let (module, rest) = line
            .split_once(':')
            .ok_or_else(|| bad("no `:` after the module"))?;
        let name = name_of_path(module).ok_or_else(|| bad("not a module file name before `:`"))?;
        let list = rest
            .split_whitespace()
            .map(|p| name_of_path(p).ok_or_else(|| bad("a dependency is not a module file name")))
            .collect::<Result<Vec<_>, _>>()?;
        deps.insert(name, list);
    }
    Ok(deps)
}

/// Parses `modules.softdep`: `softdep ext4 pre: crc32c post: x` per line.
pub fn parse_modules_softdep(text: &str) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let mut out: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.trim().splitn(3, char::is_whitespace);
        if words.next() != Some("softdep") {
            continue;
        }
        let Some(module) = words.next() else { continue };
        let entry = out.entry(normalise(module)).or_default();
        parse_softdep_words(words.next().unwrap_or(""), &mut entry.0, &mut entry.1);
    }
    out
}

/// Parses `modules.alias`: `alias crc32c crc32c_generic` per line, into (pattern,
/// module) pairs.
pub fn parse_modules_alias(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            (w.next()? == "alias").then_some(())?;
            Some((normalise(w.next()?), normalise(w.next()?)))
        })
        .collect()
}

/// Parses `modules.builtin.modinfo` (NUL-separated `module.key=value`) into
/// alias -> built-in module.
pub fn parse_builtin_modinfo(data: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for raw in data.split(|&b| b == 0) {
        let Ok(entry) = std::str::from_utf8(raw) else {
            continue;
        };
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        if let Some(module) = key.strip_suffix(".alias") {
            out.insert(normalise(value.trim()), normalise(module));
        }
    }
    out
}

/// Whether `name` matches the alias `pattern`, with `*`, `?` and `[...]` as in
/// fnmatch(3), which modprobe uses. Written here because the glob crates match paths
/// (with `/` special), while an alias is a plain string.
///
/// Every token but `*` matches exactly one byte, so on a mismatch only the last `*`
/// needs to take one more byte (earlier stars can only do worse): time linear in
/// `pattern.len() * name.len()`, where trying every split at every star (the obvious
/// recursion) is exponential in the number of stars (a `modules.alias` line of a
/// few dozen `*` hung the module resolver).
pub fn alias_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Just after the last `*` seen, and the first name byte it has not taken yet.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if p.get(pi) == Some(&b'*') {
            pi += 1;
            star = Some((pi, ni));
            continue;
        }
        if let Some(len) = match_one(&p[pi..], n[ni]) {
            pi += len;
            ni += 1;
            continue;
        }
        match star {
            Some((after, taken)) => {
                pi = after;
                ni = taken + 1;
                star = Some((after, taken + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// If the first token of `p` (not `*`) matches `c`, the token's length.
fn match_one(p: &[u8], c: u8) -> Option<usize> {
    match p.first()? {
        b'?' => Some(1),
        b'[' => {
            let Some(end) = p.iter().skip(2).position(|&b| b == b']').map(|e| e + 2) else {
                // No closing bracket: a literal `[`.
                return (c == b'[').then_some(1);
            };
            let (negate, set) = match p[1] {
                b'!' | b'^' => (true, &p[2..end]),
                _ => (false, &p[1..end]),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == b'-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            (hit != negate).then_some(end + 1)
        }
        &b => (b == c).then_some(1),
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ModuleError> {
    match std::fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ModuleError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// What an alias cache file holds: the aliases of every module file, and a
/// fingerprint of the files they were read from.
#[derive(Serialize, Deserialize)]
struct AliasCache {
    fingerprint: String,
    aliases: Vec<(String, String)>,
}

impl ModuleIndex {
    /// Indexes `dir` (normally `lib/modules/<release>`): every `*.ko[.xz|.zst|.gz]` below
    /// it (symlinks such as `build` and `source` are not followed), `modules.builtin`
    /// and `modules.builtin.modinfo` if present, and depmod's `modules.dep`,
    /// `modules.softdep` and `modules.alias` if `modules.dep` is there. When two files
    /// have the same module name, the one under `updates/` wins (as with depmod),
    /// else the first in path order.
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
        let text = |name: &str| -> Result<Option<String>, ModuleError> {
            Ok(read_optional(&dir.join(name))?.map(|d| String::from_utf8_lossy(&d).into_owned()))
        };
        let builtin = text("modules.builtin")?.map_or_else(BTreeSet::new, |t| parse_builtin(&t));
        let builtin_aliases = read_optional(&dir.join("modules.builtin.modinfo"))?
            .map_or_else(BTreeMap::new, |d| parse_builtin_modinfo(&d));
        let depmod = match text("modules.dep")? {
            None => None,
            Some(dep) => Some(Depmod {
                deps: parse_modules_dep(&dep, &dir.join("modules.dep"))?,
                softdeps: text("modules.softdep")?
                    .map_or_else(BTreeMap::new, |t| parse_modules_softdep(&t)),
                aliases: text("modules.alias")?.map_or_else(Vec::new, |t| parse_modules_alias(&t)),
            }),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            builtin,
            builtin_aliases,
            depmod,
            alias_cache: None,
            modinfo: RefCell::new(BTreeMap::new()),
            aliases: RefCell::new(None),
        })
    }

    /// Keeps the aliases read from every module's `.modinfo` in directory `dir`, one
    /// JSON file per set of module files (named by a digest of their paths, sizes and
    /// modification times), so only the first resolution that needs them pays for
    /// reading them. Unused when the modules directory has depmod's files.
    pub fn with_alias_cache(mut self, dir: PathBuf) -> Self {
        self.alias_cache = Some(dir);
        self
    }

    /// The directory indexed.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where dependencies, soft dependencies and aliases are read from.
    pub fn source(&self) -> DepSource {
        if self.depmod.is_some() {
            DepSource::Depmod
        } else {
            DepSource::Modinfo
        }
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

    /// What `name` (a module name or an alias, any spelling) stands for. Built in wins
    /// over a stray file of the same name (as with modprobe); an alias is looked up
    /// only when the name is neither (which may read every module's `.modinfo`, see
    /// the module doc).
    pub fn lookup(&self, name: &str) -> Result<Lookup, ModuleError> {
        let name = normalise(name);
        if self.builtin.contains(&name) {
            return Ok(Lookup::Builtin(name));
        }
        if self.files.contains_key(&name) {
            return Ok(Lookup::File(name));
        }
        let builtin = self.builtin_aliases.get(&name).cloned();
        let mut files: Vec<String> = Vec::new();
        self.with_aliases(|aliases| {
            for (pattern, module) in aliases {
                if alias_matches(pattern, &name)
                    && self.files.contains_key(module)
                    && !files.contains(module)
                {
                    files.push(module.clone());
                }
            }
        })?;
        Ok(match (files.is_empty(), builtin) {
            (true, None) => Lookup::Missing,
            (true, Some(b)) => Lookup::Builtin(b),
            (false, builtin) => Lookup::Alias { files, builtin },
        })
    }

    /// Whether the kernel has `name` at all (a file, built in, or behind an alias).
    pub fn provides(&self, name: &str) -> Result<bool, ModuleError> {
        Ok(self.lookup(name)? != Lookup::Missing)
    }

    fn info(&self, name: &str) -> Result<ModInfo, ModuleError> {
        if let Some(i) = self.modinfo.borrow().get(name) {
            return Ok(i.clone());
        }
        let info = read_modinfo(&self.files[name].0)?;
        self.modinfo
            .borrow_mut()
            .insert(name.to_string(), info.clone());
        Ok(info)
    }

    /// Hard dependencies, soft pre and soft post dependencies of a module file.
    fn deps_of(&self, name: &str) -> Result<Deps, ModuleError> {
        match &self.depmod {
            Some(d) => {
                let (pre, post) = d.softdeps.get(name).cloned().unwrap_or_default();
                Ok((d.deps.get(name).cloned().unwrap_or_default(), pre, post))
            }
            None => {
                let i = self.info(name)?;
                Ok((i.depends, i.softdep_pre, i.softdep_post))
            }
        }
    }

    fn with_aliases<T>(&self, f: impl FnOnce(&[(String, String)]) -> T) -> Result<T, ModuleError> {
        if let Some(d) = &self.depmod {
            return Ok(f(&d.aliases));
        }
        if self.aliases.borrow().is_none() {
            let list = self.load_or_scan_aliases()?;
            *self.aliases.borrow_mut() = Some(list);
        }
        Ok(f(self.aliases.borrow().as_deref().unwrap_or_default()))
    }

    /// A digest of every module file's path, size and modification time.
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (name, (path, _)) in &self.files {
            let meta = std::fs::metadata(path).ok();
            let mtime = meta
                .as_ref()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            h.update(format!(
                "{name}\0{}\0{}\0{mtime}\n",
                path.display(),
                meta.map_or(0, |m| m.len())
            ));
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn load_or_scan_aliases(&self) -> Result<Vec<(String, String)>, ModuleError> {
        let fingerprint = self.alias_cache.as_ref().map(|_| self.fingerprint());
        let path = self
            .alias_cache
            .as_ref()
            .zip(fingerprint.as_ref())
            .map(|(dir, fp)| dir.join(format!("{fp}.json")));
        if let (Some(path), Some(fp)) = (&path, &fingerprint) {
            let cached = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<AliasCache>(&t).ok());
            if let Some(c) = cached.filter(|c| &c.fingerprint == fp) {
                return Ok(c.aliases);
            }
        }
        let aliases = self.scan_aliases()?;
        if let (Some(path), Some(fingerprint)) = (&path, fingerprint) {
            let cache = AliasCache {
                fingerprint,
                aliases,
            };
            // A cache that cannot be written only costs time on the next run.
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(path, serde_json::to_string(&cache).unwrap_or_default());
            return Ok(cache.aliases);
        }
        Ok(aliases)
    }

    /// Reads the aliases of every module file, on as many threads as there are CPUs.
    fn scan_aliases(&self) -> Result<Vec<(String, String)>, ModuleError> {
        let files: Vec<(&String, &PathBuf)> = self.files.iter().map(|(n, (p, _))| (n, p)).collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let chunk = files.len().div_ceil(threads).max(1);
        let parts: Vec<Result<Vec<(String, String)>, ModuleError>> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for (name, path) in part {
                            for a in read_modinfo(path)?.aliases {
                                out.push((a, (*name).clone()));
                            }
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("alias reader thread panicked"))
                .collect()
        });
        let mut all = Vec::new();
        for p in parts {
            all.extend(p?);
        }
        Ok(all)
    }

    /// The modules to load so that every wanted name works, dependencies first, each
    /// once, as modprobe would: soft `pre:` dependencies before the module, its hard
    /// dependencies, the module, then its soft `post:` dependencies. Built-in modules
    /// are left out. An alias stands for every module file behind it (all loaded,
    /// as modprobe does; optional when there are several, since one is enough).
    /// Soft dependencies are optional and skipped when absent. A required name that
    /// is nowhere, a missing hard dependency and a dependency cycle are errors.
    pub fn resolve(&self, wants: &[Want]) -> Result<Resolution, ModuleError> {
        let mut r = Resolver {
            index: self,
            done: BTreeMap::new(),
            stack: Vec::new(),
            out: Resolution::default(),
        };
        for want in wants {
            let name = normalise(&want.name);
            match self.lookup(&name)? {
                Lookup::Missing if want.required => {
                    let hint = if self.has_builtin_list() {
                        "check the name (`-` and `_` are the same), or use a kernel that has it"
                            .into()
                    } else {
                        "that directory has no modules.builtin, so zc cannot tell whether it is built in; add one (it is made by `make modules`)".into()
                    };
                    return Err(ModuleError::NotFound {
                        name,
                        dir: self.dir.clone(),
                        hint,
                    });
                }
                Lookup::Missing => r.out.absent.push(format!("(wanted): {name}")),
                other => r.take(&name, other, want.required, &Reason::Wanted)?,
            }
        }
        Ok(r.out)
    }

    /// [`ModuleIndex::resolve`] with every name required.
    pub fn resolve_names(&self, names: &[&str]) -> Result<Resolution, ModuleError> {
        let wants: Vec<Want> = names.iter().map(|n| Want::required(n)).collect();
        self.resolve(&wants)
    }
}

/// Parses `modules.builtin` (`kernel/drivers/virtio/virtio.ko` per line) into names.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(name_of_path).collect()
}

struct Resolver<'a> {
    index: &'a ModuleIndex,
    /// Modules already placed: name -> position in `out.modules`.
    done: BTreeMap<String, usize>,
    stack: Vec<String>,
    out: Resolution,
}

impl Resolver<'_> {
    /// Takes what a looked-up `name` stands for into the set.
    fn take(
        &mut self,
        name: &str,
        found: Lookup,
        required: bool,
        reason: &Reason,
    ) -> Result<(), ModuleError> {
        match found {
            Lookup::File(f) => self.visit(&f, required, reason),
            Lookup::Builtin(b) => {
                let text = if b == name {
                    b
                } else {
                    format!("{name} ({b})")
                };
                if !self.out.builtin.contains(&text) {
                    self.out.builtin.push(text);
                }
                Ok(())
            }
            Lookup::Alias { files, builtin } => {
                if let Some(b) = builtin {
                    let text = format!("{name} ({b})");
                    if !self.out.builtin.contains(&text) {
                        self.out.builtin.push(text);
                    }
                }
                // One module behind the alias is enough; a lone one is as needed as
                // the name itself.
                let each_required = required && files.len() == 1;
                for f in files {
                    self.visit(&f, each_required, reason)?;
                }
                Ok(())
            }
            Lookup::Missing => Ok(()),
        }
    }

    /// Depth-first: `name` is a module file of the index.
    fn visit(&mut self, name: &str, required: bool, reason: &Reason) -> Result<(), ModuleError> {
        if let Some(&i) = self.done.get(name) {
            if required && !self.out.modules[i].required {
                self.promote(name)?;
            }
            return Ok(());
        }
        if let Some(i) = self.stack.iter().position(|n| n == name) {
            let mut cycle = self.stack[i..].to_vec();
            cycle.push(name.to_string());
            return Err(ModuleError::Cycle(cycle));
        }
        let (path, compression) = self.index.files[name].clone();
        let (depends, pre, post) = self.index.deps_of(name)?;
        self.stack.push(name.to_string());
        for soft in &pre {
            self.soft(name, soft, Reason::SoftPreOf(name.to_string()))?;
        }
        for dep in &depends {
            match self.index.lookup(dep)? {
                Lookup::File(f) => {
                    self.visit(&f, required, &Reason::DependencyOf(name.to_string()))?
                }
                Lookup::Builtin(_) => {}
                // A hard dependency names a module, never an alias; a depmod file or
                // `.modinfo` that says otherwise is treated as missing.
                Lookup::Alias { .. } | Lookup::Missing => {
                    return Err(ModuleError::MissingDependency {
                        module: name.to_string(),
                        missing: dep.clone(),
                        dir: self.index.dir.clone(),
                    })
                }
            }
        }
        self.stack.pop();
        self.done.insert(name.to_string(), self.out.modules.len());
        self.out.modules.push(Module {
            name: name.to_string(),
            path,
            compression,
            required,
            reason: reason.clone(),
        });
        for soft in &post {
            self.soft(name, soft, Reason::SoftPostOf(name.to_string()))?;
        }
        Ok(())
    }

    fn soft(&mut self, wanting: &str, soft: &str, reason: Reason) -> Result<(), ModuleError> {
        match self.index.lookup(soft)? {
            Lookup::Missing => {
                let text = format!("{wanting}: {soft}");
                if !self.out.absent.contains(&text) {
                    self.out.absent.push(text);
                }
                Ok(())
            }
            found => self.take(soft, found, false, &reason),
        }
    }

    /// A module placed as optional turns out to be required: so are its hard
    /// dependencies.
    fn promote(&mut self, name: &str) -> Result<(), ModuleError> {
        let Some(&i) = self.done.get(name) else {
            return Ok(());
        };
        if self.out.modules[i].required {
            return Ok(());
        }
        self.out.modules[i].required = true;
        let (depends, _, _) = self.index.deps_of(name)?;
        for dep in depends {
            if let Lookup::File(f) = self.index.lookup(&dep)? {
                self.promote(&f)?;
            }
        }
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
        module_elf_with_aliases(name, depends, softdep, &[])
    }

    /// [`module_elf`] with `alias=` entries too.
    pub(crate) fn module_elf_with_aliases(
        name: &str,
        depends: &[&str],
        softdep: Option<&str>,
        aliases: &[&str],
    ) -> Vec<u8> {
        let mut mi = Vec::new();
        mi.extend_from_slice(b"license=GPL\0");
        if let Some(s) = softdep {
            mi.extend_from_slice(format!("softdep={s}\0").as_bytes());
        }
        for a in aliases {
            mi.extend_from_slice(format!("alias={a}\0").as_bytes());
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

    /// Writes `<dir>/kernel/<sub>/<file>.ko` for a module with aliases.
    pub(crate) fn write_module_with_aliases(
        dir: &Path,
        sub: &str,
        file: &str,
        depends: &[&str],
        softdep: Option<&str>,
        aliases: &[&str],
    ) {
        let d = dir.join("kernel").join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("{file}.ko")),
            module_elf_with_aliases(file, depends, softdep, aliases),
        )
        .unwrap();
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
            .resolve_names(&["kvm-amd", "virtio_mmio", "9pnet_virtio", "9p"])
            .unwrap()
            .modules;
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
        let order = index.resolve_names(&roots).unwrap().modules;
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
        let order = index
            .resolve_names(&["virtio", "virtio_mmio", "9p"])
            .unwrap()
            .modules;
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
        let order = index.resolve_names(&["user"]).unwrap().modules;
        assert_eq!(names(&order), ["crc32c_generic", "libcrc32c", "user"]);
    }

    #[test]
    fn missing_root_and_missing_dependency_are_errors() {
        let dir = host_like_tree("");
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.resolve_names(&["virtio_blk"]).unwrap_err();
        assert!(
            matches!(&err, ModuleError::NotFound { name, .. } if name == "virtio_blk"),
            "{err}"
        );
        std::fs::remove_file(dir.path().join("kernel/fs/netfs/netfs.ko")).unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.resolve_names(&["9p"]).unwrap_err();
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
        let err = index.resolve_names(&["b"]).unwrap_err().to_string();
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
        match index.resolve_names(&[graph[0].0]) {
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
        assert!(matches!(
            index.resolve_names(&["a"]),
            Err(ModuleError::Cycle(_))
        ));
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
        let order = index.resolve_names(&["zz_top"]).unwrap().modules;
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

    /// ext4 as Debian's 6.12 rt kernel ships it: a module with a soft dependency on
    /// `crypto-crc32c`, an alias of two modules.
    fn ext4_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "fs/jbd2", "jbd2", &[], Some("pre: crypto-crc32c"));
        write_module(d, "fs", "mbcache", &[], None);
        write_module(d, "lib", "crc16", &[], None);
        write_module(
            d,
            "fs/ext4",
            "ext4",
            &["jbd2", "crc16", "mbcache"],
            Some("pre: crypto-crc32c"),
        );
        let crc = ["crypto-crc32c", "crc32c"];
        write_module_with_aliases(d, "crypto", "crc32c_generic", &[], None, &crc);
        write_module_with_aliases(d, "arch/x86/crypto", "crc32c-intel", &[], None, &crc);
        std::fs::write(
            d.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\n",
        )
        .unwrap();
        dir
    }

    fn required_of<'a>(r: &'a Resolution, name: &str) -> &'a Module {
        r.modules
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} not in {:?}", r.names()))
    }

    #[test]
    fn soft_dependencies_through_aliases_from_modinfo() {
        let dir = ext4_tree();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.source(), DepSource::Modinfo);
        let r = index.resolve_names(&["ext4"]).unwrap();
        // ext4's soft `pre:` dependencies come before its hard ones, as with modprobe:
        // both providers first; jbd2's own softdep then finds them placed.
        assert_eq!(
            r.names(),
            [
                "crc32c_generic",
                "crc32c_intel",
                "jbd2",
                "crc16",
                "mbcache",
                "ext4"
            ]
        );
        for (name, required) in [
            ("crc32c_generic", false),
            ("crc32c_intel", false),
            ("jbd2", true),
            ("ext4", true),
        ] {
            assert_eq!(required_of(&r, name).required, required, "{name}");
        }
        assert_eq!(
            required_of(&r, "crc32c_generic").reason,
            Reason::SoftPreOf("ext4".into())
        );
        assert_eq!(
            required_of(&r, "jbd2").reason,
            Reason::DependencyOf("ext4".into())
        );
        assert!(r.absent.is_empty() && r.builtin.is_empty(), "{r:?}");
        // Asking for the alias itself: both providers, each optional.
        let r = index.resolve_names(&["crc32c"]).unwrap();
        assert_eq!(r.names(), ["crc32c_generic", "crc32c_intel"]);
        assert!(r.modules.iter().all(|m| !m.required));
        assert_eq!(
            index.lookup("crc32c").unwrap(),
            Lookup::Alias {
                files: vec!["crc32c_generic".into(), "crc32c_intel".into()],
                builtin: None
            }
        );
    }

    #[test]
    fn the_alias_cache_is_used_and_renewed_when_modules_change() {
        let dir = ext4_tree();
        let cache = dir.path().join("cache");
        let index = ModuleIndex::scan(dir.path())
            .unwrap()
            .with_alias_cache(cache.clone());
        let first = index.resolve_names(&["ext4"]).unwrap();
        let files: Vec<PathBuf> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        // A cache whose fingerprint matches is believed: make it say something else.
        let text = std::fs::read_to_string(&files[0]).unwrap();
        std::fs::write(&files[0], text.replace("\"crc32c_intel\"", "\"crc16\"")).unwrap();
        let index = ModuleIndex::scan(dir.path())
            .unwrap()
            .with_alias_cache(cache.clone());
        let r = index.resolve_names(&["crc32c"]).unwrap();
        assert_eq!(r.names(), ["crc32c_generic", "crc16"]);
        // Once a module file changes, the fingerprint differs and aliases are read again.
        std::fs::remove_file(dir.path().join("kernel/arch/x86/crypto/crc32c-intel.ko")).unwrap();
        let index = ModuleIndex::scan(dir.path())
            .unwrap()
            .with_alias_cache(cache);
        let r = index.resolve_names(&["ext4"]).unwrap();
        assert_eq!(
            r.names(),
            ["crc32c_generic", "jbd2", "crc16", "mbcache", "ext4"]
        );
        // One provider left: as needed as the alias, but a softdep stays optional.
        assert!(!required_of(&r, "crc32c_generic").required);
        assert_ne!(first, r);
    }

    #[test]
    fn builtin_aliases_satisfy_soft_dependencies() {
        let dir = ext4_tree();
        let d = dir.path();
        std::fs::remove_file(d.join("kernel/crypto/crc32c_generic.ko")).unwrap();
        std::fs::remove_file(d.join("kernel/arch/x86/crypto/crc32c-intel.ko")).unwrap();
        std::fs::write(
            d.join("modules.builtin"),
            "kernel/crypto/crc32c_generic.ko\n",
        )
        .unwrap();
        std::fs::write(
            d.join("modules.builtin.modinfo"),
            b"crc32c_generic.license=GPL\0crc32c_generic.alias=crypto-crc32c\0crc32c_generic.alias=crc32c\0",
        )
        .unwrap();
        let index = ModuleIndex::scan(d).unwrap();
        let r = index.resolve_names(&["ext4"]).unwrap();
        assert_eq!(r.names(), ["jbd2", "crc16", "mbcache", "ext4"]);
        assert_eq!(r.builtin, ["crypto_crc32c (crc32c_generic)"]);
        assert!(r.absent.is_empty());
    }

    #[test]
    fn absent_soft_dependencies_are_listed_not_errors() {
        let dir = ext4_tree();
        let d = dir.path();
        std::fs::remove_file(d.join("kernel/crypto/crc32c_generic.ko")).unwrap();
        std::fs::remove_file(d.join("kernel/arch/x86/crypto/crc32c-intel.ko")).unwrap();
        let index = ModuleIndex::scan(d).unwrap();
        let r = index.resolve_names(&["ext4"]).unwrap();
        assert_eq!(r.names(), ["jbd2", "crc16", "mbcache", "ext4"]);
        assert_eq!(r.absent, ["ext4: crypto_crc32c", "jbd2: crypto_crc32c"]);
        // An optional want that is nowhere is listed too; a required one is an error.
        let r = index
            .resolve(&[Want::optional("virtio_pci"), Want::required("mbcache")])
            .unwrap();
        assert_eq!(r.names(), ["mbcache"]);
        assert_eq!(r.absent, ["(wanted): virtio_pci"]);
        assert!(index.resolve(&[Want::required("virtio_pci")]).is_err());
    }

    #[test]
    fn post_soft_dependencies_follow_the_module() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "x", "a", &["b"], Some("pre: p post: q"));
        write_module(d, "x", "b", &[], None);
        write_module(d, "x", "p", &[], None);
        write_module(d, "x", "q", &["b"], None);
        let index = ModuleIndex::scan(d).unwrap();
        let r = index.resolve_names(&["a"]).unwrap();
        assert_eq!(r.names(), ["p", "b", "a", "q"]);
        assert_eq!(required_of(&r, "q").reason, Reason::SoftPostOf("a".into()));
    }

    #[test]
    fn an_optional_module_needed_later_becomes_required_with_its_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "x", "a", &[], Some("pre: s"));
        write_module(d, "x", "s", &["t"], None);
        write_module(d, "x", "t", &[], None);
        write_module(d, "x", "b", &["s"], None);
        let index = ModuleIndex::scan(d).unwrap();
        let r = index.resolve_names(&["a"]).unwrap();
        assert!(!required_of(&r, "s").required && !required_of(&r, "t").required);
        let r = index.resolve_names(&["a", "b"]).unwrap();
        assert_eq!(r.names(), ["t", "s", "a", "b"]);
        assert!(r.modules.iter().all(|m| m.required), "{r:?}");
    }

    /// depmod's files, when there, are what counts: here they say something other
    /// than the modules' `.modinfo`, so the test tells which was read.
    #[test]
    fn depmod_files_win_over_modinfo() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_module(d, "fs/ext4", "ext4", &[], None);
        write_module(d, "fs/jbd2", "jbd2", &[], None);
        write_module(d, "lib", "crc16", &[], None);
        write_module(d, "crypto", "crc32c_generic", &[], None);
        write_module(d, "lib", "after", &[], None);
        std::fs::write(
            d.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n\
             kernel/fs/jbd2/jbd2.ko:\nkernel/lib/crc16.ko:\nkernel/crypto/crc32c_generic.ko:\nkernel/lib/after.ko:\n",
        )
        .unwrap();
        std::fs::write(
            d.join("modules.softdep"),
            "# Soft dependencies extracted from modules themselves.\nsoftdep ext4 pre: crc32c post: after\n",
        )
        .unwrap();
        std::fs::write(
            d.join("modules.alias"),
            "# Aliases extracted from modules themselves.\nalias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\nalias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n",
        )
        .unwrap();
        let index = ModuleIndex::scan(d).unwrap();
        assert_eq!(index.source(), DepSource::Depmod);
        let r = index.resolve_names(&["ext4"]).unwrap();
        assert_eq!(
            r.names(),
            ["crc32c_generic", "jbd2", "crc16", "ext4", "after"]
        );
        // A single provider behind an alias, reached as a softdep: optional.
        assert!(!required_of(&r, "crc32c_generic").required);
        assert!(required_of(&r, "crc16").required);
        // Wildcard aliases match as fnmatch does.
        assert!(alias_matches(
            "pci:v00001af4d*sv*sd*bc*sc*i*",
            "pci:v00001af4d00001041sv00001af4sd00001100bc02sc00i00"
        ));
    }

    /// Found by the `images` fuzz target: a pattern of many `*` against a name that
    /// does not match took time exponential in the number of stars.
    #[test]
    fn an_alias_pattern_of_many_stars_is_matched_in_linear_time() {
        let pattern = format!("{}b", "*a".repeat(40));
        let name = "a".repeat(200);
        let start = std::time::Instant::now();
        assert!(!alias_matches(&pattern, &name));
        assert!(alias_matches(&pattern, &format!("{name}b")));
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_bad_modules_dep_line_names_the_file_and_line() {
        let err = parse_modules_dep("kernel/a.ko:\nno colon here\n", Path::new("/m/modules.dep"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/m/modules.dep line 2: no `:`"), "{err}");
    }

    #[rstest]
    #[case("crc32c", "crc32c", true)]
    #[case("crc32c", "crc32", false)]
    #[case("fs_*", "fs_ext4", true)]
    #[case("a?c", "abc", true)]
    #[case("a?c", "ac", false)]
    #[case("x[0-9]y", "x5y", true)]
    #[case("x[!0-9]y", "x5y", false)]
    #[case("x[!0-9]y", "xay", true)]
    #[case("*", "", true)]
    #[case("a*b*c", "axxbyyc", true)]
    #[case("a*b*c", "axxbyyd", false)]
    #[case("*ab", "aab", true)]
    #[case("*[ab]?", "xxbz", true)]
    #[case("x[", "x[", true)]
    #[case("**", "abc", true)]
    #[case("a*", "", false)]
    fn alias_patterns(#[case] pattern: &str, #[case] name: &str, #[case] hit: bool) {
        assert_eq!(alias_matches(pattern, name), hit);
    }

    #[test]
    fn depmod_text_parsers() {
        let soft = parse_modules_softdep(
            "softdep ext4 pre: crc32c\nsoftdep a-b pre: x post: y z\nalias q r\n",
        );
        assert_eq!(soft["ext4"], (vec!["crc32c".to_string()], vec![]));
        assert_eq!(
            soft["a_b"],
            (
                vec!["x".to_string()],
                vec!["y".to_string(), "z".to_string()]
            )
        );
        let aliases = parse_modules_alias(
            "alias fs-ext4 ext4\nsoftdep x pre: y\nalias crc32c crc32c-intel\n",
        );
        assert_eq!(
            aliases,
            [
                ("fs_ext4".to_string(), "ext4".to_string()),
                ("crc32c".into(), "crc32c_intel".into())
            ]
        );
        let b = parse_builtin_modinfo(b"virtio.license=GPL\0ext4.alias=fs-ext4\0\0junk\0");
        assert_eq!(
            b.into_iter().collect::<Vec<_>>(),
            [("fs_ext4".to_string(), "ext4".to_string())]
        );
    }
}
