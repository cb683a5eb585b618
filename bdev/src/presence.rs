//! `presence`: the on-disk record of which chunks of a clone are present locally, kept
//! crash-consistent so a restarted clone never fetches over bytes a host wrote.
//!
//! Two files: a checkpoint (`<path>`: every chunk's bit, replaced atomically by
//! temporary file, fsync, rename) and a log (`<path>.log`: records of chunk numbers
//! appended and fsynced since that checkpoint). Opening replays the log over the
//! checkpoint; a torn last record (a crash mid-append) is cut off, since nothing that
//! was waiting for it was told it was durable.
//!
//! Formats, little-endian:
//! - checkpoint: `OXPRS002`, chunk count (u64), bitmap words (u64 each), CRC32C (u32) of
//!   everything before it;
//! - log record: `0x4F58504C` ("OXPL"), count (u32), chunk numbers (u64 each), CRC32C
//!   (u32) of everything before it in the record.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::BdevError;
use crate::medium::{Medium, MediumFile};

const CHECKPOINT_MAGIC: &[u8; 8] = b"OXPRS002";
const RECORD_MAGIC: u32 = 0x4F58_504C;

/// The checkpoint and log of one clone's presence, owned by its journal thread.
pub(crate) struct PresenceFiles {
    medium: Arc<dyn Medium>,
    checkpoint: PathBuf,
    log: Box<dyn MediumFile>,
    log_len: u64,
    chunks: u64,
    /// A failed append left bytes that could not be cut off.
    torn: bool,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> BdevError {
    BdevError::Presence {
        path: path.display().to_string(),
        reason: format!("{what}: {e}"),
    }
}

fn damaged(path: &Path, reason: String) -> BdevError {
    BdevError::Presence {
        path: path.display().to_string(),
        reason,
    }
}

pub(crate) fn log_path(checkpoint: &Path) -> PathBuf {
    let mut p = checkpoint.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

/// Encodes a checkpoint of `words` for a clone of `chunks` chunks.
fn encode_checkpoint(chunks: u64, words: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + words.len() * 8);
    b.extend_from_slice(CHECKPOINT_MAGIC);
    b.extend_from_slice(&chunks.to_le_bytes());
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a checkpoint; an error names what is wrong with it.
fn decode_checkpoint(bytes: &[u8], chunks: u64) -> Result<Vec<u64>, String> {
    let words = chunks.div_ceil(64) as usize;
    if bytes.len() < 20 || &bytes[..8] != CHECKPOINT_MAGIC {
        return Err("not a presence checkpoint".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    let stored = u64::from_le_bytes(body[8..16].try_into().map_err(|_| "short header")?);
    if stored != chunks || body.len() != 16 + words * 8 {
        return Err(format!(
            "written for {stored} chunks, the clone has {chunks}"
        ));
    }
    Ok(body[16..]
        .chunks_exact(8)
        .map(|w| {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            u64::from_le_bytes(a)
        })
        .collect())
}

/// Replays log records over `words`; returns the length of the valid prefix.
fn replay(log: &[u8], chunks: u64, words: &mut [u64]) -> usize {
    let mut at = 0;
    loop {
        let rest = &log[at..];
        if rest.len() < 12 {
            return at;
        }
        let magic = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let count = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let len = 8 + count * 8 + 4;
        if magic != RECORD_MAGIC || rest.len() < len {
            return at;
        }
        let (body, crc) = rest[..len].split_at(len - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return at;
        }
        for c in body[8..].chunks_exact(8) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            let chunk = u64::from_le_bytes(a);
            if chunk < chunks
                && let Some(w) = words.get_mut((chunk / 64) as usize)
            {
                *w |= 1 << (chunk % 64);
            }
        }
        at += len;
    }
}

/// Writes a new presence record at `path` saying the chunks set in `present` (bit
/// `c % 64` of word `c / 64`) of a clone of `chunks` chunks are present, durably: for a
/// local copy made whole by other means (seeded from a volume that holds those chunks'
/// bytes) before the clone first opens it. Refused if a record is there already.
pub fn seed_presence(path: &Path, chunks: u64, present: &[u64]) -> Result<(), BdevError> {
    let words = chunks.div_ceil(64) as usize;
    if present.len() != words {
        return Err(damaged(
            path,
            format!(
                "{} words of presence for {chunks} chunks, not {words}",
                present.len()
            ),
        ));
    }
    let log = log_path(path);
    if path.exists() || log.exists() {
        return Err(damaged(path, "a presence record is there already".into()));
    }
    // Bits past the last chunk stay clear, as the checkpoint's readers expect.
    let mut present = present.to_vec();
    if !chunks.is_multiple_of(64)
        && let Some(last) = present.last_mut()
    {
        *last &= (1 << (chunks % 64)) - 1;
    }
    crate::fsutil::replace_file(path, &encode_checkpoint(chunks, &present))
        .map_err(|e| io_err(path, "writing the checkpoint", e))
}

impl PresenceFiles {
    /// Opens (or creates) the presence record at `path` for a clone of `chunks`
    /// chunks and returns it with the present set. A damaged checkpoint is an error,
    /// never an empty set: the clone could otherwise fetch over written bytes.
    pub(crate) fn open(
        medium: Arc<dyn Medium>,
        path: &Path,
        chunks: u64,
    ) -> Result<(Self, Vec<u64>), BdevError> {
        let mut words = match medium.read(path) {
            Ok(bytes) => decode_checkpoint(&bytes, chunks).map_err(|r| damaged(path, r))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                vec![0; chunks.div_ceil(64) as usize]
            }
            Err(e) => return Err(io_err(path, "reading the checkpoint", e)),
        };
        let lp = log_path(path);
        let mut log = medium
            .open(&lp, false)
            .map_err(|e| io_err(&lp, "opening the log", e))?;
        let bytes = log
            .read_all()
            .map_err(|e| io_err(&lp, "reading the log", e))?;
        let valid = replay(&bytes, chunks, &mut words) as u64;
        // Cut a torn tail so new records follow the last good one.
        if valid != bytes.len() as u64 {
            log.set_len(valid)
                .and_then(|()| log.sync())
                .map_err(|e| io_err(&lp, "cutting a torn record", e))?;
        }
        // The log's name (if it was made now) must outlive a crash before the first
        // record in it is trusted to.
        medium
            .sync_dir(&lp)
            .map_err(|e| io_err(&lp, "syncing its directory", e))?;
        Ok((
            Self {
                medium,
                checkpoint: path.to_path_buf(),
                log,
                log_len: valid,
                chunks,
                torn: false,
            },
            words,
        ))
    }

    /// Appends `chunks` as present and makes the record durable.
    pub(crate) fn append(&mut self, chunks: &[u64]) -> Result<(), BdevError> {
        let mut rec = Vec::with_capacity(12 + chunks.len() * 8);
        rec.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
        for c in chunks {
            rec.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32c::crc32c(&rec);
        rec.extend_from_slice(&crc.to_le_bytes());
        let lp = log_path(&self.checkpoint);
        let written = self
            .log
            .write_at(self.log_len, &rec)
            .and_then(|()| self.log.sync_data());
        if let Err(e) = written {
            // Cut whatever part of the record got out, so the next record follows the
            // last good one; if even that fails, the next commit writes a checkpoint.
            self.torn = self.log.set_len(self.log_len).is_err();
            return Err(io_err(&lp, "appending", e));
        }
        self.log_len += rec.len() as u64;
        Ok(())
    }

    /// Whether the next commit must be a checkpoint: the log has grown past the size
    /// of one, or a failed append could not be cut off.
    pub(crate) fn wants_checkpoint(&self) -> bool {
        self.torn || self.log_len > (self.chunks / 8).max(1 << 20)
    }

    /// Replaces the checkpoint with `words` and empties the log.
    pub(crate) fn checkpoint(&mut self, words: &[u64]) -> Result<(), BdevError> {
        let path = &self.checkpoint;
        crate::medium::replace_file(&*self.medium, path, &encode_checkpoint(self.chunks, words))
            .map_err(|e| io_err(path, "writing the checkpoint", e))?;
        let lp = log_path(path);
        self.log
            .set_len(0)
            .and_then(|()| self.log.sync())
            .map_err(|e| io_err(&lp, "emptying the log", e))?;
        self.log_len = 0;
        self.torn = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_record_opens_with_its_chunks_present_and_is_made_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        assert!(
            seed_presence(&path, 130, &[1, 2]).is_err(),
            "130 chunks take 3 words"
        );
        // Bits past the last chunk are dropped.
        seed_presence(&path, 130, &[u64::MAX, 0, u64::MAX]).unwrap();
        assert!(seed_presence(&path, 130, &[0, 0, 0]).is_err(), "made once");
        let (mut f, words) = PresenceFiles::open(crate::medium::local(), &path, 130).unwrap();
        assert_eq!(words, vec![u64::MAX, 0, 0b11]);
        f.append(&[64]).unwrap();
        drop(f);
        let (_, words) = PresenceFiles::open(crate::medium::local(), &path, 130).unwrap();
        assert_eq!(words, vec![u64::MAX, 1, 0b11]);
    }

    #[test]
    fn the_log_replays_over_the_checkpoint_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let (mut f, words) = PresenceFiles::open(crate::medium::local(), &path, 130).unwrap();
        assert_eq!(words, vec![0, 0, 0]);
        f.append(&[0, 65]).unwrap();
        f.checkpoint(&[1, 2, 0]).unwrap();
        f.append(&[129, 5000]).unwrap();
        f.append(&[3]).unwrap();
        drop(f);
        // A torn third record: half of one more append.
        let lp = log_path(&path);
        let mut log = std::fs::read(&lp).unwrap();
        let good = log.len();
        log.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        log.extend_from_slice(&7u32.to_le_bytes());
        log.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&lp, &log).unwrap();
        let (mut f, words) = PresenceFiles::open(crate::medium::local(), &path, 130).unwrap();
        assert_eq!(
            words,
            vec![1 | 1 << 3, 2, 1 << 1],
            "chunk 5000 is out of range"
        );
        assert_eq!(std::fs::metadata(&lp).unwrap().len() as usize, good);
        f.append(&[64]).unwrap();
        drop(f);
        let (_, words) = PresenceFiles::open(crate::medium::local(), &path, 130).unwrap();
        assert_eq!(words, vec![1 | 1 << 3, 3, 1 << 1]);
    }

    #[test]
    fn a_damaged_or_foreign_checkpoint_is_an_error_not_an_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let (mut f, _) = PresenceFiles::open(crate::medium::local(), &path, 100).unwrap();
        f.checkpoint(&[7, 0]).unwrap();
        drop(f);
        let err = PresenceFiles::open(crate::medium::local(), &path, 200)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("written for 100 chunks"), "{err}");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[17] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = PresenceFiles::open(crate::medium::local(), &path, 100)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("checksum"), "{err}");
    }
}
