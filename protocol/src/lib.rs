//! `zc-protocol`: every contract the zc guest program, the VMM and the audit share,
//! defined once.
//!
//! - [`method`]: the transfer methods, their names, order and properties;
//! - [`marker`]: the `BEGIN <span>` / `END <span>` labels that split the device logs;
//! - [`control`]: the guest → VMM control channel's messages (format and parse);
//! - [`addr`]: the I/O ports and network addresses both sides use;
//! - [`ack`]: the peer's 8-byte acknowledgement;
//! - [`disk`]: the test and scratch disks' labels and DMA-log cards;
//! - [`options`]: the guest's `zc.*` kernel command-line options (format and parse);
//! - [`report`]: a method's `report` JSON (hand-written writer, serde reader);
//! - [`json`]: the small JSON object writer the guest uses (it has no serde);
//! - [`dirty`]: what the VMM's dirty-page scan reports, which the audit relies on.
//!
//! The crate has no runtime dependency, so the static guest program links it;
//! serde derives are behind the `serde` feature, which the VMM and the audit enable.

pub mod ack;
pub mod addr;
pub mod control;
pub mod dirty;
pub mod disk;
pub mod json;
pub mod marker;
pub mod method;
pub mod options;
pub mod report;

pub use control::{ControlMessage, MAX_LINE};
pub use marker::{Marker, SpanName};
pub use method::{Direction, Method, UnknownMethod};
pub use options::{MethodRun, Options, OptionsError, Role, Suite, SuiteCard, TestHook};
pub use report::{MethodReport, ZeroCopyCounts, ZeroCopyReceive};
