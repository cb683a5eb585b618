//! A deterministic simulator of a clone: one thread, a simulated clock, one seed.
//!
//! The clone's real chunk-state core (`clone::core`) and its real presence record
//! (`presence`, on a [`NonDurableMedium`](crate::NonDurableMedium)) run against a
//! simulated local drive (`nondurable`'s drive: unflushed sectors lost, kept or
//! reordered at a power cut), a simulated object store (latency with a slow tail,
//! answers out of order, 5xx, corrupted and truncated bodies) and simulated hosts
//! (reads, partial and whole-chunk writes, FUA writes, flushes), with background
//! thickening, checkpoints and power cuts — some of them in the middle of the presence
//! record's own writes. Every event comes off one queue ordered by simulated time, so
//! a seed replays exactly: a failure prints its seed, and `OX_SIM_SEED=N` runs that one.
//!
//! What the simulator plays itself is the glue the owner reactor and the journal thread
//! carry out (`clone::owner`, `clone::journal`, the channel's read and write paths in
//! `clone`): it follows their order of steps — a write is acknowledged once every
//! chunk it touched is on the record, a commit flushes the local copy before it
//! records, a fetched chunk is recorded lazily — so a change to that order must be
//! made here too. [`Flaws`] breaks each rule on purpose, and the tests check that the
//! simulator then fails.
//!
//! Checked all the time: the core's own invariants after every event (`Core::check`);
//! every host read returns, for each block, the snapshot's bytes or a version written
//! no earlier than the one acknowledged when the read was issued; after every power
//! cut, every block reads as the version last made durable (flushed after it was
//! acknowledged, or written with FUA) or one written after it, never older, never the
//! snapshot's bytes over a durable write, never bytes of no version.

mod clone;
mod model;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub(crate) use clone::{Config, Flaws, Stats, run};

/// Simulated time, in microseconds.
pub(crate) type Micros = u64;

/// Events in order of simulated time (ties in the order they were scheduled).
pub(crate) struct Clock<E> {
    now: Micros,
    seq: u64,
    queue: BinaryHeap<Timed<E>>,
}

struct Timed<E> {
    at: Micros,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Timed<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Timed<E> {}
impl<E> PartialOrd for Timed<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Timed<E> {
    // Reversed: the heap's greatest is the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<E> Clock<E> {
    pub(crate) fn new() -> Self {
        Self {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
        }
    }

    pub(crate) fn now(&self) -> Micros {
        self.now
    }

    /// Schedules `event` `after` microseconds from now.
    pub(crate) fn after(&mut self, after: Micros, event: E) {
        self.seq += 1;
        self.queue.push(Timed {
            at: self.now + after,
            seq: self.seq,
            event,
        });
    }

    /// The next event, with the clock moved to its time.
    pub(crate) fn next(&mut self) -> Option<E> {
        let t = self.queue.pop()?;
        assert!(t.at >= self.now, "time went backwards");
        self.now = t.at;
        Some(t.event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    /// Runs `seeds` (or `OX_SIM_SEED` alone), printing the totals.
    fn run_seeds(seeds: std::ops::Range<u64>, config: impl Fn(u64) -> Config) -> Stats {
        let seeds = match env("OX_SIM_SEED") {
            Some(s) => s..s + 1,
            None => seeds,
        };
        let started = std::time::Instant::now();
        let mut total = Stats::default();
        for seed in seeds.clone() {
            match run(&config(seed)) {
                Ok(stats) => total.add(&stats),
                Err(e) => panic!("seed {seed}: {e} (repeat with OX_SIM_SEED={seed})"),
            }
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{} seeds in {secs:.1} s: {total}; {:.0} events/s, {:.0} host operations/s, \
             {:.0} simulated seconds",
            seeds.end - seeds.start,
            total.events as f64 / secs,
            total.host_ops as f64 / secs,
            total.simulated_us as f64 / 1e6,
        );
        total
    }

    #[test]
    fn clones_keep_every_durable_write_through_faults_and_power_cuts() {
        let seeds = env("OX_SIM_SEEDS").unwrap_or(100);
        let ops = env("OX_SIM_OPS").unwrap_or(1000);
        let total = run_seeds(0..seeds, |seed| Config::new(seed, ops));
        // The run must have reached what it claims to check.
        assert!(total.cuts >= seeds, "{total}");
        assert!(total.cuts_mid_record > 0, "{total}");
        assert!(total.blocks_checked_after_cut > 0, "{total}");
        assert!(
            total.served_from_fetch > 0 && total.claimed_whole > 0,
            "{total}"
        );
        assert!(
            total.store_faults > 0 && total.fetch_failures > 0,
            "{total}"
        );
        assert!(total.writes_failed > 0 && total.reads_failed > 0, "{total}");
        assert!(total.checkpoints > 0 && total.thickened > 0, "{total}");
    }

    #[test]
    fn the_same_seed_replays_the_same_run() {
        let a = run(&Config::new(7, 300)).expect("seed 7");
        let b = run(&Config::new(7, 300)).expect("seed 7");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.events, b.events);
        assert_eq!(a.simulated_us, b.simulated_us);
    }

    /// The first seed (of 40) at which `flaws` is caught, if any.
    fn caught(flaws: Flaws) -> Option<(u64, String)> {
        (0..40).find_map(|seed| {
            let mut c = Config::new(seed, 400);
            c.flaws = flaws;
            run(&c).err().map(|e| (seed, e))
        })
    }

    #[test]
    fn a_write_acknowledged_before_its_chunk_is_on_record_is_caught() {
        let flaws = Flaws {
            ack_before_record: true,
            ..Flaws::default()
        };
        let (seed, e) = caught(flaws).expect("the simulator misses an early acknowledgement");
        eprintln!("caught at seed {seed}: {e}");
    }

    #[test]
    fn a_record_written_before_the_local_copy_is_flushed_is_caught() {
        let flaws = Flaws {
            record_before_flush: true,
            ..Flaws::default()
        };
        let (seed, e) = caught(flaws).expect("the simulator misses a record ahead of its data");
        eprintln!("caught at seed {seed}: {e}");
    }
}
