//! The Redis store: several cores share one Redis and so one revision order, one retained log,
//! one set of bundles and one consumer registry.
//!
//! Owns the key layout below, the Lua scripts that decide and commit proposals inside Redis,
//! and the hint subscription. Depends on `store` and `core::types` only.
//!
//! # Key layout (every key under the configured prefix, default `workerpush`)
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{prefix}:epoch` | string | the epoch; created (`SET`) by whichever script first finds it missing |
//! | `{prefix}:head` | string (integer) | the revision of the last change |
//! | `{prefix}:log` | stream | the retained log: entry id `<revision>-0`, one field `c` = the change record, trimmed to exactly `retain` entries |
//! | `{prefix}:latest` | hash | worker → the change record that made its latest version live |
//! | `{prefix}:versions` | hash | `<worker>/<version>` → checksum, for every version ever published (kept forever: immutability survives deletes) |
//! | `{prefix}:bundle:<checksum>` | string | the code (`SET NX`) |
//! | `{prefix}:consumers` | hash | consumer id → its registry record (JSON, see [`registry`]) |
//! | `{prefix}:claim:<signature>` | string | a hook request already applied, until its window ends |
//! | `{prefix}:hint` | pub/sub channel | the revision of each commit: a wake-up only |
//!
//! A change record is JSON with string fields: `{"r": revision, "k": "put"|"delete", "w":
//! worker, "v": version, "c": checksum, "s": size, "t": unix ms}`. Everything read back is
//! validated; what does not parse is [`StoreError::Corrupt`].
//!
//! # Atomicity
//! Every `apply` is one Lua script: it decides by the rules of [`super::StateMachine::decide`]
//! and commits in the same atomic step (`XADD` first, so a failing write leaves nothing behind;
//! then head, versions, latest, `PUBLISH`). `load` and `changes_after` are scripts too, so head,
//! latest and log are always read from one instant. Since the log is only appended to at
//! `head + 1` and only trimmed from the front, the retained log is always contiguous and ends at
//! the head; reads check it anyway.
//!
//! # The epoch, and a Redis that lost its data
//! The first script to find no epoch creates one — for a store that has not followed any
//! history yet (first use). A store that has followed one (it remembers the newest epoch and
//! the highest head it saw) never starts over by itself: when the epoch is missing (Redis
//! flushed, restarted without persistence, failed over to an empty replica) or the head went
//! back under the same epoch (restored from a stale snapshot, failed over to a replica that
//! lacked the last writes), every script answers `WPLOST` ([`StoreError::HistoryLost`]) and
//! changes nothing. The core then re-seeds ([`Store::reseed`]): one script that, only while
//! the history is still lost, starts a new epoch holding every live worker the core holds.
//! Of several cores noticing at once, the first script seeds and the others find a history
//! they did not lose and reload it. So a revision is never given twice in one epoch, and a
//! new epoch never starts empty while a core holds workers.
//!
//! # Hook replays
//! `{prefix}:claim:<signature>` (`SET NX EXAT` the end of the request's time window) is the
//! fleet's replay guard: whichever core sees a signed request first claims it.
//!
//! # Operating it
//! Durability is what Redis acknowledges — with `min_replicas`, what that many replicas
//! acknowledged too (`WAIT` after every commit; fewer in time answers
//! [`StoreError::Unavailable`], and the retried put answers with the revision it got). Run it with `appendonly yes` (and `appendfsync
//! always` for the design's "survives kill -9"), and `maxmemory-policy noeviction` — an
//! evicted key would silently break history. The first `load` reads the `append*` settings
//! (where `CONFIG` is allowed) and warns when acknowledged writes could be lost. For Redis
//! Cluster, give a prefix with a hash tag (`{workerpush}`) so every key lands in one slot.
//!
//! Pub/sub is at-most-once, so hints are wake-ups only: the core also polls `changes_after`.
//! A timed-out `apply` is ambiguous (the script may have run): it answers
//! [`StoreError::Unavailable`], and a retried put then answers `Unchanged` with the revision it got.
//!
//! # Failover
//! With a Sentinel URL, connections go to the master the Sentinels name, asked again when a
//! connection breaks or a server answers `READONLY` (see [`link`]). With `min_replicas`, no
//! change is acknowledged before that many replicas hold it, so a promoted replica has every
//! acknowledged change; one that lacks unacknowledged ones is a shorter history and is
//! re-seeded like any other loss.
//!
//! # The consumer registry
//! Saves from every core are merged inside Redis (highest ack, newest registration), coalesced
//! per consumer and written in the background, so acks keep being answered while Redis is
//! away; see [`registry`].

pub(crate) mod link;
mod registry;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use redis::{
    RedisError, RedisResult, Script,
    aio::{ConnectionManager, ConnectionManagerConfig, PubSub},
};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::{link::Link, registry::Registry};
use super::{
    Change, ChangeKind, ConsumerRecord, Outcome, Proposal, Recovered, Reseeded, Store, StoreError,
    Tail,
};
use crate::core::types::{Checksum, ConsumerId, Epoch, Revision, Version, WorkerName};

/// How to reach Redis and where to keep the state in it.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`), or
    /// `redis+sentinel://[password@]host:port[,host:port…]/<service>[/<db>]` to follow the
    /// master a set of Sentinels names.
    pub url: String,
    /// Every key starts with `{key_prefix}:`; cores sharing one history share the prefix.
    pub key_prefix: String,
    /// How many changes the log retains for resume (at least 1).
    pub retain: usize,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one operation may take, reconnecting included, before it answers
    /// [`StoreError::Unavailable`].
    pub response_timeout: Duration,
    /// Replicas that must hold a change (`WAIT`) before it is acknowledged; 0: the primary's
    /// answer is enough.
    pub min_replicas: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "workerpush".to_owned(),
            retain: 10_000,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            min_replicas: 0,
        }
    }
}

/// A [`Store`] in Redis, shared by every core that uses the same URL and prefix.
pub struct RedisStore {
    link: Arc<Link>,
    keys: Keys,
    scripts: Scripts,
    retain: usize,
    response_timeout: Duration,
    min_replicas: u32,
    head: watch::Sender<Revision>,
    /// The highest head seen in the newest epoch seen: a fence against Redis coming back with
    /// the same epoch but a shorter history.
    seen: Mutex<Option<(Epoch, Revision)>>,
    /// The consumer registry, written in the background.
    registry: Arc<Registry>,
    /// Whether Redis's persistence settings were looked at (once, at the first load).
    durability_checked: AtomicBool,
    /// Stops the hint and registry tasks when the store is dropped.
    _background: DropGuard,
}

struct Keys {
    prefix: String,
    /// The five keys every script gets, in the order the scripts expect.
    state: [String; 5],
    consumers: String,
    hint: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            state: ["epoch", "head", "log", "versions", "latest"].map(|k| format!("{prefix}:{k}")),
            consumers: format!("{prefix}:consumers"),
            hint: format!("{prefix}:hint"),
        }
    }

    fn bundle(&self, checksum: &Checksum) -> String {
        format!("{}:bundle:{checksum}", self.prefix)
    }

    fn claim(&self, key: &str) -> String {
        format!("{}:claim:{key}", self.prefix)
    }
}

struct Scripts {
    load: Script,
    changes: Script,
    apply: Script,
    head: Script,
    reseed: Script,
}

impl RedisStore {
    /// Makes a store for `config` and starts its hint subscription.
    ///
    /// Does not wait for Redis: connections are made on first use and remade whenever they
    /// break, and every operation answers [`StoreError::Unavailable`] (within
    /// `response_timeout`) while Redis cannot be reached. Fails only on an invalid URL or
    /// outside a Tokio runtime.
    pub fn connect(config: RedisConfig) -> Result<Self, StoreError> {
        if config.key_prefix.is_empty() {
            return Err(invalid_config("redis key prefix is empty".to_owned()));
        }
        let (link, runtime) =
            open_link(&config.url, config.connect_timeout, config.response_timeout)?;

        let keys = Keys::new(&config.key_prefix);
        let head = watch::Sender::new(0);
        let cancel = CancellationToken::new();
        runtime.spawn(follow_hints(
            link.clone(),
            keys.hint.clone(),
            head.clone(),
            config.connect_timeout,
            config.response_timeout,
            cancel.clone(),
        ));
        let registry = Arc::new(Registry::new(
            link.clone(),
            keys.consumers.clone(),
            config.response_timeout,
        ));
        runtime.spawn(registry::keep_writing(registry.clone(), cancel.clone()));
        Ok(Self {
            link,
            keys,
            scripts: Scripts {
                load: Script::new(&format!("{STATE}{PREAMBLE}{LOAD}")),
                changes: Script::new(&format!("{STATE}{PREAMBLE}{CHANGES}")),
                apply: Script::new(&format!("{STATE}{PREAMBLE}{APPLY}")),
                head: Script::new(&format!("{STATE}{PREAMBLE}{HEAD}")),
                reseed: Script::new(&format!("{STATE}{RESEED}")),
            },
            retain: config.retain.max(1),
            response_timeout: config.response_timeout,
            min_replicas: config.min_replicas,
            head,
            seen: Mutex::new(None),
            registry,
            durability_checked: AtomicBool::new(false),
            _background: cancel.drop_guard(),
        })
    }

    fn seen(&self) -> MutexGuard<'_, Option<(Epoch, Revision)>> {
        // Every critical section is a single read or assignment: a poisoned lock still holds a
        // consistent value.
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `script` on the state keys with the `fresh epoch, known epoch, known head` arguments
    /// every script starts with; the caller adds its own.
    fn invocation<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let (known_epoch, known_head) = self
            .seen()
            .as_ref()
            .map_or((String::new(), 0), |(e, h)| (e.as_str().to_owned(), *h));
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&self.keys.state)
            .arg(Epoch::generate().as_str())
            .arg(known_epoch)
            .arg(known_head);
        invocation
    }

    /// Records what a script reported, and returns the parsed epoch.
    fn observe(&self, epoch: &str, head: Revision) -> Result<Epoch, StoreError> {
        let epoch = Epoch::parse(epoch).map_err(|e| corrupt("epoch", e))?;
        let mut seen = self.seen();
        match seen.as_mut() {
            Some((known, known_head)) if *known == epoch => *known_head = (*known_head).max(head),
            previous => {
                if let Some((old, _)) = previous {
                    tracing::warn!(old_epoch = %old, epoch = %epoch, head, prefix = %self.keys.prefix, "redis store history changed: new epoch");
                }
                *seen = Some((epoch.clone(), head));
            }
        }
        Ok(epoch)
    }

    /// Runs one operation under the response timeout. The operation may be tried twice: again
    /// after a connection refusal (it was never sent, so this is safe even for writes; it is
    /// also how a stale broken connection gets replaced), and, when `idempotent`, after any
    /// connection error.
    async fn run<T, F, Fut>(&self, what: &str, idempotent: bool, op: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let attempts = async {
            let (generation, connection) = self.link.manager().await?;
            let first = op(connection).await;
            match first {
                // A read-only answer came from a replica (a failover): nothing was written.
                Err(e)
                    if e.is_connection_refusal()
                        || (idempotent && e.is_io_error())
                        || e.code() == Some("READONLY") =>
                {
                    self.link.failed(generation, &e).await;
                    let (_, connection) = self.link.manager().await?;
                    op(connection).await
                }
                Err(e) => {
                    self.link.failed(generation, &e).await;
                    Err(e)
                }
                other => other,
            }
        };
        match tokio::time::timeout(self.response_timeout, attempts).await {
            Ok(result) => result.map_err(|e| store_error(what, &e)),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis did not answer {what} within {:?}",
                self.response_timeout
            ))),
        }
    }

    /// Warns if Redis may lose writes it acknowledged, which would break "2xx means durable".
    /// Best effort: managed Redis often refuses `CONFIG`.
    async fn check_durability(&self) {
        let settings: Result<HashMap<String, String>, _> = self
            .run("config get", true, |mut connection| {
                let mut command = redis::cmd("CONFIG");
                command.arg("GET").arg("append*");
                async move { command.query_async(&mut connection).await }
            })
            .await;
        match settings {
            Ok(settings) => {
                if let Some(problem) = durability_problem(&settings) {
                    tracing::warn!(
                        appendonly = settings.get("appendonly").map_or("?", String::as_str),
                        appendfsync = settings.get("appendfsync").map_or("?", String::as_str),
                        "redis may lose writes it acknowledged ({problem}): a change answered \
                         2xx could vanish; run redis with appendonly yes and appendfsync always"
                    );
                }
            }
            Err(error) => {
                tracing::debug!(%error, "redis persistence settings not readable; not checked");
            }
        }
    }
}

impl RedisStore {
    /// With `min_replicas`, waits until that many replicas hold every write this store's
    /// connection made (the change just committed included); refuses the answer otherwise,
    /// so that a failover to a replica never loses a change that was acknowledged.
    async fn replicated(&self, what: &str) -> Result<(), StoreError> {
        if self.min_replicas == 0 {
            return Ok(());
        }
        // Half the response timeout for the replicas, the rest for the round trip.
        let wait_ms = (self.response_timeout / 2).as_millis().max(1);
        let acked: u64 = self
            .run("wait", true, |mut connection| {
                let mut command = redis::cmd("WAIT");
                command.arg(self.min_replicas).arg(wait_ms as u64);
                async move { command.query_async(&mut connection).await }
            })
            .await?;
        if acked < u64::from(self.min_replicas) {
            return Err(StoreError::Unavailable(format!(
                "redis {what}: committed on the primary but held by {acked} of the {} replicas \
                 --redis-min-replicas asks for within {wait_ms} ms; not acknowledged",
                self.min_replicas
            )));
        }
        Ok(())
    }
}

/// Opens a [`Link`] for `url` with the connection settings every Redis user of a core shares
/// (the store and the fleet), and the runtime to spawn on, without waiting for Redis. Fails
/// only on an invalid URL or outside a Tokio runtime.
pub(crate) fn open_link(
    url: &str,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<(Arc<Link>, tokio::runtime::Handle), StoreError> {
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| invalid_config(format!("redis needs a Tokio runtime: {e}")))?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout))
        // Few, short retries inside the manager: each operation is bounded by the response
        // timeout anyway, and a failed reconnect is retried by the next operation.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    // The URL may hold a password: the error names the problem, never the URL.
    let link = Link::open(url, manager_config).map_err(invalid_config)?;
    Ok((Arc::new(link), runtime))
}

fn invalid_config(what: String) -> StoreError {
    StoreError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, what))
}

/// Why Redis with these `CONFIG GET append*` settings may lose acknowledged writes, if it may.
fn durability_problem(settings: &HashMap<String, String>) -> Option<&'static str> {
    match (
        settings.get("appendonly").map(String::as_str),
        settings.get("appendfsync").map(String::as_str),
    ) {
        (Some("yes"), Some("always")) => None,
        (Some("yes"), _) => Some("the append-only file is not synced on every write"),
        _ => Some("no append-only file"),
    }
}

/// Maps a Redis error: our scripts' `WPCORRUPT` and unreadable replies are corruption;
/// everything else (I/O, timeouts, loading, read-only replicas, OOM) is temporary.
fn store_error(what: &str, error: &RedisError) -> StoreError {
    if error.code() == Some("WPLOST") {
        return StoreError::HistoryLost(format!("redis {what}: {error}"));
    }
    let corrupt = error.code() == Some("WPCORRUPT")
        || matches!(
            error.kind(),
            redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
        );
    if corrupt {
        StoreError::Corrupt(format!("redis {what}: {error}"))
    } else {
        StoreError::Unavailable(format!("redis {what}: {error}"))
    }
}

fn corrupt(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("redis {what}: {error}"))
}

/// A change as the scripts store it.
#[derive(Deserialize)]
struct Record {
    r: String,
    k: String,
    w: String,
    v: String,
    c: String,
    s: String,
    t: String,
    /// The deployer; absent in records written before it was kept.
    #[serde(default)]
    d: String,
}

fn decode_change(bytes: &[u8]) -> Result<Change, StoreError> {
    let record: Record = serde_json::from_slice(bytes).map_err(|e| corrupt("change record", e))?;
    let number = |field: &str, text: &str| {
        text.parse::<u64>()
            .map_err(|e| corrupt(&format!("change {field} {text:?}"), e))
    };
    Ok(Change {
        revision: number("revision", &record.r)?,
        kind: match record.k.as_str() {
            "put" => ChangeKind::Put,
            "delete" => ChangeKind::Delete,
            other => return Err(corrupt("change kind", other)),
        },
        worker: WorkerName::parse(&record.w).map_err(|e| corrupt("change worker", e))?,
        version: Version::parse(&record.v).map_err(|e| corrupt("change version", e))?,
        checksum: Checksum::parse(&record.c).map_err(|e| corrupt("change checksum", e))?,
        size: number("size", &record.s)?,
        timestamp_ms: record
            .t
            .parse::<i64>()
            .map_err(|e| corrupt("change timestamp", e))?,
        deployer: record.d.into(),
    })
}

/// Decodes log records and checks they run contiguously from `first`.
fn decode_run(records: &[Vec<u8>], first: Revision) -> Result<Vec<Change>, StoreError> {
    let mut changes = Vec::with_capacity(records.len());
    for (expected, record) in (first..).zip(records) {
        let change = decode_change(record)?;
        if change.revision != expected {
            return Err(StoreError::Corrupt(format!(
                "redis log: revision {} where {expected} belongs",
                change.revision
            )));
        }
        changes.push(change);
    }
    Ok(changes)
}

#[async_trait]
impl Store for RedisStore {
    async fn load(&self) -> Result<Recovered, StoreError> {
        if !self.durability_checked.swap(true, Ordering::Relaxed) {
            self.check_durability().await;
        }
        let (epoch, head, latest, tail): (String, Revision, Vec<Vec<u8>>, Vec<Vec<u8>>) = self
            .run("load", true, |mut connection| {
                let invocation = self.invocation(&self.scripts.load);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        let epoch = self.observe(&epoch, head)?;
        let first = (head + 1).saturating_sub(tail.len() as u64);
        let tail = decode_run(&tail, first)?;
        if head > 0 && tail.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "redis log is empty but head is {head}"
            )));
        }
        let mut latest = latest
            .iter()
            .map(|record| decode_change(record))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(change) = latest
            .iter()
            .find(|c| c.revision > head || c.kind != ChangeKind::Put)
        {
            return Err(StoreError::Corrupt(format!(
                "redis latest: {change:?} does not fit head {head}"
            )));
        }
        latest.sort_by_key(|c| c.revision);
        Ok(Recovered {
            epoch,
            head,
            latest,
            tail,
        })
    }

    async fn put_bundle(&self, checksum: &Checksum, code: Bytes) -> Result<(), StoreError> {
        let key = self.keys.bundle(checksum);
        self.run("put_bundle", true, |mut connection| {
            let mut command = redis::cmd("SET");
            command.arg(&key).arg(code.as_ref()).arg("NX");
            async move { command.query_async::<redis::Value>(&mut connection).await }
        })
        .await?;
        Ok(())
    }

    async fn bundle(&self, checksum: &Checksum) -> Result<Option<Bytes>, StoreError> {
        let key = self.keys.bundle(checksum);
        let code: Option<Vec<u8>> = self
            .run("bundle", true, |mut connection| {
                let mut command = redis::cmd("GET");
                command.arg(&key);
                async move { command.query_async(&mut connection).await }
            })
            .await?;
        match code {
            Some(code) if Checksum::of(&code) != *checksum => Err(StoreError::Corrupt(format!(
                "redis bundle {checksum} holds other code"
            ))),
            code => Ok(code.map(Bytes::from)),
        }
    }

    async fn apply(&self, proposal: Proposal, timestamp_ms: i64) -> Result<Outcome, StoreError> {
        let (op, worker, version, checksum, size, deployer) = match &proposal {
            Proposal::Put {
                worker,
                version,
                checksum,
                size,
                deployer,
            } => (
                "put",
                worker,
                version.as_str(),
                checksum.as_str(),
                *size,
                deployer,
            ),
            Proposal::Delete { worker, deployer } => ("delete", worker, "", "", 0, deployer),
        };
        let (epoch, head, status, payload): (String, Revision, String, Vec<u8>) = self
            // Not idempotent: a put that ran but whose answer was lost would come back
            // `Unchanged`, a delete `NotFound`.
            .run("apply", false, |mut connection| {
                let mut invocation = self.invocation(&self.scripts.apply);
                invocation
                    .arg(op)
                    .arg(worker.as_str())
                    .arg(version)
                    .arg(checksum)
                    .arg(size)
                    .arg(timestamp_ms)
                    .arg(self.retain)
                    .arg(&self.keys.hint)
                    .arg(&**deployer);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        self.observe(&epoch, head)?;
        match status.as_str() {
            "committed" => {
                let change = decode_change(&payload)?;
                if change.revision != head {
                    return Err(corrupt("apply", "committed revision is not the head"));
                }
                self.head.send_replace(change.revision);
                self.replicated("apply").await?;
                Ok(Outcome::Committed(change))
            }
            "unchanged" => {
                let change = decode_change(&payload)?;
                // A retry of a put whose first answer was "not replicated" must not be
                // acknowledged before the replicas hold it either.
                self.replicated("apply").await?;
                Ok(Outcome::Unchanged(change))
            }
            "conflict" => Ok(Outcome::Conflict {
                existing: Checksum::parse(&String::from_utf8_lossy(&payload))
                    .map_err(|e| corrupt("stored checksum", e))?,
            }),
            "notfound" => Ok(Outcome::NotFound),
            other => Err(corrupt("apply status", other)),
        }
    }

    async fn changes_after(&self, after: Revision, limit: usize) -> Result<Tail, StoreError> {
        let (epoch, head, status, records): (String, Revision, String, Vec<Vec<u8>>) = self
            .run("changes_after", true, |mut connection| {
                let mut invocation = self.invocation(&self.scripts.changes);
                invocation
                    .arg(after)
                    // At least 1 (Redis reads COUNT 0 as "no limit") and a count Redis
                    // accepts; trimmed to `limit` below, and fewer is always allowed.
                    .arg(limit.clamp(1, 1 << 20));
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        let epoch = self.observe(&epoch, head)?;
        match status.as_str() {
            "gone" => Ok(Tail::Gone { epoch }),
            "changes" => {
                let mut changes = decode_run(&records, after + 1)?;
                changes.truncate(limit);
                Ok(Tail::Changes { epoch, changes })
            }
            other => Err(corrupt("changes_after status", other)),
        }
    }

    async fn head(&self) -> Result<(Epoch, Revision), StoreError> {
        let (epoch, head): (String, Revision) = self
            .run("head", true, |mut connection| {
                let invocation = self.invocation(&self.scripts.head);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        Ok((self.observe(&epoch, head)?, head))
    }

    /// `SET NX EXAT`: one key per request, expiring with its window, shared by every core.
    async fn claim_request(&self, key: &str, expires_unix_s: i64) -> Result<bool, StoreError> {
        let redis_key = self.keys.claim(key);
        // Idempotent only in effect, not in answer: a retried `SET NX` whose first try landed
        // would answer "replayed". Never retried after a lost answer, so the caller sees 503.
        let set: Option<String> = self
            .run("claim", false, |mut connection| {
                let mut command = redis::cmd("SET");
                command
                    .arg(&redis_key)
                    .arg(1)
                    .arg("NX")
                    .arg("EXAT")
                    .arg(expires_unix_s.max(1));
                async move { command.query_async(&mut connection).await }
            })
            .await?;
        if set.is_some() {
            self.replicated("claim").await?;
        }
        Ok(set.is_some())
    }

    async fn reseed(&self, latest: &[Change], timestamp_ms: i64) -> Result<Reseeded, StoreError> {
        let records: Vec<String> = (1..)
            .zip(latest)
            .map(|(revision, change)| {
                serde_json::json!({
                    "r": revision.to_string(), "k": "put", "w": change.worker.as_str(),
                    "v": change.version.as_str(), "c": change.checksum.as_str(),
                    "s": change.size.to_string(), "t": timestamp_ms.to_string(),
                    "d": &*change.deployer,
                })
                .to_string()
            })
            .collect();
        let (epoch, head, status): (String, Revision, String) = self
            // Safe to retry: a second run after a lost answer finds the history seeded and
            // answers `notlost` (the caller then just reloads).
            .run("reseed", true, |mut connection| {
                let mut invocation = self.invocation(&self.scripts.reseed);
                invocation
                    .arg(self.retain)
                    .arg(&self.keys.hint)
                    .arg(&records);
                async move { invocation.invoke_async(&mut connection).await }
            })
            .await?;
        let epoch = self.observe(&epoch, head)?;
        match status.as_str() {
            "seeded" => {
                self.head.send_replace(head);
                self.replicated("reseed").await?;
                Ok(Reseeded::Seeded { epoch, head })
            }
            "notlost" => Ok(Reseeded::NotLost),
            other => Err(corrupt("reseed status", other)),
        }
    }

    fn head_hint(&self) -> watch::Receiver<Revision> {
        self.head.subscribe()
    }

    /// Queues the record and answers at once: a background task merges it into Redis (see
    /// [`registry`]), and [`Store::consumers`] shows it meanwhile.
    async fn save_consumer(&self, record: &ConsumerRecord) -> Result<(), StoreError> {
        self.registry.save(record);
        Ok(())
    }

    async fn consumers(&self) -> Result<Vec<ConsumerRecord>, StoreError> {
        self.registry.read().await
    }

    async fn remove_consumer(&self, id: &ConsumerId) -> Result<bool, StoreError> {
        self.registry.remove(id).await
    }

    /// Writes the registry saves that wait; the background tasks stop when the store is
    /// dropped.
    async fn close(&self) {
        if let Err(error) = self.registry.flush().await {
            tracing::error!(%error, "consumer registry saves not written to redis before shutdown");
        }
    }
}

/// Keeps one pub/sub subscription to the hint channel and feeds `head` from it, reconnecting
/// with jittered exponential backoff. Logs when the subscription is lost and when it is back,
/// not on every retry. Ends when `cancel` fires (the store was dropped).
async fn follow_hints(
    link: Arc<Link>,
    channel: String,
    head: watch::Sender<Revision>,
    connect_timeout: Duration,
    response_timeout: Duration,
    cancel: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = FIRST_BACKOFF;
    let mut down = false;
    loop {
        let subscribe = subscribe(&link, &channel, connect_timeout, response_timeout);
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            subscribed = subscribe => subscribed,
        };
        let error = match subscribed {
            Ok(pubsub) => {
                if down {
                    tracing::info!(%channel, "redis hint subscription restored");
                    down = false;
                }
                backoff = FIRST_BACKOFF;
                // Commits may have happened while nobody listened: wake the followers.
                head.send_modify(|_| {});
                match listen(pubsub, &head, response_timeout, &cancel).await {
                    Some(error) => error,
                    None => return,
                }
            }
            Err(error) => error,
        };
        // With Sentinels, the master may have moved.
        link.renew().await;
        if !down {
            tracing::warn!(%channel, %error, "redis hint subscription down; retrying with backoff (the core keeps polling)");
            down = true;
        }
        let jittered = backoff / 2 + backoff.mul_f64(rand::random::<f64>() / 2.0);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(jittered) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A pub/sub connection subscribed to `channel`, or why not, each step within its timeout.
pub(crate) async fn subscribe(
    link: &Link,
    channel: &str,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<PubSub, String> {
    let client = tokio::time::timeout(connect_timeout, link.client())
        .await
        .map_err(|_| format!("no master named within {connect_timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let mut pubsub = tokio::time::timeout(connect_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no connection within {connect_timeout:?}"))?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(response_timeout, pubsub.subscribe(channel))
        .await
        .map_err(|_| format!("no SUBSCRIBE answer within {response_timeout:?}"))?
        .map_err(|e| e.to_string())?;
    Ok(pubsub)
}

/// Forwards hints until the connection fails (returns why) or `cancel` fires (returns `None`).
/// Pings now and then so that a silently dead connection is noticed.
async fn listen(
    pubsub: PubSub,
    head: &watch::Sender<Revision>,
    response_timeout: Duration,
    cancel: &CancellationToken,
) -> Option<String> {
    const PING_EVERY: Duration = Duration::from_secs(15);
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return None,
            message = messages.next() => match message {
                None => return Some("connection closed".to_owned()),
                Some(message) => match message.get_payload::<u64>() {
                    Ok(revision) => {
                        head.send_replace(revision);
                    }
                    Err(error) => tracing::debug!(%error, "ignoring a malformed hint"),
                },
            },
            _ = ping.tick() => {
                match tokio::time::timeout(response_timeout, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Some(error.to_string()),
                    Err(_) => return Some(format!("no PING answer within {response_timeout:?}")),
                }
            }
        }
    }
}

/// How every script starts. KEYS: epoch, head, log, versions, latest. ARGV[1]: a fresh epoch
/// to use if there is none; ARGV[2], ARGV[3]: the epoch and head this store last saw. Leaves
/// `epoch`, `head` and `lost` (the history the caller followed is gone) in locals.
const STATE: &str = r"
local head = tonumber(redis.call('GET', KEYS[2]) or '0')
if not head then
  return redis.error_reply('WPCORRUPT head is not a number')
end
local epoch = redis.call('GET', KEYS[1])
local lost = ARGV[2] ~= '' and ((not epoch) or (epoch == ARGV[2] and head < tonumber(ARGV[3])))
";

/// Shared by every script but [`RESEED`], after [`STATE`]: refuses a lost history, creates
/// the epoch on first use.
const PREAMBLE: &str = r"
if lost then
  -- The history this caller followed is gone (flushed, restarted empty, failed over to a
  -- replica without the last writes). Change nothing: the caller's core re-seeds it.
  return redis.error_reply('WPLOST epoch ' .. ARGV[2] .. ' at head ' .. ARGV[3] ..
    ' is gone (store epoch ' .. (epoch or 'none') .. ', head ' .. string.format('%d', head) .. ')')
end
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local function log_values(entries)
  local values = {}
  for i, entry in ipairs(entries) do
    values[i] = entry[2][2]
  end
  return values
end
";

/// Returns epoch, head.
const HEAD: &str = r"
return {epoch, head}
";

/// [`Store::reseed`], after [`STATE`] but not the preamble. ARGV[1]: the new epoch; 2, 3:
/// the epoch and head the caller followed; 4: retain; 5: hint channel; 6..: the change
/// records to seed, revisions 1..n. Seeds only while that history is still lost (no epoch, or
/// the same epoch with a lower head); otherwise answers 'notlost' and changes nothing.
/// Returns epoch, head, 'seeded' | 'notlost'.
const RESEED: &str = r"
if epoch and not lost then
  return {epoch, head, 'notlost'}
end
-- What a stale restore left of the lost history goes; `versions` stays (immutability).
redis.call('DEL', KEYS[3], KEYS[5])
epoch = ARGV[1]
redis.call('SET', KEYS[1], epoch)
local revision = 0
for i = 6, #ARGV do
  local ok, c = pcall(cjson.decode, ARGV[i])
  if not ok or type(c) ~= 'table' then
    return redis.error_reply('WPCORRUPT seed record does not decode')
  end
  revision = revision + 1
  redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], string.format('%d-0', revision), 'c', ARGV[i])
  redis.call('HSET', KEYS[4], c.w .. '/' .. c.v, c.c)
  redis.call('HSET', KEYS[5], c.w, ARGV[i])
end
redis.call('SET', KEYS[2], string.format('%d', revision))
redis.call('PUBLISH', ARGV[5], string.format('%d', revision))
return {epoch, revision, 'seeded'}
";

/// Returns epoch, head, latest records, the whole retained log.
const LOAD: &str = r"
return {epoch, head, redis.call('HVALS', KEYS[5]), log_values(redis.call('XRANGE', KEYS[3], '-', '+'))}
";

/// ARGV[4]: after; ARGV[5]: limit (at least 1). Returns epoch, head, 'gone' | 'changes', records.
const CHANGES: &str = r"
local after = tonumber(ARGV[4])
if after > head then
  return {epoch, head, 'gone', {}}
end
if after == head then
  return {epoch, head, 'changes', {}}
end
local first = string.format('%d-0', after + 1)
local entries = redis.call('XRANGE', KEYS[3], first, '+', 'COUNT', ARGV[5])
if #entries == 0 or entries[1][1] ~= first then
  return {epoch, head, 'gone', {}}
end
return {epoch, head, 'changes', log_values(entries)}
";

/// `StateMachine::decide` and `commit` in one step. ARGV[4]: 'put' | 'delete'; 5: worker;
/// 6: version; 7: checksum; 8: size; 9: timestamp ms; 10: retain; 11: hint channel;
/// 12: deployer (empty: not said).
/// Returns epoch, head, status, payload (the change record, or the existing checksum).
const APPLY: &str = r"
local worker = ARGV[5]
local current = redis.call('HGET', KEYS[5], worker)
local latest = nil
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if not ok or type(decoded) ~= 'table' then
    return redis.error_reply('WPCORRUPT latest record of ' .. worker .. ' does not decode')
  end
  latest = decoded
end
local kind, version, checksum, size
if ARGV[4] == 'put' then
  kind, version, checksum, size = 'put', ARGV[6], ARGV[7], ARGV[8]
  local known = redis.call('HGET', KEYS[4], worker .. '/' .. version)
  if known and known ~= checksum then
    return {epoch, head, 'conflict', known}
  end
  if latest and latest.v == version then
    return {epoch, head, 'unchanged', current}
  end
else
  if not latest then
    return {epoch, head, 'notfound', ''}
  end
  kind, version, checksum, size = 'delete', latest.v, latest.c, latest.s
end
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local expected_last = head > 0 and string.format('%d-0', head) or nil
if (last[1] and last[1][1]) ~= expected_last then
  return redis.error_reply('WPCORRUPT log does not end at head ' .. string.format('%d', head))
end
local revision = head + 1
local record = cjson.encode({r = string.format('%d', revision), k = kind, w = worker,
  v = version, c = checksum, s = size, t = ARGV[9], d = ARGV[12]})
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[10], string.format('%d-0', revision), 'c', record)
redis.call('SET', KEYS[2], string.format('%d', revision))
if kind == 'put' then
  redis.call('HSET', KEYS[4], worker .. '/' .. version, checksum)
  redis.call('HSET', KEYS[5], worker, record)
else
  redis.call('HDEL', KEYS[5], worker)
end
redis.call('PUBLISH', ARGV[11], string.format('%d', revision))
return {epoch, revision, 'committed', record}
";

#[cfg(test)]
mod tests {
    use std::{
        process::Stdio,
        sync::Arc,
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{
        core::types::ConsumerId,
        store::conformance::{self, put},
    };
    use redis::Client;

    const REDIS: &str = "redis://127.0.0.1:6379";

    fn config(url: &str, prefix: &str) -> RedisConfig {
        RedisConfig {
            url: url.to_owned(),
            key_prefix: prefix.to_owned(),
            retain: 1000,
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(2),
            min_replicas: 0,
        }
    }

    fn fresh_prefix() -> String {
        format!("wptest-{}", hex::encode(rand::random::<[u8; 6]>()))
    }

    fn open(url: &str, prefix: &str) -> RedisStore {
        RedisStore::connect(config(url, prefix)).unwrap()
    }

    /// Deletes every key under `prefix`.
    async fn remove_keys(url: &str, prefix: &str) {
        let client = Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }

    async fn committed(store: &RedisStore, worker: &str, version: &str) -> Revision {
        match store
            .apply(put(worker, version, version.as_bytes()), 1)
            .await
            .unwrap()
        {
            Outcome::Committed(change) => change.revision,
            other => panic!("expected a commit, got {other:?}"),
        }
    }

    /// Commits through `from` until `to` hints at that very revision: the subscription of
    /// `to` may still be coming up, and a hint published before it listens is lost by design.
    async fn hint_travels(from: &RedisStore, to: &RedisStore, worker: &str) {
        let mut hint = to.head_hint();
        let deadline = Instant::now() + Duration::from_secs(15);
        for attempt in 0.. {
            assert!(Instant::now() < deadline, "no hint crossed between stores");
            let revision = committed(from, worker, &format!("h{attempt}")).await;
            let arrived = tokio::time::timeout(Duration::from_millis(300), async {
                loop {
                    if *hint.borrow_and_update() == revision {
                        return;
                    }
                    if hint.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            if arrived.is_ok() && *hint.borrow() == revision {
                return;
            }
        }
    }

    #[tokio::test]
    async fn redis_store_passes_the_conformance_suite() {
        let prefixes = Arc::new(Mutex::new(Vec::new()));
        let made = prefixes.clone();
        conformance::run_all(move || {
            let prefix = fresh_prefix();
            made.lock().unwrap().push(prefix.clone());
            async move { open(REDIS, &prefix) }
        })
        .await;
        let prefixes = prefixes.lock().unwrap().clone();
        for prefix in prefixes {
            remove_keys(REDIS, &prefix).await;
        }
    }

    #[tokio::test]
    async fn redis_store_survives_reopen() {
        let prefix = fresh_prefix();
        conformance::survives_reopen(open(REDIS, &prefix), |first| {
            drop(first);
            open(REDIS, &prefix)
        })
        .await;
        remove_keys(REDIS, &prefix).await;
    }

    /// Applies per second for 1000 concurrent puts spread over `stores`.
    async fn throughput(stores: &[Arc<RedisStore>], tag: &str) -> f64 {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..1000 {
            let store = stores[i % stores.len()].clone();
            let version = format!("{tag}-{i}");
            tasks.push(tokio::spawn(async move {
                store
                    .apply(put(&format!("t{}", i % 50), &version, b"z"), 1)
                    .await
            }));
        }
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Ok(Outcome::Committed(_))));
        }
        1000.0 / started.elapsed().as_secs_f64()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_stores_on_one_prefix_share_one_gap_free_order_and_hints() {
        let prefix = fresh_prefix();
        let stores = [
            Arc::new(open(REDIS, &prefix)),
            Arc::new(open(REDIS, &prefix)),
        ];
        let epoch = stores[0].load().await.unwrap().epoch;
        assert_eq!(stores[1].load().await.unwrap().epoch, epoch);

        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = stores[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                store
                    .apply(put(&format!("w{}", i % 10), &i.to_string(), b"x"), 1)
                    .await
            }));
        }
        let mut revisions = Vec::new();
        for task in tasks {
            match task.await.unwrap().unwrap() {
                Outcome::Committed(change) => revisions.push(change.revision),
                other => panic!("{other:?}"),
            }
        }
        revisions.sort_unstable();
        assert_eq!(revisions, (1..=200).collect::<Vec<_>>());
        let state = stores[1].load().await.unwrap();
        assert_eq!(
            (state.head, state.latest.len(), state.tail.len()),
            (200, 10, 200)
        );

        let one = throughput(&stores[..1], "one").await;
        let two = throughput(&stores, "two").await;
        println!(
            "redis applies (debug build, 1000 concurrent puts): one store {one:.0}/s, two stores {two:.0}/s"
        );

        hint_travels(&stores[0], &stores[1], "hinted-a-to-b").await;
        hint_travels(&stores[1], &stores[0], "hinted-b-to-a").await;
        drop(stores);
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test]
    async fn trimmed_changes_are_gone_and_retained_ones_contiguous() {
        let prefix = fresh_prefix();
        let store = RedisStore::connect(RedisConfig {
            retain: 5,
            ..config(REDIS, &prefix)
        })
        .unwrap();
        for i in 0..20 {
            committed(&store, "a", &i.to_string()).await;
        }
        assert!(matches!(
            store.changes_after(3, 100).await.unwrap(),
            Tail::Gone { .. }
        ));
        assert!(matches!(
            store.changes_after(14, 100).await.unwrap(),
            Tail::Gone { .. }
        ));
        let Tail::Changes { changes, .. } = store.changes_after(15, 100).await.unwrap() else {
            panic!("16 is retained");
        };
        assert_eq!(
            changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
            [16, 17, 18, 19, 20]
        );
        let state = store.load().await.unwrap();
        assert_eq!(state.tail.len(), 5);
        assert_eq!(state.tail[0].revision, 16);
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test]
    async fn unreachable_redis_answers_unavailable_within_the_timeout() {
        let port = free_port();
        let mut config = config(&format!("redis://127.0.0.1:{port}"), &fresh_prefix());
        config.response_timeout = Duration::from_millis(800);
        let store = RedisStore::connect(config).unwrap();
        let started = Instant::now();
        let result = store.apply(put("a", "1", b"x"), 1).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(matches!(
            store.load().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(started.elapsed() < Duration::from_millis(2 * 800 + 500));
    }

    #[tokio::test]
    async fn dropping_the_store_stops_its_hint_task() {
        let store = open(REDIS, &fresh_prefix());
        let mut hint = store.head_hint();
        drop(store);
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while hint.changed().await.is_ok() {}
        })
        .await;
        assert!(closed.is_ok(), "the hint task still holds its sender");
    }

    #[test]
    fn only_an_append_only_file_synced_on_every_write_is_durable() {
        let settings = |aof: &str, fsync: &str| {
            HashMap::from([
                ("appendonly".to_owned(), aof.to_owned()),
                ("appendfsync".to_owned(), fsync.to_owned()),
            ])
        };
        assert_eq!(durability_problem(&settings("yes", "always")), None);
        assert!(durability_problem(&settings("yes", "everysec")).is_some());
        assert!(durability_problem(&settings("no", "always")).is_some());
        assert!(durability_problem(&HashMap::new()).is_some());
    }

    #[tokio::test]
    async fn an_invalid_url_is_refused_at_connect() {
        assert!(RedisStore::connect(config("http://nope", "p")).is_err());
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// A private, unpersisted `redis-server` on `port`, answering PING when this returns.
    async fn start_redis(port: u16) -> TestRedis {
        start_redis_with(port, &[]).await
    }

    /// A `redis-server` of a test, with a directory of its own (a replica writes the
    /// primary's snapshot there); killed when dropped.
    struct TestRedis {
        child: tokio::process::Child,
        _dir: tempfile::TempDir,
    }

    impl TestRedis {
        async fn kill(&mut self) -> std::io::Result<()> {
            self.child.kill().await
        }
    }

    /// [`start_redis`] with more arguments (`--replicaof …`).
    async fn start_redis_with(port: u16, extra: &[&str]) -> TestRedis {
        let port_text = port.to_string();
        let mut args = vec!["--port", &port_text, "--save", "", "--appendonly", "no"];
        args.extend(extra);
        redis_server(&args, port).await
    }

    /// `redis-server` with `args` (maybe in Sentinel mode, on `port`), in a temp dir, once it
    /// answers PING.
    async fn redis_server(args: &[&str], port: u16) -> TestRedis {
        let dir = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new("redis-server")
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let client = Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return TestRedis { child, _dir: dir };
            }
            assert!(Instant::now() < deadline, "redis-server did not come up");
            // Polling interval while the server starts, bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_redis_restarts_empty_one_of_two_stores_reseeds_a_new_epoch() {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("redis-server not installed; skipping");
            return;
        }
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}");
        let mut server = start_redis(port).await;
        let prefix = fresh_prefix();
        let mut config = config(&url, &prefix);
        config.response_timeout = Duration::from_millis(800);
        let (a, b) = (
            RedisStore::connect(config.clone()).unwrap(),
            RedisStore::connect(config.clone()).unwrap(),
        );
        let before = a.load().await.unwrap().epoch;
        assert_eq!(committed(&a, "a", "1").await, 1);
        hint_travels(&b, &a, "before").await;

        server.kill().await.unwrap();
        let started = Instant::now();
        let result = a.apply(put("a", "2", b"2"), 1).await;
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));

        let _server = start_redis(port).await;
        // A store that followed the lost history changes nothing until it is re-seeded.
        assert!(matches!(a.load().await, Err(StoreError::HistoryLost(_))));
        assert!(matches!(
            a.apply(put("a", "3", b"3"), 1).await,
            Err(StoreError::HistoryLost(_))
        ));
        let seed = held_put("a", "1", 1);
        // Both notice; exactly one seeds.
        let (first, second) = tokio::join!(
            a.reseed(std::slice::from_ref(&seed), 5),
            b.reseed(std::slice::from_ref(&seed), 5)
        );
        let outcomes = [first.unwrap(), second.unwrap()];
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Reseeded::Seeded { head: 1, .. }))
                .count(),
            1,
            "{outcomes:?}"
        );
        assert!(outcomes.contains(&Reseeded::NotLost), "{outcomes:?}");
        let state = a.load().await.unwrap();
        assert_ne!(state.epoch, before, "history lost: new epoch");
        assert_eq!(state.head, 1);
        assert_eq!(state.latest[0].version.as_str(), "1");
        assert_eq!(b.head().await.unwrap(), (state.epoch.clone(), 1));
        assert_eq!(committed(&a, "a", "3").await, 2);
        assert!(matches!(
            b.changes_after(2, 10).await.unwrap(),
            Tail::Changes { epoch, changes } if epoch == state.epoch && changes.is_empty()
        ));
        hint_travels(&b, &a, "after").await;
    }

    fn consumer(
        endpoint: &str,
        labels: &[(&str, &str)],
        transport: &str,
        seen: (i64, i64),
        acked: Revision,
    ) -> ConsumerRecord {
        ConsumerRecord {
            id: ConsumerId::authorize("edge-1", "edge-1/a").unwrap(),
            endpoint: endpoint.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            transport: transport.to_owned(),
            first_seen_ms: seen.0,
            last_seen_ms: seen.1,
            last_acked_revision: acked,
        }
    }

    /// Saves and writes to Redis at once, so that Redis does the merging.
    async fn save_now(store: &RedisStore, record: &ConsumerRecord) {
        store.save_consumer(record).await.unwrap();
        store.registry.flush().await.unwrap();
    }

    #[tokio::test]
    async fn registry_records_saved_by_two_stores_merge_instead_of_overwriting() {
        let prefix = fresh_prefix();
        let (a, b) = (open(REDIS, &prefix), open(REDIS, &prefix));
        let registered = consumer("10.0.0.1:9000", &[("region", "eu")], "grpc", (100, 200), 7);
        save_now(&a, &registered).await;

        // Core B only saw an older ack from this consumer, over QUIC, later.
        save_now(&b, &consumer("", &[], "quic", (150, 300), 3)).await;
        let merged = consumer("10.0.0.1:9000", &[("region", "eu")], "quic", (100, 300), 7);
        assert_eq!(a.consumers().await.unwrap(), std::slice::from_ref(&merged));
        assert_eq!(b.consumers().await.unwrap(), std::slice::from_ref(&merged));

        // A registration from before the last one changes only what only grows.
        let stale = consumer("10.0.0.9:1", &[("region", "us")], "grpc", (90, 150), 5);
        save_now(&a, &stale).await;
        let first_seen_earlier = ConsumerRecord {
            first_seen_ms: 90,
            ..merged.clone()
        };
        assert_eq!(b.consumers().await.unwrap(), [first_seen_earlier]);

        // A newer registration replaces endpoint and labels together, even with no labels;
        // revisions past 2^53 still compare exactly.
        let moved = consumer("10.0.0.2:9000", &[], "grpc", (400, 400), (1 << 53) + 1);
        save_now(&b, &moved).await;
        save_now(&b, &consumer("", &[], "", (400, 400), 1 << 53)).await;
        assert_eq!(
            a.consumers().await.unwrap(),
            [consumer(
                "10.0.0.2:9000",
                &[],
                "grpc",
                (90, 400),
                (1 << 53) + 1
            )]
        );
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_saves_from_two_stores_keep_the_highest_ack_and_last_seen() {
        let prefix = fresh_prefix();
        let stores = [
            Arc::new(open(REDIS, &prefix)),
            Arc::new(open(REDIS, &prefix)),
        ];
        // Descending first: a plain overwrite would end at the lowest.
        for acked in (0..20).rev() {
            let record = consumer("e", &[], "grpc", (1, 1000 - acked), acked as Revision);
            save_now(&stores[acked as usize % 2], &record).await;
        }
        let fresh = open(REDIS, &prefix);
        assert_eq!(fresh.consumers().await.unwrap()[0].last_acked_revision, 19);

        let tasks: Vec<_> = (0..200_i64)
            .map(|i| {
                let store = stores[(i % 2) as usize].clone();
                // Interleaved so that neither store's saves arrive in order.
                let acked = if i % 2 == 0 { 200 - i } else { i };
                tokio::spawn(async move {
                    let record = consumer("e", &[], "grpc", (1, 2000 + i), acked as Revision);
                    save_now(&store, &record).await;
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let record = &fresh.consumers().await.unwrap()[0];
        assert_eq!(
            (
                record.last_acked_revision,
                record.last_seen_ms,
                record.first_seen_ms
            ),
            (200, 2199, 1)
        );
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test]
    async fn an_unreadable_registry_record_is_left_out_and_replaced_by_the_next_save() {
        let prefix = fresh_prefix();
        let store = open(REDIS, &prefix);
        let client = Client::open(REDIS).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let unreadable = r#"{"id":"edge-1/a","endpoint":"","labels":{},"transport":"","first_seen_ms":"1","last_seen_ms":1}"#;
        for id in ["edge-1/a", "edge-9"] {
            let _: () = redis::cmd("HSET")
                .arg(format!("{prefix}:consumers"))
                .arg(id)
                .arg(unreadable)
                .query_async::<redis::Value>(&mut connection)
                .await
                .map(drop)
                .unwrap();
        }
        assert_eq!(store.consumers().await.unwrap(), []);
        let record = consumer("e", &[], "grpc", (1, 2), 3);
        save_now(&store, &record).await;
        assert_eq!(open(REDIS, &prefix).consumers().await.unwrap(), [record]);
        let untouched: String = redis::cmd("HGET")
            .arg(format!("{prefix}:consumers"))
            .arg("edge-9")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(untouched, unreadable);
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_saves_wait_out_an_outage_and_are_written_when_redis_is_back() {
        let port = free_port();
        let url = format!("redis://127.0.0.1:{port}");
        let mut server = start_redis(port).await;
        let prefix = fresh_prefix();
        let mut config = config(&url, &prefix);
        config.response_timeout = Duration::from_millis(500);
        let store = RedisStore::connect(config.clone()).unwrap();
        save_now(&store, &consumer("e", &[], "grpc", (1, 2), 1)).await;

        server.kill().await.unwrap();
        let started = Instant::now();
        for acked in 2..=5_u64 {
            let record = consumer("e", &[], "grpc", (1, 2 + acked as i64), acked);
            store.save_consumer(&record).await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "saves wait for nobody"
        );
        assert!(matches!(
            store.consumers().await,
            Err(StoreError::Unavailable(_))
        ));

        // The unpersisted server comes back empty; the waiting save is written by itself.
        let _server = start_redis(port).await;
        let reader = RedisStore::connect(config).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = reader.consumers().await.unwrap_or_default();
            if records.first().map(|r| r.last_acked_revision) == Some(5) {
                assert_eq!(records, [consumer("e", &[], "grpc", (1, 7), 5)]);
                break;
            }
            assert!(Instant::now() < deadline, "never written: {records:?}");
            // Polling while the writer backs off, bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn close_writes_what_waits() {
        let prefix = fresh_prefix();
        let store = open(REDIS, &prefix);
        // Text that JSON must escape survives the script's decoding and encoding.
        let labels = [("zone/a", "é \"quoted\" \\ \u{1}"), ("", "")];
        save_now(&store, &consumer("e", &labels, "quic", (1, 2), 3)).await;
        let record = consumer("e", &labels, "quic", (1, 2), 4);
        store.save_consumer(&record).await.unwrap();
        store.close().await;
        let raw: Option<String> = {
            let client = Client::open(REDIS).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            redis::cmd("HGET")
                .arg(format!("{prefix}:consumers"))
                .arg("edge-1/a")
                .query_async(&mut connection)
                .await
                .unwrap()
        };
        assert!(raw.is_some(), "close did not write the save");
        assert_eq!(open(REDIS, &prefix).consumers().await.unwrap(), [record]);
        remove_keys(REDIS, &prefix).await;
    }

    #[tokio::test]
    async fn same_epoch_with_a_shorter_history_is_lost_until_reseeded_in_a_new_epoch() {
        let prefix = fresh_prefix();
        let store = open(REDIS, &prefix);
        let before = store.load().await.unwrap().epoch;
        committed(&store, "a", "1").await;
        committed(&store, "a", "2").await;
        // Redis restored from an older snapshot: the epoch survived, the last change did not.
        let client = Client::open(REDIS).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}:head"))
            .arg(1)
            .query_async(&mut connection)
            .await
            .unwrap();
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}:log"))
            .query_async::<redis::Value>(&mut connection)
            .await
            .map(drop)
            .unwrap();
        let _: () = redis::cmd("XADD")
            .arg(format!("{prefix}:log"))
            .arg("1-0")
            .arg("c")
            .arg(
                serde_json::json!({"r":"1","k":"put","w":"a","v":"1",
                    "c": Checksum::of(b"1").as_str(),"s":"1","t":"1"})
                .to_string(),
            )
            .query_async::<redis::Value>(&mut connection)
            .await
            .map(drop)
            .unwrap();
        assert!(matches!(
            store.changes_after(2, 10).await,
            Err(StoreError::HistoryLost(_))
        ));
        // What the core held: `a` at version 2.
        let held = [held_put("a", "2", 2)];
        assert_eq!(
            store.reseed(&held, 9).await.unwrap(),
            Reseeded::Seeded {
                epoch: store.head().await.unwrap().0,
                head: 1
            }
        );
        assert_ne!(store.head().await.unwrap().0, before);
        assert_eq!(
            committed(&store, "a", "3").await,
            2,
            "a revision in the new epoch"
        );
        remove_keys(REDIS, &prefix).await;
    }

    async fn command(url: &str, args: &[&str]) -> redis::Value {
        let client = Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await.unwrap()
    }

    #[test]
    fn a_record_written_before_deployers_were_kept_decodes_with_none() {
        let sum = Checksum::of(b"x");
        let old = format!(r#"{{"r":"4","k":"put","w":"a","v":"1","c":"{sum}","s":"1","t":"9"}}"#);
        let change = decode_change(old.as_bytes()).unwrap();
        assert_eq!((change.revision, &*change.deployer), (4, ""));
        let new = old.replace(r#""t":"9""#, r#""t":"9","d":"team-shop""#);
        assert_eq!(
            &*decode_change(new.as_bytes()).unwrap().deployer,
            "team-shop"
        );
    }

    /// The put a core holds for `worker` at `version` (code = the version's bytes).
    fn held_put(worker: &str, version: &str, revision: Revision) -> Change {
        Change {
            revision,
            kind: ChangeKind::Put,
            worker: WorkerName::parse(worker).unwrap(),
            version: Version::parse(version).unwrap(),
            checksum: Checksum::of(version.as_bytes()),
            size: version.len() as u64,
            timestamp_ms: 1,
            deployer: "".into(),
        }
    }

    /// Polls `args` on `url` until `done` holds for the reply (10 s at most).
    async fn until_reply(url: &str, args: &[&str], done: impl Fn(&redis::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let reply = command(url, args).await;
            if done(&reply) {
                return;
            }
            assert!(Instant::now() < deadline, "{args:?} on {url}: {reply:?}");
            // Polling a condition Redis announces nowhere, bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A primary and its replica (unpersisted, each `(port, process)`), once it is online.
    async fn primary_and_replica() -> ((u16, TestRedis), (u16, TestRedis)) {
        let (primary_port, replica_port) = (free_port(), free_port());
        let primary = start_redis(primary_port).await;
        let primary_port_text = primary_port.to_string();
        let replica = start_redis_with(
            replica_port,
            &["--replicaof", "127.0.0.1", &primary_port_text],
        )
        .await;
        let primary_url = format!("redis://127.0.0.1:{primary_port}");
        until_reply(&primary_url, &["INFO", "replication"], |info| {
            let info: String = redis::from_redis_value(info.clone()).unwrap_or_default();
            info.contains("connected_slaves:1") && info.contains("state=online")
        })
        .await;
        ((primary_port, primary), (replica_port, replica))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_min_replicas_a_change_is_acknowledged_only_once_a_replica_holds_it() {
        let ((primary_port, _primary), (replica_port, mut replica)) = primary_and_replica().await;
        let primary_url = format!("redis://127.0.0.1:{primary_port}");
        let replica_url = format!("redis://127.0.0.1:{replica_port}");
        let primary_port_text = primary_port.to_string();
        let prefix = fresh_prefix();
        let mut config = config(&primary_url, &prefix);
        config.min_replicas = 1;
        // WAIT gets half of it: room for a loaded machine's replica, short enough for the
        // case with no replica left.
        config.response_timeout = Duration::from_secs(3);
        let store = RedisStore::connect(config).unwrap();
        let epoch = store.load().await.unwrap().epoch;
        assert_eq!(committed(&store, "a", "1").await, 1);
        assert_eq!(committed(&store, "a", "2").await, 2);

        // The replica, promoted, holds every acknowledged change in the same epoch.
        command(&replica_url, &["REPLICAOF", "NO", "ONE"]).await;
        let promoted = open(&replica_url, &prefix);
        assert_eq!(promoted.head().await.unwrap(), (epoch.clone(), 2));

        // With no replica left, a change is not acknowledged, and says why.
        replica.kill().await.unwrap();
        let result = store.apply(put("a", "3", b"3"), 1).await;
        match result {
            Err(StoreError::Unavailable(why)) => {
                assert!(why.contains("--redis-min-replicas"), "{why}")
            }
            other => panic!("acknowledged without a replica: {other:?}"),
        }
        // A retry once a replica is back answers with the revision it got.
        let _replica = start_redis_with(
            replica_port,
            &["--replicaof", "127.0.0.1", &primary_port_text],
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match store.apply(put("a", "3", b"3"), 1).await {
                Ok(Outcome::Unchanged(change)) => {
                    assert_eq!(change.revision, 3);
                    break;
                }
                other => assert!(Instant::now() < deadline, "never acknowledged: {other:?}"),
            }
            // Retrying while the replica resynchronises, bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A Redis Sentinel on `port` watching `primary_port` as `wpmaster`, failing over after
    /// 500 ms; answers PING when this returns.
    async fn start_sentinel(port: u16, primary_port: u16, dir: &std::path::Path) -> TestRedis {
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nsentinel monitor wpmaster 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds wpmaster 500\n\
                 sentinel failover-timeout wpmaster 2000\n"
            ),
        )
        .unwrap();
        redis_server(&[config.to_str().unwrap(), "--sentinel"], port).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sentinel_url_follows_a_failover_without_a_restart() {
        let ((primary_port, mut primary), (replica_port, _replica)) = primary_and_replica().await;
        let sentinel_port = free_port();
        let sentinel_url = format!("redis://127.0.0.1:{sentinel_port}");
        let dir = tempfile::tempdir().unwrap();
        let _sentinel = start_sentinel(sentinel_port, primary_port, dir.path()).await;
        // The sentinel must know the replica (it learns it from the primary) to fail over.
        until_reply(
            &sentinel_url,
            &["SENTINEL", "REPLICAS", "wpmaster"],
            |replicas| matches!(replicas, redis::Value::Array(r) if !r.is_empty()),
        )
        .await;
        let prefix = fresh_prefix();
        let mut config = config(
            &format!("redis+sentinel://127.0.0.1:{sentinel_port}/wpmaster"),
            &prefix,
        );
        config.response_timeout = Duration::from_millis(800);
        let store = RedisStore::connect(config).unwrap();
        let epoch = store.load().await.unwrap().epoch;
        assert_eq!(committed(&store, "a", "1").await, 1);

        primary.kill().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let revision = loop {
            match store.apply(put("a", "2", b"2"), 1).await {
                Ok(Outcome::Committed(change)) => break change.revision,
                other => assert!(Instant::now() < deadline, "never failed over: {other:?}"),
            }
            // Retrying while the sentinel fails over, bounded by the deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(revision, 2, "the same history, on the promoted replica");
        assert_eq!(store.head().await.unwrap(), (epoch, 2));
        let promoted = format!("redis://127.0.0.1:{replica_port}");
        let role = command(&promoted, &["ROLE"]).await;
        assert!(format!("{role:?}").contains("master"), "{role:?}");
    }
}
