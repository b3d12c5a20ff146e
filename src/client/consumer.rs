//! The consumer loop: subscribe, validate, verify, apply through a [`Handler`], acknowledge,
//! and on any disconnect reconnect with jittered exponential backoff and resume.
//!
//! One change never stalls the feed: a PUT whose bundle cannot be fetched or verified is nacked
//! and skipped, and fetched again in the background until it works (then applied and acked) or
//! a newer change of its worker supersedes it. The position moves only past changes applied or
//! nacked; the backoff starts over only after a session that moved the position.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ClientError, DEFAULT_MAX_CODE_BYTES, Session, Transport, validate, verify};
use crate::pb::{
    AckRequest, FetchWorkerRequest, RegisterRequest, SubscribeRequest, UpdateKind, WorkerUpdate,
};

/// Where a consumer is in the server's history: resume from here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The epoch of the last update.
    pub epoch: String,
    /// The last revision held.
    pub revision: u64,
}

/// Reconnection delays: a cap that starts at `initial` and doubles up to `max` after each
/// failed attempt, with each delay drawn between half the cap and the cap.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The first cap.
    pub initial: Duration,
    /// The largest cap.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// What a consumer asks for.
#[derive(Clone, Debug)]
pub struct ConsumerOptions {
    /// Empty means the certificate identity.
    pub consumer_id: String,
    /// Empty means every worker.
    pub workers: Vec<String>,
    /// Reconnection delays.
    pub backoff: Backoff,
    /// Acknowledge each applied change (and report failures).
    pub ack: bool,
    /// Register with this endpoint on every connection, if set.
    pub endpoint: Option<String>,
    /// Labels sent with the registration (registering when any are set, endpoint or not).
    pub labels: BTreeMap<String, String>,
    /// The largest bundle taken; a larger announced size is refused without fetching.
    pub max_code_bytes: u64,
    /// Delays between background fetches of a bundle that could not be fetched or verified.
    pub fetch_retry: Backoff,
    /// How long one fetch may take before it counts as failed (and is retried later).
    pub fetch_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            consumer_id: String::new(),
            workers: Vec::new(),
            backoff: Backoff::default(),
            ack: false,
            endpoint: None,
            labels: BTreeMap::new(),
            max_code_bytes: DEFAULT_MAX_CODE_BYTES,
            fetch_retry: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            fetch_timeout: Duration::from_secs(120),
        }
    }
}

/// A change the consumer nacked before it reached [`Handler::put`] or [`Handler::delete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as sent to the server with the nack.
    pub reason: String,
    /// Whether its bundle is fetched again in the background (and applied when that works).
    pub retrying: bool,
}

/// Applies what the consumer receives. Code handed to [`Handler::put`] is verified, and every
/// string of an update handed to the handler is valid ([`super::validate`]).
#[async_trait]
pub trait Handler: Send {
    /// Make `code` the worker's current version. An `Err` is reported to the server as a
    /// failure to apply, with the reason.
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String>;
    /// Whether this PUT's version, with its checksum, is the worker's current one already (a
    /// snapshot after a RESET sends it again): then it is acked as applied without being
    /// fetched or handed to [`Handler::put`].
    async fn holds(&mut self, _update: &WorkerUpdate) -> bool {
        false
    }
    /// Remove the worker.
    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String>;
    /// A RESET: a snapshot follows, ended by SYNCED.
    async fn reset(&mut self, _update: &WorkerUpdate) {}
    /// SYNCED: everything up to its revision is held. When it ends a RESET, `snapshot` names
    /// the workers the snapshot held: every other worker must go.
    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>);
    /// A change refused before applying (invalid, too large, not fetched, not verified), and
    /// nacked. Its strings may be anything the server sent: escape them before printing.
    fn refused(&mut self, _update: &WorkerUpdate, _refusal: &Refusal) {}
    /// The position to persist, so that a restart resumes.
    async fn position(&mut self, _position: &Position) {}
    /// A connection was established.
    fn connected(&mut self, _transport: &str) {}
    /// A connection ended; the next attempt is in `retry_in`.
    fn disconnected(&mut self, _error: &ClientError, _retry_in: Duration) {}
}

/// A consumer of one transport; see the module docs.
pub struct Consumer<T> {
    transport: T,
    options: ConsumerOptions,
    position: Option<Position>,
    acks: Arc<PendingAcks>,
    /// PUTs nacked because their bundle could not be fetched or verified, by worker: fetched
    /// again in the background until it works or a newer change of the worker supersedes them.
    unfetched: BTreeMap<String, WorkerUpdate>,
}

/// Background fetches of `unfetched` bundles, and where their results arrive.
struct Refetches {
    tasks: BTreeMap<String, AbortOnDrop>,
    done: mpsc::Sender<(WorkerUpdate, Bytes)>,
}

impl<T: Transport> Consumer<T> {
    /// A consumer starting at `position` (from a previous run), or fresh.
    pub fn new(transport: T, options: ConsumerOptions, position: Option<Position>) -> Self {
        Self {
            transport,
            options,
            position,
            acks: Arc::new(PendingAcks::default()),
            unfetched: BTreeMap::new(),
        }
    }

    /// Deregisters the consumer (on a fresh connection): it stops counting among the workers'
    /// subscribers, on every core, once it has no live subscription.
    pub async fn deregister(&self) -> Result<crate::pb::DeregisterResponse, ClientError> {
        let session = self.transport.connect().await?;
        session
            .deregister(crate::pb::DeregisterRequest {
                consumer_id: self.options.consumer_id.clone(),
            })
            .await
    }

    /// The last position held.
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// Closes the transport's connections, so that the server sees this consumer leave at
    /// once (QUIC otherwise waits for its idle timeout). The consumer cannot connect after.
    pub async fn close(self) {
        self.transport.close().await;
    }

    /// Runs until `shutdown` (`Ok`) or a refusal that retrying cannot fix (`Err`). It may run
    /// again after (it resumes from where it was).
    pub async fn run(
        &mut self,
        handler: &mut dyn Handler,
        shutdown: CancellationToken,
    ) -> Result<(), ClientError> {
        let shutdown = &shutdown;
        let mut cap = self.options.backoff.initial;
        loop {
            let before = self.position.clone();
            let started = tokio::time::Instant::now();
            let result = self.session(handler, shutdown).await;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let error = match result {
                Ok(()) => ClientError::Transport("stream ended".to_owned()),
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => error,
            };
            // Progress is a position beyond the one the session started from (a RESET that
            // leads back to the same place is none), or a session that lived long.
            let moved = self.position.is_some() && self.position != before;
            if moved || started.elapsed() >= self.options.backoff.max {
                cap = self.options.backoff.initial;
            }
            let delay = jitter(cap);
            cap = (cap * 2).min(self.options.backoff.max);
            handler.disconnected(&error, delay);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// One connection: connect, subscribe, apply until it ends.
    async fn session(
        &mut self,
        handler: &mut dyn Handler,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let connect = self.transport.connect();
        let session: Arc<dyn Session> = tokio::select! {
            session = connect => Arc::from(session?),
            () = shutdown.cancelled() => return Ok(()),
        };
        if self.options.endpoint.is_some() || !self.options.labels.is_empty() {
            session
                .register(RegisterRequest {
                    consumer_id: self.options.consumer_id.clone(),
                    endpoint: self.options.endpoint.clone().unwrap_or_default(),
                    labels: self.options.labels.clone().into_iter().collect(),
                })
                .await?;
        }
        let request = SubscribeRequest {
            consumer_id: self.options.consumer_id.clone(),
            worker_names: self.options.workers.clone(),
            resume_revision: self.position.as_ref().map_or(0, |p| p.revision),
            epoch: self
                .position
                .as_ref()
                .map(|p| p.epoch.clone())
                .unwrap_or_default(),
        };
        let mut stream = tokio::select! {
            stream = session.subscribe(request) => stream?,
            () = shutdown.cancelled() => return Ok(()),
        };
        handler.connected(self.transport.name());
        let _acker = self
            .options
            .ack
            .then(|| AbortOnDrop(tokio::spawn(send_acks(session.clone(), self.acks.clone()))));
        let (done, mut fetched) = mpsc::channel(16);
        let mut refetches = Refetches {
            tasks: BTreeMap::new(),
            done,
        };
        for update in self.unfetched.values() {
            self.refetch(&mut refetches, &session, update.clone());
        }
        let mut snapshot: Option<BTreeSet<String>> = None;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                Some((update, code)) = fetched.recv() => {
                    self.refetched(handler, &mut refetches, update, code).await;
                    continue;
                }
                () = shutdown.cancelled() => {
                    // Stopping cleanly: report what was applied before letting go.
                    self.acks.drained(ACK_FLUSH).await;
                    return Ok(());
                }
            };
            let Some(update) = next else { break };
            let update = update.map_err(|error| match error {
                // A live subscription refused: the identity's rights changed. Subscribing
                // again applies the new ones; a refusal then is final.
                ClientError::Status { code: 7, message } => {
                    ClientError::Transport(format!("subscription ended: {message}"))
                }
                other => other,
            })?;
            let kind = UpdateKind::try_from(update.kind).unwrap_or(UpdateKind::Unspecified);
            let valid = validate(&update, self.options.max_code_bytes);
            if let (Err(reason), UpdateKind::Reset | UpdateKind::Synced) = (&valid, kind) {
                // Nothing to nack: the position stays where it was, and the next session
                // starts from it.
                return Err(ClientError::Verification(format!(
                    "from the server: {reason}"
                )));
            }
            if matches!(kind, UpdateKind::Put | UpdateKind::Delete) {
                // A newer change of the worker supersedes a bundle still being fetched again.
                self.unfetched.remove(&update.worker_name);
                refetches.tasks.remove(&update.worker_name);
            }
            let applied = match (kind, valid) {
                (UpdateKind::Put | UpdateKind::Delete, Err(reason)) => {
                    handler.refused(
                        &update,
                        &Refusal {
                            reason: reason.clone(),
                            retrying: false,
                        },
                    );
                    Err(reason)
                }
                (UpdateKind::Reset, _) => {
                    // Until the SYNCED that ends the snapshot, there is no position to resume
                    // from: a disconnect now must start over. The snapshot sends every worker
                    // again, those still being fetched again included.
                    self.position = None;
                    self.unfetched.clear();
                    refetches.tasks.clear();
                    snapshot = Some(BTreeSet::new());
                    handler.reset(&update).await;
                    continue;
                }
                (UpdateKind::Synced, _) => {
                    handler.synced(&update, snapshot.as_ref()).await;
                    snapshot = None;
                    self.advance(handler, &update).await;
                    continue;
                }
                (UpdateKind::Put, Ok(())) => {
                    if let Some(names) = &mut snapshot {
                        names.insert(update.worker_name.clone());
                    }
                    if handler.holds(&update).await {
                        Ok(())
                    } else {
                        let timeout = self.options.fetch_timeout;
                        match verified_code(&*session, &update, timeout, false).await {
                            Ok(code) => handler.put(&update, code).await,
                            Err(error) => {
                                let reason = error.to_string();
                                handler.refused(
                                    &update,
                                    &Refusal {
                                        reason: reason.clone(),
                                        retrying: true,
                                    },
                                );
                                self.unfetched
                                    .insert(update.worker_name.clone(), update.clone());
                                self.refetch(&mut refetches, &session, update.clone());
                                Err(reason)
                            }
                        }
                    }
                }
                (UpdateKind::Delete, Ok(())) => handler.delete(&update).await,
                (UpdateKind::Unspecified, _) => continue,
            };
            self.report(&update, &applied);
            if snapshot.is_none() {
                self.advance(handler, &update).await;
            }
        }
        Ok(())
    }

    /// Starts fetching `update`'s bundle again in the background, with backoff.
    fn refetch(&self, refetches: &mut Refetches, session: &Arc<dyn Session>, update: WorkerUpdate) {
        let session = session.clone();
        let done = refetches.done.clone();
        let backoff = self.options.fetch_retry;
        let timeout = self.options.fetch_timeout;
        let worker = update.worker_name.clone();
        let task = tokio::spawn(async move {
            let mut cap = backoff.initial;
            loop {
                tokio::time::sleep(jitter(cap)).await;
                cap = (cap * 2).min(backoff.max);
                match verified_code(&*session, &update, timeout, true).await {
                    Ok(code) => {
                        let _ = done.send((update, code)).await;
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(worker = %update.worker_name, %error, "fetch failed again");
                    }
                }
            }
        });
        refetches.tasks.insert(worker, AbortOnDrop(task));
    }

    /// A bundle fetched again came through: applied (and acked) unless superseded meanwhile.
    async fn refetched(
        &mut self,
        handler: &mut dyn Handler,
        refetches: &mut Refetches,
        update: WorkerUpdate,
        code: Bytes,
    ) {
        let current = self.unfetched.get(&update.worker_name);
        if current.map(|u| u.revision) != Some(update.revision) {
            return;
        }
        self.unfetched.remove(&update.worker_name);
        refetches.tasks.remove(&update.worker_name);
        let applied = handler.put(&update, code).await;
        self.report(&update, &applied);
    }

    /// Queues the ack (applied, or the reason it was not) of a change.
    fn report(&self, update: &WorkerUpdate, applied: &Result<(), String>) {
        if !self.options.ack {
            return;
        }
        let (applied, error) = match applied {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason.clone()),
        };
        self.acks.push(AckRequest {
            consumer_id: self.options.consumer_id.clone(),
            worker_name: update.worker_name.clone(),
            revision: update.revision,
            applied,
            error,
        });
    }

    async fn advance(&mut self, handler: &mut dyn Handler, update: &WorkerUpdate) {
        let position = Position {
            epoch: update.epoch.clone(),
            revision: update.revision,
        };
        handler.position(&position).await;
        self.position = Some(position);
    }
}

/// The verified code of a PUT: inline (unless `always_fetch`), or fetched within `timeout`.
async fn verified_code(
    session: &dyn Session,
    update: &WorkerUpdate,
    timeout: Duration,
    always_fetch: bool,
) -> Result<Bytes, ClientError> {
    let inline = !update.worker_code.is_empty() || update.size == 0;
    let code = if inline && !always_fetch {
        update.worker_code.clone()
    } else {
        let fetch = session.fetch(FetchWorkerRequest {
            worker_name: update.worker_name.clone(),
            version: update.version.clone(),
        });
        let (checksum, code) = tokio::time::timeout(timeout, fetch)
            .await
            .map_err(|_| ClientError::Transport(format!("fetch not done within {timeout:?}")))??;
        if !checksum.eq_ignore_ascii_case(&update.checksum) {
            return Err(ClientError::Verification(format!(
                "fetched checksum {:?} instead of {}",
                checksum.chars().take(64).collect::<String>(),
                update.checksum
            )));
        }
        code
    };
    verify(&code, &update.checksum, update.size)?;
    Ok(code)
}

/// How long a consumer told to stop waits for its pending acks to go out.
const ACK_FLUSH: Duration = Duration::from_secs(2);

/// Acks not yet sent: the latest per worker (a later ack supersedes an earlier one), kept
/// across reconnects so that what was applied while a connection died is still reported.
#[derive(Default)]
struct PendingAcks {
    latest: std::sync::Mutex<std::collections::BTreeMap<String, AckRequest>>,
    ready: tokio::sync::Notify,
    emptied: tokio::sync::Notify,
}

impl PendingAcks {
    fn push(&self, ack: AckRequest) {
        self.lock().insert(ack.worker_name.clone(), ack);
        self.ready.notify_one();
    }

    /// Waits until every pending ack is sent, or `within` passes.
    async fn drained(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let emptied = self.emptied.notified();
            if self.lock().is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, AckRequest>> {
        // Only whole inserts and removes happen under the lock.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long the acker waits after the first ack of a quiet spell, so that the acks ready
/// together go out as one batch.
const ACK_LINGER: Duration = Duration::from_millis(2);

/// Sends pending acks in the background so that applying never waits on a round trip: every
/// ack pending goes in one batch on the session's ack stream (one message, one answer), and
/// what is acked meanwhile goes in the next. An ack leaves the queue once its batch was
/// answered, or a newer one for its worker replaced it. A batch the server refuses (its store
/// briefly away, a worker no longer allowed) is sent again ack by ack, so that one refused ack
/// does not take the others with it; a refused one is dropped, a later ack covers it. A broken
/// connection ends the acker and keeps the acks for the next.
async fn send_acks(session: Arc<dyn Session>, pending: Arc<PendingAcks>) {
    loop {
        let batch: Vec<AckRequest> = pending
            .lock()
            .values()
            .take(crate::pb::MAX_ACKS_PER_BATCH)
            .cloned()
            .collect();
        if batch.is_empty() {
            pending.ready.notified().await;
            tokio::time::sleep(ACK_LINGER).await;
            continue;
        }
        match session.ack_batch(batch.clone()).await {
            Ok(()) => {}
            Err(error @ ClientError::Status { .. }) => {
                tracing::debug!(%error, acks = batch.len(), "ack batch refused; sending its acks one by one");
                for ack in &batch {
                    match session.ack(ack.clone()).await {
                        Ok(()) => {}
                        Err(error @ ClientError::Status { .. }) => {
                            tracing::debug!(%error, "ack refused; going on with the next");
                        }
                        Err(error) => {
                            tracing::debug!(%error, "ack not delivered; kept for the next connection");
                            return;
                        }
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "acks not delivered; kept for the next connection");
                return;
            }
        }
        let mut latest = pending.lock();
        for ack in &batch {
            if latest.get(&ack.worker_name) == Some(ack) {
                latest.remove(&ack.worker_name);
            }
        }
        if latest.is_empty() {
            pending.emptied.notify_waiters();
        }
    }
}

/// Aborts a task when its session ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A random delay between half of `cap` and `cap` ("equal jitter"): spreads reconnects out
/// while keeping a floor under the backoff.
fn jitter(cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random_range(cap_ms / 2..=cap_ms))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        client::UpdateStream,
        pb::{ListWorkersRequest, ListWorkersResponse, RegisterResponse},
    };

    /// Records the acks it takes, and the size of each batch; refuses them all when `broken`.
    #[derive(Default)]
    struct Recorder {
        broken: bool,
        acked: Mutex<Vec<(String, u64)>>,
        batches: Mutex<Vec<usize>>,
    }

    #[async_trait]
    impl Session for Recorder {
        async fn subscribe(&self, _: SubscribeRequest) -> Result<UpdateStream, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn fetch(&self, _: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn ack(&self, request: AckRequest) -> Result<(), ClientError> {
            if self.broken {
                return Err(ClientError::Transport("connection lost".into()));
            }
            self.acked
                .lock()
                .unwrap()
                .push((request.worker_name, request.revision));
            Ok(())
        }
        async fn ack_batch(&self, acks: Vec<AckRequest>) -> Result<(), ClientError> {
            self.batches.lock().unwrap().push(acks.len());
            for request in acks {
                self.ack(request).await?;
            }
            Ok(())
        }
        async fn register(&self, _: RegisterRequest) -> Result<RegisterResponse, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn list(&self, _: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
    }

    fn ack(worker: &str, revision: u64) -> AckRequest {
        AckRequest {
            worker_name: worker.into(),
            revision,
            applied: true,
            ..AckRequest::default()
        }
    }

    /// Refuses the acks of revision 1 (as a core whose store is away does), takes the rest.
    #[derive(Default)]
    struct Flaky {
        acked: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl Session for Flaky {
        async fn subscribe(&self, _: SubscribeRequest) -> Result<UpdateStream, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn fetch(&self, _: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn ack(&self, request: AckRequest) -> Result<(), ClientError> {
            if request.revision == 1 {
                return Err(ClientError::Status {
                    code: 14,
                    message: "store unavailable, try again".into(),
                });
            }
            self.acked.lock().unwrap().push(request.revision);
            Ok(())
        }
        async fn register(&self, _: RegisterRequest) -> Result<RegisterResponse, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
        async fn list(&self, _: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
            Err(ClientError::Transport("unused".into()))
        }
    }

    #[tokio::test]
    async fn a_refused_ack_does_not_stop_the_ones_after_it() {
        let pending = Arc::new(PendingAcks::default());
        pending.push(ack("a", 1));
        pending.push(ack("b", 2));
        let flaky = Arc::new(Flaky::default());
        let task = tokio::spawn(send_acks(flaky.clone(), pending.clone()));
        drained(&pending).await;
        assert!(!task.is_finished(), "the acker goes on after a refusal");
        task.abort();
        assert_eq!(*flaky.acked.lock().unwrap(), [2]);
    }

    #[tokio::test]
    async fn acks_not_delivered_survive_into_the_next_session() {
        let pending = Arc::new(PendingAcks::default());
        pending.push(ack("a", 1));
        pending.push(ack("b", 2));
        pending.push(ack("a", 3));
        let broken = Arc::new(Recorder {
            broken: true,
            ..Recorder::default()
        });
        send_acks(broken, pending.clone()).await;
        assert_eq!(pending.lock().len(), 2, "nothing delivered, nothing lost");

        let healthy = Arc::new(Recorder::default());
        let task = tokio::spawn(send_acks(healthy.clone(), pending.clone()));
        drained(&pending).await;
        task.abort();
        let acked = healthy.acked.lock().unwrap().clone();
        assert_eq!(
            acked,
            [("a".to_owned(), 3), ("b".to_owned(), 2)],
            "latest per worker"
        );
    }

    async fn drained(pending: &PendingAcks) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !pending.lock().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "acks not drained");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn acks_ready_together_go_as_one_batch() {
        let pending = Arc::new(PendingAcks::default());
        for i in 0..100 {
            pending.push(ack(&format!("w{i:03}"), 1));
        }
        let recorder = Arc::new(Recorder::default());
        let task = tokio::spawn(send_acks(recorder.clone(), pending.clone()));
        drained(&pending).await;
        // Acked within the linger of one another, while the acker waits: one batch more.
        for i in 0..3 {
            pending.push(ack(&format!("w{i:03}"), 2));
        }
        drained(&pending).await;
        task.abort();
        assert_eq!(*recorder.batches.lock().unwrap(), [100, 3]);
        assert_eq!(recorder.acked.lock().unwrap().len(), 103);
    }

    /// A server that sends `updates` on every subscription (then ends it, or keeps it open),
    /// and fails the first `fetch_failures` fetches.
    #[derive(Clone, Default)]
    struct Scripted {
        updates: Vec<WorkerUpdate>,
        keep_open: bool,
        code: Bytes,
        fetch_failures: usize,
        connects: Arc<std::sync::atomic::AtomicUsize>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
        acks: Arc<Mutex<Vec<AckRequest>>>,
    }

    #[async_trait]
    impl Transport for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        async fn connect(&self) -> Result<Box<dyn Session>, ClientError> {
            self.connects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(Box::new(self.clone()))
        }
    }

    #[async_trait]
    impl Session for Scripted {
        async fn subscribe(&self, _: SubscribeRequest) -> Result<UpdateStream, ClientError> {
            let updates = futures_util::stream::iter(self.updates.clone().into_iter().map(Ok));
            if self.keep_open {
                Ok(Box::pin(updates.chain(futures_util::stream::pending())))
            } else {
                Ok(Box::pin(updates))
            }
        }
        async fn fetch(&self, _: FetchWorkerRequest) -> Result<(String, Bytes), ClientError> {
            let n = self
                .fetches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < self.fetch_failures {
                return Err(ClientError::Status {
                    code: 13,
                    message: "internal error".into(),
                });
            }
            let checksum = crate::core::Checksum::of(&self.code);
            Ok((checksum.as_str().to_owned(), self.code.clone()))
        }
        async fn ack(&self, request: AckRequest) -> Result<(), ClientError> {
            self.acks.lock().unwrap().push(request);
            Ok(())
        }
        async fn register(&self, _: RegisterRequest) -> Result<RegisterResponse, ClientError> {
            Ok(RegisterResponse::default())
        }
        async fn list(&self, _: ListWorkersRequest) -> Result<ListWorkersResponse, ClientError> {
            Ok(ListWorkersResponse::default())
        }
    }

    fn marker(kind: UpdateKind, revision: u64) -> WorkerUpdate {
        WorkerUpdate {
            kind: kind as i32,
            revision,
            epoch: "e".into(),
            ..WorkerUpdate::default()
        }
    }

    /// Records what it was handed.
    #[derive(Default)]
    struct Applied {
        puts: Vec<(String, Bytes)>,
        refusals: Vec<(String, Refusal)>,
        held: BTreeSet<String>,
    }

    #[async_trait]
    impl Handler for Applied {
        async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String> {
            self.puts.push((update.worker_name.clone(), code));
            Ok(())
        }
        async fn delete(&mut self, _: &WorkerUpdate) -> Result<(), String> {
            Ok(())
        }
        async fn holds(&mut self, update: &WorkerUpdate) -> bool {
            self.held.contains(&update.worker_name)
        }
        async fn synced(&mut self, _: &WorkerUpdate, _: Option<&BTreeSet<String>>) {}
        fn refused(&mut self, update: &WorkerUpdate, refusal: &Refusal) {
            self.refusals
                .push((update.worker_name.clone(), refusal.clone()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_that_only_reset_to_the_same_place_back_off() {
        let server = Scripted {
            updates: vec![marker(UpdateKind::Reset, 0), marker(UpdateKind::Synced, 5)],
            ..Scripted::default()
        };
        let position = Position {
            epoch: "e".into(),
            revision: 5,
        };
        let mut consumer =
            Consumer::new(server.clone(), ConsumerOptions::default(), Some(position));
        let mut handler = Applied::default();
        let stop = CancellationToken::new();
        tokio::select! {
            _ = consumer.run(&mut handler, stop) => panic!("retryable: runs on"),
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        // Caps 100 ms, 200 ms, … each delay at least half its cap: at most 7 in 5 s.
        let connects = server.connects.load(std::sync::atomic::Ordering::Relaxed);
        assert!((4..=7).contains(&connects), "{connects} connections in 5 s");
    }

    const CODE: &[u8] = b"export default {}";

    /// A PUT of [`CODE`]: inline for `late`, to be fetched for any other worker.
    fn put(worker: &str, revision: u64) -> WorkerUpdate {
        let code = Bytes::from_static(CODE);
        WorkerUpdate {
            kind: UpdateKind::Put as i32,
            revision,
            epoch: "e".into(),
            worker_name: worker.into(),
            version: "1".into(),
            checksum: crate::core::Checksum::of(&code).as_str().to_owned(),
            size: code.len() as i64,
            worker_code: if worker == "late" { code } else { Bytes::new() },
            ..WorkerUpdate::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn code_the_handler_holds_after_a_reset_is_not_fetched_again() {
        let server = Scripted {
            updates: vec![
                marker(UpdateKind::Reset, 0),
                put("big", 1),
                marker(UpdateKind::Synced, 1),
            ],
            keep_open: true,
            code: Bytes::from_static(CODE),
            ..Scripted::default()
        };
        let options = ConsumerOptions {
            ack: true,
            ..ConsumerOptions::default()
        };
        let mut consumer = Consumer::new(server.clone(), options, None);
        let mut handler = Applied {
            held: BTreeSet::from(["big".to_owned()]),
            ..Applied::default()
        };
        let stop = CancellationToken::new();
        tokio::select! {
            _ = consumer.run(&mut handler, stop) => panic!("runs on"),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let fetches = server.fetches.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!((fetches, handler.puts.len()), (0, 0));
        let acks = server.acks.lock().unwrap();
        assert!(
            acks.iter().any(|a| a.worker_name == "big" && a.applied),
            "{acks:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_bundle_that_fails_to_fetch_is_nacked_skipped_and_acked_once_fetched() {
        let code = Bytes::from_static(CODE);
        let server = Scripted {
            updates: vec![
                marker(UpdateKind::Reset, 0),
                put("bad", 1),
                put("late", 2),
                marker(UpdateKind::Synced, 2),
            ],
            keep_open: true,
            code: code.clone(),
            fetch_failures: 3,
            ..Scripted::default()
        };
        let options = ConsumerOptions {
            ack: true,
            ..ConsumerOptions::default()
        };
        let mut consumer = Consumer::new(server.clone(), options, None);
        let mut handler = Applied::default();
        let stop = CancellationToken::new();
        let acked = |worker: &str, applied: bool| {
            server
                .acks
                .lock()
                .unwrap()
                .iter()
                .any(|a| a.worker_name == worker && a.applied == applied)
        };
        {
            let run = consumer.run(&mut handler, stop.clone());
            tokio::pin!(run);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !acked("bad", true) {
                assert!(tokio::time::Instant::now() < deadline, "never applied");
                tokio::select! {
                    _ = &mut run => panic!("the consumer stopped"),
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            stop.cancel();
            run.await.unwrap();
        }
        assert!(acked("bad", false), "nacked first");
        assert_eq!(handler.refusals.len(), 1);
        assert!(handler.refusals[0].1.retrying);
        let order: Vec<&str> = handler.puts.iter().map(|(w, _)| w.as_str()).collect();
        assert_eq!(order, ["late", "bad"], "the feed went on past it");
        assert_eq!(
            server.connects.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(consumer.position().unwrap().revision, 2);
    }
}
