//! The control socket: JSON-RPC 2.0 requests from `oxctl` (or any client), one per
//! line, each answered and written to the audit log with the caller's uid and pid.
//! A connection gets its own thread (control traffic is rare and never touches the
//! reactors' I/O path); a malformed request gets an error response and the connection
//! and the daemon carry on.

use std::io::{BufRead, BufReader, Read, Write};
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

use crate::config::SubsystemSection;

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
    mut stream: &UnixStream,
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
    let mut reader = BufReader::new(read_half.take(u64::MAX));
    loop {
        let mut line = Vec::new();
        reader.get_mut().set_limit(MAX_REQUEST_BYTES as u64 + 1);
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST_BYTES {
            let _ = reply(
                &stream,
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
                        let detail = json!({ "params": req.params });
                        if let Err(e) = audit.record(&who, &req.method, detail, &outcome) {
                            // An operation that cannot be audited is not answered as done.
                            eprintln!("oxd: {e}");
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
        if reply(&stream, id, result).is_err() {
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
            let list: Vec<Value> = state
                .bdevs
                .iter()
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
        _ => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("no method {method:?} (see docs/API.md)"),
        )),
    }
}

fn bdev_json(b: &Bdev) -> Value {
    let s = b.stats();
    let kinds = [
        ("read", IoType::Read),
        ("write", IoType::Write),
        ("flush", IoType::Flush),
        ("write_zeroes", IoType::WriteZeroes),
        ("unmap", IoType::Unmap),
    ];
    let ops: serde_json::Map<String, Value> = kinds
        .iter()
        .map(|(k, t)| {
            (
                k.to_string(),
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
