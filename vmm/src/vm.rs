//! The virtual machine: KVM VM and vCPUs, guest memory, the boot, and the run loop
//! that turns vCPU exits into device calls until the guest powers off, resets, or
//! runs out of time.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use zc_devices::console::{ConsoleSink, ConsoleTail};
use zc_devices::control::{ControlChannel, ControlMessage, ControlMessages};
use zc_protocol::Marker;

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, BootSpec, KernelFormat};
use crate::cpu;
use crate::dirty::{self, DirtySampler, PayloadIndex};
use crate::layout;
use crate::mmio::MmioBus;
use crate::pio::{LegacyIo, PioAction};
use crate::virtio;
use crate::virtio::SharedTransport;
use zc_devices::dma_log::DmaLog;
use zc_devices::net_peer::{
    Expectation, NetPeer, NetPeerConfig, Received, SocketPeer, DEFAULT_PORT,
};
use zc_devices::net_tap::TapBackend;
use zc_devices::pcap::PcapWriter;
use zc_devices::virtio::blk::{Block, BlockOptions};
use zc_devices::virtio::net::{Net, NetBackend, NetOptions};

/// How long a guest that reported its exit status gets to power off cleanly.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Errors building or starting the VM (what goes wrong while it runs is a
/// [`StopReason`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm ({0}): run as root or join the 'kvm' group; on a host without usable KVM use ZC_HOST=emulated")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mem_bytes} bytes of guest memory: {source}")]
    Memory {
        /// How much was asked for.
        mem_bytes: u64,
        /// Why.
        source: vm_memory::mmap::FromRangesError,
    },
    /// Bad memory size.
    #[error("guest memory of {0} bytes is too small; give at least 64M (--mem)")]
    MemoryTooSmall(u64),
    /// Bad vCPU count.
    #[error("--vcpus {0} is out of range: use 1 to 32")]
    VcpuCount(u8),
    /// Loading the kernel failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// Setting up a vCPU failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// The DMA log could not be created.
    #[error("DMA log: {0}")]
    DmaLog(zc_devices::dma_log::DmaLogError),
    /// The disk image could not be opened.
    #[error("disk: {0}")]
    Disk(zc_devices::virtio::blk::BlockError),
    /// A virtio device could not be attached.
    #[error(transparent)]
    Attach(#[from] virtio::AttachError),
    /// A host resource (eventfd, thread, console file) failed.
    #[error("{what}: {source}")]
    Host {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where the guest's console goes.
#[derive(Debug, Clone)]
pub enum ConsoleTarget {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

/// Everything needed to run a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where the console goes.
    pub console: ConsoleTarget,
    /// Give up after this long.
    pub timeout: Duration,
    /// The disk, if any (virtio-blk).
    pub disk: Option<DiskConfig>,
    /// Where the DMA descriptor log goes; `None` turns logging off.
    pub dma_log: Option<PathBuf>,
    /// Sample KVM's dirty-page log when the guest asks (`dirty.rs`); needs the DMA
    /// log (where samples go) and a peer expectation (what they look for). Off by
    /// default: write-protecting guest RAM slows every guest write.
    pub dirty_samples: bool,
    /// The network card, if any (virtio-net with the in-VMM TCP peer).
    pub net: Option<NetConfig>,
}

/// A virtio-net card whose other end is the TCP peer inside the VMM.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Offer checksum offload, so that Linux gives the card scatter-gather.
    pub sg: bool,
    /// Write every frame, both directions, to this pcap file.
    pub pcap: Option<PathBuf>,
    /// The files the guest will send, one per TCP connection, in order: the peer
    /// checks every byte against them. The first one is also what dirty-page samples
    /// look for (`dirty.rs`) when the DMA log is on.
    pub expect: Vec<PathBuf>,
    /// Each connection carries only this many bytes of its file (a prefix), not all.
    pub expect_bytes: Option<u64>,
    /// Use this host tap device instead of the peer (root only).
    pub tap: Option<String>,
    /// Address (and prefix length) for the host side of the tap, which is then
    /// brought up; with `expect`, the check listens there on the peer's port.
    pub tap_ip: Option<(Ipv4Addr, u8)>,
}

/// What the peer found for one TCP connection.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferResult {
    /// What was expected (the file), or "unexpected".
    pub label: String,
    /// Bytes received.
    pub bytes: u64,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// Throughput from first to last byte, in Mbit/s.
    pub mbps: Option<f64>,
}

/// A virtio-blk disk backed by a host file.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// Why the run ended.
#[derive(Debug, Clone, PartialEq)]
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
}

/// What happened in a run, for the caller to print and turn into an exit status.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Why it ended.
    pub stop: StopReason,
    /// The status the guest program reported with `exit`, if it did.
    pub guest_exit: Option<i32>,
    /// The guest kernel's release, from the guest's `hello`.
    pub kernel_release: Option<String>,
    /// Guest uptime when /init started, as the guest reported it.
    pub init_uptime: Option<f64>,
    /// Host time from the first vCPU entry to the guest's `hello`.
    pub time_to_init: Option<Duration>,
    /// Host time of the whole run.
    pub run_time: Duration,
    /// Every control message, in order, with its host time since start.
    pub messages: Vec<(Duration, ControlMessage)>,
    /// The console's last lines.
    pub console_tail: Vec<String>,
    /// The kernel image's format.
    pub kernel_format: KernelFormat,
    /// What the TCP peer received, one entry per connection.
    pub transfers: Vec<TransferResult>,
    /// Expected transfers that never arrived.
    pub missing_transfers: Vec<String>,
}

impl RunReport {
    /// The exit status the VMM should end with: the guest's own, when it reported one
    /// and then shut down; 1 for anything else, and for any transfer that lost data.
    pub fn exit_status(&self) -> i32 {
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
            return Some(format!(
                "the peer's check of {} failed: {}",
                bad.label,
                bad.failure.as_deref().unwrap_or("")
            ));
        }
        self.missing_transfers
            .first()
            .map(|label| format!("the peer never received {label}"))
    }

    /// One line saying why a run failed, or `None` when it succeeded.
    pub fn failure(&self) -> Option<String> {
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
        };
        Some(reason)
    }
}

/// What vCPU threads tell the run loop.
enum Event {
    Control(Instant, ControlMessage),
    Stop(StopReason),
}

/// Creates the VM, boots the guest and runs it to the end.
pub fn run(config: &VmConfig) -> Result<RunReport, VmError> {
    if config.mem_bytes < layout::MIN_MEM_BYTES {
        return Err(VmError::MemoryTooSmall(config.mem_bytes));
    }
    if config.vcpus == 0 || config.vcpus > 32 {
        return Err(VmError::VcpuCount(config.vcpus));
    }
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let mem =
        GuestMemoryMmap::from_ranges(&layout::ram_regions(config.mem_bytes)).map_err(|source| {
            VmError::Memory {
                mem_bytes: config.mem_bytes,
                source,
            }
        })?;
    // Dirty-page sampling needs the DMA log (where samples go) and a payload file
    // (what they look for).
    let payload = match (
        config.dma_log.as_ref().filter(|_| config.dirty_samples),
        config.net.as_ref().and_then(|n| n.expect.first()),
    ) {
        (Some(_), Some(path)) => Some(read_payload(
            path,
            config.net.as_ref().and_then(|n| n.expect_bytes),
        )?),
        _ => None,
    };
    register_memory(&vm, &mem, payload.is_some())?;
    let vm = Arc::new(vm);

    let loaded = boot::load(
        &mem,
        &BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &config.cmdline,
            mem_bytes: config.mem_bytes,
        },
    )?;
    let dma_log = match &config.dma_log {
        Some(path) => DmaLog::create(path).map_err(VmError::DmaLog)?,
        None => DmaLog::disabled(),
    };
    let mut mmio = MmioBus::default();
    let mut mmio_devices = Vec::new();
    if let Some(disk) = &config.disk {
        let options = BlockOptions {
            read_only: disk.read_only,
            ..BlockOptions::default()
        };
        let block = Block::open(&disk.path, options, dma_log.clone()).map_err(VmError::Disk)?;
        let slot = mmio_devices.len() as u32;
        let (_, info) = virtio::attach(&vm, &mem, &mut mmio, slot, block)?;
        mmio_devices.push(info);
    }
    let mut nic = None;
    let mut socket_peer = None;
    if let Some(net) = &config.net {
        let slot = mmio_devices.len() as u32;
        let timer_err = |source| VmError::Host {
            what: "cannot start the network timer thread",
            source,
        };
        match &net.tap {
            None => {
                let device = net_card(peer_backend(net)?, net, &dma_log)?;
                let (transport, info) = virtio::attach(&vm, &mem, &mut mmio, slot, device)?;
                mmio_devices.push(info);
                spawn_backend_timer(transport.clone()).map_err(timer_err)?;
                nic = Some(transport);
            }
            Some(name) => {
                let tap = TapBackend::open(name).map_err(|e| VmError::Host {
                    what: "cannot open the tap device",
                    source: std::io::Error::other(e.to_string()),
                })?;
                if let Some((ip, prefix)) = net.tap_ip {
                    tap.set_ipv4(ip, prefix)
                        .map_err(|e| net_err("cannot address the tap device")(&e))?;
                }
                socket_peer = socket_peer_for(net)?;
                let device = net_card(tap, net, &dma_log)?;
                let (transport, info) = virtio::attach(&vm, &mem, &mut mmio, slot, device)?;
                mmio_devices.push(info);
                spawn_backend_timer(transport).map_err(timer_err)?;
            }
        }
    }
    acpi::write_acpi_tables(
        &mem,
        GuestAddress(layout::RSDP_ADDR),
        GuestAddress(layout::ACPI_TABLES_START),
        GuestAddress(layout::BIOS_END),
        &AcpiConfig {
            vcpus: config.vcpus,
            mmio_devices,
        },
    )?;

    let console_out: Box<dyn Write + Send> = match &config.console {
        ConsoleTarget::Stdout => Box::new(std::io::stdout()),
        ConsoleTarget::File(path) => {
            Box::new(std::fs::File::create(path).map_err(|source| VmError::Host {
                what: "cannot create the console file",
                source,
            })?)
        }
    };
    let (console, tail) = ConsoleSink::new(console_out);
    let (control, messages) = ControlChannel::new();
    let legacy = LegacyIo::new(console, control).map_err(|source| VmError::Host {
        what: "cannot create device eventfds",
        source,
    })?;
    for (evt, gsi) in legacy.irq_lines() {
        vm.register_irqfd(evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    }

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        cpu::setup_vcpu(&kvm, &mem, &vcpu, id, config.vcpus, loaded.entry)?;
        vcpus.push(vcpu);
    }

    let sampler = payload.map(|payload| {
        DirtySampler::new(
            vm.clone(),
            mem.clone(),
            dirty::slots_of(&mem),
            PayloadIndex::new(Arc::new(payload)),
            dma_log.clone(),
        )
    });
    let devices = Devices {
        legacy: Mutex::new(legacy),
        mmio,
        messages,
        dma_log,
        sampler,
    };
    let mut report = run_vcpus(vcpus, devices, tail, config.timeout, loaded.format)?;
    if let Some(nic) = nic {
        collect_transfers(&nic, &mut report);
    }
    if let Some(peer) = socket_peer {
        collect_socket_transfers(&peer, &mut report);
    }
    Ok(report)
}

/// With the tap backend: the host-socket check of what the guest sends, on the
/// tap's address, if expectations were given.
fn socket_peer_for(config: &NetConfig) -> Result<Option<SocketPeer>, VmError> {
    if config.expect.is_empty() {
        return Ok(None);
    }
    let Some((ip, _)) = config.tap_ip else {
        return Err(net_err("cannot check transfers over a tap")(
            &"--peer-expect with --net tap needs --tap-ip (e.g. 10.0.2.2/24): the check listens on that address",
        ));
    };
    let peer = SocketPeer::listen(SocketAddrV4::new(ip, DEFAULT_PORT), expectations(config)?)
        .map_err(|e| net_err("cannot listen on the tap's address")(&e))?;
    Ok(Some(peer))
}

/// What the host socket received, and what it expected but never got.
fn collect_socket_transfers(peer: &SocketPeer, report: &mut RunReport) {
    // The guest waits for the count before it closes and powers off, so connections
    // are over by now but for the last FIN in flight.
    let (results, missing) = peer.finish(Duration::from_secs(2));
    report.transfers.extend(results.iter().map(transfer_result));
    report.missing_transfers.extend(missing);
}

fn transfer_result(received: &Received) -> TransferResult {
    TransferResult {
        label: received
            .expected
            .as_ref()
            .map(|e| e.label.clone())
            .unwrap_or_else(|| "an unexpected connection".into()),
        bytes: received.bytes,
        failure: received.failure.as_ref().map(|f| f.to_string()),
        mbps: received.throughput().map(|bps| bps * 8.0 / 1e6),
    }
}

/// The virtio-net device with the TCP peer behind it, told what to expect.
/// A host error from a device-side error that only has a message.
fn net_err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> VmError {
    move |e| VmError::Host {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// The TCP peer, told which files to expect.
fn peer_backend(config: &NetConfig) -> Result<NetPeer, VmError> {
    let mut peer = NetPeer::new(NetPeerConfig::default(), Instant::now())
        .map_err(|e| net_err("cannot start the TCP peer")(&e))?;
    for expectation in expectations(config)? {
        peer.expect(expectation);
    }
    Ok(peer)
}

/// What each of the guest's connections must carry, in order.
fn expectations(config: &NetConfig) -> Result<Vec<Expectation>, VmError> {
    let mut all = Vec::new();
    for path in &config.expect {
        let mut expectation = Expectation::of_file(path.display().to_string(), path)
            .map_err(|e| net_err("cannot read a file the peer is to expect")(&e))?;
        if let Some(bytes) = config.expect_bytes {
            if bytes > expectation.size {
                return Err(net_err("the peer cannot expect more than a whole file")(
                    &format!(
                        "{} has {} bytes, not {bytes}",
                        path.display(),
                        expectation.size
                    ),
                ));
            }
            expectation.size = bytes;
        }
        all.push(expectation);
    }
    Ok(all)
}

/// The virtio-net card in front of `backend`.
fn net_card<B: NetBackend>(
    backend: B,
    config: &NetConfig,
    log: &DmaLog,
) -> Result<Net<B>, VmError> {
    let options = NetOptions {
        sg: config.sg,
        ..NetOptions::default()
    };
    let mut device = Net::new(backend, options, log.clone())
        .map_err(|e| net_err("cannot create the network card")(&e))?;
    if let Some(path) = &config.pcap {
        device.set_pcap(
            PcapWriter::create(path).map_err(|e| net_err("cannot create the pcap file")(&e))?,
        );
    }
    Ok(device)
}

/// Runs the backend's timers (the peer's retransmits and delayed ACKs, the tap's
/// reads) when no guest frame does.
fn spawn_backend_timer<B: NetBackend + 'static>(
    nic: SharedTransport<Net<B>>,
) -> std::io::Result<()> {
    // Bounds on the sleep: short enough that a lost timer costs little, long
    // enough not to spin.
    const MIN: Duration = Duration::from_micros(200);
    const MAX: Duration = Duration::from_millis(20);
    thread::Builder::new()
        .name("net-timer".into())
        .spawn(move || loop {
            let delay = nic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .next_poll_delay(Instant::now())
                .unwrap_or(MAX)
                .clamp(MIN, MAX);
            thread::sleep(delay);
            nic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .poll_backend(Instant::now());
        })
        .map(drop)
}

/// What the peer received, and what it expected but never got.
fn collect_transfers(nic: &SharedTransport<Net<NetPeer>>, report: &mut RunReport) {
    let mut transport = nic.lock().unwrap_or_else(|e| e.into_inner());
    let device = transport.device_mut();
    if let Err(e) = device.flush_pcap() {
        eprintln!("zc-vmm: the pcap file is incomplete: {e}");
    }
    let peer = device.backend_mut();
    peer.finish(Instant::now());
    report
        .transfers
        .extend(peer.take_results().iter().map(transfer_result));
    report.missing_transfers = peer
        .pending_expectation_labels()
        .into_iter()
        .map(|label| label.to_string())
        .collect();
}

/// What the vCPU threads share: the devices they dispatch exits to, and where
/// control-channel messages and markers go.
struct Devices {
    legacy: Mutex<LegacyIo>,
    mmio: MmioBus,
    messages: ControlMessages,
    dma_log: DmaLog,
    /// Present when the run samples dirty pages (DMA log on, a file to look for).
    sampler: Option<DirtySampler>,
}

/// The first `limit` bytes (or all) of the payload file that dirty samples look for.
fn read_payload(path: &std::path::Path, limit: Option<u64>) -> Result<Vec<u8>, VmError> {
    let mut bytes = std::fs::read(path).map_err(|source| VmError::Host {
        what: "cannot read the payload file for dirty-page sampling",
        source,
    })?;
    if let Some(limit) = limit {
        bytes.truncate(limit as usize);
    }
    Ok(bytes)
}

/// Registers guest RAM with KVM; with `log_dirty`, KVM records the pages the guest
/// CPU writes (`dirty.rs`).
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM's
        // use of it: vCPUs only run inside `run`, while `mem` is borrowed.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Signal used to kick vCPU threads out of `KVM_RUN` at the end of a run.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn run_vcpus(
    vcpus: Vec<VcpuFd>,
    devices: Devices,
    tail: ConsoleTail,
    timeout: Duration,
    kernel_format: KernelFormat,
) -> Result<RunReport, VmError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick).map_err(|e| {
        VmError::Host {
            what: "cannot install the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        }
    })?;
    let devices = Arc::new(devices);
    let stopping = Arc::new(AtomicBool::new(false));
    let (events, inbox) = mpsc::channel();
    let started = Instant::now();
    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let devices = devices.clone();
        let events = events.clone();
        let stopping = stopping.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(vcpu, &devices, &events, &stopping))
            .map_err(|source| VmError::Host {
                what: "cannot start a vCPU thread",
                source,
            })?;
        threads.push(handle);
    }
    drop(events);

    let mut report = RunReport {
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
    };
    let mut deadline = started + timeout;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(wait) {
            Ok(Event::Control(at, message)) => {
                let since = at.duration_since(started);
                match &message {
                    ControlMessage::Hello { kernel_release } => {
                        report.kernel_release = Some(kernel_release.clone());
                        report.time_to_init = Some(since);
                    }
                    ControlMessage::Uptime { seconds } => report.init_uptime = Some(*seconds),
                    ControlMessage::Exit { code } => {
                        report.guest_exit = Some(*code);
                        deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
                    }
                    ControlMessage::Log { text } => eprintln!("guest: {text}"),
                    ControlMessage::Malformed { line } => {
                        eprintln!("zc-vmm: malformed control line from the guest: {line:?}")
                    }
                    ControlMessage::Mark { .. } | ControlMessage::Report { .. } => {}
                }
                report.messages.push((since, message));
            }
            Ok(Event::Stop(reason)) => {
                report.stop = reason;
                break;
            }
            Err(RecvTimeoutError::Timeout) => {
                report.stop = if report.guest_exit.is_some() {
                    StopReason::NoPowerOffAfterExit
                } else {
                    StopReason::Timeout
                };
                break;
            }
            Err(RecvTimeoutError::Disconnected) => {
                report.stop = StopReason::VcpuFailure("all vCPU threads ended".into());
                break;
            }
        }
    }
    report.run_time = started.elapsed();
    stop_vcpus(threads, &stopping);
    // Messages a vCPU parsed just before the stop (e.g. `exit` right before power-off).
    while let Ok(Event::Control(at, message)) = inbox.try_recv() {
        if let ControlMessage::Exit { code } = message {
            report.guest_exit = Some(code);
        }
        report.messages.push((at.duration_since(started), message));
    }
    report.console_tail = tail.lines();
    if let Err(e) = devices.dma_log.flush() {
        eprintln!("zc-vmm: the DMA log is incomplete: {e}");
    }
    Ok(report)
}

/// Asks every vCPU thread to leave `KVM_RUN` and waits for them.
fn stop_vcpus(threads: Vec<thread::JoinHandle<()>>, stopping: &AtomicBool) {
    stopping.store(true, Ordering::SeqCst);
    for handle in threads {
        // A signal can land just before the thread enters KVM_RUN and be lost, so
        // keep kicking until the thread has gone.
        let give_up = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < give_up {
            // SAFETY: the pthread handle is valid while `handle` is not joined, and
            // the kick signal has a no-op handler installed.
            unsafe {
                libc::pthread_kill(handle.as_pthread_t(), kick_signal());
            }
            thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
    }
}

fn vcpu_loop(
    mut vcpu: VcpuFd,
    devices: &Devices,
    events: &mpsc::Sender<Event>,
    stopping: &AtomicBool,
) {
    let stop = |reason| {
        let _ = events.send(Event::Stop(reason));
    };
    while !stopping.load(Ordering::SeqCst) {
        let exit = vcpu.run();
        let lock = || devices.legacy.lock().unwrap_or_else(|e| e.into_inner());
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => lock().read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                // Bound first: a guard in the match scrutinee would keep the port
                // devices locked through a dirty-page sample.
                let action = lock().write(port, data);
                match action {
                PioAction::Continue => {}
                PioAction::DirtySample(label) => {
                    if let Some(sampler) = &devices.sampler {
                        sampler.sample(label);
                    }
                }
                PioAction::ControlData => {
                    for message in devices.messages.drain() {
                        // Logged here, on the vCPU thread during the guest's port
                        // write, so the marker sits exactly between the DMA the
                        // guest started before it and after it.
                        if let ControlMessage::Mark { label } = &message {
                            devices.dma_log.marker(label);
                            if let Some(sampler) = &devices.sampler {
                                match Marker::parse(label) {
                                    Some(Marker::Begin(_)) => sampler.clear(),
                                    Some(Marker::End(_)) => sampler.sample(dirty::END_SAMPLE),
                                    None => {}
                                }
                            }
                        }
                        let _ = events.send(Event::Control(Instant::now(), message));
                    }
                }
                PioAction::Shutdown => return stop(StopReason::PowerOff),
                PioAction::Reset => return stop(StopReason::Reset),
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio.write(addr, data),
            // With the in-kernel irqchip KVM handles HLT itself; seeing it here means
            // the vCPU stopped for good.
            Ok(VcpuExit::Hlt) => return stop(StopReason::VcpuFailure("the vCPU halted".into())),
            Ok(VcpuExit::Shutdown) => return stop(StopReason::TripleFault(vcpu_state(&vcpu))),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return stop(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                    _ => StopReason::Reset,
                })
            }
            Ok(VcpuExit::InternalError) => {
                return stop(StopReason::VcpuFailure(
                    "KVM internal error (emulation failure); this KVM cannot run this guest, try ZC_HOST=emulated".into(),
                ))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return stop(StopReason::VcpuFailure(format!(
                    "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                )))
            }
            Ok(other) => {
                return stop(StopReason::VcpuFailure(format!(
                    "unexpected vCPU exit {other:?}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return stop(StopReason::VcpuFailure(format!("KVM_RUN failed: {e}"))),
        }
    }
}

/// The registers that tell where a guest died: enough to look the address up in the
/// guest kernel's `System.map` and to see whether its stack or page tables were sane.
fn vcpu_state(vcpu: &VcpuFd) -> String {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    match (regs, sregs) {
        // AMD's KVM reinitialises the vCPU on a shutdown intercept (the VMCB is
        // undefined after one), so the registers show the reset vector, not the fault.
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => {
            "where it faulted is lost: KVM had already reset the vCPU (it does on AMD)".into()
        }
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cs {:#x} idt {:#x}+{:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.cs.selector, s.idt.base, s.idt.limit
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(stop: StopReason, guest_exit: Option<i32>) -> RunReport {
        RunReport {
            stop,
            guest_exit,
            kernel_release: None,
            init_uptime: None,
            time_to_init: None,
            run_time: Duration::ZERO,
            messages: vec![],
            console_tail: vec![],
            kernel_format: KernelFormat::BzImage,
            transfers: vec![],
            missing_transfers: vec![],
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
}
