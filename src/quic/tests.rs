//! The QUIC server and client over real sockets on 127.0.0.1:0: a core over a memory store,
//! certificates from [`TestPki`], raw quinn clients for what the client library would never
//! send, and [`QuicTransport`] for the rest.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use tokio::{net::UdpSocket, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    QuicLimits, ResetSecret,
    codec::{MAX_FRAME_BYTES, encode_frame},
    frames::FrameReader,
    serve,
};
use crate::{
    client::{
        ClientError, Consumer, ConsumerOptions, Handler, Position, QuicTransport, Transport,
        UpdateStream,
    },
    core::{Checksum, Core, CoreConfig, PublishError, Version, WorkerFilter, WorkerName},
    faults::udp::{LinkProfile, LinkStats, UdpProxy},
    pb::{
        AckRequest, FetchWorkerRequest, ListWorkersRequest, QuicRequest, QuicResponse,
        RegisterRequest, Status, SubscribeRequest, UpdateKind, WorkerChunk, WorkerUpdate,
        quic_request::Request, quic_response::Response,
    },
    store::MemoryStore,
    tls::{self, ClientTlsPurpose, ServerTls, TestPki},
};

/// Every wait in these tests is bounded by this.
const WAIT: Duration = Duration::from_secs(10);

struct TestServer {
    addr: SocketAddr,
    core: Arc<Core>,
    pki: TestPki,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
    _certs: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(CoreConfig::default(), QuicLimits::default()).await
    }

    async fn start_with(config: CoreConfig, limits: QuicLimits) -> Self {
        tls::install_crypto_provider();
        let pki = TestPki::new();
        let certs = tempfile::tempdir().unwrap();
        pki.write_to(certs.path()).unwrap();
        let server_tls = ServerTls::load(certs.path()).unwrap();
        let store = Arc::new(MemoryStore::new(config.retain_changes));
        let core = Core::open(store, config).await.unwrap();
        // Bound before `serve` starts: datagrams sent meanwhile wait in the socket.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            socket,
            server_tls.quic_config(),
            core.clone(),
            crate::requests::Access::allow_all(),
            limits,
            shutdown.clone(),
        ));
        Self {
            addr,
            core,
            pki,
            shutdown,
            task,
            _certs: certs,
        }
    }

    fn client_tls(&self, name: &str) -> Arc<rustls::ClientConfig> {
        let (cert, key) = self.pki.client(name);
        quic_client_tls(&self.pki, &cert, &key)
    }

    fn transport(&self, name: &str) -> QuicTransport {
        QuicTransport::new(&self.addr.to_string(), self.client_tls(name)).unwrap()
    }

    async fn connect(&self, name: &str) -> RawClient {
        RawClient::connect(self.addr, self.client_tls(name))
            .await
            .unwrap()
    }

    async fn put(&self, worker: &str, version: &str, code: impl Into<Bytes>) -> u64 {
        self.core
            .publish(
                WorkerName::parse(worker).unwrap(),
                Version::parse(version).unwrap(),
                code.into(),
                None,
            )
            .await
            .unwrap()
            .revision
    }

    /// Drains the server and checks that it stops in time.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("QUIC server stops within its drain bound")
            .unwrap()
            .unwrap();
        self.core.shutdown().await;
    }
}

fn quic_client_tls(pki: &TestPki, cert: &str, key: &str) -> Arc<rustls::ClientConfig> {
    tls::client_config_from_pem(
        pki.ca_pem().as_bytes(),
        cert.as_bytes(),
        key.as_bytes(),
        ClientTlsPurpose::Quic,
    )
    .unwrap()
}

/// A bare quinn client, for bytes the client library would never send.
struct RawClient {
    _endpoint: quinn::Endpoint,
    connection: quinn::Connection,
}

impl RawClient {
    async fn connect(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Self, String> {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let connecting = endpoint
            .connect_with(config, addr, "localhost")
            .map_err(|e| e.to_string())?;
        let connection = tokio::time::timeout(WAIT, connecting)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok(Self {
            _endpoint: endpoint,
            connection,
        })
    }

    /// Opens a stream and writes `bytes` (then FIN, if `finish`). The send side is returned
    /// because dropping it would finish the stream.
    async fn send(
        &self,
        bytes: &[u8],
        finish: bool,
    ) -> Result<(quinn::SendStream, FrameReader), String> {
        let (mut send, recv) = self.connection.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(bytes).await.map_err(|e| e.to_string())?;
        if finish {
            send.finish().map_err(|e| e.to_string())?;
        }
        Ok((send, FrameReader::new(recv, MAX_FRAME_BYTES)))
    }

    async fn request(&self, request: Request) -> FrameReader {
        let frame = encode_frame(&QuicRequest {
            request: Some(request),
        });
        self.send(&frame, true).await.unwrap().1
    }
}

/// The next frame's response, or `None` when the server finished the stream.
async fn next(frames: &mut FrameReader) -> Option<Response> {
    tokio::time::timeout(WAIT, frames.next::<QuicResponse>())
        .await
        .expect("a frame within the wait")
        .expect("a valid frame")
        .map(|frame| frame.response.expect("a response in the frame"))
}

async fn next_update(frames: &mut FrameReader) -> WorkerUpdate {
    match next(frames).await {
        Some(Response::Update(update)) => update,
        other => panic!("expected an update, got {other:?}"),
    }
}

/// The stream's last words: an error frame, then the finish.
async fn refusal(frames: &mut FrameReader) -> Status {
    let status = match next(frames).await {
        Some(Response::Error(status)) => status,
        other => panic!("expected an error frame, got {other:?}"),
    };
    assert_eq!(
        next(frames).await,
        None,
        "the stream finishes after an error"
    );
    status
}

async fn stream_next(stream: &mut UpdateStream) -> WorkerUpdate {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an update within the wait")
        .expect("the subscription goes on")
        .expect("an update, not an error")
}

fn kind(update: &WorkerUpdate) -> UpdateKind {
    UpdateKind::try_from(update.kind).unwrap()
}

fn subscribe(workers: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        worker_names: workers.iter().map(ToString::to_string).collect(),
        ..SubscribeRequest::default()
    }
}

/// Reads RESET, the snapshot and SYNCED: the snapshot's `(worker, version)`s and SYNCED.
async fn fresh_snapshot(stream: &mut UpdateStream) -> (Vec<(String, String)>, WorkerUpdate) {
    assert_eq!(kind(&stream_next(stream).await), UpdateKind::Reset);
    let mut snapshot = Vec::new();
    loop {
        let update = stream_next(stream).await;
        match kind(&update) {
            UpdateKind::Put => snapshot.push((update.worker_name, update.version)),
            UpdateKind::Synced => return (snapshot, update),
            other => panic!("unexpected {other:?} in a snapshot"),
        }
    }
}

fn pair(worker: &str, version: &str) -> (String, String) {
    (worker.to_owned(), version.to_owned())
}

#[tokio::test]
async fn quic_subscriber_receives_reset_snapshot_synced_then_a_verified_live_put() {
    let server = TestServer::start().await;
    server.put("alpha", "1", "alpha one").await;
    server.put("beta", "1", "beta one").await;
    let session = server.transport("edge").connect().await.unwrap();

    // Two subscriptions with different filters on one connection.
    let mut alpha = session.subscribe(subscribe(&["alpha"])).await.unwrap();
    let mut beta = session.subscribe(subscribe(&["beta"])).await.unwrap();
    let (snapshot, synced) = fresh_snapshot(&mut alpha).await;
    assert_eq!(snapshot, [pair("alpha", "1")]);
    assert_eq!(synced.revision, 2);
    assert_eq!(fresh_snapshot(&mut beta).await.0, [pair("beta", "1")]);

    let code = Bytes::from_static(b"export default { fetch() { return new Response('2') } }");
    let revision = server.put("alpha", "2", code.clone()).await;
    server.put("beta", "2", "beta two").await;
    let live = stream_next(&mut alpha).await;
    assert_eq!(kind(&live), UpdateKind::Put);
    assert_eq!((live.revision, live.version.as_str()), (revision, "2"));
    assert_eq!(live.worker_code, code);
    assert_eq!(live.checksum, Checksum::of(&code).as_str());
    assert_eq!(live.size, code.len() as i64);
    assert_eq!(live.epoch, server.core.epoch().as_str());
    let other = stream_next(&mut beta).await;
    assert_eq!(
        (other.worker_name.as_str(), other.version.as_str()),
        ("beta", "2")
    );

    // The unary requests over the same connection.
    let listed = session.list(ListWorkersRequest::default()).await.unwrap();
    assert_eq!(listed.revision, 4);
    assert_eq!(listed.workers.len(), 2);
    let registered = session
        .register(RegisterRequest {
            endpoint: "10.0.0.7:8787".into(),
            ..RegisterRequest::default()
        })
        .await
        .unwrap();
    assert!(registered.success);
    session
        .ack(AckRequest {
            worker_name: "alpha".into(),
            revision,
            applied: true,
            ..AckRequest::default()
        })
        .await
        .unwrap();
    let consumers = server.core.consumers();
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].last_acked_revision, revision);
    assert_eq!(consumers[0].transport, "quic");
    let (checksum, fetched) = session
        .fetch(FetchWorkerRequest {
            worker_name: "alpha".into(),
            version: "2".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        (checksum.as_str(), &fetched),
        (Checksum::of(&code).as_str(), &code)
    );
    server.stop().await;
}

#[tokio::test]
async fn quic_resume_replays_exactly_the_missed_changes_then_synced() {
    let server = TestServer::start().await;
    server.put("alpha", "1", "a1").await;
    let transport = server.transport("edge");
    let session = transport.connect().await.unwrap();
    let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
    let (_, synced) = fresh_snapshot(&mut stream).await;
    drop(stream);
    drop(session);

    let missed = [
        server.put("alpha", "2", "a2").await,
        server.put("beta", "1", "b1").await,
        server.put("alpha", "3", "a3").await,
    ];
    // Reconnect with the same transport (socket and TLS session cache) and resume.
    let session = transport.connect().await.unwrap();
    let mut stream = session
        .subscribe(SubscribeRequest {
            resume_revision: synced.revision,
            epoch: synced.epoch.clone(),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap();
    let mut replayed = Vec::new();
    for _ in missed {
        let update = stream_next(&mut stream).await;
        assert_eq!(kind(&update), UpdateKind::Put);
        replayed.push(update.revision);
    }
    assert_eq!(replayed, missed);
    let synced = stream_next(&mut stream).await;
    assert_eq!(kind(&synced), UpdateKind::Synced);
    assert_eq!(synced.revision, missed[2]);
    server.stop().await;
}

#[tokio::test]
async fn a_large_fetch_does_not_delay_updates_on_the_same_connection() {
    let config = CoreConfig {
        inline_max_bytes: 1 << 20,
        max_code_bytes: 32 << 20,
        ..CoreConfig::default()
    };
    let server = TestServer::start_with(config, QuicLimits::default()).await;
    let big = Bytes::from(
        (0..20u32 << 20)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>(),
    );
    server.put("big", "1", big.clone()).await;
    let client = server.connect("edge").await;
    let mut updates = client
        .request(Request::Subscribe(subscribe(&["small"])))
        .await;
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Synced);

    let mut fetch = client
        .request(Request::Fetch(FetchWorkerRequest {
            worker_name: "big".into(),
            version: String::new(),
        }))
        .await;
    let mut fetched = Vec::with_capacity(big.len());
    let first = read_chunk(&mut fetch, &mut fetched).await.unwrap();
    assert_eq!(first.size, big.len() as i64);
    assert_eq!(first.checksum, Checksum::of(&big).as_str());

    // Each update arrives while the fetch is read one chunk at a time, far from its end.
    const UPDATES: usize = 8;
    for i in 1..=UPDATES {
        let revision = server
            .put("small", &i.to_string(), format!("small {i}"))
            .await;
        let update = next_update(&mut updates).await;
        assert_eq!(
            (update.revision, kind(&update)),
            (revision, UpdateKind::Put)
        );
        assert!(read_chunk(&mut fetch, &mut fetched).await.is_some());
    }
    assert_eq!(fetched.len(), (UPDATES + 1) * crate::requests::CHUNK_BYTES);
    assert!(fetched.len() < big.len());

    while read_chunk(&mut fetch, &mut fetched).await.is_some() {}
    assert_eq!(fetched.len(), big.len());
    assert!(fetched == big, "the bundle arrives intact");
    server.stop().await;
}

/// Reads one chunk of a fetch into `fetched`; `None` at its end.
async fn read_chunk(fetch: &mut FrameReader, fetched: &mut Vec<u8>) -> Option<WorkerChunk> {
    match next(fetch).await {
        Some(Response::Chunk(chunk)) => {
            assert_eq!(chunk.offset as usize, fetched.len());
            fetched.extend_from_slice(&chunk.data);
            Some(chunk)
        }
        None => None,
        other => panic!("expected a chunk, got {other:?}"),
    }
}

fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(value, &mut out);
    out
}

/// rustls's in-memory session cache, counting the TLS 1.3 tickets handed out for resumption.
#[derive(Debug)]
struct CountingSessions {
    inner: rustls::client::ClientSessionMemoryCache,
    resumed: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingSessions {
    fn set_kx_hint(&self, name: rustls::pki_types::ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &rustls::pki_types::ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }

    fn set_tls12_session(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value);
    }

    fn tls12_session(
        &self,
        name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(
        &self,
        name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inner.insert_tls13_ticket(name, value);
    }

    fn take_tls13_ticket(
        &self,
        name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let ticket = self.inner.take_tls13_ticket(name);
        if ticket.is_some() {
            self.resumed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ticket
    }
}

#[tokio::test]
async fn reconnects_of_one_quic_transport_resume_the_tls_session() {
    let server = TestServer::start().await;
    let sessions = Arc::new(CountingSessions {
        inner: rustls::client::ClientSessionMemoryCache::new(32),
        resumed: 0.into(),
    });
    let mut config = (*server.client_tls("edge")).clone();
    config.resumption = rustls::client::Resumption::store(sessions.clone());
    let transport = QuicTransport::new(&server.addr.to_string(), Arc::new(config)).unwrap();
    for attempt in 0..3 {
        let session = transport.connect().await.unwrap();
        // An answer means the handshake is done and its ticket has arrived.
        session.list(ListWorkersRequest::default()).await.unwrap();
        let resumed = sessions.resumed.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            resumed, attempt,
            "connection {attempt} resumed the previous session"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn garbage_on_a_stream_gets_invalid_argument_there_and_the_connection_goes_on() {
    let server = TestServer::start().await;
    server.put("alpha", "1", "a1").await;
    let client = server.connect("edge").await;

    let seed = rand::random();
    println!("garbage seed: {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut random = vec![0u8; 200];
    rng.fill_bytes(&mut random);
    let mut truncated = varint(100);
    truncated.extend_from_slice(&[0x0a; 10]);
    let response_frame = encode_frame(&QuicResponse {
        response: Some(Response::Error(Status {
            code: 5,
            message: "not a request".into(),
        })),
    });
    let update_frame = encode_frame(&QuicResponse {
        response: Some(Response::Update(WorkerUpdate {
            kind: 1,
            revision: 9,
            worker_name: "alpha".into(),
            ..WorkerUpdate::default()
        })),
    });
    let empty_request = encode_frame(&QuicRequest { request: None });
    let garbage: [(&str, Vec<u8>, bool); 7] = [
        ("random bytes", random, true),
        (
            "a length prefix of 2^40, stream left open",
            varint(1 << 40),
            false,
        ),
        ("a truncated frame then FIN", truncated, true),
        ("a QuicResponse error frame", response_frame.to_vec(), true),
        ("a QuicResponse update frame", update_frame.to_vec(), true),
        ("an empty QuicRequest", empty_request.to_vec(), true),
        ("nothing, then FIN", Vec::new(), true),
    ];
    // All at once, on concurrent streams of the one connection.
    let mut open = Vec::new();
    for (what, bytes, finish) in &garbage {
        open.push((*what, client.send(bytes, *finish).await.unwrap()));
    }
    for (what, (_send, mut frames)) in open {
        let status = refusal(&mut frames).await;
        assert_eq!(status.code, 3, "{what}: {status:?}");
        println!("{what}: {}", status.message);
    }

    let mut updates = client.request(Request::Subscribe(subscribe(&[]))).await;
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
    assert_eq!(next_update(&mut updates).await.worker_name, "alpha");
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Synced);
    let revision = server.put("beta", "1", "b1").await;
    assert_eq!(next_update(&mut updates).await.revision, revision);
    server.stop().await;
}

#[tokio::test]
async fn random_datagrams_to_the_port_do_not_disturb_a_connected_subscriber() {
    let server = TestServer::start().await;
    let client = server.connect("edge").await;
    let mut updates = client.request(Request::Subscribe(subscribe(&[]))).await;
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Synced);

    let seed = rand::random();
    println!("datagram seed: {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let noise = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..500 {
        let mut datagram = vec![0u8; rng.random_range(1..1400)];
        rng.fill_bytes(&mut datagram);
        match i % 3 {
            // Long header with QUIC v1: looks like an Initial to a first glance.
            0 if datagram.len() >= 5 => {
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            // Short header: looks like a packet of some connection.
            1 => datagram[0] = 0x40 | (datagram[0] & 0x3f),
            _ => {}
        }
        noise.send_to(&datagram, server.addr).await.unwrap();
    }

    let revision = server.put("alpha", "1", "a1").await;
    let update = next_update(&mut updates).await;
    assert_eq!(
        (update.revision, kind(&update)),
        (revision, UpdateKind::Put)
    );
    // And the server still takes new connections.
    let other = server.connect("edge-2").await;
    let mut listed = other
        .request(Request::List(ListWorkersRequest::default()))
        .await;
    assert!(
        matches!(next(&mut listed).await, Some(Response::Workers(w)) if w.revision == revision)
    );
    server.stop().await;
}

/// Connects and asks for a listing: `Ok` only if the server answered.
async fn attempt(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let client = RawClient::connect(addr, tls).await?;
    let request = encode_frame(&QuicRequest {
        request: Some(Request::List(ListWorkersRequest::default())),
    });
    let (_send, mut frames) = client.send(&request, true).await?;
    match tokio::time::timeout(WAIT, frames.next::<QuicResponse>()).await {
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err("stream finished without an answer".to_owned()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("no answer".to_owned()),
    }
}

#[tokio::test]
async fn connections_without_a_valid_certificate_or_our_alpn_are_refused() {
    let server = TestServer::start().await;
    attempt(server.addr, server.client_tls("edge"))
        .await
        .expect("a valid client is answered");

    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pki_types::pem::PemObject::pem_slice_iter(server.pki.ca_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let mut anonymous = rustls::ClientConfig::builder_with_provider(tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![tls::QUIC_ALPN.to_vec()];
    let (cert, key) = TestPki::invalid_client_from_other_ca("edge");
    let other_ca = quic_client_tls(&server.pki, &cert, &key);
    let with_alpn = |alpn: Vec<Vec<u8>>| {
        let mut config = (*server.client_tls("edge")).clone();
        config.alpn_protocols = alpn;
        Arc::new(config)
    };
    let refused = [
        ("no client certificate", Arc::new(anonymous)),
        ("a certificate from another CA", other_ca),
        ("ALPN h2", with_alpn(vec![b"h2".to_vec()])),
        ("no ALPN", with_alpn(Vec::new())),
    ];
    for (what, tls) in refused {
        let outcome = attempt(server.addr, tls).await;
        println!("{what}: {outcome:?}");
        assert!(outcome.is_err(), "{what} must be refused");
    }
    server.stop().await;
}

#[tokio::test]
async fn another_identitys_consumer_id_is_permission_denied() {
    let server = TestServer::start().await;
    let session = server.transport("edge-a").connect().await.unwrap();
    let refused = session
        .subscribe(SubscribeRequest {
            consumer_id: "edge-b".into(),
            ..SubscribeRequest::default()
        })
        .await;
    assert!(
        matches!(&refused, Err(ClientError::Status { code: 7, .. })),
        "{:?}",
        refused.err()
    );
    let refused = session
        .ack(AckRequest {
            consumer_id: "edge-b".into(),
            worker_name: "alpha".into(),
            ..AckRequest::default()
        })
        .await;
    assert!(matches!(refused, Err(ClientError::Status { code: 7, .. })));
    // Its own id with a suffix is fine, on the same connection.
    let mut own = session
        .subscribe(SubscribeRequest {
            consumer_id: "edge-a/runtime-2".into(),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap();
    fresh_snapshot(&mut own).await;
    let subscribers = server.core.subscribers();
    assert_eq!(subscribers[0].consumer_id.as_str(), "edge-a/runtime-2");
    assert_eq!(subscribers[0].transport, "quic");
    server.stop().await;
}

#[tokio::test]
async fn subscriptions_over_the_per_connection_cap_are_resource_exhausted() {
    let limits = QuicLimits {
        max_subscriptions_per_connection: 2,
        ..QuicLimits::default()
    };
    let server = TestServer::start_with(CoreConfig::default(), limits).await;
    let client = server.connect("edge").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut updates = client.request(Request::Subscribe(subscribe(&[]))).await;
        assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
        held.push(updates);
    }
    let mut third = client.request(Request::Subscribe(subscribe(&[]))).await;
    assert_eq!(refusal(&mut third).await.code, 8);
    // Another connection has its own allowance.
    let other = server.connect("edge").await;
    let mut updates = other.request(Request::Subscribe(subscribe(&[]))).await;
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_subscriptions_with_unavailable_and_lets_fetches_finish() {
    let server = TestServer::start().await;
    let code = Bytes::from(vec![7u8; 1 << 20]);
    server.put("alpha", "1", code.clone()).await;
    let client = server.connect("edge").await;
    let mut updates = client.request(Request::Subscribe(subscribe(&[]))).await;
    assert_eq!(kind(&next_update(&mut updates).await), UpdateKind::Reset);
    let mut fetch = client
        .request(Request::Fetch(FetchWorkerRequest {
            worker_name: "alpha".into(),
            version: "1".into(),
        }))
        .await;
    assert!(matches!(next(&mut fetch).await, Some(Response::Chunk(_))));

    server.shutdown.cancel();
    // Whatever was queued arrives, then UNAVAILABLE and the finish.
    let status = loop {
        match next(&mut updates).await {
            Some(Response::Update(_)) => {}
            Some(Response::Error(status)) => break status,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(status.code, 14);
    assert_eq!(next(&mut updates).await, None);
    // The fetch in flight completes.
    let mut size = crate::requests::CHUNK_BYTES;
    while let Some(response) = next(&mut fetch).await {
        let Response::Chunk(chunk) = response else {
            panic!("expected a chunk")
        };
        size += chunk.data.len();
    }
    assert_eq!(size, code.len());
    tokio::time::timeout(WAIT, server.task)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();
    let closed = tokio::time::timeout(WAIT, client.connection.closed())
        .await
        .unwrap();
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(ref close) if close.error_code == 0u32.into()),
        "{closed:?}"
    );
    server.core.shutdown().await;
}

#[tokio::test]
async fn core_shutdown_ends_quic_subscriptions_with_unavailable() {
    let server = TestServer::start().await;
    let session = server.transport("edge").connect().await.unwrap();
    let mut stream = session.subscribe(subscribe(&[])).await.unwrap();
    fresh_snapshot(&mut stream).await;
    server.core.shutdown().await;
    let ended = tokio::time::timeout(WAIT, stream.next()).await.unwrap();
    assert!(
        matches!(ended, Some(Err(ClientError::Status { code: 14, .. }))),
        "{ended:?}"
    );
    server.stop().await;
}

/// Holds what a consumer applied, and publishes its position.
struct Collector {
    workers: BTreeMap<String, (String, String)>,
    position: watch::Sender<u64>,
    resets: u64,
}

#[async_trait]
impl Handler for Collector {
    async fn put(&mut self, update: &WorkerUpdate, _code: Bytes) -> Result<(), String> {
        self.workers.insert(
            update.worker_name.clone(),
            (update.version.clone(), update.checksum.clone()),
        );
        Ok(())
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        self.workers.remove(&update.worker_name);
        Ok(())
    }

    async fn reset(&mut self, _update: &WorkerUpdate) {
        self.resets += 1;
    }

    async fn synced(&mut self, _update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        if let Some(names) = snapshot {
            self.workers.retain(|name, _| names.contains(name));
        }
    }

    async fn position(&mut self, position: &Position) {
        self.position.send_replace(position.revision);
    }
}

#[tokio::test]
async fn a_subscriber_on_a_lossy_link_ends_with_exactly_the_core_state() {
    const CHANGES: usize = 2_000;
    const WORKERS: usize = 20;
    let started = Instant::now();
    let server = TestServer::start().await;
    let seed = rand::random();
    println!("lossy link seed: {seed}");
    let proxy = UdpProxy::start(server.addr, LinkProfile::BURSTY_10_PERCENT, seed)
        .await
        .unwrap();

    let transport =
        QuicTransport::new(&proxy.addr().to_string(), server.client_tls("edge")).unwrap();
    let options = ConsumerOptions {
        ack: true,
        ..ConsumerOptions::default()
    };
    let (position_tx, mut position) = watch::channel(0);
    let mut collector = Collector {
        workers: BTreeMap::new(),
        position: position_tx,
        resets: 0,
    };
    let stop_consumer = CancellationToken::new();
    let consumer = tokio::spawn({
        let stop = stop_consumer.clone();
        async move {
            let mut consumer = Consumer::new(transport, options, None);
            consumer.run(&mut collector, stop).await.unwrap();
            collector
        }
    });

    // The first SYNCED: subscribed through the proxy, so what follows travels live.
    tokio::time::timeout(Duration::from_secs(30), position.changed())
        .await
        .expect("the consumer connects through the lossy link")
        .unwrap();
    let connected = started.elapsed();
    let core = server.core.clone();
    futures_util::stream::iter(0..CHANGES)
        .map(|i| {
            let core = core.clone();
            async move {
                let worker = WorkerName::parse(&format!("worker-{}", i % WORKERS)).unwrap();
                if i % 37 == 36 {
                    match core.delete(worker).await {
                        Ok(_) | Err(PublishError::NotFound(_)) => {}
                        Err(error) => panic!("delete: {error}"),
                    }
                } else {
                    let version = Version::parse(&format!("{}", i / WORKERS + 1)).unwrap();
                    let code = Bytes::from(format!("export default {{ change: {i} }}"));
                    core.publish(worker, version, code, None).await.unwrap();
                }
            }
        })
        .buffer_unordered(16)
        .collect::<()>()
        .await;
    let published = started.elapsed();
    let head = core.head();
    tokio::time::timeout(Duration::from_secs(30), position.wait_for(|p| *p >= head))
        .await
        .expect("the consumer catches up through the lossy link")
        .unwrap();
    let caught_up = started.elapsed();
    // Drain the server through the lossy link while the consumer is still there.
    server.stop().await;
    let stopped = started.elapsed();
    stop_consumer.cancel();
    let collector = consumer.await.unwrap();
    let LinkStats { up, down } = proxy.stop().await;

    let expected: BTreeMap<_, _> = core
        .list(&WorkerFilter::all())
        .workers
        .into_iter()
        .map(|w| (w.worker_name, (w.version, w.checksum)))
        .collect();
    println!(
        "head {head}, {} live workers, {} resets; connected after {connected:?}, published by \
         {published:?}, caught up by {caught_up:?}, server drained by {stopped:?}; \
         up: {} passed {} dropped {} reordered; down: {} passed {} dropped {} reordered",
        expected.len(),
        collector.resets,
        up.passed,
        up.dropped,
        up.reordered,
        down.passed,
        down.dropped,
        down.reordered,
    );
    assert!(down.dropped > 0, "the link lost datagrams");
    assert_eq!(collector.workers, expected);
}

#[test]
fn the_reset_secret_is_stable_per_key_and_never_printed() {
    let secret = ResetSecret::derive(b"server key one");
    assert_eq!(secret, ResetSecret::derive(b"server key one"));
    assert_ne!(secret, ResetSecret::derive(b"server key two"));
    assert_eq!(format!("{secret:?}"), "ResetSecret(..)");
}
