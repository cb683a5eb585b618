//! Reactor configuration: cores, idle policy and sizing.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::cores::CoreList;
use crate::error::ReactorError;

/// What a reactor does when a pass of its loop found no work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePolicy {
    /// Poll forever: lowest latency, burns its whole core. For benchmarks on dedicated cores.
    Busy,
    /// Poll, and park on the ring after an idle spell; a message, a completion or a timer
    /// wakes it. The default: near-busy latency under load, ~0 % CPU when idle.
    #[default]
    Adaptive,
    /// Park whenever a pass found no work.
    Interrupt,
}

impl FromStr for IdlePolicy {
    type Err = ReactorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "busy" => Ok(Self::Busy),
            "adaptive" => Ok(Self::Adaptive),
            "interrupt" => Ok(Self::Interrupt),
            other => Err(ReactorError::IdlePolicy(other.to_string())),
        }
    }
}

impl fmt::Display for IdlePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Busy => "busy",
            Self::Adaptive => "adaptive",
            Self::Interrupt => "interrupt",
        })
    }
}

/// How to start a set of reactors.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// One reactor per core, pinned to it.
    pub cores: CoreList,
    /// Idle behaviour of every reactor.
    pub idle: IdlePolicy,
    /// How long an `adaptive` reactor keeps polling after its last work before parking.
    /// Long enough to span the gaps between completions of a loaded device (a disk's
    /// ~0.4 ms at queue depth 32: 200 µs parked between them and cost 5–10 % of its
    /// IOPS, 1 ms matches a busy reactor); a reactor with nothing to do still parks
    /// within a millisecond.
    pub idle_spell: Duration,
    /// Capacity of each reactor's mailbox; a full mailbox is back-pressure to senders.
    pub mailbox_depth: usize,
    /// Most messages handled per loop pass, so pollers are never starved by a flood.
    pub message_batch: usize,
    /// Submission queue entries of each reactor's io_uring (completion queue is twice that).
    pub ring_entries: u32,
    /// How long a stopping reactor waits for in-flight operations before cancelling them.
    pub drain_timeout: Duration,
}

impl ReactorConfig {
    /// Defaults for the given cores: adaptive idle, 1 ms idle spell, 4096-deep mailboxes.
    pub fn new(cores: CoreList) -> Self {
        Self {
            cores,
            idle: IdlePolicy::default(),
            idle_spell: Duration::from_millis(1),
            mailbox_depth: 4096,
            message_batch: 64,
            ring_entries: 512,
            drain_timeout: Duration::from_secs(5),
        }
    }

    /// Same configuration with another idle policy.
    pub fn with_idle(mut self, idle: IdlePolicy) -> Self {
        self.idle = idle;
        self
    }
}
