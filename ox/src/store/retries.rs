//! What a store's requests meet on their way: the retries made after a failure worth
//! retrying (5xx, 429, a reset, a timeout), by kind, and the last one's reason; and the
//! requests that failed for good, by kind. Shared by every connection to one
//! configured store, so an operator sees a struggling store while it struggles
//! (`store_list`, a job's state, metrics), not only once something fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Retries made by one store's requests.
#[derive(Debug, Default)]
pub struct RetryLog {
    count: AtomicU64,
    by_kind: [AtomicU64; Trouble::ALL.len()],
    failed: [AtomicU64; Failed::ALL.len()],
    last: Mutex<Option<Retry>>,
}

/// What a request met that is worth sending it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The store asked to slow down (HTTP 429, or a 503 whose error code says so; a
    /// 503 with any other code, `ServiceUnavailable` included, is a server error:
    /// proxies and nodes going down answer so).
    SlowDown,
    /// Another server error (5xx).
    ServerError,
    /// The body was damaged on the way (the store said so, or acknowledged another
    /// checksum).
    Damaged,
    /// No complete answer in time.
    Timeout,
    /// Connecting failed, or the connection broke.
    Connection,
}

impl Trouble {
    /// Every kind, in the order they are counted.
    pub const ALL: [Trouble; 5] = [
        Trouble::SlowDown,
        Trouble::ServerError,
        Trouble::Damaged,
        Trouble::Timeout,
        Trouble::Connection,
    ];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Trouble::SlowDown => "slow_down",
            Trouble::ServerError => "server_error",
            Trouble::Damaged => "damaged",
            Trouble::Timeout => "timeout",
            Trouble::Connection => "connection",
        }
    }
}

/// Why a request failed for good (not counting "not found" and "already exists",
/// which are answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Still failing after every retry.
    Unavailable,
    /// Refused (4xx, 501): a retry would not help.
    Refused,
    /// The server's certificate is not trusted.
    Untrusted,
    /// The store answered success with what cannot be right (a listing that does not
    /// parse, a range longer than asked).
    Damaged,
}

impl Failed {
    /// The kind of failure `e` is, if it is one, as a store method returns it (a
    /// missing key or one that exists already is an answer; a frame that fails its
    /// checksum is found by the caller, after the store answered, and counted as an
    /// integrity failure there).
    pub fn of(e: &crate::error::OxError) -> Option<Self> {
        use crate::error::OxError as E;
        match e {
            E::Unavailable { .. } => Some(Failed::Unavailable),
            E::Refused { .. } => Some(Failed::Refused),
            E::Untrusted { .. } => Some(Failed::Untrusted),
            E::Integrity { .. } | E::Format(_) => Some(Failed::Damaged),
            _ => None,
        }
    }

    /// Every kind, in the order they are counted.
    pub const ALL: [Failed; 4] = [
        Failed::Unavailable,
        Failed::Refused,
        Failed::Untrusted,
        Failed::Damaged,
    ];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Failed::Unavailable => "unavailable",
            Failed::Refused => "refused",
            Failed::Untrusted => "untrusted",
            Failed::Damaged => "damaged",
        }
    }
}

/// One retry: when, of what, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The operation (GET, PUT, ...).
    pub op: &'static str,
    /// The object key.
    pub key: String,
    /// What the attempt before it met.
    pub reason: String,
}

impl RetryLog {
    /// Records a retry of `op` on `key` after `reason`, of kind `kind`.
    pub fn record(&self, op: &'static str, key: &str, kind: Trouble, reason: &str) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Retry {
            at,
            op,
            key: key.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Retries so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Retries so far, by kind.
    pub fn by_kind(&self) -> [(Trouble, u64); Trouble::ALL.len()] {
        Trouble::ALL.map(|k| (k, self.by_kind[k as usize].load(Ordering::Relaxed)))
    }

    /// Records a request that failed for good.
    pub fn failed(&self, why: Failed) {
        self.failed[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests that failed for good so far, by kind.
    pub fn failures(&self) -> [(Failed, u64); Failed::ALL.len()] {
        Failed::ALL.map(|k| (k, self.failed[k as usize].load(Ordering::Relaxed)))
    }

    /// The latest retry, if any.
    pub fn last(&self) -> Option<Retry> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
