//! `zerocopy_pressure`: `send(MSG_ZEROCOPY)` of each chunk of a mapping of the file
//! with the socket's option memory exhausted, falling back to a plain (copying)
//! `send` of what the kernel refused, as an application must.
//!
//! The runner sets `net.core.optmem_max` to [`PRESSURE_OPTMEM_MAX`] before `BEGIN`
//! and restores it after `END`. Each MSG_ZEROCOPY send needs a notification skb
//! charged to the socket's option memory (`msg_zerocopy_realloc` ->
//! `msg_zerocopy_alloc` -> `sock_omalloc(sk, 0)`, refused when `sk_omem_alloc +
//! SKB_TRUESIZE(0)` exceeds optmem_max, net/core/skbuff.c and net/core/sock.c, 6.1
//! and 6.12 alike), and `tcp_sendmsg_locked` answers ENOBUFS before queueing any
//! byte when it cannot have one (net/ipv4/tcp.c). With optmem_max 0 no send can
//! have one: every chunk is one refused send plus one copying send, which the
//! report counts as `fallbacks`. The kernel reports on no send (no completions):
//! the copies are visible only to the device and the dirty-page log.

use super::runner::{send_error, Done, Transfer};
use super::zerocopy::{MsgZerocopy, DRAIN_EVERY};
use crate::error::{Error, Result};

/// `net.core.optmem_max` during the method: no option memory at all, so that no
/// MSG_ZEROCOPY send gets its notification skb.
pub const PRESSURE_OPTMEM_MAX: u64 = 0;

/// Maps the file and sends each chunk with MSG_ZEROCOPY, each refusal (ENOBUFS)
/// sent again without it; waits for the ACK and any completions; the mapping is
/// kept until after `END`.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    let map = t.map_shared()?;
    let mut zc = MsgZerocopy::new(t.sock, t.chunks());
    let mut fallbacks = 0u64;
    t.for_each_chunk(|t, c| {
        let mut buf = map.slice(c.map_offset(), c.len);
        while !buf.is_empty() {
            let n = match zc.send_or_refused(&mut t.sys, buf)? {
                Some(n) => n,
                None => {
                    // Refused for lack of option memory: send the rest of the
                    // chunk as a plain send, which copies it into the socket's
                    // buffers (a partial plain send continues in the next round).
                    fallbacks += 1;
                    match t.sys.send(t.sock, buf, 0) {
                        Ok(0) => return Err(Error::new("fallback send sent 0 bytes")),
                        Ok(n) => n,
                        Err(e) => return Err(send_error("fallback send", e)),
                    }
                }
            };
            buf = &buf[n..];
        }
        if (c.index + 1) % DRAIN_EVERY == 0 {
            zc.drain(&mut t.sys)?;
        }
        Ok(())
    })?;
    t.wait_ack()?;
    zc.wait_until(&mut t.sys, 0)?;
    let mut counts = zc.completions.report();
    counts.fallbacks = Some(fallbacks);
    Ok(Done {
        keep: vec![Box::new(map)],
        zerocopy: Some(counts),
        zerocopy_receive: None,
    })
}
