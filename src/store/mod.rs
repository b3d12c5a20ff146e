//! Durable state behind the core: the one revision order, the latest version of every worker,
//! a retained log of recent changes, bundles by checksum, the epoch and the consumer registry.
//!
//! [`Store`] is the only way the core touches durable state. Implementations: [`MemoryStore`]
//! (tests), [`FileStore`] (embedded, the default) and [`RedisStore`] (several cores as one).
//! The immutability rules live in one place per engine: [`StateMachine`] for the in-process
//! stores, a Lua script for Redis; the conformance suite holds them all to the same behaviour.
//!
//! Depends on `core::types` only; knows nothing of transports.

mod claims;
pub mod conformance;
mod file;
mod fleet;
mod memory;
mod redis;
mod state;

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::redis::{RedisConfig, RedisStore};
pub use file::{FileStore, FileStoreConfig};
pub use fleet::{
    CoreView, DEAD_AFTER, Fleet, HEARTBEAT, Heard, News, RedisFleet, RedisFleetConfig,
};
pub use memory::MemoryStore;
pub use state::StateMachine;

use crate::core::types::{Checksum, ConsumerId, Epoch, Revision, Version, WorkerName};

/// What an accepted change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// A version became the worker's latest.
    Put,
    /// The worker was removed; `version` is the version it removed.
    Delete,
}

/// One accepted, durable change: the unit of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its place in the global order.
    pub revision: Revision,
    /// Put or delete.
    pub kind: ChangeKind,
    /// The worker.
    pub worker: WorkerName,
    /// The version put, or the version a delete removed.
    pub version: Version,
    /// Checksum of that version's code.
    pub checksum: Checksum,
    /// Size of that version's code in bytes.
    pub size: u64,
    /// Unix milliseconds when the core accepted it.
    pub timestamp_ms: i64,
    /// Who asked for it: the deploy token's name as the hook request said (empty: not said).
    /// Records written before deployers were kept read back empty.
    #[serde(default)]
    pub deployer: Arc<str>,
}

/// A change asked of the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// Make `version` (whose bundle is already stored) the worker's latest.
    Put {
        /// The worker.
        worker: WorkerName,
        /// The version.
        version: Version,
        /// Checksum of the code, already verified.
        checksum: Checksum,
        /// Size of the code.
        size: u64,
        /// Who asked (empty: not said).
        deployer: Arc<str>,
    },
    /// Remove the worker.
    Delete {
        /// The worker.
        worker: WorkerName,
        /// Who asked (empty: not said).
        deployer: Arc<str>,
    },
}

/// What the store did with a [`Proposal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A new durable change with the next revision.
    Committed(Change),
    /// The same version with the same code is already the worker's latest: nothing changed;
    /// this is the change that made it latest.
    Unchanged(Change),
    /// The version was published before with other code.
    Conflict {
        /// The checksum it has.
        existing: Checksum,
    },
    /// Delete of a worker with no live version.
    NotFound,
}

/// The durable state as a whole, read at start-up or after losing track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The epoch.
    pub epoch: Epoch,
    /// The revision of the last change (0 if none).
    pub head: Revision,
    /// The put that made each live worker's latest version, in ascending revision.
    pub latest: Vec<Change>,
    /// The retained log: contiguous revisions ending at `head`, ascending.
    pub tail: Vec<Change>,
}

/// Changes after a revision, read from durable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Up to the asked number of changes, contiguous from `after + 1`, all in `epoch`.
    Changes {
        /// The store's epoch.
        epoch: Epoch,
        /// The changes, ascending (empty when `after` is the head).
        changes: Vec<Change>,
    },
    /// `after + 1` is no longer retained, or `after` is beyond the head: reload the state.
    Gone {
        /// The store's epoch.
        epoch: Epoch,
    },
}

/// A consumer as the registry remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    /// The full consumer id.
    pub id: ConsumerId,
    /// What it said in `RegisterConsumer` (empty if it never registered).
    pub endpoint: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// `grpc` or `quic`: the transport it was last seen on.
    pub transport: String,
    /// Unix ms, first seen.
    pub first_seen_ms: i64,
    /// Unix ms, last seen (registration, subscription or ack).
    pub last_seen_ms: i64,
    /// The highest revision it acknowledged as applied.
    pub last_acked_revision: Revision,
}

impl ConsumerRecord {
    /// Folds a newer save of the same consumer in: the earliest first-seen, the latest
    /// last-seen and the highest acknowledged revision win; endpoint and labels change only
    /// with a save that carries a registration (an ack-only save has neither), and the
    /// transport only with a save that names one. Every store merges saves this way, so an ack
    /// never undoes a registration and a stale save never lowers an acknowledged revision.
    pub fn absorb(&mut self, newer: &ConsumerRecord) {
        self.first_seen_ms = self.first_seen_ms.min(newer.first_seen_ms);
        self.last_seen_ms = self.last_seen_ms.max(newer.last_seen_ms);
        self.last_acked_revision = self.last_acked_revision.max(newer.last_acked_revision);
        if !newer.endpoint.is_empty() || !newer.labels.is_empty() {
            self.endpoint.clone_from(&newer.endpoint);
            self.labels.clone_from(&newer.labels);
        }
        if !newer.transport.is_empty() {
            self.transport.clone_from(&newer.transport);
        }
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Temporarily out of reach (Redis down, store failed and fenced). The change is not
    /// known to be durable; if the store went away mid-answer it may still have been
    /// committed, so a client retries a put (versions are immutable: the retry answers with
    /// the revision it got) and reads before retrying a delete.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The durable state does not decode or breaks an invariant.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The store lost history this store handle had seen: it is empty, or its head went
    /// back (a Redis flushed, restarted without persistence, or failed over to a replica that
    /// lacked the last writes). Nothing was changed; the core re-seeds the store from the
    /// state it holds ([`Store::reseed`]) and tries again.
    #[error("history lost: {0}")]
    HistoryLost(String),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What [`Store::reseed`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reseeded {
    /// This call seeded a new epoch with the given changes (revisions `1..=head`).
    Seeded {
        /// The new epoch.
        epoch: Epoch,
        /// Its head: the number of workers seeded.
        head: Revision,
    },
    /// The store has a history this caller did not lose (another core re-seeded it first,
    /// or nothing was lost): nothing changed; reload.
    NotLost,
}

/// Durable state. Every method is safe to call concurrently; `apply` calls are serialised
/// into one revision order by the store (and, for Redis, across every core).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads the whole durable state (creating an empty one with a fresh epoch if none).
    async fn load(&self) -> Result<Recovered, StoreError>;

    /// Stores a bundle under its checksum, durably; idempotent. Called before the change
    /// that refers to it is proposed.
    async fn put_bundle(&self, checksum: &Checksum, code: Bytes) -> Result<(), StoreError>;

    /// A stored bundle.
    async fn bundle(&self, checksum: &Checksum) -> Result<Option<Bytes>, StoreError>;

    /// Decides and, if it is a change, durably commits `proposal` with the next revision. The
    /// change is visible to [`Store::changes_after`] only once durable.
    async fn apply(&self, proposal: Proposal, timestamp_ms: i64) -> Result<Outcome, StoreError>;

    /// Up to `limit` durable changes after `after`.
    async fn changes_after(&self, after: Revision, limit: usize) -> Result<Tail, StoreError>;

    /// A hint of the newest head this store knows of: it changes when a change may have been
    /// committed (here or, for a shared store, by another core). A missed hint costs latency,
    /// never a change: the core also polls.
    fn head_hint(&self) -> watch::Receiver<Revision>;

    /// Creates a consumer's registry entry, or merges `record` into it as
    /// [`ConsumerRecord::absorb`] does.
    async fn save_consumer(&self, record: &ConsumerRecord) -> Result<(), StoreError>;

    /// Every consumer the registry knows.
    async fn consumers(&self) -> Result<Vec<ConsumerRecord>, StoreError>;

    /// The epoch and head of the durable state now: one cheap read. A subscription's first
    /// SYNCED covers at least this head, so that it covers every change acknowledged (by any
    /// core) before the subscription started.
    async fn head(&self) -> Result<(Epoch, Revision), StoreError>;

    /// Claims a signed hook request, durably and for the whole fleet, until `expires_unix_s`:
    /// `true` the first time, `false` for a replay. Checked before the request is applied, so
    /// that a request is applied at most once across cores and restarts.
    async fn claim_request(&self, key: &str, expires_unix_s: i64) -> Result<bool, StoreError>;

    /// After [`StoreError::HistoryLost`]: starts a new epoch holding `latest` (the put that
    /// made each live worker's version latest, as the caller held them, bundles already
    /// stored), renumbered `1..=n` in this order, atomically and only if the history is still
    /// lost, so that of several cores noticing at once exactly one seeds. Stores that cannot
    /// lose history under a running core answer [`Reseeded::NotLost`].
    async fn reseed(&self, latest: &[Change], timestamp_ms: i64) -> Result<Reseeded, StoreError> {
        let _ = (latest, timestamp_ms);
        Ok(Reseeded::NotLost)
    }
    /// Removes a consumer's registry entry (deregistration); answers whether there was one.
    async fn remove_consumer(&self, id: &ConsumerId) -> Result<bool, StoreError>;

    /// Flushes what is buffered and stops background work (shutdown). Nothing committed is
    /// ever buffered: this concerns the consumer registry only.
    async fn close(&self) {}
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        super::conformance::run_all(|| async { super::MemoryStore::new(1000) }).await;
    }

    #[test]
    fn a_change_recorded_before_deployers_were_kept_loads_with_none() {
        let old = r#"{"revision":3,"kind":"put","worker":"a","version":"1",
            "checksum":"ab","size":2,"timestamp_ms":5}"#;
        let change: super::Change = serde_json::from_str(old).unwrap();
        assert_eq!((change.revision, &*change.deployer), (3, ""));
        let mut kept = change.clone();
        kept.deployer = "team-shop".into();
        let again: super::Change =
            serde_json::from_slice(&serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_eq!(again, kept);
    }
}
