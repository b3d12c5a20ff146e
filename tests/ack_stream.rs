//! The streaming acknowledgement path against the real binary, on both transports: batches on
//! one long-lived stream (`StreamAcks`, QUIC `acks` frames) show in propagation exactly as
//! unary acks do, a consumer id of another identity is refused without hurting other streams,
//! and a batch over the limit is refused by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use workerpush::{
    client::{ClientError, Session, UpdateStream},
    pb::{AckRequest, MAX_ACKS_PER_BATCH, SubscribeRequest, UpdateKind, WorkerUpdate},
};

async fn connect(transport: &str, server: &TestServer, name: &str) -> Box<dyn Session> {
    match transport {
        "grpc" => grpc_session(&server.certs(), server.addr("grpc"), name).await,
        _ => quic_session(&server.certs(), server.addr("quic"), name).await,
    }
}

async fn subscribe(session: &dyn Session, consumer_id: &str) -> UpdateStream {
    let mut stream = session
        .subscribe(SubscribeRequest {
            consumer_id: consumer_id.to_owned(),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap();
    until_synced(&mut stream).await;
    stream
}

async fn next_put(stream: &mut UpdateStream) -> WorkerUpdate {
    loop {
        let update = next_update(stream).await;
        if update.kind == UpdateKind::Put as i32 {
            return update;
        }
    }
}

fn ack(consumer_id: &str, update: &WorkerUpdate, error: Option<&str>) -> AckRequest {
    AckRequest {
        consumer_id: consumer_id.to_owned(),
        worker_name: update.worker_name.clone(),
        revision: update.revision,
        applied: error.is_none(),
        error: error.unwrap_or_default().to_owned(),
    }
}

async fn acks_on_a_stream(transport: &str) {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    workerpush::tls::generate(&workerpush::tls::PkiRequest {
        out: server.certs(),
        clients: vec!["consumer-2".into()],
        ..workerpush::tls::PkiRequest::default()
    })
    .unwrap();
    let (_, token) = server.secrets();
    let http = server.addr("http");
    let session = connect(transport, &server, "consumer-1").await;
    let other = connect(transport, &server, "consumer-2").await;
    let mut a = subscribe(&*session, "consumer-1/a").await;
    let mut b = subscribe(&*session, "consumer-1/b").await;
    let mut c = subscribe(&*other, "consumer-2").await;

    // One batch carries an ack and a nack; the other identity's stream acks on its own.
    let started = Instant::now();
    let upload = {
        let (at, token) = (server.addr("upload"), token.clone());
        tokio::spawn(async move { upload_with(at, &token, "?wait=5s", "app", "1", b"v1").await })
    };
    let (put_a, put_b, put_c) = (
        next_put(&mut a).await,
        next_put(&mut b).await,
        next_put(&mut c).await,
    );
    other
        .ack_batch(vec![ack("consumer-2", &put_c, None)])
        .await
        .unwrap();
    session
        .ack_batch(vec![
            ack("consumer-1/a", &put_a, None),
            ack("consumer-1/b", &put_b, Some("syntax error")),
        ])
        .await
        .unwrap();
    let (status, answer) = upload.await.unwrap();
    assert_eq!(status, 201, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "?wait ended on the streamed acks, not at its deadline: {answer}"
    );
    let propagation = &answer["propagation"];
    assert_eq!(propagation["state"], "failed", "{answer}");
    assert_eq!(ids(&propagation["acked"]), ["consumer-1/a", "consumer-2"]);
    assert_eq!(ids(&propagation["failed"]), ["consumer-1/b"]);
    assert_eq!(propagation["failed"][0]["reason"], "syntax error");
    let (status, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(status, 200, "{worker}");
    assert_eq!(
        worker["propagation"], *propagation,
        "the admin API says the same"
    );

    // Another identity's consumer id on consumer-1's stream: PERMISSION_DENIED, and nothing
    // else suffers — not the subscriptions on that connection, nor consumer-2's ack stream.
    let refused = session
        .ack_batch(vec![ack("consumer-2", &put_c, None)])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ClientError::Status { code: 7, .. }),
        "{refused:?}"
    );
    // Over the batch limit: refused whole, by name.
    let flood = vec![ack("consumer-1/a", &put_a, None); MAX_ACKS_PER_BATCH + 1];
    let refused = session.ack_batch(flood).await.unwrap_err();
    match &refused {
        ClientError::Status { code: 8, message } => {
            assert!(message.contains("1024"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let (status, answer) = upload_with(server.addr("upload"), &token, "", "app", "2", b"v2").await;
    assert_eq!(status, 201, "{answer}");
    let (put_a, put_b, put_c) = (
        next_put(&mut a).await,
        next_put(&mut b).await,
        next_put(&mut c).await,
    );
    assert_eq!(put_a.version, "2");
    other
        .ack_batch(vec![ack("consumer-2", &put_c, None)])
        .await
        .unwrap();
    // A full batch goes through (the same ack many times is recorded once).
    let mut full = vec![ack("consumer-1/a", &put_a, None); MAX_ACKS_PER_BATCH - 1];
    full.push(ack("consumer-1/b", &put_b, None));
    session.ack_batch(full).await.unwrap();
    until(Duration::from_secs(5), "version 2 acked by all", || async {
        let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
        worker["version"] == "2" && worker["propagation"]["state"] == "complete"
    })
    .await;
    let (_, worker) = admin_get(http, Some(&token), "/v1/workers/app").await;
    assert_eq!(
        ids(&worker["propagation"]["acked"]),
        ["consumer-1/a", "consumer-1/b", "consumer-2"],
        "{worker}"
    );
}

#[tokio::test]
async fn grpc_acks_on_a_stream_show_in_propagation_and_refusals_stay_on_their_stream() {
    acks_on_a_stream("grpc").await;
}

#[tokio::test]
async fn quic_acks_on_a_stream_show_in_propagation_and_refusals_stay_on_their_stream() {
    acks_on_a_stream("quic").await;
}

// The server is stopped by a blocking wait while the clients' connections stay driven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_ack_streams_do_not_hold_a_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &["--grace", "30s"]);
    let mut sessions = Vec::new();
    for transport in ["grpc", "quic"] {
        let session = connect(transport, &server, "consumer-1").await;
        let first = AckRequest {
            worker_name: "app".into(),
            revision: 1,
            applied: true,
            ..AckRequest::default()
        };
        session.ack_batch(vec![first.clone()]).await.unwrap();
        sessions.push((transport, session, first));
    }
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(25)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the drain waited on ack streams: {:?}",
        started.elapsed()
    );
    for (transport, session, ack) in sessions {
        let ended = session.ack_batch(vec![ack]).await.unwrap_err();
        assert!(ended.is_retryable(), "{transport}: {ended:?}");
    }
}
