//! `oxctl` against a running `oxd`: every command, the JSON-RPC error codes for hostile
//! requests (the connection and the daemon carry on), and the audit log's chain
//! checked online, offline and after tampering.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

struct Daemon {
    child: Child,
    socket: PathBuf,
    audit: PathBuf,
    tcp: String,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn oxd_path() -> PathBuf {
    // oxd is built next to oxctl (same target directory) by `cargo test --workspace`.
    let p = Path::new(env!("CARGO_BIN_EXE_oxctl")).with_file_name("oxd");
    assert!(
        p.exists(),
        "{} is missing: build it (cargo build -p appliance)",
        p.display()
    );
    p
}

fn start() -> Daemon {
    start_with("")
}

/// A daemon whose `[control]` section ends with `control_extra`.
fn start_with(control_extra: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, control_extra)
}

fn start_in(dir: tempfile::TempDir, control_extra: &str) -> Daemon {
    let socket = dir.path().join("run/oxd.sock");
    let audit = dir.path().join("audit.log");
    let config = format!(
        "[reactors]\ncores = \"0\"\n\
         [[bdev]]\nname = \"vol0\"\nkind = \"malloc\"\nsize_mib = 16\n\
         [[subsystem]]\nnqn = \"nqn.2026-11.io.ox:vol0\"\nlisteners = [\"127.0.0.1:0\"]\n\
         namespaces = [\"vol0\"]\nallow_any_host = true\n\
         [control]\nsocket = {socket:?}\naudit_log = {audit:?}\n\
         listen = \"127.0.0.1:{port}\"\ntoken_file = {token:?}\n{control_extra}",
        port = free_port(),
        token = dir.path().join("token"),
    );
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef-secret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.path().join("oxd.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(oxd_path())
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut tcp = String::new();
    loop {
        let Some(line) = lines.next() else {
            // Why it stopped, for the failure's report (a port taken meanwhile, say).
            let mut why = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut why);
            panic!("oxd exited before serving: {why}");
        };
        let line = line.unwrap();
        if let Some((_, rest)) = line.split_once("control API on tcp ") {
            tcp = rest.split(' ').next().unwrap().to_string();
        }
        if line.contains(" control socket ") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Daemon {
        child,
        socket,
        audit,
        tcp,
        dir,
    }
}

fn oxctl(d: &Daemon, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_oxctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .output()
        .unwrap();
    // oxctl falls back to JSON (and succeeds) when it cannot read an answer as text:
    // for this very build's daemon that is a bug of oxctl's.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("cannot show oxd's answer as text"),
        "oxctl {args:?}: {stderr}"
    );
    out
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "oxctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// What oxctl printed for people, having succeeded.
fn human(o: &Output) -> String {
    assert!(
        o.status.success(),
        "oxctl failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The JSON's shape: its keys, all the way down.
fn shape(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        _ => Value::Null,
    }
}

/// `raw`, oxd's answer to method `M`, read as `M`'s typed result — which, written back,
/// has the same shape (a field on one side only fails).
fn typed_as<M: ox_api::methods::Method>(raw: &serde_json::Value) -> M::Result {
    let typed = ox_api::api::decode::<M>(raw).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(shape(&back), shape(raw), "{}: {raw}", M::NAME);
    typed
}

#[test]
fn oxctl_shows_what_oxd_serves() {
    use ox_api::methods as m;
    let d = start();
    let v = json(&oxctl(&d, &["version", "--json"]));
    assert_eq!(typed_as::<m::OxGetVersion>(&v).api, 1);
    let b = json(&oxctl(&d, &["bdevs", "--json"]));
    assert_eq!(b[0]["name"], "vol0");
    assert_eq!(b[0]["size_bytes"], 16 << 20);
    typed_as::<m::BdevGetBdevs>(&b);
    let s = json(&oxctl(&d, &["subsystems", "--json"]));
    assert_eq!(s[0]["nqn"], "nqn.2026-11.io.ox:vol0");
    assert_eq!(s[0]["namespaces"][0]["bdev"], "vol0");
    let listener = typed_as::<m::NvmfGetSubsystems>(&s)[0].listeners[0].clone();
    assert!(listener.starts_with("127.0.0.1:"), "{listener}");
    let cores = json(&oxctl(&d, &["call", "reactor_get_cores"]));
    assert_eq!(typed_as::<m::ReactorGetCores>(&cores).cores, [0]);
    // Human output too, read from the typed results.
    assert_eq!(
        human(&oxctl(&d, &["version"])),
        format!("oxd {} (control API 1)\n", env!("CARGO_PKG_VERSION"))
    );
    let out = human(&oxctl(&d, &["bdevs"]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("NAME                     SIZE  BLOCK"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("vol0                 16.0 MiB    512            0"),
        "{out}"
    );
    assert_eq!(
        human(&oxctl(&d, &["subsystems"])),
        format!(
            "nqn.2026-11.io.ox:vol0\n  listeners:  {listener}\n  namespace 1: vol0\n  \
             hosts:      any\n"
        )
    );
    // A missing device is a clear error and a failing exit status.
    let o = oxctl(&d, &["bdevs", "--name", "nope"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no bdev named \"nope\""));
    // The socket is the service's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn hostile_requests_get_json_rpc_errors_and_the_connection_carries_on() {
    let d = start();
    let stream = UnixStream::connect(&d.socket).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut ask = |line: &[u8]| -> serde_json::Value {
        w.write_all(line).unwrap();
        w.write_all(b"\n").unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let cases: [(&[u8], i64); 6] = [
        (b"{not json", -32700),
        (b"[1,2,3]", -32600),
        (
            br#"{"jsonrpc":"1.0","method":"ox_get_version","id":1}"#,
            -32600,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"volume_explode","id":2}"#,
            -32601,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":{"nmae":"x"},"id":3}"#,
            -32602,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"bdev_get_bdevs","params":[1],"id":4}"#,
            -32602,
        ),
    ];
    for (line, code) in cases {
        let a = ask(line);
        assert_eq!(
            a["error"]["code"],
            code,
            "{}: {a}",
            String::from_utf8_lossy(line)
        );
    }
    // Still served on the same connection.
    let a = ask(br#"{"jsonrpc":"2.0","method":"ox_get_version","id":9}"#);
    assert_eq!(a["result"]["api"], 1);
    assert_eq!(a["id"], 9);
    // An oversized request is refused and only that connection is closed.
    let mut big = UnixStream::connect(&d.socket).unwrap();
    let junk = vec![b'x'; (1 << 20) + 10];
    let _ = big.write_all(&junk);
    let mut answer = String::new();
    BufReader::new(&big).read_line(&mut answer).unwrap();
    assert!(answer.contains("-32002"), "{answer}");
    let v = json(&oxctl(&d, &["version", "--json"]));
    assert_eq!(v["api"], 1);
}

#[test]
fn the_audit_log_records_every_call_and_tampering_is_detected() {
    let mut d = start();
    json(&oxctl(&d, &["bdevs", "--json"]));
    let o = oxctl(&d, &["call", "bdev_get_bdevs", r#"{"name":"nope"}"#]);
    assert!(!o.status.success());
    let online = json(&oxctl(&d, &["audit", "verify", "--json"]));
    assert_eq!(online["intact"], true);
    typed_as::<ox_api::methods::AuditVerify>(&online);
    // SIGTERM: the daemon records its stop.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    assert!(d.child.wait().unwrap().success());
    let text = std::fs::read_to_string(&d.audit).unwrap();
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "start",
            "bdev_get_bdevs",
            "bdev_get_bdevs",
            "audit_verify",
            "stop"
        ]
    );
    assert!(entries[1]["caller"].as_str().unwrap().starts_with("uid="));
    assert_eq!(entries[1]["result"], "ok");
    assert!(
        entries[2]["result"]
            .as_str()
            .unwrap()
            .contains("no bdev named")
    );
    let file = d.audit.to_str().unwrap().to_string();
    let offline = json(&oxctl(&d, &["audit", "verify", &file, "--json"]));
    assert_eq!(offline["entries"], 5);
    let out = human(&oxctl(&d, &["audit", "verify", &file]));
    assert_eq!(
        out,
        format!(
            "{file}: intact, 5 entries, last hash {}\n",
            offline["last_hash"].as_str().unwrap()
        )
    );
    // Someone rewrites history: a failed call made to look successful.
    std::fs::write(&d.audit, text.replacen("error: no bdev", "ok, no bdev", 1)).unwrap();
    let o = oxctl(&d, &["audit", "verify", &file]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("BROKEN") && out.contains("line 3"), "{out}");
}

#[test]
fn remote_management_over_tcp_needs_the_token_and_is_audited() {
    let d = start();
    let good = d.dir.path().join("token");
    let bad = d.dir.path().join("bad");
    std::fs::write(&bad, "not-the-token-at-all").unwrap();
    let remote = |token: &Path| {
        Command::new(env!("CARGO_BIN_EXE_oxctl"))
            .args(["--connect", &d.tcp, "--token-file"])
            .arg(token)
            .args(["version", "--json"])
            .output()
            .unwrap()
    };
    assert_eq!(json(&remote(&good))["api"], 1);
    let o = remote(&bad);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("authenticate first"));
    // The answer to a good token, as its type reads it.
    let mut s = std::net::TcpStream::connect(&d.tcp).unwrap();
    s.write_all(
        b"{\"jsonrpc\":\"2.0\",\"method\":\"auth\",\"params\":{\"token\":\"0123456789abcdef-secret\"},\"id\":1}\n",
    )
    .unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(typed_as::<ox_api::methods::Auth>(&answer["result"]).authenticated);
    // A raw connection that skips authentication gets nothing else.
    let mut s = std::net::TcpStream::connect(&d.tcp).unwrap();
    s.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"bdev_get_bdevs\",\"id\":1}\n")
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    assert!(answer.contains("-32003"), "{answer}");
    let log = std::fs::read_to_string(&d.audit).unwrap();
    assert_eq!(log.matches("\"action\":\"authenticate\"").count(), 4);
    assert_eq!(log.matches("denied: bad or missing token").count(), 2);
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    (c, k)
}

#[test]
fn remote_management_over_tls_trusts_only_the_daemons_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "oxd");
    let (other, _) = certificate(dir.path(), "other");
    let d = start_in(
        dir,
        &format!("tls_cert_file = {cert:?}\ntls_key_file = {key:?}\n"),
    );
    let token = d.dir.path().join("token");
    let remote = |ca: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_oxctl"));
        c.args(["--connect", &d.tcp, "--token-file"]).arg(&token);
        if let Some(ca) = ca {
            c.arg("--ca-file").arg(ca);
        }
        c.args(["version", "--json"]).output().unwrap()
    };
    assert_eq!(json(&remote(Some(&cert)))["api"], 1);
    let stranger = remote(Some(&other));
    assert!(!stranger.status.success());
    assert!(
        String::from_utf8_lossy(&stranger.stderr).contains("invalid peer certificate"),
        "{}",
        String::from_utf8_lossy(&stranger.stderr)
    );
    // Plain TCP against the TLS port gets nowhere, and the token never left in clear.
    let plain = remote(None);
    assert!(!plain.status.success());
    let log = std::fs::read_to_string(&d.audit).unwrap();
    assert!(log.contains("\"caller\":\"tls 127.0.0.1:"), "{log}");
    assert_eq!(
        log.matches("\"action\":\"authenticate\"").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("0123456789abcdef"), "no token in the log");
}

#[test]
fn half_a_tls_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(dir.path(), "oxd");
    let socket = dir.path().join("oxd.sock");
    std::fs::write(dir.path().join("token"), "0123456789abcdef-secret\n").unwrap();
    let config = format!(
        "[control]\nsocket = {socket:?}\nlisten = \"127.0.0.1:0\"\n\
         token_file = {:?}\ntls_cert_file = {cert:?}\n",
        dir.path().join("token")
    );
    let path = dir.path().join("oxd.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(oxd_path())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give both tls_cert_file and tls_key_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP connection to `to` from the loopback address `from` (a peer of its own).
fn connect_from(from: &str, to: &str) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    let to: std::net::SocketAddr = to.parse().unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// Waits until the daemon closes `s` (EOF or reset), sending `dribble` a byte at a
/// time meanwhile if given; returns the bytes sent. Panics if the daemon never does.
fn closed_by_daemon(s: &mut std::net::TcpStream, dribble: bool) -> usize {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0;
    let mut buf = [0u8; 256];
    // A byte every 100 ms, far inside any per-read timeout; 600 of them (a minute)
    // without being closed would mean there is no total deadline.
    while sent < 600 {
        match s.read(&mut buf) {
            Ok(0) => return sent,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return sent,
        }
        if dribble {
            if s.write_all(b" ").is_err() {
                return sent;
            }
            sent += 1;
        }
    }
    panic!("the daemon kept a connection open that never authenticated");
}

#[test]
fn slow_and_many_clients_cannot_lock_out_management() {
    let d = start_with("auth_timeout_s = 1\nmax_connections = 8\nmax_connections_per_peer = 3\n");
    let good = d.dir.path().join("token");
    let remote = || {
        Command::new(env!("CARGO_BIN_EXE_oxctl"))
            .args(["--connect", &d.tcp, "--token-file"])
            .arg(&good)
            .args(["version", "--json"])
            .output()
            .unwrap()
    };
    // One address opens 20 connections: it gets 3 slots, the rest are closed at once.
    let mut crowd: Vec<_> = (0..20).map(|_| connect_from("127.0.0.2", &d.tcp)).collect();
    // Others fill every slot left, each one connection that never authenticates.
    let mut squatters: Vec<_> = (3..8)
        .map(|i| connect_from(&format!("127.0.0.{}", 10 + i), &d.tcp))
        .collect();
    // Meanwhile the local operator is never locked out: the Unix socket has its own.
    assert_eq!(json(&oxctl(&d, &["version", "--json"]))["api"], 1);
    // A dribbler, a byte every 100 ms, is closed at its total deadline.
    let mut dribbler = loop {
        // Wait for a slot: the squatters' deadline frees them.
        let mut s = connect_from("127.0.0.3", &d.tcp);
        s.set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut s, &mut b) {
            Ok(0) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            _ => break s,
        }
    };
    closed_by_daemon(&mut dribbler, true);
    for s in crowd.iter_mut().chain(squatters.iter_mut()) {
        closed_by_daemon(s, false);
    }
    // The remote operator gets in once the squatters' deadline has passed.
    loop {
        let o = remote();
        if o.status.success() {
            assert_eq!(json(&o)["api"], 1);
            break;
        }
    }
    // Bad tokens, many of them: each refused, but only ten a minute are written down.
    let bad = d.dir.path().join("bad");
    std::fs::write(&bad, "not-the-token-at-all").unwrap();
    for _ in 0..30 {
        let o = Command::new(env!("CARGO_BIN_EXE_oxctl"))
            .args(["--connect", &d.tcp, "--token-file"])
            .arg(&bad)
            .args(["version", "--json"])
            .output()
            .unwrap();
        assert!(!o.status.success());
    }
    let log = std::fs::read_to_string(&d.audit).unwrap();
    assert!(
        log.contains("too many connections from this address"),
        "refusals are audited"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("tcp 127.0.0.3:") && l.contains("not authenticated within 1s")),
        "the dribbler was cut off at its deadline, and audited"
    );
    assert!(
        log.matches("too many connections").count() <= 10,
        "refusals are rate-limited"
    );
    assert_eq!(
        log.matches("denied: bad or missing token").count(),
        10,
        "denials are rate-limited"
    );
}

/// Against a daemon of another build that does not know a method (here a stand-in on
/// a socket, answering as an older oxd would), oxctl says which builds met; against
/// one of the same build, a refusal is shown as it is.
#[test]
fn an_unknown_method_at_another_build_says_which_builds_met() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("old.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let serve = |version: &'static str, error: serde_json::Value| {
        let listener = listener.try_clone().unwrap();
        std::thread::spawn(move || {
            // oxctl's call, then its version query, on one connection.
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for _ in 0..2 {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let req: serde_json::Value = serde_json::from_str(&line).unwrap();
                let answer = if req["method"] == "ox_get_version" {
                    serde_json::json!({"jsonrpc": "2.0", "id": req["id"],
                        "result": {"api": 1, "oxd": version}})
                } else {
                    serde_json::json!({"jsonrpc": "2.0", "id": req["id"], "error": error})
                };
                writeln!(writer, "{answer}").unwrap();
            }
        })
    };
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_oxctl"))
            .arg("--socket")
            .arg(&socket)
            .args(["store", "collect", "s3"])
            .output()
            .unwrap()
    };
    let no_method = serde_json::json!({"code": -32601, "message": "no method \"store_collect\""});
    let old = serve("0.0.1", no_method.clone());
    let out = run();
    old.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("oxd 0.0.1 (API 1) is another build than oxctl"),
        "{err}"
    );
    assert!(err.contains("no method"), "{err}");

    // A parameter it does not take, in the words of builds before typed parameters.
    let unknown = serde_json::json!({"code": -32602,
        "message": "unknown parameter \"dry_run\" (known: name)"});
    let old = serve("0.0.1", unknown);
    let out = run();
    old.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is another build than oxctl"), "{err}");

    let same = serve(env!("CARGO_PKG_VERSION"), no_method);
    let out = run();
    same.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("another build"), "{err}");
    assert!(err.contains("no method"), "{err}");
}

/// A daemon with volumes (`[ox]`: local store `l`, key `k`, exports on `export`).
fn start_with_ox(export: u16) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let kek = dir.path().join("kek");
    std::fs::write(&kek, "77".repeat(32)).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    // The `[control]` section is the file's last: what follows it are new sections.
    let ox = format!(
        "[ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{export}\"]\n\
         [[store]]\nname = \"l\"\nkind = \"local\"\npath = {objects:?}\n\
         [[key]]\nname = \"k\"\nfile = {kek:?}\n",
        state = dir.path().join("state"),
        objects = dir.path().join("objects"),
    );
    start_in(dir, &ox)
}

/// The volume, snapshot, clone, store and policy commands' output for people, each
/// read from its method's typed result.
#[test]
fn the_service_commands_show_what_oxd_answers() {
    let port = free_port();
    let d = start_with_ox(port);
    let run = |args: &[&str]| human(&oxctl(&d, args));
    assert_eq!(
        run(&["volume", "create", "a", "--size-mib", "4"]),
        "created a (not exported)\n"
    );
    assert_eq!(
        run(&[
            "volume",
            "create",
            "x",
            "--size-mib",
            "4",
            "--nqn",
            "nqn.2026-11.io.ox:x",
            "--allow-any-host"
        ]),
        format!("created x, exported on 127.0.0.1:{port}\n")
    );
    let out = run(&["snapshot", "create", "a", "--store", "l"]);
    let id = json(&oxctl(&d, &["snapshot", "list", "--json"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        out.starts_with(&format!("snapshot {id} of a: 0 chunks read, ")),
        "{out}"
    );
    let out = run(&["snapshot", "list"]);
    assert!(out.lines().nth(1).unwrap().starts_with(&id), "{out}");
    assert_eq!(
        run(&["clone", "create", "c", "--snapshot", &id]),
        "created c (not exported)\n"
    );
    let out = run(&["clone", "get", "c"]);
    assert!(
        out.contains("\n  hydrated      0.0% (0 of 64 chunks)\n")
            && out.contains("\n  fetched (thickening ) 0 B\n"),
        "{out}"
    );
    assert_eq!(
        run(&[
            "volume",
            "create",
            "f",
            "--from-store",
            "l",
            "--from-volume",
            "a",
            "--latest",
            "--seed",
            "a"
        ]),
        "created f (not exported)\n"
    );
    let out = run(&["volume", "list"]);
    assert!(
        out.contains("\nx                volume       4.0 MiB         -  nqn.2026-11.io.ox:x\n")
            && out.contains("\nc                clone        4.0 MiB      0.0%  -\n"),
        "{out}"
    );
    let out = run(&["store", "check", "l"]);
    assert_eq!(out.lines().count(), 6, "{out}");
    assert!(out.lines().all(|l| l.ends_with(" ms  ok")), "{out}");
    let out = run(&["store", "collect", "l", "--dry-run"]);
    assert!(
        out.starts_with("would collect 0 objects (0 bytes)"),
        "{out}"
    );
    for args in [
        &["store", "browse", "l"][..],
        &["store", "browse", "l", "--volume", "a"],
    ] {
        let out = run(args);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("a  ") && lines[0].ends_with(" (this appliance)"),
            "{out}"
        );
        assert!(
            lines[1].starts_with(&format!("    {id} ")) && lines[1].ends_with("key k"),
            "{out}"
        );
    }
    run(&["policy", "set", "a", "--store", "l", "--every", "3600"]);
    let out = run(&["policy", "list"]);
    assert!(out.starts_with("a  every 3600s into l  RPO now "), "{out}");
    let out = run(&["volume", "adopt", "a", "--store", "l"]);
    assert!(
        out.starts_with("a in l is this appliance's now (adopted from "),
        "{out}"
    );
    assert_eq!(run(&["clone", "delete", "c"]), "deleted c\n");
    assert_eq!(run(&["volume", "delete", "f"]), "deleted f\n");
}
