//! OX cores: dedicated threads, pinned like reactors but separate from them, each
//! running a single-threaded async-io executor. Object-store I/O, zstd and AES run
//! here, never on a reactor. Work arrives as jobs on a bounded channel; a full channel
//! is back-pressure for the sender — or, for a sender that must not wait (a reactor),
//! the job goes to a courier thread that hands it over the moment there is room.
//! Each core also takes jobs meant for it alone ([`CoreSet`]): a snapshot's encoders,
//! one on every OX core.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use async_executor::LocalExecutor;

use crate::error::OxError;

/// A job: given the core's executor (to spawn connection tasks on), the future to run.
pub type Job =
    Box<dyn FnOnce(Rc<LocalExecutor<'static>>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

thread_local! {
    /// On an OX core's thread: its set's id and its place in the set.
    static CURRENT: Cell<Option<(u64, usize)>> = const { Cell::new(None) };
}

/// Ids of the sets of OX cores started (tests start several in one process).
static SETS: AtomicU64 = AtomicU64::new(0);

/// The OX cores of one set, each reachable on its own: where a job goes to one core in
/// particular (see [`OxCores::set`]). Cloned freely; the default has no core.
#[derive(Clone, Default)]
pub struct CoreSet {
    id: u64,
    cores: Vec<async_channel::Sender<Job>>,
}

impl std::fmt::Debug for CoreSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CoreSet({} cores)", self.cores.len())
    }
}

impl CoreSet {
    /// How many cores the set has.
    pub fn len(&self) -> usize {
        self.cores.len()
    }

    /// Whether it has none.
    pub fn is_empty(&self) -> bool {
        self.cores.is_empty()
    }

    /// Every core of the set.
    pub fn all(&self) -> Vec<OneCore> {
        self.cores.iter().cloned().map(OneCore).collect()
    }

    /// The set's cores but the one the caller runs on (all of them if it runs on none
    /// of the set's): where work a core shares with the others goes.
    pub fn others(&self) -> Vec<OneCore> {
        let me = CURRENT
            .get()
            .filter(|(set, _)| *set == self.id)
            .map(|(_, i)| i);
        (0..self.cores.len())
            .filter(|i| Some(*i) != me)
            .map(|i| OneCore(self.cores[i].clone()))
            .collect()
    }
}

/// One OX core, to run jobs on.
pub struct OneCore(async_channel::Sender<Job>);

impl OneCore {
    /// Runs `job` on this core (its queue is unbounded: few such jobs, each long). An
    /// error once the cores have stopped.
    pub fn submit(&self, job: Job) -> Result<(), OxError> {
        self.0
            .try_send(job)
            .map_err(|_| OxError::Config("OX cores have stopped".into()))
    }
}

/// A running set of OX cores.
pub struct OxCores {
    tx: async_channel::Sender<Job>,
    /// Each core's own queue ([`CoreSet`]).
    set: CoreSet,
    threads: Vec<JoinHandle<()>>,
    /// Jobs the queue had no room for, on their way to it ([`Self::submit_soon`]).
    courier: Option<std::sync::mpsc::Sender<Job>>,
    /// Jobs with the courier: while any are, later ones queue behind them, so none
    /// waits for ever behind senders that keep finding room first. (A shared count, on
    /// a cold miss's path only: one atomic add per fetch sent, next to a GET.)
    held: Arc<std::sync::atomic::AtomicUsize>,
    courier_thread: Option<JoinHandle<()>>,
}

impl OxCores {
    /// Starts one thread per entry of `cores` (CPU numbers, or `None` for unpinned),
    /// sharing a queue of at most `queue` pending jobs.
    pub fn start(cores: &[Option<usize>], queue: usize) -> Result<Self, OxError> {
        if cores.is_empty() {
            return Err(OxError::Config("at least one OX core".into()));
        }
        let (tx, rx) = async_channel::bounded::<Job>(queue.max(1));
        let mut set = CoreSet {
            id: SETS.fetch_add(1, Ordering::Relaxed),
            cores: Vec::new(),
        };
        let mut threads = Vec::new();
        for (i, core) in cores.iter().copied().enumerate() {
            let rx = rx.clone();
            let (own_tx, own) = async_channel::unbounded::<Job>();
            set.cores.push(own_tx);
            let set_id = set.id;
            let t = std::thread::Builder::new()
                .name(format!("ox-core-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id: c });
                    }
                    CURRENT.set(Some((set_id, i)));
                    let ex = Rc::new(LocalExecutor::new());
                    let take = |rx: async_channel::Receiver<Job>| {
                        let ex = Rc::clone(&ex);
                        async move {
                            while let Ok(job) = rx.recv().await {
                                ex.spawn(job(Rc::clone(&ex))).detach();
                            }
                        }
                    };
                    let run = futures_lite::future::zip(take(rx), take(own));
                    async_io::block_on(ex.run(run));
                })
                .map_err(|e| OxError::Config(format!("starting OX core {i}: {e}")))?;
            threads.push(t);
        }
        // Waits for room on behalf of senders that must not (woken by room, never by
        // a timer); ends when the cores stop or the last sender is gone.
        let (courier, jobs) = std::sync::mpsc::channel::<Job>();
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (to, count) = (tx.clone(), Arc::clone(&held));
        let courier_thread = std::thread::Builder::new()
            .name("ox-courier".into())
            .spawn(move || {
                for job in jobs {
                    if to.send_blocking(job).is_err() {
                        return;
                    }
                    count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                }
            })
            .map_err(|e| OxError::Config(format!("starting the OX courier: {e}")))?;
        Ok(Self {
            tx,
            set,
            threads,
            courier: Some(courier),
            held,
            courier_thread: Some(courier_thread),
        })
    }

    /// Queues `job` without waiting: at once if the queue has room and nothing waits
    /// for it, else through the courier, which hands jobs over in order as soon as
    /// there is room. An error only once the cores have stopped.
    pub fn submit_soon(&self, job: Job) -> Result<(), OxError> {
        use std::sync::atomic::Ordering;
        let stopped = || OxError::Config("OX cores have stopped".into());
        let job = if self.held.load(Ordering::Acquire) == 0 {
            match self.tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(async_channel::TrySendError::Full(job)) => job,
                Err(async_channel::TrySendError::Closed(_)) => return Err(stopped()),
            }
        } else {
            job
        };
        let courier = self.courier.as_ref().ok_or_else(stopped)?;
        self.held.fetch_add(1, Ordering::AcqRel);
        courier.send(job).map_err(|_| {
            self.held.fetch_sub(1, Ordering::AcqRel);
            stopped()
        })
    }

    /// Each core on its own, to place jobs on one in particular.
    pub fn set(&self) -> CoreSet {
        self.set.clone()
    }

    /// Queues `job`, waiting if the queue is full.
    pub fn submit_blocking(&self, job: Job) -> Result<(), OxError> {
        self.tx
            .send_blocking(job)
            .map_err(|_| OxError::Config("OX cores have stopped".into()))
    }

    /// Queues `job` unless the queue is full (then the job comes back).
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        self.tx.try_send(job).map_err(|e| e.into_inner())
    }

    /// Runs `f` on an OX core and waits for its result (for control-path callers).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(Rc<LocalExecutor<'static>>) -> Pin<Box<dyn Future<Output = T>>> + Send + 'static,
    ) -> Result<T, OxError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit_blocking(Box::new(move |ex| {
            let fut = f(ex);
            Box::pin(async move {
                let _ = tx.send(fut.await);
            })
        }))?;
        rx.recv()
            .map_err(|_| OxError::Config("OX core dropped the job".into()))
    }

    /// Closes the queues and joins the threads (all but the caller's, if it is one of
    /// them). A core stops once its queues are drained: jobs not finished by then are
    /// not polled again, jobs still with the courier never run, and nothing waits for
    /// them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.close();
        for own in &self.set.cores {
            own.close();
        }
        // The courier ends too: its sends fail once the queue is closed.
        drop(self.courier.take());
        // Stopped from one of these threads (a job it held kept the last reference):
        // that thread ends by itself once back in its loop; joining it would wait for
        // itself.
        let me = std::thread::current().id();
        if let Some(t) = self.courier_thread.take()
            && t.thread().id() != me
        {
            let _ = t.join();
        }
        for t in self.threads.drain(..) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for OxCores {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ObjectStore;
    use crate::store::local::LocalStore;

    #[test]
    fn the_cores_stop_when_a_job_on_one_of_them_drops_the_last_reference() {
        let cores = Arc::new(OxCores::start(&[None, None], 4).unwrap());
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let last = Arc::clone(&cores);
        cores
            .submit_blocking(Box::new(move |_ex| {
                Box::pin(async move {
                    // Blocks this core until the test has let its own reference go.
                    let _ = wait.recv();
                    assert_eq!(Arc::strong_count(&last), 1, "the job's is the last");
                    drop(last);
                    let _ = done.send(());
                })
            }))
            .unwrap();
        drop(cores);
        go.send(()).unwrap();
        // A core that joined itself would panic before answering: the sender dropped.
        finished.recv().expect("the job died in the cores' stop");
    }

    #[test]
    fn jobs_a_full_queue_turns_away_wait_for_room_and_all_run() {
        let cores = OxCores::start(&[None], 1).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (ran, arrivals) = std::sync::mpsc::channel::<usize>();
        // The one core is busy until told, so the queue (room for one) fills.
        cores
            .submit_soon(Box::new(move |_ex| {
                Box::pin(async move {
                    let _ = held.recv();
                })
            }))
            .unwrap();
        for i in 0..50 {
            let ran = ran.clone();
            cores
                .submit_soon(Box::new(move |_ex| {
                    Box::pin(async move {
                        let _ = ran.send(i);
                    })
                }))
                .unwrap();
        }
        release.send(()).unwrap();
        let mut seen: Vec<usize> = (0..50)
            .map(|_| {
                arrivals
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .unwrap()
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        cores.shutdown();
    }

    #[test]
    fn a_job_placed_on_one_core_runs_there_and_others_leaves_out_the_callers_core() {
        let cores = OxCores::start(&[None, None, None], 4).unwrap();
        let set = cores.set();
        assert_eq!(set.others().len(), 3, "the caller is on none of them");
        // From a job on the set's cores: the two others, and a job placed on each runs
        // on a thread of its own, not the caller's.
        let (mine, theirs) = cores
            .run(move |_ex| {
                Box::pin(async move {
                    let (tx, rx) = async_channel::unbounded();
                    let others = set.others();
                    for core in &others {
                        let tx = tx.clone();
                        core.submit(Box::new(move |_ex| {
                            Box::pin(async move {
                                let _ = tx.send(std::thread::current().id()).await;
                            })
                        }))
                        .unwrap();
                    }
                    let mut theirs = Vec::new();
                    for _ in &others {
                        theirs.push(rx.recv().await.unwrap());
                    }
                    (std::thread::current().id(), theirs)
                })
            })
            .unwrap();
        assert_eq!(theirs.len(), 2);
        assert!(!theirs.contains(&mine) && theirs[0] != theirs[1]);
        assert!(CoreSet::default().others().is_empty());
        cores.shutdown();
    }

    #[test]
    fn jobs_run_on_ox_threads_not_the_caller() {
        let cores = OxCores::start(&[None, None], 4).unwrap();
        let caller = std::thread::current().id();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (thread, data) = cores
            .run(move |_ex| {
                Box::pin(async move {
                    let s = LocalStore::open(root).unwrap();
                    s.put("k", vec![1, 2, 3]).await.unwrap();
                    (std::thread::current().id(), s.get("k").await.unwrap())
                })
            })
            .unwrap();
        assert_ne!(thread, caller);
        assert_eq!(data, vec![1, 2, 3]);
        cores.shutdown();
    }
}
