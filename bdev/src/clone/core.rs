//! The state of a clone's chunks as a state machine with no I/O, no clock and no locks:
//! [`Core::apply`] takes an [`Event`] and returns the [`Action`]s it calls for. The core
//! lives on the clone's owner reactor (`owner.rs` runs it and carries out its actions);
//! every other core reaches it by message, and tests drive it with event streams.
//!
//! A chunk is *absent* (only in the basis), *fetching* (asked of the basis),
//! *installing* (its bytes arrived and are being written to the local copy), *claimed*
//! (a write covering it whole is filling it, so it needs no fetch) or *present* (in the
//! local copy, for good). Present chunks are one bit each; only chunks on their way
//! there have an entry, so a 1 TiB clone costs 2 MiB plus what is in flight.
//!
//! Whether a present chunk is also on the presence record (durable) is the journal's
//! state, owned by its thread (`journal.rs`), not this core's.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::{FetchError, FetchReason};

/// Where one chunk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Only in the basis: a read must fetch it.
    Absent,
    /// Asked of the basis, for this reason.
    Fetching(FetchReason),
    /// Its bytes arrived and are being written to the local copy.
    Installing(FetchReason),
    /// A write covering it whole is filling it (the plan of that id).
    Claimed(u64),
    /// In the local copy.
    Present,
}

/// Why a chunk did not become present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkError {
    pub(crate) chunk: u64,
    pub(crate) reason: FetchError,
}

/// What happens to a clone's chunks.
#[derive(Debug)]
pub(crate) enum Event<W> {
    /// `waiter` (if any) waits for `chunks` to be present: absent ones are fetched for
    /// `reason` (a read miss, a partial write's merge, read-ahead, thickening).
    Need {
        chunks: Vec<u64>,
        reason: FetchReason,
        waiter: Option<W>,
    },
    /// `waiter` reads within `chunk` alone and wants its bytes: answered from the
    /// fetched bytes in memory the moment they arrive ([`Action::Serve`]), while they
    /// are written to the local copy behind it; from the local copy if present or filled
    /// by a write ([`Action::Wake`]). `reason`: a host's read
    /// ([`FetchReason::ClientMiss`]) or the appliance's own ([`FetchReason::Internal`]).
    Read {
        chunk: u64,
        reason: FetchReason,
        waiter: W,
    },
    /// A write (plan `plan`) covers `whole` chunks whole and `partial` ones in part. If
    /// nothing must be waited for, every absent whole chunk is claimed for it at once
    /// ([`Action::Granted`]); otherwise it claims nothing, waits for what it must (the
    /// partial chunks fetched, chunks others are filling) and plans again. A write
    /// never holds a claim while it waits, so two writes never wait on each other.
    Plan {
        plan: u64,
        whole: Vec<u64>,
        partial: Vec<u64>,
        waiter: W,
    },
    /// The basis answered a fetch (the bytes are the chunk's length: checked before).
    Fetched {
        chunk: u64,
        result: Result<Vec<u8>, FetchError>,
    },
    /// Writing a fetched chunk to the local copy ended.
    Installed {
        chunk: u64,
        result: Result<(), String>,
    },
    /// The write of plan `plan` ended; `chunks` are the ones it claimed.
    WriteEnded {
        plan: u64,
        chunks: Vec<u64>,
        result: Result<(), String>,
    },
}

/// What the owner must do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action<W> {
    /// Ask the basis for `chunk`; answer with [`Event::Fetched`].
    Fetch { chunk: u64, reason: FetchReason },
    /// Write `data` to the local copy; answer with [`Event::Installed`].
    Install {
        chunk: u64,
        reason: FetchReason,
        data: Arc<Vec<u8>>,
    },
    /// Answer reader `waiter` with the chunk's bytes (fetched, not yet installed).
    Serve { waiter: W, data: Arc<Vec<u8>> },
    /// `chunk` is present now: publish it to the hit paths of every core. `fetched`:
    /// by a fetch for that reason (`None`: filled by a host write).
    Present {
        chunk: u64,
        fetched: Option<FetchReason>,
    },
    /// A fetch or its install failed.
    Failed { chunk: u64 },
    /// A host now waits on `chunk`, fetched for another reason: its miss starts now.
    HostWaits { chunk: u64 },
    /// Everything `waiter` waited for has settled (with the first error, if any).
    Wake {
        waiter: W,
        result: Result<(), ChunkError>,
    },
    /// Plan `plan`'s absent whole chunks are claimed for it: its write may go ahead,
    /// and must end with [`Event::WriteEnded`] naming `chunks`.
    Granted {
        waiter: W,
        plan: u64,
        chunks: Vec<u64>,
    },
}

/// A chunk on its way to being present, and who waits for it.
#[derive(Debug)]
struct Pending<W> {
    state: Chunk,
    /// Gates waiting for it.
    gates: Vec<u64>,
    /// Readers waiting for its bytes (only while fetching).
    readers: Vec<W>,
    /// Its bytes while installing: readers arriving meanwhile are served from them.
    data: Option<Arc<Vec<u8>>>,
}

impl<W> Pending<W> {
    fn new(state: Chunk) -> Self {
        Self {
            state,
            gates: Vec::new(),
            readers: Vec::new(),
            data: None,
        }
    }
}

/// Someone waiting for several chunks: woken when the last settles.
#[derive(Debug)]
struct Gate<W> {
    waiter: W,
    remaining: usize,
    error: Option<ChunkError>,
}

/// How many recent client misses the core remembers (thickening starts around them).
const HOT: usize = 4096;

/// A clone's chunk states.
#[derive(Debug)]
pub(crate) struct Core<W> {
    chunks: u64,
    present: Vec<u64>,
    present_count: u64,
    pending: HashMap<u64, Pending<W>>,
    gates: HashMap<u64, Gate<W>>,
    next_gate: u64,
    /// Pending chunks a host waits on (fetched for, or upgraded to, a client miss).
    client_fetches: u64,
    hot: VecDeque<u64>,
}

impl<W> Core<W> {
    /// A core for `chunks` chunks, those whose bits are set in `present` present.
    pub(crate) fn new(chunks: u64, present: Vec<u64>) -> Self {
        assert_eq!(
            present.len() as u64,
            chunks.div_ceil(64),
            "presence bitmap size"
        );
        let mut present = present;
        if !chunks.is_multiple_of(64)
            && let Some(last) = present.last_mut()
        {
            *last &= (1u64 << (chunks % 64)) - 1;
        }
        let present_count = present.iter().map(|w| u64::from(w.count_ones())).sum();
        Self {
            chunks,
            present,
            present_count,
            pending: HashMap::new(),
            gates: HashMap::new(),
            next_gate: 0,
            client_fetches: 0,
            hot: VecDeque::new(),
        }
    }

    /// Where `chunk` stands.
    pub(crate) fn state(&self, chunk: u64) -> Chunk {
        match self.pending.get(&chunk) {
            Some(p) => p.state,
            None if self.is_present(chunk) => Chunk::Present,
            None => Chunk::Absent,
        }
    }

    pub(crate) fn is_present(&self, chunk: u64) -> bool {
        self.present
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Chunks present.
    pub(crate) fn present_count(&self) -> u64 {
        self.present_count
    }

    /// Chunks a host is waiting on the basis for.
    pub(crate) fn client_fetches(&self) -> u64 {
        self.client_fetches
    }

    /// Recently missed chunks, newest first.
    pub(crate) fn hot(&self) -> Vec<u64> {
        self.hot.iter().rev().copied().collect()
    }

    /// Applies `event`; returns what must be done, in order.
    pub(crate) fn apply(&mut self, event: Event<W>) -> Vec<Action<W>> {
        let mut actions = Vec::new();
        match event {
            Event::Need {
                chunks,
                reason,
                waiter,
            } => {
                let gate = waiter.map(|w| self.open_gate(w));
                self.need(&chunks, reason, gate, &mut actions);
                if let Some(g) = gate {
                    self.close_if_done(g, &mut actions);
                }
            }
            Event::Plan {
                plan,
                whole,
                partial,
                waiter,
            } => self.plan(plan, &whole, &partial, waiter, &mut actions),
            Event::Read {
                chunk,
                reason,
                waiter,
            } => self.read(chunk, reason, waiter, &mut actions),
            Event::Fetched { chunk, result } => {
                let reason = match self.state(chunk) {
                    Chunk::Fetching(r) => r,
                    other => panic!("chunk {chunk} fetched while {other:?}"),
                };
                match result {
                    Ok(data) => {
                        let data = Arc::new(data);
                        self.set(chunk, Chunk::Installing(reason));
                        let p = self
                            .pending
                            .get_mut(&chunk)
                            .unwrap_or_else(|| panic!("chunk {chunk} is not pending"));
                        p.data = Some(Arc::clone(&data));
                        for waiter in std::mem::take(&mut p.readers) {
                            actions.push(Action::Serve {
                                waiter,
                                data: Arc::clone(&data),
                            });
                        }
                        actions.push(Action::Install {
                            chunk,
                            reason,
                            data,
                        });
                    }
                    Err(e) => self.fail(chunk, e, &mut actions),
                }
            }
            Event::Installed { chunk, result } => {
                let reason = match self.state(chunk) {
                    Chunk::Installing(r) => r,
                    other => panic!("chunk {chunk} installed while {other:?}"),
                };
                match result {
                    Ok(()) => self.make_present(chunk, Some(reason), &mut actions),
                    Err(e) => self.fail(
                        chunk,
                        FetchError::Failed(format!("writing the local copy: {e}")),
                        &mut actions,
                    ),
                }
            }
            Event::WriteEnded {
                plan,
                chunks,
                result,
            } => {
                for chunk in chunks {
                    assert_eq!(
                        self.state(chunk),
                        Chunk::Claimed(plan),
                        "chunk {chunk} released by a plan that does not hold it"
                    );
                    match &result {
                        Ok(()) => self.make_present(chunk, None, &mut actions),
                        Err(e) => self.fail(
                            chunk,
                            FetchError::Failed(format!(
                                "the write that was to fill it failed: {e}"
                            )),
                            &mut actions,
                        ),
                    }
                }
            }
        }
        actions
    }

    fn open_gate(&mut self, waiter: W) -> u64 {
        self.next_gate += 1;
        let id = self.next_gate;
        self.gates.insert(
            id,
            Gate {
                waiter,
                remaining: 0,
                error: None,
            },
        );
        id
    }

    /// Makes `gate` wait for every chunk of `chunks` not present, fetching absent ones.
    fn need(
        &mut self,
        chunks: &[u64],
        reason: FetchReason,
        gate: Option<u64>,
        out: &mut Vec<Action<W>>,
    ) {
        for &chunk in chunks {
            assert!(
                chunk < self.chunks,
                "chunk {chunk} beyond the clone's {}",
                self.chunks
            );
            match self.state(chunk) {
                Chunk::Present => continue,
                Chunk::Absent => {
                    self.start_fetch(chunk, reason, out);
                }
                Chunk::Fetching(_) | Chunk::Installing(_) => self.upgrade(chunk, reason, out),
                Chunk::Claimed(_) => {}
            }
            if let Some(g) = gate
                && let Some(p) = self.pending.get_mut(&chunk)
                && !p.gates.contains(&g)
            {
                p.gates.push(g);
                if let Some(gate) = self.gates.get_mut(&g) {
                    gate.remaining += 1;
                }
            }
        }
    }

    fn start_fetch(&mut self, chunk: u64, reason: FetchReason, out: &mut Vec<Action<W>>) {
        self.pending
            .insert(chunk, Pending::new(Chunk::Fetching(reason)));
        if reason.is_host() {
            self.host_misses(chunk);
        }
        out.push(Action::Fetch { chunk, reason });
    }

    /// A host waits on `chunk` from now: one more client fetch, and a recent miss.
    fn host_misses(&mut self, chunk: u64) {
        self.client_fetches += 1;
        if self.hot.len() >= HOT {
            self.hot.pop_front();
        }
        self.hot.push_back(chunk);
    }

    /// A host now waits on a fetch of `chunk` made for anything else (read-ahead,
    /// thickening, the appliance's own read): it counts as a client miss from now on,
    /// as if it had begun now. Nothing else changes a fetch's reason.
    fn upgrade(&mut self, chunk: u64, reason: FetchReason, out: &mut Vec<Action<W>>) {
        if !reason.is_host() {
            return;
        }
        let upgraded = match self.state(chunk) {
            Chunk::Fetching(r) if !r.is_host() => Chunk::Fetching(reason),
            Chunk::Installing(r) if !r.is_host() => Chunk::Installing(reason),
            _ => return,
        };
        self.set(chunk, upgraded);
        self.host_misses(chunk);
        out.push(Action::HostWaits { chunk });
    }

    fn read(&mut self, chunk: u64, reason: FetchReason, waiter: W, out: &mut Vec<Action<W>>) {
        assert!(
            chunk < self.chunks,
            "chunk {chunk} beyond the clone's {}",
            self.chunks
        );
        assert!(
            matches!(reason, FetchReason::ClientMiss | FetchReason::Internal),
            "a read of chunk {chunk} for {reason:?}"
        );
        match self.state(chunk) {
            Chunk::Present => out.push(Action::Wake {
                waiter,
                result: Ok(()),
            }),
            Chunk::Absent => {
                self.start_fetch(chunk, reason, out);
                self.readers_of(chunk).push(waiter);
            }
            Chunk::Fetching(_) => {
                self.upgrade(chunk, reason, out);
                self.readers_of(chunk).push(waiter);
            }
            Chunk::Installing(_) => {
                let data = self.pending.get(&chunk).and_then(|p| p.data.clone());
                let data =
                    data.unwrap_or_else(|| panic!("chunk {chunk} installing without its bytes"));
                out.push(Action::Serve { waiter, data });
            }
            Chunk::Claimed(_) => {
                // Filled by a write: read the local copy once it is done.
                let gate = self.open_gate(waiter);
                self.need(&[chunk], reason, Some(gate), out);
            }
        }
    }

    fn readers_of(&mut self, chunk: u64) -> &mut Vec<W> {
        &mut self
            .pending
            .get_mut(&chunk)
            .unwrap_or_else(|| panic!("chunk {chunk} is not pending"))
            .readers
    }

    fn plan(
        &mut self,
        plan: u64,
        whole: &[u64],
        partial: &[u64],
        waiter: W,
        out: &mut Vec<Action<W>>,
    ) {
        let busy: Vec<u64> = whole
            .iter()
            .filter(|&&c| !matches!(self.state(c), Chunk::Absent | Chunk::Present))
            .chain(partial.iter().filter(|&&c| self.state(c) != Chunk::Present))
            .copied()
            .collect();
        if busy.is_empty() {
            let mut claimed = Vec::new();
            for &chunk in whole {
                assert!(
                    chunk < self.chunks,
                    "chunk {chunk} beyond the clone's {}",
                    self.chunks
                );
                if self.state(chunk) == Chunk::Absent {
                    self.pending
                        .insert(chunk, Pending::new(Chunk::Claimed(plan)));
                    claimed.push(chunk);
                }
            }
            out.push(Action::Granted {
                waiter,
                plan,
                chunks: claimed,
            });
            return;
        }
        let gate = self.open_gate(waiter);
        self.need(&busy, FetchReason::ClientMiss, Some(gate), out);
        self.close_if_done(gate, out);
    }

    fn set(&mut self, chunk: u64, state: Chunk) {
        let p = self
            .pending
            .get_mut(&chunk)
            .unwrap_or_else(|| panic!("chunk {chunk} is not pending"));
        p.state = state;
    }

    /// Ends a chunk's pending entry (it is present or absent again) and settles its gates.
    fn settle(&mut self, chunk: u64, result: Result<(), ChunkError>, out: &mut Vec<Action<W>>) {
        let Some(p) = self.pending.remove(&chunk) else {
            panic!("chunk {chunk} settled while not pending");
        };
        if let Chunk::Fetching(r) | Chunk::Installing(r) = p.state
            && r.is_host()
        {
            assert!(self.client_fetches > 0, "client fetch count underflow");
            self.client_fetches -= 1;
        }
        assert!(
            p.readers.is_empty() || result.is_err(),
            "chunk {chunk} settled with readers never served"
        );
        for waiter in p.readers {
            let result = result.clone();
            out.push(Action::Wake { waiter, result });
        }
        for g in p.gates {
            let gate = self
                .gates
                .get_mut(&g)
                .unwrap_or_else(|| panic!("gate {g} of chunk {chunk} is gone"));
            assert!(
                gate.remaining > 0,
                "gate {g} settled more often than it waited"
            );
            gate.remaining -= 1;
            if let Err(e) = &result {
                gate.error.get_or_insert_with(|| e.clone());
            }
            self.close_if_done(g, out);
        }
    }

    fn close_if_done(&mut self, g: u64, out: &mut Vec<Action<W>>) {
        if self.gates.get(&g).is_some_and(|gate| gate.remaining == 0)
            && let Some(gate) = self.gates.remove(&g)
        {
            out.push(Action::Wake {
                waiter: gate.waiter,
                result: gate.error.map_or(Ok(()), Err),
            });
        }
    }

    fn make_present(&mut self, chunk: u64, fetched: Option<FetchReason>, out: &mut Vec<Action<W>>) {
        assert!(!self.is_present(chunk), "chunk {chunk} made present twice");
        self.present[(chunk / 64) as usize] |= 1 << (chunk % 64);
        self.present_count += 1;
        assert!(
            self.present_count <= self.chunks,
            "more chunks present than exist"
        );
        out.push(Action::Present { chunk, fetched });
        self.settle(chunk, Ok(()), out);
    }

    fn fail(&mut self, chunk: u64, reason: FetchError, out: &mut Vec<Action<W>>) {
        out.push(Action::Failed { chunk });
        self.settle(chunk, Err(ChunkError { chunk, reason }), out);
    }

    /// Checks every invariant (tests call it after each event; it walks all state).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let counted: u64 = self.present.iter().map(|w| u64::from(w.count_ones())).sum();
        assert_eq!(counted, self.present_count, "present count");
        let mut waits: HashMap<u64, usize> = HashMap::new();
        let mut clients = 0;
        for (&chunk, p) in &self.pending {
            assert!(
                !self.is_present(chunk),
                "chunk {chunk} both present and {:?}",
                p.state
            );
            assert!(
                !matches!(p.state, Chunk::Absent | Chunk::Present),
                "pending as {:?}",
                p.state
            );
            if let Chunk::Fetching(r) | Chunk::Installing(r) = p.state
                && r.is_host()
            {
                clients += 1;
            }
            for g in &p.gates {
                *waits.entry(*g).or_default() += 1;
            }
            assert!(
                p.readers.is_empty() || matches!(p.state, Chunk::Fetching(_)),
                "readers waiting on chunk {chunk} while {:?}",
                p.state
            );
            assert_eq!(
                p.data.is_some(),
                matches!(p.state, Chunk::Installing(_)),
                "chunk {chunk}: bytes held while {:?}",
                p.state
            );
        }
        assert_eq!(clients, self.client_fetches, "client fetch count");
        for (g, gate) in &self.gates {
            assert_eq!(
                waits.get(g).copied().unwrap_or(0),
                gate.remaining,
                "gate {g} count"
            );
            assert!(gate.remaining > 0, "gate {g} open with nothing to wait for");
        }
    }
}

#[cfg(test)]
mod tests {
    //! The core driven by seeded random event streams: every answer the owner could get
    //! (fetches, installs and writes ending well or badly, in any order), checked after
    //! each event; then drained until every waiter has been woken exactly once.

    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    use crate::test_rng::Rng;

    /// What a test waiter waits for.
    #[derive(Debug, Clone)]
    enum Asked {
        Need(Vec<u64>),
        Read(u64),
        Plan { whole: Vec<u64>, partial: Vec<u64> },
    }

    struct World {
        core: Core<u64>,
        rng: Rng,
        fetching: BTreeSet<u64>,
        installing: BTreeSet<u64>,
        granted: BTreeMap<u64, Vec<u64>>,
        waiting: BTreeMap<u64, Asked>,
        replan: Vec<(u64, Asked)>,
        next_waiter: u64,
        woken: u64,
        replans: u64,
    }

    const CHUNKS: u64 = 40;

    impl World {
        fn new(seed: u64) -> Self {
            let mut rng = Rng(seed | 1);
            let present = vec![rng.next() & rng.next()];
            Self {
                core: Core::new(CHUNKS, present),
                rng,
                fetching: BTreeSet::new(),
                installing: BTreeSet::new(),
                granted: BTreeMap::new(),
                waiting: BTreeMap::new(),
                replan: Vec::new(),
                next_waiter: 0,
                woken: 0,
                replans: 0,
            }
        }

        fn chunks(&mut self) -> Vec<u64> {
            let first = self.rng.below(CHUNKS);
            let n = 1 + self.rng.below(3);
            (first..(first + n).min(CHUNKS)).collect()
        }

        fn apply(&mut self, event: Event<u64>) {
            for action in self.core.apply(event) {
                match action {
                    Action::Fetch { chunk, .. } => {
                        assert!(
                            self.fetching.insert(chunk),
                            "chunk {chunk} fetched twice at once"
                        );
                    }
                    Action::Install { chunk, .. } => {
                        assert!(self.fetching.remove(&chunk));
                        self.installing.insert(chunk);
                    }
                    Action::Present { chunk, .. } => assert!(self.core.is_present(chunk)),
                    Action::Failed { chunk } => {
                        self.fetching.remove(&chunk);
                    }
                    Action::HostWaits { chunk } => assert!(
                        self.fetching.contains(&chunk) || self.installing.contains(&chunk),
                        "a host waits on chunk {chunk}, which is on no way here"
                    ),
                    Action::Wake { waiter, result } => {
                        let asked = self.waiting.remove(&waiter).expect("woken once");
                        self.woken += 1;
                        match (asked, result) {
                            (Asked::Need(chunks), Ok(())) => {
                                for c in chunks {
                                    assert!(self.core.is_present(c), "woken before {c} present");
                                }
                            }
                            (Asked::Read(c), Ok(())) => {
                                assert!(self.core.is_present(c), "reader woken before {c} present")
                            }
                            (Asked::Need(_) | Asked::Read(_), Err(_)) => {}
                            // A plan woken plans again, whatever happened meanwhile.
                            (plan @ Asked::Plan { .. }, _) => {
                                self.replans += 1;
                                self.replan.push((waiter, plan));
                            }
                        }
                    }
                    Action::Serve { waiter, data } => {
                        let asked = self.waiting.remove(&waiter).expect("served once");
                        self.woken += 1;
                        let Asked::Read(c) = asked else {
                            panic!("served bytes to {asked:?}")
                        };
                        assert!(matches!(self.core.state(c), Chunk::Installing(_)));
                        assert_eq!(*data, vec![c as u8], "served another chunk's bytes");
                    }
                    Action::Granted {
                        waiter,
                        plan,
                        chunks,
                    } => {
                        let asked = self.waiting.remove(&waiter).expect("granted once");
                        self.woken += 1;
                        let Asked::Plan { whole, partial } = asked else {
                            panic!("a need was granted")
                        };
                        for &c in &partial {
                            assert!(
                                self.core.is_present(c),
                                "granted before partial {c} present"
                            );
                        }
                        for &c in &whole {
                            let s = self.core.state(c);
                            assert!(
                                s == Chunk::Present
                                    || (s == Chunk::Claimed(plan) && chunks.contains(&c)),
                                "granted chunk {c} is {s:?}"
                            );
                        }
                        self.granted.insert(plan, chunks);
                    }
                }
            }
            self.core.check();
        }

        fn ask(&mut self, asked: Asked, waiter: u64) {
            self.waiting.insert(waiter, asked.clone());
            let event = match asked {
                Asked::Need(chunks) => Event::Need {
                    chunks,
                    reason: FetchReason::ALL[self.rng.below(4) as usize],
                    waiter: Some(waiter),
                },
                Asked::Read(chunk) => Event::Read {
                    chunk,
                    reason: [FetchReason::ClientMiss, FetchReason::Internal]
                        [self.rng.below(2) as usize],
                    waiter,
                },
                Asked::Plan { whole, partial } => Event::Plan {
                    plan: waiter,
                    whole,
                    partial,
                    waiter,
                },
            };
            self.apply(event);
        }

        fn new_waiter(&mut self) -> u64 {
            self.next_waiter += 1;
            self.next_waiter
        }

        /// One random step; `drain` only answers (no new requests, no failures).
        fn step(&mut self, drain: bool) -> bool {
            let ok = drain || self.rng.below(8) != 0;
            match self.rng.below(if drain { 4 } else { 8 }) {
                0 if !self.replan.is_empty() => {
                    let (w, asked) = self.replan.swap_remove(0);
                    self.ask(asked, w);
                }
                1 => {
                    if let Some(chunk) = self.rng.pick(&self.fetching) {
                        let result = if ok {
                            Ok(vec![chunk as u8])
                        } else {
                            Err(FetchError::Unavailable("test".into()))
                        };
                        self.apply(Event::Fetched { chunk, result });
                    }
                }
                2 => {
                    if let Some(chunk) = self.rng.pick(&self.installing) {
                        self.installing.remove(&chunk);
                        let result = if ok { Ok(()) } else { Err("test".into()) };
                        self.apply(Event::Installed { chunk, result });
                    }
                }
                3 => {
                    let plans: BTreeSet<u64> = self.granted.keys().copied().collect();
                    if let Some(plan) = self.rng.pick(&plans) {
                        let chunks = self.granted.remove(&plan).unwrap_or_default();
                        let result = if ok { Ok(()) } else { Err("test".into()) };
                        self.apply(Event::WriteEnded {
                            plan,
                            chunks,
                            result,
                        });
                    }
                }
                4 | 5 => {
                    let w = self.new_waiter();
                    let chunks = self.chunks();
                    self.ask(Asked::Need(chunks), w);
                }
                6 => {
                    let w = self.new_waiter();
                    let chunks = self.chunks();
                    let split = self.rng.below(chunks.len() as u64 + 1) as usize;
                    let (whole, partial) = chunks.split_at(split);
                    let asked = Asked::Plan {
                        whole: whole.to_vec(),
                        partial: partial.to_vec(),
                    };
                    self.ask(asked, w);
                }
                7 => {
                    let w = self.new_waiter();
                    let chunk = self.rng.below(CHUNKS);
                    self.ask(Asked::Read(chunk), w);
                }
                _ => {}
            }
            !(self.fetching.is_empty()
                && self.installing.is_empty()
                && self.granted.is_empty()
                && self.replan.is_empty())
        }
    }

    #[test]
    fn random_event_streams_keep_every_invariant_and_wake_everyone_once() {
        for seed in 1..=300u64 {
            let mut w = World::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for _ in 0..400 {
                w.step(false);
            }
            let mut steps = 0;
            while w.step(true) {
                steps += 1;
                assert!(steps < 100_000, "seed {seed}: does not drain");
            }
            assert!(
                w.waiting.is_empty(),
                "seed {seed}: never woken: {:?}",
                w.waiting
            );
            // Once per waiter, plus once per plan woken to plan again.
            assert_eq!(w.woken, w.next_waiter + w.replans, "seed {seed}");
            assert!(
                w.core.pending.is_empty() && w.core.gates.is_empty(),
                "seed {seed}"
            );
            assert_eq!(w.core.client_fetches(), 0);
        }
    }

    #[test]
    fn a_write_never_claims_what_another_fills_and_present_is_for_good() {
        let mut core: Core<u64> = Core::new(4, vec![0]);
        let a = core.apply(Event::Plan {
            plan: 1,
            whole: vec![0, 1],
            partial: vec![],
            waiter: 1,
        });
        assert_eq!(
            a,
            vec![Action::Granted {
                waiter: 1,
                plan: 1,
                chunks: vec![0, 1]
            }]
        );
        // A second write over chunk 1 waits for the first, claiming nothing.
        let b = core.apply(Event::Plan {
            plan: 2,
            whole: vec![1, 2],
            partial: vec![],
            waiter: 2,
        });
        assert!(b.is_empty());
        assert_eq!(core.state(2), Chunk::Absent);
        // A read of chunk 0 waits for the write too, without a fetch.
        assert!(
            core.apply(Event::Need {
                chunks: vec![0],
                reason: FetchReason::ClientMiss,
                waiter: Some(3),
            })
            .is_empty()
        );
        let ended = core.apply(Event::WriteEnded {
            plan: 1,
            chunks: vec![0, 1],
            result: Ok(()),
        });
        assert!(ended.contains(&Action::Wake {
            waiter: 2,
            result: Ok(())
        }));
        assert!(ended.contains(&Action::Wake {
            waiter: 3,
            result: Ok(())
        }));
        assert_eq!(core.present_count(), 2);
        core.check();
    }

    #[test]
    fn the_appliances_own_read_waits_like_a_hosts_but_counts_as_none_until_a_host_joins() {
        let mut core: Core<u64> = Core::new(4, vec![0]);
        let a = core.apply(Event::Read {
            chunk: 2,
            reason: FetchReason::Internal,
            waiter: 1,
        });
        assert_eq!(
            a,
            vec![Action::Fetch {
                chunk: 2,
                reason: FetchReason::Internal
            }]
        );
        assert_eq!(core.client_fetches(), 0, "no host waits");
        assert!(core.hot().is_empty(), "thickening does not start around it");
        // A host reading the same chunk now waits on that fetch, which becomes its miss
        // from now on.
        assert_eq!(
            core.apply(Event::Read {
                chunk: 2,
                reason: FetchReason::ClientMiss,
                waiter: 2,
            }),
            vec![Action::HostWaits { chunk: 2 }]
        );
        assert_eq!(core.state(2), Chunk::Fetching(FetchReason::ClientMiss));
        assert_eq!(core.client_fetches(), 1);
        assert_eq!(core.hot(), vec![2]);
        core.check();
        // An internal read does not take a host's fetch back to the background.
        core.apply(Event::Need {
            chunks: vec![2],
            reason: FetchReason::Internal,
            waiter: Some(3),
        });
        assert_eq!(core.state(2), Chunk::Fetching(FetchReason::ClientMiss));
        let answered = core.apply(Event::Fetched {
            chunk: 2,
            result: Ok(vec![2]),
        });
        let served: Vec<u64> = answered
            .iter()
            .filter_map(|a| match a {
                Action::Serve { waiter, .. } => Some(*waiter),
                _ => None,
            })
            .collect();
        assert_eq!(served, vec![1, 2], "both readers get the bytes");
        let installed = core.apply(Event::Installed {
            chunk: 2,
            result: Ok(()),
        });
        assert!(installed.contains(&Action::Present {
            chunk: 2,
            fetched: Some(FetchReason::ClientMiss)
        }));
        assert!(installed.contains(&Action::Wake {
            waiter: 3,
            result: Ok(())
        }));
        assert_eq!(core.client_fetches(), 0);
        core.check();
    }

    #[test]
    fn every_reason_has_its_own_place_in_the_counters() {
        for (i, why) in FetchReason::ALL.into_iter().enumerate() {
            assert_eq!(why.index(), i, "{why:?}");
        }
    }

    #[test]
    #[should_panic(expected = "a read of chunk 1 for Prefetch")]
    fn a_read_for_a_background_reason_stops_at_once() {
        let mut core: Core<u64> = Core::new(4, vec![0]);
        core.apply(Event::Read {
            chunk: 1,
            reason: FetchReason::Prefetch,
            waiter: 1,
        });
    }

    #[test]
    #[should_panic(expected = "released by a plan that does not hold it")]
    fn ending_a_claim_not_held_stops_at_once() {
        let mut core: Core<u64> = Core::new(4, vec![0]);
        core.apply(Event::WriteEnded {
            plan: 9,
            chunks: vec![1],
            result: Ok(()),
        });
    }

    #[test]
    #[should_panic(expected = "fetched while")]
    fn an_answer_to_no_fetch_stops_at_once() {
        let mut core: Core<u64> = Core::new(4, vec![0b10]);
        core.apply(Event::Fetched {
            chunk: 1,
            result: Ok(vec![0]),
        });
    }
}
