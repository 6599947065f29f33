//! mount(2)/umount(2) with errors that say which mount failed and why.

use std::ffi::CString;
use std::io;
use std::ptr;

use crate::error::{Error, Result};

/// One mount request.
#[derive(Debug, Clone, Copy)]
pub struct Mount<'a> {
    /// Source: a device, a 9p tag, or the fs name for virtual filesystems.
    pub source: &'a str,
    /// Mount point.
    pub target: &'a str,
    /// Filesystem type.
    pub fstype: &'a str,
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// Filesystem options (the `-o` string minus generic flags), if any.
    pub data: Option<&'a str>,
}

impl Mount<'_> {
    /// A virtual filesystem (`proc`, `sysfs`, `tmpfs`, ...) with no options.
    pub const fn virtual_fs<'a>(fstype: &'a str, target: &'a str) -> Mount<'a> {
        Mount {
            source: fstype,
            target,
            fstype,
            flags: 0,
            data: None,
        }
    }

    /// Mounts it.
    pub fn mount(&self) -> Result<()> {
        self.try_mount()
            .map_err(|err| Error::new(format!("{self}: {err}{}", self.hint(&err))))
    }

    /// Mounts it; an `EBUSY` (already mounted there, e.g. a kernel that automounts
    /// devtmpfs) counts as success.
    pub fn mount_or_busy(&self) -> Result<()> {
        match self.try_mount() {
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
            Err(err) => Err(Error::new(format!("{self}: {err}{}", self.hint(&err)))),
            Ok(()) => Ok(()),
        }
    }

    fn try_mount(&self) -> io::Result<()> {
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {s:?}"))
            })
        };
        let (source, target, fstype) = (cstr(self.source)?, cstr(self.target)?, cstr(self.fstype)?);
        let data = self.data.map(cstr).transpose()?;
        // SAFETY: all pointers are NUL-terminated strings that live across the call
        // (or null for no data, which mount(2) accepts).
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                self.flags,
                data.as_ref().map_or(ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn hint(&self, err: &io::Error) -> String {
        match err.raw_os_error() {
            Some(libc::ENODEV) => format!(
                " (the kernel does not know filesystem type {}: is its module in the module list?)",
                self.fstype
            ),
            Some(libc::ENOENT) if self.fstype == "9p" => format!(
                " (no 9p export tagged {:?}, or mount point {} missing: check the VMM's -device virtio-9p-device,mount_tag=... and that the directory exists on the host)",
                self.source, self.target
            ),
            Some(libc::ENOENT) => format!(" (mount point {} does not exist)", self.target),
            _ => String::new(),
        }
    }
}

impl std::fmt::Display for Mount<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mount -t {} {} {}",
            self.fstype, self.source, self.target
        )?;
        let ro = self.flags & libc::MS_RDONLY != 0;
        match (ro, self.data) {
            (true, Some(d)) => write!(f, " -o ro,{d}"),
            (true, None) => write!(f, " -o ro"),
            (false, Some(d)) => write!(f, " -o {d}"),
            (false, None) => Ok(()),
        }
    }
}

/// The mounts every role needs first: /proc, /sys, /dev (devtmpfs) and /tmp.
pub fn mount_basics() -> Result<()> {
    Mount::virtual_fs("proc", "/proc").mount()?;
    Mount::virtual_fs("sysfs", "/sys").mount()?;
    Mount::virtual_fs("devtmpfs", "/dev").mount_or_busy()?;
    Mount::virtual_fs("tmpfs", "/tmp").mount()
}

/// Unmounts `target`.
pub fn umount(target: &str) -> Result<()> {
    let path =
        CString::new(target).map_err(|_| Error::new(format!("umount {target:?}: NUL byte")))?;
    // SAFETY: `path` is a NUL-terminated string that lives across the call.
    if unsafe { libc::umount(path.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(Error::new(format!(
            "umount {target}: {}",
            io::Error::last_os_error()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_itself_like_the_mount_command() {
        let m = Mount {
            source: "hostroot",
            target: "/host",
            fstype: "9p",
            flags: libc::MS_RDONLY,
            data: Some("trans=virtio"),
        };
        assert_eq!(
            m.to_string(),
            "mount -t 9p hostroot /host -o ro,trans=virtio"
        );
        assert_eq!(
            Mount::virtual_fs("proc", "/proc").to_string(),
            "mount -t proc proc /proc"
        );
    }
}
