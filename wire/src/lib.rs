//! NVMe over Fabrics, TCP transport, as it is on the wire: PDUs and their digests
//! ([`pdu`]), submission and completion queue entries and opcodes ([`cmd`]),
//! little-endian fields ([`le`]), and DH-HMAC-CHAP's secrets, computations and
//! messages ([`dhchap`], [`ffdhe`]).
//!
//! Its own crate so that initiators (oxperf) speak the protocol without the target's
//! engine (reactors, io_uring, block devices): the target (`nvmf`) and they share
//! these types, and a host and the target cannot disagree on a layout.

pub mod cmd;
pub mod dhchap;
pub mod ffdhe;
pub mod le;
pub mod pdu;

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// In-capsule data accepted on admin and fabrics queues (8 KiB, as Linux assumes).
pub const ADMIN_IN_CAPSULE: u32 = 8192;
