//! The real Linux kernel host: a Debian 6.12 guest booted under QEMU by the
//! workplace's `linux-nvme` tools (`OX_LINUX_NVME`, or `../shared/tools/linux-nvme`
//! from the repository), running a shell script of the test's. The guest reaches this
//! machine as 10.0.2.2; lines it prints starting with `@@ ` are what tests read.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Guest {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn tools() -> PathBuf {
    let dir = std::env::var_os("OX_LINUX_NVME").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/linux-nvme"),
        PathBuf::from,
    );
    assert!(
        dir.join("lib.sh").exists(),
        "{} not found: set OX_LINUX_NVME to the linux-nvme tool directory",
        dir.display()
    );
    dir
}

impl Guest {
    /// Boots a guest that runs `script` (busybox sh, with nvme-cli) and powers off.
    pub fn boot(script: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guest.log");
        let child = Command::new("timeout")
            .arg("240")
            .arg("bash")
            .arg("-c")
            .arg(
                r#". "$1" && lnv_prepare && lnv_boot "$2" "$3" \
                   -netdev user,id=n0 -device virtio-net-pci,netdev=n0"#,
            )
            .arg("_")
            .arg(tools().join("lib.sh"))
            .arg(script)
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    /// What the guest's console has shown so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the console shows `marker`.
    pub fn wait_for(&mut self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(200);
        while !self.console().contains(marker) {
            assert!(
                Instant::now() < deadline,
                "the guest never printed {marker}:\n{}",
                self.console()
            );
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the guest stopped early:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest to power off (it must print `@@ END` last) and returns the
    /// `@@ ` lines, and the whole console for messages.
    pub fn finish(mut self) -> (Vec<String>, String) {
        let status = self.child.wait().unwrap();
        let out = self.console();
        let lines: Vec<String> = out
            .lines()
            .filter_map(|l| l.find("@@ ").map(|i| l[i + 3..].trim_end().to_string()))
            .collect();
        assert!(status.success(), "guest exit {status}:\n{out}");
        assert!(
            lines.iter().any(|l| l == "END"),
            "the guest did not finish:\n{out}"
        );
        (lines, out)
    }
}
