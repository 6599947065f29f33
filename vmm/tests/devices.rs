//! End-to-end tests of the device models with the real guest kernel: the guest
//! drives virtio-blk through its own driver, and the DMA log must show the
//! transfers. Run by `make test` (they need the images, hence `#[ignore]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use rstest::rstest;

mod common;

use zc_dma_log::{read_log, BlkStatus, DescRole, Direction, Record, RequestDetail};

fn images() -> PathBuf {
    common::images_with("guest/disk.img")
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
    let output = common::zc_vmm_run(&images, "guest/vmlinuz")
        .arg("--disk")
        .arg(&disk)
        .arg("--dma-log")
        .arg(&log_path)
        .arg("--report-json")
        .arg(&report_path)
        .args(["--append", "zc.test=disk-roundtrip"])
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

/// Boots the guest with the disk (read-only) and the network card, sending
/// `payload.bin` to the peer, which expects `expect`.
fn send_payload(sg: &str, expect: &Path, dir: &Path) -> (Output, PathBuf, serde_json::Value) {
    let images = images();
    let log_path = dir.join("dma.jsonl");
    let report_path = dir.join("report.json");
    let output = common::zc_vmm_run(&images, "guest/vmlinuz")
        .arg("--disk")
        .arg(images.join("guest/disk.img"))
        .arg("--disk-ro")
        .args(["--net", "peer", "--net-sg", sg, "--peer-expect"])
        .arg(expect)
        .arg("--pcap")
        .arg(dir.join("frames.pcap"))
        .arg("--dma-log")
        .arg(&log_path)
        .arg("--report-json")
        .arg(&report_path)
        .args(["--append", "zc.disk=ro zc.test=send:payload.bin"])
        .output()
        .unwrap();
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    (output, log_path, report)
}

/// The tap backend end to end: the guest's TCP stream leaves through a real tap
/// device and reaches the host's own TCP stack, where zc-vmm (which addressed the tap)
/// checks every byte. In emulated mode the tap is inside the emulated host.
#[test]
#[ignore = "boots a real kernel: run with `make test`"]
fn tap_backend_carries_a_transfer_to_the_host_tcp_stack() {
    // A tap needs root on a direct host (zc-vmm then says so in one line); in
    // emulated mode zc-vmm is root inside the emulated host whoever runs the test.
    let images = images();
    let payload = images.join("guest/disk-files/payload.bin");
    let size = std::fs::metadata(&payload).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let output = common::zc_vmm_run(&images, "guest/vmlinuz")
        .arg("--disk")
        .arg(images.join("guest/disk.img"))
        .arg("--disk-ro")
        .args([
            "--net",
            "tap",
            "--tap",
            "zctest%d",
            "--tap-ip",
            "10.0.2.2/24",
        ])
        .arg("--peer-expect")
        .arg(&payload)
        .arg("--report-json")
        .arg(&report_path)
        .args(["--append", "zc.disk=ro zc.test=send:payload.bin"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("--- stderr\n{stderr}");
    assert_eq!(output.status.code(), Some(0));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let transfers = report["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(transfers[0]["ok"], true);
    assert_eq!(transfers[0]["bytes"], size);
}

#[rstest]
#[case::scatter_gather_on("on")]
#[case::scatter_gather_off("off")]
#[ignore = "boots a real kernel: run with `make test`"]
fn guest_sends_a_file_and_the_peer_checks_every_byte(#[case] sg: &str) {
    let images = images();
    let payload = images.join("guest/disk-files/payload.bin");
    let size = std::fs::metadata(&payload).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let (output, log_path, report) = send_payload(sg, &payload, dir.path());
    assert_eq!(output.status.code(), Some(0));
    let transfers = report["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert_eq!(transfers[0]["ok"], true);
    assert_eq!(transfers[0]["bytes"], size);
    assert!(dir.path().join("frames.pcap").metadata().unwrap().len() > size);

    // The card read every payload byte from guest memory (plus headers), and the
    // way Linux handed the frames over shows the offered features: with
    // scatter-gather a frame's payload comes in page fragments apart from its
    // headers; without it every frame is one linear buffer.
    let records = read_log(&log_path).unwrap();
    let mut tx_bytes = 0u64;
    let mut data_descs_per_chain: HashMap<(u64, u16), u32> = HashMap::new();
    let mut chain = 0u64;
    for record in &records {
        match record {
            Record::Desc(d) if d.queue == 1 && d.dir == Direction::DeviceReads => {
                tx_bytes += u64::from(d.len);
                if d.role == DescRole::Data {
                    *data_descs_per_chain.entry((chain, d.head)).or_default() += 1;
                }
            }
            // A request record closes a chain; heads are reused, so count chains.
            Record::Request(r) if r.queue == 1 => chain += 1,
            Record::DeviceError(e) => panic!("device error: {e:?}"),
            _ => {}
        }
    }
    assert!(tx_bytes > size, "the card read {tx_bytes} bytes for {size}");
    let chains = data_descs_per_chain.len() as f64;
    let mean = data_descs_per_chain
        .values()
        .map(|n| f64::from(*n))
        .sum::<f64>()
        / chains;
    if sg == "on" {
        assert!(
            mean > 1.2,
            "scatter-gather on, yet {mean:.2} data buffers per frame"
        );
    } else {
        assert_eq!(
            mean, 1.0,
            "scatter-gather off, yet {mean:.2} data buffers per frame"
        );
    }
}

#[test]
#[ignore = "boots a real kernel: run with `make test`"]
fn a_changed_byte_fails_the_run() {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let mut altered = std::fs::read(images.join("guest/disk-files/payload.bin")).unwrap();
    altered[1_000_000] ^= 0x55;
    let expect = dir.path().join("altered.bin");
    std::fs::write(&expect, &altered).unwrap();
    let (output, _, report) = send_payload("on", &expect, dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(report["transfers"][0]["ok"], false);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let failed = stderr
        .lines()
        .find(|l| l.contains("FAILED"))
        .expect("a reason");
    assert!(failed.contains("byte offset 1000000"), "{failed}");
}
