//! The QUIC server: accepts connections on a bound UDP socket, identifies each peer by its
//! verified client certificate, and answers one request per client-opened bidirectional
//! stream until shut down, then drains without dropping frames already written.
//!
//! A stream's trouble stays on that stream: a bad frame or a refused request gets a `Status`
//! frame and a finish there, and the connection and its other streams go on. A connection
//! whose client certificate is revoked is closed whole (see [`tls::LiveConnections`]).

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use quinn::{
    Connection, Endpoint, Incoming, RecvStream, SendStream, crypto::rustls::HandshakeData,
};
use rustls_pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    codec::{self, MAX_FRAME_BYTES},
    frames::{FrameReader, ReadFrameError},
};
use crate::{
    acl::{AclStore, RightsGuard},
    core::{Bundle, Coded, Core, Ended, ErrorCode, RequestError, Subscription},
    pb::{QuicRequest, QuicResponse, Status, quic_request::Request, quic_response::Response},
    peers::{self, ConnectionRecord},
    quota::{IdentityLimits, IdentityQuota, QuotaPermit},
    requests::{self, Access, Caller},
    tls,
};

const TRANSPORT: &str = "quic";

/// Application close code: a normal close (shutdown).
const CLOSE_DONE: u32 = 0;
/// Application close code: the peer is refused (no usable identity, wrong protocol).
const CLOSE_REFUSED: u32 = 1;
/// Application close code: the peer's client certificate has been revoked.
const CLOSE_REVOKED: u32 = 2;
/// Application close code: the peer's identity holds too many connections already (the
/// reason says the limit). Like RESOURCE_EXHAUSTED: retry later, with fewer connections.
pub const CLOSE_RESOURCE_EXHAUSTED: u32 = 3;

/// Subscription streams are sent ahead of fetch streams (priority 0) on a shared connection,
/// so a large fetch never delays updates.
const UPDATE_PRIORITY: i32 = 1;
/// Most updates written at once...
const MAX_BATCH_UPDATES: u64 = 256;
/// ...and most bytes: a batch holds references into the core's log, so it stays small.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Limits and timers of the QUIC server.
#[derive(Clone, Copy, Debug)]
pub struct QuicLimits {
    /// Connections at once; more are refused.
    pub max_connections: usize,
    /// Handshakes in progress at once; more connections are refused.
    pub max_handshakes: usize,
    /// A handshake not done within this is dropped.
    pub handshake_timeout: Duration,
    /// Bidirectional streams (requests) open at once per connection: QUIC flow control, the
    /// peer cannot open more. quinn keeps state for each of them from the handshake on, so
    /// this is memory every connection holds (at 128, about 4 KiB more than at 64).
    pub max_streams_per_connection: u32,
    /// Subscriptions at once per connection; more get RESOURCE_EXHAUSTED.
    pub max_subscriptions_per_connection: usize,
    /// Connections and streams (subscriptions and fetches) per client identity: a connection
    /// past the quota is closed with [`CLOSE_RESOURCE_EXHAUSTED`], a stream past it gets
    /// RESOURCE_EXHAUSTED.
    pub per_identity: IdentityLimits,
    /// Keep-alive interval (well inside `idle_timeout`, so idle subscriptions stay up).
    pub keep_alive_interval: Duration,
    /// A connection silent this long is gone.
    pub idle_timeout: Duration,
    /// A stream whose request frame is not complete within this gets INVALID_ARGUMENT.
    pub request_timeout: Duration,
    /// How long a shutdown waits for streams to be delivered before closing regardless.
    pub drain_timeout: Duration,
    /// The secret stateless-reset tokens are derived from (`None`: a random one per process).
    /// Give the same secret across restarts: a restarted server can then reset connections of
    /// the process it replaced, so clients reconnect at their next packet instead of waiting
    /// out `idle_timeout` on a connection no one serves.
    pub reset_secret: Option<ResetSecret>,
}

/// The secret behind QUIC stateless-reset tokens (RFC 9000 §10.3). Whoever holds it can end
/// this server's connections, so it is derived from the server's private key, never shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResetSecret([u8; 32]);

impl ResetSecret {
    /// Derives the secret from secret key material (the server key file's bytes): stable for
    /// as long as the key is, and revealing nothing of it.
    pub fn derive(key_material: &[u8]) -> Self {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(b"workerpush/quic/stateless-reset/v1\0");
        hash.update(key_material);
        Self(hash.finalize().into())
    }
}

impl std::fmt::Debug for ResetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetSecret(..)")
    }
}

/// HMAC-SHA256 under a [`ResetSecret`], as quinn's stateless-reset key.
struct ResetKey(ResetSecret);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let tag = self.tag(data);
        let len = signature_out.len().min(tag.len());
        signature_out[..len].copy_from_slice(&tag[..len]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        use hmac::Mac;
        let mut mac = self.mac();
        mac.update(data);
        mac.verify_slice(signature)
            .map_err(|_| quinn::crypto::CryptoError)
    }
}

impl ResetKey {
    fn mac(&self) -> hmac::Hmac<sha2::Sha256> {
        use hmac::KeyInit;
        // HMAC takes keys of any length (up to its block size they are padded): a 32-byte key
        // is never refused, and the fallback only exists to avoid a panic path.
        <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&self.0.0)
            .unwrap_or_else(|_| <hmac::Hmac<sha2::Sha256> as KeyInit>::new(&Default::default()))
    }

    fn tag(&self, data: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = self.mac();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }
}

/// Random 8-byte connection IDs that any process takes as plausibly its own. quinn's default
/// IDs carry a check keyed per process, so a restarted server would drop its predecessor's
/// packets unanswered; with these it answers them with a stateless reset (at most one per
/// 20 ms, quinn's default), which the client believes because the reset key is the same.
struct PlainCids;

impl quinn::ConnectionIdGenerator for PlainCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 64,
            max_subscriptions_per_connection: 32,
            per_identity: IdentityLimits::default(),
            keep_alive_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            reset_secret: None,
        }
    }
}

/// What every connection task shares.
struct Shared {
    core: Arc<Core>,
    access: Access,
    limits: QuicLimits,
    /// Stop accepting, end subscriptions with UNAVAILABLE, finish what is in flight.
    shutdown: CancellationToken,
    /// The drain took too long: close connections now.
    hard_stop: CancellationToken,
    /// What each identity holds.
    quota: Arc<IdentityQuota>,
}

/// Serves QUIC on `socket` (already bound) until `shutdown`.
///
/// Then it stops accepting, ends subscriptions with an UNAVAILABLE frame (clients reconnect,
/// maybe elsewhere, and resume), lets finite answers complete, waits until peers have every
/// byte written, and closes — forcibly only after [`QuicLimits::drain_timeout`]. Returns an
/// error only if the endpoint cannot be set up. Requests are judged by `access.acl`;
/// connections are tracked in `access.connections`.
pub async fn serve(
    socket: UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    core: Arc<Core>,
    access: Access,
    limits: QuicLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let endpoint = endpoint(socket, tls, &limits)?;
    tracing::info!(local = %endpoint.local_addr()?, "QUIC serving");
    let shared = Arc::new(Shared {
        core,
        access,
        limits,
        shutdown: shutdown.clone(),
        hard_stop: CancellationToken::new(),
        quota: IdentityQuota::new(limits.per_identity),
    });
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let permits = (
            handshakes.clone().try_acquire_owned(),
            slots.clone().try_acquire_owned(),
        );
        let (Ok(handshake), Ok(slot)) = permits else {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "quic_connections")
                .increment(1);
            tracing::debug!(remote = %incoming.remote_address(), "QUIC connection refused: at limit");
            incoming.refuse();
            continue;
        };
        connections.spawn(connection(incoming, handshake, slot, shared.clone()));
    }

    // Drain: no new connections; each connection finishes its streams, then closes.
    endpoint.set_server_config(None);
    connections.close();
    if tokio::time::timeout(limits.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(timeout = ?limits.drain_timeout, "QUIC drain incomplete; closing connections");
        shared.hard_stop.cancel();
        connections.wait().await;
    }
    endpoint.close(CLOSE_DONE.into(), b"server shutting down");
    // Lets the close reach peers; bounded because a peer may never answer.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!("QUIC stopped");
    Ok(())
}

fn endpoint(
    socket: UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    limits: &QuicLimits,
) -> io::Result<Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("QUIC TLS: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(super::transport_config(
        limits.keep_alive_interval,
        limits.idle_timeout,
        limits.max_streams_per_connection,
    )?));
    let mut endpoint_config = quinn::EndpointConfig::default();
    if let Some(secret) = limits.reset_secret {
        endpoint_config
            .reset_key(Arc::new(ResetKey(secret)))
            .cid_generator(|| Box::new(PlainCids));
    }
    Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// The verified peer of a connection.
struct Peer {
    identity: Arc<str>,
    remote: SocketAddr,
    /// This connection counted against its identity's quota.
    _quota: QuotaPermit,
}

impl Peer {
    fn caller<'a>(&'a self, acl: &'a AclStore) -> Caller<'a> {
        Caller {
            identity: &self.identity,
            remote: self.remote,
            transport: TRANSPORT,
            acl,
        }
    }
}

/// One connection: handshake, identity, then its streams until it ends or the server drains.
async fn connection(
    incoming: Incoming,
    handshake: OwnedSemaphorePermit,
    _slot: OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let remote = incoming.remote_address();
    let refused = |reason: &str| {
        metrics::counter!("workerpush_handshake_failures_total", "transport" => TRANSPORT)
            .increment(1);
        peers::handshake_failed(TRANSPORT, remote, reason);
    };
    let connection = match accept(incoming, &shared).await {
        Ok(connection) => connection,
        Err(reason) => return refused(&reason),
    };
    drop(handshake);
    let (identity, chain) = match identity(&connection) {
        Ok(verified) => verified,
        Err(reason) => {
            connection.close(CLOSE_REFUSED.into(), reason.as_bytes());
            return refused(&reason);
        }
    };
    let identity: Arc<str> = identity.into();
    let quota = match shared.quota.connection(&identity) {
        Ok(permit) => permit,
        Err(exceeded) => {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "quic_connections_per_identity")
                .increment(1);
            tracing::info!(%remote, %identity, %exceeded, "QUIC connection refused");
            connection.close(
                CLOSE_RESOURCE_EXHAUSTED.into(),
                exceeded.to_string().as_bytes(),
            );
            return;
        }
    };
    let tracked = shared.access.connections.track(&chain);
    drop(chain);
    let _record = ConnectionRecord::connected(TRANSPORT, identity.clone(), remote);
    let span = tracing::info_span!("quic_connection", %remote, %identity);
    let peer = Arc::new(Peer {
        identity,
        remote,
        _quota: quota,
    });
    streams(connection, peer, tracked, shared)
        .instrument(span)
        .await;
}

async fn accept(incoming: Incoming, shared: &Shared) -> Result<Connection, String> {
    let connecting = incoming.accept().map_err(|e| e.to_string())?;
    tokio::select! {
        done = tokio::time::timeout(shared.limits.handshake_timeout, connecting) => match done {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("handshake timed out".to_owned()),
        },
        () = shared.shutdown.cancelled() => Err("server shutting down".to_owned()),
    }
}

/// The peer's identity from its verified certificate, once the protocol is known to be ours,
/// and the certificate chain it presented.
fn identity(connection: &Connection) -> Result<(String, Vec<CertificateDer<'static>>), String> {
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() != Some(tls::QUIC_ALPN) {
        return Err("ALPN workerpush/1 not negotiated".to_owned());
    }
    let chain = connection
        .peer_identity()
        .and_then(|chain| chain.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = chain.first().ok_or("empty client certificate chain")?;
    let identity = tls::identity_of(leaf).map_err(|e| e.to_string())?;
    Ok((identity, *chain))
}

/// Accepts the connection's streams, one task each, until it ends, the server drains, or the
/// client certificate is revoked.
async fn streams(
    connection: Connection,
    peer: Arc<Peer>,
    tracked: tls::Tracked,
    shared: Arc<Shared>,
) {
    tracing::debug!("QUIC connection established");
    let tasks = TaskTracker::new();
    let subscriptions = Arc::new(Semaphore::new(
        shared.limits.max_subscriptions_per_connection,
    ));
    loop {
        let (send, recv) = tokio::select! {
            biased;
            () = tracked.cut().cancelled() => {
                tracing::info!("client certificate revoked; closing the connection");
                connection.close(CLOSE_REVOKED.into(), b"client certificate revoked");
                break;
            }
            () = shared.shutdown.cancelled() => break,
            accepted = connection.accept_bi() => match accepted {
                Ok(streams) => streams,
                Err(error) => {
                    tracing::debug!(%error, "QUIC connection ended");
                    break;
                }
            },
        };
        let span = tracing::debug_span!("stream", id = %send.id());
        let stream = answer(
            send,
            recv,
            peer.clone(),
            subscriptions.clone(),
            shared.clone(),
        );
        tasks.spawn(stream.instrument(span));
    }
    tasks.close();
    tokio::select! {
        () = tasks.wait() => {}
        () = shared.hard_stop.cancelled() => {}
    }
    connection.close(CLOSE_DONE.into(), b"server shutting down");
    // After the close every stream operation fails at once.
    tasks.wait().await;
}

/// How a stream ends other than by its answer.
#[derive(Debug)]
enum StreamEnd {
    /// Say so in a `Status` frame, then finish.
    Refused { code: ErrorCode, message: String },
    /// The peer stopped or reset the stream, or the connection is lost: nothing to say.
    Gone(String),
}

impl StreamEnd {
    /// The identity's stream quota is used up.
    fn over_quota(peer: &Peer, shared: &Shared) -> Result<QuotaPermit, Self> {
        shared.quota.stream(&peer.identity).map_err(|exceeded| {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "quic_streams_per_identity")
                .increment(1);
            Self::Refused {
                code: ErrorCode::ResourceExhausted,
                message: exceeded.to_string(),
            }
        })
    }

    fn invalid(message: impl Into<String>) -> Self {
        metrics::counter!("workerpush_quic_bad_requests_total").increment(1);
        Self::Refused {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
        }
    }
}

impl From<RequestError> for StreamEnd {
    fn from(error: RequestError) -> Self {
        if error.code() == ErrorCode::Internal {
            tracing::error!(%error, "QUIC request failed");
        }
        Self::Refused {
            code: error.code(),
            message: error.client_message(),
        }
    }
}

impl From<quinn::WriteError> for StreamEnd {
    fn from(error: quinn::WriteError) -> Self {
        Self::Gone(error.to_string())
    }
}

/// One stream: read the request, answer it, finish, and stay until the peer has it all (so
/// that a draining connection closes only after).
async fn answer(
    mut send: SendStream,
    recv: RecvStream,
    peer: Arc<Peer>,
    subscriptions: Arc<Semaphore>,
    shared: Arc<Shared>,
) {
    let outcome = match read_request(recv, shared.limits.request_timeout).await {
        Ok((
            QuicRequest {
                request: Some(Request::Acks(batch)),
            },
            frames,
        )) => acks(&mut send, frames, batch, &peer, &shared).await,
        Ok((request, _)) => dispatch(&mut send, request, &peer, &subscriptions, &shared).await,
        Err(end) => Err(end),
    };
    match outcome {
        Ok(()) => {}
        Err(StreamEnd::Refused { code, message }) => {
            tracing::debug!(?code, %message, "QUIC request refused");
            let frame = codec::encode_frame(&QuicResponse {
                response: Some(Response::Error(Status {
                    code: code.as_i32(),
                    message,
                })),
            });
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        Err(StreamEnd::Gone(reason)) => {
            tracing::debug!(%reason, "QUIC stream gone");
            return;
        }
    }
    // `finish` only fails on a stream already finished or reset, which this one is not.
    let _ = send.finish();
    let _ = tokio::time::timeout(shared.limits.request_timeout, send.stopped()).await;
}

/// The largest request frame the server reads. Requests are small (a subscription naming
/// thousands of workers is tens of KiB); bounding them well under the 16 MiB frame limit keeps
/// what one connection's 128 streams can make the server hold small.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

async fn read_request(
    recv: RecvStream,
    within: Duration,
) -> Result<(QuicRequest, FrameReader), StreamEnd> {
    let mut frames = FrameReader::new(recv, MAX_REQUEST_BYTES.min(MAX_FRAME_BYTES));
    match tokio::time::timeout(within, frames.next::<QuicRequest>()).await {
        Ok(Ok(Some(request))) => Ok((request, frames)),
        Ok(Ok(None)) => Err(StreamEnd::invalid("stream finished without a request")),
        Ok(Err(ReadFrameError::Read(error))) => Err(StreamEnd::Gone(error.to_string())),
        Ok(Err(error)) => Err(StreamEnd::invalid(format!("bad request frame: {error}"))),
        Err(_) => Err(StreamEnd::invalid(format!(
            "no complete request frame within {within:?}"
        ))),
    }
}

async fn dispatch(
    send: &mut SendStream,
    request: QuicRequest,
    peer: &Peer,
    subscriptions: &Arc<Semaphore>,
    shared: &Shared,
) -> Result<(), StreamEnd> {
    let core = &shared.core;
    let response = match request.request {
        None => {
            return Err(StreamEnd::invalid(
                "empty request: set one of subscribe, register, deregister, ack, fetch, list, acks",
            ));
        }
        Some(Request::Subscribe(request)) => {
            let (params, guard) =
                requests::subscribe_params(peer.caller(&shared.access.acl), request)?;
            let permit = subscriptions.clone().try_acquire_owned().map_err(|_| {
                metrics::counter!("workerpush_limit_refusals_total", "limit" => "quic_subscriptions")
                    .increment(1);
                StreamEnd::Refused {
                    code: ErrorCode::ResourceExhausted,
                    message: format!(
                        "too many subscriptions on this connection (limit {})",
                        shared.limits.max_subscriptions_per_connection
                    ),
                }
            })?;
            let own = StreamEnd::over_quota(peer, shared)?;
            let subscription = core.subscribe(params)?;
            tracing::debug!(consumer = %subscription.info().consumer_id, "QUIC subscription");
            return updates(send, subscription, guard, (permit, own), shared).await;
        }
        Some(Request::Fetch(request)) => {
            let (worker, version) =
                requests::fetch_target(peer.caller(&shared.access.acl), &request)?;
            let _own = StreamEnd::over_quota(peer, shared)?;
            let bundle = core.fetch(&worker, version.as_ref()).await?;
            return chunks(send, &bundle).await;
        }
        Some(Request::Register(request)) => {
            let caller = peer.caller(&shared.access.acl);
            Response::Registered(requests::register(core, caller, request).await?)
        }
        Some(Request::Deregister(request)) => {
            let caller = peer.caller(&shared.access.acl);
            Response::Deregistered(requests::deregister(core, caller, request).await?)
        }
        Some(Request::Ack(request)) => {
            let caller = peer.caller(&shared.access.acl);
            Response::Acked(requests::ack(core, caller, request).await?)
        }
        Some(Request::List(request)) => {
            let caller = peer.caller(&shared.access.acl);
            Response::Workers(requests::list(core, caller, &request)?)
        }
        // Taken by `answer` before dispatching; a batch alone is a stream of one batch.
        Some(Request::Acks(batch)) => {
            let caller = peer.caller(&shared.access.acl);
            Response::Acked(requests::ack_batch(core, caller, batch).await?)
        }
    };
    let frame = codec::encode_frame(&QuicResponse {
        response: Some(response),
    });
    send.write_all(&frame).await?;
    Ok(())
}

/// Streams a subscription: each write carries every update that is ready (up to a bound),
/// framed around the bytes the core encoded once for all subscribers. Ends with
/// PERMISSION_DENIED once the identity's rights change.
async fn updates(
    send: &mut SendStream,
    mut subscription: Subscription,
    mut guard: RightsGuard,
    _permits: (OwnedSemaphorePermit, QuotaPermit),
    shared: &Shared,
) -> Result<(), StreamEnd> {
    // Fails only on a closed stream; then the first write says so.
    let _ = send.set_priority(UPDATE_PRIORITY);
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let delivered = metrics::counter!("workerpush_deliveries_total", "transport" => TRANSPORT);
    let mut headers = BytesMut::new();
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        let next = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => Err(Ended::ShuttingDown),
            stopped = &mut stopped => {
                return Err(StreamEnd::Gone(format!("subscription stopped by the peer: {stopped:?}")));
            }
            () = guard.lost() => return Err(RequestError::RightsChanged.into()),
            next = subscription.next() => next,
        };
        let Ok(first) = next else {
            return Err(StreamEnd::Refused {
                code: ErrorCode::Unavailable,
                message: "server shutting down; reconnect and resume".to_owned(),
            });
        };
        let mut bytes = first.0.len();
        batch.extend(codec::update_frame(&first, &mut headers));
        let mut count = 1;
        while count < MAX_BATCH_UPDATES && bytes < MAX_BATCH_BYTES {
            let Some(update) = subscription.try_next() else {
                break;
            };
            bytes += update.0.len();
            batch.extend(codec::update_frame(&update, &mut headers));
            count += 1;
        }
        // Checked after taking the batch: an update published after an ACL reload is never
        // sent under the old rights.
        if !guard.holds() {
            return Err(RequestError::RightsChanged.into());
        }
        send.write_all_chunks(&mut batch).await?;
        batch.clear();
        delivered.increment(count);
    }
}

/// An ack stream: `first` and every further `acks` frame is a batch, recorded through the same
/// code as a unary ack and answered by one `acked` frame, until the client finishes the
/// stream. The next frame is read only once the answer to the last is written, so a client
/// that floods is held by QUIC flow control: the server holds one frame per stream at most.
async fn acks(
    send: &mut SendStream,
    mut frames: FrameReader,
    first: crate::pb::AckBatch,
    peer: &Peer,
    shared: &Shared,
) -> Result<(), StreamEnd> {
    let acked = codec::encode_frame(&QuicResponse {
        response: Some(Response::Acked(crate::pb::AckResponse {})),
    });
    let mut batch = first;
    loop {
        requests::ack_batch(&shared.core, peer.caller(&shared.access.acl), batch).await?;
        send.write_all(&acked).await?;
        let next = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => {
                return Err(StreamEnd::Refused {
                    code: ErrorCode::Unavailable,
                    message: "server shutting down; send the acks again elsewhere".to_owned(),
                });
            }
            next = frames.next::<QuicRequest>() => next,
        };
        batch = match next {
            Ok(Some(QuicRequest {
                request: Some(Request::Acks(batch)),
            })) => batch,
            Ok(Some(_)) => {
                return Err(StreamEnd::invalid("an ack stream carries only acks frames"));
            }
            Ok(None) => return Ok(()),
            Err(ReadFrameError::Read(error)) => return Err(StreamEnd::Gone(error.to_string())),
            Err(error) => return Err(StreamEnd::invalid(format!("bad acks frame: {error}"))),
        };
    }
}

/// Streams a bundle in chunk frames that share its bytes.
async fn chunks(send: &mut SendStream, bundle: &Bundle) -> Result<(), StreamEnd> {
    let mut headers = BytesMut::new();
    for chunk in requests::chunks(bundle) {
        send.write_all_chunks(&mut codec::chunk_frame(&chunk, &mut headers))
            .await?;
    }
    Ok(())
}
