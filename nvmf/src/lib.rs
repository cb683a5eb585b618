//! NVMe over Fabrics, TCP transport: the target that serves bdevs to NVMe/TCP hosts.
//!
//! [`Target::start`] binds the listeners of a [`TargetConfig`] (subsystems with their
//! namespaces, allowed hosts and listeners, plus discovery-only listeners) and serves
//! them from a set of reactors: each accepted connection is handed to one reactor and
//! lives there for its whole life, its socket I/O going through that reactor's
//! io_uring. A controller's state belongs to its admin queue's reactor; its I/O
//! queues, spread over reactors, reach it only through [`target`]'s registry (at
//! Connect, or once authenticated when the host must authenticate) and by messages at
//! teardown and for discovery log changes.
//!
//! The wire types ([`pdu`], [`cmd`]) and DH-HMAC-CHAP's secrets, computations and
//! messages ([`dhchap`]) live in `nvmf-wire`, which initiators (oxperf) use without
//! this crate; they are re-exported here. The target logic is not public.

mod admission;
mod auth;
mod bufpool;
mod conn;
mod ctrlr;
mod error;
pub mod framing;
pub mod health;
pub mod identify;
mod io;
mod listener;
mod subsystem;
mod target;

pub use error::NvmfError;
pub use nvmf_wire::{cmd, dhchap, ffdhe, le, pdu};
pub use subsystem::{
    ADMIN_IN_CAPSULE, C2hSuccess, DISCOVERY_NQN, HostPolicy, Limits, Namespace, SocketIo,
    Subsystem, TargetConfig, check_nqn,
};
pub use target::{ConnectEvent, ConnectObserver, ControllerInfo, Target};
