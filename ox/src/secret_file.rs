//! Reading secret files (key-encryption keys, S3 secret keys, the control token,
//! DH-HMAC-CHAP secrets) the way ssh reads its keys: a regular file, not reached
//! through a symbolic link, owned by this user or root, that no one else may read or
//! write. The checks are made on the file opened, not on its name, so the file cannot
//! be swapped between the check and the read.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The name is a symbolic link.
    #[error("secret {0} is a symbolic link: refused (name the file itself)")]
    SymbolicLink(PathBuf),
    /// A directory, device, socket or pipe.
    #[error("secret {0} is not a regular file")]
    NotAFile(PathBuf),
    /// Group or others may read or write it.
    #[error("secret {path} is readable or writable by others (mode {mode:o}): chmod 600 it")]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Someone else owns it.
    #[error("secret {path} belongs to uid {owner}, not to this user ({me}) or root")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        me: u32,
    },
    /// Larger than any secret.
    #[error("secret {0} is larger than 64 KiB: not a secret file")]
    TooLarge(PathBuf),
    /// Not UTF-8 text.
    #[error("secret {0} is not text")]
    NotText(PathBuf),
    /// Opening or reading failed.
    #[error("reading secret {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Largest secret file read: every secret this appliance knows is far smaller.
const MAX_LEN: u64 = 64 << 10;

/// Reads the secret file `path` after checking it (see the module doc); returns its
/// text as written (callers trim or parse it).
pub fn read(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SecretFileError::SymbolicLink(path.to_path_buf()));
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile(path.to_path_buf()));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(SecretFileError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_LEN + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_LEN {
        return Err(SecretFileError::TooLarge(path.to_path_buf()));
    }
    String::from_utf8(bytes).map_err(|_| SecretFileError::NotText(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "k", "secret\n", 0o600);
        assert_eq!(read(&p).unwrap(), "secret\n");
        let p = write(dir.path(), "r", "secret", 0o400);
        assert_eq!(read(&p).unwrap(), "secret");
    }

    #[test]
    fn group_or_world_access_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            let p = write(dir.path(), "k", "secret", mode);
            match read(&p) {
                Err(SecretFileError::Mode { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o}: {other:?}"),
            }
        }
    }

    #[test]
    fn links_directories_and_large_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = write(dir.path(), "k", "secret", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(read(&link), Err(SecretFileError::SymbolicLink(_))));
        let sub = dir.path().join("d");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(read(&sub), Err(SecretFileError::NotAFile(_))));
        let big = write(dir.path(), "big", &"x".repeat(70_000), 0o600);
        assert!(matches!(read(&big), Err(SecretFileError::TooLarge(_))));
        let missing = dir.path().join("missing");
        let e = read(&missing).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
