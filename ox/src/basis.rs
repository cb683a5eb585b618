//! A snapshot in an object store as the basis of a clone: `bdev::Basis` whose fetches
//! run on OX cores — index page (cached), ranged GET of exactly the chunks' frames,
//! verify, decrypt, decompress — and complete back on the reactor that asked. A batch
//! of adjacent chunks travels in ranged GETs of about [`RUN_BYTES`] each (fetches ahead
//! of hosts from a far store in smaller ones, [`READ_AHEAD_RUN_BYTES`], and more of
//! them while fewer than [`BACKGROUND_REQUESTS`] connections are open), all asked for
//! at once (the background's at most [`BACKGROUND_REQUESTS`] sent at once on an OX
//! core, the rest in turn); a lone miss is one GET of one frame.
//! The store's round trip (its quickest answer so far) sizes a sequential reader's
//! read-ahead ([`bdev::read_ahead::wanted_bytes`]): a far store gets more asked for
//! ahead.
//!
//! Hosts' misses have connections of their own (`Lane`): background fetches
//! (read-ahead, thickening, a clone's warming, the appliance's own reads) never hold the connection a host's miss
//! would have taken, so a host's own GET never waits on a new connection's handshake
//! and slow start because a walk has every pooled one in use.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_executor::LocalExecutor;
use bdev::{Basis, FetchDone, FetchError, FetchReason};

use crate::cores::OxCores;
use crate::error::OxError;
use crate::format::{Entry, IndexPage, PAGE_CHUNKS};
use crate::snapshot::Loaded;
use crate::store::ObjectStore;
use crate::store::http::RequestRoom;
use crate::throttle::{Class, Throttle};

/// Makes this OX core's store instance (stores are per thread).
pub type StoreFactory =
    Arc<dyn Fn(&Rc<LocalExecutor<'static>>) -> Result<Rc<dyn ObjectStore>, OxError> + Send + Sync>;

/// Object-store traffic of one basis.
#[derive(Debug, Default)]
pub struct BasisCounters {
    /// Ranged GETs of frames (a GET may carry several adjacent frames).
    pub frame_gets: AtomicU64,
    /// Frames fetched.
    pub frames: AtomicU64,
    /// Bytes of frames fetched.
    pub frame_bytes: AtomicU64,
    /// Index pages fetched.
    pub page_gets: AtomicU64,
    /// Bytes of index pages fetched.
    pub page_bytes: AtomicU64,
    /// Chunks answered as zeroes without any GET.
    pub zero_chunks: AtomicU64,
    /// Frames and index pages that failed their check, and fetches made again.
    pub integrity: crate::fetch::IntegrityCounters,
}

struct Inner {
    id: u64,
    loaded: Loaded,
    factory: StoreFactory,
    cores: Arc<OxCores>,
    throttle: Throttle,
    name: String,
    pages: Mutex<HashMap<u64, PageSlot>>,
    counters: BasisCounters,
    /// The store's round trip, µs: the least any OX core's store has reported after a
    /// frame GET or an index page load ([`ObjectStore::round_trip`]; `u64::MAX`: none
    /// yet). With `background_limit`, what sizes a sequential reader's read-ahead.
    round_trip_us: AtomicU64,
    /// The clone's background limit as of its last frame GET or index page load (bytes a
    /// second; 0: none).
    background_limit: AtomicU64,
}

/// An index page: loaded, or being loaded with others waiting for it.
enum PageSlot {
    Ready(Arc<IndexPage>),
    Loading(Vec<async_channel::Sender<Result<Arc<IndexPage>, String>>>),
}

/// A snapshot as a clone's basis.
#[derive(Clone)]
pub struct ObjectBasis {
    inner: Arc<Inner>,
}

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Which of a basis's two stores on an OX core (each with its own connections) a
/// request goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lane {
    /// Hosts' misses, and every index page (so the pages a clone loads as it opens
    /// warm, on the OX core that loads them, a connection for its hosts' first misses).
    Host,
    /// Everything the appliance fetches on its own: read-ahead, thickening, warming, its
    /// own reads of the clone (a snapshot of it).
    Background,
}

impl Lane {
    /// The lane of a fetch: the throttle's foreground class is the host's.
    fn of(reason: FetchReason) -> Self {
        match reason {
            FetchReason::ClientMiss => Self::Host,
            FetchReason::Prefetch | FetchReason::Thickening | FetchReason::Internal => {
                Self::Background
            }
        }
    }
}

thread_local! {
    /// On an OX core: the stores (and their pooled connections) of the bases that
    /// fetched there, by basis id and lane, until the basis is dropped.
    static STORES: RefCell<HashMap<(u64, Lane), Rc<dyn ObjectStore>>> =
        RefCell::new(HashMap::new());
}

impl ObjectBasis {
    /// A basis over the loaded snapshot; fetches run on `cores` with stores made by
    /// `factory`, within `throttle` (as volume `name`).
    pub fn new(
        loaded: Loaded,
        factory: StoreFactory,
        cores: Arc<OxCores>,
        throttle: Throttle,
        name: &str,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT.fetch_add(1, Ordering::Relaxed),
                loaded,
                factory,
                cores,
                throttle,
                name: name.to_string(),
                pages: Mutex::new(HashMap::new()),
                counters: BasisCounters::default(),
                round_trip_us: AtomicU64::new(u64::MAX),
                background_limit: AtomicU64::new(0),
            }),
        }
    }

    /// Traffic counters.
    pub fn counters(&self) -> &BasisCounters {
        &self.inner.counters
    }

    /// Volume size.
    pub fn volume_bytes(&self) -> u64 {
        self.inner.loaded.manifest.volume_bytes
    }

    /// The index pages a clone loads as it opens, so that a host's first read there
    /// costs one GET (its frame), not two (the page, then the frame): every stored page
    /// when there are at most [`PREFETCH_ALL_PAGES`]; otherwise the first and the last,
    /// where hosts read first (partition tables and their backup, file-system
    /// superblocks). A page costs at most 320 KiB before compression, so a clone of a
    /// large volume read sparsely still moves about what it reads.
    pub fn pages_to_prefetch(&self) -> Vec<u64> {
        let m = &self.inner.loaded.manifest;
        let stored: Vec<u64> = m
            .stored_pages()
            .take(PREFETCH_ALL_PAGES as usize + 1)
            .collect();
        if stored.len() as u64 <= PREFETCH_ALL_PAGES {
            return stored;
        }
        let last = (0..m.page_count()).rev().find(|&p| !m.page_is_empty(p));
        let mut pages = vec![stored[0]];
        pages.extend(last.filter(|&l| l != stored[0]));
        pages
    }

    /// Starts loading [`Self::pages_to_prefetch`] on an OX core, all at once, in the
    /// background. The receiver gets the number of pages loaded when they are done (a
    /// page that fails is simply loaded again by the first fetch that needs it); it is
    /// dropped unanswered if the OX queue is full (prefetching is best effort).
    pub fn prefetch_index(&self) -> std::sync::mpsc::Receiver<usize> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pages = self.pages_to_prefetch();
        let inner = Arc::clone(&self.inner);
        let job: crate::cores::Job = Box::new(move |ex| {
            Box::pin(async move {
                let Ok(store) = Inner::store(&inner, &ex, Lane::Host) else {
                    let _ = tx.send(0);
                    return;
                };
                let loads = pages.into_iter().map(|p| {
                    let (inner, store) = (Arc::clone(&inner), Rc::clone(&store));
                    ex.spawn(async move { inner.page(&*store, p).await.is_ok() })
                });
                let loads: Vec<_> = loads.collect();
                let mut loaded = 0;
                for l in loads {
                    loaded += usize::from(l.await);
                }
                let _ = tx.send(loaded);
            })
        });
        let _ = self.inner.cores.try_submit(job);
        rx
    }
}

impl ObjectBasis {
    /// The snapshot's working set, if it stored one, fetched with this basis's store
    /// on OX core `ex` (counted with the index pages).
    pub async fn working_set(
        &self,
        ex: &Rc<LocalExecutor<'static>>,
    ) -> Result<Option<crate::format::WorkingSet>, OxError> {
        let store = Inner::store(&self.inner, ex, Lane::Background)?;
        let counters = &self.inner.counters;
        let found = self
            .inner
            .loaded
            .working_set(&*store, Some(&counters.integrity))
            .await?;
        Ok(found.map(|(set, bytes)| {
            counters.page_gets.fetch_add(1, Ordering::Relaxed);
            counters
                .page_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
            set
        }))
    }
}

/// A snapshot with at most this many stored index pages has them all loaded as its
/// clone opens (a dense 4 GiB volume with 64 KiB chunks; any sparse one whose data lies
/// in four GiB-wide stretches).
pub const PREFETCH_ALL_PAGES: u64 = 4;

impl Drop for Inner {
    /// A gone clone's stores on the OX cores, and their kept-alive connections, go with
    /// it: each core is told to let them go (no store can be made for it any more: that
    /// takes the basis). Cores that have stopped have nothing left to let go.
    fn drop(&mut self) {
        let id = self.id;
        for core in self.cores.set().all() {
            let _ = core.submit(Box::new(move |_ex| {
                Box::pin(async move {
                    let gone: Vec<_> = STORES.with(|m| {
                        m.borrow_mut()
                            .extract_if(|(basis, _), _| *basis == id)
                            .map(|(_, store)| store)
                            .collect()
                    });
                    // Outside the map's borrow, as in `Inner::store`.
                    drop(gone);
                })
            }));
        }
    }
}

impl Inner {
    /// This basis's store for `lane` on this OX core, made at its first use (and let go
    /// when the basis is dropped).
    fn store(
        this: &Arc<Self>,
        ex: &Rc<LocalExecutor<'static>>,
        lane: Lane,
    ) -> Result<Rc<dyn ObjectStore>, OxError> {
        let key = (this.id, lane);
        if let Some(s) = STORES.with(|m| m.borrow().get(&key).cloned()) {
            return Ok(s);
        }
        let store = (this.factory)(ex)?;
        if lane == Lane::Background {
            store.limit_requests(BACKGROUND_REQUESTS);
        }
        // None: the key was looked for above and nothing since could add it.
        let displaced = STORES.with(|m| m.borrow_mut().insert(key, Rc::clone(&store)));
        // Dropped outside the map's borrow: a store's drop may do anything.
        drop(displaced);
        Ok(store)
    }

    /// Index page `page`: from the cache, or loaded once however many fetches ask
    /// for it at the same time.
    async fn page(&self, store: &dyn ObjectStore, page: u64) -> Result<Arc<IndexPage>, OxError> {
        let wait = {
            let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
            match pages.get_mut(&page) {
                Some(PageSlot::Ready(p)) => return Ok(Arc::clone(p)),
                Some(PageSlot::Loading(waiters)) => {
                    let (tx, rx) = async_channel::bounded(1);
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    pages.insert(page, PageSlot::Loading(Vec::new()));
                    None
                }
            }
        };
        if let Some(rx) = wait {
            return rx
                .recv()
                .await
                .map_err(|_| OxError::Config("index page load abandoned".into()))?
                .map_err(|e| OxError::integrity(format!("index page {page}"), e));
        }
        let loaded = self
            .loaded
            .page(store, page, Some(&self.counters.integrity))
            .await;
        let fetched = loaded.as_ref().map_or(0, |(_, n)| *n);
        let result = loaded.map(|(p, _)| Arc::new(p));
        let waiters = {
            let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
            let slot = match &result {
                Ok(p) => pages.insert(page, PageSlot::Ready(Arc::clone(p))),
                Err(_) => pages.remove(&page),
            };
            match slot {
                Some(PageSlot::Loading(w)) => w,
                _ => Vec::new(),
            }
        };
        if result.is_ok() && fetched > 0 {
            self.noted(store);
            self.counters.page_gets.fetch_add(1, Ordering::Relaxed);
            self.counters
                .page_bytes
                .fetch_add(fetched as u64, Ordering::Relaxed);
        }
        for w in waiters {
            let _ = w.try_send(result.as_ref().map(Arc::clone).map_err(ToString::to_string));
        }
        result
    }

    /// Chunk `chunk`'s index entry, and its length in the volume.
    async fn entry(&self, store: &dyn ObjectStore, chunk: u64) -> Result<(Entry, usize), OxError> {
        let m = &self.loaded.manifest;
        let chunk_bytes = u64::from(m.chunk_bytes);
        if chunk >= m.chunks() {
            return Err(OxError::Config(format!(
                "chunk {chunk} is beyond the volume"
            )));
        }
        let len = (m.volume_bytes - chunk * chunk_bytes).min(chunk_bytes) as usize;
        if m.page_is_empty(chunk / PAGE_CHUNKS) {
            return Ok((Entry::Zero, len));
        }
        let page = self.page(store, chunk / PAGE_CHUNKS).await?;
        let entry = page
            .entries
            .get((chunk % PAGE_CHUNKS) as usize)
            .copied()
            .unwrap_or(Entry::Zero);
        Ok((entry, len))
    }

    /// Fetches `batch` (ascending chunks): zero chunks are answered at once; frames
    /// that lie back to back in one object are gathered into runs of at most
    /// [`Inner::run_bytes`] (and [`frames_and_headers`]' room) — ahead of hosts from a
    /// far store, more of them while its connections are not all open
    /// ([`runs_to_open`]) — each one ranged GET, and the runs are all asked for at once
    /// on this core (the background's at most [`BACKGROUND_REQUESTS`] sent, the rest in
    /// turn).
    async fn fetch_batch(
        self: Arc<Self>,
        ex: Rc<LocalExecutor<'static>>,
        batch: Vec<(u64, FetchDone)>,
        reason: FetchReason,
    ) {
        // Index pages go over the hosts' connections whoever asks: a host's miss that
        // needs a page being loaded waits for that load (a page is one GET per 16,384
        // chunks, so a walk seldom takes a host's connection for one).
        let lane = Lane::of(reason);
        let stores = Inner::store(&self, &ex, lane).and_then(|store| {
            let pages = match lane {
                Lane::Host => Rc::clone(&store),
                Lane::Background => Inner::store(&self, &ex, Lane::Host)?,
            };
            Ok((store, pages))
        });
        let (store, pages) = match stores {
            Ok(s) => s,
            Err(e) => {
                let e = fetch_error(e);
                return batch.into_iter().for_each(|(_, d)| d(Err(e.clone())));
            }
        };
        let mut frames = Vec::with_capacity(batch.len());
        for (chunk, done) in batch {
            let (entry, len) = match self.entry(&*pages, chunk).await {
                Ok(e) => e,
                Err(e) => {
                    done(Err(fetch_error(e)));
                    continue;
                }
            };
            let Entry::Frame {
                source,
                object,
                offset,
                length,
            } = entry
            else {
                self.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                done(Ok(vec![0; len]));
                continue;
            };
            // An offset no object can have (a hostile index) is damage, not a panic.
            if offset.checked_add(u64::from(length)).is_none() {
                done(Err(fetch_error(OxError::integrity(
                    format!("chunk {chunk}"),
                    "frame offset out of range",
                ))));
                continue;
            }
            frames.push(Frame {
                chunk,
                entry,
                done,
                at: (source, object, offset),
                length: u64::from(length),
            });
        }
        let mut runs = cut_runs(frames, frames_and_headers(self.run_bytes(reason)));
        if reason == FetchReason::Prefetch && self.far() {
            let extra = store
                .request_room()
                .map_or(0, |room| runs_to_open(runs.len(), room));
            split_largest(&mut runs, extra);
        }
        for run in runs {
            let (me, store) = (Arc::clone(&self), Rc::clone(&store));
            ex.spawn(async move { me.fetch_run(&*store, run, reason).await })
                .detach();
        }
    }

    /// Notes, after a frame GET or an index page load, the round trip `store` reports
    /// and the clone's background limit now: what sizes a sequential reader's read-ahead
    /// ([`Basis::read_ahead_bytes`]).
    fn noted(&self, store: &dyn ObjectStore) {
        if let Some(rtt) = store.round_trip() {
            let us = (rtt.as_micros() as u64).max(1);
            // The OX cores fetching for this clone share the minimum: a
            // read-modify-write, on an OX core, only when a store's round trip is
            // quicker than all before it (a few times in a clone's life).
            if us < self.round_trip_us.load(Ordering::Relaxed) {
                self.round_trip_us.fetch_min(us, Ordering::Relaxed);
            }
        }
        // The throttle's lock, on an OX core, once per GET: `pass` took it for every
        // 256 KiB slice of this one.
        let limit = self.throttle.rate(&self.name, Class::Background);
        self.background_limit.store(limit, Ordering::Relaxed);
    }

    /// What a sequential reader should have asked for ahead of it
    /// ([`Basis::read_ahead_bytes`]), once the store's round trip is known.
    fn wanted_ahead(&self) -> Option<u64> {
        match self.round_trip_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(bdev::read_ahead::wanted_bytes(
                std::time::Duration::from_micros(us),
                self.background_limit.load(Ordering::Relaxed),
            )),
        }
    }

    /// Whether the store is far, for the GETs ahead of hosts: its round trip wants more
    /// than [`FAR_AHEAD_BYTES`] ahead of a sequential reader.
    fn far(&self) -> bool {
        self.wanted_ahead().is_some_and(|b| b > FAR_AHEAD_BYTES)
    }

    /// The most one ranged GET for `reason` carries, besides its frames' headers:
    /// [`READ_AHEAD_RUN_BYTES`] for fetches ahead of hosts from a far store (one whose
    /// round trip wants more than [`FAR_AHEAD_BYTES`] ahead), else [`RUN_BYTES`].
    fn run_bytes(&self, reason: FetchReason) -> u64 {
        match reason {
            FetchReason::Prefetch if self.far() => READ_AHEAD_RUN_BYTES,
            FetchReason::Prefetch
            | FetchReason::ClientMiss
            | FetchReason::Thickening
            | FetchReason::Internal => RUN_BYTES,
        }
    }

    /// Waits for the throttle to pass `bytes`, a slice at a time: a large run takes
    /// its turns beside small requests instead of waiting for a bucket they keep low.
    async fn pass(&self, class: Class, mut bytes: u64) {
        while bytes > 0 {
            let n = bytes.min(THROTTLE_SLICE);
            self.throttle.acquire(&self.name, class, n).await;
            bytes -= n;
        }
    }

    /// One ranged GET for `run`, within the throttle; each chunk's `done` gets its
    /// bytes. If the run stays damaged after its refetches, each frame is fetched
    /// alone, so only a frame that is bad itself fails.
    async fn fetch_run(&self, store: &dyn ObjectStore, run: Run, reason: FetchReason) {
        let class = match Lane::of(reason) {
            Lane::Host => Class::Foreground,
            Lane::Background => Class::Background,
        };
        self.pass(class, run.bytes).await;
        let counters = &self.counters;
        let entries: Vec<(u64, Entry)> = run.chunks.iter().map(|(c, e, _)| (*c, *e)).collect();
        let frames = entries.len() as u64;
        let result = self
            .loaded
            .run(store, &entries, Some(&counters.integrity), |n| {
                self.noted(store);
                counters.frame_gets.fetch_add(1, Ordering::Relaxed);
                counters.frames.fetch_add(frames, Ordering::Relaxed);
                counters.frame_bytes.fetch_add(n as u64, Ordering::Relaxed);
            })
            .await;
        match result {
            Ok(decoded) => {
                for ((_, _, done), bytes) in run.chunks.into_iter().zip(decoded) {
                    done(Ok(bytes));
                }
            }
            Err(OxError::Integrity { .. } | OxError::Format(_)) if run.chunks.len() > 1 => {
                for (chunk, entry, done) in run.chunks {
                    let Entry::Frame { length, .. } = entry else {
                        done(Err(FetchError::Failed(format!("chunk {chunk}: no frame"))));
                        continue;
                    };
                    self.pass(class, u64::from(length)).await;
                    let alone = self
                        .loaded
                        .chunk(store, chunk, entry, Some(&counters.integrity), |n| {
                            counters.frame_gets.fetch_add(1, Ordering::Relaxed);
                            counters.frames.fetch_add(1, Ordering::Relaxed);
                            counters.frame_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        })
                        .await;
                    done(match alone {
                        Ok(Some(bytes)) => Ok(bytes),
                        Ok(None) => Err(FetchError::Failed(format!("chunk {chunk}: no frame"))),
                        Err(e) => Err(fetch_error(e)),
                    });
                }
            }
            Err(e) => {
                let e = fetch_error(e);
                for (_, _, done) in run.chunks {
                    done(Err(e.clone()));
                }
            }
        }
    }
}

/// The most requests a basis's background store (read-ahead, thickening, warming, the
/// appliance's own reads) has in flight on one OX core, the rest waiting their turn in
/// the order asked ([`ObjectStore::limit_requests`]); the hosts' store is not limited.
/// Unlimited, a far clone's read-ahead opened connections for each burst of its window:
/// new ones, whose TCP windows start small, and more than stay busy, whose windows a
/// server shrinks again while they idle; some of a window's GETs then took several times
/// as long as the rest, and the reader, which takes chunks in order, waited on them.
/// Measured against fewer and more in BENCHMARKS.md (session 31).
pub const BACKGROUND_REQUESTS: usize = 32;

/// The throttle passes a run's bytes in slices of at most this.
pub(crate) const THROTTLE_SLICE: u64 = 256 << 10;

/// The stored bytes one ranged GET carries, at most (besides `frames_and_headers`'
/// room): large enough that a request's fixed cost (a round trip, the server's first
/// byte, the CPU either side spends on it) is small beside its transfer.
pub const RUN_BYTES: u64 = 2 << 20;

/// The same for fetches ahead of hosts (a sequential reader's read-ahead, a new clone's
/// warm-up) from a far store ([`FAR_AHEAD_BYTES`]): a run's chunks are handed over only
/// once its whole answer has arrived and decoded, and a sequential reader takes them in
/// order, so smaller runs reach it sooner and in finer steps. Up to four times the
/// GETs of [`RUN_BYTES`] (2,048 a GiB of incompressible 64 KiB chunks; a GET carries a
/// frame at least, so 1 MiB chunks go one a GET instead of two), and a few more while
/// the store's connections are being opened ([`runs_to_open`]).
pub const READ_AHEAD_RUN_BYTES: u64 = 512 << 10;

/// A store is far, for the size of the GETs ahead of hosts, where its round trip wants
/// more than this ahead of a sequential reader ([`bdev::read_ahead::wanted_bytes`]):
/// twice the default read-ahead, 16 MiB, a round trip of more than ~34 ms (longer
/// where the clone's background limit is below 1 Gbit/s).
/// On Garage at 1 Gbit/s with 8 MiB objects (BENCHMARKS.md), GETs of
/// [`READ_AHEAD_RUN_BYTES`] instead of [`RUN_BYTES`] took a cold sequential read's
/// median from 73.7 to 85.3 MB/s at 60 ms, from 94.8 to 92.5 at 20 ms, and from 115.0
/// to 107.7 at 2 ms (where more requests cost more than they gain).
pub const FAR_AHEAD_BYTES: u64 = 2 * bdev::read_ahead::READ_AHEAD_BYTES;

/// The most a run of at most `run_bytes` of chunks carries: `run_bytes` and a
/// thirty-second more, room for the frames' own bytes (a header and a tag, 44 bytes
/// each: 1.4 KB for the 32 frames of 2 MiB of 64 KiB chunks), so `run_bytes` of chunks
/// stored incompressible stay one GET, not one of all but their last frame and one of
/// that frame.
fn frames_and_headers(run_bytes: u64) -> u64 {
    run_bytes + run_bytes / 32
}

/// One chunk's frame, to be fetched in a run.
struct Frame {
    chunk: u64,
    entry: Entry,
    done: FetchDone,
    /// Source, object and offset.
    at: (u16, u32, u64),
    length: u64,
}

/// Frames back to back in one object, fetched together.
struct Run {
    /// Source, object and the offset just past the last frame.
    at: (u16, u32, u64),
    bytes: u64,
    chunks: Vec<(u64, Entry, FetchDone)>,
}

/// `frames`, in chunk order, in runs: frames back to back in one object, at most `most`
/// bytes a run (a frame alone may be more).
fn cut_runs(frames: Vec<Frame>, most: u64) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for f in frames {
        let end = f.at.2 + f.length;
        match runs.last_mut() {
            Some(run) if run.at == f.at && run.bytes + f.length <= most => {
                run.at.2 = end;
                run.bytes += f.length;
                run.chunks.push((f.chunk, f.entry, f.done));
            }
            _ => runs.push(Run {
                at: (f.at.0, f.at.1, end),
                bytes: f.length,
                chunks: vec![(f.chunk, f.entry, f.done)],
            }),
        }
    }
    runs
}

/// How many runs to add to a batch cut in `runs` full-size ones ahead of hosts from a
/// far store that stands at `room`: none once it has as many connections open as
/// requests it may send at once; else one for each connection still to open, as long
/// as requests are free to send them now. A new connection's TCP window starts at ten
/// segments and doubles each round trip, so a sequential reader's first windows arrive
/// as fast as the sum of the windows of the connections carrying them grows: spread,
/// they open every connection at once, each with a small first GET, instead of a few
/// with full runs and the rest a window later (at 60 ms and 1 Gbit/s the first 16 MiB
/// took ~1 s, BENCHMARKS.md). A store that closes connections, or allows fewer, so
/// costs at most a run more a batch for each connection it lacks, never a multiple;
/// connections kept open but idle are not opened again (a server may have shrunk their
/// windows, as after any idle spell: not undone here).
fn runs_to_open(runs: usize, room: RequestRoom) -> usize {
    room.most
        .saturating_sub(room.open)
        .min(room.free.saturating_sub(runs))
}

/// Splits the run of the most bytes among those of two frames or more (the first of
/// them, if several) in two at the frame boundary nearest half its bytes, `extra` times
/// or until every run is one frame: the runs stay in chunk order, and the GETs added
/// carry the batch's bytes, not its smallest frames.
fn split_largest(runs: &mut Vec<Run>, extra: usize) {
    let frame_bytes = |(_, entry, _): &(u64, Entry, FetchDone)| match entry {
        Entry::Frame { length, .. } => u64::from(*length),
        Entry::Zero => 0,
    };
    for _ in 0..extra {
        let Some(i) = runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.chunks.len() > 1)
            .rev()
            .max_by_key(|(_, r)| r.bytes)
            .map(|(i, _)| i)
        else {
            return;
        };
        let run = &mut runs[i];
        // The boundary after frame `cut - 1`, one frame on each side at least.
        let (mut head_bytes, mut cut, mut best) = (0u64, 1, (0u64, u64::MAX));
        for (k, frame) in run.chunks[..run.chunks.len() - 1].iter().enumerate() {
            let before = head_bytes + frame_bytes(frame);
            let off_half = (2 * before).abs_diff(run.bytes);
            if off_half < best.1 {
                (cut, best) = (k + 1, (before, off_half));
            }
            head_bytes = before;
        }
        let tail = run.chunks.split_off(cut);
        let head_bytes = best.0;
        let tail_bytes: u64 = tail.iter().map(frame_bytes).sum();
        assert_eq!(
            head_bytes + tail_bytes,
            run.bytes,
            "a run's bytes are its frames'"
        );
        let tail = Run {
            at: run.at,
            bytes: tail_bytes,
            chunks: tail,
        };
        run.bytes = head_bytes;
        run.at.2 -= tail_bytes;
        runs.insert(i + 1, tail);
    }
}

impl Basis for ObjectBasis {
    fn chunk_bytes(&self) -> u64 {
        u64::from(self.inner.loaded.manifest.chunk_bytes)
    }

    fn size_bytes(&self) -> Option<u64> {
        Some(self.inner.loaded.manifest.volume_bytes)
    }

    fn read_ahead_bytes(&self) -> Option<u64> {
        self.inner.wanted_ahead()
    }

    fn fetch(&self, chunk: u64, reason: FetchReason, done: FetchDone) {
        self.fetch_batch(vec![(chunk, done)], reason);
    }

    fn fetch_batch(&self, mut batch: Vec<(u64, FetchDone)>, reason: FetchReason) {
        batch.sort_by_key(|(chunk, _)| *chunk);
        let inner = Arc::clone(&self.inner);
        // The job takes the batch when it runs; if it never does, the queue's refusal
        // answers whatever is still here.
        let waiting: Waiting = Arc::new(Mutex::new(batch));
        let for_job = Arc::clone(&waiting);
        let job: crate::cores::Job = Box::new(move |ex| {
            Box::pin(async move {
                let batch = std::mem::take(&mut *for_job.lock().unwrap_or_else(|p| p.into_inner()));
                inner.fetch_batch(ex, batch, reason).await;
            })
        });
        if self.inner.cores.submit_soon(job).is_err() {
            // The cores have stopped: whatever the job did not take is answered here.
            let batch = std::mem::take(&mut *waiting.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, d) in batch {
                d(Err(FetchError::Failed("the OX cores have stopped".into())));
            }
        }
    }
}

/// Fetches handed to a job not yet run.
type Waiting = Arc<Mutex<Vec<(u64, FetchDone)>>>;

/// What a failed fetch tells the clone: damaged data (after refetches; a missing
/// object means the snapshot is damaged too), the store out of reach, the store
/// refusing, or other.
pub fn fetch_error(e: OxError) -> FetchError {
    match e {
        OxError::Integrity { .. } | OxError::NotFound { .. } => {
            FetchError::Integrity(e.to_string())
        }
        OxError::Unavailable { .. } => FetchError::Unavailable(e.to_string()),
        OxError::Refused { .. } | OxError::Untrusted { .. } => FetchError::Refused(e.to_string()),
        _ => FetchError::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An incompressible 64 KiB chunk's frame.
    const FRAME: u32 = (64 << 10) + 44;

    fn room(open: usize, free: usize) -> RequestRoom {
        RequestRoom {
            most: BACKGROUND_REQUESTS,
            free,
            open,
        }
    }

    /// Frames of the given lengths back to back, chunk after chunk; each object
    /// (`objects`: how many frames each holds) starts at offset 0.
    fn frames(lengths: &[u32], objects: &[usize]) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut lengths = lengths.iter();
        for (object, &n) in objects.iter().enumerate() {
            let mut offset = 0u64;
            for &length in lengths.by_ref().take(n) {
                let (object, chunk) = (object as u32, out.len() as u64);
                let entry = Entry::Frame {
                    source: 0,
                    object,
                    offset,
                    length,
                };
                out.push(Frame {
                    chunk,
                    entry,
                    done: Box::new(|_| {}),
                    at: (0, object, offset),
                    length: u64::from(length),
                });
                offset += u64::from(length);
            }
        }
        out
    }

    /// Every chunk once, in order; each run's frames back to back in one object, its
    /// bytes theirs, `at` just past its last.
    fn check(runs: &[Run], chunks: u64) {
        let order: Vec<u64> = runs
            .iter()
            .flat_map(|r| r.chunks.iter().map(|c| c.0))
            .collect();
        assert_eq!(order, (0..chunks).collect::<Vec<_>>());
        for run in runs {
            let mut next = None;
            let mut bytes = 0;
            for (_, entry, _) in &run.chunks {
                let Entry::Frame {
                    object,
                    offset,
                    length,
                    ..
                } = *entry
                else {
                    panic!("a run holds a chunk without a frame");
                };
                assert_eq!(object, run.at.1);
                assert!(next.is_none_or(|n| n == offset), "not back to back");
                next = Some(offset + u64::from(length));
                bytes += u64::from(length);
            }
            assert_eq!((next, bytes), (Some(run.at.2), run.bytes));
        }
    }

    /// Cuts `lengths` (in `objects`) at full size ahead of hosts from afar, then adds
    /// the runs `room` calls for: (full-size runs, runs), and the most bytes a run
    /// carries then.
    fn cut_with_bytes(
        lengths: &[u32],
        objects: &[usize],
        room: RequestRoom,
    ) -> ((usize, usize), u64) {
        let most = frames_and_headers(READ_AHEAD_RUN_BYTES);
        let mut runs = cut_runs(frames(lengths, objects), most);
        let full = runs.len();
        check(&runs, lengths.len() as u64);
        split_largest(&mut runs, runs_to_open(full, room));
        check(&runs, lengths.len() as u64);
        let largest = runs.iter().map(|r| r.bytes).max().unwrap_or(0);
        ((full, runs.len()), largest)
    }

    fn cut(lengths: &[u32], objects: &[usize], room: RequestRoom) -> (usize, usize) {
        cut_with_bytes(lengths, objects, room).0
    }

    #[test]
    fn a_batch_spreads_over_the_connections_still_to_open_and_no_further() {
        let incompressible = [FRAME; 64];
        // Eight frames a full run; none open, all free: a run for each request free.
        assert_eq!(cut(&incompressible, &[64], room(0, 32)), (8, 32));
        // Some free: no more runs than could be sent now.
        assert_eq!(cut(&incompressible, &[64], room(0, 12)), (8, 12));
        assert_eq!(cut(&incompressible, &[64], room(0, 5)), (8, 8));
        // Some open: a run more for each connection still to open.
        for open in [31, 30, 24, 16] {
            let want = 8 + 32 - open;
            assert_eq!(cut(&incompressible, &[64], room(open, 32)), (8, want));
        }
        // All open (or more: fresh connections beside them): full runs.
        assert_eq!(cut(&incompressible, &[64], room(32, 32)), (8, 8));
        assert_eq!(cut(&incompressible, &[64], room(33, 32)), (8, 8));
        // Across two objects, and frames of mixed sizes: the same counts.
        let small = [10_000u32; 64];
        assert_eq!(cut(&small, &[33, 31], room(31, 32)), (2, 3));
        assert_eq!(cut(&small, &[33, 31], room(0, 3)), (2, 3));
        let mixed: Vec<u32> = [FRAME; 56].into_iter().chain([100; 200]).collect();
        let (full, _) = cut(&mixed, &[256], room(32, 32));
        assert_eq!(cut(&mixed, &[256], room(31, 32)), (full, full + 1));
        assert_eq!(cut(&mixed, &[256], room(0, 32)), (full, 32));
        // The runs added carry the bytes: two frames a GET where 64 go in 32, and the
        // large frames spread as evenly where small ones sit beside them.
        let two = 2 * u64::from(FRAME);
        assert_eq!(cut_with_bytes(&incompressible, &[64], room(0, 32)).1, two);
        let (_, largest) = cut_with_bytes(&mixed, &[256], room(0, 32));
        assert!(largest <= two + 200 * 100, "{largest} bytes in one run");
        // Never below a frame a run.
        assert_eq!(cut(&[FRAME; 3], &[3], room(0, 32)), (1, 3));
    }
}
