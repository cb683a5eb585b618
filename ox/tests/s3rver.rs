//! The S3 store against a third, independent server: s3rver (a Node.js S3 server: its
//! own XML, multipart, ranges and errors). The store's own requests, and a whole
//! snapshot written to it and read back through a clone. What s3rver does not check is
//! pinned here too, so the table of servers in OPERATIONS.md stays true: it knows the
//! access key (`S3RVER`) but verifies no SigV4 signature (a wrong secret passes), and
//! it ignores the conditions of a PUT (`If-None-Match`, `If-Match`).
//!
//! Needs s3rver (`scripts/install-test-deps` installs it into
//! ~/.cache/ox-s3rver-3.7.1, with the dependency tree pinned by
//! scripts/s3rver/package-lock.json).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;

use async_executor::LocalExecutor;
use ox::OxError;
use ox::store::ObjectStore;
use ox::store::s3::{S3Config, S3Store, Signing};
use support::servers::{Conditions, Listings, loopback_config, round_trip};
use support::{clone_s3, env, filled_volume, options, read, snapshot_s3};

/// An s3rver on a free port with bucket `ox-test`, stopped when dropped.
struct S3rver {
    child: Child,
    port: u16,
    _data: tempfile::TempDir,
}

impl Drop for S3rver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `scripts/install-test-deps` puts it (`OX_S3RVER` overrides).
fn s3rver_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("OX_S3RVER") {
        return PathBuf::from(bin);
    }
    let home = std::env::var_os("HOME").expect("HOME, to find s3rver in its cache");
    PathBuf::from(home).join(".cache/ox-s3rver-3.7.1/node_modules/.bin/s3rver")
}

/// Starts s3rver on a port of its choosing; ready once it says where it listens
/// (which it does after making the bucket).
fn start() -> S3rver {
    let data = tempfile::tempdir().unwrap();
    let bin = s3rver_bin();
    let mut child = Command::new(&bin)
        .arg("-d")
        .arg(data.path())
        .args(["-a", "127.0.0.1", "-p", "0", "--silent"])
        .args(["--configure-bucket", "ox-test"])
        // Its continuation tokens use a cipher OpenSSL 3 (Node 17 on) keeps only in its
        // legacy provider: without it every truncated listing is HTTP 500. (Node before
        // 17 refuses the option: the tests need 17 or later, as Debian 12 has.)
        .env("NODE_OPTIONS", "--openssl-legacy-provider")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{} not started ({e}): scripts/install-test-deps installs it",
                bin.display()
            )
        });
    let stdout = child.stdout.take().unwrap();
    let port = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.contains("listening on")
                .then(|| line.rsplit(':').next()?.trim().parse::<u16>().ok())
                .flatten()
        });
    let Some(port) = port else {
        let _ = child.kill();
        panic!(
            "s3rver ended without saying where it listens: {:?}",
            child.wait()
        );
    };
    S3rver {
        child,
        port,
        _data: data,
    }
}

fn config(s: &S3rver, key: &str, secret: &str, signing: Signing) -> S3Config {
    loopback_config(s.port, key, secret, signing)
}

fn run<T>(f: impl AsyncFnOnce(Rc<LocalExecutor<'static>>) -> T) -> T {
    let ex = Rc::new(LocalExecutor::new());
    async_io::block_on(ex.run(f(Rc::clone(&ex))))
}

#[test]
fn s3rver_takes_what_the_store_sends_and_refuses_an_unknown_key() {
    let server = start();
    run(async |ex| {
        for signing in [Signing::Headers, Signing::Query] {
            let c = config(&server, "S3RVER", "S3RVER", signing);
            let s = S3Store::new(c, Rc::clone(&ex)).unwrap();
            // s3rver ignores the conditions of a PUT, as OPERATIONS.md's table of
            // servers says: a second create replaces the first (If-None-Match), and a
            // replacement of a version changed since passes (If-Match).
            let what = format!("{signing:?}");
            round_trip(&s, "vol/", &what, Conditions::Ignored, Listings::Paged).await;
            let c = ox::store::check::check(&s, "vol/", "probe").await;
            assert!(c.ok(), "{what}: store check: {c:?}");
        }
        // A key the server does not know is refused.
        let c = config(&server, "NOBODY", "S3RVER", Signing::Headers);
        let bad = S3Store::new(c, Rc::clone(&ex)).unwrap();
        let e = bad.put("vol/ox1/d/b", vec![1]).await.unwrap_err();
        assert!(matches!(e, OxError::Refused { status: 403, .. }), "{e}");
        assert!(e.to_string().contains("InvalidAccessKeyId"), "{e}");
        // A wrong secret passes: s3rver verifies no SigV4 signature.
        let c = config(&server, "S3RVER", "not-the-secret", Signing::Headers);
        let unchecked = S3Store::new(c, ex).unwrap();
        unchecked.put("vol/ox1/d/b", vec![1]).await.unwrap();
    });
}

#[test]
fn a_snapshot_written_to_s3rver_reads_back_through_a_clone() {
    let server = start();
    let config = config(&server, "S3RVER", "S3RVER", Signing::Headers);
    let env = env();
    let size = 16 << 20;
    let (_vol, handle, image) = filled_volume(&env, size, 29);
    let report = snapshot_s3(&env, &config, &handle, None, options(&env));
    let (clone, _, _) = clone_s3(&env, &config, &report.manifest_key, "c", size);
    assert!(read(&env, &clone, 0, size) == image, "the clone differs");
    env.set.shutdown().unwrap();
}
