//! Operations. Docker does not run on our machines, so the compose file and the Dockerfile are
//! checked by reading them against the binary they run: its clap definition, its defaults and
//! the names in its certificates. Then the drain on SIGTERM, against the real binary: uploads
//! in flight finish, 100 live subscribers end with UNAVAILABLE and, after a restart on the
//! same ports, resume exactly where they were, and a health watcher hears NOT_SERVING.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{CommandFactory, Parser};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use workerpush::{
    client::{ClientError, Session, Transport, UpdateStream},
    config::{Cli, Command, parse_duration},
    pb::{SubscribeRequest, UpdateKind, WorkerUpdate},
};
use yaml_rust2::{Yaml, YamlLoader};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The ports the design gives each listener ("Processes, ports, configuration").
const GRPC_PORT: u16 = 50051;
const QUIC_PORT: u16 = 50052;
const HTTP_PORT: u16 = 8082;
const UPLOAD_PORT: u16 = 8080;

/// The image every workerpush service runs, built from the Dockerfile.
const IMAGE: &str = "workerpush:local";

/// Environment variables the binary reads outside its clap definition: (subcommand or `*`,
/// name, where).
const READ_OUTSIDE_CLAP: &[(&str, &str, &str)] = &[
    ("*", "RUST_LOG", "the tracing filter, main.rs"),
    (
        "core",
        "UPLOAD_TOKEN",
        "the admin token's fallback, app::core",
    ),
];

/// Secrets: in the compose file only as `${NAME:?…}`, never as values.
const SECRETS: &[&str] = &["HOOK_SECRET", "UPLOAD_TOKEN", "ADMIN_TOKEN"];

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn scalar(value: &Yaml) -> String {
    match value {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn strings(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::BadValue | Yaml::Null => Vec::new(),
        Yaml::Array(items) => items.iter().map(scalar).collect(),
        other => panic!("expected a list, got {other:?}"),
    }
}

/// Compose's interpolation, as much as this file may use: `${VAR:?message}` (required; stands
/// for a placeholder here), `${VAR:-default}`, `${VAR}` (empty) and `$$`.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(tail) = rest.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let body = rest
            .strip_prefix('{')
            .unwrap_or_else(|| panic!("bare ${rest} in {text:?}: write ${{VAR}}"));
        let end = body.find('}').expect("closing brace");
        let (expression, tail) = (&body[..end], &body[end + 1..]);
        if let Some((name, _)) = expression.split_once(":?") {
            out.push_str(&format!("placeholder-{}", name.to_lowercase()));
        } else if let Some((_, default)) = expression.split_once(":-") {
            out.push_str(default);
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// `environment:` as a map or a list of `KEY=value`, uninterpolated.
fn environment(service: &Yaml) -> BTreeMap<String, String> {
    match &service["environment"] {
        Yaml::BadValue => BTreeMap::new(),
        Yaml::Hash(map) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Yaml::Array(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (k, v) = item.split_once('=').expect("KEY=value");
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        other => panic!("environment: {other:?}"),
    }
}

/// A named volume mounted into a service.
#[derive(Debug)]
struct Mount {
    volume: String,
    target: PathBuf,
    read_only: bool,
}

fn mounts(service: &Yaml) -> Vec<Mount> {
    strings(&service["volumes"])
        .iter()
        .map(|spec| {
            let parts: Vec<&str> = spec.split(':').collect();
            assert!(
                (2..=3).contains(&parts.len()) && !parts[0].starts_with(['.', '/']),
                "{spec}: only named volumes, `name:/path[:ro]`"
            );
            Mount {
                volume: parts[0].to_owned(),
                target: PathBuf::from(parts[1]),
                read_only: parts.get(2) == Some(&"ro"),
            }
        })
        .collect()
}

/// A published port: (host address, host port, protocol) → container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Published {
    host_ip: String,
    host_port: u16,
    container_port: u16,
    protocol: String,
}

fn published(service: &Yaml) -> Vec<Published> {
    strings(&service["ports"])
        .iter()
        .map(|spec| {
            let (ports, protocol) = spec.split_once('/').unwrap_or((spec, "tcp"));
            let parts: Vec<&str> = ports.split(':').collect();
            let (host_ip, host, container) = match parts[..] {
                [host, container] => ("0.0.0.0", host, container),
                [ip, host, container] => (ip, host, container),
                _ => panic!("{spec}: write HOST:CONTAINER or IP:HOST:CONTAINER"),
            };
            Published {
                host_ip: host_ip.to_owned(),
                host_port: host.parse().expect("host port"),
                container_port: container.parse().expect("container port"),
                protocol: protocol.to_owned(),
            }
        })
        .collect()
}

/// A service's command as the binary would parse it, with its environment applied the way
/// clap would (flags win), or a panic naming what the binary does not accept.
fn parse_role(name: &str, service: &Yaml) -> Cli {
    let command: Vec<String> = match &service["command"] {
        Yaml::Array(items) => items.iter().map(|v| interpolate(&scalar(v))).collect(),
        other => panic!("{name}: command must be a list (exec form), got {other:?}"),
    };
    let cli = Cli::command();
    let subcommand = cli
        .find_subcommand(&command[0])
        .unwrap_or_else(|| panic!("{name}: `workerpush {}` does not exist", command[0]));
    let mut argv: Vec<String> = vec!["workerpush".into()];
    argv.extend(command.iter().cloned());
    for (variable, value) in environment(service) {
        let arg = subcommand
            .get_arguments()
            .find(|arg| arg.get_env() == Some(OsStr::new(&variable)));
        let Some(arg) = arg else {
            assert!(
                READ_OUTSIDE_CLAP
                    .iter()
                    .any(|(role, known, _)| known == &variable
                        && (*role == "*" || *role == command[0])),
                "{name}: `workerpush {}` does not read {variable}",
                command[0]
            );
            continue;
        };
        let long = format!("--{}", arg.get_long().expect("env args have a long flag"));
        let given = command
            .iter()
            .any(|a| *a == long || a.starts_with(&format!("{long}=")));
        if !given {
            argv.push(long);
            if arg.get_action().takes_values() {
                argv.push(interpolate(&value));
            }
        }
    }
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{name}: {argv:?}:\n{e}"))
}

fn host_port(addr: &str) -> (String, u16) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    (host.to_owned(), port.parse().expect("port"))
}

fn depends_on(service: &Yaml) -> BTreeMap<String, String> {
    match &service["depends_on"] {
        Yaml::BadValue => BTreeMap::new(),
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| (scalar(k), scalar(&v["condition"])))
            .collect(),
        other => panic!("depends_on: use the long form with conditions, got {other:?}"),
    }
}

fn stop_grace(name: &str, service: &Yaml) -> Duration {
    // Docker's default is 10 s.
    let text = service["stop_grace_period"]
        .as_str()
        .map_or_else(|| "10s".to_owned(), str::to_owned);
    parse_duration(&text).unwrap_or_else(|e| panic!("{name}: stop_grace_period {e}"))
}

#[test]
fn compose_file_matches_the_binary() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).unwrap();
    let compose = &docs[0];
    let services: BTreeMap<String, &Yaml> = compose["services"]
        .as_hash()
        .expect("services")
        .iter()
        .map(|(k, v)| (scalar(k), v))
        .collect();
    let volumes: BTreeSet<String> = compose["volumes"]
        .as_hash()
        .map(|m| m.keys().map(scalar).collect())
        .unwrap_or_default();
    assert!(
        compose["networks"]["workerpush"].as_hash().is_some(),
        "the private network"
    );

    let mut roles: BTreeMap<String, Cli> = BTreeMap::new();
    let mut redis: BTreeSet<String> = BTreeSet::new();
    let mut host_ports: BTreeMap<(u16, String), String> = BTreeMap::new();
    for (name, service) in &services {
        assert!(
            strings(&service["networks"]).contains(&"workerpush".to_owned()),
            "{name}: on the private network"
        );
        for mount in mounts(service) {
            assert!(
                volumes.contains(&mount.volume),
                "{name}: {mount:?} undeclared"
            );
        }
        for (other, condition) in depends_on(service) {
            assert!(services.contains_key(&other), "{name} depends on {other}?");
            assert!(
                [
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully"
                ]
                .contains(&condition.as_str()),
                "{name}: condition {condition}"
            );
            if condition == "service_healthy" {
                assert!(
                    !services[&other]["healthcheck"].is_badvalue(),
                    "{name} waits for {other} to be healthy, which has no healthcheck"
                );
            }
        }
        for port in published(service) {
            let key = (port.host_port, port.protocol.clone());
            if let Some(first) = host_ports.insert(key, name.clone()) {
                panic!("{name} and {first} both publish host port {port:?}");
            }
        }
        for (variable, value) in environment(service) {
            if SECRETS.contains(&variable.as_str()) {
                assert!(
                    value.starts_with(&format!("${{{variable}:?")),
                    "{name}: {variable} must come from the environment or .env as ${{{variable}:?…}}"
                );
            }
        }
        match service["image"].as_str() {
            Some(IMAGE) => {
                assert_eq!(
                    service["build"].as_str(),
                    Some("."),
                    "{name}: built from ./Dockerfile"
                );
                roles.insert(name.clone(), parse_role(name, service));
            }
            Some(image) if image.starts_with("redis:") => {
                redis.insert(name.clone());
            }
            other => panic!("{name}: unexpected image {other:?}"),
        }
    }

    // Redis: durable (every write fsynced before it is acknowledged) and private.
    assert_eq!(redis.len(), 1, "one Redis");
    for name in &redis {
        let command = strings(&services[name]["command"]).join(" ");
        assert!(
            command.contains("--appendonly yes") && command.contains("--appendfsync always"),
            "{name}: {command}"
        );
        assert!(published(services[name]).is_empty(), "{name} stays private");
    }

    // The one-shot PKI and where every other service finds it.
    let pki: Vec<_> = roles
        .iter()
        .filter_map(|(name, cli)| match &cli.command {
            Command::Certs(args) => Some((name.clone(), args)),
            _ => None,
        })
        .collect();
    let [(pki_name, pki)] = &pki[..] else {
        panic!("exactly one `workerpush certs` service: {pki:?}")
    };
    let pki_volume = mounts(services[pki_name])
        .into_iter()
        .find(|m| m.target == pki.out && !m.read_only)
        .unwrap_or_else(|| panic!("{pki_name}: --out {:?} is not a volume", pki.out))
        .volume;
    let certs_at = |name: &str| -> PathBuf {
        let service = services[name];
        let mount = mounts(service)
            .into_iter()
            .find(|m| m.volume == pki_volume)
            .unwrap_or_else(|| panic!("{name} does not mount {pki_volume}"));
        assert_eq!(
            depends_on(service)
                .get(pki_name.as_str())
                .map(String::as_str),
            Some("service_completed_successfully"),
            "{name} must wait for {pki_name}"
        );
        mount.target
    };

    let mut cores: BTreeMap<String, (u16, u16)> = BTreeMap::new();
    for (name, cli) in &roles {
        let service = services[name];
        let env = environment(service);
        let ports: BTreeSet<(u16, String)> = published(service)
            .into_iter()
            .map(|p| (p.container_port, p.protocol))
            .collect();
        let tcp = |port: u16| (port, "tcp".to_owned());
        match &cli.command {
            Command::Core(args) => {
                assert_eq!(args.common.certs_dir, certs_at(name), "{name}: certs dir");
                let redis_url = args.redis_url.as_deref().expect("cores share Redis");
                let url = reqwest::Url::parse(redis_url).unwrap();
                assert!(
                    redis.contains(url.host_str().unwrap()),
                    "{name}: {redis_url} is not the Redis service"
                );
                assert_eq!(
                    depends_on(service).get("redis").map(String::as_str),
                    Some("service_healthy"),
                    "{name} waits for Redis"
                );
                assert!(args.common.hook_secret.is_some(), "{name}: HOOK_SECRET");
                assert!(
                    args.admin_token.is_some() || env.contains_key("UPLOAD_TOKEN"),
                    "{name}: ADMIN_TOKEN or UPLOAD_TOKEN"
                );
                assert!(pki.sans.contains(name), "{name} is not in the server cert");
                assert_eq!(
                    (args.grpc_port, args.quic_port, args.http_port),
                    (GRPC_PORT, QUIC_PORT, HTTP_PORT),
                    "{name}: the design's ports"
                );
                assert_eq!(
                    ports,
                    BTreeSet::from([
                        tcp(args.grpc_port),
                        (args.quic_port, "udp".to_owned()),
                        tcp(args.http_port)
                    ]),
                    "{name}: gRPC/tcp, QUIC/udp and HTTP/tcp published"
                );
                assert!(
                    stop_grace(name, service) > args.common.grace,
                    "{name}: Docker must not SIGKILL before the drain's grace is over"
                );
                cores.insert(name.clone(), (args.grpc_port, args.http_port));
            }
            Command::Upload(args) => {
                assert!(args.common.hook_secret.is_some(), "{name}: HOOK_SECRET");
                assert!(args.upload_token.is_some(), "{name}: UPLOAD_TOKEN");
                assert_eq!(args.upload_port, UPLOAD_PORT, "{name}: the design's port");
                assert_eq!(ports, BTreeSet::from([tcp(args.upload_port)]), "{name}");
                assert!(
                    stop_grace(name, service) > args.common.grace,
                    "{name}: Docker must not SIGKILL before the drain's grace is over"
                );
            }
            Command::Watch(args) => {
                let certs = certs_at(name);
                let client = args
                    .cert
                    .strip_prefix(certs.join("clients"))
                    .ok()
                    .and_then(|p| p.to_str()?.strip_suffix(".pem"))
                    .unwrap_or_else(|| panic!("{name}: --cert {:?}", args.cert));
                assert!(pki.clients.iter().any(|c| c == client), "{name}: {client}");
                assert_eq!(args.ca, certs.join("ca.pem"), "{name}: --ca");
                assert_eq!(
                    args.key,
                    certs.join(format!("clients/{client}-key.pem")),
                    "{name}"
                );
                assert!(
                    mounts(service)
                        .iter()
                        .any(|m| m.target == args.out && !m.read_only),
                    "{name}: --out {:?} must be a writable volume (it keeps the resume position)",
                    args.out
                );
                assert!(ports.is_empty(), "{name} listens on nothing");
            }
            Command::Certs(_) => assert!(ports.is_empty()),
            Command::Serve(_) => panic!("{name}: compose runs the roles apart"),
            Command::Bench(_) => panic!("{name}: the benchmark is not a service"),
            Command::Ctl(_) | Command::Completions(_) => {
                panic!("{name}: ctl and completions are tools, not services")
            }
        }
    }
    assert_eq!(cores.len(), 2, "two cores");

    // Who reaches whom: every address names a core service, on the port that core listens on,
    // and gRPC names one its certificate covers.
    for (name, cli) in &roles {
        let service = services[name];
        match &cli.command {
            Command::Upload(args) => {
                let url = reqwest::Url::parse(&args.grpc_server_url).unwrap();
                let core = url.host_str().unwrap();
                let (_, http) = cores
                    .get(core)
                    .unwrap_or_else(|| panic!("{name}: {url} is not a core"));
                assert_eq!(url.port_or_known_default(), Some(*http), "{name}: {url}");
                assert!(
                    depends_on(service).contains_key(core),
                    "{name} starts after {core}"
                );
            }
            Command::Watch(args) => {
                let [addr] = args.addr.as_slice() else {
                    panic!("{name}: one --addr, not {:?}", args.addr)
                };
                let (host, port) = host_port(addr);
                let (grpc, _) = cores
                    .get(&host)
                    .unwrap_or_else(|| panic!("{name}: {addr} is not a core"));
                assert_eq!(port, *grpc, "{name}: {addr}");
                assert!(pki.sans.contains(&host), "{name}: {host} not in the cert");
                assert!(
                    depends_on(service).contains_key(&host),
                    "{name} starts after {host}"
                );
            }
            _ => {}
        }
    }

    assert!(
        read(".gitignore").lines().any(|l| l.trim() == "/.env"),
        ".env holds the compose secrets: never commit it"
    );
}

/// A Dockerfile instruction: keyword and arguments, continuation lines joined.
type Instruction = (String, String);

/// A build stage: its name (`AS …`), base image and instructions.
#[derive(Debug)]
struct Stage {
    name: String,
    base: String,
    steps: Vec<Instruction>,
}

impl Stage {
    fn find(&self, keyword: &str, matching: impl Fn(&str) -> bool) -> Option<&str> {
        self.steps
            .iter()
            .find(|(k, a)| k == keyword && matching(a))
            .map(|(_, a)| a.as_str())
    }

    /// The last instruction with this keyword (the one in force).
    fn last(&self, keyword: &str) -> Option<&str> {
        self.steps
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
    }
}

fn dockerfile_stages() -> Vec<Stage> {
    let text = read("Dockerfile");
    let mut stages: Vec<Stage> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(char::is_whitespace).unwrap();
        let (keyword, args) = (keyword.to_uppercase(), args.trim().to_owned());
        current.clear();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words[..] {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_owned(),
                [_] => String::new(),
                _ => panic!("FROM {args}"),
            };
            stages.push(Stage {
                name,
                base: words[0].to_owned(),
                steps: Vec::new(),
            });
        } else {
            let stage = stages.last_mut().expect("FROM first");
            stage.steps.push((keyword, args));
        }
    }
    assert!(current.is_empty(), "Dockerfile ends inside a continuation");
    stages
}

#[test]
fn dockerfile_builds_locked_and_runs_the_binary_unprivileged() {
    let stages = dockerfile_stages();
    let [build, runtime] = &stages[..] else {
        panic!("two stages, build then runtime: {stages:?}")
    };
    let (builder, runtime_image) = (&build.base, &runtime.base);

    // rust:<version>-<codename> building for debian:<codename>-slim: the same glibc.
    let (toolchain, codename) = builder
        .strip_prefix("rust:")
        .and_then(|tag| tag.split_once('-'))
        .unwrap_or_else(|| panic!("build stage {builder}: rust:VERSION-CODENAME"));
    assert_eq!(
        runtime_image,
        &format!("debian:{codename}-slim"),
        "runtime on the build's Debian"
    );
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        toolchain == "1" || version(toolchain) >= version(msrv),
        "rust:{toolchain} is older than rust-version {msrv}"
    );

    let cargo = build
        .find("RUN", |a| a.contains("cargo build"))
        .expect("a cargo build");
    for flag in ["--release", "--locked"] {
        assert!(cargo.contains(flag), "cargo build without {flag}: {cargo}");
    }

    assert!(
        runtime
            .find("RUN", |a| a.contains("install")
                && a.contains("ca-certificates"))
            .is_some(),
        "ca-certificates installed"
    );
    // Numeric uid:gid, not 0: Kubernetes' runAsNonRoot can only verify a number.
    let user = runtime.last("USER").expect("a USER");
    let ids: Vec<u32> = user
        .split(':')
        .map(|id| {
            id.parse()
                .unwrap_or_else(|_| panic!("USER {user}: numeric uid:gid"))
        })
        .collect();
    assert!(ids.len() == 2 && ids[0] != 0, "the runtime runs as {user}");

    let binary = Path::new(BIN).file_name().unwrap().to_str().unwrap();
    let copied = runtime
        .find("COPY", |a| {
            a.starts_with(&format!("--from={} ", build.name))
        })
        .expect("the binary copied from the build stage");
    let destination = copied.split_whitespace().last().unwrap();
    assert_eq!(
        destination,
        format!("/usr/local/bin/{binary}"),
        "on the default PATH"
    );
    let entrypoint = runtime.last("ENTRYPOINT").expect("an ENTRYPOINT");
    assert_eq!(
        entrypoint.replace(' ', ""),
        format!("[\"{binary}\"]"),
        "exec form, so SIGTERM reaches the binary"
    );

    let exposed: BTreeSet<String> = runtime
        .steps
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace().map(str::to_owned))
        .collect();
    let expected: BTreeSet<String> = [
        format!("{GRPC_PORT}/tcp"),
        format!("{QUIC_PORT}/udp"),
        format!("{HTTP_PORT}/tcp"),
        format!("{UPLOAD_PORT}/tcp"),
    ]
    .into();
    assert_eq!(exposed, expected);

    let ignored: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(|l| l.trim().trim_matches('/').to_owned())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for path in ["target", "data", "certs", ".env", ".git"] {
        assert!(ignored.contains(path), ".dockerignore misses {path}");
    }
}

// ---------------------------------------------------------------------------------------------
// Drain.

/// The drain's grace period in these tests.
const GRACE: Duration = Duration::from_secs(5);

/// Subscribers per transport, spread over this many connections.
const SUBSCRIBERS: usize = 100;
const CONNECTIONS: usize = 4;

/// The transports subscribers use; everything below sees only [`Transport`] and [`Session`].
fn transports(server: &TestServer) -> Vec<Box<dyn Transport>> {
    vec![
        Box::new(grpc_transport(
            &server.certs(),
            server.addr("grpc"),
            "consumer-1",
        )),
        Box::new(quic_transport(
            &server.certs(),
            server.addr("quic"),
            "consumer-1",
        )),
    ]
}

async fn sessions(server: &TestServer) -> Vec<Arc<dyn Session>> {
    let mut sessions = Vec::new();
    for transport in transports(server) {
        for _ in 0..CONNECTIONS {
            sessions.push(Arc::from(transport.connect().await.unwrap()));
        }
    }
    sessions
}

/// A change as a subscriber sees it: (revision, kind, worker, version).
type Change = (u64, UpdateKind, String, String);

fn change(update: &WorkerUpdate) -> Change {
    (
        update.revision,
        kind(update),
        update.worker_name.clone(),
        update.version.clone(),
    )
}

fn kind(update: &WorkerUpdate) -> UpdateKind {
    UpdateKind::try_from(update.kind).unwrap()
}

/// One subscription, what it saw after its snapshot, and where it would resume.
struct Subscriber {
    filter: Vec<String>,
    epoch: String,
    revision: u64,
    changes: Vec<Change>,
}

impl Subscriber {
    fn request(&self) -> SubscribeRequest {
        SubscribeRequest {
            consumer_id: String::new(),
            worker_names: self.filter.clone(),
            resume_revision: self.revision,
            epoch: self.epoch.clone(),
        }
    }

    fn wants(&self, worker: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|w| w == worker)
    }

    /// Takes one update; `Some(SYNCED revision)` on SYNCED.
    fn apply(&mut self, update: &WorkerUpdate) -> Option<u64> {
        assert_eq!(update.epoch, self.epoch, "same epoch throughout");
        match kind(update) {
            UpdateKind::Put | UpdateKind::Delete => {
                assert!(self.wants(&update.worker_name), "{update:?} outside filter");
                self.changes.push(change(update));
                self.revision = update.revision;
                None
            }
            UpdateKind::Synced => {
                assert!(update.revision >= self.revision, "SYNCED went back");
                self.revision = update.revision;
                Some(update.revision)
            }
            other => panic!("unexpected {other:?} (no RESET on resume): {update:?}"),
        }
    }
}

async fn next(stream: &mut UpdateStream) -> Option<Result<WorkerUpdate, ClientError>> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an update or the end within 10 s")
}

/// Reads updates until SYNCED; the stream stays open.
async fn until_synced(subscriber: &mut Subscriber, stream: &mut UpdateStream) -> u64 {
    loop {
        let update = next(stream).await.expect("open").expect("no error");
        if let Some(revision) = subscriber.apply(&update) {
            return revision;
        }
    }
}

/// Publishes through the signed hook; the change as subscribers will see it.
async fn publish(http: SocketAddr, secret: &str, worker: &str, version: &str) -> Change {
    let code = format!("export default {{ version: '{worker}@{version}' }}");
    let (status, body) = hook_put(http, secret, worker, version, code.as_bytes()).await;
    assert_eq!(status, 201, "{body}");
    let revision = body["revision"].as_u64().unwrap();
    (revision, UpdateKind::Put, worker.into(), version.into())
}

async fn remove(http: SocketAddr, secret: &str, worker: &str, version: &str) -> Change {
    let (status, body) = hook_delete(http, secret, worker).await;
    assert!((200..300).contains(&status), "{status} {body}");
    let revision = body["revision"].as_u64().unwrap();
    (revision, UpdateKind::Delete, worker.into(), version.into())
}

/// SIGTERM off the runtime's threads; the exit status and how long the drain took.
async fn terminate(server: TestServer) -> (TestServer, std::process::ExitStatus, Duration) {
    tokio::task::spawn_blocking(move || {
        let mut server = server;
        let started = Instant::now();
        let status = server.terminate(GRACE);
        (server, status, started.elapsed())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_100_subscribers_and_they_resume_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--grace", "5s"]);
    let (secret, _) = server.secrets();
    let http = server.addr("http");
    let mut published = vec![publish(http, &secret, "alpha", "0").await];

    // Live subscribers over a few connections, with three kinds of filter; each holds its
    // snapshot before anything else is published.
    let filters: [&[&str]; 3] = [&[], &["alpha"], &["beta", "gamma"]];
    let connections = sessions(&server).await;
    let total = SUBSCRIBERS * transports(&server).len();
    let mut live = Vec::new();
    for i in 0..total {
        let session = &connections[i % connections.len()];
        let filter: Vec<String> = filters[i % 3].iter().map(|s| (*s).to_owned()).collect();
        let mut stream = session
            .subscribe(SubscribeRequest {
                worker_names: filter.clone(),
                ..SubscribeRequest::default()
            })
            .await
            .unwrap();
        let reset = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(kind(&reset), UpdateKind::Reset);
        let mut subscriber = Subscriber {
            filter,
            epoch: reset.epoch.clone(),
            revision: 0,
            changes: Vec::new(),
        };
        // The snapshot's PUTs are state, not changes to count: keep only the SYNCED.
        loop {
            let update = next(&mut stream).await.unwrap().unwrap();
            if kind(&update) == UpdateKind::Synced {
                subscriber.revision = update.revision;
                break;
            }
            assert_eq!(kind(&update), UpdateKind::Put);
        }
        assert_eq!(subscriber.revision, 1);
        live.push((subscriber, stream));
    }

    // Changes while everyone listens, then SIGTERM at once: whatever a stream has not
    // delivered before it ends must come on resume.
    published.push(publish(http, &secret, "alpha", "1").await);
    published.push(publish(http, &secret, "beta", "1").await);
    published.push(publish(http, &secret, "gamma", "1").await);
    published.push(remove(http, &secret, "beta", "1").await);
    published.push(publish(http, &secret, "alpha", "2").await);
    let readers: Vec<_> = live
        .into_iter()
        .map(|(mut subscriber, mut stream)| {
            tokio::spawn(async move {
                loop {
                    match next(&mut stream).await {
                        Some(Ok(update)) => {
                            subscriber.apply(&update);
                        }
                        None => return (subscriber, "clean end".to_owned()),
                        Some(Err(ClientError::Status { code: 14, .. })) => {
                            return (subscriber, "UNAVAILABLE".to_owned());
                        }
                        Some(Err(error)) => panic!("stream ended with {error:?}"),
                    }
                }
            })
        })
        .collect();
    let (server, status, drained_in) = terminate(server).await;
    assert!(status.success(), "exit {status:?} after SIGTERM");
    let mut subscribers = Vec::new();
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for reader in readers {
        let (subscriber, end) = reader.await.unwrap();
        *ends.entry(end).or_default() += 1;
        subscribers.push(subscriber);
    }
    let delivered_before: usize = subscribers.iter().map(|s| s.changes.len()).sum();

    // Back on the same ports; more changes while every subscriber is away.
    let server = server.restart_same_ports();
    let http = server.addr("http");
    published.push(publish(http, &secret, "beta", "2").await);
    published.push(publish(http, &secret, "gamma", "2").await);
    published.push(remove(http, &secret, "alpha", "2").await);
    let head = published.last().unwrap().0;

    // Everyone resumes from its own (epoch, revision): no RESET, and in all exactly the
    // changes of its filter after its snapshot, in order, each once.
    let connections = sessions(&server).await;
    let mut resumed = Vec::new();
    for (i, mut subscriber) in subscribers.into_iter().enumerate() {
        let session = &connections[i % connections.len()];
        let mut stream = session.subscribe(subscriber.request()).await.unwrap();
        assert_eq!(until_synced(&mut subscriber, &mut stream).await, head);
        let expected: Vec<Change> = published[1..]
            .iter()
            .filter(|c| subscriber.wants(&c.2))
            .cloned()
            .collect();
        assert_eq!(
            subscriber.changes, expected,
            "filter {:?}",
            subscriber.filter
        );
        resumed.push(stream);
    }
    eprintln!(
        "drain: {total} subscribers ended {ends:?} in {drained_in:?}; {delivered_before} changes \
         delivered before the drain, the rest on resume"
    );

    // A second drain, with every resumed stream open.
    let (_server, status, _) = terminate(server).await;
    assert!(status.success(), "exit {status:?} after the second SIGTERM");
    drop(resumed);
}

/// `kill -TERM` without waiting.
fn sigterm(server: &TestServer) {
    let pid = server.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_upload_in_flight_finish_and_reach_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve_dev(dir.path(), &["--grace", "5s"]);
    let (_, token) = server.secrets();
    let upload = server.addr("upload");
    let session = grpc_session(&server.certs(), server.addr("grpc"), "consumer-1").await;
    let mut stream = session
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap();
    for expected in [UpdateKind::Reset, UpdateKind::Synced] {
        assert_eq!(kind(&next(&mut stream).await.unwrap().unwrap()), expected);
    }

    // An upload whose body is still on its way: the server asked for it (100 Continue).
    let code = b"export default { fetch() { return new Response('in flight') } }";
    let (boundary, body) = multipart(&[
        ("filename", None, b"in-flight"),
        ("version", None, b"1.0.0"),
        ("file", Some("worker.js"), code),
    ]);
    let mut tcp = tokio::net::TcpStream::connect(upload).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {upload}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\
         Expect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut interim = Vec::new();
    while !interim.ends_with(b"\r\n\r\n") {
        interim.push(tcp.read_u8().await.unwrap());
    }
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim)
    );

    // SIGTERM, and wait until the upload server has stopped accepting: the drain is on.
    sigterm(&server);
    let deadline = Instant::now() + GRACE;
    while tokio::net::TcpStream::connect(upload).await.is_ok() {
        assert!(Instant::now() < deadline, "the upload port still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The upload completes, durable and published, and the subscriber gets it before its
    // stream ends with UNAVAILABLE.
    tcp.write_all(&body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(GRACE, tcp.read_to_end(&mut answer))
        .await
        .expect("the upload answered within the grace period")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let put = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(
        (
            kind(&put),
            put.worker_name.as_str(),
            put.worker_code.as_ref()
        ),
        (UpdateKind::Put, "in-flight", &code[..])
    );
    match next(&mut stream).await {
        None | Some(Err(ClientError::Status { code: 14, .. })) => {}
        other => panic!("the stream ended with {other:?}"),
    }
    let (_server, status, _) = terminate(server).await;
    assert!(status.success(), "{status:?}");
}

/// `grpc.health.v1.Health/Watch` across SIGTERM: the watcher hears NOT_SERVING, then its stream
/// ends with UNAVAILABLE, and it does not hold the drain. The gRPC server stops on whichever
/// comes first, its shutdown signal or the end of its listener, so several servers at once give
/// that race several chances to drop NOT_SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watcher_hears_not_serving_and_does_not_hold_the_drain() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let watched = |_| async {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::serve_dev(dir.path(), &["--grace", "5s"]);
        let channel = grpc_transport(&server.certs(), server.addr("grpc"), "consumer-1")
            .channel()
            .await
            .unwrap();
        let request = HealthCheckRequest {
            service: "controlplane.v1.ControlPlane".into(),
        };
        let mut watch = HealthClient::new(channel)
            .watch(request)
            .await
            .unwrap()
            .into_inner();
        let status =
            |message: Option<_>| message.map(|m: tonic_health::pb::HealthCheckResponse| m.status());
        assert_eq!(
            status(watch.message().await.unwrap()),
            Some(ServingStatus::Serving)
        );

        sigterm(&server);
        let told = tokio::time::timeout(GRACE, watch.message())
            .await
            .expect("NOT_SERVING within the grace period");
        assert_eq!(status(told.unwrap()), Some(ServingStatus::NotServing));
        let ended = tokio::time::timeout(GRACE, watch.message())
            .await
            .expect("the watch ended within the grace period");
        // Ended by the server's drain, not cut off when the grace period ran out.
        let ended = ended.unwrap_err();
        assert_eq!(
            (ended.code(), ended.message()),
            (tonic::Code::Unavailable, "server shutting down")
        );
        let (_server, exit, _) = terminate(server).await;
        assert!(exit.success(), "{exit:?}");
    };
    futures_util::future::join_all((0..4).map(watched)).await;
}

/// Every `PREFIX…` the README shows after `marker` (`"checksum":"` or `sha256=`).
fn shown_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    text.match_indices(marker)
        .filter_map(|(at, _)| text[at + marker.len()..].split_once('…'))
        .map(|(prefix, _)| prefix)
        .collect()
}

#[test]
fn readme_walkthrough_shows_the_checksum_and_size_of_the_file_its_echo_writes() {
    let readme = read("README.md");
    let echo = readme
        .lines()
        .find_map(|l| l.strip_prefix("echo \"")?.strip_suffix("\" > worker.js"))
        .expect("the walkthrough writes worker.js with echo");
    let file = format!("{echo}\n");
    let checksum = sha256(file.as_bytes());
    let shown: Vec<&str> = [
        shown_after(&readme, "\"checksum\":\""),
        shown_after(&readme, "sha256="),
    ]
    .concat();
    assert!(shown.len() >= 4, "{shown:?}");
    for prefix in shown {
        assert!(
            prefix.len() >= 4 && checksum.starts_with(prefix),
            "README shows {prefix}…, worker.js is {checksum}"
        );
    }
    for size in readme
        .match_indices("\"size\":")
        .map(|(at, _)| &readme[at + 7..])
    {
        let digits: String = size.chars().take_while(char::is_ascii_digit).collect();
        assert_eq!(digits, file.len().to_string(), "README's size");
    }

    // What the walkthrough leaves in the checkout is ignored by git.
    let ignored = read(".gitignore");
    for left in ["/worker.js", "/workers/"] {
        assert!(
            ignored.lines().any(|l| l == left),
            ".gitignore lacks {left}"
        );
    }
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let output = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(ROOT)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_owned());
    let commit = std::env::var("WORKERPUSH_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or(head)
        .unwrap_or_else(|| "unknown".to_owned());
    assert_eq!(
        text.trim(),
        format!("workerpush {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}
