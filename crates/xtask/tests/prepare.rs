//! `cargo xtask` run as the README runs it: the preparation step on its own (never the whole
//! suite inside the suite), and `xtask test` on a small crate of its own to show that every
//! test binary runs when one fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// A fresh directory, removed on drop. The standard library only: a dependency here would be
/// unified with the server crate's in `cargo test --workspace` and rebuild it with other
/// features than plain `cargo test`.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "xtask-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory of links to every program on this PATH except Chromium's: "a PATH without it".
fn path_without_chromium(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let path = std::env::var_os("PATH").unwrap();
    for entry_dir in std::env::split_paths(&path) {
        let Ok(entries) = std::fs::read_dir(&entry_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let text = name.to_string_lossy();
            if text.starts_with("chromium") || bin.join(&name).exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(entry.path(), bin.join(&name));
        }
    }
    assert!(!bin.join("chromium").exists());
    bin
}

fn xtask(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(XTASK);
    command.args(args).env_remove("CHROMIUM_BIN");
    configure(&mut command);
    let output = command.output().unwrap();
    eprintln!(
        "xtask {args:?}: {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// Stops the private Redis a test had xtask start.
struct RedisShutdown(u16);

impl Drop for RedisShutdown {
    fn drop(&mut self) {
        if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.0)) {
            let _ = stream.write_all(b"SHUTDOWN NOSAVE\r\n");
            let _ = stream.read(&mut [0u8; 64]);
        }
    }
}

#[test]
fn prepare_finds_or_installs_chromium_missing_from_path_and_it_renders_headless() {
    let dir = TempDir::new();
    let bin = path_without_chromium(dir.path());
    let output = xtask(&["prepare"], |c| {
        c.env("PATH", &bin);
    });
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("xtask: chromium "))
        .expect("prepare names the Chromium it found");
    let chromium = PathBuf::from(line.split(" (").next().unwrap());
    assert!(
        !chromium.starts_with(&bin),
        "found off the PATH it was given"
    );

    // What the status page test will start: it renders a page.
    let profile = dir.path().join("profile");
    let rendered = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", "data:text/html,<p id=x>rendered</p>"])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&rendered.stdout);
    assert!(dom.contains(r#"<p id="x">rendered</p>"#), "{dom}");
}

#[test]
fn prepare_refuses_a_chromium_bin_that_is_not_a_program() {
    let dir = TempDir::new();
    let output = xtask(&["prepare"], |c| {
        c.env("CHROMIUM_BIN", dir.path().join("nothing-here"));
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CHROMIUM_BIN=") && stderr.contains("is not an executable file"),
        "{stderr}"
    );
}

#[test]
fn prepare_starts_redis_when_nothing_answers() {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(!redis_ping(port));
    let dir = TempDir::new();
    let _shutdown = RedisShutdown(port);
    let output = xtask(
        &[
            "prepare",
            "--redis-port",
            &port.to_string(),
            "--redis-dir",
            dir.path().to_str().unwrap(),
        ],
        |_| {},
    );
    assert!(output.status.success());
    assert!(redis_ping(port), "redis answers on {port} after prepare");
    assert!(dir.path().join("redis.log").exists());

    // A second run finds it answering and starts nothing.
    let again = xtask(&["prepare", "--redis-port", &port.to_string()], |_| {});
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(!stdout.contains("starting"), "{stdout}");
}

#[test]
fn test_runs_every_test_binary_even_when_one_fails() {
    let dir = TempDir::new();
    let root = dir.path();
    std::fs::create_dir_all(root.join("src")).unwrap();
    std::fs::create_dir_all(root.join("tests")).unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[package]\nname = \"fixture\"\nversion = \"0.0.0\"\nedition = \"2024\"\n\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(root.join("src/lib.rs"), "").unwrap();
    std::fs::write(
        root.join("tests/a_fails.rs"),
        "#[test]\nfn fails_first() { panic!(\"on purpose\") }\n",
    )
    .unwrap();
    std::fs::write(
        root.join("tests/b_passes.rs"),
        "#[test]\nfn runs_after_a_failure() {}\n",
    )
    .unwrap();
    let started = Instant::now();
    let output = xtask(&["test", "--skip-prepare"], |c| {
        c.current_dir(root)
            .env("CARGO_TARGET_DIR", root.join("target"));
    });
    assert!(!output.status.success(), "a failing test fails the command");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("test fails_first ... FAILED"), "{stdout}");
    assert!(
        stdout.contains("test runs_after_a_failure ... ok"),
        "the binary after the failing one ran: {stdout}"
    );
    assert!(
        stderr.contains("--test a_fails"),
        "cargo names what failed: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));
}
