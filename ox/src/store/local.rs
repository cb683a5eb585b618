//! A local directory as an object store: the embedded default. Objects are files under
//! the root; publication is atomic (write to a temporary file, fsync, rename, fsync the
//! directory), so a crash leaves either the old object or the new one.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use super::{BoxFuture, Listing, ObjectStore};
use crate::error::OxError;

/// Objects in a directory.
pub struct LocalStore {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OxError + '_ {
    move |source| OxError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl LocalStore {
    /// A store rooted at `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, OxError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io(&root))?;
        Ok(Self { root })
    }

    /// The file of `key`; keys with `..`, absolute parts or empty segments are refused.
    fn path(&self, key: &str) -> Result<PathBuf, OxError> {
        let p = Path::new(key);
        let clean = !key.is_empty()
            && !key.contains("//")
            && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !clean {
            return Err(OxError::Config(format!(
                "object key {key:?} is not a plain relative path"
            )));
        }
        Ok(self.root.join(p))
    }

    fn write(&self, key: &str, data: &[u8], exclusive: bool) -> Result<(), OxError> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        if exclusive && path.exists() {
            return Err(OxError::AlreadyExists { key: key.into() });
        }
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            hex::encode(crate::format::random_id()?)
        ));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
            if exclusive {
                // hard_link fails if the target exists: an atomic create-if-absent.
                fs::hard_link(&tmp, &path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        OxError::AlreadyExists { key: key.into() }
                    } else {
                        io(&path)(e)
                    }
                })?;
                fs::remove_file(&tmp).map_err(io(&tmp))?;
            } else {
                fs::rename(&tmp, &path).map_err(io(&path))?;
            }
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&dir))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn read_range(&self, key: &str, offset: u64, len: Option<u64>) -> Result<Vec<u8>, OxError> {
        let path = self.path(key)?;
        let mut f = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                OxError::NotFound { key: key.into() }
            } else {
                io(&path)(e)
            }
        })?;
        let size = f.metadata().map_err(io(&path))?.len();
        let end = len.map_or(size, |l| offset.saturating_add(l).min(size));
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        f.seek(SeekFrom::Start(offset)).map_err(io(&path))?;
        f.read_exact(&mut out).map_err(io(&path))?;
        Ok(out)
    }

    fn list_sync(&self, prefix: &str) -> Result<Vec<String>, OxError> {
        let mut out = Vec::new();
        // Only the directory the prefix names is walked, not the whole store.
        let dir = match prefix.rfind('/') {
            Some(at) => self
                .path(&prefix[..at])
                .unwrap_or_else(|_| self.root.clone()),
            None => self.root.clone(),
        };
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io(&dir))?;
                let path = entry.path();
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(".tmp-") {
                    continue;
                }
                if entry.file_type().map_err(io(&path))?.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(&self.root) {
                    let key = rel.to_string_lossy().into_owned();
                    if key.starts_with(prefix) {
                        out.push(key);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

impl ObjectStore for LocalStore {
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
        Box::pin(async move { self.write(key, &data, false) })
    }

    fn put_shared<'a>(
        &'a self,
        key: &'a str,
        data: bytes::Bytes,
    ) -> BoxFuture<'a, Result<(), OxError>> {
        Box::pin(async move { self.write(key, &data, false) })
    }

    fn put_new<'a>(&'a self, key: &'a str, data: Vec<u8>) -> BoxFuture<'a, Result<(), OxError>> {
        Box::pin(async move { self.write(key, &data, true) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
        Box::pin(async move { self.read_range(key, 0, None) })
    }

    fn get_range<'a>(
        &'a self,
        key: &'a str,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, OxError>> {
        Box::pin(async move { self.read_range(key, offset, Some(len)) })
    }

    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        delimiter: Option<&'a str>,
        after: Option<&'a str>,
        max: usize,
    ) -> BoxFuture<'a, Result<Listing, OxError>> {
        Box::pin(async move {
            let all = self.list_sync(prefix)?;
            Ok(super::page_of(&all, prefix, delimiter, after, max))
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, OxError>> {
        Box::pin(async move { self.list_sync(prefix) })
    }

    fn list_info<'a>(
        &'a self,
        prefix: &'a str,
    ) -> BoxFuture<'a, Result<(Vec<super::ObjectInfo>, u64), OxError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for key in self.list_sync(prefix)? {
                let path = self.path(&key)?;
                let meta = match fs::metadata(&path) {
                    Ok(m) => m,
                    // Deleted since the listing.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(&path)(e)),
                };
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                out.push(super::ObjectInfo {
                    key,
                    size: Some(meta.len()),
                    modified,
                });
            }
            Ok((out, 1))
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<(), OxError>> {
        Box::pin(async move {
            for key in keys {
                let path = self.path(key)?;
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&path)(e)),
                }
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_store_puts_gets_lists_deletes_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        async_io::block_on(async {
            s.put("a/b/1", b"hello".to_vec()).await.unwrap();
            s.put("a/b/2", b"world!".to_vec()).await.unwrap();
            assert_eq!(s.get("a/b/1").await.unwrap(), b"hello");
            assert_eq!(s.get_range("a/b/2", 2, 3).await.unwrap(), b"rld");
            assert_eq!(s.get_range("a/b/2", 4, 100).await.unwrap(), b"d!");
            assert_eq!(s.list("a/").await.unwrap(), vec!["a/b/1", "a/b/2"]);
            assert!(matches!(
                s.put_new("a/b/1", vec![1]).await,
                Err(OxError::AlreadyExists { .. })
            ));
            s.put_new("a/b/3", vec![1]).await.unwrap();
            s.delete(&["a/b/1".into(), "missing".into()]).await.unwrap();
            assert!(matches!(
                s.get("a/b/1").await,
                Err(OxError::NotFound { .. })
            ));
            for bad in ["../x", "/etc/passwd", "a//b", ""] {
                assert!(s.get(bad).await.is_err(), "{bad}");
            }
        });
        // No temporary files left behind.
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
        out
    }
}
