//! Loading the kernel modules listed in `/etc/zc/modules` with `finit_module`.
//!
//! The initramfs has no `modprobe` and no `modules.dep`: the image builder resolves
//! dependencies and writes the list in load order, one path per line; a line ending in
//! ` optional` names a module the guest may go on without (a soft dependency, such as
//! `crc32c_intel`, which refuses to load on a CPU without SSE4.2): its failure is
//! reported, not fatal. A module that fails to load is one line naming it, the errno
//! and the kernel's own message about it (read from the kernel log). As modprobe
//! does, a `module.param=value` word on the kernel command line (e.g.
//! `kvm_amd.npt=0`) is passed to that module when it loads; the kernel itself only
//! applies such words to built-in code.

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

/// One entry of the module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The module file.
    pub path: PathBuf,
    /// Whether the guest goes on when it fails to load.
    pub optional: bool,
}

/// Parses the module list: one path per line, optionally followed by ` optional`;
/// blank lines and `#` comments are skipped, surrounding whitespace (including a
/// `\r`) is trimmed.
pub fn parse_module_list(text: &str) -> Vec<Listed> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| match line.strip_suffix(" optional") {
            Some(path) => Listed {
                path: PathBuf::from(path.trim_end()),
                optional: true,
            },
            None => Listed {
                path: PathBuf::from(line),
                optional: false,
            },
        })
        .collect()
}

/// The module's name from its file in the initramfs: `/lib/modules/07-kvm_amd.ko.xz`
/// is `kvm_amd` (the image builder writes `<NN>-<name>.ko[.xz|.zst]`; dashes in a
/// name are underscores to the kernel).
pub fn module_name(path: &Path) -> String {
    let file = path.file_name().unwrap_or_default().to_string_lossy();
    let stem = file.split(".ko").next().unwrap_or_default();
    let stem = match stem.split_once('-') {
        Some((order, rest)) if !order.is_empty() && order.bytes().all(|b| b.is_ascii_digit()) => {
            rest
        }
        _ => stem,
    };
    stem.replace('-', "_")
}

/// The parameters the kernel command line gives `module`, joined as `finit_module`
/// takes them: `kvm.tdp_mmu=0 kvm_amd.npt=0` gives `npt=0` for `kvm_amd`.
pub fn cmdline_params(cmdline: &str, module: &str) -> String {
    cmdline
        .split_whitespace()
        .filter_map(|word| {
            let (name, param) = word.split_once('.')?;
            (name.replace('-', "_") == module && !param.is_empty()).then_some(param)
        })
        .collect::<Vec<_>>()
        .join(" ")
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
    /// The parameters it was given (from the kernel command line), or empty.
    pub params: String,
    /// Time `finit_module` took.
    pub elapsed: Duration,
    /// For an optional module that did not load: why (errno and the kernel's message).
    pub failed: Option<String>,
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
        let present = self
            .modules
            .iter()
            .filter(|m| !m.newly_loaded && m.failed.is_none())
            .count();
        let loaded = self.modules.iter().filter(|m| m.failed.is_none()).count();
        let mut text = format!(
            "{loaded} module{} loaded in {:.2} s",
            if loaded == 1 { "" } else { "s" },
            self.elapsed.as_secs_f64()
        );
        if present > 0 {
            text.push_str(&format!(" ({present} already present)"));
        }
        for m in &self.modules {
            if let Some(why) = &m.failed {
                text.push_str(&format!(
                    ", optional {} not loaded: {why}",
                    module_name(&m.path)
                ));
            }
        }
        for m in self.modules.iter().filter(|m| !m.params.is_empty()) {
            text.push_str(&format!(", {} with {}", module_name(&m.path), m.params));
        }
        text
    }

    /// The per-module timings, for the log: `01-virtio.ko 0.001 s, ...`.
    pub fn details(&self) -> String {
        self.modules
            .iter()
            .map(|m| {
                let name = m.path.file_name().unwrap_or(m.path.as_os_str());
                let note = match (&m.failed, m.newly_loaded) {
                    (Some(_), _) => " (failed, optional)",
                    (None, true) => "",
                    (None, false) => " (present)",
                };
                let params = if m.params.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", m.params)
                };
                format!(
                    "{}{params} {:.3} s{note}",
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
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let start = Instant::now();
    let modules = parse_module_list(&text)
        .into_iter()
        .map(|listed| {
            let params = cmdline_params(&cmdline, &module_name(&listed.path));
            match load_one(&listed.path, &params) {
                Err(e) if listed.optional => Ok(Loaded {
                    path: listed.path,
                    newly_loaded: false,
                    params,
                    elapsed: Duration::ZERO,
                    failed: Some(e.to_string()),
                }),
                other => other,
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Summary {
        modules,
        elapsed: start.elapsed(),
    })
}

fn load_one(path: &Path, params: &str) -> Result<Loaded> {
    let c_params = std::ffi::CString::new(params)
        .map_err(|_| Error::new(format!("a NUL in the parameters for {}", path.display())))?;
    let file = File::open(path).context(|| {
        format!(
            "opening module {} (listed in {MODULE_LIST})",
            path.display()
        )
    })?;
    let flags = finit_flags(path);
    let start = Instant::now();
    // SAFETY: finit_module reads the module from an open fd that outlives the call;
    // the parameter string is a NUL-terminated CString that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            c_params.as_ptr(),
            flags,
        )
    };
    let elapsed = start.elapsed();
    if rc == 0 {
        return Ok(Loaded {
            path: path.to_path_buf(),
            newly_loaded: true,
            params: params.to_string(),
            elapsed,
            failed: None,
        });
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Loaded {
            path: path.to_path_buf(),
            newly_loaded: false,
            params: params.to_string(),
            elapsed,
            failed: None,
        }),
        errno => {
            let name = module_name(path);
            let kernel = kernel_log()
                .and_then(|log| kernel_message_about(&log, &name))
                .map(|m| format!("; kernel: \"{m}\""))
                .unwrap_or_default();
            Err(Error::new(format!(
                "loading module {name} ({}): {err}{}{kernel}",
                path.display(),
                hint(errno, flags)
            )))
        }
    }
}

/// The kernel log (`syslog(SYSLOG_ACTION_READ_ALL)`: no /dev/kmsg needed), or `None`.
fn kernel_log() -> Option<String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer and only returns the log's size.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).ok().filter(|&s| s > 0)?.min(1 << 20);
    let mut buf = vec![0u8; size];
    // SAFETY: the buffer is valid for writes of `size` bytes, which is what we pass.
    let n = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            libc::c_int::try_from(size).ok()?,
        )
    };
    let n = usize::try_from(n).ok()?;
    buf.truncate(n);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The kernel's last message about module `name` (e.g. `<3>[    1.2] ext4: Unknown
/// symbol jbd2_journal_start (err -2)` gives `ext4: Unknown symbol ...`): lines that
/// start with `<name>: ` (after the level and timestamp) or mention `module <name>`.
pub fn kernel_message_about(log: &str, name: &str) -> Option<String> {
    let strip = |line: &str| -> String {
        let mut l = line.trim();
        if l.starts_with('<') {
            if let Some(i) = l.find('>') {
                l = &l[i + 1..];
            }
        }
        if l.starts_with('[') {
            if let Some(i) = l.find(']') {
                l = &l[i + 1..];
            }
        }
        l.trim().to_string()
    };
    let dashed = name.replace('_', "-");
    log.lines().rev().map(strip).find(|l| {
        [name, dashed.as_str()].iter().any(|n| {
            l.starts_with(&format!("{n}: "))
                || l.contains(&format!("module {n}"))
                || l.contains(&format!("module: {n}"))
        })
    })
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
        let paths: Vec<PathBuf> = parse_module_list(text)
            .into_iter()
            .map(|l| l.path)
            .collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/lib/modules/01-virtio.ko"),
                PathBuf::from("/lib/modules/02-virtio_ring.ko.xz"),
                PathBuf::from("/lib/modules/03-9p.ko.zst"),
            ]
        );
        assert!(parse_module_list(text).iter().all(|l| !l.optional));
    }

    #[test]
    fn optional_lines() {
        let list = parse_module_list(
            "/lib/modules/06-crc32c_intel.ko.xz optional\r\n/lib/modules/07-ext4.ko\n",
        );
        assert_eq!(
            list,
            [
                Listed {
                    path: "/lib/modules/06-crc32c_intel.ko.xz".into(),
                    optional: true
                },
                Listed {
                    path: "/lib/modules/07-ext4.ko".into(),
                    optional: false
                }
            ]
        );
    }

    #[test]
    fn kernel_messages_about_a_module() {
        let log = "<6>[    0.5] virtio_blk virtio1: [vda] 131072 512-byte logical blocks\n\
                   <4>[    1.2] ext4: Unknown symbol jbd2_journal_start (err -2)\n\
                   <4>[    1.3] ext4: Unknown symbol jbd2_journal_stop (err -2)\n\
                   <3>[    1.4] crc32c-intel: no SSE4.2\n\
                   <3>[    1.5] Invalid ELF header magic: != \\x7fELF\n";
        assert_eq!(
            kernel_message_about(log, "ext4").as_deref(),
            Some("ext4: Unknown symbol jbd2_journal_stop (err -2)")
        );
        assert_eq!(
            kernel_message_about(log, "crc32c_intel").as_deref(),
            Some("crc32c-intel: no SSE4.2")
        );
        assert_eq!(kernel_message_about(log, "virtio_net"), None);
    }

    #[test]
    fn module_names_come_from_the_initramfs_file_names() {
        for (path, name) in [
            ("/lib/modules/07-kvm_amd.ko", "kvm_amd"),
            ("/lib/modules/12-9pnet_virtio.ko.xz", "9pnet_virtio"),
            ("/lib/modules/03-kvm-amd.ko.zst", "kvm_amd"),
            ("/tmp/virtio_net.ko", "virtio_net"),
        ] {
            assert_eq!(module_name(Path::new(path)), name, "{path}");
        }
    }

    #[test]
    fn command_line_parameters_go_to_their_module_only() {
        let cmdline =
            "console=ttyS0 kvm.tdp_mmu=0 kvm_amd.npt=0 kvm-amd.nested=1 zc.role=host kvm.";
        assert_eq!(cmdline_params(cmdline, "kvm_amd"), "npt=0 nested=1");
        assert_eq!(cmdline_params(cmdline, "kvm"), "tdp_mmu=0");
        assert_eq!(cmdline_params(cmdline, "virtio_mmio"), "");
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
                    params: String::new(),
                    elapsed: Duration::from_millis(3),
                    failed: None,
                },
                Loaded {
                    path: "/lib/modules/02-kvm.ko.xz".into(),
                    newly_loaded: false,
                    params: "tdp_mmu=0".into(),
                    elapsed: Duration::ZERO,
                    failed: None,
                },
            ],
            elapsed: Duration::from_millis(50),
        };
        assert_eq!(
            summary.describe(),
            "2 modules loaded in 0.05 s (1 already present), kvm with tdp_mmu=0"
        );
        assert_eq!(
            summary.details(),
            "01-virtio.ko 0.003 s, 02-kvm.ko.xz [tdp_mmu=0] 0.000 s (present)"
        );
        assert_eq!(Summary::default().describe(), "0 modules loaded in 0.00 s");
        let failed = Summary {
            modules: vec![Loaded {
                path: "/lib/modules/07-crc32c_intel.ko.xz".into(),
                newly_loaded: false,
                params: String::new(),
                elapsed: Duration::ZERO,
                failed: Some("No such device".into()),
            }],
            elapsed: Duration::from_millis(10),
        };
        assert_eq!(
            failed.describe(),
            "0 modules loaded in 0.01 s, optional crc32c_intel not loaded: No such device"
        );
        assert_eq!(
            failed.details(),
            "07-crc32c_intel.ko.xz 0.000 s (failed, optional)"
        );
    }
}
