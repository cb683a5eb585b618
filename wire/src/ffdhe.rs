//! Finite-field Diffie-Hellman over the RFC 7919 groups, for DH-HMAC-CHAP's augmented
//! challenges: each side sends g^x mod p, both compute the shared value Z, and the
//! challenge each response answers becomes HMAC_H(H(Z), C) instead of C, so a
//! recording of the exchange no longer lets anyone test guesses of the secret offline.
//!
//! Exponentiation is constant-time (crypto-bigint's Montgomery form); private
//! exponents are 512 random bits, more than RFC 7919 asks of the largest group here.
//! Values travel big-endian, zero-padded to the group's size, as Linux writes them.

use crypto_bigint::modular::{BoxedMontyForm, BoxedMontyParams};
use crypto_bigint::{BoxedUint, Odd, Resize};
use ring::{digest, hmac};

use crate::dhchap::{Hash, KeyError, random_bytes};

/// The RFC 7919 `ffdhe2048` prime, in hexadecimal (as OpenSSL names the group).
const FFDHE2048: &[&str] = &[
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF",
];

/// The RFC 7919 `ffdhe3072` prime, in hexadecimal (as OpenSSL names the group).
const FFDHE3072: &[&str] = &[
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B66C62E37FFFFFFFFFFFFFFFF",
];

/// The RFC 7919 `ffdhe4096` prime, in hexadecimal (as OpenSSL names the group).
const FFDHE4096: &[&str] = &[
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695",
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A",
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935",
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A",
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4",
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61",
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005",
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B4238611FCFDCDE355B3B6519035B",
    "BC34F4DEF99C023861B46FC9D6E6C9077AD91D2691F7F7EE598CB0FAC186D91C",
    "AEFE130985139270B4130C93BC437944F4FD4452E2D74DD364F2E21E71F54BFF",
    "5CAE82AB9C9DF69EE86D2BC522363A0DABC521979B0DEADA1DBF9A42D5C4484E",
    "0ABCD06BFA53DDEF3C1B20EE3FD59D7C25E41D2B669E1EF16E6F52C3164DF4FB",
    "7930E9E4E58857B6AC7D5F42D69F6D187763CF1D5503400487F55BA57E31CC7A",
    "7135C886EFB4318AED6A1E012D9E6832A907600A918130C46DC778F971AD0038",
    "092999A333CB8B7A1A1DB93D7140003C2A4ECEA9F98D0ACC0A8291CDCEC97DCF",
    "8EC9B55A7F88A46B4DB5A851F44182E1C68A007E5E655F6AFFFFFFFFFFFFFFFF",
];

/// Diffie-Hellman groups of DH-HMAC-CHAP, by their protocol identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhGroup {
    /// No Diffie-Hellman: the challenge is used as it is (identifier 0).
    Null = 0,
    /// RFC 7919 ffdhe2048 (identifier 1).
    Ffdhe2048 = 1,
    /// RFC 7919 ffdhe3072 (identifier 2).
    Ffdhe3072 = 2,
    /// RFC 7919 ffdhe4096 (identifier 3).
    Ffdhe4096 = 3,
}

/// Bits of a private exponent.
const EXPONENT_BITS: u32 = 512;

impl DhGroup {
    /// Every group supported, NULL first.
    pub const ALL: [DhGroup; 4] = [
        DhGroup::Null,
        DhGroup::Ffdhe2048,
        DhGroup::Ffdhe3072,
        DhGroup::Ffdhe4096,
    ];

    /// The group with protocol identifier `id`, if supported (ffdhe6144 and 8192 are
    /// not).
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.id() == id)
    }

    /// The group named `null`, `ffdhe2048`, `ffdhe3072` or `ffdhe4096`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "null" => Some(Self::Null),
            "ffdhe2048" => Some(Self::Ffdhe2048),
            "ffdhe3072" => Some(Self::Ffdhe3072),
            "ffdhe4096" => Some(Self::Ffdhe4096),
            _ => None,
        }
    }

    /// Its protocol identifier.
    pub fn id(self) -> u8 {
        self as u8
    }

    /// Bytes of a public value (0 for the NULL group).
    pub fn value_len(self) -> usize {
        match self {
            Self::Null => 0,
            Self::Ffdhe2048 => 256,
            Self::Ffdhe3072 => 384,
            Self::Ffdhe4096 => 512,
        }
    }

    fn prime_hex(self) -> &'static [&'static str] {
        match self {
            Self::Null => &[],
            Self::Ffdhe2048 => FFDHE2048,
            Self::Ffdhe3072 => FFDHE3072,
            Self::Ffdhe4096 => FFDHE4096,
        }
    }

    /// The group's modulus, for Montgomery arithmetic (`None` for the NULL group).
    fn params(self) -> Option<(BoxedMontyParams, BoxedUint)> {
        let hex: String = self.prime_hex().concat();
        if hex.is_empty() {
            return None;
        }
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect();
        let bits = (bytes.len() * 8) as u32;
        let p = BoxedUint::from_be_slice(&bytes, bits).ok()?;
        let odd = Option::<Odd<BoxedUint>>::from(Odd::new(p.clone()))?;
        Some((BoxedMontyParams::new(odd), p))
    }
}

/// Why a Diffie-Hellman exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhError {
    /// The peer's value has the wrong length for the group.
    #[error("a Diffie-Hellman value of {got} bytes; the group's are {want}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes the group's values have.
        want: usize,
    },
    /// The peer's value is 0, 1, p - 1 or not below p: it would force the result.
    #[error("the peer's Diffie-Hellman value is out of range")]
    OutOfRange,
    /// The NULL group has no exchange.
    #[error("the NULL group has no Diffie-Hellman exchange")]
    NullGroup,
    /// No random bytes for a private exponent.
    #[error(transparent)]
    Random(#[from] KeyError),
}

/// One side's ephemeral key pair in a group.
pub struct DhKeyPair {
    group: DhGroup,
    params: BoxedMontyParams,
    prime: BoxedUint,
    private: BoxedUint,
    public: Vec<u8>,
}

impl std::fmt::Debug for DhKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhKeyPair")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl DhKeyPair {
    /// A fresh key pair in `group`.
    pub fn generate(group: DhGroup) -> Result<Self, DhError> {
        let (params, prime) = group.params().ok_or(DhError::NullGroup)?;
        let mut x = [0u8; (EXPONENT_BITS / 8) as usize];
        random_bytes(&mut x)?;
        let private =
            BoxedUint::from_be_slice(&x, EXPONENT_BITS).map_err(|_| DhError::OutOfRange)?;
        let bits = params.bits_precision();
        let g = BoxedMontyForm::new(BoxedUint::from(2u32).resize(bits), &params);
        let public = padded(&g.pow(&private).retrieve(), group.value_len());
        Ok(Self {
            group,
            params,
            prime,
            private,
            public,
        })
    }

    /// The value to send: g^x mod p, big-endian, the group's size.
    pub fn public(&self) -> &[u8] {
        &self.public
    }

    /// The shared value Z = peer^x mod p from the peer's value, which must be the
    /// group's size and in 2..p-2.
    pub fn shared_secret(&self, peer: &[u8]) -> Result<Vec<u8>, DhError> {
        let want = self.group.value_len();
        if peer.len() != want {
            return Err(DhError::Length {
                got: peer.len(),
                want,
            });
        }
        let bits = self.params.bits_precision();
        let y = BoxedUint::from_be_slice(peer, bits).map_err(|_| DhError::OutOfRange)?;
        let one = BoxedUint::one().resize(bits);
        let p_minus_1 = self.prime.wrapping_sub(&one);
        if y <= one || y >= p_minus_1 {
            return Err(DhError::OutOfRange);
        }
        let z = BoxedMontyForm::new(y, &self.params).pow(&self.private);
        Ok(padded(&z.retrieve(), want))
    }
}

/// `v` big-endian, zero-padded on the left to `len` bytes.
fn padded(v: &BoxedUint, len: usize) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let mut out = vec![0u8; len.saturating_sub(bytes.len())];
    out.extend_from_slice(&bytes[bytes.len().saturating_sub(len)..]);
    out
}

/// The challenge a response answers under a Diffie-Hellman group: HMAC_H(H(Z), C),
/// with H the negotiated hash.
pub fn augmented_challenge(hash: Hash, shared: &[u8], challenge: &[u8]) -> Vec<u8> {
    let (digest_alg, hmac_alg) = match hash {
        Hash::Sha256 => (&digest::SHA256, hmac::HMAC_SHA256),
        Hash::Sha384 => (&digest::SHA384, hmac::HMAC_SHA384),
        Hash::Sha512 => (&digest::SHA512, hmac::HMAC_SHA512),
    };
    let hashed = digest::digest(digest_alg, shared);
    hmac::sign(&hmac::Key::new(hmac_alg, hashed.as_ref()), challenge)
        .as_ref()
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_primes_are_safe_primes() {
        for group in [DhGroup::Ffdhe2048, DhGroup::Ffdhe3072, DhGroup::Ffdhe4096] {
            let (params, p) = group.params().unwrap();
            assert_eq!(p.to_be_bytes().len(), group.value_len());
            let bits = params.bits_precision();
            let one = BoxedUint::one().resize(bits);
            // Fermat's test to base 2 for p, and for q = (p - 1) / 2.
            let two = BoxedMontyForm::new(BoxedUint::from(2u32).resize(bits), &params);
            assert_eq!(two.pow(&p.wrapping_sub(&one)).retrieve(), one, "{group:?}");
            let q = p.wrapping_sub(&one).shr(1);
            let q_odd = Option::<Odd<BoxedUint>>::from(Odd::new(q.clone())).unwrap();
            let q_params = BoxedMontyParams::new(q_odd);
            let two_q = BoxedMontyForm::new(BoxedUint::from(2u32).resize(bits), &q_params);
            assert_eq!(
                two_q.pow(&q.wrapping_sub(&one)).retrieve(),
                one,
                "{group:?} q"
            );
        }
    }

    #[test]
    fn both_sides_agree_and_bad_values_are_refused() {
        for group in [DhGroup::Ffdhe2048, DhGroup::Ffdhe3072] {
            let a = DhKeyPair::generate(group).unwrap();
            let b = DhKeyPair::generate(group).unwrap();
            assert_eq!(a.public().len(), group.value_len());
            let z = a.shared_secret(b.public()).unwrap();
            assert_eq!(z, b.shared_secret(a.public()).unwrap());
            assert_eq!(z.len(), group.value_len());
            let n = group.value_len();
            let mut one = vec![0u8; n];
            one[n - 1] = 1;
            let (_, p) = group.params().unwrap();
            let p_minus_1 = padded(
                &p.wrapping_sub(BoxedUint::one().resize(p.bits_precision())),
                n,
            );
            for bad in [vec![0u8; n], one, p_minus_1, vec![0xFF; n]] {
                assert_eq!(a.shared_secret(&bad), Err(DhError::OutOfRange));
            }
            assert!(matches!(
                a.shared_secret(&[7; 10]),
                Err(DhError::Length { .. })
            ));
        }
        assert!(DhKeyPair::generate(DhGroup::Null).is_err());
        let aug = augmented_challenge(Hash::Sha256, &[1; 256], &[2; 32]);
        assert_eq!(aug.len(), 32);
        assert_ne!(aug, augmented_challenge(Hash::Sha256, &[1; 256], &[3; 32]));
        assert_ne!(aug, augmented_challenge(Hash::Sha256, &[4; 256], &[2; 32]));
    }
}
