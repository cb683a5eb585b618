//! One clone in the simulator: its core, its presence record, its local drive, the
//! store behind it and the hosts in front of it (see the module docs of `sim`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::model::{BLOCK, Model, fill};
use super::{CHUNK_BLOCKS, CHUNK_BYTES, Clock, Draw, EVENTS_AT_MOST, Micros, bit};
use crate::clone::core::{Action, Core, Event};
use crate::clone::read_ahead::{FIRST_READ_AHEAD_BYTES, Geometry, ReadAhead};
use crate::clone::walk::{Answered, Now, Walk, hot_first, most_sharing_runs};
use crate::clone::{FetchError, FetchReason};
use crate::nondurable;
use crate::nondurable_medium::NonDurableMedium;
use crate::presence::PresenceFiles;
use crate::test_rng::Rng;

/// How long a fetched chunk may wait to be recorded (as `clone::journal`).
const LAZY_RECORD: Micros = 200_000;
/// Fetches of one chunk the basis tries before it gives up (as ox's basis).
const STORE_ATTEMPTS: u32 = 3;
/// The chunk size thickening's walk is told: the simulated clone's small chunks stand
/// for 256 KiB ones, so its runs are 4 chunks long, 1 while hosts read cold data.
const WALK_CHUNK_BYTES: u64 = 256 << 10;

/// Thickening's walk, as `ox::hydrate` runs it (the appliance's own [`Walk`]).
type Thickening = Walk<Box<dyn Iterator<Item = u64>>, String>;
/// The walk's waits before a retry (half a second and more) pass this many times
/// faster here, so that they end before the next power cut.
const RETRY_SPEEDUP: u64 = 1_000;

/// Rules of the clone's protocol broken on purpose, to show the simulator catches it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Flaws {
    /// Acknowledge a write before the chunks it touched are on the presence record.
    pub(crate) ack_before_record: bool,
    /// Write the presence record without flushing the local copy first.
    pub(crate) record_before_flush: bool,
}

/// One run.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) seed: u64,
    /// Host operations to issue.
    pub(crate) ops: u64,
    pub(crate) hosts: usize,
    pub(crate) chunks: u64,
    /// Mean host operations between power cuts.
    pub(crate) ops_per_cut: u64,
    /// Percent of GETs the store answers with a 503, a corrupted or a truncated body.
    pub(crate) store_faults: u64,
    pub(crate) flaws: Flaws,
}

impl Config {
    pub(crate) fn new(seed: u64, ops: u64) -> Self {
        Self {
            seed,
            ops,
            hosts: 3,
            // Not a multiple of 64: the presence bitmap's last word is partial.
            chunks: 40,
            ops_per_cut: 80,
            // A healthy store, a flaky one, one in trouble.
            store_faults: [3, 10, 35][(seed % 3) as usize],
            flaws: Flaws::default(),
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub(crate) events: u64,
    pub(crate) host_ops: u64,
    pub(crate) reads: u64,
    pub(crate) reads_failed: u64,
    pub(crate) writes_acked: u64,
    pub(crate) writes_failed: u64,
    pub(crate) flushes: u64,
    pub(crate) blocks_checked: u64,
    pub(crate) cuts: u64,
    /// Cuts in the middle of the presence record's own writes.
    pub(crate) cuts_mid_record: u64,
    pub(crate) sectors_lost: u64,
    pub(crate) blocks_checked_after_cut: u64,
    pub(crate) fetches: u64,
    pub(crate) store_faults: u64,
    pub(crate) fetch_failures: u64,
    /// Reads answered from a fetched chunk's bytes before they were installed.
    pub(crate) served_from_fetch: u64,
    /// Chunks filled whole by a host write (claimed, never fetched).
    pub(crate) claimed_whole: u64,
    pub(crate) commits: u64,
    pub(crate) checkpoints: u64,
    /// Chunks thickening's walk fetched.
    pub(crate) thickened: u64,
    /// Runs it asked for again after a failure, and walks that failed.
    pub(crate) thicken_retries: u64,
    pub(crate) thickenings_failed: u64,
    /// Times the store was down a while (every request a 503).
    pub(crate) outages: u64,
    pub(crate) simulated_us: u64,
    /// A digest of the run's event order, for checking that a seed replays exactly.
    pub(crate) fingerprint: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.host_ops += o.host_ops;
        self.reads += o.reads;
        self.reads_failed += o.reads_failed;
        self.writes_acked += o.writes_acked;
        self.writes_failed += o.writes_failed;
        self.flushes += o.flushes;
        self.blocks_checked += o.blocks_checked;
        self.cuts += o.cuts;
        self.cuts_mid_record += o.cuts_mid_record;
        self.sectors_lost += o.sectors_lost;
        self.blocks_checked_after_cut += o.blocks_checked_after_cut;
        self.fetches += o.fetches;
        self.store_faults += o.store_faults;
        self.fetch_failures += o.fetch_failures;
        self.served_from_fetch += o.served_from_fetch;
        self.claimed_whole += o.claimed_whole;
        self.commits += o.commits;
        self.checkpoints += o.checkpoints;
        self.thickened += o.thickened;
        self.thicken_retries += o.thicken_retries;
        self.thickenings_failed += o.thickenings_failed;
        self.outages += o.outages;
        self.simulated_us += o.simulated_us;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} events, {} host operations ({} reads, {} failed, {} writes acknowledged, {} \
             failed, {} flushes), {} blocks checked in reads, {} power cuts ({} mid-record, \
             {} sectors lost), {} blocks checked after cuts, {} fetches ({} store faults, {} fetches \
             failed), {} reads served from fetched bytes, {} chunks claimed whole, {} \
             commits, {} checkpoints, {} chunks thickened ({} runs retried, {} walks failed), {} store outages",
            self.events,
            self.host_ops,
            self.reads,
            self.reads_failed,
            self.writes_acked,
            self.writes_failed,
            self.flushes,
            self.blocks_checked,
            self.cuts,
            self.cuts_mid_record,
            self.sectors_lost,
            self.blocks_checked_after_cut,
            self.fetches,
            self.store_faults,
            self.fetch_failures,
            self.served_from_fetch,
            self.claimed_whole,
            self.commits,
            self.checkpoints,
            self.thickened,
            self.thicken_retries,
            self.thickenings_failed,
            self.outages
        )
    }
}

/// Runs one seed; `Err` says which check failed.
pub(crate) fn run(config: &Config) -> Result<Stats, String> {
    let mut world = World::new(config)?;
    world.run()?;
    world.stats.simulated_us = world.clock.now();
    Ok(world.stats)
}

/// A host request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write {
        fua: bool,
    },
    /// Deallocation: reads back as zeroes (a clone writes zeroes locally).
    Trim,
    Flush,
}

#[derive(Debug)]
struct Op {
    /// `None`: a read checking the clone after a power cut.
    host: Option<usize>,
    kind: Kind,
    first: u64,
    blocks: u64,
    /// A write's version.
    version: u64,
    /// A read's floor per block; a flush's acknowledged versions when it was issued.
    floors: Vec<u64>,
    /// A write's claimed chunks (its plan).
    claims: Option<(u64, Vec<u64>)>,
    /// A flush's sectors: those cached when it was issued.
    flushing: nondurable::Cached,
}

impl Op {
    fn chunks(&self) -> std::ops::RangeInclusive<u64> {
        self.first / CHUNK_BLOCKS..=(self.first + self.blocks - 1) / CHUNK_BLOCKS
    }

    fn covers_whole(&self, chunk: u64) -> bool {
        let (start, end) = (chunk * CHUNK_BLOCKS, (chunk + 1) * CHUNK_BLOCKS);
        self.first <= start && self.first + self.blocks >= end
    }
}

/// What an answer to a waiter goes on with.
#[derive(Debug)]
enum Cont {
    /// A read within one chunk (`Event::Read`).
    ReadOne(u64),
    /// A read of several chunks (`Event::Need`).
    ReadMany(u64),
    /// A write's plan.
    Plan(u64),
    /// A write waiting for the presence record.
    Durable(u64),
    /// A run of thickening's walk.
    Thicken(Vec<u64>),
}

/// An answer to a waiter, as the owner would deliver it.
#[derive(Debug)]
enum Answer {
    Done,
    Data(Arc<Vec<u8>>),
    Granted(Vec<u64>),
    Failed(String),
}

#[derive(Debug)]
enum DiskIo {
    Read(u64),
    Write(u64),
    Flush(u64),
    Install { chunk: u64, data: Arc<Vec<u8>> },
}

#[derive(Debug)]
enum Ev {
    Host(usize),
    Disk(DiskIo),
    Store {
        chunk: u64,
        attempt: u32,
    },
    Answer {
        token: u64,
        answer: Answer,
    },
    /// The journal's flush ended: write the record.
    Commit,
    /// A message reaches the owner.
    Core(Event<u64>),
    /// Lazily noted chunks are due.
    Lazy,
    /// Thickening starts (or starts again after it failed).
    Thicken,
    /// The operator pauses or resumes thickening.
    ThickenPause,
    /// The operator stops thickening (it is started again later).
    ThickenStop,
    /// The store answers every request with a 503 for this long.
    Outage(Micros),
    /// A failed run of thickening (`thicken_retries`' entry) is due to be asked for
    /// again.
    ThickenRetry(u64),
    Cut,
}

/// The presence journal's state (as `clone::journal`'s thread keeps it).
struct Journal {
    files: PresenceFiles,
    /// One bit per chunk on the record.
    durable: Vec<u64>,
    lazy: Vec<u64>,
    lazy_since: Option<Micros>,
    /// Chunks writes wait on, and their tokens.
    needs: Vec<(Vec<u64>, u64)>,
    checkpoints: u64,
    committing: Option<Commit>,
}

/// A commit in flight: its batch, the checkpoint's words (if it writes one) and the
/// tokens of the writes waiting on it.
struct Commit {
    batch: Vec<u64>,
    words: Option<Vec<u64>>,
    waiting: Vec<u64>,
    /// What its flush of the local copy makes durable: what was cached when it began.
    flushing: nondurable::Cached,
}

struct World {
    config: Config,
    rng: Rng,
    clock: Clock<(u64, Ev)>,
    /// Power-on count: events of an earlier one are dropped.
    power: u64,
    medium: NonDurableMedium,
    path: PathBuf,
    drive: nondurable::State,
    core: Core<u64>,
    journal: Journal,
    model: Model,
    ops: BTreeMap<u64, Op>,
    conts: BTreeMap<u64, Cont>,
    next_id: u64,
    issued: u64,
    /// Host `h`'s last read ended at this block (where it may read on from).
    last_read_end: Vec<u64>,
    /// Host `h`'s read-ahead (the channel's own), and the most it asks for (chunks).
    ahead: Vec<ReadAhead>,
    read_ahead: u64,
    /// Reads checking the clone after a cut, still to finish.
    verifying: u64,
    /// Thickening's walk, while one runs; its window, and its short runs beside hosts
    /// (by seed, from one to the most its window allows); whether paused.
    thickening: Option<Thickening>,
    thicken_window: usize,
    thicken_sharing: usize,
    thicken_paused: bool,
    thicken_stopped: bool,
    /// Runs the store failed that wait to be asked again, by id, and whether their
    /// back-off has passed (a paused walk keeps them until the resume).
    thicken_retries: BTreeMap<u64, (Vec<u64>, bool)>,
    /// The store answers 503 to everything until then.
    outage_until: Micros,
    /// When each lane's last message reaches the owner.
    lanes: Vec<Micros>,
    stats: Stats,
}

impl World {
    fn new(config: &Config) -> Result<Self, String> {
        let medium = NonDurableMedium::new(config.seed);
        let path = Path::new("/clone/presence").to_path_buf();
        let (files, words) = PresenceFiles::open(medium.mount(), &path, config.chunks)
            .map_err(|e| format!("opening the presence record: {e}"))?;
        let bytes = config.chunks as usize * CHUNK_BYTES;
        let thicken_window = 1 + (config.seed / 9 % 8) as usize;
        // Mixed, so neighbouring seeds try different counts of runs beside hosts.
        let mixed = config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
        let mut w = Self {
            config: config.clone(),
            rng: Rng(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            clock: Clock::new(),
            power: 0,
            medium,
            path,
            drive: nondurable::State::new(bytes, config.seed ^ 0x5EED),
            core: Core::new(config.chunks, words.clone()),
            journal: Journal {
                files,
                durable: words,
                lazy: Vec::new(),
                lazy_since: None,
                needs: Vec::new(),
                checkpoints: 0,
                committing: None,
            },
            model: Model::new(config.chunks * CHUNK_BLOCKS),
            ops: BTreeMap::new(),
            conts: BTreeMap::new(),
            next_id: 1,
            issued: 0,
            last_read_end: vec![u64::MAX; config.hosts],
            ahead: vec![ReadAhead::default(); config.hosts],
            read_ahead: 2 + config.seed / 5 % 6,
            verifying: 0,
            thickening: None,
            thicken_window,
            thicken_sharing: 1 + mixed as usize
                % most_sharing_runs(thicken_window, WALK_CHUNK_BYTES),
            thicken_paused: false,
            thicken_stopped: false,
            thicken_retries: BTreeMap::new(),
            outage_until: 0,
            lanes: vec![0; config.hosts + 2],
            stats: Stats::default(),
        };
        w.start_power_on();
        Ok(w)
    }

    fn at(&mut self, after: Micros, ev: Ev) {
        self.clock.after(after, (self.power, ev));
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.between(lo, hi)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.chance(percent)
    }

    fn run(&mut self) -> Result<(), String> {
        while let Some((power, ev)) = self.clock.next() {
            if power != self.power {
                continue;
            }
            self.stats.events += 1;
            if self.stats.events > EVENTS_AT_MOST {
                return Err(format!("no end after {EVENTS_AT_MOST} events"));
            }
            self.stats.fingerprint = self
                .stats
                .fingerprint
                .rotate_left(5)
                .wrapping_add(self.clock.now() ^ discriminant(&ev));
            self.event(ev)?;
        }
        // The last power-on ends in a cut too: what the hosts left must survive it.
        if self.verifying == 0 && self.ops.is_empty() {
            self.cut(false)?;
            while let Some((power, ev)) = self.clock.next() {
                if power == self.power {
                    self.stats.events += 1;
                    if self.stats.events > EVENTS_AT_MOST {
                        return Err(format!("no end after {EVENTS_AT_MOST} events"));
                    }
                    self.event(ev)?;
                }
            }
        }
        assert!(self.ops.is_empty(), "operations left: {:?}", self.ops);
        assert_eq!(self.verifying, 0, "checks left after the last cut");
        Ok(())
    }

    fn event(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Host(h) => self.host(h),
            Ev::Disk(io) => self.disk_done(io),
            Ev::Store { chunk, attempt } => {
                self.store_answer(chunk, attempt);
                Ok(())
            }
            Ev::Answer { token, answer } => self.answer(token, answer),
            Ev::Commit => self.commit(),
            Ev::Core(e) => {
                self.apply(e);
                Ok(())
            }
            Ev::Lazy => {
                self.maybe_commit();
                Ok(())
            }
            Ev::Thicken => {
                self.thicken_start();
                Ok(())
            }
            Ev::ThickenPause => {
                // Every pause is followed by a resume.
                self.thicken_paused = !self.thicken_paused;
                if self.thicken_paused {
                    let t = self.between(1_000, 50_000);
                    self.at(t, Ev::ThickenPause);
                }
                self.thicken();
                Ok(())
            }
            Ev::ThickenRetry(id) => {
                // (Gone if the walk was stopped, failed, or cut by a power loss since.)
                if let Some((_, due)) = self.thicken_retries.get_mut(&id) {
                    *due = true;
                    self.thicken();
                }
                Ok(())
            }
            Ev::ThickenStop => {
                if self.thickening.is_some() {
                    self.thicken_stopped = true;
                    self.thicken();
                }
                Ok(())
            }
            Ev::Outage(length) => {
                self.stats.outages += 1;
                self.outage_until = self.clock.now() + length;
                Ok(())
            }
            Ev::Cut => self.cut(false),
        }
    }

    // ------------------------------------------------------------------ the core

    /// Applies `event` to the core, checks it, and carries out its actions as the
    /// owner reactor does.
    fn apply(&mut self, event: Event<u64>) {
        let actions = self.core.apply(event);
        self.core.check();
        for a in actions {
            match a {
                Action::Fetch { chunk, .. } => {
                    self.stats.fetches += 1;
                    let t = self.store_latency();
                    self.at(t, Ev::Store { chunk, attempt: 1 });
                }
                Action::Install { chunk, data, .. } => {
                    let t = self.between(20, 300);
                    self.at(t, Ev::Disk(DiskIo::Install { chunk, data }));
                }
                Action::Serve { waiter, data } => {
                    self.stats.served_from_fetch += 1;
                    self.answer_soon(waiter, Answer::Data(data));
                }
                Action::Present { chunk, fetched } => {
                    if fetched.is_some() {
                        // Recorded lazily: a fetched chunk lost in a cut is fetched again.
                        self.journal.lazy.push(chunk);
                        if self.journal.lazy_since.is_none() {
                            self.journal.lazy_since = Some(self.clock.now());
                            self.at(LAZY_RECORD, Ev::Lazy);
                        }
                    } else {
                        self.stats.claimed_whole += 1;
                    }
                }
                Action::Failed { .. } => self.stats.fetch_failures += 1,
                // What it starts is the owner's miss timing: nothing to carry out here.
                Action::HostWaits { .. } => {}
                Action::Wake { waiter, result } => {
                    let answer = match result {
                        Ok(()) => Answer::Done,
                        Err(e) => Answer::Failed(format!("chunk {}: {}", e.chunk, e.reason)),
                    };
                    self.answer_soon(waiter, answer);
                }
                Action::Granted { waiter, chunks, .. } => {
                    self.answer_soon(waiter, Answer::Granted(chunks));
                }
            }
        }
    }

    /// Sends `event` to the owner from `lane` (a host's reactor, the checks after a
    /// cut, thickening): it arrives after a message's hop, in order with the lane's
    /// earlier messages but in any order with other lanes'.
    fn send(&mut self, lane: usize, event: Event<u64>) {
        let now = self.clock.now();
        let at = (now + self.between(1, 5)).max(self.lanes[lane]);
        self.lanes[lane] = at;
        self.at(at - now, Ev::Core(event));
    }

    fn lane(&self, host: Option<usize>) -> usize {
        host.unwrap_or(self.config.hosts)
    }

    /// Delivers `answer` to `token` after a message's hop.
    fn answer_soon(&mut self, token: u64, answer: Answer) {
        let t = self.between(1, 5);
        self.at(t, Ev::Answer { token, answer });
    }

    // ------------------------------------------------------------------ the store

    fn store_latency(&mut self) -> Micros {
        // A store that is down answers at once.
        if self.clock.now() < self.outage_until {
            return self.between(100, 1_000);
        }
        // A region's first byte: a few ms, a slow tail of ten times that.
        let base = self.between(2_000, 20_000);
        if self.chance(3) { base * 10 } else { base }
    }

    /// The store's answer to one GET of `chunk`, checked as ox's basis checks it
    /// (integrity of the body, then its length as the owner checks it).
    fn store_answer(&mut self, chunk: u64, attempt: u32) {
        let mut body = vec![0u8; CHUNK_BYTES];
        for (i, b) in body.chunks_mut(BLOCK).enumerate() {
            fill(chunk * CHUNK_BLOCKS + i as u64, 0, b);
        }
        let sum = crc32c::crc32c(&body);
        let faulty = self.clock.now() < self.outage_until || self.chance(self.config.store_faults);
        let failure = match self.rng.below(9) {
            _ if !faulty => None,
            _ if self.clock.now() < self.outage_until => {
                Some(FetchError::Unavailable("HTTP 503 (an outage)".into()))
            }
            0..=5 => Some(FetchError::Unavailable("HTTP 503".into())),
            6..=7 => {
                let at = self.rng.below(CHUNK_BYTES as u64) as usize;
                body[at] ^= 1 + self.rng.below(255) as u8;
                None
            }
            _ => {
                let keep = self.rng.below(CHUNK_BYTES as u64) as usize;
                body.truncate(keep);
                None
            }
        };
        let failure = failure.or_else(|| {
            (crc32c::crc32c(&body) != sum)
                .then(|| FetchError::Integrity(format!("chunk {chunk}: checksum mismatch")))
        });
        if let Some(e) = failure {
            self.stats.store_faults += 1;
            if attempt < STORE_ATTEMPTS {
                let t = (1_000 << attempt) + self.store_latency();
                self.at(
                    t,
                    Ev::Store {
                        chunk,
                        attempt: attempt + 1,
                    },
                );
                return;
            }
            return self.apply(Event::Fetched {
                chunk,
                result: Err(e),
            });
        }
        assert_eq!(body.len(), CHUNK_BYTES, "a body that passed its checksum");
        self.apply(Event::Fetched {
            chunk,
            result: Ok(body),
        });
    }

    // ------------------------------------------------------------------ the drive

    fn disk_done(&mut self, io: DiskIo) -> Result<(), String> {
        match io {
            DiskIo::Install { chunk, data } => {
                self.drive
                    .write(chunk as usize * CHUNK_BYTES, data.as_slice(), false);
                self.apply(Event::Installed {
                    chunk,
                    result: Ok(()),
                });
                Ok(())
            }
            DiskIo::Read(op) => {
                let o = &self.ops[&op];
                let mut bytes = vec![0u8; o.blocks as usize * BLOCK];
                self.drive.read(o.first as usize * BLOCK, &mut bytes);
                self.read_done(op, Ok(bytes))
            }
            DiskIo::Write(op) => {
                let o = &self.ops[&op];
                let fua = matches!(o.kind, Kind::Write { fua: true });
                let mut bytes = vec![0u8; o.blocks as usize * BLOCK];
                if o.kind != Kind::Trim {
                    for (i, b) in bytes.chunks_mut(BLOCK).enumerate() {
                        fill(o.first + i as u64, o.version, b);
                    }
                }
                self.drive.write(o.first as usize * BLOCK, &bytes, fua);
                self.written(op);
                Ok(())
            }
            DiskIo::Flush(op) => {
                let o = self.ops.remove(&op).expect("flush op");
                self.drive.persist(o.flushing);
                self.model.flushed(&o.floors);
                self.stats.flushes += 1;
                self.host_idle(o.host);
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------------ hosts

    fn host(&mut self, h: usize) -> Result<(), String> {
        if self.issued >= self.config.ops {
            return Ok(());
        }
        self.issued += 1;
        self.stats.host_ops += 1;
        if self.rng.below(200) == 0 {
            // An operator's checkpoint (as at a clean stop or `Note::Checkpoint`).
            self.journal.checkpoints += 1;
            self.maybe_commit();
        }
        let blocks = self.model.blocks();
        let roll = self.rng.below(100);
        let (kind, first, n) = if roll < 12 {
            (Kind::Flush, 0, 0)
        } else if roll < 55 {
            let n = if self.chance(50) {
                CHUNK_BLOCKS * self.between(1, 2)
            } else {
                self.between(1, 12)
            };
            let first = if n.is_multiple_of(CHUNK_BLOCKS) {
                self.rng.below(blocks / CHUNK_BLOCKS) * CHUNK_BLOCKS
            } else {
                self.rng.below(blocks)
            };
            let n = n.min(blocks - first);
            let kind = match self.rng.below(10) {
                0..=1 => Kind::Write { fua: true },
                2 => Kind::Trim,
                _ => Kind::Write { fua: false },
            };
            if self.model.free(first, n) {
                (kind, first, n)
            } else {
                (Kind::Read, first, n)
            }
        } else {
            let n = self.between(1, 16);
            let end = self.last_read_end[h];
            let first = if end < blocks && self.chance(30) {
                end
            } else {
                self.rng.below(blocks)
            };
            (Kind::Read, first, n.min(blocks - first))
        };
        let id = self.id();
        let mut op = Op {
            host: Some(h),
            kind,
            first,
            blocks: n,
            version: 0,
            floors: Vec::new(),
            claims: None,
            flushing: Vec::new(),
        };
        match kind {
            Kind::Flush => {
                op.floors = self.model.acked();
                op.flushing = self.drive.cached();
                self.ops.insert(id, op);
                let t = self.between(100, 2_000);
                self.at(t, Ev::Disk(DiskIo::Flush(id)));
            }
            Kind::Read => {
                op.floors = self.model.read_floors(first, n);
                self.last_read_end[h] = first + n;
                let last_chunk = *op.chunks().end();
                self.ops.insert(id, op);
                self.read_ahead(h, (first, first + n), last_chunk);
                self.read(id);
            }
            Kind::Write { .. } | Kind::Trim => {
                op.version = self.model.begin_write(first, n, kind == Kind::Trim);
                self.ops.insert(id, op);
                self.write_start(id);
            }
        }
        Ok(())
    }

    /// A host's next request after a pause.
    fn host_idle(&mut self, host: Option<usize>) {
        if let Some(h) = host {
            let t = self.between(0, 200);
            self.at(t, Ev::Host(h));
        }
    }

    /// What host `lane`'s read of blocks `start..end` asks for ahead: the channel's own
    /// [`ReadAhead`], with a small window of its own (2 to 7 chunks, by seed).
    fn read_ahead(&mut self, lane: usize, (start, end): (u64, u64), last_chunk: u64) {
        let clone = Geometry {
            read_ahead: self.read_ahead,
            most: self.read_ahead,
            // Chunks as large as the first window, so the window starts at one chunk
            // and grows to its ceiling as on a real clone (the size enters nothing
            // else: reads are told in bytes, chunks by number).
            chunk_bytes: FIRST_READ_AHEAD_BYTES,
            chunks: self.config.chunks,
            wanted_bytes: None,
        };
        let span = (start * BLOCK as u64, end * BLOCK as u64);
        let asked = self.ahead[lane].on_read(span, last_chunk, || clone);
        let absent: Vec<u64> = asked
            .into_iter()
            .flatten()
            .filter(|&c| !self.core.is_present(c))
            .collect();
        if !absent.is_empty() {
            self.send(
                lane,
                Event::Need {
                    chunks: absent,
                    reason: FetchReason::Prefetch,
                    waiter: None,
                },
            );
        }
    }

    /// A read, as the clone's channel does it: from the local copy if every chunk is
    /// present; a miss within one chunk is answered from the fetched bytes.
    fn read(&mut self, id: u64) {
        let chunks = self.ops[&id].chunks();
        if chunks.clone().all(|c| self.core.is_present(c)) {
            let t = self.between(10, 200);
            return self.at(t, Ev::Disk(DiskIo::Read(id)));
        }
        let token = self.id();
        let host = self.ops[&id].host;
        let lane = self.lane(host);
        // The check after a cut reads as the appliance's own reads do.
        let reason = match host {
            Some(_) => FetchReason::ClientMiss,
            None => FetchReason::Internal,
        };
        let (first, last) = (*chunks.start(), *chunks.end());
        if first == last {
            self.conts.insert(token, Cont::ReadOne(id));
            return self.send(
                lane,
                Event::Read {
                    chunk: first,
                    reason,
                    waiter: token,
                },
            );
        }
        let missing: Vec<u64> = chunks.filter(|&c| !self.core.is_present(c)).collect();
        self.conts.insert(token, Cont::ReadMany(id));
        self.send(
            lane,
            Event::Need {
                chunks: missing,
                reason,
                waiter: Some(token),
            },
        );
    }

    fn read_done(&mut self, id: u64, result: Result<Vec<u8>, String>) -> Result<(), String> {
        let op = self.ops.remove(&id).expect("read op");
        let bytes = match result {
            Ok(b) => b,
            Err(_) if op.host.is_none() => {
                // A check after a cut must read: try again.
                self.ops.insert(id, op);
                self.read(id);
                return Ok(());
            }
            Err(_) => {
                self.stats.reads_failed += 1;
                self.host_idle(op.host);
                return Ok(());
            }
        };
        self.stats.reads += 1;
        for (i, b) in bytes.chunks(BLOCK).enumerate() {
            let block = op.first + i as u64;
            let v = self
                .model
                .check(block, op.floors[i], b)
                .map_err(|e| format!("{} at {} µs: {e}", what(&op), self.clock.now()))?;
            self.stats.blocks_checked += 1;
            if op.host.is_none() {
                self.model.settled(block, v);
                self.stats.blocks_checked_after_cut += 1;
            }
        }
        if op.host.is_none() {
            self.verifying -= 1;
            if self.verifying == 0 {
                self.resume();
            }
        }
        self.host_idle(op.host);
        Ok(())
    }

    /// A write, as the clone's channel starts it: over present chunks straight to the
    /// local copy; otherwise the owner plans it (absent chunks it covers whole are
    /// claimed for it, partial ones fetched first, then it plans again).
    fn write_start(&mut self, id: u64) {
        let op = &self.ops[&id];
        let chunks = op.chunks();
        if chunks.clone().all(|c| self.core.is_present(c)) {
            return self.write(id, None);
        }
        let (mut whole, mut partial) = (Vec::new(), Vec::new());
        for c in chunks.filter(|&c| !self.core.is_present(c)) {
            if op.covers_whole(c) {
                whole.push(c);
            } else {
                partial.push(c);
            }
        }
        let lane = self.lane(op.host);
        let plan = self.id();
        self.conts.insert(plan, Cont::Plan(id));
        self.send(
            lane,
            Event::Plan {
                plan,
                whole,
                partial,
                waiter: plan,
            },
        );
    }

    fn write(&mut self, id: u64, claims: Option<(u64, Vec<u64>)>) {
        let op = self.ops.get_mut(&id).expect("write op");
        op.claims = claims;
        let t = self.between(20, 300);
        self.at(t, Ev::Disk(DiskIo::Write(id)));
    }

    /// The write's bytes are in the local copy: it is acknowledged once every chunk it
    /// touched is on the presence record (else a restart would fetch over it).
    fn written(&mut self, id: u64) {
        let op = &self.ops[&id];
        let needed: Vec<u64> = op
            .chunks()
            .filter(|&c| !bit(&self.journal.durable, c))
            .collect();
        if needed.is_empty() || self.config.flaws.ack_before_record {
            return self.write_end(id, Ok(()));
        }
        let token = self.id();
        self.conts.insert(token, Cont::Durable(id));
        self.journal.needs.push((needed, token));
        self.maybe_commit();
    }

    fn write_end(&mut self, id: u64, result: Result<(), String>) {
        let op = self.ops.remove(&id).expect("write op");
        if let Some((plan, chunks)) = op.claims.clone() {
            let lane = self.lane(op.host);
            self.send(
                lane,
                Event::WriteEnded {
                    plan,
                    chunks,
                    result: result.clone(),
                },
            );
        }
        let fua = matches!(op.kind, Kind::Write { fua: true });
        self.model
            .end_write(op.first, op.blocks, op.version, result.is_ok(), fua);
        if result.is_ok() {
            self.stats.writes_acked += 1;
        } else {
            self.stats.writes_failed += 1;
        }
        self.host_idle(op.host);
    }

    fn answer(&mut self, token: u64, answer: Answer) -> Result<(), String> {
        let cont = self
            .conts
            .remove(&token)
            .expect("a waiter for every answer");
        match (cont, answer) {
            (Cont::ReadOne(id), Answer::Data(data)) => {
                let o = &self.ops[&id];
                let at = (o.first % CHUNK_BLOCKS) as usize * BLOCK;
                let bytes = data[at..at + o.blocks as usize * BLOCK].to_vec();
                self.read_done(id, Ok(bytes))
            }
            (Cont::ReadOne(id) | Cont::ReadMany(id), Answer::Done) => {
                let t = self.between(10, 200);
                self.at(t, Ev::Disk(DiskIo::Read(id)));
                Ok(())
            }
            (Cont::ReadOne(id) | Cont::ReadMany(id), Answer::Failed(e)) => {
                self.read_done(id, Err(e))
            }
            (Cont::Plan(id), Answer::Granted(chunks)) => {
                self.write(id, Some((token, chunks)));
                Ok(())
            }
            (Cont::Plan(id), Answer::Done) => {
                self.write_start(id);
                Ok(())
            }
            (Cont::Plan(id) | Cont::Durable(id), Answer::Failed(e)) => {
                self.write_end(id, Err(e));
                Ok(())
            }
            (Cont::Durable(id), Answer::Done) => {
                self.write_end(id, Ok(()));
                Ok(())
            }
            (Cont::Thicken(run), Answer::Done) => {
                self.thicken_answered(run, Ok(()));
                Ok(())
            }
            (Cont::Thicken(run), Answer::Failed(e)) => {
                self.thicken_answered(run, Err(e));
                Ok(())
            }
            (cont, answer) => panic!("{cont:?} answered with {answer:?}"),
        }
    }

    // ------------------------------------------------------------------ thickening

    /// Thickening begins: the appliance's walk over the chunks around recent misses
    /// first, then the rest.
    fn thicken_start(&mut self) {
        let order = hot_first(&self.core.hot(), self.config.chunks);
        self.thickening = Some(Walk::new(Box::new(order), WALK_CHUNK_BYTES, true));
        self.thicken();
    }

    /// Asks for what the walk decides now, as `ox::hydrate` does after every change.
    fn thicken(&mut self) {
        // A walk stopped or failed lets its retries go; a paused one keeps them, and
        // asks for those due once resumed.
        if let Some(walk) = &mut self.thickening
            && (self.thicken_stopped || walk.failed())
        {
            for _ in std::mem::take(&mut self.thicken_retries) {
                walk.withdrawn();
            }
        }
        if !self.thicken_paused {
            let due: Vec<u64> = (self.thicken_retries.iter())
                .filter(|(_, (_, due))| *due)
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                if let Some((run, _)) = self.thicken_retries.remove(&id) {
                    self.stats.thicken_retries += 1;
                    self.thicken_ask(run);
                }
            }
        }
        let now = Now {
            stopped: self.thicken_stopped,
            paused: self.thicken_paused,
            sharing: self.core.client_fetches() > 0,
            window: self.thicken_window,
            // The appliance scales the runs beside hosts with the store's latency;
            // here the seed picks them, up to the most the window allows.
            sharing_window: self.thicken_sharing,
        };
        let mut runs = Vec::new();
        if let Some(walk) = &mut self.thickening {
            let core = &self.core;
            while let Some(run) = walk.next_run(now, |c| core.is_present(c)) {
                runs.push(run);
            }
        }
        for run in runs {
            self.thicken_ask(run);
        }
        if self
            .thickening
            .as_ref()
            .is_some_and(|w| w.is_over(self.thicken_stopped))
        {
            let walk = self.thickening.take().expect("a walk");
            let failed = walk.end().is_err();
            if failed {
                self.stats.thickenings_failed += 1;
            }
            if failed || self.thicken_stopped {
                // Failed (the store in trouble) or stopped: the operator starts it
                // again.
                self.thicken_stopped = false;
                let t = self.between(5_000, 40_000);
                self.at(t, Ev::Thicken);
            }
        }
    }

    /// Asks the owner for `run`, for thickening.
    fn thicken_ask(&mut self, run: Vec<u64>) {
        let token = self.id();
        self.conts.insert(token, Cont::Thicken(run.clone()));
        let lane = self.config.hosts + 1;
        self.send(
            lane,
            Event::Need {
                chunks: run,
                reason: FetchReason::Thickening,
                waiter: Some(token),
            },
        );
    }

    fn thicken_answered(&mut self, run: Vec<u64>, result: Result<(), String>) {
        let Some(walk) = &mut self.thickening else {
            panic!("an answer to thickening with no walk");
        };
        match walk.answered(run, result, self.thicken_stopped) {
            Answered::Retry { run, after } => {
                let after = after.as_micros() as Micros / RETRY_SPEEDUP;
                let id = self.id();
                self.thicken_retries.insert(id, (run, false));
                self.at(after, Ev::ThickenRetry(id));
            }
            Answered::Fetched(n) => self.stats.thickened += n,
            Answered::GaveUp => {}
        }
        self.thicken();
        if !self.thicken_paused && self.chance(5) {
            let t = self.between(1_000, 20_000);
            self.at(t, Ev::ThickenPause);
        }
        if self.chance(2) {
            let t = self.between(0, 5_000);
            self.at(t, Ev::ThickenStop);
        }
    }

    // ------------------------------------------------------------------ the journal

    /// Starts a commit if one is due and none runs (as the journal thread's loop).
    fn maybe_commit(&mut self) {
        let j = &mut self.journal;
        if j.committing.is_some() {
            return;
        }
        let lazy_due = j.lazy.len() >= 8192
            || j.lazy_since
                .is_some_and(|t| self.clock.now() >= t + LAZY_RECORD);
        if j.needs.is_empty() && j.checkpoints == 0 && !lazy_due {
            return;
        }
        j.lazy_since = None;
        let mut batch: Vec<u64> = j
            .lazy
            .drain(..)
            .chain(j.needs.iter().flat_map(|n| n.0.iter().copied()))
            .filter(|&c| !bit(&j.durable, c))
            .collect();
        batch.sort_unstable();
        batch.dedup();
        let full = j.checkpoints > 0 || j.files.wants_checkpoint();
        let waiting: Vec<u64> = j.needs.drain(..).map(|(_, t)| t).collect();
        if full {
            j.checkpoints = 0;
        }
        if batch.is_empty() && !full {
            for token in waiting {
                self.answer_soon(token, Answer::Done);
            }
            return;
        }
        // The present set is read before the flush: each of its chunks was written
        // locally before being marked, so the flush covers it.
        let words = full.then(|| {
            (0..self.journal.durable.len())
                .map(|i| {
                    let present = (0..64)
                        .map(|b| i as u64 * 64 + b)
                        .filter(|&c| c < self.config.chunks && self.core.is_present(c))
                        .fold(0u64, |w, c| w | 1 << (c % 64));
                    present | self.journal.durable[i]
                })
                .collect::<Vec<u64>>()
        });
        let flushing = if self.config.flaws.record_before_flush {
            Vec::new()
        } else {
            self.drive.cached()
        };
        self.journal.committing = Some(Commit {
            batch,
            words,
            waiting,
            flushing,
        });
        let t = if self.config.flaws.record_before_flush {
            self.between(50, 500)
        } else {
            self.between(100, 2_000)
        };
        self.at(t, Ev::Commit);
    }

    /// The commit's flush ended (unless flawed): write the record.
    fn commit(&mut self) -> Result<(), String> {
        let Commit {
            batch,
            words,
            waiting,
            flushing,
        } = self.journal.committing.take().expect("a commit");
        self.drive.persist(flushing);
        self.stats.commits += 1;
        let result = match &words {
            Some(words) => {
                let mut words = words.clone();
                for &c in &batch {
                    words[(c / 64) as usize] |= 1 << (c % 64);
                }
                self.stats.checkpoints += 1;
                self.journal.files.checkpoint(&words).map(|()| {
                    self.journal.durable = words;
                })
            }
            None => self.journal.files.append(&batch).map(|()| {
                for &c in &batch {
                    self.journal.durable[(c / 64) as usize] |= 1 << (c % 64);
                }
            }),
        };
        if self.medium.failed().is_some() {
            // The power failed in the middle of the record's own writes.
            return self.cut(true);
        }
        for token in waiting {
            let answer = match &result {
                Ok(()) => Answer::Done,
                Err(e) => Answer::Failed(e.to_string()),
            };
            self.answer_soon(token, answer);
        }
        self.maybe_commit();
        Ok(())
    }

    // ------------------------------------------------------------------ power

    /// Cuts the power (`blown`: the medium cut itself mid-change), brings the clone
    /// back from what is durable, and reads every block back before hosts go on.
    fn cut(&mut self, blown: bool) -> Result<(), String> {
        self.stats.cuts += 1;
        if blown {
            self.stats.cuts_mid_record += 1;
        } else {
            self.medium.cut();
        }
        self.medium.fail_after(None);
        self.stats.sectors_lost += self.drive.cut().lost;
        self.power += 1;
        let floors = self.model.power_cut();
        self.ops.clear();
        self.conts.clear();
        self.thickening = None;
        self.thicken_retries.clear();
        self.thicken_paused = false;
        self.thicken_stopped = false;
        self.outage_until = 0;
        self.verifying = 0;
        self.lanes.fill(0);
        let (files, words) =
            PresenceFiles::open(self.medium.mount(), &self.path, self.config.chunks)
                .map_err(|e| format!("after cut {}: {e}", self.stats.cuts))?;
        self.core = Core::new(self.config.chunks, words.clone());
        self.journal = Journal {
            files,
            durable: words,
            lazy: Vec::new(),
            lazy_since: None,
            needs: Vec::new(),
            checkpoints: 0,
            committing: None,
        };
        // Read every chunk back, each block against what is durable.
        for chunk in 0..self.config.chunks {
            let first = chunk * CHUNK_BLOCKS;
            let id = self.id();
            self.ops.insert(
                id,
                Op {
                    host: None,
                    kind: Kind::Read,
                    first,
                    blocks: CHUNK_BLOCKS,
                    version: 0,
                    floors: floors[first as usize..(first + CHUNK_BLOCKS) as usize].to_vec(),
                    claims: None,
                    flushing: Vec::new(),
                },
            );
            self.verifying += 1;
            self.read(id);
        }
        Ok(())
    }

    /// Hosts go on after the checks of a power-on.
    fn resume(&mut self) {
        if self.issued < self.config.ops {
            self.start_power_on();
        }
    }

    fn start_power_on(&mut self) {
        self.last_read_end.fill(u64::MAX);
        self.ahead.fill(ReadAhead::default());
        for h in 0..self.config.hosts {
            self.host_idle(Some(h));
        }
        self.at(1_000, Ev::Thicken);
        // A store that goes down now and then (one seed in four): every request a
        // 503 for long enough that thickening gives up.
        if self.config.seed % 4 == 3 && self.chance(50) {
            let (at, length) = (self.between(0, 3_000), self.between(30_000, 100_000));
            self.at(at, Ev::Outage(length));
        }
        // The next cut: after about `ops_per_cut` operations' time, or (one in
        // three) in the middle of one of the presence record's next changes.
        let mean = self.config.ops_per_cut * 500;
        let t = self.between(mean / 4, mean * 2);
        self.at(t, Ev::Cut);
        if self.chance(33) {
            let changes = self.rng.below(8);
            self.medium.fail_after(Some(changes));
        }
    }
}

fn what(op: &Op) -> String {
    match op.host {
        Some(h) => format!(
            "host {h}'s {:?} of blocks {}+{}",
            op.kind, op.first, op.blocks
        ),
        None => format!("the check after a cut of blocks {}+{}", op.first, op.blocks),
    }
}

fn discriminant(ev: &Ev) -> u64 {
    match ev {
        Ev::Host(h) => 1 + *h as u64 * 16,
        Ev::Disk(_) => 2,
        Ev::Store { chunk, .. } => 3 + chunk * 16,
        Ev::Answer { token, .. } => 4 + token * 16,
        Ev::Commit => 5,
        Ev::Lazy => 6,
        Ev::Thicken => 7,
        Ev::ThickenPause => 10,
        Ev::ThickenStop => 12,
        Ev::Outage(_) => 13,
        Ev::ThickenRetry(id) => 11 + id * 16,
        Ev::Cut => 8,
        Ev::Core(_) => 9,
    }
}
