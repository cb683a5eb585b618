//! The service's side of the bucket's catalogue (`ox::bucket`): this appliance's
//! identity in it, the records its snapshots leave there, browsing a store, and
//! finding a snapshot there by volume without this appliance's own catalogue — what a
//! second appliance does when the first is gone.

use anyhow::Context;
use ox::bucket::{self, Appliance, SnapshotEntry, VolumeHead};
use ox_api::methods as api;

use super::{Service, now_secs};
use crate::catalogue::{CloneRecord, SnapshotRecord, VolumeRecord};
use crate::refusal::{Refusal, invalid, not_found, shown};

/// Snapshots shown per volume by a browse of a whole store, unless asked otherwise.
const SHOWN_PER_VOLUME: usize = 3;

/// At most this many snapshots in one page.
const MAX_PAGE: usize = 1000;

/// This appliance as records name it: its identity (kept in the catalogue) and its
/// host name.
pub(super) fn appliance(id: &str) -> Appliance {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    Appliance {
        id: id.to_string(),
        name,
    }
}

/// `a` as the control API names an appliance.
pub(super) fn named(a: &Appliance) -> api::Appliance {
    api::Appliance {
        id: a.id.clone(),
        name: a.name.clone(),
    }
}

/// Where, in a store, a snapshot is to be found for a new clone.
pub enum InBucket<'a> {
    /// The newest of the volume.
    Latest,
    /// This one (its ID).
    Snapshot(&'a str),
}

impl Service {
    /// This appliance as the bucket's records name it.
    pub(super) fn me(&self) -> Appliance {
        self.appliance.clone()
    }

    /// The head record a snapshot of `v` claims in its store.
    pub(super) fn head_of(&self, v: &VolumeRecord) -> VolumeHead {
        VolumeHead {
            format: bucket::FORMAT,
            volume: v.uuid.clone(),
            name: v.name.clone(),
            volume_bytes: v.size_bytes,
            block_size: v.block_size,
            chunk_bytes: v.chunk_bytes,
            owner: self.me(),
            since: now_secs(),
            adopted_from: None,
            checksum: String::new(),
        }
    }

    /// `volume_adopt`: takes the place of local volume `name` in `store` over for this
    /// appliance (the explicit takeover, once the appliance that owns it is gone for
    /// good: a copy of its state brought up as another appliance, say). The head names
    /// this appliance from now on, and the one before in `adopted_from`; that one's
    /// next snapshot into it is refused. Not while a snapshot of the volume runs.
    pub fn volume_adopt(&self, name: &str, store: &str) -> anyhow::Result<api::Adopted> {
        let spec = self.store(store)?.clone();
        let (record, busy) = {
            let inner = self.inner();
            let live = inner.volume(name)?;
            let record = inner
                .catalogue
                .volumes
                .iter()
                .find(|v| v.name == name)
                .cloned()
                .ok_or_else(|| Refusal::NotFound(format!("no volume named {}", shown(name))))?;
            (record, std::sync::Arc::clone(&live.busy))
        };
        // Held for the adoption, as a snapshot holds it: none begins, and the volume is
        // not deleted, meanwhile.
        if busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(Refusal::Conflict(format!(
                "a snapshot of {} is running (or it is being adopted or deleted): adopt after it ends",
                shown(name)
            ))
            .into());
        }
        struct Release(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Release {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _held = Release(busy);
        // A snapshot cut short and waiting to continue from its journal would publish
        // into the place it began in: let it end first.
        if self.journal_path(name).exists() {
            return Err(Refusal::Conflict(format!(
                "a snapshot of {} is pending (it continues from its journal): adopt after it ends",
                shown(name)
            ))
            .into());
        }
        let prefix = super::snapshot_prefix(name, &record.uuid);
        let me = self.me();
        let by = me.clone();
        let key = prefix.clone();
        let uuid = record.uuid.clone();
        let (before, entered) = self
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = spec.open(&ex)?;
                    let before = bucket::adopt(&*store, &key, Some(&uuid), &by, now_secs()).await?;
                    if before.owner.id == by.id {
                        // Adopted before: nothing changed, nothing to enter.
                        return Ok::<_, ox::OxError>((before, Default::default()));
                    }
                    // What the owner before published and never entered would be in no
                    // catalogue now, and go with this appliance's next retention.
                    // Adopted already whatever this finds: a manifest it cannot read
                    // is reported, not an error.
                    let entered = ox::retention::enter_unlisted(
                        &*store,
                        &key,
                        &before.volume,
                        &before.name,
                        &before.owner,
                    )
                    .await
                    .unwrap_or_else(|e| ox::retention::Entered {
                        entered: Vec::new(),
                        skipped: vec![(key.clone(), format!("not looked through: {e}"))],
                    });
                    Ok((before, entered))
                })
            })?
            .map_err(|e| match e {
                ox::OxError::NotFound { .. } => Refusal::NotFound(format!(
                    "{} has no place in store {} yet (no snapshot of it there): nothing to adopt",
                    shown(name),
                    shown(store)
                ))
                .into(),
                e => anyhow::Error::from(e),
            })
            .with_context(|| format!("adopting {} in store {}", shown(name), shown(store)))?;
        // Adopted before (run again): who was displaced then.
        let from = if before.owner.id == me.id {
            before.adopted_from.unwrap_or(before.owner)
        } else {
            before.owner
        };
        tracing::info!(
            volume = %name,
            store = %store,
            from = %from.id,
            entered = entered.entered.len(),
            "adopted: its snapshots go into the store from this appliance now"
        );
        for (manifest, why) in &entered.skipped {
            tracing::warn!(
                volume = %name,
                key = %manifest,
                error = %why,
                "not entered in the store's catalogue"
            );
        }
        Ok(api::Adopted {
            name: name.to_string(),
            store: store.to_string(),
            prefix,
            owner: named(&me),
            adopted_from: named(&from),
            entered: entered.entered,
            skipped: entered
                .skipped
                .into_iter()
                .map(|(manifest, why)| api::NotEntered { manifest, why })
                .collect(),
        })
    }

    /// `store_browse`: the volumes in `store` and their newest snapshots, or (with
    /// `volume`) a page of one volume's snapshots, newest first, from `after`.
    pub fn store_browse(
        &self,
        store: &str,
        volume: Option<&str>,
        limit: Option<u64>,
        after: Option<&str>,
    ) -> anyhow::Result<api::Browsed> {
        let spec = self.store(store)?.clone();
        let me = self.me();
        let keys: Vec<String> = self.settings.keys.iter().map(|k| k.id.clone()).collect();
        let limit = match limit {
            None => None,
            Some(n @ 1..=1000) => Some(n as usize),
            Some(n) => invalid!("limit must be 1 to {MAX_PAGE}, not {n}"),
        };
        if after.is_some() && volume.is_none() {
            invalid!("after pages through one volume's snapshots: give volume too");
        }
        let (volume, after) = (volume.map(String::from), after.map(String::from));
        let found = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                match volume {
                    None => {
                        let per = limit.unwrap_or(SHOWN_PER_VOLUME);
                        bucket::browse(&*store, per).await.map(Found::All)
                    }
                    Some(v) => {
                        let (prefix, head) = bucket::find(&*store, &v).await?;
                        let page = bucket::snapshots(
                            &*store,
                            &head,
                            &prefix,
                            after.as_deref(),
                            limit.unwrap_or(MAX_PAGE),
                        )
                        .await?;
                        Ok(Found::One(prefix, Box::new(head), page))
                    }
                }
            })
        });
        let found = found?.map_err(|e| refusal_of(e, store))?;
        let shown = |e: &SnapshotEntry| bucket_snapshot(e, &keys);
        Ok(match found {
            Found::All(b) => api::Browsed::Store(api::StoreCatalogue {
                store: store.to_string(),
                appliance: named(&me),
                volumes: b
                    .volumes
                    .iter()
                    .map(|v| api::BrowsedVolume {
                        head: bucket_volume(&v.prefix, &v.head, &me),
                        snapshots: v.snapshots.iter().map(shown).collect(),
                        more: v.more,
                    })
                    .collect(),
                unreadable: b
                    .unreadable
                    .into_iter()
                    .map(|u| api::PlaceSkipped {
                        prefix: u.prefix,
                        reason: u.reason,
                    })
                    .collect(),
            }),
            Found::One(prefix, head, page) => api::Browsed::Volume(api::VolumePage {
                store: store.to_string(),
                head: bucket_volume(&prefix, &head, &me),
                snapshots: page.snapshots.iter().map(shown).collect(),
                next: page.next,
            }),
        })
    }

    /// The manifest key of a snapshot of `volume` (name, identity or prefix) in
    /// `store`, found through the bucket's catalogue alone.
    pub(super) fn find_in_bucket(
        &self,
        store: &str,
        volume: &str,
        which: InBucket<'_>,
    ) -> anyhow::Result<String> {
        let spec = self.store(store)?.clone();
        let volume = volume.to_string();
        let wanted = match which {
            InBucket::Latest => None,
            InBucket::Snapshot(id) => Some(id.to_ascii_lowercase()),
        };
        let found = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                let (prefix, head) = bucket::find(&*store, &volume).await?;
                let entry = match &wanted {
                    None => bucket::latest(&*store, &head, &prefix).await?,
                    Some(id) => bucket::snapshot(&*store, &head, &prefix, id).await?,
                };
                Ok::<_, ox::OxError>((head, entry))
            })
        })?;
        let (head, entry) = found.map_err(|e| refusal_of(e, store))?;
        match entry {
            Some(e) => Ok(e.manifest),
            None => not_found!(
                "volume {} in store {} has no snapshot{}",
                shown(&head.name),
                shown(store),
                match which {
                    InBucket::Latest => String::new(),
                    InBucket::Snapshot(id) => format!(" {}", shown(id)),
                }
            ),
        }
    }
}

impl Service {
    /// Places (`on`) or removes this appliance's hold on the snapshot clone `c` reads,
    /// so that no appliance's retention sweeps it away meanwhile.
    pub(super) fn hold(&self, c: &CloneRecord, on: bool) -> anyhow::Result<()> {
        self.hold_on(&c.store, &c.manifest_key, &c.uuid, &c.name, on)
    }

    /// Places or removes the hold of the clone or volume `name` (identity `holder`)
    /// on snapshot `manifest_key` in `store`.
    pub(super) fn hold_on(
        &self,
        store: &str,
        manifest_key: &str,
        holder: &str,
        name: &str,
        on: bool,
    ) -> anyhow::Result<()> {
        let spec = self.store(store)?.clone();
        let prefix = prefix_of(manifest_key)?;
        let hold = ox::retention::Hold {
            manifest: manifest_key.to_string(),
            appliance: self.me(),
            clone: holder.to_string(),
            since: now_secs(),
        };
        self.cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = spec.open(&ex)?;
                    if on {
                        ox::retention::hold(&*store, &prefix, &hold).await
                    } else {
                        ox::retention::release(&*store, &prefix, &hold.appliance.id, &hold.clone)
                            .await
                    }
                })
            })?
            .with_context(|| format!("the hold of {name} in store {store}"))
    }
}

enum Found {
    All(bucket::Browse),
    One(String, Box<VolumeHead>, bucket::SnapshotPage),
}

/// The bucket's entry for a snapshot this appliance catalogued.
pub(super) fn entry_of(
    s: &SnapshotRecord,
    v: &VolumeRecord,
    me: &Appliance,
    created_ms: u64,
    kek: Option<String>,
) -> SnapshotEntry {
    SnapshotEntry {
        format: bucket::FORMAT,
        snapshot: s.id.clone(),
        volume: v.uuid.clone(),
        name: v.name.clone(),
        manifest: s.manifest_key.clone(),
        parent: s.parent.clone(),
        created_ms,
        volume_bytes: v.size_bytes,
        block_size: v.block_size,
        stored_bytes: s.data_bytes,
        appliance: me.clone(),
        kek,
        checksum: String::new(),
    }
}

/// The prefix a manifest key lies under (`PREFIX ox1/m/ID`).
pub(super) fn prefix_of(manifest_key: &str) -> anyhow::Result<String> {
    manifest_key
        .rfind("ox1/m/")
        .map(|at| manifest_key[..at].to_string())
        .with_context(|| format!("manifest key {manifest_key:?} has an unexpected form"))
}

/// A volume's head record under `prefix`, as `store_browse` shows it to `me`.
fn bucket_volume(prefix: &str, h: &VolumeHead, me: &Appliance) -> api::BucketVolume {
    api::BucketVolume {
        name: h.name.clone(),
        volume: h.volume.clone(),
        prefix: prefix.to_string(),
        size_bytes: h.volume_bytes,
        block_size: h.block_size,
        owner: named(&h.owner),
        owned_here: h.owner.id == me.id,
        since: h.since,
        adopted_from: h.adopted_from.as_ref().map(named),
    }
}

/// A snapshot's entry, as `store_browse` shows it to an appliance with `keys`.
fn bucket_snapshot(e: &SnapshotEntry, keys: &[String]) -> api::BucketSnapshot {
    api::BucketSnapshot {
        id: e.snapshot.clone(),
        manifest_key: e.manifest.clone(),
        parent: e.parent.clone(),
        created: e.created_ms / 1000,
        stored_bytes: e.stored_bytes,
        appliance: named(&e.appliance),
        key: e.kek.clone(),
        key_here: e.kek.as_ref().map(|k| keys.contains(k)),
    }
}

/// What the bucket said, as a refusal where it is one.
fn refusal_of(e: ox::OxError, store: &str) -> anyhow::Error {
    match e {
        ox::OxError::NotFound { key } => {
            Refusal::NotFound(format!("store {}: no {key}", shown(store))).into()
        }
        ox::OxError::Config(m) => Refusal::Invalid(m).into(),
        ox::OxError::Owned { .. } => Refusal::Conflict(e.to_string()).into(),
        e => anyhow::Error::new(e).context(format!("store {}", shown(store))),
    }
}
