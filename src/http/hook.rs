//! The core's HTTP side: the signed broadcast hook `POST /internal/broadcast` and the probes
//! `GET /healthz` and `GET /readyz`.
//!
//! The hook authenticates before it parses: signature headers and timestamp first (no body
//! read), then the raw body is read under a hard limit, its HMAC checked in constant time, the
//! signature admitted once by the replay guard, and only then is the multipart parsed from
//! those same bytes and handed to [`Core::publish`] or [`Core::delete`].
//!
//! With `?wait=<duration>` (at most [`MAX_WAIT`](super::MAX_WAIT)) the answer waits until
//! every current subscriber of the worker has acknowledged (or refused) the change, or the
//! duration passes, and carries the [`Propagation`].

use std::{convert::Infallible, sync::Arc};

use axum::{
    Json, Router,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    ApiError, BodyError, content_length, read_body,
    signing::{HookAuthError, ReplayGuard, SignedHeaders},
    unix_now, wait_param,
};
use crate::core::{
    Checksum, Core, InvalidInput, Propagation, PublishError, Published, Version, WorkerName,
};

/// Room for the `metadata` field and multipart framing on top of the largest code.
pub const FORM_OVERHEAD_BYTES: u64 = 64 << 10;

/// The `metadata` form field of a hook request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The worker.
    pub worker_name: String,
    /// The version (a put needs one; a delete ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Lowercase hex SHA-256 the code must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Put (the default) or delete.
    #[serde(default, skip_serializing_if = "Action::is_put")]
    pub action: Action,
    /// Who asked for the change: the upload server's deploy token name (`upload-token` for
    /// `UPLOAD_TOKEN`). Inside the signed body, so it cannot be altered on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployer: Option<String>,
}

/// The longest `deployer` a hook request may name.
pub const MAX_DEPLOYER_BYTES: usize = 128;

/// What a hook request asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Publish `worker_code` as `version`.
    #[default]
    Put,
    /// Remove the worker.
    Delete,
}

impl Action {
    fn is_put(&self) -> bool {
        *self == Self::Put
    }
}

/// The JSON answer to an accepted hook request: 201 for a new version, 200 for a repeat of the
/// latest one or a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The revision of the change (the existing one when unchanged).
    pub revision: u64,
    /// The epoch.
    pub epoch: String,
    /// The worker.
    pub worker_name: String,
    /// The version put or removed.
    pub version: String,
    /// Checksum of that version.
    pub checksum: String,
    /// Size of that version.
    pub size: u64,
    /// A put's: whether this request made a new version (`false`: a repeat of the latest one).
    /// Absent from a delete's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// `true` in a delete's answer; absent from a put's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Who asked for it (the request's `deployer`), if the request said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployer: Option<String>,
}

impl Accepted {
    /// The answer to `action` by `deployer` that made `p`.
    fn of(action: Action, p: Published, deployer: Option<String>) -> Self {
        let put = action.is_put();
        Self {
            revision: p.revision,
            epoch: p.epoch.to_string(),
            worker_name: p.worker.to_string(),
            version: p.version.to_string(),
            checksum: p.checksum.to_string(),
            size: p.size,
            created: put.then_some(p.created),
            deleted: !put,
            deployer,
        }
    }
}

/// The answer to an accepted hook request that asked to `wait`.
#[derive(Clone, Debug, Serialize)]
pub struct AcceptedAfterWait {
    /// The change.
    #[serde(flatten)]
    pub accepted: Accepted,
    /// Where it stands across the worker's subscribers when the wait ended.
    pub propagation: Propagation,
}

#[derive(Clone)]
struct HookState {
    core: Arc<Core>,
    secret: Arc<[u8]>,
    replay: Arc<ReplayGuard>,
}

/// The hook and probe routes, with a replay guard of the default capacity.
pub fn router(core: Arc<Core>, hook_secret: Arc<[u8]>) -> Router {
    router_with_guard(core, hook_secret, Arc::new(ReplayGuard::default()))
}

/// [`router`] with a given replay guard, e.g. one shared by several routers of one core.
pub fn router_with_guard(
    core: Arc<Core>,
    hook_secret: Arc<[u8]>,
    replay: Arc<ReplayGuard>,
) -> Router {
    if hook_secret.is_empty() {
        tracing::error!("hook secret is empty: every hook request will be refused");
    }
    Router::new()
        .route("/internal/broadcast", post(broadcast))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HookState {
            core,
            secret: hook_secret,
            replay,
        })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<HookState>) -> Response {
    if state.core.is_shutting_down() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !state.core.is_store_healthy() {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
    } else {
        Json(serde_json::json!({ "status": "ready" })).into_response()
    }
}

/// Why the hook refused a request.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Auth(#[from] HookAuthError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("{0}")]
    Form(String),
    #[error("{0}")]
    Wait(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Self::Auth(e) => e.reason(),
            Self::Body(e) => e.reason(),
            Self::Form(_) => "invalid_form",
            Self::Wait(_) => "invalid_wait",
            Self::Publish(e) => match e {
                PublishError::Invalid(_) => "invalid",
                PublishError::ChecksumMismatch { .. } => "checksum_mismatch",
                PublishError::TooLarge { .. } => "too_large",
                PublishError::Conflict { .. } => "conflict",
                PublishError::NotFound(_) => "not_found",
                PublishError::Store(_) => "store",
                PublishError::ShuttingDown => "shutting_down",
            },
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Auth(HookAuthError::ReplayGuardFull) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                HookAuthError::ReplayGuardFull.to_string(),
            ),
            Refusal::Auth(e) => {
                ApiError::new(StatusCode::UNAUTHORIZED, format!("unauthenticated: {e}"))
            }
            Refusal::Body(e) => e.into(),
            Refusal::Form(message) | Refusal::Wait(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, message)
            }
            Refusal::Publish(e) => ApiError::from_coded(&e),
        }
    }
}

impl From<InvalidInput> for Refusal {
    fn from(e: InvalidInput) -> Self {
        Self::Publish(e.into())
    }
}

async fn broadcast(
    State(state): State<HookState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut asked = None;
    match accept(&state, &uri, &headers, body, &mut asked).await {
        Ok((status, accepted, None)) => (status, Json(accepted)).into_response(),
        Ok((status, accepted, Some(propagation))) => {
            let answer = AcceptedAfterWait {
                accepted,
                propagation,
            };
            (status, Json(answer)).into_response()
        }
        Err(refusal) => {
            let reason = refusal.reason();
            metrics::counter!("workerpush_hook_refusals_total", "reason" => reason).increment(1);
            match asked {
                // Authentic and readable: the operator's record names the change refused.
                Some(asked) => tracing::info!(
                    reason, error = %refusal,
                    action = if asked.action.is_put() { "put" } else { "delete" },
                    worker = %asked.worker_name,
                    version = asked.version.as_deref().unwrap_or("-"),
                    deployer = asked.deployer.as_deref().unwrap_or("-"),
                    "change refused"
                ),
                None => tracing::info!(reason, error = %refusal, "hook request refused"),
            }
            ApiError::from(refusal).into_response()
        }
    }
}

/// Answers 201 for a new version, 200 for a repeat or a delete; with `?wait=`, also the
/// propagation when every subscriber answered or the wait is over. Leaves in `asked` the
/// verified request's metadata once it is read, so that a refusal after it can name the
/// change.
async fn accept(
    state: &HookState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    asked: &mut Option<Metadata>,
) -> Result<(StatusCode, Accepted, Option<Propagation>), Refusal> {
    if state.core.is_shutting_down() {
        return Err(PublishError::ShuttingDown.into());
    }
    // Authenticate what needs no body first, so unsigned requests are not read at all.
    let signed = SignedHeaders::from_headers(headers, unix_now())?;
    let limit = state.core.config().max_code_bytes + FORM_OVERHEAD_BYTES;
    let raw = read_body(content_length(headers), body, limit).await?;
    signed.verify_body(&state.secret, &raw)?;
    state.replay.admit(&signed, unix_now())?;
    // This process's guard is cheap and catches most replays; the store's guard is the one
    // that holds for the whole fleet and across restarts, and is checked before anything is
    // applied.
    let claimed = state
        .core
        .claim_request(&signed.replay_key(), signed.replay_expiry())
        .await
        .map_err(PublishError::from)?;
    if !claimed {
        return Err(HookAuthError::Replayed.into());
    }
    let wait = wait_param(uri).map_err(|e| Refusal::Wait(e.message))?;

    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Refusal::Form("expected a multipart/form-data body".to_owned()))?;
    let form = parse_form(content_type, raw).await?;
    let metadata: Metadata = serde_json::from_slice(&form.metadata)
        .map_err(|e| Refusal::Form(format!("invalid metadata JSON: {e}")))?;
    *asked = Some(metadata.clone());
    if metadata
        .deployer
        .as_deref()
        .is_some_and(|d| d.len() > MAX_DEPLOYER_BYTES || d.chars().any(char::is_control))
    {
        return Err(Refusal::Form(format!(
            "metadata deployer must be at most {MAX_DEPLOYER_BYTES} bytes without control characters"
        )));
    }
    let worker = WorkerName::parse(&metadata.worker_name)?;
    let action = metadata.action;
    let (status, published) = match action {
        Action::Delete => {
            if form.worker_code.is_some() {
                return Err(Refusal::Form("a delete takes no worker_code".to_owned()));
            }
            let deployer = metadata.deployer.as_deref().unwrap_or_default();
            (
                StatusCode::OK,
                state.core.delete_as(worker, deployer).await?,
            )
        }
        Action::Put => {
            let version = metadata
                .version
                .as_deref()
                .ok_or_else(|| Refusal::Form("metadata needs a version".to_owned()))?;
            let version = Version::parse(version)?;
            let checksum = match metadata.checksum.as_deref() {
                None | Some("") => None,
                Some(text) => Some(Checksum::parse(text)?),
            };
            let code = form
                .worker_code
                .ok_or_else(|| Refusal::Form("missing form field worker_code".to_owned()))?;
            let deployer = metadata.deployer.as_deref().unwrap_or_default();
            let published = (state.core)
                .publish_as(worker, version, code, checksum, deployer)
                .await?;
            let status = if published.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, published)
        }
    };
    tracing::info!(
        action = if action.is_put() { "put" } else { "delete" },
        worker = %published.worker, version = %published.version,
        revision = published.revision, created = published.created,
        deployer = metadata.deployer.as_deref().unwrap_or("-"), "change accepted"
    );
    let propagation = match wait {
        Some(wait) => Some(
            state
                .core
                .propagation(&published.worker, published.revision, wait)
                .await,
        ),
        None => None,
    };
    Ok((
        status,
        Accepted::of(action, published, metadata.deployer),
        propagation,
    ))
}

struct Form {
    metadata: Bytes,
    worker_code: Option<Bytes>,
}

/// Parses the verified body. Everything is in memory already, under the limit.
async fn parse_form(content_type: &str, raw: Bytes) -> Result<Form, Refusal> {
    let form_error = |e: multer::Error| Refusal::Form(format!("invalid multipart body: {e}"));
    let boundary = multer::parse_boundary(content_type).map_err(form_error)?;
    let stream = futures_util::stream::once(async move { Ok::<_, Infallible>(raw) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut metadata, mut worker_code) = (None, None);
    while let Some(field) = multipart.next_field().await.map_err(form_error)? {
        let slot = match field.name() {
            Some("metadata") => &mut metadata,
            Some("worker_code") => &mut worker_code,
            other => {
                return Err(Refusal::Form(format!(
                    "unexpected form field {:?}",
                    other.unwrap_or_default()
                )));
            }
        };
        if slot.is_some() {
            return Err(Refusal::Form(format!(
                "form field {:?} given twice",
                field.name().unwrap_or_default()
            )));
        }
        *slot = Some(field.bytes().await.map_err(form_error)?);
    }
    let metadata =
        metadata.ok_or_else(|| Refusal::Form("missing form field metadata".to_owned()))?;
    Ok(Form {
        metadata,
        worker_code,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        core::{CoreConfig, WorkerFilter},
        http::{
            signing::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign},
            testing::{TestServer, client},
            upload::encode_form,
        },
        store::MemoryStore,
    };

    const SECRET: &[u8] = b"test-hook-secret";

    struct Harness {
        core: Arc<Core>,
        server: TestServer,
        client: reqwest::Client,
    }

    impl Harness {
        async fn start() -> Self {
            let core = Core::open(Arc::new(MemoryStore::new(1000)), CoreConfig::default())
                .await
                .unwrap();
            let server = TestServer::start(router(core.clone(), Arc::from(SECRET))).await;
            Self {
                core,
                server,
                client: client(),
            }
        }

        async fn stop(self) {
            self.server.stop().await;
            self.core.shutdown().await;
        }

        /// Sends a prepared request; answers status and JSON.
        async fn send(&self, request: Signed) -> (u16, serde_json::Value) {
            let mut builder = self
                .client
                .post(self.server.url("/internal/broadcast"))
                .header(CONTENT_TYPE, request.content_type)
                .body(request.body);
            if let Some(ts) = request.timestamp {
                builder = builder.header(TIMESTAMP_HEADER, ts);
            }
            if let Some(sig) = request.signature {
                builder = builder.header(SIGNATURE_HEADER, sig);
            }
            let answer = builder.send().await.unwrap();
            let status = answer.status().as_u16();
            (status, answer.json().await.unwrap())
        }

        fn live(&self) -> Vec<(String, String)> {
            self.core
                .list(&WorkerFilter::all())
                .workers
                .into_iter()
                .map(|w| (w.worker_name, w.version))
                .collect()
        }
    }

    #[derive(Clone)]
    struct Signed {
        content_type: String,
        body: Vec<u8>,
        timestamp: Option<String>,
        signature: Option<String>,
    }

    fn put_meta(worker: &str, version: &str, checksum: Option<String>) -> Metadata {
        Metadata {
            worker_name: worker.to_owned(),
            version: Some(version.to_owned()),
            checksum,
            action: Action::Put,
            deployer: None,
        }
    }

    fn delete_meta(worker: &str) -> Metadata {
        Metadata {
            worker_name: worker.to_owned(),
            version: None,
            checksum: None,
            action: Action::Delete,
            deployer: None,
        }
    }

    fn signed_at(meta: &Metadata, code: Option<&[u8]>, secret: &[u8], at: i64) -> Signed {
        let (content_type, body) = encode_form(meta, code.map(Bytes::copy_from_slice)).unwrap();
        let signature = sign(secret, at, &body);
        Signed {
            content_type,
            body: body.to_vec(),
            timestamp: Some(at.to_string()),
            signature: Some(signature),
        }
    }

    fn signed(meta: &Metadata, code: Option<&[u8]>) -> Signed {
        signed_at(meta, code, SECRET, unix_now())
    }

    #[tokio::test]
    async fn signed_put_publishes_and_repeat_is_unchanged() {
        let h = Harness::start().await;
        let code = b"export default { fetch() { return new Response('hi') } }";
        let meta = put_meta("hello", "1.0.0", Some(Checksum::of(code).to_string()));

        let (status, body) = h.send(signed(&meta, Some(code))).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["worker_name"], "hello");
        assert_eq!(body["version"], "1.0.0");
        assert_eq!(body["checksum"], Checksum::of(code).as_str());
        assert_eq!(body["size"], code.len());
        assert_eq!(body["created"], true);
        assert!(body.get("deleted").is_none(), "{body}");
        assert_eq!(body["epoch"], h.core.epoch().as_str());
        let revision = body["revision"].as_u64().unwrap();
        assert_eq!(h.core.head(), revision);
        assert_eq!(h.live(), [("hello".to_owned(), "1.0.0".to_owned())]);

        // The same again (a new signature: another boundary) is a no-op.
        let (status, again) = h.send(signed(&meta, Some(code))).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["created"], false);
        assert_eq!(again["revision"], revision);
        assert_eq!(h.core.head(), revision);
        h.stop().await;
    }

    #[tokio::test]
    async fn unauthentic_requests_get_401_and_publish_nothing() {
        let h = Harness::start().await;
        let code: &[u8] = b"worker code";
        let meta = put_meta("guarded", "1", None);
        let good = signed(&meta, Some(code));

        let mut unsigned = good.clone();
        unsigned.signature = None;
        let mut no_timestamp = good.clone();
        no_timestamp.timestamp = None;
        let wrong_secret = signed_at(&meta, Some(code), b"not-the-secret", unix_now());
        let mut tampered = good.clone();
        let last = tampered.body.len() - 10;
        tampered.body[last] ^= 1;
        let stale = signed_at(&meta, Some(code), SECRET, unix_now() - 301);
        let mut malformed = good.clone();
        malformed.signature = Some("v1=zz".to_owned());

        for (what, request) in [
            ("missing signature", unsigned),
            ("missing timestamp", no_timestamp),
            ("wrong secret", wrong_secret),
            ("one body byte changed", tampered),
            ("timestamp 301 s old", stale),
            ("malformed signature", malformed),
        ] {
            let (status, body) = h.send(request).await;
            assert_eq!(status, 401, "{what}: {body}");
            assert!(body["error"].is_string(), "{what}: {body}");
            assert_eq!(h.core.head(), 0, "{what} published something");
        }

        // The good one still works, once.
        let (status, body) = h.send(good.clone()).await;
        assert_eq!(status, 201, "{body}");
        let head = h.core.head();
        let (status, body) = h.send(good).await;
        assert_eq!(status, 401, "replay: {body}");
        assert_eq!(h.core.head(), head);
        h.stop().await;
    }

    #[tokio::test]
    async fn replayed_delete_does_not_remove_a_newer_upload() {
        let h = Harness::start().await;
        let (status, _) = h.send(signed(&put_meta("w", "1", None), Some(b"v1"))).await;
        assert_eq!(status, 201);
        let delete = signed(&delete_meta("w"), None);
        let (status, body) = h.send(delete.clone()).await;
        assert_eq!(status, 200, "{body}");
        assert!(h.live().is_empty());
        let (status, _) = h.send(signed(&put_meta("w", "2", None), Some(b"v2"))).await;
        assert_eq!(status, 201);
        let (status, _) = h.send(delete).await;
        assert_eq!(status, 401);
        assert_eq!(h.live(), [("w".to_owned(), "2".to_owned())]);
        h.stop().await;
    }

    #[tokio::test]
    async fn delete_removes_and_missing_worker_is_404() {
        let h = Harness::start().await;
        let (status, _) = h
            .send(signed(&put_meta("gone", "1", None), Some(b"x")))
            .await;
        assert_eq!(status, 201);
        let (status, body) = h.send(signed(&delete_meta("gone"), None)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["worker_name"], "gone");
        assert_eq!(body["version"], "1");
        assert!(h.live().is_empty());

        let (status, body) = h.send(signed(&delete_meta("gone"), None)).await;
        assert_eq!(status, 404, "{body}");
        let (status, body) = h.send(signed(&delete_meta("never"), None)).await;
        assert_eq!(status, 404, "{body}");
        h.stop().await;
    }

    #[tokio::test]
    async fn conflicts_mismatches_and_bad_input_are_refused() {
        let h = Harness::start().await;
        let (status, _) = h
            .send(signed(&put_meta("w", "1", None), Some(b"one")))
            .await;
        assert_eq!(status, 201);
        let head = h.core.head();

        let (status, body) = h
            .send(signed(&put_meta("w", "1", None), Some(b"other")))
            .await;
        assert_eq!(status, 409, "{body}");

        let wrong = Checksum::of(b"not the code").to_string();
        let (status, body) = h
            .send(signed(&put_meta("w", "2", Some(wrong)), Some(b"code")))
            .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("checksum"),
            "{body}"
        );

        let (status, body) = h.send(signed(&put_meta("w", "3", None), None)).await;
        assert_eq!(status, 400, "missing worker_code: {body}");
        let (status, body) = h
            .send(signed(&put_meta("../x", "1", None), Some(b"x")))
            .await;
        assert_eq!(status, 400, "bad name: {body}");
        let (status, body) = h.send(signed(&put_meta("w", "..", None), Some(b"x"))).await;
        assert_eq!(status, 400, "bad version: {body}");
        let mut no_version = put_meta("w", "1", None);
        no_version.version = None;
        let (status, body) = h.send(signed(&no_version, Some(b"x"))).await;
        assert_eq!(status, 400, "no version: {body}");

        // Signed but not multipart, or metadata that is not JSON.
        let at = unix_now();
        let text = Signed {
            content_type: "text/plain".to_owned(),
            body: b"hello".to_vec(),
            timestamp: Some(at.to_string()),
            signature: Some(sign(SECRET, at, b"hello")),
        };
        let (status, body) = h.send(text).await;
        assert_eq!(status, 400, "not multipart: {body}");
        let raw =
            b"--b\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{oops\r\n--b--\r\n";
        let junk = Signed {
            content_type: "multipart/form-data; boundary=b".to_owned(),
            body: raw.to_vec(),
            timestamp: Some(at.to_string()),
            signature: Some(sign(SECRET, at, raw)),
        };
        let (status, body) = h.send(junk).await;
        assert_eq!(status, 400, "bad metadata: {body}");

        assert_eq!(h.core.head(), head);
        h.stop().await;
    }

    #[tokio::test]
    async fn oversized_body_is_413_but_unsigned_is_401_first() {
        let h = Harness::start().await;
        let limit = h.core.config().max_code_bytes as usize;
        let code = vec![b'a'; limit + 1];
        let oversized = signed(&put_meta("big", "1", None), Some(&code));
        let (status, body) = h.send(oversized.clone()).await;
        assert_eq!(status, 413, "{body}");
        // Without a signature the body is never looked at: 401, not 413.
        let mut unsigned = oversized;
        unsigned.signature = None;
        let (status, body) = h.send(unsigned).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(h.core.head(), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn probes_answer() {
        let h = Harness::start().await;
        let ready = h.client.get(h.server.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 200);
        let healthy = h.client.get(h.server.url("/healthz")).send().await.unwrap();
        assert_eq!(healthy.status(), 200);
        h.core.shutdown().await;
        let ready = h.client.get(h.server.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        let (status, body) = h
            .send(signed(&put_meta("late", "1", None), Some(b"x")))
            .await;
        assert_eq!(status, 503, "{body}");
        h.server.stop().await;
    }

    #[test]
    fn metadata_json_has_the_design_shape() {
        let meta: Metadata = serde_json::from_str(
            r#"{"worker_name":"w","version":"1","checksum":"ab","action":"delete"}"#,
        )
        .unwrap();
        assert_eq!(meta.action, Action::Delete);
        let put: Metadata = serde_json::from_str(r#"{"worker_name":"w","version":"1"}"#).unwrap();
        assert_eq!(put.action, Action::Put);
        assert!(serde_json::from_str::<Metadata>(r#"{"worker_name":"w","chekcsum":"x"}"#).is_err());
    }
}
