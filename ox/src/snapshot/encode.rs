//! Encoding a snapshot's chunks on every OX core: the writer's own core and one
//! encoder on each other core of its set ([`crate::cores::CoreSet`]).
//!
//! Chunks go to the other cores in batches (a message each way per batch, not per
//! chunk) while one has room; the writer encodes a batch itself only when none has, so
//! its own core, which also reads, packs and uploads, takes what the others cannot.
//! Results come back in chunk order, whoever encoded them: the index, the objects and
//! the journal see the same sequence as with one core. Each encoder has a nonce prefix
//! of its own, recorded in the journal, so no nonce repeats under the snapshot's key.
//! With no other core, each chunk is encoded as it comes, as it always was.

use std::collections::VecDeque;

use crate::codec::Codec;
use crate::cores::OneCore;
use crate::error::OxError;
use crate::format::Entry;

/// Bytes of chunks sent to another core at once: enough work (~1 ms) that the two
/// messages are a small part of it.
const BATCH_BYTES: u64 = 1 << 20;

/// Batches each other core may hold (one being encoded, one waiting).
const BATCHES_PER_CORE: usize = 2;

/// What the encoders give back for one chunk.
pub(super) enum Done {
    /// A chunk read and encoded: its frame, or `None` if it was all zeros.
    Encoded(Option<Vec<u8>>),
    /// A chunk that is not read (unchanged since the parent): its entry as it is.
    Unchanged(Entry),
}

type Encoded = Vec<Result<Option<Vec<u8>>, OxError>>;

/// A batch of chunks for another core, and where its frames go.
struct Batch {
    chunks: Vec<(u64, Vec<u8>)>,
    reply: async_channel::Sender<Encoded>,
}

/// Chunks in chunk order, done or being encoded elsewhere.
enum Group {
    Done(VecDeque<(u64, Done)>),
    Away {
        chunks: Vec<u64>,
        lane: usize,
        reply: async_channel::Receiver<Encoded>,
    },
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
    /// Chunks per batch (1 with no other core: each is encoded as it comes).
    batch_chunks: usize,
    /// The batch being gathered.
    gathering: Vec<(u64, Vec<u8>)>,
    /// Unchanged chunks after the batch being gathered (kept behind it).
    behind: VecDeque<(u64, Done)>,
    groups: VecDeque<Group>,
    /// Chunks in `gathering`, `behind` and `groups`.
    held: usize,
}

impl Encoders {
    /// Encodes with `codec` here and starts an encoder on each of `cores` with a codec
    /// from `codec_for` (each with a nonce prefix of its own); `chunk_bytes` sizes the
    /// batches.
    pub(super) fn start(
        codec: Codec,
        cores: Vec<OneCore>,
        chunk_bytes: u64,
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
                        let encoded = batch
                            .chunks
                            .iter()
                            .map(|(chunk, data)| codec.encode(*chunk, data))
                            .collect();
                        let _ = batch.reply.send(encoded).await;
                    }
                })
            }))?;
            lanes.push(Lane { tx, away: 0 });
        }
        let batch_chunks = if lanes.is_empty() {
            1
        } else {
            (BATCH_BYTES / chunk_bytes.max(1)).max(1) as usize
        };
        Ok(Self {
            codec,
            lanes,
            batch_chunks,
            gathering: Vec::new(),
            behind: VecDeque::new(),
            groups: VecDeque::new(),
            held: 0,
        })
    }

    /// The writer's own codec.
    pub(super) fn codec(&mut self) -> &mut Codec {
        &mut self.codec
    }

    /// Chunks the writer may hold before it waits for the oldest: every other core's
    /// batches, the one being gathered and one encoded here.
    fn most_held(&self) -> usize {
        self.batch_chunks * (self.lanes.len() * BATCHES_PER_CORE + 2)
    }

    /// Takes chunk `chunk`'s data to encode (here when no other core has room). Its
    /// frame comes back from [`Self::next`] in chunk order.
    pub(super) fn add(&mut self, chunk: u64, data: Vec<u8>) -> Result<(), OxError> {
        debug_assert!(self.behind.is_empty() || !self.gathering.is_empty());
        if !self.behind.is_empty() {
            // Unchanged chunks wait behind the batch: send it before this one.
            self.send()?;
        }
        self.gathering.push((chunk, data));
        self.held += 1;
        if self.gathering.len() >= self.batch_chunks {
            self.send()?;
        }
        Ok(())
    }

    /// Takes unchanged chunk `chunk`'s entry, to come back in chunk order.
    pub(super) fn unchanged(&mut self, chunk: u64, entry: Entry) {
        let item = (chunk, Done::Unchanged(entry));
        self.held += 1;
        if !self.gathering.is_empty() {
            self.behind.push_back(item);
        } else if let Some(Group::Done(done)) = self.groups.back_mut() {
            done.push_back(item);
        } else {
            self.groups.push_back(Group::Done(VecDeque::from([item])));
        }
    }

    /// The next chunk in order if it is done — waiting for it if `wait`, or if the
    /// writer holds as many as it may — or `None` when none is held (or, not waiting,
    /// the next is not done).
    pub(super) async fn next(&mut self, wait: bool) -> Result<Option<(u64, Done)>, OxError> {
        let wait = wait || self.held > self.most_held();
        loop {
            match self.groups.front_mut() {
                Some(Group::Done(done)) => match done.pop_front() {
                    Some(item) => {
                        self.held -= 1;
                        return Ok(Some(item));
                    }
                    None => {
                        self.groups.pop_front();
                    }
                },
                Some(Group::Away {
                    chunks,
                    lane,
                    reply,
                }) => {
                    let answer = if wait {
                        reply.recv().await.ok()
                    } else {
                        match reply.try_recv() {
                            Ok(a) => Some(a),
                            Err(async_channel::TryRecvError::Empty) => return Ok(None),
                            Err(async_channel::TryRecvError::Closed) => None,
                        }
                    };
                    let encoded = answer.ok_or_else(|| {
                        OxError::Config("an OX core stopped encoding the snapshot".into())
                    })?;
                    assert_eq!(encoded.len(), chunks.len(), "a batch's frames");
                    self.lanes[*lane].away -= 1;
                    let done = chunks
                        .iter()
                        .zip(encoded)
                        .map(|(&c, e)| e.map(|f| (c, Done::Encoded(f))))
                        .collect::<Result<VecDeque<_>, _>>()?;
                    self.groups[0] = Group::Done(done);
                }
                None if wait && !self.gathering.is_empty() => self.send()?,
                None => {
                    debug_assert!(self.behind.is_empty() || !self.gathering.is_empty());
                    return Ok(None);
                }
            }
        }
    }

    /// Sends the batch being gathered to a core with room, or encodes it here if none
    /// has; the unchanged chunks behind it follow it.
    fn send(&mut self) -> Result<(), OxError> {
        if self.gathering.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut self.gathering);
        let room = (0..self.lanes.len())
            .filter(|&i| self.lanes[i].away < BATCHES_PER_CORE)
            .min_by_key(|&i| self.lanes[i].away);
        let group = match room {
            Some(lane) => {
                let (reply, answer) = async_channel::bounded(1);
                let numbers = chunks.iter().map(|(c, _)| *c).collect();
                self.lanes[lane]
                    .tx
                    .try_send(Batch { chunks, reply })
                    .map_err(|_| {
                        OxError::Config("an OX core stopped encoding the snapshot".into())
                    })?;
                self.lanes[lane].away += 1;
                Group::Away {
                    chunks: numbers,
                    lane,
                    reply: answer,
                }
            }
            None => Group::Done(
                chunks
                    .into_iter()
                    .map(|(c, data)| self.codec.encode(c, &data).map(|f| (c, Done::Encoded(f))))
                    .collect::<Result<_, _>>()?,
            ),
        };
        self.groups.push_back(group);
        if !self.behind.is_empty() {
            let behind = std::mem::take(&mut self.behind);
            self.groups.push_back(Group::Done(behind));
        }
        Ok(())
    }
}
