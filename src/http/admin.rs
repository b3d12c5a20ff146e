//! The core's admin side on `HTTP_PORT`, behind the admin token (`ADMIN_TOKEN`, by default
//! the upload token):
//!
//! - `GET /v1/workers`, `GET /v1/workers/{name}`, `GET /v1/consumers`: JSON, with
//!   `Authorization: Bearer <token>` (or the session cookie), fleet-wide when several cores
//!   share a store (each entry names its core);
//! - `DELETE /v1/consumers/{id}`: deregisters a consumer on every core (it stops counting
//!   among the workers' subscribers); 200 with `{"consumer_id", "existed"}`;
//! - `GET /`: the live status page. The token is given once, as `?token=` or through the login
//!   form (`POST /login`); it answers with an HttpOnly, SameSite=Strict cookie naming a
//!   server-side session that expires (`ADMIN_SESSION_TTL`), and a redirect to `/`, so the
//!   token leaves the address bar and the history at once;
//! - `GET /status/events`: server-sent events feeding the page, one server-rendered fragment
//!   per change of state (a publish, a subscription, an acknowledgement), at most four a
//!   second;
//! - `POST /logout`: ends the session (its cookie is refused from then on) and forgets the
//!   cookie.
//!
//! Nothing here logs a request's URI or headers. Depends on [`crate::core`] and the HTTP
//! helpers of this module's parent.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Form, Json, Router,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{delete, get, post},
};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{
    ApiError,
    auth::BearerToken,
    sessions::{self, Sessions},
    status_page,
};
use crate::core::{
    ConsumerId, ConsumerStatus, Core, Epoch, Propagation, PropagationSummary, Revision, WorkerName,
    WorkerStatus,
};

/// The least time between two status page events: bursts of acknowledgements coalesce.
const EVENT_INTERVAL: Duration = Duration::from_millis(250);

/// `GET /v1/workers`.
#[derive(Clone, Debug, Serialize)]
pub struct WorkersAnswer {
    /// The epoch.
    pub epoch: Epoch,
    /// The head revision.
    pub head: Revision,
    /// Every live worker, by name.
    pub workers: Vec<WorkerStatus<PropagationSummary>>,
}

/// `GET /v1/consumers`.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumersAnswer {
    /// The head revision.
    pub head: Revision,
    /// Every live subscription, then every consumer that left recently.
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Clone)]
struct AdminState {
    core: Arc<Core>,
    token: Arc<BearerToken>,
    sessions: Arc<Sessions>,
}

/// The admin routes; see the module docs.
pub fn router(core: Arc<Core>, token: BearerToken, sessions: Arc<Sessions>) -> Router {
    let state = AdminState {
        core,
        token: Arc::new(token),
        sessions,
    };
    Router::new()
        .route("/v1/workers", get(workers))
        .route("/v1/workers/{name}", get(worker))
        .route("/v1/consumers", get(consumers))
        .route("/v1/consumers/{*id}", delete(deregister))
        .route("/status/events", get(events))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .route("/", get(page))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .with_state(state)
}

/// Lets a request through with the bearer token or the session cookie; 401 otherwise.
async fn require_admin(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if admitted(&state, request.headers()) {
        return next.run(request).await;
    }
    tracing::debug!("admin request without a valid token refused");
    let mut response = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (ADMIN_TOKEN)",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn admitted(state: &AdminState, headers: &HeaderMap) -> bool {
    state.token.authorizes(headers) || state.sessions.admits(headers, std::time::Instant::now())
}

async fn workers(State(state): State<AdminState>) -> Json<WorkersAnswer> {
    Json(WorkersAnswer {
        epoch: state.core.epoch(),
        head: state.core.head(),
        workers: state.core.fleet_workers_status().await,
    })
}

async fn worker(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<WorkerStatus<Propagation>>, ApiError> {
    let name = WorkerName::parse(&name).map_err(|e| ApiError::from_coded(&e))?;
    state
        .core
        .fleet_worker_status(&name)
        .await
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("worker {name} not found")))
}

async fn consumers(State(state): State<AdminState>) -> Json<ConsumersAnswer> {
    Json(ConsumersAnswer {
        head: state.core.head(),
        consumers: state.core.fleet_consumers_status().await,
    })
}

/// `DELETE /v1/consumers/{id}`.
#[derive(Clone, Debug, Serialize)]
pub struct DeregisterAnswer {
    /// The consumer.
    pub consumer_id: ConsumerId,
    /// Whether it was known (registered, subscribed or remembered) before.
    pub existed: bool,
}

async fn deregister(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<DeregisterAnswer>, ApiError> {
    let identity = id.split('/').next().unwrap_or_default();
    let consumer_id = match ConsumerId::authorize(identity, &id) {
        Ok(consumer_id) if !identity.is_empty() => consumer_id,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid consumer id in the path: give the full consumer_id, suffix included",
            ));
        }
    };
    let existed = state
        .core
        .deregister(&consumer_id)
        .await
        .map_err(|e| ApiError::from_coded(&e))?;
    Ok(Json(DeregisterAnswer {
        consumer_id,
        existed,
    }))
}

#[derive(Deserialize)]
struct TokenForm {
    token: Option<String>,
}

/// The page; or, with `?token=`, the cookie and a redirect that drops the token from the URL.
async fn page(State(state): State<AdminState>, uri: Uri, headers: HeaderMap) -> Response {
    let given = axum::extract::Query::<TokenForm>::try_from_uri(&uri)
        .ok()
        .and_then(|q| q.0.token);
    if let Some(token) = given {
        return sign_in(&state, &token);
    }
    if !admitted(&state, &headers) {
        return html(StatusCode::UNAUTHORIZED, |nonce| {
            status_page::login(nonce, None)
        });
    }
    let snapshot = status_page::Snapshot::read(&state.core).await;
    html(StatusCode::OK, |nonce| status_page::page(nonce, &snapshot))
}

async fn login(State(state): State<AdminState>, Form(form): Form<TokenForm>) -> Response {
    sign_in(&state, form.token.as_deref().unwrap_or_default())
}

async fn logout(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    state.sessions.close(&headers);
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&sessions::expired_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn sign_in(state: &AdminState, token: &str) -> Response {
    if !state.token.matches(token) {
        tracing::info!("status page sign-in with a wrong token");
        return html(StatusCode::UNAUTHORIZED, |nonce| {
            status_page::login(nonce, Some("That is not the admin token."))
        });
    }
    // 303: the browser follows with a GET of `/`, which no longer holds the token.
    let mut response = Redirect::to("/").into_response();
    let session = state.sessions.open(std::time::Instant::now());
    match HeaderValue::from_str(&state.sessions.cookie(&session)) {
        Ok(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        Err(_) => {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

/// An HTML answer with a fresh script nonce and headers that keep it private and unframed.
fn html(status: StatusCode, body: impl FnOnce(&str) -> String) -> Response {
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let policy = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
         frame-ancestors 'none'"
    );
    let mut response = (status, body(&nonce)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(policy) = HeaderValue::from_str(&policy) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// One `state` event now, then one per change of state (coalesced, at most one per
/// [`EVENT_INTERVAL`]), until the client goes or the core shuts down.
async fn events(
    State(state): State<AdminState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = state.core.watch_changes();
    let shutdown = state.core.shutdown_token();
    let start = (state.core, changes, shutdown, None::<Instant>);
    let stream =
        futures_util::stream::unfold(start, |(core, mut changes, shutdown, last)| async move {
            if let Some(last) = last {
                tokio::select! {
                    changed = changes.changed() => changed.ok()?,
                    () = shutdown.cancelled() => return None,
                }
                tokio::select! {
                    () = tokio::time::sleep_until(last + EVENT_INTERVAL) => {}
                    () = shutdown.cancelled() => return None,
                }
            }
            changes.borrow_and_update();
            let fragment = status_page::fragment(&status_page::Snapshot::read(&core).await);
            let event = Event::default().event("state").data(fragment);
            Some((Ok(event), (core, changes, shutdown, Some(Instant::now()))))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{core::CoreConfig, http::testing::TestServer, store::MemoryStore};

    const TOKEN: &str = "admin-token-0123456789";

    /// Everything the tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// A request by hand, so that no client library logs anything of its own.
    async fn send(server: &TestServer, head: &str, body: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "{head}\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    // The current-thread runtime polls the server on this thread, where the subscriber is set.
    #[tokio::test]
    async fn tokens_never_reach_the_logs_even_at_trace() {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let core = Core::open(Arc::new(MemoryStore::new(10)), CoreConfig::default())
            .await
            .unwrap();
        let token = BearerToken::new(TOKEN).unwrap();
        let sessions = Arc::new(Sessions::new(Duration::from_secs(3600)));
        let server = TestServer::start(router(core.clone(), token, sessions)).await;

        let signed_in = send(&server, &format!("GET /?token={TOKEN} HTTP/1.1"), "").await;
        assert!(signed_in.starts_with("HTTP/1.1 303"), "{signed_in}");
        let session = signed_in
            .split(&format!("{}=", sessions::SESSION_COOKIE))
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .to_owned();
        let wrong = send(&server, &format!("GET /?token={TOKEN}x HTTP/1.1"), "").await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let form = "POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded";
        let login = send(&server, form, &format!("token={TOKEN}")).await;
        assert!(login.starts_with("HTTP/1.1 303"), "{login}");
        let api = format!("GET /v1/workers HTTP/1.1\r\nAuthorization: Bearer {TOKEN}");
        assert!(send(&server, &api, "").await.starts_with("HTTP/1.1 200"));
        let cookie = format!("Cookie: {}={session}", sessions::SESSION_COOKIE);
        let page = format!("GET / HTTP/1.1\r\n{cookie}");
        assert!(send(&server, &page, "").await.starts_with("HTTP/1.1 200"));
        let logout = send(&server, &format!("POST /logout HTTP/1.1\r\n{cookie}"), "").await;
        assert!(logout.starts_with("HTTP/1.1 303"), "{logout}");
        let after = send(&server, &page, "").await;
        assert!(
            after.starts_with("HTTP/1.1 401"),
            "a signed-out cookie admitted: {after}"
        );
        let refused = send(&server, "GET /v1/consumers HTTP/1.1", "").await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

        core.shutdown().await;
        server.stop().await;
        let text = logs.text();
        assert!(
            text.contains("sign-in with a wrong token"),
            "the logs were captured: {text}"
        );
        assert!(!text.contains(TOKEN), "a token in the logs: {text}");
        assert!(!text.contains(&session), "a session in the logs: {text}");
    }
}
