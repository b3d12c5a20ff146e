//! The subscribers: N tasks, each with its own connection (its own [`Transport::connect`]) and
//! its own `consumer_id` (`<identity>/bench-<i>`), verifying every change of the run it receives
//! and recording when it arrived.
//!
//! Per subscriber the state is a handful of counters, its transport, its resume position and its
//! latencies (4 bytes per delivery), so that ten thousand fit. Connections are opened with
//! bounded concurrency; a subscriber whose stream fails reconnects and resumes, as a consumer
//! would.
//!
//! Each subscriber has a TLS session cache of its own, as every edge host has: with one cache
//! shared by thousands of clients (at most 8 TLS 1.3 tickets per server), about half the storm's
//! reconnects would be full handshakes that real hosts would resume.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::ledger::{Ledger, unix_ns};
use crate::{
    client::{ClientError, Position, Session, Transport, UpdateStream, verify},
    pb::{AckRequest, FetchWorkerRequest, SubscribeRequest, UpdateKind, WorkerUpdate},
};

/// Makes a subscriber's transport to `host:port` with its TLS configuration.
pub type MakeTransport =
    fn(&str, Arc<rustls::ClientConfig>) -> Result<Arc<dyn Transport>, ClientError>;

/// TLS sessions each subscriber keeps for resumption.
const SESSIONS_PER_SUBSCRIBER: usize = 4;

/// What every subscriber of a fleet shares.
pub struct FleetConfig {
    /// Makes each subscriber's transport.
    pub make_transport: MakeTransport,
    /// The transport's `host:port`.
    pub addr: String,
    /// The TLS configuration every subscriber copies (with a session cache of its own).
    pub tls: Arc<rustls::ClientConfig>,
    /// The certificate identity; consumer ids are `<identity>/bench-<i>`.
    pub identity: String,
    /// Bounds the connections being set up at once (until their first SYNCED).
    pub connect_slots: Arc<Semaphore>,
    /// The run.
    pub ledger: Arc<Ledger>,
    /// Acknowledge every change of the run once it is held, as an edge host does once it
    /// runs the code.
    pub ack: bool,
}

impl FleetConfig {
    /// `n` new subscribers' seats: a transport each, no position yet.
    pub fn seats(&self, n: usize) -> Result<Vec<Seat>, ClientError> {
        (0..n)
            .map(|_| {
                let mut tls = (*self.tls).clone();
                tls.resumption =
                    rustls::client::Resumption::in_memory_sessions(SESSIONS_PER_SUBSCRIBER);
                Ok(Seat {
                    transport: (self.make_transport)(&self.addr, Arc::new(tls))?,
                    position: None,
                })
            })
            .collect()
    }
}

/// What a subscriber keeps across its connections, and in the storm across fleets: its
/// transport (and so its TLS sessions) and its position.
#[derive(Clone)]
pub struct Seat {
    transport: Arc<dyn Transport>,
    /// Where to resume from.
    pub position: Option<Position>,
}

/// One subscriber's account.
pub struct Tally {
    /// Its transport and where it got to.
    pub seat: Seat,
    /// Latency of every delivery of the run, µs.
    pub latencies_us: Vec<u32>,
    /// Changes of the run received (verified, in order).
    pub received: u32,
    /// Changes of the run received again, or with a revision not above the last one.
    pub duplicates: u32,
    /// Changes whose code did not verify.
    pub verify_failures: u32,
    /// RESETs after the first SYNCED (the subscriber fell out of the log).
    pub resets: u32,
    /// Connections lost and re-established.
    pub reconnects: u32,
    /// Since the fleet started, when the subscriber held every change of the run.
    pub completed_after: Option<Duration>,
}

impl Tally {
    fn new(seat: Seat) -> Self {
        Self {
            seat,
            latencies_us: Vec::new(),
            received: 0,
            duplicates: 0,
            verify_failures: 0,
            resets: 0,
            reconnects: 0,
            completed_after: None,
        }
    }
}

/// Counters the fleet's owner waits on.
#[derive(Default)]
struct Progress {
    synced: AtomicUsize,
    complete: AtomicUsize,
    changed: Notify,
    last_error: Mutex<Option<String>>,
}

impl Progress {
    fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    fn note_error(&self, error: &ClientError) {
        tracing::debug!(%error, "subscriber connection failed");
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some(error.to_string());
    }

    /// Waits until `counter` reaches `target` or `until`; answers where it got to.
    async fn wait(&self, counter: &AtomicUsize, target: usize, until: Instant) -> usize {
        let deadline = tokio::time::Instant::from_std(until);
        loop {
            // Register interest before reading, so that a bump in between is not missed.
            let changed = self.changed.notified();
            let reached = counter.load(Ordering::Acquire);
            if reached >= target {
                return reached;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return counter.load(Ordering::Acquire),
            }
        }
    }
}

/// A running set of subscribers.
pub struct Fleet {
    tasks: JoinSet<(usize, Tally)>,
    size: usize,
    stop: CancellationToken,
    progress: Arc<Progress>,
}

impl Fleet {
    /// Starts one subscriber per seat, resuming from its position when it has one. Each must
    /// receive every change of the run.
    pub fn start(config: &Arc<FleetConfig>, seats: Vec<Seat>) -> Self {
        let started = Instant::now();
        let stop = CancellationToken::new();
        let progress = Arc::new(Progress::default());
        let mut tasks = JoinSet::new();
        let size = seats.len();
        for (index, seat) in seats.into_iter().enumerate() {
            let subscriber = Subscriber {
                config: config.clone(),
                progress: progress.clone(),
                consumer_id: format!("{}/bench-{index}", config.identity),
                started,
                tally: Tally::new(seat),
                synced: false,
                last_revision: 0,
            };
            let stop = stop.clone();
            tasks.spawn(async move { (index, subscriber.run(stop).await) });
        }
        Self {
            tasks,
            size,
            stop,
            progress,
        }
    }

    /// Waits until every subscriber has had its first SYNCED, up to `until`.
    pub async fn synced(&self, until: Instant) -> Result<(), String> {
        let reached = self
            .progress
            .wait(&self.progress.synced, self.size, until)
            .await;
        if reached >= self.size {
            return Ok(());
        }
        let last = self.last_error();
        Err(format!(
            "{reached} of {} subscribers synced in time{}",
            self.size,
            last.map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ))
    }

    /// Waits until every subscriber holds every change of the run, up to `until`; answers how
    /// many do.
    pub async fn complete(&self, until: Instant) -> usize {
        self.progress
            .wait(&self.progress.complete, self.size, until)
            .await
    }

    /// The last connection error any subscriber saw.
    pub fn last_error(&self) -> Option<String> {
        self.progress
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Drops every connection at once; answers each subscriber's tally, in order.
    pub async fn stop(mut self) -> Vec<Tally> {
        self.stop.cancel();
        let mut tallies: Vec<Option<Tally>> = (0..self.size).map(|_| None).collect();
        while let Some(joined) = self.tasks.join_next().await {
            match joined {
                Ok((index, tally)) => tallies[index] = Some(tally),
                // Its deliveries count as lost.
                Err(error) => tracing::error!(%error, "subscriber task failed"),
            }
        }
        tallies.into_iter().flatten().collect()
    }
}

struct Subscriber {
    config: Arc<FleetConfig>,
    progress: Arc<Progress>,
    consumer_id: String,
    started: Instant,
    tally: Tally,
    synced: bool,
    last_revision: u64,
}

/// Why a connection ended.
enum Ended {
    Stopped,
    Failed(ClientError),
}

impl Subscriber {
    async fn run(mut self, stop: CancellationToken) -> Tally {
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = match self.connection(&stop).await {
                Ended::Stopped => return self.tally,
                Ended::Failed(error) => error,
            };
            self.progress.note_error(&error);
            if !error.is_retryable() {
                return self.tally;
            }
            self.tally.reconnects += 1;
            let delay = backoff.mul_f64(rand::random_range(0.5..=1.0));
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return self.tally,
            }
        }
    }

    /// One connection: connect (holding a connect slot until SYNCED), subscribe from the last
    /// position, then take updates until stopped or the stream fails.
    async fn connection(&mut self, stop: &CancellationToken) -> Ended {
        let mut slot: Option<OwnedSemaphorePermit> = tokio::select! {
            permit = self.config.connect_slots.clone().acquire_owned() => permit.ok(),
            () = stop.cancelled() => return Ended::Stopped,
        };
        let opened = tokio::select! {
            opened = self.open() => opened,
            () = stop.cancelled() => return Ended::Stopped,
        };
        let (session, mut stream) = match opened {
            Ok(opened) => opened,
            Err(error) => return Ended::Failed(error),
        };
        let mut in_snapshot = false;
        loop {
            let item = tokio::select! {
                biased;
                () = stop.cancelled() => return Ended::Stopped,
                item = stream.next() => item,
            };
            let update = match item {
                Some(Ok(update)) => update,
                Some(Err(error)) => return Ended::Failed(error),
                None => return Ended::Failed(ClientError::Transport("stream ended".to_owned())),
            };
            match UpdateKind::try_from(update.kind).unwrap_or(UpdateKind::Unspecified) {
                UpdateKind::Put => {
                    if let Err(error) = self.put(&*session, &update).await {
                        return Ended::Failed(error);
                    }
                }
                UpdateKind::Reset => {
                    // Expected on a fresh subscription; after SYNCED, or instead of a resume,
                    // it means the subscriber was not served from the log.
                    if self.synced || self.tally.seat.position.is_some() {
                        self.tally.resets += 1;
                    }
                    in_snapshot = true;
                    self.tally.seat.position = None;
                    continue;
                }
                UpdateKind::Synced => {
                    in_snapshot = false;
                    drop(slot.take());
                    if !self.synced {
                        self.synced = true;
                        self.progress.bump(&self.progress.synced);
                    }
                }
                UpdateKind::Delete => {}
                UpdateKind::Unspecified => continue,
            }
            // Inside a snapshot there is no position to resume from until its SYNCED.
            if !in_snapshot {
                self.tally.seat.position = Some(Position {
                    epoch: update.epoch,
                    revision: update.revision,
                });
            }
        }
    }

    async fn open(&self) -> Result<(Arc<dyn Session>, UpdateStream), ClientError> {
        let session: Arc<dyn Session> = Arc::from(self.tally.seat.transport.connect().await?);
        let position = self.tally.seat.position.as_ref();
        let stream = session
            .subscribe(SubscribeRequest {
                consumer_id: self.consumer_id.clone(),
                worker_names: self.config.ledger.workers(),
                resume_revision: position.map_or(0, |p| p.revision),
                epoch: position.map(|p| p.epoch.clone()).unwrap_or_default(),
            })
            .await?;
        Ok((session, stream))
    }

    /// A PUT: if it is the run's, verify its code (fetching it when not inline) and record it.
    async fn put(
        &mut self,
        session: &dyn Session,
        update: &WorkerUpdate,
    ) -> Result<(), ClientError> {
        let ledger = &self.config.ledger;
        let Some(index) = ledger.index_of(update) else {
            return Ok(());
        };
        let verified = if update.worker_code.is_empty() && update.size > 0 {
            let (checksum, code) = session
                .fetch(FetchWorkerRequest {
                    worker_name: update.worker_name.clone(),
                    version: update.version.clone(),
                })
                .await?;
            if checksum == update.checksum {
                verify(&code, &update.checksum, update.size)
            } else {
                Err(ClientError::Verification(format!(
                    "fetched checksum {checksum} instead of {}",
                    update.checksum
                )))
            }
        } else {
            verify(&update.worker_code, &update.checksum, update.size)
        };
        let arrived = unix_ns();
        if let Err(error) = verified {
            tracing::warn!(%error, version = %update.version, "bench code did not verify");
            self.tally.verify_failures += 1;
            return Ok(());
        }
        if update.revision <= self.last_revision {
            self.tally.duplicates += 1;
            return Ok(());
        }
        self.last_revision = update.revision;
        self.tally.received += 1;
        if let Some(latency) = ledger.record(index, arrived) {
            self.tally
                .latencies_us
                .push(u32::try_from(latency / 1_000).unwrap_or(u32::MAX));
        }
        if self.config.ack {
            // On the session's ack stream, as the client library acks: no call per ack.
            session
                .ack_batch(vec![AckRequest {
                    consumer_id: self.consumer_id.clone(),
                    worker_name: update.worker_name.clone(),
                    revision: update.revision,
                    applied: true,
                    error: String::new(),
                }])
                .await?;
        }
        if self.tally.received as usize == ledger.changes() {
            self.tally.completed_after = Some(self.started.elapsed());
            self.progress.bump(&self.progress.complete);
        }
        Ok(())
    }
}
