//! 4 KiB random reads through the `uring` bdev at a fixed queue depth, for comparison
//! with fio (see `scripts/bench-uring-vs-fio`). Not a test: it prints figures.
//!
//! cargo bench -p bdev --bench uring_randread -- FILE [--qd 32] [--secs 10] [--core 1]
//!     [--idle busy|adaptive|interrupt] [--bs 4096]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bdev::{BdevIo, Channel, IoBuf, IoCompletion, UringConfig, open_uring};
use reactor::{CoreList, IdlePolicy, ReactorConfig, ReactorSet, current};

struct Load {
    channel: Rc<Channel>,
    blocks: u64,
    io_blocks: u64,
    rng: Cell<u64>,
    deadline: Instant,
    done: Cell<u64>,
    in_flight: Cell<u32>,
    finished: RefCell<Option<crossbeam_channel::Sender<u64>>>,
}

impl Load {
    fn next_lba(&self) -> u64 {
        let mut x = self.rng.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.set(x);
        (x % (self.blocks / self.io_blocks)) * self.io_blocks
    }

    fn issue(self: &Rc<Self>, buf: IoBuf) {
        let io = BdevIo::read(self.next_lba(), self.io_blocks, vec![buf]);
        let this = Rc::clone(self);
        self.in_flight.set(self.in_flight.get() + 1);
        self.channel.submit(io, move |c| this.complete(c));
    }

    fn complete(self: &Rc<Self>, mut c: IoCompletion) {
        self.in_flight.set(self.in_flight.get() - 1);
        c.result.expect("read failed");
        self.done.set(self.done.get() + 1);
        if current().unwrap().now() < self.deadline {
            self.issue(c.bufs.pop().unwrap());
        } else if self.in_flight.get() == 0
            && let Some(tx) = self.finished.borrow_mut().take()
        {
            tx.send(self.done.get()).unwrap();
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut file = None;
    let (mut qd, mut secs, mut core, mut idle, mut bs) =
        (32u32, 10u64, 1usize, "busy".to_string(), 4096u32);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut val = || it.next().expect("missing value").clone();
        match arg.as_str() {
            "--qd" => qd = val().parse().unwrap(),
            "--secs" => secs = val().parse().unwrap(),
            "--core" => core = val().parse().unwrap(),
            "--idle" => idle = val(),
            "--bs" => bs = val().parse().unwrap(),
            other => file = Some(other.to_string()),
        }
    }
    let Some(file) = file else {
        eprintln!("usage: uring_randread FILE [--qd N] [--secs N] [--core N] [--idle P] [--bs N]");
        return;
    };
    let idle: IdlePolicy = idle.parse().unwrap();
    let set = ReactorSet::start(
        ReactorConfig::new(CoreList::from_cores(&[core]).unwrap()).with_idle(idle),
    )
    .unwrap();
    let mut config = UringConfig::new("bench", &file);
    config.block_size = Some(512);
    let dev = open_uring(&config).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let io_blocks = u64::from(bs / 512);
    let started = Instant::now();
    let tid = set.handles()[0].tid();
    let cpu0 = reactor::thread_cpu_time(tid).unwrap();
    set.call(0, move || {
        let load = Rc::new(Load {
            channel: dev.channel().unwrap(),
            blocks: dev.num_blocks(),
            io_blocks,
            rng: Cell::new(0x2545_F491_4F6C_DD1D),
            deadline: Instant::now() + Duration::from_secs(secs),
            done: Cell::new(0),
            in_flight: Cell::new(0),
            finished: RefCell::new(Some(tx)),
        });
        for _ in 0..qd {
            load.issue(IoBuf::new(bs as usize));
        }
    })
    .unwrap();
    let ios = rx.recv().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (reactor::thread_cpu_time(tid).unwrap() - cpu0).as_secs_f64();
    set.shutdown().unwrap();
    println!(
        "uring_bdev randread bs={bs} qd={qd} idle={idle}: {:.0} IOPS, {:.1} MiB/s, reactor cpu {:.0}%",
        ios as f64 / elapsed,
        ios as f64 * f64::from(bs) / elapsed / 1048576.0,
        cpu / elapsed * 100.0
    );
}
