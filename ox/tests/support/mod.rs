//! What the `ox` integration tests share: reactors and OX cores, a key, volumes over
//! RAM, block reads and writes, random data, snapshot options.
#![allow(dead_code)]

pub mod servers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bdev::blocking::run_on;
use bdev::{Bdev, BdevIo, IoBuf, Tracking, VolumeHandle, create_malloc, create_volume};
use ox::cores::OxCores;
use ox::keys::{Kek, SecretKey};
use ox::snapshot::SnapshotOptions;
use reactor::{CoreList, ReactorConfig, ReactorSet};

pub const CHUNK: u64 = 64 << 10;
pub const T: Duration = Duration::from_secs(30);

pub struct Env {
    pub set: ReactorSet,
    pub cores: Arc<OxCores>,
    pub root: PathBuf,
    pub kek: Kek,
    pub _dir: tempfile::TempDir,
}

pub fn env() -> Env {
    env_with_cores(1)
}

/// The same with `ox_cores` OX cores (a snapshot encodes on all of them).
pub fn env_with_cores(ox_cores: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    Env {
        set: ReactorSet::start(ReactorConfig::new(CoreList::all_available().unwrap())).unwrap(),
        cores: Arc::new(OxCores::start(&vec![None; ox_cores], 256).unwrap()),
        root: dir.path().to_path_buf(),
        kek: Kek::new("test-kek", SecretKey::random().unwrap()),
        _dir: dir,
    }
}

pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn write(env: &Env, dev: &Bdev, off: u64, data: &[u8]) {
    let io = BdevIo::write(
        off / 512,
        data.len() as u64 / 512,
        vec![IoBuf::from_slice(data)],
    );
    run_on(&env.set.handles()[0], dev, io, T)
        .unwrap()
        .result
        .unwrap();
}

pub fn read(env: &Env, dev: &Bdev, off: u64, len: u64) -> Vec<u8> {
    let io = BdevIo::read(off / 512, len / 512, vec![IoBuf::new(len as usize)]);
    let c = run_on(&env.set.handles()[env.set.len() - 1], dev, io, T).unwrap();
    let d = c.data();
    c.result.unwrap();
    d
}

/// A fresh tracked volume of `size` bytes over RAM, 512-byte blocks.
pub fn fresh_volume(size: u64) -> (Bdev, VolumeHandle) {
    create_volume(
        "vol1",
        create_malloc("m", 512, size / 512, None).unwrap(),
        CHUNK,
        Tracking::Fresh,
        None,
    )
    .unwrap()
}

/// A tracked volume of `size` bytes filled with random bytes from `seed` (1 MiB at a
/// time), and those bytes.
pub fn filled_volume(env: &Env, size: u64, seed: u64) -> (Bdev, VolumeHandle, Vec<u8>) {
    let (vol, handle) = fresh_volume(size);
    let image = random(size as usize, seed);
    for (i, piece) in image.chunks(1 << 20).enumerate() {
        write(env, &vol, (i as u64) << 20, piece);
    }
    (vol, handle, image)
}

pub fn options(env: &Env) -> SnapshotOptions {
    SnapshotOptions {
        prefix: "vol1/".into(),
        zstd_level: 1,
        kek: Some(env.kek.clone()),
        object_bytes: 1 << 20,
        volume_id: [9; 16],
        volume_name: "vol1".into(),
        progress: Arc::default(),
        outage_patience: std::time::Duration::from_secs(60),
        journal: None,
        store_name: "test".into(),
        checkpoint_every: ox::snapshot::CHECKPOINT_EVERY,
        verify_before_publish: false,
        working_set: None,
        owner: None,
        clock: Default::default(),
        encode_on: env.cores.set(),
    }
}

/// Snapshots the volume of `handle` into the S3 store of `config`, incrementally over
/// the snapshot `parent` (a manifest key) if given.
pub fn snapshot_s3(
    env: &Env,
    config: &ox::store::s3::S3Config,
    handle: &VolumeHandle,
    parent: Option<&str>,
    opts: SnapshotOptions,
) -> ox::snapshot::SnapshotReport {
    let (h, r, c, k) = (
        handle.clone(),
        env.set.handles()[0].clone(),
        config.clone(),
        env.kek.clone(),
    );
    let parent = parent.map(str::to_string);
    env.cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(c, ex).unwrap();
                let parent = match parent {
                    Some(key) => Some(ox::snapshot::load(&store, &key, &[k]).await.unwrap()),
                    None => None,
                };
                let throttle = ox::throttle::Throttle::default();
                ox::snapshot::snapshot_volume(&store, &r, &h, parent.as_ref(), &opts, &throttle)
                    .await
                    .unwrap()
            })
        })
        .unwrap()
}

/// A cold clone `name` of the snapshot `key` in the S3 store of `config`, over a fresh
/// RAM copy of `size` bytes.
pub fn clone_s3(
    env: &Env,
    config: &ox::store::s3::S3Config,
    key: &str,
    name: &str,
    size: u64,
) -> (Bdev, ox::basis::ObjectBasis, bdev::CloneHandle) {
    use std::rc::Rc;
    let (c, key, kek) = (config.clone(), key.to_string(), env.kek.clone());
    let loaded = env
        .cores
        .run(move |ex| {
            Box::pin(async move {
                let store = ox::store::s3::S3Store::new(c, ex).unwrap();
                ox::snapshot::load(&store, &key, &[kek]).await.unwrap()
            })
        })
        .unwrap();
    let c = config.clone();
    let factory: ox::basis::StoreFactory = Arc::new(move |ex| {
        Ok(
            Rc::new(ox::store::s3::S3Store::new(c.clone(), Rc::clone(ex))?)
                as Rc<dyn ox::store::ObjectStore>,
        )
    });
    let basis = ox::basis::ObjectBasis::new(
        loaded,
        factory,
        Arc::clone(&env.cores),
        ox::throttle::Throttle::default(),
        name,
    );
    let local = create_malloc(&format!("{name}-local"), 512, size / 512, None).unwrap();
    let (dev, handle) = bdev::create_clone(
        name,
        local,
        Arc::new(basis.clone()) as Arc<dyn bdev::Basis>,
        None,
    )
    .unwrap();
    (dev, basis, handle)
}

type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, ox::OxError>> + 'a>>;

/// A store through which something happens at one moment: `hook` runs once, just
/// before the first conditional write (`put_new` or `put_if_match`) — or, with
/// `reads`, versioned read (`get_tagged`) — of a key containing `at`: another
/// appliance acting between two steps of a writer.
pub struct Hooked<'a> {
    pub inner: &'a dyn ox::store::ObjectStore,
    pub at: &'static str,
    pub reads: bool,
    pub hook:
        std::cell::RefCell<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>>>,
}

impl Hooked<'_> {
    async fn maybe_hook(&self, key: &str) {
        if key.contains(self.at) {
            let hook = self.hook.borrow_mut().take();
            if let Some(h) = hook {
                h.await;
            }
        }
    }
}

impl ox::store::ObjectStore for Hooked<'_> {
    fn put<'a>(&'a self, key: &'a str, data: Vec<u8>) -> Fut<'a, ()> {
        self.inner.put(key, data)
    }
    fn put_new<'a>(&'a self, key: &'a str, data: Vec<u8>) -> Fut<'a, ()> {
        Box::pin(async move {
            self.maybe_hook(key).await;
            self.inner.put_new(key, data).await
        })
    }
    fn put_if_match<'a>(
        &'a self,
        key: &'a str,
        data: Vec<u8>,
        tag: Option<&'a str>,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            self.maybe_hook(key).await;
            self.inner.put_if_match(key, data, tag).await
        })
    }
    fn get<'a>(&'a self, key: &'a str) -> Fut<'a, Vec<u8>> {
        self.inner.get(key)
    }
    fn get_tagged<'a>(&'a self, key: &'a str) -> Fut<'a, ox::store::Tagged> {
        Box::pin(async move {
            if self.reads {
                self.maybe_hook(key).await;
            }
            self.inner.get_tagged(key).await
        })
    }
    fn get_range<'a>(&'a self, key: &'a str, offset: u64, len: u64) -> Fut<'a, Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list<'a>(&'a self, prefix: &'a str) -> Fut<'a, Vec<String>> {
        self.inner.list(prefix)
    }
    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        delimiter: Option<&'a str>,
        after: Option<&'a str>,
        max: usize,
    ) -> Fut<'a, ox::store::Listing> {
        self.inner.list_page(prefix, delimiter, after, max)
    }
    fn delete<'a>(&'a self, keys: &'a [String]) -> Fut<'a, ()> {
        self.inner.delete(keys)
    }
}

/// Whether `basis` sees its store as far ([`ox::basis::FAR_AHEAD_BYTES`]): its fetches
/// ahead of hosts then travel in GETs of up to 512 KiB, not 2 MiB.
pub fn from_afar(basis: &ox::basis::ObjectBasis) -> bool {
    use bdev::Basis;
    basis
        .read_ahead_bytes()
        .is_some_and(|b| b > ox::basis::FAR_AHEAD_BYTES)
}
