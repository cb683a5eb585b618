//! Fail-back: a volume over another appliance's snapshot whose local copy starts as a
//! copy of a volume here that holds an ancestor of that snapshot. When appliance B
//! went on from A's snapshot S (a volume over S, snapshotted on top of it into the
//! same store), A makes its volume again from B's newest snapshot T with `seed` naming
//! its old volume: only the chunks T changed since S, and those the old volume changed
//! since S, are read from the store; the rest is local.
//!
//! Which chunks T changed is read from the two snapshots' index pages
//! ([`ox::diff::changed_since`]). The seed's change tracking says what it changed since
//! S; it is read before its file is copied and again after, so a chunk a host wrote
//! meanwhile counts as changed and is fetched, never taken from a copy made while it
//! was written (a write marks its chunk before it is issued). A seed that is itself
//! over a snapshot gives only the chunks it held before the copy began.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use ox::snapshot::Loaded;
use serde_json::{Value, json};

use super::Service;
use crate::refusal::{Refusal, conflict, invalid, shown};

/// What seeding a volume's local copy did.
pub(super) struct Seeded {
    seed: String,
    chunks: u64,
    to_fetch: u64,
    changed_there: u64,
    changed_here: u64,
    copied_bytes: u64,
    index_pages: u64,
    index_bytes: u64,
}

impl Seeded {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "seed": self.seed,
            "chunks": self.chunks,
            "chunks_to_fetch": self.to_fetch,
            "changed_in_snapshot": self.changed_there,
            "changed_in_seed": self.changed_here,
            "copied_bytes": self.copied_bytes,
            "index_pages_read": self.index_pages,
            "index_bytes_read": self.index_bytes,
        })
    }
}

/// Holds a volume's snapshot flag, so no snapshot of it starts (or ends, moving its
/// change base) while it seeds another; released on drop.
struct NoSnapshot(Arc<AtomicBool>);

impl Drop for NoSnapshot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Service {
    /// Makes volume `name`'s local copy (which must not exist yet) from volume `seed`'s
    /// data and writes its presence record: present where `to` (in `store`) holds what
    /// the copy holds. `to` must descend from the snapshot `seed`'s changes count from.
    pub(super) fn seed_from(
        &self,
        seed: &str,
        name: &str,
        store: &str,
        to: Loaded,
    ) -> anyhow::Result<Seeded> {
        let m = to.manifest.clone();
        let (handle, over, busy, size, chunk_bytes, block_size) = {
            let inner = self.inner();
            let live = inner.volume(seed)?;
            let record = inner
                .catalogue
                .volumes
                .iter()
                .find(|v| v.name == seed)
                .ok_or_else(|| Refusal::NotFound(format!("no volume named {}", shown(seed))))?;
            (
                live.handle.clone(),
                live.over.clone(),
                Arc::clone(&live.busy),
                record.size_bytes,
                record.chunk_bytes,
                record.block_size,
            )
        };
        if (size, chunk_bytes, block_size)
            != (m.volume_bytes, u64::from(m.chunk_bytes), m.block_size)
        {
            invalid!(
                "volume {seed} ({size} bytes, chunks of {chunk_bytes}, blocks of {block_size}) \
                 is not of the snapshot's geometry ({} bytes, chunks of {}, blocks of {})",
                m.volume_bytes,
                m.chunk_bytes,
                m.block_size
            );
        }
        if busy.swap(true, Ordering::SeqCst) {
            conflict!("volume {seed} is being snapshotted: seed once that is done");
        }
        let _no_snapshot = NoSnapshot(busy);
        let before = handle.changes();
        let Some(base) = before.base.map(hex::encode) else {
            invalid!(
                "volume {seed} does not know which snapshot its changes count from (never \
                 snapshotted, or restarted after a crash): it cannot seed; create the volume \
                 without seed"
            );
        };
        let ancestor = if m.snapshot == base {
            None
        } else {
            match m.lineage.iter().find(|a| a.snapshot == base) {
                Some(a) => Some(a.manifest.clone()),
                None => invalid!(
                    "snapshot {} does not descend from {base}, the last snapshot of volume \
                     {seed} (in store {store}): it cannot seed",
                    m.snapshot
                ),
            }
        };
        let chunks = m.chunks();
        // Chunks a seed over a snapshot lacks are holes in its file: not a copy.
        let held: Option<Vec<bool>> = over.map(|o| (0..chunks).map(|c| o.is_present(c)).collect());

        let changed = match ancestor {
            None => None,
            Some(key) => {
                let from = self.load(store, &key)?;
                let spec = self.store(store)?.clone();
                let diff = self.cores.run(move |ex| {
                    Box::pin(async move {
                        let s = spec.open(&ex)?;
                        ox::diff::changed_since(&*s, &from, &to).await
                    })
                })?;
                Some(diff.with_context(|| format!("comparing with snapshot {base}"))?)
            }
        };
        let (src, dst) = (self.volume_path(seed), self.volume_path(name));
        let copied_bytes = bdev::fsutil::copy_sparse(&src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        let after = handle.changes();
        if after.base != before.base {
            conflict!("volume {seed}'s change base moved while it was copied");
        }

        let mut present = vec![0u64; chunks.div_ceil(64) as usize];
        let (mut to_fetch, mut changed_there, mut changed_here) = (0, 0, 0);
        for c in 0..chunks {
            let there = changed.as_ref().is_some_and(|d| d.contains(c));
            let here = before.contains(c) || after.contains(c);
            let lacked = held.as_ref().is_some_and(|h| !h[c as usize]);
            changed_there += u64::from(there);
            changed_here += u64::from(here);
            if there || here || lacked {
                to_fetch += 1;
            } else {
                present[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        bdev::seed_presence(&self.volume_file(name, "presence"), chunks, &present)?;
        Ok(Seeded {
            seed: seed.to_string(),
            chunks,
            to_fetch,
            changed_there,
            changed_here,
            copied_bytes,
            index_pages: changed.as_ref().map_or(0, |d| d.pages_fetched),
            index_bytes: changed.as_ref().map_or(0, |d| d.page_bytes),
        })
    }
}
