//! What browsing the bucket's catalogue costs as a volume's snapshots pile up, counted
//! at the S3 test server: `ox::bucket::browse` (3 newest per volume) and
//! `ox::bucket::latest` at 10, 1,000 and 10,000 snapshots of one volume beside a few
//! others, side by side with what a catalogue without an index would do — one LIST of
//! every key under the volume (manifests and data objects alike; a real S3 server
//! answers that in pages of 1,000 keys). The volume also holds 4 data objects per
//! snapshot, as a real one holds some.
//!
//! The test server (s3s-fs) ignores max-keys and returns whole listings, so its times
//! grow with the bucket even where the request count does not; request counts are
//! what a real S3 server bills and serves in pages.
//!
//! cargo bench -p ox --bench bucket_browse [-- --snapshots 10,1000,10000]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;

use std::rc::Rc;
use std::time::Instant;

use async_executor::LocalExecutor;
use ox::bucket::{self, Appliance, SnapshotEntry, VolumeHead};
use ox::store::ObjectStore;
use ox::store::s3::S3Store;
use s3server::{Server, served_at};

fn head(name: &str, id: &str) -> VolumeHead {
    VolumeHead {
        format: bucket::FORMAT,
        volume: id.into(),
        name: name.into(),
        volume_bytes: 1 << 40,
        block_size: 4096,
        chunk_bytes: 1 << 16,
        owner: Appliance {
            id: "bench".into(),
            name: "bench".into(),
        },
        since: 0,
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
        parent: None,
        created_ms: 1_000_000 + n,
        volume_bytes: h.volume_bytes,
        block_size: h.block_size,
        stored_bytes: 0,
        appliance: h.owner.clone(),
        kek: None,
        checksum: String::new(),
    }
}

fn counts(server: &Server) -> (u64, u64) {
    let s = served_at(&server.addr.to_string());
    (s.lists, s.gets)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let steps: Vec<u64> = args
        .iter()
        .position(|a| a == "--snapshots")
        .and_then(|i| args.get(i + 1))
        .map_or(vec![10, 1000, 10_000], |s| {
            s.split(',').map(|n| n.parse().unwrap()).collect()
        });
    let server = s3server::start_server(false);
    let ex = Rc::new(LocalExecutor::new());
    let store = S3Store::new(server.client_config(), Rc::clone(&ex)).unwrap();
    let run = |f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>| {
        async_io::block_on(ex.run(f))
    };
    let db = head("db", "db-volume");
    run(Box::pin(async {
        for (p, h) in [("a.0001/", head("a", "a")), ("b.0002/", head("b", "b"))] {
            bucket::claim(&store, p, &h).await.unwrap();
            bucket::record(&store, p, &entry(&h, p, 0)).await.unwrap();
        }
        bucket::claim(&store, "db.0003/", &db).await.unwrap();
    }));
    println!(
        "{:>10}  {:>26}  {:>26}  {:>34}",
        "snapshots",
        "browse: LISTs GETs ms",
        "latest: LISTs GETs ms",
        "LIST every key: pages keys ms"
    );
    let mut have = 0u64;
    for &target in &steps {
        run(Box::pin(async {
            for n in have..target {
                bucket::record(&store, "db.0003/", &entry(&db, "db.0003/", n))
                    .await
                    .unwrap();
                for o in 0..4 {
                    store
                        .put(&format!("db.0003/ox1/d/{n:08}{o:02}"), vec![0; 16])
                        .await
                        .unwrap();
                }
            }
        }));
        have = target;
        let measure = |f: std::pin::Pin<Box<dyn std::future::Future<Output = usize> + '_>>| {
            let before = counts(&server);
            let t = Instant::now();
            let n = run_n(&ex, f);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let after = counts(&server);
            (after.0 - before.0, after.1 - before.1, ms, n)
        };
        let b = measure(Box::pin(async {
            let found = bucket::browse(&store, 3).await.unwrap();
            assert_eq!(found.volumes.len(), 3);
            found.volumes.len()
        }));
        let l = measure(Box::pin(async {
            let latest = bucket::latest(&store, &db, "db.0003/").await.unwrap();
            assert_eq!(latest.unwrap().created_ms, 1_000_000 + target - 1);
            1
        }));
        let all = measure(Box::pin(async {
            store.list("db.0003/").await.unwrap().len()
        }));
        println!(
            "{target:>10}  {:>12} {:>4} {:>8.1}  {:>12} {:>4} {:>8.1}  {:>12} {:>10} {:>8.1}",
            b.0,
            b.1,
            b.2,
            l.0,
            l.1,
            l.2,
            all.3.div_ceil(1000),
            all.3,
            all.2
        );
    }
}

fn run_n<'a>(
    ex: &Rc<LocalExecutor<'static>>,
    f: std::pin::Pin<Box<dyn std::future::Future<Output = usize> + 'a>>,
) -> usize {
    async_io::block_on(ex.run(f))
}
