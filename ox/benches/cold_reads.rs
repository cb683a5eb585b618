//! Cold clone reads against an object store that may be far away: the S3 test server in
//! process on loopback, or the one of the network test bed (`scripts/netem-bed up`,
//! then `OX_BED_ENDPOINT` or `--endpoint`), with requests and bytes counted at the
//! server. One run, side by side:
//!
//! 1. a bare 4 KiB ranged GET on a kept-alive connection vs on a fresh one (a
//!    delayed-ACK stall shows as a kept-alive GET slower than a fresh one);
//! 2. cold 4 KiB clone reads at QD 1, scattered (each a miss);
//! 3. a cold sequential read, 128 KiB requests, 16 in flight: MB/s, GETs, and bytes
//!    the server sent per byte read, and the read-ahead the basis wants from its
//!    store's round trip (`--read-ahead-mib N`: a fixed read-ahead instead); then (3b)
//!    cold 4 KiB reads at QD 1 of another clone while a cold sequential read runs;
//! 4. thickening under a background limit beside a host's cold 4 KiB reads at QD 1.
//!
//! `--restore-only N` runs instead, N times, a restore of the snapshot onto a RAM
//! device as it was done before 2026-12-07 (one chunk at a time, over at most its first
//! 16 MiB: a far store makes that slow) and as `ox::hydrate::restore` does it, then a
//! verify: MB/s and GETs at the server of each.
//!
//! The volume holds incompressible bytes, so what moves is what is read (as with
//! s3backer over the same data: `scripts/bench-vs-s3backer`). Objects are 1 MiB
//! unless `--object-mib` says. The snapshot keeps no journal unless `--journal 1` (as
//! the appliance does for its volumes: a checkpoint every 5 s). `--snapshot-only 1`
//! stops after the snapshot, `--cold-only 1` after section 2. `--split-cores 1` lays
//! the cores out as the appliance image does (reactors on all but the last, the OX
//! core on the last) instead of reactors on all and an unpinned OX core. `--sequential-only N`
//! runs only section 3, N times, each over a
//! clone of its own (new connections, as a clone opened afresh has), so two builds or
//! settings can be set side by side quickly. With `OX_TRACE` set, every scattered read
//! (sections 2, 3b and 4) prints its time and the TCP connections opened meanwhile (in
//! this network namespace, by any process), and every sequential read (3, 3b) when
//! each 16 MiB of it was read and at what rate.
//!
//! cargo bench -p ox --bench cold_reads [-- --mib 256 --reads 100 --object-mib 1 --endpoint URL
//!     --read-ahead-mib N --journal 1 --snapshot-only 1 --cold-only 1 --split-cores 1
//!     --sequential-only N --restore-only N]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;
mod support;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{Basis, Bdev};
use ox::basis::ObjectBasis;
use ox::snapshot::{SnapshotOptions, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use support::arg;
use support::world::World;

const CHUNK: u64 = 64 << 10;

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Incompressible bytes from `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The server's counts: requests, object GETs, GET bytes (where `OX_BED_STATS` says
/// when `endpoint` is the bed's).
fn stats(endpoint: &str) -> (u64, u64, u64) {
    let bed = std::env::var("OX_BED_ENDPOINT").is_ok_and(|e| e == endpoint);
    let at = std::env::var("OX_BED_STATS")
        .ok()
        .filter(|_| bed)
        .unwrap_or_else(|| {
            endpoint
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .into()
        });
    let s = s3server::served_at(&at);
    (s.requests, s.gets, s.get_bytes)
}

/// TCP connections opened in this process's network namespace (`ActiveOpens`, by any
/// process in it): with `OX_TRACE` set, each scattered read prints how many opened
/// while it ran (a read that waited for new connections, the walk's or its own, shows
/// here).
fn tcp_active_opens() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    (names.split_whitespace().zip(values.split_whitespace()))
        .find(|(n, _)| *n == "ActiveOpens")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Waits for `basis` to load the index pages the appliance loads as it opens a clone
/// (the appliance does not wait; here the reader's first reads come after them, and
/// their GETs tell the basis its store's round trip).
fn opened(basis: &ObjectBasis) {
    basis
        .prefetch_index()
        .recv_timeout(support::world::T)
        .expect("the index pages load");
}

/// Cold 4 KiB reads at QD 1 of distinct chunks of the top half, none adjacent.
fn scattered(w: &World, dev: &Bdev, n: u64, skip: impl Fn(u64) -> bool) -> Vec<Duration> {
    scattered_while(w, dev, n, skip, || true)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// [`scattered`], stopping early once `going` says so; each read's time, and its time
/// until the reactor completed it ([`World::timed_read_both`]).
fn scattered_while(
    w: &World,
    dev: &Bdev,
    n: u64,
    skip: impl Fn(u64) -> bool,
    going: impl Fn() -> bool,
) -> Vec<(Duration, Duration)> {
    let chunks = w.size / CHUNK;
    let mut x = 12345u64;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let trace = std::env::var_os("OX_TRACE").is_some();
    while (out.len() as u64) < n.min(chunks / 8) && going() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = chunks / 2 + (x >> 33) % (chunks / 2);
        if seen.insert(c) && !seen.contains(&(c + 1)) && !seen.contains(&(c - 1)) && !skip(c) {
            let opens = trace.then(tcp_active_opens);
            let t = w.timed_read_both(dev, c * CHUNK + 8192, 4096);
            if let Some(opens) = opens {
                let opened = tcp_active_opens().saturating_sub(opens);
                eprintln!(
                    "read {}: {:.1?}, {opened} connections opened",
                    out.len(),
                    t.0
                );
            }
            out.push(t);
        }
    }
    out
}

fn main() {
    let size = arg("--mib", 256) << 20;
    let reads = arg("--reads", 100);
    let object_mib = arg("--object-mib", 1) as usize;
    let args: Vec<String> = std::env::args().collect();
    let endpoint = args
        .iter()
        .position(|a| a == "--endpoint")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var("OX_BED_ENDPOINT").ok());
    let local_server = endpoint.is_none().then(|| s3server::start_server(false));
    let endpoint =
        endpoint.unwrap_or_else(|| format!("http://{}", local_server.as_ref().unwrap().addr));
    let mut config = S3Config::new(
        endpoint.parse().unwrap(),
        s3server::BUCKET,
        "us-east-1",
        support::bed_credentials(s3server::ACCESS, s3server::SECRET),
    );
    config.allow_http = true;
    let split = arg("--split-cores", 0) == 1;
    let w = if split {
        World::start_split(config, size)
    } else {
        World::start(config, size)
    };
    println!(
        "endpoint {endpoint}, {} MiB volume, {object_mib} MiB objects, {} reactors, {}\n",
        size >> 20,
        w.set.handles().len(),
        if split {
            "the OX core on the last core"
        } else {
            "an unpinned OX core"
        }
    );

    let (_vol, vh) = w.volume(|i| noise(1 << 20, i + 1));
    let state = tempfile::tempdir().unwrap();
    let journaled = arg("--journal", 0) == 1;
    let journal = journaled.then(|| {
        vh.set_preserve_file(&state.path().join("vol.cbw")).unwrap();
        state.path().join("vol.snapshot")
    });
    let opts = SnapshotOptions {
        prefix: format!("bench-{}/", std::process::id()),
        zstd_level: 1,
        kek: Some(w.kek.clone()),
        object_bytes: object_mib << 20,
        volume_id: [1; 16],
        volume_name: "bench".into(),
        progress: Arc::default(),
        outage_patience: Duration::from_secs(60),
        journal,
        store_name: "bench".into(),
        checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
        verify_before_publish: false,
        working_set: None,
        owner: None,
        clock: Default::default(),
        encode_on: Default::default(),
    };
    let (c, r, o, h) = (w.config.clone(), w.on(0), opts, vh.clone());
    let before = stats(&endpoint);
    let start = Instant::now();
    let report = w
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c, ex).unwrap();
                snapshot_volume(&store, &r, &h, None, &o, &Throttle::default())
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    let took = start.elapsed();
    let after = stats(&endpoint);
    println!(
        "snapshot: {} MiB in {took:.2?} ({:.1} MB/s of volume), {} requests at the server, journal {}\n",
        size >> 20,
        size as f64 / took.as_secs_f64() / 1e6,
        after.0 - before.0,
        if journaled { "checkpointed" } else { "none" },
    );
    if arg("--snapshot-only", 0) == 1 {
        return;
    }
    let rounds = arg("--restore-only", 0);
    if rounds > 0 {
        restores(&w, &endpoint, &report.manifest_key, rounds);
        return;
    }
    let rounds = arg("--sequential-only", 0);
    if rounds > 0 {
        println!("## 3. Cold sequential read, 128 KiB x 16 in flight, {rounds} clones\n");
        println!("| clone | MB/s | frames per GET | read-ahead the basis wants |");
        println!("|---|---|---|---|");
        for round in 0..rounds as usize {
            let (clone, handle, basis) = w.clone_of(
                w.load(&report.manifest_key),
                10 + round,
                Throttle::default(),
                true,
            );
            opened(&basis);
            let fixed = arg("--read-ahead-mib", 0);
            if fixed > 0 {
                handle.set_read_ahead((fixed << 20) / CHUNK);
            }
            let took = w.sequential(&clone, 128 << 10, 16);
            println!(
                "| {round} | {:.1} | {:.1} | {:.1} MiB |",
                size as f64 / took.as_secs_f64() / 1e6,
                frames_per_get(&basis),
                basis.read_ahead_bytes().unwrap_or(0) as f64 / 1048576.0
            );
        }
        return;
    }
    let objects = w.load(&report.manifest_key).sources[0].objects.clone();
    let object = objects[0].clone();

    // 1. Bare GETs: kept-alive vs fresh connection, and one frame's worth.
    let frame_len = report.data_bytes / (size / CHUNK);
    let (c, o, n, all) = (w.config.clone(), object.clone(), reads, objects.clone());
    let (mut kept, mut fresh, mut frame): (Vec<Duration>, Vec<Duration>, Vec<Duration>) = w
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c.clone(), Rc::clone(&ex)).unwrap();
                let fresh_store = S3Store::new(c, ex).unwrap();
                store.get_range(&o, 0, 4096).await.unwrap();
                fresh_store.get_range(&o, 0, 4096).await.unwrap();
                let (mut a, mut b, mut f) = (Vec::new(), Vec::new(), Vec::new());
                for i in 0..n {
                    let span = ((object_mib as u64) << 20).saturating_sub(frame_len).max(1);
                    let off = (i * 7919 * 4096) % span;
                    let t = Instant::now();
                    store.get_range(&o, off, 4096).await.unwrap();
                    a.push(t.elapsed());
                    // The frame's GET on the connection the 4 KiB one left idle.
                    let t = Instant::now();
                    let other = &all[(i as usize * 37) % all.len()];
                    store.get_range(other, off, frame_len).await.unwrap();
                    f.push(t.elapsed());
                    let t = Instant::now();
                    // (From a store of its own: its connection joins that pool.)
                    fresh_store.get_fresh(&o, Some((off, 4096))).await.unwrap();
                    b.push(t.elapsed());
                }
                (a, b, f)
            })
        })
        .unwrap();
    kept.sort();
    fresh.sort();
    frame.sort();
    println!("## 1. Bare 4 KiB ranged GET ({reads} each, alternating)\n");
    println!("| connection | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| kept alive | {:.2?} | {:.2?} |",
        pct(&kept, 50),
        pct(&kept, 99)
    );
    println!(
        "| fresh | {:.2?} | {:.2?} |",
        pct(&fresh, 50),
        pct(&fresh, 99)
    );
    println!(
        "| kept alive, one frame ({frame_len} B) | {:.2?} | {:.2?} |",
        pct(&frame, 50),
        pct(&frame, 99)
    );

    // 2. Cold 4 KiB reads at QD 1, scattered distinct chunks.
    let (clone, _, _) = w.clone_of(w.load(&report.manifest_key), 0, Throttle::default(), true);
    // The first miss also fetches the index page: not counted.
    w.timed_read(&clone, 0, 4096);
    let before = stats(&endpoint);
    let timed = scattered_while(&w, &clone, reads, |_| false, || true);
    let after = stats(&endpoint);
    let mut cold: Vec<Duration> = timed.iter().map(|t| t.0).collect();
    let mut answered: Vec<Duration> = timed.iter().map(|t| t.1).collect();
    cold.sort();
    answered.sort();
    println!(
        "\n## 2. Cold 4 KiB clone read, QD 1 ({} reads, after a first that loads the index page)\n",
        cold.len()
    );
    println!("| read | p50 | p99 | GETs | KiB sent per read |");
    println!("|---|---|---|---|---|");
    println!(
        "| cold clone read | {:.2?} | {:.2?} | {} | {:.0} |",
        pct(&cold, 50),
        pct(&cold, 99),
        after.1 - before.1,
        (after.2 - before.2) as f64 / 1024.0 / cold.len() as f64
    );
    println!(
        "| same, until the reactor completed it (where a target answers its host) | {:.2?} | {:.2?} | | |",
        pct(&answered, 50),
        pct(&answered, 99),
    );
    println!(
        "\ncold read p50 - kept-alive 4 KiB GET p50: {:.2?}; - frame GET p50: {:.2?}",
        pct(&cold, 50).saturating_sub(pct(&kept, 50)),
        pct(&cold, 50).saturating_sub(pct(&frame, 50))
    );
    println!(
        "until the reactor completed it: - kept-alive 4 KiB GET p50: {:.2?}; - frame GET p50: {:.2?}",
        pct(&answered, 50).saturating_sub(pct(&kept, 50)),
        pct(&answered, 50).saturating_sub(pct(&frame, 50))
    );
    if arg("--cold-only", 0) == 1 {
        return;
    }

    // 3. Cold sequential read, 128 KiB x 16 in flight.
    let (clone, seq_handle, basis) =
        w.clone_of(w.load(&report.manifest_key), 1, Throttle::default(), true);
    opened(&basis);
    let fixed = arg("--read-ahead-mib", 0);
    if fixed > 0 {
        seq_handle.set_read_ahead((fixed << 20) / CHUNK);
    }
    let before = stats(&endpoint);
    let took = w.sequential(&clone, 128 << 10, 16);
    let after = stats(&endpoint);
    let (gets, sent) = (after.1 - before.1, after.2 - before.2);
    println!("\n## 3. Cold sequential read, 128 KiB x 16 in flight\n");
    println!(
        "| MB/s | GETs at the server | MiB sent by the server | sent / read | frames per GET | read-ahead the basis wants |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.1} | {gets} | {:.1} | {:.3} | {:.1} | {:.1} MiB |",
        size as f64 / took.as_secs_f64() / 1e6,
        sent as f64 / 1048576.0,
        sent as f64 / size as f64,
        frames_per_get(&basis),
        basis.read_ahead_bytes().unwrap_or(0) as f64 / 1048576.0
    );

    // 3b. Another host's cold 4 KiB reads at QD 1, of a clone of its own, while a cold
    // sequential read runs: what a lone miss waits behind the reader's read-ahead (on
    // the link, and on reactor 0, which both use).
    let (seq, seq_handle, seq_basis) =
        w.clone_of(w.load(&report.manifest_key), 5, Throttle::default(), true);
    opened(&seq_basis);
    if fixed > 0 {
        seq_handle.set_read_ahead((fixed << 20) / CHUNK);
    }
    let (lone, _, _) = w.clone_of(w.load(&report.manifest_key), 6, Throttle::default(), true);
    w.timed_read(&lone, 0, 4096);
    let reading = std::sync::atomic::AtomicBool::new(true);
    let (mut beside, seq_took) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let took = w.sequential(&seq, 128 << 10, 16);
            reading.store(false, std::sync::atomic::Ordering::Relaxed);
            took
        });
        let beside = scattered_while(
            &w,
            &lone,
            reads,
            |_| false,
            || reading.load(std::sync::atomic::Ordering::Relaxed),
        );
        let beside: Vec<Duration> = beside.into_iter().map(|(t, _)| t).collect();
        (beside, reader.join().unwrap())
    });
    beside.sort();
    if beside.is_empty() {
        // The sequential read ended before the first lone read did.
        beside.push(Duration::ZERO);
    }
    println!("\n## 3b. Cold 4 KiB reads of another clone, QD 1, beside the sequential read\n");
    println!(
        "| reads | p50 | p99 | p50 / idle p50 | p99 / idle p99 | sequential MB/s | read-ahead wanted |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.2?} | {:.2?} | {:.2} | {:.2} | {:.1} | {:.1} MiB |",
        beside.len(),
        pct(&beside, 50),
        pct(&beside, 99),
        pct(&beside, 50).as_secs_f64() / pct(&cold, 50).as_secs_f64(),
        pct(&beside, 99).as_secs_f64() / pct(&cold, 99).as_secs_f64(),
        size as f64 / seq_took.as_secs_f64() / 1e6,
        seq_basis.read_ahead_bytes().unwrap_or(0) as f64 / 1048576.0
    );

    // 4. Thickening beside a host reading cold data at QD 1, under a background limit.
    let limit = arg("--thicken-mib", 16) << 20;
    let throttle = ox::throttle::Throttle::new(
        ox::throttle::Limit::NONE,
        ox::throttle::Limit::per_second(limit),
    );
    let burst = ox::throttle::Limit::per_second(limit).burst;
    throttle.try_acquire("c", ox::throttle::Class::Background, burst);
    let (clone, handle, basis) =
        w.clone_of(w.load(&report.manifest_key), 2, throttle.clone(), true);
    let control = ox::hydrate::Thickening::new();
    control.limited_by(throttle.clone(), "c");
    let walker = w.thicken(&handle, &control, 0);
    let thick = || handle.counters().fetched_bytes[2].load(std::sync::atomic::Ordering::Relaxed);
    let host = || handle.counters().fetched_bytes[0].load(std::sync::atomic::Ordering::Relaxed);
    w.timed_read(&clone, 0, 4096);
    let (t0, h0, start) = (thick(), host(), Instant::now());
    let mut busy = scattered(&w, &clone, reads, |c| handle.is_present(c));
    let took = start.elapsed().as_secs_f64();
    let (t1, h1) = (thick(), host());
    let beside = format!(
        "{} ({:.1?} quickest)",
        control.sharing_window(),
        control.quickest_run()
    );
    control.stop();
    walker.join().unwrap();
    let _ = basis;
    busy.sort();
    let (thick_rate, host_rate) = ((t1 - t0) as f64 / took, (h1 - h0) as f64 / took);
    let room = limit as f64 - host_rate;
    println!("\n## 4. Thickening beside a host's cold 4 KiB reads at QD 1\n");
    println!(
        "| background limit | host fetch rate | thickening rate | thickening / (limit - host) | runs beside the host | host p50 | host p99 | host p99 / idle p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {:.1} MB/s | {:.2} MB/s | {:.2} MB/s | {:.2} | {beside} | {:.2?} | {:.2?} | {:.2} |",
        limit as f64 / 1e6,
        host_rate / 1e6,
        thick_rate / 1e6,
        thick_rate / room,
        pct(&busy, 50),
        pct(&busy, 99),
        pct(&busy, 99).as_secs_f64() / pct(&cold, 99).as_secs_f64()
    );
    w.set.shutdown().unwrap();
}

/// Frames a clone's GETs carried on average (what coalescing adjacent frames gives).
fn frames_per_get(basis: &ObjectBasis) -> f64 {
    let c = basis.counters();
    c.frames.load(std::sync::atomic::Ordering::Relaxed) as f64
        / c.frame_gets
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1) as f64
}

/// `--restore-only`: one chunk at a time (over at most the first 16 MiB) beside
/// `ox::hydrate::restore` and `verify`, `rounds` times.
fn restores(w: &World, endpoint: &str, key: &str, rounds: u64) {
    use ox::format::{Entry, PAGE_CHUNKS};
    let size = w.size;
    println!(
        "## Restore and verify, {rounds} rounds
"
    );
    println!("| round | how | MiB | MB/s | GETs at the server |");
    println!("|---|---|---|---|---|");
    for round in 0..rounds {
        let target =
            bdev::create_malloc(&format!("restore-{round}"), 512, size / 512, None).unwrap();
        // One chunk at a time, as restores went before: a GET, then a write, each.
        let chunks = (16 << 20).min(size) / CHUNK;
        let (l, t, on) = (w.load(key), target.clone(), w.on(0));
        pass_row(
            w,
            endpoint,
            (round, "one chunk at a time"),
            chunks * CHUNK,
            async move |store| {
                let (index, _) = l.page(&store, 0, None).await.unwrap();
                for chunk in 0..chunks.min(PAGE_CHUNKS) {
                    let entry = index.entries[chunk as usize];
                    let io = match l.chunk(&store, chunk, entry, None, |_| {}).await.unwrap() {
                        Some(d) => bdev::BdevIo::write(
                            chunk * CHUNK / 512,
                            CHUNK / 512,
                            vec![bdev::IoBuf::from_slice(&d)],
                        ),
                        None => {
                            assert_eq!(entry, Entry::Zero);
                            bdev::BdevIo::write_zeroes(chunk * CHUNK / 512, CHUNK / 512)
                        }
                    };
                    ox::blockio::run(&on, &t, io).await.unwrap();
                }
            },
        );
        let (l, t, on) = (w.load(key), target.clone(), w.on(0));
        pass_row(
            w,
            endpoint,
            (round, "ox::hydrate::restore"),
            size,
            async move |store| {
                let pass = ox::hydrate::Pass::default();
                let written = ox::hydrate::restore(&store, &l, &t, &on, None, &pass).await;
                assert_eq!(written.unwrap(), l.manifest.volume_bytes);
            },
        );
        let l = w.load(key);
        pass_row(
            w,
            endpoint,
            (round, "ox::hydrate::verify"),
            size,
            async move |store| {
                let pass = ox::hydrate::Pass::default();
                let report = ox::hydrate::verify(&store, &l, None, &pass).await.unwrap();
                assert!(report.bad.is_empty(), "{:?}", report.bad);
            },
        );
    }
    println!();
}

/// Runs `job` with a store of its own on an OX core and prints its row of round `round`
/// done `how`: the MiB it moved (`bytes`), their rate, and GETs at the server.
fn pass_row(
    w: &World,
    endpoint: &str,
    (round, how): (u64, &str),
    bytes: u64,
    job: impl AsyncFnOnce(S3Store) + Send + 'static,
) {
    let c = w.config.clone();
    let before = stats(endpoint);
    let start = Instant::now();
    w.cores
        .run(move |ex| Box::pin(async move { job(S3Store::new(c, ex).unwrap()).await }))
        .unwrap();
    let took = start.elapsed();
    println!(
        "| {round} | {how} | {} | {:.1} | {} |",
        bytes >> 20,
        bytes as f64 / took.as_secs_f64() / 1e6,
        stats(endpoint).1 - before.1
    );
}
