//! The scenarios and the runner.
//!
//! A run: a real core (`serve --dev`, embedded store or a private Redis), a fleet of consumers
//! (even ones over gRPC through a [`TcpProxy`], odd ones over QUIC through a [`UdpProxy`],
//! every third one subscribed to everything, the others to a seeded subset), plus an auditor
//! (gRPC, direct, everything), all recording; the publisher sends the seeded plan through the
//! hook while one fault is injected; then the faults stop, a sentinel change is published,
//! every consumer must hold exactly the core's latest state, and [`check::check_run`] goes
//! over everything that happened.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    FaultError,
    check::{self, ConsumerRecord, Figures, Filter, Kind, Listing, passes},
    process::{CoreAddrs, CoreProcess, RedisProcess, ScratchDir},
    publish::{self, Action, HookClient, Publisher, Step, WorkerLedger},
    record::{self, Pause, Recorder, SharedLog},
    tcp::TcpProxy,
    udp::{LinkProfile, UdpProxy},
};
use crate::{
    client::{
        Backoff, ClientError, Consumer, ConsumerOptions, GrpcTransport, QuicTransport, Transport,
    },
    pb::ListWorkersRequest,
    tls::{self, ClientTlsPurpose},
};

/// The worker every consumer's filter holds, published last.
pub const SENTINEL: &str = "sentinel";

/// The fault a scenario injects while the plan is published.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// QUIC consumers behind lossy links (`profile`), and blackholes of 1.5–3.5 s on one or
    /// every QUIC link.
    QuicLoss {
        /// How the links misbehave.
        profile: LinkProfile,
    },
    /// gRPC connections reset at random (exponential lifetimes with this mean, in ms).
    TcpCuts {
        /// Mean connection lifetime, milliseconds.
        mean_lifetime_ms: u64,
    },
    /// `kill -9` of the core during fan-out, restarted on the same ports, `cycles` times.
    CoreKill {
        /// How many kills.
        cycles: u32,
    },
    /// The private Redis killed with SIGKILL and restarted `outages` times, then the core
    /// killed and restarted once (so it reloads everything from Redis).
    RedisKill {
        /// How many Redis kills.
        outages: u32,
    },
    /// The core on a Redis primary with one replica and `--redis-min-replicas 1`, through a
    /// proxy: `FLUSHALL` mid-run, then a failover (the primary killed, the replica promoted,
    /// the proxy moved to it, the old primary back as its replica).
    RedisLoss,
    /// Half the consumers at a time stop reading for 1.5–3 s, with a small retained log.
    SlowConsumers,
    /// Every consumer's connection dropped at once, at least `storms` times.
    ReconnectStorm {
        /// How many storms at least.
        storms: u32,
    },
}

/// A scenario: a fault and the load under it.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name (`quic_loss`, …).
    pub name: String,
    /// The fault.
    pub fault: Fault,
    /// Consumers besides the auditor (half gRPC, half QUIC).
    pub consumers: usize,
    /// Workers the plan spreads over.
    pub workers: usize,
    /// Changes in the plan.
    pub changes: usize,
    /// Hook requests in flight.
    pub in_flight: usize,
    /// The core's `--retain-changes`.
    pub retain_changes: usize,
    /// How long consumers may take to converge once the faults stop.
    pub converge_within: Duration,
}

impl Scenario {
    fn new(name: &str, fault: Fault, changes: usize) -> Self {
        Self {
            name: name.to_owned(),
            fault,
            consumers: 10,
            workers: 20,
            changes,
            in_flight: 16,
            retain_changes: 10_000,
            converge_within: Duration::from_secs(60),
        }
    }

    /// 10% bursty QUIC loss with reordering, duplicates and blackholes.
    pub fn quic_loss() -> Self {
        Self::new(
            "quic_loss",
            Fault::QuicLoss {
                profile: LinkProfile::BURSTY_10_PERCENT,
            },
            2_000,
        )
    }

    /// gRPC connections reset mid-stream.
    pub fn tcp_cuts() -> Self {
        Self::new(
            "tcp_cuts",
            Fault::TcpCuts {
                mean_lifetime_ms: 400,
            },
            800,
        )
    }

    /// 20 `kill -9` cycles of the core.
    pub fn core_kill() -> Self {
        Self::new("core_kill", Fault::CoreKill { cycles: 20 }, 1_000)
    }

    /// Redis killed and restarted mid-run.
    pub fn redis_kill() -> Self {
        Self::new("redis_kill", Fault::RedisKill { outages: 2 }, 800)
    }

    /// A Redis flushed, then failed over, mid-run.
    pub fn redis_loss() -> Self {
        Self::new("redis_loss", Fault::RedisLoss, 800)
    }

    /// Consumers that stop reading for a while.
    pub fn slow_consumers() -> Self {
        Self {
            retain_changes: 200,
            ..Self::new("slow_consumers", Fault::SlowConsumers, 1_200)
        }
    }

    /// Every consumer dropped at once, repeatedly.
    pub fn reconnect_storm() -> Self {
        Self {
            consumers: 16,
            ..Self::new("reconnect_storm", Fault::ReconnectStorm { storms: 4 }, 800)
        }
    }

    /// Every scenario, in CI sizes.
    pub fn all() -> Vec<Self> {
        vec![
            Self::quic_loss(),
            Self::tcp_cuts(),
            Self::core_kill(),
            Self::redis_kill(),
            Self::redis_loss(),
            Self::slow_consumers(),
            Self::reconnect_storm(),
        ]
    }

    /// The scenario called `name`.
    pub fn named(name: &str) -> Option<Self> {
        Self::all().into_iter().find(|s| s.name == name)
    }
}

/// Where the binaries are.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The `workerpush` binary.
    pub workerpush: PathBuf,
    /// `redis-server`.
    pub redis_server: PathBuf,
}

/// What a run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// The checker's figures.
    pub figures: Figures,
    /// Violations described (the checker's, the fault checks', the publisher's).
    pub details: Vec<String>,
    /// Violations found outside the checker (kill checks, publisher failures, consumers that
    /// gave up).
    pub other_violations: u64,
    /// Time from the end of the faults until every consumer held the final state (`None`:
    /// some never did).
    pub convergence: Option<Duration>,
    /// The consumer that took longest to converge, and how long.
    pub slowest: Option<String>,
    /// Time to publish the plan, faults included.
    pub publishing: Duration,
    /// The whole run.
    pub elapsed: Duration,
    /// Changes the hook answered 2xx for (sentinel included).
    pub accepted: usize,
    /// The final head revision.
    pub head: u64,
    /// Hook requests retried.
    pub publish_retries: u64,
    /// What the faults did.
    pub faults: Vec<String>,
}

impl Report {
    /// No violation, and convergence.
    pub fn passed(&self) -> bool {
        self.figures.violations() == 0 && self.other_violations == 0 && self.convergence.is_some()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let convergence = self
            .convergence
            .map_or("never".to_owned(), |d| format!("{d:.2?}"));
        writeln!(
            f,
            "faults: scenario={} seed={} {} in {:.1?}: accepted={} head={} \
             publishing={:.1?} retries={} convergence={convergence} (slowest: {}) \
             other_violations={}",
            self.scenario,
            self.seed,
            if self.passed() { "PASS" } else { "FAIL" },
            self.elapsed,
            self.accepted,
            self.head,
            self.publishing,
            self.publish_retries,
            self.slowest.as_deref().unwrap_or("-"),
            self.other_violations,
        )?;
        writeln!(f, "faults:   {}", self.figures)?;
        for line in &self.faults {
            writeln!(f, "faults:   fault: {line}")?;
        }
        for line in &self.details {
            writeln!(f, "faults:   VIOLATION {line}")?;
        }
        Ok(())
    }
}

/// One consumer of the fleet.
struct Member {
    name: String,
    transport: &'static str,
    filter: Filter,
    log: SharedLog,
    pause: Pause,
    /// While on, the consumer stays disconnected (an edge host away for a while).
    away: Pause,
    /// The token of the current `Consumer::run`; replaced (and the old one cancelled) to drop
    /// the connection and reconnect at once.
    session: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<Result<(), ClientError>>,
    tcp: Option<TcpProxy>,
    udp: Option<UdpProxy>,
}

impl Member {
    fn position(&self) -> u64 {
        record::lock(&self.log)
            .position
            .as_ref()
            .map_or(0, |p| p.revision)
    }

    /// Whether it holds `revision` and exactly the listing's workers that pass its filter.
    fn holds(&self, revision: u64, listing: &Listing) -> bool {
        let log = record::lock(&self.log);
        log.position
            .as_ref()
            .is_some_and(|p| p.revision >= revision)
            && log.state.iter().eq(listing
                .workers
                .iter()
                .filter(|(worker, _)| passes(&self.filter, worker)))
    }

    fn has_position(&self) -> bool {
        record::lock(&self.log).position.is_some()
    }

    /// Disconnects the consumer and keeps it away until [`Member::come_back`].
    fn go_away(&self) {
        self.away.set(true);
        self.drop_connection();
    }

    fn come_back(&self) {
        self.away.set(false);
    }

    /// Drops the connection now; the consumer reconnects and resumes at once.
    fn drop_connection(&self) {
        let fresh = CancellationToken::new();
        let old = std::mem::replace(&mut *lock(&self.session), fresh);
        old.cancel();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections are single assignments.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The consumers of a run.
struct Fleet {
    members: Vec<Member>,
    done: CancellationToken,
}

fn setup_error(what: &str) -> impl Fn(ClientError) -> FaultError + '_ {
    move |e| FaultError::Setup(format!("{what}: {e}"))
}

impl Fleet {
    async fn start(
        scenario: &Scenario,
        rng: &mut StdRng,
        addrs: CoreAddrs,
        tls: &ClientTls,
    ) -> Result<Self, FaultError> {
        let done = CancellationToken::new();
        let mut members = Vec::new();
        for i in 0..=scenario.consumers {
            // The last one is the auditor: gRPC, direct, every worker.
            let auditor = i == scenario.consumers;
            let name = if auditor {
                "auditor".to_owned()
            } else {
                format!("c{i:02}")
            };
            let filter: Filter = if auditor || i % 3 == 0 {
                None
            } else {
                let mut names: BTreeSet<String> = (0..scenario.workers)
                    .filter(|_| rng.random_bool(0.5))
                    .map(publish::worker_name)
                    .collect();
                names.insert(publish::worker_name(rng.random_range(0..scenario.workers)));
                names.insert(SENTINEL.to_owned());
                Some(names)
            };
            let options = ConsumerOptions {
                consumer_id: format!("{}/{name}", tls::pki::DEV_CLIENT),
                workers: filter.iter().flatten().cloned().collect(),
                backoff: Backoff {
                    initial: Duration::from_millis(50),
                    max: Duration::from_secs(1),
                },
                ack: true,
                endpoint: None,
                ..ConsumerOptions::default()
            };
            let log = SharedLog::default();
            let pause = Pause::default();
            let away = Pause::default();
            let session = Arc::new(Mutex::new(CancellationToken::new()));
            let recorder = Recorder::new(log.clone(), pause.clone());
            let seed = rng.random();
            let (task, tcp, udp) = if auditor {
                let transport = GrpcTransport::new(&local(addrs.grpc.port()), tls.grpc.clone())
                    .map_err(setup_error("grpc transport"))?;
                let task = spawn_consumer(transport, options, recorder, &session, &away, &done);
                (task, None, None)
            } else if i % 2 == 0 {
                let proxy = TcpProxy::start(addrs.grpc, None, seed).await?;
                let transport = GrpcTransport::new(&local(proxy.addr().port()), tls.grpc.clone())
                    .map_err(setup_error("grpc transport"))?;
                let task = spawn_consumer(transport, options, recorder, &session, &away, &done);
                (task, Some(proxy), None)
            } else {
                let proxy = UdpProxy::start(addrs.quic, LinkProfile::CLEAN, seed).await?;
                let transport = QuicTransport::new(&local(proxy.addr().port()), tls.quic.clone())
                    .map_err(setup_error("quic transport"))?;
                let task = spawn_consumer(transport, options, recorder, &session, &away, &done);
                (task, None, Some(proxy))
            };
            members.push(Member {
                name,
                transport: if auditor || i % 2 == 0 {
                    "grpc"
                } else {
                    "quic"
                },
                filter,
                log,
                pause,
                away,
                session,
                task,
                tcp,
                udp,
            });
        }
        Ok(Self { members, done })
    }

    fn consumers(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.name != "auditor")
    }

    /// Waits until every member has a position (its first SYNCED).
    async fn wait_synced(&self, within: Duration) -> Result<(), FaultError> {
        wait_until(within, || self.members.iter().all(Member::has_position))
            .await
            .map_err(|()| {
                let waiting: Vec<_> = self
                    .members
                    .iter()
                    .filter(|m| !m.has_position())
                    .map(|m| m.name.clone())
                    .collect();
                FaultError::Setup(format!("consumers never synced: {waiting:?}"))
            })
    }

    /// Ends every fault the fleet carries: clean links, no cuts, nobody paused.
    fn calm(&self) {
        for member in &self.members {
            if let Some(udp) = &member.udp {
                udp.set_profile(LinkProfile::CLEAN);
                udp.end_blackhole();
            }
            if let Some(tcp) = &member.tcp {
                tcp.set_mean_lifetime(None);
            }
            member.pause.set(false);
            member.come_back();
        }
    }

    /// Stops every consumer; returns the members (logs kept) and what the proxies did.
    async fn stop(self, violations: &mut Vec<String>) -> (Vec<Member>, Vec<String>) {
        self.done.cancel();
        for member in &self.members {
            lock(&member.session).cancel();
        }
        let mut members = Vec::new();
        let mut udp_total = super::udp::LinkStats::default();
        let mut tcp_total = super::tcp::TcpStats::default();
        for mut member in self.members {
            match tokio::time::timeout(Duration::from_secs(10), &mut member.task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => {
                    violations.push(format!("{} gave up: {error}", member.name));
                }
                Ok(Err(error)) => violations.push(format!("{} panicked: {error}", member.name)),
                Err(_) => {
                    member.task.abort();
                    violations.push(format!("{} did not stop", member.name));
                }
            }
            if let Some(udp) = member.udp.take() {
                let s = udp.stop().await;
                for (total, d) in [(&mut udp_total.up, s.up), (&mut udp_total.down, s.down)] {
                    total.passed += d.passed;
                    total.dropped += d.dropped;
                    total.reordered += d.reordered;
                    total.duplicated += d.duplicated;
                    total.blackholed += d.blackholed;
                }
            }
            if let Some(tcp) = member.tcp.take() {
                let s = tcp.stop().await;
                tcp_total.accepted += s.accepted;
                tcp_total.cut += s.cut;
                tcp_total.upstream_refused += s.upstream_refused;
            }
            members.push(member);
        }
        let links = vec![
            format!("quic links: {udp_total}"),
            format!("grpc links: {tcp_total}"),
        ];
        (members, links)
    }
}

fn local(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn spawn_consumer<T: Transport + 'static>(
    transport: T,
    options: ConsumerOptions,
    mut recorder: Recorder,
    session: &Arc<Mutex<CancellationToken>>,
    away: &Pause,
    done: &CancellationToken,
) -> JoinHandle<Result<(), ClientError>> {
    let session = session.clone();
    let away = away.clone();
    let done = done.clone();
    tokio::spawn(async move {
        let mut consumer = Consumer::new(transport, options, None);
        loop {
            tokio::select! {
                () = away.released() => {}
                () = done.cancelled() => return Ok(()),
            }
            let token = lock(&session).clone();
            consumer.run(&mut recorder, token).await?;
            if done.is_cancelled() {
                return Ok(());
            }
        }
    })
}

/// Polls `condition` every 10 ms up to `within`.
async fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    while !condition() {
        if Instant::now() > deadline {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

struct ClientTls {
    grpc: Arc<rustls::ClientConfig>,
    quic: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    fn load(certs: &std::path::Path) -> Result<Self, FaultError> {
        tls::install_crypto_provider();
        let client = tls::pki::DEV_CLIENT;
        let config = |purpose| {
            tls::client_config(
                &certs.join("ca.pem"),
                &certs.join(format!("clients/{client}.pem")),
                &certs.join(format!("clients/{client}-key.pem")),
                purpose,
            )
            .map_err(|e| FaultError::Setup(format!("client TLS: {e}")))
        };
        Ok(Self {
            grpc: config(ClientTlsPurpose::Grpc)?,
            quic: config(ClientTlsPurpose::Quic)?,
        })
    }
}

/// `ListWorkers` from the core, directly over gRPC.
async fn list(addrs: CoreAddrs, tls: &ClientTls) -> Result<Listing, FaultError> {
    let transport = GrpcTransport::new(&local(addrs.grpc.port()), tls.grpc.clone())
        .map_err(setup_error("grpc transport"))?;
    let mut last = None;
    for _ in 0..50 {
        let answer = match transport.connect().await {
            Ok(session) => session.list(ListWorkersRequest::default()).await,
            Err(error) => Err(error),
        };
        match answer {
            Ok(listing) => {
                return Ok(Listing {
                    epoch: listing.epoch,
                    head: listing.revision,
                    revisions: listing
                        .workers
                        .iter()
                        .map(|w| (w.worker_name.clone(), w.revision))
                        .collect(),
                    workers: listing
                        .workers
                        .into_iter()
                        .map(|w| (w.worker_name, (w.version, w.checksum)))
                        .collect(),
                });
            }
            Err(error) => last = Some(error),
        }
        // Retrying a refused connection (the store may still be coming back).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(FaultError::Setup(format!("ListWorkers: {last:?}")))
}

/// What must survive a kill: the acknowledged changes and the highest revision anyone saw.
struct BeforeKill {
    epoch: Option<String>,
    max_acked: u64,
    max_seen: u64,
    ledger: BTreeMap<String, WorkerLedger>,
}

impl BeforeKill {
    fn take(publisher: &Publisher, fleet: &Fleet) -> Self {
        let accepted = publisher.accepted_changes();
        Self {
            epoch: accepted.last().map(|a| a.epoch.clone()),
            max_acked: accepted.iter().map(|a| a.revision).max().unwrap_or(0),
            max_seen: fleet
                .members
                .iter()
                .map(|m| record::lock(&m.log).max_revision)
                .max()
                .unwrap_or(0),
            ledger: publisher.ledger(),
        }
    }

    /// Checks a listing taken after a restart; `started` is the ledger after the listing.
    fn check(
        &self,
        what: &str,
        listing: &Listing,
        started: &BTreeMap<String, WorkerLedger>,
    ) -> Vec<String> {
        let mut violations = Vec::new();
        if let Some(epoch) = &self.epoch
            && epoch != &listing.epoch
        {
            violations.push(format!(
                "{what}: epoch {} after {epoch}: history lost",
                listing.epoch
            ));
        }
        if listing.head < self.max_acked {
            violations.push(format!(
                "{what}: head {} below acknowledged revision {}",
                listing.head, self.max_acked
            ));
        }
        if listing.head < self.max_seen {
            violations.push(format!(
                "{what}: head {} below revision {} a consumer saw",
                listing.head, self.max_seen
            ));
        }
        for (worker, ledger) in &self.ledger {
            let Some((kind, revision, seq)) = ledger.acked else {
                continue;
            };
            let moved_on = started.get(worker).is_some_and(|l| l.started > seq);
            let now = listing.revisions.get(worker).copied();
            let lost = match (kind, now) {
                (Kind::Put, Some(r)) => r < revision,
                (Kind::Put, None) => !moved_on,
                (Kind::Delete, None) => false,
                (Kind::Delete, Some(r)) => r < revision || !moved_on,
            };
            if lost {
                violations.push(format!(
                    "{what}: acknowledged {kind:?} of {worker} at revision {revision} lost \
                     (now {now:?})"
                ));
            }
        }
        violations
    }
}

/// What the fault driver hands back.
#[derive(Default)]
struct FaultOutcome {
    notes: Vec<String>,
    violations: Vec<String>,
}

/// Sleeps a random time in `range` milliseconds (a fault's own timing, never a readiness wait).
async fn pause_ms(rng: &mut StdRng, range: std::ops::Range<u64>) -> Duration {
    let duration = Duration::from_millis(rng.random_range(range));
    tokio::time::sleep(duration).await;
    duration
}

struct Faults<'a> {
    fault: Fault,
    rng: StdRng,
    fleet: &'a Fleet,
    publisher: &'a Publisher,
    publishing: CancellationToken,
    core: &'a mut CoreProcess,
    redis: Option<&'a mut RedisProcess>,
    replica: Option<&'a mut RedisProcess>,
    redis_proxy: Option<&'a TcpProxy>,
    tls: &'a ClientTls,
}

impl Faults<'_> {
    async fn drive(mut self) -> FaultOutcome {
        let mut out = FaultOutcome::default();
        match self.fault {
            Fault::QuicLoss { profile } => self.quic_loss(profile, &mut out).await,
            Fault::TcpCuts { mean_lifetime_ms } => {
                let mean = Duration::from_millis(mean_lifetime_ms);
                for member in &self.fleet.members {
                    if let Some(tcp) = &member.tcp {
                        tcp.set_mean_lifetime(Some(mean));
                    }
                }
                self.publishing.cancelled().await;
                out.notes
                    .push(format!("gRPC connections cut after ~{mean:?} on average"));
            }
            Fault::CoreKill { cycles } => self.core_kill(cycles, &mut out).await,
            Fault::RedisKill { outages } => self.redis_kill(outages, &mut out).await,
            Fault::RedisLoss => self.redis_loss(&mut out).await,
            Fault::SlowConsumers => self.slow(&mut out).await,
            Fault::ReconnectStorm { storms } => self.storm(storms, &mut out).await,
        }
        out
    }

    async fn quic_loss(&mut self, profile: LinkProfile, out: &mut FaultOutcome) {
        let links: Vec<&UdpProxy> = self
            .fleet
            .members
            .iter()
            .filter_map(|m| m.udp.as_ref())
            .collect();
        for link in &links {
            link.set_profile(profile);
        }
        let (mut one, mut all, mut dark) = (0, 0, Duration::ZERO);
        while !self.publishing.is_cancelled() {
            pause_ms(&mut self.rng, 300..1_200).await;
            let duration = Duration::from_millis(self.rng.random_range(1_500..3_500));
            if self.rng.random_bool(0.3) {
                links.iter().for_each(|l| l.blackhole(duration));
                all += 1;
            } else if let Some(link) = links.get(self.rng.random_range(0..links.len().max(1))) {
                link.blackhole(duration);
                one += 1;
            }
            dark += duration;
            tokio::time::sleep(duration).await;
        }
        out.notes.push(format!(
            "{:.1}% expected loss on {} QUIC links; blackholes: {one} of one link, {all} of \
             every link, {dark:.1?} in all",
            profile.expected_loss() * 100.0,
            links.len()
        ));
    }

    async fn restart_checked(&mut self, what: &str, before: &BeforeKill, out: &mut FaultOutcome) {
        if let Err(error) = self.core.restart().await {
            out.violations
                .push(format!("{what}: core did not restart: {error}"));
            return;
        }
        match list(self.core.addrs(), self.tls).await {
            Ok(listing) => {
                let started = self.publisher.ledger();
                out.violations
                    .extend(before.check(what, &listing, &started));
            }
            Err(error) => out.violations.push(format!("{what}: {error}")),
        }
    }

    async fn core_kill(&mut self, cycles: u32, out: &mut FaultOutcome) {
        let mut down = Duration::ZERO;
        for cycle in 1..=cycles {
            pause_ms(&mut self.rng, 150..500).await;
            self.core.kill9().await;
            let before = BeforeKill::take(self.publisher, self.fleet);
            down += pause_ms(&mut self.rng, 0..300).await;
            let started = Instant::now();
            self.restart_checked(&format!("kill {cycle}"), &before, out)
                .await;
            down += started.elapsed();
        }
        self.publishing.cancelled().await;
        out.notes.push(format!(
            "{cycles} kill -9 cycles of the core, {:.1?} down in all, {} starts",
            down,
            self.core.starts()
        ));
    }

    async fn redis_kill(&mut self, outages: u32, out: &mut FaultOutcome) {
        let mut down = Duration::ZERO;
        if let Some(redis) = self.redis.as_deref_mut() {
            for outage in 1..=outages {
                pause_ms(&mut self.rng, 400..1_200).await;
                redis.kill9().await;
                down += pause_ms(&mut self.rng, 1_000..2_500).await;
                if let Err(error) = redis.restart().await {
                    out.violations
                        .push(format!("redis outage {outage}: no restart: {error}"));
                    return;
                }
            }
        }
        // Then the core, so that it reloads everything from what Redis kept.
        pause_ms(&mut self.rng, 200..600).await;
        self.core.kill9().await;
        let before = BeforeKill::take(self.publisher, self.fleet);
        self.restart_checked("core restart after the redis outages", &before, out)
            .await;
        self.publishing.cancelled().await;
        out.notes.push(format!(
            "{outages} redis-server kill -9 outages ({down:.1?} down), then one core kill -9"
        ));
    }

    async fn redis_loss(&mut self, out: &mut FaultOutcome) {
        let (Some(primary), Some(replica), Some(proxy)) = (
            self.redis.as_deref_mut(),
            self.replica.as_deref_mut(),
            self.redis_proxy,
        ) else {
            out.violations
                .push("redis_loss: no primary, replica and proxy".to_owned());
            return;
        };
        pause_ms(&mut self.rng, 400..1_200).await;
        if let Err(error) = primary.command(&["FLUSHALL"]).await {
            out.violations
                .push(format!("redis_loss: FLUSHALL: {error}"));
            return;
        }
        pause_ms(&mut self.rng, 1_000..2_000).await;
        // Failover: the primary dies, the replica takes over, the proxy follows it.
        primary.kill9().await;
        if let Err(error) = replica.command(&["REPLICAOF", "NO", "ONE"]).await {
            out.violations
                .push(format!("redis_loss: promoting the replica: {error}"));
            return;
        }
        replica.promoted();
        proxy.set_upstream(replica.addr());
        proxy.cut_all();
        // `--redis-min-replicas 1` refuses changes until the old primary is back as a replica.
        let down = pause_ms(&mut self.rng, 300..900).await;
        primary.follow_at_restart(replica);
        if let Err(error) = primary.restart().await {
            out.violations
                .push(format!("redis_loss: the old primary as a replica: {error}"));
            return;
        }
        self.publishing.cancelled().await;
        out.notes.push(format!(
            "FLUSHALL of the primary, then a failover to its replica ({down:.1?} without a \
             replica), --redis-min-replicas 1"
        ));
    }

    async fn slow(&mut self, out: &mut FaultOutcome) {
        let mut consumers: Vec<&Member> = self.fleet.consumers().collect();
        let (mut stopped_reading, mut went_away, mut stalled) = (0, 0, Duration::ZERO);
        while !self.publishing.is_cancelled() {
            pause_ms(&mut self.rng, 200..600).await;
            consumers.shuffle(&mut self.rng);
            let half = consumers.len() / 2;
            // A quarter stop reading (the server sees back-pressure); a quarter go away and
            // come back later (resume from an old position).
            let (reading, away) = consumers[..half].split_at(half / 2);
            reading.iter().for_each(|m| m.pause.set(true));
            away.iter().for_each(|m| m.go_away());
            let duration = pause_ms(&mut self.rng, 1_500..3_000).await;
            reading.iter().for_each(|m| m.pause.set(false));
            away.iter().for_each(|m| m.come_back());
            stopped_reading += reading.len();
            went_away += away.len();
            stalled += duration;
        }
        out.notes.push(format!(
            "{stopped_reading} consumers stopped reading and {went_away} went away for \
             1.5–3 s, {stalled:.1?} of stalls in all"
        ));
    }

    async fn storm(&mut self, storms: u32, out: &mut FaultOutcome) {
        let mut done = 0;
        while done < storms || !self.publishing.is_cancelled() {
            pause_ms(&mut self.rng, 300..900).await;
            for member in &self.fleet.members {
                if let Some(tcp) = &member.tcp {
                    tcp.cut_all();
                }
                member.drop_connection();
            }
            done += 1;
        }
        out.notes.push(format!(
            "{done} storms of {} consumers reconnecting at once",
            self.fleet.members.len()
        ));
    }
}

/// Runs `scenario` with `seed`; `Err` only when the run could not be set up.
pub async fn run(scenario: &Scenario, seed: u64, setup: &Setup) -> Result<Report, FaultError> {
    println!(
        "faults: scenario={} seed={seed} (replay with FAULT_SEED={seed})",
        scenario.name
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let scratch = ScratchDir::new(&scenario.name)?;
    let mut redis = match scenario.fault {
        Fault::RedisKill { .. } | Fault::RedisLoss => {
            Some(RedisProcess::start(&setup.redis_server, &scratch.path().join("redis")).await?)
        }
        _ => None,
    };
    let mut replica = match (&redis, scenario.fault) {
        (Some(primary), Fault::RedisLoss) => Some(
            RedisProcess::start_replica(
                &setup.redis_server,
                &scratch.path().join("replica"),
                primary,
            )
            .await?,
        ),
        _ => None,
    };
    let redis_proxy = match &redis {
        Some(primary) if replica.is_some() => {
            Some(TcpProxy::start(primary.addr(), None, seed).await?)
        }
        _ => None,
    };
    let mut extra = vec![
        "--retain-changes".to_owned(),
        scenario.retain_changes.to_string(),
    ];
    if let Some(redis) = &redis {
        let url = match &redis_proxy {
            Some(proxy) => format!("redis://{}", proxy.addr()),
            None => redis.url(),
        };
        if redis_proxy.is_some() {
            extra.extend(["--redis-min-replicas".to_owned(), "1".to_owned()]);
        }
        extra.extend([
            "--redis-url".to_owned(),
            url,
            "--redis-key-prefix".to_owned(),
            format!("faults{seed}"),
        ]);
    }
    let mut core = CoreProcess::start(&setup.workerpush, scratch.path(), &extra).await?;
    let addrs = core.addrs();
    let tls = ClientTls::load(&core.certs())?;
    let fleet = Fleet::start(scenario, &mut rng, addrs, &tls).await?;
    fleet.wait_synced(Duration::from_secs(60)).await?;

    let hook = HookClient::new(addrs.http, &core.hook_secret()?)?;
    let publisher = Publisher::new(hook, Duration::from_secs(120));
    let plan = publish::plan(seed, scenario.changes, scenario.workers);
    let steps = plan.len() as u64;
    let publishing = CancellationToken::new();
    let faults = Faults {
        fault: scenario.fault,
        rng: StdRng::seed_from_u64(rng.random()),
        fleet: &fleet,
        publisher: &publisher,
        publishing: publishing.clone(),
        core: &mut core,
        redis: redis.as_mut(),
        replica: replica.as_mut(),
        redis_proxy: redis_proxy.as_ref(),
        tls: &tls,
    };
    let publish_started = Instant::now();
    let (outcome, publishing_took) = tokio::join!(faults.drive(), async {
        publisher.run(plan, scenario.in_flight).await;
        publishing.cancel();
        publish_started.elapsed()
    });
    fleet.calm();
    let calm = Instant::now();

    // The sentinel: once every consumer holds it, it holds everything before it.
    let sentinel = Step {
        worker: SENTINEL.to_owned(),
        action: Action::Put {
            version: format!("final-{seed}"),
            code: Bytes::from(format!("export default {{ sentinel: {seed} }}")),
        },
    };
    let sentinel_revision = publisher
        .apply(steps + 1, &sentinel)
        .await
        .map_or(u64::MAX, |a| a.revision);
    let listing = list(addrs, &tls).await?;
    // When each member first held the final state.
    let mut arrived: Vec<Option<Duration>> = vec![None; fleet.members.len()];
    let converged = wait_until(scenario.converge_within, || {
        for (member, arrived) in fleet.members.iter().zip(&mut arrived) {
            if arrived.is_none() && member.holds(sentinel_revision, &listing) {
                *arrived = Some(calm.elapsed());
            }
        }
        arrived.iter().all(Option::is_some)
    })
    .await
    .ok()
    .map(|()| calm.elapsed());
    let slowest = fleet
        .members
        .iter()
        .zip(&arrived)
        .filter_map(|(m, t)| t.map(|t| (t, m)))
        .max_by_key(|(t, _)| *t)
        .map(|(t, m)| format!("{} ({}) after {t:.2?}", m.name, m.transport));

    let mut other = outcome.violations;
    other.extend(
        publisher
            .failures()
            .into_iter()
            .map(|f| format!("publisher: {f}")),
    );
    let behind: Vec<_> = fleet
        .members
        .iter()
        .filter(|m| m.position() < sentinel_revision)
        .map(|m| format!("{} at {}", m.name, m.position()))
        .collect();
    if !behind.is_empty() {
        other.push(format!(
            "never reached the sentinel at {sentinel_revision}: {behind:?}"
        ));
    }
    let (members, links) = fleet.stop(&mut other).await;
    core.kill9().await;
    if let Some(redis) = redis.as_mut() {
        redis.kill9().await;
    }
    if let Some(replica) = replica.as_mut() {
        replica.kill9().await;
    }

    let accepted = publisher.accepted_changes();
    let logs: Vec<record::ConsumerLog> = members
        .iter()
        .map(|m| record::lock(&m.log).clone())
        .collect();
    let records: Vec<ConsumerRecord<'_>> = members
        .iter()
        .zip(&logs)
        .map(|(m, log)| ConsumerRecord {
            name: &m.name,
            filter: &m.filter,
            events: &log.events,
            state: &log.state,
        })
        .collect();
    let findings = match scenario.fault {
        Fault::RedisLoss => check::check_run_losing_history(&accepted, &records, &listing),
        _ => check::check_run(&accepted, &records, &listing),
    };
    let mut details = other.clone();
    details.extend(findings.details);
    let mut faults = outcome.notes;
    faults.extend(links);
    Ok(Report {
        scenario: scenario.name.clone(),
        seed,
        figures: findings.figures,
        details,
        other_violations: other.len() as u64,
        convergence: converged,
        slowest,
        publishing: publishing_took,
        elapsed: started.elapsed(),
        accepted: accepted.len(),
        head: listing.head,
        publish_retries: publisher.retries(),
        faults,
    })
}
