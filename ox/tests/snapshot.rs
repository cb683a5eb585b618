//! Snapshots of a tracked volume and clones from them, through a local-directory store:
//! point-in-time while the host keeps writing, incremental uploads of only what
//! changed, sparse volumes costing nothing, and clones reading back exactly the
//! snapshot's image.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{
    Basis, Bdev, BdevIo, IoBuf, IoType, Tracking, VolumeHandle, create_clone, create_malloc,
    create_volume,
};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::format::Entry;
use ox::keys::{Kek, SecretKey};
use ox::snapshot::{Loaded, SnapshotOptions, SnapshotReport, load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::local::LocalStore;
use ox::throttle::{Limit, Throttle};

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use support::{CHUNK, Env, T, env, env_with_cores, fresh_volume, options, random, read, write};

/// Stores for basis fetches: the local directory at `root`, one per OX core.
fn local_factory(root: PathBuf) -> StoreFactory {
    Arc::new(move |_ex| Ok(Rc::new(LocalStore::open(root.clone())?) as Rc<dyn ObjectStore>))
}

fn snapshot(
    env: &Env,
    handle: &VolumeHandle,
    parent: Option<String>,
    throttle: Throttle,
) -> SnapshotReport {
    let (root, h, opts, reactor, kek) = (
        env.root.clone(),
        handle.clone(),
        options(env),
        env.set.handles()[0].clone(),
        env.kek.clone(),
    );
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let parent = match parent {
                    Some(k) => Some(load(&store, &k, &[kek]).await.unwrap()),
                    None => None,
                };
                let began = std::time::Instant::now();
                let report =
                    snapshot_volume(&store, &reactor, &h, parent.as_ref(), &opts, &throttle)
                        .await
                        .unwrap();
                // The time it took is measured, within the time the call took.
                let outer = began.elapsed();
                assert!(
                    report.elapsed.is_some_and(|e| !e.is_zero() && e <= outer),
                    "{:?} of {outer:?}",
                    report.elapsed
                );
                report
            })
        })
        .unwrap()
}

fn open_clone(env: &Env, manifest_key: &str, size: u64) -> (Bdev, ObjectBasis) {
    let (b, basis, _) = open_clone_handle(env, manifest_key, size);
    (b, basis)
}

/// A clone of the snapshot `report` published reads back as `want`, all `size` bytes.
fn assert_clone_is(env: &Env, report: &SnapshotReport, size: u64, want: &[u8]) {
    let (clone, _) = open_clone(env, &report.manifest_key, size);
    assert!(
        read(env, &clone, 0, size) == want,
        "the clone of {} is not the volume",
        report.manifest_key
    );
}

fn load_snapshot(env: &Env, manifest_key: &str) -> Loaded {
    let (root, key, kek) = (env.root.clone(), manifest_key.to_string(), env.kek.clone());
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                load(&store, &key, &[kek]).await.unwrap()
            })
        })
        .unwrap()
}

fn open_clone_handle(
    env: &Env,
    manifest_key: &str,
    size: u64,
) -> (Bdev, ObjectBasis, bdev::CloneHandle) {
    let (root, key, kek) = (env.root.clone(), manifest_key.to_string(), env.kek.clone());
    let loaded: Loaded = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                load(&store, &key, &[kek]).await.unwrap()
            })
        })
        .unwrap();
    let root = env.root.clone();
    let factory: StoreFactory = local_factory(root);
    let basis = ObjectBasis::new(
        loaded,
        factory,
        Arc::clone(&env.cores),
        Throttle::default(),
        "clone",
    );
    let local = create_malloc("clone-local", 512, size / 512, None).unwrap();
    let (clone, h) = create_clone(
        "clone",
        local,
        Arc::new(basis.clone()) as Arc<dyn Basis>,
        None,
    )
    .unwrap();
    (clone, basis, h)
}

/// A data frame's object and nonce.
type FrameNonce = (String, [u8; 12]);

/// The nonces of snapshot `manifest_key`'s own frames: its data frames' (with the
/// object each is in), and its index pages'.
fn nonces(env: &Env, manifest_key: &str) -> (Vec<FrameNonce>, Vec<[u8; 12]>) {
    let loaded = load_snapshot(env, manifest_key);
    let root = env.root.clone();
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let nonce = |frame: &[u8]| -> [u8; 12] { frame[16..28].try_into().unwrap() };
                let (mut data, mut pages) = (Vec::new(), Vec::new());
                for page in 0..loaded.manifest.page_count() {
                    let entries = loaded.page(&store, page, None).await.unwrap().0.entries;
                    for e in entries {
                        if let Entry::Frame {
                            source: 0,
                            object,
                            offset,
                            length,
                        } = e
                        {
                            let key = &loaded.sources[0].objects[object as usize];
                            let frame = store.get_range(key, offset, length.into()).await;
                            data.push((key.clone(), nonce(&frame.unwrap())));
                        }
                    }
                }
                for page in loaded.manifest.stored_pages() {
                    let key = loaded.manifest.page_key(page).unwrap();
                    pages.push(nonce(&store.get(&key).await.unwrap()));
                }
                (data, pages)
            })
        })
        .unwrap()
}

fn assert_unique<'a>(nonces: impl Iterator<Item = &'a [u8; 12]>) {
    let mut seen = std::collections::HashSet::new();
    for n in nonces {
        assert!(seen.insert(*n), "nonce {} used twice", hex::encode(n));
    }
}

/// With two OX cores a snapshot encodes on both: what it stores is the volume, chunk
/// for chunk, over a parent too (unchanged chunks between changed ones, zero chunks
/// among them); data frames were encoded on the other core (a nonce prefix that is not
/// the writer's own, which seals the index pages); and no nonce repeats.
#[test]
fn a_snapshot_encodes_on_every_ox_core_and_stores_the_volume_in_order() {
    let env = env_with_cores(2);
    let size = 32 << 20;
    let (vol, handle) = fresh_volume(size);
    let image = random(size as usize, 91);
    write(&env, &vol, 0, &image);
    let first = snapshot(&env, &handle, None, Throttle::default());
    // Every third chunk changes and every seventh becomes zeros.
    let mut now = image.clone();
    for c in (0..size / CHUNK).filter(|c| c % 3 == 0 || c % 7 == 0) {
        let data = match c % 7 {
            0 => vec![0; CHUNK as usize],
            _ => random(CHUNK as usize, 1000 + c),
        };
        write(&env, &vol, c * CHUNK, &data);
        now[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].copy_from_slice(&data);
    }
    let parent = Some(first.manifest_key.clone());
    let second = snapshot(&env, &handle, parent, Throttle::default());
    assert!(second.manifest.stored_chunks < first.manifest.stored_chunks / 2);
    for (report, want) in [(&first, &image), (&second, &now)] {
        assert_clone_is(&env, report, size, want);
        let (data, pages) = nonces(&env, &report.manifest_key);
        assert_eq!(data.len() as u64, report.manifest.stored_chunks);
        assert_unique(data.iter().map(|(_, n)| n).chain(&pages));
        let writer: Vec<&[u8]> = pages.iter().map(|n| &n[..4]).collect();
        assert!(!writer.is_empty());
        assert!(
            data.iter().any(|(_, n)| !writer.contains(&&n[..4])),
            "no data frame was encoded on the other core"
        );
    }
    env.set.shutdown().unwrap();
}

/// A snapshot reads adjacent changed chunks from the device in runs (one request, a
/// buffer per chunk), not a request per chunk, and what it stores is the volume: a
/// last chunk shorter than the others included, and runs broken where chunks did not
/// change.
#[test]
fn a_snapshot_reads_adjacent_chunks_in_runs() {
    let env = env();
    // 128 whole chunks and an 8 KiB one.
    let size = (8 << 20) + 8192;
    let (vol, handle) = fresh_volume(size);
    let image = random(size as usize, 17);
    write(&env, &vol, 0, &image);
    let reads = || handle.inner().stats().ops(IoType::Read);
    let chunks = size.div_ceil(CHUNK);
    let before = reads();
    let first = snapshot(&env, &handle, None, Throttle::default());
    let asked = reads() - before;
    // Answers that come apart (a busy machine) split runs, never join them: fewer
    // requests than chunks is what a request per chunk cannot give.
    assert!(asked < chunks, "{asked} device reads for {chunks} chunks");
    // Two runs of changed chunks, and single ones between unchanged ones.
    let mut now = image.clone();
    let changed: Vec<u64> = (10..30).chain(60..64).chain([70, 72, 74, 128]).collect();
    for &c in &changed {
        let at = c * CHUNK;
        let len = (size - at).min(CHUNK);
        let data = random(len as usize, 500 + c);
        write(&env, &vol, at, &data);
        now[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    let before = reads();
    let second = snapshot(
        &env,
        &handle,
        Some(first.manifest_key.clone()),
        Throttle::default(),
    );
    let asked = reads() - before;
    assert!(
        asked < changed.len() as u64,
        "{asked} device reads for {changed:?}"
    );
    assert_eq!(second.manifest.stored_chunks, changed.len() as u64);
    for (report, want) in [(&first, &image), (&second, &now)] {
        assert_clone_is(&env, report, size, want);
    }
    env.set.shutdown().unwrap();
}

#[test]
fn a_snapshot_is_point_in_time_while_the_host_keeps_writing() {
    let env = env();
    let size = 8 << 20;
    let (vol, handle) = fresh_volume(size);
    let before = random(size as usize, 1);
    write(&env, &vol, 0, &before);
    // A slow upload (2 MiB/s) keeps the snapshot running while we overwrite everything.
    let throttle = Throttle::new(
        Limit::NONE,
        Limit {
            rate: 2 << 20,
            burst: 1 << 20,
        },
    );
    let after = random(size as usize, 2);
    let snap = std::thread::scope(|s| {
        let t = s.spawn(|| snapshot(&env, &handle, None, throttle.clone()));
        // Once an upload waits for the throttle, the snapshot has begun (its point in
        // time is taken) and has most of the volume still to store.
        let asked = std::time::Instant::now();
        while throttle.waiting("vol1", ox::throttle::Class::Background) == 0 {
            assert!(asked.elapsed() < T, "the snapshot never reached its upload");
            assert!(!t.is_finished(), "the snapshot ended without waiting");
            std::thread::sleep(Duration::from_millis(1));
        }
        for off in (0..size).step_by(256 << 10) {
            write(
                &env,
                &vol,
                off,
                &after[off as usize..(off + (256 << 10)) as usize],
            );
        }
        t.join().unwrap()
    });
    assert_eq!(snap.chunks_read, size / CHUNK);
    // The volume has the new data; a clone of the snapshot has exactly the old.
    assert!(read(&env, &vol, 0, size) == after);
    let (clone, _) = open_clone(&env, &snap.manifest_key, size);
    assert!(
        read(&env, &clone, 0, size) == before,
        "clone differs from the pre-snapshot image"
    );
    env.set.shutdown().unwrap();
}

#[test]
fn incremental_snapshots_upload_only_what_changed() {
    let env = env();
    let size = 64 << 20;
    let (vol, handle) = fresh_volume(size);
    let base = random(size as usize, 3);
    write(&env, &vol, 0, &base);
    let s1 = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(s1.manifest.stored_chunks, 1024);
    // Change 1 % of the volume: 10 chunks, one block each.
    let mut changed = base.clone();
    for i in 0..10u64 {
        let off = i * 100 * CHUNK + 512;
        let new = random(512, 100 + i);
        changed[off as usize..off as usize + 512].copy_from_slice(&new);
        write(&env, &vol, off, &new);
    }
    let s2 = snapshot(
        &env,
        &handle,
        Some(s1.manifest_key.clone()),
        Throttle::default(),
    );
    assert_eq!(s2.chunks_read, 10);
    assert_eq!(s2.manifest.stored_chunks, 10);
    assert_eq!(s2.manifest.lineage.len(), 1);
    // ~1 % of the first upload, plus the index.
    let ratio = s2.data_bytes as f64 / s1.data_bytes as f64;
    assert!(
        (0.009..0.011).contains(&ratio),
        "incremental uploaded {ratio:.4} of the full"
    );
    eprintln!(
        "full: {} data + {} meta bytes; incremental: {} data + {} meta bytes",
        s1.data_bytes, s1.meta_bytes, s2.data_bytes, s2.meta_bytes
    );
    let (c1, _) = open_clone(&env, &s1.manifest_key, size);
    let (c2, _) = open_clone(&env, &s2.manifest_key, size);
    assert!(read(&env, &c1, 0, size) == base);
    assert!(read(&env, &c2, 0, size) == changed);
    // A full snapshot (no parent) after incremental ones reads everything again: the
    // change set is relative to s2, not to an empty volume.
    let full = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(full.manifest.stored_chunks, 1024);
    let (c3, _) = open_clone(&env, &full.manifest_key, size);
    assert!(read(&env, &c3, 0, size) == changed);
    // An incremental over an older parent than the base also reads everything.
    let over_s1 = snapshot(
        &env,
        &handle,
        Some(s1.manifest_key.clone()),
        Throttle::default(),
    );
    assert_eq!(over_s1.chunks_read, 1024);
    env.set.shutdown().unwrap();
}

#[test]
fn sparse_volumes_store_nothing_for_unwritten_chunks_and_clones_fetch_only_what_is_read() {
    let env = env();
    let size = 1u64 << 40; // 1 TiB, sparse
    let (vol, handle) = fresh_volume(size);
    let extent = random(4 << 20, 7);
    let at = 300 << 30;
    write(&env, &vol, at, &extent);
    write(&env, &vol, 5 << 30, &random(4096, 8));
    let s = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(s.chunks_read, 64 + 1);
    assert_eq!(s.manifest.stored_chunks, 65);
    let (clone, basis) = open_clone(&env, &s.manifest_key, size);
    assert!(read(&env, &clone, at, 4 << 20) == extent);
    let c = basis.counters();
    assert_eq!(c.frames.load(Ordering::SeqCst), 64);
    // One read of 4 MiB: its 64 adjacent frames travel in ranged GETs of about 2 MiB.
    assert!(c.frame_gets.load(Ordering::SeqCst) <= 8);
    assert!(c.frame_bytes.load(Ordering::SeqCst) <= (4 << 20) + 64 * 100);
    assert_eq!(c.page_gets.load(Ordering::SeqCst), 1);
    // Unwritten space reads as zeroes with no frame GET.
    assert!(
        read(&env, &clone, 700 << 30, 1 << 20)
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(c.frames.load(Ordering::SeqCst), 64);
    env.set.shutdown().unwrap();
}

#[test]
fn a_wrong_key_or_a_damaged_object_never_yields_data() {
    let env = env();
    let size = 4 << 20;
    let (vol, handle) = fresh_volume(size);
    write(&env, &vol, 0, &random(size as usize, 5));
    let s = snapshot(&env, &handle, None, Throttle::default());
    // Wrong KEK: opening fails, naming the key.
    let (root, key) = (env.root.clone(), s.manifest_key.clone());
    let err = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let impostor = Kek::new("test-kek", SecretKey::random().unwrap());
                load(&store, &key, &[impostor])
                    .await
                    .err()
                    .map(|e| e.to_string())
            })
        })
        .unwrap()
        .unwrap();
    assert!(err.contains("test-kek"), "{err}");
    // Damage one byte of a data object: that chunk's read is an error, others are fine.
    let obj = env.root.join(&s.manifest.objects[0]);
    let mut bytes = std::fs::read(&obj).unwrap();
    bytes[100] ^= 0xFF;
    std::fs::write(&obj, bytes).unwrap();
    // A local copy of the wrong size is refused.
    let loaded = load_snapshot(&env, &s.manifest_key);
    let root = env.root.clone();
    let factory: StoreFactory = local_factory(root);
    let basis = ObjectBasis::new(
        loaded,
        factory,
        Arc::clone(&env.cores),
        Throttle::default(),
        "x",
    );
    let small = create_malloc("small", 512, size / 1024, None).unwrap();
    assert!(create_clone("x", small, Arc::new(basis) as Arc<dyn Basis>, None).is_err());
    let (clone, _) = open_clone(&env, &s.manifest_key, size);
    let io = BdevIo::read(0, 8, vec![IoBuf::new(4096)]);
    let c = run_on(&env.set.handles()[0], &clone, io, T).unwrap();
    assert!(
        matches!(c.result, Err(bdev::BdevError::Basis { chunk: 0, .. })),
        "{:?}",
        c.result
    );
    let io = BdevIo::read(CHUNK * 40 / 512, 8, vec![IoBuf::new(4096)]);
    assert!(
        run_on(&env.set.handles()[0], &clone, io, T)
            .unwrap()
            .result
            .is_ok()
    );
    env.set.shutdown().unwrap();
}

#[test]
fn thickening_pauses_resumes_and_completes_then_reads_need_no_basis() {
    let env = env();
    let size = 8 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 11);
    write(&env, &vol, 0, &data);
    let s = snapshot(&env, &handle, None, Throttle::default());
    let (clone, basis, clone_handle) = open_clone_handle(&env, &s.manifest_key, size);
    let control = ox::hydrate::Thickening::new();
    control.pause();
    let (h, c, r) = (
        clone_handle.clone(),
        Arc::clone(&control),
        env.set.handles()[0].clone(),
    );
    let walker = std::thread::spawn({
        let cores = Arc::clone(&env.cores);
        move || {
            cores
                .run(move |_ex| {
                    Box::pin(async move { ox::hydrate::thicken(&h, &r, &c).await.unwrap() })
                })
                .unwrap()
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(clone_handle.hydration().0, 0, "paused: nothing fetched");
    control.resume();
    assert_eq!(walker.join().unwrap(), 128);
    assert_eq!(clone_handle.hydration(), (128, 128));
    assert_eq!(
        clone_handle.counters().fetches[2].load(Ordering::SeqCst),
        128
    );
    assert!(control.eta(&clone_handle).is_some_and(|d| d.is_zero()));
    let gets = basis.counters().frame_gets.load(Ordering::SeqCst);
    assert!(read(&env, &clone, 0, size) == data);
    assert_eq!(
        basis.counters().frame_gets.load(Ordering::SeqCst),
        gets,
        "a thick clone needs no basis"
    );
    env.set.shutdown().unwrap();
}

/// Verifies `loaded` from the test's local store on an OX core.
fn verify_here(env: &Env, loaded: &Arc<Loaded>) -> ox::hydrate::VerifyReport {
    let (root, l) = (env.root.clone(), Arc::clone(loaded));
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                ox::hydrate::verify(&store, &l, None, &Default::default()).await
            })
        })
        .unwrap()
        .unwrap()
}

/// Restores `loaded` from the test's local store onto `target` through reactor 0,
/// `pass` watching.
fn restore_here(
    env: &Env,
    loaded: Arc<Loaded>,
    target: &Bdev,
    pass: &Arc<ox::hydrate::Pass>,
) -> Result<u64, ox::OxError> {
    let (root, t, r, p) = (
        env.root.clone(),
        target.clone(),
        env.set.handles()[0].clone(),
        Arc::clone(pass),
    );
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                ox::hydrate::restore(&store, &loaded, &t, &r, None, &p).await
            })
        })
        .unwrap()
}

/// A volume whose last chunk is short (its size a whole number of blocks, not of
/// chunks) restores whole, that chunk stored or zero, with zero chunks between stored
/// ones: every piece's writes land where they belong, and nothing past the end.
#[test]
fn a_volume_whose_last_chunk_is_short_restores_whole() {
    let env = env();
    let size = (4 << 20) + 4096;
    for last_stored in [true, false] {
        let (vol, handle) = fresh_volume(size);
        let mut data = random(size as usize, 13);
        // Chunks 1 and 2 zero, and the short last one too unless it is stored.
        data[CHUNK as usize..3 * CHUNK as usize].fill(0);
        if !last_stored {
            data[(4 << 20)..].fill(0);
        }
        write(&env, &vol, 0, &data);
        let s = snapshot(&env, &handle, None, Throttle::default());
        let loaded = load_snapshot(&env, &s.manifest_key);
        let (root, l) = (env.root.clone(), load_snapshot(&env, &s.manifest_key));
        let (index, _) = env
            .cores
            .run(move |_ex| {
                Box::pin(async move { l.page(&LocalStore::open(root).unwrap(), 0, None).await })
            })
            .unwrap()
            .unwrap();
        let zero = |c: usize| index.entries[c] == Entry::Zero;
        assert!(zero(1) && zero(2) && !zero(3) && zero(64) != last_stored);
        // A target not zero to begin with: zero chunks must be written.
        let target = create_malloc("restored", 512, size / 512, None).unwrap();
        write(&env, &target, 0, &vec![0xff; size as usize]);
        let pass = Arc::new(ox::hydrate::Pass::default());
        let written = restore_here(&env, Arc::new(loaded), &target, &pass);
        assert_eq!(written.unwrap(), size);
        assert_eq!(pass.chunks.load(Ordering::SeqCst), size.div_ceil(CHUNK));
        assert!(
            read(&env, &target, 0, size) == data,
            "last stored: {last_stored}"
        );
    }
}

thread_local! {
    /// Writes `HeldWrites` holds on this reactor: completed by `let_writes_go`.
    static HELD: std::cell::RefCell<Vec<bdev::IoDone>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A device that holds every write until let go, counting those it holds.
struct HeldWrites(Arc<std::sync::atomic::AtomicU32>);

struct HeldChannel(Arc<std::sync::atomic::AtomicU32>);

impl bdev::BdevBackend for HeldWrites {
    fn supports(&self, io_type: bdev::IoType) -> bool {
        matches!(io_type, bdev::IoType::Write | bdev::IoType::WriteZeroes)
    }
    fn create_channel(
        &self,
        _: &bdev::BdevInfo,
    ) -> Result<Box<dyn bdev::BackendChannel>, bdev::BdevError> {
        Ok(Box::new(HeldChannel(Arc::clone(&self.0))))
    }
}

impl bdev::BackendChannel for HeldChannel {
    fn submit(&self, _io: bdev::BdevIo, done: bdev::IoDone) {
        HELD.with(|h| h.borrow_mut().push(done));
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Completes (as written) every write `HeldWrites` holds on reactor `on`.
fn let_writes_go(on: &reactor::ReactorHandle) {
    on.send(|| {
        for done in HELD.with(|h| h.take()) {
            done.complete(bdev::IoCompletion {
                bufs: Vec::new(),
                result: Ok(()),
            });
        }
    })
    .unwrap();
}

/// A restore one of whose GETs fails stops asking, but returns — with that failure,
/// not "cancelled" — only once the writes it sent have ended: its caller removes the
/// volume's files next, and no write may land after.
#[test]
fn a_failed_restore_returns_only_once_its_writes_have_ended() {
    let env = env();
    let size = 4 << 20;
    let (vol, handle) = fresh_volume(size);
    write(&env, &vol, 0, &random(size as usize, 14));
    let s = snapshot(&env, &handle, None, Throttle::default());
    assert!(s.manifest.objects.len() >= 3, "{:?}", s.manifest.objects);
    // The last object is gone: its run fails, the others' are written (and held).
    let last = s.manifest.objects.last().unwrap();
    std::fs::remove_file(env.root.join(last)).unwrap();
    let loaded = load_snapshot(&env, &s.manifest_key);
    let held = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let info = bdev::BdevInfo {
        name: "held".into(),
        block_size: 512,
        num_blocks: size / 512,
        uuid: uuid::Uuid::new_v4(),
    };
    let target = bdev::Bdev::new(info, HeldWrites(Arc::clone(&held))).unwrap();
    let on = env.set.handles()[0].clone();
    let (root, t, r, cores) = (env.root.clone(), target, on.clone(), Arc::clone(&env.cores));
    let returned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let back = Arc::clone(&returned);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let restored = cores.run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let pass = ox::hydrate::Pass::default();
                let r = ox::hydrate::restore(&store, &loaded, &t, &r, None, &pass).await;
                // On the OX core, in the step the restore returned in.
                back.store(true, Ordering::SeqCst);
                r
            })
        });
        tx.send(restored.unwrap()).unwrap();
    });
    // Runs before the missing object's have been fetched and their writes sent.
    let asked = std::time::Instant::now();
    while held.load(Ordering::SeqCst) == 0 {
        assert!(asked.elapsed() < T, "no write sent");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The missing object failed in the step that sent those writes (the local store
    // answers at once), so that step has ended once a job queued after it has run
    // on the (one) OX core: the restore still waits for its writes.
    env.cores.run(|_ex| Box::pin(async {})).unwrap();
    assert!(
        !returned.load(Ordering::SeqCst),
        "the restore returned with {} writes still held",
        held.load(Ordering::SeqCst)
    );
    let_writes_go(&on);
    let e = rx.recv_timeout(T).unwrap().unwrap_err();
    assert!(matches!(e, ox::OxError::NotFound { .. }), "{e}");
}

#[test]
fn verify_reports_every_bad_frame_and_restore_copies_the_snapshot() {
    let env = env();
    let size = 4 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 12);
    write(&env, &vol, 0, &data[..(size / 2) as usize]);
    let s = snapshot(&env, &handle, None, Throttle::default());
    let loaded = Arc::new(load_snapshot(&env, &s.manifest_key));
    let clean = verify_here(&env, &loaded);
    assert_eq!((clean.frames, clean.zero, clean.bad.len()), (32, 32, 0));
    // Restore onto a fresh device.
    let target = create_malloc("restored", 512, size / 512, None).unwrap();
    let written = restore_here(&env, Arc::clone(&loaded), &target, &Arc::default());
    assert_eq!(written.unwrap(), size);
    let back = read(&env, &target, 0, size);
    assert!(back[..(size / 2) as usize] == data[..(size / 2) as usize]);
    assert!(back[(size / 2) as usize..].iter().all(|&b| b == 0));
    // Damage two frames: verify names both chunks.
    let obj = env.root.join(&s.manifest.objects[0]);
    let mut bytes = std::fs::read(&obj).unwrap();
    let len = bytes.len();
    bytes[50] ^= 1;
    bytes[len - 50] ^= 1;
    std::fs::write(&obj, bytes).unwrap();
    let dirty = verify_here(&env, &loaded);
    assert_eq!(dirty.bad.len(), 2, "{:?}", dirty.bad);
    assert_eq!(dirty.frames, 30);
    env.set.shutdown().unwrap();
}

#[test]
fn a_cancelled_snapshot_publishes_nothing_keeps_its_changes_and_leaves_collectable_orphans() {
    let env = env();
    let size = 8 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 21);
    write(&env, &vol, 0, &data);
    let progress: Arc<ox::snapshot::SnapshotProgress> = Arc::default();
    let mut opts = options(&env);
    opts.progress = Arc::clone(&progress);
    // Slow uploads so the cancel lands mid-way.
    let throttle = Throttle::new(
        Limit::NONE,
        Limit {
            rate: 4 << 20,
            burst: 1 << 20,
        },
    );
    let (root, h, reactor) = (
        env.root.clone(),
        handle.clone(),
        env.set.handles()[0].clone(),
    );
    let cores = Arc::clone(&env.cores);
    let t = std::thread::spawn(move || {
        cores
            .run(move |_ex| {
                Box::pin(async move {
                    let store = LocalStore::open(root).unwrap();
                    snapshot_volume(&store, &reactor, &h, None, &opts, &throttle)
                        .await
                        .err()
                        .map(|e| e.to_string())
                })
            })
            .unwrap()
    });
    while progress.fraction() < 0.2 {
        std::thread::sleep(Duration::from_millis(10));
    }
    progress.cancel();
    let err = t.join().unwrap().unwrap();
    assert!(err.contains("cancelled"), "{err}");
    let root = env.root.clone();
    let kek = env.kek.clone();
    let (manifests, orphans) = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let m = store.list("vol1/ox1/m/").await.unwrap();
                // Given up: its upload lease is released (or its orphans would wait).
                assert_eq!(
                    store.list("vol1/ox1/u/").await.unwrap(),
                    Vec::<String>::new()
                );
                let o = ox::snapshot::collect_orphans(&store, "vol1/", &[kek])
                    .await
                    .unwrap();
                let left = store.list("vol1/ox1/d/").await.unwrap();
                (m, (o, left))
            })
        })
        .unwrap();
    assert!(manifests.is_empty(), "a cancelled snapshot is not visible");
    assert!(!orphans.0.is_empty(), "its uploaded objects were orphans");
    assert!(orphans.1.is_empty(), "and have been collected");
    // The next snapshot still stores every chunk: the changes were kept.
    let s = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(s.manifest.stored_chunks, size / CHUNK);
    let (clone, _) = open_clone(&env, &s.manifest_key, size);
    assert!(read(&env, &clone, 0, size) == data);
    env.set.shutdown().unwrap();
}

/// A local-directory store that runs `before` ahead of every PUT of a data object (a
/// key under `ox1/d/`): what happens to a writer while its data is being stored.
struct BeforeDataPuts<F> {
    inner: LocalStore,
    before: F,
}

impl<F: Fn() -> ox::store::BoxFuture<'static, ()>> ObjectStore for BeforeDataPuts<F> {
    fn put<'a>(
        &'a self,
        key: &'a str,
        data: Vec<u8>,
    ) -> ox::store::BoxFuture<'a, Result<(), ox::OxError>> {
        Box::pin(async move {
            if key.contains("/ox1/d/") {
                (self.before)().await;
            }
            self.inner.put(key, data).await
        })
    }
    fn put_new<'a>(
        &'a self,
        key: &'a str,
        data: Vec<u8>,
    ) -> ox::store::BoxFuture<'a, Result<(), ox::OxError>> {
        Box::pin(async move {
            if key.contains("/ox1/d/") {
                (self.before)().await;
            }
            self.inner.put_new(key, data).await
        })
    }
    fn get<'a>(&'a self, key: &'a str) -> ox::store::BoxFuture<'a, Result<Vec<u8>, ox::OxError>> {
        self.inner.get(key)
    }
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> ox::store::BoxFuture<'a, Result<Vec<u8>, ox::OxError>> {
        self.inner.get_range(key, offset, len)
    }
    fn list<'a>(
        &'a self,
        prefix: &'a str,
    ) -> ox::store::BoxFuture<'a, Result<Vec<String>, ox::OxError>> {
        self.inner.list(prefix)
    }
    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        delimiter: Option<&'a str>,
        after: Option<&'a str>,
        max: usize,
    ) -> ox::store::BoxFuture<'a, Result<ox::store::Listing, ox::OxError>> {
        self.inner.list_page(prefix, delimiter, after, max)
    }
    fn delete<'a>(
        &'a self,
        keys: &'a [String],
    ) -> ox::store::BoxFuture<'a, Result<(), ox::OxError>> {
        self.inner.delete(keys)
    }
}

/// A writer whose lease went unrenewed longer than it may trust (a collector elsewhere
/// may have taken what it stored for orphans) publishes nothing, even though it renewed
/// since; its changes go to the next snapshot, which holds the volume whole.
#[test]
fn a_writer_whose_lease_renewals_stalled_publishes_nothing() {
    let env = env();
    let size = 8 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 23);
    write(&env, &vol, 0, &data);
    let mut opts = options(&env);
    opts.clock = ox::lease::Clock::movable();
    let (root, h, reactor) = (
        env.root.clone(),
        handle.clone(),
        env.set.handles()[0].clone(),
    );
    let (err, manifests, leases) = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                // The upload stalls longer than a writer may trust its lease: as the
                // first data object is stored, the writer's clocks move ahead past
                // `lease::TRUSTED_S` (what a machine suspended for half a day, or a
                // store stalled that long, does to them).
                let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let (clock, stalls) = (opts.clock.clone(), Arc::clone(&stalled));
                let store = BeforeDataPuts {
                    inner: LocalStore::open(root).unwrap(),
                    before: move || -> ox::store::BoxFuture<'static, ()> {
                        if !stalls.swap(true, Ordering::SeqCst) {
                            clock.advance(ox::lease::TRUSTED_S + 1);
                        }
                        Box::pin(async {})
                    },
                };
                let err = snapshot_volume(&store, &reactor, &h, None, &opts, &Throttle::default())
                    .await
                    .unwrap_err();
                assert!(stalled.load(Ordering::SeqCst), "data was stored");
                let m = store.list("vol1/ox1/m/").await.unwrap();
                let u = store.list("vol1/ox1/u/").await.unwrap();
                (err.to_string(), m, u)
            })
        })
        .unwrap();
    assert!(err.contains("went unrenewed"), "{err}");
    assert!(manifests.is_empty(), "published nothing: {manifests:?}");
    assert!(
        leases.is_empty(),
        "given up, its lease released: {leases:?}"
    );
    let s = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(s.manifest.stored_chunks, size / CHUNK);
    let (clone, _) = open_clone(&env, &s.manifest_key, size);
    assert!(read(&env, &clone, 0, size) == data);
    env.set.shutdown().unwrap();
}

#[test]
fn change_tracking_survives_a_clean_restart_and_a_crash_costs_a_full_read() {
    let env = env();
    let size = 8 << 20;
    let chunks = size / CHUNK;
    let media = create_malloc("m", 512, size / 512, None).unwrap();
    let (vol, handle) = create_volume("vol1", media.clone(), CHUNK, Tracking::Fresh, None).unwrap();
    write(&env, &vol, 0, &random(size as usize, 31));
    let s1 = snapshot(&env, &handle, None, Throttle::default());
    for i in 0..3u64 {
        write(&env, &vol, i * 40 * CHUNK, &random(4096, 40 + i));
    }
    // Clean shutdown: save the tracking; restart over the same media.
    let path = env.root.join("vol1.cbt");
    handle.save_changes(&path).unwrap();
    drop((vol, handle));
    let saved = bdev::ChangedChunks::from_bytes(&std::fs::read(&path).unwrap(), chunks).unwrap();
    assert_eq!(saved.count(), 3);
    let (_vol, handle) =
        create_volume("vol1", media.clone(), CHUNK, Tracking::Saved(saved), None).unwrap();
    let s2 = snapshot(
        &env,
        &handle,
        Some(s1.manifest_key.clone()),
        Throttle::default(),
    );
    assert_eq!(s2.chunks_read, 3);
    // Damaged tracking is refused; after a crash (no saved tracking) everything is read.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 1;
    assert!(bdev::ChangedChunks::from_bytes(&bytes, chunks).is_none());
    assert!(bdev::ChangedChunks::from_bytes(&std::fs::read(&path).unwrap(), chunks + 1).is_none());
    let (_vol, handle) = create_volume("vol1", media, CHUNK, Tracking::AllChanged, None).unwrap();
    let s3 = snapshot(
        &env,
        &handle,
        Some(s2.manifest_key.clone()),
        Throttle::default(),
    );
    assert_eq!(s3.chunks_read, chunks);
    env.set.shutdown().unwrap();
}

/// A snapshot reads the volume's cache; once catalogued, the change record forgets the
/// chunks it holds. If a power cut then lost writes the host never flushed, those
/// chunks would differ from the snapshot and no later incremental snapshot would store
/// them again. A snapshot makes what it reads durable first, so after the cut the next
/// snapshot still equals the volume.
#[test]
fn a_power_cut_after_a_snapshot_leaves_the_next_snapshot_equal_to_the_volume() {
    let env = env();
    let size = 2 << 20;
    let (media, switch) = bdev::create_nondurable("m", 512, size / 512, 7).unwrap();
    let record = env.root.join("vol1.dirty");
    let (vol, handle) = create_volume("vol1", media, CHUNK, Tracking::Fresh, None).unwrap();
    assert!(handle.keep_dirty_record(&record).unwrap().is_none());
    // Written, never flushed by the host.
    write(&env, &vol, 0, &random(size as usize, 41));
    let s1 = snapshot(&env, &handle, None, Throttle::default());
    handle.compact_dirty_record().unwrap();
    drop((vol, handle));
    switch.cut();
    // The appliance after a crash: no saved tracking, the change record adopted.
    let media = switch.restore().unwrap();
    let (vol, handle) = create_volume("vol1", media, CHUNK, Tracking::AllChanged, None).unwrap();
    let changed = handle.keep_dirty_record(&record).unwrap().unwrap();
    handle.replace_changes(&changed);
    let now = read(&env, &vol, 0, size);
    let s2 = snapshot(
        &env,
        &handle,
        Some(s1.manifest_key.clone()),
        Throttle::default(),
    );
    let (clone, _) = open_clone(&env, &s2.manifest_key, size);
    assert!(
        read(&env, &clone, 0, size) == now,
        "the snapshot after the cut differs from the volume"
    );
    env.set.shutdown().unwrap();
}

#[test]
fn uploads_to_s3_are_pipelined() {
    let env = env();
    let server = s3server::start_server(false);
    let size = 64 << 20;
    let (vol, handle) = fresh_volume(size);
    write(&env, &vol, 0, &random(size as usize, 51));
    let mut opts = options(&env);
    opts.object_bytes = 1 << 20;
    // The store holds the data PUTs until more are at once than 32 MiB of 1 MiB
    // objects allow (each a frame past 1 MiB: 31), or none come for 3 s, whatever
    // the load: 4 uploads at a time (as there were) stop at 4.
    server.faults.gather.store(33, Ordering::SeqCst);
    let (h, r) = (handle.clone(), env.set.handles()[0].clone());
    let config = server.client_config();
    let report = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(config, ex).unwrap();
                snapshot_volume(&store, &r, &h, None, &opts, &Throttle::default())
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    assert_eq!(report.manifest.objects.len(), 64);
    let object = report.data_bytes / 64;
    let cap = ((32 << 20) / object) as u32;
    let most = server.faults.max_concurrent.load(Ordering::SeqCst);
    assert!(
        // The data PUTs, and an index page's PUT beside them at most.
        (cap..=cap + 1).contains(&most),
        "uploads overlapped: at most {most} request(s) at once, {cap} allowed"
    );
    env.set.shutdown().unwrap();
}

#[test]
fn a_snapshot_waits_out_an_object_store_outage() {
    let env = env();
    let server = s3server::start_server(false);
    let size = 4 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 61);
    write(&env, &vol, 0, &data);
    let mut opts = options(&env);
    opts.object_bytes = 1 << 20;
    // 30 consecutive 503s: far more than one request's retries (3), so the outage is
    // outlived only by the snapshot's patience.
    server.faults.unavailable.store(30, Ordering::SeqCst);
    let (h, r) = (handle.clone(), env.set.handles()[0].clone());
    let config = server.client_config();
    let report = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let mut c = config;
                c.retries = 3;
                c.backoff = Duration::from_millis(5);
                let store = ox::store::s3::S3Store::new(c, ex).unwrap();
                snapshot_volume(&store, &r, &h, None, &opts, &Throttle::default()).await
            })
        })
        .unwrap()
        .unwrap();
    assert_eq!(
        server.faults.unavailable.load(Ordering::SeqCst),
        0,
        "the outage happened"
    );
    assert_eq!(report.manifest.stored_chunks, size / CHUNK);
    env.set.shutdown().unwrap();
}

#[test]
fn a_snapshot_dropped_mid_way_releases_the_volume_and_keeps_its_changes() {
    let env = env();
    let size = 8 << 20;
    let (vol, handle) = fresh_volume(size);
    write(&env, &vol, 0, &random(size as usize, 71));
    let (root, h, r, opts) = (
        env.root.clone(),
        handle.clone(),
        env.set.handles()[0].clone(),
        options(&env),
    );
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                let throttle = Throttle::default();
                let mut fut =
                    std::pin::pin!(snapshot_volume(&store, &r, &h, None, &opts, &throttle));
                // Let it start, then abandon it (a timeout, a cancelled request...).
                for _ in 0..20 {
                    let _ = futures_lite::future::poll_once(&mut fut).await;
                }
            })
        })
        .unwrap();
    // It published nothing (it was really abandoned mid-way)...
    let root = env.root.clone();
    let manifests = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                LocalStore::open(root)
                    .unwrap()
                    .list("vol1/ox1/m/")
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    assert!(manifests.is_empty());
    // ...the volume is not stuck, and every chunk is still to be stored.
    let s = snapshot(&env, &handle, None, Throttle::default());
    assert_eq!(s.manifest.stored_chunks, size / CHUNK);
    env.set.shutdown().unwrap();
}

/// A tracked volume on a file with a durable store of copies, as the daemon opens it
/// (after a restart: the snapshot its journal describes is taken up again).
fn durable_volume(
    env: &Env,
    dir: &std::path::Path,
    size: u64,
    journal: &std::path::Path,
) -> (Bdev, VolumeHandle) {
    let mut c = bdev::UringConfig::new("file", dir.join("vol1.img"));
    c.create_size = Some(size);
    c.block_size = Some(512);
    c.direct = false;
    let file = bdev::open_uring(&c).unwrap();
    let (vol, h) = create_volume("vol1", file, CHUNK, Tracking::AllChanged, None).unwrap();
    h.set_preserve_file(&dir.join("vol1.cbw")).unwrap();
    if let Some((j, changed)) = ox::journal::Journal::load(journal, h.chunks()).unwrap() {
        h.resume_snapshot(
            j.token().unwrap(),
            j.next_chunk,
            &changed,
            &env.set.handles()[0],
        )
        .unwrap();
    }
    (vol, h)
}

#[test]
fn a_snapshot_suspended_for_a_restart_continues_with_the_same_point_in_time() {
    cut_short_then_continued(false, false, 1);
}

#[test]
fn a_snapshot_cut_short_by_a_crash_continues_with_the_same_point_in_time() {
    cut_short_then_continued(true, false, 1);
}

#[test]
fn a_snapshot_whose_upload_lease_lapsed_while_stopped_starts_its_upload_over() {
    cut_short_then_continued(true, true, 1);
}

/// As the first two, with two OX cores: chunks are encoded on both, and checkpoints
/// (and the stop's) are at the first chunk not handed over yet.
#[test]
fn a_snapshot_encoded_on_two_cores_continues_after_a_restart_with_the_same_point_in_time() {
    cut_short_then_continued(false, false, 2);
}

#[test]
fn a_snapshot_encoded_on_two_cores_continues_after_a_crash_with_the_same_point_in_time() {
    cut_short_then_continued(true, false, 2);
}

/// A snapshot of a 64 MiB volume that hosts overwrite while it runs is cut short —
/// suspended for a clean stop, or (`crash`) abandoned where it stands after a periodic
/// checkpoint, once hosts have overwritten chunks it had read since — and continued
/// after the volume is reopened as at a restart, with more host writes. With `lapse`,
/// its upload lease is made older than a writer may trust while it is stopped (the
/// appliance down for half a day): what it stored may have been collected, and what
/// it stored before the stop is no longer kept at its point in time, so it is given up
/// and a new snapshot of the volume as it is then is taken, under a new ID.
///
/// On `ox_cores` OX cores. Whatever the stop, no nonce repeats under the snapshot's
/// key (the attempt that continues uses nonce prefixes of its own).
fn cut_short_then_continued(crash: bool, lapse: bool, ox_cores: usize) {
    let env = env_with_cores(ox_cores);
    let local = tempfile::tempdir().unwrap();
    let journal = local.path().join("vol1.snapshot");
    let size = 64 << 20;
    let chunks = size / CHUNK;
    let (vol, handle) = durable_volume(&env, local.path(), size, &journal);
    let before = random(size as usize, 81);
    write(&env, &vol, 0, &before);
    let crash_now = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let run = |h: &VolumeHandle, progress: Arc<ox::snapshot::SnapshotProgress>, rate: u64| {
        let mut opts = options(&env);
        opts.journal = Some(journal.clone());
        opts.progress = progress;
        let throttle = Throttle::new(
            Limit::NONE,
            Limit {
                rate,
                burst: 1 << 20,
            },
        );
        let (root, h, reactor) = (env.root.clone(), h.clone(), env.set.handles()[0].clone());
        let (cores, crash_now) = (Arc::clone(&env.cores), Arc::clone(&crash_now));
        std::thread::spawn(move || {
            cores
                .run(move |_ex| {
                    Box::pin(async move {
                        let store = LocalStore::open(root).unwrap();
                        let mut snap = Box::pin(snapshot_volume(
                            &store, &reactor, &h, None, &opts, &throttle,
                        ));
                        loop {
                            if let Some(r) = futures_lite::future::poll_once(&mut snap).await {
                                return Some(r);
                            }
                            if crash_now.load(Ordering::SeqCst) {
                                // The process dies: nothing of the snapshot runs again,
                                // nothing ends it.
                                std::mem::forget(snap);
                                return None;
                            }
                            async_io::Timer::after(Duration::from_millis(5)).await;
                        }
                    })
                })
                .unwrap()
        })
    };
    // Slow uploads (2 MiB/s): the first periodic checkpoint comes at 5 s, some 250
    // chunks in (of 1,024).
    let progress: Arc<ox::snapshot::SnapshotProgress> = Arc::default();
    let first = run(&handle, Arc::clone(&progress), 2 << 20);
    let covered = || {
        ox::journal::Journal::load(&journal, chunks)
            .ok()
            .flatten()
            .map_or(0, |(j, _)| j.next_chunk)
    };
    let overwrite = |seed: u64, from: u64| {
        let data = random(size as usize, seed);
        for off in (from..size).step_by(1 << 20) {
            write(
                &env,
                &vol,
                off,
                &data[off as usize..(off + (1 << 20)) as usize],
            );
        }
    };
    // Hosts overwrite the upper half while it runs (chunks not read yet are copied).
    overwrite(82, size / 2);
    while covered() == 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    while progress.chunks_done.load(Ordering::Relaxed) < covered() + 16 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Then all of it, now that it has read chunks of the lower half that its journal
    // does not cover yet: those are copied too, because a restart reads them again.
    let at_stop = progress.chunks_done.load(Ordering::Relaxed);
    assert!(at_stop < chunks / 2, "read {at_stop} chunks already");
    overwrite(83, 0);
    if crash {
        crash_now.store(true, Ordering::SeqCst);
        assert!(
            first.join().unwrap().is_none(),
            "it finished before the crash"
        );
        crash_now.store(false, Ordering::SeqCst);
    } else {
        progress.suspend();
        let err = first.join().unwrap().unwrap().unwrap_err();
        assert!(matches!(err, ox::OxError::Suspended(_)), "{err}");
    }
    let resume_at = covered();
    assert!(
        resume_at > 0 && resume_at < chunks,
        "checkpoint at {resume_at}"
    );
    let first = ox::journal::Journal::load(&journal, chunks)
        .unwrap()
        .unwrap()
        .0;
    assert_eq!(first.nonce_prefixes.len(), ox_cores, "a prefix per OX core");
    let snapshot_id = first.snapshot.clone();
    // Its upload lease outlives the stop (the upload goes on at the next start); with
    // `lapse`, it is made as old as a stop of half a day leaves it.
    let lease_of = |id: String| {
        let root = env.root.clone();
        env.cores
            .run(move |_ex| {
                Box::pin(async move {
                    let store = LocalStore::open(root).unwrap();
                    ox::lease::read(&store, "vol1/", &id).await.unwrap()
                })
            })
            .unwrap()
    };
    let held = lease_of(snapshot_id.clone()).expect("the lease outlives the stop");
    if lapse {
        let (root, id) = (env.root.clone(), snapshot_id.clone());
        let then = ox::lease::now_secs() - ox::lease::TRUSTED_S - 1;
        env.cores
            .run(move |_ex| {
                Box::pin(async move {
                    let store = LocalStore::open(root).unwrap();
                    ox::lease::renew(&store, "vol1/", &id, None, held.started, then)
                        .await
                        .unwrap()
                })
            })
            .unwrap();
    }
    drop((vol, handle));
    // The next start: the volume takes the snapshot up again before any host writes,
    // and hosts write once more before it continues.
    let (vol, handle) = durable_volume(&env, local.path(), size, &journal);
    let last = random(size as usize, 84);
    write(&env, &vol, 0, &last);
    let report = run(&handle, Arc::default(), 1 << 30)
        .join()
        .unwrap()
        .unwrap()
        .unwrap();
    eprintln!(
        "crash {crash}: continued from chunk {resume_at} of {chunks} (had read up to {at_stop})"
    );
    if lapse {
        assert_eq!(report.resumed_at, None, "started over");
        assert_ne!(report.manifest.snapshot, snapshot_id, "under a new ID");
    } else {
        assert_eq!(report.resumed_at, Some(resume_at));
        assert_eq!(report.manifest.snapshot, snapshot_id, "the same snapshot");
    }
    assert_eq!(report.manifest.stored_chunks, chunks);
    // Published: no lease is left, the first attempt's nor this one's.
    assert_eq!(lease_of(snapshot_id.clone()), None);
    assert_eq!(lease_of(report.manifest.snapshot.clone()), None);
    // The clone has exactly the image of the moment the snapshot began (with `lapse`,
    // the moment the new one did).
    let (clone, _) = open_clone(&env, &report.manifest_key, size);
    assert!(
        read(&env, &clone, 0, size) == if lapse { last.clone() } else { before },
        "not the point-in-time image"
    );
    assert!(read(&env, &vol, 0, size) == last);
    let (data, pages) = nonces(&env, &report.manifest_key);
    assert_eq!(data.len() as u64, chunks);
    assert_unique(data.iter().map(|(_, n)| n).chain(&pages));
    if !lapse {
        // The frames of the objects the first attempt's journal names were sealed under
        // the prefixes it records (one per OX core); the rest under others.
        for (object, nonce) in &data {
            let recorded = first.nonce_prefixes.contains(&hex::encode(&nonce[..4]));
            assert_eq!(
                first.objects.contains(object),
                recorded,
                "a frame in {object} sealed under a prefix {} by the journal",
                if recorded { "recorded" } else { "not recorded" }
            );
        }
    }
    // What the first attempt stored before its checkpoint is part of the snapshot, not
    // stored again: only the objects it had in flight when it stopped are orphans
    // (starting over orphans every object stored before the checkpoint).
    let (root, kek) = (env.root.clone(), env.kek.clone());
    let orphans = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                ox::snapshot::collect_orphans(&store, "vol1/", &[kek])
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    if lapse {
        assert!(orphans.len() > 8, "{} orphans", orphans.len());
    } else {
        assert!(orphans.len() <= 8, "{} orphans", orphans.len());
    }
    env.set.shutdown().unwrap();
}

#[test]
fn a_hostile_journal_fails_the_snapshot_cleanly_and_releases_the_volume() {
    let env = env();
    // A real journal to start from.
    let (local, journal) = journal_to_take_up(&env, 91);
    let size = TAKEN_UP_BYTES;
    let chunks = size / CHUNK;
    let good = std::fs::read_to_string(&journal).unwrap();
    let good: serde_json::Value = serde_json::from_str(&good).unwrap();
    // One index entry (for chunk 0), in the page layout.
    let entry = |source: u16, object: u32, length: u32| {
        let mut e = vec![0u8; 20];
        e[0] = 1;
        e[2..4].copy_from_slice(&source.to_le_bytes());
        e[4..8].copy_from_slice(&object.to_le_bytes());
        e[16..20].copy_from_slice(&length.to_le_bytes());
        serde_json::Value::from(hex::encode(e))
    };
    let object = serde_json::json!(["vol1/ox1/d/00"]);
    let hostile: Vec<(&str, serde_json::Value)> = vec![
        (
            "page_entries",
            serde_json::json!({ "page_entries": "not hex" }),
        ),
        (
            "page_entries",
            serde_json::json!({ "page_entries": "00".repeat(20) }),
        ),
        ("pages", serde_json::json!({ "pages": u64::MAX })),
        (
            "empty_pages",
            serde_json::json!({ "empty_pages": [[0, 1]], "pages": 0 }),
        ),
        (
            "nonce_prefixes",
            serde_json::json!({ "nonce_prefixes": ["zz"] }),
        ),
        (
            "objects",
            serde_json::json!({ "objects": ["elsewhere/ox1/d/00"] }),
        ),
        (
            "stored_chunks",
            serde_json::json!({ "stored_chunks": 1000, "next_chunk": 0 }),
        ),
        (
            "object",
            serde_json::json!({ "objects": object, "page_entries": entry(0, 7, 100), "next_chunk": 1 }),
        ),
        (
            "source",
            serde_json::json!({ "objects": object, "page_entries": entry(1, 0, 100), "next_chunk": 1 }),
        ),
        (
            "length",
            serde_json::json!({ "objects": object, "page_entries": entry(0, 0, 1 << 30), "next_chunk": 1 }),
        ),
    ];
    for (field, changes) in hostile {
        let mut j = good.clone();
        for (k, v) in changes.as_object().unwrap() {
            j[k] = v.clone();
        }
        let value = changes;
        std::fs::write(&journal, serde_json::to_vec(&j).unwrap()).unwrap();
        // Its upload lease as the stop left it (the case before released it): without
        // one the upload would be given up before its journal is read.
        let (root, id) = (
            env.root.clone(),
            good["snapshot"].as_str().unwrap().to_string(),
        );
        env.cores
            .run(move |_ex| {
                Box::pin(async move {
                    let store = LocalStore::open(root).unwrap();
                    let now = ox::lease::now_secs();
                    ox::lease::renew(&store, "vol1/", &id, None, now, now)
                        .await
                        .unwrap()
                })
            })
            .unwrap();
        let (_vol, handle) = durable_volume(&env, local.path(), size, &journal);
        let mut opts = options(&env);
        opts.journal = Some(journal.clone());
        let err = snapshot_with(&env, &handle, opts.clone()).unwrap_err();
        eprintln!("{field} = {value}: {err}");
        assert!(err.contains("snapshot journal"), "{field}: {err}");
        // The volume is released, the journal gone, and the next snapshot works.
        assert_eq!(handle.snapshot_token(), None, "{field}");
        assert!(!journal.exists(), "{field}");
        let report = snapshot_with(&env, &handle, opts).unwrap();
        assert_eq!(report.manifest.stored_chunks, chunks, "{field}");
        // Leave a journal for the next case to damage.
        std::fs::write(&journal, serde_json::to_vec(&good).unwrap()).unwrap();
    }
    env.set.shutdown().unwrap();
}

/// Runs `snapshot_volume` of `h` over no parent with `opts`, on the OX cores.
fn snapshot_with(
    env: &Env,
    h: &VolumeHandle,
    opts: SnapshotOptions,
) -> Result<ox::snapshot::SnapshotReport, String> {
    let (root, h, reactor) = (env.root.clone(), h.clone(), env.set.handles()[0].clone());
    env.cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root).unwrap();
                snapshot_volume(&store, &reactor, &h, None, &opts, &Throttle::default())
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .unwrap()
}

/// Puts a directory with a file in it where the journal goes: no journal can be saved
/// or removed there.
fn block_journal(journal: &std::path::Path) {
    std::fs::create_dir(journal).unwrap();
    std::fs::write(journal.join("in-the-way"), b"x").unwrap();
}

/// The size of the volumes [`journal_to_take_up`] makes.
const TAKEN_UP_BYTES: u64 = 4 << 20;

/// A durable volume in a new directory, written with `seed`'s data, whose snapshot (over
/// no parent) was suspended as soon as it began: its journal waits for the next open of
/// the volume ([`durable_volume`]) to take it up. Returns the directory and the journal.
fn journal_to_take_up(env: &Env, seed: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let local = tempfile::tempdir().unwrap();
    let journal = local.path().join("vol1.snapshot");
    let (vol, handle) = durable_volume(env, local.path(), TAKEN_UP_BYTES, &journal);
    write(env, &vol, 0, &random(TAKEN_UP_BYTES as usize, seed));
    let progress: Arc<ox::snapshot::SnapshotProgress> = Arc::default();
    progress.suspend();
    let mut opts = options(env);
    opts.journal = Some(journal.clone());
    opts.progress = progress;
    let err = snapshot_with(env, &handle, opts).unwrap_err();
    assert!(err.contains("suspended"), "{err}");
    (local, journal)
}

/// A snapshot taken up at a start whose journal can be neither read nor removed is
/// given up, but stays held (its volume keeps its copies) rather than ending with a
/// journal that might be read at the next start: taken up again then with its copies
/// dropped, it would publish hosts' later writes. No other snapshot begins while it is
/// held; once its journal can be removed, the next request gives it up (as the daemon
/// does), and the snapshot after it stores every chunk.
#[test]
fn a_snapshot_whose_journal_cannot_be_removed_stays_held_until_it_can_be() {
    let env = env();
    let (local, journal) = journal_to_take_up(&env, 95);
    let size = TAKEN_UP_BYTES;
    let chunks = size / CHUNK;
    let (vol, handle) = durable_volume(&env, local.path(), size, &journal);
    let aside = local.path().join("aside");
    std::fs::rename(&journal, &aside).unwrap();
    block_journal(&journal);
    let mut opts = options(&env);
    opts.journal = Some(journal.clone());
    let err = snapshot_with(&env, &handle, opts.clone()).unwrap_err();
    assert!(err.contains("vol1.snapshot"), "{err}");
    assert!(handle.snapshot_token().is_some(), "held");
    // Hosts write on; no other snapshot begins while it is held.
    let now = random(size as usize, 96);
    write(&env, &vol, 0, &now);
    let again = snapshot_with(&env, &handle, opts.clone()).unwrap_err();
    assert!(again.contains("already running"), "{again}");
    let err = ox::snapshot::give_up_held(&handle, &journal).unwrap_err();
    assert!(err.to_string().contains("stays held"), "{err}");
    assert!(handle.snapshot_token().is_some(), "still held");
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::rename(&aside, &journal).unwrap();
    ox::snapshot::give_up_held(&handle, &journal).unwrap();
    assert!(!journal.exists());
    assert_eq!(handle.snapshot_token(), None, "ended");
    assert_eq!(handle.changes().count(), chunks, "its changes given back");
    let report = snapshot_with(&env, &handle, opts).unwrap();
    let (clone, _) = open_clone(&env, &report.manifest_key, size);
    assert!(
        read(&env, &clone, 0, size) == now,
        "the volume as it is now"
    );
    env.set.shutdown().unwrap();
}

/// A snapshot taken up at a start whose job then failed is given up journal first; a
/// journal that cannot be removed leaves it held (copies kept), and once it can be,
/// the snapshot ends and gives its changes back.
#[test]
fn a_snapshot_taken_up_and_given_up_removes_its_journal_before_it_ends() {
    let env = env();
    let (local, journal) = journal_to_take_up(&env, 97);
    let size = TAKEN_UP_BYTES;
    let chunks = size / CHUNK;
    let (_vol, handle) = durable_volume(&env, local.path(), size, &journal);
    assert!(handle.take_resumed().is_some(), "taken up");
    let aside = local.path().join("aside");
    std::fs::rename(&journal, &aside).unwrap();
    block_journal(&journal);
    let err = ox::snapshot::give_up_held(&handle, &journal).unwrap_err();
    assert!(err.to_string().contains("vol1.snapshot"), "{err}");
    assert!(
        handle.snapshot_token().is_some(),
        "held while its journal stays"
    );
    std::fs::remove_dir_all(&journal).unwrap();
    std::fs::rename(&aside, &journal).unwrap();
    ox::snapshot::give_up_held(&handle, &journal).unwrap();
    assert!(!journal.exists());
    assert_eq!(handle.snapshot_token(), None, "ended");
    assert_eq!(handle.changes().count(), chunks, "its changes given back");
    env.set.shutdown().unwrap();
}

/// A basis in memory that records the order chunks are fetched in.
struct Recording {
    image: Vec<u8>,
    order: std::sync::Mutex<Vec<u64>>,
}

impl Basis for Recording {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }

    fn fetch(&self, chunk: u64, _reason: bdev::FetchReason, done: bdev::FetchDone) {
        self.order.lock().unwrap().push(chunk);
        let start = (chunk * CHUNK) as usize;
        let data = self.image[start..start + CHUNK as usize].to_vec();
        std::thread::spawn(move || done(Ok(data)));
    }
}

#[test]
fn thickening_starts_around_recent_misses() {
    let env = env();
    let size = 512 * CHUNK;
    let basis = Arc::new(Recording {
        image: random(size as usize, 81),
        order: std::sync::Mutex::new(Vec::new()),
    });
    let local = create_malloc("l", 512, size / 512, None).unwrap();
    let (clone, h) = create_clone("c", local, Arc::clone(&basis) as Arc<dyn Basis>, None).unwrap();
    // A host reads chunk 400: that neighbourhood is hot.
    read(&env, &clone, 400 * CHUNK, 4096);
    let (hh, r, control) = (
        h.clone(),
        env.set.handles()[0].clone(),
        ox::hydrate::Thickening::new(),
    );
    let fetched = env
        .cores
        .run(move |_ex| {
            Box::pin(async move { ox::hydrate::thicken(&hh, &r, &control).await.unwrap() })
        })
        .unwrap();
    assert_eq!(fetched, 511);
    let order = basis.order.lock().unwrap().clone();
    assert_eq!(order[0], 400, "the client miss came first");
    // The next fetches are the hot neighbourhood (chunks 368..432), not chunk 0.
    assert!(
        order[1..33].iter().all(|c| (368..432).contains(c)),
        "{:?}",
        &order[1..33]
    );
    assert_eq!(h.hydration(), (512, 512));
    env.set.shutdown().unwrap();
}

/// A basis that answers at once, except chunk `held`, whose fetches it keeps until
/// told; it reports every fetch it starts, with its reason.
struct Held {
    held: u64,
    parked: std::sync::Mutex<Vec<bdev::FetchDone>>,
    started: std::sync::mpsc::SyncSender<(u64, bdev::FetchReason)>,
}

impl Basis for Held {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }

    fn fetch(&self, chunk: u64, reason: bdev::FetchReason, done: bdev::FetchDone) {
        let _ = self.started.try_send((chunk, reason));
        if chunk == self.held {
            self.parked.lock().unwrap().push(done);
        } else {
            done(Ok(vec![chunk as u8; CHUNK as usize]));
        }
    }
}

#[test]
fn thickening_goes_on_beside_a_host_waiting_on_a_miss() {
    let env = env();
    let chunks = 512u64;
    let (started, seen) = std::sync::mpsc::sync_channel(4096);
    let basis = Arc::new(Held {
        held: 400,
        parked: std::sync::Mutex::new(Vec::new()),
        started,
    });
    let local = create_malloc("held-local", 512, chunks * CHUNK / 512, None).unwrap();
    let (clone, handle) =
        create_clone("held", local, Arc::clone(&basis) as Arc<dyn Basis>, None).unwrap();
    // A host reads chunk 400: its miss stays in flight until released.
    let host = bdev::blocking::submit_on(
        &env.set.handles()[0],
        &clone,
        bdev::BdevIo::read(400 * CHUNK / 512, 8, vec![bdev::IoBuf::new(4096)]),
    )
    .unwrap();
    assert_eq!(
        seen.recv_timeout(T).unwrap(),
        (400, bdev::FetchReason::ClientMiss)
    );
    assert_eq!(handle.misses_in_flight(), 1);
    // Thickening starts while the host waits, and keeps fetching.
    let control = ox::hydrate::Thickening::new();
    let walker = {
        let (h, r, c) = (
            handle.clone(),
            env.set.handles()[0].clone(),
            Arc::clone(&control),
        );
        let cores = Arc::clone(&env.cores);
        std::thread::spawn(move || {
            cores
                .run(move |_ex| Box::pin(async move { ox::hydrate::thicken(&h, &r, &c).await }))
                .unwrap()
        })
    };
    let mut thickened = 0;
    while thickened < 64 {
        let (_, reason) = seen
            .recv_timeout(T)
            .expect("thickening stalled beside the host");
        if reason == bdev::FetchReason::Thickening {
            thickened += 1;
        }
    }
    assert!(host.try_recv().is_err(), "the host's miss is still held");
    assert_eq!(handle.misses_in_flight(), 1);
    // Released, the host's read completes with its chunk, and the walk finishes.
    for done in basis.parked.lock().unwrap().drain(..) {
        done(Ok(vec![400u16 as u8; CHUNK as usize]));
    }
    let c = host.recv_timeout(T).unwrap();
    assert!(c.result.is_ok());
    assert!(c.data().iter().all(|&b| b == 400u16 as u8));
    let fetched = walker.join().unwrap().unwrap();
    assert_eq!(handle.hydration(), (chunks, chunks));
    assert!(fetched >= chunks - 1, "{fetched}");
    env.set.shutdown().unwrap();
}

#[test]
fn a_snapshot_of_a_volume_adopted_while_it_uploads_publishes_nothing() {
    use ox::bucket::{self, Appliance, VolumeHead};
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (vol, handle) = fresh_volume(8 << 20);
    write(&env, &vol, 0, &random(1 << 20, 5));
    let who = |name: &str| Appliance {
        id: format!("{name}-0000-4000-8000-000000000000"),
        name: name.into(),
    };
    let mut opts = options(&env);
    opts.owner = Some(who("east").id);
    // The last look comes after a read-back of everything stored (however long).
    opts.verify_before_publish = true;
    let head = VolumeHead {
        format: bucket::FORMAT,
        volume: "11".repeat(16),
        name: "vol1".into(),
        volume_bytes: 8 << 20,
        block_size: 512,
        chunk_bytes: CHUNK,
        owner: who("east"),
        since: 1,
        adopted_from: None,
        checksum: String::new(),
    };
    let (h, r) = (handle.clone(), env.set.handles()[0].clone());
    let (published, manifests) = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(config, ex).unwrap();
                bucket::claim(&store, "vol1/", &head).await.unwrap();
                // West adopts the volume after east's snapshot uploaded its data,
                // before east looks at the volume's head one last time to publish.
                let west = who("west");
                let hooked = support::Hooked {
                    inner: &store,
                    at: "ox1/volume",
                    reads: true,
                    hook: std::cell::RefCell::new(Some(Box::pin(async {
                        bucket::adopt(&store, "vol1/", None, &west, 9)
                            .await
                            .unwrap();
                    }))),
                };
                let throttle = Throttle::default();
                let published = snapshot_volume(&hooked, &r, &h, None, &opts, &throttle).await;
                let manifests = store.list("vol1/ox1/m/").await.unwrap();
                (published.map(|_| ()), manifests)
            })
        })
        .unwrap();
    match published {
        Err(ox::OxError::Owned { owner_name, .. }) => assert_eq!(owner_name, "west"),
        other => panic!("published into a volume adopted meanwhile: {other:?}"),
    }
    assert!(manifests.is_empty(), "{manifests:?}");
}

/// Opens the gate when dropped: also when the test fails, so the snapshot it holds
/// finishes and the test ends instead of hanging.
struct Opens(Option<async_channel::Sender<()>>);

impl Drop for Opens {
    fn drop(&mut self) {
        self.0.take();
    }
}

/// While a snapshot waits on its uploads (the store takes none), hosts' writes to every
/// chunk go ahead — those the snapshot has claimed and read ahead of its encoder too —
/// and the snapshot, once the store takes its objects, still holds the volume as it
/// was when it began.
#[test]
fn host_writes_go_ahead_while_a_snapshot_waits_on_its_uploads() {
    let env = env();
    // More than the uploads in flight hold, the object being filled and the read-ahead.
    let size = 48 << 20;
    let (vol, handle, before) = support::filled_volume(&env, size, 91);
    let after = random(size as usize, 92);
    let (open, gate) = async_channel::bounded::<()>(1);
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Incompressible chunks: an object is sealed at 16 frames, just over 1 MiB, and
    // as many sealed objects upload at once as fit in the bytes allowed in flight.
    let object = 16 * (CHUNK as usize + ox::codec::HEADER_LEN + ox::codec::TAG_LEN);
    let in_flight = ox::snapshot::UPLOAD_BYTES_IN_FLIGHT / object;
    let snap = std::thread::scope(|s| {
        let opens = Opens(Some(open));
        let (root, h, r, opts, held_by_store) = (
            env.root.clone(),
            handle.clone(),
            env.set.handles()[0].clone(),
            options(&env),
            Arc::clone(&held),
        );
        let cores = Arc::clone(&env.cores);
        let t = s.spawn(move || {
            cores
                .run(move |_ex| {
                    Box::pin(async move {
                        // Each data PUT counts itself held, then waits for the gate
                        // to open (the channel to close).
                        let store = BeforeDataPuts {
                            inner: LocalStore::open(root).unwrap(),
                            before: move || -> ox::store::BoxFuture<'static, ()> {
                                held_by_store.fetch_add(1, Ordering::SeqCst);
                                let gate = gate.clone();
                                Box::pin(async move {
                                    let _ = gate.recv().await;
                                })
                            },
                        };
                        snapshot_volume(&store, &r, &h, None, &opts, &Throttle::default())
                            .await
                            .unwrap()
                    })
                })
                .unwrap()
        });
        // Every upload the snapshot may have in flight is waiting: it can only wait.
        while held.load(Ordering::SeqCst) < in_flight {
            assert!(
                !t.is_finished(),
                "the snapshot ended while its uploads were held"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Each write fails the test if it is held for the helper's 30 s.
        for (i, piece) in after.chunks(1 << 20).enumerate() {
            write(&env, &vol, (i as u64) << 20, piece);
        }
        drop(opens);
        t.join().unwrap()
    });
    assert_eq!(snap.manifest.stored_chunks, size / CHUNK);
    assert!(read(&env, &vol, 0, size) == after);
    let (clone, _) = open_clone(&env, &snap.manifest_key, size);
    assert!(
        read(&env, &clone, 0, size) == before,
        "the clone differs from the volume as the snapshot began"
    );
    env.set.shutdown().unwrap();
}

thread_local! {
    /// The stores a counting factory made on this thread (an OX core's).
    static MADE: std::cell::RefCell<Vec<std::rc::Weak<dyn ObjectStore>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A basis fetches a host's misses and background fetches through two stores of its own
/// on an OX core (each with its own connections; index pages through the hosts'), and
/// its stores are let go when the basis is dropped.
#[test]
fn a_basis_has_a_store_for_hosts_and_one_for_the_rest_let_go_when_it_is_gone() {
    let env = env();
    let size = 4 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 12);
    write(&env, &vol, 0, &data);
    let s = snapshot(&env, &handle, None, Throttle::default());
    let root = env.root.clone();
    let counting: StoreFactory = Arc::new(move |_ex| {
        let store = Rc::new(LocalStore::open(root.clone())?) as Rc<dyn ObjectStore>;
        MADE.with(|m| m.borrow_mut().push(Rc::downgrade(&store)));
        Ok(store)
    });
    let basis = |name: &str| {
        let loaded = load_snapshot(&env, &s.manifest_key);
        let factory = Arc::clone(&counting);
        ObjectBasis::new(
            loaded,
            factory,
            Arc::clone(&env.cores),
            Throttle::default(),
            name,
        )
    };
    let fetch = |basis: &ObjectBasis, chunk: u64, reason| {
        let (tx, rx) = std::sync::mpsc::channel();
        basis.fetch(chunk, reason, Box::new(move |r| tx.send(r).unwrap()));
        let got = rx.recv_timeout(T).unwrap().unwrap();
        let at = (chunk * CHUNK) as usize;
        assert!(got[..] == data[at..at + CHUNK as usize], "chunk {chunk}");
    };
    // Stores made and still alive, as the OX core sees them.
    let stores = || {
        let (tx, rx) = std::sync::mpsc::channel();
        let [core] = &env.cores.set().all()[..] else {
            panic!("one OX core")
        };
        let job: ox::cores::Job = Box::new(move |_ex| {
            Box::pin(async move {
                let seen = MADE.with(|m| {
                    let m = m.borrow();
                    (m.len(), m.iter().filter(|w| w.strong_count() > 0).count())
                });
                tx.send(seen).unwrap();
            })
        });
        core.submit(job).unwrap();
        rx.recv_timeout(T).unwrap()
    };
    use bdev::FetchReason::{ClientMiss, Prefetch, Thickening};

    let first = basis("first");
    fetch(&first, 0, ClientMiss);
    assert_eq!(stores(), (1, 1), "the hosts' store");
    for (chunk, reason) in [(1, Thickening), (2, Prefetch)] {
        fetch(&first, chunk, reason);
        assert_eq!(stores(), (2, 2), "one store for all background fetches");
    }
    fetch(&first, 3, ClientMiss);
    assert_eq!(stores(), (2, 2), "hosts' misses keep theirs");

    // A basis's last reference may be a fetch task's, dropped after its answer: its
    // stores go once that is, so wait for that (each look is a round trip to the core).
    let stores_become = |want: (usize, usize)| {
        let deadline = std::time::Instant::now() + T;
        loop {
            let seen = stores();
            if seen == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stores {seen:?}, not {want:?}"
            );
        }
    };
    drop(first);
    stores_become((2, 0));
    let second = basis("second");
    fetch(&second, 4, Thickening);
    assert_eq!(
        stores(),
        (4, 2),
        "the second's index page came through its hosts' store"
    );
    drop(second);
    stores_become((4, 0));
    env.set.shutdown().unwrap();
}

/// A snapshot of a volume over a clone that has fetched nothing (its tracking lost, as
/// after a crash) reads every chunk from the store as the appliance's own reads: with
/// the background work, none counted as a host's miss; the snapshot is the image, and
/// the chunks it fetched are the clone's from then on.
#[test]
fn a_snapshot_of_an_unfetched_clone_fetches_as_the_appliances_own_reads() {
    use bdev::FetchReason;

    let env = env();
    let size = 1 << 20;
    let (vol, handle) = fresh_volume(size);
    let data = random(size as usize, 21);
    write(&env, &vol, 0, &data);
    let first = snapshot(&env, &handle, None, Throttle::default());
    let (clone, basis, h) = open_clone_handle(&env, &first.manifest_key, size);
    let (over, over_handle) =
        create_volume("over", clone, CHUNK, Tracking::AllChanged, None).unwrap();
    let again = snapshot(&env, &over_handle, None, Throttle::default());
    assert_clone_is(&env, &again, size, &data);

    // A read within one chunk is answered from the fetched bytes before they are
    // installed: wait for every chunk to be present (asked as background work, which
    // neither fetches again what is on its way nor changes why it was fetched).
    let (tx, rx) = std::sync::mpsc::channel();
    let all: Vec<u64> = (0..size / CHUNK).collect();
    h.fetch_many_on(
        &env.set.handles()[0],
        all,
        FetchReason::Thickening,
        move |r| tx.send(r).unwrap(),
    )
    .unwrap();
    rx.recv_timeout(T).unwrap().unwrap();
    let k = h.counters();
    let by = |why: FetchReason| k.fetched_bytes[why.index()].load(Ordering::SeqCst);
    assert_eq!(by(FetchReason::ClientMiss), 0, "no host read anything");
    assert_eq!(
        by(FetchReason::Thickening),
        0,
        "the snapshot fetched it all"
    );
    assert!(by(FetchReason::Internal) > 0, "the snapshot's own misses");
    assert_eq!(
        by(FetchReason::Internal) + by(FetchReason::Prefetch),
        size,
        "every chunk once: its misses, and read-ahead of them"
    );
    // A host's read of it now needs no store.
    let gets = basis.counters().frame_gets.load(Ordering::SeqCst);
    assert!(read(&env, &over, 0, size) == data);
    assert_eq!(by(FetchReason::ClientMiss), 0);
    assert_eq!(basis.counters().frame_gets.load(Ordering::SeqCst), gets);
    env.set.shutdown().unwrap();
}
