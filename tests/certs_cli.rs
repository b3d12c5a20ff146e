//! `workerpush certs`: makes the dev PKI, extends it, and never replaces a CA without --force.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_workerpush");

fn certs(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("certs")
        .arg("--out")
        .arg(dir)
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

#[test]
fn certs_command_makes_extends_and_guards_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let made = certs(&dir, &["--client", "edge-1", "--san", "core-1.internal"]);
    assert!(made.status.success(), "{made:?}");
    for file in [
        "ca.pem",
        "ca-key.pem",
        "server.pem",
        "server-key.pem",
        "clients/edge-1.pem",
        "clients/edge-1-key.pem",
    ] {
        assert!(dir.join(file).exists(), "{file}");
    }
    for key in ["ca-key.pem", "server-key.pem", "clients/edge-1-key.pem"] {
        let mode = std::fs::metadata(dir.join(key))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let ca = std::fs::read(dir.join("ca.pem")).unwrap();
    let server = std::fs::read(dir.join("server.pem")).unwrap();

    let extended = certs(&dir, &["--client", "edge-2"]);
    assert!(extended.status.success(), "{extended:?}");
    assert!(dir.join("clients/edge-2.pem").exists());
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca,
        "CA kept without --force"
    );
    assert_eq!(
        std::fs::read(dir.join("server.pem")).unwrap(),
        server,
        "server cert kept"
    );

    let bad = certs(&dir, &["--client", "../evil"]);
    assert!(!bad.status.success(), "a hostile client name is refused");
    assert!(!tmp.path().join("evil.pem").exists());

    let forced = certs(&dir, &["--force", "--client", "edge-1"]);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        ca,
        "--force replaces the CA"
    );
}
