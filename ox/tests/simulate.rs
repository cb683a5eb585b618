//! The whole stack under one seed: a tracked volume on a device with a volatile write
//! cache and its change record on a file system that loses what was never synced;
//! snapshots through the real snapshot writer into the S3 test server while it damages
//! what it carries (5xx, resets, truncated and flipped bodies); clones of those
//! snapshots, each on its own volatile device with its presence record on a volatile
//! file system, read, written and thickened; and power cuts of everything at random
//! points, after which the appliance's way of reopening volumes and clones is followed.
//!
//! Checked throughout: every block of the volume and of every clone reads as its model
//! says (after a cut: one of the versions it could have, sector by sector); every
//! snapshot, read back through a fresh clone, equals the volume at its point — also the
//! first incremental one after a cut; nothing published fails verification.
//!
//! The workload, the faults' choices and the cuts follow the seed (`OX_SIM_SEED`
//! repeats one, `OX_SIM_SEEDS` runs more: `scripts/simulate`); the interleaving of the
//! reactor and OX-core threads does not, so a failure is reproduced by its seed in
//! practice, not by construction.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../bdev/tests/common/mod.rs"]
mod common;
#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use common::{Model, Rng};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::blocking::run_on;
use bdev::{
    Basis, Bdev, BdevIo, CloneHandle, IoBuf, NonDurableMedium, PowerSwitch, Tracking, VolumeHandle,
    create_nondurable, create_volume, open_clone_on,
};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::snapshot::{Loaded, load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use support::{CHUNK, Env, T, env, options};

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = SIZE / BLOCK;

/// A device's model (shared with the power-cut tests) with what the simulation adds.
trait Blocks {
    fn of(image: Vec<Vec<u8>>) -> Self;
    /// Every block as it reads now.
    fn image(&self) -> Vec<Vec<u8>>;
    /// After a cut: what the device holds now is the durable truth.
    fn settle(&mut self, now: Vec<Vec<u8>>);
}

impl Blocks for Model {
    fn of(image: Vec<Vec<u8>>) -> Self {
        Self {
            durable: image,
            since: HashMap::new(),
        }
    }
    fn image(&self) -> Vec<Vec<u8>> {
        (0..BLOCKS).map(|b| self.current(b).to_vec()).collect()
    }
    fn settle(&mut self, now: Vec<Vec<u8>>) {
        self.durable = now;
        self.since.clear();
    }
}

fn s3(config: &S3Config, ex: &Rc<async_executor::LocalExecutor<'static>>) -> S3Store {
    let mut c = config.clone();
    c.retries = 8;
    c.backoff = Duration::from_millis(2);
    c.max_backoff = Duration::from_millis(20);
    S3Store::new(c, Rc::clone(ex)).unwrap()
}

fn read_all(env: &Env, dev: &Bdev) -> Vec<Vec<u8>> {
    (0..BLOCKS)
        .map(|b| {
            let io = BdevIo::read(
                b * BLOCK / 512,
                BLOCK / 512,
                vec![IoBuf::new(BLOCK as usize)],
            );
            let c = run_on(
                &env.set.handles()[(b % 2) as usize % env.set.len()],
                dev,
                io,
                T,
            )
            .unwrap();
            let d = c.data();
            c.result.unwrap();
            d
        })
        .collect()
}

fn io(env: &Env, r: u64, dev: &Bdev, io: BdevIo) -> Result<(), bdev::BdevError> {
    run_on(
        &env.set.handles()[(r % env.set.len() as u64) as usize],
        dev,
        io,
        T,
    )
    .unwrap()
    .result
}

/// A clone under test: its devices, its model, the snapshot it is of.
struct LiveClone {
    dev: Bdev,
    handle: CloneHandle,
    switch: PowerSwitch,
    medium: NonDurableMedium,
    presence: PathBuf,
    key: String,
    model: Model,
}

struct Sim {
    env: Env,
    /// The S3 test server (stopped with the run).
    _server: s3server::Server,
    config: S3Config,
    rng: Rng,
    seed: u64,
    version: u64,
    /// The volume.
    vol: Bdev,
    handle: VolumeHandle,
    vol_switch: PowerSwitch,
    vol_medium: NonDurableMedium,
    model: Model,
    /// Snapshots taken, newest last: (manifest key, image).
    snapshots: Vec<(String, Vec<Vec<u8>>)>,
    clones: Vec<LiveClone>,
    tally: Tally,
}

#[derive(Default, Debug)]
struct Tally {
    host_ops: u64,
    snapshots: u64,
    clones: u64,
    clone_ops: u64,
    thickened: u64,
    cuts: u64,
    blocks_checked: u64,
}

const RECORD: &str = "/state/vol1.dirty";

impl Sim {
    fn new(seed: u64) -> Self {
        let env = env();
        let server = s3server::start_server(false);
        let config = server.client_config();
        let chaos = s3server::Chaos::new(seed, 60);
        *server.faults.chaos.lock().unwrap() = Some(Arc::clone(&chaos));
        let (media, vol_switch) = create_nondurable("vol-media", 512, SIZE / 512, seed).unwrap();
        let vol_medium = NonDurableMedium::new(seed ^ 0x51D);
        let (vol, handle) = create_volume("vol1", media, CHUNK, Tracking::Fresh, None).unwrap();
        assert!(
            handle
                .keep_dirty_record_on(vol_medium.mount(), Path::new(RECORD))
                .unwrap()
                .is_none()
        );
        Self {
            env,
            _server: server,
            config,
            rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            seed,
            version: 0,
            vol,
            handle,
            vol_switch,
            vol_medium,
            model: Model::of(vec![vec![0; BLOCK as usize]; BLOCKS as usize]),
            snapshots: Vec::new(),
            clones: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn data(&mut self) -> Vec<u8> {
        self.version += 1;
        let mut d = vec![0u8; BLOCK as usize];
        for (i, w) in d.chunks_mut(8).enumerate() {
            w.copy_from_slice(&(self.version * 1_000_003 + i as u64).to_le_bytes());
        }
        d
    }

    fn step(&mut self) {
        match self.rng.below(20) {
            0..=7 => self.host_write(),
            8 => {
                let b = self.rng.below(BLOCKS);
                let io_ = BdevIo::read(
                    b * BLOCK / 512,
                    BLOCK / 512,
                    vec![IoBuf::new(BLOCK as usize)],
                );
                let c = run_on(&self.env.set.handles()[0], &self.vol, io_, T).unwrap();
                let got = c.data();
                c.result.unwrap();
                assert!(
                    got == self.model.current(b),
                    "seed {}: volume block {b}",
                    self.seed
                );
                self.tally.host_ops += 1;
            }
            9 => {
                let r = self.rng.next();
                io(&self.env, r, &self.vol, BdevIo::flush()).unwrap();
                self.model.flushed();
                self.tally.host_ops += 1;
            }
            10 | 11 => self.snapshot(),
            12 if !self.snapshots.is_empty() && self.clones.len() < 3 => self.open_clone(),
            13..=15 | 18 | 19 if !self.clones.is_empty() => self.clone_op(),
            16 if !self.clones.is_empty() => self.thicken(),
            17 => self.power_cut(),
            _ => {}
        }
    }

    fn host_write(&mut self) {
        let r = self.rng.next();
        let b = (r >> 8) % BLOCKS;
        let data = self.data();
        let fua = r.is_multiple_of(7);
        let w = BdevIo::write(b * BLOCK / 512, BLOCK / 512, vec![IoBuf::from_slice(&data)])
            .with_fua(fua);
        io(&self.env, r >> 40, &self.vol, w).unwrap();
        self.model.wrote(b, data, fua);
        self.tally.host_ops += 1;
    }

    /// A snapshot as the appliance takes one (incremental on the last), then its
    /// record compacted; checked through a fresh clone against the volume at its point.
    fn snapshot(&mut self) {
        let point = self.model.image();
        let mut opts = options(&self.env);
        opts.object_bytes = 256 << 10;
        opts.verify_before_publish = self.rng.next().is_multiple_of(2);
        let parent = self.snapshots.last().map(|(k, _)| k.clone());
        let (h, r, c, k) = (
            self.handle.clone(),
            self.env.set.handles()[0].clone(),
            self.config.clone(),
            self.env.kek.clone(),
        );
        let report = self
            .env
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = s3(&c, &ex);
                    let parent = match parent {
                        Some(key) => Some(load(&store, &key, &[k]).await?),
                        None => None,
                    };
                    snapshot_volume(&store, &r, &h, parent.as_ref(), &opts, &Throttle::default())
                        .await
                })
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {}: snapshot failed: {e}", self.seed));
        // (The model does not assume the snapshot flushed the volume: if it did not,
        // a cut may lose writes it holds, and the next snapshot is caught differing.)
        self.handle.compact_dirty_record().unwrap();
        // Read back whole through a clone of it.
        let (clone, _) = self.clone_of(&report.manifest_key, "check", None);
        let got = read_all(&self.env, &clone);
        assert!(
            got == point,
            "seed {}: snapshot {} differs from the volume at its point",
            self.seed,
            self.snapshots.len()
        );
        self.tally.blocks_checked += BLOCKS;
        self.snapshots.push((report.manifest_key, point));
        self.tally.snapshots += 1;
    }

    fn loaded(&self, key: &str) -> Loaded {
        let (c, key, k) = (self.config.clone(), key.to_string(), self.env.kek.clone());
        self.env
            .cores
            .run(move |ex| Box::pin(async move { load(&s3(&c, &ex), &key, &[k]).await.unwrap() }))
            .unwrap()
    }

    /// A clone of `key` over `local` (a fresh RAM device if `None`), its presence in
    /// memory (for a throw-away check) or on `record`.
    fn clone_of(
        &self,
        key: &str,
        name: &str,
        record: Option<(Bdev, &NonDurableMedium, &Path)>,
    ) -> (Bdev, CloneHandle) {
        let loaded = self.loaded(key);
        let c = self.config.clone();
        let factory: StoreFactory =
            Arc::new(move |ex| Ok(Rc::new(s3(&c, ex)) as Rc<dyn ObjectStore>));
        let basis = ObjectBasis::new(
            loaded,
            factory,
            Arc::clone(&self.env.cores),
            Throttle::default(),
            name,
        );
        let basis = Arc::new(basis) as Arc<dyn Basis>;
        match record {
            None => {
                let local = bdev::create_malloc(name, 512, SIZE / 512, None).unwrap();
                bdev::create_clone(name, local, basis, None).unwrap()
            }
            Some((local, medium, path)) => open_clone_on(
                medium.mount(),
                name,
                local,
                basis,
                None,
                path,
                self.env.set.handles()[0].clone(),
            )
            .unwrap(),
        }
    }

    fn open_clone(&mut self) {
        let i = self.rng.below(self.snapshots.len() as u64) as usize;
        let (key, image) = self.snapshots[i].clone();
        let n = self.tally.clones;
        let (local, switch) =
            create_nondurable(&format!("clone{n}-local"), 512, SIZE / 512, self.seed ^ n).unwrap();
        let medium = NonDurableMedium::new(self.seed ^ (n << 8));
        let presence = PathBuf::from(format!("/state/clone{n}.presence"));
        let (dev, handle) = self.clone_of(
            &key,
            &format!("clone{n}"),
            Some((local, &medium, &presence)),
        );
        self.clones.push(LiveClone {
            dev,
            handle,
            switch,
            medium,
            presence,
            key,
            model: Model::of(image),
        });
        self.tally.clones += 1;
    }

    fn clone_op(&mut self) {
        let i = self.rng.below(self.clones.len() as u64) as usize;
        let r = self.rng.next();
        let b = (r >> 8) % BLOCKS;
        let data = self.data();
        let c = &mut self.clones[i];
        match r % 4 {
            0 | 1 => {
                let io_ = BdevIo::read(
                    b * BLOCK / 512,
                    BLOCK / 512,
                    vec![IoBuf::new(BLOCK as usize)],
                );
                let done = run_on(
                    &self.env.set.handles()[((r >> 40) % 2) as usize % self.env.set.len()],
                    &c.dev,
                    io_,
                    T,
                )
                .unwrap();
                let got = done.data();
                done.result.unwrap();
                assert!(
                    got == c.model.current(b),
                    "seed {}: clone block {b}",
                    self.seed
                );
            }
            2 => {
                let fua = (r >> 20).is_multiple_of(5);
                let w = BdevIo::write(b * BLOCK / 512, BLOCK / 512, vec![IoBuf::from_slice(&data)])
                    .with_fua(fua);
                io(&self.env, r >> 40, &c.dev, w).unwrap();
                c.model.wrote(b, data, fua);
            }
            _ => {
                io(&self.env, r >> 40, &c.dev, BdevIo::flush()).unwrap();
                c.model.flushed();
            }
        }
        self.tally.clone_ops += 1;
    }

    fn thicken(&mut self) {
        let i = self.rng.below(self.clones.len() as u64) as usize;
        let (h, r) = (
            self.clones[i].handle.clone(),
            self.env.set.handles()[0].clone(),
        );
        let control = ox::hydrate::Thickening::new();
        self.env
            .cores
            .run(move |_ex| Box::pin(async move { ox::hydrate::thicken(&h, &r, &control).await }))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {}: thickening failed: {e}", self.seed));
        let (present, all) = self.clones[i].handle.hydration();
        assert_eq!(present, all, "seed {}: thickened", self.seed);
        self.tally.thickened += 1;
    }

    /// Everything loses power at once; then the appliance's restart: the volume from
    /// its change record (no tracking saved), each clone from its presence record.
    fn power_cut(&mut self) {
        self.vol_switch.cut();
        self.vol_medium.cut();
        for c in &self.clones {
            c.switch.cut();
            c.medium.cut();
        }
        self.tally.cuts += 1;
        // The volume.
        let media = self.vol_switch.restore().unwrap();
        let (vol, handle) =
            create_volume("vol1", media, CHUNK, Tracking::AllChanged, None).unwrap();
        let record = handle
            .keep_dirty_record_on(self.vol_medium.mount(), Path::new(RECORD))
            .unwrap()
            .expect("the change record outlives the cut");
        handle.replace_changes(&record);
        self.vol = vol;
        self.handle = handle;
        let now = read_all(&self.env, &self.vol);
        for (b, got) in now.iter().enumerate() {
            assert!(
                self.model.possible(b as u64, got),
                "seed {}: volume block {b} holds what was never written there",
                self.seed
            );
        }
        self.tally.blocks_checked += BLOCKS;
        self.model.settle(now);
        // The clones.
        let clones = std::mem::take(&mut self.clones);
        for mut c in clones {
            let _ = c.handle.retire();
            drop(c.dev);
            let local = c.switch.restore().unwrap();
            let name = c.presence.display().to_string();
            let (dev, handle) = self.clone_of(&c.key, &name, Some((local, &c.medium, &c.presence)));
            let now = read_all(&self.env, &dev);
            for (b, got) in now.iter().enumerate() {
                assert!(
                    c.model.possible(b as u64, got),
                    "seed {}: clone block {b} holds what was never written there (or \
                     the basis over a written block)",
                    self.seed
                );
            }
            self.tally.blocks_checked += BLOCKS;
            c.model.settle(now);
            c.dev = dev;
            c.handle = handle;
            self.clones.push(c);
        }
    }
}

fn run(seed: u64, steps: u32) -> Tally {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    // The last word: a snapshot after everything equals the volume.
    sim.snapshot();
    sim.env.set.shutdown().unwrap();
    sim.tally
}

#[test]
fn seeded_runs_of_the_whole_stack_keep_every_guarantee() {
    let seeds: Vec<u64> = match std::env::var("OX_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => {
            let n: u64 = std::env::var("OX_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(3);
            (1..=n).collect()
        }
    };
    let steps: u32 = std::env::var("OX_SIM_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let start = Instant::now();
    let mut all = Tally::default();
    for &seed in &seeds {
        println!("simulate: OX_SIM_SEED={seed} OX_SIM_STEPS={steps}");
        let t = run(seed, steps);
        all.host_ops += t.host_ops;
        all.snapshots += t.snapshots;
        all.clones += t.clones;
        all.clone_ops += t.clone_ops;
        all.thickened += t.thickened;
        all.cuts += t.cuts;
        all.blocks_checked += t.blocks_checked;
    }
    let secs = start.elapsed().as_secs_f64();
    let ops = all.host_ops + all.snapshots + all.clone_ops + all.thickened + all.cuts;
    println!(
        "simulate: {} seeds x {steps} steps in {secs:.1} s ({:.0} operations/s): {all:?}",
        seeds.len(),
        ops as f64 / secs
    );
}
