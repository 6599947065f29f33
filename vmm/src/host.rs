//! The host probe: can this machine's `/dev/kvm` boot a stock kernel (`direct`), or
//! must the run go inside an emulated KVM host (`emulated`)? See `docs/design.md`
//! ("Host modes"): a KVM without `vmx`/`svm` in the CPU flags (e.g. the
//! `kvm_pvm` module) runs tiny guests but dies on a stock kernel.

use std::fmt;
use std::path::Path;

/// Environment variable that forces a mode.
pub const FORCE_ENV: &str = "ZC_HOST";
/// Set (to `1`) by the emulated host's runner for the `zc-vmm` it starts inside, so
/// that process can say where it runs.
pub const INSIDE_EMULATED_ENV: &str = "ZC_INSIDE_EMULATED_HOST";

/// How the guest gets its KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostMode {
    /// This machine's `/dev/kvm`.
    Direct,
    /// A QEMU TCG virtual machine with emulated SVM, running `zc-vmm` inside.
    Emulated,
}

impl fmt::Display for HostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostMode::Direct => "direct",
            HostMode::Emulated => "emulated",
        })
    }
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// The CPU flags show hardware virtualisation (`vmx` or `svm`), if any.
    pub hw_virt: Option<String>,
    /// The `kvm_pvm` module is loaded.
    pub kvm_pvm: bool,
}

/// Errors choosing a mode.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `ZC_HOST` has a value we do not know.
    #[error("ZC_HOST={0:?} is not a mode: use ZC_HOST=direct or ZC_HOST=emulated, or unset it to choose automatically")]
    BadForce(String),
    /// `direct` was forced on a machine without `/dev/kvm`.
    #[error("ZC_HOST=direct but /dev/kvm does not exist: load kvm-intel/kvm-amd, or use ZC_HOST=emulated")]
    NoKvmForDirect,
}

/// Looks at this machine.
pub fn probe() -> HostFacts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    HostFacts {
        dev_kvm: Path::new("/dev/kvm").exists(),
        hw_virt: hw_virt_flag(&cpuinfo),
        kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
    }
}

/// `vmx` or `svm` when the first CPU's flags line lists it.
pub fn hw_virt_flag(cpuinfo: &str) -> Option<String> {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))?
        .split_once(':')?
        .1;
    flags
        .split_whitespace()
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_string)
}

/// Chooses the mode from the facts and the forced value (`ZC_HOST`), with the reason
/// in words for the user.
pub fn choose(facts: &HostFacts, forced: Option<&str>) -> Result<(HostMode, String), HostError> {
    match forced.map(str::trim).filter(|f| !f.is_empty()) {
        Some("direct") if !facts.dev_kvm => Err(HostError::NoKvmForDirect),
        Some("direct") => Ok((HostMode::Direct, "forced by ZC_HOST=direct".into())),
        Some("emulated") => Ok((HostMode::Emulated, "forced by ZC_HOST=emulated".into())),
        Some(other) => Err(HostError::BadForce(other.to_string())),
        None => Ok(match (&facts.hw_virt, facts.dev_kvm) {
            (Some(flag), true) => (
                HostMode::Direct,
                format!("/dev/kvm present and the CPU has {flag}"),
            ),
            (None, true) if facts.kvm_pvm => (
                HostMode::Emulated,
                "/dev/kvm comes from kvm_pvm (no vmx/svm), which cannot boot a stock kernel".into(),
            ),
            (None, true) => (
                HostMode::Emulated,
                "/dev/kvm present but the CPU shows no vmx/svm".into(),
            ),
            (_, false) => (HostMode::Emulated, "no /dev/kvm on this machine".into()),
        }),
    }
}

/// Chooses the mode for this process: the probe plus `ZC_HOST`.
pub fn choose_here() -> Result<(HostMode, String), HostError> {
    let forced = std::env::var(FORCE_ENV).ok();
    choose(&probe(), forced.as_deref())
}

/// True when this process runs inside the emulated host.
pub fn inside_emulated_host() -> bool {
    std::env::var(INSIDE_EMULATED_ENV).is_ok_and(|v| v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn facts(dev_kvm: bool, hw: Option<&str>, pvm: bool) -> HostFacts {
        HostFacts {
            dev_kvm,
            hw_virt: hw.map(str::to_string),
            kvm_pvm: pvm,
        }
    }

    #[test]
    fn finds_virtualisation_flag() {
        let amd = "processor\t: 0\nflags\t\t: fpu vme svm sse\n";
        let intel = "flags\t: fpu vmx\nflags\t: fpu vmx\n";
        let none = "flags\t: fpu sse hypervisor\n";
        assert_eq!(hw_virt_flag(amd).as_deref(), Some("svm"));
        assert_eq!(hw_virt_flag(intel).as_deref(), Some("vmx"));
        assert_eq!(hw_virt_flag(none), None);
        assert_eq!(hw_virt_flag(""), None);
        // A flag that merely contains the letters does not count.
        assert_eq!(hw_virt_flag("flags: svm_lock vmx_ept\n"), None);
    }

    #[rstest]
    #[case(facts(true, Some("svm"), false), None, HostMode::Direct, "svm")]
    #[case(facts(true, None, true), None, HostMode::Emulated, "kvm_pvm")]
    #[case(facts(true, None, false), None, HostMode::Emulated, "no vmx/svm")]
    #[case(facts(false, None, false), None, HostMode::Emulated, "no /dev/kvm")]
    #[case(
        facts(true, None, true),
        Some("direct"),
        HostMode::Direct,
        "ZC_HOST=direct"
    )]
    #[case(
        facts(true, Some("vmx"), false),
        Some("emulated"),
        HostMode::Emulated,
        "ZC_HOST=emulated"
    )]
    #[case(facts(true, Some("vmx"), false), Some(""), HostMode::Direct, "vmx")]
    fn chooses_mode_with_a_reason(
        #[case] facts: HostFacts,
        #[case] forced: Option<&str>,
        #[case] mode: HostMode,
        #[case] reason_has: &str,
    ) {
        let (got, why) = choose(&facts, forced).unwrap();
        assert_eq!(got, mode);
        assert!(why.contains(reason_has), "{why:?}");
    }

    #[test]
    fn rejects_bad_forced_modes() {
        let f = facts(false, None, false);
        assert!(matches!(
            choose(&f, Some("direct")),
            Err(HostError::NoKvmForDirect)
        ));
        let err = choose(&f, Some("fast")).unwrap_err();
        assert!(err
            .to_string()
            .contains("ZC_HOST=direct or ZC_HOST=emulated"));
    }
}
