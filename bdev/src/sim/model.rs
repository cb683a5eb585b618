//! What a host may read back: every block's written versions, the last acknowledged
//! one and the last durable one, and the bytes that name a version.
//!
//! Every write gets a new version, larger than any before, and fills each block it
//! covers with bytes that name the block and the version; version 0 is the snapshot's
//! image (what the basis holds). A block may read as any version written at or after
//! its floor: the version acknowledged when a read was issued (a write still in flight
//! may land first), or after a power cut the version made durable (a flush after its
//! acknowledgement, or a FUA write). Bytes that name no version — zeroes of a local copy
//! never filled, a torn or misplaced block — are never right.

use std::collections::BTreeSet;

/// Bytes per block.
pub(super) const BLOCK: usize = 512;

/// The bytes of `block` at `version` (of a write; a deallocation writes zeroes).
pub(super) fn fill(block: u64, version: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK, "one block");
    out[..8].copy_from_slice(&block.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    for (i, b) in out[16..].iter_mut().enumerate() {
        *b = (block.wrapping_mul(31) ^ version.wrapping_mul(17) ^ i as u64) as u8;
    }
}

/// The version `bytes` hold as block `block`, if they are one.
pub(super) fn version_of(block: u64, bytes: &[u8]) -> Option<u64> {
    let mut want = [0u8; BLOCK];
    let version = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    fill(block, version, &mut want);
    (bytes == want.as_slice()).then_some(version)
}

/// One block's history.
#[derive(Debug, Default)]
struct Block {
    /// Versions written (in flight, acknowledged, failed); after a power cut, only the
    /// one the block was found to hold.
    written: BTreeSet<u64>,
    /// The last acknowledged version.
    acked: u64,
    /// The last version no power cut can take away.
    durable: u64,
    /// A write is in flight over it (hosts never overlap writes).
    writing: bool,
}

/// Every block's history.
pub(super) struct Model {
    blocks: Vec<Block>,
    next_version: u64,
    /// Versions that are deallocations: their blocks read as zeroes.
    zeroes: BTreeSet<u64>,
}

impl Model {
    pub(super) fn new(blocks: u64) -> Self {
        Self {
            blocks: (0..blocks).map(|_| Block::default()).collect(),
            next_version: 1,
            zeroes: BTreeSet::new(),
        }
    }

    pub(super) fn blocks(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Whether a write may start over `first..first + n` (no write in flight there).
    pub(super) fn free(&self, first: u64, n: u64) -> bool {
        (first..first + n).all(|b| !self.blocks[b as usize].writing)
    }

    /// A write (`zeroes`: a deallocation) starts over `first..first + n`: its version.
    pub(super) fn begin_write(&mut self, first: u64, n: u64, zeroes: bool) -> u64 {
        let v = self.next_version;
        self.next_version += 1;
        if zeroes {
            self.zeroes.insert(v);
        }
        for b in first..first + n {
            let block = &mut self.blocks[b as usize];
            assert!(!block.writing, "block {b}: overlapping writes");
            block.writing = true;
            block.written.insert(v);
        }
        v
    }

    /// The write of `version` ended (`acked`: successfully; `fua`: durable as well).
    pub(super) fn end_write(&mut self, first: u64, n: u64, version: u64, acked: bool, fua: bool) {
        for b in first..first + n {
            let block = &mut self.blocks[b as usize];
            assert!(block.writing, "block {b}: a write ended that never began");
            block.writing = false;
            if acked {
                assert!(
                    version > block.acked,
                    "block {b}: acknowledged out of order"
                );
                block.acked = version;
                if fua {
                    block.durable = version;
                }
            }
        }
    }

    /// Every block's acknowledged version, for a flush issued now.
    pub(super) fn acked(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.acked).collect()
    }

    /// A flush issued when the blocks' acknowledged versions were `at_issue` ended.
    pub(super) fn flushed(&mut self, at_issue: &[u64]) {
        for (block, &v) in self.blocks.iter_mut().zip(at_issue) {
            block.durable = block.durable.max(v);
        }
    }

    /// Floors for a read issued now over `first..first + n`.
    pub(super) fn read_floors(&self, first: u64, n: u64) -> Vec<u64> {
        (first..first + n)
            .map(|b| self.blocks[b as usize].acked)
            .collect()
    }

    /// Checks that block `block` may read as `bytes` given `floor`.
    pub(super) fn check(&self, block: u64, floor: u64, bytes: &[u8]) -> Result<u64, String> {
        let b = &self.blocks[block as usize];
        let zeroes = bytes.iter().all(|&x| x == 0);
        let Some(v) = version_of(block, bytes) else {
            // Zeroes are a deallocation's (which one, if several could be, is all the
            // same to a reader).
            let dealloc = b
                .written
                .range(floor..)
                .rev()
                .find(|v| self.zeroes.contains(v));
            return match (zeroes, dealloc) {
                (true, Some(&v)) => Ok(v),
                _ => Err(format!(
                    "block {block} holds {} (floor {floor}, written {:?})",
                    if zeroes { "zeroes" } else { "no version" },
                    b.written
                )),
            };
        };
        if v < floor || (v != 0 && !b.written.contains(&v)) {
            return Err(format!(
                "block {block} reads version {v}: below floor {floor} or never written \
                 (written {:?}, acked {}, durable {})",
                b.written, b.acked, b.durable
            ));
        }
        Ok(v)
    }

    /// Power came back: nothing is in flight; every block's floor is what is durable.
    pub(super) fn power_cut(&mut self) -> Vec<u64> {
        self.blocks
            .iter_mut()
            .map(|b| {
                b.writing = false;
                b.durable
            })
            .collect()
    }

    /// After a cut, `block` was read back as `version` (checked against its floor):
    /// that is now what it holds, durably.
    pub(super) fn settled(&mut self, block: u64, version: u64) {
        let b = &mut self.blocks[block as usize];
        b.acked = version;
        b.durable = version;
        // Anything newer was lost in the cut: it must never come back.
        b.written.retain(|&v| v == version);
    }
}
