//! OX cores: dedicated threads, pinned like reactors but separate from them, each
//! running a single-threaded async-io executor. Object-store I/O, zstd and AES run
//! here, never on a reactor. Work arrives as jobs on a bounded channel; a full channel
//! is back-pressure for the sender — or, for a sender that must not wait (a reactor),
//! the job goes to a courier thread that hands it over the moment there is room.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use async_executor::LocalExecutor;

use crate::error::OxError;

/// A job: given the core's executor (to spawn connection tasks on), the future to run.
pub type Job =
    Box<dyn FnOnce(Rc<LocalExecutor<'static>>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// A running set of OX cores.
pub struct OxCores {
    tx: async_channel::Sender<Job>,
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
        let mut threads = Vec::new();
        for (i, core) in cores.iter().copied().enumerate() {
            let rx = rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("ox-core-{i}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(core_affinity::CoreId { id: c });
                    }
                    let ex = Rc::new(LocalExecutor::new());
                    let run = {
                        let ex = Rc::clone(&ex);
                        async move {
                            while let Ok(job) = rx.recv().await {
                                ex.spawn(job(Rc::clone(&ex))).detach();
                            }
                        }
                    };
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

    /// Stops accepting jobs, lets queued and running ones finish, joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx.close();
        // The courier ends too: its sends fail once the queue is closed.
        drop(self.courier.take());
        if let Some(t) = self.courier_thread.take() {
            let _ = t.join();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
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
