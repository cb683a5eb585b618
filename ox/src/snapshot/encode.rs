//! Encoding a snapshot's chunks on every OX core: the writer's own core and one
//! encoder on each other core of its set ([`crate::cores::CoreSet`]).
//!
//! Chunks go to the other cores in batches (a message each way per batch, not per
//! chunk) while one has room; the writer keeps a batch for itself only when none has,
//! so its own core, which also reads, packs and uploads, takes what the others cannot.
//! It encodes what it kept while it waits for another core's answer, or when the batch
//! comes to the front.
//! Chunks come back in chunk order, whoever encoded them: the index, the objects and
//! the journal see the same sequence as with one core. Each encoder has a nonce prefix
//! of its own, recorded in the journal, so no nonce repeats under the snapshot's key.
//! With no other core, each chunk is encoded as it comes, as it always was.
//!
//! Encoding yields between chunks, here and on the other cores: a batch at a high
//! zstd level takes long, and clients' misses are fetched on the same cores.

use std::collections::VecDeque;

use futures_lite::future::yield_now;

use crate::blockio::Bytes;
use crate::codec::Codec;
use crate::cores::OneCore;
use crate::error::OxError;
use crate::format::Entry;

use super::spares::Spares;

/// Bytes of chunks sent to another core at once: enough work that the two messages
/// are a small part of it.
const BATCH_BYTES: u64 = 1 << 20;

/// Batches each other core may hold (one being encoded, one waiting).
const BATCHES_PER_CORE: usize = 2;

/// Unchanged chunks the writer may hold behind chunks being encoded (an entry each).
const MOST_UNCHANGED: usize = 1 << 16;

/// What the encoders give back for one chunk.
pub(super) enum Done {
    /// A chunk read and encoded: its frame, or `None` if it was all zeros.
    Encoded(Option<Vec<u8>>),
    /// A chunk that is not read (unchanged since the parent): its entry as it is.
    Unchanged(Entry),
}

/// A chunk held, in chunk order.
enum Held {
    /// Read, to be encoded here.
    Data(Bytes),
    /// Encoded here already (while the writer waited for another core): its frame.
    Encoded(Option<Vec<u8>>),
    /// Being encoded on another core: its frame is the next of its batch's answer.
    Away,
    Unchanged(Entry),
}

/// Another core's answer to a batch: a frame for each chunk, in order, and the
/// chunks' bytes back, for the writer to read into again (those that were a read's
/// buffer).
struct Answer {
    frames: Vec<Result<Option<Vec<u8>>, OxError>>,
    spent: Vec<Bytes>,
}

/// A batch of chunks for another core, and where its frames go.
struct Batch {
    chunks: Vec<(u64, Bytes)>,
    reply: async_channel::Sender<Answer>,
}

/// Chunks in chunk order; those `Away` wait for `answer` from `lane`.
struct Group {
    chunks: VecDeque<(u64, Held)>,
    away: Option<(usize, async_channel::Receiver<Answer>)>,
    /// The frames of the answer, in order, once it came.
    frames: VecDeque<Result<Option<Vec<u8>>, OxError>>,
    /// Its chunks still `Data`.
    kept: usize,
}

/// An encoder on another OX core.
struct Lane {
    tx: async_channel::Sender<Batch>,
    /// Batches sent and not yet answered.
    away: usize,
}

/// The snapshot's encoders, and the chunks between them and the writer.
pub(super) struct Encoders {
    /// The writer's own codec (for index pages too).
    codec: Codec,
    lanes: Vec<Lane>,
    /// Chunks read per batch (1 with no other core: each is encoded as it comes).
    batch_chunks: usize,
    /// The batch being gathered (read chunks, and unchanged ones between them).
    gathering: Vec<(u64, Held)>,
    /// Read chunks in `gathering`.
    gathered: usize,
    groups: VecDeque<Group>,
    /// Read chunks held, and unchanged ones.
    held_read: usize,
    held_unchanged: usize,
    /// Where chunks' buffers go once encoded.
    spares: Spares,
}

impl Encoders {
    /// Encodes with `codec` here and starts an encoder on each of `cores` with a codec
    /// from `codec_for` (each with a nonce prefix of its own); `chunk_bytes` sizes the
    /// batches. Chunks' buffers go to `spares` once encoded.
    pub(super) fn start(
        codec: Codec,
        cores: Vec<OneCore>,
        chunk_bytes: u64,
        spares: Spares,
        mut codec_for: impl FnMut() -> Result<Codec, OxError>,
    ) -> Result<Self, OxError> {
        let mut lanes = Vec::with_capacity(cores.len());
        for core in cores {
            let mut codec = codec_for()?;
            let (tx, rx) = async_channel::bounded::<Batch>(BATCHES_PER_CORE);
            core.submit(Box::new(move |_ex| {
                Box::pin(async move {
                    // Ends when the writer drops its side (done, failed or stopped).
                    while let Ok(batch) = rx.recv().await {
                        let mut frames = Vec::with_capacity(batch.chunks.len());
                        let mut spent = Vec::with_capacity(batch.chunks.len());
                        for (chunk, data) in batch.chunks {
                            if batch.reply.is_closed() {
                                // The writer is gone: nothing waits for the rest.
                                break;
                            }
                            frames.push(codec.encode(chunk, &data));
                            spent.push(data);
                            yield_now().await;
                        }
                        let _ = batch.reply.send(Answer { frames, spent }).await;
                    }
                })
            }))?;
            lanes.push(Lane { tx, away: 0 });
        }
        let batch_chunks = batch_chunks(lanes.len(), chunk_bytes);
        Ok(Self {
            codec,
            lanes,
            batch_chunks,
            gathering: Vec::new(),
            gathered: 0,
            groups: VecDeque::new(),
            held_read: 0,
            held_unchanged: 0,
            spares,
        })
    }

    /// The writer's own codec.
    pub(super) fn codec(&mut self) -> &mut Codec {
        &mut self.codec
    }

    /// The first chunk held (every chunk before it has come back from [`Self::next`]).
    pub(super) fn first_held(&self) -> Option<u64> {
        self.groups
            .iter()
            .find_map(|g| g.chunks.front())
            .or(self.gathering.first())
            .map(|(chunk, _)| *chunk)
    }

    /// Read chunks held (not come back yet).
    pub(super) fn held_read(&self) -> usize {
        self.held_read
    }

    /// Takes chunk `chunk`'s data to encode (here when no other core has room). It
    /// comes back from [`Self::next`] in chunk order.
    pub(super) fn add(&mut self, chunk: u64, data: Bytes) -> Result<(), OxError> {
        self.gathering.push((chunk, Held::Data(data)));
        self.gathered += 1;
        self.held_read += 1;
        if self.gathered >= self.batch_chunks {
            self.send()?;
        }
        Ok(())
    }

    /// Takes unchanged chunk `chunk`'s entry, to come back in chunk order.
    pub(super) fn unchanged(&mut self, chunk: u64, entry: Entry) {
        let item = (chunk, Held::Unchanged(entry));
        self.held_unchanged += 1;
        match self.groups.back_mut() {
            // Nothing gathered: it follows the last group (or is one of its own).
            Some(g) if self.gathering.is_empty() && g.away.is_none() => g.chunks.push_back(item),
            _ if self.gathering.is_empty() => self.groups.push_back(Group {
                chunks: VecDeque::from([item]),
                away: None,
                frames: VecDeque::new(),
                kept: 0,
            }),
            _ => self.gathering.push(item),
        }
    }

    /// The next chunk in chunk order if it is done — waiting for it if `wait`, or if
    /// the writer holds more than it may — or `None` when none is held (or, not
    /// waiting, the next is not done yet). While it waits for another core, it encodes
    /// the chunks kept here. Not cancel-safe: a chunk taken before an await is lost if
    /// the future is dropped there (the writer never races it; it drops the encoders
    /// whole when it stops).
    pub(super) async fn next(&mut self, wait: bool) -> Result<Option<(u64, Done)>, OxError> {
        let most_read = most_held_of(self.batch_chunks, self.lanes.len());
        let wait = wait || self.held_read > most_read || self.held_unchanged > MOST_UNCHANGED;
        loop {
            let Some(group) = self.groups.front_mut() else {
                if wait && !self.gathering.is_empty() {
                    self.send()?;
                    continue;
                }
                return Ok(None);
            };
            let Some((_, first)) = group.chunks.front() else {
                debug_assert!(group.frames.is_empty(), "an answer's frames left over");
                self.groups.pop_front();
                continue;
            };
            if let (Held::Away, Some((lane, answer))) = (first, &group.away) {
                // (A clone of the receiver: `encode_kept` needs all of `self`, and one
                // dropped mid-wait leaves the group as it was.)
                let (lane, answer) = (*lane, answer.clone());
                let answer = match answer.try_recv() {
                    Ok(a) => Some(a),
                    Err(async_channel::TryRecvError::Closed) => None,
                    Err(async_channel::TryRecvError::Empty) if !wait => return Ok(None),
                    Err(async_channel::TryRecvError::Empty) => {
                        // Not back yet: what is kept here is encoded meanwhile.
                        if self.encode_kept()? {
                            yield_now().await;
                            continue;
                        }
                        answer.recv().await.ok()
                    }
                };
                let answer = answer.ok_or_else(stopped)?;
                let group = &mut self.groups[0];
                let sent = (group.chunks.iter())
                    .filter(|(_, h)| matches!(h, Held::Away))
                    .count();
                assert_eq!(answer.frames.len(), sent, "a frame for each chunk sent");
                self.lanes[lane].away -= 1;
                group.frames = answer.frames.into();
                for bytes in answer.spent {
                    self.spares.give(bytes);
                }
                group.away = None;
                self.offload()?;
                continue;
            }
            let Some((chunk, held)) = group.chunks.pop_front() else {
                unreachable!("a first chunk, seen above");
            };
            let done = match held {
                Held::Unchanged(entry) => {
                    self.held_unchanged -= 1;
                    Done::Unchanged(entry)
                }
                Held::Data(data) => {
                    let frame = self.codec.encode(chunk, &data)?;
                    self.spares.give(data);
                    group.kept -= 1;
                    self.held_read -= 1;
                    if !group.chunks.is_empty() {
                        // More of a batch encoded here follow: let other work in.
                        yield_now().await;
                    }
                    Done::Encoded(frame)
                }
                Held::Encoded(frame) => {
                    self.held_read -= 1;
                    Done::Encoded(frame)
                }
                Held::Away => {
                    // (One per chunk sent, as asserted when the answer came.)
                    let frame = group.frames.pop_front().ok_or_else(stopped)??;
                    self.held_read -= 1;
                    Done::Encoded(frame)
                }
            };
            return Ok(Some((chunk, done)));
        }
    }

    /// Encodes the first chunk kept here that is not encoded yet; false if there is
    /// none.
    fn encode_kept(&mut self) -> Result<bool, OxError> {
        let Some(group) = self.groups.iter_mut().find(|g| g.kept > 0) else {
            return Ok(false);
        };
        for (chunk, held) in &mut group.chunks {
            if let Held::Data(data) = held {
                let frame = self.codec.encode(*chunk, data)?;
                if let Held::Data(data) = std::mem::replace(held, Held::Encoded(frame)) {
                    self.spares.give(data);
                }
                group.kept -= 1;
                return Ok(true);
            }
        }
        unreachable!("a group keeping {} chunks has none", group.kept)
    }

    /// Sends the read chunks being gathered to a core with room, or keeps them to be
    /// encoded here if none has; the unchanged chunks among them keep their places.
    fn send(&mut self) -> Result<(), OxError> {
        if self.gathering.is_empty() {
            return Ok(());
        }
        let mut gathered = std::mem::take(&mut self.gathering);
        self.gathered = 0;
        let away = send_away(&mut self.lanes, gathered.iter_mut(), self.batch_chunks)?;
        let kept = (gathered.iter())
            .filter(|(_, h)| matches!(h, Held::Data(_)))
            .count();
        self.groups.push_back(Group {
            chunks: gathered.into(),
            away,
            frames: VecDeque::new(),
            kept,
        });
        Ok(())
    }

    /// Sends what the writer kept to cores that have room again: it encodes only what
    /// no other core can take.
    fn offload(&mut self) -> Result<(), OxError> {
        for group in (self.groups.iter_mut()).filter(|g| g.kept > 0 && g.away.is_none()) {
            match send_away(&mut self.lanes, group.chunks.iter_mut(), group.kept)? {
                Some(away) => {
                    group.away = Some(away);
                    group.kept = 0;
                }
                None => break,
            }
        }
        Ok(())
    }
}

/// Sends the read chunks among `chunks` (`read` of them) to the core of `lanes` with
/// the most room, if one has room, marking them away: which core, and where its answer
/// comes.
fn send_away<'a>(
    lanes: &mut [Lane],
    chunks: impl Iterator<Item = &'a mut (u64, Held)>,
    read: usize,
) -> Result<Option<(usize, async_channel::Receiver<Answer>)>, OxError> {
    let Some(lane) = (0..lanes.len())
        .filter(|&i| lanes[i].away < BATCHES_PER_CORE)
        .min_by_key(|&i| lanes[i].away)
    else {
        return Ok(None);
    };
    let mut batch = Vec::with_capacity(read);
    for (chunk, held) in chunks {
        match std::mem::replace(held, Held::Away) {
            Held::Data(data) => batch.push((*chunk, data)),
            other => *held = other,
        }
    }
    let (reply, answer) = async_channel::bounded(1);
    lanes[lane]
        .tx
        .try_send(Batch {
            chunks: batch,
            reply,
        })
        .map_err(|_| stopped())?;
    lanes[lane].away += 1;
    Ok(Some((lane, answer)))
}

/// Read chunks sent to another core at once (each chunk alone with no other core).
fn batch_chunks(other_cores: usize, chunk_bytes: u64) -> usize {
    if other_cores == 0 {
        1
    } else {
        (BATCH_BYTES / chunk_bytes.max(1)).max(1) as usize
    }
}

/// Read chunks the encoders hold at most before the writer waits for them (see
/// [`Encoders::next`]), with `other_cores` encoding beside the writer's.
pub(super) fn most_held(other_cores: usize, chunk_bytes: u64) -> usize {
    most_held_of(batch_chunks(other_cores, chunk_bytes), other_cores)
}

/// [`most_held`] in batches of `batch_chunks`.
fn most_held_of(batch_chunks: usize, other_cores: usize) -> usize {
    batch_chunks * (other_cores * BATCHES_PER_CORE + 2)
}

fn stopped() -> OxError {
    OxError::Config("an OX core stopped encoding the snapshot".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Binding, CodecSettings};
    use crate::cores::OxCores;
    use crate::keys::SecretKey;

    const CHUNK: usize = 64 << 10;

    fn chunk(n: u64) -> Vec<u8> {
        // Compressible, and different for every chunk.
        (0..CHUNK).map(|i| ((i / 97) as u64 ^ n) as u8).collect()
    }

    /// A codec as the encoders' (same key and binding), to decode what they encode.
    fn codec(key: &SecretKey) -> Result<Codec, OxError> {
        let binding = Binding {
            volume: [1; 16],
            snapshot: [2; 16],
        };
        Codec::new(CodecSettings { level: 1 }, Some(key), binding)
    }

    /// One other OX core, held busy until the sender is used, and encoders over it
    /// (this test's thread is the writer's) that have been given three batches of
    /// chunks 0, 1, …: two wait for the busy core, the third is kept. With `unchanged`,
    /// an unchanged chunk numbered 1000 follows the second batch's first chunk.
    fn three_batches_one_kept(
        key: &SecretKey,
        unchanged: bool,
    ) -> (OxCores, std::sync::mpsc::Sender<()>, Encoders) {
        let cores = OxCores::start(&[None], 4).unwrap();
        let (release, busy) = std::sync::mpsc::channel::<()>();
        cores
            .submit_blocking(Box::new(move |_ex| {
                Box::pin(async move {
                    let _ = busy.recv();
                })
            }))
            .unwrap();
        let others = cores.set().others();
        assert_eq!(others.len(), 1, "this thread is on none of the set's cores");
        let mut enc = Encoders::start(
            codec(key).unwrap(),
            others,
            CHUNK as u64,
            Spares::new(0),
            || codec(key),
        )
        .unwrap();
        let batch = enc.batch_chunks as u64;
        assert_eq!(batch, 16);
        for n in 0..3 * batch {
            enc.add(n, Bytes::Kept(chunk(n))).unwrap();
            if unchanged && n == batch {
                enc.unchanged(1000, Entry::Zero);
            }
        }
        assert_eq!(enc.lanes[0].away, 2);
        assert_eq!(enc.groups.len(), 3);
        assert_eq!(enc.groups[2].kept as u64, batch, "the third batch is kept");
        (cores, release, enc)
    }

    /// Polls the writer's wait for its next chunk `polls` times, each still waiting (the
    /// other core is held busy), then drops the wait.
    fn still_waiting_after(enc: &mut Encoders, polls: u64) {
        futures_lite::future::block_on(async {
            let mut next = Box::pin(enc.next(true));
            for _ in 0..polls {
                assert!(futures_lite::future::poll_once(&mut next).await.is_none());
            }
        });
    }

    /// With the other core busy, two batches wait for it and the third is kept; while
    /// the writer waits for the first answer it encodes the kept one; once the other
    /// core answers, every chunk comes back once, in order, each frame its chunk's.
    #[test]
    fn the_writer_encodes_what_it_kept_while_it_waits_and_order_holds() {
        let key = SecretKey::random().unwrap();
        // An unchanged chunk between read ones that go to the other core keeps its
        // place.
        let (cores, release, mut enc) = three_batches_one_kept(&key, true);
        let batch = enc.batch_chunks as u64;
        // Waiting on the busy core: the kept chunks are encoded, one a poll.
        still_waiting_after(&mut enc, batch + 1);
        assert_eq!(enc.groups[2].kept, 0);
        assert!(
            enc.groups[2]
                .chunks
                .iter()
                .all(|(_, h)| matches!(h, Held::Encoded(_)))
        );
        assert_eq!(enc.first_held(), Some(0));
        assert_eq!(enc.held_read(), 3 * batch as usize);
        release.send(()).unwrap();
        let mut order = Vec::new();
        futures_lite::future::block_on(async {
            while let Some((n, done)) = enc.next(true).await.unwrap() {
                match done {
                    Done::Unchanged(e) => {
                        assert_eq!((n, e), (1000, Entry::Zero));
                    }
                    Done::Encoded(frame) => {
                        let frame = frame.expect("not all zeros");
                        let back = codec(&key).unwrap().decode(n, &frame, CHUNK).unwrap();
                        assert!(back == chunk(n), "chunk {n}'s frame");
                    }
                }
                order.push(n);
            }
        });
        let mut want: Vec<u64> = (0..3 * batch).collect();
        want.insert(batch as usize + 1, 1000);
        assert_eq!(order, want);
        assert_eq!((enc.held_read(), enc.first_held()), (0, None));
        assert_eq!(enc.lanes[0].away, 0);
        drop(enc);
        cores.shutdown();
    }

    /// A batch the writer kept and began to encode goes, what is left of it, to the
    /// other core once that core answers: a group of chunks encoded here and chunks
    /// encoded there, which come back in order all the same.
    #[test]
    fn what_the_writer_kept_goes_to_a_core_with_room_again() {
        let key = SecretKey::random().unwrap();
        let (cores, release, mut enc) = three_batches_one_kept(&key, false);
        let batch = enc.batch_chunks as u64;
        // Four of the kept batch's chunks are encoded here while the writer waits.
        still_waiting_after(&mut enc, 4);
        assert_eq!(enc.groups[2].kept as u64, batch - 4);
        release.send(()).unwrap();
        // Not waiting (nothing more is encoded here) until the first answer is in.
        let first = loop {
            if let Some(item) = futures_lite::future::block_on(enc.next(false)).unwrap() {
                break item;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(first.0, 0);
        let kept = &enc.groups[2];
        assert!(
            kept.away.is_some() && kept.kept == 0,
            "sent to the other core"
        );
        let held: Vec<bool> = (kept.chunks.iter())
            .map(|(_, h)| matches!(h, Held::Encoded(_)))
            .collect();
        assert_eq!(held.iter().filter(|e| **e).count(), 4, "four encoded here");
        let mut order = vec![first.0];
        futures_lite::future::block_on(async {
            while let Some((n, done)) = enc.next(true).await.unwrap() {
                let Done::Encoded(Some(frame)) = done else {
                    panic!("chunk {n}: not a frame");
                };
                let back = codec(&key).unwrap().decode(n, &frame, CHUNK).unwrap();
                assert!(back == chunk(n), "chunk {n}'s frame");
                order.push(n);
            }
        });
        assert_eq!(order, (0..3 * batch).collect::<Vec<_>>());
        assert_eq!((enc.held_read(), enc.lanes[0].away), (0, 0));
        drop(enc);
        cores.shutdown();
    }
}
