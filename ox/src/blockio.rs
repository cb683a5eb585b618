//! Block I/O from OX cores: a request travels to a reactor as a message and its
//! completion comes back on an async channel, so an OX core awaits it without blocking
//! its executor.

use bdev::{Bdev, BdevIo, IoBuf};
use reactor::ReactorHandle;

use crate::error::OxError;

/// Runs `io` on `bdev` through reactor `on`; returns the data it read (empty for
/// requests that read nothing).
pub async fn run(on: &ReactorHandle, bdev: &Bdev, io: BdevIo) -> Result<Vec<u8>, OxError> {
    let (tx, rx) = async_channel::bounded(1);
    let dev = bdev.clone();
    on.send(move || match dev.channel() {
        Ok(ch) => ch.submit(io, move |c| {
            let data = c.data();
            let _ = tx.try_send(c.result.map(|()| data).map_err(|e| e.to_string()));
        }),
        Err(e) => {
            let _ = tx.try_send(Err(e.to_string()));
        }
    })
    .map_err(|e| OxError::Config(format!("reactor: {e}")))?;
    rx.recv()
        .await
        .map_err(|_| OxError::Config("the reactor dropped a block request".into()))?
        .map_err(|e| OxError::Io {
            path: bdev.name().to_string(),
            source: std::io::Error::other(e),
        })
}

/// Reads `blocks` blocks at `lba`.
pub async fn read(
    on: &ReactorHandle,
    bdev: &Bdev,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, OxError> {
    let len = (blocks * u64::from(bdev.block_size())) as usize;
    run(on, bdev, BdevIo::read(lba, blocks, vec![IoBuf::new(len)])).await
}
