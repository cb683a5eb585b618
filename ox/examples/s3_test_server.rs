//! The S3 test server (`tests/s3server`: s3s-fs behind the tests' fault injector) as a
//! process of its own, so the network test bed (`scripts/netem-bed`) can run it inside a
//! network namespace behind a slow link. It answers `GET /_ox_stats` with the
//! requests, object GETs and GET bytes it served, so a benchmark counts traffic at the
//! server. Stops when killed.
//!
//! With `--rtt-ms`, clients reach it through a delay line: every byte, each way, is
//! held for half the round trip (plus jitter, never reordering a stream) before it is
//! passed on. This machine's kernel has no `netem`; the bed caps bandwidth with `tbf`
//! on the veth pair and takes its delay from here.
//!
//! cargo run --release -p ox --example s3_test_server -- --listen 10.231.0.2:9000 \
//!     [--threads 2] [--rtt-ms 20] [--jitter-ms 0] [--domain s3.oxbed:9000]
//!
//! `--domain HOST:PORT` takes virtual-hosted requests (`ox-bucket.HOST:PORT`) as well
//! as path-style ones (s3backer 1.5 sends only the former).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

/// Bytes each direction of a connection may hold in the delay line: about a window of
/// a TCP connection over a long fat link (a full line stops reading, as a full window
/// stops the sender).
const LINE_BYTES: usize = 16 << 20;

/// The most bytes read at once into the line (what arrived by then, usually less).
const PIECE: usize = 256 << 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen = value("--listen").unwrap_or_else(|| "127.0.0.1:9000".into());
    let threads = value("--threads").and_then(|t| t.parse().ok()).unwrap_or(2);
    let rtt_ms: f64 = value("--rtt-ms")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0);
    let jitter_ms: f64 = value("--jitter-ms")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0.0);
    let domain = value("--domain");
    let bind = if rtt_ms > 0.0 { "127.0.0.1:0" } else { &listen };
    let server = s3server::start_server_at(bind, threads, domain.as_deref());
    println!(
        "s3 test server on http://{listen} bucket {} access {} secret {} rtt {rtt_ms} ms (data in {})",
        s3server::BUCKET,
        s3server::ACCESS,
        s3server::SECRET,
        server.dir.path().display()
    );
    if rtt_ms > 0.0 {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let one_way = Duration::from_secs_f64(rtt_ms / 2000.0);
        let jitter = Duration::from_secs_f64(jitter_ms / 2000.0);
        rt.block_on(delay_line(&listen, server.addr, one_way, jitter));
    }
    loop {
        std::thread::park();
    }
}

/// Accepts on `listen` and joins each connection to `to` through a delay line.
async fn delay_line(listen: &str, to: std::net::SocketAddr, one_way: Duration, jitter: Duration) {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let accepted = Instant::now();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            // The client's first bytes follow the handshake (SYN, SYN-ACK, then its
            // data with the ACK): they reach the server three one-way trips after the
            // connect began, as on a link.
            let after_handshake = accepted + 3 * one_way;
            tokio::spawn(one_direction(
                cr,
                sw,
                one_way,
                jitter,
                seed,
                after_handshake,
            ));
            tokio::spawn(one_direction(sr, cw, one_way, jitter, seed ^ 1, accepted));
        });
    }
}

/// Passes what `from` reads to `to`, each piece `delay` (± jitter, in order) after it
/// arrived and not before `not_before`.
async fn one_direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay: Duration,
    jitter: Duration,
    mut seed: u64,
    not_before: Instant,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(LINE_BYTES / PIECE);
    let writer = tokio::spawn(async move {
        while let Some((due, piece)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&piece).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut last = not_before;
    loop {
        let mut buf = vec![0u8; PIECE];
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.truncate(n);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let spread = if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(((seed >> 11) as f64) / ((1u64 << 53) as f64) * 2.0)
        };
        let due = (Instant::now() + delay + spread).max(last);
        last = due;
        if tx.send((due, buf)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
