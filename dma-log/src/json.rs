//! JSON pieces for the hand-written lines of the frequent records (`compact`): under
//! the emulated host every instruction of the log is emulated, and serde_json's
//! generic path costs several times more than appending known field names and
//! digits. Strings are escaped byte for byte as serde_json does, so readers keep
//! using serde.

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `v` in decimal.
pub(crate) fn push_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Appends a fingerprint as serde writes [`Fingerprint`](crate::Fingerprint): a JSON
/// string of 16 lowercase hex digits.
pub(crate) fn push_hash(out: &mut Vec<u8>, h: u64) {
    let mut digits = [b'"'; 18];
    for (i, d) in digits[1..17].iter_mut().enumerate() {
        *d = HEX[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    out.extend_from_slice(&digits);
}

/// Appends `s` as a JSON string, escaped exactly as serde_json does: `"` and `\`,
/// the short escapes `\b \t \n \f \r`, other control characters as `\u00XX`;
/// everything else (DEL and non-ASCII included) verbatim.
pub(crate) fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_like_serde() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é\u{2028}😀\u{7f}");
        for s in [
            all.as_str(),
            "",
            "plain",
            "\"\\",
            "tx tcp 1.2.3.4:5>6.7.8.9:10",
        ] {
            let mut out = Vec::new();
            push_str(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }
}
