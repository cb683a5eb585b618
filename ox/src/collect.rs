//! Collection across a bucket: what failed, abandoned or half-deleted snapshots left
//! behind — data objects and index pages no manifest names — deleted in every volume
//! place under a root, whichever appliance wrote them, safe while other appliances
//! write (see [`crate::lease`] for the rules both sides keep).
//!
//! A mark-and-sweep per place: its leases first (a live one, or one that cannot be
//! read, leaves the place alone; one older than the grace is deleted), then every
//! manifest (each object, index page and working set one names is marked; a manifest
//! that cannot be read leaves the place alone), then its objects: each unmarked one
//! older than the grace is deleted. Manifests, catalogue entries, heads, tombstones and
//! holds are never deleted here: retiring snapshots is the owner's
//! ([`crate::retention`]).
//!
//! It relies on listings showing an object as soon as its PUT is answered (as AWS S3,
//! Garage and MinIO do): on a store whose listings lag, an upload's lease or a manifest
//! could be missed.

use std::collections::HashSet;

use crate::error::OxError;
use crate::lease::{self, LEASE_DIR, ORPHAN_GRACE_S};
use crate::store::ObjectStore;

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collected {
    /// Volume places looked at (prefixes holding `ox1/`).
    pub places: u64,
    /// Objects deleted (or that would be), and their bytes.
    pub objects: u64,
    /// See `objects`.
    pub bytes: u64,
    /// Objects no manifest names, kept because they are younger than the grace.
    pub young: u64,
    /// Objects no manifest names, kept because the listing gave no age.
    pub ageless: u64,
    /// Leases of uploads gone for longer than the grace, deleted (or that would be).
    pub dead_leases: u64,
    /// Requests made: LISTs (pages), GETs (manifests and leases), DELETE batches.
    pub lists: u64,
    /// See `lists`.
    pub gets: u64,
    /// See `lists`.
    pub deletes: u64,
    /// Places left alone, and why (an upload in progress; a manifest or lease that
    /// cannot be read; a request that failed there).
    pub skipped: Vec<(String, String)>,
    /// The keys deleted (or that would be), leases included.
    pub keys: Vec<String>,
}

/// Collects under `root` (the store's prefix: "" for a whole bucket): every volume
/// place there (`root` itself if it is one, and each prefix one level down that is),
/// at `now` ([`lease::now_secs`]; a test may pass a later time) with the grace
/// [`ORPHAN_GRACE_S`]. `dry` deletes nothing. A request failing in one place leaves
/// that place (it is in `skipped`) and goes on with the next.
pub async fn collect(
    store: &dyn ObjectStore,
    root: &str,
    now: u64,
    dry: bool,
) -> Result<Collected, OxError> {
    let mut out = Collected::default();
    for place in places(store, root, &mut out).await? {
        out.places += 1;
        if let Err(e) = collect_place(store, &place, now, dry, &mut out).await {
            out.skipped.push((place, format!("stopped there: {e}")));
        }
    }
    Ok(out)
}

/// The volume places under `root`: `root` itself if it holds `ox1/`, and each prefix
/// one level down that does (one LIST of each, by "/": other data is not looked into).
async fn places(
    store: &dyn ObjectStore,
    root: &str,
    out: &mut Collected,
) -> Result<Vec<String>, OxError> {
    let ours = format!("{root}ox1/");
    let mut found = Vec::new();
    let mut candidates = Vec::new();
    walk(store, root, out, |p| {
        if p == ours {
            found.push(root.to_string());
        } else {
            candidates.push(p.to_string());
        }
    })
    .await?;
    for p in candidates {
        let ours = format!("{p}ox1/");
        let mut holds = false;
        match walk(store, &p, out, |q| holds |= q == ours).await {
            Ok(()) if holds => found.push(p),
            Ok(()) => {}
            Err(e) => out.skipped.push((p, format!("stopped there: {e}"))),
        }
    }
    Ok(found)
}

/// Every common prefix by "/" under `prefix`, a page at a time (each page counted).
async fn walk(
    store: &dyn ObjectStore,
    prefix: &str,
    out: &mut Collected,
    mut each: impl FnMut(&str),
) -> Result<(), OxError> {
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_page(prefix, Some("/"), after.as_deref(), 1000)
            .await?;
        out.lists += 1;
        page.prefixes.iter().for_each(|p| each(p));
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(()),
        }
    }
}

async fn collect_place(
    store: &dyn ObjectStore,
    place: &str,
    now: u64,
    dry: bool,
    out: &mut Collected,
) -> Result<(), OxError> {
    // Leases before manifests, manifests before objects: a writer that takes its lease
    // after this look stores only objects younger than the grace, and one that
    // publishes after the manifests were read names only those, or objects a manifest
    // read here names too (its parent's).
    let (leases, pages) = store.list_info(&format!("{place}{LEASE_DIR}")).await?;
    out.lists += pages;
    let mut dead = Vec::new();
    for l in &leases {
        out.gets += 1;
        let read = match lease::fetch(store, &l.key).await {
            // Released since the listing: that upload has ended.
            Err(OxError::NotFound { .. }) => continue,
            Err(e @ (OxError::Integrity { .. } | OxError::Format(_))) => Err(e),
            Err(e) => return Err(e),
            Ok(lease) => Ok(lease),
        };
        let why = match read {
            Ok(lease) if lease.live(now, ORPHAN_GRACE_S) => format!(
                "snapshot {} is being written{} (its lease was renewed {})",
                lease.snapshot,
                lease
                    .appliance
                    .as_deref()
                    .map(|a| format!(" by appliance {a}"))
                    .unwrap_or_default(),
                match now.checked_sub(lease.renewed) {
                    Some(ago) => format!("{ago} s ago"),
                    None => format!("{} s ahead of this clock", lease.renewed - now),
                }
            ),
            Ok(_) => {
                dead.push(l.key.clone());
                continue;
            }
            Err(e) => format!("upload lease {} cannot be read: {e}", l.key),
        };
        out.skipped.push((place.to_string(), why));
        return Ok(());
    }
    let mut named = HashSet::new();
    let (manifests, pages) = store.list_info(&format!("{place}ox1/m/")).await?;
    out.lists += pages;
    for m in &manifests {
        out.gets += 1;
        let manifest = match crate::snapshot::fetch_manifest(store, &m.key).await {
            Ok(manifest) => manifest,
            // Deleted by its owner since the listing (retention deletes what a manifest
            // alone needed before the manifest): what it named is judged below like
            // anything else no manifest names.
            Err(OxError::NotFound { .. }) => continue,
            Err(e) => {
                out.skipped.push((
                    place.to_string(),
                    format!("manifest {} cannot be read: {e}", m.key),
                ));
                return Ok(());
            }
        };
        named.extend(manifest.objects.iter().cloned());
        for page in 0..manifest.page_count() {
            named.insert(manifest.page_key(page)?);
        }
        named.insert(manifest.working_set_key()?);
    }
    let (mut doomed, mut bytes) = (Vec::new(), 0);
    for kind in ["d", "i"] {
        let (objects, pages) = store.list_info(&format!("{place}ox1/{kind}/")).await?;
        out.lists += pages;
        for o in objects {
            if named.contains(&o.key) {
                continue;
            }
            match o.modified {
                Some(t) if t.saturating_add(ORPHAN_GRACE_S) <= now => {
                    bytes += o.size.unwrap_or(0);
                    doomed.push(o.key);
                }
                Some(_) => out.young += 1,
                None => out.ageless += 1,
            }
        }
    }
    let (objects, leases) = (doomed.len() as u64, dead.len() as u64);
    // Dead leases go too: each names an upload that ended without releasing it, or
    // one that can publish nothing (a writer whose lease went unrenewed that long
    // refuses to; a resumed one finding it gone or old gives up).
    doomed.extend(dead);
    if !dry && !doomed.is_empty() {
        store.delete(&doomed).await?;
        out.deletes += doomed.len().div_ceil(1000) as u64;
    }
    // Counted once done (a failed delete leaves the place in `skipped`, uncounted).
    out.objects += objects;
    out.bytes += bytes;
    out.dead_leases += leases;
    out.keys.extend(doomed);
    Ok(())
}
