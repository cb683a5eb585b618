//! What making snapshots resumable costs their speed: the same full snapshot of a
//! volume file (copies durable, as the daemon runs volumes) into a local-directory
//! store, without a journal, with the appliance's checkpoint interval, and with a ten
//! times shorter one, and with the appliance's interval plus read-back before
//! publishing (`verify_before_publish`: one GET per object); rounds alternate the
//! modes, after one uncounted round. Not a test: it prints figures.
//!
//! cargo bench -p ox --bench snapshot_journal -- [--mib 2048] [--rounds 2]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::blocking::run_on;
use bdev::{BdevIo, IoBuf, Tracking, UringConfig, create_volume, open_uring};
use ox::cores::OxCores;
use ox::keys::{Kek, SecretKey};
use ox::snapshot::{CHECKPOINT_EVERY, SnapshotOptions, snapshot_volume};
use ox::store::local::LocalStore;
use ox::throttle::Throttle;
use reactor::{CoreList, ReactorConfig, ReactorSet};
use support::{arg, text};

mod support;

const CHUNK: u64 = 64 << 10;

fn main() {
    let size = arg("--mib", 2048) << 20;
    let rounds = arg("--rounds", 2);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let cores = Arc::new(OxCores::start(&[None], 256).unwrap());
    let mut c = UringConfig::new("file", dir.path().join("vol.img"));
    c.create_size = Some(size);
    c.block_size = Some(512);
    let file = open_uring(&c).or_else(|_| {
        c.direct = false;
        open_uring(&c)
    });
    let (vol, h) = create_volume("vol", file.unwrap(), CHUNK, Tracking::Fresh, None).unwrap();
    h.set_preserve_file(&dir.path().join("vol.cbw")).unwrap();
    let on = set.handles()[0].clone();
    for (i, off) in (0..size).step_by(4 << 20).enumerate() {
        let io = BdevIo::write(
            off / 512,
            (4 << 20) / 512,
            vec![IoBuf::from_slice(&text(4 << 20, i as u64))],
        );
        run_on(&on, &vol, io, Duration::from_secs(60))
            .unwrap()
            .result
            .unwrap();
    }
    let kek = Kek::new("bench", SecretKey::random().unwrap());
    let modes: [(&str, Option<Duration>, bool); 4] = [
        ("no journal", None, false),
        (
            "journal, checkpoint every 5 s",
            Some(CHECKPOINT_EVERY),
            false,
        ),
        (
            "journal, checkpoint every 0.5 s",
            Some(CHECKPOINT_EVERY / 10),
            false,
        ),
        (
            "journal every 5 s, read back before publishing",
            Some(CHECKPOINT_EVERY),
            true,
        ),
    ];
    let mut results: Vec<Vec<(f64, u32, Duration, u64)>> = vec![Vec::new(); modes.len()];
    // Round 0 warms the caches up and is not counted.
    for round in 0..=rounds {
        for (m, (_, every, verify)) in modes.iter().enumerate() {
            let store_dir = tempfile::tempdir_in(dir.path()).unwrap();
            let opts = SnapshotOptions {
                prefix: String::new(),
                zstd_level: 1,
                kek: Some(kek.clone()),
                object_bytes: 8 << 20,
                volume_id: [1; 16],
                volume_name: "vol".into(),
                progress: Arc::default(),
                outage_patience: Duration::from_secs(60),
                journal: every.map(|_| dir.path().join("vol.snapshot")),
                store_name: "local".into(),
                checkpoint_every: every.unwrap_or(CHECKPOINT_EVERY),
                verify_before_publish: *verify,
                working_set: None,
                owner: None,
                clock: Default::default(),
                encode_on: Default::default(),
            };
            let (root, h, on) = (store_dir.path().to_path_buf(), h.clone(), on.clone());
            let start = Instant::now();
            let report = cores
                .run(move |_ex| {
                    Box::pin(async move {
                        let store = LocalStore::open(root).unwrap();
                        snapshot_volume(&store, &on, &h, None, &opts, &Throttle::default())
                            .await
                            .unwrap()
                    })
                })
                .unwrap();
            let took = start.elapsed();
            assert_eq!(report.chunks_read, size / CHUNK);
            if round == 0 {
                continue;
            }
            results[m].push((
                size as f64 / took.as_secs_f64() / 1e6,
                report.checkpoints,
                report.checkpoint_time,
                report.read_back.map_or(0, |r| r.gets),
            ));
        }
    }
    println!(
        "Full snapshot of a {} MiB volume file into a local-directory store, {rounds} rounds\n",
        size >> 20
    );
    println!(
        "| mode | MB/s of volume (each round) | checkpoints | time in checkpoints | read-back GETs | MB/s / no journal |"
    );
    println!("|---|---|---|---|---|---|");
    let base: f64 = results[0].iter().map(|r| r.0).sum::<f64>() / rounds as f64;
    for ((name, _, _), rs) in modes.iter().zip(&results) {
        let mean = rs.iter().map(|r| r.0).sum::<f64>() / rounds as f64;
        let each: Vec<String> = rs.iter().map(|r| format!("{:.0}", r.0)).collect();
        let n: u32 = rs.iter().map(|r| r.1).sum();
        let t: Duration = rs.iter().map(|r| r.2).sum();
        let gets: u64 = rs.iter().map(|r| r.3).sum();
        println!(
            "| {name} | {} | {n} | {:.0} ms | {gets} | ×{:.3} |",
            each.join(", "),
            t.as_secs_f64() * 1e3,
            mean / base
        );
    }
    set.shutdown().unwrap();
}
