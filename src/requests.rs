//! The contract's requests mapped onto the core, once for every transport: validation, the
//! identity rules (`consumer_id` against the certificate identity), authorization (the ACL:
//! which workers the identity may see) and the core calls.
//!
//! A worker the identity may not see is never shown: snapshots, listings and live changes are
//! narrowed to its rights, and naming such a worker (subscribe, list, fetch, ack) is
//! PERMISSION_DENIED whether or not it exists, so the answer is no existence oracle.
//!
//! gRPC and QUIC call these and convert the [`RequestError`] at their edge (a `tonic::Status`,
//! a QUIC `Status` frame) through [`crate::core::Coded`]. Limits that belong to a transport
//! (stream permits) stay in the transport, between validation and the core call, so that a bad
//! request is refused as such even on a busy server. Depends on the core, the ACL, the contract
//! and the TLS connection registry.

use std::{net::SocketAddr, sync::Arc};

use crate::{
    acl::{AclStore, Rights, RightsGuard},
    core::{
        Ack, Bundle, ConsumerId, Core, RequestError, SubscribeParams, Version, WorkerFilter,
        WorkerName,
    },
    pb::{
        AckBatch, AckRequest, AckResponse, DeregisterRequest, DeregisterResponse,
        FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse, MAX_ACKS_PER_BATCH,
        RegisterRequest, RegisterResponse, SubscribeRequest, WorkerChunk,
    },
    tls::LiveConnections,
};

/// Size of the chunks a fetch streams.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Longest failure reason an ack keeps.
const MAX_ACK_ERROR_BYTES: usize = 1024;

/// What both transports consult besides the core: who may see which workers, and where to
/// track connections so that revoking a certificate cuts them.
#[derive(Clone, Debug)]
pub struct Access {
    /// The ACL in force.
    pub acl: Arc<AclStore>,
    /// The live connections of both transports (from [`crate::tls::ServerTls::connections`]).
    pub connections: Arc<LiveConnections>,
}

impl Access {
    /// `acl`, and the connection registry of the server's TLS.
    pub fn new(acl: Arc<AclStore>, connections: Arc<LiveConnections>) -> Self {
        Self { acl, connections }
    }

    /// No ACL (every identity sees every worker) and a registry nothing revokes from: for
    /// tests and tools without a [`crate::tls::ServerTls`].
    pub fn allow_all() -> Self {
        Self::new(Arc::new(AclStore::allow_all()), LiveConnections::new())
    }
}

/// Who sent a request: the verified identity of its connection.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// The certificate identity (SPIFFE consumer id or CN).
    pub identity: &'a str,
    /// The peer's address.
    pub remote: SocketAddr,
    /// `grpc` or `quic`.
    pub transport: &'static str,
    /// The ACL the request is judged by.
    pub acl: &'a AclStore,
}

impl Caller<'_> {
    fn rights(&self) -> Rights {
        self.acl.rights(self.identity)
    }
}

/// The workers a request for `names` covers under `rights`: every name must be allowed
/// (refused otherwise, existing or not), and no names means every worker the rights allow.
fn permitted<S: AsRef<str>>(rights: &Rights, names: &[S]) -> Result<WorkerFilter, RequestError> {
    let requested = WorkerFilter::parse(names)?;
    if let Some(denied) = requested
        .names()
        .and_then(|names| names.iter().find(|name| !rights.allows(name)))
    {
        return Err(denied_error(denied));
    }
    Ok(rights.narrow(requested))
}

fn denied_error(worker: &WorkerName) -> RequestError {
    metrics::counter!("workerpush_acl_denials_total").increment(1);
    RequestError::PermissionDenied(worker.clone())
}

/// Validates a subscription: the consumer id is the caller's, the names are worker names the
/// caller may see. Returns the parameters and the guard of the rights they were made under:
/// the transport ends the subscription (PERMISSION_DENIED) once the guard no longer holds.
///
/// A resume position from before a change of the caller's rights is not honoured: the
/// subscription starts over with RESET and a snapshot under the rights of now.
pub fn subscribe_params(
    caller: Caller<'_>,
    request: SubscribeRequest,
) -> Result<(SubscribeParams, RightsGuard), RequestError> {
    let consumer_id = ConsumerId::authorize(caller.identity, &request.consumer_id)?;
    let guard = caller.acl.guard(caller.identity);
    let filter = permitted(guard.rights(), &request.worker_names)?;
    let resume = (!request.epoch.is_empty())
        .then_some((request.epoch, request.resume_revision))
        .filter(|(epoch, revision)| caller.acl.resumable(caller.identity, epoch, *revision));
    let params = SubscribeParams {
        consumer_id,
        filter,
        resume,
        transport: caller.transport,
        remote: Some(caller.remote),
    };
    Ok((params, guard))
}

/// Validates a fetch: which worker (one the caller may see), and which version (`None`: the
/// latest).
pub fn fetch_target(
    caller: Caller<'_>,
    request: &FetchWorkerRequest,
) -> Result<(WorkerName, Option<Version>), RequestError> {
    let worker = WorkerName::parse(&request.worker_name)?;
    if !caller.rights().allows(&worker) {
        return Err(denied_error(&worker));
    }
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
    // The endpoint and labels are bounded by the core (`Bounds`), for every transport.
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

/// Forgets a consumer's registration, fleet-wide: it stops counting among any worker's
/// subscribers.
pub async fn deregister(
    core: &Core,
    caller: Caller<'_>,
    request: DeregisterRequest,
) -> Result<DeregisterResponse, RequestError> {
    let consumer_id = ConsumerId::authorize(caller.identity, &request.consumer_id)?;
    let existed = core.deregister(&consumer_id).await?;
    Ok(DeregisterResponse {
        existed,
        message: if existed {
            format!("deregistered {consumer_id}")
        } else {
            format!("{consumer_id} was not known")
        },
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
    if !caller.rights().allows(&worker) {
        return Err(denied_error(&worker));
    }
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

/// Records a batch of an ack stream: each ack exactly as [`ack`] records one, in order. The
/// first refusal is the answer (acks before it are recorded, none after); a batch over
/// [`MAX_ACKS_PER_BATCH`] is refused whole.
pub async fn ack_batch(
    core: &Core,
    caller: Caller<'_>,
    batch: AckBatch,
) -> Result<AckResponse, RequestError> {
    if batch.acks.len() > MAX_ACKS_PER_BATCH {
        metrics::counter!("workerpush_limit_refusals_total", "limit" => "acks_per_batch")
            .increment(1);
        return Err(RequestError::ResourceExhausted(format!(
            "ack batch of {} acks is over the limit of {MAX_ACKS_PER_BATCH}; send smaller batches",
            batch.acks.len()
        )));
    }
    for request in batch.acks {
        ack(core, caller, request).await?;
    }
    Ok(AckResponse {})
}

/// The latest version of each live worker the request names (none: every worker) that the
/// caller may see.
pub fn list(
    core: &Core,
    caller: Caller<'_>,
    request: &ListWorkersRequest,
) -> Result<ListWorkersResponse, RequestError> {
    let filter = permitted(&caller.rights(), &request.worker_names)?;
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

    static ALLOW_ALL: std::sync::LazyLock<AclStore> = std::sync::LazyLock::new(AclStore::allow_all);

    fn caller() -> Caller<'static> {
        caller_with(&ALLOW_ALL)
    }

    fn caller_with(acl: &AclStore) -> Caller<'_> {
        Caller {
            identity: "edge",
            remote: SocketAddr::from(([127, 0, 0, 1], 9)),
            transport: "test",
            acl,
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
        assert_eq!(subscribe("", &[]).unwrap().0.consumer_id.as_str(), "edge");
        let (own, _) = subscribe("edge/runtime-2", &["a"]).unwrap();
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
        assert_eq!(code(&refused), ErrorCode::ResourceExhausted);
        assert!(refused.to_string().contains("--max-labels"), "{refused}");
        core.shutdown().await;
    }

    #[tokio::test]
    async fn workers_outside_the_rights_are_denied_whether_or_not_they_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acl");
        std::fs::write(&path, "edge: shop-*\n").unwrap();
        let acl = AclStore::open(&path).unwrap();
        let core = Core::open(Arc::new(MemoryStore::new(16)), CoreConfig::default())
            .await
            .unwrap();
        for worker in ["shop-cart", "admin-panel"] {
            core.publish(
                WorkerName::parse(worker).unwrap(),
                Version::parse("1").unwrap(),
                bytes::Bytes::from_static(b"code"),
                None,
            )
            .await
            .unwrap();
        }
        let caller = caller_with(&acl);
        let names = |names: &[&str]| names.iter().map(ToString::to_string).collect();
        let listed = list(&core, caller, &ListWorkersRequest::default()).unwrap();
        let listed: Vec<_> = listed
            .workers
            .iter()
            .map(|w| w.worker_name.as_str())
            .collect();
        assert_eq!(listed, ["shop-cart"]);
        for asked in [
            &["admin-panel"][..],
            &["no-such-worker"],
            &["shop-cart", "admin-panel"],
        ] {
            let refused = list(
                &core,
                caller,
                &ListWorkersRequest {
                    worker_names: names(asked),
                },
            )
            .unwrap_err();
            assert_eq!(code(&refused), ErrorCode::PermissionDenied, "{asked:?}");
            let subscribe = SubscribeRequest {
                worker_names: names(asked),
                ..SubscribeRequest::default()
            };
            let refused = subscribe_params(caller, subscribe).unwrap_err();
            assert_eq!(code(&refused), ErrorCode::PermissionDenied, "{asked:?}");
        }
        for worker in ["admin-panel", "no-such-worker"] {
            let fetch = FetchWorkerRequest {
                worker_name: worker.into(),
                version: String::new(),
            };
            let refused = fetch_target(caller, &fetch).unwrap_err();
            assert_eq!(code(&refused), ErrorCode::PermissionDenied, "{worker}");
            let refused = ack(
                &core,
                caller,
                AckRequest {
                    worker_name: worker.into(),
                    ..AckRequest::default()
                },
            )
            .await
            .unwrap_err();
            assert_eq!(code(&refused), ErrorCode::PermissionDenied, "{worker}");
        }
        let (params, _) = subscribe_params(caller, SubscribeRequest::default()).unwrap();
        assert!(
            params
                .filter
                .matches(&WorkerName::parse("shop-cart").unwrap())
        );
        assert!(
            !params
                .filter
                .matches(&WorkerName::parse("admin-panel").unwrap())
        );
        core.shutdown().await;
    }
}
