//! KCIDB v5 JSON (KernelCI's common report database; the schema is kcidb-io's
//! `v05_00`): the tested kernel as a checkout and a build, and one test per method
//! and variant at path `zc.<variant>.<method>`, plus one per variant whose boot
//! failed, with the measurements in `misc`.

use serde_json::{json, Map, Value};

use super::ktap::measurements;
use crate::{MethodAudit, Verdict, Verdicts};

/// The identifiers KCIDB links objects with. A CI system submitting zc's results
/// passes its own origin and the IDs of the checkout and build it tested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KcidbIds {
    /// The submitting CI system's name (`[a-z0-9_]+`).
    pub origin: String,
    /// The tested checkout's ID (`origin:...`).
    pub checkout_id: String,
    /// The tested build's ID (`origin:...`).
    pub build_id: String,
}

impl KcidbIds {
    /// IDs for a run with no CI system around it: origin `zc`, the checkout and
    /// build named after the kernel release (or `unknown`).
    pub fn standalone(v: &Verdicts) -> Self {
        let release = v
            .context
            .kernel_release
            .clone()
            .unwrap_or_else(|| "unknown".to_string());
        KcidbIds {
            origin: "zc".to_string(),
            checkout_id: format!("zc:{release}"),
            build_id: format!("zc:{release}"),
        }
    }
}

fn status(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "SKIP",
    }
}

/// A test path component: KCIDB paths are dot-separated `[a-zA-Z0-9_-]+`.
fn path_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn method_misc(a: &MethodAudit) -> Value {
    let mut m = Map::new();
    m.insert("variant".into(), json!(a.variant));
    m.insert("direction".into(), json!(a.direction.name()));
    m.insert("measurements".into(), json!(measurements(a)));
    m.insert("cpu_copies".into(), json!(a.cpu_copies));
    m.insert("zero_copy_pct".into(), json!(a.zero_copy_pct));
    m.insert("dma_copies".into(), json!(a.dma_copies));
    if let Some(s) = a.syscalls_per_chunk {
        m.insert("syscalls_per_chunk".into(), json!(s));
    }
    if let Some(t) = a.throughput_mbit_s {
        m.insert("mbit_s".into(), json!(t));
    }
    if let Some(r) = &a.receive {
        m.insert("receive".into(), json!(r));
    }
    if !a.reasons.is_empty() {
        m.insert("reasons".into(), json!(a.reasons));
    }
    if !a.findings.is_empty() {
        m.insert("findings".into(), json!(a.findings));
    }
    Value::Object(m)
}

/// The KCIDB document (`{"version":{"major":5,"minor":0},"checkouts":[..],...}`).
pub fn kcidb(v: &Verdicts, ids: &KcidbIds) -> String {
    let c = &v.context;
    let environment = json!({
        "comment": format!(
            "zc {} on {} host ({}), transport {}",
            c.zc_version,
            c.host_mode.as_deref().unwrap_or("unknown"),
            c.cpu_model.as_deref().unwrap_or("unknown CPU"),
            c.transport.as_deref().unwrap_or("unknown"),
        ),
        "misc": {"size": c.size, "chunk": c.chunk},
    });
    let run_id = path_part(&c.date);
    let mut tests = Vec::new();
    for name in v.variant_names() {
        let variant = path_part(&name);
        if let Some(why) = c.variant(&name).and_then(|r| r.failure.as_deref()) {
            tests.push(json!({
                "id": format!("{}:{run_id}.{variant}", ids.origin),
                "build_id": ids.build_id,
                "origin": ids.origin,
                "path": format!("zc.{variant}"),
                "status": "FAIL",
                "comment": format!("boot failed: {why}"),
                "start_time": c.date,
                "environment": environment,
            }));
        }
        for a in v.of_variant(&name) {
            let mut test = json!({
                "id": format!("{}:{run_id}.{variant}.{}", ids.origin, path_part(&a.method)),
                "build_id": ids.build_id,
                "origin": ids.origin,
                "path": format!("zc.{variant}.{}", path_part(&a.method)),
                "status": status(a.verdict),
                "start_time": c.date,
                "environment": environment,
                "misc": method_misc(a),
            });
            if let Some(first) = a.reasons.first() {
                test["comment"] = json!(first);
            }
            if let Some(s) = a.seconds {
                test["duration"] = json!(s);
            }
            if let Some(mbit) = a.throughput_mbit_s {
                test["number"] = json!({"value": mbit, "unit": "Mbit/s"});
            }
            tests.push(test);
        }
    }
    let doc = json!({
        "version": {"major": 5, "minor": 0},
        "checkouts": [{
            "id": ids.checkout_id,
            "origin": ids.origin,
            "comment": format!("kernel {}", c.kernel_line()),
        }],
        "builds": [{
            "id": ids.build_id,
            "checkout_id": ids.checkout_id,
            "origin": ids.origin,
            "architecture": "x86_64",
            "comment": format!("kernel {}", c.kernel_line()),
        }],
        "tests": tests,
    });
    serde_json::to_string_pretty(&doc).expect("a JSON value serialises")
}
