//! The audit's verdicts as a KTAP document (the guest prints its own; this is the
//! second one, judged on device evidence).

use super::{label, one_line};
use crate::{MethodAudit, Verdict};

/// `KTAP version 1`, the plan, then per audit its findings and further reasons as
/// `#` diagnostic lines followed by `ok N method[variant]`, `not ok N ... # first
/// reason`, or `ok N ... # SKIP reason`.
pub fn ktap(audits: &[MethodAudit]) -> String {
    let mut out = format!("KTAP version 1\n1..{}\n", audits.len());
    for (i, a) in audits.iter().enumerate() {
        let n = i + 1;
        let name = label(a);
        for f in &a.findings {
            out.push_str(&format!("# {name}: {}\n", one_line(f)));
        }
        for r in a.reasons.iter().skip(1) {
            out.push_str(&format!("# {name}: {}\n", one_line(r)));
        }
        let first = a.reasons.first().map(|r| one_line(r)).unwrap_or_default();
        match a.verdict {
            Verdict::Pass => out.push_str(&format!("ok {n} {name}\n")),
            Verdict::Fail => out.push_str(&format!("not ok {n} {name} # {first}\n")),
            Verdict::Skip => out.push_str(&format!("ok {n} {name} # SKIP {first}\n")),
        }
    }
    out
}
