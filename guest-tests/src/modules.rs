//! Loading the kernel modules listed in `/etc/zc/modules` with `finit_module`.
//!
//! The initramfs has no `modprobe` and no `modules.dep`: the image builder resolves
//! dependencies and writes the list in load order, one path per line.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// Where the image builder puts the module list.
pub const MODULE_LIST: &str = "/etc/zc/modules";

/// `finit_module` flag: the file is compressed and the kernel decompresses it
/// (needs `CONFIG_MODULE_DECOMPRESS`; Debian 6.12 kernels ship `.ko.xz`).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Parses the module list: one path per line; blank lines and `#` comments are
/// skipped, surrounding whitespace (including a `\r`) is trimmed.
pub fn parse_module_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// The `finit_module` flags for a module file, from its name.
pub fn finit_flags(path: &Path) -> libc::c_uint {
    match path.extension().and_then(|e| e.to_str()) {
        Some("xz" | "zst" | "gz") => MODULE_INIT_COMPRESSED_FILE,
        _ => 0,
    }
}

/// One module's load.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file, as listed.
    pub path: PathBuf,
    /// False when the kernel already had it (`EEXIST`, e.g. built in twice).
    pub newly_loaded: bool,
    /// Time `finit_module` took.
    pub elapsed: Duration,
}

/// What [`load_listed`] did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Each module, in load order.
    pub modules: Vec<Loaded>,
    /// Wall time of the whole list.
    pub elapsed: Duration,
}

impl Summary {
    /// One line for humans: `3 modules loaded in 0.05 s` (+ how many were present).
    pub fn describe(&self) -> String {
        let present = self.modules.iter().filter(|m| !m.newly_loaded).count();
        let mut text = format!(
            "{} module{} loaded in {:.2} s",
            self.modules.len(),
            if self.modules.len() == 1 { "" } else { "s" },
            self.elapsed.as_secs_f64()
        );
        if present > 0 {
            text.push_str(&format!(" ({present} already present)"));
        }
        text
    }

    /// The per-module timings, for the log: `01-virtio.ko 0.001 s, ...`.
    pub fn details(&self) -> String {
        self.modules
            .iter()
            .map(|m| {
                let name = m.path.file_name().unwrap_or(m.path.as_os_str());
                let note = if m.newly_loaded { "" } else { " (present)" };
                format!(
                    "{} {:.3} s{note}",
                    name.to_string_lossy(),
                    m.elapsed.as_secs_f64()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Loads every module in [`MODULE_LIST`] in order; a missing or empty list loads
/// nothing. Stops at the first module that fails.
pub fn load_listed() -> Result<Summary> {
    let text = match std::fs::read_to_string(MODULE_LIST) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).context(|| format!("reading {MODULE_LIST}")),
    };
    let start = Instant::now();
    let modules = parse_module_list(&text)
        .into_iter()
        .map(|path| load_one(&path))
        .collect::<Result<Vec<_>>>()?;
    Ok(Summary {
        modules,
        elapsed: start.elapsed(),
    })
}

fn load_one(path: &Path) -> Result<Loaded> {
    let file = File::open(path).context(|| {
        format!(
            "opening module {} (listed in {MODULE_LIST})",
            path.display()
        )
    })?;
    let flags = finit_flags(path);
    let start = Instant::now();
    // SAFETY: finit_module reads the module from an open fd that outlives the call;
    // the parameter string is a NUL-terminated static empty string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    let elapsed = start.elapsed();
    if rc == 0 {
        return Ok(Loaded {
            path: path.to_path_buf(),
            newly_loaded: true,
            elapsed,
        });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Loaded {
            path: path.to_path_buf(),
            newly_loaded: false,
            elapsed,
        }),
        errno => Err(Error::new(format!(
            "loading module {}: {err}{}",
            path.display(),
            hint(errno, flags)
        ))),
    }
}

/// Why `finit_module` may have failed, for the usual errnos (the kernel log has the
/// details, e.g. the unknown symbol's name).
fn hint(errno: Option<i32>, flags: libc::c_uint) -> &'static str {
    match errno {
        Some(libc::ENOENT) => {
            " (unknown symbol: a module it depends on is missing from, or listed later in, the module list)"
        }
        Some(libc::ENOEXEC) => " (not a module for this kernel: wrong version or format)",
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) if flags & MODULE_INIT_COMPRESSED_FILE != 0 => {
            " (the kernel cannot decompress this module: CONFIG_MODULE_DECOMPRESS or the compressor is missing; decompress it when building the image)"
        }
        Some(libc::EKEYREJECTED) | Some(libc::EKEYREVOKED) => {
            " (signature rejected: the kernel enforces module signatures)"
        }
        Some(libc::ENODEV) => " (the module found no hardware or refused to initialise, e.g. kvm_amd without svm)",
        Some(libc::EBUSY) => " (a resource it needs is in use)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_skips_blanks_and_comments() {
        let text = "# order matters\n/lib/modules/01-virtio.ko\n\n  /lib/modules/02-virtio_ring.ko.xz \r\n#x\n/lib/modules/03-9p.ko.zst";
        assert_eq!(
            parse_module_list(text),
            vec![
                PathBuf::from("/lib/modules/01-virtio.ko"),
                PathBuf::from("/lib/modules/02-virtio_ring.ko.xz"),
                PathBuf::from("/lib/modules/03-9p.ko.zst"),
            ]
        );
    }

    #[test]
    fn empty_list() {
        assert!(parse_module_list("").is_empty());
        assert!(parse_module_list("\n \n").is_empty());
    }

    #[test]
    fn compressed_files_get_the_flag() {
        assert_eq!(finit_flags(Path::new("/lib/modules/01-kvm.ko")), 0);
        assert_eq!(finit_flags(Path::new("/lib/modules/01-kvm.ko.xz")), 4);
        assert_eq!(finit_flags(Path::new("/lib/modules/01-kvm.ko.zst")), 4);
    }

    #[test]
    fn summary_text() {
        let summary = Summary {
            modules: vec![
                Loaded {
                    path: "/lib/modules/01-virtio.ko".into(),
                    newly_loaded: true,
                    elapsed: Duration::from_millis(3),
                },
                Loaded {
                    path: "/lib/modules/02-kvm.ko.xz".into(),
                    newly_loaded: false,
                    elapsed: Duration::ZERO,
                },
            ],
            elapsed: Duration::from_millis(50),
        };
        assert_eq!(
            summary.describe(),
            "2 modules loaded in 0.05 s (1 already present)"
        );
        assert_eq!(
            summary.details(),
            "01-virtio.ko 0.003 s, 02-kvm.ko.xz 0.000 s (present)"
        );
        assert_eq!(Summary::default().describe(), "0 modules loaded in 0.00 s");
    }
}
