//! Bandwidth limits: token buckets, global and per volume, separately for foreground
//! (client misses) and background (snapshot uploads, thickening, restores, verifies)
//! traffic, changeable
//! while running. A transfer waits for the tokens of every bucket it passes through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Traffic class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Client reads waiting on object storage.
    Foreground,
    /// Uploads, prefetch, thickening, restores, verifies, and the appliance's own reads
    /// of a volume over a snapshot.
    Background,
}

/// A token bucket. `rate` 0 means unlimited.
#[derive(Debug)]
pub struct Bucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket refilling at `rate` bytes/s, holding at most `burst` bytes.
    pub fn new(rate: u64, burst: u64) -> Self {
        Self {
            rate,
            burst: burst.max(1),
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// Changes the rate and burst; tokens carry over up to the new burst.
    pub fn set(&mut self, rate: u64, burst: u64) {
        self.refill(Instant::now());
        let was_unlimited = self.rate == 0;
        self.rate = rate;
        self.burst = burst.max(1);
        // A newly limited bucket starts full; otherwise tokens carry over.
        self.tokens = if was_unlimited {
            self.burst as f64
        } else {
            self.tokens.min(self.burst as f64)
        };
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }

    /// How long until `n` bytes may pass (zero: now). Does not take them.
    pub fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        // A transfer larger than the burst passes once the bucket is full, driving it
        // negative: the debt is paid before the next one.
        let need = (n as f64).min(self.burst as f64);
        if self.tokens >= need {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((need - self.tokens) / self.rate as f64)
        }
    }

    /// Takes `n` bytes of tokens (may go negative).
    pub fn take(&mut self, n: u64) {
        if self.rate > 0 {
            self.tokens -= n as f64;
        }
    }
}

/// A rate limit: bytes per second (0: unlimited) and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    /// Bytes per second; 0 means unlimited.
    pub rate: u64,
    /// Largest burst in bytes.
    pub burst: u64,
}

impl Limit {
    /// Unlimited.
    pub const NONE: Self = Self { rate: 0, burst: 1 };

    /// `rate` bytes/s with a burst of a quarter second (at least 1 MiB).
    pub fn per_second(rate: u64) -> Self {
        Self {
            rate,
            burst: (rate / 4).max(1 << 20),
        }
    }
}

type Pair = [Bucket; 2];

fn pair(fg: Limit, bg: Limit) -> Pair {
    [
        Bucket::new(fg.rate, fg.burst),
        Bucket::new(bg.rate, bg.burst),
    ]
}

fn slot(class: Class) -> usize {
    match class {
        Class::Foreground => 0,
        Class::Background => 1,
    }
}

/// Global and per-volume limits. Cheap to clone; shared by the OX cores.
#[derive(Clone)]
pub struct Throttle {
    inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle").finish_non_exhaustive()
    }
}

struct State {
    global: Pair,
    volumes: HashMap<String, Pair>,
    /// What transfers waited for their tokens, by volume and class.
    waited: HashMap<(String, Class), Waited>,
    /// Transfers waiting for their tokens now, by volume and class (none: absent).
    waiting: HashMap<(String, Class), u64>,
    /// Times each volume was forgotten: a wait that began before is not counted.
    forgotten: HashMap<String, u64>,
}

/// What a volume's transfers of one class waited on the bandwidth limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waited {
    /// Transfers that had to wait.
    pub transfers: u64,
    /// Their time waiting, in all.
    pub time: Duration,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(Limit::NONE, Limit::NONE)
    }
}

impl Throttle {
    /// Global limits for foreground and background traffic.
    pub fn new(foreground: Limit, background: Limit) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                global: pair(foreground, background),
                volumes: HashMap::new(),
                waited: HashMap::new(),
                waiting: HashMap::new(),
                forgotten: HashMap::new(),
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rate `volume`'s `class` traffic may have now, bytes a second: the lower of
    /// its own limit and the global one (0: unlimited).
    pub fn rate(&self, volume: &str, class: Class) -> u64 {
        let s = self.state();
        let i = slot(class);
        let own = s.volumes.get(volume).map_or(0, |p| p[i].rate);
        [s.global[i].rate, own]
            .into_iter()
            .filter(|&r| r > 0)
            .min()
            .unwrap_or(0)
    }

    /// Changes a global limit at run time.
    pub fn set_global(&self, class: Class, limit: Limit) {
        self.state().global[slot(class)].set(limit.rate, limit.burst);
    }

    /// Sets (or changes) a volume's limit.
    pub fn set_volume(&self, volume: &str, class: Class, limit: Limit) {
        let mut s = self.state();
        let p = s
            .volumes
            .entry(volume.to_string())
            .or_insert_with(|| pair(Limit::NONE, Limit::NONE));
        p[slot(class)].set(limit.rate, limit.burst);
    }

    /// How long `n` bytes of `class` traffic for `volume` must wait; takes the tokens
    /// when the answer is zero.
    pub fn try_acquire(&self, volume: &str, class: Class, n: u64) -> Duration {
        let now = Instant::now();
        let mut s = self.state();
        let i = slot(class);
        let mut wait = s.global[i].wait_for(n, now);
        if let Some(p) = s.volumes.get_mut(volume) {
            wait = wait.max(p[i].wait_for(n, now));
        }
        if wait.is_zero() {
            s.global[i].take(n);
            if let Some(p) = s.volumes.get_mut(volume) {
                p[i].take(n);
            }
        }
        wait
    }

    /// Waits until `n` bytes may pass, then takes them; what it waited is counted
    /// ([`Throttle::waited`]).
    pub async fn acquire(&self, volume: &str, class: Class, n: u64) {
        // Counted however the wait ends: done, or dropped (a cancelled transfer).
        let mut waiting = Waiting {
            throttle: self,
            volume,
            class,
            began: None,
        };
        loop {
            let wait = self.try_acquire(volume, class, n);
            if wait.is_zero() {
                break;
            }
            // A transfer that never waits costs nothing more than its tokens.
            if waiting.began.is_none() {
                let mut s = self.state();
                let forgotten = s.forgotten.get(volume).copied().unwrap_or(0);
                *s.waiting.entry((volume.to_string(), class)).or_default() += 1;
                waiting.began = Some((Instant::now(), forgotten));
            }
            async_io::Timer::after(wait).await;
        }
    }

    /// Forgets what `volume`'s transfers waited (it was deleted), and the waits of its
    /// transfers still going: a new volume of that name starts from nothing.
    pub fn forget(&self, volume: &str) {
        let mut s = self.state();
        s.waited.retain(|(v, _), _| v != volume);
        *s.forgotten.entry(volume.to_string()).or_default() += 1;
    }

    /// Transfers of `volume`'s `class` waiting for their tokens now (those of a volume
    /// forgotten and made again under its name included).
    pub fn waiting(&self, volume: &str, class: Class) -> u64 {
        let key = (volume.to_string(), class);
        self.state().waiting.get(&key).copied().unwrap_or(0)
    }

    /// Transfers waiting for their tokens now, by volume and class (only those with
    /// some), sorted: how many a limit holds back at this moment.
    pub fn waiting_now(&self) -> Vec<(String, Class, u64)> {
        by_volume(&self.state().waiting)
    }

    /// What each volume's transfers waited on the limits since the start, by class:
    /// how much the limits hold traffic back.
    pub fn waited(&self) -> Vec<(String, Class, Waited)> {
        by_volume(&self.state().waited)
    }
}

/// `map`'s entries by volume, foreground before background.
fn by_volume<T: Copy>(map: &HashMap<(String, Class), T>) -> Vec<(String, Class, T)> {
    let mut v: Vec<_> = map
        .iter()
        .map(|((volume, class), t)| (volume.clone(), *class, *t))
        .collect();
    v.sort_by(|a, b| (&a.0, a.1 == Class::Background).cmp(&(&b.0, b.1 == Class::Background)));
    v
}

/// A transfer waiting for its tokens: counted in [`Throttle::waited`] when it ends.
struct Waiting<'a> {
    throttle: &'a Throttle,
    volume: &'a str,
    class: Class,
    /// When it began to wait, and its volume's count of [`Throttle::forget`]s then.
    began: Option<(Instant, u64)>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some((began, forgotten)) = self.began {
            let mut s = self.throttle.state();
            let key = (self.volume.to_string(), self.class);
            match s.waiting.get_mut(&key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => drop(s.waiting.remove(&key)),
            }
            if s.forgotten.get(self.volume).copied().unwrap_or(0) != forgotten {
                return;
            }
            let w = s
                .waited
                .entry((self.volume.to_string(), self.class))
                .or_default();
            w.transfers += 1;
            w.time += began.elapsed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volumes_rate_is_the_lower_of_its_own_and_the_global_limit() {
        let t = Throttle::new(Limit::NONE, Limit::per_second(8 << 20));
        assert_eq!(t.rate("v", Class::Background), 8 << 20, "global only");
        assert_eq!(t.rate("v", Class::Foreground), 0, "unlimited");
        t.set_volume("v", Class::Background, Limit::per_second(2 << 20));
        assert_eq!(t.rate("v", Class::Background), 2 << 20);
        t.set_volume("v", Class::Background, Limit::per_second(64 << 20));
        assert_eq!(t.rate("v", Class::Background), 8 << 20);
        t.set_global(Class::Background, Limit::NONE);
        assert_eq!(t.rate("v", Class::Background), 64 << 20);
        assert_eq!(t.rate("w", Class::Background), 0);
    }

    #[test]
    fn buckets_pace_transfers_and_limits_change_live() {
        let t = Throttle::new(Limit::NONE, Limit::per_second(4 << 20));
        // Foreground is unlimited.
        for _ in 0..100 {
            assert!(t.try_acquire("v", Class::Foreground, 1 << 20).is_zero());
        }
        // Background: the 1 MiB burst passes, then the next MiB waits ~0.25 s.
        assert!(t.try_acquire("v", Class::Background, 1 << 20).is_zero());
        let w = t.try_acquire("v", Class::Background, 1 << 20);
        assert!(
            w > Duration::from_millis(150) && w < Duration::from_millis(300),
            "{w:?}"
        );
        // A per-volume limit tighter than the global one governs that volume only.
        t.set_global(Class::Background, Limit::NONE);
        t.set_volume("slow", Class::Background, Limit::per_second(1 << 20));
        assert!(t.try_acquire("slow", Class::Background, 1 << 20).is_zero());
        assert!(!t.try_acquire("slow", Class::Background, 1 << 20).is_zero());
        assert!(t.try_acquire("fast", Class::Background, 64 << 20).is_zero());
    }

    #[test]
    fn acquire_holds_the_rate() {
        let t = Throttle::new(Limit::per_second(8 << 20), Limit::NONE);
        let start = Instant::now();
        async_io::block_on(async {
            for _ in 0..16 {
                t.acquire("v", Class::Foreground, 1 << 20).await;
            }
        });
        // 16 MiB at 8 MiB/s with a 2 MiB burst: at least ~1.7 s.
        assert!(
            start.elapsed() >= Duration::from_millis(1600),
            "{:?}",
            start.elapsed()
        );
        // The transfers past the burst waited, and that is counted.
        let waited = t.waited();
        assert_eq!(waited.len(), 1, "{waited:?}");
        let (volume, class, w) = &waited[0];
        assert_eq!((volume.as_str(), *class), ("v", Class::Foreground));
        assert!((1..=16).contains(&w.transfers), "{w:?}");
        assert!(!w.time.is_zero() && w.time <= start.elapsed(), "{w:?}");
        // A transfer dropped while it waits is counted too; a deleted volume's waits
        // are forgotten.
        let before = t.waited()[0].2.transfers;
        // A limit so low the next transfer cannot pass, however slow this machine:
        // what the bucket holds is taken first, and it refills at a byte a second.
        t.set_global(
            Class::Foreground,
            Limit {
                rate: 1,
                burst: 1 << 20,
            },
        );
        while t.try_acquire("v", Class::Foreground, 1 << 20).is_zero() {}
        let dropped = futures_lite::future::block_on(futures_lite::future::or(
            async {
                t.acquire("v", Class::Foreground, 8 << 20).await;
                false
            },
            async {
                futures_lite::future::yield_now().await;
                true
            },
        ));
        assert!(dropped, "the 8 MiB transfer waits past a yield");
        assert_eq!(t.waited()[0].2.transfers, before + 1);
        t.forget("v");
        assert!(t.waited().is_empty());
        // A transfer that began waiting before its volume was forgotten is not
        // counted when it ends.
        futures_lite::future::block_on(async {
            let mut waiting = std::pin::pin!(t.acquire("v", Class::Foreground, 1 << 20));
            assert!(
                futures_lite::future::poll_once(waiting.as_mut())
                    .await
                    .is_none(),
                "it waits"
            );
            t.forget("v");
            // The waiting transfer is dropped here, after the forget.
        });
        assert!(t.waited().is_empty(), "{:?}", t.waited());
    }

    /// A transfer that waits for its tokens is counted as waiting until its wait
    /// ends, done or dropped (then counted as having waited).
    #[test]
    fn transfers_waiting_now_are_counted_until_their_wait_ends() {
        let t = Throttle::new(Limit::NONE, Limit::per_second(1));
        assert!(t.try_acquire("v", Class::Background, 1 << 20).is_zero());
        let mut wait = Box::pin(t.acquire("v", Class::Background, 4096));
        let polled = futures_lite::future::block_on(futures_lite::future::poll_once(&mut wait));
        assert!(
            polled.is_none(),
            "a byte a second, the burst taken: it waits"
        );
        assert_eq!(t.waiting("v", Class::Background), 1);
        assert_eq!(t.waiting("v", Class::Foreground), 0);
        assert_eq!(
            t.waiting_now(),
            vec![("v".to_string(), Class::Background, 1)]
        );
        drop(wait);
        assert_eq!(t.waiting("v", Class::Background), 0);
        assert!(t.waiting_now().is_empty(), "{:?}", t.waiting_now());
        assert_eq!(t.waited()[0].2.transfers, 1);
    }
}
