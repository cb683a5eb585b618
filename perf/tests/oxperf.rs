//! `oxperf` end to end: discovery, workloads with verify against the appliance's
//! NVMe/TCP target (in this process), a target that corrupts data caught by verify,
//! clear errors for bad targets, and verify against the Linux kernel target (nvmet-tcp
//! in QEMU, `../shared/tools/linux-nvme/kernel-target`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::rc::Rc;

use bdev::{
    BackendChannel, Bdev, BdevBackend, BdevError, BdevInfo, BdevIo, IoDone, IoType, create_malloc,
};
use nvmf::{HostPolicy, Limits, Namespace, Subsystem, Target, TargetConfig};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const NQN: &str = "nqn.2026-11.io.ox:perf";

fn oxperf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oxperf"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n{}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads pass through to `inner`, except that one byte of LBA `bad_lba` is flipped.
struct Corrupting {
    inner: Bdev,
    bad_lba: u64,
}

struct CorruptingChannel {
    inner: Rc<bdev::Channel>,
    bad_lba: u64,
    block: usize,
}

impl BdevBackend for Corrupting {
    fn supports(&self, io_type: IoType) -> bool {
        self.inner.supports(io_type)
    }

    fn create_channel(&self, info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        Ok(Box::new(CorruptingChannel {
            inner: self.inner.channel()?,
            bad_lba: self.bad_lba,
            block: info.block_size as usize,
        }))
    }
}

impl BackendChannel for CorruptingChannel {
    fn submit(&self, io: BdevIo, done: IoDone) {
        let (start, n, read) = (io.offset_blocks, io.num_blocks, io.io_type == IoType::Read);
        let (bad, block) = (self.bad_lba, self.block);
        self.inner.submit(io, move |mut c| {
            if read && (start..start + n).contains(&bad) {
                let at = (bad - start) as usize * block + 100;
                let mut left = at;
                for buf in &mut c.bufs {
                    if left < buf.len() {
                        buf[left] ^= 0x5A;
                        break;
                    }
                    left -= buf.len();
                }
            }
            done.complete(c)
        });
    }
}

struct Appliance {
    set: Option<ReactorSet>,
    addr: SocketAddr,
    /// The namespace's device, whose counters show a host's commands arriving.
    dev: Bdev,
    _target: Target,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(s) = self.set.take() {
            s.shutdown().unwrap();
        }
    }
}

fn appliance(corrupt_lba: Option<u64>) -> Appliance {
    let set = ReactorSet::start(ReactorConfig::new(
        CoreList::from_cores(&CoreList::available()[..1]).unwrap(),
    ))
    .unwrap();
    let ram = create_malloc("ram", 512, 64 * 2048, None).unwrap();
    let dev = match corrupt_lba {
        Some(bad_lba) => Bdev::new(
            BdevInfo {
                name: "corrupting".into(),
                ..ram.info().clone()
            },
            Corrupting {
                inner: ram,
                bad_lba,
            },
        )
        .unwrap(),
        None => ram,
    };
    let config = TargetConfig {
        subsystems: vec![Subsystem {
            nqn: NQN.into(),
            serial: "PERF1".into(),
            model: "OX perf test".into(),
            hosts: HostPolicy::Any,
            namespaces: vec![Namespace::new(1, dev.clone())],
            listeners: vec!["127.0.0.1:0".parse().unwrap()],
            host_keys: Vec::new(),
        }],
        discovery_listeners: vec![],
        limits: Limits::default(),
        socket_io: Default::default(),
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    Appliance {
        addr: target.local_addrs()[0],
        set: Some(set),
        dev,
        _target: target,
    }
}

fn target_arg(addr: SocketAddr) -> String {
    format!("{addr},{NQN},1")
}

fn core() -> String {
    CoreList::available().last().unwrap().to_string()
}

#[test]
fn verify_passes_against_the_appliance_across_runs() {
    let a = appliance(None);
    let t = target_arg(a.addr);
    let c = core();
    // Write the first 8 MiB, then read it back in a separate run (same seed).
    let w = oxperf(&[
        "run", "--target", &t, "-w", "write", "--bs", "65536", "--qd", "8", "--range", "0:16384",
        "--ios", "128", "--verify", "--cores", &c, "--quiet",
    ]);
    assert!(w.status.success(), "{}", text(&w));
    let r = oxperf(&[
        "run", "--target", &t, "-w", "read", "--bs", "4096", "--qd", "16", "--range", "0:16384",
        "--ios", "2048", "--verify", "--cores", &c, "--json",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(report["verified_blocks"], 16384);
    assert_eq!(report["unwritten_blocks"], 0);
    assert_eq!(report["total"]["errors"], 0);
    // The same with SQ flow control kept on (each read's data is then followed by a
    // response capsule, which oxperf must wait for): everything still verifies.
    let r = oxperf(&[
        "run",
        "--target",
        &t,
        "-w",
        "read",
        "--bs",
        "8192",
        "--qd",
        "16",
        "--range",
        "0:16384",
        "--ios",
        "1024",
        "--verify",
        "--sq-flow-control",
        "--cores",
        &c,
        "--json",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(report["verified_blocks"], 16384);
    assert_eq!(report["total"]["errors"], 0);
    // Mixed random load with verification on two queue pairs, with digests, time-bound.
    let m = oxperf(&[
        "run",
        "--target",
        &t,
        "-w",
        "randrw",
        "--read-pct",
        "60",
        "--qd",
        "32",
        "--qpairs",
        "2",
        "--time",
        "1",
        "--verify",
        "--digest",
        "both",
        "--cores",
        &c,
        "--json",
    ]);
    assert!(m.status.success(), "{}", text(&m));
    let report: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(report["queues"].as_array().unwrap().len(), 2);
    assert!(report["total"]["iops"].as_f64().unwrap() > 0.0);
    assert!(report["total"]["latency"]["p99_us"].as_f64().unwrap() > 0.0);
    assert!(report["mismatch"].is_null());
}

#[test]
fn verify_catches_a_target_that_returns_wrong_data() {
    let a = appliance(Some(1234));
    let t = target_arg(a.addr);
    let c = core();
    let w = oxperf(&[
        "run", "--target", &t, "-w", "write", "--bs", "4096", "--range", "0:4096", "--ios", "512",
        "--verify", "--cores", &c, "--quiet",
    ]);
    assert!(w.status.success(), "{}", text(&w));
    let r = oxperf(&[
        "run", "--target", &t, "-w", "read", "--bs", "4096", "--range", "0:4096", "--ios", "512",
        "--verify", "--cores", &c, "--quiet",
    ]);
    assert_eq!(r.status.code(), Some(3), "{}", text(&r));
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        out.contains("VERIFY FAILED: data mismatch at LBA 1234"),
        "{out}"
    );
    assert!(out.contains("bad checksum"), "{out}");
}

#[test]
fn discovery_and_clear_errors() {
    let a = appliance(None);
    let d = oxperf(&["discover", &a.addr.to_string(), "--json"]);
    assert!(d.status.success(), "{}", text(&d));
    let log: serde_json::Value = serde_json::from_slice(&d.stdout).unwrap();
    // The discovery subsystem's own entry first, then the subsystem.
    assert_eq!(log[0]["subnqn"], "nqn.2014-08.org.nvmexpress.discovery");
    assert_eq!(log[0]["subtype"], 3);
    assert_eq!(log[1]["subnqn"], NQN);
    assert_eq!(log[1]["trsvcid"], a.addr.port().to_string());

    let c = core();
    let wrong = oxperf(&[
        "run",
        "--target",
        &format!("{},nqn.2026-11.io.ox:nope", a.addr),
        "--time",
        "1",
        "--cores",
        &c,
    ]);
    assert!(!wrong.status.success());
    assert!(
        text(&wrong).contains("rejected Connect") && text(&wrong).contains("invalid subsystem NQN"),
        "{}",
        text(&wrong)
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = oxperf(&[
        "run",
        "--target",
        &format!("{closed},{NQN}"),
        "--time",
        "1",
        "--cores",
        &c,
    ]);
    assert!(
        text(&unreachable).contains(&format!("connecting to {closed}")),
        "{}",
        text(&unreachable)
    );

    let big = oxperf(&[
        "run",
        "--target",
        &target_arg(a.addr),
        "--bs",
        "4194304",
        "--cores",
        &c,
    ]);
    assert!(
        text(&big).contains("exceeds the controller's maximum transfer"),
        "{}",
        text(&big)
    );
    let ns = oxperf(&[
        "run",
        "--target",
        &format!("{},{NQN},7", a.addr),
        "--cores",
        &c,
    ]);
    assert!(
        text(&ns).contains("Identify failed: invalid namespace"),
        "{}",
        text(&ns)
    );
    let core = oxperf(&["run", "--target", &target_arg(a.addr), "--cores", "4096"]);
    assert!(
        text(&core).contains("core 4096 is not available"),
        "{}",
        text(&core)
    );
}

fn kernel_target_tool() -> PathBuf {
    let dir = std::env::var_os("OX_LINUX_NVME").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/linux-nvme"),
        PathBuf::from,
    );
    let path = dir.join("kernel-target");
    assert!(
        path.exists(),
        "{} not found: set OX_LINUX_NVME",
        path.display()
    );
    path
}

#[test]
fn verify_passes_against_the_linux_kernel_target() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nqn = "nqn.2026-11.io.ox:kernel-target";
    let mut child = Command::new(kernel_target_tool())
        .args([
            "--nqn",
            nqn,
            "--port",
            &port.to_string(),
            "--size-mib",
            "64",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        if line.unwrap().trim() == "READY" {
            ready = true;
            break;
        }
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(child);
    assert!(ready, "kernel-target did not become ready");
    let t = format!("127.0.0.1:{port},{nqn},1");
    let c = core();
    let d = oxperf(&[
        "discover",
        &format!("127.0.0.1:{port}"),
        "--json",
        "--timeout",
        "30",
    ]);
    assert!(d.status.success(), "{}", text(&d));
    assert!(String::from_utf8_lossy(&d.stdout).contains(nqn));
    let w = oxperf(&[
        "run",
        "--target",
        &t,
        "-w",
        "write",
        "--bs",
        "131072",
        "--qd",
        "4",
        "--range",
        "0:8192",
        "--ios",
        "32",
        "--verify",
        "--cores",
        &c,
        "--quiet",
        "--timeout",
        "60",
    ]);
    assert!(w.status.success(), "{}", text(&w));
    let r = oxperf(&[
        "run",
        "--target",
        &t,
        "-w",
        "randrw",
        "--read-pct",
        "70",
        "--qd",
        "8",
        "--range",
        "0:8192",
        "--ios",
        "2000",
        "--verify",
        "--digest",
        "both",
        "--cores",
        &c,
        "--json",
        "--timeout",
        "60",
    ]);
    assert!(r.status.success(), "{}", text(&r));
    let report: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(report["verified_blocks"].as_u64().unwrap() > 0);
    assert!(report["mismatch"].is_null());
}

#[test]
fn several_targets_in_one_run_and_an_iops_cap() {
    let a = appliance(None);
    let b = appliance(None);
    let c = core();
    let out = oxperf(&[
        "run",
        "--target",
        &target_arg(a.addr),
        "--target",
        &target_arg(b.addr),
        "-w",
        "randread",
        "--qd",
        "4",
        "--time",
        "1",
        "--rate",
        "2000",
        "--cores",
        &c,
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let queues = r["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2, "one queue pair per target");
    for q in queues {
        assert!(q["reads"].as_u64().unwrap() > 0, "{q}");
    }
    // The cap is an upper bound: never more than 2,000 a second over the time measured
    // (and what the two queues may have in flight at its start). How far below it a
    // slow machine stays is for benchmarks, not for this test.
    let done = r["total"]["reads"].as_f64().unwrap();
    let seconds = r["seconds"].as_f64().unwrap();
    assert!(
        done <= 2000.0 * seconds + 2.0 * 4.0 + 2.0,
        "{done} reads in {seconds} s under a 2000/s cap"
    );
}

#[test]
fn ctrl_c_prints_the_partial_result() {
    let a = appliance(None);
    let c = core();
    let child = Command::new(env!("CARGO_BIN_EXE_oxperf"))
        .args([
            "run",
            "--target",
            &target_arg(a.addr),
            "--time",
            "60",
            "--qd",
            "4",
            "--cores",
            &c,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupted once its reads reach the device (its handler is set before it
    // starts them).
    let asked = std::time::Instant::now();
    while a.dev.stats().ops(IoType::Read) == 0 {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(60),
            "oxperf never read"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["interrupted"], true);
    assert!(r["total"]["reads"].as_u64().unwrap() > 0);
    assert!(r["seconds"].as_f64().unwrap() < 30.0);
}
