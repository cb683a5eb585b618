//! What the end-to-end tests of the appliance share: its binaries, a running oxd,
//! oxctl and oxperf runs, command output as JSON, free ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

pub fn bin(name: &str) -> PathBuf {
    // oxd and oxctl are built next to oxperf by `cargo test --workspace`.
    let p = Path::new(env!("CARGO_BIN_EXE_oxperf")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: cargo build --workspace",
        p.display()
    );
    p
}

pub struct Oxd {
    pub child: Child,
}

/// A process killed and reaped when dropped, so a test that fails midway leaves none
/// behind (a host load started for minutes, say).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Oxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts oxd on `config` and waits until its control socket is up (its stderr is
/// passed through, and its stdout too when `OXD_ECHO` is set; it is killed when
/// dropped).
pub fn start_oxd(config: &Path) -> Oxd {
    start_oxd_with(config, &[])
}

/// [`start_oxd`] with these environment variables set (`Some`) or removed (`None`).
pub fn start_oxd_with(config: &Path, env: &[(&str, Option<&str>)]) -> Oxd {
    let mut command = Command::new(bin("oxd"));
    for (k, v) in env {
        match v {
            Some(v) => command.env(k, v),
            None => command.env_remove(k),
        };
    }
    let mut child = command
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let Some(line) = lines.next() else {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("oxd exited before serving:\n{err}");
        };
        if line.unwrap().contains(" control socket ") {
            break;
        }
    }
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
        }
    });
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if std::env::var_os("OXD_ECHO").is_some() {
                eprintln!("oxd| {l}");
            }
        }
    });
    Oxd { child }
}

pub fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

pub fn ok_json(o: Output) -> Value {
    assert!(
        o.status.success(),
        "failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A plain HTTP GET of `path` on 127.0.0.1:`port`: the whole answer, headers included.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: oxd\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a secret file (a key, an S3 secret) as an operator must: owner-only.
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub struct Ctl {
    pub socket: String,
}

impl Ctl {
    pub fn call(&self, args: &[&str]) -> Output {
        let mut all = vec!["--socket", &self.socket, "--json"];
        all.extend_from_slice(args);
        run(&bin("oxctl"), &all)
    }

    pub fn ok(&self, args: &[&str]) -> Value {
        ok_json(self.call(args))
    }

    /// Job `id` once it is no longer running (a test fails after ten minutes of it).
    pub fn finished(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
        loop {
            let j = self.ok(&["job", "get", id]);
            if j["state"] != "running" {
                return j;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} still running: {j}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until snapshot job `id` has begun examining chunks (its point in time is
    /// taken and its journal written).
    pub fn examining(&self, id: &str) {
        while self.ok(&["job", "get", id])["done"].as_u64() == Some(0) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The `[[store]]` block naming the S3 server of `s3` as `name` (its secret written to a
/// file in `d`, as an operator would), and the access key.
pub fn s3_store(s3: &ox::store::s3::S3Config, d: &Path, name: &str) -> (String, String) {
    let ox::store::s3::CredentialSource::Static {
        access_key,
        secret_key,
    } = &s3.credentials
    else {
        panic!("the test server has static credentials")
    };
    let secret = d.join("s3.secret");
    write_private(&secret, secret_key);
    let block = format!(
        "[[store]]\nname = \"{name}\"\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\n\
         credentials = \"static\"\naccess_key = \"{access_key}\"\nsecret_key_file = {secret:?}\n\
         allow_http = true\n",
        s3.endpoint, s3.bucket
    );
    (block, access_key.clone())
}

/// oxperf over `range` (FIRST:COUNT blocks) of `target`, `bs` bytes at a time.
pub fn oxperf(target: &str, workload: &str, range: &str, ios: u64, bs: u32, seed: u64) -> Value {
    oxperf_with(target, workload, range, ios, bs, seed, &[])
}

/// [`oxperf`] with `extra` arguments (`--flush`).
pub fn oxperf_with(
    target: &str,
    workload: &str,
    range: &str,
    ios: u64,
    bs: u32,
    seed: u64,
    extra: &[&str],
) -> Value {
    let ios = ios.to_string();
    let bs = bs.to_string();
    let seed = seed.to_string();
    let mut args = vec![
        "run", "--target", target, "-w", workload, "--bs", &bs, "--range", range, "--ios", &ios,
        "--qd", "8", "--verify", "--seed", &seed, "--cores", "0", "--json",
    ];
    args.extend_from_slice(extra);
    ok_json(run(&bin("oxperf"), &args))
}

pub fn verified(r: &Value) -> u64 {
    assert!(r["mismatch"].is_null(), "data mismatch: {r}");
    assert_eq!(r["unwritten_blocks"], 0, "{r}");
    r["verified_blocks"].as_u64().unwrap()
}
