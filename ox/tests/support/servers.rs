//! What every S3 server the store is tried against must do with the store's requests,
//! written once for the servers the tests start and for one named by the environment.

use ox::OxError;
use ox::store::ObjectStore;
use ox::store::s3::{CredentialSource, S3Config, Signing};

/// Runs `f` with an S3 store of `config` on an executor of this thread, to its end.
pub fn with_store<T>(config: S3Config, f: impl AsyncFnOnce(ox::store::s3::S3Store) -> T) -> T {
    let ex = std::rc::Rc::new(async_executor::LocalExecutor::new());
    let store = ox::store::s3::S3Store::new(config, std::rc::Rc::clone(&ex)).unwrap();
    async_io::block_on(ex.run(f(store)))
}

/// Settings for a server the tests start on loopback `port` with bucket `ox-test`:
/// static credentials, plain HTTP, one retry after 10 ms, and multipart above 6 MiB
/// in 5 MiB parts (so an 11 MiB object is three parts).
pub fn loopback_config(port: u16, key: &str, secret: &str, signing: Signing) -> S3Config {
    let mut c = S3Config::new(
        format!("http://127.0.0.1:{port}").parse().unwrap(),
        "ox-test",
        "us-east-1",
        CredentialSource::Static {
            access_key: key.into(),
            secret_key: secret.into(),
        },
    );
    c.allow_http = true;
    c.signing = signing;
    c.retries = 1;
    c.backoff = std::time::Duration::from_millis(10);
    c.multipart_threshold = 6 << 20;
    c.part_size = 5 << 20;
    c
}

/// What a server does with the conditions of a PUT (`If-None-Match`, `If-Match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditions {
    /// A create over an object and a stale replacement are refused.
    Enforced,
    /// Both are done (the server ignores the headers).
    Ignored,
    /// Either, said on stderr (a server named from outside).
    Either,
}

/// What the server's listings can be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listings {
    /// Whole listings, pages one entry at a time, delimiters.
    Paged,
    /// Whole listings only, of a prefix without a "/" (moto 5 checks the signature of
    /// a query holding one against an encoding of its own, and refuses it).
    WholeWithoutSlash,
}

/// The store's requests under `p` (a prefix of the run's own, "" or ending with "/"):
/// whole and ranged reads, a multipart PUT, conditional writes, listings, deletes.
/// `what` names the run in failures.
pub async fn round_trip(
    s: &dyn ObjectStore,
    p: &str,
    what: &str,
    conditions: Conditions,
    listings: Listings,
) {
    let k = |rest: &str| format!("{p}{rest}");
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.put(&k("ox1/d/a"), small.clone()).await.unwrap();
    assert_eq!(s.get(&k("ox1/d/a")).await.unwrap(), small, "{what}");
    assert_eq!(
        s.get_range(&k("ox1/d/a"), 1000, 5000).await.unwrap(),
        &small[1000..6000],
        "{what}"
    );
    // Multipart: 11 MiB in three parts (with the tests' 6 MiB threshold).
    let big: Vec<u8> = (0..11u32 << 20).map(|i| (i % 239) as u8).collect();
    s.put(&k("ox1/d/big"), big.clone()).await.unwrap();
    assert!(s.get(&k("ox1/d/big")).await.unwrap() == big, "{what}");

    // Conditional writes: a create over an object, and a replacement of a version
    // changed since.
    s.put_new(&k("ox1/m/x"), vec![1]).await.unwrap();
    let again = s.put_new(&k("ox1/m/x"), vec![2]).await;
    let (_, tag) = s.get_tagged(&k("ox1/m/x")).await.unwrap();
    assert!(tag.is_some(), "{what}: no version tag");
    s.put(&k("ox1/m/x"), vec![3]).await.unwrap();
    let stale = s.put_if_match(&k("ox1/m/x"), vec![4], tag.as_deref()).await;
    for (name, outcome) in [("If-None-Match", again), ("If-Match", stale)] {
        match (conditions, outcome) {
            (Conditions::Enforced | Conditions::Either, Err(OxError::AlreadyExists { .. })) => {
                eprintln!("{what}: {name} is enforced");
            }
            (Conditions::Ignored | Conditions::Either, Ok(())) => {
                eprintln!("{what}: {name} is ignored");
            }
            (_, outcome) => panic!("{what}: {name}: {conditions:?} but {outcome:?}"),
        }
    }
    let last = s.get(&k("ox1/m/x")).await.unwrap();
    match conditions {
        Conditions::Enforced => assert_eq!(last, [3], "{what}"),
        Conditions::Ignored => assert_eq!(last, [4], "{what}"),
        Conditions::Either => assert!(last == [3] || last == [4], "{what}"),
    }

    let mut all = vec![k("ox1/d/a"), k("ox1/d/big"), k("ox1/m/x")];
    match listings {
        Listings::WholeWithoutSlash => {
            assert!(p.is_empty(), "{what}: a prefix of its own needs a \"/\"");
            assert_eq!(s.list("ox1").await.unwrap(), all, "{what}");
        }
        Listings::Paged => {
            for rest in ["ox1/e/1", "ox1/e/2", "ox1/top"] {
                s.put(&k(rest), vec![0]).await.unwrap();
                all.push(k(rest));
            }
            all.sort();
            assert_eq!(s.list(&k("ox1/")).await.unwrap(), all, "{what}");
            let grouped = [k("ox1/d/"), k("ox1/e/"), k("ox1/m/"), k("ox1/top")];
            for max in [1, 2, 1000] {
                let paged = walk(s, &k("ox1/"), Some("/"), max).await;
                assert_eq!(paged, grouped, "{what}: by \"/\", {max} a page");
                assert_eq!(
                    walk(s, &k("ox1/"), None, max).await,
                    all,
                    "{what}: {max} a page"
                );
            }
            assert_eq!(
                walk(s, &k("ox1/e/"), Some("/"), 1).await,
                [k("ox1/e/1"), k("ox1/e/2")]
            );
        }
    }
    s.delete(&all).await.unwrap();
    let prefix = if p.is_empty() { "ox1" } else { p };
    assert!(s.list(prefix).await.unwrap().is_empty(), "{what}");
    assert!(
        matches!(s.get(&k("ox1/d/a")).await, Err(OxError::NotFound { .. })),
        "{what}"
    );
}

/// Every entry (keys and common prefixes, in order) under `prefix`, walking pages of
/// `max` by their `next`. Each page must hold at most `max` and move past the one
/// before, so a walk that would never end fails instead.
pub async fn walk(
    s: &dyn ObjectStore,
    prefix: &str,
    delimiter: Option<&str>,
    max: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .list_page(prefix, delimiter, after.as_deref(), max)
            .await
            .unwrap();
        assert!(page.keys.len() + page.prefixes.len() <= max, "{page:?}");
        let mut entries: Vec<String> = page.keys.into_iter().chain(page.prefixes).collect();
        entries.sort();
        out.extend(entries);
        match page.next {
            None => return out,
            Some(next) => {
                assert!(
                    after.as_ref().is_none_or(|a| next > *a),
                    "the page after {after:?} ends at {next:?}"
                );
                after = Some(next);
            }
        }
    }
}
