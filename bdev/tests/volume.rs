//! The tracked volume: change tracking, exclusive snapshots, copy-before-write keeping
//! the snapshot point while writes go on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{
    Bdev, BdevIo, Claim, IoBuf, Tracking, UringConfig, VolumeHandle, create_malloc, create_volume,
    open_uring,
};
use reactor::{CoreList, ReactorConfig, ReactorSet};

const CHUNK: u64 = 64 << 10;
const T: Duration = Duration::from_secs(20);

#[test]
fn one_snapshot_at_a_time_and_changes_are_tracked_and_preserved() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (vol, h) = create_volume(
        "v",
        create_malloc("m", 512, (16 * CHUNK) / 512, None).unwrap(),
        CHUNK,
        Tracking::Fresh,
        None,
    )
    .unwrap();
    let write = |lba: u64, byte: u8| {
        let io = BdevIo::write(lba, 8, vec![IoBuf::from_slice(&[byte; 4096])]);
        run_on(&set.handles()[0], &vol, io, T)
            .unwrap()
            .result
            .unwrap();
    };
    write(0, 1);
    write(3 * CHUNK / 512, 1);
    let mut changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert!(
        futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).is_err(),
        "a second snapshot while one runs"
    );
    futures_lite::future::block_on(h.writes_settle());
    assert!(h.writes_settled());
    h.settle(&mut changed);
    assert_eq!(changed.count(), 2);
    assert!(changed.contains(0) && changed.contains(3));
    // A write to chunk 0 during the snapshot: the old contents are kept for it.
    write(0, 2);
    let Ok(Claim::Copy(old)) = futures_lite::future::block_on(h.claim_chunk(0)) else {
        panic!("no copy of chunk 0")
    };
    assert!(old[..4096].iter().all(|&b| b == 1));
    // Chunk 3 is read from the device, then released.
    assert!(matches!(
        futures_lite::future::block_on(h.claim_chunk(3)),
        Ok(Claim::Device)
    ));
    h.chunk_read(3);
    h.end_snapshot(None);
    // The write during the snapshot counts for the next one.
    let next = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert_eq!(next.count(), 1);
    assert!(next.contains(0));
    // A failed snapshot gives its changes back.
    h.end_snapshot(Some(&next));
    let again = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert!(again.contains(0));
    h.end_snapshot(None);
    set.shutdown().unwrap();
}

/// A volume on a file with a durable store of copies, as the daemon opens it.
fn open_durable(dir: &std::path::Path, chunks: u64) -> (Bdev, VolumeHandle) {
    let mut c = UringConfig::new("file", dir.join("v.img"));
    c.create_size = Some(chunks * CHUNK);
    c.block_size = Some(512);
    c.direct = false;
    let file = open_uring(&c).unwrap();
    let (vol, h) = create_volume("v", file, CHUNK, Tracking::AllChanged, None).unwrap();
    h.set_preserve_file(&dir.join("v.cbw")).unwrap();
    (vol, h)
}

/// Writes 4 KiB of `byte` at the start of `chunk`.
fn write_chunk(set: &ReactorSet, vol: &Bdev, chunk: u64, byte: u8) {
    let io = BdevIo::write(
        chunk * CHUNK / 512,
        8,
        vec![IoBuf::from_slice(&[byte; 4096])],
    );
    run_on(&set.handles()[0], vol, io, T)
        .unwrap()
        .result
        .unwrap();
}

/// Writes byte 1 into chunks `0..chunks`, then begins a snapshot: its change set and
/// its token.
fn written_then_snapshot(
    set: &ReactorSet,
    vol: &Bdev,
    h: &VolumeHandle,
    chunks: u64,
) -> (bdev::ChangedChunks, [u8; 16]) {
    for c in 0..chunks {
        write_chunk(set, vol, c, 1);
    }
    let mut changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    h.settle(&mut changed);
    let token = h.snapshot_token().expect("a token while the snapshot runs");
    (changed, token)
}

fn read_all(set: &ReactorSet, dev: &Bdev, lba: u64, blocks: u64) -> Vec<u8> {
    let io = BdevIo::read(lba, blocks, vec![IoBuf::new((blocks * 512) as usize)]);
    let done = run_on(&set.handles()[0], dev, io, T).unwrap();
    done.result.as_ref().unwrap();
    done.data()
}

/// What the snapshot would store for `chunk` (its contents at the snapshot point).
fn snapshot_view(set: &ReactorSet, vol: &Bdev, h: &VolumeHandle, chunk: u64) -> Vec<u8> {
    match futures_lite::future::block_on(h.claim_chunk(chunk)) {
        Ok(Claim::Copy(d)) => d,
        Ok(Claim::Saved {
            dev,
            offset_blocks,
            num_blocks,
        }) => read_all(set, &dev, offset_blocks, num_blocks),
        Ok(Claim::Device) => {
            let d = read_all(set, vol, chunk * CHUNK / 512, CHUNK / 512);
            h.chunk_read(chunk);
            d
        }
        Err(e) => panic!("claiming chunk {chunk}: {e}"),
    }
}

#[test]
fn durable_copies_keep_the_snapshot_point_across_a_crash() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (vol, h) = open_durable(dir.path(), 8);
    let (changed, token) = written_then_snapshot(&set, &vol, &h, 6);
    // The snapshot reads chunks 0 and 1 but its journal covers only chunk 0 when the
    // appliance goes down. Meanwhile hosts overwrite chunks 0 (covered: no copy), 1
    // (read, not covered: a restart reads it again, so it is copied), 2 and 3 (not read
    // yet: copied).
    for c in 0..2 {
        assert_eq!(snapshot_view(&set, &vol, &h, c)[0], 1);
    }
    h.commit_through(1);
    for c in 0..4 {
        write_chunk(&set, &vol, c, 2);
    }
    // A crash: nothing ends the snapshot.
    drop((vol, h));
    set.shutdown().unwrap();

    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (vol, h) = open_durable(dir.path(), 8);
    assert_eq!(
        h.resume_snapshot(token, 1, &changed, &set.handles()[0])
            .unwrap(),
        3,
        "copies of 1, 2 and 3"
    );
    assert!(
        futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).is_err(),
        "the resumed snapshot holds the volume"
    );
    assert_eq!(h.take_resumed(), Some(token));
    assert_eq!(h.take_resumed(), None, "only one party continues it");
    // A host writes chunk 4 after the restart: it is copied before it changes.
    write_chunk(&set, &vol, 4, 3);
    for c in 1..6 {
        let seen = snapshot_view(&set, &vol, &h, c);
        assert!(
            seen[..4096].iter().all(|&b| b == 1),
            "chunk {c} at the snapshot point"
        );
    }
    // The volume itself has every write.
    assert_eq!(read_all(&set, &vol, 2 * CHUNK / 512, 1)[0], 2);
    assert_eq!(read_all(&set, &vol, 4 * CHUNK / 512, 1)[0], 3);
    h.end_snapshot(None);
    // Ended: its copies are gone, so its token finds nothing any more.
    drop((vol, h));
    set.shutdown().unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (_vol, h) = open_durable(dir.path(), 8);
    assert_eq!(
        h.resume_snapshot(token, 0, &changed, &set.handles()[0])
            .unwrap(),
        0
    );
    h.end_snapshot(None);
    set.shutdown().unwrap();
}

#[test]
fn a_torn_or_foreign_copy_is_not_taken_for_a_copy() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (vol, h) = open_durable(dir.path(), 4);
    let (changed, token) = written_then_snapshot(&set, &vol, &h, 4);
    write_chunk(&set, &vol, 1, 2);
    write_chunk(&set, &vol, 2, 2);
    drop((vol, h));
    set.shutdown().unwrap();
    // Tear chunk 2's copy: its last byte never reached the disk.
    let slot = 512 + CHUNK;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("v.cbw"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9], 2 * slot + slot - 1).unwrap();
    drop(f);
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (_vol, h) = open_durable(dir.path(), 4);
    assert_eq!(
        h.resume_snapshot([0xee; 16], 0, &changed, &set.handles()[0])
            .unwrap(),
        0,
        "another snapshot's token"
    );
    // (Not ended: ending would empty the store.)
    drop((_vol, h));
    let (_vol, h) = open_durable(dir.path(), 4);
    assert_eq!(
        h.resume_snapshot(token, 0, &changed, &set.handles()[0])
            .unwrap(),
        1,
        "only chunk 1"
    );
    assert!(matches!(
        futures_lite::future::block_on(h.claim_chunk(1)),
        Ok(Claim::Saved { .. })
    ));
    assert!(matches!(
        futures_lite::future::block_on(h.claim_chunk(2)),
        Ok(Claim::Device)
    ));
    set.shutdown().unwrap();
}

/// The change record: what a crash leaves (no tracking saved) is every chunk written
/// since the base; once a snapshot is catalogued the record drops what that snapshot
/// stored and keeps what was written since it began; a torn record is cut, never read
/// as more or less than was acknowledged.
#[test]
fn the_change_record_survives_a_crash_and_compacts_to_the_new_base() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("v.dirty");
    let media = create_malloc("m", 512, (64 * CHUNK) / 512, None).unwrap();
    let open = |tracking: Tracking| {
        let (vol, h) = create_volume("v", media.clone(), CHUNK, tracking, None).unwrap();
        let kept = h.keep_dirty_record(&record).unwrap();
        (vol, h, kept)
    };
    let write = |vol: &Bdev, chunk: u64| {
        let io = BdevIo::write(chunk * CHUNK / 512, 8, vec![IoBuf::from_slice(&[7; 4096])]);
        run_on(&set.handles()[0], vol, io, T)
            .unwrap()
            .result
            .unwrap();
    };
    let (vol, h, kept) = open(Tracking::Fresh);
    assert!(kept.is_none(), "made now");
    for c in [1, 5, 9] {
        write(&vol, c);
    }
    write(&vol, 5);
    // A crash: nothing saved, everything dropped.
    drop((vol, h));
    let (vol, h, kept) = open(Tracking::AllChanged);
    let kept = kept.expect("the record was there");
    assert_eq!(kept.count(), 3);
    assert!(kept.contains(1) && kept.contains(5) && kept.contains(9));
    assert_eq!(kept.base, None);
    h.replace_changes(&kept);
    // A snapshot begins (taking chunks 1, 5, 9); chunk 20 is written meanwhile; it
    // succeeds and is catalogued as base [3; 16]: the record keeps only chunk 20.
    let changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert_eq!(changed.count(), 3);
    write(&vol, 20);
    h.end_snapshot(None);
    h.set_base(Some([3; 16]));
    h.compact_dirty_record().unwrap();
    write(&vol, 30);
    drop((vol, h));
    let (_vol, h, kept) = open(Tracking::AllChanged);
    let kept = kept.unwrap();
    assert_eq!((kept.count(), kept.base), (2, Some([3; 16])));
    assert!(kept.contains(20) && kept.contains(30));
    drop(h);
    // A torn append (a crash mid-record) is cut off: the chunks before it stay.
    let log = dir.path().join("v.dirty.log");
    let mut bytes = std::fs::read(&log).unwrap();
    bytes.extend_from_slice(&[0x4C, 0x50, 0x58, 0x4F, 9, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&log, &bytes).unwrap();
    let (_vol, h, kept) = open(Tracking::AllChanged);
    assert_eq!(kept.unwrap().count(), 2);
    drop(h);
    // A record whose making a crash cut short (no base written yet) is not taken for
    // one that says nothing changed: it is made again from the tracking given.
    std::fs::remove_file(dir.path().join("v.dirty.base")).unwrap();
    let (_vol, h, kept) = open(Tracking::AllChanged);
    assert!(kept.is_none(), "made again");
    assert_eq!(h.changes().count(), 64);
    drop(h);
    let (_vol, _h, kept) = open(Tracking::Fresh);
    assert_eq!(kept.unwrap().count(), 64, "made from every chunk changed");
    set.shutdown().unwrap();
}

/// A basis that answers only when told: a write waiting on it stays in flight.
struct HeldBasis {
    asked: crossbeam_channel::Sender<bdev::FetchDone>,
}

impl bdev::Basis for HeldBasis {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }
    fn fetch(&self, _chunk: u64, _reason: bdev::FetchReason, done: bdev::FetchDone) {
        let _ = self.asked.send(done);
    }
}

/// A begin waits for the writes each reactor issued before it heard of the snapshot
/// (and takes their chunks), and a reactor that first writes to the volume during the
/// snapshot starts guarded: its write keeps the chunk's old contents for the snapshot.
#[test]
fn a_begin_waits_for_writes_in_flight_and_late_reactors_start_guarded() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    assert!(set.len() >= 2, "needs two reactors");
    let (asked, fetches) = crossbeam_channel::unbounded();
    // The volume over a clone whose partial writes wait for a fetch we hold back.
    let local = create_malloc("m", 512, (8 * CHUNK) / 512, None).unwrap();
    let (clone, _ch) =
        bdev::create_clone("c", local, std::sync::Arc::new(HeldBasis { asked }), None).unwrap();
    let (vol, h) = create_volume("v", clone, CHUNK, Tracking::Fresh, None).unwrap();
    let partial = BdevIo::write(
        (2 * CHUNK + 4096) / 512,
        8,
        vec![IoBuf::from_slice(&[7; 4096])],
    );
    let in_flight = bdev::blocking::submit_on(&set.handles()[1], &vol, partial).unwrap();
    let fetch = fetches
        .recv_timeout(T)
        .expect("the write asks for its chunk");
    let mut changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert!(
        !h.writes_settled(),
        "a write issued before the begin is still in flight"
    );
    fetch(Ok(vec![0; CHUNK as usize]));
    in_flight.recv_timeout(T).unwrap().result.unwrap();
    futures_lite::future::block_on(h.writes_settle());
    h.settle(&mut changed);
    assert!(
        changed.contains(2),
        "the settled write's chunk is in the snapshot"
    );
    // Reactor 0 writes to the volume for the first time, during the snapshot. Chunk 5
    // is absent from the clone: the copy-before-write reads it (a fetch), then writes.
    let late = BdevIo::write(
        5 * CHUNK / 512,
        CHUNK / 512,
        vec![IoBuf::from_slice(&[9; CHUNK as usize])],
    );
    let late = bdev::blocking::submit_on(&set.handles()[0], &vol, late).unwrap();
    fetches
        .recv_timeout(T)
        .expect("the copy reads the old chunk")(Ok(vec![3; CHUNK as usize]));
    late.recv_timeout(T).unwrap().result.unwrap();
    let Ok(Claim::Copy(old)) = futures_lite::future::block_on(h.claim_chunk(5)) else {
        panic!("no copy of chunk 5: the late reactor wrote unguarded")
    };
    assert!(
        old.iter().all(|&b| b == 3),
        "the copy is the chunk before the write"
    );
    h.end_snapshot(None);
    set.shutdown().unwrap();
}

/// A write one snapshot let go ahead that is still on its way to the device when the
/// next begins is waited for by that one, as writes that saw no snapshot are: its
/// chunk was marked in the change set the new snapshot took, so the snapshot must
/// flush and read the chunk after it (else a power cut could take from the volume a
/// write the snapshot holds, in a chunk the change record then drops). The
/// deterministic simulator found this (`sim::volume`, seed 68 before the fix).
#[test]
fn a_write_landing_across_end_and_begin_is_waited_for_by_the_next_snapshot() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let (asked, fetches) = crossbeam_channel::unbounded();
    let local = create_malloc("m", 512, (8 * CHUNK) / 512, None).unwrap();
    let (clone, _ch) =
        bdev::create_clone("c", local, std::sync::Arc::new(HeldBasis { asked }), None).unwrap();
    let (vol, h) = create_volume("v", clone, CHUNK, Tracking::Fresh, None).unwrap();
    let first = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    futures_lite::future::block_on(h.writes_settle());
    // Chunk 2 is not needed by the first snapshot: a write to it passes straight
    // through, guarded, and waits in the clone below for its chunk.
    h.skip_chunk(2);
    let partial = BdevIo::write(
        (2 * CHUNK + 4096) / 512,
        8,
        vec![IoBuf::from_slice(&[7; 4096])],
    );
    let in_flight = bdev::blocking::submit_on(&set.handles()[0], &vol, partial).unwrap();
    let fetch = fetches
        .recv_timeout(T)
        .expect("the write asks for its chunk");
    h.end_snapshot(None);
    let second = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    assert!(
        second.contains(2),
        "the write marked its chunk for the second snapshot"
    );
    // Every reactor has heard the begin once it runs a message sent after it.
    for r in set.handles() {
        r.call(T, || ()).unwrap();
    }
    assert!(
        !h.writes_settled(),
        "the second snapshot waits for the write still landing"
    );
    fetch(Ok(vec![0; CHUNK as usize]));
    in_flight.recv_timeout(T).unwrap().result.unwrap();
    futures_lite::future::block_on(h.writes_settle());
    assert!(h.writes_settled());
    drop(first);
    h.end_snapshot(None);
    set.shutdown().unwrap();
}

/// A write the snapshot held (its chunk copied first) whose leave reaches its reactor
/// only after that snapshot ended, the next began and was catalogued — its chunk
/// dropped from the change record meanwhile — is acknowledged only once the chunk is
/// back on record: else a crash would hide it from every later incremental snapshot.
/// The deterministic simulator found this (`sim::volume`, seed 0 before the fix).
#[test]
fn a_write_let_go_after_the_record_dropped_its_chunk_puts_it_back_first() {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    if set.handles().len() < 2 {
        eprintln!("skipped: needs two reactors");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("v.dirty");
    let media = create_malloc("m", 512, (8 * CHUNK) / 512, None).unwrap();
    let (vol, h) = create_volume("v", media.clone(), CHUNK, Tracking::Fresh, None).unwrap();
    assert!(h.keep_dirty_record(&record).unwrap().is_none());
    let (owner, writer) = (set.handles()[0].clone(), set.handles()[1].clone());
    let write =
        |chunk: u64| BdevIo::write(chunk * CHUNK / 512, 8, vec![IoBuf::from_slice(&[7; 4096])]);
    run_on(&owner, &vol, write(3), T).unwrap().result.unwrap();
    // Snapshot 1 needs chunk 3: a write to it waits for its copy, then for its leave.
    futures_lite::future::block_on(h.begin_snapshot(&owner)).unwrap();
    futures_lite::future::block_on(h.writes_settle());
    // The write starts on the writer's reactor, which then stays busy until told: the
    // write's leave waits in its mail.
    let (done, held) = crossbeam_channel::bounded(1);
    let (started, start) = crossbeam_channel::bounded(1);
    let (go, wait) = crossbeam_channel::bounded::<()>(0);
    let v = vol.clone();
    writer
        .send(move || {
            v.channel().unwrap().submit(write(3), move |c| {
                let _ = done.send(c);
            });
            let _ = started.send(());
            let _ = wait.recv();
        })
        .unwrap();
    start.recv_timeout(T).unwrap();
    // Snapshot 1 ends; snapshot 2 begins (taking chunk 3's mark), is catalogued and
    // drops chunk 3 from the record; the write has not landed.
    h.end_snapshot(None);
    futures_lite::future::block_on(h.begin_snapshot(&owner)).unwrap();
    h.end_snapshot(None);
    h.set_base(Some([2; 16]));
    h.compact_dirty_record().unwrap();
    go.send(()).unwrap();
    held.recv_timeout(T).unwrap().result.unwrap();
    // What a crash now leaves on record.
    drop((vol, h));
    let (_vol, h) = create_volume("v", media, CHUNK, Tracking::AllChanged, None).unwrap();
    let kept = h.keep_dirty_record(&record).unwrap().expect("the record");
    assert_eq!(kept.base, Some([2; 16]));
    assert!(
        kept.contains(3),
        "the write is acknowledged off the change record"
    );
    set.shutdown().unwrap();
}
