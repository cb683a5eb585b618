//! Disaster recovery as an operator drills it, through `oxctl` and `oxperf` only: two
//! appliances (separate processes, state directories, ports and identities) share one
//! bucket on the S3 test server. Appliance A serves a volume protected by a policy that
//! snapshots it every 2 s while a host writes; A is killed (`kill -9`) and its state
//! directory deleted. Appliance B, which never saw A's catalogue, browses the bucket,
//! clones A's newest snapshot and serves it: the host reads everything written before
//! the last run, and of what came after, each block whole or never written. The
//! figures a drill is for (RPO: what the host wrote that B does not have; RTO: from the
//! kill to the first good read on B) are printed. And a policy on its own: due at
//! once, retention leaving its set in both catalogues, metrics, bad input refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../ox/tests/s3server/mod.rs"]
mod s3server;

mod support;

use std::path::Path;
use std::time::Instant;

use support::{Ctl, free_port, oxperf, s3_store, start_oxd, verified, write_private};

/// The S3 test server, a directory for the appliances, the `[[store]]` section naming
/// the server as "s3", and a key file (the key appliances that share it hold; how a
/// key moves is the operator's key procedure, tested on its own below).
fn bed() -> (
    s3server::Server,
    tempfile::TempDir,
    String,
    std::path::PathBuf,
) {
    let server = s3server::start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = s3_store(&server.client_config(), dir.path(), "s3");
    let kek = dir.path().join("kek");
    write_private(&kek, &"42".repeat(32));
    (server, dir, store, kek)
}

/// Creates volume `db` of `size_mib` on the appliance of `ctl`, exported to any host
/// on `port`; the oxperf target of it.
fn export_db(ctl: &Ctl, port: u16, size_mib: u32) -> String {
    let nqn = "nqn.2026-12.io.ox:db";
    let size = size_mib.to_string();
    ctl.ok(&[
        "volume",
        "create",
        "db",
        "--size-mib",
        &size,
        "--nqn",
        nqn,
        "--allow-any-host",
    ]);
    format!("127.0.0.1:{port},{nqn},1")
}

/// Creates clone `name` on the appliance of `ctl` of the newest snapshot of volume
/// `volume` in store "s3", exported to any host as `nqn`; the answer.
fn clone_latest(ctl: &Ctl, name: &str, volume: &str, nqn: &str) -> serde_json::Value {
    ctl.ok(&[
        "clone",
        "create",
        name,
        "--store",
        "s3",
        "--volume",
        volume,
        "--latest",
        "--nqn",
        nqn,
        "--allow-any-host",
    ])
}

/// Creates volume `name` on the appliance of `ctl` over the newest snapshot of volume
/// `from` in store "s3" (seeded from volume `seed`), exported to any host as `nqn`;
/// the answer.
fn volume_over(
    ctl: &Ctl,
    name: &str,
    from: &str,
    nqn: &str,
    seed: Option<&str>,
) -> serde_json::Value {
    let mut args = vec![
        "volume",
        "create",
        name,
        "--from-store",
        "s3",
        "--from-volume",
        from,
        "--latest",
        "--nqn",
        nqn,
        "--allow-any-host",
    ];
    if let Some(seed) = seed {
        args.extend(["--seed", seed]);
    }
    ctl.ok(&args)
}

/// The policy of volume `db` on the appliance of `ctl`.
fn policy(ctl: &Ctl) -> serde_json::Value {
    let all = ctl.ok(&["policy", "list"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|p| p["volume"] == "db")
        .unwrap()
        .clone()
}

/// The configuration of appliance `name` in `d`, exporting on `port`, with the shared
/// store `store` and key file `kek`.
fn appliance(d: &Path, port: u16, store: &str, kek: &Path) -> (std::path::PathBuf, Ctl) {
    std::fs::create_dir_all(d).unwrap();
    let socket = d.join("oxd.sock");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\naudit_log = {audit:?}\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\n\
             zstd_level = 1\nobject_mib = 1\n{store}\n[[key]]\nname = \"k1\"\nfile = {kek:?}\n",
            state = d.join("state"),
            audit = d.join("audit.log"),
        ),
    )
    .unwrap();
    let ctl = Ctl {
        socket: socket.display().to_string(),
    };
    (config, ctl)
}

#[test]
fn a_second_appliance_brings_up_the_newest_snapshot_of_a_lost_one() {
    let (_server, dir, store, kek) = bed();
    let d = dir.path();

    // Appliance A: a 32 MiB volume; the host writes its first 8 MiB (seed 1).
    let port_a = free_port();
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek);
    let mut oxd_a = start_oxd(&config_a);
    let on_a = export_db(&a, port_a, 32);
    // Protected every 2 s, keeping the newest 3, while the host writes its first 8 MiB.
    let set = set_policy(&a, 2, 3);
    assert_eq!(set["every_s"], 2, "{set}");
    oxperf(&on_a, "write", "0:16384", 128, 65536, 1);
    // A policy snapshot begun after those writes, so it holds all of them.
    let runs_then = policy(&a)["runs"].as_u64().unwrap();
    let p = run_after(&a, runs_then);
    assert_eq!(p["failures"], 0, "{p}");
    let newest_id = p["newest"].as_str().unwrap().to_string();
    // The host writes on (seed 2): what the next run does not take before the
    // disaster is lost (the RPO, measured on B below).
    oxperf(&on_a, "write", "32768:4096", 64, 32768, 2);

    // The disaster: A dies and its state with it.
    let killed = Instant::now();
    oxd_a.child.kill().unwrap();
    oxd_a.child.wait().unwrap();
    drop(oxd_a);
    std::fs::remove_dir_all(d.join("a")).unwrap();

    // Appliance B, with the store's credentials and the key and nothing else.
    let port_b = free_port();
    let (config_b, b) = appliance(&d.join("b"), port_b, &store, &kek);
    let _oxd_b = start_oxd(&config_b);
    let found = b.ok(&["store", "browse", "s3"]);
    let volumes = found["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "{found}");
    let db = &volumes[0];
    assert_eq!(db["name"], "db");
    assert_eq!(db["size_bytes"], 32u64 << 20);
    assert_eq!(db["owned_here"], false, "A owns it, not B: {found}");
    assert_ne!(db["owner"]["id"], found["appliance"]["id"]);
    // The policy kept the newest 3; the rest left the store's catalogue.
    let snaps = db["snapshots"].as_array().unwrap();
    assert!((1..=3).contains(&snaps.len()), "{found}");
    assert_eq!(db["more"], false, "{found}");
    for pair in snaps.windows(2) {
        assert_eq!(pair[0]["parent"], pair[1]["id"], "newest first: {found}");
        assert!(pair[0]["created"].as_u64() >= pair[1]["created"].as_u64());
    }
    assert!(
        snaps.iter().any(|s| s["id"] == newest_id.as_str()) || snaps.len() == 3,
        "the snapshot holding the first writes, or 3 newer: {found}"
    );
    assert_eq!(snaps[0]["key"], "k1");
    assert_eq!(snaps[0]["key_here"], true);

    let nqn_b = "nqn.2026-12.io.ox:db-dr";
    let made = clone_latest(&b, "db-dr", "db", nqn_b);
    assert_eq!(made["name"], "db-dr", "{made}");
    let on_b = format!("127.0.0.1:{port_b},{nqn_b},1");
    // The first read the host gets on B ends the outage.
    let read = oxperf(&on_b, "read", "0:128", 1, 65536, 1);
    let rto = killed.elapsed();
    assert_eq!(verified(&read), 128);
    // Everything written before the last policy run is there...
    assert_eq!(
        verified(&oxperf(&on_b, "read", "0:16384", 128, 65536, 1)),
        16384
    );
    // ...and of what came after, each block is either there whole or reads as never
    // written: never wrong. What is missing is the RPO.
    let after = oxperf(&on_b, "read", "32768:4096", 64, 32768, 2);
    assert!(after["mismatch"].is_null(), "{after}");
    let unwritten = after["unwritten_blocks"].as_u64().unwrap();
    assert_eq!(
        unwritten + after["verified_blocks"].as_u64().unwrap(),
        4096,
        "{after}"
    );
    let lost_bytes = unwritten * 512;
    let clone = b.ok(&["clone", "get", "db-dr"]);
    assert_eq!(
        clone["manifest_key"], snaps[0]["manifest_key"],
        "the clone reads the newest snapshot: {clone}"
    );
    println!(
        "drill: RPO {lost_bytes} of 2097152 bytes written after the last policy run were \
         lost; RTO {:.2} s from kill -9 to the first good read on the second appliance \
         (its start, browse and clone included)",
        rto.as_secs_f64()
    );

    // Naming: a volume B does not know by any other name, by identity or prefix too.
    let by_id = b.ok(&[
        "store",
        "browse",
        "s3",
        "--volume",
        db["volume"].as_str().unwrap(),
        "--limit",
        "1",
    ]);
    assert_eq!(by_id["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(by_id["snapshots"][0]["id"], snaps[0]["id"]);
    if snaps.len() > 1 {
        let older = b.ok(&[
            "store",
            "browse",
            "s3",
            "--volume",
            "db",
            "--limit",
            "1",
            "--after",
            by_id["next"].as_str().unwrap(),
        ]);
        assert_eq!(older["snapshots"][0]["id"], snaps[1]["id"]);
        // An older snapshot by ID, through the bucket.
        b.ok(&[
            "clone",
            "create",
            "db-old",
            "--store",
            "s3",
            "--volume",
            "db",
            "--snapshot",
            snaps[1]["id"].as_str().unwrap(),
        ]);
    }
    let o = b.call(&[
        "clone", "create", "x", "--store", "s3", "--volume", "nope", "--latest",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Sets the policy of `db`: a snapshot into "s3" every `every_s` seconds, keeping the
/// newest `keep_last`. The answer.
fn set_policy(ctl: &Ctl, every_s: u64, keep_last: u64) -> serde_json::Value {
    let (every, keep) = (every_s.to_string(), keep_last.to_string());
    ctl.ok(&[
        "policy",
        "set",
        "db",
        "--store",
        "s3",
        "--every",
        &every,
        "--keep-last",
        &keep,
    ])
}

/// Waits until the policy of `db` has ended a run begun after `runs` runs (and the
/// retention after it), and returns the policy.
fn run_after(ctl: &Ctl, runs: u64) -> serde_json::Value {
    waiting_for(ctl, |p| {
        p["runs"].as_u64().unwrap() > runs && p["job"].is_null()
    })
}

/// The policy of `db` once `done` says so (a hung daemon fails the test after 5
/// minutes instead of hanging it; no speed is asserted).
fn waiting_for(ctl: &Ctl, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let p = policy(ctl);
        if done(&p) {
            return p;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the policy never got there: {p}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_policy_snapshots_at_once_when_due_keeps_its_set_and_says_how_it_went() {
    let (server, dir, store, kek) = bed();
    let d = dir.path();
    let metrics = free_port();
    // Declared in the configuration: hourly, so after the first run nothing is due
    // for an hour.
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
         [[volume]]\nname = \"db\"\nsize_mib = 16\n\
         [[policy]]\nvolume = \"db\"\nstore = \"s3\"\nevery_s = 3600\nkeep_last = 2\n"
    );
    let (config, ctl) = appliance(&d.join("a"), free_port(), &format!("{store}{extra}"), &kek);
    let oxd = start_oxd(&config);
    // Never snapshotted: due at once.
    let p = run_after(&ctl, 0);
    assert_eq!(p["runs"], 1, "{p}");
    assert_eq!(p["failures"], 0, "{p}");
    assert!(p["rpo_s"].as_u64().unwrap() < 3600, "{p}");
    assert!(p["next_due"].as_u64().unwrap() > p["last_success"].as_u64().unwrap());
    assert_eq!(ctl.ok(&["snapshot", "list"]).as_array().unwrap().len(), 1);

    // What a crashed upload leaves: a data object no manifest names.
    let prefix = ctl.ok(&["store", "browse", "s3"])["volumes"][0]["prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let orphan = server
        .dir
        .path()
        .join(s3server::BUCKET)
        .join(format!("{prefix}ox1/d/{}", "ab".repeat(16)));
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"left by a crash").unwrap();

    // Every second, for five runs; then hourly again, so the last run's retention is
    // the last word.
    set_policy(&ctl, 1, 2);
    run_after(&ctl, 5);
    set_policy(&ctl, 3600, 2);
    let p = waiting_for(&ctl, |p| {
        p["job"].is_null() && p["retired"].as_u64().unwrap() + 2 == p["runs"].as_u64().unwrap()
    });
    assert_eq!(p["failures"], 0, "{p}");
    assert!(
        !orphan.exists(),
        "retention collects what failed uploads left"
    );
    let kept = ctl.ok(&["snapshot", "list"]);
    assert_eq!(kept.as_array().unwrap().len(), 2, "{kept}");
    let found = ctl.ok(&["store", "browse", "s3"]);
    let listed: Vec<&serde_json::Value> = found["volumes"][0]["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(listed.len(), 2, "the store's catalogue agrees: {found}");
    for s in kept.as_array().unwrap() {
        assert!(listed.contains(&&s["id"]), "{found}");
    }
    // Deleting the older kept one, which the newest builds on, leaves it as the newest's
    // ancestor: the newest stays whole.
    let older = kept[0]["id"].as_str().unwrap();
    let newest = kept[1]["id"].as_str().unwrap();
    let deleted = ctl.ok(&["snapshot", "delete", older]);
    assert_eq!(deleted["kept_as_ancestor"], true, "{deleted}");
    let job = ctl.ok(&["snapshot", "verify", newest]);
    assert_eq!(job["state"], "done", "{job}");

    // What an operator's monitoring reads.
    let text = support::http_get(metrics, "/metrics");
    for name in [
        "ox_policy_rpo_seconds{volume=\"db\"}",
        "ox_policy_last_success_timestamp_seconds{volume=\"db\"}",
        "ox_policy_failures_total{volume=\"db\"} 0",
        "ox_policy_retired_snapshots_total{volume=\"db\"}",
    ] {
        assert!(text.contains(name), "no {name} in\n{text}");
    }

    // Bad policies are refused, naming what is wrong.
    for (args, says) in [
        (vec!["--store", "s3", "--every", "0"], "every_s"),
        (
            vec!["--store", "nowhere", "--every", "60"],
            "no store named",
        ),
        (
            vec!["--store", "s3", "--every", "60", "--key", "k9"],
            "no key named",
        ),
    ] {
        let mut all = vec!["policy", "set", "db"];
        all.extend(args);
        let o = ctl.call(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{all:?}: {err}");
    }
    let o = ctl.call(&["policy", "set", "nope", "--store", "s3", "--every", "60"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no volume named"));
    ctl.ok(&["policy", "delete", "db"]);
    assert!(ctl.ok(&["policy", "list"]).as_array().unwrap().is_empty());
    drop(oxd);
}

#[test]
fn a_key_moves_to_another_appliance_sealed_for_it_alone() {
    let (_server, dir, store, _) = bed();
    let d = dir.path();
    // A has k1; B has a key of its own and not A's.
    let kek_a = d.join("kek-a");
    write_private(&kek_a, &"5a".repeat(32));
    let kek_b = d.join("kek-b");
    write_private(&kek_b, &"b0".repeat(32));
    let port_a = free_port();
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek_a);
    let _oxd_a = start_oxd(&config_a);
    oxperf(&export_db(&a, port_a, 16), "write", "0:8192", 64, 65536, 3);
    assert_eq!(
        a.ok(&["snapshot", "create", "db", "--store", "s3"])["state"],
        "done"
    );

    let port_b = free_port();
    let b_dir = d.join("b");
    let (config_b, b) = appliance(&b_dir, port_b, &store, &kek_b);
    let config_b_text = std::fs::read_to_string(&config_b)
        .unwrap()
        .replace("name = \"k1\"", "name = \"own\"");
    std::fs::write(&config_b, &config_b_text).unwrap();
    let mut oxd_b = start_oxd(&config_b);
    let found = b.ok(&["store", "browse", "s3"]);
    assert_eq!(
        found["volumes"][0]["snapshots"][0]["key_here"], false,
        "{found}"
    );
    let o = b.call(&[
        "clone", "create", "x", "--store", "s3", "--volume", "db", "--latest",
    ]);
    assert!(!o.status.success(), "without A's key B cannot open it");

    // B says who it is; A seals k1 for B; B opens it.
    let receiver = b.ok(&["key", "receiver"]);
    let public = receiver["public_key"].as_str().unwrap();
    let sealed = d.join("k1.sealed");
    a.ok(&[
        "key",
        "export",
        "k1",
        "--to",
        public,
        "--out",
        sealed.to_str().unwrap(),
    ]);
    let sealed_text = std::fs::read_to_string(&sealed).unwrap();
    assert!(
        !sealed_text.contains(&"5a".repeat(32)),
        "never in the clear"
    );
    // Sealed for B, useless to any other appliance (A's own receiver key, say).
    let o = a.call(&["key", "import", sealed.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sealed for another appliance"),
        "{o:?}"
    );
    let imported = b.ok(&["key", "import", sealed.to_str().unwrap()]);
    assert_eq!(imported["key"], "k1", "{imported}");
    // The operator compares check values: the key B opened is the one A has.
    let on_a = a.ok(&["key", "list"]);
    assert_eq!(imported["check"], on_a[0]["check"], "{imported} {on_a}");
    let file = imported["file"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(file).unwrap().trim(),
        "5a".repeat(32)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Neither appliance's audit log holds the key.
    for log in [d.join("a").join("audit.log"), b_dir.join("audit.log")] {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("\"purpose\":\"export\"") || text.contains("\"purpose\":\"import\""),
            "the key's use is recorded: {}",
            log.display()
        );
        assert!(!text.contains(&"5a".repeat(32)), "{}", log.display());
    }

    // B configured with it (as the import says), restarted: the clone opens and reads.
    drop(oxd_b.child.kill());
    oxd_b.child.wait().unwrap();
    std::fs::write(
        &config_b,
        format!("{config_b_text}{}", imported["configure"].as_str().unwrap()),
    )
    .unwrap();
    oxd_b = start_oxd(&config_b);
    let nqn_b = "nqn.2026-12.io.ox:db-b";
    clone_latest(&b, "db-b", "db", nqn_b);
    let read = oxperf(
        &format!("127.0.0.1:{port_b},{nqn_b},1"),
        "read",
        "0:8192",
        64,
        65536,
        3,
    );
    assert_eq!(verified(&read), 8192);
    drop(oxd_b);
}

/// Copies directory `from` to `to` (regular files and directories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn two_appliances_never_write_one_volume_into_one_bucket() {
    let (_server, dir, store, kek) = bed();
    let d = dir.path();
    let (config_a, a) = appliance(&d.join("a"), free_port(), &store, &kek);
    let mut oxd_a = start_oxd(&config_a);
    a.ok(&["volume", "create", "db", "--size-mib", "16"]);
    let first = a.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(first["state"], "done", "{first}");
    // A second appliance made from a copy of A's state (a restored backup, a copied
    // disk) while A lives on: the same volume, another appliance.
    oxd_a.child.kill().unwrap();
    oxd_a.child.wait().unwrap();
    // A restarts with a second key (k1 stays first: new snapshots use it), which C
    // does not have.
    let k2 = d.join("k2");
    write_private(&k2, &"17".repeat(32));
    let mut text = std::fs::read_to_string(&config_a).unwrap();
    text.push_str(&format!("[[key]]\nname = \"k2\"\nfile = {k2:?}\n"));
    std::fs::write(&config_a, text).unwrap();
    copy_dir(&d.join("a").join("state"), &d.join("c").join("state"));
    let catalogue = d.join("c").join("state").join("catalogue.json");
    let mut c_state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&catalogue).unwrap()).unwrap();
    c_state["appliance"] = "c0000000-0000-4000-8000-000000000000".into();
    std::fs::write(&catalogue, serde_json::to_vec(&c_state).unwrap()).unwrap();
    let _oxd_a = start_oxd(&config_a);
    let (config_c, c) = appliance(&d.join("c"), free_port(), &store, &kek);
    let _oxd_c = start_oxd(&config_c);
    // C's snapshot of "db" is refused, saying whose it is; A's goes on.
    let job = c.call(&["snapshot", "create", "db", "--store", "s3"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&job.stdout),
        String::from_utf8_lossy(&job.stderr)
    );
    assert!(out.contains("belongs to appliance"), "{out}");
    assert_eq!(
        a.ok(&["snapshot", "create", "db", "--store", "s3"])["state"],
        "done"
    );
    let found = a.ok(&["store", "browse", "s3"]);
    assert_eq!(
        found["volumes"][0]["snapshots"].as_array().unwrap().len(),
        2,
        "{found}"
    );
    assert_eq!(found["volumes"][0]["owned_here"], true);

    // The takeover is explicit: C adopts the volume's place (A is to go for good).
    // C's snapshots go in from then on, and A's are refused, saying whose it is.
    let a_id = found["appliance"]["id"].as_str().unwrap().to_string();
    let adopted = c.ok(&["volume", "adopt", "db", "--store", "s3"]);
    assert_eq!(adopted["adopted_from"]["id"], a_id.as_str(), "{adopted}");
    // A listed every snapshot it took: nothing to enter for it.
    assert_eq!(adopted["entered"], serde_json::json!([]), "{adopted}");
    // Run again: nothing changes, and it still names who was displaced.
    let again = c.ok(&["volume", "adopt", "db", "--store", "s3"]);
    assert_eq!(again["adopted_from"]["id"], a_id.as_str(), "{again}");
    assert_eq!(
        c.ok(&["snapshot", "create", "db", "--store", "s3"])["state"],
        "done"
    );
    let job = a.call(&["snapshot", "create", "db", "--store", "s3"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&job.stdout),
        String::from_utf8_lossy(&job.stderr)
    );
    assert!(out.contains("belongs to appliance"), "{out}");
    // Nor does A rewrite the manifests of db's snapshots to rotate keys: they are in
    // C's place now, and listed as skipped with C as their owner — and C, which has no
    // k2, still reads them.
    let rotated = a.ok(&["key", "rotate", "k2"]);
    let skipped = rotated["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{rotated}");
    assert!(
        skipped
            .iter()
            .all(|s| s["owner"]["id"] == "c0000000-0000-4000-8000-000000000000"),
        "{rotated}"
    );
    assert_eq!(rotated["rewrapped"], 0, "{rotated}");
    let id = first["result"]["id"].as_str().unwrap();
    let checked = c.ok(&["snapshot", "verify", id]);
    assert_eq!(checked["state"], "done", "{checked}");
    // (More than the 3 a browse shows by default: a 4th would be the refused one.)
    let seen = c.ok(&["store", "browse", "s3", "--limit", "10"]);
    let db = &seen["volumes"][0];
    assert_eq!(db["owned_here"], true, "{seen}");
    assert_eq!(db["adopted_from"]["id"], a_id.as_str(), "{seen}");
    assert_eq!(db["snapshots"].as_array().unwrap().len(), 3, "{seen}");
    let a_only = a
        .ok(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .last()
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !c.ok(&["snapshot", "list"]).to_string().contains(&a_only),
        "A's second snapshot is in the store's catalogue, not in C's"
    );
    // C's policy keeps the newest only: the snapshot A took into the place, which C's
    // own catalogue never had, is retired with C's others (once a run has been, the
    // policy goes hourly, so the last run's retention is the last word).
    set_policy(&c, 1, 1);
    run_after(&c, 0);
    set_policy(&c, 3600, 1);
    // Settled: every snapshot but one retired — the three the place held and each
    // run's (a run the every-second policy began before the change included).
    let p = waiting_for(&c, |p| {
        p["job"].is_null() && p["retired"].as_u64().unwrap() + 1 == 3 + p["runs"].as_u64().unwrap()
    });
    assert_eq!(p["failures"], 0, "{p}");
    let seen = c.ok(&["store", "browse", "s3", "--limit", "10"]);
    let left = seen["volumes"][0]["snapshots"].as_array().unwrap();
    assert_eq!(left.len(), 1, "{seen}");
    assert_eq!(
        left[0]["appliance"]["id"], "c0000000-0000-4000-8000-000000000000",
        "{seen}"
    );
    assert!(!seen.to_string().contains(&a_only), "{seen}");
    // Adopting what has no place in the store yet, or a volume that is not here, is
    // refused with the reason.
    c.ok(&["volume", "create", "fresh", "--size-mib", "16"]);
    let o = c.call(&["volume", "adopt", "fresh", "--store", "s3"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing to adopt"),
        "{o:?}"
    );
    let o = c.call(&["volume", "adopt", "nope", "--store", "s3"]);
    assert!(!o.status.success(), "{o:?}");
}

#[test]
fn a_volume_over_another_appliances_snapshot_stores_only_its_changes() {
    let (_server, dir, store, kek) = bed();
    let d = dir.path();
    // A: 16 MiB written (seed 1), snapshotted.
    let port_a = free_port();
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek);
    let _oxd_a = start_oxd(&config_a);
    oxperf(
        &export_db(&a, port_a, 32),
        "write",
        "0:32768",
        128,
        131072,
        1,
    );
    let first = a.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(first["state"], "done", "{first}");

    // B goes on from A's newest snapshot as a volume of its own.
    let port_b = free_port();
    let (config_b, b) = appliance(&d.join("b"), port_b, &store, &kek);
    let mut oxd_b = start_oxd(&config_b);
    let nqn_b = "nqn.2026-12.io.ox:db-b";
    let made = volume_over(&b, "db-b", "db", nqn_b, None);
    assert_eq!(
        made["manifest_key"], first["result"]["manifest_key"],
        "{made}"
    );
    let on_b = format!("127.0.0.1:{port_b},{nqn_b},1");
    assert_eq!(
        verified(&oxperf(&on_b, "read", "0:32768", 128, 131072, 1)),
        32768
    );
    // The host changes 1 MiB of it; then B dies and comes back.
    oxperf(&on_b, "write", "40960:2048", 16, 65536, 5);
    oxd_b.child.kill().unwrap();
    oxd_b.child.wait().unwrap();
    drop(oxd_b);
    let _oxd_b = start_oxd(&config_b);
    // Its first snapshot builds on A's: only the 16 chunks B changed are read and stored.
    let snap = b.ok(&["snapshot", "create", "db-b", "--store", "s3"]);
    assert_eq!(snap["state"], "done", "{snap}");
    assert_eq!(snap["result"]["parent"], first["result"]["id"], "{snap}");
    assert_eq!(snap["result"]["chunks_read"], 16, "{snap}");
    let stored = snap["result"]["data_bytes"].as_u64().unwrap();
    assert!(
        stored < 2 << 20,
        "only the changed MiB is stored, not 16: {stored}"
    );

    // A third appliance opens B's snapshot: A's data and B's changes, through one
    // lineage that crosses from B's volume into A's.
    let port_c = free_port();
    let (config_c, c) = appliance(&d.join("c"), port_c, &store, &kek);
    let _oxd_c = start_oxd(&config_c);
    let found = c.ok(&["store", "browse", "s3", "--volume", "db-b"]);
    assert_eq!(
        found["snapshots"][0]["parent"], first["result"]["id"],
        "{found}"
    );
    let nqn_c = "nqn.2026-12.io.ox:db-c";
    clone_latest(&c, "db-c", "db-b", nqn_c);
    let on_c = format!("127.0.0.1:{port_c},{nqn_c},1");
    assert_eq!(
        verified(&oxperf(&on_c, "read", "0:32768", 128, 131072, 1)),
        32768
    );
    assert_eq!(
        verified(&oxperf(&on_c, "read", "40960:2048", 16, 65536, 5)),
        2048
    );
    println!(
        "a volume over another appliance's 16 MiB snapshot, 1 MiB changed: stored {stored} bytes"
    );

    // B's volume holds A's snapshot, so A cannot delete it from under it.
    let o = a.call(&[
        "snapshot",
        "delete",
        first["result"]["id"].as_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reads it"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn fail_back_reads_from_the_store_only_what_changed_on_either_side() {
    let (server, dir, store, kek) = bed();
    let d = dir.path();
    let served = || s3server::served_at(&server.addr.to_string());
    // A: 16 MiB written (seed 1) and snapshotted; then its host writes 512 KiB more
    // (seed 7), which the other side never sees.
    let port_a = free_port();
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek);
    let mut oxd_a = start_oxd(&config_a);
    let on_a = export_db(&a, port_a, 32);
    oxperf(&on_a, "write", "0:32768", 128, 131072, 1);
    let first = a.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(first["state"], "done", "{first}");
    oxperf(&on_a, "write", "32768:1024", 8, 65536, 7);

    // A is lost; B goes on from A's snapshot, its host changes 1 MiB (seed 5), and B
    // snapshots that into the same store on top of A's.
    oxd_a.child.kill().unwrap();
    oxd_a.child.wait().unwrap();
    let port_b = free_port();
    let (config_b, b) = appliance(&d.join("b"), port_b, &store, &kek);
    let _oxd_b = start_oxd(&config_b);
    let nqn_b = "nqn.2026-12.io.ox:db-b";
    volume_over(&b, "db-b", "db", nqn_b, None);
    let on_b = format!("127.0.0.1:{port_b},{nqn_b},1");
    oxperf(&on_b, "write", "40960:2048", 16, 65536, 5);
    let theirs = b.ok(&["snapshot", "create", "db-b", "--store", "s3"]);
    assert_eq!(theirs["state"], "done", "{theirs}");
    assert_eq!(
        theirs["result"]["parent"], first["result"]["id"],
        "{theirs}"
    );

    // A comes back (after its kill -9, its change record still says what its host
    // wrote since its snapshot) and fails back: a volume over B's snapshot, seeded
    // from its old one.
    drop(oxd_a);
    let _oxd_a = start_oxd(&config_a);
    // Seeds that cannot be: none by that name, one never snapshotted, one of another
    // size, one whose last snapshot is not in the lineage. Each refused with why, and
    // nothing is left behind.
    a.ok(&["volume", "create", "fresh", "--size-mib", "32"]);
    a.ok(&["volume", "create", "small", "--size-mib", "16"]);
    a.ok(&["volume", "create", "other", "--size-mib", "32"]);
    let other = a.ok(&["snapshot", "create", "other", "--store", "s3"]);
    assert_eq!(other["state"], "done", "{other}");
    for (seed, why) in [
        ("nothing", "no volume named \"nothing\""),
        ("fresh", "no snapshot its changes count from"),
        ("small", "geometry"),
        ("other", "does not descend"),
    ] {
        let wrong = a.call(&[
            "volume",
            "create",
            "db-x",
            "--from-store",
            "s3",
            "--from-volume",
            "db-b",
            "--latest",
            "--seed",
            seed,
        ]);
        let err = String::from_utf8_lossy(&wrong.stderr);
        assert!(
            !wrong.status.success() && err.contains(why),
            "{seed}: {err}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(d.join("a/state/volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("db-x"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let before = served();
    let nqn_back = "nqn.2026-12.io.ox:db-back";
    let back = volume_over(&a, "db-back", "db-b", nqn_back, Some("db"));
    let seeded = &back["seeded"];
    // 64 KiB chunks: B stored 16 of them; A's host wrote 8 others, which B's snapshot
    // holds as zeroes (made so in the copy, not fetched); 240 were never written.
    assert_eq!(seeded["changed_in_snapshot"], 16, "{back}");
    assert_eq!(seeded["changed_in_seed"], 8, "{back}");
    assert_eq!(seeded["zero_in_snapshot"], 512 - 256 - 16, "{back}");
    assert_eq!(seeded["chunks_to_fetch"], 16, "{back}");
    assert!(
        seeded["copied_bytes"].as_u64().unwrap() >= 16 << 20,
        "{back}"
    );

    // The host on A now reads B's volume: A's data, B's changes, and none of what A's
    // host wrote after the snapshot (zeroes there, as on B).
    let on_back = format!("127.0.0.1:{port_a},{nqn_back},1");
    assert_eq!(
        verified(&oxperf(&on_back, "read", "0:32768", 128, 131072, 1)),
        32768
    );
    assert_eq!(
        verified(&oxperf(&on_back, "read", "40960:2048", 16, 65536, 5)),
        2048
    );
    let gone = oxperf(&on_back, "read", "32768:1024", 8, 65536, 7);
    assert_eq!(gone["unwritten_blocks"], 1024, "{gone}");
    let after = served();
    let fetched = after.get_bytes - before.get_bytes;
    // The same without a seed, side by side: every written chunk comes from the store.
    let nqn_full = "nqn.2026-12.io.ox:db-full";
    volume_over(&a, "db-full", "db-b", nqn_full, None);
    let on_full = format!("127.0.0.1:{port_a},{nqn_full},1");
    assert_eq!(
        verified(&oxperf(&on_full, "read", "0:32768", 128, 131072, 1)),
        32768
    );
    oxperf(&on_full, "read", "40960:2048", 16, 65536, 5);
    oxperf(&on_full, "read", "32768:1024", 8, 65536, 7);
    let full = served();
    println!(
        "fail-back of a 32 MiB volume (16 MiB written), 1 MiB changed there and 512 KiB here, \
         the same reads: seeded {} GETs, {fetched} bytes from the store; unseeded {} GETs, {} bytes",
        after.gets - before.gets,
        full.gets - after.gets,
        full.get_bytes - after.get_bytes
    );
    // The 16 changed chunks (1 MiB before compression), index pages and manifests:
    // not the 17 MiB the volume holds.
    assert!(fetched < 4 << 20, "{fetched} bytes fetched");
    assert!(full.get_bytes - after.get_bytes > 4 * fetched);

    // Its first snapshot continues B's lineage and stores nothing it did not write.
    let next = a.ok(&["snapshot", "create", "db-back", "--store", "s3"]);
    assert_eq!(next["state"], "done", "{next}");
    assert_eq!(next["result"]["parent"], theirs["result"]["id"], "{next}");
    assert_eq!(next["result"]["chunks_read"], 0, "{next}");

    // And back to B, seeded from its volume over A's first snapshot, which holds only
    // the 16 chunks its host wrote: the rest of it is no copy, and is read from the
    // store.
    let nqn_b2 = "nqn.2026-12.io.ox:db-b2";
    let again = volume_over(&b, "db-b2", "db-back", nqn_b2, Some("db-b"));
    assert_eq!(again["seeded"]["changed_in_snapshot"], 0, "{again}");
    assert_eq!(again["seeded"]["changed_in_seed"], 0, "{again}");
    // Its 240 zero chunks are zeroed in the copy; of the 272 others it held only the
    // 16 it wrote. (Its snapshot read those 16 through the device under it and
    // fetched nothing else: a snapshot's reads are not a host's, and start no
    // read-ahead.)
    assert_eq!(again["seeded"]["zero_in_snapshot"], 240, "{again}");
    assert_eq!(again["seeded"]["chunks_to_fetch"], 256, "{again}");
    let on_b2 = format!("127.0.0.1:{port_b},{nqn_b2},1");
    assert_eq!(
        verified(&oxperf(&on_b2, "read", "0:32768", 128, 131072, 1)),
        32768
    );
    assert_eq!(
        verified(&oxperf(&on_b2, "read", "40960:2048", 16, 65536, 5)),
        2048
    );
}

#[test]
fn a_new_clone_fetches_first_where_hosts_read_the_volume() {
    let (_server, dir, store, kek) = bed();
    let d = dir.path();
    let port = free_port();
    let (config, ctl) = appliance(&d.join("a"), port, &store, &kek);
    let mut oxd = start_oxd(&config);
    let on = export_db(&ctl, port, 32);
    // The host writes the whole volume, then reads 2 MiB at 8 MiB and 1 MiB at 20 MiB:
    // 48 chunks of 64 KiB are its working set.
    oxperf(&on, "write", "0:65536", 256, 131072, 1);
    assert_eq!(
        verified(&oxperf(&on, "read", "16384:4096", 16, 131072, 1)),
        4096
    );
    assert_eq!(
        verified(&oxperf(&on, "read", "40960:2048", 8, 131072, 1)),
        2048
    );
    // A clean stop (an upgrade, say) keeps what hosts read for the next snapshot.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
    drop(oxd);
    assert!(
        d.join("a/state/volumes/db.heat").exists(),
        "kept at the stop"
    );
    let _oxd = start_oxd(&config);
    assert!(
        !d.join("a/state/volumes/db.heat").exists(),
        "taken back at the start"
    );
    let job = ctl.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(job["state"], "done", "{job}");

    // A new clone fetches those first, by itself, before any host reads it.
    let nqn = "nqn.2026-12.io.ox:warm";
    clone_latest(&ctl, "warm", "db", nqn);
    let give_up = Instant::now() + std::time::Duration::from_secs(300);
    let got = loop {
        let got = ctl.ok(&["clone", "get", "warm"]);
        if got["chunks_present"].as_u64().unwrap() >= 48 {
            break got;
        }
        assert!(Instant::now() < give_up, "never warmed: {got}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(got["chunks_present"], 48, "exactly the working set: {got}");
    assert!(
        got["fetched_bytes"]["prefetch"].as_u64().unwrap() > 0,
        "{got}"
    );
    assert_eq!(got["fetched_bytes"]["client_miss"], 0, "{got}");
    // The host's reads there then wait for the store nowhere. (They are sequential, so
    // near the set's end the clone's read-ahead rightly asks for what follows it, as
    // prefetch; whether that has landed when the clone is looked at is timing.)
    let target = format!("127.0.0.1:{port},{nqn},1");
    assert_eq!(
        verified(&oxperf(&target, "read", "16384:4096", 16, 131072, 1)),
        4096
    );
    assert_eq!(
        verified(&oxperf(&target, "read", "40960:2048", 8, 131072, 1)),
        2048
    );
    let after = ctl.ok(&["clone", "get", "warm"]);
    assert_eq!(after["fetched_bytes"]["client_miss"], 0, "{after}");
    assert!(after["chunks_present"].as_u64().unwrap() >= 48, "{after}");
}

/// `oxctl store collect` on a second appliance: a snapshot cut short on A by `kill -9`
/// keeps its upload lease, so B's collection leaves A's volume place alone and says
/// whose upload runs there; once A has restarted and finished that snapshot, the lease
/// is gone, and B's collection goes through the place (anything the cut left is younger
/// than the grace: kept).
#[test]
fn a_collection_leaves_alone_an_upload_a_crash_cut_short_on_another_appliance() {
    let (server, dir, store, kek) = bed();
    let d = dir.path();
    let (port_a, port_b) = (free_port(), free_port());
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek);
    let (config_b, b) = appliance(&d.join("b"), port_b, &store, &kek);
    let mut oxd_a = start_oxd(&config_a);
    let _oxd_b = start_oxd(&config_b);
    let on = export_db(&a, port_a, 16);
    oxperf(&on, "write", "0:32768", 128, 131072, 1);
    // Slow uploads: the snapshot is still uploading when A dies.
    server
        .faults
        .delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let running = a.ok(&["snapshot", "create", "db", "--store", "s3", "--no-wait"]);
    a.examining(&running["id"].to_string());
    oxd_a.child.kill().unwrap();
    oxd_a.child.wait().unwrap();
    drop(oxd_a);
    server
        .faults
        .delay_ms
        .store(0, std::sync::atomic::Ordering::SeqCst);

    let browsed = b.ok(&["store", "browse", "s3"]);
    let owner_a = browsed["volumes"][0]["owner"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let place = browsed["volumes"][0]["prefix"]
        .as_str()
        .unwrap()
        .to_string();
    let held = b.ok(&["store", "collect", "s3", "--dry-run"]);
    assert_eq!(held["objects"], 0, "{held}");
    assert_eq!(held["keys"], serde_json::json!([]), "{held}");
    let skipped = held["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{held}");
    assert_eq!(skipped[0]["prefix"], place.as_str(), "{held}");
    let why = skipped[0]["reason"].as_str().unwrap();
    assert!(
        why.contains("being written") && why.contains(&owner_a),
        "{why}"
    );
    // One LIST of the top level, one of the volume's prefix, one of its leases.
    assert_eq!(held["requests"]["lists"], 3, "{held}");

    // A restarts and finishes the snapshot; its lease goes with it.
    let _oxd_a = start_oxd(&config_a);
    let done = a.finished("1");
    assert_eq!(done["state"], "done", "{done}");
    let after = b.ok(&["store", "collect", "s3"]);
    assert_eq!(after["skipped"], serde_json::json!([]), "{after}");
    assert_eq!(after["objects"], 0, "younger than the grace: {after}");
    assert_eq!(after["places"], 1, "{after}");
    assert_eq!(after["requests"]["lists"], 6, "{after}");
    // The snapshot reads back whole on B, through a clone.
    let nqn = "nqn.2026-12.io.ox:after";
    clone_latest(&b, "after", "db", nqn);
    let target = format!("127.0.0.1:{port_b},{nqn},1");
    assert_eq!(
        verified(&oxperf(&target, "read", "0:32768", 128, 131072, 1)),
        32768
    );
}
