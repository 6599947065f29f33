//! Hand-written JSON for the records written by the thousand per transferred MiB
//! (`desc` and `request`): under the emulated host every instruction of the log is
//! emulated, and serde_json's generic path costs several times more than appending
//! known field names and digits. The output is byte for byte what serde_json writes
//! for the same [`Record`](crate::Record) (the tests compare them), so readers keep
//! using serde.

use crate::handle::Chain;
use crate::{
    BlkStatus, DescInfo, DescRole, DeviceKind, Direction, NetRequest, RequestDetail, PAGE_SIZE,
};

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

fn device_name(d: DeviceKind) -> &'static [u8] {
    match d {
        DeviceKind::Blk => b"\"blk\"",
        DeviceKind::Net => b"\"net\"",
    }
}

/// Appends `,"name":` (or `{"name":` for the first field, given `lead` = `{`).
fn key(out: &mut Vec<u8>, lead: u8, name: &[u8]) {
    out.push(lead);
    out.push(b'"');
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":");
}

fn field_u64(out: &mut Vec<u8>, name: &[u8], v: u64) {
    key(out, b',', name);
    push_u64(out, v);
}

/// The fields every device record starts with, from `{` to `head`.
fn device_prefix(out: &mut Vec<u8>, kind: &[u8], seq: u64, t_ns: u64, chain: Chain) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind);
    out.push(b'"');
    field_u64(out, b"seq", seq);
    field_u64(out, b"t_ns", t_ns);
    key(out, b',', b"device");
    out.extend_from_slice(device_name(chain.device));
    if chain.card != 0 {
        field_u64(out, b"card", u64::from(chain.card));
    }
    field_u64(out, b"queue", u64::from(chain.queue));
    field_u64(out, b"head", u64::from(chain.head));
}

/// What a `desc` line says besides its pieces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DescHead {
    pub seq: u64,
    pub t_ns: u64,
    /// The card of the record (0: no field).
    pub card: u16,
    pub info: DescInfo,
}

/// Appends a `desc` line up to and including `"pieces":[`; follow with
/// [`push_piece`] for each piece and [`end_desc`].
pub(crate) fn begin_desc(out: &mut Vec<u8>, d: &DescHead) {
    let i = &d.info;
    device_prefix(out, b"desc", d.seq, d.t_ns, i.chain(d.card));
    field_u64(out, b"desc", u64::from(i.desc));
    if i.indirect {
        out.extend_from_slice(b",\"indirect\":true");
    }
    field_u64(out, b"gpa", i.gpa);
    field_u64(out, b"len", u64::from(i.len));
    out.extend_from_slice(match i.dir {
        Direction::DeviceReads => b",\"dir\":\"device_reads\"",
        Direction::DeviceWrites => b",\"dir\":\"device_writes\"",
    });
    out.extend_from_slice(match i.role {
        DescRole::Header => &b",\"role\":\"header\""[..],
        DescRole::Data => b",\"role\":\"data\"",
        DescRole::Status => b",\"role\":\"status\"",
    });
    out.extend_from_slice(b",\"pieces\":[");
}

/// Appends one element of `pieces` (`first`: no comma before it).
pub(crate) fn push_piece(out: &mut Vec<u8>, first: bool, gpa: u64, len: u32, hash: u64) {
    debug_assert!(u64::from(len) <= PAGE_SIZE);
    out.extend_from_slice(if first {
        &b"{\"gpa\":"[..]
    } else {
        b"},{\"gpa\":"
    });
    push_u64(out, gpa);
    field_u64(out, b"len", u64::from(len));
    out.extend_from_slice(b",\"hash\":");
    push_hash(out, hash);
}

/// Closes a `desc` line opened by [`begin_desc`]; `any` says whether a piece was written.
pub(crate) fn end_desc(out: &mut Vec<u8>, any: bool) {
    if any {
        out.push(b'}');
    }
    out.extend_from_slice(b"]}\n");
}

fn opt_u64(out: &mut Vec<u8>, name: &[u8], v: Option<u64>) {
    if let Some(v) = v {
        field_u64(out, name, v);
    }
}

fn net_detail(out: &mut Vec<u8>, n: &NetRequest) {
    out.extend_from_slice(b"{\"kind\":\"net\",\"summary\":");
    push_str(out, &n.summary);
    opt_u64(out, b"tcp_seq", n.tcp_seq.map(u64::from));
    opt_u64(out, b"tcp_len", n.tcp_len.map(u64::from));
    if let Some(flags) = &n.tcp_flags {
        key(out, b',', b"tcp_flags");
        push_str(out, flags);
    }
    opt_u64(out, b"tcp_payload_off", n.tcp_payload_off.map(u64::from));
    if let Some((src, dst)) = n.tcp_ports {
        key(out, b',', b"tcp_ports");
        out.push(b'[');
        push_u64(out, u64::from(src));
        out.push(b',');
        push_u64(out, u64::from(dst));
        out.push(b']');
    }
    out.push(b'}');
}

/// Appends a whole `request` line.
pub(crate) fn request(out: &mut Vec<u8>, seq: u64, t_ns: u64, chain: Chain, req: &RequestDetail) {
    device_prefix(out, b"request", seq, t_ns, chain);
    out.extend_from_slice(b",\"req\":");
    match req {
        RequestDetail::Blk(b) => {
            out.extend_from_slice(b"{\"kind\":\"blk\",\"op\":");
            push_str(out, &b.op);
            field_u64(out, b"code", u64::from(b.code));
            field_u64(out, b"sector", b.sector);
            field_u64(out, b"bytes", b.bytes);
            out.extend_from_slice(match b.status {
                BlkStatus::Ok => &b",\"status\":\"ok\"}"[..],
                BlkStatus::Ioerr => b",\"status\":\"ioerr\"}",
                BlkStatus::Unsupp => b",\"status\":\"unsupp\"}",
            });
        }
        RequestDetail::Net(n) => net_detail(out, n),
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlkRequest, DescRecord, Fingerprint, Piece, Record, RequestRecord};

    fn serde_line(r: &Record) -> String {
        serde_json::to_string(r).unwrap() + "\n"
    }

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

    /// The record of `info` and `pieces`, for serde to write.
    fn desc_record(seq: u64, t_ns: u64, card: u16, info: DescInfo, pieces: Vec<Piece>) -> Record {
        Record::Desc(DescRecord {
            seq,
            t_ns,
            device: info.device,
            card,
            queue: info.queue,
            head: info.head,
            desc: info.desc,
            indirect: info.indirect,
            gpa: info.gpa,
            len: info.len,
            dir: info.dir,
            role: info.role,
            pieces,
        })
    }

    #[test]
    fn desc_lines_match_serde() {
        let pieces = |n: u64| -> Vec<Piece> {
            (0..n)
                .map(|i| Piece {
                    gpa: 0xfff + i * 4096,
                    len: 1 + u32::try_from(i).unwrap(),
                    hash: Fingerprint(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 60)),
                })
                .collect()
        };
        for (n, indirect, dir, role, device) in [
            (
                0,
                false,
                Direction::DeviceReads,
                DescRole::Header,
                DeviceKind::Blk,
            ),
            (
                1,
                true,
                Direction::DeviceWrites,
                DescRole::Data,
                DeviceKind::Net,
            ),
            (
                3,
                false,
                Direction::DeviceWrites,
                DescRole::Status,
                DeviceKind::Blk,
            ),
            (
                2,
                true,
                Direction::DeviceReads,
                DescRole::Data,
                DeviceKind::Net,
            ),
        ] {
            let info = DescInfo {
                device,
                queue: u16::try_from(n).unwrap(),
                head: u16::MAX,
                desc: 7,
                indirect,
                gpa: u64::MAX - n,
                len: u32::MAX,
                dir,
                role,
            };
            // Card 0 writes no field; another card does.
            for card in [0, 1, u16::MAX] {
                let mut out = Vec::new();
                begin_desc(
                    &mut out,
                    &DescHead {
                        seq: u64::MAX,
                        t_ns: n * 1_000_000_007,
                        card,
                        info,
                    },
                );
                for (i, p) in pieces(n).iter().enumerate() {
                    push_piece(&mut out, i == 0, p.gpa, p.len, p.hash.0);
                }
                end_desc(&mut out, n > 0);
                let rec = desc_record(u64::MAX, n * 1_000_000_007, card, info, pieces(n));
                let line = String::from_utf8(out).unwrap();
                assert_eq!(line, serde_line(&rec));
                assert_eq!(line.contains("\"card\""), card != 0, "{line}");
            }
        }
    }

    #[test]
    fn request_lines_match_serde() {
        let mut reqs = Vec::new();
        for (op, status) in [
            ("in", BlkStatus::Ok),
            ("malformed", BlkStatus::Ioerr),
            ("un\"known\n", BlkStatus::Unsupp),
        ] {
            reqs.push(RequestDetail::Blk(BlkRequest {
                op: op.into(),
                code: u32::MAX,
                sector: u64::MAX,
                bytes: 12288,
                status,
            }));
        }
        for mask in 0..32u32 {
            let on = |bit: u32| mask & (1 << bit) != 0;
            reqs.push(RequestDetail::Net(NetRequest {
                summary: format!("tx tcp 10.0.2.15:40000>10.0.2.2:7000 \u{1}\t{mask}"),
                tcp_seq: on(0).then_some(u32::MAX),
                tcp_len: on(1).then_some(1448),
                tcp_flags: on(2).then(|| "SFRPA".to_string()),
                tcp_payload_off: on(3).then_some(54),
                tcp_ports: on(4).then_some((40000, 7000)),
            }));
        }
        for (i, req) in reqs.into_iter().enumerate() {
            let device = if i % 2 == 0 {
                DeviceKind::Blk
            } else {
                DeviceKind::Net
            };
            let mut out = Vec::new();
            let card = u16::try_from(i % 3).unwrap();
            let chain = Chain {
                device,
                card,
                queue: 1,
                head: 9,
            };
            request(&mut out, i as u64, 42, chain, &req);
            let rec = Record::Request(RequestRecord {
                seq: i as u64,
                t_ns: 42,
                device,
                card,
                queue: 1,
                head: 9,
                req,
            });
            assert_eq!(String::from_utf8(out).unwrap(), serde_line(&rec));
        }
    }
}
