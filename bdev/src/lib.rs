//! Block devices for the OX appliance.
//!
//! A [`Bdev`] is a named device with a block size (512 or 4096), a block count and a
//! UUID, shared by every reactor. Each reactor reaches it through its own [`Channel`]
//! (SPDK's io_channel), created on first use and cached on the reactor, so the I/O path
//! takes no lock. Requests ([`BdevIo`]) own their [`IoBuf`] buffers while in flight and
//! complete on the submitting reactor with an [`IoCompletion`] that hands them back.
//!
//! Every request is validated once, in [`Bdev::validate`], before any device sees it;
//! every completion is counted in per-channel [`BdevStats`].
//!
//! Devices: [`create_malloc`] (RAM, sparse), [`create_null`] (discards writes, reads
//! zeroes) and [`open_uring`] (a file or block device through the reactor's io_uring).
//! Layers: [`create_volume`] (change tracking, copy-before-write snapshots) and
//! [`open_clone`] (a local copy filled from a [`Basis`] on demand).
//!
//! Who owns what: each clone's chunk states and each volume's snapshot states belong to
//! one owner reactor, as a pure core (`clone::core`, `volume::core`: `apply(event) ->
//! actions`) that the owner runs (`clone::owner`, `volume::owner`); other reactors and
//! the OX cores change them only by messages, and read only the bits the owner
//! publishes. Records on local files (`presence`, `dirty`) are owned by their own
//! thread each, and reach the file system through a [`medium::Medium`] so that power-cut
//! tests can put them on a [`NonDurableMedium`] (beside [`create_nondurable`] devices).
//! Other decisions are pure cores too: on the reactors, a sequential reader's
//! read-ahead ([`read_ahead`]); off them, a thickening walk's ([`walk`]: which
//! chunks, how many at once, what to retry) and a snapshot attempt's
//! order of steps ([`steps`]: begin, settle, flush, checkpoints and their commits,
//! ending journal first), which the OX cores carry out (`ox::hydrate`,
//! `ox::snapshot`). Because the cores do no I/O, the tests' deterministic simulator
//! (`sim`) runs them, with the records on such a medium, on one thread against a
//! simulated clock, drive, store, hosts and power cuts.

mod bdev;
pub mod blocking;
mod buf;
mod clone;
mod completions;
mod dirty;
pub use dirty::remove_dirty_record;
mod error;
pub mod fsutil;
mod io;
mod lifetime;
pub use lifetime::{IoTotals, Lifetime};
mod malloc;
pub mod medium;
mod nondurable;
pub use nondurable::{Cut, PowerSwitch, create_nondurable};
mod nondurable_medium;
pub use nondurable_medium::NonDurableMedium;
mod null;
mod park;
mod presence;
pub use presence::seed_presence;
mod preserve;
mod reply;
#[cfg(test)]
mod sim;
mod stats;
#[cfg(test)]
mod test_rng;
mod uring;
mod volume;

pub use bdev::{BackendChannel, Bdev, BdevBackend, BdevInfo, Channel, MAX_IO_BYTES};
pub use buf::{IO_ALIGN, IoBuf};
pub use clone::{
    Basis, CloneCounters, CloneHandle, FetchDone, FetchError, FetchReason, create_clone,
    open_clone, open_clone_on,
};
pub use clone::{read_ahead, walk};
pub use error::BdevError;
pub use io::{BdevIo, Finished, IoCompletion, IoDone, IoType};
pub use malloc::create_malloc;
pub use null::create_null;
pub use stats::{BdevStats, ChannelStats, LatencyHistogram, SharedHistogram};
pub use uring::{UringConfig, open_uring};
pub use volume::{
    ChangedChunks, Claim, PendingClaim, Tracking, VolumeHandle, create_volume, steps,
};
