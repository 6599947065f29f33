//! The transport must never change a verdict: `zc-vmm methods` runs sendfile and
//! mmap_zerocopy, with the NIC's scatter-gather on and off, once with the devices
//! behind virtio-mmio and once behind virtio-pci (MSI-X, ioeventfds on the notify
//! area), on the default guest kernel, and both must give the same verdict table,
//! every row PASS against `audit/expected.toml`. Run by `make test` (it needs the
//! images, hence `#[ignore]`).

mod common;

use std::path::Path;

use zc_vmm::report::RunSummary;
use zc_vmm::spec::Transport;

const METHODS: &str = "sendfile,mmap_zerocopy";
/// Enough chunks for the audit's ratios, little enough for a quick boot per transport.
const SIZE: &str = "4194304";

/// One row of the verdict table: method, NIC variant, verdict.
type Row = (String, String, String);

/// The rows of one `zc-vmm methods --transport` run, sorted, and the transport the
/// boot's run summary says it booted with.
fn verdicts(transport: &str) -> (Vec<Row>, Option<Transport>) {
    verdicts_of(&common::images_with("guest/vmlinuz"), transport)
}

/// The same, booting the kernel and initramfs in `kernel_images/guest/` (the test
/// disk and payload are always the default images').
fn verdicts_of(kernel_images: &Path, transport: &str) -> (Vec<Row>, Option<Transport>) {
    let out = tempfile::tempdir().unwrap();
    let output = common::methods(
        kernel_images,
        out.path(),
        &[
            "--transport",
            transport,
            "--methods",
            METHODS,
            "--sg-off-methods",
            METHODS,
            "--size",
            SIZE,
        ],
    );
    assert!(
        output.status.success(),
        "zc-vmm methods --transport {transport} failed ({}): a verdict differs from audit/expected.toml or a run failed",
        output.status
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("verdicts.json")).unwrap())
            .unwrap();
    let mut rows: Vec<Row> = json["methods"]
        .as_array()
        .expect("verdicts.json has methods")
        .iter()
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (field("method"), field("variant"), field("verdict"))
        })
        .collect();
    rows.sort();
    // One boot, both cards behind the same transport.
    let summary =
        RunSummary::load(&out.path().join("suite.run.json")).expect("the boot wrote its run.json");
    assert_eq!(summary.run.nics.len(), 2, "one card per variant");
    (rows, summary.transport)
}

/// sendfile and mmap_zerocopy, scatter-gather on and off, all PASS: what virtio-mmio
/// gives on the default kernel (checked by the test below).
fn all_pass() -> Vec<Row> {
    let mut rows = vec![];
    for method in ["mmap_zerocopy", "sendfile"] {
        for variant in ["sg-off", "sg-on"] {
            rows.push((method.to_string(), variant.to_string(), "PASS".to_string()));
        }
    }
    rows
}

#[test]
#[ignore = "boots a real kernel twice: run with `make test`"]
fn pci_gives_the_same_verdicts_as_mmio() {
    let (mmio, mmio_used) = verdicts("mmio");
    let (pci, pci_used) = verdicts("pci");
    assert_eq!(mmio_used, Some(Transport::Mmio));
    assert_eq!(pci_used, Some(Transport::Pci), "the PCI run booted on PCI");
    assert_eq!(mmio, all_pass(), "virtio-mmio rows");
    assert_eq!(
        pci, mmio,
        "virtio-pci must give the verdicts virtio-mmio gives"
    );
}

/// The kernel `make kernel` builds from Debian's linux-source (tinyconfig + zc's
/// fragment: virtio-pci, no virtio-mmio) must boot on PCI with `--transport auto`
/// and give the verdicts virtio-mmio gives on Debian's kernel.
#[test]
#[ignore = "boots the source-built kernel: run with `make test`"]
fn the_source_built_kernel_gives_the_same_verdicts_on_pci() {
    let dir = std::env::var_os("ZC_SOURCE_KERNEL_IMAGES").expect(
        "ZC_SOURCE_KERNEL_IMAGES: the source-built kernel's images (`make test` builds them with `make kernel`)",
    );
    let kernel_images = Path::new(&dir);
    assert!(
        kernel_images.join("guest/initrd.img").is_file(),
        "{}: no guest/initrd.img; run `make test`",
        kernel_images.display()
    );
    // `auto`: the kernel's config has VIRTIO_PCI and no VIRTIO_MMIO, so PCI.
    let (rows, used) = verdicts_of(kernel_images, "auto");
    assert_eq!(
        used,
        Some(Transport::Pci),
        "--transport auto chose PCI from the kernel's config"
    );
    assert_eq!(rows, all_pass(), "the source-built kernel's rows on PCI");
}
