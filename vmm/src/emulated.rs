//! The emulated KVM host: a QEMU TCG virtual machine with an emulated AMD SVM CPU in
//! which this very `zc-vmm` binary runs again, in `direct` mode, on that VM's
//! `/dev/kvm`. The host's root is shared read-only over 9p; one fresh directory (the
//! exchange directory) is shared read-write for the command to run, its status, and
//! any output files.
//!
//! The emulated host's `/init` (`zc-guest` in its `host` role) reads
//! `<exchange>/cmd/{argv,env,cwd}` (NUL-separated), runs the command chrooted into the
//! host's root, and writes its status to `<exchange>/cmd/status`.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The QEMU binary we need, from Debian's `qemu-system-x86`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Extra kernel command-line words for the emulated host (e.g. `loglevel=7` to see
/// its boot messages).
pub const HOST_APPEND_ENV: &str = "ZC_HOST_APPEND";
/// Default memory of the emulated host, in MiB: room for a guest of 512 MiB and the
/// host kernel's own needs.
pub const DEFAULT_HOST_MEM_MIB: u32 = 2048;

/// Errors running a command inside the emulated host.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedError {
    /// QEMU is not installed.
    #[error("{QEMU_BINARY} not found: install it with `apt-get install qemu-system-x86` (or run `make deps`)")]
    NoQemu,
    /// The host kernel or initrd is missing.
    #[error("the emulated host's {what} {path} does not exist: run `make images` (or set {env})")]
    MissingImage {
        /// Kernel or initrd.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The variable that overrides it.
        env: &'static str,
    },
    /// A host-side file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The emulated host ended without a status for the command.
    #[error("the emulated host stopped ({qemu_status}) without running the command to the end{}; its console is above", said.as_ref().map(|line| format!(" (its last error: \"{line}\")")).unwrap_or_default())]
    NoStatus {
        /// How QEMU ended.
        qemu_status: String,
        /// The last error zc-guest reported on the host's console (e.g. a full
        /// disk under the exchange directory), if any.
        said: Option<String>,
    },
    /// The emulated host ran past the timeout.
    #[error("the emulated host did not finish within {0} s; killed it")]
    Timeout(u64),
    /// The emulated host did not get as far as starting the command.
    #[error("the emulated host did not start the command within {0} s (stuck in its own boot); killed it. Set ZC_HOST_APPEND=loglevel=7 to see its boot messages")]
    HostStuck(u64),
    /// The emulated host's kernel reported a soft lockup: seen under TCG with both
    /// of its CPUs stuck for minutes (a lost inter-processor interrupt, most likely),
    /// never recovering.
    #[error("the emulated host wedged (its kernel: \"{0}\"); killed it")]
    HostWedged(String),
    /// The emulated host's own kernel panicked (seen once in 20 runs: a fault on a
    /// broken GS base inside `__svm_vcpu_run`, KVM's world switch, under TCG): the
    /// test bench, not the kernel under test, whose console is not this one.
    #[error("the emulated host's kernel panicked (\"{0}\"); killed it")]
    HostPanicked(String),
}

impl EmulatedError {
    /// Whether the emulated host itself failed (wedged, or never started the
    /// command), as opposed to the command or the guest: the test bench failing, not
    /// the kernel under test, so a caller may start it once more.
    pub fn is_host_failure(&self) -> bool {
        matches!(
            self,
            EmulatedError::Timeout(_)
                | EmulatedError::HostStuck(_)
                | EmulatedError::HostWedged(_)
                | EmulatedError::HostPanicked(_)
        )
    }
}

/// Runs `attempt` (a [`run`] or [`relaunch_self`] sharing `exchange`), and once more
/// if the emulated host itself failed ([`EmulatedError::is_host_failure`]: seen rarely,
/// both of its CPUs in soft lockup under TCG). The guest's own timeout is enforced
/// inside and ends the host normally, so this is the test bench failing, not the
/// kernel under test. Says so on stderr as `program`, clears the command's state in
/// `exchange`, and lets `prepare_retry` restore what the first attempt may have
/// changed (a disk image) before the second.
pub fn retry_once_if_host_failed<E: From<EmulatedError>>(
    program: &str,
    exchange: &Path,
    attempt: impl Fn() -> Result<i32, EmulatedError>,
    prepare_retry: impl FnOnce() -> Result<(), E>,
) -> Result<i32, E> {
    match attempt() {
        Err(e) if e.is_host_failure() => {
            eprintln!("{program}: {e}; the emulated host failed, starting it again (once)");
            let _ = std::fs::remove_dir_all(exchange.join("cmd"));
            prepare_retry()?;
            Ok(attempt()?)
        }
        other => Ok(other?),
    }
}

/// How long the emulated host may take to boot and start the command: it needs
/// about 3 s; this leaves room for a loaded machine.
const HOST_START_LIMIT: Duration = Duration::from_secs(60);

/// The emulated host's machine.
#[derive(Debug, Clone)]
pub struct EmulatedHost {
    /// Path of `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The host's kernel (Debian generic flavour: it has kvm-amd and 9p).
    pub kernel: PathBuf,
    /// The host's initrd (`zc-guest` in the host role plus the kvm and 9p modules).
    pub initrd: PathBuf,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// Virtual CPUs.
    pub cpus: u8,
    /// This machine's TSC rate in kHz, which TCG passes through to the guest.
    pub tsc_khz: Option<u64>,
}

/// The TSC rate the kernel found on this machine, from `/proc/cpuinfo`'s `cpu MHz`
/// (on x86 with a constant TSC that line is the TSC's rate).
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split_once(':')?.1.trim().parse().ok()?;
    #[allow(
        clippy::cast_possible_truncation,
        reason = "rounded first; a float-to-int `as` saturates, and kHz rates are far from u64::MAX"
    )]
    let khz = (mhz * 1000.0).round() as u64;
    (mhz > 0.0).then_some(khz)
}

/// A command to run inside.
#[derive(Debug, Clone)]
pub struct InnerCommand {
    /// Program and arguments; the program path is as seen from the host's root.
    pub argv: Vec<OsString>,
    /// The whole environment of the command.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
}

/// Finds `qemu-system-x86_64` on `PATH`.
pub fn find_qemu() -> Result<PathBuf, EmulatedError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| candidate.is_file())
        .ok_or(EmulatedError::NoQemu)
}

/// Checks that an image file exists, with the error that says how to make it.
pub fn require_image(
    what: &'static str,
    path: &Path,
    env: &'static str,
) -> Result<(), EmulatedError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(EmulatedError::MissingImage {
            what,
            path: path.to_path_buf(),
            env,
        })
    }
}

/// QEMU's arguments for the emulated host sharing `exchange` read-write.
pub fn qemu_args(host: &EmulatedHost, exchange: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&OsStr]| args.extend(items.iter().map(|s| s.to_os_string()));
    // loglevel=3: the emulated host's own kernel errors (KVM's notes on MSRs the guest
    // probes, the absent PCI bus) would drown the guest's console; critical ones stay.
    //
    // kvm_amd.npt=0: KVM in the emulated host shadows the guest's page tables rather
    // than use the nested paging that QEMU's TCG emulates. With nested paging, KVM's
    // dirty-page log (write-protecting pages, `--dirty-samples`) made the stock guest
    // triple-fault mid-transfer in 3 of 8 method-suite boots, and never without
    // the dirty log (0 of 8); with shadow paging 0 of 14, and no slower. (zc-guest
    // passes `module.param=` words to the modules it loads, as modprobe does.)
    let host_role = zc_protocol::Options {
        role: zc_protocol::Role::Host,
        outdir: Some(exchange.display().to_string()),
        ..zc_protocol::Options::default()
    };
    let mut cmdline = format!(
        "console=ttyS0 loglevel=3 panic=-1 kvm_amd.npt=0 {}",
        host_role.to_cmdline()
    );
    // Under TCG the guest's TSC is the host's TSC. Tell the kernel its rate: its own
    // calibration against the emulated PIT fails now and then on a busy machine,
    // and the emulated host then hangs early in boot with no clock.
    if let Some(khz) = host.tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    if let Some(extra) = std::env::var_os(HOST_APPEND_ENV) {
        cmdline.push(' ');
        cmdline.push_str(&extra.to_string_lossy());
    }
    let mut serial = OsString::from("file:");
    serial.push(host_console(exchange));
    let mut rw_share = OsString::from("local,id=zcout,security_model=none,path=");
    rw_share.push(exchange);
    push(&[
        "-accel".as_ref(),
        "tcg,thread=multi".as_ref(),
        "-cpu".as_ref(),
        "max".as_ref(),
        "-smp".as_ref(),
        host.cpus.to_string().as_ref(),
        "-m".as_ref(),
        host.mem_mib.to_string().as_ref(),
        "-M".as_ref(),
        "microvm,acpi=on".as_ref(),
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
        "-display".as_ref(),
        "none".as_ref(),
        // The console goes to a file that `run` follows, passes on to our stdout and
        // watches for a wedged host; QEMU never reads our stdin (CI runs with none).
        "-serial".as_ref(),
        serial.as_os_str(),
        "-no-reboot".as_ref(),
        "-kernel".as_ref(),
        host.kernel.as_os_str(),
        "-initrd".as_ref(),
        host.initrd.as_os_str(),
        "-append".as_ref(),
        cmdline.as_ref(),
        "-fsdev".as_ref(),
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap".as_ref(),
        "-device".as_ref(),
        "virtio-9p-device,fsdev=hostroot,mount_tag=hostroot".as_ref(),
        "-fsdev".as_ref(),
        rw_share.as_os_str(),
        "-device".as_ref(),
        "virtio-9p-device,fsdev=zcout,mount_tag=zcout".as_ref(),
    ]);
    args
}

/// Where the emulated host's console goes: beside, not inside, what it shares.
fn host_console(exchange: &Path) -> PathBuf {
    let mut name = exchange.as_os_str().to_os_string();
    name.push(".console");
    PathBuf::from(name)
}

/// NUL-terminated list, the format `zc-guest` reads.
pub fn nul_list<I, S>(items: I) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(item.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Parses the status `zc-guest` wrote: an exit code, or 128 + signal.
pub fn parse_status(text: &str) -> Option<i32> {
    text.trim().parse().ok()
}

/// Runs `command` inside the emulated host, with `exchange` (an empty directory) as
/// the read-write share. Returns the command's exit status.
pub fn run(
    host: &EmulatedHost,
    command: &InnerCommand,
    exchange: &Path,
    timeout: Duration,
) -> Result<i32, EmulatedError> {
    let cmd_dir = exchange.join("cmd");
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| EmulatedError::Io { what, path, source }
    };
    std::fs::create_dir_all(&cmd_dir).map_err(io_err("cannot create", &cmd_dir))?;
    let write = |name: &str, bytes: Vec<u8>| {
        let path = cmd_dir.join(name);
        std::fs::write(&path, bytes).map_err(io_err("cannot write", &path))
    };
    write("argv", nul_list(&command.argv))?;
    write(
        "env",
        nul_list(command.env.iter().map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            kv
        })),
    )?;
    write("cwd", command.cwd.as_os_str().as_bytes().to_vec())?;
    let status_path = cmd_dir.join("status");

    let mut child = Command::new(&host.qemu)
        .args(qemu_args(host, exchange))
        .stdin(Stdio::null())
        .spawn()
        .map_err(io_err("cannot start", &host.qemu))?;
    let started = Instant::now();
    let give_up = started + timeout;
    let mut stderr = FileFollower::new(cmd_dir.join("stderr"));
    let mut stdout = FileFollower::new(cmd_dir.join("stdout"));
    let console_path = host_console(exchange);
    let mut console = FileFollower::new(console_path.clone());
    let mut host_watch = HostWatch::default();
    let result = loop {
        stderr.copy_new_bytes(&mut std::io::stderr());
        stdout.copy_new_bytes(&mut std::io::stdout());
        // Only the host's own console is watched: the command's output (the guest's
        // console among it) comes through its own file, so a guest's panic is the
        // command's failure, not the host's.
        let fresh = console.copy_new_bytes(&mut std::io::stdout());
        if let Some(failure) = host_watch.feed(&fresh) {
            let _ = child.kill();
            let _ = child.wait();
            break Err(failure);
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                stderr.copy_new_bytes(&mut std::io::stderr());
                stdout.copy_new_bytes(&mut std::io::stdout());
                // A host that panicked may have powered off before we read its last
                // lines: they still say the bench failed, not the command.
                let last = console.copy_new_bytes(&mut std::io::stdout());
                if let Some(failure) = host_watch.feed(&last) {
                    break Err(failure);
                }
                break Ok(status.to_string());
            }
            Ok(None) if Instant::now() >= give_up => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(EmulatedError::Timeout(timeout.as_secs()));
            }
            // The command's stderr file appears when zc-guest starts it; a host that
            // has not got that far by now is stuck in its own boot.
            Ok(None) if !stderr.exists() && started.elapsed() > HOST_START_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(EmulatedError::HostStuck(HOST_START_LIMIT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                break Err(EmulatedError::Io {
                    what: "cannot wait for",
                    path: host.qemu.clone(),
                    source,
                })
            }
        }
    };
    stderr.finish_line(&mut std::io::stderr());
    stdout.finish_line(&mut std::io::stdout());
    let _ = std::fs::remove_file(&console_path);
    let qemu_status = result?;
    let mut text = String::new();
    match std::fs::File::open(&status_path) {
        Ok(mut file) => {
            file.read_to_string(&mut text)
                .map_err(io_err("cannot read", &status_path))?;
        }
        Err(_) => {
            return Err(EmulatedError::NoStatus {
                qemu_status,
                said: host_watch.last_error,
            })
        }
    }
    parse_status(&text).ok_or(EmulatedError::NoStatus {
        qemu_status,
        said: host_watch.last_error,
    })
}

/// The environment of a `zc-vmm` process started inside the emulated host: forced
/// `direct` mode, marked as inside, a plain `PATH`, a writable `TMPDIR` in the
/// exchange directory (the rest of the host's tree is read-only in there), and the
/// Rust diagnostics knobs and the seccomp switch.
pub fn inner_env(exchange: &Path) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = vec![
        ("TMPDIR".into(), exchange.join("tmp").into_os_string()),
        (crate::host::FORCE_ENV.into(), "direct".into()),
        (crate::host::INSIDE_EMULATED_ENV.into(), "1".into()),
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
    ];
    for key in ["RUST_BACKTRACE", "RUST_LOG", zc_seccomp::ENV] {
        if let Some(value) = std::env::var_os(key) {
            env.push((key.into(), value));
        }
    }
    env
}

/// Runs this same executable again inside the emulated host with `args` (argv
/// without the program), in the current directory. `exchange` is the empty
/// read-write directory shared with it.
pub fn relaunch_self(
    host_kernel: &Path,
    host_initrd: &Path,
    args: Vec<OsString>,
    exchange: &Path,
    timeout: Duration,
) -> Result<i32, EmulatedError> {
    require_image("kernel", host_kernel, "ZC_HOST_KERNEL")?;
    require_image("initrd", host_initrd, "ZC_HOST_INITRD")?;
    let host = EmulatedHost {
        qemu: find_qemu()?,
        kernel: host_kernel.to_path_buf(),
        initrd: host_initrd.to_path_buf(),
        mem_mib: DEFAULT_HOST_MEM_MIB,
        cpus: 2,
        tsc_khz: tsc_khz_from_cpuinfo(
            &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
        ),
    };
    let here = |what: &'static str, result: std::io::Result<PathBuf>| {
        result.map_err(|source| EmulatedError::Io {
            what,
            path: PathBuf::from("."),
            source,
        })
    };
    let exe = here("cannot find this program's path", std::env::current_exe())?;
    let mut argv = vec![exe.into_os_string()];
    argv.extend(args);
    let tmp = exchange.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(|source| EmulatedError::Io {
        what: "cannot create",
        path: tmp,
        source,
    })?;
    let command = InnerCommand {
        argv,
        env: inner_env(exchange),
        cwd: here("cannot read the current directory", std::env::current_dir())?,
    };
    run(&host, &command, exchange, timeout)
}

/// Follows a file another machine appends to (the inner command's stderr, written
/// over 9p), passing on what is new since the last look.
struct FileFollower {
    path: PathBuf,
    offset: u64,
    /// Whether what was passed on so far ends a line (or nothing was).
    at_line_start: bool,
}

impl FileFollower {
    fn new(path: PathBuf) -> Self {
        FileFollower {
            path,
            offset: 0,
            at_line_start: true,
        }
    }

    /// Ends the line the file's writer left unfinished (a command killed, or its
    /// disk full, mid-line), so that what comes next, our own error line among it,
    /// starts a line of its own where readers look for it.
    fn finish_line(&mut self, out: &mut dyn std::io::Write) {
        if !self.at_line_start {
            let _ = out.write_all(b"\n");
            self.at_line_start = true;
        }
    }

    /// True once the file exists.
    fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Copies the bytes appended since the last call, and returns them; a missing
    /// file is not yet written, not an error.
    fn copy_new_bytes(&mut self, out: &mut dyn std::io::Write) -> Vec<u8> {
        use std::io::{Seek, SeekFrom};
        let mut fresh = Vec::new();
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return fresh;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return fresh;
        }
        if let Ok(n) = file.read_to_end(&mut fresh) {
            self.offset += n as u64;
            if n > 0 {
                let _ = out.write_all(&fresh);
                let _ = out.flush();
                self.at_line_start = fresh.ends_with(b"\n");
            }
        }
        fresh
    }
}

/// How zc-guest starts an error line on the emulated host's console.
const HOST_ERROR_PREFIX: &str = "zc-guest(host): error: ";

/// Watches the emulated host's console (its own kernel's, not the guest's) for the
/// reports that mean the host itself failed: a soft lockup or a panic.
#[derive(Default)]
struct HostWatch {
    /// The unfinished last line of what came so far.
    partial: Vec<u8>,
    /// The last error line zc-guest printed there, for a host that stops without
    /// the command's status.
    last_error: Option<String>,
}

impl HostWatch {
    /// Takes the next bytes of the console; returns the failure the first complete
    /// line reporting one says.
    fn feed(&mut self, bytes: &[u8]) -> Option<EmulatedError> {
        self.partial.extend_from_slice(bytes);
        let mut found = None;
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if let Some(at) = line.find(HOST_ERROR_PREFIX) {
                self.last_error = Some(line[at..].to_string());
            }
            if found.is_some() {
                continue;
            }
            if line.contains("BUG: soft lockup") {
                found = Some(EmulatedError::HostWedged(line));
            } else if line.contains("Kernel panic - not syncing") {
                found = Some(EmulatedError::HostPanicked(line));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> EmulatedHost {
        EmulatedHost {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            mem_mib: 2048,
            cpus: 2,
            tsc_khz: Some(2_300_000),
        }
    }

    #[test]
    fn only_a_failed_host_is_started_again_and_only_once() {
        use std::cell::Cell;
        let dir = tempfile::tempdir().unwrap();
        let run = |results: Vec<Result<i32, EmulatedError>>| {
            let results = std::cell::RefCell::new(results.into_iter());
            let (tries, prepared) = (Cell::new(0), Cell::new(0));
            let out = retry_once_if_host_failed(
                "test",
                dir.path(),
                || {
                    tries.set(tries.get() + 1);
                    results.borrow_mut().next().unwrap()
                },
                || {
                    prepared.set(prepared.get() + 1);
                    Ok::<_, EmulatedError>(())
                },
            );
            (out.ok(), tries.get(), prepared.get())
        };
        let wedged = || Err(EmulatedError::HostWedged("BUG: soft lockup".into()));
        assert_eq!(run(vec![Ok(3)]), (Some(3), 1, 0));
        assert_eq!(run(vec![wedged(), Ok(0)]), (Some(0), 2, 1));
        assert_eq!(run(vec![wedged(), wedged()]), (None, 2, 1));
        assert_eq!(
            run(vec![Err(EmulatedError::Timeout(5)), Ok(0)]),
            (Some(0), 2, 1)
        );
        let no_status = || {
            Err(EmulatedError::NoStatus {
                qemu_status: "exit 1".into(),
                said: None,
            })
        };
        assert_eq!(run(vec![no_status(), Ok(0)]), (None, 1, 0));
    }

    #[test]
    fn a_soft_lockup_line_is_caught_even_when_split_across_reads() {
        let mut watch = HostWatch::default();
        let mut feed = |bytes: &[u8]| watch.feed(bytes).map(|e| e.to_string());
        assert_eq!(
            feed(b"[   1.0] zc-guest(host): kernel 6.1\n[  40.4] watchdog: BUG: soft lo"),
            None
        );
        assert_eq!(
            feed(b"ckup - CPU#1 stuck for 26s! [kthreadd:2]\nmore"),
            Some("the emulated host wedged (its kernel: \"[  40.4] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [kthreadd:2]\"); killed it".into())
        );
        assert_eq!(feed(b" text\n"), None);
    }

    /// Seen in the flake measurement: the host's kernel faulted inside KVM's world
    /// switch and panicked; QEMU then stopped with status 0. A host failure, started
    /// once more, not the command's failure.
    #[test]
    fn a_panic_of_the_hosts_kernel_is_a_host_failure() {
        let mut watch = HostWatch::default();
        assert!(watch
            .feed(b"[  13.44] BUG: TASK stack guard page was hit at 000000000c193d40\n")
            .is_none());
        let failure = watch
            .feed(b"[  13.56] Kernel panic - not syncing: Fatal exception in interrupt\n")
            .expect("the panic is caught");
        assert!(failure.is_host_failure());
        assert!(failure.to_string().contains("kernel panicked"), "{failure}");
    }

    #[test]
    fn qemu_gets_svm_cpu_and_both_shares() {
        let args: Vec<String> = qemu_args(&host(), Path::new("/tmp/zc-x"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let after = |flag: &str| -> Vec<&str> {
            args.windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect()
        };
        assert_eq!(after("-cpu"), ["max"]);
        assert_eq!(after("-accel"), ["tcg,thread=multi"]);
        assert_eq!(after("-m"), ["2048"]);
        assert_eq!(after("-kernel"), ["/k/vmlinuz"]);
        let fsdevs = after("-fsdev");
        assert!(fsdevs[0].contains("path=/,") && fsdevs[0].contains("readonly=on"));
        assert!(fsdevs[1].ends_with("path=/tmp/zc-x") && !fsdevs[1].contains("readonly"));
        let append = after("-append")[0];
        assert!(append.contains("zc.role=host") && append.contains("zc.outdir=/tmp/zc-x"));
        assert!(append.contains("tsc_early_khz=2300000 tsc=reliable"));
        assert!(args.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn follower_passes_on_only_new_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        let mut follower = FileFollower::new(path.clone());
        let mut out = Vec::new();
        follower.copy_new_bytes(&mut out);
        assert!(out.is_empty(), "a missing file is just not written yet");
        std::fs::write(&path, "one\n").unwrap();
        follower.copy_new_bytes(&mut out);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, b"two\n").unwrap();
        follower.copy_new_bytes(&mut out);
        follower.copy_new_bytes(&mut out);
        assert_eq!(out, b"one\ntwo\n");
        follower.finish_line(&mut out);
        assert_eq!(out, b"one\ntwo\n", "a finished line is left alone");
    }

    /// Seen when the disk under the exchange directory filled up: the command's
    /// stderr stopped mid-line, and our own error line was glued to it, where the
    /// suite did not find it.
    #[test]
    fn a_line_the_command_left_unfinished_is_ended_before_ours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr");
        std::fs::write(&path, "zc-vmm: peer received 16777216 bytes of ").unwrap();
        let mut follower = FileFollower::new(path);
        let mut out = Vec::new();
        follower.copy_new_bytes(&mut out);
        follower.finish_line(&mut out);
        follower.finish_line(&mut out);
        assert_eq!(out, b"zc-vmm: peer received 16777216 bytes of \n");
    }

    #[test]
    fn a_host_that_stops_without_a_status_says_what_zc_guest_last_reported() {
        let mut watch = HostWatch::default();
        let console = b"zc-guest(host): host root mounted in 0.07 s\n\
            zc-guest(host): error: writing /host/tmp/x/cmd/status: No space left on device (os error 28)\n\
            [  158.05] reboot: Power down\n";
        assert!(watch.feed(console).is_none(), "not a host failure");
        let failure = EmulatedError::NoStatus {
            qemu_status: "exit status: 0".into(),
            said: watch.last_error,
        };
        assert_eq!(
            failure.to_string(),
            "the emulated host stopped (exit status: 0) without running the command to the end \
             (its last error: \"zc-guest(host): error: writing /host/tmp/x/cmd/status: No space left on device (os error 28)\"); \
             its console is above"
        );
    }

    #[test]
    fn tsc_rate_comes_from_cpu_mhz() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2300.000\ncpu MHz\t: 1.0\n";
        assert_eq!(tsc_khz_from_cpuinfo(cpuinfo), Some(2_300_000));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 2994.372"), Some(2_994_372));
        assert_eq!(tsc_khz_from_cpuinfo("cpu MHz : 0"), None);
        assert_eq!(tsc_khz_from_cpuinfo("flags : fpu"), None);
    }

    #[test]
    fn lists_are_nul_terminated() {
        assert_eq!(nul_list(["a", "bc"]), b"a\0bc\0");
        assert_eq!(nul_list(Vec::<&str>::new()), b"");
    }

    #[test]
    fn status_parsing() {
        assert_eq!(parse_status("0\n"), Some(0));
        assert_eq!(parse_status("137"), Some(137));
        assert_eq!(parse_status(""), None);
        assert_eq!(parse_status("x"), None);
    }

    #[test]
    fn missing_image_says_what_to_run() {
        let err = require_image("kernel", Path::new("/nope/vmlinuz"), "ZC_HOST_KERNEL")
            .unwrap_err()
            .to_string();
        assert!(err.contains("make images") && err.contains("/nope/vmlinuz"));
    }
}
