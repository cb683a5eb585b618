//! Storing what a snapshot writes: frames packed into data objects uploaded in the
//! background, and index pages as they fill.

use std::cell::Cell;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use crate::codec::Codec;
use crate::error::OxError;
use crate::format::{self, Entry, IndexPage, PAGE_CHUNKS};
use crate::store::ObjectStore;
use crate::throttle::{Class, Throttle};

use super::SnapshotOptions;

/// Bytes of sealed objects uploading at once while encoding goes on: 32 MiB, four of
/// the default 8 MiB objects, and as many more of smaller ones (a store 150 ms away
/// needs ~15 MB in flight to fill 400 Mbit/s, and each PUT's connection starts from
/// TCP's initial window).
pub const UPLOAD_BYTES_IN_FLIGHT: usize = 32 << 20;

/// Uploads let be in flight however large their objects, so large objects still
/// overlap (objects may be up to 1 GiB: four then hold 4 GiB while they upload, their
/// PUTs' copies as much again, and the object being filled one more).
const UPLOADS_IN_FLIGHT: usize = 4;

/// The most uploads in flight however small their objects (each holds a connection).
const MOST_UPLOADS_IN_FLIGHT: usize = 64;

/// Buffers of stored objects kept for the next objects: one, as one object is sealed
/// as one is stored in the steady state (with objects of up to 1 GiB, a spare is
/// memory held while the next fills).
const SPARE_OBJECTS: usize = 1;

/// A sealed object on its way to the store.
struct Upload<'a> {
    /// Waits for the throttle, then PUTs the object; gives its buffer back if nothing
    /// else holds it.
    put: crate::store::BoxFuture<'a, Result<Option<Vec<u8>>, OxError>>,
    bytes: usize,
    /// The object's number (its place in [`Packer::objects`]).
    object: usize,
    /// The throttle has let the object's bytes by: its PUT is under way.
    admitted: Rc<Cell<bool>>,
}

/// Packs frames into data objects and uploads sealed objects in the background while
/// the next chunks are read and encoded: as many PUTs as fit in
/// [`UPLOAD_BYTES_IN_FLIGHT`] (or [`UPLOADS_IN_FLIGHT`], if more; at most
/// [`MOST_UPLOADS_IN_FLIGHT`]). An object is sealed (its upload begun) once the
/// uploads have room for it and none waits for the throttle, so a throttled snapshot
/// encodes no further ahead of what its limit lets by than that object and the one
/// being filled (the volume's own read-ahead aside).
pub(super) struct Packer<'a> {
    store: &'a dyn ObjectStore,
    throttle: &'a Throttle,
    opts: &'a SnapshotOptions,
    current: Vec<u8>,
    /// Buffers of objects stored, for the next ones: a new object's buffer is fresh
    /// memory, which the kernel faults in and zeroes page by page as frames fill it
    /// (8 % of the two OX cores' samples in a snapshot into S3).
    spare: Vec<Vec<u8>>,
    /// Data objects sealed so far, in order (the last ones may still be uploading).
    pub(super) objects: Vec<String>,
    /// Bytes of the objects sealed so far.
    pub(super) uploaded: u64,
    in_flight: Vec<Upload<'a>>,
    /// The first object whose upload failed: never counted stored, nor any after it.
    failed: Option<usize>,
}

impl<'a> Packer<'a> {
    /// A packer going on after `objects` (already stored, `uploaded` bytes).
    pub(super) fn new(
        store: &'a dyn ObjectStore,
        throttle: &'a Throttle,
        opts: &'a SnapshotOptions,
        objects: Vec<String>,
        uploaded: u64,
    ) -> Self {
        Self {
            store,
            throttle,
            opts,
            current: Vec::new(),
            spare: Vec::new(),
            objects,
            uploaded,
            in_flight: Vec::new(),
            failed: None,
        }
    }

    /// Appends a frame; returns (object number, offset).
    pub(super) async fn add(&mut self, frame: &[u8]) -> Result<(u32, u64), OxError> {
        let at = (self.objects.len() as u32, self.current.len() as u64);
        if self.current.is_empty() {
            if let Some(spare) = self.spare.pop() {
                debug_assert!(spare.is_empty(), "a spare object buffer holds bytes");
                self.current = spare;
            }
            // The object's whole size at once: it closes at the frame that reaches
            // `object_bytes`, and a frame holds at most its chunk. Grown by doubling,
            // it was copied about once more and faulted in again on the way.
            let most_frame =
                crate::codec::HEADER_LEN + *crate::codec::CHUNK_SIZES.end() + crate::codec::TAG_LEN;
            self.current
                .reserve(self.opts.object_bytes + most_frame.max(frame.len()));
        }
        self.current.extend_from_slice(frame);
        if self.current.len() >= self.opts.object_bytes {
            self.seal().await?;
        }
        Ok(at)
    }

    pub(super) async fn seal(&mut self) -> Result<(), OxError> {
        if self.current.is_empty() {
            return Ok(());
        }
        let bytes = self.current.len();
        self.until(|p| p.has_room(bytes)).await?;
        let key = format::data_key(&self.opts.prefix, &format::random_id()?);
        let data = std::mem::take(&mut self.current);
        self.uploaded += data.len() as u64;
        self.objects.push(key.clone());
        let (store, throttle, opts) = (self.store, self.throttle, self.opts);
        let admitted = Rc::new(Cell::new(false));
        let let_by = Rc::clone(&admitted);
        let put = Box::pin(async move {
            let share = async {
                throttle
                    .acquire(&opts.volume_name, Class::Background, data.len() as u64)
                    .await;
                let_by.set(true);
                Ok(())
            };
            futures_lite::future::or(share, cancelled(opts)).await?;
            put_patiently(store, &key, data, opts).await
        });
        self.in_flight.push(Upload {
            put,
            bytes,
            object: self.objects.len() - 1,
            admitted,
        });
        assert!(
            self.in_flight.len() <= MOST_UPLOADS_IN_FLIGHT,
            "uploads past their most"
        );
        // Its first turn: the throttle sees it now.
        self.drive().await
    }

    /// Whether an object of `bytes` may be sealed now: no upload waits for the
    /// throttle, and with it the uploads fit in [`UPLOAD_BYTES_IN_FLIGHT`] or are at
    /// most [`UPLOADS_IN_FLIGHT`], and are no more than [`MOST_UPLOADS_IN_FLIGHT`].
    fn has_room(&self, bytes: usize) -> bool {
        let waiting = self.in_flight.iter().any(|u| !u.admitted.get());
        let bytes = bytes + self.in_flight.iter().map(|u| u.bytes).sum::<usize>();
        let uploads = self.in_flight.len() + 1;
        !waiting
            && uploads <= MOST_UPLOADS_IN_FLIGHT
            && (bytes <= UPLOAD_BYTES_IN_FLIGHT || uploads <= UPLOADS_IN_FLIGHT)
    }

    /// Drives the uploads, dropping the finished ones, until `done` holds (or one fails).
    async fn until(&mut self, done: impl Fn(&Self) -> bool) -> Result<(), OxError> {
        std::future::poll_fn(|cx| {
            let mut i = 0;
            while i < self.in_flight.len() {
                match self.in_flight[i].put.as_mut().poll(cx) {
                    Poll::Ready(Ok(buffer)) => {
                        self.in_flight.remove(i);
                        if let Some(mut buffer) = buffer
                            && self.spare.len() < SPARE_OBJECTS
                        {
                            buffer.clear();
                            self.spare.push(buffer);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        // Finished: never polled again, whatever the caller does next,
                        // and never counted stored.
                        let object = self.in_flight.remove(i).object;
                        self.failed = Some(self.failed.map_or(object, |f| f.min(object)));
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => i += 1,
                }
            }
            if done(self) {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// How many of the objects sealed so far, from the first, are stored (uploads
    /// finish in any order; the first one still uploading, or whose upload failed,
    /// ends the count).
    pub(super) fn stored(&self) -> usize {
        self.in_flight
            .iter()
            .map(|u| u.object)
            .chain(self.failed)
            .min()
            .unwrap_or(self.objects.len())
    }

    /// Waits until the first `objects` sealed are stored (driving every upload); an
    /// error if one of them failed to upload (now, or before).
    pub(super) async fn stored_through(&mut self, objects: usize) -> Result<(), OxError> {
        assert!(
            objects <= self.objects.len(),
            "waiting for objects not sealed"
        );
        if let Some(f) = self.failed.filter(|f| *f < objects) {
            return Err(OxError::Config(format!(
                "the upload of data object {f} of this snapshot failed"
            )));
        }
        self.until(|p| p.stored() >= objects).await
    }

    /// Gives every upload in flight a turn; collects the finished ones.
    pub(super) async fn drive(&mut self) -> Result<(), OxError> {
        self.until(|_| true).await
    }

    /// Seals the last object and waits for every upload.
    pub(super) async fn finish(&mut self) -> Result<(), OxError> {
        self.seal().await?;
        self.until(|p| p.in_flight.is_empty()).await
    }
}

/// PUTs `data`, waiting out an unavailable store as [`patiently`] does (each try
/// shares the bytes: no copy of the object per try, the first included). Gives the
/// buffer back once stored, unless the store still holds a share of it.
async fn put_patiently(
    store: &dyn ObjectStore,
    key: &str,
    data: Vec<u8>,
    opts: &SnapshotOptions,
) -> Result<Option<Vec<u8>>, OxError> {
    let data = bytes::Bytes::from(data);
    patiently(opts, async || store.put_shared(key, data.clone()).await).await?;
    Ok(data.try_into_mut().ok().map(Vec::from))
}

/// Runs `op` for a snapshot, again while the store is unavailable, for up to the
/// snapshot's outage patience (a refusal or any other error fails at once); a cancel
/// ends the wait at once, whatever the store is doing.
pub async fn patiently<T>(
    opts: &SnapshotOptions,
    mut op: impl AsyncFnMut() -> Result<T, OxError>,
) -> Result<T, OxError> {
    let deadline = std::time::Instant::now() + opts.outage_patience;
    let put = async {
        let mut pause = Duration::from_millis(100);
        // Shows the outage while this waits (dropped when it stops: on any return,
        // and when a cancel drops this future).
        let mut waiting = None;
        loop {
            match op().await {
                Err(e @ OxError::Unavailable { .. }) if std::time::Instant::now() < deadline => {
                    waiting
                        .get_or_insert_with(|| opts.progress.outage_wait())
                        .answered(e.to_string());
                    // A stop for a restart does not wait out an outage either (the
                    // journal's last checkpoint stands); a put under way is let finish.
                    let pause_or_stop = async {
                        async_io::Timer::after(pause).await;
                    };
                    futures_lite::future::or(pause_or_stop, opts.progress.stopped()).await;
                    if opts.progress.is_suspended() {
                        return Err(OxError::Suspended(opts.volume_name.clone()));
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    };
    futures_lite::future::or(put, cancelled(opts)).await
}

/// Resolves, with the error a cancelled snapshot fails with, once it is cancelled.
async fn cancelled<T>(opts: &SnapshotOptions) -> Result<T, OxError> {
    opts.progress.cancelled().await;
    Err(OxError::Cancelled(format!(
        "snapshot of {} cancelled; nothing was published",
        opts.volume_name
    )))
}

/// The index being written: the page being built, and what has been stored.
pub(super) struct IndexWriter {
    /// Entries of the page being built.
    pub(super) entries: Vec<Entry>,
    /// The index salt (page keys derive from it).
    pub(super) salt: [u8; 16],
    /// Pages stored.
    pub(super) pages: u64,
    /// Bytes of the pages stored.
    pub(super) bytes: u64,
    /// Pages not stored because every entry is zero (ranges, ascending).
    pub(super) empty: Vec<[u64; 2]>,
}

impl IndexWriter {
    /// Adds a chunk's entry, storing the page once it is full.
    pub(super) async fn push(
        &mut self,
        entry: Entry,
        store: &dyn ObjectStore,
        opts: &SnapshotOptions,
        codec: &mut Codec,
    ) -> Result<(), OxError> {
        self.entries.push(entry);
        if self.entries.len() >= PAGE_CHUNKS as usize {
            self.flush(store, opts, codec).await?;
        }
        Ok(())
    }

    /// Stores the page being built, if it holds anything: a page of zero entries
    /// only joins the manifest's `empty_pages`, so a sparse volume's snapshot costs
    /// requests for its data, not its size.
    pub(super) async fn flush(
        &mut self,
        store: &dyn ObjectStore,
        opts: &SnapshotOptions,
        codec: &mut Codec,
    ) -> Result<(), OxError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let page = IndexPage {
            entries: std::mem::take(&mut self.entries),
        };
        if page.entries.iter().all(|e| *e == Entry::Zero) {
            match self.empty.last_mut() {
                Some(r) if r[1] == self.pages => r[1] += 1,
                _ => self.empty.push([self.pages, self.pages + 1]),
            }
            self.pages += 1;
            self.entries.reserve(PAGE_CHUNKS as usize);
            return Ok(());
        }
        let frame = page.encode(codec, self.pages)?;
        let key = format::page_key(&opts.prefix, &self.salt, self.pages);
        self.pages += 1;
        self.bytes += frame.len() as u64;
        put_patiently(store, &key, frame, opts).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Arc;

    use super::*;
    use crate::store::Listing;

    /// A store that takes every PUT at once but the `fail`-th (1-based), which it refuses.
    struct Refuses {
        puts: Cell<usize>,
        fail: usize,
    }

    impl ObjectStore for Refuses {
        fn put<'a>(
            &'a self,
            _: &'a str,
            _: Vec<u8>,
        ) -> crate::store::BoxFuture<'a, Result<(), OxError>> {
            self.puts.set(self.puts.get() + 1);
            let refused = self.puts.get() == self.fail;
            Box::pin(async move {
                if refused {
                    Err(OxError::Config("refused".into()))
                } else {
                    Ok(())
                }
            })
        }

        fn put_new<'a>(
            &'a self,
            key: &'a str,
            data: Vec<u8>,
        ) -> crate::store::BoxFuture<'a, Result<(), OxError>> {
            self.put(key, data)
        }

        fn get<'a>(&'a self, _: &'a str) -> crate::store::BoxFuture<'a, Result<Vec<u8>, OxError>> {
            Box::pin(async { Err(OxError::Config("no gets".into())) })
        }

        fn get_range<'a>(
            &'a self,
            _: &'a str,
            _: u64,
            _: u64,
        ) -> crate::store::BoxFuture<'a, Result<Vec<u8>, OxError>> {
            Box::pin(async { Err(OxError::Config("no gets".into())) })
        }

        fn list<'a>(
            &'a self,
            _: &'a str,
        ) -> crate::store::BoxFuture<'a, Result<Vec<String>, OxError>> {
            Box::pin(async { Ok(Vec::new()) })
        }

        fn list_page<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: Option<&'a str>,
            _: usize,
        ) -> crate::store::BoxFuture<'a, Result<Listing, OxError>> {
            Box::pin(async { Err(OxError::Config("no lists".into())) })
        }

        fn delete<'a>(
            &'a self,
            _: &'a [String],
        ) -> crate::store::BoxFuture<'a, Result<(), OxError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A store refusing the `fail`-th PUT (1-based; 0: none).
    fn refusing(fail: usize) -> Refuses {
        Refuses {
            puts: Cell::new(0),
            fail,
        }
    }

    fn options() -> SnapshotOptions {
        SnapshotOptions {
            prefix: String::new(),
            zstd_level: 1,
            kek: None,
            object_bytes: 4,
            volume_id: [1; 16],
            volume_name: "v".into(),
            progress: Arc::default(),
            outage_patience: Duration::from_secs(60),
            journal: None,
            store_name: "s".into(),
            checkpoint_every: super::super::CHECKPOINT_EVERY,
            verify_before_publish: false,
            working_set: None,
            owner: None,
            clock: Default::default(),
            encode_on: Default::default(),
        }
    }

    /// A stored object's buffer holds the next object: no fresh memory per object.
    #[test]
    fn a_stored_objects_buffer_holds_the_next_object() {
        let (store, throttle, opts) = (refusing(0), Throttle::default(), options());
        let mut packer = Packer::new(&store, &throttle, &opts, Vec::new(), 0);
        futures_lite::future::block_on(async {
            // Sealed at once (objects of 4 bytes) and stored at once.
            packer.add(b"obj0").await.unwrap();
            assert_eq!((packer.stored(), packer.spare.len()), (1, 1));
            let buffer = packer.spare[0].as_ptr();
            packer.add(b"ob").await.unwrap();
            assert_eq!(
                packer.current.as_ptr(),
                buffer,
                "the stored object's buffer"
            );
            assert_eq!(packer.current, b"ob", "holding this object's bytes only");
            assert!(packer.spare.is_empty());
        });
    }

    /// An object whose upload failed is never counted stored, nor any sealed after it,
    /// so no checkpoint's journal can name it (a stop that goes on after the failure
    /// must not save one that does).
    #[test]
    fn a_failed_upload_ends_the_objects_counted_stored() {
        let (store, throttle, opts) = (refusing(2), Throttle::default(), options());
        let mut packer = Packer::new(&store, &throttle, &opts, Vec::new(), 0);
        futures_lite::future::block_on(async {
            packer.add(b"obj0").await.unwrap();
            assert_eq!(packer.stored(), 1);
            assert!(packer.add(b"obj1").await.is_err(), "its upload was refused");
            assert_eq!(packer.stored(), 1);
            packer.add(b"obj2").await.unwrap();
            assert_eq!((packer.objects.len(), packer.stored()), (3, 1));
            packer.stored_through(1).await.unwrap();
            assert!(packer.stored_through(2).await.is_err());
            assert!(packer.stored_through(3).await.is_err());
        });
    }
}
