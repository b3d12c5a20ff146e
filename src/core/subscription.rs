//! A subscription: a cursor into the hub that yields encoded updates in the order the design
//! promises — replay or RESET + snapshot, then SYNCED, then live changes and progress markers.
//!
//! Transports pull with [`Subscription::next`], as fast as their peer reads. Nothing is queued
//! per subscriber beyond one small batch, so a reader that stalls costs no memory and slows no
//! one; when it reads again it catches up from the log, or starts over with a RESET if the log
//! has moved past it.
//!
//! Handing an update over is where delivery is measured, the same for every transport: the
//! bytes (`workerpush_sent_bytes_total`) and, for changes read from the log (live or replayed,
//! not snapshots), the time since the core accepted them
//! (`workerpush_delivery_latency_seconds`), through handles made once per subscription.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    hub::{Hub, HubState, Read, marker},
    now_ms,
    types::{ConsumerId, Epoch, Revision, WorkerFilter},
};
use crate::{
    pb::{EncodedUpdate, UpdateKind},
    store::Store,
};

/// How long a subscription resuming from a revision this core has not read yet waits for the
/// follower before it starts over with a RESET instead.
const RESUME_CATCH_UP: Duration = Duration::from_secs(2);

/// Changes read from the hub per lock; also the most a subscription holds in memory.
const BATCH: usize = 256;

/// What a subscription's first read settles before anything is handed over.
struct Floor {
    store: Arc<dyn Store>,
    resume: Option<(String, Revision)>,
    planned: (Epoch, Revision),
}

/// How long a subscription waits for the store's head to be read.
const FLOOR_READ: Duration = Duration::from_secs(2);

/// An update ready to hand over.
struct Ready {
    revision: Revision,
    update: EncodedUpdate,
    /// When the core accepted the change, for changes read from the log.
    accepted_ms: Option<i64>,
}

impl Ready {
    fn untimed(revision: Revision, update: EncodedUpdate) -> Self {
        Self {
            revision,
            update,
            accepted_ms: None,
        }
    }
}

/// Per-subscription metric handles: no registry lookup per update.
struct DeliveryMetrics {
    latency: metrics::Histogram,
    bytes: metrics::Counter,
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    /// The core is shutting down: reconnect, maybe elsewhere, and resume.
    #[error("server shutting down")]
    ShuttingDown,
}

/// How a subscription started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Replay from the client's revision.
    Replay,
    /// RESET and a snapshot.
    Reset,
}

/// What the core shows of a live subscription (admin, propagation).
#[derive(Debug)]
pub struct SubscriberInfo {
    /// Unique per subscription within this process.
    pub id: u64,
    /// The consumer, suffix included.
    pub consumer_id: ConsumerId,
    /// `grpc` or `quic`.
    pub transport: &'static str,
    /// The peer's address, if known.
    pub remote: Option<std::net::SocketAddr>,
    /// The filter it asked for.
    pub filter: WorkerFilter,
    /// Unix ms when it started.
    pub since_ms: i64,
    /// This core's head when it started: changes after it reach the consumer live, the rest
    /// (a snapshot, a replay) were accepted before it subscribed.
    pub live_after: Revision,
    /// The highest revision handed to the transport.
    pub delivered: AtomicU64,
}

/// A subscription's cursor; see the module docs.
pub struct Subscription {
    hub: Arc<Hub>,
    head_rx: watch::Receiver<Revision>,
    shutdown: CancellationToken,
    filter: WorkerFilter,
    epoch: Epoch,
    cursor: Revision,
    sync_target: Option<Revision>,
    progress_due: Option<Instant>,
    progress_interval: Duration,
    pending: VecDeque<Ready>,
    start: Start,
    info: Arc<SubscriberInfo>,
    metrics: DeliveryMetrics,
    /// A resume position past this core's head, and until when to wait for it.
    ahead: Option<(Revision, Instant)>,
    /// Until the first read: the store to learn the head from, the resume asked for, and the
    /// hub's epoch and head the plan was made at (see [`Subscription::settle_floor`]).
    floor: Option<Floor>,
    poke: Arc<tokio::sync::Notify>,
    on_drop: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl Subscription {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        filter: WorkerFilter,
        resume: Option<(String, Revision)>,
        progress_interval: Duration,
        info: Arc<SubscriberInfo>,
        store: Arc<dyn Store>,
        poke: Arc<tokio::sync::Notify>,
        on_drop: Box<dyn FnOnce(u64) + Send + Sync>,
    ) -> Self {
        let mut head_rx = hub.watch_head();
        head_rx.borrow_and_update();
        let transport = info.transport;
        let metrics = DeliveryMetrics {
            latency: metrics::histogram!("workerpush_delivery_latency_seconds", "transport" => transport),
            bytes: metrics::counter!("workerpush_sent_bytes_total", "transport" => transport),
        };
        let mut subscription = {
            let hub_for_read = hub.clone();
            let state = hub_for_read.read();
            let mut subscription = Self {
                hub: hub.clone(),
                head_rx,
                shutdown,
                filter,
                epoch: state.epoch().clone(),
                cursor: 0,
                sync_target: None,
                progress_due: None,
                progress_interval,
                pending: VecDeque::new(),
                start: Start::Reset,
                info,
                metrics,
                ahead: None,
                floor: Some(Floor {
                    store,
                    resume: resume.clone(),
                    planned: (state.epoch().clone(), state.head()),
                }),
                poke,
                on_drop: Some(on_drop),
            };
            subscription.plan(&state, resume);
            subscription
        };
        subscription.fill_replay_if_done();
        subscription
    }

    /// Decides how to start from `state`: replay, wait for a revision ahead, or RESET.
    fn plan(&mut self, state: &HubState, resume: Option<(String, Revision)>) {
        self.pending.clear();
        self.ahead = None;
        self.sync_target = None;
        self.epoch = state.epoch().clone();
        match resume {
            Some((epoch, revision)) if state.can_resume(&epoch, revision) => {
                self.replay_from(revision, state.head());
            }
            Some((epoch, revision))
                if revision > state.head() && epoch == state.epoch().as_str() =>
            {
                // The client holds a revision of this epoch that this core has not read
                // yet (another core sharing the store committed it a moment ago): wake
                // the follower, and decide on the first read, once it caught up or
                // RESUME_CATCH_UP passed, so that the answer itself is not held up.
                self.poke.notify_one();
                self.ahead = Some((revision, Instant::now() + RESUME_CATCH_UP));
                self.start = Start::Replay;
            }
            _ => self.reset(state),
        }
    }

    /// SYNCED, precisely: learns the store's head (one read) and waits (up to
    /// [`RESUME_CATCH_UP`]) until this core's hub holds it, then plans again if the hub moved
    /// since the subscription was planned, so that the first SYNCED covers every change
    /// acknowledged by any core before the subscription started. A store that does not
    /// answer leaves the plan as it was: the core serves what it holds.
    async fn settle_floor(&mut self, floor: Floor) -> Result<(), Ended> {
        let learned = tokio::select! {
            learned = tokio::time::timeout(FLOOR_READ, floor.store.head()) => learned,
            () = self.shutdown.cancelled() => return Err(Ended::ShuttingDown),
        };
        let (epoch, head) = match learned {
            Ok(Ok(head)) => head,
            Ok(Err(error)) => {
                tracing::debug!(%error, "store head not read; SYNCED covers this core's head");
                return Ok(());
            }
            Err(_) => {
                tracing::debug!("store head not read in time; SYNCED covers this core's head");
                return Ok(());
            }
        };
        let deadline = Instant::now() + RESUME_CATCH_UP;
        loop {
            self.head_rx.borrow_and_update();
            {
                let hub = self.hub.clone();
                let state = hub.read();
                let reached = state.epoch() == &epoch && state.head() >= head;
                if reached || Instant::now() >= deadline {
                    if !reached {
                        metrics::counter!("workerpush_synced_behind_store_total").increment(1);
                        tracing::warn!(
                            store_head = head,
                            head = state.head(),
                            "this core did not reach the store's head in time; SYNCED covers its own head"
                        );
                    }
                    if (state.epoch().clone(), state.head()) != floor.planned {
                        self.plan(&state, floor.resume);
                        drop(state);
                        self.fill_replay_if_done();
                    }
                    return Ok(());
                }
            }
            self.poke.notify_one();
            tokio::select! {
                changed = self.head_rx.changed() => changed.map_err(|_| Ended::ShuttingDown)?,
                () = tokio::time::sleep_until(deadline) => {}
                () = self.shutdown.cancelled() => return Err(Ended::ShuttingDown),
            }
        }
    }

    /// How it started.
    pub fn start(&self) -> Start {
        self.start
    }

    /// What the core shows of it.
    pub fn info(&self) -> &Arc<SubscriberInfo> {
        &self.info
    }

    /// The next update to send. Waits for one; ends only when the core shuts down.
    pub async fn next(&mut self) -> Result<EncodedUpdate, Ended> {
        if let Some(floor) = self.floor.take() {
            self.settle_floor(floor).await?;
        }
        if let Some((revision, deadline)) = self.ahead {
            self.settle_resume(revision, deadline).await?;
        }
        loop {
            if let Some(ready) = self.pending.pop_front() {
                return Ok(self.hand_over(ready));
            }
            if self.shutdown.is_cancelled() {
                return Err(Ended::ShuttingDown);
            }
            if self.refill() {
                continue;
            }
            self.wait().await?;
        }
    }

    /// Takes an update if one is ready now, without waiting (batching writers).
    pub fn try_next(&mut self) -> Option<EncodedUpdate> {
        if self.ahead.is_some() || self.floor.is_some() {
            return None;
        }
        if self.pending.is_empty() && !self.shutdown.is_cancelled() {
            self.refill();
        }
        let ready = self.pending.pop_front()?;
        Some(self.hand_over(ready))
    }

    fn hand_over(&self, ready: Ready) -> EncodedUpdate {
        self.info
            .delivered
            .fetch_max(ready.revision, Ordering::Relaxed);
        self.metrics.bytes.increment(ready.update.0.len() as u64);
        if let Some(accepted) = ready.accepted_ms {
            let millis = (now_ms() - accepted).max(0);
            self.metrics.latency.record(millis as f64 / 1000.0);
        }
        ready.update
    }

    /// Reads what follows the cursor into `pending`. Returns whether there is something to
    /// send; `false` means caught up with nothing due.
    fn refill(&mut self) -> bool {
        loop {
            self.head_rx.borrow_and_update();
            let hub = self.hub.clone();
            let state = hub.read();
            let until = self.sync_target.unwrap_or(u64::MAX);
            let entries = match state.read_after(&self.epoch, self.cursor, until, BATCH) {
                Read::OtherEpoch | Read::Gone => {
                    metrics::counter!("workerpush_resyncs_total", "reason" => "lagged")
                        .increment(1);
                    self.reset(&state);
                    return true;
                }
                Read::Entries(entries) => entries,
            };
            drop(state);
            let read_any = !entries.is_empty();
            for entry in entries {
                self.cursor = entry.change.revision;
                if self.filter.matches(&entry.change.worker) {
                    self.pending.push_back(Ready {
                        revision: entry.change.revision,
                        update: entry.encoded.clone(),
                        accepted_ms: Some(entry.change.timestamp_ms),
                    });
                    self.progress_due = None;
                } else if self.progress_due.is_none() {
                    self.progress_due = Some(Instant::now() + self.progress_interval);
                }
            }
            self.fill_replay_if_done();
            if !self.pending.is_empty() {
                return true;
            }
            if read_any {
                continue;
            }
            if self.progress_due.is_some_and(|due| due <= Instant::now()) {
                self.push_synced(self.cursor);
                return true;
            }
            return false;
        }
    }

    async fn wait(&mut self) -> Result<(), Ended> {
        let progress = async {
            match self.progress_due {
                Some(due) => tokio::time::sleep_until(due).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.head_rx.changed() => changed.map_err(|_| Ended::ShuttingDown),
            () = progress => Ok(()),
            () = self.shutdown.cancelled() => Err(Ended::ShuttingDown),
        }
    }

    /// Waits for this core to reach the client's `revision` (see `new`), then replays from
    /// it; past `deadline`, or if the log moved on meanwhile, starts over with a RESET.
    async fn settle_resume(&mut self, revision: Revision, deadline: Instant) -> Result<(), Ended> {
        loop {
            self.head_rx.borrow_and_update();
            {
                let hub = self.hub.clone();
                let state = hub.read();
                let same_epoch = state.epoch() == &self.epoch;
                if same_epoch && state.can_resume(self.epoch.as_str(), revision) {
                    self.ahead = None;
                    self.replay_from(revision, state.head());
                    drop(state);
                    self.fill_replay_if_done();
                    return Ok(());
                }
                if !same_epoch || Instant::now() >= deadline {
                    self.ahead = None;
                    metrics::counter!("workerpush_resyncs_total", "reason" => "resume_ahead")
                        .increment(1);
                    self.reset(&state);
                    return Ok(());
                }
            }
            tokio::select! {
                changed = self.head_rx.changed() => changed.map_err(|_| Ended::ShuttingDown)?,
                () = tokio::time::sleep_until(deadline) => {}
                () = self.shutdown.cancelled() => return Err(Ended::ShuttingDown),
            }
        }
    }

    fn replay_from(&mut self, revision: Revision, head: Revision) {
        self.cursor = revision;
        self.sync_target = Some(head);
        self.start = Start::Replay;
    }

    /// After a replay reaches the head it started from: SYNCED with that head.
    fn fill_replay_if_done(&mut self) {
        if let Some(target) = self.sync_target
            && self.cursor >= target
        {
            self.sync_target = None;
            self.push_synced(target);
        }
    }

    fn push_synced(&mut self, revision: Revision) {
        self.progress_due = None;
        self.pending.push_back(Ready::untimed(
            revision,
            marker(UpdateKind::Synced, revision, &self.epoch, now_ms()),
        ));
    }

    /// RESET, the snapshot at the current head, SYNCED; the cursor moves to that head.
    fn reset(&mut self, state: &HubState) {
        self.epoch = state.epoch().clone();
        self.pending.clear();
        self.pending.push_back(Ready::untimed(
            0,
            marker(UpdateKind::Reset, 0, &self.epoch, now_ms()),
        ));
        // Snapshot entries are not timed: their age says nothing about delivery.
        for entry in state.snapshot(&self.filter) {
            self.pending
                .push_back(Ready::untimed(entry.change.revision, entry.encoded.clone()));
        }
        self.cursor = state.head();
        self.sync_target = None;
        self.push_synced(self.cursor);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop(self.info.id);
        }
    }
}
