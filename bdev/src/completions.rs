//! Completions a device has ready at submission (RAM, null) delivered on a later turn
//! of the reactor, as [`BackendChannel::submit`](crate::BackendChannel::submit)
//! requires, without a boxed closure per request: a channel queues them and schedules
//! one deferred call per batch.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use reactor::Reactor;

use crate::io::{IoCompletion, IoDone};

/// A channel's queue of finished requests awaiting delivery.
pub(crate) struct ReadyQueue {
    reactor: Rc<Reactor>,
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    ready: RefCell<Vec<(IoDone, IoCompletion)>>,
    /// The list delivered last, emptied: swapped in so batches reuse their memory.
    spare: RefCell<Vec<(IoDone, IoCompletion)>>,
    scheduled: Cell<bool>,
}

impl ReadyQueue {
    pub(crate) fn new(reactor: Rc<Reactor>) -> Self {
        Self {
            reactor,
            inner: Rc::default(),
        }
    }

    /// Delivers `completion` to `done` on a later turn, after those queued before it.
    pub(crate) fn complete(&self, done: IoDone, completion: IoCompletion) {
        self.inner.ready.borrow_mut().push((done, completion));
        if !self.inner.scheduled.replace(true) {
            let batch = Batch {
                inner: Rc::clone(&self.inner),
                delivered: false,
            };
            self.reactor.defer(move || batch.deliver());
        }
    }
}

/// One scheduled delivery. Dropped undelivered (a reactor that stops without draining
/// its deferred work drops it, so whatever holds the reactor can be freed), it drops
/// what was queued: the queued completions hold their channel, which holds this queue.
struct Batch {
    inner: Rc<Inner>,
    delivered: bool,
}

impl Batch {
    fn deliver(mut self) {
        self.delivered = true;
        deliver(&self.inner);
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.delivered {
            // Break the cycle queue → completion → channel → queue. (Taken out before
            // it is dropped: a completion's drop must not find the queue borrowed.)
            let undelivered = std::mem::take(&mut *self.inner.ready.borrow_mut());
            self.inner.scheduled.set(false);
            drop(undelivered);
        }
    }
}

fn deliver(inner: &Inner) {
    // Completions may submit (and so queue) more: those wait for the next batch.
    inner.scheduled.set(false);
    let mut batch = std::mem::take(&mut *inner.spare.borrow_mut());
    std::mem::swap(&mut batch, &mut *inner.ready.borrow_mut());
    for (done, completion) in batch.drain(..) {
        done.complete(completion);
    }
    *inner.spare.borrow_mut() = batch;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::IoCompletion;
    use reactor::{CoreList, ReactorConfig, ReactorSet};
    use std::sync::mpsc;

    #[test]
    fn completions_arrive_later_in_order_and_may_queue_more() {
        let set = ReactorSet::start(ReactorConfig::new(CoreList::parse("0").unwrap())).unwrap();
        let (tx, rx) = mpsc::channel();
        set.handles()[0]
            .send(move || {
                let queue = Rc::new(ReadyQueue::new(reactor::current().unwrap()));
                let seen = Rc::new(RefCell::new(Vec::new()));
                for i in 0..3 {
                    let (seen, queue2, tx) = (Rc::clone(&seen), Rc::clone(&queue), tx.clone());
                    let done = IoDone::new(move |_| {
                        seen.borrow_mut().push(i);
                        if i == 1 {
                            // Queued from a delivery: comes in the next batch, last.
                            let seen = Rc::clone(&seen);
                            let next = IoDone::new(move |_| {
                                seen.borrow_mut().push(9);
                                tx.send(seen.borrow().clone()).unwrap();
                            });
                            queue2.complete(next, IoCompletion::ok(Vec::new()));
                        }
                    });
                    queue.complete(done, IoCompletion::ok(Vec::new()));
                }
                // Nothing runs before `complete`'s caller returns.
                assert!(seen.borrow().is_empty());
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap(), vec![0, 1, 2, 9]);
        set.shutdown().unwrap();
    }
}
