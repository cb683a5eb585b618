//! A device's lifetime I/O totals: what earlier processes and earlier openings of the
//! same device counted, plus what every channel of every opening in this process has
//! counted since. NVMe's SMART / Health log reports these (data units, host commands),
//! and a host expects them to survive reconnects, re-exports and restarts.
//!
//! The owner of the persisted figures (the appliance) creates a [`Lifetime`] per device
//! name with the base it saved, attaches it to each [`Bdev`](crate::Bdev) opened under
//! that name, and saves [`Lifetime::totals`] from time to time. Channels register
//! themselves when created, so no count is lost between attaching and saving; the I/O
//! path itself is untouched (the channels' single-writer statistics are read here).

use std::sync::{Arc, Mutex};

use crate::io::IoType;
use crate::stats::{BdevStats, ChannelStats};

/// Lifetime totals of the requests a device completed successfully.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoTotals {
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
}

impl IoTotals {
    /// Sum of both, saturating (a persisted figure may be anything).
    pub fn plus(self, other: Self) -> Self {
        Self {
            read_bytes: self.read_bytes.saturating_add(other.read_bytes),
            write_bytes: self.write_bytes.saturating_add(other.write_bytes),
            reads: self.reads.saturating_add(other.reads),
            writes: self.writes.saturating_add(other.writes),
        }
    }
}

/// Reads and writes of a statistics snapshot.
pub(crate) fn totals_of(stats: &BdevStats) -> IoTotals {
    IoTotals {
        read_bytes: stats.bytes(IoType::Read),
        write_bytes: stats.bytes(IoType::Write),
        reads: stats.ops(IoType::Read),
        writes: stats.ops(IoType::Write),
    }
}

/// What `channel` counted beyond `before`.
fn since(channel: &ChannelStats, before: IoTotals) -> IoTotals {
    let now = totals_of(&BdevStats::sum(std::iter::once(channel)));
    IoTotals {
        read_bytes: now.read_bytes.saturating_sub(before.read_bytes),
        write_bytes: now.write_bytes.saturating_sub(before.write_bytes),
        reads: now.reads.saturating_sub(before.reads),
        writes: now.writes.saturating_sub(before.writes),
    }
}

/// The lifetime totals of one named device across its openings.
#[derive(Default)]
pub struct Lifetime {
    inner: Mutex<Counted>,
}

#[derive(Default)]
struct Counted {
    /// Persisted figures plus those of channels whose device has gone.
    base: IoTotals,
    /// Channels of devices still open, each with what it had counted before it was
    /// adopted (not counted here: I/O before a device was served, such as a restore).
    channels: Vec<(Arc<ChannelStats>, IoTotals)>,
}

impl Lifetime {
    /// Totals that start from `base` (what was saved before).
    pub fn new(base: IoTotals) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Counted {
                base,
                channels: Vec::new(),
            }),
        })
    }

    /// The base plus every registered channel's counts.
    pub fn totals(&self) -> IoTotals {
        let counted = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        counted
            .channels
            .iter()
            .fold(counted.base, |sum, (c, before)| sum.plus(since(c, *before)))
    }

    /// Counts what `stats` counts from now on. Channels nobody else holds any more
    /// (their device was closed: they cannot change) are folded into the base, so
    /// reopening a device many times keeps this small.
    pub(crate) fn adopt(&self, stats: Arc<ChannelStats>) {
        let mut counted = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut folded = IoTotals::default();
        counted.channels.retain_mut(|(c, before)| {
            // `get_mut` succeeds only for the last holder, and (unlike a count) its
            // check synchronises with the other holders' drops: every count the
            // channel's reactor made is visible below.
            let gone = Arc::get_mut(c).is_some();
            if gone {
                folded = folded.plus(since(c, *before));
            }
            !gone
        });
        counted.base = counted.base.plus(folded);
        let before = since(&stats, IoTotals::default());
        counted.channels.push((stats, before));
    }
}

impl std::fmt::Debug for Lifetime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifetime")
            .field("totals", &self.totals())
            .finish()
    }
}
