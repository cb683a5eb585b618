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
/// to `check`; while `check` finds it damaged ([`OxError::Integrity`], or a
/// [`OxError::Format`] a flipped version byte would give), fetches it
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
            // A version this build does not read is as likely a damaged version byte
            // (a frame's header, a manifest without a checksum): fetched again too, and
            // reported as it is if it stays.
            Err(e @ (OxError::Integrity { .. } | OxError::Format(_))) => e,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;
    use std::cell::Cell;

    /// A body that fails its check is fetched again until it passes; one whose version
    /// byte reads as unknown is too; an error of another kind is not.
    #[test]
    fn damaged_bodies_are_fetched_again_and_other_errors_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path().to_path_buf()).unwrap();
        let counters = IntegrityCounters::default();
        futures_lite::future::block_on(async {
            store.put("k", b"body".to_vec()).await.unwrap();
            for version_byte in [false, true] {
                let failures = Cell::new(2);
                let got = checked(&store, "k", None, Some(&counters), |b| {
                    if failures.get() > 0 {
                        failures.set(failures.get() - 1);
                        return Err(if version_byte {
                            OxError::Format("frame version 9".into())
                        } else {
                            OxError::integrity("k", "test")
                        });
                    }
                    Ok(b)
                })
                .await
                .unwrap();
                assert_eq!(got, b"body");
            }
            let calls = Cell::new(0);
            let e = checked(&store, "k", None, Some(&counters), |_| -> Result<(), _> {
                calls.set(calls.get() + 1);
                Err(OxError::Config("not damage".into()))
            })
            .await
            .unwrap_err();
            assert!(matches!(e, OxError::Config(_)));
            assert_eq!(calls.get(), 1, "not fetched again");
            let e = checked(&store, "k", None, None, |_| -> Result<(), _> {
                Err(OxError::integrity("k", "always"))
            })
            .await
            .unwrap_err();
            assert!(
                matches!(e, OxError::Integrity { .. }),
                "reported once it stays"
            );
        });
        assert_eq!(counters.failures.load(Ordering::Relaxed), 4);
        assert_eq!(counters.refetches.load(Ordering::Relaxed), 4);
    }
}
