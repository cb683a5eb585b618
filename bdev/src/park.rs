//! Continuations parked on a reactor while another thread works for them (a clone's
//! owner core, a journal thread), and the messages that wake them. A parked
//! continuation is identified by a token on its own reactor, so what travels between
//! threads is a `(reactor, token)` pair, never the continuation itself (it is not
//! `Send`: it holds the host's I/O and the reactor's channels).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use reactor::ReactorHandle;

use crate::error::BdevError;

/// How a parked continuation is woken when nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// What it waited for is done.
    Done,
    /// A clone write's plan was granted these chunks (claimed for it): it may go ahead.
    Granted(Vec<u64>),
    /// A clone read's chunk, just fetched (the local copy is being written behind it).
    Data(std::sync::Arc<Vec<u8>>),
}

/// Work to resume once another thread has answered.
type Continuation = Box<dyn FnOnce(Result<Answer, BdevError>)>;

/// Sends `msg` to `to`; a message its full mailbox cannot take now goes to the
/// courier, which waits for room, so a wake-up is never lost to back-pressure and the
/// sender (a reactor, an OX core, a journal) never waits. Only a stopped reactor drops
/// it (its parked work is gone with it). Messages that waited this way may be
/// overtaken by later ones: those that care carry an order of their own (a volume's
/// begin epoch; a clone's release sets a flag its late requests are checked against).
pub(crate) fn deliver(to: ReactorHandle, msg: reactor::Message) -> bool {
    match to.try_send(msg) {
        Ok(()) => true,
        Err((reactor::ReactorError::MailboxFull { .. }, m)) => {
            courier(to.index()).send((to, m)).is_ok()
        }
        Err(_) => false,
    }
}

/// How long the courier waits for room at once before it waits again (it is woken by
/// room, not by this).
const COURIER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// A courier's queue of messages for full mailboxes.
type Courier = crossbeam_channel::Sender<(ReactorHandle, reactor::Message)>;

/// The thread that holds messages for reactor `index`'s full mailbox on behalf of
/// threads that must not wait, handing each over as soon as that reactor has room, or
/// dropping it once the reactor has stopped. One per reactor, so a stalled reactor
/// holds back only its own messages. (The map is behind a mutex: taken only when a
/// mailbox is full, never on a reactor's ordinary path.)
fn courier(index: usize) -> Courier {
    static COURIERS: OnceLock<std::sync::Mutex<HashMap<usize, Courier>>> = OnceLock::new();
    let mut couriers = COURIERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    couriers
        .entry(index)
        .or_insert_with(|| {
            let (tx, rx) = crossbeam_channel::unbounded::<(ReactorHandle, reactor::Message)>();
            let spawned = std::thread::Builder::new()
                .name(format!("courier-{index}"))
                .spawn(move || {
                    for (to, msg) in rx {
                        let mut next = Some(msg);
                        while let Some(m) = next.take() {
                            if let Err((reactor::ReactorError::MailboxFull { .. }, m)) =
                                to.send_within(m, COURIER_PATIENCE)
                            {
                                next = Some(m);
                            }
                        }
                    }
                });
            if let Err(e) = spawned {
                // Without a courier a full mailbox drops the message: say so loudly.
                tracing::error!(error = %e, "cannot start the courier thread");
            }
            tx
        })
        .clone()
}

thread_local! {
    /// Continuations parked on this reactor, by token.
    static PARKED: RefCell<(u64, HashMap<u64, Continuation>)> =
        RefCell::new((0, HashMap::new()));
}

/// Parks `f` on this reactor; the token wakes it ([`unpark`]).
pub(crate) fn park_for(f: impl FnOnce(Result<Answer, BdevError>) + 'static) -> u64 {
    PARKED.with(|p| {
        let mut p = p.borrow_mut();
        if p.0 == 0
            && let Some(r) = reactor::current()
        {
            // First park on this reactor: when it stops, fail whatever is still
            // parked, so no host I/O is left without a completion.
            r.on_stop(fail_parked);
        }
        p.0 += 1;
        let token = p.0;
        p.1.insert(token, Box::new(f));
        token
    })
}

/// Parks `f`, which only needs to know whether what it waited for succeeded.
pub(crate) fn park(f: impl FnOnce(Result<(), BdevError>) + 'static) -> u64 {
    park_for(move |r| f(r.map(|_| ())))
}

/// Completes every parked continuation on this reactor with "shutting down".
fn fail_parked() {
    let parked: Vec<Continuation> =
        PARKED.with(|p| p.borrow_mut().1.drain().map(|(_, f)| f).collect());
    for f in parked {
        f(Err(BdevError::ShuttingDown));
    }
}

/// Wakes the continuation parked as `token` on this reactor; false if none is (it was
/// failed at shutdown already).
pub(crate) fn unpark_with(token: u64, result: Result<Answer, BdevError>) -> bool {
    let f = PARKED.with(|p| p.borrow_mut().1.remove(&token));
    match f {
        Some(f) => {
            f(result);
            true
        }
        None => false,
    }
}

/// Wakes `token` on `to`: on this reactor's next turn when that is this reactor (a
/// request never completes inside its own `submit`), else by message.
pub(crate) fn wake(to: &ReactorHandle, token: u64, result: Result<Answer, BdevError>) {
    match reactor::current() {
        Some(r) if r.handle().same(to) => r.defer(move || {
            unpark_with(token, result);
        }),
        _ => {
            deliver(
                to.clone(),
                Box::new(move || {
                    unpark_with(token, result);
                }),
            );
        }
    }
}

/// Drops `owner`'s per-core object `T` keyed `id` (a device's owner state, once the
/// device is gone), by message.
pub(crate) fn release_on<T: 'static>(id: u64, owner: &ReactorHandle) {
    deliver(
        owner.clone(),
        Box::new(move || {
            if let Some(r) = reactor::current() {
                r.release_channel::<T>(id);
            }
        }),
    );
}

/// [`unpark_with`] for "done" or an error.
pub(crate) fn unpark(token: u64, result: Result<(), BdevError>) {
    unpark_with(token, result.map(|()| Answer::Done));
}

#[cfg(test)]
mod tests {
    use reactor::{CoreList, ReactorConfig, ReactorSet};

    use super::*;

    /// A thread that is not a reactor never waits on a full mailbox: with the reactor
    /// held up and its mailbox full, every message is still handed over at once, and
    /// each arrives once the reactor goes on. (Had `deliver` waited, this would hang:
    /// the reactor is released only after the last `deliver` returns.)
    #[test]
    fn a_full_mailbox_never_holds_up_a_thread_that_is_not_a_reactor() {
        let mut config = ReactorConfig::new(CoreList::parse("0").expect("core 0"));
        config.mailbox_depth = 4;
        let set = ReactorSet::start(config).expect("a reactor");
        let to = set.handles()[0].clone();
        let (hold_tx, hold_rx) = crossbeam_channel::bounded::<()>(0);
        to.send(move || {
            let _ = hold_rx.recv();
        })
        .expect("the holding message");
        let (arrived, arrivals) = crossbeam_channel::unbounded::<()>();
        for _ in 0..100 {
            let a = arrived.clone();
            assert!(deliver(
                to.clone(),
                Box::new(move || {
                    let _ = a.send(());
                })
            ));
        }
        hold_tx.send(()).expect("the reactor is held");
        for _ in 0..100 {
            arrivals
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every message arrives");
        }
        set.shutdown().expect("shutdown");
    }
}
