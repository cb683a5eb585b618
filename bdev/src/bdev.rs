//! The block device interface: a [`Bdev`] shared by every core, and the per-core
//! [`Channel`] through which one reactor submits I/O to it.
//!
//! Like SPDK's bdev layer, the generic part lives here once: every request is checked
//! (range, sizes, supported type) and timed before a device sees it, and completions
//! are recorded in the channel's statistics. Devices implement [`BdevBackend`] and
//! [`BackendChannel`] and only ever see valid requests.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use reactor::Reactor;
use uuid::Uuid;

use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion, IoDone, IoType};
use crate::lifetime::Lifetime;
use crate::stats::{BdevStats, ChannelStats};

/// Largest single request, in bytes (io_uring results are 32-bit).
pub const MAX_IO_BYTES: u64 = 1 << 30;

/// What identifies a block device and its geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    /// Unique name, used in configuration and statistics.
    pub name: String,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Size in blocks.
    pub num_blocks: u64,
    /// Stable identity (exported as the namespace UUID/NGUID).
    pub uuid: Uuid,
}

impl BdevInfo {
    /// Checks the geometry: block size 512 or 4096, at least one block, size in bytes
    /// representable.
    pub fn validate(&self) -> Result<(), BdevError> {
        if !matches!(self.block_size, 512 | 4096) {
            return Err(BdevError::BlockSize(self.block_size));
        }
        if self.num_blocks == 0 {
            return Err(BdevError::Empty(self.name.clone()));
        }
        if self
            .num_blocks
            .checked_mul(u64::from(self.block_size))
            .is_none()
        {
            return Err(BdevError::Config {
                name: self.name.clone(),
                reason: "size in bytes overflows 64 bits".into(),
            });
        }
        Ok(())
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * u64::from(self.block_size)
    }
}

/// A device implementation: shared by all cores, it creates one channel per core.
pub trait BdevBackend: Send + Sync + 'static {
    /// Whether this device implements `io_type`.
    fn supports(&self, io_type: IoType) -> bool;

    /// Creates this reactor's channel. Called on the reactor, at most once per reactor
    /// while the channel is alive.
    fn create_channel(&self, info: &BdevInfo) -> Result<Box<dyn BackendChannel>, BdevError>;

    /// Blocks that hold data (allocated in the backing store), if the device can tell;
    /// `None` counts every block as allocated.
    fn allocated_blocks(&self, _info: &BdevInfo) -> Option<u64> {
        None
    }
}

/// A device's per-core context: submits validated requests on its reactor.
pub trait BackendChannel {
    /// Starts a request that has passed validation. `done` must be called exactly once,
    /// on this reactor, and never before `submit` returns (defer it if the work is
    /// synchronous), so a completion never re-enters its submitter.
    fn submit(&self, io: BdevIo, done: IoDone);
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    info: BdevInfo,
    backend: Box<dyn BdevBackend>,
    /// Every channel's statistics; also the lock under which `lifetime` is attached, so
    /// a channel is counted by it exactly once.
    channel_stats: Mutex<Vec<Arc<ChannelStats>>>,
    lifetime: OnceLock<Arc<Lifetime>>,
}

/// A block device, cheap to clone and to share between cores.
#[derive(Clone)]
pub struct Bdev {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl Bdev {
    /// Wraps a device implementation after checking its geometry.
    pub fn new(info: BdevInfo, backend: impl BdevBackend) -> Result<Self, BdevError> {
        info.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                info,
                backend: Box::new(backend),
                channel_stats: Mutex::new(Vec::new()),
                lifetime: OnceLock::new(),
            }),
        })
    }

    /// Name, geometry and identity.
    pub fn info(&self) -> &BdevInfo {
        &self.inner.info
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.inner.info.block_size
    }

    /// Size in blocks.
    pub fn num_blocks(&self) -> u64 {
        self.inner.info.num_blocks
    }

    /// Whether the device implements `io_type`.
    pub fn supports(&self, io_type: IoType) -> bool {
        self.inner.backend.supports(io_type)
    }

    /// Converts a byte range to blocks, rejecting ranges that are not block-aligned.
    pub fn blocks_of(&self, offset: u64, len: u64) -> Result<(u64, u64), BdevError> {
        let bs = u64::from(self.block_size());
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(BdevError::Unaligned {
                offset,
                len,
                block_size: self.block_size(),
            });
        }
        Ok((offset / bs, len / bs))
    }

    /// This reactor's channel to the device, created on first use and cached on the
    /// reactor. Hold on to it: submitting through it needs no lookup.
    pub fn channel(&self) -> Result<Rc<Channel>, BdevError> {
        let reactor = reactor::current().ok_or(BdevError::NotOnReactor)?;
        reactor.channel(self.inner.id, || {
            let backend = self.inner.backend.create_channel(&self.inner.info)?;
            let stats = Arc::new(ChannelStats::default());
            let mut all = self
                .inner
                .channel_stats
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            all.push(Arc::clone(&stats));
            if let Some(lifetime) = self.inner.lifetime.get() {
                lifetime.adopt(Arc::clone(&stats));
            }
            drop(all);
            // The request clock calibrates itself at its first reading: here, not in
            // a host's first request.
            let _ = quanta::Instant::now();
            Ok(Channel {
                bdev: self.clone(),
                backend,
                stats,
                reactor: Rc::clone(&reactor),
                submitting: std::cell::Cell::new(false),
            })
        })
    }

    /// Statistics summed over every channel the device has had.
    pub fn stats(&self) -> BdevStats {
        let channels = self
            .inner
            .channel_stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        BdevStats::sum(channels.iter().map(Arc::as_ref))
    }

    /// Counts this device's I/O from now on in `lifetime` (the totals of every opening
    /// of a device of this name); what it did before (a restore written through it
    /// before it was served) is not counted. A device has at most one: false if
    /// another was attached before (see [`Bdev::lifetime`]).
    pub fn keep_lifetime(&self, lifetime: &Arc<Lifetime>) -> bool {
        let all = self
            .inner
            .channel_stats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.inner.lifetime.set(Arc::clone(lifetime)).is_err() {
            return Arc::ptr_eq(self.inner.lifetime.get().unwrap_or(lifetime), lifetime);
        }
        for stats in all.iter() {
            lifetime.adopt(Arc::clone(stats));
        }
        true
    }

    /// The lifetime totals this device counts into, if attached.
    pub fn lifetime(&self) -> Option<Arc<Lifetime>> {
        self.inner.lifetime.get().cloned()
    }

    /// Blocks holding data: on a thin device (a sparse file, a clone, RAM allocated on
    /// first write) fewer than [`Bdev::num_blocks`]; never more.
    pub fn allocated_blocks(&self) -> u64 {
        let all = self.inner.info.num_blocks;
        self.inner
            .backend
            .allocated_blocks(&self.inner.info)
            .map_or(all, |n| n.min(all))
    }

    /// Checks a request against the device; the error names the offending field.
    pub fn validate(&self, io: &BdevIo) -> Result<(), BdevError> {
        let info = &self.inner.info;
        if !self.supports(io.io_type) {
            return Err(BdevError::Unsupported {
                device: info.name.clone(),
                io_type: io.io_type,
            });
        }
        let out_of_range = || BdevError::OutOfRange {
            offset_blocks: io.offset_blocks,
            num_blocks: io.num_blocks,
            device_blocks: info.num_blocks,
        };
        let end = io
            .offset_blocks
            .checked_add(io.num_blocks)
            .ok_or_else(out_of_range)?;
        if end > info.num_blocks {
            return Err(out_of_range());
        }
        if io.io_type == IoType::Flush {
            return Ok(());
        }
        if io.num_blocks == 0 {
            return Err(BdevError::ZeroLength(io.io_type));
        }
        if !io.io_type.has_data() {
            if !io.bufs.is_empty() {
                return Err(BdevError::UnexpectedBuffers(io.io_type));
            }
            return Ok(());
        }
        let expected = io.num_blocks.saturating_mul(u64::from(info.block_size));
        if expected > MAX_IO_BYTES {
            return Err(BdevError::TooLarge {
                bytes: expected,
                max: MAX_IO_BYTES,
            });
        }
        let actual = io.buf_len();
        if actual != expected {
            return Err(BdevError::BufferSize { expected, actual });
        }
        let bs = info.block_size as usize;
        if let Some((index, buf)) = io.bufs.iter().enumerate().find(|(_, b)| b.len() % bs != 0) {
            return Err(BdevError::SegmentSize {
                index,
                len: buf.len(),
                block_size: info.block_size,
            });
        }
        Ok(())
    }
}

/// One reactor's path to one device. Not `Send`: it lives and dies on its reactor.
pub struct Channel {
    bdev: Bdev,
    backend: Box<dyn BackendChannel>,
    stats: Arc<ChannelStats>,
    reactor: Rc<Reactor>,
    /// Inside `backend.submit`: a completion now would break the rule that `done`
    /// never runs before `submit` returns (checked in debug builds).
    submitting: std::cell::Cell<bool>,
}

impl Channel {
    /// The device this channel leads to.
    pub fn bdev(&self) -> &Bdev {
        &self.bdev
    }

    /// Submits a request; `done` runs on this reactor once it has completed or failed.
    /// Invalid requests fail with a typed error and never reach the device; so does
    /// everything submitted once the reactor has begun to stop.
    pub fn submit(self: &Rc<Self>, io: BdevIo, done: impl FnOnce(IoCompletion) + 'static) {
        let checked = if self.reactor.is_stopping() {
            Err(BdevError::ShuttingDown)
        } else {
            self.bdev.validate(&io)
        };
        if let Err(error) = checked {
            self.stats.record_error();
            let bufs = io.bufs;
            self.reactor
                .defer(move || done(IoCompletion::err(bufs, error)));
            return;
        }
        let io_type = io.io_type;
        let bytes = io.num_blocks * u64::from(self.bdev.block_size());
        // The TSC (through quanta), not clock_gettime: a request's latency is taken
        // twice per request, and the vDSO call cost ~5 % of a target core at 1 M IOPS.
        let start = quanta::Instant::now();
        let this = Rc::clone(self);
        let was = self.submitting.replace(true);
        self.backend.submit(
            io,
            IoDone::new(move |completion: IoCompletion| {
                debug_assert!(
                    !this.submitting.get(),
                    "{}: a request completed inside its own submit",
                    this.bdev.name()
                );
                this.stats
                    .record(io_type, bytes, start.elapsed(), completion.result.is_ok());
                done(completion);
            }),
        );
        self.submitting.set(was);
    }

    /// Passes down a request that a device stacked on this one (a volume, a clone) has
    /// validated and counted already, for the same blocks: it is not validated or
    /// counted again here, so a stacked device costs its own logic and nothing more.
    /// Requests the stacked device makes up itself go through [`Channel::submit`].
    pub(crate) fn pass(&self, io: BdevIo, done: IoDone) {
        if self.reactor.is_stopping() {
            let bufs = io.bufs;
            return self
                .reactor
                .defer(move || done.complete(IoCompletion::err(bufs, BdevError::ShuttingDown)));
        }
        debug_assert!(self.bdev.validate(&io).is_ok(), "passed an invalid request");
        self.backend.submit(io, done);
    }
}
