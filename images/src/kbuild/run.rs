//! Running the kernel's build commands: every line of their output goes to the
//! build log and to a [`BuildProgress`]; a failure carries the log's path and its
//! last lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::KbuildError;

/// Lines of a failed command kept for its error message.
const TAIL_LINES: usize = 25;

/// Where a build reports what it is doing. The library decides the phases; the
/// binary decides how to show them (a spinner on a terminal, plain lines otherwise).
pub trait BuildProgress {
    /// A phase starts: one line saying what and, for commands, which.
    fn phase(&mut self, line: &str);
    /// One line of output of the current phase's command (already in the log).
    fn output(&mut self, line: &str);
    /// The current phase ended successfully.
    fn phase_done(&mut self);
}

/// A [`BuildProgress`] that only passes phase lines to a callback.
pub struct Lines<F: FnMut(&str)>(pub F);

impl<F: FnMut(&str)> BuildProgress for Lines<F> {
    fn phase(&mut self, line: &str) {
        (self.0)(line)
    }
    fn output(&mut self, _line: &str) {}
    fn phase_done(&mut self) {}
}

/// If `line` is one of kbuild's quiet-mode step lines (`  CC      fs/ext4/inode.o`),
/// its verb and target; a build's progress is counted in these.
pub fn kbuild_step(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("  ")?;
    let (verb, target) = rest.split_once(char::is_whitespace)?;
    let verb_ok = !verb.is_empty()
        && verb.len() <= 12
        && verb
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    let target = target.trim();
    (verb_ok && !target.is_empty()).then_some((verb, target))
}

/// Runs commands for one build, appending everything to one log file.
pub struct Runner<'p> {
    log: File,
    log_path: PathBuf,
    progress: &'p mut dyn BuildProgress,
}

/// The environment a kernel build must not inherit: an outer `make`'s flags and
/// jobserver (`make kernel` runs zc-image), and an output directory.
const SCRUBBED_ENV: &[&str] = &[
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "KBUILD_OUTPUT",
];

impl<'p> Runner<'p> {
    /// Opens (appending) the log at `log_path`.
    pub fn new(log_path: &Path, progress: &'p mut dyn BuildProgress) -> Result<Self, KbuildError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|source| KbuildError::Io {
                what: "cannot open the build log".into(),
                path: log_path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            log,
            log_path: log_path.to_path_buf(),
            progress,
        })
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Reports a phase that runs no command.
    pub fn phase(&mut self, line: &str) {
        let _ = writeln!(self.log, "==> {line}");
        self.progress.phase(line);
    }

    /// Ends a phase started with [`Runner::phase`].
    pub fn phase_done(&mut self) {
        self.progress.phase_done();
    }

    /// Writes a line to the log only.
    pub fn note(&mut self, line: &str) {
        let _ = writeln!(self.log, "{line}");
    }

    fn prepare(cmd: &mut Command) {
        for var in SCRUBBED_ENV {
            cmd.env_remove(var);
        }
        // Messages in English, so a failure's last lines read the same everywhere.
        cmd.env("LC_ALL", "C");
    }

    /// Runs `cmd` as phase `phase`, its stdout and stderr interleaved into the log and
    /// the progress; fails with the last lines when it exits non-zero.
    pub fn run(&mut self, phase: &str, mut cmd: Command) -> Result<(), KbuildError> {
        Self::prepare(&mut cmd);
        let line = command_line(&cmd);
        let _ = writeln!(self.log, "==> {phase}: {line}");
        self.progress.phase(phase);
        let io = |what: &str| {
            let what = format!("{what} for `{line}`");
            let path = self.log_path.clone();
            move |source| KbuildError::Io { what, path, source }
        };
        let (reader, writer) = std::io::pipe().map_err(io("cannot create a pipe"))?;
        cmd.stdout(writer.try_clone().map_err(io("cannot duplicate a pipe"))?);
        cmd.stderr(writer);
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(&cmd, e))?;
        // The Command holds the pipe's write end: drop it so the read ends at EOF.
        drop(cmd);
        let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            let _ = self.log.write_all(&buf);
            let text = String::from_utf8_lossy(&buf);
            let text = text.trim_end_matches(['\n', '\r']);
            self.progress.output(text);
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.to_string());
        }
        let status = child.wait().map_err(|source| KbuildError::Io {
            what: format!("waiting for `{line}`"),
            path: self.log_path.clone(),
            source,
        })?;
        let _ = writeln!(self.log, "<== {phase}: {status}");
        if !status.success() {
            return Err(KbuildError::Command {
                phase: phase.to_string(),
                command: line,
                status: status.to_string(),
                log: self.log_path.clone(),
                tail: Vec::from(tail).join("\n"),
            });
        }
        self.progress.phase_done();
        Ok(())
    }

    /// Runs `cmd` quietly and returns its stdout, trimmed (both streams also go to
    /// the log).
    pub fn capture(&mut self, mut cmd: Command) -> Result<String, KbuildError> {
        Self::prepare(&mut cmd);
        let line = command_line(&cmd);
        let out = cmd.output().map_err(|e| self.spawn_error(&cmd, e))?;
        let _ = writeln!(self.log, "==> {line}");
        let _ = self.log.write_all(&out.stdout);
        let _ = self.log.write_all(&out.stderr);
        if !out.status.success() {
            return Err(KbuildError::Command {
                phase: line.clone(),
                command: line,
                status: out.status.to_string(),
                log: self.log_path.clone(),
                tail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn spawn_error(&self, cmd: &Command, e: std::io::Error) -> KbuildError {
        let program = cmd.get_program().to_string_lossy().into_owned();
        if e.kind() == std::io::ErrorKind::NotFound {
            KbuildError::MissingTool {
                program,
                packages: super::BUILD_PACKAGES.join(" "),
            }
        } else {
            KbuildError::Io {
                what: format!("cannot run `{}`", command_line(cmd)),
                path: self.log_path.clone(),
                source: e,
            }
        }
    }
}

/// A command as one line, for logs and messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        phases: Vec<String>,
        output: Vec<String>,
        done: usize,
    }
    impl BuildProgress for Recorder {
        fn phase(&mut self, line: &str) {
            self.phases.push(line.into());
        }
        fn output(&mut self, line: &str) {
            self.output.push(line.into());
        }
        fn phase_done(&mut self) {
            self.done += 1;
        }
    }

    #[test]
    fn recognises_kbuild_step_lines() {
        assert_eq!(
            kbuild_step("  CC      fs/ext4/inode.o"),
            Some(("CC", "fs/ext4/inode.o"))
        );
        assert_eq!(
            kbuild_step("  HOSTCC  scripts/basic/fixdep"),
            Some(("HOSTCC", "scripts/basic/fixdep"))
        );
        assert_eq!(
            kbuild_step("  LD [M]  fs/x.ko"),
            Some(("LD", "[M]  fs/x.ko"))
        );
        assert_eq!(
            kbuild_step("Kernel: arch/x86/boot/bzImage is ready  (#1)"),
            None
        );
        assert_eq!(kbuild_step("  cc1: error"), None);
        assert_eq!(kbuild_step("make[1]: Entering directory"), None);
    }

    #[test]
    fn logs_both_streams_and_fails_with_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        let mut rec = Recorder::default();
        let mut runner = Runner::new(&log, &mut rec).unwrap();
        let mut ok = Command::new("sh");
        ok.args([
            "-c",
            "echo '  CC      a.o'; echo warn >&2; echo \"flags=$MAKEFLAGS\"",
        ]);
        ok.env("MAKEFLAGS", "-j8 --jobserver-auth=3,4");
        runner.run("compile", ok).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "for i in $(seq 1 40); do echo line$i; done; exit 3"]);
        let err = runner.run("link", bad).unwrap_err();
        assert_eq!(runner.capture(Command::new("true")).unwrap(), "");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("==> compile: sh -c"), "{text}");
        assert!(
            text.contains("warn\n") && text.contains("line40\n"),
            "{text}"
        );
        assert_eq!(rec.phases, ["compile", "link"]);
        assert_eq!(rec.done, 1);
        assert!(rec.output.contains(&"  CC      a.o".to_string()));
        // An outer make's flags do not leak into the kernel's make.
        assert!(
            rec.output.contains(&"flags=".to_string()),
            "{:?}",
            rec.output
        );
        let msg = err.to_string();
        assert!(msg.contains(&log.display().to_string()), "{msg}");
        assert!(msg.contains("line40") && msg.contains("line16"), "{msg}");
        assert!(
            !msg.contains("line15\n"),
            "only the last {TAIL_LINES} lines: {msg}"
        );
        assert!(msg.contains("exit status: 3"), "{msg}");
    }

    #[test]
    fn a_missing_program_says_what_to_install() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = Recorder::default();
        let mut runner = Runner::new(&dir.path().join("l"), &mut rec).unwrap();
        let err = runner
            .run("x", Command::new("zc-no-such-program"))
            .unwrap_err();
        assert!(err.to_string().contains("apt-get install"), "{err}");
        assert!(err.to_string().contains("flex"), "{err}");
    }
}
