//! The bdev crate's error type: one variant per thing that can be wrong with a request
//! or a device, naming the offending value.

use std::io;
use std::path::PathBuf;

use crate::io::IoType;

/// Why a block device could not be opened or a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// The request reaches past the end of the device.
    #[error(
        "blocks {offset_blocks}..+{num_blocks} are out of range for a device of {device_blocks} blocks"
    )]
    OutOfRange {
        /// First block asked for.
        offset_blocks: u64,
        /// Number of blocks asked for.
        num_blocks: u64,
        /// Size of the device in blocks.
        device_blocks: u64,
    },
    /// A read or write of zero blocks.
    #[error("{0:?} of zero blocks")]
    ZeroLength(IoType),
    /// A byte offset or length that is not a multiple of the block size.
    #[error("byte range {offset}+{len} is not aligned to the {block_size}-byte block size")]
    Unaligned {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Device block size.
        block_size: u32,
    },
    /// The buffers do not add up to the request's length.
    #[error("buffers hold {actual} bytes but the request covers {expected}")]
    BufferSize {
        /// Bytes the request covers.
        expected: u64,
        /// Bytes the buffers hold.
        actual: u64,
    },
    /// A buffer segment whose length is not a multiple of the block size.
    #[error("buffer segment {index} is {len} bytes, not a multiple of the {block_size}-byte block")]
    SegmentSize {
        /// Position of the segment.
        index: usize,
        /// Its length.
        len: usize,
        /// Device block size.
        block_size: u32,
    },
    /// Buffers given with a request that carries no data.
    #[error("{0:?} carries no data but buffers were given")]
    UnexpectedBuffers(IoType),
    /// A request larger than one I/O may be.
    #[error("request of {bytes} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The device does not implement this kind of I/O.
    #[error("device {device} does not support {io_type:?}")]
    Unsupported {
        /// Device name.
        device: String,
        /// The kind of I/O.
        io_type: IoType,
    },
    /// A block size other than 512 or 4096.
    #[error("block size {0} is not supported (use 512 or 4096)")]
    BlockSize(u32),
    /// A device with no blocks.
    #[error("device {0} has no blocks")]
    Empty(String),
    /// Device sizes that do not fit.
    #[error("device {name}: {reason}")]
    Config {
        /// Device name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The backing file or device could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An existing backing file or device is not the size its device must have: cut
    /// short or grown behind the appliance's back. Served, it would read zeroes (or
    /// lose its tail); it is refused instead.
    #[error("{path} is {found} bytes, but the device it backs is {expected} bytes")]
    SizeMismatch {
        /// The path.
        path: PathBuf,
        /// Bytes it must have.
        expected: u64,
        /// Bytes it has.
        found: u64,
    },
    /// O_DIRECT was asked for but the file system does not allow it.
    #[error(
        "{path}: the file system does not support O_DIRECT; use buffered mode explicitly (direct = false)"
    )]
    DirectIoUnsupported {
        /// The path.
        path: PathBuf,
    },
    /// The kernel failed an operation.
    #[error("{io_type:?} failed: {}", io::Error::from_raw_os_error(*errno))]
    Io {
        /// The kind of I/O.
        io_type: IoType,
        /// The errno.
        errno: i32,
    },
    /// The backing file ended before the request did.
    #[error("{io_type:?} hit end of file at byte {offset}")]
    ShortTransfer {
        /// The kind of I/O.
        io_type: IoType,
        /// Byte offset where the transfer stopped.
        offset: u64,
    },
    /// The reactor is stopping and takes no new I/O.
    #[error("the reactor is shutting down")]
    ShuttingDown,
    /// I/O was submitted from a thread that is not a reactor.
    #[error("block I/O must be submitted on a reactor thread")]
    NotOnReactor,
    /// Data fetched for a clone failed its integrity check, or could not be fetched.
    /// Reads report it as a media error; never as data.
    #[error("chunk {chunk} of clone {name}: {reason}")]
    Basis {
        /// The clone.
        name: String,
        /// The chunk.
        chunk: u64,
        /// Why.
        reason: crate::clone::FetchError,
    },
    /// A clone's record of present chunks could not be read or written.
    #[error("presence record {path}: {reason}")]
    Presence {
        /// The checkpoint file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A volume's snapshot state refused or failed a request.
    #[error("snapshot of volume {name}: {reason}")]
    Snapshot {
        /// The volume.
        name: String,
        /// What happened.
        reason: String,
    },
    /// A volume's durable store of copy-before-write chunks could not be used.
    #[error("snapshot copy store {path}: {reason}")]
    Preserve {
        /// The store's file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A message to or from a reactor failed.
    #[error(transparent)]
    Reactor(#[from] reactor::ReactorError),
}
