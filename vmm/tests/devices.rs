//! End-to-end tests of the device models with the real guest kernel: the guest
//! drives virtio-blk through its own driver, and the DMA log must show the
//! transfers. Run by `make test` (they need the images, hence `#[ignore]`).

use std::path::PathBuf;
use std::process::Command;

use zc_devices::dma_log::{read_log, BlkStatus, DescRole, Direction, Record, RequestDetail};

fn images() -> PathBuf {
    let dir = std::env::var_os("ZC_IMAGES")
        .map(PathBuf::from)
        .expect("ZC_IMAGES is not set: run these tests with `make test`");
    assert!(
        dir.join("guest/disk.img").is_file(),
        "{} has no guest/disk.img: run `make images`",
        dir.display()
    );
    dir
}

#[test]
#[ignore = "boots a real kernel: run with `make test`"]
fn guest_disk_roundtrip_is_in_the_dma_log() {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::copy(images.join("guest/disk.img"), &disk).unwrap();
    let log_path = dir.path().join("dma.jsonl");
    let report_path = dir.path().join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_zc-vmm"))
        .arg("run")
        .arg("--kernel")
        .arg(images.join("guest/vmlinuz"))
        .arg("--initrd")
        .arg(images.join("guest/initrd.img"))
        .arg("--disk")
        .arg(&disk)
        .arg("--dma-log")
        .arg(&log_path)
        .arg("--report-json")
        .arg(&report_path)
        .args(["--append", "zc.test=disk-roundtrip"])
        .env("ZC_HOST_KERNEL", images.join("host/vmlinuz"))
        .env("ZC_HOST_INITRD", images.join("host/initrd.img"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let roundtrip = report["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["test"] == "disk-roundtrip")
        .expect("a disk-roundtrip report");
    assert_eq!(roundtrip["ok"], true, "{roundtrip}");
    assert_eq!(roundtrip["bytes"], 8 << 20);

    let records = read_log(&log_path).expect("a readable DMA log");
    let (mut written_to_guest, mut read_from_guest) = (0u64, 0u64);
    let mut flushes = 0;
    for record in &records {
        match record {
            Record::Desc(d) if d.role == DescRole::Data => match d.dir {
                Direction::DeviceWrites => written_to_guest += u64::from(d.len),
                Direction::DeviceReads => read_from_guest += u64::from(d.len),
            },
            Record::Request(r) => {
                if let RequestDetail::Blk(b) = &r.req {
                    assert_eq!(b.status, BlkStatus::Ok, "a failed request: {b:?}");
                    flushes += u64::from(b.op == "flush");
                }
            }
            Record::DeviceError(e) => panic!("device error: {e:?}"),
            _ => {}
        }
    }
    // The guest wrote 8 MiB (OUT: the device reads guest memory) and read it back
    // with a cold cache (IN: the device writes guest memory), plus file-system
    // metadata both ways.
    assert!(read_from_guest >= 8 << 20, "OUT bytes {read_from_guest}");
    assert!(written_to_guest >= 8 << 20, "IN bytes {written_to_guest}");
    assert!(flushes >= 1, "fsync must reach the device as FLUSH");
}
