//! The appliance's volumes, clones and snapshots: what the control API creates and
//! changes, kept in the [`Catalogue`] and reopened at start.
//!
//! Every change is made in this order: the local files, the catalogue (atomically),
//! then the export — so a crash never leaves a catalogue entry without its data, and at
//! worst leaves an unreferenced file. Long operations (snapshots, verification) run as
//! [`Job`]s on the OX cores and report progress; the control thread never blocks on one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bdev::{Basis, Bdev, CloneHandle, Tracking, UringConfig, VolumeHandle};
use nvmf::{Namespace, Subsystem, Target};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::cores::OxCores;
use ox::hydrate::Thickening;
use ox::keys::Kek;
use ox::snapshot::{Loaded, SnapshotOptions, SnapshotProgress};
use ox::store::ObjectStore;
use ox::store::local::LocalStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use ox_api::methods::{self as api, ThickenAction};
use reactor::ReactorHandle;
use serde_json::{Value, json};
use uuid::Uuid;

mod bucket;
mod failback;
mod observe;
mod policies;
mod transfer;

pub use observe::{CloneView, PolicyView, fetched};

pub use bucket::InBucket;

use crate::catalogue::{
    Catalogue, CloneRecord, ExportRecord, PendingSnapshot, SnapshotRecord, VolumeRecord,
};
use crate::health::{CloneTotals, HealthFile, OpenClones};
use crate::refusal::{Refusal, conflict, invalid, not_found, shown};

/// The snapshot a new clone reads.
pub enum CloneSource<'a> {
    /// One this appliance catalogued, by ID.
    Catalogued(&'a str),
    /// A manifest in a store, by key.
    Manifest {
        /// The store.
        store: &'a str,
        /// The manifest's key.
        key: &'a str,
    },
    /// One found through the store's own catalogue (another appliance's, say).
    Bucket {
        /// The store.
        store: &'a str,
        /// The volume: name, identity or prefix.
        volume: &'a str,
        /// Which of its snapshots.
        which: InBucket<'a>,
    },
}

/// An object store as configured.
#[derive(Clone)]
pub enum StoreSpec {
    /// S3-compatible.
    S3(Box<S3Config>),
    /// A local directory.
    Local(PathBuf),
}

impl StoreSpec {
    /// A factory making this store on an OX core.
    pub fn factory(&self) -> StoreFactory {
        let spec = self.clone();
        Arc::new(move |ex| spec.open(ex))
    }

    fn open(
        &self,
        ex: &Rc<async_executor::LocalExecutor<'static>>,
    ) -> Result<Rc<dyn ObjectStore>, ox::OxError> {
        Ok(match self {
            Self::S3(c) => Rc::new(S3Store::new((**c).clone(), Rc::clone(ex))?),
            Self::Local(p) => Rc::new(LocalStore::open(p.clone())?),
        })
    }
}

/// Settings the service runs with (from `[ox]`, `[[store]]`, `[[key]]`).
pub struct Settings {
    /// State directory.
    pub state_dir: PathBuf,
    /// Stores by name.
    pub stores: HashMap<String, StoreSpec>,
    /// Keys; the first is the default.
    pub keys: Vec<Kek>,
    /// Bandwidth policy.
    pub throttle: Throttle,
    /// Export listeners.
    pub export_listeners: Vec<SocketAddr>,
    /// zstd level.
    pub zstd_level: i32,
    /// Object size.
    pub object_bytes: usize,
    /// Chunk size of new volumes.
    pub chunk_bytes: u64,
    /// Stores whose snapshots are read back before they are published.
    pub verify_before_publish: std::collections::HashSet<String>,
    /// Hosts that must authenticate to the exports that let them in (`[[host]]`);
    /// replaced when the configuration is reloaded.
    pub host_keys: std::sync::RwLock<Vec<nvmf::dhchap::HostKeys>>,
}

/// Jobs kept in memory for `job_get` and `job_list` (finished ones beyond this are
/// forgotten, oldest first).
const MAX_JOBS: usize = 1000;

/// A long operation's progress and outcome.
pub struct Job {
    id: u64,
    kind: String,
    target: String,
    done: AtomicU64,
    total: AtomicU64,
    bytes: AtomicU64,
    progress: Mutex<Option<Arc<SnapshotProgress>>>,
    /// A restore's or a verify's progress and cancellation.
    pass: Option<Arc<ox::hydrate::Pass>>,
    /// The store's retry log, and its count and the time (Unix seconds) when the job
    /// began: the job shows the retries made since.
    retries: Option<(Arc<ox::store::retries::RetryLog>, u64, u64)>,
    /// How it ended, once it has: its result, or why it failed. The result is JSON, as
    /// [`api::Job`] carries it: each kind of job produces its own (a snapshot's record,
    /// a verify's report, a restore's volume).
    outcome: Mutex<Option<Result<Value, String>>>,
}

impl Job {
    /// The job as the API shows it (`job_get`, and the methods that start one).
    fn info(&self) -> api::Job {
        // The outcome first: a job that ends meanwhile shows its progress complete.
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(p) = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            self.done
                .store(p.chunks_done.load(Ordering::Relaxed), Ordering::Relaxed);
            self.total
                .store(p.chunks_total.load(Ordering::Relaxed), Ordering::Relaxed);
            self.bytes
                .store(p.bytes_uploaded.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Some(p) = &self.pass {
            self.done
                .store(p.chunks.load(Ordering::Relaxed), Ordering::Relaxed);
            self.bytes
                .store(p.bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let outage = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|p| p.outage())
            .map(|(since, reason)| api::Outage { since, reason });
        let (retries, last_retry) = match &self.retries {
            Some((log, count, began)) => (
                log.count().saturating_sub(*count),
                log.last().filter(|r| r.at >= *began).map(retry_info),
            ),
            None => (0, None),
        };
        let (state, result, error) = match outcome.as_ref() {
            None => (api::JobState::Running, Value::Null, None),
            Some(Ok(v)) => (api::JobState::Done, v.clone(), None),
            Some(Err(e)) => (api::JobState::Failed, Value::Null, Some(e.clone())),
        };
        api::Job {
            id: self.id,
            kind: self.kind.clone(),
            target: self.target.clone(),
            state,
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            retries,
            last_retry,
            outage,
            result,
            error,
        }
    }
}

/// A store's retry as the API shows it (a job's, a store's latest).
fn retry_info(r: ox::store::retries::Retry) -> api::Retry {
    api::Retry {
        at: r.at,
        op: r.op.to_string(),
        key: r.key,
        reason: r.reason,
    }
}

struct LiveVolume {
    bdev: Bdev,
    handle: VolumeHandle,
    /// For a volume over a snapshot: the device under it that reads what it lacks
    /// from the store (its presence is saved at a clean stop).
    over: Option<CloneHandle>,
    /// A snapshot of it is running.
    busy: Arc<AtomicBool>,
}

struct LiveClone {
    bdev: Bdev,
    handle: CloneHandle,
    basis: ObjectBasis,
    thickening: Option<Arc<Thickening>>,
    /// The fetch of its snapshot's working set, while it runs.
    warming: Option<Arc<Thickening>>,
    /// What it had counted before this opening (the health file's; zero for a new one).
    base: CloneTotals,
}

impl Drop for LiveClone {
    /// A clone that is gone (deleted, or a create undone) fetches nothing more.
    fn drop(&mut self) {
        for t in self.thickening.iter().chain(&self.warming) {
            t.stop();
        }
    }
}

struct Inner {
    catalogue: Catalogue,
    volumes: HashMap<String, LiveVolume>,
    clones: HashMap<String, LiveClone>,
    /// Volumes and clones that could not be reopened at start, with why: listed, never
    /// served.
    unavailable: HashMap<String, String>,
    jobs: HashMap<u64, Arc<Job>>,
    next_job: u64,
    /// Names of volumes and clones being created (slow creates run without the lock).
    reserved: std::collections::HashSet<String>,
}

impl Inner {
    /// The live volume `name`, or why there is none.
    fn volume(&self, name: &str) -> anyhow::Result<&LiveVolume> {
        if let Some(why) = self.unavailable.get(name) {
            conflict!("volume {} is unavailable: {why}", shown(name));
        }
        self.volumes
            .get(name)
            .ok_or_else(|| Refusal::NotFound(format!("no volume named {}", shown(name))).into())
    }

    /// Whether `name` is a volume or clone, or about to be one.
    fn taken(&self, name: &str) -> bool {
        self.catalogue.has_name(name) || self.reserved.contains(name)
    }
}

/// A name held for a create in progress; released when dropped.
struct Reservation {
    service: Arc<Service>,
    name: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.service.inner().reserved.remove(&self.name);
    }
}

/// Volumes, clones, snapshots and jobs.
pub struct Service {
    settings: Settings,
    reactors: Vec<ReactorHandle>,
    cores: Arc<OxCores>,
    target: Arc<Target>,
    inner: Mutex<Inner>,
    audit: Option<Arc<ox_api::audit::AuditLog>>,
    /// Where clones' counters are kept across restarts, if anywhere.
    health_file: Option<Arc<HealthFile>>,
    /// Set when a clean stop begins: jobs failing from then on stay pending.
    stopping: AtomicBool,
    /// Each store's last check (at start, or `store_check`), shown by `store_list`.
    checks: Mutex<HashMap<String, api::LastCheck>>,
    /// Protection policies' running state.
    policies: policies::Policies,
    /// This appliance in the stores' catalogues (fixed from start to stop).
    appliance: ox::bucket::Appliance,
}

fn now_secs() -> u64 {
    now_ms() / 1000
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Checks a name used for files and NQNs.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        || name.starts_with('.')
    {
        invalid!(
            "name {} must be 1-64 characters of A-Z a-z 0-9 . _ - (not starting with .)",
            shown(name)
        );
    }
    Ok(())
}

/// The appliance other than `me` that owns the volume place `prefix` (its head record
/// names it), if any.
async fn owned_elsewhere(
    store: &dyn ox::store::ObjectStore,
    prefix: &str,
    me: &str,
) -> Result<Option<ox::bucket::Appliance>, ox::OxError> {
    Ok(ox::bucket::head(store, prefix)
        .await?
        .map(|h| h.owner)
        .filter(|o| o.id != me))
}

impl Service {
    /// Replaces the hosts' DH-HMAC-CHAP secrets used for exports made from now on
    /// (the target's live subsystems are updated by the caller).
    pub fn set_host_keys(&self, keys: Vec<nvmf::dhchap::HostKeys>) {
        *self
            .settings
            .host_keys
            .write()
            .unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// Opens the catalogue in the state directory and reopens every volume and clone
    /// in it (exports included). A clone whose store cannot be reached is listed as
    /// unavailable; the daemon runs on.
    pub fn start(
        settings: Settings,
        reactors: Vec<ReactorHandle>,
        cores: Arc<OxCores>,
        target: Arc<Target>,
        audit: Option<Arc<ox_api::audit::AuditLog>>,
        health_file: Option<Arc<HealthFile>>,
    ) -> anyhow::Result<Arc<Self>> {
        for sub in ["volumes", "clones"] {
            let d = settings.state_dir.join(sub);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("ox.state_dir: {}", d.display()))?;
        }
        let catalogue = Catalogue::load(&settings.state_dir)?;
        // A new appliance identity (first start, or a catalogue from before there was
        // one) is kept before anything is written under it.
        let on_disk =
            std::fs::read_to_string(Catalogue::path(&settings.state_dir)).unwrap_or_default();
        if !on_disk.contains(&catalogue.appliance) {
            catalogue.save(&settings.state_dir)?;
        }
        let service = Arc::new(Self {
            settings,
            reactors,
            cores,
            target,
            audit,
            health_file,
            stopping: AtomicBool::new(false),
            checks: Mutex::new(HashMap::new()),
            policies: policies::Policies::default(),
            appliance: bucket::appliance(&catalogue.appliance),
            inner: Mutex::new(Inner {
                catalogue: catalogue.clone(),
                volumes: HashMap::new(),
                clones: HashMap::new(),
                unavailable: HashMap::new(),
                jobs: HashMap::new(),
                next_job: 1,
                reserved: std::collections::HashSet::new(),
            }),
        });
        if let Some(h) = &service.health_file {
            let weak = Arc::downgrade(&service);
            h.track_clones(Box::new(move || weak.upgrade().map(|s| s.clone_totals())));
        }
        for v in &catalogue.volumes {
            let pending = catalogue.pending.iter().any(|p| p.volume == v.name);
            let live = match service.open_volume(v, Opening::Existing { pending }) {
                Ok(live) => live,
                Err(e) => {
                    // Never served: a damaged or missing file would read as zeroes.
                    tracing::error!(volume = %v.name, error = %ox_api::error_chain(&e), "unavailable");
                    service
                        .inner()
                        .unavailable
                        .insert(v.name.clone(), ox_api::error_chain(&e));
                    continue;
                }
            };
            let bdev = live.bdev.clone();
            service.inner().volumes.insert(v.name.clone(), live);
            if let Some(e) = &v.export
                && let Err(err) = service.export(&bdev, e)
            {
                tracing::error!(volume = %v.name, error = %ox_api::error_chain(&err), "not exported");
            }
        }
        for c in &catalogue.clones {
            match service.open_clone(c, false) {
                Ok(live) => {
                    let bdev = live.bdev.clone();
                    service.inner().clones.insert(c.name.clone(), live);
                    if let Some(e) = &c.export
                        && let Err(err) = service.export(&bdev, e)
                    {
                        tracing::error!(clone = %c.name, error = %ox_api::error_chain(&err), "not exported");
                    }
                    if c.thicken {
                        service.start_thickening(&c.name, c.paused);
                    }
                }
                Err(e) => {
                    tracing::error!(clone = %c.name, error = %ox_api::error_chain(&e), "unavailable");
                    service
                        .inner()
                        .unavailable
                        .insert(c.name.clone(), ox_api::error_chain(&e));
                }
            }
        }
        Ok(service)
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A volume's file under the state directory: `img` (its data), `cbt` (change
    /// tracking saved at a clean stop), `cbw` (copy-before-write copies of a running
    /// snapshot), `snapshot` (that snapshot's journal).
    fn volume_file(&self, name: &str, ext: &str) -> PathBuf {
        self.settings
            .state_dir
            .join("volumes")
            .join(format!("{name}.{ext}"))
    }

    fn volume_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "img")
    }

    fn tracking_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "cbt")
    }

    /// Where a clean stop keeps what hosts read since the volume's last snapshot (its
    /// next snapshot's working set), read back and removed at the next start.
    fn heat_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "heat")
    }

    fn preserve_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "cbw")
    }

    fn dirty_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "dirty")
    }

    fn journal_path(&self, name: &str) -> PathBuf {
        self.volume_file(name, "snapshot")
    }

    /// A clone's file under the state directory: `img` (its local copy), `presence`.
    fn clone_path(&self, name: &str, ext: &str) -> PathBuf {
        self.settings
            .state_dir
            .join("clones")
            .join(format!("{name}.{ext}"))
    }

    /// Opens the file backing a volume or clone: made now (`create`: created or grown
    /// to `size`), or made before and so required to be whole — a file cut short or
    /// missing would read zeroes where data was.
    fn open_file(
        &self,
        name: &str,
        path: &Path,
        size: u64,
        bs: u32,
        uuid: Uuid,
        create: bool,
    ) -> anyhow::Result<Bdev> {
        let mut c = UringConfig::new(name, path);
        c.block_size = Some(bs);
        if create {
            c.create_size = Some(size);
        } else {
            c.expect_size = Some(size);
        }
        c.uuid = Some(uuid);
        match bdev::open_uring(&c) {
            Ok(b) => Ok(b),
            Err(direct) => {
                // Some file systems (tmpfs) refuse O_DIRECT: fall back, and say so.
                c.direct = false;
                let b =
                    bdev::open_uring(&c).with_context(|| format!("opening {}", path.display()))?;
                tracing::warn!(
                    path = %path.display(),
                    error = %direct,
                    "O_DIRECT refused; using buffered I/O"
                );
                Ok(b)
            }
        }
    }

    /// Opens a volume's file with its change tracking: the tracking saved at the last
    /// clean stop (consumed, so a crash cannot reuse a stale one), else every chunk
    /// counts as changed (none for a volume created just now). If a snapshot of it is
    /// `pending` and its journal is whole, the volume takes that snapshot up again (its
    /// point in time) before any host can write.
    fn open_volume(&self, v: &VolumeRecord, how: Opening) -> anyhow::Result<LiveVolume> {
        let uuid: Uuid = v.uuid.parse().context("uuid")?;
        let create = matches!(how, Opening::New | Opening::Restored);
        let chunks = v.size_bytes.div_ceil(v.chunk_bytes);
        // A volume over a snapshot starts with no change since that snapshot.
        let (file, over, fresh) = match &v.basis {
            None => (
                self.volume_file_device(v, uuid, create)?,
                None,
                Tracking::Fresh,
            ),
            Some(b) => {
                let (dev, handle, base) = self.open_over(v, b, uuid, create)?;
                let none = bdev::ChangedChunks::none(chunks, Some(base));
                (dev, Some(handle), Tracking::Saved(none))
            }
        };
        let pending = how == Opening::Existing { pending: true };
        let cbt = self.tracking_path(&v.name);
        let tracking = if matches!(how, Opening::New | Opening::Seeded) {
            fresh
        } else {
            match std::fs::read(&cbt) {
                Ok(bytes) => {
                    std::fs::remove_file(&cbt)
                        .and_then(|()| std::fs::File::open(cbt.parent().unwrap_or(Path::new("."))))
                        .and_then(|d| d.sync_all())
                        .with_context(|| format!("consuming {}", cbt.display()))?;
                    bdev::ChangedChunks::from_bytes(&bytes, chunks)
                        .map_or(Tracking::AllChanged, Tracking::Saved)
                }
                Err(_) => Tracking::AllChanged,
            }
        };
        let saved_at_stop = matches!(tracking, Tracking::Saved(_));
        let (bdev, handle) =
            bdev::create_volume(&v.name, file, v.chunk_bytes, tracking, Some(uuid))?;
        handle.set_preserve_file(&self.preserve_path(&v.name))?;
        // What hosts read before a clean stop still counts for the next snapshot's
        // working set: this volume's only, not a deleted namesake's (a hint: one of
        // another size is dropped, bits beyond the last chunk cleared).
        let heat = self.heat_path(&v.name);
        if let (Opening::Existing { .. }, Ok(bytes)) = (how, std::fs::read(&heat))
            && bytes.len() as u64 == chunks.div_ceil(64) * 8
        {
            let mut words: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
                .collect();
            if let Some(last) = words.last_mut()
                && !chunks.is_multiple_of(64)
            {
                *last &= (1u64 << (chunks % 64)) - 1;
            }
            handle.restore_heat(&words);
        }
        let _ = bdev::fsutil::remove_file(&heat);
        // The crash-consistent record of what changed: made now for a new or restored
        // volume (a stale one of a deleted namesake goes first); after a crash (no
        // tracking saved at a clean stop) it is what the next snapshot stores.
        if how != (Opening::Existing { pending }) {
            bdev::remove_dirty_record(&self.dirty_path(&v.name));
        }
        let path = self.dirty_path(&v.name);
        match handle.keep_dirty_record(&path) {
            Ok(Some(record)) if !saved_at_stop => {
                tracing::info!(
                    volume = %v.name,
                    chunks = record.count(),
                    "changed since its last snapshot, from its change record"
                );
                handle.replace_changes(&record);
            }
            Ok(_) => {}
            Err(e) => {
                // Only the next snapshot's cost depends on it: every chunk counts as
                // changed, and a new record starts from that.
                tracing::warn!(
                    volume = %v.name,
                    path = %path.display(),
                    error = %e,
                    "change record unreadable: the next snapshot reads the whole volume"
                );
                let mut all = handle.changes();
                all.mark_all();
                all.base = None;
                handle.replace_changes(&all);
                bdev::remove_dirty_record(&path);
                if let Err(e) = handle.keep_dirty_record(&path) {
                    tracing::warn!(
                        volume = %v.name,
                        error = %e,
                        "no change record: after a crash its next snapshot reads it whole"
                    );
                }
            }
        }
        let journal = self.journal_path(&v.name);
        let resumed = match ox::journal::Journal::load(&journal, chunks) {
            Ok(None) => None,
            Ok(Some((j, changed))) if pending => Some(
                j.token()
                    .map_err(anyhow::Error::from)
                    .and_then(|t| {
                        let on = &self.reactors[0];
                        Ok(handle.resume_snapshot(t, j.next_chunk, &changed, on)?)
                    })
                    .map(|copies| (j.next_chunk, copies))
                    .map_err(|e| (e, changed)),
            ),
            Ok(Some((_, changed))) => Some(Err((
                anyhow::anyhow!("no snapshot of it is pending"),
                changed,
            ))),
            Err(e) => Some(Err((
                e.into(),
                ox::journal::changes_or_all(&journal, &handle),
            ))),
        };
        match resumed {
            None => {}
            Some(Ok((at, copies))) => tracing::info!(
                volume = %v.name,
                at,
                chunks,
                copies,
                "its snapshot continues (copies: chunks kept by copy-before-write)"
            ),
            Some(Err((e, changed))) => {
                if pending {
                    tracing::warn!(
                        volume = %v.name,
                        error = %ox_api::error_chain(&e),
                        "its pending snapshot starts over"
                    );
                }
                // The journal goes first, durably: with it still there and the copies
                // dropped, a crash would take the snapshot up again without them.
                ox::journal::remove(&journal)
                    .with_context(|| format!("removing {}", journal.display()))?;
                // The chunks that snapshot was to store go back to the tracking, so
                // the next snapshot does not miss them.
                handle.add_changes(&changed);
                handle.discard_copies();
            }
        }
        Ok(LiveVolume {
            bdev,
            handle,
            over,
            busy: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The block device of volume `v`'s file (its data, or over a snapshot what it
    /// wrote or fetched).
    fn volume_file_device(
        &self,
        v: &VolumeRecord,
        uuid: Uuid,
        create: bool,
    ) -> anyhow::Result<Bdev> {
        self.open_file(
            &format!("{}-file", v.name),
            &self.volume_path(&v.name),
            v.size_bytes,
            v.block_size,
            uuid,
            create,
        )
    }

    /// The device of a volume over snapshot `b`: its local file holds what the volume
    /// wrote or fetched (its presence record says which chunks), the rest is read from
    /// the snapshot as hosts ask. Also the snapshot's ID, the volume's first change
    /// base.
    fn open_over(
        &self,
        v: &VolumeRecord,
        b: &crate::catalogue::BasisRecord,
        uuid: Uuid,
        create: bool,
    ) -> anyhow::Result<(Bdev, CloneHandle, [u8; 16])> {
        let loaded = self.load(&b.store, &b.manifest_key)?;
        let base = loaded.manifest.binding()?.snapshot;
        let local = self.volume_file_device(v, uuid, create)?;
        let (dev, handle, _) = self.over_snapshot(
            &format!("{}-over", v.name),
            &v.name,
            local,
            loaded,
            &b.store,
            None,
            &self.volume_file(&v.name, "presence"),
        )?;
        Ok((dev, handle, base))
    }

    /// A device over snapshot `loaded` in `store`: what `local` lacks (its presence
    /// record at `presence` says which chunks it has) read from the snapshot as hosts
    /// ask, under the bandwidth policy as `throttled`. A clone's, or a volume's over a
    /// snapshot.
    #[allow(clippy::too_many_arguments)]
    fn over_snapshot(
        &self,
        name: &str,
        throttled: &str,
        local: Bdev,
        loaded: Loaded,
        store: &str,
        uuid: Option<Uuid>,
        presence: &Path,
    ) -> anyhow::Result<(Bdev, CloneHandle, ObjectBasis)> {
        let basis = ObjectBasis::new(
            loaded,
            self.store(store)?.factory(),
            Arc::clone(&self.cores),
            self.settings.throttle.clone(),
            throttled,
        );
        let (dev, handle) = bdev::open_clone(
            name,
            local,
            Arc::new(basis.clone()) as Arc<dyn Basis>,
            uuid,
            presence,
            self.reactors[0].clone(),
        )?;
        // Where hosts read first, a first miss then costs one GET, not two (index page,
        // then frame); a clone with every chunk here needs no page.
        let (present, total) = handle.hydration();
        if present < total {
            drop(basis.prefetch_index());
        }
        Ok((dev, handle, basis))
    }

    fn store(&self, name: &str) -> anyhow::Result<&StoreSpec> {
        self.settings
            .stores
            .get(name)
            .ok_or_else(|| Refusal::NotFound(format!("no store named {}", shown(name))).into())
    }

    /// Loads a snapshot's manifest (and unwraps its key) on an OX core.
    fn load(&self, store: &str, manifest_key: &str) -> anyhow::Result<Loaded> {
        let spec = self.store(store)?.clone();
        let (key, keks) = (manifest_key.to_string(), self.settings.keys.clone());
        let loaded = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                ox::snapshot::load(&*store, &key, &keks).await
            })
        })?;
        let kek = loaded
            .as_ref()
            .ok()
            .and_then(|l| l.manifest.key.as_ref())
            .map(|k| k.kek_id.clone());
        let outcome = match &loaded {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        // Only loads that involve a key (or fail) are key use worth recording.
        if kek.is_some() || loaded.is_err() {
            self.audit_key_use("unwrap", kek.as_deref(), manifest_key, &outcome);
        }
        loaded.with_context(|| format!("loading snapshot {manifest_key}"))
    }

    /// Records a use of a key-encryption key in the audit log (never the key).
    fn audit_key_use(&self, purpose: &str, kek: Option<&str>, snapshot: &str, result: &str) {
        if let Some(a) = &self.audit {
            let detail = json!({ "purpose": purpose, "key": kek, "snapshot": snapshot });
            if let Err(e) = a.record("oxd", "key_use", detail, result) {
                tracing::error!("audit log: {e}");
            }
        }
    }

    /// Opens a clone: `create`d now, or reopened (its local copy must then be whole).
    fn open_clone(&self, c: &CloneRecord, create: bool) -> anyhow::Result<LiveClone> {
        self.set_thicken_rate(&c.name, c.thicken_mib_s);
        let loaded = self.load(&c.store, &c.manifest_key)?;
        let size = loaded.manifest.volume_bytes;
        let uuid: Uuid = c.uuid.parse().context("uuid")?;
        let local = self.open_file(
            &format!("{}-local", c.name),
            &self.clone_path(&c.name, "img"),
            size,
            loaded.manifest.block_size,
            uuid,
            create,
        )?;
        let (bdev, handle, basis) = self.over_snapshot(
            &c.name,
            &c.name,
            local,
            loaded,
            &c.store,
            Some(uuid),
            &self.clone_path(&c.name, "presence"),
        )?;
        let warming = self.start_warming(&c.name, &handle, &basis, c.paused);
        let base = self
            .health_file
            .as_ref()
            .map(|h| h.clone_base(&c.uuid))
            .unwrap_or_default();
        Ok(LiveClone {
            bdev,
            handle,
            basis,
            thickening: None,
            warming,
            base,
        })
    }

    fn export(&self, bdev: &Bdev, e: &ExportRecord) -> anyhow::Result<Vec<SocketAddr>> {
        if self.settings.export_listeners.is_empty() {
            invalid!(
                "ox.export_listeners is empty: nowhere to export {}",
                shown(&e.nqn)
            );
        }
        let serial: String = bdev
            .info()
            .uuid
            .simple()
            .to_string()
            .chars()
            .take(20)
            .collect();
        let hosts = crate::config::host_policy(e.allow_any_host, &e.hosts);
        let host_keys = {
            let secrets = self
                .settings
                .host_keys
                .read()
                .unwrap_or_else(|p| p.into_inner());
            crate::config::warn_if_open(&e.nqn, &hosts, &secrets);
            crate::config::keys_for(&hosts, &secrets)
        };
        let sub = Subsystem {
            nqn: e.nqn.clone(),
            serial,
            model: "OX volume".into(),
            host_keys,
            hosts,
            namespaces: vec![Namespace::new(1, bdev.clone())],
            listeners: self.settings.export_listeners.clone(),
        };
        let listeners = self.target.add_subsystem(sub)?;
        let at: Vec<String> = listeners.iter().map(ToString::to_string).collect();
        tracing::info!(device = %bdev.name(), subsystem = %e.nqn, on = %at.join(" "), "exported");
        Ok(listeners)
    }

    fn save(&self, inner: &Inner) -> anyhow::Result<()> {
        inner.catalogue.save(&self.settings.state_dir)
    }

    /// The last steps of a create, once `name`'s entry is in the catalogue: save the
    /// catalogue, then export the device if asked. On error the entry is taken out
    /// again (and that saved), so nothing of a failed create stays on record; the
    /// caller removes its files.
    fn commit_create(
        &self,
        inner: &mut Inner,
        name: &str,
        bdev: &Bdev,
        export: Option<&ExportRecord>,
    ) -> anyhow::Result<Vec<SocketAddr>> {
        let done = self.save(inner).and_then(|()| match export {
            Some(e) => self.export(bdev, e),
            None => Ok(Vec::new()),
        });
        if done.is_err() {
            inner.catalogue.volumes.retain(|v| v.name != name);
            inner.catalogue.clones.retain(|c| c.name != name);
            let _ = self.save(inner);
        }
        done
    }

    /// Creates a volume of `size_bytes` (a file under the state directory), exported
    /// if `export` is given.
    pub fn volume_create(
        &self,
        name: &str,
        size_bytes: u64,
        block_size: u32,
        export: Option<ExportRecord>,
    ) -> anyhow::Result<api::VolumeCreated> {
        check_name(name)?;
        if !matches!(block_size, 512 | 4096) {
            invalid!("block_size {block_size} must be 512 or 4096");
        }
        let chunk = self.settings.chunk_bytes;
        if size_bytes == 0 || !size_bytes.is_multiple_of(chunk.max(u64::from(block_size))) {
            invalid!("size {size_bytes} must be a positive multiple of the {chunk}-byte chunk");
        }
        let mut inner = self.inner();
        if inner.taken(name) {
            conflict!("a volume or clone named {} exists already", shown(name));
        }
        if let Some(e) = &export {
            self.check_export(&inner, e)?;
        }
        let record = VolumeRecord {
            name: name.into(),
            uuid: Uuid::new_v4().to_string(),
            size_bytes,
            block_size,
            chunk_bytes: chunk,
            export: export.clone(),
            basis: None,
        };
        let path = self.volume_path(name);
        if path.exists() {
            conflict!(
                "{} exists already (left over from a failed create? remove it)",
                path.display()
            );
        }
        let live = match self.open_volume(&record, Opening::New) {
            Ok(l) => l,
            Err(e) => {
                self.remove_volume_files(name);
                return Err(e);
            }
        };
        inner.catalogue.volumes.push(record);
        let listeners = match self.commit_create(&mut inner, name, &live.bdev, export.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                drop(live);
                self.remove_volume_files(name);
                return Err(e);
            }
        };
        inner.volumes.insert(name.into(), live);
        Ok(api::VolumeCreated {
            name: name.to_string(),
            listeners: listeners.iter().map(ToString::to_string).collect(),
            store: None,
            manifest_key: None,
            seeded: None,
        })
    }

    /// Holds `name` for a create that runs partly without the lock, after checking it
    /// and the export are free.
    fn reserve(
        self: &Arc<Self>,
        name: &str,
        export: Option<&ExportRecord>,
    ) -> anyhow::Result<Reservation> {
        let mut inner = self.inner();
        if inner.taken(name) {
            conflict!(
                "a volume or clone named {} exists already (or is being created)",
                shown(name)
            );
        }
        if let Some(e) = export {
            self.check_export(&inner, e)?;
        }
        inner.reserved.insert(name.to_string());
        Ok(Reservation {
            service: Arc::clone(self),
            name: name.to_string(),
        })
    }

    fn check_export(&self, inner: &Inner, e: &ExportRecord) -> anyhow::Result<()> {
        if self.settings.export_listeners.is_empty() {
            invalid!(
                "ox.export_listeners is empty: nowhere to export {}",
                shown(&e.nqn)
            );
        }
        nvmf::check_nqn(&e.nqn)?;
        if inner.catalogue.exported_nqns().any(|n| n == e.nqn)
            || !self.target.listeners_of(&e.nqn).is_empty()
        {
            conflict!("NQN {} is exported already", shown(&e.nqn));
        }
        if !e.allow_any_host && e.hosts.is_empty() {
            invalid!("an export needs hosts or allow_any_host");
        }
        Ok(())
    }

    /// Deletes a volume (its file and change tracking; its snapshots stay in the
    /// store and in the catalogue).
    pub fn volume_delete(&self, name: &str) -> anyhow::Result<api::Deleted> {
        let mut inner = self.inner();
        let Some(pos) = inner.catalogue.volumes.iter().position(|v| v.name == name) else {
            not_found!("no volume named {}", shown(name));
        };
        if inner
            .volumes
            .get(name)
            .is_some_and(|v| v.busy.load(Ordering::SeqCst))
        {
            conflict!("volume {} is being snapshotted", shown(name));
        }
        let record = inner.catalogue.volumes.remove(pos);
        inner.catalogue.pending.retain(|p| p.volume != name);
        self.save(&inner)?;
        if let Some(e) = &record.export {
            let _ = self.target.remove_subsystem(&e.nqn);
        }
        let live = inner.volumes.remove(name);
        inner.unavailable.remove(name);
        // Its snapshots stay, and build on the snapshot it began as: that one stays
        // held while any of them is catalogued here.
        let snapshots_left = inner.catalogue.snapshots.iter().any(|s| s.volume == name);
        drop(inner);
        // Nothing may be written to its presence record once its files are gone.
        if let Some(h) = live.as_ref().and_then(|l| l.over.as_ref())
            && let Err(e) = h.retire()
        {
            tracing::warn!(volume = %name, error = %e, "stopping its presence journal");
        }
        drop(live);
        self.remove_volume_files(name);
        self.target.health().forget(name);
        self.settings.throttle.forget(name);
        // Last: a hold left behind keeps a snapshot longer, never loses one.
        if let Some(b) = &record.basis
            && !snapshots_left
            && let Err(e) = self.hold_on(&b.store, &b.manifest_key, &record.uuid, name, false)
        {
            tracing::warn!(volume = %name, error = %ox_api::error_chain(&e), "its hold on the snapshot it began as stays");
        }
        Ok(api::Deleted {
            name: name.to_string(),
        })
    }

    /// Removes every file of volume `name` (deleted, or never fully created).
    fn remove_volume_files(&self, name: &str) {
        bdev::remove_dirty_record(&self.dirty_path(name));
        let _ = std::fs::remove_file(self.volume_path(name));
        let _ = std::fs::remove_file(self.tracking_path(name));
        let _ = std::fs::remove_file(self.heat_path(name));
        let _ = std::fs::remove_file(self.preserve_path(name));
        let _ = ox::journal::remove(&self.journal_path(name));
        for ext in ["presence", "presence.log"] {
            let _ = std::fs::remove_file(self.volume_file(name, ext));
        }
    }

    /// Volumes and clones, with sizes, exports and counters.
    pub fn volume_list(&self) -> api::Volumes {
        let inner = self.inner();
        let volumes = inner
            .catalogue
            .volumes
            .iter()
            .map(|v| {
                let stats = inner.volumes.get(&v.name).map(|l| l.bdev.stats());
                let moved = |t| stats.as_ref().map_or(0, |s| s.bytes(t));
                api::VolumeInfo {
                    name: v.name.clone(),
                    kind: "volume".into(),
                    size_bytes: v.size_bytes,
                    block_size: v.block_size,
                    chunk_bytes: v.chunk_bytes,
                    uuid: v.uuid.clone(),
                    export: v.export.as_ref().map(export_info),
                    snapshots: inner
                        .catalogue
                        .snapshots
                        .iter()
                        .filter(|s| s.volume == v.name)
                        .count() as u64,
                    read_bytes: moved(bdev::IoType::Read),
                    write_bytes: moved(bdev::IoType::Write),
                    unavailable: inner.unavailable.get(&v.name).cloned(),
                }
            })
            .collect();
        let clones = inner
            .catalogue
            .clones
            .iter()
            .map(|c| clone_info(c, inner.clones.get(&c.name), inner.unavailable.get(&c.name)))
            .collect();
        api::Volumes { volumes, clones }
    }

    /// Starts a snapshot of `volume` into `store` (incremental over the volume's last
    /// snapshot in that store; `full`: over none, every chunk read and stored), read
    /// back before publishing if `verify` says so (or, if it says nothing, the store's
    /// `verify_before_publish`); returns the job.
    pub fn snapshot_create(
        self: &Arc<Self>,
        volume: &str,
        store: &str,
        key: Option<&str>,
        verify: Option<bool>,
        full: bool,
    ) -> anyhow::Result<api::Job> {
        let spec = self.store(store)?.clone();
        let kek = match key {
            Some(k) => self
                .settings
                .keys
                .iter()
                .find(|x| x.id == k)
                .ok_or_else(|| Refusal::NotFound(format!("no key named {}", shown(k))))?,
            None => self.settings.keys.first().ok_or_else(|| {
                Refusal::Invalid("no [[key]] is configured: snapshots are encrypted at rest".into())
            })?,
        }
        .clone();
        let me = self.me();
        if self.stopping.load(Ordering::SeqCst) {
            conflict!(
                "oxd is stopping: no snapshot of {} begins now",
                shown(volume)
            );
        }
        let (handle, busy, volume_record, parent, backlog, pending_here) = {
            let inner = self.inner();
            let live = inner.volume(volume)?;
            let volume_record = inner
                .catalogue
                .volumes
                .iter()
                .find(|v| v.name == volume)
                .cloned()
                .ok_or_else(|| Refusal::NotFound(format!("no volume named {}", shown(volume))))?;
            if live.busy.swap(true, Ordering::SeqCst) {
                conflict!("volume {} is being snapshotted already", shown(volume));
            }
            let mine = || {
                inner
                    .catalogue
                    .snapshots
                    .iter()
                    .filter(|s| s.volume == volume && s.store == store)
            };
            // Incremental over its own newest snapshot in this store; a volume over a
            // snapshot, before it has one, over the snapshot it began as (its lineage
            // then continues that volume's, whichever appliance took it). A full one
            // over none: the volume's change set then names every chunk, as it does
            // for any snapshot over another parent than the last one's.
            let parent = mine()
                .next_back()
                .filter(|_| !full)
                .map(|s| s.manifest_key.clone())
                .or_else(|| {
                    volume_record
                        .basis
                        .as_ref()
                        .filter(|b| b.store == store && !full)
                        .map(|b| b.manifest_key.clone())
                });
            // Snapshots the bucket's catalogue is still owed (its write failed, or they
            // predate it): written before this one.
            let backlog: Vec<_> = mine()
                .filter(|s| !s.listed)
                .map(|s| bucket::entry_of(s, &volume_record, &me, s.created * 1000, None))
                .collect();
            (
                live.handle.clone(),
                Arc::clone(&live.busy),
                volume_record,
                parent,
                backlog,
                inner.catalogue.pending.iter().any(|p| p.volume == volume),
            )
        };
        // A snapshot an earlier one left held (its journal could not be removed then; it
        // is no longer pending) is given up now, journal first; while it cannot be, no
        // other begins. (One pending is the next start's to continue.)
        if handle.snapshot_token().is_some() && !handle.resumed_waiting() && !pending_here {
            let journal = self.journal_path(volume);
            if let Err(e) = ox::snapshot::give_up_held(&handle, &journal) {
                busy.store(false, Ordering::SeqCst);
                conflict!(
                    "an earlier snapshot of volume {} is still held, and could not be given \
                     up now: {e}",
                    shown(volume)
                );
            }
        }
        let uuid = volume_record.uuid.clone();
        let head = self.head_of(&volume_record);
        let progress = Arc::new(SnapshotProgress::default());
        let retried = self.store(store).ok().cloned();
        let job = self.new_job(
            "snapshot",
            volume,
            Some(Arc::clone(&progress)),
            None,
            retried.as_ref(),
        );
        // What hosts read since the last snapshot: its clones fetch that first. Given
        // back if this snapshot does not publish.
        let heat = handle.take_heat();
        let opts = SnapshotOptions {
            prefix: snapshot_prefix(volume, &uuid),
            zstd_level: self.settings.zstd_level,
            kek: Some(kek),
            object_bytes: self.settings.object_bytes,
            volume_id: *Uuid::parse_str(&uuid).unwrap_or_default().as_bytes(),
            volume_name: volume.into(),
            progress,
            outage_patience: Duration::from_secs(600),
            journal: Some(self.journal_path(volume)),
            store_name: store.to_string(),
            checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
            verify_before_publish: verify
                .unwrap_or_else(|| self.settings.verify_before_publish.contains(store)),
            working_set: Some(heat.clone()),
            // Published only while this appliance still owns the volume's place.
            owner: Some(self.me().id),
            clock: Default::default(),
            encode_on: self.cores.set(),
        };
        // On record until it ends, so a snapshot cut short by a stop or a crash is
        // started again at the next start.
        let pending = PendingSnapshot {
            volume: volume.to_string(),
            store: store.to_string(),
            key: key.map(String::from),
            verify,
            full,
        };
        {
            let mut inner = self.inner();
            inner.catalogue.pending.retain(|p| p.volume != volume);
            inner.catalogue.pending.push(pending);
            if let Err(e) = self.save(&inner) {
                handle.restore_heat(&heat);
                busy.store(false, Ordering::SeqCst);
                job.outcome
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(Err(ox_api::error_chain(&e)));
                return Err(e);
            }
        }
        let busy_after_spawn_failure = Arc::clone(&busy);
        let volume_handle = handle.clone();
        let heat_after_spawn_failure = (handle.clone(), heat.clone());
        let (service, job2, volume, store) = (
            Arc::clone(self),
            Arc::clone(&job),
            volume.to_string(),
            store.to_string(),
        );
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let on = service.reactors[0].clone();
                let (keks, throttle) = (
                    service.settings.keys.clone(),
                    service.settings.throttle.clone(),
                );
                let parent_key = parent;
                let me = service.me();
                let (snapshot_of, store_name) = (volume.clone(), store.clone());
                let result = service.cores.run(move |ex| {
                    Box::pin(async move {
                        let store = spec.open(&ex)?;
                        // The volume's place in the store is this appliance's, or the
                        // snapshot is not taken at all.
                        let prefix = opts.prefix.clone();
                        ox::snapshot::patiently(&opts, async || {
                            ox::bucket::claim(&*store, &prefix, &head).await
                        })
                        .await?;
                        let mut caught_up = Vec::new();
                        for entry in &backlog {
                            match ox::bucket::record(&*store, &prefix, entry).await {
                                Ok(()) => caught_up.push(entry.snapshot.clone()),
                                Err(e) => tracing::warn!(
                                    volume = %entry.name,
                                    snapshot = %entry.snapshot,
                                    error = %e,
                                    "not in the store's catalogue yet"
                                ),
                            }
                        }
                        let parent = match &parent_key {
                            Some(k) => Some(ox::snapshot::load(&*store, k, &keks).await?),
                            None => None,
                        };
                        let report = ox::snapshot::snapshot_volume(
                            &*store,
                            &on,
                            &handle,
                            parent.as_ref(),
                            &opts,
                            &throttle,
                        )
                        .await?;
                        let created_ms = now_ms();
                        let mut record = SnapshotRecord {
                            id: report.manifest.snapshot.clone(),
                            volume: snapshot_of,
                            store: store_name,
                            manifest_key: report.manifest_key.clone(),
                            parent: parent.map(|p| p.manifest.snapshot),
                            created: created_ms / 1000,
                            data_bytes: report.data_bytes,
                            meta_bytes: report.meta_bytes,
                            chunks_read: report.chunks_read,
                            listed: false,
                            // At least 1 when known; 0: not known (found published by
                            // an earlier attempt).
                            duration_ms: report
                                .elapsed
                                .map_or(0, |e| e.as_millis().max(1) as u64),
                        };
                        // Published: a failure to list it in the bucket does not undo
                        // that; the entry is written again at the next snapshot.
                        let kek = report.manifest.key.as_ref().map(|k| k.kek_id.clone());
                        let entry = bucket::entry_of(&record, &volume_record, &me, created_ms, kek);
                        let listed = ox::snapshot::patiently(&opts, async || {
                            ox::bucket::record(&*store, &prefix, &entry).await
                        })
                        .await;
                        record.listed = listed.is_ok();
                        Ok::<_, ox::OxError>((report, record, listed.err(), caught_up))
                    })
                });
                let outcome = match result {
                    Ok(Ok((report, record, unlisted, caught_up))) => {
                        let kek = report.manifest.key.as_ref().map(|k| k.kek_id.clone());
                        service.audit_key_use("wrap", kek.as_deref(), &report.manifest_key, "ok");
                        let mut inner = service.inner();
                        for s in inner.catalogue.snapshots.iter_mut() {
                            if caught_up.contains(&s.id) {
                                s.listed = true;
                            }
                        }
                        inner.catalogue.snapshots.push(record.clone());
                        inner.catalogue.pending.retain(|p| p.volume != volume);
                        // The snapshot as `snapshot_list` shows it (what clients read
                        // it as), with what this attempt did besides.
                        let mut result =
                            serde_json::to_value(snapshot_info(&record)).unwrap_or_default();
                        if let Some(e) = &unlisted {
                            tracing::warn!(
                                volume = %volume,
                                snapshot = %record.id,
                                error = %e,
                                "published but not yet in the store's catalogue"
                            );
                            result["unlisted"] = e.to_string().into();
                        }
                        result["resumed_at"] = json!(report.resumed_at);
                        if let Some(r) = &report.read_back {
                            result["read_back"] = json!({
                                "gets": r.gets, "bytes": r.bytes, "frames": r.frames,
                                "refetches": r.refetches,
                            });
                        }
                        match service.save(&inner) {
                            Ok(()) => {
                                drop(inner);
                                // Catalogued: the journal is spent (a crash before this
                                // finds the manifest published and adopts it).
                                let journal = service.journal_path(&volume);
                                if let Err(e) = ox::journal::remove(&journal) {
                                    tracing::warn!(path = %journal.display(), error = %e, "snapshot journal");
                                }
                                // The change record drops what this snapshot stored
                                // (still busy: no other snapshot can begin meanwhile).
                                // If it cannot, it stays a superset: the next snapshot
                                // reads more, never less.
                                if let Err(e) = volume_handle.compact_dirty_record() {
                                    tracing::warn!(volume = %volume, error = %e, "change record");
                                }
                                Ok(result)
                            }
                            Err(e) => Err(format!(
                                "snapshot published as {} but not catalogued: {e:#}",
                                record.manifest_key
                            )),
                        }
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if outcome.is_err() {
                    volume_handle.restore_heat(&heat);
                }
                // A failure of its own (not the daemon stopping) ends the request, and
                // so does a cancel, whenever it came: a cancelled snapshot is never
                // continued. (A snapshot held because its journal could not be removed
                // is not pending then: the volume's next snapshot, or the next start,
                // gives it up.)
                let cancelled = job2
                    .progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_some_and(|p| p.is_cancelled());
                if outcome.is_err() && (!service.stopping.load(Ordering::SeqCst) || cancelled) {
                    service.release_resumed(&volume, &volume_handle);
                    let mut inner = service.inner();
                    inner.catalogue.pending.retain(|p| p.volume != volume);
                    if let Err(e) = service.save(&inner) {
                        tracing::error!(error = %ox_api::error_chain(&e), "saving the catalogue");
                    }
                }
                // Released last, once the catalogue says how it ended: a clean stop waits
                // on this, and a new snapshot must see the outcome.
                busy.store(false, Ordering::SeqCst);
                *job2.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                // A policy may be waiting for this volume, or for this job.
                service.wake_policies();
            });
        if let Err(e) = spawned {
            let (h, heat) = heat_after_spawn_failure;
            h.restore_heat(&heat);
            let mut inner = self.inner();
            inner.catalogue.pending.retain(|p| p.volume != job.target);
            let _ = self.save(&inner);
            drop(inner);
            busy_after_spawn_failure.store(false, Ordering::SeqCst);
            job.outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(Err(e.to_string()));
        }
        Ok(job.info())
    }

    /// Ends a snapshot `handle` took up again at the start that will not continue
    /// after all (its job failed before reaching it): its changes go back to the
    /// tracking, its journal is removed, and the volume stops copying.
    fn release_resumed(&self, volume: &str, handle: &VolumeHandle) {
        if handle.take_resumed().is_none() {
            return;
        }
        let journal = self.journal_path(volume);
        // Its upload lease goes with it, in the background (the store may be slow or
        // down; a lease left behind only keeps collection from the place for a day).
        if let Ok(Some((j, _))) = ox::journal::Journal::load(&journal, handle.chunks())
            && let Ok(spec) = self.store(&j.store).cloned()
        {
            let cores = Arc::clone(&self.cores);
            let _ = std::thread::Builder::new()
                .name("lease-release".into())
                .spawn(move || {
                    let released = cores.run(move |ex| {
                        Box::pin(async move {
                            let store = spec.open(&ex)?;
                            ox::lease::release(&*store, &j.prefix, &j.snapshot).await
                        })
                    });
                    if let Err(e) = released.map_err(anyhow::Error::from).and_then(|r| Ok(r?)) {
                        tracing::warn!(error = %e, "an upload lease given up with its snapshot stays");
                    }
                });
        }
        // The journal first, durably, then the end: ended first, a crash between the
        // two would take the snapshot up again with its copies dropped. Not removed,
        // it is not ended: it stays held, copies and all, until the volume's next
        // snapshot or the next start gives it up.
        if let Err(e) = ox::snapshot::give_up_held(handle, &journal) {
            tracing::error!(volume, path = %journal.display(), "{e}");
        }
    }

    fn new_job(
        &self,
        kind: &str,
        target: &str,
        progress: Option<Arc<SnapshotProgress>>,
        pass: Option<Arc<ox::hydrate::Pass>>,
        store: Option<&StoreSpec>,
    ) -> Arc<Job> {
        let retries = match store {
            Some(StoreSpec::S3(c)) => {
                let began = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Some((Arc::clone(&c.retry_log), c.retry_log.count(), began))
            }
            _ => None,
        };
        let mut inner = self.inner();
        let id = inner.next_job;
        inner.next_job += 1;
        let job = Arc::new(Job {
            id,
            kind: kind.into(),
            target: target.into(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            progress: Mutex::new(progress),
            pass,
            retries,
            outcome: Mutex::new(None),
        });
        inner.jobs.insert(id, Arc::clone(&job));
        // Bounded: the oldest finished jobs go first (a policy every second makes many).
        if inner.jobs.len() > MAX_JOBS {
            let mut finished: Vec<u64> = inner
                .jobs
                .iter()
                .filter(|(_, j)| {
                    j.outcome
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some()
                })
                .map(|(id, _)| *id)
                .collect();
            finished.sort_unstable();
            let excess = inner.jobs.len() - MAX_JOBS;
            for old in finished.into_iter().take(excess) {
                inner.jobs.remove(&old);
            }
        }
        job
    }

    fn job(&self, id: u64) -> anyhow::Result<Arc<Job>> {
        self.inner()
            .jobs
            .get(&id)
            .cloned()
            .ok_or_else(|| Refusal::NotFound(format!("no job {id}")).into())
    }

    /// A job's state.
    pub fn job_get(&self, id: u64) -> anyhow::Result<api::Job> {
        Ok(self.job(id)?.info())
    }

    /// Every job since start, oldest first.
    pub fn job_list(&self) -> Vec<api::Job> {
        let jobs: Vec<Arc<Job>> = self.inner().jobs.values().cloned().collect();
        let mut list: Vec<api::Job> = jobs.iter().map(|j| j.info()).collect();
        list.sort_by_key(|j| j.id);
        list
    }

    /// Asks a running job to stop.
    pub fn job_cancel(&self, id: u64) -> anyhow::Result<api::Job> {
        let job = self.job(id)?;
        let progress = job
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match (progress, &job.pass) {
            (Some(p), _) => p.cancel(),
            (None, Some(pass)) => {
                // Too late once a restore publishes its volume: answered as it is.
                let _took = pass.cancel();
            }
            // (Every job has one or the other.)
            (None, None) => invalid!("job {id} ({}) cannot be cancelled", job.kind),
        }
        Ok(job.info())
    }

    /// Snapshots in the catalogue, optionally of one volume.
    pub fn snapshot_list(&self, volume: Option<&str>) -> Vec<api::Snapshot> {
        self.inner()
            .catalogue
            .snapshots
            .iter()
            .filter(|s| volume.is_none_or(|v| v == s.volume))
            .map(snapshot_info)
            .collect()
    }

    fn snapshot(&self, id: &str) -> anyhow::Result<SnapshotRecord> {
        let inner = self.inner();
        let matches: Vec<&SnapshotRecord> = inner
            .catalogue
            .snapshots
            .iter()
            .filter(|s| s.id.starts_with(id))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => not_found!("no snapshot {}", shown(id)),
            _ => invalid!(
                "{} matches {} snapshots; give more of the ID",
                shown(id),
                matches.len()
            ),
        }
    }

    /// Clones snapshot `snapshot` (an ID or unique prefix from `snapshot_list`, or a
    /// manifest key in `store`) as `name`: readable and writable at once.
    pub fn clone_create(
        self: &Arc<Self>,
        name: &str,
        source: CloneSource<'_>,
        thicken: bool,
        export: Option<ExportRecord>,
    ) -> anyhow::Result<api::Created> {
        check_name(name)?;
        let (store, manifest_key) = self.resolve(source)?;
        let _reservation = self.reserve(name, export.as_ref())?;
        for ext in ["img", "presence", "presence.log"] {
            let p = self.clone_path(name, ext);
            if p.exists() {
                conflict!(
                    "{} exists already (left over from a failed create? remove it)",
                    p.display()
                );
            }
        }
        let record = CloneRecord {
            name: name.into(),
            uuid: Uuid::new_v4().to_string(),
            store,
            manifest_key,
            thicken,
            paused: false,
            thicken_mib_s: None,
            export: export.clone(),
        };
        let remove_files = || {
            for ext in ["img", "presence", "presence.log"] {
                let _ = std::fs::remove_file(self.clone_path(name, ext));
            }
        };
        let live = match self
            .open_clone(&record, true)
            .and_then(|l| self.hold(&record, true).map(|()| l))
        {
            Ok(l) => l,
            Err(e) => {
                remove_files();
                return Err(e);
            }
        };
        // Undoes the create after the hold was placed (without the service's lock,
        // which the hold's removal takes).
        let held = record.clone();
        let undo = || {
            remove_files();
            if let Err(e) = self.hold(&held, false) {
                tracing::warn!(clone = %name, error = %ox_api::error_chain(&e), "its hold on the snapshot stays");
            }
        };
        let mut inner = self.inner();
        if let Some(e) = &export
            && let Err(err) = self.check_export(&inner, e)
        {
            drop(inner);
            drop(live);
            undo();
            return Err(err);
        }
        inner.catalogue.clones.push(record);
        let listeners = match self.commit_create(&mut inner, name, &live.bdev, export.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                drop(inner);
                drop(live);
                undo();
                return Err(e);
            }
        };
        inner.clones.insert(name.into(), live);
        drop(inner);
        if thicken {
            self.start_thickening(name, false);
        }
        Ok(api::Created {
            name: name.to_string(),
            listeners: listeners.iter().map(ToString::to_string).collect(),
        })
    }

    /// The store and manifest key a clone or volume is to begin from.
    fn resolve(&self, source: CloneSource<'_>) -> anyhow::Result<(String, String)> {
        Ok(match source {
            CloneSource::Catalogued(id) => {
                let s = self.snapshot(id)?;
                (s.store, s.manifest_key)
            }
            CloneSource::Manifest { store, key } => (store.to_string(), key.to_string()),
            CloneSource::Bucket {
                store,
                volume,
                which,
            } => (
                store.to_string(),
                self.find_in_bucket(store, volume, which)?,
            ),
        })
    }

    /// Creates volume `name` over a snapshot: readable and writable at once (what it
    /// lacks is read from the snapshot as hosts ask), and snapshotted like any volume —
    /// its first snapshot incremental over the one it began as, into that snapshot's
    /// store, so only what it changed is stored. It holds that snapshot.
    ///
    /// With `seed` (fail-back), its local copy starts as a copy of volume `seed`, whose
    /// last snapshot that snapshot must descend from: only the chunks changed since, on
    /// either side, are read from the store (see `failback`).
    pub fn volume_create_from(
        self: &Arc<Self>,
        name: &str,
        source: CloneSource<'_>,
        export: Option<ExportRecord>,
        seed: Option<&str>,
    ) -> anyhow::Result<api::VolumeCreated> {
        check_name(name)?;
        let (store, manifest_key) = self.resolve(source)?;
        let _reservation = self.reserve(name, export.as_ref())?;
        for path in [
            self.volume_path(name),
            self.volume_file(name, "presence"),
            self.volume_file(name, "presence.log"),
        ] {
            if path.exists() {
                conflict!(
                    "{} exists already (left over from a failed create? remove it)",
                    path.display()
                );
            }
        }
        let loaded = self.load(&store, &manifest_key)?;
        let basis = crate::catalogue::BasisRecord {
            store: store.clone(),
            manifest_key: manifest_key.clone(),
        };
        let record = VolumeRecord::of_snapshot(name, &loaded.manifest, export.clone(), Some(basis));
        let undo = |held: bool| {
            self.remove_volume_files(name);
            if held && let Err(e) = self.hold_on(&store, &manifest_key, &record.uuid, name, false) {
                tracing::warn!(volume = %name, error = %ox_api::error_chain(&e), "its hold on the snapshot stays");
            }
        };
        let seeded = match seed {
            None => None,
            Some(seed) => match self.seed_from(seed, name, &store, loaded) {
                Ok(s) => Some(s),
                Err(e) => {
                    undo(false);
                    return Err(e);
                }
            },
        };
        let how = if seeded.is_some() {
            Opening::Seeded
        } else {
            Opening::New
        };
        let live = match self.open_volume(&record, how) {
            Ok(l) => l,
            Err(e) => {
                undo(false);
                return Err(e);
            }
        };
        if let Err(e) = self.hold_on(&store, &manifest_key, &record.uuid, name, true) {
            drop(live);
            undo(false);
            return Err(e);
        }
        let mut inner = self.inner();
        if let Some(e) = &export
            && let Err(err) = self.check_export(&inner, e)
        {
            drop(inner);
            drop(live);
            undo(true);
            return Err(err);
        }
        inner.catalogue.volumes.push(record.clone());
        let listeners = match self.commit_create(&mut inner, name, &live.bdev, export.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                drop(inner);
                drop(live);
                undo(true);
                return Err(e);
            }
        };
        inner.volumes.insert(name.into(), live);
        Ok(api::VolumeCreated {
            name: name.to_string(),
            listeners: listeners.iter().map(ToString::to_string).collect(),
            store: Some(store),
            manifest_key: Some(manifest_key),
            seeded: Some(seeded.as_ref().map(failback::Seeded::to_api)),
        })
    }

    /// Fetches the snapshot's working set into clone `name` in the background, if it
    /// lacks chunks (a new clone; one whose warm-up a restart cut short goes on);
    /// `paused` as the clone's background fetching is. Returns the walk's control
    /// (paused and resumed with thickening, stopped with the clone or at a stop of oxd).
    fn start_warming(
        &self,
        name: &str,
        handle: &CloneHandle,
        basis: &ObjectBasis,
        paused: bool,
    ) -> Option<Arc<Thickening>> {
        let (present, total) = handle.hydration();
        if present == total {
            return None;
        }
        let control = Thickening::new();
        if paused {
            control.pause();
        }
        let c = Arc::clone(&control);
        let clone = name.to_string();
        let (handle, basis) = (handle.clone(), basis.clone());
        let (on, cores) = (self.reactors[0].clone(), Arc::clone(&self.cores));
        let name = name.to_string();
        let spawned = std::thread::Builder::new()
            .name("warm".into())
            .spawn(move || {
                let walk = Arc::clone(&c);
                let r = cores.run(move |ex| {
                    Box::pin(
                        async move { ox::hydrate::warm(&basis, &ex, &handle, &on, &walk).await },
                    )
                });
                c.finish();
                match r {
                    Ok(Ok(w)) if c.is_stopped() => tracing::info!(
                        clone = %name,
                        fetched = w.fetched,
                        "working set fetch stopped"
                    ),
                    Ok(Ok(w)) if w.listed > 0 => tracing::info!(
                        clone = %name,
                        listed = w.listed,
                        fetched = w.fetched,
                        "working set fetched"
                    ),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(clone = %name, error = %e, "working set not fetched")
                    }
                    Err(e) => tracing::error!(clone = %name, error = %e, "working set not fetched"),
                }
            });
        if let Err(e) = spawned {
            tracing::error!(clone = %clone, error = %e, "working set not fetched");
            control.finish();
        }
        Some(control)
    }

    fn start_thickening(self: &Arc<Self>, name: &str, paused: bool) {
        let mut inner = self.inner();
        let Some(live) = inner.clones.get_mut(name) else {
            return;
        };
        if let Some(t) = &live.thickening {
            if !paused {
                t.resume();
            }
            return;
        }
        let control = Thickening::new();
        if paused {
            control.pause();
        }
        control.limited_by(self.settings.throttle.clone(), name);
        live.thickening = Some(Arc::clone(&control));
        let (handle, on, cores) = (
            live.handle.clone(),
            self.reactors[0].clone(),
            Arc::clone(&self.cores),
        );
        let name = name.to_string();
        let service = Arc::clone(self);
        let _ = std::thread::Builder::new()
            .name("thicken".into())
            .spawn(move || {
                let c = Arc::clone(&control);
                let r = cores.run(move |_ex| {
                    Box::pin(async move { ox::hydrate::thicken(&handle, &on, &c).await })
                });
                // This walk is over: a later start or resume begins a new one.
                if let Some(live) = service.inner().clones.get_mut(&name)
                    && live
                        .thickening
                        .as_ref()
                        .is_some_and(|t| Arc::ptr_eq(t, &control))
                {
                    live.thickening = None;
                }
                match r {
                    Ok(Ok(n)) => tracing::info!(clone = %name, chunks = n, "thickening fetched"),
                    Ok(Err(e)) => tracing::warn!(clone = %name, error = %e, "thickening stopped"),
                    Err(e) => tracing::error!(clone = %name, error = %e, "thickening not run"),
                }
            });
    }

    fn set_thicken_rate(&self, name: &str, mib_s: Option<u64>) {
        let limit = match mib_s {
            Some(m) if m > 0 => ox::throttle::Limit::per_second(m.saturating_mul(1 << 20)),
            _ => ox::throttle::Limit::NONE,
        };
        self.settings
            .throttle
            .set_volume(name, ox::throttle::Class::Background, limit);
    }

    /// Pauses, resumes or starts thickening of a clone, and sets its own bandwidth
    /// (`mib_s`; 0: only the global background limit); kept across restarts.
    pub fn clone_thicken(
        self: &Arc<Self>,
        name: &str,
        action: ThickenAction,
        mib_s: Option<u64>,
    ) -> anyhow::Result<api::CloneInfo> {
        let pause = action == ThickenAction::Pause;
        {
            let mut inner = self.inner();
            let Some(pos) = inner.catalogue.clones.iter().position(|c| c.name == name) else {
                not_found!("no clone named {}", shown(name));
            };
            let live = inner
                .clones
                .get(name)
                .with_context(|| format!("clone {name:?} is unavailable"))?;
            // The working set's fetch, while it runs, pauses and resumes with it.
            if let Some(w) = &live.warming {
                match action {
                    ThickenAction::Pause => w.pause(),
                    ThickenAction::Resume | ThickenAction::Start => w.resume(),
                }
            }
            match (action, &live.thickening) {
                (ThickenAction::Pause, Some(t)) => t.pause(),
                (ThickenAction::Resume, Some(t)) => t.resume(),
                // Pausing with no walk running records the choice for later walks.
                (ThickenAction::Start, _) | (_, None) => {}
            }
            let c = &mut inner.catalogue.clones[pos];
            c.thicken = true;
            c.paused = pause;
            if let Some(m) = mib_s {
                c.thicken_mib_s = Some(m);
                self.set_thicken_rate(name, Some(m));
            }
            self.save(&inner)?;
        }
        if !pause {
            self.start_thickening(name, false);
        }
        self.clone_get(name)
    }

    /// Every catalogued clone's UUID, and the open ones' counters over their life (for
    /// the health file).
    fn clone_totals(&self) -> OpenClones {
        let inner = self.inner();
        let clones = &inner.catalogue.clones;
        OpenClones {
            known: clones.iter().map(|c| c.uuid.clone()).collect(),
            totals: clones
                .iter()
                .filter_map(|c| {
                    let l = inner.clones.get(&c.name)?;
                    Some((c.uuid.clone(), CloneView::of(&c.name, l).lifetime))
                })
                .collect(),
        }
    }

    /// A clone's hydration, traffic and thickening state.
    pub fn clone_get(&self, name: &str) -> anyhow::Result<api::CloneInfo> {
        let inner = self.inner();
        let c = inner
            .catalogue
            .clones
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| Refusal::NotFound(format!("no clone named {}", shown(name))))?;
        Ok(clone_info(
            c,
            inner.clones.get(name),
            inner.unavailable.get(name),
        ))
    }

    /// Deletes a clone (local copy and presence record; the snapshot stays).
    pub fn clone_delete(&self, name: &str) -> anyhow::Result<api::Deleted> {
        let mut inner = self.inner();
        let Some(pos) = inner.catalogue.clones.iter().position(|c| c.name == name) else {
            not_found!("no clone named {}", shown(name));
        };
        let record = inner.catalogue.clones.remove(pos);
        self.save(&inner)?;
        if let Some(e) = &record.export {
            let _ = self.target.remove_subsystem(&e.nqn);
        }
        inner.unavailable.remove(name);
        if let Some(live) = inner.clones.remove(name) {
            for t in live.thickening.iter().chain(&live.warming) {
                t.stop();
            }
            // Nothing may be written to the record once its files are gone.
            if let Err(e) = live.handle.retire() {
                tracing::warn!(clone = %name, error = %e, "stopping its presence journal");
            }
        }
        drop(inner);
        self.set_thicken_rate(name, None);
        for ext in ["img", "presence", "presence.log"] {
            let _ = std::fs::remove_file(self.clone_path(name, ext));
        }
        self.target.health().forget(name);
        self.settings.throttle.forget(name);
        // Last: a hold left behind keeps a snapshot longer, never loses one.
        if let Err(e) = self.hold(&record, false) {
            tracing::warn!(clone = %name, error = %ox_api::error_chain(&e), "its hold on the snapshot stays");
        }
        Ok(api::Deleted {
            name: name.to_string(),
        })
    }

    /// Runs `work` on a thread of its own as a job of `kind` on `target`, its outcome
    /// recorded when it ends: a restore or a verify, which `pass` shows and cancels,
    /// reading `store` (whose retries the job shows).
    fn spawn_job(
        &self,
        kind: &str,
        target: &str,
        store: &StoreSpec,
        work: impl FnOnce(&Arc<Job>, Arc<ox::hydrate::Pass>) -> Result<Value, String> + Send + 'static,
    ) -> api::Job {
        let pass = Arc::new(ox::hydrate::Pass::default());
        let job = self.new_job(kind, target, None, Some(Arc::clone(&pass)), Some(store));
        let j = Arc::clone(&job);
        let spawned = std::thread::Builder::new()
            .name(kind.into())
            .spawn(move || {
                let outcome = work(&j, pass);
                *j.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            });
        if let Err(e) = spawned {
            job.outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(Err(e.to_string()));
        }
        job.info()
    }

    /// Starts fetching and checking every frame of a snapshot (its own and those it
    /// references); the job's result lists every bad frame.
    pub fn snapshot_verify(self: &Arc<Self>, id: &str) -> anyhow::Result<api::Job> {
        let snap = self.snapshot(id)?;
        let spec = self.store(&snap.store)?.clone();
        let (keks, cores, key, throttle) = (
            self.settings.keys.clone(),
            Arc::clone(&self.cores),
            snap.manifest_key.clone(),
            self.settings.throttle.clone(),
        );
        let volume = snap.volume.clone();
        Ok(
            self.spawn_job("verify", &snap.id, &spec.clone(), move |job, pass| {
                let job = Arc::clone(job);
                let report = cores
                    .run(move |ex| {
                        Box::pin(async move {
                            let store = spec.open(&ex)?;
                            let loaded = ox::snapshot::load(&*store, &key, &keks).await?;
                            job.total.store(loaded.manifest.chunks(), Ordering::Relaxed);
                            let charge = Some((&throttle, volume.as_str()));
                            ox::hydrate::verify(&*store, &loaded, charge, &pass).await
                        })
                    })
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let bad: Vec<Value> = report
                    .bad
                    .iter()
                    .map(|(c, why)| json!({"chunk": c, "error": why}))
                    .collect();
                let result =
                    json!({ "frames": report.frames, "zero_chunks": report.zero, "bad": bad });
                if bad.is_empty() {
                    Ok(result)
                } else {
                    Err(format!("{} bad frame(s): {result}", bad.len()))
                }
            }),
        )
    }

    /// Starts restoring a snapshot into a new volume `name` (a full copy); the volume
    /// appears, exported if asked, only once the copy is complete.
    pub fn snapshot_restore(
        self: &Arc<Self>,
        id: &str,
        name: &str,
        export: Option<ExportRecord>,
    ) -> anyhow::Result<api::Job> {
        check_name(name)?;
        let snap = self.snapshot(id)?;
        let reservation = self.reserve(name, export.as_ref())?;
        let loaded = self.load(&snap.store, &snap.manifest_key)?;
        let record = VolumeRecord::of_snapshot(name, &loaded.manifest, export, None);
        let path = self.volume_path(name);
        if path.exists() {
            conflict!(
                "{} exists already (left over from a failed restore? remove it)",
                path.display()
            );
        }
        let live = self.open_volume(&record, Opening::Restored)?;
        let service = Arc::clone(self);
        let spec = self.store(&snap.store)?.clone();
        let name = name.to_string();
        Ok(self.spawn_job("restore", &name.clone(), &spec.clone(), move |job, pass| {
            let _reservation = reservation;
            job.total.store(loaded.manifest.chunks(), Ordering::Relaxed);
            let (dev, on) = (live.bdev.clone(), service.reactors[0].clone());
            let (throttle, volume) = (service.settings.throttle.clone(), name.clone());
            let copying = Arc::clone(&pass);
            let copied = service.cores.run(move |ex| {
                Box::pin(async move {
                    let store = spec.open(&ex)?;
                    let charge = Some((&throttle, volume.as_str()));
                    ox::hydrate::restore(&*store, &loaded, &dev, &on, charge, &copying).await
                })
            });
            // As a delete forgets a volume: a later one of this name starts afresh.
            let discard = |live: LiveVolume, why: String| {
                drop(live);
                service.remove_volume_files(&name);
                service.target.health().forget(&name);
                service.settings.throttle.forget(&name);
                Err(why)
            };
            let written = match copied {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return discard(live, e.to_string()),
                Err(e) => return discard(live, e.to_string()),
            };
            let mut inner = service.inner();
            // Cancelled as the copy ended: not published. Sealed, it is: a cancel from
            // now on does not take (the job ends done).
            if !pass.seal() {
                drop(inner);
                return discard(live, "restore cancelled".into());
            }
            if let Some(e) = &record.export
                && let Err(err) = service.check_export(&inner, e)
            {
                drop(inner);
                return discard(live, format!("the restored copy is discarded: {err:#}"));
            }
            inner.catalogue.volumes.push(record.clone());
            let listeners = match service.commit_create(
                &mut inner,
                &name,
                &live.bdev,
                record.export.as_ref(),
            ) {
                Ok(l) => l,
                Err(e) => {
                    drop(inner);
                    return discard(
                        live,
                        format!("the restored copy is discarded: {}", ox_api::error_chain(&e)),
                    );
                }
            };
            inner.volumes.insert(name.clone(), live);
            Ok(json!({ "name": name, "bytes": written, "listeners": listeners.iter().map(ToString::to_string).collect::<Vec<_>>() }))
        }))
    }

    /// Deletes a snapshot: its manifest, then every object no remaining snapshot of
    /// the volume references. Refused while a later snapshot builds on it or a clone
    /// reads from it.
    pub fn snapshot_delete(&self, id: &str) -> anyhow::Result<api::SnapshotDeleted> {
        let snap = self.snapshot(id)?;
        // A snapshot of the volume uploading now has objects no manifest references
        // yet: orphan collection would take them. Hold the volume for the delete.
        let busy = self
            .inner()
            .volumes
            .get(&snap.volume)
            .map(|v| Arc::clone(&v.busy));
        if let Some(b) = &busy
            && b.swap(true, Ordering::SeqCst)
        {
            conflict!(
                "a snapshot of {} is running: delete after it ends",
                snap.volume
            );
        }
        // So are the objects of one a restart cut short, until it continues.
        if self.journal_path(&snap.volume).exists() {
            if let Some(b) = &busy {
                b.store(false, Ordering::SeqCst);
            }
            conflict!(
                "a snapshot of {} is pending (it continues from its journal): delete after it ends",
                snap.volume
            );
        }
        let result = self.delete_snapshot(&snap);
        if let Some(b) = busy {
            b.store(false, Ordering::SeqCst);
            self.wake_policies();
        }
        result
    }

    /// Deletes a snapshot at once: it leaves both catalogues, and the volume's prefix is
    /// swept. A snapshot that a kept one builds on stays as that one's ancestor (its
    /// manifest, and the objects still read through it). Refused while a clone reads
    /// it, here or (by its hold) on another appliance, or if another appliance owns
    /// the volume's place in the store.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> anyhow::Result<api::SnapshotDeleted> {
        let prefix = bucket::prefix_of(&snap.manifest_key)?;
        let also_live: Vec<String> = {
            let inner = self.inner();
            if let Some(c) = inner
                .catalogue
                .clones
                .iter()
                .find(|c| c.manifest_key == snap.manifest_key && c.store == snap.store)
            {
                conflict!(
                    "clone {} reads from snapshot {}: delete it (or let it thicken) first",
                    c.name,
                    snap.id
                );
            }
            inner
                .catalogue
                .snapshots
                .iter()
                .filter(|s| s.store == snap.store && s.id != snap.id)
                .map(|s| s.manifest_key.clone())
                .chain(
                    inner
                        .catalogue
                        .clones
                        .iter()
                        .filter(|c| c.store == snap.store)
                        .map(|c| c.manifest_key.clone()),
                )
                .filter(|k| k.starts_with(&prefix))
                .collect()
        };
        let spec = self.store(&snap.store)?.clone();
        let (keks, key, id, me) = (
            self.settings.keys.clone(),
            snap.manifest_key.clone(),
            snap.id.clone(),
            self.me(),
        );
        let now = now_secs();
        let outcome = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                if let Some(h) = ox::bucket::head(&*store, &prefix).await?
                    && h.owner.id != me.id
                {
                    return Ok(Err(format!(
                        "the volume's place in the store belongs to appliance {}",
                        h.owner.name
                    )));
                }
                for hold in ox::retention::holds(&*store, &prefix).await? {
                    if hold.manifest == key {
                        return Ok(Err(format!(
                            "a clone on appliance {} reads it",
                            hold.appliance.name
                        )));
                    }
                }
                // An operator's delete does not wait out the grace period.
                let retired_at = now.saturating_sub(policies::GRACE_S);
                ox::retention::retire(&*store, &prefix, std::slice::from_ref(&id), retired_at)
                    .await?;
                let swept = ox::retention::sweep(
                    &*store,
                    &prefix,
                    &keks,
                    &also_live,
                    now,
                    policies::GRACE_S,
                )
                .await?;
                let orphans = ox::snapshot::collect_orphans(&*store, &prefix, &keks).await?;
                let kept = match store.get(&key).await {
                    Ok(_) => true,
                    Err(ox::OxError::NotFound { .. }) => false,
                    Err(e) => return Err(e),
                };
                Ok::<_, ox::OxError>(Ok((swept, orphans.len(), kept)))
            })
        })??;
        let (swept, orphans, kept) = match outcome {
            Ok(o) => o,
            Err(why) => conflict!("snapshot {} cannot be deleted: {why}", snap.id),
        };
        let mut inner = self.inner();
        inner.catalogue.snapshots.retain(|s| s.id != snap.id);
        self.save(&inner)?;
        Ok(api::SnapshotDeleted {
            id: snap.id.clone(),
            objects_deleted: (swept.manifests + swept.pages + swept.objects + orphans) as u64,
            kept_as_ancestor: kept,
        })
    }

    /// Re-wraps the data key of every catalogued snapshot under key `to` (which must be
    /// configured, like the keys they are wrapped under now): after it, the old key
    /// can be retired from the configuration. Only in volume places this appliance
    /// owns: the snapshots of a volume another appliance adopted are that one's to
    /// rotate (they are listed as skipped, with the owner). Each manifest is replaced
    /// only if it did not change since it was read (read again and retried if it did).
    pub fn key_rotate(&self, to: &str) -> anyhow::Result<api::Rotated> {
        let new = self
            .settings
            .keys
            .iter()
            .find(|k| k.id == to)
            .ok_or_else(|| Refusal::NotFound(format!("no key named {}", shown(to))))?
            .clone();
        let snaps = self.inner().catalogue.snapshots.clone();
        let me = self.me();
        let mut rewrapped = 0;
        let mut skipped = Vec::new();
        // Each catalogued snapshot and every ancestor it builds on (a retired one stays
        // as an ancestor, and loading needs its key too), each once.
        let mut done: std::collections::HashSet<(String, String)> = Default::default();
        for snap in &snaps {
            let spec = self.store(&snap.store)?.clone();
            let own = bucket::prefix_of(&snap.manifest_key)?;
            let owner = {
                let (spec, prefix, me) = (spec.clone(), own.clone(), me.id.clone());
                self.cores
                    .run(move |ex| {
                        Box::pin(async move {
                            let store = spec.open(&ex)?;
                            owned_elsewhere(&*store, &prefix, &me).await
                        })
                    })?
                    .with_context(|| format!("the owner of snapshot {}'s volume", snap.id))?
            };
            if let Some(owner) = owner {
                skipped.push(api::RotateSkipped {
                    snapshot: snap.id.clone(),
                    volume: snap.volume.clone(),
                    owner: bucket::named(&owner),
                });
                continue;
            }
            let lineage = {
                let (spec, key) = (spec.clone(), snap.manifest_key.clone());
                self.cores
                    .run(move |ex| {
                        Box::pin(async move {
                            let store = spec.open(&ex)?;
                            let m = ox::format::Manifest::from_bytes(&store.get(&key).await?)?;
                            Ok::<_, ox::OxError>(m.lineage)
                        })
                    })?
                    .with_context(|| format!("snapshot {}", snap.id))?
            };
            // Only manifests in this volume's own place: an ancestor another appliance's
            // volume keeps (a volume over its snapshot) is that appliance's to rotate.
            let all = std::iter::once((snap.id.clone(), snap.manifest_key.clone()))
                .chain(lineage.into_iter().map(|a| (a.snapshot, a.manifest)))
                .filter(|(_, m)| m.starts_with(&own));
            for (id, manifest) in all {
                if !done.insert((snap.store.clone(), manifest.clone())) {
                    continue;
                }
                let (keks, key, new, spec, prefix, me) = (
                    self.settings.keys.clone(),
                    manifest.clone(),
                    new.clone(),
                    spec.clone(),
                    own.clone(),
                    me.id.clone(),
                );
                let changed = self
                    .cores
                    .run(move |ex| {
                        Box::pin(async move {
                            let store = spec.open(&ex)?;
                            let mut attempts = 0;
                            loop {
                                // Looked at again just before each write: an adoption
                                // since the first look stops the rotation of its place.
                                if owned_elsewhere(&*store, &prefix, &me).await?.is_some() {
                                    return Ok(false);
                                }
                                let (bytes, tag) = match store.get_tagged(&key).await {
                                    // Deleted meanwhile (retention): nothing to re-wrap.
                                    Err(ox::OxError::NotFound { .. }) => return Ok(false),
                                    other => other?,
                                };
                                let mut m = ox::format::Manifest::from_bytes(&bytes)?;
                                let Some(wrapped) = &m.key else {
                                    return Ok(false);
                                };
                                if wrapped.kek_id == new.id {
                                    return Ok(false);
                                }
                                m.key = Some(ox::keys::rewrap(&keks, wrapped, &new, &id)?);
                                // Conditional where the store gives version tags (S3's
                                // ETags); without one (a local directory) it replaces.
                                match store.put_if_match(&key, m.to_bytes(), tag.as_deref()).await {
                                    Err(ox::OxError::AlreadyExists { .. }) if attempts < 3 => {
                                        // Changed since it was read: read it again.
                                        attempts += 1;
                                    }
                                    Err(ox::OxError::NotFound { .. }) => return Ok(false),
                                    other => return other.map(|()| true),
                                }
                            }
                        })
                    })?
                    .with_context(|| format!("snapshot {}", snap.id))?;
                if changed {
                    self.audit_key_use("rewrap", Some(to), &manifest, "ok");
                }
                rewrapped += u64::from(changed);
            }
        }
        Ok(api::Rotated {
            key: to.to_string(),
            snapshots: snaps.len() as u64,
            rewrapped,
            skipped,
        })
    }

    /// Creates the clones the configuration declares that the catalogue lacks, and
    /// checks the ones it has against it.
    pub fn ensure_clones(
        self: &Arc<Self>,
        declared: &[crate::config::CloneSection],
    ) -> anyhow::Result<()> {
        for c in declared {
            let existing = self
                .inner()
                .catalogue
                .clones
                .iter()
                .find(|r| r.name == c.name)
                .cloned();
            match existing {
                Some(r) if r.store != c.store || r.manifest_key != c.manifest_key => bail!(
                    "clone {:?}: the configuration names {}:{}, the existing clone {}:{}",
                    c.name,
                    c.store,
                    c.manifest_key,
                    r.store,
                    r.manifest_key
                ),
                Some(_) => {}
                None => {
                    let export =
                        ExportRecord::from_config(c.nqn.as_ref(), &c.hosts, c.allow_any_host);
                    self.clone_create(
                        &c.name,
                        CloneSource::Manifest {
                            store: &c.store,
                            key: &c.manifest_key,
                        },
                        c.thicken,
                        export,
                    )
                    .with_context(|| format!("clone {:?}", c.name))?;
                }
            }
        }
        Ok(())
    }

    /// The configured stores (names, kinds and where; never credentials).
    pub fn store_list(&self) -> Vec<api::StoreInfo> {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut list: Vec<api::StoreInfo> = self
            .settings
            .stores
            .iter()
            .map(|(name, spec)| {
                let check = checks.get(name).cloned();
                match spec {
                    StoreSpec::S3(c) => api::StoreInfo {
                        name: name.clone(),
                        kind: "s3".into(),
                        endpoint: Some(c.endpoint.as_str().to_string()),
                        bucket: Some(c.bucket.clone()),
                        region: Some(c.region.clone()),
                        path: None,
                        check,
                        retries: Some(c.retry_log.count()),
                        last_retry: Some(c.retry_log.last().map(retry_info)),
                    },
                    StoreSpec::Local(p) => api::StoreInfo {
                        name: name.clone(),
                        kind: "local".into(),
                        endpoint: None,
                        bucket: None,
                        region: None,
                        path: Some(p.display().to_string()),
                        check,
                        retries: None,
                        last_retry: None,
                    },
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Checks store `name` on an OX core (list, put a probe object, read it back, find
    /// it in a listing, delete it, see it gone; see `ox::store::check`): each step with its time, the
    /// first failure with its reason.
    pub fn store_check(&self, name: &str) -> anyhow::Result<api::CheckReport> {
        self.check_store(name, true).map(|(report, _)| report)
    }

    /// Collects what failed uploads and deleted snapshots left in store `name`, across
    /// the bucket — every volume place, whichever appliance wrote it (`ox::collect`):
    /// objects no manifest names, older than the grace (`ox::lease::ORPHAN_GRACE_S`),
    /// in places no upload holds a live lease in. `dry_run`: what would go, and nothing
    /// goes (its keys listed, up to [`COLLECT_KEYS_SHOWN`]).
    pub fn store_collect(&self, name: &str, dry_run: bool) -> anyhow::Result<api::Collected> {
        let spec = self.store(name)?.clone();
        let now = now_secs();
        let c = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                ox::collect::collect(&*store, "", now, dry_run).await
            })
        })??;
        tracing::info!(
            store = %name,
            dry_run,
            objects = c.objects,
            bytes = c.bytes,
            places = c.places,
            kept_young = c.young,
            places_left_alone = c.skipped.len(),
            lists = c.lists,
            gets = c.gets,
            "collected objects no manifest names (a dry run: would have)"
        );
        let shown = c.keys.len().min(COLLECT_KEYS_SHOWN);
        Ok(api::Collected {
            store: name.to_string(),
            dry_run,
            places: c.places,
            objects: c.objects,
            bytes: c.bytes,
            young: c.young,
            ageless: c.ageless,
            dead_leases: c.dead_leases,
            grace_s: ox::lease::ORPHAN_GRACE_S,
            requests: api::CollectRequests {
                lists: c.lists,
                gets: c.gets,
                deletes: c.deletes,
            },
            skipped: c
                .skipped
                .into_iter()
                .map(|(prefix, reason)| api::PlaceSkipped { prefix, reason })
                .collect(),
            keys: dry_run.then(|| c.keys[..shown].to_vec()),
            keys_truncated: dry_run.then_some(c.keys.len() > COLLECT_KEYS_SHOWN),
        })
    }

    /// [`Self::store_check`]; `newest`: its outcome replaces one recorded meanwhile
    /// (else a check at start, finishing late, keeps an operator's newer one).
    /// Also returns the outcome as the store's listing shows it (the failure named as
    /// [`ox::store::check::Check::failure`] names it).
    fn check_store(
        &self,
        name: &str,
        newest: bool,
    ) -> anyhow::Result<(api::CheckReport, api::LastCheck)> {
        let spec = self.store(name)?.clone();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let check = self.cores.run(move |ex| {
            Box::pin(async move {
                match spec.open(&ex) {
                    Ok(store) => ox::store::check::check(&*store, "", &token).await,
                    Err(e) => ox::store::check::Check {
                        steps: vec![ox::store::check::Step {
                            name: "open",
                            millis: 0,
                            error: Some(e.to_string()),
                            detail: None,
                        }],
                    },
                }
            })
        })?;
        let steps: Vec<api::CheckStep> = check
            .steps
            .iter()
            .map(|s| api::CheckStep {
                step: s.name.to_string(),
                ms: s.millis,
                error: s.error.clone(),
                detail: s.detail.clone(),
            })
            .collect();
        let failed = check.failure();
        let last = api::LastCheck {
            ok: check.ok(),
            at: now_secs(),
            step: failed.map(|s| s.name.to_string()),
            error: failed.and_then(|s| s.error.clone()),
        };
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        if newest || !checks.contains_key(name) {
            checks.insert(name.to_string(), last.clone());
        }
        drop(checks);
        let report = api::CheckReport {
            store: name.to_string(),
            ok: check.ok(),
            steps,
        };
        Ok((report, last))
    }

    /// Checks every configured store in the background and logs the outcome (a wrong
    /// endpoint, secret, CA or bucket shows at start, not at the first snapshot).
    pub fn check_stores_in_background(self: &Arc<Self>) {
        let service = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("store-check".into())
            .spawn(move || {
                let mut names: Vec<String> = service.settings.stores.keys().cloned().collect();
                names.sort();
                for name in names {
                    match service.check_store(&name, false) {
                        Ok((c, _)) if c.ok => {
                            let steps: Vec<&str> = c.steps.iter().map(|s| s.step.as_str()).collect();
                            tracing::info!(store = %name, "checked ({})", steps.join(", "));
                        }
                        Ok((_, last)) => {
                            tracing::warn!(
                                store = %name,
                                step = %last.step.as_deref().unwrap_or("?"),
                                error = %last.error.as_deref().unwrap_or("?"),
                                "check failed: snapshots and clones of it will fail until it \
                                 is fixed (oxctl store check)"
                            );
                        }
                        Err(e) => tracing::warn!(store = %name, error = %ox_api::error_chain(&e), "check could not run"),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the store check: {e}");
        }
    }

    /// The configured key-encryption keys (names, the default first; never material).
    pub fn key_list(&self) -> Vec<api::KeyInfo> {
        self.settings
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| api::KeyInfo {
                name: k.id.clone(),
                default: i == 0,
                check: k.check_value(),
            })
            .collect()
    }

    /// Starts again the snapshots a stop or a crash cut short: each continues from its
    /// journal's last checkpoint with the same point in time, or (no usable journal)
    /// starts over — after a clean stop reading only the volume's changes, after a
    /// crash all of it.
    pub fn resume_pending(self: &Arc<Self>) {
        let pending = self.inner().catalogue.pending.clone();
        for p in pending {
            match self.snapshot_create(&p.volume, &p.store, p.key.as_deref(), p.verify, p.full) {
                Ok(job) => tracing::info!(
                    volume = %p.volume,
                    store = %p.store,
                    job = job.id,
                    "snapshot started again"
                ),
                Err(e) => {
                    tracing::error!(volume = %p.volume, error = %ox_api::error_chain(&e), "snapshot not started again");
                    let handle = self
                        .inner()
                        .volumes
                        .get(&p.volume)
                        .map(|v| v.handle.clone());
                    if let Some(h) = handle {
                        self.release_resumed(&p.volume, &h);
                    }
                    let mut inner = self.inner();
                    inner.catalogue.pending.retain(|x| x != &p);
                    let _ = self.save(&inner);
                }
            }
        }
    }

    /// Creates the volumes the configuration declares that the catalogue lacks, and
    /// checks the ones it has against it.
    pub fn ensure_volumes(&self, declared: &[crate::config::VolumeSection]) -> anyhow::Result<()> {
        for v in declared {
            let existing = self
                .inner()
                .catalogue
                .volumes
                .iter()
                .find(|r| r.name == v.name)
                .cloned();
            let size = v
                .size_mib
                .checked_mul(1 << 20)
                .with_context(|| format!("volume {:?}: size_mib is too large", v.name))?;
            match existing {
                Some(r) if r.size_bytes != size => bail!(
                    "volume {:?}: the configuration says {} MiB, the existing volume has {} MiB",
                    v.name,
                    v.size_mib,
                    r.size_bytes >> 20
                ),
                Some(_) => {}
                None => {
                    let export =
                        ExportRecord::from_config(v.nqn.as_ref(), &v.hosts, v.allow_any_host);
                    self.volume_create(&v.name, size, v.block_size.unwrap_or(512), export)
                        .with_context(|| format!("volume {:?}", v.name))?;
                }
            }
        }
        Ok(())
    }

    /// Every live block device (volumes and clones), for statistics and metrics.
    pub fn bdevs(&self) -> Vec<Bdev> {
        let inner = self.inner();
        inner
            .volumes
            .values()
            .map(|v| v.bdev.clone())
            .chain(inner.clones.values().map(|c| c.bdev.clone()))
            .collect()
    }

    /// First step of a clean stop, while the reactors still run: background work
    /// (thickening walks) stops.
    pub fn stop_background(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_policies();
        let inner = self.inner();
        for c in inner.clones.values() {
            for t in c.thickening.iter().chain(&c.warming) {
                t.stop();
            }
        }
        // Running snapshots stop where they are, keeping their point in time and
        // journal: the next start continues them.
        for job in inner.jobs.values() {
            let progress = job
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(p) = progress {
                p.suspend();
            }
        }
        let busy: Vec<Arc<AtomicBool>> = inner
            .volumes
            .values()
            .map(|v| Arc::clone(&v.busy))
            .collect();
        drop(inner);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while busy.iter().any(|b| b.load(Ordering::SeqCst)) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Last step of a clean stop, after the reactors have stopped (so no host write
    /// can land any more): every volume file and clone copy is fsynced, each volume's
    /// change tracking saved and each clone's presence checkpointed, so the next start
    /// needs no full reads or refetches. Returns what could not be saved (each is still
    /// safe: a full read, or a refetch, at the next start).
    pub fn persist(&self) -> Vec<String> {
        // A snapshot the stop suspended (see `stop_background`) has normally ended by
        // now; one that fails instead gives its changes back to the volume as it ends.
        // Either way, wait a little so the tracking saved below is final.
        let busy: Vec<Arc<AtomicBool>> = self
            .inner()
            .volumes
            .values()
            .map(|v| Arc::clone(&v.busy))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while busy.iter().any(|b| b.load(Ordering::SeqCst)) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let inner = self.inner();
        let mut problems = Vec::new();
        let sync = |path: &Path| std::fs::File::open(path).and_then(|f| f.sync_all());
        for (name, c) in &inner.clones {
            let saved = sync(&self.clone_path(name, "img"))
                .map_err(|e| e.to_string())
                .and_then(|()| c.handle.checkpoint_flushed().map_err(|e| e.to_string()));
            if let Err(e) = saved {
                problems.push(format!("clone {name}: {e}"));
            }
        }
        for (name, v) in &inner.volumes {
            if v.busy.load(Ordering::SeqCst) {
                problems.push(format!(
                    "volume {name}: a snapshot was still running; every chunk counts as changed at the next start"
                ));
                continue;
            }
            // What hosts read since the last snapshot: the next one's working set.
            let heat: Vec<u8> = v
                .handle
                .take_heat()
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            if heat.iter().any(|&b| b != 0)
                && let Err(e) = bdev::fsutil::replace_file(&self.heat_path(name), &heat)
            {
                tracing::warn!(volume = %name, error = %e, "its working set is not kept");
            }
            let saved = sync(&self.volume_path(name))
                .and_then(|()| v.handle.save_changes(&self.tracking_path(name)))
                .map_err(|e| e.to_string())
                .and_then(|()| match &v.over {
                    Some(h) => h.checkpoint_flushed().map_err(|e| e.to_string()),
                    None => Ok(()),
                });
            if let Err(e) = saved {
                problems.push(format!("volume {name}: {e}"));
            }
        }
        problems
    }
}

/// How a volume's file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// Created just now: made empty, nothing changed yet.
    New,
    /// Created just now over a snapshot, its file and presence record made already
    /// (seeded from another volume): nothing changed yet.
    Seeded,
    /// Made now to receive a snapshot's data: every chunk counts as changed.
    Restored,
    /// Made before (reopened at start): it must be whole; `pending`, a snapshot of it
    /// was running.
    Existing {
        /// A snapshot of it was running at the last stop.
        pending: bool,
    },
}

/// The most keys a dry [`Service::store_collect`] lists.
pub const COLLECT_KEYS_SHOWN: usize = 1000;

/// Store prefix of a volume's snapshots: its name for people, its UUID so that two
/// appliances' volumes of the same name never share objects.
fn snapshot_prefix(volume: &str, uuid: &str) -> String {
    let id: String = uuid.chars().filter(|c| *c != '-').take(12).collect();
    format!("{volume}.{id}/")
}

/// An export as the API shows it.
fn export_info(e: &ExportRecord) -> api::Export {
    api::Export {
        nqn: e.nqn.clone(),
        hosts: e.hosts.clone(),
        allow_any_host: e.allow_any_host,
    }
}

/// A catalogued snapshot as `snapshot_list` shows it.
fn snapshot_info(s: &SnapshotRecord) -> api::Snapshot {
    api::Snapshot {
        id: s.id.clone(),
        volume: s.volume.clone(),
        store: s.store.clone(),
        manifest_key: s.manifest_key.clone(),
        parent: s.parent.clone(),
        created: s.created,
        data_bytes: s.data_bytes,
        meta_bytes: s.meta_bytes,
        chunks_read: s.chunks_read,
        listed: s.listed,
        duration_ms: s.duration_ms,
    }
}

/// A clone as `clone_get` (and `volume_list`) show it: its record, why it could not be
/// opened if it could not, and while it is open its hydration and traffic.
fn clone_info(
    c: &CloneRecord,
    live: Option<&LiveClone>,
    unavailable: Option<&String>,
) -> api::CloneInfo {
    let mut info = api::CloneInfo {
        name: c.name.clone(),
        kind: "clone".into(),
        uuid: c.uuid.clone(),
        store: c.store.clone(),
        manifest_key: c.manifest_key.clone(),
        export: c.export.as_ref().map(export_info),
        thicken: c.thicken,
        paused: c.paused,
        thicken_mib_s: c.thicken_mib_s,
        unavailable: unavailable.cloned(),
        size_bytes: None,
        block_size: None,
        chunks_present: None,
        chunks_total: None,
        hydration_pct: None,
        host_read_bytes: None,
        fetched_bytes: None,
        object_bytes: None,
        gets: None,
        integrity_failures: None,
        refetches: None,
        miss_latency_us: None,
        thickening: None,
        warming: None,
    };
    let Some(l) = live else {
        return info;
    };
    // The same reading the metrics export.
    let view = CloneView::of(&c.name, l);
    let miss = &view.miss_latency;
    let us = |q| miss.quantile(q).as_micros() as u64;
    info.size_bytes = Some(l.bdev.info().size_bytes());
    info.block_size = Some(l.bdev.info().block_size);
    info.chunks_present = Some(view.chunks_present);
    info.chunks_total = Some(view.chunks_total);
    info.hydration_pct = Some(view.hydration() * 100.0);
    // Over the clone's whole life, across restarts.
    let t = &view.lifetime;
    info.host_read_bytes = Some(t.host_read_bytes);
    info.fetched_bytes = Some(api::Fetched {
        client_miss: t.client_miss_bytes,
        prefetch: t.prefetch_bytes,
        thickening: t.thickening_bytes,
    });
    info.object_bytes = Some(t.object_bytes);
    info.gets = Some(t.gets);
    info.integrity_failures = Some(t.integrity_failures);
    info.refetches = Some(t.refetches);
    info.miss_latency_us = Some(api::MissLatency {
        count: miss.count(),
        p50: us(0.5),
        p99: us(0.99),
    });
    info.thickening = l.thickening.as_ref().map(|t| api::Thickening {
        paused: t.is_paused(),
        fetched: t.fetched(),
        eta_s: t.eta(&l.handle).map(|d| d.as_secs()),
        retrying: t.retrying() as u64,
    });
    info.warming = l
        .warming
        .as_ref()
        .filter(|w| !w.is_finished())
        .map(|w| api::Warming {
            paused: w.is_paused(),
            fetched: w.fetched(),
            setbacks: w.setbacks(),
        });
    info
}
