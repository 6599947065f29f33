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

#![no_main]

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{
    device_writes, guest_memory, handshake, notify_and_check, read_u16, reg, write_reg, Input,
    NullLine, Op, QueueParams, QueueState, MAX_OPS,
};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zc_devices::dma_log::DmaLog;
use zc_devices::pcap::PcapWriter;
use zc_devices::virtio::mmio::MmioTransport;
use zc_devices::virtio::net::{Net, NetBackend, NetOptions, TX_QUEUE};

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
    };
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
            }
        }
        h.check_frames();
    }
}

impl Harness {
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
