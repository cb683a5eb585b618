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
pub type FetchDone = Box<dyn FnOnce(Result<Vec<u8>, String>) + Send>;

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
    presence: Box<[AtomicU64]>,
    chunks: u64,
    present_count: AtomicU64,
    /// Chunks fetched ahead of a sequential reader.
    read_ahead: u64,
    /// Recently missed chunks, newest last: where thickening starts.
    hot: Mutex<std::collections::VecDeque<u64>>,
    /// Chunks being made present (by a fetch or a whole-chunk write), with who waits.
    pending: Mutex<HashMap<u64, Vec<Waiter>>>,
    counters: CloneCounters,
}

/// Work to resume once a chunk is present (or failed to become so).
type Continuation = Box<dyn FnOnce(Result<(), BdevError>)>;

/// Sends `msg` to `to`, retrying while its mailbox is full (from a reactor, on a
/// timer; from any other thread, after a short sleep), so a wake-up is never lost to
/// back-pressure. Only a stopped reactor drops it (its parked work is gone with it).
fn deliver(to: ReactorHandle, msg: reactor::Message) -> bool {
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

fn park(f: impl FnOnce(Result<(), BdevError>) + 'static) -> u64 {
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

fn unpark(token: u64, result: Result<(), BdevError>) {
    let f = PARKED.with(|p| p.borrow_mut().1.remove(&token));
    if let Some(f) = f {
        f(result);
    }
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, HashMap<u64, Vec<Waiter>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_present(&self, chunk: u64) -> bool {
        self.presence
            .get((chunk / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (chunk % 64)) != 0)
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
                reason: e.to_string(),
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
    shared.basis.fetch(
        chunk,
        reason,
        Box::new(move |result| {
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
                        reason: "the reactor that fetched it stopped".into(),
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
    result: Result<Vec<u8>, String>,
) {
    let fail = |reason_text: String| {
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
        return fail(format!(
            "basis returned {} bytes, expected {len}",
            data.len()
        ));
    }
    let local = match shared.local.channel() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
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
            s.finish(chunk, Ok(()));
        }
        Err(e) => {
            s.counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
            s.finish(
                chunk,
                Err(BdevError::Basis {
                    name: s.name.clone(),
                    chunk,
                    reason: format!("writing the local copy: {e}"),
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
        if !sequential || self.shared.read_ahead == 0 {
            return;
        }
        let gate = Gate::new(|_| {});
        for c in (last_chunk + 1)..(last_chunk + 1 + self.shared.read_ahead).min(self.shared.chunks)
        {
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
    local.submit(io, move |c| {
        let ok = c.result.is_ok();
        for chunk in claims {
            if ok {
                shared
                    .counters
                    .written_whole
                    .fetch_add(1, Ordering::Relaxed);
                shared.mark_present(chunk);
                shared.finish(chunk, Ok(()));
            } else {
                shared.finish(
                    chunk,
                    Err(BdevError::Basis {
                        name: shared.name.clone(),
                        chunk,
                        reason: "the write that was to fill it failed".into(),
                    }),
                );
            }
        }
        done(c)
    });
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

const PRESENCE_MAGIC: &[u8; 8] = b"OXPRS001";

impl CloneHandle {
    /// Saves which chunks are present, atomically (temporary file, fsync, rename), so a
    /// restarted clone keeps what it fetched and a thick clone stays independent of its
    /// basis. Only whole installs are ever marked, so the saved set is never ahead of
    /// the local copy provided that copy was flushed first.
    pub fn save_presence(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut b = PRESENCE_MAGIC.to_vec();
        b.extend_from_slice(&self.shared.chunks.to_le_bytes());
        for w in self.shared.presence.iter() {
            b.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &b)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Reads a presence set saved by [`CloneHandle::save_presence`] for a clone of
/// `chunks` chunks; `None` if it is damaged or for another geometry (start empty then:
/// chunks are fetched again, never trusted blindly).
pub fn load_presence(bytes: &[u8], chunks: u64) -> Option<Vec<u64>> {
    let words = chunks.div_ceil(64) as usize;
    if bytes.len() != 16 + words * 8 + 4 || &bytes[..8] != PRESENCE_MAGIC {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc
        || u64::from_le_bytes(body[8..16].try_into().ok()?) != chunks
    {
        return None;
    }
    Some(
        body[16..]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// Creates a clone named `name` whose local copy is `local` and whose missing chunks
/// come from `basis`. Its size is the local copy's.
pub fn create_clone(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
) -> Result<(Bdev, CloneHandle), BdevError> {
    create_clone_with(name, local, basis, uuid, None)
}

/// [`create_clone`] resuming from a presence set saved earlier (see [`load_presence`]).
pub fn create_clone_with(
    name: &str,
    local: Bdev,
    basis: Arc<dyn Basis>,
    uuid: Option<Uuid>,
    presence: Option<Vec<u64>>,
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
    let shared = Arc::new(Shared {
        name: name.to_string(),
        local,
        basis,
        chunk_bytes,
        block_size,
        size,
        presence: match presence {
            Some(words) if words.len() as u64 == chunks.div_ceil(64) => {
                words.into_iter().map(AtomicU64::new).collect()
            }
            _ => (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        },
        chunks,
        present_count: AtomicU64::new(0),
        pending: Mutex::new(HashMap::new()),
        counters: CloneCounters::default(),
        read_ahead: 4,
        hot: Mutex::new(std::collections::VecDeque::new()),
    });
    // Presence restored from a saved set counts towards hydration; bits beyond the
    // last chunk are cleared so they cannot count.
    if !chunks.is_multiple_of(64)
        && let Some(last) = shared.presence.last()
    {
        last.fetch_and((1u64 << (chunks % 64)) - 1, Ordering::Relaxed);
    }
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
