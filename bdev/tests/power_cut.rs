//! Power cuts under a clone: its local copy on a device with a volatile write cache
//! (`create_nondurable`) and its presence record on a file system that loses what was
//! never synced (`NonDurableMedium`), both cut at random points of a seeded workload,
//! the clone reopened from what survived after each cut.
//! Every write acknowledged and then flushed (or written with FUA) must be there; every
//! other sector must read as one of the versions it could have (never the basis over a
//! written sector, never zeroes where the basis has data).
//!
//! OX_POWER_CUT_SEEDS=N runs more seeds than the CI's.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{
    Basis, Bdev, BdevIo, FetchDone, FetchReason, IoBuf, NonDurableMedium, create_nondurable,
    open_clone_on,
};
use reactor::{CoreList, ReactorConfig, ReactorSet};

mod common;
use common::{Model, Rng};

const CHUNK: u64 = 64 << 10;
const CHUNKS: u64 = 16;
const SIZE: u64 = CHUNK * CHUNKS;
const BLOCK: u64 = 4096;
const T: Duration = Duration::from_secs(30);

struct Image(Vec<u8>);

impl Basis for Image {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }
    fn fetch(&self, chunk: u64, _reason: FetchReason, done: FetchDone) {
        let at = (chunk * CHUNK) as usize;
        done(Ok(self.0[at..at + CHUNK as usize].to_vec()));
    }
    fn size_bytes(&self) -> Option<u64> {
        Some(SIZE)
    }
}

/// Runs `io` from a reactor picked by `r` (the owner, or another: both paths run).
fn io_on(set: &ReactorSet, r: u64, dev: &Bdev, io: BdevIo) -> bdev::IoCompletion {
    run_on(&set.handles()[(r % set.len() as u64) as usize], dev, io, T).unwrap()
}

fn io(set: &ReactorSet, dev: &Bdev, io: BdevIo) -> bdev::IoCompletion {
    io_on(set, 0, dev, io)
}

/// One seed: `cuts` power cuts, each after a random run of reads, writes (some FUA,
/// some of whole chunks) and flushes, on a drive and a file system that keep their
/// word about flushes and syncs or (`lying`) one of them does not. Returns (cuts,
/// blocks checked, cuts that tore the presence record's files or lost a name of them,
/// cuts where the record's file system failed first).
fn run(seed: u64, cuts: u32, lying: Lying) -> (u32, u64, u32, u32) {
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let presence = std::path::Path::new("/state/clone.presence");
    let medium = NonDurableMedium::new(seed ^ 0x0BAD_5EED);
    medium.lie_about_syncs(lying == Lying::FileSystem);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let image: Vec<u8> = (0..SIZE)
        .map(|i| (i as u8).wrapping_mul(7) ^ 0x5A)
        .collect();
    let basis = Arc::new(Image(image.clone()));
    let blocks = SIZE / BLOCK;
    let mut model = Model {
        durable: image.chunks(BLOCK as usize).map(<[u8]>::to_vec).collect(),
        since: HashMap::new(),
    };
    let (mut local, switch) = create_nondurable("local", 512, SIZE / 512, seed).unwrap();
    switch.lie_about_flushes(lying == Lying::Drive);
    let mut checked = 0u64;
    let mut torn = 0u32;
    let mut failed_first = 0u32;
    let mut version = 0u8;
    for cut in 0..=cuts {
        let (clone, handle) = open_clone_on(
            medium.mount(),
            "clone",
            local.clone(),
            Arc::clone(&basis) as Arc<dyn Basis>,
            None,
            presence,
            set.handles()[0].clone(),
        )
        .unwrap();
        // After a cut: everything must be one of its possible versions, and is from now on
        // the durable truth.
        if cut > 0 {
            for b in 0..blocks {
                let done = io(
                    &set,
                    &clone,
                    BdevIo::read(
                        b * BLOCK / 512,
                        BLOCK / 512,
                        vec![IoBuf::new(BLOCK as usize)],
                    ),
                );
                let got = done.data();
                done.result.unwrap();
                assert!(
                    model.possible(b, &got),
                    "seed {seed}, cut {cut}: block {b} holds what was never acknowledged there"
                );
                model.durable[b as usize] = got;
                checked += 1;
            }
            model.since.clear();
        }
        if cut == cuts {
            break;
        }
        // The record's file system may fail first, in the middle of an append: from
        // then on requests may fail (and a failed write may still land), and the
        // round ends at the first that does.
        medium.fail_after(Some(rng.next() % 12));
        let ops = 20 + rng.next() % 60;
        for _ in 0..ops {
            let r = rng.next();
            let result = match r % 10 {
                0..=3 => {
                    let b = (r >> 8) % blocks;
                    let done = io(
                        &set,
                        &clone,
                        BdevIo::read(
                            b * BLOCK / 512,
                            BLOCK / 512,
                            vec![IoBuf::new(BLOCK as usize)],
                        ),
                    );
                    let got = done.data();
                    if done.result.is_ok() {
                        assert!(
                            got == model.current(b),
                            "seed {seed}: block {b} reads wrong"
                        );
                    }
                    done.result
                }
                4..=7 => {
                    let b = (r >> 8) % blocks;
                    version = version.wrapping_add(1);
                    let data = vec![version; BLOCK as usize];
                    let fua = r.is_multiple_of(5);
                    let w =
                        BdevIo::write(b * BLOCK / 512, BLOCK / 512, vec![IoBuf::from_slice(&data)])
                            .with_fua(fua);
                    let result = io_on(&set, r >> 40, &clone, w).result;
                    match result {
                        Ok(()) => model.wrote(b, data, fua),
                        Err(_) => model.since.entry(b).or_default().push(data),
                    }
                    result
                }
                8 => {
                    // A whole chunk: claimed by the write, never fetched.
                    let c = (r >> 8) % CHUNKS;
                    version = version.wrapping_add(1);
                    let data = vec![version; CHUNK as usize];
                    let w =
                        BdevIo::write(c * CHUNK / 512, CHUNK / 512, vec![IoBuf::from_slice(&data)]);
                    let result = io_on(&set, r >> 40, &clone, w).result;
                    for b in c * CHUNK / BLOCK..(c + 1) * CHUNK / BLOCK {
                        model.wrote(b, vec![version; BLOCK as usize], false);
                    }
                    result
                }
                _ => {
                    let result = io(&set, &clone, BdevIo::flush()).result;
                    if result.is_ok() {
                        model.flushed();
                    }
                    result
                }
            };
            if let Err(e) = result {
                assert!(
                    medium.failed().is_some(),
                    "seed {seed}: a request failed with the power on: {e}"
                );
                break;
            }
        }
        // Writes still in flight when the power goes: each may land, whole or in part,
        // or not at all, acknowledged or not.
        let in_flight: Vec<_> = (0..rng.next() % 4)
            .map(|_| {
                let r = rng.next();
                let b = (r >> 8) % blocks;
                version = version.wrapping_add(1);
                let data = vec![version; BLOCK as usize];
                let w = BdevIo::write(b * BLOCK / 512, BLOCK / 512, vec![IoBuf::from_slice(&data)]);
                model.since.entry(b).or_default().push(data);
                let on = &set.handles()[((r >> 40) % set.len() as u64) as usize];
                bdev::blocking::submit_on(on, &clone, w).unwrap()
            })
            .collect();
        let blown = medium.failed();
        medium.fail_after(None);
        switch.cut();
        let m = blown.unwrap_or_else(|| medium.cut());
        failed_first += u32::from(blown.is_some());
        torn += u32::from(m.files_torn + m.names_lost > 0);
        for rx in in_flight {
            let _ = rx
                .recv_timeout(T)
                .expect("a write in flight at the cut hung");
        }
        // Nothing more reaches the old clone's record; the new one takes it over.
        handle.retire().unwrap();
        drop((clone, handle));
        local = switch.restore().unwrap();
    }
    set.shutdown().unwrap();
    (cuts, checked, torn, failed_first)
}

#[test]
fn acknowledged_and_flushed_writes_survive_every_power_cut_and_nothing_is_fetched_over_them() {
    let seeds: u64 = std::env::var("OX_POWER_CUT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let (mut cuts, mut checked, mut torn, mut first) = (0, 0, 0, 0);
    for seed in 1..=seeds {
        let (c, k, t, f) = run(seed, 8, Lying::No);
        cuts += c;
        checked += k;
        torn += t;
        first += f;
    }
    println!(
        "{seeds} seeds: {cuts} power cuts ({first} with the presence record's file system \
         failing first, mid-protocol; {torn} tore its unsynced files or names), {checked} \
         blocks checked after them"
    );
}

/// The check can fail: on a drive that acknowledges flushes without doing them (as
/// some do), a cut loses writes the host was told were durable, and the test says so.
#[test]
fn a_drive_that_lies_about_flushes_is_caught() {
    let caught =
        (1..=12u64).any(|seed| std::panic::catch_unwind(|| run(seed, 8, Lying::Drive)).is_err());
    assert!(caught, "a lying drive went unnoticed");
}

/// Likewise for the presence record: on a file system whose syncs do nothing, a cut
/// loses records of chunks written, and the reopened clone fetches over them.
#[test]
fn a_file_system_that_lies_about_syncs_is_caught() {
    let caught = (1..=12u64)
        .any(|seed| std::panic::catch_unwind(|| run(seed, 8, Lying::FileSystem)).is_err());
    assert!(caught, "a lying file system went unnoticed");
}

/// Which part, if any, acknowledges durability it did not provide.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lying {
    No,
    Drive,
    FileSystem,
}
