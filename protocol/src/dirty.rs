//! What the VMM's dirty-page scan reports: the audit, and its simulator of the
//! VMM in tests, rely on the same threshold.

/// Shortest run of payload bytes the dirty-page scan reports as a CPU-written copy.
///
/// Random 8-byte windows of the payload do not repeat by chance, but the guest's own
/// small buffers (e.g. a header copied next to payload) may end a run a few bytes
/// in; anything shorter is noise, not a copy of payload.
pub const MIN_PAYLOAD_RUN: usize = 16;

/// The label of the sample the VMM takes at an `END` marker (the guest labels its
/// samples with chunk numbers, which never reach it).
pub const END_SAMPLE: u32 = u32::MAX;
