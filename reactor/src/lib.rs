//! Pinned, polled, shared-nothing reactors — SPDK's threading model in Rust.
//!
//! A [`ReactorSet`] starts one OS thread per configured core, pinned to it. Each thread
//! runs a [`Reactor`]: a loop that, pass after pass,
//!
//! 1. runs a bounded batch of cross-core [messages](ReactorHandle::send) from its
//!    bounded mailbox (a full mailbox is back-pressure for the sender),
//! 2. runs [deferred](Reactor::defer) work and due [timers](Reactor::after),
//! 3. runs its [pollers](Reactor::register_poller), each reporting [`PollStatus`],
//! 4. runs the [hooks](Reactor::before_submit) queued for the end of the pass (a
//!    connection's send of everything the pass produced), submits queued SQEs to its
//!    own io_uring (those queued [late](Reactor::submit_late), receives that
//!    usually wait, last) and routes completions to the closures that own the
//!    operations' buffers ([`Reactor::submit`]),
//!
//! and then, by its [`IdlePolicy`], either polls again or parks in `io_uring_enter`
//! until a completion, a message (which rings an eventfd the ring watches) or the next
//! timer wakes it.
//!
//! Everything on a reactor is single-threaded: state lives in `Rc`/`RefCell`, per-core
//! objects come from [`Reactor::channel`], and the only cross-core traffic is messages.
//! Code running on a reactor finds it with [`current`].

mod config;
mod cores;
mod cpu;
mod error;
mod handle;
mod poller;
mod reactor;
mod ring;
mod set;
mod timer;

pub use config::{IdlePolicy, ReactorConfig};
pub use cores::CoreList;
pub use cpu::{current_affinity, current_tid, thread_cpu_time};
pub use error::ReactorError;
pub use handle::{Message, ReactorHandle, ReactorStats};
pub use io_uring;
pub use poller::{PollStatus, PollerId};
pub use reactor::{Reactor, current};
pub use ring::OnComplete;
pub use set::ReactorSet;
pub use timer::TimerId;
