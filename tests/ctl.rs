//! `workerpush ctl` and `workerpush completions`, run as an operator runs them: the real
//! binary against a running core (`serve --dev` on port 0) and its upload server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// `workerpush ctl ARGS` against `server`, with the dev token in `ADMIN_TOKEN` (or none).
fn ctl_command(server: &TestServer, token: Option<&str>, args: &[&str]) -> Command {
    ctl_command_at(
        &format!("http://{}", server.addr("http")),
        server,
        token,
        args,
    )
}

fn ctl_command_at(
    admin_url: &str,
    server: &TestServer,
    token: Option<&str>,
    args: &[&str],
) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("ctl")
        .args(args)
        .args(["--admin-url", admin_url])
        .arg("--upload-url")
        .arg(format!("http://{}", server.addr("upload")))
        .env_remove("ADMIN_TOKEN")
        .env_remove("UPLOAD_TOKEN")
        .env_remove("CTL_JSON")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("ADMIN_TOKEN", token).env("UPLOAD_TOKEN", token);
    }
    command
}

async fn ctl(server: &TestServer, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = ctl_command(server, token, args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

/// `ctl wait shop-cart --revision REVISION --timeout TIMEOUT`.
async fn ctl_wait(server: &TestServer, token: &str, revision: &str, timeout: &str) -> Output {
    let args = [
        "wait",
        "shop-cart",
        "--revision",
        revision,
        "--timeout",
        timeout,
    ];
    ctl(server, Some(token), &args).await
}

/// `serve --dev` in `dir` with `consumer-1` subscribed to every worker over gRPC; answers the
/// hook secret and the (upload = admin) token too.
async fn serve_with_a_consumer(
    dir: &std::path::Path,
) -> (TestServer, HandConsumer, String, String) {
    let server = TestServer::serve_dev(dir, &[]);
    let (secret, token) = server.secrets();
    let consumer = HandConsumer::subscribe(
        &server.certs(),
        server.addr("grpc"),
        "consumer-1",
        &[],
        None,
    )
    .await;
    (server, consumer, secret, token)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_workers_worker_and_consumers_answer_json_or_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _consumer, secret, token) = serve_with_a_consumer(dir.path()).await;
    let (status, body) = hook_put(server.addr("http"), &secret, "shop-cart", "1.2.0", b"x").await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();

    let json = ctl(&server, Some(&token), &["workers", "--json"]).await;
    assert!(json.status.success(), "{}", stderr(&json));
    let answer: Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(answer["head"], revision);
    assert_eq!(answer["workers"][0]["name"], "shop-cart");
    assert_eq!(answer["workers"][0]["version"], "1.2.0");
    assert_eq!(answer["workers"][0]["propagation"]["subscribers"], 1);

    let table = ctl(&server, Some(&token), &["workers"]).await;
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATE"),
        "{text}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..4],
        ["shop-cart", "1.2.0", &revision.to_string(), "0/1"],
        "{text}"
    );

    let one = ctl(&server, Some(&token), &["worker", "shop-cart", "--json"]).await;
    let answer: Value = serde_json::from_str(&stdout(&one)).unwrap();
    assert_eq!(
        answer["propagation"]["pending"][0]["consumer_id"],
        "consumer-1"
    );
    let missing = ctl(&server, Some(&token), &["worker", "nope"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("answered 404"),
        "{}",
        stderr(&missing)
    );

    let consumers = ctl(&server, Some(&token), &["consumers"]).await;
    let text = stdout(&consumers);
    assert!(
        text.lines()
            .any(|l| l.starts_with("consumer-1") && l.contains("connected") && l.contains("grpc")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_wait_returns_once_every_subscriber_acknowledged_and_says_when_one_refused_or_time_ran_out()
 {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut consumer, secret, token) = serve_with_a_consumer(dir.path()).await;
    let (_, body) = hook_put(server.addr("http"), &secret, "shop-cart", "1.0.0", b"one").await;
    let revision = body["revision"].as_u64().unwrap().to_string();
    let update = consumer.next_change().await;

    // Not acknowledged: the wait runs out (exit 3) and says where it stood.
    let started = Instant::now();
    let out = ctl_wait(&server, &token, &revision, "600ms").await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(
        stderr(&out).contains(&format!("revision {revision}, pending")),
        "{}",
        stderr(&out)
    );

    // A wait in flight returns (exit 0) once the consumer acknowledges.
    let waiting = ctl_command(
        &server,
        Some(&token),
        &[
            "wait",
            "shop-cart",
            "--revision",
            &revision,
            "--timeout",
            "20s",
            "--json",
        ],
    )
    .spawn()
    .unwrap();
    consumer.ack(&update, None).await;
    let done = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(done.status.success(), "{}", stderr(&done));
    let answer: Value = serde_json::from_str(&stdout(&done)).unwrap();
    assert_eq!(answer["propagation"]["state"], "complete");
    assert_eq!(
        answer["propagation"]["acked"][0]["consumer_id"],
        "consumer-1"
    );

    // Refused: exit 2, naming who and why.
    let (_, body) = hook_put(server.addr("http"), &secret, "shop-cart", "2.0.0", b"two").await;
    let revision = body["revision"].as_u64().unwrap().to_string();
    let update = consumer.next_change().await;
    consumer.ack(&update, Some("syntax error")).await;
    let out = ctl_wait(&server, &token, &revision, "10s").await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("consumer-1 (syntax error)"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_delete_removes_a_worker_and_bad_settings_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    hook_put(server.addr("http"), &secret, "doomed", "1.0.0", b"x").await;

    let deleted = ctl(&server, Some(&token), &["delete", "doomed"]).await;
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert!(
        stdout(&deleted).starts_with("deleted doomed (revision "),
        "{}",
        stdout(&deleted)
    );
    let workers = ctl(&server, Some(&token), &["workers", "--json"]).await;
    let answer: Value = serde_json::from_str(&stdout(&workers)).unwrap();
    assert_eq!(answer["workers"], serde_json::json!([]));

    let no_token = ctl(&server, None, &["workers"]).await;
    assert_eq!(no_token.status.code(), Some(64));
    assert!(
        stderr(&no_token).contains("--admin-token / ADMIN_TOKEN"),
        "{}",
        stderr(&no_token)
    );

    let wrong = ctl(&server, Some("not-the-token"), &["workers"]).await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("answered 401"),
        "{}",
        stderr(&wrong)
    );
    assert!(
        stderr(&wrong).contains("--admin-token / ADMIN_TOKEN"),
        "{}",
        stderr(&wrong)
    );

    let nothing_there = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", nothing_there.local_addr().unwrap());
    drop(nothing_there);
    let mut command = ctl_command_at(&dead, &server, Some(&token), &["workers"]);
    let unreachable = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("(--admin-url / WORKERPUSH_ADMIN_URL)"),
        "{}",
        stderr(&unreachable)
    );
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef workerpush"),
        ("fish", "complete -c workerpush"),
    ] {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success());
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {marker}");
        assert!(
            script.contains("ctl") && script.contains("log-format"),
            "{shell}"
        );
    }
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
