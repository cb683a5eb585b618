//! Protection policies: when a volume's next snapshot is due, and which of its
//! snapshots a policy keeps — the newest K, and grandfather-father-son: the newest
//! snapshot of each of the last N hours, days, weeks (from Monday) and months (UTC
//! calendar) that have one. The newest snapshot is always kept: it is the recovery
//! point, and the parent of the next. Pure: no clock and no I/O, so a test can run a
//! simulated week through it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The shortest interval between snapshots a policy may ask for.
pub const MIN_EVERY_S: u64 = 1;

/// A volume's protection policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The volume.
    pub volume: String,
    /// The store its snapshots go to.
    pub store: String,
    /// Seconds between snapshots.
    pub every_s: u64,
    /// The key to wrap them under (`None`: the default key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Keep the newest this many.
    #[serde(default)]
    pub keep_last: u32,
    /// Keep the newest of each of the last this many hours that have one.
    #[serde(default)]
    pub hourly: u32,
    /// ... days.
    #[serde(default)]
    pub daily: u32,
    /// ... weeks (Monday to Sunday, UTC).
    #[serde(default)]
    pub weekly: u32,
    /// ... calendar months (UTC).
    #[serde(default)]
    pub monthly: u32,
}

impl Policy {
    /// Why the policy cannot be used, if it cannot: the field named.
    pub fn problem(&self) -> Option<String> {
        if self.every_s < MIN_EVERY_S {
            return Some(format!("every_s must be at least {MIN_EVERY_S}"));
        }
        None
    }

    /// When the next snapshot is due, given the newest one's time (Unix seconds):
    /// now if there is none or it is overdue (runs missed while the appliance was down
    /// are one run, taken at once).
    pub fn due(&self, newest: Option<u64>, now: u64) -> u64 {
        newest.map_or(now, |t| t.saturating_add(self.every_s))
    }

    /// The snapshots (ID, creation time in Unix seconds), in the order they were
    /// taken, that the policy keeps. Of two taken in the same second the later one in
    /// the list is the newer (the one the next snapshot builds on).
    pub fn keep<'a>(&self, snapshots: &'a [(String, u64)]) -> BTreeSet<&'a str> {
        let mut newest_first: Vec<&(String, u64)> = snapshots.iter().rev().collect();
        // Stable: equal times keep their (reversed) order.
        newest_first.sort_by_key(|s| std::cmp::Reverse(s.1));
        let mut kept = BTreeSet::new();
        if let Some(n) = newest_first.first() {
            kept.insert(n.0.as_str());
        }
        for s in newest_first.iter().take(self.keep_last as usize) {
            kept.insert(s.0.as_str());
        }
        let periods: [(u32, Period); 4] = [
            (self.hourly, |t| (t / 3600) as i64),
            (self.daily, |t| (t / 86_400) as i64),
            (self.weekly, week),
            (self.monthly, month),
        ];
        for (count, period) in periods {
            let mut seen = 0u32;
            let mut last: Option<i64> = None;
            for s in &newest_first {
                if seen == count {
                    break;
                }
                let p = period(s.1);
                if last != Some(p) {
                    // The newest of a period not seen yet.
                    kept.insert(s.0.as_str());
                    seen += 1;
                    last = Some(p);
                }
            }
        }
        kept
    }
}

/// Which period (hour, day, week, month) a Unix time falls in.
type Period = fn(u64) -> i64;

/// The week of Unix time `t`, weeks starting on Monday (1970-01-01 was a Thursday).
fn week(t: u64) -> i64 {
    (t / 86_400 + 3) as i64 / 7
}

/// The calendar month of Unix time `t` (UTC) as year * 12 + month index.
fn month(t: u64) -> i64 {
    let (y, m, _) = civil(t / 86_400);
    y * 12 + i64::from(m) - 1
}

/// Year, month (1-12) and day (1-31) of day `days` since 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's days-to-civil algorithm).
fn civil(days: u64) -> (i64, u32, u32) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            volume: "v".into(),
            store: "s".into(),
            every_s: 900,
            key: None,
            keep_last: 0,
            hourly: 0,
            daily: 0,
            weekly: 0,
            monthly: 0,
        }
    }

    #[test]
    fn calendar_days_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(59), (1970, 3, 1));
        // 2000-02-29, a leap day of a year divisible by 400.
        assert_eq!(civil(11_016), (2000, 2, 29));
        // 2026-12-05.
        assert_eq!(civil(20_792), (2026, 12, 5));
        // Weeks start on Monday: 2026-11-30 (Monday) and 2026-12-06 (Sunday) share one.
        assert_eq!(week(20_787 * 86_400), week(20_793 * 86_400 + 86_399));
        assert_ne!(week(20_787 * 86_400), week(20_787 * 86_400 - 1));
    }

    #[test]
    fn a_snapshot_is_due_every_interval_and_missed_runs_are_one_run_at_once() {
        let p = policy();
        assert_eq!(p.due(None, 5000), 5000, "never taken: now");
        assert_eq!(p.due(Some(1000), 1200), 1900);
        assert_eq!(p.due(Some(1000), 99_000), 1900, "overdue: due already");
    }

    #[test]
    fn gfs_keeps_the_newest_of_each_period() {
        let h = 3600;
        // Every 15 minutes for 3 days.
        let snaps: Vec<(String, u64)> = (0..(3 * 24 * 4))
            .map(|i| (format!("s{i:04}"), 1_000_000_000 + i * 900))
            .collect();
        let newest = snaps.last().unwrap().0.clone();
        let p = Policy {
            keep_last: 2,
            hourly: 3,
            daily: 2,
            ..policy()
        };
        let kept = p.keep(&snaps);
        let mut want: BTreeSet<&str> = BTreeSet::new();
        // The newest 2.
        for s in snaps.iter().rev().take(2) {
            want.insert(&s.0);
        }
        // The newest of each of the last 3 hours that have one, and the last 2 days.
        for (count, len) in [(3, h), (2, 24 * h)] {
            let mut periods: Vec<u64> = snaps.iter().map(|s| s.1 / len).collect();
            periods.dedup();
            for period in periods.iter().rev().take(count) {
                let newest_in = snaps.iter().rfind(|s| s.1 / len == *period);
                want.insert(&newest_in.unwrap().0);
            }
        }
        assert_eq!(kept, want);
        assert!(kept.contains(newest.as_str()));
        // Of two taken in one second, the later taken is the newest.
        let same = [("b".to_string(), 5), ("a".to_string(), 5)];
        assert_eq!(policy().keep(&same), BTreeSet::from(["a"]));
        // Nothing asked for: the newest only.
        assert_eq!(policy().keep(&snaps).len(), 1);
        assert!(policy().keep(&[]).is_empty());
    }
}
