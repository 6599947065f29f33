//! `zc-guest`: the static program that runs as `/init` (PID 1).
//!
//! In a zc guest (`zc.role=guest`, the default) it loads the listed modules, runs
//! the `zc.test=` steps (test disk, TCP sends) and reports over the COM2 control
//! channel (see `guest.rs`); in the emulated KVM host
//! (`zc.role=host`) it mounts the real host's root over 9p and runs one command in
//! it (see `host.rs`). Either way it ends by powering the machine off.

mod boot;
mod cmdline;
mod command;
mod control;
mod disk;
mod error;
mod guest;
mod host;
mod methods;
mod modules;
mod mounts;
mod net;
mod pattern;
mod power;
mod scenarios;
mod sys;

use cmdline::Role;

fn main() {
    power::install_panic_hook();
    let (role, boot) = boot::start();
    match (role, boot) {
        (Role::Guest, Ok(boot)) => guest::run(&boot),
        (Role::Host, Ok(boot)) => host::run(&boot),
        (Role::Guest, Err(err)) => guest::fail(&err),
        (Role::Host, Err(err)) => host::fail(None, &err),
    }
}
