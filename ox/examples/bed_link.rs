//! The network test bed's link (`scripts/netem-bed`): two TUN devices joined by this
//! process, which holds every IP packet for half the round trip (plus up to
//! `--jitter-ms`, uniformly, never reordering a direction: the round trip grows by the
//! jitter on average) and drops a share of them, as `tc netem` would. This
//! machine's kernel has no netem; a link of packets keeps TCP end to end (the
//! client's and the server's own handshakes, windows, ACKs and retransmissions),
//! where a delay line that relays bytes would answer for each side. The bandwidth cap
//! is `tc tbf` on both devices (what the kernel sends into them comes out here).
//!
//! ```text
//! cargo run --release -p ox --example bed_link -- --outer oxbed0 --inner oxbed1 \
//!     [--rtt-ms 20] [--jitter-ms 0] [--loss-pct 0] [--count-port 9000] [--offload] \
//!     [--stats 127.0.0.1:9001 --metrics 10.231.0.2:3903]
//! ```
//!
//! `--offload` lets the kernel hand over TCP segments as a NIC with segmentation and
//! receive offloads sees them (up to 64 KiB each, a `virtio_net_hdr` before each, the
//! checksum left to the receiving side): the link's cost is per 64 KiB, not per
//! packet, so at 1 Gbit/s it no longer takes a core of the machine it measures. A
//! dropped one loses a whole burst, so `--loss-pct` asks for packets one by one.
//!
//! It creates both devices and keeps them while it runs; the script moves the inner
//! one into the server's namespace and gives both their addresses. Packets the kernel
//! sends into one device are written into the other, due time first.
//!
//! `--count-port P` counts the TCP payload bytes leaving port P on the inner side: what
//! the server sent (HTTP headers, every kind of answer, retransmissions and what the
//! link then drops included). `--stats ADDR` answers `GET /_ox_stats` as the S3 test
//! server does: those bytes as `get_bytes`, and the requests of the server whose
//! Prometheus metrics are at `--metrics` (Garage's `api_s3_request_counter`, read
//! across the link). If either direction stops, the process ends: a bed with a dead
//! link must not look up.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// Checksums left partial, TCP over IPv4 and IPv6 segmented by the receiving side.
const TUN_OFFLOADS: libc::c_uint = 0x01 | 0x02 | 0x04;
/// `struct virtio_net_hdr` (without `num_buffers`), the TUN default before each packet
/// with `IFF_VNET_HDR`.
const VNET_HDR: usize = 10;

/// How long the counts wait for the server's metrics, or a client for its request.
const STATS_PATIENCE: Duration = Duration::from_secs(5);

/// The largest packet a TUN device hands over: its MTU may be raised up to this, and
/// with offloads a burst is at most this (`gso_max_size`'s default).
const MAX_PACKET: usize = 65_536;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

// The kernel copies in and out all of a `struct ifreq`: 40 bytes on Linux.
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// Opens a new TUN device `name`: IP packets, with a `virtio_net_hdr` before each when
/// `offload`. `None` if the kernel refuses the offloads (the device goes with the file).
fn tun(name: &str, offload: bool) -> Option<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI | if offload { IFF_VNET_HDR } else { 0 },
        _pad: [0; 22],
    };
    assert!(name.len() < 16, "device name {name} too long");
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a live `struct ifreq` (name and flags where the kernel reads
    // them, padded to its size); the ioctl reads and writes only within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc != 0 && offload {
        eprintln!(
            "TUNSETIFF {name} with a vnet header: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    assert!(
        rc == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    if offload {
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, TUN_OFFLOADS) };
        if rc != 0 {
            eprintln!("TUNSETOFFLOAD {name}: {}", std::io::Error::last_os_error());
            return None;
        }
    }
    Some(file)
}

/// One direction of the link.
struct Direction {
    one_way: Duration,
    jitter: Duration,
    /// Packets dropped per 2^32.
    loss: u64,
    seed: u64,
    /// Counts the payload of TCP segments from this port, if any.
    count: Option<(u16, Arc<AtomicU64>)>,
    /// Bytes of `virtio_net_hdr` before each packet (0 without offloads); passed on as
    /// read, so the receiving side finishes what the sending side left.
    header: usize,
}

/// The TCP payload length of an IPv4 packet from `port`, if it is one (and the first
/// or only fragment, whose TCP header it holds). A burst's total length is the whole
/// burst's, so its payload counts whole.
fn tcp_payload_from(packet: &[u8], port: u16) -> Option<u64> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if ihl < 20 || fragment_offset != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let tcp = packet.get(ihl..total)?;
    if tcp.len() < 20 || u16::from_be_bytes([tcp[0], tcp[1]]) != port {
        return None;
    }
    let header = usize::from(tcp[12] >> 4) * 4;
    Some(tcp.len().saturating_sub(header) as u64)
}

/// Reads packets from `from`, and writes each into `to` when it is due (or drops it).
fn run(mut from: File, mut to: File, d: Direction) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, packet) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // A packet the other side cannot take now is lost, as on a wire.
            let _ = to.write(&packet);
        }
    });
    let mut seed = d.seed | 1;
    let mut last = Instant::now();
    let mut buf = vec![0u8; d.header + MAX_PACKET];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("reading a packet: {e}");
                return;
            }
        };
        let arrived = Instant::now();
        let packet = &buf[..n];
        if let Some((port, count)) = &d.count
            && let Some(bytes) = packet
                .get(d.header..)
                .and_then(|ip| tcp_payload_from(ip, *port))
        {
            count.fetch_add(bytes, Ordering::Relaxed);
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        if (seed >> 32) < d.loss {
            continue;
        }
        let spread = d.jitter.mul_f64((seed & 0xffff) as f64 / 65_536.0 * 2.0);
        let due = (arrived + d.one_way + spread).max(last);
        last = due;
        if tx.send((due, packet.to_vec())).is_err() {
            return;
        }
    }
}

/// The Prometheus text at `addr` (`GET /metrics`).
fn metrics(addr: &str) -> std::io::Result<String> {
    let to = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = std::net::TcpStream::connect_timeout(&to, STATS_PATIENCE)?;
    s.set_read_timeout(Some(STATS_PATIENCE))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "{addr}: {}",
            text.lines().next().unwrap_or("no answer")
        )));
    }
    Ok(text)
}

/// The sum of the `api_s3_request_counter` samples (of one endpoint, if named).
fn requests(text: &str, endpoint: Option<&str>) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("api_s3_request_counter{"))
        .filter(|l| endpoint.is_none_or(|e| l.contains(&format!("api_endpoint=\"{e}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Answers every request on `listener` with the counts, as JSON (502 when the server's
/// metrics cannot be read: never counts of zero that are not).
fn serve_stats(listener: std::net::TcpListener, metrics_at: &str, sent: &AtomicU64) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(STATS_PATIENCE));
        // The request is read whole first: closing with some of it unread would reset
        // the connection under the answer.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let text = match metrics(metrics_at) {
            Ok(text) => text,
            Err(e) => {
                let _ = write!(
                    conn,
                    "HTTP/1.0 502 Bad Gateway\r\nContent-Length: {}\r\n\r\n{e}",
                    e.to_string().len()
                );
                continue;
            }
        };
        let body = format!(
            "{{\"requests\":{},\"gets\":{},\"get_bytes\":{},\"lists\":{}}}",
            requests(&text, None),
            requests(&text, Some("GetObject")),
            sent.load(Ordering::Relaxed),
            requests(&text, Some("ListObjects")) + requests(&text, Some("ListObjectsV2")),
        );
        let _ = write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number = |name: &str| -> f64 { value(name).map_or(0.0, |v| v.parse().expect(name)) };
    // The counts' port first: a port in use stops the bed before it has a link.
    let stats = value("--stats").map(|listen| {
        let metrics = value("--metrics").expect("--stats needs --metrics HOST:PORT");
        let listener = std::net::TcpListener::bind(&listen).expect("--stats address");
        (listener, metrics)
    });
    let loss = (number("--loss-pct") / 100.0 * 4_294_967_296.0) as u64;
    let offload = args.iter().any(|a| a == "--offload");
    assert!(
        !offload || loss == 0,
        "--offload drops whole bursts: no --loss-pct with it"
    );
    let (outer_name, inner_name) = (
        value("--outer").expect("--outer NAME"),
        value("--inner").expect("--inner NAME"),
    );
    let open = |offload| Some((tun(&outer_name, offload)?, tun(&inner_name, offload)?));
    let (outer, inner, offload) = match offload.then(|| open(true)).flatten() {
        Some((outer, inner)) => (outer, inner, true),
        None => {
            if offload {
                eprintln!("offloads failed: trying without (packets one by one)");
            }
            let (outer, inner) = open(false).expect("plain TUN devices");
            (outer, inner, false)
        }
    };
    let one_way = Duration::from_secs_f64(number("--rtt-ms") / 2000.0);
    let jitter = Duration::from_secs_f64(number("--jitter-ms") / 2000.0);
    let sent = Arc::new(AtomicU64::new(0));
    let count = value("--count-port").map(|p| (p.parse().expect("--count-port"), sent.clone()));
    let direction = |seed, count| Direction {
        one_way,
        jitter,
        loss,
        seed,
        count,
        header: if offload { VNET_HDR } else { 0 },
    };
    let (outer2, inner2) = (outer.try_clone().unwrap(), inner.try_clone().unwrap());
    // Either direction ending ends the process.
    let d = direction(0x9E37_79B9_7F4A_7C15, None);
    std::thread::spawn(move || {
        run(outer, inner2, d);
        std::process::exit(1)
    });
    let d = direction(0xD1B5_4A32_D192_ED03, count);
    std::thread::spawn(move || {
        run(inner, outer2, d);
        std::process::exit(1)
    });
    println!(
        "link up: rtt {} ms, offloads {}",
        one_way.as_secs_f64() * 2000.0,
        if offload { "on" } else { "off" }
    );
    match stats {
        Some((listener, metrics)) => serve_stats(listener, &metrics, &sent),
        None => loop {
            std::thread::park();
        },
    }
}
