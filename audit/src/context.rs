//! Where and on what a set of verdicts was produced: the run context every report
//! carries (`verdicts.json`'s `context`, KTAP's header lines, the HTML header, the
//! JUnit properties and the KCIDB `misc`).

use serde::{Deserialize, Serialize};

use crate::MethodAudit;

/// The run a verdict set came from. Every field a run could not know is `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunContext {
    /// The zc version that judged (`CARGO_PKG_VERSION` of the binary).
    pub zc_version: String,
    /// When the run started, RFC 3339 in UTC (`2026-12-01T09:35:16Z`).
    pub date: String,
    /// The guest kernel's release (`uname -r`, from the guest's `hello`).
    pub kernel_release: Option<String>,
    /// Where the kernel came from: a Debian package and version, or the image path.
    pub kernel_source: Option<String>,
    /// `direct` (the host's own KVM) or `emulated` (KVM inside QEMU TCG).
    pub host_mode: Option<String>,
    /// The virtio transport of the guest's devices (`mmio`, `pci`).
    pub transport: Option<String>,
    /// The host CPU's model name (`/proc/cpuinfo`).
    pub cpu_model: Option<String>,
    /// Bytes each method sent.
    pub size: u64,
    /// Bytes per chunk.
    pub chunk: u64,
    /// One entry per NIC variant (boot), in run order.
    pub variants: Vec<VariantRun>,
}

impl RunContext {
    /// Whether the times (throughput) were measured inside an emulated host.
    pub fn emulated(&self) -> bool {
        self.host_mode.as_deref() == Some("emulated")
    }

    /// The variant called `name`, if the context lists it.
    pub fn variant(&self, name: &str) -> Option<&VariantRun> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// The kernel in one phrase: release and source, whichever are known.
    pub fn kernel_line(&self) -> String {
        match (&self.kernel_release, &self.kernel_source) {
            (Some(r), Some(s)) => format!("{r} ({s})"),
            (Some(r), None) => r.clone(),
            (None, Some(s)) => format!("unknown release ({s})"),
            (None, None) => "unknown".to_string(),
        }
    }
}

/// One boot of the guest: a NIC variant and what it left behind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantRun {
    /// The variant's name, as `expected.toml` names it (`sg-on`, `sg-off`).
    pub name: String,
    /// The methods this boot was to run, in order.
    pub methods: Vec<String>,
    /// The NIC's feature bits: offered and what the driver acked.
    pub nic_features: Option<Negotiated>,
    /// Why the boot failed (did not boot, guest exited N, timeout...), one line;
    /// `None` when it ran to the end.
    pub failure: Option<String>,
    /// The files the boot wrote (DMA log, pcap, console, run summary).
    pub files: Vec<OutputFile>,
}

impl VariantRun {
    /// The variant as a report shows it: its name, and when the driver refused a
    /// feature the variant depends on, what it ran with instead, e.g.
    /// `sg-on (offered; driver refused CSUM)`.
    pub fn label(&self) -> String {
        match self.nic_features.as_ref().and_then(Negotiated::refusal) {
            Some(why) => format!("{} ({why})", self.name),
            None => self.name.clone(),
        }
    }
}

/// Feature bits a virtio device offered and what its driver acked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    /// Offered features, by name (`CSUM`, `VERSION_1`...; unknown bits as `bit N`).
    pub offered: Vec<String>,
    /// Acked features, by name; `None` when the driver never completed negotiation
    /// (no `FEATURES_OK`).
    pub acked: Option<Vec<String>>,
    /// Acked features the device saw the driver never use (e.g. `CSUM` acked but no
    /// frame asked for a checksum: Linux's `virtio_net.csum=0` acks the bit and still
    /// leaves checksum offload, and so scatter-gather, off).
    pub unused: Vec<String>,
}

/// The virtio-net feature that gives Linux scatter-gather: without checksum offload
/// Linux clears `NETIF_F_SG` and linearises every frame.
pub const NET_CSUM: &str = "CSUM";

impl Negotiated {
    /// Offered features the driver did not ack.
    pub fn refused(&self) -> Vec<&str> {
        match &self.acked {
            None => Vec::new(),
            Some(acked) => self
                .offered
                .iter()
                .filter(|f| !acked.contains(f))
                .map(String::as_str)
                .collect(),
        }
    }

    /// When the driver refused checksum offload although it was offered, or acked it
    /// and never used it (so the card ran without scatter-gather): the phrase that
    /// says so.
    pub fn refusal(&self) -> Option<String> {
        if !self.offered.iter().any(|f| f == NET_CSUM) {
            return None;
        }
        match &self.acked {
            // Never driven (the boot failed before the driver probed): nothing ran
            // on the card, so no row claims a variant it did not have.
            None => None,
            Some(acked) if !acked.iter().any(|f| f == NET_CSUM) => {
                Some(format!("offered; driver refused {NET_CSUM}"))
            }
            Some(_) if self.unused.iter().any(|f| f == NET_CSUM) => Some(format!(
                "offered; driver acked {NET_CSUM} but never used it"
            )),
            Some(_) => None,
        }
    }
}

/// A file a run wrote, named relative to the output directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// What it is: `dma-log`, `pcap`, `console`, `run`.
    pub kind: String,
    /// Its path relative to the output directory (a link target in the HTML).
    pub path: String,
    /// Its size in bytes; `None` when the run did not write it.
    pub bytes: Option<u64>,
    /// Lowercase hex SHA-256 of its content; `None` when the run did not write it.
    pub sha256: Option<String>,
}

/// A verdict set and its context: what every report renders.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Verdicts {
    /// Where and on what the run happened.
    pub context: RunContext,
    /// Every method of every variant, variants in run order.
    pub methods: Vec<MethodAudit>,
}

impl Verdicts {
    /// The variants in report order: the context's, then any other an audit names.
    pub fn variant_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .context
            .variants
            .iter()
            .map(|v| v.name.clone())
            .collect();
        for a in &self.methods {
            if !names.contains(&a.variant) {
                names.push(a.variant.clone());
            }
        }
        names
    }

    /// The audits of variant `name`, in order.
    pub fn of_variant<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a MethodAudit> {
        self.methods.iter().filter(move |a| a.variant == name)
    }

    /// The variant's display label (see [`VariantRun::label`]).
    pub fn variant_label(&self, name: &str) -> String {
        self.context
            .variant(name)
            .map_or_else(|| name.to_string(), VariantRun::label)
    }

    /// Counts of (pass, fail, skip) over every method.
    pub fn totals(&self) -> (usize, usize, usize) {
        use crate::Verdict;
        let count = |v: Verdict| self.methods.iter().filter(|a| a.verdict == v).count();
        (
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::Skip),
        )
    }

    /// Whether the whole set passes: no FAIL and no failed boot.
    pub fn passed(&self) -> bool {
        self.totals().1 == 0 && self.context.variants.iter().all(|v| v.failure.is_none())
    }
}
