//! oxperf's DH-HMAC-CHAP against the Linux kernel's target (nvmet-tcp in Debian's 6.12
//! kernel under QEMU, configured through configfs with host secrets): one way and
//! both ways it authenticates and moves verified data; a wrong secret is refused, and
//! so is a target that cannot prove the controller secret oxperf holds. (nvmet picks
//! the first offered group other than its configured one, NULL by default, so it
//! refuses a host that offers only NULL and, with oxperf's offer, uses ffdhe2048.)
//!
//! Needs root (QEMU). Set `OX_LINUX_NVME` to the linux-nvme tool directory if it is not
//! at `../shared/tools/linux-nvme` from the repository.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nvmf::dhchap::{DhchapKey, Hash};
use support::{bin, free_port, run};

const NQN: &str = "nqn.2026-11.io.ox:kernel-auth";
const ONE_WAY: &str = "nqn.2026-11.io.ox:oxperf-one-way";
const BOTH_WAYS: &str = "nqn.2026-11.io.ox:oxperf-both-ways";

fn lib() -> PathBuf {
    let dir = std::env::var_os("OX_LINUX_NVME").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/linux-nvme"),
        PathBuf::from,
    );
    let lib = dir.join("lib.sh");
    assert!(
        lib.exists(),
        "{} not found: set OX_LINUX_NVME",
        lib.display()
    );
    lib
}

/// The guest: a RAM disk exported by nvmet to the two hosts, with their secrets (and
/// a controller secret for the second), on guest port 4420.
fn guest_script(one_way: &str, both_ways: &str, ctrl: &str) -> String {
    format!(
        r#"
insmod /mods/brd.ko rd_nr=1 rd_size=65536 2>/dev/null
mount -t configfs none /sys/kernel/config
N=/sys/kernel/config/nvmet
S=$N/subsystems/{NQN}
mkdir $S && echo 0 > $S/attr_allow_any_host
mkdir $S/namespaces/1 && echo -n /dev/ram0 > $S/namespaces/1/device_path && echo 1 > $S/namespaces/1/enable
mkdir $N/hosts/{ONE_WAY} && echo "{one_way}" > $N/hosts/{ONE_WAY}/dhchap_key
mkdir $N/hosts/{BOTH_WAYS} && echo "{both_ways}" > $N/hosts/{BOTH_WAYS}/dhchap_key
echo "{ctrl}" > $N/hosts/{BOTH_WAYS}/dhchap_ctrl_key
ln -s $N/hosts/{ONE_WAY} $S/allowed_hosts/{ONE_WAY}
ln -s $N/hosts/{BOTH_WAYS} $S/allowed_hosts/{BOTH_WAYS}
P=$N/ports/1; mkdir $P
echo ipv4 > $P/addr_adrfam; echo tcp > $P/addr_trtype; echo 0.0.0.0 > $P/addr_traddr; echo 4420 > $P/addr_trsvcid
ln -s $S $P/subsystems/{NQN} && echo "@@ READY" || echo "@@ FAILED"
while :; do sleep 3600; done
"#
    )
}

struct Guest {
    child: std::process::Child,
    qemu_pid: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.qemu_pid)
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            // SAFETY: signalling the QEMU process this test started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn oxperf(port: u16, host: &str, secrets: &[&str]) -> Output {
    let target = format!("127.0.0.1:{port},{NQN}");
    let mut args = vec![
        "run",
        "--target",
        &target,
        "-w",
        "randrw",
        "--ios",
        "512",
        "--qd",
        "4",
        "--bs",
        "4096",
        "--verify",
        "--cores",
        "0",
        "--quiet",
        "--timeout",
        "60",
        "--hostnqn",
        host,
    ];
    args.extend_from_slice(secrets);
    run(&bin("oxperf"), &args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn oxperf_authenticates_to_the_linux_kernel_target() {
    let secret = |bytes, t| DhchapKey::generate(bytes, t).unwrap().encode();
    let one_way = secret(32, Some(Hash::Sha256));
    let both_ways = secret(48, None);
    let ctrl = secret(64, Some(Hash::Sha512));
    let wrong = secret(32, Some(Hash::Sha256));
    let dir = tempfile::tempdir().unwrap();
    let (log, qemu_pid) = (dir.path().join("guest.log"), dir.path().join("qemu.pid"));
    let port = free_port();
    let child = Command::new("timeout")
        .arg("600")
        .arg("bash")
        .arg("-c")
        .arg(
            r#". "$1" && lnv_prepare && LNV_MEM=640 LNV_QPID="$4" lnv_boot "$2" "$3" \
               -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$5-:4420" -device virtio-net-pci,netdev=n0"#,
        )
        .arg("_")
        .arg(lib())
        .arg(guest_script(&one_way, &both_ways, &ctrl))
        .arg(&log)
        .arg(&qemu_pid)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut guest = Guest {
        child,
        qemu_pid,
        log,
        _dir: dir,
    };
    let console = |g: &Guest| std::fs::read_to_string(&g.log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(200);
    while !console(&guest).contains("@@ READY") {
        assert!(
            !console(&guest).contains("@@ FAILED"),
            "configfs set-up failed:\n{}",
            console(&guest)
        );
        assert!(
            Instant::now() < deadline && guest.child.try_wait().unwrap().is_none(),
            "the kernel target never got ready:\n{}",
            console(&guest)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let ok = oxperf(port, ONE_WAY, &["--dhchap-secret", &one_way]);
    assert!(
        ok.status.success(),
        "one way: {}\n{}",
        text(&ok),
        console(&guest)
    );
    let both = oxperf(
        port,
        BOTH_WAYS,
        &["--dhchap-secret", &both_ways, "--dhchap-ctrl-secret", &ctrl],
    );
    assert!(both.status.success(), "both ways: {}", text(&both));
    let refused = oxperf(port, ONE_WAY, &["--dhchap-secret", &wrong]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("authentication refused"),
        "{}",
        text(&refused)
    );
    let liar = oxperf(
        port,
        BOTH_WAYS,
        &[
            "--dhchap-secret",
            &both_ways,
            "--dhchap-ctrl-secret",
            &wrong,
        ],
    );
    assert!(!liar.status.success());
    assert!(
        text(&liar).contains("could not prove the controller secret"),
        "{}",
        text(&liar)
    );
    let none = oxperf(port, ONE_WAY, &[]);
    assert!(!none.status.success());
    assert!(text(&none).contains("to authenticate"), "{}", text(&none));
    drop(guest);
}
