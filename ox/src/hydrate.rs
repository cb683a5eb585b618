//! Background work on a snapshot: thickening a clone (fetching every missing chunk so
//! it no longer needs its basis), restoring a snapshot to a local device, and verifying
//! (scrubbing) every frame of a snapshot.
//!
//! Thickening runs on an OX core as background traffic, with a small window of runs
//! in flight (each up to [`RUN_BYTES`] of adjacent chunks, which the basis fetches in
//! one ranged GET; so a store's latency, not the window, is what a slow link costs):
//! the basis charges it to the background bucket of the throttle. While hosts read
//! cold data (a host waits on the basis, or did within a short grace) it keeps going
//! with short runs of [`SHARING_RUN_BYTES`] in flight, as many as keep
//! [`bdev::walk::SHARING_RATE`] (or the walk's background limit, if lower) going over
//! the quickest time a short run of this walk has taken to be answered (at least
//! [`SHARING_WINDOW`], at most what carries its window's bytes): a host's miss then
//! queues behind little thickening on the link, and thickening still uses the
//! bandwidth the host leaves, on a far store as on a near one.
//! It can be paused, resumed and stopped, and reports progress.
//!
//! A restore and a verify read the whole snapshot in order, [`PASS_RUNS`] ranged GETs of
//! adjacent frames at once, charged to the throttle's background bucket; they report
//! progress and stop when cancelled ([`Pass`]): a verify at once, a restore once the
//! writes it has sent have ended.
//!
//! A new clone's working set is fetched first ([`warm`]) the same way, as fetches
//! ahead of hosts (`FetchReason::Prefetch`: from a far store the basis splits each run
//! into GETs of up to `ox::basis::READ_AHEAD_RUN_BYTES`); while the store is
//! unavailable that walk waits, backing off, and goes on where it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bdev::walk::{Answered, Failure, Now, Walk, sharing_window};
use bdev::{Bdev, BdevIo, CloneHandle, FetchReason, IoBuf};
use reactor::ReactorHandle;

use crate::basis::THROTTLE_SLICE;
use crate::error::OxError;
use crate::format::{Entry, PAGE_CHUNKS};
use crate::snapshot::Loaded;
use crate::store::ObjectStore;
use crate::throttle::{Class, Throttle};

/// Control and progress of a thickening walk.
#[derive(Debug)]
pub struct Thickening {
    paused: AtomicBool,
    stopped: AtomicBool,
    fetched: AtomicU64,
    window: AtomicUsize,
    /// Runs the walk keeps in flight beside hosts now (what it last worked out).
    sharing_window: AtomicUsize,
    /// The quickest a short run of the walk was answered, µs (0: none yet).
    quickest_run_us: AtomicU64,
    /// Where the walk's background limit is: the throttle, and the name its runs
    /// pass it under.
    limited_by: std::sync::OnceLock<(crate::throttle::Throttle, String)>,
    started: std::sync::OnceLock<Instant>,
    /// Times the walk failed (the store unavailable) and waited to go on.
    setbacks: AtomicU32,
    /// Runs the store failed that wait to be asked again (their back-off, or a resume).
    retrying: AtomicUsize,
    /// Set by whoever ran the walk once it is over.
    finished: AtomicBool,
    /// Notified at every pause, resume, stop, window change, setback and finish.
    changed: event_listener::Event,
}

pub use bdev::walk::{DEFAULT_WINDOW, RUN_BYTES, SHARING_RUN_BYTES, SHARING_WINDOW};

impl Default for Thickening {
    fn default() -> Self {
        Self {
            paused: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            fetched: AtomicU64::new(0),
            window: AtomicUsize::new(DEFAULT_WINDOW),
            sharing_window: AtomicUsize::new(SHARING_WINDOW),
            quickest_run_us: AtomicU64::new(0),
            limited_by: std::sync::OnceLock::new(),
            started: std::sync::OnceLock::new(),
            setbacks: AtomicU32::new(0),
            retrying: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
            changed: event_listener::Event::new(),
        }
    }
}

impl Thickening {
    /// A walk, not yet started.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets how many runs the walk keeps in flight (at least one; beside hosts, as many
    /// short runs as carry their chunks at most: [`bdev::walk::most_sharing_runs`]);
    /// takes effect at once.
    pub fn set_window(&self, window: usize) {
        self.window.store(window.max(1), Ordering::Relaxed);
        self.changed.notify(usize::MAX);
    }

    /// Tells the walk its runs pass `throttle` as `volume`'s background traffic: beside
    /// hosts it keeps no more runs going than that limit lets by (the whole limit: as
    /// if the walk had it to itself). Once per walk; a second call is ignored.
    pub fn limited_by(&self, throttle: crate::throttle::Throttle, volume: &str) {
        let _ = self.limited_by.set((throttle, volume.to_string()));
    }

    /// The background limit of the walk's runs now, bytes a second (0: none known).
    fn limit(&self) -> u64 {
        self.limited_by
            .get()
            .map_or(0, |(t, v)| t.rate(v, crate::throttle::Class::Background))
    }

    /// Runs the walk keeps in flight while hosts read cold data, as it last worked
    /// them out (from its quickest short run and its background limit).
    pub fn sharing_window(&self) -> usize {
        self.sharing_window.load(Ordering::Relaxed)
    }

    /// Runs the store failed that wait to be asked again (their back-off, or, paused,
    /// the resume).
    pub fn retrying(&self) -> usize {
        self.retrying.load(Ordering::Relaxed)
    }

    /// The quickest a short run of the walk was answered (zero: none yet).
    pub fn quickest_run(&self) -> Duration {
        Duration::from_micros(self.quickest_run_us.load(Ordering::Relaxed))
    }

    fn window(&self) -> usize {
        self.window.load(Ordering::Relaxed)
    }

    /// Whether stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Pauses after the current chunk.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Resumes.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Stops for good after the current chunk.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Whether paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Times the walk failed with the store unavailable and waited to go on.
    pub fn setbacks(&self) -> u32 {
        self.setbacks.load(Ordering::Relaxed)
    }

    /// Marks the walk over (its runner calls this when it returns).
    pub fn finish(&self) {
        self.finished.store(true, Ordering::SeqCst);
        self.changed.notify(usize::MAX);
    }

    /// Whether the walk is over.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// A listener notified at the next change of any state above: another thread
    /// waits on it (checking the state after listening, so no change is missed).
    pub fn listen(&self) -> event_listener::EventListener {
        self.changed.listen()
    }

    /// Waits `pause`, or until stopped.
    /// Waits `pause`, then while paused; ends at once when stopped.
    async fn rest(&self, pause: Duration) {
        let waited = async {
            async_io::Timer::after(pause).await;
            self.until(|c| !c.is_paused()).await;
        };
        futures_lite::future::or(self.until(Self::is_stopped), waited).await;
    }

    /// Waits until `cond` holds (checked at every change).
    async fn until(&self, cond: impl Fn(&Self) -> bool) {
        loop {
            let changed = self.changed.listen();
            if cond(self) {
                return;
            }
            changed.await;
        }
    }

    /// Chunks this walk has fetched.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Estimated time to completion given the clone's remaining chunks, from this
    /// walk's rate so far; `None` before there is a rate.
    pub fn eta(&self, clone: &CloneHandle) -> Option<Duration> {
        let (present, total) = clone.hydration();
        let elapsed = self.started.get()?.elapsed().as_secs_f64();
        let rate = self.fetched() as f64 / elapsed;
        (rate > 0.0).then(|| Duration::from_secs_f64((total - present) as f64 / rate))
    }
}

/// How long the walk waits for any one answer before deciding its reactor is gone:
/// longer than a fetch from a store that never answers takes to fail with the default
/// store settings (six attempts of 30 s and back-off, each after its turn among the
/// clone's background requests, 32 at once on an OX core: behind a far read-ahead's
/// ~60, three turns, ~9 minutes in all), so such a walk ends with the store's failure
/// rather than this guess. A stopped reactor is noticed that much later.
const FETCH_PATIENCE: Duration = Duration::from_secs(900);

/// How long thickening holds back after a host last waited on the basis.
const CLIENT_GRACE: Duration = Duration::from_millis(20);

/// Walks every chunk of `clone` (around recent misses first), fetching the missing ones through reactor `on`, until
/// done or stopped. Returns the number of chunks fetched.
pub async fn thicken(
    clone: &CloneHandle,
    on: &ReactorHandle,
    control: &Thickening,
) -> Result<u64, OxError> {
    let _ = control.started.set(Instant::now());
    let (_, total) = clone.hydration();
    walk(
        clone,
        on,
        control,
        bdev::walk::hot_first(&clone.hot_chunks(), total),
        FetchReason::Thickening,
        true,
    )
    .await
}

/// What [`warm`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Chunks in the snapshot's working set (0: it stored none).
    pub listed: u64,
    /// Of those, chunks fetched (the rest were here already).
    pub fetched: u64,
}

/// The first wait of [`warm`] after the store failed it, doubled at each failure in a
/// row up to [`WARM_RETRY_MOST`].
pub const WARM_RETRY_FIRST: Duration = Duration::from_secs(1);
/// See [`WARM_RETRY_FIRST`].
pub const WARM_RETRY_MOST: Duration = Duration::from_secs(60);

/// Fetches the snapshot's working set into a new clone, before anything else in the
/// background: the chunks its volume's hosts read lately, as the snapshot recorded
/// them (`format::WorkingSet`), in runs of adjacent chunks, at full window even while
/// hosts read (they are about to read these), within the background bandwidth;
/// `control` stops it. A snapshot without one costs one GET (answered "not found").
///
/// While the store is unavailable it waits and tries again (a setback on `control`),
/// fetching only what is still missing, until done or stopped: a warm-up must not end
/// for good at an outage a restart would have outlived. Damage (an integrity failure)
/// or a local failure ends it.
pub async fn warm(
    basis: &crate::basis::ObjectBasis,
    ex: &std::rc::Rc<async_executor::LocalExecutor<'static>>,
    clone: &CloneHandle,
    on: &ReactorHandle,
    control: &Thickening,
) -> Result<Warmed, OxError> {
    let before = control.fetched();
    let listed = std::cell::Cell::new(0);
    let mut pause = WARM_RETRY_FIRST;
    let warmed = |listed: &std::cell::Cell<u64>| Warmed {
        listed: listed.get(),
        fetched: control.fetched() - before,
    };
    loop {
        if control.is_stopped() {
            return Ok(warmed(&listed));
        }
        // A stop ends it at once, even with a request in flight to a store that hangs
        // (dropping the attempt is safe: fetches only fill chunks).
        let attempt = async { Some(warm_once(basis, ex, clone, on, control, &listed).await) };
        let stopped = async {
            control.until(Thickening::is_stopped).await;
            None
        };
        match futures_lite::future::or(attempt, stopped).await {
            None | Some(Ok(())) => return Ok(warmed(&listed)),
            Some(Err(e @ OxError::Unavailable { .. })) => {
                tracing::warn!("working set: {e}; trying again in {} s", pause.as_secs());
                control.setbacks.fetch_add(1, Ordering::Relaxed);
                control.changed.notify(usize::MAX);
                control.rest(pause).await;
                pause = (pause * 2).min(WARM_RETRY_MOST);
            }
            Some(Err(e)) => return Err(e),
        }
    }
}

/// One attempt of [`warm`]; sets `listed` to the chunks the working set lists once it
/// is read.
async fn warm_once(
    basis: &crate::basis::ObjectBasis,
    ex: &std::rc::Rc<async_executor::LocalExecutor<'static>>,
    clone: &CloneHandle,
    on: &ReactorHandle,
    control: &Thickening,
    listed: &std::cell::Cell<u64>,
) -> Result<(), OxError> {
    let Some(set) = basis.working_set(ex).await? else {
        return Ok(());
    };
    let (_, total) = clone.hydration();
    listed.set(set.len());
    // A set naming most of the volume (written by another build) is not a working set:
    // thickening is the way to fetch everything.
    if !set.worth_storing(total) {
        tracing::info!(
            "working set of {} of {total} chunks: too large, not fetched",
            set.len()
        );
        return Ok(());
    }
    walk(
        clone,
        on,
        control,
        set.chunks().filter(|&c| c < total),
        FetchReason::Prefetch,
        // What hosts are about to read: it does not step back for their misses.
        false,
    )
    .await?;
    Ok(())
}

/// How long a walk's short runs (those asked for beside hosts) take to be answered:
/// the quickest of all of them. Not a recent one: with its own runs queued on the link,
/// at the throttle or in the store client's turn, each run takes longer the more are in flight, and a window
/// worked out from recent times would grow on its own queue. The quickest can only
/// shrink the window; a store that grows slower later keeps the smaller share, and a
/// run answered without a GET of its own (its chunks already on their way for a host)
/// pins it at [`SHARING_WINDOW`] for the rest of the walk: the safe side, the share
/// before it followed the round trip.
#[derive(Debug, Default)]
struct RunLatency {
    quickest: Option<Duration>,
}

impl RunLatency {
    fn answered(&mut self, took: Duration) {
        self.quickest = Some(self.quickest.map_or(took, |q| q.min(took)));
    }

    /// The quickest answer so far (zero before the first: the fewest runs).
    fn quickest(&self) -> Duration {
        self.quickest.unwrap_or_default()
    }
}

/// Fetches the chunks of `order` not present yet, for `reason`, as
/// [`bdev::walk::Walk`] decides (runs of adjacent chunks, a window of them in
/// flight, retries), until done or stopped; `yields`: stepping back to short runs
/// while hosts read cold data. This carries out the walk's decisions and waits for
/// what changes them. Returns the number of chunks fetched so far by `control`.
async fn walk(
    clone: &CloneHandle,
    on: &ReactorHandle,
    control: &Thickening,
    order: impl Iterator<Item = u64>,
    reason: FetchReason,
    yields: bool,
) -> Result<u64, OxError> {
    let mut walk = Walk::new(order, clone.chunk_bytes(), yields);
    // Each answer with how long it took, timed where it lands (not when this loop gets
    // to it), if it is one to time: a short run asked for beside hosts, what the
    // share beside hosts is worked out for.
    type Answer = (Vec<u64>, Option<Duration>, Result<(), bdev::BdevError>);
    let (tx, rx) = async_channel::unbounded::<Answer>();
    let issue = |run: Vec<u64>, timed: bool| {
        let tx = tx.clone();
        let asked = run.clone();
        let at = Instant::now();
        clone.fetch_many_on(on, asked, reason, move |r| {
            let _ = tx.try_send((run, timed.then(|| at.elapsed()), r));
        })
    };
    let mut latency = RunLatency::default();
    // Runs to ask for again, each once its back-off has passed (they wait together:
    // a hiccup that fails every run in flight costs one back-off, not one each).
    let mut retries: Vec<(Instant, Vec<u64>)> = Vec::new();
    let now = |latency: &RunLatency| {
        let window = control.window();
        let quickest = latency.quickest();
        let sharing = sharing_window(quickest, control.limit(), window, clone.chunk_bytes());
        control.sharing_window.store(sharing, Ordering::Relaxed);
        control
            .quickest_run_us
            .store(quickest.as_micros() as u64, Ordering::Relaxed);
        Now {
            stopped: control.is_stopped(),
            paused: control.is_paused(),
            sharing: clone.misses_in_flight() > 0 || clone.missed_within(CLIENT_GRACE),
            window,
            sharing_window: sharing,
        }
    };
    loop {
        // A walk stopped, or failed, asks for nothing more: its retries are let go.
        if control.is_stopped() || walk.failed() {
            for _ in retries.drain(..) {
                walk.withdrawn();
            }
        }
        // A paused walk asks for nothing, retries included: they wait for the resume.
        let due = (!control.is_paused()).then(Instant::now);
        let asked: Vec<_> = retries
            .extract_if(.., |(at, _)| due.is_some_and(|due| *at <= due))
            .collect();
        // (Counted before they are asked for: while it shows one waiting, none is.)
        control.retrying.store(retries.len(), Ordering::Relaxed);
        for (_, run) in asked {
            let first = run[0];
            if let Err(e) = issue(run, false) {
                walk.refused(first, e);
            }
        }
        loop {
            let n = now(&latency);
            let Some(run) = walk.next_run(n, |c| clone.is_present(c)) else {
                break;
            };
            let first = run[0];
            if let Err(e) = issue(run, yields && n.sharing) {
                walk.refused(first, e);
            }
        }
        if walk.in_flight() == 0 {
            if walk.is_over(control.is_stopped()) {
                break;
            }
            // Nothing in flight and nothing may start (paused, or a host waits on the
            // basis): wait for whichever changes that, not on a timer.
            let changed = control.changed.listen();
            if control.is_stopped() || (!control.is_paused() && clone.misses_in_flight() == 0) {
                continue;
            }
            let settled = async {
                if control.is_paused() {
                    futures_lite::future::pending::<()>().await;
                }
                clone.misses_settled().await;
            };
            futures_lite::future::or(changed, settled).await;
            continue;
        }
        // A fetch whose reactor stopped never answers: give up on the walk then.
        // Retries waiting: a stop ends their wait too.
        let retry_due = retries.iter().map(|(at, _)| *at).min();
        let control_changed = control.changed.listen();
        let next = futures_lite::future::or(async { rx.recv().await.ok().map(Some) }, async {
            match retry_due {
                Some(_) if control.is_stopped() => Some(None),
                // Paused: retries wait for the resume (or a stop), not their back-off.
                Some(_) if control.is_paused() => {
                    control_changed.await;
                    Some(None)
                }
                Some(at) => {
                    futures_lite::future::or(
                        async {
                            async_io::Timer::at(at).await;
                        },
                        control_changed,
                    )
                    .await;
                    Some(None)
                }
                None => {
                    async_io::Timer::after(FETCH_PATIENCE).await;
                    None
                }
            }
        })
        .await;
        let Some(next) = next else {
            // A failure it met before wins: a warm-up waits out an outage.
            return Err(match walk.abandon() {
                Some(failure) => failed(failure),
                None => {
                    OxError::Config("a background fetch got no answer (reactor stopped?)".into())
                }
            });
        };
        // A retry's back-off has passed, or the walk was stopped: seen to at the top.
        let Some((run, took, result)) = next else {
            continue;
        };
        if let (Ok(()), Some(took)) = (&result, took) {
            latency.answered(took);
        }
        match walk.answered(run, result, control.is_stopped()) {
            Answered::Fetched(n) => {
                control.fetched.fetch_add(n, Ordering::Relaxed);
            }
            Answered::Retry { run, after } => {
                // A store hiccup: asked for again, backing off.
                retries.push((Instant::now() + after, run));
                control.retrying.store(retries.len(), Ordering::Relaxed);
            }
            Answered::GaveUp => {}
        }
    }
    match walk.end() {
        Ok(_) => Ok(control.fetched()),
        Err(failure) => Err(failed(failure)),
    }
}

/// Why a walk failed, as an error that tells an outage from damage.
fn failed(
    Failure {
        chunk,
        attempts,
        error,
    }: Failure<bdev::BdevError>,
) -> OxError {
    match error {
        _ if attempts == 0 => OxError::Config(error.to_string()),
        bdev::BdevError::Basis {
            reason: bdev::FetchError::Integrity(why),
            ..
        } => OxError::integrity(format!("chunk {chunk}"), why),
        bdev::BdevError::Basis {
            reason: bdev::FetchError::Unavailable(why),
            ..
        } => OxError::Unavailable {
            op: "background fetch",
            key: format!("chunk {chunk}"),
            attempts,
            message: why,
        },
        other => OxError::Config(format!("background fetch of chunk {chunk}: {other}")),
    }
}

/// What a verify pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Frames checked.
    pub frames: u64,
    /// Chunks that are zero (nothing stored).
    pub zero: u64,
    /// Bad frames: (chunk, why).
    pub bad: Vec<(u64, String)>,
}

/// Progress and cancellation of a restore or a verify, shared with whoever watches it
/// (its job, on another thread: hence atomics). Not on a host's I/O path: a pass adds
/// to its counters once per GET or piece, and its state moves once.
#[derive(Debug, Default)]
pub struct Pass {
    /// Chunks done (of the manifest's).
    pub chunks: AtomicU64,
    /// Bytes fetched from the store.
    pub bytes: AtomicU64,
    /// [`RUNNING`], [`CANCELLED`] or [`SEALED`]: moved once, from running.
    state: std::sync::atomic::AtomicU8,
    changed: event_listener::Event,
}

const RUNNING: u8 = 0;
const CANCELLED: u8 = 1;
const SEALED: u8 = 2;

impl Pass {
    /// Stops the pass at once (its GETs in flight are dropped; a restore's writes
    /// already sent end first) and it fails with "cancelled" — unless it was sealed
    /// first ([`Self::seal`]): whether the cancel took.
    pub fn cancel(&self) -> bool {
        let was =
            self.state
                .compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
        self.changed.notify(usize::MAX);
        matches!(was, Ok(_) | Err(CANCELLED))
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::SeqCst) == CANCELLED
    }

    /// Makes its outcome final (a restore about to publish its volume): later cancels
    /// do not take. False if it was cancelled first.
    pub fn seal(&self) -> bool {
        let was = self
            .state
            .compare_exchange(RUNNING, SEALED, Ordering::SeqCst, Ordering::SeqCst);
        was.is_ok()
    }

    /// Resolves once `done` holds, looked at again whenever the pass is told of a
    /// change (a cancel, a restore's piece failing).
    async fn until(&self, done: impl Fn() -> bool) {
        loop {
            if done() {
                return;
            }
            let listener = self.changed.listen();
            if done() {
                return;
            }
            listener.await;
        }
    }

    /// `work`, unless the pass is cancelled first or meanwhile (`work` is dropped then,
    /// and `what` fails with "cancelled").
    async fn unless_cancelled<T>(
        &self,
        what: &str,
        work: impl Future<Output = Result<T, OxError>>,
    ) -> Result<T, OxError> {
        let cancelled = async {
            self.until(|| self.is_cancelled()).await;
            Err(OxError::Cancelled(format!("{what} cancelled")))
        };
        futures_lite::future::or(cancelled, work).await
    }
}

/// What tells a restore's pieces to stop: the pass cancelled, or one of them failed.
/// A piece stops fetching when told, but a write it has sent is waited for: once the
/// restore returns, its volume's files may be removed.
struct Halt<'a> {
    pass: &'a Pass,
    failed: std::cell::Cell<bool>,
}

impl<'a> Halt<'a> {
    fn new(pass: &'a Pass) -> Self {
        Self {
            pass,
            failed: std::cell::Cell::new(false),
        }
    }

    /// A piece failed: the others stop.
    fn fail(&self) {
        self.failed.set(true);
        self.pass.changed.notify(usize::MAX);
    }

    fn halted(&self) -> bool {
        self.failed.get() || self.pass.is_cancelled()
    }

    /// `work`, unless told to stop first or meanwhile (`work` is dropped then).
    async fn unless<T>(
        &self,
        work: impl Future<Output = Result<T, OxError>>,
    ) -> Result<T, OxError> {
        let halted = async {
            self.pass.until(|| self.halted()).await;
            // A cancel is what the restore fails with; after another piece's failure,
            // that failure is (at_most keeps the first).
            Err(OxError::Cancelled("restore cancelled".into()))
        };
        futures_lite::future::or(halted, work).await
    }
}

/// Runs a restore or a verify keeps in flight, each one ranged GET of up to
/// [`crate::basis::RUN_BYTES`] of frames: 32 MiB asked for at once, as much as a
/// 1 Gbit/s link carries in a quarter of a second, so a far store's round trip is paid
/// once per window, not once per chunk (one at a time, a 60 ms store held a restore to
/// about 1 MB/s). Each run holds its answer and its decoded chunks (and a restore its
/// write's copy) until written: up to ~100 MiB in all.
pub const PASS_RUNS: usize = 16;

/// A piece of a snapshot a pass handles at once: a run of adjacent chunks whose frames
/// lie back to back in one object (one ranged GET), or adjacent zero chunks; at most
/// [`crate::basis::RUN_BYTES`] of chunks either way.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Frames(Vec<(u64, Entry)>),
    Zeroes { first: u64, count: u64 },
}

/// The pieces of index page `page` (its `entries`), in chunk order.
fn pieces(page: u64, entries: &[Entry], chunk_bytes: u64) -> Vec<Piece> {
    let most = (crate::basis::RUN_BYTES / chunk_bytes.max(1)).max(1);
    let mut out: Vec<Piece> = Vec::new();
    for (i, &entry) in entries.iter().enumerate() {
        let chunk = page * PAGE_CHUNKS + i as u64;
        match (out.last_mut(), entry) {
            (Some(Piece::Zeroes { first, count }), Entry::Zero)
                if *first + *count == chunk && *count < most =>
            {
                *count += 1;
            }
            (_, Entry::Zero) => out.push(Piece::Zeroes {
                first: chunk,
                count: 1,
            }),
            (Some(Piece::Frames(run)), Entry::Frame { .. })
                if run.len() < most as usize && follows(run, chunk, entry) =>
            {
                run.push((chunk, entry));
            }
            (_, Entry::Frame { .. }) => out.push(Piece::Frames(vec![(chunk, entry)])),
        }
    }
    out
}

/// Whether `chunk`'s frame (`entry`) comes right after the run's last, chunk and bytes.
fn follows(run: &[(u64, Entry)], chunk: u64, entry: Entry) -> bool {
    let Some(&(
        last,
        Entry::Frame {
            source,
            object,
            offset,
            length,
        },
    )) = run.last()
    else {
        return false;
    };
    let Entry::Frame {
        source: s,
        object: o,
        offset: at,
        ..
    } = entry
    else {
        return false;
    };
    last + 1 == chunk
        && (s, o) == (source, object)
        && offset.checked_add(u64::from(length)) == Some(at)
}

/// Where a pass's GETs are charged: the throttle's background bucket of this volume.
pub type Charge<'a> = (&'a Throttle, &'a str);

/// Waits for the throttle to pass `bytes` of a pass's GET, a slice at a time.
async fn charge(to: Option<Charge<'_>>, mut bytes: u64) {
    let Some((throttle, volume)) = to else {
        return;
    };
    while bytes > 0 {
        let n = bytes.min(THROTTLE_SLICE);
        throttle.acquire(volume, Class::Background, n).await;
        bytes -= n;
    }
}

/// The stored bytes of a run of frames.
fn stored_bytes(run: &[(u64, Entry)]) -> u64 {
    run.iter()
        .map(|(_, e)| match e {
            Entry::Frame { length, .. } => u64::from(*length),
            Entry::Zero => 0,
        })
        .sum()
}

/// Runs the futures of `jobs` in this task (so they may borrow), at most `most` at
/// once, started in order; hands each answer to `each` as it comes. After the first
/// error (`jobs`' or `each`'s) it starts no more, lets those running end (a job that
/// must stop then watches for it itself: see [`Halt`]), and returns that error.
async fn at_most<T, F>(
    jobs: impl IntoIterator<Item = F>,
    most: usize,
    mut each: impl FnMut(T) -> Result<(), OxError>,
) -> Result<(), OxError>
where
    F: Future<Output = Result<T, OxError>>,
{
    let mut jobs = jobs.into_iter();
    let mut running: Vec<std::pin::Pin<Box<F>>> = Vec::with_capacity(most);
    let mut failed = None;
    loop {
        while failed.is_none() && running.len() < most.max(1) {
            match jobs.next() {
                Some(job) => running.push(Box::pin(job)),
                None => break,
            }
        }
        if running.is_empty() {
            return failed.map_or(Ok(()), Err);
        }
        let answer = std::future::poll_fn(|cx| {
            for i in 0..running.len() {
                if let std::task::Poll::Ready(r) = running[i].as_mut().poll(cx) {
                    drop(running.swap_remove(i));
                    return std::task::Poll::Ready(r);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        if let Err(e) = answer.and_then(&mut each) {
            failed.get_or_insert(e);
        }
    }
}

/// Fetches and checks every frame of the snapshot (its own and those it references),
/// reporting each bad one instead of stopping at the first, with [`PASS_RUNS`] runs of
/// frames in flight (charged to `charge`, if given); `pass` counts the chunks examined
/// (of `manifest.chunks()`) and the bytes fetched, and may cancel it.
pub async fn verify(
    store: &dyn ObjectStore,
    loaded: &Loaded,
    charge_to: Option<Charge<'_>>,
    pass: &Pass,
) -> Result<VerifyReport, OxError> {
    pass.unless_cancelled("verify", verify_all(store, loaded, charge_to, pass))
        .await
}

async fn verify_all(
    store: &dyn ObjectStore,
    loaded: &Loaded,
    charge_to: Option<Charge<'_>>,
    pass: &Pass,
) -> Result<VerifyReport, OxError> {
    let m = &loaded.manifest;
    let mut report = VerifyReport::default();
    for page in 0..m.page_count() {
        let (index, n) = loaded.page(store, page, None).await?;
        pass.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let pieces = pieces(page, &index.entries, u64::from(m.chunk_bytes));
        let checks = pieces.into_iter().map(|piece| async move {
            let run = match piece {
                Piece::Zeroes { count, .. } => return Ok((count, 0, Vec::new())),
                Piece::Frames(run) => run,
            };
            charge(charge_to, stored_bytes(&run)).await;
            let fetched = |n: usize| {
                pass.bytes.fetch_add(n as u64, Ordering::Relaxed);
            };
            if loaded.run(store, &run, None, fetched).await.is_ok() {
                return Ok((0, run.len() as u64, Vec::new()));
            }
            // Something in the run stays bad: each frame alone, to name which.
            let mut bad = Vec::new();
            for &(chunk, entry) in &run {
                charge(charge_to, stored_bytes(&[(chunk, entry)])).await;
                if let Err(e) = loaded.chunk(store, chunk, entry, None, fetched).await {
                    bad.push((chunk, e.to_string()));
                }
            }
            Ok((0, run.len() as u64 - bad.len() as u64, bad))
        });
        at_most(checks, PASS_RUNS, |(zero, frames, bad)| {
            let examined = zero + frames + bad.len() as u64;
            report.zero += zero;
            report.frames += frames;
            report.bad.extend(bad);
            pass.chunks.fetch_add(examined, Ordering::Relaxed);
            Ok(())
        })
        .await?;
    }
    report.bad.sort_by_key(|(chunk, _)| *chunk);
    assert_eq!(
        report.zero + report.frames + report.bad.len() as u64,
        m.chunks(),
        "every chunk examined once"
    );
    Ok(report)
}

/// Copies the whole snapshot onto `target` (same size), through reactor `on`: every
/// stored chunk is written, every zero chunk written as zeroes, with [`PASS_RUNS`] runs
/// of frames in flight (charged to `charge`, if given); `pass` counts the chunks
/// written and the bytes fetched, and may cancel it. Returns bytes written.
pub async fn restore(
    store: &dyn ObjectStore,
    loaded: &Loaded,
    target: &Bdev,
    on: &ReactorHandle,
    charge_to: Option<Charge<'_>>,
    pass: &Pass,
) -> Result<u64, OxError> {
    let m = &loaded.manifest;
    if target.info().size_bytes() != m.volume_bytes {
        return Err(OxError::Config(format!(
            "restore target {} holds {} bytes, the snapshot {}",
            target.name(),
            target.info().size_bytes(),
            m.volume_bytes
        )));
    }
    // Cancelled, it stops its GETs at once but waits for its writes (see `Halt`).
    let block = u64::from(target.block_size());
    let chunk_bytes = u64::from(m.chunk_bytes);
    // Bytes from `chunk` on, `count` chunks (the last chunk may be short).
    let span = |chunk: u64, count: u64| {
        let start = chunk * chunk_bytes;
        (start + count * chunk_bytes).min(m.volume_bytes) - start
    };
    let halt = Halt::new(pass);
    let mut written = 0;
    for page in 0..m.page_count() {
        let (index, n) = halt.unless(loaded.page(store, page, None)).await?;
        pass.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let pieces = pieces(page, &index.entries, chunk_bytes);
        let halt = &halt;
        let copy = |piece: Piece| async move {
            if halt.halted() {
                return Err(OxError::Cancelled("restore cancelled".into()));
            }
            let (first, count, io) = match piece {
                Piece::Zeroes { first, count } => {
                    let len = span(first, count);
                    let io = BdevIo::write_zeroes(first * chunk_bytes / block, len / block);
                    (first, count, io)
                }
                Piece::Frames(run) => {
                    let fetched = |n: usize| {
                        pass.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    };
                    let data = halt
                        .unless(async {
                            charge(charge_to, stored_bytes(&run)).await;
                            loaded.run(store, &run, None, fetched).await
                        })
                        .await?;
                    let (first, count) = (run[0].0, run.len() as u64);
                    let bufs = data.iter().map(|d| IoBuf::from_slice(d)).collect();
                    let len = span(first, count);
                    let io = BdevIo::write(first * chunk_bytes / block, len / block, bufs);
                    (first, count, io)
                }
            };
            // Sent, a write is waited for whatever happens meanwhile.
            crate::blockio::run(on, target, io).await?;
            Ok((count, span(first, count)))
        };
        let copies = pieces.into_iter().map(|piece| async move {
            let copied = copy(piece).await;
            if copied.is_err() {
                halt.fail();
            }
            copied
        });
        at_most(copies, PASS_RUNS, |(count, bytes)| {
            written += bytes;
            pass.chunks.fetch_add(count, Ordering::Relaxed);
            Ok(())
        })
        .await?;
    }
    assert_eq!(
        written, m.volume_bytes,
        "every byte of the volume written once"
    );
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walks_latency_is_its_quickest_answer_and_never_grows() {
        let mut l = RunLatency::default();
        assert_eq!(l.quickest(), Duration::ZERO, "before the first answer");
        l.answered(Duration::from_millis(60));
        assert_eq!(l.quickest(), Duration::from_millis(60));
        l.answered(Duration::from_millis(45));
        for _ in 0..100 {
            // Its own runs queued ahead: slower answers do not move it.
            l.answered(Duration::from_millis(400));
        }
        assert_eq!(l.quickest(), Duration::from_millis(45));
    }

    #[test]
    fn a_walk_limited_by_a_throttle_reads_its_volumes_limit_as_it_changes() {
        use crate::throttle::{Class, Limit, Throttle};
        let control = Thickening::new();
        assert_eq!(control.limit(), 0, "no limit known");
        let throttle = Throttle::new(Limit::NONE, Limit::per_second(32 << 20));
        control.limited_by(throttle.clone(), "c");
        assert_eq!(control.limit(), 32 << 20, "the global limit");
        throttle.set_volume("c", Class::Background, Limit::per_second(4 << 20));
        assert_eq!(control.limit(), 4 << 20, "the clone's own, set later");
        throttle.set_volume("other", Class::Background, Limit::per_second(1 << 20));
        assert_eq!(control.limit(), 4 << 20, "not another volume's");
        // What the walk then keeps beside hosts on a far store: what 4 MiB/s lets by.
        let far = Duration::from_millis(120);
        assert_eq!(
            sharing_window(far, control.limit(), DEFAULT_WINDOW, 64 << 10),
            2
        );
        throttle.set_volume("c", Class::Background, Limit::NONE);
        assert_eq!(
            sharing_window(far, control.limit(), DEFAULT_WINDOW, 64 << 10),
            8
        );
    }

    fn frame(source: u16, object: u32, offset: u64, length: u32) -> Entry {
        Entry::Frame {
            source,
            object,
            offset,
            length,
        }
    }

    /// A pass's pieces: frames back to back in one object, chunk after chunk, travel
    /// together, and zero chunks likewise; another object, a gap in the object, a
    /// zero chunk between, or the run's size, begins another.
    #[test]
    fn a_pass_fetches_frames_back_to_back_together_and_nothing_else() {
        let entries = [
            frame(0, 0, 0, 100),
            frame(0, 0, 100, 100),
            Entry::Zero,
            Entry::Zero,
            frame(0, 0, 200, 100),
            frame(0, 1, 0, 100),
            frame(0, 1, 150, 100),
            frame(1, 1, 250, 100),
        ];
        let p = pieces(2, &entries, 64 << 10);
        let at = 2 * PAGE_CHUNKS;
        assert_eq!(
            p,
            [
                Piece::Frames(vec![(at, entries[0]), (at + 1, entries[1])]),
                Piece::Zeroes {
                    first: at + 2,
                    count: 2
                },
                Piece::Frames(vec![(at + 4, entries[4])]),
                Piece::Frames(vec![(at + 5, entries[5])]),
                Piece::Frames(vec![(at + 6, entries[6])]),
                Piece::Frames(vec![(at + 7, entries[7])]),
            ]
        );
        // Chunks of half a run: two a piece.
        let half = crate::basis::RUN_BYTES / 2;
        let entries = [
            frame(0, 0, 0, 10),
            frame(0, 0, 10, 10),
            frame(0, 0, 20, 10),
            Entry::Zero,
            Entry::Zero,
            Entry::Zero,
        ];
        let sizes: Vec<usize> = pieces(0, &entries, half)
            .iter()
            .map(|p| match p {
                Piece::Frames(run) => run.len(),
                Piece::Zeroes { count, .. } => *count as usize,
            })
            .collect();
        assert_eq!(sizes, [2, 1, 2, 1]);
    }

    /// `at_most` never has more than its limit going at once, runs every job, hands
    /// every answer over; after the first error it starts no more, lets those running
    /// end, and returns that error.
    #[test]
    fn at_most_keeps_its_limit_and_ends_on_the_first_error() {
        use std::cell::{Cell, RefCell};
        let (now, most) = (Cell::new(0), Cell::new(0));
        let (started, ended) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
        let job = |i: u32| {
            let (now, most, started, ended) = (&now, &most, &started, &ended);
            async move {
                started.borrow_mut().push(i);
                now.set(now.get() + 1);
                most.set(most.get().max(now.get()));
                for _ in 0..i % 3 {
                    futures_lite::future::yield_now().await;
                }
                now.set(now.get() - 1);
                ended.borrow_mut().push(i);
                match i {
                    13 => Err(OxError::Config("thirteen".into())),
                    14 => Err(OxError::Config("fourteen".into())),
                    i => Ok(i),
                }
            }
        };
        let mut seen = Vec::new();
        let r = futures_lite::future::block_on(at_most((0..10).map(job), 4, |i| {
            seen.push(i);
            Ok(())
        }));
        assert!(r.is_ok());
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(most.get(), 4);
        started.borrow_mut().clear();
        ended.borrow_mut().clear();
        let r = futures_lite::future::block_on(at_most((0..100).map(job), 4, |_| Ok(())));
        // 14 was running when 13 failed, and failed after it: the first is returned.
        assert!(r.is_err_and(|e| e.to_string().contains("thirteen")));
        let (mut started, mut ended) = (started.take(), ended.take());
        assert!(started.contains(&14) && ended.ends_with(&[14]), "{ended:?}");
        // Started before 13 ended: at most three after it.
        assert!(started.len() <= 17, "{started:?}");
        started.sort_unstable();
        ended.sort_unstable();
        assert_eq!(started, ended, "every job started ran to its end");
    }

    /// A pass moves once: cancelled, it cannot be sealed; sealed, a cancel does not
    /// take (and says so); a second cancel still reports the first.
    #[test]
    fn a_pass_is_cancelled_or_sealed_never_both() {
        let p = Pass::default();
        assert!(p.cancel() && p.cancel() && p.is_cancelled());
        assert!(!p.seal());
        let p = Pass::default();
        assert!(p.seal());
        assert!(!p.cancel() && !p.is_cancelled());
    }
}
