//! Starting and stopping a set of reactors, one per configured core.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::ReactorConfig;
use crate::cpu::current_tid;
use crate::error::ReactorError;
use crate::handle::{ReactorHandle, SetStop};
use crate::reactor::Reactor;

/// Running reactors. Dropping the set stops them (as [`ReactorSet::shutdown`] does).
pub struct ReactorSet {
    handles: Arc<[ReactorHandle]>,
    threads: Vec<Option<JoinHandle<Result<(), ReactorError>>>>,
    set_stop: Arc<SetStop>,
    drain_timeout: Duration,
}

impl ReactorSet {
    /// Validates the cores, then starts one pinned reactor thread per core and waits
    /// until every one is polling (or reports why it could not start).
    pub fn start(config: ReactorConfig) -> Result<Self, ReactorError> {
        config.cores.validate()?;
        if config.cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        let mut handles = Vec::new();
        let mut inboxes = Vec::new();
        let set_stop = Arc::new(SetStop::default());
        for (index, &core) in config.cores.cores().iter().enumerate() {
            let eventfd = new_eventfd().map_err(|source| ReactorError::Setup {
                core,
                what: "eventfd",
                source,
            })?;
            let (handle, inbox) = ReactorHandle::new(
                index,
                core,
                config.mailbox_depth.max(1),
                eventfd,
                Arc::clone(&set_stop),
            );
            handles.push(handle);
            inboxes.push(inbox);
        }
        let handles: Arc<[ReactorHandle]> = handles.into();
        let mut set = Self {
            handles: Arc::clone(&handles),
            threads: Vec::new(),
            set_stop,
            drain_timeout: config.drain_timeout,
        };
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(handles.len());
        for (handle, inbox) in handles.iter().cloned().zip(inboxes) {
            let peers = Arc::clone(&handles);
            let config = config.clone();
            let ready = ready_tx.clone();
            let core = handle.core();
            let spawned = std::thread::Builder::new()
                .name(format!("reactor-{core}"))
                .spawn(move || {
                    let index = handle.index();
                    let started = (|| {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                            return Err(ReactorError::Pin { core });
                        }
                        handle
                            .shared
                            .tid
                            .store(current_tid(), std::sync::atomic::Ordering::Release);
                        Reactor::new(handle, peers, inbox, &config).map_err(|source| {
                            ReactorError::Setup {
                                core,
                                what: "io_uring",
                                source,
                            }
                        })
                    })();
                    let reactor = match started {
                        Ok(r) => {
                            let _ = ready.send(Ok(()));
                            Rc::new(r)
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            let _ = ready.send(Err(e));
                            return Err(ReactorError::Setup {
                                core,
                                what: "start",
                                source: io::Error::other(msg),
                            });
                        }
                    };
                    reactor.run().map_err(|source| ReactorError::Ring {
                        reactor: index,
                        source,
                    })
                });
            match spawned {
                Ok(thread) => set.threads.push(Some(thread)),
                Err(source) => {
                    return Err(ReactorError::Setup {
                        core,
                        what: "thread",
                        source,
                    });
                }
            }
        }
        drop(ready_tx);
        for _ in 0..handles.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e), // `set` drops: the others stop and join.
                Err(_) => return Err(ReactorError::Panicked { reactor: 0 }),
            }
        }
        Ok(set)
    }

    /// Handles of the reactors, by index.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// The handle of reactor `index`.
    pub fn handle(&self, index: usize) -> Option<&ReactorHandle> {
        self.handles.get(index)
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// True when the set has no reactors (never, for a started set).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Runs `f` on reactor `index` and waits for its result (for non-reactor threads).
    pub fn call<R: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let handle = self
            .handles
            .get(index)
            .ok_or(ReactorError::Stopped { reactor: index })?;
        handle.call(Duration::from_secs(30), f)
    }

    /// Stops every reactor: each runs its stop hooks, finishes (or, after the drain
    /// timeout, cancels) its in-flight operations and queued messages, and exits.
    /// Returns the first error any reactor reported.
    pub fn shutdown(mut self) -> Result<(), ReactorError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), ReactorError> {
        for handle in self.handles.iter() {
            handle.request_stop();
        }
        self.await_global_quiescence();
        self.set_stop.exit.store(true, Ordering::SeqCst);
        for handle in self.handles.iter() {
            handle.wake();
        }
        let mut first_error = None;
        for (index, thread) in self.threads.iter_mut().enumerate() {
            let Some(thread) = thread.take() else {
                continue;
            };
            let result = match thread.join() {
                Ok(result) => result,
                Err(_) => Err(ReactorError::Panicked { reactor: index }),
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl ReactorSet {
    /// Waits until every reactor is drained at one moment: all report quiescent with
    /// empty mailboxes and every message run to its end, twice in a row with the same
    /// message counts, and none went busy while we looked (the epoch did not move).
    /// Only then can no reactor receive a message from another one still working: a
    /// message hopping between reactors while we look changes a count between the two
    /// looks. Gives up after twice the drain timeout (reactors then cancel what is
    /// left) or when a reactor thread has already ended.
    fn await_global_quiescence(&self) {
        let give_up = Instant::now() + self.drain_timeout * 2;
        let look =
            || -> Option<Vec<u64>> { self.handles.iter().map(ReactorHandle::drained_at).collect() };
        while Instant::now() < give_up {
            let before = self.set_stop.epoch.load(Ordering::SeqCst);
            let first = look();
            let second = look();
            let after = self.set_stop.epoch.load(Ordering::SeqCst);
            if first.is_some() && first == second && before == after {
                return;
            }
            let ended = self
                .threads
                .iter()
                .any(|t| t.as_ref().is_none_or(JoinHandle::is_finished));
            if ended {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Drop for ReactorSet {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

fn new_eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
