//! The QUIC session: one quinn connection per session, one bidirectional stream per request,
//! framed with the transport's pure codec.
//!
//! [`QuicTransport`] owns one client endpoint (UDP socket) and one client configuration for its
//! whole life, so reconnects reuse the socket and resume TLS sessions from the same cache.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use quinn::{Connection, Endpoint};
use rustls_pki_types::ServerName;

use super::{
    Assembly, ClientError, DEFAULT_MAX_CODE_BYTES, Session, Transport, UpdateStream, grpc::host_of,
};
use crate::{
    pb::{
        AckBatch, AckRequest, DeregisterRequest, DeregisterResponse, FetchWorkerRequest,
        ListWorkersRequest, ListWorkersResponse, QuicRequest, QuicResponse, RegisterRequest,
        RegisterResponse, Status, SubscribeRequest, WorkerUpdate, quic_request::Request,
        quic_response::Response,
    },
    quic::{
        codec::{MAX_FRAME_BYTES, encode_frame},
        frames::{FrameReader, ReadFrameError},
    },
};

/// A connection attempt gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives from this side too: NATs and the server's idle timer see traffic, and a core
/// restarted after a crash answers the next one with a stateless reset, so this bounds how
/// long a consumer takes to notice and fail over.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A connection silent this long is gone (the smaller of both sides' values applies).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for the server to hear of it.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Connects to a QUIC endpoint with mutual TLS (ALPN `workerpush/1`).
pub struct QuicTransport {
    addr: String,
    host: String,
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    max_code_bytes: u64,
}

impl QuicTransport {
    /// `addr` is `host:port`; the host is also the name checked against the server
    /// certificate. `tls` comes from [`crate::tls::client_config`] with the QUIC purpose.
    ///
    /// Binds the client socket now (IPv4 or IPv6 after the address's first resolution, which
    /// may block on DNS for a host name), so call it inside a Tokio runtime.
    pub fn new(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Self, ClientError> {
        let host = host_of(addr)?.to_owned();
        ServerName::try_from(host.clone())
            .map_err(|e| ClientError::Config(format!("server name {host:?}: {e}")))?;
        let first = addr
            .to_socket_addrs()
            .map_err(|e| ClientError::Config(format!("resolve {addr:?}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Config(format!("{addr:?} resolves to no address")))?;
        let bind = match first {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Config(format!("QUIC TLS: {e}")))?;
        let transport = crate::quic::transport_config(KEEP_ALIVE, IDLE_TIMEOUT, 0)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        let endpoint = Endpoint::client(bind)
            .map_err(|e| ClientError::Config(format!("bind QUIC client socket {bind}: {e}")))?;
        Ok(Self {
            addr: addr.to_owned(),
            host,
            endpoint,
            config,
            max_code_bytes: DEFAULT_MAX_CODE_BYTES,
        })
    }

    /// The largest bundle a fetch takes ([`DEFAULT_MAX_CODE_BYTES`] unless set).
    pub fn with_max_code_bytes(mut self, max_code_bytes: u64) -> Self {
        self.max_code_bytes = max_code_bytes;
        self
    }

    /// The server's address now (DNS may have moved it), in the family of our socket.
    async fn resolve(&self) -> Result<SocketAddr, ClientError> {
        let local = self
            .endpoint
            .local_addr()
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| ClientError::Transport(format!("resolve {}: {e}", self.addr)))?
            .find(|remote| remote.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| {
                ClientError::Transport(format!(
                    "{} has no address of the socket's family",
                    self.addr
                ))
            })
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn name(&self) -> &'static str {
        "quic"
    }

    async fn connect(&self) -> Result<Box<dyn Session>, ClientError> {
        let remote = self.resolve().await?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), remote, &self.host)
            .map_err(|e| ClientError::Transport(format!("connect {}: {e}", self.addr)))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Transport(format!("connect {}: timed out", self.addr)))?
            .map_err(|e| ClientError::Transport(format!("connect {}: {e}", self.addr)))?;
        Ok(Box::new(QuicSession {
            connection,
            max_code_bytes: self.max_code_bytes,
            acks: tokio::sync::Mutex::new(None),
        }))
    }

    /// Closes every connection with code 0 and waits until the close went out, so that the
    /// core sees the consumer leave at once instead of after its idle timeout.
    async fn close(&self) {
        self.endpoint.close(0u32.into(), b"consumer stopped");
        let _ = tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await;
    }
}

/// One connection. Dropping it closes the connection once the streams it opened (a
/// subscription still being read) are dropped too: quinn closes on the last handle.
struct QuicSession {
    connection: Connection,
    max_code_bytes: u64,
    /// The session's ack stream (its send side and its answers), opened by the first batch
    /// and again after a refusal.
    acks: tokio::sync::Mutex<Option<(quinn::SendStream, FrameReader)>>,
}

fn transport_error(error: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(error.to_string())
}

fn status(status: Status) -> ClientError {
    ClientError::Status {
        code: status.code,
        message: status.message,
    }
}

fn unexpected(what: &str, response: &Response) -> ClientError {
    let kind = match response {
        Response::Update(_) => "update",
        Response::Registered(_) => "registered",
        Response::Deregistered(_) => "deregistered",
        Response::Acked(_) => "acked",
        Response::Chunk(_) => "chunk",
        Response::Workers(_) => "workers",
        Response::Error(_) => "error",
    };
    ClientError::Transport(format!("unexpected {kind} frame in answer to {what}"))
}

/// The next answer on a request's stream; `Ok(None)` when the server finished it.
async fn next(frames: &mut FrameReader) -> Result<Option<Response>, ClientError> {
    match frames.next::<QuicResponse>().await {
        Ok(Some(QuicResponse {
            response: Some(response),
        })) => Ok(Some(response)),
        Ok(Some(QuicResponse { response: None })) => {
            Err(ClientError::Transport("empty response frame".to_owned()))
        }
        Ok(None) => Ok(None),
        Err(ReadFrameError::Read(error)) => Err(transport_error(error)),
        Err(error) => Err(ClientError::Transport(format!("from server: {error}"))),
    }
}

impl QuicSession {
    /// Opens a stream and sends `request` on it.
    async fn open(&self, request: Request) -> Result<FrameReader, ClientError> {
        let (mut send, recv) = self.connection.open_bi().await.map_err(transport_error)?;
        let frame = encode_frame(&QuicRequest {
            request: Some(request),
        });
        send.write_all(&frame).await.map_err(transport_error)?;
        send.finish().map_err(transport_error)?;
        Ok(FrameReader::new(recv, MAX_FRAME_BYTES))
    }

    /// A request answered by one frame.
    async fn unary(&self, request: Request) -> Result<Response, ClientError> {
        let mut frames = self.open(request).await?;
        match next(&mut frames).await? {
            Some(Response::Error(refused)) => Err(status(refused)),
            Some(response) => Ok(response),
            None => Err(ClientError::Transport(
                "stream finished without an answer".to_owned(),
            )),
        }
    }
}

#[async_trait]
impl Session for QuicSession {
    async fn subscribe(&self, request: SubscribeRequest) -> Result<UpdateStream, ClientError> {
        let mut frames = self.open(Request::Subscribe(request)).await?;
        // The server answers at once (replay or RESET, or a refusal): wait for it, so that a
        // refusal is the result of `subscribe`, as over gRPC.
        let first = match next(&mut frames).await? {
            Some(Response::Update(update)) => update,
            Some(Response::Error(refused)) => return Err(status(refused)),
            Some(other) => return Err(unexpected("subscribe", &other)),
            None => {
                return Err(ClientError::Transport(
                    "subscription finished before its first update".to_owned(),
                ));
            }
        };
        let rest = futures_util::stream::unfold(Some(frames), |frames| async move {
            let mut frames = frames?;
            let item: Result<WorkerUpdate, ClientError> = match next(&mut frames).await {
                Ok(Some(Response::Update(update))) => return Some((Ok(update), Some(frames))),
                Ok(Some(Response::Error(refused))) => Err(status(refused)),
                Ok(Some(other)) => Err(unexpected("subscribe", &other)),
                Ok(None) => return None,
                Err(error) => Err(error),
            };
            Some((item, None))
        });
        Ok(Box::pin(
            futures_util::stream::iter([Ok(first)]).chain(rest),
        ))
    }

    async fn fetch(&self, request: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
        let mut frames = self.open(Request::Fetch(request)).await?;
        let mut assembly = Assembly::new(self.max_code_bytes);
        while let Some(response) = next(&mut frames).await? {
            match response {
                Response::Chunk(chunk) => assembly.push(chunk)?,
                Response::Error(refused) => return Err(status(refused)),
                other => return Err(unexpected("fetch", &other)),
            }
        }
        Ok(assembly.finish())
    }

    async fn ack(&self, request: AckRequest) -> Result<(), ClientError> {
        match self.unary(Request::Ack(request)).await? {
            Response::Acked(_) => Ok(()),
            other => Err(unexpected("ack", &other)),
        }
    }

    async fn ack_batch(&self, acks: Vec<AckRequest>) -> Result<(), ClientError> {
        let frame = encode_frame(&QuicRequest {
            request: Some(Request::Acks(AckBatch { acks })),
        });
        let mut held = self.acks.lock().await;
        let answer = async {
            let (send, frames) = match held.as_mut() {
                Some(stream) => stream,
                None => {
                    let (send, recv) = self.connection.open_bi().await.map_err(transport_error)?;
                    held.insert((send, FrameReader::new(recv, MAX_FRAME_BYTES)))
                }
            };
            send.write_all(&frame).await.map_err(transport_error)?;
            match next(frames).await? {
                Some(Response::Acked(_)) => Ok(()),
                Some(Response::Error(refused)) => Err(status(refused)),
                Some(other) => Err(unexpected("acks", &other)),
                None => Err(ClientError::Transport(
                    "ack stream finished without an answer".to_owned(),
                )),
            }
        }
        .await;
        if answer.is_err() {
            // A refused or broken stream is done: the next batch opens another.
            *held = None;
        }
        answer
    }

    async fn register(&self, request: RegisterRequest) -> Result<RegisterResponse, ClientError> {
        match self.unary(Request::Register(request)).await? {
            Response::Registered(response) => Ok(response),
            other => Err(unexpected("register", &other)),
        }
    }

    async fn deregister(
        &self,
        request: DeregisterRequest,
    ) -> Result<DeregisterResponse, ClientError> {
        match self.unary(Request::Deregister(request)).await? {
            Response::Deregistered(response) => Ok(response),
            other => Err(unexpected("deregister", &other)),
        }
    }

    async fn list(&self, request: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
        match self.unary(Request::List(request)).await? {
            Response::Workers(response) => Ok(response),
            other => Err(unexpected("list", &other)),
        }
    }
}
