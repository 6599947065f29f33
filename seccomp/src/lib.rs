//! The seccomp filters of `zc-vmm`, after Firecracker's: each thread of the VMM has a
//! [`Role`], and at its start, before it touches anything the guest controls, it
//! installs its role's filter ([`enter`]), which allows only the system calls that
//! role makes. A thread that makes any other call gets `SIGSYS`; the handler writes
//! one line naming the role and the call ([`violation_line`]) and ends the process
//! with [`EXIT_STATUS`].
//!
//! The filters are off until the VMM calls [`enable`] (after its own setup and before
//! it starts the VM's threads), so the libraries' threads in tests and in the
//! readers run unfiltered. `--no-seccomp` or `ZC_SECCOMP=off` ([`ENV`]) leave them
//! off, for debugging.
//!
//! The lists were derived by tracing real runs (strace -ff of a `zc-vmm run` inside
//! the emulated KVM host, and of the `/dev/kvm` tests on the direct host) and then
//! checked by booting with the filters on: see docs/design.md, "seccomp".

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The environment variable that turns the filters off (`off`) or leaves them on
/// (`on`, the default); `zc-vmm --no-seccomp` sets it to `off` for its children.
pub const ENV: &str = "ZC_SECCOMP";

/// The exit status of a process ended by a forbidden call: 128 + SIGSYS, what a shell
/// shows for a process killed by that signal.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Errors compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a rule or the filter (a bug in the lists).
    #[error("the {role} filter does not compile: {source}")]
    Compile {
        /// Whose filter.
        role: Role,
        /// Why.
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {role} seccomp filter: {source}")]
    Install {
        /// Whose filter.
        role: Role,
        /// Why.
        source: seccompiler::Error,
    },
    /// This kernel has no seccomp filters.
    #[error("this kernel has no seccomp filters ({0})")]
    Unsupported(std::io::Error),
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// [`ENV`] has a value other than `on` or `off`.
    #[error("{ENV}={0:?}: use on or off")]
    BadSwitch(String),
}

/// What a thread of the VMM does, which decides the system calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A vCPU: `KVM_RUN` and the device exits it dispatches (port and MMIO
    /// registers, the control channel, dirty-page samples, MSI routes).
    Vcpu,
    /// A virtio queue's thread: waits on the queue's ioeventfd and serves the queue
    /// (disk reads and writes, frames to the net backend, interrupts).
    VirtioQueue,
    /// The net backend's timer: the in-VMM peer's retransmits, the tap's reads.
    NetTimer,
    /// The progress ticker: prints the peer's count.
    Progress,
    /// The host-socket peer of the tap backend: accepts and checks connections (and
    /// spawns a thread per connection, which keeps this filter).
    SocketPeer,
    /// The DMA log's writer: formats, compresses (zstd) and writes records, and reads
    /// stable files' ranges to fingerprint them.
    DmaLogWriter,
    /// The DMA log's page-table pass over a read-only disk image.
    DmaLogPages,
    /// The main thread once the vCPUs run: waits for the end, stops the vCPUs, writes
    /// the report and the other outputs.
    Main,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 8] = [
        Role::Vcpu,
        Role::VirtioQueue,
        Role::NetTimer,
        Role::Progress,
        Role::SocketPeer,
        Role::DmaLogWriter,
        Role::DmaLogPages,
        Role::Main,
    ];

    /// The role's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::VirtioQueue => "virtio-queue",
            Role::NetTimer => "net-timer",
            Role::Progress => "progress",
            Role::SocketPeer => "socket-peer",
            Role::DmaLogWriter => "dma-log-writer",
            Role::DmaLogPages => "dma-log-pages",
            Role::Main => "main",
        }
    }

    fn index(self) -> usize {
        Role::ALL
            .iter()
            .position(|r| *r == self)
            .expect("ALL lists every role")
    }

    /// The system calls the role may make, each with the conditions on its
    /// arguments it must meet (none: any arguments).
    pub fn allowed(self) -> Vec<(i64, Vec<SeccompRule>)> {
        let mut calls = base();
        let plain = |names: &[i64]| names.iter().map(|nr| (*nr, Vec::new())).collect::<Vec<_>>();
        match self {
            Role::Vcpu => {
                calls.extend(plain(&[
                    // Port and MMIO writes: the console (stdout or its file), the
                    // control channel's line to the run loop, interrupts (eventfds).
                    libc::SYS_write,
                    libc::SYS_read,
                    // The vCPU's descriptor, dropped when the thread ends.
                    libc::SYS_close,
                ]));
                calls.push((libc::SYS_ioctl, vcpu_ioctls()));
            }
            Role::VirtioQueue => {
                calls.extend(plain(&[
                    // The notify eventfd, the irqfd, the tap, the pcap file.
                    libc::SYS_read,
                    libc::SYS_write,
                    // The disk image: reads and writes at an offset, FLUSH.
                    libc::SYS_lseek,
                    libc::SYS_pread64,
                    libc::SYS_pwrite64,
                    libc::SYS_fsync,
                    libc::SYS_fdatasync,
                    libc::SYS_close,
                ]));
                // The in-VMM peer opens the file a connection must carry, to check it.
                calls.push((libc::SYS_openat, read_only_open()));
            }
            // The tap's reads and writes, the irqfd.
            Role::NetTimer => calls.extend(plain(&[libc::SYS_read, libc::SYS_write])),
            Role::Progress => calls.extend(plain(&[libc::SYS_write])),
            Role::SocketPeer => {
                calls.extend(plain(&[
                    libc::SYS_accept4,
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_write,
                    libc::SYS_sendto,
                    libc::SYS_getpeername,
                    libc::SYS_setsockopt,
                    libc::SYS_close,
                ]));
                // The expected file, opened and read to check what arrives.
                calls.push((libc::SYS_openat, read_only_open()));
                calls.extend(thread_spawning());
            }
            Role::DmaLogWriter => {
                calls.extend(plain(&[
                    libc::SYS_write,
                    // Stable files' ranges, to fingerprint them.
                    libc::SYS_pread64,
                    libc::SYS_close,
                ]));
                // Its own duplicate of a stable file's descriptor (File::try_clone).
                calls.push((libc::SYS_fcntl, fcntl_only(libc::F_DUPFD_CLOEXEC)));
            }
            Role::DmaLogPages => calls.extend(plain(&[libc::SYS_pread64, libc::SYS_close])),
            Role::Main => {
                calls.extend(plain(&[
                    // The run report, and the kernel.json it reads beside the kernel.
                    libc::SYS_openat,
                    libc::SYS_read,
                    libc::SYS_write,
                    libc::SYS_close,
                    libc::SYS_lseek,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_statx,
                    // Kicking the vCPUs out of KVM_RUN (pthread_kill).
                    libc::SYS_tgkill,
                    libc::SYS_getpid,
                ]));
            }
        }
        calls
    }

    /// The role's filter as a BPF program for x86_64 (the only architecture the VMM
    /// runs on): the allowed calls, and `SIGSYS` for any other.
    pub fn filter(self) -> Result<BpfProgram, SeccompError> {
        let compile = |source| SeccompError::Compile { role: self, source };
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (nr, conditions) in self.allowed() {
            // No conditions allows any arguments, whatever other entries ask.
            match rules.get_mut(&nr) {
                Some(existing) if existing.is_empty() => {}
                Some(existing) if conditions.is_empty() => existing.clear(),
                Some(existing) => existing.extend(conditions),
                None => {
                    rules.insert(nr, conditions);
                }
            }
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .map_err(compile)?;
        BpfProgram::try_from(filter).map_err(compile)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One condition, on an argument compared as a 32-bit or 64-bit value.
fn cond(arg: u8, len: SeccompCmpArgLen, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, len, op, value).expect("argument index below 6")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a rule has a condition")
}

/// `prot` without `PROT_EXEC`: no thread of the VMM maps code after it starts.
fn not_executable(prot_arg: u8) -> Vec<SeccompRule> {
    vec![rule(vec![cond(
        prot_arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )])]
}

/// What every thread needs from the C and Rust runtimes: memory (malloc's arenas, a
/// thread's stack guard; never executable), futexes (locks, condition variables,
/// channels), time, signal returns (the vCPU kick, the `SIGSYS` handler itself),
/// writing to stderr (`eprintln!`, a panic), and ending the thread or the process.
fn base() -> Vec<(i64, Vec<SeccompRule>)> {
    let mut calls: Vec<(i64, Vec<SeccompRule>)> = [
        libc::SYS_munmap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_mremap,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_sched_getaffinity,
        libc::SYS_write,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
    .iter()
    .map(|nr| (*nr, Vec::new()))
    .collect();
    calls.push((libc::SYS_mmap, not_executable(2)));
    calls.push((libc::SYS_mprotect, not_executable(2)));
    // Rust's debug builds check that a descriptor is open before they close it.
    calls.push((libc::SYS_fcntl, fcntl_only(libc::F_GETFD)));
    calls
}

/// `fcntl` with command `command` only.
fn fcntl_only(command: libc::c_int) -> Vec<SeccompRule> {
    vec![rule(vec![cond(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        command as u64,
    )])]
}

/// `openat` for reading only: no write access, no creating or truncating.
fn read_only_open() -> Vec<SeccompRule> {
    let writes = libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;
    vec![rule(vec![cond(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(writes as u64),
        0,
    )])]
}

/// Starting a thread (the socket peer's per-connection threads): `clone` only for a
/// thread (`CLONE_THREAD`), never a new process; `clone3` takes its flags in memory
/// that a filter cannot read, so it is allowed as it is (glibc tries it first). The
/// new thread's own start: its robust futex list, `rseq`, its name.
fn thread_spawning() -> Vec<(i64, Vec<SeccompRule>)> {
    vec![
        (
            libc::SYS_clone,
            vec![rule(vec![cond(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )])],
        ),
        (libc::SYS_clone3, Vec::new()),
        (libc::SYS_set_robust_list, Vec::new()),
        (libc::SYS_rseq, Vec::new()),
        (
            libc::SYS_prctl,
            vec![rule(vec![cond(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::PR_SET_NAME as u64,
            )])],
        ),
    ]
}

/// The KVM ioctls a vCPU thread makes, matched on the request number: running the
/// vCPU, reading its registers when it dies, the dirty-page log (samples are taken
/// on the vCPU thread that carries the guest's request), and what a guest's write to
/// virtio-pci registers changes (MSI routes, the notify addresses' ioeventfds).
fn vcpu_ioctls() -> Vec<SeccompRule> {
    kvm::vcpu_thread()
        .iter()
        .map(|(request, _)| {
            rule(vec![cond(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                *request,
            )])
        })
        .collect()
}

/// KVM's ioctl numbers, built as `<linux/kvm.h>` builds them (kvm-ioctls keeps its
/// own private).
mod kvm {
    use kvm_bindings::{kvm_dirty_log, kvm_ioeventfd, kvm_irq_routing, kvm_regs, kvm_sregs, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

    /// The requests a vCPU thread may make, with their names.
    pub fn vcpu_thread() -> [(u64, &'static str); 6] {
        [
            (KVM_RUN(), "KVM_RUN"),
            (KVM_GET_REGS(), "KVM_GET_REGS"),
            (KVM_GET_SREGS(), "KVM_GET_SREGS"),
            (KVM_GET_DIRTY_LOG(), "KVM_GET_DIRTY_LOG"),
            (KVM_SET_GSI_ROUTING(), "KVM_SET_GSI_ROUTING"),
            (KVM_IOEVENTFD(), "KVM_IOEVENTFD"),
        ]
    }
}

/// The compiled filters, by [`Role::index`], once [`enable`] has run.
static FILTERS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// The calling thread's role, for the `SIGSYS` handler: const-initialised and
    /// without a destructor, so reading it there allocates nothing.
    static ROLE: Cell<Option<Role>> = const { Cell::new(None) };
}

/// Whether [`ENV`] leaves the filters on: unset or `on` yes, `off` no.
pub fn wanted_by_env() -> Result<bool, SeccompError> {
    match std::env::var(ENV) {
        Err(_) => Ok(true),
        Ok(v) if v == "on" => Ok(true),
        Ok(v) if v == "off" => Ok(false),
        Ok(other) => Err(SeccompError::BadSwitch(other)),
    }
}

/// Turns the filters on for every thread that calls [`enter`] from now on: compiles
/// them all, checks that the kernel has seccomp filters, and installs the `SIGSYS`
/// handler. Call it once, from the main thread, before starting the VM's threads.
pub fn enable() -> Result<(), SeccompError> {
    let filters = Role::ALL
        .iter()
        .map(|role| role.filter())
        .collect::<Result<Vec<_>, _>>()?;
    // SAFETY: PR_GET_SECCOMP takes no pointer; it only reads the calling thread's mode.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    install_sigsys_handler()?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether [`enable`] has run.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs `role`'s filter on the calling thread, if the filters are on ([`enable`]);
/// threads it starts afterwards keep it. A thread the filter cannot be put on must not
/// go on unfiltered: the process ends with a line that says why.
pub fn enter(role: Role) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    if let Err(e) = install(role, &filters[role.index()]) {
        eprintln!("zc-vmm: error: {e}; run with --no-seccomp (or {ENV}=off) to go without");
        std::process::exit(EXIT_STATUS);
    }
}

/// Records that the calling thread has `role`'s filter from the thread that started
/// it (filters are inherited), so that a violation names the role.
pub fn inherited(role: Role) {
    ROLE.with(|r| r.set(Some(role)));
}

/// Installs `role`'s filter `program` on the calling thread, whether or not the
/// filters are on (for tests; the VMM uses [`enter`]). Install the `SIGSYS` handler
/// first ([`enable`]), or a forbidden call dumps core without a word.
pub fn install(role: Role, program: &BpfProgram) -> Result<(), SeccompError> {
    ROLE.with(|r| r.set(Some(role)));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { role, source })
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value (no flags, empty mask) that is
    // filled in below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is a valid sigaction whose handler has the SA_SIGINFO
    // signature and only makes async-signal-safe calls (write, _exit).
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The fields of the `SIGSYS` siginfo that seccomp fills in (`_sigsys` in the kernel's
/// `siginfo_t` union, after the three leading ints and padding); libc exposes no
/// accessor for them.
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SIGSYS from seccomp, whose
    // layout begins as `SigsysInfo` says.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's
    // ucontext; on x86_64 the second system-call argument is in rsi.
    let arg1 =
        unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
    let role = ROLE.with(Cell::get);
    let mut line = Line::default();
    violation_line(&mut line, role, i64::from(nr), arg1 as u64);
    // SAFETY: writing a live stack buffer to stderr, then ending the process:
    // both async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// A fixed buffer for the handler's line (no allocation in a signal handler).
pub struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &str) {
        let n = text.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&text.as_bytes()[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u64, radix: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            let digit = usize::try_from(value % radix).unwrap_or(0);
            digits[i] = b"0123456789abcdef"[digit];
            value /= radix;
            if value == 0 {
                break;
            }
        }
        self.push(std::str::from_utf8(&digits[i..]).unwrap_or("?"));
    }

    /// The line written so far.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

/// The handler's line for call `nr` (whose second argument was `arg1`) made by a
/// thread of `role`, e.g. `zc-vmm: error: seccomp: the vcpu thread made a system call
/// it is not allowed, socket (41); stopping (exit 159). To run without seccomp for
/// debugging: --no-seccomp or ZC_SECCOMP=off`. Starts as `zc-vmm`'s error lines do, so
/// `zc-vmm methods` shows it as the boot's failure.
pub fn violation_line(line: &mut Line, role: Option<Role>, nr: i64, arg1: u64) {
    line.push("zc-vmm: error: seccomp: the ");
    line.push(role.map_or("unknown", Role::name));
    line.push(" thread made a system call it is not allowed, ");
    line.push(syscall_name(nr).unwrap_or("syscall"));
    line.push(" (");
    line.push_number(u64::try_from(nr).unwrap_or(u64::MAX), 10);
    line.push(")");
    if nr == libc::SYS_ioctl {
        line.push(" request 0x");
        // The request is a 32-bit number (the kernel's `unsigned int cmd`).
        line.push_number(arg1 & 0xffff_ffff, 16);
    }
    line.push("; stopping (exit ");
    line.push_number(EXIT_STATUS.unsigned_abs().into(), 10);
    line.push("). To run without seccomp for debugging: --no-seccomp or ");
    line.push(ENV);
    line.push("=off\n");
}

macro_rules! named {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name)),)*]
    };
}

/// Names of the calls a role allows and of the common ones it does not, for the
/// handler's line (a number not here is shown as a number).
const NAMES: &[(i64, &str)] = named![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_sched_yield,
    SYS_mremap,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_sendfile,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_fdatasync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getcwd,
    SYS_chdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_chown,
    SYS_umask,
    SYS_gettimeofday,
    SYS_ptrace,
    SYS_getuid,
    SYS_setuid,
    SYS_setgid,
    SYS_sigaltstack,
    SYS_mknod,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_mount,
    SYS_umount2,
    SYS_reboot,
    SYS_init_module,
    SYS_gettid,
    SYS_tkill,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_getdents64,
    SYS_set_tid_address,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_readlinkat,
    SYS_set_robust_list,
    SYS_splice,
    SYS_tee,
    SYS_vmsplice,
    SYS_eventfd2,
    SYS_accept4,
    SYS_pipe2,
    SYS_dup3,
    SYS_preadv,
    SYS_pwritev,
    SYS_prlimit64,
    SYS_sendmmsg,
    SYS_recvmmsg,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_execveat,
    SYS_statx,
    SYS_rseq,
    SYS_clone3,
    SYS_openat2,
    SYS_pidfd_open,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_bpf,
    SYS_seccomp,
    SYS_userfaultfd,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_renameat2,
    SYS_copy_file_range,
    SYS_fstatfs,
    SYS_statfs,
    SYS_setpriority,
    SYS_getpriority,
];

/// The name of system call `nr`, if it is a common one.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_roles_filter_compiles_for_x86_64() {
        for role in Role::ALL {
            let program = role.filter().unwrap_or_else(|e| panic!("{e}"));
            // The architecture check, the allowed calls, the default action.
            assert!(program.len() > 10, "{role}: {} instructions", program.len());
            assert!(program.len() < 4096, "{role}: over the kernel's limit");
        }
    }

    #[test]
    fn every_allowed_call_has_a_name() {
        for role in Role::ALL {
            for (nr, _) in role.allowed() {
                assert!(
                    syscall_name(nr).is_some(),
                    "{role}: syscall {nr} has no name"
                );
            }
        }
    }

    #[test]
    fn roles_have_distinct_names_and_indices() {
        for (i, role) in Role::ALL.iter().enumerate() {
            assert_eq!(role.index(), i);
            assert_eq!(
                Role::ALL.iter().filter(|r| r.name() == role.name()).count(),
                1
            );
        }
    }

    #[test]
    fn only_the_socket_peer_may_start_threads_and_nobody_may_exec() {
        for role in Role::ALL {
            let calls: Vec<i64> = role.allowed().iter().map(|(nr, _)| *nr).collect();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_rt_sigaction,
                libc::SYS_seccomp,
            ] {
                assert!(!calls.contains(&forbidden), "{role} allows {forbidden}");
            }
            let spawns = calls.contains(&libc::SYS_clone3);
            assert_eq!(spawns, role == Role::SocketPeer, "{role}");
            let sockets = calls.contains(&libc::SYS_accept4);
            assert_eq!(sockets, role == Role::SocketPeer, "{role}");
            let kvm = calls.contains(&libc::SYS_ioctl);
            assert_eq!(kvm, role == Role::Vcpu, "{role}");
        }
    }

    #[test]
    fn the_line_names_the_role_the_call_and_the_switch() {
        let mut line = Line::default();
        violation_line(&mut line, Some(Role::Vcpu), libc::SYS_socket, 0);
        assert_eq!(
            line.as_str(),
            "zc-vmm: error: seccomp: the vcpu thread made a system call it is not allowed, \
socket (41); stopping (exit 159). To run without seccomp for debugging: --no-seccomp \
or ZC_SECCOMP=off\n"
        );
        let mut line = Line::default();
        violation_line(&mut line, Some(Role::Vcpu), libc::SYS_ioctl, 0xc008_ae67);
        assert!(
            line.as_str().contains("ioctl (16) request 0xc008ae67;"),
            "{}",
            line.as_str()
        );
        let mut line = Line::default();
        violation_line(&mut line, None, 999, 0);
        assert!(line
            .as_str()
            .contains("the unknown thread made a system call it is not allowed, syscall (999);"));
    }

    #[test]
    fn kvm_ioctl_numbers_are_linuxs() {
        // From <linux/kvm.h> on x86_64, as strace prints them.
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(kvm::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(kvm::KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(kvm::KVM_IOEVENTFD(), 0x4040_ae79);
    }
}
