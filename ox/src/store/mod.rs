//! Object stores behind one trait: S3 (any S3-compatible service) and a local
//! directory (the embedded default). Methods return futures run by an OX core's
//! executor, never on a reactor.

pub mod check;
pub mod credential_chain;
pub mod credential_process;
pub mod http;
pub mod local;
pub mod retries;
pub mod s3;
mod sigv4;
mod slots;

use std::future::Future;
use std::pin::Pin;

use crate::error::OxError;

/// A boxed, single-threaded future (OX cores run a local executor).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// An object store.
pub trait ObjectStore {
    /// Stores `data` under `key`, replacing any object there.
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>>;
    /// Stores `data` under `key` as [`Self::put`] does, from bytes the caller goes on
    /// sharing: a PUT tried again (a snapshot waiting out an outage) sends the same
    /// bytes, not a copy made for each try. The default copies them for `put`.
    fn put_shared<'a>(
        &'a self,
        key: &'a str,
        data: bytes::Bytes,
    ) -> BoxFuture<'a, Result<(), OxError>> {
        self.put(key, data.to_vec())
    }
    /// Stores `data` under `key` only if nothing is there
    /// ([`OxError::AlreadyExists`] otherwise) — where the store can tell.
    fn put_new<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>>;
    /// The whole object.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>>;
    /// The whole object and its version tag (S3's ETag), for a later
    /// [`Self::put_if_match`]; `None` where the store keeps none.
    fn get_tagged<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Tagged, OxError>> {
        Box::pin(async move { Ok((self.get(key).await?, None)) })
    }
    /// Replaces the object at `key` only if it still has version tag `tag` (as
    /// [`Self::get_tagged`] gave it): [`OxError::AlreadyExists`] if it changed since.
    /// Without a tag (a store that keeps none) it replaces it, as [`Self::put`] does.
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        data: Vec<u8>,
        tag: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), OxError>> {
        let _ = tag;
        self.put(key, data)
    }
    /// `len` bytes from `offset`; fewer only if the object ends first.
    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, OxError>>;
    /// The whole object (`range`: `None`) or `len` bytes from `offset`, over a
    /// connection of its own: for fetching again what failed its integrity check,
    /// never over the connection it came on. Stores without connections read again.
    fn get_fresh<'a>(
        &'a self,
        key: &'a str,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
        match range {
            Some((offset, len)) => self.get_range(key, offset, len),
            None => self.get(key),
        }
    }
    /// The quickest a request without a body has been answered by the store's server
    /// (the round trip and its time to a first byte, not a body's transfer), if the
    /// store has sent one and is reached over a network: what sizes a sequential
    /// reader's read-ahead.
    fn round_trip(&self) -> Option<std::time::Duration> {
        None
    }
    /// What the store's server's clock said in its latest answer that carried a
    /// `Date`, beside ours ([`http::HttpClient::server_clock`]); `None` for a store
    /// with no server, or none that has said.
    fn server_clock(&self) -> Option<http::ServerClock> {
        None
    }
    /// Sends at most `most` requests at once from now on, each past it waiting its turn
    /// (a store over a network; the first limit set stays): a bulk reader's requests
    /// then keep reusing a few connections, warm, instead of opening more for each
    /// burst.
    fn limit_requests(&self, most: usize) {
        let _ = most;
    }
    /// Where the store stands against its limit on requests in flight
    /// ([`Self::limit_requests`]); `None` where requests are not limited.
    fn request_room(&self) -> Option<http::RequestRoom> {
        None
    }
    /// Keys starting with `prefix`, sorted.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>>;
    /// One page of what lies under `prefix`, in key order: at most `max` entries, each
    /// a key or (with a `delimiter`) a common prefix standing for every key that has the
    /// delimiter after `prefix`; `after` is the page's `next` from the page before. For
    /// catalogues that must stay cheap however many objects a bucket holds.
    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        delimiter: Option<&'a str>,
        after: Option<&'a str>,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, OxError>>;
    /// Deletes `keys` (missing ones are not an error).
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>>;
    /// Every object under `prefix` with its size and age, in key order, and how many
    /// LIST requests that took. By default the keys alone (sizes and ages unknown: a
    /// collector deletes nothing by age there).
    fn list_info<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<ObjectInfo>, u64), OxError>> {
        Box::pin(async move {
            let keys = self.list(prefix).await?;
            let info = keys
                .into_iter()
                .map(|key| ObjectInfo {
                    key,
                    size: None,
                    modified: None,
                })
                .collect();
            Ok((info, 1))
        })
    }
}

/// An object as a listing shows it ([`ObjectStore::list_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes, if the listing gave it.
    pub size: Option<u64>,
    /// When it was last written (Unix seconds, the store's clock), if the listing gave
    /// it.
    pub modified: Option<u64>,
}

/// An object and its version tag ([`ObjectStore::get_tagged`]).
pub type Tagged = (Vec<u8>, Option<String>);

/// One page of a listing ([`ObjectStore::list_page`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Keys, in order.
    pub keys: Vec<String>,
    /// Common prefixes (each ends with the delimiter), in order.
    pub prefixes: Vec<String>,
    /// Where the next page begins (`None`: this was the last).
    pub next: Option<String>,
}

impl Listing {
    /// The last entry (key or prefix) in order.
    pub fn last(&self) -> Option<&str> {
        self.keys
            .last()
            .max(self.prefixes.last())
            .map(String::as_str)
    }
}

/// A page of `sorted` keys under `prefix` as [`ObjectStore::list_page`] gives it, for
/// stores that can list every key cheaply (the next page begins after the last entry).
pub fn page_of(
    sorted: &[String],
    prefix: &str,
    delimiter: Option<&str>,
    after: Option<&str>,
    max: usize,
) -> Listing {
    let max = max.max(1);
    let mut out = Listing::default();
    let mut taken = 0usize;
    let mut last: Option<String> = None;
    for key in sorted.iter().filter(|k| k.starts_with(prefix)) {
        let rest = &key[prefix.len()..];
        let entry = match delimiter.filter(|d| !d.is_empty()).and_then(|d| {
            rest.find(d)
                .map(|at| format!("{prefix}{}", &rest[..at + d.len()]))
        }) {
            Some(common) => common,
            None => key.clone(),
        };
        if after.is_some_and(|a| entry.as_str() <= a) || last.as_ref() == Some(&entry) {
            continue;
        }
        if taken == max {
            out.next = last.clone();
            break;
        }
        if entry == *key {
            out.keys.push(entry.clone());
        } else {
            out.prefixes.push(entry.clone());
        }
        taken += 1;
        last = Some(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_group_by_delimiter_and_go_on_where_they_stopped() {
        let keys: Vec<String> = ["a/1", "a/2", "b", "c/x/1", "c/y", "d/1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let top = page_of(&keys, "", Some("/"), None, 2);
        assert_eq!(top.prefixes, ["a/"]);
        assert_eq!(top.keys, ["b"]);
        let rest = page_of(&keys, "", Some("/"), top.next.as_deref(), 2);
        assert_eq!(rest.prefixes, ["c/", "d/"]);
        assert_eq!(rest.next, None);
        let under = page_of(&keys, "c/", Some("/"), None, 10);
        assert_eq!(
            (under.prefixes, under.keys),
            (vec!["c/x/".to_string()], vec!["c/y".to_string()])
        );
        let flat = page_of(&keys, "", None, Some("b"), 1);
        assert_eq!(flat.keys, ["c/x/1"]);
        assert_eq!(flat.next.as_deref(), Some("c/x/1"));
        assert_eq!(page_of(&keys, "", None, None, 0).keys.len(), 1);
    }
}
