//! A running snapshot's journal: what it has stored so far, kept on local media so a
//! snapshot cut short by a restart or a crash continues where it was, with the same
//! point in time, snapshot ID and data key (see `docs/FORMAT.md`, "Local state").
//!
//! Two files: `<path>` (JSON, replaced atomically at each checkpoint) and
//! `<path>.changed` (the chunks the snapshot must store, written once when it begins).
//! A checkpoint is written only when every data object it names is in the store, so
//! the chunks before `next_chunk` never need reading again.

use std::path::{Path, PathBuf};

use bdev::ChangedChunks;
use serde::{Deserialize, Serialize};

use crate::error::OxError;
use crate::keys::WrappedKey;

/// The journal's current version.
pub const JOURNAL_VERSION: u32 = 1;

/// Everything a snapshot needs to continue: its identity and settings, and how far
/// its stored index reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// The object store it writes to (as the caller names it).
    pub store: String,
    /// Volume ID (hex), bound into every frame.
    pub volume: String,
    /// Snapshot ID (hex).
    pub snapshot: String,
    /// The volume's token for this snapshot's copy-before-write copies (hex).
    pub token: String,
    /// Manifest key of the parent snapshot, if incremental.
    pub parent: Option<String>,
    /// Key prefix in the store.
    pub prefix: String,
    /// zstd level.
    pub zstd_level: i32,
    /// The snapshot's data key, wrapped by a key-encryption key (never in the clear).
    pub key: Option<WrappedKey>,
    /// Index salt (hex).
    pub index_salt: String,
    /// Nonce prefixes (hex) the snapshot's encoders have used: a continuing encoder
    /// takes another, so no nonce repeats under the data key.
    pub nonce_prefixes: Vec<String>,
    /// Chunks before this are stored and indexed.
    pub next_chunk: u64,
    /// Data objects stored, in order.
    pub objects: Vec<String>,
    /// Index pages stored.
    pub pages: u64,
    /// Bytes of index pages stored.
    pub index_bytes: u64,
    /// Of the first `pages`, those not stored because they hold nothing (ranges of
    /// page numbers, as the manifest's `empty_pages`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_pages: Vec<[u64; 2]>,
    /// Entries (hex, as in an index page) of the page being built: chunks from
    /// `pages × PAGE_CHUNKS` to `next_chunk`.
    pub page_entries: String,
    /// Chunks stored as frames so far.
    pub stored_chunks: u64,
    /// Bytes of data objects stored so far.
    pub uploaded: u64,
    /// Chunks read from the volume so far.
    pub chunks_read: u64,
}

fn changed_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".changed");
    PathBuf::from(p)
}

impl Journal {
    /// Loads the journal at `path` and its change set for a volume of `chunks` chunks:
    /// `None` if there is none; an error if it is damaged or unreadable.
    pub fn load(path: &Path, chunks: u64) -> Result<Option<(Self, ChangedChunks)>, OxError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OxError::io(path, e)),
        };
        let journal: Self = serde_json::from_slice(&bytes)
            .map_err(|e| OxError::Format(format!("snapshot journal {}: {e}", path.display())))?;
        if journal.version != JOURNAL_VERSION {
            return Err(OxError::Format(format!(
                "snapshot journal {}: version {} is not {JOURNAL_VERSION}",
                path.display(),
                journal.version
            )));
        }
        let cp = changed_path(path);
        let changed = load_changed(path, chunks).ok_or_else(|| {
            OxError::Format(format!(
                "snapshot journal {}: missing, damaged, or for another volume size",
                cp.display()
            ))
        })?;
        Ok(Some((journal, changed)))
    }

    /// Saves the change set a new snapshot stores (before its first checkpoint).
    pub fn save_changed(path: &Path, changed: &ChangedChunks, chunks: u64) -> Result<(), OxError> {
        let cp = changed_path(path);
        bdev::fsutil::replace_file(&cp, &changed.to_bytes(chunks)).map_err(|e| OxError::io(&cp, e))
    }

    /// Replaces the journal at `path` with this one, durably.
    pub fn save(&self, path: &Path) -> Result<(), OxError> {
        let bytes = serde_json::to_vec(self)
            .map_err(|e| OxError::Format(format!("snapshot journal: {e}")))?;
        bdev::fsutil::replace_file(path, &bytes).map_err(|e| OxError::io(path, e))
    }

    /// The token (see `bdev::VolumeHandle::resume_snapshot`).
    pub fn token(&self) -> Result<[u8; 16], OxError> {
        crate::format::parse_id(&self.token)
    }
}

/// The change set beside the journal at `path`, if it is whole — even when the journal
/// itself is not: a snapshot that cannot continue must still give its changes back.
pub fn load_changed(path: &Path, chunks: u64) -> Option<ChangedChunks> {
    let bytes = std::fs::read(changed_path(path)).ok()?;
    ChangedChunks::from_bytes(&bytes, chunks)
}

/// What a snapshot that will not continue gives back to `handle`'s change tracking:
/// the change set beside its journal at `path`, or every chunk if that is unreadable.
pub fn changes_or_all(path: &Path, handle: &bdev::VolumeHandle) -> ChangedChunks {
    load_changed(path, handle.chunks()).unwrap_or_else(|| {
        let mut all = handle.changes();
        all.mark_all();
        all
    })
}

/// Removes the journal at `path` (nothing there is not an error): its change set first,
/// so a removal that fails half-way leaves a journal that does not load (whoever finds
/// it gives every chunk back), never a change set without its journal (which nothing
/// would give back).
pub fn remove(path: &Path) -> Result<(), OxError> {
    let cp = changed_path(path);
    bdev::fsutil::remove_file(&cp).map_err(|e| OxError::io(&cp, e))?;
    bdev::fsutil::remove_file(path).map_err(|e| OxError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            store: "s3".into(),
            volume: "11".repeat(16),
            snapshot: "22".repeat(16),
            token: "33".repeat(16),
            parent: None,
            prefix: "v/".into(),
            zstd_level: 3,
            key: None,
            index_salt: "44".repeat(16),
            nonce_prefixes: vec!["01020304".into()],
            next_chunk: 5,
            objects: vec!["v/ox1/d/x".into()],
            pages: 0,
            index_bytes: 0,
            empty_pages: Vec::new(),
            page_entries: "00".repeat(100),
            stored_chunks: 1,
            uploaded: 100,
            chunks_read: 5,
        }
    }

    /// A change set of 100 chunks (0 and 99 changed), in the tracking layout.
    fn change_set() -> ChangedChunks {
        let mut b = b"OXCBT001".to_vec();
        b.extend_from_slice(&100u64.to_le_bytes());
        b.push(0);
        b.extend_from_slice(&[0; 16]);
        for w in [1u64, 1 << 35] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        ChangedChunks::from_bytes(&b, 100).unwrap()
    }

    #[test]
    fn a_journal_round_trips_and_every_kind_of_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.snapshot");
        assert!(Journal::load(&path, 100).unwrap().is_none(), "none yet");
        let changed = change_set();
        assert!(changed.contains(0) && changed.contains(99) && changed.count() == 2);
        Journal::save_changed(&path, &changed, 100).unwrap();
        let j = sample();
        j.save(&path).unwrap();
        let (back, c) = Journal::load(&path, 100).unwrap().unwrap();
        assert_eq!(back, j);
        assert_eq!(c, changed);
        assert_eq!(back.token().unwrap(), [0x33; 16]);
        // Another volume size: the change set does not fit.
        assert!(Journal::load(&path, 200).is_err());
        // Truncated, garbage, an unknown field, another version: errors, not panics.
        let text = std::fs::read_to_string(&path).unwrap();
        for bad in [
            text[..text.len() / 2].to_string(),
            "\u{0}\u{1}garbage".to_string(),
            text.replacen("\"store\"", "\"unknown\":1,\"store\"", 1),
            text.replacen("\"version\":1", "\"version\":99", 1),
        ] {
            std::fs::write(&path, &bad).unwrap();
            assert!(Journal::load(&path, 100).is_err(), "{bad:.60}");
        }
        // The change set survives a damaged journal, and goes with it on removal.
        assert_eq!(load_changed(&path, 100), Some(changed));
        remove(&path).unwrap();
        assert!(!path.exists() && load_changed(&path, 100).is_none());
        remove(&path).unwrap();
    }
}
