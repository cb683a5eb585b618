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
//!   guarded too). A write that saw no snapshot counts itself in its reactor's own
//!   [`Mode`] (plain cells); a begin asks each reactor by message to say when those
//!   writes are done. Nothing shared is written by a write outside a snapshot, except a
//!   chunk's change bit by the first write to the chunk since the last snapshot began
//!   (one `fetch_or` per chunk per snapshot interval; later writes find it set).
//! - per-chunk snapshot state is one atomic byte, changed by compare-and-swap by the
//!   writers and the snapshot's reader (not yet owned by one reactor: that is the next
//!   step); writes to chunks already read pay a load, and only the first write to an
//!   unread chunk during a snapshot takes the slow path.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use reactor::{Reactor, ReactorHandle};
use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo, Channel};
use crate::buf::IoBuf;
use crate::dirty::DirtyRecord;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};
use crate::park::deliver;
use crate::preserve::Preserve;

const NOT_READ: u8 = 0;
const READING: u8 = 1;
const DONE: u8 = 2;
const PRESERVING: u8 = 3;
const PRESERVED: u8 = 4;
/// Read by the snapshot, but not yet covered by its journal: with a durable store of
/// copies, a write still copies it first, since a restart would read it again.
const READ: u8 = 5;

/// Names volumes' [`Mode`]s on the reactors.
static NEXT_VOLUME: AtomicU64 = AtomicU64::new(1);

/// How long a write waits before looking again at a chunk another party is copying.
const RETRY: Duration = Duration::from_micros(50);

struct Shared {
    inner: Bdev,
    chunk_bytes: u64,
    block_size: u64,
    chunks: u64,
    /// Chunks written since the last snapshot began (one bit each).
    dirty: Arc<[AtomicU64]>,
    /// The durable record of `dirty` (a superset of it on disk), if the volume keeps
    /// one: a write is acknowledged only once its chunks are on it.
    record: OnceLock<DirtyRecord>,
    state: Box<[AtomicU8]>,
    preserved: Mutex<HashMap<u64, Vec<u8>>>,
    /// Where copies go durably, if the volume has such a store (else `preserved`).
    store: OnceLock<Preserve>,
    /// Chunks before this are covered by the running snapshot's journal.
    committed: AtomicU64,
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
    /// Bumped at every begin and end, so a copy-before-write read that straddles one is
    /// recognised as stale and thrown away.
    generation: AtomicU64,
    /// The snapshot the change set is relative to (`None`: an all-zero volume).
    base: Mutex<Option<[u8; 16]>>,
}

impl Shared {
    fn preserved(&self) -> MutexGuard<'_, HashMap<u64, Vec<u8>>> {
        self.preserved.lock().unwrap_or_else(|p| p.into_inner())
    }

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

    /// A chunk's state once the snapshot has read it: with a durable store, writes
    /// keep copying it until the journal covers it ([`VolumeHandle::commit_through`]).
    fn after_read(&self) -> u8 {
        if self.store.get().is_some() {
            READ
        } else {
            DONE
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

/// One reactor's writes issued while no snapshot ran and not finished yet, and the
/// begin that waits for them. Owned by that reactor: changed only there, by its own
/// writes and by the message a begin sends it ([`ask_settle`]), so a write outside a
/// snapshot writes nothing shared.
struct Mode {
    /// The epoch of the last begin heard (a late message of an older one is ignored:
    /// messages may overtake one another).
    generation: Cell<u64>,
    /// Writes issued unguarded and not finished.
    plain: Cell<u64>,
    /// A begin waiting for those writes (it is told when this is dropped).
    waiting: RefCell<Option<Arrival>>,
}

impl Mode {
    fn end_plain(&self) {
        assert!(self.plain.get() > 0, "more plain writes ended than began");
        self.plain.set(self.plain.get() - 1);
        if self.plain.get() == 0 {
            drop(self.waiting.borrow_mut().take());
        }
    }
}

/// One reactor's arrival at a [`Settling`], made when dropped: once its unguarded
/// writes are done, or when the message carrying it is dropped unrun (a stopped
/// reactor has no writes left), so a begin is never left waiting for nobody.
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
/// writes it issued before seeing the begin of `epoch` are done.
fn ask_settle(id: u64, reactors: &[ReactorHandle], epoch: u64, settling: &Arc<Settling>) {
    for to in reactors.iter().cloned() {
        // Arrives when dropped: at once here, or parked until this reactor's
        // unguarded writes are done (or with the message, if it is never run).
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
                mode.generation.set(epoch);
                // An older begin's wait is over (its snapshot ended); this one's
                // waits for the writes in flight, if any.
                let parked = Some(arrival).filter(|_| mode.plain.get() > 0);
                *mode.waiting.borrow_mut() = parked;
            }),
        );
    }
}

impl Drop for VolumeBackend {
    /// The volume is gone: every reactor drops its [`Mode`] of it.
    fn drop(&mut self) {
        let id = self.shared.id;
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
        let mode = reactor.channel(s.id, || {
            let mut m = s.modes();
            if !m.reactors.iter().any(|h| h.same(reactor.handle())) {
                m.reactors.push(reactor.handle().clone());
            }
            Ok::<_, BdevError>(Mode {
                generation: Cell::new(m.epoch),
                plain: Cell::new(0),
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

/// Copies chunks the running snapshot still needs, then submits the write.
fn guarded_write(
    shared: Arc<Shared>,
    inner: Rc<Channel>,
    reactor: Rc<Reactor>,
    io: BdevIo,
    done: IoDone,
) {
    for chunk in shared.chunk_range(&io) {
        let state = &shared.state[chunk as usize];
        let from = state.load(Ordering::Acquire);
        match from {
            DONE | PRESERVED => continue,
            // The snapshot is abandoned (recorded durably): nothing to keep any more.
            NOT_READ | READ if shared.store.get().is_some_and(Preserve::is_abandoned) => continue,
            NOT_READ | READ => {
                if state
                    .compare_exchange(from, PRESERVING, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    return retry(shared, inner, reactor, io, done);
                }
                // Save the old contents for the snapshot, then look again.
                let len = shared.chunk_len(chunk);
                let read = BdevIo::read(
                    chunk * shared.chunk_bytes / shared.block_size,
                    len / shared.block_size,
                    vec![IoBuf::new(len as usize)],
                );
                let (s, i, r) = (Arc::clone(&shared), Rc::clone(&inner), Rc::clone(&reactor));
                let generation = shared.generation.load(Ordering::SeqCst);
                return inner.submit(read, move |c: IoCompletion| {
                    let state = &s.state[chunk as usize];
                    // Checked and published under the lock that begin/end bump the
                    // generation under, so a stale copy can never be published.
                    let mut preserved = s.preserved();
                    if s.generation.load(Ordering::SeqCst) != generation {
                        // The snapshot this copy was for has ended (or another began):
                        // throw it away and decide again under the current one.
                        drop(preserved);
                        return guarded_write(s, i, r, io, done);
                    }
                    let old = IoCompletion::ok(c.bufs);
                    match (c.result, s.store.get()) {
                        (Ok(()), Some(store)) => {
                            // Counted and stamped while the generation is known to be
                            // current: a new snapshot waits for it, and a copy can
                            // never carry a later snapshot's token.
                            store.in_flight.fetch_add(1, Ordering::SeqCst);
                            let copy = Copy {
                                chunk,
                                from,
                                generation,
                                token: store.token(),
                            };
                            drop(preserved);
                            save_durably(s, i, r, io, done, copy, old.bufs);
                        }
                        (Ok(()), None) => {
                            preserved.insert(chunk, old.data());
                            state.store(PRESERVED, Ordering::Release);
                            drop(preserved);
                            guarded_write(s, i, r, io, done);
                        }
                        (Err(e), _) => {
                            drop(preserved);
                            // Leave the chunk to the snapshot reader; fail the write
                            // rather than lose the point-in-time image.
                            state.store(from, Ordering::Release);
                            done(IoCompletion::err(io.bufs, e));
                        }
                    }
                });
            }
            _ => return retry(shared, inner, reactor, io, done),
        }
    }
    // The write lands after this: if it decided again under a snapshot that began
    // since it was marked, that snapshot took the marks, so they go in again (a load
    // when they are still there).
    let generation = shared.generation.load(Ordering::SeqCst);
    let chunks = shared.chunk_range(&io);
    for chunk in chunks.clone() {
        shared.mark_dirty(chunk);
    }
    let on = reactor.handle().clone();
    inner.pass(
        io,
        Box::new(move |c| {
            if shared.generation.load(Ordering::SeqCst) == generation {
                return done(c);
            }
            // A snapshot ended and another began while this write was in flight: the
            // new one took its marks and may have read the chunks before it landed, so
            // they are marked again for the next one (and put on record first).
            for chunk in chunks.clone() {
                shared.mark_dirty(chunk);
            }
            let missing: Vec<u64> = match shared.record.get() {
                Some(record) => chunks.filter(|&ch| !record.has(ch)).collect(),
                None => Vec::new(),
            };
            match shared.record.get().filter(|_| !missing.is_empty()) {
                Some(record) => record.need(missing, &on, move |r| match r {
                    Ok(()) => done(c),
                    Err(e) => done(IoCompletion::err(c.bufs, e)),
                }),
                None => done(c),
            }
        }),
    );
}

/// A copy-before-write in progress.
struct Copy {
    chunk: u64,
    /// The chunk's state before (`NOT_READ` or `READ`), restored if the copy fails.
    from: u8,
    /// The snapshot it is for, and that snapshot's token.
    generation: u64,
    token: [u8; 16],
}

/// Writes a chunk's old contents (`old`, just read) to the volume's store of copies,
/// then goes on with the host write. If the copy cannot be written (the state disk is
/// full or failing), the snapshot is abandoned rather than the host's write failed —
/// unless even abandoning it cannot be recorded.
fn save_durably(
    shared: Arc<Shared>,
    inner: Rc<Channel>,
    reactor: Rc<Reactor>,
    io: BdevIo,
    done: IoDone,
    copy: Copy,
    old: Vec<IoBuf>,
) {
    let Copy {
        chunk,
        from,
        generation,
        token,
    } = copy;
    let Some(store) = shared.store.get() else {
        return guarded_write(shared, inner, reactor, io, done);
    };
    let channel = match store.bdev.channel() {
        Ok(c) => c,
        Err(e) => {
            store.in_flight.fetch_sub(1, Ordering::SeqCst);
            shared.state[chunk as usize].store(from, Ordering::Release);
            return done(IoCompletion::err(io.bufs, e));
        }
    };
    let write = store.copy_write(chunk, &token, old);
    channel.submit(write, move |c: IoCompletion| {
        let s = shared;
        let preserved = s.preserved();
        if let Some(store) = s.store.get() {
            store.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        if s.generation.load(Ordering::SeqCst) != generation {
            drop(preserved);
            return guarded_write(s, inner, reactor, io, done);
        }
        match c.result {
            Ok(()) => {
                // A chunk the snapshot has read already needs the copy only if a
                // restart makes it read the chunk again.
                let now = if from == READ { DONE } else { PRESERVED };
                s.state[chunk as usize].store(now, Ordering::Release);
                drop(preserved);
                guarded_write(s, inner, reactor, io, done);
            }
            Err(e) => match s.store.get().filter(|_| !stopping(&e)).map(|p| {
                p.abandon(&format!(
                    "the copy of chunk {chunk} could not be written: {e}"
                ))
            }) {
                Some(Ok(())) => {
                    // Recorded durably: no restart will continue this snapshot, so the
                    // host's write may go ahead over the chunk.
                    s.state[chunk as usize].store(DONE, Ordering::Release);
                    drop(preserved);
                    guarded_write(s, inner, reactor, io, done);
                }
                _ => {
                    s.state[chunk as usize].store(from, Ordering::Release);
                    drop(preserved);
                    done(IoCompletion::err(io.bufs, e));
                }
            },
        }
    });
}

/// Whether `e` says the appliance is stopping (a copy cancelled at shutdown): that
/// fails the host's write but does not abandon the snapshot, which resumes.
fn stopping(e: &BdevError) -> bool {
    matches!(e, BdevError::ShuttingDown)
        || matches!(e, BdevError::Io { errno, .. } if *errno == libc::ECANCELED)
}

fn retry(shared: Arc<Shared>, inner: Rc<Channel>, reactor: Rc<Reactor>, io: BdevIo, done: IoDone) {
    let r = Rc::clone(&reactor);
    r.after(RETRY, move || {
        guarded_write(shared, inner, reactor, io, done)
    });
}

impl BackendChannel for VolumeChannel {
    fn submit(&self, io: BdevIo, done: IoDone) {
        if !matches!(
            io.io_type,
            IoType::Write | IoType::WriteZeroes | IoType::Unmap
        ) {
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
                Err(e) => done(IoCompletion::err(io.bufs, e)),
            });
        }
    }
    if !guarded {
        let mode = Rc::clone(mode);
        return inner.pass(
            io,
            Box::new(move |c| {
                mode.end_plain();
                done(c)
            }),
        );
    }
    guarded_write(
        Arc::clone(s),
        Rc::clone(inner),
        Rc::clone(reactor),
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

    /// Whether no copy of an earlier snapshot is still being written to the store (a
    /// new snapshot waits for this before [`Self::begin_snapshot`]).
    pub fn copies_settled(&self) -> bool {
        self.shared
            .store
            .get()
            .is_none_or(|p| p.in_flight.load(Ordering::SeqCst) == 0)
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
    /// change set). Writes that started before it may still be running: the snapshot
    /// point is once they are done ([`Self::writes_settle`], then [`Self::settle`]).
    pub fn begin_snapshot(&self) -> Result<ChangedChunks, BdevError> {
        let s = &self.shared;
        self.hold()?;
        {
            // Under the lock copies are counted and stamped under: none of an earlier
            // snapshot is in flight, and none can start once the generation moves on.
            let mut preserved = s.preserved();
            if let Some(store) = s.store.get() {
                let ready = if self.copies_settled() {
                    store.reset(*Uuid::new_v4().as_bytes())
                } else {
                    Err(BdevError::Config {
                        name: s.inner.name().to_string(),
                        reason: "copies of the previous snapshot are still being written".into(),
                    })
                };
                if let Err(e) = ready {
                    s.running.store(false, Ordering::SeqCst);
                    return Err(e);
                }
            }
            s.generation.fetch_add(1, Ordering::SeqCst);
            preserved.clear();
        }
        for st in s.state.iter() {
            st.store(NOT_READ, Ordering::Relaxed);
        }
        s.committed.store(0, Ordering::SeqCst);
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
    /// write. Returns how many saved copies were found.
    pub fn resume_snapshot(
        &self,
        token: [u8; 16],
        next: u64,
        changed: &ChangedChunks,
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
        {
            let _preserved = s.preserved();
            s.generation.fetch_add(1, Ordering::SeqCst);
        }
        for (c, st) in s.state.iter().enumerate() {
            let c = c as u64;
            let state = if c >= next && changed.contains(c) {
                NOT_READ
            } else {
                DONE
            };
            st.store(state, Ordering::Relaxed);
        }
        for &c in &saved {
            s.state[c as usize].store(PRESERVED, Ordering::Relaxed);
        }
        s.committed.store(next, Ordering::SeqCst);
        s.resumed.store(true, Ordering::SeqCst);
        s.set_active(true, false);
        Ok(saved.len())
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

    /// Whether every write that started before [`Self::begin_snapshot`] has finished;
    /// the snapshot waits for this, then calls [`Self::settle`].
    pub fn writes_settled(&self) -> bool {
        self.shared
            .settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled()
    }

    /// Resolves once every write that started before [`Self::begin_snapshot`] has
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
    /// base): drop any copy a write saved for it.
    pub fn skip_chunk(&self, chunk: u64) {
        let state = &self.shared.state[chunk as usize];
        if state.swap(DONE, Ordering::AcqRel) == PRESERVED {
            self.shared.preserved().remove(&chunk);
        }
    }

    /// Records that the change set is now relative to snapshot `id`.
    pub fn set_base(&self, id: Option<[u8; 16]>) {
        *self.shared.base.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// What the snapshot should read for `chunk`: a copy a write saved, or the device
    /// (the chunk is then protected until [`Self::chunk_read`]). `Err(())` means a
    /// write is copying it right now: ask again shortly.
    #[allow(clippy::result_unit_err)]
    pub fn claim_chunk(&self, chunk: u64) -> Result<Claim, ()> {
        let s = &self.shared;
        let state = &s.state[chunk as usize];
        match state.compare_exchange(NOT_READ, READING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(Claim::Device),
            Err(PRESERVED) => {
                let copy = s.preserved().remove(&chunk);
                state.store(DONE, Ordering::Release);
                Ok(match (copy, s.store.get()) {
                    (Some(data), _) => Claim::Copy(data),
                    (None, Some(store)) => {
                        let (offset_blocks, num_blocks) = store.copy_blocks(chunk);
                        Claim::Saved {
                            dev: store.bdev.clone(),
                            offset_blocks,
                            num_blocks,
                        }
                    }
                    (None, None) => Claim::Device,
                })
            }
            Err(DONE | READ) => Ok(Claim::Device),
            Err(_) => Err(()),
        }
    }

    /// The snapshot has read `chunk` from the device: writes may go ahead.
    pub fn chunk_read(&self, chunk: u64) {
        self.shared.state[chunk as usize].store(self.shared.after_read(), Ordering::Release);
    }

    /// The snapshot's journal now covers every chunk before `next`: writes to those
    /// need no copies any more (see [`Self::chunk_read`]).
    pub fn commit_through(&self, next: u64) {
        let s = &self.shared;
        let next = next.min(s.chunks);
        let from = s.committed.swap(next, Ordering::AcqRel).min(next);
        for st in &s.state[from as usize..next as usize] {
            let _ = st.compare_exchange(READ, DONE, Ordering::AcqRel, Ordering::Acquire);
        }
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
        let s = &self.shared;
        let _preserved = s.preserved();
        if s.generation.load(Ordering::SeqCst) == generation {
            s.state[chunk as usize].store(s.after_read(), Ordering::Release);
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
        let s = &self.shared;
        {
            let _preserved = s.preserved();
            s.generation.fetch_add(1, Ordering::SeqCst);
        }
        s.set_active(false, false);
        s.resumed.store(false, Ordering::SeqCst);
        for st in s.state.iter() {
            st.store(DONE, Ordering::Relaxed);
        }
        s.preserved().clear();
        if let Some(store) = s.store.get() {
            store.release();
        }
        if let Some(c) = failed {
            self.add_changes(c);
        }
        s.running.store(false, Ordering::SeqCst);
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
        record: OnceLock::new(),
        state: (0..chunks).map(|_| AtomicU8::new(DONE)).collect(),
        preserved: Mutex::new(HashMap::new()),
        store: OnceLock::new(),
        committed: AtomicU64::new(0),
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
