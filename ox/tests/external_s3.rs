//! The S3 store against an S3 server named by the environment, for servers too big to
//! start in every test run (`scripts/try-garage` builds Garage, starts it and runs
//! this): `OX_S3_ENDPOINT`, `OX_S3_BUCKET`, `OX_S3_REGION` (default `us-east-1`),
//! `OX_S3_KEY`, `OX_S3_SECRET`, and `OX_S3_CONNECT_TO` (`IP:PORT`) to try
//! virtual-hosted addressing too. Without them each test says so and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::rc::Rc;
use std::time::Duration;

use async_executor::LocalExecutor;
use ox::OxError;
use ox::store::ObjectStore;
use ox::store::s3::{CredentialSource, S3Config, S3Store, Signing};
use support::servers::{Conditions, Listings, round_trip};
use support::{clone_s3, env, filled_volume, options, read, snapshot_s3};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Path-style or virtual-hosted addressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Addressing {
    Path,
    Virtual,
}

/// The server's configuration with `secret` (`None`: no server named).
fn config(secret: Option<&str>, addressing: Addressing) -> Option<S3Config> {
    let endpoint = var("OX_S3_ENDPOINT")?;
    let mut c = S3Config::new(
        endpoint.parse().expect("OX_S3_ENDPOINT"),
        &var("OX_S3_BUCKET").expect("OX_S3_BUCKET"),
        &var("OX_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
        CredentialSource::Static {
            access_key: var("OX_S3_KEY").expect("OX_S3_KEY"),
            secret_key: secret
                .map(str::to_string)
                .unwrap_or_else(|| var("OX_S3_SECRET").expect("OX_S3_SECRET")),
        },
    );
    c.allow_http = true;
    c.path_style = addressing == Addressing::Path;
    c.retries = 1;
    c.backoff = Duration::from_millis(10);
    c.multipart_threshold = 6 << 20;
    c.part_size = 5 << 20;
    c.connect_to = var("OX_S3_CONNECT_TO").map(|a| a.parse().expect("OX_S3_CONNECT_TO"));
    // Virtual-hosted names need the name to lead to the server: tried only with it.
    if addressing == Addressing::Virtual && c.connect_to.is_none() {
        return None;
    }
    Some(c)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn run<T>(f: impl AsyncFnOnce(Rc<LocalExecutor<'static>>) -> T) -> T {
    let ex = Rc::new(LocalExecutor::new());
    async_io::block_on(ex.run(f(Rc::clone(&ex))))
}

#[test]
fn the_named_server_takes_what_the_store_sends_and_refuses_a_wrong_secret() {
    let Some(path) = config(None, Addressing::Path) else {
        eprintln!("skipped: no OX_S3_ENDPOINT");
        return;
    };
    let mut configs = vec![path];
    match config(None, Addressing::Virtual) {
        Some(c) => configs.push(c),
        None => eprintln!("virtual-hosted addressing not tried: no OX_S3_CONNECT_TO"),
    }
    // A prefix of this run's own, so runs against one bucket never meet.
    let p = format!("t{:x}/", std::process::id() as u64 * 1_000_003 + now_ns());
    let k = |rest: &str| format!("{p}{rest}");
    run(async |ex| {
        for c in configs {
            let addressing = if c.path_style {
                Addressing::Path
            } else {
                Addressing::Virtual
            };
            for signing in [Signing::Headers, Signing::Query] {
                let mut c = c.clone();
                c.signing = signing;
                let s = S3Store::new(c, Rc::clone(&ex)).unwrap();
                let what = format!("{addressing:?}, {signing:?}");
                // Servers differ on conditional writes (OPERATIONS.md's table says
                // which refuse them): each must be refused or done, nothing else.
                round_trip(&s, &p, &what, Conditions::Either, Listings::Paged).await;
                let c = ox::store::check::check(&s, &p, "probe").await;
                assert!(c.ok(), "{what}: store check: {c:?}");
            }
        }
        let bad = config(Some("not-the-secret"), Addressing::Path).unwrap();
        let bad = S3Store::new(bad, ex).unwrap();
        let e = bad.put(&k("ox1/d/b"), vec![1]).await.unwrap_err();
        assert!(matches!(e, OxError::Refused { status: 403, .. }), "{e}");
    });
}

#[test]
fn a_snapshot_written_to_the_named_server_reads_back_through_a_clone() {
    let Some(config) = config(None, Addressing::Path) else {
        eprintln!("skipped: no OX_S3_ENDPOINT");
        return;
    };
    let env = env();
    let size = 16 << 20;
    let (_vol, handle, image) = filled_volume(&env, size, 31);
    let mut opts = options(&env);
    opts.prefix = format!("t{:x}/", now_ns());
    let report = snapshot_s3(&env, &config, &handle, None, opts);
    let (clone, _, _) = clone_s3(&env, &config, &report.manifest_key, "c", size);
    assert!(read(&env, &clone, 0, size) == image, "the clone differs");
    env.set.shutdown().unwrap();
}
