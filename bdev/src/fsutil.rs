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
