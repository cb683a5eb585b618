//! One tracked volume in the simulator: its snapshot core, its change tracking and
//! change record, a snapshot writer taking incremental snapshots into a simulated
//! store, and hosts writing and reading through copy-before-write, with power cuts.
//!
//! Checked: every published snapshot, read back through its chain of parents, holds
//! exactly the volume at its point — each block the version of the last write sent to
//! the volume before the snapshot began (the begin waits for those still landing; a
//! write the snapshot before let go that is not sent yet may be in or out) — including
//! the first snapshot after a power cut, which knows what changed only from the change
//! record; no chunk leaves the change record while a write over it is on its way; every
//! host read and every block after a cut as for clones (`model`).
//!
//! The drive shows a write's bytes to reads from when it is sent, a flush covers only
//! writes done when it was issued, and now and then a write takes tens of
//! milliseconds: so a snapshot can read bytes a power cut then takes from the volume.
//! That is how this found a begin that did not wait for writes a snapshot before had
//! let go and that were still landing (fixed in `volume::Mode::landed_before`).
//!
//! The change record's files are the appliance's own (`dirty::RecordFiles`: opening,
//! commits, compaction with its base written first), and so is the snapshot's order of
//! steps (`volume::steps`, which `ox::snapshot` follows): begin, settle, flush, need
//! only, when reading may start, checkpoints and their commits, and how an attempt
//! ends — published, given back (its journal removed first) or held. The glue this
//! plays — the channel's write path (`volume::start_write`, `land`, `guarded_write`),
//! the owner's copies, the record thread's batching (`dirty::Work`), the writer's
//! claims and uploads, the service's catalogue and start — follows those in order of
//! steps.
//!
//! Half the seeds run as the appliance does (`Config::durable`): copies before writes
//! go to the volume's durable store (done with FUA before the write goes ahead, as
//! `preserve`), chunks read stay copied-before-write until a journal checkpoint
//! covers them (the core's `Commit`), and a snapshot a power cut stops is taken up
//! again at the next power-on from its last checkpoint (the core's `Resume`, with the
//! copies that survived) and must still equal the volume at its first point in time.
//! The other half keep copies in memory: a power cut ends the snapshot, and the next
//! one starts over from the change record.
//!
//! Besides power cuts, the appliance now and then stops cleanly (hosts stop, a
//! running snapshot is suspended after a last checkpoint and held, and the power goes
//! off with everything on the media); journal saves and removals take time and now and
//! then fail; a journal taken up may no longer fit; and a cut may come between a
//! manifest and its catalogue, so the snapshot taken up is found published.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::model::{BLOCK, Model, fill, version_of};
use super::{CHUNK_BLOCKS, CHUNK_BYTES, Clock, Draw, EVENTS_AT_MOST, Micros, bit};
use crate::dirty::RecordFiles;
use crate::nondurable;
use crate::nondurable_medium::NonDurableMedium;
use crate::test_rng::Rng;
use crate::volume::core::{Action, Copied, Core, Event, Kept, Source};
use crate::volume::steps::{self, Steps};

/// PUTs of one object the writer tries before the snapshot fails.
const PUT_ATTEMPTS: u32 = 3;
/// Chunks the writer reads and uploads at once.
const CLAIMS_IN_FLIGHT: usize = 6;
/// No write (ids start at 1).
const NO_WRITE: u64 = 0;
/// Waiter of the snapshot's drain.
const DRAINED: u64 = u64::MAX;
/// Waiter of its begin.
const BEGUN: u64 = u64::MAX - 1;
/// Waiter of a resume after a power cut.
const RESUMED: u64 = u64::MAX - 2;
/// Uploads between a durable snapshot's journal checkpoints.
const CHECKPOINT_EVERY: u32 = 3;

/// Rules broken on purpose, to show the simulator catches it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Flaws {
    /// Acknowledge a write before its chunks are on the change record.
    pub(crate) ack_before_record: bool,
    /// Take the snapshot without flushing the volume at its point.
    pub(crate) no_flush_at_point: bool,
    /// A core that lets writes over chunks the snapshot is reading.
    pub(crate) writes_over_reads: bool,
    /// A begin that waits only for writes no snapshot guarded, not for those a
    /// snapshot let go ahead and that are still landing (the appliance before this
    /// simulator found it).
    pub(crate) begin_ignores_landing: bool,
    /// A guarded write that lands without looking at the change record again (the
    /// appliance before this simulator found it).
    pub(crate) land_without_record: bool,
    /// A snapshot taken up again after a power cut that ignores the copies saved
    /// before it (reads the volume instead).
    pub(crate) resume_without_copies: bool,
    /// A checkpoint that tells the volume its chunks need no copies before the journal
    /// naming them is durable (`volume::steps` broken so).
    pub(crate) commit_before_journal: bool,
    /// A snapshot that failed is ended (copies dropped, writes no longer guarded)
    /// before its journal is removed (the appliance before this simulator's review;
    /// `volume::steps` broken so).
    pub(crate) journal_after_end: bool,
    /// A snapshot abandoned (a copy could not be stored, so writes went ahead without
    /// copies) taken up again after a cut.
    pub(crate) resume_abandoned: bool,
}

impl Flaws {
    /// A snapshot attempt's steps, with a journal if `journal`, broken as these say.
    fn steps(&self, journal: bool) -> Steps {
        let flaws = steps::Flaws {
            commit_before_journal: self.commit_before_journal,
            journal_after_end: self.journal_after_end,
        };
        Steps::with_flaws(journal, flaws)
    }
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
    /// Percent of PUTs the store fails (a snapshot fails after three for one object).
    pub(crate) put_faults: u64,
    /// Percent of host requests that are flushes (some hosts rarely flush).
    pub(crate) flush_percent: u64,
    /// Copies before writes go to the volume's durable store, snapshots checkpoint a
    /// journal, and one cut short by a power cut is taken up again after it, as the
    /// appliance does (else copies are kept in memory and a cut ends the snapshot).
    pub(crate) durable: bool,
    /// Per thousand durable copies: those whose write fails and abandons the snapshot
    /// (the rest of the failures, 3 per thousand, fail the writes waiting instead).
    pub(crate) abandon_permille: u64,
    /// Per thousand removals of a journal: those that fail (the snapshot is then held
    /// until the next snapshot or a power-on gives it up).
    pub(crate) removals_failing_permille: u64,
    /// Every journal removal takes 10–100 ms, as when the appliance released an upload
    /// lease (a store round trip) before it.
    pub(crate) slow_removals: bool,
    /// Per thousand journal saves: those that fail (the new journal in place or not;
    /// the snapshot fails).
    pub(crate) save_failing_permille: u64,
    /// Per thousand snapshots taken up again: those whose journal no longer fits the
    /// settings (given up, journal first; a fresh one begins).
    pub(crate) unfit_permille: u64,
    pub(crate) flaws: Flaws,
}

impl Config {
    pub(crate) fn new(seed: u64, ops: u64) -> Self {
        Self {
            seed,
            ops,
            hosts: 3,
            chunks: 40,
            ops_per_cut: 400,
            put_faults: [2, 8, 25][(seed % 3) as usize],
            flush_percent: [4, 1, 0][(seed / 3 % 3) as usize],
            durable: (seed / 9).is_multiple_of(2),
            abandon_permille: 5,
            removals_failing_permille: 20,
            slow_removals: false,
            save_failing_permille: 10,
            unfit_permille: 50,
            flaws: Flaws::default(),
        }
    }
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub(crate) struct Stats {
    pub(crate) events: u64,
    pub(crate) host_ops: u64,
    pub(crate) writes_acked: u64,
    /// Writes failed because the copy they waited for could not be stored.
    pub(crate) writes_failed: u64,
    /// Snapshots abandoned because a copy could not be stored.
    pub(crate) abandoned: u64,
    pub(crate) writes_guarded: u64,
    pub(crate) copies: u64,
    pub(crate) snapshots: u64,
    pub(crate) snapshots_failed: u64,
    /// Snapshots taken first after a power cut.
    pub(crate) snapshots_after_cut: u64,
    pub(crate) chunks_uploaded: u64,
    pub(crate) blocks_checked: u64,
    pub(crate) cuts: u64,
    pub(crate) cuts_mid_record: u64,
    pub(crate) compactions: u64,
    /// Journal checkpoints of durable snapshots, and snapshots taken up again after a
    /// cut (from their journal, with the copies saved before it).
    pub(crate) checkpoints: u64,
    pub(crate) resumed: u64,
    /// Of those, published (and read back whole against their first point in time).
    pub(crate) resumed_published: u64,
    /// Of those, found published already (a cut after the manifest, before the
    /// catalogue removed the journal).
    pub(crate) found_published: u64,
    /// Snapshots held because their journal could not be removed.
    pub(crate) held: u64,
    /// Clean stops (the appliance stopped and started again, nothing lost), and the
    /// snapshots they suspended and held for the next start.
    pub(crate) restarts: u64,
    pub(crate) suspended: u64,
    /// Snapshots taken up again whose journal did not fit: given up.
    pub(crate) given_up: u64,
    /// Journal saves that failed (their snapshot with them).
    pub(crate) saves_failed: u64,
    pub(crate) simulated_us: u64,
    pub(crate) fingerprint: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, o: &Stats) {
        self.events += o.events;
        self.host_ops += o.host_ops;
        self.writes_acked += o.writes_acked;
        self.writes_failed += o.writes_failed;
        self.abandoned += o.abandoned;
        self.writes_guarded += o.writes_guarded;
        self.copies += o.copies;
        self.snapshots += o.snapshots;
        self.snapshots_failed += o.snapshots_failed;
        self.snapshots_after_cut += o.snapshots_after_cut;
        self.chunks_uploaded += o.chunks_uploaded;
        self.blocks_checked += o.blocks_checked;
        self.cuts += o.cuts;
        self.cuts_mid_record += o.cuts_mid_record;
        self.compactions += o.compactions;
        self.checkpoints += o.checkpoints;
        self.resumed += o.resumed;
        self.resumed_published += o.resumed_published;
        self.found_published += o.found_published;
        self.held += o.held;
        self.restarts += o.restarts;
        self.suspended += o.suspended;
        self.given_up += o.given_up;
        self.saves_failed += o.saves_failed;
        self.simulated_us += o.simulated_us;
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events, {} host operations ({} writes acknowledged, {} through the snapshot's \
             guard, {} copies before writes), {} snapshots published ({} first after a cut or \
             restart, {} failed), {} chunks uploaded, {} blocks checked, {} power cuts ({} \
             mid-record), {} clean restarts ({} snapshots suspended by them), {} compactions, \
             {} checkpoints, {} snapshots taken up again after a cut or restart ({} of them \
             published, {} found published already, {} given up as their journal did not \
             fit), {} held as their journal could not be removed, {} journal saves failed, {} \
             writes failed and {} snapshots abandoned as copies could not be stored",
            self.events,
            self.host_ops,
            self.writes_acked,
            self.writes_guarded,
            self.copies,
            self.snapshots,
            self.snapshots_after_cut,
            self.snapshots_failed,
            self.chunks_uploaded,
            self.blocks_checked,
            self.cuts,
            self.cuts_mid_record,
            self.restarts,
            self.suspended,
            self.compactions,
            self.checkpoints,
            self.resumed,
            self.resumed_published,
            self.found_published,
            self.given_up,
            self.held,
            self.saves_failed,
            self.writes_failed,
            self.abandoned,
        )
    }
}

pub(crate) fn run(config: &Config) -> Result<Stats, String> {
    let mut w = World::new(config)?;
    w.run()?;
    w.stats.simulated_us = w.clock.now();
    Ok(w.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write { fua: bool },
    Flush,
}

#[derive(Debug)]
struct Op {
    host: usize,
    kind: Kind,
    first: u64,
    blocks: u64,
    version: u64,
    floors: Vec<u64>,
    /// A guarded write not yet sent to the volume (waiting for the snapshot's leave,
    /// or on its way with it).
    guarded: bool,
    /// A plain write (one no snapshot guards).
    plain: bool,
    /// A write sent to the volume and not done.
    in_device: bool,
    /// A flush's sectors: those cached when it was issued.
    flushing: nondurable::Cached,
}

impl Op {
    fn chunks(&self) -> std::ops::RangeInclusive<u64> {
        self.first / CHUNK_BLOCKS..=(self.first + self.blocks - 1) / CHUNK_BLOCKS
    }
}

#[derive(Debug)]
enum Ev {
    Host(usize),
    /// A host request's device I/O ended.
    Disk(u64),
    /// A write's chunks are on the change record: it decides its path again.
    Recorded(u64),
    /// A copy's read of the volume ended.
    Copied {
        generation: u64,
        chunk: u64,
    },
    /// The record's commit ended.
    RecordCommit,
    /// A message reaches the owner.
    Core(Event<u64, u64>),
    /// The owner let a guarded write go ahead.
    Land(u64),
    SnapStart,
    /// The snapshot's flush at its point ended: these sectors are durable.
    SnapFlushed(nondurable::Cached),
    /// A claim's read of the volume ended.
    ChunkRead {
        chunk: u64,
    },
    /// A PUT's answer.
    Put {
        chunk: u64,
        data: Vec<u8>,
        attempt: u32,
    },
    /// A checkpoint's journal is durable.
    JournalSaved {
        id: u64,
        next: u64,
        uploaded: BTreeMap<u64, Vec<u8>>,
    },
    /// The journal of a snapshot that did not publish is removed (`ok`), or could not
    /// be.
    JournalRemoved {
        ok: bool,
    },
    /// The published snapshot is in the catalogue, and its journal removed (as the
    /// service does once the writer returns).
    Catalogued {
        id: u64,
    },
    Cut,
    /// A clean stop of the appliance: hosts stop, a running snapshot is suspended, and
    /// once all is quiet the power goes off with nothing lost, and on again.
    Stop,
}

impl Ev {
    /// Which event this is, for the run's fingerprint.
    fn discriminant(&self) -> u64 {
        match self {
            Ev::Host(h) => 1 + 16 * *h as u64,
            Ev::Disk(id) | Ev::Recorded(id) | Ev::Land(id) => 2 + 16 * id,
            Ev::Copied { chunk, .. } | Ev::ChunkRead { chunk } | Ev::Put { chunk, .. } => {
                3 + 16 * chunk
            }
            Ev::RecordCommit => 4,
            Ev::Core(_) => 5,
            Ev::SnapStart => 6,
            Ev::SnapFlushed(_) => 7,
            Ev::Cut => 8,
            Ev::Stop => 12,
            Ev::JournalSaved { next, .. } => 9 + 16 * next,
            Ev::JournalRemoved { ok } => 10 + 16 * u64::from(*ok),
            Ev::Catalogued { id } => 11 + 16 * id,
        }
    }
}

/// A published snapshot.
struct Snap {
    parent: Option<u64>,
    chunks: BTreeMap<u64, Vec<u8>>,
}

/// The running snapshot.
struct Running {
    id: u64,
    parent: Option<u64>,
    /// Its change set (after settling).
    changed: Vec<u64>,
    /// Per block: the version it must hold, or either of two.
    expect: Vec<(u64, Option<u64>)>,
    /// Plain writes it waits for (issued before it began).
    settling: BTreeSet<u64>,
    /// Chunks still to claim, in order.
    todo: Vec<u64>,
    in_flight: u64,
    /// Chunks claimed and not uploaded yet.
    claimed: BTreeSet<u64>,
    /// Uploads since the last checkpoint.
    since_checkpoint: u32,
    /// Taken up again after a cut.
    resumed: bool,
    /// Held: suspended, until the power-on takes it up again; or because its journal
    /// could not be removed, until the next snapshot or a power-on gives it up.
    held: bool,
    /// Suspended by a clean stop: it claims nothing more and ends held (with a durable
    /// journal), after one last checkpoint.
    suspended: bool,
    /// Its last checkpoint before the stop was asked for (or given up on).
    last_checkpoint: bool,
    /// Its journal could not be removed.
    removal_failed: bool,
    uploaded: BTreeMap<u64, Vec<u8>>,
    failed: bool,
    /// Taken up again and found published already: only ended.
    adopted: bool,
    after_cut: bool,
    phase: Phase,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// A taken-up snapshot's journal is checked.
    Checking,
    Settling,
    Flushing,
    Reading,
    /// Finished: ending, published or held.
    Finished,
}

/// A durable snapshot's journal as its last checkpoint saved it (as `ox::journal`:
/// saved atomically, so a cut keeps the last one whole): what it is, and every chunk
/// it stored below `next`.
#[derive(Clone)]
struct Journal {
    id: u64,
    parent: Option<u64>,
    changed: Vec<u64>,
    expect: Vec<(u64, Option<u64>)>,
    next: u64,
    uploaded: BTreeMap<u64, Vec<u8>>,
}

/// The change record (as `dirty`'s thread keeps it).
struct Record {
    files: RecordFiles,
    durable: Vec<u64>,
    needs: Vec<(Vec<u64>, Ev)>,
    committing: Option<(Vec<u64>, Vec<Ev>)>,
}

fn set(words: &mut [u64], chunk: u64) {
    words[(chunk / 64) as usize] |= 1 << (chunk % 64);
}

struct World {
    config: Config,
    rng: Rng,
    clock: Clock<(u64, Ev)>,
    power: u64,
    medium: NonDurableMedium,
    path: PathBuf,
    drive: nondurable::State,
    core: Core<u64, u64>,
    record: Record,
    model: Model,
    /// Per block: the version of the last write sent to the volume.
    decided: Vec<u64>,

    dirty: Vec<u64>,
    base: Option<u64>,
    active: bool,
    generation: u64,
    plain: BTreeSet<u64>,
    ops: BTreeMap<u64, Op>,
    next_id: u64,
    issued: u64,
    snaps: BTreeMap<u64, Snap>,
    latest: Option<u64>,
    running: Option<Running>,
    /// The next snapshot is the first since a power cut.
    after_cut: bool,
    /// When each lane's last message reaches the owner.
    lanes: Vec<Micros>,
    /// A check failed inside an action (reported after the event).
    failure: Option<String>,
    /// The published snapshot is being catalogued (its journal removed).
    cataloguing: bool,
    /// The change record is to be compacted once the commit in flight is done.
    compact_pending: bool,
    /// The volume's durable store of copies (as `preserve`): the running snapshot's
    /// copies whose write (with FUA) is done, by chunk.
    copies: BTreeMap<u64, Vec<u8>>,
    /// The running durable snapshot's journal, if it has saved one.
    journal: Option<Journal>,
    /// A clean stop is under way.
    stopping: bool,
    /// A snapshot is pending in the catalogue (from its request until it is catalogued,
    /// or fails other than by a stop): only a pending one is taken up at a start.
    pending: bool,
    /// The attempt failed (not by a stop): its request ends once the attempt is over.
    failing: bool,
    /// The store of copies' durable mark that the running snapshot was abandoned.
    abandoned: bool,
    /// The snapshot attempt's steps (`volume::steps`), from its start to its end.
    steps: Option<Steps>,
    stats: Stats,
}

impl World {
    fn new(config: &Config) -> Result<Self, String> {
        let medium = NonDurableMedium::new(config.seed);
        let path = Path::new("/volume/changes").to_path_buf();
        let mut drive = nondurable::State::new(config.chunks as usize * CHUNK_BYTES, config.seed);
        // The volume starts as version 0 of every block, durably.
        let mut block = vec![0u8; BLOCK];
        for b in 0..config.chunks * CHUNK_BLOCKS {
            fill(b, 0, &mut block);
            drive.write(b as usize * BLOCK, &block, true);
        }
        // A fresh volume: a record made now, relative to no snapshot, holding nothing.
        let (record, dirty, base) = open_record(&medium, &path, config.chunks, false)?;
        let mut core = Core::new(config.chunks);
        if config.flaws.writes_over_reads {
            core.break_reads();
        }
        let mut w = Self {
            config: config.clone(),
            rng: Rng(config.seed.wrapping_mul(0xA24B_AED4_963E_E407) | 1),
            clock: Clock::new(),
            power: 0,
            medium,
            path,
            drive,
            core,
            record,
            model: Model::new(config.chunks * CHUNK_BLOCKS),
            decided: vec![0; (config.chunks * CHUNK_BLOCKS) as usize],
            dirty,
            base,
            active: false,
            generation: 0,
            plain: BTreeSet::new(),
            ops: BTreeMap::new(),
            next_id: 0,
            issued: 0,
            snaps: BTreeMap::new(),
            latest: None,
            running: None,
            after_cut: false,
            lanes: vec![0; config.hosts + 1],
            failure: None,
            cataloguing: false,
            compact_pending: false,
            copies: BTreeMap::new(),
            journal: None,
            stopping: false,
            pending: false,
            failing: false,
            abandoned: false,
            steps: None,
            stats: Stats::default(),
        };
        w.power_on();
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
        let mut last_cut = false;
        // Each turn ends a power-on or a snapshot after the hosts are done: a run that
        // needs more is stuck.
        for _ in 0..1_000 {
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
                    .rotate_left(7)
                    .wrapping_add(self.clock.now() ^ ev.discriminant());
                self.event(ev)?;
                if self.stopping && self.failure.is_none() {
                    self.maybe_stopped()?;
                }
                if let Some(e) = self.failure.take() {
                    return Err(e);
                }
            }
            assert!(self.ops.is_empty(), "operations left: {:?}", self.ops);
            if self.running.as_ref().is_some_and(|r| r.held) {
                // Held (its journal could not be removed): a power-on gives it up.
                self.cut(Off::Cut)?;
                continue;
            }
            assert!(self.running.is_none(), "a snapshot never ended");
            // The hosts are done: one more cut, and a snapshot after it.
            if self.after_cut {
                self.snap_start()?;
                continue;
            }
            if last_cut {
                return Ok(());
            }
            last_cut = true;
            self.cut(Off::Cut)?;
        }
        Err("no end after 1,000 power-ons and snapshots".into())
    }

    fn event(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Host(h) => self.host(h),
            Ev::Disk(id) => self.disk_done(id),
            Ev::Recorded(id) => {
                self.start_write(id);
                Ok(())
            }
            Ev::Copied { generation, chunk } => {
                let data = self.read_volume(chunk * CHUNK_BLOCKS, CHUNK_BLOCKS);
                self.stats.copies += 1;
                let current = generation == self.generation && self.running.is_some();
                let how = if !self.config.durable {
                    Copied::Kept(Kept::Memory(data))
                } else {
                    let abandon = self.config.abandon_permille;
                    match self.rng.below(1000) {
                        // The store of copies failed this write, and its mark that
                        // the snapshot is abandoned is durable: writes need no copies,
                        // and the snapshot must fail (as `preserve`).
                        n if n < abandon => {
                            if current && !self.abandoned {
                                self.abandoned = true;
                                self.stats.abandoned += 1;
                            }
                            Copied::Abandoned
                        }
                        // It failed, and so did the mark: the writes waiting fail.
                        n if n < abandon + 3 => Copied::Failed("the store of copies failed".into()),
                        // Written with FUA and done: it survives any cut from now on
                        // (the store holds the running snapshot's copies only).
                        _ => {
                            if current {
                                self.copies.insert(chunk, data);
                            }
                            Copied::Kept(Kept::Saved)
                        }
                    }
                };
                self.apply(Event::Copied {
                    generation,
                    chunk,
                    how,
                });
                Ok(())
            }
            Ev::RecordCommit => self.record_commit(),
            Ev::Core(e) => {
                self.apply(e);
                Ok(())
            }
            Ev::Land(id) => {
                self.land(id);
                Ok(())
            }
            Ev::SnapStart => self.snap_start(),
            Ev::SnapFlushed(sectors) => {
                self.drive.persist(sectors);
                self.flushed();
                Ok(())
            }
            Ev::ChunkRead { chunk } => {
                let data = self.read_volume(chunk * CHUNK_BLOCKS, CHUNK_BLOCKS);
                let generation = self.generation;
                self.send(self.config.hosts, Event::ChunkRead { generation, chunk });
                self.put(chunk, data, 1);
                Ok(())
            }
            Ev::Put {
                chunk,
                data,
                attempt,
            } => self.put_answer(chunk, data, attempt),
            Ev::JournalSaved { id, next, uploaded } => {
                self.journal_saved(id, next, uploaded);
                Ok(())
            }
            Ev::JournalRemoved { ok } => {
                if ok {
                    self.journal = None;
                } else if let Some(r) = self.running.as_mut() {
                    r.removal_failed = true;
                }
                self.step(steps::Event::JournalRemoved { ok });
                Ok(())
            }
            Ev::Catalogued { id } => self.catalogued(id),
            Ev::Cut => self.cut(Off::Cut),
            Ev::Stop => {
                self.stopping = true;
                if let Some(r) = self
                    .running
                    .as_mut()
                    .filter(|r| !r.held && r.phase != Phase::Finished)
                {
                    r.suspended = true;
                }
                self.maybe_publish()
            }
        }
    }

    /// Sends `event` to the owner from `lane` (a host's reactor; the snapshot writer's
    /// is `hosts`): it arrives after a message's hop, in order with the lane's earlier
    /// messages but in any order with other lanes'.
    fn send(&mut self, lane: usize, event: Event<u64, u64>) {
        let now = self.clock.now();
        let at = (now + self.between(1, 5)).max(self.lanes[lane]);
        self.lanes[lane] = at;
        self.at(at - now, Ev::Core(event));
    }

    fn apply(&mut self, event: Event<u64, u64>) {
        let actions = self.core.apply(event);
        let power = self.power;
        for a in actions {
            if self.power != power {
                // A power cut on the way: the rest died with the core.
                return;
            }
            match a {
                Action::Copy { generation, chunk } => {
                    let t = self.between(10, 200);
                    self.at(t, Ev::Copied { generation, chunk });
                }
                Action::Proceed(id) => {
                    // Now and then the leave waits behind a busy reactor's mail for
                    // as long as a whole snapshot takes.
                    let t = if self.chance(2) {
                        self.between(20_000, 150_000)
                    } else {
                        self.between(1, 5)
                    };
                    self.at(t, Ev::Land(id));
                }
                Action::Fail(id, _, _) => {
                    assert!(self.config.durable, "copies in memory never fail");
                    self.write_failed(id);
                }
                Action::Serve(chunk, Source::Device) => {
                    let t = self.between(10, 200);
                    self.at(t, Ev::ChunkRead { chunk });
                }
                Action::Serve(chunk, Source::Kept(Kept::Memory(data))) => self.put(chunk, data, 1),
                Action::Serve(chunk, Source::Kept(Kept::Saved)) => {
                    let Some(data) = self.copies.get(&chunk).cloned() else {
                        panic!("chunk {chunk}: a saved copy the store of copies does not hold")
                    };
                    self.put(chunk, data, 1);
                }
                Action::Refuse(chunk) => {
                    // Only an abandoned snapshot's claims are refused: it fails.
                    assert!(self.abandoned, "the claim of chunk {chunk} was refused");
                    let r = self.running.as_mut().expect("a snapshot claims");
                    r.failed = true;
                    r.in_flight -= 1;
                    r.claimed.remove(&chunk);
                    if let Err(e) = self.maybe_publish() {
                        self.failure.get_or_insert(e);
                    }
                }
                Action::Ready(DRAINED) => self.begin(),
                Action::Ready(RESUMED) => self.resumed(),
                Action::Ready(_) => {}
            }
        }
    }

    // ------------------------------------------------------------------ hosts

    fn host(&mut self, h: usize) -> Result<(), String> {
        // (A stop lets hosts go on until the running snapshot is suspended and held.)
        let stopped =
            self.stopping && self.steps.is_none() && self.running.as_ref().is_none_or(|r| r.held);
        if self.issued >= self.config.ops || stopped {
            return Ok(());
        }
        self.issued += 1;
        self.stats.host_ops += 1;
        let blocks = self.model.blocks();
        let roll = self.rng.below(100);
        let n = self.between(1, 12);
        let first = self.rng.below(blocks - n + 1);
        let kind = match roll {
            r if r < self.config.flush_percent => Kind::Flush,
            r if r < 60 && self.model.free(first, n) => Kind::Write {
                fua: self.chance(15),
            },
            _ => Kind::Read,
        };
        let id = self.id();
        let mut op = Op {
            host: h,
            kind,
            first,
            blocks: n,
            version: 0,
            floors: Vec::new(),
            guarded: false,
            plain: false,
            in_device: false,
            flushing: Vec::new(),
        };
        match kind {
            Kind::Flush => {
                op.floors = self.model.acked();
                op.flushing = self.drive.cached();
                self.ops.insert(id, op);
                let t = self.between(100, 2_000);
                self.at(t, Ev::Disk(id));
            }
            Kind::Read => {
                op.floors = self.model.read_floors(first, n);
                self.ops.insert(id, op);
                let t = self.between(10, 200);
                self.at(t, Ev::Disk(id));
            }
            Kind::Write { .. } => {
                op.version = self.model.begin_write(first, n, false);
                self.ops.insert(id, op);
                self.start_write(id);
            }
        }
        Ok(())
    }

    fn host_next(&mut self, h: usize) {
        let t = self.between(0, 300);
        self.at(t, Ev::Host(h));
    }

    /// As `volume::start_write`: marks the chunks changed, puts them on record first
    /// (then decides again), and writes plainly or through the snapshot's guard.
    fn start_write(&mut self, id: u64) {
        let guarded = self.active;
        let chunks = self.ops[&id].chunks();
        for c in chunks.clone() {
            set(&mut self.dirty, c);
        }
        let missing: Vec<u64> = chunks
            .clone()
            .filter(|&c| !bit(&self.record.durable, c))
            .collect();
        if !missing.is_empty() && !self.config.flaws.ack_before_record {
            self.record.needs.push((missing, Ev::Recorded(id)));
            return self.record_maybe();
        }
        if !guarded {
            self.plain.insert(id);
            self.ops.get_mut(&id).expect("write").plain = true;
            return self.send_write(id);
        }
        self.stats.writes_guarded += 1;
        self.ops.get_mut(&id).expect("write").guarded = true;
        if chunks.clone().all(|c| self.core.free(c)) {
            return self.land(id);
        }
        let lane = self.ops[&id].host;
        self.send(
            lane,
            Event::Guard {
                waiter: id,
                first: *chunks.start(),
                last: *chunks.end(),
            },
        );
    }

    /// As `volume::land`: a guarded write marks its chunks, puts back on the change
    /// record any the record dropped meanwhile (then lands again), and goes to the
    /// volume; a begin from now on waits for it (`Mode::landed_before`).
    fn land(&mut self, id: u64) {
        let chunks = self.ops[&id].chunks();
        for c in chunks.clone() {
            set(&mut self.dirty, c);
        }
        let missing: Vec<u64> = chunks.filter(|&c| !bit(&self.record.durable, c)).collect();
        let flaws = self.config.flaws;
        if !missing.is_empty() && !flaws.ack_before_record && !flaws.land_without_record {
            self.record.needs.push((missing, Ev::Land(id)));
            return self.record_maybe();
        }
        self.ops.get_mut(&id).expect("write").guarded = false;
        self.send_write(id);
    }

    /// Sends a write to the volume. Its bytes can be read at once (a read, or a
    /// snapshot's, may see them before the write is done: [`Self::read_volume`]), a
    /// flush covers them only once it is done, and it is done after a while — now and
    /// then a long while, as a drive that stalls.
    fn send_write(&mut self, id: u64) {
        let op = self.ops.get_mut(&id).expect("write");
        op.in_device = true;
        for b in op.first..op.first + op.blocks {
            self.decided[b as usize] = op.version;
        }
        let t = if self.chance(3) {
            self.between(20_000, 80_000)
        } else {
            self.between(20, 300)
        };
        self.at(t, Ev::Disk(id));
    }

    fn disk_done(&mut self, id: u64) -> Result<(), String> {
        let op = &self.ops[&id];
        match op.kind {
            Kind::Flush => {
                let op = self.ops.remove(&id).expect("flush");
                self.drive.persist(op.flushing);
                self.model.flushed(&op.floors);
                self.host_next(op.host);
            }
            Kind::Read => {
                let bytes = self.read_volume(op.first, op.blocks);
                let op = self.ops.remove(&id).expect("read");
                for (i, b) in bytes.chunks(BLOCK).enumerate() {
                    let block = op.first + i as u64;
                    self.model
                        .check(block, op.floors[i], b)
                        .map_err(|e| format!("host {}'s read: {e}", op.host))?;
                    self.stats.blocks_checked += 1;
                }
                self.host_next(op.host);
            }
            Kind::Write { fua } => {
                self.drive
                    .write(op.first as usize * BLOCK, &write_bytes(op), fua);
                self.ops.get_mut(&id).expect("write").in_device = false;
                self.write_done(id);
                return self.settled(id);
            }
        }
        Ok(())
    }

    /// What a read of `blocks` blocks at `first` finds: the drive, and over it the
    /// writes sent and not yet done (hosts never have two over one block).
    fn read_volume(&self, first: u64, blocks: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; blocks as usize * BLOCK];
        self.drive.read(first as usize * BLOCK, &mut bytes);
        for op in self.ops.values().filter(|o| o.in_device) {
            let written = write_bytes(op);
            for b in op.first.max(first)..(op.first + op.blocks).min(first + blocks) {
                let (from, to) = (
                    (b - op.first) as usize * BLOCK,
                    (b - first) as usize * BLOCK,
                );
                bytes[to..to + BLOCK].copy_from_slice(&written[from..from + BLOCK]);
            }
        }
        bytes
    }

    /// A guarded write failed (the copy it waited for could not be stored): never
    /// sent, never acknowledged.
    fn write_failed(&mut self, id: u64) {
        let op = self.ops.remove(&id).expect("write");
        self.model
            .end_write(op.first, op.blocks, op.version, false, false);
        self.stats.writes_failed += 1;
        self.host_next(op.host);
    }

    fn write_done(&mut self, id: u64) {
        let op = self.ops.remove(&id).expect("write");
        // The rule of the change record: a write is acknowledged only with its chunks
        // on it.
        if let Some(c) = op.chunks().find(|&c| !bit(&self.record.durable, c))
            && !self.config.flaws.ack_before_record
        {
            self.failure.get_or_insert(format!(
                "write version {} of blocks {}+{} is acknowledged with chunk {c} off the \
                 change record",
                op.version, op.first, op.blocks
            ));
        }
        let fua = op.kind == Kind::Write { fua: true };
        self.model
            .end_write(op.first, op.blocks, op.version, true, fua);
        self.stats.writes_acked += 1;
        self.host_next(op.host);
    }

    // ------------------------------------------------------------------ the record

    fn record_maybe(&mut self) {
        let r = &mut self.record;
        if r.committing.is_some() || r.needs.is_empty() {
            return;
        }
        let mut batch: Vec<u64> = r
            .needs
            .iter()
            .flat_map(|n| n.0.iter().copied())
            .filter(|&c| !bit(&r.durable, c))
            .collect();
        batch.sort_unstable();
        batch.dedup();
        let then = r.needs.drain(..).map(|(_, ev)| ev).collect();
        r.committing = Some((batch, then));
        let t = self.between(100, 1_500);
        self.at(t, Ev::RecordCommit);
    }

    /// As `dirty::Work::commit`: one append (or checkpoint) for every write waiting.
    fn record_commit(&mut self) -> Result<(), String> {
        let (batch, then) = self.record.committing.take().expect("a commit");
        let result = self.record.files.commit(&self.record.durable, &batch);
        if self.medium.failed().is_some() {
            return self.cut(Off::Blown);
        }
        result.map_err(|e| format!("the change record: {e}"))?;
        for &c in &batch {
            set(&mut self.record.durable, c);
        }
        for ev in then {
            let t = self.between(1, 5);
            self.at(t, ev);
        }
        if self.compact_pending && self.record.needs.is_empty() {
            self.compact_pending = false;
            self.compact()?;
            self.next_snapshot();
        }
        self.record_maybe();
        Ok(())
    }

    /// As `dirty::Work::compact`: the record becomes relative to `base`, keeping only
    /// the chunks written since it began; the base is written first.
    fn compact(&mut self) -> Result<(), String> {
        let keep: Vec<u64> = self
            .record
            .durable
            .iter()
            .zip(&self.dirty)
            .map(|(d, w)| d & w)
            .collect();
        // A chunk leaves the record only once no write over it is on its way: one on
        // its way was sent before the snapshot began (the snapshot waited for it) or
        // marked its chunks in the change set kept.
        if let Some(o) = self.ops.values().find(|o| {
            o.in_device
                && o.chunks()
                    .any(|c| bit(&self.record.durable, c) && !bit(&keep, c))
        }) {
            return Err(format!(
                "the change record drops a chunk of blocks {}+{} while a write (version {}) \
                 is on its way there",
                o.first, o.blocks, o.version
            ));
        }
        self.record.durable.clone_from(&keep);
        let result = self.record.files.compact(self.base.map(base_id), &keep);
        if self.medium.failed().is_some() {
            return self.cut(Off::Blown);
        }
        result.map_err(|e| format!("compacting the change record: {e}"))?;
        self.stats.compactions += 1;
        Ok(())
    }

    // ------------------------------------------------------------------ snapshots

    /// Applies `event` to the attempt's steps (`volume::steps`: the appliance's own
    /// order) and carries out what they ask, as `ox::snapshot` does.
    fn step(&mut self, event: steps::Event) {
        let Some(s) = self.steps.as_mut() else {
            panic!("{event:?} with no snapshot attempt")
        };
        let actions = s.apply(event);
        let power = self.power;
        for action in actions {
            if self.power != power {
                // A power cut on the way (a compaction's): the rest died with it.
                return;
            }
            if let Err(e) = self.carry_out(action) {
                self.failure.get_or_insert(e);
            }
        }
        match &self.steps {
            Some(s) if s.done() => {
                self.steps = None;
                // (As the service: a failure during a stop leaves it pending.)
                if std::mem::take(&mut self.failing) && !self.stopping {
                    self.pending = false;
                }
            }
            // A snapshot taken up was given up: a fresh one begins.
            Some(s) if s.idle() => self.step(steps::Event::Start { taken_up: false }),
            _ => {}
        }
    }

    fn carry_out(&mut self, action: steps::Action) -> Result<(), String> {
        use steps::Action as A;
        let generation = self.generation;
        match action {
            A::CheckJournal => {
                // As `ox::snapshot`'s check (`fitting`): the journal of the snapshot
                // taken up fits, unless the settings changed meanwhile (a new key,
                // another store): then it is given up, journal first, and a fresh
                // snapshot begins.
                let Some(j) = &self.journal else {
                    panic!("a snapshot taken up without a journal")
                };
                let next = j.next;
                let fits = self.rng.below(1000) >= self.config.unfit_permille;
                if !fits {
                    self.stats.given_up += 1;
                }
                self.step(steps::Event::Checked {
                    next: fits.then_some(next),
                    start_over: true,
                });
            }
            A::Begin => {
                // As `VolumeHandle::begin_snapshot`: the copies of the snapshot before
                // drain first (they carry its token).
                self.apply(Event::Drain {
                    after: generation,
                    waiter: DRAINED,
                });
            }
            A::AwaitWrites => self.settled(NO_WRITE)?,
            A::Settle => {
                // What was written since the swap belongs to this snapshot too.
                let r = self.running.as_mut().expect("a snapshot settles");
                for (c, d) in r.changed.iter_mut().zip(&self.dirty) {
                    *c |= d;
                }
            }
            A::Flush => {
                if self.config.flaws.no_flush_at_point {
                    self.flushed();
                } else {
                    let t = self.between(100, 2_000);
                    let sectors = self.drive.cached();
                    self.at(t, Ev::SnapFlushed(sectors));
                }
            }
            A::ReadAll => {
                let r = self.running.as_mut().expect("a snapshot");
                r.changed.iter_mut().for_each(|w| *w = u64::MAX);
            }
            A::NeedOnly => {
                let changed = self.running.as_ref().expect("a snapshot").changed.clone();
                self.send(
                    self.config.hosts,
                    Event::Needed {
                        generation,
                        changed,
                    },
                );
            }
            A::Write { from } => self.write_from(from)?,
            A::SaveJournal { next } => {
                let r = self.running.as_ref().expect("a snapshot checkpoints");
                let uploaded: BTreeMap<u64, Vec<u8>> = r
                    .uploaded
                    .range(..next)
                    .map(|(&c, d)| (c, d.clone()))
                    .collect();
                let id = r.id;
                // A file written, synced, renamed and its directory synced: a few ms,
                // on a busy disk tens.
                let t = if self.chance(20) {
                    self.between(10_000, 40_000)
                } else {
                    self.between(500, 5_000)
                };
                self.at(t, Ev::JournalSaved { id, next, uploaded });
            }
            A::Commit { next } => {
                self.send(self.config.hosts, Event::Commit { generation, next });
            }
            A::RemoveJournal => {
                // A file unlinked and its directory synced: a few ms, on a busy disk
                // tens; now and then it fails.
                let t = if self.chance(10) || self.config.slow_removals {
                    self.between(10_000, 100_000)
                } else {
                    self.between(500, 5_000)
                };
                // (Nothing there: removed at once, as `journal::remove`.)
                let ok = self.journal.is_none()
                    || self.rng.below(1000) >= self.config.removals_failing_permille;
                self.at(t, Ev::JournalRemoved { ok });
            }
            A::End { give_back } => self.end(give_back),
            A::SetBase => {
                self.base = self.latest;
                // The service catalogues it and removes its journal (two files synced:
                // tens of µs on a fast drive, ms on a busy one), then compacts the
                // change record; no snapshot begins meanwhile.
                self.cataloguing = true;
                let id = self.latest.expect("a snapshot published");
                let t = self.between(20, 5_000);
                self.at(t, Ev::Catalogued { id });
            }
            A::Hold => {
                let r = self.running.as_mut().expect("a snapshot is held");
                r.held = true;
                if r.removal_failed {
                    self.stats.held += 1;
                    // (Its job fails: the attempt, or a start's giving up.)
                    self.failing |= !r.suspended;
                } else {
                    self.stats.suspended += 1;
                }
            }
        }
        Ok(())
    }

    /// Starts a snapshot attempt, unless one runs (or is held), or the last one is not
    /// catalogued yet.
    fn snap_start(&mut self) -> Result<(), String> {
        if self.steps.is_none()
            && !self.stopping
            && self
                .running
                .as_ref()
                .is_some_and(|r| r.held && r.removal_failed)
        {
            self.give_up_held();
            return Ok(());
        }
        if self.running.is_some()
            || self.steps.is_some()
            || self.cataloguing
            || self.compact_pending
            || self.stopping
        {
            return Ok(());
        }
        self.pending = true;
        self.steps = Some(self.config.flaws.steps(self.config.durable));
        self.step(steps::Event::Start { taken_up: false });
        Ok(())
    }

    /// As the service's next snapshot request: a snapshot an earlier one left held (its
    /// journal could not be removed) is given up first, in the steps' order.
    fn give_up_held(&mut self) {
        let mut s = self.config.flaws.steps(true);
        let asked = s.apply(steps::Event::Start { taken_up: true });
        assert_eq!(asked, [steps::Action::CheckJournal], "giving up");
        self.steps = Some(s);
        self.step(steps::Event::Checked {
            next: None,
            start_over: false,
        });
    }

    /// The drain is done: the snapshot begins.
    fn begin(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        // A new point in time: the store of copies starts empty (a new token).
        self.copies.clear();
        self.abandoned = false;
        self.apply(Event::Begin {
            generation,
            durable: self.config.durable,
            waiter: BEGUN,
        });
        let words = self.dirty.len();
        let changed = std::mem::replace(&mut self.dirty, vec![0; words]);
        self.active = true;
        // What the snapshot must hold: every write sent to the volume by now (the
        // begin waits for those still landing), and of a guarded write not yet sent
        // (let go by the snapshot before, it does not ask this one) its version or the
        // one before: it was not done when this one began.
        let guarded: BTreeMap<u64, u64> = self
            .ops
            .values()
            .filter(|o| o.guarded)
            .flat_map(|o| (o.first..o.first + o.blocks).map(|b| (b, o.version)))
            .collect();
        let expect = self
            .decided
            .iter()
            .enumerate()
            .map(|(b, &v)| (v, guarded.get(&(b as u64)).copied()))
            .collect();
        let id = self.id();
        self.running = Some(Running {
            id,
            parent: self.latest,
            changed,
            expect,
            // As `Mode::heard_begin`: every write on the volume now.
            settling: self
                .ops
                .iter()
                .filter(|(_, o)| {
                    o.in_device && (o.plain || !self.config.flaws.begin_ignores_landing)
                })
                .map(|(&id, _)| id)
                .collect(),
            todo: Vec::new(),
            in_flight: 0,
            claimed: BTreeSet::new(),
            since_checkpoint: 0,
            resumed: false,
            held: false,
            removal_failed: false,
            // (One job's progress: a stop while it began suspends it too.)
            suspended: self.stopping,
            last_checkpoint: false,
            uploaded: BTreeMap::new(),
            failed: false,
            adopted: false,
            after_cut: std::mem::take(&mut self.after_cut),
            phase: Phase::Settling,
        });
        self.step(steps::Event::Begun {
            durable: self.config.durable,
        });
    }

    /// Plain write `id` is done ([`NO_WRITE`]: none): a snapshot waiting for it may go
    /// on.
    fn settled(&mut self, id: u64) -> Result<(), String> {
        let Some(r) = &mut self.running else {
            return Ok(());
        };
        r.settling.remove(&id);
        if r.phase != Phase::Settling || !r.settling.is_empty() {
            return Ok(());
        }
        r.phase = Phase::Flushing;
        self.step(steps::Event::Settled);
        Ok(())
    }

    /// The volume is flushed at the snapshot's point.
    fn flushed(&mut self) {
        let Some(r) = &self.running else { return };
        let base_matches = self.base == r.parent;
        self.step(steps::Event::Flushed { base_matches });
    }

    /// As `ox::snapshot`'s writer: reads the changed chunks from `from` on, a few at
    /// once, after the first checkpoint (with a journal); one an earlier attempt
    /// published already (a cut before its catalogue) is only found.
    fn write_from(&mut self, from: u64) -> Result<(), String> {
        let chunks = self.config.chunks;
        let r = self.running.as_mut().expect("a snapshot writes");
        let changed = &r.changed;
        r.todo = (from..chunks).rev().filter(|&c| bit(changed, c)).collect();
        r.phase = Phase::Reading;
        if self.snaps.contains_key(&r.id) {
            r.adopted = true;
            r.todo.clear();
            return self.maybe_publish();
        }
        if self.steps.as_ref().is_some_and(Steps::journaling) {
            r.since_checkpoint = 0;
            self.step(steps::Event::CheckpointDue { next: from });
        }
        self.claim_more();
        self.maybe_publish()
    }

    /// Claims chunks until [`CLAIMS_IN_FLIGHT`] are.
    fn claim_more(&mut self) {
        while self
            .running
            .as_ref()
            .is_some_and(|r| (r.in_flight as usize) < CLAIMS_IN_FLIGHT)
            && self.claim_next()
        {}
    }

    /// Claims the next chunk to read, if the snapshot may; says whether it did.
    fn claim_next(&mut self) -> bool {
        let generation = self.generation;
        if !self.steps.as_ref().is_some_and(Steps::may_claim) {
            return false;
        }
        let Some(r) = &mut self.running else {
            return false;
        };
        if r.failed || r.suspended || r.phase != Phase::Reading {
            return false;
        }
        if self.abandoned {
            // As `ox::snapshot`'s check before each chunk: it fails.
            r.failed = true;
            return false;
        }
        let Some(chunk) = r.todo.pop() else {
            return false;
        };
        r.in_flight += 1;
        r.claimed.insert(chunk);
        self.step(steps::Event::Claimed(chunk));
        self.send(
            self.config.hosts,
            Event::Claim {
                generation,
                chunk,
                waiter: chunk,
            },
        );
        true
    }

    fn put(&mut self, chunk: u64, data: Vec<u8>, attempt: u32) {
        let t = self.between(1_000, 10_000);
        self.at(
            t,
            Ev::Put {
                chunk,
                data,
                attempt,
            },
        );
    }

    fn put_answer(&mut self, chunk: u64, data: Vec<u8>, attempt: u32) -> Result<(), String> {
        let stored = !self.chance(self.config.put_faults);
        if !stored && attempt < PUT_ATTEMPTS {
            self.put(chunk, data, attempt + 1);
            return Ok(());
        }
        let r = self.running.as_mut().expect("a snapshot");
        r.in_flight -= 1;
        r.claimed.remove(&chunk);
        if stored {
            r.uploaded.insert(chunk, data);
            r.since_checkpoint += 1;
            self.stats.chunks_uploaded += 1;
            self.step(steps::Event::Handed(chunk));
        } else {
            r.failed = true;
        }
        self.checkpoint();
        self.claim_more();
        self.maybe_publish()
    }

    /// A checkpoint every few uploads, one at a time (as `ox::snapshot`'s, every few
    /// seconds): at the first chunk not stored yet.
    fn checkpoint(&mut self) {
        let chunks = self.config.chunks;
        let Some(r) = &mut self.running else { return };
        let Some(s) = &self.steps else { return };
        if !s.journaling() || s.saving() || r.failed || r.since_checkpoint < CHECKPOINT_EVERY {
            return;
        }
        r.since_checkpoint = 0;
        let next = [r.todo.last(), r.claimed.first()]
            .into_iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(chunks);
        self.step(steps::Event::CheckpointDue { next });
    }

    /// The checkpoint's journal is durable (a cut before this keeps the one before), or
    /// its save failed — the new journal in place or not — and the snapshot fails, as
    /// `ox::snapshot`'s writer does.
    fn journal_saved(&mut self, id: u64, next: u64, uploaded: BTreeMap<u64, Vec<u8>>) {
        let r = self.running.as_ref().expect("a snapshot saves its journal");
        // An attempt waits for its checkpoint before it ends.
        assert_eq!(r.id, id, "a journal saved for another snapshot");
        if let Some(j) = &self.journal
            && j.id == id
        {
            assert!(next >= j.next, "a checkpoint never goes back");
        }
        let failed = self.rng.below(1000) < self.config.save_failing_permille;
        let in_place = !failed || self.chance(50);
        let r = self.running.as_ref().expect("a snapshot");
        if in_place {
            self.journal = Some(Journal {
                id,
                parent: r.parent,
                changed: r.changed.clone(),
                expect: r.expect.clone(),
                next,
                uploaded,
            });
        }
        if failed {
            self.stats.saves_failed += 1;
            self.running.as_mut().expect("a snapshot").failed = true;
            self.step(steps::Event::SaveFailed { next });
        } else {
            self.stats.checkpoints += 1;
            self.step(steps::Event::Saved { next });
        }
        self.claim_more();
        if let Err(e) = self.maybe_publish() {
            self.failure.get_or_insert(e);
        }
    }

    /// Finishes the attempt once nothing is in flight (its checkpoint included):
    /// published (and checked) if every chunk went up, else failed.
    fn maybe_publish(&mut self) -> Result<(), String> {
        let Some(r) = &self.running else {
            return Ok(());
        };
        let stopped = r.failed || r.suspended;
        if r.phase != Phase::Reading || r.in_flight > 0 || (!r.todo.is_empty() && !stopped) {
            return Ok(());
        }
        let Some(steps) = &self.steps else {
            return Ok(());
        };
        if steps.saving() {
            return Ok(());
        }
        if r.suspended
            && !r.failed
            && !r.last_checkpoint
            && !r.adopted
            && steps.journaling()
            && !self.abandoned
            && let Some(&next) = r.todo.last()
        {
            // As `ox::snapshot`'s writer, suspended before its last chunk: a last
            // checkpoint first — unless its uploads take too long (as
            // `SUSPEND_PATIENCE`), now and then.
            self.running.as_mut().expect("a snapshot").last_checkpoint = true;
            if self.chance(80) {
                self.step(steps::Event::CheckpointDue { next });
                return Ok(());
            }
        }
        // As `ox::snapshot`'s last look before publishing: abandoned, it fails (one
        // found published already is only adopted, before that look); suspended, it
        // stops.
        let r = self.running.as_ref().expect("a snapshot");
        let failed = !r.adopted && (r.failed || r.suspended || self.abandoned);
        let suspended = r.suspended && !r.adopted;
        // The service: a failure of its own ends the request, once the attempt is over.
        self.failing = failed && !suspended;
        let (id, adopted) = (r.id, r.adopted);
        if !failed {
            let r = self.running.as_mut().expect("a snapshot");
            let (parent, chunks) = (r.parent, std::mem::take(&mut r.uploaded));
            if adopted {
                self.stats.found_published += 1;
            } else {
                self.snaps.insert(id, Snap { parent, chunks });
                self.stats.snapshots += 1;
                if r.resumed {
                    self.stats.resumed_published += 1;
                }
                if r.after_cut {
                    self.stats.snapshots_after_cut += 1;
                }
                let expect = std::mem::take(&mut r.expect);
                self.check_snapshot(id, &expect)?;
            }
            self.latest = Some(id);
        }
        self.running.as_mut().expect("a snapshot").phase = Phase::Finished;
        let finish = steps::Finish {
            published: !failed,
            suspended,
            abandoned: self.abandoned,
            cancelled: false,
        };
        self.step(steps::Event::Finished(finish));
        Ok(())
    }

    /// As `VolumeHandle::end_snapshot`: the owner frees every chunk and drops the
    /// copies; a snapshot that did not publish gives its changes back.
    fn end(&mut self, give_back: bool) {
        let r = self.running.take().expect("a snapshot ends");
        // (The mark of abandonment stays until the next begin, as `preserve`'s.)
        self.copies.clear();
        self.generation += 1;
        self.active = false;
        let generation = self.generation;
        self.send(self.config.hosts, Event::End { generation });
        if give_back {
            self.stats.snapshots_failed += 1;
            for (d, c) in self.dirty.iter_mut().zip(&r.changed) {
                *d |= c;
            }
            self.after_cut |= r.after_cut;
            self.next_snapshot();
        }
    }

    /// The published snapshot `id` is catalogued and its journal removed: the change
    /// record is compacted (once the writes it waits for are recorded), and the next
    /// snapshot scheduled.
    fn catalogued(&mut self, id: u64) -> Result<(), String> {
        if self.journal.as_ref().is_some_and(|j| j.id == id) {
            self.journal = None;
        }
        self.pending = false;
        self.cataloguing = false;
        // As the record's thread: what writes asked for before is recorded first.
        if self.record.committing.is_some() || !self.record.needs.is_empty() {
            self.compact_pending = true;
            self.record_maybe();
            return Ok(());
        }
        self.compact()?;
        self.next_snapshot();
        Ok(())
    }

    /// The snapshot the cut stopped is taken up again (as the service's start and
    /// `ox::snapshot`): it reads what its journal had not stored, to the same point in
    /// time.
    fn resumed(&mut self) {
        let Some(j) = self.journal.clone() else {
            panic!("a resume without a journal")
        };
        self.stats.resumed += 1;
        self.active = true;
        assert!(self.pending, "only a pending snapshot is taken up");
        self.running = Some(Running {
            id: j.id,
            parent: j.parent,
            todo: Vec::new(),
            changed: j.changed,
            expect: j.expect,
            settling: BTreeSet::new(),
            in_flight: 0,
            claimed: BTreeSet::new(),
            since_checkpoint: 0,
            resumed: true,
            held: false,
            removal_failed: false,
            suspended: false,
            last_checkpoint: false,
            uploaded: j.uploaded,
            failed: false,
            adopted: false,
            after_cut: false,
            phase: Phase::Checking,
        });
        self.steps = Some(self.config.flaws.steps(true));
        self.step(steps::Event::Start { taken_up: true });
    }

    /// Schedules the next snapshot: usually a while after this one, sometimes at once
    /// (a policy catching up), while writes this one guarded may still be landing.
    fn next_snapshot(&mut self) {
        if self.issued < self.config.ops {
            let t = if self.chance(30) {
                self.between(0, 500)
            } else {
                self.between(5_000, 40_000)
            };
            self.at(t, Ev::SnapStart);
        }
    }

    /// Reads snapshot `id` back through its parents: each block must be the version
    /// expected of it.
    fn check_snapshot(&mut self, id: u64, expect: &[(u64, Option<u64>)]) -> Result<(), String> {
        let mut image = vec![0u8; CHUNK_BYTES];
        for chunk in 0..self.config.chunks {
            let mut at = Some(id);
            let mut found = None;
            while let Some(s) = at {
                let snap = &self.snaps[&s];
                if let Some(bytes) = snap.chunks.get(&chunk) {
                    found = Some((s, bytes));
                    break;
                }
                at = snap.parent;
            }
            match found {
                Some((_, bytes)) => image.copy_from_slice(bytes),
                None => {
                    for (i, b) in image.chunks_mut(BLOCK).enumerate() {
                        fill(chunk * CHUNK_BLOCKS + i as u64, 0, b);
                    }
                }
            }
            for (i, bytes) in image.chunks(BLOCK).enumerate() {
                let block = chunk * CHUNK_BLOCKS + i as u64;
                let (want, or) = expect[block as usize];
                let got = version_of(block, bytes);
                if got != Some(want) && (or.is_none() || got != or) {
                    return Err(format!(
                        "snapshot {id} (from snapshot {:?}) holds version {got:?} of block \
                         {block}, not {want}{} (cut {}, {} snapshots)",
                        found.map(|f| f.0),
                        or.map(|o| format!(" or {o}")).unwrap_or_default(),
                        self.stats.cuts,
                        self.stats.snapshots,
                    ));
                }
                self.stats.blocks_checked += 1;
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ power

    /// A clean stop is over once no host request is left, no snapshot runs (one may be
    /// held) and the change record and catalogue are quiet: the power goes off with
    /// everything on the media (oxd syncs as it stops), and on again.
    fn maybe_stopped(&mut self) -> Result<(), String> {
        let quiet = self.ops.is_empty()
            && self.steps.is_none()
            && self.running.as_ref().is_none_or(|r| r.held)
            && self.record.committing.is_none()
            && self.record.needs.is_empty()
            && !self.cataloguing
            && !self.compact_pending;
        if !quiet {
            return Ok(());
        }
        let cached = self.drive.cached();
        self.drive.persist(cached);
        self.cut(Off::Clean)
    }

    /// Turns the power off (see [`Off`]). The running snapshot is gone (one held is
    /// taken up again at the power-on); the volume comes back from what is durable
    /// (every block checked), its change tracking from the record.
    fn cut(&mut self, how: Off) -> Result<(), String> {
        match how {
            Off::Cut => {
                self.stats.cuts += 1;
                self.medium.cut();
            }
            Off::Blown => {
                self.stats.cuts += 1;
                self.stats.cuts_mid_record += 1;
            }
            Off::Clean => {
                self.stats.restarts += 1;
                self.medium.cut();
            }
        }
        self.stopping = false;
        self.medium.fail_after(None);
        self.drive.cut();
        // Writes not done: each of their blocks reached the media, or not.
        let landing: Vec<Vec<u8>> = self
            .ops
            .values()
            .filter(|o| o.in_device)
            .map(write_bytes)
            .collect();
        let firsts: Vec<u64> = self
            .ops
            .values()
            .filter(|o| o.in_device)
            .map(|o| o.first)
            .collect();
        for (bytes, first) in landing.iter().zip(firsts) {
            for (i, block) in bytes.chunks(BLOCK).enumerate() {
                if self.chance(50) {
                    self.drive.write((first as usize + i) * BLOCK, block, true);
                }
            }
        }
        self.power += 1;
        let floors = self.model.power_cut();
        self.ops.clear();
        self.plain.clear();
        self.running = None;
        self.steps = None;
        // (The service never heard how the attempt ended: its request stays pending.)
        self.failing = false;
        self.cataloguing = false;
        self.compact_pending = false;
        self.active = false;
        // A new core counts generations from 0 again.
        self.generation = 0;
        self.lanes.fill(0);
        let mut bytes = vec![0u8; BLOCK];
        for (block, &floor) in floors.iter().enumerate() {
            self.drive.read(block * BLOCK, &mut bytes);
            let v = self
                .model
                .check(block as u64, floor, &bytes)
                .map_err(|e| format!("after cut {}: {e}", self.stats.cuts))?;
            self.model.settled(block as u64, v);
            self.decided[block] = v;
            self.stats.blocks_checked += 1;
        }
        self.core = Core::new(self.config.chunks);
        if self.config.flaws.writes_over_reads {
            self.core.break_reads();
        }
        let (record, dirty, base) = open_record(&self.medium, &self.path, self.config.chunks, true)
            .map_err(|e| format!("after cut {}: {e}", self.stats.cuts))?;
        (self.record, self.dirty, self.base) = (record, dirty, base);
        self.after_cut = true;
        self.power_on();
        Ok(())
    }

    fn power_on(&mut self) {
        // As the appliance's start, before any host can write: a durable snapshot the
        // cut stopped is taken up again from its journal, with the copies saved for
        // the chunks it had not stored.
        if self.abandoned {
            // As `VolumeHandle::resume_snapshot`: an abandoned snapshot is never taken
            // up again; its journal goes, and its changes stay on the record.
            if !self.config.flaws.resume_abandoned {
                self.journal = None;
            }
            self.abandoned = false;
        }
        if !self.pending {
            // As the service's start: a journal of no pending snapshot (one held
            // because its journal could not be removed) goes; its changes are on the
            // record.
            self.journal = None;
        }
        if let Some(j) = &self.journal {
            let (next, changed) = (j.next, j.changed.clone());
            let saved = if self.config.flaws.resume_without_copies {
                Vec::new()
            } else {
                self.copies
                    .keys()
                    .copied()
                    .filter(|&c| c >= next && bit(&changed, c))
                    .collect()
            };
            self.generation += 1;
            self.apply(Event::Resume {
                generation: self.generation,
                next,
                changed,
                saved,
                waiter: RESUMED,
            });
        }
        if self.issued >= self.config.ops {
            return;
        }
        for h in 0..self.config.hosts {
            self.host_next(h);
        }
        let t = self.between(1_000, 30_000);
        self.at(t, Ev::SnapStart);
        let mean = self.config.ops_per_cut * 500;
        let t = self.between(mean / 4, mean * 2);
        self.at(t, Ev::Cut);
        if self.chance(30) {
            let t = self.between(mean / 4, mean * 2);
            self.at(t, Ev::Stop);
        }
        if self.chance(33) {
            let changes = self.rng.below(8);
            self.medium.fail_after(Some(changes));
        }
    }
}

/// How the power goes off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Off {
    /// A power cut: what was not flushed may be lost.
    Cut,
    /// A power cut the record's medium made itself, in the middle of a change.
    Blown,
    /// After a clean stop: everything is on the media.
    Clean,
}

/// As the appliance's start: the change record (`dirty::RecordFiles`, the appliance's
/// own) that was there gives the change tracking and the snapshot it is relative to;
/// one made now holds every chunk after a crash (`crashed`), none for a fresh volume.
fn open_record(
    medium: &NonDurableMedium,
    path: &Path,
    chunks: u64,
    crashed: bool,
) -> Result<(Record, Vec<u64>, Option<u64>), String> {
    let initial = vec![if crashed { u64::MAX } else { 0 }; chunks.div_ceil(64) as usize];
    let (files, opened) =
        RecordFiles::open(medium.mount(), path, chunks, &initial).map_err(|e| e.to_string())?;
    let record = Record {
        files,
        durable: opened.bits.clone(),
        needs: Vec::new(),
        committing: None,
    };
    Ok((record, opened.bits, opened.base.map(id_of)))
}

/// A snapshot's number as the record's base names it (an ID of 16 bytes).
fn base_id(id: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b
}

fn id_of(base: [u8; 16]) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&base[..8]);
    u64::from_le_bytes(n)
}

/// The bytes write `op` puts on the volume.
fn write_bytes(op: &Op) -> Vec<u8> {
    let mut bytes = vec![0u8; op.blocks as usize * BLOCK];
    for (i, b) in bytes.chunks_mut(BLOCK).enumerate() {
        fill(op.first + i as u64, op.version, b);
    }
    bytes
}
