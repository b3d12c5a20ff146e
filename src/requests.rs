//! The contract's requests mapped onto the core, once for every transport: validation, the
//! identity rules (`consumer_id` against the certificate identity) and the core calls.
//!
//! gRPC and QUIC call these and convert the [`RequestError`] at their edge (a `tonic::Status`,
//! a QUIC `Status` frame) through [`crate::core::Coded`]. Limits that belong to a transport
//! (stream permits) stay in the transport, between validation and the core call, so that a bad
//! request is refused as such even on a busy server. Depends on the core and the contract only.

use std::net::SocketAddr;

use crate::{
    core::{
        Ack, Bundle, ConsumerId, Core, InvalidInput, RequestError, SubscribeParams, Version,
        WorkerFilter, WorkerName,
    },
    pb::{
        AckRequest, AckResponse, FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse,
        RegisterRequest, RegisterResponse, SubscribeRequest, WorkerChunk,
    },
};

/// Size of the chunks a fetch streams.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Longest `endpoint` a registration may carry.
const MAX_ENDPOINT_BYTES: usize = 1024;
/// Most labels a registration may carry.
const MAX_LABELS: usize = 64;
/// Longest failure reason an ack keeps.
const MAX_ACK_ERROR_BYTES: usize = 1024;

/// Who sent a request: the verified identity of its connection.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The certificate identity (SPIFFE consumer id or CN).
    pub identity: &'a str,
    /// The peer's address.
    pub remote: SocketAddr,
    /// `grpc` or `quic`.
    pub transport: &'static str,
}

/// Validates a subscription: the consumer id is the caller's, the names are worker names.
pub fn subscribe_params(
    caller: Caller<'_>,
    request: SubscribeRequest,
) -> Result<SubscribeParams, RequestError> {
    let consumer_id = ConsumerId::authorize(caller.identity, &request.consumer_id)?;
    let filter = WorkerFilter::parse(&request.worker_names)?;
    let resume = (!request.epoch.is_empty()).then_some((request.epoch, request.resume_revision));
    Ok(SubscribeParams {
        consumer_id,
        filter,
        resume,
        transport: caller.transport,
        remote: Some(caller.remote),
    })
}

/// Validates a fetch: which worker, and which version (`None`: the latest).
pub fn fetch_target(
    request: &FetchWorkerRequest,
) -> Result<(WorkerName, Option<Version>), RequestError> {
    let worker = WorkerName::parse(&request.worker_name)?;
    let version = match request.version.as_str() {
        "" => None,
        v => Some(Version::parse(v)?),
    };
    Ok((worker, version))
}

/// Records a registration.
pub async fn register(
    core: &Core,
    caller: Caller<'_>,
    request: RegisterRequest,
) -> Result<RegisterResponse, RequestError> {
    let consumer_id = ConsumerId::authorize(caller.identity, &request.consumer_id)?;
    if request.endpoint.len() > MAX_ENDPOINT_BYTES || request.labels.len() > MAX_LABELS {
        return Err(InvalidInput::Other("endpoint or labels too large".to_owned()).into());
    }
    core.register(
        consumer_id.clone(),
        request.endpoint,
        request.labels.into_iter().collect(),
        caller.transport,
    )
    .await?;
    Ok(RegisterResponse {
        success: true,
        message: format!("registered {consumer_id}"),
    })
}

/// Records an acknowledgement.
pub async fn ack(
    core: &Core,
    caller: Caller<'_>,
    request: AckRequest,
) -> Result<AckResponse, RequestError> {
    let consumer_id = ConsumerId::authorize(caller.identity, &request.consumer_id)?;
    let worker = WorkerName::parse(&request.worker_name)?;
    let mut error = request.error;
    if error.len() > MAX_ACK_ERROR_BYTES {
        let mut end = MAX_ACK_ERROR_BYTES;
        while !error.is_char_boundary(end) {
            end -= 1;
        }
        error.truncate(end);
    }
    core.ack(
        Ack {
            consumer_id,
            worker,
            revision: request.revision,
            applied: request.applied,
            error,
        },
        caller.transport,
    )
    .await?;
    Ok(AckResponse {})
}

/// The latest version of each live worker the request names.
pub fn list(
    core: &Core,
    request: &ListWorkersRequest,
) -> Result<ListWorkersResponse, RequestError> {
    let filter = WorkerFilter::parse(&request.worker_names)?;
    let listing = core.list(&filter);
    Ok(ListWorkersResponse {
        workers: listing.workers,
        revision: listing.head,
        epoch: listing.epoch.to_string(),
    })
}

/// The chunks of a bundle, [`CHUNK_BYTES`] each, sharing its bytes: the first carries checksum
/// and size; an empty bundle is one empty chunk.
pub fn chunks(bundle: &Bundle) -> impl Iterator<Item = WorkerChunk> + Send + 'static {
    let code = bundle.code.clone();
    let checksum = bundle.checksum.to_string();
    let size = i64::try_from(code.len()).unwrap_or(i64::MAX);
    let count = code.len().div_ceil(CHUNK_BYTES).max(1);
    (0..count).map(move |i| {
        let start = i * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(code.len());
        WorkerChunk {
            checksum: if i == 0 {
                checksum.clone()
            } else {
                String::new()
            },
            size: if i == 0 { size } else { 0 },
            offset: i64::try_from(start).unwrap_or(i64::MAX),
            data: code.slice(start..end),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        core::{Coded, CoreConfig, ErrorCode},
        store::MemoryStore,
    };

    fn caller() -> Caller<'static> {
        Caller {
            identity: "edge",
            remote: SocketAddr::from(([127, 0, 0, 1], 9)),
            transport: "test",
        }
    }

    fn code(error: &RequestError) -> ErrorCode {
        error.code()
    }

    #[test]
    fn subscriptions_follow_the_identity_rules() {
        let subscribe = |consumer_id: &str, workers: &[&str]| {
            subscribe_params(
                caller(),
                SubscribeRequest {
                    consumer_id: consumer_id.into(),
                    worker_names: workers.iter().map(ToString::to_string).collect(),
                    ..SubscribeRequest::default()
                },
            )
        };
        assert_eq!(subscribe("", &[]).unwrap().consumer_id.as_str(), "edge");
        let own = subscribe("edge/runtime-2", &["a"]).unwrap();
        assert_eq!(own.consumer_id.as_str(), "edge/runtime-2");
        assert!(own.resume.is_none());
        let other = subscribe("edge-2", &[]).unwrap_err();
        assert_eq!(code(&other), ErrorCode::PermissionDenied);
        let bad_name = subscribe("", &["Not A Worker"]).unwrap_err();
        assert_eq!(code(&bad_name), ErrorCode::InvalidArgument);
    }

    #[tokio::test]
    async fn ack_reasons_are_cut_on_a_character_boundary() {
        let core = Core::open(Arc::new(MemoryStore::new(16)), CoreConfig::default())
            .await
            .unwrap();
        let request = AckRequest {
            worker_name: "alpha".into(),
            revision: 1,
            applied: false,
            // 1,201 bytes: byte 1,024 falls inside a two-byte character.
            error: format!("x{}", "é".repeat(600)),
            ..AckRequest::default()
        };
        ack(&core, caller(), request).await.unwrap();
        let too_many_labels = RegisterRequest {
            labels: (0..65).map(|i| (i.to_string(), String::new())).collect(),
            ..RegisterRequest::default()
        };
        let refused = register(&core, caller(), too_many_labels)
            .await
            .unwrap_err();
        assert_eq!(code(&refused), ErrorCode::InvalidArgument);
        core.shutdown().await;
    }
}
