//! The peer's check on a host TCP socket, for the `tap` backend: there the guest's
//! connections reach the host's own TCP stack, and this listener, on the host side
//! of the tap, checks each one exactly as the in-VMM peer does (the same
//! [`StreamVerifier`], the same queue of [`Expectation`]s, the same 8-byte count once
//! every expected byte is in: see the ACK protocol in the [module docs](super)).
//!
//! It is plain blocking `std::net` with a thread per connection: the guest makes one
//! connection per transfer, one at a time, so there is nothing to multiplex.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{End, Expectation, Received, Transfer};

/// A connection silent for this long is given up (recorded as reset): the guest
/// sends continuously, so this is a guest that died mid-transfer.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// Receive buffer per connection.
const READ_BUF: usize = 256 << 10;

/// What the listener and its connection threads share.
#[derive(Default)]
struct State {
    pending: VecDeque<Expectation>,
    results: Vec<Received>,
    next_id: u64,
    open: usize,
}

struct Shared {
    start: Instant,
    state: Mutex<State>,
    closed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A listening host socket that checks what the guest sends to it.
pub struct SocketPeer {
    local: SocketAddrV4,
    shared: Arc<Shared>,
}

impl SocketPeer {
    /// Listens on `addr` and checks connections, in the order they arrive, against
    /// `expectations`. The accepting thread lives as long as the process.
    pub fn listen(addr: SocketAddrV4, expectations: Vec<Expectation>) -> io::Result<SocketPeer> {
        let listener = TcpListener::bind(addr)?;
        let local = match listener.local_addr()? {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => return Err(io::Error::other("bound an IPv6 address")),
        };
        let shared = Arc::new(Shared {
            start: Instant::now(),
            state: Mutex::new(State {
                pending: expectations.into(),
                ..State::default()
            }),
            closed: Condvar::new(),
        });
        let for_thread = shared.clone();
        std::thread::Builder::new()
            .name("socket-peer".into())
            .spawn(move || {
                // The connection threads it starts keep its filter.
                zc_seccomp::enter(zc_seccomp::Role::SocketPeer);
                accept_loop(listener, for_thread)
            })?;
        Ok(SocketPeer { local, shared })
    }

    /// Queues one more expectation, for the next connection that has none: a
    /// listener kept across several guests (one per boot, as `zc-bench` does with
    /// QEMU) gets each boot's expectations before that boot, and reads the results
    /// with [`finish`](Self::finish) after it.
    pub fn expect(&self, expectation: Expectation) {
        self.shared.lock().pending.push_back(expectation);
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Waits up to `grace` for open connections to end, then returns what every
    /// ended connection received, in order, and the labels of the expectations no
    /// connection took.
    pub fn finish(&self, grace: Duration) -> (Vec<Received>, Vec<String>) {
        let give_up = Instant::now() + grace;
        let mut st = self.shared.lock();
        while st.open > 0 {
            let now = Instant::now();
            if now >= give_up {
                break;
            }
            st = self
                .shared
                .closed
                .wait_timeout(st, give_up - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut results = std::mem::take(&mut st.results);
        results.sort_by_key(|r| r.connection);
        let missing = st.pending.drain(..).map(|e| e.label).collect();
        (results, missing)
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (id, expected) = {
            let mut st = shared.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.open += 1;
            (id, st.pending.pop_front())
        };
        let for_thread = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("socket-peer-{id}"))
            .spawn(move || {
                zc_seccomp::inherited(zc_seccomp::Role::SocketPeer);
                let received = serve(stream, id, expected, for_thread.start);
                let mut st = for_thread.lock();
                st.results.push(received);
                st.open -= 1;
                for_thread.closed.notify_all();
            });
        if spawned.is_err() {
            // The stream went with the closure: the guest sees a reset and fails.
            shared.lock().open -= 1;
        }
    }
}

/// Reads one connection to its end, checking it; sends the count as the in-VMM
/// peer does.
fn serve(
    mut stream: TcpStream,
    connection: u64,
    expected: Option<Expectation>,
    start: Instant,
) -> Received {
    let remote = match stream.peer_addr() {
        Ok(SocketAddr::V4(a)) => Some(a),
        _ => None,
    };
    let mut transfer = Transfer::new(connection, remote, expected, start.elapsed());
    let _ = stream.set_read_timeout(Some(IDLE_LIMIT));
    let mut buf = vec![0u8; READ_BUF];
    let end = loop {
        match stream.read(&mut buf) {
            Ok(0) => break End::Fin,
            Ok(n) => {
                transfer.receive(&buf[..n], start.elapsed());
                if transfer.is_complete() && !transfer.ack_sent {
                    transfer.ack_sent = stream.write_all(&transfer.count()).is_ok();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break End::Reset,
        }
    };
    if end == End::Fin && !transfer.ack_sent {
        transfer.ack_sent = stream.write_all(&transfer.count()).is_ok();
    }
    transfer.finish(end)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{Ipv4Addr, Shutdown};

    use super::*;
    use crate::net_peer::Failure;

    fn source(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i * 31 + i / 977).to_le_bytes()[0])
            .collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        (f, bytes)
    }

    /// Sends `bytes` the way the guest does: all of it, then read the count, then close.
    fn guest_send(to: SocketAddrV4, bytes: &[u8]) -> u64 {
        let mut s = TcpStream::connect(to).unwrap();
        s.write_all(bytes).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = s.read(&mut [0u8; 1]);
        u64::from_le_bytes(count)
    }

    fn loopback_peer(expectations: Vec<Expectation>) -> SocketPeer {
        SocketPeer::listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), expectations).unwrap()
    }

    #[test]
    fn every_byte_is_checked_and_counted_back() {
        let (file, bytes) = source(3 << 20);
        let exp = Expectation::of_file("payload", file.path()).unwrap();
        let peer = loopback_peer(vec![exp.clone(), exp]);
        assert_eq!(guest_send(peer.local_addr(), &bytes), bytes.len() as u64);
        let mut changed = bytes.clone();
        changed[1_000_000] ^= 1;
        assert_eq!(guest_send(peer.local_addr(), &changed), bytes.len() as u64);
        let (results, missing) = peer.finish(Duration::from_secs(10));
        assert!(missing.is_empty());
        assert_eq!(results.len(), 2);
        assert!(results[0].ok(), "{:?}", results[0].failure);
        assert_eq!(results[0].end, End::Fin);
        assert!(results[0].ack_sent);
        assert_eq!(
            results[1].failure,
            Some(Failure::Mismatch { offset: 1_000_000 })
        );
    }

    #[test]
    fn a_listener_kept_across_boots_checks_each_against_what_was_queued_for_it() {
        let (file, bytes) = source(1 << 20);
        let peer = loopback_peer(Vec::new());
        for boot in 0..2 {
            peer.expect(Expectation::of_file(format!("boot {boot}"), file.path()).unwrap());
            let mut sent = bytes.clone();
            if boot == 1 {
                sent[4096] ^= 0x80;
            }
            assert_eq!(guest_send(peer.local_addr(), &sent), bytes.len() as u64);
            let (results, missing) = peer.finish(Duration::from_secs(10));
            assert!(missing.is_empty());
            assert_eq!(results.len(), 1, "boot {boot} sees only its own connection");
            let label = results[0].expected.as_ref().map(|e| e.label.clone());
            assert_eq!(label, Some(format!("boot {boot}")));
            let expected_failure = (boot == 1).then_some(Failure::Mismatch { offset: 4096 });
            assert_eq!(results[0].failure, expected_failure);
        }
        // Nothing queued: the next boot's stray connection is checked against nothing.
        let (results, missing) = peer.finish(Duration::from_secs(1));
        assert!(results.is_empty() && missing.is_empty());
    }

    #[test]
    fn a_short_stream_fails_and_an_unused_expectation_is_missing() {
        let (file, bytes) = source(1 << 20);
        let exp = Expectation::of_file("payload", file.path()).unwrap();
        let peer = loopback_peer(vec![exp.clone(), Expectation::sized("never", 10)]);
        // Short: the guest closes first, and gets the short count at its FIN.
        let mut s = TcpStream::connect(peer.local_addr()).unwrap();
        s.write_all(&bytes[..1000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut count = [0u8; 8];
        s.read_exact(&mut count).unwrap();
        assert_eq!(u64::from_le_bytes(count), 1000);
        let (results, missing) = peer.finish(Duration::from_secs(10));
        assert_eq!(
            results[0].failure,
            Some(Failure::Short {
                expected: bytes.len() as u64,
                received: 1000
            })
        );
        assert_eq!(missing, vec!["never".to_string()]);
    }
}
