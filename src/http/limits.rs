//! Abuse limits of the HTTP servers: a rate limit on changes (token buckets per source address
//! and per bearer token, in a table of bounded size), answered with 429 and `Retry-After`; and
//! what [`super::serve_with`] needs per connection: the peer address on every request and a
//! deadline for the first request (hyper has none while it sniffs HTTP/1 from HTTP/2, so a
//! silent connection would otherwise stay open forever).
//!
//! Depends on nothing of the core; knows no routes.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use http::{HeaderValue, Method, StatusCode, header};
use sha2::{Digest, Sha256};

use super::ApiError;

/// Most buckets kept unless configured: about 5 MiB at most.
pub const DEFAULT_MAX_KEYS: usize = 65_536;
/// A full table is pruned of idle buckets at most this often.
const PRUNE_EVERY: Duration = Duration::from_millis(100);

/// A token-bucket rate: `per_second` on average, up to `burst` at once. A rate of 0 is off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Requests per second, on average (`RATE_LIMIT_PER_SECOND`).
    pub per_second: f64,
    /// Requests at once after a pause (`RATE_LIMIT_BURST`).
    pub burst: u32,
}

impl RateLimit {
    /// Whether the limit applies at all.
    pub fn is_on(&self) -> bool {
        self.per_second > 0.0
    }
}

/// Who a bucket belongs to. A request is admitted only if both its address and (when it
/// presents one) its token have a token left: random tokens from one address are held by the
/// address's bucket, one token from many addresses by the token's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A source address; IPv6 by /64, which is what one host usually holds.
    Addr(IpAddr),
    /// A bearer token, by digest (the table never holds secrets).
    Token([u8; 16]),
}

impl RateKey {
    /// The key of a source address.
    pub fn addr(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                Self::Addr(IpAddr::V6(bits.into()))
            }
            v4 => Self::Addr(v4),
        }
    }

    /// The key of a bearer token.
    pub fn token(token: &str) -> Self {
        let digest = Sha256::digest(token.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        Self::Token(key)
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
struct Table {
    buckets: HashMap<RateKey, Bucket>,
    pruned: Option<Instant>,
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateRefusal {
    /// Out of tokens: the next one comes after this.
    Exhausted {
        /// When to try again.
        retry_after: Duration,
    },
    /// The table is full of active buckets (many sources at once): try again shortly.
    TableFull,
}

/// Token buckets by [`RateKey`]. Memory is bounded: at most `max_keys` buckets, and a bucket
/// that has refilled is the same as none, so it is dropped when room is needed.
#[derive(Debug)]
pub struct RateLimiter {
    name: &'static str,
    limit: RateLimit,
    max_keys: usize,
    table: Mutex<Table>,
}

impl RateLimiter {
    /// A limiter named `name` in metrics (`workerpush_limit_refusals_total{limit=name}`).
    pub fn new(name: &'static str, limit: RateLimit) -> Arc<Self> {
        Self::with_max_keys(name, limit, DEFAULT_MAX_KEYS)
    }

    /// [`RateLimiter::new`] with a bound on the number of buckets.
    pub fn with_max_keys(name: &'static str, limit: RateLimit, max_keys: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            limit,
            max_keys: max_keys.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                pruned: None,
            }),
        })
    }

    /// Takes one token from every key's bucket, or none if any is empty.
    pub fn check(&self, keys: &[RateKey], now: Instant) -> Result<(), RateRefusal> {
        if !self.limit.is_on() {
            return Ok(());
        }
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.limit.per_second;
        // Every critical section leaves the table consistent, so a poisoned lock is usable.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let mut wait = Duration::ZERO;
        let mut refilled = Vec::with_capacity(keys.len());
        for key in keys {
            let tokens = match table.buckets.get(key) {
                Some(bucket) => {
                    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
                    (bucket.tokens + elapsed * rate).min(burst)
                }
                None => burst,
            };
            if tokens < 1.0 {
                wait = wait.max(Duration::from_secs_f64((1.0 - tokens) / rate));
            }
            refilled.push((*key, tokens));
        }
        if !wait.is_zero() {
            return Err(RateRefusal::Exhausted { retry_after: wait });
        }
        let new_keys = refilled
            .iter()
            .filter(|(key, _)| !table.buckets.contains_key(key))
            .count();
        if table.buckets.len() + new_keys > self.max_keys {
            self.prune(&mut table, now, burst);
            if table.buckets.len() + new_keys > self.max_keys {
                return Err(RateRefusal::TableFull);
            }
        }
        for (key, tokens) in refilled {
            table.buckets.insert(
                key,
                Bucket {
                    tokens: tokens - 1.0,
                    updated: now,
                },
            );
        }
        Ok(())
    }

    /// Whether every key's bucket has a token, taking none.
    pub fn peek(&self, keys: &[RateKey], now: Instant) -> Result<(), RateRefusal> {
        if !self.limit.is_on() {
            return Ok(());
        }
        let burst = f64::from(self.limit.burst.max(1));
        let rate = self.limit.per_second;
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let wait = keys
            .iter()
            .filter_map(|key| table.buckets.get(key))
            .map(|bucket| {
                let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
                let tokens = (bucket.tokens + elapsed * rate).min(burst);
                if tokens < 1.0 {
                    Duration::from_secs_f64((1.0 - tokens) / rate)
                } else {
                    Duration::ZERO
                }
            })
            .max()
            .unwrap_or_default();
        if wait.is_zero() {
            Ok(())
        } else {
            Err(RateRefusal::Exhausted { retry_after: wait })
        }
    }

    /// Its name in `workerpush_limit_refusals_total{limit=…}`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// How many buckets are kept.
    pub fn len(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.buckets.len()
    }

    /// Whether no bucket is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn prune(&self, table: &mut Table, now: Instant, burst: f64) {
        if table
            .pruned
            .is_some_and(|at| now.saturating_duration_since(at) < PRUNE_EVERY)
        {
            return;
        }
        table.pruned = Some(now);
        let rate = self.limit.per_second;
        table.buckets.retain(|_, bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens + elapsed * rate < burst
        });
    }
}

/// Whether a request only reads (GET, HEAD, OPTIONS): such requests carry no body worth
/// budgeting and change nothing worth rate-limiting.
fn reads_only(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// `router` with [`rate_limit`] in front of every route it has.
pub fn with_rate_limit(router: Router, limiter: Arc<RateLimiter>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(limiter, rate_limit))
}

/// Middleware: rate-limits requests that change something (anything but GET, HEAD and
/// OPTIONS) by source address and bearer token; answers 429 with `Retry-After` (whole
/// seconds, at least 1). Runs before authentication, so guessing tokens is limited too.
pub async fn rate_limit(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    if reads_only(request.method()) {
        return next.run(request).await;
    }
    let mut keys = Vec::with_capacity(2);
    if let Some(ConnectInfo(remote)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        keys.push(RateKey::addr(remote.ip()));
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, token)| token.trim());
    if let Some(token) = token {
        keys.push(RateKey::token(token));
    }
    let retry_after = match limiter.check(&keys, Instant::now()) {
        Ok(()) => return next.run(request).await,
        Err(RateRefusal::Exhausted { retry_after }) => retry_after,
        Err(RateRefusal::TableFull) => Duration::from_secs(1),
    };
    tracing::info!(limit = limiter.name, remote = ?keys.first(), "rate limited");
    too_many(limiter.name, retry_after, "rate limit")
}

/// A 429 answer for the limit `name` (counted in `workerpush_limit_refusals_total`), saying
/// that `what` was exceeded, with `Retry-After` in whole seconds (at least 1).
pub fn too_many(name: &'static str, retry_after: Duration, what: &str) -> Response {
    metrics::counter!("workerpush_limit_refusals_total", "limit" => name).increment(1);
    let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("{what} exceeded ({name}); retry in {seconds} s"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

/// A budget of request-body bytes held in memory at once by one HTTP server. Handlers buffer
/// a body whole (the hook must, to check its signature before parsing), so without it every
/// extra connection could pin another largest-body's worth of memory, before the signature
/// is even checked. A request reserves its `Content-Length` (the largest body when unknown)
/// before its body is read; past the budget it gets 503 with `Retry-After: 1`.
#[derive(Debug)]
pub struct BodyBudget {
    name: &'static str,
    largest_body: u64,
    units: Arc<tokio::sync::Semaphore>,
    total_units: u32,
}

/// The budget is counted in units of this many bytes.
const BUDGET_UNIT: u64 = 64 << 10;

impl BodyBudget {
    /// `total` bytes at once, for bodies of at most `largest_body` bytes (a request never
    /// reserves more than the whole budget, so the largest body always fits alone).
    pub fn new(name: &'static str, total: u64, largest_body: u64) -> Arc<Self> {
        let total_units = u32::try_from(total.div_ceil(BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
        Arc::new(Self {
            name,
            largest_body,
            units: Arc::new(tokio::sync::Semaphore::new(total_units as usize)),
            total_units,
        })
    }

    fn reserve(&self, content_length: Option<u64>) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let bytes = content_length
            .unwrap_or(self.largest_body)
            .min(self.largest_body);
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1))
            .unwrap_or(u32::MAX)
            .min(self.total_units);
        self.units.clone().try_acquire_many_owned(units).ok()
    }
}

/// `router` with [`body_budget`] in front of every route it has.
pub fn with_body_budget(router: Router, budget: Arc<BodyBudget>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(budget, body_budget))
}

/// Middleware: holds a reservation of the [`BodyBudget`] while a request that may carry a
/// body (anything but GET, HEAD and OPTIONS) is handled.
pub async fn body_budget(
    State(budget): State<Arc<BodyBudget>>,
    request: Request,
    next: Next,
) -> Response {
    if reads_only(request.method()) {
        return next.run(request).await;
    }
    let Some(_reserved) = budget.reserve(super::content_length(request.headers())) else {
        metrics::counter!("workerpush_limit_refusals_total", "limit" => budget.name).increment(1);
        tracing::info!(
            limit = budget.name,
            "request bodies in flight at the budget"
        );
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many request bodies in flight; retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

/// Per connection: whether a first request has arrived (see the module docs).
#[derive(Clone, Debug, Default)]
pub(super) struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    pub(super) fn seen(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `service`, marking every request of the connection with its peer address (as axum's
    /// [`ConnectInfo`]) and noting that one came.
    pub(super) fn mark<S>(&self, service: S, remote: SocketAddr) -> Marked<S> {
        Marked {
            inner: service,
            remote,
            seen: self.0.clone(),
        }
    }
}

/// See [`FirstRequest::mark`].
#[derive(Clone, Debug)]
pub(super) struct Marked<S> {
    inner: S,
    remote: SocketAddr,
    seen: Arc<AtomicBool>,
}

impl<S, B> tower::Service<http::Request<B>> for Marked<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        self.seen.store(true, Ordering::Relaxed);
        request.extensions_mut().insert(ConnectInfo(self.remote));
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    fn limiter(per_second: f64, burst: u32, max_keys: usize) -> Arc<RateLimiter> {
        RateLimiter::with_max_keys("test", RateLimit { per_second, burst }, max_keys)
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies() {
        let limiter = limiter(2.0, 3, 16);
        let key = [RateKey::addr("10.0.0.1".parse().unwrap())];
        let start = Instant::now();
        for _ in 0..3 {
            limiter.check(&key, start).unwrap();
        }
        let Err(RateRefusal::Exhausted { retry_after }) = limiter.check(&key, start) else {
            panic!("the fourth request must wait");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        limiter
            .check(&key, start + Duration::from_millis(500))
            .unwrap();
        assert!(
            limiter
                .check(&key, start + Duration::from_millis(600))
                .is_err()
        );
        // Another address has its own bucket.
        limiter
            .check(&[RateKey::addr("10.0.0.2".parse().unwrap())], start)
            .unwrap();
    }

    #[test]
    fn address_and_token_must_both_have_room() {
        let limiter = limiter(1.0, 1, 16);
        let now = Instant::now();
        let here = RateKey::addr("10.0.0.1".parse().unwrap());
        let there = RateKey::addr("10.0.0.2".parse().unwrap());
        limiter.check(&[here, RateKey::token("a")], now).unwrap();
        // A fresh token does not buy a fresh address bucket...
        assert!(limiter.check(&[here, RateKey::token("b")], now).is_err());
        // ...nor a fresh address a fresh token bucket.
        assert!(limiter.check(&[there, RateKey::token("a")], now).is_err());
        // A refused request took nothing.
        limiter.check(&[there, RateKey::token("b")], now).unwrap();
    }

    #[test]
    fn ipv6_hosts_share_a_bucket_per_64() {
        let a: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8::ffff:1".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(RateKey::addr(a.into()), RateKey::addr(b.into()));
        assert_ne!(RateKey::addr(a.into()), RateKey::addr(c.into()));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            RateKey::addr(mapped),
            RateKey::addr("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn the_table_stays_bounded_and_drops_refilled_buckets() {
        let limiter = limiter(10.0, 2, 4);
        let now = Instant::now();
        for i in 0..4u8 {
            limiter
                .check(&[RateKey::addr(IpAddr::from([10, 0, 0, i]))], now)
                .unwrap();
        }
        let fifth = [RateKey::addr("10.0.0.9".parse().unwrap())];
        assert_eq!(limiter.check(&fifth, now), Err(RateRefusal::TableFull));
        assert_eq!(limiter.len(), 4);
        // After a refill the old buckets carry no state and make room.
        limiter.check(&fifth, now + Duration::from_secs(1)).unwrap();
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn the_body_budget_reserves_declared_sizes_and_the_largest_when_unknown() {
        let budget = BodyBudget::new("test", 4 << 20, 1 << 20);
        let unknown: Vec<_> = (0..4).map(|_| budget.reserve(None).unwrap()).collect();
        assert!(budget.reserve(Some(1)).is_none(), "budget used up");
        drop(unknown);
        let small: Vec<_> = (0..64)
            .map(|_| budget.reserve(Some(100)).unwrap())
            .collect();
        assert!(budget.reserve(Some(1)).is_none(), "a unit each");
        drop(small);
        // A declared size above the largest body reserves only the largest.
        let _big = budget.reserve(Some(u64::MAX)).unwrap();
        // A budget smaller than one body still lets one through.
        let tiny = BodyBudget::new("tiny", 1, 1 << 20);
        let one = tiny.reserve(None).unwrap();
        assert!(tiny.reserve(Some(1)).is_none());
        drop(one);
    }

    #[test]
    fn a_zero_rate_is_off() {
        let limiter = limiter(0.0, 0, 1);
        let key = [RateKey::token("t")];
        for _ in 0..100 {
            limiter.check(&key, Instant::now()).unwrap();
        }
        assert!(limiter.is_empty());
    }
}
