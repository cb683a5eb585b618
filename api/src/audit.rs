//! The audit log: append-only JSON lines, each carrying the SHA-256 of the one before,
//! so changing, removing, inserting or reordering any entry breaks the chain from
//! there on and [`verify`] names the first line that does not fit.
//!
//! An entry's hash covers the previous entry's hash and the entry's own fields in a
//! fixed order (`seq`, `time_ms`, `caller`, `action`, `detail`, `result`, `prev`), as
//! compact JSON with object keys sorted. Every append is fsynced before the operation
//! it records is answered. Removing entries from the *end* leaves a valid shorter
//! chain; ship the log off the machine (journald, a collector) to detect that too.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be read or written.
    #[error("audit log {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The chain is broken at a line.
    #[error("audit log {path}, line {line}: {reason}")]
    Broken {
        /// The file.
        path: String,
        /// 1-based line number.
        line: u64,
        /// What does not fit.
        reason: String,
    },
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// 1, 2, ... without gaps.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Who asked (e.g. "uid=0 pid=4242", "config", "nvmf host nqn...").
    pub caller: String,
    /// What (an API method, "start", "stop", "key_use", "host_connect", ...).
    pub action: String,
    /// Parameters, with secrets left out by the caller.
    pub detail: serde_json::Value,
    /// "ok", or "error: ..." / "denied: ...".
    pub result: String,
    /// Hash of the previous entry (hex), [`GENESIS`] for the first.
    pub prev: String,
    /// SHA-256 (hex) of `prev` and the fields above.
    pub hash: String,
}

impl Entry {
    fn digest(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            seq: u64,
            time_ms: u64,
            caller: &'a str,
            action: &'a str,
            detail: &'a serde_json::Value,
            result: &'a str,
            prev: &'a str,
        }
        let body = Body {
            seq: self.seq,
            time_ms: self.time_ms,
            caller: &self.caller,
            action: &self.action,
            detail: &self.detail,
            result: &self.result,
            prev: &self.prev,
        };
        // Serialising plain strings, integers and a Value cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.prev.as_bytes());
        ctx.update(&bytes);
        hex::encode(ctx.finish())
    }
}

/// An open audit log, appended to by any thread.
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<Tail>,
}

struct Tail {
    file: File,
    seq: u64,
    hash: String,
}

fn io(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path` and checks its chain; new
    /// entries follow the last one. A broken chain is an error: the operator decides
    /// (keep the file as evidence, start a new one).
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let (seq, hash) = match File::open(path) {
            Ok(_) => {
                cut_torn_tail(path)?;
                verify(path)?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, GENESIS.to_string()),
            Err(e) => return Err(io(path, e)),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io(dir, e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode_0600()
            .open(path)
            .map_err(|e| io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new(Tail { file, seq, hash }),
        })
    }

    /// Appends an entry and makes it durable; returns it.
    pub fn record(
        &self,
        caller: &str,
        action: &str,
        detail: serde_json::Value,
        result: &str,
    ) -> Result<Entry, AuditError> {
        let mut tail = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = Entry {
            seq: tail.seq + 1,
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            caller: caller.to_string(),
            action: action.to_string(),
            detail,
            result: result.to_string(),
            prev: tail.hash.clone(),
            hash: String::new(),
        };
        entry.hash = entry.digest();
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        let before = tail
            .file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| io(&self.path, e))?;
        if let Err(e) = tail
            .file
            .write_all(&line)
            .and_then(|()| tail.file.sync_data())
        {
            // Take back whatever part got out, so the chain stays whole for the next
            // entry (an append-mode file writes at the end whatever the offset).
            let _ = tail.file.set_len(before);
            return Err(io(&self.path, e));
        }
        tail.seq = entry.seq;
        tail.hash.clone_from(&entry.hash);
        Ok(entry)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// Cuts an unterminated last line: an entry whose write a crash interrupted (entries
/// are only acknowledged once written whole, newline included). Said in the log.
fn cut_torn_tail(path: &Path) -> Result<(), AuditError> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(());
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tracing::warn!(
        "audit log {}: cutting {} bytes of an entry a crash left unfinished",
        path.display(),
        bytes.len() - keep
    );
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    f.set_len(keep as u64)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Checks the whole chain of the log at `path`; returns the last sequence number and
/// hash, or the first line that breaks it.
pub fn verify(path: &Path) -> Result<(u64, String), AuditError> {
    let file = File::open(path).map_err(|e| io(path, e))?;
    let broken = |line: u64, reason: String| AuditError::Broken {
        path: path.display().to_string(),
        line,
        reason,
    };
    let (mut seq, mut hash) = (0u64, GENESIS.to_string());
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| io(path, e))?;
        let entry: Entry = serde_json::from_str(&line)
            .map_err(|e| broken(n, format!("not an audit entry: {e}")))?;
        if entry.seq != seq + 1 {
            return Err(broken(n, format!("sequence {} follows {seq}", entry.seq)));
        }
        if entry.prev != hash {
            return Err(broken(n, "does not follow the entry before it".into()));
        }
        if entry.digest() != entry.hash {
            return Err(broken(n, "its contents do not match its hash".into()));
        }
        seq = entry.seq;
        hash = entry.hash;
    }
    Ok((seq, hash))
}

/// [`verify`]'s finding as `audit_verify` answers it (and `oxctl audit verify FILE`
/// shows it).
pub fn report(path: &Path) -> crate::methods::AuditReport {
    let path_shown = path.display().to_string();
    match verify(path) {
        Ok((entries, last)) => crate::methods::AuditReport {
            path: path_shown,
            intact: true,
            entries: Some(entries),
            last_hash: Some(last),
            error: None,
        },
        Err(e) => crate::methods::AuditReport {
            path: path_shown,
            intact: false,
            entries: None,
            last_hash: None,
            error: Some(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.record(
                "uid=0 pid=1",
                "volume_create",
                serde_json::json!({"name": format!("v{i}")}),
                "ok",
            )
            .unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn a_clean_chain_verifies_and_reopening_continues_it() {
        let (_d, path) = log_with(3);
        assert_eq!(verify(&path).unwrap().0, 3);
        let log = AuditLog::open(&path).unwrap();
        let e = log
            .record("config", "start", serde_json::Value::Null, "ok")
            .unwrap();
        assert_eq!(e.seq, 4);
        assert_eq!(verify(&path).unwrap(), (4, e.hash));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn every_kind_of_tampering_names_its_line() {
        let (_d, path) = log_with(4);
        let good = lines(&path);
        // An edited field.
        let mut edited = good.clone();
        edited[1] = edited[1].replace("\"v1\"", "\"v9\"");
        write(&path, &edited);
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("hash"), "{e}");
        // An edit with the hash recomputed still breaks the next line's link.
        let mut entry: Entry = serde_json::from_str(&good[1]).unwrap();
        entry.result = "error: nothing happened".into();
        entry.hash = entry.digest();
        let mut forged = good.clone();
        forged[1] = serde_json::to_string(&entry).unwrap();
        write(&path, &forged);
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("follow"), "{e}");
        // A deleted line, reordered lines, garbage.
        let mut deleted = good.clone();
        deleted.remove(2);
        write(&path, &deleted);
        assert!(verify(&path).unwrap_err().to_string().contains("line 3"));
        let mut swapped = good.clone();
        swapped.swap(0, 1);
        write(&path, &swapped);
        assert!(verify(&path).unwrap_err().to_string().contains("line 1"));
        let mut garbage = good.clone();
        garbage.push("{\"seq\": 5".into());
        write(&path, &garbage);
        let e = verify(&path).unwrap_err().to_string();
        assert!(
            e.contains("line 5") && e.contains("not an audit entry"),
            "{e}"
        );
        // And the daemon refuses to append to a broken log...
        assert!(AuditLog::open(&path).is_err());
        // ...except for an unfinished last entry (a crash mid-write), which it cuts.
        let mut torn = good.join("\n") + "\n";
        torn.push_str("{\"seq\": 5, \"time_ms\"");
        std::fs::write(&path, torn).unwrap();
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(
            log.record("oxd", "start", serde_json::Value::Null, "ok")
                .unwrap()
                .seq,
            5
        );
        assert_eq!(verify(&path).unwrap().0, 5);
    }
}
