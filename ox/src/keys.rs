//! Keys: a random data key per snapshot, wrapped (AES-256-GCM) by a key-encryption key
//! (KEK) that never leaves the appliance. KEKs come from a key file, an environment
//! variable or an external command (the hook for a KMS); each has an ID recorded with
//! the wrapped key, so unwrapping names the key it needs, and rotation re-wraps data
//! keys without touching data.

use std::fmt;
use std::path::PathBuf;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::error::OxError;

/// Length of every key (AES-256).
pub const KEY_LEN: usize = 32;

/// Secret key bytes, wiped when dropped and never printed.
#[derive(Clone)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// A fresh random key from the operating system's generator.
    pub fn random() -> Result<Self, OxError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| OxError::Config(format!("no randomness: {e}")))?;
        Ok(Self(k))
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Volatile writes so the wipe is not optimised away.
        for b in self.0.iter_mut() {
            // SAFETY: writing a u8 through a valid, exclusive reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// Where a key-encryption key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    /// A file holding 64 hex characters (whitespace ignored), private to this user
    /// ([`crate::secret_file`]).
    File(PathBuf),
    /// An environment variable holding 64 hex characters.
    Env(String),
    /// A command (run with `sh -c`) that prints 64 hex characters; the KMS hook.
    Command(String),
}

/// A key-encryption key with its ID.
#[derive(Debug, Clone)]
pub struct Kek {
    /// The ID recorded next to every key it wraps.
    pub id: String,
    key: SecretKey,
}

impl Kek {
    /// A KEK from raw bytes.
    pub fn new(id: impl Into<String>, key: SecretKey) -> Self {
        Self { id: id.into(), key }
    }

    /// Its key material (for sealing it for another appliance).
    pub(crate) fn secret(&self) -> &SecretKey {
        &self.key
    }

    /// The key material as a key file holds it (64 hex characters): for writing a key
    /// file, never for logs.
    pub fn hex(&self) -> String {
        hex::encode(self.key.bytes())
    }

    /// A check value: 8 bytes (hex) of HMAC-SHA256 under the key of a fixed label. Two
    /// appliances showing the same check value hold the same key; it says nothing
    /// else about the key.
    pub fn check_value(&self) -> String {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.bytes());
        hex::encode(&ring::hmac::sign(&k, b"ox-key-check-v1").as_ref()[..8])
    }

    /// Whether `other` holds the same key material.
    pub fn same_key(&self, other: &Kek) -> bool {
        self.key.bytes() == other.key.bytes()
    }

    /// Loads the KEK `id` from `source`; errors name the key ID and the source.
    pub fn load(id: &str, source: &KekSource) -> Result<Self, OxError> {
        let err = |reason: String| OxError::Key {
            key_id: id.to_string(),
            reason,
        };
        let text = match source {
            KekSource::File(path) => {
                crate::secret_file::read(path).map_err(|e| err(e.to_string()))?
            }
            KekSource::Env(var) => std::env::var(var)
                .map_err(|_| err(format!("environment variable {var} is not set")))?,
            KekSource::Command(cmd) => {
                let out = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .output()
                    .map_err(|e| err(format!("running key command: {e}")))?;
                if !out.status.success() {
                    return Err(err(format!(
                        "key command exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                String::from_utf8(out.stdout)
                    .map_err(|_| err("key command printed non-UTF-8 output".into()))?
            }
        };
        let hex_text: String = text.split_whitespace().collect();
        let bytes =
            hex::decode(&hex_text).map_err(|_| err("key material is not hexadecimal".into()))?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|b: Vec<u8>| {
            err(format!(
                "key material is {} bytes, expected {KEY_LEN}",
                b.len()
            ))
        })?;
        Ok(Self::new(id, SecretKey::from_bytes(bytes)))
    }
}

/// A data key wrapped by a KEK, as stored in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    /// ID of the KEK that wrapped it.
    pub kek_id: String,
    /// Nonce (hex).
    pub nonce: String,
    /// Ciphertext and tag (hex).
    pub sealed: String,
}

fn cipher(key: &SecretKey) -> Result<LessSafeKey, OxError> {
    UnboundKey::new(&AES_256_GCM, key.bytes())
        .map(LessSafeKey::new)
        .map_err(|_| OxError::Config("invalid AES-256 key".into()))
}

/// Wraps `data_key` under `kek`, bound to `context` (the snapshot ID), so a wrapped
/// key copied to another snapshot does not unwrap.
pub fn wrap(kek: &Kek, data_key: &SecretKey, context: &str) -> Result<WrappedKey, OxError> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| OxError::Config(format!("no randomness: {e}")))?;
    let mut sealed = data_key.bytes().to_vec();
    cipher(&kek.key)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(&kek.id, context)),
            &mut sealed,
        )
        .map_err(|_| OxError::Key {
            key_id: kek.id.clone(),
            reason: "wrapping failed".into(),
        })?;
    Ok(WrappedKey {
        kek_id: kek.id.clone(),
        nonce: hex::encode(nonce),
        sealed: hex::encode(sealed),
    })
}

/// Unwraps a data key; `keks` are the KEKs available. A missing KEK or a wrong one is
/// an error naming the key ID.
pub fn unwrap(keks: &[Kek], wrapped: &WrappedKey, context: &str) -> Result<SecretKey, OxError> {
    let err = |reason: &str| OxError::Key {
        key_id: wrapped.kek_id.clone(),
        reason: reason.to_string(),
    };
    let kek = keks
        .iter()
        .find(|k| k.id == wrapped.kek_id)
        .ok_or_else(|| err("no such key-encryption key is configured"))?;
    let nonce: [u8; 12] = hex::decode(&wrapped.nonce)
        .ok()
        .and_then(|n| n.try_into().ok())
        .ok_or_else(|| err("wrapped key has a malformed nonce"))?;
    let mut sealed = hex::decode(&wrapped.sealed).map_err(|_| err("wrapped key is not hex"))?;
    let plain = cipher(&kek.key)?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(&kek.id, context)),
            &mut sealed,
        )
        .map_err(|_| {
            err("the wrapped data key does not open with this key (wrong key, or tampered)")
        })?;
    let bytes: [u8; KEY_LEN] = plain
        .try_into()
        .map_err(|_| err("wrapped data key has the wrong length"))?;
    Ok(SecretKey::from_bytes(bytes))
}

/// Re-wraps a data key from `old` KEKs to `new`, without touching any data.
pub fn rewrap(
    keks: &[Kek],
    wrapped: &WrappedKey,
    new: &Kek,
    context: &str,
) -> Result<WrappedKey, OxError> {
    let key = unwrap(keks, wrapped, context)?;
    wrap(new, &key, context)
}

fn aad(kek_id: &str, context: &str) -> Vec<u8> {
    let mut a = b"ox-wrapped-key-v1\0".to_vec();
    a.extend_from_slice(kek_id.as_bytes());
    a.push(0);
    a.extend_from_slice(context.as_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_rotate_and_wrong_keys() {
        let a = Kek::new("kek-a", SecretKey::random().unwrap());
        let b = Kek::new("kek-b", SecretKey::random().unwrap());
        let dk = SecretKey::random().unwrap();
        let w = wrap(&a, &dk, "snap-1").unwrap();
        assert_eq!(
            unwrap(std::slice::from_ref(&a), &w, "snap-1")
                .unwrap()
                .bytes(),
            dk.bytes()
        );
        // Missing KEK, named.
        let e = unwrap(std::slice::from_ref(&b), &w, "snap-1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kek-a") && e.contains("no such"), "{e}");
        // Wrong snapshot context.
        assert!(unwrap(std::slice::from_ref(&a), &w, "snap-2").is_err());
        // A different key under the same ID.
        let impostor = Kek::new("kek-a", SecretKey::random().unwrap());
        let e = unwrap(&[impostor], &w, "snap-1").unwrap_err().to_string();
        assert!(e.contains("does not open"), "{e}");
        // Rotation.
        let w2 = rewrap(std::slice::from_ref(&a), &w, &b, "snap-1").unwrap();
        assert_eq!(w2.kek_id, "kek-b");
        assert_eq!(unwrap(&[b], &w2, "snap-1").unwrap().bytes(), dk.bytes());
        assert!(format!("{dk:?}").contains("redacted"));
    }

    #[test]
    fn keks_load_from_file_env_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let hexkey = "11".repeat(32);
        let path = dir.path().join("k");
        std::fs::write(&path, format!("{hexkey}\n")).unwrap();
        let open = Kek::load("f", &KekSource::File(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(open.contains("chmod 600"), "{open}");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = Kek::load("f", &KekSource::File(path.clone())).unwrap();
        assert_eq!(f.key.bytes(), &[0x11; 32]);
        let c = Kek::load("c", &KekSource::Command(format!("cat {}", path.display()))).unwrap();
        assert_eq!(c.key.bytes(), &[0x11; 32]);
        let e = Kek::load("e", &KekSource::Env("OX_TEST_KEK_THAT_IS_NOT_SET".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"e\"") && e.contains("not set"), "{e}");
        std::fs::write(&path, "abcd").unwrap();
        let e = Kek::load("short", &KekSource::File(path))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 bytes"), "{e}");
        let e = Kek::load("x", &KekSource::Command("exit 3".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exited"), "{e}");
    }
}
