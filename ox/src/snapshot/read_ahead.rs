//! Reading the chunks a snapshot stores ahead of the encoder.

use bdev::{BdevError, Claim, PendingClaim, VolumeHandle};
use reactor::ReactorHandle;

use crate::error::OxError;

use super::attempt::Attempt;
use super::spares::Spares;

/// Changed chunks claimed and read ahead of the encoder, so the device's reads overlap
/// encoding and uploading this chunk. Claims go to the volume's owner reactor in
/// batches, once half the window has been used, and all their answers are awaited
/// together: the encoder pays one round trip to the owner per batch, not per chunk.
/// Adjacent chunks to be read from the device whose answers come together are read by
/// one request, each into a buffer of its own: one message to the reactor and one
/// completion for up to [`RUN_BYTES`] of chunks (the request releases them all to
/// writers when it completes).
pub(super) struct ReadAhead {
    queue: std::collections::VecDeque<(u64, Queued)>,
    /// The next chunk to consider.
    scan: u64,
    /// Chunks claimed and read ahead at most.
    window: usize,
    /// Chunks one device request reads at most.
    most_in_run: usize,
    /// Buffers for reads of copies saved before writes.
    spares: Spares,
}

/// A chunk read ahead: preserved contents, or a read in flight (of the device, which
/// holds the chunk from writes until done, or of a durable copy).
pub(super) enum Ahead {
    Ready(crate::blockio::Bytes),
    Reading(crate::blockio::Pending),
}

/// A chunk in the read-ahead's queue.
enum Queued {
    /// Read or being read on its own, or its buffer from its run's read.
    One(Ahead),
    /// The first of `chunks` adjacent chunks read by one request, a buffer each.
    Run {
        read: crate::blockio::Pending,
        chunks: usize,
    },
    /// A later chunk of the run before it in the queue.
    InRun,
}

/// Bytes of adjacent chunks one device request reads at most (16 of 64 KiB): a host
/// write to the first of them waits for the whole request.
const RUN_BYTES: u64 = 1 << 20;

/// Reads `n` adjacent chunks from the first given, each into a buffer of its own, and
/// releases them all to writers when the request completes.
pub(super) trait ReadChunks:
    Fn(u64, usize) -> Result<crate::blockio::Pending, OxError>
{
}
impl<F: Fn(u64, usize) -> Result<crate::blockio::Pending, OxError>> ReadChunks for F {}

/// Bytes of chunks a snapshot keeps claimed and read ahead of the encoder (at least
/// [`LEAST_AHEAD`] chunks, at most [`MOST_AHEAD`]).
const BYTES_AHEAD: u64 = 2 << 20;
const LEAST_AHEAD: usize = 8;
const MOST_AHEAD: usize = 32;

fn claim_failed(handle: &VolumeHandle, e: BdevError) -> OxError {
    match handle.snapshot_abandoned() {
        Some(why) => OxError::Config(format!("the snapshot was abandoned: {why}")),
        None => OxError::Config(e.to_string()),
    }
}

/// Starts reading what the owner's answer to the claim of `chunk` says to read
/// (waiting for the answer, which waits while a write copies the chunk).
async fn start_read(
    chunk: u64,
    claim: PendingClaim,
    handle: &VolumeHandle,
    read: &impl ReadChunks,
    on: &ReactorHandle,
    spares: &Spares,
) -> Result<Ahead, OxError> {
    let claim = claim.finish().await.map_err(|e| claim_failed(handle, e))?;
    match claim {
        Claim::Device => match read(chunk, 1) {
            Ok(p) => Ok(Ahead::Reading(p)),
            Err(e) => {
                handle.chunk_read(chunk);
                Err(e)
            }
        },
        other => kept_or_saved(other, on, spares),
    }
}

/// What to read for a chunk the device does not hold for the snapshot: its contents
/// kept before a write, or where they were saved (read into a spare buffer).
fn kept_or_saved(claim: Claim, on: &ReactorHandle, spares: &Spares) -> Result<Ahead, OxError> {
    Ok(match claim {
        Claim::Copy(data) => Ahead::Ready(crate::blockio::Bytes::Kept(data)),
        Claim::Saved {
            dev,
            offset_blocks,
            num_blocks,
        } => {
            let len = num_blocks * u64::from(dev.block_size());
            let buf = vec![spares.take(len as usize)];
            Ahead::Reading(crate::blockio::start_read_into(
                on,
                &dev,
                offset_blocks,
                buf,
                || {},
            )?)
        }
        Claim::Device => unreachable!("a device read is started by its run"),
    })
}

/// Claims `chunk` and starts reading it (a chunk the read-ahead did not start).
pub(super) async fn start_chunk(
    chunk: u64,
    attempt: &mut Attempt<'_>,
    handle: &VolumeHandle,
    read: &impl ReadChunks,
    on: &ReactorHandle,
    spares: &Spares,
) -> Result<Ahead, OxError> {
    attempt.claimed(chunk);
    let claim = handle
        .send_claim(chunk)
        .map_err(|e| claim_failed(handle, e))?;
    start_read(chunk, claim, handle, read, on, spares).await
}

impl ReadAhead {
    /// Chunks of `chunk_bytes` claimed and read ahead at most.
    pub(super) fn window(chunk_bytes: u64) -> usize {
        usize::try_from(BYTES_AHEAD / chunk_bytes.max(1))
            .unwrap_or(MOST_AHEAD)
            .clamp(LEAST_AHEAD, MOST_AHEAD)
    }

    /// A read-ahead for chunks of `chunk_bytes`, reading saved copies into `spares`.
    pub(super) fn new(chunk_bytes: u64, spares: Spares) -> Self {
        let window = Self::window(chunk_bytes);
        Self {
            spares,
            queue: std::collections::VecDeque::with_capacity(window),
            scan: 0,
            window,
            most_in_run: usize::try_from(RUN_BYTES / chunk_bytes.max(1))
                .unwrap_or(1)
                .max(1),
        }
    }

    /// Once half the window is used, claims changed chunks from `at` on up to the
    /// window and starts reading each. When this returns, no chunk is claimed without
    /// its read in flight (a claimed chunk holds hosts' writes to it until its read is
    /// done, and an encoder waiting on an upload must not hold them up); on an error,
    /// every claim sent is still seen through to its read, which releases the chunk.
    /// Reads start as their claims' answers come: adjacent chunks answered together go
    /// in one request, and a claim whose answer waits on a host write's copy holds no
    /// other chunk of the batch without its read.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fill(
        &mut self,
        at: u64,
        chunks: u64,
        changed: &bdev::ChangedChunks,
        attempt: &mut Attempt<'_>,
        handle: &VolumeHandle,
        read: &impl ReadChunks,
        on: &ReactorHandle,
    ) -> Result<(), OxError> {
        self.scan = self.scan.max(at);
        if self.queue.len() > self.window / 2 {
            return Ok(());
        }
        let mut wanted = Vec::with_capacity(self.window);
        let end = chunks.min(at + 4 * self.window as u64);
        while self.queue.len() + wanted.len() < self.window && self.scan < end {
            let c = self.scan;
            if changed.contains(c) {
                attempt.claimed(c);
                wanted.push(c);
            }
            self.scan += 1;
        }
        if wanted.is_empty() {
            return Ok(());
        }
        // One message for the batch's claims: the owner's reactor is woken once.
        let (claims, mut failed) = match handle.send_claims(&wanted) {
            Ok(claims) => (claims, None),
            Err(e) => (Vec::new(), Some(claim_failed(handle, e))),
        };
        let mut answers: Vec<_> = wanted
            .into_iter()
            .zip(claims)
            .map(|(c, claim)| (c, Box::pin(claim.finish())))
            .collect();
        // Each claim's outcome, in chunk order; `None` while its answer is awaited.
        let mut started: Vec<Option<Result<Queued, OxError>>> =
            answers.iter().map(|_| None).collect();
        // Adjacent chunks answered "read the device" and not yet read: where the first
        // is in `answers`, and how many.
        let mut run: Option<(usize, usize)> = None;
        let start_run = |run: &mut Option<(usize, usize)>,
                         started: &mut Vec<Option<Result<Queued, OxError>>>,
                         answers: &[(u64, _)]| {
            let Some((first, n)) = run.take() else {
                return;
            };
            let chunk = answers[first].0;
            started[first] = Some(match read(chunk, n) {
                Ok(p) if n == 1 => Ok(Queued::One(Ahead::Reading(p))),
                Ok(p) => Ok(Queued::Run { read: p, chunks: n }),
                Err(e) => {
                    for c in chunk..chunk + n as u64 {
                        handle.chunk_read(c);
                    }
                    Err(e)
                }
            });
        };
        std::future::poll_fn(|cx| {
            let mut waiting = false;
            for i in 0..answers.len() {
                if started[i].is_some() {
                    continue;
                }
                let std::task::Poll::Ready(answer) = answers[i].1.as_mut().poll(cx) else {
                    // A gap: what was answered before it is read now.
                    start_run(&mut run, &mut started, &answers);
                    waiting = true;
                    continue;
                };
                match answer {
                    Ok(Claim::Device) => {
                        match run {
                            Some((first, n))
                                if first + n == i
                                    && answers[first].0 + n as u64 == answers[i].0
                                    && n < self.most_in_run =>
                            {
                                run = Some((first, n + 1));
                            }
                            _ => {
                                start_run(&mut run, &mut started, &answers);
                                run = Some((i, 1));
                            }
                        }
                        // Its place is taken; the run's first says how it is read.
                        started[i] = Some(Ok(Queued::InRun));
                    }
                    Ok(other) => {
                        start_run(&mut run, &mut started, &answers);
                        started[i] = Some(kept_or_saved(other, on, &self.spares).map(Queued::One));
                    }
                    Err(e) => {
                        start_run(&mut run, &mut started, &answers);
                        started[i] = Some(Err(claim_failed(handle, e)));
                    }
                }
            }
            // Nothing answered waits for what is still to come.
            start_run(&mut run, &mut started, &answers);
            if waiting {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        for ((c, _), result) in answers.into_iter().zip(started) {
            let Some(result) = result else {
                unreachable!("every claim was seen through above")
            };
            match result {
                Ok(item) if failed.is_none() => self.queue.push_back((c, item)),
                // Its read (if any) releases the chunk when done; nobody waits for it.
                Ok(_) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The read-ahead of `chunk`, if it was started. The first chunk of a run waits for
    /// the run's read and leaves the others' buffers in their places.
    pub(super) async fn take(&mut self, chunk: u64) -> Result<Option<Ahead>, OxError> {
        if self.queue.front().is_none_or(|(c, _)| *c != chunk) {
            return Ok(None);
        }
        let Some((_, queued)) = self.queue.pop_front() else {
            unreachable!("a first chunk, seen above")
        };
        let (read, n) = match queued {
            Queued::One(ahead) => return Ok(Some(ahead)),
            Queued::Run { read, chunks } => (read, chunks),
            Queued::InRun => unreachable!("chunk {chunk} of a run taken before its first"),
        };
        let mut bufs = match read.buffers().await {
            Ok(bufs) => bufs.into_iter(),
            Err(e) => {
                // The run's other chunks go with it: nothing is left to take.
                for _ in 1..n {
                    self.queue.pop_front();
                }
                return Err(e);
            }
        };
        assert_eq!(bufs.len(), n, "a buffer for each chunk of the run");
        let Some(first) = bufs.next() else {
            unreachable!("a run of {n} chunks")
        };
        for ((c, slot), buf) in self.queue.iter_mut().zip(bufs) {
            assert!(matches!(slot, Queued::InRun), "chunk {c} follows its run");
            *slot = Queued::One(Ahead::Ready(crate::blockio::Bytes::Read(buf)));
        }
        Ok(Some(Ahead::Ready(crate::blockio::Bytes::Read(first))))
    }
}
