//! The clone bdev over an in-memory basis: misses fetch exactly what they need, once;
//! partial writes merge over fetched data; whole-chunk writes and deallocation need no
//! fetch; a failed fetch is an error, never data.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::blocking::{run_on, submit_on};
use bdev::{
    Basis, Bdev, BdevError, BdevIo, FetchDone, FetchReason, IoBuf, UringConfig, create_clone,
    create_malloc, open_clone, open_uring,
};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const CHUNK: u64 = 64 << 10;
const T: Duration = Duration::from_secs(20);

struct MemBasis {
    image: Vec<u8>,
    fetches: Mutex<HashMap<u64, u32>>,
    bad_chunk: Option<u64>,
    delay: Duration,
    total: AtomicU64,
}

impl Basis for MemBasis {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }

    fn fetch(&self, chunk: u64, _reason: FetchReason, done: FetchDone) {
        *self.fetches.lock().unwrap().entry(chunk).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
        let start = (chunk * CHUNK) as usize;
        let end = (start + CHUNK as usize).min(self.image.len());
        let data = self.image[start..end].to_vec();
        let bad = self.bad_chunk == Some(chunk);
        let delay = self.delay;
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            done(if bad {
                Err(bdev::FetchError::Integrity("test".into()))
            } else {
                Ok(data)
            })
        });
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn setup(
    bad_chunk: Option<u64>,
    delay_ms: u64,
) -> (ReactorSet, Bdev, bdev::CloneHandle, Arc<MemBasis>) {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let size = 16 * CHUNK + 4096; // a short last chunk
    let basis = Arc::new(MemBasis {
        image: pattern(size as usize, 7),
        fetches: Mutex::new(HashMap::new()),
        bad_chunk,
        delay: Duration::from_millis(delay_ms),
        total: AtomicU64::new(0),
    });
    let local = create_malloc("local", 512, size / 512, None).unwrap();
    let (clone, handle) =
        create_clone("clone", local, Arc::clone(&basis) as Arc<dyn Basis>, None).unwrap();
    (set, clone, handle, basis)
}

fn read(set: &ReactorSet, dev: &Bdev, r: usize, off: u64, len: u64) -> Result<Vec<u8>, BdevError> {
    let done = run_on(
        &set.handles()[r],
        dev,
        BdevIo::read(off / 512, len / 512, vec![IoBuf::new(len as usize)]),
        T,
    )?;
    let data = done.data();
    done.result.map(|()| data)
}

fn write(set: &ReactorSet, dev: &Bdev, off: u64, data: &[u8]) -> Result<(), BdevError> {
    run_on(
        &set.handles()[0],
        dev,
        BdevIo::write(
            off / 512,
            data.len() as u64 / 512,
            vec![IoBuf::from_slice(data)],
        ),
        T,
    )?
    .result
}

/// The appliance's own reads fetch what they miss as [`FetchReason::Internal`], unless a
/// host waits on them (the copy before a host's write): then as a host's miss.
#[test]
fn the_appliances_own_misses_are_counted_apart_from_hosts_but_for_what_hosts_wait_on() {
    let (set, clone, handle, _basis) = setup(None, 0);
    // Reads spanning two chunks: answered once both are installed, so counted.
    let own = |io: BdevIo| {
        let done = run_on(&set.handles()[0], &clone, io, T).unwrap();
        done.result.unwrap();
    };
    let span = |chunk: u64| {
        BdevIo::read(
            chunk * CHUNK / 512,
            CHUNK / 512 * 2,
            vec![IoBuf::new(2 * CHUNK as usize)],
        )
    };
    own(span(2).internal());
    own(span(6).internal_for_host());
    let by = |why: FetchReason| handle.counters().fetched_bytes[why.index()].load(Ordering::SeqCst);
    assert_eq!(by(FetchReason::Internal), 2 * CHUNK);
    assert_eq!(by(FetchReason::ClientMiss), 2 * CHUNK);
    read(&set, &clone, 0, 10 * CHUNK, 2 * CHUNK).unwrap();
    assert_eq!(by(FetchReason::ClientMiss), 4 * CHUNK);
    assert_eq!(by(FetchReason::Internal), 2 * CHUNK);
    assert_eq!(by(FetchReason::Prefetch) + by(FetchReason::Thickening), 0);
    set.shutdown().unwrap();
}

#[test]
fn misses_fetch_exactly_the_chunks_needed_once() {
    let (set, clone, handle, basis) = setup(None, 0);
    // A read spanning chunks 2 and 3.
    let got = read(&set, &clone, 0, 2 * CHUNK + 1024, CHUNK).unwrap();
    assert_eq!(
        got,
        &basis.image[(2 * CHUNK + 1024) as usize..(3 * CHUNK + 1024) as usize]
    );
    assert_eq!(basis.total.load(Ordering::SeqCst), 2);
    // Again, from the other reactor: no new fetch.
    let again = read(&set, &clone, set.len() - 1, 2 * CHUNK, 2 * CHUNK).unwrap();
    assert_eq!(
        again,
        &basis.image[(2 * CHUNK) as usize..(4 * CHUNK) as usize]
    );
    assert_eq!(basis.total.load(Ordering::SeqCst), 2);
    assert_eq!(handle.hydration(), (2, 17));
    assert_eq!(
        handle.counters().fetched_bytes[0].load(Ordering::SeqCst),
        2 * CHUNK
    );
    // The short last chunk.
    let tail = read(&set, &clone, 0, 16 * CHUNK, 4096).unwrap();
    assert_eq!(tail, &basis.image[(16 * CHUNK) as usize..]);
    set.shutdown().unwrap();
}

#[test]
fn concurrent_misses_share_one_fetch() {
    let (set, clone, _handle, basis) = setup(None, 100);
    let rxs: Vec<_> = (0..8)
        .map(|i| {
            let r = &set.handles()[i % set.len()];
            submit_on(
                r,
                &clone,
                BdevIo::read(
                    (5 * CHUNK + i as u64 * 4096) / 512,
                    8,
                    vec![IoBuf::new(4096)],
                ),
            )
            .unwrap()
        })
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let c = rx.recv_timeout(T).unwrap();
        let off = (5 * CHUNK + i as u64 * 4096) as usize;
        assert_eq!(c.data(), &basis.image[off..off + 4096]);
    }
    assert_eq!(basis.fetches.lock().unwrap()[&5], 1);
    set.shutdown().unwrap();
}

#[test]
fn partial_writes_merge_and_whole_writes_need_no_fetch() {
    let (set, clone, _handle, basis) = setup(None, 0);
    // Partial write into chunk 1: fetch-then-merge.
    let new = pattern(8192, 99);
    write(&set, &clone, CHUNK + 4096, &new).unwrap();
    let mut expected = basis.image[CHUNK as usize..(2 * CHUNK) as usize].to_vec();
    expected[4096..4096 + 8192].copy_from_slice(&new);
    assert_eq!(read(&set, &clone, 0, CHUNK, CHUNK).unwrap(), expected);
    assert_eq!(basis.fetches.lock().unwrap()[&1], 1);
    // Whole chunks 8 and 9: no fetch at all.
    let whole = pattern(2 * CHUNK as usize, 3);
    write(&set, &clone, 8 * CHUNK, &whole).unwrap();
    assert_eq!(read(&set, &clone, 1, 8 * CHUNK, 2 * CHUNK).unwrap(), whole);
    assert!(!basis.fetches.lock().unwrap().contains_key(&8));
    // Deallocate and write zeroes over absent chunks read back as zeroes.
    run_on(
        &set.handles()[0],
        &clone,
        BdevIo::unmap(10 * CHUNK / 512, CHUNK / 512),
        T,
    )
    .unwrap()
    .result
    .unwrap();
    assert!(
        read(&set, &clone, 0, 10 * CHUNK, CHUNK)
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    run_on(
        &set.handles()[0],
        &clone,
        BdevIo::write_zeroes((11 * CHUNK + 512) / 512, 2),
        T,
    )
    .unwrap()
    .result
    .unwrap();
    let z = read(&set, &clone, 0, 11 * CHUNK, CHUNK).unwrap();
    assert!(z[512..1536].iter().all(|&b| b == 0));
    assert_eq!(
        &z[..512],
        &basis.image[(11 * CHUNK) as usize..(11 * CHUNK + 512) as usize]
    );
    set.shutdown().unwrap();
}

#[test]
fn a_failed_fetch_is_an_error_not_data() {
    let (set, clone, handle, _basis) = setup(Some(3), 0);
    let e = read(&set, &clone, 0, 3 * CHUNK, 4096).unwrap_err();
    assert!(matches!(e, BdevError::Basis { chunk: 3, .. }), "{e}");
    assert!(!handle.is_present(3));
    // A partial write over it fails too, and writes nothing.
    assert!(write(&set, &clone, 3 * CHUNK, &[1u8; 512]).is_err());
    // Neighbours are fine.
    assert!(read(&set, &clone, 0, 4 * CHUNK, 4096).is_ok());
    assert_eq!(handle.counters().fetch_errors.load(Ordering::SeqCst), 2);
    set.shutdown().unwrap();
}

#[test]
fn thickening_fetches_in_the_background() {
    let (set, _clone, handle, basis) = setup(None, 0);
    let (tx, rx) = crossbeam_channel::unbounded();
    for c in 0..17 {
        let tx = tx.clone();
        handle
            .fetch_on(
                &set.handles()[c as usize % set.len()],
                c,
                FetchReason::Thickening,
                move |r| {
                    tx.send(r.is_ok()).unwrap();
                },
            )
            .unwrap();
    }
    for _ in 0..17 {
        assert!(rx.recv_timeout(T).unwrap());
    }
    assert_eq!(handle.hydration(), (17, 17));
    assert_eq!(basis.total.load(Ordering::SeqCst), 17);
    assert_eq!(handle.counters().fetches[2].load(Ordering::SeqCst), 17);
    set.shutdown().unwrap();
}

#[test]
fn sequential_readers_get_read_ahead_and_misses_are_remembered() {
    let (set, clone, handle, basis) = setup(None, 0);
    handle.set_read_ahead(4);
    read(&set, &clone, 0, 0, CHUNK).unwrap();
    read(&set, &clone, 0, CHUNK, CHUNK).unwrap();
    // The second read was sequential: chunks 2..=5 are fetched ahead, in the background.
    let deadline = std::time::Instant::now() + T;
    while handle.counters().fetches[1].load(Ordering::SeqCst) < 4 {
        assert!(std::time::Instant::now() < deadline, "no read-ahead");
        std::thread::sleep(Duration::from_millis(5));
    }
    for c in 2..=5 {
        assert!(handle.is_present(c));
    }
    assert!(!handle.is_present(6));
    let before = basis.total.load(Ordering::SeqCst);
    read(&set, &clone, 0, 2 * CHUNK, CHUNK).unwrap();
    assert!(
        basis.total.load(Ordering::SeqCst) >= before,
        "served from the read-ahead"
    );
    // A random read far away: no read-ahead, but remembered as hot.
    read(&set, &clone, 0, 12 * CHUNK, 4096).unwrap();
    assert_eq!(handle.hot_chunks().first(), Some(&12));
    assert!(handle.counters().miss_latency.snapshot().count() >= 3);
    set.shutdown().unwrap();
}

#[test]
fn overlapping_writes_from_two_reactors_never_wait_on_each_other() {
    let (set, clone, handle, _basis) = setup(None, 1);
    // Rounds of racing writes over absent chunks: whole-chunk pairs and partial ones,
    // from both reactors at once. Each must finish, and the data must be one writer's.
    for round in 0..8u64 {
        let base = 2 * round;
        let rxs: Vec<_> = (0..6usize)
            .map(|i| {
                let r = &set.handles()[i % set.len()];
                let (off, len) = if i % 3 == 2 {
                    (base * CHUNK + 4096, 8192) // partial: fetch-then-merge
                } else {
                    (base * CHUNK, 2 * CHUNK) // both chunks whole
                };
                let data = pattern(len as usize, i as u8);
                submit_on(
                    r,
                    &clone,
                    BdevIo::write(off / 512, len / 512, vec![IoBuf::from_slice(&data)]),
                )
                .unwrap()
            })
            .collect();
        for rx in rxs {
            rx.recv_timeout(T).expect("a write hung").result.unwrap();
        }
        assert!(handle.is_present(base) && handle.is_present(base + 1));
        let got = read(&set, &clone, 0, base * CHUNK + 2 * CHUNK - 4096, 4096).unwrap();
        let candidates: Vec<Vec<u8>> = [0u8, 1, 3, 4]
            .iter()
            .map(|&w| pattern(2 * CHUNK as usize, w)[(2 * CHUNK - 4096) as usize..].to_vec())
            .collect();
        assert!(
            candidates.contains(&got),
            "round {round}: the tail is no writer's data"
        );
    }
    set.shutdown().unwrap();
}

/// Two reactors, each reading and writing its own 4 KiB blocks (interleaved, so every
/// chunk is shared) at random, while the owner (reactor 0) fetches: reads always see
/// the basis where the reactor has not written and its own last write where it has.
#[test]
fn two_reactors_at_random_over_shared_chunks_always_read_what_they_wrote() {
    let (set, clone, handle, basis) = setup(None, 0);
    assert!(set.len() >= 2, "needs two reactors");
    let blocks = (16 * CHUNK + 4096) / 4096;
    let threads: Vec<_> = (0..2u64)
        .map(|me| {
            let (set_handle, clone, image) = (
                set.handles()[me as usize].clone(),
                clone.clone(),
                basis.image.clone(),
            );
            std::thread::spawn(move || {
                let mut written: HashMap<u64, Vec<u8>> = HashMap::new();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (me + 1);
                for op in 0..600u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let block = (x % (blocks / 2)) * 2 + me;
                    let off = block * 4096;
                    if x.is_multiple_of(3) {
                        let data = pattern(4096, (op + me) as u8);
                        let io = BdevIo::write(off / 512, 8, vec![IoBuf::from_slice(&data)]);
                        run_on(&set_handle, &clone, io, T).unwrap().result.unwrap();
                        written.insert(block, data);
                    } else {
                        let io = BdevIo::read(off / 512, 8, vec![IoBuf::new(4096)]);
                        let done = run_on(&set_handle, &clone, io, T).unwrap();
                        let got = done.data();
                        done.result.unwrap();
                        let want = written
                            .get(&block)
                            .cloned()
                            .unwrap_or_else(|| image[off as usize..off as usize + 4096].to_vec());
                        assert!(got == want, "reactor {me}, op {op}: block {block} is wrong");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (present, total) = handle.hydration();
    assert!(present <= total);
    // Every chunk a reactor touched was fetched at most once.
    assert!(basis.fetches.lock().unwrap().values().all(|&n| n == 1));
    set.shutdown().unwrap();
}

/// A clone over a file-backed local copy with a presence record in `dir`.
fn durable_clone(
    set: &ReactorSet,
    dir: &std::path::Path,
    basis: &Arc<MemBasis>,
) -> (Bdev, bdev::CloneHandle) {
    let mut cfg = UringConfig::new("local", dir.join("local.img"));
    cfg.create_size = Some(basis.image.len() as u64);
    let local = open_uring(&cfg).unwrap();
    open_clone(
        "c",
        local,
        Arc::clone(basis) as Arc<dyn Basis>,
        None,
        &dir.join("presence"),
        set.handles()[0].clone(),
    )
    .unwrap()
}

#[test]
fn after_a_crash_acknowledged_writes_stay_and_nothing_written_is_fetched_over() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let size = 16 * CHUNK + 4096;
    let basis = Arc::new(MemBasis {
        image: pattern(size as usize, 9),
        fetches: Mutex::new(HashMap::new()),
        bad_chunk: None,
        delay: Duration::ZERO,
        total: AtomicU64::new(0),
    });
    let dir = tempfile::tempdir().unwrap();
    let (clone, handle) = durable_clone(&set, dir.path(), &basis);
    read(&set, &clone, 0, 0, 3 * CHUNK).unwrap();
    // A partial write over an unfetched chunk (fetch, merge), a whole-chunk write (no
    // fetch) and a write to a chunk that was only fetched: all acknowledged.
    let partial = pattern(8192, 1);
    write(&set, &clone, 5 * CHUNK + 4096, &partial).unwrap();
    let whole = pattern(CHUNK as usize, 2);
    write(&set, &clone, 7 * CHUNK, &whole).unwrap();
    write(&set, &clone, CHUNK, &partial).unwrap();
    let mut expect = basis.image.clone();
    expect[(5 * CHUNK + 4096) as usize..][..8192].copy_from_slice(&partial);
    expect[(7 * CHUNK) as usize..][..CHUNK as usize].copy_from_slice(&whole);
    expect[CHUNK as usize..][..8192].copy_from_slice(&partial);
    // "Crash": no checkpoint, everything dropped; then open again from the files.
    drop((clone, handle));
    let fetched = basis.total.load(Ordering::SeqCst);
    let (again, h2) = durable_clone(&set, dir.path(), &basis);
    for c in [1, 5, 7] {
        assert!(h2.is_present(c), "chunk {c} was written and acknowledged");
    }
    assert_eq!(read(&set, &again, 0, 0, size).unwrap(), expect);
    let refetched = basis.total.load(Ordering::SeqCst) - fetched;
    assert!(
        refetched <= 16 - 3,
        "written chunks are never fetched again ({refetched} fetches)"
    );
    // A clean stop writes a checkpoint: after it, nothing at all is fetched again.
    h2.checkpoint().unwrap();
    drop((again, h2));
    let fetched = basis.total.load(Ordering::SeqCst);
    let (third, h3) = durable_clone(&set, dir.path(), &basis);
    assert_eq!(h3.hydration(), (17, 17));
    assert_eq!(read(&set, &third, 1, 0, size).unwrap(), expect);
    assert_eq!(
        basis.total.load(Ordering::SeqCst),
        fetched,
        "nothing fetched"
    );
    // A damaged record is refused, not taken for an empty one.
    drop((third, h3));
    let path = dir.path().join("presence");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let mut cfg = UringConfig::new("local", dir.path().join("local.img"));
    cfg.create_size = Some(size);
    let err = open_clone(
        "c",
        open_uring(&cfg).unwrap(),
        Arc::clone(&basis) as Arc<dyn Basis>,
        None,
        &path,
        set.handles()[0].clone(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, BdevError::Presence { .. }), "{err}");
    set.shutdown().unwrap();
}

#[test]
fn a_miss_still_waiting_at_shutdown_is_failed_not_lost() {
    let (set, clone, _handle, _basis) = setup(None, 3000);
    let rx = submit_on(
        &set.handles()[0],
        &clone,
        BdevIo::read(0, 8, vec![IoBuf::new(4096)]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    set.shutdown().unwrap();
    let c = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the read was never completed");
    assert!(
        matches!(c.result, Err(BdevError::ShuttingDown)),
        "{:?}",
        c.result
    );
}

/// A basis that answers after `delay` (at once if zero), wants the read-ahead that
/// delay calls for, and records every batch it is asked for.
struct BatchBasis {
    batches: Mutex<Vec<(FetchReason, Vec<u64>)>>,
    delay: Duration,
}

impl Basis for BatchBasis {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }

    fn fetch(&self, chunk: u64, reason: FetchReason, done: FetchDone) {
        self.fetch_batch(vec![(chunk, done)], reason);
    }

    fn read_ahead_bytes(&self) -> Option<u64> {
        (!self.delay.is_zero()).then(|| bdev::read_ahead::wanted_bytes(self.delay, 0))
    }

    fn fetch_batch(&self, batch: Vec<(u64, FetchDone)>, reason: FetchReason) {
        let chunks = batch.iter().map(|(c, _)| *c).collect();
        self.batches.lock().unwrap().push((reason, chunks));
        let answer = move || {
            for (chunk, done) in batch {
                done(Ok(pattern(CHUNK as usize, chunk as u8)));
            }
        };
        if self.delay.is_zero() {
            answer();
        } else {
            let delay = self.delay;
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                answer();
            });
        }
    }
}

/// A reader of the first half of a clone of `chunks` over `basis`, 128 KiB at a time,
/// checking what it reads and that no chunk is fetched twice: how far ahead of it the
/// read-ahead reached at most (chunks), and the furthest chunk asked for.
fn read_half_in_order(basis: &Arc<BatchBasis>, chunks: u64) -> (u64, u64) {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let local = create_malloc("local", 512, chunks * CHUNK / 512, None).unwrap();
    let (clone, _handle) =
        create_clone("clone", local, Arc::clone(basis) as Arc<dyn Basis>, None).unwrap();
    let (mut furthest, mut most_ahead) = (0, 0);
    for at in (0..chunks / 2 * CHUNK).step_by(128 << 10) {
        let got = read(&set, &clone, 0, at, 128 << 10).unwrap();
        let first = at / CHUNK;
        assert!(got[..CHUNK as usize] == pattern(CHUNK as usize, first as u8)[..]);
        furthest = basis
            .batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .max()
            .unwrap();
        most_ahead = most_ahead.max(furthest - first - 1);
    }
    let mut seen = std::collections::HashSet::new();
    for (_, b) in basis.batches.lock().unwrap().iter() {
        for c in b {
            assert!(seen.insert(*c), "chunk {c} fetched twice");
        }
    }
    set.shutdown().unwrap();
    (most_ahead, furthest)
}

#[test]
fn a_sequential_reader_s_read_ahead_grows_in_batches_and_stays_within_its_window() {
    let chunks = 1024u64;
    let basis = Arc::new(BatchBasis {
        batches: Mutex::new(Vec::new()),
        delay: Duration::ZERO,
    });
    let (most_ahead, furthest) = read_half_in_order(&basis, chunks);
    assert!(
        most_ahead <= 128,
        "read-ahead reached {most_ahead} chunks ahead of the reader, past its window"
    );
    let ahead: Vec<usize> = basis
        .batches
        .lock()
        .unwrap()
        .iter()
        .filter(|(r, _)| *r == FetchReason::Prefetch)
        .map(|(_, b)| b.len())
        .collect();
    assert_eq!(ahead.first(), Some(&16), "the window starts at 16 chunks");
    assert!(ahead.iter().all(|&n| n <= 128), "{ahead:?}");
    // Once grown, the window is topped up a quarter at a time: 2 MiB, runs long
    // enough to coalesce (in halves, these were 64).
    let grown: Vec<usize> = ahead
        .iter()
        .skip_while(|&&n| n < 96)
        .skip(1)
        .copied()
        .collect();
    assert!(grown.len() >= 4, "{ahead:?}");
    assert!(grown.iter().all(|&n| n == 32), "{ahead:?}");
    assert!(
        furthest >= chunks / 2,
        "read-ahead never ran ahead of the reader"
    );
}

#[test]
fn a_sequential_reader_of_a_far_store_gets_the_window_its_fetches_need() {
    // Every fetch takes 50 ms: the basis wants four times what carries 1 Gbit/s over
    // that, 4 × 125 MB/s × 50 ms = 25 MB (382 chunks), more than the clone's 8 MiB.
    let basis = Arc::new(BatchBasis {
        batches: Mutex::new(Vec::new()),
        delay: Duration::from_millis(50),
    });
    let chunks = 2048;
    let (most_ahead, furthest) = read_half_in_order(&basis, chunks);
    assert!(
        most_ahead > 128,
        "read-ahead stayed within 8 MiB ({most_ahead} chunks) of a store 50 ms away"
    );
    let wanted = bdev::read_ahead::wanted_bytes(Duration::from_millis(50), 0);
    assert!(
        most_ahead <= wanted.div_ceil(CHUNK),
        "read-ahead ran {most_ahead} chunks ahead, more than the basis wants"
    );
    assert!(
        furthest >= chunks / 2,
        "read-ahead never ran ahead of the reader"
    );
}

/// A basis whose fetches wait for the test to answer them.
struct HeldBasis {
    asked: Mutex<std::sync::mpsc::Sender<(u64, FetchReason, FetchDone)>>,
}

impl Basis for HeldBasis {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }

    fn fetch(&self, chunk: u64, reason: FetchReason, done: FetchDone) {
        let _ = self.asked.lock().unwrap().send((chunk, reason, done));
    }
}

/// A host that reads a chunk being fetched for thickening waits on that fetch: from
/// then on it is the host's miss, timed from when the host began waiting and counted
/// as its own.
#[test]
fn a_host_joining_a_background_fetch_has_its_miss_timed_and_counted() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (tx, asked) = std::sync::mpsc::channel();
    let basis = Arc::new(HeldBasis {
        asked: Mutex::new(tx),
    });
    let size = 8 * CHUNK;
    let local = create_malloc("local", 512, size / 512, None).unwrap();
    let (clone, handle) =
        create_clone("clone", local, Arc::clone(&basis) as Arc<dyn Basis>, None).unwrap();
    let (thick_tx, thickened) = std::sync::mpsc::channel();
    handle
        .fetch_many_on(
            &set.handles()[0],
            vec![3],
            FetchReason::Thickening,
            move |r| thick_tx.send(r).unwrap(),
        )
        .unwrap();
    let (chunk, reason, done) = asked.recv_timeout(T).unwrap();
    assert_eq!((chunk, reason), (3, FetchReason::Thickening));
    // A host reads within chunk 3 meanwhile; once it waits (a client fetch in flight),
    // the fetch is answered.
    let host = std::thread::spawn({
        let set_handle = set.handles()[set.len() - 1].clone();
        let clone = clone.clone();
        move || {
            let io = BdevIo::read(3 * CHUNK / 512, 8, vec![IoBuf::new(4096)]);
            run_on(&set_handle, &clone, io, T).unwrap()
        }
    });
    let deadline = std::time::Instant::now() + T;
    while handle.misses_in_flight() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the host never waited"
        );
        std::thread::yield_now();
    }
    assert!(asked.try_recv().is_err(), "no second fetch of chunk 3");
    done(Ok(pattern(CHUNK as usize, 3)));
    let read = host.join().unwrap();
    assert_eq!(read.data(), pattern(CHUNK as usize, 3)[..4096]);
    thickened.recv_timeout(T).unwrap().unwrap();
    let k = handle.counters();
    assert_eq!(
        k.miss_latency.snapshot().count(),
        1,
        "the host's wait is timed"
    );
    assert_eq!(
        k.fetched_bytes[FetchReason::ClientMiss.index()].load(Ordering::SeqCst),
        CHUNK
    );
    assert_eq!(
        k.fetched_bytes[FetchReason::Thickening.index()].load(Ordering::SeqCst),
        0
    );
    assert_eq!(handle.misses_in_flight(), 0);
    set.shutdown().unwrap();
}
