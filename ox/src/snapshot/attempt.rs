//! One snapshot attempt on a tracked volume, carried out in the order of
//! [`bdev::steps`]: the core decides every step that touches the volume or the journal
//! (begin, settle, flush, need only, when claims may start, checkpoints and their
//! commits, ending, giving back journal first, holding); this carries those out and
//! tells it what happened. The volume simulator drives the same core, so the order it
//! checks under power cuts is this one.

use std::path::Path;

use bdev::steps::{Action, Event, Finish, Steps};
use bdev::{ChangedChunks, VolumeHandle};
use reactor::ReactorHandle;

use super::SnapshotProgress;
use crate::error::OxError;
use crate::journal;

/// What the steps leave to the snapshot writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Check the journal of the snapshot the volume took up again.
    CheckJournal,
    /// Write the snapshot from this chunk on.
    Write(u64),
    /// The snapshot taken up was given up: start a fresh one ([`Event::Start`]).
    StartOver,
    /// The attempt is over.
    Done,
}

/// A snapshot attempt: its steps, and what carrying them out needs. Dropped before it
/// is over (its future dropped), it ends as its progress says: suspended (with a
/// durable journal), held; else as a failure, its journal removed first, then its
/// changes given back.
pub(super) struct Attempt<'a> {
    steps: Steps,
    handle: &'a VolumeHandle,
    /// Owns the volume's snapshot state if no reactor does yet; also flushes it.
    on: Option<&'a ReactorHandle>,
    progress: Option<&'a SnapshotProgress>,
    journal: Option<&'a Path>,
    /// The parent's snapshot ID: a change set relative to another is read whole.
    parent: Option<[u8; 16]>,
    /// The change set (once begun, or taken up).
    changed: Option<ChangedChunks>,
    /// The snapshot this attempt published, to become the change set's base.
    published: Option<[u8; 16]>,
    /// Why the journal could not be removed, if it could not.
    unremoved: Option<OxError>,
    /// A removal of the journal failed (a snapshot then held is not continued).
    removal_failed: bool,
    held: bool,
}

impl<'a> Attempt<'a> {
    /// An attempt on `handle` (owned by `on` if no reactor owns it yet), with a journal
    /// at `journal` if given, over the parent snapshot `parent`, stopped as `progress`
    /// says.
    pub(super) fn new(
        handle: &'a VolumeHandle,
        on: &'a ReactorHandle,
        journal: Option<&'a Path>,
        parent: Option<[u8; 16]>,
        progress: &'a SnapshotProgress,
    ) -> Self {
        Self::with(handle, Some(on), Some(progress), journal, parent)
    }

    /// An attempt only to give up the snapshot `handle` holds that no attempt runs
    /// ([`Self::give_up`]).
    pub(super) fn giving_up(handle: &'a VolumeHandle, journal: Option<&'a Path>) -> Self {
        Self::with(handle, None, None, journal, None)
    }

    fn with(
        handle: &'a VolumeHandle,
        on: Option<&'a ReactorHandle>,
        progress: Option<&'a SnapshotProgress>,
        journal: Option<&'a Path>,
        parent: Option<[u8; 16]>,
    ) -> Self {
        Self {
            steps: Steps::new(journal.is_some()),
            handle,
            on,
            progress,
            journal,
            parent,
            changed: None,
            published: None,
            unremoved: None,
            removal_failed: false,
            held: false,
        }
    }

    /// Tells the steps `event` and carries out what they ask, until they leave
    /// something to the writer (see [`Next`]).
    pub(super) async fn step(&mut self, event: Event) -> Result<Next, OxError> {
        let mut actions = std::collections::VecDeque::from(self.steps.apply(event));
        while let Some(action) = actions.pop_front() {
            let then = match action {
                Action::CheckJournal => {
                    assert!(actions.is_empty(), "steps after a check: {actions:?}");
                    return Ok(Next::CheckJournal);
                }
                Action::Write { from } => {
                    assert!(actions.is_empty(), "steps after a write: {actions:?}");
                    return Ok(Next::Write(from));
                }
                Action::Begin => {
                    self.changed = Some(
                        self.handle
                            .begin_snapshot(self.reactor()?)
                            .await
                            .map_err(|e| OxError::Config(e.to_string()))?,
                    );
                    let durable = self.handle.snapshot_token().is_some();
                    Some(Event::Begun { durable })
                }
                Action::AwaitWrites => {
                    self.handle.writes_settle().await;
                    Some(Event::Settled)
                }
                Action::Flush => {
                    // What the snapshot reads must be durable on the volume: once it
                    // is catalogued the change record forgets those chunks, and a
                    // power cut that lost writes the host never flushed would leave
                    // them differing from it, unseen by every later snapshot.
                    let flush = bdev::BdevIo::flush();
                    crate::blockio::run(self.reactor()?, self.handle.inner(), flush).await?;
                    let base_matches = self.changed().base == self.parent;
                    Some(Event::Flushed { base_matches })
                }
                action => self.carry_out(action),
            };
            if let Some(event) = then {
                actions.extend(self.steps.apply(event));
            }
        }
        if self.steps.idle() {
            return Ok(Next::StartOver);
        }
        assert!(
            self.steps.done(),
            "snapshot steps stopped with nothing to do"
        );
        Ok(Next::Done)
    }

    fn reactor(&self) -> Result<&'a ReactorHandle, OxError> {
        self.on
            .ok_or_else(|| OxError::Config("a snapshot attempt without a reactor".into()))
    }

    /// Carries out an action that needs no waiting; returns what it leads to.
    fn carry_out(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Settle => {
                let handle = self.handle;
                handle.settle(self.changed_mut());
            }
            Action::ReadAll => self.changed_mut().mark_all(),
            Action::NeedOnly => self.handle.need_only(self.changed()),
            Action::Commit { next } => self.handle.commit_through(next),
            Action::RemoveJournal => {
                let removed = self.journal.map_or(Ok(()), journal::remove);
                let ok = removed.is_ok();
                self.unremoved = removed.err().map(|e| {
                    OxError::Config(format!(
                        "the snapshot's journal could not be removed, so the snapshot stays \
                         held (writes keep their copies) until it can be: the volume's next \
                         snapshot, or the next start, gives it up: {e}"
                    ))
                });
                self.removal_failed |= !ok;
                return Some(Event::JournalRemoved { ok });
            }
            Action::End { give_back } => {
                let changed = self.changed.as_ref().filter(|_| give_back);
                assert!(
                    !give_back || changed.is_some(),
                    "a snapshot gives back changes it never had"
                );
                self.handle.end_snapshot(changed);
            }
            Action::SetBase => self.handle.set_base(self.published),
            Action::Hold => self.held = true,
            Action::CheckJournal
            | Action::Write { .. }
            | Action::Begin
            | Action::AwaitWrites
            | Action::Flush
            | Action::SaveJournal { .. } => {
                panic!("snapshot steps: {action:?} carried out out of turn")
            }
        }
        None
    }

    /// Carries out what the steps ask that needs no waiting (all of an ending does).
    fn step_now(&mut self, event: Event) {
        let mut actions = std::collections::VecDeque::from(self.steps.apply(event));
        while let Some(action) = actions.pop_front() {
            if let Some(event) = self.carry_out(action) {
                actions.extend(self.steps.apply(event));
            }
        }
    }

    /// The change set of the snapshot taken up again (from its journal).
    pub(super) fn taken_up(&mut self, changed: ChangedChunks) {
        self.changed = Some(changed);
    }

    /// Gives up, unchecked, the snapshot the volume holds (taken up again at a start, or
    /// left held by an attempt), giving `changed` back: its journal removed first, then
    /// ended; still held if the journal stays (the error says why).
    pub(super) fn give_up(&mut self, changed: ChangedChunks) -> Result<(), OxError> {
        self.changed = Some(changed);
        let asked = self.steps.apply(Event::Start { taken_up: true });
        assert_eq!(asked, [Action::CheckJournal], "a taken-up snapshot's steps");
        self.step_now(Event::Checked {
            next: None,
            start_over: false,
        });
        self.unremoved().map_or(Ok(()), Err)
    }

    /// The change set.
    pub(super) fn changed(&self) -> &ChangedChunks {
        match &self.changed {
            Some(c) => c,
            None => panic!("the snapshot's change set before it began"),
        }
    }

    fn changed_mut(&mut self) -> &mut ChangedChunks {
        match &mut self.changed {
            Some(c) => c,
            None => panic!("the snapshot's change set before it began"),
        }
    }

    /// The attempt keeps a journal (the volume's copies are durable).
    pub(super) fn journaling(&self) -> bool {
        self.steps.journaling()
    }

    /// The writer claims `chunk`.
    pub(super) fn claimed(&mut self, chunk: u64) {
        self.step_now(Event::Claimed(chunk));
    }

    /// The frame (or zero entry) of `chunk` is handed to the store.
    pub(super) fn handed(&mut self, chunk: u64) {
        self.step_now(Event::Handed(chunk));
    }

    /// Checkpoints at `next` (every chunk below it stored): `save` saves the journal,
    /// and only once it is durable is the volume told those chunks need no copies.
    pub(super) fn checkpoint(
        &mut self,
        next: u64,
        save: impl FnOnce() -> Result<(), OxError>,
    ) -> Result<(), OxError> {
        let asked = self.steps.apply(Event::CheckpointDue { next });
        assert_eq!(
            asked,
            [Action::SaveJournal { next }],
            "a checkpoint's steps"
        );
        match save() {
            Ok(()) => {
                self.step_now(Event::Saved { next });
                Ok(())
            }
            Err(e) => {
                self.step_now(Event::SaveFailed { next });
                Err(e)
            }
        }
    }

    /// Ends the attempt as `finish` says (unless its steps ended it already: a
    /// snapshot taken up and given up); `published` names the snapshot published.
    /// Returns whether the snapshot stays held for the next start to continue (its
    /// upload lease kept): suspended with a durable journal. (One held because its
    /// journal could not be removed is given up later, not continued.)
    pub(super) fn finish(&mut self, finish: Finish, published: Option<[u8; 16]>) -> bool {
        if !self.steps.done() {
            self.published = published;
            self.step_now(Event::Finished(finish));
            self.log_unremoved();
        }
        self.held && !self.removal_failed
    }

    /// Says why the journal of a snapshot that ended failing was not removed (its
    /// error is the snapshot's own).
    fn log_unremoved(&mut self) {
        if let Some(e) = self.unremoved.take() {
            tracing::error!(volume = self.handle.inner().name(), "{e}");
        }
    }

    /// Why the journal could not be removed, if it could not (the snapshot is held).
    pub(super) fn unremoved(&mut self) -> Option<OxError> {
        self.unremoved.take()
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // (Not while a broken invariant unwinds: the snapshot stays held, journal and
        // copies kept, until it is given up. Nor with a journal being saved, which
        // cannot be: saves do not wait.)
        if !self.steps.done() && !self.steps.saving() && !std::thread::panicking() {
            let finish = self.progress.map_or_else(Finish::default, |p| Finish {
                published: false,
                suspended: p.is_suspended(),
                cancelled: p.is_cancelled(),
                abandoned: self.handle.snapshot_abandoned().is_some(),
            });
            self.step_now(Event::Finished(finish));
            self.log_unremoved();
        }
    }
}
