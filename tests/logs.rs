//! What an operator reads on stderr, from the real binary: `--log-format json` is one JSON
//! object per line with the connect, disconnect and change events; text written to a pipe has
//! no escape codes; a `RUST_LOG` that does not parse and a busy port are refused in words.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

fn serve_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec!["serve", "--dev"];
    args.extend(common_ports());
    args.extend(["--upload-port", "0"]);
    args.extend(extra);
    args
}

/// Every captured line, parsed; a line that is not one JSON object fails the test.
fn json_lines(server: &TestServer) -> Vec<Value> {
    server
        .logs
        .lock()
        .unwrap()
        .iter()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
            assert!(value.is_object(), "not an object: {line}");
            value
        })
        .collect()
}

fn has_event(events: &[Value], message: &str, field: &str, value: &str) -> bool {
    events
        .iter()
        .any(|e| e["message"] == message && e[field] == value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_connect_disconnect_and_change_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_capturing_logs(
        dir.path(),
        &serve_args(&["--log-format", "json"]),
        &[("RUST_LOG", "info")],
    );
    let certs = server.certs();
    let (secret, _) = server.secrets();

    let grpc = HandConsumer::subscribe(&certs, server.addr("grpc"), "consumer-1", &[], None).await;
    let quic = quic_session(&certs, server.addr("quic"), "consumer-1").await;
    let (status, body) = hook_put(server.addr("http"), &secret, "logged", "1.0.0", b"code").await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();
    let (status, body) = hook_put(
        server.addr("http"),
        &secret,
        "logged",
        "not a version",
        b"x",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    drop(grpc);
    drop(quic);

    eventually(Duration::from_secs(10), "both disconnects logged", || {
        let events = json_lines(&server);
        ["grpc", "quic"]
            .iter()
            .all(|t| has_event(&events, "consumer disconnected", "transport", t))
    });
    let events = json_lines(&server);
    for transport in ["grpc", "quic"] {
        let connected = events
            .iter()
            .find(|e| e["message"] == "consumer connected" && e["transport"] == transport)
            .unwrap_or_else(|| panic!("no {transport} connect in {events:#?}"));
        assert_eq!(connected["identity"], "consumer-1");
        assert_eq!(connected["level"], "INFO");
        let remote: std::net::SocketAddr = connected["remote"].as_str().unwrap().parse().unwrap();
        assert!(remote.ip().is_loopback());
        assert!(connected["timestamp"].is_string());
    }
    let change = events
        .iter()
        .find(|e| e["message"] == "change accepted")
        .unwrap_or_else(|| panic!("no change event in {events:#?}"));
    assert_eq!(change["worker"], "logged");
    assert_eq!(change["version"], "1.0.0");
    assert_eq!(change["action"], "put");
    assert_eq!(change["revision"].as_u64(), Some(revision));
    let refused = events
        .iter()
        .find(|e| e["message"] == "change refused")
        .unwrap_or_else(|| panic!("no refused change in {events:#?}"));
    assert_eq!(refused["worker"], "logged");
    assert_eq!(refused["version"], "not a version");
    assert_eq!(refused["action"], "put");
    assert_eq!(refused["reason"], "invalid");
    assert!(
        server
            .logs
            .lock()
            .unwrap()
            .iter()
            .all(|l| !l.contains('\x1b')),
        "no escape codes in JSON logs"
    );
}

#[test]
fn text_logs_on_a_pipe_have_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start_capturing_logs(dir.path(), &serve_args(&[]), &[("RUST_LOG", "info")]);
    eventually(Duration::from_secs(10), "an info line", || {
        server
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("INFO"))
    });
    let logs = server.logs.lock().unwrap();
    assert!(
        logs.iter().all(|l| !l.contains('\x1b')),
        "escape codes on a pipe: {logs:?}"
    );
}

#[test]
fn handshake_failures_are_logged_with_their_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_capturing_logs(
        dir.path(),
        &serve_args(&["--log-format", "json"]),
        &[("RUST_LOG", "info")],
    );
    // Not TLS at all: the handshake fails at once.
    let mut plain = std::net::TcpStream::connect(server.addr("grpc")).unwrap();
    std::io::Write::write_all(&mut plain, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    eventually(
        Duration::from_secs(10),
        "the handshake failure logged",
        || {
            json_lines(&server).iter().any(|e| {
                e["message"] == "handshake failed"
                    && e["transport"] == "grpc"
                    && e["reason"].as_str().is_some_and(|r| !r.is_empty())
            })
        },
    );
}

#[test]
fn a_rust_log_that_does_not_parse_is_refused_at_start_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let output = Command::new(BIN)
        .args(serve_args(&[]))
        .arg("--certs-dir")
        .arg(&certs)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info,workerpush=loud")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("RUST_LOG=\"info,workerpush=loud\" is not a valid log filter"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening"),
        "nothing bound"
    );
    assert!(!certs.exists(), "refused before doing anything");
}

#[test]
fn a_busy_port_is_refused_naming_its_flag() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut args = serve_args(&[]);
    let at = args.iter().position(|a| *a == "--grpc-port").unwrap();
    args.remove(at + 1);
    args.remove(at);
    let output = Command::new(BIN)
        .args(args)
        .args(["--grpc-port", &port])
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot bind 127.0.0.1:{port} (set by --grpc-port / GRPC_PORT and --bind)"
        )),
        "{stderr}"
    );
}
