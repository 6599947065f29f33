//! A minimal JSON object writer for `report` lines. Hand-written rather than serde
//! because the guest program keeps its dependencies to `libc` and `io-uring` (and
//! this crate): it writes a few flat objects, in a fixed member order.

use std::fmt::Write;

/// Builds one flat JSON object, keys in insertion order.
#[derive(Debug, Clone)]
pub struct Object {
    text: String,
}

impl Default for Object {
    fn default() -> Object {
        Object::new()
    }
}

impl Object {
    /// An empty object.
    pub fn new() -> Object {
        Object {
            text: String::from("{"),
        }
    }

    fn key(&mut self, key: &str) {
        if self.text.len() > 1 {
            self.text.push(',');
        }
        push_string(&mut self.text, key);
        self.text.push(':');
    }

    /// Adds a string member.
    pub fn str(mut self, key: &str, value: &str) -> Object {
        self.key(key);
        push_string(&mut self.text, value);
        self
    }

    /// Adds an unsigned integer member.
    pub fn u64(mut self, key: &str, value: u64) -> Object {
        self.key(key);
        let _ = write!(self.text, "{value}");
        self
    }

    /// Adds a number with `decimals` digits after the point; `null` when not finite
    /// (JSON has no NaN or infinity).
    pub fn f64(mut self, key: &str, value: f64, decimals: usize) -> Object {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.text, "{value:.decimals$}");
        } else {
            self.text.push_str("null");
        }
        self
    }

    /// Adds a boolean member.
    pub fn bool(mut self, key: &str, value: bool) -> Object {
        self.key(key);
        self.text.push_str(if value { "true" } else { "false" });
        self
    }

    /// Adds a `null` member (a value the program could not know).
    pub fn null(mut self, key: &str) -> Object {
        self.key(key);
        self.text.push_str("null");
        self
    }

    /// Adds a nested object member.
    pub fn object(mut self, key: &str, value: Object) -> Object {
        self.key(key);
        self.text.push_str(&value.finish());
        self
    }

    /// The finished object.
    pub fn finish(mut self) -> String {
        self.text.push('}');
        self.text
    }
}

/// Appends `s` as a JSON string literal. Besides the mandatory escapes, DEL is
/// escaped too: the control channel turns raw control bytes into spaces, which would
/// change the string.
fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_members_in_order() {
        let json = Object::new()
            .str("test", "send")
            .u64("bytes", 16_777_216)
            .f64("seconds", 1.23456, 3)
            .bool("ok", true)
            .finish();
        assert_eq!(
            json,
            r#"{"test":"send","bytes":16777216,"seconds":1.235,"ok":true}"#
        );
        assert_eq!(Object::new().finish(), "{}");
        assert_eq!(
            Object::new().f64("x", f64::INFINITY, 2).finish(),
            r#"{"x":null}"#
        );
    }

    #[test]
    fn nests_objects_and_nulls() {
        let json = Object::new()
            .str("test", "method")
            .object("syscalls", Object::new().u64("read", 2).u64("write", 3))
            .object("empty", Object::new())
            .null("copied")
            .finish();
        assert_eq!(
            json,
            r#"{"test":"method","syscalls":{"read":2,"write":3},"empty":{},"copied":null}"#
        );
    }

    #[test]
    fn escapes_strings() {
        let json = Object::new()
            .str("error", "a \"b\" \\ c\nd\te\x01\x7f é")
            .finish();
        assert_eq!(json, r#"{"error":"a \"b\" \\ c\nd\te\u0001\u007f é"}"#);
        // Nothing left that the control channel would alter.
        assert!(!json.bytes().any(|b| b < 0x20 || b == 0x7f));
    }
}
