//! Credentials from a command, as the AWS SDKs' `credential_process`: the command
//! prints `{"Version": 1, "AccessKeyId": …, "SecretAccessKey": …, "SessionToken": …,
//! "Expiration": "RFC 3339"}` (the last two optional) on stdout. What it gives is kept
//! until five minutes before it expires (for good, without an expiry); a store asks
//! for its credentials at each request, so it follows every renewal while the command
//! runs once per credentials' life.
//!
//! The command is run without a shell (the configuration gives its arguments as a
//! list), with no input, in a process group of its own, and given [`TIMEOUT`] to
//! answer before the group is killed. It runs where it is asked for: a renewal holds
//! that thread (an OX core) for as long as the command takes. Its output is never
//! logged or echoed in an error: only its exit status and the first line of what it
//! wrote on stderr.

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

/// What each command gave, and until when. A lock, not an owner: taken once per S3
/// request of a store whose credentials come from a command (tens of nanoseconds
/// beside the request's milliseconds; never on the block I/O path), held only to look
/// up or replace one entry.
static CACHE: Mutex<Option<HashMap<Vec<String>, Cached>>> = Mutex::new(None);

#[derive(Clone)]
struct Cached {
    credentials: Credentials,
    expires: Option<SystemTime>,
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

/// The credentials `command` gives (from the cache while they are fresh).
pub fn credentials(command: &[String]) -> Result<Credentials, OxError> {
    credentials_within(command, TIMEOUT)
}

/// [`credentials`] with the command given `timeout`.
pub fn credentials_within(command: &[String], timeout: Duration) -> Result<Credentials, OxError> {
    let now = SystemTime::now();
    {
        let cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref().and_then(|m| m.get(command))
            && c.expires.is_none_or(|e| now + EARLY < e)
        {
            return Ok(c.credentials.clone());
        }
    }
    let fresh = run(command, timeout)?;
    CACHE
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(command.to_vec(), fresh.clone());
    Ok(fresh.credentials)
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
        let c = credentials(&lasting).unwrap();
        assert_eq!((c.key(), c.secret(), c.token()), ("AK", "SK", Some("T")));
        credentials(&lasting).unwrap();
        assert_eq!(runs(d, "lasting"), 1, "kept");

        let expiring = script(
            d,
            "expiring",
            r#"echo '{"Version": 1, "AccessKeyId": "AK2", "SecretAccessKey": "SK2", "Expiration": "2026-01-01T00:00:00+00:00"}'"#,
        );
        assert_eq!(credentials(&expiring).unwrap().key(), "AK2");
        credentials(&expiring).unwrap();
        assert_eq!(runs(d, "expiring"), 2, "asked again: expired");

        let forever = script(
            d,
            "forever",
            r#"echo '{"Version": 1, "AccessKeyId": "AK3", "SecretAccessKey": "SK3"}'"#,
        );
        credentials(&forever).unwrap();
        credentials(&forever).unwrap();
        assert_eq!(runs(d, "forever"), 1, "no expiry: kept");
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
            let e = credentials_within(&cmd, timeout).err().unwrap().to_string();
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
        let got = credentials_within(&left, Duration::from_secs(30)).unwrap();
        assert_eq!(got.key(), "AK4");
        let silent = script(d, "silent", "exit 4");
        let e = credentials(&silent).err().unwrap().to_string();
        assert!(e.ends_with("exit status: 4"), "{e}");
        let e = credentials(&["/nonexistent/helper".to_string()])
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot run it"), "{e}");
        assert!(credentials(&[]).is_err());
    }
}
