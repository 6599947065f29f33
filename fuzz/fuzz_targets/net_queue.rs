//! Fuzzes virtio-net's receive and transmit queues with arbitrary guest memory and
//! queue setup.
//!
//! The input is decoded as: the number of driver operations, the feature subset the
//! driver accepts (CSUM, GUEST_CSUM, MRG_RXBUF, INDIRECT_DESC, EVENT_IDX, ...), device
//! options (scatter-gather offer, backend, DMA log, pcap, 1..=16 pending frames), the
//! registers of the RX and the TX queue, up to 8 operations (notify, publish more
//! chains and notify, poke a byte of guest memory, ack interrupts, poll the backend,
//! reset and re-initialise), and finally the first bytes of the 64 KiB of guest RAM at
//! GPA 0. The device is a `Net` behind the real `MmioTransport`, over a backend that
//! either discards every transmitted frame or echoes it back to the guest (so TX
//! frames come back through the RX path, MRG_RXBUF and all).
//!
//! Checked, besides "no panic" (vm-memory bounds every guest access):
//! - frames are conserved: with the echo backend every frame sent is delivered,
//!   dropped (counted) or still pending (or discarded by a reset); with the discard
//!   backend nothing is ever received; never more than `max_pending` wait;
//! - with the discard backend (so RX never writes guest memory), after a TX notify
//!   that leaves the device healthy the TX used `idx` equals the avail `idx`, and
//!   moved by at most the queue size when the driver's `idx` did not change;
//! - once the device is in DEVICE_NEEDS_RESET, `process_queue` changes no guest memory;
//! - the device writes guest memory only inside the device-writable buffers offered
//!   and the used rings (`common::device_writes`).
//!
//! Counters (`ZC_FUZZ_STATS=1`, see `common::stats`): used entries on RX and TX,
//! indirect chains completed on each, frames delivered, frames delivered over more
//! than one buffer with MRG_RXBUF (read from `num_buffers` in the guest's header),
//! completions with EVENT_IDX on and off.

#![no_main]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::stats::count;
use common::{
    descriptor, device_writes, guest_memory, handshake, is_indirect, notify_and_check, read_u16,
    reg, write_reg, Input, NullLine, Op, QueueParams, QueueState, UsedWatch, MAX_OPS,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_devices::dma_log::DmaLog;
use zc_devices::pcap::PcapWriter;
use zc_devices::virtio::mmio::MmioTransport;
use zc_devices::virtio::net::{Net, NetBackend, NetOptions, RX_QUEUE, TX_QUEUE};
use zc_devices::virtio::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;

/// Discards transmitted frames, or hands each straight back to the guest.
struct Backend {
    echo: bool,
    out: VecDeque<Vec<u8>>,
}

impl NetBackend for Backend {
    fn send(&mut self, frame: &[u8], _now: Instant) {
        if self.echo {
            self.out.push_back(frame.to_vec());
        }
    }
    fn poll(&mut self, _now: Instant) {}
    fn take_for_guest(&mut self, out: &mut VecDeque<Vec<u8>>) {
        out.append(&mut self.out);
    }
    fn poll_delay(&mut self, _now: Instant) -> Option<Duration> {
        None
    }
}

/// A DMA log to nowhere, so the logging paths run too.
fn sink_log() -> DmaLog {
    static LOG: OnceLock<DmaLog> = OnceLock::new();
    LOG.get_or_init(|| DmaLog::new(std::io::sink()).expect("log to sink"))
        .clone()
}

fuzz_target!(|data: &[u8]| run(data));

struct Harness {
    t: MmioTransport<Net<Backend>>,
    mem: GuestMemoryMmap,
    /// RX and TX as activated, `None` while the device is not active.
    queues: Option<Vec<QueueState>>,
    echo: bool,
    max_pending: usize,
    /// Pending frames thrown away by resets.
    cleared: u64,
    /// RX and TX used rings as last read.
    watch: [UsedWatch; 2],
}

fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let n_ops = usize::from(inp.u8()) % (MAX_OPS + 1);
    let feature_mask = u64::from(inp.u32());
    let flags = inp.u8();
    let qps = [QueueParams::decode(&mut inp), QueueParams::decode(&mut inp)];
    let ops: Vec<Op> = (0..MAX_OPS).map(|_| Op::decode(&mut inp)).collect();
    let mem = guest_memory(inp.rest());

    let echo = flags & 2 != 0;
    let max_pending = usize::from(flags >> 4) + 1;
    let opts = NetOptions {
        sg: flags & 1 != 0,
        max_pending,
        ..NetOptions::default()
    };
    let log = if flags & 4 != 0 {
        sink_log()
    } else {
        DmaLog::disabled()
    };
    let backend = Backend {
        echo,
        out: VecDeque::new(),
    };
    let mut dev = Net::new(backend, opts, log).expect("valid options");
    if flags & 8 != 0 {
        dev.set_pcap(PcapWriter::new(std::io::sink()).expect("pcap to sink"));
    }
    let mut t = MmioTransport::new(dev, mem.clone(), Arc::new(NullLine));
    let queues = handshake(&mut t, &mem, feature_mask, &qps);
    let mut h = Harness {
        t,
        mem,
        queues,
        echo,
        max_pending,
        cleared: 0,
        watch: Default::default(),
    };
    h.restart_watch();
    h.check_frames();

    for op in &ops[..n_ops] {
        match *op {
            Op::Notify(i) => h.notify_round(i),
            Op::Publish { queue, n } => {
                if let Some(s) = h.queues.as_ref().map(|q| q[usize::from(queue)]) {
                    let idx = read_u16(&h.mem, s.avail + 2).expect("avail ring was validated");
                    h.mem
                        .write_obj(idx.wrapping_add(n), GuestAddress(s.avail + 2))
                        .expect("avail ring was validated");
                }
                h.notify_round(queue);
            }
            Op::Poke { addr, value } => {
                h.mem
                    .write_obj(value, GuestAddress(u64::from(addr)))
                    .expect("u16 address is inside 64 KiB");
            }
            Op::Ack(bits) => write_reg(&mut h.t, reg::INTERRUPT_ACK, bits),
            Op::Poll => {
                let rings = h.queues.clone();
                let t = &mut h.t;
                device_writes(&h.mem, rings.as_deref(), || {
                    t.device_mut().poll_backend(Instant::now())
                });
            }
            Op::Reinit => {
                h.cleared += h.t.device().pending_frames() as u64;
                h.queues = handshake(&mut h.t, &h.mem, feature_mask, &qps);
                h.restart_watch();
            }
        }
        h.check_frames();
        h.count_used();
    }
    let s = h.t.device().stats();
    count("inputs", 1);
    count("rx_frames", s.rx_frames);
    count("tx_frames", s.tx_frames);
    count("csum_completed", s.csum_completed);
}

impl Harness {
    fn restart_watch(&mut self) {
        if let Some(q) = self.queues.as_ref() {
            self.watch = [
                UsedWatch::start(&self.mem, &q[0]),
                UsedWatch::start(&self.mem, &q[1]),
            ];
            count("activations", 1);
        }
    }

    /// Reads what the device added to the used rings since the last call, for the
    /// counters.
    fn count_used(&mut self) {
        let Some(q) = self.queues.as_ref() else {
            return;
        };
        let features = self.t.acked_features();
        let (rx, tx) = (&q[usize::from(RX_QUEUE)], &q[usize::from(TX_QUEUE)]);
        let rx_used = self.watch[usize::from(RX_QUEUE)].advance(&self.mem, rx);
        let tx_used = self.watch[usize::from(TX_QUEUE)].advance(&self.mem, tx);
        let n = (rx_used.len() + tx_used.len()) as u64;
        count("used_entries", n);
        if features & VIRTIO_RING_F_EVENT_IDX != 0 {
            count("used_entries_event_idx_on", n);
        } else {
            count("used_entries_event_idx_off", n);
        }
        let indirect = |q: &QueueState, used: &[(u32, u32)]| {
            used.iter()
                .filter(|(h, _)| is_indirect(&self.mem, q, *h))
                .count() as u64
        };
        count("rx_indirect_chains_completed", indirect(rx, &rx_used));
        count("tx_indirect_chains_completed", indirect(tx, &tx_used));
        if features & VIRTIO_NET_F_MRG_RXBUF == 0 {
            return;
        }
        // Each frame's first buffer starts with the virtio-net header, whose
        // `num_buffers` (offset 10) says how many used entries the frame took.
        let mut i = 0;
        while let Some(&(head, len)) = rx_used.get(i) {
            let first = descriptor(&self.mem, rx, head).and_then(|(addr, _, flags)| {
                if u32::from(flags) & virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT != 0
                    && features & VIRTIO_RING_F_INDIRECT_DESC != 0
                {
                    self.mem.read_obj::<u64>(GuestAddress(addr)).ok()
                } else {
                    Some(addr)
                }
            });
            let buffers = first
                .filter(|_| len >= 12)
                .and_then(|a| read_u16(&self.mem, a + 10))
                .unwrap_or(1)
                .max(1);
            if buffers > 1 {
                count("mrg_rxbuf_frames_over_several_buffers", 1);
            }
            i += usize::from(buffers);
        }
    }

    fn check_frames(&self) {
        let dev = self.t.device();
        let s = dev.stats();
        let pending = dev.pending_frames();
        assert!(
            pending <= self.max_pending,
            "{pending} frames pending, limit {}",
            self.max_pending
        );
        if self.echo {
            assert_eq!(
                s.tx_frames,
                s.rx_frames + s.rx_dropped + pending as u64 + self.cleared,
                "echoed frames not conserved: {s:?}, {pending} pending, {} cleared",
                self.cleared
            );
        } else {
            assert_eq!(
                (s.rx_frames, s.rx_dropped, pending),
                (0, 0, 0),
                "frames received from a backend that sends none"
            );
        }
    }

    /// Notifies queue `index`; with the discard backend, checks the TX used ring
    /// against the TX available ring.
    fn notify_round(&mut self, index: u16) {
        let echo = self.echo;
        let rings = self.queues.clone();
        let tx = self
            .queues
            .as_mut()
            .map(|q| &mut q[usize::from(TX_QUEUE)])
            .filter(|_| index == TX_QUEUE && !echo);
        let (t, mem) = (&mut self.t, &self.mem);
        device_writes(mem, rings.as_deref(), || {
            notify_and_check(t, mem, index, tx, "TX ")
        });
    }
}
