//! DH-HMAC-CHAP secrets and the computations both sides of NVMe in-band
//! authentication make (NVMe Base Specification 2.0, 8.13; the Linux host's
//! `drivers/nvme/common/auth.c` computes the same).
//!
//! A secret is written `DHHC-1:XX:<base64 of key and CRC-32>:`, as `nvme gen-dhchap-key`
//! prints it: `XX` names the hash that first transforms the key with the NQN of its
//! owner (00 none, 01 SHA-256, 02 SHA-384, 03 SHA-512). A host proves it holds its
//! secret by answering a challenge with an HMAC over the challenge, the transaction's
//! identifiers and both NQNs; a controller proves its own (bidirectional
//! authentication) the same way with the roles' names swapped.

use ring::hmac;

use crate::cmd::{FABRICS, Sqe};
use crate::le;

/// Security protocol (SECP) of Authentication Send/Receive: NVMe in-band
/// authentication.
pub const SECP: u8 = 0xE9;
/// SPSP0 and SPSP1 of DH-HMAC-CHAP.
pub const SPSP: u8 = 0x01;
/// A message's type (byte 0): common (Negotiate, failures) or DH-HMAC-CHAP.
pub mod kind {
    /// Negotiate, Failure1, Failure2.
    pub const COMMON: u8 = 0x00;
    /// Challenge, Reply, Success1, Success2.
    pub const DHCHAP: u8 = 0x01;
}
/// A message's identifier (byte 1).
pub mod id {
    /// AUTH_Negotiate (host).
    pub const NEGOTIATE: u8 = 0x00;
    /// DH-HMAC-CHAP_Challenge (controller).
    pub const CHALLENGE: u8 = 0x01;
    /// DH-HMAC-CHAP_Reply (host).
    pub const REPLY: u8 = 0x02;
    /// DH-HMAC-CHAP_Success1 (controller).
    pub const SUCCESS1: u8 = 0x03;
    /// DH-HMAC-CHAP_Success2 (host).
    pub const SUCCESS2: u8 = 0x04;
    /// AUTH_Failure2 (host).
    pub const FAILURE2: u8 = 0xF0;
    /// AUTH_Failure1 (controller).
    pub const FAILURE1: u8 = 0xF1;
}
/// The NULL Diffie-Hellman group: no DH exchange, the challenge used as it is.
pub const DHGROUP_NULL: u8 = 0;

/// An Authentication Send (`fctype::AUTH_SEND`, `len` = the message's length) or
/// Receive (`fctype::AUTH_RECV`, `len` = the allocation length) for DH-HMAC-CHAP.
pub fn auth_command(fctype: u8, len: u32) -> Sqe {
    let mut sqe = Sqe::new(FABRICS, 0);
    sqe.0[4] = fctype;
    sqe.0[41] = SPSP;
    sqe.0[42] = SPSP;
    sqe.0[43] = SECP;
    sqe.set_cdw(11, len);
    sqe
}

/// A message header: type, identifier, zeros, the transaction ID at 4; `len` bytes.
pub fn message(kind: u8, id: u8, t_id: u16, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    m[0] = kind;
    m[1] = id;
    le::put_u16(&mut m, 4, t_id);
    m
}

/// AUTH_Negotiate offering DH-HMAC-CHAP with `hashes` and `groups` (identifiers; at
/// most 30 of each are sent).
pub fn negotiate(t_id: u16, hashes: &[u8], groups: &[u8]) -> Vec<u8> {
    let (hashes, groups) = (
        &hashes[..hashes.len().min(30)],
        &groups[..groups.len().min(30)],
    );
    let mut m = message(kind::COMMON, id::NEGOTIATE, t_id, 72);
    m[7] = 1; // one protocol descriptor
    m[8] = kind::DHCHAP;
    m[10] = hashes.len() as u8;
    m[11] = groups.len() as u8;
    m[12..12 + hashes.len()].copy_from_slice(hashes);
    m[42..42 + groups.len()].copy_from_slice(groups);
    m
}

/// DH-HMAC-CHAP_Reply carrying `response`, (bidirectional) the host's own challenge
/// and sequence number, which must be as long as the response, and the host's
/// Diffie-Hellman value (empty with the NULL group).
pub fn reply(
    t_id: u16,
    response: &[u8],
    challenge: Option<(&[u8], u32)>,
    dh_value: &[u8],
) -> Vec<u8> {
    let hl = response.len();
    let mut m = message(kind::DHCHAP, id::REPLY, t_id, 16 + 2 * hl);
    m[6] = hl as u8;
    le::put_u16(&mut m, 10, dh_value.len() as u16);
    m[16..16 + hl].copy_from_slice(response);
    if let Some((c2, s2)) = challenge.filter(|(c, _)| c.len() == hl) {
        m[8] = 1; // CVALID
        le::put_u32(&mut m, 12, s2);
        m[16 + hl..].copy_from_slice(c2);
    }
    m.extend_from_slice(dh_value);
    m
}

/// DH-HMAC-CHAP_Success2: the host accepts the controller's response.
pub fn success2(t_id: u16) -> Vec<u8> {
    message(kind::DHCHAP, id::SUCCESS2, t_id, 16)
}

/// AUTH_Failure2: the host refuses the controller (`explanation`: the reason code
/// explanation, 1 for a failed check).
pub fn failure2(t_id: u16, explanation: u8) -> Vec<u8> {
    let mut m = message(kind::COMMON, id::FAILURE2, t_id, 8);
    m[6] = 0x01; // reason code: authentication failure
    m[7] = explanation;
    m
}

/// Fills `buf` from the system's random number generator (challenges, secrets,
/// sequence numbers).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeyError> {
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), buf)
        .map_err(|_| KeyError::Random)
}

/// Hash functions of DH-HMAC-CHAP, by their protocol identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    /// HMAC-SHA-256 (identifier 1): the default.
    Sha256 = 1,
    /// HMAC-SHA-384 (identifier 2).
    Sha384 = 2,
    /// HMAC-SHA-512 (identifier 3).
    Sha512 = 3,
}

impl Hash {
    /// The hash with protocol identifier `id`.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha384),
            3 => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The hash named `sha256`, `sha384` or `sha512` (configuration files).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    /// Its protocol identifier.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Its digest length in bytes (the length of challenges and responses).
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    fn algorithm(self) -> hmac::Algorithm {
        match self {
            Self::Sha256 => hmac::HMAC_SHA256,
            Self::Sha384 => hmac::HMAC_SHA384,
            Self::Sha512 => hmac::HMAC_SHA512,
        }
    }
}

/// Why a secret string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not `DHHC-1:XX:...:`.
    #[error(
        "a DH-HMAC-CHAP secret is written DHHC-1:XX:<base64>: (as nvme gen-dhchap-key prints it)"
    )]
    Format,
    /// `XX` is not 00-03 (not echoed: a garbled secret could put key bytes there).
    #[error("unknown key transformation (00 none, 01 SHA-256, 02 SHA-384, 03 SHA-512)")]
    Transform,
    /// The base64 payload does not decode.
    #[error("the secret's key is not valid base64")]
    Base64,
    /// The key is not 32, 48 or 64 bytes.
    #[error("a key of {0} bytes: it must be 32, 48 or 64")]
    Length(usize),
    /// The CRC-32 after the key does not match it.
    #[error("the secret's CRC does not match its key (mistyped or truncated?)")]
    Crc,
    /// The system's random number generator failed.
    #[error("no random bytes from the system")]
    Random,
}

/// A DH-HMAC-CHAP secret. Its `Debug` form never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct DhchapKey {
    transform: Option<Hash>,
    key: Vec<u8>,
}

impl std::fmt::Debug for DhchapKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhchapKey")
            .field("transform", &self.transform)
            .field("bytes", &self.key.len())
            .finish_non_exhaustive()
    }
}

impl DhchapKey {
    /// Parses `DHHC-1:XX:<base64>:` (surrounding white space ignored): checks the
    /// transformation, the key length and the CRC-32 that follows the key.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let rest = text.strip_prefix("DHHC-1:").ok_or(KeyError::Format)?;
        let (xx, rest) = rest.split_once(':').ok_or(KeyError::Format)?;
        let payload = rest.strip_suffix(':').ok_or(KeyError::Format)?;
        let transform = match xx {
            "00" => None,
            "01" | "02" | "03" => Hash::from_id(xx.as_bytes()[1] - b'0'),
            _ => return Err(KeyError::Transform),
        };
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map_err(|_| KeyError::Base64)?;
        let key_len = raw.len().saturating_sub(4);
        if !matches!(key_len, 32 | 48 | 64) || raw.len() != key_len + 4 {
            return Err(KeyError::Length(key_len));
        }
        let (key, crc) = raw.split_at(key_len);
        if crc32fast::hash(key).to_le_bytes() != crc {
            return Err(KeyError::Crc);
        }
        Ok(Self {
            transform,
            key: key.to_vec(),
        })
    }

    /// Writes the secret in its `DHHC-1:XX:<base64>:` form.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let mut raw = self.key.clone();
        raw.extend_from_slice(&crc32fast::hash(&self.key).to_le_bytes());
        format!(
            "DHHC-1:{:02}:{}:",
            self.transform.map_or(0, Hash::id),
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// A new random secret of `len` bytes (32, 48 or 64) to be transformed with
    /// `transform`, as `nvme gen-dhchap-key` makes one.
    pub fn generate(len: usize, transform: Option<Hash>) -> Result<Self, KeyError> {
        if !matches!(len, 32 | 48 | 64) {
            return Err(KeyError::Length(len));
        }
        let mut key = vec![0u8; len];
        random_bytes(&mut key)?;
        Ok(Self { transform, key })
    }

    /// The key the responses are computed with: the secret itself, or its HMAC (under
    /// the secret) over `nqn` (of the secret's owner) and "NVMe-over-Fabrics".
    fn transformed(&self, nqn: &str) -> Vec<u8> {
        match self.transform {
            None => self.key.clone(),
            Some(h) => {
                let key = hmac::Key::new(h.algorithm(), &self.key);
                let mut ctx = hmac::Context::with_key(&key);
                ctx.update(nqn.as_bytes());
                ctx.update(b"NVMe-over-Fabrics");
                ctx.sign().as_ref().to_vec()
            }
        }
    }
}

/// The two roles' responses differ in the key, a label and the order of the NQNs.
#[derive(Clone, Copy)]
enum Role {
    Host,
    Controller,
}

/// The message a response is the HMAC of: the challenge, sequence number,
/// transaction ID, secure channel concatenation (0), the role's label and the two
/// NQNs (the prover's first) with a zero byte between them.
fn response_message(
    role: Role,
    challenge: &[u8],
    seqnum: u32,
    t_id: u16,
    hostnqn: &str,
    subnqn: &str,
) -> Vec<u8> {
    let (label, first, second): (&[u8], &str, &str) = match role {
        Role::Host => (b"HostHost", hostnqn, subnqn),
        Role::Controller => (b"Controller", subnqn, hostnqn),
    };
    let mut m = Vec::with_capacity(challenge.len() + 18 + first.len() + second.len());
    m.extend_from_slice(challenge);
    m.extend_from_slice(&seqnum.to_le_bytes());
    m.extend_from_slice(&t_id.to_le_bytes());
    m.push(0);
    m.extend_from_slice(label);
    m.extend_from_slice(first.as_bytes());
    m.push(0);
    m.extend_from_slice(second.as_bytes());
    m
}

/// The key a role's secret gives: transformed with the prover's NQN.
fn role_key(hash: Hash, role: Role, secret: &DhchapKey, hostnqn: &str, subnqn: &str) -> hmac::Key {
    let nqn = match role {
        Role::Host => hostnqn,
        Role::Controller => subnqn,
    };
    hmac::Key::new(hash.algorithm(), &secret.transformed(nqn))
}

/// What a response answers: the negotiated hash, a challenge and its sequence
/// number, the transaction, and the two NQNs. The host's response is the HMAC under
/// its transformed secret of the challenge, sequence number, transaction ID, secure
/// channel concatenation (0), "HostHost", the host NQN, a zero byte and the subsystem
/// NQN; the controller's (bidirectional authentication) the same with its secret,
/// "Controller" and the NQNs swapped.
#[derive(Debug, Clone, Copy)]
pub struct Exchange<'a> {
    /// The negotiated hash.
    pub hash: Hash,
    /// The challenge answered.
    pub challenge: &'a [u8],
    /// Its sequence number.
    pub seqnum: u32,
    /// The transaction ID.
    pub t_id: u16,
    /// The host's NQN.
    pub hostnqn: &'a str,
    /// The subsystem's NQN.
    pub subnqn: &'a str,
}

impl Exchange<'_> {
    /// The host's response, made with its secret.
    pub fn host_response(&self, host_key: &DhchapKey) -> Vec<u8> {
        let (key, m) = self.tag_input(Role::Host, host_key);
        hmac::sign(&key, &m).as_ref().to_vec()
    }

    /// The controller's response, made with its secret.
    pub fn ctrl_response(&self, ctrl_key: &DhchapKey) -> Vec<u8> {
        let (key, m) = self.tag_input(Role::Controller, ctrl_key);
        hmac::sign(&key, &m).as_ref().to_vec()
    }

    /// Whether `response` is the host's, checked in constant time.
    pub fn host_proved(&self, host_key: &DhchapKey, response: &[u8]) -> bool {
        let (key, m) = self.tag_input(Role::Host, host_key);
        hmac::verify(&key, &m, response).is_ok()
    }

    /// Whether `response` is the controller's, checked in constant time.
    pub fn ctrl_proved(&self, ctrl_key: &DhchapKey, response: &[u8]) -> bool {
        let (key, m) = self.tag_input(Role::Controller, ctrl_key);
        hmac::verify(&key, &m, response).is_ok()
    }

    fn tag_input(&self, role: Role, secret: &DhchapKey) -> (hmac::Key, Vec<u8>) {
        let key = role_key(self.hash, role, secret, self.hostnqn, self.subnqn);
        let m = response_message(
            role,
            self.challenge,
            self.seqnum,
            self.t_id,
            self.hostnqn,
            self.subnqn,
        );
        (key, m)
    }
}

/// The secrets one host authenticates with to one subsystem.
#[derive(Debug, Clone)]
pub struct HostKeys {
    /// The host's NQN.
    pub hostnqn: String,
    /// The host's secret: it must prove it holds it.
    pub key: DhchapKey,
    /// The controller's secret, for hosts that ask the controller to prove itself too
    /// (bidirectional authentication); `None` refuses such requests.
    pub ctrl_key: Option<DhchapKey>,
    /// The hash to use when the host offers it (otherwise the first it offers).
    pub hash: Hash,
    /// The Diffie-Hellman group to use when the host offers it (otherwise NULL, or the
    /// first it offers).
    pub dhgroup: crate::ffdhe::DhGroup,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_damage_is_refused() {
        for (len, t) in [
            (32, None),
            (48, Some(Hash::Sha384)),
            (64, Some(Hash::Sha512)),
        ] {
            let k = DhchapKey::generate(len, t).unwrap();
            let text = k.encode();
            assert!(text.starts_with("DHHC-1:"), "{text}");
            assert_eq!(DhchapKey::parse(&format!("  {text}\n")).unwrap(), k);
        }
        let good = DhchapKey::generate(32, Some(Hash::Sha256))
            .unwrap()
            .encode();
        // One base64 character changed: the CRC no longer matches.
        let mut bad = good.clone().into_bytes();
        let i = 12;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(DhchapKey::parse(&bad), Err(KeyError::Crc));
        assert_eq!(
            DhchapKey::parse("DHHC-1:04:AAAA:"),
            Err(KeyError::Transform)
        );
        assert_eq!(DhchapKey::parse("DHHC-1:00:!!!!:"), Err(KeyError::Base64));
        assert_eq!(
            DhchapKey::parse("DHHC-1:00:AAAAAAAA:"),
            Err(KeyError::Length(2))
        );
        assert_eq!(DhchapKey::parse("DHHC-2:00:AAAA:"), Err(KeyError::Format));
        assert_eq!(
            DhchapKey::parse(&good[..good.len() - 1]),
            Err(KeyError::Format)
        );
        assert!(!format!("{:?}", DhchapKey::parse(&good).unwrap()).contains(&good[10..20]));
    }

    #[test]
    fn responses_depend_on_every_input() {
        let key = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
        let other = DhchapKey::generate(32, Some(Hash::Sha256)).unwrap();
        let c = [7u8; 32];
        let x = Exchange {
            hash: Hash::Sha256,
            challenge: &c,
            seqnum: 9,
            t_id: 1,
            hostnqn: "nqn.h",
            subnqn: "nqn.s",
        };
        let base = x.host_response(&key);
        assert_eq!(base.len(), 32);
        assert_eq!(base, x.host_response(&key));
        let c8 = [8u8; 32];
        for changed in [
            x.host_response(&other),
            Exchange {
                challenge: &c8,
                ..x
            }
            .host_response(&key),
            Exchange { seqnum: 10, ..x }.host_response(&key),
            Exchange { t_id: 2, ..x }.host_response(&key),
            Exchange {
                hostnqn: "nqn.x",
                ..x
            }
            .host_response(&key),
            Exchange {
                subnqn: "nqn.x",
                ..x
            }
            .host_response(&key),
            x.ctrl_response(&key),
        ] {
            assert_ne!(changed, base);
        }
        let long = Exchange {
            hash: Hash::Sha512,
            ..x
        };
        assert_eq!(long.host_response(&key).len(), 64);
        assert!(x.host_proved(&key, &base));
        assert!(!x.host_proved(&key, &base[..31]));
        assert!(!x.host_proved(&other, &base));
        assert!(
            !x.ctrl_proved(&key, &base),
            "a host response is no controller response"
        );
        let r2 = x.ctrl_response(&key);
        assert!(x.ctrl_proved(&key, &r2));
        assert!(!Exchange { t_id: 2, ..x }.ctrl_proved(&key, &r2));
    }
}
