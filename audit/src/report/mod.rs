//! Reports of a set of [`MethodAudit`](crate::MethodAudit)s: a terminal table, a KTAP
//! document, JSON and a self-contained HTML page. Each takes the audits of every
//! variant at once (e.g. the `sg-on` and `sg-off` runs concatenated).

mod html;
mod json;
mod ktap;
mod table;

pub use html::html;
pub use json::json;
pub use ktap::ktap;
pub use table::table;

use crate::MethodAudit;

/// `method[variant]`, how every report names one audit.
fn label(a: &MethodAudit) -> String {
    format!("{}[{}]", a.method, a.variant)
}

/// A number for a table cell, `-` when unknown.
fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// Text made safe for one line of a line-oriented format.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}
