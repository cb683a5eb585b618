//! `null`: a device that discards writes and reads zeroes, for benchmarking the layers
//! above it without any media cost.

use uuid::Uuid;

use crate::bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo};
use crate::completions::ReadyQueue;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};

struct Null;

impl BdevBackend for Null {
    fn supports(&self, _io_type: IoType) -> bool {
        true
    }

    fn create_channel(&self, _info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        Ok(Box::new(NullChannel {
            ready: ReadyQueue::new(reactor),
        }))
    }

    /// Nothing is kept: every block reads as zeroes.
    fn allocated_blocks(&self, _info: &BdevInfo) -> Option<u64> {
        Some(0)
    }
}

struct NullChannel {
    ready: ReadyQueue,
}

impl BackendChannel for NullChannel {
    fn submit(&self, mut io: BdevIo, done: IoDone) {
        if io.io_type == IoType::Read {
            for buf in &mut io.bufs {
                buf.fill(0);
            }
        }
        self.ready.complete(done, IoCompletion::ok(io.bufs));
    }
}

/// Creates a null device of `num_blocks` blocks of `block_size` bytes.
pub fn create_null(
    name: &str,
    block_size: u32,
    num_blocks: u64,
    uuid: Option<Uuid>,
) -> Result<Bdev, BdevError> {
    let info = BdevInfo {
        name: name.to_string(),
        block_size,
        num_blocks,
        uuid: uuid.unwrap_or_else(Uuid::new_v4),
    };
    Bdev::new(info, Null)
}
