//! The test disk: an ext4 image holding files of random, page-unique content.
//!
//! Output of [`build`] for `--out DIR/disk.img`:
//! ```text
//! DIR/disk.img         sparse ext4 image (no journal, 4 KiB blocks), what virtio-blk serves
//! DIR/disk.img.json    the Manifest: inputs, and each file's name, size, seed, sha256
//! DIR/disk-files/NAME  the same bytes as /NAME inside the image, for the host to
//!                      verify transfers against (and the `mkfs.ext4 -d` source)
//! ```
//!
//! ## Content
//! Every 4 KiB page of every file is different from every other page on the disk, so
//! that the audit can tell from a page's bytes alone which file offset it holds (a
//! page read by the NIC from somewhere else than where the disk put it is a CPU copy).
//! The content is a pure function of the disk seed, the file name and the page index,
//! so anyone can regenerate or check it without the image (generator `zc-disk-v1`):
//! - `file_seed = u64_le(sha256("zc-disk-v1 file" || u64_le(disk_seed) || name)[0..8])`
//! - `key = sha256("zc-disk-v1 page" || u64_le(file_seed) || u64_le(page_index))`
//! - the page is 512 outputs of xoshiro256** seeded with the key as four
//!   little-endian u64 words, each output stored little-endian; a file's last partial
//!   page is a prefix of its full page.
//!
//! Pages differ because their keys differ (distinct (file_seed, page_index) inputs to
//! sha256), so two equal pages would take a 256-bit collision.
//!
//! ## Why no journal
//! The image is rebuilt from its inputs, never recovered, so a journal buys nothing,
//! while it would put jbd2's own writes (descriptor and commit blocks, a second copy
//! of every metadata block) into the blk DMA log of every method span that touches
//! metadata. Without it the only blk traffic in a span is the data the method asks
//! for. `lazy_itable_init=0` is for the same reason: otherwise the kernel's
//! `ext4lazyinit` thread zeroes inode tables in the background while tests run.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Page size the content is generated in (and the image's block size).
pub const PAGE: usize = 4096;
/// Default image size (`--size`).
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// Default payload file name.
pub const DEFAULT_FILE: &str = "payload.bin";
/// Default payload file size: 16 MiB.
pub const DEFAULT_FILE_SIZE: u64 = 16 << 20;
/// Default disk seed (`"zc-disk1"` in ASCII), so that default images are identical.
pub const DEFAULT_SEED: u64 = 0x7a63_2d64_6973_6b31;
/// The content generator's name; changes whenever the content of a page would.
pub const GENERATOR: &str = "zc-disk-v1";
/// Manifest format version; bumped when the manifest's or the image's layout changes,
/// so older outputs are rebuilt.
pub const MANIFEST_FORMAT: u32 = 1;
/// The directory beside the image that keeps the source files.
pub const FILES_DIR: &str = "disk-files";
/// The test disk's ext4 label (the scratch disk has [`crate::scratch::LABEL`]): the
/// guest tells its disks apart by it, not by their order.
pub const TEST_DISK_LABEL: &str = zc_protocol::disk::TEST_DISK_LABEL;

/// Errors of the test-disk builder.
#[derive(Debug, Error)]
pub enum DiskError {
    /// A `--size` or `--file NAME=SIZE` size did not parse.
    #[error("{0:?}: not a size (expected bytes or a number with K, M or G, e.g. 16M)")]
    BadSize(String),
    /// A `--file` argument is not `NAME=SIZE`.
    #[error("--file {0:?}: expected NAME=SIZE, e.g. payload.bin=16M")]
    BadFileSpec(String),
    /// A file name that cannot be a plain file in the image's root directory.
    #[error("--file {name:?}: {why}")]
    BadFileName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The files do not fit in the image.
    #[error("the files need {needed} bytes but the image is only {size} bytes: raise --size")]
    TooSmall {
        /// Bytes of file data (in whole blocks).
        needed: u64,
        /// The image size asked for.
        size: u64,
    },
    /// `mkfs.ext4` is not installed.
    #[error("mkfs.ext4 not found: install e2fsprogs (apt-get install e2fsprogs)")]
    MkfsMissing,
    /// `mkfs.ext4` ran and failed.
    #[error(
        "mkfs.ext4 failed for {image} ({status}): {stderr} (is --size large enough for the files?)"
    )]
    Mkfs {
        /// The image being made.
        image: PathBuf,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The files directory holds something this builder did not put there.
    #[error("{0} holds a non-file entry; it is rebuilt from scratch, so remove it by hand")]
    ForeignEntry(PathBuf),
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("writing", "creating", ...).
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The manifest could not be written.
    #[error("writing manifest {path}: {source}")]
    Manifest {
        /// The manifest's path.
        path: PathBuf,
        /// The serialisation error.
        source: serde_json::Error,
    },
}

impl DiskError {
    /// Whether the error is the user's input (a size, a file spec, an image too small
    /// for its files), found before anything is written; the binary exits 2 for it.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            DiskError::BadSize(_)
                | DiskError::BadFileSpec(_)
                | DiskError::BadFileName { .. }
                | DiskError::TooSmall { .. }
        )
    }
}

pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a size: plain bytes, or a number with a binary `K`, `M` or `G` suffix
/// (`KiB`/`MiB`/`GiB` and lower case accepted too).
pub fn parse_size(text: &str) -> Result<u64, DiskError> {
    let bad = || DiskError::BadSize(text.to_string());
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// One file to put in the image's root directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Its name (no `/`).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

impl FileSpec {
    /// The default: one 16 MiB `payload.bin`.
    pub fn default_payload() -> FileSpec {
        FileSpec {
            name: DEFAULT_FILE.to_string(),
            size: DEFAULT_FILE_SIZE,
        }
    }

    fn check_name(&self) -> Result<(), DiskError> {
        let why = if self.name.is_empty() {
            Some("empty name")
        } else if self.name.contains('/') || self.name.contains('\0') {
            Some("must be a plain name (no / or NUL): files go in the image's root directory")
        } else if self.name == "." || self.name == ".." || self.name == "lost+found" {
            Some("reserved name")
        } else if self.name.ends_with(".tmp") {
            Some("names ending in .tmp are reserved for the builder's temporary files")
        } else {
            None
        };
        match why {
            Some(why) => Err(DiskError::BadFileName {
                name: self.name.clone(),
                why,
            }),
            None => Ok(()),
        }
    }
}

impl FromStr for FileSpec {
    type Err = DiskError;

    /// Parses `NAME=SIZE` (`payload.bin=16M`).
    fn from_str(text: &str) -> Result<FileSpec, DiskError> {
        let (name, size) = text
            .rsplit_once('=')
            .ok_or_else(|| DiskError::BadFileSpec(text.to_string()))?;
        let spec = FileSpec {
            name: name.to_string(),
            size: parse_size(size)?,
        };
        spec.check_name()?;
        Ok(spec)
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct DiskRequest {
    /// The image file; the manifest is `<out>.json`, the files go to `<out dir>/disk-files/`.
    pub out: PathBuf,
    /// Image size in bytes (the file is sparse).
    pub size: u64,
    /// The files, in the order they are created.
    pub files: Vec<FileSpec>,
    /// The disk seed all content derives from.
    pub seed: u64,
}

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Name in the image's root directory (and in `disk-files/`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The file seed, 16 lower-case hex digits (a string: JSON readers that parse
    /// numbers as doubles would round a u64).
    pub seed: String,
    /// SHA-256 of the whole file, lower-case hex.
    pub sha256: String,
}

/// `<image>.json`: what the image holds and the inputs it was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// [`GENERATOR`]: the content algorithm (see the module docs).
    pub generator: String,
    /// The image's file name (beside the manifest).
    pub image: String,
    /// Image size in bytes.
    pub size: u64,
    /// File system type (`ext4`).
    pub fs: String,
    /// File system block size.
    pub block_size: u32,
    /// Whether the file system has a journal (it does not; see the module docs).
    pub journal: bool,
    /// The disk seed, 16 lower-case hex digits.
    pub seed: String,
    /// Directory beside the manifest holding copies of the files.
    pub files_dir: String,
    /// The files, in the image's root directory.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Reads a manifest file.
    pub fn read(path: &Path) -> Result<Manifest, DiskError> {
        let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
        serde_json::from_str(&text).map_err(|e| DiskError::Io {
            what: "parsing",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }

    /// The file seed of `name`, parsed back from hex.
    pub fn file_seed(&self, name: &str) -> Option<u64> {
        let file = self.files.iter().find(|f| f.name == name)?;
        u64::from_str_radix(&file.seed, 16).ok()
    }

    /// True when this manifest describes exactly what `req` asks for.
    fn matches(&self, req: &DiskRequest, image_name: &str) -> bool {
        self.format == MANIFEST_FORMAT
            && self.generator == GENERATOR
            && self.image == image_name
            && self.size == req.size
            && self.seed == hex_u64(req.seed)
            && self.files.len() == req.files.len()
            && self
                .files
                .iter()
                .zip(&req.files)
                .all(|(m, r)| m.name == r.name && m.size == r.size)
    }
}

/// The path of an image's manifest: `disk.img` -> `disk.img.json`.
pub fn manifest_path(image: &Path) -> PathBuf {
    let mut name = image.file_name().unwrap_or_default().to_os_string();
    name.push(".json");
    image.with_file_name(name)
}

fn hex_u64(value: u64) -> String {
    format!("{value:016x}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The seed of file `name` on a disk with seed `disk_seed`.
pub fn file_seed(disk_seed: u64, name: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"zc-disk-v1 file");
    h.update(disk_seed.to_le_bytes());
    h.update(name.as_bytes());
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 is 32 bytes"))
}

/// Fills `page` with page `page_index` of the file with seed `file_seed`.
pub fn fill_page(file_seed: u64, page_index: u64, page: &mut [u8; PAGE]) {
    let mut h = Sha256::new();
    h.update(b"zc-disk-v1 page");
    h.update(file_seed.to_le_bytes());
    h.update(page_index.to_le_bytes());
    let key = h.finalize();
    let mut s = [0u64; 4];
    for (word, bytes) in s.iter_mut().zip(key.chunks_exact(8)) {
        *word = u64::from_le_bytes(bytes.try_into().expect("8-byte chunk"));
    }
    if s == [0; 4] {
        // xoshiro's one fixed point; unreachable short of a sha256 preimage, but
        // keep the generator total.
        s[0] = 1;
    }
    for out in page.chunks_exact_mut(8) {
        out.copy_from_slice(&xoshiro256ss(&mut s).to_le_bytes());
    }
}

/// One step of xoshiro256** (Blackman and Vigna): fast, and good enough that no two
/// small aligned windows of a page repeat in practice.
fn xoshiro256ss(s: &mut [u64; 4]) -> u64 {
    let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
    let t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = s[3].rotate_left(45);
    result
}

/// Writes `size` bytes of the content of the file with seed `file_seed` to `out`;
/// returns their SHA-256.
pub fn write_content(file_seed: u64, size: u64, out: &mut impl Write) -> io::Result<[u8; 32]> {
    let mut page = [0u8; PAGE];
    let mut hash = Sha256::new();
    let mut left = size;
    let mut index = 0u64;
    while left > 0 {
        fill_page(file_seed, index, &mut page);
        let n = usize::try_from(left).map_or(PAGE, |left| left.min(PAGE));
        out.write_all(&page[..n])?;
        hash.update(&page[..n]);
        left -= n as u64;
        index += 1;
    }
    Ok(hash.finalize().into())
}

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image.
    pub image: PathBuf,
    /// Its manifest.
    pub manifest_path: PathBuf,
    /// The copies of the files.
    pub files_dir: PathBuf,
    /// The manifest's content.
    pub manifest: Manifest,
    /// False when everything was already up to date.
    pub rebuilt: bool,
}

/// Builds the image, its manifest and the file copies, unless the existing manifest
/// says they were built from the same inputs (and the image and files are there with
/// the right sizes).
pub fn build(req: &DiskRequest, progress: &mut dyn FnMut(&str)) -> Result<Built, DiskError> {
    let files = if req.files.is_empty() {
        vec![FileSpec::default_payload()]
    } else {
        req.files.clone()
    };
    let req = DiskRequest {
        files,
        ..req.clone()
    };
    for f in &req.files {
        f.check_name()?;
    }
    for (i, f) in req.files.iter().enumerate() {
        if req.files[..i].iter().any(|g| g.name == f.name) {
            return Err(DiskError::BadFileName {
                name: f.name.clone(),
                why: "given twice",
            });
        }
    }
    let needed: u64 = req
        .files
        .iter()
        .map(|f| f.size.div_ceil(PAGE as u64) * PAGE as u64)
        .sum();
    if needed >= req.size {
        return Err(DiskError::TooSmall {
            needed,
            size: req.size,
        });
    }

    let image = req.out.clone();
    let image_name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| DiskError::BadFileSpec(format!("--out {}", image.display())))?;
    let dir = match image.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let files_dir = dir.join(FILES_DIR);
    let manifest_path = manifest_path(&image);

    if let Ok(manifest) = Manifest::read(&manifest_path) {
        if manifest.matches(&req, &image_name) && outputs_present(&image, &files_dir, &req) {
            return Ok(Built {
                image,
                manifest_path,
                files_dir,
                manifest,
                rebuilt: false,
            });
        }
    }

    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    // Removed first: an interrupted build must not look up to date next time.
    match fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_err("removing", &manifest_path)(e))
        }
        _ => {}
    }
    clear_files_dir(&files_dir)?;

    let mut entries = Vec::new();
    for f in &req.files {
        let seed = file_seed(req.seed, &f.name);
        let path = files_dir.join(&f.name);
        progress(&format!(
            "disk: writing {} ({} bytes, seed {})",
            path.display(),
            f.size,
            hex_u64(seed)
        ));
        let file = File::create(&path).map_err(io_err("creating", &path))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let digest = write_content(seed, f.size, &mut w).map_err(io_err("writing", &path))?;
        w.flush().map_err(io_err("writing", &path))?;
        entries.push(ManifestFile {
            name: f.name.clone(),
            size: f.size,
            seed: hex_u64(seed),
            sha256: hex(&digest),
        });
    }

    progress(&format!(
        "disk: mkfs.ext4 {} ({} bytes, from {})",
        image.display(),
        req.size,
        files_dir.display()
    ));
    let tmp = image.with_file_name(format!("{image_name}.tmp"));
    make_ext4(&tmp, req.size, TEST_DISK_LABEL, Some(&files_dir))?;
    fs::rename(&tmp, &image).map_err(io_err("renaming into place", &image))?;

    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        generator: GENERATOR.to_string(),
        image: image_name,
        size: req.size,
        fs: "ext4".to_string(),
        block_size: u32::try_from(PAGE).expect("a page is 4096 bytes"),
        journal: false,
        seed: hex_u64(req.seed),
        files_dir: FILES_DIR.to_string(),
        files: entries,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|source| DiskError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    fs::write(&manifest_path, text + "\n").map_err(io_err("writing", &manifest_path))?;
    Ok(Built {
        image,
        manifest_path,
        files_dir,
        manifest,
        rebuilt: true,
    })
}

/// The image and each file exist with the expected sizes (contents are not re-hashed:
/// the manifest is written last, so its presence means they were complete).
fn outputs_present(image: &Path, files_dir: &Path, req: &DiskRequest) -> bool {
    let len = |p: &Path| fs::metadata(p).ok().map(|m| m.len());
    len(image) == Some(req.size)
        && req
            .files
            .iter()
            .all(|f| len(&files_dir.join(&f.name)) == Some(f.size))
}

/// Empties (or creates) the files directory. Only regular files are removed: the
/// directory's whole content goes into the image, so anything else in it is an error
/// rather than something to delete behind the user's back.
fn clear_files_dir(files_dir: &Path) -> Result<(), DiskError> {
    fs::create_dir_all(files_dir).map_err(io_err("creating", files_dir))?;
    for entry in fs::read_dir(files_dir).map_err(io_err("listing", files_dir))? {
        let entry = entry.map_err(io_err("listing", files_dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("inspecting", &path))?;
        if !kind.is_file() {
            return Err(DiskError::ForeignEntry(path));
        }
        fs::remove_file(&path).map_err(io_err("removing", &path))?;
    }
    Ok(())
}

/// Creates a sparse `size`-byte file at `image` and makes an ext4 file system labelled
/// `label` in it, holding the content of `files_dir` if one is given. The same
/// options for the test disk and the scratch disk (see "Why no journal" above).
pub(crate) fn make_ext4(
    image: &Path,
    size: u64,
    label: &str,
    files_dir: Option<&Path>,
) -> Result<(), DiskError> {
    let file = File::create(image).map_err(io_err("creating", image))?;
    file.set_len(size).map_err(io_err("sizing", image))?;
    drop(file);
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-b", "4096", "-O", "^has_journal", "-m", "0"])
        .args(["-L", label, "-E", "lazy_itable_init=0,root_owner=0:0"]);
    if let Some(dir) = files_dir {
        mkfs.arg("-d").arg(dir);
    }
    let output = mkfs
        .arg(image)
        // mkfs.ext4 lives in /sbin, which a non-root PATH may lack.
        .env("PATH", path_with_sbin())
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let _ = fs::remove_file(image);
            return Err(DiskError::MkfsMissing);
        }
        Err(e) => return Err(io_err("running mkfs.ext4 for", image)(e)),
    };
    if !output.status.success() {
        let _ = fs::remove_file(image);
        return Err(DiskError::Mkfs {
            image: image.to_path_buf(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// `PATH` with the sbin directories e2fsprogs live in added.
pub(crate) fn path_with_sbin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let mut parts: Vec<&str> = path.split(':').filter(|p| !p.is_empty()).collect();
    for extra in ["/usr/sbin", "/sbin"] {
        if !parts.contains(&extra) {
            parts.push(extra);
        }
    }
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        for bad in ["", "M", "1.5M", "-1", "12T", "99999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_specs() {
        assert_eq!(
            "payload.bin=16M".parse::<FileSpec>().unwrap(),
            FileSpec::default_payload()
        );
        assert_eq!("a=b=1K".parse::<FileSpec>().unwrap().name, "a=b");
        for bad in [
            "x",
            "=1M",
            "a/b=1M",
            "..=1",
            "lost+found=1",
            "x.tmp=1",
            "x=1Q",
        ] {
            assert!(bad.parse::<FileSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn content_is_deterministic_and_prefix_consistent() {
        let seed = file_seed(DEFAULT_SEED, "payload.bin");
        assert_eq!(seed, file_seed(DEFAULT_SEED, "payload.bin"));
        assert_ne!(seed, file_seed(DEFAULT_SEED, "other.bin"));
        assert_ne!(seed, file_seed(DEFAULT_SEED + 1, "payload.bin"));
        let mut a = Vec::new();
        let mut b = Vec::new();
        let ha = write_content(seed, 3 * PAGE as u64 + 100, &mut a).unwrap();
        let hb = write_content(seed, 3 * PAGE as u64 + 100, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(ha, hb);
        assert_eq!(ha, <[u8; 32]>::from(Sha256::digest(&a)));
        // Page 2 generated alone equals the stream's page 2; the tail is a prefix.
        let mut page = [0u8; PAGE];
        fill_page(seed, 2, &mut page);
        assert_eq!(&a[2 * PAGE..3 * PAGE], &page[..]);
        fill_page(seed, 3, &mut page);
        assert_eq!(&a[3 * PAGE..], &page[..100]);
    }

    #[test]
    fn pinned_first_bytes() {
        // Pins the generator (the host and old manifests depend on it): if this
        // changes, GENERATOR and MANIFEST_FORMAT must change too.
        let seed = file_seed(DEFAULT_SEED, DEFAULT_FILE);
        assert_eq!(hex_u64(seed), "6e7f430c44cea177");
        let mut page = [0u8; PAGE];
        fill_page(seed, 0, &mut page);
        assert_eq!(hex(&page[..8]), "4e68bc63b0114bb0");
    }

    #[test]
    fn every_page_of_the_default_disk_is_unique() {
        // Two files (the default payload and a second one) share no page, and no page
        // repeats within a file; as a stronger check, neither do 64-byte windows.
        let mut pages = HashSet::new();
        let mut windows = HashSet::new();
        for (name, size) in [(DEFAULT_FILE, DEFAULT_FILE_SIZE), ("second.bin", 1 << 20)] {
            let seed = file_seed(DEFAULT_SEED, name);
            let mut page = [0u8; PAGE];
            for index in 0..size / PAGE as u64 {
                fill_page(seed, index, &mut page);
                assert!(pages.insert(page.to_vec()), "{name} page {index} repeats");
                if index < 256 {
                    for w in page.chunks_exact(64) {
                        assert!(windows.insert(w.to_vec()), "{name} page {index} window");
                    }
                }
            }
        }
        assert_eq!(pages.len(), 4096 + 256);
    }

    #[test]
    fn manifest_round_trip_and_match() {
        let req = DiskRequest {
            out: PathBuf::from("/x/disk.img"),
            size: 8 << 20,
            files: vec![FileSpec {
                name: "a.bin".into(),
                size: 4096,
            }],
            seed: 7,
        };
        let m = Manifest {
            format: MANIFEST_FORMAT,
            generator: GENERATOR.into(),
            image: "disk.img".into(),
            size: 8 << 20,
            fs: "ext4".into(),
            block_size: 4096,
            journal: false,
            seed: hex_u64(7),
            files_dir: FILES_DIR.into(),
            files: vec![ManifestFile {
                name: "a.bin".into(),
                size: 4096,
                seed: hex_u64(file_seed(7, "a.bin")),
                sha256: "00".into(),
            }],
        };
        let text = serde_json::to_string(&m).unwrap();
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, m);
        assert!(back.matches(&req, "disk.img"));
        assert_eq!(back.file_seed("a.bin"), Some(file_seed(7, "a.bin")));
        assert!(!back.matches(
            &DiskRequest {
                seed: 8,
                ..req.clone()
            },
            "disk.img"
        ));
        assert!(!back.matches(
            &DiskRequest {
                size: 16 << 20,
                ..req.clone()
            },
            "disk.img"
        ));
        assert!(!back.matches(&req, "other.img"));
        assert_eq!(
            manifest_path(Path::new("/x/disk.img")),
            PathBuf::from("/x/disk.img.json")
        );
    }

    #[test]
    fn rejects_bad_requests_before_touching_disk() {
        let dir = tempfile::tempdir().unwrap();
        let req = DiskRequest {
            out: dir.path().join("disk.img"),
            size: 1 << 20,
            files: vec![FileSpec {
                name: "big".into(),
                size: 1 << 20,
            }],
            seed: 1,
        };
        assert!(matches!(
            build(&req, &mut |_| {}),
            Err(DiskError::TooSmall { .. })
        ));
        let twice = DiskRequest {
            size: 8 << 20,
            files: vec![
                FileSpec {
                    name: "a".into(),
                    size: 1,
                },
                FileSpec {
                    name: "a".into(),
                    size: 2,
                },
            ],
            ..req
        };
        assert!(matches!(
            build(&twice, &mut |_| {}),
            Err(DiskError::BadFileName { .. })
        ));
        assert!(!dir.path().join(FILES_DIR).exists());
    }

    /// A real build with e2fsprogs (skipped with a note when mkfs.ext4 is missing).
    #[test]
    fn builds_a_real_image_and_skips_an_unchanged_one() {
        let dir = tempfile::tempdir().unwrap();
        let req = DiskRequest {
            out: dir.path().join("disk.img"),
            size: 8 << 20,
            files: vec![
                FileSpec {
                    name: "a.bin".into(),
                    size: 100_000,
                },
                FileSpec {
                    name: "b.bin".into(),
                    size: 8192,
                },
            ],
            seed: 42,
        };
        let built = match build(&req, &mut |_| {}) {
            Err(DiskError::MkfsMissing) => {
                eprintln!("skipped: mkfs.ext4 is not installed");
                return;
            }
            other => other.unwrap(),
        };
        assert!(built.rebuilt);
        assert_eq!(fs::metadata(&built.image).unwrap().len(), 8 << 20);
        let a = fs::read(built.files_dir.join("a.bin")).unwrap();
        assert_eq!(a.len(), 100_000);
        assert_eq!(
            hex(&Sha256::digest(&a)),
            built.manifest.files[0].sha256,
            "manifest hash"
        );
        assert_eq!(
            Manifest::read(&built.manifest_path).unwrap(),
            built.manifest
        );
        // The image's ext4 magic (0xEF53 at byte 1024 + 56).
        let img = fs::read(&built.image).unwrap();
        assert_eq!(&img[1024 + 56..1024 + 58], &[0x53, 0xef]);
        // The file's pages are in the image, 4 KiB-aligned (so page-cache pages map
        // to whole disk blocks).
        let first_page = &a[..PAGE];
        assert!(img.chunks_exact(PAGE).any(|blk| blk == first_page));

        let again = build(&req, &mut |_| {}).unwrap();
        assert!(!again.rebuilt);
        let changed = build(&DiskRequest { seed: 43, ..req }, &mut |_| {}).unwrap();
        assert!(changed.rebuilt);
        assert_ne!(
            changed.manifest.files[0].sha256,
            built.manifest.files[0].sha256
        );
    }
}
