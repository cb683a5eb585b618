//! Errors of object exchange. Every variant says what failed and where: which key ID,
//! which object, which chunk.

/// What can go wrong encoding, decoding, storing or fetching.
#[derive(Debug, thiserror::Error)]
pub enum OxError {
    /// A frame or object failed its integrity check: tampered, moved, truncated or
    /// decrypted with the wrong key. Never returned as data.
    #[error("integrity check failed for {what}: {reason}")]
    Integrity {
        /// The frame or object.
        what: String,
        /// Why.
        reason: String,
    },
    /// A key-encryption key could not be found or used.
    #[error("key {key_id:?}: {reason}")]
    Key {
        /// The key ID.
        key_id: String,
        /// Why.
        reason: String,
    },
    /// The object or format is a version this build cannot read.
    #[error("unsupported format: {0}")]
    Format(String),
    /// Bad configuration.
    #[error("invalid object-exchange configuration: {0}")]
    Config(String),
    /// Stopped because it was asked to (`oxctl job cancel`): says what, and what
    /// became of it.
    #[error("{0}")]
    Cancelled(String),
    /// The object does not exist.
    #[error("object {key:?} not found")]
    NotFound {
        /// Object key.
        key: String,
    },
    /// A conditional create found the object already there.
    #[error("object {key:?} already exists")]
    AlreadyExists {
        /// Object key.
        key: String,
    },
    /// The store refused the request (4xx other than not-found); not retried.
    #[error("{op} {key:?} refused by the store: HTTP {status}: {message}")]
    Refused {
        /// Operation.
        op: &'static str,
        /// Object key.
        key: String,
        /// HTTP status.
        status: u16,
        /// The store's error code and message.
        message: String,
    },
    /// The store's TLS certificate is not vouched for by the configured trust: a
    /// configuration error, never retried (no retry would succeed).
    #[error(
        "{op} {key:?}: the store is not trusted (check ca_file or the system's CAs): {message}"
    )]
    Untrusted {
        /// Operation.
        op: &'static str,
        /// Object key.
        key: String,
        /// The TLS failure.
        message: String,
    },
    /// The store failed or could not be reached, after every retry.
    #[error("{op} {key:?} failed after {attempts} attempt(s): {message}")]
    Unavailable {
        /// Operation.
        op: &'static str,
        /// Object key.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// A volume's place in the store belongs to another appliance (the bucket's
    /// catalogue says so); only an explicit adoption takes it over.
    #[error(
        "volume {volume}: its place in the store belongs to appliance {owner_name} ({owner}); taking it over is an explicit adoption"
    )]
    Owned {
        /// The volume.
        volume: String,
        /// The owner's identity.
        owner: String,
        /// The owner's name.
        owner_name: String,
    },
    /// A snapshot stopped for a restart of the appliance; its journal lets the next
    /// start continue it where it was.
    #[error("snapshot of {0} suspended for a restart; it continues at the next start")]
    Suspended(String),
    /// Local file system error.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl OxError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn integrity(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Integrity {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
