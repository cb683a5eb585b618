//! Codec throughput per core: encode and decode MB/s for compressible, incompressible
//! and zero data in 1 MiB chunks (`--chunk-kib` for others), and AES-256-GCM alone
//! through `ring` (the provider rustls already brings) and through the `aes-gcm` crate.
//! Writes the sample data to files so `scripts/bench-codec` can run `zstd -b1` on
//! exactly the same bytes.
//!
//! cargo bench -p ox --bench codec [-- --secs 2 --out DIR --chunk-kib 1024]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use ox::codec::{Binding, Codec, CodecSettings};
use ox::keys::SecretKey;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// Text-like data that zstd -1 compresses about 3-4×.
fn compressible(len: usize) -> Vec<u8> {
    let words = [
        "volume ",
        "snapshot ",
        "object ",
        "frame ",
        "chunk ",
        "the ",
        "a ",
        "storage ",
        "block ",
        "clone ",
        "read ",
        "write ",
        "\n",
        "0x1f2e ",
        "appliance ",
        "of ",
    ];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % words.len() as u64) as usize].as_bytes());
        if x.is_multiple_of(5) {
            out.extend_from_slice(format!("{} ", x % 100_000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs `f` over `bytes` per call for `secs`; returns MB/s (10^6 bytes).
fn rate(secs: f64, bytes: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        f();
        n += 1;
    }
    n as f64 * bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let secs: f64 = arg("--secs").map_or(2.0, |s| s.parse().unwrap());
    let out = arg("--out");
    // 1 MiB by default (the figures beside zstd's CLI); volumes default to 64 KiB.
    let chunk: usize = arg("--chunk-kib").map_or(1024, |s| s.parse().unwrap()) << 10;
    let key = SecretKey::random().unwrap();
    let binding = Binding {
        volume: [1; 16],
        snapshot: [2; 16],
    };
    // 16 chunks of each kind, so caches do not flatter the figures.
    let kinds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "compressible",
            (0..16)
                .map(|i| compressible(chunk + i)[i..].to_vec())
                .collect(),
        ),
        (
            "incompressible",
            (0..16)
                .map(|i| incompressible(chunk + i)[i..].to_vec())
                .collect(),
        ),
        ("zero", (0..16).map(|_| vec![0u8; chunk]).collect()),
    ];
    if let Some(dir) = &out {
        for (name, chunks) in &kinds {
            std::fs::write(format!("{dir}/{name}.bin"), chunks.concat()).unwrap();
        }
    }
    println!("| data | encode MB/s | decode MB/s | ratio (frame/raw) | zstd-1 only MB/s |");
    println!("|---|---|---|---|---|");
    for (name, chunks) in &kinds {
        let mut codec = Codec::new(CodecSettings { level: 1 }, Some(&key), binding).unwrap();
        let mut i = 0;
        let enc = rate(secs, chunk, || {
            let c = &chunks[i % chunks.len()];
            std::hint::black_box(codec.encode(i as u64, c).unwrap());
            i += 1;
        });
        let frames: Vec<Option<Vec<u8>>> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| codec.encode(i as u64, c).unwrap())
            .collect();
        let stored: usize = frames.iter().flatten().map(Vec::len).sum();
        let mut j = 0;
        let dec = rate(secs, chunk, || {
            let k = j % chunks.len();
            if let Some(f) = &frames[k] {
                std::hint::black_box(codec.decode(k as u64, f, chunk).unwrap());
            }
            j += 1;
        });
        let mut z = zstd::bulk::Compressor::new(1).unwrap();
        let mut k = 0;
        let zonly = rate(secs, chunk, || {
            std::hint::black_box(z.compress(&chunks[k % chunks.len()]).unwrap());
            k += 1;
        });
        let dec = if stored == 0 {
            "— (nothing stored)".to_string()
        } else {
            format!("{dec:.0}")
        };
        println!(
            "| {name} | {enc:.0} | {dec} | {:.3} | {zonly:.0} |",
            stored as f64 / (chunks.len() * chunk) as f64
        );
    }
    // AES-256-GCM alone, a chunk in place.
    let mut buf = incompressible(chunk);
    let ring_key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.bytes()).unwrap());
    let ring_rate = rate(secs, chunk, || {
        let tag = ring_key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([7; 12]),
                Aad::from(b"aad"),
                &mut buf,
            )
            .unwrap();
        let _ = std::hint::black_box(tag);
    });
    let rc = Aes256Gcm::new_from_slice(key.bytes()).unwrap();
    let rc_rate = rate(secs, chunk, || {
        let tag = rc
            .encrypt_in_place_detached(&[7u8; 12].into(), b"aad", &mut buf)
            .unwrap();
        let _ = std::hint::black_box(tag);
    });
    println!();
    println!("| AES-256-GCM seal, {} KiB | MB/s |", chunk >> 10);
    println!("|---|---|");
    println!("| ring 0.17 (rustls' provider) | {ring_rate:.0} |");
    println!("| aes-gcm 0.10 crate | {rc_rate:.0} |");
}
