//! The mutual-TLS gRPC server (tonic over our own rustls accept loop): the five RPCs of the
//! contract over the core, plus `grpc.health.v1` and server reflection (both
//! `grpc.reflection.v1` and the older `v1alpha` that most stock clients still speak).
//!
//! Depends on the core, the TLS module and the generated contract; the core knows nothing of
//! it. Errors reach clients through the core's one code mapping ([`crate::core::Coded`]).

mod incoming;
mod service;

use std::{pin::Pin, sync::Arc, time::Duration};

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{Health, HealthServer},
    },
    server::HealthService,
};

pub use incoming::{HandshakeLimits, PeerInfo};
pub use service::ControlPlaneService;

use crate::{
    core::Core,
    pb::server::control_plane_server::ControlPlaneServer,
    quota::{IdentityLimits, IdentityQuota},
    requests::Access,
};

/// Limits of the gRPC server.
#[derive(Clone, Copy, Debug)]
pub struct GrpcLimits {
    /// Concurrent streams (subscriptions and fetches) across all connections
    /// (`GRPC_MAX_STREAMS`); past it, new streams get RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Handshake bounds.
    pub handshake: HandshakeLimits,
    /// Connections and streams per client identity: a connection past the quota gets
    /// RESOURCE_EXHAUSTED on every call and is closed; a stream past it gets
    /// RESOURCE_EXHAUSTED.
    pub per_identity: IdentityLimits,
    /// HTTP/2 keep-alive ping interval; the peer must answer within `keepalive_timeout`.
    pub keepalive_interval: Duration,
    /// See `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// The largest message encoded or decoded: the inline code limit plus headroom, so that
    /// every update the core sends fits (tonic's own 4 MiB would refuse larger inline code).
    pub max_message_bytes: usize,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        Self {
            max_streams: 1000,
            max_streams_per_connection: 128,
            handshake: HandshakeLimits {
                timeout: Duration::from_secs(10),
                concurrent: 256,
            },
            per_identity: IdentityLimits::default(),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            max_message_bytes: message_limit(1 << 20),
        }
    }
}

/// The gRPC message limit for code up to `inline_max_bytes` inline.
pub fn message_limit(inline_max_bytes: u64) -> usize {
    usize::try_from(inline_max_bytes.saturating_add(crate::client::MESSAGE_HEADROOM_BYTES))
        .unwrap_or(usize::MAX)
}

/// Serves gRPC on `listener` until `shutdown`: then stops accepting and drains. Streams end
/// with UNAVAILABLE when the core shuts down, so clients reconnect elsewhere and resume.
/// Requests are judged by `access.acl`; connections are tracked in `access.connections`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    core: Arc<Core>,
    access: Access,
    limits: GrpcLimits,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let quota = IdentityQuota::new(limits.per_identity);
    // The listener stops only once health says NOT_SERVING: tonic's accept loop ends on
    // whichever comes first, the shutdown signal or the end of `incoming`, and drops the other.
    let accepting = CancellationToken::new();
    let incoming = incoming::incoming(
        listener,
        tls,
        access.connections.clone(),
        limits.handshake,
        quota.clone(),
        accepting.clone(),
    );
    let service = ControlPlaneService::new(core, access.acl, limits.max_streams).with_quota(quota);
    let health = tonic_health::server::HealthReporter::new();
    health
        .set_serving::<ControlPlaneServer<ControlPlaneService>>()
        .await;
    let health_service = HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(health.clone()),
        shutdown: shutdown.clone(),
    });
    // Both reflection versions list every service served here, each other included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let (reflection_v1, reflection_v1alpha) =
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => (Some(v1), Some(v1alpha)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "gRPC reflection unavailable");
                (None, None)
            }
        };
    let drain = shutdown.clone();
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .tcp_nodelay(true)
        // One span per call, carrying its connection's peer: what a connection did can be
        // followed (and filtered with RUST_LOG) by remote address or identity.
        .trace_fn(|request| {
            let peer = request.extensions().get::<PeerInfo>();
            tracing::info_span!(
                "grpc",
                remote = peer.map(|p| tracing::field::display(p.remote)),
                identity = peer.map(|p| tracing::field::display(&p.identity)),
                method = %request.uri().path(),
            )
        })
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(
            ControlPlaneServer::new(service)
                .max_encoding_message_size(limits.max_message_bytes)
                .max_decoding_message_size(limits.max_message_bytes),
        )
        .serve_with_incoming_shutdown(incoming, async move {
            drain.cancelled().await;
            // Load balancers and health watchers learn first; `Watch` streams then end.
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_not_serving::<ControlPlaneServer<ControlPlaneService>>()
                .await;
            accepting.cancel();
        })
        .await
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `grpc.health.v1.Health` whose `Watch` streams end at shutdown: after telling the watcher
/// `NOT_SERVING`, with UNAVAILABLE like every other stream. tonic-health's own watch streams
/// never end, so one watcher would hold a graceful drain until the grace period cut it off.
struct DrainingHealth {
    inner: HealthService,
    shutdown: CancellationToken,
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = BoxStream<HealthCheckResponse>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let shutdown = self.shutdown.clone();
        let not_serving = health_check_response::ServingStatus::NotServing as i32;
        let stream = futures_util::stream::unfold(Some((statuses, false)), move |state| {
            let shutdown = shutdown.clone();
            async move {
                let (mut statuses, told) = state?;
                if told {
                    let ended = Status::unavailable("server shutting down");
                    return Some((Err(ended), None));
                }
                let item = statuses.next().await?;
                let told = shutdown.is_cancelled()
                    && matches!(&item, Ok(response) if response.status == not_serving);
                Some((item, Some((statuses, told))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
