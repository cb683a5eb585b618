//! The volume's owner: the one reactor that holds its snapshot [`Core`] and carries out
//! what the core decides. Writes on other reactors and the snapshot (on an OX core)
//! send it events as messages; on the owner itself they are applied in place.
//!
//! Messages that change the state: `Drain`, `Begin`, `Resume` and `End` (the snapshot's
//! control), `Guard` (a write over chunks not published free), `Claim`, `ChunkRead`,
//! `Commit` and `Skip` (the snapshot's reader), and `Copied` (the owner's own
//! copy-before-write). What it publishes for every reactor — one bit per chunk, set
//! when writes may go over it without asking — it alone writes, with plain stores, so
//! writes need only loads.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use reactor::{Reactor, ReactorHandle};

use super::core::{Action, Copied, Core, Event, Kept, Source};
use super::{Shared, stopping};
use crate::buf::IoBuf;
use crate::error::BdevError;
use crate::io::{BdevIo, IoCompletion};
use crate::park::{Answer, deliver, wake};
use crate::reply::{Reply, Wake};

/// A write parked on its reactor, by token. Dropped unanswered (its message lost,
/// the owner's state released, the owner stopped), it wakes the write with an error
/// rather than leave it parked.
#[derive(Debug)]
pub(super) struct Writer {
    to: ReactorHandle,
    token: u64,
    answered: bool,
}

impl Writer {
    /// The write parked as `token` on `to`.
    pub(super) fn new(to: ReactorHandle, token: u64) -> Self {
        Self {
            to,
            token,
            answered: false,
        }
    }

    fn answer(mut self, result: Result<Answer, BdevError>) {
        self.answered = true;
        wake(&self.to, self.token, result);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.answered {
            wake(&self.to, self.token, Err(BdevError::ShuttingDown));
        }
    }
}

/// How the owner answers the snapshot's requests.
#[derive(Debug)]
pub(super) enum Answered {
    /// Drained, begun or resumed.
    Ready,
    /// What to read for a claimed chunk.
    Source(Source),
    /// The claim is for a snapshot that is not running, or was abandoned.
    Refused,
}

/// Someone not parked on a reactor waiting for the owner.
pub(super) type Asker = Reply<Answered>;

/// The owner's state of one volume.
pub(super) struct Owned {
    shared: Arc<Shared>,
    core: RefCell<Core<Writer, Asker>>,
}

/// The owner's state of `shared` on reactor `r`, made on first use — never once the
/// volume is gone (a late message must not raise a fresh state).
fn owned(shared: &Arc<Shared>, r: &Reactor) -> Option<Rc<Owned>> {
    r.channel(shared.id, || {
        if shared.released.load(Ordering::SeqCst) {
            return Err(());
        }
        Ok(Owned {
            shared: Arc::clone(shared),
            core: RefCell::new(Core::new(shared.chunks)),
        })
    })
    .ok()
}

/// Sends `event` to the volume's owner (applied in place when this is the owner). If
/// it never arrives, its waiters learn so as it is dropped (see [`Writer`], and a
/// dropped reply).
pub(super) fn send(shared: &Arc<Shared>, owner: &ReactorHandle, event: Event<Writer, Asker>) {
    if let Some(r) = reactor::current()
        && r.handle().same(owner)
    {
        return apply(shared, &r, event, &mut Vec::new());
    }
    let shared = Arc::clone(shared);
    deliver(
        owner.clone(),
        Box::new(move || {
            if let Some(r) = reactor::current() {
                apply(&shared, &r, event, &mut Vec::new());
            }
        }),
    );
}

/// [`send`] for several events in one message (one wake-up of the owner's reactor),
/// applied in order. The answers they have at once are all landed before any waiter
/// is woken ([`Reply::send_quietly`]): a batch of claims is seen answered together.
pub(super) fn send_all(
    shared: &Arc<Shared>,
    owner: &ReactorHandle,
    events: Vec<Event<Writer, Asker>>,
) {
    if let Some(r) = reactor::current()
        && r.handle().same(owner)
    {
        let mut wakes = Vec::new();
        for event in events {
            apply(shared, &r, event, &mut wakes);
        }
        return;
    }
    let shared = Arc::clone(shared);
    deliver(
        owner.clone(),
        Box::new(move || {
            if let Some(r) = reactor::current() {
                let mut wakes = Vec::new();
                for event in events {
                    apply(&shared, &r, event, &mut wakes);
                }
            }
        }),
    );
}

/// Applies `event` on the owner `r`, publishes what changed and carries out the
/// actions; the waiters it answers are woken as `wakes` is dropped.
fn apply(
    shared: &Arc<Shared>,
    r: &Rc<Reactor>,
    event: Event<Writer, Asker>,
    wakes: &mut Vec<Wake<Answered>>,
) {
    // The volume is gone: the event is dropped, and with it its waiters are told.
    let Some(o) = owned(shared, r) else {
        return;
    };
    // The borrow ends before any action runs: an action may apply further events.
    let actions = {
        let mut core = o.core.borrow_mut();
        let actions = core.apply(event);
        publish(shared, &mut core);
        actions
    };
    for a in actions {
        act(&o, r, a, wakes);
    }
}

/// Publishes the free bit of every chunk whose state changed (only the owner writes
/// these words: a load and a store, no locked update).
fn publish(s: &Shared, core: &mut Core<Writer, Asker>) {
    match core.take_touched() {
        None => {
            for (w, word) in s.free.iter().enumerate() {
                let first = w as u64 * 64;
                let bits = (first..(first + 64).min(core.len()))
                    .filter(|&c| core.free(c))
                    .fold(0u64, |b, c| b | 1 << (c % 64));
                if word.load(Ordering::Relaxed) != bits {
                    word.store(bits, Ordering::Release);
                }
            }
        }
        Some(chunks) => {
            for c in chunks {
                let word = &s.free[(c / 64) as usize];
                let bit = 1u64 << (c % 64);
                let old = word.load(Ordering::Relaxed);
                let new = if core.free(c) { old | bit } else { old & !bit };
                if new != old {
                    word.store(new, Ordering::Release);
                }
            }
        }
    }
}

fn act(
    o: &Rc<Owned>,
    r: &Rc<Reactor>,
    action: Action<Writer, Asker>,
    wakes: &mut Vec<Wake<Answered>>,
) {
    let s = &o.shared;
    match action {
        Action::Copy { generation, chunk } => copy(s, r, generation, chunk),
        Action::Proceed(writer) => writer.answer(Ok(Answer::Done)),
        Action::Fail(writer, chunk, reason) => {
            let e = BdevError::Snapshot {
                name: s.inner.name().to_string(),
                reason: format!("chunk {chunk}: its copy for the snapshot failed: {reason}"),
            };
            writer.answer(Err(e));
        }
        Action::Serve(asker, source) => wakes.push(asker.send_quietly(Answered::Source(source))),
        Action::Refuse(asker) => wakes.push(asker.send_quietly(Answered::Refused)),
        Action::Ready(asker) => wakes.push(asker.send_quietly(Answered::Ready)),
    }
}

/// Copies `chunk`'s contents for snapshot `generation` — into memory, or durably into
/// the volume's store of copies — and reports how it went.
fn copy(s: &Arc<Shared>, r: &Rc<Reactor>, generation: u64, chunk: u64) {
    let len = s.chunk_len(chunk);
    let read = BdevIo::read(
        chunk * s.chunk_bytes / s.block_size,
        len / s.block_size,
        vec![IoBuf::new(len as usize)],
    )
    .internal_for_host();
    let shared = Arc::clone(s);
    let here = Rc::clone(r);
    let report = move |how: Copied| {
        apply(
            &shared,
            &here,
            Event::Copied {
                generation,
                chunk,
                how,
            },
            &mut Vec::new(),
        );
    };
    let channel = match s.inner.channel() {
        Ok(c) => c,
        Err(e) => {
            return r.defer(move || report(Copied::Failed(e.to_string())));
        }
    };
    let shared = Arc::clone(s);
    channel.submit(read, move |c: IoCompletion| {
        if let Err(e) = c.result {
            return report(Copied::Failed(e.to_string()));
        }
        let Some(store) = shared.store.get() else {
            return report(Copied::Kept(Kept::Memory(IoCompletion::ok(c.bufs).data())));
        };
        let channel = match store.bdev.channel() {
            Ok(ch) => ch,
            Err(e) => return report(Copied::Failed(e.to_string())),
        };
        let write = store.copy_write(chunk, &store.token(), c.bufs);
        let shared = Arc::clone(&shared);
        channel.submit(write, move |c: IoCompletion| match c.result {
            Ok(()) => report(Copied::Kept(Kept::Saved)),
            // Cancelled at shutdown: the write fails, the snapshot resumes later.
            Err(e) if stopping(&e) => report(Copied::Failed(e.to_string())),
            Err(e) => {
                let abandoned = shared.store.get().map(|p| {
                    p.abandon(&format!(
                        "the copy of chunk {chunk} could not be written: {e}"
                    ))
                });
                // Recorded durably: no restart continues this snapshot, so the host's
                // writes may go ahead over every chunk.
                match abandoned {
                    Some(Ok(())) => report(Copied::Abandoned),
                    _ => report(Copied::Failed(e.to_string())),
                }
            }
        });
    });
}

/// Drops the owner's state of a volume that is gone (its device dropped).
pub(super) fn release(id: u64, owner: &ReactorHandle) {
    crate::park::release_on::<Owned>(id, owner);
}
