//! Accepting connections: each listening socket is polled by one reactor through its
//! io_uring (an Accept operation kept in flight); every accepted socket takes a pending
//! slot ([`crate::admission`]) or is closed at once, and is handed, as a message, to
//! the next reactor in turn, where it lives for its whole life.

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reactor::io_uring::{opcode, types};
use reactor::{ReactorHandle, current};

use crate::admission;
use crate::conn::Conn;
use crate::error::NvmfError;
use crate::target::TargetShared;

/// Starts accepting on `listener` from reactor `on`.
pub(crate) fn spawn(
    target: &Arc<TargetShared>,
    on: &ReactorHandle,
    listener: TcpListener,
    local: SocketAddr,
) -> Result<(), NvmfError> {
    let target = Arc::clone(target);
    on.send(move || {
        let l = Rc::new(Listening {
            target,
            listener,
            local,
            failures: Repeats::new(REPEAT_EVERY),
        });
        if let Some(r) = current() {
            let weak = Rc::downgrade(&l);
            r.on_stop(move || {
                if let Some(l) = weak.upgrade() {
                    // Wakes the pending Accept (it fails with EINVAL) so the reactor
                    // need not wait for it.
                    // SAFETY: shutdown on a socket `l` owns and keeps open.
                    unsafe { libc::shutdown(l.listener.as_raw_fd(), libc::SHUT_RDWR) };
                }
            });
        }
        l.accept();
    })?;
    Ok(())
}

struct Listening {
    target: Arc<TargetShared>,
    listener: TcpListener,
    local: SocketAddr,
    /// Failed accepts: out of descriptors, the listener retries every 10 ms, and says
    /// so at most every [`REPEAT_EVERY`].
    failures: Repeats,
}

/// How often a listener that keeps failing to accept says so.
const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// A repeating failure, told once and then at most once per period with how many
/// happened since the last line. Successes in between change nothing: at the
/// descriptor limit accepts fail and succeed by turns, and the lines must stay few.
struct Repeats {
    period: Duration,
    unlogged: Cell<u64>,
    logged: Cell<Option<Instant>>,
}

impl Repeats {
    fn new(period: Duration) -> Self {
        Self {
            period,
            unlogged: Cell::new(0),
            logged: Cell::new(None),
        }
    }

    /// Counts a failure at `now`; `Some(failures since the last line, this one
    /// included)` when a line is due.
    fn failed(&self, now: Instant) -> Option<u64> {
        let n = self.unlogged.get() + 1;
        if self
            .logged
            .get()
            .is_some_and(|t| now.saturating_duration_since(t) < self.period)
        {
            self.unlogged.set(n);
            return None;
        }
        self.logged.set(Some(now));
        self.unlogged.set(0);
        Some(n)
    }
}

impl Listening {
    fn accept(self: &Rc<Self>) {
        let Some(r) = current() else { return };
        if r.is_stopping() {
            return;
        }
        let fd = types::Fd(self.listener.as_raw_fd());
        let entry = opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        let this = Rc::clone(self);
        // SAFETY: the operation uses no memory of ours beyond the listening socket,
        // which `this` (owned by the completion) keeps open.
        unsafe { r.submit(entry, Box::new(move |res| this.accepted(res))) };
    }

    fn accepted(self: &Rc<Self>, res: i32) {
        let Some(r) = current() else { return };
        if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let socket = std::net::TcpStream::from(fd);
            let local = self.local;
            let Ok(peer) = socket.peer_addr() else {
                // Gone already.
                return self.accept();
            };
            let target = Arc::clone(&self.target);
            match admission::admit(r.handle(), local, peer.ip(), &target.limits) {
                Ok(ticket) => {
                    let fd = OwnedFd::from(socket);
                    let to = self.target.pick_reactor().clone();
                    if let Err(e) = to.send(move || Conn::start(target, fd, local, peer, ticket)) {
                        tracing::warn!(listener = %local, %peer, error = %e, "connection dropped");
                    }
                }
                Err(why) => {
                    // Closed unread: it cannot take a real host's place.
                    drop(socket);
                    target.refused(local, peer, why.reason());
                }
            }
            self.accept();
        } else if res == -libc::ECANCELED || r.is_stopping() {
            // Reactor shutting down: stop accepting; the socket closes with `self`.
        } else {
            // Out of descriptors or memory: back off briefly rather than spin, and say
            // so once, then at most every REPEAT_EVERY with the count.
            let this = Rc::clone(self);
            if let Some(failures) = self.failures.failed(Instant::now()) {
                tracing::warn!(
                    listener = %self.local,
                    error = %std::io::Error::from_raw_os_error(-res),
                    failures,
                    "accept failed; retrying every 10 ms"
                );
            }
            r.after(Duration::from_millis(10), move || this.accept());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_told_once_per_period_with_its_count() {
        let r = Repeats::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        assert_eq!(r.failed(at(0)), Some(1), "the first is told");
        for ms in (10..10_000).step_by(10) {
            assert_eq!(r.failed(at(ms)), None, "then quiet for the period");
        }
        assert_eq!(r.failed(at(10_000)), Some(1000), "then the count since");
        assert_eq!(r.failed(at(10_010)), None);
        assert_eq!(
            r.failed(at(30_000)),
            Some(2),
            "a later one, with the untold one"
        );
    }
}
