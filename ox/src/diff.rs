//! How a snapshot's chunks stand against one of its ancestors, read from its own index
//! pages alone: what a volume that still holds the ancestor's data needs to fetch to
//! hold the snapshot's (fail-back: only the changes move).
//!
//! An incremental snapshot either stores a chunk itself or copies its parent's entry,
//! and its lineage lists its ancestors newest first. So where the snapshot's entry
//! names a frame of the ancestor or of an older snapshot, no snapshot in between stored
//! that chunk, and the ancestor's entry names the same frame: the same bytes. Where it
//! names a frame stored after the ancestor, the chunk changed. Where it says zero, the
//! bytes are known without a fetch. The ancestor's own index is not needed (its pages
//! may be gone: retention keeps a retired ancestor's manifest and frames, not its
//! index).

use crate::error::OxError;
use crate::format::{Entry, PAGE_CHUNKS};
use crate::snapshot::Loaded;
use crate::store::ObjectStore;

/// A snapshot's chunks against one of its ancestors, one bit per chunk (bit `c % 64`
/// of word `c / 64`) in each set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Chunks whose frame was stored after the ancestor: their bytes must be fetched.
    pub newer: Vec<u64>,
    /// Chunks the snapshot holds as zeroes.
    pub zero: Vec<u64>,
    /// Chunks in the volume.
    pub chunks: u64,
    /// Index pages fetched.
    pub pages_fetched: u64,
    /// Bytes of those pages.
    pub page_bytes: u64,
}

fn has(words: &[u64], c: u64) -> bool {
    words
        .get((c / 64) as usize)
        .is_some_and(|w| w & (1 << (c % 64)) != 0)
}

fn count(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl Changed {
    /// Whether chunk `c`'s frame was stored after the ancestor.
    pub fn is_newer(&self, c: u64) -> bool {
        has(&self.newer, c)
    }

    /// Whether chunk `c` is zeroes.
    pub fn is_zero(&self, c: u64) -> bool {
        has(&self.zero, c)
    }

    /// Chunks whose frame was stored after the ancestor.
    pub fn newer_count(&self) -> u64 {
        count(&self.newer)
    }

    /// Chunks that are zeroes.
    pub fn zero_count(&self) -> u64 {
        count(&self.zero)
    }
}

/// How the chunks of `to` stand against its ancestor `ancestor` (a snapshot ID: `to`
/// itself or one in its lineage). Fetches each stored index page of `to` once.
pub async fn changed_since(
    store: &dyn ObjectStore,
    to: &Loaded,
    ancestor: &str,
) -> Result<Changed, OxError> {
    let m = &to.manifest;
    // Sources at or past this one are the ancestor or older (source 0 is `to`,
    // source n is `lineage[n - 1]`, newest first).
    let oldest_new = if m.snapshot == ancestor {
        0
    } else {
        match m.lineage.iter().position(|a| a.snapshot == ancestor) {
            Some(i) => i + 1,
            None => {
                return Err(OxError::Config(format!(
                    "snapshot {} does not descend from {ancestor}",
                    m.snapshot
                )));
            }
        }
    };
    let chunks = m.chunks();
    let words = chunks.div_ceil(64) as usize;
    let mut changed = Changed {
        newer: vec![0; words],
        zero: vec![0; words],
        chunks,
        pages_fetched: 0,
        page_bytes: 0,
    };
    for page in 0..m.page_count() {
        let (index, bytes) = to.page(store, page, None).await?;
        if bytes > 0 {
            changed.pages_fetched += 1;
            changed.page_bytes += bytes as u64;
        }
        for (i, entry) in index.entries.iter().enumerate() {
            let chunk = page * PAGE_CHUNKS + i as u64;
            let (w, bit) = ((chunk / 64) as usize, 1 << (chunk % 64));
            match *entry {
                Entry::Frame { source, .. } if usize::from(source) > m.lineage.len() => {
                    return Err(OxError::integrity(
                        &to.manifest_key,
                        format!("chunk {chunk}: source {source} is not in the lineage"),
                    ));
                }
                Entry::Zero => changed.zero[w] |= bit,
                Entry::Frame { source, .. } if usize::from(source) < oldest_new => {
                    changed.newer[w] |= bit;
                }
                Entry::Frame { .. } => {}
            }
        }
    }
    Ok(changed)
}
