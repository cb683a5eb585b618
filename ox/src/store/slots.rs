//! A limit on the requests one HTTP client has in flight, granted first come, first
//! served: a request past the limit waits for one before it to finish and takes its
//! slot, in the order the requests came (a sequential reader's read-ahead asks for its
//! nearest chunks first, and they must not be overtaken). One OX core's; not shared
//! between threads.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

/// At most `most` slots held at once.
pub struct Slots {
    state: Rc<RefCell<State>>,
}

struct State {
    most: usize,
    held: usize,
    /// Requests waiting, oldest first: each is sent its slot.
    waiting: VecDeque<async_channel::Sender<Slot>>,
}

/// One request's place among the [`Slots`]; given back (to the oldest request waiting,
/// if any) when dropped.
pub struct Slot {
    state: Rc<RefCell<State>>,
}

impl Slots {
    /// At most `most` (at least 1) held at once.
    pub fn new(most: usize) -> Self {
        Self {
            state: Rc::new(RefCell::new(State {
                most: most.max(1),
                held: 0,
                waiting: VecDeque::new(),
            })),
        }
    }

    /// A slot: at once if one is free and nobody waits, else once those before have
    /// theirs and one is given back. A caller that stops waiting (its future dropped)
    /// loses its turn; a slot sent to it is passed on.
    pub async fn acquire(&self) -> Slot {
        let rx = {
            let mut s = self.state.borrow_mut();
            if s.held < s.most && s.waiting.is_empty() {
                s.held += 1;
                return Slot {
                    state: Rc::clone(&self.state),
                };
            }
            let (tx, rx) = async_channel::bounded(1);
            s.waiting.push_back(tx);
            rx
        };
        // The sender is held in `waiting` until a slot is sent on it, and the state
        // outlives this call (it is `self`'s): the channel closes only by sending.
        match rx.recv().await {
            Ok(slot) => slot,
            Err(_) => unreachable!("a waiting request's sender dropped unsent"),
        }
    }

    /// Slots held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.state.borrow().held
    }

    /// The most held at once.
    pub fn most(&self) -> usize {
        self.state.borrow().most
    }

    /// Requests that could be sent now without waiting for a turn: the slots not held,
    /// or none while requests wait (or have given up waiting and not been passed
    /// over yet).
    pub fn free(&self) -> usize {
        let s = self.state.borrow();
        assert!(s.held <= s.most, "more slots held than there are");
        if s.waiting.is_empty() {
            s.most - s.held
        } else {
            0
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let next = {
            let mut s = self.state.borrow_mut();
            loop {
                match s.waiting.pop_front() {
                    // Gave up waiting (its future dropped): the next.
                    Some(tx) if tx.receiver_count() == 0 => continue,
                    Some(tx) => break Some(tx),
                    None => {
                        assert!(s.held > 0, "a slot given back that was never held");
                        s.held -= 1;
                        break None;
                    }
                }
            }
        };
        // Handed on as it is (`held` unchanged). Refused, the slot comes back in the
        // error and its drop hands it to the next; taken but then given up before it
        // was used, it drops with the channel and does the same.
        if let Some(tx) = next {
            let _ = tx.try_send(Slot {
                state: Rc::clone(&self.state),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn slots_past_the_limit_wait_and_are_granted_in_order() {
        block_on(async {
            let slots = Slots::new(2);
            assert_eq!((slots.most(), slots.free()), (2, 2));
            let a = slots.acquire().await;
            assert_eq!(slots.free(), 1);
            let b = slots.acquire().await;
            assert_eq!((slots.held(), slots.free()), (2, 0));
            let order = Rc::new(RefCell::new(Vec::new()));
            let mut waiting: Vec<_> = (0..3)
                .map(|i| {
                    let (slots, order) = (&slots, Rc::clone(&order));
                    Box::pin(async move {
                        let slot = slots.acquire().await;
                        order.borrow_mut().push(i);
                        slot
                    })
                })
                .collect();
            for w in &mut waiting {
                assert!(poll_once(w.as_mut()).await.is_none(), "waits");
            }
            drop(a);
            assert_eq!(slots.held(), 2, "handed on, not freed");
            assert_eq!(slots.free(), 0, "none free while requests wait");
            // Polled newest first: the slot went to the oldest.
            assert!(poll_once(waiting[2].as_mut()).await.is_none());
            assert!(poll_once(waiting[1].as_mut()).await.is_none());
            let s0 = poll_once(waiting[0].as_mut()).await.expect("the oldest's");
            drop(b);
            assert!(
                poll_once(waiting[2].as_mut()).await.is_none(),
                "b's went on"
            );
            let s1 = poll_once(waiting[1].as_mut()).await.expect("b's slot");
            drop(s0);
            let s2 = poll_once(waiting[2].as_mut()).await.expect("s0's slot");
            assert_eq!(*order.borrow(), vec![0, 1, 2]);
            assert_eq!(slots.held(), 2);
            drop((s1, s2));
            assert_eq!((slots.held(), slots.free()), (0, 2));
        });
    }

    #[test]
    fn a_waiter_that_gives_up_passes_its_slot_on() {
        block_on(async {
            let slots = Slots::new(1);
            let first = slots.acquire().await;
            let mut gone = Box::pin(slots.acquire());
            assert!(poll_once(gone.as_mut()).await.is_none());
            let mut next = Box::pin(slots.acquire());
            assert!(poll_once(next.as_mut()).await.is_none());
            // Given up before its turn.
            drop(gone);
            drop(first);
            let slot = poll_once(next.as_mut()).await.expect("the next waiter's");
            assert_eq!(slots.held(), 1);
            // Given up after its slot was sent, before taking it.
            let mut late = Box::pin(slots.acquire());
            assert!(poll_once(late.as_mut()).await.is_none());
            drop(slot);
            drop(late);
            assert_eq!(slots.held(), 0, "the slot sent to it came back");
            let _again = poll_once(Box::pin(slots.acquire())).await.expect("free");
        });
    }
}
