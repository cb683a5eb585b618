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

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bdev::{Claim, VolumeHandle};
use reactor::ReactorHandle;

use crate::codec::{Binding, Codec, CodecSettings};
use crate::error::OxError;
use crate::format::{self, Ancestor, Entry, FORMAT_VERSION, IndexPage, Manifest, PAGE_CHUNKS};
use crate::journal::{self, JOURNAL_VERSION, Journal};
use crate::keys::{self, Kek, SecretKey};
use crate::store::ObjectStore;
use crate::throttle::{Class, Throttle};

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
}

impl SnapshotProgress {
    /// Asks the snapshot to stop; it fails with "cancelled", publishes nothing, and the
    /// volume's change tracking keeps its changes for the next attempt.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
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
    }

    fn is_suspended(&self) -> bool {
        self.suspended.load(std::sync::atomic::Ordering::SeqCst)
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
}

/// A loaded snapshot: its manifest and what decoding its frames (and its ancestors')
/// needs. Index pages are loaded on demand.
pub struct Loaded {
    /// The manifest.
    pub manifest: Manifest,
    /// Its key.
    pub manifest_key: String,
    /// Decoding context per source: 0 = this snapshot, n = `lineage[n-1]`.
    pub sources: Vec<Source>,
}

/// How to decode the frames of one snapshot.
#[derive(Debug, Clone)]
pub struct Source {
    /// Data key, if encrypted.
    pub key: Option<SecretKey>,
    /// Frame binding.
    pub binding: Binding,
    /// Its data objects.
    pub objects: Vec<String>,
    /// zstd level it was written with (informational).
    pub zstd_level: i32,
}

impl Source {
    /// A decoder for this source's frames.
    pub fn codec(&self) -> Result<Codec, OxError> {
        Codec::new(CodecSettings { level: 0 }, self.key.as_ref(), self.binding)
    }
}

/// Reads manifest `key` and the manifests of its lineage (one GET each; no index pages).
pub async fn load(store: &dyn ObjectStore, key: &str, keks: &[Kek]) -> Result<Loaded, OxError> {
    let manifest = Manifest::from_bytes(&store.get(key).await?)?;
    let mut sources = vec![source_of(&manifest, keks)?];
    for a in &manifest.lineage {
        let m = Manifest::from_bytes(&store.get(&a.manifest).await?)?;
        if m.snapshot != a.snapshot {
            return Err(OxError::integrity(
                &a.manifest,
                "ancestor manifest names another snapshot",
            ));
        }
        sources.push(source_of(&m, keks)?);
    }
    Ok(Loaded {
        manifest,
        manifest_key: key.to_string(),
        sources,
    })
}

fn source_of(m: &Manifest, keks: &[Kek]) -> Result<Source, OxError> {
    let key = m
        .key
        .as_ref()
        .map(|w| keys::unwrap(keks, w, &m.snapshot))
        .transpose()?;
    Ok(Source {
        key,
        binding: m.binding()?,
        objects: m.objects.clone(),
        zstd_level: m.zstd_level,
    })
}

impl Loaded {
    /// Loads index page `page`; also returns the bytes fetched.
    pub async fn page(
        &self,
        store: &dyn ObjectStore,
        page: u64,
    ) -> Result<(IndexPage, usize), OxError> {
        if page >= self.manifest.page_count() {
            return Err(OxError::integrity(
                "manifest",
                format!("no index page {page}"),
            ));
        }
        let frame = store.get(&self.manifest.page_key(page)?).await?;
        let decoded = IndexPage::decode(
            &self.sources[0].codec()?,
            page,
            &frame,
            self.manifest.page_chunks(page),
            &self.manifest.page_limits(),
        )?;
        Ok((decoded, frame.len()))
    }
}

/// Uploads in flight at once while encoding goes on.
const UPLOADS_IN_FLIGHT: usize = 4;

type Upload<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), OxError>> + 'a>>;

/// Packs frames into data objects and uploads sealed objects in the background: up to
/// [`UPLOADS_IN_FLIGHT`] PUTs progress while the next chunks are read and encoded.
struct Packer<'a> {
    store: &'a dyn ObjectStore,
    throttle: &'a Throttle,
    opts: &'a SnapshotOptions,
    current: Vec<u8>,
    objects: Vec<String>,
    uploaded: u64,
    in_flight: std::collections::VecDeque<Upload<'a>>,
}

impl Packer<'_> {
    /// Appends a frame; returns (object number, offset).
    async fn add(&mut self, frame: &[u8]) -> Result<(u32, u64), OxError> {
        let at = (self.objects.len() as u32, self.current.len() as u64);
        self.current.extend_from_slice(frame);
        if self.current.len() >= self.opts.object_bytes {
            self.seal().await?;
        }
        Ok(at)
    }

    async fn seal(&mut self) -> Result<(), OxError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let key = format::data_key(&self.opts.prefix, &format::random_id()?);
        let data = std::mem::take(&mut self.current);
        self.uploaded += data.len() as u64;
        self.objects.push(key.clone());
        let (store, throttle, name) = (self.store, self.throttle, &self.opts.volume_name);
        let patience = self.opts.outage_patience;
        self.in_flight.push_back(Box::pin(async move {
            throttle
                .acquire(name, Class::Background, data.len() as u64)
                .await;
            put_patiently(store, &key, data, patience).await
        }));
        self.drive().await?;
        while self.in_flight.len() > UPLOADS_IN_FLIGHT {
            if let Some(oldest) = self.in_flight.pop_front() {
                oldest.await?;
            }
        }
        Ok(())
    }

    /// Gives every upload in flight a turn; collects the finished ones.
    async fn drive(&mut self) -> Result<(), OxError> {
        let mut still = std::collections::VecDeque::new();
        while let Some(mut up) = self.in_flight.pop_front() {
            match futures_lite::future::poll_once(&mut up).await {
                Some(result) => result?,
                None => still.push_back(up),
            }
        }
        self.in_flight = still;
        Ok(())
    }

    /// Seals the last object and waits for every upload.
    async fn finish(&mut self) -> Result<(), OxError> {
        self.seal().await?;
        while let Some(up) = self.in_flight.pop_front() {
            up.await?;
        }
        Ok(())
    }
}

/// PUTs `data`, waiting out an unavailable store for up to `patience` (a refusal or
/// any other error fails at once).
async fn put_patiently(
    store: &dyn ObjectStore,
    key: &str,
    data: Vec<u8>,
    patience: Duration,
) -> Result<(), OxError> {
    let deadline = std::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(100);
    loop {
        match store.put(key, data.clone()).await {
            Err(OxError::Unavailable { .. }) if std::time::Instant::now() < deadline => {
                async_io::Timer::after(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// The index being written: the page being built, and what has been stored.
struct IndexWriter {
    entries: Vec<Entry>,
    salt: [u8; 16],
    pages: u64,
    bytes: u64,
}

impl IndexWriter {
    /// Adds a chunk's entry, storing the page once it is full.
    async fn push(
        &mut self,
        entry: Entry,
        store: &dyn ObjectStore,
        opts: &SnapshotOptions,
        codec: &mut Codec,
    ) -> Result<(), OxError> {
        self.entries.push(entry);
        if self.entries.len() >= PAGE_CHUNKS as usize {
            self.flush(store, opts, codec).await?;
        }
        Ok(())
    }

    /// Stores the page being built, if it holds anything.
    async fn flush(
        &mut self,
        store: &dyn ObjectStore,
        opts: &SnapshotOptions,
        codec: &mut Codec,
    ) -> Result<(), OxError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let page = IndexPage {
            entries: std::mem::take(&mut self.entries),
        };
        let frame = page.encode(codec, self.pages)?;
        let key = format::page_key(&opts.prefix, &self.salt, self.pages);
        self.pages += 1;
        self.bytes += frame.len() as u64;
        put_patiently(store, &key, frame, opts.outage_patience).await
    }
}

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
    let resumed = match &opts.journal {
        Some(path) => resumable(path, handle, parent, opts)?,
        None => None,
    };
    let (changed, resumed) = match resumed {
        Some((j, changed)) => (changed, Some(j)),
        None => {
            while !handle.copies_settled() {
                async_io::Timer::after(Duration::from_millis(1)).await;
            }
            let mut changed = handle
                .begin_snapshot()
                .map_err(|e| OxError::Config(e.to_string()))?;
            // Ended on every path out of here until the writer takes over.
            let guard = SnapshotGuard {
                handle,
                changed: Some(changed.clone()),
                journal: None,
            };
            while !handle.writes_settled() {
                async_io::Timer::after(Duration::from_micros(100)).await;
            }
            handle.settle(&mut changed);
            let parent_id = parent
                .map(|p| p.manifest.binding().map(|b| b.snapshot))
                .transpose()?;
            if changed.base != parent_id {
                // The change set is relative to another snapshot than the parent
                // asked for: only a full read is correct.
                changed.mark_all();
            }
            std::mem::forget(guard);
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
    let result = write(
        store,
        on,
        handle,
        parent,
        opts,
        throttle,
        &changed,
        resumed,
        journal.as_deref(),
    )
    .await;
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
        }
        Err(_) => {}
    }
    result
}

/// The journal at `path` and its change set, if the volume took up the snapshot it
/// describes after a restart and that snapshot can continue with these settings.
/// Otherwise the journal is removed (and a snapshot taken up is ended, its changes kept
/// for the next attempt).
fn resumable(
    path: &Path,
    handle: &VolumeHandle,
    parent: Option<&Loaded>,
    opts: &SnapshotOptions,
) -> Result<Option<(Journal, bdev::ChangedChunks)>, OxError> {
    let Some(token) = handle.take_resumed() else {
        if handle.snapshot_token().is_none() {
            // A journal left by an attempt that ended (or never took up): stale.
            journal::remove(path)?;
        }
        return Ok(None);
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
        Ok(Some((j, changed))) if fits(&j) => Ok(Some((j, changed))),
        other => {
            let mut changed = match other {
                Ok(Some((_, c))) => c,
                _ => {
                    let mut all = handle.changes();
                    all.mark_all();
                    all
                }
            };
            changed.base = None;
            handle.end_snapshot(Some(&changed));
            journal::remove(path)?;
            Ok(None)
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
        if let Some(c) = self.changed.take() {
            self.handle.end_snapshot(Some(&c));
        }
        if let Some(path) = self.journal.take() {
            // A journal left behind is recognised as stale and removed next time.
            let _ = journal::remove(&path);
        }
    }
}

/// Changed chunks read ahead of the encoder, so reading the next chunks from the device
/// overlaps encoding and uploading this one.
#[derive(Default)]
struct ReadAhead {
    queue: std::collections::VecDeque<(u64, Ahead)>,
    /// The next chunk to consider.
    scan: u64,
}

/// A chunk read ahead: preserved contents, or a read in flight (of the device, which
/// holds the chunk from writes until done, or of a durable copy).
enum Ahead {
    Ready(Vec<u8>),
    Reading(crate::blockio::Pending),
}

/// Device reads a snapshot keeps in flight ahead of the encoder.
const READ_AHEAD: usize = 8;

/// How often a snapshot with a journal checkpoints its progress: at most this much
/// work is redone after a crash.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// Starts reading what the snapshot stores for `chunk`: `None` if a write is copying
/// it right now (ask again shortly).
fn start_chunk(
    chunk: u64,
    handle: &VolumeHandle,
    read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
    on: &ReactorHandle,
) -> Result<Option<Ahead>, OxError> {
    Ok(Some(match handle.claim_chunk(chunk) {
        Ok(Claim::Copy(data)) => Ahead::Ready(data),
        Ok(Claim::Saved {
            dev,
            offset_blocks,
            num_blocks,
        }) => Ahead::Reading(crate::blockio::start_read(
            on,
            &dev,
            offset_blocks,
            num_blocks,
            || {},
        )?),
        Ok(Claim::Device) => match read(chunk) {
            Ok(p) => Ahead::Reading(p),
            Err(e) => {
                handle.chunk_read(chunk);
                return Err(e);
            }
        },
        Err(()) => return Ok(None),
    }))
}

impl ReadAhead {
    /// Claims and starts reading changed chunks from `at` on, up to the window; stops
    /// at a chunk a write is copying right now (it is claimed later, in order).
    fn fill(
        &mut self,
        at: u64,
        chunks: u64,
        changed: &bdev::ChangedChunks,
        handle: &VolumeHandle,
        read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
        on: &ReactorHandle,
    ) -> Result<(), OxError> {
        self.scan = self.scan.max(at);
        while self.queue.len() < READ_AHEAD && self.scan < chunks.min(at + 4 * READ_AHEAD as u64) {
            let c = self.scan;
            if changed.contains(c) {
                match start_chunk(c, handle, read, on)? {
                    Some(item) => self.queue.push_back((c, item)),
                    None => return Ok(()),
                }
            }
            self.scan += 1;
        }
        Ok(())
    }

    /// The read-ahead of `chunk`, if it was started.
    fn take(&mut self, chunk: u64) -> Option<Ahead> {
        match self.queue.front() {
            Some((c, _)) if *c == chunk => self.queue.pop_front().map(|(_, a)| a),
            _ => None,
        }
    }
}

/// Where a snapshot starts: fresh, or continuing a journal.
struct Start {
    snapshot: [u8; 16],
    data_key: Option<SecretKey>,
    salt: [u8; 16],
    zstd_level: i32,
    nonce_prefixes: Vec<[u8; 4]>,
    next_chunk: u64,
    objects: Vec<String>,
    pages: u64,
    index_bytes: u64,
    entries: Vec<Entry>,
    stored_chunks: u64,
    uploaded: u64,
    chunks_read: u64,
}

impl Start {
    fn fresh(opts: &SnapshotOptions) -> Result<Self, OxError> {
        Ok(Self {
            snapshot: format::random_id()?,
            data_key: match &opts.kek {
                Some(_) => Some(SecretKey::random()?),
                None => None,
            },
            salt: format::random_id()?,
            zstd_level: opts.zstd_level,
            nonce_prefixes: Vec::new(),
            next_chunk: 0,
            objects: Vec::new(),
            pages: 0,
            index_bytes: 0,
            entries: Vec::with_capacity(PAGE_CHUNKS as usize),
            stored_chunks: 0,
            uploaded: 0,
            chunks_read: 0,
        })
    }

    fn from_journal(j: &Journal, opts: &SnapshotOptions, chunks: u64) -> Result<Self, OxError> {
        let bad = |what: &str| OxError::Format(format!("snapshot journal: {what}"));
        let data_key = match (&opts.kek, &j.key) {
            (Some(kek), Some(w)) => Some(keys::unwrap(std::slice::from_ref(kek), w, &j.snapshot)?),
            (None, None) => None,
            _ => return Err(bad("encryption differs")),
        };
        let nonce_prefixes = j
            .nonce_prefixes
            .iter()
            .map(|p| {
                hex::decode(p)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| bad("nonce prefix"))
            })
            .collect::<Result<_, _>>()?;
        let in_page = j
            .pages
            .checked_mul(PAGE_CHUNKS)
            .and_then(|first| j.next_chunk.checked_sub(first))
            .filter(|n| *n < PAGE_CHUNKS && j.next_chunk <= chunks)
            .ok_or_else(|| bad("position"))?;
        let limits = format::PageLimits {
            lineage: usize::from(u16::MAX),
            objects: j.objects.len(),
            max_frame: usize::MAX,
        };
        let entries = IndexPage::from_bytes(
            &hex::decode(&j.page_entries).map_err(|_| bad("entries"))?,
            in_page as usize,
            &limits,
        )?
        .entries;
        Ok(Self {
            snapshot: format::parse_id(&j.snapshot)?,
            data_key,
            salt: format::parse_id(&j.index_salt)?,
            zstd_level: j.zstd_level,
            nonce_prefixes,
            next_chunk: j.next_chunk,
            objects: j.objects.clone(),
            pages: j.pages,
            index_bytes: j.index_bytes,
            entries,
            stored_chunks: j.stored_chunks,
            uploaded: j.uploaded,
            chunks_read: j.chunks_read,
        })
    }
}

/// Saves a checkpoint: every object sealed and stored first, so the journal names
/// only what is in the store; then the volume may stop copying the chunks it covers.
#[allow(clippy::too_many_arguments)]
async fn checkpoint(
    path: &Path,
    next_chunk: u64,
    packer: &mut Packer<'_>,
    index: &IndexWriter,
    base: &Journal,
    stored_chunks: u64,
    chunks_read: u64,
    handle: &VolumeHandle,
) -> Result<(), OxError> {
    packer.finish().await?;
    let journal = Journal {
        next_chunk,
        objects: packer.objects.clone(),
        pages: index.pages,
        index_bytes: index.bytes,
        page_entries: hex::encode(
            IndexPage {
                entries: index.entries.clone(),
            }
            .to_bytes(),
        ),
        stored_chunks,
        uploaded: packer.uploaded,
        chunks_read,
        ..base.clone()
    };
    journal.save(path)?;
    handle.commit_through(next_chunk);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn write(
    store: &dyn ObjectStore,
    on: &ReactorHandle,
    handle: &VolumeHandle,
    parent: Option<&Loaded>,
    opts: &SnapshotOptions,
    throttle: &Throttle,
    changed: &bdev::ChangedChunks,
    resumed: Option<Journal>,
    journal_path: Option<&Path>,
) -> Result<SnapshotReport, OxError> {
    let dev = handle.inner();
    let volume_bytes = dev.info().size_bytes();
    let chunk_bytes = handle.chunk_bytes();
    let chunks = handle.chunks();
    if let Some(p) = parent
        && (p.manifest.volume_bytes != volume_bytes
            || u64::from(p.manifest.chunk_bytes) != chunk_bytes)
    {
        return Err(OxError::Config(
            "the parent snapshot has another size or chunk size".into(),
        ));
    }
    let start = match &resumed {
        Some(j) => Start::from_journal(j, opts, chunks)?,
        None => Start::fresh(opts)?,
    };
    let snapshot = start.snapshot;
    let snapshot_hex = hex::encode(snapshot);
    let manifest_key = format::manifest_key(&opts.prefix, &snapshot);
    if resumed.is_some()
        && let Some(report) =
            published(store, &manifest_key, &snapshot_hex, start.next_chunk).await?
    {
        return Ok(report);
    }
    let binding = Binding {
        volume: opts.volume_id,
        snapshot,
    };
    let mut codec = Codec::new(
        CodecSettings {
            level: start.zstd_level,
        },
        start.data_key.as_ref(),
        binding,
    )?;
    codec.avoid_nonce_prefixes(&start.nonce_prefixes)?;
    let mut packer = Packer {
        store,
        throttle,
        opts,
        current: Vec::new(),
        objects: start.objects.clone(),
        uploaded: start.uploaded,
        in_flight: std::collections::VecDeque::new(),
    };
    let lineage: Vec<Ancestor> = match parent {
        Some(p) => std::iter::once(Ancestor {
            snapshot: p.manifest.snapshot.clone(),
            manifest: p.manifest_key.clone(),
        })
        .chain(p.manifest.lineage.iter().cloned())
        .collect(),
        None => Vec::new(),
    };
    let wrapped = match (&opts.kek, &start.data_key) {
        (Some(kek), Some(k)) => Some(keys::wrap(kek, k, &snapshot_hex)?),
        _ => None,
    };
    let block = u64::from(dev.block_size());
    // Entries of the index page being built; pages are stored as they fill, so memory
    // stays one page whatever the volume size.
    let mut index = IndexWriter {
        entries: start.entries,
        salt: start.salt,
        pages: start.pages,
        bytes: start.index_bytes,
    };
    // What every checkpoint repeats.
    let base = match (&resumed, journal_path) {
        (_, None) => None,
        (Some(j), Some(_)) => Some(Journal {
            nonce_prefixes: j
                .nonce_prefixes
                .iter()
                .cloned()
                .chain(std::iter::once(hex::encode(codec.nonce_prefix())))
                .collect(),
            ..j.clone()
        }),
        (None, Some(path)) => {
            Journal::save_changed(path, changed, chunks)?;
            Some(Journal {
                version: JOURNAL_VERSION,
                store: opts.store_name.clone(),
                volume: hex::encode(opts.volume_id),
                snapshot: snapshot_hex.clone(),
                token: hex::encode(handle.snapshot_token().unwrap_or_default()),
                parent: parent.map(|p| p.manifest_key.clone()),
                prefix: opts.prefix.clone(),
                zstd_level: start.zstd_level,
                key: wrapped.clone(),
                index_salt: hex::encode(index.salt),
                nonce_prefixes: vec![hex::encode(codec.nonce_prefix())],
                next_chunk: 0,
                objects: Vec::new(),
                pages: 0,
                index_bytes: 0,
                page_entries: String::new(),
                stored_chunks: 0,
                uploaded: 0,
                chunks_read: 0,
            })
        }
    };
    let mut parent_page: Option<(u64, IndexPage)> = None;
    let mut ahead = ReadAhead::default();
    let mut chunks_read = start.chunks_read;
    let mut stored_chunks = start.stored_chunks;
    let progress = &opts.progress;
    progress
        .chunks_total
        .store(chunks, std::sync::atomic::Ordering::Relaxed);
    // The first checkpoint records the journal (and a resumed snapshot's new nonce
    // prefix) before anything is encoded.
    let mut last_checkpoint = Instant::now();
    if let (Some(path), Some(base)) = (journal_path, &base) {
        let at = start.next_chunk;
        checkpoint(
            path,
            at,
            &mut packer,
            &index,
            base,
            stored_chunks,
            chunks_read,
            handle,
        )
        .await?;
    }
    for chunk in start.next_chunk..chunks {
        if !changed.contains(chunk) {
            handle.skip_chunk(chunk);
        }
        if progress.is_cancelled() {
            return Err(OxError::Config(format!(
                "snapshot of {} cancelled at chunk {chunk}; nothing was published",
                opts.volume_name
            )));
        }
        if progress.is_suspended() {
            return Err(OxError::Suspended(opts.volume_name.clone()));
        }
        abandoned(handle, opts)?;
        if let (Some(path), Some(base)) = (journal_path, &base)
            && last_checkpoint.elapsed() >= CHECKPOINT_EVERY
        {
            checkpoint(
                path,
                chunk,
                &mut packer,
                &index,
                base,
                stored_chunks,
                chunks_read,
                handle,
            )
            .await?;
            last_checkpoint = Instant::now();
        }
        progress
            .chunks_done
            .store(chunk, std::sync::atomic::Ordering::Relaxed);
        progress
            .bytes_uploaded
            .store(packer.uploaded, std::sync::atomic::Ordering::Relaxed);
        if !changed.contains(chunk) {
            let entry = match parent {
                None => Entry::Zero,
                Some(p) => {
                    let page = chunk / PAGE_CHUNKS;
                    if parent_page.as_ref().is_none_or(|(n, _)| *n != page) {
                        parent_page = Some((page, p.page(store, page).await?.0));
                    }
                    let e = parent_page
                        .as_ref()
                        .and_then(|(_, pg)| pg.entries.get((chunk % PAGE_CHUNKS) as usize).copied())
                        .unwrap_or(Entry::Zero);
                    match e {
                        Entry::Frame {
                            source,
                            object,
                            offset,
                            length,
                        } => Entry::Frame {
                            source: source
                                .checked_add(1)
                                .ok_or_else(|| OxError::Config("lineage too deep".into()))?,
                            object,
                            offset,
                            length,
                        },
                        Entry::Zero => Entry::Zero,
                    }
                }
            };
            index.push(entry, store, opts, &mut codec).await?;
            continue;
        }
        // A device read releases its chunk to writers the moment it completes (on the
        // reactor), not when the encoder gets to it: an encoder waiting on a slow
        // upload must not hold host writes up.
        let read = |c: u64| {
            let len = (volume_bytes - c * chunk_bytes).min(chunk_bytes);
            let (h, generation) = (handle.clone(), handle.generation());
            crate::blockio::start_read(on, dev, c * chunk_bytes / block, len / block, move || {
                h.chunk_read_in(c, generation)
            })
        };
        ahead.fill(chunk, chunks, changed, handle, &read, on)?;
        let item = match ahead.take(chunk) {
            Some(item) => item,
            None => loop {
                match start_chunk(chunk, handle, &read, on)? {
                    Some(item) => break item,
                    None => {
                        async_io::Timer::after(Duration::from_micros(50)).await;
                    }
                }
            },
        };
        let data = match item {
            Ahead::Ready(d) => d,
            Ahead::Reading(p) => p.finish().await?,
        };
        chunks_read += 1;
        packer.drive().await?;
        let entry = match codec.encode(chunk, &data)? {
            None => Entry::Zero,
            Some(frame) => {
                let (object, offset) = packer.add(&frame).await?;
                stored_chunks += 1;
                Entry::Frame {
                    source: 0,
                    object,
                    offset,
                    length: frame.len() as u32,
                }
            }
        };
        index.push(entry, store, opts, &mut codec).await?;
    }
    index.flush(store, opts, &mut codec).await?;
    packer.finish().await?;
    let manifest = Manifest {
        format: FORMAT_VERSION,
        snapshot: snapshot_hex.clone(),
        volume: hex::encode(opts.volume_id),
        parent: parent.map(|p| p.manifest.snapshot.clone()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        volume_bytes,
        chunk_bytes: u32::try_from(chunk_bytes)
            .map_err(|_| OxError::Config("chunk too large".into()))?,
        zstd_level: start.zstd_level,
        key: wrapped,
        lineage,
        objects: packer.objects.clone(),
        index_prefix: opts.prefix.clone(),
        index_salt: hex::encode(index.salt),
        stored_chunks,
        stored_bytes: packer.uploaded,
    };
    let bytes = manifest.to_bytes();
    let meta_bytes = index.bytes + bytes.len() as u64;
    if progress.is_cancelled() {
        return Err(OxError::Config(format!(
            "snapshot of {} cancelled before publishing",
            opts.volume_name
        )));
    }
    if progress.is_suspended() {
        return Err(OxError::Suspended(opts.volume_name.clone()));
    }
    abandoned(handle, opts)?;
    match store.put_new(&manifest_key, bytes).await {
        Ok(()) => {}
        // A resumed snapshot whose manifest an earlier attempt published after all.
        Err(OxError::AlreadyExists { .. }) if resumed.is_some() => {
            if let Some(report) =
                published(store, &manifest_key, &snapshot_hex, start.next_chunk).await?
            {
                return Ok(report);
            }
        }
        Err(e) => return Err(e),
    }
    progress
        .chunks_done
        .store(chunks, std::sync::atomic::Ordering::Relaxed);
    Ok(SnapshotReport {
        manifest,
        manifest_key,
        data_bytes: packer.uploaded,
        meta_bytes,
        chunks_read,
        resumed_at: resumed.map(|_| start.next_chunk),
    })
}

/// Fails if the volume abandoned the snapshot (a copy-before-write copy could not be
/// stored, so its point in time is lost for some chunk).
fn abandoned(handle: &VolumeHandle, opts: &SnapshotOptions) -> Result<(), OxError> {
    match handle.snapshot_abandoned() {
        Some(why) => Err(OxError::Config(format!(
            "snapshot of {} abandoned: {why}; nothing was published, and the next snapshot stores its changes",
            opts.volume_name
        ))),
        None => Ok(()),
    }
}

/// The report of snapshot `snapshot` if its manifest is in the store already (an
/// earlier attempt published it, and a crash came before anyone recorded that).
async fn published(
    store: &dyn ObjectStore,
    key: &str,
    snapshot: &str,
    resumed_at: u64,
) -> Result<Option<SnapshotReport>, OxError> {
    let bytes = match store.get(key).await {
        Ok(b) => b,
        Err(OxError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = bytes.len() as u64;
    let manifest = Manifest::from_bytes(&bytes)?;
    if manifest.snapshot != snapshot {
        return Err(OxError::integrity(key, "manifest names another snapshot"));
    }
    Ok(Some(SnapshotReport {
        data_bytes: manifest.stored_bytes,
        meta_bytes: meta,
        chunks_read: 0,
        resumed_at: Some(resumed_at),
        manifest_key: key.to_string(),
        manifest,
    }))
}

/// Deletes objects under `prefix` that no manifest references: what failed or cancelled
/// snapshots left behind. Objects younger than a running snapshot would look orphaned
/// too, so run it when no snapshot is being written to this prefix. Returns the keys
/// deleted.
pub async fn collect_orphans(
    store: &dyn ObjectStore,
    prefix: &str,
    keks: &[Kek],
) -> Result<Vec<String>, OxError> {
    let mut referenced = std::collections::HashSet::new();
    for key in store.list(&format!("{prefix}ox1/m/")).await? {
        let loaded = load(store, &key, keks).await?;
        let m = &loaded.manifest;
        referenced.extend(m.objects.iter().cloned());
        for page in 0..m.page_count() {
            referenced.insert(m.page_key(page)?);
        }
    }
    let mut orphans = Vec::new();
    for kind in ["d", "i"] {
        for key in store.list(&format!("{prefix}ox1/{kind}/")).await? {
            if !referenced.contains(&key) {
                orphans.push(key);
            }
        }
    }
    store.delete(&orphans).await?;
    Ok(orphans)
}
