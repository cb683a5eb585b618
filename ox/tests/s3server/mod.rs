//! An S3 server for tests: `s3s-fs` (the `s3s` crate's S3 protocol over a directory)
//! on loopback, over HTTP or over HTTPS with a throw-away CA from rcgen, with a fault
//! injector in front (503s, dropped connections, stalled bodies). Shared by the `ox`
//! and `perf` test suites.
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

pub const ACCESS: &str = "AKIAOXTEST";
pub const SECRET: &str = "ox-test-secret-key";
pub const BUCKET: &str = "ox-bucket";

type Body = BoxBody<Bytes, std::io::Error>;

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
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
    pub requests: AtomicU32,
    /// Requests being served now, and the most at once.
    pub concurrent: AtomicU32,
    pub max_concurrent: AtomicU32,
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
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
    let fs = s3s_fs::FileSystem::new(dir.path()).unwrap();
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS, SECRET));
    let s3 = builder.build().into_shared();
    let faults = Arc::new(Faults::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
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
            // Without it, small responses wait on the client's delayed ACK (~40 ms).
            let _ = tcp.set_nodelay(true);
            let s3 = s3.clone();
            let faults = Arc::clone(&f);
            let acceptor = acceptor.clone();
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
                    Some(a) => {
                        if let Ok(tls) = a.accept(tcp).await {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
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
    let number = faults.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if faults.stall_at.load(Ordering::SeqCst) == number {
        faults.stall.fetch_add(1, Ordering::SeqCst);
    }
    let now = faults.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
    faults.max_concurrent.fetch_max(now, Ordering::SeqCst);
    let delay = faults.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let result = respond_inner(s3, faults, req).await;
    faults.concurrent.fetch_sub(1, Ordering::SeqCst);
    result
}

async fn respond_inner(
    s3: &s3s::service::SharedS3Service,
    faults: &Faults,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Body>, std::io::Error> {
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
    let resp = hyper::service::Service::call(s3, req)
        .await
        .map_err(|e| io_err(format!("{e:?}")))?;
    let (parts, body) = resp.into_parts();
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
