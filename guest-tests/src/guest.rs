//! The guest role: PID 1 inside zc-vmm.
//!
//! Control lines, in order: `hello <release>`, `uptime <s>`, `log <modules...>`,
//! any test hook's `log`, then `exit <code>`; then the machine powers off.

use std::io::Write;
use std::time::Duration;

use crate::boot::Boot;
use crate::cmdline::TestHook;
use crate::control::{Control, UartTx, COM2};
use crate::error::{Context, Error, Result};
use crate::{modules, power, sys};

/// Exit status reported when this program fails (a module, a mount, a bad option).
pub const INIT_FAILED: i32 = 1;

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
            println!("zc-init: error: {err}; no control channel");
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
        "zc-init: kernel {}, /init reached at {:.2} s uptime, {}",
        boot.kernel_release,
        boot.uptime,
        summary.describe()
    );

    match boot.options.test {
        Some(TestHook::Panic) => panic_kernel(control)?,
        Some(TestHook::Hang) => hang(control)?,
        None => {}
    }
    Ok(boot.options.exit_code)
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
    println!("zc-init: error: {err}");
    let _ = send(control, |c| c.log(&format!("error: {err}")));
    INIT_FAILED
}

fn finish(control: &mut Option<Channel>, code: i32) -> ! {
    println!("zc-init: exit {code}, powering off");
    let _ = send(control, |c| c.exit(code));
    power::power_off()
}

/// A line for both the console and the control log.
fn say(control: &mut Option<Channel>, text: &str) -> Result<()> {
    println!("zc-init: {text}");
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
