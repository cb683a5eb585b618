//! Small file-system helpers shared by the local state files (change tracking, clone
//! presence, snapshot journals), on the real file system (see [`crate::medium`] for
//! the same on any medium).

use std::path::Path;

use crate::medium::{Local, Medium};

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it is
/// written and fsynced, renamed over `path`, and the directory fsynced, so a crash
/// leaves either the old contents or the new, never a mixture.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::medium::replace_file(&Local, path, bytes)
}

/// Removes `path` durably (a missing file is not an error).
pub fn remove_file(path: &Path) -> std::io::Result<()> {
    crate::medium::remove_file(&Local, path)
}

/// Fsyncs the directory holding `path`, making a rename or unlink in it durable.
pub fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    Local.sync_dir(path)
}

/// Copies file `from` into a new file `to` of the same length: only its data extents
/// (`SEEK_DATA`/`SEEK_HOLE`), so holes stay holes and a sparse file costs what it
/// holds; `copy_file_range` lets the file system share the blocks where it can. `to`
/// and its name are made durable. Returns the bytes copied.
pub fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<u64> {
    use rustix::fs::SeekFrom;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len)?;
    let mut copied = 0;
    let mut pos = 0;
    while pos < len {
        let data = match rustix::fs::seek(&src, SeekFrom::Data(pos)) {
            Ok(at) => at,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(&src, SeekFrom::Hole(data))?.min(len);
        let (mut at_in, mut at_out) = (data, data);
        while at_in < end {
            let want = usize::try_from(end - at_in)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n =
                rustix::fs::copy_file_range(&src, Some(&mut at_in), &dst, Some(&mut at_out), want)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} ended at {at_in} while copying", from.display()),
                ));
            }
            copied += n as u64;
        }
        pos = end;
    }
    dst.sync_all()?;
    sync_dir_of(to)?;
    Ok(copied)
}
