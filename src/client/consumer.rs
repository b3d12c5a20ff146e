//! The consumer loop: subscribe, verify, apply through a [`Handler`], acknowledge, and on any
//! disconnect reconnect with jittered exponential backoff and resume.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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

/// Reconnection delays: full jitter between `initial` and a cap that doubles up to `max`.
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
}

impl<T: Transport> Consumer<T> {
    /// A consumer starting at `position` (from a previous run), or fresh.
    pub fn new(transport: T, options: ConsumerOptions, position: Option<Position>) -> Self {
        Self {
            transport,
            options,
            position,
        }
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
            let result = tokio::select! {
                result = self.session(handler, &mut progressed) => result,
                () = shutdown.cancelled() => return Ok(()),
            };
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
    ) -> Result<(), ClientError> {
        let session: Arc<dyn Session> = Arc::from(self.transport.connect().await?);
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
        let mut stream = session.subscribe(request).await?;
        handler.connected(self.transport.name());
        let acks = self.options.ack.then(|| spawn_acker(session.clone()));
        let mut snapshot: Option<BTreeSet<String>> = None;
        while let Some(update) = stream.next().await {
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
            if let Some(acks) = &acks {
                let (applied, error) = match &applied {
                    Ok(()) => (true, String::new()),
                    Err(reason) => (false, reason.clone()),
                };
                let _ = acks.send(AckRequest {
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

/// Sends acks in the background so that applying never waits on a round trip.
fn spawn_acker(session: Arc<dyn Session>) -> mpsc::UnboundedSender<AckRequest> {
    let (tx, mut rx) = mpsc::unbounded_channel::<AckRequest>();
    tokio::spawn(async move {
        while let Some(ack) = rx.recv().await {
            if let Err(error) = session.ack(ack).await {
                tracing::debug!(%error, "ack failed; the session is going away");
                return;
            }
        }
    });
    tx
}

fn jitter(cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random_range(cap_ms / 2..=cap_ms))
}
