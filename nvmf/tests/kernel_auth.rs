//! The real Linux kernel host (Debian's 6.12 kernel in QEMU) authenticates with
//! DH-HMAC-CHAP: `nvme connect --dhchap-secret` gets in and moves verified data, the
//! wrong secret is refused, `--dhchap-ctrl-secret` hears the target prove its own
//! secret (and refuses a target whose secret is not the one it holds); with the hosts
//! configured for ffdhe2048 and ffdhe3072, the challenges are Diffie-Hellman
//! augmented.
//!
//! Needs root (QEMU). Set `OX_LINUX_NVME` to the tool's directory if it is not at
//! `../shared/tools/linux-nvme` from the repository.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use bdev::create_malloc;
use nvmf::dhchap::{DhchapKey, Hash, HostKeys};
use nvmf::ffdhe::DhGroup;
use nvmf::{HostPolicy, Limits, Namespace, SocketIo, Subsystem, Target, TargetConfig};
use reactor::{CoreList, ReactorConfig, ReactorSet};
use support::guest::Guest;

const NQN: &str = "nqn.2026-11.io.ox:authenticated";
const ONE_WAY: &str = "nqn.2014-08.org.nvmexpress:uuid:3c1f0e2a-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
const BOTH_WAYS: &str = "nqn.2014-08.org.nvmexpress:uuid:9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a";
/// One way, with Diffie-Hellman augmented challenges (ffdhe2048).
const DH_ONE_WAY: &str = "nqn.2014-08.org.nvmexpress:uuid:1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

/// Connects as `host` with `secrets` (nvme connect options), checks 1 MiB written
/// and read back at the namespace's start, disconnects; prints `@@ <label> ...`.
fn connect_and_check(label: &str, port: u16, host: &str, secrets: &str) -> String {
    let id = host.rsplit(':').next().unwrap_or_default();
    format!(
        r#"
if nvme connect -t tcp -a 10.0.2.2 -s {port} -n {NQN} -q {host} -I {id} {secrets} > /tmp/c 2>&1; then
  sleep 1
  c=$(for d in /sys/class/nvme/nvme*; do [ "$(cat $d/subsysnqn 2>/dev/null)" = "{NQN}" ] && basename $d; done | head -1)
  head -c 1048576 /dev/urandom > /tmp/p; want=$(md5sum < /tmp/p | cut -d' ' -f1)
  dd if=/tmp/p of=/dev/${{c}}n1 bs=1M count=1 oflag=direct conv=fsync 2>/dev/null
  echo 3 > /proc/sys/vm/drop_caches
  got=$(dd if=/dev/${{c}}n1 bs=1M count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$got" = "$want" ] && echo "@@ {label} connected, data verified" || echo "@@ {label} connected, data WRONG"
  nvme disconnect -n {NQN} > /dev/null 2>&1
else
  echo "@@ {label} refused: $(tr '\n' ' ' < /tmp/c | cut -c1-200)"
fi
"#
    )
}

#[test]
fn the_linux_host_authenticates_one_way_and_both_ways() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let one_way = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
    let both_ways = DhchapKey::generate(48, None).unwrap();
    let ctrl = DhchapKey::generate(64, Some(Hash::Sha512)).unwrap();
    let wrong = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
    let config = TargetConfig {
        subsystems: vec![Subsystem {
            nqn: NQN.into(),
            serial: "OXKAUTH".into(),
            model: "OX test".into(),
            hosts: HostPolicy::Only(vec![ONE_WAY.into(), BOTH_WAYS.into(), DH_ONE_WAY.into()]),
            namespaces: vec![Namespace::new(
                1,
                create_malloc("kauth", 512, 16384, None).unwrap(),
            )],
            listeners: vec!["127.0.0.1:0".parse().unwrap()],
            host_keys: vec![
                HostKeys {
                    hostnqn: ONE_WAY.into(),
                    key: one_way.clone(),
                    ctrl_key: None,
                    hash: Hash::Sha256,
                    dhgroup: DhGroup::Null,
                },
                HostKeys {
                    hostnqn: BOTH_WAYS.into(),
                    key: both_ways.clone(),
                    ctrl_key: Some(ctrl.clone()),
                    hash: Hash::Sha384,
                    dhgroup: DhGroup::Ffdhe3072,
                },
                HostKeys {
                    hostnqn: DH_ONE_WAY.into(),
                    key: one_way.clone(),
                    ctrl_key: None,
                    hash: Hash::Sha256,
                    dhgroup: DhGroup::Ffdhe2048,
                },
            ],
        }],
        discovery_listeners: vec![],
        limits: Limits::default(),
        socket_io: SocketIo::Uring,
        health: Default::default(),
    };
    let target = Target::start(config, set.handles()).unwrap();
    let port = target.local_addrs()[0].port();
    let secret = |k: &DhchapKey| format!("--dhchap-secret={}", k.encode());
    let script = [
        connect_and_check("one-way", port, ONE_WAY, &secret(&one_way)),
        connect_and_check("wrong-secret", port, ONE_WAY, &secret(&wrong)),
        connect_and_check("ffdhe2048", port, DH_ONE_WAY, &secret(&one_way)),
        connect_and_check("ffdhe2048-wrong", port, DH_ONE_WAY, &secret(&wrong)),
        connect_and_check(
            "both-ways",
            port,
            BOTH_WAYS,
            &format!(
                "{} --dhchap-ctrl-secret={}",
                secret(&both_ways),
                ctrl.encode()
            ),
        ),
        connect_and_check(
            "wrong-ctrl-secret",
            port,
            BOTH_WAYS,
            &format!(
                "{} --dhchap-ctrl-secret={}",
                secret(&both_ways),
                wrong.encode()
            ),
        ),
        "echo \"@@ END\"".to_string(),
    ]
    .concat();
    let (lines, out) = Guest::boot(&script).finish();
    let said = |l: &str| lines.iter().any(|x| x == l);
    assert!(said("one-way connected, data verified"), "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with("wrong-secret refused")),
        "the wrong secret is refused:\n{out}"
    );
    assert!(said("both-ways connected, data verified"), "{out}");
    assert!(said("ffdhe2048 connected, data verified"), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ffdhe2048-wrong refused")),
        "the wrong secret is refused with a DH group too:\n{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("wrong-ctrl-secret refused")),
        "the host refuses a controller that cannot prove the secret it holds:\n{out}"
    );
    drop(target);
    set.shutdown().unwrap();
}
