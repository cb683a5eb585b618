//! The AWS credential chain, as the SDKs walk it by default, for the sources this
//! appliance reads: the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), then the shared credentials file's profile, then the shared
//! config file's profile (its keys, or its `credential_process`). The first source that
//! holds credentials is the store's from then on, as an SDK keeps the provider that
//! answered; none holding any is an error naming every place looked at.
//!
//! The profile is the one asked for, else `AWS_PROFILE`, else `default`. The files are
//! `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE`, else `~/.aws/credentials` and
//! `~/.aws/config`; a file that does not exist is passed over, one that cannot be read
//! or parsed is an error. The environment is read through a function so that tests
//! need not change the process's.

use std::path::PathBuf;

use super::s3::CredentialSource;
use crate::error::OxError;

/// The first source of the chain that holds credentials, and where it was found (for
/// the log: never a secret). `profile`: the profile asked for in the configuration.
pub fn resolve(
    profile: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(CredentialSource, String), OxError> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID").is_some() && set("AWS_SECRET_ACCESS_KEY").is_some() {
        return Ok((CredentialSource::Environment, "the environment".into()));
    }
    let profile = profile
        .map(str::to_string)
        .or_else(|| set("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let home = || set("HOME").map(PathBuf::from);
    let file = |var: &str, under_home: &str| {
        set(var)
            .map(PathBuf::from)
            .or_else(|| home().map(|h| h.join(under_home)))
    };
    let mut looked = vec!["AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".to_string()];
    if let Some(path) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") {
        if let Some(ini) = read_ini(&path)?
            && has_keys(ini.section(Some(profile.as_str())))
        {
            let source = CredentialSource::SharedFile {
                profile: profile.clone(),
            };
            return Ok((source, format!("{} [{profile}]", path.display())));
        }
        looked.push(format!("{} [{profile}]", path.display()));
    }
    if let Some(path) = file("AWS_CONFIG_FILE", ".aws/config") {
        // The config file names a profile `[profile NAME]`, but the default `[default]`.
        let section = match profile.as_str() {
            "default" => "default".to_string(),
            other => format!("profile {other}"),
        };
        if let Some(ini) = read_ini(&path)? {
            let at = format!("{} [{section}]", path.display());
            let found = ini.section(Some(section.as_str()));
            if let Some(line) = found.and_then(|s| s.get("credential_process")) {
                let command = shell_words(line)
                    .map_err(|why| OxError::Config(format!("{at}: credential_process: {why}")))?;
                if command.is_empty() {
                    return Err(OxError::Config(format!(
                        "{at}: credential_process is empty"
                    )));
                }
                return Ok((CredentialSource::Process { command }, at));
            }
            let key = |k: &str| {
                let v = found.and_then(|s| s.get(k)).map(str::trim);
                v.filter(|v| !v.is_empty()).map(str::to_string)
            };
            if let (Some(access_key), Some(secret_key)) =
                (key("aws_access_key_id"), key("aws_secret_access_key"))
            {
                if key("aws_session_token").is_some() {
                    return Err(OxError::Config(format!(
                        "{at}: a session token in the config file is not read; put the \
                         profile in the shared credentials file"
                    )));
                }
                let source = CredentialSource::Static {
                    access_key,
                    secret_key,
                };
                return Ok((source, at));
            }
        }
        looked.push(format!("{} [{section}]", path.display()));
    }
    Err(OxError::Config(format!(
        "no credentials in the chain: looked at {}",
        looked.join(", ")
    )))
}

/// Whether a profile's section holds both keys.
fn has_keys(section: Option<&ini::Properties>) -> bool {
    section.is_some_and(|s| {
        ["aws_access_key_id", "aws_secret_access_key"]
            .iter()
            .all(|k| s.get(k).is_some_and(|v| !v.trim().is_empty()))
    })
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

/// Splits a command line as a POSIX shell splits words, without expanding anything (as
/// the AWS CLI splits `credential_process`): blanks separate words; `'…'` keeps
/// everything inside; `"…"` keeps everything but a backslash before `"`, `\`, `$` or
/// `` ` ``; elsewhere a backslash keeps the next character. An unclosed quote or a
/// trailing backslash is an error.
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
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some('\n') => {}
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
                Some('\n') => {}
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
        assert_eq!(split(r#""\"\\\$\`\n" '\n'"#), [r#""\$`\n"#, r"\n"]);
        assert_eq!(split(""), Vec::<String>::new());
        for bad in ["'open", "\"open", "end\\", "\"a\\"] {
            assert!(shell_words(bad).is_err(), "{bad}");
        }
    }

    /// The environment first, then the shared credentials file's profile, then the
    /// config file's (a credential process, or keys); the profile asked for, else
    /// AWS_PROFILE, else default; nothing anywhere is an error naming each place.
    #[test]
    fn the_chain_takes_the_first_source_that_holds_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let config = dir.path().join("config");
        let mut vars: HashMap<&str, String> = HashMap::from([
            ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
        ]);
        let resolve_in = |vars: &HashMap<&str, String>, profile: Option<&str>| {
            resolve(profile, |k| vars.get(k).cloned())
        };
        // Nothing yet: every place named.
        let e = resolve_in(&vars, None).unwrap_err().to_string();
        assert!(
            e.contains("credentials [default]") && e.contains("config [default]"),
            "{e}"
        );

        std::fs::write(
            &config,
            "[default]\ncredential_process = \"/opt/my tools/creds\" --json\n\
             [profile keys]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
        )
        .unwrap();
        let (source, at) = resolve_in(&vars, None).unwrap();
        assert!(
            matches!(&source, CredentialSource::Process { command } if command == &["/opt/my tools/creds", "--json"]),
            "{source:?}"
        );
        assert!(at.ends_with("config [default]"), "{at}");
        let (source, _) = resolve_in(&vars, Some("keys")).unwrap();
        assert!(
            matches!(&source, CredentialSource::Static { access_key, secret_key } if access_key == "AK" && secret_key == "SK"),
            "{source:?}"
        );

        // The shared credentials file comes before the config file.
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = A\naws_secret_access_key = S\n[half]\naws_access_key_id = A\n",
        )
        .unwrap();
        let (source, _) = resolve_in(&vars, None).unwrap();
        assert!(
            matches!(&source, CredentialSource::SharedFile { profile } if profile == "default"),
            "{source:?}"
        );
        // A profile with half its keys is passed over; AWS_PROFILE names the profile
        // where the configuration does not.
        vars.insert("AWS_PROFILE", "half".into());
        let e = resolve_in(&vars, None).unwrap_err().to_string();
        assert!(e.contains("[half]") && e.contains("[profile half]"), "{e}");
        let (source, _) = resolve_in(&vars, Some("default")).unwrap();
        assert!(matches!(source, CredentialSource::SharedFile { .. }));

        // The environment before any file.
        vars.insert("AWS_ACCESS_KEY_ID", "E".into());
        vars.insert("AWS_SECRET_ACCESS_KEY", "ES".into());
        let (source, at) = resolve_in(&vars, Some("keys")).unwrap();
        assert!(
            matches!(source, CredentialSource::Environment),
            "{source:?}"
        );
        assert_eq!(at, "the environment");

        // A broken credential_process line is an error naming the file and profile.
        vars.remove("AWS_ACCESS_KEY_ID");
        std::fs::write(&creds, "").unwrap();
        std::fs::write(&config, "[profile p]\ncredential_process = 'open\n").unwrap();
        let e = resolve_in(&vars, Some("p")).unwrap_err().to_string();
        assert!(e.contains("[profile p]: credential_process"), "{e}");
    }
}
