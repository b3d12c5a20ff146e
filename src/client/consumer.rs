//! The consumer loop: subscribe, verify, apply through a [`Handler`], acknowledge, and on any
//! disconnect reconnect with jittered exponential backoff and resume.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{ClientError, Session, Transport, verify};
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
#[derive(Clone, Debug, Default)]
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
}

/// Applies what the consumer receives. Code handed to [`Handler::put`] is verified.
#[async_trait]
pub trait Handler: Send {
    /// Make `code` the worker's current version. An `Err` is reported to the server as a
    /// failure to apply, with the reason.
    async fn put(&mut self, update: &WorkerUpdate, code: Bytes) -> Result<(), String>;
    /// Remove the worker.
    async fn delete(&mut self, update: &WorkerUpdate) -> Result<(), String>;
    /// A RESET: a snapshot follows, ended by SYNCED.
    async fn reset(&mut self, _update: &WorkerUpdate) {}
    /// SYNCED: everything up to its revision is held. When it ends a RESET, `snapshot` names
    /// the workers the snapshot held: every other worker must go.
    async fn synced(&mut self, update: &WorkerUpdate, snapshot: Option<&BTreeSet<String>>);
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
}

impl<T: Transport> Consumer<T> {
    /// A consumer starting at `position` (from a previous run), or fresh.
    pub fn new(transport: T, options: ConsumerOptions, position: Option<Position>) -> Self {
        Self {
            transport,
            options,
            position,
            acks: Arc::new(PendingAcks::default()),
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

    /// Runs until `shutdown` (`Ok`) or a refusal that retrying cannot fix (`Err`).
    pub async fn run(
        &mut self,
        handler: &mut dyn Handler,
        shutdown: CancellationToken,
    ) -> Result<(), ClientError> {
        let mut cap = self.options.backoff.initial;
        loop {
            let mut progressed = false;
            let result = self.session(handler, &mut progressed, &shutdown).await;
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let error = match result {
                Ok(()) => ClientError::Transport("stream ended".to_owned()),
                Err(error) if !error.is_retryable() => return Err(error),
                Err(error) => error,
            };
            if progressed {
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
        progressed: &mut bool,
        shutdown: &CancellationToken,
    ) -> Result<(), ClientError> {
        let connect = self.transport.connect();
        let session: Arc<dyn Session> = tokio::select! {
            session = connect => Arc::from(session?),
            () = shutdown.cancelled() => return Ok(()),
        };
        if let Some(endpoint) = &self.options.endpoint {
            session
                .register(crate::pb::RegisterRequest {
                    consumer_id: self.options.consumer_id.clone(),
                    endpoint: endpoint.clone(),
                    ..RegisterRequest::default()
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
        let mut snapshot: Option<BTreeSet<String>> = None;
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
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
            *progressed = true;
            let kind = UpdateKind::try_from(update.kind).unwrap_or(UpdateKind::Unspecified);
            let applied = match kind {
                UpdateKind::Reset => {
                    // Until the SYNCED that ends the snapshot, there is no position to resume
                    // from: a disconnect now must start over.
                    self.position = None;
                    snapshot = Some(BTreeSet::new());
                    handler.reset(&update).await;
                    continue;
                }
                UpdateKind::Synced => {
                    handler.synced(&update, snapshot.as_ref()).await;
                    snapshot = None;
                    self.advance(handler, &update).await;
                    continue;
                }
                UpdateKind::Put => {
                    if let Some(names) = &mut snapshot {
                        names.insert(update.worker_name.clone());
                    }
                    match self.code(&*session, &update).await {
                        Ok(code) => handler.put(&update, code).await,
                        Err(error)
                            if error.is_retryable()
                                && !matches!(error, ClientError::Verification(_)) =>
                        {
                            return Err(error);
                        }
                        Err(error) => Err(error.to_string()),
                    }
                }
                UpdateKind::Delete => handler.delete(&update).await,
                UpdateKind::Unspecified => continue,
            };
            if self.options.ack {
                let (applied, error) = match &applied {
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
            if snapshot.is_none() {
                self.advance(handler, &update).await;
            }
        }
        Ok(())
    }

    async fn advance(&mut self, handler: &mut dyn Handler, update: &WorkerUpdate) {
        let position = Position {
            epoch: update.epoch.clone(),
            revision: update.revision,
        };
        handler.position(&position).await;
        self.position = Some(position);
    }

    /// The verified code of a PUT: inline, or fetched.
    async fn code(
        &self,
        session: &dyn Session,
        update: &WorkerUpdate,
    ) -> Result<Bytes, ClientError> {
        let code = if update.worker_code.is_empty() && update.size > 0 {
            let (checksum, code) = session
                .fetch(FetchWorkerRequest {
                    worker_name: update.worker_name.clone(),
                    version: update.version.clone(),
                })
                .await?;
            if checksum != update.checksum {
                return Err(ClientError::Verification(format!(
                    "fetched checksum {checksum} instead of {}",
                    update.checksum
                )));
            }
            code
        } else {
            update.worker_code.clone()
        };
        verify(&code, &update.checksum, update.size)?;
        Ok(code)
    }
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

/// Sends pending acks in the background so that applying never waits on a round trip. An ack
/// leaves the queue once the server answered it, or a newer one for its worker replaced it. An
/// ack the server refuses (its store briefly away, say) is dropped and the next ones still go:
/// a later ack covers it. A broken connection ends the acker and keeps the ack for the next.
async fn send_acks(session: Arc<dyn Session>, pending: Arc<PendingAcks>) {
    loop {
        let next = pending.lock().values().next().cloned();
        let Some(ack) = next else {
            pending.ready.notified().await;
            continue;
        };
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
        let mut latest = pending.lock();
        if latest.get(&ack.worker_name) == Some(&ack) {
            latest.remove(&ack.worker_name);
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

    /// Records the acks it takes; refuses them all when `broken`.
    struct Recorder {
        broken: bool,
        acked: Mutex<Vec<(String, u64)>>,
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !pending.lock().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "acks not drained");
            tokio::task::yield_now().await;
        }
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
            acked: Mutex::new(Vec::new()),
        });
        send_acks(broken, pending.clone()).await;
        assert_eq!(pending.lock().len(), 2, "nothing delivered, nothing lost");

        let healthy = Arc::new(Recorder {
            broken: false,
            acked: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(send_acks(healthy.clone(), pending.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !pending.lock().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "acks not drained");
            tokio::task::yield_now().await;
        }
        task.abort();
        let acked = healthy.acked.lock().unwrap().clone();
        assert_eq!(
            acked,
            [("a".to_owned(), 3), ("b".to_owned(), 2)],
            "latest per worker"
        );
    }
}
