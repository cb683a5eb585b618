//! Cold clone reads against a store behind a slow link: the network test bed
//! (`scripts/netem-bed`: the S3 test server in a network namespace of its own, behind
//! a link of packets with a bandwidth cap and a 20 ms round trip), counted at the
//! server. A sequential reader's
//! frames travel in few GETs and what moves is what it reads; a lone miss is one GET of
//! one frame. (The figures of this bed are `cargo bench -p ox --bench cold_reads`.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;

use ox::store::s3::{CredentialSource, S3Config};
use support::{CHUNK, clone_s3, env, filled_volume, options, read, snapshot_s3};

const ENDPOINT: &str = "http://10.231.0.2:9000";
const SIZE: u64 = 16 << 20;

/// The bed, up while this lives.
struct Bed {
    script: PathBuf,
}

impl Bed {
    /// Brings the bed up with the server and link `cargo test` built beside this test.
    fn up(rtt_ms: u32, rate_mbit: u32) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let script = root.join("scripts/netem-bed");
        let exe = std::env::current_exe().unwrap();
        let examples = exe
            .parent()
            .and_then(|deps| deps.parent())
            .unwrap()
            .join("examples");
        let (server, link) = (examples.join("s3_test_server"), examples.join("bed_link"));
        for built in [&server, &link] {
            assert!(built.exists(), "{} not built", built.display());
        }
        let out = Command::new(&script)
            .args(["up", "--rtt-ms", &rtt_ms.to_string()])
            .args(["--rate-mbit", &rate_mbit.to_string()])
            .env("OX_BED_SERVER", &server)
            .env("OX_BED_LINK", &link)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "netem-bed up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { script }
    }

    /// The server's counts: object GETs and their bytes.
    fn served(&self) -> (u64, u64) {
        let s = s3server::served_at("10.231.0.2:9000");
        (s.gets, s.get_bytes)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(&self.script).arg("down").status();
    }
}

#[test]
fn over_a_slow_link_sequential_reads_move_what_they_read_in_few_gets() {
    // Network namespaces need root: CI (scripts/test) runs as root; elsewhere say so.
    let uid = Command::new("id").arg("-u").output().unwrap().stdout;
    if String::from_utf8_lossy(&uid).trim() != "0" {
        eprintln!("skipped: the network test bed needs root (network namespaces)");
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipped: the network test bed's link needs TUN devices (/dev/net/tun)");
        return;
    }
    let bed = Bed::up(20, 400);
    let env = env();
    let mut config = S3Config::new(
        ENDPOINT.parse().unwrap(),
        s3server::BUCKET,
        "us-east-1",
        CredentialSource::Static {
            access_key: s3server::ACCESS.into(),
            secret_key: s3server::SECRET.into(),
        },
    );
    config.allow_http = true;
    let (_vol, handle, image) = filled_volume(&env, SIZE, 5);
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let open = |name: &str| {
        let (dev, basis, _) = clone_s3(&env, &config, &report.manifest_key, name, SIZE);
        (dev, basis)
    };

    // The whole volume, sequentially: nothing runs past its end.
    let (clone, basis) = open("seq");
    let before = bed.served();
    for at in (0..SIZE).step_by(128 << 10) {
        let got = read(&env, &clone, at, 128 << 10);
        assert!(
            got[..] == image[at as usize..(at + (128 << 10)) as usize],
            "at {at}"
        );
    }
    let c = basis.counters();
    let (frames, gets) = (
        c.frames.load(Ordering::SeqCst),
        c.frame_gets.load(Ordering::SeqCst),
    );
    assert_eq!(frames, SIZE / CHUNK, "each frame fetched once");
    // A read-ahead's GETs carry up to 16 frames here (2 MiB, but the objects are 1 MiB),
    // or up to 8 (512 KiB) should this machine make a 20 ms link look far (a round trip
    // over ~34 ms); fewer where a batch or an object ends.
    let least = if support::from_afar(&basis) { 4 } else { 8 };
    assert!(gets * least <= frames, "{gets} GETs for {frames} frames");
    let after = bed.served();
    let sent = after.1 - before.1;
    println!(
        "sequential over the bed: {} GETs at the server, {sent} bytes for {SIZE} read",
        after.0 - before.0
    );
    assert!(
        sent as f64 <= SIZE as f64 * 1.05,
        "{sent} bytes sent for {SIZE} read"
    );

    // A lone 4 KiB miss: one GET of one frame.
    let (clone, basis) = open("lone");
    let before = bed.served();
    let at = 100 * CHUNK + 4096;
    assert!(read(&env, &clone, at, 4096)[..] == image[at as usize..at as usize + 4096]);
    let after = bed.served();
    let c = basis.counters();
    assert_eq!(c.frames.load(Ordering::SeqCst), 1);
    assert_eq!(c.frame_gets.load(Ordering::SeqCst), 1);
    // The index page, then the frame.
    assert_eq!(after.0 - before.0, 2, "GETs at the server");
    assert!(after.1 - before.1 <= CHUNK + 4096 + c.page_bytes.load(Ordering::SeqCst));
    env.set.shutdown().unwrap();
}
