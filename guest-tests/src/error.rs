//! A tiny error type: a message that already says what failed and why.
//!
//! `anyhow` would do, but this program is PID 1 in a minimal initramfs and keeps its
//! dependencies to `libc` and `io-uring`; all it ever does with an error is print
//! it and power off.

use std::fmt;
use std::io;

/// A failure of the init program, as a complete human-readable sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    message: String,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Creates an error from a message that names the thing that failed.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<zc_protocol::OptionsError> for Error {
    fn from(err: zc_protocol::OptionsError) -> Error {
        Error::new(err.to_string())
    }
}

/// Adds "what we were doing" to an I/O error.
pub trait Context<T> {
    /// Prefixes the error with `what()` (e.g. "reading /proc/cmdline").
    fn context<F: FnOnce() -> String>(self, what: F) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn context<F: FnOnce() -> String>(self, what: F) -> Result<T> {
        self.map_err(|e| Error::new(format!("{}: {e}", what())))
    }
}
