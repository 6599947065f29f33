//! Fuzzes the parser of `expected.toml` (the audit's expectations file, written by
//! the user or copied from elsewhere): TOML syntax, the schema and its validation,
//! then the lookups the audit makes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use zc_audit::{Check, Expectations};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ex) = Expectations::parse(text) {
        for method in ["read", "sendfile", "splice", "x"] {
            for variant in ["", "default", "o_direct"] {
                let _ = ex.get(method, variant);
                for release in [None, Some("6.1.0-56-cloud-amd64"), Some("6.12"), Some("x")] {
                    let _ = ex.select(method, variant, release);
                }
            }
        }
    }
    for word in text.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
        if let Some(check) = Check::from_key(word) {
            assert_eq!(Check::from_key(check.key()), Some(check));
        }
        let _ = Check::of_reason(word);
    }
});
