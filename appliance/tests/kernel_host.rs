//! The real Linux kernel NVMe/TCP host (Debian's 6.12 kernel in QEMU, driven by
//! `../shared/tools/linux-nvme/host-check`) against `oxd --config`: discovery, connect,
//! identify, patterns at start/middle/end, 64 MiB sequential write/read with checksums,
//! a refused write past the end, clean disconnect — without and with digests.
//!
//! Needs root (QEMU and the packages host-check installs). Set `OX_LINUX_NVME` to the
//! tool's directory if it is not at `../shared/tools/linux-nvme` from the repository.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const NQN: &str = "nqn.2026-11.io.ox:kernel-host";

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("OX_LINUX_NVME").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/linux-nvme"),
        PathBuf::from,
    );
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: set OX_LINUX_NVME to the linux-nvme tool directory",
        path.display()
    );
    path
}

struct Oxd {
    child: Child,
    data_port: u16,
    discovery_port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Oxd {
    fn drop(&mut self) {
        // SAFETY: signalling a child process we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts oxd serving one 128 MiB RAM namespace on free loopback ports.
fn start_oxd(block_size: u32) -> Oxd {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[nvmf]
discovery_listeners = ["127.0.0.1:0"]

[[bdev]]
name = "ram0"
kind = "malloc"
size_mib = 128
block_size = {block_size}

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
listeners = ["127.0.0.1:0"]
namespaces = ["ram0"]
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_oxd"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut data_port = None;
    let mut discovery_port = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        // "serving subsystem=NQN namespaces=1 on=ADDR" (the log's key=value fields).
        if line.contains(" serving ") && line.contains(&format!("subsystem={NQN} ")) {
            let (_, addr) = line.split_once(" on=").unwrap();
            let addr = addr.split(' ').next().unwrap();
            data_port = Some(addr.rsplit(':').next().unwrap().parse().unwrap());
        }
        if let Some((_, rest)) = line.split_once("listening on ") {
            // Discovery listeners come first.
            let first = rest.split(' ').next().unwrap();
            discovery_port = Some(first.rsplit(':').next().unwrap().parse().unwrap());
            break;
        }
    }
    // Keep draining stdout so oxd never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Oxd {
        child,
        data_port: data_port.expect("oxd did not report its listener"),
        discovery_port: discovery_port.expect("oxd did not report its listeners"),
        _dir: dir,
    }
}

fn host_check(oxd: &Oxd, digest: bool) {
    let mut cmd = Command::new(tool("host-check"));
    cmd.args(["--nqn", NQN])
        .args(["--port", &oxd.data_port.to_string()])
        .args(["--discovery-port", &oxd.discovery_port.to_string()]);
    if digest {
        cmd.arg("--digest");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "host-check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("discover lists"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn linux_host_passes_without_and_with_digests() {
    let oxd = start_oxd(512);
    host_check(&oxd, false);
    host_check(&oxd, true);
}

#[test]
fn linux_host_passes_on_4k_blocks() {
    let oxd = start_oxd(4096);
    host_check(&oxd, false);
}

/// While another address keeps 300 sockets open that never send an ICReq (topping
/// them up as the appliance closes them), the real Linux host still discovers,
/// connects and passes its checks: connections that have not sent Connect never take
/// a real host's place.
#[test]
fn linux_host_passes_among_hundreds_of_idle_sockets() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let oxd = start_oxd(512);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let ports = [oxd.data_port, oxd.discovery_port];
    let flooding = std::sync::Arc::clone(&stop);
    let flood = std::thread::spawn(move || {
        let mut open: Vec<std::net::TcpStream> = Vec::new();
        let mut opened = 0u64;
        while !flooding.load(Ordering::Relaxed) {
            // Drop the sockets the appliance has closed.
            open.retain(|s| {
                let mut b = [0u8; 1];
                matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            while open.len() < 300 {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                let from: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
                s.bind(&from.into()).unwrap();
                let to: std::net::SocketAddr = format!("127.0.0.1:{}", ports[open.len() % 2])
                    .parse()
                    .unwrap();
                s.connect(&to.into()).unwrap();
                s.set_nonblocking(true).unwrap();
                open.push(s.into());
                opened += 1;
            }
            // Paces the flood (a top-up every 100 ms); nothing waits on it.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        opened
    });
    host_check(&oxd, false);
    stop.store(true, Ordering::Relaxed);
    let opened = flood.join().unwrap();
    assert!(opened >= 300, "{opened}");
}
