//! Leaving: power off (or reset), and the panic hook that makes sure PID 1 always
//! does so.
//!
//! PID 1 must never exit (the kernel would panic with "Attempted to kill init") nor
//! hang silently: every path ends in [`power_off`].

use std::io::{self, Write};
use std::sync::OnceLock;

use crate::sys;

/// How the current role reports a fatal message (set once the role is known).
type Reporter = Box<dyn Fn(&str) + Send + Sync>;

static PANIC_REPORTER: OnceLock<Reporter> = OnceLock::new();

/// Exit status reported when this program panics (Rust's own convention).
pub const PANIC_EXIT: i32 = 101;

/// Makes a panic print its message, hand it to the role's reporter (see
/// [`set_panic_reporter`]) and power off, instead of unwinding out of PID 1.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("panic: {info}");
        eprintln!("zc-guest: {message}");
        if let Some(report) = PANIC_REPORTER.get() {
            report(&message);
        }
        power_off()
    }));
}

/// Sets how a panic is reported beyond the console (the control channel in the
/// guest, the output directory on the emulated host). Only the first call counts.
pub fn set_panic_reporter(report: impl Fn(&str) + Send + Sync + 'static) {
    let _ = PANIC_REPORTER.set(Box::new(report));
}

/// Syncs and powers the machine off; never returns.
///
/// `reboot(POWER_OFF)` goes through ACPI (which zc-vmm and QEMU implement). If it
/// returns, the reset path is tried (`reboot=k` makes that the keyboard controller,
/// which the VMM treats as the end of the run), and failing that the program idles.
pub fn power_off() -> ! {
    let _ = io::stdout().flush();
    sys::sync();
    // SAFETY: reboot takes a command constant; it only returns on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    eprintln!(
        "zc-guest: power off failed: {}; trying a reset",
        io::Error::last_os_error()
    );
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    eprintln!(
        "zc-guest: reset failed too: {}; idling forever",
        io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause has no arguments; it just sleeps until a signal.
        unsafe { libc::pause() };
    }
}
