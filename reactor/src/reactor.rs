//! The reactor: one pinned thread's event loop and the services it offers to code
//! running on it (pollers, timers, the ring, per-core channels, deferred work).

use std::any::{Any, TypeId};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::squeue;

use crate::config::{IdlePolicy, ReactorConfig};
use crate::handle::{Counters, Message, ReactorHandle};
use crate::poller::{PollStatus, PollerId, Pollers};
use crate::ring::{OnComplete, Ring};
use crate::timer::{TimerId, Timers};

/// Most completions handled per pass before pollers get their turn again.
const COMPLETION_BATCH: usize = 256;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Reactor>>> = const { RefCell::new(None) };
}

/// The reactor running on this thread, or `None` on any other thread.
pub fn current() -> Option<Rc<Reactor>> {
    CURRENT.with(|c| c.borrow().clone())
}

type Deferred = Box<dyn FnOnce()>;

/// One core's event loop. Reached through [`current`] by code running on it; everything
/// here is single-threaded and lock-free by construction.
pub struct Reactor {
    handle: ReactorHandle,
    peers: Arc<[ReactorHandle]>,
    inbox: Receiver<Message>,
    ring: RefCell<Ring>,
    pollers: RefCell<Pollers>,
    timers: RefCell<Timers>,
    deferred: RefCell<VecDeque<Deferred>>,
    before_submit: RefCell<VecDeque<Deferred>>,
    channels: RefCell<HashMap<(u64, TypeId), Rc<dyn Any>>>,
    stop_hooks: RefCell<Vec<Deferred>>,
    stopping: Cell<bool>,
    now: Cell<Instant>,
    idle: IdlePolicy,
    idle_spell: Duration,
    message_batch: usize,
    drain_timeout: Duration,
}

impl Reactor {
    pub(crate) fn new(
        handle: ReactorHandle,
        peers: Arc<[ReactorHandle]>,
        inbox: Receiver<Message>,
        config: &ReactorConfig,
    ) -> std::io::Result<Self> {
        let ring = Ring::new(config.ring_entries, handle.shared.eventfd.as_raw_fd())?;
        Ok(Self {
            handle,
            peers,
            inbox,
            ring: RefCell::new(ring),
            pollers: RefCell::default(),
            timers: RefCell::default(),
            deferred: RefCell::default(),
            before_submit: RefCell::default(),
            channels: RefCell::default(),
            stop_hooks: RefCell::default(),
            stopping: Cell::new(false),
            now: Cell::new(Instant::now()),
            idle: config.idle,
            idle_spell: config.idle_spell,
            message_batch: config.message_batch.max(1),
            drain_timeout: config.drain_timeout,
        })
    }

    /// Position of this reactor in its set.
    pub fn index(&self) -> usize {
        self.handle.index()
    }

    /// The core this reactor is pinned to.
    pub fn core(&self) -> usize {
        self.handle.core()
    }

    /// This reactor's own handle (to give to other threads).
    pub fn handle(&self) -> &ReactorHandle {
        &self.handle
    }

    /// Handles of every reactor in the set, this one included, by index.
    pub fn peers(&self) -> &[ReactorHandle] {
        &self.peers
    }

    /// The time at the start of the current loop pass (cheap; no clock read).
    pub fn now(&self) -> Instant {
        self.now.get()
    }

    /// True once shutdown has begun: refuse new long-lived work.
    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Registers a poller run on every pass. In `adaptive` and `interrupt` mode a parked
    /// reactor runs pollers only when something wakes it, so a poller waiting on an
    /// outside event must have it arrive through the ring, a message or a timer.
    pub fn register_poller(
        &self,
        name: &'static str,
        f: impl FnMut() -> PollStatus + 'static,
    ) -> PollerId {
        self.pollers
            .borrow_mut()
            .add(name, None, self.now.get(), Box::new(f))
    }

    /// Registers a poller run every `period` (a periodic timer).
    pub fn register_periodic(
        &self,
        name: &'static str,
        period: Duration,
        f: impl FnMut() -> PollStatus + 'static,
    ) -> PollerId {
        let period = period.max(Duration::from_micros(1));
        self.pollers
            .borrow_mut()
            .add(name, Some(period), Instant::now(), Box::new(f))
    }

    /// Removes a poller; returns false if it was already gone. Safe to call from the
    /// poller itself.
    pub fn unregister_poller(&self, id: PollerId) -> bool {
        self.pollers.borrow_mut().remove(id)
    }

    /// Names of the registered pollers.
    pub fn poller_names(&self) -> Vec<&'static str> {
        self.pollers.borrow().names()
    }

    /// Runs `f` once, `delay` from now.
    pub fn after(&self, delay: Duration, f: impl FnOnce() + 'static) -> TimerId {
        self.timers
            .borrow_mut()
            .add(Instant::now() + delay, Box::new(f))
    }

    /// Cancels a one-shot timer; false if it already fired.
    pub fn cancel_timer(&self, id: TimerId) -> bool {
        self.timers.borrow_mut().cancel(id)
    }

    /// Runs `f` on this reactor at the start of the next pass. Used to complete work
    /// asynchronously, so a completion never re-enters the code that submitted it.
    pub fn defer(&self, f: impl FnOnce() + 'static) {
        self.deferred.borrow_mut().push_back(Box::new(f));
    }

    /// Runs `f` once, just before this pass submits the ring's queued operations (or the
    /// next pass's, when called from a completion handler, which runs after the
    /// submission). Lets a connection gather every reply a pass produced into one
    /// send instead of sending the first alone, as SPDK's socket layer flushes once per
    /// poll-group pass.
    pub fn before_submit(&self, f: impl FnOnce() + 'static) {
        self.before_submit.borrow_mut().push_back(Box::new(f));
    }

    /// Runs `f` when the reactor begins to stop (close listeners, fail queued work).
    pub fn on_stop(&self, f: impl FnOnce() + 'static) {
        self.stop_hooks.borrow_mut().push(Box::new(f));
    }

    /// Queues an io_uring operation on this reactor's ring; `on_complete` runs here with
    /// the CQE's result. SQEs are submitted in a batch at the end of the pass.
    ///
    /// # Safety
    /// Every pointer in `entry` (buffers, iovecs, paths) must stay valid and unaliased by
    /// Rust code until `on_complete` runs; the simplest way is for `on_complete` to own it.
    pub unsafe fn submit(&self, entry: squeue::Entry, on_complete: OnComplete) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ring.borrow_mut().push(entry, on_complete) }
    }

    /// As [`Reactor::submit`], but the SQE goes to the kernel after every other SQE
    /// queued by the time the pass submits. For an operation that usually waits (a
    /// receive on an idle socket arms a poll in the kernel before the submit returns):
    /// the pass's sends, queued later in the pass, leave before that work.
    ///
    /// # Safety
    /// As for [`Reactor::submit`].
    pub unsafe fn submit_late(&self, entry: squeue::Entry, on_complete: OnComplete) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.ring.borrow_mut().push_late(entry, on_complete) }
    }

    /// Operations on this reactor's ring whose completion has not run yet.
    pub fn ops_in_flight(&self) -> usize {
        self.ring.borrow().in_flight()
    }

    /// This reactor's instance of a per-core object keyed by `key` (SPDK's io_channel):
    /// created by `make` on first use, then shared by everything on this reactor.
    pub fn channel<T: 'static, E>(
        &self,
        key: u64,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<Rc<T>, E> {
        let slot = (key, TypeId::of::<T>());
        if let Some(existing) = self.channels.borrow().get(&slot)
            && let Ok(typed) = Rc::clone(existing).downcast::<T>()
        {
            return Ok(typed);
        }
        let created = Rc::new(make()?);
        self.channels
            .borrow_mut()
            .insert(slot, Rc::clone(&created) as Rc<dyn Any>);
        Ok(created)
    }

    /// Drops this reactor's reference to a per-core object (holders keep theirs).
    pub fn release_channel<T: 'static>(&self, key: u64) -> bool {
        self.channels
            .borrow_mut()
            .remove(&(key, TypeId::of::<T>()))
            .is_some()
    }

    /// The loop. Returns when the reactor has been asked to stop and has drained.
    pub(crate) fn run(self: &Rc<Self>) -> std::io::Result<()> {
        CURRENT.with(|c| *c.borrow_mut() = Some(Rc::clone(self)));
        let counters = &self.handle.shared.stats;
        let mut completions: Vec<(OnComplete, i32)> = Vec::with_capacity(COMPLETION_BATCH);
        let mut last_work = Instant::now();
        let mut pass_start = last_work;
        let mut stop_deadline: Option<Instant> = None;
        let mut cancelled = false;
        loop {
            let now = Instant::now();
            self.now.set(now);

            if stop_deadline.is_none() && self.handle.shared.stop_requested.load(Ordering::Acquire)
            {
                stop_deadline = Some(now + self.drain_timeout);
                self.begin_stop();
            }
            if stop_deadline.is_some() && !self.quiescent() {
                self.handle.set_quiescent(false);
            }

            let work = self.drain_messages(counters)
                + self.run_deferred()
                + self.run_timers(now)
                + self.run_pollers(now)
                + self.run_ring(&mut completions)?;

            let after = Instant::now();
            let spent = after.duration_since(pass_start).as_nanos() as u64;
            pass_start = after;
            Counters::bump(&counters.passes, 1);
            if work > 0 {
                Counters::bump(&counters.busy_ns, spent);
                last_work = after;
            } else {
                Counters::bump(&counters.idle_ns, spent);
            }

            if let Some(deadline) = stop_deadline {
                let quiescent = self.quiescent();
                self.handle.set_quiescent(quiescent);
                let exit = self.handle.shared.set_stop.exit.load(Ordering::SeqCst);
                if exit && (quiescent || (cancelled && self.ring.borrow().in_flight() == 0)) {
                    break;
                }
                if !cancelled && after >= deadline {
                    self.ring.borrow_mut().cancel_all();
                    cancelled = true;
                }
                if work == 0 {
                    // Short naps: the coordinator's exit signal also rings the eventfd.
                    self.park(Some(after + Duration::from_millis(1)))?;
                    pass_start = Instant::now();
                }
                continue;
            }

            if work > 0 {
                continue;
            }
            let park = match self.idle {
                IdlePolicy::Busy => false,
                IdlePolicy::Interrupt => true,
                IdlePolicy::Adaptive => after.duration_since(last_work) >= self.idle_spell,
            };
            if park {
                Counters::bump(&counters.parks, 1);
                self.park(self.next_deadline())?;
                let woke = Instant::now();
                Counters::bump(
                    &counters.idle_ns,
                    woke.duration_since(after).as_nanos() as u64,
                );
                pass_start = woke;
            }
        }
        // Work still queued after a drain that timed out is dropped, not run: it may
        // hold what holds this reactor (a connection), which would otherwise never be
        // freed.
        let hooks = std::mem::take(&mut *self.before_submit.borrow_mut());
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        drop((hooks, deferred));
        self.channels.borrow_mut().clear();
        self.pollers.borrow_mut().clear();
        CURRENT.with(|c| *c.borrow_mut() = None);
        Ok(())
    }

    fn begin_stop(&self) {
        self.stopping.set(true);
        let hooks = std::mem::take(&mut *self.stop_hooks.borrow_mut());
        for hook in hooks {
            hook();
        }
    }

    /// Nothing left that could complete someone's request.
    fn quiescent(&self) -> bool {
        self.ring.borrow().in_flight() == 0
            && self.deferred.borrow().is_empty()
            && self.before_submit.borrow().is_empty()
            && self.inbox.is_empty()
    }

    /// While stopping, work about to run (a message, a timer) or just done (a busy
    /// poller) may leave deferred work or I/O behind, which the quiescent flag
    /// published at the end of the last pass does not show: take the flag down first
    /// (moving the epoch), and let the end of this pass decide it again. (A poller's
    /// own run is not covered: pollers run every pass, and taking the flag down for
    /// each would never let the set agree; a poller that defers work and reports busy
    /// is caught right after.)
    fn working_while_stopping(&self) {
        if self.handle.shared.stop_requested.load(Ordering::Relaxed) {
            self.handle.set_quiescent(false);
        }
    }

    fn drain_messages(&self, counters: &Counters) -> usize {
        let mut n = 0;
        while n < self.message_batch {
            match self.inbox.try_recv() {
                Ok(msg) => {
                    self.working_while_stopping();
                    msg();
                    // After it ran: whatever it sent is counted at its receiver first.
                    self.handle.shared.handled.0.fetch_add(1, Ordering::Release);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if n > 0 {
            Counters::bump(&counters.messages, n as u64);
        }
        n
    }

    fn run_deferred(&self) -> usize {
        // Only what was queued before this pass: deferred work that defers more work
        // cannot monopolise the loop.
        let queued = self.deferred.borrow().len();
        for _ in 0..queued {
            let Some(f) = self.deferred.borrow_mut().pop_front() else {
                break;
            };
            f();
        }
        queued
    }

    fn run_timers(&self, now: Instant) -> usize {
        let mut n = 0;
        loop {
            let Some(f) = self.timers.borrow_mut().pop_due(now) else {
                break;
            };
            self.working_while_stopping();
            f();
            n += 1;
        }
        n
    }

    fn run_pollers(&self, now: Instant) -> usize {
        let mut busy = 0;
        let mut index = 0;
        let count = self.pollers.borrow().len();
        for _ in 0..count {
            let taken = self.pollers.borrow_mut().take_due(index, now);
            let Some((id, mut f)) = taken else {
                index += 1;
                continue;
            };
            if f() == PollStatus::Busy {
                self.working_while_stopping();
                busy += 1;
            }
            let mut pollers = self.pollers.borrow_mut();
            pollers.put_back(id, f);
            // A poller may have removed others (or itself) before it: re-find our place.
            index = pollers.index_of(id).map_or(index, |i| i + 1);
        }
        busy
    }

    fn run_ring(&self, completions: &mut Vec<(OnComplete, i32)>) -> std::io::Result<usize> {
        // Only those queued so far: a hook that queues another cannot hold the pass.
        let hooked = self.before_submit.borrow().len();
        for _ in 0..hooked {
            let Some(hook) = self.before_submit.borrow_mut().pop_front() else {
                break;
            };
            hook();
        }
        // Hooks that ran count as work, like the SQEs they usually queue.
        let submitted = self.ring.borrow_mut().flush()? + hooked;
        self.ring.borrow_mut().reap(completions, COMPLETION_BATCH);
        let reaped = completions.len();
        for (handler, result) in completions.drain(..) {
            handler(result);
        }
        Ok(submitted + reaped)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timers = self.timers.borrow().next_deadline();
        let periodic = self.pollers.borrow().next_deadline();
        match (timers, periodic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn park(&self, deadline: Option<Instant>) -> std::io::Result<()> {
        let shared = &self.handle.shared;
        shared.sleeping.store(true, Ordering::SeqCst);
        // Pairs with the sender's fence: either they see `sleeping`, or we see their message.
        fence(Ordering::SeqCst);
        let wake_pending = !self.inbox.is_empty()
            || !self.deferred.borrow().is_empty()
            || !self.before_submit.borrow().is_empty()
            || (shared.stop_requested.load(Ordering::SeqCst) && !self.stopping.get());
        if !wake_pending {
            let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if timeout != Some(Duration::ZERO) {
                let waited = self.ring.borrow_mut().wait(timeout);
                shared.sleeping.store(false, Ordering::SeqCst);
                return waited;
            }
        }
        shared.sleeping.store(false, Ordering::SeqCst);
        Ok(())
    }
}
