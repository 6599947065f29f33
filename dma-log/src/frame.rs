//! The one-line summary of an Ethernet frame that a net `request` record carries
//! (`summary`), and the TCP fields the audit reads from it (`tcp_seq`, `tcp_len`,
//! `tcp_flags`, `tcp_payload_off`, `tcp_ports`): part of the log's contract (see
//! `docs/dma-log.md`, "virtio-net records"), so the log defines it, not the device.

use std::net::Ipv4Addr;

use crate::NetRequest;

/// Ethernet header length.
const ETH_HLEN: usize = 14;

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
    pub fn into_request(self, prefix: &str, suffix: &str) -> NetRequest {
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
                    let len = u32::try_from(l4.len().saturating_sub(doff.max(20)))
                        .expect("within the IPv4 total length, a u16");
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
                        tcp_payload_off: Some(
                            u32::try_from(ETH_HLEN + ihl + doff.max(20))
                                .expect("headers of at most 14 + 60 + 60 bytes"),
                        ),
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

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    /// 10.0.2.15 > 10.0.2.2, the guest's and the peer's addresses.
    const GUEST_TO_PEER: [u8; 8] = [10, 0, 2, 15, 10, 0, 2, 2];
    const MACS: [u8; 12] = [0x52, 0x54, 0, 0, 2, 2, 0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A TCP/IPv4 frame between `addrs` (source, then destination) with `payload_len`
    /// payload bytes. Checksums are left 0: a summary reads none.
    fn tcp_frame(
        addrs: [u8; 8],
        ports: (u16, u16),
        seq: u32,
        flags: u8,
        payload_len: usize,
    ) -> Vec<u8> {
        let [len_hi, len_lo] = u16::try_from(20 + 20 + payload_len).unwrap().to_be_bytes();
        let mut f = MACS.to_vec();
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, len_hi, len_lo, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&addrs);
        f.extend_from_slice(&ports.0.to_be_bytes());
        f.extend_from_slice(&ports.1.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&1u32.to_be_bytes()); // ack
        f.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload_len).map(|i| (i * 31 + 7).to_le_bytes()[0]));
        f
    }

    /// An ARP packet with operation `op` (1: who has 10.0.2.2, tell 10.0.2.15).
    fn arp(op: u16) -> Vec<u8> {
        let mut f = [[0xff; 6], [0x52, 0x54, 0, 0x12, 0x34, 0x56]].concat();
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&MACS[6..]);
        f.extend_from_slice(&GUEST_TO_PEER[..4]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&GUEST_TO_PEER[4..]);
        f
    }

    #[test]
    fn summaries_survive_garbage() {
        assert_eq!(summarize(&[]).text, "runt len=0");
        let f = tcp_frame(GUEST_TO_PEER, (40000, 7878), 1000, 0x18, 5);
        let mut bad = f.clone();
        bad[14] = 0x4f; // IHL 60 > total
        assert!(summarize(&bad).tcp_seq.is_none());
        for n in 0..f.len() {
            let _ = summarize(&f[..n]);
        }
        let s = summarize(&f);
        assert_eq!((s.tcp_seq, s.tcp_len), (Some(1000), Some(5)));
        assert!(s.text.ends_with("flags=PA"), "{}", s.text);
        assert_eq!(
            summarize(&arp(1)).text,
            "arp who-has 10.0.2.2 tell 10.0.2.15"
        );
        assert_eq!(summarize(&arp(9)).text, "arp op=9");
    }

    /// The TCP summary is built by hand for speed; it must say exactly what the
    /// `format!` it replaced said.
    #[rstest]
    #[case(5, GUEST_TO_PEER, (40000, 7878), 1000, 0x18)]
    #[case(0, [0, 0, 0, 0, 255, 255, 255, 255], (0, 65535), u32::MAX, 0x1f)]
    #[case(1448, [192, 168, 100, 9, 1, 22, 3, 44], (9, 80), 0, 0x00)]
    fn tcp_summary_text_is_the_formatted_one(
        #[case] payload_len: usize,
        #[case] addrs: [u8; 8],
        #[case] ports: (u16, u16),
        #[case] seq: u32,
        #[case] flags: u8,
    ) {
        let s = summarize(&tcp_frame(addrs, ports, seq, flags, payload_len));
        let flag_text: String = [(2, 'S'), (1, 'F'), (4, 'R'), (8, 'P'), (0x10, 'A')]
            .iter()
            .filter(|(m, _)| flags & m != 0)
            .map(|(_, c)| *c)
            .collect();
        let want = format!(
            "tcp {}:{}>{}:{} seq={seq} len={} flags={flag_text}",
            std::net::Ipv4Addr::new(addrs[0], addrs[1], addrs[2], addrs[3]),
            ports.0,
            std::net::Ipv4Addr::new(addrs[4], addrs[5], addrs[6], addrs[7]),
            ports.1,
            s.tcp_len.unwrap(),
        );
        assert_eq!(s.text, want);
        assert_eq!(s.tcp_len, Some(u32::try_from(payload_len).unwrap()));
        // Ethernet 14 + IPv4 20 + TCP 20 bytes of headers.
        assert_eq!(s.tcp_payload_off, Some(54));
        assert_eq!(s.tcp_ports, Some(ports));
    }
}
