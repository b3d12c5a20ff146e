//! Accepts TCP connections and completes the mutual-TLS handshake before tonic sees them, so
//! that every connection carries its verified identity ([`PeerInfo`]) and slow or hostile
//! handshakes are bounded in time and number.
//!
//! After the handshake, a connection has one more handshake timeout to send the HTTP/2
//! preface (hyper has no such deadline of its own), and a connection past its identity's
//! connection quota is marked refused: the service answers RESOURCE_EXHAUSTED to its calls,
//! and it is closed one handshake timeout later, so refused connections cannot pile up.
//!
//! Each connection is tracked in [`tls::LiveConnections`] and fails its next read or write
//! once its client certificate is revoked, which makes hyper drop it with every stream on it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    time::Sleep,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::{
    peers::{self, ConnectionRecord},
    quota::{IdentityQuota, QuotaExceeded, QuotaPermit},
    tls,
};

/// Length of the HTTP/2 client preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: usize = 24;

/// Who is at the other end of a connection, verified by the handshake.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// The certificate identity (SPIFFE consumer id or CN).
    pub identity: Arc<str>,
    /// Set when the identity is over its connection quota: every call is refused with this.
    pub refused: Option<QuotaExceeded>,
}

/// A TLS connection with its peer's identity, as tonic's incoming stream wants it.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Reads fail once this fires: set until the HTTP/2 preface is in, and for good on a
    /// refused connection.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Preface bytes still to come.
    preface_left: usize,
    /// This connection counted against its identity's quota (none when refused).
    _quota: Option<QuotaPermit>,
    /// Registered while the connection lives.
    _tracked: tls::Tracked,
    /// Logs the disconnect when hyper drops the connection.
    _record: ConnectionRecord,
    /// Ready once the client certificate is revoked.
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl TlsConnection {
    /// An error once the certificate is revoked; otherwise registers `cx` to be woken then.
    fn still_trusted(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate revoked",
            ));
        }
        Ok(())
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // hyper keeps a read pending for the life of the connection, so a revocation wakes it.
        this.still_trusted(cx)?;
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            let why = if this.peer.refused.is_some() {
                "refused connection closed"
            } else {
                "no HTTP/2 preface within the handshake timeout"
            };
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.preface_left > 0 {
            let got = buf.filled().len() - before;
            this.preface_left = this.preface_left.saturating_sub(got);
            if this.preface_left == 0 && this.peer.refused.is_none() {
                this.deadline = None;
            }
        }
        read
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.still_trusted(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.still_trusted(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Bounds on handshakes.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeLimits {
    /// A handshake not done within this is dropped.
    pub timeout: Duration,
    /// At most this many handshakes at once; more connections wait in the backlog.
    pub concurrent: usize,
}

/// Accepts on `listener` until `shutdown`, yielding verified connections tracked in
/// `connections`, each counted against (or refused by) its identity's connection `quota`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    connections: Arc<tls::LiveConnections>,
    limits: HandshakeLimits,
    quota: Arc<IdentityQuota>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = mpsc::channel(limits.concurrent.max(1));
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(limits.concurrent.max(1)));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "grpc accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let quota = quota.clone();
            let connections = connections.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let handshake = tokio::time::timeout(limits.timeout, acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        metrics::counter!("workerpush_handshake_failures_total", "transport" => "grpc").increment(1);
                        peers::handshake_failed("grpc", remote, &error.to_string());
                        return;
                    }
                    Err(_) => {
                        metrics::counter!("workerpush_handshake_failures_total", "transport" => "grpc").increment(1);
                        peers::handshake_failed(
                            "grpc",
                            remote,
                            &format!(
                                "no handshake within {:?} (--handshake-timeout)",
                                limits.timeout
                            ),
                        );
                        return;
                    }
                };
                let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
                let identity = match chain.first().map(tls::identity_of) {
                    Some(Ok(identity)) => identity,
                    Some(Err(error)) => {
                        peers::handshake_failed(
                            "grpc",
                            remote,
                            &format!("client certificate has no identity: {error}"),
                        );
                        return;
                    }
                    None => {
                        peers::handshake_failed("grpc", remote, "no client certificate");
                        return;
                    }
                };
                let tracked = connections.track(chain);
                let revoked = Box::pin(tracked.cut().clone().cancelled_owned());
                let identity: Arc<str> = identity.into();
                let (permit, refused) = match quota.connection(&identity) {
                    Ok(permit) => (Some(permit), None),
                    Err(exceeded) => {
                        metrics::counter!("workerpush_limit_refusals_total", "limit" => "grpc_connections_per_identity").increment(1);
                        tracing::info!(%remote, %identity, %exceeded, "grpc connection refused");
                        (None, Some(exceeded))
                    }
                };
                let record = ConnectionRecord::connected("grpc", identity.clone(), remote);
                let connection = TlsConnection {
                    stream,
                    peer: PeerInfo {
                        remote,
                        identity,
                        refused,
                    },
                    deadline: Some(Box::pin(tokio::time::sleep(limits.timeout))),
                    preface_left: H2_PREFACE_LEN,
                    _quota: permit,
                    _tracked: tracked,
                    _record: record,
                    revoked,
                };
                let _ = tx.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
