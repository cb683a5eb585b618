//! Moving a key-encryption key to another appliance, sealed for that appliance alone:
//! never in the clear on the way, in a file or in an audit log.
//!
//! Each appliance has a transfer key pair (X25519), its secret half in its state
//! directory. The sender seals a KEK for the receiver's public key: a fresh ephemeral
//! X25519 key agrees a secret with the receiver's; HKDF-SHA256 (salt: both public keys)
//! turns it into an AES-256-GCM key that seals the KEK, bound to its name and to the
//! receiver. Only the receiver's secret opens it; any change to the sealed text, the
//! name or the recipient fails the tag.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::error::OxError;
use crate::keys::{Kek, SecretKey};

/// Format of [`Sealed`].
pub const FORMAT: u32 = 1;

const CONTEXT: &[u8] = b"ox-key-transfer-v1";

/// A KEK sealed for one appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// Format version.
    pub format: u32,
    /// The KEK's name (its ID in manifests).
    pub key: String,
    /// The receiver's public key (hex).
    pub to: String,
    /// The sender's ephemeral public key (hex).
    pub ephemeral: String,
    /// AES-256-GCM nonce (hex).
    pub nonce: String,
    /// The sealed KEK and tag (hex).
    pub sealed: String,
}

/// An appliance's transfer key pair.
pub struct Receiver {
    secret: StaticSecret,
}

fn err(key: &str, reason: impl Into<String>) -> OxError {
    OxError::Key {
        key_id: key.to_string(),
        reason: reason.into(),
    }
}

fn random<const N: usize>() -> Result<[u8; N], OxError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| err("transfer", format!("no randomness: {e}")))?;
    Ok(b)
}

fn public_of(hex_text: &str, what: &str) -> Result<PublicKey, OxError> {
    let bytes: [u8; 32] = hex::decode(hex_text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| err(what, "not a public key (64 hex characters)"))?;
    Ok(PublicKey::from(bytes))
}

/// The AES-256-GCM key both sides derive.
fn sealing_key(
    shared: &x25519_dalek::SharedSecret,
    ephemeral: &PublicKey,
    to: &PublicKey,
    name: &str,
) -> Result<LessSafeKey, OxError> {
    if !shared.was_contributory() {
        return Err(err(name, "the public key is of low order"));
    }
    let salt = hkdf::Salt::new(
        hkdf::HKDF_SHA256,
        &[ephemeral.as_bytes().as_slice(), to.as_bytes()].concat(),
    );
    let mut key = [0u8; 32];
    salt.extract(shared.as_bytes())
        .expand(&[CONTEXT], &AES_256_GCM)
        .and_then(|okm| okm.fill(&mut key))
        .map_err(|_| err(name, "key derivation failed"))?;
    let unbound = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| err(name, "bad key"))?;
    Ok(LessSafeKey::new(unbound))
}

/// What the seal binds besides the key: its name and the receiver.
fn aad(name: &str, to: &PublicKey) -> Vec<u8> {
    [CONTEXT, b"\0", name.as_bytes(), b"\0", to.as_bytes()].concat()
}

/// Seals `kek` for the appliance whose transfer public key is `to` (hex).
pub fn seal(kek: &Kek, to: &str) -> Result<Sealed, OxError> {
    let to_key = public_of(to, &kek.id)?;
    let ephemeral = StaticSecret::from(random::<32>()?);
    let ephemeral_public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(&to_key);
    let key = sealing_key(&shared, &ephemeral_public, &to_key, &kek.id)?;
    let nonce = random::<12>()?;
    let mut data = kek.secret().bytes().to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(&kek.id, &to_key)),
        &mut data,
    )
    .map_err(|_| err(&kek.id, "sealing failed"))?;
    Ok(Sealed {
        format: FORMAT,
        key: kek.id.clone(),
        to: hex::encode(to_key.as_bytes()),
        ephemeral: hex::encode(ephemeral_public.as_bytes()),
        nonce: hex::encode(nonce),
        sealed: hex::encode(data),
    })
}

/// Writes `bytes` to a new owner-only file at `path` as one step: written and synced
/// beside it, linked into place (refused if something is there already: that one
/// stays), and the directory synced.
pub fn write_private_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or("key".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let linked = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::File::open(dir)?.sync_all()
}

impl Receiver {
    /// The transfer key pair kept at `path` (64 hex characters, owner-only), made
    /// there if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, OxError> {
        let io = |e: std::io::Error| OxError::Io {
            path: path.display().to_string(),
            source: e,
        };
        if !path.exists() {
            let secret = random::<32>()?;
            // Whole and durable, or not there: a crash never leaves a short key, and
            // of two made at once the first stays.
            write_private_once(path, hex::encode(secret).as_bytes()).map_err(io)?;
        }
        let text = crate::secret_file::read(path).map_err(|e| err("transfer", e.to_string()))?;
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                err(
                    "transfer",
                    format!("{} is not 64 hex characters", path.display()),
                )
            })?;
        Ok(Self {
            secret: StaticSecret::from(bytes),
        })
    }

    /// The public half (hex), which a sender seals for.
    pub fn public_hex(&self) -> String {
        hex::encode(PublicKey::from(&self.secret).as_bytes())
    }

    /// Opens a KEK sealed for this appliance.
    pub fn open(&self, s: &Sealed) -> Result<Kek, OxError> {
        if s.format != FORMAT {
            return Err(OxError::Format(format!(
                "sealed key format {}, this build reads {FORMAT}",
                s.format
            )));
        }
        let mine = PublicKey::from(&self.secret);
        if public_of(&s.to, &s.key)?.as_bytes() != mine.as_bytes() {
            return Err(err(&s.key, "sealed for another appliance"));
        }
        let ephemeral = public_of(&s.ephemeral, &s.key)?;
        let shared = self.secret.diffie_hellman(&ephemeral);
        let key = sealing_key(&shared, &ephemeral, &mine, &s.key)?;
        let nonce: [u8; 12] = hex::decode(&s.nonce)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| err(&s.key, "bad nonce"))?;
        let mut data = hex::decode(&s.sealed).map_err(|_| err(&s.key, "sealed text is not hex"))?;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(&s.key, &mine)),
                &mut data,
            )
            .map_err(|_| {
                err(
                    &s.key,
                    "the seal does not open: damaged, or not for this key name",
                )
            })?;
        let bytes: [u8; 32] = plain
            .try_into()
            .map_err(|_| err(&s.key, "the sealed key is not 32 bytes"))?;
        Ok(Kek::new(s.key.clone(), SecretKey::from_bytes(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver(dir: &Path, name: &str) -> Receiver {
        Receiver::load_or_create(&dir.join(name)).unwrap()
    }

    #[test]
    fn only_the_receiver_opens_the_key_and_any_change_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = receiver(dir.path(), "b");
        let c = receiver(dir.path(), "c");
        // Kept: the same pair on reload.
        assert_eq!(receiver(dir.path(), "b").public_hex(), b.public_hex());
        let kek = Kek::new("k1", SecretKey::random().unwrap());
        let sealed = seal(&kek, &b.public_hex()).unwrap();
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(
            !text.contains(&hex::encode(kek.secret().bytes())),
            "never in the clear"
        );
        let opened = b.open(&sealed).unwrap();
        assert_eq!(opened.id, "k1");
        assert_eq!(opened.secret().bytes(), kek.secret().bytes());
        // Another appliance cannot, even claiming to be the receiver.
        assert!(c.open(&sealed).is_err());
        let mut claimed = sealed.clone();
        claimed.to = c.public_hex();
        assert!(c.open(&claimed).is_err());
        // Renamed, or any bit of the seal changed: refused.
        let mut renamed = sealed.clone();
        renamed.key = "k2".into();
        assert!(b.open(&renamed).is_err());
        for field in 0..3 {
            let mut bad = sealed.clone();
            let s = match field {
                0 => &mut bad.sealed,
                1 => &mut bad.nonce,
                _ => &mut bad.ephemeral,
            };
            let flipped = if s.starts_with('0') { "1" } else { "0" };
            s.replace_range(0..1, flipped);
            assert!(b.open(&bad).is_err(), "field {field}");
        }
        // A low-order public key is refused when sealing.
        assert!(seal(&kek, &"00".repeat(32)).is_err());
        assert!(seal(&kek, "zz").is_err());
    }
}
