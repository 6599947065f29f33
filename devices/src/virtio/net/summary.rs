//! One-line summaries of Ethernet frames for the log's `request` records (made on
//! the log's writer thread), and the TCP fields the audit maps payload bytes with.

use std::net::Ipv4Addr;

use crate::dma_log::{NetRequest, RequestDetail};

/// Ethernet header length.
const ETH_HLEN: usize = 14;

/// The request detail of a TX frame (on the log's writer thread: formatting the
/// summary costs more than the rest of a frame's logging).
pub(super) fn tx_detail(frame: &[u8], _: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("tx ", ""))
}

/// The request detail of an RX frame delivered in `nbufs` buffers.
pub(super) fn rx_detail(frame: &[u8], nbufs: u64) -> RequestDetail {
    RequestDetail::Net(summarize(frame).into_request("rx ", &format!(" buffers={nbufs}")))
}

/// A one-line description of a frame, and its TCP sequence/payload length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameSummary {
    /// e.g. `tcp 10.0.2.15:40000>10.0.2.2:7878 seq=1 len=1448 flags=A`.
    pub text: String,
    /// TCP sequence number.
    pub tcp_seq: Option<u32>,
    /// TCP payload length.
    pub tcp_len: Option<u32>,
    /// TCP flags from `SFRPA`.
    pub tcp_flags: Option<String>,
    /// Offset of the TCP payload in the frame.
    pub tcp_payload_off: Option<u32>,
    /// TCP source and destination ports.
    pub tcp_ports: Option<(u16, u16)>,
}

impl FrameSummary {
    /// The log's request detail: `prefix`, the summary text, then `suffix`.
    fn into_request(self, prefix: &str, suffix: &str) -> NetRequest {
        let mut summary = String::with_capacity(prefix.len() + self.text.len() + suffix.len());
        summary.push_str(prefix);
        summary.push_str(&self.text);
        summary.push_str(suffix);
        NetRequest {
            summary,
            tcp_seq: self.tcp_seq,
            tcp_len: self.tcp_len,
            tcp_flags: self.tcp_flags,
            tcp_payload_off: self.tcp_payload_off,
            tcp_ports: self.tcp_ports,
        }
    }
}

/// Appends `v` in decimal.
fn push_dec(out: &mut String, v: u64) {
    out.push_str(itoa::Buffer::new().format(v));
}

/// Appends the dotted quad of the 4 bytes `a`, as `Ipv4Addr` displays it.
fn push_ipv4(out: &mut String, a: &[u8]) {
    for (i, b) in a.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_dec(out, u64::from(*b));
    }
}

/// Parses Ethernet / ARP / IPv4 / TCP headers defensively (any length, any content).
pub fn summarize(frame: &[u8]) -> FrameSummary {
    let plain = |text: String| FrameSummary {
        text,
        tcp_seq: None,
        tcp_len: None,
        tcp_flags: None,
        tcp_payload_off: None,
        tcp_ports: None,
    };
    if frame.len() < ETH_HLEN {
        return plain(format!("runt len={}", frame.len()));
    }
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let ethertype = be16(frame, 12);
    let p = &frame[ETH_HLEN..];
    match ethertype {
        0x0806 if p.len() >= 28 => {
            let spa = Ipv4Addr::new(p[14], p[15], p[16], p[17]);
            let tpa = Ipv4Addr::new(p[24], p[25], p[26], p[27]);
            match be16(p, 6) {
                1 => plain(format!("arp who-has {tpa} tell {spa}")),
                2 => plain(format!(
                    "arp {spa} is-at {}",
                    p[8..14]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                )),
                op => plain(format!("arp op={op}")),
            }
        }
        0x0800 if p.len() >= 20 && p[0] >> 4 == 4 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let total = usize::from(be16(p, 2)).min(p.len());
            let proto = p[9];
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if ihl < 20 || total < ihl {
                return plain(format!("ipv4 malformed {src}>{dst}"));
            }
            let l4 = &p[ihl..total];
            match proto {
                6 if l4.len() >= 20 => {
                    let doff = usize::from(l4[12] >> 4) * 4;
                    let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
                    let len = l4.len().saturating_sub(doff.max(20)) as u32;
                    let f = l4[13];
                    let flags: String = [
                        (0x02, 'S'),
                        (0x01, 'F'),
                        (0x04, 'R'),
                        (0x08, 'P'),
                        (0x10, 'A'),
                    ]
                    .iter()
                    .filter(|(m, _)| f & m != 0)
                    .map(|(_, c)| *c)
                    .collect();
                    // By hand, not `format!`: this runs for every TCP frame the log
                    // records, and the formatting machinery (with `Ipv4Addr`'s Display)
                    // costs several times more, which counts under emulation.
                    let mut text = String::with_capacity(64);
                    text.push_str("tcp ");
                    push_ipv4(&mut text, &p[12..16]);
                    text.push(':');
                    push_dec(&mut text, be16(l4, 0).into());
                    text.push('>');
                    push_ipv4(&mut text, &p[16..20]);
                    text.push(':');
                    push_dec(&mut text, be16(l4, 2).into());
                    text.push_str(" seq=");
                    push_dec(&mut text, seq.into());
                    text.push_str(" len=");
                    push_dec(&mut text, len.into());
                    text.push_str(" flags=");
                    text.push_str(&flags);
                    FrameSummary {
                        text,
                        tcp_seq: Some(seq),
                        tcp_len: Some(len),
                        tcp_payload_off: Some((ETH_HLEN + ihl + doff.max(20)) as u32),
                        tcp_ports: Some((be16(l4, 0), be16(l4, 2))),
                        tcp_flags: Some(flags),
                    }
                }
                1 if !l4.is_empty() => plain(format!("icmp {src}>{dst} type={}", l4[0])),
                17 if l4.len() >= 8 => plain(format!(
                    "udp {src}:{}>{dst}:{} len={}",
                    be16(l4, 0),
                    be16(l4, 2),
                    l4.len() - 8
                )),
                _ => plain(format!("ipv4 proto={proto} {src}>{dst} len={total}")),
            }
        }
        _ => plain(format!("ethertype={ethertype:#06x} len={}", frame.len())),
    }
}
