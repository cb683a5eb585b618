//! What the metrics exporter reads of the service, as types: a field renamed or
//! dropped here fails to compile where it is read, instead of exporting 0 (as reading
//! the control API's JSON by field name did).

use std::sync::atomic::Ordering;

use bdev::{FetchReason, LatencyHistogram};

use super::StoreSpec;
use super::{LiveClone, Service, now_secs};
use crate::health::CloneTotals;

/// A live clone's hydration and traffic: this opening's counters (what the metrics'
/// counters export: they start from zero with each run, as Prometheus expects), and
/// the same over the clone's whole life (`lifetime`: what it counted before, kept in the
/// health file, plus these), which `clone_get` shows.
pub struct CloneView {
    pub name: String,
    pub chunks_present: u64,
    pub chunks_total: u64,
    pub host_read_bytes: u64,
    /// Bytes made present, by reason: client misses, prefetch (read-ahead and the
    /// working set), thickening.
    pub fetched_bytes: [(&'static str, u64); 3],
    /// Frames and index pages fetched from the store, and their bytes.
    pub gets: u64,
    pub object_bytes: u64,
    pub integrity_failures: u64,
    pub refetches: u64,
    /// Client miss to chunk present.
    pub miss_latency: LatencyHistogram,
    /// The counters above over the clone's whole life.
    pub lifetime: CloneTotals,
}

impl CloneView {
    pub(super) fn of(name: &str, l: &LiveClone) -> Self {
        let (present, total) = l.handle.hydration();
        let k = l.handle.counters();
        let b = l.basis.counters();
        let r = |why: FetchReason| k.fetched_bytes[why.index()].load(Ordering::Relaxed);
        let now = CloneTotals {
            host_read_bytes: l.handle.host_read_bytes(),
            client_miss_bytes: r(FetchReason::ClientMiss),
            prefetch_bytes: r(FetchReason::Prefetch),
            thickening_bytes: r(FetchReason::Thickening),
            gets: b.frame_gets.load(Ordering::Relaxed) + b.page_gets.load(Ordering::Relaxed),
            object_bytes: b.frame_bytes.load(Ordering::Relaxed)
                + b.page_bytes.load(Ordering::Relaxed),
            integrity_failures: b.integrity.failures.load(Ordering::Relaxed),
            refetches: b.integrity.refetches.load(Ordering::Relaxed),
        };
        Self {
            name: name.to_string(),
            chunks_present: present,
            chunks_total: total,
            host_read_bytes: now.host_read_bytes,
            fetched_bytes: fetched(&now),
            gets: now.gets,
            object_bytes: now.object_bytes,
            integrity_failures: now.integrity_failures,
            refetches: now.refetches,
            miss_latency: k.miss_latency.snapshot(),
            lifetime: l.base.plus(now),
        }
    }

    /// Share of the clone's chunks present locally (1 for an empty one).
    pub fn hydration(&self) -> f64 {
        if self.chunks_total == 0 {
            1.0
        } else {
            self.chunks_present as f64 / self.chunks_total as f64
        }
    }
}

/// Bytes made present by reason, named as the API and the metrics name them.
pub fn fetched(t: &CloneTotals) -> [(&'static str, u64); 3] {
    [
        ("client_miss", t.client_miss_bytes),
        ("prefetch", t.prefetch_bytes),
        ("thickening", t.thickening_bytes),
    ]
}

/// What an S3 store's requests met since the daemon started.
pub struct StoreTroubles {
    pub store: String,
    /// Retries after a retryable failure, by kind (`slow_down`, `server_error`, ...).
    pub retries: Vec<(&'static str, u64)>,
    /// Requests that failed for good, by kind (`unavailable`, `refused`, `untrusted`).
    pub failures: Vec<(&'static str, u64)>,
}

/// A volume's catalogued snapshots.
pub struct SnapshotTotals {
    pub volume: String,
    pub snapshots: u64,
    /// Bytes they stored (data and metadata).
    pub stored_bytes: u64,
    /// How long the newest of them whose duration is known took, in milliseconds.
    pub last_duration_ms: Option<u64>,
}

/// What a volume's protection policy did since the daemon started, and its RPO now.
pub struct PolicyView {
    pub volume: String,
    /// When its newest snapshot was taken (Unix seconds), and its age now.
    pub last_success: Option<u64>,
    pub rpo_s: Option<u64>,
    pub runs: u64,
    pub failures: u64,
    pub retired: u64,
    pub swept_objects: u64,
}

impl Service {
    /// The live clones, by name.
    pub fn clone_views(&self) -> Vec<CloneView> {
        let inner = self.inner();
        let mut v: Vec<CloneView> = inner
            .clones
            .iter()
            .map(|(name, l)| CloneView::of(name, l))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Catalogued snapshots per volume, by volume name.
    pub fn snapshot_totals(&self) -> Vec<SnapshotTotals> {
        let mut by: std::collections::BTreeMap<&str, SnapshotTotals> = Default::default();
        let inner = self.inner();
        // Oldest first: the last duration known is the newest's.
        for s in &inner.catalogue.snapshots {
            let t = by
                .entry(s.volume.as_str())
                .or_insert_with(|| SnapshotTotals {
                    volume: s.volume.clone(),
                    snapshots: 0,
                    stored_bytes: 0,
                    last_duration_ms: None,
                });
            t.snapshots += 1;
            t.stored_bytes += s.data_bytes + s.meta_bytes;
            if s.duration_ms > 0 {
                t.last_duration_ms = Some(s.duration_ms);
            }
        }
        by.into_values().collect()
    }

    /// Each protected volume's policy.
    pub fn policy_views(&self) -> Vec<PolicyView> {
        let policies = self.inner().catalogue.policies.clone();
        let now = now_secs();
        policies
            .iter()
            .map(|p| {
                let newest = self.newest_snapshot(&p.volume, &p.store).map(|(_, t)| t);
                let s = self.policy_status(&p.volume);
                PolicyView {
                    volume: p.volume.clone(),
                    last_success: newest,
                    rpo_s: newest.map(|t| now.saturating_sub(t)),
                    runs: s.runs,
                    failures: s.failures,
                    retired: s.retired,
                    swept_objects: s.swept_objects,
                }
            })
            .collect()
    }

    /// What each S3 store's requests met, by store name: retries after a retryable
    /// failure and requests that failed for good, each by kind.
    pub fn store_troubles(&self) -> Vec<StoreTroubles> {
        let mut v: Vec<StoreTroubles> = self
            .settings
            .stores
            .iter()
            .filter_map(|(name, spec)| match spec {
                StoreSpec::S3(c) => Some(StoreTroubles {
                    store: name.clone(),
                    retries: c.retry_log.by_kind().map(|(k, n)| (k.name(), n)).to_vec(),
                    failures: c.retry_log.failures().map(|(k, n)| (k.name(), n)).to_vec(),
                }),
                StoreSpec::Local(_) => None,
            })
            .collect();
        v.sort_by(|a, b| a.store.cmp(&b.store));
        v
    }

    /// How many transfers of each volume (or clone) wait on the bandwidth limits now,
    /// by class (`foreground`, `background`); only those with some.
    pub fn throttle_waiting(&self) -> Vec<(String, &'static str, u64)> {
        self.settings
            .throttle
            .waiting_now()
            .into_iter()
            .map(|(volume, class, n)| (volume, class_name(class), n))
            .collect()
    }

    /// What each volume's (or clone's) store traffic waited on the bandwidth limits,
    /// by class (`foreground`, `background`).
    pub fn throttle_waits(&self) -> Vec<(String, &'static str, ox::throttle::Waited)> {
        self.settings
            .throttle
            .waited()
            .into_iter()
            .map(|(volume, class, w)| (volume, class_name(class), w))
            .collect()
    }
}

/// A bandwidth class as metrics name it.
fn class_name(class: ox::throttle::Class) -> &'static str {
    match class {
        ox::throttle::Class::Foreground => "foreground",
        ox::throttle::Class::Background => "background",
    }
}
