//! `workerpush watch` as an edge agent operators can trust, against the real binary and real
//! files: it owns only what it made under `--out`, never follows a planted symlink, skips and
//! nacks what it cannot fetch (the feed goes on), takes messages as large as the core is
//! configured for, bounds what a hostile core streams, acks only what `--exec` accepted, and
//! leaves a QUIC core at once when stopped.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use common::*;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use workerpush::pb::{
    AckRequest, AckResponse, DeregisterRequest, DeregisterResponse, EncodedUpdate,
    FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse, RegisterRequest, RegisterResponse,
    SubscribeRequest, UpdateKind, WorkerChunk, WorkerUpdate,
    server::control_plane_server::{ControlPlane, ControlPlaneServer},
};

/// Every path under `root` with its content (directories as `/`, links as `-> target`).
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                into.insert(
                    name,
                    format!("-> {}", std::fs::read_link(&path).unwrap().display()),
                );
            } else if meta.is_dir() {
                into.insert(name, "/".into());
                walk(root, &path, into);
            } else {
                into.insert(
                    name,
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into(),
                );
            }
        }
    }
    let mut into = BTreeMap::new();
    walk(root, root, &mut into);
    into
}

/// The files an operator keeps in the directory they point `--out` at.
fn operator_files(out: &Path) {
    std::fs::create_dir_all(out.join("src")).unwrap();
    std::fs::write(out.join("src/main.c"), "int main() { return 0; }\n").unwrap();
    std::fs::create_dir_all(out.join("docs/guide")).unwrap();
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::fs::write(out.join("notes.txt"), "do not lose me\n").unwrap();
}

fn worker_js(out: &Path, worker: &str, version: &str) -> Option<Vec<u8>> {
    std::fs::read(out.join(worker).join(version).join("worker.js")).ok()
}

#[tokio::test]
async fn watch_leaves_what_it_did_not_make_alone_and_a_second_watch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let grpc = server.addr("grpc").port();
    let out = dir.path().join("srv");
    operator_files(&out);
    let before = tree(&out);
    hook_put(http, &secret, "app", "1", b"one").await;

    let watch = WatchProcess::start(dir.path(), "grpc", grpc, &out, &[]);
    watch.wait_for("SYNCED", "", "");
    assert_eq!(worker_js(&out, "app", "1").as_deref(), Some(&b"one"[..]));

    // A worker whose name is one of the operator's directories is refused, not written.
    hook_put(http, &secret, "docs", "1", b"would overwrite docs").await;
    let refused = watch.wait_for("PUT", "docs", "1");
    assert_eq!(refused["refused"], true, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("not made by"),
        "{refused}"
    );
    hook_put(http, &secret, "app", "2", b"two").await;
    watch.wait_for("PUT", "app", "2");
    hook_put(http, &secret, "gone", "1", b"short-lived").await;
    watch.wait_for("PUT", "gone", "1");
    hook_delete(http, &secret, "gone").await;
    watch.wait_for("DELETE", "gone", "");
    assert!(!out.join("gone").exists());
    assert!(!out.join("app/1").exists(), "the old version went");

    // A second agent on the same directory is refused with its own exit code.
    let mut second = WatchProcess::start(dir.path(), "grpc", grpc, &out, &[]);
    let status = second.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(75), "{status:?}");
    assert!(second.stderr.lock().unwrap().contains("in use by another"));
    drop(watch);

    // Restarted from scratch (RESET + snapshot): everything of the operator's is intact,
    // and the code already held is not rewritten.
    let file = out.join("app/2/worker.js");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    std::fs::remove_file(out.join(".workerpush-position.json")).unwrap();
    let again = WatchProcess::start(dir.path(), "grpc", grpc, &out, &[]);
    let reset = again.wait_for("RESET", "", "");
    again.wait_for("SYNCED", "", "");
    let put = again.wait_for("PUT", "app", "2");
    assert_eq!(put["unchanged"], true, "{put} after {reset}");
    let now = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&file).unwrap());
    assert_eq!(inode, now, "worker.js was not rewritten");
    let after = tree(&out);
    for (path, content) in &before {
        assert_eq!(after.get(path), Some(content), "{path} intact");
    }

    // Another deployment's agent (another consumer id) is refused too.
    drop(again);
    let mut foreign = WatchProcess::start(
        dir.path(),
        "grpc",
        grpc,
        &out,
        &["--consumer-id", "consumer-1/x"],
    );
    assert_eq!(foreign.wait_exit(Duration::from_secs(20)).code(), Some(73));
    assert!(
        foreign
            .stderr
            .lock()
            .unwrap()
            .contains("another deployment")
    );
}

#[tokio::test]
async fn symlinks_planted_in_out_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let out = dir.path().join("workers");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("keep")).unwrap();
    std::fs::write(elsewhere.join("keep/data"), "precious").unwrap();
    std::fs::write(elsewhere.join("target"), "untouched").unwrap();
    std::fs::create_dir_all(&out).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("victim")).unwrap();
    let outside = tree(&elsewhere);

    let watch = WatchProcess::start(dir.path(), "grpc", server.addr("grpc").port(), &out, &[]);
    watch.wait_for("SYNCED", "", "");
    hook_put(http, &secret, "victim", "1.0.0", b"through the link?").await;
    let refused = watch.wait_for("PUT", "victim", "1.0.0");
    assert_eq!(refused["refused"], true, "{refused}");

    hook_put(http, &secret, "app", "1", b"one").await;
    watch.wait_for("PUT", "app", "1");
    // Links at the old fixed temp name, at the next version's directory, at a temp name of
    // the position file.
    std::os::unix::fs::symlink(elsewhere.join("target"), out.join("app/1/worker.tmp")).unwrap();
    std::os::unix::fs::symlink(elsewhere.join("target"), out.join("app/1/worker.js.tmp")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("app/2")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("target"),
        out.join(".workerpush-position.tmp"),
    )
    .unwrap();
    hook_put(http, &secret, "app", "2", b"two").await;
    let refused = watch.wait_for("PUT", "app", "2");
    assert_eq!(refused["refused"], true, "{refused}");
    assert_eq!(worker_js(&out, "app", "1").as_deref(), Some(&b"one"[..]));
    hook_put(http, &secret, "other", "1", b"fine").await;
    watch.wait_for("PUT", "other", "1");
    hook_delete(http, &secret, "app").await;
    watch.wait_for("DELETE", "app", "");
    hook_delete(http, &secret, "victim").await;
    watch.wait_for("DELETE", "victim", "");

    assert_eq!(tree(&elsewhere), outside, "nothing outside --out changed");
    assert!(!out.join("app").exists(), "its own directory went");
    assert!(
        std::fs::symlink_metadata(out.join("victim"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the planted link is not ours to remove"
    );
}

/// The sum of a counter's series in `/metrics`.
async fn counter(http: SocketAddr, name: &str) -> f64 {
    metrics_text(http)
        .await
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_damaged_bundle_is_nacked_and_skipped_while_the_feed_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--inline-code-max-bytes", "1024"]);
    let (secret, token) = server.secrets();
    let http = server.addr("http");
    hook_put(http, &secret, "good-a", "1", &vec![b'a'; 4096]).await;
    let bad = vec![b'b'; 200 << 10];
    hook_put(http, &secret, "bad", "1", &bad).await;
    hook_put(http, &secret, "good-c", "1", &vec![b'c'; 4096]).await;
    let bundle = dir.path().join("data/bundles").join(sha256(&bad));
    eventually(Duration::from_secs(10), "the bundle file", || {
        bundle.exists()
    });
    std::fs::write(&bundle, b"bit rot").unwrap();
    let subscriptions = counter(http, "workerpush_subscriptions_total").await;

    let started = Instant::now();
    let out = dir.path().join("workers");
    let watch = WatchProcess::start(dir.path(), "grpc", server.addr("grpc").port(), &out, &[]);
    watch.wait_for("PUT", "good-a", "1");
    watch.wait_for("PUT", "good-c", "1");
    watch.wait_for("SYNCED", "", "");
    let refused = watch.wait_for("PUT", "bad", "1");
    assert_eq!(refused["refused"], true, "{refused}");
    hook_put(http, &secret, "later", "1", &vec![b'l'; 4096]).await;
    watch.wait_for("PUT", "later", "1");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(worker_js(&out, "later", "1").unwrap().len(), 4096);
    assert!(!out.join("bad").exists());

    until(Duration::from_secs(10), "the nack on the core", || async {
        let (_, worker) = admin_get(http, Some(&token), "/v1/workers/bad").await;
        worker["propagation"]["failed"][0]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    })
    .await;
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/bad").await;
    eprintln!("bad: {}", worker["propagation"]);

    // Repaired on the core, it is fetched again in the background and acked.
    std::fs::write(&bundle, &bad).unwrap();
    eventually(
        Duration::from_secs(10),
        "the bundle applied on a later fetch",
        || {
            watch
                .saw(|e| {
                    e["kind"] == "PUT" && e["worker_name"] == "bad" && e.get("refused").is_none()
                })
                .is_some()
        },
    );
    assert_eq!(worker_js(&out, "bad", "1").unwrap(), bad);
    until(Duration::from_secs(10), "the ack on the core", || async {
        let (_, worker) = admin_get(http, Some(&token), "/v1/workers/bad").await;
        worker["propagation"]["state"] == "complete"
    })
    .await;
    // Ten seconds on, the session that skipped it is still the only one.
    tokio::time::sleep_until((started + Duration::from_secs(10)).into()).await;
    let made = counter(http, "workerpush_subscriptions_total").await - subscriptions;
    assert!(made <= 2.0, "{made} subscriptions in 10 s");
}

#[tokio::test]
async fn inline_code_above_4_mib_reaches_grpc_and_quic_watchers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--inline-code-max-bytes", "8388608"]);
    let (secret, _) = server.secrets();
    let code: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let grpc_out = dir.path().join("grpc-out");
    let quic_out = dir.path().join("quic-out");
    let grpc = WatchProcess::start(
        dir.path(),
        "grpc",
        server.addr("grpc").port(),
        &grpc_out,
        &[],
    );
    let quic = WatchProcess::start(
        dir.path(),
        "quic",
        server.addr("quic").port(),
        &quic_out,
        &[],
    );
    grpc.wait_for("SYNCED", "", "");
    quic.wait_for("SYNCED", "", "");
    let (status, answer) = hook_put(server.addr("http"), &secret, "big", "1", &code).await;
    assert_eq!(status, 201, "{answer}");
    for (watch, out) in [(&grpc, &grpc_out), (&quic, &quic_out)] {
        let put = watch.wait_for("PUT", "big", "1");
        assert!(put.get("refused").is_none(), "{put}");
        assert_eq!(put["checksum"], sha256(&code));
        assert!(worker_js(out, "big", "1").unwrap() == code);
    }
}

/// A core that lies about sizes: one update announcing 2^40 bytes, one whose fetch announces
/// 2^40 bytes, one whose fetch streams past the size it announced, forever.
#[derive(Default)]
struct HostileCore {
    acks: Arc<Mutex<Vec<AckRequest>>>,
}

const TERABYTE: i64 = 1 << 40;
/// A worker name that would clear a terminal.
const EVIL: &str = "evil\0\u{1b}[2J";
const CHUNK: usize = 1 << 20;

fn update(kind: UpdateKind, revision: u64, worker: &str, size: i64) -> EncodedUpdate {
    EncodedUpdate::encode(&WorkerUpdate {
        kind: kind as i32,
        revision,
        epoch: "hostile".into(),
        worker_name: worker.into(),
        version: if worker.is_empty() { "" } else { "1" }.into(),
        checksum: if worker.is_empty() {
            String::new()
        } else {
            "ab".repeat(32)
        },
        size,
        ..WorkerUpdate::default()
    })
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[async_trait::async_trait]
impl ControlPlane for HostileCore {
    type SubscribeWorkerUpdatesStream = Boxed<EncodedUpdate>;
    type FetchWorkerStream = Boxed<WorkerChunk>;
    type StreamAcksStream = Boxed<AckResponse>;

    async fn subscribe_worker_updates(
        &self,
        _: tonic::Request<SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeWorkerUpdatesStream>, tonic::Status> {
        let updates = [
            update(UpdateKind::Reset, 0, "", 0),
            update(UpdateKind::Put, 1, "tera", TERABYTE),
            update(UpdateKind::Put, 2, "liar", 5 << 20),
            update(UpdateKind::Put, 3, "flood", 5 << 20),
            update(UpdateKind::Put, 4, EVIL, 5),
            update(UpdateKind::Synced, 4, "", 0),
        ];
        let stream = futures_util::stream::iter(updates.map(Ok::<_, tonic::Status>))
            .chain(futures_util::stream::pending());
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn register_consumer(
        &self,
        _: tonic::Request<RegisterRequest>,
    ) -> Result<tonic::Response<RegisterResponse>, tonic::Status> {
        Ok(tonic::Response::new(RegisterResponse::default()))
    }

    async fn deregister_consumer(
        &self,
        _: tonic::Request<DeregisterRequest>,
    ) -> Result<tonic::Response<DeregisterResponse>, tonic::Status> {
        Ok(tonic::Response::new(DeregisterResponse::default()))
    }

    async fn ack_update(
        &self,
        request: tonic::Request<AckRequest>,
    ) -> Result<tonic::Response<AckResponse>, tonic::Status> {
        self.acks.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(AckResponse::default()))
    }

    async fn stream_acks(
        &self,
        request: tonic::Request<tonic::Streaming<workerpush::pb::AckBatch>>,
    ) -> Result<tonic::Response<Self::StreamAcksStream>, tonic::Status> {
        let acks = self.acks.clone();
        let answers = request.into_inner().map(move |batch| {
            acks.lock().unwrap().extend(batch?.acks);
            Ok(AckResponse::default())
        });
        Ok(tonic::Response::new(Box::pin(answers)))
    }

    async fn fetch_worker(
        &self,
        request: tonic::Request<FetchWorkerRequest>,
    ) -> Result<tonic::Response<Self::FetchWorkerStream>, tonic::Status> {
        let announced = if request.get_ref().worker_name == "liar" {
            TERABYTE
        } else {
            5 << 20
        };
        let data = bytes::Bytes::from(vec![0u8; CHUNK]);
        let chunks = futures_util::stream::iter(0..).map(move |i: i64| {
            Ok(WorkerChunk {
                checksum: "ab".repeat(32),
                size: announced,
                offset: i * CHUNK as i64,
                data: data.clone(),
            })
        });
        Ok(tonic::Response::new(Box::pin(chunks)))
    }

    async fn list_workers(
        &self,
        _: tonic::Request<ListWorkersRequest>,
    ) -> Result<tonic::Response<ListWorkersResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListWorkersResponse::default()))
    }
}

/// A server-side TLS stream tonic can serve.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The peak resident memory of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

// The fake core runs on the test's runtime while the test waits by blocking: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_announcing_a_terabyte_cannot_grow_watch_and_is_nacked() {
    workerpush::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = std::process::Command::new(BIN)
        .args(["certs", "--out", "certs", "--client", "consumer-1"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(certs.status.success(), "{certs:?}");
    let tls = workerpush::tls::server::ServerTls::load(&dir.path().join("certs"))
        .unwrap()
        .grpc_config();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming =
        futures_util::stream::unfold((listener, acceptor), |(listener, acceptor)| async {
            loop {
                let (tcp, _) = listener.accept().await.ok()?;
                if let Ok(tls) = acceptor.accept(tcp).await {
                    return Some((Ok::<_, std::io::Error>(Tls(tls)), (listener, acceptor)));
                }
            }
        });
    let core = HostileCore::default();
    let acks = core.acks.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlPlaneServer::new(core))
            .serve_with_incoming(incoming),
    );

    let out = dir.path().join("workers");
    let watch = WatchProcess::start(dir.path(), "grpc", port, &out, &[]);
    for worker in ["tera", "liar", "flood", EVIL] {
        let put = watch.wait_for("PUT", worker, "1");
        assert_eq!(put["refused"], true, "{put}");
    }
    let evil = watch.wait_for("PUT", EVIL, "1");
    assert!(
        evil["error"]
            .as_str()
            .unwrap()
            .contains("invalid worker name"),
        "{evil}"
    );
    eventually(Duration::from_secs(20), "four nacks", || {
        let acks = acks.lock().unwrap();
        ["tera", "liar", "flood", EVIL].iter().all(|w| {
            acks.iter()
                .any(|a| a.worker_name == *w && !a.applied && !a.error.is_empty())
        })
    });
    for ack in acks.lock().unwrap().iter() {
        eprintln!("nack {:?}: {}", ack.worker_name, ack.error);
        assert!(!ack.applied);
    }
    // The background fetches again (after about a second) stop at the same bounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let peak = peak_rss(watch.child.id());
    eprintln!("watch peak RSS: {} MiB", peak >> 20);
    assert!(peak < 100 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(!out.join("tera").exists() && !out.join("flood").exists());
}

#[tokio::test]
async fn exec_decides_the_ack_and_a_refused_version_leaves_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, token) = server.secrets();
    let http = server.addr("http");
    let out = dir.path().join("workers");
    let log = dir.path().join("exec.log");
    let command = format!(
        r#"echo "$WORKERPUSH_KIND $WORKERPUSH_WORKER $WORKERPUSH_VERSION $(cat "$WORKERPUSH_PATH" 2>/dev/null)" >> {log}; test "$WORKERPUSH_KIND $WORKERPUSH_VERSION" != "put 2" || {{ echo "runtime rejected v2: SyntaxError" >&2; exit 1; }}"#,
        log = log.display()
    );
    let watch = WatchProcess::start(
        dir.path(),
        "grpc",
        server.addr("grpc").port(),
        &out,
        &["--exec", &command, "--exec-timeout", "10s"],
    );
    watch.wait_for("SYNCED", "", "");
    let (_, one) = hook_put_query(http, &secret, "?wait=10s", "app", "1", b"v1").await;
    assert_eq!(one["propagation"]["state"], "complete", "{one}");
    let (_, two) = hook_put_query(http, &secret, "?wait=10s", "app", "2", b"v2").await;
    assert_eq!(two["propagation"]["state"], "failed", "{two}");
    assert_eq!(
        two["propagation"]["failed"][0]["reason"],
        "--exec exited with 1: runtime rejected v2: SyntaxError"
    );
    assert_eq!(worker_js(&out, "app", "1").as_deref(), Some(&b"v1"[..]));
    assert!(
        !out.join("app/2").exists(),
        "the refused version was taken back"
    );
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(worker["propagation"]["state"], "failed", "{worker}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "put app 1 v1\nput app 2 v2\n",
        "the command saw the new code at its path"
    );
    // Refused, so a restart starts from a snapshot (and asks the command again).
    let saved = std::fs::read(out.join(".workerpush-position.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    assert_eq!(saved["unapplied"], serde_json::json!(["app"]), "{saved}");

    // A removal is told too, after the directory went.
    hook_delete(http, &secret, "app").await;
    let deleted = watch.wait_for("DELETE", "app", "");
    assert!(deleted.get("refused").is_none(), "{deleted}");
    assert!(!out.join("app").exists());
    eventually(
        Duration::from_secs(10),
        "the command told of the removal",
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .ends_with("delete app 2 \n")
        },
    );
}

#[tokio::test]
async fn once_syncs_through_the_first_core_that_answers_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    hook_put(server.addr("http"), &secret, "a", "1", b"a1").await;
    hook_put(server.addr("http"), &secret, "b", "3", b"b3").await;
    let out = dir.path().join("workers");
    // The first address refuses connections: failover goes on to the next.
    let addrs = format!("localhost:1,localhost:{}", server.addr("grpc").port());
    let mut watch = WatchProcess::start(
        dir.path(),
        "grpc",
        server.addr("grpc").port(),
        &out,
        &["--addr", &addrs, "--once"],
    );
    let status = watch.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", watch.stderr.lock().unwrap());
    assert!(watch.saw(|e| e["kind"] == "SYNCED").is_some());
    assert_eq!(worker_js(&out, "a", "1").as_deref(), Some(&b"a1"[..]));
    assert_eq!(worker_js(&out, "b", "3").as_deref(), Some(&b"b3"[..]));
}

#[tokio::test]
async fn a_stopped_quic_watch_is_disconnected_on_the_core_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let http = server.addr("http");
    let out = dir.path().join("workers");
    for signal in ["INT", "TERM"] {
        let id = format!("consumer-1/{}", signal.to_lowercase());
        let watch = WatchProcess::start(
            dir.path(),
            "quic",
            server.addr("quic").port(),
            &out.join(signal),
            &[
                "--consumer-id",
                &id,
                "--endpoint",
                "edge-7.example:443",
                "--label",
                "region=eu",
                "--label",
                "rack=r1",
            ],
        );
        watch.wait_for("SYNCED", "", "");
        let consumer = |id: String| {
            let token = token.clone();
            async move {
                let (_, consumers) = admin_get(http, Some(&token), "/v1/consumers").await;
                consumers["consumers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["consumer_id"] == id.as_str() && c["connected"] == true)
                    .cloned()
            }
        };
        until(Duration::from_secs(10), "connected", || async {
            consumer(id.clone()).await.is_some()
        })
        .await;
        let shown = consumer(id.clone()).await.unwrap();
        assert_eq!(shown["endpoint"], "edge-7.example:443", "{shown}");
        assert_eq!(
            shown["labels"],
            serde_json::json!({"region": "eu", "rack": "r1"})
        );
        let stopped = Instant::now();
        watch.signal(signal);
        until(
            Duration::from_secs(1),
            "shown disconnected within 1 s",
            || async { consumer(id.clone()).await.is_none() },
        )
        .await;
        eprintln!("{signal}: disconnected after {:?}", stopped.elapsed());
    }
}
