//! Small wrappers over system facts every role reports.

use std::ffi::CStr;
use std::io;

use crate::error::{Context, Error, Result};

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> Result<String> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error()).context(|| "uname".to_string());
    }
    // SAFETY: uname NUL-terminates each field within its array.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// Seconds since boot: the first field of `/proc/uptime`.
pub fn uptime() -> Result<f64> {
    let text =
        std::fs::read_to_string("/proc/uptime").context(|| "reading /proc/uptime".to_string())?;
    parse_uptime(&text)
}

/// Parses the text of `/proc/uptime` (`"12.34 56.78\n"`).
pub fn parse_uptime(text: &str) -> Result<f64> {
    text.split_ascii_whitespace()
        .next()
        .and_then(|first| first.parse().ok())
        .ok_or_else(|| Error::new(format!("/proc/uptime: unexpected contents {text:?}")))
}

/// Flushes every filesystem's dirty data (before power-off or unmount).
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_uptime() {
        assert_eq!(parse_uptime("1.23 0.45\n").unwrap(), 1.23);
        assert!(parse_uptime("").is_err());
        assert!(parse_uptime("x 1").is_err());
    }
}
