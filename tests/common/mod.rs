//! Test harness: runs the real `workerpush` binary on port 0 in a temp dir, learns the bound
//! addresses from what it prints, and waits for readiness (never sleeps). Helpers to sign hook
//! requests and to connect real mTLS clients.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use workerpush::{
    client::{GrpcTransport, Session, Transport},
    tls::{self, ClientTlsPurpose},
};

pub const BIN: &str = env!("CARGO_BIN_EXE_workerpush");

/// A running `workerpush` process.
pub struct TestServer {
    pub child: Child,
    pub dir: PathBuf,
    pub addrs: HashMap<String, SocketAddr>,
    pub output: Arc<Mutex<Vec<String>>>,
    /// The lines it wrote to stderr, when started with [`TestServer::start_capturing_logs`].
    pub logs: Arc<Mutex<Vec<String>>>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl TestServer {
    /// `workerpush serve --dev` with every port 0, data and certs under `dir`.
    pub fn serve_dev(dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec!["serve", "--dev"];
        args.extend(common_ports());
        args.push("--upload-port");
        args.push("0");
        args.extend(extra);
        Self::start(dir, &args, &[])
    }

    /// Starts the binary with `args` (plus `--data-dir`/`--certs-dir` under `dir`) and `env`.
    pub fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(dir, args, env, false)
    }

    /// As [`TestServer::start`], keeping what it writes to stderr in [`TestServer::logs`].
    pub fn start_capturing_logs(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(dir, args, env, true)
    }

    fn start_with(dir: &Path, args: &[&str], env: &[(&str, &str)], capture_logs: bool) -> Self {
        let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let role = all[0].clone();
        if role == "serve" || role == "core" {
            all.push("--data-dir".into());
            all.push(dir.join("data").display().to_string());
        }
        all.push("--certs-dir".into());
        all.push(dir.join("certs").display().to_string());
        let mut command = Command::new(BIN);
        command
            .args(&all)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(if capture_logs {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn workerpush");
        let logs = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut addrs = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("workerpush: ") {
                        if rest == "ready" {
                            break;
                        }
                        if let Some((name, tail)) = rest.split_once(" listening on ") {
                            let addr = tail.split_whitespace().next().unwrap();
                            addrs.insert(name.to_owned(), addr.parse().unwrap());
                        }
                    }
                }
                Err(_) => {
                    let status = child.try_wait();
                    panic!(
                        "workerpush {all:?} not ready (status {status:?}); output: {:?}",
                        output.lock().unwrap()
                    );
                }
            }
        }
        Self {
            child,
            dir: dir.to_owned(),
            addrs,
            output,
            logs,
            args: all,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs
            .get(name)
            .unwrap_or_else(|| panic!("no {name} address in {:?}", self.addrs))
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// `HOOK_SECRET` and `UPLOAD_TOKEN` from `certs/dev-secrets.env`.
    pub fn secrets(&self) -> (String, String) {
        dev_secrets(&self.certs())
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (waiting up to `within`).
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The same command again (same dir), with the ports it had, so clients reconnect.
    pub fn restart_same_ports(&self) -> Self {
        let mut args: Vec<String> = Vec::new();
        let mut iter = self.args.iter();
        while let Some(arg) = iter.next() {
            let port_of = |name: &str| self.addrs.get(name).map(|a| a.port().to_string());
            let replaced = match arg.as_str() {
                "--grpc-port" => port_of("grpc"),
                "--quic-port" => port_of("quic"),
                "--http-port" => port_of("http"),
                "--upload-port" => port_of("upload"),
                _ => None,
            };
            args.push(arg.clone());
            if let Some(port) = replaced {
                iter.next();
                args.push(port);
            }
        }
        // `start` appends the dirs again; drop them here.
        let cut = args
            .iter()
            .position(|a| a == "--data-dir" || a == "--certs-dir")
            .unwrap_or(args.len());
        args.truncate(cut);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Self::start(&self.dir, &refs, &env)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn common_ports() -> [&'static str; 8] {
    [
        "--bind",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--quic-port",
        "0",
        "--http-port",
        "0",
    ]
}

pub fn dev_secrets(certs: &Path) -> (String, String) {
    let text = std::fs::read_to_string(certs.join("dev-secrets.env")).unwrap();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .unwrap()
            .to_owned()
    };
    (get("HOOK_SECRET"), get("UPLOAD_TOKEN"))
}

/// A multipart body with `fields` (name, filename, bytes) and its boundary.
pub fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = format!("workerpush-test-{:016x}", rand::random::<u64>());
    let mut body = Vec::new();
    for (name, filename, value) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

pub fn http_client() -> reqwest::Client {
    tls::install_crypto_provider();
    reqwest::Client::builder().build().unwrap()
}

/// Publishes through the core's signed hook; returns (status, JSON body).
pub async fn hook_put(
    http: SocketAddr,
    secret: &str,
    worker: &str,
    version: &str,
    code: &[u8],
) -> (u16, serde_json::Value) {
    hook_put_query(http, secret, "", worker, version, code).await
}

/// Deletes through the core's signed hook.
pub async fn hook_delete(http: SocketAddr, secret: &str, worker: &str) -> (u16, serde_json::Value) {
    let metadata = serde_json::json!({"worker_name": worker, "action": "delete"}).to_string();
    let (boundary, body) = multipart(&[("metadata", None, metadata.as_bytes())]);
    signed_post(http, secret, &boundary, body).await
}

pub async fn signed_post(
    http: SocketAddr,
    secret: &str,
    boundary: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    signed_post_query(http, secret, "", boundary, body).await
}

/// Posts a signed multipart `body` to the hook, with a query string (`?wait=5s`).
pub async fn signed_post_query(
    http: SocketAddr,
    secret: &str,
    query: &str,
    boundary: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let request = signed_request(&http_client(), http, secret, query, boundary, body);
    status_and_json(request.send().await.unwrap()).await
}

/// The hook request posting the multipart `body`, signed with `secret`, on `client`; not sent.
pub fn signed_request(
    client: &reqwest::Client,
    http: SocketAddr,
    secret: &str,
    query: &str,
    boundary: &str,
    body: Vec<u8>,
) -> reqwest::RequestBuilder {
    let timestamp = workerpush::core::now_ms() / 1000;
    let signature = workerpush::http::signing::sign(secret.as_bytes(), timestamp, &body);
    client
        .post(format!("http://{http}/internal/broadcast{query}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("x-workerpush-timestamp", timestamp.to_string())
        .header("x-workerpush-signature", signature)
        .body(body)
}

/// The signed hook request putting `code` as `worker`@`version`, on `client`; not sent.
pub fn signed_put_request(
    client: &reqwest::Client,
    http: SocketAddr,
    secret: &str,
    query: &str,
    worker: &str,
    version: &str,
    code: &[u8],
) -> reqwest::RequestBuilder {
    let metadata = serde_json::json!({"worker_name": worker, "version": version}).to_string();
    let (boundary, body) = multipart(&[
        ("metadata", None, metadata.as_bytes()),
        ("worker_code", Some("worker.js"), code),
    ]);
    signed_request(client, http, secret, query, &boundary, body)
}

/// A response's status and JSON body (`Null` when the body is not JSON).
pub async fn status_and_json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// A gRPC session as client `name` (from `certs/clients/`).
pub async fn grpc_session(certs: &Path, grpc: SocketAddr, name: &str) -> Box<dyn Session> {
    grpc_transport(certs, grpc, name).connect().await.unwrap()
}

pub fn grpc_transport(certs: &Path, grpc: SocketAddr, name: &str) -> GrpcTransport {
    let config = client_tls(certs, name, ClientTlsPurpose::Grpc);
    GrpcTransport::new(&format!("localhost:{}", grpc.port()), config).unwrap()
}

/// The TLS configuration of client `name` (from `certs/clients/`), trusting `certs/ca.pem`.
pub fn client_tls(
    certs: &Path,
    name: &str,
    purpose: ClientTlsPurpose,
) -> std::sync::Arc<rustls::ClientConfig> {
    tls::install_crypto_provider();
    tls::client_config(
        &certs.join("ca.pem"),
        &certs.join(format!("clients/{name}.pem")),
        &certs.join(format!("clients/{name}-key.pem")),
        purpose,
    )
    .unwrap()
}

/// The text of the core's `/metrics`.
pub async fn metrics_text(http: SocketAddr) -> String {
    http_client()
        .get(format!("http://{http}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub fn sha256(code: &[u8]) -> String {
    workerpush::core::Checksum::of(code).to_string()
}

pub fn bytes(text: &str) -> Bytes {
    Bytes::from(text.to_owned())
}

/// Waits until `check` holds, polling every 20 ms, up to `within`.
pub fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` every 20 ms until it holds, failing after `within` (the async [`eventually`]).
pub async fn until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A QUIC session as client `name` (from `certs/clients/`).
pub async fn quic_session(certs: &Path, quic: SocketAddr, name: &str) -> Box<dyn Session> {
    quic_transport(certs, quic, name).connect().await.unwrap()
}

pub fn quic_transport(
    certs: &Path,
    quic: SocketAddr,
    name: &str,
) -> workerpush::client::QuicTransport {
    let config = client_tls(certs, name, ClientTlsPurpose::Quic);
    workerpush::client::QuicTransport::new(&format!("localhost:{}", quic.port()), config).unwrap()
}

/// A gRPC consumer driven by hand: it reads what the test asks for and acknowledges exactly
/// what the test says (applied, or failed with a reason).
pub struct HandConsumer {
    pub id: String,
    session: Box<dyn Session>,
    stream: workerpush::client::UpdateStream,
    /// Every update received, in order.
    pub received: Vec<workerpush::pb::WorkerUpdate>,
}

impl HandConsumer {
    /// Subscribes as `id` (`consumer-1` or `consumer-1/suffix`) to `workers` (empty: all),
    /// fresh or resuming from `(epoch, revision)`, and reads up to the first SYNCED.
    pub async fn subscribe(
        certs: &Path,
        grpc: SocketAddr,
        id: &str,
        workers: &[&str],
        resume: Option<(&str, u64)>,
    ) -> Self {
        let identity = id.split('/').next().unwrap();
        let session = grpc_session(certs, grpc, identity).await;
        let stream = session
            .subscribe(workerpush::pb::SubscribeRequest {
                consumer_id: id.to_owned(),
                worker_names: workers.iter().map(|w| (*w).to_owned()).collect(),
                resume_revision: resume.map_or(0, |r| r.1),
                epoch: resume.map(|r| r.0.to_owned()).unwrap_or_default(),
            })
            .await
            .unwrap();
        let mut consumer = Self {
            id: id.to_owned(),
            session,
            stream,
            received: Vec::new(),
        };
        while consumer.next().await.kind != workerpush::pb::UpdateKind::Synced as i32 {}
        consumer
    }

    /// The next update, whatever its kind.
    pub async fn next(&mut self) -> workerpush::pb::WorkerUpdate {
        use futures_util::StreamExt;
        let update = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
            .await
            .unwrap_or_else(|_| panic!("{}: no update within 10 s", self.id))
            .expect("stream open")
            .expect("no error");
        self.received.push(update.clone());
        update
    }

    /// The next PUT or DELETE (progress markers skipped).
    pub async fn next_change(&mut self) -> workerpush::pb::WorkerUpdate {
        loop {
            let update = self.next().await;
            if update.kind == workerpush::pb::UpdateKind::Put as i32
                || update.kind == workerpush::pb::UpdateKind::Delete as i32
            {
                return update;
            }
        }
    }

    /// Acknowledges `update`: applied, or failed with `error`.
    pub async fn ack(&self, update: &workerpush::pb::WorkerUpdate, error: Option<&str>) {
        self.session
            .ack(workerpush::pb::AckRequest {
                consumer_id: self.id.clone(),
                worker_name: update.worker_name.clone(),
                revision: update.revision,
                applied: error.is_none(),
                error: error.unwrap_or_default().to_owned(),
            })
            .await
            .unwrap();
    }
}

/// The consumer ids of a propagation list (`acked`, `failed`, `pending`).
pub fn ids(list: &serde_json::Value) -> Vec<&str> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|entry| entry["consumer_id"].as_str().unwrap())
        .collect()
}

/// `GET` on the core's admin port with `token` (if any): status and JSON (`Null` if none).
pub async fn admin_get(
    http: SocketAddr,
    token: Option<&str>,
    path: &str,
) -> (u16, serde_json::Value) {
    let mut request = http_client().get(format!("http://{http}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    status_and_json(request.send().await.unwrap()).await
}

/// Uploads through the upload server as the README does, with an optional query string
/// (`?wait=5s`); returns (status, JSON body).
pub async fn upload_with(
    upload: SocketAddr,
    token: &str,
    query: &str,
    worker: &str,
    version: &str,
    code: &[u8],
) -> (u16, serde_json::Value) {
    let form = reqwest::multipart::Form::new()
        .text("filename", worker.to_owned())
        .text("version", version.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(code.to_vec()).file_name("worker.js"),
        );
    let response = http_client()
        .post(format!("http://{upload}/upload{query}"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    status_and_json(response).await
}

/// [`hook_put`] with a query string (`?wait=5s`).
pub async fn hook_put_query(
    http: SocketAddr,
    secret: &str,
    query: &str,
    worker: &str,
    version: &str,
    code: &[u8],
) -> (u16, serde_json::Value) {
    let request = signed_put_request(&http_client(), http, secret, query, worker, version, code);
    status_and_json(request.send().await.unwrap()).await
}

/// The next update of a subscription stream, within 10 s.
pub async fn next_update(
    stream: &mut workerpush::client::UpdateStream,
) -> workerpush::pb::WorkerUpdate {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update within 10 s")
        .expect("stream open")
        .expect("no error")
}

/// Reads until SYNCED: the updates before it, and its revision.
pub async fn until_synced(
    stream: &mut workerpush::client::UpdateStream,
) -> (Vec<workerpush::pb::WorkerUpdate>, u64) {
    let mut updates = Vec::new();
    loop {
        let update = next_update(stream).await;
        if update.kind == workerpush::pb::UpdateKind::Synced as i32 {
            return (updates, update.revision);
        }
        updates.push(update);
    }
}

/// `workerpush watch --json` as its own process, run in `dir` (certificates from
/// `dir/certs`, client `consumer-1`), its events and stderr collected.
pub struct WatchProcess {
    pub child: Child,
    pub events: Arc<Mutex<Vec<serde_json::Value>>>,
    pub stderr: Arc<Mutex<String>>,
}

impl WatchProcess {
    /// `watch --transport T --addr localhost:PORT --out OUT --json` plus `extra`.
    pub fn start(dir: &Path, transport: &str, port: u16, out: &Path, extra: &[&str]) -> Self {
        let addr = format!("localhost:{port}");
        let out = out.display().to_string();
        let mut args = vec!["watch", "--transport", transport];
        if !extra.contains(&"--addr") {
            args.extend(["--addr", &addr]);
        }
        args.extend([
            "--ca",
            "certs/ca.pem",
            "--cert",
            "certs/clients/consumer-1.pem",
            "--key",
            "certs/clients/consumer-1-key.pem",
            "--out",
            &out,
            "--json",
        ]);
        args.extend(extra);
        let mut child = Command::new(BIN)
            .args(&args)
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                sink.lock().unwrap().push(event);
            }
        });
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("watch: {line}");
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Self {
            child,
            events,
            stderr: text,
        }
    }

    /// The first event matching `check`, if any yet.
    pub fn saw(&self, check: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| check(e))
            .cloned()
    }

    /// Waits (up to 20 s) for an event of `kind` about `worker`@`version` (empty: any), and
    /// returns it.
    pub fn wait_for(&self, kind: &str, worker: &str, version: &str) -> serde_json::Value {
        let check = |e: &serde_json::Value| {
            e["kind"] == kind
                && (worker.is_empty() || e["worker_name"] == worker)
                && (version.is_empty() || e["version"] == version)
        };
        eventually(
            Duration::from_secs(20),
            &format!("{kind} {worker} {version}"),
            || self.saw(check).is_some(),
        );
        self.saw(check).unwrap()
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "watch did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`TERM`, `INT`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
