//! The product's promise, end to end: a 1 TiB sparse volume holding a 10 MiB extent
//! (plus scattered data), written over NVMe/TCP by `oxperf --verify`; a snapshot into a
//! real S3 server (s3s-fs on loopback); a clone of it served over NVMe/TCP; the extent
//! read back and verified by `oxperf`, moving about 10 MiB from the object store
//! (thickening is not running).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../../ox/tests/s3server/mod.rs"]
mod s3server;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bdev::{
    Basis, Bdev, CloneHandle, Tracking, VolumeHandle, create_clone, create_malloc, create_volume,
};
use nvmf::{HostPolicy, Limits, Namespace, Subsystem, Target, TargetConfig};
use ox::basis::{ObjectBasis, StoreFactory};
use ox::cores::OxCores;
use ox::keys::{Kek, SecretKey};
use ox::snapshot::{Loaded, SnapshotOptions, SnapshotReport, load, snapshot_volume};
use ox::store::ObjectStore;
use ox::store::s3::S3Store;
use ox::throttle::Throttle;
use reactor::{CoreList, ReactorConfig, ReactorSet};

const TIB: u64 = 1 << 40;
const CHUNK: u64 = 64 << 10;
/// The extent: 10 MiB starting at 300 GiB (in 512-byte blocks).
const EXTENT_LBA: u64 = (300 << 30) / 512;
const EXTENT_BLOCKS: u64 = (10 << 20) / 512;

fn oxperf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_oxperf"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "oxperf failed:\n{text}");
    text
}

fn serve(set: &ReactorSet, nqn: &str, dev: Bdev) -> (Target, SocketAddr) {
    let config = TargetConfig {
        subsystems: vec![Subsystem {
            nqn: nqn.into(),
            serial: "OXE2E".into(),
            model: "OX e2e".into(),
            hosts: HostPolicy::Any,
            namespaces: vec![Namespace::new(1, dev)],
            listeners: vec!["127.0.0.1:0".parse().unwrap()],
            host_keys: Vec::new(),
        }],
        discovery_listeners: vec![],
        limits: Limits::default(),
        socket_io: Default::default(),
        health: Default::default(),
    };
    let t = Target::start(config, set.handles()).unwrap();
    let addr = t.local_addrs()[0];
    (t, addr)
}

/// What every test here runs on: the S3 test server, reactors, one OX core, a KEK.
struct World {
    server: s3server::Server,
    set: ReactorSet,
    cores: Arc<OxCores>,
    kek: Kek,
}

impl World {
    fn new() -> Self {
        Self {
            server: s3server::start_server(false),
            set: ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap(),
            cores: Arc::new(OxCores::start(&[None], 1024).unwrap()),
            kek: Kek::new("e2e-kek", SecretKey::random().unwrap()),
        }
    }

    /// Snapshots the volume into S3 under `prefix`.
    fn snapshot(&self, handle: &VolumeHandle, prefix: &str, volume_id: u8) -> SnapshotReport {
        let (config, reactor, h, k) = (
            self.server.client_config(),
            self.set.handles()[0].clone(),
            handle.clone(),
            self.kek.clone(),
        );
        let prefix = prefix.to_string();
        self.cores
            .run(move |ex| {
                Box::pin(async move {
                    let store = S3Store::new(config, ex).unwrap();
                    let opts = SnapshotOptions {
                        prefix,
                        zstd_level: 1,
                        kek: Some(k),
                        // Small objects: whole-object GETs are hashed by the test server.
                        object_bytes: 1 << 20,
                        volume_id: [volume_id; 16],
                        volume_name: "vol".into(),
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
                    snapshot_volume(&store, &reactor, &h, None, &opts, &Throttle::default())
                        .await
                        .unwrap()
                })
            })
            .unwrap()
    }

    /// Loads the snapshot's manifest from S3.
    fn load(&self, key: &str) -> Loaded {
        let (config, key, k) = (
            self.server.client_config(),
            key.to_string(),
            self.kek.clone(),
        );
        self.cores
            .run(move |ex| {
                Box::pin(async move {
                    load(&S3Store::new(config, ex).unwrap(), &key, &[k])
                        .await
                        .unwrap()
                })
            })
            .unwrap()
    }

    /// A clone of `loaded` over a fresh RAM copy of `size` bytes.
    fn clone_of(&self, loaded: Loaded, size: u64) -> (Bdev, CloneHandle, ObjectBasis) {
        let config = self.server.client_config();
        let factory: StoreFactory = Arc::new(move |ex| {
            Ok(Rc::new(S3Store::new(config.clone(), Rc::clone(ex))?) as Rc<dyn ObjectStore>)
        });
        let basis = ObjectBasis::new(
            loaded,
            factory,
            Arc::clone(&self.cores),
            Throttle::default(),
            "clone",
        );
        let local = create_malloc("clone-local", 512, size / 512, None).unwrap();
        let (clone, handle) = create_clone(
            "clone",
            local,
            Arc::new(basis.clone()) as Arc<dyn Basis>,
            None,
        )
        .unwrap();
        (clone, handle, basis)
    }
}

#[test]
fn reading_10_mib_of_a_1_tib_clone_moves_about_10_mib() {
    let world = World::new();
    let (server, set) = (&world.server, &world.set);
    let core = CoreList::available().last().unwrap().to_string();

    // 1. A fresh 1 TiB volume, written over NVMe/TCP.
    let (vol, handle) = create_volume(
        "vol",
        create_malloc("vol-ram", 512, TIB / 512, None).unwrap(),
        CHUNK,
        Tracking::Fresh,
        None,
    )
    .unwrap();
    let (src_target, src) = serve(set, "nqn.2026-11.io.ox:e2e-src", vol);
    let src_arg = format!("{src},nqn.2026-11.io.ox:e2e-src,1");
    let range = format!("{EXTENT_LBA}:{EXTENT_BLOCKS}");
    ok(&oxperf(&[
        "run", "--target", &src_arg, "-w", "write", "--bs", "131072", "--range", &range, "--ios",
        "80", "--verify", "--cores", &core, "--quiet",
    ]));
    // Scattered other data elsewhere on the volume.
    ok(&oxperf(&[
        "run",
        "--target",
        &src_arg,
        "-w",
        "randwrite",
        "--bs",
        "4096",
        "--range",
        "0:2000000000",
        "--ios",
        "64",
        "--cores",
        &core,
        "--quiet",
    ]));

    // 2. Snapshot into S3.
    let report = world.snapshot(&handle, "e2e/", 0xE2);
    assert_eq!(report.chunks_read, 160 + 64, "only written chunks are read");

    // 3. Clone it and serve the clone.
    let requests_before_open = server.faults.requests.load(Ordering::SeqCst);
    let loaded = world.load(&report.manifest_key);
    assert_eq!(
        server.faults.requests.load(Ordering::SeqCst) - requests_before_open,
        1,
        "opening a 1 TiB clone is one GET"
    );
    let (clone, clone_handle, basis) = world.clone_of(loaded, TIB);
    // The clone's own read-ahead (8 MiB), however long the test server's GETs take.
    clone_handle.set_read_ahead(128);
    let (clone_target, dst) = serve(set, "nqn.2026-11.io.ox:e2e-clone", clone);

    // 4. Read the extent from the clone over NVMe/TCP and verify every block.
    let out = oxperf(&[
        "run",
        "--target",
        &format!("{dst},nqn.2026-11.io.ox:e2e-clone,1"),
        "-w",
        "read",
        "--bs",
        "131072",
        "--range",
        &range,
        "--ios",
        "80",
        "--verify",
        "--cores",
        &core,
        "--json",
    ]);
    ok(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["verified_blocks"], EXTENT_BLOCKS);
    assert_eq!(r["unwritten_blocks"], 0);
    assert!(r["mismatch"].is_null());

    // 5. What moved from the object store: about the 10 MiB read, not the volume.
    let c = basis.counters();
    let moved = c.frame_bytes.load(Ordering::SeqCst) + c.page_bytes.load(Ordering::SeqCst);
    eprintln!(
        "fetched {} frames in {} GETs ({} bytes) and {} index page(s) ({} bytes): {:.3} MiB in all",
        c.frames.load(Ordering::SeqCst),
        c.frame_gets.load(Ordering::SeqCst),
        c.frame_bytes.load(Ordering::SeqCst),
        c.page_gets.load(Ordering::SeqCst),
        c.page_bytes.load(Ordering::SeqCst),
        moved as f64 / 1048576.0
    );
    assert!(
        moved <= (10 << 20) + (512 << 10),
        "moved {moved} bytes for a 10 MiB read"
    );
    assert_eq!(c.frames.load(Ordering::SeqCst), 160);
    assert_eq!(
        c.page_gets.load(Ordering::SeqCst),
        1,
        "concurrent misses share one page load"
    );
    // The extent's 160 chunks, plus up to a read-ahead window (128 chunks) past its
    // end (zero chunks there, answered without any GET).
    let (present, total) = clone_handle.hydration();
    assert_eq!(total, TIB / CHUNK);
    assert!((160..=288).contains(&present), "{present} chunks present");
    drop((src_target, clone_target));
}

#[test]
fn a_damaged_object_reaches_the_host_as_a_media_error_not_data() {
    let world = World::new();
    let (server, set) = (&world.server, &world.set);
    let core = CoreList::available().last().unwrap().to_string();
    let size = 64u64 << 20;
    let (vol, handle) = create_volume(
        "vol",
        create_malloc("vol-ram", 512, size / 512, None).unwrap(),
        CHUNK,
        Tracking::Fresh,
        None,
    )
    .unwrap();
    let (src_target, src) = serve(set, "nqn.2026-11.io.ox:dmg-src", vol);
    ok(&oxperf(&[
        "run",
        "--target",
        &format!("{src},nqn.2026-11.io.ox:dmg-src,1"),
        "-w",
        "write",
        "--bs",
        "65536",
        "--range",
        "0:8192",
        "--ios",
        "64",
        "--verify",
        "--cores",
        &core,
        "--quiet",
    ]));
    let report = world.snapshot(&handle, "dmg/", 0xD1);
    // Flip a byte inside the first data object, on the server's disk.
    let path = server
        .dir
        .path()
        .join(s3server::BUCKET)
        .join(&report.manifest.objects[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let (clone, _, _) = world.clone_of(world.load(&report.manifest_key), size);
    let (clone_target, dst) = serve(set, "nqn.2026-11.io.ox:dmg-clone", clone);
    let out = oxperf(&[
        "run",
        "--target",
        &format!("{dst},nqn.2026-11.io.ox:dmg-clone,1"),
        "-w",
        "read",
        "--bs",
        "65536",
        "--range",
        "0:8192",
        "--ios",
        "64",
        "--qd",
        "1",
        "--verify",
        "--cores",
        &core,
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "command errors, not a verify mismatch:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["mismatch"].is_null(), "never wrong data");
    assert!(r["total"]["errors"].as_u64().unwrap() >= 1);
    let first = r["first_error"].as_str().unwrap();
    assert!(
        first.contains("unrecovered read error") && first.contains("LBA 0"),
        "{first}"
    );
    assert!(
        r["verified_blocks"].as_u64().unwrap() > 0,
        "the undamaged chunks read fine"
    );
    drop((src_target, clone_target));
}
