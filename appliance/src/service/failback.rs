//! Fail-back: a volume over another appliance's snapshot whose local copy starts as a
//! copy of a volume here that holds an ancestor of that snapshot. When appliance B
//! went on from A's snapshot S (a volume over S, snapshotted on top of it into the
//! same store), A makes its volume again from B's newest snapshot T with `seed` naming
//! its old volume: only the chunks T stored since S, and those the old volume's hosts
//! wrote since S, are read from the store; the rest is local, and chunks T holds as
//! zeroes are made zero in the copy.
//!
//! Which chunks T stored since S is read from T's index pages
//! ([`ox::diff::changed_since`]). S is the seed's change base: its last snapshot,
//! wherever it went, which must be in T's lineage. The seed's change tracking says
//! what it changed since S; it is read once the seed is held and again after its file
//! is copied, so a chunk a host wrote meanwhile counts as changed and is fetched, never
//! taken from a copy made while it was written (a write marks its chunk before it is
//! issued). A seed that is itself over a snapshot gives only the chunks it held before
//! the copy began.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use ox::snapshot::Loaded;

use super::Service;
use crate::refusal::{Refusal, conflict, invalid, shown};

/// What seeding a volume's local copy did.
pub(super) struct Seeded {
    seed: String,
    chunks: u64,
    to_fetch: u64,
    changed_there: u64,
    zero_there: u64,
    changed_here: u64,
    copied_bytes: u64,
    index_pages: u64,
    index_bytes: u64,
}

impl Seeded {
    /// As `volume_create` answers it.
    pub(super) fn to_api(&self) -> ox_api::methods::Seeded {
        ox_api::methods::Seeded {
            seed: self.seed.clone(),
            chunks: self.chunks,
            chunks_to_fetch: self.to_fetch,
            changed_in_snapshot: self.changed_there,
            zero_in_snapshot: self.zero_there,
            changed_in_seed: self.changed_here,
            copied_bytes: self.copied_bytes,
            index_pages_read: self.index_pages,
            index_bytes_read: self.index_bytes,
        }
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
    /// The seed's handle, presence (if it is over a snapshot), snapshot flag and
    /// identity, with its geometry checked against snapshot `to`.
    fn seed_of(&self, seed: &str, to: &Loaded) -> anyhow::Result<SeedVolume> {
        let m = &to.manifest;
        let v = self.seed_of_locked(&self.inner(), seed)?;
        if v.geometry != (m.volume_bytes, u64::from(m.chunk_bytes), m.block_size) {
            invalid!(
                "volume {} ({} bytes, chunks of {}, blocks of {}) is not of the snapshot's \
                 geometry ({} bytes, chunks of {}, blocks of {})",
                shown(seed),
                v.geometry.0,
                v.geometry.1,
                v.geometry.2,
                m.volume_bytes,
                m.chunk_bytes,
                m.block_size
            );
        }
        Ok(v)
    }

    /// Makes volume `name`'s local copy (which must not exist yet) from volume `seed`'s
    /// data and writes its presence record: present where `to` (in `store`) holds what
    /// the copy holds, or zeroes (made so in the copy). `to` must descend from the
    /// snapshot `seed`'s changes count from.
    pub(super) fn seed_from(
        &self,
        seed: &str,
        name: &str,
        store: &str,
        to: Loaded,
    ) -> anyhow::Result<Seeded> {
        let first = self.seed_of(seed, &to)?;
        let Some(base) = first.handle.changes().base.map(hex::encode) else {
            invalid!(
                "volume {} has no snapshot its changes count from (never snapshotted, or \
                 its last snapshot attempt was abandoned): it cannot seed until its next \
                 snapshot; or create the volume without seed",
                shown(seed)
            );
        };
        let m = to.manifest.clone();
        if m.snapshot != base && !m.lineage.iter().any(|a| a.snapshot == base) {
            invalid!(
                "snapshot {} does not descend from {base}, the last snapshot of volume {} \
                 (in whichever store it went): it cannot seed",
                m.snapshot,
                shown(seed)
            );
        }
        // Which chunks the snapshot stored after the seed's: from its index, before the
        // seed is held (this part does not depend on the seed's data).
        let spec = self.store(store)?.clone();
        let ancestor = base.clone();
        let changed = self
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let s = spec.open(&ex)?;
                    ox::diff::changed_since(&*s, &to, &ancestor).await
                })
            })?
            .with_context(|| format!("comparing with snapshot {base}"))?;

        // Hold the seed: no snapshot of it starts or ends (moving its change base),
        // and it is not deleted, while it is copied. Taken under the catalogue lock,
        // as a snapshot takes it, and only if it is still the volume looked at.
        let seed_now = {
            let inner = self.inner();
            let now = self.seed_of_locked(&inner, seed)?;
            if now.uuid != first.uuid {
                conflict!("volume {} was replaced meanwhile", shown(seed));
            }
            if now.busy.swap(true, Ordering::SeqCst) {
                conflict!(
                    "volume {} is being snapshotted: seed once that is done",
                    shown(seed)
                );
            }
            now
        };
        let _held = NoSnapshot(Arc::clone(&seed_now.busy));
        let before = seed_now.handle.changes();
        if before.base.map(hex::encode).as_deref() != Some(base.as_str()) {
            conflict!("volume {}'s last snapshot changed meanwhile", shown(seed));
        }
        let chunks = m.chunks();
        // Chunks a seed over a snapshot lacks are holes in its file: not a copy.
        let held: Option<Vec<bool>> = seed_now
            .over
            .as_ref()
            .map(|o| (0..chunks).map(|c| o.is_present(c)).collect());
        let (src, dst) = (self.volume_path(seed), self.volume_path(name));
        let copied_bytes = bdev::fsutil::copy_sparse(&src, &dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        // Every write issued since `before` marked its chunk first: a chunk written
        // during the copy is in `after`, and is fetched.
        let after = seed_now.handle.changes();

        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&dst)
            .with_context(|| format!("{}", dst.display()))?;
        let zero = |(from, to): (u64, u64)| {
            bdev::fsutil::zero_range(&file, from, to - from)
                .with_context(|| format!("zeroing bytes {from}..{to} of {}", dst.display()))
        };
        let chunk_bytes = u64::from(m.chunk_bytes);
        let mut present = vec![0u64; chunks.div_ceil(64) as usize];
        let (mut to_fetch, mut changed_here) = (0, 0);
        // Runs of zero chunks, zeroed a run at a time.
        let mut zeroes: Option<(u64, u64)> = None;
        for c in 0..chunks {
            let here = after.contains(c);
            changed_here += u64::from(here);
            let lacked = held.as_ref().is_some_and(|h| !h[c as usize]);
            if changed.is_zero(c) {
                // Known without the store: zeroes, made so here.
                let at = c * chunk_bytes;
                let end = (at + chunk_bytes).min(m.volume_bytes);
                zeroes = match zeroes {
                    Some((from, to)) if to == at => Some((from, end)),
                    run => {
                        run.map(zero).transpose()?;
                        Some((at, end))
                    }
                };
            } else if changed.is_newer(c) || here || lacked {
                to_fetch += 1;
                continue;
            }
            present[(c / 64) as usize] |= 1 << (c % 64);
        }
        zeroes.map(zero).transpose()?;
        file.sync_all()
            .with_context(|| format!("syncing {}", dst.display()))?;
        drop(file);
        bdev::seed_presence(&self.volume_file(name, "presence"), chunks, &present)?;
        Ok(Seeded {
            seed: seed.to_string(),
            chunks,
            to_fetch,
            changed_there: changed.newer_count(),
            zero_there: changed.zero_count(),
            changed_here,
            copied_bytes,
            index_pages: changed.pages_fetched,
            index_bytes: changed.page_bytes,
        })
    }

    /// [`Service::seed_of`]'s lookup, under the catalogue lock the caller holds.
    fn seed_of_locked(&self, inner: &super::Inner, seed: &str) -> anyhow::Result<SeedVolume> {
        let live = inner.volume(seed)?;
        let record = inner
            .catalogue
            .volumes
            .iter()
            .find(|v| v.name == seed)
            .ok_or_else(|| Refusal::NotFound(format!("no volume named {}", shown(seed))))?;
        Ok(SeedVolume {
            handle: live.handle.clone(),
            over: live.over.clone(),
            busy: Arc::clone(&live.busy),
            uuid: record.uuid.clone(),
            geometry: (record.size_bytes, record.chunk_bytes, record.block_size),
        })
    }
}

/// The volume seeding another, as looked up.
struct SeedVolume {
    handle: bdev::VolumeHandle,
    over: Option<bdev::CloneHandle>,
    busy: Arc<AtomicBool>,
    uuid: String,
    /// Size, chunk and block size in bytes.
    geometry: (u64, u64, u32),
}
