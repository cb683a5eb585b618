//! `check`: what `oxctl store check` and oxd's start do with a store, so that a wrong
//! endpoint, secret, CA or bucket is found at once with its reason, not by the first
//! snapshot: list, compare the server's clock with ours, store a probe object, read it
//! back, find it in a listing, delete it, see it gone. Each step is timed; the first
//! that fails ends the check (the clock is still compared after a failed listing) and
//! names why.

use std::time::Instant;

use super::ObjectStore;
use crate::error::OxError;

/// How far the store's clock may be from ours, in seconds: SigV4's 15 minutes. Past
/// it, a store that checks signatures (AWS, Garage, MinIO) refuses every request as
/// too old or too new; one that does not would still take them, and would stamp
/// objects with times the collection's grace ([`crate::lease`]) compares with ours.
pub const CLOCK_TOLERANCE_S: f64 = 900.0;

/// Where probe objects go, under the store's prefix.
pub const PROBE_PREFIX: &str = "ox-check/";

/// One step of a check.
#[derive(Debug, Clone)]
pub struct Step {
    /// `list`, `clock`, `put`, `get`, `listed`, `delete` or `gone`.
    pub name: &'static str,
    /// How long it took (`clock`: 0, it reads the listing's answer).
    pub millis: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// What it found, where there is more to say than passed or failed (`clock`: how
    /// far the store's clock is from ours).
    pub detail: Option<String>,
}

/// A store check: its steps, in order, up to the first that failed (the clock's
/// besides, after a listing that failed: a clock too far off is why it did).
#[derive(Debug, Clone, Default)]
pub struct Check {
    /// The steps run.
    pub steps: Vec<Step>,
}

impl Check {
    /// The step that failed, if one did: the clock's if it did (every request is
    /// refused then, so it is the reason, not the refusal), else the first.
    pub fn failure(&self) -> Option<&Step> {
        let failed = |s: &&Step| s.error.is_some();
        let clock = self.steps.iter().filter(failed).find(|s| s.name == "clock");
        clock.or_else(|| self.steps.iter().find(failed))
    }

    /// Whether every step passed.
    pub fn ok(&self) -> bool {
        self.failure().is_none() && !self.steps.is_empty()
    }

    async fn step<T>(
        &mut self,
        name: &'static str,
        f: impl AsyncFnOnce() -> Result<T, OxError>,
    ) -> Option<T> {
        let start = Instant::now();
        let result = f().await;
        let millis = start.elapsed().as_millis() as u64;
        let (value, error) = match result {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e.to_string())),
        };
        self.steps.push(Step {
            name,
            millis,
            error,
            detail: None,
        });
        value
    }

    /// The `clock` step: what the store's latest answer (the listing's, taken or
    /// refused) says of its clock beside ours. None if it has said nothing (a local
    /// store; a server that sends no `Date`).
    fn clock(&mut self, store: &dyn ObjectStore) {
        let Some(clock) = store.server_clock() else {
            return;
        };
        let (least, most) = clock.offset_bounds();
        let detail = offset_words(least, most);
        // Off for certain: even the end of the bounds nearest ours is past it.
        let off = least > CLOCK_TOLERANCE_S || most < -CLOCK_TOLERANCE_S;
        let error = off.then(|| {
            format!(
                "{detail}, more than the 15 minutes SigV4 allows: a store that checks \
                 signatures refuses every request; set this appliance's clock (NTP), or \
                 the store's"
            )
        });
        self.steps.push(Step {
            name: "clock",
            millis: 0,
            error,
            detail: Some(detail),
        });
    }
}

/// What the bounds of the store's clock's offset from ours say: "the store's clock is
/// at least 20 min 3 s ahead of this appliance's", "... agrees with this appliance's
/// to within 1.2 s".
fn offset_words(least: f64, most: f64) -> String {
    let amount = |s: f64| {
        if s < 90.0 {
            return format!("{s:.1} s");
        }
        let whole = s.round() as u64;
        match (whole / 3600, whole / 60 % 60, whole % 60) {
            (0, m, s) => format!("{m} min {s} s"),
            (h, m, _) => format!("{h} h {m} min"),
        }
    };
    if least > 0.0 {
        format!(
            "the store's clock is at least {} ahead of this appliance's",
            amount(least)
        )
    } else if most < 0.0 {
        format!(
            "the store's clock is at least {} behind this appliance's",
            amount(-most)
        )
    } else {
        let within = amount(most.max(-least));
        format!("the store's clock agrees with this appliance's to within {within}")
    }
}

/// Checks `store` with a probe object named by `token` (random, so that appliances
/// checking one bucket at once never collide) under `prefix`.
pub async fn check(store: &dyn ObjectStore, prefix: &str, token: &str) -> Check {
    let dir = format!("{prefix}{PROBE_PREFIX}");
    let key = format!("{dir}{token}");
    let body: Vec<u8> = format!("oxd store check {token}\n").into_bytes();
    let mut c = Check::default();
    let listed_dir = c
        .step("list", async || store.list(&dir).await)
        .await
        .is_some();
    c.clock(store);
    if !listed_dir || c.failure().is_some() {
        return c;
    }
    if c.step("put", async || store.put(&key, body.clone()).await)
        .await
        .is_none()
    {
        return c;
    }
    let read = async || match store.get(&key).await {
        Ok(b) if b == body => Ok(()),
        Ok(b) => Err(OxError::integrity(
            format!("probe object {key}"),
            format!(
                "read back {} bytes that differ from the {} written",
                b.len(),
                body.len()
            ),
        )),
        Err(e) => Err(e),
    };
    let read_back = c.step("get", read).await.is_some();
    // Listings are how the catalogue, retention and collection find objects: the probe
    // must be in one, named as written (a server that listed it encoded, or only some
    // time after the write, would mislead all of them). Paged as browsing pages.
    let listed = read_back
        && c.step("listed", async || listed(store, &dir, &key).await)
            .await
            .is_some();
    // Once stored, the probe is deleted whatever the steps before said (and the first
    // of them that failed stays the failure reported).
    let delete = async || store.delete(std::slice::from_ref(&key)).await;
    let deleted = c.step("delete", delete).await.is_some();
    if !listed || !deleted {
        return c;
    }
    let gone = async || match store.get(&key).await {
        Err(OxError::NotFound { .. }) => Ok(()),
        Ok(_) => Err(OxError::Config(format!(
            "probe object {key} is still there after its delete"
        ))),
        Err(e) => Err(e),
    };
    c.step("gone", gone).await;
    c
}

/// Whether `key` is in the listing of `dir` (by "/", a page at a time).
async fn listed(store: &dyn ObjectStore, dir: &str, key: &str) -> Result<(), OxError> {
    let (mut after, mut seen, mut first) = (None::<String>, 0usize, None::<String>);
    loop {
        let page = store
            .list_page(dir, Some("/"), after.as_deref(), 1000)
            .await?;
        if page.keys.iter().any(|k| k == key) {
            return Ok(());
        }
        seen += page.keys.len() + page.prefixes.len();
        // What the listing shows nearest the probe: an entry holding its token (the
        // probe's key changed), else the first.
        let token = key.rsplit('/').next().unwrap_or(key);
        let near = page.keys.iter().chain(&page.prefixes);
        if let Some(k) = near.clone().find(|k| k.contains(token)) {
            first = Some(k.clone());
        } else if first.is_none() {
            first = near.clone().next().cloned();
        }
        match page.next {
            Some(next) => after = Some(next),
            None => {
                let shown = first.map_or_else(String::new, |f| format!(", such as {f:?}"));
                return Err(OxError::Config(format!(
                    "probe object {key} is not in a listing of {dir} ({seen} entries there{shown})"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::http::ServerClock;
    use crate::store::local::LocalStore;
    use crate::store::{BoxFuture, Listing};
    use std::time::Duration;

    /// A local store made odd: listings that come back url-encoded (as a server's would
    /// if the client did not decode them), a clock of its server's, listings refused.
    struct Odd {
        inner: LocalStore,
        encoded: bool,
        clock: Option<ServerClock>,
        refused: bool,
    }

    impl Odd {
        fn new(dir: &std::path::Path) -> Self {
            Self {
                inner: LocalStore::open(dir).unwrap(),
                encoded: false,
                clock: None,
                refused: false,
            }
        }

        /// A server whose clock is `offset_s` ahead of ours, its answer stamped 0.2 s
        /// after the request left and 0.1 s before the answer came.
        fn skewed(dir: &std::path::Path, offset_s: i64) -> Self {
            let now = std::time::SystemTime::now();
            let by = Duration::from_secs(offset_s.unsigned_abs());
            let clock = ServerClock {
                date: if offset_s < 0 { now - by } else { now + by },
                sent: now - Duration::from_millis(200),
                answered: now + Duration::from_millis(100),
            };
            Self {
                clock: Some(clock),
                ..Self::new(dir)
            }
        }
    }

    impl ObjectStore for Odd {
        fn server_clock(&self) -> Option<ServerClock> {
            self.clock
        }
        fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.put(key, data)
        }
        fn put_new<'a>(
            &'a self,
            key: &'a str,
            data: Vec<u8>,
        ) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.put_new(key, data)
        }
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.inner.get(key)
        }
        fn get_range<'a>(
            &'a self,
            key: &'a str,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.inner.get_range(key, offset, len)
        }
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>> {
            match self.refused {
                true => Box::pin(async move {
                    Err(OxError::Refused {
                        op: "list",
                        key: prefix.to_string(),
                        status: 403,
                        message: "RequestTimeTooSkewed".into(),
                    })
                }),
                false => self.inner.list(prefix),
            }
        }
        fn list_page<'a>(
            &'a self,
            prefix: &'a str,
            delimiter: Option<&'a str>,
            after: Option<&'a str>,
            max: usize,
        ) -> BoxFuture<'a, Result<Listing, OxError>> {
            Box::pin(async move {
                let mut page = self.inner.list_page(prefix, delimiter, after, max).await?;
                if self.encoded {
                    for k in &mut page.keys {
                        *k = k.replace('/', "%2F");
                    }
                }
                Ok(page)
            })
        }
        fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>> {
            self.inner.delete(keys)
        }
    }

    /// A probe the listing shows changed fails the check at `listed`, saying what the
    /// listing showed, and is deleted all the same.
    #[test]
    fn a_probe_missing_from_listings_fails_the_check_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let good = LocalStore::open(dir.path()).unwrap();
        let c = async_io::block_on(check(&good, "p/", "t1"));
        let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["list", "put", "get", "listed", "delete", "gone"],
            "{c:?}"
        );
        assert!(c.ok(), "{c:?}");

        let bad = Odd {
            encoded: true,
            ..Odd::new(dir.path())
        };
        let c = async_io::block_on(check(&bad, "p/", "t2"));
        let failed = c.failure().unwrap();
        assert_eq!(failed.name, "listed", "{c:?}");
        let why = failed.error.as_deref().unwrap();
        assert!(why.contains("p%2Fox-check%2Ft2"), "{why}");
        let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
        assert_eq!(names, ["list", "put", "get", "listed", "delete"], "{c:?}");
        let left = async_io::block_on(good.list("")).unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A server's clock past SigV4's 15 minutes either way fails the check at `clock`,
    /// right after the listing, saying how far off and which way; within them the
    /// check goes on and says how far.
    #[test]
    fn a_store_clock_too_far_from_ours_fails_the_check() {
        let dir = tempfile::tempdir().unwrap();
        // (The server stamped its answer within a second or two of `offset`.)
        for (offset, words) in [
            (1200, "at least 20 min 0 s ahead of"),
            (-1200, "at least 19 min 58 s behind"),
            (-(3 * 3600 + 150), "at least 3 h 2 min behind"),
        ] {
            let c = async_io::block_on(check(&Odd::skewed(dir.path(), offset), "", "t"));
            let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
            assert_eq!(names, ["list", "clock"], "{c:?}");
            let failed = c.failure().unwrap();
            assert_eq!(failed.name, "clock", "{c:?}");
            let why = failed.error.as_deref().unwrap();
            assert!(why.contains(words) && why.contains("15 minutes"), "{why}");
        }
        let c = async_io::block_on(check(&Odd::skewed(dir.path(), 60), "", "t"));
        assert!(c.ok(), "{c:?}");
        let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["list", "clock", "put", "get", "listed", "delete", "gone"]
        );
        let detail = c.steps[1].detail.as_deref().unwrap();
        assert!(detail.contains("at least 59.9 s ahead of"), "{detail}");
        let c = async_io::block_on(check(&Odd::skewed(dir.path(), 0), "", "t"));
        let detail = c.steps[1].detail.as_deref().unwrap();
        assert!(
            detail.contains("agrees with this appliance's to within 2.2 s"),
            "{detail}"
        );
    }

    /// A listing refused by a server whose clock is too far off is the clock's fault:
    /// the check names the clock, not the refusal (which it keeps, before it).
    #[test]
    fn a_refusal_beside_a_clock_too_far_off_names_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        let store = Odd {
            refused: true,
            ..Odd::skewed(dir.path(), -1800)
        };
        let c = async_io::block_on(check(&store, "", "t"));
        let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
        assert_eq!(names, ["list", "clock"], "{c:?}");
        assert!(c.steps[0].error.is_some(), "{c:?}");
        assert_eq!(c.failure().unwrap().name, "clock", "{c:?}");
        // Refused with a clock within bounds: the refusal is the failure.
        let store = Odd {
            refused: true,
            ..Odd::skewed(dir.path(), 5)
        };
        let c = async_io::block_on(check(&store, "", "t"));
        assert_eq!(c.failure().unwrap().name, "list", "{c:?}");
    }
}
