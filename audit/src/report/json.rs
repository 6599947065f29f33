//! JSON for machines: `verdicts.json`, documented in `docs/reports.md` and
//! described by `docs/schemas/zc-audit-2.schema.json`.

use serde::Serialize;

use crate::{MethodAudit, RunContext, Verdicts};

/// Identifies the JSON document's shape; a reader checks it before trusting fields.
pub const VERDICTS_SCHEMA: &str = "zc-audit/2";

#[derive(Serialize)]
struct Doc<'a> {
    schema: &'static str,
    passed: bool,
    totals: Totals,
    context: &'a RunContext,
    methods: &'a [MethodAudit],
}

#[derive(Serialize)]
struct Totals {
    pass: usize,
    fail: usize,
    skip: usize,
}

/// `{"schema":"zc-audit/2","passed":..,"totals":{..},"context":{..},"methods":[...]}`,
/// each method a serialised [`MethodAudit`], pretty-printed.
pub fn json(v: &Verdicts) -> String {
    let (pass, fail, skip) = v.totals();
    // Plain structs with string keys: serde_json cannot fail on them (non-finite
    // floats become null).
    serde_json::to_string_pretty(&Doc {
        schema: VERDICTS_SCHEMA,
        passed: v.passed(),
        totals: Totals { pass, fail, skip },
        context: &v.context,
        methods: &v.methods,
    })
    .expect("MethodAudit serialises to JSON")
}
