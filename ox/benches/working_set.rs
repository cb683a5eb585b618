//! A clone that is useful at once. A boot-like read trace — clusters of adjacent reads
//! and scattered 4 KiB ones, seeded — is read by a host on a volume, which the volume
//! records as its working set; the volume is snapshotted into the S3 test server, and
//! the trace replayed on cold clones of that snapshot at QD 1, one clone fetching the
//! snapshot's working set as it opens and one not, alternately in one run. The store is
//! the network test bed's (`scripts/netem-bed up`, then `OX_BED_ENDPOINT`), or the S3
//! test server in this process adding `--delay-ms` to every request.
//!
//!     scripts/netem-bed up --rtt-ms 20 --rate-mbit 400   # then, with OX_BED_ENDPOINT set:
//!     cargo bench -p ox --bench working_set -- --mib 256 --rounds 3
//!     cargo bench -p ox --bench working_set -- --mib 256 --delay-ms 10 --rounds 3
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ox::snapshot::{SnapshotOptions, snapshot_volume};
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use support::world::World;
use support::{arg, text};

/// A boot-like trace over `size` bytes: `clusters` runs of 4–16 adjacent reads of 4–64
/// KiB (files read whole), and as many scattered 4 KiB reads (metadata, libraries'
/// pages), shuffled together. Offsets and lengths are 4 KiB aligned.
fn boot_trace(size: u64, clusters: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut runs: Vec<Vec<(u64, u64)>> = Vec::new();
    for _ in 0..clusters {
        let mut at = rand(size / 4096 - 1024) * 4096;
        let mut run = Vec::new();
        for _ in 0..4 + rand(13) {
            let len = (1 + rand(16)) * 4096;
            run.push((at, len));
            at += len;
        }
        runs.push(run);
    }
    for _ in 0..clusters {
        runs.push(vec![(rand(size / 4096) * 4096, 4096)]);
    }
    // Interleaved as a boot is: one piece of each in turn, in a shuffled order.
    for i in (1..runs.len()).rev() {
        runs.swap(i, rand(i as u64 + 1) as usize);
    }
    runs.into_iter().flatten().collect()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let size = arg("--mib", 256) << 20;
    let delay = arg("--delay-ms", 10) as u32;
    let rounds = arg("--rounds", 3);
    let clusters = arg("--clusters", 60);
    let bed = std::env::var("OX_BED_ENDPOINT").ok();
    let server = bed.is_none().then(|| s3server::start_server(false));
    let mut config = server.as_ref().map_or_else(
        || {
            S3Config::new(
                bed.as_deref().unwrap_or_default().parse().unwrap(),
                s3server::BUCKET,
                "us-east-1",
                support::bed_credentials(s3server::ACCESS, s3server::SECRET),
            )
        },
        s3server::Server::client_config,
    );
    config.allow_http = true;
    let w = World::start(config, size);
    let image = text(size as usize, 5);
    let (vol, vh) = w.volume(|i| image[(i << 20) as usize..((i + 1) << 20) as usize].to_vec());

    // The host boots from the volume: that is what the volume records.
    let trace = boot_trace(size, clusters, 11);
    let bytes: u64 = trace.iter().map(|(_, l)| l).sum();
    for &(off, len) in &trace {
        w.timed_read(&vol, off, len);
    }
    let heat = vh.take_heat();
    let listed: u64 = heat.iter().map(|w| u64::from(w.count_ones())).sum();
    let opts = SnapshotOptions {
        prefix: String::new(),
        zstd_level: 1,
        kek: Some(w.kek.clone()),
        object_bytes: 4 << 20,
        volume_id: [1; 16],
        volume_name: "bench".into(),
        progress: Arc::default(),
        outage_patience: Duration::from_secs(60),
        journal: None,
        store_name: "test".into(),
        checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
        verify_before_publish: false,
        working_set: Some(heat),
        owner: None,
        clock: Default::default(),
        encode_on: Default::default(),
    };
    let (c, r, vh2) = (w.config.clone(), w.on(0), vh.clone());
    let report = w
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c, ex).unwrap();
                snapshot_volume(&store, &r, &vh2, None, &opts, &Throttle::default())
                    .await
                    .unwrap()
            })
        })
        .unwrap();

    let link = match (&server, &bed) {
        (Some(s), _) => {
            s.faults.delay_ms.store(delay, Ordering::SeqCst);
            format!("the S3 test server adding {delay} ms to every request")
        }
        (None, Some(e)) => format!("the network test bed at {e}"),
        (None, None) => unreachable!(),
    };
    let mut replay: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut replay_gets = [0u32; 2];
    let mut warm_time = Vec::new();
    let mut n = 0;
    for _ in 0..rounds {
        for (k, with) in [false, true].into_iter().enumerate() {
            n += 1;
            let loaded = w.load(&report.manifest_key);
            let (clone, handle, basis) = w.clone_of(loaded, n, Throttle::default(), true);
            let gets = |b: &ox::basis::ObjectBasis| {
                let c = b.counters();
                c.frame_gets.load(Ordering::Relaxed) + c.page_gets.load(Ordering::Relaxed)
            };
            let start = Instant::now();
            let warming = with.then(|| {
                let (cores, on, h, b) = (
                    Arc::clone(&w.cores),
                    w.on(1 % w.set.len()),
                    handle.clone(),
                    basis.clone(),
                );
                std::thread::spawn(move || {
                    let r = cores
                        .run(move |ex| {
                            Box::pin(async move {
                                ox::hydrate::warm(
                                    &b,
                                    &ex,
                                    &h,
                                    &on,
                                    &ox::hydrate::Thickening::default(),
                                )
                                .await
                            })
                        })
                        .unwrap()
                        .unwrap();
                    (r, start.elapsed())
                })
            });
            for &(off, len) in &trace {
                w.timed_read(&clone, off, len);
            }
            replay[k].push(start.elapsed());
            if let Some(t) = warming {
                let (warmed, took) = t.join().unwrap();
                assert_eq!(warmed.listed, listed);
                warm_time.push(took);
            }
            replay_gets[k] += gets(&basis) as u32;
        }
    }
    let (without, with) = (median(&mut replay[0]), median(&mut replay[1]));
    println!(
        "## A boot-like trace on a cold clone: {} reads, {:.1} MiB, over {} chunks; {link}; median of {rounds}\n",
        trace.len(),
        bytes as f64 / f64::from(1 << 20),
        listed
    );
    println!("| clone | replay | GETs per replay |");
    println!("|---|---|---|");
    println!(
        "| without the working set | {without:.2?} | {} |",
        replay_gets[0] / rounds as u32
    );
    println!(
        "| fetching the working set as it opens | {with:.2?} | {} (working set fetched in {:.2?}) |",
        replay_gets[1] / rounds as u32,
        median(&mut warm_time)
    );
    println!(
        "\nwith / without: x{:.2}",
        with.as_secs_f64() / without.as_secs_f64()
    );
}
