//! Which chunks a snapshot changed since one of its ancestors, read from their index
//! pages alone: what a volume that still holds the ancestor's data needs to fetch to
//! hold the descendant's (fail-back: only the changes move).
//!
//! Two snapshots hold the same bytes for a chunk when their index entries name the same
//! frame — the same source snapshot, object, offset and length — or both say zero. An
//! incremental snapshot copies the entry of every chunk it did not store from its
//! parent, so a chunk untouched between the two compares equal. The converse is not
//! needed: a chunk rewritten with the same bytes compares unequal, and costs a fetch.

use crate::error::OxError;
use crate::format::{Entry, PAGE_CHUNKS};
use crate::snapshot::Loaded;
use crate::store::ObjectStore;

/// The chunks `to` changed since its ancestor `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// One bit per chunk (bit `c % 64` of word `c / 64`), set where `to` may differ.
    pub words: Vec<u64>,
    /// Chunks in the volume.
    pub chunks: u64,
    /// Index pages fetched to tell (both snapshots').
    pub pages_fetched: u64,
    /// Bytes of those pages.
    pub page_bytes: u64,
}

impl Changed {
    /// Whether chunk `c` may differ.
    pub fn contains(&self, c: u64) -> bool {
        self.words
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// How many chunks may differ.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// A frame named the same way whichever snapshot's index names it: its snapshot's ID
/// in place of the index's source number.
#[derive(Debug, PartialEq, Eq)]
enum Frame<'a> {
    Zero,
    Stored {
        snapshot: &'a str,
        object: u32,
        offset: u64,
        length: u32,
    },
}

fn resolve<'a>(loaded: &'a Loaded, chunk: u64, entry: Entry) -> Result<Frame<'a>, OxError> {
    match entry {
        Entry::Zero => Ok(Frame::Zero),
        Entry::Frame {
            source,
            object,
            offset,
            length,
        } => {
            let m = &loaded.manifest;
            let snapshot = match usize::from(source) {
                0 => m.snapshot.as_str(),
                n => m
                    .lineage
                    .get(n - 1)
                    .map(|a| a.snapshot.as_str())
                    .ok_or_else(|| {
                        OxError::integrity(
                            &loaded.manifest_key,
                            format!("chunk {chunk}: source {source} is not in the lineage"),
                        )
                    })?,
            };
            Ok(Frame::Stored {
                snapshot,
                object,
                offset,
                length,
            })
        }
    }
}

/// The chunks `to` changed since `from`, which must be `to` itself or one of its
/// ancestors (in its lineage) and describe a volume of the same geometry. Fetches each
/// stored index page of both once.
pub async fn changed_since(
    store: &dyn ObjectStore,
    from: &Loaded,
    to: &Loaded,
) -> Result<Changed, OxError> {
    let (f, t) = (&from.manifest, &to.manifest);
    if f.volume_bytes != t.volume_bytes || f.chunk_bytes != t.chunk_bytes {
        return Err(OxError::Config(format!(
            "snapshot {} ({} bytes in chunks of {}) and {} ({} bytes in chunks of {}) are not of one volume",
            f.snapshot, f.volume_bytes, f.chunk_bytes, t.snapshot, t.volume_bytes, t.chunk_bytes
        )));
    }
    if f.snapshot != t.snapshot && !t.lineage.iter().any(|a| a.snapshot == f.snapshot) {
        return Err(OxError::Config(format!(
            "snapshot {} does not descend from {}",
            t.snapshot, f.snapshot
        )));
    }
    let chunks = t.chunks();
    let mut changed = Changed {
        words: vec![0; chunks.div_ceil(64) as usize],
        chunks,
        pages_fetched: 0,
        page_bytes: 0,
    };
    if f.snapshot == t.snapshot {
        return Ok(changed);
    }
    for page in 0..t.page_count() {
        let (old, old_bytes) = from.page(store, page, None).await?;
        let (new, new_bytes) = to.page(store, page, None).await?;
        for bytes in [old_bytes, new_bytes] {
            if bytes > 0 {
                changed.pages_fetched += 1;
                changed.page_bytes += bytes as u64;
            }
        }
        if old.entries.len() != new.entries.len() {
            return Err(OxError::integrity(
                &to.manifest_key,
                format!("index page {page} covers another number of chunks than its ancestor's"),
            ));
        }
        for (i, (o, n)) in old.entries.iter().zip(&new.entries).enumerate() {
            let chunk = page * PAGE_CHUNKS + i as u64;
            if resolve(from, chunk, *o)? != resolve(to, chunk, *n)? {
                changed.words[(chunk / 64) as usize] |= 1 << (chunk % 64);
            }
        }
    }
    Ok(changed)
}
