//! A subscriber that stops reading while 10,000 changes are published ends, once it reads
//! again, with exactly the latest state, and it never held up the others. Real gRPC over
//! mutual TLS, an in-process core on port 0 over the embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use workerpush::{
    client::{GrpcTransport, Transport},
    core::{Core, CoreConfig, Version, WorkerFilter, WorkerName},
    grpc::{self, GrpcLimits},
    pb::{SubscribeRequest, UpdateKind},
    store::FileStore,
    tls::{self, ClientTlsPurpose, ServerTls, TestPki},
};

const CHANGES: u64 = 10_000;
const WORKERS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_converges_and_never_delays_the_others() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    pki.write_to(&dir.path().join("certs")).unwrap();
    let server_tls = ServerTls::load(&dir.path().join("certs")).unwrap();
    let store = FileStore::open(&dir.path().join("data"), 2_000)
        .await
        .unwrap();
    let config = CoreConfig {
        retain_changes: 2_000,
        ..CoreConfig::default()
    };
    let core = Core::open(Arc::new(store), config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(grpc::serve(
        listener,
        server_tls.grpc_config(),
        core.clone(),
        workerpush::requests::Access::allow_all(),
        GrpcLimits::default(),
        stop.clone(),
    ));

    let (cert, key) = pki.client("consumer-1");
    let client_tls = tls::client_config_from_pem(
        pki.ca_pem().as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        ClientTlsPurpose::Grpc,
    )
    .unwrap();
    let transport = GrpcTransport::new(&format!("localhost:{}", addr.port()), client_tls).unwrap();
    let subscribe = || SubscribeRequest {
        consumer_id: String::new(),
        worker_names: vec![],
        resume_revision: 0,
        epoch: String::new(),
    };

    // Separate connections, as separate edge hosts would have.
    let stalled_session = transport.connect().await.unwrap();
    let mut stalled = stalled_session.subscribe(subscribe()).await.unwrap();
    let live_session = transport.connect().await.unwrap();
    let mut live = live_session.subscribe(subscribe()).await.unwrap();
    for stream in [&mut stalled, &mut live] {
        let reset = stream.next().await.unwrap().unwrap();
        assert_eq!(reset.kind, UpdateKind::Reset as i32);
        assert_eq!(
            stream.next().await.unwrap().unwrap().kind,
            UpdateKind::Synced as i32
        );
    }

    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < CHANGES {
            let update = live.next().await.unwrap().unwrap();
            assert_eq!(update.revision, last + 1, "every change, in order");
            last = update.revision;
        }
        live
    });
    let publishers: Vec<_> = (0..32)
        .map(|p| {
            let core = core.clone();
            tokio::spawn(async move {
                for i in (p..CHANGES).step_by(32) {
                    let worker = WorkerName::parse(&format!("w{}", i % WORKERS)).unwrap();
                    let code = Bytes::from(format!("export default {i}; // {}", "x".repeat(200)));
                    core.publish(
                        worker,
                        Version::parse(&format!("v{i}")).unwrap(),
                        code,
                        None,
                    )
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    // The live reader got all 10,000 while the stalled one has not read anything since SYNCED.
    let _live = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("live reader not delayed")
        .unwrap();

    // Now the stalled reader reads again: replay or RESET + snapshot, ending at the head.
    let mut state: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut synced_at = 0;
    while synced_at < CHANGES {
        let update = tokio::time::timeout(Duration::from_secs(30), stalled.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match UpdateKind::try_from(update.kind).unwrap() {
            UpdateKind::Reset => state.clear(),
            UpdateKind::Put => {
                assert_eq!(
                    workerpush::core::Checksum::of(&update.worker_code).as_str(),
                    update.checksum
                );
                state.insert(update.worker_name, (update.version, update.checksum));
            }
            UpdateKind::Delete => {
                state.remove(&update.worker_name);
            }
            UpdateKind::Synced => synced_at = update.revision,
            UpdateKind::Unspecified => panic!("unspecified update"),
        }
    }
    let expected: BTreeMap<_, _> = core
        .list(&WorkerFilter::all())
        .workers
        .into_iter()
        .map(|w| (w.worker_name, (w.version, w.checksum)))
        .collect();
    assert_eq!(state.len(), WORKERS as usize);
    assert_eq!(state, expected);

    stop.cancel();
    core.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
