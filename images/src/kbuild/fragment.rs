//! Kconfig fragments: parsing them, merging several, and checking that a final
//! `.config` kept every option they asked for.
//!
//! `make olddefconfig` silently drops an option whose dependencies are off (and
//! `merge_config.sh` only warns), so a fragment that names `CONFIG_VIRTIO_PCI=y` can
//! still produce a kernel without it. [`check`] turns every such drop into an error
//! that names the option, and [`kconfig_dependencies`] finds what it depends on.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The fragment zc's guest needs, with a comment per option saying why. It is the
/// checked-in file `images/kconfig/zc-guest.config`, compiled in so the binary is
/// self-contained.
pub const ZC_GUEST_FRAGMENT: &str = include_str!("../../kconfig/zc-guest.config");

/// The name [`ZC_GUEST_FRAGMENT`] goes by in messages and build descriptions.
pub const ZC_GUEST_FRAGMENT_NAME: &str = "zc-guest.config";

/// Options a tinyconfig build turns off after [`ZC_GUEST_FRAGMENT`]: big subsystems
/// that become visible, and default to y, once the guest's options are on (IPv6,
/// input and VT, ACPI devices zc-vmm does not have...). Build time, not a
/// requirement: `images/kconfig/zc-trim.config`.
pub const ZC_TRIM_FRAGMENT: &str = include_str!("../../kconfig/zc-trim.config");

/// The name [`ZC_TRIM_FRAGMENT`] goes by.
pub const ZC_TRIM_FRAGMENT_NAME: &str = "zc-trim.config";

/// The value of one option, as a `.config` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `# CONFIG_X is not set` (or the option is absent: invisible, so off).
    Unset,
    /// `CONFIG_X=<value>`: `y`, `m`, a number or a quoted string, verbatim.
    Value(String),
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Unset => f.write_str("is not set"),
            Setting::Value(v) => write!(f, "={v}"),
        }
    }
}

/// One `CONFIG_` line of a fragment or `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOption {
    /// The full name, with its `CONFIG_` prefix.
    pub name: String,
    /// What it is set to.
    pub setting: Setting,
}

impl fmt::Display for ConfigOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.setting {
            Setting::Unset => write!(f, "# {} is not set", self.name),
            Setting::Value(v) => write!(f, "{}={v}", self.name),
        }
    }
}

/// A line of a fragment that is neither a setting nor a comment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin} line {line}: {text:?} is not a Kconfig setting (CONFIG_X=y, `# CONFIG_X is not set` or a # comment)")]
pub struct FragmentSyntaxError {
    /// The fragment's name or path.
    pub origin: String,
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
}

fn valid_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty()
            && rest.bytes().all(|b| {
                b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b.is_ascii_lowercase()
            })
    })
}

/// Parses one line: `Ok(None)` for blank lines and comments.
fn parse_line(line: &str) -> Result<Option<ConfigOption>, ()> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    if let Some(comment) = line.strip_prefix('#') {
        let unset = comment
            .trim()
            .strip_suffix(" is not set")
            .filter(|name| valid_name(name));
        return Ok(unset.map(|name| ConfigOption {
            name: name.to_string(),
            setting: Setting::Unset,
        }));
    }
    match line.split_once('=') {
        Some((name, value)) if valid_name(name) && !value.is_empty() => Ok(Some(ConfigOption {
            name: name.to_string(),
            setting: Setting::Value(value.to_string()),
        })),
        _ => Err(()),
    }
}

/// Parses a fragment strictly: every line is a setting, a comment or blank.
pub fn parse_fragment(text: &str, origin: &str) -> Result<Vec<ConfigOption>, FragmentSyntaxError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        match parse_line(line) {
            Ok(Some(option)) => out.push(option),
            Ok(None) => {}
            Err(()) => {
                return Err(FragmentSyntaxError {
                    origin: origin.to_string(),
                    line: i + 1,
                    text: line.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Parses a `.config` (leniently: lines that are not settings are skipped) into
/// name -> setting.
pub fn parse_config(text: &str) -> BTreeMap<String, Setting> {
    text.lines()
        .filter_map(|l| parse_line(l).ok().flatten())
        .map(|o| (o.name, o.setting))
        .collect()
}

/// What several fragments ask for together, as `merge_config.sh` merges them: a
/// later fragment's value for an option replaces an earlier one; the order is that
/// of each option's first appearance.
pub fn merge(fragments: &[Vec<ConfigOption>]) -> Vec<ConfigOption> {
    let mut out: Vec<ConfigOption> = Vec::new();
    for option in fragments.iter().flatten() {
        match out.iter_mut().find(|o| o.name == option.name) {
            Some(existing) => existing.setting = option.setting.clone(),
            None => out.push(option.clone()),
        }
    }
    out
}

/// An option the final `.config` does not have as requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// What the fragments asked for.
    pub requested: ConfigOption,
    /// What the `.config` has (`Unset` when the option is absent).
    pub actual: Setting,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} was asked for, but after `make olddefconfig` the .config has {}",
            self.requested,
            ConfigOption {
                name: self.requested.name.clone(),
                setting: self.actual.clone(),
            }
        )
    }
}

/// Every requested option whose final value differs. An option requested unset is
/// kept when the `.config` has it unset or not at all.
pub fn check(requested: &[ConfigOption], config: &BTreeMap<String, Setting>) -> Vec<Dropped> {
    requested
        .iter()
        .filter_map(|want| {
            let actual = config.get(&want.name).cloned().unwrap_or(Setting::Unset);
            (actual != want.setting).then(|| Dropped {
                requested: want.clone(),
                actual,
            })
        })
        .collect()
}

/// Where an option is defined in a kernel tree and what it `depends on`, for the
/// message of a dropped option: the first `config NAME` / `menuconfig NAME` entry
/// in the tree's `Kconfig*` files (x86's own and the generic ones; other
/// architectures are skipped), with its `depends on` lines.
pub fn kconfig_dependencies(tree: &Path, name: &str) -> Option<(PathBuf, Vec<String>)> {
    let symbol = name.strip_prefix("CONFIG_").unwrap_or(name);
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for path in entries {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                let skip = file_name.starts_with('.')
                    || (dir.ends_with("arch") && file_name != "x86")
                    || matches!(file_name, "Documentation" | "tools" | "samples" | "scripts");
                if !skip {
                    stack.push(path);
                }
            } else if file_name.starts_with("Kconfig") {
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                if let Some(deps) = dependencies_in(&text, symbol) {
                    let rel = path.strip_prefix(tree).unwrap_or(&path).to_path_buf();
                    return Some((rel, deps));
                }
            }
        }
    }
    None
}

/// The `depends on` lines of `config <symbol>` in one Kconfig file, if it defines it.
pub fn dependencies_in(kconfig: &str, symbol: &str) -> Option<Vec<String>> {
    let mut lines = kconfig.lines();
    while let Some(line) = lines.next() {
        let head = line.trim();
        let defined = ["config ", "menuconfig "]
            .iter()
            .any(|kw| head.strip_prefix(kw).map(str::trim) == Some(symbol));
        if !defined {
            continue;
        }
        let mut deps = Vec::new();
        for body in lines.by_ref() {
            let t = body.trim();
            let entry_ended = !body.starts_with([' ', '\t']) && !t.is_empty();
            // Help text may say "depends on" too; the attributes come before it.
            if entry_ended || t == "help" || t == "---help---" {
                break;
            }
            if let Some(dep) = t.strip_prefix("depends on") {
                deps.push(dep.trim().to_string());
            }
        }
        return Some(deps);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &str, setting: Setting) -> ConfigOption {
        ConfigOption {
            name: name.into(),
            setting,
        }
    }
    fn y(name: &str) -> ConfigOption {
        opt(name, Setting::Value("y".into()))
    }

    #[test]
    fn zc_fragment_parses_and_asks_for_pci_without_mmio() {
        let options = parse_fragment(ZC_GUEST_FRAGMENT, ZC_GUEST_FRAGMENT_NAME).unwrap();
        for needed in [
            "CONFIG_64BIT",
            "CONFIG_PCI",
            "CONFIG_PCI_MSI",
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_EXT4_FS",
            "CONFIG_IO_URING",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_RD_GZIP",
            "CONFIG_X86_IOPL_IOPERM",
            "CONFIG_ACPI",
        ] {
            assert!(options.contains(&y(needed)), "{needed} missing");
        }
        assert!(options.contains(&opt("CONFIG_VIRTIO_MMIO", Setting::Unset)));
        // Every option once: a fragment that sets something twice is a mistake.
        let mut names: Vec<&str> = options.iter().map(|o| o.name.as_str()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn the_trim_fragment_only_turns_off_what_the_guest_does_not_ask_for() {
        let guest = parse_fragment(ZC_GUEST_FRAGMENT, ZC_GUEST_FRAGMENT_NAME).unwrap();
        let trim = parse_fragment(ZC_TRIM_FRAGMENT, ZC_TRIM_FRAGMENT_NAME).unwrap();
        assert!(trim.iter().any(|o| o.name == "CONFIG_IPV6"));
        for o in &trim {
            assert_eq!(
                o.setting,
                Setting::Unset,
                "{o}: the trim fragment never turns on"
            );
            assert!(
                guest.iter().all(|g| g.name != o.name),
                "{o} is also in the guest's fragment"
            );
        }
    }

    #[test]
    fn parses_settings_comments_and_rejects_garbage() {
        let text = "## why\n# a plain comment\nCONFIG_A=y\n  CONFIG_B=m\n# CONFIG_C is not set\nCONFIG_S=\"-zc\"\nCONFIG_N=4\n\n";
        assert_eq!(
            parse_fragment(text, "f").unwrap(),
            [
                y("CONFIG_A"),
                opt("CONFIG_B", Setting::Value("m".into())),
                opt("CONFIG_C", Setting::Unset),
                opt("CONFIG_S", Setting::Value("\"-zc\"".into())),
                opt("CONFIG_N", Setting::Value("4".into())),
            ]
        );
        for bad in [
            "VIRTIO=y",
            "CONFIG_A",
            "CONFIG_=y",
            "CONFIG_A=",
            "CONFIG A=y",
        ] {
            let e = parse_fragment(&format!("CONFIG_OK=y\n{bad}\n"), "frag.config").unwrap_err();
            assert_eq!(e.line, 2, "{bad}");
            assert!(e.to_string().contains("frag.config line 2"), "{e}");
        }
    }

    #[test]
    fn later_fragments_override_earlier_ones_in_first_appearance_order() {
        let zc = vec![
            y("CONFIG_A"),
            opt("CONFIG_MMIO", Setting::Unset),
            y("CONFIG_B"),
        ];
        let user = vec![y("CONFIG_MMIO"), y("CONFIG_C")];
        assert_eq!(
            merge(&[zc, user]),
            [
                y("CONFIG_A"),
                y("CONFIG_MMIO"),
                y("CONFIG_B"),
                y("CONFIG_C")
            ]
        );
    }

    /// A fake olddefconfig result: VIRTIO_PCI dropped (PCI off), MMIO absent,
    /// EXT4 built as a module, the rest kept.
    const FINAL_CONFIG: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
# CONFIG_PCI is not set
CONFIG_VIRTIO=y
CONFIG_EXT4_FS=m
CONFIG_LOCALVERSION=\"-zc\"
";

    #[test]
    fn an_option_dropped_by_olddefconfig_is_named() {
        let requested = parse_fragment(
            "CONFIG_64BIT=y\nCONFIG_VIRTIO_PCI=y\n# CONFIG_VIRTIO_MMIO is not set\nCONFIG_EXT4_FS=y\nCONFIG_LOCALVERSION=\"-zc\"\n# CONFIG_PCI is not set\n",
            "t",
        )
        .unwrap();
        let dropped = check(&requested, &parse_config(FINAL_CONFIG));
        assert_eq!(
            dropped,
            [
                Dropped {
                    requested: y("CONFIG_VIRTIO_PCI"),
                    actual: Setting::Unset
                },
                Dropped {
                    requested: y("CONFIG_EXT4_FS"),
                    actual: Setting::Value("m".into())
                },
            ]
        );
        assert_eq!(
            dropped[0].to_string(),
            "CONFIG_VIRTIO_PCI=y was asked for, but after `make olddefconfig` the .config has # CONFIG_VIRTIO_PCI is not set"
        );
        assert!(dropped[1].to_string().contains("CONFIG_EXT4_FS=m"));
        // An option asked to be unset but turned on is dropped too.
        let d = check(
            &[opt("CONFIG_VIRTIO", Setting::Unset)],
            &parse_config(FINAL_CONFIG),
        );
        assert_eq!(d.len(), 1);
        assert!(d[0]
            .to_string()
            .starts_with("# CONFIG_VIRTIO is not set was asked for"));
    }

    #[test]
    fn finds_what_an_option_depends_on() {
        let kconfig = "\
menuconfig VIRTIO_MENU
\tbool \"Virtio drivers\"
\tdefault y

config VIRTIO_PCI_LIB
\ttristate
\thelp
\t  depends on nothing here: this is help text of another entry

config VIRTIO_PCI
\ttristate \"PCI driver for virtio devices\"
\tdepends on PCI
\tdepends on !FOO || BAR
\tselect VIRTIO
\thelp
\t  Text that depends on nothing.

config VIRTIO_PCI_LEGACY
\tbool
";
        assert_eq!(
            dependencies_in(kconfig, "VIRTIO_PCI").unwrap(),
            ["PCI", "!FOO || BAR"]
        );
        assert_eq!(
            dependencies_in(kconfig, "VIRTIO_MENU").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(dependencies_in(kconfig, "VIRTIO"), None);

        let tree = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let p = tree.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        put("drivers/virtio/Kconfig", kconfig);
        put(
            "arch/arm64/Kconfig",
            "config VIRTIO_PCI\n\tdepends on ARM64\n",
        );
        put(
            "arch/x86/Kconfig",
            "config PCI_MMCONFIG\n\tdepends on PCI && ACPI\n",
        );
        let (file, deps) = kconfig_dependencies(tree.path(), "CONFIG_VIRTIO_PCI").unwrap();
        assert_eq!(file, PathBuf::from("drivers/virtio/Kconfig"));
        assert_eq!(deps, ["PCI", "!FOO || BAR"]);
        let (file, deps) = kconfig_dependencies(tree.path(), "CONFIG_PCI_MMCONFIG").unwrap();
        assert_eq!(file, PathBuf::from("arch/x86/Kconfig"));
        assert_eq!(deps, ["PCI && ACPI"]);
        assert_eq!(kconfig_dependencies(tree.path(), "CONFIG_NOPE"), None);
    }
}
