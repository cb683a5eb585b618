//! Credentials from a command, as the AWS SDKs' `credential_process`: the command
//! prints `{"Version": 1, "AccessKeyId": …, "SecretAccessKey": …, "SessionToken": …,
//! "Expiration": "RFC 3339"}` (the last two optional) on stdout. What it gives is kept
//! until it expires (for good, without an expiry); a store asks for its credentials at
//! each request, so it follows every renewal while the command runs once per
//! credentials' life. Five minutes before they expire a renewal starts in the
//! background, and requests go on with the current ones meanwhile; only when there are
//! none still valid (the first request, a renewal that kept failing, credentials the
//! store refused) do requests wait for the command, and then for one run of it however
//! many wait. An answer that has expired already is an error, not credentials. A store
//! that refuses the credentials themselves (HTTP 403 naming them invalid, expired or not
//! matching; not a policy's refusal) makes them [`forget`]: the next request asks the
//! command again (keys revoked or rotated before their expiry). A renewal that fails is
//! tried again after `RENEWAL_BACKOFF` (10 s) while the current credentials still serve.
//!
//! The command is run without a shell (the configuration gives its arguments as a
//! list), with no input, in a process group of its own, on a thread of its own (never
//! on an OX core: a request waits for it asynchronously), and given [`TIMEOUT`] to
//! answer before the group is killed. Its output is never logged or echoed in an
//! error: only its exit status and the first line of what it wrote on stderr.

use std::collections::HashMap;
use std::io::Read as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rusty_s3::Credentials;
use serde::Deserialize;

use crate::error::OxError;

/// How long the command may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Credentials are fetched again this long before they expire.
const EARLY: Duration = Duration::from_secs(300);

/// What each command gave, and until when, and who waits for its run. A lock, not an
/// owner: taken once per S3 request of a store whose credentials come from a command
/// (tens of nanoseconds beside the request's milliseconds; never on the block I/O
/// path), held only to look up or change one entry.
static CACHE: Mutex<Option<HashMap<Vec<String>, Entry>>> = Mutex::new(None);

#[derive(Clone)]
struct Cached {
    credentials: Credentials,
    expires: Option<SystemTime>,
}

/// One command's state.
#[derive(Default)]
struct Entry {
    cached: Option<Cached>,
    /// A run in progress, and the requests waiting for its answer.
    running: Option<Vec<Waiter>>,
    /// Runs started (for tests and the log).
    runs: u64,
    /// When the last run failed.
    failed_at: Option<std::time::Instant>,
}

/// After a failed renewal, how long requests go on with the current credentials
/// before one tries again.
const RENEWAL_BACKOFF: Duration = Duration::from_secs(10);

type Waiter = async_channel::Sender<Result<Credentials, String>>;

fn cache() -> std::sync::MutexGuard<'static, Option<HashMap<Vec<String>, Entry>>> {
    CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Output {
    version: u32,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    expiration: Option<String>,
}

/// The credentials `command` gives: the cached ones while they are valid (renewed in
/// the background when they are about to expire), else the answer of a run.
pub async fn credentials(command: &[String]) -> Result<Credentials, OxError> {
    credentials_within(command, TIMEOUT).await
}

/// [`credentials`] with the command given `timeout`.
pub async fn credentials_within(
    command: &[String],
    timeout: Duration,
) -> Result<Credentials, OxError> {
    let now = SystemTime::now();
    let (valid, answer, begin) = {
        let mut cache = cache();
        let entry = cache
            .get_or_insert_with(HashMap::new)
            .entry(command.to_vec())
            .or_default();
        let valid = entry
            .cached
            .as_ref()
            .filter(|c| c.expires.is_none_or(|e| now < e));
        let fresh = valid.is_some_and(|c| c.expires.is_none_or(|e| now + EARLY < e));
        if let (true, Some(c)) = (fresh, valid) {
            return Ok(c.credentials.clone());
        }
        let valid = valid.map(|c| c.credentials.clone());
        // A renewal that just failed is not tried again at every request while the
        // current credentials still serve.
        let resting = valid.is_some()
            && entry
                .failed_at
                .is_some_and(|t| t.elapsed() < RENEWAL_BACKOFF);
        let (tx, rx) = async_channel::bounded(1);
        let mut begin = false;
        match &mut entry.running {
            Some(waiters) => {
                if valid.is_none() {
                    waiters.push(tx);
                }
            }
            None if resting => {}
            None => {
                entry.running = Some(if valid.is_none() {
                    vec![tx]
                } else {
                    Vec::new()
                });
                entry.runs += 1;
                begin = true;
            }
        }
        (valid, rx, begin)
    };
    // Started with the lock released (a failure to start answers under it).
    if begin {
        start(command, timeout);
    }
    // Still valid: this request goes on with them while the renewal runs.
    if let Some(c) = valid {
        return Ok(c);
    }
    answer
        .recv()
        .await
        .map_err(|_| failed(command, "its run was abandoned"))?
        .map_err(OxError::Config)
}

/// Runs `command` now, on this thread, and keeps its answer: for checking a
/// configuration at start (never on an OX core), so a broken command fails the start.
pub fn prime(command: &[String]) -> Result<(), OxError> {
    let c = run(command, TIMEOUT).and_then(|c| unexpired(command, c))?;
    let mut cache = cache();
    let entry = cache
        .get_or_insert_with(HashMap::new)
        .entry(command.to_vec())
        .or_default();
    entry.cached = Some(c);
    entry.runs += 1;
    Ok(())
}

/// Drops what `command` gave (the store refused it): the next request runs it again.
pub fn forget(command: &[String]) {
    if let Some(entry) = cache().as_mut().and_then(|m| m.get_mut(command))
        && entry.cached.take().is_some()
    {
        tracing::warn!(
            command = command.first().map_or("", String::as_str),
            "the store refused the credentials the command gave: asking it again"
        );
    }
}

/// Runs `command` on a thread of its own; its answer goes to the cache and to every
/// request waiting for it.
fn start(command: &[String], timeout: Duration) {
    let cmd = command.to_vec();
    let spawned = std::thread::Builder::new()
        .name("credential-process".into())
        .spawn(move || {
            // Whatever happens in the run, its waiters get an answer.
            let answer = std::panic::catch_unwind(|| run(&cmd, timeout))
                .unwrap_or_else(|_| Err(failed(&cmd, "its run panicked")))
                .and_then(|c| unexpired(&cmd, c));
            finish(&cmd, answer);
        });
    if let Err(e) = spawned {
        finish(
            command,
            Err(failed(command, format!("cannot start it: {e}"))),
        );
    }
}

/// An answer that has expired already cannot sign anything.
fn unexpired(command: &[String], c: Cached) -> Result<Cached, OxError> {
    match c.expires {
        Some(e) if e <= SystemTime::now() => Err(failed(
            command,
            format!(
                "it answered with credentials that expired at {} (check this machine's clock, or the command)",
                time::OffsetDateTime::from(e)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            ),
        )),
        _ => Ok(c),
    }
}

fn finish(command: &[String], answer: Result<Cached, OxError>) {
    let waiters = {
        let mut cache = cache();
        let entry = cache
            .get_or_insert_with(HashMap::new)
            .entry(command.to_vec())
            .or_default();
        match &answer {
            Ok(c) => {
                entry.cached = Some(c.clone());
                entry.failed_at = None;
            }
            Err(_) => entry.failed_at = Some(std::time::Instant::now()),
        }
        entry.running.take().unwrap_or_default()
    };
    if let Err(e) = &answer {
        tracing::warn!("{e}");
    }
    let answer = answer.map(|c| c.credentials).map_err(|e| match e {
        OxError::Config(m) => m,
        e => e.to_string(),
    });
    for w in waiters {
        let _ = w.try_send(answer.clone());
    }
}

/// How many times `command` was started.
#[cfg(test)]
fn runs_of(command: &[String]) -> u64 {
    cache()
        .as_ref()
        .and_then(|m| m.get(command))
        .map_or(0, |e| e.runs)
}

fn failed(command: &[String], why: impl std::fmt::Display) -> OxError {
    OxError::Config(format!(
        "credential_process {}: {why}",
        command.first().map_or("(empty)", String::as_str)
    ))
}

/// Most of its stdout read (the JSON is a few hundred bytes) and of its stderr.
const MAX_OUT: u64 = 64 << 10;
const MAX_ERR: u64 = 4 << 10;

fn run(command: &[String], timeout: Duration) -> Result<Cached, OxError> {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = command.split_first() else {
        return Err(failed(command, "no command given"));
    };
    // In a process group of its own, so that a timeout kills whatever it started too
    // (and their ends of its pipes go with them).
    let spawn = || {
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
    };
    let mut child = spawn();
    for _ in 0..3 {
        // A program just written may still be open for writing in a process another
        // thread forked (ETXTBSY): a moment later it runs.
        match &child {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10));
                child = spawn();
            }
            _ => break,
        }
    }
    let mut child = child.map_err(|e| failed(command, format!("cannot run it: {e}")))?;
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failed(command, "no pipes to it"));
    };
    // Its output read and its exit awaited on a thread, within `timeout`. Its stderr
    // is read on another and waited for only if it failed: something it left running
    // may hold stderr open long after it answered.
    let (tx, rx) = std::sync::mpsc::channel();
    let (err_tx, err_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("credential-process".into())
        .spawn(move || {
            let err_reader = std::thread::Builder::new().spawn(move || {
                let mut e = Vec::new();
                let _ = stderr.take(MAX_ERR).read_to_end(&mut e);
                let _ = err_tx.send(e);
            });
            let mut out = Vec::new();
            let read = stdout.take(MAX_OUT).read_to_end(&mut out);
            let status = child.wait();
            let _ = tx.send((read.map(|_| out), status));
            drop(err_reader);
        });
    if let Err(e) = waiter {
        let _ = rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(pid as i32).ok_or_else(|| failed(command, "no pid"))?,
            rustix::process::Signal::KILL,
        );
        return Err(failed(command, format!("cannot wait for it: {e}")));
    }
    let started = std::time::Instant::now();
    let (out, status) = match rx.recv_timeout(timeout) {
        Ok(answer) => answer,
        Err(_) => {
            if let Some(group) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            return Err(failed(
                command,
                format!("no answer within {} s; killed", timeout.as_secs()),
            ));
        }
    };
    let out = out.map_err(|e| failed(command, format!("reading its output: {e}")))?;
    let status = status.map_err(|e| failed(command, format!("waiting for it: {e}")))?;
    if !status.success() {
        let left = timeout.saturating_sub(started.elapsed());
        let err = err_rx.recv_timeout(left).unwrap_or_default();
        let err = String::from_utf8_lossy(&err);
        let first: String = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        return Err(failed(
            command,
            if first.is_empty() {
                status.to_string()
            } else {
                format!("{status}: {first}")
            },
        ));
    }
    parse(command, &out)
}

fn parse(command: &[String], out: &[u8]) -> Result<Cached, OxError> {
    // Only where, never what: serde's messages may quote a value, which may be secret.
    let o: Output = serde_json::from_slice(out).map_err(|e| {
        failed(
            command,
            format!(
                "its output is not the JSON expected ({:?} at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        )
    })?;
    if o.version != 1 {
        return Err(failed(
            command,
            format!("its output has Version {}, not 1", o.version),
        ));
    }
    if o.access_key_id.is_empty() || o.secret_access_key.is_empty() {
        return Err(failed(command, "its output has an empty key"));
    }
    let expires = o
        .expiration
        .as_deref()
        .map(|e| {
            time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339)
                .map(SystemTime::from)
                .map_err(|_| failed(command, format!("Expiration {e:?} is not RFC 3339")))
        })
        .transpose()?;
    let credentials = match o.session_token {
        Some(t) => Credentials::new_with_token(o.access_key_id, o.secret_access_key, t),
        None => Credentials::new(o.access_key_id, o.secret_access_key),
    };
    Ok(Cached {
        credentials,
        expires,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_lite::future::block_on;
    use std::os::unix::fs::PermissionsExt;

    /// A script in `dir` that counts its runs in `dir/runs` and then runs `body`.
    fn script(dir: &std::path::Path, name: &str, body: &str) -> Vec<String> {
        let path = dir.join(name);
        let runs = dir.join(format!("{name}.runs"));
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho x >> {}\n{body}\n", runs.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        vec![path.display().to_string()]
    }

    fn runs(dir: &std::path::Path, name: &str) -> usize {
        std::fs::read_to_string(dir.join(format!("{name}.runs"))).map_or(0, |s| s.lines().count())
    }

    #[test]
    fn credentials_are_kept_until_shortly_before_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let lasting = script(
            d,
            "lasting",
            r#"echo '{"Version": 1, "AccessKeyId": "AK", "SecretAccessKey": "SK", "SessionToken": "T", "Expiration": "2999-01-01T00:00:00Z"}'"#,
        );
        let c = block_on(credentials(&lasting)).unwrap();
        assert_eq!((c.key(), c.secret(), c.token()), ("AK", "SK", Some("T")));
        block_on(credentials(&lasting)).unwrap();
        assert_eq!(runs(d, "lasting"), 1, "kept");

        let expiring = script(
            d,
            "expiring",
            r#"echo '{"Version": 1, "AccessKeyId": "AK2", "SecretAccessKey": "SK2", "Expiration": "2000-01-01T00:00:00+00:00"}'"#,
        );
        let e = block_on(credentials(&expiring)).err().unwrap().to_string();
        assert!(e.contains("expired at 2000-01-01T00:00:00Z"), "{e}");
        assert!(block_on(credentials(&expiring)).is_err());
        assert_eq!(runs(d, "expiring"), 2, "an expired answer is not kept");

        // About to expire: the request goes on with them, a renewal starts beside it.
        let soon = time::OffsetDateTime::now_utc() + Duration::from_secs(120);
        let soon = soon
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let renewing = script(
            d,
            "renewing",
            &format!(
                r#"echo '{{"Version": 1, "AccessKeyId": "AK5", "SecretAccessKey": "SK5", "Expiration": "{soon}"}}'"#
            ),
        );
        assert_eq!(block_on(credentials(&renewing)).unwrap().key(), "AK5");
        assert_eq!(runs_of(&renewing), 1);
        assert_eq!(block_on(credentials(&renewing)).unwrap().key(), "AK5");
        assert_eq!(runs_of(&renewing), 2, "renewed in the background");

        let forever = script(
            d,
            "forever",
            r#"echo '{"Version": 1, "AccessKeyId": "AK3", "SecretAccessKey": "SK3"}'"#,
        );
        block_on(credentials(&forever)).unwrap();
        block_on(credentials(&forever)).unwrap();
        assert_eq!(runs(d, "forever"), 1, "no expiry: kept");
        // Refused by the store: asked again.
        forget(&forever);
        block_on(credentials(&forever)).unwrap();
        assert_eq!(runs(d, "forever"), 2, "forgotten after a refusal");
    }

    #[test]
    fn a_failing_hanging_or_garbled_command_is_a_clear_error_without_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases = [
            (
                "denied",
                "echo 'access denied' >&2\necho SECRET-OUT\nexit 3",
                "access denied",
            ),
            (
                "garbled",
                "echo 'AKIA SECRET-OUT not json'",
                "not the JSON expected",
            ),
            (
                "version",
                r#"echo '{"Version": 2, "AccessKeyId": "A", "SecretAccessKey": "SECRET-OUT"}'"#,
                "Version 2",
            ),
            (
                "empty",
                r#"echo '{"Version": 1, "AccessKeyId": "", "SecretAccessKey": "SECRET-OUT"}'"#,
                "empty key",
            ),
            (
                "expiry",
                r#"echo '{"Version": 1, "AccessKeyId": "A", "SecretAccessKey": "SECRET-OUT", "Expiration": "tomorrow"}'"#,
                "not RFC 3339",
            ),
            ("hangs", "exec sleep 60", "no answer within 1 s"),
            (
                "typed",
                r#"echo '{"Version": "SECRET-OUT", "AccessKeyId": "A", "SecretAccessKey": "B"}'"#,
                "not the JSON expected",
            ),
        ];
        for (name, body, why) in cases {
            let cmd = script(d, name, body);
            // Only the hanging one is meant to meet the timeout: the others get the
            // full one, however slow the machine.
            let timeout = if name == "hangs" {
                Duration::from_secs(1)
            } else {
                TIMEOUT
            };
            let e = block_on(credentials_within(&cmd, timeout))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(why) && e.contains(name), "{name}: {e}");
            assert!(!e.contains("SECRET-OUT"), "{name}: output echoed: {e}");
        }
        // Something it leaves running holds stderr (and is in its process group): the
        // answer counts, and nothing waits for it.
        let left = script(
            d,
            "leaves",
            r#"sleep 5 > /dev/null &
echo '{"Version": 1, "AccessKeyId": "AK4", "SecretAccessKey": "SK4"}'"#,
        );
        let got = block_on(credentials_within(&left, Duration::from_secs(30))).unwrap();
        assert_eq!(got.key(), "AK4");
        let silent = script(d, "silent", "exit 4");
        let e = block_on(credentials(&silent)).err().unwrap().to_string();
        assert!(e.ends_with("exit status: 4"), "{e}");
        let e = block_on(credentials(&["/nonexistent/helper".to_string()]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot run it"), "{e}");
        assert!(block_on(credentials(&[])).is_err());
    }
}
