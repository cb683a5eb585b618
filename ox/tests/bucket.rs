//! The bucket as the catalogue, against the S3 test server with its requests counted:
//! browsing costs the same few requests whatever the number of snapshots or objects; a
//! volume's place belongs to one appliance until another adopts it; damaged or
//! misplaced records are refused, not read.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "s3server/mod.rs"]
mod s3server;
mod support;

use ox::OxError;
use ox::bucket::{self, Appliance, SnapshotEntry, VolumeHead};
use ox::store::ObjectStore;
use s3server::{Server, served_at, start_server};
use support::servers::with_store;

fn appliance(name: &str) -> Appliance {
    Appliance {
        id: format!("{name}-0000-4000-8000-000000000000"),
        name: name.into(),
    }
}

fn head(name: &str, id: &str, owner: &str) -> VolumeHead {
    VolumeHead {
        format: bucket::FORMAT,
        volume: id.into(),
        name: name.into(),
        volume_bytes: 1 << 30,
        block_size: 4096,
        chunk_bytes: 1 << 16,
        owner: appliance(owner),
        since: 1,
        adopted_from: None,
        checksum: String::new(),
    }
}

fn entry(h: &VolumeHead, prefix: &str, n: u64) -> SnapshotEntry {
    let snapshot = format!("{n:032x}");
    SnapshotEntry {
        format: bucket::FORMAT,
        manifest: format!("{prefix}ox1/m/{snapshot}"),
        snapshot,
        volume: h.volume.clone(),
        name: h.name.clone(),
        parent: n.checked_sub(1).map(|p| format!("{p:032x}")),
        created_ms: 1_000_000 + n,
        volume_bytes: h.volume_bytes,
        block_size: h.block_size,
        stored_bytes: n * 10,
        appliance: h.owner.clone(),
        kek: Some("k1".into()),
        checksum: String::new(),
    }
}

fn counts(server: &Server) -> (u64, u64) {
    let s = served_at(&server.addr.to_string());
    (s.lists, s.gets)
}

#[test]
fn browsing_costs_the_same_few_requests_at_three_snapshots_or_twelve_hundred() {
    let server = start_server(false);
    let cost = |server: &Server| {
        let before = counts(server);
        let found = with_store(server.client_config(), async |s| {
            bucket::browse(&s, 5).await.unwrap()
        });
        let after = counts(server);
        (found, (after.0 - before.0, after.1 - before.1))
    };
    let (a, b) = (head("db", "aaaa", "east"), head("web", "bbbb", "east"));
    with_store(server.client_config(), async |s| {
        bucket::claim(&s, "db.aaaa/", &a).await.unwrap();
        bucket::claim(&s, "web.bbbb/", &b).await.unwrap();
        for n in 0..3 {
            bucket::record(&s, "db.aaaa/", &entry(&a, "db.aaaa/", n))
                .await
                .unwrap();
        }
        bucket::record(&s, "web.bbbb/", &entry(&b, "web.bbbb/", 0))
            .await
            .unwrap();
        // Objects that are not the catalogue's: data under a volume, and elsewhere.
        for i in 0..50 {
            s.put(&format!("db.aaaa/ox1/d/{i:04}"), vec![1; 10])
                .await
                .unwrap();
        }
        s.put("ox-check/probe", vec![0; 3]).await.unwrap();
    });
    let (few, few_cost) = cost(&server);
    assert_eq!(few.volumes.len(), 2, "{few:?}");
    let db = &few.volumes[0];
    assert_eq!(db.head.name, "db");
    let order: Vec<u64> = db.snapshots.iter().map(|e| e.created_ms).collect();
    assert_eq!(order, [1_000_002, 1_000_001, 1_000_000], "newest first");
    assert!(!db.more);
    assert_eq!(
        db.snapshots[0].parent.as_deref(),
        Some(&*format!("{:032x}", 1))
    );
    // One LIST of the top level, then per volume a GET of its head, a LIST of its
    // newest entries and a GET of each shown.
    assert_eq!(few_cost, (1 + 2, 2 + 3 + 1), "LISTs and GETs");

    with_store(server.client_config(), async |s| {
        for n in 3..1200 {
            bucket::record(&s, "db.aaaa/", &entry(&a, "db.aaaa/", n))
                .await
                .unwrap();
        }
    });
    let (many, many_cost) = cost(&server);
    let db = &many.volumes[0];
    assert!(db.more);
    let order: Vec<u64> = db
        .snapshots
        .iter()
        .map(|e| e.created_ms - 1_000_000)
        .collect();
    assert_eq!(order, [1199, 1198, 1197, 1196, 1195]);
    assert_eq!(
        many_cost,
        (1 + 2, 2 + 5 + 1),
        "browsing 1,200 snapshots costs what 3 did (5 shown instead of 3)"
    );

    // Paging on through every snapshot, older and older.
    let all = with_store(server.client_config(), async |s| {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = bucket::snapshots(&s, &a, "db.aaaa/", after.as_deref(), 500)
                .await
                .unwrap();
            all.extend(page.snapshots.into_iter().map(|e| e.created_ms));
            match page.next {
                Some(n) => after = Some(n),
                None => break all,
            }
        }
    });
    assert_eq!(all.len(), 1200);
    assert!(
        all.windows(2).all(|w| w[0] > w[1]),
        "newest first throughout"
    );

    let latest = with_store(server.client_config(), async |s| {
        bucket::latest(&s, &a, "db.aaaa/").await.unwrap()
    });
    assert_eq!(latest.unwrap().created_ms, 1_001_199);
}

#[test]
fn a_volume_belongs_to_one_appliance_until_another_adopts_it() {
    let server = start_server(false);
    with_store(server.client_config(), async |s| {
        let mine = head("db", "aaaa", "east");
        bucket::claim(&s, "db.aaaa/", &mine).await.unwrap();
        // The owner claims again (renamed): brought up to date.
        let renamed = VolumeHead {
            name: "db2".into(),
            ..mine.clone()
        };
        bucket::claim(&s, "db.aaaa/", &renamed).await.unwrap();
        let now = bucket::head(&s, "db.aaaa/").await.unwrap().unwrap();
        assert_eq!(
            (now.name.as_str(), now.owner.name.as_str()),
            ("db2", "east")
        );

        // Another appliance with the same volume (a copied state directory, say).
        let theirs = head("db", "aaaa", "west");
        match bucket::claim(&s, "db.aaaa/", &theirs).await {
            Err(OxError::Owned { owner_name, .. }) => assert_eq!(owner_name, "east"),
            other => panic!("{other:?}"),
        }
        // Until it adopts the volume explicitly.
        let before = bucket::adopt(&s, "db.aaaa/", None, &appliance("west"), 7)
            .await
            .unwrap();
        assert_eq!(before.owner.name, "east");
        let now = bucket::head(&s, "db.aaaa/").await.unwrap().unwrap();
        assert_eq!(now.owner.name, "west");
        assert_eq!(now.adopted_from.as_ref().unwrap().name, "east");
        assert_eq!(now.since, 7);
        bucket::claim(&s, "db.aaaa/", &theirs).await.unwrap();
        let e = bucket::claim(&s, "db.aaaa/", &mine).await.unwrap_err();
        assert!(e.to_string().contains("belongs to appliance west"), "{e}");
        // Adopting again (a retry after a lost answer, an operator running it twice)
        // changes nothing and keeps who was displaced.
        let again = bucket::adopt(&s, "db.aaaa/", None, &appliance("west"), 8)
            .await
            .unwrap();
        assert_eq!(again.owner.name, "west");
        assert_eq!(again.adopted_from.as_ref().unwrap().name, "east");
        let now = bucket::head(&s, "db.aaaa/").await.unwrap().unwrap();
        assert_eq!(
            (now.since, now.adopted_from.unwrap().name),
            (7, "east".into())
        );
        // A head naming another volume is refused, untouched.
        let e = bucket::adopt(&s, "db.aaaa/", Some("bbbb"), &appliance("north"), 9)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("where bbbb was expected"), "{e}");
        let now = bucket::head(&s, "db.aaaa/").await.unwrap().unwrap();
        assert_eq!(now.owner.name, "west");

        // Adopting what is not there says so.
        assert!(matches!(
            bucket::adopt(&s, "none.0000/", None, &appliance("west"), 7).await,
            Err(OxError::NotFound { .. })
        ));
    });
}

#[test]
fn volumes_are_found_by_name_or_identity_and_a_shared_name_is_refused() {
    let server = start_server(false);
    with_store(server.client_config(), async |s| {
        for (p, h) in [
            ("db.aaaa/", head("db", "aaaa-1", "east")),
            ("db.bbbb/", head("db", "bbbb-2", "west")),
            ("web.cccc/", head("web", "cccc-3", "east")),
        ] {
            bucket::claim(&s, p, &h).await.unwrap();
        }
        let (p, h) = bucket::find(&s, "web").await.unwrap();
        assert_eq!((p.as_str(), h.name.as_str()), ("web.cccc/", "web"));
        let (p, _) = bucket::find(&s, "BBBB2").await.unwrap();
        assert_eq!(p, "db.bbbb/");
        let (p, _) = bucket::find(&s, "db.aaaa").await.unwrap();
        assert_eq!(p, "db.aaaa/");
        let e = bucket::find(&s, "db").await.unwrap_err().to_string();
        assert!(
            e.contains("2 volumes") && e.contains("aaaa-1") && e.contains("bbbb-2"),
            "{e}"
        );
        assert!(matches!(
            bucket::find(&s, "nope").await,
            Err(OxError::NotFound { .. })
        ));
    });
}

#[test]
fn damaged_or_misplaced_records_are_refused_not_read() {
    let server = start_server(false);
    with_store(server.client_config(), async |s| {
        let a = head("db", "aaaa", "east");
        let b = head("web", "bbbb", "east");
        bucket::claim(&s, "db.aaaa/", &a).await.unwrap();
        bucket::claim(&s, "web.bbbb/", &b).await.unwrap();
        let good = entry(&a, "db.aaaa/", 1);
        bucket::record(&s, "db.aaaa/", &good).await.unwrap();
        let key = bucket::entry_key("db.aaaa/", good.created_ms, &good.snapshot);

        // A flipped bit in a value (still valid JSON: only the checksum can tell).
        let mut bytes = s.get(&key).await.unwrap();
        let field = b"\"stored_bytes\": 10";
        let at = bytes.windows(field.len()).position(|w| w == field).unwrap() + field.len() - 1;
        bytes[at] = b'1';
        s.put(&key, bytes).await.unwrap();
        let e = bucket::snapshots(&s, &a, "db.aaaa/", None, 10)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("checksum does not match"), "{e}");
        // An entry pointing at another manifest of the same volume than its own.
        let mut wrong = good.clone();
        wrong.manifest = format!("db.aaaa/ox1/m/{:032x}", 99);
        bucket::record(&s, "db.aaaa/", &wrong).await.unwrap();
        let e = bucket::latest(&s, &a, "db.aaaa/").await.unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        // A damaged entry in one volume does not hide the others from a browse.
        let found = bucket::browse(&s, 3).await.unwrap();
        assert_eq!(found.volumes.len(), 2);
        assert_eq!(found.unreadable.len(), 1);
        assert_eq!(found.unreadable[0].prefix, "db.aaaa/");
        assert!(bucket::find(&s, "web").await.is_ok());
        bucket::record(&s, "db.aaaa/", &good).await.unwrap();
        assert_eq!(
            bucket::latest(&s, &a, "db.aaaa/").await.unwrap().unwrap(),
            SnapshotEntry {
                checksum: bucket::latest(&s, &a, "db.aaaa/")
                    .await
                    .unwrap()
                    .unwrap()
                    .checksum,
                ..good.clone()
            }
        );

        // A whole, honest entry of one volume copied under another: it would point a
        // reader of "web" at db's manifest.
        let stolen = bucket::entry_key("web.bbbb/", good.created_ms, &good.snapshot);
        s.put(&stolen, s.get(&key).await.unwrap()).await.unwrap();
        let e = bucket::latest(&s, &b, "web.bbbb/").await.unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        s.delete(&[stolen]).await.unwrap();

        // A damaged head is reported by a browse, and the other volumes still listed.
        s.put(
            &bucket::head_key("web.bbbb/"),
            b"{\"format\": 1, \"vol".to_vec(),
        )
        .await
        .unwrap();
        let found = bucket::browse(&s, 3).await.unwrap();
        assert_eq!(found.volumes.len(), 1);
        assert_eq!(found.unreadable.len(), 1);
        assert_eq!(found.unreadable[0].prefix, "web.bbbb/");
        // And refused to whoever would snapshot into it.
        assert!(bucket::claim(&s, "web.bbbb/", &b).await.is_err());

        // Forgetting a snapshot removes its entry only.
        bucket::forget(&s, "db.aaaa/", &good.snapshot)
            .await
            .unwrap();
        assert!(bucket::latest(&s, &a, "db.aaaa/").await.unwrap().is_none());
        assert!(bucket::head(&s, "db.aaaa/").await.unwrap().is_some());
    });
}

#[test]
fn a_claim_never_undoes_an_adoption_made_between_its_read_and_its_write() {
    let server = start_server(false);
    with_store(server.client_config(), async |s| {
        let east = head("db", "race-id", "east");
        bucket::claim(&s, "db.race/", &east).await.unwrap();
        // East's next snapshot has a new size to record in the head; west adopts the
        // volume after east read the head and before east writes it.
        let grown = VolumeHead {
            volume_bytes: 2 << 30,
            ..east.clone()
        };
        // (The head's first conditional write is east's; west adopts just before.)
        let west = appliance("west");
        let racing = support::Hooked {
            inner: &s,
            at: "db.race/ox1/volume",
            reads: false,
            hook: std::cell::RefCell::new(Some(Box::pin(async {
                bucket::adopt(&s, "db.race/", None, &west, 9).await.unwrap();
            }))),
        };
        let e = bucket::claim(&racing, "db.race/", &grown)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, OxError::Owned { owner_name, .. } if owner_name == "west"),
            "{e}"
        );
        let now = bucket::head(&s, "db.race/").await.unwrap().unwrap();
        assert_eq!(now.owner.name, "west", "the adoption stands");
        assert_eq!(now.adopted_from.unwrap().name, "east");
        assert_eq!(now.volume_bytes, 1 << 30, "east's write did not land");
        let refused = server
            .faults
            .preconditions_failed
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(refused, 1, "east's conditional write was refused once");
    });
}
