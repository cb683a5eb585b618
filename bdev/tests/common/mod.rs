//! What the power-cut tests share: a seeded generator and a model of what each block
//! of a device with a volatile write cache may hold after a cut.
#![allow(dead_code, missing_docs)]

use std::collections::HashMap;

/// Granularity of what survives a cut.
pub const SECTOR: usize = 512;

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What each 4 KiB block may hold: its durable version, then versions acknowledged
/// since (any of which a cut may leave, sector by sector).
pub struct Model {
    pub durable: Vec<Vec<u8>>,
    pub since: HashMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    pub fn current(&self, b: u64) -> &[u8] {
        self.since
            .get(&b)
            .and_then(|v| v.last())
            .unwrap_or(&self.durable[b as usize])
    }

    pub fn wrote(&mut self, b: u64, data: Vec<u8>, fua: bool) {
        if fua {
            self.since.remove(&b);
            self.durable[b as usize] = data;
        } else {
            self.since.entry(b).or_default().push(data);
        }
    }

    pub fn flushed(&mut self) {
        for (b, mut v) in self.since.drain() {
            if let Some(last) = v.pop() {
                self.durable[b as usize] = last;
            }
        }
    }

    /// Whether `got` is a possible content of block `b` after a cut: each sector from
    /// the durable version or from a version acknowledged since.
    pub fn possible(&self, b: u64, got: &[u8]) -> bool {
        let mut candidates = vec![&self.durable[b as usize]];
        candidates.extend(self.since.get(&b).into_iter().flatten());
        got.chunks(SECTOR).enumerate().all(|(i, s)| {
            candidates
                .iter()
                .any(|c| &c[i * SECTOR..(i + 1) * SECTOR] == s)
        })
    }
}
