//! Protection policies as the appliance runs them: a thread that starts each volume's
//! snapshot when its policy says it is due (at once after a start that missed runs),
//! never while one of that volume is running, and after each success applies the
//! policy's retention — the snapshots it no longer keeps leave the store's catalogue
//! and what nothing needs any more is swept (`ox::retention`). What to do when is
//! `ox::policy`'s (pure); this module does it.
//!
//! The thread waits for the next due time or for an event (a policy set or deleted, a
//! snapshot ended, a stop), whichever comes first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ox::policy::Policy;
use ox_api::methods as api;
use serde_json::{Value, json};

use super::{Service, bucket, now_secs};
use crate::refusal::{Refusal, invalid, not_found, shown};

/// How long a retired snapshot stays in the store before it is swept: a reader that
/// found it just before (another appliance opening a clone) has this long to place its
/// hold.
pub const GRACE_S: u64 = 600;

/// The longest a failing policy waits before trying again.
const MAX_BACKOFF_S: u64 = 900;

/// The longest the thread sleeps without looking (a clock stepped forward is noticed).
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// The policies' running state, owned by the service.
#[derive(Default)]
pub(super) struct Policies {
    state: Mutex<Runtime>,
    wake: Condvar,
}

#[derive(Default)]
struct Runtime {
    status: HashMap<String, Status>,
    stopping: bool,
    running: bool,
    /// Bumped by every wake, so one that comes during a pass is not lost.
    wakes: u64,
}

/// The counts of a volume's policy [`Status`] others read.
pub(super) struct PolicyCounts {
    pub runs: u64,
    pub failures: u64,
    pub retired: u64,
    pub swept_objects: u64,
}

/// What a volume's policy has done since the daemon started.
#[derive(Default, Clone)]
struct Status {
    /// Its snapshot job running now.
    job: Option<u64>,
    runs: u64,
    failures: u64,
    /// Failures in a row, and when to try again after the last (Unix seconds): a
    /// policy that fails at once is not run again at once.
    in_a_row: u32,
    retry_at: u64,
    last_error: Option<(u64, String)>,
    retired: u64,
    swept_objects: u64,
    swept_manifests: u64,
    last_retention: Option<Value>,
    /// Objects no manifest named at the last retention: deleted if still so at the
    /// next (an object named by a manifest a lagging listing missed is never judged
    /// by one look).
    orphans: std::collections::BTreeSet<String>,
}

impl Policies {
    fn lock(&self) -> MutexGuard<'_, Runtime> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Service {
    /// Wakes the policy thread: something it waits for may have happened.
    pub(super) fn wake_policies(&self) {
        self.policies.lock().wakes += 1;
        self.policies.wake.notify_all();
    }

    /// `policy_set`: protects `p.volume` by `p` (replacing its policy, if any).
    pub fn policy_set(self: &Arc<Self>, p: Policy) -> anyhow::Result<api::PolicyInfo> {
        self.check_policy(&p)?;
        {
            let mut inner = self.inner();
            inner.catalogue.policies.retain(|q| q.volume != p.volume);
            inner.catalogue.policies.push(p.clone());
            self.save(&inner)?;
        }
        self.wake_policies();
        Ok(self.policy_info(&p))
    }

    fn check_policy(&self, p: &Policy) -> anyhow::Result<()> {
        if let Some(why) = p.problem() {
            invalid!("{why}");
        }
        self.store(&p.store)?;
        if let Some(k) = &p.key
            && !self.settings.keys.iter().any(|x| &x.id == k)
        {
            return Err(Refusal::NotFound(format!("no key named {}", shown(k))).into());
        }
        if !self
            .inner()
            .catalogue
            .volumes
            .iter()
            .any(|v| v.name == p.volume)
        {
            not_found!("no volume named {}", shown(&p.volume));
        }
        Ok(())
    }

    /// `policy_delete`: the volume is protected no more (its snapshots stay).
    pub fn policy_delete(&self, volume: &str) -> anyhow::Result<api::PolicyDeleted> {
        let mut inner = self.inner();
        let before = inner.catalogue.policies.len();
        inner.catalogue.policies.retain(|q| q.volume != volume);
        if inner.catalogue.policies.len() == before {
            not_found!("volume {} has no policy", shown(volume));
        }
        self.save(&inner)?;
        drop(inner);
        self.wake_policies();
        Ok(api::PolicyDeleted {
            volume: volume.to_string(),
        })
    }

    /// `policy_list`: every policy with what it has done.
    pub fn policy_list(&self) -> Vec<api::PolicyInfo> {
        let policies = self.inner().catalogue.policies.clone();
        policies.iter().map(|p| self.policy_info(p)).collect()
    }

    /// Policy `p` and what it did, as `policy_list` shows it.
    fn policy_info(&self, p: &Policy) -> api::PolicyInfo {
        let (newest, newest_at) = match self.newest_snapshot(&p.volume, &p.store) {
            Some((id, t)) => (Some(id), Some(t)),
            None => (None, None),
        };
        let now = now_secs();
        let status = self
            .policies
            .lock()
            .status
            .get(&p.volume)
            .cloned()
            .unwrap_or_default();
        // Every field of the policy, named: one added to it does not build until it
        // is shown here too.
        let Policy {
            volume,
            store,
            every_s,
            key,
            keep_last,
            hourly,
            daily,
            weekly,
            monthly,
        } = p.clone();
        api::PolicyInfo {
            volume,
            store,
            every_s,
            key,
            keep_last,
            hourly,
            daily,
            weekly,
            monthly,
            newest,
            last_success: newest_at,
            // The recovery point now: what a disaster would lose.
            rpo_s: newest_at.map(|t| now.saturating_sub(t)),
            next_due: p.due(newest_at, now),
            job: status.job,
            runs: status.runs,
            failures: status.failures,
            last_error: status
                .last_error
                .map(|(at, error)| api::PolicyError { at, error }),
            retired: status.retired,
            swept_objects: status.swept_objects,
            swept_manifests: status.swept_manifests,
            last_retention: status.last_retention.unwrap_or(Value::Null),
        }
    }

    /// What `volume`'s policy did since the daemon started (runs, failures, retention).
    pub(super) fn policy_status(&self, volume: &str) -> PolicyCounts {
        let s = self
            .policies
            .lock()
            .status
            .get(volume)
            .cloned()
            .unwrap_or_default();
        PolicyCounts {
            runs: s.runs,
            failures: s.failures,
            retired: s.retired,
            swept_objects: s.swept_objects,
        }
    }

    /// The newest snapshot of `volume` in `store` this appliance catalogued, and when.
    pub(super) fn newest_snapshot(&self, volume: &str, store: &str) -> Option<(String, u64)> {
        self.inner()
            .catalogue
            .snapshots
            .iter()
            .filter(|s| s.volume == volume && s.store == store)
            .max_by_key(|s| s.created)
            .map(|s| (s.id.clone(), s.created))
    }

    /// Puts the configuration's `[[policy]]` sections in place (each replaces the
    /// volume's policy set through the API, if any).
    pub fn ensure_policies(&self, declared: &[Policy]) -> anyhow::Result<()> {
        for p in declared {
            self.check_policy(p)
                .map_err(|e| anyhow::anyhow!("[[policy]] of volume {:?}: {e:#}", p.volume))?;
        }
        if declared.is_empty() {
            return Ok(());
        }
        let mut inner = self.inner();
        for p in declared {
            inner.catalogue.policies.retain(|q| q.volume != p.volume);
            inner.catalogue.policies.push(p.clone());
        }
        self.save(&inner)
    }

    /// Starts the policy thread (once).
    pub fn start_policies(self: &Arc<Self>) {
        {
            let mut rt = self.policies.lock();
            if rt.running {
                return;
            }
            rt.running = true;
        }
        let service = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("policies".into())
            .spawn(move || service.run_policies());
        if let Err(e) = spawned {
            tracing::error!("protection policies cannot run: {e}");
        }
    }

    /// Stops the policy thread (a snapshot it started runs on, as any other).
    pub(super) fn stop_policies(&self) {
        self.policies.lock().stopping = true;
        self.wake_policies();
    }

    fn run_policies(self: Arc<Self>) {
        loop {
            let seen = self.policies.lock().wakes;
            let wait = self.policy_pass();
            let rt = self.policies.lock();
            if rt.stopping {
                return;
            }
            if rt.wakes == seen {
                let _ = self
                    .policies
                    .wake
                    .wait_timeout(rt, wait.min(LOOK_AT_LEAST_EVERY));
            }
        }
    }

    /// One look at every policy: jobs that ended are accounted for (retention after a
    /// success), due snapshots started. Returns how long until the next is due.
    fn policy_pass(self: &Arc<Self>) -> Duration {
        let policies = self.inner().catalogue.policies.clone();
        let mut next = LOOK_AT_LEAST_EVERY;
        self.policies
            .lock()
            .status
            .retain(|v, _| policies.iter().any(|p| &p.volume == v));
        for p in &policies {
            if self.policies.lock().stopping || self.stopping.load(Ordering::SeqCst) {
                return next;
            }
            let job = self
                .policies
                .lock()
                .status
                .entry(p.volume.clone())
                .or_default()
                .job;
            if let Some(id) = job {
                match self.job_outcome(id) {
                    None => continue,
                    Some(outcome) => {
                        self.finished_run(p, outcome);
                        self.policies
                            .lock()
                            .status
                            .entry(p.volume.clone())
                            .or_default()
                            .job = None;
                    }
                }
            }
            let now = now_secs();
            let retry_at = self
                .policies
                .lock()
                .status
                .get(&p.volume)
                .map_or(0, |s| s.retry_at);
            let due = p
                .due(
                    self.newest_snapshot(&p.volume, &p.store).map(|(_, t)| t),
                    now,
                )
                .max(retry_at);
            if due > now {
                next = next.min(Duration::from_secs(due - now));
                continue;
            }
            match self.snapshot_create(&p.volume, &p.store, p.key.as_deref(), None, false) {
                Ok(job) => {
                    let id = job.id;
                    let mut rt = self.policies.lock();
                    let s = rt.status.entry(p.volume.clone()).or_default();
                    s.job = Some(id);
                    s.runs += 1;
                    if let Some(a) = &self.audit
                        && let Err(e) = a.record(
                            "oxd",
                            "policy_snapshot",
                            json!({ "volume": p.volume, "store": p.store, "job": id }),
                            "started",
                        )
                    {
                        tracing::error!("audit log: {e}");
                    }
                }
                // Another snapshot of the volume is running: its end wakes us.
                Err(e) if matches!(e.downcast_ref::<Refusal>(), Some(Refusal::Conflict(_))) => {}
                Err(e) => self.policy_failed(p, &ox_api::error_chain(&e)),
            }
        }
        next
    }

    fn job_outcome(&self, id: u64) -> Option<Result<Value, String>> {
        let job = self.job(id).ok()?;
        job.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn policy_failed(&self, p: &Policy, error: &str) {
        tracing::warn!(volume = %p.volume, store = %p.store, %error, "protection policy run failed");
        let mut rt = self.policies.lock();
        let s = rt.status.entry(p.volume.clone()).or_default();
        s.failures += 1;
        s.in_a_row = s.in_a_row.saturating_add(1);
        // 30 s, doubling, at most 15 minutes, and never later than the next interval.
        let backoff = (30u64 << s.in_a_row.min(5).saturating_sub(1))
            .min(MAX_BACKOFF_S)
            .min(p.every_s);
        s.retry_at = now_secs() + backoff;
        s.last_error = Some((now_secs(), error.to_string()));
    }

    /// A policy's snapshot ended: after a success, its retention.
    fn finished_run(self: &Arc<Self>, p: &Policy, outcome: Result<Value, String>) {
        if let Err(e) = outcome {
            // A stop suspends snapshots: not the policy's failure (it continues).
            if !self.stopping.load(Ordering::SeqCst) {
                self.policy_failed(p, &e);
            }
            return;
        }
        match self.apply_retention(p) {
            Ok(report) => {
                let mut rt = self.policies.lock();
                let s = rt.status.entry(p.volume.clone()).or_default();
                s.in_a_row = 0;
                s.retry_at = 0;
                s.retired += report["retired"].as_array().map_or(0, Vec::len) as u64;
                s.swept_objects += report["swept"]["objects"].as_u64().unwrap_or(0)
                    + report["swept"]["pages"].as_u64().unwrap_or(0)
                    + report["swept"]["orphans"].as_u64().unwrap_or(0);
                s.swept_manifests += report["swept"]["manifests"].as_u64().unwrap_or(0);
                s.last_retention = Some(report);
            }
            Err(e) => self.policy_failed(p, &format!("retention: {}", ox_api::error_chain(&e))),
        }
    }

    /// Applies `p`'s retention to its volume's snapshots in its store: those it no
    /// longer keeps (and no clone here reads) are retired from the store's catalogue
    /// and this one, then the volume's prefix is swept.
    fn apply_retention(self: &Arc<Self>, p: &Policy) -> anyhow::Result<Value> {
        let (busy, head, place) = {
            let inner = self.inner();
            let live = inner.volume(&p.volume)?;
            let record = inner
                .catalogue
                .volumes
                .iter()
                .find(|v| v.name == p.volume)
                .ok_or_else(|| {
                    Refusal::NotFound(format!("no volume named {}", shown(&p.volume)))
                })?;
            // This volume's prefix only: not an older volume's of the same name.
            let place = super::snapshot_prefix(&record.name, &record.uuid);
            (Arc::clone(&live.busy), self.head_of(record), place)
        };
        // Like a delete: never beside a snapshot of the volume (its objects have no
        // manifest yet), nor one a restart cut short.
        if busy.swap(true, Ordering::SeqCst) {
            return Ok(json!({ "skipped": "a snapshot of the volume is running" }));
        }
        let release = scopeguard(&busy);
        if self.journal_path(&p.volume).exists() {
            return Ok(json!({ "skipped": "a snapshot of the volume is pending" }));
        }
        // Read once no snapshot of the volume can begin or end: one that ended between
        // would pass for another appliance's below.
        let (snapshots, clones) = {
            let inner = self.inner();
            let snapshots: Vec<_> = inner
                .catalogue
                .snapshots
                .iter()
                .filter(|s| {
                    s.volume == p.volume && s.store == p.store && s.manifest_key.starts_with(&place)
                })
                .cloned()
                .collect();
            let clones: Vec<String> = inner
                .catalogue
                .clones
                .iter()
                .filter(|c| c.store == p.store)
                .map(|c| c.manifest_key.clone())
                .collect();
            (snapshots, clones)
        };
        let Some(prefix) = snapshots
            .first()
            .map(|s| bucket::prefix_of(&s.manifest_key))
            .transpose()?
        else {
            return Ok(json!({ "retired": [] }));
        };
        let spec = self.store(&p.store)?.clone();
        let (keks, policy) = (self.settings.keys.clone(), p.clone());
        let seen = self
            .policies
            .lock()
            .status
            .get(&p.volume)
            .map(|s| s.orphans.clone())
            .unwrap_or_default();
        let now = now_secs();
        let swept = self.cores.run(move |ex| {
            Box::pin(async move {
                let store = spec.open(&ex)?;
                // Only the owner retires and sweeps.
                ox::bucket::claim(&*store, &prefix, &head).await?;
                // The place's snapshots the store's catalogue lists and this one does
                // not (taken by the appliance that owned the place before this one
                // adopted it): the policy keeps or retires them with the volume's own,
                // or an adoption would keep them forever. Read from the entries' keys
                // alone (one LIST a thousand: their time and ID); a key that does not
                // parse is never retired here.
                let own: HashSet<&str> = snapshots.iter().map(|s| s.id.as_str()).collect();
                let foreign: Vec<(u64, String)> = store
                    .list(&ox::bucket::entries_prefix(&prefix))
                    .await?
                    .iter()
                    .filter_map(|k| ox::bucket::parse_entry_key(&prefix, k))
                    .filter(|(_, id)| !own.contains(id.as_str()))
                    .collect();
                // Oldest first, as `keep` wants them; at equal times this appliance's
                // own come later, and so win.
                let mut times: Vec<(String, u64, bool)> = snapshots
                    .iter()
                    .map(|s| (s.id.clone(), s.created, true))
                    .chain(
                        foreign
                            .iter()
                            .map(|(ms, id)| (id.clone(), ms / 1000, false)),
                    )
                    .collect();
                times.sort_by_key(|(_, t, mine)| (*t, *mine));
                let times: Vec<(String, u64)> =
                    times.into_iter().map(|(id, t, _)| (id, t)).collect();
                let mut kept = policy.keep(&times);
                // Always this appliance's own newest, whatever another appliance's
                // clock said of its snapshots: the next snapshot builds on it.
                if let Some(newest) = snapshots.last() {
                    kept.insert(newest.id.as_str());
                }
                let kept_n = kept.len();
                let manifest = |id: &str| {
                    ox::format::parse_id(id)
                        .map(|b| ox::format::manifest_key(&prefix, &b))
                        .unwrap_or_default()
                };
                let retired: Vec<String> = snapshots
                    .iter()
                    .map(|s| (s.id.clone(), s.manifest_key.clone()))
                    .chain(foreign.iter().map(|(_, id)| (id.clone(), manifest(id))))
                    .filter(|(id, key)| !kept.contains(id.as_str()) && !clones.contains(key))
                    .map(|(id, _)| id)
                    .collect();
                let gone: HashSet<&str> = retired.iter().map(String::as_str).collect();
                let live: Vec<String> = snapshots
                    .iter()
                    .filter(|s| !gone.contains(s.id.as_str()))
                    .map(|s| s.manifest_key.clone())
                    .chain(clones)
                    .collect();
                ox::retention::retire(&*store, &prefix, &retired, now).await?;
                let swept =
                    ox::retention::sweep(&*store, &prefix, &keks, &live, now, GRACE_S).await?;
                // What failed uploads left (no snapshot of the volume runs now), if no
                // manifest named it at the last look either; best effort.
                let orphans = async {
                    let now: std::collections::BTreeSet<String> =
                        ox::snapshot::orphans(&*store, &prefix)
                            .await?
                            .into_iter()
                            .collect();
                    let gone: Vec<String> = now.intersection(&seen).cloned().collect();
                    store.delete(&gone).await?;
                    let left = now.difference(&seen).cloned().collect();
                    Ok::<_, ox::OxError>((gone.len(), left))
                }
                .await;
                Ok::<_, ox::OxError>((swept, orphans, retired, kept_n))
            })
        })??;
        let (swept, orphans, retired, kept) = swept;
        let (orphans, orphans_error) = match orphans {
            Ok((gone, left)) => {
                self.policies
                    .lock()
                    .status
                    .entry(p.volume.clone())
                    .or_default()
                    .orphans = left;
                (gone, None)
            }
            Err(e) => (0, Some(e.to_string())),
        };
        {
            let mut inner = self.inner();
            inner
                .catalogue
                .snapshots
                .retain(|s| !retired.contains(&s.id));
            self.save(&inner)?;
        }
        drop(release);
        self.wake_policies();
        let report = json!({
            "at": now,
            "kept": kept,
            "retired": retired,
            "swept": {
                "manifests": swept.manifests, "pages": swept.pages, "objects": swept.objects,
                "objects_kept": swept.objects_kept, "ancestors": swept.ancestors,
                "live": swept.live, "lists": swept.lists, "pages_read": swept.pages_read,
                "orphans": orphans,
                "orphans_error": orphans_error,
            },
        });
        if let Some(a) = &self.audit
            && let Err(e) = a.record(
                "oxd",
                "retention",
                json!({ "volume": p.volume, "store": p.store, "report": report }),
                "ok",
            )
        {
            tracing::error!("audit log: {e}");
        }
        Ok(report)
    }
}

/// Clears `busy` when dropped.
fn scopeguard(busy: &std::sync::atomic::AtomicBool) -> impl Drop + '_ {
    struct Clear<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Clear<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    Clear(busy)
}
