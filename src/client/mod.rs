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
use sha2::{Digest, Sha256};

pub use consumer::{Backoff, Consumer, ConsumerOptions, Handler, Position};
pub use failover::FailoverTransport;
pub use grpc::GrpcTransport;
pub use quic::QuicTransport;

use crate::pb::{
    AckRequest, DeregisterRequest, DeregisterResponse, FetchWorkerRequest, ListWorkersRequest,
    ListWorkersResponse, RegisterRequest, RegisterResponse, SubscribeRequest, WorkerUpdate,
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
    /// Deregisters the consumer: it stops counting among the workers' subscribers.
    async fn deregister(
        &self,
        request: DeregisterRequest,
    ) -> Result<DeregisterResponse, ClientError> {
        let _ = request;
        Err(ClientError::Config(
            "this session cannot deregister".to_owned(),
        ))
    }
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
    // Compared as raw digests: no hex encoding per delivery, and any case of hex digits.
    let actual = Sha256::digest(code);
    let mut announced = [0u8; 32];
    if hex::decode_to_slice(checksum, &mut announced).is_err() || actual[..] != announced {
        return Err(ClientError::Verification(format!(
            "checksum {} instead of {checksum}",
            hex::encode(actual)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: &[u8] = b"export default {}";

    #[test]
    fn verify_accepts_the_announced_digest_in_either_case() {
        let checksum = crate::core::Checksum::of(CODE);
        verify(CODE, checksum.as_str(), 17).unwrap();
        verify(CODE, &checksum.as_str().to_ascii_uppercase(), 17).unwrap();
    }

    #[test]
    fn verify_refuses_other_code_sizes_and_malformed_checksums() {
        let checksum = crate::core::Checksum::of(CODE);
        let other = crate::core::Checksum::of(b"export default { x }");
        for (code, checksum, size) in [
            (CODE, other.as_str(), 17),
            (CODE, checksum.as_str(), 18),
            (CODE, &checksum.as_str()[..62], 17),
            (CODE, "not hex", 17),
            (&b"export default {!"[..], checksum.as_str(), 17),
        ] {
            let error = verify(code, checksum, size).unwrap_err();
            assert!(matches!(error, ClientError::Verification(_)), "{error}");
        }
    }
}
