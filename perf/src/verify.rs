//! Self-describing blocks: every block oxperf writes in verify mode names its LBA, the
//! run's seed and a generation, and carries a CRC32C of itself, so any read can be
//! checked without a copy of the data: misplaced, stale or damaged blocks all show.

use nvmf_wire::le;

/// Bytes 0..8 of every verify block.
pub const MAGIC: &[u8; 8] = b"OXPERFv1";
const HEADER: usize = 32;

/// What a block should say about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// LBA of the block.
    pub lba: u64,
    /// Run seed.
    pub seed: u64,
    /// Generation (`None`: any generation, the block was written before this run).
    pub generation: Option<u32>,
}

/// A verify failure, with what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("data mismatch at LBA {lba}: expected {expected}, found {actual}")]
pub struct Mismatch {
    /// LBA of the bad block.
    pub lba: u64,
    /// What should have been there.
    pub expected: String,
    /// What was there.
    pub actual: String,
}

/// Fills `block` (one logical block) for `lba`, `seed`, `generation`.
pub fn fill(block: &mut [u8], lba: u64, seed: u64, generation: u32) {
    let mut x = (lba ^ seed.rotate_left(17) ^ u64::from(generation).rotate_left(41))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    for chunk in block[HEADER..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    block[..8].copy_from_slice(MAGIC);
    le::put_u64(block, 8, lba);
    le::put_u64(block, 16, seed);
    le::put_u32(block, 24, generation);
    le::put_u32(block, 28, 0);
    let crc = crc32c::crc32c(block);
    le::put_u32(block, 28, crc);
}

/// Outcome of checking a block that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Matched.
    Ok,
    /// All zeroes, never written (allowed only when no generation is expected).
    Unwritten,
}

/// Checks one block against `expect`.
pub fn check(block: &[u8], expect: Expect) -> Result<Checked, Mismatch> {
    let describe = |lba: u64, seed: u64, generation: Option<u32>| match generation {
        Some(g) => format!("lba {lba} seed {seed:#x} generation {g}"),
        None => format!("lba {lba} seed {seed:#x}"),
    };
    let expected = describe(expect.lba, expect.seed, expect.generation);
    let fail = |actual: String| Mismatch {
        lba: expect.lba,
        expected: expected.clone(),
        actual,
    };
    if block.len() < HEADER {
        return Err(fail(format!("a block of only {} bytes", block.len())));
    }
    if &block[..8] != MAGIC {
        if expect.generation.is_none() && block.iter().all(|&b| b == 0) {
            return Ok(Checked::Unwritten);
        }
        let zero = block.iter().all(|&b| b == 0);
        return Err(fail(if zero {
            "zeroes".into()
        } else {
            format!("foreign data starting {:02x?}", &block[..8])
        }));
    }
    let (lba, seed, generation) = (le::u64(block, 8), le::u64(block, 16), le::u32(block, 24));
    let stored = le::u32(block, 28);
    let mut copy = block.to_vec();
    le::put_u32(&mut copy, 28, 0);
    if crc32c::crc32c(&copy) != stored {
        return Err(fail(format!(
            "{} with a bad checksum (damaged contents)",
            describe(lba, seed, Some(generation))
        )));
    }
    if lba != expect.lba
        || seed != expect.seed
        || expect.generation.is_some_and(|g| g != generation)
    {
        return Err(fail(describe(lba, seed, Some(generation))));
    }
    Ok(Checked::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_check_and_every_kind_of_damage_is_named() {
        let mut b = vec![0u8; 512];
        fill(&mut b, 42, 7, 3);
        let e = Expect {
            lba: 42,
            seed: 7,
            generation: Some(3),
        };
        assert_eq!(check(&b, e), Ok(Checked::Ok));
        assert_eq!(
            check(
                &b,
                Expect {
                    generation: None,
                    ..e
                }
            ),
            Ok(Checked::Ok)
        );
        let stale = check(
            &b,
            Expect {
                generation: Some(4),
                ..e
            },
        )
        .unwrap_err();
        assert!(stale.actual.contains("generation 3"), "{stale}");
        let moved = check(&b, Expect { lba: 43, ..e }).unwrap_err();
        assert!(moved.actual.contains("lba 42"));
        let mut damaged = b.clone();
        damaged[300] ^= 1;
        assert!(
            check(&damaged, e)
                .unwrap_err()
                .actual
                .contains("bad checksum")
        );
        let zero = vec![0u8; 512];
        assert_eq!(
            check(
                &zero,
                Expect {
                    generation: None,
                    ..e
                }
            ),
            Ok(Checked::Unwritten)
        );
        assert!(check(&zero, e).is_err());
    }
}
