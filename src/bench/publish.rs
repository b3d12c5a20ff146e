//! The publisher: signed hook requests, exactly as the upload server sends them, open loop (a
//! fixed rate whatever the answers) or closed loop (a fixed number in flight).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use tokio::task::JoinSet;

use super::{
    BenchError,
    ledger::{self, Ledger},
};
use crate::core::PropagationState;
use crate::http::{
    hook::{Accepted, Action, Metadata},
    signing::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign},
    upload::{encode_form, error_chain},
};

/// The smallest code the publisher makes: room for the header line naming the version.
pub const MIN_SIZE: usize = HEADER_BYTES;

/// The code starts with one comment line of this many bytes naming its version, so that every
/// change has its own checksum.
const HEADER_BYTES: usize = 64;

/// How the publisher paces requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// This many requests per second, each sent on time whatever the earlier ones are doing.
    Open {
        /// Requests per second.
        per_second: f64,
    },
    /// As fast as this many concurrent requests go.
    Closed {
        /// Requests in flight.
        in_flight: usize,
    },
}

/// What publishing achieved.
#[derive(Debug, Default)]
pub struct Published {
    /// Changes the core accepted as new.
    pub accepted: usize,
    /// Refused or failed requests.
    pub failed: usize,
    /// The first few failures.
    pub errors: Vec<String>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Waiting publishers: per change answered with every subscriber acknowledged, the time
    /// from its request to the answer, µs.
    pub acked_us: Vec<u64>,
    /// Waiting publishers: changes answered with someone still pending.
    pub not_acked: u64,
}

/// What the answer to an accepted change said, with a wait: whether every subscriber had
/// acknowledged it, and how long after the request it came.
pub type Waited = Option<(bool, Duration)>;

impl Published {
    fn merge(&mut self, result: Result<Waited, String>) {
        match result {
            Ok(waited) => {
                self.accepted += 1;
                match waited {
                    Some((true, took)) => self
                        .acked_us
                        .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX)),
                    Some((false, _)) => self.not_acked += 1,
                    None => {}
                }
            }
            Err(error) => {
                self.failed += 1;
                if self.errors.len() < 5 {
                    self.errors.push(error);
                }
            }
        }
    }

    /// An error if anything failed: a run with refused publishes measures nothing useful.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.failed == 0 {
            return Ok(());
        }
        Err(BenchError::Publish(format!(
            "{} of {} hook requests failed: {}",
            self.failed,
            self.failed + self.accepted,
            self.errors.join("; ")
        )))
    }
}

/// `size` bytes (at least [`MIN_SIZE`]) of lines of a JavaScript comment, so that the code is
/// at least plausible: what [`code`] writes a version's header over.
pub fn filler(size: usize) -> Bytes {
    let line = format!("//{}\n", "-".repeat(61));
    line.bytes().cycle().take(size.max(MIN_SIZE)).collect()
}

/// The code of a version: `filler`, its first line naming the version.
pub fn code(filler: &[u8], version: &str) -> Bytes {
    let mut code = BytesMut::from(filler);
    let header = format!(
        "// workerpush bench {version:<width$}\n",
        width = HEADER_BYTES
    );
    code[..HEADER_BYTES - 1].copy_from_slice(&header.as_bytes()[..HEADER_BYTES - 1]);
    code[HEADER_BYTES - 1] = b'\n';
    code.freeze()
}

/// Signs and sends the changes of a [`Ledger`].
pub struct Publisher {
    http: reqwest::Client,
    url: reqwest::Url,
    secret: Arc<[u8]>,
    /// `size` bytes of filler the header is written over.
    filler: Bytes,
    waits: bool,
}

/// The part of a waiting hook request's answer the publisher reads.
#[derive(Deserialize)]
struct AnswerAfterWait {
    #[serde(flatten)]
    accepted: Accepted,
    propagation: PropagationSeen,
}

#[derive(Deserialize)]
struct PropagationSeen {
    state: PropagationState,
}

impl Publisher {
    /// A publisher to the hook at `url`, making code of `size` bytes; with `wait`, each
    /// request asks the hook to answer once every subscriber acknowledged (or `wait` passed).
    pub fn new(
        url: reqwest::Url,
        secret: &str,
        size: usize,
        wait: Option<Duration>,
    ) -> Result<Self, BenchError> {
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .timeout(Duration::from_secs(60) + wait.unwrap_or_default())
            .build()
            .map_err(|e| BenchError::Config(format!("HTTP client: {e}")))?;
        let mut url = url;
        if let Some(wait) = wait {
            url.query_pairs_mut()
                .append_pair("wait", &format!("{}ms", wait.as_millis()));
        }
        Ok(Self {
            http,
            url,
            secret: Arc::from(secret.as_bytes()),
            filler: filler(size),
            waits: wait.is_some(),
        })
    }

    /// The code of a version: the filler, its first line naming the version.
    fn code(&self, version: &str) -> Bytes {
        code(&self.filler, version)
    }

    /// Publishes change `index`; answers what the hook said of the wait, if it waited. The
    /// send time is stamped into the ledger after the body is built and signed, just before
    /// the request goes out.
    pub async fn publish(&self, ledger: &Ledger, index: usize) -> Result<Waited, String> {
        let version = ledger.version(index);
        self.send(ledger.worker(index), version, || ledger.mark_sent(index))
            .await
    }

    /// Publishes a change that is not one of the run's (subscribers ignore it), so that the
    /// log is not empty: resuming from revision 0 means "fresh", which would answer the storm's
    /// reconnects with a snapshot instead of a replay.
    pub async fn publish_seed(&self, ledger: &Ledger) -> Result<Waited, String> {
        self.send(ledger.worker(0), ledger.seed_version(), || {})
            .await
    }

    async fn send(
        &self,
        worker_name: String,
        version: String,
        mark_sent: impl FnOnce(),
    ) -> Result<Waited, String> {
        let metadata = Metadata {
            worker_name,
            version: Some(version.clone()),
            checksum: None,
            action: Action::Put,
            deployer: None,
        };
        let (content_type, body) =
            encode_form(&metadata, Some(self.code(&version))).map_err(|e| e.to_string())?;
        let timestamp = i64::try_from(ledger::unix_ns() / 1_000_000_000).unwrap_or(i64::MAX);
        let signature = sign(&self.secret, timestamp, &body);
        let request = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, content_type)
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(body);
        mark_sent();
        let sent = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| format!("{version}: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(format!("{version}: {status}: {}", text.trim()));
        }
        let unexpected = |e: reqwest::Error| format!("{version}: unexpected answer: {e}");
        let (accepted, waited) = if self.waits {
            let answer: AnswerAfterWait = response.json().await.map_err(unexpected)?;
            let complete = answer.propagation.state == PropagationState::Complete;
            (answer.accepted, Some((complete, sent.elapsed())))
        } else {
            (response.json().await.map_err(unexpected)?, None)
        };
        if accepted.created != Some(true) {
            return Err(format!("{version}: the core already had this version"));
        }
        Ok(waited)
    }
}

/// Publishes every change of `ledger` at `pace`.
pub async fn publish_all(publisher: Arc<Publisher>, ledger: Arc<Ledger>, pace: Pace) -> Published {
    let changes = ledger.changes();
    pace_all(changes, pace, move |index| {
        let (publisher, ledger) = (publisher.clone(), ledger.clone());
        async move { publisher.publish(&ledger, index).await }
    })
    .await
}

/// Sends changes `0..changes` at `pace` with `send` (the hook's publisher, or a baseline's).
pub async fn pace_all<F, Fut>(changes: usize, pace: Pace, send: F) -> Published
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Waited, String>> + Send + 'static,
{
    let started = Instant::now();
    let mut published = Published::default();
    let mut tasks = JoinSet::new();
    match pace {
        Pace::Open { per_second } => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
            // Late ticks fire at once: the schedule, not the answers, sets the pace.
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for index in 0..changes {
                ticker.tick().await;
                let sending = send(index);
                tasks.spawn(async move { vec![sending.await] });
                // Collect finished requests as we go, so that results do not pile up.
                while let Some(Ok(results)) = tasks.try_join_next() {
                    results.into_iter().for_each(|r| published.merge(r));
                }
            }
        }
        Pace::Closed { in_flight } => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..in_flight.min(changes) {
                let (send, next) = (send.clone(), next.clone());
                tasks.spawn(async move {
                    let mut results = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= changes {
                            return results;
                        }
                        results.push(send(index).await);
                    }
                });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(results) => results.into_iter().for_each(|r| published.merge(r)),
            Err(error) => published.merge(Err(format!("publisher task failed: {error}"))),
        }
    }
    published.elapsed = started.elapsed();
    published
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_size_bytes_and_names_its_version_first() {
        crate::tls::install_crypto_provider();
        let publisher = Publisher::new(
            reqwest::Url::parse("http://127.0.0.1:1/").unwrap(),
            "s",
            1000,
            None,
        )
        .unwrap();
        let a = publisher.code("b0000abcd-1");
        let b = publisher.code("b0000abcd-2");
        assert_eq!(a.len(), 1000);
        assert!(a.starts_with(b"// workerpush bench b0000abcd-1 "));
        assert_eq!(a[HEADER_BYTES - 1], b'\n');
        assert_ne!(a, b, "every version has its own checksum");
        assert_eq!(a[HEADER_BYTES..], b[HEADER_BYTES..]);
        let small = Publisher::new(
            reqwest::Url::parse("http://h/").unwrap(),
            "s",
            MIN_SIZE,
            None,
        )
        .unwrap()
        .code("v");
        assert_eq!(small.len(), MIN_SIZE);
    }
}
