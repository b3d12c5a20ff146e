//! Authentication failures by source address: every 401 a server answers (bearer tokens,
//! the status page's `?token=` and sign-in form, hook signatures), whatever the method, takes
//! a token from the address's bucket (`AUTH_FAILURES_PER_SECOND`, `AUTH_FAILURES_BURST`).
//! While the bucket is empty, every request from that address is answered 429 with
//! `Retry-After`, so a token cannot be guessed faster than the rate, GET included.
//!
//! Depends on [`super::limits`] only; knows no routes.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::Response,
};
use http::StatusCode;

use super::limits::{self, RateKey, RateLimiter, RateRefusal};

/// `router` with [`limit_auth_failures`] in front of every route it has.
pub fn with_auth_failure_limit(router: Router, limiter: Arc<RateLimiter>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        limiter,
        limit_auth_failures,
    ))
}

/// Middleware: refuses (429) a source address that spent its authentication failures, and
/// counts each 401 against its address.
pub async fn limit_auth_failures(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(ConnectInfo(remote)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        return next.run(request).await;
    };
    let key = [RateKey::addr(remote.ip())];
    match limiter.peek(&key, Instant::now()) {
        Ok(()) => {}
        Err(RateRefusal::Exhausted { retry_after }) => {
            return limits::too_many(limiter.name(), retry_after, "authentication failures");
        }
        Err(RateRefusal::TableFull) => {
            return limits::too_many(
                limiter.name(),
                Duration::from_secs(1),
                "authentication failures",
            );
        }
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        // Out of room in the table means many addresses failing at once: their next
        // failures are counted once there is room again.
        let _ = limiter.check(&key, Instant::now());
    }
    response
}
