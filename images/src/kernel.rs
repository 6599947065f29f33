//! What zc knows about one kernel: where its image and modules are and which version it
//! is, whether it came from a Debian package or from the user (`--kernel PATH`).
//!
//! The version is read from the image itself so every report can name the kernel: for a
//! bzImage, the string the setup header's `kernel_version` field points to (at
//! `0x200 + value`, boot protocol >= 2.00); for an ELF `vmlinux`, the `Linux version ...`
//! banner.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::elf;

/// File name of the kernel description written next to an unpacked kernel.
pub const KERNEL_JSON: &str = "kernel.json";

/// One kernel: image, modules and identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// Debian package it came from; `None` for a user's own kernel.
    pub package: Option<String>,
    /// Debian package version (e.g. `6.1.192-2`); `None` for a user's own kernel.
    pub deb_version: Option<String>,
    /// Kernel release, i.e. `uname -r` and the `lib/modules/<release>` directory name.
    pub release: String,
    /// The full version string from the image (release, builder, build number, date).
    pub version: String,
    /// The bootable image (bzImage, or ELF vmlinux for a user's kernel).
    pub vmlinuz: PathBuf,
    /// The `lib/modules/<release>` directory, if the kernel has modules.
    pub modules_dir: Option<PathBuf>,
}

/// Errors reading a kernel image or its description.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The kernel image cannot be read.
    #[error("cannot read kernel image {path}: {source}; check the --kernel path")]
    Read {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither a bzImage with a version string nor an ELF vmlinux with a banner.
    #[error("{path} is not a kernel zc can boot: {why}; pass arch/x86/boot/bzImage or vmlinux")]
    NotAKernel {
        /// The image.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// The modules directory is missing or belongs to another kernel.
    #[error("modules directory {path}: {why}")]
    ModulesDir {
        /// The directory given.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// `kernel.json` cannot be read or written.
    #[error("{path}: {why}; delete that directory so it is unpacked again")]
    Json {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
}

/// Why a buffer has no bzImage version string.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Too short, or no `HdrS` at 0x202.
    #[error("no x86 boot setup header (HdrS at 0x202)")]
    NoSetupHeader,
    /// Boot protocol older than 2.00, or `kernel_version` is 0.
    #[error("the setup header has no kernel_version string")]
    NoVersion,
    /// The field points outside the file or at something that is not text.
    #[error("the kernel_version field points at no readable string")]
    BadVersion,
}

/// Reads the version string of a bzImage: the NUL-terminated text at
/// `0x200 + u16 at 0x20E`, e.g. `6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ...`.
pub fn bzimage_version(image: &[u8]) -> Result<String, HeaderError> {
    if image.len() < 0x210 || &image[0x202..0x206] != b"HdrS" {
        return Err(HeaderError::NoSetupHeader);
    }
    let protocol = u16::from_le_bytes([image[0x206], image[0x207]]);
    let field = u16::from_le_bytes([image[0x20E], image[0x20F]]);
    if protocol < 0x0200 || field == 0 {
        return Err(HeaderError::NoVersion);
    }
    let start = 0x200 + usize::from(field);
    let rest = image.get(start..).ok_or(HeaderError::BadVersion)?;
    let end = rest
        .iter()
        .take(512)
        .position(|&b| b == 0)
        .ok_or(HeaderError::BadVersion)?;
    let text = std::str::from_utf8(&rest[..end]).map_err(|_| HeaderError::BadVersion)?;
    let text = text.trim();
    if text.is_empty() || !text.is_ascii() {
        return Err(HeaderError::BadVersion);
    }
    Ok(text.to_string())
}

/// Reads the `Linux version <release> ...` banner of an ELF vmlinux, without the
/// `Linux version ` prefix and the trailing newline.
pub fn vmlinux_version(image: &[u8]) -> Option<String> {
    const PREFIX: &[u8] = b"Linux version ";
    let mut from = 0;
    while let Some(i) = find(&image[from..], PREFIX) {
        let start = from + i + PREFIX.len();
        let rest = &image[start..];
        let end = rest
            .iter()
            .take(512)
            .position(|&b| b == 0 || b == b'\n')
            .unwrap_or(0);
        let text = &rest[..end];
        // The banner itself, not a format string such as "Linux version %s".
        if text.first().is_some_and(u8::is_ascii_digit) && text.is_ascii() {
            return Some(String::from_utf8_lossy(text).trim().to_string());
        }
        from = start;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => i += p,
        }
        if hay.get(i..i + needle.len()) == Some(needle) {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// The release (`uname -r`): the first word of a version string.
pub fn release_of(version: &str) -> &str {
    version.split_whitespace().next().unwrap_or("")
}

/// Reads the version string of a bzImage or ELF vmlinux file.
pub fn image_version(path: &Path) -> Result<String, KernelError> {
    let data = std::fs::read(path).map_err(|source| KernelError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let not = |why: String| KernelError::NotAKernel {
        path: path.to_path_buf(),
        why,
    };
    if elf::is_elf(&data) {
        return vmlinux_version(&data)
            .ok_or_else(|| not("ELF file without a `Linux version` banner".into()));
    }
    bzimage_version(&data).map_err(|e| not(e.to_string()))
}

/// Describes a user's own kernel: `image` is a bzImage or vmlinux; `modules` is either
/// `lib/modules/<release>` itself, a directory holding `lib/modules/<release>` (an
/// `INSTALL_MOD_PATH`), one holding `<release>`, or any directory of `.ko` files.
pub fn user_kernel(image: &Path, modules: Option<&Path>) -> Result<KernelInfo, KernelError> {
    let version = image_version(image)?;
    let release = release_of(&version).to_string();
    let modules_dir = modules
        .map(|dir| find_modules_dir(dir, &release))
        .transpose()?;
    let vmlinuz = std::path::absolute(image).unwrap_or_else(|_| image.to_path_buf());
    Ok(KernelInfo {
        package: None,
        deb_version: None,
        release,
        version,
        vmlinuz,
        modules_dir,
    })
}

fn find_modules_dir(dir: &Path, release: &str) -> Result<PathBuf, KernelError> {
    let err = |why: String| KernelError::ModulesDir {
        path: dir.to_path_buf(),
        why,
    };
    if !dir.is_dir() {
        return Err(err(
            "is not a directory; pass the lib/modules/<release> directory of your kernel (--modules-dir)".into(),
        ));
    }
    for candidate in [dir.join("lib/modules").join(release), dir.join(release)] {
        if candidate.is_dir() {
            return Ok(absolute(&candidate));
        }
    }
    let installed = dir.join("modules.builtin").is_file() || dir.join("modules.order").is_file();
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let under_lib_modules = dir
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n == "modules");
    if let Some(name) = name {
        if installed && under_lib_modules && name != release {
            return Err(err(format!(
                "holds modules for kernel {name}, but the kernel image is {release}; \
                 pass the modules built with that kernel"
            )));
        }
    }
    Ok(absolute(dir))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

impl KernelInfo {
    /// Writes `dir/kernel.json`, with paths inside `dir` stored relative to it so the
    /// directory can be moved.
    pub fn save(&self, dir: &Path) -> Result<(), KernelError> {
        let path = dir.join(KERNEL_JSON);
        let rel = |p: &Path| {
            p.strip_prefix(dir)
                .map(Path::to_path_buf)
                .unwrap_or(p.to_path_buf())
        };
        let stored = KernelInfo {
            vmlinuz: rel(&self.vmlinuz),
            modules_dir: self.modules_dir.as_deref().map(rel),
            ..self.clone()
        };
        let text = serde_json::to_string_pretty(&stored).expect("KernelInfo serialises");
        std::fs::write(&path, text + "\n").map_err(|e| KernelError::Json {
            path,
            why: format!("cannot write: {e}"),
        })
    }

    /// Reads `dir/kernel.json` written by [`KernelInfo::save`], making paths absolute.
    pub fn load(dir: &Path) -> Result<Self, KernelError> {
        let path = dir.join(KERNEL_JSON);
        let text = std::fs::read_to_string(&path).map_err(|e| KernelError::Json {
            path: path.clone(),
            why: format!("cannot read: {e}"),
        })?;
        let mut info: KernelInfo = serde_json::from_str(&text).map_err(|e| KernelError::Json {
            path: path.clone(),
            why: format!("not a valid kernel description: {e}"),
        })?;
        let dir = absolute(dir);
        info.vmlinuz = dir.join(&info.vmlinuz);
        info.modules_dir = info.modules_dir.map(|m| dir.join(m));
        if !info.vmlinuz.is_file() {
            return Err(KernelError::Json {
                path,
                why: format!("names {} which does not exist", info.vmlinuz.display()),
            });
        }
        Ok(info)
    }

    /// A short name for reports: `package deb_version (release)` or `release (user kernel)`.
    pub fn describe(&self) -> String {
        match (&self.package, &self.deb_version) {
            (Some(p), Some(v)) => format!("{p} {v} ({})", self.release),
            _ => format!("{} (user kernel {})", self.release, self.vmlinuz.display()),
        }
    }
}

/// Builders of fake kernel images for tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// A buffer with a bzImage setup header whose `kernel_version` points at `version`.
    pub(crate) fn fake_bzimage(version: &str) -> Vec<u8> {
        let mut img = vec![0u8; 0x1000];
        img[0x1F1] = 3; // setup_sects
        img[0x1FE] = 0x55;
        img[0x1FF] = 0xAA;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        let at = 0x300usize;
        img[0x20E..0x210].copy_from_slice(&u16::try_from(at - 0x200).unwrap().to_le_bytes());
        img[at..at + version.len()].copy_from_slice(version.as_bytes());
        img
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::fake_bzimage;
    use super::*;

    const V: &str = "6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2025-11-01)";

    #[test]
    fn reads_version_through_the_setup_header() {
        let img = fake_bzimage(V);
        assert_eq!(bzimage_version(&img).unwrap(), V);
        assert_eq!(release_of(V), "6.1.0-56-cloud-amd64");
        // The field, not a fixed place, decides: move the string and the pointer.
        let mut moved = img.clone();
        moved[0x300..0x400].fill(0);
        moved[0x800..0x800 + 5].copy_from_slice(b"6.9.1");
        moved[0x20E..0x210].copy_from_slice(&0x600u16.to_le_bytes());
        assert_eq!(bzimage_version(&moved).unwrap(), "6.9.1");
    }

    #[test]
    fn header_errors() {
        let img = fake_bzimage(V);
        let mut no_magic = img.clone();
        no_magic[0x202] = b'X';
        assert_eq!(bzimage_version(&no_magic), Err(HeaderError::NoSetupHeader));
        assert_eq!(
            bzimage_version(&img[..0x100]),
            Err(HeaderError::NoSetupHeader)
        );
        let mut old = img.clone();
        old[0x206..0x208].copy_from_slice(&0x0104u16.to_le_bytes());
        assert_eq!(bzimage_version(&old), Err(HeaderError::NoVersion));
        let mut zero = img.clone();
        zero[0x20E..0x210].fill(0);
        assert_eq!(bzimage_version(&zero), Err(HeaderError::NoVersion));
        let mut past = img.clone();
        past[0x20E..0x210].copy_from_slice(&0xF000u16.to_le_bytes());
        assert_eq!(bzimage_version(&past), Err(HeaderError::BadVersion));
        let mut unterminated = img.clone();
        unterminated[0x300..].fill(b'a');
        assert_eq!(bzimage_version(&unterminated), Err(HeaderError::BadVersion));
    }

    #[test]
    fn reads_vmlinux_banner_skipping_format_strings() {
        let mut img = crate::elf::testutil::elf_with_sections(&[]);
        img.extend_from_slice(
            b"\0%s Linux version %s\0Linux version 6.12.7-zc (me@box) #3 SMP\n\0",
        );
        assert_eq!(vmlinux_version(&img).unwrap(), "6.12.7-zc (me@box) #3 SMP");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vmlinux");
        std::fs::write(&p, &img).unwrap();
        let k = user_kernel(&p, None).unwrap();
        assert_eq!(k.release, "6.12.7-zc");
        assert_eq!(k.package, None);
        assert_eq!(k.modules_dir, None);
    }

    #[test]
    fn user_kernel_finds_modules_dir_forms_and_rejects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("bzImage");
        std::fs::write(&img, fake_bzimage(V)).unwrap();
        let rel = "6.1.0-56-cloud-amd64";
        let installed = dir.path().join("inst/lib/modules").join(rel);
        std::fs::create_dir_all(&installed).unwrap();
        std::fs::write(installed.join("modules.builtin"), "").unwrap();
        let by_root = user_kernel(&img, Some(&dir.path().join("inst"))).unwrap();
        assert_eq!(by_root.modules_dir.as_deref(), Some(installed.as_path()));
        let by_parent = user_kernel(&img, Some(&dir.path().join("inst/lib/modules"))).unwrap();
        assert_eq!(by_parent.modules_dir.as_deref(), Some(installed.as_path()));
        let direct = user_kernel(&img, Some(&installed)).unwrap();
        assert_eq!(direct.modules_dir.as_deref(), Some(installed.as_path()));

        let other = dir.path().join("inst/lib/modules/6.1.0-55-cloud-amd64");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("modules.order"), "").unwrap();
        let err = user_kernel(&img, Some(&other)).unwrap_err().to_string();
        assert!(
            err.contains("6.1.0-55-cloud-amd64") && err.contains(rel),
            "{err}"
        );
        assert!(user_kernel(&img, Some(&dir.path().join("nope"))).is_err());
        let err = user_kernel(&dir.path().join("missing"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--kernel"), "{err}");
    }

    #[test]
    fn save_and_load_keep_paths_relative() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("boot")).unwrap();
        std::fs::write(dir.path().join("boot/vmlinuz-x"), b"k").unwrap();
        let info = KernelInfo {
            package: Some("linux-image-x".into()),
            deb_version: Some("1-2".into()),
            release: "x".into(),
            version: "x #1".into(),
            vmlinuz: dir.path().join("boot/vmlinuz-x"),
            modules_dir: Some(dir.path().join("lib/modules/x")),
        };
        info.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(KERNEL_JSON)).unwrap();
        assert!(text.contains("\"boot/vmlinuz-x\""), "{text}");
        // Move the directory: loading still finds the image.
        let moved = tempfile::tempdir().unwrap();
        let to = moved.path().join("k");
        std::fs::rename(dir.path(), &to).unwrap();
        let back = KernelInfo::load(&to).unwrap();
        assert_eq!(back.vmlinuz, to.join("boot/vmlinuz-x"));
        assert_eq!(back.modules_dir, Some(to.join("lib/modules/x")));
        assert_eq!(back.package, info.package);
    }
}
