//! `reply`: a one-shot answer from a reactor to a caller that is not one — an OX
//! core's task (which awaits it) or a control thread (which blocks on it). Used on
//! control paths only (a snapshot's begin, its claims of chunks), never a host's I/O.

use std::sync::{Arc, Mutex};

use event_listener::Listener;
use std::time::{Duration, Instant};

/// The slot an answer lands in: `Some(None)` if the sender was dropped unanswered.
struct Slot<T> {
    value: Mutex<Option<Option<T>>>,
    done: event_listener::Event,
}

impl<T> Slot<T> {
    fn put(&self, value: Option<T>) {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        if v.is_none() {
            *v = Some(value);
            drop(v);
            self.done.notify(usize::MAX);
        }
    }

    fn take(&self) -> Option<Option<T>> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The sending half: answers once; dropped unanswered, it tells the waiter so.
pub(crate) struct Reply<T>(Arc<Slot<T>>);

/// The waiting half.
pub(crate) struct Pending<T>(Arc<Slot<T>>);

/// A reply and the wait for it.
pub(crate) fn reply<T>() -> (Reply<T>, Pending<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        done: event_listener::Event::new(),
    });
    (Reply(Arc::clone(&slot)), Pending(slot))
}

impl<T> Reply<T> {
    /// Answers.
    pub(crate) fn send(self, value: T) {
        self.0.put(Some(value));
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        self.0.put(None);
    }
}

impl<T> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

impl<T> Pending<T> {
    /// The answer, or `None` if the sender was dropped without one.
    pub(crate) async fn wait(self) -> Option<T> {
        loop {
            if let Some(v) = self.0.take() {
                return v;
            }
            let listener = self.0.done.listen();
            // Looked at again once listening, so the answer cannot be missed.
            if let Some(v) = self.0.take() {
                return v;
            }
            listener.await;
        }
    }

    /// The answer, waiting at most `timeout` (a thread that is not a reactor only).
    pub(crate) fn wait_blocking(self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.0.take() {
                return v;
            }
            let listener = self.0.done.listen();
            if let Some(v) = self.0.take() {
                return v;
            }
            listener.wait_deadline(deadline)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_arrives_and_a_dropped_sender_says_so() {
        let (tx, rx) = reply::<u32>();
        let t = std::thread::spawn(move || tx.send(7));
        assert_eq!(rx.wait_blocking(Duration::from_secs(30)), Some(7));
        t.join().unwrap_or_default();
        let (tx, rx) = reply::<u32>();
        drop(tx);
        assert_eq!(futures_lite::future::block_on(rx.wait()), None);
    }
}
