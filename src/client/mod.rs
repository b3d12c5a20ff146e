//! The consumer client library: connect over gRPC or QUIC with mutual TLS, subscribe, verify
//! every bundle against its checksum (fetching code that is not inline), hand changes to a
//! [`Handler`], acknowledge what was applied, and on any disconnect reconnect with jittered
//! exponential backoff and resume from the last revision held — on the same core, or, through
//! [`FailoverTransport`], on another core sharing its store.
//!
//! Used by `workerpush watch`, the examples and the benchmark; depends on the contract and the
//! TLS module, never on the server side.

mod consumer;
mod failover;
mod grpc;
mod quic;

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

pub use consumer::{Backoff, Consumer, ConsumerOptions, Handler, Position};
pub use failover::FailoverTransport;
pub use grpc::GrpcTransport;
pub use quic::QuicTransport;

use crate::pb::{
    AckRequest, FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse, RegisterRequest,
    RegisterResponse, SubscribeRequest, WorkerUpdate,
};

/// What went wrong on the client side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a status (gRPC code number and message).
    #[error("server refused ({code}): {message}")]
    Status {
        /// gRPC code number.
        code: i32,
        /// The server's message.
        message: String,
    },
    /// Connecting or talking failed; worth retrying.
    #[error("transport: {0}")]
    Transport(String),
    /// Code did not match its checksum or size.
    #[error("verification failed: {0}")]
    Verification(String),
    /// Local configuration (certificates, address).
    #[error("config: {0}")]
    Config(String),
}

impl ClientError {
    /// Whether retrying later can help (the server is away or restarting), as opposed to a
    /// refusal that will not change (bad request, wrong identity).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { code, .. } => !matches!(code, 3 | 7 | 16),
            Self::Transport(_) | Self::Verification(_) => true,
            Self::Config(_) => false,
        }
    }
}

/// A stream of updates from one subscription.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<WorkerUpdate, ClientError>> + Send>>;

/// One established connection, over whichever transport.
#[async_trait]
pub trait Session: Send + Sync {
    /// Starts a subscription.
    async fn subscribe(&self, request: SubscribeRequest) -> Result<UpdateStream, ClientError>;
    /// Fetches a bundle whole (not yet verified).
    async fn fetch(&self, request: FetchWorkerRequest) -> Result<(String, Bytes), ClientError>;
    /// Acknowledges a revision.
    async fn ack(&self, request: AckRequest) -> Result<(), ClientError>;
    /// Registers the consumer.
    async fn register(&self, request: RegisterRequest) -> Result<RegisterResponse, ClientError>;
    /// Lists the latest versions.
    async fn list(&self, request: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError>;
}

/// Makes sessions: one per (re)connection.
#[async_trait]
pub trait Transport: Send + Sync {
    /// `grpc` or `quic`.
    fn name(&self) -> &'static str;
    /// Connects and completes the handshake.
    async fn connect(&self) -> Result<Box<dyn Session>, ClientError>;
}

/// Verifies `code` against the checksum and size an update announced.
pub fn verify(code: &[u8], checksum: &str, size: i64) -> Result<(), ClientError> {
    if i64::try_from(code.len()).ok() != Some(size) {
        return Err(ClientError::Verification(format!(
            "size {} instead of {size}",
            code.len()
        )));
    }
    let actual = crate::core::Checksum::of(code);
    if actual.as_str() != checksum {
        return Err(ClientError::Verification(format!(
            "checksum {actual} instead of {checksum}"
        )));
    }
    Ok(())
}
