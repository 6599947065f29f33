//! The virtual machine: assembled by a [`VmBuilder`] from a [`RunSpec`] (KVM VM and
//! guest memory, then one `attach_*` call per device, then the boot), and run by
//! [`Vm::run`], whose loop turns vCPU exits into device calls until the guest powers
//! off, resets, or runs out of time.

use std::io::Write;
use std::net::SocketAddrV4;
use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use zc_devices::console::{ConsoleSink, ConsoleTail};
use zc_devices::control::{ControlChannel, ControlMessage, ControlMessages};
use zc_devices::dma_log::DmaLog;
use zc_devices::net_peer::{
    Expectation, NetPeer, NetPeerConfig, Offer, Received, Sent, SocketPeer, DEFAULT_PORT,
};
use zc_devices::net_tap::TapBackend;
use zc_devices::pcap::PcapWriter;
use zc_devices::pci::bus::PciBus;
use zc_devices::virtio::blk::{Block, BlockOptions};
use zc_devices::virtio::net::{Net, NetBackend, NetOptions};
use zc_devices::virtio::VirtioDevice;
use zc_protocol::disk::{SCRATCH_DISK_CARD, TEST_DISK_CARD};
use zc_protocol::Marker;

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, BootSpec, KernelFormat};
use crate::cpu;
use crate::dirty::{self, DirtySampler, PayloadIndex};
use crate::exits::{ExitCounters, ExitMap, ExitTarget};
use crate::layout;
use crate::mmio::MmioBus;
use crate::pci::{PciMmioWindow, PciState};
use crate::pio::{LegacyIo, PioAction};
use crate::progress::PeerProgress;
use crate::report::{
    Direction, DiskSummary, NetBackendKind, NicSummary, RunReport, StopReason, TimedMessage,
    TransferResult, POWEROFF_GRACE,
};
use crate::spec::{DiskSpec, NetBackendSpec, NicSpec, RunSpec, SpecError, TapAddress, Transport};
use crate::virtio::{self, DeviceHandle, SlotAllocator};
use zc_protocol::addr::Card;

/// Errors building or starting the VM (what goes wrong while it runs is a
/// [`StopReason`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The spec has a mistake a user must fix.
    #[error(transparent)]
    Spec(#[from] SpecError),
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

/// A host error from a device-side error that only has a message.
fn net_err(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> VmError {
    move |e| VmError::Host {
        what,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Creates the VM `spec` describes, boots the guest and runs it to the end.
pub fn run(spec: &RunSpec) -> Result<RunReport, VmError> {
    let mut builder = VmBuilder::new(spec)?;
    if let Some(disk) = &spec.disk {
        builder.attach_disk(disk, TEST_DISK_CARD)?;
    }
    if let Some(scratch) = &spec.scratch_disk {
        let scratch = DiskSpec {
            path: scratch.clone(),
            read_only: false,
        };
        builder.attach_disk(&scratch, SCRATCH_DISK_CARD)?;
    }
    for nic in &spec.nics {
        builder.attach_nic(nic)?;
    }
    builder.build()?.run()
}

/// A VM being assembled: KVM and guest memory are set up; devices are attached one
/// call each, in the order the guest will number them; [`VmBuilder::build`] loads the
/// kernel and describes the devices to the guest.
pub struct VmBuilder<'a> {
    spec: &'a RunSpec,
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    dma_log: DmaLog,
    /// What dirty-page samples look for, when the run samples.
    payload: Option<Vec<u8>>,
    mmio: MmioBus,
    /// virtio-mmio slots (with the MMIO transport).
    slots: SlotAllocator,
    /// The PCI bus and its placement (with the PCI transport).
    pci: Option<PciState>,
    nics: Vec<AttachedNic>,
    /// Each disk, and whether it is read-only, for its counters at the end.
    disks: Vec<(bool, DeviceHandle<Block>)>,
    /// The cards whose checking peers' bytes per method are counted live.
    progress: Vec<DeviceHandle<Net<NetPeer>>>,
    /// Which device each register window belongs to, for the exit counters.
    exit_map: ExitMap,
}

impl<'a> VmBuilder<'a> {
    /// Checks `spec` ([`RunSpec::validate`]), creates the KVM VM with its interrupt
    /// controller and timer, and registers guest memory.
    pub fn new(spec: &'a RunSpec) -> Result<Self, VmError> {
        spec.validate()?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = create_vm(&kvm)?;
        let mem = GuestMemoryMmap::from_ranges(&layout::ram_regions(spec.mem_bytes)).map_err(
            |source| VmError::Memory {
                mem_bytes: spec.mem_bytes,
                source,
            },
        )?;
        let payload = match spec.dirty_sample_payload() {
            Some((path, limit)) => Some(read_payload(path, limit)?),
            None => None,
        };
        register_memory(&vm, &mem, payload.is_some())?;
        let dma_log = match &spec.outputs.dma_log {
            Some(path) => DmaLog::create(path).map_err(VmError::DmaLog)?,
            None => DmaLog::disabled(),
        };
        let vm = Arc::new(vm);
        let mut mmio = MmioBus::default();
        let mut exit_map = ExitMap::default();
        let pci = match spec.transport().0 {
            Transport::Mmio => None,
            Transport::Pci => {
                let pci = PciState::new(vm.clone());
                let window = PciMmioWindow {
                    bus: pci.bus.clone(),
                };
                mmio.insert(
                    layout::PCI_MMIO_START,
                    layout::PCI_MMIO_SIZE,
                    Arc::new(Mutex::new(window)),
                )
                .map_err(virtio::AttachError::Bus)?;
                exit_map.set_pci_bus(pci.bus.clone());
                Some(pci)
            }
        };
        Ok(VmBuilder {
            spec,
            kvm,
            vm,
            mem,
            dma_log,
            payload,
            mmio,
            slots: SlotAllocator::default(),
            pci,
            nics: Vec::new(),
            disks: Vec::new(),
            progress: Vec::new(),
            exit_map,
        })
    }

    /// Attaches a virtio-blk disk backed by `disk`'s image file, naming itself `card`
    /// in the DMA log (`zc_protocol::disk`: the test disk 0, the scratch disk 1).
    pub fn attach_disk(&mut self, disk: &DiskSpec, card: u16) -> Result<(), VmError> {
        let options = BlockOptions {
            read_only: disk.read_only,
            ..BlockOptions::default()
        };
        let block =
            Block::open(&disk.path, options, self.dma_log.for_card(card)).map_err(VmError::Disk)?;
        let device = self.plug(block, ExitTarget::Disk)?;
        self.disks.push((disk.read_only, device));
        Ok(())
    }

    /// Attaches a virtio-net card with `nic`'s backend, and starts the backend's timer.
    /// The `n`-th card gets card `n`'s addresses (`zc_protocol::addr::Card`: its
    /// MACs, and its peer's address on a subnet of its own) and names itself card
    /// `n` in the DMA log.
    pub fn attach_nic(&mut self, nic: &NicSpec) -> Result<(), VmError> {
        let card = u8::try_from(self.nics.len())
            .ok()
            .and_then(Card::new)
            .ok_or(SpecError::TooManyNics(self.nics.len() + 1))?;
        let log = self.dma_log.for_card(u16::from(card.index()));
        let target = ExitTarget::Nic(card.index());
        let attached = match &nic.backend {
            NetBackendSpec::Peer => {
                let device =
                    self.plug(net_card(peer_backend(nic, card)?, nic, card, &log)?, target)?;
                spawn_backend_timer(device.clone())?;
                if !nic.peer_expect.is_empty() {
                    self.progress.push(device.clone());
                }
                AttachedNic::Peer { sg: nic.sg, device }
            }
            NetBackendSpec::Tap { name, address } => {
                let tap = open_tap(name, *address)?;
                let check = socket_peer_for(nic, *address)?;
                let device = self.plug(net_card(tap, nic, card, &log)?, target)?;
                spawn_backend_timer(device.clone())?;
                AttachedNic::Tap {
                    sg: nic.sg,
                    device,
                    check,
                }
            }
        };
        self.nics.push(attached);
        Ok(())
    }

    /// Puts `device` behind the run's transport in the next free slot: its
    /// registers, its interrupts and queue notifications, and what
    /// [`VmBuilder::build`] tells the guest about it (a DSDT node for virtio-mmio; the
    /// PCI bus describes itself). The exit counters name its registers `target`'s.
    fn plug<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        target: ExitTarget,
    ) -> Result<DeviceHandle<D>, VmError> {
        match &mut self.pci {
            Some(pci) => {
                let number = pci
                    .bus
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_device();
                let handle = virtio::attach_pci(&self.vm, &self.mem, pci, device)?;
                if let Some(number) = number {
                    self.exit_map.add_pci(number, target);
                }
                Ok(handle)
            }
            None => {
                let slot = self.slots.allocate()?;
                self.exit_map
                    .add_mmio(slot.info.base, slot.info.size, target);
                Ok(virtio::attach(
                    &self.vm,
                    &self.mem,
                    &mut self.mmio,
                    slot,
                    device,
                )?)
            }
        }
    }

    /// Loads the kernel, writes the ACPI tables that describe the attached devices,
    /// and creates the console, control channel and vCPUs.
    pub fn build(self) -> Result<Vm, VmError> {
        let spec = self.spec;
        let cmdline = spec.full_cmdline();
        let loaded = boot::load(
            &self.mem,
            &BootSpec {
                kernel: &spec.kernel,
                initrd: spec.initrd.as_deref(),
                cmdline: &cmdline,
                mem_bytes: spec.mem_bytes,
            },
        )?;
        acpi::write_acpi_tables(
            &self.mem,
            GuestAddress(layout::RSDP_ADDR),
            GuestAddress(layout::ACPI_TABLES_START),
            GuestAddress(layout::BIOS_END),
            &AcpiConfig {
                vcpus: spec.vcpus,
                mmio_devices: self.slots.acpi_devices(),
                pci: self.pci.as_ref().map(|_| acpi::PciHostInfo {
                    mmio_base: layout::PCI_MMIO_START,
                    mmio_size: layout::PCI_MMIO_SIZE,
                }),
            },
        )?;
        let (legacy, messages, tail) = legacy_devices(&self.vm, spec.outputs.console.as_deref())?;
        let vcpus = create_vcpus(&self.kvm, &self.vm, &self.mem, spec.vcpus, loaded.entry)?;
        let sampler = self.payload.map(|payload| {
            DirtySampler::new(
                self.vm.clone(),
                self.mem.clone(),
                dirty::slots_of(&self.mem),
                PayloadIndex::new(Arc::new(payload)),
                self.dma_log.clone(),
            )
        });
        Ok(Vm {
            vcpus,
            devices: Devices {
                legacy: Mutex::new(legacy),
                mmio: self.mmio,
                pci: self.pci.map(|pci| pci.bus),
                messages,
                dma_log: self.dma_log,
                dma_log_path: self.spec.outputs.dma_log.clone(),
                sampler,
                progress: (!self.progress.is_empty()).then(|| PeerProgress::new(self.progress)),
                exit_map: self.exit_map,
                exits: ExitCounters::default(),
            },
            tail,
            timeout: Duration::from_secs(spec.timeout_s),
            kernel_format: loaded.format,
            nics: self.nics,
            disks: self.disks,
            _vm: self.vm,
            _mem: self.mem,
            _kvm: self.kvm,
        })
    }
}

/// A VM ready to run.
pub struct Vm {
    vcpus: Vec<VcpuFd>,
    devices: Devices,
    tail: ConsoleTail,
    timeout: Duration,
    kernel_format: KernelFormat,
    nics: Vec<AttachedNic>,
    disks: Vec<(bool, DeviceHandle<Block>)>,
    // Held for the whole run: guest memory is registered with this VM (see
    // `register_memory`), and the VM with this KVM handle.
    _vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    _kvm: Kvm,
}

impl Vm {
    /// Runs the guest to the end; then collects what each card's peer received and
    /// each card's counters.
    pub fn run(self) -> Result<RunReport, VmError> {
        let mut report = run_vcpus(
            self.vcpus,
            self.devices,
            self.tail,
            self.timeout,
            self.kernel_format,
        )?;
        for nic in &self.nics {
            nic.collect(&mut report);
        }
        report.disks = self
            .disks
            .iter()
            .map(|(read_only, device)| DiskSummary {
                read_only: *read_only,
                features: device.features(),
                stats: device.with(|d| d.stats()),
            })
            .collect();
        Ok(report)
    }
}

/// A network card as the run needs it after the guest has stopped.
enum AttachedNic {
    /// In front of the in-VMM TCP peer, which checked what arrived.
    Peer {
        sg: bool,
        device: DeviceHandle<Net<NetPeer>>,
    },
    /// In front of a host tap, with the host-socket check if expectations were given.
    Tap {
        sg: bool,
        device: DeviceHandle<Net<TapBackend>>,
        check: Option<SocketPeer>,
    },
}

impl AttachedNic {
    /// Adds what the card's peer received and the card's counters to `report`.
    fn collect(&self, report: &mut RunReport) {
        let (backend, sg, features, stats) = match self {
            AttachedNic::Peer { sg, device } => {
                collect_transfers(device, report);
                (
                    NetBackendKind::Peer,
                    *sg,
                    device.features(),
                    device.with(|d| d.stats()),
                )
            }
            AttachedNic::Tap { sg, device, check } => {
                flush_pcap(device);
                if let Some(check) = check {
                    collect_socket_transfers(check, report);
                }
                (
                    NetBackendKind::Tap,
                    *sg,
                    device.features(),
                    device.with(|d| d.stats()),
                )
            }
        };
        report.nics.push(NicSummary {
            backend,
            sg,
            features,
            stats,
        });
    }
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDR).expect("below 4 GiB"))
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// The port devices (COM1 console to `console` or stdout, COM2 control channel, the
/// rest of the legacy I/O) with their interrupts wired to the VM.
fn legacy_devices(
    vm: &VmFd,
    console: Option<&Path>,
) -> Result<(LegacyIo, ControlMessages, ConsoleTail), VmError> {
    let console_out: Box<dyn Write + Send> = match console {
        None => Box::new(std::io::stdout()),
        Some(path) => Box::new(std::fs::File::create(path).map_err(|source| VmError::Host {
            what: "cannot create the console file",
            source,
        })?),
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
    Ok((legacy, messages, tail))
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    count: u8,
    entry: GuestAddress,
) -> Result<Vec<VcpuFd>, VmError> {
    let mut vcpus = Vec::new();
    for id in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        cpu::setup_vcpu(kvm, mem, &vcpu, id, count, entry)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The tap device `name`, given `address` and brought up if there is one.
fn open_tap(name: &str, address: Option<TapAddress>) -> Result<TapBackend, VmError> {
    let tap = TapBackend::open(name).map_err(|e| VmError::Host {
        what: "cannot open the tap device",
        source: std::io::Error::other(e.to_string()),
    })?;
    if let Some(TapAddress { addr, prefix }) = address {
        tap.set_ipv4(addr, prefix)
            .map_err(|e| net_err("cannot address the tap device")(&e))?;
    }
    Ok(tap)
}

/// With the tap backend: the host-socket check of what the guest sends, on the
/// tap's address, if expectations were given.
fn socket_peer_for(
    config: &NicSpec,
    address: Option<TapAddress>,
) -> Result<Option<SocketPeer>, VmError> {
    if config.peer_expect.is_empty() {
        return Ok(None);
    }
    let Some(TapAddress { addr, .. }) = address else {
        return Err(SpecError::TapCheckWithoutAddress.into());
    };
    let peer = SocketPeer::listen(SocketAddrV4::new(addr, DEFAULT_PORT), expectations(config)?)
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
        direction: Direction::ToPeer,
        bytes: received.bytes,
        failure: received.failure.as_ref().map(|f| f.to_string()),
        mbps: received.throughput().map(|bps| bps * 8.0 / 1e6),
    }
}

fn send_result(sent: &Sent) -> TransferResult {
    TransferResult {
        label: sent
            .offer
            .as_ref()
            .map(|o| o.label.clone())
            .unwrap_or_else(|| "an unexpected connection".into()),
        direction: Direction::ToGuest,
        bytes: sent.bytes_acked,
        failure: sent.failure.as_ref().map(|f| f.to_string()),
        mbps: sent.throughput().map(|bps| bps * 8.0 / 1e6),
    }
}

/// The TCP peer of `card`, on the card's own subnet, told which files to expect
/// and which to send.
fn peer_backend(config: &NicSpec, card: Card) -> Result<NetPeer, VmError> {
    let peer_config = NetPeerConfig {
        mac: card.peer_mac(),
        ip: card.peer_ip(),
        ..NetPeerConfig::default()
    };
    let mut peer = NetPeer::new(peer_config, Instant::now())
        .map_err(|e| net_err("cannot start the TCP peer")(&e))?;
    for expectation in expectations(config)? {
        peer.expect(expectation);
    }
    for path in &config.peer_send {
        let mut offer = Offer::of_file(path.display().to_string(), path)
            .map_err(|e| net_err("cannot read a file the peer is to send")(&e))?;
        if let Some(bytes) = config.peer_send_bytes {
            if bytes > offer.size {
                return Err(SpecError::BytesBeyondFile {
                    bytes,
                    path: path.clone(),
                    size: offer.size,
                }
                .into());
            }
            offer.size = bytes;
        }
        peer.offer(offer);
    }
    Ok(peer)
}

/// What each of the guest's connections must carry, in order.
fn expectations(config: &NicSpec) -> Result<Vec<Expectation>, VmError> {
    let mut all = Vec::new();
    for path in &config.peer_expect {
        let mut expectation = Expectation::of_file(path.display().to_string(), path)
            .map_err(|e| net_err("cannot read a file the peer is to expect")(&e))?;
        if let Some(bytes) = config.peer_expect_bytes {
            if bytes > expectation.size {
                return Err(SpecError::BytesBeyondFile {
                    bytes,
                    path: path.clone(),
                    size: expectation.size,
                }
                .into());
            }
            expectation.size = bytes;
        }
        all.push(expectation);
    }
    Ok(all)
}

/// The virtio-net card in front of `backend`, with `card`'s guest MAC.
fn net_card<B: NetBackend>(
    backend: B,
    config: &NicSpec,
    card: Card,
    log: &DmaLog,
) -> Result<Net<B>, VmError> {
    let options = NetOptions {
        sg: config.sg,
        mac: card.guest_mac(),
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
fn spawn_backend_timer<B: NetBackend + 'static>(nic: DeviceHandle<Net<B>>) -> Result<(), VmError> {
    // Bounds on the sleep: short enough that a lost timer costs little, long
    // enough not to spin.
    const MIN: Duration = Duration::from_micros(200);
    const MAX: Duration = Duration::from_millis(20);
    thread::Builder::new()
        .name("net-timer".into())
        .spawn(move || {
            zc_seccomp::enter(zc_seccomp::Role::NetTimer);
            loop {
                let delay = nic
                    .with(|device| device.next_poll_delay(Instant::now()))
                    .unwrap_or(MAX)
                    .clamp(MIN, MAX);
                thread::sleep(delay);
                nic.with(|device| device.poll_backend(Instant::now()));
            }
        })
        .map(drop)
        .map_err(|source| VmError::Host {
            what: "cannot start the network timer thread",
            source,
        })
}

fn flush_pcap<B: NetBackend + 'static>(nic: &DeviceHandle<Net<B>>) {
    if let Err(e) = nic.with(|device| device.flush_pcap()) {
        eprintln!("zc-vmm: the pcap file is incomplete: {e}");
    }
}

/// What the peer received and sent, and what it expected or offered but no
/// connection carried.
fn collect_transfers(nic: &DeviceHandle<Net<NetPeer>>, report: &mut RunReport) {
    flush_pcap(nic);
    nic.with(|device| {
        let peer = device.backend_mut();
        peer.finish(Instant::now());
        report
            .transfers
            .extend(peer.take_results().iter().map(transfer_result));
        report.missing_transfers.extend(
            peer.pending_expectation_labels()
                .into_iter()
                .map(|label| label.to_string()),
        );
        report
            .transfers
            .extend(peer.take_sent().iter().map(send_result));
        report.missing_sends.extend(
            peer.pending_offer_labels()
                .into_iter()
                .map(|label| label.to_string()),
        );
    });
}

/// What the vCPU threads share: the devices they dispatch exits to, and where
/// control-channel messages and markers go.
struct Devices {
    legacy: Mutex<LegacyIo>,
    mmio: MmioBus,
    /// The PCI bus, for its configuration ports (with the PCI transport).
    pci: Option<Arc<Mutex<PciBus>>>,
    messages: ControlMessages,
    dma_log: DmaLog,
    /// Where the DMA log is written, when it is.
    dma_log_path: Option<PathBuf>,
    /// Present when the run samples dirty pages (DMA log on, a file to look for).
    sampler: Option<DirtySampler>,
    /// Present when a peer checks what the guest sends: prints its count per method.
    progress: Option<Arc<PeerProgress>>,
    /// Which device an exit reached.
    exit_map: ExitMap,
    /// The exits the vCPUs made, and the spans the guest's markers cut them into.
    exits: ExitCounters,
}

/// The first `limit` bytes (or all) of the payload file that dirty samples look for.
fn read_payload(path: &Path, limit: Option<u64>) -> Result<Vec<u8>, VmError> {
    let mut bytes = std::fs::read(path).map_err(|source| VmError::Host {
        what: "cannot read the payload file for dirty-page sampling",
        source,
    })?;
    if let Some(limit) = limit {
        bytes.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    }
    Ok(bytes)
}

/// Registers guest RAM with KVM; with `log_dirty`, KVM records the pages the guest
/// CPU writes (`dirty.rs`).
fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: u32::try_from(slot).expect("a handful of regions"),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the region is a live mmap owned by `mem`; the builder and then the
        // `Vm` hold `mem` (and the devices their clones of it) as long as the VM
        // itself, so the mapping outlives every guest access through KVM.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// What vCPU threads tell the run loop.
enum Event {
    Control(Instant, ControlMessage),
    Stop(StopReason),
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
    if let Some(progress) = &devices.progress {
        progress.spawn_ticker().map_err(|source| VmError::Host {
            what: "cannot start the progress thread",
            source,
        })?;
    }
    let log_failed = Arc::new(OnceLock::new());
    if let Some(path) = &devices.dma_log_path {
        let (path, failed) = (path.clone(), log_failed.clone());
        devices.dma_log.on_write_error(move |e| {
            let _ = failed.set(dma_log_failure(&path, e));
        });
    }
    let devices = Arc::new(devices);
    let stopping = Arc::new(AtomicBool::new(false));
    let (events, inbox) = mpsc::channel();
    let started = Instant::now();
    let threads = spawn_vcpus(vcpus, &devices, events, &stopping)?;
    // Every thread of the VM has started: from here the main thread only waits, stops
    // the vCPUs and writes the outputs.
    zc_seccomp::enter(zc_seccomp::Role::Main);

    let mut report = RunReport::new(kernel_format);
    wait_for_stop(&inbox, started, timeout, &log_failed, &mut report);
    report.run_time = started.elapsed();
    stop_vcpus(threads, &stopping);
    if let Some(progress) = &devices.progress {
        progress.stop();
    }
    // Messages a vCPU parsed just before the stop (e.g. `exit` right before power-off).
    while let Ok(Event::Control(at, message)) = inbox.try_recv() {
        if let ControlMessage::Exit { code } = message {
            report.guest_exit = Some(code);
        }
        report.messages.push(TimedMessage {
            at: at.duration_since(started),
            message,
        });
    }
    report.console_tail = tail.lines();
    report.vcpu_exits = Some(devices.exits.report());
    report.dirty_sample_cost = devices.sampler.as_ref().map(DirtySampler::cost);
    if let (Err(e), None) = (devices.dma_log.flush(), &report.dma_log_failure) {
        // Failed at the final flush, after the run loop stopped looking.
        let path = devices.dma_log_path.as_deref().unwrap_or(Path::new("?"));
        report.dma_log_failure = Some(match e {
            zc_devices::dma_log::DmaLogError::Io(e) => dma_log_failure(path, &e),
            other => format!("the DMA log {} is incomplete: {other}", path.display()),
        });
    }
    Ok(report)
}

/// The one line a run that could not write its DMA log fails with.
fn dma_log_failure(path: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let hint = match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
            "free space or pass --dma-log elsewhere"
        }
        _ => "check the file system it is on, or pass --dma-log elsewhere",
    };
    format!(
        "the DMA log {} could not be written: {e}; {hint}",
        path.display()
    )
}

/// How often the run loop looks whether the DMA log failed. A flag rather than an
/// event on the vCPUs' channel: a sender held by the log would keep the channel
/// open after every vCPU thread ended, which is how the loop notices they all did.
const LOG_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// One thread per vCPU, each running [`vcpu_loop`].
fn spawn_vcpus(
    vcpus: Vec<VcpuFd>,
    devices: &Arc<Devices>,
    events: mpsc::Sender<Event>,
    stopping: &Arc<AtomicBool>,
) -> Result<Vec<thread::JoinHandle<()>>, VmError> {
    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let devices = devices.clone();
        let events = events.clone();
        let stopping = stopping.clone();
        let handle = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                zc_seccomp::enter(zc_seccomp::Role::Vcpu);
                vcpu_loop(vcpu, &devices, &events, &stopping)
            })
            .map_err(|source| VmError::Host {
                what: "cannot start a vCPU thread",
                source,
            })?;
        threads.push(handle);
    }
    Ok(threads)
}

/// Takes the vCPUs' control messages into `report` until a vCPU stops, the timeout
/// passes, or the guest reported its exit and had its grace time to power off.
fn wait_for_stop(
    inbox: &Receiver<Event>,
    started: Instant,
    timeout: Duration,
    log_failed: &OnceLock<String>,
    report: &mut RunReport,
) {
    let mut deadline = started + timeout;
    loop {
        if let Some(why) = log_failed.get() {
            // Nothing the guest does from here on could be judged: stop now.
            report.dma_log_failure = Some(why.clone());
            report.stop = StopReason::DmaLogUnwritable;
            return;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let stop = match inbox.recv_timeout(wait.min(LOG_CHECK_INTERVAL)) {
            Ok(Event::Control(at, message)) => {
                let at = at.duration_since(started);
                if take_message(report, at, &message) {
                    deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
                }
                report.messages.push(TimedMessage { at, message });
                continue;
            }
            Ok(Event::Stop(reason)) => reason,
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
            Err(RecvTimeoutError::Timeout) if report.guest_exit.is_some() => {
                StopReason::NoPowerOffAfterExit
            }
            Err(RecvTimeoutError::Timeout) => StopReason::Timeout,
            Err(RecvTimeoutError::Disconnected) => {
                StopReason::VcpuFailure("all vCPU threads ended".into())
            }
        };
        report.stop = stop;
        return;
    }
}

/// Notes what a control message says about the run; true for the guest's `exit`.
fn take_message(report: &mut RunReport, at: Duration, message: &ControlMessage) -> bool {
    match message {
        ControlMessage::Hello { kernel_release } => {
            report.kernel_release = Some(kernel_release.clone());
            report.time_to_init = Some(at);
        }
        ControlMessage::Uptime { seconds } => report.init_uptime = Some(*seconds),
        ControlMessage::Exit { code } => {
            report.guest_exit = Some(*code);
            return true;
        }
        ControlMessage::Log { text } => eprintln!("guest: {text}"),
        ControlMessage::Malformed { line } => {
            eprintln!("zc-vmm: malformed control line from the guest: {line:?}")
        }
        ControlMessage::Mark { .. } | ControlMessage::Report { .. } => {}
    }
    false
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
        let pci = |port| {
            devices
                .pci
                .as_ref()
                .filter(|_| PciBus::handles_port(port))
                .map(|bus| bus.lock().unwrap_or_else(|e| e.into_inner()))
        };
        let counted = match &exit {
            Ok(VcpuExit::IoIn(port, _)) => Some(ExitMap::port(*port, false)),
            Ok(VcpuExit::IoOut(port, _)) => Some(ExitMap::port(*port, true)),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                Some(devices.exit_map.mmio(*addr, data.len(), false))
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                Some(devices.exit_map.mmio(*addr, data.len(), true))
            }
            // The rest end the run, or are the kick signal (EINTR), not the guest.
            _ => None,
        };
        if let Some(exit) = counted {
            devices.exits.count(exit);
        }
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => match pci(port) {
                Some(mut bus) => bus.pio_read(port, data),
                None => lock().read(port, data),
            },
            Ok(VcpuExit::IoOut(port, data)) if pci(port).is_some() => {
                if let Some(mut bus) = pci(port) {
                    bus.pio_write(port, data);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                // Bound first: a guard in the match scrutinee would keep the port
                // devices locked through a dirty-page sample.
                let action = lock().write(port, data);
                if let Some(reason) = on_port_write(action, devices, events) {
                    return stop(reason);
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

/// Acts on what a port write asked for; returns why the run stops, if it does.
fn on_port_write(
    action: PioAction,
    devices: &Devices,
    events: &mpsc::Sender<Event>,
) -> Option<StopReason> {
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
                    devices.exits.mark(label);
                    if let Some(progress) = &devices.progress {
                        progress.mark(label);
                    }
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
        PioAction::Shutdown => return Some(StopReason::PowerOff),
        PioAction::Reset => return Some(StopReason::Reset),
    }
    None
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

    fn message_report() -> RunReport {
        RunReport::new(KernelFormat::BzImage)
    }

    #[test]
    fn control_messages_fill_the_report_and_exit_starts_the_grace_time() {
        let mut report = message_report();
        let at = Duration::from_millis(1500);
        let hello = ControlMessage::Hello {
            kernel_release: "6.1".into(),
        };
        assert!(!take_message(&mut report, at, &hello));
        assert!(!take_message(
            &mut report,
            at,
            &ControlMessage::Uptime { seconds: 0.5 }
        ));
        assert!(take_message(
            &mut report,
            at,
            &ControlMessage::Exit { code: 4 }
        ));
        assert_eq!(report.kernel_release.as_deref(), Some("6.1"));
        assert_eq!(report.time_to_init, Some(at));
        assert_eq!(report.init_uptime, Some(0.5));
        assert_eq!(report.guest_exit, Some(4));
    }

    #[test]
    fn the_run_loop_stops_on_a_vcpu_stop_and_keeps_earlier_messages() {
        let (events, inbox) = mpsc::channel();
        let started = Instant::now();
        events
            .send(Event::Control(started, ControlMessage::Exit { code: 0 }))
            .unwrap();
        events.send(Event::Stop(StopReason::PowerOff)).unwrap();
        let mut report = message_report();
        wait_for_stop(
            &inbox,
            started,
            Duration::from_secs(5),
            &OnceLock::new(),
            &mut report,
        );
        assert_eq!(report.stop, StopReason::PowerOff);
        assert_eq!(report.guest_exit, Some(0));
        assert_eq!(report.messages.len(), 1);
    }

    #[test]
    fn the_run_loop_stops_when_the_dma_log_fails() {
        let (_events, inbox) = mpsc::channel::<Event>();
        let failed = Arc::new(OnceLock::new());
        let log = DmaLog::new(
            std::fs::File::options()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .unwrap();
        let path = PathBuf::from("/dev/full");
        let set = failed.clone();
        log.on_write_error(move |e| {
            let _ = set.set(dma_log_failure(&path, e));
        });
        // /dev/full fails the first write: the header and a marker, at the flush
        // (the writer writes on its own only once 1 MiB of lines is pending).
        log.marker("m");
        assert!(log.flush().is_err());
        let mut report = message_report();
        let started = Instant::now();
        wait_for_stop(
            &inbox,
            started,
            Duration::from_secs(60),
            &failed,
            &mut report,
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stopped at once"
        );
        assert_eq!(report.stop, StopReason::DmaLogUnwritable);
        assert_eq!(
            report.failure().as_deref(),
            Some("the DMA log /dev/full could not be written: No space left on device (os error 28); free space or pass --dma-log elsewhere")
        );
        assert_eq!(report.exit_status(), 1);
    }

    #[test]
    fn the_run_loop_tells_a_timeout_from_a_guest_that_would_not_power_off() {
        let (events, inbox) = mpsc::channel::<Event>();
        let mut report = message_report();
        wait_for_stop(
            &inbox,
            Instant::now(),
            Duration::ZERO,
            &OnceLock::new(),
            &mut report,
        );
        assert_eq!(report.stop, StopReason::Timeout);
        let mut report = message_report();
        report.guest_exit = Some(0);
        wait_for_stop(
            &inbox,
            Instant::now(),
            Duration::ZERO,
            &OnceLock::new(),
            &mut report,
        );
        assert_eq!(report.stop, StopReason::NoPowerOffAfterExit);
        drop(events);
        let mut report = message_report();
        wait_for_stop(
            &inbox,
            Instant::now(),
            Duration::from_secs(5),
            &OnceLock::new(),
            &mut report,
        );
        assert!(matches!(report.stop, StopReason::VcpuFailure(_)));
    }
}
