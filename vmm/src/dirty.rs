//! Dirty-page samples: which payload bytes the guest CPU wrote, and where.
//!
//! The device log shows where the NIC read each payload byte from; it cannot show how
//! many times the guest CPU copied that byte on the way (1 or 2 copies look the same
//! at the NIC). Guest memory shows it: KVM's dirty-page log lists every page the guest
//! CPU wrote since the last read of the log, and a copied payload byte sits in one of
//! them. Buffers are reused chunk after chunk, so the guest asks for a sample after
//! every chunk (one port write), and each sample scans the pages dirtied since the
//! previous one for content of the source file ([`PayloadIndex`]).
//!
//! The KVM part ([`DirtySampler`]) is thin; the scan is plain functions over byte
//! slices, tested without a VM.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use zc_dma_log::{DmaLog, PayloadRun};

/// Guest page size (the dirty log's granule).
const PAGE: usize = 4096;
/// Width of an index window: one aligned 64-bit load per probe.
const WINDOW: usize = 8;
/// The index holds the windows at file offsets `f` with `f % PERIOD < WINDOW`
/// (every offset of one 8-byte slot per 64). Probing the page at every 8-byte-aligned
/// position then meets, in any copied run at any alignment, one position whose file
/// offset is indexed within `PERIOD` bytes: runs of `PERIOD + 2 * WINDOW - 1` bytes
/// or more are always found, at 1/8 of the index size and 1/8 of the probes of indexing and
/// probing every byte.
const PERIOD: usize = 64;
/// Shortest run reported: the protocol's, which the audit's tests simulate too.
const MIN_RUN: usize = zc_protocol::dirty::MIN_PAYLOAD_RUN;
/// Label of the sample taken at an `END` marker.
pub const END_SAMPLE: u32 = zc_protocol::dirty::END_SAMPLE;

/// A hasher for keys that are already uniformly random (8 bytes of the random test
/// file): one multiply spreads them over the table. Hand-written because SipHash,
/// the std default, costs several times the probe itself under TCG.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = word.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Finds the source file's content in arbitrary memory: which file offset a run of
/// bytes was copied from.
pub struct PayloadIndex {
    source: Arc<Vec<u8>>,
    windows: HashMap<u64, usize, BuildHasherDefault<MixHasher>>,
}

impl PayloadIndex {
    /// Indexes `source`. Windows that occur twice in the file (not in random test
    /// files, but in a user's) keep their first offset; an all-zero window is never
    /// indexed, since zeroed memory is everywhere.
    pub fn new(source: Arc<Vec<u8>>) -> PayloadIndex {
        let mut windows = HashMap::with_capacity_and_hasher(
            source.len() / PERIOD * WINDOW,
            BuildHasherDefault::default(),
        );
        let mut base = 0;
        while base + WINDOW <= source.len() {
            for f in base..(base + WINDOW).min(source.len() + 1 - WINDOW) {
                let word = load(&source, f);
                if word != 0 {
                    windows.entry(word).or_insert(f);
                }
            }
            base += PERIOD;
        }
        PayloadIndex { source, windows }
    }

    /// The file's bytes.
    pub fn source(&self) -> &[u8] {
        &self.source
    }

    /// Appends to `runs` every run of file content in `page` (the guest page at
    /// `page_gpa`), in address order. Each run is as long as the content matches,
    /// within the page.
    pub fn scan_page(&self, page_gpa: u64, page: &[u8], runs: &mut Vec<PayloadRun>) {
        let src = &self.source[..];
        let mut pos = 0;
        let mut covered = 0; // bytes below this are inside a reported run
        while pos + WINDOW <= page.len() {
            let word = load(page, pos);
            let hit = if word == 0 {
                None
            } else {
                self.windows.get(&word).copied()
            };
            let Some(file_at) = hit else {
                pos += WINDOW;
                continue;
            };
            // Grow the match both ways; never back into an earlier run.
            let back = page[covered..pos]
                .iter()
                .rev()
                .zip(src[..file_at].iter().rev())
                .take_while(|(a, b)| a == b)
                .count();
            let fwd = page[pos..]
                .iter()
                .zip(&src[file_at..])
                .take_while(|(a, b)| a == b)
                .count();
            let start = pos - back;
            let len = back + fwd;
            if len >= MIN_RUN {
                runs.push(PayloadRun {
                    gpa: page_gpa + start as u64,
                    len: u32::try_from(len).expect("within one page"),
                    file_off: (file_at - back) as u64,
                });
                covered = start + len;
                pos = covered.next_multiple_of(WINDOW);
            } else {
                pos += WINDOW;
            }
        }
    }
}

fn load(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; WINDOW];
    word.copy_from_slice(&bytes[at..at + WINDOW]);
    u64::from_le_bytes(word)
}

/// One KVM memory slot with dirty logging on.
#[derive(Debug, Clone, Copy)]
pub struct LoggedSlot {
    /// KVM slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

/// Reads KVM's dirty log on request and writes what payload it found to the DMA log.
pub struct DirtySampler {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    slots: Vec<LoggedSlot>,
    index: PayloadIndex,
    log: DmaLog,
    // One sample at a time: two vCPUs sampling at once would split one interval's
    // pages between two records at random. Holds what the samples cost.
    busy: Mutex<SampleCost>,
}

/// What the dirty-page samples cost the guest: each is taken on the vCPU thread
/// that asked, so the guest stands still for it. Reported in `run.json`
/// (`dirty_sample_cost`): the suite's time per method is chunks x (transfer + sample).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleCost {
    /// Samples taken (including the one at each `END`).
    pub samples: u64,
    /// Their total wall time, in seconds.
    pub seconds: f64,
    /// The longest one, in milliseconds.
    pub max_ms: f64,
    /// Dirty pages they read and scanned for payload, in all.
    pub pages_scanned: u64,
}

impl DirtySampler {
    /// A sampler over `slots` (registered with `KVM_MEM_LOG_DIRTY_PAGES`).
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
        slots: Vec<LoggedSlot>,
        index: PayloadIndex,
        log: DmaLog,
    ) -> DirtySampler {
        DirtySampler {
            vm,
            mem,
            slots,
            index,
            log,
            busy: Mutex::new(SampleCost::default()),
        }
    }

    /// Forgets what was dirtied so far (at a method's `BEGIN`: its setup is not its
    /// transfer).
    pub fn clear(&self) {
        let _guard = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        for slot in &self.slots {
            self.take_dirty_log(slot);
        }
    }

    /// Reads and clears `slot`'s dirty bitmap; `None` (reported) if KVM refuses.
    fn take_dirty_log(&self, slot: &LoggedSlot) -> Option<Vec<u64>> {
        self.vm
            .get_dirty_log(
                slot.slot,
                usize::try_from(slot.len).expect("a region this process maps"),
            )
            .map_err(|e| eprintln!("zc-vmm: KVM_GET_DIRTY_LOG failed: {e}"))
            .ok()
    }

    /// Reads and clears the dirty log, scans the dirtied pages and logs a `dirty`
    /// record labelled `sample`.
    pub fn sample(&self, sample: u32) {
        let mut cost = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let mut runs = Vec::new();
        let mut dirtied = Vec::new();
        let mut page = vec![0u8; PAGE];
        for slot in &self.slots {
            let Some(bitmap) = self.take_dirty_log(slot) else {
                continue;
            };
            for (word_index, mut word) in bitmap.into_iter().enumerate() {
                while word != 0 {
                    let bit = word.trailing_zeros() as u64;
                    word &= word - 1;
                    let gpa = slot.start + (word_index as u64 * 64 + bit) * PAGE as u64;
                    if gpa >= slot.start + slot.len {
                        continue;
                    }
                    dirtied.push(gpa / PAGE as u64);
                    if self.mem.read_slice(&mut page, GuestAddress(gpa)).is_ok() {
                        self.index.scan_page(gpa, &page, &mut runs);
                    }
                }
            }
        }
        let pages = dirtied.len() as u64;
        self.log.dirty(sample, dirtied, runs);
        let took = started.elapsed();
        cost.samples += 1;
        cost.seconds += took.as_secs_f64();
        cost.max_ms = cost.max_ms.max(took.as_secs_f64() * 1e3);
        cost.pages_scanned += pages;
    }

    /// What the samples so far cost.
    pub fn cost(&self) -> SampleCost {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The RAM regions of `mem` as the slots `vm::register_memory` gives them.
pub fn slots_of(mem: &GuestMemoryMmap) -> Vec<LoggedSlot> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| LoggedSlot {
            slot: u32::try_from(slot).expect("a handful of regions"),
            start: region.start_addr().0,
            len: region.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Page-unique pseudo-random content like the test disk's payload.
    fn random_file(len: usize) -> Arc<Vec<u8>> {
        random_bytes(len, 0x1234_5678_9abc_def1)
    }

    fn random_bytes(len: usize, seed: u64) -> Arc<Vec<u8>> {
        let mut state = seed;
        let bytes = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24).to_le_bytes()[0]
            })
            .collect();
        Arc::new(bytes)
    }

    fn scan(index: &PayloadIndex, page: &[u8]) -> Vec<PayloadRun> {
        let mut runs = Vec::new();
        index.scan_page(0x10_0000, page, &mut runs);
        runs
    }

    #[test]
    fn finds_a_whole_aligned_page() {
        let file = random_file(64 << 10);
        let index = PayloadIndex::new(file.clone());
        let runs = scan(&index, &file[8192..12288]);
        assert_eq!(
            runs,
            vec![PayloadRun {
                gpa: 0x10_0000,
                len: 4096,
                file_off: 8192
            }]
        );
    }

    #[test]
    fn finds_runs_at_every_alignment_and_their_exact_extent() {
        let file = random_file(64 << 10);
        let index = PayloadIndex::new(file.clone());
        for shift in 0..16usize {
            for file_off in [1usize, 7, 100, 4095, 20_000 + shift] {
                let len = PERIOD + 2 * WINDOW - 1 + shift * 5;
                let at = 66 + shift; // e.g. after Ethernet+IP+TCP headers
                let mut page = vec![0u8; PAGE];
                page[at..at + len].copy_from_slice(&file[file_off..file_off + len]);
                let runs = scan(&index, &page);
                assert_eq!(
                    runs,
                    vec![PayloadRun {
                        gpa: 0x10_0000 + at as u64,
                        len: u32::try_from(len).unwrap(),
                        file_off: file_off as u64
                    }],
                    "shift {shift} file_off {file_off}"
                );
            }
        }
    }

    #[test]
    fn separates_adjacent_runs_from_different_offsets() {
        let file = random_file(64 << 10);
        let index = PayloadIndex::new(file.clone());
        let mut page = vec![0u8; PAGE];
        page[..1448].copy_from_slice(&file[30_000..31_448]);
        page[1448..2896].copy_from_slice(&file[5_000..6_448]);
        let runs = scan(&index, &page);
        assert_eq!(runs.len(), 2, "{runs:?}");
        assert_eq!((runs[0].len, runs[0].file_off), (1448, 30_000));
        assert_eq!(
            (runs[1].gpa, runs[1].len, runs[1].file_off),
            (0x10_0000 + 1448, 1448, 5_000)
        );
    }

    #[test]
    fn ignores_zeroes_other_data_and_short_matches() {
        let file = random_file(64 << 10);
        let index = PayloadIndex::new(file.clone());
        assert!(scan(&index, &[0u8; PAGE]).is_empty());
        let other = random_bytes(PAGE * 3, 0xfeed_f00d_dead_beef);
        assert!(scan(&index, &other[PAGE..2 * PAGE]).is_empty());
        let mut page = vec![0u8; PAGE];
        page[64..64 + 12].copy_from_slice(&file[640..652]);
        assert!(scan(&index, &page).is_empty());
    }

    #[test]
    fn a_run_at_the_end_of_the_file_and_page() {
        let file = random_file(10_000);
        let index = PayloadIndex::new(file.clone());
        let mut page = vec![0u8; PAGE];
        page[PAGE - 500..].copy_from_slice(&file[10_000 - 500..]);
        let runs = scan(&index, &page);
        assert_eq!(
            runs.iter().map(|r| (r.len, r.file_off)).collect::<Vec<_>>(),
            vec![(500, 9_500)]
        );
    }
}
