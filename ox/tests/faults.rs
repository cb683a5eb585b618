//! Snapshots, clone reads, thickening and verify through a store that damages what it
//! carries: the test S3 server's seeded [`s3server::Chaos`] flips bits in, truncates
//! and swaps request and response bodies, answers 5xx, resets connections before and
//! after serving, and holds answers back. Whatever it does: no host read returns a
//! wrong byte, no snapshot publishes with a bad object, and transient damage is
//! fetched again until it gets through.
//!
//! `OX_FAULT_SEED` repeats a run (the seed is printed); `OX_FAULT_ROUNDS` makes it
//! longer (`scripts/soak-faults`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bdev::{Basis, Bdev, create_clone, create_malloc};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::snapshot::{Loaded, load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store};
use ox::throttle::Throttle;
use support::{CHUNK, Env, env, fresh_volume, options, random, read, write};

const SIZE: u64 = 4 << 20;

fn s3(config: &S3Config, ex: &Rc<async_executor::LocalExecutor<'static>>) -> S3Store {
    let mut c = config.clone();
    // CRC32C alone guards a PUT's body, as it does over HTTPS by default: a damaged one
    // the server took would be found below as a bad object.
    c.content_md5 = ox::store::s3::ContentMd5::Never;
    c.retries = 6;
    c.backoff = Duration::from_millis(5);
    c.max_backoff = Duration::from_millis(50);
    S3Store::new(c, Rc::clone(ex)).unwrap()
}

fn load_with(env: &Env, config: &S3Config, key: &str) -> Loaded {
    let (config, key, kek) = (config.clone(), key.to_string(), env.kek.clone());
    env.cores
        .run(move |ex| {
            Box::pin(async move { load(&s3(&config, &ex), &key, &[kek]).await.unwrap() })
        })
        .unwrap()
}

/// A clone of snapshot `key` over RAM, fetching from the (damaging) store.
fn clone_of(
    env: &Env,
    config: &S3Config,
    key: &str,
    n: u32,
) -> (Bdev, ObjectBasis, bdev::CloneHandle) {
    let loaded = load_with(env, config, key);
    let c = config.clone();
    let factory: StoreFactory = Arc::new(move |ex| Ok(Rc::new(s3(&c, ex)) as Rc<dyn ObjectStore>));
    let basis = ObjectBasis::new(
        loaded,
        factory,
        Arc::clone(&env.cores),
        Throttle::default(),
        "c",
    );
    let local = create_malloc(&format!("local{n}"), 512, SIZE / 512, None).unwrap();
    let (bdev, handle) = create_clone(
        &format!("clone{n}"),
        local,
        Arc::new(basis.clone()) as Arc<dyn Basis>,
        None,
    )
    .unwrap();
    (bdev, basis, handle)
}

/// A store whose certificate the appliance does not trust fails a snapshot at once,
/// with the reason, however long the snapshot would wait out an outage (an hour
/// here): a configuration error is not an outage.
#[test]
fn an_untrusted_store_fails_a_snapshot_at_once_with_the_reason() {
    let env = env();
    let server = s3server::start_server(true);
    // Trust another CA than the one that signed the server's certificate.
    let other = s3server::start_server(true);
    let mut config = S3Config::new(
        format!("https://localhost:{}", server.addr.port())
            .parse()
            .unwrap(),
        s3server::BUCKET,
        "us-east-1",
        ox::store::s3::CredentialSource::Static {
            access_key: s3server::ACCESS.into(),
            secret_key: s3server::SECRET.into(),
        },
    );
    config.trust =
        ox::store::http::Trust::CaBundle(other.ca_pem.as_ref().unwrap().path().to_path_buf());
    let (vol, handle) = fresh_volume(SIZE);
    write(&env, &vol, 0, &random(SIZE as usize, 5));
    let mut opts = options(&env);
    opts.outage_patience = Duration::from_secs(3600);
    let (h, r) = (handle.clone(), env.set.handles()[0].clone());
    let result = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = s3(&config, &ex);
                snapshot_volume(&store, &r, &h, None, &opts, &Throttle::default())
                    .await
                    .map(|_| ())
            })
        })
        .unwrap();
    let e = result.expect_err("an untrusted store cannot take a snapshot");
    assert!(matches!(e, ox::OxError::Untrusted { .. }), "{e}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    // One refused handshake per request in flight, never a retry (the server counts
    // each once its side of the handshake has ended, which may be after the client's).
    let refused = loop {
        let n = server
            .faults
            .tls_refused
            .load(std::sync::atomic::Ordering::SeqCst);
        if n > 0 {
            break n;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(refused <= 16, "{refused} handshakes");
    // The volume is free for the next snapshot.
    let on = env.set.handles()[0].clone();
    futures_lite::future::block_on(handle.begin_snapshot(&on)).expect("the volume is free");
    handle.end_snapshot(None);
    env.set.shutdown().unwrap();
}

/// A snapshot waiting out a store that answers nothing but 503 (an hour's patience)
/// stops as soon as it is cancelled, with the reason, and the volume is free again.
#[test]
fn a_snapshot_waiting_out_an_outage_stops_when_cancelled() {
    let env = env();
    let server = s3server::start_server(false);
    server
        .faults
        .unavailable
        .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    let config = server.client_config();
    let (vol, handle) = fresh_volume(SIZE);
    write(&env, &vol, 0, &random(SIZE as usize, 6));
    let mut opts = options(&env);
    opts.outage_patience = Duration::from_secs(3600);
    let progress = Arc::clone(&opts.progress);
    let (h, r, c) = (handle.clone(), env.set.handles()[0].clone(), config.clone());
    let cores = Arc::clone(&env.cores);
    let snapshot = std::thread::spawn(move || {
        cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = s3(&c, &ex);
                    snapshot_volume(&store, &r, &h, None, &opts, &Throttle::default())
                        .await
                        .map(|_| ())
                })
            })
            .unwrap()
    });
    // While it waits, the wait and the store's retries are visible, with the reason.
    while progress.outage().is_none() {
        std::thread::sleep(Duration::from_millis(10));
    }
    // (A connection the server closed may add a retry of its own, even the last.)
    let (since, reason) = progress.outage().unwrap();
    assert!(
        since > 0 && (reason.contains("SlowDown") || reason.contains("HTTP exchange")),
        "{reason}"
    );
    assert!(
        config.retry_log.count() >= 6,
        "the store's own retries came first"
    );
    let last = config.retry_log.last().unwrap();
    assert!(
        last.reason.contains("SlowDown") || last.reason.contains("HTTP exchange"),
        "{last:?}"
    );
    assert_eq!(last.op, "PUT");
    // The operator cancels.
    progress.cancel();
    let e = snapshot
        .join()
        .unwrap()
        .expect_err("a cancelled snapshot fails");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_eq!(
        progress.outage(),
        None,
        "nothing waits out the outage any more"
    );
    // Counted by kind, as metrics show them: the store's 503 SlowDowns as slow_down
    // (a connection the server closed may add a retry of another kind), and the
    // requests that gave up after their retries as unavailable, none as refused,
    // untrusted or damaged.
    use ox::store::retries::{Failed, Trouble};
    let by_kind = config.retry_log.by_kind();
    let all: u64 = by_kind.iter().map(|(_, n)| n).sum();
    assert_eq!(all, config.retry_log.count(), "{by_kind:?}");
    for (kind, n) in by_kind {
        match kind {
            Trouble::SlowDown => assert!(n > 0, "{by_kind:?}"),
            Trouble::ServerError | Trouble::Damaged => assert_eq!(n, 0, "{by_kind:?}"),
            Trouble::Timeout | Trouble::Connection => {}
        }
    }
    let failures = config.retry_log.failures();
    for (why, n) in failures {
        assert_eq!(why == Failed::Unavailable, n > 0, "{failures:?}");
    }
    let on = env.set.handles()[0].clone();
    futures_lite::future::block_on(handle.begin_snapshot(&on)).expect("the volume is free");
    handle.end_snapshot(None);
    env.set.shutdown().unwrap();
}

/// A paused thickening asks the store for nothing, not even again for a run the
/// store failed: that run waits for the resume, not its back-off; once resumed (and
/// the store back) the clone is thickened whole.
#[test]
fn a_paused_thickening_asks_nothing_again_until_resumed() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (vol, handle) = fresh_volume(SIZE);
    let image = random(SIZE as usize, 7);
    write(&env, &vol, 0, &image);
    let report = support::snapshot_s3(&env, &config, &handle, None, options(&env));
    let (thick, _, th) = clone_of(&env, &config, &report.manifest_key, 0);
    // One run at a time, and every request fails from now on.
    server.faults.unavailable.store(u32::MAX, SeqCst);
    let control = ox::hydrate::Thickening::new();
    control.set_window(1);
    let (h, r, c) = (
        th.clone(),
        env.set.handles()[0].clone(),
        Arc::clone(&control),
    );
    let cores = Arc::clone(&env.cores);
    let walker = std::thread::spawn(move || {
        cores
            .run(move |_ex| Box::pin(async move { ox::hydrate::thicken(&h, &r, &c).await }))
            .unwrap()
    });
    // The run failed (after the store's own retries) and waits out its back-off
    // (`bdev::walk::RETRY_STEP`, half a second): pause now.
    while control.retrying() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    control.pause();
    // Waiting again once paused (should the back-off have passed before the pause, the
    // run was asked for once more and failed again): nothing of it is in flight then.
    while control.retrying() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let asked = server.faults.requests.load(SeqCst);
    // Four back-offs later nothing has been asked again.
    std::thread::sleep(bdev::walk::RETRY_STEP * 4);
    assert_eq!(
        server.faults.requests.load(SeqCst),
        asked,
        "a paused walk asked again"
    );
    assert_eq!(control.retrying(), 1, "the run still waits");
    assert_eq!(th.hydration().0, 0);
    server.faults.unavailable.store(0, SeqCst);
    control.resume();
    let fetched = walker.join().unwrap().unwrap();
    assert_eq!(fetched, SIZE / CHUNK);
    assert_eq!(control.retrying(), 0);
    assert!(
        read(&env, &thick, 0, SIZE) == image,
        "thickened clone differs"
    );
    env.set.shutdown().unwrap();
}

#[test]
fn damaged_bodies_resets_and_5xx_never_reach_a_host_or_a_published_snapshot() {
    let seed = std::env::var("OX_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            u64::from_le_bytes(b)
        });
    let rounds: u32 = std::env::var("OX_FAULT_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    println!("fault injection: OX_FAULT_SEED={seed} OX_FAULT_ROUNDS={rounds}");
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let chaos = s3server::Chaos::new(seed, 150);
    *server.faults.chaos.lock().unwrap() = Some(Arc::clone(&chaos));
    let (vol, handle) = fresh_volume(SIZE);
    let mut image = vec![0u8; SIZE as usize];
    let mut parent: Option<String> = None;
    let mut published = Vec::new();
    for round in 0..rounds {
        // Some chunks change (a quarter of them, random ones), some stay zero.
        let data = random(SIZE as usize, seed ^ u64::from(round));
        for c in 0..SIZE / CHUNK {
            if (c + u64::from(round)) % 4 == 0 && c % 7 != 3 {
                let at = (c * CHUNK) as usize;
                let part = &data[at..at + CHUNK as usize];
                write(&env, &vol, c * CHUNK, part);
                image[at..at + CHUNK as usize].copy_from_slice(part);
            }
        }
        // A snapshot through the damaging store, read back before publishing every
        // other round.
        let mut opts = options(&env);
        opts.object_bytes = 256 << 10;
        opts.verify_before_publish = round % 2 == 0;
        let (h, r, c, k, p) = (
            handle.clone(),
            env.set.handles()[0].clone(),
            config.clone(),
            env.kek.clone(),
            parent.clone(),
        );
        let report = env
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = s3(&c, &ex);
                    let parent = match p {
                        Some(key) => Some(load(&store, &key, &[k]).await?),
                        None => None,
                    };
                    snapshot_volume(&store, &r, &h, parent.as_ref(), &opts, &Throttle::default())
                        .await
                })
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: round {round}: snapshot failed: {e}"));
        if let Some(rb) = &report.read_back {
            assert_eq!(rb.frames, report.manifest.stored_chunks, "seed {seed}");
        }
        parent = Some(report.manifest_key.clone());
        published.push((report.manifest_key.clone(), image.clone()));

        // Clone reads: every byte right (or the read fails; it must not).
        let (clone, basis, _) = clone_of(&env, &config, &report.manifest_key, 2 * round);
        for (i, piece) in (0..SIZE).step_by(256 << 10).enumerate() {
            let got = read(&env, &clone, piece, 256 << 10);
            assert!(
                got[..] == image[piece as usize..(piece + (256 << 10)) as usize],
                "seed {seed}: round {round}: clone read {i} returned wrong bytes"
            );
        }
        let counters = basis.counters();
        let (fails, refetches) = (
            counters
                .integrity
                .failures
                .load(std::sync::atomic::Ordering::SeqCst),
            counters
                .integrity
                .refetches
                .load(std::sync::atomic::Ordering::SeqCst),
        );
        assert!(refetches <= fails, "a refetch follows each failure");

        // Thickening another clone, then reading it with no store at all.
        let (thick, _, th) = clone_of(&env, &config, &report.manifest_key, 2 * round + 1);
        let (h, r) = (th.clone(), env.set.handles()[0].clone());
        let control = ox::hydrate::Thickening::new();
        let c = Arc::clone(&control);
        env.cores
            .run(move |_ex| Box::pin(async move { ox::hydrate::thicken(&h, &r, &c).await }))
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: round {round}: thickening failed: {e}"));
        assert_eq!(th.hydration().0, th.hydration().1, "seed {seed}: thick");
        assert!(
            read(&env, &thick, 0, SIZE) == image,
            "seed {seed}: thickened clone differs"
        );

        // Verify through the damaging store: nothing bad, transient damage retried.
        let loaded = load_with(&env, &config, &report.manifest_key);
        let c = config.clone();
        let v = env
            .cores
            .run(move |ex| {
                Box::pin(async move {
                    ox::hydrate::verify(&s3(&c, &ex), &loaded, None, &Default::default()).await
                })
            })
            .unwrap()
            .unwrap();
        assert!(v.bad.is_empty(), "seed {seed}: verify found {:?}", v.bad);
    }
    let injected = chaos.injected();
    *server.faults.chaos.lock().unwrap() = None;
    println!("faults injected ({} in all): {injected:?}", chaos.total());
    // With the store honest again: every published snapshot is whole and restores the
    // image it was taken of.
    for (i, (key, expected)) in published.iter().enumerate() {
        let (clone, _, _) = clone_of(&env, &config, key, 1000 + i as u32);
        assert!(
            read(&env, &clone, 0, SIZE) == *expected,
            "seed {seed}: snapshot {i}"
        );
    }
    assert!(chaos.total() > 0, "seed {seed}: no fault was injected");
    env.set.shutdown().unwrap();
}
