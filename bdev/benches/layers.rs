//! What the volume and clone layers cost where the CPU is the limit: 4 KiB random reads
//! and writes at queue depth 32 on one reactor, on a tracked volume (no snapshot
//! running), a hydrated clone and a hydrated clone that keeps a presence journal (as
//! the daemon runs clones), each side by side with the RAM device (`malloc`) beneath
//! it — the same memory, so the difference is the layer. The load is generated on the
//! reactor itself, so every cycle counted is the device stack's. Rounds alternate the
//! two; each figure is the median over rounds.
//!
//! Prints IOPS and the reactor thread's CPU time per I/O of both, and layer / RAM.
//! Then the clone's miss path: cold 4 KiB reads at QD 1 of a clone whose basis answers
//! at once from another thread, over a file-backed local copy (so the figure is the clone's own cost: hops, install,
//! answer), beside the same reads once the chunks are present.
//!
//! cargo bench -p bdev --bench layers -- [--ops 2000000] [--rounds 5]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::{
    Basis, Bdev, BdevIo, Channel, FetchDone, FetchReason, IoBuf, Tracking, UringConfig,
    create_clone, create_malloc, create_volume, open_clone, open_uring,
};
use crossbeam_channel::Sender;
use reactor::{CoreList, ReactorConfig, ReactorHandle, ReactorSet};

const CHUNK: u64 = 64 << 10;
const SIZE: u64 = 64 << 20;
const BLOCK: u32 = 512;
const QD: usize = 32;

/// A basis of zeroes: the clones are hydrated from it before measuring.
struct Zeroes;

impl Basis for Zeroes {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }
    fn fetch(&self, _chunk: u64, _reason: FetchReason, done: FetchDone) {
        done(Ok(vec![0; CHUNK as usize]));
    }
    fn size_bytes(&self) -> Option<u64> {
        Some(SIZE)
    }
}

/// A basis on its own thread (as an OX core is), answering at once from memory: what
/// a miss costs the clone itself, without any store's latency.
struct Courier {
    tx: Sender<(u64, FetchDone)>,
}

impl Courier {
    fn start() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded::<(u64, FetchDone)>();
        std::thread::spawn(move || {
            for (chunk, done) in rx {
                done(Ok(vec![chunk as u8; CHUNK as usize]));
            }
        });
        Self { tx }
    }
}

impl Basis for Courier {
    fn chunk_bytes(&self) -> u64 {
        CHUNK
    }
    fn fetch(&self, chunk: u64, _reason: FetchReason, done: FetchDone) {
        let _ = self.tx.send((chunk, done));
    }
    fn size_bytes(&self) -> Option<u64> {
        Some(SIZE)
    }
}

/// Latencies of 4 KiB reads at QD 1 from a thread, one in each chunk: (p50, p99) µs.
fn qd1_reads(on: &ReactorHandle, dev: &Bdev) -> (f64, f64) {
    let chunks = SIZE / CHUNK;
    let mut lat: Vec<f64> = (0..chunks)
        .map(|c| {
            let io = BdevIo::read(c * CHUNK / u64::from(BLOCK) + 8, 8, vec![IoBuf::new(4096)]);
            let t = Instant::now();
            let done = bdev::blocking::run_on(on, dev, io, Duration::from_secs(30)).unwrap();
            done.result.unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A closed-loop load on one reactor: every completion issues the next request.
struct Load {
    channel: Rc<Channel>,
    write: bool,
    ops: u64,
    issued: Cell<u64>,
    done: Cell<u64>,
    rng: Cell<u64>,
    start: (Instant, Duration),
    /// Where (wall, CPU) goes when the last request completes.
    result: Cell<Option<Sender<(Duration, Duration)>>>,
}

impl Load {
    fn issue(self: &Rc<Self>, buf: IoBuf) {
        if self.issued.get() == self.ops {
            return;
        }
        self.issued.set(self.issued.get() + 1);
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        let lba = (x % (SIZE / 4096)) * (4096 / u64::from(BLOCK));
        let blocks = 4096 / u64::from(BLOCK);
        let io = if self.write {
            BdevIo::write(lba, blocks, vec![buf])
        } else {
            BdevIo::read(lba, blocks, vec![buf])
        };
        let this = Rc::clone(self);
        self.channel.submit(io, move |c| {
            c.result.unwrap();
            this.done.set(this.done.get() + 1);
            if this.done.get() == this.ops {
                if let Some(tx) = this.result.take() {
                    let _ = tx.send((this.start.0.elapsed(), thread_cpu() - this.start.1));
                }
                return;
            }
            let buf = c.bufs.into_iter().next().unwrap();
            this.issue(buf);
        });
    }
}

/// Runs `ops` random 4 KiB I/Os at QD 32 on `dev` from reactor `on`; returns (wall, cpu).
fn run(on: &ReactorHandle, dev: &Bdev, write: bool, ops: u64) -> (Duration, Duration) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let dev = dev.clone();
    on.send(move || {
        let load = Rc::new(Load {
            channel: dev.channel().unwrap(),
            write,
            ops,
            issued: Cell::new(0),
            done: Cell::new(0),
            rng: Cell::new(0x9E37_79B9_7F4A_7C15),
            start: (Instant::now(), thread_cpu()),
            result: Cell::new(Some(tx)),
        });
        for _ in 0..QD {
            load.issue(IoBuf::new(4096));
        }
    })
    .unwrap();
    rx.recv().unwrap()
}

fn hydrate(on: &ReactorHandle, handle: &bdev::CloneHandle) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (_, total) = handle.hydration();
    for c in 0..total {
        let tx = tx.clone();
        handle
            .fetch_on(on, c, FetchReason::Thickening, move |r| {
                let _ = tx.send(r);
            })
            .unwrap();
    }
    for _ in 0..total {
        rx.recv().unwrap().unwrap();
    }
    assert_eq!(handle.hydration(), (total, total));
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (mut ops, mut rounds) = (2_000_000u64, 5usize);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut val = || it.next().expect("missing value").clone();
        match arg.as_str() {
            "--ops" => ops = val().parse().unwrap(),
            "--rounds" => rounds = val().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    let set = ReactorSet::start(ReactorConfig::new(CoreList::parse("0").unwrap())).unwrap();
    let on = set.handles()[0].clone();
    let blocks = SIZE / u64::from(BLOCK);
    let ram = |name: &str| create_malloc(name, BLOCK, blocks, None).unwrap();
    let vlocal = ram("vlocal");
    let (volume, _vh) =
        create_volume("volume", vlocal.clone(), CHUNK, Tracking::Fresh, None).unwrap();
    let clocal = ram("clocal");
    let (clone, ch) = create_clone("clone", clocal.clone(), Arc::new(Zeroes), None).unwrap();
    hydrate(&on, &ch);
    let tmp = tempfile::tempdir().unwrap();
    let jlocal = ram("jlocal");
    let (journalled, jh) = open_clone(
        "journalled",
        jlocal.clone(),
        Arc::new(Zeroes),
        None,
        &tmp.path().join("journalled.presence"),
        on.clone(),
    )
    .unwrap();
    hydrate(&on, &jh);
    jh.checkpoint().unwrap();
    // Each layered device beside the very RAM device beneath it (same memory, so the
    // only difference is the layer).
    let pairs = [
        ("volume", &volume, &vlocal),
        ("clone", &clone, &clocal),
        ("clone+journal", &journalled, &jlocal),
    ];
    // Fill every device once, so reads return data and nothing is first-touch.
    for (_, _, d) in &pairs {
        run(&on, d, true, ops / 4);
    }
    println!(
        "4 KiB random I/O at QD {QD} on one reactor, {ops} I/Os per round, median of {rounds} rounds"
    );
    println!(
        "{:<9} {:<14} {:>11} {:>10} {:>11} {:>10} {:>9} {:>9}",
        "pattern",
        "layer",
        "RAM kIOPS",
        "RAM ns/IO",
        "layer kIOPS",
        "layer ns/IO",
        "IOPS ×",
        "CPU ×"
    );
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for write in [false, true] {
        for (name, layered, beneath) in &pairs {
            // (IOPS, CPU ns per I/O) of the device beneath, then of the layer.
            let mut res: [Vec<(f64, f64)>; 2] = Default::default();
            for _ in 0..rounds {
                for (i, d) in [beneath, layered].iter().enumerate() {
                    let (wall, cpu) = run(&on, d, write, ops);
                    res[i].push((
                        ops as f64 / wall.as_secs_f64(),
                        cpu.as_nanos() as f64 / ops as f64,
                    ));
                }
            }
            let iops = |i: usize| med(&res[i].iter().map(|x| x.0).collect::<Vec<_>>());
            let cpu = |i: usize| med(&res[i].iter().map(|x| x.1).collect::<Vec<_>>());
            println!(
                "{:<9} {:<14} {:>11.0} {:>10.0} {:>11.0} {:>10.0} {:>9.3} {:>9.3}",
                if write { "randwrite" } else { "randread" },
                name,
                iops(0) / 1e3,
                cpu(0),
                iops(1) / 1e3,
                cpu(1),
                iops(1) / iops(0),
                cpu(1) / cpu(0)
            );
        }
    }
    // The miss path: cold reads of a fresh clone whose basis answers at once from
    // another thread, beside the same reads once every chunk is present.
    println!();
    println!(
        "4 KiB reads at QD 1 from a thread, one per chunk ({} chunks), {rounds} clones over files",
        SIZE / CHUNK
    );
    println!("{:<28} {:>9} {:>9}", "read", "p50 µs", "p99 µs");
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // The local copy is a file, as the daemon's are (O_DIRECT where it can be).
        let mut c = UringConfig::new("flocal", tmp.path().join(format!("local{round}.img")));
        c.create_size = Some(SIZE);
        c.block_size = Some(BLOCK);
        let local = open_uring(&c).or_else(|_| {
            c.direct = false;
            open_uring(&c)
        });
        let (fresh, _h) =
            create_clone("fresh", local.unwrap(), Arc::new(Courier::start()), None).unwrap();
        cold.push(qd1_reads(&on, &fresh));
        warm.push(qd1_reads(&on, &fresh));
    }
    for (name, v) in [
        ("miss (basis answers at once)", &cold),
        ("hit (same chunks, present)", &warm),
    ] {
        let p50 = med(&v.iter().map(|x| x.0).collect::<Vec<_>>());
        let p99 = med(&v.iter().map(|x| x.1).collect::<Vec<_>>());
        println!("{name:<28} {p50:>9.1} {p99:>9.1}");
    }
    set.shutdown().unwrap();
}
