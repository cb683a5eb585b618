//! `check`: what `oxctl store check` and oxd's start do with a store, so that a wrong
//! endpoint, secret, CA or bucket is found at once with its reason, not by the first
//! snapshot: list, store a probe object, read it back, find it in a listing, delete it,
//! see it gone. Each step is timed; the first that fails ends the check and names why.

use std::time::Instant;

use super::ObjectStore;
use crate::error::OxError;

/// Where probe objects go, under the store's prefix.
pub const PROBE_PREFIX: &str = "ox-check/";

/// One step of a check.
#[derive(Debug, Clone)]
pub struct Step {
    /// `list`, `put`, `get`, `listed`, `delete` or `gone`.
    pub name: &'static str,
    /// How long it took.
    pub millis: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// A store check: its steps, in order, up to the first that failed.
#[derive(Debug, Clone, Default)]
pub struct Check {
    /// The steps run.
    pub steps: Vec<Step>,
}

impl Check {
    /// The first step that failed, if one did.
    pub fn failure(&self) -> Option<&Step> {
        self.steps.iter().find(|s| s.error.is_some())
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
        });
        value
    }
}

/// Checks `store` with a probe object named by `token` (random, so that appliances
/// checking one bucket at once never collide) under `prefix`.
pub async fn check(store: &dyn ObjectStore, prefix: &str, token: &str) -> Check {
    let dir = format!("{prefix}{PROBE_PREFIX}");
    let key = format!("{dir}{token}");
    let body: Vec<u8> = format!("oxd store check {token}\n").into_bytes();
    let mut c = Check::default();
    if c.step("list", async || store.list(&dir).await)
        .await
        .is_none()
    {
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
    use crate::store::local::LocalStore;
    use crate::store::{BoxFuture, Listing};

    /// A store whose listings come back url-encoded, as a server's would if the client
    /// did not decode them.
    struct Encoding(LocalStore);

    impl ObjectStore for Encoding {
        fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
            self.0.put(key, data)
        }
        fn put_new<'a>(
            &'a self,
            key: &'a str,
            data: Vec<u8>,
        ) -> BoxFuture<'a, Result<(), OxError>> {
            self.0.put_new(key, data)
        }
        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.0.get(key)
        }
        fn get_range<'a>(
            &'a self,
            key: &'a str,
            offset: u64,
            len: u64,
        ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
            self.0.get_range(key, offset, len)
        }
        fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>> {
            self.0.list(prefix)
        }
        fn list_page<'a>(
            &'a self,
            prefix: &'a str,
            delimiter: Option<&'a str>,
            after: Option<&'a str>,
            max: usize,
        ) -> BoxFuture<'a, Result<Listing, OxError>> {
            Box::pin(async move {
                let mut page = self.0.list_page(prefix, delimiter, after, max).await?;
                for k in &mut page.keys {
                    *k = k.replace('/', "%2F");
                }
                Ok(page)
            })
        }
        fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>> {
            self.0.delete(keys)
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

        let bad = Encoding(LocalStore::open(dir.path()).unwrap());
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
}
