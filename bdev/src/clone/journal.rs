//! A clone's presence journal: the thread that keeps on disk which chunks are present,
//! by group commit, so that chunks present before a restart or a crash stay present and
//! a host write over a chunk is acknowledged only once the chunk is on record.
//!
//! It owns the record's state: the files and the `durable` bitmap (one bit per chunk on
//! record), which only this thread writes and the clone's channels read. What is
//! present is the owner core's (`core.rs`), published in `presence`, which this thread
//! reads for checkpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use reactor::ReactorHandle;

use super::{bit, publish};
use crate::bdev::Bdev;
use crate::error::BdevError;
use crate::io::{BdevIo, IoType};
use crate::park::{deliver, unpark};
use crate::presence::PresenceFiles;

/// A request to a clone's presence journal.
pub(super) enum Note {
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
pub(super) struct Journal {
    pub(super) tx: crossbeam_channel::Sender<Note>,
    /// One bit per chunk: recorded present on disk.
    pub(super) durable: Arc<[AtomicU64]>,
    pub(super) path: String,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
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
pub(super) struct JournalWork {
    pub(super) rx: crossbeam_channel::Receiver<Note>,
    pub(super) files: PresenceFiles,
    pub(super) presence: Arc<[AtomicU64]>,
    pub(super) durable: Arc<[AtomicU64]>,
    pub(super) local: Bdev,
    pub(super) flush_on: ReactorHandle,
}

impl JournalWork {
    /// Flushes the local copy through its reactor, waiting for room in a full mailbox
    /// (a busy reactor is no reason to fail the writes waiting on this commit).
    fn flush_local(&self) -> Result<(), BdevError> {
        crate::blocking::run_on(
            &self.flush_on,
            &self.local,
            BdevIo::flush(),
            std::time::Duration::from_secs(60),
        )?
        .result
    }

    pub(super) fn run(mut self) {
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
                publish(d, *w);
            }
        } else {
            self.files.append(batch)?;
            for &c in batch {
                if let Some(d) = self.durable.get((c / 64) as usize) {
                    publish(d, 1 << (c % 64));
                }
            }
        }
        Ok(())
    }
}
