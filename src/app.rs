//! The top level: validates configuration, binds every socket, runs the roles, and drains on
//! SIGTERM/SIGINT. The only place that binds; every server below takes a bound listener and a
//! shutdown token.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    acl::AclStore,
    config::{CommonArgs, CoreArgs, DeployTokenArgs, ServeArgs, UploadArgs},
    core::{Core, CoreConfig},
    grpc::{self, GrpcLimits},
    http,
    http::deploy_tokens::DeployTokens,
    http::limits::{self, BodyBudget, RateLimit, RateLimiter},
    quic::{self, QuicLimits},
    quota::IdentityLimits,
    requests::Access,
    store::{
        FileStore, Fleet, RedisConfig, RedisFleet, RedisFleetConfig, RedisStore, Store, StoreError,
    },
    telemetry,
    tls::{self, ServerTls, TlsError},
};

/// Why a role could not start. Configuration errors exit with 64.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A setting is missing or wrong.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificates could not be made or loaded.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A socket could not be bound.
    #[error("cannot bind {addr} (set by {flag} and --bind): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The flag and environment variable that chose the port, e.g. `--grpc-port / GRPC_PORT`.
        flag: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Any other I/O failure.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl AppError {
    /// The process exit code: 64 (usage) for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => 64,
            _ => 1,
        }
    }
}

/// Where the dev secrets live, inside the certs directory.
pub const DEV_SECRETS: &str = "dev-secrets.env";

/// `workerpush serve`: core and upload server in one process.
pub async fn serve(mut args: ServeArgs, shutdown: CancellationToken) -> Result<(), AppError> {
    if args.dev {
        let report = tls::ensure_dev(&args.core.common.certs_dir, tls::pki::DEV_CLIENT)?;
        if report.changed() {
            println!(
                "workerpush: made dev certificates in {}",
                args.core.common.certs_dir.display()
            );
        }
        let secrets = dev_secrets(&args.core.common.certs_dir)?;
        args.core
            .common
            .hook_secret
            .get_or_insert(secrets.hook_secret);
        args.upload_token.get_or_insert(secrets.upload_token);
    }
    let hook_secret = required(&args.core.common.hook_secret, "HOOK_SECRET (--hook-secret)")?;
    let upload_token = required(&args.upload_token, "UPLOAD_TOKEN (--upload-token)")?;
    let admin_token = args
        .core
        .admin_token
        .clone()
        .unwrap_or_else(|| upload_token.clone());
    let mut servers = Servers::default();
    let core = start_core(&args.core, &hook_secret, &admin_token, &mut servers).await?;
    let hook_url = local_url(core.http_addr);
    let upload_addr = start_upload(
        &args.core.common,
        args.upload_port,
        &upload_token,
        &hook_secret,
        &hook_url,
        args.max_upload_bytes,
        &args.deploy_tokens,
        &mut servers,
    )
    .await?;
    if args.dev {
        print_dev_help(&args.core.common.certs_dir, core.grpc_addr, upload_addr);
    }
    println!("workerpush: ready");
    drain(shutdown, servers, Some(core.core), args.core.common.grace).await;
    Ok(())
}

/// `workerpush core`.
pub async fn core(args: CoreArgs, shutdown: CancellationToken) -> Result<(), AppError> {
    let hook_secret = required(&args.common.hook_secret, "HOOK_SECRET (--hook-secret)")?;
    let admin_token = args
        .admin_token
        .clone()
        .or_else(|| std::env::var("UPLOAD_TOKEN").ok())
        .ok_or_else(|| AppError::Config("ADMIN_TOKEN (or UPLOAD_TOKEN) is required".into()))?;
    let mut servers = Servers::default();
    let core = start_core(&args, &hook_secret, &admin_token, &mut servers).await?;
    println!("workerpush: ready");
    drain(shutdown, servers, Some(core.core), args.common.grace).await;
    Ok(())
}

/// `workerpush upload`.
pub async fn upload(args: UploadArgs, shutdown: CancellationToken) -> Result<(), AppError> {
    let hook_secret = required(&args.common.hook_secret, "HOOK_SECRET (--hook-secret)")?;
    let upload_token = required(&args.upload_token, "UPLOAD_TOKEN (--upload-token)")?;
    let core_url = reqwest::Url::parse(&args.grpc_server_url).map_err(|e| {
        AppError::Config(format!("GRPC_SERVER_URL {:?}: {e}", args.grpc_server_url))
    })?;
    let mut servers = Servers::default();
    start_upload(
        &args.common,
        args.upload_port,
        &upload_token,
        &hook_secret,
        &core_url,
        args.max_upload_bytes,
        &args.deploy_tokens,
        &mut servers,
    )
    .await?;
    println!("workerpush: ready");
    drain(shutdown, servers, None, args.common.grace).await;
    Ok(())
}

/// The servers of one process, grouped by the order in which a drain stops them.
#[derive(Default)]
struct Servers {
    /// The upload server: its in-flight uploads still need the hook.
    uploads: Stage,
    /// The hook and admin HTTP server: its in-flight publishes still need the core.
    hook: Stage,
    /// gRPC (and every other subscriber transport): streams end when the core shuts down.
    streams: Stage,
}

/// Servers that stop accepting together, and their tasks.
#[derive(Default)]
struct Stage {
    /// Cancelled to stop accepting and let what is in flight finish.
    accept: CancellationToken,
    tasks: JoinSet<()>,
}

impl Stage {
    /// Waits for the tasks until `deadline`, then aborts what is left. Whether all finished.
    async fn finish(&mut self, deadline: Instant) -> bool {
        let joined = tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            self.tasks.abort_all();
        }
        joined.is_ok()
    }
}

struct StartedCore {
    core: Arc<Core>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

async fn start_core(
    args: &CoreArgs,
    hook_secret: &str,
    admin_token: &str,
    servers: &mut Servers,
) -> Result<StartedCore, AppError> {
    let admin_token = http::auth::BearerToken::new(admin_token)
        .ok_or_else(|| AppError::Config("ADMIN_TOKEN must not be empty".into()))?;
    // Inline code travels in one update, and a QUIC frame holds at most MAX_FRAME_BYTES.
    let inline_limit =
        crate::quic::codec::MAX_FRAME_BYTES as u64 - crate::client::MESSAGE_HEADROOM_BYTES;
    if args.inline_code_max_bytes > inline_limit {
        return Err(AppError::Config(format!(
            "INLINE_CODE_MAX_BYTES {} is more than {inline_limit}, the most one update can carry; \
             larger code is fetched",
            args.inline_code_max_bytes
        )));
    }
    let server_tls = Arc::new(ServerTls::load_with_crl(
        &args.common.certs_dir,
        args.crl_file.as_deref(),
    )?);
    let acl = match &args.acl_file {
        Some(path) => AclStore::open(path).map_err(|e| AppError::Config(e.to_string()))?,
        None => AclStore::allow_all(),
    };
    let access = Access::new(Arc::new(acl), server_tls.connections());
    let config = CoreConfig {
        retain_changes: args.retain_changes.max(1),
        inline_max_bytes: args.inline_code_max_bytes,
        max_code_bytes: args.max_code_bytes,
        bounds: args.bounds.bounds(),
        remember_departed: args.remember_departed,
        core_id: args
            .core_id
            .clone()
            .unwrap_or_else(crate::core::default_core_id)
            .into(),
        ..CoreConfig::default()
    };
    let store: Arc<dyn Store> = match &args.redis_url {
        Some(url) => Arc::new(RedisStore::connect(RedisConfig {
            url: url.clone(),
            key_prefix: args.redis_key_prefix.clone(),
            retain: config.retain_changes,
            connect_timeout: args.redis_connect_timeout,
            response_timeout: args.redis_response_timeout,
            min_replicas: args.redis_min_replicas,
        })?),
        None => Arc::new(FileStore::open(&args.data_dir, config.retain_changes).await?),
    };
    // Cores sharing a Redis share their propagation views; the embedded store has one core.
    let fleet: Option<Arc<dyn Fleet>> = match &args.redis_url {
        Some(url) => Some(Arc::new(RedisFleet::connect(RedisFleetConfig {
            url: url.clone(),
            key_prefix: args.redis_key_prefix.clone(),
            core_id: config.core_id.to_string(),
            connect_timeout: args.redis_connect_timeout,
            response_timeout: args.redis_response_timeout,
            forget_after: config.remember_departed,
        })?)),
        None => None,
    };
    let core_id = config.core_id.clone();
    let core = Core::open_in_fleet(store, config, fleet).await?;
    println!("workerpush: core id {core_id}");

    let grpc_listener = bind_tcp(args.common.bind, args.grpc_port, "--grpc-port / GRPC_PORT")?;
    let quic_addr = SocketAddr::new(args.common.bind, args.quic_port);
    let quic_socket = bind_udp(quic_addr, "--quic-port / QUIC_PORT")?;
    let http_listener = bind_tcp(args.common.bind, args.http_port, "--http-port / HTTP_PORT")?;
    let grpc_addr = grpc_listener.local_addr()?;
    let quic_addr = quic_socket.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    println!("workerpush: grpc listening on {grpc_addr} (mTLS)");
    println!("workerpush: quic listening on {quic_addr} (mTLS, ALPN workerpush/1)");
    println!(
        "workerpush: http listening on {http_addr} (hook, health, metrics, admin, status page)"
    );

    let per_identity = IdentityLimits {
        max_connections: args.max_connections_per_identity,
        max_streams: args.max_streams_per_identity,
    };
    let limits = GrpcLimits {
        max_streams: args.grpc_max_streams.max(1),
        handshake: grpc::HandshakeLimits {
            timeout: args.handshake_timeout,
            concurrent: args.max_concurrent_handshakes,
        },
        per_identity,
        max_message_bytes: grpc::message_limit(args.inline_code_max_bytes),
        ..GrpcLimits::default()
    };
    let quic_limits = QuicLimits {
        max_handshakes: args.max_concurrent_handshakes,
        handshake_timeout: args.handshake_timeout,
        per_identity,
        ..QuicLimits::default()
    };
    let grpc_tls = server_tls.grpc_config();
    let grpc_core = core.clone();
    let grpc_access = access.clone();
    let grpc_accept = servers.streams.accept.clone();
    servers.streams.tasks.spawn(async move {
        if let Err(error) = grpc::serve(
            grpc_listener,
            grpc_tls,
            grpc_core,
            grpc_access,
            limits,
            grpc_accept,
        )
        .await
        {
            tracing::error!(%error, "grpc server failed");
        }
    });

    let quic_tls = server_tls.quic_config();
    // Stable across restarts, so a restarted core can reset its predecessor's connections.
    let server_key = std::fs::read(args.common.certs_dir.join(tls::pki::SERVER_KEY))?;
    let quic_limits = QuicLimits {
        reset_secret: Some(quic::ResetSecret::derive(&server_key)),
        ..quic_limits
    };
    let quic_core = core.clone();
    let quic_access = access.clone();
    let quic_accept = servers.streams.accept.clone();
    servers.streams.tasks.spawn(async move {
        if let Err(error) = quic::serve(
            quic_socket,
            quic_tls,
            quic_core,
            quic_access,
            quic_limits,
            quic_accept,
        )
        .await
        {
            tracing::error!(%error, "quic server failed");
        }
    });

    let router = http::hook::router(core.clone(), Arc::from(hook_secret.as_bytes())).merge(
        http::admin::router(
            core.clone(),
            admin_token,
            Arc::new(http::sessions::Sessions::new(args.admin_session_ttl)),
        ),
    );
    let largest_body = args.max_code_bytes + http::hook::FORM_OVERHEAD_BYTES;
    let router = http_limits(
        router,
        ("hook_rate", "hook_body_budget", "hook_auth_failures"),
        &args.common,
        largest_body,
    )
    .merge(metrics_router(
        &servers.hook.accept,
        &mut servers.hook.tasks,
        core.clone(),
        args.redis_url.is_none(),
    ));
    let http_accept = servers.hook.accept.clone();
    let serve_config = http_serve_config(&args.common);
    servers.hook.tasks.spawn(async move {
        if let Err(error) = http::serve_with(http_listener, router, http_accept, serve_config).await
        {
            tracing::error!(%error, "hook server failed");
        }
    });

    spawn_reloader(
        Reloadable {
            tls: server_tls,
            acl: access.acl.clone(),
            core: core.clone(),
        },
        args.certs_reload_interval,
        servers.streams.accept.clone(),
        &mut servers.streams.tasks,
    );
    Ok(StartedCore {
        core,
        grpc_addr,
        http_addr,
    })
}

#[allow(clippy::too_many_arguments)]
async fn start_upload(
    common: &CommonArgs,
    port: u16,
    upload_token: &str,
    hook_secret: &str,
    core_url: &reqwest::Url,
    max_upload_bytes: u64,
    tokens: &DeployTokenArgs,
    servers: &mut Servers,
) -> Result<SocketAddr, AppError> {
    let mut config = http::upload::UploadConfig::new(
        upload_token,
        Arc::from(hook_secret.as_bytes()),
        core_url.clone(),
    );
    config.max_upload_bytes = max_upload_bytes;
    if let Some(path) = &tokens.tokens_file {
        let loaded = DeployTokens::load(path).map_err(|e| AppError::Config(e.to_string()))?;
        let loaded = Arc::new(loaded);
        config.deploy_tokens = loaded.clone();
        spawn_tokens_reloader(
            loaded,
            tokens.tokens_reload_interval,
            servers.uploads.accept.clone(),
            &mut servers.uploads.tasks,
        );
    }
    let router = http::upload::router(config).map_err(|e| AppError::Config(e.to_string()))?;
    let largest_body = max_upload_bytes + http::hook::FORM_OVERHEAD_BYTES;
    let router = http_limits(
        router,
        ("upload_rate", "upload_body_budget", "upload_auth_failures"),
        common,
        largest_body,
    );
    let listener = bind_tcp(common.bind, port, "--upload-port / UPLOAD_PORT")?;
    let addr = listener.local_addr()?;
    println!("workerpush: upload listening on {addr}");
    let accept = servers.uploads.accept.clone();
    let serve_config = http_serve_config(common);
    servers.uploads.tasks.spawn(async move {
        if let Err(error) = http::serve_with(listener, router, accept, serve_config).await {
            tracing::error!(%error, "upload server failed");
        }
    });
    Ok(addr)
}

/// The HTTP timeouts from the flags.
fn http_serve_config(common: &CommonArgs) -> http::ServeConfig {
    let defaults = http::ServeConfig::default();
    http::ServeConfig {
        header_read_timeout: common.http_header_timeout,
        body_idle_timeout: common.http_body_timeout,
        body_deadline: common.http_body_deadline,
        // A handler must be able to read the whole body first.
        request_timeout: defaults
            .request_timeout
            .max(common.http_body_deadline + Duration::from_secs(30)),
        ..defaults
    }
}

/// `router` behind the abuse limits of the flags: authentication failures by address
/// (outermost: an address that spent them gets nothing else), the rate limit of changes, then
/// the budget of body bytes in flight; `(rate, budget, auth_failures)` name them in
/// `workerpush_limit_refusals_total`.
fn http_limits(
    router: axum::Router,
    (rate, budget, auth_failures): (&'static str, &'static str, &'static str),
    common: &CommonArgs,
    largest_body: u64,
) -> axum::Router {
    let budget = BodyBudget::new(budget, common.http_body_budget, largest_body);
    let limiter = RateLimiter::new(
        rate,
        RateLimit {
            per_second: common.rate_limit_per_second,
            burst: common.rate_limit_burst,
        },
    );
    let failures = RateLimiter::new(
        auth_failures,
        RateLimit {
            per_second: common.auth_failures_per_second,
            burst: common.auth_failures_burst,
        },
    );
    let router = limits::with_rate_limit(limits::with_body_budget(router, budget), limiter);
    http::auth_failures::with_auth_failure_limit(router, failures)
}

/// Waits for `shutdown`, then drains within `grace`, in order:
/// 1. stop accepting uploads and subscribers (gRPC health says NOT_SERVING; live streams go on
///    and still carry what is being published);
/// 2. let in-flight uploads finish: they forward to the hook, which still accepts;
/// 3. stop accepting on the hook and let in-flight publishes finish;
/// 4. shut the core down: every stream ends with UNAVAILABLE, the store is closed;
/// 5. wait for the stream servers. Whatever is left at the deadline is cut off.
async fn drain(
    shutdown: CancellationToken,
    mut servers: Servers,
    core: Option<Arc<Core>>,
    grace: Duration,
) {
    shutdown.cancelled().await;
    tracing::info!(?grace, "draining");
    let deadline = Instant::now() + grace;
    servers.uploads.accept.cancel();
    servers.streams.accept.cancel();
    let mut finished = servers.uploads.finish(deadline).await;
    servers.hook.accept.cancel();
    finished &= servers.hook.finish(deadline).await;
    if let Some(core) = core {
        core.shutdown().await;
    }
    finished &= servers.streams.finish(deadline).await;
    if !finished {
        tracing::warn!("grace period over; cut off what was left");
    }
    println!("workerpush: stopped");
}

/// What the reloader reloads.
struct Reloadable {
    tls: Arc<ServerTls>,
    acl: Arc<AclStore>,
    core: Arc<Core>,
}

/// Reloads the certificates, the CRL file and the ACL file on SIGHUP, and when their files
/// change (checked every `interval`; zero: on SIGHUP only). A reload that fails keeps what is
/// in force, logs, and is tried again at the next check.
fn spawn_reloader(
    what: Reloadable,
    interval: Duration,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    tasks.spawn(async move {
        let mut triggers = ReloadTriggers::new(interval, "certificates and ACL");
        let what = Arc::new(what);
        let mut certs = Watched::new(what.tls.files());
        let mut acl = Watched::new(what.acl.path().map(Path::to_path_buf).into_iter().collect());
        loop {
            let Some(forced) = triggers.next(&stop).await else {
                return;
            };
            // Reading files and re-verifying live connections blocks.
            let what = what.clone();
            let checked = tokio::task::spawn_blocking(move || {
                certs.check(forced, "certificates", || {
                    let reloaded = what.tls.reload()?;
                    tracing::info!(
                        revoked_connections = reloaded.revoked_connections,
                        "certificates reloaded"
                    );
                    Ok::<_, TlsError>(())
                });
                acl.check(forced, "ACL", || {
                    let core = &what.core;
                    if what.acl.reload(|| (core.epoch(), core.head()))? {
                        tracing::info!("ACL reloaded");
                    }
                    Ok::<_, crate::acl::AclError>(())
                });
                (certs, acl)
            })
            .await;
            match checked {
                Ok(state) => (certs, acl) = state,
                Err(error) => {
                    tracing::error!(%error, "reloader failed; no more reloads");
                    return;
                }
            }
        }
    });
}

/// Reloads the deploy tokens file on SIGHUP, and when it changes (checked every `interval`;
/// zero: on SIGHUP only), as the ACL is; a file that does not parse keeps the tokens in force,
/// and says so.
fn spawn_tokens_reloader(
    tokens: Arc<DeployTokens>,
    interval: Duration,
    stop: CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    tasks.spawn(async move {
        let mut triggers = ReloadTriggers::new(interval, "deploy tokens");
        let mut watched = Watched::new(tokens.path().map(Path::to_path_buf).into_iter().collect());
        loop {
            let Some(forced) = triggers.next(&stop).await else {
                return;
            };
            let tokens = tokens.clone();
            let checked = tokio::task::spawn_blocking(move || {
                watched.check(forced, "deploy tokens", || {
                    let count = tokens.reload()?;
                    tracing::info!(tokens = count, "deploy tokens reloaded");
                    Ok::<_, http::deploy_tokens::TokensFileError>(())
                });
                watched
            })
            .await;
            match checked {
                Ok(state) => watched = state,
                Err(error) => {
                    tracing::error!(%error, "deploy tokens reloader failed; no more reloads");
                    return;
                }
            }
        }
    });
}

/// When a reloader looks at its files: on SIGHUP (forced: reload even if unchanged), and every
/// `interval` (zero: never), for as long as `stop` is not cancelled.
struct ReloadTriggers {
    hangups: Option<tokio::signal::unix::Signal>,
    ticks: Option<tokio::time::Interval>,
}

impl ReloadTriggers {
    fn new(interval: Duration, what: &str) -> Self {
        let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => Some(hangups),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler; reloading {what} on file changes only");
                None
            }
        };
        let ticks = (!interval.is_zero()).then(|| {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        Self { hangups, ticks }
    }

    /// The next look: `Some(true)` for a SIGHUP, `Some(false)` for a tick, `None` once `stop`
    /// is cancelled.
    async fn next(&mut self, stop: &CancellationToken) -> Option<bool> {
        loop {
            tokio::select! {
                received = async { self.hangups.as_mut()?.recv().await }, if self.hangups.is_some() => {
                    match received {
                        Some(()) => return Some(true),
                        None => self.hangups = None,
                    }
                }
                Some(_) = async { Some(self.ticks.as_mut()?.tick().await) }, if self.ticks.is_some() => return Some(false),
                () = stop.cancelled() => return None,
            }
        }
    }
}

/// Files reloaded together, and what they looked like when last loaded.
struct Watched {
    files: Vec<PathBuf>,
    loaded: Vec<Option<FileStamp>>,
    last_error: Option<String>,
}

/// Enough of a file's metadata to notice a rewrite or a rename over it.
type FileStamp = (std::time::SystemTime, u64, u64);

impl Watched {
    fn new(files: Vec<PathBuf>) -> Self {
        let loaded = stamps(&files);
        Self {
            files,
            loaded,
            last_error: None,
        }
    }

    /// Reloads with `reload` if forced or a file changed since the last successful load.
    fn check<E: std::fmt::Display>(
        &mut self,
        forced: bool,
        what: &str,
        reload: impl FnOnce() -> Result<(), E>,
    ) {
        if self.files.is_empty() {
            return;
        }
        // Taken before reading, so a write during the reload is noticed next time.
        let now = stamps(&self.files);
        if !forced && now == self.loaded {
            return;
        }
        match reload() {
            Ok(()) => {
                self.loaded = now;
                self.last_error = None;
            }
            Err(error) => {
                // Half-written sets (a new certificate before its key) fail until complete;
                // say so once per distinct error, not every check.
                let error = error.to_string();
                if self.last_error.as_ref() != Some(&error) {
                    tracing::error!(%error, "{what} reload failed; keeping what is in force");
                    self.last_error = Some(error);
                }
            }
        }
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|file| {
            let meta = std::fs::metadata(file).ok()?;
            Some((meta.modified().ok()?, meta.len(), meta.ino()))
        })
        .collect()
}

/// Buckets of the latency histograms, in seconds: a millisecond to a minute. Every histogram
/// has buckets, so none is rendered as a summary (whose quantiles cannot be aggregated).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `workerpush_store_group_commit_changes`: changes per fsync.
const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// `GET /metrics` (Prometheus text). Installs the process-wide recorder (once per process: a
/// second call serves an empty page and says so), and a task that keeps its histograms from
/// growing between scrapes. Each scrape first reads the core's gauges and ends with the
/// process metrics ([`telemetry`]).
fn metrics_router(
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
    core: Arc<Core>,
    embedded_store: bool,
) -> axum::Router {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let installed = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("workerpush_store_group_commit_changes".to_owned()),
                COUNT_BUCKETS,
            )
        })
        .and_then(PrometheusBuilder::install_recorder);
    let started = telemetry::unix_seconds_now();
    let handle = match installed {
        Ok(handle) => {
            describe_metrics();
            telemetry::start(embedded_store);
            let (upkeep, stop) = (handle.clone(), stop.clone());
            tasks.spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = every.tick() => upkeep.run_upkeep(),
                        () = stop.cancelled() => return,
                    }
                }
            });
            Some(handle)
        }
        Err(error) => {
            tracing::warn!(%error, "metrics recorder not installed");
            None
        }
    };
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (handle, core) = (handle.clone(), core.clone());
            async move {
                let page = match handle {
                    Some(handle) => {
                        telemetry::refresh(&core);
                        handle.render() + &telemetry::process_text(started)
                    }
                    None => String::new(),
                };
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    page,
                )
            }
        }),
    )
}

/// The `# HELP` lines of every metric (the README's table says the same).
fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("workerpush_subscribers", "Live subscriptions, by transport");
    describe_counter!(
        "workerpush_subscriptions_total",
        "Subscriptions started, by how: replay (resumed from the log) or reset (RESET + snapshot)"
    );
    describe_counter!(
        "workerpush_resyncs_total",
        "Subscriptions that fell out of the retained log and started over with RESET + snapshot"
    );
    describe_counter!(
        "workerpush_changes_published_total",
        "Changes accepted, by kind (put, delete); repeats of the latest version not counted"
    );
    describe_counter!(
        "workerpush_deliveries_total",
        "Updates handed to subscribers, markers included, by transport"
    );
    describe_counter!(
        "workerpush_sent_bytes_total",
        Unit::Bytes,
        "Encoded bytes of the updates handed to subscribers, by transport"
    );
    describe_histogram!(
        "workerpush_delivery_latency_seconds",
        Unit::Seconds,
        "From the core accepting a change to handing it to a subscriber (live and replayed changes, not snapshots), by transport"
    );
    describe_histogram!(
        "workerpush_ack_latency_seconds",
        Unit::Seconds,
        "From the core accepting a change to a consumer acknowledging it as applied, by transport"
    );
    describe_counter!(
        "workerpush_acks_total",
        "Acknowledgements, by outcome: applied, or failed (a nack with a reason)"
    );
    describe_counter!(
        "workerpush_hook_refusals_total",
        "Hook requests refused, by reason"
    );
    describe_counter!(
        "workerpush_upload_refusals_total",
        "Upload API requests refused, by reason"
    );
    describe_counter!(
        "workerpush_limit_refusals_total",
        "Requests refused (or departures forgotten early) by a limit, by limit"
    );
}

/// Pending connections the kernel queues per listener. tokio's default (128) overflows when
/// hundreds of edge hosts reconnect at once, and each dropped SYN costs its client a 1 s retry.
const LISTEN_BACKLOG: u32 = 1024;

/// Receive and send buffer of the QUIC socket (see [`bind_udp`]).
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Binds `ip:port`; a failure names `flag`, the setting that chose the port.
fn bind_tcp(ip: IpAddr, port: u16, flag: &'static str) -> Result<TcpListener, AppError> {
    let addr = SocketAddr::new(ip, port);
    let bind = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restarted server can take its port back at once.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| AppError::Bind { addr, flag, source })
}

/// Binds the QUIC socket with room for bursts: every client sends to this one socket, and
/// with the kernel's default buffer (about 200 KiB, a hundred datagrams) a reconnect storm's
/// handshakes and acknowledgements overflow it, and each dropped handshake packet costs its
/// client a retransmission timeout. The kernel caps the size at `net.core.rmem_max` /
/// `wmem_max`; failing to raise it is not fatal.
fn bind_udp(addr: SocketAddr, flag: &'static str) -> Result<std::net::UdpSocket, AppError> {
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| AppError::Bind { addr, flag, source })?;
    let sized = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, UDP_BUFFER_BYTES)
        .and_then(|()| {
            rustix::net::sockopt::set_socket_send_buffer_size(&socket, UDP_BUFFER_BYTES)
        });
    if let Err(error) = sized {
        tracing::warn!(%error, "cannot size the QUIC socket's buffers");
    }
    Ok(socket)
}

fn required(value: &Option<String>, what: &str) -> Result<String, AppError> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(AppError::Config(format!(
            "{what} is required (or run `serve --dev`)"
        ))),
    }
}

/// The loopback URL of a server bound to `addr` (an unspecified bind is reached on loopback).
fn local_url(addr: SocketAddr) -> reqwest::Url {
    let ip = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    let text = format!("http://{}", SocketAddr::new(ip, addr.port()));
    // A socket address always forms a valid URL.
    reqwest::Url::parse(&text).unwrap_or_else(|_| unreachable!("{text} is a valid URL"))
}

/// The dev secrets of `serve --dev`.
struct DevSecrets {
    hook_secret: String,
    upload_token: String,
}

/// Reads `certs/dev-secrets.env`, making it (0600) on first run.
fn dev_secrets(certs_dir: &Path) -> Result<DevSecrets, AppError> {
    let path = certs_dir.join(DEV_SECRETS);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let value = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if let (Some(hook_secret), Some(upload_token)) =
            (value("HOOK_SECRET"), value("UPLOAD_TOKEN"))
        {
            return Ok(DevSecrets {
                hook_secret,
                upload_token,
            });
        }
        return Err(AppError::Config(format!(
            "{} lacks HOOK_SECRET or UPLOAD_TOKEN; fix or delete it",
            path.display()
        )));
    }
    let secrets = DevSecrets {
        hook_secret: hex::encode(rand::random::<[u8; 32]>()),
        upload_token: hex::encode(rand::random::<[u8; 24]>()),
    };
    let text = format!(
        "HOOK_SECRET={}\nUPLOAD_TOKEN={}\n",
        secrets.hook_secret, secrets.upload_token
    );
    write_private(&path, text.as_bytes())?;
    println!("workerpush: wrote dev secrets to {}", path.display());
    Ok(secrets)
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn print_dev_help(certs_dir: &Path, grpc: SocketAddr, upload: SocketAddr) {
    let certs = certs_dir.display();
    println!(
        "\nworkerpush dev mode. In another terminal, watch:\n\n  \
         cargo run -q -- watch --addr localhost:{grpc_port} --ca {certs}/ca.pem \
         --cert {certs}/clients/consumer-1.pem --key {certs}/clients/consumer-1-key.pem --out ./workers\n\n\
         and upload:\n\n  \
         set -a; . {certs}/{DEV_SECRETS}; set +a\n  \
         curl -X POST http://localhost:{upload_port}/upload -H \"Authorization: Bearer $UPLOAD_TOKEN\" \
         -F filename=my-worker -F version=1.0.0 -F file=@worker.js\n",
        grpc_port = grpc.port(),
        upload_port = upload.port(),
    );
}
