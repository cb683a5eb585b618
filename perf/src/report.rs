//! Results: per queue and total, as a table for people and JSON for scripts.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::engine::QueueResult;

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Mean.
    pub avg_us: f64,
    /// Minimum.
    pub min_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p99_9_us: f64,
    /// 99.99th percentile.
    pub p99_99_us: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return Self {
                avg_us: 0.0,
                min_us: 0.0,
                max_us: 0.0,
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                p99_9_us: 0.0,
                p99_99_us: 0.0,
            };
        }
        Self {
            avg_us: h.mean() / 1000.0,
            min_us: us(h.min()),
            max_us: us(h.max()),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p99_9_us: us(h.value_at_quantile(0.999)),
            p99_99_us: us(h.value_at_quantile(0.9999)),
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// Queue label or "total".
    pub name: String,
    /// I/Os per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Failed commands.
    pub errors: u64,
    /// Latency.
    pub latency: Latency,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Workload description.
    pub workload: String,
    /// Measured seconds.
    pub seconds: f64,
    /// Per queue pair.
    pub queues: Vec<Line>,
    /// All queue pairs together.
    pub total: Line,
    /// Initiator CPU seconds (all load threads).
    pub initiator_cpu_s: f64,
    /// Initiator CPU as a percentage of one core.
    pub initiator_cpu_pct: f64,
    /// Blocks verified (verify mode).
    pub verified_blocks: u64,
    /// Blocks found never written (verify mode, read-only).
    pub unwritten_blocks: u64,
    /// First verify mismatch.
    pub mismatch: Option<String>,
    /// First command error.
    pub first_error: Option<String>,
    /// Whether the run was interrupted.
    pub interrupted: bool,
}

fn line(
    name: String,
    reads: u64,
    writes: u64,
    bytes: u64,
    errors: u64,
    h: &Histogram<u64>,
    secs: f64,
) -> Line {
    let secs = secs.max(1e-9);
    Line {
        name,
        iops: (reads + writes) as f64 / secs,
        mib_s: bytes as f64 / secs / 1048576.0,
        reads,
        writes,
        errors,
        latency: Latency::of(h),
    }
}

impl Report {
    /// Builds the report from every queue's result.
    pub fn new(
        workload: String,
        results: &[QueueResult],
        cpu: Duration,
        interrupted: bool,
    ) -> anyhow::Result<Self> {
        let seconds = results
            .iter()
            .map(|r| r.elapsed.as_secs_f64())
            .fold(0.0, f64::max);
        let mut total_h = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)?;
        let (mut reads, mut writes, mut bytes, mut errors) = (0, 0, 0, 0);
        let mut queues = Vec::new();
        for r in results {
            total_h.add(&r.latency)?;
            reads += r.reads;
            writes += r.writes;
            bytes += r.bytes;
            errors += r.errors;
            queues.push(line(
                r.label.clone(),
                r.reads,
                r.writes,
                r.bytes,
                r.errors,
                &r.latency,
                r.elapsed.as_secs_f64(),
            ));
        }
        Ok(Self {
            workload,
            seconds,
            queues,
            total: line(
                "total".into(),
                reads,
                writes,
                bytes,
                errors,
                &total_h,
                seconds,
            ),
            initiator_cpu_s: cpu.as_secs_f64(),
            initiator_cpu_pct: cpu.as_secs_f64() / seconds.max(1e-9) * 100.0,
            verified_blocks: results.iter().map(|r| r.verified).sum(),
            unwritten_blocks: results.iter().map(|r| r.unwritten).sum(),
            mismatch: results
                .iter()
                .find_map(|r| r.mismatch.as_ref().map(ToString::to_string)),
            first_error: results.iter().find_map(|r| r.first_error.clone()),
            interrupted,
        })
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}{}",
            self.workload,
            if self.interrupted {
                " (interrupted: partial result)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "{:<28} {:>11} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "queue",
            "IOPS",
            "MiB/s",
            "avg us",
            "min us",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99.99",
            "max us"
        );
        for l in self.queues.iter().chain(std::iter::once(&self.total)) {
            let t = &l.latency;
            let _ = writeln!(
                s,
                "{:<28} {:>11.0} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>9.1}",
                l.name,
                l.iops,
                l.mib_s,
                t.avg_us,
                t.min_us,
                t.p50_us,
                t.p90_us,
                t.p99_us,
                t.p99_9_us,
                t.p99_99_us,
                t.max_us
            );
        }
        let _ = writeln!(
            s,
            "{:.1} s measured; initiator CPU {:.2} s ({:.0} % of a core); {} errors",
            self.seconds, self.initiator_cpu_s, self.initiator_cpu_pct, self.total.errors
        );
        if self.verified_blocks > 0 || self.mismatch.is_some() || self.unwritten_blocks > 0 {
            let _ = writeln!(
                s,
                "verify: {} blocks checked, {} never written",
                self.verified_blocks, self.unwritten_blocks
            );
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "first error: {e}");
        }
        if let Some(m) = &self.mismatch {
            let _ = writeln!(s, "VERIFY FAILED: {m}");
        }
        s
    }
}
