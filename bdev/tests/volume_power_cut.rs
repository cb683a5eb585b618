//! Power cuts under a tracked volume: the volume on a device with a volatile write
//! cache (`create_nondurable`) and its change record on a file system that loses what
//! was never synced (`NonDurableMedium`), both cut at random points of a seeded
//! workload of reads, writes, flushes and snapshots (with writes landing while each
//! snapshot reads, so copy-before-write runs), the volume reopened after each cut as
//! the appliance reopens one after a crash.
//!
//! Checked after every cut: every write acknowledged and then flushed (or written with
//! FUA) is there; and every chunk whose contents differ from the snapshot the record is
//! relative to is on record — otherwise the next incremental snapshot would silently
//! differ from the volume. Checked at every snapshot: it equals the volume at its point.
//!
//! OX_POWER_CUT_SEEDS=N runs more seeds than the CI's.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{
    Bdev, BdevIo, Claim, IoBuf, NonDurableMedium, Tracking, VolumeHandle, create_nondurable,
    create_volume,
};
use reactor::{CoreList, ReactorConfig, ReactorSet};

mod common;
use common::{Model, Rng};

const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = 16;
const SIZE: u64 = CHUNK * CHUNKS;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;
const T: Duration = Duration::from_secs(30);

/// How the snapshots in a run keep (or, to show the check can fail, break) the rule
/// that what a snapshot read is durable on the volume before the record forgets it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Snapshots {
    /// The volume is flushed once the snapshot point is reached.
    Flushed,
    /// Not flushed: a cut may lose writes the snapshot holds.
    Unflushed,
}

struct Volume {
    dev: Bdev,
    handle: VolumeHandle,
}

fn io(set: &ReactorSet, r: u64, dev: &Bdev, io: BdevIo) -> bdev::IoCompletion {
    run_on(&set.handles()[(r % set.len() as u64) as usize], dev, io, T).unwrap()
}

fn read_block(set: &ReactorSet, dev: &Bdev, b: u64) -> bdev::IoCompletion {
    let io_ = BdevIo::read(
        b * BLOCK / 512,
        BLOCK / 512,
        vec![IoBuf::new(BLOCK as usize)],
    );
    io(set, 0, dev, io_)
}

fn chunk_of(image: &[Vec<u8>], c: u64) -> Vec<u8> {
    let per = (CHUNK / BLOCK) as usize;
    image[c as usize * per..(c as usize + 1) * per].concat()
}

/// What one seed did.
#[derive(Default)]
struct Tally {
    cuts: u32,
    snapshots: u32,
    copies: u32,
    blocks_checked: u64,
    chunks_checked: u64,
    record_failed_first: u32,
}

/// One seed: `cuts` power cuts. Returns what it did; panics on a broken guarantee.
fn run(seed: u64, cuts: u32, snapshots: Snapshots) -> Tally {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let record_path = Path::new("/state/vol.dirty");
    let medium = NonDurableMedium::new(seed ^ 0x5EED_F11E);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut local, switch) = create_nondurable("local", 512, SIZE / 512, seed).unwrap();
    let mut model = Model {
        durable: vec![vec![0; BLOCK as usize]; BLOCKS as usize],
        since: HashMap::new(),
    };
    // Each snapshot's image, by id (`None`: the all-zero volume a fresh record is
    // relative to).
    let mut images: HashMap<Option<[u8; 16]>, Vec<Vec<u8>>> = HashMap::new();
    images.insert(None, model.durable.clone());
    let mut base: Option<[u8; 16]> = None;
    let mut tally = Tally::default();
    let mut version = 0u8;
    for cut in 0..=cuts {
        let tracking = if cut == 0 {
            Tracking::Fresh
        } else {
            Tracking::AllChanged
        };
        let (dev, handle) = create_volume("vol", local.clone(), CHUNK, tracking, None).unwrap();
        let record = handle
            .keep_dirty_record_on(medium.mount(), record_path)
            .unwrap();
        let vol = Volume { dev, handle };
        if cut > 0 {
            let record = record.expect("the record outlives every cut");
            let base_image = images
                .get(&record.base)
                .expect("the record is relative to a snapshot taken");
            let mut now = Vec::new();
            for b in 0..BLOCKS {
                let done = read_block(&set, &vol.dev, b);
                let got = done.data();
                done.result.unwrap();
                assert!(
                    model.possible(b, &got),
                    "seed {seed}, cut {cut}: block {b} holds what was never acknowledged there"
                );
                now.push(got);
                tally.blocks_checked += 1;
            }
            for c in 0..CHUNKS {
                assert!(
                    record.contains(c) || chunk_of(&now, c) == chunk_of(base_image, c),
                    "seed {seed}, cut {cut}: chunk {c} differs from the snapshot the \
                     record is relative to, and is not on record"
                );
                tally.chunks_checked += 1;
            }
            vol.handle.replace_changes(&record);
            base = record.base;
            model.durable = now;
            model.since.clear();
        }
        if cut == cuts {
            break;
        }
        // In half the rounds the record's file system fails first, in the middle of an
        // append or a compaction: from then on requests may fail (a failed write may
        // still land), and the round ends at the first that does.
        let fuse = rng.next();
        medium.fail_after(fuse.is_multiple_of(2).then_some((fuse >> 8) % 24));
        let ops = 20 + rng.next() % 60;
        for _ in 0..ops {
            let r = rng.next();
            let result = match r % 12 {
                0..=3 => {
                    let b = (r >> 8) % BLOCKS;
                    let done = read_block(&set, &vol.dev, b);
                    if done.result.is_ok() {
                        assert!(
                            done.data() == model.current(b),
                            "seed {seed}: block {b} reads wrong"
                        );
                    }
                    done.result
                }
                4..=8 => write(&set, &vol, &mut model, &mut rng, &mut version),
                9 => {
                    let result = io(&set, r >> 40, &vol.dev, BdevIo::flush()).result;
                    if result.is_ok() {
                        model.flushed();
                    }
                    result
                }
                _ => snapshot(
                    &set,
                    &vol,
                    &mut model,
                    &mut rng,
                    &mut version,
                    snapshots,
                    &mut images,
                    &mut base,
                    &mut tally,
                ),
            };
            if let Err(e) = result {
                assert!(
                    medium.failed().is_some(),
                    "seed {seed}: a request failed with the power on: {e}"
                );
                break;
            }
        }
        // Writes still in flight when the power goes: each may land, whole or in
        // part, or not at all.
        let in_flight: Vec<_> = (0..rng.next() % 4)
            .map(|_| {
                let r = rng.next();
                let b = (r >> 8) % BLOCKS;
                version = version.wrapping_add(1);
                let data = vec![version; BLOCK as usize];
                let w = BdevIo::write(b * BLOCK / 512, BLOCK / 512, vec![IoBuf::from_slice(&data)]);
                model.since.entry(b).or_default().push(data);
                let on = &set.handles()[((r >> 40) % set.len() as u64) as usize];
                bdev::blocking::submit_on(on, &vol.dev, w).unwrap()
            })
            .collect();
        let blown = medium.failed();
        medium.fail_after(None);
        switch.cut();
        if blown.is_none() {
            medium.cut();
        }
        tally.record_failed_first += u32::from(blown.is_some());
        for rx in in_flight {
            let _ = rx
                .recv_timeout(T)
                .expect("a write in flight at the cut hung");
        }
        drop(vol);
        local = switch.restore().unwrap();
        tally.cuts += 1;
    }
    set.shutdown().unwrap();
    tally
}

/// A write of one block (or, now and then, a whole chunk), some with FUA.
fn write(
    set: &ReactorSet,
    vol: &Volume,
    model: &mut Model,
    rng: &mut Rng,
    version: &mut u8,
) -> Result<(), bdev::BdevError> {
    let r = rng.next();
    *version = version.wrapping_add(1);
    let (first, blocks) = if r.is_multiple_of(7) {
        let c = (r >> 8) % CHUNKS;
        (c * CHUNK / BLOCK, CHUNK / BLOCK)
    } else {
        ((r >> 8) % BLOCKS, 1)
    };
    let fua = r.is_multiple_of(5);
    let data = vec![*version; (blocks * BLOCK) as usize];
    let w = BdevIo::write(
        first * BLOCK / 512,
        blocks * BLOCK / 512,
        vec![IoBuf::from_slice(&data)],
    )
    .with_fua(fua);
    let result = io(set, r >> 40, &vol.dev, w).result;
    for b in first..first + blocks {
        let block = vec![*version; BLOCK as usize];
        match result {
            Ok(()) => model.wrote(b, block, fua),
            Err(_) => model.since.entry(b).or_default().push(block),
        }
    }
    result
}

/// A snapshot as the appliance takes one: begin, wait for the writes that did not
/// see it, (flush), read every changed chunk while writes go on, end, catalogue
/// (the new base), compact the record. Checks that it equals the volume at its point.
#[allow(clippy::too_many_arguments)]
fn snapshot(
    set: &ReactorSet,
    vol: &Volume,
    model: &mut Model,
    rng: &mut Rng,
    version: &mut u8,
    how: Snapshots,
    images: &mut HashMap<Option<[u8; 16]>, Vec<Vec<u8>>>,
    base: &mut Option<[u8; 16]>,
    tally: &mut Tally,
) -> Result<(), bdev::BdevError> {
    let h = &vol.handle;
    let mut changed = futures_lite::future::block_on(h.begin_snapshot(&set.handles()[0])).unwrap();
    futures_lite::future::block_on(h.writes_settle());
    h.settle(&mut changed);
    assert_eq!(
        changed.base, *base,
        "the change set is relative to the last snapshot"
    );
    let point: Vec<Vec<u8>> = (0..BLOCKS).map(|b| model.current(b).to_vec()).collect();
    if how == Snapshots::Flushed {
        let flushed = io(set, 0, &vol.dev, BdevIo::flush()).result;
        if let Err(e) = flushed {
            h.end_snapshot(Some(&changed));
            return Err(e);
        }
        model.flushed();
    }
    let mut image = images[base].clone();
    for c in 0..CHUNKS {
        // A host write lands now and then while the snapshot reads.
        if rng.next().is_multiple_of(3)
            && let Err(e) = write(set, vol, model, rng, version)
        {
            h.end_snapshot(Some(&changed));
            return Err(e);
        }
        if !changed.contains(c) {
            h.skip_chunk(c);
            continue;
        }
        let per = CHUNK / BLOCK;
        let data = match futures_lite::future::block_on(h.claim_chunk(c)) {
            Ok(Claim::Device) => {
                let read = BdevIo::read(
                    c * CHUNK / 512,
                    CHUNK / 512,
                    vec![IoBuf::new(CHUNK as usize)],
                );
                let done = io(set, 0, &vol.dev, read);
                let data = done.data();
                done.result.unwrap();
                h.chunk_read(c);
                data
            }
            Ok(Claim::Copy(data)) => {
                tally.copies += 1;
                data
            }
            Ok(Claim::Saved { .. }) => unreachable!("no store of copies"),
            Err(e) => panic!("the snapshot claims chunk {c}: {e}"),
        };
        for (i, block) in data.chunks(BLOCK as usize).enumerate() {
            image[(c * per) as usize + i] = block.to_vec();
        }
    }
    assert!(
        image == point,
        "the snapshot differs from the volume at its point"
    );
    h.end_snapshot(None);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&rng.next().to_le_bytes());
    id[8..].copy_from_slice(&rng.next().to_le_bytes());
    images.insert(Some(id), image);
    h.set_base(Some(id));
    *base = Some(id);
    tally.snapshots += 1;
    h.compact_dirty_record()
}

#[test]
fn acknowledged_writes_survive_every_power_cut_and_the_record_covers_every_change() {
    let seeds: u64 = std::env::var("OX_POWER_CUT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut all = Tally::default();
    for seed in 1..=seeds {
        let t = run(seed, 8, Snapshots::Flushed);
        all.cuts += t.cuts;
        all.snapshots += t.snapshots;
        all.copies += t.copies;
        all.blocks_checked += t.blocks_checked;
        all.chunks_checked += t.chunks_checked;
        all.record_failed_first += t.record_failed_first;
    }
    println!(
        "{seeds} seeds: {} power cuts ({} with the change record's file system failing \
         first, mid-protocol), {} snapshots ({} chunks from copy-before-write), {} blocks \
         and {} chunks checked after the cuts",
        all.cuts,
        all.record_failed_first,
        all.snapshots,
        all.copies,
        all.blocks_checked,
        all.chunks_checked
    );
}

/// The check can fail: snapshots that do not make what they read durable before the
/// record forgets it leave, after a cut, chunks that differ from the base and are not
/// on record.
#[test]
fn snapshots_that_do_not_flush_are_caught() {
    let caught = (1..=12u64)
        .any(|seed| std::panic::catch_unwind(|| run(seed, 8, Snapshots::Unflushed)).is_err());
    assert!(caught, "unflushed snapshots went unnoticed");
}
