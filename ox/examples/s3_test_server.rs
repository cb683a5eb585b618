//! The S3 test server (`tests/s3server`: s3s-fs behind the tests' fault injector) as a
//! process of its own, so the network test bed (`scripts/netem-bed`) can run it inside a
//! network namespace behind a slow link. It answers `GET /_ox_stats` with the
//! requests, object GETs and GET bytes it served, so a benchmark counts traffic at the
//! server. Stops when killed. (The bed's round trip, loss and bandwidth are its link's:
//! `examples/bed_link.rs`.)
//!
//! cargo run --release -p ox --example s3_test_server -- --listen 10.231.0.2:9000 \
//!     [--threads 2] [--domain s3.oxbed:9000]
//!
//! `--domain HOST:PORT` takes virtual-hosted requests (`ox-bucket.HOST:PORT`) as well
//! as path-style ones (s3backer 1.5 sends only the former).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/s3server/mod.rs"]
mod s3server;

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
    let domain = value("--domain");
    let server = s3server::start_server_at(&listen, threads, domain.as_deref());
    println!(
        "s3 test server on http://{listen} bucket {} access {} secret {} (data in {})",
        s3server::BUCKET,
        s3server::ACCESS,
        s3server::SECRET,
        server.dir.path().display()
    );
    loop {
        std::thread::park();
    }
}
