//! The broadcast core: revisions, epochs, the retained log, subscriptions with replay, RESET
//! and SYNCED, publishing, fetching, listing, the consumer registry, acknowledgements and
//! propagation (who holds which version, who failed and why).
//!
//! It knows nothing of tonic, quinn, axum or redis: transports and the hook call [`Core`], and
//! durable state sits behind [`crate::store::Store`]. A follower task is the only writer of the
//! [`hub::Hub`]: it reads durable changes from the store in revision order (after a local
//! commit, a store hint, or a poll), so a change reaches subscribers only once durable, and
//! changes committed by other cores sharing the store arrive the same way.
//!
//! With a [`crate::store::Fleet`] (cores sharing Redis), propagation is the fleet's: each core
//! publishes per-worker aggregates of its own subscribers and answers the others' questions
//! for detail (`fleet.rs`); without one, nothing of that runs.

pub mod bounds;
pub mod error;
mod fleet;
pub mod hub;
pub mod propagation;
pub mod subscription;
pub mod types;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use bounds::{Bound, Bounds};
pub use error::{Coded, ErrorCode, InvalidInput, PublishError, RequestError};
pub use fleet::{ASK_WITHIN, PUBLISH_INTERVAL};
pub use propagation::{
    Acked, ConsumerStatus, CoreCounts, Failed, Pending, Propagation, PropagationState,
    PropagationSummary, WorkerFailure,
};
pub use subscription::{Ended, Start, SubscriberInfo, Subscription};
pub use types::{Checksum, ConsumerId, Epoch, Revision, Version, WorkerFilter, WorkerName};

use self::{
    hub::{Entry, Hub, Retention},
    propagation::{Recorded, Tracker},
};
use crate::{
    pb::WorkerUpdate,
    store::{
        Change, ChangeKind, ConsumerRecord, Fleet, News, Outcome, Proposal, Store, StoreError, Tail,
    },
};

/// How often, at most, waiting for a propagation looks again while answers arrive. A look goes
/// over the subscribers still pending, under the lock that records answers: looking at every
/// answer of a fleet answering at once would keep that lock busy, so answers gather between
/// looks, and a look that took long waits eight times as long before the next.
const PROPAGATION_LOOK_INTERVAL: Duration = Duration::from_millis(5);

/// Tunables of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Changes kept in the retained log for resume.
    pub retain_changes: usize,
    /// Encoded bytes kept in the retained log.
    pub retain_bytes: usize,
    /// Code up to this size travels inside updates; larger code is fetched.
    pub inline_max_bytes: u64,
    /// Largest code accepted.
    pub max_code_bytes: u64,
    /// A SYNCED progress marker at least this often while filtered-out changes go by.
    pub progress_interval: Duration,
    /// How often the follower polls the store when no hint arrives.
    pub poll_interval: Duration,
    /// How long a consumer that disconnected still counts as a subscriber (pending) of the
    /// workers it followed, so that one resuming after a blip is waited for. A consumer that
    /// registered counts until it deregisters, however long it is away.
    pub remember_departed: Duration,
    /// What one client can make the core hold (consumer ids, departures, labels, filters).
    pub bounds: Bounds,
    /// This core's name in the fleet, shown with every consumer it serves.
    pub core_id: Arc<str>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            retain_changes: 10_000,
            retain_bytes: 256 << 20,
            inline_max_bytes: 1 << 20,
            max_code_bytes: 10 << 20,
            progress_interval: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            remember_departed: Duration::from_secs(300),
            bounds: Bounds::default(),
            core_id: default_core_id().into(),
        }
    }
}

/// The answer to an accepted publish or delete.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    /// The revision of the change (the existing one when unchanged).
    pub revision: Revision,
    /// The epoch.
    pub epoch: Epoch,
    /// The worker.
    pub worker: WorkerName,
    /// The version put or removed.
    pub version: Version,
    /// Checksum of that version.
    pub checksum: Checksum,
    /// Size of that version.
    pub size: u64,
    /// `false` when the same version and code was already the latest.
    pub created: bool,
}

/// A bundle to stream to a consumer.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// Its version.
    pub version: Version,
    /// Its checksum.
    pub checksum: Checksum,
    /// The code.
    pub code: Bytes,
}

/// The latest versions, without code.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The epoch.
    pub epoch: Epoch,
    /// The head revision.
    pub head: Revision,
    /// One summary per live worker passing the filter, ascending by revision.
    pub workers: Vec<WorkerUpdate>,
}

/// Who is subscribing and to what.
#[derive(Clone, Debug)]
pub struct SubscribeParams {
    /// The consumer id, already authorized against the certificate identity.
    pub consumer_id: ConsumerId,
    /// Which workers.
    pub filter: WorkerFilter,
    /// The client's last epoch and revision, if any.
    pub resume: Option<(String, Revision)>,
    /// `grpc` or `quic`.
    pub transport: &'static str,
    /// The peer's address.
    pub remote: Option<SocketAddr>,
}

/// A consumer's acknowledgement of one revision.
#[derive(Clone, Debug)]
pub struct Ack {
    /// Who.
    pub consumer_id: ConsumerId,
    /// Which worker.
    pub worker: WorkerName,
    /// The revision it applied (or failed to).
    pub revision: Revision,
    /// Applied, or refused.
    pub applied: bool,
    /// Why not, when refused.
    pub error: String,
}

/// A live worker and where its latest version stands: a [`Propagation`] (one worker) or a
/// [`PropagationSummary`] (listings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerStatus<P> {
    /// The worker.
    pub name: WorkerName,
    /// Its latest version.
    pub version: Version,
    /// The revision that put it.
    pub revision: Revision,
    /// Its checksum.
    pub checksum: Checksum,
    /// Its size in bytes.
    pub size: u64,
    /// Unix ms when the core accepted it.
    pub updated_ms: i64,
    /// Who deployed it: the deploy token's name (empty when the request did not say).
    pub deployer: Arc<str>,
    /// Where it stands across the worker's subscribers.
    pub propagation: P,
}

impl WorkerStatus<Propagation> {
    /// The same with the propagation's counts only (listings).
    pub fn summarized(self) -> WorkerStatus<PropagationSummary> {
        WorkerStatus {
            propagation: self.propagation.summary(),
            name: self.name,
            version: self.version,
            revision: self.revision,
            checksum: self.checksum,
            size: self.size,
            updated_ms: self.updated_ms,
            deployer: self.deployer,
        }
    }
}

/// The broadcast core; see the module docs. Cheap to share behind an `Arc`.
pub struct Core {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    config: CoreConfig,
    shutdown: CancellationToken,
    fresh_code: Mutex<HashMap<Checksum, Bytes>>,
    tracker: Arc<Tracker>,
    next_subscriber: AtomicU64,
    registry: Mutex<Registry>,
    store_healthy: AtomicBool,
    follower: Mutex<Option<JoinHandle<()>>>,
    /// Wakes the follower to read the store now (a client or the store is ahead of this core).
    poke: Arc<tokio::sync::Notify>,
    /// One re-seed at a time (the follower and publishes may notice a loss together).
    reseeding: tokio::sync::Mutex<()>,
    /// The other cores sharing the store, if any.
    fleet: Option<Arc<dyn Fleet>>,
    fleet_tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// How long a core that holds no workers waits before starting a lost store's new epoch
/// itself, so that a core holding workers re-seeds it first.
const EMPTY_RESEED_DELAY: Duration = Duration::from_secs(2);

impl Core {
    /// Loads the durable state and starts following the store.
    pub async fn open(store: Arc<dyn Store>, config: CoreConfig) -> Result<Arc<Self>, StoreError> {
        Self::open_in_fleet(store, config, None).await
    }

    /// [`Core::open`], as one of the cores linked by `fleet` (cores sharing one Redis): its
    /// propagation views are then the fleet's.
    pub async fn open_in_fleet(
        store: Arc<dyn Store>,
        config: CoreConfig,
        fleet: Option<Arc<dyn Fleet>>,
    ) -> Result<Arc<Self>, StoreError> {
        let recovered = store.load().await?;
        let registry = Registry::of(store.consumers().await?);
        let retention = Retention {
            changes: config.retain_changes.max(1),
            bytes: config.retain_bytes,
        };
        let empty = Hub::new(
            recovered.epoch.clone(),
            0,
            Vec::new(),
            Vec::new(),
            retention,
        );
        let tracker = Arc::new(Tracker::new(
            config.remember_departed,
            config.bounds.clone(),
            config.core_id.clone(),
        ));
        for record in registry.records.values() {
            if !record.endpoint.is_empty() || !record.labels.is_empty() {
                tracker.registered(record.id.clone());
            }
        }
        let core = Arc::new(Self {
            store,
            hub: Arc::new(empty),
            config,
            shutdown: CancellationToken::new(),
            fresh_code: Mutex::new(HashMap::new()),
            tracker,
            next_subscriber: AtomicU64::new(1),
            registry: Mutex::new(registry),
            store_healthy: AtomicBool::new(true),
            follower: Mutex::new(None),
            poke: Arc::new(tokio::sync::Notify::new()),
            reseeding: tokio::sync::Mutex::new(()),
            fleet: fleet.clone(),
            fleet_tasks: Mutex::new(Vec::new()),
        });
        core.install(
            recovered.epoch,
            recovered.head,
            recovered.latest,
            recovered.tail,
        )
        .await?;
        tracing::info!(epoch = %core.epoch(), head = core.head(), workers = core.hub.read().live_workers(), "core opened");
        let follower = tokio::spawn(core.clone().follow());
        *lock(&core.follower) = Some(follower);
        if let Some(fleet) = &fleet {
            core.join_fleet(fleet);
        }
        Ok(core)
    }

    /// Ends every subscription with [`Ended::ShuttingDown`], refuses new work, and waits for
    /// the follower to stop.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let follower = lock(&self.follower).take();
        if let Some(follower) = follower {
            let _ = follower.await;
        }
        self.leave_fleet().await;
        self.store.close().await;
    }

    /// Whether the core is shutting down.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// A token cancelled when the core shuts down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Whether the store answered the follower's last read.
    pub fn is_store_healthy(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed)
    }

    /// The tunables.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.hub.read().epoch().clone()
    }

    /// The head revision subscribers can see.
    pub fn head(&self) -> Revision {
        self.hub.read().head()
    }

    /// Publishes `code` as `version` of `worker`. Answers once the change is durable (and,
    /// unless the store stops answering, visible to subscribers).
    pub async fn publish(
        &self,
        worker: WorkerName,
        version: Version,
        code: Bytes,
        expected: Option<Checksum>,
    ) -> Result<Published, PublishError> {
        self.publish_as(worker, version, code, expected, "").await
    }

    /// [`Core::publish`], recording `deployer` (a deploy token's name; empty: not said) with
    /// the change.
    pub async fn publish_as(
        &self,
        worker: WorkerName,
        version: Version,
        code: Bytes,
        expected: Option<Checksum>,
        deployer: &str,
    ) -> Result<Published, PublishError> {
        if self.is_shutting_down() {
            return Err(PublishError::ShuttingDown);
        }
        let size = code.len() as u64;
        if size > self.config.max_code_bytes {
            return Err(PublishError::TooLarge {
                size,
                limit: self.config.max_code_bytes,
            });
        }
        let checksum = Checksum::of(&code);
        if let Some(given) = expected
            && given != checksum
        {
            return Err(PublishError::ChecksumMismatch {
                given,
                actual: checksum,
            });
        }
        let inline = size <= self.config.inline_max_bytes;
        if inline {
            lock(&self.fresh_code).insert(checksum.clone(), code.clone());
        }
        let proposal = Proposal::Put {
            worker: worker.clone(),
            version: version.clone(),
            checksum: checksum.clone(),
            size,
            deployer: deployer.into(),
        };
        let before = self.epoch();
        let mut outcome = self.put_and_apply(&checksum, &code, proposal.clone()).await;
        if let Err(StoreError::HistoryLost(why)) = &outcome {
            // The store lost its history under us: bring back what this core holds, then
            // this change on top (its bundle may have gone with the rest).
            let why = why.clone();
            outcome = match self.reseed(&why).await {
                Ok(()) => self.put_and_apply(&checksum, &code, proposal).await,
                Err(error) => Err(error),
            };
        }
        let result = self.answer(&before, outcome, &worker, Some(&version)).await;
        if inline {
            lock(&self.fresh_code).remove(&checksum);
        }
        result.inspect(|published| {
            if published.created {
                metrics::counter!("workerpush_changes_published_total", "kind" => "put")
                    .increment(1);
            }
        })
    }

    async fn put_and_apply(
        &self,
        checksum: &Checksum,
        code: &Bytes,
        proposal: Proposal,
    ) -> Result<Outcome, StoreError> {
        self.store.put_bundle(checksum, code.clone()).await?;
        self.store.apply(proposal, now_ms()).await
    }

    /// Deletes `worker`: its latest version goes, and consumers remove it.
    pub async fn delete(&self, worker: WorkerName) -> Result<Published, PublishError> {
        self.delete_as(worker, "").await
    }

    /// [`Core::delete`], recording `deployer` (empty: not said) with the change.
    pub async fn delete_as(
        &self,
        worker: WorkerName,
        deployer: &str,
    ) -> Result<Published, PublishError> {
        if self.is_shutting_down() {
            return Err(PublishError::ShuttingDown);
        }
        let proposal = Proposal::Delete {
            worker: worker.clone(),
            deployer: deployer.into(),
        };
        let before = self.epoch();
        let mut outcome = self.store.apply(proposal.clone(), now_ms()).await;
        if let Err(StoreError::HistoryLost(why)) = &outcome {
            let why = why.clone();
            outcome = match self.reseed(&why).await {
                Ok(()) => self.store.apply(proposal, now_ms()).await,
                Err(error) => Err(error),
            };
        }
        let published = self.answer(&before, outcome, &worker, None).await?;
        metrics::counter!("workerpush_changes_published_total", "kind" => "delete").increment(1);
        Ok(published)
    }

    /// `before`: this core's epoch when the change was proposed.
    async fn answer(
        &self,
        before: &Epoch,
        outcome: Result<Outcome, StoreError>,
        worker: &WorkerName,
        version: Option<&Version>,
    ) -> Result<Published, PublishError> {
        let (change, created) = match outcome? {
            Outcome::Committed(change) => (change, true),
            // Durable already; a concurrent publish of the same version may not be visible
            // yet, and the answer must not run ahead of what subscribers can see.
            Outcome::Unchanged(change) => (change, false),
            Outcome::Conflict { existing } => {
                return Err(PublishError::Conflict {
                    worker: worker.clone(),
                    version: version.cloned().ok_or_else(|| {
                        StoreError::Corrupt("store answered a delete with a conflict".to_owned())
                    })?,
                    existing,
                });
            }
            Outcome::NotFound => return Err(PublishError::NotFound(worker.clone())),
        };
        let epoch = match self.visible(&change, before).await {
            Some(epoch) => epoch,
            // Durable, only slow to show: answered as before, in the epoch it was made in.
            None if self.epoch() == *before => before.clone(),
            // The store lost its history between the commit and this core reading it, so the
            // re-seed cannot have held it: not acknowledged, and a retry applies it again.
            None => {
                return Err(StoreError::HistoryLost(format!(
                    "the store lost its history while revision {} of {} was being applied; \
                     retry",
                    change.revision, change.worker
                ))
                .into());
            }
        };
        Ok(Published {
            revision: change.revision,
            epoch,
            worker: change.worker,
            version: change.version,
            checksum: change.checksum,
            size: change.size,
            created,
        })
    }

    /// Waits (briefly) until the follower has made `change` visible; the epoch it is
    /// visible in, or `None` after 5 s.
    async fn visible(&self, change: &Change, before: &Epoch) -> Option<Epoch> {
        let mut head = self.hub.watch_head();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            head.borrow_and_update();
            {
                let state = self.hub.read();
                let held = state
                    .change_at(&change.worker, change.revision)
                    .is_some_and(|c| {
                        c.kind == change.kind
                            && c.version == change.version
                            && c.checksum == change.checksum
                    });
                // Past it in the history it was made in, and out of the retained log already.
                let trimmed = state.epoch() == before
                    && state.head() >= change.revision
                    && change.revision < state.first_retained();
                if held || trimmed {
                    return Some(state.epoch().clone());
                }
            }
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return None },
                () = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(revision = change.revision, "change durable but not yet visible after 5 s");
                    return None;
                }
            }
        }
    }

    /// Starts a subscription.
    pub fn subscribe(&self, params: SubscribeParams) -> Result<Subscription, RequestError> {
        if self.is_shutting_down() {
            return Err(RequestError::ShuttingDown);
        }
        self.config.bounds.check_filter(&params.filter)?;
        let filter = self.tracker.intern(params.filter);
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(SubscriberInfo {
            id,
            consumer_id: params.consumer_id,
            transport: params.transport,
            remote: params.remote,
            filter: filter.clone(),
            since_ms: now_ms(),
            live_after: self.hub.read().head(),
            delivered: AtomicU64::new(0),
        });
        self.tracker.subscribed(info.clone())?;
        self.arrived_in_fleet(&info);
        let tracker = self.tracker.clone();
        let transport = params.transport;
        metrics::gauge!("workerpush_subscribers", "transport" => transport).increment(1.0);
        let subscription = Subscription::new(
            self.hub.clone(),
            self.shutdown.clone(),
            filter,
            params.resume,
            self.config.progress_interval,
            info,
            self.store.clone(),
            self.poke.clone(),
            Box::new(move |id| {
                tracker.unsubscribed(id);
                metrics::gauge!("workerpush_subscribers", "transport" => transport).decrement(1.0);
            }),
        );
        let start = match subscription.start() {
            Start::Replay => "replay",
            Start::Reset => "reset",
        };
        metrics::counter!("workerpush_subscriptions_total", "start" => start).increment(1);
        Ok(subscription)
    }

    /// The live subscriptions.
    pub fn subscribers(&self) -> Vec<Arc<SubscriberInfo>> {
        self.tracker.live()
    }

    /// A receiver that changes whenever something an operator sees changes: a change became
    /// visible, a subscription started or ended, a consumer acknowledged. Values are opaque.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.tracker.watch()
    }

    /// Where `revision` of `worker` stands across the worker's current subscribers (live
    /// subscriptions whose filter passes it, and consumers that left less than
    /// [`CoreConfig::remember_departed`] ago). Waits up to `wait` for every one of them to
    /// answer (acknowledge or fail), looking again as acknowledgements arrive (see
    /// [`PROPAGATION_LOOK_INTERVAL`]); answers early when the core shuts down.
    pub async fn propagation(
        &self,
        worker: &WorkerName,
        revision: Revision,
        wait: Duration,
    ) -> Propagation {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = self.tracker.watch();
        let mut look = propagation::Look::default();
        loop {
            changes.borrow_and_update();
            let looked = tokio::time::Instant::now();
            let now = std::time::Instant::now();
            let answered = self.tracker.answered(worker, revision, &mut look, now);
            if let Some(answered) = answered {
                if self.fleet.is_none() {
                    return answered;
                }
                if self.others_answered(worker, revision).await {
                    return self.fleet_propagation_of(answered, worker, revision).await;
                }
            }
            if self.is_shutting_down() {
                break;
            }
            let next = looked + PROPAGATION_LOOK_INTERVAL.max(looked.elapsed() * 8);
            // Other cores' heartbeats stop without a signal: with a fleet, look again now and
            // then, so that a core taken for dead meanwhile is counted as such.
            let recheck = looked + crate::store::HEARTBEAT;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = tokio::time::sleep_until(recheck), if self.fleet.is_some() => {}
                () = tokio::time::sleep_until(deadline) => break,
                () = self.shutdown.cancelled() => break,
            }
            tokio::select! {
                () = tokio::time::sleep_until(next.min(deadline)) => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        let mine = self.tracker.propagation(worker, revision);
        self.fleet_propagation_of(mine, worker, revision).await
    }

    /// A live worker's latest version and where it stands.
    pub fn worker_status(&self, worker: &WorkerName) -> Option<WorkerStatus<Propagation>> {
        let change = self.hub.read().latest(worker)?.change.clone();
        let propagation = self.tracker.propagation(worker, change.revision);
        Some(status_of(change, propagation))
    }

    /// Every live worker's latest version and where it stands, by name.
    pub fn workers_status(&self) -> Vec<WorkerStatus<Propagation>> {
        let mut changes: Vec<Change> = {
            let state = self.hub.read();
            state
                .snapshot(&WorkerFilter::all())
                .iter()
                .map(|e| e.change.clone())
                .collect()
        };
        changes.sort_by(|a, b| a.worker.cmp(&b.worker));
        changes
            .into_iter()
            .map(|change| {
                let propagation = self.tracker.propagation(&change.worker, change.revision);
                status_of(change, propagation)
            })
            .collect()
    }

    /// Every live subscription, then every consumer that left recently, with what it holds.
    pub fn consumers_status(&self) -> Vec<ConsumerStatus> {
        let mut latest: HashMap<WorkerName, Revision> = {
            let state = self.hub.read();
            state
                .snapshot(&WorkerFilter::all())
                .iter()
                .map(|e| (e.change.worker.clone(), e.change.revision))
                .collect()
        };
        latest.shrink_to_fit();
        let mut all = self.tracker.consumers(|filter| match filter.names() {
            None => latest.iter().map(|(w, r)| (w.clone(), *r)).collect(),
            Some(names) => names
                .iter()
                .filter_map(|w| latest.get(w).map(|r| (w.clone(), *r)))
                .collect(),
        });
        let registry = lock(&self.registry);
        for consumer in &mut all {
            if let Some(record) = registry.records.get(&consumer.consumer_id) {
                consumer.endpoint.clone_from(&record.endpoint);
                consumer.labels.clone_from(&record.labels);
            }
        }
        all
    }

    /// A bundle: the latest version of `worker`, or `version` if it is latest or still in the
    /// retained log.
    pub async fn fetch(
        &self,
        worker: &WorkerName,
        version: Option<&Version>,
    ) -> Result<Bundle, RequestError> {
        let entry = {
            let state = self.hub.read();
            match version {
                None => state.latest(worker).cloned(),
                Some(version) => state.find_version(worker, version),
            }
        };
        let not_found = || match version {
            Some(v) => RequestError::NotFound(format!("worker {worker} version {v}")),
            None => RequestError::NotFound(format!("worker {worker}")),
        };
        let entry = entry.ok_or_else(not_found)?;
        let code = match &entry.code {
            Some(code) => code.clone(),
            None => self
                .store
                .bundle(&entry.change.checksum)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("bundle {} missing", entry.change.checksum))
                })?,
        };
        Ok(Bundle {
            version: entry.change.version.clone(),
            checksum: entry.change.checksum.clone(),
            code,
        })
    }

    /// The latest version of every live worker passing `filter`.
    pub fn list(&self, filter: &WorkerFilter) -> Listing {
        let state = self.hub.read();
        Listing {
            epoch: state.epoch().clone(),
            head: state.head(),
            workers: state
                .snapshot(filter)
                .iter()
                .map(|e| e.summary(state.epoch()))
                .collect(),
        }
    }

    /// Records a consumer's registration, within [`Bounds`]: its endpoint and labels, and
    /// its identity's consumer ids.
    pub async fn register(
        &self,
        consumer_id: ConsumerId,
        endpoint: String,
        labels: BTreeMap<String, String>,
        transport: &str,
    ) -> Result<(), RequestError> {
        self.config.bounds.check_registration(&endpoint, &labels)?;
        let record = {
            let mut registry = lock(&self.registry);
            let now = now_ms();
            let limit = self.config.bounds.consumer_ids_per_identity;
            let record = registry.entry(consumer_id, now, limit)?;
            record.endpoint = endpoint;
            record.labels = labels;
            record.transport = transport.to_owned();
            record.last_seen_ms = now;
            record.clone()
        };
        self.store.save_consumer(&record).await?;
        self.tracker.registered(record.id.clone());
        self.tell_fleet(News::Registered(record.id));
        Ok(())
    }

    /// Forgets `consumer`'s registration on every core: it no longer counts among any
    /// worker's subscribers once it has no live subscription. Answers whether it was known.
    pub async fn deregister(&self, consumer: &ConsumerId) -> Result<bool, RequestError> {
        let in_registry = lock(&self.registry).remove(consumer).is_some();
        let stored = self.store.remove_consumer(consumer).await?;
        let tracked = self.tracker.forget(consumer);
        self.tell_fleet(News::Deregistered(consumer.clone()));
        tracing::info!(%consumer, "consumer deregistered");
        metrics::counter!("workerpush_deregistrations_total").increment(1);
        Ok(in_registry || stored || tracked)
    }

    /// Records an acknowledgement. A consumer id new to the registry needs room under
    /// [`Bounds::consumer_ids_per_identity`]; without it, the ack of a current subscriber
    /// still counts for propagation (it is just not registered), anyone else's is refused.
    pub async fn ack(&self, ack: Ack, transport: &str) -> Result<(), RequestError> {
        let record = {
            let mut registry = lock(&self.registry);
            let now = now_ms();
            let limit = self.config.bounds.consumer_ids_per_identity;
            match registry.entry(ack.consumer_id.clone(), now, limit) {
                Ok(record) => {
                    record.transport = transport.to_owned();
                    record.last_seen_ms = now;
                    if ack.applied {
                        record.last_acked_revision = record.last_acked_revision.max(ack.revision);
                    }
                    Some(record.clone())
                }
                Err(refused) if !self.tracker.knows(&ack.consumer_id) => return Err(refused),
                Err(_) => None,
            }
        };
        let outcome = if ack.applied { "applied" } else { "failed" };
        metrics::counter!("workerpush_acks_total", "outcome" => outcome).increment(1);
        let (published_ms, head) = {
            let state = self.hub.read();
            let published = state
                .change_at(&ack.worker, ack.revision)
                .map(|c| c.timestamp_ms);
            (published, state.head())
        };
        let latency_ms = published_ms.map(|at| u64::try_from(now_ms() - at).unwrap_or(0));
        // A revision this core has not made visible cannot have been applied: ignore it rather
        // than let it vouch for changes to come.
        let recorded = if ack.revision <= head {
            self.tracker.record(
                &ack.consumer_id,
                &ack.worker,
                ack.revision,
                if ack.applied { Ok(()) } else { Err(&ack.error) },
                latency_ms,
            )
        } else {
            Recorded::No
        };
        // Timed only for a change the consumer received live: a snapshot or replay item was
        // accepted before it subscribed, and its age says nothing about delivery.
        if ack.applied
            && recorded == Recorded::Live
            && let Some(ms) = latency_ms
        {
            metrics::histogram!("workerpush_ack_latency_seconds", "transport" => transport.to_owned())
                .record(ms as f64 / 1000.0);
        }
        if recorded == Recorded::No {
            tracing::debug!(consumer = %ack.consumer_id, worker = %ack.worker, revision = ack.revision, head, "ack from no current subscriber or beyond the head; not tracked");
        }
        if !ack.applied {
            tracing::warn!(consumer = %ack.consumer_id, worker = %ack.worker, revision = ack.revision, error = %ack.error, "consumer could not apply");
        }
        // Only what this ack says: the registration belongs to `register`, and with a shared
        // store another core may hold a newer one (stores merge; see `ConsumerRecord::absorb`).
        if let Some(record) = record {
            let ack_only = ConsumerRecord {
                endpoint: String::new(),
                labels: BTreeMap::new(),
                ..record
            };
            self.store.save_consumer(&ack_only).await?;
        }
        Ok(())
    }

    /// Every consumer the registry knows.
    pub fn consumers(&self) -> Vec<ConsumerRecord> {
        let mut all: Vec<_> = lock(&self.registry).records.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The follower: the only writer of the hub.
    async fn follow(self: Arc<Self>) {
        let mut hint = self.store.head_hint();
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            hint.borrow_and_update();
            match self.catch_up().await {
                Ok(true) => continue,
                Ok(false) => {
                    self.set_store_healthy(true, None);
                    backoff = Duration::from_millis(50);
                    tokio::select! {
                        _ = hint.changed() => {}
                        () = self.poke.notified() => {}
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                }
                Err(error) => {
                    self.set_store_healthy(false, Some(&error));
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Claims a signed hook request for the whole fleet until `expires_unix_s` (see
    /// [`Store::claim_request`]): `false` means it was seen before, by any core.
    pub async fn claim_request(&self, key: &str, expires_unix_s: i64) -> Result<bool, StoreError> {
        self.store.claim_request(key, expires_unix_s).await
    }

    /// The store lost the history this core followed (`why`): seeds a new epoch with every
    /// live worker this core holds, their bundles first. Of several cores noticing together,
    /// the store lets one seed; the others (and this one, next) reload the new epoch, whose
    /// snapshot then equals what consumers hold.
    async fn reseed(&self, why: &str) -> Result<(), StoreError> {
        let _one = self.reseeding.lock().await;
        let (lost_epoch, lost_head, entries) = {
            let state = self.hub.read();
            (
                state.epoch().clone(),
                state.head(),
                state.snapshot(&WorkerFilter::all()),
            )
        };
        if entries.is_empty() {
            // Nothing to bring back: give a core that holds workers the first go.
            tokio::select! {
                () = tokio::time::sleep(EMPTY_RESEED_DELAY) => {}
                () = self.shutdown.cancelled() => return Err(StoreError::Unavailable("shutting down".to_owned())),
            }
        }
        let mut without_code = Vec::new();
        for entry in &entries {
            match &entry.code {
                Some(code) => {
                    self.store
                        .put_bundle(&entry.change.checksum, code.clone())
                        .await?
                }
                None => {
                    if self.store.bundle(&entry.change.checksum).await?.is_none() {
                        without_code.push(entry.change.worker.to_string());
                    }
                }
            }
        }
        let latest: Vec<Change> = entries.iter().map(|e| e.change.clone()).collect();
        match self.store.reseed(&latest, now_ms()).await? {
            crate::store::Reseeded::Seeded { epoch, head } => {
                metrics::counter!("workerpush_store_reseeds_total").increment(1);
                tracing::error!(
                    %why, %lost_epoch, lost_head, %epoch, head, workers = latest.len(),
                    "STORE LOST ITS HISTORY: re-seeded it with every live worker this core holds, \
                     in a new epoch; consumers get RESET and a snapshot equal to what they hold"
                );
                if !without_code.is_empty() {
                    tracing::error!(
                        workers = ?without_code,
                        "re-seeded workers whose code the store lost and this core does not hold \
                         (larger than INLINE_CODE_MAX_BYTES): consumers keep what they have, new \
                         ones cannot fetch them until they are published again"
                    );
                }
            }
            crate::store::Reseeded::NotLost => {
                tracing::warn!(%why, %lost_epoch, lost_head, "store history lost; another core re-seeded it first; reloading");
            }
        }
        self.poke.notify_one();
        Ok(())
    }

    /// Reads one batch of durable changes into the hub. `Ok(true)`: there may be more.
    async fn catch_up(&self) -> Result<bool, StoreError> {
        let (epoch, head) = {
            let state = self.hub.read();
            (state.epoch().clone(), state.head())
        };
        let tail = match self.store.changes_after(head, 1024).await {
            Err(StoreError::HistoryLost(why)) => {
                self.reseed(&why).await?;
                return Ok(true);
            }
            other => other?,
        };
        match tail {
            Tail::Changes {
                epoch: store_epoch,
                changes,
            } if store_epoch == epoch => {
                if changes.is_empty() {
                    return Ok(false);
                }
                let mut entries = Vec::with_capacity(changes.len());
                for change in changes {
                    entries.push(Arc::new(self.entry(change, &epoch).await?));
                }
                let workers: Vec<WorkerName> =
                    entries.iter().map(|e| e.change.worker.clone()).collect();
                if !self.hub.append(entries) {
                    return Err(StoreError::Corrupt(
                        "store returned changes that do not follow the head".to_owned(),
                    ));
                }
                self.tracker.changed_workers(Some(workers.iter()));
                Ok(true)
            }
            _ => {
                let recovered = self.store.load().await?;
                tracing::warn!(
                    old_epoch = %epoch, epoch = %recovered.epoch, head = recovered.head,
                    "store history moved past this core; reloading (subscribers start over)"
                );
                self.install(
                    recovered.epoch,
                    recovered.head,
                    recovered.latest,
                    recovered.tail,
                )
                .await?;
                Ok(true)
            }
        }
    }

    async fn install(
        &self,
        epoch: Epoch,
        head: Revision,
        latest: Vec<Change>,
        tail: Vec<Change>,
    ) -> Result<(), StoreError> {
        let mut by_revision: HashMap<Revision, Arc<Entry>> = HashMap::new();
        let mut latest_entries = Vec::with_capacity(latest.len());
        for change in latest {
            let entry = Arc::new(self.entry(change, &epoch).await?);
            by_revision.insert(entry.change.revision, entry.clone());
            latest_entries.push(entry);
        }
        let mut tail_entries = Vec::with_capacity(tail.len());
        for change in tail {
            let entry = match by_revision.get(&change.revision) {
                Some(entry) => entry.clone(),
                None => Arc::new(self.entry(change, &epoch).await?),
            };
            tail_entries.push(entry);
        }
        self.hub.replace(epoch, head, latest_entries, tail_entries);
        self.tracker
            .changed_workers(None::<std::iter::Empty<&WorkerName>>);
        Ok(())
    }

    /// Encodes a change, loading its code when it travels inline.
    async fn entry(&self, change: Change, epoch: &Epoch) -> Result<Entry, StoreError> {
        let code = if change.kind == ChangeKind::Put && change.size <= self.config.inline_max_bytes
        {
            let fresh = lock(&self.fresh_code).get(&change.checksum).cloned();
            match fresh {
                Some(code) => Some(code),
                None => Some(self.store.bundle(&change.checksum).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("bundle {} missing", change.checksum))
                })?),
            }
        } else {
            None
        };
        Ok(Entry::new(change, epoch, code))
    }

    fn set_store_healthy(&self, healthy: bool, error: Option<&StoreError>) {
        let was = self.store_healthy.swap(healthy, Ordering::Relaxed);
        match (was, healthy) {
            (true, false) => {
                tracing::error!(error = %error.map(ToString::to_string).unwrap_or_default(), "store unreachable; retrying with backoff")
            }
            (false, true) => tracing::info!("store reachable again; caught up"),
            _ => {}
        }
    }
}

fn status_of<P>(change: Change, propagation: P) -> WorkerStatus<P> {
    WorkerStatus {
        name: change.worker,
        version: change.version,
        revision: change.revision,
        checksum: change.checksum,
        size: change.size,
        updated_ms: change.timestamp_ms,
        deployer: change.deployer,
        propagation,
    }
}

/// The consumer registry, with how many consumer ids each identity has in it.
struct Registry {
    records: HashMap<ConsumerId, ConsumerRecord>,
    ids: HashMap<Box<str>, usize>,
}

impl Registry {
    fn of(records: Vec<ConsumerRecord>) -> Self {
        let mut ids: HashMap<Box<str>, usize> = HashMap::new();
        let records: HashMap<_, _> = records.into_iter().map(|r| (r.id.clone(), r)).collect();
        for id in records.keys() {
            *ids.entry(id.identity().into()).or_default() += 1;
        }
        Self { records, ids }
    }

    /// `consumer`'s record, made if it has none and its identity has fewer than `limit`.
    fn entry(
        &mut self,
        consumer: ConsumerId,
        now: i64,
        limit: usize,
    ) -> Result<&mut ConsumerRecord, RequestError> {
        if !self.records.contains_key(&consumer) {
            let identity = consumer.identity();
            let count = self.ids.get(identity).copied().unwrap_or(0);
            if count >= limit {
                return Err(Bound::ConsumerIds.refuse(format_args!(
                    "identity {identity:?} already has {count} consumer ids registered"
                )));
            }
            self.ids.insert(identity.into(), count + 1);
        }
        Ok(self
            .records
            .entry(consumer.clone())
            .or_insert_with(|| new_record(consumer, now)))
    }

    /// Removes `consumer`'s record; answers whether it had one.
    fn remove(&mut self, consumer: &ConsumerId) -> Option<ConsumerRecord> {
        let record = self.records.remove(consumer)?;
        let identity = consumer.identity();
        if let Some(count) = self.ids.get_mut(identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.ids.remove(identity);
            }
        }
        Some(record)
    }
}

fn new_record(id: ConsumerId, now: i64) -> ConsumerRecord {
    ConsumerRecord {
        id,
        endpoint: String::new(),
        labels: BTreeMap::new(),
        transport: String::new(),
        first_seen_ms: now,
        last_seen_ms: now,
        last_acked_revision: 0,
    }
}

/// A core id for a core not given one: `core-` and 8 random hex digits.
pub fn default_core_id() -> String {
    format!("core-{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a single map operation; a panic elsewhere cannot leave
    // the map half-updated, so a poisoned lock is still consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod propagation_tests;
