//! Authorization and certificate lifecycle against the real binary, over gRPC and QUIC: the ACL
//! (what an identity may see, reloaded live), certificate rotation under load, and revocation
//! that refuses new handshakes and cuts live streams.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use futures_util::StreamExt;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use workerpush::{
    client::{ClientError, Session, Transport, UpdateStream},
    pb::{
        AckRequest, FetchWorkerRequest, ListWorkersRequest, SubscribeRequest, UpdateKind,
        WorkerUpdate,
    },
    tls::{self, ClientTlsPurpose, PkiRequest, TestPki},
};

/// Every wait here is bounded by this, except where the test promises less.
const WAIT: Duration = Duration::from_secs(10);

/// The next put or delete, skipping progress markers.
async fn next_change(stream: &mut UpdateStream) -> WorkerUpdate {
    loop {
        let update = next_update(stream).await;
        if update.kind != UpdateKind::Synced as i32 {
            return update;
        }
    }
}

fn subscribe(workers: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        worker_names: workers.iter().map(|s| (*s).to_owned()).collect(),
        ..SubscribeRequest::default()
    }
}

fn names(updates: &[WorkerUpdate]) -> Vec<&str> {
    updates.iter().map(|u| u.worker_name.as_str()).collect()
}

/// The status code of a refusal.
fn code<T>(result: Result<T, ClientError>) -> i32 {
    match result {
        Err(ClientError::Status { code, .. }) => code,
        Err(other) => panic!("expected a status, got {other}"),
        Ok(_) => panic!("expected a refusal"),
    }
}

/// Replaces a file the way operators (and `workerpush certs`) do: write aside, rename over.
fn write_atomic(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp-test");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_client(certs: &Path, name: &str, (cert, key): &(String, String)) {
    std::fs::write(certs.join(format!("clients/{name}.pem")), cert).unwrap();
    std::fs::write(certs.join(format!("clients/{name}-key.pem")), key).unwrap();
}

async fn sessions(server: &TestServer, name: &str) -> [(&'static str, Box<dyn Session>); 2] {
    let certs = server.certs();
    [
        (
            "grpc",
            grpc_session(&certs, server.addr("grpc"), name).await,
        ),
        (
            "quic",
            quic_session(&certs, server.addr("quic"), name).await,
        ),
    ]
}

fn fetch(worker: &str) -> FetchWorkerRequest {
    FetchWorkerRequest {
        worker_name: worker.to_owned(),
        version: String::new(),
    }
}

#[tokio::test]
async fn consumer_allowed_shop_workers_never_hears_of_admin_panel_over_grpc_or_quic() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "# shop edge\nconsumer-1: shop-*\n").unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--acl-file", acl.to_str().unwrap()]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    for (worker, code) in [("shop-cart", "cart 1"), ("admin-panel", "admin 1")] {
        let (status, body) = hook_put(http, &secret, worker, "1", code.as_bytes()).await;
        assert_eq!(status, 201, "{body}");
    }

    let mut live = Vec::new();
    for (transport, session) in sessions(&server, "consumer-1").await {
        let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
        let (snapshot, _) = until_synced(&mut stream).await;
        assert_eq!(names(&snapshot[1..]), ["shop-cart"], "{transport} snapshot");
        let listing = session.list(ListWorkersRequest::default()).await.unwrap();
        assert_eq!(names(&listing.workers), ["shop-cart"], "{transport} list");
        let (_, code_bytes) = session.fetch(fetch("shop-cart")).await.unwrap();
        assert_eq!(code_bytes, &b"cart 1"[..]);
        assert_eq!(
            code(session.fetch(fetch("shop-gone")).await),
            5,
            "{transport}"
        );

        // Asking for a worker outside the rights is refused the same whether it exists or not.
        for asked in [
            &["admin-panel"][..],
            &["shop-cart", "admin-panel"],
            &["nope"],
        ] {
            let refused = session.subscribe(subscribe(asked)).await;
            assert_eq!(code(refused), 7, "{transport} subscribe {asked:?}");
            let request = ListWorkersRequest {
                worker_names: asked.iter().map(|s| (*s).to_owned()).collect(),
            };
            assert_eq!(code(session.list(request).await), 7, "{transport} list");
        }
        for worker in ["admin-panel", "nope"] {
            assert_eq!(code(session.fetch(fetch(worker)).await), 7, "{transport}");
            let ack = AckRequest {
                worker_name: worker.to_owned(),
                revision: 2,
                applied: true,
                ..AckRequest::default()
            };
            assert_eq!(code(session.ack(ack).await), 7, "{transport} ack");
        }
        live.push((transport, session, stream));
    }

    // Live: the admin-panel changes around shop-cart's never arrive.
    for (worker, version) in [
        ("admin-panel", "2"),
        ("shop-cart", "2"),
        ("admin-panel", "3"),
    ] {
        let (status, body) = hook_put(http, &secret, worker, version, version.as_bytes()).await;
        assert_eq!(status, 201, "{body}");
    }
    hook_put(http, &secret, "shop-cart", "3", b"3").await;
    for (transport, _session, stream) in &mut live {
        for version in ["2", "3"] {
            let update = next_change(stream).await;
            assert_eq!(
                (update.worker_name.as_str(), update.version.as_str()),
                ("shop-cart", version),
                "{transport} live"
            );
        }
    }
}

#[tokio::test]
async fn acl_reload_ends_live_subscriptions_whose_rights_changed_and_their_resume_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "consumer-1: shop-*\nconsumer-2: *\n").unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--acl-file",
            acl.to_str().unwrap(),
            "--certs-reload-interval",
            "200ms",
        ],
    );
    tls::generate(&PkiRequest {
        out: server.certs(),
        clients: vec!["consumer-2".into()],
        ..PkiRequest::default()
    })
    .unwrap();
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    hook_put(http, &secret, "shop-cart", "1", b"cart").await;
    hook_put(http, &secret, "admin-panel", "1", b"admin").await;

    let mut shop = Vec::new();
    for (transport, session) in sessions(&server, "consumer-1").await {
        let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
        let (snapshot, head) = until_synced(&mut stream).await;
        assert_eq!(names(&snapshot[1..]), ["shop-cart"]);
        let epoch = snapshot[0].epoch.clone();
        shop.push((transport, session, stream, epoch, head));
    }
    let ops = grpc_session(&server.certs(), server.addr("grpc"), "consumer-2").await;
    let mut ops_stream = ops.subscribe(subscribe(&[])).await.unwrap();
    until_synced(&mut ops_stream).await;

    write_atomic(&acl, "consumer-1: admin-*\nconsumer-2: *\n");
    let changed = Instant::now();
    for (transport, _, stream, _, _) in &mut shop {
        let left = Duration::from_secs(5).saturating_sub(changed.elapsed());
        let ended = tokio::time::timeout(left, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("{transport}: subscription still open 5 s after the ACL change")
            });
        match ended {
            Some(Err(ClientError::Status { code: 7, .. })) => {}
            other => panic!("{transport}: expected PERMISSION_DENIED, got {other:?}"),
        }
    }
    println!(
        "live subscriptions ended {:?} after the ACL change",
        changed.elapsed()
    );

    // An identity whose rights did not change keeps its subscription.
    hook_put(http, &secret, "shop-cart", "2", b"cart 2").await;
    let update = next_change(&mut ops_stream).await;
    assert_eq!(
        (update.worker_name.as_str(), update.version.as_str()),
        ("shop-cart", "2")
    );

    // Resuming from a position delivered under the old rights starts over under the new ones.
    for (transport, session, _, epoch, head) in &shop {
        let resume = SubscribeRequest {
            epoch: epoch.clone(),
            resume_revision: *head,
            ..SubscribeRequest::default()
        };
        let mut stream = session.subscribe(resume).await.unwrap();
        let (snapshot, _) = until_synced(&mut stream).await;
        assert_eq!(snapshot[0].kind, UpdateKind::Reset as i32, "{transport}");
        assert_eq!(names(&snapshot[1..]), ["admin-panel"], "{transport}");
        assert_eq!(code(session.fetch(fetch("shop-cart")).await), 7);
    }
}

/// One connection (a full or resumed handshake) and one call.
async fn connect_and_list(transport: &dyn Transport) -> Result<(), ClientError> {
    let session = transport.connect().await?;
    session.list(ListWorkersRequest::default()).await?;
    Ok(())
}

/// Connects and calls in a loop until `stop`, counting successes and keeping failures.
fn spawn_load(
    name: &'static str,
    transport: Box<dyn Transport>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            match connect_and_list(&*transport).await {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => failures.lock().unwrap().push(format!("{name}: {error}")),
            }
        }
    })
}

/// Waits until the server presents `cert_pem` in a fresh handshake.
async fn until_served(
    grpc: std::net::SocketAddr,
    client: Arc<rustls::ClientConfig>,
    cert_pem: &str,
) {
    let expected = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let tcp = tokio::net::TcpStream::connect(grpc).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        if served == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "new server certificate not served in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_handshake() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let pki = TestPki::new();
    pki.write_to(&certs).unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--certs-reload-interval", "100ms"]);
    let (grpc, quic) = (server.addr("grpc"), server.addr("quic"));

    // Two server certificates from the same CA, and a second client CA added halfway.
    let servers = [
        (
            pki.server_cert_pem().to_owned(),
            pki.server_key_pem().to_owned(),
        ),
        pki.another_server(),
    ];
    let second_ca = TestPki::new();
    let second_client = second_ca.client("edge-2");
    let second_client_tls = |purpose| {
        tls::client_config_from_pem(
            pki.ca_pem().as_bytes(),
            second_client.0.as_bytes(),
            second_client.1.as_bytes(),
            purpose,
        )
        .unwrap()
    };
    let second_grpc = || {
        workerpush::client::GrpcTransport::new(
            &format!("localhost:{}", grpc.port()),
            second_client_tls(ClientTlsPurpose::Grpc),
        )
        .unwrap()
    };
    assert!(
        connect_and_list(&second_grpc()).await.is_err(),
        "a client of the second CA is refused before the bundle has it"
    );
    let probe = client_tls(&certs, "consumer-1", ClientTlsPurpose::Grpc);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load = |name, transport: Box<dyn Transport>| {
        spawn_load(name, transport, stop.clone(), ok.clone(), failures.clone())
    };
    let mut tasks = vec![
        load("grpc", Box::new(grpc_transport(&certs, grpc, "consumer-1"))),
        load("quic", Box::new(quic_transport(&certs, quic, "consumer-1"))),
    ];
    let started = Instant::now();
    for rotation in 0..10 {
        let (cert, key) = &servers[(rotation + 1) % 2];
        if rotation == 5 {
            write_atomic(
                &certs.join("ca.pem"),
                &format!("{}{}", pki.ca_pem(), second_ca.ca_pem()),
            );
        }
        // Key first: until the certificate follows, the pair does not match, the reload
        // fails, and the old pair keeps serving.
        write_atomic(&certs.join("server-key.pem"), key);
        write_atomic(&certs.join("server.pem"), cert);
        until_served(grpc, probe.clone(), cert).await;
        if rotation == 5 {
            tasks.push(load("second CA over grpc", Box::new(second_grpc())));
            let quic_transport = workerpush::client::QuicTransport::new(
                &format!("localhost:{}", quic.port()),
                second_client_tls(ClientTlsPurpose::Quic),
            )
            .unwrap();
            tasks.push(load("second CA over quic", Box::new(quic_transport)));
        }
        // Let the load run against this certificate for a while.
        let target = ok.load(Ordering::Relaxed) + 6;
        let deadline = Instant::now() + WAIT;
        while ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    println!(
        "10 rotations in {:?}: {} connections, {} failed",
        started.elapsed(),
        ok.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "failed handshakes or calls: {failures:?}"
    );
}

#[tokio::test]
async fn revoked_client_is_cut_within_5s_and_refused_while_others_stay() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let pki = TestPki::new();
    pki.write_to(&certs).unwrap();
    let doomed = pki.client("consumer-2");
    write_client(&certs, "consumer-2", &doomed);
    let crl = certs.join("crl.pem");
    std::fs::write(&crl, pki.crl(&[], 1)).unwrap();
    let server = TestServer::serve_dev(
        dir.path(),
        &[
            "--crl-file",
            crl.to_str().unwrap(),
            "--certs-reload-interval",
            "1s",
        ],
    );
    let (secret, _) = server.secrets();

    let mut kept = Vec::new();
    for (transport, session) in sessions(&server, "consumer-1").await {
        let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
        until_synced(&mut stream).await;
        kept.push((transport, session, stream));
    }
    let mut cut = Vec::new();
    for (transport, session) in sessions(&server, "consumer-2").await {
        let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
        until_synced(&mut stream).await;
        cut.push((transport, session, stream));
    }

    write_atomic(&crl, &pki.crl(&[&doomed.0], 2));
    let revoked = Instant::now();
    for (transport, _, stream) in &mut cut {
        let left = Duration::from_secs(5).saturating_sub(revoked.elapsed());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(None | Some(Err(_))) => {}
            Ok(Some(Ok(update))) => panic!("{transport}: revoked client got {update:?}"),
            Err(_) => panic!("{transport}: revoked client still subscribed after 5 s"),
        }
    }
    println!(
        "revoked streams cut {:?} after the CRL change",
        revoked.elapsed()
    );

    // Reconnecting with the revoked certificate is refused on both transports.
    let grpc_again = grpc_transport(&certs, server.addr("grpc"), "consumer-2");
    assert!(
        connect_and_list(&grpc_again).await.is_err(),
        "grpc reconnect"
    );
    let quic_again = quic_transport(&certs, server.addr("quic"), "consumer-2");
    assert!(
        connect_and_list(&quic_again).await.is_err(),
        "quic reconnect"
    );

    // The other client never noticed.
    let (status, body) = hook_put(server.addr("http"), &secret, "after", "1", b"x").await;
    assert_eq!(status, 201, "{body}");
    for (transport, session, stream) in &mut kept {
        let update = next_change(stream).await;
        assert_eq!(update.worker_name, "after", "{transport}");
        session.list(ListWorkersRequest::default()).await.unwrap();
    }
}
