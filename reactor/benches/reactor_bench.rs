//! Cross-core message round trips per second and idle CPU, for each idle policy.
//! Not a test: it prints figures for BENCHMARKS.md.
//!
//! cargo bench -p reactor --bench reactor_bench [-- --secs 2]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reactor::{CoreList, IdlePolicy, ReactorConfig, ReactorSet, current, thread_cpu_time};

fn start(idle: IdlePolicy) -> ReactorSet {
    let cores = CoreList::all_available().unwrap();
    assert!(cores.len() >= 2, "needs two cores");
    ReactorSet::start(
        ReactorConfig::new(CoreList::from_cores(&cores.cores()[..2]).unwrap()).with_idle(idle),
    )
    .unwrap()
}

/// A message goes 0 → 1 and its reply 1 → 0; `window` such pairs travel at once.
fn round_trips(idle: IdlePolicy, window: usize, secs: f64) -> f64 {
    let set = start(idle);
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    fn ping(count: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
        let me = current().unwrap();
        let peer = me.peers()[1].clone();
        peer.send(move || {
            let back = current().unwrap().peers()[0].clone();
            back.send(move || {
                count.fetch_add(1, Ordering::Relaxed);
                if !stop.load(Ordering::Relaxed) {
                    ping(count, stop);
                }
            })
            .unwrap();
        })
        .unwrap();
    }
    let (c, s) = (Arc::clone(&count), Arc::clone(&stop));
    set.call(0, move || {
        for _ in 0..window {
            ping(Arc::clone(&c), Arc::clone(&s));
        }
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (n0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let rate = (count.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    set.shutdown().unwrap();
    rate
}

/// CPU used by each idle reactor over `secs`, as a share of one core.
fn idle_cpu(idle: IdlePolicy, secs: f64) -> Vec<f64> {
    let set = start(idle);
    std::thread::sleep(Duration::from_millis(200));
    let tids: Vec<i32> = set.handles().iter().map(|h| h.tid()).collect();
    let before: Vec<Duration> = tids.iter().map(|&t| thread_cpu_time(t).unwrap()).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let wall = t0.elapsed().as_secs_f64();
    let shares = tids
        .iter()
        .zip(before)
        .map(|(&t, b)| (thread_cpu_time(t).unwrap() - b).as_secs_f64() / wall * 100.0)
        .collect();
    set.shutdown().unwrap();
    shares
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .map_or(2.0, |s| s.parse().unwrap());
    println!(
        "| idle policy | round trips/s (1 in flight) | round trips/s (64 in flight) | idle CPU per reactor |"
    );
    println!("|---|---|---|---|");
    for idle in [
        IdlePolicy::Busy,
        IdlePolicy::Adaptive,
        IdlePolicy::Interrupt,
    ] {
        let one = round_trips(idle, 1, secs);
        let many = round_trips(idle, 64, secs);
        let cpu = idle_cpu(idle, secs);
        let cpu: Vec<String> = cpu.iter().map(|c| format!("{c:.2} %")).collect();
        println!("| {idle} | {one:.0} | {many:.0} | {} |", cpu.join(", "));
    }
}
