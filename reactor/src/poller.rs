//! Pollers: functions a reactor calls on every pass (or every period) that say
//! whether they found work.

use std::time::{Duration, Instant};

/// A poller's answer: did this call do anything? The idle policy is built on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollStatus {
    /// Work was done; the reactor keeps polling.
    Busy,
    /// Nothing to do.
    Idle,
}

impl PollStatus {
    /// `Busy` when `work` is true.
    pub fn from_work(work: bool) -> Self {
        if work { Self::Busy } else { Self::Idle }
    }
}

/// Identifies a registered poller, for unregistering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

type PollFn = Box<dyn FnMut() -> PollStatus>;

struct Slot {
    id: PollerId,
    name: &'static str,
    /// `None` while the poller is running (it is taken out so it may touch the registry).
    f: Option<PollFn>,
    period: Option<Duration>,
    next: Instant,
}

/// The reactor's pollers. Pollers may register and unregister pollers (themselves
/// included) while they run; additions take effect on the next pass.
#[derive(Default)]
pub(crate) struct Pollers {
    slots: Vec<Slot>,
    next_id: u64,
}

impl Pollers {
    pub(crate) fn add(
        &mut self,
        name: &'static str,
        period: Option<Duration>,
        now: Instant,
        f: PollFn,
    ) -> PollerId {
        self.next_id += 1;
        let id = PollerId(self.next_id);
        let next = period.map_or(now, |p| now + p);
        self.slots.push(Slot {
            id,
            name,
            f: Some(f),
            period,
            next,
        });
        id
    }

    pub(crate) fn remove(&mut self, id: PollerId) -> bool {
        let before = self.slots.len();
        self.slots.retain(|s| s.id != id);
        before != self.slots.len()
    }

    pub(crate) fn clear(&mut self) {
        self.slots.clear();
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Takes the poller at `index` out to be run if it is due, returning its id.
    pub(crate) fn take_due(&mut self, index: usize, now: Instant) -> Option<(PollerId, PollFn)> {
        let slot = self.slots.get_mut(index)?;
        if slot.period.is_some() && now < slot.next {
            return None;
        }
        let f = slot.f.take()?;
        if let Some(period) = slot.period {
            // Skip missed periods rather than running a burst to catch up.
            slot.next = (slot.next + period).max(now);
        }
        Some((slot.id, f))
    }

    /// Returns a poller taken by `take_due`, unless it was unregistered meanwhile.
    pub(crate) fn put_back(&mut self, id: PollerId, f: PollFn) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.id == id) {
            slot.f = Some(f);
        }
    }

    /// Position of a poller; indices shift when pollers are removed mid-pass.
    pub(crate) fn index_of(&self, id: PollerId) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    /// Earliest time a periodic poller is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter(|s| s.period.is_some())
            .map(|s| s.next)
            .min()
    }

    /// Names of the registered pollers, for diagnostics.
    pub(crate) fn names(&self) -> Vec<&'static str> {
        self.slots.iter().map(|s| s.name).collect()
    }
}
