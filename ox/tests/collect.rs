//! Collection across a bucket (`ox::collect`) against the S3 test server, its requests
//! counted at the server: what failed uploads left is deleted in every volume place
//! once older than the grace; what a manifest names, what is younger, a place whose
//! upload still holds its lease, and prefixes that are not volume places are left
//! alone; a dry run deletes nothing; the snapshot still reads back whole.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use std::collections::BTreeSet;

use ox::collect::collect;
use ox::lease;
use ox::store::ObjectStore;
use ox::store::s3::S3Store;
use s3server::{Server, served_at, start_server};
use support::servers::with_store;
use support::{clone_s3, env, filled_volume, options, read, snapshot_s3};

/// What a crashed upload leaves in a place: data objects and index pages no manifest
/// names (4 KiB each here).
async fn leftovers(s: &S3Store, place: &str, n: u32) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..n {
        let kind = if i % 2 == 0 { "d" } else { "i" };
        let key = format!("{place}ox1/{kind}/{:032x}", 0xdead_0000 + u64::from(i));
        s.put(&key, vec![i as u8; 4096]).await.unwrap();
        keys.push(key);
    }
    keys
}

#[test]
fn collection_takes_old_orphans_everywhere_and_leaves_uploads_in_progress_alone() {
    let server = start_server(false);
    let config = server.client_config();
    let env = env();
    let size = 8 << 20;
    // vol1/: a published snapshot, and what a crashed upload left beside it.
    let (_vol, handle, image) = filled_volume(&env, size, 41);
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let grace = lease::ORPHAN_GRACE_S;
    let now = lease::now_secs();
    let later = now + grace + 1;
    let (named, gone, kept, other) = with_store(server.client_config(), async |s| {
        let named = s.list("vol1/").await.unwrap();
        let mut gone = leftovers(&s, "vol1/", 6).await;
        // vol2/: an upload in progress (its lease renewed as recently as the collector's
        // clock reads) and what it stored so far.
        let kept = leftovers(&s, "vol2/", 4).await;
        lease::renew(&s, "vol2/", "ab", Some("B"), now, later)
            .await
            .unwrap();
        // vol3/: a writer gone long ago, its lease left behind, and its leftovers.
        gone.extend(leftovers(&s, "vol3/", 3).await);
        lease::renew(&s, "vol3/", "cd", Some("C"), now - 10, now - 10)
            .await
            .unwrap();
        // other/: not a volume place (no ox1/ under it).
        s.put("other/data", vec![1; 10]).await.unwrap();
        (named, gone, kept, vec!["other/data".to_string()])
    });
    let all_keys = |s: &Server| {
        with_store(s.client_config(), async |store| {
            store
                .list("")
                .await
                .unwrap()
                .into_iter()
                .collect::<BTreeSet<_>>()
        })
    };
    let before = all_keys(&server);

    // Now: every leftover is younger than the grace (and both leases are live). Nothing
    // is deleted.
    let young = with_store(server.client_config(), async |s| {
        collect(&s, "", now, false).await.unwrap()
    });
    assert_eq!((young.objects, young.young), (0, 6), "{young:?}");
    assert_eq!(young.skipped.len(), 2, "{young:?}");
    assert_eq!(all_keys(&server), before);

    // Later, dry: what would go, and nothing goes.
    let dry = with_store(server.client_config(), async |s| {
        collect(&s, "", later, true).await.unwrap()
    });
    // vol3's lease, a day old, goes with its leftovers.
    let want: BTreeSet<String> = gone
        .iter()
        .cloned()
        .chain(["vol3/ox1/u/cd".to_string()])
        .collect();
    assert_eq!(dry.keys.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!((dry.objects, dry.bytes, dry.dead_leases), (9, 9 * 4096, 1));
    assert_eq!(all_keys(&server), before);

    // Later, for real, with the requests counted at the server.
    let at = served_at(&server.addr.to_string());
    let done = with_store(server.client_config(), async |s| {
        collect(&s, "", later, false).await.unwrap()
    });
    let served = served_at(&server.addr.to_string());
    eprintln!("{done:?}");
    assert_eq!(done.keys.iter().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!((done.objects, done.bytes, done.places), (9, 9 * 4096, 3));
    // One LIST of the top level and one of each prefix there (other/ is no place),
    // then four per place (leases, manifests, data, index), and one in the place a
    // live lease stops.
    assert_eq!(done.lists, 1 + 4 + 4 * 2 + 1);
    assert_eq!(served.lists - at.lists, done.lists);
    assert_eq!(done.skipped.len(), 1, "{:?}", done.skipped);
    assert_eq!(done.skipped[0].0, "vol2/");
    assert!(
        done.skipped[0].1.contains("appliance B"),
        "{:?}",
        done.skipped
    );
    let after = all_keys(&server);
    for k in named.iter().chain(&kept).chain(&other) {
        assert!(after.contains(k), "{k} was deleted");
    }
    for k in &want {
        assert!(!after.contains(k), "{k} is still there");
    }
    assert!(after.contains("vol2/ox1/u/ab"), "a live lease stays");

    // Once vol2's upload has lapsed, its leftovers go too.
    let much_later = later + grace + 1;
    let last = with_store(server.client_config(), async |s| {
        collect(&s, "", much_later, false).await.unwrap()
    });
    assert_eq!((last.objects, last.dead_leases), (4, 1), "{last:?}");
    assert!(last.skipped.is_empty(), "{:?}", last.skipped);

    // The snapshot reads back whole.
    let (clone, _, _) = clone_s3(&env, &config, &report.manifest_key, "c", size);
    assert!(read(&env, &clone, 0, size) == image, "the clone differs");
    env.set.shutdown().unwrap();
}

/// A manifest that cannot be read leaves its place alone (its objects might be what it
/// names); the other places are collected.
#[test]
fn a_damaged_manifest_leaves_its_place_alone() {
    damaged_record_leaves_its_place_alone(
        "vol1/ox1/m/0123456789abcdef0123456789abcdef",
        b"{not a manifest",
    );
}

/// A lease that cannot be read leaves its place alone (it may be a live upload's).
#[test]
fn a_damaged_lease_leaves_its_place_alone() {
    damaged_record_leaves_its_place_alone("vol1/ox1/u/00ff", b"{ damaged");
}

/// Old leftovers in vol1/ and vol2/, and `body` at `key` in vol1/: vol1/ is left alone
/// and named, vol2/ is collected.
fn damaged_record_leaves_its_place_alone(key: &str, body: &[u8]) {
    let server = start_server(false);
    let later = lease::now_secs() + lease::ORPHAN_GRACE_S + 1;
    let (gone, kept) = with_store(server.client_config(), async |s| {
        let kept = leftovers(&s, "vol1/", 2).await;
        s.put(key, body.to_vec()).await.unwrap();
        (leftovers(&s, "vol2/", 2).await, kept)
    });
    let done = with_store(server.client_config(), async |s| {
        collect(&s, "", later, false).await.unwrap()
    });
    assert_eq!(done.keys, gone, "{done:?}");
    assert_eq!(done.objects, 2, "{done:?}");
    assert_eq!(done.skipped.len(), 1, "{done:?}");
    assert_eq!(done.skipped[0].0, "vol1/");
    assert!(
        done.skipped[0].1.contains("cannot be read"),
        "{:?}",
        done.skipped
    );
    let left = with_store(server.client_config(), async |s| {
        s.list("vol1/").await.unwrap()
    });
    for k in kept {
        assert!(left.contains(&k));
    }
}

/// What a collection costs grows with the places, not the objects: one LIST of the top
/// level and one of each prefix there, and four per place. Counted at the server: 20
/// places, one of them holding 1,200 more leftovers. (The test server answers a
/// listing in one page however long: a server that pages at 1,000 keys costs one LIST
/// more per 1,000 objects in a directory.)
#[test]
fn a_collection_costs_a_few_lists_per_place_whatever_the_objects() {
    let server = start_server(false);
    with_store(server.client_config(), async |s| {
        for v in 0..20 {
            leftovers(&s, &format!("v{v:02}/"), 2).await;
        }
        // 1,200 more data objects in v00/.
        for i in 0..1200u32 {
            let key = format!("v00/ox1/d/{:032x}", 0xbeef_0000 + u64::from(i));
            s.put(&key, vec![7; 64]).await.unwrap();
        }
    });
    let later = lease::now_secs() + lease::ORPHAN_GRACE_S + 1;
    let at = served_at(&server.addr.to_string());
    let done = with_store(server.client_config(), async |s| {
        collect(&s, "", later, false).await.unwrap()
    });
    let served = served_at(&server.addr.to_string());
    eprintln!(
        "{} places, {} objects ({} bytes): {} LISTs, {} GETs, {} DELETE batches",
        done.places, done.objects, done.bytes, done.lists, done.gets, done.deletes
    );
    assert_eq!((done.places, done.objects), (20, 20 * 2 + 1200));
    assert_eq!(done.bytes, 20 * 2 * 4096 + 1200 * 64);
    assert_eq!(done.lists, 1 + 20 + 4 * 20);
    assert_eq!(served.lists - at.lists, done.lists);
    // A batch of up to 1,000 keys a place: v00 holds 1,202.
    assert_eq!((done.gets, done.deletes), (0, 20 + 1));
    let left = with_store(server.client_config(), async |s| s.list("").await.unwrap());
    assert!(left.is_empty(), "{left:?}");
}
