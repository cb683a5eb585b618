//! The snapshot format (version 3): object keys, the manifest written last, and the
//! paged chunk index. `docs/FORMAT.md` describes it for people; this module is the
//! reference implementation.
//!
//! Object keys are random identifiers under a prefix: they reveal neither the volume,
//! nor the snapshot's name, nor where a chunk lives.

use serde::{Deserialize, Serialize};

use crate::codec::{Codec, is_zero};
use crate::error::OxError;
use crate::keys::WrappedKey;

/// The newest format version this build writes: it writes 2 when a snapshot leaves no
/// index page out, so earlier readers still read it. Readers accept every version in
/// [`READABLE_VERSIONS`].
/// Version 2 added the manifest's `block_size`; version 3 its `empty_pages` (index
/// pages not stored because they hold nothing); frames and index pages are as in 1.
pub const FORMAT_VERSION: u32 = 3;
/// Versions this build reads.
pub const READABLE_VERSIONS: &[u32] = &[1, 2, 3];
/// Block sizes a volume (and so a manifest) may have.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];
/// Chunks described by one index page.
pub const PAGE_CHUNKS: u64 = 16384;
/// Bytes per index entry.
pub const ENTRY_LEN: usize = 20;
/// Index pages are encoded as frames at these pseudo chunk positions (far above any
/// real chunk index), so a page cannot be confused with a data frame.
pub const PAGE_INDEX_BASE: u64 = 1 << 62;

/// A random 128-bit identifier, hex-encoded in keys.
pub fn random_id() -> Result<[u8; 16], OxError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| OxError::Config(format!("no randomness: {e}")))?;
    Ok(id)
}

/// Key of a snapshot's manifest.
pub fn manifest_key(prefix: &str, snapshot: &[u8; 16]) -> String {
    format!("{prefix}ox1/m/{}", hex::encode(snapshot))
}

/// Key of a data object.
pub fn data_key(prefix: &str, object: &[u8; 16]) -> String {
    format!("{prefix}ox1/d/{}", hex::encode(object))
}

/// Key of an index page object.
pub fn index_key(prefix: &str, page: &[u8; 16]) -> String {
    format!("{prefix}ox1/i/{}", hex::encode(page))
}

/// Where a chunk's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Never written or all zeroes: reads as zeroes, nothing stored.
    Zero,
    /// A frame in a data object.
    Frame {
        /// Which snapshot's frame: 0 = this one, n = `lineage[n - 1]`.
        source: u16,
        /// Index into that snapshot's `objects`.
        object: u32,
        /// Byte offset within the object.
        offset: u64,
        /// Frame length.
        length: u32,
    },
}

const KIND_ZERO: u16 = 0;
const KIND_FRAME: u16 = 1;

/// One page of the chunk index: entries for `PAGE_CHUNKS` consecutive chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    /// Entries, one per chunk (the last page may be shorter).
    pub entries: Vec<Entry>,
}

impl IndexPage {
    /// Serialises the entries (before framing).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for e in &self.entries {
            let mut rec = [0u8; ENTRY_LEN];
            if let Entry::Frame {
                source,
                object,
                offset,
                length,
            } = *e
            {
                rec[0..2].copy_from_slice(&KIND_FRAME.to_le_bytes());
                rec[2..4].copy_from_slice(&source.to_le_bytes());
                rec[4..8].copy_from_slice(&object.to_le_bytes());
                rec[8..16].copy_from_slice(&offset.to_le_bytes());
                rec[16..20].copy_from_slice(&length.to_le_bytes());
            }
            b.extend_from_slice(&rec);
        }
        b
    }

    /// Parses entries; every field is checked against `limits`.
    pub fn from_bytes(bytes: &[u8], chunks: usize, limits: &PageLimits) -> Result<Self, OxError> {
        let bad = |r: String| OxError::integrity("index page", r);
        if bytes.len() != chunks * ENTRY_LEN {
            return Err(bad(format!("{} bytes for {chunks} entries", bytes.len())));
        }
        let mut entries = Vec::with_capacity(chunks);
        for rec in bytes.chunks_exact(ENTRY_LEN) {
            let kind = u16::from_le_bytes([rec[0], rec[1]]);
            let e = match kind {
                KIND_ZERO if is_zero(rec) => Entry::Zero,
                KIND_FRAME => {
                    let source = u16::from_le_bytes([rec[2], rec[3]]);
                    let object = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
                    let mut off = [0u8; 8];
                    off.copy_from_slice(&rec[8..16]);
                    let offset = u64::from_le_bytes(off);
                    let length = u32::from_le_bytes([rec[16], rec[17], rec[18], rec[19]]);
                    if usize::from(source) > limits.lineage {
                        return Err(bad(format!("source {source} beyond the lineage")));
                    }
                    if source == 0 && object as usize >= limits.objects {
                        return Err(bad(format!("object {object} beyond the object list")));
                    }
                    if length as usize > limits.max_frame {
                        return Err(bad(format!("frame length {length} too large")));
                    }
                    Entry::Frame {
                        source,
                        object,
                        offset,
                        length,
                    }
                }
                _ => return Err(bad(format!("unknown entry kind {kind}"))),
            };
            entries.push(e);
        }
        Ok(Self { entries })
    }

    /// Encodes the page as a frame of page number `page` (compressed, encrypted and
    /// bound like data frames).
    pub fn encode(&self, codec: &mut Codec, page: u64) -> Result<Vec<u8>, OxError> {
        codec.encode_always(PAGE_INDEX_BASE + page, &self.to_bytes())
    }

    /// Decodes page number `page` holding `chunks` entries.
    pub fn decode(
        codec: &Codec,
        page: u64,
        frame: &[u8],
        chunks: usize,
        limits: &PageLimits,
    ) -> Result<Self, OxError> {
        let bytes = codec.decode(PAGE_INDEX_BASE + page, frame, chunks * ENTRY_LEN)?;
        Self::from_bytes(&bytes, chunks, limits)
    }
}

/// The pseudo page number of a snapshot's working set ([`WorkingSet`]): its key is
/// that page's ([`page_key`]) and its frame is bound to `PAGE_INDEX_BASE + WORKING_SET_PAGE`
/// — far beyond any real page (a volume has at most about 2^34 of them) — so it cannot be
/// taken for a page or a data frame, and needs no field in the manifest.
pub const WORKING_SET_PAGE: u64 = 1 << 60;

/// The chunks the volume's hosts read in the interval before a snapshot, one bit per
/// chunk (64 to a little-endian word): what a new clone of the snapshot fetches first.
/// Stored, when not empty, as one frame like an index page (compressed, encrypted and
/// bound like them); it holds chunk numbers only, never data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// One bit per chunk.
    pub words: Vec<u64>,
}

impl WorkingSet {
    /// The largest share of a volume a working set may name (stored or fetched): one
    /// a host read nearly whole says nothing about where to start.
    pub const MAX_SHARE_PCT: u64 = 25;

    /// Bytes of the bitmap of a volume of `chunks` chunks.
    pub fn len_for(chunks: u64) -> usize {
        chunks.div_ceil(64) as usize * 8
    }

    /// Whether the set names no more than [`Self::MAX_SHARE_PCT`] of `chunks`.
    pub fn worth_storing(&self, chunks: u64) -> bool {
        self.len().saturating_mul(100) <= chunks.saturating_mul(Self::MAX_SHARE_PCT)
    }

    /// Chunks in the set, ascending.
    pub fn chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i as u64 * 64 + b)
        })
    }

    /// Chunks in the set.
    pub fn len(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no chunk is in the set.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Encodes the set as its frame.
    pub fn encode(&self, codec: &mut Codec) -> Result<Vec<u8>, OxError> {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        codec.encode_always(PAGE_INDEX_BASE + WORKING_SET_PAGE, &bytes)
    }

    /// Decodes the frame of a volume of `chunks` chunks: exactly its bitmap, with no
    /// bit beyond the last chunk.
    pub fn decode(codec: &Codec, frame: &[u8], chunks: u64) -> Result<Self, OxError> {
        let len = Self::len_for(chunks);
        let bytes = codec.decode(PAGE_INDEX_BASE + WORKING_SET_PAGE, frame, len)?;
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect();
        let tail = chunks % 64;
        if tail != 0 && words.last().is_some_and(|&w| w >> tail != 0) {
            return Err(OxError::integrity(
                "working set",
                format!("names a chunk beyond the volume's {chunks}"),
            ));
        }
        Ok(Self { words })
    }
}

/// Bounds an index entry must respect.
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    /// Ancestors in the lineage.
    pub lineage: usize,
    /// Objects of this snapshot.
    pub objects: usize,
    /// Largest frame possible for the chunk size.
    pub max_frame: usize,
}

/// Key of index page `page` of a snapshot: derived from the snapshot's random index
/// salt, so the manifest need not list pages (it stays the same size whatever the
/// volume size) and keys still reveal nothing.
pub fn page_key(prefix: &str, salt: &[u8; 16], page: u64) -> String {
    let mut input = salt.to_vec();
    input.extend_from_slice(&page.to_le_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest.as_ref()[..16]);
    index_key(prefix, &id)
}

/// The key and message of a manifest's `empty_pages` tag: HMAC-SHA256 under a key
/// derived from the snapshot's data key, over what says which bytes a page covers
/// (snapshot, volume, index salt, volume and chunk size) and the ranges.
fn empty_pages_mac(key: &crate::keys::SecretKey, m: &Manifest) -> (ring::hmac::Key, Vec<u8>) {
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.bytes());
    let sub = ring::hmac::sign(&derive, b"ox-empty-pages-key-v1");
    let mut msg = b"ox-empty-pages-v1\0".to_vec();
    for text in [&m.snapshot, &m.volume, &m.index_salt] {
        msg.extend_from_slice(text.as_bytes());
        msg.push(0);
    }
    msg.extend_from_slice(&m.volume_bytes.to_le_bytes());
    msg.extend_from_slice(&m.chunk_bytes.to_le_bytes());
    for r in &m.empty_pages {
        msg.extend_from_slice(&r[0].to_le_bytes());
        msg.extend_from_slice(&r[1].to_le_bytes());
    }
    (
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sub.as_ref()),
        msg,
    )
}

/// An ancestor whose frames this snapshot references.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    /// Its snapshot ID (hex).
    pub snapshot: String,
    /// Its manifest key.
    pub manifest: String,
}

/// The manifest: written last; a snapshot without one does not exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// Snapshot ID (hex of 16 random bytes).
    pub snapshot: String,
    /// Volume ID (hex of 16 bytes).
    pub volume: String,
    /// Parent snapshot ID, for incremental snapshots.
    pub parent: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u32,
    /// The volume's logical block size: a clone or restore has the same (format 2;
    /// a format 1 manifest reads as 512).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// zstd level used (0: none).
    pub zstd_level: i32,
    /// The data key, wrapped; `None` when not encrypted.
    pub key: Option<WrappedKey>,
    /// Snapshots whose frames this one references (`Entry::Frame::source` - 1).
    pub lineage: Vec<Ancestor>,
    /// Data objects of this snapshot, by key.
    pub objects: Vec<String>,
    /// Key prefix of the index pages (the store prefix the snapshot was written with).
    pub index_prefix: String,
    /// Random salt (hex) from which index page keys derive: see [`page_key`]. Page n
    /// covers chunks [n × PAGE_CHUNKS, ...).
    pub index_salt: String,
    /// Format 3: index pages not stored because every chunk they cover is zero, as
    /// ascending ranges `[first, end)` of page numbers. A sparse volume's snapshot
    /// stores pages only where it holds data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub empty_pages: Vec<[u64; 2]>,
    /// When encrypted: an HMAC (hex) of `empty_pages` under a key derived from the
    /// data key (`empty_pages_mac`), so only whoever holds the key can declare pages
    /// empty (the checksum below is no secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_pages_tag: Option<String>,
    /// Chunks stored by this snapshot (not referenced).
    pub stored_chunks: u64,
    /// Bytes of frames stored by this snapshot.
    pub stored_bytes: u64,
    /// Format 2: SHA-256 (hex) of the manifest serialised compactly without this
    /// field, so a manifest damaged on its way is refused (and fetched again) rather
    /// than trusted. Only in the stored bytes: `None` in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

fn default_block_size() -> u32 {
    BLOCK_SIZES[0]
}

impl Manifest {
    /// Number of chunks in the volume.
    pub fn chunks(&self) -> u64 {
        self.volume_bytes.div_ceil(u64::from(self.chunk_bytes))
    }

    /// Entries in page `page`.
    pub fn page_chunks(&self, page: u64) -> usize {
        let start = page * PAGE_CHUNKS;
        self.chunks().saturating_sub(start).min(PAGE_CHUNKS) as usize
    }

    /// Serialises (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        let sealed = Self {
            checksum: Some(self.digest()),
            ..self.clone()
        };
        serde_json::to_vec_pretty(&sealed).unwrap_or_default()
    }

    /// SHA-256 (hex) of this manifest serialised compactly without its checksum.
    fn digest(&self) -> String {
        let bare = Self {
            checksum: None,
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&bare).unwrap_or_default();
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes))
    }

    /// Parses and checks a manifest; never trusts its numbers.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OxError> {
        if bytes.len() > 64 << 20 {
            return Err(OxError::integrity("manifest", "larger than 64 MiB"));
        }
        let mut m: Self = serde_json::from_slice(bytes)
            .map_err(|e| OxError::integrity("manifest", format!("not a manifest: {e}")))?;
        // The checksum first: a damaged `format` is damage (fetched again), not a
        // version this build cannot read.
        let sum = m.checksum.take();
        if sum.as_ref().is_some_and(|s| *s != m.digest()) {
            return Err(OxError::integrity("manifest", "checksum does not match"));
        }
        if !READABLE_VERSIONS.contains(&m.format) {
            return Err(OxError::Format(format!(
                "manifest format {} (this build reads {READABLE_VERSIONS:?})",
                m.format
            )));
        }
        // Format 1 had none.
        if sum.is_none() && m.format >= 2 {
            return Err(OxError::integrity("manifest", "no checksum"));
        }
        if !crate::codec::CHUNK_SIZES.contains(&(m.chunk_bytes as usize))
            || !m.chunk_bytes.is_power_of_two()
        {
            return Err(OxError::integrity(
                "manifest",
                format!("chunk size {}", m.chunk_bytes),
            ));
        }
        if !BLOCK_SIZES.contains(&m.block_size)
            || m.block_size > m.chunk_bytes
            || !m.volume_bytes.is_multiple_of(u64::from(m.block_size))
        {
            return Err(OxError::integrity(
                "manifest",
                format!(
                    "block size {} for {} bytes in chunks of {}",
                    m.block_size, m.volume_bytes, m.chunk_bytes
                ),
            ));
        }
        parse_id(&m.index_salt)?;
        if m.format < 3 && (!m.empty_pages.is_empty() || m.empty_pages_tag.is_some()) {
            return Err(OxError::integrity(
                "manifest",
                format!("empty_pages in a format {} manifest", m.format),
            ));
        }
        let mut end = 0;
        for &[first, stop] in &m.empty_pages {
            if first < end || stop <= first || stop > m.page_count() {
                return Err(OxError::integrity(
                    "manifest",
                    format!("empty_pages range [{first}, {stop})"),
                ));
            }
            end = stop;
        }
        if m.lineage.len() > usize::from(u16::MAX) {
            return Err(OxError::integrity("manifest", "lineage too long"));
        }
        Ok(m)
    }

    /// Number of index pages.
    pub fn page_count(&self) -> u64 {
        self.chunks().div_ceil(PAGE_CHUNKS)
    }

    /// Checks that the data key vouches for `empty_pages` (an encrypted snapshot's
    /// manifest may not declare pages empty without it); `key`: the unwrapped data key.
    pub fn check_empty_pages(&self, key: Option<&crate::keys::SecretKey>) -> Result<(), OxError> {
        let Some(key) = key.filter(|_| !self.empty_pages.is_empty()) else {
            return Ok(());
        };
        let (mac, msg) = empty_pages_mac(key, self);
        let tag = self
            .empty_pages_tag
            .as_deref()
            .and_then(|t| hex::decode(t).ok())
            .unwrap_or_default();
        ring::hmac::verify(&mac, &msg, &tag).map_err(|_| {
            OxError::integrity("manifest", "empty_pages not vouched for by the data key")
        })
    }

    /// Sets `empty_pages_tag` for the data key `key` (none without empty pages).
    pub fn seal_empty_pages(&mut self, key: &crate::keys::SecretKey) {
        self.empty_pages_tag = (!self.empty_pages.is_empty()).then(|| {
            let (mac, msg) = empty_pages_mac(key, self);
            hex::encode(ring::hmac::sign(&mac, &msg).as_ref())
        });
    }

    /// Whether index page `page` was not stored because it holds nothing.
    pub fn page_is_empty(&self, page: u64) -> bool {
        let i = self.empty_pages.partition_point(|r| r[1] <= page);
        self.empty_pages.get(i).is_some_and(|r| r[0] <= page)
    }

    /// Index pages stored.
    pub fn stored_pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.page_count()).filter(|&p| !self.page_is_empty(p))
    }

    /// Key of index page `page`.
    pub fn page_key(&self, page: u64) -> Result<String, OxError> {
        Ok(page_key(
            &self.index_prefix,
            &parse_id(&self.index_salt)?,
            page,
        ))
    }

    /// Key of this snapshot's working set ([`WorkingSet`]), which may not exist.
    pub fn working_set_key(&self) -> Result<String, OxError> {
        self.page_key(WORKING_SET_PAGE)
    }

    /// Bounds for this snapshot's index entries.
    pub fn page_limits(&self) -> PageLimits {
        PageLimits {
            lineage: self.lineage.len(),
            objects: self.objects.len(),
            max_frame: self.chunk_bytes as usize + 1024,
        }
    }

    /// The frame binding of this snapshot's frames.
    pub fn binding(&self) -> Result<crate::codec::Binding, OxError> {
        Ok(crate::codec::Binding {
            volume: parse_id(&self.volume)?,
            snapshot: parse_id(&self.snapshot)?,
        })
    }
}

/// Parses a hex snapshot or volume ID.
pub fn parse_id(text: &str) -> Result<[u8; 16], OxError> {
    hex::decode(text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| OxError::integrity("manifest", format!("bad identifier {text:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Binding, CodecSettings};
    use crate::keys::SecretKey;

    #[test]
    fn index_pages_round_trip_and_reject_lies() {
        let page = IndexPage {
            entries: vec![
                Entry::Zero,
                Entry::Frame {
                    source: 0,
                    object: 2,
                    offset: 123_456,
                    length: 70_000,
                },
                Entry::Frame {
                    source: 1,
                    object: 9,
                    offset: 0,
                    length: 100,
                },
            ],
        };
        let limits = PageLimits {
            lineage: 1,
            objects: 3,
            max_frame: 1 << 20,
        };
        let key = SecretKey::random().unwrap();
        let b = Binding {
            volume: [1; 16],
            snapshot: [2; 16],
        };
        let mut codec = Codec::new(CodecSettings::default(), Some(&key), b).unwrap();
        let frame = page.encode(&mut codec, 4).unwrap();
        assert_eq!(
            IndexPage::decode(&codec, 4, &frame, 3, &limits).unwrap(),
            page
        );
        assert!(
            IndexPage::decode(&codec, 5, &frame, 3, &limits).is_err(),
            "page moved"
        );
        let tight = PageLimits {
            objects: 2,
            ..limits
        };
        assert!(
            IndexPage::decode(&codec, 4, &frame, 3, &tight).is_err(),
            "object beyond list"
        );
        let no_lineage = PageLimits {
            lineage: 0,
            ..limits
        };
        assert!(IndexPage::decode(&codec, 4, &frame, 3, &no_lineage).is_err());
        assert!(
            IndexPage::decode(&codec, 4, &frame, 2, &limits).is_err(),
            "count mismatch"
        );
    }

    #[test]
    fn manifests_are_checked() {
        let m = Manifest {
            empty_pages: Vec::new(),
            empty_pages_tag: None,
            format: FORMAT_VERSION,
            snapshot: hex::encode([3u8; 16]),
            volume: hex::encode([4u8; 16]),
            parent: None,
            created: 1,
            volume_bytes: 1 << 40,
            chunk_bytes: 1 << 20,
            block_size: 4096,
            zstd_level: 1,
            key: None,
            lineage: vec![],
            objects: vec![],
            index_prefix: String::new(),
            index_salt: hex::encode([5u8; 16]),
            stored_chunks: 0,
            stored_bytes: 0,
            checksum: None,
        };
        assert_eq!(m.chunks(), 1 << 20);
        // A flipped bit anywhere is refused, even one that leaves valid JSON.
        let bytes = m.to_bytes();
        let field = b"\"stored_chunks\": ";
        let at = bytes.windows(field.len()).position(|w| w == field).unwrap() + field.len();
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x01; // 0 becomes 1: still a manifest, but not this one
        assert!(serde_json::from_slice::<serde_json::Value>(&flipped).is_ok());
        assert!(Manifest::from_bytes(&flipped).is_err());
        // A flipped version number is damage too (fetched again), not a format this
        // build cannot read; the fault test found "format": 2 read as 0.
        let field = b"\"format\": ";
        let at = bytes.windows(field.len()).position(|w| w == field).unwrap() + field.len();
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x02;
        assert!(matches!(
            Manifest::from_bytes(&flipped),
            Err(OxError::Integrity { .. })
        ));
        let mut unsealed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        unsealed.as_object_mut().unwrap().remove("checksum");
        assert!(Manifest::from_bytes(&serde_json::to_vec(&unsealed).unwrap()).is_err());
        assert_eq!(Manifest::from_bytes(&m.to_bytes()).unwrap(), m);
        let mut future = m.clone();
        future.format = 99;
        assert!(matches!(
            Manifest::from_bytes(&future.to_bytes()),
            Err(OxError::Format(_))
        ));
        let mut lying = m.clone();
        lying.index_salt = "xyz".into();
        assert!(Manifest::from_bytes(&lying.to_bytes()).is_err());
        assert_ne!(m.page_key(0).unwrap(), m.page_key(1).unwrap());
        let mut odd = m.clone();
        odd.chunk_bytes = 1000;
        assert!(Manifest::from_bytes(&odd.to_bytes()).is_err());
        for (bs, volume_bytes) in [(1024, 1 << 40), (0, 1 << 40), (4096, (1 << 40) + 512)] {
            let mut odd = m.clone();
            (odd.block_size, odd.volume_bytes) = (bs, volume_bytes);
            assert!(Manifest::from_bytes(&odd.to_bytes()).is_err(), "{bs}");
        }
        // Format 1 had no block size: 512.
        let mut v1: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        v1["format"] = 1.into();
        v1.as_object_mut().unwrap().remove("block_size");
        v1.as_object_mut().unwrap().remove("checksum");
        let read = Manifest::from_bytes(&serde_json::to_vec(&v1).unwrap()).unwrap();
        assert_eq!((read.format, read.block_size), (1, 512));
        assert!(Manifest::from_bytes(b"{\"format\":1").is_err());
        // Empty pages: ascending, disjoint ranges within the index (1 TiB of 1 MiB
        // chunks: 64 pages), and only in format 3.
        let mut sparse = m.clone();
        sparse.empty_pages = vec![[0, 5], [6, 64]];
        let read = Manifest::from_bytes(&sparse.to_bytes()).unwrap();
        assert!(read.page_is_empty(0) && read.page_is_empty(4) && read.page_is_empty(63));
        assert!(!read.page_is_empty(5));
        assert_eq!(read.stored_pages().collect::<Vec<_>>(), vec![5]);
        for ranges in [
            vec![[0, 5], [4, 8]],
            vec![[3, 3]],
            vec![[0, 65]],
            vec![[6, 8], [0, 2]],
        ] {
            let mut odd = m.clone();
            odd.empty_pages = ranges.clone();
            assert!(Manifest::from_bytes(&odd.to_bytes()).is_err(), "{ranges:?}");
        }
        let mut old = sparse.clone();
        old.format = 2;
        assert!(Manifest::from_bytes(&old.to_bytes()).is_err());
        // With a data key, only its tag vouches for them.
        let key = crate::keys::SecretKey::random().unwrap();
        assert!(sparse.check_empty_pages(None).is_ok());
        assert!(sparse.check_empty_pages(Some(&key)).is_err());
        sparse.seal_empty_pages(&key);
        assert!(sparse.check_empty_pages(Some(&key)).is_ok());
        let other = crate::keys::SecretKey::random().unwrap();
        assert!(sparse.check_empty_pages(Some(&other)).is_err());
        // The ranges and what says which bytes a page covers are both bound.
        let mut wider = sparse.clone();
        wider.empty_pages = vec![[0, 6], [6, 64]];
        assert!(wider.check_empty_pages(Some(&key)).is_err());
        let mut regeared = sparse.clone();
        (regeared.chunk_bytes, regeared.volume_bytes) = (1 << 16, 1 << 36);
        assert!(regeared.check_empty_pages(Some(&key)).is_err());
    }

    #[test]
    fn keys_reveal_nothing() {
        let id = random_id().unwrap();
        let k = data_key("tenant/", &id);
        assert!(k.starts_with("tenant/ox1/d/") && k.len() == "tenant/ox1/d/".len() + 32);
        assert_ne!(random_id().unwrap(), id);
    }
}
