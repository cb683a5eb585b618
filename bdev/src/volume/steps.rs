//! The order of one snapshot's steps on a tracked volume — begin, wait for the writes
//! on the device, settle, flush, need only what changed, read, checkpoint, end or give
//! back — as a core with no I/O, no clock and no locks. The snapshot writer
//! (`ox::snapshot`, on an OX core) and the volume simulator (`sim::volume`, in tests)
//! carry out its actions and tell it what happened, so the simulator runs the
//! appliance's own order of steps, and a change to that order is made once.
//!
//! The rules it keeps (each asserted where it lives):
//! - the snapshot's point is the begin, once the writes on the device then are done and
//!   the volume is flushed: only then is the change set final and read;
//! - with a journal, nothing is claimed before this attempt's first journal is durable
//!   (it records the nonce prefixes this attempt seals frames under), and the volume
//!   is told chunks need no copies ([`Action::Commit`]) only once a journal covering
//!   them is durable; checkpoints never go back, and cover only chunks whose frames
//!   were handed to the store;
//! - a snapshot that ends without publishing removes its journal, durably, before it
//!   ends (dropping its copies and giving its changes back): ended first, a crash in
//!   between would take it up again with its copies gone and hosts' writes over its
//!   chunks. A journal that cannot be removed leaves the snapshot held, copies and all
//!   (unless no journal was ever asked for: then nothing can take it up);
//! - a snapshot stopped for a restart keeps its point in time only if a journal holds
//!   it, and never once cancelled or abandoned.

use std::collections::BTreeSet;

/// What the driver tells the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An attempt starts. `taken_up`: the volume took up again, at this start, a
    /// snapshot a restart cut short (`VolumeHandle::take_resumed`); its journal is
    /// checked before anything else.
    Start {
        /// See the variant.
        taken_up: bool,
    },
    /// The taken-up snapshot's journal was checked: `Some(next)` continues it (every
    /// chunk below `next` is stored); `None` gives it up (another configuration, a
    /// damaged journal, a lapsed upload lease), and with `start_over` the steps are
    /// ready for a fresh [`Event::Start`] once it has ended ([`Steps::idle`]).
    Checked {
        /// See the variant.
        next: Option<u64>,
        /// See the variant.
        start_over: bool,
    },
    /// The volume began the snapshot (copies of the one before drained, the change set
    /// swapped). `durable`: its copies go to a durable store, so a journal can hold it.
    Begun {
        /// See the variant.
        durable: bool,
    },
    /// Every write on the device at the begin is done.
    Settled,
    /// The volume is flushed at the snapshot's point. `base_matches`: the change set is
    /// relative to the parent the snapshot is written over.
    Flushed {
        /// See the variant.
        base_matches: bool,
    },
    /// The writer claims `chunk` to read it (in increasing order).
    Claimed(u64),
    /// The frame (or zero entry) of a claimed chunk is handed to the store.
    Handed(u64),
    /// The writer would checkpoint at `next`: every chunk below it handed to the store,
    /// and stored by the time the journal is saved.
    CheckpointDue {
        /// See the variant.
        next: u64,
    },
    /// The checkpoint's journal is durable.
    Saved {
        /// See the variant.
        next: u64,
    },
    /// The checkpoint's journal could not be saved (what is on disk is not known).
    SaveFailed {
        /// See the variant.
        next: u64,
    },
    /// The attempt is over.
    Finished(Finish),
    /// The journal was removed, durably (`ok`), or could not be.
    JournalRemoved {
        /// See the variant.
        ok: bool,
    },
}

/// How an attempt ended, as the driver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Finish {
    /// The manifest is published.
    pub published: bool,
    /// Stopped for a restart of the appliance.
    pub suspended: bool,
    /// Cancelled by the operator.
    pub cancelled: bool,
    /// The volume abandoned the snapshot (a copy before a write could not be stored).
    pub abandoned: bool,
}

/// What the core asks the driver to do, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Check the taken-up snapshot's journal, then say [`Event::Checked`].
    CheckJournal,
    /// Begin the snapshot on the volume, then say [`Event::Begun`].
    Begin,
    /// Wait for the writes on the device at the begin, then say [`Event::Settled`].
    AwaitWrites,
    /// Add to the change set what was written between the swap and the point.
    Settle,
    /// Flush the volume, then say [`Event::Flushed`].
    Flush,
    /// The change set is relative to another snapshot than the parent: read every
    /// chunk.
    ReadAll,
    /// Tell the volume the snapshot needs only the chunks in the change set.
    NeedOnly,
    /// Write the snapshot from chunk `from` on (with a journal, checkpointing at `from`
    /// before claiming anything).
    Write {
        /// See the variant.
        from: u64,
    },
    /// Save the journal at `next`, then say [`Event::Saved`] or [`Event::SaveFailed`].
    SaveJournal {
        /// See the variant.
        next: u64,
    },
    /// Tell the volume its chunks below `next` need no copies any more.
    Commit {
        /// See the variant.
        next: u64,
    },
    /// Remove the journal, durably, then say [`Event::JournalRemoved`].
    RemoveJournal,
    /// End the snapshot on the volume (its copies dropped); `give_back`: its change set
    /// goes back to the change tracking, for the next snapshot.
    End {
        /// See the variant.
        give_back: bool,
    },
    /// The published snapshot is the change set's base from now on.
    SetBase,
    /// Leave the snapshot held, copies and journal kept: suspended with a durable
    /// journal, for the next start to continue; else (its journal could not be
    /// removed) until it can be given up.
    Hold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Checking,
    /// A taken-up snapshot given up: its journal goes first.
    GivingUp {
        start_over: bool,
    },
    Beginning,
    Settling,
    Flushing,
    Writing,
    /// Ended without publishing: its journal goes first.
    Ending,
    Done,
}

/// One snapshot attempt's steps.
#[derive(Debug)]
pub struct Steps {
    phase: Phase,
    /// A journal is wanted (the volume's copies must be durable too).
    wanted: bool,
    /// The attempt keeps a journal.
    journaling: bool,
    /// A durable journal holds the snapshot (it was taken up, or saved one).
    journaled: bool,
    /// A journal may name the snapshot (it was taken up, or asked to save one).
    asked: bool,
    /// This attempt's first journal is durable.
    saved: bool,
    /// The last durable checkpoint.
    checkpointed: Option<u64>,
    /// The checkpoint being saved.
    saving: Option<u64>,
    /// Chunks claimed and not handed to the store yet.
    claimed: BTreeSet<u64>,
    /// The last chunk claimed.
    last_claim: Option<u64>,
    flaws: Flaws,
}

/// Rules broken on purpose, for the simulator to show it catches each.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Flaws {
    /// Commit a checkpoint's chunks when its journal's save begins, not once durable.
    pub(crate) commit_before_journal: bool,
    /// End a snapshot that did not publish before its journal is removed (the
    /// appliance before the simulator's review).
    pub(crate) journal_after_end: bool,
}

impl Steps {
    /// An attempt, keeping a journal if `journal` (and the volume's copies are durable).
    pub fn new(journal: bool) -> Self {
        Self {
            phase: Phase::Idle,
            wanted: journal,
            journaling: false,
            journaled: false,
            asked: false,
            saved: false,
            checkpointed: None,
            saving: None,
            claimed: BTreeSet::new(),
            last_claim: None,
            flaws: Flaws::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_flaws(journal: bool, flaws: Flaws) -> Self {
        Self {
            flaws,
            ..Self::new(journal)
        }
    }

    /// The attempt keeps a journal.
    pub fn journaling(&self) -> bool {
        self.journaling
    }

    /// The writer may claim chunks now: it is writing, and with a journal, this
    /// attempt's first one is durable.
    pub fn may_claim(&self) -> bool {
        self.phase == Phase::Writing && (!self.journaling || self.saved)
    }

    /// A checkpoint's journal is being saved.
    pub fn saving(&self) -> bool {
        self.saving.is_some()
    }

    /// The attempt is over (published, held or ended).
    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Nothing started yet, or a taken-up snapshot was given up to start over: the
    /// next event is [`Event::Start`].
    pub fn idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// Applies `event`; returns what to do, in order.
    pub fn apply(&mut self, event: Event) -> Vec<Action> {
        let phase = self.phase;
        let bad = || out_of_order(event, phase);
        match event {
            Event::Start { taken_up } => {
                if phase != Phase::Idle {
                    bad();
                }
                if taken_up {
                    assert!(self.wanted, "a snapshot taken up again has a journal");
                    // A taken-up snapshot's copies are durable, and its journal is.
                    (self.journaling, self.journaled, self.asked) = (true, true, true);
                    self.phase = Phase::Checking;
                    vec![Action::CheckJournal]
                } else {
                    self.phase = Phase::Beginning;
                    vec![Action::Begin]
                }
            }
            Event::Checked { next, start_over } => {
                if phase != Phase::Checking {
                    bad();
                }
                match next {
                    Some(next) => {
                        self.checkpointed = Some(next);
                        self.phase = Phase::Writing;
                        vec![Action::Write { from: next }]
                    }
                    None => {
                        self.phase = Phase::GivingUp { start_over };
                        vec![Action::RemoveJournal]
                    }
                }
            }
            Event::Begun { durable } => {
                if phase != Phase::Beginning {
                    bad();
                }
                self.journaling = self.wanted && durable;
                self.phase = Phase::Settling;
                vec![Action::AwaitWrites]
            }
            Event::Settled => {
                if phase != Phase::Settling {
                    bad();
                }
                self.phase = Phase::Flushing;
                vec![Action::Settle, Action::Flush]
            }
            Event::Flushed { base_matches } => {
                if phase != Phase::Flushing {
                    bad();
                }
                self.phase = Phase::Writing;
                let mut actions = Vec::with_capacity(3);
                if !base_matches {
                    actions.push(Action::ReadAll);
                }
                actions.extend([Action::NeedOnly, Action::Write { from: 0 }]);
                actions
            }
            Event::Claimed(chunk) => {
                assert!(
                    self.may_claim(),
                    "chunk {chunk} claimed in {phase:?} (journal durable: {})",
                    self.saved
                );
                assert!(
                    self.last_claim.is_none_or(|l| chunk > l),
                    "chunk {chunk} claimed after chunk {:?}",
                    self.last_claim
                );
                // A chunk below a durable checkpoint needs no copy any more: read now,
                // it could hold hosts' later writes.
                assert!(
                    self.checkpointed.is_none_or(|n| chunk >= n),
                    "chunk {chunk} claimed below the checkpoint at {:?}",
                    self.checkpointed
                );
                self.last_claim = Some(chunk);
                self.claimed.insert(chunk);
                Vec::new()
            }
            Event::Handed(chunk) => {
                assert!(
                    self.claimed.remove(&chunk),
                    "chunk {chunk} handed to the store unclaimed"
                );
                Vec::new()
            }
            Event::CheckpointDue { next } => {
                if phase != Phase::Writing || !self.journaling {
                    bad();
                }
                assert!(self.saving.is_none(), "a checkpoint while one is saved");
                assert!(
                    self.checkpointed.is_none_or(|c| next >= c),
                    "a checkpoint at {next} goes back from {:?}",
                    self.checkpointed
                );
                if let Some(&c) = self.claimed.first() {
                    assert!(
                        c >= next,
                        "a checkpoint at {next} covers chunk {c}, not handed to the store"
                    );
                }
                self.saving = Some(next);
                self.asked = true;
                let mut actions = vec![Action::SaveJournal { next }];
                if self.flaws.commit_before_journal {
                    actions.push(Action::Commit { next });
                }
                actions
            }
            Event::Saved { next } => {
                assert_eq!(
                    self.saving,
                    Some(next),
                    "a journal saved unasked ({phase:?})"
                );
                self.saving = None;
                (self.saved, self.journaled) = (true, true);
                self.checkpointed = Some(next);
                if self.flaws.commit_before_journal {
                    Vec::new()
                } else {
                    vec![Action::Commit { next }]
                }
            }
            Event::SaveFailed { next } => {
                assert_eq!(
                    self.saving,
                    Some(next),
                    "a journal failed unasked ({phase:?})"
                );
                self.saving = None;
                Vec::new()
            }
            Event::Finished(finish) => self.finish(finish),
            Event::JournalRemoved { ok } => match phase {
                Phase::GivingUp { start_over } if ok => {
                    *self = if start_over {
                        // Ready to begin afresh (the driver says when: it may have a
                        // lease to release first).
                        Self {
                            flaws: self.flaws,
                            ..Self::new(self.wanted)
                        }
                    } else {
                        Self {
                            phase: Phase::Done,
                            ..Self::new(self.wanted)
                        }
                    };
                    vec![Action::End { give_back: true }]
                }
                // (Broken so, it ended before.)
                Phase::Ending if self.flaws.journal_after_end => {
                    self.phase = Phase::Done;
                    Vec::new()
                }
                // Removed; or no journal was ever asked for, so none can take it up.
                Phase::Ending if ok || !self.asked => {
                    self.phase = Phase::Done;
                    vec![Action::End { give_back: true }]
                }
                Phase::GivingUp { .. } | Phase::Ending => {
                    self.phase = Phase::Done;
                    vec![Action::Hold]
                }
                _ => bad(),
            },
        }
    }

    fn finish(&mut self, f: Finish) -> Vec<Action> {
        let phase = self.phase;
        assert!(
            self.saving.is_none(),
            "the attempt ended while its journal was being saved"
        );
        assert!(
            !f.published || phase == Phase::Writing,
            "published in {phase:?}"
        );
        match phase {
            Phase::Done | Phase::Ending | Phase::GivingUp { .. } => {
                panic!("snapshot steps: finished in {phase:?}")
            }
            // Nothing began (it failed before its start, or its begin failed: a begin
            // that fails ends itself).
            Phase::Idle | Phase::Beginning => {
                self.phase = Phase::Done;
                Vec::new()
            }
            _ if f.published => {
                // The journal stays for the caller to remove once the snapshot is
                // catalogued: a crash before that finds the manifest and adopts it.
                self.phase = Phase::Done;
                vec![Action::End { give_back: false }, Action::SetBase]
            }
            _ if f.suspended && !f.cancelled && !f.abandoned && self.journaled => {
                self.phase = Phase::Done;
                vec![Action::Hold]
            }
            _ if self.journaling => {
                self.phase = Phase::Ending;
                if self.flaws.journal_after_end {
                    vec![Action::End { give_back: true }, Action::RemoveJournal]
                } else {
                    vec![Action::RemoveJournal]
                }
            }
            _ => {
                self.phase = Phase::Done;
                vec![Action::End { give_back: true }]
            }
        }
    }
}

/// A broken invariant: the driver told the core something out of order.
fn out_of_order(event: Event, phase: Phase) -> ! {
    panic!("snapshot steps: {event:?} in {phase:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(journal: bool, durable: bool) -> Steps {
        let mut s = Steps::new(journal);
        assert_eq!(s.apply(Event::Start { taken_up: false }), [Action::Begin]);
        assert_eq!(s.apply(Event::Begun { durable }), [Action::AwaitWrites]);
        assert_eq!(s.apply(Event::Settled), [Action::Settle, Action::Flush]);
        s
    }

    fn failed() -> Finish {
        Finish::default()
    }

    #[test]
    fn a_fresh_snapshot_settles_and_flushes_before_it_reads() {
        let mut s = fresh(false, false);
        assert!(!s.may_claim());
        assert_eq!(
            s.apply(Event::Flushed {
                base_matches: false
            }),
            [Action::ReadAll, Action::NeedOnly, Action::Write { from: 0 }]
        );
        assert!(s.may_claim() && !s.journaling());
        s.apply(Event::Claimed(3));
        s.apply(Event::Handed(3));
        let published = Finish {
            published: true,
            ..failed()
        };
        assert_eq!(
            s.apply(Event::Finished(published)),
            [Action::End { give_back: false }, Action::SetBase]
        );
        assert!(s.done());
    }

    #[test]
    fn with_a_journal_nothing_is_claimed_before_it_is_durable_and_commits_follow_saves() {
        let mut s = fresh(true, true);
        assert_eq!(
            s.apply(Event::Flushed { base_matches: true }),
            [Action::NeedOnly, Action::Write { from: 0 }]
        );
        assert!(s.journaling() && !s.may_claim());
        assert_eq!(
            s.apply(Event::CheckpointDue { next: 0 }),
            [Action::SaveJournal { next: 0 }]
        );
        assert!(s.saving() && !s.may_claim());
        assert_eq!(
            s.apply(Event::Saved { next: 0 }),
            [Action::Commit { next: 0 }]
        );
        assert!(s.may_claim());
        s.apply(Event::Claimed(1));
        s.apply(Event::Claimed(4));
        s.apply(Event::Handed(1));
        // Chunk 4 is not handed yet: a checkpoint may cover up to it, not past.
        s.apply(Event::CheckpointDue { next: 4 });
        assert_eq!(s.apply(Event::SaveFailed { next: 4 }), []);
        s.apply(Event::CheckpointDue { next: 4 });
        assert_eq!(
            s.apply(Event::Saved { next: 4 }),
            [Action::Commit { next: 4 }]
        );
    }

    #[test]
    #[should_panic(expected = "not handed")]
    fn a_checkpoint_never_covers_a_chunk_not_handed() {
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        s.apply(Event::CheckpointDue { next: 0 });
        s.apply(Event::Saved { next: 0 });
        s.apply(Event::Claimed(2));
        s.apply(Event::CheckpointDue { next: 3 });
    }

    #[test]
    #[should_panic(expected = "claimed in Writing")]
    fn nothing_is_claimed_before_the_first_journal() {
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        s.apply(Event::Claimed(0));
    }

    #[test]
    #[should_panic(expected = "below the checkpoint")]
    fn nothing_is_claimed_below_a_durable_checkpoint() {
        let mut s = Steps::new(true);
        s.apply(Event::Start { taken_up: true });
        s.apply(Event::Checked {
            next: Some(5),
            start_over: false,
        });
        s.apply(Event::CheckpointDue { next: 5 });
        s.apply(Event::Saved { next: 5 });
        s.apply(Event::Claimed(4));
    }

    #[test]
    #[should_panic(expected = "while its journal was being saved")]
    fn an_attempt_ends_only_with_no_journal_being_saved() {
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        s.apply(Event::CheckpointDue { next: 0 });
        s.apply(Event::Finished(failed()));
    }

    #[test]
    fn a_snapshot_that_fails_removes_its_journal_before_it_ends() {
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        assert_eq!(s.apply(Event::Finished(failed())), [Action::RemoveJournal]);
        assert!(!s.done());
        assert_eq!(
            s.apply(Event::JournalRemoved { ok: true }),
            [Action::End { give_back: true }]
        );
        assert!(s.done());
        // A journal that cannot be removed holds the snapshot, once one was asked for.
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        s.apply(Event::CheckpointDue { next: 0 });
        s.apply(Event::SaveFailed { next: 0 });
        s.apply(Event::Finished(failed()));
        assert_eq!(s.apply(Event::JournalRemoved { ok: false }), [Action::Hold]);
        // None asked for: nothing can take it up, so it ends.
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        s.apply(Event::Finished(failed()));
        assert_eq!(
            s.apply(Event::JournalRemoved { ok: false }),
            [Action::End { give_back: true }]
        );
        // Without a journal, it ends at once.
        let mut s = fresh(true, false);
        assert_eq!(
            s.apply(Event::Finished(failed())),
            [Action::End { give_back: true }]
        );
    }

    #[test]
    fn a_suspended_snapshot_is_held_only_with_a_durable_journal_and_never_cancelled() {
        let suspended = Finish {
            suspended: true,
            ..failed()
        };
        let journaled = || {
            let mut s = fresh(true, true);
            s.apply(Event::Flushed { base_matches: true });
            s.apply(Event::CheckpointDue { next: 0 });
            s.apply(Event::Saved { next: 0 });
            s
        };
        assert_eq!(
            journaled().apply(Event::Finished(suspended)),
            [Action::Hold]
        );
        for f in [
            Finish {
                cancelled: true,
                ..suspended
            },
            Finish {
                abandoned: true,
                ..suspended
            },
        ] {
            assert_eq!(
                journaled().apply(Event::Finished(f)),
                [Action::RemoveJournal]
            );
        }
        // No journal saved yet: nothing holds its point in time.
        let mut s = fresh(true, true);
        s.apply(Event::Flushed { base_matches: true });
        assert_eq!(s.apply(Event::Finished(suspended)), [Action::RemoveJournal]);
        // Suspended while settling: given back at once, nothing journaled.
        let mut s = fresh(false, true);
        assert_eq!(
            s.apply(Event::Finished(suspended)),
            [Action::End { give_back: true }]
        );
    }

    #[test]
    fn a_taken_up_snapshot_continues_or_is_given_up_journal_first() {
        let mut s = Steps::new(true);
        assert_eq!(
            s.apply(Event::Start { taken_up: true }),
            [Action::CheckJournal]
        );
        assert_eq!(
            s.apply(Event::Checked {
                next: Some(7),
                start_over: false
            }),
            [Action::Write { from: 7 }]
        );
        // Nothing is claimed before this attempt's journal (its nonce prefixes) is durable.
        assert!(!s.may_claim());
        s.apply(Event::CheckpointDue { next: 7 });
        assert!(!s.may_claim());
        s.apply(Event::Saved { next: 7 });
        assert!(s.may_claim());
        // Its journal was durable already: held when suspended, even before this
        // attempt's first checkpoint.
        let suspended = Finish {
            suspended: true,
            ..failed()
        };
        let mut s = Steps::new(true);
        s.apply(Event::Start { taken_up: true });
        s.apply(Event::Checked {
            next: Some(7),
            start_over: false,
        });
        assert_eq!(s.apply(Event::Finished(suspended)), [Action::Hold]);

        let mut s = Steps::new(true);
        s.apply(Event::Start { taken_up: true });
        assert_eq!(
            s.apply(Event::Checked {
                next: None,
                start_over: true
            }),
            [Action::RemoveJournal]
        );
        assert_eq!(
            s.apply(Event::JournalRemoved { ok: true }),
            [Action::End { give_back: true }]
        );
        assert!(s.idle() && !s.done());
        assert_eq!(s.apply(Event::Start { taken_up: false }), [Action::Begin]);
        assert_eq!(
            s.apply(Event::Begun { durable: true }),
            [Action::AwaitWrites]
        );

        let mut s = Steps::new(true);
        s.apply(Event::Start { taken_up: true });
        s.apply(Event::Checked {
            next: None,
            start_over: false,
        });
        assert_eq!(s.apply(Event::JournalRemoved { ok: false }), [Action::Hold]);
        assert!(s.done());
    }

    #[test]
    fn an_attempt_that_failed_before_it_began_ends_nothing() {
        let mut s = Steps::new(true);
        assert_eq!(s.apply(Event::Finished(failed())), []);
        assert!(s.done());
        let mut s = Steps::new(true);
        s.apply(Event::Start { taken_up: false });
        assert_eq!(s.apply(Event::Finished(failed())), []);
        assert!(s.done());
    }

    #[test]
    fn the_flaws_change_the_order_they_name() {
        let flaws = Flaws {
            commit_before_journal: true,
            journal_after_end: true,
        };
        let mut s = Steps::with_flaws(true, flaws);
        s.apply(Event::Start { taken_up: false });
        s.apply(Event::Begun { durable: true });
        s.apply(Event::Settled);
        s.apply(Event::Flushed { base_matches: true });
        assert_eq!(
            s.apply(Event::CheckpointDue { next: 0 }),
            [Action::SaveJournal { next: 0 }, Action::Commit { next: 0 }]
        );
        assert_eq!(s.apply(Event::Saved { next: 0 }), []);
        assert_eq!(
            s.apply(Event::Finished(failed())),
            [Action::End { give_back: true }, Action::RemoveJournal]
        );
        assert_eq!(s.apply(Event::JournalRemoved { ok: false }), []);
        assert!(s.done());
    }
}
