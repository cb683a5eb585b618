//! The real Linux kernel host (Debian's 6.12 kernel in QEMU, booted by the workplace's
//! `linux-nvme` tools) keeps a persistent discovery controller on the target; when a
//! subsystem is added, the target's discovery log change notice reaches the kernel
//! (which reports it as an `NVME_AEN` uevent) and a new discovery lists the subsystem.
//!
//! Needs root (QEMU). Set `OX_LINUX_NVME` to the tool's directory if it is not at
//! `../shared/tools/linux-nvme` from the repository.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::net::SocketAddr;

use bdev::create_malloc;
use nvmf::{HostPolicy, Limits, Namespace, SocketIo, Subsystem, Target, TargetConfig};
use reactor::{CoreList, ReactorConfig, ReactorSet};
use support::guest::Guest;

const FIRST: &str = "nqn.2026-11.io.ox:first";
const ADDED: &str = "nqn.2026-11.io.ox:added-later";
/// The guest has no /etc/nvme/hostnqn: name the host (its host ID is the NQN's UUID).
const HOST_ID: &str = "4f1e0a3c-7b2d-4c59-9e61-2a8d5c0b7e13";

fn subsystem(nqn: &str, listener: SocketAddr) -> Subsystem {
    Subsystem {
        nqn: nqn.into(),
        serial: "OXDISC".into(),
        model: "OX test".into(),
        hosts: HostPolicy::Any,
        namespaces: vec![Namespace::new(
            1,
            create_malloc(nqn, 512, 2048, None).unwrap(),
        )],
        listeners: vec![listener],
        host_keys: Vec::new(),
    }
}

/// What the guest runs: a uevent listener that counts NVMe asynchronous events, a
/// persistent discovery controller; after the first change, a discovery through that
/// controller (as udev's autoconnect rule does, which must unmask the next notice);
/// after the second, a fresh discovery. Lines the test reads start with `@@`.
fn guest_script(port: u16) -> String {
    let host = format!("nqn.2014-08.org.nvmexpress:uuid:{HOST_ID}");
    let fabric = format!("-t tcp -a 10.0.2.2 -s {port} -q {host} -I {HOST_ID}");
    format!(
        r#"
printf '#!/bin/sh\n[ -n "$NVME_AEN" ] && echo "@@ AEN $NVME_AEN" >> /tmp/aen\n' > /bin/aen-hook
chmod +x /bin/aen-hook
uevent /bin/aen-hook &
wait_aen() {{
  i=0
  while [ $i -lt 300 ] && [ "$(grep -c AEN /tmp/aen 2>/dev/null)" != "$1" ]; do sleep 0.1; i=$((i+1)); done
}}
if nvme discover {fabric} --persistent --raw=/tmp/raw > /tmp/d1 2>&1 && nvme discover {fabric} > /tmp/d1 2>&1; then
  echo "@@ PERSISTENT $(grep -c subnqn /tmp/d1)"
  grep -o 'subtype: *.*' /tmp/d1 | sed 's/^/@@ /'
  grep -o 'eflags: *.*' /tmp/d1 | sed 's/^/@@ /'
  # TREQ as the log carries it (nvme-cli names only single values, not 0x06).
  for i in 1 2; do echo "@@ TREQ $(od -An -tx1 -j $((1024*i+3)) -N1 /tmp/raw | tr -d ' ')"; done
else
  echo "@@ FAIL persistent discovery: $(head -c 300 /tmp/d1)"
fi
c=$(for d in /sys/class/nvme/nvme*; do grep -q discovery $d/subsysnqn && basename $d; done | head -1)
echo "@@ READY 1"
wait_aen 1
nvme discover -d $c > /tmp/d2 2>&1
grep -o 'subnqn: *[^ ]*' /tmp/d2 | sed 's/^/@@ THROUGH-PERSISTENT /'
echo "@@ READY 2"
wait_aen 2
cat /tmp/aen 2>/dev/null
nvme discover {fabric} > /tmp/d3 2>&1
grep -o 'subnqn: *[^ ]*' /tmp/d3 | sed 's/^/@@ FRESH /'
echo "@@ END"
"#
    )
}

#[test]
fn a_persistent_linux_discovery_controller_is_told_of_each_change() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let config = TargetConfig {
        subsystems: vec![subsystem(FIRST, any)],
        discovery_listeners: vec![],
        limits: Limits::default(),
        socket_io: SocketIo::Uring,
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    let addr = target.local_addrs()[0];

    let mut guest = Guest::boot(&guest_script(addr.port()));
    guest.wait_for("@@ READY 1");
    // The discovery subsystem itself, then the one subsystem, as nvme-cli prints them.
    let console = guest.console();
    assert!(
        console.contains("@@ PERSISTENT 2"),
        "persistent discovery of itself and one subsystem:\n{console}"
    );
    assert!(
        console.contains("@@ subtype: current discovery subsystem")
            && console.contains("@@ subtype: nvme subsystem"),
        "{console}"
    );
    assert!(
        console.contains(
            "@@ eflags:  explicit discovery connections, duplicate discovery information"
        ),
        "{console}"
    );
    assert_eq!(
        console.matches("@@ TREQ 06").count(),
        2,
        "secure channel not required, SQ flow control may be off:\n{console}"
    );
    target.add_subsystem(subsystem(ADDED, addr)).unwrap();
    guest.wait_for("@@ READY 2");
    target.remove_subsystem(FIRST).unwrap();
    let (lines, out) = guest.finish();
    let notices = lines.iter().filter(|l| *l == "AEN 0x70f002").count();
    assert_eq!(
        notices, 2,
        "a discovery log change notice (notice, 0xF0, log 0x70) per change:\n{out}"
    );
    let listed =
        |how: &str, nqn: &str| lines.iter().any(|l| l.starts_with(how) && l.ends_with(nqn));
    assert!(
        listed("THROUGH-PERSISTENT", FIRST) && listed("THROUGH-PERSISTENT", ADDED),
        "after the first change the persistent controller's log lists both:\n{out}"
    );
    assert!(
        listed("FRESH", ADDED) && !listed("FRESH", FIRST),
        "after the second, only the one left:\n{out}"
    );
    drop(target);
    set.shutdown().unwrap();
}
