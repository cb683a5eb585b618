//! Per-device I/O statistics: operations and bytes by type, errors, latency histogram.
//!
//! Each per-core channel owns one [`ChannelStats`] and is its only writer, so recording
//! is a handful of relaxed loads and stores: no lock and no locked instruction on the
//! I/O path. Readers on any thread sum the channels into a [`BdevStats`] snapshot.
//!
//! The latency histogram is written here rather than taken from `hdrhistogram` (which
//! oxperf uses, in one thread): an `hdrhistogram::Histogram` records through `&mut`, so
//! letting the metrics exporter and the control socket read it while its reactor
//! records would need a lock, or a copy per read handed over by message. Log-linear
//! buckets of relaxed atomics with a single writer let any thread take a snapshot
//! while the I/O path pays a load and a store (`SharedHistogram`, for events from many
//! threads, pays an atomic add instead).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::io::IoType;

/// Sub-buckets per power of two: ~12 % worst-case relative error.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Bucket holding a latency of `ns` nanoseconds (log-linear).
fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros();
    let sub = (ns >> (msb - SUB_BITS)) as usize & (SUB - 1);
    (msb - SUB_BITS + 1) as usize * SUB + sub
}

/// Largest value that falls in `bucket`.
fn bucket_upper(bucket: usize) -> u64 {
    if bucket < SUB {
        return bucket as u64;
    }
    let exp = (bucket / SUB) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUB) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    ((SUB as u64 + sub) << (exp - SUB_BITS)).saturating_add(width - 1)
}

fn bump(counter: &AtomicU64, by: u64) {
    // Single writer: a plain load and store suffice and avoid a locked RMW.
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// Statistics of one channel (one device on one reactor). Written by that reactor only.
pub struct ChannelStats {
    ops: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    errors: AtomicU64,
    latency: Box<[AtomicU64]>,
    latency_sum_ns: AtomicU64,
    latency_max_ns: AtomicU64,
}

impl Default for ChannelStats {
    fn default() -> Self {
        Self {
            ops: Default::default(),
            bytes: Default::default(),
            errors: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            latency_sum_ns: AtomicU64::new(0),
            latency_max_ns: AtomicU64::new(0),
        }
    }
}

impl ChannelStats {
    /// Records one completed request. Call only from the owning reactor.
    pub fn record(&self, io_type: IoType, bytes: u64, latency: Duration, ok: bool) {
        if !ok {
            bump(&self.errors, 1);
            return;
        }
        let i = io_type.index();
        bump(&self.ops[i], 1);
        bump(&self.bytes[i], bytes);
        let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        bump(&self.latency[bucket_of(ns)], 1);
        bump(&self.latency_sum_ns, ns);
        if ns > self.latency_max_ns.load(Ordering::Relaxed) {
            self.latency_max_ns.store(ns, Ordering::Relaxed);
        }
    }

    /// Records a request rejected before it reached the device.
    pub fn record_error(&self) {
        bump(&self.errors, 1);
    }

    fn add_to(&self, out: &mut BdevStats) {
        for i in 0..IoType::ALL.len() {
            out.ops[i] += self.ops[i].load(Ordering::Relaxed);
            out.bytes[i] += self.bytes[i].load(Ordering::Relaxed);
        }
        out.errors += self.errors.load(Ordering::Relaxed);
        for (sum, bucket) in out.latency.buckets.iter_mut().zip(self.latency.iter()) {
            *sum += bucket.load(Ordering::Relaxed);
        }
        out.latency.sum_ns += self.latency_sum_ns.load(Ordering::Relaxed);
        out.latency.max_ns = out
            .latency
            .max_ns
            .max(self.latency_max_ns.load(Ordering::Relaxed));
    }
}

/// A snapshot of a device's statistics, summed over its channels.
#[derive(Debug, Clone, Default)]
pub struct BdevStats {
    ops: [u64; 5],
    bytes: [u64; 5],
    /// Requests that failed (rejected or failed by the device).
    pub errors: u64,
    /// Latency of successful requests, submit to completion.
    pub latency: LatencyHistogram,
}

impl BdevStats {
    pub(crate) fn sum<'a>(channels: impl Iterator<Item = &'a ChannelStats>) -> Self {
        let mut out = Self::default();
        for channel in channels {
            channel.add_to(&mut out);
        }
        out
    }

    /// Successful requests of this kind.
    pub fn ops(&self, io_type: IoType) -> u64 {
        self.ops[io_type.index()]
    }

    /// Bytes moved (or, for write-zeroes and unmap, covered) by successful requests.
    pub fn bytes(&self, io_type: IoType) -> u64 {
        self.bytes[io_type.index()]
    }
}

/// A latency histogram written from any thread (atomic adds): for rare, shared events
/// such as clone misses, where a per-core single-writer histogram does not fit.
pub struct SharedHistogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for SharedHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for SharedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.snapshot();
        write!(
            f,
            "SharedHistogram {{ count: {}, mean: {:?}, max: {:?} }}",
            h.count(),
            h.mean(),
            h.max()
        )
    }
}

impl SharedHistogram {
    /// Records one value.
    pub fn record(&self, latency: Duration) {
        let ns = latency.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// A snapshot to query.
    pub fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }
}

/// A log-linear latency histogram (~12 % resolution) with exact count, mean and max.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    sum_ns: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: vec![0; BUCKETS],
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Mean latency (zero when empty).
    pub fn mean(&self) -> Duration {
        let n = self.count();
        Duration::from_nanos(self.sum_ns.checked_div(n).unwrap_or(0))
    }

    /// Largest latency recorded.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// Sum of the latencies recorded.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns)
    }

    /// Counts for a Prometheus histogram near upper bounds `near` (ascending, in
    /// seconds), not cumulative: each bound is moved to the upper edge of this
    /// histogram's bucket holding it (at most ~12 % above it), so that every value is
    /// counted at exactly the right bound; a last entry at `f64::MAX` (`+Inf`) holds
    /// those beyond the last.
    pub fn between(&self, near: &[f64]) -> Vec<(f64, u64)> {
        let edges: Vec<usize> = near.iter().map(|&b| bucket_of((b * 1e9) as u64)).collect();
        let mut out: Vec<(f64, u64)> = edges
            .iter()
            .map(|&e| (bucket_upper(e) as f64 / 1e9, 0))
            .chain([(f64::MAX, 0)])
            .collect();
        for (bucket, &count) in self.buckets.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let i = edges
                .iter()
                .position(|&e| bucket <= e)
                .unwrap_or(edges.len());
            out[i].1 += count;
        }
        out
    }

    /// The latency at or below which `q` (0.0–1.0) of requests completed; an upper
    /// bound within one bucket's width, never above the maximum seen.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(bucket_upper(bucket).min(self.max_ns));
            }
        }
        self.max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_buckets_count_each_value_once_at_its_bound() {
        let h = SharedHistogram::default();
        for us in [5u64, 50, 50, 500, 5_000_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        let b = s.between(&[1e-5, 1e-4, 1e-3, 1.0]);
        let counts: Vec<u64> = b.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![1, 2, 1, 0, 1]);
        assert_eq!(b[4].0, f64::MAX);
        // Each bound is its bucket's upper edge, at or a little above the one asked.
        for ((edge, _), asked) in b.iter().zip([1e-5, 1e-4, 1e-3, 1.0]) {
            assert!(
                *edge >= asked && *edge <= asked * 1.13,
                "{edge} for {asked}"
            );
        }
        // A value just under a bound counts at it, one just over it above it.
        let h = SharedHistogram::default();
        h.record(Duration::from_nanos(999_000));
        h.record(Duration::from_nanos((b[2].0 * 1e9).round() as u64 + 1));
        let near: Vec<u64> = h
            .snapshot()
            .between(&[1e-3])
            .iter()
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(near, vec![1, 1]);
        assert_eq!(s.count(), 5);
        assert_eq!(s.sum(), Duration::from_micros(5_000_605));
    }

    #[test]
    fn buckets_are_monotonic_and_cover_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b < BUCKETS);
            assert!(b >= last || ns > 100_000);
            last = b;
            assert!(bucket_upper(b) >= ns, "value {ns} above its bucket {b}");
            // Relative error bound.
            assert!(
                bucket_upper(b) - ns <= ns / 8 + 1,
                "bucket {b} too wide for {ns}"
            );
        }
    }

    #[test]
    fn quantiles_from_recorded_latencies() {
        let stats = ChannelStats::default();
        for us in 1..=1000u64 {
            stats.record(IoType::Read, 4096, Duration::from_micros(us), true);
        }
        stats.record(IoType::Write, 512, Duration::from_micros(5), false);
        let snap = BdevStats::sum(std::iter::once(&stats));
        assert_eq!(snap.ops(IoType::Read), 1000);
        assert_eq!(snap.bytes(IoType::Read), 4096 * 1000);
        assert_eq!(snap.ops(IoType::Write), 0);
        assert_eq!(snap.errors, 1);
        let p50 = snap.latency.quantile(0.5).as_micros() as f64;
        assert!((500.0..=565.0).contains(&p50), "p50 {p50}");
        assert_eq!(snap.latency.max(), Duration::from_micros(1000));
        assert_eq!(snap.latency.quantile(1.0), Duration::from_micros(1000));
        assert_eq!(snap.latency.mean(), Duration::from_nanos(500_500));
    }
}
