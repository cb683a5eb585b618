//! A snapshot records where its volume's hosts read (its working set), beside the
//! manifest and never with data; a new clone fetches that first, in few ranged GETs,
//! before anything else in the background. Counted at the S3 test server.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use std::sync::atomic::Ordering;

use ox::hydrate::Warmed;
use support::{CHUNK, clone_s3, env, filled_volume, options, read, snapshot_s3};

const SIZE: u64 = 64 << 20;

#[test]
fn a_snapshot_records_what_hosts_read_and_its_clone_fetches_that_first() {
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let gets = || server.faults.gets.load(Ordering::SeqCst);
    let (vol, handle, image) = filled_volume(&env, SIZE, 47);
    // Writing reads nothing: no working set yet.
    assert!(handle.take_heat().iter().all(|&w| w == 0));

    // A host reads ten adjacent chunks and a few bytes of one more.
    let _ = read(&env, &vol, 100 * CHUNK, 10 * CHUNK);
    let _ = read(&env, &vol, 500 * CHUNK + 4096, 4096);
    let mut opts = options(&env);
    opts.working_set = Some(handle.take_heat());
    let report = snapshot_s3(&env, &config, &handle, None, opts);
    // The snapshot's own reads of the whole volume are not a host's.
    assert!(handle.take_heat().iter().all(|&w| w == 0));

    let (clone, basis, clone_handle) = clone_s3(&env, &config, &report.manifest_key, "c", SIZE);
    let warm = |basis: ox::basis::ObjectBasis, h: bdev::CloneHandle| {
        let on = env.set.handles()[0].clone();
        env.cores
            .run(move |ex| {
                Box::pin(async move {
                    ox::hydrate::warm(&basis, &ex, &h, &on, &ox::hydrate::Thickening::default())
                        .await
                })
            })
            .unwrap()
    };
    let before = gets();
    let warmed = warm(basis.clone(), clone_handle.clone()).unwrap();
    assert_eq!(
        warmed,
        Warmed {
            listed: 11,
            fetched: 11
        }
    );
    let present: Vec<u64> = (0..SIZE / CHUNK)
        .filter(|&c| clone_handle.is_present(c))
        .collect();
    let expected: Vec<u64> = (100..110).chain([500]).collect();
    assert_eq!(present, expected, "exactly the working set");
    // The working set, the index page, and one ranged GET per run of adjacent chunks.
    assert_eq!(gets() - before, 1 + 1 + 2, "GETs");
    // The host's reads of it then cost nothing more, and read the snapshot's bytes.
    let before = gets();
    let at = (100 * CHUNK) as usize;
    assert!(read(&env, &clone, 100 * CHUNK, 10 * CHUNK) == image[at..at + 10 * CHUNK as usize]);
    assert_eq!(gets(), before, "served from the clone");
    // Warming again fetches nothing.
    assert_eq!(
        warm(basis, clone_handle).unwrap(),
        Warmed {
            listed: 11,
            fetched: 0
        }
    );

    // A snapshot without one: nothing to warm, one GET asking.
    let report2 = snapshot_s3(
        &env,
        &config,
        &handle,
        Some(&report.manifest_key),
        options(&env),
    );
    let (_c2, basis2, h2) = clone_s3(&env, &config, &report2.manifest_key, "c2", SIZE);
    let requests = || server.faults.requests.load(Ordering::SeqCst);
    let before = requests();
    assert_eq!(warm(basis2, h2).unwrap(), Warmed::default());
    assert_eq!(requests() - before, 1);

    // The working set is the snapshot's: no collector takes it for an orphan, and a
    // damaged one is refused as damage (the clone still reads as its snapshot).
    let (c, prefix) = (config.clone(), "vol1/".to_string());
    let orphans = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(c, ex).unwrap();
                ox::snapshot::orphans(&store, &prefix).await.unwrap()
            })
        })
        .unwrap();
    assert!(orphans.is_empty(), "{orphans:?}");
    let key = report.manifest.working_set_key().unwrap();
    let path = server.dir.path().join(s3server::BUCKET).join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let (c3, basis3, h3) = clone_s3(&env, &config, &report.manifest_key, "c3", SIZE);
    let e = warm(basis3, h3).unwrap_err();
    assert!(e.to_string().contains("integrity"), "{e}");
    assert!(read(&env, &c3, 100 * CHUNK, 4096) == image[at..at + 4096]);

    // A host that read more than a quarter of the volume (a backup, a scan) leaves no
    // working set: it would say nothing about where to start.
    let _ = read(&env, &vol, 0, SIZE / 2);
    let mut opts = options(&env);
    opts.working_set = Some(handle.take_heat());
    let whole = snapshot_s3(&env, &config, &handle, Some(&report2.manifest_key), opts);
    let stored = |r: &ox::snapshot::SnapshotReport| {
        let key = r.manifest.working_set_key().unwrap();
        server.dir.path().join(s3server::BUCKET).join(key).exists()
    };
    assert!(!stored(&whole), "a scan is not a working set");

    // Retention deletes a deleted snapshot's working set with it, and keeps a live
    // one's.
    let _ = read(&env, &vol, 7 * CHUNK, 4096);
    let mut opts = options(&env);
    opts.working_set = Some(handle.take_heat());
    let live = snapshot_s3(&env, &config, &handle, Some(&whole.manifest_key), opts);
    assert!(stored(&report) && stored(&live));
    let (c, kek, keep) = (config.clone(), env.kek.clone(), live.manifest_key.clone());
    env.cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(c, ex).unwrap();
                ox::retention::sweep(&store, "vol1/", &[kek], &[keep], u64::MAX / 2, 0)
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    assert!(!stored(&report), "deleted with its snapshot");
    assert!(stored(&live), "kept with its snapshot");
}

/// A warm-up the store fails (an outage) is not over: it waits, backing off, and goes
/// on once the store answers again, fetching the whole working set.
#[test]
fn a_warm_up_waits_out_an_outage_and_goes_on() {
    use event_listener::Listener as _;
    let env = env();
    let server = s3server::start_server(false);
    let config = server.client_config();
    let (vol, handle, image) = filled_volume(&env, SIZE, 48);
    let _ = read(&env, &vol, 200 * CHUNK, 6 * CHUNK);
    let mut opts = options(&env);
    opts.working_set = Some(handle.take_heat());
    let report = snapshot_s3(&env, &config, &handle, None, opts);
    let (clone, basis, h) = clone_s3(&env, &config, &report.manifest_key, "c", SIZE);

    // The store goes down; it comes back once the warm-up has failed and is waiting.
    server.faults.unavailable.store(u32::MAX, Ordering::SeqCst);
    let control = ox::hydrate::Thickening::new();
    let restorer = {
        let (control, faults) = (control.clone(), server.faults.clone());
        std::thread::spawn(move || {
            // (Or until the warm-up is over without one: the test then fails below.)
            loop {
                let changed = control.listen();
                if control.setbacks() > 0 || control.is_finished() {
                    break;
                }
                changed.wait();
            }
            faults.unavailable.store(0, Ordering::SeqCst);
        })
    };
    let on = env.set.handles()[0].clone();
    let (c, h2) = (control.clone(), h.clone());
    let warmed = env
        .cores
        .run(move |ex| Box::pin(async move { ox::hydrate::warm(&basis, &ex, &h2, &on, &c).await }))
        .unwrap();
    control.finish();
    restorer.join().unwrap();
    let warmed = warmed.unwrap();
    assert!(control.setbacks() >= 1);
    assert_eq!(
        warmed,
        Warmed {
            listed: 6,
            fetched: 6
        }
    );
    let present: Vec<u64> = (0..SIZE / CHUNK).filter(|&c| h.is_present(c)).collect();
    assert_eq!(present, (200..206).collect::<Vec<_>>());
    let at = (200 * CHUNK) as usize;
    assert!(read(&env, &clone, 200 * CHUNK, 6 * CHUNK) == image[at..at + 6 * CHUNK as usize]);
}
