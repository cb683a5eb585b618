//! What a running snapshot costs a host write: 4 KiB writes at queue depth 1, each to a
//! chunk the snapshot has not stored yet (so each takes the copy-before-write path),
//! on a volume file, side by side in one run:
//!
//! - `plain`: no snapshot running (the floor);
//! - `memory`: copies kept in memory (a volume without a store for copies);
//! - `durable`: copies written to the volume's store (`.cbw`, one FUA write each), as
//!   the daemon runs volumes so that snapshots survive a restart;
//! - `recorded`: no snapshot, but the volume keeps its crash-consistent change record
//!   (`.dirty`, as the daemon does): each write is the chunk's first since the last
//!   snapshot, so it waits for the chunk to be on record (one group-committed fsync).
//!
//! Not a test: it prints figures. Rounds alternate the modes to share the disk's mood.
//!
//! cargo bench -p bdev --bench cow_writes -- [--dir DIR] [--chunks 1024] [--rounds 3]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::Path;
use std::time::{Duration, Instant};

use bdev::blocking::run_on;
use bdev::{Bdev, BdevIo, IoBuf, Tracking, UringConfig, VolumeHandle, create_volume, open_uring};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const CHUNK: u64 = 64 << 10;

fn volume(
    dir: &Path,
    name: &str,
    chunks: u64,
    durable: bool,
    recorded: bool,
) -> (Bdev, VolumeHandle) {
    let mut c = UringConfig::new(name, dir.join(format!("{name}.img")));
    c.create_size = Some(chunks * CHUNK);
    c.block_size = Some(512);
    let file = open_uring(&c).or_else(|_| {
        c.direct = false;
        open_uring(&c)
    });
    let (vol, h) = create_volume(name, file.unwrap(), CHUNK, Tracking::Fresh, None).unwrap();
    if durable {
        h.set_preserve_file(&dir.join(format!("{name}.cbw")))
            .unwrap();
    }
    if recorded {
        h.keep_dirty_record(&dir.join(format!("{name}.dirty")))
            .unwrap();
    }
    (vol, h)
}

/// Latencies (µs) of one 4 KiB write to each chunk, with or without a snapshot.
fn round(set: &ReactorSet, vol: &Bdev, h: &VolumeHandle, chunks: u64, snapshot: bool) -> Vec<f64> {
    let on = &set.handles()[0];
    if snapshot {
        futures_lite::future::block_on(h.begin_snapshot(on)).unwrap();
    }
    // Each round's writes are the chunks' first since the base: the record drops them.
    h.compact_dirty_record().unwrap();
    let lat = (0..chunks)
        .map(|c| {
            let io = BdevIo::write(
                c * CHUNK / 512,
                8,
                vec![IoBuf::from_slice(&[c as u8; 4096])],
            );
            let t = Instant::now();
            run_on(on, vol, io, Duration::from_secs(30))
                .unwrap()
                .result
                .unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    if snapshot {
        h.end_snapshot(None);
    }
    lat
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (mut chunks, mut rounds, mut dir) = (1024u64, 3usize, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut val = || it.next().expect("missing value").clone();
        match arg.as_str() {
            "--chunks" => chunks = val().parse().unwrap(),
            "--rounds" => rounds = val().parse().unwrap(),
            "--dir" => dir = Some(val()),
            other => panic!("unknown argument {other}"),
        }
    }
    let tmp =
        tempfile::tempdir_in(dir.unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into())).unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::parse("0").unwrap())).unwrap();
    let (pv, ph) = volume(tmp.path(), "plain", chunks, false, false);
    let (mv, mh) = volume(tmp.path(), "memory", chunks, false, false);
    let (dv, dh) = volume(tmp.path(), "durable", chunks, true, false);
    let (rv, rh) = volume(tmp.path(), "recorded", chunks, false, true);
    let mut all: [Vec<f64>; 4] = Default::default();
    for _ in 0..rounds {
        all[0].extend(round(&set, &pv, &ph, chunks, false));
        all[1].extend(round(&set, &mv, &mh, chunks, true));
        all[2].extend(round(&set, &dv, &dh, chunks, true));
        // No snapshot: the record is emptied (as after a catalogued snapshot) so every
        // write is a chunk's first again.
        futures_lite::future::block_on(rh.begin_snapshot(&set.handles()[0])).unwrap();
        rh.end_snapshot(None);
        all[3].extend(round(&set, &rv, &rh, chunks, false));
    }
    let mut p50_plain = 0.0;
    println!(
        "4 KiB writes at QD1, each to a chunk the snapshot still needs ({chunks} chunks × {rounds} rounds)"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12}",
        "mode", "p50 µs", "p99 µs", "mean µs", "p50 / plain"
    );
    for (name, lat) in ["plain", "memory", "durable", "recorded"]
        .iter()
        .zip(all.iter_mut())
    {
        lat.sort_by(f64::total_cmp);
        let p50 = pct(lat, 0.5);
        if *name == "plain" {
            p50_plain = p50;
        }
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        println!(
            "{name:>8} {p50:>10.1} {:>10.1} {mean:>10.1} {:>12.2}",
            pct(lat, 0.99),
            p50 / p50_plain
        );
    }
    set.shutdown().unwrap();
}
