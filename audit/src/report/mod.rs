//! Reports of a [`Verdicts`](crate::Verdicts) set (the audits of every variant and
//! the run's context): a terminal table, a KTAP document, JSON, a self-contained HTML
//! page, JUnit XML and KCIDB v5 JSON.

mod html;
mod json;
mod junit;
mod kcidb;
mod ktap;
mod table;

pub use html::html;
pub use json::{json, VERDICTS_SCHEMA};
pub use junit::junit;
pub use kcidb::{kcidb, KcidbIds};
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
