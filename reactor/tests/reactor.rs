//! Reactor behaviour on real pinned threads: messages, affinity, timers, idle policies,
//! back-pressure and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reactor::io_uring::{opcode, types};
use reactor::{
    CoreList, IdlePolicy, PollStatus, ReactorConfig, ReactorError, ReactorSet, current,
    current_affinity, thread_cpu_time,
};

const T: Duration = Duration::from_secs(10);

fn all_cores(idle: IdlePolicy) -> ReactorSet {
    let config = ReactorConfig::new(CoreList::all_available().unwrap()).with_idle(idle);
    ReactorSet::start(config).unwrap()
}

#[test]
fn each_reactor_is_pinned_to_its_core() {
    let set = all_cores(IdlePolicy::Adaptive);
    for handle in set.handles() {
        let affinity = handle.call(T, || current_affinity().unwrap()).unwrap();
        assert_eq!(affinity, vec![handle.core()], "reactor {}", handle.index());
        let on = handle.call(T, || current().unwrap().core()).unwrap();
        assert_eq!(on, handle.core());
        assert_ne!(handle.tid(), 0);
    }
    set.shutdown().unwrap();
}

#[test]
fn messages_cross_between_reactors_on_every_core() {
    let set = all_cores(IdlePolicy::Adaptive);
    let n = set.len();
    let (tx, rx) = crossbeam_channel::bounded(1);
    const ROUNDS: usize = 1000;
    // A token travels round the ring of reactors ROUNDS times; every hop checks it
    // runs on the reactor it was sent to.
    fn hop(left: usize, expect: usize, n: usize, tx: crossbeam_channel::Sender<usize>) {
        let me = current().unwrap();
        assert_eq!(me.index(), expect);
        if left == 0 {
            tx.send(me.index()).unwrap();
            return;
        }
        let next = (expect + 1) % n;
        me.peers()[next]
            .send(move || hop(left - 1, next, n, tx))
            .unwrap();
    }
    set.handles()[0]
        .send(move || hop(ROUNDS * n, 0, n, tx))
        .unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), 0);
    let executed: u64 = set.handles().iter().map(|h| h.stats().messages).sum();
    assert!(executed >= (ROUNDS * n) as u64, "{executed}");
    set.shutdown().unwrap();
}

#[test]
fn asking_for_a_missing_core_is_a_clear_error() {
    let config = ReactorConfig::new(CoreList::parse("0,4000").unwrap());
    match ReactorSet::start(config) {
        Err(ReactorError::CoreUnavailable { core: 4000, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("core 4000 should not exist"),
    }
}

#[test]
fn timers_fire_and_cancelled_ones_do_not() {
    let set = all_cores(IdlePolicy::Interrupt);
    let (tx, rx) = crossbeam_channel::unbounded();
    set.call(0, move || {
        let r = current().unwrap();
        let start = Instant::now();
        let one_shot = tx.clone();
        r.after(Duration::from_millis(30), move || {
            one_shot.send(("once", start.elapsed())).unwrap();
        });
        let cancelled = tx.clone();
        let id = r.after(Duration::from_millis(10), move || {
            cancelled.send(("cancelled", start.elapsed())).unwrap();
        });
        assert!(r.cancel_timer(id));
        let ticks = Rc::new(Cell::new(0));
        let periodic = tx.clone();
        let poller = Rc::new(Cell::new(None));
        let me = Rc::clone(&poller);
        let id = r.register_periodic("tick", Duration::from_millis(5), move || {
            ticks.set(ticks.get() + 1);
            if ticks.get() == 5 {
                periodic.send(("periodic", start.elapsed())).unwrap();
                // A poller may unregister itself.
                current().unwrap().unregister_poller(me.get().unwrap());
            }
            PollStatus::Busy
        });
        poller.set(Some(id));
    })
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.push(rx.recv_timeout(T).unwrap());
    }
    seen.sort_by_key(|(name, _)| *name);
    assert_eq!(seen[0].0, "once");
    assert!(seen[0].1 >= Duration::from_millis(30), "{:?}", seen[0]);
    assert_eq!(seen[1].0, "periodic");
    assert!(seen[1].1 >= Duration::from_millis(25), "{:?}", seen[1]);
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "cancelled timer fired"
    );
    let names = set.call(0, || current().unwrap().poller_names()).unwrap();
    assert!(!names.contains(&"tick"), "{names:?}");
    set.shutdown().unwrap();
}

#[test]
fn idle_adaptive_reactors_use_under_five_percent_of_a_core() {
    let set = all_cores(IdlePolicy::Adaptive);
    // A periodic poller (like a keep-alive check) must not keep the reactor spinning.
    set.call(0, || {
        current()
            .unwrap()
            .register_periodic("slow", Duration::from_millis(100), || PollStatus::Idle);
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before: Vec<Duration> = set
        .handles()
        .iter()
        .map(|h| thread_cpu_time(h.tid()).unwrap())
        .collect();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let elapsed = wall.elapsed();
    for (h, before) in set.handles().iter().zip(before) {
        let used = thread_cpu_time(h.tid()).unwrap() - before;
        let share = used.as_secs_f64() / elapsed.as_secs_f64();
        assert!(
            share < 0.05,
            "reactor {} used {:.1} % of a core idle",
            h.index(),
            share * 100.0
        );
        assert!(h.stats().parks > 0);
    }
    set.shutdown().unwrap();
}

#[test]
fn busy_reactors_never_park_and_interrupt_ones_do() {
    let cores = CoreList::from_cores(&CoreList::available()[..1]).unwrap();
    let busy =
        ReactorSet::start(ReactorConfig::new(cores.clone()).with_idle(IdlePolicy::Busy)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let stats = busy.handles()[0].stats();
    busy.shutdown().unwrap();
    assert_eq!(stats.parks, 0);
    assert!(stats.passes > 1000, "{stats:?}");

    let parking =
        ReactorSet::start(ReactorConfig::new(cores).with_idle(IdlePolicy::Interrupt)).unwrap();
    for _ in 0..10 {
        // Give the reactor time to go idle and park before each message, so
        // every message must wake it.
        std::thread::sleep(Duration::from_millis(5));
        parking.call(0, || ()).unwrap();
    }
    let stats = parking.handles()[0].stats();
    assert!(stats.parks >= 10, "{stats:?}");
    assert!(stats.passes < 1000, "{stats:?}");
    parking.shutdown().unwrap();
}

#[test]
fn full_mailbox_is_back_pressure() {
    let mut config = ReactorConfig::new(CoreList::from_cores(&CoreList::available()[..1]).unwrap());
    config.mailbox_depth = 4;
    let set = ReactorSet::start(config).unwrap();
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
    let (entered_tx, entered_rx) = crossbeam_channel::bounded(1);
    let h = &set.handles()[0];
    h.send(move || {
        entered_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    })
    .unwrap();
    entered_rx.recv_timeout(T).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    for _ in 0..4 {
        let ran = Arc::clone(&ran);
        h.send(move || {
            ran.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    }
    let refused = h.send(|| {});
    assert!(
        matches!(refused, Err(ReactorError::MailboxFull { reactor: 0 })),
        "{refused:?}"
    );
    // A thread that may wait does, for no longer than it said: still full.
    let waited = h.send_within(Box::new(|| {}), Duration::from_millis(1));
    assert!(
        matches!(waited, Err((ReactorError::MailboxFull { reactor: 0 }, _))),
        "{:?}",
        waited.err().map(|e| e.0)
    );
    // And is let in as soon as the reactor takes a message, with all the patience it
    // needs (the release comes from here, after the wait has begun).
    let late = Arc::clone(&ran);
    let waiter = std::thread::spawn({
        let h = h.clone();
        move || {
            h.send_within(
                Box::new(move || {
                    late.fetch_add(1, Ordering::SeqCst);
                }),
                Duration::from_secs(3600),
            )
            .map_err(|e| e.0)
        }
    });
    release_tx.send(()).unwrap();
    waiter.join().unwrap().unwrap();
    let handle = h.clone();
    set.shutdown().unwrap();
    // A stopped reactor is no one to wait for.
    let gone = handle.send_within(Box::new(|| {}), Duration::from_secs(3600));
    assert!(
        matches!(gone, Err((ReactorError::Stopped { reactor: 0 }, _))),
        "{:?}",
        gone.err().map(|e| e.0)
    );
    assert_eq!(
        ran.load(Ordering::SeqCst),
        5,
        "queued messages are drained at shutdown"
    );
}

#[test]
fn per_core_channels_are_one_per_reactor() {
    let set = all_cores(IdlePolicy::Adaptive);
    let ids: Vec<(usize, usize)> = set
        .handles()
        .iter()
        .map(|h| {
            h.call(T, || {
                let r = current().unwrap();
                let a = r.channel(7, || Ok::<_, ()>(r.index())).unwrap();
                let b = r.channel(7, || Ok::<_, ()>(usize::MAX)).unwrap();
                assert!(Rc::ptr_eq(&a, &b), "second lookup must reuse the channel");
                (*a, Rc::as_ptr(&a) as usize)
            })
            .unwrap()
        })
        .collect();
    for (i, (value, _)) in ids.iter().enumerate() {
        assert_eq!(*value, i);
    }
    set.shutdown().unwrap();
}

#[test]
fn shutdown_completes_in_flight_ring_operations() {
    let set = all_cores(IdlePolicy::Adaptive);
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let submitted = 64;
    let sink = Arc::clone(&results);
    set.call(0, move || {
        let r = current().unwrap();
        for i in 0..submitted {
            // A 20 ms timeout op stands in for slow I/O; its timespec is owned by the
            // completion closure.
            let ts = Box::new(types::Timespec::new().nsec(20_000_000 + i * 1000));
            let entry = opcode::Timeout::new(&*ts).build();
            let sink = Arc::clone(&sink);
            // SAFETY: `ts` is moved into the completion closure, so it outlives the op.
            unsafe {
                r.submit(
                    entry,
                    Box::new(move |res| {
                        drop(ts);
                        sink.lock().unwrap().push(res);
                    }),
                )
            };
        }
    })
    .unwrap();
    set.shutdown().unwrap();
    let results = results.lock().unwrap();
    assert_eq!(
        results.len(),
        submitted as usize,
        "every operation completed"
    );
    assert!(results.iter().all(|&r| r == -libc::ETIME), "{results:?}");
}

#[test]
fn shutdown_cancels_operations_that_never_finish() {
    shutdown_cancels_a_read_that_never_finishes(false);
    shutdown_cancels_a_read_that_never_finishes(true);
}

fn shutdown_cancels_a_read_that_never_finishes(late: bool) {
    let mut config = ReactorConfig::new(CoreList::from_cores(&CoreList::available()[..1]).unwrap());
    config.drain_timeout = Duration::from_millis(100);
    let set = ReactorSet::start(config).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    set.call(0, move || {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut buf = vec![0u8; 64];
        let entry = opcode::Read::new(types::Fd(reader.as_raw_fd()), buf.as_mut_ptr(), 64).build();
        let done: reactor::OnComplete = Box::new(move |res| {
            drop((buf, reader, writer));
            tx.send(res).unwrap();
        });
        // SAFETY: the buffer and both pipe ends move into the closure, outliving the read.
        unsafe {
            if late {
                current().unwrap().submit_late(entry, done);
            } else {
                current().unwrap().submit(entry, done);
            }
        };
    })
    .unwrap();
    let started = Instant::now();
    set.shutdown().unwrap();
    assert_eq!(rx.recv_timeout(T).unwrap(), -libc::ECANCELED);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn stopped_reactor_refuses_messages() {
    let set = all_cores(IdlePolicy::Adaptive);
    let handle = set.handles()[0].clone();
    set.shutdown().unwrap();
    assert!(matches!(
        handle.send(|| {}),
        Err(ReactorError::Stopped { .. })
    ));
}

#[test]
fn stop_hooks_run_once_at_shutdown() {
    let set = all_cores(IdlePolicy::Adaptive);
    let ran = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&ran);
    set.call(0, move || {
        current().unwrap().on_stop(move || {
            assert!(current().unwrap().is_stopping());
            seen.fetch_add(1, Ordering::SeqCst);
        });
    })
    .unwrap();
    set.shutdown().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

/// Starts a chain of 2,000 hops between the cores when reactor 0 begins to stop,
/// each hop sending the next directly or (`deferred`) from work its message defers;
/// returns how many hops ran once shutdown returned.
fn hops_run_by_shutdown(deferred: bool) -> usize {
    let set = all_cores(IdlePolicy::Adaptive);
    let hops = Arc::new(AtomicUsize::new(0));
    fn hop(left: usize, deferred: bool, hops: Arc<AtomicUsize>) {
        hops.fetch_add(1, Ordering::SeqCst);
        if left == 0 {
            return;
        }
        let me = current().unwrap();
        let next = me.peers()[(me.index() + 1) % me.peers().len()].clone();
        let send = move || next.send(move || hop(left - 1, deferred, hops)).unwrap();
        if deferred {
            me.defer(send);
        } else {
            send();
        }
    }
    let seen = Arc::clone(&hops);
    set.call(0, move || {
        current()
            .unwrap()
            .on_stop(move || hop(2000, deferred, seen));
    })
    .unwrap();
    set.shutdown().unwrap();
    hops.load(Ordering::SeqCst)
}

#[test]
fn shutdown_waits_for_messages_between_reactors() {
    // Work started while stopping (here: a chain of hops between cores) must finish:
    // no reactor may exit while another can still send it a message.
    assert_eq!(hops_run_by_shutdown(false), 2001);
}

#[test]
fn shutdown_waits_for_work_a_message_leaves_behind() {
    // Each hop's message only defers the next send: between the handler returning and
    // the deferred send, nothing is queued or running as a message, and the reactor
    // must still not be taken for drained.
    assert_eq!(hops_run_by_shutdown(true), 2001);
}

#[test]
fn late_submissions_reach_the_kernel_after_everything_queued_before_the_submit() {
    // A Nop completes inside the submit, so completion order is submission order.
    let set = all_cores(IdlePolicy::Interrupt);
    let (tx, rx) = crossbeam_channel::unbounded();
    set.call(0, move || {
        let r = current().unwrap();
        let order = Rc::new(std::cell::RefCell::new(Vec::new()));
        let nop = |what: &'static str, late: bool| {
            let (o, tx) = (Rc::clone(&order), tx.clone());
            let done: reactor::OnComplete = Box::new(move |_| {
                o.borrow_mut().push(what);
                if o.borrow().len() == 4 {
                    tx.send(o.borrow().clone()).unwrap();
                }
            });
            // SAFETY: a Nop points at no memory.
            unsafe {
                if late {
                    r.submit_late(opcode::Nop::new().build(), done);
                } else {
                    r.submit(opcode::Nop::new().build(), done);
                }
            }
        };
        nop("late 1", true);
        nop("early 1", false);
        nop("late 2", true);
        let r2 = Rc::clone(&r);
        // Queued by a hook, just before the submit, and still ahead of the late ones.
        r.before_submit(move || {
            let (o, tx) = (Rc::clone(&order), tx.clone());
            // SAFETY: a Nop points at no memory.
            unsafe {
                r2.submit(
                    opcode::Nop::new().build(),
                    Box::new(move |_| {
                        o.borrow_mut().push("from a hook");
                        if o.borrow().len() == 4 {
                            tx.send(o.borrow().clone()).unwrap();
                        }
                    }),
                )
            };
        });
    })
    .unwrap();
    assert_eq!(
        rx.recv_timeout(T).unwrap(),
        ["early 1", "from a hook", "late 1", "late 2"]
    );
    set.shutdown().unwrap();
}

#[test]
fn before_submit_hooks_run_in_order_once_per_pass_before_the_ring_submits() {
    // Interrupt: the reactor parks whenever a pass finds nothing, so a hook left by a
    // completion handler must still run (in the next pass) rather than wait forever.
    let set = all_cores(IdlePolicy::Interrupt);
    let (tx, rx) = crossbeam_channel::unbounded();
    set.call(0, move || {
        let r = current().unwrap();
        let order = Rc::new(std::cell::RefCell::new(Vec::new()));
        let log = |order: &Rc<std::cell::RefCell<Vec<&'static str>>>, what| {
            order.borrow_mut().push(what);
        };
        let o = Rc::clone(&order);
        r.before_submit(move || log(&o, "first"));
        let o = Rc::clone(&order);
        r.before_submit(move || {
            log(&o, "second");
            let r = current().unwrap();
            let o = Rc::clone(&o);
            // SAFETY: a Nop points at no memory.
            unsafe {
                r.submit(
                    opcode::Nop::new().build(),
                    Box::new(move |_| {
                        log(&o, "nop completed");
                        let o = Rc::clone(&o);
                        current().unwrap().before_submit(move || {
                            log(&o, "from the completion");
                            tx.send(o.borrow().clone()).unwrap();
                        });
                    }),
                )
            };
        });
        assert!(
            order.borrow().is_empty(),
            "hooks wait for the end of the pass"
        );
    })
    .unwrap();
    assert_eq!(
        rx.recv_timeout(T).unwrap(),
        ["first", "second", "nop completed", "from the completion"]
    );
    set.shutdown().unwrap();
}
