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
use appliance::api::{self, MAX_REQUEST_BYTES, Request, Response, RpcError, code};
use appliance::audit::AuditLog;
use bdev::{Bdev, IoType};
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
static REFUSALS: RateLimited = RateLimited::new(10);
static TIMEOUTS: RateLimited = RateLimited::new(10);
static DENIALS: RateLimited = RateLimited::new(10);

/// Records `what` happening to `who` — counted by the caller; logged and audited only
/// as `limiter` lets it through, with how many were left out since.
fn report(state: &State, limiter: &RateLimited, who: &str, operation: &str, outcome: &str) {
    let Some(left_out) = limiter.admit() else {
        return;
    };
    tracing::warn!("control: {who}: {operation}: {outcome} ({left_out} like it not logged before)");
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
                    tracing::debug!("control: {who}: idle for {:?}, closed", limits.idle_timeout);
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
        let (id, result) = match serde_json::from_slice::<Value>(&line) {
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
                    let result = if req.method == "key_export" && !who.starts_with("uid=0 ") {
                        Err(RpcError::new(
                            code::INVALID_PARAMS,
                            "key_export is served only to root on the local control socket",
                        ))
                    } else {
                        dispatch(state, &req.method, req.params.as_ref())
                    };
                    if let Some(audit) = &state.audit {
                        let outcome = match &result {
                            Ok(_) => "ok".to_string(),
                            Err(e) => format!("error: {}", e.message),
                        };
                        // The token of an `auth` request is never written down.
                        let detail = if req.method == "auth" {
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
        };
        if reply(&mut write, id, result).is_err() {
            return;
        }
    }
}

/// Parameters as an object with only the `allowed` keys.
fn params(p: Option<&Value>, allowed: &[&str]) -> Result<serde_json::Map<String, Value>, RpcError> {
    let map = match p {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                "params must be an object",
            ));
        }
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(RpcError::new(
            code::INVALID_PARAMS,
            format!("unknown parameter {k:?} (known: {})", allowed.join(", ")),
        ));
    }
    Ok(map)
}

fn optional_name(map: &serde_json::Map<String, Value>) -> Result<Option<&str>, RpcError> {
    match map.get("name") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::new(code::INVALID_PARAMS, "name must be a string")),
    }
}

/// Runs one method.
fn dispatch(state: &State, method: &str, p: Option<&Value>) -> Result<Value, RpcError> {
    match method {
        "ox_get_version" => {
            params(p, &[])?;
            Ok(json!({ "api": api::API_VERSION, "oxd": env!("CARGO_PKG_VERSION") }))
        }
        "bdev_get_bdevs" => {
            let map = params(p, &["name"])?;
            let name = optional_name(&map)?;
            let dynamic = state
                .service
                .as_ref()
                .map(|s| s.bdevs())
                .unwrap_or_default();
            let list: Vec<Value> = state
                .bdevs
                .iter()
                .chain(dynamic.iter())
                .filter(|b| name.is_none_or(|n| n == b.name()))
                .map(bdev_json)
                .collect();
            if let (Some(n), true) = (name, list.is_empty()) {
                return Err(RpcError::new(
                    code::NOT_FOUND,
                    format!("no bdev named {n:?}"),
                ));
            }
            Ok(Value::Array(list))
        }
        "nvmf_get_subsystems" => {
            params(p, &[])?;
            // What the target serves now: configured, and volumes' and clones' exports.
            let mut list: Vec<Value> = state
                .target
                .subsystems()
                .iter()
                .map(|s| {
                    let (any, hosts) = match &s.hosts {
                        nvmf::HostPolicy::Any => (true, Vec::new()),
                        nvmf::HostPolicy::Only(h) => (false, h.clone()),
                    };
                    json!({
                        "nqn": s.nqn,
                        "serial": s.serial,
                        "model": s.model,
                        "allow_any_host": any,
                        "hosts": hosts,
                        "listeners": s.listeners.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "namespaces": s.namespaces.iter()
                            .map(|n| json!({"nsid": n.nsid, "bdev": n.bdev.name()}))
                            .collect::<Vec<_>>(),
                    })
                })
                .collect();
            list.sort_by(|a, b| a["nqn"].as_str().cmp(&b["nqn"].as_str()));
            Ok(Value::Array(list))
        }
        "reactor_get_cores" => {
            params(p, &[])?;
            Ok(json!({ "cores": state.cores }))
        }
        "audit_verify" => {
            params(p, &[])?;
            let Some(audit) = &state.audit else {
                return Err(RpcError::new(code::NOT_FOUND, "no audit log is configured"));
            };
            // The entry for this very call is written after the check.
            match appliance::audit::verify(audit.path()) {
                Ok((entries, last)) => Ok(json!({
                    "path": audit.path(), "entries": entries, "last_hash": last, "intact": true
                })),
                Err(e) => {
                    Ok(json!({ "path": audit.path(), "intact": false, "error": e.to_string() }))
                }
            }
        }
        _ => match &state.service {
            Some(service) => ox_method(service, method, p),
            None if OX_METHODS.contains(&method) => Err(RpcError::new(
                code::NOT_FOUND,
                format!("{method}: object exchange is not configured (no [ox] section)"),
            )),
            None => Err(not_found(method)),
        },
    }
}

fn not_found(method: &str) -> RpcError {
    RpcError::new(
        code::METHOD_NOT_FOUND,
        format!("no method {method:?} (see docs/API.md)"),
    )
}

/// Methods served by the volume/snapshot/clone service.
const OX_METHODS: &[&str] = &[
    "volume_create",
    "volume_delete",
    "volume_adopt",
    "volume_list",
    "snapshot_create",
    "snapshot_list",
    "snapshot_verify",
    "snapshot_restore",
    "snapshot_delete",
    "key_rotate",
    "key_list",
    "key_receiver",
    "key_export",
    "key_import",
    "store_list",
    "store_check",
    "store_collect",
    "store_browse",
    "policy_set",
    "policy_delete",
    "policy_list",
    "clone_create",
    "clone_get",
    "clone_delete",
    "clone_thicken",
    "job_get",
    "job_list",
    "job_cancel",
];

fn invalid(msg: impl Into<String>) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, msg)
}

fn get_str<'a>(
    m: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(format!("{key} must be a string"))),
    }
}

fn need_str<'a>(m: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str, RpcError> {
    get_str(m, key)?.ok_or_else(|| invalid(format!("{key} is required")))
}

fn get_u64(m: &serde_json::Map<String, Value>, key: &str) -> Result<Option<u64>, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(format!("{key} must be a non-negative integer"))),
    }
}

fn get_bool(m: &serde_json::Map<String, Value>, key: &str) -> Result<bool, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(format!("{key} must be true or false"))),
    }
}

/// The snapshot named by `snapshot`, `store`, `manifest_key`, `volume` and `latest`,
/// if any: one catalogued here; a manifest in a store; or a volume's snapshot in a
/// store's catalogue, its newest or by ID.
fn snapshot_source(
    m: &serde_json::Map<String, Value>,
) -> Result<Option<crate::service::CloneSource<'_>>, RpcError> {
    use crate::service::{CloneSource, InBucket};
    Ok(Some(
        match (
            get_str(m, "snapshot")?,
            get_str(m, "store")?,
            get_str(m, "manifest_key")?,
            get_str(m, "volume")?,
            get_bool(m, "latest")?,
        ) {
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
fn export_params(m: &serde_json::Map<String, Value>) -> Result<Option<ExportRecord>, RpcError> {
    let Some(nqn) = get_str(m, "nqn")? else {
        if m.contains_key("hosts") || m.contains_key("allow_any_host") {
            return Err(invalid("hosts and allow_any_host need nqn"));
        }
        return Ok(None);
    };
    let hosts = match m.get("hosts") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|h| {
                h.as_str()
                    .map(String::from)
                    .ok_or_else(|| invalid("hosts must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("hosts must be a list of host NQNs")),
    };
    Ok(Some(ExportRecord {
        nqn: nqn.into(),
        hosts,
        allow_any_host: get_bool(m, "allow_any_host")?,
    }))
}

const EXPORT_KEYS: [&str; 3] = ["nqn", "hosts", "allow_any_host"];

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
    RpcError::new(code, appliance::error_chain(&e))
}

fn ox_method(service: &Arc<Service>, method: &str, p: Option<&Value>) -> Result<Value, RpcError> {
    let with = |extra: &[&str]| -> Result<serde_json::Map<String, Value>, RpcError> {
        let keys: Vec<&str> = extra.iter().chain(EXPORT_KEYS.iter()).copied().collect();
        params(p, &keys)
    };
    match method {
        "volume_create" => {
            let m = with(&[
                "name",
                "size_mib",
                "block_size",
                "snapshot",
                "store",
                "manifest_key",
                "volume",
                "latest",
                "seed",
            ])?;
            let seed = get_str(&m, "seed")?;
            if let Some(source) = snapshot_source(&m)? {
                if m.contains_key("size_mib") || m.contains_key("block_size") {
                    return Err(invalid(
                        "a volume over a snapshot takes its size and block size from it",
                    ));
                }
                return service
                    .volume_create_from(need_str(&m, "name")?, source, export_params(&m)?, seed)
                    .map_err(failed);
            }
            if seed.is_some() {
                return Err(invalid("seed applies only to a volume over a snapshot"));
            }
            let size = get_u64(&m, "size_mib")?
                .ok_or_else(|| invalid("size_mib is required"))?
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid("size_mib is too large"))?;
            let bs = get_u64(&m, "block_size")?.unwrap_or(512);
            let bs = u32::try_from(bs).map_err(|_| invalid("block_size must be 512 or 4096"))?;
            service
                .volume_create(need_str(&m, "name")?, size, bs, export_params(&m)?)
                .map_err(failed)
        }
        "volume_delete" => {
            let m = params(p, &["name"])?;
            service.volume_delete(need_str(&m, "name")?).map_err(failed)
        }
        "volume_adopt" => {
            let m = params(p, &["name", "store"])?;
            service
                .volume_adopt(need_str(&m, "name")?, need_str(&m, "store")?)
                .map_err(failed)
        }
        "volume_list" => {
            params(p, &[])?;
            Ok(service.volume_list())
        }
        "snapshot_create" => {
            let m = params(p, &["volume", "store", "key", "verify", "full"])?;
            let verify = match m.get("verify") {
                None | Some(Value::Null) => None,
                Some(_) => Some(get_bool(&m, "verify")?),
            };
            service
                .snapshot_create(
                    need_str(&m, "volume")?,
                    need_str(&m, "store")?,
                    get_str(&m, "key")?,
                    verify,
                    get_bool(&m, "full")?,
                )
                .map_err(failed)
        }
        "snapshot_list" => {
            let m = params(p, &["volume"])?;
            Ok(service.snapshot_list(get_str(&m, "volume")?))
        }
        "snapshot_verify" => {
            let m = params(p, &["id"])?;
            service.snapshot_verify(need_str(&m, "id")?).map_err(failed)
        }
        "snapshot_restore" => {
            let m = with(&["id", "name"])?;
            service
                .snapshot_restore(
                    need_str(&m, "id")?,
                    need_str(&m, "name")?,
                    export_params(&m)?,
                )
                .map_err(failed)
        }
        "snapshot_delete" => {
            let m = params(p, &["id"])?;
            service.snapshot_delete(need_str(&m, "id")?).map_err(failed)
        }
        "key_list" => {
            params(p, &[])?;
            Ok(service.key_list())
        }
        "store_list" => {
            params(p, &[])?;
            Ok(service.store_list())
        }
        "store_check" => {
            let m = params(p, &["name"])?;
            service.store_check(need_str(&m, "name")?).map_err(failed)
        }
        "store_collect" => {
            let m = params(p, &["name", "dry_run"])?;
            service
                .store_collect(need_str(&m, "name")?, get_bool(&m, "dry_run")?)
                .map_err(failed)
        }
        "key_rotate" => {
            let m = params(p, &["to"])?;
            service.key_rotate(need_str(&m, "to")?).map_err(failed)
        }
        "clone_create" => {
            let m = with(&[
                "name",
                "snapshot",
                "store",
                "manifest_key",
                "volume",
                "latest",
                "thicken",
            ])?;
            let source =
                snapshot_source(&m)?.ok_or_else(|| invalid("name the snapshot to clone"))?;
            service
                .clone_create(
                    need_str(&m, "name")?,
                    source,
                    get_bool(&m, "thicken")?,
                    export_params(&m)?,
                )
                .map_err(failed)
        }
        "key_receiver" => {
            params(p, &[])?;
            service.key_receiver().map_err(failed)
        }
        "key_export" => {
            let m = params(p, &["key", "to"])?;
            service
                .key_export(need_str(&m, "key")?, need_str(&m, "to")?)
                .map_err(failed)
        }
        "key_import" => {
            let m = params(p, &["sealed"])?;
            let sealed: ox::transfer::Sealed =
                serde_json::from_value(m.get("sealed").cloned().unwrap_or(Value::Null))
                    .map_err(|e| invalid(format!("sealed: {e}")))?;
            service.key_import(&sealed).map_err(failed)
        }
        "policy_set" => {
            let m = params(
                p,
                &[
                    "volume",
                    "store",
                    "every_s",
                    "key",
                    "keep_last",
                    "hourly",
                    "daily",
                    "weekly",
                    "monthly",
                ],
            )?;
            let policy: ox::policy::Policy = serde_json::from_value(Value::Object(m))
                .map_err(|e| invalid(format!("policy: {e}")))?;
            service.policy_set(policy).map_err(failed)
        }
        "policy_delete" => {
            let m = params(p, &["volume"])?;
            service
                .policy_delete(need_str(&m, "volume")?)
                .map_err(failed)
        }
        "policy_list" => {
            params(p, &[])?;
            Ok(service.policy_list())
        }
        "store_browse" => {
            let m = params(p, &["store", "volume", "limit", "after"])?;
            service
                .store_browse(
                    need_str(&m, "store")?,
                    get_str(&m, "volume")?,
                    get_u64(&m, "limit")?,
                    get_str(&m, "after")?,
                )
                .map_err(failed)
        }
        "clone_get" => {
            let m = params(p, &["name"])?;
            service.clone_get(need_str(&m, "name")?).map_err(failed)
        }
        "clone_delete" => {
            let m = params(p, &["name"])?;
            service.clone_delete(need_str(&m, "name")?).map_err(failed)
        }
        "clone_thicken" => {
            let m = params(p, &["name", "action", "mib_s"])?;
            service
                .clone_thicken(
                    need_str(&m, "name")?,
                    need_str(&m, "action")?,
                    get_u64(&m, "mib_s")?,
                )
                .map_err(failed)
        }
        "job_get" => {
            let m = params(p, &["id"])?;
            let id = get_u64(&m, "id")?.ok_or_else(|| invalid("id is required"))?;
            service.job_get(id).map_err(failed)
        }
        "job_list" => {
            params(p, &[])?;
            Ok(service.job_list())
        }
        "job_cancel" => {
            let m = params(p, &["id"])?;
            let id = get_u64(&m, "id")?.ok_or_else(|| invalid("id is required"))?;
            service.job_cancel(id).map_err(failed)
        }
        _ => Err(not_found(method)),
    }
}

fn bdev_json(b: &Bdev) -> Value {
    let s = b.stats();
    let ops: serde_json::Map<String, Value> = IoType::ALL
        .iter()
        .map(|t| {
            (
                t.name().to_string(),
                json!({"ops": s.ops(*t), "bytes": s.bytes(*t)}),
            )
        })
        .collect();
    json!({
        "name": b.name(),
        "block_size": b.block_size(),
        "num_blocks": b.num_blocks(),
        "size_bytes": b.info().size_bytes(),
        "uuid": b.info().uuid.to_string(),
        "stats": ops,
        "errors": s.errors,
        "latency_us": {
            "mean": s.latency.mean().as_micros() as u64,
            "p50": s.latency.quantile(0.5).as_micros() as u64,
            "p99": s.latency.quantile(0.99).as_micros() as u64,
            "max": s.latency.max().as_micros() as u64,
        },
    })
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
    let token = ox::secret_file::read(token_file)
        .with_context(|| format!("control.token_file {}", token_file.display()))?
        .trim()
        .to_string();
    if token.len() < 16 {
        anyhow::bail!("control.token_file: the token must be at least 16 characters");
    }
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
fn same(a: &[u8], b: &[u8]) -> bool {
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
            let tls = appliance::tls::Duplex::new(rustls::StreamOwned::new(conn, transport));
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
        Some(r) if r.method == "auth" => (
            r.id.clone(),
            r.params
                .as_ref()
                .and_then(|p| p.get("token"))
                .and_then(Value::as_str)
                .unwrap_or(""),
        ),
        _ => (Value::Null, ""),
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
    if reply(&mut stream, id, Ok(json!({ "authenticated": true }))).is_err() {
        return;
    }
    serve_lines(reader, stream, deadline, limits, who, state);
}
