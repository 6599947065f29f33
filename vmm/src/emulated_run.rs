//! `zc-vmm run` in emulated mode: the same [`RunSpec`], run by this binary again
//! inside the emulated KVM host ([`crate::emulated`]).
//!
//! Inside, the host's root is the outer root, shared read-only at the same paths, and
//! the exchange directory is the only writable place, also at the same path. So the
//! inner spec ([`InnerRun::plan`]) names the input files by their absolute outer
//! paths, puts every output and a copy of the disk in the exchange directory, and is
//! written there as `spec.json` for `zc-vmm run --spec`; after the run the outputs
//! (and a writable disk) are copied back to where the outer spec wanted them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::emulated::{self, EmulatedError};
use crate::spec::RunSpec;

/// How long the emulated host may take beyond the guest's own timeout: its boot and
/// the 9p mounts.
pub const EMULATED_HOST_OVERHEAD: Duration = Duration::from_secs(60);

/// The name of the inner spec in the exchange directory.
pub const INNER_SPEC: &str = "spec.json";

/// Errors running a spec inside the emulated host.
#[derive(Debug, thiserror::Error)]
pub enum EmulatedRunError {
    /// A host-side file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Starting or running the emulated host failed.
    #[error(transparent)]
    Emulated(#[from] EmulatedError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EmulatedRunError {
    let path = path.to_path_buf();
    move |source| EmulatedRunError::Io { what, path, source }
}

/// The guest's disk: a copy in the exchange directory, because the host's tree is
/// read-only in there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCopy {
    /// The image the outer spec names.
    pub outer: PathBuf,
    /// Its copy, as the inner spec names it.
    pub inner: PathBuf,
    /// Copy it back after the run (the guest may write it).
    pub write_back: bool,
}

impl DiskCopy {
    fn copy_in(&self) -> Result<(), EmulatedRunError> {
        std::fs::copy(&self.outer, &self.inner)
            .map(drop)
            .map_err(io_err("cannot copy for the emulated host", &self.outer))
    }
}

/// A spec rewritten for the inside of the emulated host, and what to do around it.
#[derive(Debug, Clone, PartialEq)]
pub struct InnerRun {
    /// The spec the inner `zc-vmm run` gets.
    pub spec: RunSpec,
    /// Where it is written: in the exchange directory.
    pub spec_file: PathBuf,
    /// Each output's path inside, and where the outer spec wants it.
    pub outputs: Vec<(PathBuf, PathBuf)>,
    /// The disk, if the run has one.
    pub disk: Option<DiskCopy>,
    /// The scratch disk, if the run has one.
    pub scratch_disk: Option<DiskCopy>,
}

impl InnerRun {
    /// Rewrites `spec` for a run inside the emulated host sharing `exchange`.
    pub fn plan(spec: &RunSpec, exchange: &Path) -> Result<InnerRun, EmulatedRunError> {
        let absolute = |p: &Path| std::fs::canonicalize(p).map_err(io_err("cannot resolve", p));
        let mut inner = spec.clone();
        let mut outputs = Vec::new();
        let mut to_exchange = |wanted: &mut Option<PathBuf>, name: String| {
            if let Some(path) = wanted.take() {
                let inside = exchange.join(name);
                outputs.push((inside.clone(), path));
                *wanted = Some(inside);
            }
        };
        to_exchange(&mut inner.outputs.console, "console.txt".into());
        to_exchange(&mut inner.outputs.summary, "report.json".into());
        // The inner run compresses the log when its name ends in .zst: keep that.
        let dma_log_name = match &inner.outputs.dma_log {
            Some(p) if zc_dma_log::is_zstd_path(p) => "dma-log.jsonl.zst",
            _ => "dma-log.jsonl",
        };
        to_exchange(&mut inner.outputs.dma_log, dma_log_name.into());
        for (i, nic) in inner.nics.iter_mut().enumerate() {
            let name = match i {
                0 => "frames.pcap".to_string(),
                _ => format!("frames-{i}.pcap"),
            };
            to_exchange(&mut nic.pcap, name);
            for file in nic.peer_expect.iter_mut().chain(&mut nic.peer_send) {
                *file = absolute(file)?;
            }
        }
        inner.kernel = absolute(&spec.kernel)?;
        if let Some(initrd) = &mut inner.initrd {
            *initrd = absolute(initrd)?;
        }
        let disk = inner.disk.as_mut().map(|disk| {
            let copy = DiskCopy {
                outer: disk.path.clone(),
                inner: exchange.join("disk.img"),
                write_back: !disk.read_only,
            };
            disk.path = copy.inner.clone();
            copy
        });
        let scratch_disk = inner.scratch_disk.as_mut().map(|path| {
            let copy = DiskCopy {
                outer: path.clone(),
                inner: exchange.join("scratch.img"),
                write_back: true,
            };
            path.clone_from(&copy.inner);
            copy
        });
        Ok(InnerRun {
            spec: inner,
            spec_file: exchange.join(INNER_SPEC),
            outputs,
            disk,
            scratch_disk,
        })
    }

    /// The inner command's arguments.
    pub fn argv(&self) -> Vec<OsString> {
        vec!["run".into(), "--spec".into(), self.spec_file.clone().into()]
    }

    /// Writes the inner spec and copies the disks in.
    fn prepare(&self) -> Result<(), EmulatedRunError> {
        self.spec
            .save(&self.spec_file)
            .map_err(io_err("cannot write the run spec", &self.spec_file))?;
        self.copy_disks_in()
    }

    /// Copies the disks into the exchange directory (again, before a second start of
    /// the host: it gets the original disks, not what the first one wrote).
    fn copy_disks_in(&self) -> Result<(), EmulatedRunError> {
        self.disks().try_for_each(DiskCopy::copy_in)
    }

    fn disks(&self) -> impl Iterator<Item = &DiskCopy> {
        self.disk.iter().chain(&self.scratch_disk)
    }

    /// Copies the outputs (and writable disks) back where the outer spec wants them.
    fn copy_back(&self) -> Result<(), EmulatedRunError> {
        for disk in self.disks().filter(|d| d.write_back) {
            std::fs::copy(&disk.inner, &disk.outer)
                .map_err(io_err("cannot write the guest's disk back to", &disk.outer))?;
        }
        for (inner, wanted) in &self.outputs {
            // A run that failed early writes no outputs; its status says why.
            if let Err(e) = std::fs::copy(inner, wanted) {
                eprintln!(
                    "zc-vmm: no {} from inside the emulated host: {e}",
                    wanted.display()
                );
            }
        }
        Ok(())
    }
}

/// Runs `spec` inside the emulated host booted from `host_kernel` and `host_initrd`;
/// returns the inner `zc-vmm run`'s exit status.
pub fn run(
    spec: &RunSpec,
    host_kernel: &Path,
    host_initrd: &Path,
) -> Result<i32, EmulatedRunError> {
    let started = Instant::now();
    let exchange = tempfile::Builder::new()
        .prefix("zc-emulated-")
        .tempdir()
        .map_err(io_err(
            "cannot create the exchange directory in",
            &std::env::temp_dir(),
        ))?;
    let plan = InnerRun::plan(spec, exchange.path())?;
    plan.prepare()?;
    let attempt = || {
        emulated::relaunch_self(
            host_kernel,
            host_initrd,
            plan.argv(),
            exchange.path(),
            Duration::from_secs(spec.timeout_s) + EMULATED_HOST_OVERHEAD,
        )
    };
    // The second start gets the original disk, not what the first one wrote.
    let status = emulated::retry_once_if_host_failed("zc-vmm", exchange.path(), attempt, || {
        plan.copy_disks_in()
    })?;
    plan.copy_back()?;
    eprintln!(
        "zc-vmm: emulated host finished in {:.2} s; command exited {status}",
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec, RunOutputs};

    #[test]
    fn inputs_keep_their_absolute_paths_and_outputs_go_to_the_exchange() {
        let outer = tempfile::tempdir().unwrap();
        let exchange = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = outer.path().join(name);
            std::fs::write(&path, name).unwrap();
            std::fs::canonicalize(path).unwrap()
        };
        let (kernel, initrd, disk, payload) = (
            file("vmlinuz"),
            file("initrd.img"),
            file("disk.img"),
            file("payload.bin"),
        );
        let wanted = |name: &str| outer.path().join("out").join(name);
        let spec = RunSpec {
            initrd: Some(initrd.clone()),
            disk: Some(DiskSpec {
                path: disk.clone(),
                read_only: false,
            }),
            nics: vec![
                NicSpec {
                    pcap: Some(wanted("a.pcap")),
                    peer_expect: vec![payload.clone()],
                    peer_expect_bytes: Some(3),
                    sg: false,
                    ..NicSpec::peer()
                },
                NicSpec {
                    pcap: Some(wanted("b.pcap")),
                    ..NicSpec::peer()
                },
            ],
            dirty_samples: true,
            outputs: RunOutputs {
                console: Some(wanted("console.txt")),
                summary: Some(wanted("run.json")),
                dma_log: Some(wanted("dma.jsonl")),
            },
            ..RunSpec::new(&kernel)
        };
        let x = exchange.path();
        let plan = InnerRun::plan(&spec, x).unwrap();
        let expected_spec = RunSpec {
            disk: Some(DiskSpec {
                path: x.join("disk.img"),
                read_only: false,
            }),
            nics: vec![
                NicSpec {
                    pcap: Some(x.join("frames.pcap")),
                    ..spec.nics[0].clone()
                },
                NicSpec {
                    pcap: Some(x.join("frames-1.pcap")),
                    ..spec.nics[1].clone()
                },
            ],
            outputs: RunOutputs {
                console: Some(x.join("console.txt")),
                summary: Some(x.join("report.json")),
                dma_log: Some(x.join("dma-log.jsonl")),
            },
            ..spec.clone()
        };
        assert_eq!(plan.spec, expected_spec);
        assert_eq!(
            plan.outputs,
            vec![
                (x.join("console.txt"), wanted("console.txt")),
                (x.join("report.json"), wanted("run.json")),
                (x.join("dma-log.jsonl"), wanted("dma.jsonl")),
                (x.join("frames.pcap"), wanted("a.pcap")),
                (x.join("frames-1.pcap"), wanted("b.pcap")),
            ]
        );
        // A compressed log stays compressed inside.
        let mut zst = spec.clone();
        zst.outputs.dma_log = Some(wanted("dma.jsonl.zst"));
        let zst_plan = InnerRun::plan(&zst, x).unwrap();
        assert_eq!(
            zst_plan.spec.outputs.dma_log,
            Some(x.join("dma-log.jsonl.zst"))
        );
        assert_eq!(
            plan.disk,
            Some(DiskCopy {
                outer: disk,
                inner: x.join("disk.img"),
                write_back: true
            })
        );
        assert_eq!(
            plan.argv(),
            ["run", "--spec", &*x.join("spec.json").to_string_lossy()]
        );

        plan.prepare().unwrap();
        assert_eq!(RunSpec::load(&plan.spec_file).unwrap(), plan.spec);
        assert_eq!(std::fs::read(x.join("disk.img")).unwrap(), b"disk.img");
    }

    #[test]
    fn relative_inputs_are_made_absolute_and_missing_ones_named() {
        let exchange = tempfile::tempdir().unwrap();
        let here = std::env::current_dir().unwrap();
        let spec = RunSpec::new("Cargo.toml");
        let plan = InnerRun::plan(&spec, exchange.path()).unwrap();
        assert_eq!(plan.spec.kernel, here.join("Cargo.toml"));
        assert!(plan.outputs.is_empty() && plan.disk.is_none());
        let message = InnerRun::plan(&RunSpec::new("no-such-kernel"), exchange.path())
            .unwrap_err()
            .to_string();
        assert!(message.contains("no-such-kernel"), "{message}");
    }

    #[test]
    fn outputs_and_writable_disks_come_back_after_the_run() {
        let outer = tempfile::tempdir().unwrap();
        let exchange = tempfile::tempdir().unwrap();
        let disk = outer.path().join("disk.img");
        std::fs::write(&disk, "before").unwrap();
        let scratch = outer.path().join("scratch.img");
        std::fs::write(&scratch, "blank").unwrap();
        let spec = RunSpec {
            disk: Some(DiskSpec {
                path: disk.clone(),
                read_only: false,
            }),
            scratch_disk: Some(scratch.clone()),
            outputs: RunOutputs {
                summary: Some(outer.path().join("run.json")),
                console: Some(outer.path().join("console.txt")),
                ..RunOutputs::default()
            },
            ..RunSpec::new("Cargo.toml")
        };
        let plan = InnerRun::plan(&spec, exchange.path()).unwrap();
        assert_eq!(
            plan.spec.scratch_disk,
            Some(exchange.path().join("scratch.img"))
        );
        plan.prepare().unwrap();
        assert_eq!(
            std::fs::read_to_string(exchange.path().join("scratch.img")).unwrap(),
            "blank"
        );
        std::fs::write(exchange.path().join("disk.img"), "after").unwrap();
        std::fs::write(exchange.path().join("scratch.img"), "written").unwrap();
        std::fs::write(exchange.path().join("report.json"), "{}").unwrap();
        // No console inside: the run failed early; the rest still comes back.
        plan.copy_back().unwrap();
        assert_eq!(std::fs::read_to_string(&disk).unwrap(), "after");
        assert_eq!(std::fs::read_to_string(&scratch).unwrap(), "written");
        assert_eq!(
            std::fs::read_to_string(outer.path().join("run.json")).unwrap(),
            "{}"
        );
        assert!(!outer.path().join("console.txt").exists());
    }
}
