//! The README's path, scripted with real processes: `serve --dev`, `watch --json` in another
//! process, uploads through the upload server, deletes; the roles apart (`core` + `upload`);
//! restarts and `kill -9`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;

/// `workerpush watch --json` as its own process, writing under `dir/workers`.
struct Watcher {
    process: WatchProcess,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    out: PathBuf,
}

impl Watcher {
    fn start(dir: &Path, port: u16, transport: &str) -> Self {
        let out = dir.join("workers");
        let process = WatchProcess::start(dir, transport, port, &out, &[]);
        Self {
            events: process.events.clone(),
            process,
            out,
        }
    }

    fn wait_for(&self, kind: &str, worker: &str, version: &str) -> serde_json::Value {
        self.process.wait_for(kind, worker, version)
    }
}

/// Uploads as the README does: multipart `filename`, `version`, `file`, bearer token.
async fn upload(
    addr: std::net::SocketAddr,
    token: &str,
    name: &str,
    version: &str,
    code: &[u8],
) -> (u16, serde_json::Value) {
    upload_with(addr, token, "", name, version, code).await
}

async fn delete(addr: std::net::SocketAddr, token: &str, name: &str) -> u16 {
    http_client()
        .delete(format!("http://{addr}/workers/{name}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn readme_walkthrough_upload_reaches_watch_and_delete_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let watcher = Watcher::start(dir.path(), server.addr("grpc").port(), "grpc");
    watcher.wait_for("SYNCED", "", "");

    let code = b"export default { async fetch() { return new Response('hello') } }\n";
    let (status, body) = upload(server.addr("upload"), &token, "my-worker", "1.0.0", code).await;
    assert!((200..300).contains(&status), "{status} {body}");
    let put = watcher.wait_for("PUT", "my-worker", "1.0.0");
    assert_eq!(put["checksum"], sha256(code));
    assert_eq!(put["size"], code.len());
    let file = watcher.out.join("my-worker/1.0.0/worker.js");
    eventually(Duration::from_secs(10), "worker.js on disk", || {
        std::fs::read(&file).ok().as_deref() == Some(&code[..])
    });

    let (status, _) = upload(server.addr("upload"), &token, "my-worker", "1.0.1", b"v2").await;
    assert!((200..300).contains(&status));
    watcher.wait_for("PUT", "my-worker", "1.0.1");
    eventually(Duration::from_secs(10), "old version removed", || {
        !file.exists()
    });

    assert_eq!(
        delete(server.addr("upload"), &token, "my-worker").await,
        200
    );
    watcher.wait_for("DELETE", "my-worker", "1.0.1");
    eventually(Duration::from_secs(10), "worker removed", || {
        !watcher.out.join("my-worker").exists()
    });
}

#[tokio::test]
async fn watch_survives_a_core_restart_by_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let watcher = Watcher::start(dir.path(), server.addr("grpc").port(), "grpc");
    hook_put(server.addr("http"), &secret, "a", "1", b"a1").await;
    watcher.wait_for("PUT", "a", "1");
    let resets_before = watcher
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "RESET")
        .count();

    server.kill9();
    let server = server.restart_same_ports();
    hook_put(server.addr("http"), &secret, "b", "1", b"b1").await;
    hook_put(server.addr("http"), &secret, "a", "2", b"a2").await;
    watcher.wait_for("PUT", "a", "2");
    watcher.wait_for("PUT", "b", "1");
    let events = watcher.events.lock().unwrap().clone();
    let resets = events.iter().filter(|e| e["kind"] == "RESET").count();
    assert_eq!(
        resets, resets_before,
        "resumed by revision, no RESET: {events:?}"
    );
    let puts: Vec<_> = events
        .iter()
        .filter(|e| e["kind"] == "PUT")
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(puts, [1, 2, 3], "each change once, in order");
    eventually(Duration::from_secs(10), "files", || {
        watcher.out.join("a/2/worker.js").exists()
            && watcher.out.join("b/1/worker.js").exists()
            && !watcher.out.join("a/1").exists()
    });
}

#[tokio::test]
async fn upload_and_core_as_two_processes_never_answer_2xx_without_the_core() {
    let dir = tempfile::tempdir().unwrap();
    // Make certs and secrets with a throwaway dev run, then run the roles apart.
    let (secret, token) = {
        let mut dev = TestServer::serve_dev(dir.path(), &[]);
        dev.kill9();
        dev.secrets()
    };
    let env = [
        ("HOOK_SECRET", secret.as_str()),
        ("UPLOAD_TOKEN", token.as_str()),
    ];
    let mut core_args = vec!["core"];
    core_args.extend(common_ports());
    let mut core = TestServer::start(dir.path(), &core_args, &env);
    let core_url = format!("http://{}", core.addr("http"));
    let upload_env = [
        ("HOOK_SECRET", secret.as_str()),
        ("UPLOAD_TOKEN", token.as_str()),
        ("GRPC_SERVER_URL", core_url.as_str()),
    ];
    let uploader = TestServer::start(
        dir.path(),
        &["upload", "--bind", "127.0.0.1", "--upload-port", "0"],
        &upload_env,
    );
    let up = uploader.addr("upload");

    let (status, body) = upload(up, &token, "split", "1", b"one").await;
    assert_eq!(status, 201, "{body}");

    core.kill9();
    let (status, body) = upload(up, &token, "split", "2", b"two").await;
    assert!(
        status == 502 || status == 503,
        "core down must not answer {status}: {body}"
    );

    let core = core.restart_same_ports();
    let (status, body) = upload(up, &token, "split", "3", b"three").await;
    assert_eq!(status, 201, "{body}");
    let session = grpc_session(&core.certs(), core.addr("grpc"), "consumer-1").await;
    let listing = session
        .list(workerpush::pb::ListWorkersRequest::default())
        .await
        .unwrap();
    assert_eq!(
        listing
            .workers
            .iter()
            .map(|w| w.version.as_str())
            .collect::<Vec<_>>(),
        ["3"]
    );
    assert_eq!(listing.revision, 2, "the refused upload left no trace");
}

#[tokio::test]
async fn upload_answered_2xx_survives_kill_9_of_serve() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let (_, token) = server.secrets();
    let (status, body) = upload(server.addr("upload"), &token, "durable", "7", b"keep me").await;
    assert_eq!(status, 201, "{body}");
    server.kill9();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let watcher = Watcher::start(dir.path(), server.addr("grpc").port(), "grpc");
    let put = watcher.wait_for("PUT", "durable", "7");
    assert_eq!(put["checksum"], sha256(b"keep me"));
}
