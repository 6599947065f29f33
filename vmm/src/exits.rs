//! vCPU exits to the VMM, counted by device and kind, for the whole run and for each
//! span between a method's `BEGIN` and `END` markers ("where the time goes").
//!
//! An exit here is a return of `KVM_RUN` to the VMM: a port or MMIO access that KVM
//! did not handle itself. Exits KVM handles in the kernel (HLT, the in-kernel
//! irqchip's EOIs and timers, queue notifications on an ioeventfd) never reach the
//! run loop and are not counted.
//!
//! The counters are one fixed table of atomics, bumped (`Relaxed`) before each exit
//! is dispatched: no allocation and no lock on the vCPU's path. [`ExitMap`] says which
//! device and register an access reached; it is free of KVM, so the classification
//! and the span arithmetic are tested without a VM.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use zc_devices::pci::bus::PciBus;
use zc_devices::virtio::{mmio::reg as mmio_reg, pci as virtio_pci};
use zc_protocol::addr::MAX_CARDS;
use zc_protocol::Marker;

use crate::pio::{COM1_BASE, COM2_BASE, SAMPLE_PORT};

/// The device an exit reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitTarget {
    /// The virtio-blk disk's registers.
    Disk,
    /// Network card `n`'s registers.
    Nic(u8),
    /// COM1, the guest's console.
    Console,
    /// COM2, the control channel (markers, reports).
    Control,
    /// The dirty-page sample port (one `outl` per chunk the guest sends when the run
    /// samples).
    DirtySample,
    /// The PCI configuration ports (0xcf8-0xcff).
    PciConfig,
    /// Any other port: ACPI power management, the keyboard controller, ports no
    /// device answers.
    OtherPort,
    /// Any other MMIO address (no device, or a PCI BAR of no virtio device).
    OtherMmio,
}

/// Rows of the counter table: disk, the cards, then the fixed targets.
const TARGETS: usize = 1 + MAX_CARDS as usize + 6;

impl ExitTarget {
    fn index(self) -> usize {
        let cards = usize::from(MAX_CARDS);
        match self {
            ExitTarget::Disk => 0,
            ExitTarget::Nic(n) => 1 + usize::from(n).min(cards - 1),
            ExitTarget::Console => 1 + cards,
            ExitTarget::Control => 2 + cards,
            ExitTarget::DirtySample => 3 + cards,
            ExitTarget::PciConfig => 4 + cards,
            ExitTarget::OtherPort => 5 + cards,
            ExitTarget::OtherMmio => 6 + cards,
        }
    }

    fn from_index(index: usize) -> ExitTarget {
        let cards = usize::from(MAX_CARDS);
        match index {
            0 => ExitTarget::Disk,
            i if i <= cards => ExitTarget::Nic(u8::try_from(i - 1).expect("below MAX_CARDS")),
            i if i == 1 + cards => ExitTarget::Console,
            i if i == 2 + cards => ExitTarget::Control,
            i if i == 3 + cards => ExitTarget::DirtySample,
            i if i == 4 + cards => ExitTarget::PciConfig,
            i if i == 5 + cards => ExitTarget::OtherPort,
            _ => ExitTarget::OtherMmio,
        }
    }

    /// The name in `run.json`: `blk`, `net0`..`net7`, `console`, `control`,
    /// `dirty_sample`, `pci_config`, `other_port`, `other_mmio`.
    pub fn name(self) -> String {
        match self {
            ExitTarget::Disk => "blk".into(),
            ExitTarget::Nic(n) => format!("net{n}"),
            ExitTarget::Console => "console".into(),
            ExitTarget::Control => "control".into(),
            ExitTarget::DirtySample => "dirty_sample".into(),
            ExitTarget::PciConfig => "pci_config".into(),
            ExitTarget::OtherPort => "other_port".into(),
            ExitTarget::OtherMmio => "other_mmio".into(),
        }
    }
}

/// What kind of access an exit was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A read (port in, MMIO read) of anything but a virtio interrupt register.
    Read,
    /// A write (port out, MMIO write) of anything but a notify or interrupt register.
    Write,
    /// A write to a virtio queue-notify register that KVM's ioeventfd did not take.
    Notify,
    /// A virtio interrupt-status read or interrupt acknowledge: virtio-mmio's
    /// `InterruptStatus`/`InterruptACK`, virtio-pci's ISR byte.
    Interrupt,
}

const ACCESSES: usize = 4;

impl Access {
    fn index(self) -> usize {
        match self {
            Access::Read => 0,
            Access::Write => 1,
            Access::Notify => 2,
            Access::Interrupt => 3,
        }
    }
}

/// Which register layout a virtio device's window has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Mmio,
    Pci,
}

/// Which device and register a guest access reaches: the virtio-mmio windows, and
/// the PCI bus for BARs the guest placed.
#[derive(Default)]
pub struct ExitMap {
    /// (base, size, target) of each virtio-mmio window.
    mmio: Vec<(u64, u64, ExitTarget)>,
    /// The PCI bus, and the target of each device number on it.
    pci: Option<PciTargets>,
}

/// The PCI bus, and the target of each device number on it.
struct PciTargets {
    bus: Arc<Mutex<PciBus>>,
    devices: HashMap<u8, ExitTarget>,
}

impl ExitMap {
    /// Names the virtio-mmio window `base..base+size` as `target`'s.
    pub fn add_mmio(&mut self, base: u64, size: u64, target: ExitTarget) {
        self.mmio.push((base, size, target));
    }

    /// Looks PCI BAR accesses up on `bus`.
    pub fn set_pci_bus(&mut self, bus: Arc<Mutex<PciBus>>) {
        self.pci = Some(PciTargets {
            bus,
            devices: HashMap::new(),
        });
    }

    /// Names PCI device `number` as `target`'s (after [`Self::set_pci_bus`]).
    pub fn add_pci(&mut self, number: u8, target: ExitTarget) {
        if let Some(pci) = &mut self.pci {
            pci.devices.insert(number, target);
        }
    }

    /// A port access: `write` for `out`.
    pub fn port(port: u16, write: bool) -> (ExitTarget, Access) {
        let within = |base: u16| (base..base + 8).contains(&port);
        let target = match port {
            SAMPLE_PORT => ExitTarget::DirtySample,
            _ if within(COM1_BASE) => ExitTarget::Console,
            _ if within(COM2_BASE) => ExitTarget::Control,
            _ if PciBus::handles_port(port) => ExitTarget::PciConfig,
            _ => ExitTarget::OtherPort,
        };
        (target, if write { Access::Write } else { Access::Read })
    }

    /// An MMIO access of `len` bytes at `addr`.
    pub fn mmio(&self, addr: u64, len: usize, write: bool) -> (ExitTarget, Access) {
        let plain = if write { Access::Write } else { Access::Read };
        let in_window = self.mmio.iter().find_map(|&(base, size, target)| {
            let offset = addr.checked_sub(base)?;
            (offset < size).then_some((target, offset))
        });
        let located = in_window.map(|(t, o)| (t, o, Layout::Mmio)).or_else(|| {
            let PciTargets { bus, devices } = self.pci.as_ref()?;
            let (number, bar, offset) = bus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .locate(addr, len)?;
            let target = devices.get(&number).copied()?;
            (bar == 0).then_some((target, offset, Layout::Pci))
        });
        let Some((target, offset, layout)) = located else {
            return (ExitTarget::OtherMmio, plain);
        };
        (target, register_access(layout, offset, write))
    }
}

/// What an access at `offset` of a virtio device's registers is.
fn register_access(layout: Layout, offset: u64, write: bool) -> Access {
    let notify = match layout {
        Layout::Mmio => offset == mmio_reg::QUEUE_NOTIFY,
        Layout::Pci => (virtio_pci::NOTIFY_OFFSET
            ..virtio_pci::NOTIFY_OFFSET + virtio_pci::NOTIFY_LEN)
            .contains(&offset),
    };
    let interrupt = match layout {
        Layout::Mmio => {
            (!write && offset == mmio_reg::INTERRUPT_STATUS)
                || (write && offset == mmio_reg::INTERRUPT_ACK)
        }
        Layout::Pci => offset == virtio_pci::ISR_OFFSET,
    };
    match (write, notify, interrupt) {
        (true, true, _) => Access::Notify,
        (_, _, true) => Access::Interrupt,
        (true, false, false) => Access::Write,
        (false, _, false) => Access::Read,
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot([[u64; ACCESSES]; TARGETS]);

impl Snapshot {
    /// What was counted since `earlier`.
    fn since(&self, earlier: &Snapshot) -> Snapshot {
        let mut diff = *self;
        for (row, before) in diff.0.iter_mut().zip(&earlier.0) {
            for (count, b) in row.iter_mut().zip(before) {
                *count = count.saturating_sub(*b);
            }
        }
        diff
    }

    fn counts(&self) -> ExitCounts {
        let mut targets = BTreeMap::new();
        let mut all = 0;
        for (index, row) in self.0.iter().enumerate() {
            let [read, write, notify, interrupt] = *row;
            let sum = read + write + notify + interrupt;
            if sum == 0 {
                continue;
            }
            all += sum;
            targets.insert(
                ExitTarget::from_index(index).name(),
                AccessCounts {
                    read,
                    write,
                    notify,
                    interrupt,
                },
            );
        }
        ExitCounts { all, targets }
    }
}

/// The run's exit counters and the spans the guest's markers cut them into.
pub struct ExitCounters {
    counts: [[AtomicU64; ACCESSES]; TARGETS],
    spans: Mutex<Spans>,
}

#[derive(Default)]
struct Spans {
    /// Spans begun and not yet ended, with the counters at their `BEGIN`.
    open: HashMap<String, Snapshot>,
    /// Spans ended, in the order they ended.
    closed: Vec<SpanExits>,
}

impl Default for ExitCounters {
    fn default() -> Self {
        ExitCounters {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            spans: Mutex::new(Spans::default()),
        }
    }
}

impl ExitCounters {
    /// Counts one exit.
    pub fn count(&self, (target, access): (ExitTarget, Access)) {
        self.counts[target.index()][access.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot(std::array::from_fn(|t| {
            std::array::from_fn(|a| self.counts[t][a].load(Ordering::Relaxed))
        }))
    }

    /// Takes the counters at a control-channel mark: a `BEGIN` opens its span, an
    /// `END` closes the span of the same name; other labels do nothing. Called on
    /// the vCPU thread while the mark's last byte is being written, so a span holds
    /// the exits of its `END` line and not those of its `BEGIN` line.
    pub fn mark(&self, label: &str) {
        let Some(marker) = Marker::parse(label) else {
            return;
        };
        let now = self.snapshot();
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        match marker {
            Marker::Begin(span) => {
                spans.open.insert(span.to_string(), now);
            }
            Marker::End(span) => {
                let span = span.to_string();
                // An END without its BEGIN has nothing to measure from.
                if let Some(begun) = spans.open.remove(&span) {
                    let exits = now.since(&begun).counts();
                    spans.closed.push(SpanExits { span, exits });
                }
            }
        }
    }

    /// The whole run's counts and every closed span's.
    pub fn report(&self) -> VcpuExits {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        VcpuExits {
            total: self.snapshot().counts(),
            spans: spans.closed.clone(),
        }
    }
}

/// Exits to the VMM in `run.json`: the whole run's, and each marked span's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VcpuExits {
    /// From the first vCPU entry to the end of the run.
    pub total: ExitCounts,
    /// Each span the guest marked with `BEGIN`/`END` (`<method>@<variant>`), in the
    /// order they ended.
    pub spans: Vec<SpanExits>,
}

impl VcpuExits {
    /// The counts of span `name`, if it was marked (the last one of that name).
    pub fn span(&self, name: &str) -> Option<&ExitCounts> {
        self.spans
            .iter()
            .rev()
            .find(|s| s.span == name)
            .map(|s| &s.exits)
    }
}

/// One span's exits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanExits {
    /// The span's name, as its markers say it.
    pub span: String,
    /// The exits between its markers.
    pub exits: ExitCounts,
}

/// Exits by device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Every exit counted.
    pub all: u64,
    /// By device ([`ExitTarget::name`]); a device with no exits is left out.
    pub targets: BTreeMap<String, AccessCounts>,
}

impl std::fmt::Display for ExitCounts {
    /// `1234 (blk 10, console 1200, net0 24)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.all)?;
        let mut sep = " (";
        for (name, counts) in &self.targets {
            write!(f, "{sep}{name} {}", counts.all())?;
            sep = ", ";
        }
        if sep == ", " {
            f.write_str(")")?;
        }
        Ok(())
    }
}

impl ExitCounts {
    /// The sum of one kind of access over every device.
    pub fn sum(&self, kind: impl Fn(&AccessCounts) -> u64) -> u64 {
        self.targets.values().map(kind).sum()
    }
}

/// One device's exits by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessCounts {
    /// Reads (port `in`, MMIO reads) but interrupt-status reads.
    pub read: u64,
    /// Writes (port `out`, MMIO writes) but notifies and interrupt acknowledges.
    pub write: u64,
    /// Queue notifies that reached the VMM (an ioeventfd takes them normally).
    pub notify: u64,
    /// Interrupt-status reads and interrupt acknowledges.
    pub interrupt: u64,
}

impl AccessCounts {
    /// All of them.
    pub fn all(&self) -> u64 {
        self.read + self.write + self.notify + self.interrupt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zc_devices::pci::bus::CONFIG_ADDRESS_PORT;

    const DISK: u64 = 0xd000_0000;
    const NIC0: u64 = 0xd000_1000;

    fn map() -> ExitMap {
        let mut map = ExitMap::default();
        map.add_mmio(DISK, 0x1000, ExitTarget::Disk);
        map.add_mmio(NIC0, 0x1000, ExitTarget::Nic(0));
        map
    }

    #[test]
    fn ports_are_told_apart_by_device() {
        assert_eq!(
            ExitMap::port(COM1_BASE, true),
            (ExitTarget::Console, Access::Write)
        );
        assert_eq!(
            ExitMap::port(COM2_BASE + 5, false),
            (ExitTarget::Control, Access::Read)
        );
        assert_eq!(
            ExitMap::port(SAMPLE_PORT, true),
            (ExitTarget::DirtySample, Access::Write)
        );
        assert_eq!(
            ExitMap::port(CONFIG_ADDRESS_PORT + 4, false),
            (ExitTarget::PciConfig, Access::Read)
        );
        assert_eq!(
            ExitMap::port(0x80, true),
            (ExitTarget::OtherPort, Access::Write)
        );
    }

    #[test]
    fn virtio_mmio_registers_are_told_apart_by_kind() {
        let map = map();
        assert_eq!(
            map.mmio(NIC0 + mmio_reg::QUEUE_NOTIFY, 4, true),
            (ExitTarget::Nic(0), Access::Notify)
        );
        assert_eq!(
            map.mmio(DISK + mmio_reg::INTERRUPT_STATUS, 4, false),
            (ExitTarget::Disk, Access::Interrupt)
        );
        assert_eq!(
            map.mmio(DISK + mmio_reg::INTERRUPT_ACK, 4, true),
            (ExitTarget::Disk, Access::Interrupt)
        );
        // A read of the notify register is no notify; a write of the status
        // register is no acknowledge.
        assert_eq!(
            map.mmio(NIC0 + mmio_reg::QUEUE_NOTIFY, 4, false),
            (ExitTarget::Nic(0), Access::Read)
        );
        assert_eq!(
            map.mmio(NIC0 + mmio_reg::INTERRUPT_STATUS, 4, true),
            (ExitTarget::Nic(0), Access::Write)
        );
        assert_eq!(
            map.mmio(NIC0 + mmio_reg::STATUS, 4, true),
            (ExitTarget::Nic(0), Access::Write)
        );
        assert_eq!(
            map.mmio(DISK + 0x100, 8, false),
            (ExitTarget::Disk, Access::Read)
        );
        assert_eq!(
            map.mmio(NIC0 + 0x1000, 4, false),
            (ExitTarget::OtherMmio, Access::Read)
        );
    }

    #[test]
    fn virtio_pci_registers_are_told_apart_by_kind() {
        assert_eq!(
            register_access(Layout::Pci, virtio_pci::NOTIFY_OFFSET + 4, true),
            Access::Notify
        );
        assert_eq!(
            register_access(Layout::Pci, virtio_pci::ISR_OFFSET, false),
            Access::Interrupt
        );
        assert_eq!(
            register_access(Layout::Pci, virtio_pci::MSIX_TABLE_OFFSET, true),
            Access::Write
        );
        assert_eq!(
            register_access(Layout::Pci, virtio_pci::DEVICE_CFG_OFFSET, false),
            Access::Read
        );
    }

    #[test]
    fn every_target_has_its_own_row() {
        let mut targets = vec![
            ExitTarget::Disk,
            ExitTarget::Console,
            ExitTarget::Control,
            ExitTarget::DirtySample,
            ExitTarget::PciConfig,
            ExitTarget::OtherPort,
            ExitTarget::OtherMmio,
        ];
        targets.extend((0..MAX_CARDS).map(ExitTarget::Nic));
        let mut rows: Vec<usize> = targets.iter().map(|t| t.index()).collect();
        for t in &targets {
            assert_eq!(ExitTarget::from_index(t.index()), *t);
        }
        rows.sort_unstable();
        rows.dedup();
        assert_eq!(rows.len(), TARGETS);
        assert_eq!(rows.last(), Some(&(TARGETS - 1)));
    }

    /// Counts `n` exits of one kind.
    fn count(counters: &ExitCounters, n: u64, exit: (ExitTarget, Access)) {
        for _ in 0..n {
            counters.count(exit);
        }
    }

    #[test]
    fn each_span_gets_the_exits_between_its_markers() {
        let counters = ExitCounters::default();
        let map = map();
        count(&counters, 100, ExitMap::port(COM1_BASE, true)); // boot
        counters.mark("BEGIN sendfile@sg-on");
        count(
            &counters,
            7,
            map.mmio(DISK + mmio_reg::INTERRUPT_STATUS, 4, false),
        );
        count(
            &counters,
            7,
            map.mmio(DISK + mmio_reg::INTERRUPT_ACK, 4, true),
        );
        count(
            &counters,
            3,
            map.mmio(NIC0 + mmio_reg::QUEUE_NOTIFY, 4, true),
        );
        count(&counters, 2, ExitMap::port(SAMPLE_PORT, true));
        counters.mark("dirty"); // not a marker: no span
        counters.mark("END sendfile@sg-on");
        count(&counters, 5, ExitMap::port(COM2_BASE, true)); // its report
        counters.mark("BEGIN splice@sg-on");
        count(&counters, 4, map.mmio(NIC0 + mmio_reg::STATUS, 4, false));
        counters.mark("END splice@sg-on");
        counters.mark("END never-begun");
        counters.mark("BEGIN never-ended");
        count(&counters, 1, ExitMap::port(0x80, true));

        let report = counters.report();
        assert_eq!(report.total.all, 100 + 14 + 3 + 2 + 5 + 4 + 1);
        assert_eq!(report.total.targets["console"].write, 100);
        assert_eq!(
            report
                .spans
                .iter()
                .map(|s| s.span.as_str())
                .collect::<Vec<_>>(),
            ["sendfile@sg-on", "splice@sg-on"]
        );
        let sendfile = report.span("sendfile@sg-on").unwrap();
        assert_eq!(sendfile.all, 19);
        assert_eq!(
            sendfile.targets["blk"],
            AccessCounts {
                interrupt: 14,
                ..AccessCounts::default()
            }
        );
        assert_eq!(sendfile.targets["net0"].notify, 3);
        assert_eq!(sendfile.targets["dirty_sample"].write, 2);
        assert!(!sendfile.targets.contains_key("console"));
        assert_eq!(sendfile.sum(|a| a.interrupt), 14);
        let splice = report.span("splice@sg-on").unwrap();
        assert_eq!(splice.all, 4);
        assert_eq!(splice.targets["net0"].read, 4);
        assert_eq!(sendfile.to_string(), "19 (blk 14, dirty_sample 2, net0 3)");
        assert_eq!(ExitCounts::default().to_string(), "0");
        assert_eq!(report.span("never-ended"), None);
        assert_eq!(report.span("never-begun"), None);
    }

    #[test]
    fn counts_from_several_vcpu_threads_all_land() {
        let counters = Arc::new(ExitCounters::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = counters.clone();
                std::thread::spawn(move || count(&c, 1000, ExitMap::port(COM1_BASE, false)))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counters.report().total.targets["console"].read, 4000);
    }

    #[test]
    fn the_report_reads_back_from_json() {
        let counters = ExitCounters::default();
        counters.mark("BEGIN m@v");
        counters.count((ExitTarget::Nic(1), Access::Interrupt));
        counters.mark("END m@v");
        let report = counters.report();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["spans"][0]["span"], "m@v");
        assert_eq!(json["spans"][0]["exits"]["targets"]["net1"]["interrupt"], 1);
        assert_eq!(json["total"]["all"], 1);
        let back: VcpuExits = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }
}
