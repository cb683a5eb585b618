//! Reading the chunks a snapshot stores ahead of the encoder.

use bdev::{Claim, VolumeHandle};
use reactor::ReactorHandle;

use crate::error::OxError;

use super::attempt::Attempt;

/// Changed chunks read ahead of the encoder, so reading the next chunks from the device
/// overlaps encoding and uploading this one.
#[derive(Default)]
pub(super) struct ReadAhead {
    queue: std::collections::VecDeque<(u64, Ahead)>,
    /// The next chunk to consider.
    scan: u64,
}

/// A chunk read ahead: preserved contents, or a read in flight (of the device, which
/// holds the chunk from writes until done, or of a durable copy).
pub(super) enum Ahead {
    Ready(Vec<u8>),
    Reading(crate::blockio::Pending),
}

/// Device reads a snapshot keeps in flight ahead of the encoder.
const READ_AHEAD: usize = 8;

/// Starts reading what the snapshot stores for `chunk` (waiting while a write copies
/// it).
pub(super) async fn start_chunk(
    chunk: u64,
    attempt: &mut Attempt<'_>,
    handle: &VolumeHandle,
    read: &impl Fn(u64) -> Result<crate::blockio::Pending, OxError>,
    on: &ReactorHandle,
) -> Result<Ahead, OxError> {
    attempt.claimed(chunk);
    let claim = handle
        .claim_chunk(chunk)
        .await
        .map_err(|e| match handle.snapshot_abandoned() {
            Some(why) => OxError::Config(format!("the snapshot was abandoned: {why}")),
            None => OxError::Config(e.to_string()),
        })?;
    Ok(match claim {
        Claim::Copy(data) => Ahead::Ready(data),
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

impl ReadAhead {
    /// Claims and starts reading changed chunks from `at` on, up to the window.
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
        while self.queue.len() < READ_AHEAD && self.scan < chunks.min(at + 4 * READ_AHEAD as u64) {
            let c = self.scan;
            if changed.contains(c) {
                let item = start_chunk(c, attempt, handle, read, on).await?;
                self.queue.push_back((c, item));
            }
            self.scan += 1;
        }
        Ok(())
    }

    /// The read-ahead of `chunk`, if it was started.
    pub(super) fn take(&mut self, chunk: u64) -> Option<Ahead> {
        match self.queue.front() {
            Some((c, _)) if *c == chunk => self.queue.pop_front().map(|(_, a)| a),
            _ => None,
        }
    }
}
