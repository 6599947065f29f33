//! JSON for machines.

use serde::Serialize;

use crate::MethodAudit;

/// Identifies the JSON document's shape; a reader checks it before trusting fields.
const SCHEMA: &str = "zc-audit/1";

#[derive(Serialize)]
struct Doc<'a> {
    schema: &'static str,
    methods: &'a [MethodAudit],
}

/// `{"schema":"zc-audit/1","methods":[...]}`, each method a serialised
/// [`MethodAudit`], pretty-printed.
pub fn json(audits: &[MethodAudit]) -> String {
    // Plain structs with string keys: serde_json cannot fail on them (non-finite
    // floats become null).
    serde_json::to_string_pretty(&Doc {
        schema: SCHEMA,
        methods: audits,
    })
    .expect("MethodAudit serialises to JSON")
}
