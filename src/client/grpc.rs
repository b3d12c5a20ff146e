//! The gRPC session: tonic over our own rustls connector (so client TLS settings, session
//! resumption and the AES-128 preference are ours, not tonic's).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use super::{
    Assembly, ClientError, DEFAULT_MAX_CODE_BYTES, MESSAGE_HEADROOM_BYTES, Session, Transport,
    UpdateStream,
};
use crate::pb::{
    AckBatch, AckRequest, AckResponse, DeregisterRequest, DeregisterResponse, FetchWorkerRequest,
    ListWorkersRequest, ListWorkersResponse, RegisterRequest, RegisterResponse, SubscribeRequest,
    control_plane_client::ControlPlaneClient,
};

/// Connects to a gRPC endpoint with mutual TLS.
#[derive(Clone)]
pub struct GrpcTransport {
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    max_code_bytes: u64,
}

impl GrpcTransport {
    /// `addr` is `host:port`; the host is also the name checked against the server
    /// certificate. `tls` comes from [`crate::tls::client_config`] with the gRPC purpose.
    pub fn new(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let host = host_of(addr)?;
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| ClientError::Config(format!("server name {host:?}: {e}")))?;
        Ok(Self {
            addr: addr.to_owned(),
            server_name,
            tls,
            max_code_bytes: DEFAULT_MAX_CODE_BYTES,
        })
    }

    /// The largest bundle this client takes, inline or fetched ([`DEFAULT_MAX_CODE_BYTES`]
    /// unless set): the decoder admits updates that large plus headroom, and a fetch stops past
    /// it.
    pub fn with_max_code_bytes(mut self, max_code_bytes: u64) -> Self {
        self.max_code_bytes = max_code_bytes;
        self
    }

    /// A mutually authenticated HTTP/2 channel, for the services served beside the control
    /// plane (`grpc.health.v1`, reflection) as well as for it.
    pub async fn channel(&self) -> Result<Channel, ClientError> {
        let connector = TlsConnector::from(self.tls.clone());
        let server_name = self.server_name.clone();
        let addr = self.addr.clone();
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| ClientError::Config(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                let server_name = server_name.clone();
                let addr = addr.clone();
                async move {
                    let tcp = TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(server_name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| {
                ClientError::Transport(format!("connect {}: {}", self.addr, crate::error_chain(&e)))
            })?;
        Ok(channel)
    }
}

/// The host part of `host:port` (brackets stripped from IPv6).
pub(crate) fn host_of(addr: &str) -> Result<&str, ClientError> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| ClientError::Config(format!("address {addr:?} is not host:port")))?;
    port.parse::<u16>()
        .map_err(|_| ClientError::Config(format!("address {addr:?} has no valid port")))?;
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}

fn status(status: tonic::Status) -> ClientError {
    ClientError::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn connect(&self) -> Result<Box<dyn Session>, ClientError> {
        let max_message =
            usize::try_from(self.max_code_bytes + MESSAGE_HEADROOM_BYTES).unwrap_or(usize::MAX);
        Ok(Box::new(GrpcSession {
            client: ControlPlaneClient::new(self.channel().await?)
                .max_decoding_message_size(max_message),
            max_code_bytes: self.max_code_bytes,
            acks: tokio::sync::Mutex::new(None),
        }))
    }
}

struct GrpcSession {
    client: ControlPlaneClient<Channel>,
    max_code_bytes: u64,
    /// The session's `StreamAcks` call, opened at the first batch and again after a refusal.
    acks: tokio::sync::Mutex<Option<AckStream>>,
}

/// One `StreamAcks` call: batches go in through `batches`, one answer each comes back.
struct AckStream {
    batches: tokio::sync::mpsc::Sender<AckBatch>,
    answers: tonic::Streaming<AckResponse>,
}

impl GrpcSession {
    async fn open_acks(&self) -> Result<AckStream, ClientError> {
        // One batch in flight at a time: the sender waits for its answer before the next.
        let (batches, receiver) = tokio::sync::mpsc::channel(1);
        let answers = self
            .client
            .clone()
            .stream_acks(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await
            .map_err(status)?
            .into_inner();
        Ok(AckStream { batches, answers })
    }
}

#[async_trait]
impl Session for GrpcSession {
    async fn subscribe(&self, request: SubscribeRequest) -> Result<UpdateStream, ClientError> {
        let stream = self
            .client
            .clone()
            .subscribe_worker_updates(request)
            .await
            .map_err(status)?
            .into_inner();
        Ok(Box::pin(stream.map(|item| item.map_err(status))))
    }

    async fn fetch(&self, request: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
        let mut stream = self
            .client
            .clone()
            .fetch_worker(request)
            .await
            .map_err(status)?
            .into_inner();
        let mut assembly = Assembly::new(self.max_code_bytes);
        while let Some(chunk) = stream.next().await {
            assembly.push(chunk.map_err(status)?)?;
        }
        Ok(assembly.finish())
    }

    async fn ack(&self, request: AckRequest) -> Result<(), ClientError> {
        self.client
            .clone()
            .ack_update(request)
            .await
            .map_err(status)?;
        Ok(())
    }

    async fn ack_batch(&self, acks: Vec<AckRequest>) -> Result<(), ClientError> {
        let mut held = self.acks.lock().await;
        let stream = match held.as_mut() {
            Some(stream) => stream,
            None => held.insert(self.open_acks().await?),
        };
        let answer = match stream.batches.send(AckBatch { acks }).await {
            Ok(()) => stream.answers.message().await.map_err(status),
            Err(_) => Err(ClientError::Transport("ack stream closed".to_owned())),
        };
        match answer {
            Ok(Some(AckResponse {})) => Ok(()),
            Ok(None) => {
                *held = None;
                Err(ClientError::Transport(
                    "ack stream ended without an answer".to_owned(),
                ))
            }
            Err(error) => {
                // A refusal ends the call: the next batch opens another.
                *held = None;
                Err(error)
            }
        }
    }

    async fn register(&self, request: RegisterRequest) -> Result<RegisterResponse, ClientError> {
        Ok(self
            .client
            .clone()
            .register_consumer(request)
            .await
            .map_err(status)?
            .into_inner())
    }

    async fn deregister(
        &self,
        request: DeregisterRequest,
    ) -> Result<DeregisterResponse, ClientError> {
        Ok(self
            .client
            .clone()
            .deregister_consumer(request)
            .await
            .map_err(status)?
            .into_inner())
    }

    async fn list(&self, request: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
        Ok(self
            .client
            .clone()
            .list_workers(request)
            .await
            .map_err(status)?
            .into_inner())
    }
}
