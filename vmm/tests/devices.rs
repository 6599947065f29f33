//! End-to-end tests of the device models with the real guest kernel: the guest
//! drives virtio-blk through its own driver, and the DMA log must show the
//! transfers. Run by `make test` (they need the images, hence `#[ignore]`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rstest::rstest;
use serde::Deserialize;
use zc_vmm::spec::{DiskSpec, NetBackendSpec, NicSpec, RunSpec, TapAddress};

mod common;
use common::Run;

use zc_dma_log::{read_log, BlkStatus, DescRole, Direction, Record, RequestDetail};
use zc_protocol::options::DEFAULT_FILE;
use zc_protocol::{Options, TestHook};

/// The guest options that run `step`, with the test disk read-only or not.
fn guest_options(step: TestHook, disk_read_only: bool) -> Options {
    Options {
        tests: vec![step],
        disk_read_only,
        ..Options::default()
    }
}

/// The `send:payload.bin` step.
fn send_payload_step() -> TestHook {
    TestHook::Send(DEFAULT_FILE.to_string())
}

fn images() -> PathBuf {
    common::images_with("guest/disk.img")
}

/// The test disk written and read back by the guest (`disk-roundtrip`), and the
/// scratch disk written by the guest (`scratch-copy:payload.bin`) and read back by
/// the host from the image: one boot, two virtio-blk disks, each in the DMA log as
/// its own card.
#[test]
#[ignore = "boots a real kernel: run with `make test`"]
fn guest_disk_roundtrip_is_in_the_dma_log() {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::copy(images.join("guest/disk.img"), &disk).unwrap();
    let payload = images.join("guest/disk-files").join(DEFAULT_FILE);
    let payload_len = std::fs::metadata(&payload).unwrap().len();
    let scratch = dir.path().join("scratch.img");
    zc_images::scratch::create(&scratch, zc_images::scratch::size_for(payload_len)).unwrap();
    let log_path = dir.path().join("dma.jsonl");
    let mut spec = common::guest_spec(&images, "guest/vmlinuz", dir.path());
    spec.disk = Some(DiskSpec {
        path: disk,
        read_only: false,
    });
    spec.scratch_disk = Some(scratch.clone());
    spec.outputs.dma_log = Some(log_path.clone());
    let options = Options {
        tests: vec![
            TestHook::DiskRoundtrip,
            TestHook::ScratchCopy(DEFAULT_FILE.to_string()),
        ],
        ..Options::default()
    };
    spec.append = Some(options.to_cmdline());
    let run = common::run_spec(&images, &spec, dir.path());
    assert_eq!(run.code(), 0);
    /// The guest's `disk-roundtrip` report.
    #[derive(Debug, Deserialize)]
    struct Roundtrip {
        ok: bool,
        bytes: u64,
    }
    let roundtrip: Roundtrip = run.summary().report("disk-roundtrip").unwrap();
    assert!(roundtrip.ok, "{roundtrip:?}");
    assert_eq!(roundtrip.bytes, 8 << 20);

    // The scratch disk as the host finds it: consistent, and the copy every byte
    // of the payload (the guest's fsync reached the image).
    zc_images::scratch::check(&scratch).unwrap();
    let copy = zc_images::scratch::compare(&scratch, DEFAULT_FILE, &payload, u64::MAX, dir.path())
        .unwrap();
    assert!(copy.identical(), "the scratch copy: {copy}");

    /// Bytes and FLUSHes of one disk (DMA log card).
    #[derive(Debug, Default)]
    struct Disk {
        written_to_guest: u64,
        read_from_guest: u64,
        flushes: u64,
    }
    let mut disks: [Disk; 2] = Default::default();
    let records = read_log(&log_path).expect("a readable DMA log");
    for record in &records {
        match record {
            Record::Desc(d) if d.role == DescRole::Data => {
                let disk = &mut disks[usize::from(d.card)];
                match d.dir {
                    Direction::DeviceWrites => disk.written_to_guest += u64::from(d.len),
                    Direction::DeviceReads => disk.read_from_guest += u64::from(d.len),
                }
            }
            Record::Request(r) => {
                if let RequestDetail::Blk(b) = &r.req {
                    assert_eq!(b.status, BlkStatus::Ok, "a failed request: {b:?}");
                    disks[usize::from(r.card)].flushes += u64::from(b.op == "flush");
                }
            }
            Record::DeviceError(e) => panic!("device error: {e:?}"),
            _ => {}
        }
    }
    let [test, scratch] = &disks;
    // The guest wrote 8 MiB (OUT: the device reads guest memory) and read it back
    // with a cold cache (IN: the device writes guest memory), plus file-system
    // metadata both ways; it read the payload from the test disk too.
    assert!(test.read_from_guest >= 8 << 20, "test disk: {test:?}");
    assert!(
        test.written_to_guest >= (8 << 20) + payload_len,
        "test disk: {test:?}"
    );
    assert!(
        test.flushes >= 1,
        "fsync must reach the device as FLUSH: {test:?}"
    );
    // The copy went to the scratch disk only, and its fsync too.
    assert!(
        scratch.read_from_guest >= payload_len,
        "scratch disk: {scratch:?}"
    );
    assert!(scratch.flushes >= 1, "scratch disk: {scratch:?}");
    assert!(
        scratch.written_to_guest < payload_len / 8,
        "the scratch disk is written, not read: {scratch:?}"
    );
    let disks = &run.summary().run.disks;
    assert_eq!(disks.len(), 2, "{disks:?}");
    assert!(!disks[1].read_only);
}

/// The default guest with the test disk read-only, sending `payload.bin` to a card
/// in front of `backend` that expects `expect`.
fn send_spec(images: &Path, dir: &Path, backend: NetBackendSpec, expect: &Path) -> RunSpec {
    RunSpec {
        disk: Some(DiskSpec {
            path: images.join("guest/disk.img"),
            read_only: true,
        }),
        nics: vec![NicSpec {
            backend,
            peer_expect: vec![expect.to_path_buf()],
            ..NicSpec::peer()
        }],
        append: Some(guest_options(send_payload_step(), true).to_cmdline()),
        ..common::guest_spec(images, "guest/vmlinuz", dir)
    }
}

/// Boots the guest with the disk (read-only) and the network card (scatter-gather
/// `sg`), sending `payload.bin` to the peer, which expects `expect`.
fn send_payload(sg: bool, expect: &Path, dir: &Path) -> (Run, PathBuf) {
    let images = images();
    let log_path = dir.join("dma.jsonl");
    let mut spec = send_spec(&images, dir, NetBackendSpec::Peer, expect);
    spec.nics[0].sg = sg;
    spec.nics[0].pcap = Some(dir.join("frames.pcap"));
    spec.outputs.dma_log = Some(log_path.clone());
    (common::run_spec(&images, &spec, dir), log_path)
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
    let tap = NetBackendSpec::Tap {
        name: "zctest%d".into(),
        address: Some(TapAddress {
            addr: std::net::Ipv4Addr::new(10, 0, 2, 2),
            prefix: 24,
        }),
    };
    let spec = send_spec(&images, dir.path(), tap, &payload);
    let run = common::run_spec(&images, &spec, dir.path());
    assert_eq!(run.code(), 0);
    let transfers = &run.summary().run.transfers;
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert!(transfers[0].ok());
    assert_eq!(transfers[0].bytes, size);
}

#[rstest]
#[case::scatter_gather_on(true)]
#[case::scatter_gather_off(false)]
#[ignore = "boots a real kernel: run with `make test`"]
fn guest_sends_a_file_and_the_peer_checks_every_byte(#[case] sg: bool) {
    let images = images();
    let payload = images.join("guest/disk-files/payload.bin");
    let size = std::fs::metadata(&payload).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let (run, log_path) = send_payload(sg, &payload, dir.path());
    assert_eq!(run.code(), 0);
    let summary = run.summary();
    let transfers = &summary.run.transfers;
    assert_eq!(transfers.len(), 1, "{transfers:?}");
    assert!(transfers[0].ok());
    assert_eq!(transfers[0].bytes, size);
    // The card's own counters saw the frames and their scatter-gather setting.
    let nic = &summary.run.nics[0];
    assert_eq!(nic.sg, sg);
    assert!(nic.stats.tx_bytes > size, "{nic:?}");
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
    if sg {
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
    let (run, _) = send_payload(true, &expect, dir.path());
    assert_eq!(run.code(), 1);
    assert!(!run.summary().run.transfers[0].ok());
    let stderr = run.stderr();
    let failed = stderr
        .lines()
        .find(|l| l.contains("FAILED"))
        .expect("a reason");
    assert!(failed.contains("byte offset 1000000"), "{failed}");
}
