//! The web console (optional, off unless `[console] listen` is set): a small page —
//! volumes, clones with hydration and what they fetched, snapshots, policies, jobs,
//! exports with the hosts connected, stores, a throughput graph — and actions
//! (snapshot, clone, thicken, pause), all through the control API. The page posts
//! JSON-RPC requests to `/api`, answered exactly as the control socket answers them
//! ([`control::answer`]: the same methods, the same audit log), behind the control
//! token (sent as a bearer token; a wrong one is counted, logged and audited as on the
//! TCP control port) and over TLS with `[control]`'s certificate when one is set.
//!
//! Served by hyper on its own thread and listener; connections are admitted as the
//! control listeners admit theirs ([`Slots`]), and none is held for nothing: a TLS
//! handshake must end within `auth_timeout`, a request's headers arrive and a reply be
//! taken within `request_timeout`, and only a signed-in connection is kept open after
//! its answer. API calls run on threads of their own, at most [`MAX_CALLS`] at once;
//! the console's reads (its refresh) are not audited, its changes are. Its assets are
//! in the binary, so it needs no network and no build step; they allow nothing but
//! themselves (a content security policy of `'self'`), and the page writes every name
//! as text, never markup.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use async_io::{Async, Timer};
use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use ox_api::api::{MAX_REQUEST_BYTES, Response as RpcResponse, RpcError, code};
use smol_hyper::rt::{FuturesIo, SmolTimer};

use crate::admission::{Limits, Slots};
use crate::control::{self, DENIALS, REFUSALS, State, TIMEOUTS};

/// Connections one address may hold to the console at once: Chromium keeps up to six
/// per pool to a site, and requests with and without credentials use different pools;
/// with spares for the connections it opens ahead.
const BROWSER_CONNECTIONS: usize = 16;

/// Connections in all: a few browsers' worth, so one address cannot take them all.
const CONNECTIONS: usize = 4 * BROWSER_CONNECTIONS;

/// The most of a refused request's body read before its connection is closed.
const DRAIN_BYTES: usize = 64 << 10;

/// API calls running at once (each on a thread of its own): a call whose client went
/// away still runs to its end, so the count, not the connections, bounds the threads.
pub const MAX_CALLS: usize = 16;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Binds `addr` and serves the console from `state` until the process exits, behind
/// `token`, over TLS if `tls` is given; returns the bound address (port 0 picks one).
pub fn start(
    addr: SocketAddr,
    token: String,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<State>,
    limits: Limits,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| format!("console.listen {addr}"))?;
    let local = listener.local_addr()?;
    let listener = Async::new(listener).context("console listener")?;
    // A browser keeps several connections to one site (Chromium: six per pool, and
    // more than one pool): a peer may hold that many here, whatever the control
    // listeners allow one.
    let limits = Limits {
        max_per_peer: limits.max_per_peer.max(BROWSER_CONNECTIONS),
        max_connections: limits.max_connections.max(CONNECTIONS),
        ..limits
    };
    let slots = Slots::new(limits);
    let token = Arc::new(token);
    let calls = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || {
            let ex = Rc::new(async_executor::LocalExecutor::new());
            async_io::block_on(ex.run(async {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else {
                        // Out of descriptors, say: back off rather than spin.
                        Timer::after(std::time::Duration::from_millis(100)).await;
                        continue;
                    };
                    let who = format!("console {peer}");
                    let slot = match slots.take(Some(peer.ip())) {
                        Ok(slot) => slot,
                        Err(why) => {
                            state.guard.refused.fetch_add(1, Ordering::Relaxed);
                            control::report(&state, &REFUSALS, &who, "connect", why.name());
                            continue;
                        }
                    };
                    let (state, token, tls) = (Arc::clone(&state), Arc::clone(&token), tls.clone());
                    let calls = Arc::clone(&calls);
                    ex.spawn(async move {
                        let _slot = slot;
                        let who: Rc<str> = who.into();
                        let stream = Deadlined::new(stream, limits.request_timeout);
                        let conn = Conn {
                            who,
                            state,
                            token,
                            calls,
                            request_timeout: limits.request_timeout,
                        };
                        match tls {
                            None => serve(stream, conn, limits).await,
                            Some(config) => {
                                // The handshake within the authentication deadline.
                                let acceptor = futures_rustls::TlsAcceptor::from(config);
                                let handshake = async { Some(acceptor.accept(stream).await) };
                                let deadline = async {
                                    Timer::after(limits.auth_timeout).await;
                                    None
                                };
                                match futures_lite::future::or(handshake, deadline).await {
                                    Some(Ok(stream)) => serve(stream, conn, limits).await,
                                    Some(Err(_)) => {}
                                    None => {
                                        conn.state.guard.timed_out.fetch_add(1, Ordering::Relaxed);
                                        let outcome = format!(
                                            "TLS handshake not done within {:?}",
                                            limits.auth_timeout
                                        );
                                        let who = &conn.who;
                                        control::report(
                                            &conn.state,
                                            &TIMEOUTS,
                                            who,
                                            "authenticate",
                                            &outcome,
                                        );
                                    }
                                }
                            }
                        }
                    })
                    .detach();
                }
            }));
        })
        .context("starting the console thread")?;
    Ok(local)
}

/// One connection's part of the console.
struct Conn {
    who: Rc<str>,
    state: Arc<State>,
    token: Arc<String>,
    /// API calls running, across connections ([`MAX_CALLS`]).
    calls: Arc<AtomicUsize>,
    /// The control API's request deadline.
    request_timeout: Duration,
}

/// Serves HTTP/1.1 on one connection: a request's headers must arrive within the
/// control request deadline, and a connection waiting that long for the next is closed.
async fn serve<S>(io: S, conn: Conn, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let conn = Rc::new(conn);
    let service = hyper::service::service_fn(move |req| {
        let conn = Rc::clone(&conn);
        async move { Ok::<_, std::convert::Infallible>(respond(req, &conn).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(limits.request_timeout)
        .serve_connection(FuturesIo::new(io), service)
        .await;
}

async fn respond(req: Request<hyper::body::Incoming>, conn: &Conn) -> Response<Full<Bytes>> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/" | "/index.html") => asset(INDEX, "text/html; charset=utf-8"),
        (&Method::GET, "/console.js") => asset(SCRIPT, "text/javascript; charset=utf-8"),
        (&Method::GET, "/console.css") => asset(STYLE, "text/css; charset=utf-8"),
        // A signed-in call: its connection may stay open for the next.
        (&Method::POST, "/api") => return api(req, conn).await,
        (_, "/" | "/index.html" | "/console.js" | "/console.css" | "/api") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    closing(resp)
}

/// One API request: the token first (a connection that gives a wrong one is closed,
/// as on the TCP control port), then the body (at most the control API's longest
/// request), answered as the control socket answers it — on a thread of its own,
/// since a method may wait on the store and the console's other connections must not
/// wait with it.
async fn api(req: Request<hyper::body::Incoming>, conn: &Conn) -> Response<Full<Bytes>> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or("");
    if !control::same(given.as_bytes(), conn.token.as_bytes()) {
        conn.state
            .guard
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        control::report(
            &conn.state,
            &DENIALS,
            &conn.who,
            "authenticate",
            "denied: bad or missing token",
        );
        // The (small) body read first, within the deadline: a connection closed with
        // bytes unread is reset, and the client would see that, not this answer.
        let drained = Limited::new(req.into_body(), DRAIN_BYTES).collect();
        let deadline = Timer::after(conn.request_timeout);
        let read = async {
            let _ = drained.await;
        };
        let late = async {
            let _ = deadline.await;
        };
        futures_lite::future::or(read, late).await;
        let e = RpcError::new(code::UNAUTHORIZED, "authenticate with a valid token");
        return closing(rpc(
            StatusCode::UNAUTHORIZED,
            serde_json::Value::Null,
            Err(e),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            let e = RpcError::new(
                code::TOO_LARGE,
                format!("request longer than {MAX_REQUEST_BYTES} bytes, or cut short"),
            );
            return closing(rpc(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::Value::Null,
                Err(e),
            ));
        }
    };
    let Some(call) = Call::begin(&conn.calls) else {
        let e = RpcError::new(
            code::CONFLICT,
            format!("{MAX_CALLS} console calls are running: try again"),
        );
        return rpc(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::Value::Null,
            Err(e),
        );
    };
    let (tx, rx) = async_channel::bounded(1);
    let (state, who) = (Arc::clone(&conn.state), conn.who.to_string());
    let spawned = std::thread::Builder::new()
        .name("console-api".into())
        .spawn(move || {
            let _call = call;
            // The console's reads are its refresh: not audited; its changes are.
            let _ = tx.send_blocking(control::answer(&state, &who, &body, false));
        });
    let answered = match spawned {
        Ok(_) => rx.recv().await.ok(),
        Err(_) => None,
    };
    match answered {
        Some((id, result)) => rpc(StatusCode::OK, id, result),
        None => rpc(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::Value::Null,
            Err(RpcError::new(
                code::INTERNAL_ERROR,
                "the request could not be run",
            )),
        ),
    }
}

/// The credentials of an `Authorization: Bearer` header (the scheme in any case).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// An API call running on its thread, counted in `calls` while it lives.
struct Call(Arc<AtomicUsize>);

impl Call {
    /// A call, if fewer than [`MAX_CALLS`] run (a count the console's own thread and
    /// its calls' threads share: the one read-modify-write here is per API call, on no
    /// I/O path).
    fn begin(calls: &Arc<AtomicUsize>) -> Option<Self> {
        calls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CALLS).then_some(n + 1)
            })
            .ok()?;
        Some(Self(Arc::clone(calls)))
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream whose writes may not stall: one that makes no progress for `limit` fails
/// (a client that stops reading its answers is cut off, and its slot freed, as on the
/// control listeners).
struct Deadlined<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Timer>,
}

impl<S> Deadlined<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// After an attempt at writing: progress clears the deadline; none starts it, and
    /// past it the write fails.
    fn judge<T>(
        &mut self,
        cx: &mut TaskContext<'_>,
        attempt: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if attempt.is_ready() {
            self.stalled = None;
            return attempt;
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Timer::after(limit));
        match Pin::new(timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no answer within the request deadline",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let attempt = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, attempt)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let attempt = Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, attempt)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        let attempt = Pin::new(&mut self.inner).poll_close(cx);
        self.judge(cx, attempt)
    }
}

/// `resp`, closing its connection once sent: only signed-in connections stay open.
fn closing(mut resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A JSON-RPC response with `status`.
fn rpc(
    status: StatusCode,
    id: serde_json::Value,
    result: Result<serde_json::Value, RpcError>,
) -> Response<Full<Bytes>> {
    let (result, error) = match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let body = serde_json::to_vec(&RpcResponse {
        jsonrpc: "2.0".into(),
        result,
        error,
        id,
    })
    .unwrap_or_default();
    let mut resp = with_headers(Response::new(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn asset(text: &'static str, kind: &'static str) -> Response<Full<Bytes>> {
    let mut resp = with_headers(Response::new(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = asset(text, "text/plain; charset=utf-8");
    *resp.status_mut() = status;
    resp
}

/// What every answer carries: nothing but the console's own assets may run or load,
/// no other site may frame it, nothing is cached, and no address leaks.
fn with_headers(mut resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_lite::AsyncWriteExt;

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }

    /// A peer that never reads: the writes stall, and fail once they have made no
    /// progress for the limit.
    #[test]
    fn a_write_the_peer_never_takes_fails() {
        let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let ours = Async::new(ours).unwrap();
        let mut stream = Deadlined::new(ours, Duration::from_millis(50));
        let e = async_io::block_on(async {
            let chunk = vec![0u8; 1 << 16];
            loop {
                if let Err(e) = stream.write_all(&chunk).await {
                    return e;
                }
            }
        });
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn no_more_calls_than_the_limit_run_at_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let running: Vec<Call> = (0..MAX_CALLS).map_while(|_| Call::begin(&calls)).collect();
        assert_eq!(running.len(), MAX_CALLS);
        assert!(Call::begin(&calls).is_none());
        drop(running);
        assert!(Call::begin(&calls).is_some());
    }
}
