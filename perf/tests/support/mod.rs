//! What the end-to-end tests of the appliance share: its binaries, a running oxd,
//! command output as JSON, free ports.
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

impl Drop for Oxd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts oxd on `config` and waits until its control socket is up (its stderr is
/// passed through; it is killed when dropped).
pub fn start_oxd(config: &Path) -> Oxd {
    let mut child = Command::new(bin("oxd"))
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
    std::thread::spawn(move || for _ in lines {});
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
