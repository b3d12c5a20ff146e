//! The fleet link over Redis, next to the Redis store's keys (same prefix).
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{prefix}:fleet:cores` | hash | core id → unix ms of its last heartbeat |
//! | `{prefix}:fleet:agg:<core>` | hash | worker → that core's aggregate (JSON) |
//! | `{prefix}:fleet:where` | hash | consumer id → the core it last subscribed on |
//! | `{prefix}:fleet:moved:<core>` | hash | worker (or `*`: every worker) → how many of that core's consumers subscribed elsewhere since it last wrote its aggregates (what a dead core still counts that is no longer its own) |
//! | `{prefix}:fleet:answer:<id>:<core>` | string | a core's answer to question `<id>`, expiring after a minute |
//! | `{prefix}:fleet` | pub/sub channel | signals: aggregates changed, questions, answered, news |
//!
//! Pub/sub is at-most-once: a lost "changed" signal costs a waiter latency until the next one
//! (or its deadline), never a wrong answer, since waiters read the aggregates themselves; a lost
//! question is answered by nobody and the asker counts that core's aggregates instead.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{CoreView, DEAD_AFTER, Fleet, HEARTBEAT, Heard, News};
use crate::{
    core::types::{ConsumerId, WorkerName},
    store::{
        StoreError,
        redis::{link::Link, open_link, subscribe},
    },
};

/// How long an answer stays readable.
const ANSWER_TTL: Duration = Duration::from_secs(60);
/// Questions and news waiting for the core to read them; more are dropped (and logged).
const HEARD_BACKLOG: usize = 1024;

/// How to reach Redis, and who this core is.
#[derive(Clone, Debug)]
pub struct RedisFleetConfig {
    /// The Redis URL (the store's).
    pub url: String,
    /// The store's key prefix.
    pub key_prefix: String,
    /// This core's id, unique in the fleet.
    pub core_id: String,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How long one operation may take.
    pub response_timeout: Duration,
    /// A dead core is forgotten (its aggregates dropped) this long after its last heartbeat.
    pub forget_after: Duration,
}

/// A [`Fleet`] over Redis; see the module docs.
pub struct RedisFleet {
    link: Arc<Link>,
    keys: Keys,
    core_id: String,
    response_timeout: Duration,
    views: Script,
    arrived: Script,
    changed: watch::Sender<u64>,
    heard: Mutex<Option<mpsc::Receiver<Heard>>>,
    /// Questions this core asked that wait for answers: id → who answered.
    asking: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>,
    _background: DropGuard,
}

#[derive(Clone)]
struct Keys {
    prefix: String,
    cores: String,
    channel: String,
}

impl Keys {
    fn aggregates(&self, core: &str) -> String {
        format!("{}:fleet:agg:{core}", self.prefix)
    }

    fn moved(&self, core: &str) -> String {
        format!("{}:fleet:moved:{core}", self.prefix)
    }

    fn answer(&self, id: &str, core: &str) -> String {
        format!("{}:fleet:answer:{id}:{core}", self.prefix)
    }
}

/// A signal on the channel.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Signal {
    Changed {
        from: String,
    },
    Ask {
        from: String,
        id: String,
        question: String,
    },
    Answered {
        from: String,
        id: String,
    },
    Subscribed {
        from: String,
        consumer: ConsumerId,
    },
    Registered {
        from: String,
        consumer: ConsumerId,
    },
    Deregistered {
        from: String,
        consumer: ConsumerId,
    },
}

impl Signal {
    fn from(&self) -> &str {
        match self {
            Self::Changed { from }
            | Self::Ask { from, .. }
            | Self::Answered { from, .. }
            | Self::Subscribed { from, .. }
            | Self::Registered { from, .. }
            | Self::Deregistered { from, .. } => from,
        }
    }
}

impl RedisFleet {
    /// Joins the fleet: starts the heartbeat and the signal subscription. Does not wait for
    /// Redis; fails only on an invalid URL or outside a Tokio runtime.
    pub fn connect(config: RedisFleetConfig) -> Result<Self, StoreError> {
        let (link, runtime) =
            open_link(&config.url, config.connect_timeout, config.response_timeout)?;
        let keys = Keys {
            prefix: config.key_prefix.clone(),
            cores: format!("{}:fleet:cores", config.key_prefix),
            channel: format!("{}:fleet", config.key_prefix),
        };
        let cancel = CancellationToken::new();
        let changed = watch::Sender::new(0);
        let (heard_tx, heard_rx) = mpsc::channel(HEARD_BACKLOG);
        let asking = Arc::new(Mutex::new(HashMap::new()));
        runtime.spawn(listen(
            link.clone(),
            keys.channel.clone(),
            config.core_id.clone(),
            Listeners {
                changed: changed.clone(),
                heard: heard_tx,
                asking: asking.clone(),
            },
            (config.connect_timeout, config.response_timeout),
            cancel.clone(),
        ));
        runtime.spawn(beat(
            link.clone(),
            config.response_timeout,
            keys.clone(),
            config.core_id.clone(),
            config.forget_after,
            cancel.clone(),
        ));
        Ok(Self {
            link,
            keys,
            core_id: config.core_id,
            response_timeout: config.response_timeout,
            views: Script::new(VIEWS),
            arrived: Script::new(ARRIVED),
            changed,
            heard: Mutex::new(Some(heard_rx)),
            asking,
            _background: cancel.drop_guard(),
        })
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &str,
        command: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        on_link(
            &self.link,
            self.response_timeout,
            what,
            |mut connection| async move { command.query_async(&mut connection).await },
        )
        .await
    }

    async fn signal(&self, signal: &Signal) -> Result<(), StoreError> {
        let text = serde_json::to_string(signal)
            .map_err(|e| StoreError::Corrupt(format!("fleet signal: {e}")))?;
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(&self.keys.channel).arg(text);
        self.run::<()>("signal", &pipe).await
    }

    fn asking(&self) -> MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<String>>> {
        // Plain map inserts and removes: a poisoned lock still holds a consistent map.
        self.asking.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Fleet for RedisFleet {
    fn core_id(&self) -> &str {
        &self.core_id
    }

    fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn heard(&self) -> Option<mpsc::Receiver<Heard>> {
        self.heard.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    async fn publish(&self, aggregates: &[(WorkerName, Option<String>)]) -> Result<(), StoreError> {
        if aggregates.is_empty() {
            return Ok(());
        }
        let key = self.keys.aggregates(&self.core_id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (worker, aggregate) in aggregates {
            match aggregate {
                Some(json) => pipe.cmd("HSET").arg(&key).arg(worker.as_str()).arg(json),
                None => pipe.cmd("HDEL").arg(&key).arg(worker.as_str()),
            }
            .ignore();
        }
        // These aggregates leave out the consumers that moved away (see `ARRIVED`).
        pipe.cmd("DEL").arg(self.keys.moved(&self.core_id)).ignore();
        let signal = serde_json::to_string(&Signal::Changed {
            from: self.core_id.clone(),
        })
        .map_err(|e| StoreError::Corrupt(format!("fleet signal: {e}")))?;
        pipe.cmd("PUBLISH")
            .arg(&self.keys.channel)
            .arg(signal)
            .ignore();
        self.run::<()>("publish", &pipe).await
    }

    async fn views(&self, workers: &[WorkerName]) -> Result<Vec<CoreView>, StoreError> {
        let now = crate::core::now_ms();
        let mut invocation = self.views.prepare_invoke();
        invocation
            .key(&self.keys.cores)
            .arg(&self.keys.prefix)
            .arg(&self.core_id);
        for worker in workers {
            invocation.arg(worker.as_str());
        }
        let answer: Vec<(String, i64, Vec<Option<String>>, Vec<u64>)> = on_link(
            &self.link,
            self.response_timeout,
            "views",
            |mut connection| {
                let invocation = &invocation;
                async move { invocation.invoke_async(&mut connection).await }
            },
        )
        .await?;
        Ok(answer
            .into_iter()
            .map(|(core, heartbeat, aggregates, moved)| CoreView {
                alive: alive(now, heartbeat),
                core,
                aggregates,
                moved,
            })
            .collect())
    }

    async fn ask(
        &self,
        question: &str,
        within: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(&self.keys.cores);
        let (cores,): (HashMap<String, i64>,) = self.run("cores", &pipe).await?;
        let now = crate::core::now_ms();
        let mut waiting: HashSet<String> = cores
            .into_iter()
            .filter(|(core, heartbeat)| *core != self.core_id && alive(now, *heartbeat))
            .map(|(core, _)| core)
            .collect();
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        let id = hex::encode(rand::random::<[u8; 12]>());
        let (answered_tx, mut answered) = mpsc::unbounded_channel();
        self.asking().insert(id.clone(), answered_tx);
        let asked = self
            .signal(&Signal::Ask {
                from: self.core_id.clone(),
                id: id.clone(),
                question: question.to_owned(),
            })
            .await;
        let mut answered_by = Vec::new();
        if asked.is_ok() {
            while !waiting.is_empty() {
                tokio::select! {
                    core = answered.recv() => match core {
                        Some(core) => {
                            if waiting.remove(&core) {
                                answered_by.push(core);
                            }
                        }
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        self.asking().remove(&id);
        asked?;
        if answered_by.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let mut get = redis::cmd("MGET");
        for core in &answered_by {
            get.arg(self.keys.answer(&id, core));
        }
        pipe.add_command(get);
        let (answers,): (Vec<Option<String>>,) = self.run("answers", &pipe).await?;
        Ok(answered_by
            .into_iter()
            .zip(answers)
            .filter_map(|(core, answer)| Some((core, answer?)))
            .collect())
    }

    async fn answer(&self, id: &str, answer: &str) -> Result<(), StoreError> {
        let signal = serde_json::to_string(&Signal::Answered {
            from: self.core_id.clone(),
            id: id.to_owned(),
        })
        .map_err(|e| StoreError::Corrupt(format!("fleet signal: {e}")))?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.answer(id, &self.core_id))
            .arg(answer)
            .arg("PX")
            .arg(ANSWER_TTL.as_millis() as u64)
            .ignore()
            .cmd("PUBLISH")
            .arg(&self.keys.channel)
            .arg(signal)
            .ignore();
        self.run::<()>("answer", &pipe).await
    }

    async fn tell(&self, news: &News) -> Result<(), StoreError> {
        let from = self.core_id.clone();
        let signal = match news {
            News::Subscribed(consumer) => Signal::Subscribed {
                from,
                consumer: consumer.clone(),
            },
            News::Registered(consumer) => Signal::Registered {
                from,
                consumer: consumer.clone(),
            },
            News::Deregistered(consumer) => Signal::Deregistered {
                from,
                consumer: consumer.clone(),
            },
        };
        self.signal(&signal).await
    }

    async fn arrived(
        &self,
        consumer: &ConsumerId,
        workers: Option<&[WorkerName]>,
    ) -> Result<(), StoreError> {
        let mut invocation = self.arrived.prepare_invoke();
        invocation
            .arg(&self.keys.prefix)
            .arg(&self.core_id)
            .arg(consumer.as_str());
        match workers {
            None => {
                invocation.arg("*");
            }
            Some(workers) => {
                for worker in workers {
                    invocation.arg(worker.as_str());
                }
            }
        }
        on_link(
            &self.link,
            self.response_timeout,
            "arrival",
            |mut connection| {
                let invocation = &invocation;
                async move { invocation.invoke_async::<()>(&mut connection).await }
            },
        )
        .await
    }

    async fn leave(&self) {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL")
            .arg(&self.keys.cores)
            .arg(&self.core_id)
            .ignore()
            .cmd("DEL")
            .arg(self.keys.aggregates(&self.core_id))
            .ignore();
        let left = self.run::<()>("leave", &pipe).await;
        let signal = self
            .signal(&Signal::Changed {
                from: self.core_id.clone(),
            })
            .await;
        if let Err(error) = left.and(signal) {
            tracing::warn!(%error, core = %self.core_id, "could not leave the fleet; the other cores will take this core for dead");
        }
    }
}

fn alive(now_ms: i64, heartbeat_ms: i64) -> bool {
    now_ms.saturating_sub(heartbeat_ms) < DEAD_AFTER.as_millis() as i64
}

/// Where the listener sends what it hears.
struct Listeners {
    changed: watch::Sender<u64>,
    heard: mpsc::Sender<Heard>,
    asking: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<String>>>>,
}

impl Listeners {
    fn dispatch(&self, me: &str, payload: &str) {
        let signal: Signal = match serde_json::from_str(payload) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::debug!(%error, "ignoring a malformed fleet signal");
                return;
            }
        };
        if signal.from() == me {
            return;
        }
        let heard = match signal {
            Signal::Changed { .. } => {
                self.changed.send_modify(|g| *g = g.wrapping_add(1));
                return;
            }
            Signal::Answered { from, id } => {
                let asking = self.asking.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(waiter) = asking.get(&id) {
                    let _ = waiter.send(from);
                }
                return;
            }
            Signal::Ask { id, question, .. } => Heard::Asked { id, question },
            Signal::Subscribed { consumer, .. } => Heard::News(News::Subscribed(consumer)),
            Signal::Registered { consumer, .. } => Heard::News(News::Registered(consumer)),
            Signal::Deregistered { consumer, .. } => Heard::News(News::Deregistered(consumer)),
        };
        if self.heard.try_send(heard).is_err() {
            tracing::warn!("fleet signals arrive faster than this core reads them; one dropped");
        }
    }
}

/// Keeps one subscription to the signal channel, reconnecting with backoff.
async fn listen(
    link: Arc<Link>,
    channel: String,
    me: String,
    listeners: Listeners,
    (connect_timeout, response_timeout): (Duration, Duration),
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(50);
    let mut down = false;
    loop {
        let subscribe = subscribe(&link, &channel, connect_timeout, response_timeout);
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            subscribed = subscribe => subscribed,
        };
        match subscribed {
            Ok(pubsub) => {
                if down {
                    tracing::info!(%channel, "fleet signal subscription restored");
                    down = false;
                }
                backoff = Duration::from_millis(50);
                // Signals may have been missed: waiters look again.
                listeners.changed.send_modify(|g| *g = g.wrapping_add(1));
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => match message.get_payload::<String>() {
                                Ok(payload) => listeners.dispatch(&me, &payload),
                                Err(error) => tracing::debug!(%error, "ignoring a fleet signal that is not text"),
                            },
                            None => break,
                        },
                    }
                }
            }
            Err(error) => {
                if !down {
                    tracing::warn!(%channel, %error, "fleet signal subscription down; retrying with backoff");
                    down = true;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Writes the heartbeat every [`HEARTBEAT`], and now and then forgets cores dead for longer
/// than `forget_after`.
async fn beat(
    link: Arc<Link>,
    response_timeout: Duration,
    keys: Keys,
    me: String,
    forget_after: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beats: u64 = 0;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::core::now_ms();
        let mut write = redis::cmd("HSET");
        write.arg(&keys.cores).arg(&me).arg(now);
        let beat: Result<(), StoreError> =
            on_link(&link, response_timeout, "heartbeat", |mut connection| {
                let write = &write;
                async move { write.query_async(&mut connection).await }
            })
            .await;
        if let Err(error) = beat {
            tracing::debug!(%error, "fleet heartbeat not written; retrying");
            continue;
        }
        beats += 1;
        if !beats.is_multiple_of(10) {
            continue;
        }
        let mut read = redis::cmd("HGETALL");
        read.arg(&keys.cores);
        let cores: Result<HashMap<String, i64>, StoreError> =
            on_link(&link, response_timeout, "cores", |mut connection| {
                let read = &read;
                async move { read.query_async(&mut connection).await }
            })
            .await;
        let Ok(cores) = cores else { continue };
        let forget_ms = i64::try_from(forget_after.as_millis()).unwrap_or(i64::MAX);
        for (core, heartbeat) in cores {
            if now.saturating_sub(heartbeat) > forget_ms {
                tracing::info!(%core, "forgetting a core whose heartbeat stopped");
                let mut forget = redis::pipe();
                forget
                    .cmd("HDEL")
                    .arg(&keys.cores)
                    .arg(&core)
                    .ignore()
                    .cmd("DEL")
                    .arg(keys.aggregates(&core))
                    .arg(keys.moved(&core))
                    .ignore();
                let forgotten: Result<(), StoreError> =
                    on_link(&link, response_timeout, "forget", |mut connection| {
                        let forget = &forget;
                        async move { forget.query_async(&mut connection).await }
                    })
                    .await;
                if let Err(error) = forgotten {
                    tracing::debug!(%error, %core, "forgetting a dead core failed; retried later");
                }
            }
        }
    }
}

/// Runs `op` on the link's current connection within `timeout`. A failure is reported to the
/// link, so that behind Sentinels the next use asks them for the master again.
async fn on_link<T, F, Fut>(
    link: &Link,
    timeout: Duration,
    what: &str,
    op: F,
) -> Result<T, StoreError>
where
    F: FnOnce(ConnectionManager) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    let late = || {
        StoreError::Unavailable(format!(
            "redis did not answer fleet {what} within {timeout:?}"
        ))
    };
    let (generation, connection) = tokio::time::timeout(timeout, link.manager())
        .await
        .map_err(|_| late())?
        .map_err(|e| StoreError::Unavailable(format!("redis fleet {what}: {e}")))?;
    match tokio::time::timeout(timeout, op(connection)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => {
            link.failed(generation, &error).await;
            Err(StoreError::Unavailable(format!(
                "redis fleet {what}: {error}"
            )))
        }
        Err(_) => Err(late()),
    }
}

/// KEYS[1]: the cores hash. ARGV[1]: the prefix; ARGV[2]: this core; ARGV[3..]: workers.
/// Returns, for every other core: its id, its heartbeat, its aggregate of each worker (or nil).
const VIEWS: &str = r"
local cores = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #cores, 2 do
  local core = cores[i]
  if core ~= ARGV[2] then
    local aggregates = {}
    local moved = {}
    if #ARGV > 2 then
      local fields = {}
      for j = 3, #ARGV do
        fields[#fields + 1] = ARGV[j]
      end
      aggregates = redis.call('HMGET', ARGV[1] .. ':fleet:agg:' .. core, unpack(fields))
      local everything = tonumber(redis.call('HGET', ARGV[1] .. ':fleet:moved:' .. core, '*') or '0')
      local each = redis.call('HMGET', ARGV[1] .. ':fleet:moved:' .. core, unpack(fields))
      for j = 1, #each do
        moved[j] = everything + (tonumber(each[j] or '0') or 0)
      end
    end
    out[#out + 1] = {core, tonumber(cores[i + 1]) or 0, aggregates, moved}
  end
end
return out
";

/// ARGV[1]: the prefix; 2: this core; 3: the consumer; 4..: the workers it follows (`*`: all).
/// The core it left counts it as moved; that core's next aggregates (which no longer hold it,
/// once it heard the news) reset the count, so only a core that died keeps it.
const ARRIVED: &str = r"
local where_key = ARGV[1] .. ':fleet:where'
local before = redis.call('HGET', where_key, ARGV[3])
redis.call('HSET', where_key, ARGV[3], ARGV[2])
if before and before ~= ARGV[2] then
  for j = 4, #ARGV do
    redis.call('HINCRBY', ARGV[1] .. ':fleet:moved:' .. before, ARGV[j], 1)
  end
end
return 0
";
