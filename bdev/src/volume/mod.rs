//! `volume`: a device wrapper that remembers which chunks changed (changed-block
//! tracking, for incremental snapshots) and keeps a snapshot point-in-time while hosts
//! go on writing, by copy-before-write: a write to a chunk the snapshot has not read
//! yet first saves the chunk's old contents for the snapshot.
//!
//! Copies are kept in memory, or — once [`VolumeHandle::set_preserve_file`] gives the
//! volume a store for them — written durably to local media before the host write goes
//! ahead (`preserve`), so that a snapshot interrupted by a restart or a crash resumes
//! with the same point-in-time image ([`VolumeHandle::resume_snapshot`]).
//!
//! Who owns what:
//! - whether a snapshot runs is one flag written by begin and end and loaded by every
//!   write (one flag for all reactors, so a write acknowledged after a guarded one is
//!   guarded too). A write that saw no snapshot, and one a snapshot let go ahead,
//!   counts itself in its reactor's own [`Mode`] (plain cells) while it is on the
//!   device; a begin asks each reactor by message to say when those it had sent
//!   before hearing the begin are done. Nothing shared is written by a write outside
//!   a snapshot, except a chunk's change bit by the first write to the chunk since the
//!   last snapshot began (one `fetch_or` per chunk per snapshot interval; later writes
//!   find it set).
//! - per-chunk snapshot state (unread, being read, read, being copied, copied, done) is
//!   owned by one reactor, the volume's owner (`owner`), as an explicit state per chunk
//!   in a core with no I/O inside (`core`). Writes on any reactor and the snapshot's
//!   reader (on an OX core) send it messages; it copies chunks before writes, and
//!   publishes one bit per chunk saying a write may go over it without asking. So a
//!   write during a snapshot to a chunk already read or copied pays a load; only one
//!   to a chunk the snapshot still needs asks the owner, and waits for its copy.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use reactor::{Reactor, ReactorHandle};
use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo, Channel};
use crate::dirty::DirtyRecord;
use crate::error::BdevError;
use crate::io::{BdevIo, Finished, IoCompletion, IoDone, IoType};
use crate::park::{deliver, park};
use crate::preserve::Preserve;
use crate::reply::reply;

pub(crate) mod core;
mod owner;
pub mod steps;

use self::core::{Event, Kept, Source};
use self::owner::{Answered, Asker};

/// Names volumes' [`Mode`]s and owner states on the reactors.
static NEXT_VOLUME: AtomicU64 = AtomicU64::new(1);

/// How long a control thread waits for the owner to take a snapshot up again.
const RESUME_WAIT: Duration = Duration::from_secs(30);

struct Shared {
    inner: Bdev,
    chunk_bytes: u64,
    block_size: u64,
    chunks: u64,
    /// Chunks written since the last snapshot began (one bit each).
    dirty: Arc<[AtomicU64]>,
    /// Chunks hosts read since the last snapshot took this (one bit each): the working
    /// set a new clone of that snapshot fetches first. A hint, not state.
    heat: Box<[AtomicU64]>,
    /// The durable record of `dirty` (a superset of it on disk), if the volume keeps
    /// one: a write is acknowledged only once its chunks are on it.
    record: OnceLock<DirtyRecord>,
    /// One bit per chunk, published by the owner: a write may go over the chunk
    /// without asking (no snapshot needs it, or the snapshot has it).
    free: Box<[AtomicU64]>,
    /// The reactor that owns the snapshot state (the first to make a channel of the
    /// volume, or to begin a snapshot of it).
    owner: OnceLock<ReactorHandle>,
    /// Where copies go durably, if the volume has such a store (else in memory).
    store: OnceLock<Preserve>,
    /// The volume's device is gone: its owner state is dropped and never made again.
    released: AtomicBool,
    /// The running snapshot was taken up again after a restart and nobody has
    /// continued it yet ([`VolumeHandle::take_resumed`]).
    resumed: AtomicBool,
    /// Names this volume's [`Mode`] on each reactor.
    id: u64,
    /// A snapshot runs: writes go through copy-before-write. Written at begin and end
    /// only; every write loads it.
    active: AtomicBool,
    /// Who has a [`Mode`] of this volume.
    modes: Mutex<Modes>,
    /// The running begin's wait for writes that did not see it.
    settling: Mutex<Arc<Settling>>,
    /// A snapshot holds this volume (begin … end).
    running: AtomicBool,
    /// Bumped at every begin and end: names the running snapshot in what is sent to
    /// the owner, which ignores what is stale.
    generation: AtomicU64,
    /// The snapshot the change set is relative to (`None`: an all-zero volume).
    base: Mutex<Option<[u8; 16]>>,
}

impl Shared {
    fn chunk_range(&self, io: &BdevIo) -> std::ops::RangeInclusive<u64> {
        let start = io.offset_blocks * self.block_size;
        let end = start + io.num_blocks.max(1) * self.block_size - 1;
        (start / self.chunk_bytes)..=(end / self.chunk_bytes).min(self.chunks - 1)
    }

    fn mark_dirty(&self, chunk: u64) {
        let word = &self.dirty[(chunk / 64) as usize];
        let bit = 1 << (chunk % 64);
        // Usually set already: a load, not a locked read-modify-write, on the I/O path.
        // SeqCst (a plain load on x86): the record's compaction relies on a write's
        // dirty bit being visible before the write looks at the durable bit.
        if word.load(Ordering::SeqCst) & bit == 0 {
            word.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Notes that a host read `chunk`. Usually set already: a load. The first read of a
    /// chunk since the last snapshot took the set pays one relaxed `fetch_or` (as
    /// `mark_dirty` does for writes): a plain store could erase bits other reactors,
    /// or a snapshot giving the set back, set meanwhile.
    fn mark_read(&self, chunk: u64) {
        let word = &self.heat[(chunk / 64) as usize];
        let bit = 1 << (chunk % 64);
        if word.load(Ordering::Relaxed) & bit == 0 {
            word.fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Whether the owner has published `chunk` free for writes.
    fn is_free(&self, chunk: u64) -> bool {
        self.free[(chunk / 64) as usize].load(Ordering::Acquire) & (1 << (chunk % 64)) != 0
    }

    /// Sends `event` to the owner, if there is one (there is once a snapshot began).
    fn tell(self: &Arc<Self>, event: Event<owner::Writer, Asker>) {
        if let Some(o) = self.owner.get() {
            owner::send(self, o, event);
        }
    }

    /// Asks the owner and waits for its answer.
    async fn ask(
        self: &Arc<Self>,
        owner: &ReactorHandle,
        event: impl FnOnce(Asker) -> Event<owner::Writer, Asker>,
    ) -> Result<Answered, BdevError> {
        let (tx, rx) = reply();
        owner::send(self, owner, event(tx));
        rx.wait()
            .await
            .ok_or_else(|| self.snapshot_error("its owner reactor has stopped"))
    }

    fn snapshot_error(&self, reason: &str) -> BdevError {
        BdevError::Snapshot {
            name: self.inner.name().to_string(),
            reason: reason.to_string(),
        }
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        (self.inner.info().size_bytes() - chunk * self.chunk_bytes).min(self.chunk_bytes)
    }
}

struct VolumeBackend {
    shared: Arc<Shared>,
}

struct VolumeChannel {
    shared: Arc<Shared>,
    inner: Rc<Channel>,
    reactor: Rc<Reactor>,
    mode: Rc<Mode>,
}

/// One reactor's writes on the device that a begin must wait for — those issued while
/// no snapshot ran, and those a snapshot let go ahead before the begin was heard — and
/// the begin that waits for them. Owned by that reactor: changed only there, by its
/// own writes and by the message a begin sends it ([`ask_settle`]), so a write outside
/// a snapshot writes nothing shared.
struct Mode {
    /// The epoch of the last begin heard (a late message of an older one is ignored:
    /// messages may overtake one another).
    generation: Cell<u64>,
    /// Writes issued unguarded and not finished.
    plain: Cell<u64>,
    /// Guarded writes sent to the device since the last begin heard, not finished.
    landing: Cell<u64>,
    /// Guarded writes sent to the device before the last begin heard, not finished.
    /// That begin waits for them as for plain writes: it took the change set their
    /// chunks were marked in, and its flush and its reads must come after them, or a
    /// power cut could take from the volume a write the snapshot holds, in a chunk
    /// the change record then drops.
    landed_before: Cell<u64>,
    /// A begin waiting for those writes (it is told when this is dropped).
    waiting: RefCell<Option<Arrival>>,
}

impl Finished for Mode {
    /// A plain write is done.
    fn finished(&self) {
        self.end_plain();
    }
}

impl Mode {
    fn end_plain(&self) {
        assert!(self.plain.get() > 0, "more plain writes ended than began");
        self.plain.set(self.plain.get() - 1);
        self.maybe_settled();
    }

    /// A guarded write goes to the device: returns the epoch it went under.
    fn begin_landing(&self) -> u64 {
        self.landing.set(self.landing.get() + 1);
        self.generation.get()
    }

    /// The guarded write that went to the device under `epoch` is done.
    fn end_landing(&self, epoch: u64) {
        let count = if epoch == self.generation.get() {
            &self.landing
        } else {
            &self.landed_before
        };
        assert!(count.get() > 0, "more guarded writes ended than landed");
        count.set(count.get() - 1);
        self.maybe_settled();
    }

    /// A begin heard now waits for every write on the device until now.
    fn heard_begin(&self, epoch: u64) {
        self.generation.set(epoch);
        self.landed_before
            .set(self.landed_before.get() + self.landing.replace(0));
    }

    fn settled(&self) -> bool {
        self.plain.get() == 0 && self.landed_before.get() == 0
    }

    fn maybe_settled(&self) {
        if self.settled() {
            drop(self.waiting.borrow_mut().take());
        }
    }
}

/// One reactor's arrival at a [`Settling`], made when dropped: once the writes it
/// must wait for ([`Mode::settled`]) are done, or when the message carrying it is
/// dropped unrun (a stopped reactor has no writes left), so a begin is never left
/// waiting for nobody.
struct Arrival(Arc<Settling>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.arrive();
    }
}

/// A begin waiting for every reactor's writes that did not see it: one arrival each.
struct Settling {
    left: AtomicUsize,
    /// Notified when the last reactor arrives.
    done: event_listener::Event,
}

impl Settling {
    fn new(reactors: usize) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicUsize::new(reactors),
            done: event_listener::Event::new(),
        })
    }

    /// One reactor has no write left that did not see the begin (once per reactor per
    /// snapshot, off the I/O path).
    fn arrive(&self) {
        let before = self.left.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "a reactor settled twice");
        if before == 1 {
            self.done.notify(usize::MAX);
        }
    }

    fn settled(&self) -> bool {
        self.left.load(Ordering::Acquire) == 0
    }
}

/// The reactors with a channel of the volume (each holds a [`Mode`]). Changed under its
/// lock by channel creation, begins and ends, so a new channel either hears a begin or
/// starts after it.
struct Modes {
    reactors: Vec<ReactorHandle>,
    /// Bumped at every begin and end: orders the messages a begin sends.
    epoch: u64,
}

impl Shared {
    fn modes(&self) -> MutexGuard<'_, Modes> {
        self.modes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts (`true`) or ends guarding writes. Every write looks at `active` as it
    /// starts, so one acknowledged after another that was guarded is guarded too: a
    /// snapshot never holds a later write without an earlier one. A begin (`settle`)
    /// also asks every reactor to say when its writes that did not see it are done
    /// ([`VolumeHandle::writes_settled`]).
    fn set_active(&self, active: bool, settle: bool) {
        let (reactors, epoch, settling) = {
            let mut m = self.modes();
            self.active.store(active, Ordering::SeqCst);
            m.epoch += 1;
            let settling = settle.then(|| {
                let fresh = Settling::new(m.reactors.len());
                *self.settling.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
                fresh
            });
            (m.reactors.clone(), m.epoch, settling)
        };
        if let Some(settling) = settling {
            ask_settle(self.id, &reactors, epoch, &settling);
        }
    }
}

/// Asks every reactor with a channel of the volume to arrive at `settling` once the
/// writes it sent to the device before hearing the begin of `epoch`, and those it
/// issued unguarded, are done.
fn ask_settle(id: u64, reactors: &[ReactorHandle], epoch: u64, settling: &Arc<Settling>) {
    for to in reactors.iter().cloned() {
        // Arrives when dropped: at once here, or parked until this reactor's writes
        // to wait for are done (or with the message, if it is never run).
        let arrival = Arrival(Arc::clone(settling));
        deliver(
            to,
            Box::new(move || {
                let mode =
                    reactor::current().and_then(|r| r.channel::<Mode, ()>(id, || Err(())).ok());
                // No channel here any more, or a newer begin was heard.
                let Some(mode) = mode.filter(|m| m.generation.get() < epoch) else {
                    return;
                };
                mode.heard_begin(epoch);
                // An older begin's wait is over (its snapshot ended); this one's
                // waits for the writes on the device, if any.
                let parked = Some(arrival).filter(|_| !mode.settled());
                *mode.waiting.borrow_mut() = parked;
            }),
        );
    }
}

impl Drop for VolumeBackend {
    /// The volume is gone: every reactor drops its [`Mode`] of it, and the owner its
    /// snapshot state.
    fn drop(&mut self) {
        let id = self.shared.id;
        self.shared.released.store(true, Ordering::SeqCst);
        if let Some(o) = self.shared.owner.get() {
            owner::release(id, o);
        }
        let reactors = std::mem::take(&mut self.shared.modes().reactors);
        for to in reactors {
            deliver(
                to,
                Box::new(move || {
                    if let Some(r) = reactor::current() {
                        r.release_channel::<Mode>(id);
                    }
                }),
            );
        }
    }
}

impl BdevBackend for VolumeBackend {
    fn supports(&self, io_type: IoType) -> bool {
        self.shared.inner.supports(io_type)
    }

    fn allocated_blocks(&self, _info: &BdevInfo) -> Option<u64> {
        Some(self.shared.inner.allocated_blocks())
    }

    fn create_channel(&self, _info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let s = &self.shared;
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        s.owner.get_or_init(|| reactor.handle().clone());
        let mode = reactor.channel(s.id, || {
            let mut m = s.modes();
            if !m.reactors.iter().any(|h| h.same(reactor.handle())) {
                m.reactors.push(reactor.handle().clone());
            }
            Ok::<_, BdevError>(Mode {
                generation: Cell::new(m.epoch),
                plain: Cell::new(0),
                landing: Cell::new(0),
                landed_before: Cell::new(0),
                waiting: RefCell::new(None),
            })
        })?;
        Ok(Box::new(VolumeChannel {
            shared: Arc::clone(s),
            inner: s.inner.channel()?,
            reactor,
            mode,
        }))
    }
}

/// Writes while a snapshot runs: at once over chunks the owner has published free;
/// otherwise the owner first copies what the snapshot still needs of them (or waits
/// for the snapshot to finish reading them) and then lets the write go ahead.
fn guarded_write(
    shared: Arc<Shared>,
    inner: Rc<Channel>,
    reactor: Rc<Reactor>,
    mode: Rc<Mode>,
    io: BdevIo,
    done: IoDone,
) {
    let chunks = shared.chunk_range(&io);
    let owner = shared.owner.get().cloned();
    let Some(owner) = owner.filter(|_| !chunks.clone().all(|c| shared.is_free(c))) else {
        return land(shared, inner, reactor, mode, io, done);
    };
    let (s, i, r) = (Arc::clone(&shared), inner, Rc::clone(&reactor));
    let token = park(move |result| match result {
        Ok(()) => land(s, i, r, mode, io, done),
        Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
    });
    let event = Event::Guard {
        waiter: owner::Writer::new(reactor.handle().clone(), token),
        first: *chunks.start(),
        last: *chunks.end(),
    };
    owner::send(&shared, &owner, event);
}

/// Lands a write the snapshot (if any) has nothing to keep from. Until it is done, the
/// next begin this reactor hears waits for it (see [`Mode::landed_before`]).
fn land(
    shared: Arc<Shared>,
    inner: Rc<Channel>,
    reactor: Rc<Reactor>,
    mode: Rc<Mode>,
    io: BdevIo,
    done: IoDone,
) {
    // Marked, looked up on the record, and counted as landing in one turn of this
    // reactor: a begin that takes the change set holding these marks is heard here
    // after all three, so it waits for the write to be done before it flushes and
    // reads the chunks; one heard before the marks finds them in the next change set.
    let chunks = shared.chunk_range(&io);
    for chunk in chunks.clone() {
        shared.mark_dirty(chunk);
    }
    // The record is looked at after the marks (compaction relies on that order). A
    // write that waited at the owner, or for its leave, while a whole snapshot began,
    // read and was catalogued may find its chunks dropped from the record since
    // `start_write` looked: they go back on first, and it lands marked again.
    let missing: Vec<u64> = match shared.record.get() {
        Some(record) => chunks.filter(|&c| !record.has(c)).collect(),
        None => Vec::new(),
    };
    if let Some(record) = shared.record.get().filter(|_| !missing.is_empty()) {
        let on = reactor.handle().clone();
        let s = Arc::clone(&shared);
        return record.need(missing, &on, move |r| match r {
            Ok(()) => land(s, inner, reactor, mode, io, done),
            Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
        });
    }
    let epoch = mode.begin_landing();
    inner.pass(
        io,
        IoDone::new(move |c| {
            mode.end_landing(epoch);
            done.complete(c)
        }),
    );
}

/// Whether `e` says the appliance is stopping (a copy cancelled at shutdown): that
/// fails the host's write but does not abandon the snapshot, which resumes.
pub(super) fn stopping(e: &BdevError) -> bool {
    matches!(e, BdevError::ShuttingDown)
        || matches!(e, BdevError::Io { errno, .. } if *errno == libc::ECANCELED)
}

impl BackendChannel for VolumeChannel {
    fn submit(&self, io: BdevIo, done: IoDone) {
        if !matches!(
            io.io_type,
            IoType::Write | IoType::WriteZeroes | IoType::Unmap
        ) {
            // A host's read is part of its working set; the appliance's own (a
            // snapshot reading the volume) is not.
            if io.io_type == IoType::Read && !io.internal {
                for chunk in self.shared.chunk_range(&io) {
                    self.shared.mark_read(chunk);
                }
            }
            return self.inner.pass(io, done);
        }
        start_write(
            &self.shared,
            &self.inner,
            &self.reactor,
            &self.mode,
            io,
            done,
        );
    }
}

/// Issues a host write: marks its chunks changed and, with a change record, on record
/// (the first write to a chunk since the record last dropped it waits for that; every
/// later one finds the durable bit set), then writes plainly, or through
/// copy-before-write while a snapshot runs.
///
/// A write that sees no snapshot running is counted in this reactor's [`Mode`], and a
/// begin that it did not see waits for it ([`VolumeHandle::writes_settled`]). The
/// chunks are marked after the write has
/// decided its path: a snapshot whose begin it did not see either swapped the change
/// set before the marks (they land in the next one, and [`VolumeHandle::settle`] adds
/// them to this one once the write is done) or after (they are in this one). The record
/// is looked at after the marks (compaction relies on that order).
fn start_write(
    s: &Arc<Shared>,
    inner: &Rc<Channel>,
    reactor: &Rc<Reactor>,
    mode: &Rc<Mode>,
    io: BdevIo,
    done: IoDone,
) {
    let guarded = s.active.load(Ordering::Acquire);
    if !guarded {
        mode.plain.set(mode.plain.get() + 1);
    }
    for chunk in s.chunk_range(&io) {
        s.mark_dirty(chunk);
    }
    if let Some(record) = s.record.get() {
        let missing: Vec<u64> = s.chunk_range(&io).filter(|&c| !record.has(c)).collect();
        if !missing.is_empty() {
            if !guarded {
                mode.end_plain();
            }
            // Decided again once on record: a snapshot may begin meanwhile.
            let (shared, inner, reactor, mode) = (
                Arc::clone(s),
                Rc::clone(inner),
                Rc::clone(reactor),
                Rc::clone(mode),
            );
            let on = reactor.handle().clone();
            return record.need(missing, &on, move |r| match r {
                Ok(()) => start_write(&shared, &inner, &reactor, &mode, io, done),
                Err(e) => done.complete(IoCompletion::err(io.bufs, e)),
            });
        }
    }
    if !guarded {
        // Counted out when it completes, by the completion itself (no closure per write).
        let note: Rc<dyn Finished> = Rc::<Mode>::clone(mode);
        return inner.pass(io, done.noting(note));
    }
    guarded_write(
        Arc::clone(s),
        Rc::clone(inner),
        Rc::clone(reactor),
        Rc::clone(mode),
        io,
        done,
    );
}

/// Control of a volume's change tracking and snapshot state.
#[derive(Clone)]
pub struct VolumeHandle {
    shared: Arc<Shared>,
}

/// The chunks a snapshot must store: those changed since the previous snapshot began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedChunks {
    bits: Vec<u64>,
    /// The snapshot these changes are relative to (`None`: an all-zero volume).
    pub base: Option<[u8; 16]>,
}

const TRACKING_MAGIC: &[u8; 8] = b"OXCBT001";

/// What a snapshot reads for a chunk ([`VolumeHandle::claim_chunk`]).
pub enum Claim {
    /// The volume itself (the chunk is held from writes until released).
    Device,
    /// The chunk's contents at the snapshot point, copied in memory by a write.
    Copy(Vec<u8>),
    /// The chunk's contents at the snapshot point, copied durably: `num_blocks` blocks
    /// of `dev` from `offset_blocks`.
    Saved {
        /// The store of copies.
        dev: Bdev,
        /// First block.
        offset_blocks: u64,
        /// Blocks.
        num_blocks: u64,
    },
}

impl ChangedChunks {
    /// No chunk of `chunks` changed since snapshot `base` (`None`: an all-zero volume).
    pub fn none(chunks: u64, base: Option<[u8; 16]>) -> Self {
        Self {
            bits: vec![0; chunks.div_ceil(64) as usize],
            base,
        }
    }

    /// Serialises for saving across restarts: magic, chunk count, bitmap, CRC32C.
    pub fn to_bytes(&self, chunks: u64) -> Vec<u8> {
        let mut b = TRACKING_MAGIC.to_vec();
        b.extend_from_slice(&chunks.to_le_bytes());
        b.push(u8::from(self.base.is_some()));
        b.extend_from_slice(&self.base.unwrap_or_default());
        for w in &self.bits {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses what [`Self::to_bytes`] wrote for a volume of `chunks` chunks; `None` if
    /// damaged or for another geometry (then treat every chunk as changed).
    pub fn from_bytes(bytes: &[u8], chunks: u64) -> Option<Self> {
        let words = chunks.div_ceil(64) as usize;
        if bytes.len() != 16 + 17 + words * 8 + 4 || &bytes[..8] != TRACKING_MAGIC {
            return None;
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return None;
        }
        if u64::from_le_bytes(body[8..16].try_into().ok()?) != chunks {
            return None;
        }
        let base = match body[16] {
            0 => None,
            1 => Some(body[17..33].try_into().ok()?),
            _ => return None,
        };
        let bits = body[33..]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect();
        Some(Self { bits, base })
    }

    /// Whether `chunk` changed.
    pub fn contains(&self, chunk: u64) -> bool {
        self.bits
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// How many chunks changed.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Treats every chunk as changed (when the base is not the snapshot asked for).
    pub fn mark_all(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = u64::MAX);
    }
}

impl VolumeHandle {
    /// Chunk size of the tracking.
    pub fn chunk_bytes(&self) -> u64 {
        self.shared.chunk_bytes
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.shared.chunks
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Bdev {
        &self.shared.inner
    }

    /// Gives the volume a durable store for copy-before-write chunks at `path` (a
    /// sparse file, created if missing, never truncated here): from the next snapshot
    /// on, copies go there and survive a restart. Once per volume, before any snapshot.
    pub fn set_preserve_file(&self, path: &std::path::Path) -> Result<(), BdevError> {
        let s = &self.shared;
        let store = Preserve::open(
            s.inner.name(),
            path,
            s.inner.info().size_bytes(),
            s.chunk_bytes,
            s.inner.block_size(),
        )?;
        s.store.set(store).map_err(|_| BdevError::Config {
            name: s.inner.name().to_string(),
            reason: "the volume has a store for copies already".into(),
        })
    }

    /// The running snapshot's token (names its durable copies), if the volume has a
    /// store for them and a snapshot holds it.
    pub fn snapshot_token(&self) -> Option<[u8; 16]> {
        let s = &self.shared;
        s.store
            .get()
            .filter(|_| s.running.load(Ordering::SeqCst))
            .map(Preserve::token)
    }

    fn hold(&self) -> Result<(), BdevError> {
        let s = &self.shared;
        s.running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
            .map_err(|_| BdevError::Config {
                name: s.inner.name().to_string(),
                reason: "a snapshot of this volume is already running".into(),
            })
    }

    /// Starts a point-in-time snapshot: from now on, writes preserve unread chunks.
    /// Returns the chunks changed since the previous snapshot began (and starts a new
    /// change set). Writes on the device when it began may still be running: the
    /// snapshot point is once they are done ([`Self::writes_settle`], then
    /// [`Self::settle`]). A guarded write of the snapshot before still waiting for its
    /// leave is not waited for: it lands in this snapshot or not, block by block, as it
    /// would at a power cut.
    /// `on` owns the volume's snapshot state if no reactor does yet. Waits first for
    /// copies of an earlier snapshot still being written (they carry its token).
    pub async fn begin_snapshot(&self, on: &ReactorHandle) -> Result<ChangedChunks, BdevError> {
        let s = &self.shared;
        self.hold()?;
        // Until it has begun, however this ends (an error, or the caller dropping
        // it while it waits), the volume is released again.
        let mut beginning = Beginning {
            handle: self,
            armed: true,
        };
        let owner = s.owner.get_or_init(|| on.clone()).clone();
        let after = s.generation.load(Ordering::SeqCst);
        s.ask(&owner, |waiter| Event::Drain { after, waiter })
            .await?;
        if let Some(store) = s.store.get() {
            store.reset(*Uuid::new_v4().as_bytes())?;
        }
        let generation = s.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let durable = s.store.get().is_some();
        s.ask(&owner, |waiter| Event::Begin {
            generation,
            durable,
            waiter,
        })
        .await?;
        beginning.armed = false;
        let bits = s
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::AcqRel))
            .collect();
        s.set_active(true, true);
        let base = *s.base.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ChangedChunks { bits, base })
    }

    /// Takes up again, after a restart, the snapshot `token` that had stored every
    /// chunk before `next` when it stopped: the chunks from `next` on that are in
    /// `changed` are protected again, each either still unchanged on the volume or saved
    /// in the store of copies (found by scanning it). Call before any host can
    /// write, from a thread that is not the owner's reactor (it waits for the owner;
    /// `on` owns the volume's snapshot state if no reactor does yet). Returns how many
    /// saved copies were found.
    pub fn resume_snapshot(
        &self,
        token: [u8; 16],
        next: u64,
        changed: &ChangedChunks,
        on: &ReactorHandle,
    ) -> Result<usize, BdevError> {
        let s = &self.shared;
        let store = s.store.get().ok_or_else(|| BdevError::Config {
            name: s.inner.name().to_string(),
            reason: "a snapshot can resume only on a volume with a store for copies".into(),
        })?;
        if changed.bits.len() != s.dirty.len() || next > s.chunks {
            return Err(BdevError::Config {
                name: s.inner.name().to_string(),
                reason: "the saved snapshot state is for another volume size".into(),
            });
        }
        if let Some(why) = store.abandoned_on_disk() {
            return Err(BdevError::Config {
                name: s.inner.name().to_string(),
                reason: format!("its snapshot was abandoned: {why}"),
            });
        }
        let saved = store.scan(&token, |c| c >= next && changed.contains(c))?;
        // Reserve the space to abandon it, should that be needed (best effort: an
        // older marker-less store is abandoned by writing one).
        let _ = store.arm();
        self.hold()?;
        store.adopt(token);
        let owner = s.owner.get_or_init(|| on.clone()).clone();
        let generation = s.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, rx) = reply();
        let found = saved.len();
        let event = Event::Resume {
            generation,
            next,
            changed: changed.bits.clone(),
            saved,
            waiter: tx,
        };
        owner::send(s, &owner, event);
        if !matches!(rx.wait_blocking(RESUME_WAIT), Some(Answered::Ready)) {
            // Ended, but its copies kept: the caller removes the journal first, then
            // discards them ([`Self::discard_copies`]).
            self.end(None, false);
            return Err(s.snapshot_error("its owner reactor did not take it up again"));
        }
        s.resumed.store(true, Ordering::SeqCst);
        s.set_active(true, false);
        Ok(found)
    }

    /// Why the running snapshot was abandoned, if it was: a copy-before-write copy
    /// could not be written, and the host's write went ahead without it. The snapshot
    /// must fail; it never resumes.
    pub fn snapshot_abandoned(&self) -> Option<String> {
        self.shared.store.get().and_then(Preserve::abandoned)
    }

    /// Frees the space of the store of copies when no snapshot holds the volume (after
    /// a snapshot that was not taken up again at a restart).
    pub fn discard_copies(&self) {
        let s = &self.shared;
        if !s.running.load(Ordering::SeqCst)
            && let Some(store) = s.store.get()
        {
            store.release();
        }
    }

    /// Gives `changed` back to the change tracking (a snapshot that will not happen
    /// after all must not lose the chunks it was to store).
    pub fn add_changes(&self, changed: &ChangedChunks) {
        for (w, bits) in self.shared.dirty.iter().zip(&changed.bits) {
            w.fetch_or(*bits, Ordering::AcqRel);
        }
    }

    /// The token of a snapshot [`Self::resume_snapshot`] took up again, once: whoever
    /// gets it continues that snapshot (any other caller sees `None`).
    pub fn take_resumed(&self) -> Option<[u8; 16]> {
        let s = &self.shared;
        if s.resumed.swap(false, Ordering::SeqCst) {
            s.store.get().map(Preserve::token)
        } else {
            None
        }
    }

    /// Whether a snapshot [`Self::resume_snapshot`] took up again waits for its writer
    /// (no caller has taken it with [`Self::take_resumed`] yet).
    pub fn resumed_waiting(&self) -> bool {
        self.shared.resumed.load(Ordering::SeqCst)
    }

    /// Whether every write on the device when [`Self::begin_snapshot`] began has
    /// finished; the snapshot waits for this, then calls [`Self::settle`].
    pub fn writes_settled(&self) -> bool {
        self.shared
            .settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled()
    }

    /// Resolves once every write on the device when [`Self::begin_snapshot`] began has
    /// finished (the event [`Self::writes_settled`] looks at).
    pub async fn writes_settle(&self) {
        let settling = Arc::clone(
            &self
                .shared
                .settling
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        loop {
            if settling.settled() {
                return;
            }
            let done = settling.done.listen();
            // Looked at again once listening, so the last arrival cannot be missed.
            if settling.settled() {
                return;
            }
            done.await;
        }
    }

    /// Adds to `changed` the chunks written between taking the change set and the
    /// snapshot point (those writes finished before it, so they belong in it). They
    /// stay marked for the next snapshot too, which costs a re-read, never a miss.
    pub fn settle(&self, changed: &mut ChangedChunks) {
        for (b, w) in changed.bits.iter_mut().zip(self.shared.dirty.iter()) {
            *b |= w.load(Ordering::Acquire);
        }
    }

    /// The chunk's content at the snapshot point is not needed (unchanged since the
    /// base): writes go over it, and any copy a write saved for it is dropped.
    pub fn skip_chunk(&self, chunk: u64) {
        let generation = self.generation();
        self.shared.tell(Event::Skip { generation, chunk });
    }

    /// The running snapshot needs only the chunks in `changed` (its final change set,
    /// once [`Self::settle`]d): writes go over the others without copying them.
    pub fn need_only(&self, changed: &ChangedChunks) {
        let generation = self.generation();
        let changed = changed.bits.clone();
        self.shared.tell(Event::Needed {
            generation,
            changed,
        });
    }

    /// Records that the change set is now relative to snapshot `id`.
    pub fn set_base(&self, id: Option<[u8; 16]>) {
        *self.shared.base.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// What the snapshot should read for `chunk`: a copy a write saved, or the device
    /// (the chunk is then held from writes until [`Self::chunk_read`]). Waits while a
    /// write is copying the chunk. An error if no snapshot runs (or it was abandoned).
    /// A claim dropped unfinished may leave the chunk held until the snapshot ends:
    /// its caller ends the snapshot when it gives up.
    pub async fn claim_chunk(&self, chunk: u64) -> Result<Claim, BdevError> {
        self.send_claim(chunk)?.finish().await
    }

    /// [`Self::claim_chunk`] without waiting for the answer: the claim is on its way to
    /// the owner reactor when this returns, so a snapshot sends several at once
    /// instead of paying a round trip to the owner per chunk.
    pub fn send_claim(&self, chunk: u64) -> Result<PendingClaim, BdevError> {
        let mut sent = self.send_claims(&[chunk])?;
        match sent.pop() {
            Some(claim) => Ok(claim),
            None => unreachable!("a claim for the one chunk"),
        }
    }

    /// [`Self::send_claim`] for each of `chunks`, in one message: the owner's reactor
    /// is woken once for them all (a wake-up per claim cost a snapshot's OX core a
    /// context switch each), and applies them in order.
    pub fn send_claims(&self, chunks: &[u64]) -> Result<Vec<PendingClaim>, BdevError> {
        let s = &self.shared;
        let generation = self.generation();
        let owner = s
            .owner
            .get()
            .cloned()
            .ok_or_else(|| s.snapshot_error("no snapshot is running"))?;
        let mut events = Vec::with_capacity(chunks.len());
        let mut pending = Vec::with_capacity(chunks.len());
        for &chunk in chunks {
            let (waiter, answer) = reply();
            events.push(Event::Claim {
                generation,
                chunk,
                waiter,
            });
            pending.push(PendingClaim {
                shared: Arc::clone(s),
                chunk,
                answer,
            });
        }
        owner::send_all(s, &owner, events);
        Ok(pending)
    }
}

/// A claim sent to the volume's owner reactor ([`VolumeHandle::send_claim`]), its
/// answer to come.
pub struct PendingClaim {
    shared: Arc<Shared>,
    chunk: u64,
    answer: crate::reply::Pending<Answered>,
}

impl PendingClaim {
    /// What the snapshot should read for the chunk (see [`VolumeHandle::claim_chunk`]).
    pub async fn finish(self) -> Result<Claim, BdevError> {
        let (s, chunk) = (&self.shared, self.chunk);
        let answer = self
            .answer
            .wait()
            .await
            .ok_or_else(|| s.snapshot_error("its owner reactor has stopped"))?;
        match answer {
            Answered::Source(Source::Device) => Ok(Claim::Device),
            Answered::Source(Source::Kept(Kept::Memory(data))) => Ok(Claim::Copy(data)),
            Answered::Source(Source::Kept(Kept::Saved)) => {
                let store = s
                    .store
                    .get()
                    .ok_or_else(|| s.snapshot_error("a saved copy, but no store of copies"))?;
                let (offset_blocks, num_blocks) = store.copy_blocks(chunk);
                Ok(Claim::Saved {
                    dev: store.bdev.clone(),
                    offset_blocks,
                    num_blocks,
                })
            }
            Answered::Refused | Answered::Ready => Err(s.snapshot_error(&format!(
                "chunk {chunk} was claimed, but the snapshot is no longer running \
                 (or was abandoned)"
            ))),
        }
    }
}

impl VolumeHandle {
    /// The snapshot has read `chunk` from the device: writes may go ahead.
    pub fn chunk_read(&self, chunk: u64) {
        self.chunk_read_in(chunk, self.generation());
    }

    /// The snapshot's journal now covers every chunk before `next`: writes to those
    /// need no copies any more (see [`Self::chunk_read`]).
    pub fn commit_through(&self, next: u64) {
        let generation = self.generation();
        self.shared.tell(Event::Commit { generation, next });
    }

    /// Which snapshot is running (changes at every begin and end): a read started
    /// under one generation may release its chunk only while that generation lasts.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// [`Self::chunk_read`] from a completion that may arrive late (on a reactor): it
    /// releases the chunk only if the snapshot of `generation` is still the one running,
    /// never one that began after it.
    pub fn chunk_read_in(&self, chunk: u64, generation: u64) {
        self.shared.tell(Event::ChunkRead { generation, chunk });
    }

    /// The chunks hosts read since the last call (one bit per chunk, 64 to a word),
    /// cleared: a snapshot records them as its volume's working set.
    pub fn take_heat(&self) -> Vec<u64> {
        self.shared
            .heat
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect()
    }

    /// Gives back what [`Self::take_heat`] took (a snapshot that did not publish).
    pub fn restore_heat(&self, words: &[u64]) {
        for (w, bits) in self.shared.heat.iter().zip(words) {
            w.fetch_or(*bits, Ordering::Relaxed);
        }
    }

    /// The chunks changed since the last snapshot began, without resetting them (to
    /// save at shutdown; see [`ChangedChunks::to_bytes`]).
    pub fn changes(&self) -> ChangedChunks {
        ChangedChunks {
            bits: self
                .shared
                .dirty
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            base: *self.shared.base.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Keeps the change tracking crash-consistent in a record at `path` (see
    /// [`crate::dirty`]): from now on a write is acknowledged only once its chunks are
    /// on it. Call before any host can write. A record made now starts from the
    /// current tracking; one that was there is returned, with the snapshot it is
    /// relative to (after a crash, adopt it with [`Self::replace_changes`]).
    pub fn keep_dirty_record(
        &self,
        path: &std::path::Path,
    ) -> Result<Option<ChangedChunks>, BdevError> {
        self.keep_dirty_record_on(crate::medium::local(), path)
    }

    /// [`Self::keep_dirty_record`] with the record on `medium` (a power-cut test puts
    /// it on one that loses what was never synced).
    pub fn keep_dirty_record_on(
        &self,
        medium: Arc<dyn crate::medium::Medium>,
        path: &std::path::Path,
    ) -> Result<Option<ChangedChunks>, BdevError> {
        let s = &self.shared;
        let current = self.changes();
        let (record, opened) = DirtyRecord::open(medium, path, s.chunks, &current.bits)?;
        s.record.set(record).map_err(|_| BdevError::Config {
            name: s.inner.name().to_string(),
            reason: "the volume keeps a change record already".into(),
        })?;
        if !opened.existed {
            // A record made now must say what the tracking is relative to.
            if let Some(r) = s.record.get() {
                r.compact(current.base, Arc::clone(&s.dirty))?;
            }
            return Ok(None);
        }
        Ok(Some(ChangedChunks {
            bits: opened.bits,
            base: opened.base,
        }))
    }

    /// Replaces the change tracking with `changed` (a record read back after a crash).
    /// Call before any host can write.
    pub fn replace_changes(&self, changed: &ChangedChunks) {
        let s = &self.shared;
        for (w, bits) in s.dirty.iter().zip(&changed.bits) {
            w.store(*bits, Ordering::SeqCst);
        }
        *s.base.lock().unwrap_or_else(|p| p.into_inner()) = changed.base;
    }

    /// Makes the change record relative to the volume's base (the snapshot that just
    /// succeeded and was catalogued): chunks not written since it began leave the
    /// record. Call while no other snapshot of the volume can begin, and only for a
    /// snapshot that flushed the volume at its point (else a power cut can take from
    /// the volume writes the snapshot holds, in chunks no longer on record). A volume
    /// without a record has nothing to do.
    pub fn compact_dirty_record(&self) -> Result<(), BdevError> {
        let s = &self.shared;
        let Some(record) = s.record.get() else {
            return Ok(());
        };
        let base = *s.base.lock().unwrap_or_else(|p| p.into_inner());
        record.compact(base, Arc::clone(&s.dirty))
    }

    /// Saves the change tracking to `path` atomically (temporary file, fsync, rename),
    /// for [`Tracking::Saved`] at the next start.
    pub fn save_changes(&self, path: &std::path::Path) -> std::io::Result<()> {
        crate::fsutil::replace_file(path, &self.changes().to_bytes(self.shared.chunks))
    }

    /// Ends the snapshot (its copies are dropped). If it failed, `changed` goes back
    /// into the change set so the next snapshot stores those chunks.
    pub fn end_snapshot(&self, failed: Option<&ChangedChunks>) {
        self.end(failed, true);
    }

    /// [`Self::end_snapshot`], releasing the store of copies or not.
    fn end(&self, failed: Option<&ChangedChunks>, release_copies: bool) {
        let s = &self.shared;
        let generation = s.generation.fetch_add(1, Ordering::SeqCst) + 1;
        s.set_active(false, false);
        // The owner frees every chunk, lets waiting writes go ahead and drops copies.
        s.tell(Event::End { generation });
        s.resumed.store(false, Ordering::SeqCst);
        if let Some(store) = s.store.get().filter(|_| release_copies) {
            store.release();
        }
        if let Some(c) = failed {
            self.add_changes(c);
        }
        s.running.store(false, Ordering::SeqCst);
    }
}

/// A snapshot beginning: ended again if dropped before it has begun.
struct Beginning<'a> {
    handle: &'a VolumeHandle,
    armed: bool,
}

impl Drop for Beginning<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.handle.end_snapshot(None);
        }
    }
}

/// What a volume's change tracking starts from.
#[derive(Debug, Clone)]
pub enum Tracking {
    /// A fresh, all-zero device: nothing changed.
    Fresh,
    /// Unknown history (existing data, or a crash lost the saved tracking): every
    /// chunk counts as changed, so the next snapshot reads it all.
    AllChanged,
    /// Tracking saved at a clean shutdown ([`VolumeHandle::save_changes`]).
    Saved(ChangedChunks),
}

/// Wraps `inner` as a tracked volume with `chunk_bytes` tracking granularity, its change
/// tracking starting from `tracking`.
pub fn create_volume(
    name: &str,
    inner: Bdev,
    chunk_bytes: u64,
    tracking: Tracking,
    uuid: Option<Uuid>,
) -> Result<(Bdev, VolumeHandle), BdevError> {
    let block_size = u64::from(inner.block_size());
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(block_size) {
        return Err(BdevError::Config {
            name: name.to_string(),
            reason: format!("chunk size {chunk_bytes} is not a multiple of the block size"),
        });
    }
    let chunks = inner.info().size_bytes().div_ceil(chunk_bytes);
    let words = chunks.div_ceil(64) as usize;
    let (initial, base): (Vec<u64>, Option<[u8; 16]>) = match tracking {
        Tracking::Fresh => (vec![0; words], None),
        Tracking::AllChanged => (vec![u64::MAX; words], None),
        Tracking::Saved(c) if c.bits.len() == words => (c.bits, c.base),
        Tracking::Saved(_) => (vec![u64::MAX; words], None),
    };
    let shared = Arc::new(Shared {
        chunk_bytes,
        block_size,
        chunks,
        dirty: initial.into_iter().map(AtomicU64::new).collect(),
        heat: (0..words).map(|_| AtomicU64::new(0)).collect(),
        record: OnceLock::new(),
        free: (0..words).map(|_| AtomicU64::new(u64::MAX)).collect(),
        owner: OnceLock::new(),
        store: OnceLock::new(),
        released: AtomicBool::new(false),
        resumed: AtomicBool::new(false),
        id: NEXT_VOLUME.fetch_add(1, Ordering::Relaxed),
        modes: Mutex::new(Modes {
            reactors: Vec::new(),
            epoch: 0,
        }),
        active: AtomicBool::new(false),
        settling: Mutex::new(Settling::new(0)),
        running: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        base: Mutex::new(base),
        inner: inner.clone(),
    });
    let info = BdevInfo {
        name: name.to_string(),
        block_size: inner.block_size(),
        num_blocks: inner.num_blocks(),
        uuid: uuid.unwrap_or_else(Uuid::new_v4),
    };
    let handle = VolumeHandle {
        shared: Arc::clone(&shared),
    };
    Ok((Bdev::new(info, VolumeBackend { shared })?, handle))
}
