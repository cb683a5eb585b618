//! oxctl speaks only the API's types: it does not build the daemon's engine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[test]
fn oxctl_depends_on_no_part_of_the_daemons_engine() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "tools",
            "-e",
            "normal",
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
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(crates.contains("ox-api"), "{crates:?}");
    for engine in [
        "appliance",
        "reactor",
        "bdev",
        "nvmf",
        "ox",
        "io-uring",
        "zstd",
    ] {
        assert!(!crates.contains(engine), "oxctl depends on {engine}");
    }
}
