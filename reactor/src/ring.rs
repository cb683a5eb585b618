//! The reactor's io_uring: submission, completion routing and parking.
//!
//! Every operation in flight owns its state — buffers, iovecs and what to do with the
//! result — in a slab slot whose index is the SQE's `user_data`. The kernel may use the
//! memory an SQE points at until the CQE arrives; because that memory is owned by the
//! slot's completion closure, it cannot be freed or reused before then.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

/// What to run when an operation completes; it receives the CQE's result (a byte count
/// or a negated errno) and owns every buffer the operation used.
pub type OnComplete = Box<dyn FnOnce(i32)>;

/// `user_data` of the poll on the reactor's wake-up eventfd.
const WAKE: u64 = u64::MAX;
/// `user_data` of cancellation requests, whose own completions carry nothing.
const CANCEL: u64 = u64::MAX - 1;

pub(crate) struct Ring {
    uring: IoUring,
    slots: Vec<Option<OnComplete>>,
    free: Vec<u32>,
    /// SQEs that did not fit in the submission queue; pushed on the next flush.
    backlog: VecDeque<squeue::Entry>,
    /// SQEs to queue after everything else, at the next flush (see [`Ring::push_late`]).
    late: Vec<squeue::Entry>,
    in_flight: usize,
    wake_fd: RawFd,
    wake_armed: bool,
}

impl Ring {
    pub(crate) fn new(entries: u32, wake_fd: RawFd) -> io::Result<Self> {
        // Completions arrive as task work; with cooperative task running the kernel
        // sets a flag instead of interrupting a polling reactor, and the next enter runs
        // it. Only this thread ever touches the ring (single issuer).
        let uring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .setup_clamp()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)?;
        Ok(Self {
            uring,
            slots: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            late: Vec::new(),
            in_flight: 0,
            wake_fd,
            wake_armed: false,
        })
    }

    /// Operations submitted whose completion has not been delivered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues `entry`; `on_complete` runs on this reactor with the CQE's result.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until `on_complete` is called (normally
    /// by being owned by `on_complete`).
    pub(crate) unsafe fn push(&mut self, entry: squeue::Entry, on_complete: OnComplete) {
        let slot = self.take_slot(on_complete);
        self.enqueue(entry.user_data(u64::from(slot)));
    }

    /// As [`Ring::push`], but the SQE is queued at the next flush, after every SQE
    /// queued before that flush.
    ///
    /// # Safety
    /// As for [`Ring::push`].
    pub(crate) unsafe fn push_late(&mut self, entry: squeue::Entry, on_complete: OnComplete) {
        let slot = self.take_slot(on_complete);
        self.late.push(entry.user_data(u64::from(slot)));
    }

    /// A slot holding `on_complete`, counted in flight.
    fn take_slot(&mut self, on_complete: OnComplete) -> u32 {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(on_complete);
                slot
            }
            None => {
                self.slots.push(Some(on_complete));
                (self.slots.len() - 1) as u32
            }
        };
        self.in_flight += 1;
        self.check_slots();
        slot
    }

    /// Queues the SQEs held back by [`Ring::push_late`], behind everything queued.
    fn queue_late(&mut self) {
        let mut late = std::mem::take(&mut self.late);
        for entry in late.drain(..) {
            self.enqueue(entry);
        }
        self.late = late;
    }

    fn enqueue(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(entry);
            return;
        }
        // SAFETY: the caller of `push` guaranteed the entry's memory outlives its
        // completion; wake and cancel entries point at no memory.
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            self.backlog.push_back(entry);
        }
    }

    /// Moves backlogged SQEs into the queue and submits whatever is queued.
    /// Returns the number of SQEs handed to the kernel.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        self.queue_late();
        let mut submitted = 0;
        loop {
            {
                let mut sq = self.uring.submission();
                while let Some(entry) = self.backlog.front() {
                    // SAFETY: as in `enqueue`.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            let idle = {
                let sq = self.uring.submission();
                sq.is_empty() && !sq.taskrun()
            };
            if idle {
                return Ok(submitted);
            }
            match self.uring.submit() {
                Ok(n) => submitted += n,
                // The completion queue is full: the caller reaps, then flushes again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(submitted),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(submitted);
            }
        }
    }

    /// Takes up to `max` completions off the queue and appends their handlers and
    /// results to `out`; the caller runs them once the ring is no longer borrowed.
    /// Returns whether the wake-up eventfd fired.
    pub(crate) fn reap(&mut self, out: &mut Vec<(OnComplete, i32)>, max: usize) -> bool {
        let mut woken = false;
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in cq.by_ref().take(max) {
            match cqe.user_data() {
                WAKE => {
                    woken = true;
                    self.wake_armed = false;
                }
                CANCEL => {}
                slot => {
                    let Some(handler) = self.slots.get_mut(slot as usize).and_then(Option::take)
                    else {
                        debug_assert!(false, "completion for an empty slot {slot}");
                        continue;
                    };
                    self.free.push(slot as u32);
                    assert!(self.in_flight > 0, "a completion with nothing in flight");
                    self.in_flight -= 1;
                    out.push((handler, cqe.result()));
                }
            }
        }
        drop(cq);
        self.check_slots();
        if woken {
            drain_eventfd(self.wake_fd);
        }
        woken
    }

    /// Every operation in flight holds exactly one slot; every other slot is free.
    fn check_slots(&self) {
        assert_eq!(
            self.in_flight + self.free.len(),
            self.slots.len(),
            "ring slots: {} in flight + {} free != {} slots",
            self.in_flight,
            self.free.len(),
            self.slots.len()
        );
    }

    /// Whether completions are waiting to be reaped.
    pub(crate) fn has_completions(&mut self) -> bool {
        let mut cq = self.uring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Parks until a completion arrives (including a wake-up on the eventfd) or
    /// `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.wake_armed {
            let poll = opcode::PollAdd::new(types::Fd(self.wake_fd), libc::POLLIN as u32)
                .build()
                .user_data(WAKE);
            self.enqueue(poll);
            self.wake_armed = true;
        }
        self.flush()?;
        if !self.backlog.is_empty() || self.has_completions() {
            return Ok(());
        }
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
            None => self.uring.submitter().submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Asks the kernel to cancel every operation in flight; each completes with
    /// `-ECANCELED` (or its real result if it finished first).
    pub(crate) fn cancel_all(&mut self) {
        // Ahead of the cancel, so that it finds them (a receive queued after it would
        // be left waiting, and hold the reactor's stop).
        self.queue_late();
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        self.enqueue(cancel);
    }
}

/// Resets an eventfd's counter (non-blocking; nothing to read is fine).
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut value = 0u64;
    // SAFETY: reading 8 bytes into a live, properly aligned u64 owned by this frame.
    let _ = unsafe { libc::read(fd, (&raw mut value).cast(), 8) };
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still write into buffers owned by in-flight handlers: cancel
        // everything and wait for every completion before those buffers are freed.
        if self.in_flight == 0 {
            return;
        }
        self.cancel_all();
        let mut done = Vec::new();
        while self.in_flight > 0 {
            if self.flush().is_err() || self.uring.submit_and_wait(1).is_err() {
                // The ring is unusable; leaking the handlers is the only safe choice.
                for slot in self.slots.drain(..) {
                    std::mem::forget(slot);
                }
                return;
            }
            self.reap(&mut done, usize::MAX);
            done.clear();
        }
    }
}
