//! Propagation: which consumers hold which revision of each worker, who failed and why, and
//! how long each change took to reach them.
//!
//! A [`Tracker`] keeps, per consumer id, the live subscriptions (a consumer that disconnects and
//! resumes is a new subscription with the same id), consumers that left recently (still
//! counted, as pending, so a deploy sees an edge host that is reconnecting), and each
//! consumer's latest acknowledgement per worker. It bumps a `watch` generation on every change
//! of that state and of the hub, which both `?wait` and the live status page wait on.
//!
//! What it holds is proportional to the live subscriptions plus a bounded window
//! ([`Bounds`]): consumer ids per identity, departures by count and by bytes (the oldest
//! forgotten first), and filters stored once and shared by every subscription that asked for
//! the same names.
//!
//! A consumer that registered (`RegisterConsumer`) is remembered until it deregisters, however
//! long it is away; one that did not is forgotten `remember` after it left.
//!
//! With several cores, each core's tracker knows its own subscriptions; [`Propagation::merge`]
//! and [`PropagationSummary::merge`] fold the views of several cores into the fleet's, each
//! entry naming the core that serves it.
//!
//! Transport-free, like the rest of the core: only `tokio::sync`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    hash::{Hash, Hasher},
    net::SocketAddr,
    sync::{Arc, Mutex, Weak, atomic::Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    bounds::{Bound, Bounds},
    error::RequestError,
    lock,
    subscription::SubscriberInfo,
    types::{ConsumerId, Revision, WorkerFilter, WorkerName},
};

/// Most filter names `/v1/consumers` lists per consumer; [`ConsumerStatus::worker_count`]
/// gives the whole number, so the listing stays proportional to the consumers, not their
/// filters.
pub const LISTED_WORKERS: usize = 32;

/// What a departed consumer's entry costs besides its filter: the maps' and the queue's
/// entries, the subscription's fields, the id held twice.
const DEPARTED_ENTRY_BYTES: usize = 256;

/// Where one revision of a worker stands across the worker's current subscribers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propagation {
    /// The revision asked about (the worker's latest, or the one just published).
    pub revision: Revision,
    /// `complete`, `pending` or `failed`.
    pub state: PropagationState,
    /// How many consumers are current subscribers of the worker.
    pub subscribers: usize,
    /// Those that hold the revision (or a later one).
    pub acked: Vec<Acked>,
    /// Those that have not answered yet.
    pub pending: Vec<Pending>,
    /// Those that could not apply it, with their reasons.
    pub failed: Vec<Failed>,
    /// Cores whose subscribers are counted (in `subscribers` and `state`) but not listed: a
    /// core that did not answer in time, or one that stopped (its consumers count as pending
    /// until they resume elsewhere or it is forgotten).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unlisted: Vec<CoreCounts>,
}

/// One core's counts for a worker, as the shared store holds them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreCounts {
    /// The core.
    pub core: Arc<str>,
    /// Whether it is alive (its heartbeat is recent).
    pub alive: bool,
    /// Its counts for the worker's latest revision it knows.
    pub summary: PropagationSummary,
}

/// The overall state of a [`Propagation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropagationState {
    /// Every current subscriber holds the revision (also when there are none).
    Complete,
    /// Someone has not answered yet.
    Pending,
    /// Everyone answered, and someone could not apply it.
    Failed,
}

/// A consumer that holds the revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acked {
    /// The consumer, suffix included.
    pub consumer_id: ConsumerId,
    /// The core serving it.
    pub core: Arc<str>,
    /// `grpc` or `quic`.
    pub transport: Cow<'static, str>,
    /// The revision it acknowledged: this one or a later one of the same worker.
    pub revision: Revision,
    /// Milliseconds from the core accepting that revision to the acknowledgement, when known.
    pub latency_ms: Option<u64>,
}

/// A consumer that has not answered yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The consumer, suffix included.
    pub consumer_id: ConsumerId,
    /// The core serving it (or that served it last).
    pub core: Arc<str>,
    /// `grpc` or `quic`.
    pub transport: Cow<'static, str>,
    /// Whether it has a live subscription (else it left and may resume: recently, or it
    /// registered and has not deregistered).
    pub connected: bool,
    /// Whether the revision was handed to its transport.
    pub delivered: bool,
}

/// A consumer that could not apply the revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The consumer, suffix included.
    pub consumer_id: ConsumerId,
    /// The core serving it.
    pub core: Arc<str>,
    /// `grpc` or `quic`.
    pub transport: Cow<'static, str>,
    /// The revision it refused.
    pub revision: Revision,
    /// Why, in its words.
    pub reason: String,
}

/// The counts of a [`Propagation`], for listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropagationSummary {
    /// See [`Propagation::revision`].
    pub revision: Revision,
    /// See [`Propagation::state`].
    pub state: PropagationState,
    /// See [`Propagation::subscribers`].
    pub subscribers: usize,
    /// How many hold it.
    pub acked: usize,
    /// How many have not answered.
    pub pending: usize,
    /// How many failed.
    pub failed: usize,
}

impl Propagation {
    /// The counts (those of unlisted cores included).
    pub fn summary(&self) -> PropagationSummary {
        let unlisted = |count: fn(&PropagationSummary) -> usize| -> usize {
            self.unlisted.iter().map(|c| count(&c.summary)).sum()
        };
        PropagationSummary {
            revision: self.revision,
            state: self.state,
            subscribers: self.subscribers,
            acked: self.acked.len() + unlisted(|s| s.acked),
            pending: self.pending.len() + unlisted(|s| s.pending),
            failed: self.failed.len() + unlisted(|s| s.failed),
        }
    }

    /// Folds another core's view of the same revision in. A consumer listed by several cores
    /// (it moved) is listed once, by its best answer: acked, failed, pending and connected,
    /// pending.
    pub fn merge(&mut self, other: Propagation) {
        fn rank(entry: &Entry) -> u8 {
            match entry {
                Entry::Acked(_) => 3,
                Entry::Failed(_) => 2,
                Entry::Pending(p) if p.connected => 1,
                Entry::Pending(_) => 0,
            }
        }
        enum Entry {
            Acked(Acked),
            Failed(Failed),
            Pending(Pending),
        }
        let mut by_consumer: BTreeMap<ConsumerId, Entry> = BTreeMap::new();
        let mine = std::mem::take(&mut self.acked)
            .into_iter()
            .map(Entry::Acked)
            .chain(
                std::mem::take(&mut self.failed)
                    .into_iter()
                    .map(Entry::Failed),
            )
            .chain(
                std::mem::take(&mut self.pending)
                    .into_iter()
                    .map(Entry::Pending),
            );
        let theirs = other
            .acked
            .into_iter()
            .map(Entry::Acked)
            .chain(other.failed.into_iter().map(Entry::Failed))
            .chain(other.pending.into_iter().map(Entry::Pending));
        let listed = |e: &Entry| match e {
            Entry::Acked(a) => a.consumer_id.clone(),
            Entry::Failed(f) => f.consumer_id.clone(),
            Entry::Pending(p) => p.consumer_id.clone(),
        };
        let mut duplicates = 0;
        for entry in mine.chain(theirs) {
            let consumer = listed(&entry);
            match by_consumer.get(&consumer) {
                Some(existing) => {
                    duplicates += 1;
                    if rank(&entry) > rank(existing) {
                        by_consumer.insert(consumer, entry);
                    }
                }
                None => {
                    by_consumer.insert(consumer, entry);
                }
            }
        }
        for entry in by_consumer.into_values() {
            match entry {
                Entry::Acked(a) => self.acked.push(a),
                Entry::Failed(f) => self.failed.push(f),
                Entry::Pending(p) => self.pending.push(p),
            }
        }
        self.subscribers = (self.subscribers + other.subscribers).saturating_sub(duplicates);
        self.unlisted.extend(other.unlisted);
        self.settle();
    }

    /// Counts a core that is not listed (see [`Propagation::unlisted`]).
    pub fn count_unlisted(&mut self, counts: CoreCounts) {
        self.subscribers += counts.summary.subscribers;
        self.unlisted.push(counts);
        self.settle();
    }

    /// Recomputes the state from the lists and the unlisted cores.
    fn settle(&mut self) {
        let summary = self.summary();
        self.state = state_of(summary.pending, summary.failed);
    }
}

impl PropagationSummary {
    /// Folds another core's counts in (listings: consumers are not told apart).
    pub fn merge(&mut self, other: &PropagationSummary) {
        self.subscribers += other.subscribers;
        self.acked += other.acked;
        self.pending += other.pending;
        self.failed += other.failed;
        self.state = state_of(self.pending, self.failed);
    }

    /// Whether every subscriber it counts answered `revision` (or a later one).
    pub fn answered(&self, revision: Revision) -> bool {
        self.revision >= revision && self.pending == 0
    }
}

/// The state of a propagation with `pending` and `failed` consumers.
pub(super) fn state_of(pending: usize, failed: usize) -> PropagationState {
    if pending > 0 {
        PropagationState::Pending
    } else if failed > 0 {
        PropagationState::Failed
    } else {
        PropagationState::Complete
    }
}

/// A consumer as the admin API shows it: one live subscription, or a consumer that left
/// recently (or registered and has not deregistered).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerStatus {
    /// The consumer, suffix included.
    pub consumer_id: ConsumerId,
    /// The core serving it (or that served it last).
    pub core: Arc<str>,
    /// The subscription's id in that core's process (`None` once it left).
    pub subscription: Option<u64>,
    /// Whether the subscription is live.
    pub connected: bool,
    /// `grpc` or `quic`.
    pub transport: Cow<'static, str>,
    /// The peer's address, if known.
    pub remote: Option<SocketAddr>,
    /// The workers it follows (`None`: every worker), the first [`LISTED_WORKERS`] of them.
    pub workers: Option<Vec<WorkerName>>,
    /// How many workers it follows by name (`None`: every worker).
    pub worker_count: Option<usize>,
    /// Unix ms when the subscription started.
    pub since_ms: i64,
    /// The highest revision handed to its transport (updates and progress markers).
    pub delivered_revision: Revision,
    /// The highest revision it acknowledged as applied, any worker.
    pub acked_revision: Revision,
    /// Live workers passing its filter whose latest version it does not hold (not acked, or
    /// failed).
    pub lag: usize,
    /// Its latest failures that are not yet superseded by an applied revision.
    pub failures: Vec<WorkerFailure>,
    /// The endpoint it registered (`RegisterConsumer`), if any.
    pub endpoint: String,
    /// The labels it registered.
    pub labels: BTreeMap<String, String>,
}

/// A failure to apply, as listed with a consumer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFailure {
    /// The worker.
    pub worker: WorkerName,
    /// The revision refused.
    pub revision: Revision,
    /// Why.
    pub reason: String,
}

/// One consumer's latest answers about one worker.
#[derive(Clone, Debug, Default)]
struct AckState {
    applied: Revision,
    latency_ms: Option<u64>,
    failed: Option<(Revision, String)>,
}

/// What [`Tracker::record`] did with an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Recorded {
    /// Not recorded: the consumer is neither live nor remembered.
    No,
    /// Recorded; the revision was accepted before the consumer's latest subscription started
    /// (it came in a snapshot or a replay).
    Before,
    /// Recorded; the revision was accepted after that subscription started: received live.
    Live,
}

/// A consumer with no live subscription, remembered for a while.
struct Departed {
    info: Arc<SubscriberInfo>,
    at: Instant,
}

impl Departed {
    /// Whether it still counts at `now`: it registered (and has not deregistered), or it left
    /// less than `remember` before.
    fn remembered(
        &self,
        now: Instant,
        remember: Duration,
        registered: &HashSet<ConsumerId>,
    ) -> bool {
        now.duration_since(self.at) < remember || registered.contains(&self.info.consumer_id)
    }
}

/// Which workers' propagation may have changed since a [`Tracker::take_dirty`].
#[derive(Debug, Default)]
pub(super) struct Dirty {
    /// Every worker (subscriptions started or ended).
    pub(super) all: bool,
    /// These workers (acknowledgements, new revisions).
    pub(super) workers: HashSet<WorkerName>,
}

#[derive(Default)]
struct TrackerState {
    live: BTreeMap<u64, Arc<SubscriberInfo>>,
    /// How many distinct consumer ids (live or departed) each identity has.
    ids: HashMap<Box<str>, usize>,
    /// What the departed entries hold, each distinct filter counted once.
    departed_bytes: usize,
    /// The filters departed entries hold, by address, with how many hold each.
    departed_filters: HashMap<usize, usize>,
    /// Filters by a hash of their names, so that subscriptions asking for the same names
    /// share one copy. Weak: a filter lives as long as a subscription (or departure) holds it.
    interned: HashMap<u64, Weak<[WorkerName]>>,
    /// How many live subscriptions each consumer id has.
    connected: HashMap<ConsumerId, usize>,
    departed: HashMap<ConsumerId, Departed>,
    /// Counts subscriptions starting and ending, so that a waiter can tell whether the set of
    /// subscribers is the one it looked at.
    membership: u64,
    /// Every departure in `departed`, oldest first, so that forgetting expired ones costs only
    /// those: ten thousand hosts dropping at once must not scan the map ten thousand times.
    /// Entries whose consumer has come back (or left again since) are skipped when reached.
    departures: VecDeque<(Instant, ConsumerId)>,
    acks: HashMap<ConsumerId, HashMap<WorkerName, AckState>>,
    /// Per consumer, the `live_after` of its latest subscription: an ack of a later revision
    /// is of a change it received live. One lookup per ack, no scan of the subscribers.
    live_after: HashMap<ConsumerId, Revision>,
    /// Consumers that registered and have not deregistered: they never age out.
    registered: HashSet<ConsumerId>,
    /// Kept only when the core shares its view with other cores (see [`Tracker::track_dirty`]).
    dirty: Option<Dirty>,
}

impl TrackerState {
    fn knows(&self, consumer: &ConsumerId) -> bool {
        self.connected.contains_key(consumer) || self.departed.contains_key(consumer)
    }

    /// Remembers `info`'s consumer as departed at `at`.
    fn depart(&mut self, info: Arc<SubscriberInfo>, at: Instant) {
        let consumer = info.consumer_id.clone();
        self.departed_bytes += DEPARTED_ENTRY_BYTES + 2 * consumer.as_str().len();
        if let Some((address, bytes)) = filter_weight(&info.filter) {
            let holders = self.departed_filters.entry(address).or_default();
            if *holders == 0 {
                self.departed_bytes += bytes;
            }
            *holders += 1;
        }
        self.departures.push_back((at, consumer.clone()));
        if let Some(old) = self.departed.insert(consumer, Departed { info, at }) {
            self.release(&old.info);
        }
    }

    /// Takes `consumer` out of the departed (it came back, or is forgotten).
    fn undepart(&mut self, consumer: &ConsumerId) -> Option<Departed> {
        let departed = self.departed.remove(consumer)?;
        self.release(&departed.info);
        Some(departed)
    }

    /// Gives back what a departed entry was counted for.
    fn release(&mut self, info: &SubscriberInfo) {
        self.departed_bytes = self
            .departed_bytes
            .saturating_sub(DEPARTED_ENTRY_BYTES + 2 * info.consumer_id.as_str().len());
        if let Some((address, bytes)) = filter_weight(&info.filter)
            && let Some(holders) = self.departed_filters.get_mut(&address)
        {
            *holders -= 1;
            if *holders == 0 {
                self.departed_filters.remove(&address);
                self.departed_bytes = self.departed_bytes.saturating_sub(bytes);
            }
        }
    }

    /// Forgets a departed consumer with its acknowledgements; `false` if it had not departed.
    fn forget(&mut self, consumer: &ConsumerId) -> bool {
        if self.undepart(consumer).is_none() {
            return false;
        }
        self.acks.remove(consumer);
        self.live_after.remove(consumer);
        let identity = consumer.identity();
        if let Some(count) = self.ids.get_mut(identity) {
            *count -= 1;
            if *count == 0 {
                self.ids.remove(identity);
            }
        }
        true
    }

    /// Forgets the oldest departure of `identity`; `false` if it has none.
    fn forget_oldest_of(&mut self, identity: &str) -> bool {
        let oldest = self.departures.iter().position(|(at, consumer)| {
            consumer.identity() == identity
                && !self.registered.contains(consumer)
                && self.departed.get(consumer).is_some_and(|d| d.at == *at)
        });
        let Some(position) = oldest else {
            return false;
        };
        if let Some((_, consumer)) = self.departures.remove(position) {
            self.forget(&consumer);
        }
        true
    }

    /// Forgets the oldest departures while there are more, or they hold more, than `bounds`
    /// allow.
    fn forget_past(&mut self, bounds: &Bounds) {
        loop {
            let bound = if self.departed.len() > bounds.departed_consumers {
                Bound::DepartedConsumers
            } else if self.departed_bytes > bounds.departed_bytes {
                Bound::DepartedBytes
            } else {
                return;
            };
            let Some((at, consumer)) = self.departures.pop_front() else {
                return;
            };
            // A registered consumer is bounded by the registry, not forgotten here.
            if self.departed.get(&consumer).is_some_and(|d| d.at == at)
                && !self.registered.contains(&consumer)
            {
                self.forget(&consumer);
                bound.count();
            }
        }
    }

    /// Whether `consumer` is live, or left and is still remembered at `now`.
    fn counts(&self, consumer: &ConsumerId, now: Instant, remember: Duration) -> bool {
        self.connected.contains_key(consumer)
            || self
                .departed
                .get(consumer)
                .is_some_and(|d| d.remembered(now, remember, &self.registered))
    }

    fn dirty_all(&mut self) {
        if let Some(dirty) = &mut self.dirty {
            dirty.all = true;
            dirty.workers.clear();
        }
    }

    fn dirty_worker(&mut self, worker: &WorkerName) {
        if let Some(dirty) = &mut self.dirty
            && !dirty.all
        {
            dirty.workers.insert(worker.clone());
        }
    }
}

/// Who was pending when a waiter last looked (see [`Tracker::answered`]).
#[derive(Default)]
pub(super) struct Look {
    /// [`TrackerState::membership`] then; `None` before the first look.
    membership: Option<u64>,
    pending: Vec<ConsumerId>,
}

/// What a propagation is computed over: one subscriber per consumer id.
struct Member<'a> {
    info: &'a Arc<SubscriberInfo>,
    connected: bool,
    delivered: Revision,
}

/// The address that identifies a filter's shared names, and the bytes they hold.
fn filter_weight(filter: &WorkerFilter) -> Option<(usize, usize)> {
    let names = filter.names()?;
    let bytes = names
        .iter()
        // The name's slot in the slice, and its own allocation (the `Arc` counts and the
        // text, as the allocator rounds it).
        .map(|name| {
            std::mem::size_of::<WorkerName>() + (16 + name.as_str().len()).next_multiple_of(16)
        })
        .sum();
    Some((names.as_ptr() as usize, bytes))
}

fn names_hash(names: &[WorkerName]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    names.hash(&mut hasher);
    hasher.finish()
}

/// See the module docs.
pub(super) struct Tracker {
    state: Mutex<TrackerState>,
    generation: watch::Sender<u64>,
    remember: Duration,
    bounds: Bounds,
    /// The core whose subscriptions these are, named in every entry.
    core: Arc<str>,
}

impl Tracker {
    /// A tracker of `core`'s subscriptions that counts a departed (unregistered) consumer for
    /// `remember` after it left, within `bounds`.
    pub(super) fn new(remember: Duration, bounds: Bounds, core: Arc<str>) -> Self {
        Self {
            state: Mutex::new(TrackerState::default()),
            generation: watch::Sender::new(0),
            remember,
            bounds,
            core,
        }
    }
    /// Starts keeping which workers' propagation changed, for [`Tracker::take_dirty`].
    pub(super) fn track_dirty(&self) {
        lock(&self.state).dirty = Some(Dirty {
            all: true,
            workers: HashSet::new(),
        });
    }

    /// Which workers' propagation may have changed since the last call.
    pub(super) fn take_dirty(&self) -> Dirty {
        lock(&self.state)
            .dirty
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Says that `workers` have new revisions (or that every worker may have, with `None`).
    pub(super) fn changed_workers<'a>(
        &self,
        workers: Option<impl Iterator<Item = &'a WorkerName>>,
    ) {
        {
            let mut state = lock(&self.state);
            match workers {
                None => state.dirty_all(),
                Some(workers) => workers.for_each(|w| state.dirty_worker(w)),
            }
        }
        self.bump();
    }

    /// Remembers that `consumer` registered: it counts until [`Tracker::forget`].
    pub(super) fn registered(&self, consumer: ConsumerId) {
        let mut state = lock(&self.state);
        if state.registered.insert(consumer) {
            state.membership += 1;
            state.dirty_all();
        }
    }

    /// Forgets `consumer`'s registration, and its departure and answers if it has no live
    /// subscription here. Returns whether there was anything to forget.
    pub(super) fn forget(&self, consumer: &ConsumerId) -> bool {
        let known = {
            let mut state = lock(&self.state);
            let registered = state.registered.remove(consumer);
            let departed = state.forget(consumer);
            state.membership += 1;
            state.dirty_all();
            registered || departed || state.connected.contains_key(consumer)
        };
        self.bump();
        known
    }

    /// Forgets `consumer`'s departure and answers (it subscribed on another core, which now
    /// tracks it), keeping its registration.
    pub(super) fn moved(&self, consumer: &ConsumerId) {
        let moved = {
            let mut state = lock(&self.state);
            let moved = state.forget(consumer);
            if moved {
                state.membership += 1;
                state.dirty_all();
            }
            moved
        };
        if moved {
            self.bump();
        }
    }

    /// `filter` with its names shared with an earlier subscription's that asked for the same
    /// ones, if one still holds them.
    pub(super) fn intern(&self, filter: WorkerFilter) -> WorkerFilter {
        let Some(names) = filter.shared_names() else {
            return filter;
        };
        let key = names_hash(names);
        let mut state = lock(&self.state);
        if let Some(existing) = state.interned.get(&key).and_then(Weak::upgrade)
            && *existing == **names
        {
            return filter.with_names(existing);
        }
        let weak = Arc::downgrade(names);
        state.interned.insert(key, weak);
        let held = state.live.len() + state.departed.len();
        if state.interned.len() > 2 * held + 64 {
            state.interned.retain(|_, names| names.strong_count() > 0);
        }
        filter
    }

    /// A receiver that changes whenever subscriptions, acknowledgements or the hub change.
    pub(super) fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Says that something changed.
    pub(super) fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Counts a new subscription. A consumer id its identity has not used yet needs room
    /// under [`Bounds::consumer_ids_per_identity`]: the identity's oldest departure is
    /// forgotten to make it; with every one of its ids live, the subscription is refused.
    pub(super) fn subscribed(&self, info: Arc<SubscriberInfo>) -> Result<(), RequestError> {
        {
            let mut state = lock(&self.state);
            if !state.knows(&info.consumer_id) {
                let identity = info.consumer_id.identity();
                let limit = self.bounds.consumer_ids_per_identity;
                if state.ids.get(identity).is_some_and(|n| *n >= limit)
                    && !state.forget_oldest_of(identity)
                {
                    return Err(Bound::ConsumerIds.refuse(format_args!(
                        "identity {identity:?} already has {limit} consumer ids subscribed"
                    )));
                }
                *state.ids.entry(identity.into()).or_default() += 1;
            }
            state.membership += 1;
            state.dirty_all();
            state.undepart(&info.consumer_id);
            *state.connected.entry(info.consumer_id.clone()).or_default() += 1;
            (state.live_after).insert(info.consumer_id.clone(), info.live_after);
            state.live.insert(info.id, info);
        }
        self.bump();
        Ok(())
    }

    pub(super) fn unsubscribed(&self, id: u64) {
        {
            let mut state = lock(&self.state);
            state.membership += 1;
            state.dirty_all();
            if let Some(info) = state.live.remove(&id) {
                let left = match state.connected.get_mut(&info.consumer_id) {
                    Some(count) if *count > 1 => {
                        *count -= 1;
                        false
                    }
                    _ => {
                        state.connected.remove(&info.consumer_id);
                        true
                    }
                };
                if left {
                    state.depart(info, Instant::now());
                }
            }
            self.forget_old(&mut state, Instant::now());
            state.forget_past(&self.bounds);
        }
        self.bump();
    }

    /// Forgets consumers that left more than `remember` before `now`, with their
    /// acknowledgements.
    fn forget_old(&self, state: &mut TrackerState, now: Instant) {
        let expired = state
            .departures
            .partition_point(|(at, _)| now.duration_since(*at) >= self.remember);
        let expired: Vec<_> = state.departures.drain(..expired).collect();
        for (at, consumer) in expired {
            // A registered consumer stays (without a place in the queue) until it deregisters.
            if state.departed.get(&consumer).is_some_and(|d| d.at == at)
                && !state.registered.contains(&consumer)
            {
                state.forget(&consumer);
            }
        }
        // Consumers that come and go keep adding departures: drop the stale ones once they
        // outnumber the current ones, which keeps the queue within about twice the map.
        let TrackerState {
            departed,
            departures,
            ..
        } = state;
        if departures.len() > 2 * departed.len() + 64 {
            departures.retain(|(at, consumer)| departed.get(consumer).is_some_and(|d| d.at == *at));
        }
    }

    /// Records an acknowledgement from a known consumer (live or recently departed); answers
    /// whether it was recorded, and whether `revision` reached the consumer live (see
    /// [`Recorded`]). `latency_ms` is the time since the core accepted `revision`.
    pub(super) fn record(
        &self,
        consumer: &ConsumerId,
        worker: &WorkerName,
        revision: Revision,
        outcome: Result<(), &str>,
        latency_ms: Option<u64>,
    ) -> Recorded {
        let live = {
            let mut state = lock(&self.state);
            if !state.knows(consumer) {
                return Recorded::No;
            }
            let live = state
                .live_after
                .get(consumer)
                .is_some_and(|after| revision > *after);
            let entry = state
                .acks
                .entry(consumer.clone())
                .or_default()
                .entry(worker.clone())
                .or_default();
            match outcome {
                Ok(()) => {
                    if revision >= entry.applied {
                        entry.applied = revision;
                        entry.latency_ms = latency_ms;
                    }
                    if entry.failed.as_ref().is_some_and(|(r, _)| *r <= revision) {
                        entry.failed = None;
                    }
                }
                Err(reason) => {
                    let newer = entry.failed.as_ref().is_none_or(|(r, _)| *r <= revision);
                    if revision > entry.applied && newer {
                        entry.failed = Some((revision, reason.to_owned()));
                    }
                }
            }
            state.dirty_worker(worker);
            live
        };
        self.bump();
        if live {
            Recorded::Live
        } else {
            Recorded::Before
        }
    }

    /// Whether `consumer` is live or remembered as departed.
    pub(super) fn knows(&self, consumer: &ConsumerId) -> bool {
        lock(&self.state).knows(consumer)
    }

    /// The live subscriptions.
    pub(super) fn live(&self) -> Vec<Arc<SubscriberInfo>> {
        lock(&self.state).live.values().cloned().collect()
    }

    /// Where `revision` of `worker` stands now.
    pub(super) fn propagation(&self, worker: &WorkerName, revision: Revision) -> Propagation {
        let now = Instant::now();
        propagation_of(
            &lock(&self.state),
            &self.core,
            self.remember,
            now,
            worker,
            revision,
        )
    }

    /// Where `revision` of `worker` stands, once no current subscriber is pending on it.
    /// Waiting asks this again and again while answers arrive, so `look` keeps who was
    /// pending: while the subscribers stay the same, only those are looked at again.
    pub(super) fn answered(
        &self,
        worker: &WorkerName,
        revision: Revision,
        look: &mut Look,
        now: Instant,
    ) -> Option<Propagation> {
        let state = lock(&self.state);
        if look.membership == Some(state.membership) {
            look.pending.retain(|consumer| {
                state.counts(consumer, now, self.remember)
                    && matches!(answer(&state, consumer, worker, revision), Answer::Pending)
            });
        } else {
            look.membership = Some(state.membership);
            look.pending = members(&state, self.remember, now, |filter| filter.matches(worker))
                .into_keys()
                .filter(|consumer| {
                    matches!(answer(&state, consumer, worker, revision), Answer::Pending)
                })
                .cloned()
                .collect();
        }
        look.pending
            .is_empty()
            .then(|| propagation_of(&state, &self.core, self.remember, now, worker, revision))
    }

    /// Every live subscription, then every recently departed consumer. `latest(filter)` gives
    /// the latest revision of each live worker passing a filter.
    pub(super) fn consumers(
        &self,
        latest: impl Fn(&WorkerFilter) -> Vec<(WorkerName, Revision)>,
    ) -> Vec<ConsumerStatus> {
        let state = lock(&self.state);
        let now = Instant::now();
        let describe = |info: &Arc<SubscriberInfo>, connected: bool| {
            let answers = state.acks.get(&info.consumer_id);
            let answer = |worker: &WorkerName| answers.and_then(|a| a.get(worker));
            let lag = latest(&info.filter)
                .iter()
                .filter(|(worker, revision)| answer(worker).is_none_or(|a| a.applied < *revision))
                .count();
            let mut failures: Vec<_> = answers
                .into_iter()
                .flatten()
                .filter_map(|(worker, a)| {
                    let (revision, reason) = a.failed.clone()?;
                    Some(WorkerFailure {
                        worker: worker.clone(),
                        revision,
                        reason,
                    })
                })
                .collect();
            failures.sort_by(|a, b| a.worker.cmp(&b.worker));
            ConsumerStatus {
                consumer_id: info.consumer_id.clone(),
                core: self.core.clone(),
                subscription: connected.then_some(info.id),
                connected,
                transport: Cow::Borrowed(info.transport),
                remote: info.remote,
                workers: info
                    .filter
                    .names()
                    .map(|names| names.iter().take(LISTED_WORKERS).cloned().collect()),
                worker_count: info.filter.names().map(<[WorkerName]>::len),
                since_ms: info.since_ms,
                delivered_revision: info.delivered.load(Ordering::Relaxed),
                acked_revision: answers
                    .into_iter()
                    .flatten()
                    .map(|(_, a)| a.applied)
                    .max()
                    .unwrap_or(0),
                lag,
                failures,
                endpoint: String::new(),
                labels: BTreeMap::new(),
            }
        };
        let mut all: Vec<_> = state
            .live
            .values()
            .map(|info| describe(info, true))
            .collect();
        let mut departed: Vec<_> = state
            .departed
            .values()
            .filter(|d| d.remembered(now, self.remember, &state.registered))
            .map(|d| describe(&d.info, false))
            .collect();
        departed.sort_by(|a, b| a.consumer_id.cmp(&b.consumer_id));
        all.append(&mut departed);
        all
    }
}

/// A consumer's answer about `revision` of `worker`.
enum Answer<'a> {
    /// It holds that revision or a later one.
    Applied(&'a AckState),
    /// It could not apply that revision or a later one, for this reason.
    Failed(Revision, &'a str),
    /// Neither yet.
    Pending,
}

/// What `consumer` last said about `worker`, as it bears on `revision`.
fn answer<'a>(
    state: &'a TrackerState,
    consumer: &ConsumerId,
    worker: &WorkerName,
    revision: Revision,
) -> Answer<'a> {
    match state.acks.get(consumer).and_then(|a| a.get(worker)) {
        Some(a) if a.applied >= revision => Answer::Applied(a),
        Some(AckState {
            failed: Some((at, reason)),
            ..
        }) if *at >= revision => Answer::Failed(*at, reason),
        _ => Answer::Pending,
    }
}

/// Where `revision` of `worker` stands in `state`, departures counted against `now`.
fn propagation_of(
    state: &TrackerState,
    core: &Arc<str>,
    remember: Duration,
    now: Instant,
    worker: &WorkerName,
    revision: Revision,
) -> Propagation {
    let members = members(state, remember, now, |filter| filter.matches(worker));
    let (mut acked, mut pending, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (consumer, member) in &members {
        let transport = Cow::Borrowed(member.info.transport);
        let consumer_id = (*consumer).clone();
        let core = core.clone();
        match answer(state, consumer, worker, revision) {
            Answer::Applied(a) => acked.push(Acked {
                consumer_id,
                core,
                transport,
                revision: a.applied,
                latency_ms: a.latency_ms,
            }),
            Answer::Failed(at, reason) => failed.push(Failed {
                consumer_id,
                core,
                transport,
                revision: at,
                reason: reason.to_owned(),
            }),
            Answer::Pending => pending.push(Pending {
                consumer_id,
                core,
                transport,
                connected: member.connected,
                delivered: member.delivered >= revision,
            }),
        }
    }
    Propagation {
        revision,
        state: state_of(pending.len(), failed.len()),
        subscribers: members.len(),
        acked,
        pending,
        failed,
        unlisted: Vec::new(),
    }
}

/// The current subscribers passing `matches`, one per consumer id: its live subscriptions
/// (the furthest delivered counts), or, without one, its last subscription if it is still
/// remembered at `now` (see [`Departed::remembered`]).
fn members<'a>(
    state: &'a TrackerState,
    remember: Duration,
    now: Instant,
    matches: impl Fn(&WorkerFilter) -> bool,
) -> BTreeMap<&'a ConsumerId, Member<'a>> {
    let mut members: BTreeMap<&ConsumerId, Member<'_>> = BTreeMap::new();
    for info in state.live.values().filter(|i| matches(&i.filter)) {
        let delivered = info.delivered.load(Ordering::Relaxed);
        members
            .entry(&info.consumer_id)
            .and_modify(|m| m.delivered = m.delivered.max(delivered))
            .or_insert(Member {
                info,
                connected: true,
                delivered,
            });
    }
    for (consumer, departed) in &state.departed {
        if departed.remembered(now, remember, &state.registered) && matches(&departed.info.filter) {
            members.entry(consumer).or_insert(Member {
                info: &departed.info,
                connected: false,
                delivered: departed.info.delivered.load(Ordering::Relaxed),
            });
        }
    }
    members
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    const REMEMBER: Duration = Duration::from_secs(300);

    fn info(id: u64, consumer: &str) -> Arc<SubscriberInfo> {
        Arc::new(SubscriberInfo {
            id,
            consumer_id: ConsumerId::authorize("edge", consumer).unwrap(),
            transport: "test",
            remote: None,
            filter: WorkerFilter::parse(&[] as &[&str]).unwrap(),
            since_ms: 0,
            live_after: 0,
            delivered: AtomicU64::new(0),
        })
    }

    fn departed_at(tracker: &Tracker, consumer: &ConsumerId) -> Option<Instant> {
        lock(&tracker.state).departed.get(consumer).map(|d| d.at)
    }

    fn ack(tracker: &Tracker, consumer: &ConsumerId) -> bool {
        let worker = WorkerName::parse("app").unwrap();
        tracker.record(consumer, &worker, 1, Ok(()), None) != Recorded::No
    }

    #[test]
    fn a_departure_is_forgotten_with_its_acks_once_remember_has_passed() {
        let tracker = Tracker::new(REMEMBER, Bounds::default(), "core-test".into());
        let a = info(1, "edge/a");
        let consumer = a.consumer_id.clone();
        tracker.subscribed(a).unwrap();
        assert!(ack(&tracker, &consumer));
        tracker.unsubscribed(1);
        let left = departed_at(&tracker, &consumer).unwrap();

        let mut state = lock(&tracker.state);
        tracker.forget_old(&mut state, left + REMEMBER - Duration::from_nanos(1));
        assert!(state.knows(&consumer), "forgotten before its time");
        tracker.forget_old(&mut state, left + REMEMBER);
        assert!(!state.knows(&consumer));
        assert!(state.acks.is_empty() && state.departures.is_empty());
    }

    #[test]
    fn a_consumer_that_came_back_and_left_again_counts_from_its_last_departure() {
        let tracker = Tracker::new(REMEMBER, Bounds::default(), "core-test".into());
        let consumer = info(1, "edge/a").consumer_id.clone();
        tracker.subscribed(info(1, "edge/a")).unwrap();
        tracker.unsubscribed(1);
        let first = departed_at(&tracker, &consumer).unwrap();
        tracker.subscribed(info(2, "edge/a")).unwrap();
        assert!(ack(&tracker, &consumer));
        tracker.unsubscribed(2);
        let second = departed_at(&tracker, &consumer).unwrap();
        assert!(second > first);

        // The first departure expires; the consumer stays, acknowledgements and all.
        let mut state = lock(&tracker.state);
        tracker.forget_old(&mut state, first + REMEMBER);
        assert!(state.knows(&consumer));
        assert_eq!(state.acks.len(), 1);
        assert_eq!(state.departures.len(), 1);
        tracker.forget_old(&mut state, second + REMEMBER);
        assert!(!state.knows(&consumer) && state.acks.is_empty());
    }

    /// A tracker, the worker `app`, and consumers `edge/a` and `edge/b` (not yet subscribed).
    fn app_and_two_edges() -> (
        Tracker,
        WorkerName,
        Arc<SubscriberInfo>,
        Arc<SubscriberInfo>,
    ) {
        let worker = WorkerName::parse("app").unwrap();
        let tracker = Tracker::new(REMEMBER, Bounds::default(), "core-test".into());
        (tracker, worker, info(1, "edge/a"), info(2, "edge/b"))
    }

    #[test]
    fn a_waiter_counts_a_subscriber_that_joins_between_looks() {
        let (tracker, worker, a, b) = app_and_two_edges();
        let (consumer_a, consumer_b) = (a.consumer_id.clone(), b.consumer_id.clone());
        let mut look = Look::default();
        let mut answered = || tracker.answered(&worker, 1, &mut look, Instant::now());
        tracker.subscribed(a).unwrap();
        assert!(answered().is_none());

        tracker.subscribed(b).unwrap();
        assert!(ack(&tracker, &consumer_a));
        assert!(answered().is_none(), "edge/b joined and has not answered");
        assert!(ack(&tracker, &consumer_b));
        let done = answered().unwrap();
        assert_eq!(done.state, PropagationState::Complete);
        assert_eq!(done.acked.len(), 2);
    }

    #[test]
    fn a_waiter_stops_counting_a_departed_consumer_once_remember_has_passed() {
        let (tracker, worker, a, b) = app_and_two_edges();
        let (consumer_a, consumer_b) = (a.consumer_id.clone(), b.consumer_id.clone());
        tracker.subscribed(a).unwrap();
        tracker.subscribed(b).unwrap();
        tracker.unsubscribed(1);
        let left = departed_at(&tracker, &consumer_a).unwrap();
        assert!(ack(&tracker, &consumer_b));

        let mut look = Look::default();
        assert!(tracker.answered(&worker, 1, &mut look, left).is_none());
        assert_eq!(look.pending, [consumer_a]);
        // No subscription started or ended since: only the pending consumer is looked at again.
        let done = tracker
            .answered(&worker, 1, &mut look, left + REMEMBER)
            .unwrap();
        assert_eq!(done.subscribers, 1);
        assert_eq!(done.acked[0].consumer_id, consumer_b);
    }

    #[test]
    fn a_registered_consumer_outlives_remember_until_it_is_forgotten() {
        let (tracker, worker, a, b) = app_and_two_edges();
        let (registered, plain) = (a.consumer_id.clone(), b.consumer_id.clone());
        tracker.registered(registered.clone());
        tracker.subscribed(a).unwrap();
        tracker.subscribed(b).unwrap();
        tracker.unsubscribed(1);
        tracker.unsubscribed(2);
        let left = departed_at(&tracker, &plain).unwrap();
        {
            let mut state = lock(&tracker.state);
            tracker.forget_old(&mut state, left + REMEMBER * 10);
            assert!(state.knows(&registered) && !state.knows(&plain));
        }
        let mut look = Look::default();
        assert!(
            tracker
                .answered(&worker, 1, &mut look, left + REMEMBER * 10)
                .is_none(),
            "the registered consumer is still waited for"
        );
        assert_eq!(look.pending, std::slice::from_ref(&registered));
        assert!(tracker.forget(&registered));
        let done = tracker
            .answered(&worker, 1, &mut look, left + REMEMBER * 10)
            .unwrap();
        assert_eq!(
            (done.state, done.subscribers),
            (PropagationState::Complete, 0)
        );
        assert!(!tracker.forget(&registered), "nothing left to forget");
    }

    #[test]
    fn merging_two_cores_lists_a_moved_consumer_once_by_its_best_answer() {
        let (one, worker, a, b) = app_and_two_edges();
        let other = Tracker::new(REMEMBER, Bounds::default(), "core-other".into());
        let (moved, stays) = (a.consumer_id.clone(), b.consumer_id.clone());
        // `a` left `one` (pending there) and acked on `other`; `b` is pending on `one`.
        one.subscribed(a.clone()).unwrap();
        one.subscribed(b).unwrap();
        one.unsubscribed(1);
        other.subscribed(info(7, "edge/a")).unwrap();
        assert_ne!(
            other.record(&moved, &worker, 1, Ok(()), Some(3)),
            Recorded::No
        );
        let mut fleet = one.propagation(&worker, 1);
        fleet.merge(other.propagation(&worker, 1));
        assert_eq!(fleet.subscribers, 2);
        assert_eq!(fleet.acked.len(), 1);
        assert_eq!(fleet.acked[0].consumer_id, moved);
        assert_eq!(&*fleet.acked[0].core, "core-other");
        assert_eq!(fleet.pending.len(), 1);
        assert_eq!(fleet.pending[0].consumer_id, stays);
        assert_eq!(&*fleet.pending[0].core, "core-test");
        assert_eq!(fleet.state, PropagationState::Pending);

        // A core counted but not listed keeps the state pending while it has pending ones.
        assert_ne!(one.record(&stays, &worker, 1, Ok(()), None), Recorded::No);
        let mut fleet = one.propagation(&worker, 1);
        fleet.merge(other.propagation(&worker, 1));
        assert_eq!(fleet.state, PropagationState::Complete);
        let mut summary = fleet.summary();
        summary.pending = 2;
        fleet.count_unlisted(CoreCounts {
            core: "core-dead".into(),
            alive: false,
            summary,
        });
        assert_eq!(fleet.state, PropagationState::Pending);
        assert_eq!(fleet.summary().pending, 2);
    }

    #[test]
    fn departures_of_a_flapping_consumer_stay_bounded() {
        let tracker = Tracker::new(REMEMBER, Bounds::default(), "core-test".into());
        for id in 0..10_000 {
            tracker.subscribed(info(id, "edge/a")).unwrap();
            tracker.unsubscribed(id);
        }
        let state = lock(&tracker.state);
        assert_eq!(state.departed.len(), 1);
        assert!(
            state.departures.len() <= 2 + 64,
            "{}",
            state.departures.len()
        );
    }

    #[test]
    fn thousands_leaving_at_once_are_all_remembered() {
        let bounds = Bounds {
            consumer_ids_per_identity: 10_000,
            ..Bounds::default()
        };
        let tracker = Tracker::new(REMEMBER, bounds, "core-test".into());
        let everyone: Vec<_> = (0..10_000)
            .map(|id| info(id, &format!("edge/h{id}")))
            .collect();
        for host in &everyone {
            tracker.subscribed(host.clone()).unwrap();
        }
        for host in &everyone {
            tracker.unsubscribed(host.id);
        }
        let state = lock(&tracker.state);
        assert!(state.live.is_empty() && state.connected.is_empty());
        assert_eq!(state.departed.len(), everyone.len());
        assert_eq!(state.departures.len(), everyone.len());
    }

    fn consumer(id: &str) -> ConsumerId {
        ConsumerId::authorize("edge", id).unwrap()
    }

    #[test]
    fn departures_past_the_count_are_forgotten_oldest_first() {
        let bounds = Bounds {
            departed_consumers: 3,
            ..Bounds::default()
        };
        let tracker = Tracker::new(REMEMBER, bounds, "core-test".into());
        for id in 0..5 {
            tracker
                .subscribed(info(id, &format!("edge/h{id}")))
                .unwrap();
            tracker.unsubscribed(id);
        }
        let state = lock(&tracker.state);
        assert_eq!(state.departed.len(), 3);
        assert!(!state.knows(&consumer("edge/h1")));
        assert!(state.knows(&consumer("edge/h2")) && state.knows(&consumer("edge/h4")));
        assert_eq!(state.ids.get("edge"), Some(&3));
    }

    #[test]
    fn departures_past_the_bytes_are_forgotten_and_a_shared_filter_counts_once() {
        let names: Vec<String> = (0..1000).map(|i| format!("worker-{i}")).collect();
        let with_filter = |id: u64, names: &[String], tracker: &Tracker| {
            let mut info = Arc::into_inner(info(id, &format!("edge/h{id}"))).unwrap();
            info.filter = tracker.intern(WorkerFilter::parse(names).unwrap());
            Arc::new(info)
        };
        let bounds = Bounds {
            departed_bytes: 100 << 10,
            ..Bounds::default()
        };
        let tracker = Tracker::new(REMEMBER, bounds, "core-test".into());
        // The same thousand names, fifty times: one copy, well inside the budget.
        for id in 0..50 {
            tracker
                .subscribed(with_filter(id, &names, &tracker))
                .unwrap();
        }
        for id in 0..50 {
            tracker.unsubscribed(id);
        }
        assert_eq!(lock(&tracker.state).departed.len(), 50);
        // Fifty different filters of a thousand names do not fit: the oldest go.
        for id in 50..100 {
            let own: Vec<String> = names.iter().map(|n| format!("{n}-{id}")).collect();
            tracker.subscribed(with_filter(id, &own, &tracker)).unwrap();
            tracker.unsubscribed(id);
        }
        let state = lock(&tracker.state);
        assert!(state.departed.len() < 50, "{}", state.departed.len());
        assert!(
            state.departed_bytes <= 100 << 10,
            "{}",
            state.departed_bytes
        );
        assert!(state.knows(&consumer("edge/h99")) && !state.knows(&consumer("edge/h0")));
    }

    #[test]
    fn an_identity_at_its_consumer_ids_makes_room_from_its_departures_or_is_refused() {
        let bounds = Bounds {
            consumer_ids_per_identity: 2,
            ..Bounds::default()
        };
        let tracker = Tracker::new(REMEMBER, bounds, "core-test".into());
        tracker.subscribed(info(1, "edge/a")).unwrap();
        tracker.subscribed(info(2, "edge/b")).unwrap();
        // The same id again is no new id.
        tracker.subscribed(info(3, "edge/a")).unwrap();
        let refused = tracker.subscribed(info(4, "edge/c")).unwrap_err();
        assert!(
            refused.to_string().contains("consumer_ids_per_identity"),
            "{refused}"
        );
        tracker.unsubscribed(2);
        tracker.subscribed(info(5, "edge/c")).unwrap();
        let state = lock(&tracker.state);
        assert!(!state.knows(&consumer("edge/b")), "the departure made room");
        assert_eq!(state.ids.get("edge"), Some(&2));
    }
}
