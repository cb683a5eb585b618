//! Continuations parked on a reactor while another thread works for them (a clone's
//! owner core, a journal thread), and the messages that wake them. A parked
//! continuation is identified by a token on its own reactor, so what travels between
//! threads is a `(reactor, token)` pair, never the continuation itself (it is not
//! `Send`: it holds the host's I/O and the reactor's channels).

use std::cell::RefCell;
use std::collections::HashMap;

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

/// Sends `msg` to `to`, retrying while its mailbox is full (from a reactor, on a
/// timer; from any other thread, after a short sleep), so a wake-up is never lost to
/// back-pressure. Only a stopped reactor drops it (its parked work is gone with it).
pub(crate) fn deliver(to: ReactorHandle, msg: reactor::Message) -> bool {
    let mut msg = msg;
    loop {
        match to.try_send(msg) {
            Ok(()) => return true,
            Err((reactor::ReactorError::MailboxFull { .. }, m)) => match reactor::current() {
                Some(r) => {
                    r.after(std::time::Duration::from_micros(50), move || {
                        deliver(to, m);
                    });
                    return true;
                }
                None => {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    msg = m;
                }
            },
            Err(_) => return false,
        }
    }
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

/// Wakes the continuation parked as `token` on this reactor (if it still is).
pub(crate) fn unpark_with(token: u64, result: Result<Answer, BdevError>) {
    let f = PARKED.with(|p| p.borrow_mut().1.remove(&token));
    if let Some(f) = f {
        f(result);
    }
}

/// [`unpark_with`] for "done" or an error.
pub(crate) fn unpark(token: u64, result: Result<(), BdevError>) {
    unpark_with(token, result.map(|()| Answer::Done));
}
