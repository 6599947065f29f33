//! The virtio-pci transport driven as Linux's `virtio_pci_modern` drives it: find the
//! capabilities, size the BAR, negotiate, set up queues and vectors, take interrupts.

use super::*;
use crate::pci::config::reg;
use crate::pci::msix::{RecordingDelivery, CONTROL_ENABLE, CONTROL_FUNCTION_MASK, ENTRY_SIZE};
use crate::virtio::mmio::tests::{mem, FakeDevice};
use crate::virtio::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use crate::virtio::{VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const BAR0: u32 = 0xe000_0000;

fn transport() -> (PciTransport<FakeDevice>, Arc<RecordingDelivery>) {
    let delivery = Arc::new(RecordingDelivery::default());
    let device = FakeDevice {
        config: vec![1, 2, 3, 4, 5, 6, 7, 8],
        sizes: vec![16, 8],
        ..Default::default()
    };
    (
        PciTransport::new(device, mem(), BAR0, delivery.clone()),
        delivery,
    )
}

fn cfg8(t: &mut PciTransport<FakeDevice>, offset: usize) -> u8 {
    let mut b = [0u8];
    t.read_config(offset, &mut b);
    b[0]
}

fn cfg32(t: &mut PciTransport<FakeDevice>, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    t.read_config(offset, &mut b);
    u32::from_le_bytes(b)
}

fn bar_read(t: &mut PciTransport<FakeDevice>, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.read_bar(0, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn bar_write(t: &mut PciTransport<FakeDevice>, offset: u64, len: usize, value: u64) {
    t.write_bar(0, offset, &value.to_le_bytes()[..len]);
}

/// Each virtio capability as (cfg_type, bar, offset, length, extra dword).
fn virtio_caps(t: &mut PciTransport<FakeDevice>) -> Vec<(u8, u8, u32, u32, Option<u32>)> {
    let mut caps = vec![];
    let mut at = usize::from(cfg8(t, reg::CAPABILITIES_POINTER));
    while at != 0 {
        if cfg8(t, at) == 0x09 {
            let len = cfg8(t, at + 2);
            let extra = (len >= 20).then(|| cfg32(t, at + 16));
            caps.push((
                cfg8(t, at + 3),
                cfg8(t, at + 4),
                cfg32(t, at + 8),
                cfg32(t, at + 12),
                extra,
            ));
        }
        at = usize::from(cfg8(t, at + 1));
    }
    caps
}

fn msix_capability(t: &mut PciTransport<FakeDevice>) -> usize {
    let mut at = usize::from(cfg8(t, reg::CAPABILITIES_POINTER));
    while at != 0 && cfg8(t, at) != 0x11 {
        at = usize::from(cfg8(t, at + 1));
    }
    assert_ne!(at, 0, "no MSI-X capability");
    at
}

fn enable_msix(t: &mut PciTransport<FakeDevice>, control: u16) {
    let at = msix_capability(t);
    t.write_config(at + 2, &control.to_le_bytes());
}

fn program_vector(t: &mut PciTransport<FakeDevice>, vector: u64, data: u32) {
    let at = MSIX_TABLE_OFFSET + vector * ENTRY_SIZE;
    bar_write(t, at, 4, 0xfee0_0000);
    bar_write(t, at + 4, 4, 0);
    bar_write(t, at + 8, 4, u64::from(data));
    bar_write(t, at + 12, 4, 0);
}

/// Status handshake and features, as `virtio_dev_probe` does, to FEATURES_OK.
fn negotiate(t: &mut PciTransport<FakeDevice>, features: u64) -> u8 {
    bar_write(t, common::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE));
    bar_write(t, common::DEVICE_STATUS, 1, u64::from(ACKNOWLEDGE | DRIVER));
    bar_write(t, common::DRIVER_FEATURE_SELECT, 4, 0);
    bar_write(t, common::DRIVER_FEATURE, 4, features & 0xffff_ffff);
    bar_write(t, common::DRIVER_FEATURE_SELECT, 4, 1);
    bar_write(t, common::DRIVER_FEATURE, 4, features >> 32);
    bar_write(
        t,
        common::DEVICE_STATUS,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
    );
    u8::try_from(bar_read(t, common::DEVICE_STATUS, 1)).unwrap()
}

/// `vp_modern_setup_vq` + `vp_modern_queue_vector` for queue `index`.
fn setup_queue(
    t: &mut PciTransport<FakeDevice>,
    index: u16,
    size: u16,
    base: u64,
    vector: u16,
) -> u16 {
    bar_write(t, common::QUEUE_SELECT, 2, u64::from(index));
    bar_write(t, common::QUEUE_SIZE, 2, u64::from(size));
    bar_write(t, common::QUEUE_DESC_LO, 4, base);
    bar_write(t, common::QUEUE_DESC_HI, 4, 0);
    bar_write(t, common::QUEUE_DRIVER_LO, 4, base + 0x1000);
    bar_write(t, common::QUEUE_DRIVER_HI, 4, 0);
    bar_write(t, common::QUEUE_DEVICE_LO, 4, base + 0x2000);
    bar_write(t, common::QUEUE_DEVICE_HI, 4, 0);
    bar_write(t, common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
    let read_back = u16::try_from(bar_read(t, common::QUEUE_MSIX_VECTOR, 2)).unwrap();
    bar_write(t, common::QUEUE_ENABLE, 2, 1);
    read_back
}

#[test]
fn identity_and_class_follow_the_virtio_spec() {
    let (mut t, _) = transport();
    assert_eq!(
        cfg32(&mut t, 0),
        (0x1040 + 42) << 16 | 0x1af4,
        "device 0x1040 + type"
    );
    assert_eq!(cfg32(&mut t, 8) & 0xff, 1, "revision 1: modern only");
    assert_eq!(cfg32(&mut t, 0x2c), 0x0040_1af4, "subsystem 0x40 or above");
    assert_eq!(cfg8(&mut t, reg::INTERRUPT_PIN), 0, "no INTx: MSI-X only");
    assert_eq!(class_of(1), 0x02_00_00);
    assert_eq!(class_of(2), 0x01_80_00);
}

#[test]
fn the_capabilities_describe_bar0s_layout() {
    let (mut t, _) = transport();
    assert_eq!(
        virtio_caps(&mut t),
        vec![
            (cfg_type::COMMON, 0, 0x0000, 0x38, None),
            (cfg_type::NOTIFY, 0, 0x3000, 0x1000, Some(4)),
            (cfg_type::ISR, 0, 0x1000, 1, None),
            (cfg_type::DEVICE, 0, 0x2000, 0x1000, None),
            (cfg_type::PCI, 0, 0, 0, Some(0)),
        ]
    );
    let at = msix_capability(&mut t);
    assert_eq!(cfg32(&mut t, at) >> 16, 2, "3 vectors: config + 2 queues");
    assert_eq!(cfg32(&mut t, at + 4), 0x4000, "table in BAR0 at 0x4000");
    assert_eq!(cfg32(&mut t, at + 8), 0x5000, "PBA in BAR0 at 0x5000");
    // Every region lies inside BAR0.
    for (_, _, offset, length, _) in virtio_caps(&mut t) {
        assert!(u64::from(offset) + u64::from(length) <= u64::from(BAR0_SIZE));
    }
    // The capability chain cannot be rewritten by the guest.
    t.write_config(reg::CAPABILITIES_POINTER, &[0]);
    t.write_config(at + 1, &[0]);
    assert_eq!(virtio_caps(&mut t).len(), 5);
}

#[test]
fn bar0_sizes_and_follows_the_guest() {
    let (mut t, _) = transport();
    assert_eq!(cfg32(&mut t, reg::BAR0), BAR0);
    assert_eq!(t.bar_windows()[0].base, u64::from(BAR0));
    assert_eq!(
        t.notify_addresses(),
        vec![(0, 0xe000_3000), (1, 0xe000_3004)]
    );
    t.write_config(reg::COMMAND, &0u16.to_le_bytes());
    assert!(
        t.notify_addresses().is_empty(),
        "no decoding, no notify addresses"
    );
    t.write_config(reg::BAR0, &u32::MAX.to_le_bytes());
    assert_eq!(cfg32(&mut t, reg::BAR0), !(BAR0_SIZE - 1));
    t.write_config(reg::BAR0, &0xe010_0000u32.to_le_bytes());
    t.write_config(reg::COMMAND, &0x6u16.to_le_bytes());
    assert_eq!(t.bar_windows()[0].base, 0xe010_0000);
    assert_eq!(
        t.notify_addresses(),
        vec![(0, 0xe010_3000), (1, 0xe010_3004)]
    );
}

#[test]
fn queue_setup_and_activation_through_the_common_configuration() {
    let (mut t, _) = transport();
    assert_eq!(bar_read(&mut t, common::NUM_QUEUES, 2), 2);
    bar_write(&mut t, common::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(bar_read(&mut t, common::DEVICE_FEATURE_SELECT, 4), 1);
    assert_eq!(
        bar_read(&mut t, common::DEVICE_FEATURE, 4),
        1,
        "VERSION_1 is bit 32"
    );
    bar_write(&mut t, common::DEVICE_FEATURE_SELECT, 4, 0);
    assert_eq!(bar_read(&mut t, common::DEVICE_FEATURE, 4) & 0xf, 1 << 3);

    let features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;
    assert_eq!(
        u32::from(negotiate(&mut t, features)),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    assert_eq!(t.virtio().acked_features(), features);
    // A queue's size reads as its maximum until the driver picks another; a queue
    // that does not exist reads size 0 (how Linux counts them).
    bar_write(&mut t, common::QUEUE_SELECT, 2, 1);
    assert_eq!(bar_read(&mut t, common::QUEUE_SIZE, 2), 8);
    assert_eq!(bar_read(&mut t, common::QUEUE_NOTIFY_OFF, 2), 1);
    bar_write(&mut t, common::QUEUE_SELECT, 2, 2);
    assert_eq!(bar_read(&mut t, common::QUEUE_SIZE, 2), 0);
    assert_eq!(setup_queue(&mut t, 0, 8, 0x1_0000, 1), 1);
    assert_eq!(bar_read(&mut t, common::QUEUE_ENABLE, 2), 1);
    assert_eq!(bar_read(&mut t, common::QUEUE_DRIVER_LO, 4), 0x1_1000);
    bar_write(
        &mut t,
        common::DEVICE_STATUS,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert!(t.virtio().is_active());
    let (acked, queues) = t.device().activated.clone().unwrap();
    assert_eq!(acked, features);
    assert_eq!(queues, vec![(true, 8, true), (false, 8, true)]);
    // Notify through the BAR (the path without an ioeventfd): queue n at 4*n.
    bar_write(&mut t, NOTIFY_OFFSET, 2, 0);
    bar_write(&mut t, NOTIFY_OFFSET + 4, 2, 1);
    bar_write(&mut t, NOTIFY_OFFSET + 2, 2, 1);
    t.notify_queue(1);
    assert_eq!(t.device().notified, vec![0, 1, 1]);
    // Device configuration at 0x2000.
    assert_eq!(bar_read(&mut t, DEVICE_CFG_OFFSET + 6, 2), 0x0807);
}

#[test]
fn each_queue_and_the_configuration_interrupt_on_their_own_vector() {
    let (mut t, delivery) = transport();
    enable_msix(&mut t, CONTROL_ENABLE);
    for v in 0..3u32 {
        program_vector(&mut t, u64::from(v), 0x40 + v);
    }
    // The route each vector ends with is the message the guest wrote.
    for v in 0..3u16 {
        let last = delivery
            .routed()
            .into_iter()
            .rev()
            .find(|(vector, _)| *vector == v);
        assert_eq!(
            last.map(|(_, m)| (m.address, m.data)),
            Some((0xfee0_0000, 0x40 + u32::from(v)))
        );
    }
    bar_write(&mut t, common::CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(bar_read(&mut t, common::CONFIG_MSIX_VECTOR, 2), 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    assert_eq!(setup_queue(&mut t, 0, 8, 0x1_0000, 1), 1);
    assert_eq!(setup_queue(&mut t, 1, 8, 0x2_0000, 2), 2);
    // A vector the table does not have is refused: it reads back as NO_VECTOR.
    bar_write(&mut t, common::QUEUE_SELECT, 2, 1);
    bar_write(&mut t, common::QUEUE_MSIX_VECTOR, 2, 3);
    assert_eq!(
        bar_read(&mut t, common::QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
    bar_write(&mut t, common::QUEUE_MSIX_VECTOR, 2, 2);

    let irq: Arc<VirtioInterrupt> = t.virtio().interrupt().clone();
    irq.signal(InterruptKind::Queue(1)).unwrap();
    irq.signal(InterruptKind::Queue(0)).unwrap();
    irq.set_needs_reset();
    irq.signal(InterruptKind::Queue(7)).unwrap();
    assert_eq!(delivery.triggered(), vec![2, 1, 0], "queue 7 has no vector");
    assert_ne!(
        bar_read(&mut t, common::DEVICE_STATUS, 1) & u64::from(DEVICE_NEEDS_RESET),
        0
    );
}

#[test]
fn masked_vectors_wait_in_the_pba() {
    let (mut t, delivery) = transport();
    enable_msix(&mut t, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
    program_vector(&mut t, 1, 0x41);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x1_0000, 1);
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Queue(0))
        .unwrap();
    assert!(delivery.triggered().is_empty());
    assert_eq!(bar_read(&mut t, MSIX_PBA_OFFSET, 8), 0b10);
    // Writes to the PBA are ignored.
    bar_write(&mut t, MSIX_PBA_OFFSET, 8, 0);
    assert_eq!(bar_read(&mut t, MSIX_PBA_OFFSET, 8), 0b10);
    enable_msix(&mut t, CONTROL_ENABLE);
    assert_eq!(delivery.triggered(), vec![1]);
    assert_eq!(bar_read(&mut t, MSIX_PBA_OFFSET, 8), 0);
    // With MSI-X off nothing is sent (there is no INTx to fall back on).
    enable_msix(&mut t, 0);
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Queue(0))
        .unwrap();
    assert_eq!(delivery.triggered(), vec![1]);
}

#[test]
fn the_isr_reads_and_clears() {
    let (mut t, _) = transport();
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Queue(0))
        .unwrap();
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Config)
        .unwrap();
    assert_eq!(bar_read(&mut t, ISR_OFFSET, 1), 3);
    assert_eq!(bar_read(&mut t, ISR_OFFSET, 1), 0);
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Queue(0))
        .unwrap();
    assert_eq!(bar_read(&mut t, ISR_OFFSET, 2), 0, "wrong width");
    assert_eq!(bar_read(&mut t, ISR_OFFSET, 1), 1, "and not cleared by it");
}

#[test]
fn reset_clears_status_queues_and_vector_choices_but_not_the_table() {
    let (mut t, delivery) = transport();
    enable_msix(&mut t, CONTROL_ENABLE);
    program_vector(&mut t, 0, 0x40);
    bar_write(&mut t, common::CONFIG_MSIX_VECTOR, 2, 0);
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x1_0000, 0);
    bar_write(&mut t, common::DEVICE_STATUS, 1, 0);
    assert_eq!(bar_read(&mut t, common::DEVICE_STATUS, 1), 0);
    assert_eq!(t.device().resets, 1);
    assert_eq!(
        bar_read(&mut t, common::CONFIG_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
    bar_write(&mut t, common::QUEUE_SELECT, 2, 0);
    assert_eq!(
        bar_read(&mut t, common::QUEUE_MSIX_VECTOR, 2),
        u64::from(NO_VECTOR)
    );
    assert_eq!(bar_read(&mut t, common::QUEUE_ENABLE, 2), 0);
    assert_eq!(bar_read(&mut t, common::QUEUE_SIZE, 2), 16);
    assert_eq!(
        bar_read(&mut t, MSIX_TABLE_OFFSET + 8, 4),
        0x40,
        "the table is PCI's, not virtio's"
    );
    t.virtio()
        .interrupt()
        .signal(InterruptKind::Config)
        .unwrap();
    assert!(delivery.triggered().is_empty());
}

#[test]
fn the_pci_cfg_window_reaches_bar0() {
    let (mut t, _) = transport();
    let cap = {
        let mut at = usize::from(cfg8(&mut t, reg::CAPABILITIES_POINTER));
        while !(cfg8(&mut t, at) == 0x09 && cfg8(&mut t, at + 3) == cfg_type::PCI) {
            at = usize::from(cfg8(&mut t, at + 1));
        }
        at
    };
    t.write_config(cap + 4, &[0]);
    t.write_config(
        cap + 8,
        &u32::try_from(common::NUM_QUEUES).unwrap().to_le_bytes(),
    );
    t.write_config(cap + 12, &2u32.to_le_bytes());
    let mut b = [0u8; 2];
    t.read_config(cap + 16, &mut b);
    assert_eq!(u16::from_le_bytes(b), 2);
    // A write through the window: device_status = ACKNOWLEDGE.
    t.write_config(
        cap + 8,
        &u32::try_from(common::DEVICE_STATUS).unwrap().to_le_bytes(),
    );
    t.write_config(cap + 12, &1u32.to_le_bytes());
    t.write_config(cap + 16, &[u8::try_from(ACKNOWLEDGE).unwrap()]);
    assert_eq!(
        bar_read(&mut t, common::DEVICE_STATUS, 1),
        u64::from(ACKNOWLEDGE)
    );
    // A length other than 1, 2 or 4 reads zero and writes nothing.
    t.write_config(cap + 12, &3u32.to_le_bytes());
    t.write_config(cap + 16, &[0]);
    assert_eq!(
        bar_read(&mut t, common::DEVICE_STATUS, 1),
        u64::from(ACKNOWLEDGE)
    );
}

#[rstest::rstest]
#[case::status_as_a_word(common::DEVICE_STATUS, 2)]
#[case::queue_select_as_a_dword(common::QUEUE_SELECT, 4)]
#[case::feature_as_a_byte(common::DEVICE_FEATURE, 1)]
#[case::desc_as_a_qword(common::QUEUE_DESC_LO, 8)]
#[case::inside_a_field(common::DEVICE_FEATURE + 1, 1)]
#[case::gap_after_common(0x100, 4)]
#[case::past_the_bar(u64::from(BAR0_SIZE) - 2, 4)]
#[case::wrapping(u64::MAX - 1, 4)]
fn wrong_width_or_place_is_ignored(#[case] offset: u64, #[case] len: usize) {
    let (mut t, _) = transport();
    bar_write(&mut t, offset, len, u64::MAX);
    assert_eq!(bar_read(&mut t, offset, len), 0);
    assert_eq!(bar_read(&mut t, common::DEVICE_STATUS, 1), 0);
    bar_write(&mut t, common::QUEUE_SELECT, 2, 0);
    assert_eq!(bar_read(&mut t, common::QUEUE_SIZE, 2), 16);
    // Other BARs do not exist.
    let mut b = [9u8; 4];
    t.read_bar(1, 0, &mut b);
    assert_eq!(b, [0; 4]);
    t.write_bar(1, 0, &b);
}

/// The queue check at DRIVER_OK is the one the MMIO transport runs: a layout it
/// refuses is refused here too, with NEEDS_RESET, a configuration interrupt and the
/// same `device_error`; the registers read back what the driver wrote.
#[rstest::rstest]
#[case::misaligned_used_ring(0x1_2002, "used ring at 0x12002 is not aligned to 4 bytes")]
#[case::used_ring_over_the_available_ring(
    0x1_1004,
    "used ring 0x11004+0x46 overlaps the available ring at 0x11000 of queue 0"
)]
fn unusable_rings_are_refused_at_driver_ok(#[case] used: u64, #[case] what: &str) {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_F_VERSION_1);
    setup_queue(&mut t, 0, 8, 0x1_0000, 1);
    bar_write(&mut t, common::QUEUE_DEVICE_LO, 4, used);
    bar_write(
        &mut t,
        common::DEVICE_STATUS,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    assert!(!t.virtio().is_active());
    assert!(t.device().activated.is_none());
    let status = u32::try_from(bar_read(&mut t, common::DEVICE_STATUS, 1)).unwrap();
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        bar_read(&mut t, ISR_OFFSET, 1),
        2,
        "configuration interrupt"
    );
    assert_eq!(
        t.device().errors(),
        vec![(0, format!("DRIVER_OK refused: queue 0: {what}"), true)]
    );
    assert_eq!(bar_read(&mut t, common::QUEUE_DEVICE_LO, 4), used);
}
