//! OX, Object Exchange: moving volumes to and from object storage.
//!
//! This crate holds the machinery, usable on its own:
//!
//! - [`format`](mod@format): the versioned snapshot format — data objects of frames, a paged chunk
//!   index, a manifest written last (described for people in `docs/FORMAT.md`);
//! - [`codec`]: chunk ↔ frame (zstd, AES-256-GCM bound to volume, snapshot and
//!   position; a checksum when encryption is off);
//! - [`secret_file`]: secret files read only when private to this user;
//! - [`keys`]: per-snapshot data keys wrapped by key-encryption keys from a file, an
//!   environment variable or a command;
//! - [`store`]: the [`store::ObjectStore`] trait with S3 and local-directory stores;
//! - [`throttle`]: token-bucket bandwidth limits, global and per volume, foreground
//!   and background;
//! - [`snapshot`]: writing a volume's snapshot (point in time, incremental, sparse,
//!   resumable through a [`journal`]) and loading one; [`basis`] and [`hydrate`]:
//!   clones reading from it, thickening, restore and verify.
//!
//! Object-store I/O runs on dedicated OX cores (an async-io executor per core), never
//! on reactors.

pub mod basis;
pub mod blockio;
pub mod bucket;
pub mod codec;
pub mod collect;
pub mod cores;
pub mod diff;
mod error;
pub mod fetch;
pub mod format;
pub mod hydrate;
pub mod journal;
pub mod keys;
pub mod lease;
pub mod policy;
pub mod retention;
pub mod secret_file;
pub mod snapshot;
pub mod store;
pub mod throttle;
pub mod transfer;

pub use error::OxError;
