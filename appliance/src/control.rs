//! The control socket: JSON-RPC 2.0 requests from `oxctl` (or any client), one per
//! line, each answered and written to the audit log with the caller's uid and pid.
//! A connection gets its own thread (control traffic is rare and never touches the
//! reactors' I/O path); a malformed request gets an error response and the connection
//! and the daemon carry on. Slots, deadlines and what is refused: [`crate::admission`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bdev::{Bdev, IoType};
use ox_api::api::{self, MAX_REQUEST_BYTES, Request, Response, RpcError, code};
use ox_api::audit::AuditLog;
use ox_api::methods::*;
use serde_json::{Value, json};

use crate::admission::{Deadline, DeadlineStream, Limits, RateLimited, Slots};
use crate::catalogue::ExportRecord;
use crate::service::Service;

/// What the API can see of the running appliance.
pub struct State {
    /// Block devices by configuration order.
    pub bdevs: Vec<Bdev>,
    /// The NVMe/TCP target: what it serves, configured or created at run time.
    pub target: Arc<nvmf::Target>,
    /// Reactor cores.
    pub cores: Vec<usize>,
    /// The audit log, if configured.
    pub audit: Option<Arc<AuditLog>>,
    /// Volumes, clones and snapshots, if `[ox]` is configured.
    pub service: Option<Arc<Service>>,
    /// The reactors, for their busy time.
    pub reactors: Option<Vec<reactor::ReactorHandle>>,
    /// What the control listeners refused and cut short.
    pub guard: ControlCounters,
    /// Hosts' Connect decisions by outcome.
    pub connects: Arc<ConnectCounts>,
}

/// Hosts' Connect decisions counted by outcome ("allowed", or the reason for a
/// refusal; "unrecorded" for those the audit thread fell too far behind to see).
/// Written by the connect audit thread, read by metrics.
#[derive(Debug, Default)]
pub struct ConnectCounts(std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl ConnectCounts {
    /// Counts one decision, and `lost` that were never seen.
    pub fn count(&self, outcome: &'static str, lost: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(outcome).or_default() += 1;
        if lost > 0 {
            *m.entry("unrecorded").or_default() += lost;
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// Counts of the control API's refusals, for metrics.
#[derive(Debug, Default)]
pub struct ControlCounters {
    /// Connections refused for want of a slot (in all, or for their peer).
    pub refused: AtomicU64,
    /// Connections closed at a deadline (authentication or a request).
    pub timed_out: AtomicU64,
    /// Failed authentications (bad or missing token).
    pub auth_failures: AtomicU64,
}

/// Reports of refused, timed-out and denied connections let into the log and the
/// audit log, per kind (each with a count of those left out).
pub(crate) static REFUSALS: RateLimited = RateLimited::new(10);
pub(crate) static TIMEOUTS: RateLimited = RateLimited::new(10);
pub(crate) static DENIALS: RateLimited = RateLimited::new(10);

/// Records `what` happening to `who` — counted by the caller; logged and audited only
/// as `limiter` lets it through, with how many were left out since.
pub(crate) fn report(
    state: &State,
    limiter: &RateLimited,
    who: &str,
    operation: &str,
    outcome: &str,
) {
    let Some(left_out) = limiter.admit() else {
        return;
    };
    tracing::warn!(
        caller = %who,
        operation = %operation,
        outcome = %outcome,
        not_logged_before = left_out,
        "control"
    );
    if let Some(audit) = &state.audit {
        let detail = json!({ "not_recorded_before": left_out });
        if let Err(e) = audit.record(who, operation, detail, outcome) {
            tracing::error!("audit log: {e}");
        }
    }
}

/// A running control socket; removes its file when dropped.
pub struct ControlSocket {
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path` (mode 0600, replacing a stale one) and serves it under
/// `limits` (per-peer limits do not apply: every local client is one peer).
pub fn start(path: &Path, state: Arc<State>, limits: Limits) -> anyhow::Result<ControlSocket> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "control.socket: {} is in use by another daemon",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("control.socket: creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("control.socket: binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control.socket: chmod {}", path.display()))?;
    // The local socket has slots of its own: remote clients never take them.
    let slots = Slots::new(limits);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let slot = match slots.take(None) {
                    Ok(slot) => slot,
                    Err(why) => {
                        state.guard.refused.fetch_add(1, Ordering::Relaxed);
                        report(&state, &REFUSALS, &caller(&stream), "connect", why.name());
                        let _ = reply(
                            &stream,
                            Value::Null,
                            Err(RpcError::new(code::INTERNAL_ERROR, why.name())),
                        );
                        continue;
                    }
                };
                let state = Arc::clone(&state);
                // If the thread cannot start, the closure (slot and stream) is
                // dropped: the client sees EOF and the slot is free again.
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        serve(stream, &state, limits);
                    });
            }
        })
        .context("starting the control thread")?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
    })
}

/// The peer's uid and pid, for the audit log.
fn caller(stream: &UnixStream) -> String {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid socket fd, and a buffer and length that match SO_PEERCRED's ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        format!("uid={} pid={}", cred.uid, cred.pid)
    } else {
        "unknown".into()
    }
}

fn reply(
    mut stream: impl Write,
    id: Value,
    result: Result<Value, RpcError>,
) -> std::io::Result<()> {
    let (result, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let resp = Response {
        jsonrpc: "2.0".into(),
        result,
        error,
        id,
    };
    let mut line = serde_json::to_vec(&resp).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line)
}

fn serve(stream: UnixStream, state: &State, limits: Limits) {
    let who = caller(&stream);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    // A client that stops reading its replies is cut off too.
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let deadline = Deadline::new(limits.idle_timeout);
    let reader = BufReader::new(DeadlineStream::new(read_half, deadline.clone()).take(0));
    serve_lines(reader, stream, &deadline, limits, &who, state);
}

/// Answers requests, one per line, until the peer goes away or misses a deadline:
/// `limits.idle_timeout` for a request to begin, `limits.request_timeout` for the
/// rest of it to arrive.
fn serve_lines<R: Read>(
    mut reader: BufReader<std::io::Take<R>>,
    mut write: impl Write,
    deadline: &Deadline,
    limits: Limits,
    who: &str,
    state: &State,
) {
    loop {
        let mut line = Vec::new();
        reader.get_mut().set_limit(MAX_REQUEST_BYTES as u64 + 1);
        deadline.set_in(limits.idle_timeout);
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::debug!(caller = %who, idle = ?limits.idle_timeout, "control: closed");
                }
                return;
            }
        }
        deadline.set_in(limits.request_timeout);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    state.guard.timed_out.fetch_add(1, Ordering::Relaxed);
                    let outcome =
                        format!("request not complete within {:?}", limits.request_timeout);
                    report(state, &TIMEOUTS, who, "request", &outcome);
                }
                return;
            }
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST_BYTES {
            let _ = reply(
                &mut write,
                Value::Null,
                Err(RpcError::new(
                    code::TOO_LARGE,
                    format!("request longer than {MAX_REQUEST_BYTES} bytes"),
                )),
            );
            return;
        }
        let (id, result) = answer(state, who, &line, true);
        if reply(&mut write, id, result).is_err() {
            return;
        }
    }
}

/// Answers one request line from `who`: parsed, run, written to the audit log (before
/// the answer, which is an error if the entry cannot be written). The same for every
/// listener: the Unix socket, TCP, and the web console. `audit_reads`: audit methods
/// that change nothing too (the console's refresh, every two seconds, would bury the
/// changes in reads and fsync the log three times a second).
pub(crate) fn answer(
    state: &State,
    who: &str,
    line: &[u8],
    audit_reads: bool,
) -> (Value, Result<Value, RpcError>) {
    match serde_json::from_slice::<Value>(line) {
        Err(e) => (
            Value::Null,
            Err(RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}"))),
        ),
        Ok(Value::Array(_)) => (
            Value::Null,
            Err(RpcError::new(
                code::INVALID_REQUEST,
                "batch requests are not supported: send one request per line",
            )),
        ),
        Ok(v) => match serde_json::from_value::<Request>(v) {
            Err(e) => (
                Value::Null,
                Err(RpcError::new(
                    code::INVALID_REQUEST,
                    format!("not a JSON-RPC 2.0 request: {e}"),
                )),
            ),
            Ok(req) if req.jsonrpc != "2.0" => (
                req.id,
                Err(RpcError::new(
                    code::INVALID_REQUEST,
                    "jsonrpc must be \"2.0\"",
                )),
            ),
            Ok(req) => {
                // A key leaves sealed, but for whoever asks: only root on this
                // machine's socket may ask, not a token holder over the network.
                let result = if req.method == KeyExport::NAME && !who.starts_with("uid=0 ") {
                    Err(RpcError::new(
                        code::INVALID_PARAMS,
                        "key_export is served only to root on the local control socket",
                    ))
                } else {
                    dispatch(state, &req.method, req.params.as_ref())
                };
                let audited = audit_reads || !READ_ONLY.contains(&req.method.as_str());
                if let Some(audit) = state.audit.as_ref().filter(|_| audited) {
                    let outcome = match &result {
                        Ok(_) => "ok".to_string(),
                        Err(e) => format!("error: {}", e.message),
                    };
                    // The token of an `auth` request is never written down.
                    let detail = if req.method == Auth::NAME {
                        json!({ "params": "(not recorded)" })
                    } else {
                        json!({ "params": req.params })
                    };
                    if let Err(e) = audit.record(who, &req.method, detail, &outcome) {
                        // An operation that cannot be audited is not answered as done.
                        tracing::error!("audit log: {e}");
                        (
                            req.id,
                            Err(RpcError::new(code::INTERNAL_ERROR, e.to_string())),
                        )
                    } else {
                        (req.id, result)
                    }
                } else {
                    (req.id, result)
                }
            }
        },
    }
}

/// Methods that change nothing (the console does not audit them).
const READ_ONLY: &[&str] = &[
    OxGetVersion::NAME,
    BdevGetBdevs::NAME,
    NvmfGetSubsystems::NAME,
    ReactorGetCores::NAME,
    VolumeList::NAME,
    SnapshotList::NAME,
    KeyList::NAME,
    StoreList::NAME,
    PolicyList::NAME,
    CloneGet::NAME,
    JobGet::NAME,
    JobList::NAME,
];

/// Runs one method.
fn dispatch(state: &State, method: &str, p: Option<&Value>) -> Result<Value, RpcError> {
    match method {
        OxGetVersion::NAME => {
            parse::<OxGetVersion>(p)?;
            typed::<OxGetVersion>(Version {
                api: api::API_VERSION,
                oxd: env!("CARGO_PKG_VERSION").to_string(),
            })
        }
        BdevGetBdevs::NAME => {
            let BdevGetBdevs { name } = parse(p)?;
            let dynamic = state
                .service
                .as_ref()
                .map(|s| s.bdevs())
                .unwrap_or_default();
            let list: Vec<BdevInfo> = state
                .bdevs
                .iter()
                .chain(dynamic.iter())
                .filter(|b| name.as_deref().is_none_or(|n| n == b.name()))
                .map(bdev_info)
                .collect();
            if let (Some(n), true) = (name, list.is_empty()) {
                return Err(RpcError::new(
                    code::NOT_FOUND,
                    format!("no bdev named {n:?}"),
                ));
            }
            typed::<BdevGetBdevs>(list)
        }
        NvmfGetSubsystems::NAME => {
            parse::<NvmfGetSubsystems>(p)?;
            // What the target serves now: configured, and volumes' and clones' exports.
            let connected = state.target.connected();
            let mut list: Vec<SubsystemInfo> = state
                .target
                .subsystems()
                .iter()
                .map(|s| {
                    let (allow_any_host, hosts) = match &s.hosts {
                        nvmf::HostPolicy::Any => (true, Vec::new()),
                        nvmf::HostPolicy::Only(h) => (false, h.clone()),
                    };
                    SubsystemInfo {
                        nqn: s.nqn.clone(),
                        serial: s.serial.clone(),
                        model: s.model.clone(),
                        allow_any_host,
                        hosts,
                        listeners: s.listeners.iter().map(ToString::to_string).collect(),
                        namespaces: s
                            .namespaces
                            .iter()
                            .map(|n| NamespaceInfo {
                                nsid: n.nsid,
                                bdev: n.bdev.name().to_string(),
                            })
                            .collect(),
                        controllers: connected
                            .get(&s.nqn)
                            .into_iter()
                            .flatten()
                            .map(|c| ControllerInfo {
                                cntlid: c.cntlid,
                                hostnqn: c.hostnqn.clone(),
                                io_queues: c.io_queues as u64,
                            })
                            .collect(),
                    }
                })
                .collect();
            list.sort_by(|a, b| a.nqn.cmp(&b.nqn));
            typed::<NvmfGetSubsystems>(list)
        }
        ReactorGetCores::NAME => {
            parse::<ReactorGetCores>(p)?;
            typed::<ReactorGetCores>(Cores {
                cores: state.cores.clone(),
            })
        }
        AuditVerify::NAME => {
            parse::<AuditVerify>(p)?;
            let Some(audit) = &state.audit else {
                return Err(RpcError::new(code::NOT_FOUND, "no audit log is configured"));
            };
            // The entry for this very call is written after the check.
            typed::<AuditVerify>(ox_api::audit::report(audit.path()))
        }
        _ => match &state.service {
            Some(service) => ox_method(service, method, p),
            None if SERVICE_METHODS.contains(&method) => Err(RpcError::new(
                code::NOT_FOUND,
                format!("{method}: object exchange is not configured (no [ox] section)"),
            )),
            None => Err(not_found(method)),
        },
    }
}

/// Method `M`'s result as JSON: oxd answers with the very type clients read, so the
/// two cannot drift apart.
fn typed<M: Method>(result: M::Result) -> Result<Value, RpcError> {
    serde_json::to_value(result)
        .map_err(|e| RpcError::new(code::INTERNAL_ERROR, format!("{}: {e}", M::NAME)))
}

/// What the service did for method `M` ([`typed`]), or why it did not ([`failed`]).
fn served<M: Method>(result: anyhow::Result<M::Result>) -> Result<Value, RpcError> {
    typed::<M>(result.map_err(failed)?)
}

fn not_found(method: &str) -> RpcError {
    RpcError::new(
        code::METHOD_NOT_FOUND,
        format!("no method {method:?} (see docs/API.md)"),
    )
}

/// Methods served by the volume/snapshot/clone service (every method but those
/// [`dispatch`] answers itself, and `auth`).
const SERVICE_METHODS: &[&str] = &[
    VolumeCreate::NAME,
    VolumeDelete::NAME,
    VolumeAdopt::NAME,
    VolumeList::NAME,
    SnapshotCreate::NAME,
    SnapshotList::NAME,
    SnapshotVerify::NAME,
    SnapshotRestore::NAME,
    SnapshotDelete::NAME,
    KeyRotate::NAME,
    KeyList::NAME,
    KeyReceiver::NAME,
    KeyExport::NAME,
    KeyImport::NAME,
    StoreList::NAME,
    StoreCheck::NAME,
    StoreCollect::NAME,
    StoreBrowse::NAME,
    PolicySet::NAME,
    PolicyDelete::NAME,
    PolicyList::NAME,
    CloneCreate::NAME,
    CloneGet::NAME,
    CloneDelete::NAME,
    CloneThicken::NAME,
    JobGet::NAME,
    JobList::NAME,
    JobCancel::NAME,
];

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, msg)
}

/// The snapshot named by `snapshot`, `store`, `manifest_key`, `volume` and `latest`,
/// if any: one catalogued here; a manifest in a store; or a volume's snapshot in a
/// store's catalogue, its newest or by ID.
fn snapshot_source<'a>(
    snapshot: Option<&'a str>,
    store: Option<&'a str>,
    manifest_key: Option<&'a str>,
    volume: Option<&'a str>,
    latest: Option<bool>,
) -> Result<Option<crate::service::CloneSource<'a>>, RpcError> {
    use crate::service::{CloneSource, InBucket};
    let latest = latest.unwrap_or(false);
    Ok(Some(
        match (snapshot, store, manifest_key, volume, latest) {
            (None, None, None, None, false) => return Ok(None),
            (Some(id), None, None, None, false) => CloneSource::Catalogued(id),
            (None, Some(store), Some(key), None, false) => CloneSource::Manifest { store, key },
            (None, Some(store), None, Some(volume), true) => CloneSource::Bucket {
                store,
                volume,
                which: InBucket::Latest,
            },
            (Some(id), Some(store), None, Some(volume), false) => CloneSource::Bucket {
                store,
                volume,
                which: InBucket::Snapshot(id),
            },
            _ => {
                return Err(invalid(
                    "name the snapshot one way: snapshot (catalogued here); store and \
                 manifest_key; or store, volume and latest (or snapshot)",
                ));
            }
        },
    ))
}

/// The export asked for by `nqn`, `hosts` and `allow_any_host`, if any.
fn export_params(
    nqn: Option<String>,
    hosts: Option<Vec<String>>,
    allow_any_host: Option<bool>,
) -> Result<Option<ExportRecord>, RpcError> {
    let Some(nqn) = nqn else {
        if hosts.is_some() || allow_any_host.is_some() {
            return Err(invalid("hosts and allow_any_host need nqn"));
        }
        return Ok(None);
    };
    Ok(Some(ExportRecord {
        nqn,
        hosts: hosts.unwrap_or_default(),
        allow_any_host: allow_any_host.unwrap_or(false),
    }))
}

/// A service error as the client sees it: the code says what kind of refusal it is
/// (or that the daemon failed), the message says why, each cause once.
fn failed(e: anyhow::Error) -> RpcError {
    use crate::refusal::Refusal;
    let code = match e.chain().find_map(|c| c.downcast_ref::<Refusal>()) {
        Some(Refusal::Invalid(_)) => code::INVALID_PARAMS,
        Some(Refusal::NotFound(_)) => code::NOT_FOUND,
        Some(Refusal::Conflict(_)) => code::CONFLICT,
        None => code::INTERNAL_ERROR,
    };
    RpcError::new(code, ox_api::error_chain(&e))
}

fn ox_method(service: &Arc<Service>, method: &str, p: Option<&Value>) -> Result<Value, RpcError> {
    match method {
        VolumeCreate::NAME => {
            let m: VolumeCreate = parse(p)?;
            let source = snapshot_source(
                m.snapshot.as_deref(),
                m.store.as_deref(),
                m.manifest_key.as_deref(),
                m.volume.as_deref(),
                m.latest,
            )?;
            let export = export_params(m.nqn, m.hosts, m.allow_any_host)?;
            if let Some(source) = source {
                if m.size_mib.is_some() || m.block_size.is_some() {
                    return Err(invalid(
                        "a volume over a snapshot takes its size and block size from it",
                    ));
                }
                return served::<VolumeCreate>(service.volume_create_from(
                    &m.name,
                    source,
                    export,
                    m.seed.as_deref(),
                ));
            }
            if m.seed.is_some() {
                return Err(invalid("seed applies only to a volume over a snapshot"));
            }
            let size = m
                .size_mib
                .ok_or_else(|| invalid("size_mib is required"))?
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid("size_mib is too large"))?;
            let bs = m.block_size.unwrap_or(512);
            let bs = u32::try_from(bs).map_err(|_| invalid("block_size must be 512 or 4096"))?;
            served::<VolumeCreate>(service.volume_create(&m.name, size, bs, export))
        }
        VolumeDelete::NAME => {
            let m: VolumeDelete = parse(p)?;
            served::<VolumeDelete>(service.volume_delete(&m.name))
        }
        VolumeAdopt::NAME => {
            let m: VolumeAdopt = parse(p)?;
            served::<VolumeAdopt>(service.volume_adopt(&m.name, &m.store))
        }
        VolumeList::NAME => {
            parse::<VolumeList>(p)?;
            typed::<VolumeList>(service.volume_list())
        }
        SnapshotCreate::NAME => {
            let m: SnapshotCreate = parse(p)?;
            served::<SnapshotCreate>(service.snapshot_create(
                &m.volume,
                &m.store,
                m.key.as_deref(),
                m.verify,
                m.full.unwrap_or(false),
            ))
        }
        SnapshotList::NAME => {
            let m: SnapshotList = parse(p)?;
            typed::<SnapshotList>(service.snapshot_list(m.volume.as_deref()))
        }
        SnapshotVerify::NAME => {
            let m: SnapshotVerify = parse(p)?;
            served::<SnapshotVerify>(service.snapshot_verify(&m.id))
        }
        SnapshotRestore::NAME => {
            let m: SnapshotRestore = parse(p)?;
            let export = export_params(m.nqn, m.hosts, m.allow_any_host)?;
            served::<SnapshotRestore>(service.snapshot_restore(&m.id, &m.name, export))
        }
        SnapshotDelete::NAME => {
            let m: SnapshotDelete = parse(p)?;
            served::<SnapshotDelete>(service.snapshot_delete(&m.id))
        }
        KeyList::NAME => {
            parse::<KeyList>(p)?;
            typed::<KeyList>(service.key_list())
        }
        StoreList::NAME => {
            parse::<StoreList>(p)?;
            typed::<StoreList>(service.store_list())
        }
        StoreCheck::NAME => {
            let m: StoreCheck = parse(p)?;
            served::<StoreCheck>(service.store_check(&m.name))
        }
        StoreCollect::NAME => {
            let m: StoreCollect = parse(p)?;
            served::<StoreCollect>(service.store_collect(&m.name, m.dry_run.unwrap_or(false)))
        }
        KeyRotate::NAME => {
            let m: KeyRotate = parse(p)?;
            served::<KeyRotate>(service.key_rotate(&m.to))
        }
        CloneCreate::NAME => {
            let m: CloneCreate = parse(p)?;
            let source = snapshot_source(
                m.snapshot.as_deref(),
                m.store.as_deref(),
                m.manifest_key.as_deref(),
                m.volume.as_deref(),
                m.latest,
            )?
            .ok_or_else(|| invalid("name the snapshot to clone"))?;
            let export = export_params(m.nqn, m.hosts, m.allow_any_host)?;
            served::<CloneCreate>(service.clone_create(
                &m.name,
                source,
                m.thicken.unwrap_or(false),
                export,
            ))
        }
        KeyReceiver::NAME => {
            parse::<KeyReceiver>(p)?;
            served::<KeyReceiver>(service.key_receiver())
        }
        KeyExport::NAME => {
            let m: KeyExport = parse(p)?;
            served::<KeyExport>(service.key_export(&m.key, &m.to))
        }
        KeyImport::NAME => {
            let m: KeyImport = parse(p)?;
            let sealed: ox::transfer::Sealed =
                serde_json::from_value(m.sealed).map_err(|e| invalid(format!("sealed: {e}")))?;
            served::<KeyImport>(service.key_import(&sealed))
        }
        PolicySet::NAME => {
            let m: PolicySet = parse(p)?;
            served::<PolicySet>(service.policy_set(ox::policy::Policy {
                volume: m.volume,
                store: m.store,
                every_s: m.every_s,
                key: m.key,
                keep_last: m.keep_last.unwrap_or(0),
                hourly: m.hourly.unwrap_or(0),
                daily: m.daily.unwrap_or(0),
                weekly: m.weekly.unwrap_or(0),
                monthly: m.monthly.unwrap_or(0),
            }))
        }
        PolicyDelete::NAME => {
            let m: PolicyDelete = parse(p)?;
            served::<PolicyDelete>(service.policy_delete(&m.volume))
        }
        PolicyList::NAME => {
            parse::<PolicyList>(p)?;
            typed::<PolicyList>(service.policy_list())
        }
        StoreBrowse::NAME => {
            let m: StoreBrowse = parse(p)?;
            served::<StoreBrowse>(service.store_browse(
                &m.store,
                m.volume.as_deref(),
                m.limit,
                m.after.as_deref(),
            ))
        }
        CloneGet::NAME => {
            let m: CloneGet = parse(p)?;
            served::<CloneGet>(service.clone_get(&m.name))
        }
        CloneDelete::NAME => {
            let m: CloneDelete = parse(p)?;
            served::<CloneDelete>(service.clone_delete(&m.name))
        }
        CloneThicken::NAME => {
            let m: CloneThicken = parse(p)?;
            served::<CloneThicken>(service.clone_thicken(&m.name, m.action, m.mib_s))
        }
        JobGet::NAME => {
            let m: JobGet = parse(p)?;
            served::<JobGet>(service.job_get(m.id))
        }
        JobList::NAME => {
            parse::<JobList>(p)?;
            typed::<JobList>(service.job_list())
        }
        JobCancel::NAME => {
            let m: JobCancel = parse(p)?;
            served::<JobCancel>(service.job_cancel(m.id))
        }
        _ => Err(not_found(method)),
    }
}

fn bdev_info(b: &Bdev) -> BdevInfo {
    let s = b.stats();
    let mut stats = IoStats::default();
    for t in IoType::ALL {
        // Every kind of I/O has its field: a new kind does not build until it has one.
        let count = match t {
            IoType::Read => &mut stats.read,
            IoType::Write => &mut stats.write,
            IoType::Flush => &mut stats.flush,
            IoType::WriteZeroes => &mut stats.write_zeroes,
            IoType::Unmap => &mut stats.unmap,
        };
        *count = IoCount {
            ops: s.ops(t),
            bytes: s.bytes(t),
        };
    }
    let us = |d: std::time::Duration| d.as_micros() as u64;
    BdevInfo {
        name: b.name().to_string(),
        block_size: b.block_size(),
        num_blocks: b.num_blocks(),
        size_bytes: b.info().size_bytes(),
        uuid: b.info().uuid.to_string(),
        stats,
        errors: s.errors,
        latency_us: Latency {
            mean: us(s.latency.mean()),
            p50: us(s.latency.quantile(0.5)),
            p99: us(s.latency.quantile(0.99)),
            max: us(s.latency.max()),
        },
    }
}

/// The control token in `token_file` (a secret file, private to this user), at least
/// 16 characters.
pub fn read_token(token_file: &Path) -> anyhow::Result<String> {
    let token = ox::secret_file::read(token_file)
        .with_context(|| format!("control.token_file {}", token_file.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        anyhow::bail!("control.token_file: the token must be at least 16 characters");
    }
    Ok(token)
}

/// Serves the API over TCP at `addr` for remote management (an appliance without a
/// shell), over TLS when `tls` is given (without it, the token crosses the network in
/// the clear), under `limits`. Every connection must first send `{"method": "auth",
/// "params": {"token": T}}` with the token from `token_file`, all of it (and the TLS
/// handshake) within `limits.auth_timeout`; the decision is audited.
pub fn start_tcp(
    addr: SocketAddr,
    token_file: &Path,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    limits: Limits,
) -> anyhow::Result<SocketAddr> {
    let token = read_token(token_file)?;
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("control.listen {addr}"))?;
    let local = listener.local_addr()?;
    let slots = Slots::new(limits);
    let token = Arc::new(token);
    std::thread::Builder::new()
        .name("control-tcp".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(peer) = stream.peer_addr() else {
                    continue;
                };
                let slot = match slots.take(Some(peer.ip())) {
                    Ok(slot) => slot,
                    Err(why) => {
                        // Closed at once, unread: a refused peer costs nothing more.
                        state.guard.refused.fetch_add(1, Ordering::Relaxed);
                        report(
                            &state,
                            &REFUSALS,
                            &format!("tcp {peer}"),
                            "connect",
                            why.name(),
                        );
                        continue;
                    }
                };
                let (state, token, tls) = (Arc::clone(&state), Arc::clone(&token), tls.clone());
                // If the thread cannot start, the closure (slot and stream) is
                // dropped: the client sees EOF and the slot is free again.
                let _ = std::thread::Builder::new()
                    .name("control-tcp-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        serve_tcp(stream, peer, tls, &token, &state, limits);
                    });
            }
        })
        .context("starting the TCP control thread")?;
    Ok(local)
}

/// Equal without revealing where they differ (`subtle`'s constant-time comparison;
/// only the length may show).
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn serve_tcp(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: &str,
    state: &State,
    limits: Limits,
) {
    // The TLS handshake and the token must all come within the authentication
    // deadline: a connection that does not authenticate holds a slot for seconds.
    let deadline = Deadline::new(limits.auth_timeout);
    let _ = stream.set_write_timeout(Some(limits.request_timeout));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    match tls {
        None => {
            let reader = DeadlineStream::new(read_half, deadline.clone());
            let who = format!("tcp {peer}");
            authenticate_and_serve(reader, stream, &deadline, limits, &who, token, state);
        }
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let transport = DeadlineStream::new(stream, deadline.clone());
            let tls = ox_api::tls::Duplex::new(rustls::StreamOwned::new(conn, transport));
            let who = format!("tls {peer}");
            authenticate_and_serve(tls.clone(), tls, &deadline, limits, &who, token, state);
        }
    }
}

/// Reads the token first, then serves requests.
fn authenticate_and_serve(
    read: impl Read,
    stream: impl Write,
    deadline: &Deadline,
    limits: Limits,
    who: &str,
    token: &str,
    state: &State,
) {
    let mut stream = stream;
    let mut reader = BufReader::new(read.take(4096));
    let mut first = Vec::new();
    if let Err(e) = reader.read_until(b'\n', &mut first) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            state.guard.timed_out.fetch_add(1, Ordering::Relaxed);
            let outcome = format!("not authenticated within {:?}", limits.auth_timeout);
            report(state, &TIMEOUTS, who, "authenticate", &outcome);
        }
        return;
    }
    let req: Option<Request> = serde_json::from_slice(&first).ok();
    let (id, given) = match &req {
        Some(r) if r.method == Auth::NAME => (
            r.id.clone(),
            parse::<Auth>(r.params.as_ref()).map_or_else(|_| String::new(), |a| a.token),
        ),
        _ => (Value::Null, String::new()),
    };
    if !same(given.as_bytes(), token.as_bytes()) {
        // Counted always; logged and audited at most 10 a minute, so a flood of bad
        // tokens cannot grow the logs at will.
        state.guard.auth_failures.fetch_add(1, Ordering::Relaxed);
        report(
            state,
            &DENIALS,
            who,
            "authenticate",
            "denied: bad or missing token",
        );
        let _ = reply(
            &mut stream,
            id,
            Err(RpcError::new(
                code::UNAUTHORIZED,
                "authenticate first with a valid token",
            )),
        );
        return;
    }
    if let Some(audit) = &state.audit
        && let Err(e) = audit.record(who, "authenticate", json!({}), "ok")
    {
        tracing::error!("audit log: {e}");
    }
    let welcome = typed::<Auth>(Authenticated {
        authenticated: true,
    });
    if reply(&mut stream, id, welcome).is_err() {
        return;
    }
    serve_lines(reader, stream, deadline, limits, who, state);
}
