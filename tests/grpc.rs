//! The core over mutual-TLS gRPC, end to end against the real binary: delivery, filters,
//! resume, RESET, deletes, durability across `kill -9`, identity, and bad certificates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use workerpush::{
    client::ClientError,
    pb::{FetchWorkerRequest, ListWorkersRequest, SubscribeRequest, UpdateKind, WorkerUpdate},
    tls::{self, ClientTlsPurpose, TestPki},
};

fn kind(update: &WorkerUpdate) -> UpdateKind {
    UpdateKind::try_from(update.kind).unwrap()
}

fn subscribe(workers: &[&str], epoch: &str, resume: u64) -> SubscribeRequest {
    SubscribeRequest {
        consumer_id: String::new(),
        worker_names: workers.iter().map(|s| (*s).to_owned()).collect(),
        resume_revision: resume,
        epoch: epoch.to_owned(),
    }
}

#[tokio::test]
async fn subscribers_get_exactly_their_changes_with_verified_code() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--inline-code-max-bytes", "4096"]);
    let (secret, _) = server.secrets();
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let mut all = session.subscribe(subscribe(&[], "", 0)).await.unwrap();
    let mut only_a = session.subscribe(subscribe(&["a"], "", 0)).await.unwrap();
    until_synced(&mut all).await;
    until_synced(&mut only_a).await;

    let big = vec![b'x'; 100_000];
    for (worker, version, code) in [
        ("a", "1", &b"a-one"[..]),
        ("b", "1", b"b-one"),
        ("a", "2", &big),
    ] {
        let (status, body) = hook_put(server.addr("http"), &secret, worker, version, code).await;
        assert_eq!(status, 201, "{body}");
    }
    let seen: Vec<_> = [
        next_update(&mut all).await,
        next_update(&mut all).await,
        next_update(&mut all).await,
    ]
    .to_vec();
    assert_eq!(
        seen.iter()
            .map(|u| (u.worker_name.as_str(), u.version.as_str(), u.revision))
            .collect::<Vec<_>>(),
        [("a", "1", 1), ("b", "1", 2), ("a", "2", 3)]
    );
    assert_eq!(seen[0].worker_code, &b"a-one"[..]);
    assert_eq!(seen[0].checksum, sha256(b"a-one"));
    assert!(
        seen[2].worker_code.is_empty(),
        "over the inline limit: fetch it"
    );
    assert_eq!(seen[2].size, 100_000);

    let a1 = next_update(&mut only_a).await;
    let a2 = next_update(&mut only_a).await;
    assert_eq!((a1.revision, a2.revision), (1, 3));

    let (checksum, code) = session
        .fetch(FetchWorkerRequest {
            worker_name: "a".into(),
            version: "2".into(),
        })
        .await
        .unwrap();
    assert_eq!(checksum, sha256(&big));
    assert_eq!(sha256(&code), seen[2].checksum);
    assert_eq!(code.len(), big.len());

    let listing = session.list(ListWorkersRequest::default()).await.unwrap();
    assert_eq!(listing.revision, 3);
    assert_eq!(
        listing
            .workers
            .iter()
            .map(|w| (w.worker_name.as_str(), w.version.as_str()))
            .collect::<Vec<_>>(),
        [("b", "1"), ("a", "2")]
    );
    assert!(listing.workers.iter().all(|w| w.worker_code.is_empty()));
}

#[tokio::test]
async fn resume_replays_missed_changes_and_stale_positions_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--retain-changes", "8"]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    hook_put(http, &secret, "a", "1", b"a1").await;
    let mut stream = session.subscribe(subscribe(&[], "", 0)).await.unwrap();
    let (snapshot, head) = until_synced(&mut stream).await;
    assert_eq!(
        (snapshot.len(), head),
        (2, 1),
        "RESET + one PUT, SYNCED at 1"
    );
    let epoch = snapshot[0].epoch.clone();
    drop(stream);

    for i in 2..=6 {
        hook_put(
            http,
            &secret,
            "a",
            &i.to_string(),
            format!("a{i}").as_bytes(),
        )
        .await;
    }
    let mut resumed = session.subscribe(subscribe(&[], &epoch, 1)).await.unwrap();
    let (replayed, synced) = until_synced(&mut resumed).await;
    assert_eq!(
        replayed.iter().map(|u| u.revision).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6]
    );
    assert!(
        replayed
            .iter()
            .all(|u| kind(u) == UpdateKind::Put && u.epoch == epoch)
    );
    assert_eq!(synced, 6);

    for (bad_epoch, revision) in [("not-the-epoch", 3), (epoch.as_str(), 1)] {
        for i in 7..=16 {
            hook_put(http, &secret, "b", &format!("{bad_epoch}-{i}"), b"b").await;
        }
        let mut stale = session
            .subscribe(subscribe(&[], bad_epoch, revision))
            .await
            .unwrap();
        let (updates, _) = until_synced(&mut stale).await;
        assert_eq!(kind(&updates[0]), UpdateKind::Reset);
        let state: BTreeMap<_, _> = updates[1..]
            .iter()
            .map(|u| (u.worker_name.clone(), u.version.clone()))
            .collect();
        assert_eq!(state.len(), 2);
        assert_eq!(state["a"], "6");
    }
}

#[tokio::test]
async fn deleted_worker_disappears_for_a_consumer_that_was_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    hook_put(http, &secret, "a", "1", b"a").await;
    hook_put(http, &secret, "b", "1", b"b").await;
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let mut stream = session.subscribe(subscribe(&[], "", 0)).await.unwrap();
    let (snapshot, head) = until_synced(&mut stream).await;
    let epoch = snapshot[0].epoch.clone();
    drop(stream);
    let (status, body) = hook_delete(http, &secret, "a").await;
    assert_eq!(status, 200, "{body}");
    let mut resumed = session
        .subscribe(subscribe(&[], &epoch, head))
        .await
        .unwrap();
    let (updates, _) = until_synced(&mut resumed).await;
    assert_eq!(updates.len(), 1);
    assert_eq!(
        (
            kind(&updates[0]),
            updates[0].worker_name.as_str(),
            updates[0].version.as_str()
        ),
        (UpdateKind::Delete, "a", "1")
    );
    assert_eq!(hook_delete(http, &secret, "a").await.0, 404);
}

#[tokio::test]
async fn accepted_changes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::serve_dev(dir.path(), &[]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let mut accepted = Vec::new();
    for i in 0..20 {
        let (status, body) = hook_put(
            http,
            &secret,
            &format!("w{}", i % 5),
            &i.to_string(),
            format!("code {i}").as_bytes(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        accepted.push(body);
    }
    let epoch = accepted[0]["epoch"].as_str().unwrap().to_owned();
    server.kill9();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let listing = session.list(ListWorkersRequest::default()).await.unwrap();
    assert_eq!(listing.epoch, epoch, "same epoch after kill -9");
    assert_eq!(listing.revision, 20);
    let versions: BTreeMap<_, _> = listing
        .workers
        .iter()
        .map(|w| (w.worker_name.clone(), (w.version.clone(), w.revision)))
        .collect();
    for i in 15..20u64 {
        assert_eq!(versions[&format!("w{}", i % 5)], (i.to_string(), i + 1));
    }
    // Revisions are never reused: the next change follows 20.
    let (status, body) = hook_put(server.addr("http"), &secret, "w0", "new", b"new").await;
    assert_eq!((status, body["revision"].as_u64()), (201, Some(21)));
    let (_, code) = session
        .fetch(FetchWorkerRequest {
            worker_name: "w3".into(),
            version: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(code, &b"code 18"[..]);
}

#[tokio::test]
async fn identities_are_bound_to_certificates_and_bad_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &[]);
    let certs = server.certs();
    let grpc = server.addr("grpc");
    let session = grpc_session(&certs, grpc, "consumer-1").await;
    let mut request = subscribe(&[], "", 0);
    request.consumer_id = "consumer-2".into();
    match session.subscribe(request).await {
        Err(ClientError::Status { code, .. }) => assert_eq!(code, 7, "PERMISSION_DENIED"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("another identity's consumer_id must be refused"),
    }
    let mut suffixed = subscribe(&[], "", 0);
    suffixed.consumer_id = "consumer-1/shard-2".into();
    let mut ok = session.subscribe(suffixed).await.unwrap();
    until_synced(&mut ok).await;

    tls::install_crypto_provider();
    let pki = TestPki::new();
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let ca_cert = String::from_utf8(ca.clone()).unwrap();
    let ca_key = std::fs::read_to_string(certs.join("ca-key.pem")).unwrap();
    let other = TestPki::invalid_client_from_other_ca("consumer-1");
    let cases: Vec<(&str, Option<(String, String)>)> = vec![
        ("no client certificate", None),
        ("another CA", Some(other)),
        ("CA certificate as leaf", Some((ca_cert, ca_key))),
        (
            "self-signed",
            Some(TestPki::invalid_client_self_signed("consumer-1")),
        ),
        ("test CA unknown to server", Some(pki.client("consumer-1"))),
    ];
    for (case, identity) in cases {
        let config = match &identity {
            Some((cert, key)) => tls::client_config_from_pem(
                &ca,
                cert.as_bytes(),
                key.as_bytes(),
                ClientTlsPurpose::Grpc,
            )
            .unwrap(),
            None => no_client_cert_config(&ca),
        };
        let transport =
            workerpush::client::GrpcTransport::new(&format!("localhost:{}", grpc.port()), config)
                .unwrap();
        let refused = match workerpush::client::Transport::connect(&transport).await {
            Err(_) => true,
            // With TLS 1.3 the refusal may only show on the first call.
            Ok(session) => session.list(ListWorkersRequest::default()).await.is_err(),
        };
        assert!(refused, "{case}: must be refused");
    }
    // The server kept serving the valid client throughout.
    assert!(session.list(ListWorkersRequest::default()).await.is_ok());
}

fn no_client_cert_config(ca: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    std::sync::Arc::new(config)
}

#[tokio::test]
async fn stream_limit_answers_resource_exhausted_and_frees_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--grpc-max-streams", "2"]);
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let mut first = session.subscribe(subscribe(&[], "", 0)).await.unwrap();
    let mut second = session.subscribe(subscribe(&[], "", 0)).await.unwrap();
    until_synced(&mut first).await;
    until_synced(&mut second).await;
    match session.subscribe(subscribe(&[], "", 0)).await {
        Err(ClientError::Status { code, .. }) => assert_eq!(code, 8, "RESOURCE_EXHAUSTED"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a third stream must be refused"),
    }
    drop(first);
    // The freed slot is reusable once the server sees the stream go.
    let mut third = None;
    for _ in 0..100 {
        if let Ok(stream) = session.subscribe(subscribe(&[], "", 0)).await {
            third = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_synced(
        third
            .as_mut()
            .expect("slot freed after the first stream closed"),
    )
    .await;
}
