//! DH-HMAC-CHAP through the daemon's configuration: `[[host]]` secrets make that host
//! authenticate to a `[[subsystem]]` and to a `[[volume]]` export that let it in;
//! oxperf authenticates one way and both ways, and is refused without the secret,
//! with the wrong one, or when the appliance cannot prove the controller secret. The
//! audit log records each outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use support::{bin, free_port, run, start_oxd};

const HOST: &str = "nqn.2026-11.io.ox:perf-host";
const OTHER: &str = "nqn.2026-11.io.ox:other-host";
/// Let in without a secret.
const PLAIN: &str = "nqn.2026-11.io.ox:plain-host";

fn secret(dir: &Path, name: &str) -> (String, std::path::PathBuf) {
    let out = run(&bin("oxd"), &["dhchap-key"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let path = dir.join(name);
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (text, path)
}

fn oxperf(target: &str, extra: &[&str]) -> std::process::Output {
    oxperf_as(HOST, target, extra)
}

fn oxperf_as(host: &str, target: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "run",
        "--target",
        target,
        "-w",
        "randrw",
        "--ios",
        "256",
        "--qd",
        "4",
        "--verify",
        "--cores",
        "0",
        "--quiet",
        "--hostnqn",
        host,
    ];
    args.extend_from_slice(extra);
    run(&bin("oxperf"), &args)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn configured_hosts_authenticate_wherever_they_are_let_in() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (host_secret, host_file) = secret(d, "host.key");
    let (ctrl_secret, ctrl_file) = secret(d, "ctrl.key");
    let (other_secret, other_file) = secret(d, "other.key");
    let (data, export) = (free_port(), free_port());
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[control]
socket = {sock:?}
audit_log = {audit:?}

[ox]
state_dir = {state:?}
export_listeners = ["127.0.0.1:{export}"]

[[store]]
name = "local"
kind = "local"
path = {objects:?}

[[key]]
name = "k"
file = {kek:?}

[[bdev]]
name = "m"
kind = "malloc"
size_mib = 16

[[subsystem]]
nqn = "nqn.2026-11.io.ox:sub"
hosts = ["{HOST}", "{OTHER}", "{PLAIN}"]
listeners = ["127.0.0.1:{data}"]
namespaces = ["m"]

[[volume]]
name = "vol"
size_mib = 16
nqn = "nqn.2026-11.io.ox:vol"
allow_any_host = true

[[host]]
nqn = "{HOST}"
dhchap_key_file = {host_file:?}
dhchap_ctrl_key_file = {ctrl_file:?}
dhchap_hash = "sha512"
dhchap_dhgroup = "ffdhe2048"

[[host]]
nqn = "{OTHER}"
dhchap_key_file = {other_file:?}
"#,
            sock = d.join("oxd.sock"),
            audit = d.join("audit.log"),
            state = d.join("state"),
            objects = d.join("objects"),
            kek = d.join("kek"),
        ),
    )
    .unwrap();
    let kek = run(
        &bin("oxctl"),
        &["key", "create", d.join("kek").to_str().unwrap()],
    );
    assert!(kek.status.success(), "{}", text(&kek));
    let oxd = start_oxd(&config);

    for target in [
        format!("127.0.0.1:{data},nqn.2026-11.io.ox:sub"),
        format!("127.0.0.1:{export},nqn.2026-11.io.ox:vol"),
    ] {
        // One way, both ways (the appliance proves the controller secret), the file form.
        let one = oxperf(&target, &["--dhchap-secret", &host_secret]);
        assert!(one.status.success(), "{target}: {}", text(&one));
        let both = oxperf(
            &target,
            &[
                "--dhchap-secret",
                host_file.to_str().unwrap(),
                "--dhchap-ctrl-secret",
                &ctrl_secret,
            ],
        );
        assert!(both.status.success(), "{target}: {}", text(&both));
        // Refused: no secret, another host's secret, a controller secret the appliance
        // does not hold.
        let none = oxperf(&target, &[]);
        assert!(!none.status.success());
        assert!(
            text(&none).contains("requires host nqn.2026-11.io.ox:perf-host to authenticate"),
            "{}",
            text(&none)
        );
        let wrong = oxperf(&target, &["--dhchap-secret", &other_secret]);
        assert!(!wrong.status.success());
        assert!(
            text(&wrong).contains("did not accept our response"),
            "{}",
            text(&wrong)
        );
        let liar = oxperf(
            &target,
            &[
                "--dhchap-secret",
                &host_secret,
                "--dhchap-ctrl-secret",
                &other_secret,
            ],
        );
        assert!(!liar.status.success());
        assert!(
            text(&liar).contains("could not prove the controller secret"),
            "{}",
            text(&liar)
        );
    }
    // A host without a secret connects as before; asking a target that does not
    // authenticate to prove a controller secret is refused by oxperf itself.
    let sub = format!("127.0.0.1:{data},nqn.2026-11.io.ox:sub");
    let plain = oxperf_as(PLAIN, &sub, &[]);
    assert!(plain.status.success(), "{}", text(&plain));
    let distrust = oxperf_as(
        PLAIN,
        &sub,
        &[
            "--dhchap-secret",
            &host_secret,
            "--dhchap-ctrl-secret",
            &ctrl_secret,
        ],
    );
    assert!(!distrust.status.success());
    assert!(
        text(&distrust).contains("cannot prove the controller secret"),
        "{}",
        text(&distrust)
    );
    let typo = oxperf(&sub, &["--dhchap-secret", "dhhc-1:00:c2VjcmV0:"]);
    assert!(!typo.status.success());
    assert!(!text(&typo).contains("c2VjcmV0"), "{}", text(&typo));
    // Rotated on a live appliance: a new secret in the file, SIGHUP; the old secret
    // is refused from then on, the new one accepted, on both kinds of export. A file
    // that fails its checks changes nothing.
    let (rotated, _) = secret(d, "rotated.key");
    std::fs::write(&host_file, &rotated).unwrap();
    // Each SIGHUP is done once its audit record is written (after the new secrets,
    // or the refusal, are in force).
    let reloads = || {
        std::fs::read_to_string(d.join("audit.log"))
            .unwrap_or_default()
            .matches("\"action\":\"reload_host_keys\"")
            .count()
    };
    let hup = |oxd: &support::Oxd| {
        let before = reloads();
        // SAFETY: signalling a child process we own.
        unsafe { libc::kill(oxd.child.id() as i32, libc::SIGHUP) };
        let asked = std::time::Instant::now();
        while reloads() == before {
            assert!(
                asked.elapsed() < std::time::Duration::from_secs(60),
                "SIGHUP never reloaded the secrets"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    hup(&oxd);
    for target in [
        sub.clone(),
        format!("127.0.0.1:{export},nqn.2026-11.io.ox:vol"),
    ] {
        let old = oxperf(&target, &["--dhchap-secret", &host_secret]);
        assert!(
            !old.status.success(),
            "{target}: the old secret still works"
        );
        let new = oxperf(&target, &["--dhchap-secret", &rotated]);
        assert!(new.status.success(), "{target}: {}", text(&new));
    }
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    hup(&oxd);
    let still = oxperf(&sub, &["--dhchap-secret", &rotated]);
    assert!(still.status.success(), "{}", text(&still));
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    assert!(audit.contains("\"action\":\"reload_host_keys\""), "{audit}");
    assert!(
        audit.contains("is readable or writable by others"),
        "{audit}"
    );
    assert!(audit.contains("authenticated"), "{audit}");
    assert!(
        audit.contains("authentication failed: wrong response"),
        "{audit}"
    );
    assert!(
        !audit.contains(&host_secret[10..30]),
        "no secret in the audit log"
    );
}
