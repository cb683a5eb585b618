//! The clone's owner: the one reactor that holds its [`Core`] and carries out what the
//! core decides. Channels on other reactors send it events as messages; on the owner
//! itself they are applied in place. Fetch answers always arrive as messages (a basis
//! answers on any thread, sometimes before `fetch` returns).
//!
//! Messages that change the state: `Need` (a read miss, read-ahead, thickening),
//! `Plan` and `WriteEnded` (a write over absent chunks), `Fetched` (the basis), and
//! `Installed` (the owner's own local write). What the owner publishes for every core
//! — the `presence` bits, the present count, the client fetches in flight — it alone
//! writes, with plain stores, so readers on the I/O path need only loads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use reactor::{Reactor, ReactorHandle};

use super::core::{Action, ChunkError, Core, Event};
use super::journal::Note;
use super::{FetchDone, FetchError, FetchReason, Shared, bump, publish};
use crate::buf::IoBuf;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion};
use crate::park::{Answer, deliver, unpark_with, wake};

/// Who waits: a continuation parked on a reactor, by token.
pub(super) type Waiter = (ReactorHandle, u64);

/// The owner's state of one clone.
pub(super) struct Owned {
    shared: Arc<Shared>,
    core: RefCell<Core<Waiter>>,
    /// When each client-miss fetch began (for the miss latency).
    started: RefCell<HashMap<u64, Instant>>,
}

impl Owned {
    fn new(shared: &Arc<Shared>) -> Self {
        // Only the owner writes the published bits, so they are the state as it was
        // when the last owner state was dropped (or as the record opened it).
        let present = shared
            .presence
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        Self {
            shared: Arc::clone(shared),
            core: RefCell::new(Core::new(shared.chunks, present)),
            started: RefCell::new(HashMap::new()),
        }
    }
}

/// The owner's state of `shared` on reactor `r`, made on first use.
fn owned(shared: &Arc<Shared>, r: &Reactor) -> Rc<Owned> {
    match r.channel(shared.id, || {
        Ok::<_, std::convert::Infallible>(Owned::new(shared))
    }) {
        Ok(o) => o,
        Err(never) => match never {},
    }
}

/// The owner's state of `shared` on reactor `r`, if it has one.
fn existing(shared: &Shared, r: &Reactor) -> Option<Rc<Owned>> {
    r.channel::<Owned, ()>(shared.id, || Err(())).ok()
}

/// An event on its way to the owner. If the message carrying it is dropped unrun (the
/// owner has stopped, or never takes it), its waiter is failed rather than left parked.
struct InTransit {
    shared: Arc<Shared>,
    event: Option<Event<Waiter>>,
}

impl Drop for InTransit {
    fn drop(&mut self) {
        if let Some(e) = self.event.take() {
            refuse(&self.shared, e);
        }
    }
}

/// Sends `event` to the clone's owner (applied in place when this is the owner).
pub(super) fn send(shared: &Arc<Shared>, owner: &ReactorHandle, event: Event<Waiter>) {
    if let Some(r) = reactor::current()
        && r.handle().same(owner)
    {
        return apply(shared, &r, event);
    }
    let mut carried = InTransit {
        shared: Arc::clone(shared),
        event: Some(event),
    };
    deliver(
        owner.clone(),
        Box::new(move || {
            if let Some(r) = reactor::current()
                && let Some(e) = carried.event.take()
            {
                apply(&carried.shared, &r, e);
            }
        }),
    );
}

/// Fails the waiter of an event the owner never got.
fn refuse(shared: &Shared, event: Event<Waiter>) {
    let waiter = match event {
        Event::Need { waiter, .. } => waiter,
        Event::Read { waiter, .. } | Event::Plan { waiter, .. } => Some(waiter),
        Event::Fetched { .. } | Event::Installed { .. } | Event::WriteEnded { .. } => None,
    };
    if let Some((to, token)) = waiter {
        let e = BdevError::Basis {
            name: shared.name.clone(),
            chunk: 0,
            reason: FetchError::Failed("the clone's owner reactor has stopped".into()),
        };
        wake(&to, token, Err(e));
    }
}

/// Applies `event` on the owner `r` and carries out the actions.
pub(super) fn apply(shared: &Arc<Shared>, r: &Rc<Reactor>, event: Event<Waiter>) {
    let o = match &event {
        Event::Need { .. } | Event::Read { .. } | Event::Plan { .. } => {
            match existing(shared, r) {
                Some(o) => o,
                // A request that overtook the release: the clone is gone.
                None if shared.released.load(Ordering::SeqCst) => return refuse(shared, event),
                None => owned(shared, r),
            }
        }
        // An answer for a state already released (the clone is gone): nobody waits.
        _ => match existing(shared, r) {
            Some(o) => o,
            None => return,
        },
    };
    // The borrow ends before any action runs: an action may apply further events.
    let actions = o.core.borrow_mut().apply(event);
    let (count, clients) = {
        let core = o.core.borrow();
        (core.present_count(), core.client_fetches())
    };
    shared.present_count.store(count, Ordering::Release);
    let before = shared.misses_in_flight.load(Ordering::Relaxed);
    shared.misses_in_flight.store(clients, Ordering::Release);
    if clients == 0 && before > 0 {
        shared.misses_done.notify(usize::MAX);
    }
    // The fetches of one event go to the basis together, a batch per reason, so a
    // read-ahead's adjacent chunks can travel in a few requests.
    let mut fetches: Vec<(FetchReason, Vec<(u64, FetchDone)>)> = Vec::new();
    for a in actions {
        match a {
            Action::Fetch { chunk, reason } => {
                if reason.is_host() {
                    o.started.borrow_mut().insert(chunk, Instant::now());
                }
                let done = fetched(shared, r.handle().clone(), chunk);
                match fetches.iter_mut().find(|(why, _)| *why == reason) {
                    Some((_, batch)) => batch.push((chunk, done)),
                    None => fetches.push((reason, vec![(chunk, done)])),
                }
            }
            a => act(&o, r, a),
        }
    }
    for (reason, batch) in fetches {
        shared.basis.fetch_batch(batch, reason);
    }
}

/// What the basis calls when `chunk` arrives (on any thread): checks its length and
/// hands it to the owner `home` as an event.
fn fetched(shared: &Arc<Shared>, home: ReactorHandle, chunk: u64) -> FetchDone {
    let shared = Arc::clone(shared);
    Box::new(move |result| {
        let len = shared.chunk_len(chunk);
        let result = result.and_then(|d| {
            if d.len() as u64 == len {
                Ok(d)
            } else {
                Err(FetchError::Integrity(format!(
                    "basis returned {} bytes, expected {len}",
                    d.len()
                )))
            }
        });
        // Always by message, even on the owner: the core is busy applying.
        deliver(
            home,
            Box::new(move || {
                if let Some(r) = reactor::current() {
                    apply(&shared, &r, Event::Fetched { chunk, result });
                }
            }),
        );
    })
}

fn act(o: &Rc<Owned>, r: &Rc<Reactor>, action: Action<Waiter>) {
    let s = &o.shared;
    match action {
        Action::Fetch { .. } => unreachable!("fetches are batched by apply"),
        Action::Install { chunk, data, .. } => {
            let len = s.chunk_len(chunk);
            let io = BdevIo::write(
                chunk * s.chunk_bytes / s.block_size,
                len / s.block_size,
                vec![IoBuf::from_slice(data.as_slice())],
            );
            let shared = Arc::clone(s);
            let installed = move |result: Result<(), BdevError>| {
                if let Some(r) = reactor::current() {
                    let result = result.map_err(|e| e.to_string());
                    apply(&shared, &r, Event::Installed { chunk, result });
                }
            };
            match s.local.channel() {
                Ok(local) => local.submit(io, move |c: IoCompletion| installed(c.result)),
                Err(e) => r.defer(move || installed(Err(e))),
            }
        }
        Action::Present { chunk, fetched } => {
            publish(&s.presence[(chunk / 64) as usize], 1 << (chunk % 64));
            match fetched {
                Some(reason) => {
                    let i = reason.index();
                    bump(&s.counters.fetched_bytes[i], s.chunk_len(chunk));
                    bump(&s.counters.fetches[i], 1);
                    if let Some(t) = o.started.borrow_mut().remove(&chunk) {
                        s.counters.miss_latency.record(t.elapsed());
                        s.last_miss_end_us
                            .store(s.epoch.elapsed().as_micros() as u64, Ordering::Release);
                    }
                    if let Some(j) = &s.journal {
                        // Recorded lazily: a fetched chunk lost in a crash is fetched again.
                        let _ = j.tx.try_send(Note::Installed(chunk));
                    }
                }
                None => bump(&s.counters.written_whole, 1),
            }
        }
        Action::HostWaits { chunk } => {
            // Timed from now, as a miss of its own would have been.
            o.started.borrow_mut().insert(chunk, Instant::now());
        }
        Action::Failed { chunk } => {
            bump(&s.counters.fetch_errors, 1);
            if o.started.borrow_mut().remove(&chunk).is_some() {
                s.last_miss_end_us
                    .store(s.epoch.elapsed().as_micros() as u64, Ordering::Release);
            }
        }
        Action::Wake {
            waiter: (to, token),
            result,
        } => {
            let result = result.map(|()| Answer::Done).map_err(|e| basis_error(s, e));
            wake(&to, token, result);
        }
        Action::Serve {
            waiter: (to, token),
            data,
        } => wake(&to, token, Ok(Answer::Data(data))),
        Action::Granted {
            waiter: (to, token),
            plan,
            chunks,
        } => {
            let mut grant = Grant {
                shared: Arc::clone(s),
                owner: r.handle().clone(),
                plan,
                chunks: Some(chunks),
            };
            let hand_over = move || {
                if let Some(chunks) = grant.chunks.take()
                    && !unpark_with(token, Ok(Answer::Granted(chunks.clone())))
                {
                    // Nobody to write them: the claims go back (on drop, below).
                    grant.chunks = Some(chunks);
                }
            };
            match reactor::current() {
                Some(here) if here.handle().same(&to) => here.defer(hand_over),
                _ => {
                    deliver(to, Box::new(hand_over));
                }
            }
        }
    }
}

fn basis_error(s: &Shared, e: ChunkError) -> BdevError {
    BdevError::Basis {
        name: s.name.clone(),
        chunk: e.chunk,
        reason: e.reason,
    }
}

/// Claims granted to a write, on their way to it. If the write is gone (its
/// continuation failed at shutdown, the message dropped), the claims are ended as
/// failed, so the chunks do not stay claimed for good.
struct Grant {
    shared: Arc<Shared>,
    owner: ReactorHandle,
    plan: u64,
    chunks: Option<Vec<u64>>,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(chunks) = self.chunks.take() {
            let event = Event::WriteEnded {
                plan: self.plan,
                chunks,
                result: Err("the write that claimed it is gone".into()),
            };
            send(&self.shared, &self.owner, event);
        }
    }
}

/// Runs `f` on the owner's core and returns its answer: in place on the owner, by a
/// blocking call from a thread that is not a reactor; `None` from another reactor
/// (which must not block) or if the owner has stopped.
pub(super) fn query<R: Send + 'static>(
    shared: &Arc<Shared>,
    owner: &ReactorHandle,
    f: impl FnOnce(&Core<Waiter>) -> R + Send + 'static,
) -> Option<R> {
    match reactor::current() {
        Some(r) if r.handle().same(owner) => existing(shared, &r).map(|o| f(&o.core.borrow())),
        Some(_) => None,
        None => {
            let s = Arc::clone(shared);
            owner
                .call(std::time::Duration::from_secs(30), move || {
                    reactor::current()
                        .and_then(|r| existing(&s, &r))
                        .map(|o| f(&o.core.borrow()))
                })
                .ok()
                .flatten()
        }
    }
}

/// Drops the owner's state of a clone that is gone (its device dropped).
pub(super) fn release(id: u64, owner: &ReactorHandle) {
    crate::park::release_on::<Owned>(id, owner);
}
