//! The bucket as the catalogue: what another appliance needs to find and open a
//! volume's snapshots, kept in the store beside them, so that the appliance that took
//! them can be lost with all its state.
//!
//! Each volume's prefix holds a head record (`ox1/volume`: name, size, the appliance
//! that owns the prefix) and one small entry per published snapshot
//! (`ox1/s/<order>-<snapshot>`), whose keys sort newest first. Browsing is therefore one
//! paged LIST of the bucket's top level (with a delimiter: one entry per volume, never
//! one per object) and, per volume, one GET of its head, one LIST of at most the entries
//! shown and a GET of each — the same at 10 snapshots or 10,000.
//!
//! One appliance owns a volume's prefix at a time: a snapshot first claims it (creating
//! the head if there is none) and is refused if another appliance owns it; a takeover is
//! explicit ([`adopt`]). Entries are written after their manifest, and are idempotent, so
//! one lost to a crash is written again. Records carry a SHA-256 of themselves, so
//! damage is found, not read; like manifests they are not secret.

use serde::{Deserialize, Serialize};

use crate::error::OxError;
use crate::store::ObjectStore;

/// Format version of head records and snapshot entries.
pub const FORMAT: u32 = 1;

/// Entries fetched at once while browsing.
const GETS_AT_ONCE: usize = 8;

/// An appliance, as records name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Appliance {
    /// Its identity (a UUID kept in its state), never reused.
    pub id: String,
    /// A name for people (its host name).
    pub name: String,
}

/// A volume's head record: `PREFIX ox1/volume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeHead {
    /// Record format.
    pub format: u32,
    /// The volume's identity (UUID), as its snapshots' manifests name it in hex.
    pub volume: String,
    /// Its name on the appliance that owns it.
    pub name: String,
    /// Size.
    pub volume_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Chunk size of its snapshots.
    pub chunk_bytes: u64,
    /// The appliance that writes its snapshots.
    pub owner: Appliance,
    /// When that appliance claimed or adopted it (seconds since the Unix epoch).
    pub since: u64,
    /// The owner before the last adoption, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<Appliance>,
    /// SHA-256 (hex) of the record serialised compactly without this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
}

/// One published snapshot: `PREFIX ox1/s/<order>-<snapshot>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// Record format.
    pub format: u32,
    /// Snapshot ID (hex).
    pub snapshot: String,
    /// The volume's identity.
    pub volume: String,
    /// The volume's name when it was taken.
    pub name: String,
    /// The manifest's key.
    pub manifest: String,
    /// The parent snapshot's ID, for an incremental snapshot.
    pub parent: Option<String>,
    /// When it was published (milliseconds since the Unix epoch); orders the entries.
    pub created_ms: u64,
    /// Volume size.
    pub volume_bytes: u64,
    /// Logical block size.
    pub block_size: u32,
    /// Bytes of frames this snapshot stored itself.
    pub stored_bytes: u64,
    /// The appliance that took it.
    pub appliance: Appliance,
    /// The key-encryption key its data key is wrapped by (`None`: not encrypted, or
    /// not known when the entry was written after the fact).
    pub kek: Option<String>,
    /// SHA-256 (hex) of the entry serialised compactly without this field.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub checksum: String,
}

/// A record that carries a checksum of itself.
trait Sealed: Serialize + for<'de> Deserialize<'de> + Clone {
    fn checksum_mut(&mut self) -> &mut String;

    fn digest(&self) -> String {
        let mut bare = self.clone();
        bare.checksum_mut().clear();
        let bytes = serde_json::to_vec(&bare).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut sealed = self.clone();
        *sealed.checksum_mut() = self.digest();
        serde_json::to_vec_pretty(&sealed).unwrap_or_default()
    }

    fn parse(key: &str, bytes: &[u8]) -> Result<Self, OxError> {
        let mut r: Self = serde_json::from_slice(bytes)
            .map_err(|e| OxError::integrity(key, format!("not a catalogue record: {e}")))?;
        let sum = std::mem::take(r.checksum_mut());
        if sum.is_empty() || sum != r.digest() {
            return Err(OxError::integrity(key, "checksum does not match"));
        }
        *r.checksum_mut() = sum;
        Ok(r)
    }
}

impl Sealed for VolumeHead {
    fn checksum_mut(&mut self) -> &mut String {
        &mut self.checksum
    }
}

impl Sealed for SnapshotEntry {
    fn checksum_mut(&mut self) -> &mut String {
        &mut self.checksum
    }
}

impl VolumeHead {
    fn check(self, key: &str) -> Result<Self, OxError> {
        if self.format != FORMAT {
            return Err(OxError::Format(format!(
                "{key}: catalogue record format {}, this build reads {FORMAT}",
                self.format
            )));
        }
        Ok(self)
    }
}

/// The key of a volume's head record.
pub fn head_key(prefix: &str) -> String {
    format!("{prefix}ox1/volume")
}

/// Where a volume's snapshot entries are.
pub fn entries_prefix(prefix: &str) -> String {
    format!("{prefix}ox1/s/")
}

/// The key of a snapshot's entry: newer entries sort first.
pub fn entry_key(prefix: &str, created_ms: u64, snapshot: &str) -> String {
    format!(
        "{}{:020}-{snapshot}",
        entries_prefix(prefix),
        u64::MAX - created_ms
    )
}

/// The creation time (ms) and snapshot ID an entry's key names (see [`entry_key`]), if
/// it is one: what retention needs of an entry, without reading it.
pub fn parse_entry_key(prefix: &str, key: &str) -> Option<(u64, String)> {
    let rest = key.strip_prefix(&entries_prefix(prefix))?;
    let (order, id) = rest.split_once('-')?;
    if order.len() != 20 || !order.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let created_ms = u64::MAX.checked_sub(order.parse::<u64>().ok()?)?;
    // Canonical (lowercase) IDs only: the manifest key is derived from it.
    let canonical = hex::encode(crate::format::parse_id(id).ok()?);
    (canonical == id).then_some((created_ms, canonical))
}

/// The volume's head, if it has one.
pub async fn head(store: &dyn ObjectStore, prefix: &str) -> Result<Option<VolumeHead>, OxError> {
    Ok(tagged_head(store, prefix).await?.map(|(h, _)| h))
}

/// The volume's head record and its version tag (for a conditional replace).
async fn tagged_head(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Option<(VolumeHead, Option<String>)>, OxError> {
    let key = head_key(prefix);
    match store.get_tagged(&key).await {
        Ok((bytes, tag)) => Ok(Some((VolumeHead::parse(&key, &bytes)?.check(&key)?, tag))),
        Err(OxError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Claims the volume's prefix for `wanted.owner` before a snapshot is written into it:
/// creates its head if it has none, brings it up to date if this appliance owns it
/// already, and refuses ([`OxError::Owned`]) if another appliance does.
pub async fn claim(
    store: &dyn ObjectStore,
    prefix: &str,
    wanted: &VolumeHead,
) -> Result<(), OxError> {
    let key = head_key(prefix);
    // A few times at most: a head created or changed by someone else (an adoption)
    // between our GET and our write is read again and judged; the write is
    // conditional on the head we read, so it never undoes another's change.
    for _ in 0..3 {
        match tagged_head(store, prefix).await? {
            Some((h, _)) if h.owner.id != wanted.owner.id => {
                return Err(OxError::Owned {
                    volume: wanted.name.clone(),
                    owner: h.owner.id,
                    owner_name: h.owner.name,
                });
            }
            Some((h, _)) if h.volume != wanted.volume => {
                return Err(OxError::integrity(
                    &key,
                    format!(
                        "names volume {} where {} was expected",
                        h.volume, wanted.volume
                    ),
                ));
            }
            Some((h, tag)) => {
                let current = VolumeHead {
                    since: h.since,
                    adopted_from: h.adopted_from.clone(),
                    checksum: String::new(),
                    ..wanted.clone()
                };
                let stored = VolumeHead {
                    checksum: String::new(),
                    ..h
                };
                if stored != current {
                    match store
                        .put_if_match(&key, current.to_bytes(), tag.as_deref())
                        .await
                    {
                        Ok(()) => {}
                        // Changed since it was read (gone, where a store says so with
                        // 404): read again and judge.
                        Err(OxError::AlreadyExists { .. } | OxError::NotFound { .. }) => continue,
                        Err(e) => return Err(e),
                    }
                }
                return Ok(());
            }
            None => match store.put_new(&key, wanted.to_bytes()).await {
                Ok(()) => return Ok(()),
                Err(OxError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
            },
        }
    }
    Err(OxError::integrity(&key, "changes under us"))
}

/// Takes a volume's prefix over for `by` (the explicit takeover, after its owner is
/// gone or handed it on): its head names `by` from now on, and the owner before it in
/// `adopted_from`. Returns the head as it was; one `by` owns already is left as it is
/// (so an adoption run again, or retried after a lost answer, keeps who was displaced).
/// `volume`: the identity the head must name (a head of another volume is refused,
/// untouched).
pub async fn adopt(
    store: &dyn ObjectStore,
    prefix: &str,
    volume: Option<&str>,
    by: &Appliance,
    now_secs: u64,
) -> Result<VolumeHead, OxError> {
    let key = head_key(prefix);
    // Conditional on the head read: a concurrent change (another adoption, the owner
    // updating it) is read again, so the last one to write knows what it replaced.
    for _ in 0..3 {
        let (before, tag) = tagged_head(store, prefix)
            .await?
            .ok_or_else(|| OxError::NotFound { key: key.clone() })?;
        if let Some(v) = volume
            && before.volume != v
        {
            return Err(OxError::integrity(
                &key,
                format!("names volume {} where {v} was expected", before.volume),
            ));
        }
        if before.owner.id == by.id {
            return Ok(before);
        }
        let after = VolumeHead {
            owner: by.clone(),
            since: now_secs,
            adopted_from: Some(before.owner.clone()),
            checksum: String::new(),
            ..before.clone()
        };
        match store
            .put_if_match(&key, after.to_bytes(), tag.as_deref())
            .await
        {
            Ok(()) => return Ok(before),
            // Changed since it was read (or gone, where a store says so with 404).
            Err(OxError::AlreadyExists { .. } | OxError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(OxError::integrity(&key, "changes under us"))
}

/// Records a published snapshot in the bucket (idempotent: the same entry may be
/// written again).
pub async fn record(
    store: &dyn ObjectStore,
    prefix: &str,
    entry: &SnapshotEntry,
) -> Result<(), OxError> {
    let key = entry_key(prefix, entry.created_ms, &entry.snapshot);
    store.put(&key, entry.to_bytes()).await
}

/// Removes a snapshot's entry (before its manifest is deleted).
pub async fn forget(store: &dyn ObjectStore, prefix: &str, snapshot: &str) -> Result<(), OxError> {
    let under = entries_prefix(prefix);
    let suffix = format!("-{snapshot}");
    let keys: Vec<String> = store
        .list(&under)
        .await?
        .into_iter()
        .filter(|k| k.ends_with(&suffix))
        .collect();
    store.delete(&keys).await
}

/// A page of a volume's snapshots, newest first.
#[derive(Debug, Clone, Default)]
pub struct SnapshotPage {
    /// The entries.
    pub snapshots: Vec<SnapshotEntry>,
    /// Where the next (older) page begins, if there are more.
    pub next: Option<String>,
}

/// Up to `max` of the volume's snapshots, newest first, from `after` (a page's `next`).
pub async fn snapshots(
    store: &dyn ObjectStore,
    head: &VolumeHead,
    prefix: &str,
    after: Option<&str>,
    max: usize,
) -> Result<SnapshotPage, OxError> {
    let page = store
        .list_page(&entries_prefix(prefix), None, after, max)
        .await?;
    let mut snapshots = Vec::with_capacity(page.keys.len());
    for keys in page.keys.chunks(GETS_AT_ONCE) {
        let gets = keys.iter().map(|k| entry(store, head, prefix, k));
        snapshots.extend(
            join_all(gets)
                .await
                .into_iter()
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    Ok(SnapshotPage {
        snapshots,
        next: page.next,
    })
}

/// The volume's newest snapshot, if it has one.
pub async fn latest(
    store: &dyn ObjectStore,
    head: &VolumeHead,
    prefix: &str,
) -> Result<Option<SnapshotEntry>, OxError> {
    Ok(snapshots(store, head, prefix, None, 1)
        .await?
        .snapshots
        .into_iter()
        .next())
}

/// The volume's snapshot `id`, if it has it (a LIST of its entries, which are
/// ordered by time, not ID).
pub async fn snapshot(
    store: &dyn ObjectStore,
    head: &VolumeHead,
    prefix: &str,
    id: &str,
) -> Result<Option<SnapshotEntry>, OxError> {
    let suffix = format!("-{id}");
    match store
        .list(&entries_prefix(prefix))
        .await?
        .into_iter()
        .find(|k| k.ends_with(&suffix))
    {
        Some(key) => Ok(Some(entry(store, head, prefix, &key).await?)),
        None => Ok(None),
    }
}

/// One entry, checked against its key and its volume: an entry cannot point a reader
/// at another volume's manifest, or at a snapshot it does not name.
async fn entry(
    store: &dyn ObjectStore,
    head: &VolumeHead,
    prefix: &str,
    key: &str,
) -> Result<SnapshotEntry, OxError> {
    let e = SnapshotEntry::parse(key, &store.get(key).await?)?;
    let named = key.rsplit('-').next().unwrap_or_default();
    if e.format != FORMAT {
        return Err(OxError::Format(format!(
            "{key}: catalogue record format {}, this build reads {FORMAT}",
            e.format
        )));
    }
    let manifest = crate::format::parse_id(&e.snapshot)
        .map(|id| crate::format::manifest_key(prefix, &id))
        .ok();
    if e.snapshot != named
        || e.volume != head.volume
        || manifest.as_deref() != Some(e.manifest.as_str())
        || entry_key(prefix, e.created_ms, &e.snapshot) != key
    {
        return Err(OxError::integrity(
            key,
            "the entry does not match its key or its volume",
        ));
    }
    Ok(e)
}

/// A volume found in the bucket.
#[derive(Debug, Clone)]
pub struct VolumeListing {
    /// Its prefix.
    pub prefix: String,
    /// Its head record.
    pub head: VolumeHead,
    /// Its newest snapshots, newest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// Whether it has older ones than those.
    pub more: bool,
}

/// A prefix of the bucket's top level that is not a volume, or whose head is damaged.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// The prefix.
    pub prefix: String,
    /// Why.
    pub reason: String,
}

/// What the bucket holds.
#[derive(Debug, Clone, Default)]
pub struct Browse {
    /// Volumes, in key order.
    pub volumes: Vec<VolumeListing>,
    /// Volume heads that could not be read (damaged, or of a later format).
    pub unreadable: Vec<Unreadable>,
}

/// Every volume in the bucket with its `per_volume` newest snapshots (0: none, and no
/// request for them). Prefixes without a head (other data, or volumes not snapshotted
/// since the catalogue existed) are left out; a damaged head or entry is reported with
/// its volume, never fatal to the others.
pub async fn browse(store: &dyn ObjectStore, per_volume: usize) -> Result<Browse, OxError> {
    let mut out = Browse::default();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_page("", Some("/"), after.as_deref(), 1000)
            .await?;
        for prefix in &page.prefixes {
            let head = match head(store, prefix).await {
                Ok(Some(h)) => h,
                Ok(None) => continue,
                Err(e @ (OxError::Integrity { .. } | OxError::Format(_))) => {
                    out.unreadable.push(Unreadable {
                        prefix: prefix.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let page = match per_volume {
                0 => SnapshotPage::default(),
                n => match snapshots(store, &head, prefix, None, n).await {
                    Ok(p) => p,
                    Err(e @ (OxError::Integrity { .. } | OxError::Format(_))) => {
                        out.unreadable.push(Unreadable {
                            prefix: prefix.clone(),
                            reason: e.to_string(),
                        });
                        SnapshotPage::default()
                    }
                    Err(e) => return Err(e),
                },
            };
            out.volumes.push(VolumeListing {
                prefix: prefix.clone(),
                head,
                more: page.next.is_some(),
                snapshots: page.snapshots,
            });
        }
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

/// The volume called `wanted` (its name, its identity, or its prefix) in the bucket:
/// its prefix and head. A name two volumes share is refused, naming both.
pub async fn find(store: &dyn ObjectStore, wanted: &str) -> Result<(String, VolumeHead), OxError> {
    let found = browse(store, 0).await?;
    let wanted_id = wanted.replace('-', "").to_ascii_lowercase();
    let matches: Vec<_> = found
        .volumes
        .into_iter()
        .filter(|v| {
            v.head.name == wanted
                || v.head.volume.replace('-', "") == wanted_id
                || v.prefix.trim_end_matches('/') == wanted.trim_end_matches('/')
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok((one.prefix.clone(), one.head.clone())),
        [] => Err(OxError::NotFound {
            key: format!("a volume {wanted:?} in the bucket's catalogue"),
        }),
        many => Err(OxError::Config(format!(
            "{} volumes in the bucket are called {wanted:?} ({}): name one by its identity",
            many.len(),
            many.iter()
                .map(|v| v.head.volume.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Runs `futures` together on the current executor; their outputs, in order.
async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, out) in pending.iter_mut().zip(done.iter_mut()) {
            if out.is_none()
                && let std::task::Poll::Ready(v) = f.as_mut().poll(cx)
            {
                *out = Some(v);
            }
        }
        if done.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An entry's key gives back its time and ID; anything else under the entries'
    /// directory gives nothing (and is never retired by reading its key).
    #[test]
    fn entry_keys_give_back_their_time_and_id() {
        let id = "0123456789abcdef0123456789abcdef";
        let key = entry_key("v/", 1_796_428_800_123, id);
        assert_eq!(
            parse_entry_key("v/", &key),
            Some((1_796_428_800_123, id.to_string()))
        );
        assert_eq!(parse_entry_key("w/", &key), None, "another place's");
        for bad in [
            "v/ox1/s/",
            "v/ox1/s/123-0123456789abcdef0123456789abcdef",
            &format!("v/ox1/s/{:020}-{}", 5, "0123456789ABCDEF0123456789ABCDEF"),
            &format!("v/ox1/s/{:020}-{}", 5, "0123"),
            &format!("v/ox1/s/{:020}{}", 5, id),
            &format!("v/ox1/s/99999999999999999999-{id}"),
        ] {
            assert_eq!(parse_entry_key("v/", bad), None, "{bad}");
        }
    }
}
