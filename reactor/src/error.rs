//! The reactor crate's error type.

use std::io;

/// Everything that can go wrong starting, addressing or stopping reactors.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// A core list did not parse.
    #[error("invalid core list {text:?}: {reason}")]
    CoreListSyntax {
        /// The text as given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured core does not exist or is outside this process's affinity mask.
    #[error("core {core} is not available to this process (available cores: {available:?})")]
    CoreUnavailable {
        /// The core asked for.
        core: usize,
        /// The cores this process may use.
        available: Vec<usize>,
    },
    /// The process may not run on any core (empty affinity mask).
    #[error("no CPU cores are available to this process")]
    NoCores,
    /// An idle policy name did not parse.
    #[error("unknown idle policy {0:?} (expected busy, adaptive or interrupt)")]
    IdlePolicy(String),
    /// Pinning a reactor thread to its core failed.
    #[error("could not pin reactor thread to core {core}")]
    Pin {
        /// The core.
        core: usize,
    },
    /// Creating the reactor's io_uring, eventfd or thread failed.
    #[error("could not set up reactor on core {core}: {what}: {source}")]
    Setup {
        /// The core.
        core: usize,
        /// The resource being created.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The target reactor's mailbox is full: back-pressure, try again later.
    #[error("reactor {reactor} mailbox is full")]
    MailboxFull {
        /// Index of the reactor.
        reactor: usize,
    },
    /// The target reactor has stopped; the message was not delivered.
    #[error("reactor {reactor} has stopped")]
    Stopped {
        /// Index of the reactor.
        reactor: usize,
    },
    /// A reactor's io_uring failed while running (submit or wait); the reactor exited.
    #[error("reactor {reactor} ring failed: {source}")]
    Ring {
        /// Index of the reactor.
        reactor: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A reactor thread panicked (a bug); reported at join.
    #[error("reactor {reactor} thread panicked")]
    Panicked {
        /// Index of the reactor.
        reactor: usize,
    },
    /// A blocking call from outside the reactors timed out.
    #[error("reactor {reactor} did not answer within {millis} ms")]
    Timeout {
        /// Index of the reactor.
        reactor: usize,
        /// How long we waited.
        millis: u64,
    },
}
