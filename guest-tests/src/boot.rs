//! The start both roles share: basic mounts, uptime, kernel release, options.

use crate::cmdline::{self, Options, Role};
use crate::error::{Context, Result};
use crate::{mounts, sys};

/// What the common start found out.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The validated `zc.*` options.
    pub options: Options,
    /// `uname -r`.
    pub kernel_release: String,
    /// Kernel uptime when this program started, in seconds.
    pub uptime: f64,
}

/// Mounts /proc, /sys, /dev and /tmp and reads the command line.
///
/// Always returns a role to report with, even on failure: the one the command line
/// asks for if it could be read, the default (guest) otherwise.
pub fn start() -> (Role, Result<Boot>) {
    let mounted = mounts::mount_basics();
    // Read before anything slow: this is "the time /init was reached".
    let uptime = sys::uptime();
    let options = std::fs::read_to_string("/proc/cmdline")
        .context(|| "reading /proc/cmdline".to_string())
        .map(|text| cmdline::zc_options(&text));
    let role = options.as_ref().map_or(Role::Guest, Role::lenient);
    let boot = (|| {
        mounted?;
        Ok(Boot {
            options: Options::from_map(&options?)?,
            kernel_release: sys::kernel_release()?,
            uptime: uptime?,
        })
    })();
    (role, boot)
}
