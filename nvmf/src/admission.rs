//! Connections that have not completed Connect yet ("pending") are counted apart from
//! established ones, under limits of their own — in all and per source address — so
//! that sockets which never send an ICReq or a Connect can never take the slots of
//! real hosts' queues; each also has a deadline ([`crate::Limits::icreq_timeout`],
//! [`crate::Limits::connect_timeout`]).
//!
//! The reactor that accepts on a listener owns that listener's pending counts (a
//! thread-local map, no locks): a connection, on whatever reactor it lives, holds a
//! [`Ticket`] and gives it back with a message to that reactor when its Connect
//! succeeds or it closes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use reactor::ReactorHandle;

use crate::subsystem::Limits;

/// Why an accepted connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every pending slot of the listener is taken.
    Full,
    /// The source address holds its share of pending slots.
    AddressFull,
}

impl Refusal {
    /// What the audit log says.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Full => "too many connections that have not sent Connect",
            Self::AddressFull => {
                "too many connections from this address that have not sent Connect"
            }
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

thread_local! {
    /// Pending counts of the listeners this reactor accepts on, by listening address.
    static PENDING: RefCell<HashMap<SocketAddr, Pending>> = RefCell::new(HashMap::new());
}

/// A pending slot of listener `listener` on reactor `home`, held by one connection
/// until its Connect succeeds or it closes (dropping it gives the slot back).
pub(crate) struct Ticket {
    home: ReactorHandle,
    listener: SocketAddr,
    address: IpAddr,
}

/// Takes a pending slot for a connection from `address` on `listener`; called on
/// `home`, the reactor accepting on it.
pub(crate) fn admit(
    home: &ReactorHandle,
    listener: SocketAddr,
    address: IpAddr,
    limits: &Limits,
) -> Result<Ticket, Refusal> {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let counts = p.entry(listener).or_default();
        if counts.total >= limits.max_pending_connections {
            return Err(Refusal::Full);
        }
        let n = counts.per_address.entry(address).or_insert(0);
        if *n >= limits.max_pending_per_address {
            return Err(Refusal::AddressFull);
        }
        *n += 1;
        counts.total += 1;
        Ok(Ticket {
            home: home.clone(),
            listener,
            address,
        })
    })
}

/// Gives a slot back; runs on the listener's reactor.
fn release(listener: SocketAddr, address: IpAddr) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let Some(counts) = p.get_mut(&listener) else {
            unreachable!("a pending slot of {listener} given back on a reactor that never gave it");
        };
        let n = counts.per_address.get(&address).copied().unwrap_or(0);
        assert!(n > 0 && counts.total > 0, "pending slot given back twice");
        counts.total -= 1;
        if n == 1 {
            counts.per_address.remove(&address);
        } else {
            counts.per_address.insert(address, n - 1);
        }
    });
}

/// Pending connections of `listener` counted on this reactor (for tests).
#[cfg(test)]
fn pending(listener: SocketAddr) -> usize {
    PENDING.with(|p| p.borrow().get(&listener).map_or(0, |c| c.total))
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let (listener, address) = (self.listener, self.address);
        give_back(
            self.home.clone(),
            Box::new(move || release(listener, address)),
        );
    }
}

/// Sends `msg` to `home`, trying again a moment later while its mailbox is full (a
/// lost release would keep a slot taken for good). A stopped reactor refuses it: its
/// listener and counts are gone with it.
fn give_back(home: ReactorHandle, msg: reactor::Message) {
    match home.try_send(msg) {
        Ok(()) | Err((reactor::ReactorError::Stopped { .. }, _)) => {}
        Err((_, msg)) => match reactor::current() {
            Some(r) => {
                r.after(std::time::Duration::from_millis(1), move || {
                    give_back(home, msg)
                });
            }
            None => {
                std::thread::yield_now();
                give_back(home, msg);
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reactor::{CoreList, ReactorConfig, ReactorSet};

    #[test]
    fn pending_slots_count_in_all_and_per_address_and_come_back() {
        let set = ReactorSet::start(ReactorConfig::new(CoreList::parse("0").unwrap())).unwrap();
        let home = set.handles()[0].clone();
        let limits = Limits {
            max_pending_connections: 3,
            max_pending_per_address: 2,
            ..Limits::default()
        };
        let listener: SocketAddr = "127.0.0.1:4420".parse().unwrap();
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let h = home.clone();
        home.send(move || {
            let t1 = admit(&h, listener, a, &limits).unwrap();
            let t2 = admit(&h, listener, a, &limits).unwrap();
            let third = admit(&h, listener, a, &limits).err();
            let t3 = admit(&h, listener, b, &limits).unwrap();
            let full = admit(&h, listener, b, &limits).err();
            drop(t1);
            tx.send((third, full, pending(listener), [t2, t3])).unwrap();
        })
        .unwrap();
        let (third, full, before_release, held) = rx.recv().unwrap();
        assert_eq!(third, Some(Refusal::AddressFull));
        assert_eq!(full, Some(Refusal::Full));
        // t1's release is a message, run after the closure that dropped it.
        assert_eq!(before_release, 3);
        drop(held);
        let (tx, rx) = std::sync::mpsc::channel();
        // Messages run in order: by this one, every release has run.
        home.send(move || tx.send(pending(listener)).unwrap())
            .unwrap();
        assert_eq!(rx.recv().unwrap(), 0);
        set.shutdown().unwrap();
    }
}
