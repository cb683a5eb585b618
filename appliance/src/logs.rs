//! oxd's log: one line per event on stdout — time (UTC), level, the module that
//! speaks, the message and its fields as key=value. Under systemd, when stdout is the
//! journal, the time is left to the journal. `RUST_LOG` filters (default `info`).
//! Nothing secret is ever logged.
//!
//! Repeats are rate-limited: a warning or an error from one place in the code about
//! one subject (a store failing every request, a peer reconnecting in a loop) is
//! written at most [`BURST`] times per [`PERIOD`]; the first such line after some were
//! left out says how many (`repeats_suppressed=N`). The subject is what the event's
//! [`SUBJECTS`] fields name, so one noisy peer or volume never silences the lines
//! about another. Information lines (starts, stops, exports) are never left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::callsite::Identifier;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Lines one place may write about one subject per [`PERIOD`].
pub const BURST: u32 = 20;
/// See [`BURST`].
pub const PERIOD: Duration = Duration::from_secs(10);

/// The fields that name what an event is about (OPERATIONS.md lists them).
pub const SUBJECTS: &[&str] = &[
    "volume",
    "clone",
    "store",
    "snapshot",
    "device",
    "subsystem",
    "host",
    "peer",
    "listener",
    "caller",
];

/// Budgets kept at most: past this (a flood of ever new peers), the budgets whose
/// period is over go; if that is not enough, new subjects share their place's budget.
const SUBJECTS_KEPT: usize = 4096;

/// Starts logging (once, before anything else logs).
pub fn init() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = tracing_subscriber::fmt::format();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stdout);
    if stdout_is_the_journal() {
        builder
            .event_format(Repeats::new(format.without_time()))
            .init();
    } else {
        builder.event_format(Repeats::new(format)).init();
    }
}

/// Whether stdout is connected to the systemd journal: `JOURNAL_STREAM` (set by
/// systemd) names the device and inode of the journal's stream, and they are stdout's.
fn stdout_is_the_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.split_once(':') else {
        return false;
    };
    match rustix::fs::fstat(std::io::stdout()) {
        Ok(st) => {
            dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
        }
        Err(_) => false,
    }
}

/// What one place's next line gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Written.
    Line,
    /// Written, saying that `n` lines before it were left out.
    After(u64),
    /// Left out.
    Drop,
}

/// One place's lines in the current period.
#[derive(Debug, Clone, Copy)]
struct Budget {
    since: Instant,
    lines: u32,
    suppressed: u64,
}

impl Budget {
    fn new(now: Instant) -> Self {
        Self {
            since: now,
            lines: 0,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Admit {
        if now.saturating_duration_since(self.since) >= PERIOD {
            self.since = now;
            self.lines = 0;
        }
        if self.lines >= BURST {
            self.suppressed += 1;
            return Admit::Drop;
        }
        self.lines += 1;
        match std::mem::take(&mut self.suppressed) {
            0 => Admit::Line,
            n => Admit::After(n),
        }
    }
}

/// An event format that leaves out repeated warnings and errors (see the module
/// documentation) and formats the rest as `F` does.
struct Repeats<F> {
    inner: F,
    /// The budget of each place that warned. A lock on the logging path only: the
    /// reactors log only on faults, and a fault's line costs far more than this.
    budgets: Mutex<Kept>,
    /// The time now (the machine's, but in tests).
    clock: Box<dyn Fn() -> Instant + Send + Sync>,
}

impl<F> Repeats<F> {
    fn new(inner: F) -> Self {
        Self::with_clock(inner, Box::new(Instant::now))
    }

    fn with_clock(inner: F, clock: Box<dyn Fn() -> Instant + Send + Sync>) -> Self {
        Self {
            inner,
            budgets: Mutex::new(Kept {
                budgets: HashMap::new(),
                swept: clock(),
            }),
            clock,
        }
    }

    fn admit(&self, event: &Event<'_>, now: Instant) -> Admit {
        let meta = event.metadata();
        if *meta.level() > Level::WARN {
            return Admit::Line;
        }
        let mut subject = Subject(String::new());
        event.record(&mut subject);
        // Records from the `log` crate share one place per level: their target
        // (the module that wrote them) tells them apart.
        let mut key = (meta.callsite(), format!("{} {}", meta.target(), subject.0));
        let mut kept = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let Kept { budgets, swept } = &mut *kept;
        if budgets.len() >= SUBJECTS_KEPT && !budgets.contains_key(&key) {
            // Full: the budgets whose period is over go (those with lines left out
            // stay a few periods more, to say so if their subject speaks again), at
            // most once a second however hard it floods.
            if now.saturating_duration_since(*swept) >= SWEEP_EVERY {
                *swept = now;
                budgets.retain(|_, b| {
                    let age = now.saturating_duration_since(b.since);
                    age < PERIOD || (b.suppressed > 0 && age < PERIOD * 6)
                });
            }
            if budgets.len() >= SUBJECTS_KEPT {
                key.1 = meta.target().to_string();
            }
        }
        budgets
            .entry(key)
            .or_insert_with(|| Budget::new(now))
            .admit(now)
    }
}

/// The budgets, and when they were last swept.
struct Kept {
    budgets: HashMap<(Identifier, String), Budget>,
    swept: Instant,
}

/// How often a full set of budgets is swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The values of an event's [`SUBJECTS`] fields, as `name=value` words.
struct Subject(String);

/// Who a subject field names, for its budget: a peer (`peer=1.2.3.4:5678`, a
/// control `caller=tcp 1.2.3.4:5678`) by its address without the port, a local caller
/// (`uid=0 pid=42`) by its user: reconnecting in a loop is one subject, not a new one
/// each time.
fn who<'a>(field: &str, value: &'a str) -> &'a str {
    let value = value.trim_matches('"');
    match field {
        "peer" | "caller" if value.contains("pid=") => {
            value.split_whitespace().next().unwrap_or(value)
        }
        "peer" | "caller" => value.rsplit_once(':').map_or(value, |(addr, _)| addr),
        _ => value,
    }
}

impl tracing::field::Visit for Subject {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let name = field.name();
        if SUBJECTS.contains(&name) {
            use std::fmt::Write as _;
            let value = format!("{value:?}");
            let _ = write!(self.0, "{name}={} ", who(name, &value));
        }
    }
}

impl<S, N, F> FormatEvent<S, N> for Repeats<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        match self.admit(event, (self.clock)()) {
            Admit::Line => self.inner.format_event(ctx, writer, event),
            Admit::Drop => Ok(()),
            Admit::After(n) => {
                // Formatted apart (without colours) so the count joins the line's
                // fields before its end.
                let mut line = String::new();
                self.inner
                    .format_event(ctx, Writer::new(&mut line), event)?;
                let line = line.strip_suffix('\n').unwrap_or(&line);
                writeln!(writer, "{line} repeats_suppressed={n}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_one_subject_whatever_its_port() {
        assert_eq!(who("peer", "10.0.0.1:40001"), "10.0.0.1");
        assert_eq!(who("peer", "[::1]:40001"), "[::1]");
        assert_eq!(who("caller", "\"tcp 10.0.0.1:5\""), "tcp 10.0.0.1");
        assert_eq!(who("caller", "\"uid=0 pid=42\""), "uid=0");
        assert_eq!(who("volume", "\"v:1\""), "v:1");
    }

    #[test]
    fn a_place_writes_its_burst_per_period_then_says_how_many_it_left_out() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for _ in 0..BURST {
            assert_eq!(b.admit(t0), Admit::Line);
        }
        for _ in 0..5 {
            assert_eq!(b.admit(t0 + PERIOD / 2), Admit::Drop);
        }
        assert_eq!(b.admit(t0 + PERIOD), Admit::After(5));
        assert_eq!(b.admit(t0 + PERIOD), Admit::Line, "the count is said once");
    }

    /// Through the real subscriber: a warning repeated in a loop is written
    /// [`BURST`] times, information lines all, and the first warning of the next
    /// period carries the count as a field of its line.
    #[test]
    fn a_repeated_warning_is_cut_and_counted_and_information_is_not() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Lines::default();
        let sink = out.clone();
        let t0 = Instant::now();
        let later = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let l = std::sync::Arc::clone(&later);
        let clock = move || {
            if l.load(std::sync::atomic::Ordering::Relaxed) {
                t0 + PERIOD
            } else {
                t0
            }
        };
        let repeats = Repeats::with_clock(
            tracing_subscriber::fmt::format().without_time(),
            Box::new(clock),
        );
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .event_format(repeats)
            .finish();
        let warn = |store: &str, i: u32| tracing::warn!(store, attempt = i, "the store failed");
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..BURST + 7 {
                warn("s3", i);
                tracing::info!(i, "an export");
            }
            // Another store's lines have their own budget.
            warn("other", 0);
            later.store(true, std::sync::atomic::Ordering::Relaxed);
            warn("s3", 99);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let warned = text.matches("the store failed").count();
        assert_eq!(warned, BURST as usize + 2, "{text}");
        assert_eq!(text.matches("store=\"other\"").count(), 1, "{text}");
        assert_eq!(text.matches("an export").count(), (BURST + 7) as usize);
        let last = text.lines().last().unwrap();
        assert!(
            last.contains("attempt=99") && last.ends_with(" repeats_suppressed=7"),
            "{last}"
        );
        assert_eq!(text.matches("repeats_suppressed").count(), 1, "{text}");
        assert!(
            text.lines().all(|l| !l.is_empty()),
            "no empty lines: {text:?}"
        );
    }
}
