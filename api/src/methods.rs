//! Every control-API method, typed: its parameters — what oxd accepts and what oxctl
//! (or any Rust client) sends, one struct per method — and its result, what oxd
//! answers. Unknown parameters are refused, one of the wrong type is named in the
//! error ([`parse`]), and a missing optional one means the same as `null`; a result
//! takes fields it does not know (a newer daemon's). `docs/API.md` lists the same
//! methods and fields; a test keeps them in step.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::{RpcError, code};

/// A method of the control API: its name on the wire, its parameters (the type
/// implementing this) and its result.
pub trait Method: Serialize + DeserializeOwned {
    /// The method's name.
    const NAME: &'static str;
    /// Its parameters' names, as on the wire.
    const FIELDS: &'static [&'static str];
    /// What it answers, as docs/API.md describes it.
    type Result: Serialize + DeserializeOwned;
}

/// Parses the parameters of method `M` (absent or `null`: none given). An error is
/// [`code::INVALID_PARAMS`] naming the field at fault.
pub fn parse<M: Method>(params: Option<&serde_json::Value>) -> Result<M, RpcError> {
    let empty = serde_json::Value::Object(serde_json::Map::new());
    let value = match params {
        None | Some(serde_json::Value::Null) => &empty,
        Some(v @ serde_json::Value::Object(_)) => v,
        Some(_) => {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "params must be an object",
            ));
        }
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = clipped(&e.inner().to_string(), 160);
        // An unknown field's message names it already.
        let message = if path == "." || inner.starts_with("unknown field") {
            inner
        } else {
            format!("{}: {inner}", clipped(&path, 64))
        };
        RpcError::new(code::INVALID_PARAMS, message)
    })
}

/// `s` cut to at most `max` characters, saying how long it was: an error never echoes
/// a huge value a client sent (into the reply and the audit log).
fn clipped(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((at, _)) => format!("{}… ({} bytes)", &s[..at], s.len()),
    }
}

/// The parameters as sent: an object without the fields left unset (`null`).
pub fn to_params<M: Method>(m: &M) -> Result<serde_json::Value, serde_json::Error> {
    let mut v = serde_json::to_value(m)?;
    if let serde_json::Value::Object(map) = &mut v {
        map.retain(|_, v| !v.is_null());
    }
    Ok(v)
}

/// Declares a method's parameter struct and its [`Method`] implementation (with its
/// result type) from one list of fields, so the names the test checks against API.md
/// are the struct's own.
macro_rules! method {
    (
        $(#[$meta:meta])*
        $ty:ident = $wire:literal -> $result:ty {
            $( $(#[$fmeta:meta])* $field:ident : $fty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $ty {
            $( $(#[$fmeta])* pub $field: $fty, )*
        }

        impl Method for $ty {
            const NAME: &'static str = $wire;
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
            type Result = $result;
        }
    };
}

method! {
    /// The API and daemon versions.
    OxGetVersion = "ox_get_version" -> Version {}
}

method! {
    /// Block devices, or the one named.
    BdevGetBdevs = "bdev_get_bdevs" -> Vec<BdevInfo> {
        /// Only this one.
        name: Option<String>,
    }
}

method! {
    /// Every NVMe/TCP subsystem served: configured, and volumes' and clones' exports.
    NvmfGetSubsystems = "nvmf_get_subsystems" -> Vec<SubsystemInfo> {}
}

method! {
    /// The reactors' cores.
    ReactorGetCores = "reactor_get_cores" -> Cores {}
}

method! {
    /// Checks the audit log's hash chain.
    AuditVerify = "audit_verify" -> AuditReport {}
}

/// Authenticates a TCP connection (its first request). Unlike the other methods it
/// ignores fields it does not know (a client may send more), and its `Debug` hides the
/// token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The control token.
    pub token: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("token", &"(hidden)").finish()
    }
}

impl Method for Auth {
    const NAME: &'static str = "auth";
    const FIELDS: &'static [&'static str] = &["token"];
    type Result = Authenticated;
}

method! {
    /// Creates a volume: empty (`size_mib`), or over a snapshot, named one way — a
    /// catalogued `snapshot`; `store` and `manifest_key`; or `store`, `volume` and
    /// `latest` (or `snapshot`) from the store's catalogue.
    VolumeCreate = "volume_create" -> VolumeCreated {
        /// Its name.
        name: String,
        /// Size of an empty volume.
        size_mib: Option<u64>,
        /// 512 or 4096 (empty volumes; default 512).
        block_size: Option<u64>,
        /// A snapshot's ID.
        snapshot: Option<String>,
        /// A store's name.
        store: Option<String>,
        /// A manifest's key in `store`.
        manifest_key: Option<String>,
        /// A volume in `store`'s catalogue.
        volume: Option<String>,
        /// That volume's newest snapshot.
        latest: Option<bool>,
        /// What the new volume seeds its lineage from (fail-back).
        seed: Option<String>,
        /// Export it under this NQN.
        nqn: Option<String>,
        /// Host NQNs allowed to connect (with `nqn`).
        hosts: Option<Vec<String>>,
        /// Any host may connect (with `nqn`).
        allow_any_host: Option<bool>,
    }
}

method! {
    /// Deletes a volume.
    VolumeDelete = "volume_delete" -> Deleted {
        /// Its name.
        name: String,
    }
}

method! {
    /// Takes over a volume's place in a store from the appliance that owned it.
    VolumeAdopt = "volume_adopt" -> Adopted {
        /// The volume.
        name: String,
        /// The store.
        store: String,
    }
}

method! {
    /// Every volume.
    VolumeList = "volume_list" -> Volumes {}
}

method! {
    /// Starts a snapshot of a volume into a store (a job).
    SnapshotCreate = "snapshot_create" -> Job {
        /// The volume.
        volume: String,
        /// The store.
        store: String,
        /// Wrap it under this key (default: the default key).
        key: Option<String>,
        /// Read it back before publishing (default: the store's setting).
        verify: Option<bool>,
        /// Every chunk, over no parent.
        full: Option<bool>,
    }
}

method! {
    /// Snapshots in the catalogue, of one volume or all.
    SnapshotList = "snapshot_list" -> Vec<Snapshot> {
        /// Only this volume's.
        volume: Option<String>,
    }
}

method! {
    /// Starts fetching and checking every frame of a snapshot (a job).
    SnapshotVerify = "snapshot_verify" -> Job {
        /// The snapshot's ID.
        id: String,
    }
}

method! {
    /// Starts restoring a snapshot into a new volume (a job).
    SnapshotRestore = "snapshot_restore" -> Job {
        /// The snapshot's ID.
        id: String,
        /// The new volume's name.
        name: String,
        /// Export it under this NQN.
        nqn: Option<String>,
        /// Host NQNs allowed to connect (with `nqn`).
        hosts: Option<Vec<String>>,
        /// Any host may connect (with `nqn`).
        allow_any_host: Option<bool>,
    }
}

method! {
    /// Deletes a snapshot no clone or later snapshot needs.
    SnapshotDelete = "snapshot_delete" -> SnapshotDeleted {
        /// The snapshot's ID.
        id: String,
    }
}

method! {
    /// The keys (never their secrets).
    KeyList = "key_list" -> Vec<KeyInfo> {}
}

method! {
    /// Makes another key the default for new snapshots.
    KeyRotate = "key_rotate" -> Rotated {
        /// The key's name.
        to: String,
    }
}

method! {
    /// This appliance's public key for receiving sealed keys.
    KeyReceiver = "key_receiver" -> ReceiverKey {}
}

method! {
    /// Seals a key for another appliance (root on the local socket only).
    KeyExport = "key_export" -> ExportedKey {
        /// The key's name.
        key: String,
        /// The receiver's public key (from its `key_receiver`).
        to: String,
    }
}

method! {
    /// Imports a key sealed for this appliance.
    KeyImport = "key_import" -> ImportedKey {
        /// What `key_export` wrote (its JSON, as is).
        sealed: serde_json::Value,
    }
}

method! {
    /// The stores configured.
    StoreList = "store_list" -> Vec<StoreInfo> {}
}

method! {
    /// Runs a store's check (every step a snapshot needs).
    StoreCheck = "store_check" -> CheckReport {
        /// The store's name.
        name: String,
    }
}

method! {
    /// Collects what failed uploads left across a store's bucket.
    StoreCollect = "store_collect" -> Collected {
        /// The store's name.
        name: String,
        /// Only say what would go.
        dry_run: Option<bool>,
    }
}

method! {
    /// Volumes in a store's catalogue, or one volume's snapshots (paged).
    StoreBrowse = "store_browse" -> Browsed {
        /// The store's name.
        store: String,
        /// This volume's snapshots.
        volume: Option<String>,
        /// At most this many.
        limit: Option<u64>,
        /// After this one (the page before's `next`).
        after: Option<String>,
    }
}

method! {
    /// Sets a volume's protection policy.
    PolicySet = "policy_set" -> PolicyInfo {
        /// The volume.
        volume: String,
        /// The store its snapshots go to.
        store: String,
        /// Seconds between snapshots.
        every_s: u64,
        /// Wrap them under this key (default: the default key).
        key: Option<String>,
        /// Keep the newest this many.
        keep_last: Option<u32>,
        /// Keep the newest of each of the last this many hours.
        hourly: Option<u32>,
        /// ... days.
        daily: Option<u32>,
        /// ... weeks.
        weekly: Option<u32>,
        /// ... months.
        monthly: Option<u32>,
    }
}

method! {
    /// Removes a volume's protection policy.
    PolicyDelete = "policy_delete" -> PolicyDeleted {
        /// The volume.
        volume: String,
    }
}

method! {
    /// Every policy, with its state.
    PolicyList = "policy_list" -> Vec<PolicyInfo> {}
}

method! {
    /// Creates a clone of a snapshot, named one way (as for `volume_create`).
    CloneCreate = "clone_create" -> Created {
        /// Its name.
        name: String,
        /// A snapshot's ID.
        snapshot: Option<String>,
        /// A store's name.
        store: Option<String>,
        /// A manifest's key in `store`.
        manifest_key: Option<String>,
        /// A volume in `store`'s catalogue.
        volume: Option<String>,
        /// That volume's newest snapshot.
        latest: Option<bool>,
        /// Thicken it in the background from the start.
        thicken: Option<bool>,
        /// Export it under this NQN.
        nqn: Option<String>,
        /// Host NQNs allowed to connect (with `nqn`).
        hosts: Option<Vec<String>>,
        /// Any host may connect (with `nqn`).
        allow_any_host: Option<bool>,
    }
}

method! {
    /// A clone's hydration, traffic and background fetching.
    CloneGet = "clone_get" -> CloneInfo {
        /// Its name.
        name: String,
    }
}

method! {
    /// Deletes a clone (the snapshot stays).
    CloneDelete = "clone_delete" -> Deleted {
        /// Its name.
        name: String,
    }
}

/// What `clone_thicken` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThickenAction {
    /// Starts (or resumes) thickening.
    Start,
    /// Pauses it (and the working set's fetch).
    Pause,
    /// Resumes it.
    Resume,
}

method! {
    /// Starts, pauses or resumes a clone's thickening; sets its bandwidth.
    CloneThicken = "clone_thicken" -> CloneInfo {
        /// The clone.
        name: String,
        /// What to do.
        action: ThickenAction,
        /// Its own thickening bandwidth (0: only the global background limit).
        mib_s: Option<u64>,
    }
}

method! {
    /// A job's state and result.
    JobGet = "job_get" -> Job {
        /// Its ID.
        id: u64,
    }
}

method! {
    /// Every job.
    JobList = "job_list" -> Vec<Job> {}
}

method! {
    /// Cancels a job.
    JobCancel = "job_cancel" -> Job {
        /// Its ID.
        id: u64,
    }
}

/// What `ox_get_version` answers.
///
/// Result types take fields they do not know (a newer daemon may add some: API.md's
/// versioning promise), unlike parameters; the test that calls each against oxd
/// checks that the two sides name the same fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The API's version ([`crate::api::API_VERSION`]).
    pub api: u32,
    /// The daemon's package version.
    pub oxd: String,
}

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Still running.
    Running,
    /// Ended with a result.
    Done,
    /// Ended with an error.
    Failed,
    /// A state this client does not know (a newer daemon's).
    #[serde(other)]
    Other,
}

/// A store request retried, as a job or store shows the latest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// When (Unix seconds).
    pub at: u64,
    /// The request (GET, PUT, …).
    pub op: String,
    /// Its object key.
    pub key: String,
    /// Why it was retried.
    pub reason: String,
}

/// A store outage a job is waiting out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// Since when (Unix seconds).
    pub since: u64,
    /// The last failure.
    pub reason: String,
}

/// A background job (a snapshot, a verify, a restore): what `job_get` answers, and the
/// methods that start one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its ID.
    pub id: u64,
    /// `snapshot`, `verify`, `restore`.
    pub kind: String,
    /// What it works on (a volume, a snapshot).
    pub target: String,
    /// Running, done or failed.
    pub state: JobState,
    /// Chunks done, of `total`.
    pub done: u64,
    /// Chunks in all (0 until known).
    pub total: u64,
    /// Bytes uploaded (a snapshot).
    pub bytes: u64,
    /// Store retries since it began (a snapshot; absent from older daemons).
    #[serde(default)]
    pub retries: u64,
    /// The latest of them.
    #[serde(default)]
    pub last_retry: Option<Retry>,
    /// The outage it waits out now, if any.
    #[serde(default)]
    pub outage: Option<Outage>,
    /// What it produced, once done (else `null`). Kept as JSON, as oxd keeps it: it
    /// differs by kind (a snapshot's record, a verify's report, a restore's volume; as
    /// docs/API.md describes), and a newer daemon may add kinds.
    pub result: serde_json::Value,
    /// Why it failed.
    pub error: Option<String>,
}

/// Where a volume or clone is exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    /// The subsystem's NQN (the device is namespace 1).
    pub nqn: String,
    /// Host NQNs allowed (ignored when `allow_any_host`).
    pub hosts: Vec<String>,
    /// Any host may connect.
    pub allow_any_host: bool,
}

/// Bytes a clone made present, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetched {
    /// For hosts' misses.
    pub client_miss: u64,
    /// By read-ahead and the snapshot's working set.
    pub prefetch: u64,
    /// By thickening.
    pub thickening: u64,
}

/// A clone's client-miss latency, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissLatency {
    /// Misses measured.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// A clone's thickening walk while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thickening {
    /// Paused by the operator.
    pub paused: bool,
    /// Chunks this walk fetched.
    pub fetched: u64,
    /// Seconds to completion at this walk's rate, once it has one.
    pub eta_s: Option<u64>,
    /// Runs the store failed that wait to be asked again (their back-off, or, paused,
    /// the resume). Absent from older daemons' answers.
    #[serde(default)]
    pub retrying: u64,
}

/// The fetch of a new clone's working set while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Warming {
    /// Paused with thickening.
    pub paused: bool,
    /// Chunks fetched.
    pub fetched: u64,
    /// Times the store was unavailable and it waited to go on.
    pub setbacks: u32,
}

/// A clone, as `clone_get` (and `clone_thicken`) answer: its record, and while it is
/// open its hydration and traffic (counters over its whole life, across restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneInfo {
    /// Its name.
    pub name: String,
    /// `clone`.
    pub kind: String,
    /// Its identity.
    pub uuid: String,
    /// The store holding its snapshot.
    pub store: String,
    /// The snapshot's manifest key.
    pub manifest_key: String,
    /// Where it is exported, if anywhere.
    pub export: Option<Export>,
    /// Thickening wanted.
    pub thicken: bool,
    /// Thickening paused by the operator.
    pub paused: bool,
    /// Its own thickening bandwidth, MiB/s.
    pub thicken_mib_s: Option<u64>,
    /// Why it could not be opened (then nothing below is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Its block size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Chunks present locally, of `chunks_total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_present: Option<u64>,
    /// Its chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_total: Option<u64>,
    /// Share present, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hydration_pct: Option<f64>,
    /// Bytes hosts read from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_read_bytes: Option<u64>,
    /// Bytes made present, by reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_bytes: Option<Fetched>,
    /// Bytes of frames and index pages fetched from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_bytes: Option<u64>,
    /// Their GETs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gets: Option<u64>,
    /// Bodies that failed their integrity check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub integrity_failures: Option<u64>,
    /// Fetches made again after one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refetches: Option<u64>,
    /// Client-miss latency (this run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miss_latency_us: Option<MissLatency>,
    /// Thickening, while a walk runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thickening: Option<Thickening>,
    /// The working set's fetch, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warming: Option<Warming>,
}

/// A volume, as `volume_list` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// `volume`.
    pub kind: String,
    /// Its size.
    pub size_bytes: u64,
    /// Its block size.
    pub block_size: u32,
    /// Its chunk size (change tracking, snapshots).
    pub chunk_bytes: u64,
    /// Its identity.
    pub uuid: String,
    /// Where it is exported, if anywhere.
    pub export: Option<Export>,
    /// Its catalogued snapshots.
    pub snapshots: u64,
    /// Bytes read from it and written to it (this run).
    pub read_bytes: u64,
    /// See `read_bytes`.
    pub write_bytes: u64,
    /// Why it could not be opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// What `volume_list` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volumes {
    /// The volumes.
    pub volumes: Vec<VolumeInfo>,
    /// The clones, each as `clone_get` answers.
    pub clones: Vec<CloneInfo>,
}

/// A snapshot this appliance took, as `snapshot_list` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Its ID (hex).
    pub id: String,
    /// The volume it was taken of.
    pub volume: String,
    /// The store it lives in.
    pub store: String,
    /// Its manifest's key.
    pub manifest_key: String,
    /// The snapshot it is incremental over, if any.
    pub parent: Option<String>,
    /// When (Unix seconds).
    pub created: u64,
    /// Bytes of frames uploaded.
    pub data_bytes: u64,
    /// Bytes of index pages and manifest uploaded.
    pub meta_bytes: u64,
    /// Chunks read from the volume.
    pub chunks_read: u64,
    /// Entered in the store's own catalogue.
    #[serde(default)]
    pub listed: bool,
    /// How long the attempt that published it took, in milliseconds (0: not known —
    /// catalogued before oxd recorded it, or from an older daemon).
    #[serde(default)]
    pub duration_ms: u64,
}

/// A key-encryption key, as `key_list` lists it (never its material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Its name.
    pub name: String,
    /// New snapshots are wrapped under it.
    pub default: bool,
    /// 8 bytes of HMAC-SHA256 under it of a fixed label (hex): equal on two appliances
    /// exactly when they hold the same key.
    pub check: String,
}

/// A policy run's failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyError {
    /// When (Unix seconds).
    pub at: u64,
    /// Why.
    pub error: String,
}

/// A protection policy and what it did, as `policy_list` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// The volume.
    pub volume: String,
    /// The store its snapshots go to.
    pub store: String,
    /// Seconds between snapshots.
    pub every_s: u64,
    /// The key they are wrapped under (absent: the default key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Keep the newest this many.
    pub keep_last: u32,
    /// Keep the newest of each of the last this many hours.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// The newest snapshot's ID.
    pub newest: Option<String>,
    /// When it was taken (Unix seconds).
    pub last_success: Option<u64>,
    /// Its age now: what a disaster would lose.
    pub rpo_s: Option<u64>,
    /// When the next is due (Unix seconds).
    pub next_due: u64,
    /// The snapshot job running for it, if any.
    pub job: Option<u64>,
    /// Runs since the daemon started.
    pub runs: u64,
    /// Of those, failures.
    pub failures: u64,
    /// The latest failure.
    pub last_error: Option<PolicyError>,
    /// Snapshots retired since start.
    pub retired: u64,
    /// Objects swept since start.
    pub swept_objects: u64,
    /// Manifests swept since start.
    pub swept_manifests: u64,
    /// The last retention run (as docs/API.md describes it), if any.
    pub last_retention: serde_json::Value,
}

/// Reads a field oxd gives as a value or `null` where it applies and leaves out where
/// it does not: `null` is `Some(None)`, so that written back it is `null` again (with
/// `#[serde(default)]`, a field left out is `None`, and skipped when written).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// What `auth` answers when the token is right (a wrong one is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authenticated {
    /// Always true.
    pub authenticated: bool,
}

/// A kind of I/O's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCount {
    /// Requests completed.
    pub ops: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A block device's I/O by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoStats {
    /// Reads.
    pub read: IoCount,
    /// Writes.
    pub write: IoCount,
    /// Flushes.
    pub flush: IoCount,
    /// Write-zeroes.
    pub write_zeroes: IoCount,
    /// Unmaps (deallocations).
    pub unmap: IoCount,
}

/// A block device's I/O latency, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Latency {
    /// Mean.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest.
    pub max: u64,
}

/// A block device, as `bdev_get_bdevs` lists it: a configured device, a volume or a
/// clone. Counters are this run's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BdevInfo {
    /// Its name.
    pub name: String,
    /// Its block size.
    pub block_size: u32,
    /// Its blocks.
    pub num_blocks: u64,
    /// Its size.
    pub size_bytes: u64,
    /// Its identity.
    pub uuid: String,
    /// I/O completed, by kind.
    pub stats: IoStats,
    /// I/O that failed.
    pub errors: u64,
    /// How long I/O took.
    pub latency_us: Latency,
}

/// A namespace of a subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// Its ID.
    pub nsid: u32,
    /// The block device it serves.
    pub bdev: String,
}

/// A host's controller on a subsystem, connected now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// Its ID.
    pub cntlid: u16,
    /// The host's NQN.
    pub hostnqn: String,
    /// I/O queues it has.
    pub io_queues: u64,
}

/// An NVMe/TCP subsystem, as `nvmf_get_subsystems` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemInfo {
    /// Its NQN.
    pub nqn: String,
    /// Its serial number.
    pub serial: String,
    /// Its model.
    pub model: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed (empty when `allow_any_host`).
    pub hosts: Vec<String>,
    /// Addresses it is served on.
    pub listeners: Vec<String>,
    /// Its namespaces.
    pub namespaces: Vec<NamespaceInfo>,
    /// Hosts' controllers connected now.
    pub controllers: Vec<ControllerInfo>,
}

/// What `reactor_get_cores` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cores {
    /// The cores the reactors run on.
    pub cores: Vec<usize>,
}

/// What `audit_verify` answers (and `oxctl audit verify FILE` finds): the chain intact,
/// with `entries` and `last_hash`, or broken, with `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditReport {
    /// The log's file.
    pub path: String,
    /// No entry was changed, removed or reordered.
    pub intact: bool,
    /// Entries in it (intact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// The last entry's hash (intact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_hash: Option<String>,
    /// Where and how the chain breaks (broken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `clone_create` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// Its name.
    pub name: String,
    /// Addresses it is exported on (none if not exported).
    pub listeners: Vec<String>,
}

/// What seeding a new volume's local copy from a volume here did (fail-back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seeded {
    /// The volume it was seeded from.
    pub seed: String,
    /// The volume's chunks.
    pub chunks: u64,
    /// Of those, to be read from the store.
    pub chunks_to_fetch: u64,
    /// Chunks the snapshot stored since the seed's last snapshot.
    pub changed_in_snapshot: u64,
    /// Chunks the snapshot holds as zeroes (made so locally).
    pub zero_in_snapshot: u64,
    /// Chunks the seed's hosts wrote since its last snapshot.
    pub changed_in_seed: u64,
    /// Bytes copied from the seed.
    pub copied_bytes: u64,
    /// The snapshot's index pages read to compare.
    pub index_pages_read: u64,
    /// Their bytes.
    pub index_bytes_read: u64,
}

/// What `volume_create` answers; a volume over a snapshot also names the snapshot and
/// its seeding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeCreated {
    /// Its name.
    pub name: String,
    /// Addresses it is exported on (none if not exported).
    pub listeners: Vec<String>,
    /// The store holding the snapshot it is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// That snapshot's manifest key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_key: Option<String>,
    /// Over a snapshot: its seeding, `Some(None)` without `seed`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub seeded: Option<Option<Seeded>>,
}

/// What `volume_delete` and `clone_delete` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The volume's or clone's name.
    pub name: String,
}

/// An appliance, as the store's catalogue names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appliance {
    /// Its identity, never reused.
    pub id: String,
    /// A name for people (its host name).
    pub name: String,
}

/// A manifest an adoption did not enter in the store's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotEntered {
    /// Its key.
    pub manifest: String,
    /// Why.
    pub why: String,
}

/// What `volume_adopt` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adopted {
    /// The volume.
    pub name: String,
    /// The store.
    pub store: String,
    /// The volume's place in it.
    pub prefix: String,
    /// Its owner now: this appliance.
    pub owner: Appliance,
    /// Its owner before.
    pub adopted_from: Appliance,
    /// Snapshots the owner before published and never entered in the store's
    /// catalogue, entered now.
    pub entered: Vec<String>,
    /// Those left out.
    pub skipped: Vec<NotEntered>,
}

/// What `snapshot_delete` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDeleted {
    /// The snapshot's ID.
    pub id: String,
    /// Objects deleted from the store.
    pub objects_deleted: u64,
    /// Its manifest stays, as a remaining snapshot builds on it.
    pub kept_as_ancestor: bool,
}

/// A snapshot `key_rotate` left alone: its volume's place belongs to another appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateSkipped {
    /// The snapshot's ID.
    pub snapshot: String,
    /// Its volume.
    pub volume: String,
    /// The place's owner.
    pub owner: Appliance,
}

/// What `key_rotate` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotated {
    /// The key rotated to.
    pub key: String,
    /// Snapshots in the catalogue.
    pub snapshots: u64,
    /// Manifests re-wrapped (ancestors included).
    pub rewrapped: u64,
    /// Snapshots left alone.
    pub skipped: Vec<RotateSkipped>,
}

/// What `key_receiver` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiverKey {
    /// This appliance.
    pub appliance: Appliance,
    /// Its X25519 receiver key (hex).
    pub public_key: String,
}

/// What `key_export` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedKey {
    /// The key sealed for the receiver (docs/FORMAT.md): kept as JSON, to hand to
    /// `key_import` as it is, whatever fields a newer daemon puts in it.
    pub sealed: serde_json::Value,
    /// The key's check value (as `key_list` shows it).
    pub check: String,
}

/// What `key_import` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedKey {
    /// The key's name.
    pub key: String,
    /// Its check value.
    pub check: String,
    /// The file it was written to.
    pub file: String,
    /// A key of that name is configured already.
    pub configured: bool,
    /// The `[[key]]` section to add to the configuration.
    pub configure: String,
}

/// A store's last check, as `store_list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCheck {
    /// Every step passed.
    pub ok: bool,
    /// When (Unix seconds).
    pub at: u64,
    /// The first step that failed.
    pub step: Option<String>,
    /// Why.
    pub error: Option<String>,
}

/// A store, as `store_list` lists it (never its credentials): an S3 bucket, with its
/// endpoint, bucket, region and retries, or a local directory, with its path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    /// Its name.
    pub name: String,
    /// `s3` or `local`.
    pub kind: String,
    /// The S3 endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// The region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The local directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Its last check (none before the first).
    pub check: Option<LastCheck>,
    /// Requests sent again since start (S3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u64>,
    /// The latest of them (S3: `Some(None)` before any).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_retry: Option<Option<Retry>>,
}

/// A step of a store check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStep {
    /// `open`, `list`, `clock`, `put`, `get`, `listed`, `delete` or `gone`.
    pub step: String,
    /// How long it took.
    pub ms: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// What it found besides (`clock`: how far the store's clock is from ours).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What `store_check` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// The store.
    pub store: String,
    /// Every step passed.
    pub ok: bool,
    /// The steps, up to the first that failed (and the `clock` after a failed `list`).
    pub steps: Vec<CheckStep>,
}

/// Requests a collection made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectRequests {
    /// LISTs (pages).
    pub lists: u64,
    /// GETs (manifests and leases).
    pub gets: u64,
    /// DELETE batches.
    pub deletes: u64,
}

/// A place a collection, or a browse, left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceSkipped {
    /// Its prefix.
    pub prefix: String,
    /// Why.
    pub reason: String,
}

/// What `store_collect` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// The store.
    pub store: String,
    /// Nothing was deleted: what would be.
    pub dry_run: bool,
    /// Volume places looked at.
    pub places: u64,
    /// Objects deleted (or that would be).
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects kept as younger than the grace.
    pub young: u64,
    /// Objects kept as the listing gave no age.
    pub ageless: u64,
    /// Leases older than the grace, deleted with the objects.
    pub dead_leases: u64,
    /// The grace, in seconds.
    pub grace_s: u64,
    /// Requests made.
    pub requests: CollectRequests,
    /// Places left alone.
    pub skipped: Vec<PlaceSkipped>,
    /// A dry run's keys that would be deleted (leases included), up to 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// A dry run's `keys` are not all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_truncated: Option<bool>,
}

/// A volume in a store's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketVolume {
    /// Its name.
    pub name: String,
    /// Its identity.
    pub volume: String,
    /// Its place in the store.
    pub prefix: String,
    /// Its size.
    pub size_bytes: u64,
    /// Its block size.
    pub block_size: u32,
    /// The appliance its snapshots go there from.
    pub owner: Appliance,
    /// That is this appliance.
    pub owned_here: bool,
    /// Since when (Unix seconds).
    pub since: u64,
    /// The owner before, if it was adopted.
    pub adopted_from: Option<Appliance>,
}

/// A snapshot in a store's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSnapshot {
    /// Its ID.
    pub id: String,
    /// Its manifest's key.
    pub manifest_key: String,
    /// The snapshot it builds on, if any.
    pub parent: Option<String>,
    /// When (Unix seconds).
    pub created: u64,
    /// Bytes of frames it stored.
    pub stored_bytes: u64,
    /// The appliance that took it.
    pub appliance: Appliance,
    /// The key-encryption key it needs.
    pub key: Option<String>,
    /// That key is configured on this appliance.
    pub key_here: Option<bool>,
}

/// A volume in a browse of a whole store, with its newest snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrowsedVolume {
    /// The volume.
    #[serde(flatten)]
    pub head: BucketVolume,
    /// Its newest snapshots, newest first.
    pub snapshots: Vec<BucketSnapshot>,
    /// It has older ones.
    pub more: bool,
}

/// A browse of a whole store's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreCatalogue {
    /// The store.
    pub store: String,
    /// This appliance.
    pub appliance: Appliance,
    /// Its volumes.
    pub volumes: Vec<BrowsedVolume>,
    /// Places that are not a volume's, or whose record is damaged.
    pub unreadable: Vec<PlaceSkipped>,
}

/// A page of one volume's snapshots in a store's catalogue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumePage {
    /// The store.
    pub store: String,
    /// The volume.
    #[serde(flatten)]
    pub head: BucketVolume,
    /// Its snapshots, newest first.
    pub snapshots: Vec<BucketSnapshot>,
    /// The page after this one (`after`), if any.
    pub next: Option<String>,
}

/// What `store_browse` answers: the whole store, or (with `volume`) a page of one
/// volume's snapshots. Told apart by their fields (`volumes` is the store's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Browsed {
    /// Without `volume`.
    Store(StoreCatalogue),
    /// With `volume`.
    Volume(VolumePage),
}

/// What `policy_delete` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDeleted {
    /// The volume.
    pub volume: String,
}

/// Every method but `auth` (which only opens a TCP connection, and API.md describes
/// apart): its name and its parameters' names, for documentation and checks.
pub const ALL: &[(&str, &[&str])] = &[
    entry::<OxGetVersion>(),
    entry::<BdevGetBdevs>(),
    entry::<NvmfGetSubsystems>(),
    entry::<ReactorGetCores>(),
    entry::<AuditVerify>(),
    entry::<VolumeCreate>(),
    entry::<VolumeDelete>(),
    entry::<VolumeAdopt>(),
    entry::<VolumeList>(),
    entry::<SnapshotCreate>(),
    entry::<SnapshotList>(),
    entry::<SnapshotVerify>(),
    entry::<SnapshotRestore>(),
    entry::<SnapshotDelete>(),
    entry::<KeyList>(),
    entry::<KeyRotate>(),
    entry::<KeyReceiver>(),
    entry::<KeyExport>(),
    entry::<KeyImport>(),
    entry::<StoreList>(),
    entry::<StoreCheck>(),
    entry::<StoreCollect>(),
    entry::<StoreBrowse>(),
    entry::<PolicySet>(),
    entry::<PolicyDelete>(),
    entry::<PolicyList>(),
    entry::<CloneCreate>(),
    entry::<CloneGet>(),
    entry::<CloneDelete>(),
    entry::<CloneThicken>(),
    entry::<JobGet>(),
    entry::<JobList>(),
    entry::<JobCancel>(),
];

const fn entry<M: Method>() -> (&'static str, &'static [&'static str]) {
    (M::NAME, M::FIELDS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Names the field at fault, refuses unknown fields and non-objects, and takes a
    /// missing optional field and `null` alike.
    #[test]
    fn parse_names_the_field_at_fault() {
        let e = parse::<VolumeCreate>(Some(&serde_json::json!({"name": "a", "size_mib": "x"})))
            .unwrap_err();
        assert_eq!(e.code, code::INVALID_PARAMS);
        assert!(e.message.starts_with("size_mib: invalid type"), "{e}");
        let e = parse::<VolumeDelete>(Some(&serde_json::json!({"nmae": "a"}))).unwrap_err();
        assert_eq!(e.message, "unknown field `nmae`, expected `name`");
        // A huge value or key is not echoed whole.
        let huge = "x".repeat(10_000);
        let e = parse::<CloneThicken>(Some(&serde_json::json!({"name": "c", "action": huge})))
            .unwrap_err();
        assert!(e.message.len() < 300, "{e}");
        let e = parse::<VolumeDelete>(Some(&serde_json::json!({ huge.clone(): 1 }))).unwrap_err();
        assert!(e.message.len() < 300, "{e}");
        let e = parse::<VolumeCreate>(Some(&serde_json::json!({"name": "a", "size_mib": huge})))
            .unwrap_err();
        assert!(e.message.starts_with("size_mib: invalid type"), "{e}");
        assert!(e.message.len() < 300, "{e}");
        let e = parse::<VolumeDelete>(Some(&serde_json::json!({}))).unwrap_err();
        assert!(e.message.contains("missing field `name`"), "{e}");
        let e = parse::<VolumeList>(Some(&serde_json::json!([1]))).unwrap_err();
        assert_eq!(e.message, "params must be an object");
        let e = parse::<CloneThicken>(Some(&serde_json::json!({"name": "c", "action": "go"})))
            .unwrap_err();
        assert!(e.message.starts_with("action: unknown variant `go`"), "{e}");
        let e = parse::<VolumeCreate>(Some(&serde_json::json!({"name": "a", "hosts": ["h", 1]})))
            .unwrap_err();
        assert!(e.message.starts_with("hosts[1]: invalid type"), "{e}");
        assert!(parse::<VolumeList>(None).is_ok());
        assert!(parse::<VolumeList>(Some(&serde_json::Value::Null)).is_ok());
        let a = parse::<SnapshotList>(Some(&serde_json::json!({"volume": null}))).unwrap();
        assert_eq!(
            a,
            parse::<SnapshotList>(Some(&serde_json::json!({}))).unwrap()
        );
    }

    /// What a client sends parses back to itself, without the fields left unset.
    #[test]
    fn params_round_trip_without_unset_fields() {
        let c = CloneThicken {
            name: "c".into(),
            action: ThickenAction::Pause,
            mib_s: None,
        };
        let v = to_params(&c).unwrap();
        assert_eq!(v, serde_json::json!({"name": "c", "action": "pause"}));
        assert_eq!(parse::<CloneThicken>(Some(&v)).unwrap(), c);
    }

    /// A field oxd gives as `null` where it applies and leaves out where it does not
    /// is written back as it came, either way; fields a newer daemon adds are left out;
    /// a browse is read as the kind it is.
    #[test]
    fn results_read_back_as_they_came() {
        use serde_json::json;
        for v in [
            json!({"name": "a", "listeners": []}),
            json!({"name": "a", "listeners": [], "store": "l", "manifest_key": "k", "seeded": null}),
        ] {
            let r: VolumeCreated = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(&r).unwrap(), v);
        }
        let newer = json!({"name": "a", "listeners": [], "later": 1});
        let r: VolumeCreated = serde_json::from_value(newer).unwrap();
        assert_eq!(r.seeded, None);
        let me = json!({"id": "i", "name": "n"});
        let head = json!({"name": "v", "volume": "u", "prefix": "p", "size_bytes": 1,
            "block_size": 512, "owner": me, "owned_here": true, "since": 0,
            "adopted_from": null, "snapshots": []});
        let mut page = head.clone();
        page["store"] = json!("l");
        page["next"] = json!("x");
        let r: Browsed = serde_json::from_value(page.clone()).unwrap();
        assert!(matches!(&r, Browsed::Volume(p) if p.next.as_deref() == Some("x")));
        assert_eq!(serde_json::to_value(&r).unwrap(), page);
        let mut listed = head;
        listed["more"] = json!(false);
        let store = json!({"store": "l", "appliance": me, "volumes": [listed], "unreadable": []});
        let r: Browsed = serde_json::from_value(store.clone()).unwrap();
        assert!(matches!(&r, Browsed::Store(s) if s.volumes[0].head.name == "v"));
        assert_eq!(serde_json::to_value(&r).unwrap(), store);
    }

    /// Every method once, each with its own name.
    #[test]
    fn every_method_is_listed_once() {
        let mut names: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
