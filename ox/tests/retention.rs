//! A week of a protection policy on a simulated clock: a snapshot every hour of a volume
//! a host keeps changing, each entered in the bucket's catalogue, then the policy's
//! retention (retire what it no longer keeps, sweep what nothing needs). At the end the
//! bucket lists exactly the grandfather-father-son set (computed here independently),
//! every snapshot left reads back as the volume was at its point, and the store holds
//! nothing that no remaining snapshot needs.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};

use ox::bucket::{self, Appliance, SnapshotEntry, VolumeHead};
use ox::format::Entry;
use ox::policy::Policy;
use ox::retention::{self, Swept};
use ox::snapshot::{load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::local::LocalStore;
use ox::throttle::Throttle;
use support::{CHUNK, env, fresh_volume, options, random, write};

const SIZE: u64 = 16 * CHUNK;
const PREFIX: &str = "vol1/";
const HOUR: u64 = 3600;
/// Monday 2100-01-04 00:00 UTC: the simulated clock runs well after the real one, so
/// manifests (dated by the real clock) are never young to it.
const MONDAY: u64 = 47_485 * 86_400;
const GRACE: u64 = 600;

/// What a week-long grandfather-father-son policy keeps at `now`, worked out by
/// grouping the snapshots by hand (independently of `Policy::keep`).
fn gfs(times: &BTreeMap<String, u64>, p: &Policy) -> BTreeSet<String> {
    let mut newest_first: Vec<(&String, u64)> = times.iter().map(|(k, v)| (k, *v)).collect();
    newest_first.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
    let mut keep: BTreeSet<String> = newest_first
        .iter()
        .take(p.keep_last.max(1) as usize)
        .map(|(k, _)| (*k).clone())
        .collect();
    let by = |len: u64, offset: u64, count: u32, keep: &mut BTreeSet<String>| {
        let mut groups: BTreeMap<u64, (u64, String)> = BTreeMap::new();
        for (k, t) in &newest_first {
            let g = (t + offset) / len;
            let e = groups.entry(g).or_insert((*t, (*k).clone()));
            if *t > e.0 {
                *e = (*t, (*k).clone());
            }
        }
        for (_, (_, k)) in groups.iter().rev().take(count as usize) {
            keep.insert(k.clone());
        }
    };
    by(HOUR, 0, p.hourly, &mut keep);
    by(24 * HOUR, 0, p.daily, &mut keep);
    // Weeks from Monday: 1970-01-01 was a Thursday, 3 days after a Monday.
    by(7 * 24 * HOUR, 3 * 24 * HOUR, p.weekly, &mut keep);
    keep
}

#[test]
fn a_simulated_week_of_a_policy_leaves_exactly_its_set_whole_and_nothing_else() {
    let env = env();
    let (vol, handle) = fresh_volume(SIZE);
    let policy = Policy {
        volume: "vol1".into(),
        store: "local".into(),
        every_s: 2 * HOUR,
        key: None,
        keep_last: 3,
        hourly: 6,
        daily: 3,
        weekly: 2,
        monthly: 0,
    };
    let me = Appliance {
        id: "a".into(),
        name: "a".into(),
    };
    let head = VolumeHead {
        format: bucket::FORMAT,
        volume: "09090909-0909-0909-0909-090909090909".into(),
        name: "vol1".into(),
        volume_bytes: SIZE,
        block_size: 512,
        chunk_bytes: CHUNK,
        owner: me.clone(),
        since: MONDAY,
        adopted_from: None,
        checksum: String::new(),
    };
    let root = env.root.join("store");
    std::fs::create_dir_all(&root).unwrap();
    let mut image = vec![0u8; SIZE as usize];
    // Every snapshot ever taken: its time; and, for those left, the volume at its point.
    let mut times: BTreeMap<String, u64> = BTreeMap::new();
    let mut images: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifests: BTreeMap<String, String> = BTreeMap::new();
    let mut newest: Option<(String, u64)> = None;
    let mut swept = Swept::default();
    let mut now = MONDAY;
    let end = MONDAY + 7 * 24 * HOUR;
    let mut seed = 1u64;
    while now < end {
        // The host changes a few chunks (some partly) before each run.
        for _ in 0..3 {
            seed += 1;
            let chunk = seed * 7 % (SIZE / CHUNK);
            let len = if seed.is_multiple_of(3) {
                4096
            } else {
                CHUNK as usize
            };
            let data = random(len, seed);
            write(&env, &vol, chunk * CHUNK, &data);
            let at = (chunk * CHUNK) as usize;
            image[at..at + len].copy_from_slice(&data);
        }
        assert!(policy.due(newest.as_ref().map(|n| n.1), now) <= now);
        let parent = newest.as_ref().map(|(id, _)| manifests[id].clone());
        let (root2, h, opts, reactor, kek) = (
            root.clone(),
            handle.clone(),
            options(&env),
            env.set.handles()[0].clone(),
            env.kek.clone(),
        );
        let keep_now: Vec<(String, u64)>;
        {
            let (head, me) = (head.clone(), me.clone());
            let (report, entry_time) = env
                .cores
                .run(move |_ex| {
                    Box::pin(async move {
                        let store = LocalStore::open(root2).unwrap();
                        bucket::claim(&store, PREFIX, &head).await.unwrap();
                        let parent = match parent {
                            Some(k) => Some(load(&store, &k, &[kek]).await.unwrap()),
                            None => None,
                        };
                        let r = snapshot_volume(
                            &store,
                            &reactor,
                            &h,
                            parent.as_ref(),
                            &opts,
                            &Throttle::default(),
                        )
                        .await
                        .unwrap();
                        let entry = SnapshotEntry {
                            format: bucket::FORMAT,
                            snapshot: r.manifest.snapshot.clone(),
                            volume: head.volume.clone(),
                            name: "vol1".into(),
                            manifest: r.manifest_key.clone(),
                            parent: parent.map(|p| p.manifest.snapshot),
                            created_ms: now * 1000,
                            volume_bytes: SIZE,
                            block_size: 512,
                            stored_bytes: r.data_bytes,
                            appliance: me,
                            kek: Some("test-kek".into()),
                            checksum: String::new(),
                        };
                        bucket::record(&store, PREFIX, &entry).await.unwrap();
                        (r, now)
                    })
                })
                .unwrap();
            let id = report.manifest.snapshot.clone();
            times.insert(id.clone(), entry_time);
            images.insert(id.clone(), image.clone());
            manifests.insert(id.clone(), report.manifest_key.clone());
            newest = Some((id, now));
            keep_now = images.keys().map(|id| (id.clone(), times[id])).collect();
        }
        // Retention, as the appliance runs it after each policy snapshot.
        let kept: BTreeSet<String> = policy
            .keep(&keep_now)
            .into_iter()
            .map(String::from)
            .collect();
        let retired: Vec<String> = images
            .keys()
            .filter(|id| !kept.contains(*id))
            .cloned()
            .collect();
        for id in &retired {
            images.remove(id);
        }
        let (root2, kek) = (root.clone(), env.kek.clone());
        let s = env
            .cores
            .run(move |_ex| {
                Box::pin(async move {
                    let store = LocalStore::open(root2).unwrap();
                    retention::retire(&store, PREFIX, &retired, now)
                        .await
                        .unwrap();
                    retention::sweep(&store, PREFIX, &[kek], &[], now, GRACE)
                        .await
                        .unwrap()
                })
            })
            .unwrap();
        swept.manifests += s.manifests;
        swept.objects += s.objects;
        swept.pages += s.pages;
        swept.lists += s.lists;
        now += policy.every_s;
    }
    // One more sweep once the last tombstones are past their grace.
    let (root2, kek) = (root.clone(), env.kek.clone());
    let last = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root2).unwrap();
                retention::sweep(&store, PREFIX, &[kek], &[], now + GRACE, GRACE)
                    .await
                    .unwrap()
            })
        })
        .unwrap();
    swept.manifests += last.manifests;
    swept.objects += last.objects;

    // Exactly the set the policy promises.
    let want = gfs(&times, &policy);
    let listed: BTreeSet<String> = images.keys().cloned().collect();
    assert_eq!(listed, want);
    let (root2, kek, head2) = (root.clone(), env.kek.clone(), head.clone());
    let (in_bucket, left, needed) = env
        .cores
        .run(move |_ex| {
            Box::pin(async move {
                let store = LocalStore::open(root2).unwrap();
                let page = bucket::snapshots(&store, &head2, PREFIX, None, 1000)
                    .await
                    .unwrap();
                let in_bucket: BTreeSet<String> =
                    page.snapshots.iter().map(|e| e.snapshot.clone()).collect();
                // Every snapshot left reads back whole; what it needs is recorded.
                let mut left = BTreeMap::new();
                let mut needed: BTreeSet<String> = [bucket::head_key(PREFIX)].into();
                for e in &page.snapshots {
                    needed.insert(bucket::entry_key(PREFIX, e.created_ms, &e.snapshot));
                    let l = load(&store, &e.manifest, std::slice::from_ref(&kek))
                        .await
                        .unwrap();
                    needed.insert(e.manifest.clone());
                    // Retired ancestors stay as keys (manifest and tombstone) while a
                    // snapshot left names them: decoding its frames needs their keys.
                    for a in &l.manifest.lineage {
                        needed.insert(a.manifest.clone());
                        if !page.snapshots.iter().any(|s| s.snapshot == a.snapshot) {
                            needed.insert(format!("{PREFIX}ox1/t/{}", a.snapshot));
                        }
                    }
                    let mut bytes = vec![0u8; SIZE as usize];
                    for page in 0..l.manifest.page_count() {
                        if !l.manifest.page_is_empty(page) {
                            needed.insert(l.manifest.page_key(page).unwrap());
                        }
                        let (p, _) = l.page(&store, page, None).await.unwrap();
                        for (i, entry) in p.entries.into_iter().enumerate() {
                            let chunk = page * 16384 + i as u64;
                            if let Entry::Frame { source, object, .. } = entry {
                                let objects = &l.sources[usize::from(source)].objects;
                                needed.insert(objects[object as usize].clone());
                            }
                            if let Some(d) =
                                l.chunk(&store, chunk, entry, None, |_| {}).await.unwrap()
                            {
                                let at = (chunk * CHUNK) as usize;
                                bytes[at..at + d.len()].copy_from_slice(&d);
                            }
                        }
                    }
                    left.insert(e.snapshot.clone(), bytes);
                }
                (in_bucket, left, needed)
            })
        })
        .unwrap();
    assert_eq!(in_bucket, want, "the bucket's catalogue lists the same set");
    for (id, bytes) in &left {
        assert!(
            *bytes == images[id],
            "snapshot {id} reads back as the volume at its point"
        );
    }
    // Nothing in the store that no remaining snapshot needs.
    let all: BTreeSet<String> = LocalStore::open(root.clone())
        .map(|s| {
            async_io::block_on(s.list(PREFIX))
                .unwrap()
                .into_iter()
                .collect()
        })
        .unwrap();
    let extra: Vec<&String> = all.difference(&needed).collect();
    assert!(extra.is_empty(), "left behind: {extra:?}");
    let missing: Vec<&String> = needed.difference(&all).collect();
    assert!(missing.is_empty(), "needed but gone: {missing:?}");
    println!(
        "a week at {} s: {} snapshots taken, {} kept; swept {} manifests, {} index pages, \
         {} data objects with {} LISTs; {} objects left ({} of them kept as the keys of \
         retired ancestors)",
        policy.every_s,
        times.len(),
        want.len(),
        swept.manifests,
        swept.pages,
        swept.objects,
        swept.lists,
        all.len(),
        all.iter().filter(|k| k.contains("/ox1/t/")).count() * 2
    );
}

/// Runs `f` with the local store of `env` on an OX core.
fn on_store<T: Send + 'static>(
    env: &support::Env,
    f: impl AsyncFnOnce(LocalStore) -> T + Send + 'static,
) -> T {
    let root = env.root.join("store");
    std::fs::create_dir_all(&root).unwrap();
    env.cores
        .run(move |_ex| Box::pin(async move { f(LocalStore::open(root).unwrap()).await }))
        .unwrap()
}

/// Snapshots the volume of `handle` into the local store of `env` with `opts`,
/// incrementally over the snapshot `parent` (a manifest key) if given; its report.
fn take(
    env: &support::Env,
    handle: &bdev::VolumeHandle,
    parent: Option<String>,
    opts: ox::snapshot::SnapshotOptions,
) -> ox::snapshot::SnapshotReport {
    let (h, reactor, kek) = (
        handle.clone(),
        env.set.handles()[0].clone(),
        env.kek.clone(),
    );
    on_store(env, async move |store| {
        let parent = match parent {
            Some(k) => Some(load(&store, &k, &[kek]).await.unwrap()),
            None => None,
        };
        snapshot_volume(
            &store,
            &reactor,
            &h,
            parent.as_ref(),
            &opts,
            &Throttle::default(),
        )
        .await
        .unwrap()
    })
}

/// A sweep at `now` with snapshot `live` named live by the caller.
async fn sweep_at(store: &LocalStore, kek: &ox::keys::Kek, live: &str, now: u64) -> Swept {
    retention::sweep(
        store,
        PREFIX,
        std::slice::from_ref(kek),
        &[live.to_string()],
        now,
        GRACE,
    )
    .await
    .unwrap()
}

/// How many of the data objects manifest `m` names are in the store.
async fn objects(store: &LocalStore, m: &str) -> usize {
    let text = store.get(m).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let mut present = 0;
    for o in v["objects"].as_array().unwrap() {
        if store.get(o.as_str().unwrap()).await.is_ok() {
            present += 1;
        }
    }
    present
}

/// The volume as snapshot `manifest` holds it.
async fn read_back(store: &LocalStore, manifest: &str, kek: &ox::keys::Kek) -> Vec<u8> {
    let l = load(store, manifest, std::slice::from_ref(kek))
        .await
        .unwrap();
    let mut bytes = vec![0u8; SIZE as usize];
    let (p, _) = l.page(store, 0, None).await.unwrap();
    for (chunk, entry) in p.entries.into_iter().enumerate() {
        if let Some(d) = l
            .chunk(store, chunk as u64, entry, None, |_| {})
            .await
            .unwrap()
        {
            let at = chunk * CHUNK as usize;
            bytes[at..at + d.len()].copy_from_slice(&d);
        }
    }
    bytes
}

#[test]
fn held_and_recently_retired_snapshots_are_kept_and_ancestors_keep_only_live_frames() {
    let env = env();
    let (vol, handle) = fresh_volume(SIZE);
    let mut image = vec![0u8; SIZE as usize];
    let mut taken: Vec<(String, Vec<u8>)> = Vec::new();
    // s1 writes every chunk, s2 rewrites every chunk, s3 rewrites the first half: s3
    // reads half its chunks from s2's objects and none from s1's.
    for (n, chunks) in [(1u64, 16u64), (2, 16), (3, 8)] {
        for c in 0..chunks {
            let data = random(CHUNK as usize, n * 100 + c);
            write(&env, &vol, c * CHUNK, &data);
            image[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize].copy_from_slice(&data);
        }
        let parent = taken.last().map(|t| t.0.clone());
        let mut opts = options(&env);
        // Two frames per object, so an ancestor's objects can be partly in use.
        opts.object_bytes = 2 * CHUNK as usize;
        let key = take(&env, &handle, parent, opts).manifest_key;
        taken.push((key, image.clone()));
    }
    let id = |key: &str| key.rsplit('/').next().unwrap().to_string();
    let (s1, s2, s3) = (taken[0].0.clone(), taken[1].0.clone(), taken[2].0.clone());
    let kek = env.kek.clone();
    let (a, b, c) = (s1.clone(), s2.clone(), s3.clone());
    let images: Vec<Vec<u8>> = taken.iter().map(|t| t.1.clone()).collect();
    on_store(&env, async move |store| {
        let now = MONDAY;
        // Another appliance serves a clone of s1.
        let holder = Appliance {
            id: "b".into(),
            name: "b".into(),
        };
        retention::hold(
            &store,
            PREFIX,
            &retention::Hold {
                manifest: a.clone(),
                appliance: holder.clone(),
                clone: "c1".into(),
                since: now,
            },
        )
        .await
        .unwrap();
        retention::retire(&store, PREFIX, &[id(&a), id(&b)], now)
            .await
            .unwrap();
        let before = (objects(&store, &a).await, objects(&store, &b).await);
        assert_eq!(before, (8, 8));
        // Within the grace period: nothing of them goes (a reader may be opening one).
        let s = sweep_at(&store, &kek, &c, now + GRACE - 1).await;
        assert_eq!((s.manifests, s.objects, s.pages), (0, 0, 0), "{s:?}");
        // After it: s1 is held, so whole; s2 is only s3's ancestor, so it keeps the
        // objects s3's frames are in (4 of its 8) and loses its index.
        let s = sweep_at(&store, &kek, &c, now + GRACE).await;
        assert_eq!((s.manifests, s.objects, s.pages), (0, 4, 1), "{s:?}");
        assert_eq!(
            (objects(&store, &a).await, objects(&store, &b).await),
            (8, 4)
        );
        assert_eq!(
            read_back(&store, &a, &kek).await,
            images[0],
            "the held one whole"
        );
        assert_eq!(
            read_back(&store, &c, &kek).await,
            images[2],
            "the live one whole"
        );
        // The clone goes: s1 is s3's ancestor too, but none of its frames is in use.
        retention::release(&store, PREFIX, "b", "c1").await.unwrap();
        let s = sweep_at(&store, &kek, &c, now + GRACE).await;
        assert_eq!(
            (s.manifests, s.objects, s.pages, s.ancestors),
            (0, 8, 1, 2),
            "{s:?}"
        );
        assert_eq!(read_back(&store, &c, &kek).await, images[2]);
        // A sweep finds nothing more to do.
        let s = sweep_at(&store, &kek, &c, now + GRACE).await;
        assert_eq!((s.manifests, s.objects, s.pages), (0, 0, 0), "{s:?}");
        // With s3 retired too, everything goes.
        retention::retire(&store, PREFIX, &[id(&c)], now)
            .await
            .unwrap();
        let s = retention::sweep(
            &store,
            PREFIX,
            std::slice::from_ref(&kek),
            &[],
            now + GRACE,
            GRACE,
        )
        .await
        .unwrap();
        assert_eq!(s.manifests, 3, "{s:?}");
        let left = store.list(PREFIX).await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    });
    drop(vol);
}

#[test]
fn a_sweep_never_deletes_what_live_snapshots_need_whatever_the_store_says() {
    let env = env();
    let (vol, handle) = fresh_volume(SIZE);
    let mut keys: Vec<String> = Vec::new();
    let mut image = vec![0u8; SIZE as usize];
    for n in 1..=3u64 {
        let data = random(CHUNK as usize, n);
        write(&env, &vol, (n % 4) * CHUNK, &data);
        image[((n % 4) * CHUNK) as usize..((n % 4 + 1) * CHUNK) as usize].copy_from_slice(&data);
        let parent = keys.last().cloned();
        keys.push(take(&env, &handle, parent, options(&env)).manifest_key);
    }
    let id = |key: &str| key.rsplit('/').next().unwrap().to_string();
    let (s1, s2, s3) = (keys[0].clone(), keys[1].clone(), keys[2].clone());
    let kek = env.kek.clone();
    on_store(&env, async move |store| {
        let keks = std::slice::from_ref(&kek);
        let count = async |store: &LocalStore| store.list(PREFIX).await.unwrap().len();
        // Just written, with no entry yet (as between a manifest and its entry): young
        // manifests are live, so a sweep now takes nothing.
        let real_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let before = count(&store).await;
        let s = retention::sweep(&store, PREFIX, keks, &[], real_now, GRACE)
            .await
            .unwrap();
        assert_eq!((s.manifests, s.objects, s.pages), (0, 0, 0), "{s:?}");
        assert_eq!(count(&store).await, before);

        // A retired snapshot's manifest edited to name s3's objects as its own (its
        // checksum made again): s3 stores them, so they stay.
        let m2 = store.get(&s2).await.unwrap();
        let mut m = ox::format::Manifest::from_bytes(&m2).unwrap();
        let m3 = ox::format::Manifest::from_bytes(&store.get(&s3).await.unwrap()).unwrap();
        m.objects.extend(m3.objects.iter().cloned());
        store.put(&s2, m.to_bytes()).await.unwrap();
        // The same manifest under a key that is not its own is nobody's to judge.
        let stray = format!("{PREFIX}ox1/m/{:032x}", 7);
        store.put(&stray, m.to_bytes()).await.unwrap();
        retention::retire(&store, PREFIX, &[id(&s2)], MONDAY)
            .await
            .unwrap();
        let s = sweep_at(&store, &kek, &s3, MONDAY + GRACE).await;
        assert_eq!(s.manifests, 0, "s2 is s3's ancestor: {s:?}");
        for o in &m3.objects {
            assert!(
                store.get(o).await.is_ok(),
                "{o} of the live snapshot is gone"
            );
        }
        assert!(
            store.get(&stray).await.is_ok(),
            "the stray manifest is left alone"
        );
        store.put(&s2, m2).await.unwrap();
        assert_eq!(read_back(&store, &s3, &kek).await, image);

        // An ancestor's manifest lost: what s3 needs is unknown, so nothing goes.
        let m1 = store.get(&s1).await.unwrap();
        store.delete(std::slice::from_ref(&s1)).await.unwrap();
        let before = count(&store).await;
        let e = retention::sweep(
            &store,
            PREFIX,
            keks,
            std::slice::from_ref(&s3),
            MONDAY + GRACE,
            GRACE,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ox::OxError::NotFound { .. }), "{e}");
        assert_eq!(count(&store).await, before, "nothing deleted");
        store.put(&s1, m1).await.unwrap();
        assert_eq!(read_back(&store, &s3, &kek).await, image);
    });
    drop(vol);
}

#[test]
fn an_adopter_enters_what_the_owner_before_published_and_never_listed() {
    // The volume identity `options` gives snapshots ([9; 16]), as a UUID.
    const VOLUME: &str = "09090909-0909-0909-0909-090909090909";
    let env = env();
    let (vol, handle) = fresh_volume(SIZE);
    let mut keys: Vec<String> = Vec::new();
    let mut objects: Vec<Vec<String>> = Vec::new();
    for i in 0..4u64 {
        write(&env, &vol, 0, &random(4096, i));
        let report = take(&env, &handle, keys.last().cloned(), options(&env));
        keys.push(report.manifest_key);
        objects.push(report.manifest.objects.clone());
    }
    let id_of = |k: &str| k.rsplit('/').next().unwrap().to_string();
    let ids: Vec<String> = keys.iter().map(|k| id_of(k)).collect();
    let unlisted = ids[2].clone();
    let owner = Appliance {
        id: "east-0000-4000-8000-000000000000".into(),
        name: "east".into(),
    };
    // The first is listed, the second retired; the third never got its entry; the
    // fourth neither, but a data object of it is gone (as a sweep leaves an ancestor
    // kept only for its key).
    let broken = objects[3].clone();
    let (entered, again, other) = on_store(&env, async move |store| {
        let entry = SnapshotEntry {
            format: bucket::FORMAT,
            snapshot: ids[0].clone(),
            volume: VOLUME.into(),
            name: "vol1".into(),
            manifest: keys[0].clone(),
            parent: None,
            created_ms: 1_000_000,
            volume_bytes: SIZE,
            block_size: 512,
            stored_bytes: 1,
            appliance: owner.clone(),
            kek: None,
            checksum: String::new(),
        };
        bucket::record(&store, PREFIX, &entry).await.unwrap();
        retention::retire(&store, PREFIX, &[ids[1].clone()], 5)
            .await
            .unwrap();
        store.delete(&broken[..1]).await.unwrap();
        let entered = retention::enter_unlisted(&store, PREFIX, VOLUME, "vol1", &owner)
            .await
            .unwrap();
        // Entered once: a second pass finds nothing more to enter.
        let again = retention::enter_unlisted(&store, PREFIX, VOLUME, "vol1", &owner)
            .await
            .unwrap();
        // A manifest of another volume, or one whose objects are gone (a sweep kept
        // only an ancestor's key), is not entered.
        let other = retention::enter_unlisted(
            &store,
            PREFIX,
            "22222222-2222-2222-2222-222222222222",
            "vol1",
            &owner,
        )
        .await
        .unwrap();
        (entered, again, other)
    });
    assert_eq!(
        entered.entered,
        vec![unlisted],
        "only the unlisted, unretired, whole one"
    );
    assert_eq!(entered.skipped.len(), 1, "{entered:?}");
    assert!(entered.skipped[0].1.contains("not whole"), "{entered:?}");
    assert!(again.entered.is_empty(), "{again:?}");
    assert!(other.entered.is_empty(), "{other:?}");
    assert!(
        other.skipped.iter().any(|(_, why)| why.contains("another")),
        "{other:?}"
    );
}
