//! What a store's requests meet on their way: the retries made after a failure worth
//! retrying (5xx, 429, a reset, a timeout), and the last one's reason. Shared by every
//! connection to one configured store, so an operator sees a struggling store while it
//! struggles (`store_list`, a job's state, metrics), not only once something fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Retries made by one store's requests.
#[derive(Debug, Default)]
pub struct RetryLog {
    count: AtomicU64,
    last: Mutex<Option<Retry>>,
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
    /// Records a retry of `op` on `key` after `reason`.
    pub fn record(&self, op: &'static str, key: &str, reason: &str) {
        self.count.fetch_add(1, Ordering::Relaxed);
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

    /// The latest retry, if any.
    pub fn last(&self) -> Option<Retry> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
