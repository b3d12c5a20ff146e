//! The consumer registry of the Redis store: one record per consumer in the `{prefix}:consumers`
//! hash, written by every core, merged inside Redis so that no core's write undoes another's.
//!
//! # Merging
//! Each core keeps its own view of a consumer and saves it whole, so saves from several cores
//! (and from one core before and after a restart) arrive in any order. Every save is therefore
//! merged, by the same rules here ([`Entry::merge`]) and in the [`MERGE`] script: the highest
//! `last_acked_revision` and `last_seen_ms`, the lowest `first_seen_ms`; the endpoint and labels
//! of the newest save that carried a registration (a save with neither endpoint nor labels comes
//! from an ack, and leaves them as they are); the transport of the newest save that named one.
//! "Newest" is the save's `last_seen_ms`, kept per part as `registered_ms` and `transport_ms`
//! so that the order in which saves arrive does not matter. Merging a save twice changes
//! nothing, so every write may be retried.
//!
//! # Writing
//! Acks are frequent and the registry is advisory, so saves are coalesced per consumer in
//! memory and written by a background task, in batches of one script call, as fast as Redis
//! answers. While Redis is away they wait (merged, one entry per consumer) and go out when it
//! is back: acks keep being answered and nothing is lost unless the process dies first.
//! [`Registry::read`] shows unwritten saves too.
//!
//! # Record format
//! JSON with every number as a decimal string (Lua numbers are doubles; the script compares
//! the strings exactly): `{"id", "endpoint", "labels": {…}, "transport", "first_seen_ms",
//! "last_seen_ms", "last_acked_revision", "registered_ms", "transport_ms"}`. A stored record
//! that does not decode is reported, left out of reads, and replaced by the next save.
//!
//! Depends on the parent's error mapping, `store` and `core::types` only.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use redis::Script;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{corrupt, link::Link, store_error};
use crate::{
    core::types::{ConsumerId, Revision},
    store::{ConsumerRecord, StoreError},
};

/// Most records per script call: a script blocks Redis while it runs.
const BATCH: usize = 256;

/// The registry of one store: unwritten saves and how to write them.
pub(super) struct Registry {
    link: Arc<Link>,
    key: String,
    script: Script,
    response_timeout: Duration,
    /// Saves not yet in Redis.
    waiting: Mutex<Waiting>,
    /// One flush at a time, so that what is being written is one batch.
    flushing: tokio::sync::Mutex<()>,
    /// Wakes the writer after a save.
    saved: Notify,
}

/// Saves not yet in Redis: queued (merged per consumer) or being written.
#[derive(Default)]
struct Waiting {
    queued: HashMap<ConsumerId, Entry>,
    writing: Vec<Entry>,
}

impl Waiting {
    fn queue(&mut self, entry: Entry) {
        match self.queued.get_mut(&entry.record.id) {
            Some(queued) => queued.merge(&entry),
            None => {
                self.queued.insert(entry.record.id.clone(), entry);
            }
        }
    }
}

impl Registry {
    pub(super) fn new(link: Arc<Link>, key: String, response_timeout: Duration) -> Self {
        Self {
            link,
            key,
            script: Script::new(MERGE),
            response_timeout,
            waiting: Mutex::new(Waiting::default()),
            flushing: tokio::sync::Mutex::new(()),
            saved: Notify::new(),
        }
    }

    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        // Every critical section is a map insert, merge or drain of plain data: a poisoned
        // lock still holds consistent maps.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `record` for writing (merged with any unwritten save of the same consumer).
    pub(super) fn save(&self, record: &ConsumerRecord) {
        self.waiting().queue(Entry::from(record));
        self.saved.notify_one();
    }

    /// Drops `id`'s unwritten saves and its record in Redis; answers whether it had either.
    /// A save being written right now may still land after it.
    pub(super) async fn remove(&self, id: &ConsumerId) -> Result<bool, StoreError> {
        let queued = self.waiting().queued.remove(id).is_some();
        let mut command = redis::cmd("HDEL");
        command.arg(&self.key).arg(id.as_str());
        let query = async {
            let (generation, mut connection) = self.link.manager().await?;
            let answer = command.query_async(&mut connection).await;
            if let Err(error) = &answer {
                self.link.failed(generation, error).await;
            }
            answer
        };
        let removed: u64 = self.within("consumer removal", query).await?;
        Ok(queued || removed > 0)
    }

    /// `query`'s answer, or [`StoreError::Unavailable`] past the response timeout.
    async fn within<T>(
        &self,
        what: &str,
        query: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.response_timeout, query)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "redis did not answer {what} within {:?}",
                    self.response_timeout
                ))
            })?
            .map_err(|e| store_error(what, &e))
    }

    /// How many consumers' saves wait to be written.
    fn backlog(&self) -> usize {
        let waiting = self.waiting();
        waiting.queued.len() + waiting.writing.len()
    }

    /// Every consumer: what Redis holds, with the unwritten saves merged in.
    pub(super) async fn read(&self) -> Result<Vec<ConsumerRecord>, StoreError> {
        // Taken before reading Redis: a save that is not in it is queued or being written now,
        // and merging one that was written meanwhile changes nothing.
        let unwritten: Vec<Entry> = {
            let waiting = self.waiting();
            waiting
                .queued
                .values()
                .chain(&waiting.writing)
                .cloned()
                .collect()
        };
        let mut command = redis::cmd("HGETALL");
        command.arg(&self.key);
        let query = async {
            let (generation, mut connection) = self.link.manager().await?;
            match command.query_async(&mut connection).await {
                // Reads are safe to repeat: once more after a broken connection.
                Err(e) if e.is_io_error() || e.is_connection_refusal() => {
                    self.link.failed(generation, &e).await;
                    let (_, mut connection) = self.link.manager().await?;
                    command.query_async(&mut connection).await
                }
                other => other,
            }
        };
        let stored: Vec<(String, Vec<u8>)> = self.within("consumers", query).await?;
        let mut all = BTreeMap::new();
        for (id, json) in stored {
            match Entry::decode(&json) {
                Ok(entry) => {
                    all.insert(entry.record.id.clone(), entry);
                }
                Err(error) => {
                    tracing::error!(consumer = %id, %error, "consumer record in redis does not decode; left out until the consumer is seen again");
                }
            }
        }
        for waiting in unwritten {
            match all.get_mut(&waiting.record.id) {
                Some(entry) => entry.merge(&waiting),
                None => {
                    all.insert(waiting.record.id.clone(), waiting);
                }
            }
        }
        Ok(all.into_values().map(|e| e.record).collect())
    }

    /// Writes every waiting save. On failure the unwritten ones wait again.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let _turn = self.flushing.lock().await;
        loop {
            let batch: Vec<Entry> = {
                let mut waiting = self.waiting();
                let ids: Vec<ConsumerId> = waiting.queued.keys().take(BATCH).cloned().collect();
                let batch: Vec<Entry> = ids
                    .iter()
                    .filter_map(|id| waiting.queued.remove(id))
                    .collect();
                waiting.writing.clone_from(&batch);
                batch
            };
            if batch.is_empty() {
                return Ok(());
            }
            let written = self.write(&batch).await;
            let mut waiting = self.waiting();
            waiting.writing.clear();
            if let Err(error) = written {
                for entry in batch {
                    waiting.queue(entry);
                }
                return Err(error);
            }
        }
    }

    async fn write(&self, batch: &[Entry]) -> Result<(), StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.key(&self.key);
        for entry in batch {
            let json = entry.encode()?;
            invocation.arg(entry.record.id.as_str()).arg(json);
        }
        let attempts = async {
            let (generation, mut connection) = self.link.manager().await?;
            match invocation.invoke_async(&mut connection).await {
                // The merge is idempotent: once more after a broken connection (or a
                // read-only replica after a failover).
                Err(e)
                    if e.is_io_error()
                        || e.is_connection_refusal()
                        || e.code() == Some("READONLY") =>
                {
                    self.link.failed(generation, &e).await;
                    let (_, mut connection) = self.link.manager().await?;
                    invocation.invoke_async(&mut connection).await
                }
                other => other,
            }
        };
        let replaced: Vec<String> = tokio::time::timeout(self.response_timeout, attempts)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "redis did not answer save_consumer within {:?}",
                    self.response_timeout
                ))
            })?
            .map_err(|e| store_error("save_consumer", &e))?;
        for id in replaced {
            tracing::warn!(consumer = %id, "replaced a consumer record in redis that did not decode");
        }
        Ok(())
    }
}

/// Writes saves as they come until `cancel` fires; while Redis is away, retries with jittered
/// exponential backoff. Logs once when writes start failing and once when they catch up.
pub(super) async fn keep_writing(registry: Arc<Registry>, cancel: CancellationToken) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(2);
    let mut backoff = FIRST_BACKOFF;
    let mut failing = false;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = registry.saved.notified() => {}
        }
        loop {
            match registry.flush().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("consumer registry writes caught up");
                        failing = false;
                    }
                    backoff = FIRST_BACKOFF;
                    break;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(%error, waiting = registry.backlog(), "consumer registry writes wait for redis; retrying with backoff");
                        failing = true;
                    }
                    let jittered = backoff / 2 + backoff.mul_f64(rand::random::<f64>() / 2.0);
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(jittered) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// A registry record with when its registration and transport were reported.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    record: ConsumerRecord,
    /// `last_seen_ms` of the save its endpoint and labels came from.
    registered_ms: i64,
    /// `last_seen_ms` of the save its transport came from.
    transport_ms: i64,
}

impl From<&ConsumerRecord> for Entry {
    fn from(record: &ConsumerRecord) -> Self {
        // Times before 1970 do not occur; the script compares non-negative decimals only.
        let mut record = record.clone();
        record.first_seen_ms = record.first_seen_ms.max(0);
        record.last_seen_ms = record.last_seen_ms.max(0);
        let seen = record.last_seen_ms;
        // 0 when there is nothing to date, so that equal contents encode equally.
        let registered = !record.endpoint.is_empty() || !record.labels.is_empty();
        let named = !record.transport.is_empty();
        Self {
            record,
            registered_ms: if registered { seen } else { 0 },
            transport_ms: if named { seen } else { 0 },
        }
    }
}

impl Entry {
    fn registered(&self) -> bool {
        !self.record.endpoint.is_empty() || !self.record.labels.is_empty()
    }

    /// Folds `other` in by the rules in the module docs (the [`MERGE`] script's rules).
    fn merge(&mut self, other: &Entry) {
        let (mine, theirs) = (&mut self.record, &other.record);
        mine.first_seen_ms = mine.first_seen_ms.min(theirs.first_seen_ms);
        mine.last_seen_ms = mine.last_seen_ms.max(theirs.last_seen_ms);
        mine.last_acked_revision = mine.last_acked_revision.max(theirs.last_acked_revision);
        if other.registered() && (!self.registered() || other.registered_ms >= self.registered_ms) {
            self.record.endpoint.clone_from(&other.record.endpoint);
            self.record.labels.clone_from(&other.record.labels);
            self.registered_ms = other.registered_ms;
        }
        if !other.record.transport.is_empty()
            && (self.record.transport.is_empty() || other.transport_ms >= self.transport_ms)
        {
            self.record.transport.clone_from(&other.record.transport);
            self.transport_ms = other.transport_ms;
        }
    }

    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let json = Json {
            id: self.record.id.clone(),
            endpoint: self.record.endpoint.clone(),
            labels: self.record.labels.clone(),
            transport: self.record.transport.clone(),
            first_seen_ms: self.record.first_seen_ms.to_string(),
            last_seen_ms: self.record.last_seen_ms.to_string(),
            last_acked_revision: self.record.last_acked_revision.to_string(),
            registered_ms: self.registered_ms.to_string(),
            transport_ms: self.transport_ms.to_string(),
        };
        serde_json::to_vec(&json).map_err(|e| corrupt("consumer record", e))
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let json: Json =
            serde_json::from_slice(bytes).map_err(|e| corrupt("consumer record", e))?;
        let millis = |field: &str, text: &str| {
            text.parse::<i64>()
                .map_err(|e| corrupt(&format!("consumer {field} {text:?}"), e))
        };
        let last_acked_revision = json
            .last_acked_revision
            .parse::<Revision>()
            .map_err(|e| corrupt("consumer last_acked_revision", e))?;
        Ok(Self {
            registered_ms: millis("registered_ms", &json.registered_ms)?,
            transport_ms: millis("transport_ms", &json.transport_ms)?,
            record: ConsumerRecord {
                first_seen_ms: millis("first_seen_ms", &json.first_seen_ms)?,
                last_seen_ms: millis("last_seen_ms", &json.last_seen_ms)?,
                last_acked_revision,
                id: json.id,
                endpoint: json.endpoint,
                labels: json.labels,
                transport: json.transport,
            },
        })
    }
}

/// The record format (see the module docs).
#[derive(Serialize, Deserialize)]
struct Json {
    id: ConsumerId,
    endpoint: String,
    labels: BTreeMap<String, String>,
    transport: String,
    first_seen_ms: String,
    last_seen_ms: String,
    last_acked_revision: String,
    registered_ms: String,
    transport_ms: String,
}

/// Merges a batch of records into the consumers hash by [`Entry::merge`]'s rules.
/// KEYS[1]: the hash. ARGV: consumer id, record, consumer id, record, … Every record is checked
/// before anything is written (a script that fails half way keeps its first writes). Returns the
/// ids whose stored record did not decode and was replaced.
const MERGE: &str = r"
-- Non-negative decimals without leading zeros, or nil: compared exactly, as text.
local function decimal(value)
  if type(value) ~= 'string' or not string.match(value, '^%d+$') then
    return nil
  end
  return (string.gsub(value, '^0+(%d)', '%1'))
end
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
local numbers = {'first_seen_ms', 'last_seen_ms', 'last_acked_revision', 'registered_ms', 'transport_ms'}
local function decode(text)
  local ok, record = pcall(cjson.decode, text)
  if not ok or type(record) ~= 'table' or type(record.id) ~= 'string'
      or type(record.endpoint) ~= 'string' or type(record.labels) ~= 'table'
      or type(record.transport) ~= 'string' then
    return nil
  end
  for _, field in ipairs(numbers) do
    record[field] = decimal(record[field])
    if not record[field] then
      return nil
    end
  end
  return record
end
local function registered(record)
  return record.endpoint ~= '' or next(record.labels) ~= nil
end

local incoming = {}
for i = 1, #ARGV, 2 do
  local record = decode(ARGV[i + 1])
  if not record or record.id ~= ARGV[i] then
    return redis.error_reply('WPCORRUPT new consumer record of ' .. ARGV[i] .. ' does not decode')
  end
  incoming[#incoming + 1] = record
end

local replaced = {}
for _, new in ipairs(incoming) do
  local merged = new
  local text = redis.call('HGET', KEYS[1], new.id)
  local stored = text and decode(text)
  if text and not stored then
    replaced[#replaced + 1] = new.id
  end
  if stored then
    merged = stored
    if greater(merged.first_seen_ms, new.first_seen_ms) then
      merged.first_seen_ms = new.first_seen_ms
    end
    if greater(new.last_seen_ms, merged.last_seen_ms) then
      merged.last_seen_ms = new.last_seen_ms
    end
    if greater(new.last_acked_revision, merged.last_acked_revision) then
      merged.last_acked_revision = new.last_acked_revision
    end
    if registered(new) and (not registered(merged)
        or not greater(merged.registered_ms, new.registered_ms)) then
      merged.endpoint, merged.labels, merged.registered_ms = new.endpoint, new.labels, new.registered_ms
    end
    if new.transport ~= '' and (merged.transport == ''
        or not greater(merged.transport_ms, new.transport_ms)) then
      merged.transport, merged.transport_ms = new.transport, new.transport_ms
    end
  end
  redis.call('HSET', KEYS[1], new.id, cjson.encode(merged))
end
return replaced
";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn entry(endpoint: &str, transport: &str, seen: (i64, i64), acked: Revision) -> Entry {
        Entry::from(&ConsumerRecord {
            id: ConsumerId::authorize("edge-1", "").unwrap_or_else(|e| panic!("{e}")),
            endpoint: endpoint.to_owned(),
            labels: BTreeMap::new(),
            transport: transport.to_owned(),
            first_seen_ms: seen.0,
            last_seen_ms: seen.1,
            last_acked_revision: acked,
        })
    }

    #[test]
    fn an_entry_round_trips_through_its_json() {
        let mut entry = entry("10.0.0.1:1", "quic", (1, 1 << 60), u64::MAX);
        entry
            .record
            .labels
            .insert("zone/a".to_owned(), "é\"x".to_owned());
        entry.registered_ms = 7;
        let json = entry.encode().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Entry::decode(&json).ok(), Some(entry));
    }

    #[test]
    fn an_ack_keeps_the_registration_and_a_stale_registration_loses() {
        let mut merged = entry("new:1", "grpc", (10, 50), 7);
        merged.merge(&entry("", "quic", (5, 60), 3));
        assert_eq!(
            (
                merged.record.endpoint.as_str(),
                merged.record.transport.as_str()
            ),
            ("new:1", "quic")
        );
        assert_eq!(
            (
                merged.record.first_seen_ms,
                merged.record.last_seen_ms,
                merged.record.last_acked_revision
            ),
            (5, 60, 7)
        );
        merged.merge(&entry("old:1", "grpc", (1, 40), 9));
        assert_eq!(
            (
                merged.record.endpoint.as_str(),
                merged.record.transport.as_str()
            ),
            ("new:1", "quic"),
            "saved at 40: older than the registration (50) and the transport (60)"
        );
        assert_eq!(merged.record.last_acked_revision, 9);
    }

    proptest! {
        /// Whatever order saves arrive in, and however they are coalesced before being
        /// written, the result is the same.
        #[test]
        fn merging_does_not_depend_on_order_or_grouping(
            saves in proptest::collection::vec(
                (0..3_usize, 0..3_usize, 0..1000_i64, 0..100_u64),
                1..12,
            ),
            split in 0..12_usize,
        ) {
            let endpoints = ["", "a:1", "b:1"];
            let transports = ["", "grpc", "quic"];
            // Distinct last-seen times, so that "newest" is never a tie.
            let entries: Vec<Entry> = saves
                .iter()
                .enumerate()
                .map(|(i, (e, t, seen, acked))| {
                    let seen = seen * 16 + i as i64;
                    entry(endpoints[*e], transports[*t], (seen / 2, seen), *acked)
                })
                .collect();
            let fold = |entries: &[Entry]| {
                let mut merged = entries[0].clone();
                for entry in &entries[1..] {
                    merged.merge(entry);
                }
                merged
            };
            let in_order = fold(&entries);
            let mut reversed = entries.clone();
            reversed.reverse();
            prop_assert_eq!(&fold(&reversed), &in_order);
            let split = split.min(entries.len() - 1).max(1);
            if split < entries.len() {
                let mut grouped = fold(&entries[split..]);
                grouped.merge(&fold(&entries[..split]));
                prop_assert_eq!(&grouped, &in_order);
            }
        }
    }
}
