//! The `ControlPlane` service: requests go through [`crate::requests`] (validation, identity
//! rules, core calls, shared with QUIC); core errors become statuses here.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use super::PeerInfo;
use crate::{
    acl::AclStore,
    core::{Coded, Core, Ended, RequestError},
    pb::{
        AckBatch, AckRequest, AckResponse, DeregisterRequest, DeregisterResponse, EncodedUpdate,
        FetchWorkerRequest, ListWorkersRequest, ListWorkersResponse, RegisterRequest,
        RegisterResponse, SubscribeRequest, WorkerChunk,
        server::control_plane_server::ControlPlane,
    },
    quota::{IdentityLimits, IdentityQuota, QuotaPermit},
    requests::{self, Caller},
};

/// What keeps a stream's slots taken: the server-wide one and its identity's.
type StreamPermit = (OwnedSemaphorePermit, QuotaPermit);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC face of the core.
pub struct ControlPlaneService {
    core: Arc<Core>,
    acl: Arc<AclStore>,
    quota: Arc<IdentityQuota>,
    streams: Arc<Semaphore>,
}

impl ControlPlaneService {
    /// Serves `core` under `acl`, with at most `max_streams` concurrent streams (and the
    /// default per-identity quota).
    pub fn new(core: Arc<Core>, acl: Arc<AclStore>, max_streams: usize) -> Self {
        Self {
            core,
            acl,
            quota: IdentityQuota::new(IdentityLimits::default()),
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    /// Counts streams per identity in `quota` (shared with the accept loop's connections).
    pub fn with_quota(mut self, quota: Arc<IdentityQuota>) -> Self {
        self.quota = quota;
        self
    }

    fn caller<'a>(&'a self, peer: &'a PeerInfo) -> Caller<'a> {
        Caller {
            identity: &peer.identity,
            remote: peer.remote,
            transport: "grpc",
            acl: &self.acl,
        }
    }

    fn stream_permit(&self, peer: &PeerInfo) -> Result<StreamPermit, Status> {
        let own = self.quota.stream(&peer.identity).map_err(|exceeded| {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "grpc_streams_per_identity")
                .increment(1);
            Status::resource_exhausted(exceeded.to_string())
        })?;
        let shared = self.streams.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "grpc_streams")
                .increment(1);
            Status::resource_exhausted("too many concurrent streams on this server")
        })?;
        Ok((shared, own))
    }
}

/// The verified identity of the connection a request came on; RESOURCE_EXHAUSTED when that
/// connection is over its identity's quota.
fn peer<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    let peer = request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
    match peer.refused {
        Some(exceeded) => Err(Status::resource_exhausted(format!(
            "{exceeded}; close other connections first"
        ))),
        None => Ok(peer),
    }
}

/// The one conversion from core errors to gRPC statuses.
pub fn status(error: &impl Coded) -> Status {
    Status::new(
        tonic::Code::from_i32(error.code().as_i32()),
        error.client_message(),
    )
}

#[tonic::async_trait]
impl ControlPlane for ControlPlaneService {
    type SubscribeWorkerUpdatesStream = BoxStream<EncodedUpdate>;
    type FetchWorkerStream = BoxStream<WorkerChunk>;
    type StreamAcksStream = BoxStream<AckResponse>;

    async fn subscribe_worker_updates(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeWorkerUpdatesStream>, Status> {
        let peer = peer(&request)?;
        let (params, guard) = requests::subscribe_params(self.caller(&peer), request.into_inner())
            .map_err(|e| status(&e))?;
        let permit = self.stream_permit(&peer)?;
        let subscription = self.core.subscribe(params).map_err(|e| status(&e))?;
        tracing::debug!(consumer = %subscription.info().consumer_id, remote = %peer.remote, "grpc subscription");
        let delivered = metrics::counter!("workerpush_deliveries_total", "transport" => "grpc");
        let stream = futures_util::stream::unfold(
            Some((subscription, guard, permit, delivered)),
            |state| async move {
                let (mut subscription, mut guard, permit, delivered) = state?;
                let next = tokio::select! {
                    biased;
                    () = guard.lost() => None,
                    next = subscription.next() => Some(next),
                };
                match next {
                    // Checked after taking the update: one published after an ACL reload is
                    // never sent under the old rights.
                    Some(Ok(update)) if guard.holds() => {
                        delivered.increment(1);
                        Some((Ok(update), Some((subscription, guard, permit, delivered))))
                    }
                    None | Some(Ok(_)) => Some((Err(status(&RequestError::RightsChanged)), None)),
                    Some(Err(Ended::ShuttingDown)) => Some((
                        Err(Status::unavailable(
                            "server shutting down; reconnect and resume",
                        )),
                        None,
                    )),
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn register_consumer(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = peer(&request)?;
        let response = requests::register(&self.core, self.caller(&peer), request.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(response))
    }

    async fn deregister_consumer(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let peer = peer(&request)?;
        let response = requests::deregister(&self.core, self.caller(&peer), request.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(response))
    }

    async fn ack_update(
        &self,
        request: Request<AckRequest>,
    ) -> Result<Response<AckResponse>, Status> {
        let peer = peer(&request)?;
        let response = requests::ack(&self.core, self.caller(&peer), request.into_inner())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(response))
    }

    /// Each batch is read only after the answer to the one before was taken by HTTP/2, so a
    /// client that floods batches without reading the answers is held by flow control: the
    /// core holds one batch per stream at most. Ends with UNAVAILABLE on shutdown.
    async fn stream_acks(
        &self,
        request: Request<Streaming<AckBatch>>,
    ) -> Result<Response<Self::StreamAcksStream>, Status> {
        let peer = peer(&request)?;
        let batches = request.into_inner();
        let core = self.core.clone();
        let acl = self.acl.clone();
        let shutdown = self.core.shutdown_token();
        let stream = futures_util::stream::unfold(Some(batches), move |batches| {
            let (core, acl, shutdown, peer) =
                (core.clone(), acl.clone(), shutdown.clone(), peer.clone());
            async move {
                let mut batches = batches?;
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => {
                        return Some((Err(Status::unavailable("server shutting down; send the acks again elsewhere")), None));
                    }
                    next = batches.message() => next,
                };
                let batch = match next {
                    Ok(Some(batch)) => batch,
                    Ok(None) => return None,
                    Err(error) => return Some((Err(error), None)),
                };
                let caller = Caller {
                    identity: &peer.identity,
                    remote: peer.remote,
                    transport: "grpc",
                    acl: &acl,
                };
                match requests::ack_batch(&core, caller, batch).await {
                    Ok(answer) => Some((Ok(answer), Some(batches))),
                    Err(error) => Some((Err(status(&error)), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_worker(
        &self,
        request: Request<FetchWorkerRequest>,
    ) -> Result<Response<Self::FetchWorkerStream>, Status> {
        let peer = peer(&request)?;
        let (worker, version) = requests::fetch_target(self.caller(&peer), request.get_ref())
            .map_err(|e| status(&e))?;
        let permit = self.stream_permit(&peer)?;
        let bundle = self
            .core
            .fetch(&worker, version.as_ref())
            .await
            .map_err(|e| status(&e))?;
        let chunks = requests::chunks(&bundle).map(move |chunk| {
            let _held = &permit;
            Ok(chunk)
        });
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let peer = peer(&request)?;
        let response = requests::list(&self.core, self.caller(&peer), request.get_ref())
            .map_err(|e| status(&e))?;
        Ok(Response::new(response))
    }
}
