//! The fleet link: what the cores sharing one store tell each other so that propagation
//! (`?wait`, `/v1/workers`, `/v1/consumers`, the status page) is the fleet's, not one core's.
//!
//! Each core keeps a heartbeat and, per worker, an aggregate of its own subscribers (counts for
//! the worker's latest revision, written when they change, coalesced), so that the store traffic
//! of one deploy grows with the number of cores, not of hosts. Per-host detail (who acked, who
//! is pending, who failed and why) stays in each core and is read from the cores on demand
//! ([`Fleet::ask`]). A signal channel wakes waiters as soon as an aggregate changes.
//!
//! Payloads (aggregates, questions, answers) are opaque JSON text here: the core decides what
//! they hold. Implementations: [`RedisFleet`]. A core without a fleet (the embedded store) does
//! none of this, and pays nothing for it.
//!
//! Depends on `store` and `core::types` only.

mod redis;

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch};

pub use self::redis::{RedisFleet, RedisFleetConfig};
use super::StoreError;
use crate::core::types::{ConsumerId, WorkerName};

/// How often a core says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A core whose heartbeat is older than this is taken for dead: its last aggregates still
/// count (its consumers as pending) until it is forgotten.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);

/// What a core hears from the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    /// Another core asks a question; answer it with [`Fleet::answer`] and this id.
    Asked {
        /// The question's id.
        id: String,
        /// The question (JSON).
        question: String,
    },
    /// News about a consumer from another core.
    News(News),
}

/// A consumer's change of place or standing, told to every other core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum News {
    /// It subscribed on the telling core, which now tracks it: others forget its departure.
    Subscribed(ConsumerId),
    /// It registered: it counts until it deregisters, on every core that served it.
    Registered(ConsumerId),
    /// It deregistered (or an operator removed it): every core forgets it.
    Deregistered(ConsumerId),
}

/// Another core as the shared store knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoreView {
    /// Its id.
    pub core: String,
    /// Whether its heartbeat is recent (see [`DEAD_AFTER`]).
    pub alive: bool,
    /// Its aggregate (JSON) for each worker asked about, in the order asked.
    pub aggregates: Vec<Option<String>>,
    /// For each worker asked about: how many of its consumers subscribed on another core
    /// after it died (see [`Fleet::arrived`]), to take off its pending ones.
    pub moved: Vec<u64>,
}

/// The fleet link of one core; see the module docs.
#[async_trait]
pub trait Fleet: Send + Sync + 'static {
    /// This core's id.
    fn core_id(&self) -> &str;

    /// Changes whenever another core's aggregates may have changed (a wake-up; also changes
    /// when the signal channel comes back after a loss). Values are opaque.
    fn changed(&self) -> watch::Receiver<u64>;

    /// What the other cores say: questions and news. Handed out once.
    fn heard(&self) -> Option<mpsc::Receiver<Heard>>;

    /// Writes this core's aggregates of `workers` (`None`: it has none for that worker any
    /// more) and wakes the other cores.
    async fn publish(&self, aggregates: &[(WorkerName, Option<String>)]) -> Result<(), StoreError>;

    /// Every other core not yet forgotten, with its aggregates of `workers`.
    async fn views(&self, workers: &[WorkerName]) -> Result<Vec<CoreView>, StoreError>;

    /// Asks every other live core `question` (JSON); the answers that came within `within`,
    /// by core.
    async fn ask(
        &self,
        question: &str,
        within: Duration,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Answers question `id`.
    async fn answer(&self, id: &str, answer: &str) -> Result<(), StoreError>;

    /// Tells every other core `news`.
    async fn tell(&self, news: &News) -> Result<(), StoreError>;

    /// Records that `consumer` subscribed here (to `workers`; `None`: every worker): the core
    /// that served it before counts it as moved until that core writes its aggregates again,
    /// so a core that died meanwhile stops counting it as pending. One write per subscription.
    async fn arrived(
        &self,
        consumer: &ConsumerId,
        workers: Option<&[WorkerName]>,
    ) -> Result<(), StoreError>;

    /// Leaves the fleet (shutdown): this core's heartbeat and aggregates go at once, so its
    /// consumers stop counting here once they resume elsewhere.
    async fn leave(&self);
}
