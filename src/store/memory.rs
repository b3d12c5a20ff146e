//! The memory store: the state machine behind a mutex. For tests and throwaway runs; nothing
//! survives the process.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use super::claims::{Claims, unix_now};
use super::{ConsumerRecord, Outcome, Proposal, Recovered, StateMachine, Store, StoreError, Tail};
use crate::core::types::{Checksum, ConsumerId, Epoch, Revision};

/// A [`Store`] in memory.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    head: watch::Sender<Revision>,
}

struct Inner {
    machine: StateMachine,
    bundles: HashMap<Checksum, Bytes>,
    consumers: HashMap<ConsumerId, ConsumerRecord>,
    claims: Claims,
}

impl MemoryStore {
    /// An empty store with a fresh epoch, retaining the last `retain` changes.
    pub fn new(retain: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                machine: StateMachine::new(Epoch::generate(), retain),
                bundles: HashMap::new(),
                consumers: HashMap::new(),
                claims: Claims::default(),
            }),
            head: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the state half-changed: every mutation
        // is a single `commit` or `insert`. Keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn load(&self) -> Result<Recovered, StoreError> {
        Ok(self.lock().machine.recovered())
    }

    async fn put_bundle(&self, checksum: &Checksum, code: Bytes) -> Result<(), StoreError> {
        self.lock().bundles.entry(checksum.clone()).or_insert(code);
        Ok(())
    }

    async fn bundle(&self, checksum: &Checksum) -> Result<Option<Bytes>, StoreError> {
        Ok(self.lock().bundles.get(checksum).cloned())
    }

    async fn apply(&self, proposal: Proposal, timestamp_ms: i64) -> Result<Outcome, StoreError> {
        let mut inner = self.lock();
        let outcome = inner.machine.decide(&proposal, timestamp_ms);
        if let Outcome::Committed(change) = &outcome {
            inner
                .machine
                .commit(change.clone())
                .map_err(StoreError::Corrupt)?;
            self.head.send_replace(change.revision);
        }
        Ok(outcome)
    }

    async fn changes_after(&self, after: Revision, limit: usize) -> Result<Tail, StoreError> {
        Ok(self.lock().machine.changes_after(after, limit))
    }

    async fn head(&self) -> Result<(Epoch, Revision), StoreError> {
        let inner = self.lock();
        Ok((inner.machine.epoch().clone(), inner.machine.head()))
    }

    async fn claim_request(&self, key: &str, expires_unix_s: i64) -> Result<bool, StoreError> {
        Ok(self.lock().claims.claim(key, expires_unix_s, unix_now()))
    }

    fn head_hint(&self) -> watch::Receiver<Revision> {
        self.head.subscribe()
    }

    async fn save_consumer(&self, record: &ConsumerRecord) -> Result<(), StoreError> {
        self.lock()
            .consumers
            .entry(record.id.clone())
            .and_modify(|existing| existing.absorb(record))
            .or_insert_with(|| record.clone());
        Ok(())
    }

    async fn remove_consumer(&self, id: &ConsumerId) -> Result<bool, StoreError> {
        Ok(self.lock().consumers.remove(id).is_some())
    }

    async fn consumers(&self) -> Result<Vec<ConsumerRecord>, StoreError> {
        let mut all: Vec<_> = self.lock().consumers.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }
}
