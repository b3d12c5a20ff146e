//! The `ControlPlane` service: maps requests to core calls and core errors to statuses.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status};

use super::PeerInfo;
use crate::{
    core::{
        Ack, Coded, ConsumerId, Core, Ended, SubscribeParams, Version, WorkerFilter, WorkerName,
    },
    pb::{
        AckRequest, AckResponse, EncodedUpdate, FetchWorkerRequest, ListWorkersRequest,
        ListWorkersResponse, RegisterRequest, RegisterResponse, SubscribeRequest, WorkerChunk,
        server::control_plane_server::ControlPlane,
    },
};

/// Size of the chunks `FetchWorker` streams.
pub const CHUNK_BYTES: usize = 64 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The gRPC face of the core.
pub struct ControlPlaneService {
    core: Arc<Core>,
    streams: Arc<Semaphore>,
}

impl ControlPlaneService {
    /// Serves `core`, with at most `max_streams` concurrent streams.
    pub fn new(core: Arc<Core>, max_streams: usize) -> Self {
        Self {
            core,
            streams: Arc::new(Semaphore::new(max_streams)),
        }
    }

    fn stream_permit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => "grpc_streams")
                .increment(1);
            Status::resource_exhausted("too many concurrent streams on this server")
        })
    }
}

/// The verified identity of the connection a request came on.
fn peer<T>(request: &Request<T>) -> Result<PeerInfo, Status> {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate"))
}

fn consumer_id(peer: &PeerInfo, requested: &str) -> Result<ConsumerId, Status> {
    ConsumerId::authorize(&peer.identity, requested).map_err(|e| status(&e))
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

    async fn subscribe_worker_updates(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeWorkerUpdatesStream>, Status> {
        let peer = peer(&request)?;
        let request = request.into_inner();
        let consumer_id = consumer_id(&peer, &request.consumer_id)?;
        let filter = WorkerFilter::parse(&request.worker_names).map_err(|e| status(&e))?;
        let permit = self.stream_permit()?;
        let resume =
            (!request.epoch.is_empty()).then_some((request.epoch, request.resume_revision));
        let subscription = self
            .core
            .subscribe(SubscribeParams {
                consumer_id,
                filter,
                resume,
                transport: "grpc",
                remote: Some(peer.remote),
            })
            .map_err(|e| status(&e))?;
        tracing::debug!(consumer = %subscription.info().consumer_id, remote = %peer.remote, "grpc subscription");
        let delivered = metrics::counter!("workerpush_deliveries_total", "transport" => "grpc");
        let stream = futures_util::stream::unfold(
            Some((subscription, permit, delivered)),
            |state| async move {
                let (mut subscription, permit, delivered) = state?;
                match subscription.next().await {
                    Ok(update) => {
                        delivered.increment(1);
                        Some((Ok(update), Some((subscription, permit, delivered))))
                    }
                    Err(Ended::ShuttingDown) => Some((
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
        let request = request.into_inner();
        let consumer_id = consumer_id(&peer, &request.consumer_id)?;
        if request.endpoint.len() > 1024 || request.labels.len() > 64 {
            return Err(Status::invalid_argument("endpoint or labels too large"));
        }
        self.core
            .register(
                consumer_id.clone(),
                request.endpoint,
                request.labels.into_iter().collect(),
                "grpc",
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(RegisterResponse {
            success: true,
            message: format!("registered {consumer_id}"),
        }))
    }

    async fn ack_update(
        &self,
        request: Request<AckRequest>,
    ) -> Result<Response<AckResponse>, Status> {
        let peer = peer(&request)?;
        let request = request.into_inner();
        let consumer_id = consumer_id(&peer, &request.consumer_id)?;
        let worker = WorkerName::parse(&request.worker_name).map_err(|e| status(&e))?;
        let mut error = request.error;
        error.truncate(1024);
        self.core
            .ack(
                Ack {
                    consumer_id,
                    worker,
                    revision: request.revision,
                    applied: request.applied,
                    error,
                },
                "grpc",
            )
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(AckResponse {}))
    }

    async fn fetch_worker(
        &self,
        request: Request<FetchWorkerRequest>,
    ) -> Result<Response<Self::FetchWorkerStream>, Status> {
        peer(&request)?;
        let request = request.into_inner();
        let worker = WorkerName::parse(&request.worker_name).map_err(|e| status(&e))?;
        let version = match request.version.as_str() {
            "" => None,
            v => Some(Version::parse(v).map_err(|e| status(&e))?),
        };
        let permit = self.stream_permit()?;
        let bundle = self
            .core
            .fetch(&worker, version.as_ref())
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(Box::pin(chunks(
            bundle.code,
            bundle.checksum.to_string(),
            permit,
        ))))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        peer(&request)?;
        let filter =
            WorkerFilter::parse(&request.into_inner().worker_names).map_err(|e| status(&e))?;
        let listing = self.core.list(&filter);
        Ok(Response::new(ListWorkersResponse {
            workers: listing.workers,
            revision: listing.head,
            epoch: listing.epoch.to_string(),
        }))
    }
}

/// The chunks of a bundle: the first carries checksum and size; an empty bundle is one chunk.
fn chunks(
    code: bytes::Bytes,
    checksum: String,
    permit: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<WorkerChunk, Status>> + Send {
    let size = i64::try_from(code.len()).unwrap_or(i64::MAX);
    let count = code.len().div_ceil(CHUNK_BYTES).max(1);
    futures_util::stream::iter((0..count).map(move |i| {
        let _held = &permit;
        let start = i * CHUNK_BYTES;
        let end = (start + CHUNK_BYTES).min(code.len());
        Ok(WorkerChunk {
            checksum: if i == 0 {
                checksum.clone()
            } else {
                String::new()
            },
            size: if i == 0 { size } else { 0 },
            offset: i64::try_from(start).unwrap_or(i64::MAX),
            data: code.slice(start..end),
        })
    }))
}
