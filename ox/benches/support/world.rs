//! What the clone benches share: reactors, an OX core and an S3 store; loading a
//! snapshot, a cold clone of it over RAM, timed and sequential reads, a thickening walk.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::blocking::{run_on, submit_on};
use bdev::{Basis, Bdev, BdevIo, CloneHandle, IoBuf, create_clone, create_malloc};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::cores::OxCores;
use ox::hydrate::{Thickening, thicken};
use ox::keys::Kek;
use ox::snapshot::{Loaded, load};
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use reactor::{ReactorHandle, ReactorSet};

/// How long a bench waits for any one I/O.
pub const T: Duration = Duration::from_secs(120);

pub struct World {
    pub set: ReactorSet,
    pub cores: Arc<OxCores>,
    pub config: S3Config,
    pub kek: Kek,
    /// Volume size.
    pub size: u64,
}

impl World {
    /// Reactors on every core, one OX core, a fresh key, over the store of `config`,
    /// for volumes of `size` bytes.
    pub fn start(config: S3Config, size: u64) -> Self {
        Self::start_idle(config, size, reactor::IdlePolicy::default())
    }

    /// The same with reactors that idle as `idle` says.
    pub fn start_idle(config: S3Config, size: u64, idle: reactor::IdlePolicy) -> Self {
        use reactor::{CoreList, ReactorConfig};
        let reactors = ReactorConfig::new(CoreList::all_available().unwrap()).with_idle(idle);
        Self {
            set: ReactorSet::start(reactors).unwrap(),
            cores: Arc::new(OxCores::start(&[None], 256).unwrap()),
            config,
            kek: Kek::new("bench", ox::keys::SecretKey::random().unwrap()),
            size,
        }
    }

    /// Laid out as the appliance image lays out a small machine: reactors on every core
    /// but the last, one OX core pinned to the last (on two cores, 1 + 1; on one, both
    /// on it; the image gives larger machines a quarter of their cores). Where reactors
    /// run on every core, a thread one of them wakes (the OX core given a miss, this
    /// bench's thread given a completion) may wait out the reactor's 1 ms of polling
    /// before the scheduler lets it run: the image's layout has no such wait.
    #[allow(dead_code)]
    pub fn start_split(config: S3Config, size: u64) -> Self {
        use reactor::{CoreList, ReactorConfig};
        let cores = CoreList::available();
        let (last, rest) = cores.split_last().expect("a core");
        let reactors = if rest.is_empty() { &cores[..] } else { rest };
        Self {
            set: ReactorSet::start(ReactorConfig::new(CoreList::from_cores(reactors).unwrap()))
                .unwrap(),
            cores: Arc::new(OxCores::start(&[Some(*last)], 256).unwrap()),
            config,
            kek: Kek::new("bench", ox::keys::SecretKey::random().unwrap()),
            size,
        }
    }

    /// The same with `n` OX cores (unpinned) in place of one.
    #[allow(dead_code)]
    pub fn with_ox_cores(mut self, n: usize) -> Self {
        self.cores = Arc::new(OxCores::start(&vec![None; n.max(1)], 256).unwrap());
        self
    }

    /// A tracked volume of `size` bytes over RAM (64 KiB chunks), each MiB `i` of it
    /// written with `mib(i)` through reactor 0.
    pub fn volume(&self, mut mib: impl FnMut(u64) -> Vec<u8>) -> (Bdev, bdev::VolumeHandle) {
        let (vol, vh) = bdev::create_volume(
            "vol",
            create_malloc("m", 512, self.size / 512, None).unwrap(),
            64 << 10,
            bdev::Tracking::Fresh,
            None,
        )
        .unwrap();
        for i in 0..self.size.div_ceil(1 << 20) {
            let piece = mib(i);
            let io = BdevIo::write(
                i << 11,
                piece.len() as u64 / 512,
                vec![IoBuf::from_slice(&piece)],
            );
            run_on(&self.on(0), &vol, io, T).unwrap().result.unwrap();
        }
        (vol, vh)
    }

    pub fn on(&self, i: usize) -> ReactorHandle {
        self.set.handles()[i].clone()
    }

    pub fn load(&self, key: &str) -> Loaded {
        let (c, key, k) = (self.config.clone(), key.to_string(), self.kek.clone());
        self.cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = S3Store::new(c, ex).unwrap();
                    load(&store, &key, &[k]).await.unwrap()
                })
            })
            .unwrap()
    }

    /// A cold clone `n` of `loaded` over a fresh RAM copy. `allocated`: the copy is
    /// written through first, as a disk already there (a RAM device allocates its huge
    /// pages on first write, a few ms each, which a miss would otherwise pay).
    pub fn clone_of(
        &self,
        loaded: Loaded,
        n: usize,
        throttle: Throttle,
        allocated: bool,
    ) -> (Bdev, CloneHandle, ObjectBasis) {
        let c = self.config.clone();
        let factory: StoreFactory = Arc::new(move |ex| {
            Ok(Rc::new(S3Store::new(c.clone(), Rc::clone(ex))?) as Rc<dyn ObjectStore>)
        });
        let basis = ObjectBasis::new(loaded, factory, Arc::clone(&self.cores), throttle, "c");
        let local = create_malloc(&format!("local{n}"), 512, self.size / 512, None).unwrap();
        if allocated {
            let zeroes = vec![0u8; 1 << 20];
            for at in (0..self.size).step_by(1 << 20) {
                let io = BdevIo::write(at / 512, 2048, vec![IoBuf::from_slice(&zeroes)]);
                run_on(&self.on(0), &local, io, T).unwrap().result.unwrap();
            }
        }
        let (dev, handle) = create_clone(
            &format!("clone{n}"),
            local,
            Arc::new(basis.clone()) as Arc<dyn Basis>,
            None,
        )
        .unwrap();
        (dev, handle, basis)
    }

    /// Reads `len` bytes at `off` on reactor 0 and returns how long it took.
    pub fn timed_read(&self, dev: &Bdev, off: u64, len: u64) -> Duration {
        self.timed_read_both(dev, off, len).0
    }

    /// [`Self::timed_read`], and how long until the reactor completed it: where an
    /// NVMe/TCP target sends its answer. The rest is this thread's wake-up (see
    /// [`Self::start_split`]).
    pub fn timed_read_both(&self, dev: &Bdev, off: u64, len: u64) -> (Duration, Duration) {
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let dev = dev.clone();
        let io = BdevIo::read(off / 512, len / 512, vec![IoBuf::new(len as usize)]);
        self.on(0)
            .send(move || match dev.channel() {
                Ok(channel) => channel.submit(io, move |c| {
                    let _ = tx.send((c, Instant::now()));
                }),
                Err(e) => {
                    let _ = tx.send((bdev::IoCompletion::err(io.bufs, e), Instant::now()));
                }
            })
            .unwrap();
        let (c, completed) = rx.recv_timeout(T).unwrap();
        c.result.unwrap();
        (start.elapsed(), completed.duration_since(start))
    }

    /// Reads the whole device in `req`-byte requests, `depth` in flight.
    pub fn sequential(&self, dev: &Bdev, req: u64, depth: usize) -> Duration {
        let start = Instant::now();
        let mut next = 0u64;
        let mut inflight = std::collections::VecDeque::new();
        // Each read's buffer is the next one's: the host's side costs a copy, not an
        // allocation too, as a host with registered buffers.
        let mut spare: Vec<Vec<IoBuf>> = Vec::new();
        // With `OX_TRACE` set: when each 16 MiB was read, to see how the rate ramps.
        let trace = std::env::var_os("OX_TRACE").is_some();
        let (mut done_bytes, mut marks) = (0u64, Vec::new());
        while next < self.size || !inflight.is_empty() {
            while inflight.len() < depth && next < self.size {
                let bufs = spare
                    .pop()
                    .unwrap_or_else(|| vec![IoBuf::new(req as usize)]);
                let io = BdevIo::read(next / 512, req / 512, bufs);
                inflight.push_back(submit_on(&self.on(0), dev, io).unwrap());
                next += req;
            }
            let rx = inflight.pop_front().unwrap();
            let done = rx.recv_timeout(T).unwrap();
            done.result.unwrap();
            spare.push(done.bufs);
            done_bytes += req;
            if trace && done_bytes >= (marks.len() as u64 + 1) * (16 << 20) {
                marks.push(start.elapsed());
            }
        }
        if trace {
            let mut last = Duration::ZERO;
            let steps: Vec<String> = marks
                .iter()
                .map(|&t| {
                    let rate = 16.0 * 1048576.0 / (t - last).as_secs_f64() / 1e6;
                    last = t;
                    format!("{:.0}ms:{rate:.0}", t.as_secs_f64() * 1e3)
                })
                .collect();
            println!("16 MiB steps (ms:MB/s): {}", steps.join(" "));
        }
        start.elapsed()
    }

    /// Runs a thickening walk (through reactor `on`) on an OX core in the background.
    pub fn thicken(
        &self,
        handle: &CloneHandle,
        control: &Arc<Thickening>,
        on: usize,
    ) -> std::thread::JoinHandle<u64> {
        let (h, r, c, cores) = (
            handle.clone(),
            self.on(on),
            Arc::clone(control),
            Arc::clone(&self.cores),
        );
        std::thread::spawn(move || {
            cores
                .run(move |_ex| Box::pin(async move { thicken(&h, &r, &c).await.unwrap() }))
                .unwrap()
        })
    }
}
