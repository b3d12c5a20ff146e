//! The recording [`Handler`]: applies what a consumer receives to an in-memory state, like an
//! edge host would, and logs every event in the order it saw them, for [`super::check`].
//! It can be paused (a slow consumer that stops reading: while `put` waits, the client reads
//! nothing more from its stream).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::{
    client::{ClientError, Handler, Position},
    pb::WorkerUpdate,
};

/// One thing a consumer saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A subscription started on a new connection: a new stream.
    Connected {
        /// `grpc` or `quic`.
        transport: &'static str,
    },
    /// The connection ended; the client retries.
    Disconnected {
        /// Why.
        error: String,
    },
    /// RESET: a snapshot follows.
    Reset {
        /// Its epoch.
        epoch: String,
    },
    /// A PUT, applied.
    Put {
        /// Its revision.
        revision: u64,
        /// Its epoch.
        epoch: String,
        /// The worker.
        worker: String,
        /// The version.
        version: String,
        /// The checksum of the (verified) code.
        checksum: String,
    },
    /// A DELETE, applied.
    Delete {
        /// Its revision.
        revision: u64,
        /// Its epoch.
        epoch: String,
        /// The worker.
        worker: String,
        /// The version it removed.
        version: String,
    },
    /// SYNCED.
    Synced {
        /// Its revision.
        revision: u64,
        /// Its epoch.
        epoch: String,
        /// Whether it ended a RESET's snapshot.
        ends_snapshot: bool,
    },
}

/// What one consumer holds and saw.
#[derive(Clone, Debug, Default)]
pub struct ConsumerLog {
    /// Every event, in order.
    pub events: Vec<Event>,
    /// The workers it holds now: name → (version, checksum).
    pub state: BTreeMap<String, (String, String)>,
    /// The position the client last reported (what it would persist and resume from).
    pub position: Option<Position>,
    /// The highest revision of any update it received.
    pub max_revision: u64,
}

/// A shared handle on a consumer's log.
pub type SharedLog = Arc<Mutex<ConsumerLog>>;

/// Locks a consumer's log.
pub fn lock(log: &SharedLog) -> MutexGuard<'_, ConsumerLog> {
    // Every change under the lock is a whole push or insert: a poisoned log is consistent.
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Pauses a [`Recorder`]: while paused, it applies nothing and so the client reads nothing.
#[derive(Clone, Debug)]
pub struct Pause(watch::Sender<bool>);

impl Default for Pause {
    fn default() -> Self {
        Self(watch::Sender::new(false))
    }
}

impl Pause {
    /// Stops (`true`) or resumes (`false`) applying.
    pub fn set(&self, paused: bool) {
        self.0.send_replace(paused);
    }

    /// Returns once not paused.
    pub async fn released(&self) {
        let mut paused = self.0.subscribe();
        // The sender lives in `self`: `wait_for` cannot fail while we hold it.
        let _ = paused.wait_for(|paused| !paused).await;
    }
}

/// The recording handler; see the module docs.
pub struct Recorder {
    log: SharedLog,
    pause: Pause,
}

impl Recorder {
    /// A recorder logging into `log`, paused through `pause`.
    pub fn new(log: SharedLog, pause: Pause) -> Self {
        Self { log, pause }
    }

    fn record(&self, update: &WorkerUpdate, event: Event) -> MutexGuard<'_, ConsumerLog> {
        let mut log = lock(&self.log);
        log.max_revision = log.max_revision.max(update.revision);
        log.events.push(event);
        log
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn put(&mut self, update: &WorkerUpdate, _code: Bytes) -> Result<(), String> {
        self.pause.released().await;
        let mut log = self.record(
            update,
            Event::Put {
                revision: update.revision,
                epoch: update.epoch.clone(),
                worker: update.worker_name.clone(),
                version: update.version.clone(),
                checksum: update.checksum.clone(),
            },
        );
        log.state.insert(
            update.worker_name.clone(),
            (update.version.clone(), update.checksum.clone()),
        );
        Ok(())
    }

    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String> {
        self.pause.released().await;
        let mut log = self.record(
            update,
            Event::Delete {
                revision: update.revision,
                epoch: update.epoch.clone(),
                worker: update.worker_name.clone(),
                version: update.version.clone(),
            },
        );
        log.state.remove(&update.worker_name);
        Ok(())
    }

    async fn reset(&mut self, update: &WorkerUpdate) {
        drop(self.record(
            update,
            Event::Reset {
                epoch: update.epoch.clone(),
            },
        ));
    }

    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>) {
        let mut log = self.record(
            update,
            Event::Synced {
                revision: update.revision,
                epoch: update.epoch.clone(),
                ends_snapshot: snapshot.is_some(),
            },
        );
        if let Some(names) = snapshot {
            log.state.retain(|name, _| names.contains(name));
        }
    }

    async fn position(&mut self, position: &Position) {
        lock(&self.log).position = Some(position.clone());
    }

    fn connected(&mut self, transport: &str) {
        let transport = if transport == "quic" { "quic" } else { "grpc" };
        lock(&self.log).events.push(Event::Connected { transport });
    }

    fn disconnected(&mut self, error: &ClientError, _retry_in: Duration) {
        lock(&self.log).events.push(Event::Disconnected {
            error: error.to_string(),
        });
    }
}
