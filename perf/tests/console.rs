//! The web console in a real browser (Debian's headless Chromium, driven by Playwright
//! from `perf/tests/console/drive.mjs`), over TLS behind the control token: refused
//! without it, signed in with it; the volume listed; a snapshot and a clone made from
//! the forms; the clone's hydration watched from 0 to whole while thickening, started
//! from its button, fetches it. `scripts/install-test-deps` installs both.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use support::{Ctl, free_port, oxperf, start_oxd, write_private};

/// Where Playwright's core lives (installed by `scripts/install-test-deps`).
fn playwright() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    std::path::Path::new(&home).join(".cache/ox-playwright-1.64.1/node_modules")
}

#[test]
fn the_console_signs_in_lists_snapshots_clones_and_watches_hydration() {
    let chromium = std::env::var("OX_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists() && playwright().join("playwright-core").exists(),
        "Chromium ({chromium}) and playwright-core ({}) are needed: run scripts/install-test-deps",
        playwright().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (port, console) = (free_port(), free_port());
    let token = "console-test-token-0123456789";
    write_private(&d.join("token"), token);
    write_private(&d.join("kek"), &"44".repeat(32));
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(d.join("cert.pem"), cert.cert.pem()).unwrap();
    write_private(&d.join("cert.key"), &cert.signing_key.serialize_pem());
    let nqn = "nqn.2026-11.io.ox:v";
    let config = d.join("oxd.toml");
    std::fs::write(
        &config,
        format!(
            "[reactors]\ncores = \"0\"\n\
             [control]\nsocket = {socket:?}\ntoken_file = {token:?}\naudit_log = {audit:?}\n\
             tls_cert_file = {cert:?}\ntls_key_file = {key:?}\n\
             [console]\nlisten = \"127.0.0.1:{console}\"\n\
             [ox]\nstate_dir = {state:?}\nexport_listeners = [\"127.0.0.1:{port}\"]\n\
             [[store]]\nname = \"l\"\nkind = \"local\"\npath = {objects:?}\n\
             [[key]]\nname = \"k\"\nfile = {kek:?}\n\
             [[volume]]\nname = \"v\"\nsize_mib = 8\nnqn = \"{nqn}\"\nallow_any_host = true\n",
            socket = d.join("oxd.sock"),
            token = d.join("token"),
            audit = d.join("audit.log"),
            cert = d.join("cert.pem"),
            key = d.join("cert.key"),
            state = d.join("state"),
            objects = d.join("objects"),
            kek = d.join("kek"),
        ),
    )
    .unwrap();
    let _oxd = start_oxd(&config);
    let ctl = Ctl {
        socket: d.join("oxd.sock").display().to_string(),
    };
    // Every chunk written: the clone has all of them to fetch.
    oxperf(
        &format!("127.0.0.1:{port},{nqn},1"),
        "write",
        "0:16384",
        64,
        131072,
        9,
    );

    let shot = d.join("console.png");
    // No step of the run has a time limit; the whole has one, generous (a hang fails).
    let out = std::process::Command::new("timeout")
        .args(["--kill-after=10", "1800", "node"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/console/drive.mjs"
        ))
        .arg(format!("https://127.0.0.1:{console}/"))
        .arg(token)
        .arg(&shot)
        .env("OX_PLAYWRIGHT", playwright())
        .env("OX_CHROMIUM", &chromium)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the browser run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("what the run saw");
    eprintln!("{seen}");
    assert!(
        seen["refused"].as_str().unwrap().contains("refused"),
        "{seen}"
    );
    assert!(
        seen["version"].as_str().unwrap().starts_with("oxd "),
        "{seen}"
    );
    assert_eq!(seen["volumes"], serde_json::json!(["v"]), "{seen}");
    assert_eq!(seen["snapshots"], 1, "{seen}");
    assert_eq!(
        seen["statuses"],
        serde_json::json!({"get": 405, "no_token": 401, "bad_token": 401, "unknown": 404,
            "not_json": -32700}),
        "{seen}"
    );
    assert!(
        seen["csp"].as_str().unwrap().contains("default-src 'self'"),
        "{seen}"
    );
    assert_eq!(seen["page_errors"], serde_json::json!([]), "{seen}");
    // Hydration moved: from less than whole (nothing fetched at creation) to whole.
    let hydration: Vec<f64> = seen["hydration"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_f64().unwrap())
        .collect();
    assert_eq!(hydration[0], 0.0, "nothing fetched as it was made: {seen}");
    assert_eq!(*hydration.last().unwrap(), 1.0, "{seen}");
    assert!(hydration.windows(2).all(|w| w[0] <= w[1]), "{seen}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot");

    // What the page did, the daemon did: the clone is whole, and the audit log says the
    // console asked (and that a wrong token was refused).
    let clone = ctl.ok(&["clone", "get", "web"]);
    assert_eq!(clone["chunks_present"], clone["chunks_total"], "{clone}");
    let audit = std::fs::read_to_string(d.join("audit.log")).unwrap();
    let by_console = |method: &str| {
        audit.lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["action"] == method
                && e["caller"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("console "))
        })
    };
    for change in [
        "clone_create",
        "snapshot_create",
        "clone_thicken",
        "authenticate",
    ] {
        assert!(by_console(change), "{change}: {audit}");
    }
    // Its refresh, every two seconds, is not audited: only what changes something is.
    assert!(!by_console("volume_list"), "{audit}");
    // OX_CONSOLE_SHOT: where to keep the screenshot (the docs' is made this way).
    if let Some(keep) = std::env::var_os("OX_CONSOLE_SHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
