//! What snapshots and cold clones cost the object store, counted at the S3 test
//! server: a sequential reader's read-ahead travels in few ranged GETs of adjacent
//! frames, and moves about what it reads, with more asked for ahead where GETs take
//! long; a lone 4 KiB miss costs one GET of one frame; a sparse volume's snapshot
//! costs requests for its data, not its size.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bdev::{Basis, Bdev, create_malloc};
use ox::basis::{BACKGROUND_REQUESTS, ObjectBasis};
use ox::hydrate::{PASS_RUNS, Pass};
use ox::snapshot::load;
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::{Class, Limit, Throttle};
use support::{
    CHUNK, Env, clone_s3, env, filled_volume, fresh_volume, options, random, read, snapshot_s3,
    write,
};

const SIZE: u64 = 64 << 20;

fn clone_of(env: &Env, config: &S3Config, key: &str, name: &str) -> (Bdev, ObjectBasis) {
    clone_of_size(env, config, key, name, SIZE)
}

fn clone_of_size(
    env: &Env,
    config: &S3Config,
    key: &str,
    name: &str,
    size: u64,
) -> (Bdev, ObjectBasis) {
    let (dev, basis, _) = clone_s3(env, config, key, name, size);
    (dev, basis)
}

/// A volume of incompressible bytes from `seed` (every frame a whole chunk and a little
/// more), snapshotted into `config`'s store in 4 MiB objects: its bytes, and the report.
fn incompressible_snapshot(
    env: &Env,
    config: &S3Config,
    seed: u64,
) -> (Vec<u8>, ox::snapshot::SnapshotReport) {
    let (_vol, handle, image) = filled_volume(env, SIZE, seed);
    let mut opts = options(env);
    opts.object_bytes = 4 << 20;
    (image, snapshot_s3(env, config, &handle, None, opts))
}

#[test]
fn sequential_reads_travel_in_few_gets_and_lone_misses_in_one_frame() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 41);
    let (clone, basis, clone_handle) = clone_s3(&env, &config, &report.manifest_key, "seq", SIZE);
    // The clone's own read-ahead (8 MiB), however long this server's GETs take (the
    // GETs' size follows the store's round trip: loopback is near).
    clone_handle.set_read_ahead(128);
    let c = basis.counters();
    let served = |f: &s3server::Faults| {
        (
            f.gets.load(Ordering::SeqCst),
            f.get_bytes.load(Ordering::SeqCst),
        )
    };
    let (gets0, bytes0) = served(&server.faults);

    // A sequential reader, 128 KiB at a time, of the first half.
    let half = SIZE / 2;
    for at in (0..half).step_by(128 << 10) {
        let got = read(&env, &clone, at, 128 << 10);
        assert!(
            got[..] == image[at as usize..(at + (128 << 10)) as usize],
            "wrong bytes at {at}"
        );
    }
    // (Read-ahead past the reader may still be in flight: the bounds hold throughout.)
    let read_chunks = half / CHUNK;
    let frames = c.frames.load(Ordering::SeqCst);
    let gets = c.frame_gets.load(Ordering::SeqCst);
    let frame_bytes = c.frame_bytes.load(Ordering::SeqCst);
    println!(
        "sequential: {read_chunks} chunks read, {frames} frames in {gets} GETs, {frame_bytes} bytes"
    );
    assert!(
        frames >= read_chunks,
        "{frames} frames for {read_chunks} chunks"
    );
    // What runs past the reader is at most the read-ahead window (8 MiB).
    assert!(frames <= read_chunks + 128, "{frames} frames");
    // 32 frames a GET (2 MiB), fewer where a batch or an object ends; 8 (512 KiB) should
    // this machine make loopback look far (a round trip over ~34 ms).
    let least = if support::from_afar(&basis) { 4 } else { 8 };
    assert!(
        gets * least <= frames,
        "{gets} GETs for {frames} frames: adjacent frames travel together"
    );
    assert!(frame_bytes <= frames * (CHUNK + 256), "{frame_bytes} bytes");

    // Lone 4 KiB misses, on a clone of their own: one GET of one frame each.
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "lone");
    let c = basis.counters();
    for (i, chunk) in (SIZE * 3 / 4 / CHUNK..SIZE / CHUNK).step_by(5).enumerate() {
        let (f, g) = (
            c.frames.load(Ordering::SeqCst),
            c.frame_gets.load(Ordering::SeqCst),
        );
        let at = chunk * CHUNK + 4096;
        let got = read(&env, &clone, at, 4096);
        assert!(
            got[..] == image[at as usize..at as usize + 4096],
            "miss {i}"
        );
        assert_eq!(
            c.frames.load(Ordering::SeqCst),
            f + 1,
            "miss {i}: one frame"
        );
        assert_eq!(
            c.frame_gets.load(Ordering::SeqCst),
            g + 1,
            "miss {i}: one GET"
        );
    }

    // The server counted at least what the bases did (it counts a GET as it answers,
    // a basis once the body has arrived).
    let (gets1, bytes1) = served(&server.faults);
    let counted_gets =
        c.frame_gets.load(Ordering::SeqCst) + c.page_gets.load(Ordering::SeqCst) + gets;
    assert!(
        gets1 - gets0 > counted_gets,
        "server {} GETs, bases {counted_gets}",
        gets1 - gets0
    );
    assert!(bytes1 - bytes0 >= c.frame_bytes.load(Ordering::SeqCst) + frame_bytes);
    env.set.shutdown().unwrap();
}

/// A batch of `chunks` to ask a basis for, and where each answer arrives with its chunk.
#[allow(clippy::type_complexity)]
fn answered(
    chunks: impl Iterator<Item = u64>,
) -> (
    Vec<(u64, bdev::FetchDone)>,
    std::sync::mpsc::Receiver<Answer>,
) {
    let (tx, answers) = std::sync::mpsc::channel();
    let batch = chunks
        .map(|chunk| {
            let tx = tx.clone();
            let done: bdev::FetchDone = Box::new(move |r| {
                let _ = tx.send((chunk, r));
            });
            (chunk, done)
        })
        .collect();
    (batch, answers)
}

/// Takes `n` fetches' answers and checks each chunk against `image`.
fn answers_right(answers: &std::sync::mpsc::Receiver<Answer>, image: &[u8], n: u64) {
    for _ in 0..n {
        let (chunk, got) = answers.recv_timeout(support::T).unwrap();
        let at = (chunk * CHUNK) as usize;
        assert!(
            got.unwrap()[..] == image[at..at + CHUNK as usize],
            "chunk {chunk}"
        );
    }
}

/// A fetch's answer: its chunk and what came.
type Answer = (u64, Result<Vec<u8>, bdev::FetchError>);

/// Lets the GETs the test server holds go when dropped, however a test ends.
struct LetGo<'a>(&'a s3server::Faults);

impl Drop for LetGo<'_> {
    fn drop(&mut self) {
        self.0.let_go.store(true, Ordering::SeqCst);
    }
}

/// Waits until the test server holds `n` GETs at once.
fn held(faults: &s3server::Faults, n: u32) {
    let asked = std::time::Instant::now();
    while faults.holding.load(Ordering::SeqCst) < n {
        assert!(asked.elapsed() < support::T, "{n} GETs never held at once");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Asks `basis` for `n` chunks from `first` in one batch for `reason`, checks each
/// against `image`, and returns the frame GETs they took.
fn gets_for(
    basis: &ObjectBasis,
    image: &[u8],
    (first, n): (u64, u64),
    reason: bdev::FetchReason,
) -> u64 {
    let c = basis.counters();
    let before = c.frame_gets.load(Ordering::SeqCst);
    let (batch, answers) = answered(first..first + n);
    basis.fetch_batch(batch, reason);
    answers_right(&answers, image, n);
    c.frame_gets.load(Ordering::SeqCst) - before
}

/// A batch of 2 MiB of adjacent incompressible chunks is one GET, although their frames
/// are a little more than 2 MiB, and 62 of them are two; from a far store, what is
/// fetched ahead of hosts travels in GETs of 512 KiB (32 chunks in four) — and in a GET
/// more for each of the 32 connections still to open while requests are free to send
/// them — a host's misses still in GETs of 2 MiB.
#[test]
fn gets_carry_2_mib_of_adjacent_chunks_or_512_kib_ahead_of_hosts_from_afar() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 43);
    let (host, ahead) = (bdev::FetchReason::ClientMiss, bdev::FetchReason::Prefetch);
    // An object ends with the frame that takes it to 4 MiB: the first holds chunks
    // 0..=63, the second 64..=127.
    let (_near, basis) = clone_of(&env, &config, &report.manifest_key, "near");
    assert_eq!(gets_for(&basis, &image, (63, 1), host), 1);
    for (first, n, reason, gets) in [
        (64u64, 32u64, host, 1u64),
        (0, 62, host, 2),
        (96, 32, ahead, 1),
    ] {
        assert!(
            reason == host || !support::from_afar(&basis),
            "{:?} bytes wanted ahead: loopback answered no request within ~34 ms",
            basis.read_ahead_bytes()
        );
        let sent = gets_for(&basis, &image, (first, n), reason);
        assert_eq!(sent, gets, "near: {n} chunks from {first} for {reason:?}");
    }
    let c = basis.counters();
    assert_eq!(c.frames.load(Ordering::SeqCst), 1 + 32 + 62 + 32);
    assert!(
        c.frame_bytes.load(Ordering::SeqCst) > 127 * CHUNK,
        "frames are more than chunks"
    );

    // Every request now takes 50 ms more: once one has been answered, the store is far.
    server.faults.delay_ms.store(50, Ordering::SeqCst);
    let (_far, basis) = clone_of(&env, &config, &report.manifest_key, "far");
    assert_eq!(gets_for(&basis, &image, (0, 1), host), 1);
    assert!(
        support::from_afar(&basis),
        "{:?} bytes wanted ahead",
        basis.read_ahead_bytes()
    );
    let most = ox::basis::BACKGROUND_REQUESTS as u64;
    for (first, n, reason, gets) in [
        // No connection open yet: 8 full runs and 24 more, two frames a GET, opening
        // all 32.
        (64u64, 2 * most, ahead, most),
        // All 32 open: runs of their full size.
        (0, 32, ahead, 4u64),
        (96, 8, ahead, 1),
        (1, 32, host, 1),
    ] {
        let sent = gets_for(&basis, &image, (first, n), reason);
        assert_eq!(sent, gets, "far: {n} chunks from {first} for {reason:?}");
    }
}

#[test]
fn a_store_whose_gets_take_long_wants_more_read_ahead() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 43);
    // Every request now takes 50 ms more: a store far away.
    server.faults.delay_ms.store(50, Ordering::SeqCst);
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "far");
    assert_eq!(basis.read_ahead_bytes(), None, "no request answered yet");
    for at in (0..SIZE / 4).step_by(128 << 10) {
        let got = read(&env, &clone, at, 128 << 10);
        assert!(
            got[..] == image[at as usize..(at + (128 << 10)) as usize],
            "wrong bytes at {at}"
        );
    }
    // Every request was answered 50 ms late or more: what carries 1 Gbit/s over 50 ms,
    // four times.
    let wanted = basis.read_ahead_bytes().expect("requests were answered");
    let least = bdev::read_ahead::wanted_bytes(std::time::Duration::from_millis(50), 0);
    assert!(
        wanted >= least,
        "{wanted} bytes wanted ahead, less than {least}"
    );
}

#[test]
fn a_sparse_1_tib_snapshot_costs_requests_for_its_data_not_its_size() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let size = 1u64 << 40;
    let (vol, handle) = fresh_volume(size);
    let extent = random(4 << 20, 3);
    let (far, near) = (300u64 << 30, 5u64 << 30);
    write(&env, &vol, far, &extent);
    write(&env, &vol, near, &random(4096, 4));
    let requests = || u64::from(server.faults.requests.load(Ordering::SeqCst));
    let before = requests();
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let spent = requests() - before;
    let m = &report.manifest;
    println!(
        "1 TiB holding 4 MiB + 4 KiB: {spent} requests, {} data objects, pages stored {:?}",
        m.objects.len(),
        m.stored_pages().collect::<Vec<_>>()
    );
    // Pages of 16,384 chunks (1 GiB): data in pages 5 and 300 only.
    assert_eq!(m.empty_pages, vec![[0, 5], [6, 300], [301, 1024]]);
    assert!(
        m.empty_pages_tag.is_some(),
        "encrypted: the key vouches for them"
    );
    // The data objects, two index pages, the manifest, and the upload's lease taken and
    // released: O(data), not 1,024 pages.
    assert_eq!(spent, m.objects.len() as u64 + 2 + 1 + 2, "requests");

    // A clone reads the data, and unwritten space with no request at all.
    let (clone, basis) = clone_of_size(&env, &config, &report.manifest_key, "sparse", size);
    assert!(read(&env, &clone, far, 4 << 20) == extent);
    let before = requests();
    assert!(
        read(&env, &clone, 700 << 30, 1 << 20)
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(requests(), before, "an empty page is not fetched");
    assert_eq!(basis.counters().page_gets.load(Ordering::SeqCst), 1);

    // An incremental snapshot over it: the parent's empty pages are read as empty (no
    // request), its stored pages once, and the child stores pages where it has data.
    let more = random(4096, 5);
    write(&env, &vol, 800 << 30, &more);
    let before = requests();
    let child = snapshot_s3(
        &env,
        &config,
        &handle,
        Some(&report.manifest_key),
        options(&env),
    );
    let spent = requests() - before;
    let m = &child.manifest;
    assert_eq!(m.stored_pages().collect::<Vec<_>>(), vec![5, 300, 800]);
    // The parent's manifest and its 2 pages; the child's objects, 3 pages, manifest,
    // and its lease taken and released.
    assert_eq!(
        spent,
        1 + 2 + m.objects.len() as u64 + 3 + 1 + 2,
        "requests"
    );
    let (clone, _) = clone_of_size(&env, &config, &child.manifest_key, "child", size);
    assert!(read(&env, &clone, far, 4 << 20) == extent);
    assert!(read(&env, &clone, 800 << 30, 4096) == more);
    assert!(read(&env, &clone, 600 << 30, 4096).iter().all(|&b| b == 0));

    // Only the data key can declare pages empty: a manifest edited to call page 300
    // empty (its checksum recomputed) is refused, with or without the old tag.
    let (c, key) = (config.clone(), report.manifest_key.clone());
    let stored = env
        .cores
        .run(move |ex| {
            Box::pin(async move { S3Store::new(c, ex).unwrap().get(&key).await.unwrap() })
        })
        .unwrap();
    for keep_tag in [true, false] {
        let mut forged = ox::format::Manifest::from_bytes(&stored).unwrap();
        forged.empty_pages = vec![[0, 1024]];
        if !keep_tag {
            forged.empty_pages_tag = None;
        }
        let (c, kek, bytes) = (config.clone(), env.kek.clone(), forged.to_bytes());
        let e = env
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = S3Store::new(c, ex).unwrap();
                    store.put("vol1/forged", bytes).await.unwrap();
                    load(&store, "vol1/forged", &[kek]).await.map(|_| ())
                })
            })
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(e, ox::OxError::Integrity { .. }) && e.to_string().contains("empty_pages"),
            "{e}"
        );
    }
    env.set.shutdown().unwrap();
}

#[test]
fn a_frame_damaged_at_rest_fails_only_its_own_chunk_not_its_run() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 43);
    // Damage chunk 40's frame where the server keeps it.
    let bad = 40u64;
    let (c, key, kek) = (config.clone(), report.manifest_key.clone(), env.kek.clone());
    let (object, offset) = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c, ex).unwrap();
                let loaded = load(&store, &key, &[kek]).await.unwrap();
                let (page, _) = loaded.page(&store, 0, None).await.unwrap();
                let ox::format::Entry::Frame { object, offset, .. } = page.entries[bad as usize]
                else {
                    panic!("chunk {bad} has no frame");
                };
                (loaded.sources[0].objects[object as usize].clone(), offset)
            })
        })
        .unwrap();
    let path = server.dir.path().join(s3server::BUCKET).join(&object);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset as usize + 100] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    // A sequential reader, a chunk at a time: its read-ahead fetches runs of frames,
    // and only the damaged chunk fails (after its refetches), never its neighbours.
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "damaged");
    for chunk in 0..SIZE / CHUNK / 2 {
        let at = chunk * CHUNK;
        let io = bdev::BdevIo::read(
            at / 512,
            CHUNK / 512,
            vec![bdev::IoBuf::new(CHUNK as usize)],
        );
        let done = bdev::blocking::run_on(&env.set.handles()[0], &clone, io, support::T).unwrap();
        if chunk == bad {
            assert!(done.result.is_err(), "the damaged chunk read as data");
        } else {
            assert!(done.result.is_ok(), "chunk {chunk}: {:?}", done.result);
            assert!(
                done.data()[..] == image[at as usize..(at + CHUNK) as usize],
                "chunk {chunk}"
            );
        }
    }
    let c = basis.counters();
    assert!(
        c.integrity.failures.load(Ordering::SeqCst) >= 4,
        "refetched first"
    );
    env.set.shutdown().unwrap();
}

#[test]
fn a_clone_loads_its_index_pages_as_it_opens_so_a_first_miss_costs_one_get() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let gets = || server.faults.gets.load(Ordering::SeqCst);

    // A dense volume of one index page: loaded at open, then each miss is its frame.
    let (_vol, handle, image) = filled_volume(&env, SIZE, 43);
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "dense");
    assert_eq!(basis.pages_to_prefetch(), vec![0]);
    assert_eq!(basis.prefetch_index().recv().unwrap(), 1, "pages loaded");
    let before = gets();
    let at = 37 * CHUNK + 8192;
    assert!(read(&env, &clone, at, 4096) == image[at as usize..at as usize + 4096]);
    assert_eq!(gets() - before, 1, "the first miss is one GET: its frame");
    assert_eq!(basis.counters().page_gets.load(Ordering::SeqCst), 1);

    // A sparse 1 TiB volume with data in six GiB-wide stretches: only its first and
    // last stored pages are loaded ahead; a first miss elsewhere costs its page too.
    let size = 1u64 << 40;
    let (vol, handle) = fresh_volume(size);
    let pages = [2u64, 5, 9, 300, 700, 1000];
    for &p in &pages {
        write(&env, &vol, p << 30, &random(4096, p));
    }
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let (clone, basis) = clone_of_size(&env, &config, &report.manifest_key, "sparse", size);
    assert_eq!(basis.pages_to_prefetch(), vec![2, 1000]);
    assert_eq!(basis.prefetch_index().recv().unwrap(), 2, "pages loaded");
    let before = gets();
    assert!(read(&env, &clone, 1000 << 30, 4096) == random(4096, 1000));
    assert_eq!(gets() - before, 1, "a prefetched page: the frame alone");
    let before = gets();
    assert!(read(&env, &clone, 300 << 30, 4096) == random(4096, 300));
    assert_eq!(
        gets() - before,
        2,
        "a page not loaded ahead: the page, then the frame"
    );
    assert_eq!(basis.counters().page_gets.load(Ordering::SeqCst), 3);
}

/// A clone's background fetches have at most [`BACKGROUND_REQUESTS`] GETs in flight on
/// an OX core, the rest waiting their turn (a far clone's read-ahead keeps reusing a few
/// warm connections), while a host's misses are not held back. Held and counted at the
/// server.
#[test]
fn background_fetches_wait_their_turn_and_hosts_misses_do_not() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 44);
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "turns");
    let faults = &server.faults;
    // The index page, and a connection for the host.
    assert!(read(&env, &clone, 0, 4096)[..] == image[..4096]);
    // Chunks apart from each other: a GET each, more of them than the limit.
    let lone = |from: u64| (0..BACKGROUND_REQUESTS as u64 + 8).map(move |i| from + 16 * i);

    // The background's first GETs held at the server: the rest wait in the client, so
    // none is answered, however long the host's read beside them takes.
    let let_go = LetGo(faults);
    faults
        .hold_gets
        .store(BACKGROUND_REQUESTS as u32, Ordering::SeqCst);
    let requests = || faults.requests.load(Ordering::SeqCst) as usize;
    let before = requests();
    let (batch, answers) = answered(lone(1));
    basis.fetch_batch(batch, bdev::FetchReason::Thickening);
    held(faults, BACKGROUND_REQUESTS as u32);
    let at = 1020 * CHUNK;
    assert!(read(&env, &clone, at, 4096)[..] == image[at as usize..at as usize + 4096]);
    assert_eq!(
        requests() - before,
        BACKGROUND_REQUESTS + 1,
        "the held GETs and the host's: no background GET past the limit went out"
    );
    assert!(answers.try_recv().is_err(), "none answered while held");
    drop(let_go);
    answers_right(&answers, &image, BACKGROUND_REQUESTS as u64 + 8);

    // A host's misses, as many: all at the server at once.
    faults.let_go.store(false, Ordering::SeqCst);
    let let_go = LetGo(faults);
    faults
        .hold_gets
        .store(BACKGROUND_REQUESTS as u32 + 8, Ordering::SeqCst);
    let (batch, answers) = answered(lone(9));
    basis.fetch_batch(batch, bdev::FetchReason::ClientMiss);
    held(faults, BACKGROUND_REQUESTS as u32 + 8);
    drop(let_go);
    answers_right(&answers, &image, BACKGROUND_REQUESTS as u64 + 8);
}

/// A host's miss beside background fetches that hold every connection they opened goes
/// out on the connection of the host's earlier miss: it waits on no handshake (nor a
/// new connection's slow start) because a walk has the pool busy. Counted at the server.
#[test]
fn a_hosts_miss_beside_busy_background_fetches_opens_no_connection() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 43);
    let (clone, basis) = clone_of(&env, &config, &report.manifest_key, "lanes");
    let faults = &server.faults;
    // The host's first miss: its index page, then its frame.
    assert!(read(&env, &clone, 0, 4096)[..] == image[..4096]);

    // Background fetches of chunks far apart (a ranged GET each), held at the server
    // (and let go however this test ends).
    const RUNS: u32 = 4;
    let let_go = LetGo(faults);
    faults.hold_gets.store(RUNS, Ordering::SeqCst);
    let (batch, answers) = answered((1..=u64::from(RUNS)).map(|i| i * 64));
    basis.fetch_batch(batch, bdev::FetchReason::Thickening);
    held(faults, RUNS);
    let opened = faults.connections.load(Ordering::SeqCst);

    // The host's next miss, elsewhere, is answered while they are held, and opened
    // nothing.
    let at = 512 * CHUNK + 4096;
    let got = read(&env, &clone, at, 4096);
    assert!(got[..] == image[at as usize..at as usize + 4096]);
    assert_eq!(
        faults.connections.load(Ordering::SeqCst),
        opened,
        "the host's miss opened a connection"
    );
    assert_eq!(faults.holding.load(Ordering::SeqCst), RUNS, "still held");

    // Let go, the background fetches bring their chunks.
    drop(let_go);
    answers_right(&answers, &image, u64::from(RUNS));
}

/// Runs a verify (`target`: `None`) or a restore onto `target` of snapshot `key` on an
/// OX core, charged to volume `volume` of `throttle`: the bytes written, or the
/// frames checked, or why it failed.
fn pass_over(
    cores: &Arc<ox::cores::OxCores>,
    config: &S3Config,
    (key, kek): (&str, &ox::keys::Kek),
    target: Option<(&Bdev, &reactor::ReactorHandle)>,
    (throttle, volume): (&Throttle, &str),
    pass: &Arc<Pass>,
) -> Result<u64, ox::OxError> {
    let (c, key, kek, pass) = (
        config.clone(),
        key.to_string(),
        kek.clone(),
        Arc::clone(pass),
    );
    let target = target.map(|(dev, on)| (dev.clone(), on.clone()));
    let (throttle, volume) = (throttle.clone(), volume.to_string());
    cores
        .run(move |ex| {
            Box::pin(async move {
                let store = S3Store::new(c, ex)?;
                let loaded = load(&store, &key, &[kek]).await?;
                let charge = Some((&throttle, volume.as_str()));
                match &target {
                    Some((dev, on)) => {
                        ox::hydrate::restore(&store, &loaded, dev, on, charge, &pass).await
                    }
                    None => Ok(ox::hydrate::verify(&store, &loaded, charge, &pass)
                        .await?
                        .frames),
                }
            })
        })
        .unwrap()
}

/// A restore and a verify ask for a snapshot in ranged GETs of 2 MiB of adjacent frames,
/// [`PASS_RUNS`] at once (a far store's round trip paid once a window, not once a
/// chunk), within the throttle; cancelled, each stops at once, whatever it waits on (its
/// GETs held at the server, the throttle).
#[test]
fn a_restore_and_a_verify_ask_for_runs_many_at_once_and_stop_when_cancelled() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (image, report) = incompressible_snapshot(&env, &config, 46);
    let faults = &server.faults;
    let gets = || faults.gets.load(Ordering::SeqCst);
    let snap = (report.manifest_key.as_str(), &env.kek);
    let free = Throttle::default();
    // Runs never span two objects: at most one GET more than 2 MiB each, per object.
    let chunks = SIZE / CHUNK;
    let runs = chunks / ((2 << 20) / CHUNK);
    let most = runs + report.manifest.objects.len() as u64;

    // Restored whole, in runs (besides the manifest and the index page).
    let target = create_malloc("restored", 512, SIZE / 512, None).unwrap();
    let on = env.set.handles()[0].clone();
    let pass = Arc::new(Pass::default());
    let before = gets();
    let written = pass_over(
        &env.cores,
        &config,
        snap,
        Some((&target, &on)),
        (&free, "r"),
        &pass,
    );
    assert_eq!(written.unwrap(), SIZE);
    let took = gets() - before - 2;
    assert!((runs..=most).contains(&took), "{took} GETs of frames");
    assert!(
        read(&env, &target, 0, SIZE) == image,
        "restored as snapshotted"
    );
    assert_eq!(pass.chunks.load(Ordering::SeqCst), chunks);
    assert!(
        pass.bytes.load(Ordering::SeqCst) > SIZE,
        "incompressible, and framed"
    );

    // Verified the same way.
    let pass = Arc::new(Pass::default());
    let before = gets();
    let frames = pass_over(&env.cores, &config, snap, None, (&free, "v"), &pass);
    assert_eq!(frames.unwrap(), chunks);
    let took = gets() - before - 2;
    assert!((runs..=most).contains(&took), "{took} GETs of frames");

    // Every GET of frames held at the server: PASS_RUNS asked for at once, no more;
    // cancelled, the verify ends with them still held.
    faults.let_go.store(false, Ordering::SeqCst);
    let let_go = LetGo(faults);
    faults.hold_gets.store(1000, Ordering::SeqCst);
    let requests = || faults.requests.load(Ordering::SeqCst) as usize;
    let before = requests();
    let pass = Arc::new(Pass::default());
    let (cores, c, p, kek) = (
        Arc::clone(&env.cores),
        config.clone(),
        Arc::clone(&pass),
        env.kek.clone(),
    );
    let key = report.manifest_key.clone();
    let verifying = std::thread::spawn(move || {
        pass_over(
            &cores,
            &c,
            (&key, &kek),
            None,
            (&Throttle::default(), "v"),
            &p,
        )
    });
    held(faults, PASS_RUNS as u32);
    // (The manifest's GET, the index page's, and the runs'.)
    assert_eq!(
        requests() - before,
        2 + PASS_RUNS,
        "no run past the window went out"
    );
    pass.cancel();
    let e = verifying.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("verify cancelled"), "{e}");
    assert_eq!(faults.holding.load(Ordering::SeqCst), PASS_RUNS as u32);
    drop(let_go);
    faults.hold_gets.store(0, Ordering::SeqCst);

    // Held by the throttle (a byte a second, its first MiB taken): no run is asked for;
    // cancelled, the restore ends, and its wait is counted.
    let slow = Throttle::new(Limit::NONE, Limit::per_second(1));
    assert!(slow.try_acquire("", Class::Background, 1 << 20).is_zero());
    let pass = Arc::new(Pass::default());
    let before = gets();
    let (cores, c, p, kek, key, th) = (
        Arc::clone(&env.cores),
        config.clone(),
        Arc::clone(&pass),
        env.kek.clone(),
        report.manifest_key.clone(),
        slow.clone(),
    );
    let target = create_malloc("restored-2", 512, SIZE / 512, None).unwrap();
    let on = env.set.handles()[0].clone();
    let restoring = std::thread::spawn(move || {
        pass_over(
            &cores,
            &c,
            (&key, &kek),
            Some((&target, &on)),
            (&th, "r2"),
            &p,
        )
    });
    // Once a run waits for the throttle.
    let asked = std::time::Instant::now();
    while slow.waiting("r2", Class::Background) == 0 {
        assert!(asked.elapsed() < support::T, "the restore never began");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    pass.cancel();
    let e = restoring.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("restore cancelled"), "{e}");
    // The manifest and the index page, and nothing more while the throttle held it.
    assert_eq!(gets() - before, 2, "no run asked for past the throttle");
    let waited = slow.waited();
    assert!(
        waited
            .iter()
            .any(|(v, class, w)| v == "r2" && *class == Class::Background && w.transfers > 0),
        "{waited:?}"
    );
}
