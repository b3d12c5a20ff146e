//! `workerpush bench`: N subscribers on their own mTLS connections, M changes of S bytes
//! published through the real signed hook, and for every (subscriber, change) the time from the
//! hook request leaving the publisher to verified code at the subscriber.
//!
//! Runs against a deployment the operator names, or (`--spawn`) against a core it starts on
//! this machine as a separate process, whose memory per idle subscriber and CPU per delivery
//! it then reads from `/proc`.
//!
//! Layout:
//! - `host`: the open-file limit, `/proc` samples, the CPU model.
//! - `target`: the deployment under test; the spawned core.
//! - `ledger`: the run's versions and send times, shared by publisher and subscribers.
//! - `publish`: signed hook requests, open or closed loop.
//! - `fleet`: the subscribers.
//! - `report`: the figures, as JSON or text.
//! - `nats`: `--baseline nats`, the same fan-out through a local `nats-server` over TLS.
//!
//! Uses the client library, the TLS module and the hook's public pieces (signing, form
//! encoding, its answer); nothing of the core's internals or the servers.

mod fleet;
pub(crate) mod host;
mod ledger;
mod nats;
mod publish;
mod report;
mod target;

pub use self::{
    host::Machine,
    report::{Baseline, Report},
};

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use self::{
    fleet::{Fleet, FleetConfig, MakeTransport, Tally},
    host::ProcessSample,
    ledger::{Ledger, unix_ns},
    publish::{MIN_SIZE, Pace, Publisher, publish_all},
    report::Spread,
    target::{Endpoints, SpawnedCore, hook_url},
};
use crate::{
    client::{ClientError, GrpcTransport, QuicTransport},
    config::{BenchArgs, BenchBaseline, BenchScenario, TransportKind},
    tls::ClientTlsPurpose,
};

/// Why a benchmark could not run. Configuration errors exit with 64.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag is missing or wrong, or this build cannot do what was asked.
    #[error("configuration: {0}")]
    Config(String),
    /// The core to measure could not be started.
    #[error("spawned core: {0}")]
    Spawn(String),
    /// Subscribers could not connect and sync.
    #[error("subscribers: {0}")]
    Subscribers(String),
    /// The hook refused changes.
    #[error("publishing: {0}")]
    Publish(String),
    /// The client library failed before anything ran.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// SIGINT or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    /// The process exit code: 64 (usage) for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 64,
            _ => 1,
        }
    }
}

/// The one place that maps `--transport` to a client transport: its TLS purpose and how to
/// make one.
fn transport_for(kind: TransportKind) -> Result<(ClientTlsPurpose, MakeTransport), BenchError> {
    match kind {
        TransportKind::Grpc => Ok((ClientTlsPurpose::Grpc, |addr, tls| {
            Ok(Arc::new(GrpcTransport::new(addr, tls)?))
        })),
        TransportKind::Quic => Ok((ClientTlsPurpose::Quic, |addr, tls| {
            Ok(Arc::new(QuicTransport::new(addr, tls)?))
        })),
    }
}

/// Connections per second the connect phase is allowed on top of a fixed minute.
const CONNECT_TIME_PER_SUBSCRIBER: Duration = Duration::from_millis(20);

/// The validated command line.
struct Plan {
    scenario: BenchScenario,
    transport: TransportKind,
    tls_purpose: ClientTlsPurpose,
    make_transport: MakeTransport,
    subscribers: usize,
    changes: usize,
    size: usize,
    pace: Pace,
    workers: usize,
    connect_concurrency: usize,
    deadline: Duration,
    /// Subscribers acknowledge, and each hook request waits this long for all of them.
    wait: Option<Duration>,
    /// `None`: spawn a core.
    remote: Option<Endpoints>,
    /// The same fan-out through this engine after the run.
    baseline: Option<BenchBaseline>,
    /// `--baseline nats`: the server binary.
    nats_server: PathBuf,
}

impl Plan {
    fn new(args: BenchArgs) -> Result<Self, BenchError> {
        let bad = |text: String| Err(BenchError::Config(text));
        let bundle = args.scenario == BenchScenario::Bundle;
        let changes = args.changes.unwrap_or(if bundle { 10 } else { 100 });
        let size = args.size.unwrap_or(if bundle { 1 << 20 } else { 256 });
        if args.subscribers == 0 {
            return bad("--subscribers must be at least 1".to_owned());
        }
        if changes == 0 {
            return bad("--changes must be at least 1".to_owned());
        }
        if size < MIN_SIZE {
            return bad(format!("--size must be at least {MIN_SIZE} bytes"));
        }
        if !(1..=1000).contains(&args.workers) {
            return bad("--workers must be between 1 and 1000".to_owned());
        }
        if args.connect_concurrency == 0 {
            return bad("--connect-concurrency must be at least 1".to_owned());
        }
        match args.wait {
            Some(wait) if wait > crate::http::MAX_WAIT => {
                return bad(format!(
                    "--wait is at most {}s, the hook's limit",
                    crate::http::MAX_WAIT.as_secs()
                ));
            }
            Some(_) if args.scenario == BenchScenario::Storm => {
                return bad(
                    "--wait is for fanout and bundle: the storm publishes while nobody listens"
                        .to_owned(),
                );
            }
            _ => {}
        }
        if args.baseline.is_some() {
            if args.scenario == BenchScenario::Storm {
                return bad(
                    "--baseline is for fanout and bundle: core NATS keeps nothing to resume from"
                        .to_owned(),
                );
            }
            if args.wait.is_some() {
                return bad(
                    "--baseline runs without --wait: core NATS has no acknowledgements".to_owned(),
                );
            }
        }
        let pace = match (args.rate, args.in_flight) {
            (Some(_), Some(_)) => {
                return bad(
                    "--rate (open loop) and --in-flight (closed loop) exclude each other"
                        .to_owned(),
                );
            }
            (Some(rate), None) if rate.is_finite() && rate > 0.0 && rate <= 1e6 => {
                Pace::Open { per_second: rate }
            }
            (Some(rate), None) => return bad(format!("--rate {rate} is not in (0, 1e6]")),
            (None, Some(0)) => return bad("--in-flight must be at least 1".to_owned()),
            (None, Some(in_flight)) => Pace::Closed { in_flight },
            // One bundle a second: each fans out alone, so its time is its own, not a queue's.
            (None, None) if bundle => Pace::Open { per_second: 1.0 },
            (None, None) => Pace::Closed { in_flight: 8 },
        };
        let remote = if args.spawn {
            if args.addr.is_some() || args.hook.is_some() {
                return bad(
                    "--spawn starts its own core: --addr and --hook are for an existing one"
                        .to_owned(),
                );
            }
            None
        } else {
            let missing =
                |flag: &str| BenchError::Config(format!("{flag} is required without --spawn"));
            let addr = args.addr.ok_or_else(|| missing("--addr"))?;
            let hook = hook_url(&args.hook.ok_or_else(|| missing("--hook"))?)?;
            let hook_secret = args
                .hook_secret
                .filter(|s| !s.is_empty())
                .ok_or_else(|| missing("--hook-secret (HOOK_SECRET)"))?;
            Some(Endpoints {
                addr,
                hook,
                hook_secret,
                ca: args.ca,
                cert: args.cert,
                key: args.key,
            })
        };
        let (tls_purpose, make_transport) = transport_for(args.transport)?;
        Ok(Self {
            scenario: args.scenario,
            transport: args.transport,
            tls_purpose,
            make_transport,
            subscribers: args.subscribers,
            changes,
            size,
            pace,
            workers: args.workers,
            connect_concurrency: args.connect_concurrency,
            deadline: args.deadline,
            wait: args.wait,
            remote,
            baseline: args.baseline,
            nats_server: args.nats_server,
        })
    }

    fn connect_timeout(&self) -> Duration {
        Duration::from_secs(60)
            + CONNECT_TIME_PER_SUBSCRIBER * u32::try_from(self.subscribers).unwrap_or(u32::MAX)
    }

    /// A report with the parameters filled in and nothing measured yet.
    fn report(&self, open_file_limit: u64) -> Report {
        let (r, in_flight) = match self.pace {
            Pace::Open { per_second } => (Some(per_second), None),
            Pace::Closed { in_flight } => (None, Some(in_flight)),
        };
        Report {
            transport: match self.transport {
                TransportKind::Grpc => "grpc",
                TransportKind::Quic => "quic",
            },
            scenario: match self.scenario {
                BenchScenario::Fanout => "fanout",
                BenchScenario::Bundle => "bundle",
                BenchScenario::Storm => "storm",
            },
            measures: match self.scenario {
                BenchScenario::Fanout | BenchScenario::Bundle => {
                    "hook request sent -> verified code at the subscriber"
                }
                BenchScenario::Storm => "reconnect started -> every missed change held",
            },
            n: self.subscribers,
            m: self.changes,
            s: self.size,
            r,
            in_flight,
            workers: self.workers.min(self.changes),
            p50_us: None,
            p90_us: None,
            p99_us: None,
            max_us: None,
            all_held_p50_us: None,
            all_held_max_us: None,
            wait_ms: self
                .wait
                .map(|w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX)),
            acked_p50_us: None,
            acked_p99_us: None,
            acked_max_us: None,
            not_acked: None,
            deliveries: 0,
            expected: 0,
            lost: 0,
            deliveries_per_sec: 0.0,
            duplicates: 0,
            verify_failures: 0,
            resets: 0,
            reconnects: 0,
            connect_secs: 0.0,
            publish_secs: 0.0,
            rss_per_idle_subscriber_kib: None,
            cpu_seconds_per_delivery: None,
            core_rss_kib: None,
            core_cpu_seconds: None,
            bench_rss_per_subscriber_kib: None,
            bench_cpu_seconds: None,
            open_file_limit,
            machine: Machine::this(),
            baseline: None,
        }
    }
}

/// Runs the benchmark `args` describe, until done or `shutdown`.
pub async fn run(args: BenchArgs, shutdown: CancellationToken) -> Result<Report, BenchError> {
    let plan = Plan::new(args)?;
    let open_file_limit = host::raise_open_file_limit();
    // Each subscriber is one socket here (and one in a spawned core, which inherits the
    // limit); leave room for the publisher, the store and the runtime.
    let needed = u64::try_from(plan.subscribers).unwrap_or(u64::MAX) + 256;
    if open_file_limit < needed {
        return Err(BenchError::Config(format!(
            "the open-file limit is {open_file_limit} (raised to the hard limit), too low for {} \
             subscribers (about {needed} needed): raise the hard limit (ulimit -Hn, LimitNOFILE)",
            plan.subscribers
        )));
    }
    let run = async {
        let mut report = execute(&plan, open_file_limit).await?;
        if let Some(BenchBaseline::Nats) = plan.baseline {
            tracing::info!("the same fan-out through nats-server over TLS");
            let nats = nats::measure(&plan, open_file_limit).await?;
            report.baseline = Some(Box::new(Baseline::new(&report, nats)));
        }
        Ok(report)
    };
    tokio::select! {
        report = run => report,
        () = shutdown.cancelled() => Err(BenchError::Interrupted),
    }
}

async fn execute(plan: &Plan, open_file_limit: u64) -> Result<Report, BenchError> {
    let Some(endpoints) = &plan.remote else {
        let core = SpawnedCore::start(plan.subscribers, plan.changes).await?;
        let result = match core.endpoints(plan.transport) {
            Ok(endpoints) => measure(plan, &endpoints, Some(core.pid()), open_file_limit).await,
            Err(error) => Err(error),
        };
        core.stop().await;
        return result;
    };
    measure(plan, endpoints, None, open_file_limit).await
}

/// Connects the subscribers, runs the scenario, and fills in the report. `core` is the pid of a
/// spawned core to sample.
async fn measure(
    plan: &Plan,
    endpoints: &Endpoints,
    core: Option<u32>,
    open_file_limit: u64,
) -> Result<Report, BenchError> {
    // Samples of the spawned core and of this process.
    let sample_core = || core.and_then(|pid| ProcessSample::of(pid).ok());
    let sample = || (sample_core(), ProcessSample::own().ok());
    let ledger = Arc::new(Ledger::new(plan.changes, plan.workers));
    let config = Arc::new(FleetConfig {
        make_transport: plan.make_transport,
        addr: endpoints.addr.clone(),
        tls: endpoints.tls(plan.tls_purpose)?,
        identity: endpoints.identity()?,
        connect_slots: Arc::new(Semaphore::new(plan.connect_concurrency)),
        ledger: ledger.clone(),
        ack: plan.wait.is_some(),
    });
    let publisher = Arc::new(Publisher::new(
        endpoints.hook.clone(),
        &endpoints.hook_secret,
        plan.size,
        plan.wait,
    )?);
    let mut report = plan.report(open_file_limit);
    if plan.scenario == BenchScenario::Storm {
        publisher
            .publish_seed(&ledger)
            .await
            .map_err(BenchError::Publish)?;
    }

    let (core_before, bench_before) = sample();
    let connecting = Instant::now();
    tracing::info!(subscribers = plan.subscribers, "connecting");
    let fleet = Fleet::start(&config, config.seats(plan.subscribers)?);
    if let Err(error) = fleet.synced(connecting + plan.connect_timeout()).await {
        fleet.stop().await;
        return Err(BenchError::Subscribers(error));
    }
    report.connect_secs = connecting.elapsed().as_secs_f64();
    let (core_idle, bench_idle) = sample();
    report.rss_per_idle_subscriber_kib = per_subscriber(core_before, core_idle, plan.subscribers);
    report.bench_rss_per_subscriber_kib =
        per_subscriber(bench_before, bench_idle, plan.subscribers);
    report.core_rss_kib = core_idle.map(|s| s.rss_kib);
    tracing::info!(
        seconds = report.connect_secs,
        "every subscriber synced; publishing"
    );

    let measured = match plan.scenario {
        BenchScenario::Fanout | BenchScenario::Bundle => {
            fanout(plan, fleet, publisher, &ledger, &mut report, &sample).await?
        }
        BenchScenario::Storm => {
            storm(
                plan,
                &config,
                fleet,
                publisher,
                &ledger,
                &mut report,
                &sample,
            )
            .await?
        }
    };
    let Measured {
        start,
        end,
        tallies,
        mut latencies_us,
        window_ns,
    } = measured;
    let sum = |f: fn(&Tally) -> u32| tallies.iter().map(|t| u64::from(f(t))).sum::<u64>();
    let counts = Counts {
        received: sum(|t| t.received),
        duplicates: sum(|t| t.duplicates),
        verify_failures: sum(|t| t.verify_failures),
        resets: sum(|t| t.resets),
        reconnects: sum(|t| t.reconnects),
    };
    finish(
        &mut report,
        counts,
        &mut latencies_us,
        window_ns,
        start,
        end,
    );
    Ok(report)
}

/// The sums of the subscribers' accounts.
struct Counts {
    received: u64,
    duplicates: u64,
    verify_failures: u64,
    resets: u64,
    reconnects: u64,
}

/// Fills in what the measured phase yields: latency percentiles over `latencies_us`, the
/// counts, deliveries per second over `window_ns`, and CPU time between the samples.
fn finish(
    report: &mut Report,
    counts: Counts,
    latencies_us: &mut [u64],
    window_ns: u64,
    start: Samples,
    end: Samples,
) {
    report.set_latency(Spread::of(latencies_us));
    report.deliveries = counts.received;
    report.duplicates = counts.duplicates;
    report.verify_failures = counts.verify_failures;
    report.resets = counts.resets;
    report.reconnects = counts.reconnects;
    report.expected = u64::try_from(report.n * report.m).unwrap_or(u64::MAX);
    report.lost = report.expected.saturating_sub(report.deliveries);
    if window_ns > 0 {
        report.deliveries_per_sec = report.deliveries as f64 / (window_ns as f64 / 1e9);
    }
    if let ((_, Some(start)), (_, Some(end))) = (start, end) {
        report.bench_cpu_seconds = Some(end.cpu_seconds - start.cpu_seconds);
    }
    if let ((Some(start), _), (Some(end), _)) = (start, end) {
        let cpu = end.cpu_seconds - start.cpu_seconds;
        report.core_cpu_seconds = Some(cpu);
        if report.deliveries > 0 {
            report.cpu_seconds_per_delivery = Some(cpu / report.deliveries as f64);
        }
    }
}

/// Samples of the spawned core (if any) and of this process.
type Samples = (Option<ProcessSample>, Option<ProcessSample>);

/// What the measured phase of a scenario yields.
struct Measured {
    /// Samples when it started and ended.
    start: Samples,
    end: Samples,
    tallies: Vec<Tally>,
    /// The latencies the report's percentiles are taken over, µs.
    latencies_us: Vec<u64>,
    /// The time deliveries per second are taken over, ns.
    window_ns: u64,
}

/// Fanout and bundle: publish every change to the synced fleet and wait until every
/// subscriber holds them all (or the deadline).
async fn fanout(
    plan: &Plan,
    fleet: Fleet,
    publisher: Arc<Publisher>,
    ledger: &Arc<Ledger>,
    report: &mut Report,
    sample: &impl Fn() -> Samples,
) -> Result<Measured, BenchError> {
    let start = sample();
    let publishing = unix_ns();
    let mut published = publish_all(publisher, ledger.clone(), plan.pace).await;
    report.publish_secs = published.elapsed.as_secs_f64();
    if let Err(error) = published.check() {
        fleet.stop().await;
        return Err(error);
    }
    if plan.wait.is_some() {
        let acked = Spread::of(&mut published.acked_us);
        report.acked_p50_us = acked.map(|s| s.p50);
        report.acked_p99_us = acked.map(|s| s.p99);
        report.acked_max_us = acked.map(|s| s.max);
        report.not_acked = Some(published.not_acked);
    }
    fleet.complete(Instant::now() + plan.deadline).await;
    let end = sample();
    let tallies = fleet.stop().await;
    let latencies_us = tallies
        .iter()
        .flat_map(|t| t.latencies_us.iter().map(|&us| u64::from(us)))
        .collect();
    all_held(report, ledger);
    Ok(Measured {
        start,
        end,
        tallies,
        latencies_us,
        window_ns: ledger.last_delivery_ns().saturating_sub(publishing),
    })
}

/// The storm: drop every connection at once, publish while everyone is away, then reconnect
/// them all with resume and time until each holds every change it missed.
async fn storm(
    plan: &Plan,
    config: &Arc<FleetConfig>,
    fleet: Fleet,
    publisher: Arc<Publisher>,
    ledger: &Arc<Ledger>,
    report: &mut Report,
    sample: &impl Fn() -> Samples,
) -> Result<Measured, BenchError> {
    // Each subscriber keeps its position and its TLS sessions, as an edge host would.
    let seats: Vec<_> = fleet.stop().await.into_iter().map(|t| t.seat).collect();
    tracing::info!("dropped every connection; publishing while they are away");
    let published = publish_all(publisher, ledger.clone(), plan.pace).await;
    report.publish_secs = published.elapsed.as_secs_f64();
    published.check()?;
    tracing::info!("reconnecting every subscriber with resume");
    let start = sample();
    let reconnecting = Instant::now();
    let fleet = Fleet::start(config, seats);
    fleet.complete(reconnecting + plan.deadline).await;
    let window_ns = u64::try_from(reconnecting.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let end = sample();
    let tallies = fleet.stop().await;
    let latencies_us = tallies
        .iter()
        .filter_map(|t| t.completed_after)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .collect();
    Ok(Measured {
        start,
        end,
        tallies,
        latencies_us,
        window_ns,
    })
}

/// Per change, from its send until the last subscriber held it: the report's `all_held`
/// figures.
fn all_held(report: &mut Report, ledger: &Ledger) {
    let mut all_held: Vec<u64> = ledger
        .slowest_per_change()
        .into_iter()
        .map(|ns| ns / 1_000)
        .collect();
    let all_held = Spread::of(&mut all_held);
    report.all_held_p50_us = all_held.map(|s| s.p50);
    report.all_held_max_us = all_held.map(|s| s.max);
}

/// RSS growth per subscriber, KiB.
fn per_subscriber(
    before: Option<ProcessSample>,
    after: Option<ProcessSample>,
    subscribers: usize,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    let growth = after.rss_kib as f64 - before.rss_kib as f64;
    Some(growth / subscribers as f64)
}
