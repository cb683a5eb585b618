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

mod load;
mod read_ahead;
pub mod read_back;
mod upload;
mod writer;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bdev::VolumeHandle;
use reactor::ReactorHandle;

use crate::error::OxError;
use crate::format::{self, Manifest};
use crate::journal::{self, Journal};
use crate::keys::Kek;
use crate::store::ObjectStore;
use crate::throttle::Throttle;
use writer::write;

pub(crate) use load::fetch_manifest;
pub use load::{Loaded, Source, load};
pub use upload::patiently;

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
    /// How often a snapshot with a journal checkpoints it: at most this much work is
    /// redone after a crash, and each checkpoint waits for the open uploads
    /// ([`CHECKPOINT_EVERY`] is the appliance's choice).
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
}

/// Progress and cancellation of a running snapshot, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct SnapshotProgress {
    /// Chunks examined so far.
    pub chunks_done: std::sync::atomic::AtomicU64,
    /// Chunks in the volume.
    pub chunks_total: std::sync::atomic::AtomicU64,
    /// Bytes uploaded so far.
    pub bytes_uploaded: std::sync::atomic::AtomicU64,
    cancelled: std::sync::atomic::AtomicBool,
    suspended: std::sync::atomic::AtomicBool,
    /// While an upload waits out a store outage: since when (seconds since the Unix
    /// epoch) and what the store answered.
    outage: std::sync::Mutex<Option<(u64, String)>>,
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

    fn is_cancelled(&self) -> bool {
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
            .clone()
    }

    /// Records that an upload waits out an outage (`Some(reason)`), or no longer.
    pub(crate) fn set_outage(&self, reason: Option<String>) {
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        *outage = reason.map(|r| {
            let since = outage.as_ref().map(|(s, _)| *s).unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            });
            (since, r)
        });
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
    /// Journal checkpoints this attempt wrote, and the time they took (waiting for
    /// uploads included).
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

/// Snapshots the tracked volume `handle` (read through `volume` on reactor `on`) into
/// `store`, incrementally over `parent` if given. Continues the snapshot a restart cut
/// short, if the volume took one up again and its journal fits.
pub async fn snapshot_volume(
    store: &dyn ObjectStore,
    on: &ReactorHandle,
    handle: &VolumeHandle,
    parent: Option<&Loaded>,
    opts: &SnapshotOptions,
    throttle: &Throttle,
) -> Result<SnapshotReport, OxError> {
    let began = std::time::Instant::now();
    let resumed = match &opts.journal {
        Some(path) => {
            let (resumed, stale) = resumable(path, handle, parent, opts)?;
            if let Some((prefix, snapshot)) = stale {
                release_lease(store, &prefix, &snapshot, opts).await;
            }
            match resumed {
                Some((j, changed)) => match lease_lapsed(store, opts, &j).await {
                    Ok(false) => Some((j, changed)),
                    // A stop while it waited for the store: the journal stands, as when
                    // the writer itself is suspended.
                    Err(e @ OxError::Suspended(_)) => return Err(e),
                    // What it stored may have been collected (or the store cannot say,
                    // however long it was waited for), and the chunks it stored before
                    // the stop are no longer kept at their point in time: it cannot go
                    // on. Its changes go to the next snapshot, which begins now.
                    lapsed => {
                        // The journal first (see `SnapshotGuard`); the lease goes
                        // either way.
                        let removed = journal::remove(path);
                        if removed.is_ok() {
                            handle.end_snapshot(Some(&changed));
                        }
                        release_lease(store, &opts.prefix, &j.snapshot, opts).await;
                        removed?;
                        if let Err(e) = lapsed {
                            return Err(OxError::Config(format!(
                                "snapshot of {} cut short by a restart is given up (its \
                                 changes go to the next one): its upload lease could not \
                                 be read: {e}",
                                opts.volume_name
                            )));
                        }
                        tracing::warn!(
                            "snapshot of {}: its upload lease lapsed while it was stopped \
                             (what it stored may have been collected), so it is given up; \
                             a new one begins",
                            opts.volume_name
                        );
                        None
                    }
                },
                None => None,
            }
        }
        None => None,
    };
    let (changed, resumed) = match resumed {
        Some((j, changed)) => (changed, Some(j)),
        None => {
            let mut changed = handle
                .begin_snapshot(on)
                .await
                .map_err(|e| OxError::Config(e.to_string()))?;
            // Ended on every path out of here until the writer takes over.
            let mut guard = SnapshotGuard {
                handle,
                changed: Some(changed.clone()),
                journal: None,
            };
            handle.writes_settle().await;
            handle.settle(&mut changed);
            // What the snapshot reads must be durable on the volume: once it is
            // catalogued the change record forgets those chunks, and a power cut that
            // lost writes the host never flushed would leave them differing from it,
            // unseen by every later incremental snapshot.
            crate::blockio::run(on, handle.inner(), bdev::BdevIo::flush()).await?;
            let parent_id = parent
                .map(|p| p.manifest.binding().map(|b| b.snapshot))
                .transpose()?;
            if changed.base != parent_id {
                // The change set is relative to another snapshot than the parent
                // asked for: only a full read is correct.
                changed.mark_all();
            }
            // Writes go over the chunks it does not need without copying them.
            handle.need_only(&changed);
            // Handed over to the writer's guard below.
            guard.changed = None;
            (changed, None)
        }
    };
    // From here on, however this future ends (error, cancel, or being dropped), the
    // volume is released and keeps its changes for the next attempt — except when
    // suspended for a restart, which keeps the point in time for the next start.
    let journal = opts
        .journal
        .clone()
        .filter(|_| handle.snapshot_token().is_some());
    let mut guard = SnapshotGuard {
        handle,
        changed: Some(changed.clone()),
        journal: journal.clone(),
    };
    let from_to = writer::FromTo {
        store,
        on,
        handle,
        parent,
        opts,
        throttle,
    };
    let mut leased = None;
    let mut result = write(from_to, &changed, resumed, journal.as_deref(), &mut leased).await;
    let mut keep_lease = false;
    match &result {
        Ok(report) => {
            guard.changed = None;
            guard.journal = None;
            handle.end_snapshot(None);
            handle.set_base(Some(format::parse_id(&report.manifest.snapshot)?));
        }
        // Suspended, or failing because the appliance is stopping under it (its
        // reactors gone): the journal's last checkpoint stands — if there is one, and
        // the snapshot was neither cancelled nor abandoned.
        Err(e)
            if journal.as_deref().is_some_and(Path::exists)
                && (matches!(e, OxError::Suspended(_)) || opts.progress.is_suspended())
                && !opts.progress.is_cancelled()
                && handle.snapshot_abandoned().is_none() =>
        {
            guard.changed = None;
            guard.journal = None;
            keep_lease = true;
        }
        Err(_) => {}
    }
    // Published or given up: the upload's objects are a manifest's or orphans now.
    // (Kept where the journal is: the upload continues at the next start.)
    if let Some(s) = leased.filter(|_| !keep_lease) {
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

/// A journal the volume took up and can continue, with its change set.
type Resumed = Option<(Journal, bdev::ChangedChunks)>;

/// The journal at `path` and its change set, if the volume took up the snapshot it
/// describes after a restart and that snapshot can continue with these settings.
/// Otherwise the journal is removed (and a snapshot taken up is ended, its changes kept
/// for the next attempt), and the upload lease it held, if it can be told (its prefix
/// and snapshot), is returned for the caller to release.
fn resumable(
    path: &Path,
    handle: &VolumeHandle,
    parent: Option<&Loaded>,
    opts: &SnapshotOptions,
) -> Result<(Resumed, Option<(String, String)>), OxError> {
    // (Only a lease in this store: one in another stays until it is a day old.)
    let lease_of = |j: Journal| (j.store == opts.store_name).then_some((j.prefix, j.snapshot));
    let stale_lease = || {
        Journal::load(path, handle.chunks())
            .ok()
            .flatten()
            .and_then(|(j, _)| lease_of(j))
    };
    let Some(token) = handle.take_resumed() else {
        let mut stale = None;
        if handle.snapshot_token().is_none() {
            // A journal left by an attempt that ended (or never took up): stale.
            stale = stale_lease();
            journal::remove(path)?;
        }
        return Ok((None, stale));
    };
    let loaded = Journal::load(path, handle.chunks());
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
    match loaded {
        Ok(Some((j, changed))) if fits(&j) => Ok((Some((j, changed)), None)),
        loaded => {
            let stale = match loaded {
                Ok(Some((j, _))) => lease_of(j),
                _ => None,
            };
            let mut changed = journal::changes_or_all(path, handle);
            changed.base = None;
            // The journal goes first, durably: ended first, a crash before the removal
            // would take the snapshot up again with its copies dropped and hosts'
            // writes gone over its chunks. Not removed, it is not ended (see
            // `SnapshotGuard`).
            journal::remove(path)?;
            handle.end_snapshot(Some(&changed));
            Ok((None, stale))
        }
    }
}

/// Ends a snapshot that did not finish: the volume is released and its changes kept;
/// its journal (if any) is removed.
struct SnapshotGuard<'a> {
    handle: &'a VolumeHandle,
    changed: Option<bdev::ChangedChunks>,
    journal: Option<PathBuf>,
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        // The journal first, durably, then the end: ended first, a crash between the
        // two would take the snapshot up again at the next start with its copies
        // dropped and hosts' writes gone over its chunks unguarded. A journal that
        // cannot be removed leaves the snapshot held (writes keep their copies, and
        // its changes are in the journal) until a restart takes it up again.
        if let Some(path) = self.journal.take()
            && let Err(e) = journal::remove(&path)
        {
            tracing::error!(path = %path.display(), error = %e, "snapshot journal not removed: the snapshot stays held until oxd restarts and takes it up again");
            return;
        }
        if let Some(c) = self.changed.take() {
            self.handle.end_snapshot(Some(&c));
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
