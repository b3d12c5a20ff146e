//! The upload server: the deployer-facing `POST /upload` and `DELETE /workers/{name}` behind a
//! bearer token, forwarding each change to the core's signed hook.
//!
//! It holds no state of its own: a change is accepted only when the core answered 2xx, which
//! means durable. Transient failures to reach the core are retried with jittered exponential
//! backoff for a bounded time; that is safe for uploads because versions are immutable (a
//! repeat is a no-op at the core), and every attempt is signed afresh with a new multipart
//! boundary so the core's replay guard never sees the same signature twice.
//!
//! Depends on [`crate::core`] only for validation of names and versions; it never touches a
//! store.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::{
    ApiError, BodyError,
    auth::{BearerToken, bearer},
    content_length,
    deploy_tokens::{DeployTokens, Deployer},
    hook::{Action, FORM_OVERHEAD_BYTES, Metadata},
    signing::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign},
    unix_now, wait_param,
};
use crate::core::{Version, WorkerName};

/// Where the core's hook listens unless configured (`GRPC_SERVER_URL`, the seed's name).
pub const DEFAULT_CORE_URL: &str = "http://127.0.0.1:8082";
/// The largest worker file accepted unless configured (`MAX_UPLOAD_BYTES`).
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 10 << 20;

/// Largest `filename` or `version` form field read.
const TEXT_FIELD_LIMIT: u64 = 1024;
/// Largest answer read from the core.
const CORE_ANSWER_LIMIT: usize = 64 << 10;
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Configuration of the upload server.
#[derive(Clone)]
pub struct UploadConfig {
    /// The bearer token deployers present (`UPLOAD_TOKEN`). Must not be empty.
    pub upload_token: String,
    /// The secret the hook requests are signed with (`HOOK_SECRET`). Must not be empty.
    pub hook_secret: Arc<[u8]>,
    /// Base URL of the core's hook server (`GRPC_SERVER_URL`); `/internal/broadcast` is
    /// appended to its path.
    pub core_url: reqwest::Url,
    /// Largest worker file accepted (`MAX_UPLOAD_BYTES`).
    pub max_upload_bytes: u64,
    /// How long to keep retrying a core that cannot be reached or answers 502/503/504.
    pub retry_budget: Duration,
    /// Timeout of one request to the core, sending included.
    pub attempt_timeout: Duration,
    /// The named deploy tokens (`--tokens-file`) besides `upload_token`.
    pub deploy_tokens: Arc<DeployTokens>,
}

impl UploadConfig {
    /// A configuration with the default size limit and retry budget.
    pub fn new(
        upload_token: impl Into<String>,
        hook_secret: Arc<[u8]>,
        core_url: reqwest::Url,
    ) -> Self {
        Self {
            upload_token: upload_token.into(),
            hook_secret,
            core_url,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            retry_budget: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(30),
            deploy_tokens: Arc::new(DeployTokens::none()),
        }
    }
}

impl fmt::Debug for UploadConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UploadConfig")
            .field("upload_token", &"<redacted>")
            .field("hook_secret", &"<redacted>")
            .field("core_url", &self.core_url.as_str())
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("retry_budget", &self.retry_budget)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("deploy_tokens", &self.deploy_tokens.path())
            .finish()
    }
}

/// Why [`router`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UploadSetupError {
    /// An empty token would let anyone upload.
    #[error("upload token is empty")]
    EmptyToken,
    /// An empty secret would sign requests anyone can forge.
    #[error("hook secret is empty")]
    EmptySecret,
    /// The core URL cannot carry HTTP.
    #[error("core URL {0} must be http:// or https://")]
    CoreUrl(String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

struct UploadState {
    config: UploadConfig,
    broadcast_url: reqwest::Url,
    token: BearerToken,
    client: reqwest::Client,
}

/// The upload routes: `POST /upload`, `DELETE /workers/{name}` (both with the bearer token)
/// and `GET /healthz`.
pub fn router(config: UploadConfig) -> Result<Router, UploadSetupError> {
    let token = BearerToken::new(&config.upload_token).ok_or(UploadSetupError::EmptyToken)?;
    if config.hook_secret.is_empty() {
        return Err(UploadSetupError::EmptySecret);
    }
    if !matches!(config.core_url.scheme(), "http" | "https") || config.core_url.cannot_be_a_base() {
        return Err(UploadSetupError::CoreUrl(config.core_url.to_string()));
    }
    let mut broadcast_url = config.core_url.clone();
    let path = format!(
        "{}/internal/broadcast",
        config.core_url.path().trim_end_matches('/')
    );
    broadcast_url.set_path(&path);
    broadcast_url.set_query(None);
    // reqwest without a bundled provider panics when none is installed; installing ring is a
    // no-op when `main` already did.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let state = Arc::new(UploadState {
        token,
        config,
        broadcast_url,
        client,
    });
    Ok(Router::new()
        .route("/upload", post(upload))
        .route("/workers/{name}", delete(delete_worker))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/healthz", get(healthz))
        .with_state(state))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// A refused request: counted, logged, answered with a JSON error.
#[derive(Debug)]
struct Refused {
    reason: &'static str,
    error: ApiError,
}

impl Refused {
    fn new(reason: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self::from_error(reason, ApiError::new(status, message))
    }

    fn from_error(reason: &'static str, error: ApiError) -> Self {
        Self { reason, error }
    }
}

impl From<BodyError> for Refused {
    fn from(error: BodyError) -> Self {
        Self {
            reason: error.reason(),
            error: error.into(),
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        metrics::counter!("workerpush_upload_refusals_total", "reason" => self.reason).increment(1);
        tracing::info!(reason = self.reason, status = self.error.status.as_u16(), error = %self.error.message, "upload request refused");
        self.error.into_response()
    }
}

/// Checks `Authorization: Bearer <token>` before the handler runs, so a refused request's
/// body is never read.
async fn require_token(
    State(state): State<Arc<UploadState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let deployer = if state.token.authorizes(request.headers()) {
        Some(Deployer::upload_token())
    } else {
        bearer(request.headers()).and_then(|t| state.config.deploy_tokens.deployer(t))
    };
    if let Some(deployer) = deployer {
        request.extensions_mut().insert(deployer);
        return next.run(request).await;
    }
    let mut response = Refused::new(
        "unauthenticated",
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A received upload, checksummed while it streamed in.
struct Received {
    worker: WorkerName,
    version: Version,
    code: Bytes,
    checksum: String,
}

/// 403 for a deploy token whose patterns do not cover `worker`.
fn forbidden(deployer: &Deployer, worker: &WorkerName) -> Response {
    Refused::new(
        "forbidden",
        StatusCode::FORBIDDEN,
        format!(
            "deploy token {} may not change worker {worker} (see its patterns in the tokens file)",
            deployer.name
        ),
    )
    .into_response()
}

async fn upload(
    State(state): State<Arc<UploadState>>,
    Extension(deployer): Extension<Deployer>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let wait = match wait_param(&uri) {
        Ok(wait) => wait,
        Err(error) => return Refused::from_error("invalid_wait", error).into_response(),
    };
    let received = match receive(&state.config, &headers, body).await {
        Ok(received) => received,
        Err(refused) => return refused.into_response(),
    };
    if !deployer.may_change(received.worker.as_str()) {
        return forbidden(&deployer, &received.worker);
    }
    tracing::info!(worker = %received.worker, version = %received.version, size = received.code.len(), deployer = %deployer.name, "upload received; forwarding to core");
    let metadata = Metadata {
        worker_name: received.worker.to_string(),
        version: Some(received.version.to_string()),
        checksum: Some(received.checksum),
        action: Action::Put,
        deployer: Some(deployer.name.to_string()),
    };
    forward(
        &state,
        &metadata,
        Some(received.code),
        Retry::Idempotent,
        wait,
    )
    .await
}

async fn delete_worker(
    State(state): State<Arc<UploadState>>,
    Extension(deployer): Extension<Deployer>,
    Path(name): Path<String>,
    uri: Uri,
) -> Response {
    let wait = match wait_param(&uri) {
        Ok(wait) => wait,
        Err(error) => return Refused::from_error("invalid_wait", error).into_response(),
    };
    let worker = match WorkerName::parse(&name) {
        Ok(worker) => worker,
        Err(e) => {
            return Refused::new("invalid", StatusCode::BAD_REQUEST, e.to_string()).into_response();
        }
    };
    if !deployer.may_change(worker.as_str()) {
        return forbidden(&deployer, &worker);
    }
    let metadata = Metadata {
        worker_name: worker.to_string(),
        version: None,
        checksum: None,
        action: Action::Delete,
        deployer: Some(deployer.name.to_string()),
    };
    forward(&state, &metadata, None, Retry::UnsentOnly, wait).await
}

/// Streams the multipart form: `filename` and `version` are validated as they arrive, `file`
/// is hashed and counted chunk by chunk and refused the moment it passes the limit.
async fn receive(
    config: &UploadConfig,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received, Refused> {
    let limit = config.max_upload_bytes;
    let stream_limit = limit.saturating_add(FORM_OVERHEAD_BYTES);
    if content_length(headers).is_some_and(|len| len > stream_limit) {
        return Err(too_large(limit));
    }
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
        .ok_or_else(|| {
            Refused::new(
                "invalid_form",
                StatusCode::BAD_REQUEST,
                "expected a multipart/form-data body with fields filename, version and file",
            )
        })?;
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(stream_limit)
            .for_field("filename", TEXT_FIELD_LIMIT)
            .for_field("version", TEXT_FIELD_LIMIT),
    );
    let mut form =
        multer::Multipart::with_constraints(body.into_data_stream(), boundary, constraints);

    let (mut worker, mut version, mut file) = (None, None, None);
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| multipart_refusal(e, limit))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "filename" if worker.is_none() => {
                let text = text_field(field, &name, limit).await?;
                worker = Some(WorkerName::parse(&text).map_err(invalid)?);
            }
            "version" if version.is_none() => {
                let text = text_field(field, &name, limit).await?;
                version = Some(Version::parse(&text).map_err(invalid)?);
            }
            "file" if file.is_none() => {
                let mut hasher = Sha256::new();
                let mut code = BytesMut::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| multipart_refusal(e, limit))?
                {
                    if code.len() as u64 + chunk.len() as u64 > limit {
                        return Err(too_large(limit));
                    }
                    hasher.update(&chunk);
                    code.extend_from_slice(&chunk);
                }
                file = Some((code.freeze(), hex::encode(hasher.finalize())));
            }
            "filename" | "version" | "file" => {
                return Err(Refused::new(
                    "invalid_form",
                    StatusCode::BAD_REQUEST,
                    format!("form field {name:?} given twice"),
                ));
            }
            _ => {
                return Err(Refused::new(
                    "invalid_form",
                    StatusCode::BAD_REQUEST,
                    format!("unexpected form field {name:?}: expected filename, version and file"),
                ));
            }
        }
    }
    let missing = |field: &str| {
        Refused::new(
            "missing_field",
            StatusCode::BAD_REQUEST,
            format!("missing form field {field:?}"),
        )
    };
    let worker = worker.ok_or_else(|| missing("filename"))?;
    let version = version.ok_or_else(|| missing("version"))?;
    let (code, checksum) = file.ok_or_else(|| missing("file"))?;
    Ok(Received {
        worker,
        version,
        code,
        checksum,
    })
}

async fn text_field(field: multer::Field<'_>, name: &str, limit: u64) -> Result<String, Refused> {
    let bytes = field
        .bytes()
        .await
        .map_err(|e| multipart_refusal(e, limit))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        Refused::new(
            "invalid",
            StatusCode::BAD_REQUEST,
            format!("form field {name:?} is not UTF-8"),
        )
    })
}

fn invalid(error: crate::core::InvalidInput) -> Refused {
    Refused::new("invalid", StatusCode::BAD_REQUEST, error.to_string())
}

fn too_large(limit: u64) -> Refused {
    Refused::new(
        "too_large",
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("worker file is larger than the limit of {limit} bytes"),
    )
}

fn multipart_refusal(error: multer::Error, limit: u64) -> Refused {
    match &error {
        // A name or version far too long is a malformed field, said as such, not a file size.
        multer::Error::FieldSizeExceeded {
            field_name: Some(field),
            ..
        } if field == "filename" || field == "version" => {
            let rule = if field == "version" {
                crate::core::error::VERSION_RULE
            } else {
                crate::core::error::WORKER_NAME_RULE
            };
            Refused::new(
                "invalid",
                StatusCode::BAD_REQUEST,
                format!("form field {field:?} is longer than {TEXT_FIELD_LIMIT} bytes: {rule}"),
            )
        }
        multer::Error::FieldSizeExceeded { .. } | multer::Error::StreamSizeExceeded { .. } => {
            too_large(limit)
        }
        multer::Error::StreamReadFailed(source) => BodyError::classify(source.as_ref()).into(),
        _ => Refused::new(
            "invalid_form",
            StatusCode::BAD_REQUEST,
            format!("invalid multipart body: {error}"),
        ),
    }
}

/// Which failures to reach the core may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Any transport failure and 502/503/504: repeating the request cannot change the outcome.
    Idempotent,
    /// Only what certainly did not happen: connect failures and 503. A delete that may have
    /// been applied is not repeated, or its repeat would answer 404.
    UnsentOnly,
}

/// A failure worth another attempt, and what to answer if the budget runs out.
enum Transient {
    /// Nothing answered.
    Unreachable(String),
    /// The core answered 503 (shutting down, store unavailable).
    Unavailable(String),
    /// Something between answered 502 or 504.
    Gateway(String),
}

impl Transient {
    fn into_refusal(self) -> Refused {
        match self {
            Self::Unreachable(why) | Self::Unavailable(why) => Refused::new(
                "core_unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("core unavailable: {why}"),
            ),
            Self::Gateway(why) => Refused::new(
                "bad_gateway",
                StatusCode::BAD_GATEWAY,
                format!("core unreachable: {why}"),
            ),
        }
    }
}

/// Sends a signed hook request, retrying transient failures within the budget, and turns the
/// core's answer into ours: 2xx passes through, the core's 400/404/409/413 pass through with
/// its message, anything else is 502 or (core unreachable) 503. With `wait`, the core waits
/// up to that long for propagation and its answer (with the propagation) passes through.
async fn forward(
    state: &UploadState,
    metadata: &Metadata,
    code: Option<Bytes>,
    retry: Retry,
    wait: Option<Duration>,
) -> Response {
    let config = &state.config;
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let transient = match attempt_once(state, metadata, code.clone(), retry, wait).await {
            Ok(response) => return response,
            Err(transient) => transient,
        };
        let delay = jittered(backoff);
        if started.elapsed() + delay > config.retry_budget {
            tracing::warn!(attempts = attempt, elapsed = ?started.elapsed(), "giving up on the core");
            return transient.into_refusal().into_response();
        }
        tracing::debug!(attempt, ?delay, "core not reachable; retrying");
        metrics::counter!("workerpush_upload_core_retries_total").increment(1);
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One signed request to the core. Signed afresh each time, over a body with a new boundary.
async fn attempt_once(
    state: &UploadState,
    metadata: &Metadata,
    code: Option<Bytes>,
    retry: Retry,
    wait: Option<Duration>,
) -> Result<Response, Transient> {
    let (content_type, body) = match encode_form(metadata, code) {
        Ok(form) => form,
        Err(error) => {
            tracing::error!(%error, "could not encode hook metadata");
            return Ok(Refused::new(
                "internal",
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            )
            .into_response());
        }
    };
    let timestamp = unix_now();
    let signature = sign(&state.config.hook_secret, timestamp, &body);
    let mut url = state.broadcast_url.clone();
    if let Some(wait) = wait {
        url.query_pairs_mut()
            .append_pair("wait", &format!("{}ms", wait.as_millis()));
    }
    let sent = state
        .client
        .post(url)
        .header(header::CONTENT_TYPE, content_type)
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(SIGNATURE_HEADER, signature)
        .timeout(state.config.attempt_timeout + wait.unwrap_or_default())
        .body(body)
        .send()
        .await;
    match sent {
        Ok(answer) => judge(answer, retry).await,
        Err(error) => {
            // The full chain names the core's address: logged, not shown to the deployer.
            tracing::info!(error = %error_chain(&error), "request to the core failed");
            let what = if error.is_connect() {
                "cannot connect"
            } else if error.is_timeout() {
                "timed out"
            } else {
                "request failed"
            };
            if error.is_connect() || retry == Retry::Idempotent {
                Err(Transient::Unreachable(what.to_owned()))
            } else {
                Ok(Refused::new(
                    "bad_gateway",
                    StatusCode::BAD_GATEWAY,
                    format!("core {what}; the delete may or may not have been applied"),
                )
                .into_response())
            }
        }
    }
}

/// Turns the core's answer into ours, or says it is worth retrying.
async fn judge(answer: reqwest::Response, retry: Retry) -> Result<Response, Transient> {
    let status = answer.status();
    let retry_after = answer.headers().get(header::RETRY_AFTER).cloned();
    let body = match read_capped(answer).await {
        Ok(body) => body,
        Err(error) if retry == Retry::Idempotent => {
            tracing::info!(%error, "answer of the core unreadable");
            return Err(Transient::Unreachable("answer unreadable".to_owned()));
        }
        Err(error) => {
            tracing::info!(%error, "answer of the core unreadable");
            return Ok(Refused::new(
                "bad_gateway",
                StatusCode::BAD_GATEWAY,
                "core answer unreadable",
            )
            .into_response());
        }
    };
    let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
    let core_message = json
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("core answered {status}"));
    match status.as_u16() {
        200..=299 => Ok(match json {
            Some(json) if json.is_object() => (status, Json(json)).into_response(),
            _ => Refused::new(
                "bad_gateway",
                StatusCode::BAD_GATEWAY,
                "core answered 2xx without a JSON body; the change may or may not be applied",
            )
            .into_response(),
        }),
        400 | 404 | 409 | 413 => {
            Ok(Refused::new("core_rejected", status, core_message).into_response())
        }
        // The core's hook rate limit (it sees this server's aggregate): pass it on.
        429 => {
            let mut response =
                Refused::new("core_rate_limited", status, core_message).into_response();
            if let Some(retry_after) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after);
            }
            Ok(response)
        }
        503 => Err(Transient::Unavailable(core_message)),
        502 | 504 if retry == Retry::Idempotent => Err(Transient::Gateway(core_message)),
        401 | 403 => {
            tracing::error!(%status, message = %core_message, "core refused our hook signature: are HOOK_SECRET and the clocks the same on both sides?");
            Ok(Refused::new(
                "bad_gateway",
                StatusCode::BAD_GATEWAY,
                "core refused the upload server's credentials",
            )
            .into_response())
        }
        _ => Ok(Refused::new(
            "bad_gateway",
            StatusCode::BAD_GATEWAY,
            format!("core answered {status}: {core_message}"),
        )
        .into_response()),
    }
}

async fn read_capped(mut answer: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > CORE_ANSWER_LIMIT {
            return Err(format!("answer larger than {CORE_ANSWER_LIMIT} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A delay between `backoff / 2` and `backoff`, so retrying clients spread out.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    let extra = rand::random_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(extra)
}

pub use crate::error_chain;

/// Encodes a hook request body: `metadata` (JSON) and, for a put, `worker_code`. Each call
/// picks a new random boundary, so two encodings of the same change never share a signature.
/// Answers the `Content-Type` and the body.
pub fn encode_form(
    metadata: &Metadata,
    code: Option<Bytes>,
) -> Result<(String, Bytes), serde_json::Error> {
    let json = serde_json::to_vec(metadata)?;
    // 128 random bits: the chance that the code contains the boundary is negligible.
    let boundary = format!("workerpush-{}", hex::encode(rand::random::<[u8; 16]>()));
    let code_len = code.as_ref().map_or(0, Bytes::len);
    let mut body = BytesMut::with_capacity(json.len() + code_len + 512);
    body.put_slice(format!("--{boundary}\r\n").as_bytes());
    body.put_slice(b"Content-Disposition: form-data; name=\"metadata\"\r\n");
    body.put_slice(b"Content-Type: application/json\r\n\r\n");
    body.put_slice(&json);
    if let Some(code) = code {
        body.put_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        body.put_slice(
            b"Content-Disposition: form-data; name=\"worker_code\"; filename=\"worker.js\"\r\n",
        );
        body.put_slice(b"Content-Type: application/javascript\r\n\r\n");
        body.put_slice(&code);
    }
    body.put_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Ok((
        format!("multipart/form-data; boundary={boundary}"),
        body.freeze(),
    ))
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::atomic::{AtomicU64, Ordering},
    };

    use axum::routing::post;
    use futures_util::StreamExt;
    use reqwest::multipart::{Form, Part};

    use super::*;
    use crate::{
        core::{Checksum, Core, CoreConfig, WorkerFilter},
        http::{ServeConfig, hook, testing::TestServer, testing::client},
        store::MemoryStore,
    };

    const TOKEN: &str = "upload-token";
    const SECRET: &[u8] = b"shared-hook-secret";

    struct Harness {
        core: Arc<Core>,
        hook: TestServer,
        upload: TestServer,
        client: reqwest::Client,
    }

    impl Harness {
        async fn start(configure: impl FnOnce(&mut UploadConfig)) -> Self {
            let core = Core::open(Arc::new(MemoryStore::new(1000)), CoreConfig::default())
                .await
                .unwrap();
            let hook = TestServer::start(hook::router(core.clone(), Arc::from(SECRET))).await;
            let mut config = config_for(hook.url("").parse().unwrap());
            configure(&mut config);
            let upload = TestServer::start(router(config).unwrap()).await;
            Self {
                core,
                hook,
                upload,
                client: client(),
            }
        }

        async fn stop(self) {
            self.upload.stop().await;
            self.hook.stop().await;
            self.core.shutdown().await;
        }

        async fn upload(&self, form: Form) -> (u16, serde_json::Value) {
            let answer = self
                .client
                .post(self.upload.url("/upload"))
                .bearer_auth(TOKEN)
                .multipart(form)
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json().await.unwrap())
        }

        async fn delete(&self, name: &str) -> (u16, serde_json::Value) {
            let answer = self
                .client
                .delete(self.upload.url(&format!("/workers/{name}")))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json().await.unwrap())
        }

        fn live(&self) -> Vec<(String, String, String)> {
            self.core
                .list(&WorkerFilter::all())
                .workers
                .into_iter()
                .map(|w| (w.worker_name, w.version, w.checksum))
                .collect()
        }
    }

    fn config_for(core_url: reqwest::Url) -> UploadConfig {
        UploadConfig::new(TOKEN, Arc::from(SECRET), core_url)
    }

    /// The seed's `curl -F filename=… -F version=… -F file=@worker.js`.
    fn form(name: &str, version: &str, code: &[u8]) -> Form {
        Form::new()
            .text("filename", name.to_owned())
            .text("version", version.to_owned())
            .part(
                "file",
                Part::bytes(code.to_vec())
                    .file_name("worker.js")
                    .mime_str("application/javascript")
                    .unwrap(),
            )
    }

    #[tokio::test]
    async fn curl_style_upload_is_published_through_the_hook() {
        let h = Harness::start(|_| {}).await;
        let code = b"export default { fetch() { return new Response('v1') } }";
        let (status, body) = h.upload(form("my-worker", "1.0.0", code)).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["worker_name"], "my-worker");
        assert_eq!(body["version"], "1.0.0");
        assert_eq!(body["checksum"], Checksum::of(code).as_str());
        assert_eq!(body["created"], true);
        assert_eq!(body["revision"], h.core.head());
        assert_eq!(
            h.live(),
            [(
                "my-worker".to_owned(),
                "1.0.0".to_owned(),
                Checksum::of(code).to_string()
            )]
        );
        let (status, body) = h.upload(form("my-worker", "1.0.0", code)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["created"], false);
        h.stop().await;
    }

    #[tokio::test]
    async fn bad_requests_are_refused_and_the_server_keeps_serving() {
        let h = Harness::start(|_| {}).await;
        let (status, _) = h.upload(form("taken", "1", b"first")).await;
        assert_eq!(status, 201);
        let head = h.core.head();

        // Tokens: missing, wrong, wrong scheme.
        let url = h.upload.url("/upload");
        let requests = [
            ("no token", h.client.post(&url)),
            ("wrong token", h.client.post(&url).bearer_auth("nope")),
            (
                "token as basic auth",
                h.client.post(&url).basic_auth(TOKEN, None::<&str>),
            ),
            (
                "delete without token",
                h.client.delete(h.upload.url("/workers/taken")),
            ),
        ];
        for (what, request) in requests {
            let answer = request
                .multipart(form("w", "1", b"x"))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 401, "{what}");
            assert_eq!(answer.headers()["www-authenticate"], "Bearer");
            let body: serde_json::Value = answer.json().await.unwrap();
            assert!(body["error"].is_string(), "{what}: {body}");
        }

        let long = "a".repeat(64);
        for name in ["../x", "A", "a/b", "", long.as_str()] {
            let (status, body) = h.upload(form(name, "1", b"x")).await;
            assert_eq!(status, 400, "name {name:?}: {body}");
            assert!(
                body["error"].as_str().unwrap().contains("^[a-z0-9]"),
                "the rule is named: {body}"
            );
        }
        let (status, body) = h.upload(form("w", "..", b"x")).await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("version"),
            "{body}"
        );

        let (status, body) = h.upload(form("taken", "1", b"other code")).await;
        assert_eq!(status, 409, "{body}");
        assert!(body["error"].as_str().unwrap().contains("exists"), "{body}");

        let part = || Part::bytes(b"x".to_vec()).file_name("w.js");
        let incomplete = [
            (
                "file",
                Form::new().text("filename", "w").text("version", "1"),
            ),
            (
                "version",
                Form::new().text("filename", "w").part("file", part()),
            ),
            (
                "filename",
                Form::new().text("version", "1").part("file", part()),
            ),
        ];
        for (field, form) in incomplete {
            let (status, body) = h.upload(form).await;
            assert_eq!(status, 400, "missing {field}: {body}");
            assert!(body["error"].as_str().unwrap().contains(field), "{body}");
        }
        let (status, body) = h.upload(form("w", "1", b"x").text("extra", "field")).await;
        assert_eq!(status, 400, "unknown field: {body}");
        let not_multipart = h
            .client
            .post(h.upload.url("/upload"))
            .bearer_auth(TOKEN)
            .body("just text")
            .send()
            .await
            .unwrap();
        assert_eq!(not_multipart.status(), 400);

        assert_eq!(h.core.head(), head, "a refused request published something");
        let (status, body) = h.upload(form("after-all-that", "2.0.0", b"ok")).await;
        assert_eq!(status, 201, "{body}");
        h.stop().await;
    }

    #[tokio::test]
    async fn file_over_the_limit_is_413_and_at_the_limit_is_accepted() {
        let limit = 4096;
        let h = Harness::start(|c| c.max_upload_bytes = limit).await;
        let (status, body) = h
            .upload(form("big", "1", &vec![b'a'; limit as usize + 1]))
            .await;
        assert_eq!(status, 413, "{body}");
        assert!(body["error"].as_str().unwrap().contains("4096"), "{body}");
        assert_eq!(h.core.head(), 0);
        let (status, body) = h
            .upload(form("big", "1", &vec![b'a'; limit as usize]))
            .await;
        assert_eq!(status, 201, "{body}");
        h.stop().await;
    }

    #[tokio::test]
    async fn streamed_oversized_upload_is_refused_before_it_is_read() {
        const LIMIT: u64 = 256 << 10;
        const CHUNK: usize = 16 << 10;
        const CHUNKS: usize = 4096; // 64 MiB offered in all
        let core = Core::open(Arc::new(MemoryStore::new(10)), CoreConfig::default())
            .await
            .unwrap();
        let hook = TestServer::start(hook::router(core.clone(), Arc::from(SECRET))).await;
        let mut config = config_for(hook.url("").parse().unwrap());
        config.max_upload_bytes = LIMIT;
        // Count what the handler pulls out of the request body.
        let read = Arc::new(AtomicU64::new(0));
        let counter = read.clone();
        let app = router(config).unwrap().layer(axum::middleware::map_request(
            move |request: Request| {
                let counter = counter.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let counted = body.into_data_stream().inspect(move |chunk| {
                        if let Ok(chunk) = chunk {
                            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    });
                    Request::from_parts(parts, Body::from_stream(counted))
                }
            },
        ));
        let upload = TestServer::start(app).await;

        let boundary = "streamed-boundary";
        let preamble = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"\r\n\r\nhuge\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"version\"\r\n\r\n1\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"w.js\"\r\n\r\n"
        );
        let sent = Arc::new(AtomicU64::new(0));
        let sent_counter = sent.clone();
        let zeros = Bytes::from(vec![b'0'; CHUNK]);
        let chunks = futures_util::stream::once(async move { Bytes::from(preamble) })
            .chain(futures_util::stream::iter(0..CHUNKS).map(move |_| {
                sent_counter.fetch_add(CHUNK as u64, Ordering::Relaxed);
                zeros.clone()
            }))
            .map(Ok::<_, io::Error>);
        let answer = client()
            .post(upload.url("/upload"))
            .bearer_auth(TOKEN)
            .header(
                header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await;
        let pulled = read.load(Ordering::Relaxed);
        let offered = sent.load(Ordering::Relaxed);
        eprintln!("handler read {pulled} bytes; client produced {offered}");
        let answer = answer.expect("the server answers instead of dropping the connection");
        assert_eq!(answer.status(), 413);
        // It stops within a chunk of the limit (the form's own whole-stream cap, the fallback,
        // would let it go on to LIMIT + 64 KiB).
        assert!(
            pulled <= LIMIT + 2 * CHUNK as u64,
            "handler read {pulled} bytes for a limit of {LIMIT}"
        );
        // Nor does anything else drain the rest: the connection is dropped, not read out.
        assert!(
            offered < (CHUNK * CHUNKS) as u64,
            "the whole body was consumed"
        );
        assert_eq!(core.head(), 0);
        // The connection is gone but the server is not: a normal upload still works.
        let (status, body) = {
            let answer = client()
                .post(upload.url("/upload"))
                .bearer_auth(TOKEN)
                .multipart(form("small", "1", b"x"))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<serde_json::Value>().await.unwrap())
        };
        assert_eq!(status, 201, "{body}");
        upload.stop().await;
        hook.stop().await;
        core.shutdown().await;
    }

    #[tokio::test]
    async fn delete_is_forwarded_and_missing_worker_is_404() {
        let h = Harness::start(|_| {}).await;
        let (status, _) = h.upload(form("doomed", "1", b"x")).await;
        assert_eq!(status, 201);
        let (status, body) = h.delete("doomed").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["worker_name"], "doomed");
        assert_eq!(body["deleted"], true, "{body}");
        assert!(
            body.get("created").is_none(),
            "a delete creates nothing: {body}"
        );
        assert!(h.live().is_empty());
        let (status, body) = h.delete("doomed").await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = h.delete("Not-Valid").await;
        assert_eq!(status, 400, "{body}");
        h.stop().await;
    }

    /// A port with nothing listening on it (bound, then released).
    async fn free_port() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    #[tokio::test]
    async fn core_not_listening_is_503_never_2xx() {
        let dead = free_port().await;
        let mut config = config_for(format!("http://{dead}").parse().unwrap());
        config.retry_budget = Duration::from_millis(300);
        let upload = TestServer::start(router(config).unwrap()).await;
        let answer = client()
            .post(upload.url("/upload"))
            .bearer_auth(TOKEN)
            .multipart(form("w", "1", b"x"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 503);
        let body: serde_json::Value = answer.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with("core unavailable: "), "{error}");
        upload.stop().await;
    }

    #[tokio::test]
    async fn core_coming_up_inside_the_retry_window_gets_the_upload() {
        let core = Core::open(Arc::new(MemoryStore::new(10)), CoreConfig::default())
            .await
            .unwrap();
        let addr = free_port().await;
        let upload = TestServer::start(
            router(config_for(format!("http://{addr}").parse().unwrap())).unwrap(),
        )
        .await;
        let url = upload.url("/upload");
        let started = Instant::now();
        let request = tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(TOKEN)
                .multipart(form("late", "1", b"code"))
                .send()
                .await
        });
        // The scenario, not a readiness wait: the core starts late.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let hook = TestServer::on(
            listener,
            hook::router(core.clone(), Arc::from(SECRET)),
            ServeConfig::default(),
        );
        let answer = request.await.unwrap().unwrap();
        assert_eq!(answer.status(), 201);
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(core.list(&WorkerFilter::all()).workers.len(), 1);
        upload.stop().await;
        hook.stop().await;
        core.shutdown().await;
    }

    /// A stand-in core answering from a script, checking each request's signature.
    struct ScriptedCore {
        server: TestServer,
        script: Arc<std::sync::Mutex<std::collections::VecDeque<(u16, &'static str)>>>,
        signatures: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl ScriptedCore {
        async fn start() -> Self {
            let script = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
            let signatures = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (answers, seen) = (script.clone(), signatures.clone());
            let app = Router::new().route(
                "/internal/broadcast",
                post(move |headers: HeaderMap, body: Bytes| {
                    let (answers, seen) = (answers.clone(), seen.clone());
                    async move {
                        crate::http::signing::verify(SECRET, &headers, &body, unix_now())
                            .expect("upload server signs its requests");
                        seen.lock()
                            .unwrap()
                            .push(headers[SIGNATURE_HEADER].to_str().unwrap().to_owned());
                        let (status, body) =
                            answers.lock().unwrap().pop_front().unwrap_or((502, "{}"));
                        (StatusCode::from_u16(status).unwrap(), body.to_owned())
                    }
                }),
            );
            Self {
                server: TestServer::start(app).await,
                script,
                signatures,
            }
        }

        fn answer(&self, answers: &[(u16, &'static str)]) {
            let mut script = self.script.lock().unwrap();
            script.clear();
            script.extend(answers.iter().copied());
            self.signatures.lock().unwrap().clear();
        }

        fn requests(&self) -> usize {
            self.signatures.lock().unwrap().len()
        }
    }

    /// Answers (status, body) the scripted core gives, in order.
    type Script = &'static [(u16, &'static str)];

    #[tokio::test]
    async fn core_answers_map_to_ours() {
        let core = ScriptedCore::start().await;
        let mut config = config_for(core.server.url("").parse().unwrap());
        config.retry_budget = Duration::from_millis(500);
        let upload = TestServer::start(router(config).unwrap()).await;
        let send = || async {
            let answer = client()
                .post(upload.url("/upload"))
                .bearer_auth(TOKEN)
                .multipart(form("w", "1", b"x"))
                .send()
                .await
                .unwrap();
            let status = answer.status().as_u16();
            (status, answer.json::<serde_json::Value>().await.unwrap())
        };
        const ACCEPTED: &str = r#"{"revision":7,"created":true}"#;
        let cases: [(&str, Script, u16, usize); 8] = [
            ("2xx passes through", &[(201, ACCEPTED)], 201, 1),
            (
                "409 passes through",
                &[(409, r#"{"error":"exists"}"#)],
                409,
                1,
            ),
            ("413 passes through", &[(413, r#"{"error":"big"}"#)], 413, 1),
            ("500 is a bad gateway", &[(500, "boom")], 502, 1),
            ("2xx garbage is a bad gateway", &[(200, "not json")], 502, 1),
            (
                "401 is our misconfiguration",
                &[(401, r#"{"error":"x"}"#)],
                502,
                1,
            ),
            (
                "503 then 2xx is retried to success",
                &[(503, r#"{"error":"store"}"#), (502, "{}"), (201, ACCEPTED)],
                201,
                3,
            ),
            ("502 until the budget is gone", &[], 502, 2),
        ];
        for (what, script, expected, at_least) in cases {
            core.answer(script);
            let (status, body) = send().await;
            assert_eq!(status, expected, "{what}: {body}");
            if expected >= 400 {
                assert!(body["error"].is_string(), "{what}: {body}");
            } else {
                assert_eq!(body["revision"], 7, "{what}: {body}");
            }
            if expected == 409 {
                assert_eq!(body["error"], "exists");
            }
            assert!(
                core.requests() >= at_least,
                "{what}: {} requests",
                core.requests()
            );
            let signatures = core.signatures.lock().unwrap().clone();
            let mut unique = signatures.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                signatures.len(),
                "{what}: a retry reused a signature"
            );
        }
        upload.stop().await;
        core.server.stop().await;
    }

    #[test]
    fn empty_secrets_and_odd_urls_are_refused_at_setup() {
        let url: reqwest::Url = DEFAULT_CORE_URL.parse().unwrap();
        let mut config = config_for(url.clone());
        config.upload_token.clear();
        assert!(matches!(router(config), Err(UploadSetupError::EmptyToken)));
        let config = UploadConfig::new(TOKEN, Arc::from(&b""[..]), url);
        assert!(matches!(router(config), Err(UploadSetupError::EmptySecret)));
        let config = config_for("unix:/tmp/sock".parse().unwrap());
        assert!(matches!(router(config), Err(UploadSetupError::CoreUrl(_))));
        assert!(!format!("{:?}", config_for(DEFAULT_CORE_URL.parse().unwrap())).contains(TOKEN));
    }
}
