//! The `zc.*` options on the kernel command line (`/proc/cmdline`): their types,
//! parsing and one-line errors are `zc_protocol::options` (the VMM writes them with
//! `Options::to_cmdline`); this program reads `/proc/cmdline` (`boot.rs`) and acts
//! on them.

pub use zc_protocol::options::{zc_options, Ipv4Net, Options, Role, TestHook};
