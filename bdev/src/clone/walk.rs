//! The decisions of a walk over a clone's chunks — thickening, a new clone's warm-up:
//! which chunks to ask for, in what runs, how many at once, what to retry, and when the
//! walk is over. No I/O, no clock and no locks: whoever runs the walk (`ox::hydrate` on
//! an OX core, the simulator in tests) asks it for runs, carries them out as fetches
//! ([`crate::CloneHandle::fetch_many_on`]), and tells it each answer. So the simulator
//! runs the appliance's own walk, not a copy of its order of steps.
//!
//! A walk asks for the absent chunks of its order in runs of adjacent ones (one ranged
//! GET each at the basis; a warm-up's from a far store, two), keeping a window of runs
//! in flight. A walk that *yields* (thickening) steps back to short runs of
//! [`SHARING_RUN_BYTES`] while hosts read cold data: as many as keep [`SHARING_RATE`]
//! (or the walk's limit, if lower) going over the time a short run takes
//! ([`sharing_window`]), so a host's miss queues behind little of it on the link, and
//! a far store gets as much of it as a near one (up to the bytes the walk keeps in
//! flight alone: its window of long runs, in short ones).
//! A failed run is asked for again up to [`FETCH_RETRIES`] times, backing off; then
//! the walk fails (the clone stays correct either way: misses still work).

use std::collections::HashMap;
use std::iter::Peekable;
use std::time::Duration;

/// Runs a walk keeps in flight unless told otherwise.
pub const DEFAULT_WINDOW: usize = 8;

/// The most of adjacent chunks a walk asks for at once (at least one chunk).
pub const RUN_BYTES: u64 = 1 << 20;

/// While hosts read cold data: the fewest runs in flight, and their length (at least
/// one chunk: a few ms of a host's miss queued behind it on a slow link).
pub const SHARING_WINDOW: usize = 2;
/// See [`SHARING_WINDOW`].
pub const SHARING_RUN_BYTES: u64 = 256 << 10;

/// What thickening keeps going beside hosts reading cold data, in bytes a second:
/// about what [`SHARING_WINDOW`] runs carried where the fixed share beside hosts was
/// measured (runs answered in ~30 ms on a 20 ms link; BENCHMARKS.md, thickening beside
/// a host: hosts' p99 within 1.1× of idle in most runs, not all). A background limit
/// below this rate bounds the share instead.
pub const SHARING_RATE: u64 = 16 << 20;

/// Runs to keep in flight beside hosts when a run takes `latency` to be answered and
/// the walk, over chunks of `chunk_bytes`, may have `limit` bytes a second (0: no
/// limit): enough for [`SHARING_RATE`], or the limit if lower, over that time (a
/// bandwidth-delay product), at least [`SHARING_WINDOW`], and no more short runs than
/// carry the chunks of `window` long ones ([`most_sharing_runs`]). Runs beyond the
/// limit would only wait their turn, and go on the link together when they get it.
///
/// The most is the walk's own chunks in flight, not its count of runs: at 150 ms round
/// trips a short run takes ~300 ms on a server that answers in two, and 8 of them
/// carried 7 MB/s, under half of [`SHARING_RATE`]. A link slower than that rate makes
/// its runs slow too, and so more of them: there the background limit, set below the
/// link, is what keeps hosts' misses from queueing behind them.
pub fn sharing_window(latency: Duration, limit: u64, window: usize, chunk_bytes: u64) -> usize {
    let rate = match limit {
        0 => SHARING_RATE,
        l => l.min(SHARING_RATE),
    };
    let short = run_chunks(SHARING_RUN_BYTES, chunk_bytes) * chunk_bytes.max(1);
    let runs = (rate as f64 * latency.as_secs_f64() / short as f64).ceil() as usize;
    runs.max(SHARING_WINDOW)
        .min(most_sharing_runs(window, chunk_bytes))
}

/// Chunks in a run of at most `bytes` (at least one).
fn run_chunks(bytes: u64, chunk_bytes: u64) -> u64 {
    (bytes / chunk_bytes.max(1)).max(1)
}

/// The most short runs beside hosts: as many as carry the chunks of `window` (at least
/// one) runs of [`RUN_BYTES`], the walk's own in flight when it has the link alone.
pub fn most_sharing_runs(window: usize, chunk_bytes: u64) -> usize {
    let per_run = run_chunks(RUN_BYTES, chunk_bytes) / run_chunks(SHARING_RUN_BYTES, chunk_bytes);
    window.max(1).saturating_mul(per_run.max(1) as usize)
}

/// Attempts at a run whose fetch failed, after the first.
pub const FETCH_RETRIES: u32 = 3;

/// Wait before the `n`-th attempt again at a failed run (`n` from 1).
pub const RETRY_STEP: Duration = Duration::from_millis(500);

/// Chunks on each side of a recent miss that thickening fetches first.
pub const HOT_SPAN: u64 = 32;

/// Thickening's order over a clone of `total` chunks: the neighbourhoods of the
/// chunks hosts missed lately (`hot`) first, then every other chunk in order.
pub fn hot_first(hot: &[u64], total: u64) -> impl Iterator<Item = u64> + use<> {
    let mut order: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for &h in hot {
        for c in h.saturating_sub(HOT_SPAN)..h.saturating_add(HOT_SPAN).min(total) {
            if seen.insert(c) {
                order.push(c);
            }
        }
    }
    order
        .into_iter()
        .chain((0..total).filter(move |c| !seen.contains(c)))
}

/// What a walk may do at the moment it is asked for runs.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Stopped for good: ask for nothing more, end once nothing is in flight.
    pub stopped: bool,
    /// Paused: ask for nothing until resumed.
    pub paused: bool,
    /// Hosts are reading cold data (waiting on the basis now, or did a moment ago).
    pub sharing: bool,
    /// Runs to keep in flight (at least one).
    pub window: usize,
    /// Runs to keep in flight while sharing, if the walk yields ([`sharing_window`];
    /// at least one, at most [`most_sharing_runs`] of `window`).
    pub sharing_window: usize,
}

/// Why a walk failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<E> {
    /// The first chunk of the run that failed.
    pub chunk: u64,
    /// Attempts at that run (0: a fetch could not even be asked for).
    pub attempts: u32,
    /// The last error.
    pub error: E,
}

/// What an answer to a run leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// The run's chunks are present.
    Fetched(u64),
    /// Ask for `run` again after `after` (it still counts as in flight).
    Retry {
        /// The run, as before.
        run: Vec<u64>,
        /// How long to wait first.
        after: Duration,
    },
    /// The walk failed (see [`Walk::end`]); nothing more is asked for.
    GaveUp,
}

/// One walk over `order` (the chunks to fetch, in the order to fetch them), with
/// errors of type `E`.
pub struct Walk<I: Iterator<Item = u64>, E> {
    order: Peekable<I>,
    chunk_bytes: u64,
    yields: bool,
    in_flight: usize,
    exhausted: bool,
    failure: Option<Failure<E>>,
    /// Failed attempts so far, by a run's first chunk.
    attempts: HashMap<u64, u32>,
    fetched: u64,
}

impl<I: Iterator<Item = u64>, E> Walk<I, E> {
    /// A walk over `order` on a clone of `chunk_bytes` chunks; `yields`: stepping back
    /// to short runs while hosts read cold data.
    pub fn new(order: I, chunk_bytes: u64, yields: bool) -> Self {
        assert!(chunk_bytes > 0, "a clone's chunks have a size");
        Self {
            order: order.peekable(),
            chunk_bytes,
            yields,
            in_flight: 0,
            exhausted: false,
            failure: None,
            attempts: HashMap::new(),
            fetched: 0,
        }
    }

    /// The next run to ask for now, if the window has room and the walk may go on:
    /// the next chunks of the order that are not `present`, while adjacent. The caller
    /// asks for it at once, or calls [`Walk::refused`].
    pub fn next_run(&mut self, now: Now, present: impl Fn(u64) -> bool) -> Option<Vec<u64>> {
        if now.stopped || now.paused || self.failure.is_some() || self.exhausted {
            return None;
        }
        let (window, run_bytes) = if self.yields && now.sharing {
            let most = most_sharing_runs(now.window, self.chunk_bytes);
            (now.sharing_window.clamp(1, most), SHARING_RUN_BYTES)
        } else {
            (now.window.max(1), RUN_BYTES)
        };
        let run_len = run_chunks(run_bytes, self.chunk_bytes) as usize;
        if self.in_flight >= window {
            return None;
        }
        let Some(first) = self.order.by_ref().find(|&c| !present(c)) else {
            self.exhausted = true;
            return None;
        };
        let mut run = vec![first];
        while run.len() < run_len
            && let Some(&c) = self.order.peek()
            && c == run[run.len() - 1] + 1
            && !present(c)
        {
            run.push(c);
            self.order.next();
        }
        self.in_flight += 1;
        Some(run)
    }

    /// The fetch of the run starting at chunk `first` (from [`Walk::next_run`] or a
    /// retry) could not be asked for: the walk fails.
    pub fn refused(&mut self, first: u64, error: E) {
        assert!(self.in_flight > 0, "a refused run was in flight");
        self.in_flight -= 1;
        self.failure.get_or_insert(Failure {
            chunk: first,
            attempts: 0,
            error,
        });
    }

    /// The answer to `run`; `stopped`: the walk was stopped meanwhile (no retry then).
    /// Once the walk has failed, a failed run is not tried again either.
    pub fn answered(&mut self, run: Vec<u64>, result: Result<(), E>, stopped: bool) -> Answered {
        assert!(self.in_flight > 0, "an answer to a run in flight");
        assert!(!run.is_empty(), "runs hold a chunk at least");
        self.in_flight -= 1;
        let chunk = run[0];
        match result {
            Ok(()) => {
                let n = run.len() as u64;
                self.fetched += n;
                Answered::Fetched(n)
            }
            Err(error) => {
                let n = self.attempts.entry(chunk).or_default();
                *n += 1;
                if *n <= FETCH_RETRIES && !stopped && self.failure.is_none() {
                    self.in_flight += 1;
                    Answered::Retry {
                        run,
                        after: RETRY_STEP * *n,
                    }
                } else {
                    let attempts = *n;
                    self.failure.get_or_insert(Failure {
                        chunk,
                        attempts,
                        error,
                    });
                    Answered::GaveUp
                }
            }
        }
    }

    /// A retry ([`Answered::Retry`]) the caller will not ask for after all (the walk
    /// was stopped, or failed, while it waited): no longer in flight, and no failure.
    pub fn withdrawn(&mut self) {
        assert!(self.in_flight > 0, "a withdrawn retry was in flight");
        self.in_flight -= 1;
    }

    /// Whether a run has failed for good (nothing more is asked for).
    pub fn failed(&self) -> bool {
        self.failure.is_some()
    }

    /// Runs asked for and not answered yet (retries waiting included).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Chunks this walk has fetched.
    pub fn fetched(&self) -> u64 {
        self.fetched
    }

    /// Whether the walk is over: nothing in flight, and stopped, failed or through its
    /// order. (Nothing in flight and not over: it waits for a resume or for hosts to
    /// stop missing.)
    pub fn is_over(&self, stopped: bool) -> bool {
        self.in_flight == 0 && (stopped || self.failure.is_some() || self.exhausted)
    }

    /// Why the walk failed, if it did, for a caller that gives it up with runs still
    /// in flight (their answers will never come): the first failure it recorded wins
    /// over the caller's own reason.
    pub fn abandon(self) -> Option<Failure<E>> {
        self.failure
    }

    /// How the walk ended: the chunks it fetched, or why it failed.
    pub fn end(self) -> Result<u64, Failure<E>> {
        assert_eq!(self.in_flight, 0, "a walk ends with nothing in flight");
        match self.failure {
            Some(f) => Err(f),
            None => Ok(self.fetched),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn now(window: usize, sharing: bool) -> Now {
        Now {
            stopped: false,
            paused: false,
            sharing,
            window,
            sharing_window: SHARING_WINDOW,
        }
    }

    #[test]
    fn beside_hosts_a_far_store_gets_more_runs_in_flight() {
        assert_eq!(sharing_window(Duration::ZERO, 0, 8, CHUNK), SHARING_WINDOW);
        assert_eq!(sharing_window(Duration::from_millis(20), 0, 8, CHUNK), 2);
        assert_eq!(sharing_window(Duration::from_millis(60), 0, 8, CHUNK), 4);
        assert_eq!(sharing_window(Duration::from_millis(120), 0, 8, CHUNK), 8);
        // 150 ms round trips on a server answering in two: 16 MiB/s over 300 ms.
        assert_eq!(sharing_window(Duration::from_millis(300), 0, 8, CHUNK), 20);
        assert_eq!(
            sharing_window(Duration::from_secs(5), 0, 8, CHUNK),
            32,
            "never past the window's bytes: 8 runs of 1 MiB, in runs of 256 KiB"
        );
        assert_eq!(
            sharing_window(Duration::from_secs(5), 0, 1, CHUNK),
            4,
            "nor past a window of one run's bytes"
        );
        // A limit below the sharing rate keeps fewer runs going: no more than it lets by.
        assert_eq!(
            sharing_window(Duration::from_millis(120), 8 << 20, 8, CHUNK),
            4
        );
        assert_eq!(
            sharing_window(Duration::from_millis(120), 64 << 20, 8, CHUNK),
            8
        );
        // The walk keeps what it is told beside hosts, within what its window carries.
        let mut w: Walk<_, ()> = Walk::new(0..100u64, CHUNK, true);
        let far = Now {
            sharing_window: 4,
            ..now(8, true)
        };
        let runs: Vec<_> = std::iter::from_fn(|| w.next_run(far, |_| false)).collect();
        assert_eq!(runs.len(), 4);
        assert!(runs.iter().all(|r| r.len() == 4), "short runs: {runs:?}");
        let narrow = Now {
            sharing_window: 4,
            ..now(2, true)
        };
        let mut w: Walk<_, ()> = Walk::new(0..100u64, CHUNK, true);
        let runs: Vec<_> = std::iter::from_fn(|| w.next_run(narrow, |_| false)).collect();
        assert_eq!(runs.len(), 4, "the window's bytes allow it");
        let wide = Now {
            sharing_window: 40,
            ..now(2, true)
        };
        let mut w: Walk<_, ()> = Walk::new(0..100u64, CHUNK, true);
        let runs: Vec<_> = std::iter::from_fn(|| w.next_run(wide, |_| false)).collect();
        assert_eq!(
            runs.len(),
            8,
            "the window's bytes bound it: 2 MiB in 256 KiB runs"
        );
        // Chunks of 512 KiB: short runs are a whole chunk, half a long one; 1 MiB:
        // short runs are as long as long ones. The count follows.
        let ms = Duration::from_millis;
        assert_eq!(sharing_window(ms(300), 0, 8, 512 << 10), 10);
        assert_eq!(sharing_window(ms(5000), 0, 8, 512 << 10), 16);
        assert_eq!(sharing_window(ms(5000), 0, 8, 1 << 20), 8);
        assert_eq!(most_sharing_runs(0, CHUNK), 4);
        let mut w: Walk<_, ()> = Walk::new(0..100u64, 1 << 20, true);
        let runs: Vec<_> = std::iter::from_fn(|| w.next_run(wide, |_| false)).collect();
        assert_eq!(runs.len(), 2, "no more chunks in flight than the window's");
    }

    #[test]
    fn runs_are_adjacent_absent_chunks_within_the_window() {
        let present = |c: u64| c == 3 || c == 40;
        let mut w: Walk<_, ()> = Walk::new(0..50u64, CHUNK, true);
        let a = w.next_run(now(2, false), present).unwrap();
        assert_eq!(a, vec![0, 1, 2], "a present chunk ends a run");
        let b = w.next_run(now(2, false), present).unwrap();
        assert_eq!(b, (4..20).collect::<Vec<_>>(), "1 MiB of 64 KiB chunks");
        assert_eq!(
            w.next_run(now(2, false), present),
            None,
            "the window is full"
        );
        assert_eq!(w.answered(a, Ok(()), false), Answered::Fetched(3));
        // Sharing: short runs, two at most in flight.
        let c = w.next_run(now(8, true), present).unwrap();
        assert_eq!(c, vec![20, 21, 22, 23]);
        assert_eq!(w.next_run(now(8, true), present), None);
        w.answered(b, Ok(()), false);
        w.answered(c, Ok(()), false);
        let mut rest = Vec::new();
        while let Some(r) = w.next_run(now(100, false), present) {
            rest.push(r);
        }
        assert_eq!(rest, vec![(24..40).collect::<Vec<_>>(), (41..50).collect()]);
        assert!(!w.is_over(false), "runs still in flight");
        for r in rest {
            w.answered(r, Ok(()), false);
        }
        assert!(w.is_over(false));
        assert_eq!(w.end(), Ok(48));
    }

    #[test]
    fn a_failed_run_is_retried_backing_off_then_fails_the_walk() {
        let mut w: Walk<_, &str> = Walk::new(0..1u64, CHUNK, false);
        let mut run = w.next_run(now(1, false), |_| false).unwrap();
        for n in 1..=FETCH_RETRIES {
            match w.answered(run, Err("503"), false) {
                Answered::Retry { run: again, after } => {
                    assert_eq!(after, RETRY_STEP * n);
                    run = again;
                }
                other => panic!("attempt {n}: {other:?}"),
            }
            assert_eq!(w.in_flight(), 1, "a retry stays in flight");
        }
        assert_eq!(w.answered(run, Err("503"), false), Answered::GaveUp);
        assert!(w.is_over(false));
        let f = w.end().unwrap_err();
        assert_eq!(
            (f.chunk, f.attempts, f.error),
            (0, FETCH_RETRIES + 1, "503")
        );
    }

    #[test]
    fn a_stop_ends_it_with_no_retry_and_a_pause_asks_for_nothing() {
        let stopped = Now {
            stopped: true,
            ..now(4, false)
        };
        // Stopped with a run in flight: over once it is answered, and only because
        // of the stop (the walk has neither failed nor gone through its order).
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        let paused = Now {
            paused: true,
            ..now(4, false)
        };
        assert_eq!(w.next_run(paused, |_| false), None);
        assert!(!w.is_over(false), "a paused walk waits");
        let run = w.next_run(now(4, false), |_| false).unwrap();
        assert!(!w.is_over(true), "a run is in flight");
        assert_eq!(w.answered(run, Ok(()), true), Answered::Fetched(16));
        assert_eq!(w.next_run(stopped, |_| false), None);
        assert!(!w.is_over(false) && w.is_over(true));
        assert_eq!(w.end(), Ok(16));
        // A run failing after a stop is not tried again.
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        let run = w.next_run(now(4, false), |_| false).unwrap();
        assert_eq!(w.answered(run, Err("reset"), true), Answered::GaveUp);
        assert!(w.is_over(true));
        // A retry waiting when the walk is stopped is let go: the walk ends well.
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        let run = w.next_run(now(4, false), |_| false).unwrap();
        assert!(matches!(
            w.answered(run, Err("503"), false),
            Answered::Retry { .. }
        ));
        assert!(!w.is_over(true), "the retry is in flight");
        w.withdrawn();
        assert!(w.is_over(true) && !w.failed());
        assert_eq!(w.end(), Ok(0));
    }

    #[test]
    fn a_walk_given_up_with_runs_in_flight_says_its_first_failure() {
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        let a = w.next_run(now(4, false), |_| false).unwrap();
        let _b = w.next_run(now(4, false), |_| false).unwrap();
        for _ in 0..=FETCH_RETRIES {
            w.answered(a.clone(), Err("503"), false);
        }
        let f = w.abandon().expect("it failed");
        assert_eq!((f.chunk, f.error), (0, "503"));
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        w.next_run(now(4, false), |_| false).unwrap();
        assert_eq!(w.abandon(), None, "nothing failed");
    }

    #[test]
    fn a_refused_fetch_fails_the_walk_and_nothing_more_is_asked() {
        let mut w: Walk<_, &str> = Walk::new(0..100u64, CHUNK, false);
        let run = w.next_run(now(4, false), |_| false).unwrap();
        w.refused(run[0], "the clone is gone");
        assert_eq!(w.next_run(now(4, false), |_| false), None);
        assert!(w.is_over(false));
        assert_eq!(w.end().unwrap_err().attempts, 0);
    }

    #[test]
    fn thickening_goes_around_recent_misses_first() {
        let order: Vec<u64> = hot_first(&[100, 110], 200).collect();
        assert_eq!(order.len(), 200, "every chunk once");
        assert_eq!(order[..74], (68..142).collect::<Vec<_>>()[..]);
        assert_eq!(order[74..78], [0, 1, 2, 3]);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    }
}
