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
//! control listeners admit theirs ([`Slots`]). Its assets are in the binary, so it
//! needs no network and no build step; they allow nothing but themselves (a content
//! security policy of `'self'`), and the page writes every name as text, never markup.

use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

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
use crate::control::{self, DENIALS, REFUSALS, State};

/// Connections one browser may hold to the console at once: Chromium keeps up to six
/// per pool to a site, and requests with and without credentials use different pools;
/// with spares for the connections it opens ahead.
const BROWSER_CONNECTIONS: usize = 16;

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
        max_connections: limits.max_connections.max(BROWSER_CONNECTIONS),
        ..limits
    };
    let slots = Slots::new(limits);
    let token = Arc::new(token);
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
                    ex.spawn(async move {
                        let _slot = slot;
                        let who: Rc<str> = who.into();
                        match tls {
                            None => serve(stream, who, state, token, limits).await,
                            Some(config) => {
                                // The handshake within the authentication deadline.
                                let acceptor = futures_rustls::TlsAcceptor::from(config);
                                let handshake = async { acceptor.accept(stream).await.ok() };
                                let deadline = async {
                                    Timer::after(limits.auth_timeout).await;
                                    None
                                };
                                if let Some(stream) =
                                    futures_lite::future::or(handshake, deadline).await
                                {
                                    serve(stream, who, state, token, limits).await;
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

/// Serves HTTP/1.1 on one connection: requests must arrive whole within the control
/// request deadline, and a connection idle that long is closed.
async fn serve<S>(io: S, who: Rc<str>, state: Arc<State>, token: Arc<String>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (who, state, token) = (Rc::clone(&who), Arc::clone(&state), Arc::clone(&token));
        async move { Ok::<_, std::convert::Infallible>(respond(req, &who, state, &token).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(SmolTimer::new())
        .header_read_timeout(limits.request_timeout)
        .serve_connection(FuturesIo::new(io), service)
        .await;
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    who: &str,
    state: Arc<State>,
    token: &str,
) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/" | "/index.html") => asset(INDEX, "text/html; charset=utf-8"),
        (&Method::GET, "/console.js") => asset(SCRIPT, "text/javascript; charset=utf-8"),
        (&Method::GET, "/console.css") => asset(STYLE, "text/css; charset=utf-8"),
        (&Method::POST, "/api") => api(req, who, state, token).await,
        (_, "/" | "/index.html" | "/console.js" | "/console.css" | "/api") => {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// One API request: the token first, then the body (at most the control API's
/// longest request), answered as the control socket answers it — on a thread of its
/// own, since a method may wait on the store, and the console's other connections
/// must not wait with it.
async fn api(
    req: Request<hyper::body::Incoming>,
    who: &str,
    state: Arc<State>,
    token: &str,
) -> Response<Full<Bytes>> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !control::same(given.as_bytes(), token.as_bytes()) {
        state.guard.auth_failures.fetch_add(1, Ordering::Relaxed);
        control::report(
            &state,
            &DENIALS,
            who,
            "authenticate",
            "denied: bad or missing token",
        );
        let e = RpcError::new(code::UNAUTHORIZED, "authenticate with a valid token");
        return rpc(StatusCode::UNAUTHORIZED, serde_json::Value::Null, Err(e));
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
            return rpc(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::Value::Null,
                Err(e),
            );
        }
    };
    let (tx, rx) = async_channel::bounded(1);
    let who = who.to_string();
    let spawned = std::thread::Builder::new()
        .name("console-api".into())
        .spawn(move || {
            let _ = tx.send_blocking(control::answer(&state, &who, &body));
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
