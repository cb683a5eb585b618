//! Block I/O from OX cores: a request travels to a reactor as a message and its
//! completion comes back on an async channel, so an OX core awaits it without blocking
//! its executor. The buffers read come back as they are: any copy is the OX core's,
//! not the reactor's.

use bdev::{Bdev, BdevIo, IoBuf};
use reactor::ReactorHandle;

use crate::error::OxError;

/// A request sent to a reactor whose completion is still to be awaited.
pub struct Pending {
    rx: async_channel::Receiver<Result<Vec<IoBuf>, String>>,
    name: String,
}

/// Bytes read, or kept: the buffer a read filled (no copy), or bytes already in a
/// `Vec`.
pub enum Bytes {
    /// The buffer a read filled.
    Read(IoBuf),
    /// Bytes kept elsewhere (a copy taken before a write, or several buffers joined).
    Kept(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Read(b) => b,
            Self::Kept(v) => v,
        }
    }
}

/// Sends `io` on `bdev` to reactor `on` without waiting for it.
pub fn start(on: &ReactorHandle, bdev: &Bdev, io: BdevIo) -> Result<Pending, OxError> {
    start_then(on, bdev, io, || {})
}

/// [`start`], running `then` on the reactor as soon as the request completes (before
/// anyone awaits it).
pub fn start_then(
    on: &ReactorHandle,
    bdev: &Bdev,
    io: BdevIo,
    then: impl FnOnce() + Send + 'static,
) -> Result<Pending, OxError> {
    let (tx, rx) = async_channel::bounded(1);
    let dev = bdev.clone();
    on.send(move || match dev.channel() {
        Ok(ch) => ch.submit(io, move |c| {
            then();
            let _ = tx.try_send(c.result.map(|()| c.bufs).map_err(|e| e.to_string()));
        }),
        Err(e) => {
            then();
            let _ = tx.try_send(Err(e.to_string()));
        }
    })
    .map_err(|e| OxError::Config(format!("reactor: {e}")))?;
    Ok(Pending {
        rx,
        name: bdev.name().to_string(),
    })
}

impl Pending {
    /// Waits for the request; returns the data it read (empty for requests that read
    /// nothing), in one `Vec`.
    pub async fn finish(self) -> Result<Vec<u8>, OxError> {
        let bufs = self.buffers().await?;
        let mut data = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in &bufs {
            data.extend_from_slice(b);
        }
        Ok(data)
    }

    /// Waits for the request; returns what it read, in the buffer it read into when
    /// there was one (as [`start_read`] asks), else in one `Vec`.
    pub async fn finish_bytes(self) -> Result<Bytes, OxError> {
        let mut bufs = self.buffers().await?;
        if bufs.len() == 1
            && let Some(buf) = bufs.pop()
        {
            return Ok(Bytes::Read(buf));
        }
        let mut data = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in &bufs {
            data.extend_from_slice(b);
        }
        Ok(Bytes::Kept(data))
    }

    /// Waits for the request; returns the buffers it read into, as they are.
    pub async fn buffers(self) -> Result<Vec<IoBuf>, OxError> {
        self.rx
            .recv()
            .await
            .map_err(|_| OxError::Config("the reactor dropped a block request".into()))?
            .map_err(|e| OxError::Io {
                path: self.name,
                source: std::io::Error::other(e),
            })
    }
}

/// Runs `io` on `bdev` through reactor `on`, for what it does, not what it reads
/// (writes, flushes): its buffers are dropped unread.
pub async fn run(on: &ReactorHandle, bdev: &Bdev, io: BdevIo) -> Result<(), OxError> {
    start(on, bdev, io)?.buffers().await.map(drop)
}

/// Reads `blocks` blocks at `lba`.
pub async fn read(
    on: &ReactorHandle,
    bdev: &Bdev,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, OxError> {
    start_read(on, bdev, lba, blocks, || {})?.finish().await
}

/// Starts reading `blocks` blocks at `lba`; `then` runs on the reactor when done. The
/// read is the appliance's own ([`BdevIo::internal`]): a clone under the volume does not
/// read ahead of it where it holds the chunks.
pub fn start_read(
    on: &ReactorHandle,
    bdev: &Bdev,
    lba: u64,
    blocks: u64,
    then: impl FnOnce() + Send + 'static,
) -> Result<Pending, OxError> {
    let len = (blocks * u64::from(bdev.block_size())) as usize;
    start_read_into(on, bdev, lba, vec![IoBuf::new(len)], then)
}

/// [`start_read`] of the blocks at `lba` that fill `bufs`, one after another: one
/// request for several pieces, each of which comes back in its own buffer. Each
/// buffer's length must be a whole number of blocks.
pub fn start_read_into(
    on: &ReactorHandle,
    bdev: &Bdev,
    lba: u64,
    bufs: Vec<IoBuf>,
    then: impl FnOnce() + Send + 'static,
) -> Result<Pending, OxError> {
    let block = u64::from(bdev.block_size()).max(1);
    let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    debug_assert!(
        bufs.iter().all(|b| (b.len() as u64).is_multiple_of(block)),
        "buffers of whole blocks"
    );
    start_then(
        on,
        bdev,
        BdevIo::read(lba, bytes / block, bufs).internal(),
        then,
    )
}
