//! Read-back verification before publishing (`verify_before_publish`): every index
//! page and every data object a snapshot stored is fetched again — one GET each — and
//! every frame it stored is authenticated and decoded, before the manifest makes the
//! snapshot exist. A body that fails is fetched again on a fresh connection
//! ([`crate::fetch`]); one that keeps failing fails the snapshot, which then publishes
//! nothing. The store's checksums already refuse a body damaged on its way in; this
//! also catches a store that keeps or serves something else than it acknowledged.

use crate::error::OxError;
use crate::fetch::IntegrityCounters;
use crate::format::{Entry, PAGE_CHUNKS};
use crate::snapshot::Loaded;
use crate::store::ObjectStore;

/// What a read-back cost and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadBack {
    /// GETs made (index pages and data objects, refetches included).
    pub gets: u64,
    /// Bytes fetched.
    pub bytes: u64,
    /// Frames authenticated and decoded.
    pub frames: u64,
    /// Bodies that failed their check and were fetched again.
    pub refetches: u64,
}

/// A frame of this snapshot: its chunk, offset in its object, length.
type Frame = (u64, u64, u32);

/// Reads back what `loaded` (the snapshot about to be published, source 0) stored.
pub async fn read_back(store: &dyn ObjectStore, loaded: &Loaded) -> Result<ReadBack, OxError> {
    let counters = IntegrityCounters::default();
    let mut out = ReadBack::default();
    // Frames come in chunk order, so in object order: an object is checked once the
    // walk has passed it, holding one object's frames at a time.
    let mut current: Option<(u32, Vec<Frame>)> = None;
    let m = &loaded.manifest;
    for page in 0..m.page_count() {
        let (index, n) = loaded.page(store, page, Some(&counters)).await?;
        // An empty page was not stored: nothing fetched.
        out.gets += u64::from(n > 0);
        out.bytes += n as u64;
        for (i, entry) in index.entries.iter().enumerate() {
            let Entry::Frame {
                source: 0,
                object,
                offset,
                length,
            } = *entry
            else {
                continue;
            };
            let chunk = page * PAGE_CHUNKS + i as u64;
            match &mut current {
                Some((o, frames)) if *o == object => frames.push((chunk, offset, length)),
                _ => {
                    if let Some((o, frames)) = current.take() {
                        check_object(store, loaded, o, &frames, &counters, &mut out).await?;
                    }
                    current = Some((object, vec![(chunk, offset, length)]));
                }
            }
        }
    }
    if let Some((o, frames)) = current.take() {
        check_object(store, loaded, o, &frames, &counters, &mut out).await?;
    }
    if out.frames != m.stored_chunks {
        return Err(OxError::integrity(
            "read-back",
            format!(
                "{} frames read back, the snapshot stored {}",
                out.frames, m.stored_chunks
            ),
        ));
    }
    out.refetches = counters.refetches.into_inner();
    out.gets += out.refetches;
    Ok(out)
}

async fn check_object(
    store: &dyn ObjectStore,
    loaded: &Loaded,
    object: u32,
    frames: &[Frame],
    counters: &IntegrityCounters,
    out: &mut ReadBack,
) -> Result<(), OxError> {
    let m = &loaded.manifest;
    let own = &loaded.sources[0];
    let key = own
        .objects
        .get(object as usize)
        .ok_or_else(|| OxError::integrity("index", format!("object {object} unknown")))?;
    let codec = own.codec()?;
    let chunk_bytes = u64::from(m.chunk_bytes);
    let len = crate::fetch::checked(store, key, None, Some(counters), |body| {
        for &(chunk, offset, length) in frames {
            let end = offset.saturating_add(u64::from(length));
            let frame = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(a, b)| body.get(a..b))
                .ok_or_else(|| OxError::integrity(key, "object shorter than the index says"))?;
            let plain = (m.volume_bytes - chunk * chunk_bytes).min(chunk_bytes) as usize;
            codec.decode(chunk, frame, plain)?;
        }
        Ok(body.len() as u64)
    })
    .await?;
    out.gets += 1;
    out.bytes += len;
    out.frames += frames.len() as u64;
    Ok(())
}
