//! `dirty`: a volume's change tracking made crash-consistent. Which chunks changed
//! since the last snapshot lives in memory (one bit each, set by every write); this
//! record keeps on disk a superset of it, so that after a crash or a power cut the next
//! snapshot reads and uploads what changed, not the whole volume.
//!
//! The rule: a write is acknowledged only once its chunks are on record. The first
//! write to a chunk since the record last dropped it waits for one group-committed
//! append (every request that arrives while a commit runs joins the next); later writes
//! find the chunk's bit in `durable` and pay nothing but a load.
//!
//! The record only grows between snapshots. Once a snapshot is catalogued, the chunks
//! not written since it began are dropped ([`DirtyRecord::compact`]): the base (the
//! snapshot the record is relative to) is written first, then the reduced set, so a
//! crash in between leaves a superset, never a subset.
//!
//! Files: `<path>` and `<path>.log` ([`crate::presence::PresenceFiles`]: a checkpoint
//! of bits and a log of chunk numbers, torn tails cut), and `<path>.base` (the base
//! snapshot: a flag, 16 bytes, CRC32C).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use reactor::ReactorHandle;

use crate::error::BdevError;
use crate::medium::Medium;
use crate::park::{deliver, park, unpark};
use crate::presence::PresenceFiles;

/// A request to the record's thread.
enum Note {
    /// Put these chunks on record, then release this token on this reactor.
    Need(Vec<u64>, ReactorHandle, u64),
    /// The record is now relative to `base`: keep only the chunks `dirty` says were
    /// written since it began (and any written meanwhile), then reply.
    Compact {
        base: Option<[u8; 16]>,
        dirty: Arc<[AtomicU64]>,
        reply: crossbeam_channel::Sender<Result<(), BdevError>>,
    },
}

/// A volume's durable change record, owned by its thread.
pub(crate) struct DirtyRecord {
    tx: crossbeam_channel::Sender<Note>,
    /// One bit per chunk: on record on disk.
    pub(crate) durable: Arc<[AtomicU64]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a record held when it was opened.
pub(crate) struct Opened {
    /// Chunks on record.
    pub(crate) bits: Vec<u64>,
    /// The snapshot they are relative to.
    pub(crate) base: Option<[u8; 16]>,
    /// Whether the record was there (or made now).
    pub(crate) existed: bool,
}

fn base_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".base");
    PathBuf::from(p)
}

/// The files of the record at `path`: checkpoint, log and base.
fn files(path: &Path) -> [PathBuf; 3] {
    [
        path.to_path_buf(),
        crate::presence::log_path(path),
        base_path(path),
    ]
}

/// Removes the change record at `path` (its volume is deleted, or it is made anew).
pub fn remove_dirty_record(path: &Path) {
    remove_files(&crate::medium::Local, path);
}

/// Removes the record's files from `medium` (best effort: a record without its base is
/// made anew whatever else is left of it).
fn remove_files(medium: &dyn Medium, path: &Path) {
    for f in files(path) {
        let _ = medium.remove(&f);
    }
}

fn damaged(path: &Path, reason: impl Into<String>) -> BdevError {
    BdevError::Presence {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn encode_base(base: Option<[u8; 16]>) -> Vec<u8> {
    let mut b = vec![u8::from(base.is_some())];
    b.extend_from_slice(&base.unwrap_or_default());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

fn decode_base(path: &Path, bytes: &[u8]) -> Result<Option<[u8; 16]>, BdevError> {
    if bytes.len() != 21 || crc32c::crc32c(&bytes[..17]).to_le_bytes() != bytes[17..] {
        return Err(damaged(path, "damaged base record"));
    }
    match bytes[0] {
        0 => Ok(None),
        1 => Ok(Some(
            bytes[1..17]
                .try_into()
                .map_err(|_| damaged(path, "short base"))?,
        )),
        _ => Err(damaged(path, "damaged base record")),
    }
}

/// The record's files and the steps that change them, in the order a crash relies on.
/// Owned by the record's thread (and run by the deterministic simulator, `crate::sim`).
pub(crate) struct RecordFiles {
    medium: Arc<dyn Medium>,
    files: PresenceFiles,
    base_path: PathBuf,
}

impl RecordFiles {
    /// Opens the record at `path` for a volume of `chunks` chunks, or makes one
    /// holding `initial` (relative to no snapshot) if there is none.
    pub(crate) fn open(
        medium: Arc<dyn Medium>,
        path: &Path,
        chunks: u64,
        initial: &[u64],
    ) -> Result<(Self, Opened), BdevError> {
        let bp = base_path(path);
        // The base is written last when a record is made: without it, whatever else
        // is there is a record never finished, and is made again.
        let existed = medium
            .exists(&bp)
            .map_err(|e| damaged(&bp, e.to_string()))?;
        if !existed {
            remove_files(&*medium, path);
        }
        let (mut files, mut bits) = PresenceFiles::open(Arc::clone(&medium), path, chunks)?;
        let base = if existed {
            let bytes = medium.read(&bp).map_err(|e| damaged(&bp, e.to_string()))?;
            decode_base(&bp, &bytes)?
        } else {
            files.checkpoint(initial)?;
            bits = initial.to_vec();
            crate::medium::replace_file(&*medium, &bp, &encode_base(None))
                .map_err(|e| damaged(&bp, e.to_string()))?;
            None
        };
        let opened = Opened {
            bits,
            base,
            existed,
        };
        Ok((
            Self {
                medium,
                files,
                base_path: bp,
            },
            opened,
        ))
    }

    /// Puts `batch` on record, one sync for all: appended, or in a checkpoint of
    /// `durable` (the words on record now) with it when the log has grown.
    pub(crate) fn commit(&mut self, durable: &[u64], batch: &[u64]) -> Result<(), BdevError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.files.wants_checkpoint() {
            let mut words = durable.to_vec();
            for &c in batch {
                words[(c / 64) as usize] |= 1 << (c % 64);
            }
            self.files.checkpoint(&words)
        } else {
            self.files.append(batch)
        }
    }

    /// Makes the record relative to `base` and holding `keep`: the base first, so a
    /// crash in between leaves the old set, a superset of what changed since `base`.
    pub(crate) fn compact(
        &mut self,
        base: Option<[u8; 16]>,
        keep: &[u64],
    ) -> Result<(), BdevError> {
        crate::medium::replace_file(&*self.medium, &self.base_path, &encode_base(base))
            .map_err(|e| damaged(&self.base_path, e.to_string()))?;
        self.files.checkpoint(keep)
    }
}

impl DirtyRecord {
    /// Opens the record at `path` for a volume of `chunks` chunks, or makes one
    /// holding `initial` (relative to no snapshot) if there is none.
    pub(crate) fn open(
        medium: Arc<dyn Medium>,
        path: &Path,
        chunks: u64,
        initial: &[u64],
    ) -> Result<(Self, Opened), BdevError> {
        let (files, opened) = RecordFiles::open(medium, path, chunks, initial)?;
        let durable: Arc<[AtomicU64]> = opened.bits.iter().map(|&w| AtomicU64::new(w)).collect();
        let (tx, rx) = crossbeam_channel::unbounded();
        let work = Work {
            rx,
            files,
            durable: Arc::clone(&durable),
        };
        let thread = std::thread::Builder::new()
            .name("volume-dirty".into())
            .spawn(move || work.run())
            .map_err(|e| damaged(path, format!("starting its thread: {e}")))?;
        Ok((
            Self {
                tx,
                durable,
                thread: Some(thread),
            },
            opened,
        ))
    }

    /// Whether `chunk` is on record.
    pub(crate) fn has(&self, chunk: u64) -> bool {
        self.durable
            .get((chunk / 64) as usize)
            // SeqCst: paired with the write's SeqCst setting of its dirty bit, against
            // compaction's clear-then-recheck (see `Work::compact`).
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (chunk % 64)) != 0)
    }

    /// Puts `chunks` on record, then runs `then` on this reactor (with the record's
    /// error if it could not be written).
    pub(crate) fn need(
        &self,
        chunks: Vec<u64>,
        reactor: &ReactorHandle,
        then: impl FnOnce(Result<(), BdevError>) + 'static,
    ) {
        let token = park(then);
        if self
            .tx
            .send(Note::Need(chunks, reactor.clone(), token))
            .is_err()
        {
            // On this reactor's next turn: the caller may be inside a submit.
            let e = BdevError::Presence {
                path: String::new(),
                reason: "the volume's change record has stopped".into(),
            };
            deliver(reactor.clone(), Box::new(move || unpark(token, Err(e))));
        }
    }

    /// Makes the record relative to snapshot `base`, keeping only what `dirty` (the
    /// chunks written since `base` began) holds. Call when nothing else can begin a
    /// snapshot of the volume, once `base` is catalogued.
    pub(crate) fn compact(
        &self,
        base: Option<[u8; 16]>,
        dirty: Arc<[AtomicU64]>,
    ) -> Result<(), BdevError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.tx
            .send(Note::Compact { base, dirty, reply })
            .map_err(|_| BdevError::Presence {
                path: String::new(),
                reason: "the volume's change record has stopped".into(),
            })?;
        rx.recv().unwrap_or_else(|_| {
            Err(BdevError::Presence {
                path: String::new(),
                reason: "the volume's change record has stopped".into(),
            })
        })
    }
}

impl Drop for DirtyRecord {
    fn drop(&mut self) {
        let (tx, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Everything the record's thread owns.
struct Work {
    rx: crossbeam_channel::Receiver<Note>,
    files: RecordFiles,
    durable: Arc<[AtomicU64]>,
}

impl Work {
    fn run(mut self) {
        while let Ok(first) = self.rx.recv() {
            let mut needs = Vec::new();
            let notes: Vec<Note> = std::iter::once(first)
                .chain(self.rx.try_iter().take(4096))
                .collect();
            for note in notes {
                match note {
                    Note::Need(chunks, reactor, token) => needs.push((chunks, reactor, token)),
                    Note::Compact { base, dirty, reply } => {
                        // Writes that asked before it are recorded first.
                        self.commit(std::mem::take(&mut needs));
                        let _ = reply.send(self.compact(base, &dirty));
                    }
                }
            }
            self.commit(needs);
        }
    }

    /// Appends what `needs` asks for (one fsync for all of them) and releases them.
    fn commit(&mut self, needs: Vec<(Vec<u64>, ReactorHandle, u64)>) {
        if needs.is_empty() {
            return;
        }
        let mut batch: Vec<u64> = needs
            .iter()
            .flat_map(|n| n.0.iter().copied())
            .filter(|&c| !self.has(c))
            .collect();
        batch.sort_unstable();
        batch.dedup();
        let words: Vec<u64> = self
            .durable
            .iter()
            .map(|w| w.load(Ordering::SeqCst))
            .collect();
        let result = self.files.commit(&words, &batch).map_err(|e| e.to_string());
        if result.is_ok() {
            for &c in &batch {
                self.durable[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::SeqCst);
            }
        }
        for (_, reactor, token) in needs {
            let r = result.clone().map_err(|reason| BdevError::Presence {
                path: String::new(),
                reason,
            });
            deliver(reactor, Box::new(move || unpark(token, r)));
        }
    }

    fn has(&self, chunk: u64) -> bool {
        self.durable[(chunk / 64) as usize].load(Ordering::SeqCst) & (1 << (chunk % 64)) != 0
    }

    /// Drops from the record every chunk not written since `base` began. A chunk's
    /// `durable` bit is cleared before its `dirty` bit is looked at again: a write
    /// sets `dirty` before it reads `durable` (both SeqCst), so either it sees the bit
    /// cleared and asks for a record (queued behind this), or this sees its `dirty` bit
    /// and keeps the chunk.
    fn compact(&mut self, base: Option<[u8; 16]>, dirty: &[AtomicU64]) -> Result<(), BdevError> {
        assert_eq!(dirty.len(), self.durable.len(), "one geometry");
        let mut keep = Vec::with_capacity(self.durable.len());
        for (d, w) in self.durable.iter().zip(dirty) {
            let written = w.load(Ordering::SeqCst);
            let before = d.fetch_and(written, Ordering::SeqCst);
            let late = w.load(Ordering::SeqCst) & before & !written;
            d.fetch_or(late, Ordering::SeqCst);
            keep.push(before & (written | late));
        }
        self.files.compact(base, &keep)
    }
}
