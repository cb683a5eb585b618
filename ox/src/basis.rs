//! A snapshot in an object store as the basis of a clone: `bdev::Basis` whose fetches
//! run on OX cores — index page (cached), ranged GET of exactly the chunk's frame,
//! verify, decrypt, decompress — and complete back on the reactor that asked.

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
use crate::throttle::{Class, Throttle};

/// Makes this OX core's store instance (stores are per thread).
pub type StoreFactory =
    Arc<dyn Fn(&Rc<LocalExecutor<'static>>) -> Result<Rc<dyn ObjectStore>, OxError> + Send + Sync>;

/// Object-store traffic of one basis.
#[derive(Debug, Default)]
pub struct BasisCounters {
    /// Ranged GETs of frames.
    pub frame_gets: AtomicU64,
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

thread_local! {
    static STORES: RefCell<HashMap<u64, Rc<dyn ObjectStore>>> = RefCell::new(HashMap::new());
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
}

impl Inner {
    fn store(&self, ex: &Rc<LocalExecutor<'static>>) -> Result<Rc<dyn ObjectStore>, OxError> {
        if let Some(s) = STORES.with(|s| s.borrow().get(&self.id).cloned()) {
            return Ok(s);
        }
        let s = (self.factory)(ex)?;
        STORES.with(|m| m.borrow_mut().insert(self.id, Rc::clone(&s)));
        Ok(s)
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
        if result.is_ok() {
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

    async fn fetch(
        &self,
        ex: &Rc<LocalExecutor<'static>>,
        chunk: u64,
        reason: FetchReason,
    ) -> Result<Vec<u8>, OxError> {
        let m = &self.loaded.manifest;
        let chunk_bytes = u64::from(m.chunk_bytes);
        if chunk >= m.chunks() {
            return Err(OxError::Config(format!(
                "chunk {chunk} is beyond the volume"
            )));
        }
        let len = (m.volume_bytes - chunk * chunk_bytes).min(chunk_bytes) as usize;
        let store = self.store(ex)?;
        let page = self.page(&*store, chunk / PAGE_CHUNKS).await?;
        let entry = page
            .entries
            .get((chunk % PAGE_CHUNKS) as usize)
            .copied()
            .unwrap_or(Entry::Zero);
        match entry {
            Entry::Zero => {
                self.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                Ok(vec![0; len])
            }
            Entry::Frame { length, .. } => {
                let class = match reason {
                    FetchReason::ClientMiss => Class::Foreground,
                    _ => Class::Background,
                };
                self.throttle
                    .acquire(&self.name, class, u64::from(length))
                    .await;
                let counters = &self.counters;
                let bytes = self
                    .loaded
                    .chunk(&*store, chunk, entry, Some(&counters.integrity), |n| {
                        counters.frame_gets.fetch_add(1, Ordering::Relaxed);
                        counters.frame_bytes.fetch_add(n as u64, Ordering::Relaxed);
                    })
                    .await?;
                Ok(bytes.unwrap_or_else(|| vec![0; len]))
            }
        }
    }
}

impl Basis for ObjectBasis {
    fn chunk_bytes(&self) -> u64 {
        u64::from(self.inner.loaded.manifest.chunk_bytes)
    }

    fn size_bytes(&self) -> Option<u64> {
        Some(self.inner.loaded.manifest.volume_bytes)
    }

    fn fetch(&self, chunk: u64, reason: FetchReason, done: FetchDone) {
        let inner = Arc::clone(&self.inner);
        let done = Arc::new(Mutex::new(Some(done)));
        let for_job = Arc::clone(&done);
        let job: crate::cores::Job = Box::new(move |ex| {
            Box::pin(async move {
                let r = inner.fetch(&ex, chunk, reason).await.map_err(fetch_error);
                if let Some(d) = for_job.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    d(r);
                }
            })
        });
        submit_or_retry(Arc::clone(&self.inner.cores), job, done, 0);
    }
}

/// What a failed fetch tells the clone: damaged data (after refetches; a missing
/// object means the snapshot is damaged too), the store out of reach, or other.
pub fn fetch_error(e: OxError) -> FetchError {
    match e {
        OxError::Integrity { .. } | OxError::NotFound { .. } => {
            FetchError::Integrity(e.to_string())
        }
        OxError::Unavailable { .. } | OxError::Refused { .. } | OxError::Untrusted { .. } => {
            FetchError::Unavailable(e.to_string())
        }
        _ => FetchError::Failed(e.to_string()),
    }
}

/// Queues a fetch; when the OX queue is full, tries again shortly from the reactor's
/// timer (back-pressure without blocking the reactor), and gives up with an error
/// after about a second.
fn submit_or_retry(
    cores: Arc<OxCores>,
    job: crate::cores::Job,
    done: Arc<Mutex<Option<FetchDone>>>,
    attempt: u32,
) {
    let Err(job) = cores.try_submit(job) else {
        return;
    };
    match reactor::current() {
        Some(r) if attempt < 10_000 => {
            r.after(std::time::Duration::from_micros(100), move || {
                submit_or_retry(cores, job, done, attempt + 1)
            });
        }
        _ => {
            drop(job);
            if let Some(d) = done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                d(Err(FetchError::Failed(
                    "the OX fetch queue stayed full".into(),
                )));
            }
        }
    }
}
