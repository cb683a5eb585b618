//! The frame codec: chunk → (skip if all zero) → zstd → AES-256-GCM → frame, and back.
//!
//! A frame is one chunk, compressed and encrypted on its own so a ranged GET of exactly
//! its bytes can be decoded alone. The associated data binds a frame to its volume,
//! snapshot, chunk index and format version: a frame moved to another position,
//! swapped between snapshots or replayed fails to decrypt. With encryption off, a
//! CRC32C over the same binding and the frame still guards it. Decoding checks every
//! length against what the caller expects, never trusting the object.
//!
//! Frame layout (little-endian), see `docs/FORMAT.md`:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `OXF1` |
//! | 4 | 1 | format version (1) |
//! | 5 | 1 | flags: 1 = zstd, 2 = AES-256-GCM |
//! | 6 | 2 | reserved, zero |
//! | 8 | 4 | raw length (the chunk's length) |
//! | 12 | 4 | payload length |
//! | 16 | 12 | nonce (zero without encryption) |
//! | 28 | payload length | payload |
//! | … | 16 or 4 | GCM tag, or CRC32C without encryption |

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::error::OxError;
use crate::keys::SecretKey;

/// Frame magic.
pub const MAGIC: &[u8; 4] = b"OXF1";
/// Frame format version written by this build.
pub const FRAME_VERSION: u8 = 1;
/// Frame header length.
pub const HEADER_LEN: usize = 28;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Flag: payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;
/// Flag: payload is AES-256-GCM encrypted.
pub const FLAG_AES_GCM: u8 = 2;
/// Smallest and largest chunk sizes.
pub const CHUNK_SIZES: std::ops::RangeInclusive<usize> = (64 << 10)..=(1 << 20);
/// zstd levels a snapshot may be written with (0: no compression).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 0..=22;

/// What a frame belongs to: checked on every decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    /// Volume identity.
    pub volume: [u8; 16],
    /// Snapshot identity.
    pub snapshot: [u8; 16],
}

impl Binding {
    fn aad(&self, index: u64, header: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(64 + header.len());
        a.extend_from_slice(b"ox-frame\0");
        a.extend_from_slice(&self.volume);
        a.extend_from_slice(&self.snapshot);
        a.extend_from_slice(&index.to_le_bytes());
        a.extend_from_slice(header);
        a
    }
}

/// Encoder settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecSettings {
    /// zstd level (1 = fastest); 0 disables compression.
    pub level: i32,
}

impl Default for CodecSettings {
    fn default() -> Self {
        Self { level: 1 }
    }
}

/// Encodes and decodes the frames of one snapshot.
pub struct Codec {
    settings: CodecSettings,
    key: Option<LessSafeKey>,
    binding: Binding,
    /// Random per-codec nonce prefix; with the counter it never repeats under a key,
    /// even when a snapshot's upload resumes with a new codec.
    nonce_prefix: [u8; 4],
    counter: u64,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl Codec {
    /// A codec for the snapshot `binding`, encrypting with `key` if given.
    pub fn new(
        settings: CodecSettings,
        key: Option<&SecretKey>,
        binding: Binding,
    ) -> Result<Self, OxError> {
        let key = key
            .map(|k| {
                UnboundKey::new(&AES_256_GCM, k.bytes())
                    .map(LessSafeKey::new)
                    .map_err(|_| OxError::Config("invalid AES-256 key".into()))
            })
            .transpose()?;
        let mut nonce_prefix = [0u8; 4];
        getrandom::fill(&mut nonce_prefix)
            .map_err(|e| OxError::Config(format!("no randomness: {e}")))?;
        if !ZSTD_LEVELS.contains(&settings.level) {
            return Err(OxError::Config(format!(
                "zstd level {} is not from {} to {}",
                settings.level,
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )));
        }
        let compressor = if settings.level > 0 {
            Some(
                zstd::bulk::Compressor::new(settings.level)
                    .map_err(|e| OxError::Config(format!("zstd level {}: {e}", settings.level)))?,
            )
        } else {
            None
        };
        Ok(Self {
            settings,
            key,
            binding,
            nonce_prefix,
            counter: 0,
            compressor,
        })
    }

    /// The nonce prefix this codec uses (a snapshot's journal records it).
    pub fn nonce_prefix(&self) -> [u8; 4] {
        self.nonce_prefix
    }

    /// Takes a nonce prefix none of `used` (the prefixes of earlier encoders of the
    /// same snapshot) has, so a resumed snapshot never repeats a nonce under its key.
    pub fn avoid_nonce_prefixes(&mut self, used: &[[u8; 4]]) -> Result<(), OxError> {
        while used.contains(&self.nonce_prefix) {
            getrandom::fill(&mut self.nonce_prefix)
                .map_err(|e| OxError::Config(format!("no randomness: {e}")))?;
        }
        Ok(())
    }

    /// Whether frames are encrypted.
    pub fn encrypted(&self) -> bool {
        self.key.is_some()
    }

    /// Encodes chunk `index`; `None` for an all-zero chunk, which is not stored.
    pub fn encode(&mut self, index: u64, chunk: &[u8]) -> Result<Option<Vec<u8>>, OxError> {
        if is_zero(chunk) {
            return Ok(None);
        }
        self.encode_always(index, chunk).map(Some)
    }

    /// Encodes chunk `index` even if it is all zero (used for index pages).
    pub fn encode_always(&mut self, index: u64, chunk: &[u8]) -> Result<Vec<u8>, OxError> {
        let raw_len = u32::try_from(chunk.len())
            .map_err(|_| OxError::Config("chunk larger than 4 GiB".into()))?;
        let mut flags = 0u8;
        // One allocation the frame never outgrows, compressed into in place: no copy of
        // the payload and no reallocation on the way (the encoder's own cost is what
        // bounds a snapshot's rate on a fast store).
        let payload_room = zstd::zstd_safe::compress_bound(chunk.len()).max(chunk.len());
        let mut frame = Vec::with_capacity(HEADER_LEN + payload_room + TAG_LEN);
        frame.resize(HEADER_LEN, 0);
        if let Some(c) = &mut self.compressor {
            let mut payload = std::io::Cursor::new(&mut frame);
            payload.set_position(HEADER_LEN as u64);
            let packed = c
                .compress_to_buffer(chunk, &mut payload)
                .map_err(|e| OxError::Config(format!("zstd: {e}")))?;
            // Stored raw when compression does not shrink it.
            if packed < chunk.len() {
                flags |= FLAG_ZSTD;
            } else {
                frame.truncate(HEADER_LEN);
            }
        }
        if flags & FLAG_ZSTD == 0 {
            frame.extend_from_slice(chunk);
        }
        debug_assert!(
            frame.capacity() >= frame.len() + TAG_LEN,
            "room for the trailer"
        );
        let payload_len = (frame.len() - HEADER_LEN) as u32;
        let mut nonce = [0u8; 12];
        if self.key.is_some() {
            flags |= FLAG_AES_GCM;
            nonce[..4].copy_from_slice(&self.nonce_prefix);
            nonce[4..].copy_from_slice(&self.counter.to_le_bytes());
            self.counter += 1;
        }
        frame[..4].copy_from_slice(MAGIC);
        frame[4] = FRAME_VERSION;
        frame[5] = flags;
        frame[8..12].copy_from_slice(&raw_len.to_le_bytes());
        frame[12..16].copy_from_slice(&payload_len.to_le_bytes());
        frame[16..28].copy_from_slice(&nonce);
        let aad = self.binding.aad(index, &frame[..HEADER_LEN]);
        match &self.key {
            Some(key) => {
                let (_, payload) = frame.split_at_mut(HEADER_LEN);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&aad),
                        payload,
                    )
                    .map_err(|_| OxError::Config("encryption failed".into()))?;
                frame.extend_from_slice(tag.as_ref());
            }
            None => {
                let crc = crc32c::crc32c_append(crc32c::crc32c(&aad), &frame[HEADER_LEN..]);
                frame.extend_from_slice(&crc.to_le_bytes());
            }
        }
        Ok(frame)
    }

    /// Decodes the frame of chunk `index`, which must hold exactly `expected_len`
    /// bytes. Anything else — wrong key, wrong position, wrong snapshot, damage,
    /// truncation — is an [`OxError::Integrity`], never data.
    pub fn decode(
        &self,
        index: u64,
        frame: &[u8],
        expected_len: usize,
    ) -> Result<Vec<u8>, OxError> {
        let what = || format!("frame of chunk {index}");
        let bad = |reason: &str| OxError::integrity(what(), reason);
        if frame.len() < HEADER_LEN {
            return Err(bad("shorter than a frame header"));
        }
        let header = &frame[..HEADER_LEN];
        if &header[..4] != MAGIC {
            return Err(bad("no frame magic"));
        }
        if header[4] != FRAME_VERSION {
            return Err(OxError::Format(format!(
                "{} has frame version {}, this build reads {FRAME_VERSION}",
                what(),
                header[4]
            )));
        }
        let flags = header[5];
        if flags & !(FLAG_ZSTD | FLAG_AES_GCM) != 0 || header[6..8] != [0, 0] {
            return Err(bad("unknown flags"));
        }
        let raw_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        let payload_len =
            u32::from_le_bytes([header[12], header[13], header[14], header[15]]) as usize;
        if raw_len != expected_len {
            return Err(bad(&format!(
                "holds {raw_len} bytes, expected {expected_len}"
            )));
        }
        let encrypted = flags & FLAG_AES_GCM != 0;
        if encrypted != self.key.is_some() {
            return Err(bad(if encrypted {
                "encrypted, but no key was given"
            } else {
                "not encrypted, but this snapshot is"
            }));
        }
        let trailer = if encrypted { TAG_LEN } else { 4 };
        if frame.len() != HEADER_LEN + payload_len + trailer {
            return Err(bad(&format!(
                "length {} does not match its header (payload {payload_len})",
                frame.len()
            )));
        }
        if flags & FLAG_ZSTD == 0 && payload_len != raw_len {
            return Err(bad("raw payload length differs from the chunk length"));
        }
        let aad = self.binding.aad(index, header);
        let payload_end = HEADER_LEN + payload_len;
        let mut payload = frame[HEADER_LEN..payload_end].to_vec();
        match &self.key {
            Some(key) => {
                let mut nonce = [0u8; 12];
                nonce.copy_from_slice(&header[16..28]);
                let tag: [u8; TAG_LEN] = frame[payload_end..]
                    .try_into()
                    .map_err(|_| bad("truncated tag"))?;
                key.open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    Tag::from(tag),
                    &mut payload,
                    0..,
                )
                .map_err(|_| bad("authentication failed (wrong key, moved, swapped or damaged)"))?;
                // open_in_place_separate_tag decrypts in place; the slice is the plaintext.
            }
            None => {
                let crc = crc32c::crc32c_append(crc32c::crc32c(&aad), &payload);
                if frame[payload_end..] != crc.to_le_bytes() {
                    return Err(bad("checksum mismatch (moved, swapped or damaged)"));
                }
            }
        }
        if flags & FLAG_ZSTD == 0 {
            return Ok(payload);
        }
        let mut out = Vec::with_capacity(raw_len);
        DECOMPRESSOR
            .with_borrow_mut(|d| {
                let d = match d {
                    Some(d) => d,
                    None => d.insert(zstd::bulk::Decompressor::new()?),
                };
                // At most `raw_len` bytes: a frame that says it holds more fails here.
                d.decompress_to_buffer(&payload, &mut out)
            })
            .map_err(|e| bad(&format!("does not decompress: {e}")))?;
        if out.len() != raw_len {
            return Err(bad("decompressed to the wrong length"));
        }
        Ok(out)
    }

    /// The codec's settings.
    pub fn settings(&self) -> CodecSettings {
        self.settings
    }
}

thread_local! {
    /// Each thread's zstd decompression context, made once: making one per frame (as
    /// `zstd::bulk::decompress` does) cost ~15 % of decoding a 64 KiB chunk.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether every byte is zero (fast: compares machine words).
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to only reinterprets.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(v: u8, s: u8) -> Binding {
        Binding {
            volume: [v; 16],
            snapshot: [s; 16],
        }
    }

    fn data(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                if compressible {
                    (i / 64 % 7) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn round_trips_at_every_chunk_size_with_and_without_encryption() {
        let key = SecretKey::random().unwrap();
        for keyed in [true, false] {
            for size in [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20] {
                for compressible in [true, false] {
                    let mut c = Codec::new(
                        CodecSettings::default(),
                        keyed.then_some(&key),
                        binding(1, 2),
                    )
                    .unwrap();
                    let chunk = data(size as u64, size, compressible);
                    let frame = c.encode(7, &chunk).unwrap().unwrap();
                    if compressible {
                        assert!(frame.len() < chunk.len() / 4, "compressed {}", frame.len());
                    } else {
                        assert_eq!(frame[5] & FLAG_ZSTD, 0, "incompressible stored raw");
                        assert!(frame.len() <= chunk.len() + HEADER_LEN + TAG_LEN);
                    }
                    assert_eq!(c.decode(7, &frame, size).unwrap(), chunk);
                }
            }
        }
    }

    #[test]
    fn zero_chunks_are_not_stored() {
        let mut c = Codec::new(CodecSettings::default(), None, binding(1, 1)).unwrap();
        assert!(c.encode(0, &vec![0u8; 65536]).unwrap().is_none());
        let mut almost = vec![0u8; 65536];
        almost[65535] = 1;
        assert!(c.encode(0, &almost).unwrap().is_some());
    }

    #[test]
    fn every_kind_of_damage_is_an_integrity_error() {
        let key = SecretKey::random().unwrap();
        let mut c = Codec::new(CodecSettings::default(), Some(&key), binding(1, 2)).unwrap();
        let chunk = data(1, 65536, true);
        let frame = c.encode(5, &chunk).unwrap().unwrap();
        let is_integrity =
            |r: Result<Vec<u8>, OxError>| matches!(r, Err(OxError::Integrity { .. }));
        // Moved to another position.
        assert!(is_integrity(c.decode(6, &frame, 65536)));
        // Another snapshot or volume.
        let other = Codec::new(CodecSettings::default(), Some(&key), binding(1, 3)).unwrap();
        assert!(is_integrity(other.decode(5, &frame, 65536)));
        let other = Codec::new(CodecSettings::default(), Some(&key), binding(9, 2)).unwrap();
        assert!(is_integrity(other.decode(5, &frame, 65536)));
        // Wrong key.
        let wrong = Codec::new(
            CodecSettings::default(),
            Some(&SecretKey::random().unwrap()),
            binding(1, 2),
        )
        .unwrap();
        assert!(is_integrity(wrong.decode(5, &frame, 65536)));
        // No key.
        let none = Codec::new(CodecSettings::default(), None, binding(1, 2)).unwrap();
        assert!(is_integrity(none.decode(5, &frame, 65536)));
        // Every single-bit flip, and every truncation.
        for i in (0..frame.len()).step_by(7) {
            let mut f = frame.clone();
            f[i] ^= 0x10;
            assert!(c.decode(5, &f, 65536).is_err(), "flip at {i} accepted");
        }
        for cut in 0..frame.len() {
            assert!(c.decode(5, &frame[..cut], 65536).is_err());
        }
        // Wrong expected length (a lying index).
        assert!(is_integrity(c.decode(5, &frame, 131072)));
        // Unencrypted frames: same protection from the checksum.
        let mut p = Codec::new(CodecSettings::default(), None, binding(1, 2)).unwrap();
        let pf = p.encode(5, &chunk).unwrap().unwrap();
        assert!(is_integrity(p.decode(4, &pf, 65536)));
        let mut f = pf.clone();
        f[40] ^= 1;
        assert!(is_integrity(p.decode(5, &f, 65536)));
    }

    #[test]
    fn nonces_never_repeat() {
        let key = SecretKey::random().unwrap();
        let mut a = Codec::new(CodecSettings::default(), Some(&key), binding(1, 2)).unwrap();
        let mut b = Codec::new(CodecSettings::default(), Some(&key), binding(1, 2)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            for c in [&mut a, &mut b] {
                let f = c.encode(i, &[1u8; 100]).unwrap().unwrap();
                assert!(seen.insert(f[16..28].to_vec()), "nonce repeated");
            }
        }
    }

    #[test]
    fn compression_off_and_decoding_hostile_zstd() {
        let mut c = Codec::new(CodecSettings { level: 0 }, None, binding(1, 2)).unwrap();
        let chunk = data(3, 65536, true);
        let f = c.encode(1, &chunk).unwrap().unwrap();
        assert_eq!(f[5], 0);
        assert_eq!(c.decode(1, &f, 65536).unwrap(), chunk);
    }

    /// A frame whose checksum is right (no key: anyone can make one) but whose zstd
    /// payload holds more or fewer bytes than its header says: an integrity error, never
    /// data, and the thread's reused decompression context decodes the next frame.
    #[test]
    fn zstd_payloads_of_the_wrong_size_are_refused() {
        let b = binding(1, 2);
        let mut c = Codec::new(CodecSettings { level: 1 }, None, b).unwrap();
        let good = data(4, 65536, true);
        let good_frame = c.encode(3, &good).unwrap().unwrap();
        let c_frame = |chunk: &[u8]| {
            Codec::new(CodecSettings { level: 1 }, None, b)
                .unwrap()
                .encode(3, chunk)
                .unwrap()
                .unwrap()
        };
        // The payload of `holds` bytes in a frame whose header says 65,536.
        let forge = |holds: usize| {
            let mut f = c_frame(&data(5, holds, true));
            f[8..12].copy_from_slice(&65536u32.to_le_bytes());
            let end = f.len() - 4;
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&b.aad(3, &f[..HEADER_LEN])),
                &f[HEADER_LEN..end],
            );
            f[end..].copy_from_slice(&crc.to_le_bytes());
            f
        };
        for holds in [1 << 20, 65536 * 2, 65537, 65535, 1000] {
            let e = c.decode(3, &forge(holds), 65536).unwrap_err();
            assert!(
                matches!(e, OxError::Integrity { .. }) && e.to_string().contains("decompress"),
                "{holds}: {e}"
            );
            assert_eq!(c.decode(3, &good_frame, 65536).unwrap(), good);
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_chunks_round_trip(seed in any::<u64>(), len in 1usize..200_000, level in 0i32..4, keyed in any::<bool>(), index in any::<u64>()) {
            let mut x = seed | 1;
            let chunk: Vec<u8> = (0..len).map(|i| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; if seed % 3 == 0 { (i % 13) as u8 } else { x as u8 } }).collect();
            let key = SecretKey::random().unwrap();
            let binding = Binding { volume: [seed as u8; 16], snapshot: [7; 16] };
            let mut c = Codec::new(CodecSettings { level }, keyed.then_some(&key), binding).unwrap();
            match c.encode(index, &chunk).unwrap() {
                Some(frame) => prop_assert_eq!(c.decode(index, &frame, len).unwrap(), chunk),
                None => prop_assert!(is_zero(&chunk)),
            }
        }

        #[test]
        fn random_bytes_never_decode(bytes in proptest::collection::vec(any::<u8>(), 0..4096), keyed in any::<bool>()) {
            let key = SecretKey::random().unwrap();
            let c = Codec::new(CodecSettings::default(), keyed.then_some(&key), Binding { volume: [0; 16], snapshot: [0; 16] }).unwrap();
            prop_assert!(c.decode(0, &bytes, 65536).is_err());
        }
    }
}
