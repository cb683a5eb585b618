//! `medium`: where the local state files live (clone presence records, volume change
//! records), reached through the few POSIX operations their crash-consistency
//! protocols use, so that a power-cut test can put them on a medium that loses what
//! was never synced ([`crate::NonDurableMedium`]) and check the protocols themselves.
//!
//! [`Local`] is the real file system. A protocol must assume, as POSIX does, that a
//! write is durable only after its file is synced, and that a created, renamed or
//! removed name is durable only after its directory is synced.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A file system holding local state files.
pub trait Medium: Send + Sync {
    /// The whole contents of `path` (`NotFound` if there is no such file).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether `path` names a file.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Opens `path` for reading and writing, creating it empty if it is missing
    /// (`truncate`: empties it if it is there).
    fn open(&self, path: &Path, truncate: bool) -> io::Result<Box<dyn MediumFile>>;
    /// Renames `from` over `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes `path` (`NotFound` if there is no such file).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the names in the directory holding `path` durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
}

/// An open file of a [`Medium`].
pub trait MediumFile: Send {
    /// The whole contents.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    /// Writes `bytes` at `offset` (the file grows, with zeroes, if it must).
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes the contents and length durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Makes the contents durable, and the length (`fdatasync`): no other metadata.
    fn sync_data(&mut self) -> io::Result<()> {
        self.sync()
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

/// The real file system, shared.
pub fn local() -> Arc<dyn Medium> {
    Arc::new(Local)
}

impl Medium for Local {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn open(&self, path: &Path, truncate: bool) -> io::Result<Box<dyn MediumFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(truncate)
            .open(path)?;
        Ok(Box::new(file))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }
}

impl MediumFile for File {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let len = self.metadata()?.len();
        let mut bytes = vec![0; usize::try_from(len).map_err(io::Error::other)?];
        self.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.write_all_at(bytes, offset)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }

    fn sync_data(&mut self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// Replaces `path` with `bytes` atomically and durably on `medium`: a temporary file
/// beside it is written and synced, renamed over `path`, and the directory synced, so
/// a crash leaves either the old contents or the new, never a mixture.
pub fn replace_file(medium: &dyn Medium, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = medium.open(&tmp, true)?;
    f.write_at(0, bytes)?;
    f.sync()?;
    drop(f);
    medium.rename(&tmp, path)?;
    medium.sync_dir(path)
}

/// Removes `path` durably from `medium` (a missing file is not an error).
pub fn remove_file(medium: &dyn Medium, path: &Path) -> io::Result<()> {
    match medium.remove(path) {
        Ok(()) => medium.sync_dir(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
