//! The host role: PID 1 of the emulated KVM host (a QEMU TCG VM that runs zc-vmm).
//!
//! It loads kvm/9p modules, mounts the real host's root read-only over 9p at
//! `/host` and the output directory `zc.outdir` read-write on top of it, runs the
//! command described in `<outdir>/cmd/{argv,env,cwd}` chrooted into `/host`, writes
//! its status to `<outdir>/cmd/status` and powers off. A failure before the command
//! ran is written to `<outdir>/cmd/error` when the output share is mounted, so the
//! runner outside can tell "command failed" (status) from "never ran" (error).
//! This role never touches the COM2 control channel.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::time::Instant;

use crate::boot::Boot;
use crate::command::{CommandStatus, HostCommand, Outputs};
use crate::error::{Context, Error, Result};
use crate::mounts::{self, Mount};
use crate::{modules, power, sys};

/// Where the host's root is mounted.
const HOST_ROOT: &str = "/host";
/// 9p options: virtio transport, the Linux dialect; a large msize makes big reads
/// (kernels, disk images) far faster than the 8 KiB default.
const NINEP_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=512000";
/// The 9p mount tags the runner gives its shares.
const ROOT_TAG: &str = "hostroot";
const OUT_TAG: &str = "zcout";

/// Runs the host role to the end; never returns.
pub fn run(boot: &Boot) -> ! {
    // `Options` guarantees an outdir for this role.
    let outdir = boot.options.outdir.clone().unwrap_or_default();
    let share = format!("{HOST_ROOT}{outdir}");
    let mut share_mounted = false;
    match run_steps(boot, &share, &mut share_mounted) {
        Ok(()) => {}
        Err(err) => fail(share_mounted.then_some(share.as_str()), &err),
    }
    finish(Some(&share))
}

/// Reports a failure (on the console, and in `<share>/cmd/error` when the output
/// share is mounted) and powers off.
pub fn fail(share: Option<&str>, err: &Error) -> ! {
    println!("zc-guest(host): error: {err}");
    if let Some(share) = share {
        let path = format!("{share}/cmd/error");
        if let Err(e) = write_synced(&path, format!("{err}\n").as_bytes()) {
            println!("zc-guest(host): also failed to record the error: {e}");
        }
    }
    finish(share)
}

fn run_steps(boot: &Boot, share: &str, share_mounted: &mut bool) -> Result<()> {
    for option in &boot.options.unknown {
        println!("zc-guest(host): warning: ignoring unknown option {option}");
    }
    let summary = modules::load_listed()?;
    println!(
        "zc-guest(host): kernel {}, /init reached at {:.2} s uptime, {}",
        boot.kernel_release,
        boot.uptime,
        summary.describe()
    );
    if let Some(why) = kvm_missing_reason() {
        // Not fatal: the command may not need KVM, and if it does it will say so
        // itself, with a status the runner sees.
        println!("zc-guest(host): warning: /dev/kvm is missing: {why}");
    }

    let mounts_started = Instant::now();
    mount_host(share, share_mounted)?;
    let cmd_dir = format!("{share}/cmd");
    let command = read_command(&cmd_dir)?;
    println!(
        "zc-guest(host): host root mounted in {:.2} s; running {} (cwd {})",
        mounts_started.elapsed().as_secs_f64(),
        command.display(),
        command.cwd.to_string_lossy()
    );

    // Past this point a panic would lose the command's result: report it in
    // cmd/error like any other failure.
    let error_path = format!("{cmd_dir}/error");
    power::set_panic_reporter(move |message| {
        let _ = write_synced(&error_path, format!("{message}\n").as_bytes());
    });

    let started = Instant::now();
    let root = CString::new(HOST_ROOT).map_err(|_| Error::new("host root path"))?;
    // The command's stdout and stderr go to files the runner outside streams to its
    // own, so the two streams stay apart, and so the console carries only this
    // host's kernel and zc-guest: a line there saying "Kernel panic" is the host's,
    // never the guest's console passed through by the command.
    let output_path = |name: &str| {
        CString::new(format!("{cmd_dir}/{name}"))
            .map_err(|_| Error::new("the command directory's path contains a NUL byte"))
    };
    let outputs = Outputs {
        stdout: Some(output_path("stdout")?),
        stderr: Some(output_path("stderr")?),
    };
    let status = command.run_in(&root, &outputs)?;
    let took = started.elapsed().as_secs_f64();
    let code = status.code();
    if let CommandStatus::Signaled(_) = status {
        println!("zc-guest(host): command {status}");
    }
    let status_path = format!("{cmd_dir}/status");
    write_synced(&status_path, code.to_string().as_bytes())?;
    if let Err(err) = File::open(&cmd_dir).and_then(|dir| dir.sync_all()) {
        // The file itself is synced; a directory fsync failing on 9p is not worth
        // losing the result over.
        println!("zc-guest(host): warning: fsync {cmd_dir}: {err}");
    }
    let uptime = sys::uptime().map_or_else(|_| "?".to_string(), |u| format!("{u:.2}"));
    println!(
        "zc-guest(host): command exited with {code} after {took:.2} s (host uptime {uptime} s)"
    );
    Ok(())
}

/// Why `/dev/kvm` is absent after the modules loaded, or `None` when it exists.
fn kvm_missing_reason() -> Option<String> {
    if Path::new("/dev/kvm").exists() {
        return None;
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_ascii_whitespace().collect())
        .unwrap_or_default();
    let has = |flag: &str| flags.contains(&flag);
    let loaded = |module: &str| Path::new("/sys/module").join(module).exists();
    Some(if !has("svm") && !has("vmx") {
        "the CPU has no svm/vmx flag (run QEMU with -cpu max or host)".to_string()
    } else if !loaded("kvm") {
        "the kvm module is not loaded (add it to the module list)".to_string()
    } else if !loaded("kvm_amd") && !loaded("kvm_intel") {
        let which = if has("svm") { "kvm_amd" } else { "kvm_intel" };
        format!("kvm is loaded but {which} is not (add it, and for kvm_amd also ccp, to the module list)")
    } else {
        "kvm and its vendor module are loaded but no /dev/kvm node appeared (is /dev a devtmpfs?)"
            .to_string()
    })
}

/// Mounts the host root, the virtual filesystems a program chrooted into `/host`
/// expects, and the writable output share.
///
/// `/host/tmp` stays the host's own (read-only) `/tmp`: a tmpfs there would hide
/// inputs that live under the host's `/tmp` (a checkout, a test's files). Commands get
/// a writable `TMPDIR` inside the share instead, from the runner's environment.
fn mount_host(share: &str, share_mounted: &mut bool) -> Result<()> {
    Mount {
        source: ROOT_TAG,
        target: HOST_ROOT,
        fstype: "9p",
        flags: libc::MS_RDONLY,
        data: Some(NINEP_OPTIONS),
    }
    .mount()?;
    Mount::virtual_fs("proc", "/host/proc").mount()?;
    Mount::virtual_fs("sysfs", "/host/sys").mount()?;
    Mount::virtual_fs("devtmpfs", "/host/dev").mount_or_busy()?;
    // devtmpfs has no /dev/shm; shm_open needs one. This devtmpfs is the same
    // instance as /dev, where an extra directory is harmless.
    match fs::create_dir("/host/dev/shm") {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).context(|| "mkdir /host/dev/shm".to_string()),
    }
    Mount {
        data: Some("mode=1777"),
        ..Mount::virtual_fs("tmpfs", "/host/dev/shm")
    }
    .mount()?;

    if !Path::new(share).is_dir() {
        // In the read-only host root this fails with EROFS, which the message explains.
        fs::create_dir_all(share).context(|| {
            format!("creating mount point {share} (zc.outdir must be an existing directory on the host)")
        })?;
    }
    Mount {
        source: OUT_TAG,
        target: share,
        fstype: "9p",
        flags: 0,
        data: Some(NINEP_OPTIONS),
    }
    .mount()?;
    *share_mounted = true;
    Ok(())
}

fn read_command(cmd_dir: &str) -> Result<HostCommand> {
    let read = |name: &str| {
        let path = format!("{cmd_dir}/{name}");
        fs::read(&path).context(|| format!("reading {path}"))
    };
    let optional = |name: &str| match read(name) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(_) if !Path::new(&format!("{cmd_dir}/{name}")).exists() => Ok(None),
        Err(err) => Err(err),
    };
    let argv = read("argv")?;
    let env = optional("env")?;
    let cwd = optional("cwd")?;
    HostCommand::parse(&argv, env.as_deref(), cwd.as_deref())
        .map_err(|e| Error::new(format!("{cmd_dir}/{e}")))
}

/// Creates/truncates `path` with `bytes` and fsyncs it.
fn write_synced(path: &str, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).context(|| format!("creating {path}"))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .context(|| format!("writing {path}"))
}

/// Syncs, unmounts the writable share (so the host sees everything) and powers off.
fn finish(share: Option<&str>) -> ! {
    let _ = io::stdout().flush();
    sys::sync();
    if let Some(share) = share {
        if let Err(err) = mounts::umount(share) {
            // Data is already synced; a busy share (a leftover process) is not fatal.
            println!("zc-guest(host): warning: {err}");
        }
    }
    power::power_off()
}
