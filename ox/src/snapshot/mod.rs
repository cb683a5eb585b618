//! Writing a snapshot of a tracked volume into an object store, and loading one back.
//!
//! Point-in-time by copy-before-write (see `bdev::VolumeHandle`): the snapshot begins,
//! and from then on a host write to a chunk not yet read saves its old contents first.
//! Incremental: only chunks changed since the parent are read and stored; the others
//! point at the parent's frames. Sparse: zero chunks are not stored. Frames are packed
//! into objects sealed at a size threshold; index pages follow; the manifest is written
//! last, with a conditional create, so a failed snapshot leaves no visible snapshot.
//!
//! Resumable: with a journal (`SnapshotOptions::journal`) on a volume whose copies are
//! durable (`bdev::VolumeHandle::set_preserve_file`), the snapshot checkpoints how far
//! it has stored every few seconds; after a restart or a crash it continues from the
//! last checkpoint with the same point in time, snapshot ID and data key.

mod attempt;
mod encode;
mod load;
mod read_ahead;
pub mod read_back;
mod spares;
mod upload;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bdev::VolumeHandle;
use bdev::steps::{Event, Finish};
use reactor::ReactorHandle;

use crate::error::OxError;
use crate::format::{self, Manifest};
use crate::journal::{self, Journal};
use crate::keys::Kek;
use crate::store::ObjectStore;
use crate::throttle::Throttle;
use attempt::{Attempt, Next};
use writer::write;

pub(crate) use load::fetch_manifest;
pub use load::{Loaded, Source, load};
pub use upload::{UPLOAD_BYTES_IN_FLIGHT, patiently};

/// How to write a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Key prefix in the store.
    pub prefix: String,
    /// zstd level (0: none).
    pub zstd_level: i32,
    /// Encrypt under a fresh data key wrapped by this KEK (`None`: checksums only).
    pub kek: Option<Kek>,
    /// Seal data objects at this size.
    pub object_bytes: usize,
    /// Volume identity bound into every frame.
    pub volume_id: [u8; 16],
    /// Name for throttling and messages.
    pub volume_name: String,
    /// Progress to publish and a way to cancel.
    pub progress: std::sync::Arc<SnapshotProgress>,
    /// How long to keep retrying an upload while the object store is unavailable
    /// (after the store's own retries give up) before failing the snapshot: the
    /// snapshot waits out an outage and carries on where it was.
    pub outage_patience: Duration,
    /// Where to keep the snapshot's journal, so a restart can continue it (used when
    /// the volume has a durable store of copies; see the module documentation).
    pub journal: Option<PathBuf>,
    /// The object store's name, recorded in the journal: a snapshot continues only
    /// into the store it began in.
    pub store_name: String,
    /// How often a snapshot with a journal takes a checkpoint: it seals the object
    /// being filled and is saved once the objects it names are stored (by the next
    /// checkpoint at the latest), the encoder going on meanwhile; up to about twice
    /// this much work is redone after a crash ([`CHECKPOINT_EVERY`] is the appliance's
    /// choice).
    pub checkpoint_every: Duration,
    /// Read every object back and decode every frame before publishing
    /// ([`read_back`]): one GET per object stored.
    pub verify_before_publish: bool,
    /// The chunks the volume's hosts read lately (one bit each, 64 to a word, as
    /// `bdev::VolumeHandle::take_heat` gives them), stored beside the manifest as the
    /// snapshot's [`crate::format::WorkingSet`] when any is set.
    pub working_set: Option<Vec<u64>>,
    /// The appliance that must still own the volume's place in the store (its head
    /// record, `crate::bucket`) when the snapshot publishes: one adopted by another
    /// appliance while this snapshot uploaded publishes nothing ([`OxError::Owned`]),
    /// since the new owner may be collecting what no manifest names. `None`: no check.
    pub owner: Option<String>,
    /// The clocks the upload's lease is judged by (the machine's, but in tests).
    pub clock: crate::lease::Clock,
    /// The OX cores that encode the snapshot's chunks beside the one it runs on (see
    /// `encode`); none: it encodes every chunk itself.
    pub encode_on: crate::cores::CoreSet,
}

/// Progress and cancellation of a running snapshot, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct SnapshotProgress {
    /// Chunks done so far: every chunk before this one is encoded (or found unchanged)
    /// and handed to the packer and the index.
    pub chunks_done: std::sync::atomic::AtomicU64,
    /// Chunks in the volume.
    pub chunks_total: std::sync::atomic::AtomicU64,
    /// Bytes uploaded so far.
    pub bytes_uploaded: std::sync::atomic::AtomicU64,
    cancelled: std::sync::atomic::AtomicBool,
    suspended: std::sync::atomic::AtomicBool,
    /// The operations waiting out a store outage, since when and why.
    outage: std::sync::Mutex<Outage>,
    /// Notified when it is cancelled or suspended (what waits stops waiting).
    stop: event_listener::Event,
}

impl SnapshotProgress {
    /// Asks the snapshot to stop; it fails with "cancelled", publishes nothing, and the
    /// volume's change tracking keeps its changes for the next attempt.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify(usize::MAX);
    }

    /// Resolves once the snapshot is cancelled.
    pub(crate) async fn cancelled(&self) {
        self.until(|p| p.is_cancelled()).await;
    }

    /// Resolves once the snapshot is cancelled or suspended.
    pub(crate) async fn stopped(&self) {
        self.until(|p| p.is_cancelled() || p.is_suspended()).await;
    }

    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            if done(self) {
                return;
            }
            let stop = self.stop.listen();
            // Looked at again once listening, so a notification cannot be missed.
            if done(self) {
                return;
            }
            stop.await;
        }
    }

    /// Whether it was cancelled ([`Self::cancel`]).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Asks the snapshot to stop for a restart of the appliance: it fails with
    /// [`OxError::Suspended`] and, if it has a journal, keeps its point in time and
    /// journal so the next start continues it.
    pub fn suspend(&self) {
        self.suspended
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify(usize::MAX);
    }

    fn is_suspended(&self) -> bool {
        self.suspended.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// While the snapshot waits out a store outage: since when (seconds since the Unix
    /// epoch) and the store's last answer.
    pub fn outage(&self) -> Option<(u64, String)> {
        self.outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since
            .clone()
    }

    /// An operation of the snapshot begins waiting out an outage; the outage shows
    /// until every operation waiting has stopped (each [`OutageWait`] dropped), so one
    /// upload getting through while others still wait does not hide it.
    pub(crate) fn outage_wait(&self) -> OutageWait<'_> {
        self.outage_state().waiting += 1;
        OutageWait { progress: self }
    }

    fn outage_state(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fraction done, 0.0–1.0.
    pub fn fraction(&self) -> f64 {
        let total = self.chunks_total.load(std::sync::atomic::Ordering::Relaxed);
        if total == 0 {
            return 0.0;
        }
        self.chunks_done.load(std::sync::atomic::Ordering::Relaxed) as f64 / total as f64
    }
}

/// The operations of a snapshot waiting out a store outage, and since when (seconds
/// since the Unix epoch) and with what answer the store keeps them waiting.
#[derive(Debug, Default)]
struct Outage {
    waiting: usize,
    since: Option<(u64, String)>,
}

/// One operation waiting out an outage ([`SnapshotProgress::outage_wait`]): dropped
/// when it stops waiting (it got through, failed, or was cancelled).
pub(crate) struct OutageWait<'a> {
    progress: &'a SnapshotProgress,
}

impl OutageWait<'_> {
    /// The store's latest answer to this operation.
    pub(crate) fn answered(&self, reason: String) {
        let mut o = self.progress.outage_state();
        let since = o.since.as_ref().map(|(s, _)| *s).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        o.since = Some((since, reason));
    }
}

impl Drop for OutageWait<'_> {
    fn drop(&mut self) {
        let mut o = self.progress.outage_state();
        assert!(o.waiting > 0, "an outage wait ended twice");
        o.waiting -= 1;
        if o.waiting == 0 {
            o.since = None;
        }
    }
}

/// What a finished snapshot wrote.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    /// The manifest.
    pub manifest: Manifest,
    /// Its key.
    pub manifest_key: String,
    /// Bytes of frames uploaded (data objects).
    pub data_bytes: u64,
    /// Bytes of index pages and manifest uploaded.
    pub meta_bytes: u64,
    /// Chunks read from the volume.
    pub chunks_read: u64,
    /// The chunk this attempt continued from, if it continued an earlier one.
    pub resumed_at: Option<u64>,
    /// Journal checkpoints this attempt saved after its first, and the time the encoder
    /// spent on them (taking them: room to seal; saving them: the wait for a
    /// checkpoint's objects when the next is due, the journal's write and fsync).
    pub checkpoints: u32,
    /// See `checkpoints`.
    pub checkpoint_time: Duration,
    /// What reading back before publishing cost, if it was asked for.
    pub read_back: Option<read_back::ReadBack>,
    /// How long this attempt took: [`snapshot_volume`] from its start to its return.
    /// `None` for a snapshot an earlier attempt published and this one only found
    /// (its time is not known). For a resumed snapshot, this attempt's time alone.
    pub elapsed: Option<Duration>,
}

/// The appliance's checkpoint interval for snapshot journals.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Snapshots the tracked volume `handle` (read and flushed on reactor `on`) into
/// `store`, incrementally over `parent` if given. Continues the snapshot a restart cut
/// short, if the volume took one up again and its journal fits. The steps that touch
/// the volume and the journal follow [`bdev::steps`] (see the `attempt` module).
pub async fn snapshot_volume(
    store: &dyn ObjectStore,
    on: &ReactorHandle,
    handle: &VolumeHandle,
    parent: Option<&Loaded>,
    opts: &SnapshotOptions,
    throttle: &Throttle,
) -> Result<SnapshotReport, OxError> {
    let began = std::time::Instant::now();
    let parent_id = parent
        .map(|p| p.manifest.binding().map(|b| b.snapshot))
        .transpose()?;
    // However this ends (an error, a cancel, or being dropped), the attempt ends as its
    // steps say: published, given back (its journal removed first), or held for the
    // next start.
    let journal = opts.journal.as_deref();
    let mut attempt = Attempt::new(handle, on, journal, parent_id, &opts.progress);
    let from_to = writer::FromTo {
        store,
        on,
        handle,
        parent,
        opts,
        throttle,
    };
    let mut leased = None;
    let mut result = start_and_write(from_to, &mut attempt, &mut leased).await;
    let published = match result
        .as_ref()
        .map(|r| format::parse_id(&r.manifest.snapshot))
    {
        Ok(Ok(id)) => Some(id),
        // (Never: the writer made that ID.)
        Ok(Err(e)) => {
            result = Err(e);
            None
        }
        Err(_) => None,
    };
    let finish = Finish {
        published: published.is_some(),
        // Suspended, or failing because the appliance is stopping under it (its
        // reactors gone): the journal's last checkpoint stands, if there is one.
        suspended: matches!(result, Err(OxError::Suspended(_))) || opts.progress.is_suspended(),
        cancelled: opts.progress.is_cancelled(),
        abandoned: handle.snapshot_abandoned().is_some(),
    };
    let continues = attempt.finish(finish, published);
    drop(attempt);
    // Published or given up: the upload's objects are a manifest's or orphans now.
    // (Kept while the snapshot is held for the next start to continue.)
    if let Some(s) = leased.filter(|_| !continues) {
        release_lease(store, &opts.prefix, &s, opts).await;
    }
    if let Ok(SnapshotReport {
        elapsed: Some(elapsed),
        ..
    }) = &mut result
    {
        *elapsed = began.elapsed();
    }
    result
}

/// Starts `attempt` — continuing the snapshot the volume took up again, if its journal
/// fits and its upload lease held, else beginning one — and writes it. `leased` is set
/// to the snapshot whose upload lease this holds.
async fn start_and_write(
    from_to: writer::FromTo<'_>,
    attempt: &mut Attempt<'_>,
    leased: &mut Option<String>,
) -> Result<SnapshotReport, OxError> {
    let writer::FromTo {
        store,
        handle,
        opts,
        ..
    } = from_to;
    let taken_up = match &opts.journal {
        Some(path) => {
            let token = handle.take_resumed();
            if token.is_none() && handle.snapshot_token().is_none() {
                // A journal left by an attempt that ended (or never took up): stale.
                let stale = stale_lease(path, handle, opts);
                journal::remove(path)?;
                if let Some((prefix, snapshot)) = stale {
                    release_lease(store, &prefix, &snapshot, opts).await;
                }
            }
            token
        }
        None => None,
    };
    let mut next = attempt
        .step(Event::Start {
            taken_up: taken_up.is_some(),
        })
        .await?;
    let mut resumed = None;
    if let (Next::CheckJournal, Some(token), Some(path)) = (next, taken_up, &opts.journal) {
        let (j, changed) = match fitting(path, token, handle, from_to) {
            Ok(fits) => fits,
            // It cannot continue: given up, its journal first, and a fresh one begins.
            Err((changed, stale)) => {
                attempt.taken_up(changed);
                give_up(attempt, true, stale, store, opts).await?;
                next = attempt.step(Event::Start { taken_up: false }).await?;
                return write_next(from_to, attempt, next, None, leased).await;
            }
        };
        attempt.taken_up(changed);
        match lease_lapsed(store, opts, &j).await {
            Ok(false) => {
                next = attempt
                    .step(Event::Checked {
                        next: Some(j.next_chunk),
                        start_over: false,
                    })
                    .await?;
                resumed = Some(j);
            }
            // A stop while it waited for the store: the journal stands, as when the
            // writer itself is suspended.
            Err(e @ OxError::Suspended(_)) => return Err(e),
            // What it stored may have been collected (or the store cannot say, however
            // long it was waited for), and the chunks it stored before the stop are no
            // longer kept at their point in time: it cannot go on. Its changes go to
            // the next snapshot, which begins now (or at the next attempt, when the
            // lease could not be read).
            lapsed => {
                let lease = Some((opts.prefix.clone(), j.snapshot.clone()));
                give_up(attempt, lapsed.is_ok(), lease, store, opts).await?;
                if let Err(e) = lapsed {
                    return Err(OxError::Config(format!(
                        "snapshot of {} cut short by a restart is given up (its changes go \
                         to the next one): its upload lease could not be read: {e}",
                        opts.volume_name
                    )));
                }
                tracing::warn!(
                    "snapshot of {}: its upload lease lapsed while it was stopped (what it \
                     stored may have been collected), so it is given up; a new one begins",
                    opts.volume_name
                );
                next = attempt.step(Event::Start { taken_up: false }).await?;
            }
        }
    }
    write_next(from_to, attempt, next, resumed, leased).await
}

/// Gives up the snapshot `attempt` took up (its journal first, then its end), then
/// releases the upload `lease` it held (the prefix and snapshot), whatever the removal
/// did; fails if the journal stays (the snapshot is held). With `start_over`, the
/// attempt is ready to begin a fresh snapshot.
async fn give_up(
    attempt: &mut Attempt<'_>,
    start_over: bool,
    lease: Option<(String, String)>,
    store: &dyn ObjectStore,
    opts: &SnapshotOptions,
) -> Result<(), OxError> {
    let checked = Event::Checked {
        next: None,
        start_over,
    };
    let next = attempt.step(checked).await?;
    if let Some((prefix, snapshot)) = lease {
        release_lease(store, &prefix, &snapshot, opts).await;
    }
    if let Some(e) = attempt.unremoved() {
        return Err(e);
    }
    let expected = if start_over {
        Next::StartOver
    } else {
        Next::Done
    };
    debug_assert_eq!(next, expected, "a snapshot given up");
    Ok(())
}

/// Writes the snapshot where the steps say (`next`), continuing `resumed` if given.
async fn write_next(
    from_to: writer::FromTo<'_>,
    attempt: &mut Attempt<'_>,
    next: Next,
    resumed: Option<Journal>,
    leased: &mut Option<String>,
) -> Result<SnapshotReport, OxError> {
    match next {
        Next::Write(from) => write(from_to, attempt, from, resumed, leased).await,
        Next::CheckJournal | Next::StartOver | Next::Done => Err(OxError::Config(format!(
            "snapshot of {}: its steps left nothing to write ({next:?})",
            from_to.opts.volume_name
        ))),
    }
}

/// Gives up the snapshot `handle` holds that no attempt runs — one taken up again at
/// the start whose job failed before reaching it, or one an attempt left held because
/// its journal could not be removed: its journal at `journal` is removed, durably,
/// then the snapshot ends, its changes given back (in [`bdev::steps`]' order). A
/// journal that still cannot be removed leaves it held, copies and all (the error says
/// why).
pub fn give_up_held(handle: &VolumeHandle, journal: &Path) -> Result<(), OxError> {
    let changed = journal::changes_or_all(journal, handle);
    Attempt::giving_up(handle, Some(journal)).give_up(changed)
}

/// Whether the upload the journal `j` describes can no longer trust what it stored: not
/// published yet, and its lease ([`crate::lease`]) gone or last renewed longer ago than
/// a writer may trust ([`crate::lease::TRUSTED_S`]).
async fn lease_lapsed(
    store: &dyn ObjectStore,
    opts: &SnapshotOptions,
    j: &Journal,
) -> Result<bool, OxError> {
    let manifest = format::manifest_key(&opts.prefix, &format::parse_id(&j.snapshot)?);
    let published = patiently(opts, async || match store.get(&manifest).await {
        Ok(_) => Ok(true),
        Err(OxError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    })
    .await?;
    if published {
        return Ok(false);
    }
    let lease = patiently(opts, async || {
        match crate::lease::read(store, &opts.prefix, &j.snapshot).await {
            // Damaged: it says nothing a writer may trust.
            Err(OxError::Integrity { .. } | OxError::Format(_)) => Ok(None),
            read => read,
        }
    })
    .await?;
    let now = opts.clock.wall_secs();
    Ok(lease.is_none_or(|l| now > l.renewed.saturating_add(crate::lease::TRUSTED_S)))
}

/// Releases the upload lease of `snapshot` under `prefix`; one that stays (the store
/// unreachable) keeps collection from the place until it is a day old, and is said.
async fn release_lease(
    store: &dyn ObjectStore,
    prefix: &str,
    snapshot: &str,
    opts: &SnapshotOptions,
) {
    if let Err(e) = crate::lease::release(store, prefix, snapshot).await {
        tracing::warn!(
            "snapshot of {}: its upload lease {snapshot} stays (collection waits a day \
             there): {e}",
            opts.volume_name
        );
    }
}

/// The upload lease the journal at `path` names, if it is in this snapshot's store.
fn stale_lease(
    path: &Path,
    handle: &VolumeHandle,
    opts: &SnapshotOptions,
) -> Option<(String, String)> {
    Journal::load(path, handle.chunks())
        .ok()
        .flatten()
        .and_then(|(j, _)| lease_of(j, opts))
}

/// A journal's upload lease, if it is in this snapshot's store (one in another stays
/// until it is a day old).
fn lease_of(j: Journal, opts: &SnapshotOptions) -> Option<(String, String)> {
    (j.store == opts.store_name).then_some((j.prefix, j.snapshot))
}

/// The journal at `path` and its change set, if it describes the snapshot `token` the
/// volume took up and that snapshot can continue with these settings. Otherwise what
/// it gives back — its change set (or every chunk, if that cannot be read) — and the
/// upload lease it held, if it can be told, for the caller to release.
#[allow(clippy::type_complexity)]
fn fitting(
    path: &Path,
    token: [u8; 16],
    handle: &VolumeHandle,
    from_to: writer::FromTo<'_>,
) -> Result<(Journal, bdev::ChangedChunks), (bdev::ChangedChunks, Option<(String, String)>)> {
    let writer::FromTo { parent, opts, .. } = from_to;
    let fits = |j: &Journal| {
        j.token().is_ok_and(|t| t == token)
            && j.store == opts.store_name
            && j.volume == hex::encode(opts.volume_id)
            && j.prefix == opts.prefix
            && j.parent.as_deref() == parent.map(|p| p.manifest_key.as_str())
            && match (&opts.kek, &j.key) {
                (Some(kek), Some(w)) => w.kek_id == kek.id,
                (None, None) => true,
                _ => false,
            }
    };
    match Journal::load(path, handle.chunks()) {
        Ok(Some((j, changed))) if fits(&j) => Ok((j, changed)),
        loaded => {
            let stale = match loaded {
                Ok(Some((j, _))) => lease_of(j, opts),
                _ => None,
            };
            let mut changed = journal::changes_or_all(path, handle);
            changed.base = None;
            Err((changed, stale))
        }
    }
}

/// Deletes objects under `prefix` that no manifest references: what failed or cancelled
/// snapshots left behind. Objects younger than a running snapshot would look orphaned
/// too, so run it when no snapshot is being written to this prefix. Reads each
/// manifest alone (no keys needed); one that cannot be read stops it, deleting
/// nothing. Returns the keys deleted.
pub async fn collect_orphans(
    store: &dyn ObjectStore,
    prefix: &str,
    _keks: &[Kek],
) -> Result<Vec<String>, OxError> {
    let orphans = orphans(store, prefix).await?;
    store.delete(&orphans).await?;
    Ok(orphans)
}

/// The objects under `prefix` that no manifest references now: none while an upload
/// there holds a live lease, or one that cannot be read ([`crate::lease`]: what it
/// stored has no manifest yet). A manifest listed and then not found is an error (its
/// objects are not judged by a listing that lost it).
///
/// The order of the listings is what makes this safe beside an upload that starts
/// meanwhile (another appliance's, after an adoption): objects are listed first, then
/// leases, then manifests. An upload takes its lease before it stores anything and
/// releases it only after its manifest is published, so any object listed is either
/// an upload's whose lease the lease listing still sees, or one a manifest listed
/// after it names, or truly orphaned (its upload gave up, or its lease expired).
/// Listed the other way round, an upload starting between the lease listing and the
/// object listing would lose its objects. This relies on a listing showing an object
/// once its PUT is answered (AWS S3, Garage and MinIO do), as [`crate::collect`] does.
pub async fn orphans(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<String>, OxError> {
    let mut objects = Vec::new();
    for kind in ["d", "i"] {
        objects.extend(store.list(&format!("{prefix}ox1/{kind}/")).await?);
    }
    let now = crate::lease::now_secs();
    for (_, lease) in crate::lease::all(store, prefix).await? {
        if lease.is_err() || lease.is_ok_and(|l| l.live(now, crate::lease::ORPHAN_GRACE_S)) {
            return Ok(Vec::new());
        }
    }
    let mut referenced = std::collections::HashSet::new();
    for key in store.list(&format!("{prefix}ox1/m/")).await? {
        let m = fetch_manifest(store, &key).await?;
        referenced.extend(m.objects.iter().cloned());
        for page in 0..m.page_count() {
            referenced.insert(m.page_key(page)?);
        }
        referenced.insert(m.working_set_key()?);
    }
    objects.retain(|key| !referenced.contains(key));
    Ok(objects)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::local::LocalStore;
    use crate::store::{BoxFuture, Listing};

    /// The outage shows while any operation waits it out, with the latest answer and
    /// the time the first began waiting; only the last to stop waiting clears it.
    #[test]
    fn an_outage_shows_until_the_last_operation_waiting_stops() {
        let p = SnapshotProgress::default();
        assert_eq!(p.outage(), None);
        let first = p.outage_wait();
        first.answered("503 one".into());
        let since = p.outage().map(|(s, _)| s);
        assert!(since.is_some_and(|s| s > 0));
        let second = p.outage_wait();
        second.answered("503 two".into());
        assert_eq!(p.outage(), since.map(|s| (s, "503 two".to_string())));
        drop(second);
        assert_eq!(
            p.outage().map(|(s, _)| s),
            since,
            "one got through, one still waits"
        );
        drop(first);
        assert_eq!(p.outage(), None);
    }

    /// A store in which an upload starts (its lease taken, then an object stored) just
    /// after the first listing anyone asks of it.
    struct UploadStarts {
        inner: LocalStore,
        started: AtomicBool,
    }

    impl ObjectStore for UploadStarts {
        fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.put(key, data)
        }
        fn put_new<'a>(
            &'a self,
            key: &'a str,
            data: Vec<u8>,
        ) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.put_new(key, data)
        }
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.inner.get(key)
        }
        fn get_range<'a>(
            &'a self,
            key: &'a str,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.inner.get_range(key, offset, len)
        }
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>> {
            Box::pin(async move {
                let listed = self.inner.list(prefix).await;
                if !self.started.swap(true, Ordering::SeqCst) {
                    let now = crate::lease::now_secs();
                    crate::lease::renew(&self.inner, "v/", "0a0b", None, now, now).await?;
                    self.inner.put("v/ox1/d/new", vec![1]).await?;
                }
                listed
            })
        }
        fn list_page<'a>(
            &'a self,
            prefix: &'a str,
            delimiter: Option<&'a str>,
            after: Option<&'a str>,
            max: usize,
        ) -> BoxFuture<'a, Result<Listing, OxError>> {
            self.inner.list_page(prefix, delimiter, after, max)
        }
        fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.delete(keys)
        }
    }

    /// An upload that starts while orphans are being judged never has its objects taken
    /// for orphans, whichever listing it starts after (here: the first).
    #[test]
    fn an_upload_starting_meanwhile_keeps_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = UploadStarts {
            inner: LocalStore::open(dir.path()).unwrap(),
            started: AtomicBool::new(true),
        };
        async_io::block_on(async {
            store.put("v/ox1/d/old", vec![0]).await.unwrap();
            // Nothing running: the leftover is an orphan.
            assert_eq!(orphans(&store, "v/").await.unwrap(), ["v/ox1/d/old"]);
            // An upload starts after the first listing: nothing is an orphan now.
            store.started.store(false, Ordering::SeqCst);
            assert_eq!(orphans(&store, "v/").await.unwrap(), Vec::<String>::new());
            assert!(store.started.load(Ordering::SeqCst));
            assert!(store.get("v/ox1/d/new").await.is_ok());
        });
    }
}
