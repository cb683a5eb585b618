//! `clone`: a volume that is readable and writable at once over a basis held elsewhere
//! (a snapshot in object storage). Reads go to the local copy when a chunk is present
//! and otherwise become a *miss*: a fetch handed to the basis (OX fetch cores), whose
//! data is installed in the local copy before the read completes from it.
//!
//! Writes never lose bytes over an unfetched chunk: a write covering whole chunks makes
//! them present by itself; a write covering part of a chunk first fetches it
//! (fetch-then-merge). Concurrent misses on one chunk share one fetch. Presence is an
//! atomic flag per chunk, so the hit path takes no lock; only the miss path touches the
//! shared table of chunks being made present.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use reactor::{Reactor, ReactorHandle};
use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo, Channel};
use crate::buf::IoBuf;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};
use crate::presence::PresenceFiles;

/// Why a chunk is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// A host read or partial write needs it now.
    ClientMiss,
    /// Read-ahead of a sequential reader.
    Prefetch,
    /// Background thickening.
    Thickening,
}

impl FetchReason {
    fn index(self) -> usize {
        self as usize
    }
}

/// Completion of a fetch: the chunk's bytes (exactly its length) or why not. Called on
/// any thread.
pub type FetchDone = Box<dyn FnOnce(Result<Vec<u8>, FetchError>) + Send>;

/// Why a basis could not supply a chunk: a caller retries an outage later, while an
/// integrity failure (after the basis's own refetches) means the data is damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// What came failed its integrity check every time it was fetched.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// The basis (an object store) could not be reached or refused.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Anything else: a local write, a full queue, a stopped reactor.
    #[error("{0}")]
    Failed(String),
}

/// Where a clone's missing chunks come from.
pub trait Basis: Send + Sync + 'static {
    /// Chunk size in bytes (a multiple of the clone's block size).
    fn chunk_bytes(&self) -> u64;
    /// Fetches chunk `chunk`; `done` runs once, on any thread.
    fn fetch(&self, chunk: u64, reason: FetchReason, done: FetchDone);
    /// Size of the image in bytes, if known; a clone's local copy must match it.
    fn size_bytes(&self) -> Option<u64> {
        None
    }
}

/// Counters of one clone.
#[derive(Debug, Default)]
pub struct CloneCounters {
    /// Bytes read by hosts.
    pub host_read_bytes: AtomicU64,
    /// Bytes fetched, by reason (client miss, prefetch, thickening).
    pub fetched_bytes: [AtomicU64; 3],
    /// Fetches completed, by reason.
    pub fetches: [AtomicU64; 3],
    /// Fetches that failed.
    pub fetch_errors: AtomicU64,
    /// Chunks made present by whole-chunk writes (no fetch needed).
    pub written_whole: AtomicU64,
    /// Client-miss latency: from the miss to the chunk being present locally.
    pub miss_latency: crate::stats::SharedHistogram,
}

type Waiter = (ReactorHandle, u64);

struct Shared {
    name: String,
    local: Bdev,
    basis: Arc<dyn Basis>,
    chunk_bytes: u64,
    block_size: u64,
    size: u64,
    /// One bit per chunk: present locally.
    presence: Arc<[AtomicU64]>,
    /// The durable record of presence, if this clone keeps one.
    journal: Option<Journal>,
    chunks: u64,
    present_count: AtomicU64,
    /// Chunks fetched ahead of a sequential reader.
    read_ahead: AtomicU64,
    /// Recently missed chunks, newest last: where thickening starts.
    hot: Mutex<std::collections::VecDeque<u64>>,
    /// Client-miss fetches in flight, and when the last one ended (µs since `epoch`):
    /// background work yields while hosts are waiting on the basis.
    misses_in_flight: AtomicU64,
    last_miss_end_us: AtomicU64,
    epoch: Instant,
    /// Chunks being made present (by a fetch or a whole-chunk write), with who waits.
    pending: Mutex<HashMap<u64, Vec<Waiter>>>,
    counters: CloneCounters,
}

/// Chunks fetched ahead of a sequential reader: 1 MiB at the usual 64 KiB chunk, enough
/// to cover an object store's first-byte latency at a few hundred MB/s.
const READ_AHEAD: u64 = 16;

/// Work to resume once a chunk is present (or failed to become so).
type Continuation = Box<dyn FnOnce(Result<(), BdevError>)>;

/// Sends `msg` to `to`, retrying while its mailbox is full (from a reactor, on a
/// timer; from any other thread, after a short sleep), so a wake-up is never lost to
/// back-pressure. Only a stopped reactor drops it (its parked work is gone with it).
pub(crate) fn deliver(to: ReactorHandle, msg: reactor::Message) -> bool {
    let mut msg = msg;
    loop {
        match to.try_send(msg) {
            Ok(()) => return true,
            Err((reactor::ReactorError::MailboxFull { .. }, m)) => match reactor::current() {
                Some(r) => {
                    r.after(std::time::Duration::from_micros(50), move || {
                        deliver(to, m);
                    });
                    return true;
                }
                None => {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    msg = m;
                }
            },
            Err(_) => return false,
        }
    }
}

thread_local! {
    /// Continuations parked on this reactor until a chunk becomes present.
    static PARKED: RefCell<(u64, HashMap<u64, Continuation>)> =
        RefCell::new((0, HashMap::new()));
}

pub(crate) fn park(f: impl FnOnce(Result<(), BdevError>) + 'static) -> u64 {
    PARKED.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 == 0
            && let Some(r) = reactor::current()
        {
            // First park on this reactor: when it stops, fail whatever is still
            // parked, so no host I/O is left without a completion.
            r.on_stop(fail_parked);
        }
        p.0 += 1;
        let token = p.0;
        p.1.insert(token, Box::new(f));
        token
    })
}

/// Completes every parked continuation on this reactor with "shutting down".
fn fail_parked() {
    let parked: Vec<Continuation> =
        PARKED.with(|p| p.borrow_mut().1.drain().map(|(_, f)| f).collect());
    for f in parked {
        f(Err(BdevError::ShuttingDown));
    }
}

pub(crate) fn unpark(token: u64, result: Result<(), BdevError>) {
    let f = PARKED.with(|p| p.borrow_mut().1.remove(&token));
    if let Some(f) = f {
        f(result);
    }
}

fn bit(words: &[AtomicU64], chunk: u64) -> bool {
    words
        .get((chunk / 64) as usize)
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Vec<Waiter>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_present(&self, chunk: u64) -> bool {
        bit(&self.presence, chunk)
    }

    /// Whether `chunk`'s presence is on disk (always, for a clone without a record):
    /// only then may a host write to it be acknowledged.
    fn is_durable(&self, chunk: u64) -> bool {
        self.journal.as_ref().is_none_or(|j| bit(&j.durable, chunk))
    }

    fn note_miss(&self, chunk: u64) {
        let mut hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        if hot.len() >= 4096 {
            hot.pop_front();
        }
        hot.push_back(chunk);
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        (self.size - chunk * self.chunk_bytes).min(self.chunk_bytes)
    }

    fn mark_present(&self, chunk: u64) {
        let bit = 1u64 << (chunk % 64);
        if let Some(w) = self.presence.get((chunk / 64) as usize)
            && w.fetch_or(bit, Ordering::AcqRel) & bit == 0
        {
            self.present_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wakes everyone waiting for `chunk`.
    fn finish(&self, chunk: u64, result: Result<(), BdevError>) {
        let waiters = self.pending().remove(&chunk).unwrap_or_default();
        for (reactor, token) in waiters {
            let r = result.clone_err();
            deliver(reactor, Box::new(move || unpark(token, r)));
        }
    }
}

trait CloneErr {
    fn clone_err(&self) -> Self;
}

impl CloneErr for Result<(), BdevError> {
    fn clone_err(&self) -> Self {
        match self {
            Ok(()) => Ok(()),
            Err(BdevError::Basis {
                name,
                chunk,
                reason,
            }) => Err(BdevError::Basis {
                name: name.clone(),
                chunk: *chunk,
                reason: reason.clone(),
            }),
            Err(e) => Err(BdevError::Basis {
                name: String::new(),
                chunk: 0,
                reason: FetchError::Failed(e.to_string()),
            }),
        }
    }
}

/// Waits for several chunks, then runs one action (or fails it with the first error).
struct Gate {
    remaining: std::cell::Cell<usize>,
    error: RefCell<Option<BdevError>>,
    action: RefCell<Option<Continuation>>,
}

impl Gate {
    /// A gate holding one arrival for its creator, released by [`Gate::arrive`].
    fn new(action: impl FnOnce(Result<(), BdevError>) + 'static) -> Rc<Self> {
        Rc::new(Self {
            remaining: std::cell::Cell::new(1),
            error: RefCell::new(None),
            action: RefCell::new(Some(Box::new(action))),
        })
    }

    fn expect(&self) {
        self.remaining.set(self.remaining.get() + 1);
    }

    fn arrive(&self, result: Result<(), BdevError>) {
        if let Err(e) = result {
            self.error.borrow_mut().get_or_insert(e);
        }
        self.remaining.set(self.remaining.get() - 1);
        if self.remaining.get() == 0 {
            let action = self.action.borrow_mut().take();
            let error = self.error.borrow_mut().take();
            if let Some(a) = action {
                a(error.map_or(Ok(()), Err));
            }
        }
    }
}

struct CloneBackend {
    shared: Arc<Shared>,
}

struct CloneChannel {
    shared: Arc<Shared>,
    local: Rc<Channel>,
    reactor: Rc<Reactor>,
    /// Where the last read on this channel ended (bytes): a read starting there is
    /// sequential and triggers read-ahead.
    last_end: std::cell::Cell<u64>,
}

impl BdevBackend for CloneBackend {
    fn supports(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Flush => self.shared.local.supports(IoType::Flush),
            _ => true,
        }
    }

    /// What the local copy holds, plus every chunk still read from the basis (counted
    /// as allocated: the snapshot may hold data there until the clone knows otherwise).
    fn allocated_blocks(&self, info: &BdevInfo) -> Option<u64> {
        let s = &self.shared;
        let absent = s.chunks - s.present_count.load(Ordering::Relaxed).min(s.chunks);
        let per_chunk = s.chunk_bytes / u64::from(info.block_size);
        Some(
            s.local
                .allocated_blocks()
                .saturating_add(absent.saturating_mul(per_chunk)),
        )
    }

    fn create_channel(&self, _info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        Ok(Box::new(CloneChannel {
            shared: Arc::clone(&self.shared),
            local: self.shared.local.channel()?,
            reactor,
            last_end: std::cell::Cell::new(u64::MAX),
        }))
    }
}

/// Makes `chunk` present (fetching it if nobody else is); `gate` gets one arrival.
fn ensure_present(
    shared: &Arc<Shared>,
    reactor: &Rc<Reactor>,
    chunk: u64,
    reason: FetchReason,
    gate: &Rc<Gate>,
) {
    if shared.is_present(chunk) {
        return;
    }
    gate.expect();
    let g = Rc::clone(gate);
    let token = park(move |r| g.arrive(r));
    let start_fetch = {
        let mut pending = shared.pending();
        if shared.is_present(chunk) {
            drop(pending);
            unpark(token, Ok(()));
            return;
        }
        match pending.get_mut(&chunk) {
            Some(waiters) => {
                waiters.push((reactor.handle().clone(), token));
                false
            }
            None => {
                pending.insert(chunk, vec![(reactor.handle().clone(), token)]);
                true
            }
        }
    };
    if start_fetch {
        start(shared, reactor, chunk, reason);
    }
}

/// Asks the basis for `chunk`; the result is installed on this reactor.
fn start(shared: &Arc<Shared>, reactor: &Rc<Reactor>, chunk: u64, reason: FetchReason) {
    let home = reactor.handle().clone();
    let s = Arc::clone(shared);
    let started = Instant::now();
    let client = reason == FetchReason::ClientMiss;
    if client {
        shared.misses_in_flight.fetch_add(1, Ordering::Relaxed);
    }
    shared.basis.fetch(
        chunk,
        reason,
        Box::new(move |result| {
            if client {
                s.last_miss_end_us
                    .store(s.epoch.elapsed().as_micros() as u64, Ordering::Relaxed);
                s.misses_in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            let s2 = Arc::clone(&s);
            if !deliver(
                home,
                Box::new(move || install(&s2, chunk, reason, started, result)),
            ) {
                // The reactor that asked has stopped: release everyone else waiting.
                s.finish(
                    chunk,
                    Err(BdevError::Basis {
                        name: s.name.clone(),
                        chunk,
                        reason: FetchError::Failed("the reactor that fetched it stopped".into()),
                    }),
                );
            }
        }),
    );
}

/// Writes fetched data into the local copy, marks the chunk present, wakes waiters.
fn install(
    shared: &Arc<Shared>,
    chunk: u64,
    reason: FetchReason,
    started: Instant,
    result: Result<Vec<u8>, FetchError>,
) {
    let fail = |reason_text: FetchError| {
        shared.counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
        shared.finish(
            chunk,
            Err(BdevError::Basis {
                name: shared.name.clone(),
                chunk,
                reason: reason_text,
            }),
        );
    };
    let data = match result {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let len = shared.chunk_len(chunk);
    if data.len() as u64 != len {
        return fail(FetchError::Integrity(format!(
            "basis returned {} bytes, expected {len}",
            data.len()
        )));
    }
    let local = match shared.local.channel() {
        Ok(c) => c,
        Err(e) => return fail(FetchError::Failed(e.to_string())),
    };
    let blocks = len / shared.block_size;
    let io = BdevIo::write(
        chunk * shared.chunk_bytes / shared.block_size,
        blocks,
        vec![IoBuf::from_slice(&data)],
    );
    let s = Arc::clone(shared);
    local.submit(io, move |c: IoCompletion| match c.result {
        Ok(()) => {
            let i = reason.index();
            s.counters.fetched_bytes[i].fetch_add(len, Ordering::Relaxed);
            s.counters.fetches[i].fetch_add(1, Ordering::Relaxed);
            if reason == FetchReason::ClientMiss {
                s.counters.miss_latency.record(started.elapsed());
            }
            s.mark_present(chunk);
            if let Some(j) = &s.journal {
                // Recorded lazily: a fetched chunk lost in a crash is fetched again.
                let _ = j.tx.try_send(Note::Installed(chunk));
            }
            s.finish(chunk, Ok(()));
        }
        Err(e) => {
            s.counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
            s.finish(
                chunk,
                Err(BdevError::Basis {
                    name: s.name.clone(),
                    chunk,
                    reason: FetchError::Failed(format!("writing the local copy: {e}")),
                }),
            );
        }
    });
}

impl CloneChannel {
    fn chunks(&self, io: &BdevIo) -> std::ops::RangeInclusive<u64> {
        io_chunks(&self.shared, io)
    }

    /// A read that starts where the previous one ended fetches the next chunks ahead.
    fn read_ahead(&self, io: &BdevIo, last_chunk: u64) {
        let start = io.offset_blocks * self.shared.block_size;
        let end = start + io.num_blocks * self.shared.block_size;
        let sequential = self.last_end.replace(end) == start;
        let ahead = self.shared.read_ahead.load(Ordering::Relaxed);
        if !sequential || ahead == 0 {
            return;
        }
        let gate = Gate::new(|_| {});
        for c in (last_chunk + 1)..(last_chunk + 1 + ahead).min(self.shared.chunks) {
            ensure_present(&self.shared, &self.reactor, c, FetchReason::Prefetch, &gate);
        }
        gate.arrive(Ok(()));
    }

    fn read(&self, io: BdevIo, done: IoDone) {
        let chunks = self.chunks(&io);
        self.read_ahead(&io, *chunks.end());
        if chunks.clone().all(|c| self.shared.is_present(c)) {
            let s = Arc::clone(&self.shared);
            let bytes = io.num_blocks * self.shared.block_size;
            return self.local.submit(io, move |c| {
                if c.result.is_ok() {
                    s.counters
                        .host_read_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                }
                done(c)
            });
        }
        let local = Rc::clone(&self.local);
        let s = Arc::clone(&self.shared);
        let bytes = io.num_blocks * self.shared.block_size;
        let gate = Gate::new(move |result| match result {
            Ok(()) => local.submit(io, move |c| {
                if c.result.is_ok() {
                    s.counters
                        .host_read_bytes
                        .fetch_add(bytes, Ordering::Relaxed);
                }
                done(c)
            }),
            Err(e) => done(IoCompletion::err(io.bufs, e)),
        });
        for c in chunks.clone() {
            if !self.shared.is_present(c) {
                self.shared.note_miss(c);
            }
        }
        for c in chunks {
            ensure_present(
                &self.shared,
                &self.reactor,
                c,
                FetchReason::ClientMiss,
                &gate,
            );
        }
        gate.arrive(Ok(()));
    }

    /// Writes, write-zeroes and deallocation: absent chunks are made present first
    /// (whole ones by this write itself, partial ones by a fetch).
    fn modify(&self, io: BdevIo, done: IoDone) {
        modify_on(
            Arc::clone(&self.shared),
            Rc::clone(&self.local),
            Rc::clone(&self.reactor),
            io,
            done,
        );
    }
}

fn io_chunks(shared: &Shared, io: &BdevIo) -> std::ops::RangeInclusive<u64> {
    let start = io.offset_blocks * shared.block_size;
    let end = start + io.num_blocks * shared.block_size - 1;
    (start / shared.chunk_bytes)..=(end / shared.chunk_bytes)
}

fn io_covers_whole(shared: &Shared, io: &BdevIo, chunk: u64) -> bool {
    let start = io.offset_blocks * shared.block_size;
    let end = start + io.num_blocks * shared.block_size;
    let c0 = chunk * shared.chunk_bytes;
    start <= c0 && end >= c0 + shared.chunk_len(chunk)
}

/// One attempt at a modifying request. Under the table lock it either claims every
/// absent chunk the request covers whole — all at once — or claims nothing; a request
/// never holds a claim while it waits, so two writes can never wait on each other.
/// If anything must be waited for (a chunk someone else is filling, or a partial chunk
/// to fetch), it waits holding nothing and then plans again.
fn modify_on(
    shared: Arc<Shared>,
    local: Rc<Channel>,
    reactor: Rc<Reactor>,
    io: BdevIo,
    done: IoDone,
) {
    let (claims, waits) = {
        let mut pending = shared.pending();
        let mut claims = Vec::new();
        let mut waits = Vec::new();
        for c in io_chunks(&shared, &io) {
            if shared.is_present(c) {
                continue;
            }
            if pending.contains_key(&c) || !io_covers_whole(&shared, &io, c) {
                waits.push(c);
            } else {
                claims.push(c);
            }
        }
        if waits.is_empty() {
            for c in &claims {
                pending.insert(*c, Vec::new());
            }
        }
        (claims, waits)
    };
    if !waits.is_empty() {
        let (s, l, r) = (Arc::clone(&shared), Rc::clone(&local), Rc::clone(&reactor));
        let gate = Gate::new(move |result| match result {
            Ok(()) => modify_on(s, l, r, io, done),
            Err(e) => done(IoCompletion::err(io.bufs, e)),
        });
        for c in waits {
            ensure_present(&shared, &reactor, c, FetchReason::ClientMiss, &gate);
        }
        gate.arrive(Ok(()));
        return;
    }
    // Deallocation of a clone must read back as zeroes, not as the basis: it becomes
    // Write Zeroes on the local copy.
    let io = if io.io_type == IoType::Unmap {
        BdevIo::write_zeroes(io.offset_blocks, io.num_blocks)
    } else {
        io
    };
    let touched = io_chunks(&shared, &io);
    local.submit(io, move |c| {
        if let Err(e) = &c.result {
            let reason = format!("the write that was to fill it failed: {e}");
            release(&shared, claims, Err(reason));
            return done(c);
        }
        // The write is on the local copy; before it is acknowledged, every chunk it
        // touched must be recorded present on disk, or a restart would fetch over it.
        let needed: Vec<u64> = touched.filter(|&ch| !shared.is_durable(ch)).collect();
        if needed.is_empty() {
            release(&shared, claims, Ok(()));
            return done(c);
        }
        let s = Arc::clone(&shared);
        let token = park(move |result| match result {
            Ok(()) => {
                release(&s, claims, Ok(()));
                done(c)
            }
            Err(e) => {
                release(&s, claims, Err(e.to_string()));
                done(IoCompletion::err(c.bufs, e))
            }
        });
        request_durable(&shared, needed, &reactor, token);
    });
}

/// Ends whole-chunk claims: present and waiters woken, or waiters failed.
fn release(shared: &Shared, claims: Vec<u64>, result: Result<(), String>) {
    for chunk in claims {
        match &result {
            Ok(()) => {
                shared
                    .counters
                    .written_whole
                    .fetch_add(1, Ordering::Relaxed);
                shared.mark_present(chunk);
                shared.finish(chunk, Ok(()));
            }
            Err(reason) => shared.finish(
                chunk,
                Err(BdevError::Basis {
                    name: shared.name.clone(),
                    chunk,
                    reason: FetchError::Failed(reason.clone()),
                }),
            ),
        }
    }
}

/// Asks the journal to make `chunks` durable, then to release `token` on `reactor`.
/// A full journal queue is retried on a timer; a journal that is gone fails the token.
fn request_durable(shared: &Arc<Shared>, chunks: Vec<u64>, reactor: &Rc<Reactor>, token: u64) {
    let Some(journal) = &shared.journal else {
        return unpark(token, Ok(()));
    };
    match journal
        .tx
        .try_send(Note::Need(chunks, reactor.handle().clone(), token))
    {
        Ok(()) => {}
        Err(crossbeam_channel::TrySendError::Full(Note::Need(chunks, _, _))) => {
            let (s, r) = (Arc::clone(shared), Rc::clone(reactor));
            reactor.after(std::time::Duration::from_micros(100), move || {
                request_durable(&s, chunks, &r, token);
            });
        }
        Err(_) => unpark(
            token,
            Err(BdevError::Presence {
                path: journal.path.clone(),
                reason: "the presence journal has stopped".into(),
            }),
        ),
    }
}

impl BackendChannel for CloneChannel {
    fn submit(&self, io: BdevIo, done: IoDone) {
        match io.io_type {
            IoType::Read => self.read(io, done),
            IoType::Write | IoType::WriteZeroes | IoType::Unmap => self.modify(io, done),
            IoType::Flush => self.local.submit(io, done),
        }
    }
}

/// A handle on a clone's state for the control plane and thickening.
#[derive(Clone)]
pub struct CloneHandle {
    shared: Arc<Shared>,
}

impl CloneHandle {
    /// Counters.
    pub fn counters(&self) -> &CloneCounters {
        &self.shared.counters
    }

    /// (chunks present, chunks in total).
    pub fn hydration(&self) -> (u64, u64) {
        (
            self.shared.present_count.load(Ordering::Relaxed),
            self.shared.chunks,
        )
    }

    /// Whether `chunk` is present locally.
    pub fn is_present(&self, chunk: u64) -> bool {
        self.shared.is_present(chunk)
    }

    /// Recently missed chunks, most recent first (thickening fetches around them first).
    pub fn hot_chunks(&self) -> Vec<u64> {
        let hot = self.shared.hot.lock().unwrap_or_else(|p| p.into_inner());
        hot.iter().rev().copied().collect()
    }

    /// Client-miss fetches in flight now.
    pub fn misses_in_flight(&self) -> u64 {
        self.shared.misses_in_flight.load(Ordering::Relaxed)
    }

    /// Whether a client-miss fetch ended within `grace`: hosts are reading cold data.
    /// Background fetches (thickening) hold back then, so client misses never queue
    /// behind them.
    pub fn missed_within(&self, grace: std::time::Duration) -> bool {
        let s = &self.shared;
        let last = s.last_miss_end_us.load(Ordering::Relaxed);
        last != 0
            && (s.epoch.elapsed().as_micros() as u64).saturating_sub(last)
                < grace.as_micros() as u64
    }

    /// Sets how many chunks a sequential reader gets fetched ahead (0: none).
    pub fn set_read_ahead(&self, chunks: u64) {
        self.shared.read_ahead.store(chunks, Ordering::Relaxed);
    }

    /// Chunk size.
    pub fn chunk_bytes(&self) -> u64 {
        self.shared.chunk_bytes
    }

    /// Makes `chunk` present from reactor `on` (for thickening and prefetch); `done`
    /// runs on that reactor when it is (or failed).
    pub fn fetch_on(
        &self,
        on: &ReactorHandle,
        chunk: u64,
        reason: FetchReason,
        done: impl FnOnce(Result<(), BdevError>) + Send + 'static,
    ) -> Result<(), BdevError> {
        let shared = Arc::clone(&self.shared);
        on.send(move || {
            let Some(reactor) = reactor::current() else {
                return;
            };
            let gate = Gate::new(done);
            ensure_present(&shared, &reactor, chunk, reason, &gate);
            gate.arrive(Ok(()));
        })?;
        Ok(())
    }
}

impl CloneHandle {
    /// Writes a checkpoint of the present set (after flushing the local copy through
    /// its reactor) and empties the journal's log. A clone without a presence record
    /// has nothing to write.
    pub fn checkpoint(&self) -> Result<(), BdevError> {
        self.checkpoint_with(true)
    }

    /// [`Self::checkpoint`] for when the reactors have stopped: the caller has made the
    /// local copy durable itself (fsync of its file), so no flush is sent.
    pub fn checkpoint_flushed(&self) -> Result<(), BdevError> {
        self.checkpoint_with(false)
    }

    fn checkpoint_with(&self, flush: bool) -> Result<(), BdevError> {
        let Some(journal) = &self.shared.journal else {
            return Ok(());
        };
        let stopped = || BdevError::Presence {
            path: journal.path.clone(),
            reason: "the presence journal has stopped".into(),
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        journal
            .tx
            .send(Note::Checkpoint(tx, flush))
            .map_err(|_| stopped())?;
        rx.recv().map_err(|_| stopped())?
    }

    /// Stops the presence journal for good (the clone is being deleted): after this,
    /// nothing is written to its record, and writes to the clone fail.
    pub fn retire(&self) -> Result<(), BdevError> {
        let Some(journal) = &self.shared.journal else {
            return Ok(());
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if journal.tx.send(Note::Retire(tx)).is_err() {
            return Ok(());
        }
        rx.recv().unwrap_or(Ok(()))
    }
}

/// A request to a clone's presence journal.
enum Note {
    /// A fetch installed this chunk; record it when convenient.
    Installed(u64),
    /// Make these chunks durable, then release this token on this reactor.
    Need(Vec<u64>, ReactorHandle, u64),
    /// Write a checkpoint and reply; `true`: flush the local copy first (`false`: the
    /// caller made it durable, e.g. after the reactors stopped).
    Checkpoint(crossbeam_channel::Sender<Result<(), BdevError>>, bool),
    /// Stop for good (the clone is being deleted): nothing is written after the reply.
    Retire(crossbeam_channel::Sender<Result<(), BdevError>>),
}

/// The thread that keeps a clone's presence on disk, by group commit: every request
/// that arrives while one commit runs joins the next. A commit flushes the local copy
/// first, so a chunk is never on record as present before its bytes are durable.
struct Journal {
    tx: crossbeam_channel::Sender<Note>,
    /// One bit per chunk: recorded present on disk.
    durable: Arc<[AtomicU64]>,
    path: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the queue ends the thread; wait for it unless this is a reactor (the
        // thread may be waiting on a flush that this very reactor would run).
        let (tx, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.tx, tx));
        if reactor::current().is_none()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

/// How long a fetched chunk may wait to be recorded when nothing else forces a commit.
const LAZY_RECORD: std::time::Duration = std::time::Duration::from_millis(200);

/// Everything the journal thread owns.
struct JournalWork {
    rx: crossbeam_channel::Receiver<Note>,
    files: PresenceFiles,
    presence: Arc<[AtomicU64]>,
    durable: Arc<[AtomicU64]>,
    local: Bdev,
    flush_on: ReactorHandle,
}

impl JournalWork {
    /// Flushes the local copy through its reactor, waiting out a full mailbox (a busy
    /// reactor is no reason to fail the writes waiting on this commit).
    fn flush_local(&self) -> Result<(), BdevError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match crate::blocking::run_on(
                &self.flush_on,
                &self.local,
                BdevIo::flush(),
                std::time::Duration::from_secs(60),
            ) {
                Ok(c) => return c.result,
                Err(BdevError::Reactor(reactor::ReactorError::MailboxFull { .. }))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn run(mut self) {
        let mut lazy: Vec<u64> = Vec::new();
        let mut lazy_since: Option<Instant> = None;
        loop {
            let first = match lazy_since {
                None => match self.rx.recv() {
                    Ok(n) => Some(n),
                    Err(_) => return,
                },
                Some(t) => match self.rx.recv_deadline(t + LAZY_RECORD) {
                    Ok(n) => Some(n),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                },
            };
            let (mut needs, mut checkpoints) = (Vec::new(), Vec::new());
            let mut flush = true;
            let mut retire = None;
            for note in first.into_iter().chain(self.rx.try_iter().take(4096)) {
                match note {
                    Note::Installed(c) => {
                        lazy.push(c);
                        lazy_since.get_or_insert_with(Instant::now);
                    }
                    Note::Need(chunks, reactor, token) => needs.push((chunks, reactor, token)),
                    Note::Checkpoint(reply, f) => {
                        flush &= f;
                        checkpoints.push(reply);
                    }
                    Note::Retire(reply) => retire = Some(reply),
                }
            }
            if let Some(reply) = retire {
                // Whoever still waits is told the record is gone; nothing more is written.
                let gone = || BdevError::Presence {
                    path: String::new(),
                    reason: "the clone is being deleted".into(),
                };
                for (_, reactor, token) in needs {
                    let e = gone();
                    deliver(reactor, Box::new(move || unpark(token, Err(e))));
                }
                for r in checkpoints {
                    let _ = r.send(Err(gone()));
                }
                let _ = reply.send(Ok(()));
                return;
            }
            let due = !needs.is_empty()
                || !checkpoints.is_empty()
                || lazy.len() >= 8192
                || lazy_since.is_some_and(|t| t.elapsed() >= LAZY_RECORD);
            if !due {
                continue;
            }
            lazy_since = None;
            let mut batch: Vec<u64> = lazy
                .drain(..)
                .chain(needs.iter().flat_map(|n| n.0.iter().copied()))
                .filter(|&c| !bit(&self.durable, c))
                .collect();
            batch.sort_unstable();
            batch.dedup();
            let full = !checkpoints.is_empty() || self.files.wants_checkpoint();
            // Writes waiting to be acknowledged always get a flush.
            let flush = flush || !needs.is_empty();
            let result = self.commit(&batch, full, flush).map_err(|e| e.to_string());
            for (_, reactor, token) in needs {
                let r = result.clone().map_err(|reason| BdevError::Presence {
                    path: String::new(),
                    reason,
                });
                deliver(reactor, Box::new(move || unpark(token, r)));
            }
            for reply in checkpoints {
                let _ = reply.send(result.clone().map_err(|reason| BdevError::Presence {
                    path: String::new(),
                    reason,
                }));
            }
        }
    }

    /// Records `batch` (and, if `full`, every present chunk as a new checkpoint),
    /// flushing the local copy first unless told it is durable already.
    fn commit(&mut self, batch: &[u64], full: bool, flush: bool) -> Result<(), BdevError> {
        if batch.is_empty() && !full {
            return Ok(());
        }
        // Read the present set before the flush: each of its chunks was written
        // locally before being marked, so the flush covers it.
        let mut words: Vec<u64> = if full {
            self.presence
                .iter()
                .zip(self.durable.iter())
                .map(|(p, d)| p.load(Ordering::Acquire) | d.load(Ordering::Acquire))
                .collect()
        } else {
            Vec::new()
        };
        if flush && self.local.supports(IoType::Flush) {
            self.flush_local()?;
        }
        if full {
            for &c in batch {
                if let Some(w) = words.get_mut((c / 64) as usize) {
                    *w |= 1 << (c % 64);
                }
            }
            self.files.checkpoint(&words)?;
            for (d, w) in self.durable.iter().zip(&words) {
                d.fetch_or(*w, Ordering::AcqRel);
            }
        } else {
            self.files.append(batch)?;
            for &c in batch {
                if let Some(d) = self.durable.get((c / 64) as usize) {
                    d.fetch_or(1 << (c % 64), Ordering::AcqRel);
                }
            }
        }
        Ok(())
    }
}

/// Creates a clone named `name` whose local copy is `local` and whose missing chunks
/// come from `basis`. Its size is the local copy's. Presence lives only in memory: for
/// clones whose local copy does not outlive the process (tests, benchmarks).
pub fn create_clone(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
) -> Result<(Bdev, CloneHandle), BdevError> {
    build(name, local, basis, uuid, None)
}

/// Opens a clone whose presence is recorded at `presence` (created if absent, resumed
/// if there): chunks present before a restart or a crash stay present, and a host
/// write is acknowledged only once the chunks it touched are on record. Flushes of the
/// local copy for the record run on reactor `flush_on`.
pub fn open_clone(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
    presence: &std::path::Path,
    flush_on: ReactorHandle,
) -> Result<(Bdev, CloneHandle), BdevError> {
    build(name, local, basis, uuid, Some((presence, flush_on)))
}

fn build(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
    record: Option<(&std::path::Path, ReactorHandle)>,
) -> Result<(Bdev, CloneHandle), BdevError> {
    let info = BdevInfo {
        name: name.to_string(),
        block_size: local.block_size(),
        num_blocks: local.num_blocks(),
        uuid: uuid.unwrap_or_else(Uuid::new_v4),
    };
    let chunk_bytes = basis.chunk_bytes();
    let block_size = u64::from(local.block_size());
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(block_size) {
        return Err(BdevError::Config {
            name: name.to_string(),
            reason: format!(
                "chunk size {chunk_bytes} is not a multiple of the block size {block_size}"
            ),
        });
    }
    let size = local.info().size_bytes();
    if let Some(image) = basis.size_bytes()
        && image != size
    {
        return Err(BdevError::Config {
            name: name.to_string(),
            reason: format!("the local copy holds {size} bytes but the basis image {image}"),
        });
    }
    let chunks = size.div_ceil(chunk_bytes);
    let words = chunks.div_ceil(64) as usize;
    let (presence, journal): (Arc<[AtomicU64]>, Option<Journal>) = match record {
        None => ((0..words).map(|_| AtomicU64::new(0)).collect(), None),
        Some((path, flush_on)) => {
            let (files, mut present) = PresenceFiles::open(path, chunks)?;
            // Bits beyond the last chunk never count.
            if !chunks.is_multiple_of(64)
                && let Some(last) = present.last_mut()
            {
                *last &= (1u64 << (chunks % 64)) - 1;
            }
            let presence: Arc<[AtomicU64]> = present.iter().map(|&w| AtomicU64::new(w)).collect();
            let durable: Arc<[AtomicU64]> = present.iter().map(|&w| AtomicU64::new(w)).collect();
            let (tx, rx) = crossbeam_channel::bounded(16384);
            let work = JournalWork {
                rx,
                files,
                presence: Arc::clone(&presence),
                durable: Arc::clone(&durable),
                local: local.clone(),
                flush_on,
            };
            let thread = std::thread::Builder::new()
                .name(format!("presence-{name}"))
                .spawn(move || work.run())
                .map_err(|e| BdevError::Presence {
                    path: path.display().to_string(),
                    reason: format!("starting the journal thread: {e}"),
                })?;
            let journal = Journal {
                tx,
                durable,
                path: path.display().to_string(),
                thread: Some(thread),
            };
            (presence, Some(journal))
        }
    };
    let shared = Arc::new(Shared {
        name: name.to_string(),
        local,
        basis,
        chunk_bytes,
        block_size,
        size,
        presence,
        journal,
        chunks,
        present_count: AtomicU64::new(0),
        misses_in_flight: AtomicU64::new(0),
        last_miss_end_us: AtomicU64::new(0),
        epoch: Instant::now(),
        pending: Mutex::new(HashMap::new()),
        counters: CloneCounters::default(),
        read_ahead: AtomicU64::new(READ_AHEAD),
        hot: Mutex::new(std::collections::VecDeque::new()),
    });
    let present: u64 = shared
        .presence
        .iter()
        .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
        .sum();
    shared.present_count.store(present, Ordering::Relaxed);
    let handle = CloneHandle {
        shared: Arc::clone(&shared),
    };
    let bdev = Bdev::new(info, CloneBackend { shared })?;
    Ok((bdev, handle))
}
