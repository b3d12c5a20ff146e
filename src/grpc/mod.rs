//! The mutual-TLS gRPC server (tonic over our own rustls accept loop): the five RPCs of the
//! contract over the core, plus `grpc.health.v1` and server reflection.
//!
//! Depends on the core, the TLS module and the generated contract; the core knows nothing of
//! it. Errors reach clients through the core's one code mapping ([`crate::core::Coded`]).

mod incoming;
mod service;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use incoming::{HandshakeLimits, PeerInfo};
pub use service::ControlPlaneService;

use crate::{
    core::Core,
    pb::server::control_plane_server::ControlPlaneServer,
    quota::{IdentityLimits, IdentityQuota},
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
        }
    }
}

/// Serves gRPC on `listener` until `shutdown`: then stops accepting and drains. Streams end
/// with UNAVAILABLE when the core shuts down, so clients reconnect elsewhere and resume.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    core: Arc<Core>,
    limits: GrpcLimits,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let quota = IdentityQuota::new(limits.per_identity);
    let incoming = incoming::incoming(
        listener,
        tls,
        limits.handshake,
        quota.clone(),
        shutdown.clone(),
    );
    let service = ControlPlaneService::new(core, limits.max_streams).with_quota(quota);
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ControlPlaneServer<ControlPlaneService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection = match reflection {
        Ok(reflection) => Some(reflection),
        Err(error) => {
            tracing::error!(%error, "gRPC reflection unavailable");
            None
        }
    };
    let drain = shutdown.clone();
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_service(ControlPlaneServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            drain.cancelled().await;
            health
                .set_not_serving::<ControlPlaneServer<ControlPlaneService>>()
                .await;
        })
        .await
}
