//! The seccomp filters of the VMM's threads ([`zc_seccomp`]): a forbidden call ends the
//! process with one clear line and exit status 159, and the roles whose code can run
//! outside a VM (the DMA log's writer and page pass, the socket peer) do their real
//! work under their filters. The vCPU role is exercised by the `/dev/kvm` tests
//! (tests/kvm.rs); the queue, timer, progress and main roles by booting.
//!
//! A filter cannot be taken off a thread, and a violation ends the process, so each
//! test runs itself again as a child process ([`in_child`]) and judges its output.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use zc_devices::dma_log::{DescInfo, DescRole, DeviceKind, Direction, DmaLog, DmaLogReader};
use zc_devices::net_peer::{Expectation, SocketPeer};
use zc_seccomp::Role;

/// Set in the child: run the test's body instead of judging a child.
const CHILD_ENV: &str = "ZC_SECCOMP_TEST_CHILD";

fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs test `name` of this binary again in a child process (where [`is_child`] is
/// true), with the filters' switch unset (on).
fn in_child(name: &str) -> Output {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .env_remove(zc_seccomp::ENV)
        .output()
        .expect("run the test binary again")
}

/// In the child: turns the filters on and runs `work` on a thread of `role`.
fn as_role(role: Role, work: impl FnOnce() + Send) {
    zc_seccomp::enable().expect("seccomp");
    std::thread::scope(|scope| {
        scope.spawn(|| {
            zc_seccomp::enter(role);
            work();
        });
    });
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The child died of its forbidden call: exit 159 and exactly `line` on stderr.
fn assert_stopped_with(out: &Output, line: &str) {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(zc_seccomp::EXIT_STATUS),
        "status {:?}, stderr:\n{err}",
        out.status
    );
    assert!(
        err.lines().any(|l| l == line),
        "no line {line:?} in stderr:\n{err}"
    );
}

#[test]
fn a_vcpu_thread_that_opens_a_socket_ends_the_process_with_one_line() {
    if is_child() {
        as_role(Role::Vcpu, || {
            // SAFETY: socket takes no pointers.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        return;
    }
    let out = in_child("a_vcpu_thread_that_opens_a_socket_ends_the_process_with_one_line");
    assert_stopped_with(
        &out,
        "zc-vmm: error: seccomp: the vcpu thread made a system call it is not allowed, \
         socket (41); stopping (exit 159). To run without seccomp for debugging: \
         --no-seccomp or ZC_SECCOMP=off",
    );
}

#[test]
fn a_vcpu_thread_may_run_kvm_but_not_create_a_vm() {
    if is_child() {
        as_role(Role::Vcpu, || {
            // SAFETY: KVM_CREATE_VM takes no pointer; on stdin it would fail anyway,
            // but the filter refuses it first.
            unsafe { libc::ioctl(0, 0xae01, 0) };
        });
        return;
    }
    let out = in_child("a_vcpu_thread_may_run_kvm_but_not_create_a_vm");
    assert_stopped_with(
        &out,
        "zc-vmm: error: seccomp: the vcpu thread made a system call it is not allowed, \
         ioctl (16) request 0xae01; stopping (exit 159). To run without seccomp for \
         debugging: --no-seccomp or ZC_SECCOMP=off",
    );
}

#[test]
fn the_dma_log_writer_may_not_start_a_program() {
    if is_child() {
        as_role(Role::DmaLogWriter, || {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: NUL-terminated path and argument and environment lists.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        });
        return;
    }
    let out = in_child("the_dma_log_writer_may_not_start_a_program");
    assert_stopped_with(
        &out,
        "zc-vmm: error: seccomp: the dma-log-writer thread made a system call it is not \
         allowed, execve (59); stopping (exit 159). To run without seccomp for \
         debugging: --no-seccomp or ZC_SECCOMP=off",
    );
}

#[test]
fn without_the_switch_nothing_is_filtered() {
    if is_child() {
        // `enter` without `enable` (what ZC_SECCOMP=off or --no-seccomp leaves).
        std::thread::scope(|scope| {
            scope.spawn(|| {
                zc_seccomp::enter(Role::Vcpu);
                // SAFETY: socket takes no pointers.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            });
        });
        return;
    }
    let out = in_child("without_the_switch_nothing_is_filtered");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A compressed log of disk reads from a stable file (the page pass runs over it)
/// and copied bytes, flushed and closed, all under the filters of the writer and
/// the page pass.
#[test]
fn the_dma_log_threads_do_their_work_under_their_filters() {
    if is_child() {
        zc_seccomp::enable().expect("seccomp");
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let bytes: Vec<u8> = (0..(4u32 << 20))
            .map(|i| (i * 7 + i / 4096).to_le_bytes()[0])
            .collect();
        std::fs::write(&image, &bytes).unwrap();
        let path = dir.path().join("log.jsonl.zst");
        let log = DmaLog::create(&path).unwrap();
        let file = std::fs::File::open(&image).unwrap();
        let stable = log.stable_file(&file).expect("a local file is stable");
        // Time for the page pass, so that later reads also take its table.
        std::thread::sleep(Duration::from_millis(300));
        let desc = |desc: u16, gpa: u64, len: u32, dir: Direction| DescInfo {
            device: DeviceKind::Blk,
            queue: 0,
            head: 0,
            desc,
            indirect: false,
            gpa,
            len,
            dir,
            role: DescRole::Data,
        };
        log.marker("BEGIN seccomp");
        for i in 0..64u16 {
            let off = u64::from(i) * 65536;
            log.descriptor_from_file(
                desc(i, 0x10_0000 + off, 65536, Direction::DeviceWrites),
                stable,
                off,
            );
            log.descriptor_bytes(
                desc(i, 0x20_0000 + off, 4096, Direction::DeviceReads),
                &bytes[..4096],
            );
        }
        log.marker("END seccomp");
        log.flush().expect("flush");
        drop(log);
        let mut records = 0;
        for record in DmaLogReader::open(&path).unwrap() {
            record.unwrap();
            records += 1;
        }
        assert!(records >= 130, "{records} records");
        return;
    }
    let out = in_child("the_dma_log_threads_do_their_work_under_their_filters");
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The tap backend's host-socket check: accepts a connection, checks every byte,
/// sends the count back, on its own thread and the connection's, under its filter.
#[test]
fn the_socket_peer_checks_a_connection_under_its_filter() {
    if is_child() {
        zc_seccomp::enable().expect("seccomp");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("payload");
        let bytes: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i * 13).to_le_bytes()[0])
            .collect();
        std::fs::write(&file, &bytes).unwrap();
        let expectation = Expectation::of_file("payload", &file).unwrap();
        let peer = SocketPeer::listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), vec![expectation])
            .unwrap();
        let mut stream = TcpStream::connect(peer.local_addr()).unwrap();
        stream.write_all(&bytes).unwrap();
        let mut count = [0u8; 8];
        stream.read_exact(&mut count).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let _ = stream.read(&mut [0u8; 1]);
        assert_eq!(u64::from_le_bytes(count), bytes.len() as u64);
        let (results, missing) = peer.finish(Duration::from_secs(10));
        assert!(missing.is_empty());
        assert_eq!(results.len(), 1);
        assert!(results[0].ok(), "{:?}", results[0].failure);
        return;
    }
    let out = in_child("the_socket_peer_checks_a_connection_under_its_filter");
    assert!(out.status.success(), "{}", stderr(&out));
}
