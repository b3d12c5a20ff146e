//! The one typed configuration tree: every flag with its environment variable and default,
//! parsed and validated before anything binds.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::core::Bounds;

/// workerpush: push worker code to every edge host, verified, over mTLS gRPC or QUIC.
#[derive(Debug, Parser)]
#[command(name = "workerpush", version = crate::VERSION_AND_COMMIT, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// How log lines on stderr look: `text` (coloured only on a terminal, never with
    /// `NO_COLOR`) or `json` (one object per line). `RUST_LOG` filters them (default `info`).
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = crate::logs::LogFormat::Text)]
    pub log_format: crate::logs::LogFormat,
}

/// The roles and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Core and upload server in one process. `--dev` makes dev certificates and secrets.
    Serve(ServeArgs),
    /// The core alone: gRPC, QUIC, and the hook + admin HTTP port.
    Core(CoreArgs),
    /// The upload server alone: forwards signed changes to the core's hook.
    Upload(UploadArgs),
    /// A consumer: keeps the current code of each worker under `--out`.
    Watch(WatchArgs),
    /// Makes (or extends) the dev PKI: CA, server certificate, client certificates.
    Certs(CertsArgs),
    /// Measures delivery latency, throughput and loss: N subscribers, M signed publishes.
    Bench(BenchArgs),
    /// Operates a running core through its admin API: workers, consumers, wait, delete.
    Ctl(CtlArgs),
    /// Prints a shell completion script (bash, zsh or fish) on stdout.
    Completions(CompletionsArgs),
}

/// `workerpush ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The core's HTTP port, where the admin API is.
    #[arg(
        long,
        global = true,
        env = "WORKERPUSH_ADMIN_URL",
        default_value = "http://127.0.0.1:8082"
    )]
    pub admin_url: String,
    /// Bearer token of the admin API (empty: `UPLOAD_TOKEN`, as on the server).
    #[arg(long, global = true, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// The upload server, for `delete`.
    #[arg(
        long,
        global = true,
        env = "WORKERPUSH_UPLOAD_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub upload_url: String,
    /// Bearer token of the upload API, for `delete`.
    #[arg(long, global = true, env = "UPLOAD_TOKEN", hide_env_values = true)]
    pub upload_token: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true, env = "CTL_JSON")]
    pub json: bool,
    /// Longest wait for one HTTP request.
    #[arg(long, global = true, env = "CTL_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The `ctl` commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Every live worker: version, revision, propagation.
    Workers,
    /// One worker, with its propagation in full.
    Worker {
        /// The worker's name.
        name: String,
    },
    /// Every live subscription, then the consumers that left recently.
    Consumers,
    /// Waits until every subscriber of NAME holds revision R (or a later one); exit 0 when
    /// they do, 2 when one refused it, 3 when the timeout passes first.
    Wait {
        /// The worker's name.
        name: String,
        /// The revision to wait for (an upload's `revision`).
        #[arg(long)]
        revision: u64,
        /// How long to wait.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Deletes a worker through the upload server.
    Delete {
        /// The worker's name.
        name: String,
    },
}

/// `workerpush completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `workerpush serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Make dev certificates (client `consumer-1`) and `certs/dev-secrets.env` if missing.
    #[arg(long)]
    pub dev: bool,
    /// Core settings.
    #[command(flatten)]
    pub core: CoreArgs,
    /// Port of the upload server.
    #[arg(long, env = "UPLOAD_PORT", default_value_t = 8080)]
    pub upload_port: u16,
    /// Bearer token deployers present to the upload server.
    #[arg(long, env = "UPLOAD_TOKEN", hide_env_values = true)]
    pub upload_token: Option<String>,
    /// Largest worker file accepted by the upload server, in bytes.
    #[arg(long, env = "MAX_UPLOAD_BYTES", default_value_t = 10 << 20)]
    pub max_upload_bytes: u64,
    /// Named deploy tokens of the upload server.
    #[command(flatten)]
    pub deploy_tokens: DeployTokenArgs,
}

/// The upload server's named deploy tokens.
#[derive(Debug, Args, Clone)]
pub struct DeployTokenArgs {
    /// Named deploy tokens (SHA-256 digests) with the workers each may publish and delete;
    /// `UPLOAD_TOKEN` stays valid for every worker. See the README's Deploy tokens.
    #[arg(long, env = "TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// How often the tokens file is checked for changes (0: on SIGHUP only); a removed token
    /// stops working within this.
    #[arg(long, env = "TOKENS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub tokens_reload_interval: Duration,
}

/// `workerpush core` (and the core half of `serve`).
#[derive(Debug, Args, Clone)]
pub struct CoreArgs {
    /// Common server settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// gRPC (HTTP/2 + mTLS) port.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50051)]
    pub grpc_port: u16,
    /// QUIC (UDP + mTLS) port.
    #[arg(long, env = "QUIC_PORT", default_value_t = 50052)]
    pub quic_port: u16,
    /// Hook and admin HTTP port.
    #[arg(long, env = "HTTP_PORT", default_value_t = 8082)]
    pub http_port: u16,
    /// Bearer token of the admin endpoints (defaults to the upload token).
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Embedded store directory (ignored with `--redis-url`).
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Redis URL: several cores share it as one.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several deployments or tests can share one Redis).
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "workerpush")]
    pub redis_key_prefix: String,
    /// How long one Redis connection attempt may take.
    #[arg(long, env = "REDIS_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_connect_timeout: Duration,
    /// How long one Redis operation may take, reconnecting included, before the change is
    /// refused (503) rather than left waiting.
    #[arg(long, env = "REDIS_RESPONSE_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub redis_response_timeout: Duration,
    /// Replicas that must hold each accepted change (Redis `WAIT`) before it is answered
    /// 2xx, so that a failover to a replica loses no acknowledged change; 0: the primary's
    /// answer is enough.
    #[arg(long, env = "REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,
    /// This core's name in the fleet, shown with every consumer it serves (default: `core-`
    /// and 8 random hex digits, new at every start). Unique per core.
    #[arg(long, env = "CORE_ID", value_parser = parse_core_id)]
    pub core_id: Option<String>,
    /// How long a consumer that disconnected without registering still counts (pending) among
    /// the subscribers of the workers it followed. A registered one counts until it
    /// deregisters.
    #[arg(long, env = "REMEMBER_DEPARTED", default_value = "5m", value_parser = parse_duration)]
    pub remember_departed: Duration,
    /// Concurrent gRPC streams (subscriptions and fetches) this core serves.
    #[arg(long, env = "GRPC_MAX_STREAMS", default_value_t = 1000)]
    pub grpc_max_streams: usize,
    /// Code up to this many bytes travels inside updates; larger code is fetched.
    #[arg(long, env = "INLINE_CODE_MAX_BYTES", default_value_t = 1 << 20)]
    pub inline_code_max_bytes: u64,
    /// Changes kept for resume.
    #[arg(long, env = "RETAIN_CHANGES", default_value_t = 10_000)]
    pub retain_changes: usize,
    /// Largest worker code the core accepts, in bytes.
    #[arg(long, env = "MAX_CODE_BYTES", default_value_t = 10 << 20)]
    pub max_code_bytes: u64,
    /// ACL file: which workers each client identity may see, one `identity: pattern, …` line
    /// each (`*` globs). Without one, every authenticated consumer sees every worker.
    #[arg(long, env = "ACL_FILE")]
    pub acl_file: Option<PathBuf>,
    /// PEM certificate revocation lists of the client CA: revoked client certificates are
    /// refused, and their live connections cut.
    #[arg(long, env = "CRL_FILE")]
    pub crl_file: Option<PathBuf>,
    /// How often the certificates, the CRL file and the ACL file are checked for changes and
    /// reloaded (SIGHUP reloads at once); 0 checks only on SIGHUP.
    #[arg(long, env = "CERTS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub certs_reload_interval: Duration,
    /// A TLS (gRPC) or QUIC handshake not done within this is dropped; a gRPC connection
    /// also has this long after it to send the HTTP/2 preface.
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once, per transport: more TCP connections wait in the
    /// backlog, more QUIC connections are refused.
    #[arg(long, env = "MAX_CONCURRENT_HANDSHAKES", default_value_t = 256, value_parser = at_least_one)]
    pub max_concurrent_handshakes: usize,
    /// Connections one client identity may hold at once, per transport.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IDENTITY", default_value_t = 64, value_parser = at_least_one)]
    pub max_connections_per_identity: usize,
    /// Streams (subscriptions and fetches) one client identity may hold at once, per transport.
    #[arg(long, env = "MAX_STREAMS_PER_IDENTITY", default_value_t = 512, value_parser = at_least_one)]
    pub max_streams_per_identity: usize,
    /// Bounds on what one client can make the core hold.
    #[command(flatten)]
    pub bounds: BoundArgs,
    /// How long a status page sign-in lasts (the session cookie's expiry); sign-out ends it
    /// at once.
    #[arg(long, env = "ADMIN_SESSION_TTL", default_value = "12h", value_parser = parse_duration)]
    pub admin_session_ttl: Duration,
}

/// Bounds on what one authenticated client can make the core hold; each refusal is counted
/// in `workerpush_limit_refusals_total{limit=…}`. The defaults live in [`Bounds::default`].
#[derive(Debug, Args, Clone)]
pub struct BoundArgs {
    /// Distinct consumer ids (`identity`, `identity/suffix`) one certificate identity may
    /// have, in the registry and among tracked subscriptions. Past it: RESOURCE_EXHAUSTED
    /// (departed ones make room, oldest first).
    #[arg(long, env = "MAX_CONSUMER_IDS_PER_IDENTITY", default_value_t = Bounds::default().consumer_ids_per_identity, value_parser = at_least_one)]
    pub max_consumer_ids_per_identity: usize,
    /// Consumers remembered after they left; past it the oldest departure is forgotten.
    #[arg(long, env = "MAX_DEPARTED_CONSUMERS", default_value_t = Bounds::default().departed_consumers, value_parser = at_least_one)]
    pub max_departed_consumers: usize,
    /// Bytes departed consumers may hold (each distinct filter counted once); past it the
    /// oldest departure is forgotten.
    #[arg(long, env = "MAX_DEPARTED_BYTES", default_value_t = Bounds::default().departed_bytes)]
    pub max_departed_bytes: usize,
    /// Worker names one subscription may list (at most 10,000, what any request may carry).
    #[arg(long, env = "MAX_FILTER_NAMES", default_value_t = Bounds::default().filter_names, value_parser = filter_names)]
    pub max_filter_names: usize,
    /// Labels one registration may carry.
    #[arg(long, env = "MAX_LABELS", default_value_t = Bounds::default().labels)]
    pub max_labels: usize,
    /// Bytes of one label key, and of one label value.
    #[arg(long, env = "MAX_LABEL_BYTES", default_value_t = Bounds::default().label_bytes)]
    pub max_label_bytes: usize,
    /// Bytes of one registration: endpoint, label keys and values together.
    #[arg(long, env = "MAX_REGISTRATION_BYTES", default_value_t = Bounds::default().registration_bytes)]
    pub max_registration_bytes: usize,
    /// Bytes of a registration's endpoint.
    #[arg(long, env = "MAX_ENDPOINT_BYTES", default_value_t = Bounds::default().endpoint_bytes)]
    pub max_endpoint_bytes: usize,
}

impl BoundArgs {
    /// The core's bounds.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            consumer_ids_per_identity: self.max_consumer_ids_per_identity,
            departed_consumers: self.max_departed_consumers,
            departed_bytes: self.max_departed_bytes,
            filter_names: self.max_filter_names,
            labels: self.max_labels,
            label_bytes: self.max_label_bytes,
            registration_bytes: self.max_registration_bytes,
            endpoint_bytes: self.max_endpoint_bytes,
        }
    }
}

/// Settings every server role takes.
#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Address to bind every listener to.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Directory of `ca.pem`, `server.pem`, `server-key.pem` (and `clients/`).
    #[arg(long, env = "CERTS_DIR", default_value = "./certs")]
    pub certs_dir: PathBuf,
    /// Shared secret of the hook signatures.
    #[arg(long, env = "HOOK_SECRET", hide_env_values = true)]
    pub hook_secret: Option<String>,
    /// How long a shutdown may take before remaining work is cut off.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub grace: Duration,
    /// HTTP: time a client has for a request head, and a new connection for its first request.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// HTTP: longest pause between two pieces of a request body (408 after it).
    #[arg(long, env = "HTTP_BODY_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,
    /// HTTP: longest time for a whole request body, however it trickles in (408 after it).
    #[arg(long, env = "HTTP_BODY_DEADLINE", default_value = "300s", value_parser = parse_duration)]
    pub http_body_deadline: Duration,
    /// HTTP: request-body bytes one server holds in memory at once (each request reserves
    /// its `Content-Length`, or the largest body when unknown). Past it: 503 + `Retry-After`.
    #[arg(long, env = "HTTP_BODY_BUDGET", default_value_t = 128 << 20)]
    pub http_body_budget: u64,
    /// Uploads, deletes and hook calls per second, per source address and per bearer token
    /// (0: no rate limit). Past it: 429 with `Retry-After`.
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = 100.0, value_parser = parse_rate)]
    pub rate_limit_per_second: f64,
    /// Requests a source address or token may make at once after a pause.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
    /// Authentication failures (401, any method) a source address may make per second on
    /// average (0: no limit). Past it every request from it gets 429 with `Retry-After`.
    #[arg(long, env = "AUTH_FAILURES_PER_SECOND", default_value_t = 1.0, value_parser = parse_rate)]
    pub auth_failures_per_second: f64,
    /// Authentication failures a source address may make at once after a pause.
    #[arg(long, env = "AUTH_FAILURES_BURST", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_failures_burst: u32,
}

/// `workerpush upload`.
#[derive(Debug, Args)]
pub struct UploadArgs {
    /// Common server settings.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Port of the upload server.
    #[arg(long, env = "UPLOAD_PORT", default_value_t = 8080)]
    pub upload_port: u16,
    /// Bearer token deployers present.
    #[arg(long, env = "UPLOAD_TOKEN", hide_env_values = true)]
    pub upload_token: Option<String>,
    /// Where the core's hook listens.
    #[arg(long, env = "GRPC_SERVER_URL", default_value = "http://127.0.0.1:8082")]
    pub grpc_server_url: String,
    /// Largest worker file accepted, in bytes.
    #[arg(long, env = "MAX_UPLOAD_BYTES", default_value_t = 10 << 20)]
    pub max_upload_bytes: u64,
    /// Named deploy tokens.
    #[command(flatten)]
    pub deploy_tokens: DeployTokenArgs,
}

/// Which transport a consumer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportKind {
    /// HTTP/2 gRPC over TCP.
    Grpc,
    /// Our ALPN over QUIC (UDP).
    Quic,
}

/// `workerpush watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Transport.
    #[arg(long, env = "WATCH_TRANSPORT", value_enum, default_value_t = TransportKind::Grpc)]
    pub transport: TransportKind,
    /// Server `host:port` (the host must be in the server certificate). Several (repeated or
    /// comma-separated): cores sharing one store, tried in turn when one does not answer.
    #[arg(
        long,
        env = "WATCH_ADDR",
        value_delimiter = ',',
        default_value = "localhost:50051"
    )]
    pub addr: Vec<String>,
    /// CA certificate that signed the server.
    #[arg(long, env = "WATCH_CA", default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// Client certificate.
    #[arg(
        long,
        env = "WATCH_CERT",
        default_value = "certs/clients/consumer-1.pem"
    )]
    pub cert: PathBuf,
    /// Client key.
    #[arg(
        long,
        env = "WATCH_KEY",
        default_value = "certs/clients/consumer-1-key.pem"
    )]
    pub key: PathBuf,
    /// Consumer id (empty: the certificate identity; or `identity/suffix`).
    #[arg(long, env = "CONSUMER_ID", default_value = "")]
    pub consumer_id: String,
    /// Workers to follow, comma-separated (empty: all).
    #[arg(long, env = "WATCH_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Directory holding `<worker>/<version>/worker.js` and the resume position.
    #[arg(long, env = "WATCH_OUT", default_value = "./workers")]
    pub out: PathBuf,
    /// One JSON object per event instead of text.
    #[arg(long, env = "WATCH_JSON")]
    pub json: bool,
    /// Largest bundle taken, in bytes (the core's `MAX_CODE_BYTES` default): a larger
    /// announced size is refused without fetching, and a fetch stops past it.
    #[arg(long, env = "WATCH_MAX_CODE_BYTES", default_value_t = crate::client::DEFAULT_MAX_CODE_BYTES)]
    pub max_code_bytes: u64,
    /// Run this (`sh -c`) after each change is written or removed, with `WORKERPUSH_KIND`,
    /// `_WORKER`, `_VERSION`, `_PATH`, `_CHECKSUM`, `_REVISION` set: exit 0 acks the change,
    /// anything else refuses it with the first line of its stderr and keeps the previous version.
    #[arg(long, env = "WATCH_EXEC")]
    pub exec: Option<String>,
    /// `--exec` is killed, and the change refused, past this.
    #[arg(long, env = "WATCH_EXEC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub exec_timeout: Duration,
    /// Endpoint sent with `RegisterConsumer` (how the core's operators reach this host).
    #[arg(long, env = "WATCH_ENDPOINT")]
    pub endpoint: Option<String>,
    /// A `key=value` label sent with `RegisterConsumer` (repeatable, or comma-separated).
    #[arg(long = "label", env = "WATCH_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Sync once, then exit: 0 when everything was applied, 2 when some change was refused.
    #[arg(long, env = "WATCH_ONCE")]
    pub once: bool,
    /// On a clean exit (SIGTERM, Ctrl-C), deregister: this host stops counting among the
    /// workers' subscribers.
    #[arg(long, env = "WATCH_DEREGISTER")]
    pub deregister: bool,
}

/// A `key=value` label.
fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not a label: use key=value")),
    }
}

/// `workerpush certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Output directory.
    #[arg(long, env = "CERTS_DIR", default_value = "./certs")]
    pub out: PathBuf,
    /// A client certificate to make (repeatable).
    #[arg(long = "client")]
    pub clients: Vec<String>,
    /// An extra server name or IP for the server certificate (repeatable).
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Replace an existing CA (and everything it signed).
    #[arg(long)]
    pub force: bool,
}

/// A count that must be at least 1.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{text:?}: {e}")),
    }
}

/// A bound on filter names: at least 1, at most what a request may carry.
fn filter_names(text: &str) -> Result<usize, String> {
    let most = crate::core::types::MAX_FILTER_NAMES;
    match at_least_one(text)? {
        n if n > most => Err(format!("must be at most {most}")),
        n => Ok(n),
    }
}

/// A rate per second: finite and not negative.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate >= 0.0 => Ok(rate),
        _ => Err(format!(
            "{text:?} is not a rate (a number ≥ 0; 0 turns it off)"
        )),
    }
}

/// What `workerpush bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchScenario {
    /// N subscribers, M changes of S bytes: latency from hook request to verified delivery,
    /// deliveries per second, loss.
    Fanout,
    /// A 1 MiB bundle to N subscribers: time until each holds code whose SHA-256 matches.
    Bundle,
    /// A reconnect storm: N synced subscribers dropped at once, M changes published meanwhile,
    /// all reconnect and resume; time until each holds the latest revision.
    Storm,
}

/// A baseline engine `workerpush bench --baseline` runs the same fan-out through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBaseline {
    /// A local `nats-server` with TLS (no persistence), each subscriber on its own TLS
    /// connection.
    Nats,
}

/// `workerpush bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, env = "BENCH_SCENARIO", value_enum, default_value_t = BenchScenario::Fanout)]
    pub scenario: BenchScenario,
    /// Transport of the subscribers.
    #[arg(long, env = "BENCH_TRANSPORT", value_enum, default_value_t = TransportKind::Grpc)]
    pub transport: TransportKind,
    /// Subscribers (N), each on its own connection.
    #[arg(
        short = 'n',
        long = "subscribers",
        env = "BENCH_SUBSCRIBERS",
        default_value_t = 100
    )]
    pub subscribers: usize,
    /// Changes published (M) [default: 100; bundle: 10]. In the storm, the changes published
    /// while every subscriber is away.
    #[arg(short = 'm', long = "changes", env = "BENCH_CHANGES")]
    pub changes: Option<usize>,
    /// Bytes of worker code per change (S) [default: 256, the size the targets in
    /// BENCHMARKS.md are set for; bundle: 1 MiB].
    #[arg(short = 's', long = "size", env = "BENCH_SIZE")]
    pub size: Option<usize>,
    /// Open loop: publish this many changes per second regardless of answers [bundle default:
    /// 1, so that each bundle fans out alone]. Without it, closed loop: as fast as
    /// `--in-flight` concurrent requests allow.
    #[arg(short = 'r', long = "rate", env = "BENCH_RATE")]
    pub rate: Option<f64>,
    /// Closed loop: hook requests in flight [default: 8].
    #[arg(long, env = "BENCH_IN_FLIGHT")]
    pub in_flight: Option<usize>,
    /// Distinct workers the changes rotate over (`bench-0`, `bench-1`, ...).
    #[arg(long, env = "BENCH_WORKERS", default_value_t = 16)]
    pub workers: usize,
    /// Connections being set up at once (also when the storm reconnects).
    #[arg(long, env = "BENCH_CONNECT_CONCURRENCY", default_value_t = 256)]
    pub connect_concurrency: usize,
    /// How long to wait for the last deliveries after the last publish (or, in the storm,
    /// after reconnecting starts) before counting what is missing as lost.
    #[arg(long, env = "BENCH_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Subscribers acknowledge every change they hold, as edge hosts do once they run it, and
    /// each hook request waits up to this long for all of them (`?wait=`, at most 60s): the
    /// `acked_*` figures are then from each hook request to its answer. Fanout and bundle only.
    #[arg(long, env = "BENCH_WAIT", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Start a core on this machine (this binary, `serve --dev` on loopback ports in a temp
    /// dir) and also report its memory per idle subscriber and CPU per delivery.
    #[arg(long)]
    pub spawn: bool,
    /// Without `--spawn`: the core's gRPC or QUIC endpoint, `host:port` (the host must be in
    /// the server certificate).
    #[arg(long, env = "BENCH_ADDR")]
    pub addr: Option<String>,
    /// Without `--spawn`: the core's hook, `http://host:port` (`/internal/broadcast` is added
    /// when the URL has no path).
    #[arg(long, env = "BENCH_HOOK")]
    pub hook: Option<String>,
    /// Without `--spawn`: the hook's signing secret.
    #[arg(long, env = "HOOK_SECRET", hide_env_values = true)]
    pub hook_secret: Option<String>,
    /// Without `--spawn`: CA certificate that signed the server.
    #[arg(long, env = "BENCH_CA", default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// Without `--spawn`: client certificate of the subscribers.
    #[arg(
        long,
        env = "BENCH_CERT",
        default_value = "certs/clients/consumer-1.pem"
    )]
    pub cert: PathBuf,
    /// Without `--spawn`: client key of the subscribers.
    #[arg(
        long,
        env = "BENCH_KEY",
        default_value = "certs/clients/consumer-1-key.pem"
    )]
    pub key: PathBuf,
    /// After the run, the same fan-out (N, M, S, pace, one clock, the same accounting)
    /// through this engine, reported beside workerpush's figures with the ratios. Fanout and
    /// bundle only, without `--wait`.
    #[arg(long, env = "BENCH_BASELINE", value_enum)]
    pub baseline: Option<BenchBaseline>,
    /// `--baseline nats`: the `nats-server` binary to start.
    #[arg(long, env = "BENCH_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// One JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// A core id: 1 to 64 characters of `[A-Za-z0-9._-]` (it names Redis keys and log fields).
pub fn parse_core_id(text: &str) -> Result<String, String> {
    let valid = (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "core id {text:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// Parses `250ms`, `10s`, `2m`, `1h` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 10s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
