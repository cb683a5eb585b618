//! A seeded generator for the cores' event-stream tests (xorshift64: fast, and the
//! same stream for the same seed on every machine).

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 if `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `from`, if it holds any.
    pub(crate) fn pick<T: Copy>(&mut self, from: &std::collections::BTreeSet<T>) -> Option<T> {
        let n = from.len() as u64;
        let i = self.below(n) as usize;
        from.iter().nth(i).copied()
    }
}
