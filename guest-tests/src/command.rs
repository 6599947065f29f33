//! The one command the emulated host runs: read from the output directory,
//! executed chrooted into the host's root, its status encoded like a shell's.

use std::ffi::{c_char, CString};
use std::fmt;
use std::io::{self, Write};
use std::ptr;

use crate::error::{Error, Result};

/// argv, environment and working directory of the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    /// `argv[0]` is the program's path inside the host root (no `PATH` search).
    pub argv: Vec<CString>,
    /// The whole environment, `KEY=VALUE` each.
    pub env: Vec<CString>,
    /// Absolute working directory inside the host root.
    pub cwd: CString,
}

/// Splits a NUL-separated list: one trailing NUL is a terminator, not an empty
/// last item; empty input is an empty list; inner empty items are kept (an empty
/// argument is a real argument).
pub fn split_nul(bytes: &[u8]) -> Vec<&[u8]> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    bytes.split(|&b| b == 0).collect()
}

fn to_cstrings(items: Vec<&[u8]>) -> Vec<CString> {
    items
        .into_iter()
        // split_nul's items contain no NUL, so `new` cannot fail; `from_vec_with_nul`
        // would need a copy anyway.
        .filter_map(|item| CString::new(item).ok())
        .collect()
}

impl HostCommand {
    /// Builds the command from the contents of `cmd/argv`, `cmd/env` (absent: empty
    /// environment) and `cmd/cwd` (absent or empty: `/`; one trailing newline or NUL
    /// is ignored). Error messages start with the file's name (`argv`, `env`, `cwd`).
    pub fn parse(argv: &[u8], env: Option<&[u8]>, cwd: Option<&[u8]>) -> Result<HostCommand> {
        let argv = to_cstrings(split_nul(argv));
        match argv.first() {
            None => return Err(Error::new("argv is empty: no command to run")),
            Some(program) if program.as_bytes().is_empty() => {
                return Err(Error::new("argv: argv[0] (the program path) is empty"))
            }
            Some(_) => {}
        }
        let env = to_cstrings(split_nul(env.unwrap_or_default()));
        if let Some(bad) = env.iter().find(|e| !e.as_bytes().contains(&b'=')) {
            return Err(Error::new(format!("env: entry {bad:?} is not KEY=VALUE")));
        }
        let cwd = cwd.unwrap_or_default();
        let cwd = cwd
            .strip_suffix(b"\n")
            .or_else(|| cwd.strip_suffix(b"\0"))
            .unwrap_or(cwd);
        let cwd = if cwd.is_empty() { b"/" } else { cwd };
        if !cwd.starts_with(b"/") {
            return Err(Error::new(format!(
                "cwd: {:?} is not an absolute path",
                String::from_utf8_lossy(cwd)
            )));
        }
        let cwd = CString::new(cwd).map_err(|_| Error::new("cwd: contains a NUL byte"))?;
        Ok(HostCommand { argv, env, cwd })
    }

    /// A shell-like rendering for messages (not for re-parsing).
    pub fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Forks; the child chroots into `root`, changes to `cwd` and execs; the parent
    /// waits for it. Stdin is inherited (the console); so are stdout and stderr,
    /// unless `outputs` names a file (opened before the chroot) for them.
    pub fn run_in(&self, root: &CString, outputs: &Outputs) -> Result<CommandStatus> {
        let argv = null_terminated(&self.argv);
        let env = null_terminated(&self.env);
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
        // SAFETY: this process is single-threaded (PID 1 never starts threads), so
        // the child may do anything the parent could, allocation included.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::new(format!("fork: {}", io::Error::last_os_error())));
        }
        if pid == 0 {
            exec_child(root, &self.cwd, &argv, &env, outputs);
        }
        wait_for(pid)
    }
}

/// Where a command's stdout and stderr go: a file each, or `None` for the console.
#[derive(Debug, Default)]
pub struct Outputs {
    /// The file for fd 1.
    pub stdout: Option<CString>,
    /// The file for fd 2.
    pub stderr: Option<CString>,
}

/// A pointer array for execve: each string, then NULL. Borrows `items`.
fn null_terminated(items: &[CString]) -> Vec<*const c_char> {
    items
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Exit statuses the child uses when it cannot start the command (shell convention).
const EXIT_SETUP_FAILED: i32 = 125;
const EXIT_CANNOT_EXEC: i32 = 126;
const EXIT_NOT_FOUND: i32 = 127;

fn exec_child(
    root: &CString,
    cwd: &CString,
    argv: &[*const c_char],
    env: &[*const c_char],
    outputs: &Outputs,
) -> ! {
    let fail = |what: String, code: i32| -> ! {
        eprintln!("zc-guest(host): {what}: {}", io::Error::last_os_error());
        // SAFETY: _exit ends this forked child without running the parent's atexit
        // handlers or flushing its copied buffers twice.
        unsafe { libc::_exit(code) }
    };
    for (path, target_fd, name) in [
        (&outputs.stdout, 1, "stdout"),
        (&outputs.stderr, 2, "stderr"),
    ] {
        let Some(path) = path else { continue };
        // SAFETY: path is NUL-terminated; the returned descriptor is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o644,
            )
        };
        // SAFETY: dup2 onto fd 1 or 2 with a descriptor we own; dup2 clears CLOEXEC
        // on the copy, so only the target survives the exec.
        if fd < 0 || unsafe { libc::dup2(fd, target_fd) } < 0 {
            fail(format!("redirecting {name} to {path:?}"), EXIT_SETUP_FAILED);
        }
    }
    // SAFETY: root is a NUL-terminated path.
    if unsafe { libc::chroot(root.as_ptr()) } != 0 {
        fail(format!("chroot {root:?}"), EXIT_SETUP_FAILED);
    }
    // SAFETY: cwd is a NUL-terminated path.
    if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
        fail(
            format!("chdir {cwd:?} (inside {root:?})"),
            EXIT_SETUP_FAILED,
        );
    }
    // SAFETY: argv and env are NULL-terminated arrays of pointers to NUL-terminated
    // strings that the caller keeps alive; argv[0] exists (checked by `parse`).
    unsafe { libc::execve(argv[0], argv.as_ptr(), env.as_ptr()) };
    let code = match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOENT) => EXIT_NOT_FOUND,
        _ => EXIT_CANNOT_EXEC,
    };
    fail(format!("execve {:?} (inside {root:?})", argv_0(argv)), code)
}

fn argv_0(argv: &[*const c_char]) -> String {
    // SAFETY: argv[0] is a valid NUL-terminated string (see exec_child).
    unsafe { std::ffi::CStr::from_ptr(argv[0]) }
        .to_string_lossy()
        .into_owned()
}

fn wait_for(pid: libc::pid_t) -> Result<CommandStatus> {
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid place for the status.
        let rc = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if rc == pid {
            if let Some(status) = CommandStatus::from_wait(raw) {
                return Ok(status);
            }
            // Stopped/continued: not an end; keep waiting.
            continue;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(Error::new(format!("waitpid({pid}): {err}")));
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl CommandStatus {
    /// Decodes a `waitpid` status; `None` for stop/continue notifications.
    pub fn from_wait(raw: libc::c_int) -> Option<CommandStatus> {
        if libc::WIFEXITED(raw) {
            Some(CommandStatus::Exited(libc::WEXITSTATUS(raw)))
        } else if libc::WIFSIGNALED(raw) {
            Some(CommandStatus::Signaled(libc::WTERMSIG(raw)))
        } else {
            None
        }
    }

    /// The single number written to `cmd/status`: the exit code, or 128 + signal
    /// (as shells report it).
    pub fn code(self) -> i32 {
        match self {
            CommandStatus::Exited(code) => code,
            CommandStatus::Signaled(signal) => 128 + signal,
        }
    }
}

impl fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandStatus::Exited(code) => write!(f, "exit status {code}"),
            CommandStatus::Signaled(signal) => write!(f, "killed by signal {signal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[CString]) -> Vec<&str> {
        items.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn nul_split() {
        assert!(split_nul(b"").is_empty());
        assert_eq!(split_nul(b"a\0b\0"), vec![&b"a"[..], b"b"]);
        assert_eq!(split_nul(b"a\0b"), vec![&b"a"[..], b"b"]);
        assert_eq!(split_nul(b"a\0\0b\0"), vec![&b"a"[..], b"", b"b"]);
        assert_eq!(split_nul(b"\0"), vec![&b""[..]]);
        assert_eq!(split_nul(b"a\0\0"), vec![&b"a"[..], b""]);
    }

    #[test]
    fn parses_a_command() {
        let cmd = HostCommand::parse(
            b"/usr/bin/zc-vmm\0run\0\0--x=1\0",
            Some(b"PATH=/usr/bin\0A=b=c\0EMPTY=\0"),
            Some(b"/work/main\n"),
        )
        .unwrap();
        assert_eq!(strings(&cmd.argv), ["/usr/bin/zc-vmm", "run", "", "--x=1"]);
        assert_eq!(strings(&cmd.env), ["PATH=/usr/bin", "A=b=c", "EMPTY="]);
        assert_eq!(cmd.cwd.to_str().unwrap(), "/work/main");
        assert_eq!(cmd.display(), "/usr/bin/zc-vmm run  --x=1");
    }

    #[test]
    fn defaults_for_missing_env_and_cwd() {
        let cmd = HostCommand::parse(b"/bin/true", None, None).unwrap();
        assert!(cmd.env.is_empty());
        assert_eq!(cmd.cwd.to_str().unwrap(), "/");
        let cmd = HostCommand::parse(b"/bin/true\0", Some(b""), Some(b"")).unwrap();
        assert!(cmd.env.is_empty());
        assert_eq!(cmd.cwd.to_str().unwrap(), "/");
    }

    #[test]
    fn rejects_bad_commands() {
        assert!(HostCommand::parse(b"", None, None).is_err());
        assert!(HostCommand::parse(b"\0x\0", None, None).is_err());
        assert!(HostCommand::parse(b"/bin/true", Some(b"NOEQUALS\0"), None).is_err());
        assert!(HostCommand::parse(b"/bin/true", None, Some(b"relative")).is_err());
    }

    #[test]
    fn status_encoding() {
        // Raw wait statuses as the kernel builds them.
        assert_eq!(CommandStatus::from_wait(0), Some(CommandStatus::Exited(0)));
        assert_eq!(
            CommandStatus::from_wait(3 << 8).map(CommandStatus::code),
            Some(3)
        );
        assert_eq!(
            CommandStatus::from_wait(255 << 8).map(CommandStatus::code),
            Some(255)
        );
        assert_eq!(
            CommandStatus::from_wait(9),
            Some(CommandStatus::Signaled(9))
        );
        assert_eq!(
            CommandStatus::from_wait(9).map(CommandStatus::code),
            Some(137)
        );
        // SIGSEGV with core dump flag.
        assert_eq!(
            CommandStatus::from_wait(0x80 | 11).map(CommandStatus::code),
            Some(139)
        );
        // Stopped by SIGSTOP (0x7f marker): not an end.
        assert_eq!(CommandStatus::from_wait((19 << 8) | 0x7f), None);
        assert_eq!(CommandStatus::Signaled(9).to_string(), "killed by signal 9");
    }
}
