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
        if self.set(value) {
            self.done.notify(usize::MAX);
        }
    }

    /// Lands `value` unless an answer already has; whether it did.
    fn set(&self, value: Option<T>) -> bool {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        let empty = v.is_none();
        if empty {
            *v = Some(value);
        }
        empty
    }

    fn take(&self) -> Option<Option<T>> {
        self.value.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The sending half: answers once; dropped unanswered, it tells the waiter so.
pub(crate) struct Reply<T>(Option<Arc<Slot<T>>>);

/// The waiting half.
pub(crate) struct Pending<T>(Arc<Slot<T>>);

/// A reply and the wait for it.
pub(crate) fn reply<T>() -> (Reply<T>, Pending<T>) {
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        done: event_listener::Event::new(),
    });
    (Reply(Some(Arc::clone(&slot))), Pending(slot))
}

impl<T> Reply<T> {
    /// Answers, but wakes the waiter only when the returned [`Wake`] is dropped. A
    /// reactor answering a message's several claims lands every answer before it wakes
    /// anyone, so a waiter woken by the first sees the others there too (answers woken
    /// one by one come apart on a busy machine, and the snapshot then reads adjacent
    /// chunks one request each). Dropping the [`Wake`] at once is a plain answer.
    #[must_use = "the waiter is woken when the Wake is dropped"]
    pub(crate) fn send_quietly(mut self, value: T) -> Wake<T> {
        let Some(slot) = self.0.take() else {
            unreachable!("a reply answers once, consuming itself")
        };
        slot.set(Some(value));
        Wake(slot)
    }
}

/// Wakes a quietly answered waiter when dropped ([`Reply::send_quietly`]).
pub(crate) struct Wake<T>(Arc<Slot<T>>);

impl<T> Drop for Wake<T> {
    fn drop(&mut self) {
        self.0.done.notify(usize::MAX);
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(slot) = self.0.take() {
            slot.put(None);
        }
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
        let t = std::thread::spawn(move || drop(tx.send_quietly(7)));
        assert_eq!(rx.wait_blocking(Duration::from_secs(30)), Some(7));
        t.join().unwrap_or_default();
        let (tx, rx) = reply::<u32>();
        drop(tx);
        assert_eq!(futures_lite::future::block_on(rx.wait()), None);
    }

    #[test]
    fn answers_landed_quietly_are_all_there_when_the_first_wakes() {
        let (replies, waits): (Vec<_>, Vec<_>) = (0..4).map(|_| reply::<u32>()).unzip();
        let wakes: Vec<_> = replies
            .into_iter()
            .zip(0..)
            .map(|(tx, i)| tx.send_quietly(i))
            .collect();
        // Every answer is there to be taken before any `Wake` is dropped.
        for (rx, i) in waits.into_iter().zip(0..) {
            let mut wait = std::pin::pin!(rx.wait());
            assert_eq!(
                futures_lite::future::block_on(futures_lite::future::poll_once(&mut wait)),
                Some(Some(i))
            );
        }
        drop(wakes);
    }

    /// Counts the wake-ups it is given.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_listening_waiter_is_woken_by_the_wake_not_by_the_quiet_answer() {
        let (tx, rx) = reply::<u32>();
        let count = Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut wait = std::pin::pin!(rx.wait());
        // Listening, with nothing there yet.
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        let wake = tx.send_quietly(9);
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(woken(), 0, "a quiet answer wakes nobody");
        drop(wake);
        assert_eq!(woken(), 1, "its Wake does");
        assert_eq!(wait.as_mut().poll(&mut cx), std::task::Poll::Ready(Some(9)));
    }
}
