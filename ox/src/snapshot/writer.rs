//! The snapshot writer: reads the chunks to store, encodes them, packs and uploads
//! them with the index, checkpoints its journal, and publishes the manifest last.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bdev::VolumeHandle;
use reactor::ReactorHandle;

use crate::codec::{Binding, Codec, CodecSettings};
use crate::error::OxError;
use crate::format::{self, Ancestor, Entry, FORMAT_VERSION, IndexPage, Manifest, PAGE_CHUNKS};
use crate::journal::{JOURNAL_VERSION, Journal};
use crate::keys::{self, SecretKey};
use crate::lease;
use crate::store::ObjectStore;
use crate::throttle::Throttle;

use super::attempt::Attempt;
use super::encode::{Done, Encoders};
use super::read_ahead::{Ahead, ReadAhead, start_chunk};
use super::spares::Spares;
use super::upload::{IndexWriter, Packer};
use super::{Loaded, SnapshotOptions, SnapshotReport};

/// How long a suspended snapshot may spend on a last checkpoint (waiting for its
/// uploads in flight) before it stops without one.
const SUSPEND_PATIENCE: Duration = Duration::from_secs(3);

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
    empty_pages: Vec<[u64; 2]>,
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
            empty_pages: Vec::new(),
            entries: Vec::with_capacity(PAGE_CHUNKS as usize),
            stored_chunks: 0,
            uploaded: 0,
            chunks_read: 0,
        })
    }

    /// The state journal `j` records, checked against what it can be for this volume
    /// (`chunks` of `chunk_bytes`) and lineage (`ancestors` snapshots): a damaged
    /// journal is an error, never a snapshot readers would refuse.
    fn from_journal(
        j: &Journal,
        opts: &SnapshotOptions,
        chunks: u64,
        chunk_bytes: u64,
        ancestors: usize,
    ) -> Result<Self, OxError> {
        let bad = |what: &str| OxError::Format(format!("snapshot journal: {what}"));
        let objects_prefix = format!("{}ox1/d/", opts.prefix);
        if j.objects.iter().any(|o| !o.starts_with(&objects_prefix)) {
            return Err(bad("an object outside the snapshot's prefix"));
        }
        // Counters no real snapshot of this volume could reach.
        let most = chunks.saturating_mul(chunk_bytes + 1024);
        if j.stored_chunks > j.next_chunk
            || j.chunks_read > j.next_chunk
            || j.uploaded > most
            || j.index_bytes > most
        {
            return Err(bad("counters"));
        }
        let mut end = 0;
        for &[first, stop] in &j.empty_pages {
            if first < end || stop <= first || stop > j.pages {
                return Err(bad("empty pages"));
            }
            end = stop;
        }
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
            lineage: ancestors,
            objects: j.objects.len(),
            max_frame: chunk_bytes as usize + 1024,
        };
        let entries = IndexPage::from_bytes(
            &hex::decode(&j.page_entries).map_err(|_| bad("entries"))?,
            in_page as usize,
            &limits,
        )
        .map_err(|e| bad(&format!("entries: {e}")))?
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
            empty_pages: j.empty_pages.clone(),
            entries,
            stored_chunks: j.stored_chunks,
            uploaded: j.uploaded,
            chunks_read: j.chunks_read,
        })
    }
}

/// Where and how a snapshot records its progress.
struct Journaling<'a> {
    path: &'a Path,
    /// What every checkpoint repeats (identity, key, settings).
    base: Journal,
}

/// A checkpoint taken (the object being filled sealed, the journal as it stands then)
/// but not saved yet: saved once every object its journal names is stored. The encoder
/// goes on meanwhile, so a far store's uploads are not drained at every checkpoint.
struct Taken {
    journal: Journal,
    next_chunk: u64,
    /// Objects its journal names: the first this many sealed.
    objects: usize,
}

impl Journaling<'_> {
    /// Saves a checkpoint at `next_chunk` ([`Self::take`], then [`Self::save`]).
    async fn checkpoint(
        &self,
        attempt: &mut Attempt<'_>,
        next_chunk: u64,
        packer: &mut Packer<'_>,
        index: &IndexWriter,
        counts: (u64, u64),
    ) -> Result<(), OxError> {
        let taken = self.take(next_chunk, packer, index, counts).await?;
        self.save(attempt, taken, packer).await
    }

    /// Saves `taken` once every object it names is stored (waiting for those uploads
    /// only), so the journal names only what is in the store; then (as `attempt`'s
    /// steps say, once the journal is durable) the volume may stop copying the chunks
    /// it covers.
    async fn save(
        &self,
        attempt: &mut Attempt<'_>,
        taken: Taken,
        packer: &mut Packer<'_>,
    ) -> Result<(), OxError> {
        packer.stored_through(taken.objects).await?;
        attempt.checkpoint(taken.next_chunk, || taken.journal.save(self.path))
    }

    /// Takes a checkpoint at `next_chunk` (every chunk before it handed to the packer):
    /// seals the object being filled and records the journal as it stands.
    async fn take(
        &self,
        next_chunk: u64,
        packer: &mut Packer<'_>,
        index: &IndexWriter,
        (stored_chunks, chunks_read): (u64, u64),
    ) -> Result<Taken, OxError> {
        packer.seal().await?;
        let journal = Journal {
            next_chunk,
            objects: packer.objects.clone(),
            pages: index.pages,
            index_bytes: index.bytes,
            empty_pages: index.empty.clone(),
            page_entries: hex::encode(
                IndexPage {
                    entries: index.entries.clone(),
                }
                .to_bytes(),
            ),
            stored_chunks,
            uploaded: packer.uploaded,
            chunks_read,
            ..self.base.clone()
        };
        Ok(Taken {
            journal,
            next_chunk,
            objects: packer.objects.len(),
        })
    }
}

/// What a snapshot reads from and writes to, as `snapshot_volume` was given it.
#[derive(Clone, Copy)]
pub(super) struct FromTo<'a> {
    pub(super) store: &'a dyn ObjectStore,
    pub(super) on: &'a ReactorHandle,
    pub(super) handle: &'a VolumeHandle,
    pub(super) parent: Option<&'a Loaded>,
    pub(super) opts: &'a SnapshotOptions,
    pub(super) throttle: &'a Throttle,
}

/// Writes the snapshot of `attempt`'s changed chunks from chunk `from` on, fresh or
/// continuing `resumed`, checkpointing its journal if it keeps one. `leased` is set to
/// the snapshot whose upload lease ([`crate::lease`]) this holds, for the caller to
/// release.
pub(super) async fn write(
    from_to: FromTo<'_>,
    attempt: &mut Attempt<'_>,
    from: u64,
    resumed: Option<Journal>,
    leased: &mut Option<String>,
) -> Result<SnapshotReport, OxError> {
    let FromTo {
        store,
        on,
        handle,
        parent,
        opts,
        throttle,
    } = from_to;
    // (A copy: the attempt is told of every claim meanwhile.)
    let changed = &attempt.changed().clone();
    let journal_path = opts.journal.as_deref().filter(|_| attempt.journaling());
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
    // Never publish what no reader accepts: refuse before anything is uploaded.
    let block_size = dev.block_size();
    if !crate::codec::CHUNK_SIZES.contains(&(chunk_bytes as usize))
        || !chunk_bytes.is_power_of_two()
        || !format::BLOCK_SIZES.contains(&block_size)
    {
        return Err(OxError::Config(format!(
            "volume {}: chunk size {chunk_bytes} with {block_size}-byte blocks cannot be \
             snapshotted (chunks of 64 KiB to 1 MiB, a power of two; blocks of 512 or 4096)",
            opts.volume_name
        )));
    }
    if let Some(j) = &resumed {
        // Its lease, taken before the stop, is this attempt's to renew and release.
        *leased = Some(j.snapshot.clone());
    }
    let start = match &resumed {
        Some(j) => Start::from_journal(
            j,
            opts,
            chunks,
            chunk_bytes,
            parent.map_or(0, |p| p.manifest.lineage.len() + 1),
        )?,
        None => Start::fresh(opts)?,
    };
    if start.next_chunk != from {
        return Err(OxError::Config(format!(
            "snapshot of {}: its journal continues at chunk {}, its steps at {from}",
            opts.volume_name, start.next_chunk
        )));
    }
    let snapshot = start.snapshot;
    let snapshot_hex = hex::encode(snapshot);
    let manifest_key = format::manifest_key(&opts.prefix, &snapshot);
    if resumed.is_some()
        && let Some(report) =
            published(store, &manifest_key, &snapshot_hex, start.next_chunk).await?
    {
        return Ok(report);
    }
    // Before anything is stored: a collector leaves this place alone while it is held.
    // A resumed upload's lease as the stop left it: its age counts as a gap (checked
    // when it was taken up, but time has passed since).
    let before = match &resumed {
        Some(_) => {
            let before = super::patiently(opts, async || {
                lease::read(store, &opts.prefix, &snapshot_hex).await
            })
            .await?;
            if before.is_none() {
                // Gone since it was looked at: a collector may have judged it dead.
                return Err(OxError::Config(format!(
                    "snapshot of {}: its upload lease is gone, so what it stored may have \
                     been collected; nothing was published, and the next snapshot stores \
                     its changes",
                    opts.volume_name
                )));
            }
            before
        }
        None => None,
    };
    let mut held = super::patiently(opts, async || {
        lease::Held::take(
            store,
            &opts.prefix,
            &snapshot_hex,
            opts.owner.as_deref(),
            before.as_ref(),
            &opts.clock,
        )
        .await
    })
    .await?;
    *leased = Some(snapshot_hex.clone());
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
    // This attempt's nonce prefixes: its own codec's, then one per other OX core's
    // encoder (the journal records them before any is used).
    let mut prefixes = start.nonce_prefixes.clone();
    prefixes.push(codec.nonce_prefix());
    let others = opts.encode_on.others();
    // As many buffers as the chunks read ahead and held by the encoders at most.
    let spares = Spares::new(
        ReadAhead::window(chunk_bytes) + super::encode::most_held(others.len(), chunk_bytes),
    );
    let mut encoders = Encoders::start(codec, others, chunk_bytes, spares.clone(), || {
        let settings = CodecSettings {
            level: start.zstd_level,
        };
        let mut c = Codec::new(settings, start.data_key.as_ref(), binding)?;
        c.avoid_nonce_prefixes(&prefixes)?;
        prefixes.push(c.nonce_prefix());
        Ok(c)
    })?;
    let new_prefixes: Vec<String> = prefixes[start.nonce_prefixes.len()..]
        .iter()
        .map(hex::encode)
        .collect();
    let mut packer = Packer::new(store, throttle, opts, start.objects.clone(), start.uploaded);
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
        empty: start.empty_pages.clone(),
    };
    let base = match (&resumed, journal_path) {
        (_, None) => None,
        (Some(j), Some(_)) => Some(Journal {
            nonce_prefixes: j
                .nonce_prefixes
                .iter()
                .cloned()
                .chain(new_prefixes.iter().cloned())
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
                nonce_prefixes: new_prefixes.clone(),
                next_chunk: 0,
                objects: Vec::new(),
                pages: 0,
                index_bytes: 0,
                empty_pages: Vec::new(),
                page_entries: String::new(),
                stored_chunks: 0,
                uploaded: 0,
                chunks_read: 0,
            })
        }
    };
    let journaling = journal_path
        .zip(base)
        .map(|(path, base)| Journaling { path, base });
    let mut parent_page: Option<(u64, IndexPage)> = None;
    let mut ahead = ReadAhead::new(chunk_bytes, spares.clone());
    let mut chunks_read = start.chunks_read;
    let mut stored_chunks = start.stored_chunks;
    let progress = &opts.progress;
    progress
        .chunks_total
        .store(chunks, std::sync::atomic::Ordering::Relaxed);
    // The first checkpoint records the journal (and a resumed snapshot's new nonce
    // prefixes) before anything is encoded.
    let (mut checkpoints, mut checkpoint_time) = (0, Duration::ZERO);
    if let Some(j) = &journaling {
        let counts = (stored_chunks, chunks_read);
        j.checkpoint(attempt, start.next_chunk, &mut packer, &index, counts)
            .await?;
    }
    let mut last_checkpoint = Instant::now();
    // A checkpoint taken, waiting for its objects to be stored before it is saved.
    let mut taken: Option<Taken> = None;
    for chunk in start.next_chunk..chunks {
        if progress.is_cancelled() {
            return Err(OxError::Cancelled(format!(
                "snapshot of {} cancelled at chunk {chunk}; nothing was published",
                opts.volume_name
            )));
        }
        if progress.is_suspended() {
            // A last checkpoint here saves redoing the work since the previous one,
            // if the uploads in flight finish soon; a stop does not wait longer.
            if let Some(j) = &journaling
                && handle.snapshot_abandoned().is_none()
            {
                // At the first chunk the encoders hold (all before it are in the index
                // and the packer): a stop waits for no encoder.
                let at = encoders.first_held().unwrap_or(chunk);
                let counts = (stored_chunks, chunks_read - encoders.held_read() as u64);
                let last = async {
                    j.checkpoint(attempt, at, &mut packer, &index, counts)
                        .await
                        .is_ok()
                };
                let patience = async {
                    async_io::Timer::after(SUSPEND_PATIENCE).await;
                    false
                };
                // Either way the journal is whole: this checkpoint, the one taken
                // before it if its objects are stored by now, or the one saved last.
                if !futures_lite::future::or(last, patience).await
                    && let Some(t) = taken.take()
                    && packer.stored() >= t.objects
                {
                    let _ = j.save(attempt, t, &mut packer).await;
                }
            }
            return Err(OxError::Suspended(opts.volume_name.clone()));
        }
        abandoned(handle, opts)?;
        super::patiently(opts, async || held.renew_if_due(store).await).await?;
        if let Some(j) = &journaling {
            let began = Instant::now();
            let due = last_checkpoint.elapsed() >= opts.checkpoint_every;
            // Saved once its objects are stored; and at most one waits: when the next
            // is due, the one before is saved first (its uploads began an interval ago).
            let save = taken.take_if(|t| due || packer.stored() >= t.objects);
            let saving = save.is_some();
            if let Some(t) = save {
                j.save(attempt, t, &mut packer).await?;
                checkpoints += 1;
            }
            if due {
                // At the first chunk the encoders hold, as at a stop.
                let at = encoders.first_held().unwrap_or(chunk);
                let counts = (stored_chunks, chunks_read - encoders.held_read() as u64);
                taken = Some(j.take(at, &mut packer, &index, counts).await?);
                last_checkpoint = Instant::now();
            }
            if due || saving {
                checkpoint_time += began.elapsed();
            }
        }
        // Done: every chunk before the first the encoders still hold.
        progress.chunks_done.store(
            encoders.first_held().unwrap_or(chunk),
            std::sync::atomic::Ordering::Relaxed,
        );
        progress
            .bytes_uploaded
            .store(packer.uploaded, std::sync::atomic::Ordering::Relaxed);
        if !changed.contains(chunk) {
            let entry = match parent {
                None => Entry::Zero,
                Some(p) => {
                    let page = chunk / PAGE_CHUNKS;
                    if parent_page.as_ref().is_none_or(|(n, _)| *n != page) {
                        parent_page = Some((page, p.page(store, page, None).await?.0));
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
            encoders.unchanged(chunk, entry);
        } else {
            // A device read releases its chunk to writers the moment it completes (on the
            // reactor), not when the encoder gets to it: an encoder waiting on a slow
            // upload must not hold host writes up.
            // Chunks `c..c + n`, a buffer each, released as the read completes.
            let read = |c: u64, n: usize| {
                let after = c + n as u64;
                let bufs = (c..after)
                    .map(|k| {
                        let len = (volume_bytes - k * chunk_bytes).min(chunk_bytes);
                        spares.take(len as usize)
                    })
                    .collect();
                let (h, generation) = (handle.clone(), handle.generation());
                crate::blockio::start_read_into(on, dev, c * chunk_bytes / block, bufs, move || {
                    for k in c..after {
                        h.chunk_read_in(k, generation);
                    }
                })
            };
            ahead
                .fill(chunk, chunks, changed, attempt, handle, &read, on)
                .await?;
            let item = match ahead.take(chunk).await? {
                Some(item) => item,
                None => start_chunk(chunk, attempt, handle, &read, on, &spares).await?,
            };
            let data = match item {
                Ahead::Ready(d) => d,
                Ahead::Reading(p) => p.finish_bytes().await?,
            };
            chunks_read += 1;
            packer.drive().await?;
            encoders.add(chunk, data)?;
        }
        // What the encoders have done goes to the packer and the index, in order.
        stored_chunks += hand_over(
            from_to,
            &mut encoders,
            false,
            &mut packer,
            &mut index,
            attempt,
        )
        .await?;
    }
    stored_chunks += hand_over(
        from_to,
        &mut encoders,
        true,
        &mut packer,
        &mut index,
        attempt,
    )
    .await?;
    index.flush(store, opts, encoders.codec()).await?;
    packer.finish().await?;
    let mut manifest = Manifest {
        // Format 2 readers can read it unless it leaves pages out.
        format: if index.empty.is_empty() {
            2
        } else {
            FORMAT_VERSION
        },
        snapshot: snapshot_hex.clone(),
        volume: hex::encode(opts.volume_id),
        parent: parent.map(|p| p.manifest.snapshot.clone()),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        volume_bytes,
        chunk_bytes: u32::try_from(chunk_bytes)
            .map_err(|_| OxError::Config("chunk too large".into()))?,
        block_size,
        zstd_level: start.zstd_level,
        key: wrapped,
        lineage,
        objects: packer.objects.clone(),
        index_prefix: opts.prefix.clone(),
        index_salt: hex::encode(index.salt),
        empty_pages_tag: None,
        empty_pages: index.empty,
        stored_chunks,
        stored_bytes: packer.uploaded,
        checksum: None,
    };
    if let Some(k) = &start.data_key {
        manifest.seal_empty_pages(k);
    }
    let bytes = manifest.to_bytes();
    let mut meta_bytes = index.bytes + bytes.len() as u64;
    if progress.is_cancelled() {
        return Err(OxError::Cancelled(format!(
            "snapshot of {} cancelled before publishing",
            opts.volume_name
        )));
    }
    if progress.is_suspended() {
        return Err(OxError::Suspended(opts.volume_name.clone()));
    }
    abandoned(handle, opts)?;
    super::patiently(opts, async || held.renew_if_due(store).await).await?;
    meta_bytes += store_working_set(store, opts, &index.salt, chunks, encoders.codec()).await;
    let read_back = if opts.verify_before_publish {
        let mut sources = vec![super::Source {
            key: start.data_key.clone(),
            binding: manifest.binding()?,
            objects: manifest.objects.clone(),
            zstd_level: manifest.zstd_level,
        }];
        sources.extend(parent.iter().flat_map(|p| p.sources.iter().cloned()));
        let to_publish = Loaded {
            manifest: manifest.clone(),
            manifest_key: manifest_key.clone(),
            sources,
        };
        let checking = super::read_back::read_back(store, &to_publish);
        // The lease is renewed meanwhile: a read-back can take as long as the upload.
        let renewing = async {
            loop {
                async_io::Timer::after(Duration::from_secs(lease::RENEW_S)).await;
                super::patiently(opts, async || held.renew(store).await).await?;
            }
        };
        Some(futures_lite::future::or(checking, renewing).await?)
    } else {
        None
    };
    // The last looks before publishing: after the read-back, however long it took.
    super::patiently(opts, async || held.renew_if_due(store).await).await?;
    if held.lapsed() {
        return Err(OxError::Config(format!(
            "snapshot of {}: its upload lease went unrenewed for more than {} s, so a \
             collector may have deleted what it stored; nothing was published, and the \
             next snapshot stores its changes",
            opts.volume_name,
            lease::TRUSTED_S
        )));
    }
    still_owner(store, opts).await?;
    if resumed.is_none() {
        // This attempt's own random key: nothing else writes there, so a plain PUT. (A
        // conditional create retried after its body was damaged on the way could only
        // judge what the store kept by reading it back, and a read can be served the
        // bytes sent — by a cache, say — while the store keeps a damaged copy: the
        // simulator's seed 1 found a snapshot published that way over a manifest that
        // failed its checksum.)
        store.put(&manifest_key, bytes).await?;
    } else {
        match store.put_new(&manifest_key, bytes.clone()).await {
            Ok(()) => {}
            // Something at this snapshot's key already: the manifest the attempt it
            // continues published after all (adopted), or a damaged copy a store kept
            // of a body it refused (replaced).
            Err(OxError::AlreadyExists { .. }) => {
                match published(store, &manifest_key, &snapshot_hex, start.next_chunk).await {
                    // This attempt read and uploaded it: its time is known.
                    Ok(Some(report)) => {
                        return Ok(SnapshotReport {
                            elapsed: Some(Duration::ZERO),
                            ..report
                        });
                    }
                    Ok(None) => store.put_new(&manifest_key, bytes).await?,
                    Err(OxError::Integrity { .. }) => store.put(&manifest_key, bytes).await?,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
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
        checkpoints,
        checkpoint_time,
        read_back,
        // Timed by `snapshot_volume`, which returns it.
        elapsed: Some(Duration::ZERO),
    })
}

/// Hands the chunks the encoders have done, in chunk order, to the packer and the
/// index: every chunk they hold if `all` (waiting for them), else those done already
/// (waiting for the first only while they hold more than they may). Returns the frames
/// it added.
async fn hand_over(
    from_to: FromTo<'_>,
    encoders: &mut Encoders,
    all: bool,
    packer: &mut Packer<'_>,
    index: &mut IndexWriter,
    attempt: &mut Attempt<'_>,
) -> Result<u64, OxError> {
    let mut frames = 0;
    while let Some((chunk, done)) = encoders.next(all).await? {
        let entry = match done {
            Done::Unchanged(entry) => entry,
            Done::Encoded(frame) => {
                let entry = match frame {
                    None => Entry::Zero,
                    Some(frame) => {
                        let (object, offset) = packer.add(&frame).await?;
                        frames += 1;
                        Entry::Frame {
                            source: 0,
                            object,
                            offset,
                            length: frame.len() as u32,
                        }
                    }
                };
                attempt.handed(chunk);
                entry
            }
        };
        index
            .push(entry, from_to.store, from_to.opts, encoders.codec())
            .await?;
    }
    Ok(frames)
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
    let manifest = match super::load::fetch_manifest(store, key).await {
        Ok(m) => m,
        Err(OxError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = manifest.to_bytes().len() as u64;
    if manifest.snapshot != snapshot {
        return Err(OxError::integrity(key, "manifest names another snapshot"));
    }
    Ok(Some(SnapshotReport {
        data_bytes: manifest.stored_bytes,
        meta_bytes: meta,
        chunks_read: 0,
        resumed_at: Some(resumed_at),
        checkpoints: 0,
        checkpoint_time: Duration::ZERO,
        read_back: None,
        // Published by an earlier attempt: how long that took is not known.
        elapsed: None,
        manifest_key: key.to_string(),
        manifest,
    }))
}

/// Stores the volume's working set beside the manifest-to-be, if the options carry one
/// with any chunk in it, of this volume's size, and no larger than
/// [`format::WorkingSet::MAX_SHARE_PCT`] per cent of it (a host that read everything — a backup, a
/// scan — says nothing about where to start). Best effort: a hint is never worth
/// failing a snapshot for; what goes wrong is logged. Created only if absent, so an
/// attempt that continues after a crash never replaces the set a published manifest
/// already has. Returns the bytes stored.
async fn store_working_set(
    store: &dyn ObjectStore,
    opts: &SnapshotOptions,
    salt: &[u8; 16],
    chunks: u64,
    codec: &mut Codec,
) -> u64 {
    let Some(words) = opts
        .working_set
        .as_ref()
        .filter(|w| w.iter().any(|&b| b != 0))
    else {
        return 0;
    };
    let volume = &opts.volume_name;
    if words.len() * 8 != format::WorkingSet::len_for(chunks) {
        tracing::warn!(
            volume,
            "working set of {} words for {chunks} chunks: not stored",
            words.len()
        );
        return 0;
    }
    let set = format::WorkingSet {
        words: words.clone(),
    };
    if !set.worth_storing(chunks) {
        tracing::info!(
            volume,
            "hosts read {} of {chunks} chunks: too much to be a working set, not stored",
            set.len()
        );
        return 0;
    }
    let key = format::page_key(&opts.prefix, salt, format::WORKING_SET_PAGE);
    let stored = match set.encode(codec) {
        Ok(frame) => {
            let len = frame.len() as u64;
            super::patiently(opts, async || store.put_new(&key, frame.clone()).await)
                .await
                .map(|()| len)
        }
        Err(e) => Err(e),
    };
    match stored {
        Ok(len) => len,
        Err(OxError::AlreadyExists { .. }) => 0,
        Err(e) => {
            tracing::warn!(volume, "working set not stored: {e}");
            0
        }
    }
}

/// Refuses to publish into a volume's place another appliance adopted meanwhile (see
/// [`SnapshotOptions::owner`]). The check is as late as it can be, just before the
/// manifest; what is left is the time of one PUT.
async fn still_owner(store: &dyn ObjectStore, opts: &SnapshotOptions) -> Result<(), OxError> {
    let Some(me) = &opts.owner else {
        return Ok(());
    };
    let head = super::patiently(opts, async || {
        crate::bucket::head(store, &opts.prefix).await
    })
    .await?;
    match head {
        Some(h) if h.owner.id != *me => Err(OxError::Owned {
            volume: opts.volume_name.clone(),
            owner: h.owner.id,
            owner_name: h.owner.name,
        }),
        _ => Ok(()),
    }
}
