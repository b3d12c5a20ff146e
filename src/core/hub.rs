//! The hub: the in-memory view of durable state that every subscription reads.
//!
//! It holds the retained log as shared, already-encoded entries and the latest entry of every
//! live worker. Subscriptions are cursors into the log: a publish appends once and wakes them;
//! nobody has a queue to overflow, a slow reader only falls behind, and one that falls out of
//! the log gets a RESET and a snapshot. Fed only by the core's follower, in revision order,
//! from durable state: nothing reaches a subscriber before it is durable.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use bytes::Bytes;
use tokio::sync::watch;

use super::types::{Epoch, Revision, Version, WorkerFilter, WorkerName};
use crate::{
    pb::{EncodedUpdate, UpdateKind, WorkerUpdate},
    store::{Change, ChangeKind},
};

/// A durable change as subscribers receive it: encoded once, shared by all.
#[derive(Debug)]
pub struct Entry {
    /// The change.
    pub change: Change,
    /// Its `WorkerUpdate`, code inline when small enough.
    pub encoded: EncodedUpdate,
    /// The code, when inline.
    pub code: Option<Bytes>,
}

impl Entry {
    /// Encodes `change` in `epoch`, with `code` inline if given.
    pub fn new(change: Change, epoch: &Epoch, code: Option<Bytes>) -> Self {
        let update = update_of(&change, epoch, code.clone().unwrap_or_default());
        Self {
            encoded: EncodedUpdate::encode(&update),
            change,
            code,
        }
    }

    /// The update without its code (listings).
    pub fn summary(&self, epoch: &Epoch) -> WorkerUpdate {
        update_of(&self.change, epoch, Bytes::new())
    }
}

/// The `WorkerUpdate` of a change.
fn update_of(change: &Change, epoch: &Epoch, worker_code: Bytes) -> WorkerUpdate {
    let kind = match change.kind {
        ChangeKind::Put => UpdateKind::Put,
        ChangeKind::Delete => UpdateKind::Delete,
    };
    WorkerUpdate {
        kind: kind as i32,
        revision: change.revision,
        epoch: epoch.to_string(),
        worker_name: change.worker.to_string(),
        version: change.version.to_string(),
        checksum: change.checksum.to_string(),
        size: i64::try_from(change.size).unwrap_or(i64::MAX),
        worker_code,
        timestamp: change.timestamp_ms,
    }
}

/// Bounds of the retained log.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// At most this many changes.
    pub changes: usize,
    /// At most this many encoded bytes (the oldest go first; resumes from before them RESET).
    pub bytes: usize,
}

/// What a cursor finds after its position.
pub enum Read {
    /// The epoch is not the cursor's: start over.
    OtherEpoch,
    /// The next change is no longer retained (or the cursor is past the head): start over.
    Gone,
    /// The next changes, ascending and contiguous (empty: the cursor is at the head).
    Entries(Vec<Arc<Entry>>),
}

/// The shared state; see the module docs.
pub struct Hub {
    state: RwLock<HubState>,
    head: watch::Sender<Revision>,
}

/// The state under the hub's lock.
pub struct HubState {
    epoch: Epoch,
    head: Revision,
    log: VecDeque<Arc<Entry>>,
    log_bytes: usize,
    latest: HashMap<WorkerName, Arc<Entry>>,
    live: BTreeMap<Revision, Arc<Entry>>,
    retention: Retention,
}

impl Hub {
    /// A hub holding `latest` (live puts) and `tail` (the retained log, contiguous to `head`).
    pub fn new(
        epoch: Epoch,
        head: Revision,
        latest: Vec<Arc<Entry>>,
        tail: Vec<Arc<Entry>>,
        retention: Retention,
    ) -> Self {
        let state = HubState::build(epoch, head, latest, tail, retention);
        Self {
            state: RwLock::new(state),
            head: watch::Sender::new(head),
        }
    }

    /// Replaces the whole state (after a store reload); wakes every subscription, which
    /// notices a new epoch or a gap and starts over.
    pub fn replace(
        &self,
        epoch: Epoch,
        head: Revision,
        latest: Vec<Arc<Entry>>,
        tail: Vec<Arc<Entry>>,
    ) {
        let mut state = self.write();
        let retention = state.retention;
        *state = HubState::build(epoch, head, latest, tail, retention);
        drop(state);
        self.head.send_replace(head);
    }

    /// Appends durable changes that follow the head, in order, and wakes subscriptions.
    /// Returns `false` (appending nothing) if they do not follow the head.
    pub fn append(&self, entries: Vec<Arc<Entry>>) -> bool {
        let mut state = self.write();
        let follows = (state.head + 1..)
            .zip(&entries)
            .all(|(expected, entry)| entry.change.revision == expected);
        if !follows {
            return false;
        }
        for entry in entries {
            state.push(entry);
        }
        let head = state.head;
        drop(state);
        self.head.send_replace(head);
        true
    }

    /// A receiver that changes whenever the head moves or the state is replaced.
    pub fn watch_head(&self) -> watch::Receiver<Revision> {
        self.head.subscribe()
    }

    /// Read access to the state.
    pub fn read(&self) -> RwLockReadGuard<'_, HubState> {
        // The state is only mutated by whole-entry pushes and whole replacements, which
        // cannot panic halfway in a way that matters; a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HubState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl HubState {
    fn build(
        epoch: Epoch,
        head: Revision,
        latest: Vec<Arc<Entry>>,
        tail: Vec<Arc<Entry>>,
        retention: Retention,
    ) -> Self {
        let mut state = Self {
            epoch,
            head,
            log: VecDeque::new(),
            log_bytes: 0,
            latest: HashMap::new(),
            live: BTreeMap::new(),
            retention,
        };
        for entry in latest {
            state.live.insert(entry.change.revision, entry.clone());
            state.latest.insert(entry.change.worker.clone(), entry);
        }
        for entry in tail {
            state.log_bytes += entry.encoded.0.len();
            state.log.push_back(entry);
        }
        state.evict();
        state
    }

    fn push(&mut self, entry: Arc<Entry>) {
        self.head = entry.change.revision;
        let worker = &entry.change.worker;
        if let Some(previous) = self.latest.remove(worker) {
            self.live.remove(&previous.change.revision);
        }
        if entry.change.kind == ChangeKind::Put {
            self.live.insert(entry.change.revision, entry.clone());
            self.latest.insert(worker.clone(), entry.clone());
        }
        self.log_bytes += entry.encoded.0.len();
        self.log.push_back(entry);
        self.evict();
    }

    fn evict(&mut self) {
        while self.log.len() > self.retention.changes
            || (self.log_bytes > self.retention.bytes && self.log.len() > 1)
        {
            if let Some(old) = self.log.pop_front() {
                self.log_bytes -= old.encoded.0.len();
            }
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The revision of the last change.
    pub fn head(&self) -> Revision {
        self.head
    }

    /// The oldest revision still in the log (`head + 1` when the log is empty).
    pub fn first_retained(&self) -> Revision {
        self.log
            .front()
            .map_or(self.head + 1, |e| e.change.revision)
    }

    /// Whether a client at `revision` in `epoch` can be replayed from the log.
    pub fn can_resume(&self, epoch: &str, revision: Revision) -> bool {
        revision > 0
            && epoch == self.epoch.as_str()
            && revision <= self.head
            && revision + 1 >= self.first_retained()
    }

    /// Up to `max` entries after `cursor`, none past `until`.
    pub fn read_after(&self, epoch: &Epoch, cursor: Revision, until: Revision, max: usize) -> Read {
        if epoch != &self.epoch {
            return Read::OtherEpoch;
        }
        if cursor > self.head {
            return Read::Gone;
        }
        let until = until.min(self.head);
        if cursor >= until {
            return Read::Entries(Vec::new());
        }
        let first = self.first_retained();
        if cursor + 1 < first {
            return Read::Gone;
        }
        let start = usize::try_from(cursor + 1 - first).unwrap_or(usize::MAX);
        let count = usize::try_from(until - cursor)
            .unwrap_or(usize::MAX)
            .min(max);
        Read::Entries(self.log.range(start..start + count).cloned().collect())
    }

    /// The latest entry of every live worker passing `filter`, ascending by revision.
    pub fn snapshot(&self, filter: &WorkerFilter) -> Vec<Arc<Entry>> {
        match filter.names() {
            None => self
                .live
                .values()
                .filter(|e| filter.matches(&e.change.worker))
                .cloned()
                .collect(),
            Some(names) => {
                let mut entries: Vec<_> = names
                    .iter()
                    .filter_map(|n| self.latest.get(n))
                    .filter(|e| filter.matches(&e.change.worker))
                    .cloned()
                    .collect();
                entries.sort_by_key(|e| e.change.revision);
                entries
            }
        }
    }

    /// The latest entry of `worker`, if live.
    pub fn latest(&self, worker: &WorkerName) -> Option<&Arc<Entry>> {
        self.latest.get(worker)
    }

    /// A put of `version` of `worker` that is latest or still in the log.
    pub fn find_version(&self, worker: &WorkerName, version: &Version) -> Option<Arc<Entry>> {
        if let Some(entry) = self.latest.get(worker)
            && &entry.change.version == version
        {
            return Some(entry.clone());
        }
        self.log
            .iter()
            .rev()
            .find(|e| {
                e.change.kind == ChangeKind::Put
                    && &e.change.worker == worker
                    && &e.change.version == version
            })
            .cloned()
    }

    /// The change of `worker` at `revision`, if it is the worker's latest or still in the log.
    pub fn change_at(&self, worker: &WorkerName, revision: Revision) -> Option<&Change> {
        if let Some(entry) = self.latest.get(worker)
            && entry.change.revision == revision
        {
            return Some(&entry.change);
        }
        let index = usize::try_from(revision.checked_sub(self.first_retained())?).ok()?;
        self.log
            .get(index)
            .map(|entry| &entry.change)
            .filter(|change| &change.worker == worker)
    }

    /// How many live workers there are.
    pub fn live_workers(&self) -> usize {
        self.latest.len()
    }
}

/// Encodes a RESET or SYNCED marker (rare, so encoded per subscription).
pub fn marker(kind: UpdateKind, revision: Revision, epoch: &Epoch, now_ms: i64) -> EncodedUpdate {
    EncodedUpdate::encode(&WorkerUpdate {
        kind: kind as i32,
        revision,
        epoch: epoch.to_string(),
        timestamp: now_ms,
        ..WorkerUpdate::default()
    })
}
