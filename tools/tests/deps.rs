//! The tools speak only wire and API types: neither oxctl nor oxperf builds the
//! daemon's engine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;

/// The crates `package` depends on to build and run (dev-dependencies left out).
fn runtime_crates(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The daemon's engine: what a tool must not build.
const ENGINE: [&str; 8] = [
    "appliance",
    "reactor",
    "bdev",
    "nvmf",
    "ox",
    "io-uring",
    "zstd",
    "aes-gcm",
];

#[test]
fn oxctl_depends_on_no_part_of_the_daemons_engine() {
    let crates = runtime_crates("tools");
    assert!(crates.contains("ox-api"), "{crates:?}");
    for engine in ENGINE {
        assert!(!crates.contains(engine), "oxctl depends on {engine}");
    }
}

#[test]
fn oxperf_speaks_nvme_tcp_through_the_wire_types_alone() {
    let crates = runtime_crates("perf");
    assert!(crates.contains("nvmf-wire"), "{crates:?}");
    for engine in ENGINE {
        assert!(!crates.contains(engine), "oxperf depends on {engine}");
    }
}
