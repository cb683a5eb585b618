//! Object stores behind one trait: S3 (any S3-compatible service) and a local
//! directory (the embedded default). Methods return futures run by an OX core's
//! executor, never on a reactor.

pub mod check;
pub mod http;
pub mod local;
pub mod retries;
pub mod s3;
mod sigv4;

use std::future::Future;
use std::pin::Pin;

use crate::error::OxError;

/// A boxed, single-threaded future (OX cores run a local executor).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// An object store.
pub trait ObjectStore {
    /// Stores `data` under `key`, replacing any object there.
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>>;
    /// Stores `data` under `key` only if nothing is there
    /// ([`OxError::AlreadyExists`] otherwise) — where the store can tell.
    fn put_new<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>>;
    /// The whole object.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>>;
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
    /// Keys starting with `prefix`, sorted.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>>;
    /// Deletes `keys` (missing ones are not an error).
    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>>;
}
