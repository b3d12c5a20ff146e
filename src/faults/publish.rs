//! The publisher: a seeded plan of puts and deletes, sent through the core's signed hook with
//! many requests in flight, retried through faults, and every 2xx recorded as an [`Accepted`]
//! change — the changes the system promised to keep.
//!
//! Changes to one worker are sent one at a time, in plan order (workers are spread over
//! lanes), so a retry can never land after a later change of the same worker: an answer lost
//! to a fault is retried, and the retry of a put that was committed answers with the revision it
//! got (versions are immutable), the retry of a delete that was committed answers 404.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use super::{
    FaultError,
    check::{Accepted, Change, Kind},
};
use crate::http::{
    hook::{Accepted as HookAnswer, Action as HookAction, Metadata},
    signing, upload,
};

/// A change of the plan.
#[derive(Clone, Debug)]
pub enum Action {
    /// Publish `code` as `version`.
    Put {
        /// The version.
        version: String,
        /// The code.
        code: Bytes,
    },
    /// Delete the worker.
    Delete,
}

/// One step of the plan.
#[derive(Clone, Debug)]
pub struct Step {
    /// The worker.
    pub worker: String,
    /// What to do to it.
    pub action: Action,
}

/// The name of worker `index`.
pub fn worker_name(index: usize) -> String {
    format!("w{index:03}")
}

/// `changes` steps over `workers` workers drawn from `seed`: mostly puts of a new version,
/// about one in sixteen a delete of a live worker.
pub fn plan(seed: u64, changes: usize, workers: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_0f9a_11e5);
    let mut versions = vec![0u32; workers];
    let mut live = vec![false; workers];
    (0..changes)
        .map(|_| {
            let w = rng.random_range(0..workers.max(1));
            let worker = worker_name(w);
            if live[w] && rng.random_ratio(1, 16) {
                live[w] = false;
                return Step {
                    worker,
                    action: Action::Delete,
                };
            }
            versions[w] += 1;
            live[w] = true;
            let version = format!("{}.0.{}", versions[w], seed % 1000);
            let padding = "/".repeat(rng.random_range(0..512));
            let code = format!(
                "// {worker} {version}\nexport default {{ fetch() {{ return new \
                 Response({:?}) }} }}\n{padding}\n",
                format!("{worker} {version}")
            );
            Step {
                worker,
                action: Action::Put {
                    version,
                    code: Bytes::from(code),
                },
            }
        })
        .collect()
}

/// What the hook said.
#[derive(Debug)]
enum Answer {
    /// 2xx.
    Accepted(HookAnswer),
    /// Another status: (status, body).
    Refused(u16, String),
    /// No answer: the request may or may not have been committed.
    Unanswered(String),
}

/// Signs and sends hook requests.
#[derive(Clone, Debug)]
pub struct HookClient {
    url: String,
    secret: Arc<[u8]>,
    http: reqwest::Client,
}

impl HookClient {
    /// A client of the hook at `http` signing with `secret`.
    pub fn new(http: SocketAddr, secret: &str) -> Result<Self, FaultError> {
        crate::tls::install_crypto_provider();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| FaultError::Setup(format!("http client: {e}")))?;
        Ok(Self {
            url: format!("http://{http}/internal/broadcast"),
            secret: Arc::from(secret.as_bytes()),
            http: client,
        })
    }

    async fn send(&self, metadata: &Metadata, code: Option<Bytes>) -> Answer {
        let (content_type, body) = match upload::encode_form(metadata, code) {
            Ok(form) => form,
            Err(e) => return Answer::Refused(0, format!("encode: {e}")),
        };
        let timestamp = crate::core::now_ms() / 1000;
        let signature = signing::sign(&self.secret, timestamp, &body);
        let sent = self
            .http
            .post(&self.url)
            .header("content-type", content_type)
            .header("x-workerpush-timestamp", timestamp.to_string())
            .header("x-workerpush-signature", signature)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => return Answer::Unanswered(e.to_string()),
        };
        let status = response.status().as_u16();
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) => return Answer::Unanswered(format!("{status}, body lost: {e}")),
        };
        if !(200..300).contains(&status) {
            return Answer::Refused(status, text);
        }
        match serde_json::from_str(&text) {
            Ok(answer) => Answer::Accepted(answer),
            Err(e) => Answer::Refused(status, format!("unreadable answer {text:?}: {e}")),
        }
    }

    async fn put(&self, worker: &str, version: &str, code: Bytes) -> Answer {
        let metadata = Metadata {
            worker_name: worker.to_owned(),
            version: Some(version.to_owned()),
            checksum: None,
            action: HookAction::Put,
            deployer: None,
        };
        self.send(&metadata, Some(code)).await
    }

    async fn delete(&self, worker: &str) -> Answer {
        let metadata = Metadata {
            worker_name: worker.to_owned(),
            version: None,
            checksum: None,
            action: HookAction::Delete,
            deployer: None,
        };
        self.send(&metadata, None).await
    }
}

/// Per worker, what the kill -9 checks need: the last change acknowledged (kind, revision,
/// step number) and the number of the last step started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerLedger {
    /// The last change answered 2xx: (kind, revision, step).
    pub acked: Option<(Kind, u64, u64)>,
    /// The last step started (sent at least once).
    pub started: u64,
}

/// The publisher; see the module docs.
#[derive(Debug)]
pub struct Publisher {
    hook: HookClient,
    give_up_after: Duration,
    accepted: Mutex<Vec<Accepted>>,
    ledger: Mutex<BTreeMap<String, WorkerLedger>>,
    failures: Mutex<Vec<String>>,
    retries: AtomicU64,
    done: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is one push or insert.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Publisher {
    /// A publisher through `hook`; a step that finds no answer for `give_up_after` fails.
    pub fn new(hook: HookClient, give_up_after: Duration) -> Self {
        Self {
            hook,
            give_up_after,
            accepted: Mutex::new(Vec::new()),
            ledger: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(Vec::new()),
            retries: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    /// Runs `plan` over `lanes` concurrent lanes (each worker in one lane, in plan order).
    pub async fn run(&self, plan: Vec<Step>, lanes: usize) {
        let lanes = lanes.max(1);
        let mut by_lane: Vec<Vec<(u64, Step)>> = vec![Vec::new(); lanes];
        let mut lane_of: BTreeMap<String, usize> = BTreeMap::new();
        for (index, step) in plan.into_iter().enumerate() {
            let next = lane_of.len() % lanes;
            let lane = *lane_of.entry(step.worker.clone()).or_insert(next);
            by_lane[lane].push((index as u64 + 1, step));
        }
        futures_util::future::join_all(by_lane.into_iter().map(|steps| async move {
            for (seq, step) in steps {
                self.apply(seq, &step).await;
            }
        }))
        .await;
    }

    /// Sends one step until the hook answers it; returns the accepted change, if any.
    pub async fn apply(&self, seq: u64, step: &Step) -> Option<Accepted> {
        lock(&self.ledger)
            .entry(step.worker.clone())
            .or_default()
            .started = seq;
        let deadline = Instant::now() + self.give_up_after;
        let mut backoff = Duration::from_millis(20);
        let mut unanswered = false;
        let outcome = loop {
            let answer = match &step.action {
                Action::Put { version, code } => {
                    self.hook.put(&step.worker, version, code.clone()).await
                }
                Action::Delete => self.hook.delete(&step.worker).await,
            };
            let retry = match answer {
                Answer::Accepted(answer) => break self.accepted(seq, step, answer),
                // A delete retried after an unanswered attempt finds that attempt committed.
                Answer::Refused(404, _) if unanswered && matches!(step.action, Action::Delete) => {
                    break None;
                }
                // Rate limited: refused before anything was done, so not an unanswered attempt.
                Answer::Refused(429, body) => {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() + backoff > deadline {
                        self.fail(format!(
                            "{} rate limited for too long: {body}",
                            describe(step)
                        ));
                        break None;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
                Answer::Refused(status, body) if status >= 500 || status == 408 => {
                    format!("{status} {body}")
                }
                Answer::Refused(status, body) => {
                    self.fail(format!("{} refused {status}: {body}", describe(step)));
                    break None;
                }
                Answer::Unanswered(error) => error,
            };
            unanswered = true;
            self.retries.fetch_add(1, Ordering::Relaxed);
            if Instant::now() + backoff > deadline {
                self.fail(format!(
                    "{} unanswered for {:?}: {retry}",
                    describe(step),
                    self.give_up_after
                ));
                break None;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        self.done.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    fn accepted(&self, seq: u64, step: &Step, answer: HookAnswer) -> Option<Accepted> {
        let (kind, checksum) = match &step.action {
            Action::Put { version, code } => {
                let checksum = crate::core::Checksum::of(code).to_string();
                if &answer.version != version || answer.checksum != checksum {
                    self.fail(format!(
                        "{} answered for another change: {answer:?}",
                        describe(step)
                    ));
                    return None;
                }
                (Kind::Put, checksum)
            }
            Action::Delete => (Kind::Delete, String::new()),
        };
        if answer.worker_name != step.worker {
            self.fail(format!(
                "{} answered for {}",
                describe(step),
                answer.worker_name
            ));
            return None;
        }
        let accepted = Accepted {
            epoch: answer.epoch,
            revision: answer.revision,
            change: Change {
                kind,
                worker: answer.worker_name,
                version: answer.version,
                checksum,
            },
        };
        lock(&self.ledger)
            .entry(step.worker.clone())
            .or_default()
            .acked = Some((kind, accepted.revision, seq));
        lock(&self.accepted).push(accepted.clone());
        Some(accepted)
    }

    fn fail(&self, what: String) {
        lock(&self.failures).push(what);
    }

    /// Every change answered 2xx so far.
    pub fn accepted_changes(&self) -> Vec<Accepted> {
        lock(&self.accepted).clone()
    }

    /// The per-worker ledger now.
    pub fn ledger(&self) -> BTreeMap<String, WorkerLedger> {
        lock(&self.ledger).clone()
    }

    /// Steps that were refused or never answered (each is a violation).
    pub fn failures(&self) -> Vec<String> {
        lock(&self.failures).clone()
    }

    /// Requests sent again after a fault.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Steps finished.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

fn describe(step: &Step) -> String {
    match &step.action {
        Action::Put { version, .. } => format!("put {} {version}", step.worker),
        Action::Delete => format!("delete {}", step.worker),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_is_a_function_of_its_seed_and_deletes_only_live_workers() {
        let a = plan(42, 500, 20);
        let b = plan(42, 500, 20);
        let describe_all = |p: &[Step]| p.iter().map(describe).collect::<Vec<_>>();
        assert_eq!(describe_all(&a), describe_all(&b));
        assert_ne!(describe_all(&a), describe_all(&plan(43, 500, 20)));
        let mut live = std::collections::BTreeSet::new();
        let mut deletes = 0;
        for step in &a {
            match step.action {
                Action::Put { .. } => {
                    live.insert(step.worker.clone());
                }
                Action::Delete => {
                    assert!(live.remove(&step.worker), "delete of a live worker");
                    deletes += 1;
                }
            }
        }
        assert!(deletes > 5, "{deletes} deletes");
    }
}
