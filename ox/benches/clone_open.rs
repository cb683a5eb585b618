//! Clone open time, 1 GiB vs 1 TiB volumes holding the same 4 MiB of data, side by side
//! against the S3 test server on loopback: load the manifest (and unwrap its key), then
//! create the clone device over an existing local copy. Alternating iterations; prints
//! medians and the ratio.
//!
//! cargo bench -p ox --bench clone_open [-- --iters 50]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bdev::blocking::run_on;
use bdev::{Basis, BdevIo, IoBuf, Tracking, create_clone, create_malloc, create_volume};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::cores::OxCores;
use ox::keys::{Kek, SecretKey};
use ox::snapshot::{SnapshotOptions, load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::s3::S3Store;
use ox::throttle::Throttle;
use reactor::{CoreList, ReactorConfig, ReactorSet};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = args
        .iter()
        .position(|a| a == "--iters")
        .and_then(|i| args.get(i + 1))
        .map_or(50, |s| s.parse().unwrap());
    let server = s3server::start_server(false);
    let set = ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap();
    let cores = Arc::new(OxCores::start(&[None], 256).unwrap());
    let kek = Kek::new("bench", SecretKey::random().unwrap());
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut keys = Vec::new();
    for (name, size) in [("1 GiB", 1u64 << 30), ("1 TiB", 1u64 << 40)] {
        let (vol, handle) = create_volume(
            name,
            create_malloc("m", 512, size / 512, None).unwrap(),
            64 << 10,
            Tracking::Fresh,
            None,
        )
        .unwrap();
        let io = BdevIo::write(
            (size / 2) / 512,
            data.len() as u64 / 512,
            vec![IoBuf::from_slice(&data)],
        );
        run_on(&set.handles()[0], &vol, io, Duration::from_secs(30))
            .unwrap()
            .result
            .unwrap();
        let (c, r, k) = (
            server.client_config(),
            set.handles()[0].clone(),
            kek.clone(),
        );
        let report = cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = S3Store::new(c, ex).unwrap();
                    let opts = SnapshotOptions {
                        prefix: String::new(),
                        zstd_level: 1,
                        kek: Some(k),
                        object_bytes: 1 << 20,
                        volume_id: [1; 16],
                        volume_name: "bench".into(),
                        progress: Arc::default(),
                        outage_patience: std::time::Duration::from_secs(60),
                        journal: None,
                        store_name: "test".into(),
                        checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
                        verify_before_publish: false,
                        working_set: None,
                        owner: None,
                        clock: Default::default(),
                        encode_on: Default::default(),
                    };
                    snapshot_volume(&store, &r, &handle, None, &opts, &Throttle::default())
                        .await
                        .unwrap()
                })
            })
            .unwrap();
        let local = create_malloc("local", 512, size / 512, None).unwrap();
        keys.push((
            name,
            report.manifest_key,
            local,
            report.manifest.to_bytes().len(),
        ));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(), Vec::new()];
    for _ in 0..iters {
        for (i, (_, key, local, _)) in keys.iter().enumerate() {
            let (c, key, k, cores2) = (
                server.client_config(),
                key.clone(),
                kek.clone(),
                Arc::clone(&cores),
            );
            let local = local.clone();
            let t = cores
                .run(move |ex| {
                    Box::pin(async move {
                        let start = Instant::now();
                        let store = S3Store::new(c.clone(), Rc::clone(&ex)).unwrap();
                        let loaded = load(&store, &key, &[k]).await.unwrap();
                        let factory: StoreFactory = Arc::new(move |ex| {
                            Ok(Rc::new(S3Store::new(c.clone(), Rc::clone(ex))?)
                                as Rc<dyn ObjectStore>)
                        });
                        let basis =
                            ObjectBasis::new(loaded, factory, cores2, Throttle::default(), "bench");
                        let clone =
                            create_clone("c", local, Arc::new(basis) as Arc<dyn Basis>, None)
                                .unwrap();
                        let took = start.elapsed();
                        drop(clone);
                        took
                    })
                })
                .unwrap();
            times[i].push(t);
        }
    }
    println!("| volume | manifest bytes | median open | p90 open |");
    println!("|---|---|---|---|");
    let mut medians = Vec::new();
    for (i, (name, _, _, mbytes)) in keys.iter().enumerate() {
        let t = &mut times[i];
        t.sort();
        let median = t[t.len() / 2];
        medians.push(median);
        println!(
            "| {name} | {mbytes} | {median:.2?} | {:.2?} |",
            t[t.len() * 9 / 10]
        );
    }
    println!(
        "\n1 TiB / 1 GiB open time: x{:.2} ({iters} alternating iterations)",
        medians[1].as_secs_f64() / medians[0].as_secs_f64()
    );
    set.shutdown().unwrap();
}
