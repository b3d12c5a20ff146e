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

pub use consumer::{Backoff, Consumer, ConsumerOptions, Handler, Position, Refusal};
pub use failover::FailoverTransport;
pub use grpc::GrpcTransport;
pub use quic::QuicTransport;

use crate::{
    core::{Checksum, Epoch, Version, WorkerName},
    pb::{
        AckRequest, DeregisterRequest, DeregisterResponse, FetchWorkerRequest, ListWorkersRequest,
        ListWorkersResponse, RegisterRequest, RegisterResponse, SubscribeRequest, UpdateKind,
        WorkerChunk, WorkerUpdate,
    },
};

/// The largest bundle a consumer takes by default: the core's own default `MAX_CODE_BYTES`.
pub const DEFAULT_MAX_CODE_BYTES: u64 = 10 << 20;

/// Room for everything of a message other than its code (names, version, checksum, epoch and
/// protobuf framing take well under 1 KiB): a message-size limit is the code it may carry plus
/// this.
pub const MESSAGE_HEADROOM_BYTES: u64 = 64 << 10;

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
    /// Acknowledges a batch, in order; the first refusal is the answer (acks before it are
    /// recorded). gRPC and QUIC send it as one message on an ack stream the session keeps open
    /// (`StreamAcks`, QUIC `acks` frames); this default sends each ack on its own.
    async fn ack_batch(&self, acks: Vec<AckRequest>) -> Result<(), ClientError> {
        for request in acks {
            self.ack(request).await?;
        }
        Ok(())
    }
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
    /// Closes every connection this transport made and waits (briefly) until the server was
    /// told, so that a stopped consumer shows as gone at once rather than after a timeout. A
    /// closed transport may not connect again.
    async fn close(&self) {}
}

/// Checks every string and number of an update before anything prints or uses it: names and
/// versions as the core's own rules, a 64-hex-digit checksum, a printable epoch, a size within
/// `max_code_bytes`. The reason names the field (its value escaped and cut short).
pub fn validate(update: &WorkerUpdate, max_code_bytes: u64) -> Result<(), String> {
    Epoch::parse(&update.epoch).map_err(|e| e.to_string())?;
    match UpdateKind::try_from(update.kind) {
        Ok(UpdateKind::Put) => {
            WorkerName::parse(&update.worker_name).map_err(|e| e.to_string())?;
            Version::parse(&update.version).map_err(|e| e.to_string())?;
            Checksum::parse(&update.checksum).map_err(|e| e.to_string())?;
            let size = u64::try_from(update.size)
                .map_err(|_| format!("invalid size {}: negative", update.size))?;
            if size > max_code_bytes {
                return Err(format!(
                    "size {size} bytes exceeds --max-code-bytes {max_code_bytes}"
                ));
            }
        }
        Ok(UpdateKind::Delete) => {
            WorkerName::parse(&update.worker_name).map_err(|e| e.to_string())?;
            if !update.version.is_empty() {
                Version::parse(&update.version).map_err(|e| e.to_string())?;
            }
        }
        Ok(UpdateKind::Reset | UpdateKind::Synced | UpdateKind::Unspecified) => {}
        Err(_) => return Err(format!("unknown update kind {}", update.kind)),
    }
    Ok(())
}

/// A fetched bundle being put together from its chunks, bounded twice: by the size the first
/// chunk announces, and by the largest bundle this consumer takes. Nothing past either is
/// buffered, however much a server streams.
pub(crate) struct Assembly {
    max_bytes: u64,
    announced: Option<u64>,
    checksum: String,
    code: bytes::BytesMut,
}

impl Assembly {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            announced: None,
            checksum: String::new(),
            code: bytes::BytesMut::new(),
        }
    }

    /// Takes the next chunk, or says why the fetch must stop.
    pub(crate) fn push(&mut self, chunk: WorkerChunk) -> Result<(), ClientError> {
        let announced = match self.announced {
            Some(announced) => announced,
            None => {
                let announced = u64::try_from(chunk.size).map_err(|_| {
                    ClientError::Verification(format!("fetch announced size {}", chunk.size))
                })?;
                if announced > self.max_bytes {
                    return Err(ClientError::Verification(format!(
                        "fetch announced {announced} bytes, more than --max-code-bytes {}",
                        self.max_bytes
                    )));
                }
                self.checksum = chunk.checksum;
                // Bounded by the check above: never more than the consumer's maximum.
                self.code
                    .reserve(usize::try_from(announced).unwrap_or(usize::MAX));
                self.announced = Some(announced);
                announced
            }
        };
        if u64::try_from(chunk.offset).ok() != Some(self.code.len() as u64) {
            return Err(ClientError::Verification(format!(
                "chunk at offset {} after {} bytes",
                chunk.offset,
                self.code.len()
            )));
        }
        if self.code.len() as u64 + chunk.data.len() as u64 > announced {
            return Err(ClientError::Verification(format!(
                "fetch sent more than the {announced} bytes it announced"
            )));
        }
        self.code.extend_from_slice(&chunk.data);
        Ok(())
    }

    /// The announced checksum and the code.
    pub(crate) fn finish(self) -> (String, Bytes) {
        (self.checksum, self.code.freeze())
    }
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

    fn chunk(size: i64, offset: i64, data: &'static [u8]) -> WorkerChunk {
        WorkerChunk {
            checksum: "c".into(),
            size,
            offset,
            data: Bytes::from_static(data),
        }
    }

    #[test]
    fn a_fetch_stops_at_the_announced_size_and_at_the_maximum() {
        let mut whole = Assembly::new(8);
        whole.push(chunk(6, 0, b"abc")).unwrap();
        whole.push(chunk(0, 3, b"def")).unwrap();
        assert_eq!(
            whole.finish(),
            ("c".to_owned(), Bytes::from_static(b"abcdef"))
        );

        let mut past = Assembly::new(8);
        past.push(chunk(4, 0, b"abc")).unwrap();
        assert!(
            past.push(chunk(0, 3, b"de")).is_err(),
            "past the announced size"
        );
        assert!(Assembly::new(8).push(chunk(1 << 40, 0, b"a")).is_err());
        assert!(Assembly::new(8).push(chunk(-1, 0, b"a")).is_err());
        let mut gap = Assembly::new(8);
        gap.push(chunk(6, 0, b"abc")).unwrap();
        assert!(gap.push(chunk(0, 4, b"ef")).is_err(), "not contiguous");
    }

    #[test]
    fn updates_with_strings_a_terminal_would_interpret_are_refused() {
        let good = WorkerUpdate {
            kind: UpdateKind::Put as i32,
            epoch: "e1".into(),
            worker_name: "app".into(),
            version: "1.0.0".into(),
            checksum: "ab".repeat(32),
            size: 10,
            ..WorkerUpdate::default()
        };
        validate(&good, 10).unwrap();
        let bad = [
            WorkerUpdate {
                worker_name: "app\0".into(),
                ..good.clone()
            },
            WorkerUpdate {
                version: "1\u{1b}[2J".into(),
                ..good.clone()
            },
            WorkerUpdate {
                checksum: "zz".into(),
                ..good.clone()
            },
            WorkerUpdate {
                epoch: "e\n".into(),
                ..good.clone()
            },
            WorkerUpdate {
                size: -1,
                ..good.clone()
            },
            WorkerUpdate {
                size: 11,
                ..good.clone()
            },
            WorkerUpdate {
                kind: 99,
                ..good.clone()
            },
        ];
        for update in bad {
            let reason = validate(&update, 10).unwrap_err();
            assert!(!reason.chars().any(char::is_control), "{reason:?}");
        }
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
