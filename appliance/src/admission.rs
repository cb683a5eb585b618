//! Who may hold a control-API connection, and for how long: connection slots (in all
//! and per peer address), total deadlines for authentication and for each request,
//! an idle limit between requests, and rate-limited reports of what was refused.
//!
//! The control API runs a thread per connection, off the reactors; a client that
//! connects and then dribbles a byte every few seconds must not hold a slot for
//! longer than its deadline, and a few peers must not take every slot. The Unix
//! socket has slots of its own, so remote clients can never lock out the local
//! operator.

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits of one control listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one peer address (TCP only).
    pub max_per_peer: usize,
    /// From accepting a connection to its last authentication byte (TLS handshake
    /// included): a total, not a per-read, limit.
    pub auth_timeout: Duration,
    /// From a request's first byte to its last.
    pub request_timeout: Duration,
    /// Waiting for the next request.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_per_peer: 4,
            auth_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Why a connection was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// Its peer holds its share of slots.
    PeerFull,
}

impl Refusal {
    /// Its name in logs and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Full => "too many connections",
            Self::PeerFull => "too many connections from this address",
        }
    }
}

/// Connection slots of one listener: counts in all and per peer address.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    held: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A slot held by one connection; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    peer: Option<IpAddr>,
}

impl Slots {
    /// Slots under `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        assert!(limits.max_connections > 0 && limits.max_per_peer > 0);
        Arc::new(Self {
            limits,
            held: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a connection from `peer` (None: a local socket), or why not.
    pub fn take(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Slot, Refusal> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *held;
        if *total >= self.limits.max_connections {
            return Err(Refusal::Full);
        }
        if let Some(ip) = peer {
            let n = per_peer.entry(ip).or_insert(0);
            if *n >= self.limits.max_per_peer {
                return Err(Refusal::PeerFull);
            }
            *n += 1;
        }
        *total += 1;
        Ok(Slot {
            slots: Arc::clone(self),
            peer,
        })
    }

    /// Connections held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per_peer) = &mut *held;
        assert!(*total > 0, "a slot given back that was never taken");
        *total -= 1;
        if let Some(ip) = self.peer {
            let n = per_peer.get(&ip).copied().unwrap_or(0);
            assert!(n > 0, "a peer's slot given back that was never taken");
            if n == 1 {
                per_peer.remove(&ip);
            } else {
                per_peer.insert(ip, n - 1);
            }
        }
    }
}

/// What a socket must allow a [`DeadlineStream`]: bound its next read.
pub trait ReadTimeout {
    /// Makes the next read give up after `t`.
    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()>;
}

impl ReadTimeout for std::net::TcpStream {
    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, Some(t))
    }
}

impl ReadTimeout for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, t: Duration) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, Some(t))
    }
}

/// A deadline shared by a connection's stream and whoever serves it (one thread).
#[derive(Debug, Clone)]
pub struct Deadline(Rc<Cell<Instant>>);

impl Deadline {
    /// A deadline `after` from now.
    pub fn new(after: Duration) -> Self {
        Self(Rc::new(Cell::new(Instant::now() + after)))
    }

    /// Moves it to `after` from now.
    pub fn set_in(&self, after: Duration) {
        self.0.set(Instant::now() + after);
    }

    fn left(&self) -> Duration {
        self.0.get().saturating_duration_since(Instant::now())
    }
}

/// A socket whose reads fail with `TimedOut` once its [`Deadline`] has passed,
/// however the bytes trickle in: before every read the socket is given only the time
/// left. TLS runs over it, so the handshake counts against the deadline too.
#[derive(Debug)]
pub struct DeadlineStream<S> {
    socket: S,
    deadline: Deadline,
}

impl<S> DeadlineStream<S> {
    /// `socket` under `deadline`.
    pub fn new(socket: S, deadline: Deadline) -> Self {
        Self { socket, deadline }
    }
}

impl<S: Read + ReadTimeout> Read for DeadlineStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.left();
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.socket.set_read_timeout(left)?;
        match self.socket.read(buf) {
            // SO_RCVTIMEO expiring reads as WouldBlock.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                Err(std::io::ErrorKind::TimedOut.into())
            }
            other => other,
        }
    }
}

impl<S: Write> Write for DeadlineStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.socket.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.socket.flush()
    }
}

/// Lets through at most `per_minute` reports of one kind a minute and counts the
/// rest, so a flood of refusals or bad tokens cannot fill a log; every report says
/// how many were left out before it.
#[derive(Debug)]
pub struct RateLimited {
    per_minute: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// When the current minute began (None: nothing reported yet).
    started: Option<Instant>,
    /// Reports let through in it.
    reported: u32,
    /// Occurrences left out since the last report.
    left_out: u64,
}

impl RateLimited {
    /// At most `per_minute` a minute.
    pub const fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            window: Mutex::new(Window {
                started: None,
                reported: 0,
                left_out: 0,
            }),
        }
    }

    /// Whether to report this occurrence now; if so, how many were left out since the
    /// last report.
    pub fn admit(&self) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if w.started
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60))
        {
            w.started = Some(now);
            w.reported = 0;
        }
        if w.reported < self.per_minute {
            w.reported += 1;
            Some(std::mem::take(&mut w.left_out))
        } else {
            w.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_in_all_and_per_peer() {
        let slots = Slots::new(Limits {
            max_connections: 3,
            max_per_peer: 2,
            ..Limits::default()
        });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = slots.take(Some(a)).unwrap();
        let _a2 = slots.take(Some(a)).unwrap();
        assert_eq!(slots.take(Some(a)).unwrap_err(), Refusal::PeerFull);
        let _b1 = slots.take(Some(b)).unwrap();
        assert_eq!(slots.take(None).unwrap_err(), Refusal::Full);
        drop(a1);
        assert_eq!(slots.held(), 2);
        let _local = slots.take(None).unwrap();
        assert_eq!(slots.take(Some(b)).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn a_dribbling_peer_meets_its_deadline() {
        use std::os::unix::net::UnixStream;
        let (mut client, server) = UnixStream::pair().unwrap();
        let deadline = Deadline::new(Duration::from_millis(300));
        let mut stream = DeadlineStream::new(server, deadline.clone());
        let mut buf = [0u8; 1];
        // A byte well inside every per-read timeout, again and again, until the total
        // deadline ends the connection.
        let mut got = 0;
        let err = loop {
            client.write_all(b"x").unwrap();
            match stream.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
            std::thread::sleep(Duration::from_millis(20));
            assert!(got < 100_000, "never timed out");
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        // A new deadline, a new allowance.
        deadline.set_in(Duration::from_secs(60));
        client.write_all(b"y").unwrap();
        assert_eq!(stream.read(&mut buf).unwrap(), 1);
    }

    #[test]
    fn reports_are_limited_and_count_what_was_left_out() {
        let r = RateLimited::new(3);
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        assert_eq!(r.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.admit(), None);
        }
        // A minute later the 1000 left out are reported with the next one.
        r.window.lock().unwrap().started = Some(Instant::now() - Duration::from_secs(61));
        assert_eq!(r.admit(), Some(1000));
        assert_eq!(r.admit(), Some(0));
    }
}
