//! What a run found: [`RunReport`] (what [`crate::vm::run`] returns) and
//! [`RunSummary`] (`run.json`: the report, plus where and on what it ran). Everything
//! that reads `run.json` back (`zc-vmm methods`, `zc-bench`, the tests) reads a
//! [`RunSummary`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zc_devices::control::ControlMessage;
use zc_devices::virtio::blk::BlkStats;
use zc_devices::virtio::net::NetStats;

use crate::boot::KernelFormat;
use crate::exits::VcpuExits;
use crate::host::HostMode;

/// How long a guest that reported its exit status gets to power off cleanly.
pub const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// The `schema` of the `run.json` this version writes.
pub const RUN_SUMMARY_SCHEMA: &str = "zc-vmm-run/3";

/// Why the run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (reboot, keyboard controller, `panic=-1`).
    Reset,
    /// KVM reported a shutdown exit: the guest triple-faulted, a fault the guest
    /// kernel could not even report. Carries the vCPU's state at that moment.
    TripleFault(String),
    /// The run took longer than the timeout.
    Timeout,
    /// The guest reported its exit status but did not power off in time.
    NoPowerOffAfterExit,
    /// KVM could not run the vCPU (emulation failure, failed entry...).
    VcpuFailure(String),
    /// The DMA log could not be written (full disk, I/O error): the run was stopped
    /// there, as nothing after it could be judged ([`RunReport::dma_log_failure`]
    /// says why).
    DmaLogUnwritable,
}

/// What the peer found for one TCP connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferResult {
    /// What was expected or offered (the file), or "an unexpected connection".
    pub label: String,
    /// Which way the bytes went (absent in summaries from before the peer sent:
    /// to the peer).
    #[serde(default)]
    pub direction: Direction,
    /// Bytes received by the peer, or, sent to the guest, acknowledged by the guest.
    pub bytes: u64,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Throughput from first to last byte (sent: to the guest's count), in Mbit/s.
    pub mbps: Option<f64>,
}

impl TransferResult {
    /// Whether every byte arrived and matched (sent: and the guest counted them all).
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
}

/// Which way a transfer went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The guest sent, the peer received and checked (port 7878).
    #[default]
    ToPeer,
    /// The peer sent, the guest received and counted (port 7879).
    ToGuest,
}

/// Which backend a card had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackendKind {
    /// The in-VMM TCP peer.
    Peer,
    /// A host tap device.
    Tap,
}

/// A virtio device's feature bits by name: what it offered and what its driver acked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFeatures {
    /// Offered, by name (`zc_devices::virtio::feature_names`).
    pub offered: Vec<String>,
    /// Acked in the driver's last accepted negotiation; `None` when the driver never
    /// completed one (the device was never used).
    pub acked: Option<Vec<String>>,
}

impl DeviceFeatures {
    /// The names of `offered` and of `acked` for a device of type `device_type`.
    pub fn new(device_type: u32, offered: u64, acked: Option<u64>) -> Self {
        use zc_devices::virtio::feature_names;
        DeviceFeatures {
            offered: feature_names(device_type, offered),
            acked: acked.map(|bits| feature_names(device_type, bits)),
        }
    }
}

/// One network card's counters at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NicSummary {
    /// What was behind it.
    pub backend: NetBackendKind,
    /// Whether it offered scatter-gather (checksum offload).
    pub sg: bool,
    /// What it offered and what the driver acked: with `sg` on, a driver that did
    /// not ack `CSUM` ran the card without scatter-gather all the same.
    pub features: DeviceFeatures,
    /// What it carried.
    pub stats: NetStats,
}

/// A control message and when it came, since the first vCPU entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedMessage {
    /// Host time since the start of the run.
    #[serde(rename = "at_s", with = "seconds")]
    pub at: Duration,
    /// The message.
    pub message: ControlMessage,
}

/// What happened in a run, for the caller to print and turn into an exit status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Why it ended.
    pub stop: StopReason,
    /// The status the guest program reported with `exit`, if it did.
    pub guest_exit: Option<i32>,
    /// The guest kernel's release, from the guest's `hello`.
    pub kernel_release: Option<String>,
    /// Guest uptime when /init started, as the guest reported it (seconds).
    #[serde(rename = "init_uptime_s")]
    pub init_uptime: Option<f64>,
    /// Host time from the first vCPU entry to the guest's `hello`.
    #[serde(rename = "time_to_init_s", with = "seconds_opt")]
    pub time_to_init: Option<Duration>,
    /// Host time of the whole run.
    #[serde(rename = "run_time_s", with = "seconds")]
    pub run_time: Duration,
    /// Every control message, in order.
    pub messages: Vec<TimedMessage>,
    /// The console's last lines.
    pub console_tail: Vec<String>,
    /// The kernel image's format.
    pub kernel_format: KernelFormat,
    /// What the TCP peer received, one entry per connection.
    pub transfers: Vec<TransferResult>,
    /// Expected transfers that never arrived.
    pub missing_transfers: Vec<String>,
    /// Files offered to the guest that no connection asked for (absent when none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_sends: Vec<String>,
    /// Each network card's counters, in attach order.
    pub nics: Vec<NicSummary>,
    /// Each disk's counters, in attach order.
    pub disks: Vec<DiskSummary>,
    /// Why the DMA log is incomplete, when writing it failed (during the run or at
    /// its final flush): the run then fails, and no verdict may be drawn from the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dma_log_failure: Option<String>,
    /// The vCPUs' exits to the VMM by device and kind, for the whole run and each
    /// span the guest marked (absent in summaries from before they were counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_exits: Option<VcpuExits>,
    /// What the dirty-page samples cost the guest, when the run sampled (the guest
    /// stands still for each: `crate::dirty::SampleCost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_sample_cost: Option<crate::dirty::SampleCost>,
}

/// A disk's counters at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskSummary {
    /// Whether the guest got it read-only.
    pub read_only: bool,
    /// What it offered and what the driver acked.
    pub features: DeviceFeatures,
    /// What it did.
    pub stats: BlkStats,
}

impl RunReport {
    /// A report of a run that has not ended yet: no messages, stopped by timeout
    /// unless something else stops it.
    pub fn new(kernel_format: KernelFormat) -> Self {
        RunReport {
            stop: StopReason::Timeout,
            guest_exit: None,
            kernel_release: None,
            init_uptime: None,
            time_to_init: None,
            run_time: Duration::ZERO,
            messages: Vec::new(),
            console_tail: Vec::new(),
            kernel_format,
            transfers: Vec::new(),
            missing_transfers: Vec::new(),
            missing_sends: Vec::new(),
            nics: Vec::new(),
            disks: Vec::new(),
            dma_log_failure: None,
            vcpu_exits: None,
            dirty_sample_cost: None,
        }
    }

    /// The exit status the VMM should end with: the guest's own, when it reported one
    /// and then shut down; 1 for anything else, and for any transfer that lost data.
    pub fn exit_status(&self) -> i32 {
        if self.dma_log_failure.is_some() {
            return 1;
        }
        if self.transfer_failure().is_some() && matches!(self.guest_exit, Some(0)) {
            return 1;
        }
        match (&self.stop, self.guest_exit) {
            (StopReason::PowerOff | StopReason::Reset, Some(code)) => code,
            (StopReason::NoPowerOffAfterExit, Some(code)) if code != 0 => code,
            _ => 1,
        }
    }

    /// Why the transfers the peer checked failed, if any did.
    fn transfer_failure(&self) -> Option<String> {
        if let Some(bad) = self.transfers.iter().find(|t| t.failure.is_some()) {
            let what = match bad.direction {
                Direction::ToPeer => "check",
                Direction::ToGuest => "send",
            };
            return Some(format!(
                "the peer's {what} of {} failed: {}",
                bad.label,
                bad.failure.as_deref().unwrap_or("")
            ));
        }
        if let Some(label) = self.missing_transfers.first() {
            return Some(format!("the peer never received {label}"));
        }
        self.missing_sends
            .first()
            .map(|label| format!("the guest never asked the peer for {label}"))
    }

    /// One line saying why a run failed, or `None` when it succeeded.
    pub fn failure(&self) -> Option<String> {
        // First: whatever else happened, the run's evidence is incomplete.
        if let Some(why) = &self.dma_log_failure {
            return Some(why.clone());
        }
        let reason = match (&self.stop, self.guest_exit) {
            (StopReason::PowerOff | StopReason::Reset, Some(0)) => {
                return self.transfer_failure();
            }
            (StopReason::PowerOff | StopReason::Reset, Some(code)) => {
                format!("the guest program reported failure (exit {code})")
            }
            (StopReason::PowerOff, None) => {
                "the guest powered off without reporting an exit status".into()
            }
            (StopReason::Reset, None) => {
                "the guest reset before reporting an exit status (kernel panic or reboot; see the console lines above)".into()
            }
            (StopReason::Timeout, _) => {
                "the guest did not finish before the timeout (hung? raise --timeout if it is just slow)".into()
            }
            (StopReason::NoPowerOffAfterExit, code) => format!(
                "the guest reported exit {} but did not power off within {} s",
                code.unwrap_or(-1),
                POWEROFF_GRACE.as_secs()
            ),
            (StopReason::TripleFault(state), _) => format!(
                "the guest triple-faulted (KVM shutdown exit; a fault its kernel could not report): {state}"
            ),
            (StopReason::VcpuFailure(why), _) => format!("the vCPU stopped: {why}"),
            (StopReason::DmaLogUnwritable, _) => "the DMA log could not be written".into(),
        };
        Some(reason)
    }
}

/// Which Debian kernel package the guest kernel came from, as `zc-image` recorded it
/// in the `kernel.json` beside the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelImage {
    /// Debian package, or `None` for a user's kernel.
    pub package: Option<String>,
    /// Debian package version, or `None` for a user's kernel.
    pub deb_version: Option<String>,
    /// Kernel release (`uname -r`).
    pub release: String,
}

impl KernelImage {
    /// What the `kernel.json` beside `kernel` says: a built role's
    /// ([`zc_images::role::RoleKernel`]) or an unpacked Debian kernel's
    /// ([`zc_images::kernel::KernelInfo`]); `None` for a kernel `zc-image` did not make.
    pub fn beside(kernel: &Path) -> Option<KernelImage> {
        let path = kernel.parent()?.join(zc_images::kernel::KERNEL_JSON);
        let text = std::fs::read_to_string(path).ok()?;
        if let Ok(role) = serde_json::from_str::<zc_images::role::RoleKernel>(&text) {
            return Some(KernelImage {
                package: role.package,
                deb_version: role.deb_version,
                release: role.release,
            });
        }
        let info: zc_images::kernel::KernelInfo = serde_json::from_str(&text).ok()?;
        Some(KernelImage {
            package: info.package,
            deb_version: info.deb_version,
            release: info.release,
        })
    }
}

/// One `report` line of the guest, parsed. Each guest test has its own shape, told
/// apart by its `"test"` field; a line that is not JSON is kept as a string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GuestReport(pub serde_json::Value);

impl GuestReport {
    /// Parses the JSON text of a `report` message, keeping it as text if it is not JSON.
    pub fn parse(json: &str) -> Self {
        GuestReport(
            serde_json::from_str(json).unwrap_or_else(|_| serde_json::Value::String(json.into())),
        )
    }

    /// The test it reports on (its `"test"` field).
    pub fn test(&self) -> Option<&str> {
        self.0.get("test")?.as_str()
    }

    /// The report as the type of its test.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.0)
    }
}

/// Errors reading `run.json`.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// The file cannot be read.
    #[error("cannot read the run summary {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a run summary of this version.
    #[error("{} is not a {RUN_SUMMARY_SCHEMA} run summary: {why}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No report of a test the reader needs.
    #[error("the guest reported no {0} result")]
    NoReport(String),
    /// A report that does not have the shape of its test.
    #[error("the guest's {test} report does not parse: {source}")]
    BadReport {
        /// The test.
        test: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// `run.json`: the run's report, and where and on what it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Always [`RUN_SUMMARY_SCHEMA`].
    pub schema: String,
    /// The `zc-vmm` version that ran it.
    pub zc_version: String,
    /// When the summary was made (the end of the run), RFC 3339 in UTC.
    pub date: String,
    /// The CPU model of the machine the guest ran on (`/proc/cpuinfo`; inside the
    /// emulated host, QEMU's emulated CPU).
    pub cpu_model: Option<String>,
    /// The files the run wrote (DMA log, pcap, console), with their SHA-256; filled
    /// by [`RunSummary::with_files`].
    pub files: Vec<RunFile>,
    /// How the guest got its KVM.
    pub mode: HostMode,
    /// Whether this run was the inner one, inside the emulated host.
    pub inside_emulated_host: bool,
    /// The kernel image booted.
    pub kernel: PathBuf,
    /// Its Debian package, if `zc-image` made it.
    pub kernel_image: Option<KernelImage>,
    /// The virtio transport the devices sat behind (absent in summaries from before
    /// there was a choice, which were all virtio-mmio).
    #[serde(default)]
    pub transport: Option<crate::spec::Transport>,
    /// What `zc-vmm run` exited with.
    pub exit_status: i32,
    /// Why the run failed, one line; `None` when it succeeded.
    pub failure: Option<String>,
    /// The guest's `report` messages, parsed.
    pub reports: Vec<GuestReport>,
    /// The run itself.
    #[serde(flatten)]
    pub run: RunReport,
}

impl RunSummary {
    /// The summary of `run`, which booted `kernel` in `mode`.
    pub fn new(run: RunReport, kernel: &Path, mode: HostMode, inside_emulated_host: bool) -> Self {
        let reports = run
            .messages
            .iter()
            .filter_map(|m| match &m.message {
                ControlMessage::Report { json } => Some(GuestReport::parse(json)),
                _ => None,
            })
            .collect();
        RunSummary {
            schema: RUN_SUMMARY_SCHEMA.to_string(),
            zc_version: env!("CARGO_PKG_VERSION").to_string(),
            date: rfc3339_utc(std::time::SystemTime::now()),
            cpu_model: cpu_model(),
            files: Vec::new(),
            mode,
            inside_emulated_host,
            kernel: kernel.to_path_buf(),
            kernel_image: KernelImage::beside(kernel),
            transport: None,
            exit_status: run.exit_status(),
            failure: run.failure(),
            reports,
            run,
        }
    }

    /// The summary with `files` (kind, path) listed, each hashed if it exists.
    pub fn with_files<'a>(mut self, files: impl IntoIterator<Item = (&'a str, &'a Path)>) -> Self {
        self.files = files
            .into_iter()
            .map(|(kind, path)| RunFile::of(kind, path))
            .collect();
        self
    }

    /// Writes the summary as pretty JSON.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, text + "\n")
    }

    /// Reads a summary [`RunSummary::save`] wrote.
    pub fn load(path: &Path) -> Result<Self, SummaryError> {
        let text = std::fs::read_to_string(path).map_err(|source| SummaryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let format = |why: String| SummaryError::Format {
            path: path.to_path_buf(),
            why,
        };
        let summary: RunSummary = serde_json::from_str(&text).map_err(|e| format(e.to_string()))?;
        if summary.schema != RUN_SUMMARY_SCHEMA {
            return Err(format(format!("its schema is {:?}", summary.schema)));
        }
        Ok(summary)
    }

    /// The guest's reports of `test`, in order.
    pub fn reports_of<'a>(&'a self, test: &'a str) -> impl Iterator<Item = &'a GuestReport> {
        self.reports.iter().filter(move |r| r.test() == Some(test))
    }

    /// The first report of `test`, as its type.
    pub fn report<T: DeserializeOwned>(&self, test: &str) -> Result<T, SummaryError> {
        self.reports_of(test)
            .next()
            .ok_or_else(|| SummaryError::NoReport(test.to_string()))?
            .decode()
            .map_err(|source| SummaryError::BadReport {
                test: test.to_string(),
                source,
            })
    }
}

/// A file a run wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFile {
    /// What it is: `dma-log`, `pcap`, `console`.
    pub kind: String,
    /// Where it was written.
    pub path: PathBuf,
    /// Its size; `None` when it does not exist.
    pub bytes: Option<u64>,
    /// Lowercase hex SHA-256 of its content; `None` when it does not exist.
    pub sha256: Option<String>,
}

impl RunFile {
    /// `path` as it is now: size and SHA-256, or `None`s when it cannot be read.
    pub fn of(kind: &str, path: &Path) -> Self {
        let hashed = sha256_file(path).ok();
        RunFile {
            kind: kind.to_string(),
            path: path.to_path_buf(),
            bytes: hashed.as_ref().map(|(bytes, _)| *bytes),
            sha256: hashed.map(|(_, hex)| hex),
        }
    }
}

/// The size and lowercase hex SHA-256 of a file, read in constant memory.
pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((total, hex))
}

/// The host CPU's model name (`model name` in `/proc/cpuinfo`).
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `time` as RFC 3339 in UTC, to the second (`2026-12-01T09:35:16Z`).
///
/// By hand (the days-to-civil-date conversion of Howard Hinnant's `chrono`-compatible
/// algorithms) rather than with a date crate: this one formatting is all zc needs.
pub fn rfc3339_utc(time: std::time::SystemTime) -> String {
    let secs = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// Durations as seconds with a fraction, the unit every `*_s` field of run.json has
// had. Written by hand: serde_with's `DurationSecondsWithFrac` does this, but two
// fields do not justify a new dependency.
mod seconds {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
    }
}

mod seconds_opt {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| d.as_secs_f64()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::{AccessCounts, ExitCounts};

    fn report(stop: StopReason, guest_exit: Option<i32>) -> RunReport {
        RunReport {
            stop,
            guest_exit,
            ..RunReport::new(KernelFormat::BzImage)
        }
    }

    #[test]
    fn exit_status_follows_the_guest_only_after_a_clean_stop() {
        assert_eq!(report(StopReason::PowerOff, Some(0)).exit_status(), 0);
        assert_eq!(report(StopReason::Reset, Some(0)).exit_status(), 0);
        assert_eq!(report(StopReason::PowerOff, Some(3)).exit_status(), 3);
        assert_eq!(report(StopReason::PowerOff, None).exit_status(), 1);
        assert_eq!(report(StopReason::Reset, None).exit_status(), 1);
        assert_eq!(report(StopReason::Timeout, Some(0)).exit_status(), 1);
        assert_eq!(
            report(StopReason::NoPowerOffAfterExit, Some(0)).exit_status(),
            1
        );
        assert_eq!(
            report(StopReason::NoPowerOffAfterExit, Some(5)).exit_status(),
            5
        );
        assert_eq!(
            report(StopReason::VcpuFailure("x".into()), Some(0)).exit_status(),
            1
        );
    }

    #[test]
    fn an_unwritable_dma_log_fails_a_run_the_guest_passed() {
        let why = "the DMA log /o/dma.jsonl could not be written: No space left on device (os error 28); free space or pass --dma-log elsewhere";
        for stop in [StopReason::PowerOff, StopReason::DmaLogUnwritable] {
            let mut run = report(stop, Some(0));
            run.dma_log_failure = Some(why.into());
            assert_eq!(run.exit_status(), 1);
            assert_eq!(run.failure().as_deref(), Some(why));
            // run.json keeps it, and a summary from before the field reads as none.
            let text = serde_json::to_string(&run).unwrap();
            let back: RunReport = serde_json::from_str(&text).unwrap();
            assert_eq!(back.dma_log_failure.as_deref(), Some(why));
        }
        let old = serde_json::to_string(&report(StopReason::PowerOff, Some(0))).unwrap();
        assert!(!old.contains("dma_log_failure"));
        let back: RunReport = serde_json::from_str(&old).unwrap();
        assert_eq!((back.exit_status(), back.dma_log_failure), (0, None));
    }

    #[test]
    fn failure_explains_every_unclean_end() {
        assert_eq!(report(StopReason::PowerOff, Some(0)).failure(), None);
        for (stop, exit, needle) in [
            (StopReason::Reset, None, "panic"),
            (StopReason::Timeout, None, "timeout"),
            (StopReason::PowerOff, None, "without reporting"),
            (StopReason::PowerOff, Some(2), "exit 2"),
            (StopReason::VcpuFailure("boom".into()), None, "boom"),
            (
                StopReason::TripleFault("rip 0x1".into()),
                None,
                "triple-faulted",
            ),
        ] {
            let why = report(stop, exit).failure().unwrap();
            assert!(why.contains(needle), "{why:?} lacks {needle:?}");
            assert!(!why.contains('\n'));
        }
    }

    #[test]
    fn a_lost_byte_fails_a_clean_run() {
        let mut run = report(StopReason::PowerOff, Some(0));
        run.transfers.push(TransferResult {
            label: "payload.bin".into(),
            direction: Direction::ToPeer,
            bytes: 10,
            failure: Some("byte offset 3 differs".into()),
            mbps: None,
        });
        assert_eq!(run.exit_status(), 1);
        assert!(run.failure().unwrap().contains("byte offset 3"));
    }

    #[test]
    fn an_incomplete_send_fails_a_clean_run() {
        let mut run = report(StopReason::PowerOff, Some(0));
        run.transfers.push(TransferResult {
            label: "payload.bin".into(),
            direction: Direction::ToGuest,
            bytes: 10,
            failure: Some("the guest acknowledged 10 of 20 bytes".into()),
            mbps: None,
        });
        assert_eq!(run.exit_status(), 1);
        let why = run.failure().unwrap();
        assert!(why.contains("send of payload.bin failed"), "{why}");

        let mut run = report(StopReason::PowerOff, Some(0));
        run.missing_sends.push("second.bin".into());
        assert_eq!(run.exit_status(), 1);
        assert!(run
            .failure()
            .unwrap()
            .contains("never asked the peer for second.bin"));
    }

    #[test]
    fn a_transfer_without_direction_is_one_to_the_peer() {
        let old = r#"{"label":"p","bytes":1,"failure":null,"mbps":null}"#;
        let t: TransferResult = serde_json::from_str(old).unwrap();
        assert_eq!(t.direction, Direction::ToPeer);
        let new = serde_json::to_string(&TransferResult {
            direction: Direction::ToGuest,
            ..t
        })
        .unwrap();
        assert!(new.contains(r#""direction":"to_guest""#), "{new}");
    }

    /// A summary with every kind of field filled.
    fn full_summary() -> RunSummary {
        let at = |ms| Duration::from_millis(ms);
        let message = |ms, message| TimedMessage {
            at: at(ms),
            message,
        };
        let run = RunReport {
            stop: StopReason::TripleFault("rip 0x1".into()),
            guest_exit: Some(0),
            kernel_release: Some("6.1.0-1-cloud-amd64".into()),
            init_uptime: Some(0.75),
            time_to_init: Some(at(1250)),
            run_time: at(4500),
            messages: vec![
                message(
                    1250,
                    ControlMessage::Hello {
                        kernel_release: "6.1.0-1-cloud-amd64".into(),
                    },
                ),
                message(1300, ControlMessage::Uptime { seconds: 0.75 }),
                message(
                    2000,
                    ControlMessage::Mark {
                        label: zc_protocol::Marker::begin(zc_protocol::marker::SEND_SPAN).label(),
                    },
                ),
                message(
                    2100,
                    ControlMessage::Report {
                        json: r#"{"test":"disk-read","mbps":812.5}"#.into(),
                    },
                ),
                message(
                    2200,
                    ControlMessage::Report {
                        json: "oops".into(),
                    },
                ),
                message(2300, ControlMessage::Log { text: "hi".into() }),
                message(2400, ControlMessage::Malformed { line: "??".into() }),
                message(2500, ControlMessage::Exit { code: 0 }),
            ],
            console_tail: vec!["zc-guest: done".into()],
            kernel_format: KernelFormat::Elf,
            transfers: vec![
                TransferResult {
                    label: "payload.bin".into(),
                    direction: Direction::ToPeer,
                    bytes: 1 << 24,
                    failure: None,
                    mbps: Some(900.5),
                },
                TransferResult {
                    label: "payload.bin".into(),
                    direction: Direction::ToGuest,
                    bytes: 1 << 20,
                    failure: Some("the guest counted 1 bytes where 1048576 were sent".into()),
                    mbps: None,
                },
            ],
            missing_transfers: vec!["second.bin".into()],
            missing_sends: vec!["third.bin".into()],
            nics: vec![NicSummary {
                backend: NetBackendKind::Peer,
                sg: true,
                features: DeviceFeatures::new(1, 0x1_0000_0021, Some(0x1_0000_0020)),
                stats: NetStats {
                    tx_frames: 1,
                    tx_bytes: 2,
                    tx_dropped: 3,
                    tx_descriptors: 4,
                    csum_completed: 5,
                    rx_frames: 6,
                    rx_bytes: 7,
                    rx_dropped: 8,
                },
            }],
            disks: vec![DiskSummary {
                read_only: true,
                features: DeviceFeatures::new(2, 0x1_0000_0020, None),
                stats: BlkStats {
                    in_requests: 9,
                    bytes_read: 10,
                    ..BlkStats::default()
                },
            }],
            dma_log_failure: None,
            dirty_sample_cost: Some(crate::dirty::SampleCost {
                samples: 257,
                seconds: 1.5,
                max_ms: 12.25,
                pages_scanned: 40_000,
            }),
            vcpu_exits: Some(crate::exits::VcpuExits {
                total: ExitCounts {
                    all: 12,
                    targets: [
                        (
                            "console".to_string(),
                            AccessCounts {
                                write: 4,
                                ..AccessCounts::default()
                            },
                        ),
                        (
                            "net0".to_string(),
                            AccessCounts {
                                read: 1,
                                write: 2,
                                notify: 1,
                                interrupt: 4,
                            },
                        ),
                    ]
                    .into(),
                },
                spans: vec![crate::exits::SpanExits {
                    span: "send".into(),
                    exits: ExitCounts {
                        all: 4,
                        targets: [(
                            "net0".to_string(),
                            AccessCounts {
                                interrupt: 4,
                                ..AccessCounts::default()
                            },
                        )]
                        .into(),
                    },
                }],
            }),
        };
        RunSummary::new(run, Path::new("/nowhere/vmlinuz"), HostMode::Emulated, true)
            .with_files([("dma-log", Path::new("/nowhere/dma.jsonl"))])
    }

    /// `docs/schemas/zc-vmm-run-3.schema.json`, compiled.
    fn run_schema() -> jsonschema::Validator {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/schemas/zc-vmm-run-3.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    }

    fn schema_errors(doc: &serde_json::Value) -> Vec<String> {
        run_schema()
            .iter_errors(doc)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect()
    }

    #[test]
    fn run_json_matches_its_documented_schema() {
        let mut summary = full_summary();
        let doc = serde_json::to_value(&summary).unwrap();
        assert_eq!(schema_errors(&doc), Vec::<String>::new());
        // Every stop reason, and a run that failed.
        for stop in [
            StopReason::PowerOff,
            StopReason::Reset,
            StopReason::Timeout,
            StopReason::NoPowerOffAfterExit,
            StopReason::TripleFault("rip 0x1".into()),
            StopReason::VcpuFailure("boom".into()),
            StopReason::DmaLogUnwritable,
        ] {
            summary.run.dma_log_failure = (stop == StopReason::DmaLogUnwritable)
                .then(|| "the DMA log /o/dma.jsonl could not be written: No space left on device (os error 28)".into());
            summary.run.stop = stop;
            summary.failure = summary.run.failure();
            let doc = serde_json::to_value(&summary).unwrap();
            assert_eq!(schema_errors(&doc), Vec::<String>::new(), "{doc}");
        }
        // The schema has teeth: an unknown field, a wrong type, a Debug string.
        let mut bad = serde_json::to_value(&summary).unwrap();
        bad["nics"][0]["colour"] = "red".into();
        assert!(!schema_errors(&bad).is_empty());
        let mut bad = serde_json::to_value(&summary).unwrap();
        bad["messages"][0]["message"] = "Hello { kernel_release: \"6.1\" }".into();
        assert!(!schema_errors(&bad).is_empty());
        let mut bad = serde_json::to_value(&summary).unwrap();
        bad["vcpu_exits"]["spans"][0]["exits"]["targets"]["net0"]["halts"] = 1.into();
        assert!(!schema_errors(&bad).is_empty());
        let mut bad = serde_json::to_value(&summary).unwrap();
        bad["vcpu_exits"]["total"]["targets"]["gpu"] =
            bad["vcpu_exits"]["total"]["targets"]["net0"].clone();
        assert!(!schema_errors(&bad).is_empty());
        // A summary from before exits were counted is still one.
        let mut old = serde_json::to_value(&summary).unwrap();
        old.as_object_mut().unwrap().remove("vcpu_exits");
        assert_eq!(schema_errors(&old), Vec::<String>::new());
        let old: RunSummary = serde_json::from_value(old).unwrap();
        assert_eq!(old.run.vcpu_exits, None);
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        use std::time::{Duration, UNIX_EPOCH};
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(951_827_696)),
            "2000-02-29T12:34:56Z"
        );
        assert_eq!(
            rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_796_117_716)),
            "2026-12-01T09:35:16Z"
        );
    }

    #[test]
    fn files_are_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "abc").unwrap();
        let f = RunFile::of("pcap", &path);
        assert_eq!(f.bytes, Some(3));
        assert_eq!(
            f.sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(RunFile::of("pcap", &dir.path().join("none")).sha256, None);
    }

    #[test]
    fn a_summary_survives_a_json_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let summary = full_summary();
        summary.save(&path).unwrap();
        assert_eq!(RunSummary::load(&path).unwrap(), summary);
    }

    #[test]
    fn a_summary_is_written_with_typed_values_not_debug_text() {
        let json: serde_json::Value = serde_json::to_value(full_summary()).unwrap();
        assert_eq!(json["schema"], RUN_SUMMARY_SCHEMA);
        assert_eq!(json["mode"], "emulated");
        assert_eq!(json["stop"]["TripleFault"], "rip 0x1");
        assert_eq!(json["kernel_format"], "Elf");
        assert_eq!(json["time_to_init_s"], 1.25);
        assert_eq!(json["run_time_s"], 4.5);
        assert_eq!(json["messages"][0]["at_s"], 1.25);
        assert_eq!(json["messages"][0]["message"]["kind"], "hello");
        assert_eq!(json["nics"][0]["stats"]["rx_dropped"], 8);
        assert_eq!(json["nics"][0]["backend"], "peer");
        assert_eq!(json["reports"][0]["mbps"], 812.5);
        assert_eq!(json["reports"][1], "oops");
        assert_eq!(json["exit_status"], 1);
        assert_eq!(
            serde_json::to_value(StopReason::PowerOff).unwrap(),
            "PowerOff"
        );
    }

    #[test]
    fn reports_are_read_as_the_type_of_their_test() {
        #[derive(Deserialize)]
        struct Throughput {
            mbps: f64,
        }
        let summary = full_summary();
        assert_eq!(
            summary.report::<Throughput>("disk-read").unwrap().mbps,
            812.5
        );
        assert!(matches!(
            summary.report::<Throughput>("send"),
            Err(SummaryError::NoReport(_))
        ));
        assert_eq!(summary.reports_of("disk-read").count(), 1);
    }

    #[test]
    fn another_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let mut summary = full_summary();
        summary.schema = "zc-vmm-run/1".into();
        summary.save(&path).unwrap();
        let message = RunSummary::load(&path).unwrap_err().to_string();
        assert!(message.contains("zc-vmm-run/1"), "{message}");
    }

    #[test]
    fn the_kernel_image_comes_from_kernel_json_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        assert_eq!(KernelImage::beside(&kernel), None);
        let role = zc_images::role::RoleKernel {
            role: zc_images::role::Role::Guest,
            package: Some("linux-image-6.1.0-1-cloud-amd64".into()),
            deb_version: Some("6.1.192-2".into()),
            release: "6.1.0-1-cloud-amd64".into(),
            version: "Linux version 6.1".into(),
            modules: vec![],
            module_paths: vec![],
            builtin: vec![],
            optional_modules: vec![],
            skipped_methods: vec![],
        };
        std::fs::write(
            dir.path().join("kernel.json"),
            serde_json::to_string(&role).unwrap(),
        )
        .unwrap();
        assert_eq!(
            KernelImage::beside(&kernel),
            Some(KernelImage {
                package: role.package.clone(),
                deb_version: role.deb_version.clone(),
                release: role.release.clone(),
            })
        );
    }
}
