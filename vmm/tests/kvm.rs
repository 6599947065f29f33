//! Tests on this machine's own `/dev/kvm` with tiny hand-assembled guests: port I/O
//! and MMIO exits, HLT, the control channel, the dirty-page log, and our long-mode
//! vCPU setup. They need no kernel image, so they run even where `/dev/kvm` cannot
//! boot a stock kernel (the `kvm_pvm` CI machines). Without `/dev/kvm` they are
//! reported as ignored, never as passed.
//!
//! What the VMM does on a vCPU thread (KVM_RUN, the exits' device calls, the dirty
//! log, MSI routes and ioeventfds) runs here on a thread under the vCPU's seccomp
//! filter ([`on_vcpu_thread`]): a call the filter lacks ends the test binary with
//! the filter's line.

use std::io;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use zc_devices::console::ConsoleSink;
use zc_devices::control::{ControlChannel, ControlMessage};
use zc_vmm::cpu;
use zc_vmm::pio::{LegacyIo, PioAction, COM2_BASE};

const CODE: u64 = 0x1000;
const DATA: u64 = 0x1100;

struct TinyVm {
    _kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

/// A VM with `size` bytes of RAM at 0 (slot 0), no irqchip (so HLT exits to us), and
/// one vCPU.
fn tiny_vm(size: usize, flags: u32) -> TinyVm {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let region = mem.iter().next().unwrap();
    let desc = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: region.as_ptr() as u64,
        flags,
    };
    // SAFETY: `mem` is kept alive in the returned struct as long as the VM.
    unsafe { vm.set_user_memory_region(desc) }.expect("KVM_SET_USER_MEMORY_REGION");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    TinyVm {
        _kvm: kvm,
        vm,
        vcpu,
        mem,
    }
}

/// Starts the vCPU in real mode at `CODE` with flat segments.
fn real_mode(t: &TinyVm, code: &[u8]) {
    t.mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let mut sregs = t.vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    t.vcpu.set_sregs(&sregs).unwrap();
    let mut regs = t.vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    t.vcpu.set_regs(&regs).unwrap();
}

/// Runs `work` on a thread under the vCPU role's seccomp filter, as the VMM's vCPU
/// threads do.
fn on_vcpu_thread<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    static ENABLED: std::sync::Once = std::sync::Once::new();
    ENABLED.call_once(|| zc_seccomp::enable().expect("seccomp"));
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                zc_seccomp::enter(zc_seccomp::Role::Vcpu);
                work()
            })
            .join()
            .expect("the vCPU thread")
    })
}

fn legacy() -> (LegacyIo, zc_devices::control::ControlMessages) {
    let (console, _) = ConsoleSink::new(Box::new(io::sink()));
    let (control, messages) = ControlChannel::new();
    (LegacyIo::new(console, control).unwrap(), messages)
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn control_channel_over_port_io_then_hlt() {
    let mut t = tiny_vm(0x10000, 0);
    #[rustfmt::skip]
    let code = [
        0xba, 0xf8, 0x02,       // mov dx, 0x2f8
        0xbe, 0x00, 0x11,       // mov si, DATA
        0xac,                   // next: lodsb
        0x84, 0xc0,             // test al, al
        0x74, 0x03,             // jz done
        0xee,                   // out dx, al
        0xeb, 0xf8,             // jmp next
        0xba, 0xfd, 0x02,       // done: mov dx, 0x2fd (line status)
        0xec,                   // in al, dx
        0xf4,                   // hlt
    ];
    real_mode(&t, &code);
    t.mem
        .write_slice(b"hello tiny\nmark BEGIN x\nexit 5\n\0", GuestAddress(DATA))
        .unwrap();
    let (mut io, messages) = legacy();
    let vcpu = &mut t.vcpu;
    let port_writes = on_vcpu_thread(|| {
        let mut port_writes = 0;
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => {
                    assert_eq!(port, COM2_BASE);
                    assert_eq!(io.write(port, data), PioAction::ControlData);
                    port_writes += 1;
                }
                VcpuExit::IoIn(port, data) => io.read(port, data),
                VcpuExit::Hlt => break port_writes,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    assert_eq!(port_writes, 31, "one exit per byte");
    assert_eq!(
        messages.drain(),
        vec![
            ControlMessage::Hello {
                kernel_release: "tiny".into()
            },
            ControlMessage::Mark {
                label: zc_protocol::Marker::begin("x").label()
            },
            ControlMessage::Exit { code: 5 },
        ]
    );
    let regs = t.vcpu.get_regs().unwrap();
    assert_ne!(regs.rax & 0x20, 0, "LSR read must show THRE");
    drop(t.vm);
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn mmio_exits_outside_memory() {
    let mut t = tiny_vm(0x10000, 0);
    #[rustfmt::skip]
    let code = [
        0xb8, 0x00, 0x20,                   // mov ax, 0x2000
        0x8e, 0xc0,                         // mov es, ax  -> es:0 = 0x20000, no RAM there
        0x26, 0xc6, 0x06, 0x00, 0x00, 0x42, // mov byte es:[0], 0x42
        0x26, 0xa0, 0x04, 0x00,             // mov al, es:[4]
        0xf4,                               // hlt
    ];
    real_mode(&t, &code);
    let vcpu = &mut t.vcpu;
    let seen = on_vcpu_thread(|| {
        let mut seen = Vec::new();
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::MmioWrite(addr, data) => seen.push(("w", addr, data.to_vec())),
                VcpuExit::MmioRead(addr, data) => {
                    data.fill(0x99);
                    seen.push(("r", addr, vec![]));
                }
                VcpuExit::Hlt => break seen,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    assert_eq!(
        seen,
        vec![("w", 0x20000, vec![0x42]), ("r", 0x20004, vec![])]
    );
    assert_eq!(t.vcpu.get_regs().unwrap().rax & 0xff, 0x99);
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    let size = 0x10000;
    let mut t = tiny_vm(size, KVM_MEM_LOG_DIRTY_PAGES);
    #[rustfmt::skip]
    let code = [
        0xc6, 0x06, 0x00, 0x30, 0x01, // mov byte [0x3000], 1
        0xc6, 0x06, 0x08, 0x50, 0x01, // mov byte [0x5008], 1
        0xc6, 0x06, 0xff, 0x7f, 0x01, // mov byte [0x7fff], 1
        0xf4,                         // hlt
    ];
    real_mode(&t, &code);
    // Writes by the VMM itself are not in KVM's log: this one must not show up.
    t.mem.write_obj(0xffu8, GuestAddress(0x9000)).unwrap();
    let (vcpu, vm) = (&mut t.vcpu, &t.vm);
    // The VMM samples the dirty log on the vCPU thread that carries the request.
    let bitmap = on_vcpu_thread(|| {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Hlt => {}
            other => panic!("unexpected exit {other:?}"),
        }
        vm.get_dirty_log(0, size).expect("KVM_GET_DIRTY_LOG")
    });
    let pages: Vec<usize> = (0..size / 4096)
        .filter(|page| bitmap[page / 64] & (1 << (page % 64)) != 0)
        .collect();
    assert_eq!(pages, vec![3, 5, 7]);
    // The log is cleared by reading it.
    let again = t.vm.get_dirty_log(0, size).unwrap();
    assert!(again.iter().all(|w| *w == 0));
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn long_mode_boot_state_runs_64bit_code() {
    let size = 4 << 20;
    let mut t = tiny_vm(size, 0);
    let entry = 0x20_0000u64;
    #[rustfmt::skip]
    let code = [
        0x48, 0xb8, 0xef, 0xbe, 0xad, 0xde, 0x01, 0x00, 0x00, 0x00, // mov rax, 0x1deadbeef
        0x66, 0xba, 0xf8, 0x02,                                     // mov dx, 0x2f8
        0xee,                                                       // out dx, al
        0x48, 0x89, 0x04, 0x25, 0x00, 0x10, 0x30, 0x00,             // mov [0x301000], rax
        0xf4,                                                       // hlt
    ];
    t.mem.write_slice(&code, GuestAddress(entry)).unwrap();
    cpu::setup_sregs(&t.mem, &t.vcpu).expect("long-mode sregs");
    cpu::setup_regs(&t.vcpu, GuestAddress(entry)).unwrap();
    let vcpu = &mut t.vcpu;
    let out = on_vcpu_thread(|| {
        let mut out = None;
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => out = Some((port, data[0])),
                VcpuExit::Hlt => break out,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    assert_eq!(out, Some((COM2_BASE, 0xef)));
    // A 64-bit store above 2 MiB proves paging and the 64-bit code segment work.
    let stored: u64 = t.mem.read_obj(GuestAddress(0x30_1000)).unwrap();
    assert_eq!(stored, 0x1_dead_beef);
    let sregs = t.vcpu.get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA set");
    assert_eq!(
        t.vcpu.get_regs().unwrap().rsi,
        zc_vmm::layout::BOOT_PARAMS_ADDR
    );
}

/// A virtio device with two queues that does nothing: what the PCI transport wraps
/// when only its registers and notifications are under test.
struct TwoQueues;

impl zc_devices::virtio::VirtioDevice for TwoQueues {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: zc_devices::virtio::GuestMem,
        _: Vec<virtio_queue::Queue>,
        _: std::sync::Arc<zc_devices::virtio::VirtioInterrupt>,
        _: u64,
    ) -> Result<(), zc_devices::virtio::ActivateError> {
        Ok(())
    }
    fn process_queue(&mut self, _: u16) {}
    fn reset(&mut self) {}
    fn log_error(&self, _: u16, _: &str, _: bool) {}
}

struct NoMsi;

impl zc_devices::pci::msix::MsiDelivery for NoMsi {
    fn set_route(&self, _: u16, _: zc_devices::pci::msix::MsiMessage) -> io::Result<()> {
        Ok(())
    }
    fn trigger(&self, _: u16) -> io::Result<()> {
        Ok(())
    }
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn pci_queue_notifies_hit_their_ioeventfd_wherever_the_guest_puts_the_bar() {
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use zc_devices::pci::bus::PciBus;
    use zc_devices::virtio::pci::PciTransport;
    use zc_vmm::pci::{PciAllocator, PciVirtioFunction};

    let t = tiny_vm(4 << 20, 0);
    let vm = Arc::new(t.vm);
    let bar0 = PciAllocator::default().bar0().unwrap();
    assert_eq!(bar0, 0xe000_0000);
    let transport = Arc::new(Mutex::new(PciTransport::new(
        TwoQueues,
        t.mem.clone(),
        bar0,
        Arc::new(NoMsi),
    )));
    let notify: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let clones = notify.iter().map(|fd| fd.try_clone().unwrap()).collect();
    let mut bus = PciBus::default();
    let device = bus
        .add(Box::new(PciVirtioFunction::new(
            transport,
            vm.clone(),
            clones,
        )))
        .unwrap();
    assert_eq!(device, 1);

    let entry = 0x20_0000u64;
    #[rustfmt::skip]
    let code = [
        0xb8, 0x04, 0x30, 0x00, 0xe0,   // mov eax, 0xe0003004 (queue 1's notify)
        0x66, 0xc7, 0x00, 0x01, 0x00,   // mov word [rax], 1
        0x66, 0xba, 0xf8, 0x0c,         // mov dx, 0xcf8
        0xb8, 0x10, 0x08, 0x00, 0x80,   // mov eax, 0x80000810 (00:01.0, BAR0)
        0xef,                           // out dx, eax
        0x66, 0xba, 0xfc, 0x0c,         // mov dx, 0xcfc
        0xb8, 0x00, 0x00, 0x10, 0xe0,   // mov eax, 0xe0100000
        0xef,                           // out dx, eax
        0xb8, 0x04, 0x30, 0x00, 0xe0,   // mov eax, 0xe0003004 (the old place)
        0x66, 0xc7, 0x00, 0x01, 0x00,   // mov word [rax], 1
        0xb8, 0x00, 0x30, 0x10, 0xe0,   // mov eax, 0xe0103000 (queue 0, new place)
        0x66, 0xc7, 0x00, 0x00, 0x00,   // mov word [rax], 0
        0xf4,                           // hlt
    ];
    t.mem.write_slice(&code, GuestAddress(entry)).unwrap();
    cpu::setup_sregs(&t.mem, &t.vcpu).expect("long-mode sregs");
    cpu::setup_regs(&t.vcpu, GuestAddress(entry)).unwrap();
    let vcpu = t.vcpu;
    // Moving the BAR re-registers the ioeventfds, on the vCPU thread, which also
    // drops the vCPU at its end, as the VMM's do.
    let mmio_exits = on_vcpu_thread(|| {
        let mut vcpu = vcpu;
        let mut mmio_exits = Vec::new();
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(port, data) => bus.pio_write(port, data),
                VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
                VcpuExit::MmioWrite(addr, data) => {
                    mmio_exits.push(addr);
                    bus.mmio_write(addr, data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    bus.mmio_read(addr, data);
                }
                VcpuExit::Hlt => break mmio_exits,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    });
    // The two notifies at BAR0's places never left KVM; the one at the place BAR0
    // had left exited to the VMM, where no BAR holds it any more.
    assert_eq!(notify[1].read().ok(), Some(1), "queue 1 at the first place");
    assert_eq!(notify[0].read().ok(), Some(1), "queue 0 after the move");
    assert_eq!(mmio_exits, vec![0xe000_3004]);
    drop(vm);
}

#[test]
#[cfg_attr(not(has_kvm), ignore = "no /dev/kvm on this host")]
fn msi_routes_and_irqfds_are_accepted_by_kvm() {
    use std::sync::Arc;
    use zc_devices::pci::msix::{MsiDelivery, MsiMessage};
    use zc_vmm::pci::{GsiRouter, KvmMsiDelivery};

    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let delivery = KvmMsiDelivery::new(&vm, router.clone(), vec![24, 25]).expect("irqfds");
    let message = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    // The guest programs MSI-X vectors by MMIO writes: on a vCPU thread.
    on_vcpu_thread(|| {
        delivery.set_route(0, message).expect("KVM_SET_GSI_ROUTING");
        delivery
            .set_route(1, message)
            .expect("a second route beside the first");
        delivery.trigger(1).expect("the irqfd takes the write");
        // A vector the device does not have is nothing, not an error.
        delivery.trigger(7).unwrap();
        delivery.set_route(7, message).unwrap();
    });
}
