//! The appliance as an operator runs it, driven only through `oxctl` and `oxperf`:
//! start oxd, create a volume, write it with oxperf --verify, snapshot it into the S3
//! test server, clone the snapshot, verify the clone and write to it, kill -9 the
//! daemon, restart it, and verify everything again.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../ox/tests/s3server/mod.rs"]
mod s3server;

mod support;

use std::sync::atomic::Ordering;

use serde_json::Value;
use support::{
    Ctl, KillOnDrop, bin, free_port, http_get, ok_json, oxperf, run, s3_store, start_oxd,
    start_oxd_with, verified, write_private,
};

#[test]
fn snapshot_clone_and_a_kill_9_driven_by_oxctl_and_oxperf() {
    let server = s3server::start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, access_key) = s3_store(&server.client_config(), d, "s3");
    write_private(&d.join("kek"), &"11".repeat(32));
    // The second key is made by oxctl, as an operator would.
    let kek2 = d.join("kek2");
    ok_json(run(
        &bin("oxctl"),
        &["--json", "key", "create", kek2.to_str().unwrap()],
    ));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kek2).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let port = free_port();
    let metrics_port = free_port();
    let socket = d.join("oxd.sock");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[reactors]
cores = "0"

[metrics]
listen = "127.0.0.1:{metrics}"

[control]
socket = {socket:?}
audit_log = {audit:?}

[ox]
state_dir = {state:?}
export_listeners = ["127.0.0.1:{port}"]
zstd_level = 1
object_mib = 1

{store}
[[store]]
name = "down"
kind = "s3"
endpoint = "http://127.0.0.1:{down}"
bucket = "nothing"
credentials = "static"
access_key = "x"
secret_key_file = {secret:?}
allow_http = true

[[key]]
name = "k1"
file = {kek:?}

[[key]]
name = "k2"
file = {kek2:?}
"#,
            audit = d.join("audit.log"),
            state = d.join("state"),
            secret = d.join("s3.secret"),
            down = free_port(),
            kek = d.join("kek"),
            kek2 = d.join("kek2"),
            metrics = metrics_port,
        ),
    )
    .unwrap();
    let mut oxd = start_oxd(&config);
    let ctl = Ctl {
        socket: socket.display().to_string(),
    };
    let vol_nqn = "nqn.2026-11.io.ox:vol0";
    let clone_nqn = "nqn.2026-11.io.ox:c0";
    let vol = format!("127.0.0.1:{port},{vol_nqn},1");
    let cl = format!("127.0.0.1:{port},{clone_nqn},1");

    // A 16 MiB volume, its first 8 MiB written with verify blocks (seed 1).
    let created = ctl.ok(&[
        "volume",
        "create",
        "vol0",
        "--size-mib",
        "16",
        "--nqn",
        vol_nqn,
        "--allow-any-host",
    ]);
    assert_eq!(created["listeners"][0], format!("127.0.0.1:{port}"));
    oxperf(&vol, "write", "0:16384", 64, 131072, 1);

    // Snapshot into S3 (the command waits for the job), then clone it.
    let job = ctl.ok(&["snapshot", "create", "vol0", "--store", "s3"]);
    assert_eq!(job["state"], "done", "{job}");
    let id = job["result"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        job["result"]["chunks_read"], 128,
        "only written chunks are read"
    );
    let list = ctl.ok(&["snapshot", "list"]);
    assert_eq!(list[0]["id"], id.as_str());
    let first_manifest = list[0]["manifest_key"].as_str().unwrap().to_string();
    // Stores and keys are visible, never their secrets.
    let stores = ctl.ok(&["store", "list"]);
    assert_eq!(stores[0]["name"], "down");
    assert_eq!(stores[1]["name"], "s3");
    assert!(!stores.to_string().contains(access_key.as_str()));
    let keys = ctl.ok(&["key", "list"]);
    assert_eq!(keys[0]["name"], "k1");
    assert_eq!(keys[0]["default"], true);
    ctl.ok(&[
        "clone",
        "create",
        "c0",
        "--snapshot",
        &id[..8],
        "--nqn",
        clone_nqn,
        "--allow-any-host",
    ]);

    // The clone reads as the volume; then the host overwrites 512 KiB of it with 4 KiB
    // writes (seed 7) — partial chunks over unfetched data.
    assert_eq!(
        verified(&oxperf(&cl, "read", "0:16384", 64, 131072, 1)),
        16384
    );
    oxperf(&cl, "write", "4096:1024", 128, 4096, 7);
    let got = ctl.ok(&["clone", "get", "c0"]);
    assert!(got["chunks_present"].as_u64().unwrap() >= 128, "{got}");
    assert!(got["fetched_bytes"]["client_miss"].as_u64().unwrap() > 0);

    // Pausing is kept across restarts (checked after the crash below).
    let t = ctl.ok(&["clone", "thicken", "c0", "start", "--mib-s", "1"]);
    assert_eq!(t["thicken_mib_s"], 1, "{t}");
    let t = ctl.ok(&["clone", "thicken", "c0", "pause"]);
    // The choice is recorded; a walk still running is paused (with runs of adjacent
    // chunks in one GET each, the rest of this clone may be thick already).
    assert_eq!(t["paused"], true, "{t}");
    if let Some(walk) = t.get("thickening") {
        assert_eq!(walk["paused"], true, "{t}");
    }

    // Prometheus metrics show the devices, the clone's traffic and the reactors.
    let text = http_get(metrics_port, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let sample = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(sample("ox_bdev_ops_total{bdev=\"vol0\",type=\"write\"}") >= 64.0);
    assert!(sample("ox_clone_fetched_bytes_total{clone=\"c0\",reason=\"client_miss\"}") > 0.0);
    assert!(sample("ox_clone_hydration_ratio{clone=\"c0\"}") > 0.0);
    assert!(sample("ox_snapshots{volume=\"vol0\"}") == 1.0);
    // How long the snapshot took: listed, and the volume's newest known duration.
    let duration_ms = list[0]["duration_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no duration_ms in {list}"));
    assert_eq!(
        sample("ox_snapshot_last_duration_seconds{volume=\"vol0\"}"),
        duration_ms as f64 / 1000.0,
        "{list}"
    );
    assert!(text.contains("ox_reactor_busy_ratio{reactor=\"0\""));
    // Latencies are histograms (OpenMetrics text, ending with its EOF marker).
    assert!(sample("ox_bdev_latency_seconds_count{bdev=\"vol0\"}") >= 64.0);
    assert!(
        sample("ox_bdev_latency_seconds_bucket{le=\"+Inf\",bdev=\"vol0\"}")
            == sample("ox_bdev_latency_seconds_count{bdev=\"vol0\"}")
    );
    assert!(sample("ox_clone_miss_latency_seconds_count{clone=\"c0\"}") > 0.0);
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(http_get(metrics_port, "/nope").starts_with("HTTP/1.1 404"));

    // Hostile requests are refused and the daemon carries on.
    let o = ctl.call(&["volume", "create", "vol0", "--size-mib", "64"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists already"));
    let o = ctl.call(&["volume", "create", "bad/name", "--size-mib", "64"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("must be 1-64 characters"));
    let o = ctl.call(&["snapshot", "create", "vol0", "--store", "nowhere"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no store named"));
    let o = ctl.call(&[
        "clone",
        "create",
        "c1",
        "--store",
        "down",
        "--manifest-key",
        "x/ox1/m/00",
    ]);
    assert!(!o.status.success(), "a clone from an unreachable store");
    assert!(ctl.ok(&["volume", "list"])["clones"][0]["name"] == "c0");

    // An incremental snapshot reads only what changed (256 KiB = 4 chunks).
    oxperf(&vol, "write", "8192:512", 2, 131072, 3);
    let second = ctl.ok(&["snapshot", "create", "vol0", "--store", "s3"]);
    assert_eq!(second["result"]["chunks_read"], 4, "{second}");
    assert_eq!(second["result"]["parent"], id.as_str());

    // kill -9 in the middle of things — a snapshot uploading, thickening resumed —
    // then restart: every acknowledged write is there, the clone's presence record
    // agrees with its data, and the interrupted snapshot never appears. (The host's
    // read above and its read-ahead, as much again, cover the volume's data: the
    // clone may be whole by now, and thickening then has nothing left to fetch.)
    let counts = |c: &serde_json::Value| {
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("{c}"));
        (
            n(&c["chunks_present"]),
            n(&c["chunks_total"]),
            n(&c["fetched_bytes"]["thickening"]),
        )
    };
    let (_, _, thickened) = counts(&ctl.ok(&["clone", "get", "c0"]));
    ctl.ok(&["clone", "thicken", "c0", "resume", "--mib-s", "4"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let before = loop {
        let c = ctl.ok(&["clone", "get", "c0"]);
        let (present, total, now) = counts(&c);
        if present == total || now > thickened || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (present, total, now) = counts(&before);
    assert!(
        present == total || now > thickened,
        "the resumed thickening fetched nothing of a clone not yet whole: {before}"
    );
    // Rewrite the same data (so the snapshot has chunks to upload) and slow the
    // store down, so the kill lands while the snapshot is uploading.
    oxperf(&vol, "write", "8192:512", 2, 131072, 3);
    server.faults.delay_ms.store(500, Ordering::SeqCst);
    // Its first requests meet 503s: the job shows the retries while they happen.
    server.faults.unavailable.store(2, Ordering::SeqCst);
    let running = ctl.ok(&["snapshot", "create", "vol0", "--store", "s3", "--no-wait"]);
    assert_eq!(running["state"], "running", "{running}");
    let job_id = running["id"].to_string();
    ctl.examining(&job_id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let job = loop {
        let job = ctl.ok(&["job", "get", &job_id]);
        if job["retries"].as_u64().unwrap() >= 1 || std::time::Instant::now() > deadline {
            break job;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(job["state"], "running", "{job}");
    assert!(job["retries"].as_u64().unwrap() >= 1, "{job}");
    assert!(
        job["last_retry"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SlowDown")),
        "{job}"
    );
    let stores = ctl.ok(&["store", "list"]);
    assert!(stores[1]["retries"].as_u64().unwrap() >= 1, "{stores}");
    // An S3 store's last retry, as its type reads it.
    let typed = typed_as::<ox_api::methods::StoreList>(&stores);
    assert!(typed[1].last_retry.as_ref().is_some_and(Option::is_some));
    // Metrics count them by kind: 503 SlowDown is a store asking to slow down.
    let text = http_get(metrics_port, "/metrics");
    let retries = text
        .lines()
        .find_map(|l| l.strip_prefix("ox_store_retries_total{store=\"s3\",kind=\"slow_down\"} "))
        .unwrap_or_else(|| panic!("no slow_down retries of s3 in\n{text}"));
    assert!(retries.parse::<u64>().unwrap() >= 1, "{retries}");
    for family in [
        "ox_store_failures",
        "ox_throttle_waits",
        "ox_throttle_wait_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {family} counter")), "{text}");
    }
    assert!(text.contains("# TYPE ox_throttle_waiting gauge"), "{text}");
    // Deleting a snapshot of the volume now could collect the new one's objects.
    let second_id = second["result"]["id"].as_str().unwrap();
    let o = ctl.call(&["snapshot", "delete", second_id]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is running"),
        "{o:?}"
    );
    oxd.child.kill().unwrap();
    oxd.child.wait().unwrap();
    drop(oxd);
    server.faults.delay_ms.store(0, Ordering::SeqCst);
    // The restarted daemon's configuration also declares a clone of the first snapshot.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[clone]]\nname = \"c2\"\nstore = \"s3\"\nmanifest_key = \"{first_manifest}\"\n\
         nqn = \"nqn.2026-11.io.ox:c2\"\nallow_any_host = true\n"
    ));
    std::fs::write(&config, text).unwrap();
    let _oxd = start_oxd(&config);
    let c2 = format!("127.0.0.1:{port},nqn.2026-11.io.ox:c2,1");
    assert_eq!(
        verified(&oxperf(&c2, "read", "0:16384", 64, 131072, 1)),
        16384
    );
    let listed = ctl.ok(&["volume", "list"]);
    assert_eq!(listed["volumes"][0]["name"], "vol0");
    assert!(listed["clones"][0].get("unavailable").is_none(), "{listed}");
    assert_eq!(
        (
            &listed["clones"][0]["thicken"],
            &listed["clones"][0]["paused"]
        ),
        (&Value::Bool(true), &Value::Bool(false)),
        "thickening goes on after the restart: {listed}"
    );
    assert_eq!(listed["clones"][0]["thicken_mib_s"], 4);
    // The snapshot the crash cut short was started again at the restart (job 1 of the
    // new daemon): it publishes once, whole; nothing half-made is ever listed.
    let resumed = ctl.finished("1");
    assert_eq!(resumed["state"], "done", "{resumed}");
    let snaps = ctl.ok(&["snapshot", "list"]);
    assert_eq!(snaps.as_array().unwrap().len(), 3, "{snaps}");
    let t = ctl.ok(&["clone", "thicken", "c0", "pause"]);
    assert_eq!(t["paused"], true, "{t}");
    let parts = [("0:8192", 32, 1), ("8192:512", 2, 3), ("8704:7680", 30, 1)];
    for (range, ios, seed) in parts {
        let blocks: u64 = range.split(':').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            verified(&oxperf(&vol, "read", range, ios, 131072, seed)),
            blocks
        );
    }
    assert_eq!(
        verified(&oxperf(&cl, "read", "0:4096", 16, 131072, 1)),
        4096
    );
    assert_eq!(
        verified(&oxperf(&cl, "read", "4096:1024", 4, 131072, 7)),
        1024
    );
    assert_eq!(
        verified(&oxperf(&cl, "read", "5120:11264", 44, 131072, 1)),
        11264
    );

    // Verify checks every frame; rotation re-wraps every manifest under k2; a restore
    // of the first snapshot into a new volume reads back as the original.
    // The snapshot the crash cut short continued from its journal with its own point
    // in time and change set: it read only the 4 chunks that had changed, although a
    // crash loses the volume's change tracking.
    let third = resumed;
    assert!(third["result"]["resumed_at"].is_u64(), "{third}");
    assert_eq!(third["result"]["chunks_read"], 4, "{third}");
    assert_eq!(third["result"]["parent"], second["result"]["id"]);
    let checked = ctl.ok(&["snapshot", "verify", &id]);
    assert_eq!(checked["state"], "done", "{checked}");
    assert_eq!(checked["result"]["frames"], 128);
    let rotated = ctl.ok(&["key", "rotate", "k2"]);
    assert_eq!(rotated["rewrapped"], 3, "{rotated}");
    // A restore cancelled while the store holds its GETs fails at once, "cancelled",
    // and leaves nothing behind: the name is free for the restore after it.
    server.faults.let_go.store(false, Ordering::SeqCst);
    server.faults.hold_gets.store(1000, Ordering::SeqCst);
    let running = ctl.ok(&["snapshot", "restore", &id, "--name", "vol1", "--no-wait"]);
    assert_eq!(running["state"], "running", "{running}");
    let job_id = running["id"].to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.faults.holding.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore asked for nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    ctl.call(&["job", "cancel", &job_id]);
    // (oxctl prints a failed job, and exits non-zero: `call`, not `ok`.)
    let job = loop {
        let o = ctl.call(&["job", "get", &job_id]);
        let job: Value = serde_json::from_slice(&o.stdout).unwrap();
        if job["state"] != "running" || std::time::Instant::now() > deadline {
            break job;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"], "restore cancelled", "{job}");
    assert!(
        server.faults.holding.load(Ordering::SeqCst) > 0,
        "ended before its GETs"
    );
    let volumes = ctl.ok(&["volume", "list"]);
    assert!(
        !volumes.to_string().contains("\"vol1\""),
        "a cancelled restore left its volume: {volumes}"
    );
    server.faults.let_go.store(true, Ordering::SeqCst);
    server.faults.hold_gets.store(0, Ordering::SeqCst);
    let restored = ctl.ok(&[
        "snapshot",
        "restore",
        &id,
        "--name",
        "vol1",
        "--nqn",
        "nqn.2026-11.io.ox:vol1",
        "--allow-any-host",
    ]);
    assert_eq!(restored["state"], "done", "{restored}");
    let vol1 = format!("127.0.0.1:{port},nqn.2026-11.io.ox:vol1,1");
    assert_eq!(
        verified(&oxperf(&vol1, "read", "0:16384", 64, 131072, 1)),
        16384
    );
    // A snapshot a clone reads from is not deleted.
    let o = ctl.call(&["snapshot", "delete", &id]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reads from snapshot"),
        "{o:?}"
    );
    let third_id = third["result"]["id"].as_str().unwrap();
    let deleted = ctl.ok(&["snapshot", "delete", third_id]);
    let deleted = typed_as::<ox_api::methods::SnapshotDelete>(&deleted);
    assert!(deleted.objects_deleted >= 2, "{deleted:?}");
    assert_eq!(ctl.ok(&["snapshot", "list"]).as_array().unwrap().len(), 2);
    // The remaining snapshots are whole after the orphan collection.
    let checked = ctl.ok(&[
        "snapshot",
        "verify",
        second["result"]["id"].as_str().unwrap(),
    ]);
    assert_eq!(checked["state"], "done", "{checked}");

    // The audit log holds every call, and its chain is intact.
    let audit = ctl.ok(&["audit", "verify"]);
    assert_eq!(audit["intact"], true, "{audit}");
    let text = std::fs::read_to_string(d.join("audit.log")).unwrap();
    for action in [
        "volume_create",
        "snapshot_create",
        "clone_create",
        "start",
        "host_connect",
        "key_use",
    ] {
        assert!(
            text.contains(&format!("\"action\":\"{action}\"")),
            "{action}"
        );
    }
}

#[test]
fn a_snapshot_cut_short_by_a_clean_stop_continues_reading_only_the_changes() {
    cut_short_by_a_clean_stop(false, false);
}

#[test]
fn a_snapshot_whose_journal_is_lost_starts_over_and_still_stores_every_change() {
    cut_short_by_a_clean_stop(true, false);
}

#[test]
fn a_full_snapshot_cut_short_by_a_clean_stop_continues_full() {
    cut_short_by_a_clean_stop(false, true);
}

/// A snapshot of 4 changed chunks is cut short by SIGTERM; oxd takes it up again at the
/// restart — continuing it from its journal, or (`lose_journal`) starting over with
/// the journal damaged, when the change set it held must not be lost. `full`: the
/// snapshot cut short is `--full`, and continues as one (every chunk, no parent).
fn cut_short_by_a_clean_stop(lose_journal: bool, full: bool) {
    let server = s3server::start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, _) = s3_store(&server.client_config(), d, "s3");
    write_private(&d.join("kek"), &"22".repeat(32));
    let port = free_port();
    let socket = d.join("oxd.sock");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\nobject_mib = 1\n\
             {store}[[key]]\nname = \"k\"\nfile = {kek:?}\n\
             [[volume]]\nname = \"v\"\nsize_mib = 16\nnqn = \"nqn.2026-11.io.ox:v\"\nallow_any_host = true\n",
            state = d.join("state"),
            kek = d.join("kek"),
        ),
    )
    .unwrap();
    let ctl = Ctl {
        socket: socket.display().to_string(),
    };
    let vol = format!("127.0.0.1:{port},nqn.2026-11.io.ox:v,1");
    let mut oxd = start_oxd(&config);
    oxperf(&vol, "write", "0:16384", 64, 131072, 1);
    let first = ctl.ok(&["snapshot", "create", "v", "--store", "s3"]);
    assert_eq!(first["result"]["chunks_read"], 128, "{first}");
    // 4 chunks change; their snapshot is cut short by SIGTERM while uploading.
    oxperf(&vol, "write", "4096:512", 2, 131072, 2);
    server.faults.delay_ms.store(500, Ordering::SeqCst);
    let mut create = vec!["snapshot", "create", "v", "--store", "s3", "--no-wait"];
    if full {
        create.push("--full");
    }
    let running = ctl.ok(&create);
    assert_eq!(running["state"], "running", "{running}");
    ctl.examining(&running["id"].to_string());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
    drop(oxd);
    server.faults.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(ctl_list(&ctl), 1, "nothing half-made was published");
    let journal = d.join("state/volumes/v.snapshot");
    assert!(journal.exists(), "the stop kept the journal");
    if lose_journal {
        std::fs::write(&journal, "{ damaged").unwrap();
    }
    // Restarted: the snapshot continues by itself (or starts over), reading only the
    // 4 changed chunks — and all of them (a full one: every chunk).
    let _oxd = start_oxd(&config);
    let again = ctl.finished("1");
    assert_eq!(again["state"], "done", "{again}");
    assert_eq!(
        again["result"]["resumed_at"].is_u64(),
        !lose_journal,
        "continued or started over: {again}"
    );
    if full {
        // Every chunk of the 16 MiB volume, over no parent.
        assert!(again["result"]["parent"].is_null(), "{again}");
        assert_eq!(again["result"]["chunks_read"], 256, "{again}");
    } else {
        assert_eq!(again["result"]["chunks_read"], 4, "{again}");
        assert_eq!(again["result"]["parent"], first["result"]["id"]);
    }
    assert_eq!(ctl_list(&ctl), 2);
    assert!(
        !journal.exists(),
        "a catalogued snapshot's journal is removed"
    );
}

/// The configuration of volume `v`, of `mib`, exported as `nqn` to any host.
fn volume_v(mib: u64, nqn: &str) -> String {
    format!("[[volume]]\nname = \"v\"\nsize_mib = {mib}\nnqn = \"{nqn}\"\nallow_any_host = true\n")
}

/// Snapshots in the catalogue, read from the file (the daemon may be down).
fn ctl_list(ctl: &Ctl) -> usize {
    let state = std::path::Path::new(&ctl.socket).with_file_name("state");
    let text = std::fs::read_to_string(state.join("catalogue.json")).unwrap();
    let c: Value = serde_json::from_str(&text).unwrap();
    c["snapshots"].as_array().unwrap().len()
}

/// The configuration of an appliance in `d` (its state, socket and key there) with a
/// local store `l`, key `k` and exports on `port`: `ox_extra` is added to `[ox]`,
/// `rest` after the key (volumes, say). Returns the file and a client of its socket.
fn local_appliance(
    d: &std::path::Path,
    port: u16,
    ox_extra: &str,
    rest: &str,
) -> (std::path::PathBuf, Ctl) {
    write_private(&d.join("kek"), &"66".repeat(32));
    let socket = d.join("oxd.sock");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\n{ox_extra}\
             [[store]]\nname = \"l\"\nkind = \"local\"\npath = {objects:?}\n\
             [[key]]\nname = \"k\"\nfile = {kek:?}\n{rest}",
            state = d.join("state"),
            objects = d.join("objects"),
            kek = d.join("kek"),
        ),
    )
    .unwrap();
    let ctl = Ctl {
        socket: socket.display().to_string(),
    };
    (config, ctl)
}

/// A store whose `[[store]]` says nothing of credentials takes them from the AWS
/// credential chain: here, with no AWS_* keys in oxd's environment and no shared
/// credentials file, the config file's `credential_process` (a path with a space in
/// it, quoted as a shell would), and its check passes.
#[test]
fn a_store_without_credentials_takes_them_from_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (block, access_key) = s3_store(&config, d, "s3");
    let ox::store::s3::CredentialSource::Static { secret_key, .. } = &config.credentials else {
        panic!("the test server has static credentials")
    };
    let block: String = block
        .lines()
        .filter(|l| {
            !["credentials", "access_key", "secret_key_file"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tools = d.join("my tools");
    std::fs::create_dir(&tools).unwrap();
    let script = tools.join("creds.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho '{{\"Version\": 1, \"AccessKeyId\": \"{access_key}\", \
             \"SecretAccessKey\": \"{secret_key}\"}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let aws_config = d.join("aws-config");
    std::fs::write(
        &aws_config,
        format!("[default]\ncredential_process = \"{}\"\n", script.display()),
    )
    .unwrap();
    let (oxd_config, ctl) = local_appliance(d, free_port(), "", &block);
    let home = d.display().to_string();
    let aws_config = aws_config.display().to_string();
    let _oxd = start_oxd_with(
        &oxd_config,
        &[
            ("HOME", Some(&home)),
            ("AWS_CONFIG_FILE", Some(&aws_config)),
            ("AWS_ACCESS_KEY_ID", None),
            ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_SHARED_CREDENTIALS_FILE", None),
            ("AWS_PROFILE", None),
        ],
    );
    let c = ctl.ok(&["store", "check", "s3"]);
    assert_eq!(c["ok"], true, "{c}");
}

/// `oxctl store check`: a local store and the S3 test server pass every step; a store
/// with a wrong secret fails naming the step and the reason, and oxctl exits non-zero;
/// a snapshot into it fails at once with the refusal.
#[test]
fn a_store_check_names_the_failing_step_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = s3server::start_server(false);
    let (good, _) = s3_store(&server.client_config(), d, "s3");
    let bad_secret = d.join("bad.secret");
    write_private(&bad_secret, "not-the-secret");
    let bad = good.replace("name = \"s3\"", "name = \"bad\"").replace(
        &format!("{:?}", d.join("s3.secret")),
        &format!("{bad_secret:?}"),
    );
    assert_ne!(good, bad);
    let (config, ctl) = local_appliance(d, free_port(), "", &format!("{good}{bad}"));
    let _oxd = start_oxd(&config);
    for name in ["l", "s3"] {
        let c = ctl.ok(&["store", "check", name]);
        typed_as::<ox_api::methods::StoreCheck>(&c);
        assert_eq!(c["ok"], true, "{c}");
        let steps: Vec<&str> = c["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap())
            .collect();
        // The S3 test server's answers carry a `Date`: its clock is ours.
        let clock: &[&str] = if name == "s3" { &["clock"] } else { &[] };
        let want = [
            &["list"][..],
            clock,
            &["put", "get", "listed", "delete", "gone"],
        ]
        .concat();
        assert_eq!(steps, want, "{c}");
    }
    // oxd checked every store at start: the listing says how each went.
    let checked = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["check"].clone())
            .unwrap_or_default()
    };
    let list = loop {
        let list = ctl.ok(&["store", "list"]);
        if ["l", "s3", "bad"]
            .iter()
            .all(|n| !checked(&list, n).is_null())
        {
            break list;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Both kinds of store, as their type reads them.
    typed_as::<ox_api::methods::StoreList>(&list);
    assert_eq!(checked(&list, "l")["ok"], true, "{list}");
    assert_eq!(checked(&list, "s3")["ok"], true, "{list}");
    let bad = checked(&list, "bad");
    assert_eq!(bad["ok"], false, "{list}");
    assert_eq!(bad["step"], "list", "{list}");
    assert!(bad["error"].as_str().unwrap().contains("403"), "{list}");
    let out = ctl.call(&["store", "check", "bad"]);
    assert!(!out.status.success(), "a failed check fails oxctl");
    // Its answer, printed all the same.
    let failed =
        typed_as::<ox_api::methods::StoreCheck>(&serde_json::from_slice(&out.stdout).unwrap());
    assert!(failed.steps[0].error.is_some(), "{failed:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed its check at \"list\"") && err.contains("403"),
        "{err}"
    );
    // With the store's clock half an hour ahead, the refusal is the clock's doing:
    // oxctl names the clock, as oxd does.
    server.faults.clock_offset_s.store(1800, Ordering::SeqCst);
    let out = ctl.call(&["store", "check", "bad"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed its check at \"clock\"") && err.contains("ahead of"),
        "{err}"
    );
    server.faults.clock_offset_s.store(0, Ordering::SeqCst);
    // A snapshot into it fails at once with the store's refusal: not sent again, nor
    // waited out as an outage would be (ten minutes).
    ctl.ok(&["volume", "create", "v", "--size-mib", "4"]);
    let out = ctl.call(&["snapshot", "create", "v", "--store", "bad"]);
    assert!(!out.status.success(), "a failed snapshot fails oxctl");
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    let why = job["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("refused by the store") && why.contains("403"),
        "{job}"
    );
    assert_eq!(job["retries"], 0, "{job}");
}

/// A volume file cut short and a clone copy cut short while oxd was stopped: at the
/// restart both are listed as unavailable with the reason, neither is served (a host
/// would read zeroes where data was), and the rest of the appliance runs.
#[test]
fn a_cut_short_volume_file_or_clone_copy_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let nqn = |name: &str| format!("nqn.2026-11.io.ox:{name}");
    let (config, ctl) = local_appliance(
        d,
        port,
        "",
        &format!(
            "[[volume]]\nname = \"v\"\nsize_mib = 4\nnqn = \"{v}\"\nallow_any_host = true\n\
             [[volume]]\nname = \"w\"\nsize_mib = 4\nnqn = \"{w}\"\nallow_any_host = true\n",
            v = nqn("v"),
            w = nqn("w"),
        ),
    );
    let target = |name: &str| format!("127.0.0.1:{port},{},1", nqn(name));
    let mut oxd = start_oxd(&config);
    oxperf(&target("v"), "write", "0:8192", 32, 131072, 1);
    oxperf(&target("w"), "write", "0:8192", 32, 131072, 2);
    let snap = ctl.ok(&["snapshot", "create", "w", "--store", "l"]);
    let id = snap["result"]["id"].as_str().unwrap().to_string();
    ctl.ok(&[
        "clone",
        "create",
        "c",
        "--snapshot",
        &id,
        "--nqn",
        &nqn("c"),
        "--allow-any-host",
    ]);
    oxperf(&target("c"), "read", "0:8192", 32, 131072, 2);
    // What is exported is listed: volumes' and clones' subsystems with their namespace.
    let subsystems = ctl.ok(&["subsystems"]);
    for name in ["v", "w", "c"] {
        let s = subsystems
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["nqn"] == nqn(name))
            .unwrap_or_else(|| panic!("{name} is not listed: {subsystems}"));
        assert_eq!(s["namespaces"][0]["nsid"], 1, "{s}");
        assert_eq!(s["namespaces"][0]["bdev"], name, "{s}");
        assert_eq!(s["allow_any_host"], true, "{s}");
        assert_eq!(s["listeners"][0], format!("127.0.0.1:{port}"), "{s}");
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
    drop(oxd);
    for file in ["state/volumes/v.img", "state/clones/c.img"] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(file))
            .unwrap();
        f.set_len(1 << 20).unwrap();
    }
    let _oxd = start_oxd(&config);
    let list = ctl.ok(&["volume", "list"]);
    let find = |kind: &str, name: &str| {
        list[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()
            .clone()
    };
    for (kind, name) in [("volumes", "v"), ("clones", "c")] {
        let why = find(kind, name)["unavailable"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            why.contains("is 1048576 bytes, but the device it backs is 4194304 bytes"),
            "{name}: {list}"
        );
        // Not exported: a host finds no such subsystem.
        let read = std::process::Command::new(bin("oxperf"))
            .args([
                "run",
                "--target",
                &target(name),
                "-w",
                "read",
                "--bs",
                "4096",
            ])
            .args(["--range", "0:8", "--ios", "1", "--cores", "0", "--json"])
            .output()
            .unwrap();
        assert!(!read.status.success(), "{name} was served");
    }
    assert!(find("volumes", "w").get("unavailable").is_none(), "{list}");
    let refused = ctl.call(&["snapshot", "create", "v", "--store", "l"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("volume \"v\" is unavailable"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // The intact volume is served and verifies.
    let r = oxperf(&target("w"), "read", "0:8192", 32, 131072, 2);
    assert_eq!(verified(&r), 8192, "{r}");
}

/// Every chunk size, block size and zstd level the configuration accepts (and object
/// sizes at both ends) round-trips: written, snapshotted, cloned and restored, read
/// back block for block — and a 4 KiB-block volume's clone and restore have 4 KiB
/// blocks.
#[test]
fn every_accepted_configuration_round_trips_through_snapshot_clone_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (chunk_kib, zstd, object_mib) in [
        (64, 0, 1),
        (128, 1, 1024),
        (256, 3, 8),
        (512, 19, 1),
        (1024, 22, 2),
    ] {
        let run = d.join(format!("c{chunk_kib}"));
        std::fs::create_dir(&run).unwrap();
        let port = free_port();
        let nqn = |name: &str| format!("nqn.2026-11.io.ox:{name}");
        let (config, ctl) = local_appliance(
            &run,
            port,
            &format!("chunk_kib = {chunk_kib}\nzstd_level = {zstd}\nobject_mib = {object_mib}\n"),
            &format!(
                "[[volume]]\nname = \"a\"\nsize_mib = 4\nnqn = \"{a}\"\nallow_any_host = true\n\
                 [[volume]]\nname = \"b\"\nsize_mib = 4\nblock_size = 4096\nnqn = \"{b}\"\n\
                 allow_any_host = true\n",
                a = nqn("a"),
                b = nqn("b"),
            ),
        );
        let _oxd = start_oxd(&config);
        let target = |name: &str| format!("127.0.0.1:{port},{},1", nqn(name));
        for (vol, bs) in [("a", 512u64), ("b", 4096)] {
            let blocks = (4 << 20) / bs;
            let range = format!("0:{blocks}");
            let seed = chunk_kib + bs;
            oxperf(&target(vol), "write", &range, 32, 131072, seed);
            let snap = ctl.ok(&["snapshot", "create", vol, "--store", "l"]);
            assert_eq!(snap["state"], "done", "{snap}");
            let id = snap["result"]["id"].as_str().unwrap().to_string();
            let clone = format!("{vol}c");
            let restored = format!("{vol}r");
            ctl.ok(&[
                "clone",
                "create",
                &clone,
                "--snapshot",
                &id,
                "--nqn",
                &nqn(&clone),
                "--allow-any-host",
            ]);
            let r = ctl.ok(&["snapshot", "restore", &id, "--name", &restored, "--nqn"]
                .into_iter()
                .chain([nqn(&restored).as_str(), "--allow-any-host"])
                .collect::<Vec<_>>());
            assert_eq!(r["state"], "done", "{r}");
            let got = ctl.ok(&["clone", "get", &clone]);
            assert_eq!(got["block_size"], bs, "chunk {chunk_kib} KiB: {got}");
            let list = ctl.ok(&["volume", "list"]);
            let rv = list["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == restored)
                .unwrap()
                .clone();
            assert_eq!(rv["block_size"], bs, "{rv}");
            assert_eq!(rv["chunk_bytes"], chunk_kib << 10, "{rv}");
            for name in [&clone, &restored] {
                let read = oxperf(&target(name), "read", &range, 32, 131072, seed);
                assert_eq!(
                    verified(&read),
                    blocks,
                    "chunk {chunk_kib} KiB, {name}: {read}"
                );
            }
        }
    }
}

/// Refused Connects leave a trace: each is counted by reason in the metrics, and
/// audited and logged — at most 20 a minute, the next entry saying how many were left
/// out — with the host's NQN, the subsystem asked for and the peer's address.
#[test]
fn refused_connects_are_audited_rate_limited_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, metrics) = (free_port(), free_port());
    let audit = d.join("audit.log");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\naudit_log = {audit:?}\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize_mib = 4\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.ox:only\"\nlisteners = [\"127.0.0.1:{port}\"]\n\
             namespaces = [\"m\"]\nhosts = [\"nqn.2026-11.io.ox:someone\"]\n",
            socket = d.join("oxd.sock"),
        ),
    )
    .unwrap();
    let _oxd = start_oxd(&config);
    let attempt = |nqn: &str| {
        let o = run(
            &bin("oxperf"),
            &[
                "run",
                "--target",
                &format!("127.0.0.1:{port},{nqn},1"),
                "-w",
                "read",
                "--ios",
                "1",
            ],
        );
        assert!(!o.status.success(), "{nqn} was let in");
    };
    for _ in 0..25 {
        attempt("nqn.2026-11.io.ox:nope");
    }
    attempt("nqn.2026-11.io.ox:only");
    let count = |outcome: &str| -> u64 {
        let text = http_get(metrics, "/metrics");
        text.lines()
            .find(|l| l.starts_with(&format!("ox_nvmf_connects_total{{outcome=\"{outcome}\"}}")))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0, |v| v.parse().unwrap())
    };
    // The audit thread counts as it goes: wait for it to have seen every attempt.
    while count("no such subsystem on this listener") < 25 || count("host not allowed") < 1 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(count("no such subsystem on this listener"), 25);
    let log = std::fs::read_to_string(&audit).unwrap();
    let denied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"host_connect\""))
        .collect();
    assert_eq!(
        denied.len(),
        20,
        "at most 20 refusals a minute are written down"
    );
    assert!(
        denied
            .iter()
            .all(|l| l.contains("denied: ") && l.contains("127.0.0.1:")),
        "{denied:?}"
    );
}

/// Errors a client can act on: each kind of refusal has its code (invalid -32602, not
/// found -32001, conflict -32004, the daemon failed -32603), messages say each cause
/// once and never echo a huge name, a batch is refused as such, a create that fails
/// leaves no file behind, and a verify job counts its chunks.
#[test]
fn api_errors_say_what_kind_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (config, ctl) = local_appliance(d, free_port(), "", "");
    let socket = d.join("oxd.sock");
    let _oxd = start_oxd(&config);
    let call = |method: &str, params: &str| -> Value {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(
            s,
            "{{\"jsonrpc\":\"2.0\",\"method\":\"{method}\",\"params\":{params},\"id\":1}}"
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let error = |method: &str, params: &str| -> (i64, String) {
        let v = call(method, params);
        let e = &v["error"];
        (
            e["code"].as_i64().unwrap_or(0),
            e["message"].as_str().unwrap_or("").to_string(),
        )
    };
    let huge = "v".repeat(10_000);
    let cases = [
        (
            "volume_create",
            r#"{"name":"a","size_mib":1,"block_size":1024}"#.to_string(),
            -32602,
            "block_size 1024",
        ),
        (
            "volume_create",
            format!(r#"{{"name":"{huge}","size_mib":1}}"#),
            -32602,
            "must be 1-64 characters",
        ),
        (
            "volume_delete",
            r#"{"name":"nope"}"#.into(),
            -32001,
            "no volume named \"nope\"",
        ),
        (
            "snapshot_create",
            r#"{"volume":"nope","store":"l"}"#.into(),
            -32001,
            "no volume named",
        ),
        (
            "snapshot_create",
            r#"{"volume":"a","store":"nope"}"#.into(),
            -32001,
            "no store named",
        ),
        (
            "clone_get",
            r#"{"name":"nope"}"#.into(),
            -32001,
            "no clone named",
        ),
        ("job_cancel", r#"{"id":99}"#.into(), -32001, "no job 99"),
        // A huge value of the wrong kind, or a huge unknown key: named, not echoed whole.
        (
            "clone_thicken",
            format!(r#"{{"name":"c","action":"{huge}"}}"#),
            -32602,
            "action: unknown variant",
        ),
        (
            "volume_delete",
            format!(r#"{{"{huge}":1}}"#),
            -32602,
            "unknown field",
        ),
    ];
    for (method, params, code, text) in &cases {
        let (got, message) = error(method, params);
        assert_eq!(
            got,
            *code,
            "{method} {}: {message}",
            &params[..params.len().min(80)]
        );
        assert!(message.contains(text), "{method}: {message}");
        assert!(
            message.len() < 300,
            "{method}: a {}-byte message",
            message.len()
        );
    }
    ctl.ok(&["volume", "create", "a", "--size-mib", "4"]);
    let (code, message) = error("volume_create", r#"{"name":"a","size_mib":4}"#);
    assert_eq!(
        (code, message.as_str()),
        (-32004, "a volume or clone named \"a\" exists already")
    );
    // Too large for the file system: the daemon's failure, said once, no file left.
    let (code, message) = error("volume_create", r#"{"name":"big","size_mib":274877906944}"#);
    assert_eq!(code, -32603, "{message}");
    let first = message
        .find("File too large")
        .unwrap_or_else(|| panic!("{message}"));
    assert!(
        !message[first + 1..].contains("File too large"),
        "{message}"
    );
    let left: Vec<_> = std::fs::read_dir(d.join("state/volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("big."))
        .collect();
    assert!(left.is_empty(), "a failed create left {left:?}");
    // A batch is refused as such.
    {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(
            s,
            r#"[{{"jsonrpc":"2.0","method":"ox_get_version","id":1}}]"#
        )
        .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("batch requests are not supported")
        );
    }
    // A verify job counts the chunks it checked.
    let snap = ctl.ok(&["snapshot", "create", "a", "--store", "l"]);
    let id = snap["result"]["id"].as_str().unwrap().to_string();
    let v = ctl.ok(&["snapshot", "verify", &id]);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(
        (v["done"].as_u64(), v["total"].as_u64()),
        (Some(64), Some(64)),
        "{v}"
    );
}

/// kill -9 while a host writes: the volume's change record (every write's chunks on it
/// before the write is acknowledged) makes the next snapshot store what changed since
/// the last one — not the whole volume, as a crash cost before.
#[test]
fn a_crash_during_writes_keeps_the_next_snapshot_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let (config, ctl) = local_appliance(
        d,
        port,
        "zstd_level = 0\n",
        &volume_v(64, "nqn.2026-11.io.ox:v"),
    );
    let vol = format!("127.0.0.1:{port},nqn.2026-11.io.ox:v,1");
    let mut oxd = start_oxd(&config);
    oxperf(&vol, "write", "0:131072", 512, 131072, 1);
    let first = ctl.ok(&["snapshot", "create", "v", "--store", "l"]);
    assert_eq!(first["result"]["chunks_read"], 1024, "{first}");
    let image = d.join("state/volumes/v.img");
    let baseline = std::fs::read(&image).unwrap();
    // 16 MiB change, acknowledged; then a writer over another 8 MiB is cut off by
    // kill -9 once it has written some of it.
    oxperf(&vol, "write", "0:32768", 128, 131072, 2);
    let written = |ctl: &Ctl| -> u64 {
        ctl.ok(&["volume", "list"])["volumes"][0]["write_bytes"]
            .as_u64()
            .unwrap()
    };
    let before = written(&ctl);
    let mut writer = KillOnDrop(
        std::process::Command::new(bin("oxperf"))
            .args(["run", "--target", &vol, "-w", "randwrite", "--bs", "4096"])
            .args([
                "--range",
                "65536:16384",
                "--time",
                "600",
                "--qd",
                "4",
                "--cores",
                "0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    while written(&ctl) < before + (1 << 20) {
        // A writer that ended (it could not connect, say) writes nothing more.
        assert!(
            writer.0.try_wait().unwrap().is_none(),
            "the writer ended before writing 1 MiB"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    oxd.child.kill().unwrap();
    oxd.child.wait().unwrap();
    drop(oxd);
    drop(writer);
    // What changed since the first snapshot, as the volume file says.
    let now = std::fs::read(&image).unwrap();
    let changed = baseline
        .chunks(65536)
        .zip(now.chunks(65536))
        .filter(|(a, b)| a != b)
        .count() as u64;
    let _oxd = start_oxd(&config);
    let second = ctl.ok(&["snapshot", "create", "v", "--store", "l"]);
    let read = second["result"]["chunks_read"].as_u64().unwrap();
    let stored = second["result"]["data_bytes"].as_u64().unwrap();
    println!(
        "after kill -9: {changed} chunks changed; {read} read, {stored} bytes stored (x{:.3} the changed bytes)",
        stored as f64 / (changed * 65536) as f64
    );
    assert!(changed >= 256, "{changed}");
    // Everything that changed, and at most what was in flight at the kill besides.
    assert!(
        read >= changed && read as f64 <= changed as f64 * 1.05,
        "{second}"
    );
    assert!(stored as f64 <= (changed * 65536) as f64 * 1.05, "{second}");
}

/// `snapshot create --full`: every chunk read and stored over no parent, whatever the
/// volume's last snapshot (an escape when its lineage cannot go on, say after an
/// adoption); the next snapshot is incremental over it, and its clone reads as the
/// volume did.
#[test]
fn a_full_snapshot_reads_every_chunk_over_no_parent_and_starts_a_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let nqn = "nqn.2026-11.io.ox:v";
    let (config, ctl) = local_appliance(d, port, "", &volume_v(8, nqn));
    let mut oxd = start_oxd(&config);
    let vol = format!("127.0.0.1:{port},{nqn},1");
    oxperf(&vol, "write", "0:16384", 64, 131072, 5);
    let first = ctl.ok(&["snapshot", "create", "v", "--store", "l"]);
    assert_eq!(first["result"]["chunks_read"], 128, "{first}");
    // 4 chunks change: a snapshot would read those 4; a full one reads all 128.
    oxperf(&vol, "write", "4096:512", 2, 131072, 6);
    let full = ctl.ok(&["snapshot", "create", "v", "--store", "l", "--full"]);
    assert_eq!(full["state"], "done", "{full}");
    assert_eq!(full["result"]["chunks_read"], 128, "{full}");
    assert!(full["result"]["parent"].is_null(), "{full}");
    // The next is incremental over the full one, and reads nothing unchanged.
    let next = ctl.ok(&["snapshot", "create", "v", "--store", "l"]);
    assert_eq!(next["result"]["parent"], full["result"]["id"], "{next}");
    assert_eq!(next["result"]["chunks_read"], 0, "{next}");
    // The full one reads back as the volume was (seed 6 over seed 5, checked by verify).
    let id = full["result"]["id"].as_str().unwrap().to_string();
    ctl.ok(&[
        "clone",
        "create",
        "f",
        "--snapshot",
        &id,
        "--nqn",
        "nqn.2026-11.io.ox:f",
        "--allow-any-host",
    ]);
    let clone = format!("127.0.0.1:{port},nqn.2026-11.io.ox:f,1");
    assert_eq!(
        verified(&oxperf(&clone, "read", "4096:512", 2, 131072, 6)),
        512
    );

    // The clone's counters are kept across a restart (in the health file).
    let before = ctl.ok(&["clone", "get", "f"]);
    assert!(before["gets"].as_u64().unwrap() > 0, "{before}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
    drop(oxd);
    let _oxd = start_oxd(&config);
    let after = ctl.ok(&["clone", "get", "f"]);
    for counter in ["host_read_bytes", "integrity_failures", "refetches"] {
        assert_eq!(after[counter], before[counter], "{counter}: {after}");
    }
    // Never fewer: a read-ahead still in flight when `before` was read may have landed
    // since, and reopening reads its index pages again.
    let at = |v: &Value, path: &[&str]| {
        path.iter()
            .fold(v, |v, k| &v[*k])
            .as_u64()
            .unwrap_or_else(|| panic!("{path:?}: {v}"))
    };
    for path in [
        &["gets"][..],
        &["object_bytes"],
        &["fetched_bytes", "client_miss"],
        &["fetched_bytes", "prefetch"],
        &["fetched_bytes", "thickening"],
    ] {
        assert!(at(&after, path) >= at(&before, path), "{path:?}: {after}");
    }
    assert!(at(&after, &["fetched_bytes", "client_miss"]) > 0, "{after}");
    // Deleted and made again under its name: from zero.
    ctl.ok(&["clone", "delete", "f"]);
    let again = ctl.ok(&["clone", "create", "f", "--snapshot", &id]);
    assert_eq!(again["name"], "f", "{again}");
    let fresh = ctl.ok(&["clone", "get", "f"]);
    assert_eq!(fresh["host_read_bytes"], 0, "{fresh}");
    // Its opening's index page, no more.
    assert!(at(&fresh, &["gets"]) < at(&before, &["gets"]), "{fresh}");
}

/// A stale snapshot journal that cannot be removed (a directory in the way of its change
/// set) fails the next snapshot before it begins, naming the file: nothing is held, no
/// change is lost, and once the way is clear the snapshot after it stores every chunk.
#[test]
fn a_stale_journal_that_cannot_be_removed_fails_the_snapshot_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let nqn = "nqn.2026-11.io.ox:v";
    let (config, ctl) = local_appliance(d, port, "", &volume_v(8, nqn));
    let _oxd = start_oxd(&config);
    let vol = format!("127.0.0.1:{port},{nqn},1");
    oxperf(&vol, "write", "0:16384", 64, 131072, 5);
    let in_the_way = d.join("state/volumes/v.snapshot.changed");
    std::fs::create_dir_all(in_the_way.join("x")).unwrap();
    // (oxctl exits non-zero on a failed job: its answer is read from what it printed.)
    let o = ctl.call(&["snapshot", "create", "v", "--store", "l"]);
    let failed: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(failed["state"], "failed", "{o:?}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("v.snapshot.changed"), "{failed}");
    std::fs::remove_dir_all(&in_the_way).unwrap();
    let next = ctl.ok(&["snapshot", "create", "v", "--store", "l"]);
    assert_eq!(next["state"], "done", "{next}");
    assert_eq!(next["result"]["chunks_read"], 128, "{next}");
}

/// A snapshot cut short by a stop keeps its upload lease for the next start; when that
/// start cannot continue it (here: its parent's manifest is gone from the store), the
/// snapshot is given up and its lease released, so collection is not kept from the
/// volume's place for a day.
#[test]
fn a_snapshot_given_up_at_the_restart_releases_its_upload_lease() {
    let server = s3server::start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, _) = s3_store(&server.client_config(), d, "s3");
    let port = free_port();
    let nqn = "nqn.2026-11.io.ox:v";
    let (config, ctl) = local_appliance(
        d,
        port,
        "object_mib = 1\n",
        &format!("{store}{}", volume_v(16, nqn)),
    );
    let vol = format!("127.0.0.1:{port},{nqn},1");
    let mut oxd = start_oxd(&config);
    oxperf(&vol, "write", "0:32768", 128, 131072, 1);
    let first = ctl.ok(&["snapshot", "create", "v", "--store", "s3"]);
    assert_eq!(first["state"], "done", "{first}");
    oxperf(&vol, "write", "4096:512", 2, 131072, 2);
    server.faults.delay_ms.store(500, Ordering::SeqCst);
    let running = ctl.ok(&["snapshot", "create", "v", "--store", "s3", "--no-wait"]);
    ctl.examining(&running["id"].to_string());
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
    drop(oxd);
    server.faults.delay_ms.store(0, Ordering::SeqCst);
    let bucket = server.dir.path().join(s3server::BUCKET);
    let leases = || {
        let mut found = Vec::new();
        for place in std::fs::read_dir(&bucket).unwrap() {
            let dir = place.unwrap().path().join("ox1/u");
            if let Ok(entries) = std::fs::read_dir(&dir) {
                found.extend(entries.map(|e| e.unwrap().path()));
            }
        }
        found
    };
    assert_eq!(leases().len(), 1, "the stop keeps the upload's lease");
    // The parent's manifest is lost: the snapshot cannot go on at the next start.
    let manifest = first["result"]["manifest_key"].as_str().unwrap();
    std::fs::remove_file(bucket.join(manifest)).unwrap();
    let _oxd = start_oxd(&config);
    // (oxctl exits non-zero on a failed job: its answer is read from what it printed.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let again = loop {
        let o = ctl.call(&["job", "get", "1"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if !v.is_null() && v["state"] != "running" {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "job 1: {o:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(again["state"], "failed", "{again}");
    assert!(
        again["error"].as_str().unwrap().contains("not found"),
        "{again}"
    );
    // Released in the background: waited for, as long as it takes.
    while !leases().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the lease stays");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The JSON's shape: its keys, all the way down.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(shape).collect()),
        _ => Value::Null,
    }
}

/// `raw`, oxd's answer to method `M`, read as `M`'s typed result — which, written back,
/// has the same shape: a field on one side only (added to oxd, or to the type) fails.
fn typed_as<M: ox_api::methods::Method>(raw: &Value) -> M::Result {
    let typed: M::Result =
        serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{}: {e}: {raw}", M::NAME));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(shape(&back), shape(raw), "{}: {raw}", M::NAME);
    typed
}

/// The typed results of `ox-api` are exactly what oxd answers: each call's raw answer
/// and its typed reading, written back, have the same shape ([`typed_as`]). Every
/// method is called (but `auth`, over TCP: tools/tests/oxctl.rs), most of them both
/// ways where their answers differ in shape (a volume empty, over a snapshot, seeded;
/// a store's whole catalogue and a volume's page; a collection dry or not).
#[test]
fn typed_results_are_what_oxd_answers() {
    use ox_api::methods::{self as m, JobState, Method};
    fn strict<M: Method>(c: &mut ox_api::api::Client, params: &M) -> M::Result {
        typed_as::<M>(&c.invoke(params).unwrap())
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let nqn = "nqn.2026-11.io.ox:v";
    let (config, ctl) = local_appliance(d, port, "", &volume_v(8, nqn));
    // An audit log, for audit_verify.
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[control]\n",
        &format!("[control]\naudit_log = {:?}\n", d.join("audit.log")),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let _oxd = start_oxd(&config);
    let target = format!("127.0.0.1:{port},{nqn},1");
    oxperf(&target, "write", "0:16384", 64, 131072, 3);
    let mut c = ox_api::api::Client::connect(std::path::Path::new(&ctl.socket)).unwrap();
    let v = strict(&mut c, &m::OxGetVersion {});
    assert_eq!(v.api, ox_api::api::API_VERSION);
    let cores = strict(&mut c, &m::ReactorGetCores {});
    assert_eq!(cores.cores, [0]);
    let bdevs = strict(&mut c, &m::BdevGetBdevs { name: None });
    assert_eq!(bdevs.len(), 1, "{bdevs:?}");
    let one = strict(
        &mut c,
        &m::BdevGetBdevs {
            name: Some("v".into()),
        },
    );
    assert!(one[0].stats.write.bytes >= 8 << 20, "{one:?}");
    // A host connected while the subsystems are listed: its controller is shown.
    let host = KillOnDrop(
        std::process::Command::new(bin("oxperf"))
            .args(["run", "--target", &target, "-w", "randread", "--bs", "4096"])
            .args(["--range", "0:16384", "--time", "600", "--cores", "0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let subsystems = loop {
        let s = strict(&mut c, &m::NvmfGetSubsystems {});
        if !s[0].controllers.is_empty() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "no host: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(host);
    assert_eq!(subsystems[0].nqn, nqn, "{subsystems:?}");
    assert_eq!(subsystems[0].namespaces[0].bdev, "v", "{subsystems:?}");
    let audit = strict(&mut c, &m::AuditVerify {});
    assert!(audit.intact && audit.error.is_none(), "{audit:?}");
    // Waits for a job's end (each look is a request: the daemon's answer is the event).
    let finished = |c: &mut ox_api::api::Client, id: u64| loop {
        let j = strict(c, &m::JobGet { id });
        if j.state != JobState::Running {
            return j;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let snapshot = |volume: &str| m::SnapshotCreate {
        volume: volume.into(),
        store: "l".into(),
        key: None,
        verify: None,
        full: None,
    };
    let started = strict(&mut c, &snapshot("v"));
    assert_eq!(
        (started.kind.as_str(), started.target.as_str()),
        ("snapshot", "v")
    );
    let snap = finished(&mut c, started.id);
    assert_eq!(snap.state, JobState::Done, "{snap:?}");
    assert_eq!(snap.error, None);
    let id = snap.result["id"].as_str().unwrap().to_string();
    let verify = strict(&mut c, &m::SnapshotVerify { id: id.clone() });
    let verified = finished(&mut c, verify.id);
    assert_eq!(verified.state, JobState::Done, "{verified:?}");
    let restore = strict(
        &mut c,
        &m::SnapshotRestore {
            id: id.clone(),
            name: "r".into(),
            nqn: None,
            hosts: None,
            allow_any_host: None,
        },
    );
    assert_eq!(finished(&mut c, restore.id).state, JobState::Done);
    let jobs = strict(&mut c, &m::JobList {});
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    // Cancelling a snapshot that has ended answers the job as it is.
    let cancelled = strict(&mut c, &m::JobCancel { id: started.id });
    assert_eq!(cancelled.state, JobState::Done);
    // A clone, open: every figure given.
    let created = strict(
        &mut c,
        &m::CloneCreate {
            name: "c".into(),
            snapshot: Some(id.clone()),
            store: None,
            manifest_key: None,
            volume: None,
            latest: None,
            thicken: None,
            nqn: Some("nqn.2026-11.io.ox:c".into()),
            hosts: None,
            allow_any_host: Some(true),
        },
    );
    assert_eq!(created.listeners, [format!("127.0.0.1:{port}")]);
    let clone = strict(&mut c, &m::CloneGet { name: "c".into() });
    assert_eq!(clone.chunks_total, Some(128), "{clone:?}");
    let paused = strict(
        &mut c,
        &m::CloneThicken {
            name: "c".into(),
            action: m::ThickenAction::Pause,
            mib_s: None,
        },
    );
    assert!(paused.paused && paused.thicken, "{paused:?}");
    // Volumes: empty; over the snapshot; over it seeded from v (whose last it is).
    let volume =
        |name: &str, size_mib: Option<u64>, snapshot: Option<&str>, seed| m::VolumeCreate {
            name: name.into(),
            size_mib,
            block_size: None,
            snapshot: snapshot.map(String::from),
            store: None,
            manifest_key: None,
            volume: None,
            latest: None,
            seed,
            nqn: None,
            hosts: None,
            allow_any_host: None,
        };
    let empty = strict(&mut c, &volume("e", Some(4), None, None));
    assert!(
        empty.listeners.is_empty() && empty.seeded.is_none(),
        "{empty:?}"
    );
    let over = strict(&mut c, &volume("o", None, Some(&id), None));
    assert_eq!(over.seeded, Some(None), "{over:?}");
    let seeded = strict(&mut c, &volume("s", None, Some(&id), Some("v".into())));
    let how = seeded.seeded.flatten().unwrap();
    assert_eq!((how.seed.as_str(), how.chunks), ("v", 128), "{how:?}");
    let listed = strict(&mut c, &m::VolumeList {});
    assert_eq!(listed.volumes.len(), 5, "v, r, e, o, s: {listed:?}");
    assert_eq!(listed.clones.len(), 1, "{listed:?}");
    let snaps = strict(&mut c, &m::SnapshotList { volume: None });
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].listed && snaps[0].parent.is_none(), "{snaps:?}");
    assert!(
        snaps[0].duration_ms > 0,
        "a duration is recorded: {snaps:?}"
    );
    // A snapshot nothing needs, deleted.
    let of_e = strict(&mut c, &snapshot("e"));
    let of_e = finished(&mut c, of_e.id);
    let e_id = of_e.result["id"].as_str().unwrap().to_string();
    let deleted = strict(&mut c, &m::SnapshotDelete { id: e_id.clone() });
    assert_eq!((deleted.id, deleted.kept_as_ancestor), (e_id, false));
    // Keys: listed, rotated, and sent to this appliance itself.
    let keys = strict(&mut c, &m::KeyList {});
    assert_eq!((keys.len(), keys[0].default), (1, true), "{keys:?}");
    let rotated = strict(&mut c, &m::KeyRotate { to: "k".into() });
    assert_eq!(
        (rotated.snapshots, rotated.rewrapped),
        (1, 0),
        "{rotated:?}"
    );
    let receiver = strict(&mut c, &m::KeyReceiver {});
    let exported = strict(
        &mut c,
        &m::KeyExport {
            key: "k".into(),
            to: receiver.public_key,
        },
    );
    assert_eq!(exported.check, keys[0].check);
    let imported = strict(
        &mut c,
        &m::KeyImport {
            sealed: exported.sealed,
        },
    );
    assert!(imported.configured, "{imported:?}");
    // Stores: listed, checked, collected (dry and not), browsed both ways.
    let check = strict(&mut c, &m::StoreCheck { name: "l".into() });
    assert!(check.ok, "{check:?}");
    let stores = strict(&mut c, &m::StoreList {});
    assert_eq!(
        stores[0].path,
        Some(d.join("objects").display().to_string())
    );
    assert!(stores[0].check.as_ref().is_some_and(|c| c.ok), "{stores:?}");
    for dry_run in [true, false] {
        let collected = strict(
            &mut c,
            &m::StoreCollect {
                name: "l".into(),
                dry_run: Some(dry_run),
            },
        );
        assert_eq!(collected.keys.is_some(), dry_run, "{collected:?}");
    }
    let browse = |volume: Option<&str>| m::StoreBrowse {
        store: "l".into(),
        volume: volume.map(String::from),
        limit: None,
        after: None,
    };
    let m::Browsed::Store(whole) = strict(&mut c, &browse(None)) else {
        panic!("a browse of the whole store is read as one")
    };
    assert!(
        whole.volumes.iter().any(|v| v.head.name == "v"),
        "{whole:?}"
    );
    let m::Browsed::Volume(page) = strict(&mut c, &browse(Some("v"))) else {
        panic!("a browse of a volume is read as one")
    };
    assert_eq!((page.head.name.as_str(), page.snapshots.len()), ("v", 1));
    let adopted = strict(
        &mut c,
        &m::VolumeAdopt {
            name: "v".into(),
            store: "l".into(),
        },
    );
    assert_eq!(adopted.owner, adopted.adopted_from, "adopted already");
    // A policy, with a snapshot already there: its RPO is that snapshot's age.
    let set = strict(
        &mut c,
        &m::PolicySet {
            volume: "v".into(),
            store: "l".into(),
            every_s: 3600,
            key: None,
            keep_last: Some(2),
            hourly: None,
            daily: None,
            weekly: None,
            monthly: None,
        },
    );
    assert_eq!(set.newest.as_deref(), Some(id.as_str()), "{set:?}");
    let policies = strict(&mut c, &m::PolicyList {});
    assert_eq!(policies.len(), 1, "{policies:?}");
    assert_eq!(policies[0].keep_last, 2);
    let unset = strict(&mut c, &m::PolicyDelete { volume: "v".into() });
    assert_eq!(unset.volume, "v");
    let gone = strict(&mut c, &m::CloneDelete { name: "c".into() });
    assert_eq!(gone.name, "c");
    let gone = strict(&mut c, &m::VolumeDelete { name: "e".into() });
    assert_eq!(gone.name, "e");
}
