//! A store that keeps everything but the data objects, which it drops: the
//! snapshot path's own limit (reading, encoding, packing, indexing), without a store's
//! writes or a test machine's first touch of fresh pages in the figure.

use ox::OxError;
use ox::store::local::LocalStore;
use ox::store::{BoxFuture, Listing, ObjectStore};

pub struct SinkStore {
    pub kept: LocalStore,
}

impl SinkStore {
    fn drops(&self, key: &str) -> bool {
        key.contains("ox1/d/")
    }
}

impl ObjectStore for SinkStore {
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
        if self.drops(key) {
            return Box::pin(async { Ok(()) });
        }
        self.kept.put(key, data)
    }

    fn put_shared<'a>(
        &'a self,
        key: &'a str,
        data: bytes::Bytes,
    ) -> BoxFuture<'a, Result<(), OxError>> {
        if self.drops(key) {
            return Box::pin(async { Ok(()) });
        }
        self.kept.put_shared(key, data)
    }

    fn put_new<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
        if self.drops(key) {
            return Box::pin(async { Ok(()) });
        }
        self.kept.put_new(key, data)
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
        self.kept.get(key)
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
        self.kept.get_range(key, offset, len)
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>> {
        self.kept.list(prefix)
    }

    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        delimiter: Option<&'a str>,
        after: Option<&'a str>,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, OxError>> {
        self.kept.list_page(prefix, delimiter, after, max)
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>> {
        self.kept.delete(keys)
    }
}
