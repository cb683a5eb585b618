//! A small HTTP/1.1 client for object stores: hyper on async-io sockets, TLS through
//! rustls (system roots or a custom CA bundle), kept-alive connections reused per
//! host, a deadline on every request, and, if set, a limit on the requests in flight.
//! It runs on an OX core's local executor.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_executor::LocalExecutor;
use async_io::{Async, Timer};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use futures_rustls::TlsConnector;
use futures_rustls::rustls::pki_types::pem::PemObject;
use futures_rustls::rustls::pki_types::{CertificateDer, ServerName};
use futures_rustls::rustls::{self, ClientConfig, RootCertStore};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use smol_hyper::rt::FuturesIo;
use url::Url;

use crate::error::OxError;
use crate::store::slots::Slots;

/// Largest response body accepted.
const MAX_BODY: usize = 1 << 30;

/// A transport-level failure: worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Connecting (DNS, TCP) failed.
    #[error("cannot connect to {host}: {source}")]
    Connect {
        /// Host:port.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed (for example an untrusted certificate).
    #[error("TLS with {host} failed: {source}")]
    Tls {
        /// Host.
        host: String,
        /// Why.
        source: std::io::Error,
    },
    /// The request did not finish in time (slow server, stalled body).
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
    /// The connection broke or the response was malformed.
    #[error("HTTP exchange failed: {0}")]
    Protocol(String),
}

impl HttpError {
    /// Whether a retry might succeed: a certificate the configured trust does not
    /// vouch for will not go away; a connection dropped mid-handshake (a store or a
    /// load balancer restarting) may.
    pub fn retryable(&self) -> bool {
        match self {
            Self::Tls { source, .. } => !untrusted(source),
            _ => true,
        }
    }
}

/// Whether a TLS failure is about the server's certificate (a configuration error) rather
/// than the connection.
fn untrusted(e: &std::io::Error) -> bool {
    use rustls::{AlertDescription as A, Error};
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(_) | Error::NoCertificatesPresented) => true,
        Some(Error::AlertReceived(alert)) => matches!(
            alert,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
        ),
        _ => false,
    }
}

/// A response with its whole body.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

/// What an answer's `Date` header says of the server's clock beside ours: the date
/// (whole seconds, as HTTP gives it) and our wall clock when the request was sent and
/// when its answer's head came. The server stamped the answer between the two, so its
/// clock's offset from ours lies within [`Self::offset_bounds`] however long the
/// exchange took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerClock {
    /// The answer's `Date`.
    pub date: SystemTime,
    /// Our wall clock as the request was sent.
    pub sent: SystemTime,
    /// Our wall clock as the answer's head came.
    pub answered: SystemTime,
}

impl ServerClock {
    /// The least and the most the server's clock can be ahead of ours, in seconds
    /// (negative: behind): at some moment of ours in `[sent, answered]` its clock read
    /// a time in `[date, date + 2 s)` — the date's second, or the one after it where
    /// the server renders its `Date` once a second and stamps that (hyper does).
    pub fn offset_bounds(&self) -> (f64, f64) {
        let secs = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        let (date, sent, answered) = (secs(self.date), secs(self.sent), secs(self.answered));
        (date - answered, date + 2.0 - sent)
    }
}

/// TLS trust: which certificates may vouch for servers.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The operating system's root store.
    System,
    /// Only the CAs in this PEM bundle.
    CaBundle(std::path::PathBuf),
}

/// Builds the rustls configuration for `trust`.
pub fn tls_config(trust: &Trust) -> Result<Arc<ClientConfig>, OxError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(OxError::Config(
                    "no system root certificates found; configure a CA bundle".into(),
                ));
            }
        }
        Trust::CaBundle(path) => add_bundle(&mut roots, path)?,
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OxError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn add_bundle(roots: &mut RootCertStore, path: &Path) -> Result<(), OxError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| OxError::Config(format!("CA bundle {}: {e}", path.display())))?;
    let mut n = 0;
    for cert in certs {
        let cert =
            cert.map_err(|e| OxError::Config(format!("CA bundle {}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| OxError::Config(format!("CA bundle {}: {e}", path.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(OxError::Config(format!(
            "CA bundle {} holds no certificates",
            path.display()
        )));
    }
    Ok(())
}

type Sender = SendRequest<Full<Bytes>>;

/// The HTTP client. One per OX core; not shared between threads.
pub struct HttpClient {
    executor: Rc<LocalExecutor<'static>>,
    tls: Option<Arc<ClientConfig>>,
    timeout: Duration,
    idle: RefCell<HashMap<(bool, String, u16), Vec<Sender>>>,
    /// Connect here instead of where the URL's host resolves (the host still names
    /// the server: `Host`, TLS server name).
    connect_to: Option<std::net::SocketAddr>,
    /// The TCP maximum segment size of the last plain-HTTP connection made, if one was:
    /// see [`Self::segment_size`].
    segment: Cell<Option<u32>>,
    /// The quickest answer so far: see [`Self::round_trip`].
    quickest_answer: Cell<Option<Duration>>,
    /// The most requests in flight at once, if limited ([`Self::limit_requests`]).
    slots: OnceCell<Slots>,
    /// The latest answer's `Date` beside our clock: see [`Self::server_clock`].
    clock: Cell<Option<ServerClock>>,
    /// Connections open now (in use or kept alive): see [`Self::request_room`].
    open: Rc<Cell<usize>>,
}

/// Where a client with a limit on its requests in flight stands against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRoom {
    /// The most requests in flight at once.
    pub most: usize,
    /// Requests that could be sent now without waiting for a turn (none while some
    /// wait).
    pub free: usize,
    /// Connections open now, in use or kept alive: fewer than `most` means requests to
    /// come may open new ones, whose TCP windows start small.
    pub open: usize,
}

/// One open connection, counted in [`HttpClient::request_room`] until its task ends.
struct Counted(Rc<Cell<usize>>);

impl Counted {
    fn new(open: &Rc<Cell<usize>>) -> Self {
        open.set(open.get() + 1);
        Self(Rc::clone(open))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let open = self.0.get();
        assert!(open > 0, "a connection closed that was never counted open");
        self.0.set(open - 1);
    }
}

impl HttpClient {
    /// A client spawning its connection tasks on `executor`. `tls` is needed for
    /// `https` URLs; `timeout` bounds every request once sent, body included (not its
    /// wait for a turn under [`Self::limit_requests`]).
    pub fn new(
        executor: Rc<LocalExecutor<'static>>,
        tls: Option<Arc<ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        Self {
            executor,
            tls,
            timeout,
            idle: RefCell::new(HashMap::new()),
            connect_to: None,
            segment: Cell::new(None),
            quickest_answer: Cell::new(None),
            slots: OnceCell::new(),
            clock: Cell::new(None),
            open: Rc::new(Cell::new(0)),
        }
    }

    /// The TCP maximum segment size of this client's plain-HTTP connections (the last
    /// one made), once one is made; `None` before, and over TLS only. A server that
    /// leaves Nagle's algorithm on holds the last segment of a small answer while one it
    /// sent before (the headers) is unacknowledged: one round trip more, which no ACK
    /// of ours can save. An answer whose body is a whole number of segments has no such
    /// last segment, so a ranged GET may ask for a little more to end on one (see
    /// `S3Store`). Both ends' segment sizes are the smaller of the two ends' MTUs less
    /// headers, so ours is the server's on a symmetric path; a wrong one costs only the
    /// bytes asked for in vain. Under TLS the records' framing hides where segments
    /// end, so nothing is offered there.
    pub fn segment_size(&self) -> Option<u32> {
        self.segment.get()
    }

    /// The least time a request without a body has waited for its answer's head (from
    /// the request's sending, on a connection already open; an answer of 5xx, 408 or
    /// 429 aside), if one was sent: the round trip to the server and its time to a
    /// first byte, never how long a body took nor a connection's handshake. A body's
    /// time grows with its size and with what else shares the link (a new connection's
    /// first bodies are slow while TCP's window opens); the head comes one round trip
    /// after the request whatever the body is.
    pub fn round_trip(&self) -> Option<Duration> {
        self.quickest_answer.get()
    }

    /// What the latest answer that carried a `Date` (of any status: a refusal's too)
    /// says of the server's clock, if one has: how a store check tells a clock that
    /// would have requests refused (SigV4 allows 15 minutes) from a wrong secret.
    pub fn server_clock(&self) -> Option<ServerClock> {
        self.clock.get()
    }

    /// A client of the same settings and executor with no connections of its own (nor
    /// a limit on its requests), and that executor: for a request that must outlive the
    /// caller (sent from a drop).
    pub fn detached(&self) -> (Self, Rc<LocalExecutor<'static>>) {
        let client = Self {
            executor: Rc::clone(&self.executor),
            tls: self.tls.clone(),
            timeout: self.timeout,
            idle: RefCell::new(HashMap::new()),
            connect_to: self.connect_to,
            segment: Cell::new(self.segment.get()),
            quickest_answer: Cell::new(self.quickest_answer.get()),
            slots: OnceCell::new(),
            clock: Cell::new(self.clock.get()),
            open: Rc::new(Cell::new(0)),
        };
        (client, Rc::clone(&self.executor))
    }

    /// Sends at most `most` requests at once from now on (so opens at most that many
    /// connections, [`Self::request_fresh`]'s aside): a request past it waits its
    /// turn, outside its timeout, first come first served. The first limit set stays.
    pub fn limit_requests(&self, most: usize) {
        let _ = self.slots.set(Slots::new(most));
    }

    /// Where this client stands against its limit on requests
    /// ([`Self::limit_requests`]); `None` if requests are not limited.
    pub fn request_room(&self) -> Option<RequestRoom> {
        self.slots.get().map(|slots| RequestRoom {
            most: slots.most(),
            free: slots.free(),
            open: self.open.get(),
        })
    }

    /// Connects to `addr` whatever the URLs' hosts resolve to (split-horizon names,
    /// test beds), still naming the host in `Host` and to TLS.
    pub fn with_connect_to(mut self, addr: Option<std::net::SocketAddr>) -> Self {
        self.connect_to = addr;
        self
    }

    /// Sends one request and reads the whole response, within the timeout.
    pub async fn request(
        &self,
        method: hyper::Method,
        url: &Url,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Result<Response, HttpError> {
        self.request_on(method, url, headers, body.into(), false)
            .await
    }

    /// [`Self::request`] over a new connection, never a kept-alive one (for fetching
    /// again what came damaged over another).
    pub async fn request_fresh(
        &self,
        method: hyper::Method,
        url: &Url,
        headers: &[(&str, String)],
        body: impl Into<Bytes>,
    ) -> Result<Response, HttpError> {
        self.request_on(method, url, headers, body.into(), true)
            .await
    }

    async fn request_on(
        &self,
        method: hyper::Method,
        url: &Url,
        headers: &[(&str, String)],
        body: Bytes,
        fresh: bool,
    ) -> Result<Response, HttpError> {
        let _slot = match self.slots.get() {
            Some(slots) => Some(slots.acquire().await),
            None => None,
        };
        let exchange = self.exchange(method, url, headers, body, fresh);
        let deadline = async {
            Timer::after(self.timeout).await;
            Err(HttpError::Timeout(self.timeout))
        };
        futures_lite::future::or(exchange, deadline).await
    }

    async fn exchange(
        &self,
        method: hyper::Method,
        url: &Url,
        headers: &[(&str, String)],
        body: Bytes,
        fresh: bool,
    ) -> Result<Response, HttpError> {
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(HttpError::Protocol(format!("unsupported scheme {other}"))),
        };
        let host = url
            .host_str()
            .ok_or_else(|| HttpError::Protocol("URL without a host".into()))?
            .to_string();
        let port = url
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        let pool_key = (https, host.clone(), port);
        let idle = if fresh {
            None
        } else {
            self.take_idle(&pool_key)
        };
        let mut sender = match idle {
            Some(s) => s,
            None => self.connect(https, &host, port).await?,
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host_header)
            .header(hyper::header::CONTENT_LENGTH, body.len());
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let bodiless = body.is_empty();
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let (sent, sent_wall) = (Instant::now(), SystemTime::now());
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        let status = resp.status().as_u16();
        // An unreadable `Date` is not this client's concern: it keeps the reading before.
        if let Some(date) = resp
            .headers()
            .get(hyper::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
        {
            self.clock.set(Some(ServerClock {
                date,
                sent: sent_wall,
                answered: SystemTime::now(),
            }));
        }
        // A 5xx, 408 or 429 may come from something nearer than the server (a proxy, a
        // load balancer) or before the request was read: not a round trip.
        if bodiless && status < 500 && status != 408 && status != 429 {
            let waited = sent.elapsed();
            if self.quickest_answer.get().is_none_or(|q| waited < q) {
                self.quickest_answer.set(Some(waited));
            }
        }
        let headers = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| HttpError::Protocol(format!("reading the body: {e}")))?
            .to_bytes()
            .to_vec();
        let reusable = !headers
            .get(hyper::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if reusable && !sender.is_closed() {
            self.idle
                .borrow_mut()
                .entry(pool_key)
                .or_default()
                .push(sender);
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn take_idle(&self, key: &(bool, String, u16)) -> Option<Sender> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        while let Some(s) = list.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    async fn connect(&self, https: bool, host: &str, port: u16) -> Result<Sender, HttpError> {
        let target = format!("{host}:{port}");
        let addr = match self.connect_to {
            Some(addr) => addr,
            None => resolve(host, port)
                .await
                .map_err(|source| HttpError::Connect {
                    host: target.clone(),
                    source,
                })?,
        };
        let tcp = Async::<TcpStream>::connect(addr)
            .await
            .map_err(|source| HttpError::Connect {
                host: target.clone(),
                source,
            })?;
        let _ = tcp.get_ref().set_nodelay(true);
        if !https && let Ok(mss) = socket2::SockRef::from(tcp.get_ref()).tcp_mss() {
            self.segment.set(Some(mss).filter(|&m| m > 0));
        }
        let tcp = QuickAck(tcp);
        if https {
            let config = self
                .tls
                .clone()
                .ok_or_else(|| HttpError::Protocol("https URL but no TLS configuration".into()))?;
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| HttpError::Protocol(format!("bad server name {host}: {e}")))?;
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| HttpError::Tls {
                    host: target.clone(),
                    source,
                })?;
            self.handshake(FuturesIo::new(tls)).await
        } else {
            self.handshake(FuturesIo::new(tcp)).await
        }
    }

    async fn handshake<T>(&self, io: FuturesIo<T>) -> Result<Sender, HttpError>
    where
        T: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin + 'static,
    {
        // Written vectored (`writev`; rustls takes the slices as one record stream): by
        // default hyper asks the connection, and told no (`FuturesIo`'s answer) it
        // copies every request body into its own buffer before writing it — each
        // object a snapshot PUT, copied once more on the OX core — and keeps that
        // buffer's size with the pooled connection.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .writev(true)
            .handshake(io)
            .await
            .map_err(|e| HttpError::Protocol(e.to_string()))?;
        // The connection task ends when the connection closes or the sender drops.
        let counted = Counted::new(&self.open);
        self.executor
            .spawn(async move {
                let _counted = counted;
                let _ = conn.await;
            })
            .detach();
        Ok(sender)
    }
}

/// A connection to a store that acknowledges what it receives at once. A server that
/// leaves Nagle's algorithm on (Garage does) holds a response's last small segment until
/// what it sent before is acknowledged, and Linux delays a client's ACKs (40 ms or more)
/// on a connection that answers what it receives: every small response on a kept-alive
/// connection would wait for that timer. Quick ACKs, turned on after each read and
/// write, send the pending ACK as the response is read. The kernel may turn them off
/// again (the option is not permanent), hence every time; a failure to set it only
/// costs that wait.
struct QuickAck(Async<TcpStream>);

impl QuickAck {
    /// After a read or write that moved bytes: quick ACKs on again. Passes `moved` on.
    fn ack_at_once(&self, moved: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if matches!(moved, Poll::Ready(Ok(n)) if n > 0) {
            let _ = socket2::SockRef::from(self.0.get_ref()).set_tcp_quickack(true);
        }
        moved
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.0).poll_read(cx, buf);
        this.ack_at_once(read)
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.0).poll_write(cx, buf);
        this.ack_at_once(written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.0).poll_write_vectored(cx, bufs);
        this.ack_at_once(written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_close(cx)
    }
}

/// The first address of `host`: an IP literal at once; a name looked up on a thread of
/// its own, so that a slow or unreachable DNS server never stalls the OX core (and the
/// fetches of every clone on it) that is opening the connection.
async fn resolve(host: &str, port: u16) -> std::io::Result<std::net::SocketAddr> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = literal.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, port));
    }
    let (tx, rx) = async_channel::bounded(1);
    let name = host.to_string();
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || {
            let first = (name.as_str(), port).to_socket_addrs().and_then(|mut a| {
                a.next()
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
            });
            let _ = tx.try_send(first);
        })?;
    let answer = futures_lite::future::or(async { Some(rx.recv().await) }, async {
        async_io::Timer::after(NAME_LOOKUP_PATIENCE).await;
        None
    })
    .await;
    match answer {
        Some(Ok(first)) => first,
        Some(Err(_)) => Err(std::io::Error::other(
            "the name lookup thread ended without an answer",
        )),
        // The thread finishes on its own; its answer is dropped.
        None => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("looking up {host} took longer than {NAME_LOOKUP_PATIENCE:?}"),
        )),
    }
}

/// How long a connection waits for its endpoint's name to be looked up.
const NAME_LOOKUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use futures_lite::AsyncReadExt;

    use super::*;

    /// A request waiting its turn under [`HttpClient::limit_requests`] is not timed
    /// out: one request at a time, each answered 1 s after it is read, under a 3 s
    /// timeout; the fourth waits ~3 s before it is sent and is still answered.
    /// A server on loopback that answers each request head with what `answer` gives
    /// for it: the bytes, and whether to close the connection after them. Its address.
    fn serve(
        answer: impl Fn(&[u8]) -> (&'static [u8], bool) + Send + Sync + 'static,
    ) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { return };
                let answer = Arc::clone(&answer);
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while s.read_exact(&mut byte).is_ok() {
                        head.push(byte[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            let (bytes, close) = answer(&head);
                            head.clear();
                            if s.write_all(bytes).is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn a_request_waiting_its_turn_is_not_timed_out() {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&read);
        let addr = serve(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // A slow server, not a synchronisation.
            std::thread::sleep(Duration::from_secs(1));
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false)
        });
        let ex = Rc::new(LocalExecutor::new());
        let client = HttpClient::new(Rc::clone(&ex), None, Duration::from_secs(3));
        client.limit_requests(1);
        let url = Url::parse(&format!("http://{addr}/k")).unwrap();
        let get = || client.request(hyper::Method::GET, &url, &[], Bytes::new());
        use futures_lite::future::zip;
        let ((a, b), (c, d)) =
            futures_lite::future::block_on(ex.run(zip(zip(get(), get()), zip(get(), get()))));
        for answer in [a, b, c, d] {
            let answer = answer.expect("answered, not timed out");
            assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    /// Exchanges a few requests and answers with a server of its own, the requests
    /// written on the socket itself (so only reads go through the wrapper, when
    /// `wrapped`), and says after each answer read whether the socket acknowledges at
    /// once.
    fn quick_after_each_answer(wrapped: bool) -> Vec<bool> {
        const ROUNDS: usize = 8;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = [0u8; 7];
            for _ in 0..ROUNDS {
                s.read_exact(&mut request).unwrap();
                s.write_all(b"answer").unwrap();
            }
            // Open until the client has looked.
            let _ = s.read(&mut request);
        });
        let quick = futures_lite::future::block_on(async {
            let tcp = Async::<TcpStream>::connect(addr).await.unwrap();
            let mut conn = QuickAck(tcp);
            let mut answer = [0u8; 6];
            let mut quick = Vec::new();
            for _ in 0..ROUNDS {
                conn.0.get_ref().write_all(b"request").unwrap();
                if wrapped {
                    conn.read_exact(&mut answer).await.unwrap();
                } else {
                    conn.0.read_exact(&mut answer).await.unwrap();
                }
                assert_eq!(&answer, b"answer");
                let sock = socket2::SockRef::from(conn.0.get_ref());
                quick.push(sock.tcp_quickack().unwrap());
            }
            quick
        });
        server.join().unwrap();
        quick
    }

    /// After reading an answer, a connection acknowledges at once, where a
    /// request-and-answer exchange leaves a plain Linux socket delaying its ACKs.
    #[test]
    fn a_connection_acknowledges_what_it_reads_at_once() {
        let plain = quick_after_each_answer(false);
        assert!(
            plain.contains(&false),
            "the kernel never delayed ACKs on a plain socket ({plain:?}): this test shows nothing here"
        );
        let wrapped = quick_after_each_answer(true);
        assert!(
            wrapped.iter().all(|&q| q),
            "ACKs delayed after a read through the wrapper: {wrapped:?}"
        );
    }

    /// A client counts the connections it has open, in use or kept alive, and stops
    /// counting one the server closes: as it answers, or later, while it idles.
    #[test]
    fn a_client_counts_its_open_connections() {
        // A request for `/close` is answered so and its connection closed; one for
        // `/drop`, answered as kept alive and its connection closed after.
        let addr = serve(|head| {
            if head.starts_with(b"GET /close ") {
                (
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                    true,
                )
            } else {
                let drop = head.starts_with(b"GET /drop ");
                (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", drop)
            }
        });
        let ex = Rc::new(LocalExecutor::new());
        let client = HttpClient::new(Rc::clone(&ex), None, Duration::from_secs(60));
        assert_eq!(client.request_room(), None, "not limited yet");
        client.limit_requests(4);
        let room = || client.request_room().expect("limited");
        assert_eq!((room().most, room().free, room().open), (4, 4, 0));
        let url = |path: &str| Url::parse(&format!("http://{addr}/{path}")).unwrap();
        let (keep, close, dropping) = (url("keep"), url("close"), url("drop"));
        let get = |u| client.request(hyper::Method::GET, u, &[], Bytes::new());
        futures_lite::future::block_on(ex.run(async {
            // Two at once: two connections, both kept.
            let (a, b) = futures_lite::future::zip(get(&keep), get(&keep)).await;
            assert_eq!((a.unwrap().status, b.unwrap().status), (200, 200));
            assert_eq!((room().open, room().free), (2, 4));
            // One taken from the pool and closed by the server: one left.
            assert_eq!(get(&close).await.unwrap().status, 200);
            // Its task ends once the connection has closed: wait for that (a deadline
            // only so that a count that never falls fails instead of hanging).
            let until_open = |n: usize| async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                while room().open != n {
                    assert!(Instant::now() < deadline, "{} open, not {n}", room().open);
                    futures_lite::future::yield_now().await;
                }
            };
            until_open(1).await;
            assert_eq!(get(&keep).await.unwrap().status, 200);
            assert_eq!(room().open, 1, "the kept one used again");
            // Answered as kept alive, then closed by the server while it idles.
            assert_eq!(get(&dropping).await.unwrap().status, 200);
            until_open(0).await;
        }));
    }
}
