//! Upload leases: a snapshot being written says so in the store, beside the objects it
//! stores, so that collecting what no manifest names ([`crate::collect`]) never deletes
//! what a writer is about to publish — whichever appliance writes, and for however long
//! an upload runs or waits for a restart.
//!
//! The rules, on each side of a grace period `G` ([`ORPHAN_GRACE_S`]):
//! - a writer takes its lease (`PREFIX ox1/u/<snapshot-id>`) before it stores anything,
//!   renews it every [`RENEW_S`] while it writes, and removes it when the snapshot is
//!   published or given up (a snapshot suspended for a restart keeps it);
//! - a collector deletes an object no manifest names only if the object is older than
//!   `G` and no lease in its place was renewed within `G`;
//! - a writer trusts what it stored earlier only while its lease was never left
//!   unrenewed for more than `G / 2` ([`TRUSTED_S`]): a resumed snapshot whose lease is
//!   older (or gone) is given up (its changes go to the next snapshot), and one whose
//!   renewals stalled that long publishes nothing. The other half of `G` is the
//!   clocks' allowance: appliances' clocks may differ by up to `G / 2` (NTP keeps them
//!   far closer).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::OxError;
use crate::store::ObjectStore;

/// Where leases live, under a volume's place.
pub const LEASE_DIR: &str = "ox1/u/";

/// How long an object no manifest names must have been in the store, and its place's
/// leases unrenewed, before a collector deletes it (24 hours).
pub const ORPHAN_GRACE_S: u64 = 24 * 3600;

/// The longest a writer may leave its lease unrenewed and still trust what it stored
/// before (half the grace).
pub const TRUSTED_S: u64 = ORPHAN_GRACE_S / 2;

/// How often a writer renews its lease (10 minutes).
pub const RENEW_S: u64 = 600;

const LEASE_FORMAT: u32 = 1;

/// A writer's lease (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Format (1).
    pub format: u32,
    /// The snapshot being written (hex).
    pub snapshot: String,
    /// The appliance writing it (its identity), where known.
    pub appliance: Option<String>,
    /// When the upload began, and when the lease was last renewed (Unix seconds, the
    /// writer's clock).
    pub started: u64,
    /// See `started`.
    pub renewed: u64,
}

impl Lease {
    /// Whether a collector at `now` must leave the lease's place alone: renewed within
    /// `grace` (or in the future, by a clock ahead of this one).
    pub fn live(&self, now: u64, grace: u64) -> bool {
        self.renewed.saturating_add(grace) > now
    }
}

/// The key of snapshot `snapshot`'s lease under `prefix`.
pub fn key(prefix: &str, snapshot: &str) -> String {
    format!("{prefix}{LEASE_DIR}{snapshot}")
}

/// Takes (or renews) the lease of `snapshot` under `prefix` at `now`.
pub async fn renew(
    store: &dyn ObjectStore,
    prefix: &str,
    snapshot: &str,
    appliance: Option<&str>,
    started: u64,
    now: u64,
) -> Result<Lease, OxError> {
    let lease = Lease {
        format: LEASE_FORMAT,
        snapshot: snapshot.to_string(),
        appliance: appliance.map(str::to_string),
        started,
        renewed: now,
    };
    let bytes =
        serde_json::to_vec(&lease).map_err(|e| OxError::Format(format!("upload lease: {e}")))?;
    store.put(&key(prefix, snapshot), bytes).await?;
    Ok(lease)
}

/// The lease of `snapshot` under `prefix`, if there is one.
pub async fn read(
    store: &dyn ObjectStore,
    prefix: &str,
    snapshot: &str,
) -> Result<Option<Lease>, OxError> {
    let key = key(prefix, snapshot);
    match fetch(store, &key).await {
        Err(OxError::NotFound { .. }) => Ok(None),
        read => read.map(Some),
    }
}

/// The lease at `key`, read again on a fresh connection while it fails its check (a
/// reply damaged on the way is not a damaged lease: taken for one, it would give up an
/// upload that could go on, or leave a place uncollected).
pub async fn fetch(store: &dyn ObjectStore, key: &str) -> Result<Lease, OxError> {
    crate::fetch::checked(store, key, None, None, |bytes| parse(key, &bytes)).await
}

/// Removes the lease of `snapshot` under `prefix` (gone already is not an error).
pub async fn release(store: &dyn ObjectStore, prefix: &str, snapshot: &str) -> Result<(), OxError> {
    store.delete(&[key(prefix, snapshot)]).await
}

/// Every lease under `prefix`, by key: each parsed, or why it could not be (a collector
/// treats a lease it cannot read as live).
pub async fn all(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<(String, Result<Lease, OxError>)>, OxError> {
    let mut out = Vec::new();
    for key in store.list(&format!("{prefix}{LEASE_DIR}")).await? {
        let lease = match fetch(store, &key).await {
            // Released between the listing and the read: nothing runs there now.
            Err(OxError::NotFound { .. }) => continue,
            Err(e @ (OxError::Integrity { .. } | OxError::Format(_))) => Err(e),
            Err(e) => return Err(e),
            Ok(l) => Ok(l),
        };
        out.push((key, lease));
    }
    Ok(out)
}

/// The lease stored at `key`, checked.
pub fn parse(key: &str, bytes: &[u8]) -> Result<Lease, OxError> {
    let lease: Lease = serde_json::from_slice(bytes)
        .map_err(|e| OxError::integrity(format!("upload lease {key}"), e.to_string()))?;
    if lease.format != LEASE_FORMAT {
        return Err(OxError::Format(format!(
            "upload lease {key}: format {} (this build reads {LEASE_FORMAT})",
            lease.format
        )));
    }
    Ok(lease)
}

/// What a writer knows of its own lease: when it last renewed it, by its monotonic
/// clock and by the wall clock (a machine suspended, or a virtual machine paused, stops
/// the first and not the second, nor the collectors' clocks), so it can tell whether it
/// ever left it unrenewed too long.
#[derive(Debug)]
pub struct Held {
    prefix: String,
    snapshot: String,
    appliance: Option<String>,
    started: u64,
    clock: Clock,
    renewed_at: Instant,
    renewed_wall: u64,
    /// Set once a renewal came later than [`TRUSTED_S`] after the one before.
    lapsed: bool,
}

impl Held {
    /// Takes the lease of `snapshot` under `prefix` now. `before`: the lease an earlier
    /// attempt of the same upload held (a resumed one), whose age at this moment counts
    /// as a gap between renewals.
    pub async fn take(
        store: &dyn ObjectStore,
        prefix: &str,
        snapshot: &str,
        appliance: Option<&str>,
        before: Option<&Lease>,
        clock: &Clock,
    ) -> Result<Self, OxError> {
        let now = clock.wall_secs();
        let started = before.map_or(now, |l| l.started);
        renew(store, prefix, snapshot, appliance, started, now).await?;
        Ok(Self {
            prefix: prefix.to_string(),
            snapshot: snapshot.to_string(),
            appliance: appliance.map(str::to_string),
            started,
            clock: clock.clone(),
            renewed_at: clock.monotonic(),
            renewed_wall: now,
            lapsed: before.is_some_and(|l| now.saturating_sub(l.renewed) > TRUSTED_S),
        })
    }

    /// Renews the lease if [`RENEW_S`] have passed since the last renewal.
    pub async fn renew_if_due(&mut self, store: &dyn ObjectStore) -> Result<(), OxError> {
        if self.since_renewed() < RENEW_S {
            return Ok(());
        }
        self.renew(store).await
    }

    /// Renews the lease now.
    pub async fn renew(&mut self, store: &dyn ObjectStore) -> Result<(), OxError> {
        let prefix = self.prefix.clone();
        let snapshot = self.snapshot.clone();
        let appliance = self.appliance.clone();
        renew(
            store,
            &prefix,
            &snapshot,
            appliance.as_deref(),
            self.started,
            self.clock.wall_secs(),
        )
        .await?;
        // Judged by when the renewal before ended, so a slow PUT counts against it.
        self.lapsed |= self.since_renewed() > TRUSTED_S;
        self.renewed_at = self.clock.monotonic();
        self.renewed_wall = self.clock.wall_secs();
        Ok(())
    }

    /// Whether the lease may have looked abandoned to a collector at some point: what
    /// was stored before then may have been collected.
    pub fn lapsed(&self) -> bool {
        self.lapsed || self.since_renewed() > TRUSTED_S
    }

    /// Seconds since the last renewal, by whichever clock says more.
    fn since_renewed(&self) -> u64 {
        let wall = self.clock.wall_secs().saturating_sub(self.renewed_wall);
        let monotonic = self
            .clock
            .monotonic()
            .saturating_duration_since(self.renewed_at);
        monotonic.as_secs().max(wall)
    }
}

/// The clocks a writer judges its lease by: this machine's, or this machine's moved
/// ahead ([`Clock::movable`]), so a test can show what a long pause (a machine
/// suspended, a store stalled for hours) does without waiting for it. Moving it is
/// one atomic add, read once per chunk by a snapshot writer: not on a host's I/O path.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    ahead: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// A clock that [`Clock::advance`] moves ahead (both of its readings).
    pub fn movable() -> Self {
        Self {
            ahead: Some(Arc::default()),
        }
    }

    /// Moves the clock (and every copy of it) `secs` ahead; nothing for the
    /// machine's own.
    pub fn advance(&self, secs: u64) {
        if let Some(a) = &self.ahead {
            a.fetch_add(secs, Ordering::SeqCst);
        }
    }

    fn ahead(&self) -> u64 {
        self.ahead.as_ref().map_or(0, |a| a.load(Ordering::SeqCst))
    }

    /// Seconds since the Unix epoch.
    pub fn wall_secs(&self) -> u64 {
        now_secs().saturating_add(self.ahead())
    }

    /// The monotonic clock's now (at most as far ahead as `Instant` can go).
    pub fn monotonic(&self) -> Instant {
        let now = Instant::now();
        now.checked_add(Duration::from_secs(self.ahead()))
            .unwrap_or(now)
    }
}

/// Seconds since the Unix epoch by this machine's clock.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::local::LocalStore;

    #[test]
    fn a_lease_is_live_within_the_grace_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        async_io::block_on(async {
            let l = renew(&store, "v/", "ab", Some("me"), 100, 200)
                .await
                .unwrap();
            assert_eq!(read(&store, "v/", "ab").await.unwrap(), Some(l.clone()));
            assert!(l.live(200 + 10, 60) && l.live(100, 60), "renewed, or ahead");
            assert!(!l.live(260, 60));
            let listed = all(&store, "v/").await.unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].0, "v/ox1/u/ab");
            store
                .put("v/ox1/u/cd", b"{\"format\":1}".to_vec())
                .await
                .unwrap();
            let listed = all(&store, "v/").await.unwrap();
            assert!(listed[1].1.is_err(), "a damaged lease is reported");
            release(&store, "v/", "ab").await.unwrap();
            release(&store, "v/", "ab").await.unwrap();
            assert_eq!(read(&store, "v/", "ab").await.unwrap(), None);
        });
    }
}
