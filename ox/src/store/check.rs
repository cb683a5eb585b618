//! `check`: what `oxctl store check` and oxd's start do with a store, so that a wrong
//! endpoint, secret, CA or bucket is found at once with its reason, not by the first
//! snapshot: list, store a probe object, read it back, delete it, see it gone. Each
//! step is timed; the first that fails ends the check and names why.

use std::time::Instant;

use super::ObjectStore;
use crate::error::OxError;

/// Where probe objects go, under the store's prefix.
pub const PROBE_PREFIX: &str = "ox-check/";

/// One step of a check.
#[derive(Debug, Clone)]
pub struct Step {
    /// `list`, `put`, `get`, `delete` or `gone`.
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
    // Once stored, the probe is deleted whatever the read said (and the read, if it
    // failed, stays the failure reported).
    let delete = async || store.delete(std::slice::from_ref(&key)).await;
    let deleted = c.step("delete", delete).await.is_some();
    if !read_back || !deleted {
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
