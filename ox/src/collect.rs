//! Collection across a bucket: what failed, abandoned or half-deleted snapshots left
//! behind — data objects and index pages no manifest names — deleted in every volume
//! place under a root, whichever appliance wrote them, safe while other appliances
//! write (see [`crate::lease`] for the rules both sides keep).
//!
//! A mark-and-sweep per place: its leases first (a live one, or one that cannot be
//! read, leaves the place alone), then every manifest (each object, index page and
//! working set one names is marked; a manifest that cannot be read leaves the place
//! alone, deleting nothing), then its objects: each unmarked one older than the grace
//! is deleted. Manifests, catalogue entries, heads, tombstones and holds are never
//! deleted here: retiring snapshots is the owner's ([`crate::retention`]).

use std::collections::HashSet;

use crate::error::OxError;
use crate::lease;
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
    /// Requests made: LISTs (pages), GETs (manifests and leases), DELETE batches.
    pub lists: u64,
    /// See `lists`.
    pub gets: u64,
    /// See `lists`.
    pub deletes: u64,
    /// Places left alone, and why (an upload in progress; a manifest that cannot be
    /// read).
    pub skipped: Vec<(String, String)>,
    /// The keys deleted (or that would be).
    pub keys: Vec<String>,
}

/// Collects under `root` (the store's prefix: "" for a whole bucket): every volume
/// place there, and `root` itself if it is one. `now` and `grace` in seconds ([`now`]
/// and [`lease::ORPHAN_GRACE_S`] as the appliance runs it); `dry` deletes nothing.
///
/// [`now`]: lease::now_secs
pub async fn collect(
    store: &dyn ObjectStore,
    root: &str,
    now: u64,
    grace: u64,
    dry: bool,
) -> Result<Collected, OxError> {
    let mut out = Collected::default();
    for place in places(store, root, &mut out).await? {
        out.places += 1;
        collect_place(store, &place, now, grace, dry, &mut out).await?;
    }
    Ok(out)
}

/// The volume places under `root`: `root` itself if it holds `ox1/`, and each prefix
/// one level down that does.
async fn places(
    store: &dyn ObjectStore,
    root: &str,
    out: &mut Collected,
) -> Result<Vec<String>, OxError> {
    let mut found = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .list_page(root, Some("/"), after.as_deref(), 1000)
            .await?;
        out.lists += 1;
        for p in &page.prefixes {
            if *p == format!("{root}ox1/") {
                found.push(root.to_string());
            } else {
                found.push(p.clone());
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    // Prefixes one level down hold `ox1/` or are not volume places (other data): the
    // listing of their objects below finds nothing of ours there.
    Ok(found)
}

async fn collect_place(
    store: &dyn ObjectStore,
    place: &str,
    now: u64,
    grace: u64,
    dry: bool,
    out: &mut Collected,
) -> Result<(), OxError> {
    // Leases before manifests, manifests before objects: a writer that takes its lease
    // after this look stores only objects younger than the grace, and one that
    // publishes after the manifests were read names only those, or objects a manifest
    // read here names too (its parent's).
    let leases = lease::all(store, place).await?;
    out.lists += 1;
    out.gets += leases.len() as u64;
    for (key, l) in &leases {
        let why = match l {
            Ok(l) if l.live(now, grace) => format!(
                "snapshot {} is being written{} (its lease was renewed {})",
                l.snapshot,
                l.appliance
                    .as_deref()
                    .map(|a| format!(" by appliance {a}"))
                    .unwrap_or_default(),
                match now.checked_sub(l.renewed) {
                    Some(ago) => format!("{ago} s ago"),
                    None => format!("{} s ahead of this clock", l.renewed - now),
                }
            ),
            Ok(_) => continue,
            Err(e) => format!("upload lease {key} cannot be read: {e}"),
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
            // Deleted by its owner since the listing: what it named is judged below
            // like anything else no manifest names.
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
    let mut doomed = Vec::new();
    for kind in ["d", "i"] {
        let (objects, pages) = store.list_info(&format!("{place}ox1/{kind}/")).await?;
        out.lists += pages;
        for o in objects {
            if named.contains(&o.key) {
                continue;
            }
            match o.modified {
                Some(t) if t.saturating_add(grace) <= now => {
                    out.bytes += o.size.unwrap_or(0);
                    doomed.push(o.key);
                }
                Some(_) => out.young += 1,
                None => out.ageless += 1,
            }
        }
    }
    out.objects += doomed.len() as u64;
    if !dry && !doomed.is_empty() {
        store.delete(&doomed).await?;
        out.deletes += doomed.len().div_ceil(1000) as u64;
    }
    out.keys.extend(doomed);
    Ok(())
}
