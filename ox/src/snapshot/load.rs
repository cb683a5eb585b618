//! Loading a snapshot: its manifest, its ancestors' manifests and data keys, and index
//! pages on demand.

use crate::codec::{Binding, Codec, CodecSettings};
use crate::error::OxError;
use crate::fetch::IntegrityCounters;
use crate::format::{Entry, IndexPage, Manifest};
use crate::keys::{self, Kek, SecretKey};
use crate::store::ObjectStore;

/// A loaded snapshot: its manifest and what decoding its frames (and its ancestors')
/// needs. Index pages are loaded on demand.
pub struct Loaded {
    /// The manifest.
    pub manifest: Manifest,
    /// Its key.
    pub manifest_key: String,
    /// Decoding context per source: 0 = this snapshot, n = `lineage[n-1]`.
    pub sources: Vec<Source>,
}

/// How to decode the frames of one snapshot.
#[derive(Debug, Clone)]
pub struct Source {
    /// Data key, if encrypted.
    pub key: Option<SecretKey>,
    /// Frame binding.
    pub binding: Binding,
    /// Its data objects.
    pub objects: Vec<String>,
    /// zstd level it was written with (informational).
    pub zstd_level: i32,
}

impl Source {
    /// A decoder for this source's frames.
    pub fn codec(&self) -> Result<Codec, OxError> {
        Codec::new(CodecSettings { level: 0 }, self.key.as_ref(), self.binding)
    }
}

/// Reads manifest `key` and the manifests of its lineage (one GET each; no index pages).
pub async fn load(store: &dyn ObjectStore, key: &str, keks: &[Kek]) -> Result<Loaded, OxError> {
    let manifest = fetch_manifest(store, key).await?;
    let mut sources = vec![source_of(&manifest, keks)?];
    for a in &manifest.lineage {
        let m = fetch_manifest(store, &a.manifest).await?;
        if m.snapshot != a.snapshot {
            return Err(OxError::integrity(
                &a.manifest,
                "ancestor manifest names another snapshot",
            ));
        }
        sources.push(source_of(&m, keks)?);
    }
    Ok(Loaded {
        manifest,
        manifest_key: key.to_string(),
        sources,
    })
}

/// Manifest `key`, fetched again if what came does not parse (see [`crate::fetch`]).
pub(crate) async fn fetch_manifest(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Manifest, OxError> {
    crate::fetch::checked(store, key, None, None, |b| Manifest::from_bytes(&b)).await
}

fn source_of(m: &Manifest, keks: &[Kek]) -> Result<Source, OxError> {
    let key = m
        .key
        .as_ref()
        .map(|w| keys::unwrap(keks, w, &m.snapshot))
        .transpose()?;
    m.check_empty_pages(key.as_ref())?;
    Ok(Source {
        key,
        binding: m.binding()?,
        objects: m.objects.clone(),
        zstd_level: m.zstd_level,
    })
}

impl Loaded {
    /// The bytes of `chunk`, whose index entry is `entry`: `None` for a zero chunk,
    /// else its frame fetched (again, on a fresh connection, while it fails its check;
    /// counted in `counters`) and decoded. `on_body` sees the length of every body
    /// fetched.
    pub async fn chunk(
        &self,
        store: &dyn ObjectStore,
        chunk: u64,
        entry: Entry,
        counters: Option<&IntegrityCounters>,
        on_body: impl Fn(usize),
    ) -> Result<Option<Vec<u8>>, OxError> {
        if entry == Entry::Zero {
            return Ok(None);
        }
        let mut decoded = self
            .run(store, &[(chunk, entry)], counters, on_body)
            .await?;
        Ok(decoded.pop())
    }

    /// The bytes of a run of chunks whose frames lie back to back in one data object
    /// (`chunks`: each chunk with its index entry, in the object's order), fetched in
    /// one ranged GET (again, on a fresh connection, while any frame fails its check;
    /// counted in `counters`) and decoded. `on_body` sees the length of every body
    /// fetched.
    pub async fn run(
        &self,
        store: &dyn ObjectStore,
        chunks: &[(u64, Entry)],
        counters: Option<&IntegrityCounters>,
        on_body: impl Fn(usize),
    ) -> Result<Vec<Vec<u8>>, OxError> {
        let mut frames = Vec::with_capacity(chunks.len());
        let mut at = None;
        for &(chunk, entry) in chunks {
            let Entry::Frame {
                source,
                object,
                offset,
                length,
            } = entry
            else {
                return Err(OxError::Config(format!("chunk {chunk} has no frame")));
            };
            let (s, o, end) = at.unwrap_or((source, object, offset));
            if (s, o, end) != (source, object, offset) {
                return Err(OxError::Config(format!(
                    "chunk {chunk}: its frame does not follow the run's"
                )));
            }
            let end = offset.checked_add(u64::from(length)).ok_or_else(|| {
                OxError::integrity(format!("chunk {chunk}"), "frame offset out of range")
            })?;
            at = Some((source, object, end));
            frames.push((chunk, length as usize));
        }
        let (Some(&(_, first)), Some((source, object, end))) = (chunks.first(), at) else {
            return Ok(Vec::new());
        };
        let Entry::Frame { offset, .. } = first else {
            return Ok(Vec::new());
        };
        let m = &self.manifest;
        let chunk_bytes = u64::from(m.chunk_bytes);
        let src = self
            .sources
            .get(usize::from(source))
            .ok_or_else(|| OxError::integrity("index", format!("source {source} unknown")))?;
        let key = src
            .objects
            .get(object as usize)
            .ok_or_else(|| OxError::integrity("index", format!("object {object} unknown")))?;
        let codec = src.codec()?;
        let total = end - offset;
        crate::fetch::checked(store, key, Some((offset, total)), counters, |body| {
            on_body(body.len());
            if body.len() as u64 != total {
                return Err(OxError::integrity(
                    key,
                    "object shorter than the index says",
                ));
            }
            let mut rest = &body[..];
            let mut out = Vec::with_capacity(frames.len());
            for &(chunk, length) in &frames {
                let (frame, after) = rest.split_at(length);
                rest = after;
                let plain = m
                    .volume_bytes
                    .saturating_sub(chunk * chunk_bytes)
                    .min(chunk_bytes);
                out.push(codec.decode(chunk, frame, plain as usize)?);
            }
            Ok(out)
        })
        .await
    }

    /// The snapshot's working set, if it stored one, and the bytes fetched (fetched
    /// again if it fails its check, counted in `counters`; damage that stays is an
    /// error).
    pub async fn working_set(
        &self,
        store: &dyn ObjectStore,
        counters: Option<&IntegrityCounters>,
    ) -> Result<Option<(crate::format::WorkingSet, usize)>, OxError> {
        let key = self.manifest.working_set_key()?;
        let codec = self.sources[0].codec()?;
        let chunks = self.manifest.chunks();
        match crate::fetch::checked(store, &key, None, counters, |frame| {
            Ok((
                crate::format::WorkingSet::decode(&codec, &frame, chunks)?,
                frame.len(),
            ))
        })
        .await
        {
            Ok(set) => Ok(Some(set)),
            Err(OxError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Loads index page `page` (fetched again if it fails its check, counted in
    /// `counters`); also returns the bytes fetched.
    pub async fn page(
        &self,
        store: &dyn ObjectStore,
        page: u64,
        counters: Option<&IntegrityCounters>,
    ) -> Result<(IndexPage, usize), OxError> {
        if page >= self.manifest.page_count() {
            return Err(OxError::integrity(
                "manifest",
                format!("no index page {page}"),
            ));
        }
        if self.manifest.page_is_empty(page) {
            // Not stored: every chunk it covers is zero (the data key vouched for it).
            let entries = vec![Entry::Zero; self.manifest.page_chunks(page)];
            return Ok((IndexPage { entries }, 0));
        }
        let codec = self.sources[0].codec()?;
        let key = self.manifest.page_key(page)?;
        crate::fetch::checked(store, &key, None, counters, |frame| {
            let decoded = IndexPage::decode(
                &codec,
                page,
                &frame,
                self.manifest.page_chunks(page),
                &self.manifest.page_limits(),
            )?;
            Ok((decoded, frame.len()))
        })
        .await
    }
}
