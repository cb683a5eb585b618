//! Disaster recovery as an operator drills it, through `oxctl` and `oxperf` only: two
//! appliances (separate processes, state directories, ports and identities) share one
//! bucket on the S3 test server. Appliance A serves a volume and snapshots it; a host
//! goes on writing; A is killed (`kill -9`) and its state directory deleted. Appliance
//! B, which never saw A's catalogue, browses the bucket, clones A's newest snapshot and
//! serves it: the host reads exactly that snapshot's data. The figures a drill is for
//! (RPO: what was written after the newest snapshot; RTO: from the kill to the first
//! good read on B) are printed.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../ox/tests/s3server/mod.rs"]
mod s3server;

mod support;

use std::path::Path;
use std::time::Instant;

use support::{Ctl, free_port, oxperf, s3_store, start_oxd, verified, write_private};

/// The configuration of appliance `name` in `d`, exporting on `port`, with the shared
/// store `store` and key file `kek`.
fn appliance(d: &Path, port: u16, store: &str, kek: &Path) -> (std::path::PathBuf, Ctl) {
    std::fs::create_dir_all(d).unwrap();
    let socket = d.join("oxd.sock");
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n[control]\nsocket = {socket:?}\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\n\
             zstd_level = 1\nobject_mib = 1\n{store}\n[[key]]\nname = \"k1\"\nfile = {kek:?}\n",
            state = d.join("state"),
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
    let server = s3server::start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, _) = s3_store(&server.client_config(), d, "s3");
    // The key-encryption key both appliances hold (how it moves is the operator's
    // key procedure; here both read one file).
    let kek = d.join("kek");
    write_private(&kek, &"42".repeat(32));

    // Appliance A: a 32 MiB volume; the host writes its first 8 MiB (seed 1).
    let port_a = free_port();
    let (config_a, a) = appliance(&d.join("a"), port_a, &store, &kek);
    let mut oxd_a = start_oxd(&config_a);
    let nqn_a = "nqn.2026-12.io.ox:db";
    a.ok(&[
        "volume",
        "create",
        "db",
        "--size-mib",
        "32",
        "--nqn",
        nqn_a,
        "--allow-any-host",
    ]);
    let on_a = format!("127.0.0.1:{port_a},{nqn_a},1");
    oxperf(&on_a, "write", "0:16384", 128, 65536, 1);
    let first = a.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(first["state"], "done", "{first}");
    // More of the same range, then the newest snapshot.
    oxperf(&on_a, "write", "0:16384", 64, 65536, 1);
    let newest = a.ok(&["snapshot", "create", "db", "--store", "s3"]);
    assert_eq!(newest["state"], "done", "{newest}");
    let newest_id = newest["result"]["id"].as_str().unwrap().to_string();
    assert_eq!(newest["result"]["listed"], true, "{newest}");
    // The host writes on after it: what a disaster now loses (the RPO).
    let lost = oxperf(&on_a, "write", "32768:4096", 64, 32768, 2);
    let lost_bytes = lost["total"]["bytes"]
        .as_u64()
        .or_else(|| lost["bytes"].as_u64())
        .unwrap_or(64 * 32768);

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
    let snaps = db["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{found}");
    assert_eq!(snaps[0]["id"], newest_id.as_str(), "newest first");
    assert_eq!(snaps[1]["id"], first["result"]["id"]);
    assert_eq!(snaps[0]["parent"], first["result"]["id"]);
    assert_eq!(snaps[0]["key"], "k1");
    assert_eq!(snaps[0]["key_here"], true);

    let nqn_b = "nqn.2026-12.io.ox:db-dr";
    let made = b.ok(&[
        "clone",
        "create",
        "db-dr",
        "--store",
        "s3",
        "--volume",
        "db",
        "--latest",
        "--nqn",
        nqn_b,
        "--allow-any-host",
    ]);
    assert_eq!(made["name"], "db-dr", "{made}");
    let on_b = format!("127.0.0.1:{port_b},{nqn_b},1");
    // The first read the host gets on B ends the outage.
    let read = oxperf(&on_b, "read", "0:128", 1, 65536, 1);
    let rto = killed.elapsed();
    assert_eq!(verified(&read), 128);
    // Everything the newest snapshot holds is there...
    assert_eq!(
        verified(&oxperf(&on_b, "read", "0:16384", 128, 65536, 1)),
        16384
    );
    // ...and what was written after it is not (the range reads as never written).
    let after = oxperf(&on_b, "read", "32768:4096", 64, 32768, 2);
    assert!(after["mismatch"].is_null(), "{after}");
    assert_eq!(after["unwritten_blocks"], 4096, "{after}");
    let clone = b.ok(&["clone", "get", "db-dr"]);
    assert_eq!(
        clone["manifest_key"], snaps[0]["manifest_key"],
        "the clone reads the newest snapshot: {clone}"
    );
    println!(
        "drill: RPO {lost_bytes} bytes written after the newest snapshot; RTO {:.2} s from \
         kill -9 to the first good read on the second appliance (its start, browse and \
         clone included)",
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
    assert_eq!(by_id["snapshots"][0]["id"], newest_id.as_str());
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
    assert_eq!(older["snapshots"][0]["id"], first["result"]["id"]);
    assert!(older["next"].is_null(), "{older}");
    // An older snapshot by ID, through the bucket.
    let first_id = first["result"]["id"].as_str().unwrap();
    b.ok(&[
        "clone",
        "create",
        "db-old",
        "--store",
        "s3",
        "--volume",
        "db",
        "--snapshot",
        first_id,
    ]);
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
