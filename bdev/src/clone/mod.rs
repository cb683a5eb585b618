//! `clone`: a volume that is readable and writable at once over a basis held elsewhere
//! (a snapshot in object storage). Reads go to the local copy when a chunk is present
//! and otherwise become a *miss*: a fetch handed to the basis (OX fetch cores), whose
//! data is installed in the local copy. A read within one chunk is answered from the
//! fetched bytes as they arrive; one spanning chunks reads the local copy once they are
//! all installed.
//!
//! Writes never lose bytes over an unfetched chunk: a write covering whole chunks makes
//! them present by itself; a write covering part of a chunk first fetches it
//! (fetch-then-merge). Concurrent misses on one chunk share one fetch.
//!
//! Who owns what:
//! - the chunk states (absent, fetching, installing, claimed, present) belong to one
//!   reactor, the clone's *owner* (`owner.rs`), held in a [`core::Core`] that is
//!   changed only by events: misses, write plans, fetch answers, installs. Channels on
//!   other reactors send it messages.
//! - the owner publishes presence (one bit per chunk) and a few counts with plain
//!   stores, being their only writer; the I/O path reads them with loads. A hit — a
//!   read of present chunks, a write to present chunks already on record — takes no
//!   lock, no read-modify-write and no message: it goes straight to the local copy.
//! - the presence record (what is durable) belongs to the journal thread
//!   (`journal.rs`), which alone writes its `durable` bits.

pub(crate) mod core;
mod journal;
mod owner;
pub mod read_ahead;
pub mod walk;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use reactor::{Reactor, ReactorHandle};
use uuid::Uuid;

use self::core::Event;
use self::journal::{Journal, JournalWork, Note};
use self::read_ahead::{Geometry, MOST_READ_AHEAD_BYTES, READ_AHEAD_BYTES, ReadAhead};
use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo, Channel};
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};
use crate::medium::Medium;
use crate::park::{Answer, park, park_for, unpark};
use crate::presence::PresenceFiles;

/// Why a chunk is fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchReason {
    /// A host read or partial write needs it now.
    ClientMiss,
    /// Ahead of hosts: a sequential reader's read-ahead, a new clone's warm-up of its
    /// working set.
    Prefetch,
    /// Background thickening.
    Thickening,
    /// The appliance's own read needs it now ([`BdevIo::internal`]: a snapshot of a
    /// volume made over a snapshot, reading what it has not fetched yet). Waited for,
    /// but by no host: it is fetched as background work is (its connections, its
    /// bandwidth limit), not with the hosts' misses.
    Internal,
}

impl FetchReason {
    /// Every reason, in the order of [`CloneCounters`]' arrays.
    pub const ALL: [Self; 4] = [
        Self::ClientMiss,
        Self::Prefetch,
        Self::Thickening,
        Self::Internal,
    ];

    /// This reason's place in [`CloneCounters`]' arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether a host waits on it.
    pub fn is_host(self) -> bool {
        self == Self::ClientMiss
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
    /// The basis (an object store) could not be reached, or failed.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The basis refused (an object store's 4xx, a certificate not trusted): no retry
    /// would succeed, so it is not an outage to wait out.
    #[error("refused: {0}")]
    Refused(String),
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
    /// Fetches several chunks for one reason (ascending, and adjacent when a read-ahead
    /// asks); each `done` runs once, on any thread. A basis that can fetch adjacent
    /// chunks in one request (an object store's ranged GET) overrides this.
    fn fetch_batch(&self, batch: Vec<(u64, FetchDone)>, reason: FetchReason) {
        for (chunk, done) in batch {
            self.fetch(chunk, reason, done);
        }
    }
    /// Size of the image in bytes, if known; a clone's local copy must match it.
    fn size_bytes(&self) -> Option<u64> {
        None
    }
    /// The bytes a sequential reader should have asked for ahead of it, as this basis
    /// sees its store now ([`read_ahead::wanted_bytes`] of its store's round trip and
    /// its limit), once it knows that round trip (from any request it has made: an
    /// index page's at the clone's opening, or a frame's). Called on the I/O path for
    /// every sequential read, hits included: loads, no lock.
    fn read_ahead_bytes(&self) -> Option<u64> {
        None
    }
}

/// Counters of one clone, written by its owner reactor only (hence plain stores).
#[derive(Debug, Default)]
pub struct CloneCounters {
    /// Bytes fetched, by reason ([`FetchReason::index`]).
    pub fetched_bytes: [AtomicU64; FetchReason::ALL.len()],
    /// Fetches completed, by reason.
    pub fetches: [AtomicU64; FetchReason::ALL.len()],
    /// Fetches that failed.
    pub fetch_errors: AtomicU64,
    /// Chunks made present by whole-chunk writes (no fetch needed).
    pub written_whole: AtomicU64,
    /// Client-miss latency: from the miss to the chunk being present locally.
    pub miss_latency: crate::stats::SharedHistogram,
}

/// Adds `by` to a counter that has a single writer: a load and a store, not a locked
/// read-modify-write.
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Release,
    );
}

/// Sets `bits` in a bitmap word that has a single writer (see [`bump`]).
pub(crate) fn publish(word: &AtomicU64, bits: u64) {
    word.store(word.load(Ordering::Relaxed) | bits, Ordering::Release);
}

fn bit(words: &[AtomicU64], chunk: u64) -> bool {
    words
        .get((chunk / 64) as usize)
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
}

/// What every core may read of a clone; the owner and the journal write their parts.
struct Shared {
    /// Names the owner's state on its reactor.
    id: u64,
    name: String,
    local: Bdev,
    basis: Arc<dyn Basis>,
    chunk_bytes: u64,
    block_size: u64,
    size: u64,
    chunks: u64,
    /// The reactor that owns the chunk states: given at open, else the first that asks.
    owner: OnceLock<ReactorHandle>,
    /// The device is gone and the owner told to drop its state: a request still on its
    /// way (read-ahead, thickening) is refused rather than given a fresh state.
    released: std::sync::atomic::AtomicBool,
    /// One bit per chunk: present locally (written by the owner only).
    presence: Arc<[AtomicU64]>,
    /// Chunks present (written by the owner only).
    present_count: AtomicU64,
    /// Chunks hosts wait for, being fetched or installed (written by the owner only).
    misses_in_flight: AtomicU64,
    /// Notified when `misses_in_flight` falls to 0 (background work waits on it).
    misses_done: event_listener::Event,
    /// When the last client miss ended, µs since `epoch` (written by the owner only):
    /// background work yields while hosts are reading cold data.
    last_miss_end_us: AtomicU64,
    epoch: Instant,
    /// The durable record of presence, if this clone keeps one.
    journal: Option<Journal>,
    /// Chunks fetched ahead of a sequential reader: the least its ceiling is...
    read_ahead: AtomicU64,
    /// ...and the most, where the basis wants more (see [`read_ahead`]).
    most_read_ahead: AtomicU64,
    counters: CloneCounters,
}

/// Names clones' owner states and write plans.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    fn is_present(&self, chunk: u64) -> bool {
        bit(&self.presence, chunk)
    }

    /// Whether `chunk`'s presence is on disk (always, for a clone without a record):
    /// only then may a host write to it be acknowledged.
    fn is_durable(&self, chunk: u64) -> bool {
        self.journal.as_ref().is_none_or(|j| bit(&j.durable, chunk))
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        (self.size - chunk * self.chunk_bytes).min(self.chunk_bytes)
    }

    /// The owner, chosen now as `fallback` if none is yet.
    fn owner_or(&self, fallback: &ReactorHandle) -> &ReactorHandle {
        self.owner.get_or_init(|| fallback.clone())
    }

    /// The chunks `io` touches. On every I/O, so a power-of-two chunk (the usual case)
    /// costs shifts, not two 64-bit divisions.
    fn chunks_of(&self, io: &BdevIo) -> std::ops::RangeInclusive<u64> {
        let start = io.offset_blocks * self.block_size;
        let end = start + io.num_blocks.max(1) * self.block_size - 1;
        let (first, last) = if self.chunk_bytes.is_power_of_two() {
            let shift = self.chunk_bytes.trailing_zeros();
            (start >> shift, end >> shift)
        } else {
            (start / self.chunk_bytes, end / self.chunk_bytes)
        };
        first..=last.min(self.chunks - 1)
    }

    fn covers_whole(&self, io: &BdevIo, chunk: u64) -> bool {
        let start = io.offset_blocks * self.block_size;
        let end = start + io.num_blocks * self.block_size;
        let c0 = chunk * self.chunk_bytes;
        start <= c0 && end >= c0 + self.chunk_len(chunk)
    }
}

struct CloneBackend {
    shared: Arc<Shared>,
}

impl Drop for CloneBackend {
    fn drop(&mut self) {
        self.shared.released.store(true, Ordering::SeqCst);
        if let Some(owner) = self.shared.owner.get() {
            owner::release(self.shared.id, owner);
        }
    }
}

struct CloneChannel {
    shared: Arc<Shared>,
    owner: ReactorHandle,
    local: Rc<Channel>,
    reactor: Rc<Reactor>,
    /// The read-ahead of the reader on this channel.
    ahead: Cell<ReadAhead>,
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
        let absent = s.chunks - s.present_count.load(Ordering::Acquire).min(s.chunks);
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
            owner: self.shared.owner_or(reactor.handle()).clone(),
            shared: Arc::clone(&self.shared),
            local: self.shared.local.channel()?,
            reactor,
            ahead: Cell::new(ReadAhead::default()),
        }))
    }
}

impl CloneChannel {
    fn waiter(&self, token: u64) -> owner::Waiter {
        (self.reactor.handle().clone(), token)
    }

    /// A read that starts where the previous one ended fetches the next chunks ahead
    /// (only those absent: on a hydrated clone this is a few loads), as its
    /// [`ReadAhead`] decides.
    fn read_ahead(&self, io: &BdevIo, last_chunk: u64) {
        let s = &self.shared;
        let start = io.offset_blocks * s.block_size;
        let end = start + io.num_blocks * s.block_size;
        let clone = || Geometry {
            read_ahead: s.read_ahead.load(Ordering::Relaxed),
            most: s.most_read_ahead.load(Ordering::Relaxed),
            chunk_bytes: s.chunk_bytes,
            chunks: s.chunks,
            wanted_bytes: s.basis.read_ahead_bytes(),
        };
        let mut ahead = self.ahead.get();
        let asked = ahead.on_read((start, end), last_chunk, clone);
        self.ahead.set(ahead);
        let absent: Vec<u64> = asked
            .into_iter()
            .flatten()
            .filter(|&c| !s.is_present(c))
            .collect();
        if !absent.is_empty() {
            owner::send(
                s,
                &self.owner,
                Event::Need {
                    chunks: absent,
                    reason: FetchReason::Prefetch,
                    waiter: None,
                },
            );
        }
    }

    fn read(&self, io: BdevIo, done: IoDone) {
        let s = &self.shared;
        let chunks = s.chunks_of(&io);
        let hit = chunks.clone().all(|c| s.is_present(c));
        // The appliance's own reads of what is here (a snapshot reading the chunks
        // written here) say nothing of what a host reads next; once they miss (a
        // snapshot reading the whole volume), reading ahead pays as for a host.
        if !(io.internal && hit) {
            self.read_ahead(&io, *chunks.end());
        }
        if hit {
            return self.local.pass(io, done);
        }
        let (first, last) = (*chunks.start(), *chunks.end());
        let reason = if io.internal && !io.host_waits {
            FetchReason::Internal
        } else {
            FetchReason::ClientMiss
        };
        let local = Rc::clone(&self.local);
        if first == last {
            // The usual miss: answered from the fetched bytes, not the local copy.
            let at = (io.offset_blocks * s.block_size - first * s.chunk_bytes) as usize;
            let name = s.name.clone();
            let token = park_for(move |r| match r {
                Ok(Answer::Data(data)) => done.complete(copy_out(io, &data, at, &name, first)),
                Ok(_) => local.pass(io, done),
                Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
            });
            let waiter = self.waiter(token);
            return owner::send(
                s,
                &self.owner,
                Event::Read {
                    chunk: first,
                    reason,
                    waiter,
                },
            );
        }
        let missing: Vec<u64> = chunks.filter(|&c| !s.is_present(c)).collect();
        let token = park(move |r| match r {
            Ok(()) => local.pass(io, done),
            Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
        });
        owner::send(
            s,
            &self.owner,
            Event::Need {
                chunks: missing,
                reason,
                waiter: Some(self.waiter(token)),
            },
        );
    }
}

/// Completes read `io` from `data`, its chunk's bytes, starting `at` bytes into it.
fn copy_out(io: BdevIo, data: &[u8], at: usize, name: &str, chunk: u64) -> IoCompletion {
    let mut bufs = io.bufs;
    let mut at = at;
    for b in &mut bufs {
        let n = b.len();
        match data.get(at..at + n) {
            Some(src) => b.copy_from_slice(src),
            None => {
                // The request lies within the chunk (checked by the caller), and the
                // bytes are the chunk's length (checked on arrival).
                let e = BdevError::Basis {
                    name: name.to_string(),
                    chunk,
                    reason: FetchError::Failed("a read beyond its chunk's bytes".into()),
                };
                return IoCompletion::err(bufs, e);
            }
        }
        at += n;
    }
    IoCompletion::ok(bufs)
}

/// What a modifying request needs to go on.
struct Modify {
    shared: Arc<Shared>,
    owner: ReactorHandle,
    local: Rc<Channel>,
    reactor: Rc<Reactor>,
}

impl Modify {
    /// Writes, write-zeroes and deallocation. Over present chunks the write goes straight
    /// to the local copy; otherwise the owner is asked for a plan: every absent chunk the
    /// request covers whole is claimed for it (it fills them itself), partial ones are
    /// fetched first, and it plans again after any wait.
    fn start(self, io: BdevIo, done: IoDone) {
        let s = &self.shared;
        let chunks = s.chunks_of(&io);
        if chunks.clone().all(|c| s.is_present(c)) {
            return self.write(io, done, None);
        }
        let (mut whole, mut partial) = (Vec::new(), Vec::new());
        for c in chunks.filter(|&c| !s.is_present(c)) {
            if s.covers_whole(&io, c) {
                whole.push(c);
            } else {
                partial.push(c);
            }
        }
        let plan = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let here = self.reactor.handle().clone();
        let (shared, owner) = (Arc::clone(&self.shared), self.owner.clone());
        let token = park_for(move |r| match r {
            Ok(Answer::Granted(claims)) => self.write(io, done, Some((plan, claims))),
            Ok(Answer::Done | Answer::Data(_)) => self.start(io, done),
            Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
        });
        owner::send(
            &shared,
            &owner,
            Event::Plan {
                plan,
                whole,
                partial,
                waiter: (here, token),
            },
        );
    }

    /// Writes to the local copy; acknowledges once every chunk touched is on the
    /// presence record (else a restart would fetch over it), then ends the plan's claims.
    fn write(self, io: BdevIo, done: IoDone, claims: Option<(u64, Vec<u64>)>) {
        let s = Arc::clone(&self.shared);
        let touched = s.chunks_of(&io);
        if claims.is_none() && touched.clone().all(|c| s.is_durable(c)) {
            if io.io_type == IoType::Unmap {
                return unmap_as_zeroes(&self.local, io, done);
            }
            return self.local.pass(io, done);
        }
        let (local, reactor) = (Rc::clone(&self.local), Rc::clone(&self.reactor));
        let after = IoDone::new(move |c: IoCompletion| {
            let end = move |result: Result<(), String>| {
                if let Some((plan, chunks)) = claims {
                    let event = Event::WriteEnded {
                        plan,
                        chunks,
                        result,
                    };
                    owner::send(&self.shared, &self.owner, event);
                }
            };
            if let Err(e) = &c.result {
                end(Err(e.to_string()));
                return done.complete(c);
            }
            let needed: Vec<u64> = touched.filter(|&ch| !s.is_durable(ch)).collect();
            if needed.is_empty() {
                end(Ok(()));
                return done.complete(c);
            }
            let token = park(move |result| match result {
                Ok(()) => {
                    end(Ok(()));
                    done.complete(c)
                }
                Err(e) => {
                    end(Err(e.to_string()));
                    done.complete(IoCompletion::err(c.bufs, e))
                }
            });
            request_durable(&s, needed, &reactor, token);
        });
        if io.io_type == IoType::Unmap {
            unmap_as_zeroes(&local, io, after);
        } else {
            local.pass(io, after);
        }
    }
}

/// Deallocation of a clone must read back as zeroes, not as the basis: it becomes
/// Write Zeroes on the local copy.
fn unmap_as_zeroes(local: &Rc<Channel>, io: BdevIo, done: IoDone) {
    local.submit(
        BdevIo::write_zeroes(io.offset_blocks, io.num_blocks),
        move |c| done.complete(c),
    );
}

/// Asks the journal to make `chunks` durable, then to release `token` on `reactor`.
/// A journal that is gone fails the token.
fn request_durable(shared: &Arc<Shared>, chunks: Vec<u64>, reactor: &Rc<Reactor>, token: u64) {
    let Some(journal) = &shared.journal else {
        return unpark(token, Ok(()));
    };
    match journal
        .tx
        .send(Note::Need(chunks, reactor.handle().clone(), token))
    {
        Ok(()) => {}
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
            IoType::Write | IoType::WriteZeroes
                if self
                    .shared
                    .chunks_of(&io)
                    .all(|c| self.shared.is_present(c) && self.shared.is_durable(c)) =>
            {
                // The hit: nothing to claim or record, nothing shared to touch.
                self.local.pass(io, done)
            }
            IoType::Write | IoType::WriteZeroes | IoType::Unmap => Modify {
                shared: Arc::clone(&self.shared),
                owner: self.owner.clone(),
                local: Rc::clone(&self.local),
                reactor: Rc::clone(&self.reactor),
            }
            .start(io, done),
            IoType::Flush => self.local.pass(io, done),
        }
    }
}

/// A handle on a clone's state for the control plane and thickening.
#[derive(Clone)]
pub struct CloneHandle {
    shared: Arc<Shared>,
    device: Bdev,
}

impl CloneHandle {
    /// Counters.
    pub fn counters(&self) -> &CloneCounters {
        &self.shared.counters
    }

    /// Bytes read by hosts (every successful read of the clone device).
    pub fn host_read_bytes(&self) -> u64 {
        self.device.stats().bytes(IoType::Read)
    }

    /// (chunks present, chunks in total).
    pub fn hydration(&self) -> (u64, u64) {
        (
            self.shared.present_count.load(Ordering::Acquire),
            self.shared.chunks,
        )
    }

    /// Whether `chunk` is present locally.
    pub fn is_present(&self, chunk: u64) -> bool {
        self.shared.is_present(chunk)
    }

    /// Recently missed chunks, most recent first (thickening fetches around them
    /// first). Asked of the owner: from a thread that is not a reactor, or on the owner;
    /// empty elsewhere or before the clone has an owner.
    pub fn hot_chunks(&self) -> Vec<u64> {
        let s = &self.shared;
        s.owner
            .get()
            .and_then(|owner| owner::query(s, owner, |core| core.hot()))
            .unwrap_or_default()
    }

    /// Chunks hosts are waiting on the basis for, now.
    pub fn misses_in_flight(&self) -> u64 {
        self.shared.misses_in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no host waits on the basis (at once if none does now).
    pub async fn misses_settled(&self) {
        loop {
            if self.misses_in_flight() == 0 {
                return;
            }
            let settled = self.shared.misses_done.listen();
            // Looked at again once listening, so the last miss ending cannot be missed.
            if self.misses_in_flight() == 0 {
                return;
            }
            settled.await;
        }
    }

    /// Whether a client-miss fetch ended within `grace`: hosts are reading cold data.
    /// Background fetches (thickening) hold back then, so client misses never queue
    /// behind them.
    pub fn missed_within(&self, grace: std::time::Duration) -> bool {
        let s = &self.shared;
        let last = s.last_miss_end_us.load(Ordering::Acquire);
        last != 0
            && (s.epoch.elapsed().as_micros() as u64).saturating_sub(last)
                < grace.as_micros() as u64
    }

    /// Sets how many chunks a sequential reader gets fetched ahead, whatever the store's
    /// latency (0: none).
    pub fn set_read_ahead(&self, chunks: u64) {
        self.shared.read_ahead.store(chunks, Ordering::Relaxed);
        self.shared.most_read_ahead.store(chunks, Ordering::Relaxed);
    }

    /// Chunk size.
    pub fn chunk_bytes(&self) -> u64 {
        self.shared.chunk_bytes
    }

    /// Makes `chunk` present (for thickening and prefetch), asked from reactor `on`
    /// (the clone's owner, if it has none yet); `done` runs on `on` when it is (or
    /// failed).
    pub fn fetch_on(
        &self,
        on: &ReactorHandle,
        chunk: u64,
        reason: FetchReason,
        done: impl FnOnce(Result<(), BdevError>) + Send + 'static,
    ) -> Result<(), BdevError> {
        self.fetch_many_on(on, vec![chunk], reason, done)
    }

    /// Makes `chunks` present, asked in one event so the basis gets them as one batch
    /// (adjacent ones travel together); `done` runs on `on` once all are (or one
    /// failed).
    pub fn fetch_many_on(
        &self,
        on: &ReactorHandle,
        chunks: Vec<u64>,
        reason: FetchReason,
        done: impl FnOnce(Result<(), BdevError>) + Send + 'static,
    ) -> Result<(), BdevError> {
        let shared = Arc::clone(&self.shared);
        if shared.released.load(Ordering::SeqCst) {
            return Err(BdevError::Config {
                name: shared.name.clone(),
                reason: "the clone is gone".into(),
            });
        }
        if let Some(chunk) = chunks.iter().find(|&&c| c >= shared.chunks) {
            return Err(BdevError::Config {
                name: shared.name.clone(),
                reason: format!("chunk {chunk} is beyond the clone's {}", shared.chunks),
            });
        }
        let owner = shared.owner_or(on).clone();
        on.send(move || {
            let Some(reactor) = reactor::current() else {
                return;
            };
            let token = park(done);
            let waiter = Some((reactor.handle().clone(), token));
            let event = Event::Need {
                chunks,
                reason,
                waiter,
            };
            owner::send(&shared, &owner, event);
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
    let medium = crate::medium::local();
    open_clone_on(medium, name, local, basis, uuid, presence, flush_on)
}

/// [`open_clone`] with the presence record on `medium` (a power-cut test puts it on
/// one that loses what was never synced).
pub fn open_clone_on(
    medium: Arc<dyn Medium>,
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
    presence: &std::path::Path,
    flush_on: ReactorHandle,
) -> Result<(Bdev, CloneHandle), BdevError> {
    let record = Record {
        medium,
        path: presence,
        flush_on,
    };
    build(name, local, basis, uuid, Some(record))
}

/// Where a clone's presence is recorded, and the reactor that flushes for it.
struct Record<'a> {
    medium: Arc<dyn Medium>,
    path: &'a std::path::Path,
    flush_on: ReactorHandle,
}

fn build(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
    record: Option<Record<'_>>,
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
    let owner = OnceLock::new();
    if let Some(r) = &record {
        // The reactor that flushes the local copy for the record owns the chunks too.
        let _ = owner.set(r.flush_on.clone());
    }
    let (presence, journal): (Arc<[AtomicU64]>, Option<Journal>) = match record {
        None => ((0..words).map(|_| AtomicU64::new(0)).collect(), None),
        Some(Record {
            medium,
            path,
            flush_on,
        }) => {
            let (files, mut present) = PresenceFiles::open(medium, path, chunks)?;
            // Bits beyond the last chunk never count.
            if !chunks.is_multiple_of(64)
                && let Some(last) = present.last_mut()
            {
                *last &= (1u64 << (chunks % 64)) - 1;
            }
            let presence: Arc<[AtomicU64]> = present.iter().map(|&w| AtomicU64::new(w)).collect();
            let durable: Arc<[AtomicU64]> = present.iter().map(|&w| AtomicU64::new(w)).collect();
            // Unbounded: what waits in it is bounded by the clone's writes and fetches
            // in flight, and a write waiting for the record must never be turned away.
            let (tx, rx) = crossbeam_channel::unbounded();
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
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        owner,
        released: std::sync::atomic::AtomicBool::new(false),
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
        misses_done: event_listener::Event::new(),
        last_miss_end_us: AtomicU64::new(0),
        epoch: Instant::now(),
        counters: CloneCounters::default(),
        read_ahead: AtomicU64::new((READ_AHEAD_BYTES / chunk_bytes).max(2)),
        most_read_ahead: AtomicU64::new((MOST_READ_AHEAD_BYTES / chunk_bytes).max(2)),
    });
    let present: u64 = shared
        .presence
        .iter()
        .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
        .sum();
    shared.present_count.store(present, Ordering::Relaxed);
    let bdev = Bdev::new(
        info,
        CloneBackend {
            shared: Arc::clone(&shared),
        },
    )?;
    let handle = CloneHandle {
        shared,
        device: bdev.clone(),
    };
    Ok((bdev, handle))
}
