//! `oxd smoke`, the README's first command, runs end to end and fails loudly on bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

fn oxd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxd"))
}

#[test]
fn smoke_run_passes_and_reports_every_device() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = oxd()
        .args(["smoke", "--size-mib", "8", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for device in ["malloc0", "null0", "uring0"] {
        assert!(stdout.contains(device), "{device} missing from:\n{stdout}");
    }
    assert!(stdout.contains("all checks passed"));
    // The backing file is cleaned up.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn smoke_run_rejects_a_missing_core_clearly() {
    let out = oxd().args(["smoke", "--cores", "4096"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("core 4096 is not available"), "{stderr}");
}
