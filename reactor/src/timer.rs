//! One-shot timers, ordered by deadline.

use std::collections::BTreeMap;
use std::time::Instant;

/// Identifies a pending one-shot timer, for cancelling it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId(Instant, u64);

type TimerFn = Box<dyn FnOnce()>;

#[derive(Default)]
pub(crate) struct Timers {
    pending: BTreeMap<TimerId, TimerFn>,
    seq: u64,
}

impl Timers {
    pub(crate) fn add(&mut self, deadline: Instant, f: TimerFn) -> TimerId {
        self.seq += 1;
        let id = TimerId(deadline, self.seq);
        self.pending.insert(id, f);
        id
    }

    pub(crate) fn cancel(&mut self, id: TimerId) -> bool {
        self.pending.remove(&id).is_some()
    }

    /// Removes and returns the earliest timer if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<TimerFn> {
        let entry = self.pending.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        Some(entry.remove())
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.pending.keys().next().map(|id| id.0)
    }
}
