//! The data paths of snapshots and clones against the S3 test server on loopback, each
//! beside its natural peer in one run:
//!
//! 1. snapshot MB/s vs the codec's own encode rate on one core (its limit here): into a
//!    store that drops the data objects (the path's own limit), a local directory, and
//!    the S3 test server;
//! 2. a cold 4 KiB clone read (miss: ranged GET, verify, decrypt, decompress, install)
//!    vs a bare ranged GET of 4 KiB and of one frame, on the same server; and the
//!    first read of a clone just opened, with its index page loaded ahead or not;
//! 3. sequential clone read MB/s (cold, read-ahead on) vs the thick source volume;
//! 4. thickening rate vs its bandwidth limit;
//! 5. client cold-read latency while thickening runs at full speed vs with it idle.
//!
//! Objects are 1 MiB here unless `--object-mib` says. (Until 2026-12-07 the test
//! server hashed the whole object on every GET, so its GET latency grew with the
//! object's size; it now reads a ranged GET's bytes alone.)
//!
//! cargo bench -p ox --bench clone_paths [-- --mib 256 --reads 300 --limit-mib 8 --object-mib 1]
//! (`--snapshot-only 1`: part 1 alone; `--s3 0`: part 1 without the S3 server, for
//! profiles of the snapshot path; `--content-md5 0|1`: PUTs never or always with
//! their MD5 too, instead of until the store shows it reads their CRC32C.)
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ox::codec::{Binding, Codec, CodecSettings};
use ox::hydrate::Thickening;
use ox::keys::SecretKey;
use ox::snapshot::{SnapshotOptions, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::local::LocalStore;
use ox::store::s3::{ContentMd5, S3Store};
use ox::throttle::{Class, Limit, Throttle};
use support::sink::SinkStore;
use support::world::World;
use support::{arg, text};

const CHUNK: u64 = 64 << 10;
/// Clones opened, with and without their index page loaded ahead, for 2b.
const FIRST_READS: u64 = 20;

/// Text-like data: compresses about 2:1, like much of what volumes hold.
fn data(len: usize) -> Vec<u8> {
    text(len, 0x9E37_79B9_7F4A_7C15)
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn mbs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Random distinct chunks in `lo..hi`, a stride apart so no read looks sequential.
fn scattered(n: u64, lo: u64, hi: u64) -> Vec<u64> {
    let mut x = 12345u64;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    while (out.len() as u64) < n.min((hi - lo) / 2) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = lo + (x >> 33) % (hi - lo);
        if seen.insert(c) && !seen.contains(&(c + 1)) && (c == 0 || !seen.contains(&(c - 1))) {
            out.push(c);
        }
    }
    out
}

/// Where part 1's snapshots go.
#[derive(Clone, Copy)]
enum Target {
    Sink,
    Local,
    S3,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Sink => "a store dropping the data objects",
            Target::Local => "a local directory store",
            Target::S3 => "the S3 server",
        }
    }
}

fn main() {
    let size = arg("--mib", 256) << 20;
    let reads = arg("--reads", 300);
    let limit = arg("--limit-mib", 8) << 20;
    let server = s3server::start_server(false);
    // `--ox-cores N`: the snapshot encodes on N OX cores. `--interrupt 1`: reactors
    // park as soon as they are idle (on two vCPUs, a reactor polling between the
    // snapshot's reads takes a whole one from the OX cores).
    let idle = match arg("--interrupt", 0) {
        0 => reactor::IdlePolicy::default(),
        _ => reactor::IdlePolicy::Interrupt,
    };
    let mut config = server.client_config();
    // `--content-md5 0|1`: PUTs never or always with their MD5 too (by default, until
    // the store answers one with its CRC32C, as the test server does at once).
    config.content_md5 = match arg("--content-md5", 2) {
        0 => ContentMd5::Never,
        1 => ContentMd5::Always,
        _ => ContentMd5::Auto,
    };
    let w = World::start_idle(config, size, idle).with_ox_cores(arg("--ox-cores", 1) as usize);
    let image = data(size as usize);
    let (vol, vh) = w.volume(|i| image[(i << 20) as usize..((i + 1) << 20) as usize].to_vec());

    // 1. Snapshot vs the codec on one core: to the S3 server, and to a local
    // directory store (no server sharing the two cores).
    let object_mib = arg("--object-mib", 1) as usize;
    let opts = SnapshotOptions {
        prefix: String::new(),
        // `--zstd N`: the level (1 by default).
        zstd_level: arg("--zstd", 1) as i32,
        kek: Some(w.kek.clone()),
        object_bytes: object_mib << 20,
        volume_id: [1; 16],
        volume_name: "bench".into(),
        progress: Arc::default(),
        outage_patience: Duration::from_secs(60),
        journal: None,
        store_name: "test".into(),
        checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
        verify_before_publish: false,
        working_set: None,
        owner: None,
        clock: Default::default(),
        encode_on: w.cores.set(),
    };
    let local_dir = tempfile::tempdir().unwrap();
    let mut snaps = Vec::new();
    // Where each snapshot goes: a store that drops the data objects (the path's own
    // limit), a local directory, and (unless `--s3 0`, to profile without the test
    // server on the same two cores) the S3 test server.
    let targets: &[Target] = if arg("--s3", 1) == 1 {
        &[Target::Sink, Target::Local, Target::S3]
    } else {
        &[Target::Sink, Target::Local]
    };
    for &to in targets {
        let (c, r, o, vh, dir) = (
            w.config.clone(),
            w.on(0),
            opts.clone(),
            vh.clone(),
            local_dir.path().to_path_buf(),
        );
        let start = Instant::now();
        let report = w
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let store: Box<dyn ObjectStore> = match to {
                        Target::S3 => Box::new(S3Store::new(c, ex).unwrap()),
                        Target::Local => Box::new(LocalStore::open(dir).unwrap()),
                        Target::Sink => Box::new(SinkStore {
                            kept: LocalStore::open(dir).unwrap(),
                        }),
                    };
                    snapshot_volume(&*store, &r, &vh, None, &o, &Throttle::default())
                        .await
                        .unwrap()
                })
            })
            .unwrap();
        snaps.push((start.elapsed(), report, to));
    }
    let report = snaps[snaps.len() - 1].1.clone();
    let key = SecretKey::random().unwrap();
    let binding = Binding {
        volume: [1; 16],
        snapshot: [2; 16],
    };
    let level = opts.zstd_level;
    let mut codec = Codec::new(CodecSettings { level }, Some(&key), binding).unwrap();
    let start = Instant::now();
    let mut stored = 0u64;
    for (i, c) in image.chunks(CHUNK as usize).enumerate() {
        stored += codec
            .encode(i as u64, c)
            .unwrap()
            .map_or(0, |f| f.len() as u64);
    }
    let enc = start.elapsed();
    println!("## 1. Snapshot vs the codec (zstd {level} + AES-256-GCM, 64 KiB chunks)\n");
    println!("| path | MB/s of volume | stored/raw |");
    println!("|---|---|---|");
    for (took, r, to) in &snaps {
        println!(
            "| snapshot to {} (read, encode on {} OX core(s), PUT, index, manifest) | {:.0} | {:.2} |",
            to.name(),
            w.cores.set().len(),
            mbs(size, *took),
            (r.data_bytes + r.meta_bytes) as f64 / size as f64
        );
    }
    println!(
        "| codec alone, one thread | {:.0} | {:.2} |",
        mbs(size, enc),
        stored as f64 / size as f64
    );
    let ratios: Vec<String> = snaps
        .iter()
        .map(|(took, _, to)| {
            format!(
                "x{:.2} ({})",
                enc.as_secs_f64() / took.as_secs_f64(),
                to.name()
            )
        })
        .collect();
    println!("\nsnapshot / codec: {}\n", ratios.join(", "));

    if arg("--snapshot-only", 0) == 1 || arg("--s3", 1) == 0 {
        return;
    }
    let loaded = w.load(&report.manifest_key);
    let object = loaded.sources[0].objects[0].clone();
    let chunks = size / CHUNK;

    // 2. Cold 4 KiB reads vs bare ranged GETs of the same sizes.
    let (clone, _h, _) = w.clone_of(loaded, 0, Throttle::default(), false);
    let mut cold: Vec<Duration> = scattered(reads, 0, chunks)
        .into_iter()
        .map(|c| w.timed_read(&clone, c * CHUNK + 8192, 4096))
        .collect();
    cold.sort();

    let frame_len = report.data_bytes / chunks;
    let (c, n, o) = (w.config.clone(), reads, object.clone());
    let (mut get4k, mut get_frame): (Vec<Duration>, Vec<Duration>) = w
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c, ex).unwrap();
                let (mut a, mut b) = (Vec::new(), Vec::new());
                for i in 0..n {
                    let off = (i * 7919 * 4096)
                        % ((object_mib as u64) << 20).saturating_sub(frame_len).max(1);
                    let t = Instant::now();
                    store.get_range(&o, off, 4096).await.unwrap();
                    a.push(t.elapsed());
                    let t = Instant::now();
                    store.get_range(&o, off, frame_len).await.unwrap();
                    b.push(t.elapsed());
                }
                (a, b)
            })
        })
        .unwrap();
    get4k.sort();
    get_frame.sort();
    println!("## 2. Cold 4 KiB clone read vs bare ranged GET ({reads} each)\n");
    println!("| request | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| clone read, 4 KiB, cold (one frame fetched) | {:.2?} | {:.2?} |",
        pct(&cold, 50),
        pct(&cold, 99)
    );
    println!(
        "| bare ranged GET, 4 KiB | {:.2?} | {:.2?} |",
        pct(&get4k, 50),
        pct(&get4k, 99)
    );
    println!(
        "| bare ranged GET, {frame_len} B (one frame) | {:.2?} | {:.2?} |",
        pct(&get_frame, 50),
        pct(&get_frame, 99)
    );
    println!(
        "\ncold read / 4 KiB GET (p50): x{:.2}; / frame GET: x{:.2}\n",
        pct(&cold, 50).as_secs_f64() / pct(&get4k, 50).as_secs_f64(),
        pct(&cold, 50).as_secs_f64() / pct(&get_frame, 50).as_secs_f64()
    );

    // 2b. The first read of a clone just opened: its index page loaded as it opened
    // (as the daemon's clones do) or not (the page, then the frame), alternately.
    let mut first: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..FIRST_READS {
        for (k, ahead) in [false, true].into_iter().enumerate() {
            let n = 100 + 2 * i as usize + k;
            let loaded = w.load(&report.manifest_key);
            // Allocated: the local copy's first write then costs what a disk's does.
            let (clone, _h, basis) = w.clone_of(loaded, n, Throttle::default(), true);
            if ahead {
                assert_eq!(basis.prefetch_index().recv().unwrap(), 1);
            }
            let c = (i * 7919 + 13) % chunks;
            first[k].push(w.timed_read(&clone, c * CHUNK + 8192, 4096));
        }
    }
    first.iter_mut().for_each(|v| v.sort());
    println!("## 2b. First 4 KiB read of a clone just opened ({FIRST_READS} clones each)\n");
    println!("| index page | GETs | p50 | p99 |");
    println!("|---|---|---|---|");
    for (k, what) in ["fetched by the read", "loaded as the clone opened"]
        .iter()
        .enumerate()
    {
        println!(
            "| {what} | {} | {:.2?} | {:.2?} |",
            2 - k,
            pct(&first[k], 50),
            pct(&first[k], 99)
        );
    }
    println!(
        "\nloaded ahead / fetched by the read (p50): x{:.2}\n",
        pct(&first[1], 50).as_secs_f64() / pct(&first[0], 50).as_secs_f64()
    );

    // 3. Sequential read of a cold clone vs the thick volume.
    let (clone, _h, _) = w.clone_of(w.load(&report.manifest_key), 1, Throttle::default(), false);
    let cold_seq = w.sequential(&clone, 128 << 10, 8);
    let thick_seq = w.sequential(&vol, 128 << 10, 8);
    println!("## 3. Sequential read, 128 KiB x 8 in flight\n");
    println!("| device | MB/s |");
    println!("|---|---|");
    println!(
        "| cold clone (read-ahead growing to 8 MiB, or more on a far store) | {:.0} |",
        mbs(size, cold_seq)
    );
    println!(
        "| thick source volume (RAM) | {:.0} |",
        mbs(size, thick_seq)
    );
    println!(
        "\nclone / thick: x{:.3}\n",
        thick_seq.as_secs_f64() / cold_seq.as_secs_f64()
    );

    // 4. Thickening against its limit (the throttle counts stored frame bytes).
    let throttle = Throttle::new(Limit::NONE, Limit::per_second(limit));
    // Drain the burst allowance so the measurement sees the steady rate.
    throttle.try_acquire("c", Class::Background, Limit::per_second(limit).burst);
    let (clone, h, basis) = w.clone_of(w.load(&report.manifest_key), 2, throttle, false);
    let control = Thickening::new();
    let start = Instant::now();
    let walker = w.thicken(&h, &control, 1);
    let fetched = walker.join().unwrap();
    let took = start.elapsed();
    let bytes: u64 = h.counters().fetched_bytes[2].load(std::sync::atomic::Ordering::Relaxed);
    let stored_bytes = basis
        .counters()
        .frame_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("## 4. Thickening vs its limit\n");
    println!("| limit (stored bytes/s) | thickened | took | stored MB/s | volume MB/s |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.1} MB/s | {} chunks | {took:.2?} | {:.1} | {:.1} |",
        limit as f64 / 1e6,
        fetched,
        mbs(stored_bytes, took),
        mbs(bytes, took)
    );
    println!(
        "\nrate / limit: x{:.3} (the limit counts stored frame bytes, as GETs move them)\n",
        mbs(stored_bytes, took) / (limit as f64 / 1e6)
    );
    drop(clone);

    // 5. Client cold reads with thickening idle vs at full speed (no limit): the
    // walk goes up from chunk 0, the client reads the top half.
    let mut p = Vec::new();
    for busy in [false, true] {
        let (clone, h, _) = w.clone_of(
            w.load(&report.manifest_key),
            3 + usize::from(busy),
            Throttle::default(),
            false,
        );
        let control = Thickening::new();
        let walker = busy.then(|| w.thicken(&h, &control, 1));
        let mut lat: Vec<Duration> = scattered(reads, chunks / 2, chunks)
            .into_iter()
            .filter(|&c| !h.is_present(c))
            .map(|c| w.timed_read(&clone, c * CHUNK, 4096))
            .collect();
        control.stop();
        let thickened = walker.map_or(0, |t| t.join().unwrap());
        lat.sort();
        p.push((busy, lat.len(), thickened, pct(&lat, 50), pct(&lat, 99)));
    }
    println!("## 5. Client cold 4 KiB reads, thickening idle vs at full speed\n");
    println!("| thickening | reads | chunks thickened meanwhile | p50 | p99 |");
    println!("|---|---|---|---|---|");
    for (busy, n, t, p50, p99) in &p {
        let label = if *busy { "full speed" } else { "idle" };
        println!("| {label} | {n} | {t} | {p50:.2?} | {p99:.2?} |");
    }
    println!(
        "\np99 busy / idle: x{:.2}",
        p[1].4.as_secs_f64() / p[0].4.as_secs_f64()
    );
    w.set.shutdown().unwrap();
}
