//! An S3 server for tests: `s3s-fs` (the `s3s` crate's S3 protocol over a directory)
//! on loopback, over HTTP or over HTTPS with a throw-away CA from rcgen, with a fault
//! injector in front (503s, dropped connections, stalled bodies) and, when switched
//! on, [`Chaos`]: seeded random faults on any request — request and response bodies
//! bit-flipped, truncated or swapped, 5xx, connections reset before or after the
//! request is served, slow answers. Shared by the `ox` and `perf` test suites.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;

mod fs;

pub const ACCESS: &str = "AKIAOXTEST";
pub const SECRET: &str = "ox-test-secret-key";
pub const BUCKET: &str = "ox-bucket";
/// Not S3: `GET` here answers the server's request and GET-byte counts as JSON, so a
/// benchmark in another network namespace can read what the server saw.
pub const STATS_PATH: &str = "/_ox_stats";

type Body = BoxBody<Bytes, std::io::Error>;

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// What a server answered: requests, object GETs and their body bytes, listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub requests: u64,
    pub gets: u64,
    pub get_bytes: u64,
    pub lists: u64,
}

/// The counts of the server at `hostport` (in this process or another, such as the
/// network test bed's), read from its [`STATS_PATH`].
pub fn served_at(hostport: &str) -> Served {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(hostport).unwrap();
    write!(s, "GET {STATS_PATH} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let n = |name: &str| v[name].as_u64().unwrap();
    Served {
        requests: n("requests"),
        gets: n("gets"),
        get_bytes: n("get_bytes"),
        lists: n("lists"),
    }
}

/// Faults to inject into the next requests.
#[derive(Default)]
pub struct Faults {
    pub unavailable: AtomicU32,
    pub drop: AtomicU32,
    pub stall: AtomicU32,
    /// Stall the response of the request with this number (1-based, 0: none).
    pub stall_at: AtomicU32,
    /// Delay every request by this many milliseconds (a slow store).
    pub delay_ms: AtomicU32,
    /// Hold each PUT of a data object (a key under `ox1/d/`) until this many requests
    /// are being served at once (0: none), or until no request has come for 3 s (the
    /// client sends no more while these wait; a client ten times slower than this
    /// machine encodes an object well within that); then let them all go on (and set
    /// it back to 0).
    pub gather: AtomicU32,
    pub requests: AtomicU32,
    /// Requests being served now, and the most at once.
    pub concurrent: AtomicU32,
    pub max_concurrent: AtomicU32,
    /// Seeded random faults, when set.
    pub chaos: std::sync::Mutex<Option<Arc<Chaos>>>,
    /// Each request's `Host` and whether it was signed in the `Authorization` header
    /// (else in the query string).
    pub seen: std::sync::Mutex<Vec<(String, bool)>>,
    /// Each PUT's digests: whether it was an UploadPart, carried `Content-MD5`, and
    /// `x-amz-checksum-crc32c`.
    pub put_digests: std::sync::Mutex<Vec<(bool, bool, bool)>>,
    /// Answer PUTs without the `x-amz-checksum-crc32c` they were sent, as a store
    /// that ignores it does.
    pub hide_crc32c: std::sync::atomic::AtomicBool,
    /// TLS handshakes that failed (the client did not trust the certificate).
    pub tls_refused: AtomicU32,
    /// Object GETs answered with a body, and the bytes of those bodies (counted at
    /// the server, as a benchmark wants them).
    pub gets: std::sync::atomic::AtomicU64,
    pub get_bytes: std::sync::atomic::AtomicU64,
    /// Listings (ListObjectsV2 pages) answered.
    pub lists: std::sync::atomic::AtomicU64,
    /// Multipart uploads aborted (DELETE with an uploadId, answered with success).
    pub multipart_aborts: AtomicU32,
    /// Where the objects are (s3s-fs's root), for conditional PUTs: s3s-fs ignores
    /// `If-None-Match` and `If-Match`, so the server checks them in front of it, as S3
    /// does (the ETag of an object put whole is its MD5, as s3s-fs gives it).
    pub root: std::sync::OnceLock<std::path::PathBuf>,
    /// Conditional PUTs refused (412).
    pub preconditions_failed: AtomicU32,
    /// TCP connections accepted.
    pub connections: AtomicU32,
    /// Hold this many of the next ranged GETs (a clone's frames and index pages)
    /// unanswered until `let_go` is set; `holding` counts those held now.
    pub hold_gets: AtomicU32,
    pub holding: AtomicU32,
    pub let_go: std::sync::atomic::AtomicBool,
    /// Seconds the `Date` of every answer is ahead of this machine's clock (negative:
    /// behind), as a server with a clock off would send it (its signature checks keep
    /// this machine's clock).
    pub clock_offset_s: std::sync::atomic::AtomicI64,
}

/// Whether `req`, a PUT with `If-None-Match: *` or `If-Match: ETAG`, finds the object
/// otherwise than its condition asks.
fn precondition_failed(faults: &Faults, req: &hyper::Request<hyper::body::Incoming>) -> bool {
    if req.method() != hyper::Method::PUT
        || req.uri().query().is_some_and(|q| q.contains("uploadId="))
    {
        return false;
    }
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let (none_match, if_match) = (header("if-none-match"), header("if-match"));
    if none_match.is_none() && if_match.is_none() {
        return false;
    }
    let Some(root) = faults.root.get() else {
        return false;
    };
    let path = req.uri().path().trim_start_matches('/');
    let virtual_host = header("host").is_some_and(|h| h.starts_with(&format!("{BUCKET}.")));
    let file = if virtual_host {
        root.join(BUCKET).join(path)
    } else {
        root.join(path)
    };
    let current = std::fs::read(&file).ok();
    if none_match == Some("*") && current.is_some() {
        return true;
    }
    match (if_match, current) {
        (Some(_), None) => true,
        (Some(tag), Some(bytes)) => {
            use md5::Digest;
            let md5 = hex::encode(md5::Md5::digest(&bytes));
            tag.trim_matches('"') != md5
        }
        (None, _) => false,
    }
}

/// The kinds of fault [`Chaos`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A bit of the request body flipped on its way to the store.
    PutFlip,
    /// The request body cut short.
    PutTruncate,
    /// The request body replaced by another's.
    PutSwap,
    /// A bit of the response body flipped.
    GetFlip,
    /// The response body cut short (with a matching Content-Length).
    GetTruncate,
    /// The response body replaced by another of the same length.
    GetSwap,
    /// HTTP 500 or 503.
    ServerError,
    /// The connection dropped before the request is served.
    ResetBefore,
    /// The connection dropped after the request is served (its answer lost).
    ResetAfter,
    /// The answer held back for a while.
    Slow,
}

pub const FAULTS: [Fault; 10] = [
    Fault::PutFlip,
    Fault::PutTruncate,
    Fault::PutSwap,
    Fault::GetFlip,
    Fault::GetTruncate,
    Fault::GetSwap,
    Fault::ServerError,
    Fault::ResetBefore,
    Fault::ResetAfter,
    Fault::Slow,
];

/// Seeded random faults: each request draws from the seed and its number whether it
/// is hit (`per_mille` in a thousand) and how. A request (method, path, range) is hit
/// at most twice in a row, so what a client retries (and refetches) gets through.
pub struct Chaos {
    pub seed: u64,
    per_mille: u64,
    drawn: std::sync::atomic::AtomicU64,
    injected: [AtomicU32; 10],
    streak: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    recent: std::sync::Mutex<Vec<Bytes>>,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Chaos {
    pub fn new(seed: u64, per_mille: u64) -> Arc<Self> {
        Arc::new(Self {
            seed,
            per_mille,
            drawn: std::sync::atomic::AtomicU64::new(0),
            injected: Default::default(),
            streak: Default::default(),
            recent: Default::default(),
        })
    }

    /// Faults injected so far, by kind.
    pub fn injected(&self) -> Vec<(Fault, u32)> {
        FAULTS
            .iter()
            .zip(&self.injected)
            .map(|(f, n)| (*f, n.load(Ordering::SeqCst)))
            .collect()
    }

    /// Faults injected so far.
    pub fn total(&self) -> u32 {
        self.injected.iter().map(|n| n.load(Ordering::SeqCst)).sum()
    }

    fn draw(&self) -> u64 {
        let n = self.drawn.fetch_add(1, Ordering::SeqCst);
        mix(self.seed ^ mix(n))
    }

    /// The fault for a request, if it is hit: `put` (a body sent), `get` (an object's
    /// body answered) or neither.
    fn pick(&self, signature: &str, put: bool, get: bool) -> Option<Fault> {
        let r = self.draw();
        let mut streak = self.streak.lock().unwrap();
        let s = streak.entry(signature.to_string()).or_default();
        // Uploads are few beside the reads: they are hit three times as often.
        let per_mille = if put {
            (3 * self.per_mille).min(600)
        } else {
            self.per_mille
        };
        if r % 1000 >= per_mille || *s >= 2 {
            *s = 0;
            return None;
        }
        *s += 1;
        // What damages the body, for requests that carry one; then what any request
        // may meet — a lost answer only where resending is harmless (uploads, reads).
        // (The order is the seed's: a seed repeats a run only if it stays.)
        let damage: &[Fault] = match (put, get) {
            (true, _) => &[Fault::PutFlip, Fault::PutTruncate, Fault::PutSwap],
            (false, true) => &[Fault::GetFlip, Fault::GetTruncate, Fault::GetSwap],
            _ => &[],
        };
        let lost: &[Fault] = if put || get {
            &[Fault::ResetAfter]
        } else {
            &[]
        };
        let kinds: Vec<Fault> = [
            damage,
            &[Fault::ServerError, Fault::ResetBefore],
            lost,
            &[Fault::Slow],
        ]
        .concat();
        let f = kinds[((r >> 20) % kinds.len() as u64) as usize];
        let i = FAULTS.iter().position(|k| *k == f).unwrap();
        self.injected[i].fetch_add(1, Ordering::SeqCst);
        Some(f)
    }

    /// Damages `body` as `fault` says (flip, truncate or swap); `r` picks where.
    fn damage(&self, fault: Fault, body: Bytes, r: u64) -> Bytes {
        if body.is_empty() {
            return body;
        }
        let mut v = body.to_vec();
        match fault {
            Fault::PutFlip | Fault::GetFlip => {
                let bit = (r % (v.len() as u64 * 8)) as usize;
                v[bit / 8] ^= 1 << (bit % 8);
            }
            Fault::PutTruncate | Fault::GetTruncate => v.truncate((r % v.len() as u64) as usize),
            Fault::PutSwap | Fault::GetSwap => {
                let recent = self.recent.lock().unwrap();
                match recent.iter().find(|b| b.len() == v.len() && b[..] != v[..]) {
                    Some(other) => v = other.to_vec(),
                    None => v.reverse(),
                }
                if v == body[..] {
                    v[0] ^= 0x80;
                }
            }
            _ => {}
        }
        Bytes::from(v)
    }

    fn remember(&self, body: &Bytes) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() >= 64 {
            recent.remove(0);
        }
        recent.push(body.clone());
    }
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

pub struct Server {
    pub addr: SocketAddr,
    pub faults: Arc<Faults>,
    pub ca_pem: Option<tempfile::NamedTempFile>,
    _rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

pub fn start_server(tls: bool) -> Server {
    start_server_with(tls, false)
}

/// `virtual_hosts`: the server is `localhost:PORT` and takes virtual-hosted requests
/// (`BUCKET.localhost:PORT`) as well as path-style ones.
pub fn start_server_with(tls: bool, virtual_hosts: bool) -> Server {
    start_server_on("127.0.0.1:0", tls, virtual_hosts.then_some(""), 1)
}

/// A plain-HTTP server listening on `bind` with `threads` worker threads (the
/// stand-alone server of the network test bed); with `domain` (`HOST:PORT`), it takes
/// virtual-hosted requests (`BUCKET.HOST:PORT`) too.
pub fn start_server_at(bind: &str, threads: usize, domain: Option<&str>) -> Server {
    start_server_on(bind, false, domain, threads)
}

/// `domain`: `Some("")` for `localhost:PORT`.
fn start_server_on(bind: &str, tls: bool, domain: Option<&str>, threads: usize) -> Server {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind(bind)).unwrap();
    let addr = listener.local_addr().unwrap();
    let fs = fs::Fs::new(dir.path());
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS, SECRET));
    if let Some(domain) = domain {
        let domain = match domain {
            "" => format!("localhost:{}", addr.port()),
            d => d.to_string(),
        };
        builder.set_host(s3s::host::SingleDomain::new(&domain).unwrap());
    }
    let s3 = builder.build().into_shared();
    let faults = Arc::new(Faults::default());
    let _ = faults.root.set(dir.path().to_path_buf());
    let (acceptor, ca_pem) = if tls {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
        let mut pem = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut pem, ca.pem().as_bytes()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
        (
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            Some(pem),
        )
    } else {
        (None, None)
    };
    let f = Arc::clone(&faults);
    rt.spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            f.connections.fetch_add(1, Ordering::SeqCst);
            // Without it, small responses wait on the client's delayed ACK (~40 ms).
            let _ = tcp.set_nodelay(true);
            let s3 = s3.clone();
            let faults = Arc::clone(&f);
            let acceptor = acceptor.clone();
            let refused = Arc::clone(&f);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let s3 = s3.clone();
                    let faults = Arc::clone(&faults);
                    async move { respond(&s3, &faults, req).await }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                match acceptor {
                    Some(a) => match a.accept(tcp).await {
                        Ok(tls) => {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                        Err(_) => {
                            refused.tls_refused.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                            .await;
                    }
                }
            });
        }
    });
    Server {
        addr,
        faults,
        ca_pem,
        _rt: rt,
        dir,
    }
}

async fn respond(
    s3: &s3s::service::SharedS3Service,
    faults: &Faults,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    if req.uri().path() == STATS_PATH {
        let body = format!(
            "{{\"requests\":{},\"gets\":{},\"get_bytes\":{},\"lists\":{}}}",
            faults.requests.load(Ordering::SeqCst),
            faults.gets.load(Ordering::SeqCst),
            faults.get_bytes.load(Ordering::SeqCst),
            faults.lists.load(Ordering::SeqCst)
        );
        return hyper::Response::builder()
            .body(full(Bytes::from(body)))
            .map_err(io_err);
    }
    let number = faults.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let in_header = req.headers().contains_key(hyper::header::AUTHORIZATION);
    faults.seen.lock().unwrap().push((host, in_header));
    if req.method() == hyper::Method::PUT {
        let part = req.uri().query().is_some_and(|q| q.contains("uploadId="));
        let has = |name: &str| req.headers().contains_key(name);
        let digests = (part, has("content-md5"), has("x-amz-checksum-crc32c"));
        faults.put_digests.lock().unwrap().push(digests);
    }
    if precondition_failed(faults, &req) {
        faults.preconditions_failed.fetch_add(1, Ordering::SeqCst);
        let body = "<Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>";
        return hyper::Response::builder()
            .status(412)
            .body(full(Bytes::from(body)))
            .map_err(io_err);
    }
    let abort = req.method() == hyper::Method::DELETE
        && req.uri().query().is_some_and(|q| q.contains("uploadId="));
    if faults.stall_at.load(Ordering::SeqCst) == number {
        faults.stall.fetch_add(1, Ordering::SeqCst);
    }
    let now = faults.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
    faults.max_concurrent.fetch_max(now, Ordering::SeqCst);
    let delay = faults.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let data_put = req.method() == hyper::Method::PUT && req.uri().path().contains("/ox1/d/");
    let (mut seen, mut since) = (number, std::time::Instant::now());
    while data_put && faults.gather.load(Ordering::SeqCst) > 0 {
        let gather = faults.gather.load(Ordering::SeqCst);
        let now = faults.requests.load(Ordering::SeqCst);
        if now != seen {
            (seen, since) = (now, std::time::Instant::now());
        }
        if faults.concurrent.load(Ordering::SeqCst) >= gather
            || since.elapsed() > Duration::from_secs(3)
        {
            faults.gather.store(0, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ranged_get =
        req.method() == hyper::Method::GET && req.headers().contains_key(hyper::header::RANGE);
    let held = ranged_get
        && faults
            .hold_gets
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if held {
        faults.holding.fetch_add(1, Ordering::SeqCst);
        while !faults.let_go.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        faults.holding.fetch_sub(1, Ordering::SeqCst);
    }
    let put = req.method() == hyper::Method::PUT;
    let mut result = respond_inner(s3, faults, req).await;
    if put
        && faults.hide_crc32c.load(Ordering::SeqCst)
        && let Ok(resp) = &mut result
    {
        resp.headers_mut().remove("x-amz-checksum-crc32c");
    }
    let offset = faults.clock_offset_s.load(Ordering::SeqCst);
    if offset != 0
        && let Ok(resp) = &mut result
    {
        let (now, by) = (
            std::time::SystemTime::now(),
            Duration::from_secs(offset.unsigned_abs()),
        );
        let date = if offset < 0 { now - by } else { now + by };
        let date = hyper::header::HeaderValue::from_str(&httpdate::fmt_http_date(date)).unwrap();
        resp.headers_mut().insert(hyper::header::DATE, date);
    }
    faults.concurrent.fetch_sub(1, Ordering::SeqCst);
    if abort && result.as_ref().is_ok_and(|r| r.status().is_success()) {
        faults.multipart_aborts.fetch_add(1, Ordering::SeqCst);
    }
    result
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|e: Infallible| match e {}).boxed()
}

/// Serves `req` with `chaos` deciding whether and how to damage it.
async fn respond_chaos(
    s3: &s3s::service::SharedS3Service,
    chaos: &Chaos,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // An object is /bucket/key; a listing is the bucket itself.
    let object = path.trim_start_matches('/').contains('/');
    let put = method == hyper::Method::PUT && object;
    let get = method == hyper::Method::GET && object && !query.contains("list-type");
    let signature = format!("{method} {path} {range}");
    let fault = chaos.pick(&signature, put, get);
    let r = chaos.draw();
    match fault {
        Some(Fault::ServerError) => {
            let status = if r.is_multiple_of(2) { 500 } else { 503 };
            let body = "<Error><Code>InternalError</Code><Message>injected</Message></Error>";
            return hyper::Response::builder()
                .status(status)
                .body(full(Bytes::from(body)))
                .map_err(io_err);
        }
        Some(Fault::ResetBefore) => return Err(io_err("injected reset before serving")),
        Some(Fault::Slow) => tokio::time::sleep(Duration::from_millis(200 + r % 500)).await,
        _ => {}
    }
    let (mut parts, body) = req.into_parts();
    let mut bytes = BodyExt::collect(body).await.map_err(io_err)?.to_bytes();
    if put {
        chaos.remember(&bytes);
    }
    if let Some(f @ (Fault::PutFlip | Fault::PutTruncate | Fault::PutSwap)) = fault {
        bytes = chaos.damage(f, bytes, r);
        parts
            .headers
            .insert(hyper::header::CONTENT_LENGTH, bytes.len().into());
    }
    let resp = s3
        .as_ref()
        .call(hyper::Request::from_parts(parts, s3s::Body::from(bytes)))
        .await
        .map_err(|e| io_err(format!("{e:?}")))?;
    if fault == Some(Fault::ResetAfter) {
        return Err(io_err("injected reset after serving"));
    }
    let (mut parts, body) = resp.into_parts();
    let mut bytes = BodyExt::collect(body).await.map_err(io_err)?.to_bytes();
    if get && parts.status.is_success() {
        chaos.remember(&bytes);
        if let Some(f @ (Fault::GetFlip | Fault::GetTruncate | Fault::GetSwap)) = fault {
            bytes = chaos.damage(f, bytes, r);
        }
    }
    parts.headers.remove(hyper::header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(hyper::header::CONTENT_LENGTH, bytes.len().into());
    Ok(hyper::Response::from_parts(parts, full(bytes)))
}

async fn respond_inner(
    s3: &s3s::service::SharedS3Service,
    faults: &Faults,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
    let chaos = faults.chaos.lock().unwrap().clone();
    if let Some(chaos) = chaos {
        return respond_chaos(s3, &chaos, req).await;
    }
    if take(&faults.unavailable) {
        let body = "<Error><Code>SlowDown</Code><Message>injected</Message></Error>";
        return hyper::Response::builder()
            .status(503)
            .body(
                Full::new(Bytes::from(body))
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            )
            .map_err(io_err);
    }
    if take(&faults.drop) {
        // An error from the service makes hyper drop the connection without a response.
        return Err(io_err("injected connection drop"));
    }
    let list = req.method() == hyper::Method::GET
        && req.uri().query().is_some_and(|q| q.contains("list-type=2"));
    let get = req.method() == hyper::Method::GET
        && req.uri().path().trim_start_matches('/').contains('/')
        && !list;
    let resp = hyper::service::Service::call(s3, req)
        .await
        .map_err(|e| io_err(format!("{e:?}")))?;
    let (parts, body) = resp.into_parts();
    if get && parts.status.is_success() {
        let len = parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        faults.gets.fetch_add(1, Ordering::SeqCst);
        faults.get_bytes.fetch_add(len, Ordering::SeqCst);
    }
    if list && parts.status.is_success() {
        faults.lists.fetch_add(1, Ordering::SeqCst);
    }
    if take(&faults.stall) {
        let bytes = BodyExt::collect(body).await.map_err(io_err)?.to_bytes();
        let half = bytes.len() / 2;
        let (a, b) = (bytes.slice(..half), bytes.slice(half..));
        let stream = futures_lite::stream::iter([a, b]).then(|chunk| async move {
            if chunk.is_empty() {
                return Ok::<_, std::io::Error>(Frame::data(chunk));
            }
            tokio::time::sleep(Duration::from_millis(2000)).await;
            Ok(Frame::data(chunk))
        });
        let mut r = hyper::Response::from_parts(parts, BodyExt::boxed(StreamBody::new(stream)));
        // Keep the advertised length: the client waits for the rest.
        r.headers_mut().remove(hyper::header::TRANSFER_ENCODING);
        return Ok(r);
    }
    Ok(hyper::Response::from_parts(
        parts,
        BodyExt::boxed(body.map_err(io_err)),
    ))
}

impl Server {
    /// Client settings for this server over plain HTTP (tests' own credentials).
    pub fn client_config(&self) -> ox::store::s3::S3Config {
        let mut c = ox::store::s3::S3Config::new(
            format!("http://127.0.0.1:{}", self.addr.port())
                .parse()
                .unwrap(),
            BUCKET,
            "us-east-1",
            ox::store::s3::CredentialSource::Static {
                access_key: ACCESS.into(),
                secret_key: SECRET.into(),
            },
        );
        c.allow_http = true;
        c
    }
}
