//! The README's quickstart, step by step, on `examples/quickstart.toml` as shipped (only
//! its directory and ports moved to private ones): write 10 MiB into the sample volume
//! with oxperf, snapshot it into the local object store, clone it, read the clone back
//! with verification, and see that about 10 MiB came from the store. And the appliance
//! image's default configuration, as its first boot writes it, serving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::Path;
use std::process::Command;

use support::{bin, free_port, ok_json, oxperf, start_oxd, verified};

#[test]
fn the_readme_quickstart_works() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let shipped = std::fs::read_to_string(repo.join("examples/quickstart.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (data, disc, metrics) = (free_port(), free_port(), free_port());
    let config = shipped
        .replace(
            "target/quickstart",
            &dir.path().join("qs").display().to_string(),
        )
        .replace(
            "examples/quickstart.key",
            &repo.join("examples/quickstart.key").display().to_string(),
        )
        .replace("127.0.0.1:4420", &format!("127.0.0.1:{data}"))
        .replace("127.0.0.1:8009", &format!("127.0.0.1:{disc}"))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{metrics}"));
    assert_ne!(config, shipped);
    let path = dir.path().join("quickstart.toml");
    std::fs::write(&path, config).unwrap();
    let _oxd = start_oxd(&path);
    let socket = dir.path().join("qs/oxd.sock").display().to_string();
    let oxctl = |args: &[&str]| {
        let mut all = vec!["--socket", &socket, "--json"];
        all.extend_from_slice(args);
        ok_json(Command::new(bin("oxctl")).args(&all).output().unwrap())
    };
    let oxperf = |nqn: &str, workload: &str| {
        let target = format!("127.0.0.1:{data},{nqn},1");
        ok_json(
            Command::new(bin("oxperf"))
                .args([
                    "run", "--target", &target, "-w", workload, "--bs", "131072", "--range",
                    "0:20480", "--ios", "80", "--verify", "--cores", "0", "--json",
                ])
                .output()
                .unwrap(),
        )
    };
    // The sample volume is there and exported.
    let vols = oxctl(&["volume", "list"]);
    assert_eq!(vols["volumes"][0]["name"], "vol0");
    assert_eq!(vols["volumes"][0]["size_bytes"], 1u64 << 30);
    // Write 10 MiB, snapshot, clone, read the clone back.
    oxperf("nqn.2026-11.io.ox:vol0", "write");
    let snap = oxctl(&["snapshot", "create", "vol0", "--store", "local"]);
    assert_eq!(snap["state"], "done", "{snap}");
    let id = snap["result"]["id"].as_str().unwrap();
    oxctl(&[
        "clone",
        "create",
        "c0",
        "--snapshot",
        id,
        "--nqn",
        "nqn.2026-11.io.ox:c0",
        "--allow-any-host",
    ]);
    let read = oxperf("nqn.2026-11.io.ox:c0", "read");
    assert_eq!(read["verified_blocks"], 20480, "{read}");
    assert!(read["mismatch"].is_null());
    // About 10 MiB of a 1 GiB clone came from the store.
    let c = oxctl(&["clone", "get", "c0"]);
    let moved = c["object_bytes"].as_u64().unwrap();
    assert!(
        moved > 5 << 20 && moved <= (10 << 20) + (512 << 10),
        "moved {moved} bytes: {c}"
    );
}

/// The appliance image's default configuration (`appliance/image/default.toml`, as its
/// first boot writes it when given no seed: this machine's core layout from
/// `firstboot --layout`; only its directories and ports moved to private ones), with
/// the key first boot makes (`oxctl key create`): oxd starts on it; a volume created
/// with oxctl is exported on its listener, written and read back by oxperf and
/// snapshotted into its local store with that key; metrics are served; and it stops
/// cleanly.
#[test]
fn the_images_default_configuration_serves() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let image = repo.join("appliance/image");
    let shipped = std::fs::read_to_string(image.join("default.toml")).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let layout = Command::new("sh")
        .arg(image.join("firstboot"))
        .args(["--layout", &cores.to_string()])
        .output()
        .unwrap();
    assert!(layout.status.success(), "{layout:?}");
    let layout = String::from_utf8(layout.stdout).unwrap();
    let (reactors, ox) = layout.trim().split_once(' ').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = |p: &str| dir.path().join(p).display().to_string();
    let (data, disc, metrics) = (free_port(), free_port(), free_port());
    let config = shipped
        .replace("@REACTORS@", reactors)
        .replace("@OXCORES@", ox)
        .replace("@LISTEN@", "0.0.0.0")
        .replace("0.0.0.0:4420", &format!("0.0.0.0:{data}"))
        .replace("0.0.0.0:8009", &format!("0.0.0.0:{disc}"))
        .replace("127.0.0.1:9464", &format!("127.0.0.1:{metrics}"))
        .replace("/var/lib/oxd", &root("var/lib/oxd"))
        .replace("/run/oxd", &root("run/oxd"))
        .replace("/etc/ox", &root("etc/ox"));
    for shipped_only in [
        "@", "\"/var/", "\"/run/", "\"/etc/", ":4420\"", ":8009\"", ":9464\"",
    ] {
        assert!(
            !config.contains(shipped_only),
            "{shipped_only} left as shipped:\n{config}"
        );
    }
    // What the image and its service unit make before oxd starts: the configuration,
    // state and runtime directories, and first boot's key.
    for d in ["etc/ox/keys", "var/lib/oxd", "run/oxd"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let key = root("etc/ox/keys/default.key");
    let made = Command::new(bin("oxctl"))
        .args(["key", "create", &key])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let path = root("etc/ox/oxd.toml");
    std::fs::write(&path, config).unwrap();
    let mut oxd = start_oxd(Path::new(&path));

    let socket = root("run/oxd/oxd.sock");
    let oxctl = |args: &[&str]| {
        let mut all = vec!["--socket", &socket, "--json"];
        all.extend_from_slice(args);
        ok_json(Command::new(bin("oxctl")).args(&all).output().unwrap())
    };
    let nqn = "nqn.2026-11.io.ox:first";
    let created = oxctl(&[
        "volume",
        "create",
        "first",
        "--size-mib",
        "64",
        "--nqn",
        nqn,
        "--allow-any-host",
    ]);
    assert_eq!(created["listeners"][0], format!("0.0.0.0:{data}"));
    let target = format!("127.0.0.1:{data},{nqn},1");
    for workload in ["write", "read"] {
        verified(&oxperf(&target, workload, "0:8192", 32, 131072, 1));
    }
    let snap = oxctl(&["snapshot", "create", "first", "--store", "local"]);
    assert_eq!(snap["state"], "done", "{snap}");
    let listed = oxctl(&["snapshot", "list"]);
    assert_eq!(listed[0]["volume"], "first", "{listed}");
    let text = support::http_get(metrics, "/metrics");
    assert!(text.contains("ox_bdev_lifetime_bytes"), "{text}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(oxd.child.id() as i32, libc::SIGTERM) };
    assert!(oxd.child.wait().unwrap().success(), "a clean stop");
}
