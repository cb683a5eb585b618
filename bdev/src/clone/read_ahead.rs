//! A sequential reader's read-ahead: which chunks to fetch ahead of a host reading a
//! clone in order. Decided from the reads alone and what the basis says its store
//! needs (no I/O, no clock), so a test can feed it a reader and a store of any speed.
//!
//! The window starts at [`FIRST_READ_AHEAD_BYTES`]. Each time the reader has read half
//! of what is asked for ahead of it, more is asked for and the window doubles, up to
//! its ceiling: it grows as fast as the reader reads, so a short run of sequential
//! reads asks for little. At the ceiling more is asked for each time a quarter of it
//! has been read: three quarters of the window to all of it stay asked for (asked for
//! in halves, it was a half to all: ×0.91 the rate at 1 Gbit/s and 60 ms,
//! BENCHMARKS.md; not all sent at once, [`WANTED_ROUND_TRIPS`]), in batches the basis
//! fetches in a few requests of adjacent chunks.
//!
//! A reader that outruns its fetches gets about what is in flight per fetch's time
//! (asked for in halves, at 60 ms round trips on a server that answers in two, 8 MiB
//! carried ~34 MB/s): so the ceiling is what the basis wants ([`wanted_bytes`]:
//! [`WANTED_ROUND_TRIPS`] times what keeps [`READ_AHEAD_RATE`], or the clone's limit if
//! lower, going over its store's round trip), never less than the clone's read-ahead
//! ([`READ_AHEAD_BYTES`]) nor more than [`MOST_READ_AHEAD_BYTES`] (a clone given a
//! read-ahead of its own keeps that): a store a few ms away keeps the clone's
//! read-ahead, a far one gets the window its round trips need. A read out of order
//! starts over.

use std::ops::Range;
use std::time::Duration;

/// The most fetched ahead of a sequential reader on a store near enough: 8 MiB (in
/// chunks, at least 2, whatever the chunk size).
pub const READ_AHEAD_BYTES: u64 = 8 << 20;

/// The read-ahead window of a reader just found sequential (at least one chunk).
pub const FIRST_READ_AHEAD_BYTES: u64 = 1 << 20;

/// The rate a sequential reader's window is sized to carry where no limit is lower, in
/// bytes a second: 1 Gbit/s, an appliance's link to its region.
pub const READ_AHEAD_RATE: u64 = 125_000_000;

/// The most fetched ahead of a sequential reader on any store: 64 MiB, about twice the
/// bandwidth-delay product of [`READ_AHEAD_RATE`] at 250 ms (what [`wanted_bytes`] asks
/// for at ~134 ms). Fetched chunks go to the local copy as they arrive; what is in
/// memory at once is the runs arriving together (up to the part of the window asked for
/// at once, each run's body held while it decodes).
pub const MOST_READ_AHEAD_BYTES: u64 = 64 << 20;

/// The bandwidth-delay products a sequential reader keeps asked for ahead of it. A
/// fetch's bytes count from asking until the reader takes them, over connections whose
/// TCP windows each carry a share, to a reader that takes them in order: at 1 Gbit/s and
/// 60 ms, two kept ~14 MB in flight, which carried 79–94 MB/s once the window had grown,
/// where ~25 MB carried 96–109 (BENCHMARKS.md). (Asked for, not all sent: OX sends a
/// clone's background GETs at most 32 at once on an OX core, the rest wait in turn.)
pub const WANTED_ROUND_TRIPS: u64 = 4;

/// The bytes a sequential reader should have asked for ahead of it where the store's
/// round trip (a request to its answer's first byte) is `round_trip` and the reader's
/// fetches may have `limit` bytes a second (0: no limit): [`WANTED_ROUND_TRIPS`]
/// bandwidth-delay products of [`READ_AHEAD_RATE`], or of the limit if lower.
pub fn wanted_bytes(round_trip: Duration, limit: u64) -> u64 {
    let rate = match limit {
        0 => READ_AHEAD_RATE,
        l => l.min(READ_AHEAD_RATE),
    };
    (WANTED_ROUND_TRIPS as f64 * rate as f64 * round_trip.as_secs_f64()).ceil() as u64
}

/// The clone as the read-ahead sees it.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// The clone's read-ahead, in chunks (0: none): the least the ceiling is.
    pub read_ahead: u64,
    /// The most the ceiling is, in chunks (below `read_ahead`: `read_ahead`).
    pub most: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Chunks in the volume.
    pub chunks: u64,
    /// What the basis wants asked for ahead ([`wanted_bytes`]), if it knows its store's
    /// round trip yet.
    pub wanted_bytes: Option<u64>,
}

impl Geometry {
    /// No read-ahead.
    const NONE: Self = Self {
        read_ahead: 0,
        most: 0,
        chunk_bytes: 1,
        chunks: 0,
        wanted_bytes: None,
    };

    /// The most a window may be (chunks; 0: no read-ahead).
    pub fn ceiling(&self) -> u64 {
        if self.read_ahead == 0 {
            return 0;
        }
        let wanted = self
            .wanted_bytes
            .map_or(0, |b| b.div_ceil(self.chunk_bytes.max(1)));
        wanted.clamp(self.read_ahead, self.most.max(self.read_ahead))
    }
}

/// One reader's read-ahead (one per channel: the reader on that reactor).
#[derive(Clone, Copy, Debug)]
pub struct ReadAhead {
    /// Where the last read ended (bytes): a read starting there is sequential.
    last_end: u64,
    /// The window last asked for (chunks; 0: not sequential).
    window: u64,
    /// The first chunk past what has been asked for.
    frontier: u64,
}

impl Default for ReadAhead {
    fn default() -> Self {
        Self {
            last_end: u64::MAX,
            window: 0,
            frontier: 0,
        }
    }
}

impl ReadAhead {
    /// A read of bytes `start..end` whose last chunk is `last_chunk`: the chunks to ask
    /// for ahead of it, if any (the caller leaves out those present). `clone` is asked
    /// for only if the read is sequential.
    pub fn on_read(
        &mut self,
        (start, end): (u64, u64),
        last_chunk: u64,
        clone: impl FnOnce() -> Geometry,
    ) -> Option<Range<u64>> {
        let sequential = std::mem::replace(&mut self.last_end, end) == start;
        let clone = if sequential { clone() } else { Geometry::NONE };
        let ceiling = clone.ceiling();
        if ceiling == 0 {
            *self = Self {
                last_end: end,
                ..Self::default()
            };
            return None;
        }
        let next = last_chunk + 1;
        let (window, from) = match self.window {
            0 => (
                (FIRST_READ_AHEAD_BYTES / clone.chunk_bytes.max(1))
                    .max(1)
                    .min(ceiling),
                next,
            ),
            w => {
                let frontier = self.frontier.max(next);
                let w = w.min(ceiling);
                // Growing: once half of what is ahead has been read. At the ceiling:
                // once a quarter has, so from three quarters to the whole window stays
                // in flight rather than from a half.
                let left = if w < ceiling { w / 2 } else { w - w / 4 };
                if frontier - next > left {
                    return None;
                }
                (w.saturating_mul(2).min(ceiling), frontier)
            }
        };
        let until = next.saturating_add(window).min(clone.chunks);
        self.window = window;
        self.frontier = until.max(from);
        assert!(window <= ceiling, "read-ahead window past its ceiling");
        assert!(until <= clone.chunks, "read-ahead past the volume's end");
        (from < until).then_some(from..until)
    }

    /// The window the reader is at (chunks; 0: not sequential).
    #[cfg(test)]
    fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 64 << 10;

    fn geometry(chunks: u64, wanted_bytes: Option<u64>) -> Geometry {
        Geometry {
            read_ahead: READ_AHEAD_BYTES / CHUNK,
            most: MOST_READ_AHEAD_BYTES / CHUNK,
            chunk_bytes: CHUNK,
            chunks,
            wanted_bytes,
        }
    }

    /// A reader of 128 KiB requests over a store whose every fetch takes `latency` and
    /// whose link carries `link` bytes a second: chunks asked for arrive after the
    /// latency, no faster than the link, in order; the reader takes each as it arrives,
    /// and the basis wants what the latency calls for once a fetch is asked for.
    /// Returns the window the reader ends at (bytes), the rate it read at over its last
    /// quarter (bytes a second), and the chunks asked for ahead.
    fn read_through(latency: Duration, link: f64, chunks: u64) -> (u64, f64, u64) {
        let mut ahead = ReadAhead::default();
        let mut round_trip: Option<Duration> = None;
        // When each chunk arrives (seconds), once asked for.
        let mut arrives = vec![f64::INFINITY; chunks as usize];
        let mut link_free = 0.0f64;
        let mut now = 0.0f64;
        let mut quarter = None;
        let mut asked_ahead = 0;
        let fetch = |asked: f64, link_free: &mut f64, round_trip: &mut Option<Duration>| {
            *link_free = link_free.max(asked + latency.as_secs_f64()) + CHUNK as f64 / link;
            *round_trip = Some(latency);
            *link_free
        };
        for first in (0..chunks).step_by(2) {
            let last = (first + 1).min(chunks - 1);
            // The read waits for its chunks; one not asked for is a miss, fetched now.
            for c in first..=last {
                if arrives[c as usize].is_infinite() {
                    arrives[c as usize] = fetch(now, &mut link_free, &mut round_trip);
                }
                now = now.max(arrives[c as usize]);
            }
            let wanted = round_trip.map(|rtt| wanted_bytes(rtt, 0));
            let span = (first * CHUNK, (last + 1) * CHUNK);
            let asked = ahead.on_read(span, last, || geometry(chunks, wanted));
            for c in asked.into_iter().flatten() {
                assert!(
                    arrives[c as usize].is_infinite(),
                    "chunk {c} asked for twice"
                );
                arrives[c as usize] = fetch(now, &mut link_free, &mut round_trip);
                asked_ahead += 1;
            }
            assert!(
                ahead.frontier <= last + 1 + MOST_READ_AHEAD_BYTES / CHUNK,
                "read-ahead ran past its most"
            );
            if quarter.is_none() && first >= chunks * 3 / 4 {
                quarter = Some((now, first * CHUNK));
            }
        }
        let (at, from) = quarter.unwrap_or((0.0, 0));
        let rate = (chunks * CHUNK - from) as f64 / (now - at);
        (ahead.window() * CHUNK, rate, asked_ahead)
    }

    #[test]
    fn a_far_store_gets_a_window_that_fills_the_link() {
        // 250 ms a fetch, a 50 MB/s link: a bandwidth-delay product of 12.5 MB, more
        // than the clone's read-ahead alone (8 MiB) holds.
        let link = 50e6;
        let (window, rate, _) = read_through(Duration::from_millis(250), link, 16384);
        assert!(window > 2 * 12_500_000, "window {window}");
        assert!(window <= MOST_READ_AHEAD_BYTES, "window {window}");
        assert!(rate > 0.95 * link, "rate {rate}");
        // 125 ms (60 ms round trips, a server answering in two): 8 MiB carried 34 MB/s.
        let (window, rate, _) = read_through(Duration::from_millis(125), link, 16384);
        assert!(window > 2 * 6_250_000, "window {window}");
        assert!(rate > 0.95 * link, "rate {rate}");
    }

    #[test]
    fn a_near_store_keeps_the_clone_s_read_ahead() {
        // 1 ms a fetch on a 1 GB/s link: 8 MiB in flight are plenty.
        let (window, rate, _) = read_through(Duration::from_millis(1), 1e9, 16384);
        assert_eq!(window, READ_AHEAD_BYTES);
        assert!(rate > 0.95e9, "rate {rate}");
    }

    #[test]
    fn a_short_run_of_sequential_reads_asks_for_little_however_far_the_store() {
        // 16 reads of 128 KiB (2 MiB) from a store 250 ms away, whose basis wants
        // 125 MB ahead (64 MiB, the most): what is asked for grows with what was read.
        let clone = geometry(1 << 20, Some(wanted_bytes(Duration::from_millis(250), 0)));
        assert_eq!(clone.ceiling(), MOST_READ_AHEAD_BYTES / CHUNK);
        let mut ahead = ReadAhead::default();
        let mut asked = 0;
        for first in (0..32).step_by(2) {
            let span = (first * CHUNK, (first + 2) * CHUNK);
            let range = ahead.on_read(span, first + 1, || clone);
            asked += range.map_or(0, |r| r.end - r.start);
        }
        // Ahead of a reader at chunk n lie at most 2 × n chunks (plus the first window):
        // 88 here, against the ceiling's 1,024.
        assert!(asked <= 3 * 32, "{asked} chunks asked for after reading 32");
        // A long run goes on to the ceiling.
        let (_, _, asked) = read_through(Duration::from_millis(250), 50e6, 4096);
        assert!(asked > 4000, "{asked}");
    }

    #[test]
    fn the_ceiling_is_what_the_basis_wants_within_its_bounds() {
        let base = READ_AHEAD_BYTES / CHUNK;
        let most = MOST_READ_AHEAD_BYTES / CHUNK;
        assert_eq!(geometry(1 << 20, None).ceiling(), base);
        let at = |ms| {
            let wanted = wanted_bytes(Duration::from_millis(ms), 0);
            geometry(1 << 20, Some(wanted)).ceiling()
        };
        assert_eq!(at(1), base);
        // 4 × 125 MB/s × 60 ms = 30 MB.
        assert_eq!(wanted_bytes(Duration::from_millis(60), 0), 30_000_000);
        assert_eq!(at(60), 30_000_000u64.div_ceil(CHUNK));
        assert_eq!(at(10_000), most);
        // A limit below the rate wants less: 4 × 50 MB/s × 60 ms.
        assert_eq!(
            wanted_bytes(Duration::from_millis(60), 50_000_000),
            12_000_000
        );
        assert_eq!(
            wanted_bytes(Duration::from_millis(60), 10 << 30),
            30_000_000
        );
        let none = Geometry {
            read_ahead: 0,
            ..geometry(1 << 20, Some(25_000_000))
        };
        assert_eq!(none.ceiling(), 0);
        let huge = Geometry {
            read_ahead: 4 * most,
            ..geometry(1 << 20, None)
        };
        assert_eq!(huge.ceiling(), 4 * most);
        // A clone given a read-ahead of its own keeps it, however far the store.
        let fixed = Geometry {
            read_ahead: 4,
            most: 4,
            ..geometry(1 << 20, Some(25_000_000))
        };
        assert_eq!(fixed.ceiling(), 4);
    }

    #[test]
    fn a_read_out_of_order_starts_over() {
        let clone = geometry(1 << 20, None);
        let mut ahead = ReadAhead::default();
        assert_eq!(ahead.on_read((0, CHUNK), 0, || clone), None);
        assert_eq!(
            ahead.on_read((CHUNK, 2 * CHUNK), 1, || clone),
            Some(2..2 + FIRST_READ_AHEAD_BYTES / CHUNK)
        );
        assert_eq!(ahead.on_read((0, CHUNK), 0, || clone), None);
        assert_eq!(ahead.window(), 0);
        // No read-ahead at all where the clone has none.
        let none = Geometry {
            read_ahead: 0,
            ..clone
        };
        assert_eq!(ahead.on_read((CHUNK, 2 * CHUNK), 1, || none), None);
    }

    #[test]
    fn at_its_ceiling_three_quarters_of_the_window_or_more_stay_asked_for() {
        // A ceiling of 16 chunks, which the first window reaches at once.
        let clone = Geometry {
            read_ahead: 16,
            most: 16,
            ..geometry(1 << 20, None)
        };
        let mut ahead = ReadAhead::default();
        let _ = ahead.on_read((0, CHUNK), 0, || clone);
        let mut asks = Vec::new();
        for c in 1..200 {
            if let Some(r) = ahead.on_read((c * CHUNK, (c + 1) * CHUNK), c, || clone) {
                assert!(
                    r.end - r.start >= 4,
                    "at chunk {c}: {r:?}, less than a quarter"
                );
                asks.push(c);
            }
            let ahead_of_reader = ahead.frontier - (c + 1);
            assert!(
                (12..=16).contains(&ahead_of_reader),
                "at chunk {c}: {ahead_of_reader} chunks ahead"
            );
        }
        // Every 4 chunks read, 4 more (a quarter of the window) are asked for.
        assert!(asks.windows(2).all(|w| w[1] - w[0] == 4), "{asks:?}");
    }

    #[test]
    fn the_window_stops_at_the_volume_s_end() {
        let small = geometry(20, None);
        let mut ahead = ReadAhead::default();
        let _ = ahead.on_read((0, CHUNK), 0, || small);
        assert_eq!(ahead.on_read((CHUNK, 2 * CHUNK), 1, || small), Some(2..18));
        // More is asked for once half of what is ahead has been read: at chunk 10,
        // 8 chunks of 16 ahead (to 18) are left.
        for c in 2..20 {
            let asked = ahead.on_read((c * CHUNK, (c + 1) * CHUNK), c, || small);
            let expected = (c == 9).then_some(18..20);
            assert_eq!(asked, expected, "at chunk {c}");
        }
    }
}
