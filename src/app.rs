//! The top level: validates configuration, binds every socket, runs the roles, and drains on
//! SIGTERM/SIGINT. The only place that binds; every server below takes a bound listener and a
//! shutdown token.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{CommonArgs, CoreArgs, ServeArgs, UploadArgs},
    core::{Core, CoreConfig},
    grpc::{self, GrpcLimits},
    http,
    quic::{self, QuicLimits},
    store::{FileStore, RedisConfig, RedisStore, Store, StoreError},
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
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
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
    let mut tasks = JoinSet::new();
    let accept = CancellationToken::new();
    let core = start_core(&args.core, &hook_secret, &admin_token, &accept, &mut tasks).await?;
    let hook_url = local_url(core.http_addr);
    let upload_addr = start_upload(
        &args.core.common,
        args.upload_port,
        &upload_token,
        &hook_secret,
        &hook_url,
        args.max_upload_bytes,
        &accept,
        &mut tasks,
    )
    .await?;
    if args.dev {
        print_dev_help(&args.core.common.certs_dir, core.grpc_addr, upload_addr);
    }
    println!("workerpush: ready");
    drain(
        shutdown,
        accept,
        Some(core.core),
        tasks,
        args.core.common.grace,
    )
    .await;
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
    let mut tasks = JoinSet::new();
    let accept = CancellationToken::new();
    let core = start_core(&args, &hook_secret, &admin_token, &accept, &mut tasks).await?;
    println!("workerpush: ready");
    drain(shutdown, accept, Some(core.core), tasks, args.common.grace).await;
    Ok(())
}

/// `workerpush upload`.
pub async fn upload(args: UploadArgs, shutdown: CancellationToken) -> Result<(), AppError> {
    let hook_secret = required(&args.common.hook_secret, "HOOK_SECRET (--hook-secret)")?;
    let upload_token = required(&args.upload_token, "UPLOAD_TOKEN (--upload-token)")?;
    let core_url = reqwest::Url::parse(&args.grpc_server_url).map_err(|e| {
        AppError::Config(format!("GRPC_SERVER_URL {:?}: {e}", args.grpc_server_url))
    })?;
    let mut tasks = JoinSet::new();
    let accept = CancellationToken::new();
    start_upload(
        &args.common,
        args.upload_port,
        &upload_token,
        &hook_secret,
        &core_url,
        args.max_upload_bytes,
        &accept,
        &mut tasks,
    )
    .await?;
    println!("workerpush: ready");
    drain(shutdown, accept, None, tasks, args.common.grace).await;
    Ok(())
}

struct StartedCore {
    core: Arc<Core>,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

async fn start_core(
    args: &CoreArgs,
    hook_secret: &str,
    _admin_token: &str,
    accept: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<StartedCore, AppError> {
    let server_tls = Arc::new(ServerTls::load(&args.common.certs_dir)?);
    let config = CoreConfig {
        retain_changes: args.retain_changes.max(1),
        inline_max_bytes: args.inline_code_max_bytes,
        max_code_bytes: args.max_code_bytes,
        ..CoreConfig::default()
    };
    let store: Arc<dyn Store> = match &args.redis_url {
        Some(url) => Arc::new(RedisStore::connect(RedisConfig {
            url: url.clone(),
            key_prefix: args.redis_key_prefix.clone(),
            retain: config.retain_changes,
            ..RedisConfig::default()
        })?),
        None => Arc::new(FileStore::open(&args.data_dir, config.retain_changes).await?),
    };
    let core = Core::open(store, config).await?;

    let grpc_listener = bind_tcp(args.common.bind, args.grpc_port).await?;
    let quic_addr = SocketAddr::new(args.common.bind, args.quic_port);
    let quic_socket = std::net::UdpSocket::bind(quic_addr).map_err(|source| AppError::Bind {
        addr: quic_addr,
        source,
    })?;
    let http_listener = bind_tcp(args.common.bind, args.http_port).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let quic_addr = quic_socket.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    println!("workerpush: grpc listening on {grpc_addr} (mTLS)");
    println!("workerpush: quic listening on {quic_addr} (mTLS, ALPN workerpush/1)");
    println!("workerpush: http listening on {http_addr} (hook, health, metrics)");

    let limits = GrpcLimits {
        max_streams: args.grpc_max_streams.max(1),
        ..GrpcLimits::default()
    };
    let grpc_tls = server_tls.grpc_config();
    let grpc_core = core.clone();
    let grpc_accept = accept.clone();
    tasks.spawn(async move {
        if let Err(error) =
            grpc::serve(grpc_listener, grpc_tls, grpc_core, limits, grpc_accept).await
        {
            tracing::error!(%error, "grpc server failed");
        }
    });

    let quic_tls = server_tls.quic_config();
    // Stable across restarts, so a restarted core can reset its predecessor's connections.
    let server_key = std::fs::read(args.common.certs_dir.join(tls::pki::SERVER_KEY))?;
    let quic_limits = QuicLimits {
        reset_secret: Some(quic::ResetSecret::derive(&server_key)),
        ..QuicLimits::default()
    };
    let quic_core = core.clone();
    let quic_accept = accept.clone();
    tasks.spawn(async move {
        if let Err(error) =
            quic::serve(quic_socket, quic_tls, quic_core, quic_limits, quic_accept).await
        {
            tracing::error!(%error, "quic server failed");
        }
    });

    let router =
        http::hook::router(core.clone(), Arc::from(hook_secret.as_bytes())).merge(metrics_router());
    let http_accept = accept.clone();
    tasks.spawn(async move {
        if let Err(error) = http::serve(http_listener, router, http_accept).await {
            tracing::error!(%error, "hook server failed");
        }
    });

    spawn_reload_on_hangup(server_tls, accept.clone(), tasks);
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
    accept: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<SocketAddr, AppError> {
    let mut config = http::upload::UploadConfig::new(
        upload_token,
        Arc::from(hook_secret.as_bytes()),
        core_url.clone(),
    );
    config.max_upload_bytes = max_upload_bytes;
    let router = http::upload::router(config).map_err(|e| AppError::Config(e.to_string()))?;
    let listener = bind_tcp(common.bind, port).await?;
    let addr = listener.local_addr()?;
    println!("workerpush: upload listening on {addr}");
    let accept = accept.clone();
    tasks.spawn(async move {
        if let Err(error) = http::serve(listener, router, accept).await {
            tracing::error!(%error, "upload server failed");
        }
    });
    Ok(addr)
}

/// Waits for `shutdown`, then drains: stop accepting and let in-flight HTTP requests finish,
/// end every stream with UNAVAILABLE, and wait for the servers up to `grace`.
async fn drain(
    shutdown: CancellationToken,
    accept: CancellationToken,
    core: Option<Arc<Core>>,
    mut tasks: JoinSet<()>,
    grace: Duration,
) {
    shutdown.cancelled().await;
    tracing::info!(?grace, "draining");
    accept.cancel();
    if let Some(core) = core {
        core.shutdown().await;
    }
    let joined =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if joined.is_err() {
        tracing::warn!("grace period over; cutting off what is left");
        tasks.abort_all();
    }
    println!("workerpush: stopped");
}

fn spawn_reload_on_hangup(tls: Arc<ServerTls>, stop: CancellationToken, tasks: &mut JoinSet<()>) {
    tasks.spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        loop {
            tokio::select! {
                received = hangups.recv() => {
                    if received.is_none() {
                        return;
                    }
                    match tls.reload() {
                        Ok(()) => tracing::info!("certificates reloaded"),
                        Err(error) => tracing::error!(%error, "certificate reload failed; keeping the old ones"),
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    });
}

fn metrics_router() -> axum::Router {
    use metrics_exporter_prometheus::PrometheusBuilder;
    let handle = match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(error) => {
            tracing::warn!(%error, "metrics recorder not installed");
            None
        }
    };
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.map(|h| h.render()).unwrap_or_default(),
                )
            }
        }),
    )
}

async fn bind_tcp(ip: IpAddr, port: u16) -> Result<TcpListener, AppError> {
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })
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
