//! Handles for reaching a reactor from any thread: its mailbox, wake-up and statistics.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering, fence};
use std::time::Duration;

use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};

use crate::error::ReactorError;

/// A cross-core message: a function run on the receiving reactor.
pub type Message = Box<dyn FnOnce() + Send>;

/// State of one reactor shared with the threads that talk to it.
pub(crate) struct Shared {
    pub(crate) index: usize,
    pub(crate) core: usize,
    pub(crate) tx: Sender<Message>,
    /// Set while the reactor is parked (or about to park); senders then ring the eventfd.
    pub(crate) sleeping: AtomicBool,
    pub(crate) stop_requested: AtomicBool,
    /// While stopping: nothing queued, deferred or in flight as of the last pass.
    pub(crate) quiescent: AtomicBool,
    /// Messages accepted into the mailbox, and messages run to their end: a message
    /// being run counts in the first and not yet in the second, so a reactor in the
    /// middle of a handler (which may send more) is never taken for drained.
    /// Each on its own cache line: senders write `sent`, only the reactor `handled`.
    pub(crate) sent: Padded,
    pub(crate) handled: Padded,
    /// Shutdown coordination shared by every reactor of the set.
    pub(crate) set_stop: Arc<SetStop>,
    pub(crate) eventfd: OwnedFd,
    pub(crate) tid: AtomicI32,
    pub(crate) stats: Counters,
}

/// A counter alone on its cache line (two, for adjacent-line prefetching), so cores
/// that write different counters do not contend.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Padded(pub(crate) AtomicU64);

/// How the reactors of a set agree that all of them, together, have drained: a reactor
/// may only exit once no reactor has work left that could send it a message.
#[derive(Default)]
pub(crate) struct SetStop {
    /// Bumped whenever a stopping reactor goes from quiescent to busy.
    pub(crate) epoch: AtomicU64,
    /// Set by the coordinator once every reactor was quiescent at once.
    pub(crate) exit: AtomicBool,
}

/// Loop statistics, written by the reactor only.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) busy_ns: AtomicU64,
    pub(crate) idle_ns: AtomicU64,
    pub(crate) passes: AtomicU64,
    pub(crate) parks: AtomicU64,
    pub(crate) messages: AtomicU64,
}

impl Counters {
    /// Adds to a counter that only the reactor writes: a plain load and store, no
    /// locked read-modify-write on the hot path.
    pub(crate) fn bump(counter: &AtomicU64, by: u64) {
        counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
    }
}

/// A point-in-time copy of a reactor's loop statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Time spent in passes that found work.
    pub busy: Duration,
    /// Time spent in passes that found nothing, or parked.
    pub idle: Duration,
    /// Loop passes run.
    pub passes: u64,
    /// Times the reactor parked.
    pub parks: u64,
    /// Messages executed.
    pub messages: u64,
}

impl ReactorStats {
    /// Share of time spent doing work, 0.0–1.0.
    pub fn busy_fraction(&self) -> f64 {
        let total = self.busy + self.idle;
        if total.is_zero() {
            0.0
        } else {
            self.busy.as_secs_f64() / total.as_secs_f64()
        }
    }
}

/// A cheap, cloneable, thread-safe way to reach one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorHandle")
            .field("index", &self.shared.index)
            .field("core", &self.shared.core)
            .finish()
    }
}

impl ReactorHandle {
    pub(crate) fn new(
        index: usize,
        core: usize,
        depth: usize,
        eventfd: OwnedFd,
        set_stop: Arc<SetStop>,
    ) -> (Self, Receiver<Message>) {
        let (tx, rx) = crossbeam_channel::bounded(depth);
        let shared = Arc::new(Shared {
            index,
            core,
            tx,
            sleeping: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
            quiescent: AtomicBool::new(false),
            sent: Padded::default(),
            handled: Padded::default(),
            set_stop,
            eventfd,
            tid: AtomicI32::new(0),
            stats: Counters::default(),
        });
        (Self { shared }, rx)
    }

    /// Whether both handles lead to the same reactor (indexes repeat across sets).
    pub fn same(&self, other: &ReactorHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Position of this reactor in its set (0-based).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The CPU core the reactor is pinned to.
    pub fn core(&self) -> usize {
        self.shared.core
    }

    /// The reactor thread's kernel thread id (0 until it has started).
    pub fn tid(&self) -> i32 {
        self.shared.tid.load(Ordering::Acquire)
    }

    /// Queues `f` to run on the reactor. Never blocks: a full mailbox is
    /// [`ReactorError::MailboxFull`] (back-pressure), a stopped reactor
    /// [`ReactorError::Stopped`].
    pub fn send(&self, f: impl FnOnce() + Send + 'static) -> Result<(), ReactorError> {
        self.try_send(Box::new(f)).map_err(|(e, _)| e)
    }

    /// Like [`send`](Self::send) but hands the message back on failure, so the caller
    /// can retry it later without re-creating it.
    pub fn try_send(&self, msg: Message) -> Result<(), (ReactorError, Message)> {
        let reactor = self.shared.index;
        // Counted before it can be received, so it is never handled uncounted.
        self.shared.sent.0.fetch_add(1, Ordering::Relaxed);
        let refused = |e| {
            self.shared.sent.0.fetch_sub(1, Ordering::Relaxed);
            e
        };
        match self.shared.tx.try_send(msg) {
            Ok(()) => {
                self.wake_if_sleeping();
                Ok(())
            }
            Err(TrySendError::Full(msg)) => {
                Err((refused(ReactorError::MailboxFull { reactor }), msg))
            }
            Err(TrySendError::Disconnected(msg)) => {
                Err((refused(ReactorError::Stopped { reactor }), msg))
            }
        }
    }

    /// Like [`try_send`](Self::try_send), but a full mailbox is waited on for up to
    /// `patience` — woken when the reactor takes a message, not by polling — for
    /// threads that are not reactors and may wait (a courier, a journal, the control
    /// plane). Never call it from a reactor: it blocks.
    pub fn send_within(
        &self,
        msg: Message,
        patience: Duration,
    ) -> Result<(), (ReactorError, Message)> {
        debug_assert!(
            crate::current().is_none(),
            "a reactor must never wait for room in a mailbox"
        );
        let reactor = self.shared.index;
        // Counted before it can be received (as in `try_send`): a message waiting for
        // room is on its way, and a stop waits for it.
        self.shared.sent.0.fetch_add(1, Ordering::Relaxed);
        let refused = |e| {
            self.shared.sent.0.fetch_sub(1, Ordering::Relaxed);
            e
        };
        match self.shared.tx.send_timeout(msg, patience) {
            Ok(()) => {
                self.wake_if_sleeping();
                Ok(())
            }
            Err(SendTimeoutError::Timeout(msg)) => {
                Err((refused(ReactorError::MailboxFull { reactor }), msg))
            }
            Err(SendTimeoutError::Disconnected(msg)) => {
                Err((refused(ReactorError::Stopped { reactor }), msg))
            }
        }
    }

    /// Runs `f` on the reactor and waits for its result, for threads that are not
    /// reactors (control plane, tests). Never call it from a reactor: it blocks.
    pub fn call<R: Send + 'static>(
        &self,
        timeout: Duration,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(move || {
            let _ = tx.send(f());
        })?;
        let reactor = self.shared.index;
        rx.recv_timeout(timeout).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => ReactorError::Timeout {
                reactor,
                millis: timeout.as_millis() as u64,
            },
            crossbeam_channel::RecvTimeoutError::Disconnected => ReactorError::Stopped { reactor },
        })
    }

    /// Copies the reactor's loop statistics.
    pub fn stats(&self) -> ReactorStats {
        let c = &self.shared.stats;
        ReactorStats {
            busy: Duration::from_nanos(c.busy_ns.load(Ordering::Relaxed)),
            idle: Duration::from_nanos(c.idle_ns.load(Ordering::Relaxed)),
            passes: c.passes.load(Ordering::Relaxed),
            parks: c.parks.load(Ordering::Relaxed),
            messages: c.messages.load(Ordering::Relaxed),
        }
    }

    /// Asks the reactor to stop: it runs its stop hooks, drains in-flight work and exits.
    pub(crate) fn request_stop(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Publishes whether the (stopping) reactor is quiescent; going busy bumps the epoch
    /// before any new work is taken, so the coordinator can see it.
    pub(crate) fn set_quiescent(&self, quiescent: bool) {
        let was = self.shared.quiescent.swap(quiescent, Ordering::SeqCst);
        if was && !quiescent {
            self.shared.set_stop.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Quiescent as last published, with an empty mailbox and every message it was
    /// sent run to its end: then the count of messages sent to it, else `None`.
    pub(crate) fn drained_at(&self) -> Option<u64> {
        let s = &self.shared;
        // `handled` first (acquire: what its handlers sent is counted by then).
        let handled = s.handled.0.load(Ordering::Acquire);
        let sent = s.sent.0.load(Ordering::Acquire);
        (s.quiescent.load(Ordering::SeqCst) && s.tx.is_empty() && sent == handled).then_some(sent)
    }

    fn wake_if_sleeping(&self) {
        // Pairs with the fence in the reactor's park: either it sees our message, or we
        // see it sleeping and ring the eventfd.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.wake();
        }
    }

    pub(crate) fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this handle keeps open.
        let _ = unsafe { libc::write(self.shared.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}
