//! Retiring snapshots and collecting what only they used, in one volume's prefix, by
//! mark and sweep from the bucket's catalogue — safe beside other appliances reading.
//!
//! Snapshots are incremental: a later snapshot's index points into the data objects of
//! its ancestors, and decoding those frames needs each ancestor's manifest (its wrapped
//! data key and object list). So retiring a snapshot is two steps:
//!
//! 1. **Retire** ([`retire`]): its entry leaves the bucket's catalogue (nobody is offered
//!    it any more) and a tombstone records when.
//! 2. **Sweep** ([`sweep`]), at least a grace period later: the live set is every listed
//!    snapshot, every snapshot another appliance holds for a clone (`ox1/h/`), every
//!    tombstone younger than the grace period, and what the caller names (its own
//!    clones). Everything their lineages name is needed. A manifest nobody needs goes,
//!    with its index pages and data objects. A manifest that is needed only as an
//!    ancestor keeps its manifest (its key) and the data objects a live snapshot's index
//!    still points into; its index pages and its other objects go.
//!
//! The grace period covers a reader that found an entry just before it was retired:
//! it has that long to open the snapshot and place its hold. Objects no manifest names
//! (a failed upload's) are not this module's: `ox::snapshot::collect_orphans`, run beside it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::bucket;
use crate::error::OxError;
use crate::format::{self, Entry, Manifest};
use crate::keys::Kek;
use crate::snapshot::{Loaded, load};
use crate::store::ObjectStore;

/// A tombstone: `PREFIX ox1/t/<snapshot-id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    /// The snapshot.
    pub snapshot: String,
    /// When it was retired (Unix seconds).
    pub retired: u64,
}

/// A hold: `PREFIX ox1/h/<appliance>-<clone>`, placed by an appliance that serves a
/// clone of a snapshot in this prefix, removed when the clone is deleted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    /// The snapshot's manifest key.
    pub manifest: String,
    /// Who holds it.
    pub appliance: bucket::Appliance,
    /// The clone (its identity).
    pub clone: String,
    /// When it was placed (Unix seconds).
    pub since: u64,
}

fn tombstone_key(prefix: &str, snapshot: &str) -> String {
    format!("{prefix}ox1/t/{snapshot}")
}

/// The key of a hold.
pub fn hold_key(prefix: &str, appliance: &str, clone: &str) -> String {
    format!("{prefix}ox1/h/{appliance}-{clone}")
}

/// Places a hold on a snapshot for a clone: retention keeps it (and its ancestors)
/// while the hold is there.
pub async fn hold(store: &dyn ObjectStore, prefix: &str, h: &Hold) -> Result<(), OxError> {
    let body = serde_json::to_vec(h).map_err(|e| OxError::Config(e.to_string()))?;
    store
        .put(&hold_key(prefix, &h.appliance.id, &h.clone), body)
        .await
}

/// The holds on snapshots of the volume at `prefix`.
pub async fn holds(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<Hold>, OxError> {
    let mut out = Vec::new();
    for key in store.list(&format!("{prefix}ox1/h/")).await? {
        out.push(parse(&key, &store.get(&key).await?)?);
    }
    Ok(out)
}

/// Removes a hold.
pub async fn release(
    store: &dyn ObjectStore,
    prefix: &str,
    appliance: &str,
    clone: &str,
) -> Result<(), OxError> {
    store.delete(&[hold_key(prefix, appliance, clone)]).await
}

/// Takes snapshots `ids` out of the bucket's catalogue, leaving a tombstone dated
/// `now` for each: a later [`sweep`] collects them.
pub async fn retire(
    store: &dyn ObjectStore,
    prefix: &str,
    ids: &[String],
    now: u64,
) -> Result<(), OxError> {
    for id in ids {
        let t = Tombstone {
            snapshot: id.clone(),
            retired: now,
        };
        let body = serde_json::to_vec(&t).map_err(|e| OxError::Config(e.to_string()))?;
        store.put(&tombstone_key(prefix, id), body).await?;
    }
    let wanted: HashSet<String> = ids.iter().map(|id| format!("-{id}")).collect();
    let entries: Vec<String> = store
        .list(&bucket::entries_prefix(prefix))
        .await?
        .into_iter()
        .filter(|k| k.rfind('-').is_some_and(|at| wanted.contains(&k[at..])))
        .collect();
    store.delete(&entries).await
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Snapshots live (listed, held, within the grace period, or named by the caller).
    pub live: usize,
    /// Manifests kept only as ancestors (their keys).
    pub ancestors: usize,
    /// Manifests deleted.
    pub manifests: usize,
    /// Index pages (and working sets) deleted.
    pub pages: usize,
    /// Data objects deleted.
    pub objects: usize,
    /// Data objects kept for live snapshots' frames although their snapshot is gone.
    pub objects_kept: usize,
    /// LISTs made.
    pub lists: usize,
    /// Index pages read to find live frames.
    pub pages_read: usize,
}

/// Collects what the volume at `prefix` no longer needs (see the module
/// documentation). `also_live`: manifest keys the caller needs (its own clones and
/// unlisted snapshots). Only the volume's owner sweeps, and never while a snapshot of
/// the volume is being written or waits to be continued from its journal.
///
/// Fails, deleting nothing, if a live snapshot cannot be loaded whole (an ancestor's
/// manifest missing or damaged): what it needs is then unknown. A manifest that does
/// not name the snapshot its key does is left alone, and nothing a live snapshot
/// stores or reads is ever deleted, whatever another manifest claims.
pub async fn sweep(
    store: &dyn ObjectStore,
    prefix: &str,
    keks: &[Kek],
    also_live: &[String],
    now: u64,
    grace_s: u64,
) -> Result<Swept, OxError> {
    let mut out = Swept::default();
    let manifest_of = |id: &str| -> Result<String, OxError> {
        Ok(format::manifest_key(prefix, &format::parse_id(id)?))
    };
    // Mark: what is live.
    let mut live: BTreeSet<String> = also_live
        .iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    for key in store.list(&bucket::entries_prefix(prefix)).await? {
        let id = key.rsplit('-').next().unwrap_or_default();
        live.insert(manifest_of(id)?);
    }
    for h in holds(store, prefix).await? {
        if h.manifest.starts_with(prefix) {
            live.insert(h.manifest);
        }
    }
    let mut tombstones = BTreeMap::new();
    for key in store.list(&format!("{prefix}ox1/t/")).await? {
        let t: Tombstone = parse(&key, &store.get(&key).await?)?;
        if now < t.retired.saturating_add(grace_s) {
            live.insert(manifest_of(&t.snapshot)?);
        }
        tombstones.insert(manifest_of(&t.snapshot)?, key);
    }
    // Every manifest in the prefix, read once: one that names another snapshot than
    // its key is nobody's to judge; one younger than the grace period and not retired
    // is live (its entry may not be written yet).
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut foreign = 0usize;
    for key in store.list(&format!("{prefix}ox1/m/")).await? {
        let m = match crate::snapshot::fetch_manifest(store, &key).await {
            Ok(m) => m,
            Err(OxError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        if manifest_of(&m.snapshot).ok().as_deref() != Some(key.as_str()) {
            foreign += 1;
            continue;
        }
        if now < m.created.saturating_add(grace_s) && !tombstones.contains_key(&key) {
            live.insert(key.clone());
        }
        manifests.insert(key, m);
    }
    let present: HashSet<String> = store
        .list(&format!("{prefix}ox1/d/"))
        .await?
        .into_iter()
        .chain(store.list(&format!("{prefix}ox1/i/")).await?)
        .collect();
    out.lists += 6;
    // Every live snapshot loaded whole, or no sweep at all.
    let mut loaded: Vec<Loaded> = Vec::new();
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for key in &live {
        if !manifests.contains_key(key) {
            // Listed or held, but its manifest is gone (or names another snapshot):
            // nothing of it to keep.
            continue;
        }
        let l = load(store, key, keks).await?;
        needed.insert(key.clone());
        needed.extend(l.manifest.lineage.iter().map(|a| a.manifest.clone()));
        loaded.push(l);
    }
    out.live = loaded.len();
    let ancestors: BTreeSet<&String> = manifests
        .keys()
        .filter(|k| needed.contains(*k) && !live.contains(*k))
        .collect();
    out.ancestors = ancestors.len();
    // What must stay whatever any manifest says: everything live snapshots store, and
    // the objects of ancestors their frames point into.
    let mut protected: HashSet<String> = HashSet::new();
    let mut in_use: HashSet<(String, u32)> = HashSet::new();
    for l in &loaded {
        protected.extend(l.manifest.objects.iter().cloned());
        protected.extend(stored_pages(&l.manifest)?);
        if ancestors.is_empty() {
            continue;
        }
        for page in 0..l.manifest.page_count() {
            if l.manifest.page_is_empty(page) {
                continue;
            }
            let (p, _) = l.page(store, page, None).await?;
            out.pages_read += 1;
            for e in p.entries {
                if let Entry::Frame { source, object, .. } = e {
                    let Some(s) = l.sources.get(usize::from(source)) else {
                        continue;
                    };
                    if let Some(o) = s.objects.get(object as usize) {
                        protected.insert(o.clone());
                    }
                    let m = match source {
                        0 => &l.manifest_key,
                        s => match l.manifest.lineage.get(usize::from(s) - 1) {
                            Some(a) => &a.manifest,
                            None => continue,
                        },
                    };
                    if ancestors.contains(m) {
                        in_use.insert((m.clone(), object));
                    }
                }
            }
        }
    }
    // Sweep.
    for (key, m) in &manifests {
        if live.contains(key) {
            continue;
        }
        let mut pages = stored_pages(m)?;
        pages.retain(|k| present.contains(k) && !protected.contains(k));
        out.pages += pages.len();
        store.delete(&pages).await?;
        let keep_key = ancestors.contains(key);
        let mut gone = Vec::new();
        for (i, object) in m.objects.iter().enumerate() {
            if !present.contains(object) {
                continue;
            }
            if protected.contains(object) || (keep_key && in_use.contains(&(key.clone(), i as u32)))
            {
                out.objects_kept += 1;
            } else {
                gone.push(object.clone());
            }
        }
        out.objects += gone.len();
        store.delete(&gone).await?;
        if !keep_key {
            store.delete(std::slice::from_ref(key)).await?;
            out.manifests += 1;
            if let Some(t) = tombstones.get(key) {
                store.delete(std::slice::from_ref(t)).await?;
            }
        }
    }
    if foreign > 0 {
        tracing::warn!(
            "{prefix}: {foreign} manifest(s) name another snapshot than their key; left alone"
        );
    }
    Ok(out)
}

/// The index pages a manifest stored, and the key of its working set (which it may
/// not have stored: callers keep only keys the store lists).
fn stored_pages(m: &Manifest) -> Result<Vec<String>, OxError> {
    let mut keys: Vec<String> = (0..m.page_count())
        .filter(|p| !m.page_is_empty(*p))
        .map(|p| m.page_key(p))
        .collect::<Result<_, _>>()?;
    keys.push(m.working_set_key()?);
    Ok(keys)
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, OxError> {
    serde_json::from_slice(bytes).map_err(|e| OxError::integrity(key, format!("not a record: {e}")))
}

/// What [`enter_unlisted`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Entered {
    /// Snapshots entered.
    pub entered: Vec<String>,
    /// Manifests left out, and why (not whole: a sweep kept only the key of an
    /// ancestor; unreadable; another volume's).
    pub skipped: Vec<(String, String)>,
}

/// Enters in the bucket's catalogue every snapshot published under `prefix` that is
/// neither listed nor retired (its entry was never written: a crash between manifest
/// and entry, an entry's write that failed, left for its appliance's next snapshot to
/// write) and is whole (every index page and data object it stores is there). For a
/// new owner of the volume (an adoption): the old owner will write no more entries,
/// and a snapshot in no catalogue would be collected by the new owner's retention.
/// Entered as `by` (the appliance that took it: the owner before), for volume
/// `volume` (its UUID) named `name`. A manifest that cannot be read is skipped, not
/// an error: what was adopted stays adopted.
pub async fn enter_unlisted(
    store: &dyn ObjectStore,
    prefix: &str,
    volume: &str,
    name: &str,
    by: &bucket::Appliance,
) -> Result<Entered, OxError> {
    // Snapshot IDs end entry keys (`…-ID`) and tombstone keys (`…/ID`).
    let ids = async |under: String, after: char| -> Result<HashSet<String>, OxError> {
        Ok(store
            .list(&under)
            .await?
            .iter()
            .filter_map(|k| k.rsplit(after).next().map(str::to_string))
            .collect())
    };
    let listed = ids(bucket::entries_prefix(prefix), '-').await?;
    let retired = ids(format!("{prefix}ox1/t/"), '/').await?;
    let present: HashSet<String> = store
        .list(&format!("{prefix}ox1/d/"))
        .await?
        .into_iter()
        .chain(store.list(&format!("{prefix}ox1/i/")).await?)
        .collect();
    let volume_hex: String = volume
        .chars()
        .filter(|c| *c != '-')
        .collect::<String>()
        .to_lowercase();
    let mut out = Entered::default();
    for key in store.list(&format!("{prefix}ox1/m/")).await? {
        let Some(id) = key.rsplit('/').next() else {
            continue;
        };
        if listed.contains(id) || retired.contains(id) {
            continue;
        }
        // Only what is at its own key: a snapshot's manifest, not stray objects.
        let own = format::parse_id(id)
            .map(|parsed| format::manifest_key(prefix, &parsed) == key)
            .unwrap_or(false);
        if !own {
            out.skipped.push((key, "not a manifest's key".into()));
            continue;
        }
        let m = match crate::snapshot::fetch_manifest(store, &key).await {
            Ok(m) => m,
            Err(e) => {
                out.skipped.push((key, e.to_string()));
                continue;
            }
        };
        if m.snapshot != id || m.volume != volume_hex {
            out.skipped.push((key, "another snapshot or volume".into()));
            continue;
        }
        let mut needed = stored_pages(&m)?;
        needed.pop(); // its working set, which it need not have
        needed.extend(m.objects.iter().cloned());
        if let Some(gone) = needed.iter().find(|k| !present.contains(*k)) {
            out.skipped
                .push((key, format!("not whole: {gone} is gone")));
            continue;
        }
        let entry = bucket::SnapshotEntry {
            format: bucket::FORMAT,
            snapshot: m.snapshot.clone(),
            volume: volume.to_string(),
            name: name.to_string(),
            manifest: key.clone(),
            parent: m.parent.clone(),
            created_ms: m.created.saturating_mul(1000),
            volume_bytes: m.volume_bytes,
            block_size: m.block_size,
            stored_bytes: m.stored_bytes,
            appliance: by.clone(),
            kek: m.key.as_ref().map(|k| k.kek_id.clone()),
            checksum: String::new(),
        };
        bucket::record(store, prefix, &entry).await?;
        out.entered.push(m.snapshot);
    }
    Ok(out)
}
