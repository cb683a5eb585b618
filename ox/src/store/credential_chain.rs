//! The AWS credential chain, as the SDKs walk it by default, for the sources this
//! appliance reads: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`; skipped when the store names its `profile`, as an explicit
//! profile is with the AWS CLI), then the profile in the shared credentials file, then
//! in the config file — in each, its `credential_process` or its keys. The first
//! source that holds credentials is the store's from then on, as an SDK keeps the
//! provider that answered; none holding any is an error naming every place looked at.
//!
//! The profile is the one asked for, else `AWS_PROFILE`, else `default` (in the config
//! file `[profile NAME]`, and for the default `[profile default]` or `[default]`). The
//! files are `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` (a leading `~/` is
//! the home directory), else `~/.aws/credentials` and `~/.aws/config`; a file that does
//! not exist is passed over, one that cannot be read or parsed is an error, as is a
//! profile (or an environment) with one key and not the other. Empty values count as
//! unset. The environment is read through a function so that tests need not change
//! the process's.

use std::path::PathBuf;

use super::s3::CredentialSource;
use crate::error::OxError;

/// The first source of the chain that holds credentials, and where it was found (for
/// the log: never a secret). `profile`: the profile the store's configuration names.
pub fn resolve(
    profile: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(CredentialSource, String), OxError> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    let mut looked = Vec::new();
    if profile.is_none() {
        match (set("AWS_ACCESS_KEY_ID"), set("AWS_SECRET_ACCESS_KEY")) {
            (Some(_), Some(_)) => {
                return Ok((CredentialSource::Environment, "the environment".into()));
            }
            (None, None) => looked.push("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()),
            (Some(_), None) => {
                return Err(OxError::Config(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(OxError::Config(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into(),
                ));
            }
        }
    }
    let profile = profile
        .map(str::to_string)
        .or_else(|| set("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let home = set("HOME");
    // The file `var` names (or `under_home`), parsed; a file not there is noted as
    // looked at and passed over. Each is read only once the sources before it held
    // nothing.
    let open = |var: &str, under_home: &str, looked: &mut Vec<String>| {
        let Some(path) = aws_file(&env, var, under_home) else {
            return Ok(None);
        };
        let ini = read_ini(&path)?;
        if ini.is_none() {
            looked.push(format!("{} (no such file)", path.display()));
        }
        Ok::<_, OxError>(ini.map(|ini| (path, ini)))
    };
    if let Some((path, ini)) = open(
        "AWS_SHARED_CREDENTIALS_FILE",
        ".aws/credentials",
        &mut looked,
    )? {
        let at = format!("{} [{profile}]", path.display());
        let section = ini.section(Some(profile.as_str()));
        match from_section(section, &at)? {
            Some(Found::Process(command)) => {
                return Ok((CredentialSource::Process { command }, at));
            }
            Some(Found::Keys { .. }) => {
                return Ok((CredentialSource::SharedFile { profile }, at));
            }
            None => looked.push(at),
        }
    }
    if let Some((path, ini)) = open("AWS_CONFIG_FILE", ".aws/config", &mut looked)? {
        // `[profile NAME]` (blanks between the words as they come); the default may
        // also be `[default]`.
        let named = ini.iter().find_map(|(name, props)| {
            let words: Vec<&str> = name?.split_whitespace().collect();
            (words == ["profile", profile.as_str()]).then_some(props)
        });
        let section = named.or_else(|| {
            (profile == "default")
                .then(|| ini.section(Some("default")))
                .flatten()
        });
        let at = match (named, profile.as_str()) {
            (None, "default") => format!("{} [default]", path.display()),
            _ => format!("{} [profile {profile}]", path.display()),
        };
        match from_section(section, &at)? {
            Some(Found::Process(command)) => {
                return Ok((CredentialSource::Process { command }, at));
            }
            Some(Found::Keys {
                access_key,
                secret_key,
                token: None,
            }) => {
                let source = CredentialSource::Static {
                    access_key,
                    secret_key,
                };
                return Ok((source, at));
            }
            Some(Found::Keys { token: Some(_), .. }) => {
                return Err(OxError::Config(format!(
                    "{at}: a session token in the config file is not read; put the profile \
                     in the shared credentials file"
                )));
            }
            None => looked.push(at),
        }
    }
    if home.is_none() {
        looked.push("not ~/.aws (HOME is not set, nor found in /etc/passwd)".into());
    }
    Err(OxError::Config(format!(
        "no credentials in the chain: looked at {}",
        looked.join(", ")
    )))
}

/// This process's environment as the chain reads it: `HOME`, where it is not set (a
/// system service started without `User=`), is this user's home directory in
/// `/etc/passwd` (the SDKs ask the system's user database; this reads only the file).
pub fn process_env(name: &str) -> Option<String> {
    let value = std::env::var(name).ok().filter(|v| !v.is_empty());
    match name {
        "HOME" => value.or_else(|| {
            let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
            home_in_passwd(&passwd, rustix::process::geteuid().as_raw())
        }),
        _ => value,
    }
}

/// The home directory of user `uid` in the text of a passwd file
/// (`name:password:uid:gid:gecos:home:shell`).
fn home_in_passwd(text: &str, uid: u32) -> Option<String> {
    let lines = text.lines().filter(|l| !l.trim_start().starts_with('#'));
    lines.into_iter().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [_, _, id, _, _, home, ..] if id.parse() == Ok(uid) && home.starts_with('/') => {
                Some(home.to_string())
            }
            _ => None,
        }
    })
}

/// The file `var` names (a leading `~/` the home directory), else `under_home` in the
/// home directory; `None` with neither.
pub fn aws_file(
    env: &impl Fn(&str) -> Option<String>,
    var: &str,
    under_home: &str,
) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    let home = || set("HOME").map(PathBuf::from);
    match set(var) {
        Some(p) => match p.strip_prefix("~/") {
            Some(rest) => home().map(|h| h.join(rest)),
            None => Some(PathBuf::from(p)),
        },
        None => home().map(|h| h.join(under_home)),
    }
}

/// What a profile's section holds.
enum Found {
    Process(Vec<String>),
    Keys {
        access_key: String,
        secret_key: String,
        token: Option<String>,
    },
}

/// A profile's `credential_process`, else its keys, if it has either (`at` names it in
/// errors: a command line that does not split, one key without the other).
fn from_section(section: Option<&ini::Properties>, at: &str) -> Result<Option<Found>, OxError> {
    let Some(section) = section else {
        return Ok(None);
    };
    let get = |k: &str| {
        let v = section.get(k).map(str::trim);
        v.filter(|v| !v.is_empty()).map(str::to_string)
    };
    if let Some(line) = get("credential_process") {
        let command = shell_words(&line)
            .map_err(|why| OxError::Config(format!("{at}: credential_process: {why}")))?;
        if command.is_empty() {
            return Err(OxError::Config(format!(
                "{at}: credential_process is empty"
            )));
        }
        return Ok(Some(Found::Process(command)));
    }
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key), Some(secret_key)) => Ok(Some(Found::Keys {
            access_key,
            secret_key,
            token: get("aws_session_token"),
        })),
        (None, None) => Ok(None),
        _ => Err(OxError::Config(format!(
            "{at}: only one of aws_access_key_id and aws_secret_access_key"
        ))),
    }
}

/// An AWS INI file as the SDKs read it (quotes and escapes taken as written), or
/// `None` if it does not exist.
fn read_ini(path: &std::path::Path) -> Result<Option<ini::Ini>, OxError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(OxError::Io {
                path: path.display().to_string(),
                source: e,
            });
        }
    };
    let options = ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..ini::ParseOption::default()
    };
    ini::Ini::load_from_str_opt(&text, options)
        .map(Some)
        .map_err(|e| OxError::Config(format!("{}: {e}", path.display())))
}

/// Splits a command line into words as the AWS CLI splits `credential_process`
/// (Python's `shlex.split`), expanding nothing — no `~`, `$VAR`, globs or pipes, as no
/// shell runs it: blanks separate words; `'…'` keeps everything inside; `"…"` keeps
/// everything but a backslash before `"` or `\`; elsewhere a backslash keeps the next
/// character. An unclosed quote or a trailing backslash is an error.
pub fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("a ' is not closed".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("a \" is not closed".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("a \" is not closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("it ends in a backslash".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn command_lines_split_as_a_shell_splits_them() {
        let split = |s: &str| shell_words(s).unwrap();
        assert_eq!(
            split("/opt/bin/creds --user helen"),
            ["/opt/bin/creds", "--user", "helen"]
        );
        assert_eq!(
            split(r#"  "/opt/my tools/creds"  'a b'\ c d"e"f '' "#),
            ["/opt/my tools/creds", "a b c", "def", ""]
        );
        // In double quotes only `\"` and `\\` lose their backslash, as with shlex.
        assert_eq!(split(r#""\"\\\$\`\n" '\n'"#), [r#""\\$\`\n"#, r"\n"]);
        assert_eq!(split(""), Vec::<String>::new());
        for bad in ["'open", "\"open", "end\\", "\"a\\"] {
            assert!(shell_words(bad).is_err(), "{bad}");
        }
    }

    /// The environment first (unless the store names a profile), then the shared
    /// credentials file's profile, then the config file's (a credential process, or
    /// keys); the profile named, else AWS_PROFILE, else default; a profile or an
    /// environment with one key of two is an error; nothing anywhere is an error naming
    /// each place.
    #[test]
    fn the_chain_takes_the_first_source_that_holds_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        let mut vars: HashMap<&str, String> = HashMap::from([
            ("HOME", dir.path().display().to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "~/credentials".into()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
        ]);
        let resolve_in = |vars: &HashMap<&str, String>, profile: Option<&str>| {
            resolve(profile, |k| vars.get(k).cloned())
        };
        // Nothing yet: every place named.
        let e = resolve_in(&vars, None).unwrap_err().to_string();
        let (c, f) = (creds.display(), config.display());
        assert!(
            e.contains("AWS_ACCESS_KEY_ID")
                && e.contains(&format!("{c} (no such file)"))
                && e.contains(&format!("{f} (no such file)")),
            "{e}"
        );

        std::fs::write(
            &config,
            "[default]\ncredential_process = \"/opt/my tools/creds\" --json\n\
             [profile   keys]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .unwrap();
        let (source, at) = resolve_in(&vars, None).unwrap();
        assert!(
            matches!(&source, CredentialSource::Process { command } if command == &["/opt/my tools/creds", "--json"]),
            "{source:?}"
        );
        assert_eq!(at, format!("{f} [default]"));
        let (source, at) = resolve_in(&vars, Some("keys")).unwrap();
        assert!(
            matches!(&source, CredentialSource::Static { access_key, secret_key } if access_key == "AK" && secret_key == "SK"),
            "{source:?}"
        );
        assert_eq!(at, format!("{f} [profile keys]"));

        // The shared credentials file (found under `~/`) comes before the config file,
        // its credential_process as its keys.
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = A\naws_secret_access_key = S\n\
             [run]\ncredential_process = creds 'a b'\n[half]\naws_access_key_id = A\n",
        )
        .unwrap();
        let (source, at) = resolve_in(&vars, None).unwrap();
        assert!(
            matches!(&source, CredentialSource::SharedFile { profile } if profile == "default"),
            "{source:?}"
        );
        assert_eq!(at, format!("{c} [default]"));
        let (source, _) = resolve_in(&vars, Some("run")).unwrap();
        assert!(
            matches!(&source, CredentialSource::Process { command } if command == &["creds", "a b"]),
            "{source:?}"
        );
        // One key of two is an error; AWS_PROFILE names the profile where the
        // configuration does not.
        vars.insert("AWS_PROFILE", "half".into());
        let e = resolve_in(&vars, None).unwrap_err().to_string();
        assert!(e.contains("[half]: only one of"), "{e}");
        let (source, _) = resolve_in(&vars, Some("default")).unwrap();
        assert!(matches!(source, CredentialSource::SharedFile { .. }));

        // The environment before any file, unless the store names its profile; half
        // an environment is an error.
        vars.insert("AWS_ACCESS_KEY_ID", "E".into());
        let e = resolve_in(&vars, Some("keys")).map(|_| ());
        assert!(
            e.is_ok(),
            "a named profile does not look at the environment"
        );
        let e = resolve_in(&vars, None).unwrap_err().to_string();
        assert!(
            e.contains("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"),
            "{e}"
        );
        vars.insert("AWS_SECRET_ACCESS_KEY", "ES".into());
        let (source, at) = resolve_in(&vars, None).unwrap();
        assert!(
            matches!(source, CredentialSource::Environment),
            "{source:?}"
        );
        assert_eq!(at, "the environment");
        let (source, _) = resolve_in(&vars, Some("keys")).unwrap();
        assert!(
            matches!(source, CredentialSource::Static { .. }),
            "{source:?}"
        );

        // A broken credential_process line is an error naming the file and profile;
        // without HOME, ~/.aws is said not to have been looked at.
        vars.remove("AWS_ACCESS_KEY_ID");
        std::fs::write(&config, "[profile p]\ncredential_process = 'open\n").unwrap();
        let e = resolve_in(&vars, Some("p")).unwrap_err().to_string();
        assert!(e.contains("[profile p]: credential_process"), "{e}");
        let bare = HashMap::from([("AWS_PROFILE", "x".to_string())]);
        let e = resolve_in(&bare, None).unwrap_err().to_string();
        assert!(e.contains("HOME is not set"), "{e}");
    }

    #[test]
    fn a_users_home_is_found_in_passwd() {
        let passwd = "#old:x:0:0::/tmp/x:/bin/sh\nroot:x:0:0:root:/root:/bin/bash\nbad line\n\
                      ox:x:1000:1000::/home/ox:/bin/sh\nnohome:x:7:7:::/bin/sh\n\
                      dot:x:8:8::.:/bin/sh\n";
        assert_eq!(home_in_passwd(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(home_in_passwd(passwd, 1000).as_deref(), Some("/home/ox"));
        assert_eq!(home_in_passwd(passwd, 7), None);
        assert_eq!(home_in_passwd(passwd, 8), None, "a relative home");
        assert_eq!(home_in_passwd(passwd, 42), None);
    }
}
