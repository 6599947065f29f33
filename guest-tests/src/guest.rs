//! The guest role: PID 1 inside zc-vmm.
//!
//! Control lines, in order: `hello <release>`, `uptime <s>`, `log <modules...>`,
//! then per `zc.test=` step its `log`/`mark`/`report` lines (the disk is mounted and
//! eth0 configured before the first step that needs them), then `exit <code>`; then
//! the machine powers off.

use std::io::Write;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use crate::boot::Boot;
use crate::cmdline::{Ipv4Net, Options, TestHook};
use crate::control::{Control, UartTx, COM2};
use crate::error::{Context, Error, Result};
use crate::methods::port::SamplePort;
use crate::methods::{self, Hooks, Peer, Roots};
use crate::scenarios::{self, Outcome};
use crate::{disk, modules, mounts, net, power, sys};
use zc_protocol::addr::{Card, GUEST_PREFIX};

/// Exit status reported when this program fails (a module, a mount, a bad option).
pub const INIT_FAILED: i32 = 1;
/// Exit status reported when a `zc.test=` step failed (a mismatch, a short ACK...).
pub const TEST_FAILED: i32 = 1;

type Channel = Control<UartTx>;

/// Runs the guest role to the end; never returns.
pub fn run(boot: &Boot) -> ! {
    let mut control = open_control();
    power::set_panic_reporter(|message| {
        if let Ok(tx) = UartTx::open(COM2) {
            let mut control = Control::new(tx);
            let _ = control.log(message);
            let _ = control.exit(power::PANIC_EXIT);
        }
    });
    let code = match run_steps(boot, &mut control) {
        Ok(code) => code,
        Err(err) => report_failure(&mut control, &err),
    };
    finish(&mut control, code)
}

/// Reports a failure of the common start (before `run`) and powers off.
pub fn fail(err: &Error) -> ! {
    let mut control = open_control();
    let code = report_failure(&mut control, err);
    finish(&mut control, code)
}

/// The control channel, or `None` when even ioperm failed (then only the console
/// tells; the VMM sees a power-off without `exit`).
fn open_control() -> Option<Channel> {
    match UartTx::open(COM2) {
        Ok(tx) => Some(Control::new(tx)),
        Err(err) => {
            println!("zc-guest: error: {err}; no control channel");
            None
        }
    }
}

fn run_steps(boot: &Boot, control: &mut Option<Channel>) -> Result<i32> {
    send(control, |c| c.hello(&boot.kernel_release))?;
    send(control, |c| c.uptime(boot.uptime))?;
    for option in &boot.options.unknown {
        say(
            control,
            &format!("warning: ignoring unknown option {option}"),
        )?;
    }

    let summary = modules::load_listed()?;
    let mut text = summary.describe();
    if !summary.modules.is_empty() {
        text = format!("{text}: {}", summary.details());
    }
    send(control, |c| c.log(&text))?;
    println!(
        "zc-guest: kernel {}, /init reached at {:.2} s uptime, {}",
        boot.kernel_release,
        boot.uptime,
        summary.describe()
    );

    let all_passed = run_tests(&boot.options, control)?;
    Ok(if all_passed {
        boot.options.exit_code
    } else {
        TEST_FAILED
    })
}

/// Runs the `zc.test=` steps in order; every data step reports, and a failed one
/// does not stop the rest. Returns whether all passed.
///
/// Set-up (mounting the disk, configuring eth0) happens once, before the first step
/// that needs it, so runs without such steps boot exactly as before; a set-up failure
/// fails the whole run.
fn run_tests(options: &Options, control: &mut Option<Channel>) -> Result<bool> {
    let mut mounted = false;
    let mut scratch_mounted = false;
    let mut net_up = false;
    // Each card's peer, card 0's first.
    let mut peers = vec![options.peer];
    let mut all_passed = true;
    for test in &options.tests {
        if test.needs_disk() && !mounted {
            disk::mount(options.disk_read_only)?;
            mounted = true;
            say(
                control,
                &format!(
                    "mounted {} on {} ({})",
                    disk::DEVICE,
                    disk::MOUNT_POINT,
                    if options.disk_read_only { "ro" } else { "rw" }
                ),
            )?;
        }
        // The method suite writes to the scratch disk only when it has a receive
        // method: a send-only suite boots as before, with or without that disk.
        let needs_scratch =
            test.needs_scratch() || (*test == TestHook::Methods && options.suite.receives());
        if needs_scratch && !scratch_mounted {
            let device = disk::mount_scratch()?;
            scratch_mounted = true;
            say(
                control,
                &format!(
                    "mounted the scratch disk {device} on {} (rw)",
                    disk::SCRATCH_MOUNT_POINT
                ),
            )?;
        }
        if test.needs_net() && !net_up {
            peers = configure_net(options, control)?;
            net_up = true;
        }
        let outcome = match test {
            TestHook::Panic => return panic_kernel(control).map(|()| false),
            TestHook::Hang => return hang(control).map(|()| false),
            TestHook::DiskRoundtrip => {
                say(
                    control,
                    "disk-roundtrip: writing, dropping caches, reading back",
                )?;
                match scenarios::disk_roundtrip() {
                    Ok(r) => r.outcome(),
                    Err(err) => Outcome::failed("disk-roundtrip", None, &err),
                }
            }
            TestHook::DiskRead => match scenarios::disk_read() {
                Ok(r) => r,
                Err(err) => Outcome::failed("disk-read", None, &err),
            },
            TestHook::Methods => {
                let suite = &options.suite;
                let names: Vec<&str> = suite.methods.iter().map(|m| m.name()).collect();
                let peers: Vec<Peer> = peers.iter().copied().map(Peer::at).collect();
                let receiving = if suite.receives() {
                    format!(
                        "; receive methods from {} into {}",
                        Peer::at(options.peer).receive_from,
                        disk::SCRATCH_MOUNT_POINT
                    )
                } else {
                    String::new()
                };
                say(
                    control,
                    &format!(
                        "methods: {} from {}/{} ({}), chunk {}, to {}{receiving}",
                        names.join(","),
                        disk::MOUNT_POINT,
                        suite.file,
                        suite
                            .size
                            .map_or("whole file".to_string(), |s| format!("{s} bytes")),
                        suite.chunk,
                        options.peer
                    ),
                )?;
                match SamplePort::open() {
                    Ok(port) => {
                        let mut hooks = GuestHooks { control, port };
                        let roots = Roots {
                            disk: Path::new(disk::MOUNT_POINT),
                            scratch: Path::new(disk::SCRATCH_MOUNT_POINT),
                        };
                        let passed = methods::run_suite(suite, roots, &peers, &mut hooks)?;
                        // Each method already reported; the suite has no report of
                        // its own.
                        all_passed &= passed;
                        continue;
                    }
                    Err(err) => Outcome::failed("methods", None, &err),
                }
            }
            TestHook::ScratchCopy(file) => {
                say(
                    control,
                    &format!("scratch-copy: {file} to the scratch disk"),
                )?;
                match scenarios::scratch_copy(file) {
                    Ok(outcome) => outcome,
                    Err(err) => Outcome::failed("scratch-copy", Some(file), &err),
                }
            }
            TestHook::Send(file) => {
                say(control, &format!("send: {file} to {}", options.peer))?;
                let mut mark = |label: &str| send(control, |c| c.mark(label));
                match scenarios::send(file, options.peer, &mut mark) {
                    Ok(s) => s.outcome(),
                    Err(err) => Outcome::failed("send", Some(file), &err),
                }
            }
        };
        println!(
            "zc-guest: {} {}",
            if outcome.ok { "ok" } else { "FAILED" },
            outcome.report
        );
        send(control, |c| c.report(&outcome.report))?;
        all_passed &= outcome.ok;
    }
    // A clean unmount keeps each image's ext4 marked clean (they have no journal).
    let mount_points = [
        (mounted, disk::MOUNT_POINT),
        (scratch_mounted, disk::SCRATCH_MOUNT_POINT),
    ];
    for (_, point) in mount_points.iter().filter(|(was, _)| *was) {
        if let Err(err) = mounts::umount(point) {
            say(control, &format!("warning: {err}"))?;
        }
    }
    Ok(all_passed)
}

/// Configures the network: eth0 with `zc.ip`, or with `zc.cards` one interface per
/// card (card 0 with `zc.ip`, card `n` with its own subnet's address); returns each
/// card's peer.
fn configure_net(options: &Options, control: &mut Option<Channel>) -> Result<Vec<SocketAddrV4>> {
    let cards = options.suite.card_count();
    if cards == 1 {
        net::configure(options.ip)?;
        say(
            control,
            &format!(
                "{} {} is {}, peer {}",
                net::ETH0,
                net::mac_address(net::ETH0),
                options.ip,
                options.peer
            ),
        )?;
        return Ok(vec![options.peer]);
    }
    let addresses: Vec<(Card, Ipv4Net)> = (0..cards)
        .map(|n| {
            let card = u8::try_from(n)
                .ok()
                .and_then(Card::new)
                .expect("zc.cards has at most MAX_CARDS entries");
            let net = match n {
                0 => options.ip,
                _ => Ipv4Net {
                    addr: card.guest_ip(),
                    prefix: GUEST_PREFIX,
                },
            };
            (card, net)
        })
        .collect();
    let names = net::configure_cards(&addresses)?;
    let mut peers = Vec::new();
    for ((card, net), name) in addresses.iter().zip(&names) {
        let peer = match card.index() {
            0 => options.peer,
            _ => card.peer(),
        };
        let variant = &options.suite.cards[usize::from(card.index())].variant;
        say(
            control,
            &format!(
                "card {} ({variant}): {name} {} is {net}, peer {peer}",
                card.index(),
                net::mac_address(name),
            ),
        )?;
        peers.push(peer);
    }
    Ok(peers)
}

/// The method suite's surroundings in the guest: the control channel for marks
/// and reports, port 0x610 for samples, `/proc/sys/vm/drop_caches`, the console.
struct GuestHooks<'a> {
    control: &'a mut Option<Channel>,
    port: SamplePort,
}

impl Hooks for GuestHooks<'_> {
    fn drop_caches(&mut self) -> Result<()> {
        disk::drop_caches()
    }

    fn mark(&mut self, label: &str) -> Result<()> {
        send(self.control, |c| c.mark(label))
    }

    fn sample(&mut self, chunk: u32) {
        self.port.request(chunk);
    }

    fn report(&mut self, json: &str) -> Result<()> {
        send(self.control, |c| c.report(json))
    }

    fn console(&mut self, line: &str) {
        println!("{line}");
    }

    fn set_optmem_max(&mut self, bytes: u64) -> Result<u64> {
        const OPTMEM_MAX: &str = "/proc/sys/net/core/optmem_max";
        let before =
            std::fs::read_to_string(OPTMEM_MAX).context(|| format!("reading {OPTMEM_MAX}"))?;
        let before = before
            .trim()
            .parse::<u64>()
            .map_err(|e| Error::new(format!("{OPTMEM_MAX} holds {:?}: {e}", before.trim())))?;
        std::fs::write(OPTMEM_MAX, bytes.to_string())
            .context(|| format!("writing {bytes} to {OPTMEM_MAX}"))?;
        Ok(before)
    }
}

/// `zc.test=panic`: crash the kernel through sysrq, as a real oops would.
fn panic_kernel(control: &mut Option<Channel>) -> Result<()> {
    std::fs::write("/proc/sys/kernel/sysrq", "1")
        .context(|| "enabling sysrq (/proc/sys/kernel/sysrq)".to_string())?;
    say(control, "zc.test=panic: crashing the kernel (sysrq c)")?;
    let _ = std::io::stdout().flush();
    sys::sync();
    std::fs::write("/proc/sysrq-trigger", "c")
        .context(|| "writing c to /proc/sysrq-trigger".to_string())?;
    Err(Error::new(
        "zc.test=panic: /proc/sysrq-trigger returned without a kernel panic",
    ))
}

/// `zc.test=hang`: never finish, so that the VMM's timeout is what ends the run.
fn hang(control: &mut Option<Channel>) -> Result<()> {
    say(control, "zc.test=hang: sleeping forever")?;
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Prints an error and logs it on the control channel; returns the exit status.
fn report_failure(control: &mut Option<Channel>, err: &Error) -> i32 {
    println!("zc-guest: error: {err}");
    let _ = send(control, |c| c.log(&format!("error: {err}")));
    INIT_FAILED
}

fn finish(control: &mut Option<Channel>, code: i32) -> ! {
    println!("zc-guest: exit {code}, powering off");
    let _ = send(control, |c| c.exit(code));
    power::power_off()
}

/// A line for both the console and the control log.
fn say(control: &mut Option<Channel>, text: &str) -> Result<()> {
    println!("zc-guest: {text}");
    send(control, |c| c.log(text))
}

fn send(
    control: &mut Option<Channel>,
    message: impl FnOnce(&mut Channel) -> std::io::Result<()>,
) -> Result<()> {
    match control {
        Some(c) => message(c).context(|| "writing to the control channel".to_string()),
        None => Ok(()),
    }
}
