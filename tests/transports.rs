//! gRPC and QUIC share one core: the same revisions in the same order on both, resume across
//! transports, and `watch --transport quic` against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use workerpush::pb::{SubscribeRequest, UpdateKind, WorkerUpdate};

fn request(epoch: &str, resume: u64) -> SubscribeRequest {
    SubscribeRequest {
        consumer_id: String::new(),
        worker_names: vec![],
        resume_revision: resume,
        epoch: epoch.to_owned(),
    }
}

#[tokio::test]
async fn grpc_and_quic_subscribers_receive_the_same_revisions_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let certs = server.certs();
    let grpc = grpc_session(&certs, server.addr("grpc"), "consumer-1").await;
    let quic = quic_session(&certs, server.addr("quic"), "consumer-1").await;
    let mut over_grpc = grpc.subscribe(request("", 0)).await.unwrap();
    let mut over_quic = quic.subscribe(request("", 0)).await.unwrap();
    until_synced(&mut over_grpc).await;
    until_synced(&mut over_quic).await;
    for i in 0..30 {
        let code = format!("export default {{ n: {i} }}");
        let (status, body) = hook_put(
            server.addr("http"),
            &secret,
            &format!("w{}", i % 4),
            &i.to_string(),
            code.as_bytes(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    hook_delete(server.addr("http"), &secret, "w1").await;
    let mut seen_grpc = Vec::new();
    let mut seen_quic = Vec::new();
    for _ in 0..31 {
        seen_grpc.push(next_update(&mut over_grpc).await);
        seen_quic.push(next_update(&mut over_quic).await);
    }
    let key = |u: &WorkerUpdate| {
        (
            u.kind,
            u.revision,
            u.worker_name.clone(),
            u.version.clone(),
            u.checksum.clone(),
            u.worker_code.clone(),
            u.epoch.clone(),
        )
    };
    assert_eq!(
        seen_grpc.iter().map(key).collect::<Vec<_>>(),
        seen_quic.iter().map(key).collect::<Vec<_>>()
    );
    assert_eq!(
        seen_grpc.iter().map(|u| u.revision).collect::<Vec<_>>(),
        (1..=31).collect::<Vec<_>>()
    );
    for update in seen_quic
        .iter()
        .filter(|u| u.kind == UpdateKind::Put as i32)
    {
        assert_eq!(sha256(&update.worker_code), update.checksum);
    }
}

#[tokio::test]
async fn resume_over_quic_from_a_position_learned_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let certs = server.certs();
    for i in 1..=3 {
        hook_put(
            http,
            &secret,
            "a",
            &i.to_string(),
            format!("a{i}").as_bytes(),
        )
        .await;
    }
    let grpc = grpc_session(&certs, server.addr("grpc"), "consumer-1").await;
    let mut stream = grpc.subscribe(request("", 0)).await.unwrap();
    let (snapshot, position) = until_synced(&mut stream).await;
    let epoch = snapshot[0].epoch.clone();
    drop(stream);
    drop(grpc);
    for i in 4..=8 {
        hook_put(
            http,
            &secret,
            "b",
            &i.to_string(),
            format!("b{i}").as_bytes(),
        )
        .await;
    }
    let quic = quic_session(&certs, server.addr("quic"), "consumer-1").await;
    let mut resumed = quic.subscribe(request(&epoch, position)).await.unwrap();
    let (missed, synced) = until_synced(&mut resumed).await;
    assert_eq!(
        missed.iter().map(|u| u.revision).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8]
    );
    assert!(
        missed
            .iter()
            .all(|u| u.kind == UpdateKind::Put as i32 && u.worker_name == "b")
    );
    assert_eq!(synced, 8);
}

#[tokio::test]
async fn watch_over_quic_keeps_code_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let watch = WatchProcess::start(
        dir.path(),
        "quic",
        server.addr("quic").port(),
        &dir.path().join("workers"),
        &["--workers", "edge,other"],
    );
    hook_put(server.addr("http"), &secret, "edge", "1.0.0", b"quic code").await;
    hook_put(server.addr("http"), &secret, "ignored", "1", b"not for us").await;
    let file = dir.path().join("workers/edge/1.0.0/worker.js");
    eventually(Duration::from_secs(20), "worker.js over QUIC", || {
        std::fs::read(&file).ok().as_deref() == Some(&b"quic code"[..])
    });
    hook_delete(server.addr("http"), &secret, "edge").await;
    eventually(Duration::from_secs(20), "worker removed", || {
        !dir.path().join("workers/edge").exists()
    });
    assert!(!dir.path().join("workers/ignored").exists(), "filtered out");
    drop(watch);
}
