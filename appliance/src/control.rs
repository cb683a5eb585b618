//! The control socket: JSON-RPC 2.0 requests from `oxctl` (or any client), one per
//! line, each answered and written to the audit log with the caller's uid and pid.
//! A connection gets its own thread (control traffic is rare and never touches the
//! reactors' I/O path); a malformed request gets an error response and the connection
//! and the daemon carry on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context;
use appliance::api::{self, MAX_REQUEST_BYTES, Request, Response, RpcError, code};
use appliance::audit::AuditLog;
use bdev::{Bdev, IoType};
use serde_json::{Value, json};

use crate::catalogue::ExportRecord;
use crate::config::SubsystemSection;
use crate::service::Service;

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;

/// What the API can see of the running appliance.
pub struct State {
    /// Block devices by configuration order.
    pub bdevs: Vec<Bdev>,
    /// Subsystems as configured, with their bound listeners.
    pub subsystems: Vec<(SubsystemSection, Vec<String>)>,
    /// Reactor cores.
    pub cores: Vec<usize>,
    /// The audit log, if configured.
    pub audit: Option<Arc<AuditLog>>,
    /// Volumes, clones and snapshots, if `[ox]` is configured.
    pub service: Option<Arc<Service>>,
    /// The reactors, for their busy time.
    pub reactors: Option<Vec<reactor::ReactorHandle>>,
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

/// Binds the socket at `path` (mode 0600, replacing a stale one) and serves it.
pub fn start(path: &Path, state: Arc<State>) -> anyhow::Result<ControlSocket> {
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
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let _ = reply(
                        &stream,
                        Value::Null,
                        Err(RpcError::new(code::INTERNAL_ERROR, "too many connections")),
                    );
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (state, done) = (Arc::clone(&state), Arc::clone(&active));
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        serve(stream, &state);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    // The closure (and its stream) is gone: the client sees EOF.
                    active.fetch_sub(1, Ordering::SeqCst);
                }
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

fn serve(stream: UnixStream, state: &State) {
    let who = caller(&stream);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    serve_lines(read_half, stream, &who, state);
}

/// Answers requests, one per line, until the peer goes away.
fn serve_lines(read: impl Read, mut write: impl Write, who: &str, state: &State) {
    let mut reader = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = Vec::new();
        reader.get_mut().set_limit(MAX_REQUEST_BYTES as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
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
            Ok(v) => match serde_json::from_value::<Request>(v) {
                Err(e) => (
                    Value::Null,
                    Err(RpcError::new(code::INVALID_REQUEST, e.to_string())),
                ),
                Ok(req) if req.jsonrpc != "2.0" => (
                    req.id,
                    Err(RpcError::new(
                        code::INVALID_REQUEST,
                        "jsonrpc must be \"2.0\"",
                    )),
                ),
                Ok(req) => {
                    let result = dispatch(state, &req.method, req.params.as_ref());
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
            Ok(Value::Array(
                state
                    .subsystems
                    .iter()
                    .map(|(s, listeners)| {
                        json!({
                            "nqn": s.nqn,
                            "serial": s.serial,
                            "model": s.model,
                            "allow_any_host": s.allow_any_host,
                            "hosts": s.hosts,
                            "listeners": listeners,
                            "namespaces": s.namespaces.iter().enumerate()
                                .map(|(i, n)| json!({"nsid": i + 1, "bdev": n}))
                                .collect::<Vec<_>>(),
                        })
                    })
                    .collect(),
            ))
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
    "volume_list",
    "snapshot_create",
    "snapshot_list",
    "snapshot_verify",
    "snapshot_restore",
    "snapshot_delete",
    "key_rotate",
    "key_list",
    "store_list",
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

fn failed(e: anyhow::Error) -> RpcError {
    let text = format!("{e:#}");
    let code = if text.starts_with("no ") || text.contains(": no ") {
        code::NOT_FOUND
    } else {
        code::INTERNAL_ERROR
    };
    RpcError::new(code, text)
}

fn ox_method(service: &Arc<Service>, method: &str, p: Option<&Value>) -> Result<Value, RpcError> {
    let with = |extra: &[&str]| -> Result<serde_json::Map<String, Value>, RpcError> {
        let keys: Vec<&str> = extra.iter().chain(EXPORT_KEYS.iter()).copied().collect();
        params(p, &keys)
    };
    match method {
        "volume_create" => {
            let m = with(&["name", "size_mib", "block_size"])?;
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
        "volume_list" => {
            params(p, &[])?;
            Ok(service.volume_list())
        }
        "snapshot_create" => {
            let m = params(p, &["volume", "store", "key"])?;
            service
                .snapshot_create(
                    need_str(&m, "volume")?,
                    need_str(&m, "store")?,
                    get_str(&m, "key")?,
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
        "key_rotate" => {
            let m = params(p, &["to"])?;
            service.key_rotate(need_str(&m, "to")?).map_err(failed)
        }
        "clone_create" => {
            let m = with(&["name", "snapshot", "store", "manifest_key", "thicken"])?;
            let source = match (get_str(&m, "store")?, get_str(&m, "manifest_key")?) {
                (Some(s), Some(k)) => Some((s, k)),
                (None, None) => None,
                _ => return Err(invalid("store and manifest_key go together")),
            };
            service
                .clone_create(
                    need_str(&m, "name")?,
                    get_str(&m, "snapshot")?,
                    source,
                    get_bool(&m, "thicken")?,
                    export_params(&m)?,
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
/// the clear). Every connection must first send `{"method": "auth", "params":
/// {"token": T}}` with the token from `token_file`; the decision is audited.
pub fn start_tcp(
    addr: SocketAddr,
    token_file: &Path,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
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
    let active = Arc::new(AtomicUsize::new(0));
    let token = Arc::new(token);
    std::thread::Builder::new()
        .name("control-tcp".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (state, done, token, tls) = (
                    Arc::clone(&state),
                    Arc::clone(&active),
                    Arc::clone(&token),
                    tls.clone(),
                );
                let spawned = std::thread::Builder::new()
                    .name("control-tcp-conn".into())
                    .spawn(move || {
                        serve_tcp(stream, tls, &token, &state);
                        done.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .context("starting the TCP control thread")?;
    Ok(local)
}

/// Equal without revealing where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn serve_tcp(
    stream: std::net::TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    token: &str,
    state: &State,
) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".into(), |a| a.to_string());
    // The token (and the TLS handshake before it) must come at once: a connection
    // that does not authenticate holds a slot for seconds, not minutes.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let Ok(socket) = stream.try_clone() else {
        return;
    };
    match tls {
        None => {
            let Ok(read_half) = stream.try_clone() else {
                return;
            };
            authenticate_and_serve(
                read_half,
                stream,
                &socket,
                &format!("tcp {peer}"),
                token,
                state,
            );
        }
        Some(config) => {
            let Ok(conn) = rustls::ServerConnection::new(config) else {
                return;
            };
            let tls = appliance::tls::Duplex::new(rustls::StreamOwned::new(conn, stream));
            let who = format!("tls {peer}");
            authenticate_and_serve(tls.clone(), tls, &socket, &who, token, state);
        }
    }
}

/// Reads the token first, then serves requests; `socket` is the TCP stream beneath
/// (for its timeouts).
fn authenticate_and_serve(
    read: impl Read,
    stream: impl Write,
    socket: &std::net::TcpStream,
    who: &str,
    token: &str,
    state: &State,
) {
    let mut stream = stream;
    let mut reader = BufReader::new(read.take(4096));
    let mut first = Vec::new();
    if reader.read_until(b'\n', &mut first).is_err() {
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
    let ok = same(given.as_bytes(), token.as_bytes());
    if let Some(audit) = &state.audit {
        let result = if ok {
            "ok"
        } else {
            "denied: bad or missing token"
        };
        // Failed attempts are recorded at most DENIALS_PER_MINUTE a minute (with a
        // count of those left out), so a connection flood cannot grow the log at will.
        if let Some(suppressed) = DENIALS.admit(ok) {
            let detail = json!({ "denials_not_recorded_before": suppressed });
            if let Err(e) = audit.record(who, "authenticate", detail, result) {
                tracing::error!("audit log: {e}");
            }
        }
    }
    if !ok {
        tracing::warn!("control: {who} failed to authenticate");
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
    if reply(&mut stream, id, Ok(json!({ "authenticated": true }))).is_err() {
        return;
    }
    let _ = socket.set_read_timeout(Some(std::time::Duration::from_secs(600)));
    // Whatever the client sent after the token is still in the reader's buffer.
    reader.get_mut().set_limit(u64::MAX);
    serve_lines(reader, stream, who, state);
}

/// Denied authentications recorded per minute at most.
const DENIALS_PER_MINUTE: u32 = 10;

/// Limits how many denied authentications reach the audit log.
struct Denials(std::sync::Mutex<(std::time::Instant, u32, u64)>);

static DENIALS: std::sync::LazyLock<Denials> =
    std::sync::LazyLock::new(|| Denials(std::sync::Mutex::new((std::time::Instant::now(), 0, 0))));

impl Denials {
    /// Whether to record this attempt (successes always are); if so, how many denials
    /// were left out since the last one recorded.
    fn admit(&self, ok: bool) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.elapsed() >= std::time::Duration::from_secs(60) {
            *s = (std::time::Instant::now(), 0, s.2);
        }
        if ok || s.1 < DENIALS_PER_MINUTE {
            if !ok {
                s.1 += 1;
            }
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}
