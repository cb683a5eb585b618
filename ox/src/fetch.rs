//! Fetching what was stored and checking it before use: a body that fails its check
//! (an AEAD tag, a checksum, a length, a manifest that does not parse) may have been
//! damaged on the way, so it is fetched again — on a fresh connection, a bounded
//! number of times — before the failure becomes an error. Each failure is logged once
//! with its object key and counted, apart from store outages, which the store's own
//! retries handle.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::OxError;
use crate::store::ObjectStore;

/// Fetches after the first when a body fails its check.
pub const REFETCHES: u32 = 3;

/// Integrity failures seen and fetches made again.
#[derive(Debug, Default)]
pub struct IntegrityCounters {
    /// Bodies that failed their check.
    pub failures: AtomicU64,
    /// Fetches made again after one.
    pub refetches: AtomicU64,
}

/// Every integrity failure and refetch of this process, whatever fetched it.
pub static TOTAL: IntegrityCounters = IntegrityCounters {
    failures: AtomicU64::new(0),
    refetches: AtomicU64::new(0),
};

/// Fetches `key` (`range`: offset and length, or the whole object) and hands the body
/// to `check`; while `check` finds it damaged ([`OxError::Integrity`]), fetches it
/// again on a fresh connection, up to [`REFETCHES`] times. Other errors (the store
/// unreachable, the object missing) return at once. `counters`, if given, count the
/// failures and refetches as well as [`TOTAL`].
pub async fn checked<T>(
    store: &dyn ObjectStore,
    key: &str,
    range: Option<(u64, u64)>,
    counters: Option<&IntegrityCounters>,
    check: impl Fn(Vec<u8>) -> Result<T, OxError>,
) -> Result<T, OxError> {
    let mut attempt = 0;
    loop {
        let body = if attempt == 0 {
            match range {
                Some((offset, len)) => store.get_range(key, offset, len).await?,
                None => store.get(key).await?,
            }
        } else {
            store.get_fresh(key, range).await?
        };
        let e = match check(body) {
            Ok(v) => return Ok(v),
            Err(e @ OxError::Integrity { .. }) => e,
            Err(e) => return Err(e),
        };
        for c in [Some(&TOTAL), counters].into_iter().flatten() {
            c.failures.fetch_add(1, Ordering::Relaxed);
        }
        if attempt == REFETCHES {
            tracing::error!(key, "failed its integrity check {} times: {e}", attempt + 1);
            return Err(e);
        }
        tracing::warn!(
            key,
            attempt,
            "failed its integrity check ({e}): fetching it again"
        );
        attempt += 1;
        for c in [Some(&TOTAL), counters].into_iter().flatten() {
            c.refetches.fetch_add(1, Ordering::Relaxed);
        }
    }
}
