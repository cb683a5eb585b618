//! Reading the chunks a snapshot stores ahead of the encoder.

use bdev::{BdevError, Claim, PendingClaim, VolumeHandle};
use reactor::ReactorHandle;

use crate::error::OxError;

use super::attempt::Attempt;

/// Changed chunks claimed and read ahead of the encoder, so the device's reads overlap
/// encoding and uploading this chunk. Claims go to the volume's owner reactor in
/// batches, once half the window has been used, and all their answers are awaited
/// together: the encoder pays one round trip to the owner per batch, not per chunk.
pub(super) struct ReadAhead {
    queue: std::collections::VecDeque<(u64, Ahead)>,
    /// The next chunk to consider.
    scan: u64,
    /// Chunks claimed and read ahead at most.
    window: usize,
}

/// A chunk read ahead: preserved contents, or a read in flight (of the device, which
/// holds the chunk from writes until done, or of a durable copy).
pub(super) enum Ahead {
    Ready(crate::blockio::Bytes),
    Reading(crate::blockio::Pending),
}

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
    read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
    on: &ReactorHandle,
) -> Result<Ahead, OxError> {
    let claim = claim.finish().await.map_err(|e| claim_failed(handle, e))?;
    Ok(match claim {
        Claim::Copy(data) => Ahead::Ready(crate::blockio::Bytes::Kept(data)),
        Claim::Saved {
            dev,
            offset_blocks,
            num_blocks,
        } => Ahead::Reading(crate::blockio::start_read(
            on,
            &dev,
            offset_blocks,
            num_blocks,
            || {},
        )?),
        Claim::Device => match read(chunk) {
            Ok(p) => Ahead::Reading(p),
            Err(e) => {
                handle.chunk_read(chunk);
                return Err(e);
            }
        },
    })
}

/// Claims `chunk` and starts reading it (a chunk the read-ahead did not start).
pub(super) async fn start_chunk(
    chunk: u64,
    attempt: &mut Attempt<'_>,
    handle: &VolumeHandle,
    read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
    on: &ReactorHandle,
) -> Result<Ahead, OxError> {
    attempt.claimed(chunk);
    let claim = handle
        .send_claim(chunk)
        .map_err(|e| claim_failed(handle, e))?;
    start_read(chunk, claim, handle, read, on).await
}

impl ReadAhead {
    /// A read-ahead for chunks of `chunk_bytes`.
    pub(super) fn new(chunk_bytes: u64) -> Self {
        let window = usize::try_from(BYTES_AHEAD / chunk_bytes.max(1))
            .unwrap_or(MOST_AHEAD)
            .clamp(LEAST_AHEAD, MOST_AHEAD);
        Self {
            queue: std::collections::VecDeque::with_capacity(window),
            scan: 0,
            window,
        }
    }

    /// Once half the window is used, claims changed chunks from `at` on up to the
    /// window and starts reading each. When this returns, no chunk is claimed without
    /// its read in flight (a claimed chunk holds hosts' writes to it until its read is
    /// done, and an encoder waiting on an upload must not hold them up); on an error,
    /// every claim sent is still seen through to its read, which releases the chunk.
    /// Each read starts as its claim's answer comes: a claim whose answer waits on a
    /// host write's copy holds no other chunk of the batch without its read.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn fill(
        &mut self,
        at: u64,
        chunks: u64,
        changed: &bdev::ChangedChunks,
        attempt: &mut Attempt<'_>,
        handle: &VolumeHandle,
        read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
        on: &ReactorHandle,
    ) -> Result<(), OxError> {
        self.scan = self.scan.max(at);
        if self.queue.len() > self.window / 2 {
            return Ok(());
        }
        let mut claims = Vec::with_capacity(self.window);
        let mut failed = None;
        let end = chunks.min(at + 4 * self.window as u64);
        while self.queue.len() + claims.len() < self.window && self.scan < end {
            let c = self.scan;
            if changed.contains(c) {
                attempt.claimed(c);
                match handle.send_claim(c) {
                    Ok(claim) => claims.push((c, claim)),
                    Err(e) => {
                        failed = Some(claim_failed(handle, e));
                        break;
                    }
                }
            }
            self.scan += 1;
        }
        // Each read starts as soon as its own answer comes, whatever the order: a claim
        // waiting on a host write's copy holds no other chunk's read back.
        let mut reads: Vec<_> = claims
            .into_iter()
            .map(|(c, claim)| (c, Box::pin(start_read(c, claim, handle, read, on))))
            .collect();
        let mut started: Vec<Option<Result<Ahead, OxError>>> = reads.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut waiting = false;
            for ((_, r), done) in reads.iter_mut().zip(started.iter_mut()) {
                if done.is_none() {
                    match r.as_mut().poll(cx) {
                        std::task::Poll::Ready(result) => *done = Some(result),
                        std::task::Poll::Pending => waiting = true,
                    }
                }
            }
            if waiting {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        for ((c, _), result) in reads.into_iter().zip(started) {
            let Some(result) = result else {
                unreachable!("every read was seen through above")
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

    /// The read-ahead of `chunk`, if it was started.
    pub(super) fn take(&mut self, chunk: u64) -> Option<Ahead> {
        match self.queue.front() {
            Some((c, _)) if *c == chunk => self.queue.pop_front().map(|(_, a)| a),
            _ => None,
        }
    }
}
