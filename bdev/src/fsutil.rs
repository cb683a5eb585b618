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
        let mut at = data;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(usize::MAX).min(1 << 30);
            let (mut at_in, mut at_out) = (at, at);
            let n = match rustix::fs::copy_file_range(
                &src,
                Some(&mut at_in),
                &dst,
                Some(&mut at_out),
                want,
            ) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                // Not between these files here (another file system, or one that
                // cannot): copy through memory.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::INVAL,
                ) => copy_through_memory(&src, &dst, at, want)?,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} ended at {at} while copying", from.display()),
                ));
            }
            at += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    dst.sync_all()?;
    sync_dir_of(to)?;
    Ok(copied)
}

/// Copies up to `len` bytes at `at` from `src` to the same place in `dst` by reading
/// and writing (up to 1 MiB); returns how many (0 at the end of `src`).
fn copy_through_memory(
    src: &std::fs::File,
    dst: &std::fs::File,
    at: u64,
    len: usize,
) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20)];
    let n = src.read_at(&mut buf, at)?;
    dst.write_all_at(&buf[..n], at)?;
    Ok(n)
}

/// Makes `len` bytes at `offset` of `file` read as zeroes: a hole punched where the
/// file system can, else zeroes written. The file keeps its length; not synced.
pub fn zero_range(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::FallocateFlags;
    use std::os::unix::fs::FileExt;
    match rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_sparse_copy_keeps_data_and_holes_and_a_zeroed_range_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        f.write_all_at(&[9u8; 100], (8 << 20) - 100).unwrap();
        drop(f);
        let copied = copy_sparse(&from, &to).unwrap();
        assert!(copied < 2 << 20, "holes are not copied: {copied}");
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        // A copy never goes over an existing file.
        assert!(copy_sparse(&from, &to).is_err());

        let t = std::fs::OpenOptions::new().write(true).open(&to).unwrap();
        zero_range(&t, 1 << 20, 4096).unwrap();
        drop(t);
        let after = std::fs::read(&to).unwrap();
        assert_eq!(after.len(), 8 << 20);
        assert!(after[(1 << 20)..(1 << 20) + 4096].iter().all(|&b| b == 0));
        assert_eq!(&after[(8 << 20) - 100..], &[9u8; 100][..]);
    }
}
