//! `oxd --config` rejects bad configuration with an error naming what is wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

fn oxd_with(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("oxd.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_oxd"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "oxd accepted:\n{config}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const BDEV: &str = "[[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize_mib = 8\n";

#[test]
fn bad_configurations_are_named() {
    let cases: Vec<(String, &str)> = vec![
        (
            "[reactors]\ncorez = \"0\"\n".into(),
            "unknown field `corez`",
        ),
        (
            "[reactors]\ncores = \"4096\"\n".into(),
            "core 4096 is not available",
        ),
        ("[reactors]\nidle = \"lazy\"\n".into(), "reactors.idle"),
        (format!("{BDEV}{BDEV}"), "\"m\" is defined twice"),
        (
            "[[bdev]]\nname = \"x\"\nkind = \"tape\"\nsize_mib = 1\n".into(),
            "kind \"tape\"",
        ),
        (
            "[[bdev]]\nname = \"x\"\nkind = \"uring\"\n".into(),
            "path is required",
        ),
        (
            format!(
                "{BDEV}[[subsystem]]\nnqn = \"nqn.2026-11.io.ox:a\"\nlisteners = [\"127.0.0.1\"]\n"
            ),
            "is not an address:port",
        ),
        (
            format!("{BDEV}[[subsystem]]\nnqn = \"bad\"\nlisteners = [\"127.0.0.1:0\"]\n"),
            "\"bad\" is not a valid NQN",
        ),
        (
            format!(
                "{BDEV}[[subsystem]]\nnqn = \"nqn.2026-11.io.ox:a\"\nlisteners = [\"127.0.0.1:0\"]\nnamespaces = [\"nope\"]\n"
            ),
            "no bdev named \"nope\"",
        ),
        (
            "[nvmf]\nmax_io_kib = 3\n".into(),
            "max I/O size 3072 must be a power of two",
        ),
        (
            "[nvmf]\nc2h_success = \"sometimes\"\n".into(),
            "nvmf.c2h_success: \"sometimes\" is not \"flow-control-off\" or \"always\"",
        ),
    ];
    for (config, expected) in cases {
        let err = oxd_with(&config);
        assert!(
            err.contains(expected),
            "for\n{config}\nexpected {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let err = oxd_with(&format!(
        "{BDEV}[[subsystem]]\nnqn = \"nqn.2026-11.io.ox:a\"\nlisteners = [\"127.0.0.1:{port}\"]\nnamespaces = [\"m\"]\nallow_any_host = true\n"
    ));
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn a_start_that_fails_is_not_an_unsafe_shutdown() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let health = dir.path().join("state/health.json");
    for _ in 0..2 {
        let err = oxd_with(&format!(
            "[nvmf]\nhealth_file = {health:?}\n{BDEV}[[subsystem]]\nnqn = \"nqn.2026-11.io.ox:a\"\nlisteners = [\"127.0.0.1:{port}\"]\nnamespaces = [\"m\"]\nallow_any_host = true\n"
        ));
        assert!(err.contains("cannot listen"), "{err}");
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&health).unwrap()).unwrap();
    assert_eq!(record["running"], false, "{record}");
    assert_eq!(record["power_cycles"], 2, "{record}");
    assert_eq!(record["unsafe_shutdowns"], 0, "{record}");
}

#[test]
fn bad_object_exchange_configurations_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let ox = format!("[ox]\nstate_dir = {state:?}\n");
    let key = dir.path().join("k");
    write_private(&key, &"ab".repeat(32));
    let short = dir.path().join("short");
    write_private(&short, "abcd");
    let local =
        |name: &str| format!("[[store]]\nname = \"{name}\"\nkind = \"local\"\npath = \"/tmp/x\"\n");
    let cases: Vec<(String, &str)> = vec![
        (
            "[ox]\nstate_dri = \"/x\"\n".into(),
            "unknown field `state_dri`",
        ),
        ("[ox]\n".into(), "missing field `state_dir`"),
        (local("s"), "need an [ox] section"),
        (
            format!("{ox}{}{}", local("s"), local("s")),
            "\"s\" is defined twice",
        ),
        (
            format!("{ox}[[store]]\nname = \"s\"\nkind = \"ftp\"\n"),
            "kind \"ftp\"",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"https://s3.example\"\n"
            ),
            "bucket is required",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"static\"\naccess_key = \"a\"\nsecret_key_file = \"/nonexistent\"\n"
            ),
            "secret_key_file: reading secret /nonexistent",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"static\"\naccess_key = \"a\"\nsecret_key_file = {key:?}\n"
            ),
            "set allow_http = true",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"static\"\naccess_key = \"a\"\nsecret_key_file = {key:?}\nallow_http = true\naddressing = \"sideways\"\n"
            ),
            "addressing \"sideways\" is not \"path\" or \"virtual\"",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"static\"\naccess_key = \"a\"\nsecret_key_file = {key:?}\nallow_http = true\nsigning = \"v2\"\n"
            ),
            "signing \"v2\" is not \"headers\" or \"query\"",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"process\"\n"
            ),
            "credentials = \"process\" needs credential_process",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\naccess_key = \"a\"\n"
            ),
            "access_key is set but credentials = \"chain\" does not read it (credentials = \"static\" does)",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"env\"\nprofile = \"p\"\n"
            ),
            "profile is set but credentials = \"env\" does not read it",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"statc\"\naccess_key = \"a\"\n"
            ),
            "credentials \"statc\" is not chain, env, file, process or static",
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\ncredentials = \"process\"\ncredential_process = [\"/bin/false\"]\n"
            ),
            "credential_process /bin/false: exit status: 1",
        ),
        (
            format!("{ox}[[key]]\nname = \"k\"\nfile = {key:?}\nenv = \"X\"\n"),
            "exactly one of file, env, command",
        ),
        (
            format!("{ox}[[key]]\nname = \"k\"\nfile = {short:?}\n"),
            "key material is 2 bytes",
        ),
        (
            format!("{ox}[[key]]\nname = \"k\"\nenv = \"OX_TEST_SURELY_UNSET\"\n"),
            "OX_TEST_SURELY_UNSET is not set",
        ),
        (
            format!("{ox}chunk_kib = 3\n"),
            "ox.chunk_kib = 3 must be a power of two from 64 to 1024",
        ),
        (
            format!("{ox}chunk_kib = 4\n"),
            "ox.chunk_kib = 4 must be a power of two from 64 to 1024",
        ),
        (
            format!("{ox}chunk_kib = 2048\n"),
            "ox.chunk_kib = 2048 must be",
        ),
        (
            format!("{ox}chunk_kib = 18014398509481984\n"),
            "ox.chunk_kib = 18014398509481984 must be",
        ),
        (
            format!("{ox}zstd_level = 23\n"),
            "ox.zstd_level = 23 must be from 0 (no compression) to 22",
        ),
        (
            format!("{ox}zstd_level = -1\n"),
            "ox.zstd_level = -1 must be",
        ),
        (
            format!("{ox}object_mib = 0\n"),
            "ox.object_mib = 0 must be from 1 to 1024",
        ),
        (
            format!("{ox}object_mib = 1025\n"),
            "ox.object_mib = 1025 must be",
        ),
        (
            format!(
                "{ox}[[volume]]\nname = \"v\"\nsize_mib = 1\nnqn = \"nqn.2026-11.io.ox:v\"\nallow_any_host = true\n"
            ),
            "ox.export_listeners is empty",
        ),
        (
            format!("{ox}[[volume]]\nname = \"../v\"\nsize_mib = 1\n"),
            "must be 1-64 characters",
        ),
    ];
    for (config, expected) in cases {
        let err = oxd_with(&config);
        assert!(
            err.contains(expected),
            "for\n{config}\nexpected {expected:?} in:\n{err}"
        );
    }
}

#[test]
fn host_secrets_are_checked_and_required() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(env!("CARGO_BIN_EXE_oxd"))
        .args(["dhchap-key", "--bytes", "48", "--transform", "sha384"])
        .output()
        .unwrap();
    assert!(made.status.success());
    let secret = String::from_utf8(made.stdout).unwrap();
    assert!(secret.starts_with("DHHC-1:02:"), "{secret}");
    let write = |name: &str, text: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let good = write("good", &secret, 0o600);
    let open = write("open", &secret, 0o644);
    let mut damaged = secret.trim().to_string();
    damaged.replace_range(12..13, if &damaged[12..13] == "A" { "B" } else { "A" });
    let damaged = write("damaged", &damaged, 0o600);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    let foreign = write("foreign", &secret, 0o600);
    std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
    let host = "nqn.2026-11.io.ox:h1";
    let section = |file: &std::path::Path, extra: &str| {
        format!("[[host]]\nnqn = \"{host}\"\ndhchap_key_file = {file:?}\n{extra}")
    };
    let cases = [
        (
            section(&open, ""),
            "is readable or writable by others (mode 644): chmod 600 it",
        ),
        (section(&damaged, ""), "CRC does not match"),
        (section(&dir.path().join("missing"), ""), "reading secret"),
        (
            section(&good, "dhchap_hash = \"md5\"\n"),
            "dhchap_hash \"md5\" is not one of sha256, sha384, sha512",
        ),
        (
            section(&good, "dhchap_dhgroup = \"ffdhe8192\"\n"),
            "dhchap_dhgroup \"ffdhe8192\" is not one of null, ffdhe2048",
        ),
        (
            format!("{}{}", section(&good, ""), section(&good, "")),
            "is defined twice",
        ),
        (
            section(&good, "dhchap_ctrl_key_file = \"/nonexistent\"\n"),
            "reading secret /nonexistent",
        ),
        (section(&link, ""), "is a symbolic link: refused"),
        (section(&foreign, ""), "belongs to uid 4242"),
    ];
    for (config, expected) in cases {
        let err = oxd_with(&config);
        assert!(
            err.contains(expected),
            "for\n{config}\nexpected {expected:?} in:\n{err}"
        );
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_oxd"))
        .args(["dhchap-key", "--bytes", "40"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be 32, 48 or 64"));
}

#[test]
fn every_secret_file_must_be_private_and_a_local_store_a_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ox = format!("[ox]\nstate_dir = {:?}\n", d.join("state"));
    let open = |name: &str, text: &str, mode: u32| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let kek = open("kek", &"ab".repeat(32), 0o644);
    let kek_group = open("kek-g", &"ab".repeat(32), 0o660);
    let s3_secret = open("s3", "secret-key", 0o644);
    let token = open("token", "0123456789abcdef-token", 0o644);
    let a_file = open("objects", "not a directory", 0o600);
    let link = d.join("kek-link");
    let private = open("kek-private", &"ab".repeat(32), 0o600);
    std::os::unix::fs::symlink(&private, &link).unwrap();
    let cases = [
        (
            format!("{ox}[[key]]\nname = \"k\"\nfile = {kek:?}\n"),
            "(mode 644): chmod 600 it".to_string(),
        ),
        (
            format!("{ox}[[key]]\nname = \"k\"\nfile = {kek_group:?}\n"),
            "(mode 660): chmod 600 it".to_string(),
        ),
        (
            format!("{ox}[[key]]\nname = \"k\"\nfile = {link:?}\n"),
            "is a symbolic link".to_string(),
        ),
        (
            format!(
                "{ox}[[store]]\nname = \"s\"\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\n\
                 bucket = \"b\"\ncredentials = \"static\"\naccess_key = \"a\"\n\
                 secret_key_file = {s3_secret:?}\nallow_http = true\n"
            ),
            "(mode 644): chmod 600 it".to_string(),
        ),
        (
            format!("[control]\nlisten = \"127.0.0.1:0\"\ntoken_file = {token:?}\n"),
            "(mode 644): chmod 600 it".to_string(),
        ),
        (
            format!("{ox}[[store]]\nname = \"s\"\nkind = \"local\"\npath = {a_file:?}\n"),
            format!("path {} is not a directory", a_file.display()),
        ),
    ];
    for (config, expected) in cases {
        let err = oxd_with(&config);
        assert!(
            err.contains(&expected),
            "for\n{config}\nexpected {expected:?} in:\n{err}"
        );
    }
}

/// Writes a secret file as an operator must: readable by its owner only.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A core list as `oxd` takes it ("A-B" or "A") as the cores it names.
fn core_range(list: &str) -> std::ops::RangeInclusive<usize> {
    let (a, b) = list.split_once('-').unwrap_or((list, list));
    a.parse().unwrap()..=b.parse().unwrap()
}

/// The image's default core layout (`appliance/image/firstboot`, when no seed is
/// given), for every core count: the OX cores are the last quarter (at least one), the
/// reactors every core before them, so each core serves one of the two; one core only
/// is both.
#[test]
fn the_images_default_layout_gives_every_core_one_part() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/image/firstboot");
    for n in 1..=256usize {
        let out = Command::new("sh")
            .args([script, "--layout", &n.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{n} cores: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (reactors, ox) = text.trim().split_once(' ').unwrap();
        let (reactors, ox) = (core_range(reactors), core_range(ox));
        if n == 1 {
            assert_eq!((reactors, ox), (0..=0, 0..=0));
            continue;
        }
        assert_eq!(ox.clone().count(), (n / 4).max(1), "{n} cores: {text}");
        assert_eq!(*reactors.start(), 0, "{n} cores: {text}");
        assert_eq!(reactors.end() + 1, *ox.start(), "{n} cores: {text}");
        assert_eq!(*ox.end(), n - 1, "{n} cores: {text}");
    }
}
