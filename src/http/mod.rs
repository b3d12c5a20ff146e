//! HTTP: the core's signed hook ([`hook`]), its admin API and live status page ([`admin`],
//! [`status_page`]), the deployer-facing upload API ([`upload`]), the hook signature
//! ([`signing`]), bearer tokens ([`auth`]) and what they share: the one mapping from the core's
//! [`ErrorCode`] to HTTP statuses, the JSON error body, the `?wait=` parameter, bounded body
//! reading, and [`serve`], which runs a router on a bound listener with timeouts against slow
//! clients and a graceful drain.
//!
//! No request is logged with its URI: the status page takes its token as a query parameter.
//!
//! Depends on [`crate::core`] (errors and the [`crate::core::Core`] API); the core never
//! depends on this module.

pub mod admin;
pub mod auth;
pub mod auth_failures;
pub mod deploy_tokens;
pub mod hook;
pub mod limits;
pub mod sessions;
pub mod signing;
pub mod status_page;
pub mod upload;

use std::{error::Error as StdError, io, net::SocketAddr, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::StatusCode;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tower_http::timeout::{RequestBodyDeadlineLayer, RequestBodyTimeoutLayer, TimeoutLayer};
use tracing::Instrument;

use crate::core::{Coded, ErrorCode};

/// The HTTP status for a core error code. The only place this mapping lives.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists => StatusCode::CONFLICT,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        // The only limit HTTP callers reach is the size of the code.
        ErrorCode::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
    }
}

/// The longest `?wait=` a hook or upload request may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The `wait` query parameter of `uri` (`500ms`, `5s`, `1m`): `None` when absent; an error
/// (400) when malformed or longer than [`MAX_WAIT`].
pub fn wait_param(uri: &http::Uri) -> Result<Option<Duration>, ApiError> {
    #[derive(serde::Deserialize)]
    struct WaitQuery {
        wait: Option<String>,
    }
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, message);
    let axum::extract::Query(query) = axum::extract::Query::<WaitQuery>::try_from_uri(uri)
        .map_err(|e| bad(format!("invalid query string: {e}")))?;
    let Some(text) = query.wait else {
        return Ok(None);
    };
    let wait = crate::config::parse_duration(&text).map_err(|e| bad(format!("wait: {e}")))?;
    if wait > MAX_WAIT {
        return Err(bad(format!(
            "wait: {text:?} is longer than the limit of {}s",
            MAX_WAIT.as_secs()
        )));
    }
    Ok(Some(wait))
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The status line.
    pub status: StatusCode,
    /// What the client is told.
    pub message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// The answer for a core error: status from its [`ErrorCode`], message from
    /// [`Coded::client_message`]. Internal errors are logged here with their details.
    pub fn from_coded<E: Coded + ?Sized>(error: &E) -> Self {
        let code = error.code();
        if code == ErrorCode::Internal {
            tracing::error!(%error, "internal error");
        }
        Self::new(status_for(code), error.client_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More than the limit; reading stopped at the limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The client stopped sending.
    #[error("request body timed out")]
    TimedOut,
    /// The connection failed or the framing was bad.
    #[error("request body could not be read")]
    Failed,
}

impl BodyError {
    /// Classifies a body read error from any layer (hyper, the timeout layers, multer).
    pub fn classify(error: &(dyn StdError + 'static)) -> Self {
        let mut current = Some(error);
        while let Some(e) = current {
            if e.is::<tower_http::timeout::TimeoutError>() {
                return Self::TimedOut;
            }
            current = e.source();
        }
        Self::Failed
    }

    /// A metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::TimedOut => "body_timeout",
            Self::Failed => "body_read",
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> Self {
        let status = match error {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            BodyError::Failed => StatusCode::BAD_REQUEST,
        };
        Self::new(status, error.to_string())
    }
}

/// Reads a whole body into memory, refusing it as soon as it passes `limit` bytes (before
/// reading further) and up front when its `Content-Length` already says so.
pub async fn read_body(
    content_length: Option<u64>,
    body: Body,
    limit: u64,
) -> Result<Bytes, BodyError> {
    if content_length.is_some_and(|len| len > limit) {
        return Err(BodyError::TooLarge { limit });
    }
    let capacity = content_length.unwrap_or(0).min(limit);
    let mut buffer = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::classify(&e))?;
        if buffer.len() as u64 + chunk.len() as u64 > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// The `Content-Length` of a request, if given and numeric.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Timeouts of [`serve_with`].
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Time a client has to send a request head (HTTP/1), and a new connection its first
    /// request (either protocol).
    pub header_read_timeout: Duration,
    /// Longest pause between two pieces of a request body.
    pub body_idle_timeout: Duration,
    /// Longest time for a whole request body.
    pub body_deadline: Duration,
    /// Longest time for a handler to answer (503 after it).
    pub request_timeout: Duration,
    /// After shutdown, how long in-flight requests get to finish before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(15),
            body_deadline: Duration::from_secs(300),
            request_timeout: Duration::from_secs(330),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Serves `router` on `listener` (HTTP/1.1 and h2c) with [`ServeConfig::default`] until
/// `shutdown` is cancelled, then stops accepting, lets in-flight requests finish and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with(listener, router, shutdown, ServeConfig::default()).await
}

/// [`serve`] with explicit timeouts.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    config: ServeConfig,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let app = router
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            config.request_timeout,
        ))
        .layer(RequestBodyDeadlineLayer::new(config.body_deadline))
        .layer(RequestBodyTimeoutLayer::new(config.body_idle_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));

    let mut connections = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_per_connection(&error) => continue,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%local, %error, "accept failed; pausing");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(250)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let first_request = limits::FirstRequest::default();
        let service = TowerToHyperService::new(first_request.mark(app.clone(), remote));
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let first_deadline = (first_request, config.header_read_timeout);
        let span = tracing::debug_span!("http_connection", %local, %remote);
        connections.spawn(
            async move {
                serve_connection(builder, stream, service, remote, first_deadline, shutdown).await;
            }
            .instrument(span),
        );
    }
    drop(listener);

    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(config.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(%local, open = connections.len(), "shutdown grace over; closing connections");
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

async fn serve_connection(
    builder: auto::Builder<TokioExecutor>,
    stream: tokio::net::TcpStream,
    service: TowerToHyperService<limits::Marked<Router>>,
    remote: SocketAddr,
    (first_request, within): (limits::FirstRequest, Duration),
    shutdown: CancellationToken,
) {
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let first_deadline = tokio::time::sleep(within);
    tokio::pin!(first_deadline);
    let mut waiting_for_first = true;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = &mut first_deadline, if waiting_for_first => {
                waiting_for_first = false;
                if !first_request.seen() {
                    metrics::counter!("workerpush_limit_refusals_total", "limit" => "http_first_request_timeout").increment(1);
                    tracing::debug!(%remote, ?within, "no request on a new connection; closing it");
                    return;
                }
            }
            () = shutdown.cancelled() => {
                // Finish what is in flight; idle keep-alive connections close now.
                connection.as_mut().graceful_shutdown();
                break connection.await;
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%remote, %error, "connection ended with an error");
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Current unix time in seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A server on 127.0.0.1:0 that tests stop explicitly.

    use std::{io, net::SocketAddr};

    use axum::Router;
    use tokio::{net::TcpListener, task::JoinHandle};
    use tokio_util::sync::CancellationToken;

    use super::ServeConfig;

    pub(crate) struct TestServer {
        pub(crate) addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<io::Result<()>>,
    }

    impl TestServer {
        pub(crate) async fn start(router: Router) -> Self {
            Self::start_with(router, ServeConfig::default()).await
        }

        pub(crate) async fn start_with(router: Router, config: ServeConfig) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            Self::on(listener, router, config)
        }

        pub(crate) fn on(listener: TcpListener, router: Router, config: ServeConfig) -> Self {
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(super::serve_with(
                listener,
                router,
                shutdown.clone(),
                config,
            ));
            Self {
                addr,
                shutdown,
                task,
            }
        }

        pub(crate) fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        pub(crate) async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.unwrap().unwrap();
        }
    }

    pub(crate) fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().build().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::Notify,
    };

    use super::{testing::TestServer, *};
    use crate::core::PublishError;

    #[test]
    fn wait_parameter_parses_durations_up_to_the_cap() {
        let wait = |query: &str| wait_param(&format!("/upload{query}").parse().unwrap());
        assert_eq!(wait(""), Ok(None));
        assert_eq!(wait("?other=1"), Ok(None));
        assert_eq!(wait("?wait=5s"), Ok(Some(Duration::from_secs(5))));
        assert_eq!(wait("?wait=250ms"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(wait("?wait=0"), Ok(Some(Duration::ZERO)));
        assert_eq!(wait("?wait=1m"), Ok(Some(MAX_WAIT)));
        for bad in ["?wait=61s", "?wait=2m", "?wait=", "?wait=soon", "?wait=-1s"] {
            let error = wait(bad).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                error.message.starts_with("wait: "),
                "{bad}: {}",
                error.message
            );
        }
    }

    #[test]
    fn error_codes_map_to_http_statuses() {
        let expected = [
            (ErrorCode::InvalidArgument, 400),
            (ErrorCode::Unauthenticated, 401),
            (ErrorCode::PermissionDenied, 403),
            (ErrorCode::NotFound, 404),
            (ErrorCode::AlreadyExists, 409),
            (ErrorCode::ResourceExhausted, 413),
            (ErrorCode::Internal, 500),
            (ErrorCode::Unavailable, 503),
        ];
        for (code, status) in expected {
            assert_eq!(status_for(code).as_u16(), status, "{code:?}");
        }
        let too_large = ApiError::from_coded(&PublishError::TooLarge { size: 2, limit: 1 });
        assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
        let down = ApiError::from_coded(&PublishError::Store(
            crate::store::StoreError::Unavailable("redis gone at 10.0.0.1".to_owned()),
        ));
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!down.message.contains("10.0.0.1"), "{}", down.message);
    }

    #[tokio::test]
    async fn slow_client_headers_time_out_and_the_connection_closes() {
        let config = ServeConfig {
            header_read_timeout: Duration::from_millis(200),
            ..ServeConfig::default()
        };
        let router = Router::new().route("/", get(|| async { "ok" }));
        let server = TestServer::start_with(router, config).await;
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
            .await
            .expect("connection still open after the header timeout");
        assert!(
            closed.is_ok() || closed.is_err_and(|e| e.kind() == io::ErrorKind::ConnectionReset)
        );
        // The server still serves others.
        let answer = testing::client().get(server.url("/")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_client_body_times_out_with_408() {
        let config = ServeConfig {
            body_idle_timeout: Duration::from_millis(200),
            ..ServeConfig::default()
        };
        let router = Router::new().route(
            "/",
            axum::routing::post(|headers: http::HeaderMap, body: Body| async move {
                match read_body(content_length(&headers), body, 1 << 20).await {
                    Ok(bytes) => (StatusCode::OK, bytes.len().to_string()).into_response(),
                    Err(e) => ApiError::from(e).into_response(),
                }
            }),
        );
        let server = TestServer::start_with(router, config).await;
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly some")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("body timeout did not end the request")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_lets_in_flight_requests_finish() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let router = {
            let (entered, release) = (entered.clone(), release.clone());
            Router::new().route(
                "/slow",
                get(move || async move {
                    entered.notify_one();
                    release.notified().await;
                    "finished"
                }),
            )
        };
        let server = TestServer::start(router).await;
        let url = server.url("/slow");
        let request = tokio::spawn(async move { testing::client().get(url).send().await });
        entered.notified().await;
        let addr = server.addr;
        let stopping = tokio::spawn(server.stop());
        // New connections are refused once the listener is dropped; wait for that rather
        // than sleeping.
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
        assert!(!stopping.is_finished());
        release.notify_one();
        let answer = request.await.unwrap().unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.text().await.unwrap(), "finished");
        stopping.await.unwrap();
    }
}
