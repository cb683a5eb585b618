//! The real Linux kernel host (Debian's 6.12 kernel in QEMU, booted by the workplace's
//! `linux-nvme` tools) reads a volume's SMART / Health log and Identify data from
//! `oxd`: what one connection wrote is reported on another; the counts survive a clean
//! restart and a `kill -9`, which is counted as an unsafe shutdown; nothing is
//! invented (no temperature, no spare); `nvme id-ns` and `nvme list` show how much of
//! a thin volume holds data.
//!
//! Needs root (QEMU). Set `OX_LINUX_NVME` to the tool's directory if it is not at
//! `../shared/tools/linux-nvme` from the repository.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../nvmf/tests/support/guest.rs"]
mod guest;
mod support;

use std::collections::HashMap;

use guest::Guest;
use support::{free_port, start_oxd};

const NQN: &str = "nqn.2026-11.io.ox:health";
const ID1: &str = "0c9a3b52-5e1d-4f0a-8d67-1b2c3d4e5f60";
const ID2: &str = "7a6b5c4d-3e2f-4a1b-9c8d-0e1f2a3b4c5d";

/// The guest: after each start of the appliance (told apart by its power-cycle count,
/// which is what the guest waits for) it connects and reports the health log.
fn guest_script(port: u16) -> String {
    let host = |id: &str| format!("nqn.2014-08.org.nvmexpress:uuid:{id}");
    let (h1, h2) = (host(ID1), host(ID2));
    format!(
        r#"
F="-t tcp -a 10.0.2.2 -s {port} -n {NQN}"
val() {{ sed -n "s/.*\"$1\" *: *\"\{{0,1\}}\([0-9-]*\).*/\1/p" $2 | head -1; }}
ctrl_of() {{ for d in /sys/class/nvme/nvme*; do grep -q "$1" $d/hostnqn 2>/dev/null && basename $d; done | head -1; }}
report() {{
  echo "@@ $1 cycles=$(val power_cycles $2) unsafe=$(val unsafe_shutdowns $2) duw=$(val data_units_written $2) dur=$(val data_units_read $2) temp=$(val temperature $2) spare=$(val avail_spare $2) warn=$(val critical_warning $2)"
}}
await_cycle() {{
  i=0
  while [ $i -lt 900 ]; do
    nvme disconnect-all >/dev/null 2>&1
    nvme connect $F -q {h1} -I {ID1} >/dev/null 2>&1
    c=$(ctrl_of {h1})
    if [ -n "$c" ] && nvme smart-log /dev/$c -n 1 -o json > /tmp/s 2>/dev/null && [ "$(val power_cycles /tmp/s)" = "$1" ]; then return; fi
    sleep 0.2; i=$((i+1))
  done
  echo "@@ FAIL no start with power cycle $1"
}}
await_cycle 1
nvme id-ctrl /dev/$c -o json > /tmp/idc
echo "@@ VER $(val ver /tmp/idc) $(val lpa /tmp/idc) $(val wctemp /tmp/idc)"
nvme id-ns /dev/${{c}}n1 -o json > /tmp/ns
echo "@@ NUSE-EMPTY $(val nuse /tmp/ns) $(val nsze /tmp/ns)"
head -c 4194304 /dev/urandom > /tmp/p
dd if=/tmp/p of=/dev/${{c}}n1 bs=1M oflag=direct conv=fsync 2>/dev/null || echo "@@ FAIL write"
# The writer's connection goes; another host connects and reads the log.
nvme disconnect-all >/dev/null 2>&1
nvme connect $F -q {h2} -I {ID2} > /tmp/c2 2>&1 || echo "@@ FAIL second connect: $(head -c 300 /tmp/c2)"
c2=$(ctrl_of {h2})
nvme smart-log /dev/$c2 -n 1 -o json > /tmp/s2 && report OTHER /tmp/s2
nvme id-ns /dev/${{c2}}n1 -o json > /tmp/ns
echo "@@ NUSE-WRITTEN $(val nuse /tmp/ns)"
nvme list -o json > /tmp/list
echo "@@ USED $(val UsedBytes /tmp/list) $(val PhysicalSize /tmp/list)"
nvme disconnect-all >/dev/null 2>&1
echo "@@ READY 1"
await_cycle 2
report RESTARTED /tmp/s
nvme disconnect-all >/dev/null 2>&1
echo "@@ READY 2"
await_cycle 3
report KILLED /tmp/s
nvme disconnect-all >/dev/null 2>&1
echo "@@ END"
"#
    )
}

/// `key=value` pairs of the `@@ WHAT ...` line.
fn fields(lines: &[String], what: &str) -> HashMap<String, i64> {
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("{what} ")))
        .unwrap_or_else(|| panic!("no {what} line in {lines:?}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(i64::MIN)))
        .collect()
}

fn numbers(lines: &[String], what: &str) -> Vec<u64> {
    let line = lines
        .iter()
        .find(|l| l.starts_with(&format!("{what} ")))
        .unwrap_or_else(|| panic!("no {what} line in {lines:?}"));
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap_or_else(|_| panic!("{line}")))
        .collect()
}

#[test]
fn linux_reads_health_that_outlives_connections_restarts_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\n\
             [[volume]]\nname = \"v\"\nsize_mib = 64\nnqn = \"{NQN}\"\nallow_any_host = true\n",
            socket = d.join("oxd.sock"),
            state = d.join("state"),
        ),
    )
    .unwrap();
    let mut oxd = start_oxd(&config);
    let mut guest = Guest::boot(&guest_script(port));
    guest.wait_for("@@ READY 1");
    // A clean stop (SIGTERM), then the same configuration again.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success());
    oxd = start_oxd(&config);
    guest.wait_for("@@ READY 2");
    oxd.child.kill().unwrap(); // SIGKILL: no chance to save or mark a clean stop
    oxd.child.wait().unwrap();
    let _oxd = start_oxd(&config);
    let (lines, out) = guest.finish();
    assert!(!lines.iter().any(|l| l.starts_with("FAIL")), "{out}");

    let ver = numbers(&lines, "VER");
    assert_eq!(ver[0], 0x20000, "NVMe 2.0:\n{out}");
    assert_eq!(ver[1] & 0x1, 1, "SMART / Health per namespace:\n{out}");
    assert_eq!(ver[2], 0, "no temperature threshold invented:\n{out}");

    // 4 MiB = 8192 sectors: 9 data units (thousands, rounded up), seen from the other
    // host's connection, after a clean restart, and after kill -9.
    let other = fields(&lines, "OTHER");
    assert_eq!(
        other["duw"], 9,
        "written on one connection, read on another:\n{out}"
    );
    assert_eq!((other["cycles"], other["unsafe"]), (1, 0), "{out}");
    assert_eq!(other["temp"], 0, "0 K: no temperature reported:\n{out}");
    assert_eq!((other["spare"], other["warn"]), (0, 0), "{out}");
    let restarted = fields(&lines, "RESTARTED");
    assert_eq!(restarted["duw"], 9, "kept across a clean restart:\n{out}");
    assert_eq!((restarted["cycles"], restarted["unsafe"]), (2, 0), "{out}");
    assert!(restarted["dur"] >= other["dur"], "{out}");
    let killed = fields(&lines, "KILLED");
    assert_eq!(killed["duw"], 9, "kept across kill -9:\n{out}");
    assert_eq!(
        (killed["cycles"], killed["unsafe"]),
        (3, 1),
        "kill -9 is an unsafe shutdown:\n{out}"
    );

    // A thin 64 MiB volume: nothing held before the write, about 4 MiB after.
    let empty = numbers(&lines, "NUSE-EMPTY");
    let nsze = empty[1];
    assert_eq!(nsze, (64 << 20) / 512, "{out}");
    assert!(
        empty[0] < nsze / 16,
        "a new thin volume is not in use:\n{out}"
    );
    let written = numbers(&lines, "NUSE-WRITTEN")[0];
    assert!(
        (8192..nsze / 4).contains(&written),
        "4 MiB written to a 64 MiB volume: {written} of {nsze} blocks in use:\n{out}"
    );
    let used = numbers(&lines, "USED");
    assert_eq!(used[0], written * 512, "nvme list shows the same:\n{out}");
    assert_eq!(used[1], nsze * 512, "{out}");
}
