//! The S3 store against a real S3 server on loopback — `s3s-fs` (the `s3s` S3 protocol
//! implementation over a directory), started in this process on HTTP and on HTTPS with
//! a test CA from rcgen — with faults injected in front of it: 5xx, dropped
//! connections and stalled bodies.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_executor::LocalExecutor;
use ox::OxError;
use ox::store::ObjectStore;
use ox::store::http::Trust;
use ox::store::s3::{CredentialSource, S3Config, S3Store};

mod s3server;
#[path = "support/servers.rs"]
#[allow(dead_code)]
mod servers;

use s3server::{ACCESS, BUCKET, SECRET, Server, start_server};
use servers::{Conditions, Listings, round_trip};

fn store(
    server: &Server,
    secret: &str,
    ex: &Rc<LocalExecutor<'static>>,
) -> Result<S3Store, OxError> {
    let credentials = CredentialSource::Static {
        access_key: ACCESS.into(),
        secret_key: secret.into(),
    };
    store_with(server, credentials, ex)
}

/// A store on `server` signing with `credentials`.
fn store_with(
    server: &Server,
    credentials: CredentialSource,
    ex: &Rc<LocalExecutor<'static>>,
) -> Result<S3Store, OxError> {
    S3Store::new(config_with(server, credentials), Rc::clone(ex))
}

/// The settings of [`store_with`].
fn config_with(server: &Server, credentials: CredentialSource) -> S3Config {
    let scheme = if server.ca_pem.is_some() {
        "https"
    } else {
        "http"
    };
    let host = if server.ca_pem.is_some() {
        "localhost"
    } else {
        "127.0.0.1"
    };
    let endpoint = format!("{scheme}://{host}:{}", server.addr.port())
        .parse()
        .unwrap();
    let mut c = S3Config::new(endpoint, BUCKET, "us-east-1", credentials);
    c.allow_http = true;
    c.timeout = Duration::from_millis(1500);
    c.backoff = Duration::from_millis(10);
    c.retries = 3;
    c.multipart_threshold = 6 << 20;
    c.part_size = 5 << 20;
    if let Some(pem) = &server.ca_pem {
        c.trust = Trust::CaBundle(pem.path().to_path_buf());
    }
    c
}

fn run<T>(f: impl AsyncFnOnce(Rc<LocalExecutor<'static>>) -> T) -> T {
    let ex = Rc::new(LocalExecutor::new());
    async_io::block_on(ex.run(f(Rc::clone(&ex))))
}

async fn exercise(s: &S3Store) {
    let small: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    s.put("ox1/d/a", small.clone()).await.unwrap();
    assert_eq!(s.get("ox1/d/a").await.unwrap(), small);
    assert_eq!(
        s.get_range("ox1/d/a", 1000, 5000).await.unwrap(),
        &small[1000..6000]
    );
    assert_eq!(
        s.get_range("ox1/d/a", 99_990, 100).await.unwrap(),
        &small[99_990..]
    );
    // Multipart: 13 MiB in three parts.
    let big: Vec<u8> = (0..13u32 << 20).map(|i| (i % 239) as u8).collect();
    s.put("ox1/d/big", big.clone()).await.unwrap();
    assert!(s.get("ox1/d/big").await.unwrap() == big);
    assert_eq!(
        s.get_range("ox1/d/big", (6 << 20) - 10, 20).await.unwrap(),
        &big[(6 << 20) - 10..(6 << 20) + 10]
    );
    for i in 0..5 {
        s.put(&format!("ox1/i/{i}"), vec![i as u8]).await.unwrap();
    }
    let listed = s.list("ox1/i/").await.unwrap();
    assert_eq!(
        listed,
        (0..5).map(|i| format!("ox1/i/{i}")).collect::<Vec<_>>()
    );
    assert_eq!(s.list("ox1/").await.unwrap().len(), 7);
    s.delete(&listed).await.unwrap();
    assert!(s.list("ox1/i/").await.unwrap().is_empty());
    assert!(matches!(
        s.get("ox1/i/0").await,
        Err(OxError::NotFound { .. })
    ));
}

#[test]
fn put_get_range_multipart_list_delete_over_http() {
    let server = start_server(false);
    run(async |ex| exercise(&store(&server, SECRET, &ex).unwrap()).await);
}

/// A store's round trip is how soon its server answers a request without a body (the
/// answer's head, what sizes a far clone's read-ahead): unknown before one, not taken
/// from a PUT (whose answer waits for its body) nor from a 503, at least a slow
/// server's delay, and the quickest so far.
#[test]
fn a_store_s_round_trip_is_how_soon_its_server_answers() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, SECRET, &ex).unwrap();
        assert_eq!(s.round_trip(), None, "before any request");
        s.put("rtt", vec![7; 1 << 20]).await.unwrap();
        assert_eq!(s.round_trip(), None, "from a PUT");
        server.faults.unavailable.store(10, Ordering::SeqCst);
        assert!(s.get_range("rtt", 0, 4096).await.is_err(), "503s all along");
        server.faults.unavailable.store(0, Ordering::SeqCst);
        assert_eq!(s.round_trip(), None, "from a 503");
        server.faults.delay_ms.store(300, Ordering::SeqCst);
        assert_eq!(s.get_range("rtt", 0, 4096).await.unwrap(), vec![7; 4096]);
        let slow = s.round_trip().expect("a GET was answered");
        assert!(slow >= Duration::from_millis(300), "{slow:?}");
        server.faults.delay_ms.store(0, Ordering::SeqCst);
        assert_eq!(s.get("rtt").await.unwrap().len(), 1 << 20);
        let quick = s.round_trip().expect("GETs were answered");
        assert!(
            quick < slow,
            "{quick:?} after {slow:?}: a quicker answer not kept"
        );
        server.faults.delay_ms.store(300, Ordering::SeqCst);
        assert_eq!(s.get_range("rtt", 0, 4096).await.unwrap(), vec![7; 4096]);
        server.faults.delay_ms.store(0, Ordering::SeqCst);
        assert_eq!(s.round_trip(), Some(quick), "a slower answer kept");
    });
}

/// What every server is asked (`support::servers`): s3s-fs ignores delimiters and
/// max-keys, so the store groups and cuts its pages itself; the server in front of it
/// enforces conditional writes.
#[test]
fn the_requests_every_server_is_asked() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, SECRET, &ex).unwrap();
        round_trip(&s, "", "s3s", Conditions::Enforced, Listings::Paged).await;
    });
}

/// Path-style and virtual-hosted addressing, each signed in headers (the default) and
/// in the query string, against a server that checks signatures and takes both
/// styles: every combination does everything, and the server saw what was asked for.
#[test]
fn both_addressing_styles_and_both_signings_work() {
    use ox::store::s3::Signing;
    let server = s3server::start_server_with(false, true);
    let port = server.addr.port();
    for (path_style, signing) in [
        (true, Signing::Headers),
        (false, Signing::Headers),
        (true, Signing::Query),
        (false, Signing::Query),
    ] {
        server.faults.seen.lock().unwrap().clear();
        run(async |ex| {
            let mut c = S3Config::new(
                format!("http://localhost:{port}").parse().unwrap(),
                BUCKET,
                "us-east-1",
                CredentialSource::Static {
                    access_key: ACCESS.into(),
                    secret_key: SECRET.into(),
                },
            );
            c.allow_http = true;
            c.path_style = path_style;
            c.signing = signing;
            // `BUCKET.localhost` resolves nowhere here: connect to the server itself.
            c.connect_to = Some(server.addr);
            c.multipart_threshold = 6 << 20;
            c.part_size = 5 << 20;
            exercise(&S3Store::new(c, Rc::clone(&ex)).unwrap()).await;
        });
        let seen = server.faults.seen.lock().unwrap().clone();
        let host = if path_style {
            format!("localhost:{port}")
        } else {
            format!("{BUCKET}.localhost:{port}")
        };
        assert!(!seen.is_empty());
        for (h, in_header) in seen {
            assert_eq!(h, host, "path style {path_style}");
            assert_eq!(in_header, signing == Signing::Headers, "{signing:?}");
        }
    }
}

#[test]
fn the_same_over_https_with_a_custom_ca() {
    let server = start_server(true);
    run(async |ex| exercise(&store(&server, SECRET, &ex).unwrap()).await);
}

/// A PUT carries its CRC32C always, and its MD5 until the store answers one with the
/// CRC32C it was sent (by default), always, or never, as asked; each part of a
/// multipart upload its MD5 alone. Seen at the server, which echoes CRC32Cs.
#[test]
fn a_put_carries_its_crc32c_and_its_md5_until_the_store_echoes_it() {
    use ox::store::s3::ContentMd5;
    let credentials = || CredentialSource::Static {
        access_key: ACCESS.into(),
        secret_key: SECRET.into(),
    };
    // (HTTPS, asked, MD5 on the first PUT, on the second).
    for (https, asked, first, second) in [
        (true, ContentMd5::Auto, true, false),
        (false, ContentMd5::Auto, true, false),
        (true, ContentMd5::Always, true, true),
        (false, ContentMd5::Never, false, false),
    ] {
        let server = start_server(https);
        let mut c = config_with(&server, credentials());
        c.content_md5 = asked;
        run(async |ex| {
            let s = S3Store::new(c, Rc::clone(&ex)).unwrap();
            s.put("ox1/d/one", vec![7; 1000]).await.unwrap();
            s.put("ox1/d/two", vec![8; 1000]).await.unwrap();
            // Multipart (over 6 MiB here): two parts.
            s.put("ox1/d/big", vec![9; 7 << 20]).await.unwrap();
            assert_eq!(s.get("ox1/d/one").await.unwrap(), vec![7; 1000]);
            assert_eq!(s.get("ox1/d/big").await.unwrap(), vec![9; 7 << 20]);
        });
        let seen = server.faults.put_digests.lock().unwrap().clone();
        // (a part, Content-MD5, x-amz-checksum-crc32c) of each PUT, in order.
        let want = vec![
            (false, first, true),
            (false, second, true),
            (true, true, false),
            (true, true, false),
        ];
        assert_eq!(seen, want, "https={https} {asked:?}");
    }
}

/// Under the default, a store that never echoes a PUT's CRC32C (it ignores them) gets
/// every PUT's MD5; one that echoed and then answers a PUT sent without MD5 without
/// the echo (a gateway of another version behind the same endpoint) gets that PUT
/// again with its MD5, and every PUT after it, echoes or not.
#[test]
fn a_store_that_does_not_echo_crc32cs_gets_content_md5() {
    let server = start_server(false);
    let credentials = CredentialSource::Static {
        access_key: ACCESS.into(),
        secret_key: SECRET.into(),
    };
    let c = config_with(&server, credentials);
    let hide = |on| server.faults.hide_crc32c.store(on, Ordering::SeqCst);
    let put = async |s: &S3Store, n: u8| {
        s.put(&format!("ox1/d/{n}"), vec![n; 100]).await.unwrap();
    };
    run(async |ex| {
        let s = S3Store::new(c, Rc::clone(&ex)).unwrap();
        hide(true);
        for n in 0..3 {
            put(&s, n).await;
        }
        hide(false);
        // Echoed: the next goes without MD5.
        put(&s, 3).await;
        put(&s, 4).await;
        hide(true);
        // Answered without the echo: sent again with MD5, and so are the next.
        put(&s, 5).await;
        put(&s, 6).await;
        // Echoed again: still with MD5, for good.
        hide(false);
        put(&s, 7).await;
        put(&s, 8).await;
        for n in 0..9u8 {
            assert_eq!(s.get(&format!("ox1/d/{n}")).await.unwrap(), vec![n; 100]);
        }
    });
    let md5: Vec<bool> = (server.faults.put_digests.lock().unwrap().iter())
        .map(|(_, md5, _)| *md5)
        .collect();
    let want = [true, true, true, true, false, false, true, true, true, true];
    assert_eq!(md5, want, "PUTs 0-4, 5 twice, 6-8");
}

/// A ranged GET over plain HTTP asks for a whole number of the connection's TCP
/// segments where that costs at most an eighth more (a server that leaves Nagle's
/// algorithm on then has no small last segment to hold for a round trip), the bytes
/// added before the range where there are enough, and returns exactly the bytes wanted;
/// at an object's end, what is there. Over HTTPS it asks for the range as it is. What
/// was asked is counted at the server.
#[test]
fn a_ranged_get_asks_for_whole_segments_and_returns_what_was_wanted() {
    for https in [false, true] {
        let server = start_server(https);
        // The segment size of a connection to the server, as the store's see it.
        let probe = std::net::TcpStream::connect(server.addr).unwrap();
        let mss = u64::from(socket2::SockRef::from(&probe).tcp_mss().unwrap());
        drop(probe);
        let data: Vec<u8> = (0..3 * mss).map(|i| (i % 241) as u8).collect();
        let sent = || server.faults.get_bytes.load(Ordering::SeqCst);
        run(async |ex| {
            let s = store(&server, SECRET, &ex).unwrap();
            s.put("ox1/d/seg", data.clone()).await.unwrap();
            // An object a little short of one segment.
            let small = &data[..(mss - mss / 32) as usize];
            s.put("ox1/d/small", small.to_vec()).await.unwrap();
            // (object, offset, length wanted, bytes a plain-HTTP store asks for).
            let cases = [
                // An eighth or less short of a segment, at the start: a segment from it.
                ("seg", 0, mss - mss / 16, mss),
                // The same inside the object, and ending at its end: a segment ending
                // where the range ends.
                ("seg", mss, mss - mss / 16, mss),
                ("seg", 2 * mss + 300, mss - 300, mss),
                // Whole segments already.
                ("seg", 10, 2 * mss, 2 * mss),
                // Half a segment: rounding would double it; asked as it is.
                ("seg", 7, mss / 2, mss / 2),
                // Rounded up past the object's end: the server sends what there is.
                ("small", 0, small.len() as u64 - 5, small.len() as u64),
            ];
            for (name, off, len, asked) in cases {
                let object = if name == "seg" { &data[..] } else { small };
                let before = sent();
                let got = s
                    .get_range(&format!("ox1/d/{name}"), off, len)
                    .await
                    .unwrap();
                assert!(
                    got == object[off as usize..(off + len) as usize],
                    "{off}+{len}"
                );
                let expect = if https { len } else { asked };
                assert_eq!(sent() - before, expect, "{name} {off}+{len} https={https}");
            }
            // Past the end as before: what the object holds, or nothing.
            let tail = s.get_range("ox1/d/seg", 3 * mss - 50, 100).await.unwrap();
            assert!(tail == data[(3 * mss - 50) as usize..]);
            let tail = s
                .get_range("ox1/d/small", small.len() as u64 - 50, 100)
                .await;
            assert!(tail.unwrap() == small[small.len() - 50..]);
            let past = s.get_range("ox1/d/small", 2 * mss, 4096).await.unwrap();
            assert!(past.is_empty());
            // Past the end, with the bytes added before reaching into the object: the
            // server sends those, and nothing is returned.
            let before = sent();
            let past = s.get_range("ox1/d/seg", 3 * mss + 10, mss - mss / 16).await;
            assert!(past.unwrap().is_empty());
            let expect = if https { 0 } else { mss / 16 - 10 };
            assert_eq!(sent() - before, expect, "past the end, https={https}");
        });
    }
}

/// `oxctl store check`: every step passes on a good store and leaves nothing behind;
/// a wrong secret and an untrusted certificate each fail the first step with the
/// reason.
#[test]
fn a_store_check_passes_or_names_the_step_and_the_reason() {
    use ox::store::check::check;
    let server = start_server(false);
    let (c, clock) = run(async |ex| {
        let store = store(&server, SECRET, &ex).unwrap();
        (check(&store, "", "t1").await, store.server_clock())
    });
    assert!(c.ok(), "{c:?}");
    let names: Vec<&str> = c.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["list", "clock", "put", "get", "listed", "delete", "gone"]
    );
    // The server's clock is this machine's: its offset's bounds hold zero.
    let (least, most) = clock.expect("the server sends a Date").offset_bounds();
    assert!(least <= 0.0 && most >= 0.0, "{least} to {most}: {c:?}");
    let left = run(async |ex| store(&server, SECRET, &ex).unwrap().list("").await.unwrap());
    assert!(left.is_empty(), "{left:?}");

    let c = run(async |ex| check(&store(&server, "wrong", &ex).unwrap(), "", "t2").await);
    let failed = c.failure().expect("a wrong secret fails");
    assert_eq!(failed.name, "list");
    let why = failed.error.as_deref().unwrap_or_default();
    assert!(why.contains("403"), "{why}");

    let tls = start_server(true);
    let other = start_server(true);
    let c = run(async |ex| {
        let mut config = S3Config::new(
            format!("https://localhost:{}", tls.addr.port())
                .parse()
                .unwrap(),
            BUCKET,
            "us-east-1",
            CredentialSource::Static {
                access_key: ACCESS.into(),
                secret_key: SECRET.into(),
            },
        );
        config.trust = Trust::CaBundle(other.ca_pem.as_ref().unwrap().path().to_path_buf());
        check(&S3Store::new(config, Rc::clone(&ex)).unwrap(), "", "t3").await
    });
    let failed = c.failure().expect("an untrusted certificate fails");
    assert_eq!(failed.name, "list");
    let why = failed.error.as_deref().unwrap_or_default();
    assert!(why.contains("not trusted"), "{why}");
}

/// A store whose server's clock is past SigV4's 15 minutes from ours, either way,
/// fails its check at `clock`, saying how far and which way (this server checks
/// signatures by this machine's clock, so its other steps would pass); within them
/// the check passes and says how far.
#[test]
fn a_store_whose_clock_is_off_fails_its_check_at_the_clock() {
    use ox::store::check::check;
    let server = start_server(false);
    for (offset, words) in [(1800, "ahead of"), (-1800, "behind")] {
        server.faults.clock_offset_s.store(offset, Ordering::SeqCst);
        let c = run(async |ex| check(&store(&server, SECRET, &ex).unwrap(), "", "t").await);
        let failed = c.failure().expect("a clock 30 minutes off fails");
        assert_eq!(failed.name, "clock", "{c:?}");
        let why = failed.error.as_deref().unwrap_or_default();
        // (The Date's whole seconds and the exchange's time blur it by a second or two.)
        let about = why.contains("29 min") || why.contains("30 min 0 s");
        assert!(about && why.contains(words), "{why}");
        assert!(c.steps[0].error.is_none(), "{c:?}");
    }
    server.faults.clock_offset_s.store(120, Ordering::SeqCst);
    let c = run(async |ex| check(&store(&server, SECRET, &ex).unwrap(), "", "t").await);
    assert!(c.ok(), "{c:?}");
    let detail = c.steps[1].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("at least") && detail.contains("ahead of"),
        "{detail}"
    );
}

/// A connection dropped in the middle of the TLS handshake (a store or a load balancer
/// restarting) is an outage, retried — not an untrusted certificate.
#[test]
fn a_handshake_cut_short_is_retried_not_called_untrusted() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    let e = run(async |ex| {
        let mut c = S3Config::new(
            format!("https://localhost:{port}").parse().unwrap(),
            BUCKET,
            "us-east-1",
            CredentialSource::Static {
                access_key: ACCESS.into(),
                secret_key: SECRET.into(),
            },
        );
        c.retries = 2;
        c.backoff = Duration::from_millis(5);
        S3Store::new(c, Rc::clone(&ex))
            .unwrap()
            .get("ox1/d/x")
            .await
            .unwrap_err()
    });
    assert!(matches!(e, OxError::Unavailable { attempts: 3, .. }), "{e}");
    // The listener may take the last connection from its backlog after the client
    // has given up: wait for it, then check there was no fourth.
    while accepted.load(Ordering::SeqCst) < 3 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "every attempt connected once"
    );
}

#[test]
fn a_wrong_secret_is_refused_without_retries() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, "not-the-secret", &ex).unwrap();
        let before = server.faults.requests.load(Ordering::SeqCst);
        let e = s.put("ox1/d/x", vec![1]).await.unwrap_err();
        assert!(matches!(&e, OxError::Refused { status: 403, .. }), "{e}");
        assert!(e.to_string().contains("Signature"), "{e}");
        assert_eq!(
            server.faults.requests.load(Ordering::SeqCst) - before,
            1,
            "4xx is not retried"
        );
    });
}

#[test]
fn an_untrusted_certificate_is_rejected() {
    let server = start_server(true);
    run(async |ex| {
        // Trust a different CA than the one that signed the server's certificate.
        let other = start_server(true);
        let mut s = store(&server, SECRET, &ex);
        if let Some(pem) = &other.ca_pem {
            let endpoint = format!("https://localhost:{}", server.addr.port())
                .parse()
                .unwrap();
            let mut c = S3Config::new(
                endpoint,
                BUCKET,
                "us-east-1",
                CredentialSource::Static {
                    access_key: ACCESS.into(),
                    secret_key: SECRET.into(),
                },
            );
            c.trust = Trust::CaBundle(pem.path().to_path_buf());
            c.retries = 3;
            s = S3Store::new(c, Rc::clone(&ex));
        }
        let e = s.unwrap().get("ox1/d/x").await.unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, OxError::Untrusted { .. }) && text.contains("TLS"),
            "{text}"
        );
        // Plain HTTP must be allowed explicitly.
        let mut c = S3Config::new(
            "http://127.0.0.1:1".parse().unwrap(),
            BUCKET,
            "r",
            CredentialSource::Environment,
        );
        c.allow_http = false;
        let e = S3Store::new(c, Rc::clone(&ex)).err().unwrap().to_string();
        assert!(e.contains("plain HTTP"), "{e}");
    });
}

#[test]
fn retries_carry_requests_across_injected_faults() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, SECRET, &ex).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
        server.faults.unavailable.store(2, Ordering::SeqCst);
        s.put("ox1/d/r", data.clone()).await.unwrap();
        server.faults.drop.store(2, Ordering::SeqCst);
        assert!(s.get("ox1/d/r").await.unwrap() == data);
        server.faults.stall.store(1, Ordering::SeqCst);
        assert!(
            s.get("ox1/d/r").await.unwrap() == data,
            "a stalled body times out and is retried"
        );
        // More faults than retries: a clear error naming the attempts.
        server.faults.unavailable.store(10, Ordering::SeqCst);
        let e = s.get("ox1/d/r").await.unwrap_err().to_string();
        assert!(e.contains("4 attempt") && e.contains("SlowDown"), "{e}");
        server.faults.unavailable.store(0, Ordering::SeqCst);
        // A conditional create refuses to overwrite, and a conditional replace refuses
        // a version other than the one read.
        s.put_new("ox1/m/once", vec![1]).await.unwrap();
        assert!(matches!(
            s.put_new("ox1/m/once", vec![2]).await,
            Err(OxError::AlreadyExists { .. })
        ));
        let (body, tag) = s.get_tagged("ox1/m/once").await.unwrap();
        assert_eq!(body, vec![1]);
        let tag = tag.expect("the server gives an ETag");
        s.put_if_match("ox1/m/once", vec![3], Some(&tag))
            .await
            .unwrap();
        assert!(matches!(
            s.put_if_match("ox1/m/once", vec![4], Some(&tag)).await,
            Err(OxError::AlreadyExists { .. })
        ));
        assert_eq!(s.get("ox1/m/once").await.unwrap(), vec![3]);
    });
}

#[test]
fn many_concurrent_requests_on_one_executor() {
    let server = start_server(false);
    run(async |ex| {
        let s = Rc::new(store(&server, SECRET, &ex).unwrap());
        s.put("ox1/d/c", vec![7u8; 200_000]).await.unwrap();
        let tasks: Vec<_> = (0..64u64)
            .map(|i| {
                let s = Rc::clone(&s);
                ex.spawn(
                    async move { s.get_range("ox1/d/c", i * 1000, 65536).await.unwrap().len() },
                )
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await, 65536);
        }
    });
}

#[test]
fn a_multipart_completion_that_timed_out_but_succeeded_is_not_an_error() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, SECRET, &ex).unwrap();
        let big: Vec<u8> = (0..13u32 << 20).map(|i| (i % 241) as u8).collect();
        // Create, three parts, then Complete: stall Complete's response past the
        // timeout, so the retry finds the upload already completed.
        let before = server.faults.requests.load(Ordering::SeqCst);
        server.faults.stall_at.store(before + 5, Ordering::SeqCst);
        s.put("ox1/d/slow-complete", big.clone()).await.unwrap();
        // Create, 3 parts, Complete (timed out), Complete again (refused), HEAD.
        assert_eq!(server.faults.requests.load(Ordering::SeqCst) - before, 7);
        assert!(s.get("ox1/d/slow-complete").await.unwrap() == big);
    });
}

#[test]
fn credentials_from_a_command_sign_requests_and_wrong_ones_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let server = start_server(false);
    let dir = tempfile::tempdir().unwrap();
    let helper = |name: &str, secret: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho '{{\"Version\": 1, \"AccessKeyId\": \"{ACCESS}\", \
                 \"SecretAccessKey\": \"{secret}\", \"Expiration\": \"2999-01-01T00:00:00Z\"}}'\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        vec![path.display().to_string()]
    };
    let open = |command: Vec<String>, ex: &Rc<LocalExecutor<'static>>| {
        store_with(&server, CredentialSource::Process { command }, ex)
    };
    run(async |ex| {
        let s = open(helper("good", SECRET), &ex).unwrap();
        s.put("ox1/d/from-a-command", vec![7; 100]).await.unwrap();
        assert_eq!(s.get("ox1/d/from-a-command").await.unwrap(), vec![7; 100]);
        let bad = open(helper("bad", "not-the-secret"), &ex).unwrap();
        let e = bad.put("ox1/d/x", vec![1]).await.unwrap_err();
        assert!(matches!(&e, OxError::Refused { status: 403, .. }), "{e}");

        // A store kept open asks the command again once the store refuses what it
        // gave (keys rotated before their expiry), and only then.
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "not-yet-the-secret").unwrap();
        let path = dir.path().join("rotating");
        let runs = dir.path().join("runs");
        let body = format!(
            "#!/bin/sh\necho x >> {}\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"{ACCESS}\", \"SecretAccessKey\": \"%s\", \"Expiration\": \"2999-01-01T00:00:00Z\"}}' \"$(cat {})\"\n",
            runs.display(),
            secret.display()
        );
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let rotating = open(vec![path.display().to_string()], &ex).unwrap();
        let e = rotating.put("ox1/d/rotated", vec![1]).await.unwrap_err();
        assert!(matches!(&e, OxError::Refused { status: 403, .. }), "{e}");
        std::fs::write(&secret, SECRET).unwrap();
        rotating.put("ox1/d/rotated", vec![2]).await.unwrap();
        rotating.put("ox1/d/rotated", vec![3]).await.unwrap();
        let ran = std::fs::read_to_string(&runs).unwrap().lines().count();
        assert_eq!(ran, 2, "asked again after the refusal, then kept");
    });
}

#[test]
fn a_multipart_upload_cut_short_by_a_cancel_is_aborted() {
    let server = start_server(false);
    run(async |ex| {
        let s = store(&server, SECRET, &ex).unwrap();
        let big: Vec<u8> = (0..13u32 << 20).map(|i| (i % 239) as u8).collect();
        // Create, then the first part: every answer is slow, and the upload's future
        // is dropped once the part is at the server (as a cancelled snapshot drops it).
        let before = server.faults.requests.load(Ordering::SeqCst);
        server.faults.delay_ms.store(300, Ordering::SeqCst);
        let part_sent = async {
            while server.faults.requests.load(Ordering::SeqCst) < before + 2 {
                async_io::Timer::after(Duration::from_millis(5)).await;
            }
            Err::<(), OxError>(OxError::Config("cut short".into()))
        };
        let cut = futures_lite::future::or(s.put("ox1/d/cut-short", big), part_sent).await;
        assert!(cut.is_err());
        server.faults.delay_ms.store(0, Ordering::SeqCst);
        // The abort goes out by itself, in the background, and the store takes it.
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        while server.faults.multipart_aborts.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < give_up, "never aborted");
            async_io::Timer::after(Duration::from_millis(5)).await;
        }
        assert!(
            s.get("ox1/d/cut-short").await.is_err(),
            "nothing was stored"
        );
    });
}
